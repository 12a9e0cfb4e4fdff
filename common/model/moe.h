/* moe: the routed ReGLU experts of one layer for a micro-batch, in process.
 *
 * out[t] = sum_k w[t][k] * down_e · (relu(gate_e · h[t]) * (up_e · h[t])), e = sel[t][k],
 * summed in k order as ggml does. Tokens are grouped by expert so each expert's weights are read
 * once per batch; the FFN itself is expert_ffn_run (the expert worker's too) over the mapped
 * file's matrices and, when enabled, the neuron-major down_t images this scratch owns. */
#ifndef STP_MOE_H
#define STP_MOE_H

#include "model/engine.h"
#include "model/ops.h"

typedef struct moe_scratch moe_scratch;

int moe_scratch_new(moe_scratch **out, const model_config *cfg, int n_ubatch, stp_err *err);
void moe_scratch_destroy(moe_scratch **self_p);
size_t moe_scratch_bytes(const moe_scratch *s);

/* Switches the `down` products to neuron-major down_t images (see down_t.h), built lazily per
 * (layer, expert) from m's weights on first use: single-slot products skip idle neurons, runs
 * of many slots pack the image back into q4_0x16. Only Q4_0 `down` at a SIMD kernel level (the
 * reference level keeps the file's rows); otherwise a no-op. The same bits as the dense path. */
int moe_enable_sparse_down(moe_scratch *s, const model *m, stp_err *err);
size_t moe_sparse_down_bytes(const moe_scratch *s); /* images built so far */
/* Builds every down_t image now, split over the team (load time instead of first use). */
int moe_build_sparse_down_all(moe_scratch *s, const model *m, threadpool *tp,
                              model_progress_fn progress, void *ud, stp_err *err);

/* h: (T, n_embd) normed FFN input; sel, w: (T, n_expert_used); out: (T, n_embd). */
/* out[t] = sum over k of w[t*K + k] * y[(t*K + k)], rows of E floats, added in k order (the
 * first product assigned, not added to 0): the one rounding order both carriers use. */
void moe_weighted_sum(float *out, const float *y, const float *w, int T, int K, int E);
void moe_forward(const compute_ctx *cc, const model *m, int il, const float *h, int T,
                 const int32_t *sel, const float *w, float *out, moe_scratch *s,
                 engine_stats *stats);

#endif
