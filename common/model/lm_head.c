/* lm_head: the sparse LM head (sign sketch predictor, exact logits for C rows); see lm_head.h.
 *
 * Sketch layout: rows in groups of 32 (the last group padded with zero rows); per group, n_embd/8
 * steps of 32 bytes, byte k of step p = row k's sign bits of columns 8p..8p+7 (bit i: column
 * 8p+i, 1 when the weight is > 0). Tables per step p: 32 bytes for the low nibble (columns
 * 8p..8p+3) then 32 for the high one (8p+4..8p+7), each the same 16 entries twice (one per AVX2
 * lane): entry m = 64 + sum_i (bit i of m ? +xq : -xq) of the four columns, in [4, 124] since
 * |xq| <= 15. A step adds low + high (<= 248, one byte) per row; the sum over the steps minus 128
 * per step is the integer score sum_j xq_j * sign_j. */
#include "model/lm_head.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kern/kern.h"

#define LMH_GROUP 32
#define LMH_BIAS 64 /* per table entry */

struct lm_head {
    const model *m;
    int n_vocab, n_embd, n_groups, n_steps, C;
    uint8_t *bits; /* n_groups * n_steps * 32 */
    float *scale;  /* (n_groups * 32) mean |w| of each row, 0 for padding */
    uint8_t *tab;  /* n_steps * 64 */
    float *scores; /* (n_groups * 32) */
    float *work;   /* (n_vocab) selection scratch */
    int32_t *cidx; /* (cap) ids scoring at least the sampled threshold, ascending */
    float *csc;    /* (cap) their scores */
    int cap;
    float *fill;   /* logits to set to -INFINITY during the scoring section, or NULL */
    int32_t *rows; /* (C) */
    float *hn;     /* (n_embd) */
    uint8_t *xq;   /* activations for the exact rows */
    bool simd;
};

/* ---- sketch build -------------------------------------------------------------------------- */

typedef struct build_ctx {
    lm_head *h;
    const tensor_view *w;
    int fail;
} build_ctx;

static void s_build_worker(void *p, int ith, int nth) {
    build_ctx *b = p;
    lm_head *h = b->h;
    const int E = h->n_embd;
    float *row = malloc(sizeof(float) * (size_t)E);
    if (!row) {
        b->fail = 1;
        return;
    }
    long g0, g1;
    threadpool_chunk(h->n_groups, ith, nth, 1, &g0, &g1);
    for (long g = g0; g < g1; g++) {
        uint8_t *gb = h->bits + (size_t)g * h->n_steps * LMH_GROUP;
        for (int k = 0; k < LMH_GROUP; k++) {
            const long r = g * LMH_GROUP + k;
            if (r >= h->n_vocab) {
                for (int s = 0; s < h->n_steps; s++)
                    gb[(size_t)s * LMH_GROUP + k] = 0;
                h->scale[r] = 0.0f;
                continue;
            }
            kern_dequantize_row_ref(b->w->type, b->w->data + (size_t)r * b->w->row_bytes, row, E);
            double sa = 0;
            for (int s = 0; s < h->n_steps; s++) {
                uint8_t byte = 0;
                for (int i = 0; i < 8; i++) {
                    const float v = row[8 * s + i];
                    sa += fabsf(v);
                    byte |= (uint8_t)((v > 0.0f) << i);
                }
                gb[(size_t)s * LMH_GROUP + k] = byte;
            }
            h->scale[r] = (float)(sa / E);
        }
    }
    free(row);
}

int lm_head_new(lm_head **out, const compute_ctx *cc, const model *m, int n_candidates,
                stp_err *err) {
    *out = NULL;
    const tensor_view *w = &m->output;
    const int V = (int)w->n_rows, E = (int)w->n_cols;
    if (n_candidates < 1 || n_candidates > V)
        return stp_err_set(err, STP_EINVAL, "sparse LM head: %d candidates, not in 1..%d",
                           n_candidates, V);
    if (E % 8 != 0)
        return stp_err_set(err, STP_EUNSUPPORTED,
                           "sparse LM head: n_embd %d is not a multiple of 8", E);
    lm_head *h = calloc(1, sizeof *h);
    if (!h) return stp_err_set(err, STP_ENOMEM, "sparse LM head: out of memory");
    h->m = m;
    h->n_vocab = V;
    h->n_embd = E;
    h->n_groups = (V + LMH_GROUP - 1) / LMH_GROUP;
    h->n_steps = E / 8;
    h->C = n_candidates;
    const size_t R = (size_t)h->n_groups * LMH_GROUP;
    const size_t bits_bytes = R * (size_t)h->n_steps;
    h->bits = aligned_alloc(64, (bits_bytes + 63) & ~(size_t)63);
    h->scale = malloc(R * sizeof(float));
    h->tab = aligned_alloc(64, (size_t)h->n_steps * 64);
    h->scores = malloc(R * sizeof(float));
    h->work = malloc((size_t)V * sizeof(float));
    h->cap = 4 * n_candidates + 1024 < V ? 4 * n_candidates + 1024 : V;
    h->cidx = malloc((size_t)h->cap * sizeof(int32_t));
    h->csc = malloc((size_t)h->cap * sizeof(float));
    h->rows = malloc((size_t)n_candidates * sizeof(int32_t));
    h->hn = malloc((size_t)E * sizeof(float));
    h->xq = malloc(kern_act_size(w->type, E) + 64);
    if (!h->bits || !h->scale || !h->tab || !h->scores || !h->work || !h->cidx || !h->csc ||
        !h->rows || !h->hn || !h->xq) {
        lm_head_destroy(&h);
        return stp_err_set(err, STP_ENOMEM, "sparse LM head: out of memory");
    }
    build_ctx b = {h, w, 0};
    if (cc && cc->tp)
        threadpool_run(cc->tp, s_build_worker, &b);
    else
        s_build_worker(&b, 0, 1);
    if (b.fail) {
        lm_head_destroy(&h);
        return stp_err_set(err, STP_ENOMEM, "sparse LM head: out of memory");
    }
    h->simd = cc && cc->ops && strcmp(cc->ops->level, "ref") != 0;
    *out = h;
    return 0;
}

void lm_head_destroy(lm_head **self_p) {
    lm_head *h = *self_p;
    if (!h) return;
    free(h->bits);
    free(h->scale);
    free(h->tab);
    free(h->scores);
    free(h->work);
    free(h->cidx);
    free(h->csc);
    free(h->rows);
    free(h->hn);
    free(h->xq);
    free(h);
    *self_p = NULL;
}

int lm_head_candidates(const lm_head *h) {
    return h->C;
}
size_t lm_head_bytes(const lm_head *h) {
    return (size_t)h->n_groups * LMH_GROUP * ((size_t)h->n_steps + sizeof(float));
}
const float *lm_head_scores(const lm_head *h) {
    return h->scores;
}

/* ---- scoring ----------------------------------------------------------------------------------
 */

void lm_head_group_scores_ref(const uint8_t *bits, const uint8_t *tab, int n_embd, int32_t *out) {
    const int S = n_embd / 8;
    for (int k = 0; k < LMH_GROUP; k++) {
        int32_t acc = 0;
        for (int s = 0; s < S; s++) {
            const uint8_t b = bits[(size_t)s * LMH_GROUP + k];
            acc += tab[(size_t)s * 64 + (b & 15)] + tab[(size_t)s * 64 + 32 + (b >> 4)];
        }
        out[k] = acc - 2 * LMH_BIAS * S;
    }
}

/* The tables for hidden state hn: xq = round(hn * 15 / max|hn|). */
static void s_tables(lm_head *h, const float *hn) {
    const int E = h->n_embd;
    float amax = 0.0f;
    for (int j = 0; j < E; j++)
        amax = fabsf(hn[j]) > amax ? fabsf(hn[j]) : amax;
    const float id = amax > 0.0f ? 15.0f / amax : 0.0f;
    for (int s = 0; s < h->n_steps; s++) {
        for (int half = 0; half < 2; half++) {
            int q[4];
            for (int i = 0; i < 4; i++) {
                q[i] = (int)lrintf(hn[8 * s + 4 * half + i] * id);
                q[i] = q[i] > 15 ? 15 : q[i] < -15 ? -15 : q[i];
            }
            uint8_t *t = h->tab + (size_t)s * 64 + 32 * half;
            for (int mpat = 0; mpat < 16; mpat++) {
                int v = LMH_BIAS;
                for (int i = 0; i < 4; i++)
                    v += (mpat >> i & 1) ? q[i] : -q[i];
                t[mpat] = t[mpat + 16] = (uint8_t)v;
            }
        }
    }
}

static void s_score_worker(void *p, int ith, int nth) {
    lm_head *h = p;
    long g0, g1;
    threadpool_chunk(h->n_groups, ith, nth, 1, &g0, &g1);
    int32_t acc[LMH_GROUP];
    for (long g = g0; g < g1; g++) {
        const uint8_t *gb = h->bits + (size_t)g * h->n_steps * LMH_GROUP;
        if (h->simd)
            lm_head_group_scores_avx2(gb, h->tab, h->n_embd, acc);
        else
            lm_head_group_scores_ref(gb, h->tab, h->n_embd, acc);
        float *sc = h->scores + (size_t)g * LMH_GROUP;
        const float *sl = h->scale + (size_t)g * LMH_GROUP;
        for (int k = 0; k < LMH_GROUP; k++)
            sc[k] = sl[k] * (float)acc[k];
    }
    if (h->fill) {
        const long r0 = g0 * LMH_GROUP,
                   r1 = g1 * LMH_GROUP < h->n_vocab ? g1 * LMH_GROUP : h->n_vocab;
        for (long r = r0; r < r1; r++)
            h->fill[r] = -INFINITY;
    }
}

/* The k-th largest of v[0..n) (k in 1..n); v is reordered. Quickselect, median of three. */
static float s_kth_largest(float *v, int n, int k) {
    int lo = 0, hi = n - 1, want = k - 1;
    while (lo < hi) {
        const int mid = lo + (hi - lo) / 2;
        float a = v[lo], b = v[mid], c = v[hi];
        float piv = a > b ? (b > c ? b : (a > c ? c : a)) : (a > c ? a : (b > c ? c : b));
        int i = lo, j = hi;
        while (i <= j) {
            while (v[i] > piv)
                i++;
            while (v[j] < piv)
                j--;
            if (i <= j) {
                float t = v[i];
                v[i] = v[j];
                v[j] = t;
                i++;
                j--;
            }
        }
        if (want <= j)
            hi = j;
        else if (want >= i)
            lo = i;
        else
            return v[want];
    }
    return v[want];
}

/* The C largest of the n scores sc (ids id, ascending) into rows, ascending: those above the
 * C-th largest value, then those equal to it from the lowest id. work: n floats. */
static int s_take(const float *sc, const int32_t *id, int n, int C, float *work, int32_t *rows) {
    memcpy(work, sc, sizeof(float) * (size_t)n);
    const float thr = s_kth_largest(work, n, C);
    int n_above = 0;
    for (int i = 0; i < n; i++)
        n_above += sc[i] > thr;
    int ties = C - n_above, k = 0;
    for (int i = 0; i < n && k < C; i++)
        if (sc[i] > thr || (sc[i] == thr && ties-- > 0)) rows[k++] = id ? id[i] : i;
    return k;
}

/* Top-C of the vocabulary's scores. A threshold from every 8th score (its rank ~1.3 C in the
 * whole) bounds the candidates: the ids at or above it (at least C of them, else the exact
 * selection over all) hold every id of the top C, so the result is the exact top C. */
static int s_select(lm_head *h, int32_t *rows) {
    const int V = h->n_vocab, C = h->C;
    const int ns = (V + 7) / 8, ks = C / 8 + C / 32 + 16;
    if (ks < ns) {
        for (int i = 0, j = 0; i < V; i += 8)
            h->work[j++] = h->scores[i];
        const float t0 = s_kth_largest(h->work, ns, ks);
        int n = 0;
        for (int i = 0; i < V; i++) {
            if (!(h->scores[i] >= t0)) continue;
            if (n == h->cap) {
                n = -1;
                break;
            }
            h->cidx[n] = i;
            h->csc[n++] = h->scores[i];
        }
        if (n >= C) return s_take(h->csc, h->cidx, n, C, h->work, rows);
    }
    return s_take(h->scores, NULL, V, C, h->work, rows);
}

static int s_predict(lm_head *h, const compute_ctx *cc, const float *x, int32_t *rows,
                     float *fill) {
    const model *m = h->m;
    ops_rmsnorm(x, m->output_norm, h->hn, h->n_embd, m->cfg.rms_eps);
    s_tables(h, h->hn);
    h->fill = fill;
    if (cc && cc->tp && (size_t)h->n_groups * LMH_GROUP * h->n_steps >= 64 * 1024)
        threadpool_run(cc->tp, s_score_worker, h); /* smaller sketches: cheaper inline */
    else
        s_score_worker(h, 0, 1);
    h->fill = NULL;
    if (h->C >= h->n_vocab) {
        for (int i = 0; i < h->n_vocab; i++)
            rows[i] = i;
        return h->n_vocab;
    }
    return s_select(h, rows);
}

int lm_head_predict(lm_head *h, const compute_ctx *cc, const float *x, int32_t *rows) {
    return s_predict(h, cc, x, rows, NULL);
}

void lm_head_eval(lm_head *h, const compute_ctx *cc, const float *x, float *logits) {
    const tensor_view *w = &h->m->output;
    const int n = s_predict(h, cc, x, h->rows, logits);
    ops_quantize_acts(cc, w->type, h->hn, w->n_cols, 1, h->xq);
    const mm_job j = {
        .type = w->type,
        .n_cols = w->n_cols,
        .w = w->data,
        .row_bytes = w->row_bytes,
        .xq = h->xq,
        .n_vec = 1,
        .y = logits,
        .n_rows = n,
        .rows = h->rows,
    };
    ops_mm_run(cc, &j, 1);
}
