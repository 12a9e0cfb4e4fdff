/* attention_avx512: the AVX-512 build of the attention chunk kernel (attn_flash.h): 16 floats per
 * vector, fused multiply-add, float16 rows widened 16 at a time. */
#include <immintrin.h>

#include "model/attn_core.h"

#define AF_W 16
#define AF_NAME attn_group_avx512
#define AF_FMA(a, b, c) ((af_v)_mm512_fmadd_ps((__m512)(a), (__m512)(b), (__m512)(c)))

static inline void s_widen(float *dst, const uint16_t *src, int n) {
    int i = 0;
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(src + i))));
    for (; i < n; i++)
        dst[i] = kern_fp16_to_f32(src[i]);
}
#define AF_WIDEN(dst, src, n) s_widen(dst, src, n)

#include "model/attn_flash.h"
