/* sampler: greedy and temperature sampling with the usual filters; see sampler.h. */
#include "model/sampler.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

typedef struct cand {
    int32_t id;
    float logit;
    float p;
} cand;

struct sampler {
    sampler_params p;
    int n_vocab;
    uint64_t rng[2];
    cand *c;
    cand *tmp;     /* (n_vocab) the radix sort's other buffer, allocated on first use */
    int32_t *hist; /* ring of the last penalty_last_n tokens */
    int hist_n, hist_pos;
    int32_t *count; /* (n_vocab) occurrences in hist */
};

void sampler_params_default(sampler_params *p) {
    memset(p, 0, sizeof *p);
    p->temperature = 0.0f;
    p->top_p = 1.0f;
    p->repeat_penalty = 1.0f;
    p->penalty_last_n = 64;
    p->seed = 0x5eed;
}

static uint64_t s_splitmix(uint64_t *x) {
    uint64_t z = (*x += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* xoroshiro128+ uniform in [0, 1) */
static double s_uniform(uint64_t s[2]) {
    uint64_t s0 = s[0], s1 = s[1], r = s0 + s1;
    s1 ^= s0;
    s[0] = ((s0 << 24) | (s0 >> 40)) ^ s1 ^ (s1 << 16);
    s[1] = (s1 << 37) | (s1 >> 27);
    return (double)(r >> 11) * (1.0 / 9007199254740992.0);
}

int sampler_new(sampler **out, const sampler_params *p, int n_vocab, stp_err *err) {
    *out = NULL;
    sampler *s = calloc(1, sizeof *s);
    if (!s) return stp_err_set(err, STP_ENOMEM, "sampler: out of memory");
    s->p = *p;
    if (s->p.penalty_last_n < 0) s->p.penalty_last_n = 0;
    s->n_vocab = n_vocab;
    s->c = malloc(sizeof(cand) * (size_t)n_vocab);
    s->count = calloc((size_t)n_vocab, sizeof(int32_t));
    s->hist = malloc(sizeof(int32_t) * (size_t)(s->p.penalty_last_n + 1));
    if (!s->c || !s->count || !s->hist) {
        sampler_destroy(&s);
        return stp_err_set(err, STP_ENOMEM, "sampler: out of memory");
    }
    uint64_t x = p->seed;
    s->rng[0] = s_splitmix(&x);
    s->rng[1] = s_splitmix(&x);
    *out = s;
    return 0;
}

void sampler_destroy(sampler **self_p) {
    sampler *s = *self_p;
    if (!s) return;
    free(s->c);
    free(s->tmp);
    free(s->count);
    free(s->hist);
    free(s);
    *self_p = NULL;
}

void sampler_reset(sampler *s) {
    memset(s->count, 0, sizeof(int32_t) * (size_t)s->n_vocab);
    s->hist_n = s->hist_pos = 0;
}

void sampler_accept(sampler *s, int32_t id) {
    int cap = s->p.penalty_last_n;
    if (cap <= 0 || id < 0 || id >= s->n_vocab) return;
    if (s->hist_n == cap) {
        s->count[s->hist[s->hist_pos]]--;
    } else {
        s->hist_n++;
    }
    s->hist[s->hist_pos] = id;
    s->count[id]++;
    s->hist_pos = (s->hist_pos + 1) % cap;
}

/* The first index of the largest logit, NaNs skipped (a NaN first logit: 0), as the plain loop
 * `if (logits[i] > logits[best]) best = i` gives it. That loop reloads logits[best] through the
 * index it just chose, a chain of ~6 cycles per logit (0.5 ms a token on a 151936-token
 * vocabulary); here the maximum is taken in 8 independent lanes, then its first index found. */
int32_t sampler_argmax(const float *logits, int n) {
    float m[8];
    for (int j = 0; j < 8; j++)
        m[j] = logits[0];
    int i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++)
            m[j] = logits[i + j] > m[j] ? logits[i + j] : m[j];
    float max = m[0];
    for (int j = 1; j < 8; j++)
        max = m[j] > max ? m[j] : max;
    for (; i < n; i++)
        max = logits[i] > max ? logits[i] : max;
    for (i = 0; i < n; i++)
        if (logits[i] == max) return i;
    return 0; /* logits[0] is NaN */
}

static int s_cmp_cand(const void *a, const void *b) {
    const cand *x = a, *y = b;
    if (x->logit != y->logit) return x->logit > y->logit ? -1 : 1;
    return x->id - y->id;
}

static int s_cmp_id(const void *a, const void *b) {
    return ((const cand *)a)->id - ((const cand *)b)->id;
}

/* Min-heap on (logit, then higher id first) so the root is the worst kept candidate. */
static bool s_worse(const cand *a, const cand *b) {
    return a->logit < b->logit || (a->logit == b->logit && a->id > b->id);
}

static void s_sift_down(cand *h, int n, int i) {
    for (;;) {
        int l = 2 * i + 1, r = l + 1, m = i;
        if (l < n && s_worse(&h[l], &h[m])) m = l;
        if (r < n && s_worse(&h[r], &h[m])) m = r;
        if (m == i) return;
        cand t = h[i];
        h[i] = h[m];
        h[m] = t;
        i = m;
    }
}

/* The sort key of a logit: unsigned order = descending logit (-0 as +0, as == compares). */
static uint32_t s_key(float f) {
    uint32_t u;
    if (f == 0.0f) f = 0.0f;
    memcpy(&u, &f, sizeof u);
    u = u & 0x80000000u ? ~u : u | 0x80000000u; /* ascending float order */
    return ~u;
}

/* s->c[0..n) in s_cmp_cand's order (logit descending, then id ascending). Many candidates (a
 * filter-less draw keeps most of the vocabulary): a stable LSD radix sort on the logit's key, 11
 * bits a pass, over candidates that come in id order, so equal logits stay in id order: the
 * order qsort gives, ~10x sooner than qsort on 151k candidates. Others (a top-k heap's, not in
 * id order, or few): qsort. */
static void s_sort(sampler *s, int n, bool id_order) {
    if (!id_order || n < 4096 ||
        (!s->tmp && !(s->tmp = malloc(sizeof(cand) * (size_t)s->n_vocab)))) {
        qsort(s->c, (size_t)n, sizeof(cand), s_cmp_cand);
        return;
    }
    cand *a = s->c, *b = s->tmp;
    for (int shift = 0; shift < 32; shift += 11) {
        int count[2049] = {0};
        for (int i = 0; i < n; i++)
            count[((s_key(a[i].logit) >> shift) & 2047) + 1]++;
        for (int d = 0; d < 2048; d++)
            count[d + 1] += count[d];
        for (int i = 0; i < n; i++)
            b[count[(s_key(a[i].logit) >> shift) & 2047]++] = a[i];
        cand *t = a;
        a = b;
        b = t;
    }
    if (a != s->c) memcpy(s->c, a, sizeof(cand) * (size_t)n); /* three passes: an odd count */
}

/* Fills s->c with the candidates the filters can keep; returns their count and sets *best to
 * the highest logit. With top-k: a size-k heap over the vocabulary (O(n log k)). Without: every
 * token whose logit is within 30 * max(1, T) of the best (the rest has relative probability
 * below e^-30 after temperature). Best first when top-p or min-p will read the order, else in id
 * order: the draw then walks them by id, which samples the same distribution without sorting
 * (on a 151936-token vocabulary ~2x sooner), and the same set gives the same draws with or
 * without top-k. */
static int s_candidates(sampler *s, const float *logits, float *best) {
    const sampler_params *p = &s->p;
    const int V = s->n_vocab;
    int n = 0;
    if (p->top_k > 0 && p->top_k < V) {
        const int k = p->top_k;
        int i = 0;
        for (; i < V && n < k; i++) {
            s->c[n++] = (cand){i, logits[i], 0};
            if (n == k)
                for (int j = k / 2 - 1; j >= 0; j--)
                    s_sift_down(s->c, k, j);
        }
        /* A later token (a higher id) beats the root, the worst kept, only with a higher logit
         * (s_worse); a block of 16 whose maximum is not above it has none (a NaN maximum: the
         * block is looked at token by token, where NaN never wins). */
        float worst = s->c[0].logit; /* n == k < V here */
        for (; i < V; i += 16) {
            const int e = V - i < 16 ? V : i + 16;
            float m = logits[i];
            for (int j = i + 1; j < e; j++)
                m = logits[j] > m ? logits[j] : m;
            if (m <= worst) continue;
            for (int j = i; j < e; j++)
                if (logits[j] > worst) {
                    s->c[0] = (cand){j, logits[j], 0};
                    s_sift_down(s->c, k, 0);
                    worst = s->c[0].logit;
                }
        }
    } else {
        float max = logits[0];
        for (int i = 1; i < V; i++)
            max = logits[i] > max ? logits[i] : max;
        const float floor = max - 30.0f * (p->temperature > 1.0f ? p->temperature : 1.0f);
        for (int i = 0; i < V; i++)
            if (logits[i] >= floor) s->c[n++] = (cand){i, logits[i], 0};
    }
    const bool heap = p->top_k > 0 && p->top_k < V;
    if (p->top_p >= 1.0f && p->min_p <= 0.0f) { /* no filter reads the order: id order */
        if (heap) qsort(s->c, (size_t)n, sizeof(cand), s_cmp_id);
        *best = s->c[0].logit;
        for (int i = 1; i < n; i++)
            *best = s->c[i].logit > *best ? s->c[i].logit : *best;
        return n;
    }
    s_sort(s, n, !heap);
    *best = s->c[0].logit;
    return n;
}

int32_t sampler_sample(sampler *s, float *logits) {
    const sampler_params *p = &s->p;
    /* penalties over the recent history (llama.cpp's rule: divide positive logits) */
    if (s->hist_n > 0 && (p->repeat_penalty != 1.0f || p->presence_penalty != 0.0f ||
                          p->frequency_penalty != 0.0f)) {
        for (int i = 0; i < s->hist_n; i++) {
            int32_t id = s->hist[i];
            if (s->count[id] <= 0) continue;
            float *l = &logits[id];
            /* each distinct id once: mark by negating its count, restore below */
            if (p->repeat_penalty != 1.0f)
                *l = *l > 0 ? *l / p->repeat_penalty : *l * p->repeat_penalty;
            *l -= (float)s->count[id] * p->frequency_penalty + p->presence_penalty;
            s->count[id] = -s->count[id];
        }
        for (int i = 0; i < s->hist_n; i++)
            if (s->count[s->hist[i]] < 0) s->count[s->hist[i]] = -s->count[s->hist[i]];
    }
    if (p->temperature <= 0.0f) return sampler_argmax(logits, s->n_vocab);

    float best;
    int n = s_candidates(s, logits, &best);
    double sum = 0;
    if (p->top_p < 1.0f || p->min_p > 0.0f) {
        /* softmax for the filters: c[i].p = exp(logit - best), each normalised where a filter
         * reads it, (float)(p / sum) */
        for (int i = 0; i < n; i++) {
            s->c[i].p = expf(s->c[i].logit - s->c[0].logit);
            sum += s->c[i].p;
        }
        if (p->top_p < 1.0f) {
            double cum = 0;
            int keep = n;
            for (int i = 0; i < n; i++) {
                cum += (float)(s->c[i].p / sum);
                if (cum >= p->top_p) {
                    keep = i + 1;
                    break;
                }
            }
            n = keep;
        }
        if (p->min_p > 0.0f) {
            float thr = (float)(s->c[0].p / sum) * p->min_p;
            int keep = 1;
            while (keep < n && (float)(s->c[keep].p / sum) >= thr)
                keep++;
            n = keep;
        }
    }
    /* temperature, then draw */
    sum = 0;
    for (int i = 0; i < n; i++) {
        s->c[i].p = expf((s->c[i].logit - best) / p->temperature);
        sum += s->c[i].p;
    }
    double r = s_uniform(s->rng) * sum, acc = 0;
    for (int i = 0; i < n; i++) {
        acc += s->c[i].p;
        if (r < acc) return s->c[i].id;
    }
    return s->c[n - 1].id;
}
