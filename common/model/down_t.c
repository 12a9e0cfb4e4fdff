/* down_t (generic build): packing a neuron-major `down` image back into the row-interleaved
 * q4_0x16 layout, so a prefill (many tokens per expert) can run the batched packed kernel on
 * an expert whose pool slot holds only the down_t image. Plain C: no SIMD flags needed. */
#include "model/down_t.h"

#include <string.h>

#include "kern/kern_internal.h"

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
            const uint8_t *gi = img + (size_t)b * down_t_group_bytes(n_embd);
            const stp_fp16 *scales = (const stp_fp16 *)gi;
            const uint8_t *nib = gi + (size_t)n_embd * 2;
            uint8_t *qs = G + kern_q4x16_qoff(b), *sc = G + kern_q4x16_soff(nb, b);
            memcpy(sc, scales + 16 * q, 32); /* rows 16q..16q+15's fp16 scales, as they are */
            uint8_t t[32][16];               /* nibble of neuron j for row 16q + i */
            for (int j = 0; j < 32; j++) {
                memcpy(t[j], nib + (size_t)j * H + k0, 16);
                for (int i = 0; i < 16; i++)
                    t[j][i] = (uint8_t)((t[j][i] >> sh) & 0x0F);
            }
            /* GGUF qs[m] of a row = neuron m | neuron m + 16 << 4; q4_0x16 keeps qs[4kk..4kk+3]
             * of row i at 64 kk + 4 i */
            for (int kk = 0; kk < 4; kk++)
                for (int i = 0; i < 16; i++)
                    for (int mm = 0; mm < 4; mm++) {
                        const int m = 4 * kk + mm;
                        qs[64 * kk + 4 * i + mm] = (uint8_t)(t[m][i] | (t[m + 16][i] << 4));
                    }
        }
    }
}
