/* engine: the in-process forward pass of SmallThinker, top to bottom; see engine.h.
 *
 * Per micro-batch of T tokens at positions pos0..pos0+T-1:
 *   x = token_embd[tokens]
 *   forward_ubatch: for each layer: r = router · x (raw residual, before attn_norm)
 *                   sel, w = top-k(gate(r));  x = x + attention(rmsnorm(x) * attn_norm)
 *                   x = x + moe(rmsnorm(x) * ffn_norm, sel, w)   (the seam: moe_forward)
 *   logits = output · (rmsnorm(x) * output_norm)                  (forward_heads: every
 *                                                                  sequence's row at once)
 * A micro-batch may hold tokens of several sequences (engine_eval_batch): one forward_seg per
 * sequence, attention on that sequence's caches.
 * Invariants: n_past of a sequence only advances after a whole eval succeeded; a token's
 * result does not depend on the other sequences in its micro-batch. */
#include "model/engine.h"

#include <stdlib.h>
#include <string.h>

#include "model/attention.h"
#include "model/forward.h"
#include "model/kv_cache.h"
#include "model/lm_head.h"
#include "model/moe.h"
#include "model/ops.h"
#include "util/threadpool.h"

struct engine {
    const model *m;
    compute_ctx cc;
    threadpool *tp;
    int n_seq;
    kv_cache **kv; /* [n_seq] */
    int *n_past;   /* [n_seq] */
    attn_scratch *as;
    moe_scratch *ms;
    int n_ctx, n_ubatch;
    forward_seg *segs;     /* (n_ubatch) one micro-batch's segments */
    float *x;              /* (n_ubatch, n_embd) residual */
    float *h;              /* (n_ubatch, n_embd) normed */
    float *ffn;            /* (n_ubatch, n_embd) */
    float *rlogits;        /* (n_ubatch, n_expert) */
    int32_t *sel;          /* (n_ubatch, n_expert_used) */
    float *selw;           /* (n_ubatch, n_expert_used) */
    forward_heads_buf *hb; /* the LM head's rows (n_seq at once) */
    engine_stats stats;
    lm_head *lmh;        /* sparse LM head for last-token logits, or NULL */
    const float *last_x; /* the last evaluated token's final hidden state */
    forward_part part;   /* a prompt chunk part way through the layers (one at a time) */
    /* [n_seq] 1 + the highest position written since the sequence was last emptied: a
     * sliding-window ring overwrote what lay cap positions below it, whatever n_past says now
     * (a cut back, a chunk part way), so the keep rule is asked with it */
    int *high;
};

int engine_new(engine **out, const model *m, const engine_params *p, stp_err *err) {
    *out = NULL;
    const model_config *c = &m->cfg;
    int n_threads = p && p->n_threads > 0 ? p->n_threads : 1;
    int n_ctx = p && p->n_ctx > 0 ? p->n_ctx : (c->n_ctx_train < 4096 ? c->n_ctx_train : 4096);
    int n_ubatch = p && p->n_ubatch > 0 ? p->n_ubatch : 512;
    if (n_ctx > c->n_ctx_train)
        return stp_err_set(err, STP_EINVAL, "context %d is larger than the model's %d", n_ctx,
                           c->n_ctx_train);
    if (n_ubatch > n_ctx) n_ubatch = n_ctx;
    engine *e = calloc(1, sizeof *e);
    if (!e) return stp_err_set(err, STP_ENOMEM, "engine: out of memory");
    e->m = m;
    e->n_ctx = n_ctx;
    e->n_ubatch = n_ubatch;
    int rc = threadpool_new(&e->tp, n_threads, err);
    if (rc) goto fail;
    e->cc.ops = kern_ops_get();
    e->cc.tp = e->tp;
    e->n_seq = p && p->n_seq > 0 ? p->n_seq : 1;
    e->kv = calloc((size_t)e->n_seq, sizeof *e->kv);
    e->n_past = calloc((size_t)e->n_seq, sizeof *e->n_past);
    e->segs = calloc((size_t)n_ubatch, sizeof *e->segs);
    e->high = calloc((size_t)e->n_seq, sizeof *e->high);
    if (!e->kv || !e->n_past || !e->segs || !e->high) {
        rc = stp_err_set(err, STP_ENOMEM, "engine: out of memory");
        goto fail;
    }
    for (int i = 0; i < e->n_seq; i++)
        if ((rc = kv_cache_new(&e->kv[i], c, n_ctx, n_ubatch, p ? p->kv_type : KV_F32, err)))
            goto fail;
    rc = attn_scratch_new(&e->as, c, n_ubatch, n_ctx, n_threads, err);
    if (rc) goto fail;
    rc = moe_scratch_new(&e->ms, c, n_ubatch, err);
    if (rc) goto fail;
    if (!(p && p->no_packing)) {
        int sh = p && p->sparse_head_candidates > 0; /* it reads the head's rows in file layout */
        rc = model_enable_packing((model *)m, MODEL_PACK_ALL & ~(sh ? MODEL_PACK_HEAD : 0), err);
        if (rc) goto fail;
    }
    if (!(p && p->dense_down)) {
        rc = moe_enable_sparse_down(e->ms, m, err);
        if (rc) goto fail;
    }
    if (!(p && p->lazy)) {
        model_progress_fn pf = p ? p->progress : NULL;
        void *ud = p ? p->progress_ud : NULL;
        rc = model_pack_all((model *)m, e->tp, pf, ud, err);
        if (!rc) rc = moe_build_sparse_down_all(e->ms, m, e->tp, pf, ud, err);
        if (rc) goto fail;
        model_populate(m, pf, ud);
    }
    if (p && p->sparse_head_candidates > 0) {
        rc = lm_head_new(&e->lmh, &e->cc, m, p->sparse_head_candidates, err);
        if (rc) goto fail;
    }
    size_t TE = (size_t)n_ubatch * c->n_embd;
    e->x = malloc(TE * sizeof(float));
    e->h = malloc(TE * sizeof(float));
    e->ffn = malloc(TE * sizeof(float));
    e->rlogits = malloc((size_t)n_ubatch * c->n_expert * sizeof(float));
    e->sel = malloc((size_t)n_ubatch * c->n_expert_used * sizeof(int32_t));
    e->selw = malloc((size_t)n_ubatch * c->n_expert_used * sizeof(float));
    if ((rc = forward_heads_buf_new(&e->hb, c, e->n_seq, n_ubatch, err))) goto fail;
    if (!e->x || !e->h || !e->ffn || !e->rlogits || !e->sel || !e->selw) {
        rc = stp_err_set(err, STP_ENOMEM, "engine: out of memory");
        goto fail;
    }
    *out = e;
    return 0;
fail:
    engine_destroy(&e);
    return rc;
}

void engine_destroy(engine **self_p) {
    engine *e = *self_p;
    if (!e) return;
    threadpool_destroy(&e->tp);
    for (int i = 0; e->kv && i < e->n_seq; i++)
        kv_cache_destroy(&e->kv[i]);
    free(e->kv);
    free(e->n_past);
    free(e->segs);
    forward_part_free(&e->part);
    free(e->high);
    attn_scratch_destroy(&e->as);
    moe_scratch_destroy(&e->ms);
    free(e->x);
    free(e->h);
    free(e->ffn);
    free(e->rlogits);
    free(e->sel);
    free(e->selw);
    forward_heads_buf_destroy(&e->hb);
    lm_head_destroy(&e->lmh);
    free(e);
    *self_p = NULL;
}

/* The seam in process: a layer's experts are moe_forward over the mapped weights. */
static int s_run_experts(void *ctx, int il, int T, const float *x, const float *h,
                         const int32_t *sel, const float *w, float *out, stp_err *err) {
    (void)x;
    (void)err;
    engine *e = ctx;
    moe_forward(&e->cc, e->m, il, h, T, sel, w, out, e->ms, &e->stats);
    return 0;
}

static void s_timed(void *ctx, int il, const forward_layer_ns *t) {
    (void)il;
    engine_stats *st = &((engine *)ctx)->stats;
    st->ns_router += t->router;
    st->ns_attn += t->attn;
    st->ns_moe += t->experts;
}

/* One micro-batch: the tokens of b[0..n_b) from token `first` of b[0] on, at most n_ubatch in
 * all (the caller's cut). Logits: an entry's last token when it falls in this micro-batch, or
 * every token's (all_logits, one entry only). */
static void s_ubatch(engine *e, const engine_seq_eval *b, int n_b, int first, int T,
                     bool all_logits) {
    const model *m = e->m;
    const model_config *c = &m->cfg;
    const int E = c->n_embd;
    engine_stats *st = &e->stats;

    /* cut the segments: entry i contributes tokens [lo, hi) */
    int n_segs = 0, row = 0;
    for (int i = 0; i < n_b && row < T; i++) {
        int lo = i == 0 ? first : 0, n = b[i].n - lo;
        if (n > T - row) n = T - row;
        e->segs[n_segs++] = (forward_seg){e->kv[b[i].seq], e->n_past[b[i].seq], n};
        int *high = &e->high[b[i].seq];
        if (*high < e->n_past[b[i].seq] + n) *high = e->n_past[b[i].seq] + n;
        uint64_t t0 = forward_now_ns();
        if (!forward_part_rows(&e->part, b[i].seq, b[i].upto, e->x + (size_t)row * E, n, E))
            for (int t = 0; t < n; t++)
                ops_embed(&e->cc, &m->tok_embd, b[i].tokens[lo + t], e->x + (size_t)(row + t) * E);
        st->ns_embed += forward_now_ns() - t0;
        row += n;
    }

    /* a chunk taken a few layers a step is the last entry (s_check) */
    const engine_seq_eval *tail = b[n_segs - 1].upto ? &b[n_segs - 1] : NULL;
    forward_state fs = {&e->cc, m, e->as, e->x, e->h, e->ffn, e->rlogits, e->sel, e->selw, 0, 0};
    if (tail) forward_part_tail(&fs, &e->part, tail->seq, tail->upto);
    const forward_experts fx = {.ctx = e, .run = s_run_experts, .timed = s_timed};
    forward_ubatch(&fs, e->segs, n_segs, &fx, NULL); /* moe_forward cannot fail */
    int T_done = T;                                  /* the rows through every layer */
    if (tail) { /* not through yet: its rows wait for the next call, no position, no logits */
        const int n = e->segs[n_segs - 1].n;
        if (!forward_part_end(&e->part, e->x + (size_t)(T - n) * E, n, E, tail->upto, c->n_layer))
            n_segs--, T_done -= n;
    }
    if (T_done) e->last_x = e->x + (size_t)(T_done - 1) * E;

    /* logits: the rows that want them in one product (the sparse head: one at a time) */
    uint64_t t0 = forward_now_ns();
    row = 0;
    for (int i = 0; i < n_segs; i++) {
        const engine_seq_eval *q = &b[i];
        int lo = i == 0 ? first : 0, n = e->segs[i].n;
        e->n_past[q->seq] += n;
        for (int t = 0; t < n && q->logits; t++) {
            const float *xr = e->x + (size_t)(row + t) * E;
            if (all_logits) {
                forward_heads_add(e->hb, xr, q->logits + (size_t)(lo + t) * c->n_vocab);
            } else if (lo + t == q->n - 1 && e->lmh) {
                lm_head_eval(e->lmh, &e->cc, xr, q->logits);
            } else if (lo + t == q->n - 1) {
                forward_heads_add(e->hb, xr, q->logits);
            }
        }
        row += n;
    }
    forward_heads_run(&e->cc, m, e->hb);
    st->ns_head += forward_now_ns() - t0;
    st->tokens += (uint64_t)T_done; /* a chunk's tokens once, when they are through */
}

static int s_total(const engine_seq_eval *b, int n_b) {
    int t = 0;
    for (int i = 0; i < n_b; i++)
        t += b[i].n;
    return t;
}

/* Checks a batch without changing anything (see engine_eval_batch). */
static int s_check(const engine *e, const engine_seq_eval *b, int n_b, stp_err *err) {
    const model_config *c = &e->m->cfg;
    if (n_b <= 0) return stp_err_set(err, STP_EINVAL, "nothing to evaluate (no sequence)");
    const int total = s_total(b, n_b);
    for (int i = 0; i < n_b; i++) {
        const engine_seq_eval *q = &b[i];
        if (q->seq < 0 || q->seq >= e->n_seq)
            return stp_err_set(err, STP_EINVAL, "sequence %d is outside 0..%d", q->seq,
                               e->n_seq - 1);
        for (int j = 0; j < i; j++)
            if (b[j].seq == q->seq)
                return stp_err_set(err, STP_EINVAL, "sequence %d appears twice in a batch", q->seq);
        if (q->n <= 0) return stp_err_set(err, STP_EINVAL, "nothing to evaluate (0 tokens)");
        const char *why =
            forward_part_check(q->from, q->upto, c->n_layer, i, n_b, total, e->n_ubatch);
        if (why) return stp_err_set(err, STP_EINVAL, "sequence %d: %s", q->seq, why);
        if (q->n > e->n_ctx - e->n_past[q->seq])
            return stp_err_set(err, STP_ERANGE,
                               "%d tokens do not fit in the context: %d of %d positions are used "
                               "(raise --ctx-size or shorten the prompt)",
                               q->n, e->n_past[q->seq], e->n_ctx);
        for (int t = 0; t < q->n; t++)
            if (q->tokens[t] < 0 || q->tokens[t] >= c->n_vocab)
                return stp_err_set(err, STP_ERANGE, "token id %d at index %d is outside 0..%d",
                                   q->tokens[t], t, c->n_vocab - 1);
    }
    return 0;
}

static int s_entry_n(const void *b, int k) {
    return ((const engine_seq_eval *)b)[k].n;
}

/* Runs b in micro-batches of at most n_ubatch tokens, entries in order (forward_cut_next). */
static void s_run(engine *e, const engine_seq_eval *b, int n_b, bool all_logits) {
    forward_cut c = {0};
    while (forward_cut_next(&c, b, n_b, s_entry_n, e->n_ubatch))
        s_ubatch(e, b + c.i, c.n_e, c.first, c.T, all_logits);
}

int engine_eval_batch(engine *e, const engine_seq_eval *b, int n_b, stp_err *err) {
    int rc = s_check(e, b, n_b, err);
    if (rc) return rc;
    const model_config *c = &e->m->cfg;
    for (int i = 0; i < n_b; i++)
        if (forward_part_begin(&e->part, b[i].seq, b[i].from, b[i].upto, b[i].n, c->n_layer,
                               c->n_embd))
            return stp_err_set(err, STP_ENOMEM, "engine: out of memory");
    s_run(e, b, n_b, false);
    return 0;
}

int engine_eval(engine *e, const int32_t *tokens, int n, float *logits, bool all_logits,
                stp_err *err) {
    const engine_seq_eval q = {0, tokens, n, logits, 0, 0};
    int rc = s_check(e, &q, 1, err);
    if (rc) return rc;
    forward_part_drop(&e->part, 0);
    s_run(e, &q, 1, all_logits);
    return 0;
}

void engine_reset(engine *e) {
    for (int i = 0; i < e->n_seq; i++) {
        e->n_past[i] = e->high[i] = 0;
        forward_part_drop(&e->part, i);
    }
}
int engine_n_past(const engine *e) {
    return e->n_past[0];
}
int engine_n_ubatch(const engine *e) {
    return e->n_ubatch;
}
int engine_n_seq(const engine *e) {
    return e->n_seq;
}
int engine_seq_n_past(const engine *e, int seq) {
    return seq >= 0 && seq < e->n_seq ? e->n_past[seq] : 0;
}
int engine_seq_layers_done(const engine *e, int seq) {
    return seq >= 0 && seq < e->n_seq ? forward_part_layers(&e->part, seq) : 0;
}

int engine_seq_keep(engine *e, int seq, int n_keep) {
    if (seq < 0 || seq >= e->n_seq) return 0;
    forward_part_drop(&e->part, seq); /* a chunk part way is dropped (its keys past n_past) */
    const int high = e->high[seq] > e->n_past[seq] ? e->high[seq] : e->n_past[seq];
    if (n_keep > e->n_past[seq]) n_keep = e->n_past[seq];
    e->n_past[seq] = kv_cache_keep_max(e->kv[seq], high, n_keep);
    if (!e->n_past[seq]) e->high[seq] = 0; /* emptied: every position is written again */
    kv_cache_release(e->kv[seq], e->n_past[seq]);
    return e->n_past[seq];
}
int engine_n_ctx(const engine *e) {
    return e->n_ctx;
}
size_t engine_kv_bytes(const engine *e) {
    return e->kv[0]->bytes * (size_t)e->n_seq;
}
size_t engine_scratch_bytes(const engine *e) {
    const model_config *c = &e->m->cfg;
    return attn_scratch_bytes(e->as) + moe_scratch_bytes(e->ms) + moe_sparse_down_bytes(e->ms) +
           model_packed_bytes(e->m) + forward_heads_buf_size(c, e->n_seq, e->n_ubatch) +
           (size_t)e->n_ubatch * (3 * c->n_embd + c->n_expert + 2 * c->n_expert_used) * 4;
}
const float *engine_last_hidden(const engine *e) {
    return e->last_x;
}
const engine_stats *engine_get_stats(const engine *e) {
    return &e->stats;
}
void engine_reset_stats(engine *e) {
    memset(&e->stats, 0, sizeof e->stats);
}
