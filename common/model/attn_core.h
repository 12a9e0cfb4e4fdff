/* attn_core: the inner loop of attention for one query head, included twice: by attention.c
 * (generic code) and by attention_avx2.c (built with AVX2+FMA and vectorised). Both builds
 * compute in the same order, so they give the same bits: scores q·k in double as four partial
 * sums (dims i mod 4), softmax with libm exp in double, the value sum in double per dimension
 * in key order, one rounding to float at the end. A float16 cache (kh/vh instead of k/v) is
 * widened to float exactly as it is read, so the arithmetic is the same. */
#ifndef STP_ATTN_CORE_H
#define STP_ATTN_CORE_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>

#include "kern/kern.h"

typedef struct attn_head_args {
    const float *q;          /* (D) query, rotated */
    const float *k;          /* key of slot 0 for this kv head; slot s at k + s * stride */
    const float *v;          /* value of slot 0 for this kv head */
    const uint16_t *kh, *vh; /* the same in a float16 cache (k and v NULL) */
    int stride;              /* floats between slots */
    int cap;                 /* slots in the cache (position j lives in slot j % cap) */
    int lo, hi;              /* positions attended: lo..hi inclusive */
    int D;                   /* head dim (multiple of 4; <= 1024) */
    float *out;              /* (D) */
    double *sc;              /* (hi - lo + 1) scratch */
} attn_head_args;

void attn_head_generic(const attn_head_args *a);
void attn_head_avx2(const attn_head_args *a);

static inline double attn_core_dot(const float *q, const float *k, int D) {
    double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    for (int i = 0; i < D; i += 4) {
        s0 += (double)q[i] * (double)k[i];
        s1 += (double)q[i + 1] * (double)k[i + 1];
        s2 += (double)q[i + 2] * (double)k[i + 2];
        s3 += (double)q[i + 3] * (double)k[i + 3];
    }
    return (s0 + s1) + (s2 + s3);
}

static inline void attn_core_head(const attn_head_args *a) {
    const int D = a->D, n = a->hi - a->lo + 1;
    const double scale = 1.0 / sqrt((double)D);
    double *sc = a->sc;
    const int slot0 = a->lo % a->cap;
    double max = -INFINITY;
    float wide[1024]; /* a float16 row, widened */
    for (int j = 0, slot = slot0; j < n; j++, slot = slot + 1 == a->cap ? 0 : slot + 1) {
        const float *k = a->k ? a->k + (size_t)slot * a->stride : wide;
        if (!a->k)
            for (int i = 0; i < D; i++)
                wide[i] = kern_fp16_to_f32(a->kh[(size_t)slot * a->stride + i]);
        const double w = attn_core_dot(a->q, k, D) * scale;
        sc[j] = w;
        max = w > max ? w : max;
    }
    double sum = 0.0;
    for (int j = 0; j < n; j++) {
        sc[j] = exp(sc[j] - max);
        sum += sc[j];
    }
    double acc[1024];
    for (int i = 0; i < D; i++)
        acc[i] = 0.0;
    for (int j = 0, slot = slot0; j < n; j++, slot = slot + 1 == a->cap ? 0 : slot + 1) {
        const float *v = a->v ? a->v + (size_t)slot * a->stride : wide;
        if (!a->v)
            for (int i = 0; i < D; i++)
                wide[i] = kern_fp16_to_f32(a->vh[(size_t)slot * a->stride + i]);
        const double w = sc[j];
        for (int i = 0; i < D; i++)
            acc[i] += w * (double)v[i];
    }
    for (int i = 0; i < D; i++)
        a->out[i] = (float)(acc[i] / sum);
}

#endif
