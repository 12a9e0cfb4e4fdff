/* attention: GQA self-attention with NeoX RoPE or NoPE, causal and sliding-window masks.
 * Projections round activations like ggml (kern_act_type). Attention over the cache is
 * attn_core.h's flash-style kernel: one read of each cached row per token (all KV groups in one
 * pass, so a thread streams whole rows), float SIMD inside position chunks, chunks merged in double
 * in position order, one rounding at the end. Work is split over the threads by blocks of up to
 * ATTN_NQ consecutive tokens (a prefill: the block's queries share each row read), or, when there
 * are fewer tokens than threads can share (decode), by chunk, whose partials are merged after;
 * every way gives the same bits. Memory is the cache plus per-thread tiles: no score row per
 * position. */
#include "model/attention.h"
#include "model/attn_core.h"

#define AF_W 4 /* 16-byte vectors: any x86-64 (and the ABI of a build without AVX) */
#define AF_NAME attn_group_generic
#define AF_FMA(a, b, c) ((a) * (b) + (c))
#define AF_WIDEN(dst, src, n)                                                                      \
    for (int i_ = 0; i_ < (n); i_++)                                                               \
    (dst)[i_] = kern_fp16_to_f32((src)[i_])
#include "model/attn_flash.h"

#include <cpuid.h>
#include <math.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

struct attn_scratch {
    int n_ubatch, n_ctx, n_threads;
    float *hn;                /* (T, n_embd) normed input */
    float *qkv;               /* (T, q_dim + 2 kv_dim) */
    float *o;                 /* (T, q_dim) attention output */
    float *proj;              /* (T, n_embd) */
    const kv_layer **tok_kvl; /* (T) the cache layer of each token's sequence */
    int *tok_pos;             /* (T) each token's position */
    int *blk;                 /* (T) first token of each prefill block, blk[n] = T */
    float *work;              /* (n_threads, work_stride) kernel scratch, then the merge state */
    size_t work_stride;
    double *part; /* chunk partials when a token's chunks are split: (max_pairs, n_chunks, pw) */
    int max_pairs, n_chunks;
    uint8_t *xq; /* quantized activations, T * max act size */
    size_t bytes;
};

static size_t s_round16(size_t n) {
    return (n + 15) & ~(size_t)15;
}

/* The sizes of one scratch's parts, in elements; attn_scratch_new allocates exactly these and
 * attn_scratch_size (the budget plan's figure) adds them up. */
typedef struct scratch_dims {
    size_t tok_floats;      /* hn, qkv, o, proj */
    size_t tok_index_bytes; /* tok_kvl, tok_pos, blk */
    size_t work_stride, max_pairs, n_chunks, part_doubles, xq_bytes;
} scratch_dims;

static scratch_dims s_dims(const model_config *cfg, int n_ubatch, int n_ctx, int n_threads) {
    const size_t T = (size_t)n_ubatch, E = (size_t)cfg->n_embd,
                 Q = (size_t)cfg->n_head * cfg->head_dim,
                 KV = (size_t)cfg->n_head_kv * cfg->head_dim;
    const int G = cfg->n_head / cfg->n_head_kv, D = cfg->head_dim, H = cfg->n_head,
              n_kv = cfg->n_head_kv;
    const size_t widest = E > Q ? E : Q;
    scratch_dims d;
    d.tok_floats = T * (2 * E + 2 * Q + 2 * KV);
    d.tok_index_bytes = T * (sizeof(const kv_layer *) + 2 * sizeof(int)) + sizeof(int);
    /* per thread: kernel scratch, one chunk partial, the merge state (doubles) of a token's n_head
     * heads; 64-byte aligned */
    d.work_stride = attn_work_floats(G, D, n_kv) + s_round16(2 * (size_t)ATTN_NQ * H * (D + 2)) +
                    s_round16(2 * attn_merge_doubles(ATTN_NQ * H, D));
    d.max_pairs = 2 * (size_t)n_threads;
    d.n_chunks = (size_t)n_ctx / ATTN_CHUNK + 2;
    d.part_doubles = d.max_pairs * d.n_chunks * H * (D + 2);
    /* the largest activation format is F32 (4 bytes/elem); the router, q, k, v may each need
     * their own copy */
    d.xq_bytes = 4 * T * (widest * 4 + 64);
    return d;
}

size_t attn_scratch_size(const model_config *cfg, int n_ubatch, int n_ctx, int n_threads) {
    const scratch_dims d = s_dims(cfg, n_ubatch, n_ctx, n_threads);
    return (d.tok_floats + (size_t)n_threads * d.work_stride) * sizeof(float) +
           d.part_doubles * sizeof(double) + d.xq_bytes + d.tok_index_bytes;
}

int attn_scratch_new(attn_scratch **out, const model_config *cfg, int n_ubatch, int n_ctx,
                     int n_threads, stp_err *err) {
    *out = NULL;
    attn_scratch *s = calloc(1, sizeof *s);
    if (!s) return stp_err_set(err, STP_ENOMEM, "attention scratch: out of memory");
    const size_t T = (size_t)n_ubatch, E = (size_t)cfg->n_embd,
                 Q = (size_t)cfg->n_head * cfg->head_dim,
                 KV = (size_t)cfg->n_head_kv * cfg->head_dim;
    const scratch_dims d = s_dims(cfg, n_ubatch, n_ctx, n_threads);
    s->n_ubatch = n_ubatch;
    s->n_ctx = n_ctx;
    s->n_threads = n_threads;
    s->hn = malloc(T * E * sizeof(float));
    s->qkv = malloc(T * (Q + 2 * KV) * sizeof(float));
    s->o = malloc(T * Q * sizeof(float));
    s->proj = malloc(T * E * sizeof(float));
    s->tok_kvl = malloc(T * sizeof *s->tok_kvl);
    s->tok_pos = malloc(T * sizeof *s->tok_pos);
    s->blk = malloc((T + 1) * sizeof *s->blk);
    s->work_stride = d.work_stride;
    s->max_pairs = (int)d.max_pairs;
    s->n_chunks = (int)d.n_chunks;
    s->work = aligned_alloc(64, (size_t)n_threads * s->work_stride * sizeof(float));
    s->part = malloc(d.part_doubles * sizeof(double));
    s->xq = malloc(d.xq_bytes);
    s->bytes = attn_scratch_size(cfg, n_ubatch, n_ctx, n_threads);
    if (!s->hn || !s->qkv || !s->o || !s->proj || !s->work || !s->part || !s->xq || !s->tok_kvl ||
        !s->tok_pos || !s->blk) {
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
    free((void *)s->tok_kvl);
    free(s->tok_pos);
    free(s->blk);
    free(s->work);
    free(s->part);
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

typedef struct attn_section {
    const model_config *cfg;
    const float *qkv;
    float *o;
    attn_scratch *s; /* tok_kvl, tok_pos: each token's cache layer and position; blk: blocks */
    attn_group_fn fn;
    int T, n_blk;
    bool split;    /* tokens cut into chunks, partials merged after */
    int unit0[65]; /* split: first unit of token i (unit0[T] = all units) */
} attn_section;

/* The kernel arguments of token t, all its KV groups in one pass over each cached row (the chunk
 * range is set by the caller). */
static attn_group_args s_args(const attn_section *a, int t, float *work) {
    const model_config *c = a->cfg;
    const int D = c->head_dim, G = c->n_head / c->n_head_kv, Q = c->n_head * D,
              KV = c->n_head_kv * D;
    const kv_layer *kvl = a->s->tok_kvl[t];
    const int p = a->s->tok_pos[t];
    const int lo = kvl->window > 0 && p - kvl->window + 1 > 0 ? p - kvl->window + 1 : 0;
    return (attn_group_args){
        .q = a->qkv + (size_t)t * (Q + 2 * KV),
        .G = G,
        .D = D,
        .n_grp = c->n_head_kv,
        .k = kvl->k,
        .v = kvl->v,
        .kh = kvl->kh,
        .vh = kvl->vh,
        .kq = kvl->kq,
        .vq = kvl->vq,
        .qoff = 0,
        .stride = KV,
        .cap = kvl->cap,
        .lo = lo,
        .hi = p,
        .work = work,
    };
}

/* Thread ith's merge state in its work area (after the kernel scratch and one chunk partial). */
static double *s_merge_state(const attn_section *a, int ith) {
    const model_config *c = a->cfg;
    const int G = c->n_head / c->n_head_kv, D = c->head_dim, H = c->n_head;
    return (double *)(a->s->work + (size_t)ith * a->s->work_stride +
                      attn_work_floats(G, D, c->n_head_kv) +
                      s_round16(2 * (size_t)ATTN_NQ * H * (D + 2)));
}

/* Units are dealt round-robin, so the long queries at the end of a causal batch are shared. */
static void s_attn_worker(void *p, int ith, int nth) {
    const attn_section *a = p;
    const model_config *c = a->cfg;
    const int G = c->n_head / c->n_head_kv, D = c->head_dim, H = c->n_head, n_kv = c->n_head_kv;
    float *work = a->s->work + (size_t)ith * a->s->work_stride;
    double *part =
        (double *)(work + attn_work_floats(G, D, n_kv)); /* this thread's chunk partial */
    double *st = s_merge_state(a, ith);
    if (!a->split && a->T < nth && n_kv > 1) {
        /* fewer tokens than threads, each one chunk (a short context): (token, KV group) units */
        for (int u = ith; u < a->T * n_kv; u += nth) {
            const int t = u / n_kv, g = u % n_kv;
            attn_group_args ga = s_args(a, t, work);
            const size_t e = (size_t)g * D;
            ga.n_grp = 1;
            ga.q += e * G;
            ga.k = ga.k ? ga.k + e : NULL, ga.v = ga.v ? ga.v + e : NULL;
            ga.kh = ga.kh ? ga.kh + e : NULL, ga.vh = ga.vh ? ga.vh + e : NULL;
            ga.qoff = (int)e;
            ga.m = part, ga.s = part + G, ga.acc = part + 2 * G;
            attn_group_query(a->fn, &ga, st, a->o + (size_t)t * H * D + e * G);
        }
        return;
    }
    if (!a->split) {
        /* blocks of consecutive tokens of one sequence share each row read (prefill), dealt
         * round-robin */
        for (int b = ith; b < a->n_blk; b += nth) {
            const int t0 = a->s->blk[b], n = a->s->blk[b + 1] - t0;
            attn_group_args ga = s_args(a, t0, work);
            if (n > 1) {
                ga.n_q = n;
                ga.q_stride = c->n_head * D + 2 * c->n_head_kv * D;
                for (int i = 0; i < n; i++) {
                    const attn_group_args gi = s_args(a, t0 + i, NULL);
                    ga.qlo[i] = gi.lo, ga.qhi[i] = gi.hi;
                    ga.lo = gi.lo < ga.lo ? gi.lo : ga.lo, ga.hi = gi.hi > ga.hi ? gi.hi : ga.hi;
                }
            }
            ga.m = part, ga.s = part + (size_t)n * H, ga.acc = part + 2 * (size_t)n * H;
            attn_group_query(a->fn, &ga, st, a->o + (size_t)t0 * H * D);
        }
        return;
    }
    /* a contiguous run of units per thread: a token's chunks in position order, so the rows
     * requested ahead are the ones this thread reads next */
    const int n_units = a->unit0[a->T], u0 = (int)((long)n_units * ith / nth),
              u1 = (int)((long)n_units * (ith + 1) / nth);
    for (int u = u0, t = 0; u < u1; u++) {
        while (u >= a->unit0[t + 1])
            t++;
        attn_group_args ga = s_args(a, t, work);
        const int ci = u - a->unit0[t], last = (u1 < a->unit0[t + 1] ? u1 : a->unit0[t + 1]) - 1;
        ga.c0 = (ga.lo / ATTN_CHUNK + ci) * ATTN_CHUNK;
        ga.c1 = ga.c0 + ATTN_CHUNK;
        ga.pf_end = (ga.lo / ATTN_CHUNK + last - a->unit0[t] + 1) * ATTN_CHUNK;
        double *pp = a->s->part + ((size_t)t * a->s->n_chunks + ci) * H * (D + 2);
        ga.m = pp, ga.s = pp + H, ga.acc = pp + 2 * H;
        a->fn(&ga);
    }
}

/* The merge of the split tokens' chunk partials, (token, head) rows dealt to the threads in
 * contiguous runs: each head's chunks in position order, as attn_group_query merges them, so the
 * same bits whoever merges; a deep context has tens of chunks a token, so one thread merging all
 * of them kept the other waiting (in a pipeline stage, asleep and woken again) every layer. */
static void s_merge_worker(void *p, int ith, int nth) {
    const attn_section *a = p;
    const model_config *c = a->cfg;
    const int D = c->head_dim, H = c->n_head;
    double *st = s_merge_state(a, ith);
    const long rows = (long)a->T * H, r0 = rows * ith / nth, r1 = rows * (ith + 1) / nth;
    for (long r = r0; r < r1;) {
        const int t = (int)(r / H), h0 = (int)(r % H);
        const int n = (int)(r1 - r < H - h0 ? r1 - r : H - h0); /* heads h0.. of token t */
        attn_merge_init(st, n, D);
        for (int ci = 0; ci < a->unit0[t + 1] - a->unit0[t]; ci++) {
            const double *pp = a->s->part + ((size_t)t * a->s->n_chunks + ci) * H * (D + 2);
            attn_merge_add(st, n, D, pp + h0, pp + H + h0, pp + 2 * H + (size_t)h0 * D);
        }
        attn_merge_out(st, n, D, a->o + (size_t)t * H * D + (size_t)h0 * D);
        r += n;
    }
}

/* Where the AVX-512 kernel requests the cached rows ahead: into L2 far ahead (128 key rows, 64
 * value rows; on the Intel Xeon hosts, session 8, no other distance did better; L1 was not
 * tried there) or into L1 nearer (64 and 32: 12% less attention time at depth 4096 on the AMD Zen 5
 * host, session 23). Zen 5 (AMD family 26) and later take L1; everything else, Zen 4 included
 * (not measured), keeps L2. STP_ATTN_PREFETCH=l1|l2 decides instead (for measuring a host). */
static bool s_prefetch_l1;
static void s_prefetch_pick(void) {
    const char *v = getenv("STP_ATTN_PREFETCH");
    if (v && (!strcmp(v, "l1") || !strcmp(v, "l2"))) {
        s_prefetch_l1 = !strcmp(v, "l1");
        return;
    }
    unsigned a, b, c, d;
    char vendor[13] = {0};
    if (!__get_cpuid(0, &a, &b, &c, &d)) return;
    memcpy(vendor, &b, 4);
    memcpy(vendor + 4, &d, 4);
    memcpy(vendor + 8, &c, 4);
    if (strcmp(vendor, "AuthenticAMD") || !__get_cpuid(1, &a, &b, &c, &d)) return;
    const unsigned family = ((a >> 8) & 0xF) + (((a >> 8) & 0xF) == 0xF ? (a >> 20) & 0xFF : 0);
    s_prefetch_l1 = family >= 0x1A;
}

/* The kernel build of the compute level (the same level in process and in the pipeline). */
static attn_group_fn s_kernel(const compute_ctx *cc) {
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    if (!strcmp(cc->ops->level, "avx512vnni")) {
        pthread_once(&once, s_prefetch_pick);
        return s_prefetch_l1 ? attn_group_avx512_l1 : attn_group_avx512;
    }
    if (!strcmp(cc->ops->level, "avx2")) return attn_group_avx2;
    return attn_group_generic;
}

const char *attention_prefetch_name(const compute_ctx *cc) {
    return s_kernel(cc) == attn_group_avx512_l1 ? "l1" : "l2";
}

/* Attention of the T tokens' query heads over their sequences' caches (keys and values already
 * appended; s->tok_kvl and s->tok_pos set), all sequences in one section. */
static void s_attend_all(const compute_ctx *cc, const model_config *c, const attn_seg *segs,
                         int n_segs, int T, attn_scratch *s) {
    const int nth = threadpool_size(cc->tp);
    attn_section a = {.cfg = c, .qkv = s->qkv, .o = s->o, .s = s, .fn = s_kernel(cc), .T = T};
    /* few tokens for the threads (decode): each token's chunks become units of their own */
    a.split = nth > 1 && T < 2 * nth && T <= s->max_pairs && T <= 64;
    if (a.split) {
        a.unit0[0] = 0;
        for (int t = 0; t < T; t++) {
            const attn_group_args ga = s_args(&a, t, NULL);
            a.unit0[t + 1] = a.unit0[t] + ga.hi / ATTN_CHUNK - ga.lo / ATTN_CHUNK + 1;
        }
        a.split = a.unit0[T] > T; /* else nothing to cut */
    }
    if (!a.split) {
        /* prefill blocks: up to ATTN_NQ tokens of one sequence, fewer when the threads would
         * otherwise not all have a block */
        const int nq = T >= ATTN_NQ * nth ? ATTN_NQ : (T + nth - 1) / nth;
        for (int i = 0, row = 0; i < n_segs; row += segs[i++].n)
            for (int t = 0; t < segs[i].n; t += nq)
                s->blk[a.n_blk++] = row + t;
        s->blk[a.n_blk] = T;
    }
    threadpool_run(cc->tp, s_attn_worker, &a);
    if (a.split) threadpool_run(cc->tp, s_merge_worker, &a);
}

void attention_project(const compute_ctx *cc, const model *m, int il, const float *x, int T,
                       float *router_logits, attn_scratch *s) {
    const model_config *c = &m->cfg;
    const layer_weights *L = &m->layers[il];
    const int E = c->n_embd, Q = c->n_head * c->head_dim, KV = c->n_head_kv * c->head_dim;
    const int W = Q + 2 * KV;
    for (int t = 0; t < T; t++)
        ops_rmsnorm(x + (size_t)t * E, L->attn_norm, s->hn + (size_t)t * E, E, c->rms_eps);

    /* the router on x, then q, k, v on the normed rows; they may differ in type (q, k, v share
     * their activations when their formats agree) */
    mm_job jobs[4];
    uint8_t *xq = s->xq;
    const tensor_view *r = &L->router;
    size_t stride = ops_quantize_acts(cc, r->type, x, E, T, xq);
    jobs[0] = ops_matrix_job(r, 0, xq, stride, T, router_logits, (size_t)r->n_rows);
    xq += stride * T;
    const tensor_view *w3[3] = {&L->wq, &L->wk, &L->wv};
    int off[3] = {0, Q, Q + KV};
    size_t stride_prev = 0;
    for (int i = 0; i < 3; i++) {
        const tensor_view *w = w3[i];
        const uint8_t *xqi;
        if (i > 0 && kern_act_type(w->type) == kern_act_type(w3[i - 1]->type)) {
            stride = stride_prev;
            xqi = jobs[i].xq;
        } else {
            xqi = xq;
            stride = ops_quantize_acts(cc, w->type, s->hn, E, T, xq);
            xq += stride * T;
        }
        stride_prev = stride;
        jobs[1 + i] = ops_matrix_job(w, 0, xqi, stride, T, s->qkv + off[i], (size_t)W);
    }
    ops_mm_run(cc, jobs, 4);
}

void attention_attend(const compute_ctx *cc, const model *m, int il, const attn_seg *segs,
                      int n_segs, float *x, attn_scratch *s) {
    const model_config *c = &m->cfg;
    const layer_weights *L = &m->layers[il];
    const int E = c->n_embd, D = c->head_dim, Q = c->n_head * D, KV = c->n_head_kv * D;
    const int W = Q + 2 * KV;
    int T = 0;
    for (int i = 0; i < n_segs; i++)
        for (int t = 0; t < segs[i].n; t++, T++) {
            s->tok_kvl[T] = &segs[i].kv->layers[il];
            s->tok_pos[T] = segs[i].pos0 + t;
        }

    const bool rope = model_config_layer_rope(c, il);
    for (int i = 0, t = 0; i < n_segs; i++)
        for (int j = 0; j < segs[i].n; j++, t++) {
            float *row = s->qkv + (size_t)t * W;
            const int pos = segs[i].pos0 + j;
            if (rope) {
                ops_rope_neox(row, c->n_head + c->n_head_kv, D, pos, c->rope_base); /* q, k */
            }
            kv_layer *kvl = &segs[i].kv->layers[il];
            kv_cache_store(segs[i].kv, kvl, kv_cache_slot(kvl, pos), row + Q, row + Q + KV);
        }

    s_attend_all(cc, c, segs, n_segs, T, s);

    ops_matmul(cc, &L->wo, 0, s->o, T, s->proj, s->xq);
    for (size_t i = 0; i < (size_t)T * E; i++)
        x[i] = s->proj[i] + x[i];
}
