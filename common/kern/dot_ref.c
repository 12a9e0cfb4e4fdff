/* dot_ref: reference dot products W_row · xq, plus matvec/matmat/axpy built on them.
 *
 * Each quantized dot product works like ggml's: integer sums of weight quants times activation
 * quants inside a block (or sub-block), then one float multiply by the scales. So the result
 * equals dequantize(w) · dequantize(xq) up to float32 summation order. For Q4_0 and Q8_0 that
 * order is exactly ggml-cpu's on x86 (repacked q4_0_8x8 per-row fma; Q8_0's 8-lane vec_dot),
 * so llama.cpp's results are reproduced bit for bit; see README.md invariant 2. Q4_1 adds m_w * s_x
 * with the activation's stored fp16 block sum s (as ggml; NOT d_x * sum q). Float types accumulate
 * in double like ggml's generic ggml_vec_dot_f16/f32. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kern/kern_internal.h"

/* ---- 32-element blocks ---------------------------------------------------------------------- */

/* Q4_0 (ggml's repacked q4_0_8x8 gemv/gemm order, used for every Q4_0 matrix with a row count
 * divisible by 8): per block the exact integer dot, then ONE fused multiply-add per block,
 * sequential over blocks, with the scale product dw*dx rounded to float first. */
static inline int s_isum_q4_0(const block_q4_0 *x, const block_q8_0 *y) {
    int sumi = 0;
    for (int j = 0; j < 16; j++) {
        sumi += ((x->qs[j] & 0xF) - 8) * y->qs[j];
        sumi += ((x->qs[j] >> 4) - 8) * y->qs[j + 16];
    }
    return sumi;
}

static float s_dot_q4_0(int64_t nb, const block_q4_0 *x, const block_q8_0 *y, const uint8_t *mask) {
    float acc = 0.0f;
    for (int64_t i = 0; i < nb; i++) {
        if (mask && !mask[i]) continue;
        const float s = kern_fp16_to_f32(x[i].d) * kern_fp16_to_f32(y[i].d);
        acc = fmaf((float)s_isum_q4_0(&x[i], y + i), s, acc);
    }
    return acc;
}

static float s_dot_q4_1(int64_t nb, const block_q4_1 *x, const block_q8_1 *y) {
    float sum = 0.0f;
    for (int64_t i = 0; i < nb; i++) {
        int sumi = 0;
        for (int j = 0; j < 16; j++) {
            sumi += (x[i].qs[j] & 0xF) * y[i].qs[j];
            sumi += (x[i].qs[j] >> 4) * y[i].qs[j + 16];
        }
        sum += (kern_fp16_to_f32(x[i].d) * kern_fp16_to_f32(y[i].d)) * (float)sumi +
               kern_fp16_to_f32(x[i].m) * kern_fp16_to_f32(y[i].s);
    }
    return sum;
}

/* Q8_0 (ggml_vec_dot_q8_0_q8_0, AVX2/VNNI path, and llamafile's tinyBLAS_Q0_AVX for prefill):
 * 8 float lanes; lane k takes the exact integer sum of the 4 products 4k..4k+3 of each block,
 * acc[k] = fma(dw*dx, lane_k, acc[k]); at the end hsum_float_8's order:
 * ((a0+a4) + (a2+a6)) + ((a1+a5) + (a3+a7)). */
static float s_hsum8(const float a[8]) {
    const float t0 = a[4] + a[0], t1 = a[5] + a[1], t2 = a[6] + a[2], t3 = a[7] + a[3];
    return (t0 + t2) + (t1 + t3);
}

static float s_dot_lane8(int64_t nb, const void *w, size_t wbs, int q4, const block_q8_0 *y,
                         const uint8_t *mask) {
    float acc[8] = {0};
    for (int64_t i = 0; i < nb; i++) {
        if (mask && !mask[i]) continue;
        const uint8_t *blk = (const uint8_t *)w + (size_t)i * wbs;
        int8_t q[32];
        if (q4) {
            for (int j = 0; j < 16; j++) {
                q[j] = (int8_t)((blk[2 + j] & 0xF) - 8);
                q[j + 16] = (int8_t)((blk[2 + j] >> 4) - 8);
            }
        } else {
            memcpy(q, blk + 2, 32);
        }
        const float d = kern_fp16_to_f32(kern_ld16(blk)) * kern_fp16_to_f32(y[i].d);
        for (int k = 0; k < 8; k++) {
            int s = 0;
            for (int j = 0; j < 4; j++)
                s += q[4 * k + j] * y[i].qs[4 * k + j];
            acc[k] = fmaf(d, (float)s, acc[k]);
        }
    }
    return s_hsum8(acc);
}

static float s_dot_q8_0(int64_t nb, const block_q8_0 *x, const block_q8_0 *y, const uint8_t *mask) {
    return s_dot_lane8(nb, x, sizeof(block_q8_0), 0, y, mask);
}

float kern_vec_dot_q4_0_lane8_ref(int64_t n, const void *w_row, const void *xq) {
    return s_dot_lane8(n / QK4_0, w_row, sizeof(block_q4_0), 1, xq, NULL);
}

/* ---- K-quants against Q8_K ------------------------------------------------------------------ */

/* Integer dot of 'len' quants. */
static int s_idot(const int8_t *a, const int8_t *b, int len) {
    int s = 0;
    for (int k = 0; k < len; k++)
        s += a[k] * b[k];
    return s;
}

static float s_dot_q3_K(int64_t nb, const block_q3_K *x, const block_q8_K *y) {
    float sum = 0.0f;
    for (int64_t i = 0; i < nb; i++) {
        int8_t q[QK_K], sc[16];
        kern_q3k_scales(x[i].scales, sc);
        const uint8_t *qs = x[i].qs;
        int8_t *p = q;
        uint8_t m = 1;
        for (int half = 0; half < 2; half++, qs += 32)
            for (int shift = 0; shift < 8; shift += 2, m <<= 1)
                for (int l = 0; l < 32; l++)
                    *p++ = (int8_t)(((qs[l] >> shift) & 3) - ((x[i].hmask[l] & m) ? 0 : 4));
        int sumi = 0;
        for (int j = 0; j < 16; j++)
            sumi += sc[j] * s_idot(q + 16 * j, y[i].qs + 16 * j, 16);
        sum += kern_fp16_to_f32(x[i].d) * y[i].d * (float)sumi;
    }
    return sum;
}

/* Q4_K and Q5_K share the scale/min layout; hbits is NULL for Q4_K. */
static float s_dot_k45(const uint8_t *scales, const uint8_t *qs, const uint8_t *qh, stp_fp16 d16,
                       stp_fp16 dmin16, const block_q8_K *y) {
    int8_t q[QK_K];
    for (int c = 0; c < 4; c++) {
        for (int l = 0; l < 32; l++) {
            int lo = qs[32 * c + l] & 0xF, hi = qs[32 * c + l] >> 4;
            if (qh) {
                lo += ((qh[l] >> (2 * c)) & 1) << 4;
                hi += ((qh[l] >> (2 * c + 1)) & 1) << 4;
            }
            q[64 * c + l] = (int8_t)lo;
            q[64 * c + 32 + l] = (int8_t)hi;
        }
    }
    int sumi = 0, summ = 0;
    for (int j = 0; j < 8; j++) {
        uint8_t sc, m;
        kern_k4_scale_min(j, scales, &sc, &m);
        sumi += sc * s_idot(q + 32 * j, y->qs + 32 * j, 32);
        summ += m * (y->bsums[2 * j] + y->bsums[2 * j + 1]);
    }
    return kern_fp16_to_f32(d16) * y->d * (float)sumi -
           kern_fp16_to_f32(dmin16) * y->d * (float)summ;
}

static float s_dot_q4_K(int64_t nb, const block_q4_K *x, const block_q8_K *y) {
    float sum = 0.0f;
    for (int64_t i = 0; i < nb; i++)
        sum += s_dot_k45(x[i].scales, x[i].qs, NULL, x[i].d, x[i].dmin, &y[i]);
    return sum;
}

static float s_dot_q5_K(int64_t nb, const block_q5_K *x, const block_q8_K *y) {
    float sum = 0.0f;
    for (int64_t i = 0; i < nb; i++)
        sum += s_dot_k45(x[i].scales, x[i].qs, x[i].qh, x[i].d, x[i].dmin, &y[i]);
    return sum;
}

static float s_dot_q6_K(int64_t nb, const block_q6_K *x, const block_q8_K *y) {
    float sum = 0.0f;
    for (int64_t i = 0; i < nb; i++) {
        int8_t q[QK_K];
        for (int half = 0; half < 2; half++) {
            const uint8_t *ql = x[i].ql + 64 * half, *qh = x[i].qh + 32 * half;
            int8_t *p = q + 128 * half;
            for (int l = 0; l < 32; l++) {
                p[l] = (int8_t)(((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32);
                p[l + 32] = (int8_t)(((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32);
                p[l + 64] = (int8_t)(((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32);
                p[l + 96] = (int8_t)(((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32);
            }
        }
        int sumi = 0;
        for (int j = 0; j < 16; j++)
            sumi += x[i].scales[j] * s_idot(q + 16 * j, y[i].qs + 16 * j, 16);
        sum += kern_fp16_to_f32(x[i].d) * y[i].d * (float)sumi;
    }
    return sum;
}

/* ---- float types ---------------------------------------------------------------------------- */

float kern_vec_dot_ref(stp_type wtype, int64_t n, const void *w_row, const void *xq) {
    switch (wtype) {
    case STP_TYPE_Q4_0: return s_dot_q4_0(n / QK4_0, w_row, xq, NULL);
    case STP_TYPE_Q4_1: return s_dot_q4_1(n / QK4_0, w_row, xq);
    case STP_TYPE_Q8_0: return s_dot_q8_0(n / QK8_0, w_row, xq, NULL);
    case STP_TYPE_Q3_K: return s_dot_q3_K(n / QK_K, w_row, xq);
    case STP_TYPE_Q4_K: return s_dot_q4_K(n / QK_K, w_row, xq);
    case STP_TYPE_Q5_K: return s_dot_q5_K(n / QK_K, w_row, xq);
    case STP_TYPE_Q6_K: return s_dot_q6_K(n / QK_K, w_row, xq);
    case STP_TYPE_F16: {
        const stp_fp16 *a = w_row, *b = xq;
        double s = 0.0;
        for (int64_t i = 0; i < n; i++)
            s += (double)(kern_fp16_to_f32(a[i]) * kern_fp16_to_f32(b[i]));
        return (float)s;
    }
    case STP_TYPE_BF16: {
        const stp_bf16 *a = w_row, *b = xq;
        double s = 0.0;
        for (int64_t i = 0; i < n; i++)
            s += (double)(kern_bf16_to_f32(a[i]) * kern_bf16_to_f32(b[i]));
        return (float)s;
    }
    case STP_TYPE_F32: {
        const float *a = w_row, *b = xq;
        double s = 0.0;
        for (int64_t i = 0; i < n; i++)
            s += (double)(a[i] * b[i]);
        return (float)s;
    }
    default: return 0.0f;
    }
}

/* ---- batched forms -------------------------------------------------------------------------- */

void kern_matvec_ref(stp_type wtype, int64_t n, const void *w, size_t row_bytes, const void *xq,
                     float *y, int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++)
        y[r - r0] = kern_vec_dot_ref(wtype, n, (const char *)w + (size_t)r * row_bytes, xq);
}

void kern_matmat_ref(stp_type wtype, int64_t n, const void *w, size_t row_bytes, const void *xq,
                     size_t xq_stride, int64_t n_vec, float *y, size_t y_stride, int64_t r0,
                     int64_t r1) {
    for (int64_t r = r0; r < r1; r++) {
        const char *row = (const char *)w + (size_t)r * row_bytes;
        for (int64_t v = 0; v < n_vec; v++)
            y[(size_t)v * y_stride + (size_t)(r - r0)] =
                kern_vec_dot_ref(wtype, n, row, (const char *)xq + (size_t)v * xq_stride);
    }
}

void kern_axpy_row_ref(stp_type wtype, int64_t n, const void *w_row, float a, float *y) {
    float buf[QK_K];
    const stp_type_info *ti = tensor_type_info(wtype);
    const int64_t step = ti && ti->blck > 1 ? ti->blck : QK_K;
    const size_t bytes = ti ? (size_t)(step / ti->blck) * ti->size : 0;
    const char *p = w_row;
    for (int64_t i = 0; i < n; i += step, p += bytes) {
        int64_t len = n - i < step ? n - i : step;
        kern_dequantize_row_ref(wtype, p, buf, len);
        for (int64_t k = 0; k < len; k++)
            y[i + k] += a * buf[k];
    }
}

void kern_matvec_sparse_ref(stp_type wtype, int64_t n, const void *w, size_t row_bytes,
                            const void *xq, const uint8_t *block_mask, float *y, int64_t r0,
                            int64_t r1) {
    for (int64_t r = r0; r < r1; r++) {
        const char *row = (const char *)w + (size_t)r * row_bytes;
        if (wtype == STP_TYPE_Q4_0)
            y[r - r0] = s_dot_q4_0(n / QK4_0, (const void *)row, xq, block_mask);
        else if (wtype == STP_TYPE_Q8_0)
            y[r - r0] = s_dot_q8_0(n / QK8_0, (const void *)row, xq, block_mask);
        else
            y[r - r0] = kern_vec_dot_ref(wtype, n, row, xq);
    }
}

void kern_matvec_rows_ref(stp_type wtype, int64_t n, const void *w, size_t row_bytes,
                          const void *xq, const int32_t *rows, int64_t n_rows, float *y) {
    for (int64_t i = 0; i < n_rows; i++)
        y[rows[i]] =
            kern_vec_dot_ref(wtype, n, (const uint8_t *)w + (size_t)rows[i] * row_bytes, xq);
}
