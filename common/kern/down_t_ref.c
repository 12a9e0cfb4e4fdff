/* down_t (reference): the ReGLU-sparse product over the neuron-major `down` image, plain C, one
 * row at a time. Layout and float order in kern.h; the SIMD levels (down_t_avx2.c,
 * down_t_avx512.c) give the same bits and are tested against this one. fmaf is written out (the
 * build's -std=c11 turns contraction off), as in the other references. */
#include <math.h>

#include "kern/kern_internal.h"

int64_t kern_down_t_matvec_ref(const uint8_t *img, int n_embd, int n_ff, const block_q8_0 *a,
                               float *y, int k0, int k1) {
    const int H = n_embd / 2;
    const size_t gbytes = kern_down_t_group_bytes(n_embd);
    int64_t computed = 0;
    for (int k = k0; k < k1; k++)
        y[k] = y[k + H] = 0.0f;
    for (int g = 0; g < n_ff / 32; g++) {
        const stp_fp16 *sc = (const stp_fp16 *)(img + (size_t)g * gbytes);
        const uint8_t *nib = img + (size_t)g * gbytes + (size_t)n_embd * 2;
        int active = 0;
        for (int j = 0; j < 32; j++)
            active += a[g].qs[j] != 0;
        if (!active) continue; /* fma(0, s, acc) == acc: an idle group changes nothing */
        computed += active;
        const float da = kern_fp16_to_f32(a[g].d);
        for (int k = k0; k < k1; k++) {
            int32_t lo = 0, hi = 0; /* rows k and k + H */
            for (int j = 0; j < 32; j++) {
                const int qa = a[g].qs[j], q = nib[(size_t)j * H + k];
                lo += ((q & 0x0F) - 8) * qa;
                hi += ((q >> 4) - 8) * qa;
            }
            y[k] = fmaf((float)lo, kern_fp16_to_f32(sc[k]) * da, y[k]);
            y[k + H] = fmaf((float)hi, kern_fp16_to_f32(sc[k + H]) * da, y[k + H]);
        }
    }
    return computed;
}
