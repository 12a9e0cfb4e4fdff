/* dequant_ref: rows of every supported type back to float32, one block at a time.
 *
 * Element order inside a block is ggml's: Q4_0/Q4_1 keep elements 0..15 in the low nibbles and
 * 16..31 in the high nibbles; K-quants work in chunks of 64 (Q4_K/Q5_K: 32 low nibbles then 32
 * high nibbles) or 128 (Q3_K, Q6_K: four 32-element groups from 2-bit planes). The value of every
 * element is exactly representable as (float scale) * (small integer) [- float min]. */
#include <string.h>

#include "kern/kern_internal.h"

static void s_dequant_q4_0(const block_q4_0 *b, float *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, y += QK4_0) {
        const float d = kern_fp16_to_f32(b[i].d);
        for (int j = 0; j < QK4_0 / 2; j++) {
            y[j] = (float)((b[i].qs[j] & 0xF) - 8) * d;
            y[j + 16] = (float)((b[i].qs[j] >> 4) - 8) * d;
        }
    }
}

static void s_dequant_q4_1(const block_q4_1 *b, float *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, y += QK4_0) {
        const float d = kern_fp16_to_f32(b[i].d), m = kern_fp16_to_f32(b[i].m);
        for (int j = 0; j < QK4_0 / 2; j++) {
            y[j] = (float)(b[i].qs[j] & 0xF) * d + m;
            y[j + 16] = (float)(b[i].qs[j] >> 4) * d + m;
        }
    }
}

static void s_dequant_q8_0(const block_q8_0 *b, float *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, y += QK8_0) {
        const float d = kern_fp16_to_f32(b[i].d);
        for (int j = 0; j < QK8_0; j++)
            y[j] = (float)b[i].qs[j] * d;
    }
}

static void s_dequant_q3_K(const block_q3_K *b, float *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++) {
        const float d = kern_fp16_to_f32(b[i].d);
        int8_t sc[16];
        kern_q3k_scales(b[i].scales, sc);
        const uint8_t *q = b[i].qs, *hm = b[i].hmask;
        int is = 0;
        uint8_t m = 1;
        /* two halves of 128; each has 4 bit-planes (shift 0,2,4,6) of 32 elements */
        for (int half = 0; half < 2; half++, q += 32) {
            for (int shift = 0; shift < 8; shift += 2, m <<= 1) {
                for (int g = 0; g < 2; g++) {
                    const float dl = d * (float)sc[is++];
                    for (int l = 0; l < 16; l++) {
                        int k = g * 16 + l;
                        int v = ((q[k] >> shift) & 3) - ((hm[k] & m) ? 0 : 4);
                        *y++ = dl * (float)v;
                    }
                }
            }
        }
    }
}

static void s_dequant_q4_K(const block_q4_K *b, float *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++) {
        const float d = kern_fp16_to_f32(b[i].d), dmin = kern_fp16_to_f32(b[i].dmin);
        const uint8_t *q = b[i].qs;
        for (int c = 0; c < 4; c++, q += 32) { /* chunk of 64 = sub-blocks 2c, 2c+1 */
            uint8_t sc, m;
            kern_k4_scale_min(2 * c, b[i].scales, &sc, &m);
            const float d1 = d * sc, m1 = dmin * m;
            kern_k4_scale_min(2 * c + 1, b[i].scales, &sc, &m);
            const float d2 = d * sc, m2 = dmin * m;
            for (int l = 0; l < 32; l++)
                *y++ = d1 * (float)(q[l] & 0xF) - m1;
            for (int l = 0; l < 32; l++)
                *y++ = d2 * (float)(q[l] >> 4) - m2;
        }
    }
}

static void s_dequant_q5_K(const block_q5_K *b, float *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++) {
        const float d = kern_fp16_to_f32(b[i].d), dmin = kern_fp16_to_f32(b[i].dmin);
        const uint8_t *ql = b[i].qs, *qh = b[i].qh;
        uint8_t u1 = 1, u2 = 2;
        for (int c = 0; c < 4; c++, ql += 32, u1 <<= 2, u2 <<= 2) {
            uint8_t sc, m;
            kern_k4_scale_min(2 * c, b[i].scales, &sc, &m);
            const float d1 = d * sc, m1 = dmin * m;
            kern_k4_scale_min(2 * c + 1, b[i].scales, &sc, &m);
            const float d2 = d * sc, m2 = dmin * m;
            for (int l = 0; l < 32; l++)
                *y++ = d1 * (float)((ql[l] & 0xF) + ((qh[l] & u1) ? 16 : 0)) - m1;
            for (int l = 0; l < 32; l++)
                *y++ = d2 * (float)((ql[l] >> 4) + ((qh[l] & u2) ? 16 : 0)) - m2;
        }
    }
}

static void s_dequant_q6_K(const block_q6_K *b, float *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++) {
        const float d = kern_fp16_to_f32(b[i].d);
        const uint8_t *ql = b[i].ql, *qh = b[i].qh;
        const int8_t *sc = b[i].scales;
        for (int half = 0; half < 2; half++, y += 128, ql += 64, qh += 32, sc += 8) {
            for (int l = 0; l < 32; l++) {
                int is = l / 16;
                int q1 = ((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
                int q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
                int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
                int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
                y[l] = d * (float)sc[is + 0] * (float)q1;
                y[l + 32] = d * (float)sc[is + 2] * (float)q2;
                y[l + 64] = d * (float)sc[is + 4] * (float)q3;
                y[l + 96] = d * (float)sc[is + 6] * (float)q4;
            }
        }
    }
}

void kern_dequantize_row_ref(stp_type t, const void *src, float *dst, int64_t n) {
    switch (t) {
    case STP_TYPE_F32: memcpy(dst, src, (size_t)n * sizeof(float)); break;
    case STP_TYPE_F16: {
        const stp_fp16 *h = src;
        for (int64_t i = 0; i < n; i++)
            dst[i] = kern_fp16_to_f32(h[i]);
        break;
    }
    case STP_TYPE_BF16: {
        const stp_bf16 *h = src;
        for (int64_t i = 0; i < n; i++)
            dst[i] = kern_bf16_to_f32(h[i]);
        break;
    }
    case STP_TYPE_Q4_0: s_dequant_q4_0(src, dst, n / QK4_0); break;
    case STP_TYPE_Q4_1: s_dequant_q4_1(src, dst, n / QK4_0); break;
    case STP_TYPE_Q8_0: s_dequant_q8_0(src, dst, n / QK8_0); break;
    case STP_TYPE_Q3_K: s_dequant_q3_K(src, dst, n / QK_K); break;
    case STP_TYPE_Q4_K: s_dequant_q4_K(src, dst, n / QK_K); break;
    case STP_TYPE_Q5_K: s_dequant_q5_K(src, dst, n / QK_K); break;
    case STP_TYPE_Q6_K: s_dequant_q6_K(src, dst, n / QK_K); break;
    default: memset(dst, 0, (size_t)n * sizeof(float)); break; /* unsupported: caller checks */
    }
}
