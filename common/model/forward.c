/* forward: the layer loop of one micro-batch, with the experts behind a seam; see forward.h.
 * Written once so that the engine and the attention worker give the same bits by construction:
 * both run this loop, only fx->run differs (moe_forward, or expert workers doing the same
 * products and this loop's caller summing in moe_forward's order). */
#include "model/forward.h"

#include <stdlib.h>
#include <string.h>
#include <time.h>

uint64_t forward_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

bool forward_cut_next(forward_cut *c, const void *entries, int n_entries,
                      int (*n_of)(const void *entries, int k), int n_ubatch) {
    c->i = c->next_i;
    c->first = c->next_first;
    if (c->i >= n_entries) return false;
    int T = 0, j = c->i, f = c->first;
    while (j < n_entries && T < n_ubatch) {
        int take = n_of(entries, j) - f;
        if (take > n_ubatch - T) take = n_ubatch - T;
        T += take;
        f += take;
        if (f == n_of(entries, j)) j++, f = 0;
    }
    c->T = T;
    c->n_e = j - c->i + (f > 0);
    c->next_i = j;
    c->next_first = f;
    return true;
}

int forward_ubatch(const forward_state *s, const forward_seg *segs, int n_segs,
                   const forward_experts *fx, stp_err *err) {
    const model *m = s->m;
    const model_config *c = &m->cfg;
    const int E = c->n_embd, K = c->n_expert_used, X = c->n_expert;
    int T = 0;
    for (int i = 0; i < n_segs; i++)
        T += segs[i].n;

    const int T_all = T, n_all = n_segs;
    for (int il = 0; il < c->n_layer; il++) {
        const layer_weights *L = &m->layers[il];
        forward_layer_ns ns;
        /* the rows this layer runs: every segment's, or all but the last one's (its rows are
         * the last ones, so the others stay in place) */
        const bool tail = !s->tail_to || (il >= s->tail_from && il < s->tail_to);
        n_segs = tail ? n_all : n_all - 1;
        T = tail ? T_all : T_all - segs[n_all - 1].n;
        if (!T) continue;
        uint64_t t0 = forward_now_ns();

        /* the router on the raw residual, with q, k, v: the experts are known before attention */
        attention_project(s->cc, m, il, s->x, T, s->rlogits, s->as);
        uint64_t tp = forward_now_ns();
        for (int t = 0; t < T; t++)
            ops_route(c, s->rlogits + (size_t)t * X, s->sel + (size_t)t * K,
                      s->selw + (size_t)t * K);
        int rc = fx->routed ? fx->routed(fx->ctx, il, T, s->sel, s->selw, err) : 0;
        if (rc) return rc;
        uint64_t t1 = forward_now_ns();

        /* x += attention(rmsnorm(x) * attn_norm); h = rmsnorm(x) * ffn_norm */
        attention_attend(s->cc, m, il, segs, n_segs, s->x, s->as);
        for (int t = 0; t < T; t++)
            ops_rmsnorm(s->x + (size_t)t * E, L->ffn_norm, s->h + (size_t)t * E, E, c->rms_eps);
        uint64_t t2 = forward_now_ns();
        /* the shared section goes to the router and to attention by their bytes */
        const double rb = (double)L->router.mat_bytes,
                     ab = (double)(L->wq.mat_bytes + L->wk.mat_bytes + L->wv.mat_bytes);
        const uint64_t r_share = (uint64_t)((double)(tp - t0) * rb / (rb + ab));
        ns.router = r_share + (t1 - tp);
        ns.attn = (tp - t0 - r_share) + (t2 - t1);

        /* x += experts(h) */
        if ((rc = fx->run(fx->ctx, il, T, s->x, s->h, s->sel, s->selw, s->ffn, err))) return rc;
        for (size_t i = 0; i < (size_t)T * E; i++)
            s->x[i] = s->ffn[i] + s->x[i];
        ns.experts = forward_now_ns() - t2;
        if (fx->timed) fx->timed(fx->ctx, il, &ns);
    }
    return 0;
}

void forward_head(const compute_ctx *cc, const model *m, const float *x, float *hn, uint8_t *xq,
                  float *logits) {
    const model_config *c = &m->cfg;
    ops_rmsnorm(x, m->output_norm, hn, c->n_embd, c->rms_eps);
    ops_matmul(cc, &m->output, 0, hn, 1, logits, xq);
}

struct forward_heads_buf {
    int cap;
    float *hn;   /* (cap, n_embd) normed rows */
    uint8_t *xq; /* (cap, n_embd * 4 + 64) their activations */
    float *y;    /* (cap, n_vocab) logits of a group whose rows are not contiguous (cap > 1) */
    int n, max_rows;
    const float **x; /* (max_rows) the queued hidden states */
    float **dst;     /* (max_rows) and where their logits go */
};

size_t forward_heads_buf_size(const model_config *c, int cap, int max_rows) {
    const size_t n = cap > 0 ? (size_t)cap : 1, E = (size_t)c->n_embd;
    return n * (E * sizeof(float) + E * 4 + 64) + (n > 1 ? n * c->n_vocab * sizeof(float) : 0) +
           (size_t)(max_rows > 0 ? max_rows : 1) * (sizeof(const float *) + sizeof(float *));
}

int forward_heads_buf_new(forward_heads_buf **out, const model_config *c, int cap, int max_rows,
                          stp_err *err) {
    *out = NULL;
    forward_heads_buf *b = calloc(1, sizeof *b);
    if (!b) return stp_err_set(err, STP_ENOMEM, "LM head buffers: out of memory");
    b->cap = cap > 0 ? cap : 1;
    b->max_rows = max_rows > 0 ? max_rows : 1;
    const size_t n = (size_t)b->cap, E = (size_t)c->n_embd;
    b->hn = malloc(n * E * sizeof(float));
    b->xq = malloc(n * (E * 4 + 64));
    b->y = n > 1 ? malloc(n * c->n_vocab * sizeof(float)) : NULL;
    b->x = malloc((size_t)b->max_rows * sizeof *b->x);
    b->dst = malloc((size_t)b->max_rows * sizeof *b->dst);
    if (!b->hn || !b->xq || (n > 1 && !b->y) || !b->x || !b->dst) {
        forward_heads_buf_destroy(&b);
        return stp_err_set(err, STP_ENOMEM, "LM head buffers: out of memory");
    }
    *out = b;
    return 0;
}

void forward_heads_buf_destroy(forward_heads_buf **self_p) {
    forward_heads_buf *b = *self_p;
    if (!b) return;
    free(b->hn);
    free(b->xq);
    free(b->y);
    free((void *)b->x);
    free(b->dst);
    free(b);
    *self_p = NULL;
}

void forward_heads_add(forward_heads_buf *b, const float *x, float *dst) {
    b->x[b->n] = x;
    b->dst[b->n++] = dst;
}

void forward_heads_run(const compute_ctx *cc, const model *m, forward_heads_buf *b) {
    const model_config *c = &m->cfg;
    const size_t E = (size_t)c->n_embd, V = (size_t)c->n_vocab;
    for (int g0 = 0; g0 < b->n; g0 += b->cap) {
        const int g = b->n - g0 < b->cap ? b->n - g0 : b->cap;
        bool contiguous = true; /* rows land in place (one row, or all of a prompt's) */
        for (int i = 0; i < g; i++) {
            ops_rmsnorm(b->x[g0 + i], m->output_norm, b->hn + i * E, (int)E, c->rms_eps);
            contiguous &= b->dst[g0 + i] == b->dst[g0] + i * V;
        }
        ops_matmul(cc, &m->output, 0, b->hn, g, contiguous ? b->dst[g0] : b->y, b->xq);
        for (int i = 0; i < g && !contiguous; i++)
            memcpy(b->dst[g0 + i], b->y + i * V, V * sizeof(float));
    }
    b->n = 0;
}

const char *forward_part_check(int from, int upto, int n_layer, int index, int n_entries, int total,
                               int n_ubatch) {
    if (!upto) return from ? "layers from asked without upto" : NULL;
    if (upto < 0 || upto > n_layer || from < 0 || from >= upto)
        return "layers asked outside 0 <= from < upto <= n_layer";
    if (index != n_entries - 1 || total > n_ubatch)
        return "a chunk taken a few layers a step must be the last entry and the batch one "
               "micro-batch";
    return NULL;
}

int forward_part_begin(forward_part *p, int seq, int from, int upto, int n, int n_layer,
                       int n_embd) {
    if (!upto) { /* a plain entry */
        forward_part_drop(p, seq);
        return 0;
    }
    if (upto < n_layer && n > p->cap) { /* first: a failure changes nothing */
        float *x = realloc(p->x, sizeof(float) * (size_t)n * n_embd);
        if (!x) return STP_ENOMEM;
        p->x = x;
        p->cap = n;
    }
    if (p->seq != seq || !from || p->done != from || p->n != n) p->done = 0; /* embeddings */
    p->seq = seq;
    return 0;
}

bool forward_part_rows(const forward_part *p, int seq, int upto, float *rows, int n, int n_embd) {
    if (!upto || !forward_part_layers(p, seq)) return false;
    memcpy(rows, p->x, sizeof(float) * (size_t)n * n_embd);
    return true;
}

void forward_part_tail(forward_state *fs, const forward_part *p, int seq, int upto) {
    fs->tail_from = upto ? forward_part_layers(p, seq) : 0;
    fs->tail_to = upto;
}

bool forward_part_end(forward_part *p, const float *rows, int n, int n_embd, int upto,
                      int n_layer) {
    if (forward_part_through(upto, n_layer)) {
        p->done = 0;
        return true;
    }
    memcpy(p->x, rows, sizeof(float) * (size_t)n * n_embd);
    p->done = upto;
    p->n = n;
    return false;
}

void forward_part_drop(forward_part *p, int seq) {
    if (p->seq == seq) p->done = 0;
}

int forward_part_layers(const forward_part *p, int seq) {
    return p->seq == seq ? p->done : 0;
}

void forward_part_free(forward_part *p) {
    free(p->x);
    memset(p, 0, sizeof *p);
}
