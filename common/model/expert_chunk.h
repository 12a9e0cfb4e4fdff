/* expert_chunk: how an expert worker cuts a layer's work into bounded pieces. One header for the
 * two places that must agree on it: the expert worker, which computes a layer's slots
 * EXPERT_CHUNK_SLOTS at a time and packs at most EXPERT_CHUNK_PACKS q4_0x16 images of up and
 * down per wave in a prefill (expert-worker/expert.c), and the pipeline's budget plan, which
 * reserves the scratch those sizes imply (common/plan/budget.c). Changing a constant here
 * changes both; nothing else restates them. */
#ifndef STP_EXPERT_CHUNK_H
#define STP_EXPERT_CHUNK_H

/* Slots (token, expert pairs) computed at a time: bounds the per-chunk scratch. */
#define EXPERT_CHUNK_SLOTS 256
/* Packed experts in scratch: the packing groups of a chunk run in waves of this many. */
#define EXPERT_CHUNK_PACKS 8

#endif
