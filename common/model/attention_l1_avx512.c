/* attention_l1_avx512: the AVX-512 attention chunk kernel (attn_flash.h) with its cached rows
 * requested into L1 (prefetcht0) nearer ahead, 64 key rows and 32 value rows instead of
 * attention_avx512.c's 128 and 64 into L2. The same arithmetic, so the same bits; which of the
 * two a host runs is attention.c's choice (s_kernel), by CPU, because each measured faster on
 * a different kind of host (docs/BENCHMARKS.md, sessions 8 and 23). */
#include <immintrin.h>

#include "model/attn_core.h"

#define AF_W 16
#define AF_NAME attn_group_avx512_l1
#define AF_FMA(a, b, c) ((af_v)_mm512_fmadd_ps((__m512)(a), (__m512)(b), (__m512)(c)))

#define AF_LOADH(p) ((af_v)_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p))))

#define AF_PF(p) __asm__ volatile("prefetcht0 %0" : : "m"(*(const char *)(p)))
#define AF_PF_KD 64
#define AF_PF_VD 32

#include "model/attn_flash.h"
