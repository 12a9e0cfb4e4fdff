/* moe: routed ReGLU experts, grouped by expert, sparse `up` for single tokens; see moe.h. */
#include "model/moe.h"

#include <stdlib.h>
#include <string.h>

#include "model/down_t.h"

struct moe_scratch {
    int T, K, E, F, X;
    int32_t *slot_tok;  /* (T*K) token of each (expert-grouped) slot */
    int32_t *slot_of;   /* (T*K) slot of (t, k) */
    int32_t *grp_start; /* (X+1) first slot of each expert */
    float *g, *u;       /* (T*K, F) */
    float *y;           /* (T*K, E) expert outputs per slot */
    int32_t *active;    /* (T*K, F) active neuron lists (single-vector groups) */
    uint8_t *xq_h;      /* (T*K) quantized inputs for gate/up, grouped */
    uint8_t *xq_h2;     /* second copy when up's activation type differs from gate's */
    uint8_t *xq_a;      /* (T*K) quantized activations for down */
    size_t bytes;
    uint8_t *pack_up, *pack_down; /* (n_expert) q4_0x16 images packed on the fly in prefill */
    size_t pack_up_bytes, pack_down_bytes; /* per expert */
    uint8_t **dt_img; /* (n_layer * n_expert) down_t images, NULL until built */
    size_t dt_expert_bytes, dt_bytes;
    int dt_n_layer;
};

int moe_scratch_new(moe_scratch **out, const model_config *cfg, int n_ubatch, stp_err *err) {
    *out = NULL;
    moe_scratch *s = calloc(1, sizeof *s);
    if (!s) return stp_err_set(err, STP_ENOMEM, "moe scratch: out of memory");
    s->T = n_ubatch;
    s->K = cfg->n_expert_used;
    s->E = cfg->n_embd;
    s->F = cfg->n_ff_exp;
    s->X = cfg->n_expert;
    size_t S = (size_t)s->T * s->K;
    size_t wide = (size_t)(s->E > s->F ? s->E : s->F);
    size_t act = wide * 4 + 64; /* F32 activations are the widest format */
    s->slot_tok = malloc(S * sizeof(int32_t));
    s->slot_of = malloc(S * sizeof(int32_t));
    s->grp_start = malloc(((size_t)s->X + 1) * sizeof(int32_t));
    s->g = malloc(S * s->F * sizeof(float));
    s->u = malloc(S * s->F * sizeof(float));
    s->y = malloc(S * s->E * sizeof(float));
    s->active = malloc(S * s->F * sizeof(int32_t));
    s->xq_h = malloc(S * act);
    s->xq_h2 = malloc(S * act);
    s->xq_a = malloc(S * act);
    s->bytes = S * (2 * s->F + s->E + s->F) * 4 + 3 * S * act;
    if (!s->slot_tok || !s->slot_of || !s->grp_start || !s->g || !s->u || !s->y || !s->active ||
        !s->xq_h || !s->xq_h2 || !s->xq_a) {
        moe_scratch_destroy(&s);
        return stp_err_set(err, STP_ENOMEM, "moe scratch: out of memory");
    }
    *out = s;
    return 0;
}

void moe_scratch_destroy(moe_scratch **self_p) {
    moe_scratch *s = *self_p;
    if (!s) return;
    if (s->dt_img) {
        for (int i = 0; i < s->dt_n_layer * s->X; i++)
            free(s->dt_img[i]);
        free(s->dt_img);
    }
    free(s->pack_up);
    free(s->pack_down);
    free(s->slot_tok);
    free(s->slot_of);
    free(s->grp_start);
    free(s->g);
    free(s->u);
    free(s->y);
    free(s->active);
    free(s->xq_h);
    free(s->xq_h2);
    free(s->xq_a);
    free(s);
    *self_p = NULL;
}

size_t moe_scratch_bytes(const moe_scratch *s) {
    return s ? s->bytes : 0;
}

int moe_enable_sparse_down(moe_scratch *s, const model *m, stp_err *err) {
    const model_config *c = &m->cfg;
    if (!strcmp(kern_ops_get()->level, "ref")) return 0;
    for (int il = 0; il < c->n_layer; il++)
        if (!down_t_expert_bytes(m->layers[il].down_exps.type, c->n_embd, c->n_ff_exp)) return 0;
    s->dt_img = calloc((size_t)c->n_layer * c->n_expert, sizeof(uint8_t *));
    if (!s->dt_img) return stp_err_set(err, STP_ENOMEM, "sparse down: out of memory");
    s->dt_n_layer = c->n_layer;
    s->dt_expert_bytes = down_t_expert_bytes(STP_TYPE_Q4_0, c->n_embd, c->n_ff_exp);
    return 0;
}

size_t moe_sparse_down_bytes(const moe_scratch *s) {
    return s ? s->dt_bytes : 0;
}

typedef struct dt_build_section {
    moe_scratch *s;
    const model *m;
    long first, n; /* images first..first+n-1 (layer * n_expert + expert) */
} dt_build_section;

static void s_dt_build_worker(void *p, int ith, int nth) {
    dt_build_section *d = p;
    const model_config *c = &d->m->cfg;
    long b, e;
    threadpool_chunk(d->n, ith, nth, 1, &b, &e);
    for (long i = d->first + b; i < d->first + e; i++) {
        const tensor_view *down = &d->m->layers[i / c->n_expert].down_exps;
        down_t_build_expert(down, i % c->n_expert, d->s->dt_img[i]);
        /* the image replaces the file pages of this expert's down matrix */
        model_release_pages(down->data + (size_t)(i % c->n_expert) * down->mat_bytes,
                            down->mat_bytes);
    }
}

int moe_build_sparse_down_all(moe_scratch *s, const model *m, threadpool *tp,
                              model_progress_fn progress, void *ud, stp_err *err) {
    if (!s->dt_img) return 0;
    const model_config *c = &m->cfg;
    for (long i = 0; i < (long)c->n_layer * c->n_expert; i++) {
        if (s->dt_img[i]) continue;
        s->dt_img[i] = malloc(s->dt_expert_bytes);
        if (!s->dt_img[i]) return stp_err_set(err, STP_ENOMEM, "sparse down: out of memory");
        s->dt_bytes += s->dt_expert_bytes;
    }
    const long total = (long)c->n_layer * c->n_expert, slice = total / 32 + 1;
    for (long i = 0; i < total; i += slice) {
        dt_build_section d = {s, m, i, total - i < slice ? total - i : slice};
        threadpool_run(tp, s_dt_build_worker, &d);
        if (progress) progress(ud, "neuron-major expert down", (double)(i + d.n) / total);
    }
    return 0;
}

typedef struct dt_section {
    const kern_ops *ops;
    const uint8_t *img[STP_MAX_EXPERTS];
    const uint8_t *xq[STP_MAX_EXPERTS];
    float *y[STP_MAX_EXPERTS];
    int n, n_embd, n_ff;
    int64_t computed[64]; /* per thread */
} dt_section;

static void s_dt_worker(void *p, int ith, int nth) {
    dt_section *d = p;
    long k0, k1;
    threadpool_chunk(d->n_embd / 2, ith, nth, 16, &k0, &k1);
    int64_t c = 0;
    for (int i = 0; i < d->n && k0 < k1; i++)
        c += d->ops->down_t_matvec(d->img[i], d->n_embd, d->n_ff, (const block_q8_0 *)d->xq[i],
                                   d->y[i], (int)k0, (int)k1);
    if (ith < 64) d->computed[ith] = c;
}

/* The single-token down products of slots s0..s0+n over down_t images; false if unavailable. */
static bool s_down_sparse(const compute_ctx *cc, const model *m, int il, moe_scratch *s, size_t sd,
                          engine_stats *stats) {
    const model_config *c = &m->cfg;
    const layer_weights *L = &m->layers[il];
    if (!s->dt_img || L->down_exps.type != STP_TYPE_Q4_0) return false;
    dt_section d;
    memset(&d, 0, sizeof d);
    d.ops = cc->ops;
    d.n_embd = c->n_embd;
    d.n_ff = c->n_ff_exp;
    for (int e = 0; e < c->n_expert; e++) {
        int n = s->grp_start[e + 1] - s->grp_start[e];
        if (!n) continue;
        if (n != 1) return false;
        uint8_t **img = &s->dt_img[(size_t)il * c->n_expert + e];
        if (!*img) {
            *img = malloc(s->dt_expert_bytes);
            if (!*img) return false;
            down_t_build_expert(&L->down_exps, e, *img);
            s->dt_bytes += s->dt_expert_bytes;
        }
        int slot = s->grp_start[e];
        d.img[d.n] = *img;
        d.xq[d.n] = s->xq_a + (size_t)slot * sd;
        d.y[d.n] = s->y + (size_t)slot * c->n_embd;
        d.n++;
    }
    threadpool_run(cc->tp, s_dt_worker, &d);
    if (stats) {
        int64_t sum = 0;
        for (int i = 0; i < 64; i++)
            sum += d.computed[i];
        stats->down_neurons += (uint64_t)sum;
    }
    return true;
}

/* Room to pack each expert's `up` and `down` in prefill (Q4_0 with 16-row groups only);
 * returns false (and packs nothing) when not applicable or out of memory. */
static bool s_pack_room(moe_scratch *s, const layer_weights *L) {
    if (L->up_exps.type != STP_TYPE_Q4_0 || L->down_exps.type != STP_TYPE_Q4_0) return false;
    size_t bu = kern_q4_0x16_size(L->up_exps.n_rows, L->up_exps.n_cols);
    size_t bd = kern_q4_0x16_size(L->down_exps.n_rows, L->down_exps.n_cols);
    if (!bu || !bd) return false;
    if (!s->pack_up) {
        s->pack_up_bytes = (bu + 63) & ~(size_t)63;
        s->pack_down_bytes = (bd + 63) & ~(size_t)63;
        s->pack_up = aligned_alloc(64, s->pack_up_bytes * (size_t)s->X);
        s->pack_down = aligned_alloc(64, s->pack_down_bytes * (size_t)s->X);
        if (!s->pack_up || !s->pack_down) {
            free(s->pack_up);
            free(s->pack_down);
            s->pack_up = s->pack_down = NULL;
            return false;
        }
        s->bytes += (s->pack_up_bytes + s->pack_down_bytes) * (size_t)s->X;
    }
    return true;
}

void moe_forward(const compute_ctx *cc, const model *m, int il, const float *h, int T,
                 const int32_t *sel, const float *w, float *out, moe_scratch *s,
                 engine_stats *stats) {
    const model_config *c = &m->cfg;
    const layer_weights *L = &m->layers[il];
    const int K = c->n_expert_used, E = c->n_embd, F = c->n_ff_exp, X = c->n_expert;
    const int S = T * K;

    /* 1. group the (token, k) slots by expert (counting sort keeps token order) */
    for (int e = 0; e <= X; e++)
        s->grp_start[e] = 0;
    for (int i = 0; i < S; i++)
        s->grp_start[sel[i] + 1]++;
    for (int e = 0; e < X; e++)
        s->grp_start[e + 1] += s->grp_start[e];
    int32_t fill[STP_MAX_EXPERTS];
    for (int e = 0; e < X; e++)
        fill[e] = s->grp_start[e];
    for (int i = 0; i < S; i++) {
        int slot = fill[sel[i]]++;
        s->slot_tok[slot] = i / K;
        s->slot_of[i] = slot;
    }

    /* 2. quantize each slot's input for gate (and up, if its activation format differs) */
    const stp_type tg = L->gate_exps.type, tu = L->up_exps.type, td = L->down_exps.type;
    const size_t sg = kern_act_size(tg, E), su = kern_act_size(tu, E), sd = kern_act_size(td, F);
    const bool up_shares = kern_act_type(tu) == kern_act_type(tg);
    for (int slot = 0; slot < S; slot++) {
        const float *hv = h + (size_t)s->slot_tok[slot] * E;
        cc->ops->quantize_act(tg, hv, s->xq_h + (size_t)slot * sg, E);
        if (!up_shares) cc->ops->quantize_act(tu, hv, s->xq_h2 + (size_t)slot * su, E);
    }
    const uint8_t *xq_up = up_shares ? s->xq_h : s->xq_h2;

    /* 3. gate for every group, one section */
    mm_job jobs[STP_MAX_EXPERTS];
    int nj = 0;
    for (int e = 0; e < X; e++) {
        int n = s->grp_start[e + 1] - s->grp_start[e];
        if (!n) continue;
        int s0 = s->grp_start[e];
        jobs[nj++] = (mm_job){.type = tg,
                              .n_cols = E,
                              .w = L->gate_exps.data + (size_t)e * L->gate_exps.mat_bytes,
                              .row_bytes = L->gate_exps.row_bytes,
                              .xq = s->xq_h + (size_t)s0 * sg,
                              .xq_stride = sg,
                              .n_vec = n,
                              .y = s->g + (size_t)s0 * F,
                              .y_stride = (size_t)F,
                              .n_rows = F,
                              .wp = model_packed(&L->gate_exps, e)};
    }
    ops_mm_run(cc, jobs, nj);

    /* 4. up: only active rows for single-token groups, dense otherwise (groups of many tokens
     * pack the expert's matrix on the fly for the faster kernel) */
    const bool packing = T >= MM_PACK_MIN_VEC && s_pack_room(s, L);
    nj = 0;
    uint64_t active_total = 0;
    for (int e = 0; e < X; e++) {
        int n = s->grp_start[e + 1] - s->grp_start[e];
        if (!n) continue;
        int s0 = s->grp_start[e];
        mm_job j = {.type = tu,
                    .n_cols = E,
                    .pack_scratch = packing ? s->pack_up + (size_t)e * s->pack_up_bytes : NULL,
                    .w = L->up_exps.data + (size_t)e * L->up_exps.mat_bytes,
                    .row_bytes = L->up_exps.row_bytes,
                    .xq = xq_up + (size_t)s0 * su,
                    .xq_stride = su,
                    .n_vec = n,
                    .y = s->u + (size_t)s0 * F,
                    .y_stride = (size_t)F,
                    .n_rows = F};
        active_total += ops_count_active(s->g + (size_t)s0 * F, (size_t)n, F);
        if (n == 1) {
            j.rows = s->active + (size_t)s0 * F;
            j.n_rows = ops_active_rows(s->g + (size_t)s0 * F, F, s->active + (size_t)s0 * F);
        }
        jobs[nj++] = j;
    }
    ops_mm_run(cc, jobs, nj);
    if (stats) {
        stats->neurons_total += (uint64_t)S * F;
        stats->neurons_active += active_total;
    }

    /* 5. ReGLU activation, quantized for down */
    for (int slot = 0; slot < S; slot++) {
        float *g = s->g + (size_t)slot * F;
        const float *u = s->u + (size_t)slot * F;
        for (int i = 0; i < F; i++)
            g[i] = g[i] > 0.0f ? g[i] * u[i] : 0.0f;
        cc->ops->quantize_act(td, g, s->xq_a + (size_t)slot * sd, F);
    }

    /* 6. down for every group, one section (neuron-sparse for single tokens when enabled) */
    if (T == 1 && s_down_sparse(cc, m, il, s, sd, stats)) goto combine;
    nj = 0;
    for (int e = 0; e < X; e++) {
        int n = s->grp_start[e + 1] - s->grp_start[e];
        if (!n) continue;
        int s0 = s->grp_start[e];
        jobs[nj++] =
            (mm_job){.type = td,
                     .n_cols = F,
                     .pack_scratch = packing ? s->pack_down + (size_t)e * s->pack_down_bytes : NULL,
                     .w = L->down_exps.data + (size_t)e * L->down_exps.mat_bytes,
                     .row_bytes = L->down_exps.row_bytes,
                     .xq = s->xq_a + (size_t)s0 * sd,
                     .xq_stride = sd,
                     .n_vec = n,
                     .y = s->y + (size_t)s0 * E,
                     .y_stride = (size_t)E,
                     .n_rows = E};
    }
    ops_mm_run(cc, jobs, nj);
    if (stats) stats->down_neurons += (uint64_t)S * F;

combine:
    /* 7. weighted sum in k order */
    for (int t = 0; t < T; t++) {
        float *o = out + (size_t)t * E;
        for (int k = 0; k < K; k++) {
            const float wk = w[t * K + k];
            const float *y = s->y + (size_t)s->slot_of[t * K + k] * E;
            if (k == 0)
                for (int i = 0; i < E; i++)
                    o[i] = y[i] * wk;
            else
                for (int i = 0; i < E; i++)
                    o[i] += y[i] * wk;
        }
    }
}
