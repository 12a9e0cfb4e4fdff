/* kern_internal: helpers shared by the reference and SIMD kernel files of common/kern.
 *
 * Not part of the public API. Holds the K-quant scale unpacking (the one place that knows the
 * 6-bit packing of Q4_K/Q5_K and Q3_K scales), unaligned-safe scalar loads, and the per-level
 * kern_ops tables that kern_ops.c chooses between. See README.md. */
#ifndef STP_KERN_INTERNAL_H
#define STP_KERN_INTERNAL_H

#include <stdint.h>
#include <string.h>

#include "kern/kern.h"

/* Q4_K/Q5_K: 6-bit scale and min of sub-block j (0..7) from the 12 packed bytes.
 * Sub-blocks 0-3 keep their low 6 bits in bytes 0-3 (scale) and 4-7 (min); sub-blocks 4-7 keep
 * their low 4 bits in the nibbles of bytes 8-11 and their top 2 bits in bits 6-7 of bytes 0-7. */
static inline void kern_k4_scale_min(int j, const uint8_t *q, uint8_t *sc, uint8_t *m) {
    if (j < 4) {
        *sc = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *sc = (uint8_t)((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4));
        *m = (uint8_t)((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
    }
}

/* Q3_K: the 16 signed sub-block scales (6-bit value minus 32). Low 4 bits: nibble of byte j%8
 * (low nibble for j < 8); top 2 bits: bits 2*(j/4) of byte 8 + j%4. */
static inline void kern_q3k_scales(const uint8_t *q, int8_t out[16]) {
    for (int j = 0; j < 16; j++) {
        int lo = j < 8 ? (q[j] & 0xF) : (q[j - 8] >> 4);
        int hi = (q[8 + (j & 3)] >> (2 * (j / 4))) & 3;
        out[j] = (int8_t)((lo | (hi << 4)) - 32);
    }
}

static inline uint16_t kern_ld16(const void *p) {
    uint16_t v;
    memcpy(&v, p, 2);
    return v;
}

/* q4_0x16 layout (kern.h): byte offsets, from a row group's start, of block b's 256 quant
 * bytes and 16 fp16 scales, for a matrix of nb blocks per row. */
#define KERN_Q4X16_PAIR 576 /* two blocks: 2 x 256 quant bytes, 2 x 32 scale bytes */
static inline size_t kern_q4x16_qoff(int64_t b) {
    return (size_t)(b >> 1) * KERN_Q4X16_PAIR + (size_t)(b & 1) * 256;
}
static inline size_t kern_q4x16_soff(int64_t nb, int64_t b) {
    const size_t base = (size_t)(b >> 1) * KERN_Q4X16_PAIR;
    return (b | 1) < nb ? base + 512 + (size_t)(b & 1) * 32 : base + 256;
}

/* Per-block activation terms the q4_0x16 kernels share across row groups: corr[i] = -8 * sum of
 * block b0+i's 32 quants (the Q4_0 offset folded into the integer sum), dx[i] = its scale. */
static inline void kern_q4x16_xprep(const void *xq, int64_t b0, int64_t n, int32_t *corr,
                                    float *dx) {
    const block_q8_0 *x = (const block_q8_0 *)xq + b0;
    for (int64_t i = 0; i < n; i++) {
        int s = 0;
        for (int j = 0; j < QK8_0; j++)
            s += x[i].qs[j];
        corr[i] = -8 * s;
        dx[i] = kern_fp16_to_f32(x[i].d);
    }
}

/* The q4_0x16 matmat driver shared by the SIMD levels: vectors in chunks of KERN_X16_VC,
 * blocks in chunks whose activation terms fit KERN_X16_CAP entries (stack arrays, no malloc);
 * per chunk, every group runs grp[nv-1] for batches of up to 4 vectors. A group's accumulators
 * go through y between block chunks (an exact float store/load, so the fma chain is unchanged).
 * A group's weights are thus read from memory once per KERN_X16_VC vectors. */
#define KERN_X16_CAP 4096
#define KERN_X16_VC 32
typedef struct kern_x16_job {
    const uint8_t *G; /* row group start */
    int64_t nb, c0;   /* blocks per row; first block of the chunk (even) */
    const int32_t *corr;
    const float *dx; /* vector v, block b: corr[v * stride + (b - c0)], dx[...] */
    int64_t stride;
    const block_q8_0 *x[4];
    float *y[4]; /* 16 outputs each; accumulators start from them unless c0 == 0 */
} kern_x16_job;

static inline void kern_q4x16_drive(int64_t n_cols, const void *wp, const void *xq,
                                    size_t xq_stride, int64_t n_vec, float *y, size_t y_stride,
                                    int64_t g0, int64_t g1,
                                    void (*const grp[4])(const kern_x16_job *, int64_t c1)) {
    const int64_t nb = n_cols / QK4_0;
    const size_t gstride = (size_t)nb * 16 * sizeof(block_q4_0);
    int32_t corr[KERN_X16_CAP];
    float dx[KERN_X16_CAP];
    for (int64_t v0 = 0; v0 < n_vec; v0 += KERN_X16_VC) {
        const int64_t vc = n_vec - v0 < KERN_X16_VC ? n_vec - v0 : KERN_X16_VC;
        const int64_t bc = (KERN_X16_CAP / vc) & ~(int64_t)1;
        for (int64_t c0 = 0; c0 < nb; c0 += bc) {
            const int64_t c1 = nb - c0 < bc ? nb : c0 + bc;
            for (int64_t v = 0; v < vc; v++)
                kern_q4x16_xprep((const char *)xq + (size_t)(v0 + v) * xq_stride, c0, c1 - c0,
                                 corr + v * bc, dx + v * bc);
            for (int64_t g = g0; g < g1; g++) {
                for (int64_t vb = 0; vb < vc; vb += 4) {
                    const int nv = vc - vb < 4 ? (int)(vc - vb) : 4;
                    kern_x16_job j = {.G = (const uint8_t *)wp + (size_t)g * gstride,
                                      .nb = nb,
                                      .c0 = c0,
                                      .corr = corr + vb * bc,
                                      .dx = dx + vb * bc,
                                      .stride = bc};
                    for (int v = 0; v < nv; v++) {
                        const int64_t vv = v0 + vb + v;
                        j.x[v] = (const block_q8_0 *)((const char *)xq + (size_t)vv * xq_stride);
                        j.y[v] = y + (size_t)vv * y_stride + (size_t)(16 * (g - g0));
                    }
                    grp[nv - 1](&j, c1);
                }
            }
        }
    }
}

/* Per-level tables (kern_ops.c picks one). The SIMD ones exist only on x86-64 builds. */
extern const kern_ops kern_ops_ref_table;
extern const kern_ops kern_ops_avx2_table;
extern const kern_ops kern_ops_avx512_table;
int64_t kern_down_t_matvec_avx512(const uint8_t *img, int n_embd, int n_ff, const block_q8_0 *a,
                                  float *y, int k0, int k1);

/* The avx2 entry points, reused by the avx512 table for the types it does not specialise. */
int64_t kern_down_t_matvec_avx2(const uint8_t *img, int n_embd, int n_ff, const block_q8_0 *a,
                                float *y, int k0, int k1);
void kern_avx2_quantize_act(stp_type wtype, const float *x, void *xq, int64_t n);
float kern_avx2_vec_dot(stp_type wtype, int64_t n, const void *w_row, const void *xq);
void kern_avx2_matvec_rows(stp_type wtype, int64_t n, const void *w, size_t row_bytes,
                           const void *xq, const int32_t *rows, int64_t n_rows, float *y);
void kern_avx2_matvec(stp_type wtype, int64_t n, const void *w, size_t row_bytes, const void *xq,
                      float *y, int64_t r0, int64_t r1);
void kern_avx2_matmat(stp_type wtype, int64_t n, const void *w, size_t row_bytes, const void *xq,
                      size_t xq_stride, int64_t n_vec, float *y, size_t y_stride, int64_t r0,
                      int64_t r1);
void kern_avx2_axpy_row(stp_type wtype, int64_t n, const void *w_row, float a, float *y);
void kern_avx2_matvec_sparse(stp_type wtype, int64_t n, const void *w, size_t row_bytes,
                             const void *xq, const uint8_t *block_mask, float *y, int64_t r0,
                             int64_t r1);

#endif
