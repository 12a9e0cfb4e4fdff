/* down_t: neuron-major Q4_0 `down` layout and its sparse product; see down_t.h.
 * Built with -mavx2 -mfma (file suffix): fmaf must be the hardware instruction. Callers use it
 * only when the CPU has AVX2+FMA (kern level other than "ref"). */
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("O3") /* let the neuron loops vectorise */
#endif
#include "model/down_t.h"

#include <immintrin.h>
#include <math.h>
#include <stdbool.h>
#include <string.h>

size_t down_t_expert_bytes(stp_type type, int n_embd, int n_ff) {
    if (type != STP_TYPE_Q4_0 || n_ff % 32 || n_embd % 2 || n_embd > DOWN_T_MAX_EMBD ||
        n_ff > DOWN_T_MAX_FF)
        return 0;
    return (size_t)(n_ff / 32) * down_t_group_bytes(n_embd);
}

void down_t_build_expert(const tensor_view *down, int64_t e, uint8_t *dst) {
    const int n_embd = (int)down->n_rows, n_ff = (int)down->n_cols, H = n_embd / 2;
    const uint8_t *base = down->data + (size_t)e * down->mat_bytes;
    for (int g = 0; g < n_ff / 32; g++) {
        uint8_t *img = dst + (size_t)g * down_t_group_bytes(n_embd);
        stp_fp16 *scales = (stp_fp16 *)img;
        uint8_t *nib = img + (size_t)n_embd * 2;
        for (int r = 0; r < n_embd; r++) {
            const block_q4_0 *b = (const block_q4_0 *)(base + (size_t)r * down->row_bytes) + g;
            scales[r] = b->d;
        }
        for (int j = 0; j < 32; j++) {
            uint8_t *nj = nib + (size_t)j * H;
            for (int k = 0; k < H; k++) {
                const block_q4_0 *lo = (const block_q4_0 *)(base + (size_t)k * down->row_bytes) + g;
                const block_q4_0 *hi =
                    (const block_q4_0 *)(base + (size_t)(k + H) * down->row_bytes) + g;
                uint8_t ql = j < 16 ? lo->qs[j] & 0x0F : lo->qs[j - 16] >> 4;
                uint8_t qh = j < 16 ? hi->qs[j] & 0x0F : hi->qs[j - 16] >> 4;
                nj[k] = (uint8_t)(ql | (qh << 4));
            }
        }
    }
}

/* dst[i] = the fp16 src[i] as float, i < n (F16C, eight at a time). */
static void s_widen(const stp_fp16 *src, float *dst, int n) {
    int i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i))));
    for (; i < n; i++)
        dst[i] = _cvtsh_ss(src[i]);
}

int64_t down_t_matvec_avx2(const uint8_t *img, int n_embd, int n_ff, const block_q8_0 *a, float *y,
                           int k0, int k1) {
    const int H = n_embd / 2, n = k1 - k0;
    int16_t isum_lo[DOWN_T_MAX_EMBD / 2], isum_hi[DOWN_T_MAX_EMBD / 2]; /* rows k, k + H */
    float acc_lo[DOWN_T_MAX_EMBD / 2], acc_hi[DOWN_T_MAX_EMBD / 2];
    float sc_lo[DOWN_T_MAX_EMBD / 2], sc_hi[DOWN_T_MAX_EMBD / 2]; /* a group's scales, widened */
    int64_t computed = 0;
    for (int k = 0; k < n; k++)
        acc_lo[k] = acc_hi[k] = 0.0f;
    for (int g = 0; g < n_ff / 32; g++) {
        const block_q8_0 *ab = &a[g];
        const uint8_t *gimg = img + (size_t)g * down_t_group_bytes(n_embd);
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

int64_t down_t_matvec(const uint8_t *img, int n_embd, int n_ff, const block_q8_0 *a, float *y,
                      int k0, int k1) {
    static _Atomic int vnni = -1; /* the kernel level decides, once */
    int v = vnni;
    if (v < 0) vnni = v = !strcmp(kern_ops_get()->level, "avx512vnni");
    return v ? down_t_matvec_avx512(img, n_embd, n_ff, a, y, k0, k1)
             : down_t_matvec_avx2(img, n_embd, n_ff, a, y, k0, k1);
}
