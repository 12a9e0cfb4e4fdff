/* kern_pack: the packed form of a Q8_0 activation chunk that the SIMD Q4_0/Q8_0 kernels read.
 *
 * quantize_act produces ggml's Q8_0 blocks (34 bytes: fp16 d + 32 int8). A matvec reads that
 * vector once per row, so the SIMD files first copy up to KERN_PACK_N elements into this form:
 * contiguous int8 quants (one aligned load per 32/64 of them), float scales, and the negated
 * sum of each group of 4 quants (one int32 lane of vpdpbusd / vpmaddwd) for folding the Q4_0
 * "-8" and the Q8_0 "+128" offsets into the integer accumulator. Header-only so each SIMD file
 * compiles it with its own ISA flags. */
#ifndef STP_KERN_PACK_H
#define STP_KERN_PACK_H

#include "kern/kern_internal.h"

#define KERN_PACK_N 4096 /* elements per packed chunk (128 blocks) */

typedef struct kern_q8_pack {
    _Alignas(64) int8_t xs[KERN_PACK_N];
    _Alignas(64) int32_t nlsum[KERN_PACK_N / 4]; /* -(xs[4k] + ... + xs[4k+3]) */
    _Alignas(64) float dx[KERN_PACK_N / QK8_0];
    int64_t nb; /* blocks in this chunk */
} kern_q8_pack;

/* Pack blocks [b0, b0 + nb) of a Q8_0 vector (nb <= KERN_PACK_N / 32). */
static inline void kern_q8_pack_fill(kern_q8_pack *p, const block_q8_0 *xq, int64_t b0,
                                     int64_t nb) {
    p->nb = nb;
    for (int64_t b = 0; b < nb; b++) {
        const block_q8_0 *blk = &xq[b0 + b];
        p->dx[b] = kern_fp16_to_f32(blk->d);
        memcpy(p->xs + 32 * b, blk->qs, 32);
        for (int k = 0; k < 8; k++) {
            const int8_t *q = blk->qs + 4 * k;
            p->nlsum[8 * b + k] = -(q[0] + q[1] + q[2] + q[3]);
        }
    }
}

#endif
