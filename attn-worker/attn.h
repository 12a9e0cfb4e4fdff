/* attn: the attention worker's logic. It holds the embeddings, attention weights, router, LM
 * head and --parallel sequence slots (a KV cache and n_past each), and runs common/model's layer
 * loop (forward_ubatch, the in-process engine's; one segment per sequence of a micro-batch) with
 * the experts farmed out through its seam:
 *   x = token_embd[tokens]
 *   for each layer l (forward_ubatch):
 *     r = router · x; sel, w = top-k(gate(r))
 *     seam routed: RouterDecision(l) to the storage daemon (it makes experts resident meanwhile)
 *     x = x + attention(rmsnorm(x) * attn_norm); h = rmsnorm(x) * ffn_norm into shared memory
 *     seam run: ExpertWork(l, experts) to the expert workers as they are resident; wait for
 *               every ExpertDone; out = sum_k w_k * y_k, in k order
 *     x = out + x
 *   logits = output · (rmsnorm(x) * output_norm)   (forward_head; a row per slot in shm)
 * The loop is the engine's and the seam gives moe_forward's bits, so results are bit-identical. */
#ifndef STP_ATTN_H
#define STP_ATTN_H

#include "msg/stage.h"

typedef struct attn_worker attn_worker;

int attn_worker_new(attn_worker **out, const stage_opts *o, stp_err *err);
int attn_worker_run(attn_worker *a, stp_err *err);
void attn_worker_destroy(attn_worker **self_p);

#endif
