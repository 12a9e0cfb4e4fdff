/* down_t (avx2 level): the ReGLU-sparse product over the neuron-major `down` image (layout and
 * float order in kern.h), int16 row sums over the active neurons of a group, then one fma per
 * row and group. Built with -mavx2 -mfma -mf16c (file suffix): fmaf is the hardware
 * instruction. The avx512vnni kernel hands it the rows outside its whole 64-row blocks. */
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("O3") /* let the neuron loops vectorise */
#endif
#include "kern/kern_internal.h"

#include <immintrin.h>
#include <math.h>
#include <stdbool.h>
#include <string.h>

/* dst[i] = the fp16 src[i] as float, i < n (F16C, eight at a time). */
static void s_widen(const stp_fp16 *src, float *dst, int n) {
    int i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i))));
    for (; i < n; i++)
        dst[i] = _cvtsh_ss(src[i]);
}

int64_t kern_down_t_matvec_avx2(const uint8_t *img, int n_embd, int n_ff, const block_q8_0 *a,
                                float *y, int k0, int k1) {
    const int H = n_embd / 2, n = k1 - k0;
    int16_t isum_lo[KERN_DOWN_T_MAX_EMBD / 2],
        isum_hi[KERN_DOWN_T_MAX_EMBD / 2]; /* rows k, k + H */
    float acc_lo[KERN_DOWN_T_MAX_EMBD / 2], acc_hi[KERN_DOWN_T_MAX_EMBD / 2];
    float sc_lo[KERN_DOWN_T_MAX_EMBD / 2],
        sc_hi[KERN_DOWN_T_MAX_EMBD / 2]; /* a group's scales, widened */
    int64_t computed = 0;
    for (int k = 0; k < n; k++)
        acc_lo[k] = acc_hi[k] = 0.0f;
    for (int g = 0; g < n_ff / 32; g++) {
        const block_q8_0 *ab = &a[g];
        const uint8_t *gimg = img + (size_t)g * kern_down_t_group_bytes(n_embd);
        bool any = false;
        for (int j = 0; j < 32; j++) {
            const int qa = ab->qs[j];
            if (!qa) continue;
            if (!any) {
                memset(isum_lo, 0, sizeof(int16_t) * n);
                memset(isum_hi, 0, sizeof(int16_t) * n);
                any = true;
            }
            const uint8_t *nj = gimg + (size_t)n_embd * 2 + (size_t)j * H + k0;
            for (int k = 0; k < n; k++) {
                isum_lo[k] += (int16_t)(((nj[k] & 0x0F) - 8) * qa);
                isum_hi[k] += (int16_t)(((nj[k] >> 4) - 8) * qa);
            }
            computed++;
        }
        if (!any) continue; /* fma(0, s, acc) == acc: an all-zero group changes nothing */
        const float da = kern_fp16_to_f32(ab->d);
        const stp_fp16 *sc = (const stp_fp16 *)gimg;
        s_widen(sc + k0, sc_lo, n);
        s_widen(sc + k0 + H, sc_hi, n);
        for (int k = 0; k < n; k++) {
            acc_lo[k] = fmaf((float)isum_lo[k], sc_lo[k] * da, acc_lo[k]);
            acc_hi[k] = fmaf((float)isum_hi[k], sc_hi[k] * da, acc_hi[k]);
        }
    }
    for (int k = 0; k < n; k++) {
        y[k0 + k] = acc_lo[k];
        y[k0 + k + H] = acc_hi[k];
    }
    return computed;
}
