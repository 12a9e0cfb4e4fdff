/* kern: dequantization, activation quantization and dot products for every supported type.
 *
 * The engine computes y = W·x the way ggml's CPU backend does, so quantized files match
 * llama.cpp: x is first rounded to the activation format the weight type consumes
 * (kern_act_type: Q8_0 for Q4_0/Q8_0, Q8_1 for Q4_1, Q8_K for K-quants, F16 for F16, BF16 for
 * BF16, F32 for F32), then each row is an integer (or float) dot product with that.
 * Every operation has a plain-C reference (*_ref.c); SIMD variants (*_avx2.c, *_avx512.c) are
 * chosen at runtime by kern_ops_get() and tested against the reference. See README.md. */
#ifndef STP_KERN_H
#define STP_KERN_H

#include <stddef.h>
#include <stdint.h>

#include "gguf/tensor_type.h"

/* ---- block layouts (identical to ggml's, byte for byte) ---------------------------------- */
#define QK4_0 32
#define QK8_0 32
#define QK_K 256
#define K_SCALE_SIZE 12

typedef uint16_t stp_fp16;
typedef uint16_t stp_bf16;

typedef struct {
    stp_fp16 d;
    uint8_t qs[QK4_0 / 2];
} block_q4_0; /* 18 bytes */
typedef struct {
    stp_fp16 d, m;
    uint8_t qs[QK4_0 / 2];
} block_q4_1; /* 20 bytes */
typedef struct {
    stp_fp16 d;
    int8_t qs[QK8_0];
} block_q8_0; /* 34 bytes */
typedef struct {
    stp_fp16 d, s;
    int8_t qs[QK8_0];
} block_q8_1; /* 36 bytes */
typedef struct {
    uint8_t hmask[QK_K / 8];
    uint8_t qs[QK_K / 4];
    uint8_t scales[12];
    stp_fp16 d;
} block_q3_K; /* 110 bytes */
typedef struct {
    stp_fp16 d, dmin;
    uint8_t scales[K_SCALE_SIZE];
    uint8_t qs[QK_K / 2];
} block_q4_K; /* 144 bytes */
typedef struct {
    stp_fp16 d, dmin;
    uint8_t scales[K_SCALE_SIZE];
    uint8_t qh[QK_K / 8];
    uint8_t qs[QK_K / 2];
} block_q5_K; /* 176 bytes */
typedef struct {
    uint8_t ql[QK_K / 2];
    uint8_t qh[QK_K / 4];
    int8_t scales[QK_K / 16];
    stp_fp16 d;
} block_q6_K; /* 210 bytes */
typedef struct {
    float d;
    int8_t qs[QK_K];
    int16_t bsums[QK_K / 16];
} block_q8_K; /* 292 */

/* ---- scalar conversions ------------------------------------------------------------------ */
float kern_fp16_to_f32(stp_fp16 h);
stp_fp16 kern_f32_to_fp16(float f); /* round to nearest even, as F16C/ggml */
float kern_bf16_to_f32(stp_bf16 h);
stp_bf16 kern_f32_to_bf16(float f); /* round to nearest even, NaN kept quiet, as ggml */

/* ---- reference operations (always available) --------------------------------------------- */

/* The activation type a weight type's dot product consumes (ggml's vec_dot_type). */
stp_type kern_act_type(stp_type wtype);
/* Bytes needed to hold n activations quantized for weight type wtype. */
size_t kern_act_size(stp_type wtype, int64_t n);
/* Quantize n floats into the activation format for wtype (n a multiple of the block size). */
void kern_quantize_act_ref(stp_type wtype, const float *x, void *xq, int64_t n);
/* One row: sum_i W[i] * x[i], W in wtype, x already quantized by kern_quantize_act. */
float kern_vec_dot_ref(stp_type wtype, int64_t n, const void *w_row, const void *xq);
/* Dequantize n elements of a row of type t. */
void kern_dequantize_row_ref(stp_type t, const void *src, float *dst, int64_t n);
/* Quantize weights (for the model generator and tests): F32, F16, BF16, Q8_0, Q4_0, Q4_1.
 * Returns 0, or STP_EUNSUPPORTED for other types. Same rounding as ggml's reference quantizers. */
int kern_quantize_row_ref(stp_type t, const float *src, void *dst, int64_t n);
/* Reference versions of the batched entries of kern_ops (same contracts as there). */
void kern_matvec_ref(stp_type wtype, int64_t n, const void *w, size_t row_bytes, const void *xq,
                     float *y, int64_t r0, int64_t r1);
void kern_matmat_ref(stp_type wtype, int64_t n, const void *w, size_t row_bytes, const void *xq,
                     size_t xq_stride, int64_t n_vec, float *y, size_t y_stride, int64_t r0,
                     int64_t r1);
void kern_axpy_row_ref(stp_type wtype, int64_t n, const void *w_row, float a, float *y);
void kern_matvec_rows_ref(stp_type wtype, int64_t n, const void *w, size_t row_bytes,
                          const void *xq, const int32_t *rows, int64_t n_rows, float *y);
void kern_matvec_sparse_ref(stp_type wtype, int64_t n, const void *w, size_t row_bytes,
                            const void *xq, const uint8_t *block_mask, float *y, int64_t r0,
                            int64_t r1);
/* Q4_0 · Q8_0 in the order ggml uses for Q4_0 matrices it does NOT repack (row count not a
 * multiple of 8: ggml_vec_dot_q4_0_q8_0 / tinyBLAS, 8 lanes like Q8_0). kern_ops' Q4_0 entries
 * use the repacked (q4_0_8x8) order, which is what every row count divisible by 8 gets. */
float kern_vec_dot_q4_0_lane8_ref(int64_t n, const void *w_row, const void *xq);

/* ---- row-interleaved Q4_0 ("q4_0x16", see README.md) -------------------------------------- *
 * The same bytes as a GGUF Q4_0 matrix, re-arranged so one contiguous stream feeds 16 rows:
 * rows in groups of 16; per group, blocks in pairs (b, b+1) of 576 bytes =
 * [quants b: 256][quants b+1: 256][fp16 scales b: 16 x 2][fp16 scales b+1: 16 x 2]; an odd last
 * block is [quants: 256][scales: 32]. Quants of one block: byte 64*k + 4*i + j = row i's
 * qs[4*k + j] (k < 4, i < 16, j < 4). Group stride n_blocks * 288 bytes; total size equals the
 * GGUF size. Keep the buffer 64-byte aligned (every pair then starts on a cache line). */
/* Bytes of the packed matrix, or 0 unless n_rows % 16 == 0 and n_cols % 32 == 0 (both > 0). */
size_t kern_q4_0x16_size(int64_t n_rows, int64_t n_cols);
/* Pack a GGUF Q4_0 matrix (rows row_bytes apart) into dst (kern_q4_0x16_size bytes). The
 * shape must be valid for kern_q4_0x16_size. */
void kern_q4_0x16_pack(const void *w, size_t row_bytes, int64_t n_rows, int64_t n_cols, void *dst);
/* Reference versions of kern_ops' matvec_q4_0x16 / matmat_q4_0x16 (same contracts). */
void kern_matvec_q4_0x16_ref(int64_t n_cols, const void *wp, const void *xq, float *y, int64_t g0,
                             int64_t g1);
void kern_matmat_q4_0x16_ref(int64_t n_cols, const void *wp, const void *xq, size_t xq_stride,
                             int64_t n_vec, float *y, size_t y_stride, int64_t g0, int64_t g1);

/* ---- neuron-major Q4_0 `down` ("down_t"; built by common/model/down_t.h) ------------------ *
 * The same values as a Q4_0 matrix of n_embd rows by n_ff columns, regrouped per group g of 32
 * columns (neurons): [ the n_embd rows' fp16 scales of g ][ neuron 0: n_embd/2 bytes ] ...
 * [ neuron 31 ], a neuron's byte k holding row k's nibble (low) and row k + n_embd/2's (high).
 * The product y = W·a (a: n_ff/32 Q8_0 blocks) is, per row r and group g in order,
 *   acc_r = fmaf((float) sum_j (q[r][j] - 8) * qa[j], d[r][g] * d_a[g], acc_r),
 * the integer sums and fused steps of the Q4_0 matvec: skipping neurons with qa == 0 and groups
 * with no active neuron changes no bit. */
#define KERN_DOWN_T_MAX_EMBD 8192
#define KERN_DOWN_T_MAX_FF 8192
/* Bytes of one group (32 neurons) of an image. */
static inline size_t kern_down_t_group_bytes(int n_embd) {
    return (size_t)n_embd * 2 + 32 * (size_t)n_embd / 2;
}
/* Reference version of kern_ops' down_t_matvec (same contract). */
int64_t kern_down_t_matvec_ref(const uint8_t *img, int n_embd, int n_ff, const block_q8_0 *a,
                               float *y, int k0, int k1);

/* ---- dispatched operations ------------------------------------------------------------------ */

/* Function table filled once per process with the best variant this CPU supports. */
typedef struct kern_ops {
    const char *level; /* "avx512vnni", "avx2", "ref" */
    void (*quantize_act)(stp_type wtype, const float *x, void *xq, int64_t n);
    float (*vec_dot)(stp_type wtype, int64_t n, const void *w_row, const void *xq);
    /* y[r - r0] = W[r]·x for rows r0..r1-1 of W (row_bytes apart); xq from quantize_act. */
    void (*matvec)(stp_type wtype, int64_t n, const void *w, size_t row_bytes, const void *xq,
                   float *y, int64_t r0, int64_t r1);
    void (*dequantize_row)(stp_type t, const void *src, float *dst, int64_t n);
    /* Batched matvec for prefill: y[v*y_stride + (r - r0)] = W[r]·xq_v for v < n_vec, where
     * xq_v = (const char *)xq + v*xq_stride (each from quantize_act). Each weight row is read
     * once for all n_vec vectors. */
    void (*matmat)(stp_type wtype, int64_t n, const void *w, size_t row_bytes, const void *xq,
                   size_t xq_stride, int64_t n_vec, float *y, size_t y_stride, int64_t r0,
                   int64_t r1);
    /* y[i] += a * W_row[i] for i < n (dequantized on the fly; for transposed down matrices). */
    void (*axpy_row)(stp_type wtype, int64_t n, const void *w_row, float a, float *y);
    /* matvec over the 32-blocks b of x with block_mask[b] != 0 only (n / 32 mask bytes): for a
     * mostly-zero activation (ReGLU down projection). Skipped blocks must be all-zero in xq for
     * the result to equal matvec; then it is bit-identical to matvec (Q4_0, Q8_0: omitting a
     * zero block omits an exact +0 from the float accumulation). Other types ignore the mask. */
    void (*matvec_sparse)(stp_type wtype, int64_t n, const void *w, size_t row_bytes,
                          const void *xq, const uint8_t *block_mask, float *y, int64_t r0,
                          int64_t r1);
    /* y[rows[i]] = W[rows[i]]·x for i < n_rows (a row subset, e.g. the active neurons of
     * `up`); same bits as matvec for those rows. */
    void (*matvec_rows)(stp_type wtype, int64_t n, const void *w, size_t row_bytes, const void *xq,
                        const int32_t *rows, int64_t n_rows, float *y);
    /* Q4_0 weights in the row-interleaved "q4_0x16" layout (kern_q4_0x16_pack; n_cols a
     * multiple of 32): y[16*(g - g0) + i] = row 16*g + i of W times x, for row groups g0..g1-1.
     * Bit-identical to matvec(STP_TYPE_Q4_0, ...) on the unpacked rows. */
    void (*matvec_q4_0x16)(int64_t n_cols, const void *wp, const void *xq, float *y, int64_t g0,
                           int64_t g1);
    /* Batched form: y[v*y_stride + (r - 16*g0)] = W[r]·xq_v for v < n_vec, rows of groups
     * g0..g1-1, xq_v = (const char *)xq + v*xq_stride. A group's weights are read from memory
     * once for up to 32 vectors. Bit-identical to matmat(STP_TYPE_Q4_0, ...). */
    void (*matmat_q4_0x16)(int64_t n_cols, const void *wp, const void *xq, size_t xq_stride,
                           int64_t n_vec, float *y, size_t y_stride, int64_t g0, int64_t g1);
    /* The down_t product (see above) for row pairs k and k + n_embd/2, k in [k0, k1) (k1 <=
     * n_embd/2; rows k0.. and k0 + n_embd/2.. of y are written); returns the neurons computed
     * (active neurons of the active groups). Bit-identical at every level. */
    int64_t (*down_t_matvec)(const uint8_t *img, int n_embd, int n_ff, const block_q8_0 *a,
                             float *y, int k0, int k1);
    /* kern_q4_0x16_pack (the same bytes): a prefill packs matrices on the fly, so it is hot. */
    void (*pack_q4_0x16)(const void *w, size_t row_bytes, int64_t n_rows, int64_t n_cols,
                         void *dst);
} kern_ops;

/* The process-wide table (selected on first call; STP_KERNELS=ref|avx2|avx512 forces a level). */
const kern_ops *kern_ops_get(void);
/* Tables for each level this CPU supports, for tests: fills up to cap, returns the count. */
int kern_ops_all(const kern_ops **out, int cap);

#endif
