/* attention_avx2: the AVX2 build of one attention head (attn_core.h), with the two inner loops
 * written with intrinsics in exactly the generic code's order of operations: the q·k dot as
 * four double partial sums over dims i mod 4 combined as (s0 + s1) + (s2 + s3), each product a
 * separate multiply and add (no fused multiply-add, as the generic C without contraction), and
 * the value sum per dimension in key order. So both builds give the same bits. */
#include <immintrin.h>

#include "model/attn_core.h"

static inline double s_dot(const float *q, const float *k, int D) {
    __m256d acc = _mm256_setzero_pd();
    for (int i = 0; i < D; i += 4) {
        __m256d qv = _mm256_cvtps_pd(_mm_loadu_ps(q + i));
        __m256d kv = _mm256_cvtps_pd(_mm_loadu_ps(k + i));
        acc = _mm256_add_pd(acc, _mm256_mul_pd(qv, kv));
    }
    double s[4];
    _mm256_storeu_pd(s, acc);
    return (s[0] + s[1]) + (s[2] + s[3]);
}

void attn_head_avx2(const attn_head_args *a) {
    const int D = a->D, n = a->hi - a->lo + 1, cap = a->cap;
    const double scale = 1.0 / sqrt((double)D);
    double *sc = a->sc;
    const int slot0 = a->lo % cap;
    double max = -INFINITY;
    for (int j = 0, slot = slot0; j < n; j++, slot = slot + 1 == cap ? 0 : slot + 1) {
        const double w = s_dot(a->q, a->k + (size_t)slot * a->stride, D) * scale;
        sc[j] = w;
        max = w > max ? w : max;
    }
    double sum = 0.0;
    for (int j = 0; j < n; j++) {
        sc[j] = exp(sc[j] - max);
        sum += sc[j];
    }
    /* 32 dimensions at a time: 8 accumulators stay in registers over all keys */
    for (int i0 = 0; i0 < D; i0 += 32) {
        const int w = D - i0 < 32 ? D - i0 : 32; /* a multiple of 4 */
        __m256d acc[8];
        for (int r = 0; r < 8; r++) acc[r] = _mm256_setzero_pd();
        for (int j = 0, slot = slot0; j < n; j++, slot = slot + 1 == cap ? 0 : slot + 1) {
            const float *v = a->v + (size_t)slot * a->stride + i0;
            const __m256d wj = _mm256_set1_pd(sc[j]);
            for (int r = 0; r < w / 4; r++)
                acc[r] = _mm256_add_pd(acc[r], _mm256_mul_pd(wj, _mm256_cvtps_pd(_mm_loadu_ps(v + 4 * r))));
        }
        double out[32];
        for (int r = 0; r < w / 4; r++) _mm256_storeu_pd(out + 4 * r, acc[r]);
        for (int i = 0; i < w; i++) a->out[i0 + i] = (float)(out[i] / sum);
    }
}
