/* attention: one layer's self-attention block for a micro-batch, on a kv_cache.
 *
 * x (T x n_embd, the residual) becomes x + Wo · attn(rmsnorm(x) * attn_norm). Keys and values
 * of the T tokens (positions pos0..pos0+T-1) are appended to the layer's cache first; NoPE
 * layers cache un-rotated keys. Causal mask, plus the window on sliding-window layers. */
#ifndef STP_ATTENTION_H
#define STP_ATTENTION_H

#include "model/kv_cache.h"
#include "model/ops.h"

typedef struct attn_scratch attn_scratch;

int attn_scratch_new(attn_scratch **out, const model_config *cfg, int n_ubatch, int n_ctx,
                     int n_threads, stp_err *err);
void attn_scratch_destroy(attn_scratch **self_p);
size_t attn_scratch_bytes(const attn_scratch *s);
/* What attn_scratch_new allocates for these arguments, without allocating (the budget plan). */
size_t attn_scratch_size(const model_config *cfg, int n_ubatch, int n_ctx, int n_threads);

void attention_forward(const compute_ctx *cc, const model *m, kv_cache *kv, int il, float *x, int T,
                       int pos0, attn_scratch *s);

/* The router logits of layer il for T residual vectors: (T x n_expert), F32 weights. */
void attention_router(const compute_ctx *cc, const model *m, int il, const float *x, int T,
                      float *logits, attn_scratch *s);

#endif
