/* quant_ref: activation quantizers (what ggml-cpu does to x before a dot product) and the
 * weight quantizers of ggml's reference code (what llama-quantize wrote into the files).
 *
 * The two families round differently on purpose, because ggml does:
 *  - activations (quantize_row_q8_0/q8_1 on x86, AVX path): d = amax/127, multiplier
 *    id = 127/amax in float32, q = round-half-even(x*id) (_mm256_round_ps);
 *    Q8_K (reference C code on x86): iscale = -127/max (max = signed element of largest |x|,
 *    first on ties), q = min(127, nearest_int(iscale*x)), d = 1/iscale kept in float32;
 *  - weights (quantize_row_*_ref): Q8_0 q = roundf(x/d) (half away from zero) with id = 1/d;
 *    Q4_0 d = max/-8 with max the signed element of largest |x|; Q4_1 d = (max-min)/15.
 * Plain C, one block at a time. See README.md ("activation rounding"). */
#include <math.h>
#include <string.h>

#include "kern/kern_internal.h"
#include "util/stp_err.h"

/* ---- activation format ---------------------------------------------------------------------- */

stp_type kern_act_type(stp_type wtype) {
    switch (wtype) {
    case STP_TYPE_Q4_0:
    case STP_TYPE_Q8_0: return STP_TYPE_Q8_0;
    case STP_TYPE_Q4_1: return STP_TYPE_Q8_1;
    case STP_TYPE_Q3_K:
    case STP_TYPE_Q4_K:
    case STP_TYPE_Q5_K:
    case STP_TYPE_Q6_K: return STP_TYPE_Q8_K;
    case STP_TYPE_F16: return STP_TYPE_F16;
    case STP_TYPE_BF16: return STP_TYPE_BF16;
    default: return STP_TYPE_F32;
    }
}

size_t kern_act_size(stp_type wtype, int64_t n) {
    switch (kern_act_type(wtype)) {
    case STP_TYPE_Q8_0: return (size_t)(n / QK8_0) * sizeof(block_q8_0);
    case STP_TYPE_Q8_1: return (size_t)(n / QK8_0) * sizeof(block_q8_1);
    case STP_TYPE_Q8_K: return (size_t)(n / QK_K) * sizeof(block_q8_K);
    case STP_TYPE_F16:
    case STP_TYPE_BF16: return (size_t)n * 2;
    default: return (size_t)n * 4;
    }
}

/* Q8_0 activation block: d = amax/127 (fp16), q = rint(x * (127/amax)). */
static void s_quantize_q8_0_act(const float *x, block_q8_0 *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, x += QK8_0) {
        float amax = 0.0f;
        for (int j = 0; j < QK8_0; j++)
            amax = fmaxf(amax, fabsf(x[j]));
        const float d = amax / 127.0f;
        const float id = amax != 0.0f ? 127.0f / amax : 0.0f;
        y[i].d = kern_f32_to_fp16(d);
        for (int j = 0; j < QK8_0; j++)
            y[i].qs[j] = (int8_t)nearbyintf(x[j] * id);
    }
}

/* Q8_1 activation block: as Q8_0 plus s = fp16(d * sum q) with the float32 d. */
static void s_quantize_q8_1_act(const float *x, block_q8_1 *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, x += QK8_0) {
        float amax = 0.0f;
        for (int j = 0; j < QK8_0; j++)
            amax = fmaxf(amax, fabsf(x[j]));
        const float d = amax / 127.0f;
        const float id = amax != 0.0f ? 127.0f / amax : 0.0f;
        int sum = 0;
        for (int j = 0; j < QK8_0; j++) {
            y[i].qs[j] = (int8_t)nearbyintf(x[j] * id);
            sum += y[i].qs[j];
        }
        y[i].d = kern_f32_to_fp16(d);
        y[i].s = kern_f32_to_fp16(d * (float)sum);
    }
}

/* ggml's nearest_int: round half to even via the 1.5*2^23 trick (|v| < 2^22). */
static int s_nearest_int(float v) {
    float t = v + 12582912.0f;
    int32_t i;
    memcpy(&i, &t, 4);
    return (i & 0x007FFFFF) - 0x00400000;
}

static void s_quantize_q8_K(const float *x, block_q8_K *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, x += QK_K) {
        float amax = 0.0f, max = 0.0f;
        for (int j = 0; j < QK_K; j++) {
            float ax = fabsf(x[j]);
            if (ax > amax) {
                amax = ax;
                max = x[j];
            }
        }
        memset(&y[i], 0, sizeof y[i]);
        if (amax == 0.0f) continue; /* d = 0, all q = 0 */
        const float iscale = -127.0f / max;
        for (int j = 0; j < QK_K; j++) {
            int v = s_nearest_int(iscale * x[j]);
            y[i].qs[j] = (int8_t)(v < 127 ? v : 127);
        }
        for (int g = 0; g < QK_K / 16; g++) {
            int sum = 0;
            for (int j = 0; j < 16; j++)
                sum += y[i].qs[g * 16 + j];
            y[i].bsums[g] = (int16_t)sum;
        }
        y[i].d = 1.0f / iscale;
    }
}

void kern_quantize_act_ref(stp_type wtype, const float *x, void *xq, int64_t n) {
    switch (kern_act_type(wtype)) {
    case STP_TYPE_Q8_0: s_quantize_q8_0_act(x, xq, n / QK8_0); break;
    case STP_TYPE_Q8_1: s_quantize_q8_1_act(x, xq, n / QK8_0); break;
    case STP_TYPE_Q8_K: s_quantize_q8_K(x, xq, n / QK_K); break;
    case STP_TYPE_F16: {
        stp_fp16 *h = xq;
        for (int64_t i = 0; i < n; i++)
            h[i] = kern_f32_to_fp16(x[i]);
        break;
    }
    case STP_TYPE_BF16: {
        stp_bf16 *h = xq;
        for (int64_t i = 0; i < n; i++)
            h[i] = kern_f32_to_bf16(x[i]);
        break;
    }
    default: memcpy(xq, x, (size_t)n * sizeof(float)); break;
    }
}

/* ---- weight quantizers (ggml's quantize_row_*_ref) ------------------------------------------ */

static void s_quantize_q8_0_ref(const float *x, block_q8_0 *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, x += QK8_0) {
        float amax = 0.0f;
        for (int j = 0; j < QK8_0; j++)
            amax = fmaxf(amax, fabsf(x[j]));
        const float d = amax / 127.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        y[i].d = kern_f32_to_fp16(d);
        for (int j = 0; j < QK8_0; j++)
            y[i].qs[j] = (int8_t)roundf(x[j] * id);
    }
}

static void s_quantize_q4_0_ref(const float *x, block_q4_0 *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, x += QK4_0) {
        float amax = 0.0f, max = 0.0f;
        for (int j = 0; j < QK4_0; j++) {
            if (amax < fabsf(x[j])) {
                amax = fabsf(x[j]);
                max = x[j];
            }
        }
        const float d = max / -8.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        y[i].d = kern_f32_to_fp16(d);
        for (int j = 0; j < QK4_0 / 2; j++) {
            /* truncation toward zero of x*id + 8.5, clamped to 15, as ggml */
            int q0 = (int8_t)(x[j] * id + 8.5f);
            int q1 = (int8_t)(x[j + QK4_0 / 2] * id + 8.5f);
            q0 = q0 < 15 ? q0 : 15;
            q1 = q1 < 15 ? q1 : 15;
            y[i].qs[j] = (uint8_t)(q0 | (q1 << 4));
        }
    }
}

static void s_quantize_q4_1_ref(const float *x, block_q4_1 *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, x += QK4_0) {
        float min = INFINITY, max = -INFINITY;
        for (int j = 0; j < QK4_0; j++) {
            if (x[j] < min) min = x[j];
            if (x[j] > max) max = x[j];
        }
        const float d = (max - min) / 15.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        y[i].d = kern_f32_to_fp16(d);
        y[i].m = kern_f32_to_fp16(min);
        for (int j = 0; j < QK4_0 / 2; j++) {
            int q0 = (int8_t)((x[j] - min) * id + 0.5f);
            int q1 = (int8_t)((x[j + QK4_0 / 2] - min) * id + 0.5f);
            q0 = q0 < 15 ? q0 : 15;
            q1 = q1 < 15 ? q1 : 15;
            y[i].qs[j] = (uint8_t)(q0 | (q1 << 4));
        }
    }
}

int kern_quantize_row_ref(stp_type t, const float *src, void *dst, int64_t n) {
    switch (t) {
    case STP_TYPE_F32: memcpy(dst, src, (size_t)n * sizeof(float)); return 0;
    case STP_TYPE_F16: {
        stp_fp16 *h = dst;
        for (int64_t i = 0; i < n; i++)
            h[i] = kern_f32_to_fp16(src[i]);
        return 0;
    }
    case STP_TYPE_BF16: {
        stp_bf16 *h = dst;
        for (int64_t i = 0; i < n; i++)
            h[i] = kern_f32_to_bf16(src[i]);
        return 0;
    }
    case STP_TYPE_Q8_0:
        if (n % QK8_0) return STP_EINVAL;
        s_quantize_q8_0_ref(src, dst, n / QK8_0);
        return 0;
    case STP_TYPE_Q4_0:
        if (n % QK4_0) return STP_EINVAL;
        s_quantize_q4_0_ref(src, dst, n / QK4_0);
        return 0;
    case STP_TYPE_Q4_1:
        if (n % QK4_0) return STP_EINVAL;
        s_quantize_q4_1_ref(src, dst, n / QK4_0);
        return 0;
    default: return STP_EUNSUPPORTED;
    }
}
