/* tensor_type: the ggml tensor type ids stored in GGUF files, with block geometry.
 *
 * The table knows every ggml type id up to IQ4_XS/BF16 so the GGUF reader can size and
 * validate any tensor; whether the engine can compute with a type is a separate question
 * (tensor_type_supported), answered by common/kern. Ids are ggml's and never change. */
#ifndef STP_TENSOR_TYPE_H
#define STP_TENSOR_TYPE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef enum stp_type {
    STP_TYPE_F32 = 0,
    STP_TYPE_F16 = 1,
    STP_TYPE_Q4_0 = 2,
    STP_TYPE_Q4_1 = 3,
    STP_TYPE_Q5_0 = 6,
    STP_TYPE_Q5_1 = 7,
    STP_TYPE_Q8_0 = 8,
    STP_TYPE_Q8_1 = 9,
    STP_TYPE_Q2_K = 10,
    STP_TYPE_Q3_K = 11,
    STP_TYPE_Q4_K = 12,
    STP_TYPE_Q5_K = 13,
    STP_TYPE_Q6_K = 14,
    STP_TYPE_Q8_K = 15,
    STP_TYPE_IQ2_XXS = 16,
    STP_TYPE_IQ2_XS = 17,
    STP_TYPE_IQ3_XXS = 18,
    STP_TYPE_IQ1_S = 19,
    STP_TYPE_IQ4_NL = 20,
    STP_TYPE_IQ3_S = 21,
    STP_TYPE_IQ2_S = 22,
    STP_TYPE_IQ4_XS = 23,
    STP_TYPE_I8 = 24,
    STP_TYPE_I16 = 25,
    STP_TYPE_I32 = 26,
    STP_TYPE_I64 = 27,
    STP_TYPE_F64 = 28,
    STP_TYPE_IQ1_M = 29,
    STP_TYPE_BF16 = 30,
    STP_TYPE_TQ1_0 = 34,
    STP_TYPE_TQ2_0 = 35,
    STP_TYPE_MXFP4 = 39,
    STP_TYPE_COUNT = 40,
} stp_type;

typedef struct stp_type_info {
    const char *name; /* "Q4_0"; NULL for an id that is not a type */
    uint32_t blck;    /* elements per block */
    uint32_t size;    /* bytes per block */
} stp_type_info;

/* NULL when id is not a known ggml type. */
const stp_type_info *tensor_type_info(uint32_t id);
/* "Q4_0", or "type#<id>" in a static buffer-free form "unknown" for unknown ids. */
const char *tensor_type_name(uint32_t id);
/* Bytes of one row of n elements; 0 when n is not a multiple of the block size or id unknown. */
size_t tensor_type_row_size(uint32_t id, int64_t n);
/* True for the types the engine computes with (dequantize and dot product exist). */
bool tensor_type_supported(uint32_t id);

#endif
