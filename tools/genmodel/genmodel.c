/* genmodel: presets, weight generation and streaming of random SmallThinker GGUF files.
 *
 * Each tensor is cut into slices of whole rows (about 1M elements, fixed by the shape alone).
 * Slice s of tensor T draws from xoshiro256** seeded with splitmix64(seed, fnv(T), s), so worker
 * threads can fill slices in any order and the bytes never depend on the thread count. Normals
 * are an integer Irwin-Hall approximation (sum of four 16-bit uniforms, |z| <= 3.46): exact
 * integer arithmetic, hence identical on every machine and libm. Slices are quantized with
 * kern_quantize_row_ref and streamed to gguf_writer_write in order; nothing else is kept.
 * Init scheme and knobs: tools/genmodel/README.md. */
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "genmodel.h"
#include "kern/kern.h"

#define GM_SLICE_ELEMS (1u << 20)
#define GM_SLICES_PER_THREAD 4

/* ------------------------------------------------------------------------------------------ */
/* RNG                                                                                        */
/* ------------------------------------------------------------------------------------------ */

typedef struct gm_rng {
    uint64_t s[4];
} gm_rng;

static uint64_t s_splitmix(uint64_t *x) {
    uint64_t z = (*x += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static uint64_t s_fnv(const char *s) {
    uint64_t h = 1469598103934665603ull;
    for (; *s; s++)
        h = (h ^ (uint8_t)*s) * 1099511628211ull;
    return h;
}

static void s_rng_seed(gm_rng *r, uint64_t seed, const char *name, uint64_t stream) {
    uint64_t x = seed ^ s_fnv(name);
    x = s_splitmix(&x) ^ (stream * 0xD1B54A32D192ED03ull);
    for (int i = 0; i < 4; i++)
        r->s[i] = s_splitmix(&x);
}

static inline uint64_t s_rotl(uint64_t x, int k) {
    return (x << k) | (x >> (64 - k));
}

static inline uint64_t s_next(gm_rng *r) {
    uint64_t *s = r->s;
    uint64_t res = s_rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = s_rotl(s[3], 45);
    return res;
}

/* Approximate N(0,1): (sum of four 16-bit uniforms - mean) / std. */
static inline float s_normal(gm_rng *r) {
    uint64_t u = s_next(r);
    int32_t sum = (int32_t)(u & 0xffff) + (int32_t)((u >> 16) & 0xffff) +
                  (int32_t)((u >> 32) & 0xffff) + (int32_t)(u >> 48);
    return (float)(2 * sum - 4 * 65535) * (0.5f * 1.7320508f / 65536.0f);
}

/* ------------------------------------------------------------------------------------------ */
/* Presets                                                                                    */
/* ------------------------------------------------------------------------------------------ */

int gm_config_preset(gm_config *cfg, const char *preset, stp_err *err) {
    gm_config c = {0};
    snprintf(c.preset, sizeof c.preset, "%s", preset);
    c.rope_base = 1.5e6f;
    c.rms_eps = 1e-6f;
    c.dtype = STP_TYPE_F32;
    c.init = GM_INIT_UNIT;
    c.gain = c.qk_gain = c.router_gain = c.embd_scale = c.output_scale = NAN;
    c.norm_noise = c.skew = NAN;
    c.threads = 2;
    c.seed = 2025;
    if (strcmp(preset, "tiny") == 0) {
        c.n_layer = 4, c.n_embd = 64, c.n_head = 4, c.n_head_kv = 2, c.head_dim = 16;
        c.n_expert = 8, c.n_expert_used = 2, c.n_ff_exp = 32, c.n_vocab = 320, c.n_ctx = 4096;
        c.gating = GM_GATING_SIGMOID, c.tied = true;
    } else if (strcmp(preset, "4b") == 0) {
        c.n_layer = 32, c.n_embd = 1536, c.n_head = 12, c.n_head_kv = 2, c.head_dim = 128;
        c.n_expert = 32, c.n_expert_used = 4, c.n_ff_exp = 768, c.n_vocab = 151936;
        c.n_ctx = 32768, c.gating = GM_GATING_SIGMOID, c.tied = true;
    } else if (strcmp(preset, "21b") == 0) {
        c.n_layer = 52, c.n_embd = 2560, c.n_head = 28, c.n_head_kv = 4, c.head_dim = 128;
        c.n_expert = 64, c.n_expert_used = 6, c.n_ff_exp = 768, c.n_vocab = 151936;
        c.n_ctx = 16384, c.gating = GM_GATING_SOFTMAX, c.tied = false, c.sliding_window = 4096;
    } else {
        return stp_err_set(err, STP_EINVAL, "unknown preset '%s' (tiny, 4b, 21b)", preset);
    }
    *cfg = c;
    return 0;
}

int gm_config_finalize(gm_config *c, stp_err *err) {
    /* Defaults reduce to the golden tiny flags at n_embd 64 / 4 layers and keep logits and the
     * residual at the tiny model's scale for bigger shapes. */
    double e = c->n_embd ? (double)c->n_embd : 64.0;
    double l = c->n_layer ? (double)c->n_layer : 4.0;
    if (isnan(c->gain)) c->gain = (float)(2.0 * (l > 4 ? sqrt(4.0 / l) : 1.0));
    if (isnan(c->qk_gain)) c->qk_gain = 2.0f;
    if (isnan(c->router_gain)) c->router_gain = 0.5f;
    if (isnan(c->embd_scale)) c->embd_scale = (float)(0.3 * sqrt(64.0 / e));
    if (isnan(c->output_scale)) c->output_scale = (float)sqrt(64.0 / e);
    if (isnan(c->norm_noise)) c->norm_noise = 0.1f;
    if (isnan(c->skew)) c->skew = strcmp(c->preset, "tiny") == 0 ? 0.0f : 2.0f;

    if (!c->n_layer || !c->n_embd || !c->n_head || !c->n_head_kv || !c->head_dim || !c->n_expert ||
        !c->n_expert_used || !c->n_ff_exp || !c->n_vocab || !c->n_ctx)
        return stp_err_set(err, STP_EINVAL, "every shape field must be > 0");
    if (c->n_head % c->n_head_kv)
        return stp_err_set(err, STP_EINVAL, "n_head %u is not a multiple of n_head_kv %u",
                           c->n_head, c->n_head_kv);
    if (c->n_expert_used > c->n_expert)
        return stp_err_set(err, STP_EINVAL, "n_expert_used %u > n_expert %u", c->n_expert_used,
                           c->n_expert);
    const stp_type_info *ti = tensor_type_info((uint32_t)c->dtype);
    uint32_t q = c->n_head * c->head_dim;
    uint32_t rows[3] = {c->n_embd, q, c->n_ff_exp};
    for (int i = 0; i < 3 && !c->vocab_only; i++)
        if (rows[i] % ti->blck)
            return stp_err_set(err, STP_EINVAL,
                               "dtype %s needs every matrix row (ne[0]) to be a multiple of %u; "
                               "%u is not (n_embd, n_head*head_dim and n_ff_exp are rows)",
                               ti->name, ti->blck, rows[i]);
    if (c->threads < 1) c->threads = 1;
    if (c->threads > 16) c->threads = 16;
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* Tensor plan                                                                                */
/* ------------------------------------------------------------------------------------------ */

typedef enum gm_kind { GM_NORM, GM_MATRIX, GM_ROUTER } gm_kind;

typedef struct gm_tensor {
    char name[64];
    stp_type type;
    uint32_t n_dims;
    int64_t ne[GGUF_MAX_DIMS];
    gm_kind kind;
    float std;   /* MATRIX, ROUTER: standard deviation; NORM: noise around 1 */
    float shift; /* MATRIX: each row += shift * u, the shared direction (--idle-bias) */
    int layer;   /* ROUTER: its layer (for the skew multipliers) */
} gm_tensor;

static float s_std(const gm_config *c, double gain, int64_t fan_in) {
    if (c->init == GM_INIT_NORMAL) return (float)(0.02 * gain);
    return (float)(gain / sqrt((double)fan_in));
}

static void s_add(gm_tensor *t, size_t *n, const char *name, stp_type type, uint32_t nd,
                  int64_t ne0, int64_t ne1, int64_t ne2, gm_kind kind, float std, int layer) {
    gm_tensor *x = &t[(*n)++];
    memset(x, 0, sizeof *x);
    snprintf(x->name, sizeof x->name, "%s", name);
    x->type = type;
    x->n_dims = nd;
    x->ne[0] = ne0, x->ne[1] = ne1, x->ne[2] = ne2, x->ne[3] = 1;
    x->kind = kind;
    x->std = std;
    x->layer = layer;
}

/* Fills t (capacity 3 + 10 * n_layer) in the golden files' order; returns the count. */
static size_t s_plan(const gm_config *c, gm_tensor *t) {
    size_t n = 0;
    int64_t e = c->n_embd, q = (int64_t)c->n_head * c->head_dim;
    int64_t kv = (int64_t)c->n_head_kv * c->head_dim, f = c->n_ff_exp, x = c->n_expert;
    stp_type m = c->dtype, f32 = STP_TYPE_F32;
    float nn = c->norm_noise;
    double embd_std = c->init == GM_INIT_NORMAL ? 0.02 : c->embd_scale;
    double out_std = c->init == GM_INIT_NORMAL ? 0.02 : c->output_scale;
    s_add(t, &n, "token_embd.weight", m, 2, e, c->n_vocab, 1, GM_MATRIX, (float)embd_std, -1);
    for (int il = 0; il < (int)c->n_layer; il++) {
        char b[64];
#define NAME(s) (snprintf(b, sizeof b, "blk.%d.%s", il, s), b)
        s_add(t, &n, NAME("attn_norm.weight"), f32, 1, e, 1, 1, GM_NORM, nn, il);
        s_add(t, &n, NAME("attn_q.weight"), m, 2, e, q, 1, GM_MATRIX, s_std(c, c->qk_gain, e), il);
        s_add(t, &n, NAME("attn_k.weight"), m, 2, e, kv, 1, GM_MATRIX, s_std(c, c->qk_gain, e), il);
        s_add(t, &n, NAME("attn_v.weight"), m, 2, e, kv, 1, GM_MATRIX, s_std(c, 1, e), il);
        s_add(t, &n, NAME("attn_output.weight"), m, 2, q, e, 1, GM_MATRIX, s_std(c, c->gain, q),
              il);
        s_add(t, &n, NAME("ffn_norm.weight"), f32, 1, e, 1, 1, GM_NORM, nn, il);
        s_add(t, &n, NAME("ffn_gate_inp.weight"), f32, 2, e, x, 1, GM_ROUTER,
              s_std(c, c->router_gain, e), il);
        gm_tensor *gate = &t[n];
        s_add(t, &n, NAME("ffn_gate_exps.weight"), m, 3, e, f, x, GM_MATRIX, s_std(c, 1, e), il);
        s_add(t, &n, NAME("ffn_up_exps.weight"), m, 3, e, f, x, GM_MATRIX, s_std(c, 1, e), il);
        s_add(t, &n, NAME("ffn_down_exps.weight"), m, 3, f, e, x, GM_MATRIX, s_std(c, c->gain, f),
              il);
#undef NAME
        /* --idle-bias: gate rows against u by B / sqrt(n_embd) (a unit-RMS input along u at
         * cosine c moves every gate pre-activation by -B * c, against N(0, 1) noise) */
        gate->shift = -(float)(c->idle_bias / sqrt((double)e));
    }
    /* --idle-bias: every token embedding gets u at the norm of its random part, so a hidden
     * state starts at cosine ~0.7 with u (the layers' updates then dilute it) */
    t[0].shift = c->idle_bias > 0 ? (float)(embd_std * sqrt((double)e)) : 0.0f;
    s_add(t, &n, "output_norm.weight", f32, 1, e, 1, 1, GM_NORM, nn, -1);
    if (!c->tied)
        s_add(t, &n, "output.weight", m, 2, e, c->n_vocab, 1, GM_MATRIX, (float)out_std, -1);
    return n;
}

/* Router row multipliers for skewed expert popularity: a seeded set of hot experts per layer
 * (2 * n_expert_used of them, at most a quarter) gets rows (1 + skew) times longer, the others
 * (1 + skew) times shorter. With isotropic inputs an expert's chance to be in the top-k grows
 * with its row norm; as r is symmetric, a hot expert fires on at most about half the tokens. */
static void s_skew_mult(const gm_config *c, int layer, float *mult) {
    uint32_t n = c->n_expert, hot = 2 * c->n_expert_used;
    if (hot > n / 4) hot = n / 4;
    for (uint32_t i = 0; i < n; i++)
        mult[i] = 1.0f;
    if (c->skew == 0.0f || hot == 0) return;
    gm_rng r;
    s_rng_seed(&r, c->seed, "router-skew", (uint64_t)layer);
    uint32_t *perm = malloc(n * sizeof *perm);
    if (!perm) return; /* cannot happen for sane n; falls back to uniform */
    for (uint32_t i = 0; i < n; i++)
        perm[i] = i;
    for (uint32_t i = n - 1; i > 0; i--) {
        uint32_t j = (uint32_t)(s_next(&r) % (i + 1));
        uint32_t tmp = perm[i];
        perm[i] = perm[j];
        perm[j] = tmp;
    }
    for (uint32_t i = 0; i < n; i++)
        mult[perm[i]] = i < hot ? 1.0f + c->skew : 1.0f / (1.0f + c->skew);
    free(perm);
}

/* The shared direction of --idle-bias: n_embd normals (their own stream) scaled to unit
 * length. sqrt is correctly rounded (IEEE 754), so the bytes stay machine-independent. */
static float *s_idle_dir(const gm_config *c) {
    float *u = malloc((size_t)c->n_embd * sizeof *u);
    if (!u) return NULL;
    gm_rng r;
    s_rng_seed(&r, c->seed, "idle-direction", 0);
    double n2 = 0;
    for (uint32_t i = 0; i < c->n_embd; i++) {
        u[i] = s_normal(&r);
        n2 += (double)u[i] * u[i];
    }
    const double inv = 1.0 / sqrt(n2);
    for (uint32_t i = 0; i < c->n_embd; i++)
        u[i] = (float)(u[i] * inv);
    return u;
}

/* Fills rows [r0, r1) of tensor t (slice index s) as float; dir: the --idle-bias direction
 * (used when t->shift != 0). */
static void s_fill_slice(const gm_config *c, const gm_tensor *t, uint64_t s, int64_t r0, int64_t r1,
                         float *out, const float *mult, const float *dir) {
    gm_rng r;
    s_rng_seed(&r, c->seed, t->name, s);
    int64_t ne0 = t->ne[0];
    for (int64_t row = r0; row < r1; row++) {
        float *o = out + (row - r0) * ne0;
        if (t->kind == GM_NORM) {
            for (int64_t i = 0; i < ne0; i++)
                o[i] = 1.0f + t->std * s_normal(&r);
        } else {
            float sd = t->std * (t->kind == GM_ROUTER ? mult[row % t->ne[1]] : 1.0f);
            for (int64_t i = 0; i < ne0; i++)
                o[i] = sd * s_normal(&r);
            if (t->shift != 0.0f && dir)
                for (int64_t i = 0; i < ne0; i++)
                    o[i] += t->shift * dir[i];
        }
    }
}

/* ------------------------------------------------------------------------------------------ */
/* Parallel slice generation                                                                  */
/* ------------------------------------------------------------------------------------------ */

typedef struct gm_job {
    const gm_config *cfg;
    const gm_tensor *t;
    const float *mult;
    const float *dir; /* --idle-bias direction, or NULL */
    int64_t rows, rows_per_slice;
    size_t row_bytes;
    uint64_t s0, s1; /* slices of this batch */
    uint8_t *out;    /* bytes of slice s0 start here */
    float *scratch;  /* rows_per_slice * ne0 floats */
    int tid, nthreads;
    int rc;
} gm_job;

static void *s_worker(void *arg) {
    gm_job *j = arg;
    int64_t ne0 = j->t->ne[0];
    for (uint64_t s = j->s0 + (uint64_t)j->tid; s < j->s1; s += (uint64_t)j->nthreads) {
        int64_t r0 = (int64_t)s * j->rows_per_slice;
        int64_t r1 = r0 + j->rows_per_slice < j->rows ? r0 + j->rows_per_slice : j->rows;
        s_fill_slice(j->cfg, j->t, s, r0, r1, j->scratch, j->mult, j->dir);
        uint8_t *dst = j->out + (size_t)(s - j->s0) * (size_t)j->rows_per_slice * j->row_bytes;
        int rc = kern_quantize_row_ref(j->t->type, j->scratch, dst, (r1 - r0) * ne0);
        if (rc) j->rc = rc;
    }
    return NULL;
}

/* ------------------------------------------------------------------------------------------ */
/* Progress                                                                                   */
/* ------------------------------------------------------------------------------------------ */

typedef struct gm_progress {
    bool tty;
    uint64_t total, done;
    double t0, last;
    int last_decile;
} gm_progress;

static double s_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void s_progress(gm_progress *p, uint64_t add, bool final) {
    p->done += add;
    double now = s_now(), el = now - p->t0;
    double frac = p->total ? (double)p->done / (double)p->total : 1.0;
    double mbs = el > 0 ? (double)p->done / 1e6 / el : 0;
    double eta = frac > 0 ? el / frac - el : 0;
    if (p->tty) {
        if (!final && now - p->last < 0.1) return;
        p->last = now;
        char bar[41];
        int k = (int)(frac * 40);
        for (int i = 0; i < 40; i++)
            bar[i] = i < k ? '#' : '.';
        bar[40] = 0;
        fprintf(stderr, "\r[%s] %5.1f%% %8.1f/%.1f MB %6.0f MB/s ETA %4.0fs", bar, 100 * frac,
                (double)p->done / 1e6, (double)p->total / 1e6, mbs, eta);
        if (final) fputc('\n', stderr);
    } else {
        int d = (int)(frac * 10);
        if (d == p->last_decile || (!final && p->total < (64u << 20))) return;
        p->last_decile = d;
        fprintf(stderr, "genmodel: %3.0f%% %.1f/%.1f MB, %.0f MB/s, %.1fs elapsed\n", 100 * frac,
                (double)p->done / 1e6, (double)p->total / 1e6, mbs, el);
    }
}

/* ------------------------------------------------------------------------------------------ */
/* Routing report                                                                             */
/* ------------------------------------------------------------------------------------------ */

static int s_cmp_desc(const void *a, const void *b) {
    float x = *(const float *)a, y = *(const float *)b;
    return x < y ? 1 : x > y ? -1 : 0;
}

/* Routes n_tok isotropic unit-RMS hidden states through every layer's router and prints how
 * often each expert fires, as a histogram over all (layer, expert) pairs. */
static int s_report_routing(const gm_config *c, const gm_tensor *plan, size_t n_plan,
                            stp_err *err) {
    const int n_tok = 2048;
    uint32_t ne = c->n_expert, k = c->n_expert_used, e = c->n_embd;
    float *w = malloc((size_t)ne * e * sizeof *w), *x = malloc((size_t)n_tok * e * sizeof *x);
    float *r = malloc(ne * sizeof *r), *sorted = malloc(ne * sizeof *sorted);
    float *mult = malloc(ne * sizeof *mult);
    uint32_t *cnt = malloc(ne * sizeof *cnt);
    static const double edges[] = {0.02, 0.05, 0.10, 0.14, 0.20, 0.30, 0.40, 0.60, 1.01};
    enum { NB = 9 };
    uint64_t hist[NB] = {0};
    double min_margin = INFINITY, max_abs = 0, sum_margin = 0;
    uint64_t n_margin = 0, n_cold = 0, n_hot = 0, n_all = 0;
    if (!w || !x || !r || !sorted || !mult || !cnt) {
        free(w), free(x), free(r), free(sorted), free(mult), free(cnt);
        return stp_err_set(err, STP_ENOMEM, "routing report: out of memory");
    }
    gm_rng rng;
    s_rng_seed(&rng, c->seed, "routing-report", 0);
    for (size_t i = 0; i < (size_t)n_tok * e; i++)
        x[i] = s_normal(&rng);
    for (size_t ti = 0; ti < n_plan; ti++) {
        const gm_tensor *t = &plan[ti];
        if (t->kind != GM_ROUTER) continue;
        s_skew_mult(c, t->layer, mult);
        int64_t rps = t->ne[0] >= GM_SLICE_ELEMS ? 1 : GM_SLICE_ELEMS / t->ne[0];
        for (int64_t s = 0; s * rps < t->ne[1]; s++) {
            int64_t r0 = s * rps, r1 = r0 + rps < t->ne[1] ? r0 + rps : t->ne[1];
            s_fill_slice(c, t, (uint64_t)s, r0, r1, w + r0 * e, mult, NULL);
        }
        memset(cnt, 0, ne * sizeof *cnt);
        for (int tok = 0; tok < n_tok; tok++) {
            const float *xt = x + (size_t)tok * e;
            for (uint32_t j = 0; j < ne; j++) {
                float acc = 0;
                for (uint32_t i = 0; i < e; i++)
                    acc += w[(size_t)j * e + i] * xt[i];
                r[j] = acc;
                sorted[j] = acc;
                if (fabs(acc) > max_abs) max_abs = fabs(acc);
            }
            qsort(sorted, ne, sizeof *sorted, s_cmp_desc);
            float kth = sorted[k - 1];
            if (k < ne) {
                double m = (double)sorted[k - 1] - (double)sorted[k];
                if (m < min_margin) min_margin = m;
                sum_margin += m;
                n_margin++;
            }
            for (uint32_t j = 0, got = 0; j < ne && got < k; j++)
                if (r[j] >= kth) cnt[j]++, got++;
        }
        for (uint32_t j = 0; j < ne; j++) {
            double f = (double)cnt[j] / n_tok;
            int b = 0;
            while (b < NB - 1 && f >= edges[b])
                b++;
            hist[b]++;
            n_all++;
            if (f < 0.14) n_cold++;
            if (f >= 0.40 && f <= 0.60) n_hot++;
        }
    }
    printf("routing report: %d random unit-RMS hidden states, %u layers x %u experts, top-%u, "
           "skew %.2f, router gain %.2f\n",
           n_tok, c->n_layer, ne, k, c->skew, c->router_gain);
    printf("  expert firing rate histogram (share of all layer-experts):\n");
    double lo = 0;
    for (int b = 0; b < NB; b++) {
        double pct = n_all ? 100.0 * (double)hist[b] / (double)n_all : 0;
        printf("  %5.1f%% - %5.1f%%  %6.1f%%  ", 100 * lo, b == NB - 1 ? 100.0 : 100 * edges[b],
               pct);
        for (int i = 0; i < (int)(pct / 2); i++)
            putchar('#');
        putchar('\n');
        lo = edges[b];
    }
    printf("  experts firing on <14%% of tokens: %.1f%%; on 40-60%%: %.1f%%\n",
           n_all ? 100.0 * (double)n_cold / (double)n_all : 0,
           n_all ? 100.0 * (double)n_hot / (double)n_all : 0);
    printf("  router logits: max |r| %.2f; top-k margin r[k-1]-r[k]: min %.2e, mean %.3f\n",
           max_abs, n_margin ? min_margin : 0.0, n_margin ? sum_margin / (double)n_margin : 0.0);
    free(w), free(x), free(r), free(sorted), free(mult), free(cnt);
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* Writing                                                                                    */
/* ------------------------------------------------------------------------------------------ */

static const char s_chatml[] =
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}";

static uint32_t s_file_type(stp_type t) {
    switch (t) {
    case STP_TYPE_F16: return 1;
    case STP_TYPE_Q4_0: return 2;
    case STP_TYPE_Q8_0: return 7;
    case STP_TYPE_BF16: return 32;
    default: return 0;
    }
}

static int s_write_meta(gguf_writer *w, const gm_config *c, const gm_vocab *v) {
    char name[160];
    if (c->name[0])
        snprintf(name, sizeof name, "%s", c->name);
    else
        snprintf(name, sizeof name, "SmallThinker-%s-random-seed%llu", c->preset,
                 (unsigned long long)c->seed);
    int rc = 0;
#define K(call)                                                                                    \
    do {                                                                                           \
        if (!rc) rc = (call);                                                                      \
    } while (0)
    K(gguf_writer_kv_str(w, "general.architecture", "smallthinker"));
    K(gguf_writer_kv_str(w, "general.type", "model"));
    K(gguf_writer_kv_str(w, "general.name", name));
    K(gguf_writer_kv_u32(w, "general.file_type", s_file_type(c->dtype)));
    K(gguf_writer_kv_u32(w, "general.alignment", GGUF_DEFAULT_ALIGNMENT));
    if (c->dtype == STP_TYPE_Q4_0 || c->dtype == STP_TYPE_Q8_0)
        K(gguf_writer_kv_u32(w, "general.quantization_version", 2));
    K(gguf_writer_kv_u32(w, "smallthinker.block_count", c->n_layer));
    K(gguf_writer_kv_u32(w, "smallthinker.context_length", c->n_ctx));
    K(gguf_writer_kv_u32(w, "smallthinker.embedding_length", c->n_embd));
    K(gguf_writer_kv_u32(w, "smallthinker.feed_forward_length", c->n_ff_exp));
    K(gguf_writer_kv_u32(w, "smallthinker.expert_feed_forward_length", c->n_ff_exp));
    K(gguf_writer_kv_u32(w, "smallthinker.attention.head_count", c->n_head));
    K(gguf_writer_kv_u32(w, "smallthinker.attention.head_count_kv", c->n_head_kv));
    K(gguf_writer_kv_u32(w, "smallthinker.attention.key_length", c->head_dim));
    K(gguf_writer_kv_u32(w, "smallthinker.attention.value_length", c->head_dim));
    K(gguf_writer_kv_f32(w, "smallthinker.rope.freq_base", c->rope_base));
    K(gguf_writer_kv_f32(w, "smallthinker.attention.layer_norm_rms_epsilon", c->rms_eps));
    K(gguf_writer_kv_u32(w, "smallthinker.expert_count", c->n_expert));
    K(gguf_writer_kv_u32(w, "smallthinker.expert_used_count", c->n_expert_used));
    if (c->gating != GM_GATING_NONE)
        K(gguf_writer_kv_u32(w, "smallthinker.expert_gating_func", (uint32_t)c->gating));
    if (c->sliding_window)
        K(gguf_writer_kv_u32(w, "smallthinker.attention.sliding_window", c->sliding_window));
    K(gguf_writer_kv_str(w, "tokenizer.ggml.model", "gpt2"));
    K(gguf_writer_kv_str(w, "tokenizer.ggml.pre", "qwen2"));
    K(gguf_writer_kv_arr_str(w, "tokenizer.ggml.tokens", (const char *const *)v->tokens, v->n));
    K(gguf_writer_kv_arr(w, "tokenizer.ggml.token_type", GGUF_VT_INT32, v->types, v->n));
    K(gguf_writer_kv_arr_str(w, "tokenizer.ggml.merges", (const char *const *)v->merges,
                             v->n_merges));
    K(gguf_writer_kv_u32(w, "tokenizer.ggml.bos_token_id", v->bos));
    K(gguf_writer_kv_u32(w, "tokenizer.ggml.eos_token_id", v->eos));
    K(gguf_writer_kv_u32(w, "tokenizer.ggml.padding_token_id", v->pad));
    K(gguf_writer_kv_bool(w, "tokenizer.ggml.add_bos_token", false));
    if (v->chat_template) K(gguf_writer_kv_str(w, "tokenizer.chat_template", s_chatml));
#undef K
    return rc;
}

static int s_write_tensor(gguf_writer *w, const gm_config *c, const gm_tensor *t, uint8_t *out,
                          float **scratch, const float *dir, gm_progress *prog, stp_err *err) {
    float mult[1024];
    float *multp = mult;
    float *heap = NULL;
    if (t->kind == GM_ROUTER) {
        if (c->n_expert > 1024 && !(multp = heap = malloc(c->n_expert * sizeof *heap)))
            return stp_err_set(err, STP_ENOMEM, "out of memory");
        s_skew_mult(c, t->layer, multp);
    }
    int64_t ne0 = t->ne[0], rows = t->ne[1] * t->ne[2] * t->ne[3];
    int64_t rps = ne0 >= GM_SLICE_ELEMS ? 1 : GM_SLICE_ELEMS / ne0;
    if (rps > rows) rps = rows;
    size_t row_bytes = tensor_type_row_size((uint32_t)t->type, ne0);
    uint64_t n_slices = (uint64_t)((rows + rps - 1) / rps);
    uint64_t batch = (uint64_t)c->threads * GM_SLICES_PER_THREAD;
    int rc = 0;
    for (uint64_t s0 = 0; s0 < n_slices && !rc; s0 += batch) {
        uint64_t s1 = s0 + batch < n_slices ? s0 + batch : n_slices;
        gm_job jobs[16];
        pthread_t th[16];
        int nt = c->threads;
        if ((uint64_t)nt > s1 - s0) nt = (int)(s1 - s0);
        for (int i = 0; i < nt; i++) {
            jobs[i] = (gm_job){.cfg = c,
                               .t = t,
                               .mult = multp,
                               .dir = dir,
                               .rows = rows,
                               .rows_per_slice = rps,
                               .row_bytes = row_bytes,
                               .s0 = s0,
                               .s1 = s1,
                               .out = out,
                               .scratch = scratch[i],
                               .tid = i,
                               .nthreads = nt};
        }
        bool threaded[16] = {false};
        for (int i = 1; i < nt; i++)
            threaded[i] = pthread_create(&th[i], NULL, s_worker, &jobs[i]) == 0;
        s_worker(&jobs[0]);
        for (int i = 1; i < nt; i++) {
            if (threaded[i])
                pthread_join(th[i], NULL);
            else
                s_worker(&jobs[i]);
        }
        for (int i = 0; i < nt; i++)
            if (jobs[i].rc)
                rc = stp_err_set(err, jobs[i].rc, "tensor '%s': cannot quantize to %s", t->name,
                                 tensor_type_name((uint32_t)t->type));
        int64_t r1 = (int64_t)s1 * rps < rows ? (int64_t)s1 * rps : rows;
        size_t nbytes = (size_t)(r1 - (int64_t)s0 * rps) * row_bytes;
        if (!rc) rc = gguf_writer_write(w, out, nbytes, err);
        if (!rc) s_progress(prog, nbytes, false);
    }
    free(heap);
    return rc;
}

int gm_run(const gm_config *c, stp_err *err) {
    gm_tensor *plan = calloc(3 + 10 * (size_t)c->n_layer, sizeof *plan);
    if (!plan) return stp_err_set(err, STP_ENOMEM, "out of memory");
    size_t n_plan = s_plan(c, plan);
    int rc = 0;
    gguf_writer *w = NULL;
    gm_vocab v = {0};
    uint8_t *out = NULL;
    float *scratch[16] = {0};
    float *dir = NULL;
    if (c->out) {
        rc = c->tokenizer_json ? gm_vocab_from_hf(&v, c->tokenizer_json, c->n_vocab, err)
                               : gm_vocab_synth(&v, c->n_vocab, err);
        if (rc) goto done;
        rc = gguf_writer_new(&w, c->out, err);
        if (rc) goto done;
        rc = s_write_meta(w, c, &v);
        gm_vocab_fini(&v);
        gm_progress prog = {.tty = isatty(2), .t0 = s_now(), .last_decile = -1};
        for (size_t i = 0; !rc && !c->vocab_only && i < n_plan; i++) {
            rc = gguf_writer_add_tensor(w, plan[i].name, plan[i].type, plan[i].n_dims, plan[i].ne);
            prog.total += tensor_type_row_size((uint32_t)plan[i].type, plan[i].ne[0]) *
                          (uint64_t)(plan[i].ne[1] * plan[i].ne[2] * plan[i].ne[3]);
        }
        if (rc) { /* the writer kept the detail; begin_data reports it */
            if (!gguf_writer_begin_data(w, err))
                stp_err_set(err, rc, "%s: cannot declare metadata/tensors", c->out);
            goto done;
        }
        rc = gguf_writer_begin_data(w, err);
        if (rc) goto done;
        if (!c->vocab_only) {
            /* Largest batch: threads * slices, each about GM_SLICE_ELEMS of F32 (upper bound). */
            size_t cap = (size_t)c->threads * GM_SLICES_PER_THREAD * GM_SLICE_ELEMS * 4;
            int64_t max_ne0 = 0;
            for (size_t i = 0; i < n_plan; i++)
                if (plan[i].ne[0] > max_ne0) max_ne0 = plan[i].ne[0];
            size_t scratch_elems =
                GM_SLICE_ELEMS > (size_t)max_ne0 ? GM_SLICE_ELEMS : (size_t)max_ne0;
            if ((size_t)max_ne0 * 4 * c->threads * GM_SLICES_PER_THREAD > cap)
                cap = (size_t)max_ne0 * 4 * c->threads * GM_SLICES_PER_THREAD;
            out = malloc(cap);
            for (int i = 0; i < c->threads && out; i++)
                if (!(scratch[i] = malloc(scratch_elems * sizeof(float)))) break;
            if (!out || !scratch[c->threads - 1]) {
                rc = stp_err_set(err, STP_ENOMEM, "out of memory for slice buffers");
                goto done;
            }
            if (c->idle_bias > 0 && !(dir = s_idle_dir(c))) {
                rc = stp_err_set(err, STP_ENOMEM, "out of memory");
                goto done;
            }
            for (size_t i = 0; !rc && i < n_plan; i++)
                rc = s_write_tensor(w, c, &plan[i], out, scratch, dir, &prog, err);
            if (rc) goto done;
            s_progress(&prog, 0, true);
        }
        rc = gguf_writer_finish(w, err);
        if (rc) goto done;
    }
    if (c->report_routing) rc = s_report_routing(c, plan, n_plan, err);
done:
    gguf_writer_destroy(&w);
    gm_vocab_fini(&v);
    for (int i = 0; i < 16; i++)
        free(scratch[i]);
    free(out);
    free(dir);
    free(plan);
    return rc;
}
