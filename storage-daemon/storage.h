/* storage: the storage daemon's logic. It owns the expert weights: they live in the expert
 * layout file (common/layout), built once next to the model, and are streamed into the weight
 * pool (common/shm) under a memory budget. It answers each router decision with the residency
 * (offset, generation, ready) of the experts the layer needs, after reading the missing ones
 * (io_uring + O_DIRECT, common/io) while the attention worker computes attention.
 *
 * Without a budget (or one large enough) every expert is read once at start and stays resident.
 * With one, the pool holds `frames` expert slots, at least one whole layer (a prefill may route
 * to every expert of a layer). The daemon picks which READY slots may go (mechanism); a cache
 * policy (common/cache: lfu, the default, with half-life CACHE_POLICY_HALF_LIFE tokens, or
 * lru) picks the victim among them (policy).
 * A slot is reused only for an expert the current decision does not need (the previous layer's
 * work is finished when the next decision arrives: the attention worker is sequential) and
 * never while its read is queued or in flight. Reads are asynchronous: one expert at a time,
 * decisions' before predictions'; a decision is answered when its last expert lands.
 * Prefetches (RouterDecision.prefetch: the next layer's predicted experts) are read after the
 * decision before them; they take no frame of the last decision (still being computed) nor of
 * their own layer (whose READY experts the attention worker may already have dispatched). */
#ifndef STP_STORAGE_H
#define STP_STORAGE_H

#include <stdint.h>

#include "model/model.h"
#include "msg/stage.h"

typedef struct storage storage;

typedef struct storage_opts {
    uint64_t memory_budget; /* whole pipeline, bytes; 0 = unlimited */
    const char *layout_dir; /* NULL: next to the model */
    const char *policy;     /* "lfu" or "lru" (NULL: lfu) */
    double lfu_half_life;   /* tokens (<= 0: CACHE_POLICY_HALF_LIFE) */
    int pool_experts;       /* > 0: this many pool slots regardless of the budget (tests) */
    int workers;            /* expert workers in the pipeline (for the estimate; 0: 2) */
    int attn_threads;       /* the attention worker's compute threads (for the plan; 0: 1) */
    const char *trace;      /* append each decode decision to this file (bench/cache_sim.py) */
} storage_opts;

int storage_new(storage **out, const stage_opts *o, const storage_opts *so, stp_err *err);
/* Serves until SIGINT/SIGTERM; 0 on a clean stop. */
int storage_run(storage *s, stp_err *err);
void storage_destroy(storage **self_p);

#endif
