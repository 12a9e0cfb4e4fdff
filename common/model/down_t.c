/* down_t: building the neuron-major `down` image of an expert from its GGUF rows, and packing
 * an image back into the row-interleaved q4_0x16 layout, so a prefill (many tokens per expert)
 * can run the batched packed kernel on an expert whose pool slot holds only the down_t image.
 * Byte moves only: plain C, and SSE2 (every x86-64) for the pack a prefill runs per step (the
 * products are in common/kern). See down_t.h. */
#include "model/down_t.h"

#include <string.h>
#ifdef __SSE2__
#include <emmintrin.h>
#endif

#include "kern/kern_internal.h"

size_t down_t_expert_bytes(stp_type type, int n_embd, int n_ff) {
    if (type != STP_TYPE_Q4_0 || n_ff % 32 || n_embd % 2 || n_embd > KERN_DOWN_T_MAX_EMBD ||
        n_ff > KERN_DOWN_T_MAX_FF)
        return 0;
    return (size_t)(n_ff / 32) * kern_down_t_group_bytes(n_embd);
}

void down_t_build_expert(const tensor_view *down, int64_t e, uint8_t *dst) {
    const int n_embd = (int)down->n_rows, n_ff = (int)down->n_cols, H = n_embd / 2;
    const uint8_t *base = down->data + (size_t)e * down->mat_bytes;
    for (int g = 0; g < n_ff / 32; g++) {
        uint8_t *img = dst + (size_t)g * kern_down_t_group_bytes(n_embd);
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

void down_t_pack_x16(const uint8_t *img, int n_embd, int n_ff, int64_t r0, int64_t r1,
                     uint8_t *dst) {
    const int H = n_embd / 2;
    const int64_t nb = n_ff / 32;
    const size_t gstride = kern_q4_0x16_size(16, n_ff);
    for (int64_t q = r0 / 16; q < r1 / 16; q++) {
        uint8_t *G = dst + (size_t)(q - r0 / 16) * gstride;
        /* rows 16q..16q+15 lie in one half (H is a multiple of 16): a neuron's nibbles of them
         * are 16 consecutive bytes, low nibbles for the first half, high for the second */
        const int k0 = (int)(16 * q) < H ? (int)(16 * q) : (int)(16 * q) - H;
        const int sh = (int)(16 * q) < H ? 0 : 4;
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *gi = img + (size_t)b * kern_down_t_group_bytes(n_embd);
            const stp_fp16 *scales = (const stp_fp16 *)gi;
            const uint8_t *nib = gi + (size_t)n_embd * 2;
            uint8_t *qs = G + kern_q4x16_qoff(b), *sc = G + kern_q4x16_soff(nb, b);
            memcpy(sc, scales + 16 * q, 32); /* rows 16q..16q+15's fp16 scales, as they are */
            /* GGUF qs[m] of a row = neuron m | neuron m + 16 << 4; q4_0x16 keeps qs[4kk..4kk+3]
             * of row i at 64 kk + 4 i */
#ifdef __SSE2__
            /* c[m] byte i = row 16q + i's qs[m]; each kk interleaves c[4kk..4kk+3] byte-wise */
            const __m128i m4 = _mm_set1_epi8(0x0F), vsh = _mm_cvtsi32_si128(sh);
            __m128i c[16];
            for (int m = 0; m < 16; m++) {
                const __m128i a = _mm_loadu_si128((const __m128i *)(nib + (size_t)m * H + k0));
                const __m128i a16 =
                    _mm_loadu_si128((const __m128i *)(nib + (size_t)(m + 16) * H + k0));
                c[m] = _mm_or_si128(_mm_and_si128(_mm_srl_epi16(a, vsh), m4),
                                    _mm_slli_epi16(_mm_and_si128(_mm_srl_epi16(a16, vsh), m4), 4));
            }
            for (int kk = 0; kk < 4; kk++) {
                const __m128i *v = &c[4 * kk];
                const __m128i ab0 = _mm_unpacklo_epi8(v[0], v[1]),
                              ab1 = _mm_unpackhi_epi8(v[0], v[1]);
                const __m128i cd0 = _mm_unpacklo_epi8(v[2], v[3]),
                              cd1 = _mm_unpackhi_epi8(v[2], v[3]);
                __m128i *o = (__m128i *)(qs + 64 * kk);
                _mm_storeu_si128(o, _mm_unpacklo_epi16(ab0, cd0));
                _mm_storeu_si128(o + 1, _mm_unpackhi_epi16(ab0, cd0));
                _mm_storeu_si128(o + 2, _mm_unpacklo_epi16(ab1, cd1));
                _mm_storeu_si128(o + 3, _mm_unpackhi_epi16(ab1, cd1));
            }
#else
            uint8_t t[32][16]; /* nibble of neuron j for row 16q + i */
            for (int j = 0; j < 32; j++) {
                memcpy(t[j], nib + (size_t)j * H + k0, 16);
                for (int i = 0; i < 16; i++)
                    t[j][i] = (uint8_t)((t[j][i] >> sh) & 0x0F);
            }
            for (int kk = 0; kk < 4; kk++)
                for (int i = 0; i < 16; i++)
                    for (int mm = 0; mm < 4; mm++) {
                        const int m = 4 * kk + mm;
                        qs[64 * kk + 4 * i + mm] = (uint8_t)(t[m][i] | (t[m + 16][i] << 4));
                    }
#endif
        }
    }
}
