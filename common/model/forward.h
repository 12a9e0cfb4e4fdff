/* forward: the layer loop of one micro-batch, the one copy both ways of running share.
 *
 * The in-process engine and the pipeline's attention worker run the same loop; they differ only
 * in how a layer's experts are computed, which is the seam `forward_experts`: in process it is
 * moe_forward, in the attention worker the dispatch to the expert workers (lanes or ZeroMQ) with
 * the storage daemon's residency. Per layer il, for T tokens at positions pos0..pos0+T-1:
 *
 *   r = router_il · x                 (raw residual, before attn_norm)
 *   sel, w = top-k(gate(r))           -> fx->routed(il, sel, w)   (before attention)
 *   x += attention_il(rmsnorm(x) * attn_norm)
 *   h  = rmsnorm(x) * ffn_norm
 *   out = sum_k w_k * expert_k(h)     -> fx->run(il, x, h, sel, w, out)
 *   x += out                          (out + x, the order ggml adds in)
 *
 * Embeddings come before (the engine reads token_embd through the mapping, the attention worker
 * by pread) and the LM head after (forward_head): the callers place their inputs and logits
 * differently, the arithmetic of both is one function each. */
#ifndef STP_FORWARD_H
#define STP_FORWARD_H

#include <stdbool.h>
#include <stdint.h>

#include "model/attention.h"
#include "model/kv_cache.h"
#include "model/model.h"
#include "model/ops.h"

/* What one layer's phases took, in nanoseconds (for the callers' statistics). */
typedef struct forward_layer_ns {
    uint64_t router;  /* the router product (its share by bytes of the section it shares with q,
                       * k, v), routing, fx->routed */
    uint64_t attn;    /* the rest: attention and the FFN norm */
    uint64_t experts; /* fx->run and the residual */
} forward_layer_ns;

/* The seam: how a layer's experts are run. */
typedef struct forward_experts {
    void *ctx;
    /* Optional. Layer il's routing is known (sel, w: (T, n_expert_used)) and its attention has
     * not run yet: the pipeline asks the storage daemon for missing experts here, so their reads
     * overlap the attention. Non-zero fails the micro-batch. */
    int (*routed)(void *ctx, int il, int T, const int32_t *sel, const float *w, stp_err *err);
    /* Required. out (T, n_embd) = sum over k, in k order, of w[t][k] * expert sel[t][k] (h[t]).
     * x is the residual after attention (without this layer's experts; the pipeline predicts
     * the next layer's experts from it), h the normed FFN input. Non-zero fails the
     * micro-batch. */
    int (*run)(void *ctx, int il, int T, const float *x, const float *h, const int32_t *sel,
               const float *w, float *out, stp_err *err);
    /* Optional. Layer il is done; t: its phases. */
    void (*timed)(void *ctx, int il, const forward_layer_ns *t);
} forward_experts;

/* The state the loop works on: the caller's, allocated for n_ubatch tokens. */
typedef struct forward_state {
    const compute_ctx *cc;
    const model *m;
    attn_scratch *as;
    float *x;       /* (n_ubatch, n_embd) residual: the embeddings in, the last hidden state out */
    float *h;       /* (n_ubatch, n_embd) normed FFN input */
    float *ffn;     /* (n_ubatch, n_embd) the experts' output */
    float *rlogits; /* (n_ubatch, n_expert) router logits */
    int32_t *sel;   /* (n_ubatch, n_expert_used) chosen experts */
    float *selw;    /* (n_ubatch, n_expert_used) their weights */
    /* The last segment runs only layers [tail_from, tail_to) (a prompt chunk taken a few layers
     * a step beside decoding sequences: its rows hold layer tail_from's input and get layer
     * tail_to's); tail_to 0: every segment runs every layer. */
    int tail_from, tail_to;
} forward_state;

/* A run of consecutive tokens of one sequence in a micro-batch (attention.h's attn_seg). A
 * micro-batch is one or more segments, one per sequence, whose tokens are consecutive rows of
 * s->x in segment order: attention proper runs per token on its sequence's caches, everything
 * else (projections, router, norms, experts, residual, LM head) over all the rows at once, so
 * one read of a weight serves every sequence. A row's result does not depend on the other
 * segments. */
typedef attn_seg forward_seg;

/* One micro-batch's place in a list of entries (one per sequence, entry k of n_of(entries, k)
 * tokens) cut in order into micro-batches of at most n_ubatch tokens, an entry split where the
 * cut falls: the engine and the attention worker cut their requests alike. */
typedef struct forward_cut {
    int i, first; /* the micro-batch starts at token `first` of entry i */
    int n_e, T;   /* it holds entries i..i+n_e-1 (the last one perhaps in part), T tokens */
    int next_i, next_first;
} forward_cut;

/* Moves *c (zeroed: before the first) to the next micro-batch; false when none is left. */
bool forward_cut_next(forward_cut *c, const void *entries, int n_entries,
                      int (*n_of)(const void *entries, int k), int n_ubatch);

/* Runs every layer over s->x (the segments' tokens, at most n_ubatch in all): each segment's
 * caches get its tokens' keys and values, s->x becomes the last layer's output. Returns the
 * first non-zero result of a seam function (the caches then hold a partial micro-batch: the
 * caller must not advance any position). */
int forward_ubatch(const forward_state *s, const forward_seg *segs, int n_segs,
                   const forward_experts *fx, stp_err *err);

/* A prompt chunk taken a few layers a call (engine_seq_eval.upto/from, EvalSeq.upto/from), one
 * per carrier (the scheduler takes one chunk part way at a time): whose it is, the layers done
 * and its rows' hidden states after them (at most a micro-batch: counted in the memory plan). A
 * call names the layers it believes done (`from`) and runs the chunk on from there to `upto`; when
 * this holder does not hold exactly that (a new chunk, a restarted worker, a chunk of another
 * request left part way), it starts again from the embeddings at layer 0 (the same bits, more
 * work). The sequence's positions are taken when the chunk reaches the last layer. The engine and
 * the attention worker keep these alike. */
typedef struct forward_part {
    int seq;  /* whose chunk it is (meaningful while done > 0) */
    int done; /* layers done (0: nothing pending) */
    int n;    /* the pending chunk's tokens */
    int cap;  /* rows x holds: at most a micro-batch */
    float *x; /* (cap, n_embd) */
} forward_part;

/* Whether an entry asking for layers up to `upto` (0: every layer) reaches the last one: its
 * positions are taken, its logits given and its tokens counted; else its chunk waits part way. */
static inline bool forward_part_through(int upto, int n_layer) {
    return !upto || upto >= n_layer;
}

/* Checks an entry asking for layers from..upto (upto 0: every layer), entry `index` of n_entries
 * holding `total` tokens in all: NULL, or why it cannot run (0 <= from < upto <= n_layer; a
 * slice must be the last entry and the batch one micro-batch of at most n_ubatch). */
const char *forward_part_check(int from, int upto, int n_layer, int index, int n_entries, int total,
                               int n_ubatch);
/* Before the micro-batch, for sequence seq's entry of n tokens: a plain entry drops seq's pending
 * chunk; an entry with layers (upto) takes p, and p->done becomes the layer it starts at (its rows
 * then come from p->x when > 0), with room for n rows when it stops short of n_layer. A carrier
 * holds one forward_part for all its sequences (a step takes at most one chunk part way): another
 * sequence's pending chunk is dropped and that chunk starts again at layer 0 when it comes back,
 * the same bits. 0 or STP_ENOMEM. */
int forward_part_begin(forward_part *p, int seq, int from, int upto, int n, int n_layer,
                       int n_embd);
/* Sequence seq's entry's rows (n, n_embd) where its chunk stopped, when it continues (upto and
 * layers done): true, copied; false: the caller embeds its tokens. */
bool forward_part_rows(const forward_part *p, int seq, int upto, float *rows, int n, int n_embd);
/* fs runs the last segment (sequence seq's chunk) only on its layers [done, upto) (upto 0: every
 * layer); after forward_part_begin of that segment's entry. */
void forward_part_tail(forward_state *fs, const forward_part *p, int seq, int upto);
/* After it: rows (n, n_embd) wait when upto < n_layer; else nothing is pending. Whether the
 * chunk went through (its positions are taken, its logits wanted). */
bool forward_part_end(forward_part *p, const float *rows, int n, int n_embd, int upto, int n_layer);
/* Drops sequence seq's pending chunk, if any (a slot emptied or cut back). */
void forward_part_drop(forward_part *p, int seq);
/* Layers done of sequence seq's pending chunk (0: none). */
int forward_part_layers(const forward_part *p, int seq);
void forward_part_free(forward_part *p);

/* logits (n_vocab) = output · (rmsnorm(x) * output_norm) for one hidden state x (n_embd); hn
 * (n_embd) and xq (n_embd * 4 + 64 bytes) are scratch. */
void forward_head(const compute_ctx *cc, const model *m, const float *x, float *hn, uint8_t *xq,
                  float *logits);

/* The LM head of several hidden states in one product (one read of the output matrix for
 * up to `cap` rows; each row's bits are forward_head's, as matmat's are matvec's). A step
 * queues the rows that want logits (at most max_rows: the caller's n_ubatch), then runs them. */
typedef struct forward_heads_buf forward_heads_buf;
int forward_heads_buf_new(forward_heads_buf **out, const model_config *c, int cap, int max_rows,
                          stp_err *err);
void forward_heads_buf_destroy(forward_heads_buf **self_p);
/* What forward_heads_buf_new(c, cap, max_rows) allocates, in bytes (the budget plan counts it). */
size_t forward_heads_buf_size(const model_config *c, int cap, int max_rows);
/* Queues hidden state x (n_embd): its logits go to dst (n_vocab) at forward_heads_run. */
void forward_heads_add(forward_heads_buf *b, const float *x, float *dst);
/* dst = forward_head of x for every queued row, in groups of at most cap; empties the queue. */
void forward_heads_run(const compute_ctx *cc, const model *m, forward_heads_buf *b);

/* Monotonic clock, nanoseconds. */
uint64_t forward_now_ns(void);

#endif
