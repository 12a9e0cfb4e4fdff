/* kern_avx512: AVX-512 (F/BW/VL/DQ) + VNNI kernels, the "avx512vnni" level.
 *
 * The decode hot path: Q4_0 and Q8_0 matvec/matmat with vpdpbusd, two 32-element blocks per
 * 512-bit register, 4 rows per pass, activations packed once per call (kern_pack.h) with the
 * Q4_0 "-8" / Q8_0 "+128" offsets folded into the accumulator's start value, so each block is
 * one exact integer dot product. The other types use the avx2 kernels (this level implies
 * AVX2). Results equal the reference up to float32 summation order. See README.md. */
#include <immintrin.h>
#include <stdlib.h>

#include "kern/kern_pack.h"

static inline float s_hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Two fp16 block scales (at p and p + stride) times two activation scales, spread to lanes
 * 0-7 and 8-15. */
static inline __m512 s_scales2(const uint8_t *p, size_t stride, __m128 dx2, __m512i idx) {
    const uint32_t dd = (uint32_t)kern_ld16(p) | ((uint32_t)kern_ld16(p + stride) << 16);
    const __m128 dw = _mm_cvtph_ps(_mm_cvtsi32_si128((int)dd));
    return _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(_mm_mul_ps(dw, dx2)));
}

/* One row's two-block step: acc += (dw*dx per lane) * (exact int dot of 64 quants). */
static inline __m512 s_q4_0_pair(const uint8_t *blk, __m512i xv, __m512i corr, __m128 dx2,
                                 __m512 acc) {
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    const __m512i shv = _mm512_set_epi64(4, 4, 0, 0, 4, 4, 0, 0);
    const __m512i idx = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    const __m256i q0 = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(blk + 2)));
    const __m256i q1 = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(blk + 20)));
    __m512i q = _mm512_inserti64x4(_mm512_castsi256_si512(q0), q1, 1);
    q = _mm512_and_si512(_mm512_srlv_epi64(q, shv), m4);
    const __m512i s = _mm512_dpbusd_epi32(corr, q, xv);
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), s_scales2(blk, 18, dx2, idx), acc);
}

static inline __m512 s_q8_0_pair(const uint8_t *blk, __m512i xv, __m512i corr, __m128 dx2,
                                 __m512 acc) {
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    const __m512i idx = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    const __m256i q0 = _mm256_loadu_si256((const __m256i *)(blk + 2));
    const __m256i q1 = _mm256_loadu_si256((const __m256i *)(blk + 36));
    const __m512i q = _mm512_xor_si512(_mm512_inserti64x4(_mm512_castsi256_si512(q0), q1, 1), flip);
    const __m512i s = _mm512_dpbusd_epi32(corr, q, xv);
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), s_scales2(blk, 34, dx2, idx), acc);
}

/* The last block of an odd-length chunk, 256 bits wide. */
static inline float s_tail(stp_type wtype, const uint8_t *blk, const kern_q8_pack *p, int64_t b) {
    const __m256i xv = _mm256_load_si256((const __m256i *)(p->xs + 32 * b));
    const __m256i nl = _mm256_load_si256((const __m256i *)(p->nlsum + 8 * b));
    __m256i s;
    if (wtype == STP_TYPE_Q4_0) {
        const __m128i q = _mm_loadu_si128((const __m128i *)(blk + 2));
        const __m256i qq =
            _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(q, 4), q), _mm256_set1_epi8(0x0F));
        s = _mm256_dpbusd_epi32(_mm256_slli_epi32(nl, 3), qq, xv);
    } else {
        const __m256i q = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(blk + 2)),
                                           _mm256_set1_epi8((char)0x80));
        s = _mm256_dpbusd_epi32(_mm256_slli_epi32(nl, 7), q, xv);
    }
    return s_hsum256(_mm256_cvtepi32_ps(s)) * (_cvtsh_ss(kern_ld16(blk)) * p->dx[b]);
}

/* 4 rows (rb bytes apart, from block b0) · packed chunk -> out[0..3]. */
static void s_rows4(stp_type wtype, const uint8_t *w, size_t rb, int64_t b0, const kern_q8_pack *p,
                    float *out) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    const int64_t nb = p->nb;
    const size_t bs = wtype == STP_TYPE_Q4_0 ? sizeof(block_q4_0) : sizeof(block_q8_0);
    const uint8_t *w0 = w + (size_t)b0 * bs, *w1 = w0 + rb, *w2 = w1 + rb, *w3 = w2 + rb;
    int64_t b = 0;
    if (wtype == STP_TYPE_Q4_0) {
        for (; b + 2 <= nb; b += 2) {
            const __m512i xv = _mm512_load_si512(p->xs + 32 * b);
            const __m512i corr = _mm512_slli_epi32(_mm512_load_si512(p->nlsum + 8 * b), 3);
            const __m128 dx2 = _mm_castsi128_ps(_mm_loadl_epi64((const __m128i *)(p->dx + b)));
            const size_t o = (size_t)b * bs;
            a0 = s_q4_0_pair(w0 + o, xv, corr, dx2, a0);
            a1 = s_q4_0_pair(w1 + o, xv, corr, dx2, a1);
            a2 = s_q4_0_pair(w2 + o, xv, corr, dx2, a2);
            a3 = s_q4_0_pair(w3 + o, xv, corr, dx2, a3);
        }
    } else {
        for (; b + 2 <= nb; b += 2) {
            const __m512i xv = _mm512_load_si512(p->xs + 32 * b);
            const __m512i corr = _mm512_slli_epi32(_mm512_load_si512(p->nlsum + 8 * b), 7);
            const __m128 dx2 = _mm_castsi128_ps(_mm_loadl_epi64((const __m128i *)(p->dx + b)));
            const size_t o = (size_t)b * bs;
            a0 = s_q8_0_pair(w0 + o, xv, corr, dx2, a0);
            a1 = s_q8_0_pair(w1 + o, xv, corr, dx2, a1);
            a2 = s_q8_0_pair(w2 + o, xv, corr, dx2, a2);
            a3 = s_q8_0_pair(w3 + o, xv, corr, dx2, a3);
        }
    }
    out[0] = _mm512_reduce_add_ps(a0);
    out[1] = _mm512_reduce_add_ps(a1);
    out[2] = _mm512_reduce_add_ps(a2);
    out[3] = _mm512_reduce_add_ps(a3);
    if (b < nb) {
        const size_t o = (size_t)b * bs;
        out[0] += s_tail(wtype, w0 + o, p, b);
        out[1] += s_tail(wtype, w1 + o, p, b);
        out[2] += s_tail(wtype, w2 + o, p, b);
        out[3] += s_tail(wtype, w3 + o, p, b);
    }
}

/* One row · packed chunk. */
static float s_row1(stp_type wtype, const uint8_t *w, int64_t b0, const kern_q8_pack *p) {
    __m512 a = _mm512_setzero_ps();
    const int64_t nb = p->nb;
    const size_t bs = wtype == STP_TYPE_Q4_0 ? sizeof(block_q4_0) : sizeof(block_q8_0);
    const uint8_t *w0 = w + (size_t)b0 * bs;
    int64_t b = 0;
    for (; b + 2 <= nb; b += 2) {
        const __m512i xv = _mm512_load_si512(p->xs + 32 * b);
        const __m512i nl = _mm512_load_si512(p->nlsum + 8 * b);
        const __m128 dx2 = _mm_castsi128_ps(_mm_loadl_epi64((const __m128i *)(p->dx + b)));
        if (wtype == STP_TYPE_Q4_0)
            a = s_q4_0_pair(w0 + (size_t)b * bs, xv, _mm512_slli_epi32(nl, 3), dx2, a);
        else
            a = s_q8_0_pair(w0 + (size_t)b * bs, xv, _mm512_slli_epi32(nl, 7), dx2, a);
    }
    float r = _mm512_reduce_add_ps(a);
    if (b < nb) r += s_tail(wtype, w0 + (size_t)b * bs, p, b);
    return r;
}

static void s_chunk_rows(stp_type wtype, const uint8_t *w, size_t rb, int64_t b0,
                         const kern_q8_pack *p, float *y, int64_t r0, int64_t r1, int add) {
    float out[4];
    for (int64_t r = r0; r < r1;) {
        const uint8_t *wr = w + (size_t)r * rb;
        int nr = 1;
        if (r1 - r >= 4) {
            s_rows4(wtype, wr, rb, b0, p, out);
            nr = 4;
        } else {
            out[0] = s_row1(wtype, wr, b0, p);
        }
        for (int k = 0; k < nr; k++)
            y[r - r0 + k] = add ? y[r - r0 + k] + out[k] : out[k];
        r += nr;
    }
}

static void s_matvec_q(stp_type wtype, int64_t n, const void *w, size_t rb, const void *xq,
                       float *y, int64_t r0, int64_t r1) {
    kern_q8_pack p;
    const int64_t nb = n / QK8_0, per = KERN_PACK_N / QK8_0;
    for (int64_t b0 = 0; b0 < nb; b0 += per) {
        kern_q8_pack_fill(&p, xq, b0, nb - b0 < per ? nb - b0 : per);
        s_chunk_rows(wtype, w, rb, b0, &p, y, r0, r1, b0 > 0);
    }
    if (nb == 0)
        for (int64_t r = r0; r < r1; r++)
            y[r - r0] = 0.0f;
}

static float s_vec_dot(stp_type wtype, int64_t n, const void *w_row, const void *xq) {
    if (wtype == STP_TYPE_Q4_0 || wtype == STP_TYPE_Q8_0) {
        float y;
        s_matvec_q(wtype, n, w_row, 0, xq, &y, 0, 1);
        return y;
    }
    return kern_avx2_vec_dot(wtype, n, w_row, xq);
}

static void s_matvec(stp_type wtype, int64_t n, const void *w, size_t row_bytes, const void *xq,
                     float *y, int64_t r0, int64_t r1) {
    if (wtype == STP_TYPE_Q4_0 || wtype == STP_TYPE_Q8_0)
        s_matvec_q(wtype, n, w, row_bytes, xq, y, r0, r1);
    else
        kern_avx2_matvec(wtype, n, w, row_bytes, xq, y, r0, r1);
}

static void s_matmat(stp_type wtype, int64_t n, const void *w, size_t row_bytes, const void *xq,
                     size_t xq_stride, int64_t n_vec, float *y, size_t y_stride, int64_t r0,
                     int64_t r1) {
    kern_q8_pack *packs = NULL;
    if ((wtype == STP_TYPE_Q4_0 || wtype == STP_TYPE_Q8_0) && n_vec > 1)
        packs = aligned_alloc(64, sizeof(kern_q8_pack) * (size_t)n_vec);
    if (!packs) {
        if (n_vec == 1)
            s_matvec(wtype, n, w, row_bytes, xq, y, r0, r1);
        else
            kern_avx2_matmat(wtype, n, w, row_bytes, xq, xq_stride, n_vec, y, y_stride, r0, r1);
        return;
    }
    const int64_t nb = n / QK8_0, per = KERN_PACK_N / QK8_0;
    for (int64_t b0 = 0; b0 < nb; b0 += per) {
        const int64_t cnt = nb - b0 < per ? nb - b0 : per;
        for (int64_t v = 0; v < n_vec; v++)
            kern_q8_pack_fill(&packs[v], (const void *)((const char *)xq + (size_t)v * xq_stride),
                              b0, cnt);
        for (int64_t r = r0; r < r1; r += 4) {
            const int64_t re = r1 - r < 4 ? r1 : r + 4;
            for (int64_t v = 0; v < n_vec; v++)
                s_chunk_rows(wtype, w, row_bytes, b0, &packs[v],
                             y + (size_t)v * y_stride + (r - r0), r, re, b0 > 0);
        }
    }
    free(packs);
}

const kern_ops kern_ops_avx512_table = {
    .level = "avx512vnni",
    .quantize_act = kern_avx2_quantize_act,
    .vec_dot = s_vec_dot,
    .matvec = s_matvec,
    .dequantize_row = kern_dequantize_row_ref,
    .matmat = s_matmat,
    .axpy_row = kern_avx2_axpy_row,
};
