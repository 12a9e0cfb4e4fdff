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
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *gi = img + (size_t)b * down_t_group_bytes(n_embd);
            const float *scales = (const float *)gi;
            const uint8_t *nib = gi + (size_t)n_embd * 4;
            uint8_t *qs = G + kern_q4x16_qoff(b), *sc = G + kern_q4x16_soff(nb, b);
            for (int i = 0; i < 16; i++) {
                /* the scale came from fp16 (widened exactly): back to the same fp16 bits */
                const stp_fp16 d = kern_f32_to_fp16(scales[16 * q + i]);
                memcpy(sc + 2 * i, &d, 2);
            }
            /* GGUF qs[m] of row r = nibble of neuron m | nibble of neuron m + 16 << 4; a
             * neuron's nibbles of rows r (low half: r < H) are bytes r mod H, contiguous */
            for (int m = 0; m < 16; m++) {
                const uint8_t *lo = nib + (size_t)m * H, *hi = nib + (size_t)(m + 16) * H;
                uint8_t *out = qs + 64 * (m / 4) + (m % 4);
                for (int i = 0; i < 16; i++) {
                    const int r = (int)(16 * q + i), k = r < H ? r : r - H, sh = r < H ? 0 : 4;
                    out[4 * i] = (uint8_t)(((lo[k] >> sh) & 0x0F) | (((hi[k] >> sh) & 0x0F) << 4));
                }
            }
        }
    }
}
