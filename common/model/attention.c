/* attention: GQA self-attention with NeoX RoPE or NoPE, causal and sliding-window masks.
 * Projections round activations like ggml (kern_act_type); scores, softmax and the value sum
 * are computed in double and rounded once, which lands within a few ulps of llama.cpp's F32
 * cache path (its SIMD sums are near-exact too) and avoids rounding flips downstream. */
#include "model/attention.h"
#include "model/attn_core.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

struct attn_scratch {
    int n_ubatch, n_ctx, n_threads;
    float *hn;      /* (T, n_embd) normed input */
    float *qkv;     /* (T, q_dim + 2 kv_dim) */
    float *o;       /* (T, q_dim) attention output */
    float *proj;    /* (T, n_embd) */
    double *scores; /* (n_threads, n_ctx) */
    uint8_t *xq;    /* quantized activations, T * max act size */
    size_t bytes;
};

int attn_scratch_new(attn_scratch **out, const model_config *cfg, int n_ubatch, int n_ctx,
                     int n_threads, stp_err *err) {
    *out = NULL;
    attn_scratch *s = calloc(1, sizeof *s);
    if (!s) return stp_err_set(err, STP_ENOMEM, "attention scratch: out of memory");
    const size_t T = (size_t)n_ubatch, E = (size_t)cfg->n_embd,
                 Q = (size_t)cfg->n_head * cfg->head_dim,
                 KV = (size_t)cfg->n_head_kv * cfg->head_dim;
    s->n_ubatch = n_ubatch;
    s->n_ctx = n_ctx;
    s->n_threads = n_threads;
    size_t widest = E > Q ? E : Q;
    /* the largest activation format is F32 (4 bytes/elem) */
    size_t xq_bytes = 3 * T * (widest * 4 + 64); /* q, k, v may each need their own copy */
    s->hn = malloc(T * E * sizeof(float));
    s->qkv = malloc(T * (Q + 2 * KV) * sizeof(float));
    s->o = malloc(T * Q * sizeof(float));
    s->proj = malloc(T * E * sizeof(float));
    s->scores = malloc((size_t)n_threads * (size_t)n_ctx * sizeof(double));
    s->xq = malloc(xq_bytes);
    s->bytes =
        (T * (2 * E + 2 * Q + 2 * KV) + 2 * (size_t)n_threads * n_ctx) * sizeof(float) + xq_bytes;
    if (!s->hn || !s->qkv || !s->o || !s->proj || !s->scores || !s->xq) {
        attn_scratch_destroy(&s);
        return stp_err_set(err, STP_ENOMEM, "attention scratch: out of memory");
    }
    *out = s;
    return 0;
}

void attn_scratch_destroy(attn_scratch **self_p) {
    attn_scratch *s = *self_p;
    if (!s) return;
    free(s->hn);
    free(s->qkv);
    free(s->o);
    free(s->proj);
    free(s->scores);
    free(s->xq);
    free(s);
    *self_p = NULL;
}

size_t attn_scratch_bytes(const attn_scratch *s) {
    return s ? s->bytes : 0;
}

void attention_router(const compute_ctx *cc, const model *m, int il, const float *x, int T,
                      float *logits, attn_scratch *s) {
    ops_matmul(cc, &m->layers[il].router, 0, x, T, logits, s->xq);
}

void attn_head_generic(const attn_head_args *a) {
    attn_core_head(a);
}

typedef struct attn_section {
    const model_config *cfg;
    const kv_layer *kvl;
    const float *qkv;
    float *o;
    double *scores;
    int T, pos0, n_ctx;
    bool simd; /* the CPU runs the AVX2+FMA build */
} attn_section;

/* One query head of one token: the generic build of attn_core.h (attention_avx2.c has the
 * AVX2+FMA build of the same code; both give the same bits). */
static void s_attend(const attn_section *a, int t, int h, double *sc) {
    const model_config *c = a->cfg;
    const int D = c->head_dim, Q = c->n_head * D, KV = c->n_head_kv * D;
    const int g = h / (c->n_head / c->n_head_kv);
    const int p = a->pos0 + t;
    const int lo = a->kvl->window > 0 && p - a->kvl->window + 1 > 0 ? p - a->kvl->window + 1 : 0;
    const attn_head_args ha = {
        .q = a->qkv + (size_t)t * (Q + 2 * KV) + (size_t)h * D,
        .k = a->kvl->k ? a->kvl->k + (size_t)g * D : NULL,
        .v = a->kvl->v ? a->kvl->v + (size_t)g * D : NULL,
        .kh = a->kvl->kh ? a->kvl->kh + (size_t)g * D : NULL,
        .vh = a->kvl->vh ? a->kvl->vh + (size_t)g * D : NULL,
        .stride = KV,
        .cap = a->kvl->cap,
        .lo = lo,
        .hi = p,
        .D = D,
        .out = a->o + (size_t)t * Q + (size_t)h * D,
        .sc = sc,
    };
    if (a->simd)
        attn_head_avx2(&ha);
    else
        attn_head_generic(&ha);
}

static void s_attn_worker(void *p, int ith, int nth) {
    const attn_section *a = p;
    long b, e;
    threadpool_chunk((long)a->T * a->cfg->n_head, ith, nth, 1, &b, &e);
    double *sc = a->scores + (size_t)ith * a->n_ctx;
    for (long i = b; i < e; i++)
        s_attend(a, (int)(i / a->cfg->n_head), (int)(i % a->cfg->n_head), sc);
}

void attention_forward(const compute_ctx *cc, const model *m, kv_cache *kv, int il, float *x, int T,
                       int pos0, attn_scratch *s) {
    const model_config *c = &m->cfg;
    const layer_weights *L = &m->layers[il];
    const int E = c->n_embd, D = c->head_dim, Q = c->n_head * D, KV = c->n_head_kv * D;
    const int W = Q + 2 * KV;
    kv_layer *kvl = &kv->layers[il];

    for (int t = 0; t < T; t++)
        ops_rmsnorm(x + (size_t)t * E, L->attn_norm, s->hn + (size_t)t * E, E, c->rms_eps);

    /* q, k, v in one section; they share the input but may differ in type */
    mm_job jobs[3];
    const tensor_view *w3[3] = {&L->wq, &L->wk, &L->wv};
    int off[3] = {0, Q, Q + KV};
    uint8_t *xq = s->xq;
    size_t stride_prev = 0;
    for (int i = 0; i < 3; i++) {
        const tensor_view *w = w3[i];
        size_t stride;
        const uint8_t *xqi;
        if (i > 0 && kern_act_type(w->type) == kern_act_type(w3[i - 1]->type)) {
            stride = stride_prev;
            xqi = jobs[i - 1].xq;
        } else {
            xqi = xq;
            stride = ops_quantize_acts(cc, w->type, s->hn, E, T, xq);
            xq += stride * T;
        }
        stride_prev = stride;
        jobs[i] = (mm_job){.type = w->type,
                           .n_cols = E,
                           .w = w->data,
                           .row_bytes = w->row_bytes,
                           .xq = xqi,
                           .xq_stride = stride,
                           .n_vec = T,
                           .y = s->qkv + off[i],
                           .y_stride = (size_t)W,
                           .n_rows = w->n_rows,
                           .wp = model_packed(w, 0)};
    }
    ops_mm_run(cc, jobs, 3);

    const bool rope = model_config_layer_rope(c, il);
    for (int t = 0; t < T; t++) {
        float *row = s->qkv + (size_t)t * W;
        if (rope) {
            ops_rope_neox(row, c->n_head, D, pos0 + t, c->rope_base);
            ops_rope_neox(row + Q, c->n_head_kv, D, pos0 + t, c->rope_base);
        }
        int slot = kv_cache_slot(kvl, pos0 + t);
        if (kvl->k) {
            memcpy(kvl->k + (size_t)slot * KV, row + Q, sizeof(float) * KV);
            memcpy(kvl->v + (size_t)slot * KV, row + Q + KV, sizeof(float) * KV);
        } else { /* float16 cache: rounded to nearest even, as ggml's F16 cache */
            for (int i = 0; i < KV; i++) {
                kvl->kh[(size_t)slot * KV + i] = kern_f32_to_fp16(row[Q + i]);
                kvl->vh[(size_t)slot * KV + i] = kern_f32_to_fp16(row[Q + KV + i]);
            }
        }
    }

    attn_section a = {
        c, kvl, s->qkv, s->o, s->scores, T, pos0, s->n_ctx, strcmp(cc->ops->level, "ref") != 0};
    threadpool_run(cc->tp, s_attn_worker, &a);

    ops_matmul(cc, &L->wo, 0, s->o, T, s->proj, s->xq);
    for (size_t i = 0; i < (size_t)T * E; i++)
        x[i] = s->proj[i] + x[i];
}
