/* down_t: the expert `down` matrices re-laid out so one neuron's weights are contiguous (the
 * format and its float order are kern.h's "down_t" section; the product is kern_ops'
 * down_t_matvec, dispatched like every kernel).
 *
 * A Q4_0 `down` matrix (n_embd rows of n_ff) stores, per output row r and group g of 32 neurons,
 * one fp16 scale d[r][g] and 32 nibbles. down_t keeps exactly those values, regrouped per group:
 *   [ d[0..n_embd)[g] as fp16 ][ neuron 0 of g: n_embd nibbles ] ... [ neuron 31 of g ]
 * (the scales' own fp16 bits: an image is as large as the GGUF matrix) with a neuron's nibbles
 * packed as (row k: low nibble, row k + n_embd/2: high nibble). The sparse product keeps the
 * Q4_0 kernels' integer block sums and fused float steps, so skipping every neuron whose
 * activation is 0 changes no bit. Only Q4_0 `down` is re-laid out; other types use the dense
 * path. This file builds images and packs them back into q4_0x16 for batched prefill. */
#ifndef STP_DOWN_T_H
#define STP_DOWN_T_H

#include <stddef.h>
#include <stdint.h>

#include "kern/kern.h"
#include "model/model.h"

/* Bytes of one expert's down_t image (0 if the type or shape is not supported). */
size_t down_t_expert_bytes(stp_type type, int n_embd, int n_ff);
/* Re-lays out expert `e` of a `down_exps` stack into dst (down_t_expert_bytes). */
void down_t_build_expert(const tensor_view *down, int64_t e, uint8_t *dst);

/* Rows r0..r1 (multiples of 16) of the dense matrix in the q4_0x16 layout (kern.h): group
 * r0/16 at dst, as kern_q4_0x16_pack would write them from the GGUF rows (same bytes). */
void down_t_pack_x16(const uint8_t *img, int n_embd, int n_ff, int64_t r0, int64_t r1,
                     uint8_t *dst);

#endif
