/* attn: the attention worker's logic. It holds the embeddings, attention weights, router, LM
 * head and the KV cache of the one sequence being generated, and runs the layer loop of the
 * in-process engine with the MoE step farmed out:
 *   x = token_embd[tokens]
 *   for each layer l:
 *     r = router · x; sel, w = top-k(gate(r))    -> RouterDecision(l) to the storage daemon
 *     x = x + attention(rmsnorm(x) * attn_norm)      (the daemon makes experts resident meanwhile)
 *     h = rmsnorm(x) * ffn_norm  into shared memory; wait for Residency(l)
 *     ExpertWork(l, experts) to each expert worker; wait for every ExpertDone
 *     x = (sum_k w_k * y_k, in k order) + x
 *   logits = output · (rmsnorm(x) * output_norm)
 * The float operations are the engine's, in the engine's order, so results are bit-identical. */
#ifndef STP_ATTN_H
#define STP_ATTN_H

#include "msg/stage.h"

typedef struct attn_worker attn_worker;

int attn_worker_new(attn_worker **out, const stage_opts *o, stp_err *err);
int attn_worker_run(attn_worker *a, stp_err *err);
void attn_worker_destroy(attn_worker **self_p);

#endif
