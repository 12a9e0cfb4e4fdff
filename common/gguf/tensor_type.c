/* tensor_type: block geometry of ggml tensor types (ids and sizes from ggml's type traits). */
#include "gguf/tensor_type.h"

static const stp_type_info s_types[STP_TYPE_COUNT] = {
    [STP_TYPE_F32] = {"F32", 1, 4},
    [STP_TYPE_F16] = {"F16", 1, 2},
    [STP_TYPE_Q4_0] = {"Q4_0", 32, 18},
    [STP_TYPE_Q4_1] = {"Q4_1", 32, 20},
    [STP_TYPE_Q5_0] = {"Q5_0", 32, 22},
    [STP_TYPE_Q5_1] = {"Q5_1", 32, 24},
    [STP_TYPE_Q8_0] = {"Q8_0", 32, 34},
    [STP_TYPE_Q8_1] = {"Q8_1", 32, 36},
    [STP_TYPE_Q2_K] = {"Q2_K", 256, 84},
    [STP_TYPE_Q3_K] = {"Q3_K", 256, 110},
    [STP_TYPE_Q4_K] = {"Q4_K", 256, 144},
    [STP_TYPE_Q5_K] = {"Q5_K", 256, 176},
    [STP_TYPE_Q6_K] = {"Q6_K", 256, 210},
    [STP_TYPE_Q8_K] = {"Q8_K", 256, 292},
    [STP_TYPE_IQ2_XXS] = {"IQ2_XXS", 256, 66},
    [STP_TYPE_IQ2_XS] = {"IQ2_XS", 256, 74},
    [STP_TYPE_IQ3_XXS] = {"IQ3_XXS", 256, 98},
    [STP_TYPE_IQ1_S] = {"IQ1_S", 256, 50},
    [STP_TYPE_IQ4_NL] = {"IQ4_NL", 32, 18},
    [STP_TYPE_IQ3_S] = {"IQ3_S", 256, 110},
    [STP_TYPE_IQ2_S] = {"IQ2_S", 256, 82},
    [STP_TYPE_IQ4_XS] = {"IQ4_XS", 256, 136},
    [STP_TYPE_I8] = {"I8", 1, 1},
    [STP_TYPE_I16] = {"I16", 1, 2},
    [STP_TYPE_I32] = {"I32", 1, 4},
    [STP_TYPE_I64] = {"I64", 1, 8},
    [STP_TYPE_F64] = {"F64", 1, 8},
    [STP_TYPE_IQ1_M] = {"IQ1_M", 256, 56},
    [STP_TYPE_BF16] = {"BF16", 1, 2},
    [STP_TYPE_TQ1_0] = {"TQ1_0", 256, 54},
    [STP_TYPE_TQ2_0] = {"TQ2_0", 256, 66},
    [STP_TYPE_MXFP4] = {"MXFP4", 32, 17},
};

const stp_type_info *tensor_type_info(uint32_t id) {
    if (id >= STP_TYPE_COUNT || !s_types[id].name) return 0;
    return &s_types[id];
}

const char *tensor_type_name(uint32_t id) {
    const stp_type_info *t = tensor_type_info(id);
    return t ? t->name : "unknown";
}

size_t tensor_type_row_size(uint32_t id, int64_t n) {
    const stp_type_info *t = tensor_type_info(id);
    if (!t || n < 0 || n % t->blck) return 0;
    return (size_t)(n / t->blck) * t->size;
}

bool tensor_type_supported(uint32_t id) {
    switch (id) {
    case STP_TYPE_F32:
    case STP_TYPE_F16:
    case STP_TYPE_BF16:
    case STP_TYPE_Q8_0:
    case STP_TYPE_Q4_0:
    case STP_TYPE_Q4_1:
    case STP_TYPE_Q3_K:
    case STP_TYPE_Q4_K:
    case STP_TYPE_Q5_K:
    case STP_TYPE_Q6_K: return true;
    default: return false;
    }
}
