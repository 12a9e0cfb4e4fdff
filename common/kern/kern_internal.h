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

/* Per-level tables (kern_ops.c picks one). The SIMD ones exist only on x86-64 builds. */
extern const kern_ops kern_ops_ref_table;
extern const kern_ops kern_ops_avx2_table;
extern const kern_ops kern_ops_avx512_table;

/* The avx2 entry points, reused by the avx512 table for the types it does not specialise. */
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
