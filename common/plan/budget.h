/* budget: the pipeline's memory plan under a budget. Every stage's memory outside the expert
 * weight pool (the attention worker's weights, KV caches and scratch, the activation region, the
 * expert workers' scratch, per-process overheads) is computed from sizes, the same formulas the
 * stages allocate by (tests/unit/test_budget.c compares with kv_cache and attn_scratch), and
 * what the budget leaves is the pool: frames of one expert each.
 *
 * A pure function: nothing is allocated or read, so the storage daemon (which sizes the pool by
 * it) and `stpipe info --memory-budget` (which prints it) give the same plan for the same
 * inputs. What it leaves out: the expert worker's and the attention worker's small per-slot
 * arrays are not itemized (the worker's count carries one spare row of n_ff_exp floats per slot,
 * which covers them); the attention worker's thread count reaches the daemon as
 * --attn-threads (stpipe-up passes its --threads), each thread's attention work area counted.
 * See common/plan/README.md. */
#ifndef STP_BUDGET_H
#define STP_BUDGET_H

#include <stdbool.h>
#include <stdint.h>

#include "model/kv_cache.h"
#include "model/model_config.h"
#include "util/stp_err.h"

/* Private memory of one stage process outside what the plan itemizes (libraries, zmq, stacks,
 * heap); see docs/BENCHMARKS.md for how it was measured. */
#define BUDGET_PROC_OVERHEAD (12ull << 20)
/* The coordinator's tokenizer, per vocabulary entry. */
#define BUDGET_TOKENIZER_BYTES 140

typedef struct budget_params {
    const model_config *cfg;
    uint64_t non_expert;  /* weight bytes outside the routed experts (the attention worker's) */
    uint64_t frame_bytes; /* one pool slot: the largest expert record (layout_frame_bytes) */
    int n_ctx;            /* 0: min(n_ctx_train, 4096) */
    int n_ubatch;         /* 0: 512; at most n_ctx */
    kv_dtype kv_type;     /* --cache-type f32|f16|q8_0 */
    int n_seq;            /* sequences, each with its own KV cache (0: 1) */
    int kv_pool;          /* KV positions all sequences hold at once (0: n_seq x n_ctx) */
    int workers;          /* expert workers (0: 1) */
    int threads;          /* the attention worker's compute threads (0: 1) */
    uint64_t budget;      /* the whole pipeline, bytes; 0: unlimited (every expert) */
    int pool_experts;     /* > 0: this many frames whatever the budget (tests) */
} budget_params;

/* The plan. Bytes unless said otherwise. */
typedef struct budget_plan {
    int n_ctx, n_ubatch, n_seq, workers, threads; /* the parameters, defaults applied */
    int kv_pool;                                  /* positions, default applied */
    kv_dtype kv_type;
    uint64_t non_expert;   /* attention worker's weights */
    uint64_t kv;           /* the KV pool: kv_pool positions over n_seq caches (mapped lazily,
                            * they cost what they hold: kv_cache_pool_bytes) */
    uint64_t act;          /* the activation region (act_layout: n_seq rows of logits) */
    uint64_t attn_scratch; /* = attn_scratch_bytes of the attention worker's scratch */
    uint64_t attn_buffers; /* its residual / h / router / part-way chunk buffers and logits */
    uint64_t worker;       /* one expert worker's scratch */
    uint64_t scratch;      /* attn_scratch + attn_buffers + workers * worker */
    uint64_t overhead;     /* processes (3 + workers) and the coordinator's tokenizer */
    uint64_t table;        /* the pool's header and slot table */
    uint64_t fixed;        /* everything above: the budget's share outside the frames */
    uint64_t frame_bytes;  /* one frame */
    uint64_t minimum;      /* fixed + one layer of experts: the smallest budget that runs */
    uint64_t budget;       /* as given (0: unlimited) */
    int frames;            /* pool frames */
    int all_frames;        /* n_layer * n_expert */
    uint64_t pool_bytes;   /* table + frames * frame_bytes: the pool segment */
} budget_plan;

/* Bytes of one sequence's KV cache when full (kv_cache_pool_bytes of n_ctx positions). */
uint64_t budget_kv_bytes(const model_config *c, int n_ctx, int n_ubatch, kv_dtype type);
/* Bytes of the attention scratch as attn_scratch_new allocates it. */
uint64_t budget_attn_scratch_bytes(const model_config *c, int n_ubatch, int n_ctx, int threads);
/* One expert worker's scratch for its chunk sizes (EXPERT_FFN_CHUNK/PACKS of model/expert_ffn.h).
 */
uint64_t budget_worker_bytes(const model_config *c);

/* Fills *p for the parameters. With a budget below the minimum the plan is still filled (frames
 * 0) and STP_EINVAL comes back with the minimum and its parts in the message. */
int budget_plan_compute(budget_plan *p, const budget_params *bp, stp_err *err);

/* Parses "1G", "800M", "1.5GiB", "123456" (K/M/G/T powers of 1024) into bytes. */
int budget_parse_size(const char *s, uint64_t *out, stp_err *err);

#endif
