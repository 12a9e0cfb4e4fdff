/* q4_0x16_ref: the row-interleaved Q4_0 layout ("q4_0x16"): size, packing from GGUF rows, and
 * the reference matvec/matmat on it.
 *
 * The layout (kern.h, README.md) only moves bytes: 16 rows' blocks side by side so a SIMD
 * kernel reads one contiguous stream with aligned loads instead of 16 row pointers. The
 * arithmetic is the Q4_0 reference's (dot_ref.c, ggml's q4_0_8x8 order): per row, per block in
 * order, acc = fmaf((float)isum_b, dw_b * dx_b, acc), so results equal kern_matvec_ref on the
 * unpacked matrix bit for bit. */
#include <math.h>
#include <string.h>

#include "kern/kern_internal.h"

size_t kern_q4_0x16_size(int64_t n_rows, int64_t n_cols) {
    if (n_rows <= 0 || n_cols <= 0 || n_rows % 16 != 0 || n_cols % QK4_0 != 0) return 0;
    return (size_t)n_rows * (size_t)(n_cols / QK4_0) * sizeof(block_q4_0);
}

void kern_q4_0x16_pack(const void *w, size_t row_bytes, int64_t n_rows, int64_t n_cols, void *dst) {
    const int64_t nb = n_cols / QK4_0, ng = n_rows / 16;
    const size_t gstride = (size_t)nb * 16 * sizeof(block_q4_0);
    for (int64_t g = 0; g < ng; g++) {
        uint8_t *G = (uint8_t *)dst + (size_t)g * gstride;
        for (int64_t b = 0; b < nb; b++) {
            uint8_t *q = G + kern_q4x16_qoff(b), *s = G + kern_q4x16_soff(nb, b);
            for (int i = 0; i < 16; i++) {
                const uint8_t *blk = (const uint8_t *)w + (size_t)(16 * g + i) * row_bytes +
                                     (size_t)b * sizeof(block_q4_0);
                memcpy(s + 2 * i, blk, 2);
                for (int k = 0; k < 4; k++)
                    memcpy(q + 64 * k + 4 * i, blk + 2 + 4 * k, 4);
            }
        }
    }
}

/* Row i of group G (of nb blocks) times activation x. */
static float s_row(const uint8_t *G, int64_t nb, int i, const block_q8_0 *x) {
    float acc = 0.0f;
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *q = G + kern_q4x16_qoff(b);
        int isum = 0;
        for (int k = 0; k < 4; k++)
            for (int j = 0; j < 4; j++) {
                const uint8_t v = q[64 * k + 4 * i + j];
                isum +=
                    ((v & 0xF) - 8) * x[b].qs[4 * k + j] + ((v >> 4) - 8) * x[b].qs[16 + 4 * k + j];
            }
        const float dw = kern_fp16_to_f32(kern_ld16(G + kern_q4x16_soff(nb, b) + 2 * i));
        acc = fmaf((float)isum, dw * kern_fp16_to_f32(x[b].d), acc);
    }
    return acc;
}

void kern_matvec_q4_0x16_ref(int64_t n_cols, const void *wp, const void *xq, float *y, int64_t g0,
                             int64_t g1) {
    kern_matmat_q4_0x16_ref(n_cols, wp, xq, 0, 1, y, 0, g0, g1);
}

void kern_matmat_q4_0x16_ref(int64_t n_cols, const void *wp, const void *xq, size_t xq_stride,
                             int64_t n_vec, float *y, size_t y_stride, int64_t g0, int64_t g1) {
    const int64_t nb = n_cols / QK4_0;
    const size_t gstride = (size_t)nb * 16 * sizeof(block_q4_0);
    for (int64_t g = g0; g < g1; g++) {
        const uint8_t *G = (const uint8_t *)wp + (size_t)g * gstride;
        for (int64_t v = 0; v < n_vec; v++)
            for (int i = 0; i < 16; i++)
                y[(size_t)v * y_stride + (size_t)(16 * (g - g0) + i)] =
                    s_row(G, nb, i, (const block_q8_0 *)((const char *)xq + (size_t)v * xq_stride));
    }
}
