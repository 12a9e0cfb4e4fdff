/* attention_avx2: the AVX2+FMA build of the attention chunk kernel (attn_flash.h): 8 floats per
 * vector, fused multiply-add, float16 rows widened with F16C in registers. */
#include <immintrin.h>

#include "model/attn_core.h"

#define AF_W 8
#define AF_NAME attn_group_avx2
#define AF_FMA(a, b, c) ((af_v)_mm256_fmadd_ps((__m256)(a), (__m256)(b), (__m256)(c)))

#define AF_LOADH(p) ((af_v)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p))))

#include "model/attn_flash.h"
