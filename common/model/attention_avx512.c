/* attention_avx512: the AVX-512 build of the attention chunk kernel (attn_flash.h): 16 floats per
 * vector, fused multiply-add, float16 rows widened 16 at a time in registers. */
#include <immintrin.h>

#include "model/attn_core.h"

#define AF_W 16
#define AF_NAME attn_group_avx512
#define AF_FMA(a, b, c) ((af_v)_mm512_fmadd_ps((__m512)(a), (__m512)(b), (__m512)(c)))

#define AF_LOADH(p) ((af_v)_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p))))

#include "model/attn_flash.h"
