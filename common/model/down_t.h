/* down_t: the expert `down` matrices re-laid out so one neuron's weights are contiguous, and the
 * ReGLU-sparse product over that layout.
 *
 * A Q4_0 `down` matrix (n_embd rows of n_ff) stores, per output row r and group g of 32 neurons,
 * one fp16 scale d[r][g] and 32 nibbles. down_t keeps exactly those values, regrouped per group:
 *   [ d[0..n_embd)[g] as fp16 ][ neuron 0 of g: n_embd nibbles ] ... [ neuron 31 of g ]
 * (the scales' own fp16 bits: a 4b expert's image is as large as the GGUF matrix, 663 KB;
 * widened to float32 it was 737 KB, 11% more to read from disk and keep in the pool)
 * with a neuron's nibbles packed as (row k: low nibble, row k + n_embd/2: high nibble).
 * The product y = W · a (a quantized to Q8_0 blocks of 32 = one group) is, per row r,
 *   acc_r = fma((float) sum_{j in g} (q[r][j] - 8) * qa[j],  d[r][g] * d_a[g],  acc_r)
 * over groups g in order: the same integer sums and the same fused float steps as ggml's
 * repacked Q4_0 kernels, so skipping every neuron whose activation is 0 changes no bit.
 * Only Q4_0 `down` is re-laid out; other types use the dense path. */
#ifndef STP_DOWN_T_H
#define STP_DOWN_T_H

#include <stddef.h>
#include <stdint.h>

#include "kern/kern.h"
#include "model/model.h"

#define DOWN_T_MAX_EMBD 8192
#define DOWN_T_MAX_FF 8192

/* Bytes of one expert's down_t image (0 if the type or shape is not supported). */
size_t down_t_expert_bytes(stp_type type, int n_embd, int n_ff);
/* Re-lays out expert `e` of a `down_exps` stack into dst (down_t_expert_bytes). */
void down_t_build_expert(const tensor_view *down, int64_t e, uint8_t *dst);
/* Per-neuron footprint inside a group image: the nibbles of neuron j of group g. */
static inline size_t down_t_group_bytes(int n_embd) {
    return (size_t)n_embd * 2 + 32 * (size_t)n_embd / 2;
}

/* Rows r0..r1 (multiples of 16) of the dense matrix in the q4_0x16 layout (kern.h): group
 * r0/16 at dst, as kern_q4_0x16_pack would write them from the GGUF rows (same bytes). */
void down_t_pack_x16(const uint8_t *img, int n_embd, int n_ff, int64_t r0, int64_t r1,
                     uint8_t *dst);

/* y[r0..r1) = W · a for rows r0..r1-1 (r1 <= n_embd/2 counts row pairs k and k + n_embd/2:
 * pass a range of k in [0, n_embd/2); rows k and k + n_embd/2 are produced together).
 * a: n_ff/32 Q8_0 blocks. Neurons with a zero quant and groups with no nonzero quant are
 * skipped. Returns the number of neurons computed. */
int64_t down_t_matvec(const uint8_t *img, int n_embd, int n_ff, const block_q8_0 *a, float *y,
                      int k0, int k1);
/* The two implementations down_t_matvec chooses between by kernel level (same bits): avx2 for
 * any range, avx512vnni (vpdpbusd over four neurons at a time) for whole 64-row blocks, the
 * rest of the range through the avx2 one. Only for tests and benchmarks to call directly. */
int64_t down_t_matvec_avx2(const uint8_t *img, int n_embd, int n_ff, const block_q8_0 *a, float *y,
                           int k0, int k1);
int64_t down_t_matvec_avx512(const uint8_t *img, int n_embd, int n_ff, const block_q8_0 *a,
                             float *y, int k0, int k1);

#endif
