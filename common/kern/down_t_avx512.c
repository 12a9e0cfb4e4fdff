/* down_t (avx512vnni level): the ReGLU-sparse down product over the neuron-major image with
 * vpdpbusd, four neurons at a time. See kern.h for the layout and the float order.
 *
 * For 64 row pairs (k, k + n_embd/2) and a quad of active neurons A..D of group g, the four
 * neurons' nibble bytes are interleaved (unpack 8 then 16 bits) so each dword holds one row's
 * four nibbles, and vpdpbusd adds nibble * qa for all four into that row's int32 sum. The
 * nibbles are unsigned (0..15), so sum (n - 8) * qa = sum n * qa - 8 * sum qa: one subtraction
 * per group, the same exact integer as the avx2 kernel's. The unpacks leave rows in the order
 * [0-3 | 16-19 | 32-35 | 48-51] in the first accumulator, [4-7 | ...] in the second, ...; a
 * 4x4 transpose of 128-bit lanes restores row order before the float step, which is then
 * acc_r = fma((float)isum_r, d[r][g] * d_a[g], acc_r) per group in order, as in down_t_avx2.c.
 * Ranges of k that are not a whole number of 64-blocks finish in the avx2 kernel (this level's
 * table holds avx2's entries for everything it does not specialise, and the same bits). */
#include <immintrin.h>
#include <string.h>

#include "kern/kern_internal.h"

/* One group's active neurons, in quads: quad q has the neurons at nib + off[4q..4q+3] and the
 * weights w[q]; the last quad is padded with neuron off[0] again at weight 0. */
typedef struct dt_group {
    int g, nq, na;      /* group index, quads, active neurons (off[na..4 nq) is padding) */
    int32_t sum_qa;     /* sum of the active neurons' qa */
    float da;           /* the activation block's scale */
    const uint8_t *nib; /* neuron 0's nibbles of this group */
    int32_t off[32];    /* byte offset of each quad member's nibbles from nib (padded) */
    int32_t w[8];       /* per quad: qa of A | B << 8 | C << 16 | D << 24 */
} dt_group;

/* The 4x4 transpose of 128-bit lanes: out[L] = lane L of in[0..3], in order. */
static inline void s_transpose_lanes(__m512i in[4], __m512i out[4]) {
    const __m512i t0 = _mm512_shuffle_i32x4(in[0], in[1], 0x44);
    const __m512i t1 = _mm512_shuffle_i32x4(in[0], in[1], 0xEE);
    const __m512i t2 = _mm512_shuffle_i32x4(in[2], in[3], 0x44);
    const __m512i t3 = _mm512_shuffle_i32x4(in[2], in[3], 0xEE);
    out[0] = _mm512_shuffle_i32x4(t0, t2, 0x88);
    out[1] = _mm512_shuffle_i32x4(t0, t2, 0xDD);
    out[2] = _mm512_shuffle_i32x4(t1, t3, 0x88);
    out[3] = _mm512_shuffle_i32x4(t1, t3, 0xDD);
}

/* acc[0..4) += the quad's four neurons' nibbles (x, already masked to 0..15) times w. */
static inline void s_quad(__m512i acc[4], __m512i a, __m512i b, __m512i c, __m512i d, __m512i w) {
    const __m512i ab0 = _mm512_unpacklo_epi8(a, b), ab1 = _mm512_unpackhi_epi8(a, b);
    const __m512i cd0 = _mm512_unpacklo_epi8(c, d), cd1 = _mm512_unpackhi_epi8(c, d);
    acc[0] = _mm512_dpbusd_epi32(acc[0], _mm512_unpacklo_epi16(ab0, cd0), w);
    acc[1] = _mm512_dpbusd_epi32(acc[1], _mm512_unpackhi_epi16(ab0, cd0), w);
    acc[2] = _mm512_dpbusd_epi32(acc[2], _mm512_unpacklo_epi16(ab1, cd1), w);
    acc[3] = _mm512_dpbusd_epi32(acc[3], _mm512_unpackhi_epi16(ab1, cd1), w);
}

/* fma of the 64 rows' exact sums (in lane order, minus 8 * sum qa) into acc[0..64). */
static inline void s_fma_rows(__m512i isum[4], int32_t sum_qa, const stp_fp16 *sc, float da,
                              float *acc) {
    __m512i rows[4];
    s_transpose_lanes(isum, rows);
    const __m512i off = _mm512_set1_epi32(8 * sum_qa);
    const __m512 vda = _mm512_set1_ps(da);
    for (int L = 0; L < 4; L++) {
        const __m512 s =
            _mm512_mul_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(sc + 16 * L))), vda);
        const __m512 x = _mm512_cvtepi32_ps(_mm512_sub_epi32(rows[L], off));
        _mm512_storeu_ps(acc + 16 * L, _mm512_fmadd_ps(x, s, _mm512_loadu_ps(acc + 16 * L)));
    }
}

/* The 64-byte lines a group's product reads from rows [k0, k0 + n) and their + H partners: its
 * scales, then each active neuron's bytes (one line per row block, 768 bytes apart for the 4b,
 * which the hardware prefetchers do not follow on their own). Returns the count. */
static int s_group_lines(const dt_group *G, const uint8_t *img, size_t gbytes, int k0, int n, int H,
                         const char **out) {
    const char *sc = (const char *)(img + (size_t)G->g * gbytes);
    int m = 0;
    for (int c = 0; c < 2 * n; c += 64) {
        out[m++] = sc + 2 * (size_t)k0 + c;
        out[m++] = sc + 2 * (size_t)(k0 + H) + c;
    }
    for (int j = 0; j < G->na; j++) {
        const char *p = (const char *)G->nib + G->off[j] + k0;
        for (int c = 0; c < n; c += 64)
            out[m++] = p + c;
    }
    return m;
}

int64_t kern_down_t_matvec_avx512(const uint8_t *img, int n_embd, int n_ff, const block_q8_0 *a,
                                  float *y, int k0, int k1) {
    const int H = n_embd / 2, nblk = (k1 - k0) / 64, kb = k0 + 64 * nblk;
    const size_t gbytes = kern_down_t_group_bytes(n_embd);
    int64_t computed = 0;
    if (nblk > 0) {
        /* the active neurons of each group, in quads (the last padded with qa = 0) */
        const int ngroups = n_ff / 32;
        dt_group groups[KERN_DOWN_T_MAX_FF / 32];
        int ng = 0;
        for (int g = 0; g < ngroups; g++) {
            const block_q8_0 *ab = &a[g];
            dt_group *G = &groups[ng];
            /* compacted without a branch (about half the neurons are active, in no predictable
             * order): every neuron is written at slot n, which advances past the active ones */
            uint8_t q[32];
            int n = 0;
            int32_t sum = 0;
            for (int j = 0; j < 32; j++) {
                const int qa = ab->qs[j];
                G->off[n] = j * H;
                q[n] = (uint8_t)qa;
                sum += qa;
                n += qa != 0;
            }
            if (!n) continue;
            computed += n;
            G->na = n;
            for (; n & 3; n++) { /* pad: the first active neuron again, weight 0 */
                G->off[n] = G->off[0];
                q[n] = 0;
            }
            for (int k = 0; k < n / 4; k++)
                G->w[k] = (int32_t)((uint32_t)q[4 * k] | (uint32_t)q[4 * k + 1] << 8 |
                                    (uint32_t)q[4 * k + 2] << 16 | (uint32_t)q[4 * k + 3] << 24);
            G->g = g, G->nq = n / 4, G->sum_qa = sum;
            G->da = kern_fp16_to_f32(ab->d);
            G->nib = img + (size_t)g * gbytes + (size_t)n_embd * 2;
            ng++;
        }
        const __m512i m4 = _mm512_set1_epi8(0x0F);
        const int n = 64 * nblk;
        float acc_lo[KERN_DOWN_T_MAX_EMBD / 2], acc_hi[KERN_DOWN_T_MAX_EMBD / 2];
        memset(acc_lo, 0, sizeof(float) * n);
        memset(acc_hi, 0, sizeof(float) * n);
        /* group by group (in order: the float steps' order); the next group's lines are
         * prefetched a few per quad step of this one */
        const char *pf[KERN_DOWN_T_MAX_EMBD / 16 + KERN_DOWN_T_MAX_EMBD / 4]; /* scales, neurons */
        int npf = 0, ipf = 0;
        if (ng) {
            npf = s_group_lines(&groups[0], img, gbytes, k0, n, H, pf);
            for (int j = 0; j < npf; j++)
                _mm_prefetch(pf[j], _MM_HINT_T0);
        }
        for (int i = 0; i < ng; i++) {
            const dt_group *G = &groups[i];
            const stp_fp16 *sc = (const stp_fp16 *)(img + (size_t)G->g * gbytes);
            npf = ipf = 0;
            if (i + 1 < ng) npf = s_group_lines(&groups[i + 1], img, gbytes, k0, n, H, pf);
            const int per = (npf + G->nq * nblk - 1) / (G->nq * nblk);
            for (int blk = 0; blk < nblk; blk++) {
                const int k = k0 + 64 * blk;
                __m512i lo[4], hi[4];
                for (int r = 0; r < 4; r++)
                    lo[r] = hi[r] = _mm512_setzero_si512();
                const uint8_t *nib = G->nib + k;
                for (int q = 0; q < G->nq; q++) {
                    const int32_t *o = &G->off[4 * q];
                    const __m512i va = _mm512_loadu_si512(nib + o[0]);
                    const __m512i vb = _mm512_loadu_si512(nib + o[1]);
                    const __m512i vc = _mm512_loadu_si512(nib + o[2]);
                    const __m512i vd = _mm512_loadu_si512(nib + o[3]);
                    const __m512i w = _mm512_set1_epi32(G->w[q]);
                    for (int e = 0; e < per && ipf < npf; e++)
                        _mm_prefetch(pf[ipf++], _MM_HINT_T1);
                    s_quad(lo, _mm512_and_si512(va, m4), _mm512_and_si512(vb, m4),
                           _mm512_and_si512(vc, m4), _mm512_and_si512(vd, m4), w);
                    s_quad(hi, _mm512_and_si512(_mm512_srli_epi16(va, 4), m4),
                           _mm512_and_si512(_mm512_srli_epi16(vb, 4), m4),
                           _mm512_and_si512(_mm512_srli_epi16(vc, 4), m4),
                           _mm512_and_si512(_mm512_srli_epi16(vd, 4), m4), w);
                }
                s_fma_rows(lo, G->sum_qa, sc + k, G->da, acc_lo + 64 * blk);
                s_fma_rows(hi, G->sum_qa, sc + k + H, G->da, acc_hi + 64 * blk);
            }
        }
        memcpy(y + k0, acc_lo, sizeof(float) * n);
        memcpy(y + k0 + H, acc_hi, sizeof(float) * n);
    }
    if (kb < k1) {
        const int64_t c = kern_down_t_matvec_avx2(img, n_embd, n_ff, a, y, kb, k1);
        if (nblk == 0) computed = c;
    }
    return computed;
}
