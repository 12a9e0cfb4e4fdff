/* moe: routed ReGLU experts in process: slots grouped by expert, the FFN by expert_ffn_run over
 * the mapped GGUF (and down_t images built here), then the weighted sum in k order; see moe.h. */
#include "model/moe.h"

#include <stdlib.h>
#include <string.h>

#include "model/down_t.h"
#include "model/expert_ffn.h"

struct moe_scratch {
    int T, K, E, F, X;
    int32_t *slot_tok;  /* (T*K) token of each (expert-grouped) slot */
    int32_t *slot_row;  /* (T*K) its output row in y: t * K + k */
    int32_t *grp_start; /* (X+1) first slot of each expert */
    float *y;           /* (T*K, E) expert outputs in (t, k) order */
    expert_ffn *ffn;    /* the FFN's chunk scratch */
    size_t bytes;
    uint8_t **dt_img; /* (n_layer * n_expert) down_t images, NULL until built */
    arena *dt_arena;  /* where they live (2 MiB pages) */
    size_t dt_expert_bytes, dt_bytes;
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
    s->slot_tok = malloc(S * sizeof(int32_t));
    s->slot_row = malloc(S * sizeof(int32_t));
    s->grp_start = malloc(((size_t)s->X + 1) * sizeof(int32_t));
    s->y = malloc(S * s->E * sizeof(float));
    int rc = expert_ffn_new(&s->ffn, cfg, err);
    if (!rc && (!s->slot_tok || !s->slot_row || !s->grp_start || !s->y))
        rc = stp_err_set(err, STP_ENOMEM, "moe scratch: out of memory");
    if (rc) {
        moe_scratch_destroy(&s);
        return rc;
    }
    s->bytes = S * (2 * sizeof(int32_t) + s->E * sizeof(float)) + expert_ffn_bytes(s->ffn);
    *out = s;
    return 0;
}

void moe_scratch_destroy(moe_scratch **self_p) {
    moe_scratch *s = *self_p;
    if (!s) return;
    if (s->dt_img) {
        free(s->dt_img); /* the images are the arena's */
        arena_destroy(&s->dt_arena);
    }
    expert_ffn_destroy(&s->ffn);
    free(s->slot_tok);
    free(s->slot_row);
    free(s->grp_start);
    free(s->y);
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
    s->dt_expert_bytes = down_t_expert_bytes(STP_TYPE_Q4_0, c->n_embd, c->n_ff_exp);
    /* room for every image (reserved, backed only as they are built) */
    return arena_new(&s->dt_arena, arena_room((size_t)c->n_layer * c->n_expert, s->dt_expert_bytes),
                     err);
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
        s->dt_img[i] = arena_alloc(s->dt_arena, s->dt_expert_bytes);
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

/* Expert e's down_t image of layer il, built on first use; NULL when images are off (or out of
 * memory: the dense rows then, the same bits). */
static const uint8_t *s_down_t(moe_scratch *s, const model *m, int il, int e) {
    if (!s->dt_img) return NULL;
    uint8_t **img = &s->dt_img[(size_t)il * m->cfg.n_expert + e];
    if (!*img && (*img = arena_alloc(s->dt_arena, s->dt_expert_bytes))) {
        down_t_build_expert(&m->layers[il].down_exps, e, *img);
        s->dt_bytes += s->dt_expert_bytes;
    }
    return *img;
}

void moe_forward(const compute_ctx *cc, const model *m, int il, const float *h, int T,
                 const int32_t *sel, const float *w, float *out, moe_scratch *s,
                 engine_stats *stats) {
    const model_config *c = &m->cfg;
    const layer_weights *L = &m->layers[il];
    const int K = c->n_expert_used, E = c->n_embd, X = c->n_expert;
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
        s->slot_row[slot] = i;
    }

    /* 2. the experts' FFN over the mapped file's matrices (and the down_t images) */
    expert_ffn_group groups[STP_MAX_EXPERTS];
    int ng = 0;
    for (int e = 0; e < X; e++) {
        const int n = s->grp_start[e + 1] - s->grp_start[e];
        if (!n) continue;
        const uint8_t *gate = L->gate_exps.data + (size_t)e * L->gate_exps.mat_bytes;
        groups[ng++] =
            (expert_ffn_group){.w = {.gate = gate,
                                     .gate_x16 = model_packed(&L->gate_exps, e),
                                     .up = L->up_exps.data + (size_t)e * L->up_exps.mat_bytes,
                                     .down = L->down_exps.data + (size_t)e * L->down_exps.mat_bytes,
                                     .down_t = s_down_t(s, m, il, e)},
                               .s0 = s->grp_start[e],
                               .n = n};
    }
    expert_ffn_stats st = {0, 0};
    expert_ffn_run(s->ffn, cc, L, groups, ng, h, s->slot_tok, s->y, s->slot_row, &st);
    if (stats) {
        stats->neurons_total += (uint64_t)S * c->n_ff_exp;
        stats->neurons_active += st.active;
        stats->down_neurons += st.down;
    }

    /* 3. weighted sum in k order */
    moe_weighted_sum(out, s->y, w, T, K, E);
}

void moe_weighted_sum(float *out, const float *y, const float *w, int T, int K, int E) {
    for (int t = 0; t < T; t++) {
        float *o = out + (size_t)t * E;
        for (int k = 0; k < K; k++) {
            const float wk = w[t * K + k];
            const float *yk = y + ((size_t)t * K + k) * E;
            if (k == 0)
                for (int i = 0; i < E; i++)
                    o[i] = yk[i] * wk;
            else
                for (int i = 0; i < E; i++)
                    o[i] += yk[i] * wk;
        }
    }
}
