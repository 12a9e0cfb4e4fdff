/* attention: one layer's self-attention block for a micro-batch of one or more sequences.
 *
 * x (T x n_embd, the residual) becomes x + Wo · attn(rmsnorm(x) * attn_norm). The micro-batch is
 * segments, one per sequence (attn_seg): the norms and the q/k/v and output projections run over
 * all T rows at once (one read of each weight for every sequence), the attention proper per
 * token on its own sequence's cache. Keys and values of a segment's tokens (positions
 * pos0..pos0+n-1) are appended to its cache first; NoPE layers cache un-rotated keys. Causal
 * mask, plus the window on sliding-window layers. A row's result does not depend on the other
 * rows (matmat and matvec give the same bits; the attention kernel's split does not change
 * them). */
#ifndef STP_ATTENTION_H
#define STP_ATTENTION_H

#include "model/kv_cache.h"
#include "model/ops.h"

typedef struct attn_scratch attn_scratch;

int attn_scratch_new(attn_scratch **out, const model_config *cfg, int n_ubatch, int n_ctx,
                     int n_threads, stp_err *err);
void attn_scratch_destroy(attn_scratch **self_p);
size_t attn_scratch_bytes(const attn_scratch *s);
/* What attn_scratch_new(cfg, n_ubatch, n_ctx, n_threads) allocates, in bytes, without
 * allocating (the budget plan counts it). */
size_t attn_scratch_size(const model_config *cfg, int n_ubatch, int n_ctx, int n_threads);

/* A run of consecutive tokens of one sequence in a micro-batch: the rows of x in segment order. */
typedef struct attn_seg {
    kv_cache *kv; /* the sequence's caches */
    int pos0;     /* position of the segment's first token */
    int n;        /* tokens (>= 1) */
} attn_seg;

/* Layer il's first section for T rows of the residual x (at most the scratch's n_ubatch): the
 * router logits (T x n_expert, F32 weights, on x itself) and q, k, v of rmsnorm(x) * attn_norm,
 * all in one section of the team (the router's rows are a few dozen: a section of their own
 * would cost more in its start and end than in its reads). The q, k, v rows stay in s. */
void attention_project(const compute_ctx *cc, const model *m, int il, const float *x, int T,
                       float *router_logits, attn_scratch *s);
/* The rest of layer il's attention for the segments' tokens (the T rows attention_project took,
 * in segment order): RoPE, the cache, attention per token, x += Wo · o. */
void attention_attend(const compute_ctx *cc, const model *m, int il, const attn_seg *segs,
                      int n_segs, float *x, attn_scratch *s);

/* Where the attention kernel of cc's level requests the cached rows ahead: "l1" or "l2" (AVX-512:
 * chosen by CPU or STP_ATTN_PREFETCH, see attention.c), "l2" for the other levels. Benchmarks
 * print it beside the kernel level. */
const char *attention_prefetch_name(const compute_ctx *cc);

/* The router logits of layer il for T residual vectors: (T x n_expert), F32 weights, alone (the
 * pipeline's guess at the next layer's experts); the same bits as attention_project's. */
void attention_router(const compute_ctx *cc, const model *m, int il, const float *x, int T,
                      float *logits, attn_scratch *s);

#endif
