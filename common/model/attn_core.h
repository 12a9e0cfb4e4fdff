/* attn_core: attention over the KV cache for the query heads of one KV group, flash-attention
 * style. Why: the group's heads share every key and value row they read (GQA), one pass over the
 * cache with a running max and sum needs no score row per query, and fixed position chunks let
 * threads split one token's attention without changing its bits.
 *
 * A query (token at position p, the G heads of KV group g) attends positions lo..hi. Positions
 * are cut into chunks of ATTN_CHUNK at absolute multiples, each chunk into tiles of ATTN_TILE.
 * The chunk kernel (attn_group_{generic,avx2,avx512}, built from attn_flash.h) returns the
 * chunk's partial result: per head the max m, the sum s of exp(score - m) and the value sum acc.
 * Scores, exp and each tile's sums are float SIMD; the max is raised once per tile and each
 * tile's sums are added to s and acc in double (a float running sum over thousands of positions
 * drifted 0.13 logits at 4k context on golden B long; rounding the result near-exactly keeps
 * Q8_0 rounding flips downstream as rare as llama.cpp's near-exact sums do). attn_merge_add()
 * folds chunks, always in position order, in double, and attn_merge_out() rounds once. The bits of
 * a query depend only on its q, the cache and lo..hi: not on the thread count, on which thread ran
 * a chunk, nor on batched prefill vs token-by-token decode. attn_head_ref() is the plain reference
 * (two passes, all in double) the tests hold the kernels to.
 *
 * One call may take several KV groups (n_grp: whole cached rows read in position order, the
 * stream the prefetchers follow) and several queries (n_q: a prefill's consecutive tokens share
 * each row read); each head's and query's arithmetic is that of a call of its own, so the bits
 * do not depend on how heads and tokens are grouped. */
#ifndef STP_ATTN_CORE_H
#define STP_ATTN_CORE_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>

#include "kern/kern.h"

#define ATTN_TILE 32   /* positions per online-softmax step */
#define ATTN_CHUNK 256 /* positions per partial result (a multiple of ATTN_TILE) */
#define ATTN_NQ 4      /* queries (tokens) at most that share one pass over the rows */

typedef struct attn_group_args {
    const float *q;            /* (n_grp * G, D) the groups' query heads, rotated, contiguous */
    int G, D;                  /* heads per group; head dim (multiple of 4, <= 1024) */
    int n_grp;                 /* consecutive kv heads (groups) done in one pass over the rows
                                * (0 means 1): group i's heads are q's heads i*G.., its keys and
                                * values i * D elements further in a row; the bits of each head
                                * are those of a one-group call */
    const float *k, *v;        /* key / value of slot 0 for this kv head; slot s at + s * stride */
    const uint16_t *kh, *vh;   /* the same in a float16 cache (k and v NULL) */
    const block_q8_0 *kq, *vq; /* a Q8_0 cache: slot 0's row (all kv heads; k, v, kh, vh NULL) */
    int qoff;                  /* Q8_0: this kv head's first element in a row (blocks of 32 over
                                * the row, as ggml's, so one may straddle two heads if D < 32) */
    int stride;                /* elements between slots */
    int cap;                   /* slots in the cache (position j lives in slot j % cap) */
    int lo, hi;                /* positions the query attends: lo..hi inclusive (n_q > 1: the
                                * lowest qlo and the highest qhi) */
    int n_q;                   /* queries sharing each row read (0 means 1, at most ATTN_NQ):
                                * query i's heads at q + i * q_stride, attending qlo[i]..qhi[i];
                                * its partial and result follow query i-1's (n_grp * G heads
                                * each); a query's bits are those of a call of its own */
    int q_stride;
    int qlo[ATTN_NQ], qhi[ATTN_NQ];
    int c0, c1;          /* the chunk: positions c0..c1-1 */
    int pf_end;          /* rows are requested ahead up to hi, or below pf_end if > 0 (the
                          * end of the chunks this thread runs next) */
    double *m, *s, *acc; /* out: the chunk's partial, (n_q * n_grp * G), (..), (.., D) */
    float *work;         /* scratch of attn_work_floats(G, D, n_grp) floats, 64-byte aligned */
} attn_group_args;

typedef void (*attn_group_fn)(const attn_group_args *a);
void attn_group_generic(const attn_group_args *a);
void attn_group_avx2(const attn_group_args *a);
void attn_group_avx512(const attn_group_args *a);
/* The same kernel with its rows requested into L1, nearer ahead (attention_l1_avx512.c): the
 * same bits, another speed (the faster one depends on the host: attention.c picks). */
void attn_group_avx512_l1(const attn_group_args *a);

/* Elements e0..e0+n-1 of a Q8_0 row as floats: d * q, exact in float (an 8-bit integer times a
 * half has at most 19 significant bits), so every build gets the same floats and the kernel's
 * Q8_0 path gives the bits of its float32 path fed the dequantized cache. */
static inline void attn_dequant_q8_0(float *dst, const block_q8_0 *row, size_t e0, int n) {
    for (int i = 0; i < n;) {
        const size_t e = e0 + (size_t)i;
        const int j0 = (int)(e % QK8_0), m = QK8_0 - j0 < n - i ? QK8_0 - j0 : n - i;
        const block_q8_0 *b = row + e / QK8_0;
        const float d = kern_fp16_to_f32(b->d);
        for (int j = 0; j < m; j++)
            dst[i + j] = (float)b->qs[j0 + j] * d;
        i += m;
    }
}

/* Element i (counted from slot 0's first element of this kv head) of the cache in whichever type
 * is set (Q8_0: qoff elements further from the row base). */
static inline float attn_cache_elem(const float *f, const uint16_t *h, const block_q8_0 *q,
                                    int qoff, size_t i) {
    if (f) return f[i];
    if (h) return kern_fp16_to_f32(h[i]);
    float x;
    attn_dequant_q8_0(&x, q, (size_t)qoff + i, 1);
    return x;
}

/* Floats of scratch a chunk kernel needs for n_grp groups of G heads (scores of a tile for up to
 * ATTN_NQ queries, a tile of dequantized Q8_0 rows of n_grp kv heads). */
static inline size_t attn_work_floats(int G, int D, int n_grp) {
    return ((size_t)ATTN_NQ * n_grp * G * ATTN_TILE + 2 * (size_t)ATTN_TILE * n_grp * D + 15) &
           ~(size_t)15;
}

/* The merge state of one query in double: M (G), S (G), A (G, D). */
static inline size_t attn_merge_doubles(int G, int D) {
    return 2 * (size_t)G + (size_t)G * D;
}

static inline void attn_merge_init(double *st, int G, int D) {
    for (int h = 0; h < G; h++)
        st[h] = -INFINITY, st[G + h] = 0.0;
    for (size_t i = 0; i < (size_t)G * D; i++)
        st[2 * G + i] = 0.0;
}

/* Folds one chunk's partial (m, s, acc) into the state. Chunks must come in position order. */
static inline void attn_merge_add(double *st, int G, int D, const double *m, const double *s,
                                  const double *acc) {
    for (int h = 0; h < G; h++) {
        if (m[h] == -INFINITY) continue; /* no position of this chunk */
        const double mn = st[h] > m[h] ? st[h] : m[h];
        const double a1 = exp(st[h] - mn), a2 = exp(m[h] - mn);
        st[h] = mn;
        st[G + h] = st[G + h] * a1 + s[h] * a2;
        double *A = st + 2 * G + (size_t)h * D;
        const double *x = acc + (size_t)h * D;
        for (int i = 0; i < D; i++)
            A[i] = A[i] * a1 + x[i] * a2;
    }
}

/* out (G, D) = A / S, rounded once. */
static inline void attn_merge_out(const double *st, int G, int D, float *out) {
    for (int h = 0; h < G; h++)
        for (int i = 0; i < D; i++)
            out[(size_t)h * D + i] = (float)(st[2 * G + (size_t)h * D + i] / st[G + h]);
}

/* One whole query (or n_q): every chunk of lo..hi in order through fn, merged in st
 * (attn_merge_doubles of n_q * n_grp * G heads), the result in out (n_q * n_grp * G, D). a->m,
 * a->s, a->acc receive each chunk. A chunk outside a query's range leaves its heads' m at -inf,
 * which the merge skips. */
static inline void attn_group_query(attn_group_fn fn, attn_group_args *a, double *st, float *out) {
    const int GH = (a->n_q > 1 ? a->n_q : 1) * (a->n_grp > 0 ? a->n_grp : 1) * a->G;
    attn_merge_init(st, GH, a->D);
    for (int c = a->lo / ATTN_CHUNK; c <= a->hi / ATTN_CHUNK; c++) {
        a->c0 = c * ATTN_CHUNK;
        a->c1 = a->c0 + ATTN_CHUNK;
        fn(a);
        attn_merge_add(st, GH, a->D, a->m, a->s, a->acc);
    }
    attn_merge_out(st, GH, a->D, out);
}

/* The reference for one head h of a: scores, softmax (libm exp) and the value sum in double,
 * in position order, two passes; sc holds hi - lo + 1 doubles. */
static inline void attn_head_ref(const attn_group_args *a, int h, float *out, double *sc) {
    const int D = a->D, n = a->hi - a->lo + 1;
    const float *q = a->q + (size_t)h * D;
    const double scale = 1.0 / sqrt((double)D);
    double max = -INFINITY, sum = 0.0;
    for (int j = 0; j < n; j++) {
        const size_t row = (size_t)((a->lo + j) % a->cap) * a->stride;
        double d = 0.0;
        for (int i = 0; i < D; i++)
            d += (double)q[i] * (double)attn_cache_elem(a->k, a->kh, a->kq, a->qoff, row + i);
        sc[j] = d * scale;
        max = sc[j] > max ? sc[j] : max;
    }
    for (int j = 0; j < n; j++) {
        sc[j] = exp(sc[j] - max);
        sum += sc[j];
    }
    for (int i = 0; i < D; i++) {
        double acc = 0.0;
        for (int j = 0; j < n; j++) {
            const size_t row = (size_t)((a->lo + j) % a->cap) * a->stride;
            acc += sc[j] * (double)attn_cache_elem(a->v, a->vh, a->vq, a->qoff, row + i);
        }
        out[i] = (float)(acc / sum);
    }
}

#endif
