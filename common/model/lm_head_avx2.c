/* lm_head (avx2 level): one group of 32 rows' sign-sketch sums with pshufb table lookups; the
 * same integers as lm_head_group_scores_ref (layout in lm_head.c). Per step: 32 bytes (one per
 * row) split into nibbles, each nibble indexes its 16-entry table (duplicated per lane), the two
 * lookups (<= 124 each) add in one byte, then widen to 16 bits. 16-bit sums are flushed to 32 bits
 * every 256 steps (256 * 248 < 65536). */
#include <immintrin.h>

#include "model/lm_head.h"

void lm_head_group_scores_avx2(const uint8_t *bits, const uint8_t *tab, int n_embd, int32_t *out) {
    const int S = n_embd / 8;
    const __m256i m4 = _mm256_set1_epi8(0x0F), zero = _mm256_setzero_si256();
    __m256i t0 = zero, t1 = zero, t2 = zero, t3 = zero; /* 32-bit totals */
    for (int s0 = 0; s0 < S; s0 += 256) {
        const int s1 = S - s0 < 256 ? S : s0 + 256;
        __m256i a0 = zero, a1 = zero; /* rows 0-7,16-23 and 8-15,24-31 */
        for (int s = s0; s < s1; s++) {
            const __m256i v = _mm256_load_si256((const __m256i *)(bits + (size_t)s * 32));
            const __m256i tl = _mm256_load_si256((const __m256i *)(tab + (size_t)s * 64));
            const __m256i th = _mm256_load_si256((const __m256i *)(tab + (size_t)s * 64 + 32));
            const __m256i lo = _mm256_and_si256(v, m4);
            const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
            const __m256i sum =
                _mm256_add_epi8(_mm256_shuffle_epi8(tl, lo), _mm256_shuffle_epi8(th, hi));
            a0 = _mm256_add_epi16(a0, _mm256_unpacklo_epi8(sum, zero));
            a1 = _mm256_add_epi16(a1, _mm256_unpackhi_epi8(sum, zero));
        }
        t0 = _mm256_add_epi32(t0, _mm256_unpacklo_epi16(a0, zero)); /* rows 0-3, 16-19 */
        t1 = _mm256_add_epi32(t1, _mm256_unpackhi_epi16(a0, zero)); /* rows 4-7, 20-23 */
        t2 = _mm256_add_epi32(t2, _mm256_unpacklo_epi16(a1, zero)); /* rows 8-11, 24-27 */
        t3 = _mm256_add_epi32(t3, _mm256_unpackhi_epi16(a1, zero)); /* rows 12-15, 28-31 */
    }
    const __m256i bias = _mm256_set1_epi32(128 * S);
    int32_t tmp[4][8];
    _mm256_storeu_si256((__m256i *)tmp[0], _mm256_sub_epi32(t0, bias));
    _mm256_storeu_si256((__m256i *)tmp[1], _mm256_sub_epi32(t1, bias));
    _mm256_storeu_si256((__m256i *)tmp[2], _mm256_sub_epi32(t2, bias));
    _mm256_storeu_si256((__m256i *)tmp[3], _mm256_sub_epi32(t3, bias));
    for (int q = 0; q < 4; q++)
        for (int i = 0; i < 4; i++) {
            out[4 * q + i] = tmp[q][i];
            out[16 + 4 * q + i] = tmp[q][4 + i];
        }
}
