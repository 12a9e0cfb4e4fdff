/* expert_ffn: the routed ReGLU expert FFN over a list of slots, the one computation that the
 * in-process moe_forward and the expert worker both run:
 *   y[y_row[s]] = down_e · (relu(gate_e · h[tok[s]]) * (up_e · h[tok[s]]))  for every slot s,
 * over weight pointers (the mapped GGUF's tensors, a pool slot's images). Where the weights come
 * from, how slots are grouped and where the outputs go is the caller's; the kernels, the chunks
 * and the packing waves are this file's, so both carriers give the same bits by construction.
 * Leaves out the weighted sum over k (moe_forward's; the attention worker's in the pipeline).
 * Invariants in README.md ("One expert FFN"). */
#ifndef STP_EXPERT_FFN_H
#define STP_EXPERT_FFN_H

#include "model/ops.h"

/* Slots computed at a time: bounds the scratch whatever the micro-batch (the pipeline's budget
 * plan, common/plan/budget.c, counts the scratch these two sizes imply; nothing restates them). */
#define EXPERT_FFN_CHUNK 256
/* q4_0x16 images packed at a time in a prefill: the packing runs of a chunk go in waves of
 * this many. */
#define EXPERT_FFN_PACKS 8

/* One expert's matrices of a layer, wherever they are. Types and row sizes are the layer's
 * (layer_weights: the same for every expert). */
typedef struct expert_ffn_weights {
    const uint8_t *gate;     /* (n_ff rows of n_embd) GGUF rows, or the image when gate_x16 */
    const uint8_t *gate_x16; /* optional q4_0x16 image of gate (same bits, faster) */
    const uint8_t *up;       /* (n_ff rows of n_embd) GGUF rows */
    const uint8_t *down;     /* (n_embd rows of n_ff) GGUF rows; may be NULL when down_t is set */
    const uint8_t *down_t;   /* optional neuron-major image of down (down_t.h): single-slot
                              * products use it; batched ones pack the rows when given */
} expert_ffn_weights;

/* Slots s0..s0+n-1 all belong to the expert whose matrices are w. */
typedef struct expert_ffn_group {
    expert_ffn_weights w;
    int s0, n;
} expert_ffn_group;

typedef struct expert_ffn_stats {
    uint64_t active; /* neurons with relu(gate) > 0, summed over the slots */
    uint64_t down;   /* neurons the down products computed (idle ones skipped by down_t) */
} expert_ffn_stats;

typedef struct expert_ffn expert_ffn;

/* Scratch for one chunk of EXPERT_FFN_CHUNK slots of cfg's shape, and EXPERT_FFN_PACKS packed
 * `up` and `down` images (their pages are touched only by a prefill that packs). */
int expert_ffn_new(expert_ffn **out, const model_config *cfg, stp_err *err);
void expert_ffn_destroy(expert_ffn **self_p);
size_t expert_ffn_bytes(const expert_ffn *f);

/* Computes every slot of groups[0..ng) (layer L gives the types and row sizes): h holds the
 * n_embd inputs of token t at h + t * n_embd, slot s reads token tok[s] and writes its n_embd
 * outputs at y + y_row[s] * n_embd. A group is computed in runs of at most EXPERT_FFN_CHUNK
 * slots and runs are never split between chunks (a split would read the expert twice); within
 * a chunk, gate is one parallel section, up and down are waves of at most EXPERT_FFN_PACKS
 * packing runs, and the single-slot down_t products one more section; a chunk of short runs
 * (decode) with at least a run per thread is instead one section of per-run tasks (README.md,
 * invariant 10). Adds to st if given. */
void expert_ffn_run(expert_ffn *f, const compute_ctx *cc, const layer_weights *L,
                    const expert_ffn_group *groups, int ng, const float *h, const int32_t *tok,
                    float *y, const int32_t *y_row, expert_ffn_stats *st);

#endif
