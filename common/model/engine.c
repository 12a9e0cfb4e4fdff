/* engine: the in-process forward pass of SmallThinker, top to bottom; see engine.h.
 *
 * Per micro-batch of T tokens at positions pos0..pos0+T-1:
 *   x = token_embd[tokens]
 *   forward_ubatch: for each layer: r = router · x (raw residual, before attn_norm)
 *                   sel, w = top-k(gate(r));  x = x + attention(rmsnorm(x) * attn_norm)
 *                   x = x + moe(rmsnorm(x) * ffn_norm, sel, w)   (the seam: moe_forward)
 *   logits = output · (rmsnorm(x) * output_norm)                  (forward_head)
 * Invariant: n_past only advances after a whole eval succeeded. */
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
    kv_cache *kv;
    attn_scratch *as;
    moe_scratch *ms;
    int n_ctx, n_ubatch, n_past;
    float *x;       /* (n_ubatch, n_embd) residual */
    float *h;       /* (n_ubatch, n_embd) normed */
    float *ffn;     /* (n_ubatch, n_embd) */
    float *rlogits; /* (n_ubatch, n_expert) */
    int32_t *sel;   /* (n_ubatch, n_expert_used) */
    float *selw;    /* (n_ubatch, n_expert_used) */
    uint8_t *xq;    /* LM-head activations */
    engine_stats stats;
    lm_head *lmh;        /* sparse LM head for last-token logits, or NULL */
    const float *last_x; /* the last evaluated token's final hidden state */
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
    rc = kv_cache_new(&e->kv, c, n_ctx, n_ubatch, p ? p->kv_type : KV_F32, err);
    if (rc) goto fail;
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
    e->xq = malloc((size_t)c->n_embd * 4 + 64);
    if (!e->x || !e->h || !e->ffn || !e->rlogits || !e->sel || !e->selw || !e->xq) {
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
    kv_cache_destroy(&e->kv);
    attn_scratch_destroy(&e->as);
    moe_scratch_destroy(&e->ms);
    free(e->x);
    free(e->h);
    free(e->ffn);
    free(e->rlogits);
    free(e->sel);
    free(e->selw);
    free(e->xq);
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

static void s_ubatch(engine *e, const int32_t *tokens, int T, float *logits, bool all_logits,
                     bool last_chunk) {
    const model *m = e->m;
    const model_config *c = &m->cfg;
    const int E = c->n_embd;
    engine_stats *st = &e->stats;

    uint64_t t0 = forward_now_ns();
    for (int t = 0; t < T; t++)
        ops_embed(&e->cc, &m->tok_embd, tokens[t], e->x + (size_t)t * E);
    st->ns_embed += forward_now_ns() - t0;

    const forward_state fs = {&e->cc, m,      e->kv,      e->as,  e->x,
                              e->h,   e->ffn, e->rlogits, e->sel, e->selw};
    const forward_experts fx = {.ctx = e, .run = s_run_experts, .timed = s_timed};
    forward_ubatch(&fs, T, e->n_past, &fx, NULL); /* moe_forward cannot fail */

    e->n_past += T;
    e->stats.tokens += (uint64_t)T;
    e->last_x = e->x + (size_t)(T - 1) * E;
    if (!logits) return;
    t0 = forward_now_ns();
    for (int t = 0; t < T; t++) {
        if (!all_logits && !(last_chunk && t == T - 1)) continue;
        if (e->lmh && !all_logits)
            lm_head_eval(e->lmh, &e->cc, e->x + (size_t)t * E, logits);
        else
            forward_head(&e->cc, m, e->x + (size_t)t * E, e->h, e->xq,
                         all_logits ? logits + (size_t)t * c->n_vocab : logits);
    }
    st->ns_head += forward_now_ns() - t0;
}

int engine_eval(engine *e, const int32_t *tokens, int n, float *logits, bool all_logits,
                stp_err *err) {
    const model_config *c = &e->m->cfg;
    if (n <= 0) return stp_err_set(err, STP_EINVAL, "nothing to evaluate (0 tokens)");
    if (n > e->n_ctx - e->n_past)
        return stp_err_set(err, STP_ERANGE,
                           "%d tokens do not fit in the context: %d of %d positions are used "
                           "(raise --ctx-size or shorten the prompt)",
                           n, e->n_past, e->n_ctx);
    for (int i = 0; i < n; i++)
        if (tokens[i] < 0 || tokens[i] >= c->n_vocab)
            return stp_err_set(err, STP_ERANGE, "token id %d at index %d is outside 0..%d",
                               tokens[i], i, c->n_vocab - 1);
    for (int done = 0; done < n;) {
        int T = n - done < e->n_ubatch ? n - done : e->n_ubatch;
        float *lg = logits && all_logits ? logits + (size_t)done * c->n_vocab : logits;
        s_ubatch(e, tokens + done, T, lg, all_logits, done + T == n);
        done += T;
    }
    return 0;
}

void engine_reset(engine *e) {
    e->n_past = 0;
}
int engine_n_past(const engine *e) {
    return e->n_past;
}
int engine_n_ctx(const engine *e) {
    return e->n_ctx;
}
size_t engine_kv_bytes(const engine *e) {
    return e->kv->bytes;
}
size_t engine_scratch_bytes(const engine *e) {
    const model_config *c = &e->m->cfg;
    return attn_scratch_bytes(e->as) + moe_scratch_bytes(e->ms) + moe_sparse_down_bytes(e->ms) +
           model_packed_bytes(e->m) +
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
