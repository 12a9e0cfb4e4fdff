/* kern_avx2: AVX2+FMA+F16C kernels (the "avx2" level, also reused by the avx512 level).
 *
 * SIMD: quantize_act for Q8_0 and Q8_K (bit-identical to the reference: same float32
 * multiplier, round-half-even), vec_dot/matvec/matmat for Q4_0, Q8_0 (packed activations, 4 rows
 * per pass), Q4_K, Q6_K, F32, F16, and axpy_row for Q4_0/Q8_0/F32/F16. Every other type goes
 * to the reference. Integer sums are exact; only the float32 summation order differs from the
 * reference. See README.md ("adding a kernel"). */
#include <immintrin.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kern/kern_internal.h"

#define S_RND (_MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)

/* ---- helpers -------------------------------------------------------------------------------- */

static inline float s_hsum_ps(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline float s_h2f(const void *p) {
    return _cvtsh_ss(kern_ld16(p));
}

/* ---- activation quantizers ------------------------------------------------------------------ */

/* 32 int32 lanes (4 vectors, element order) -> 32 int8 in element order. */
static inline __m256i s_pack_i32x32(__m256i i0, __m256i i1, __m256i i2, __m256i i3) {
    __m256i a = _mm256_packs_epi32(i0, i1);
    __m256i b = _mm256_packs_epi32(i2, i3);
    __m256i c = _mm256_packs_epi16(a, b);
    return _mm256_permutevar8x32_epi32(c, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

static void s_quantize_q8_0(const float *x, block_q8_0 *y, int64_t nb) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int64_t i = 0; i < nb; i++, x += 32) {
        __m256 v0 = _mm256_loadu_ps(x), v1 = _mm256_loadu_ps(x + 8);
        __m256 v2 = _mm256_loadu_ps(x + 16), v3 = _mm256_loadu_ps(x + 24);
        __m256 m =
            _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v0), _mm256_andnot_ps(sign, v1)),
                          _mm256_max_ps(_mm256_andnot_ps(sign, v2), _mm256_andnot_ps(sign, v3)));
        __m128 m4 = _mm_max_ps(_mm256_extractf128_ps(m, 1), _mm256_castps256_ps128(m));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        const float amax = _mm_cvtss_f32(m4);
        const float d = amax / 127.0f;
        const float id = amax != 0.0f ? 127.0f / amax : 0.0f;
        y[i].d = kern_f32_to_fp16(d);
        const __m256 mul = _mm256_set1_ps(id);

        __m256i i0 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v0, mul), S_RND));
        __m256i i1 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v1, mul), S_RND));
        __m256i i2 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v2, mul), S_RND));
        __m256i i3 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v3, mul), S_RND));
        _mm256_storeu_si256((__m256i *)y[i].qs, s_pack_i32x32(i0, i1, i2, i3));
    }
}

static void s_quantize_q8_K(const float *x, block_q8_K *y, int64_t nb) {
    const __m256 sign = _mm256_set1_ps(-0.0f);

    for (int64_t i = 0; i < nb; i++, x += QK_K) {
        __m256 m = _mm256_setzero_ps();
        for (int j = 0; j < QK_K; j += 8)
            m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + j)));
        __m128 m4 = _mm_max_ps(_mm256_extractf128_ps(m, 1), _mm256_castps256_ps128(m));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        const float amax = _mm_cvtss_f32(m4);
        memset(&y[i], 0, sizeof y[i]);
        if (amax == 0.0f) continue;
        float max = 0.0f; /* the first element with |x| == amax, with its sign */
        for (int j = 0; j < QK_K; j++) {
            if (fabsf(x[j]) == amax) {
                max = x[j];
                break;
            }
        }
        const float iscale = -127.0f / max;
        const __m256 mul = _mm256_set1_ps(iscale);
        const __m256i top = _mm256_set1_epi32(127);
        for (int j = 0; j < QK_K; j += 32) {
            __m256i q[4];
            for (int k = 0; k < 4; k++) {
                __m256 v = _mm256_mul_ps(_mm256_loadu_ps(x + j + 8 * k), mul);
                q[k] = _mm256_min_epi32(_mm256_cvtps_epi32(_mm256_round_ps(v, S_RND)), top);
            }
            _mm256_storeu_si256((__m256i *)(y[i].qs + j), s_pack_i32x32(q[0], q[1], q[2], q[3]));
        }
        for (int g = 0; g < QK_K / 16; g++) {
            __m128i q = _mm_cvtepi8_epi16(_mm_loadl_epi64((const __m128i *)(y[i].qs + 16 * g)));
            __m128i r = _mm_cvtepi8_epi16(_mm_loadl_epi64((const __m128i *)(y[i].qs + 16 * g + 8)));
            __m128i s = _mm_madd_epi16(_mm_add_epi16(q, r), _mm_set1_epi16(1));
            s = _mm_hadd_epi32(s, s);
            s = _mm_hadd_epi32(s, s);
            y[i].bsums[g] = (int16_t)_mm_cvtsi128_si32(s);
        }
        y[i].d = 1.0f / iscale;
    }
}

void kern_avx2_quantize_act(stp_type wtype, const float *x, void *xq, int64_t n) {
    switch (kern_act_type(wtype)) {
    case STP_TYPE_Q8_0: s_quantize_q8_0(x, xq, n / QK8_0); break;
    case STP_TYPE_Q8_K: s_quantize_q8_K(x, xq, n / QK_K); break;
    case STP_TYPE_F16: {
        stp_fp16 *h = xq;
        int64_t i = 0;
        for (; i + 8 <= n; i += 8)
            _mm_storeu_si128((__m128i *)(h + i),
                             _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
        for (; i < n; i++)
            h[i] = kern_f32_to_fp16(x[i]);
        break;
    }
    default: kern_quantize_act_ref(wtype, x, xq, n); break;
    }
}

/* ---- Q4_0 / Q8_0: bit-identical to the reference (see dot_ref.c) ---------------------------- */

/* Block list: bl ? bl[i] : i for i < nact (bl lists the blocks a sparse matvec computes). */
static inline int64_t s_blk(const int32_t *bl, int64_t i) {
    return bl ? bl[i] : i;
}

/* Q4_0, 4 rows (byte offsets off[0..3] from w; duplicates allowed for tails) -> out[0..3].
 * Per block: the exact integer dot of each row, reduced to one int per row (hadd tree), then
 * acc4 = fma(isum4, dw4 * dx, acc4): the sequential per-row fma of ggml's q4_0_8x8 gemv. */
static void s_q4_0_rows4(const uint8_t *w, const size_t off[4], const block_q8_0 *x,
                         const int32_t *bl, int64_t nact, float out[4]) {
    const __m256i m4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    const __m256i eight = _mm256_set1_epi8(8);
    __m128 acc = _mm_setzero_ps();
    for (int64_t i = 0; i < nact; i++) {
        const int64_t b = s_blk(bl, i);
        const __m256i xv = _mm256_loadu_si256((const __m256i *)x[b].qs);
        const __m256i corr = _mm256_sub_epi32(
            _mm256_setzero_si256(), _mm256_madd_epi16(_mm256_maddubs_epi16(eight, xv), ones));
        const uint8_t *p = w + (size_t)b * sizeof(block_q4_0);
        __m256i a[4];
        uint16_t dh[4];
        for (int r = 0; r < 4; r++) {
            const uint8_t *blk = p + off[r];
            const __m128i q = _mm_loadu_si128((const __m128i *)(blk + 2));
            const __m256i qq = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(q, 4), q), m4);
            a[r] = _mm256_add_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(qq, xv), ones), corr);
            dh[r] = kern_ld16(blk);
        }
        const __m256i h =
            _mm256_hadd_epi32(_mm256_hadd_epi32(a[0], a[1]), _mm256_hadd_epi32(a[2], a[3]));
        const __m128i isum =
            _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
        const __m128 dw = _mm_cvtph_ps(
            _mm_setr_epi16((short)dh[0], (short)dh[1], (short)dh[2], (short)dh[3], 0, 0, 0, 0));
        const __m128 sc = _mm_mul_ps(dw, _mm_set1_ps(s_h2f(&x[b].d)));
        acc = _mm_fmadd_ps(_mm_cvtepi32_ps(isum), sc, acc);
    }
    _mm_storeu_ps(out, acc);
}

/* Q8_0, 4 rows -> out[0..3]: ggml_vec_dot_q8_0_q8_0's 8 lanes per row, hsum_float_8 at the end. */
static void s_q8_0_rows4(const uint8_t *w, const size_t off[4], const block_q8_0 *x,
                         const int32_t *bl, int64_t nact, float out[4]) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                     _mm256_setzero_ps()};
    for (int64_t i = 0; i < nact; i++) {
        const int64_t b = s_blk(bl, i);
        const __m256i xv = _mm256_loadu_si256((const __m256i *)x[b].qs);
        const float dx = s_h2f(&x[b].d);
        const uint8_t *p = w + (size_t)b * sizeof(block_q8_0);
        for (int r = 0; r < 4; r++) {
            const uint8_t *blk = p + off[r];
            const __m256i q = _mm256_loadu_si256((const __m256i *)(blk + 2));
            const __m256i s = _mm256_madd_epi16(
                _mm256_maddubs_epi16(_mm256_sign_epi8(q, q), _mm256_sign_epi8(xv, q)), ones);
            acc[r] =
                _mm256_fmadd_ps(_mm256_set1_ps(s_h2f(blk) * dx), _mm256_cvtepi32_ps(s), acc[r]);
        }
    }
    for (int r = 0; r < 4; r++)
        out[r] = s_hsum_ps(acc[r]);
}

/* Rows [r0, r1) of a Q4_0/Q8_0 matrix over the blocks bl (NULL: all nb). */
static void s_matvec_q(stp_type wtype, int64_t nb, const void *w, size_t rb, const void *xq,
                       const int32_t *bl, int64_t nact, float *y, int64_t r0, int64_t r1) {
    (void)nb;
    for (int64_t r = r0; r < r1; r += 4) {
        const int nr = r1 - r >= 4 ? 4 : (int)(r1 - r);
        size_t off[4];
        for (int k = 0; k < 4; k++)
            off[k] = (size_t)(k < nr ? k : nr - 1) * rb;
        const uint8_t *wr = (const uint8_t *)w + (size_t)r * rb;
        float out[4];
        if (wtype == STP_TYPE_Q4_0)
            s_q4_0_rows4(wr, off, xq, bl, nact, out);
        else
            s_q8_0_rows4(wr, off, xq, bl, nact, out);
        for (int k = 0; k < nr; k++)
            y[r - r0 + k] = out[k];
    }
}

/* Indices of the blocks with mask[b] != 0; returns the count. */
static int64_t s_mask_list(const uint8_t *mask, int64_t nb, int32_t *bl) {
    int64_t k = 0;
    for (int64_t b = 0; b < nb; b++)
        if (mask[b]) bl[k++] = (int32_t)b;
    return k;
}

/* ---- K-quants against Q8_K ------------------------------------------------------------------ */

static float s_dot_q4_K(int64_t nb, const block_q4_K *x, const block_q8_K *y) {
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    __m256 acc = _mm256_setzero_ps();
    float summ_f = 0.0f;
    for (int64_t i = 0; i < nb; i++) {
        uint8_t sc[8], mn[8];
        for (int j = 0; j < 8; j++)
            kern_k4_scale_min(j, x[i].scales, &sc[j], &mn[j]);
        int summ = 0;
        for (int j = 0; j < 8; j++)
            summ += mn[j] * (y[i].bsums[2 * j] + y[i].bsums[2 * j + 1]);
        __m256i sumi = _mm256_setzero_si256();
        for (int c = 0; c < 4; c++) {
            const __m256i q = _mm256_loadu_si256((const __m256i *)(x[i].qs + 32 * c));
            const __m256i lo = _mm256_and_si256(q, m4);
            const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
            const __m256i y0 = _mm256_loadu_si256((const __m256i *)(y[i].qs + 64 * c));
            const __m256i y1 = _mm256_loadu_si256((const __m256i *)(y[i].qs + 64 * c + 32));
            __m256i p0 =
                _mm256_madd_epi16(_mm256_maddubs_epi16(lo, y0), _mm256_set1_epi16(sc[2 * c]));
            __m256i p1 =
                _mm256_madd_epi16(_mm256_maddubs_epi16(hi, y1), _mm256_set1_epi16(sc[2 * c + 1]));
            sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(p0, p1));
        }
        const float d = s_h2f(&x[i].d) * y[i].d;
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
        summ_f += s_h2f(&x[i].dmin) * y[i].d * (float)summ;
    }
    return s_hsum_ps(acc) - summ_f;
}

static float s_dot_q6_K(int64_t nb, const block_q6_K *x, const block_q8_K *y) {
    const __m256i m4 = _mm256_set1_epi8(0x0F), m2 = _mm256_set1_epi8(3);
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < nb; i++) {
        const __m128i sc8 = _mm_loadu_si128((const __m128i *)x[i].scales);
        /* 32 * sum_j sc[j] * bsums[j]: the -32 offset, folded in exactly */
        const __m256i sc16 = _mm256_cvtepi8_epi16(sc8);
        const __m256i bs = _mm256_loadu_si256((const __m256i *)y[i].bsums);
        __m256i sumi = _mm256_sub_epi32(_mm256_setzero_si256(),
                                        _mm256_slli_epi32(_mm256_madd_epi16(sc16, bs), 5));
        for (int h = 0; h < 2; h++) {
            const uint8_t *ql = x[i].ql + 64 * h, *qh = x[i].qh + 32 * h;
            const __m256i a = _mm256_loadu_si256((const __m256i *)ql);
            const __m256i b = _mm256_loadu_si256((const __m256i *)(ql + 32));
            const __m256i hb = _mm256_loadu_si256((const __m256i *)qh);
            __m256i q[4];
            q[0] = _mm256_or_si256(_mm256_and_si256(a, m4),
                                   _mm256_slli_epi16(_mm256_and_si256(hb, m2), 4));
            q[1] = _mm256_or_si256(
                _mm256_and_si256(b, m4),
                _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 2), m2), 4));
            q[2] = _mm256_or_si256(
                _mm256_and_si256(_mm256_srli_epi16(a, 4), m4),
                _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 4), m2), 4));
            q[3] = _mm256_or_si256(
                _mm256_and_si256(_mm256_srli_epi16(b, 4), m4),
                _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 6), m2), 4));
            for (int k = 0; k < 4; k++) {
                const int g = 4 * h + k; /* 32-element group: scales 2g, 2g+1 */
                const __m128i idx = _mm_set_epi64x((long long)(0x0101010101010101ULL * (2 * g + 1)),
                                                   (long long)(0x0101010101010101ULL * (2 * g)));
                const __m256i s = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(sc8, idx));
                const __m256i yv = _mm256_loadu_si256((const __m256i *)(y[i].qs + 32 * g));
                sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(_mm256_maddubs_epi16(q[k], yv), s));
            }
        }
        const float d = s_h2f(&x[i].d) * y[i].d;
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
    }
    return s_hsum_ps(acc);
}

/* ---- float types ---------------------------------------------------------------------------- */

static float s_dot_f32(int64_t n, const float *a, const float *b) {
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
    }
    float s = s_hsum_ps(_mm256_add_ps(s0, s1));
    for (; i < n; i++)
        s += a[i] * b[i];
    return s;
}

static float s_dot_f16(int64_t n, const stp_fp16 *a, const stp_fp16 *b) {
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m256 a0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(a + i)));
        __m256 b0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(b + i)));
        __m256 a1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(a + i + 8)));
        __m256 b1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(b + i + 8)));
        s0 = _mm256_fmadd_ps(a0, b0, s0);
        s1 = _mm256_fmadd_ps(a1, b1, s1);
    }
    float s = s_hsum_ps(_mm256_add_ps(s0, s1));
    for (; i < n; i++)
        s += kern_fp16_to_f32(a[i]) * kern_fp16_to_f32(b[i]);
    return s;
}

/* ---- entry points --------------------------------------------------------------------------- */

float kern_avx2_vec_dot(stp_type wtype, int64_t n, const void *w_row, const void *xq) {
    switch (wtype) {
    case STP_TYPE_Q4_0:
    case STP_TYPE_Q8_0: {
        float y;
        s_matvec_q(wtype, n / QK8_0, w_row, 0, xq, NULL, n / QK8_0, &y, 0, 1);
        return y;
    }
    case STP_TYPE_Q4_K: return s_dot_q4_K(n / QK_K, w_row, xq);
    case STP_TYPE_Q6_K: return s_dot_q6_K(n / QK_K, w_row, xq);
    case STP_TYPE_F32: return s_dot_f32(n, w_row, xq);
    case STP_TYPE_F16: return s_dot_f16(n, w_row, xq);
    default: return kern_vec_dot_ref(wtype, n, w_row, xq);
    }
}

void kern_avx2_matvec(stp_type wtype, int64_t n, const void *w, size_t row_bytes, const void *xq,
                      float *y, int64_t r0, int64_t r1) {
    if (wtype == STP_TYPE_Q4_0 || wtype == STP_TYPE_Q8_0) {
        s_matvec_q(wtype, n / QK8_0, w, row_bytes, xq, NULL, n / QK8_0, y, r0, r1);
        return;
    }
    for (int64_t r = r0; r < r1; r++)
        y[r - r0] = kern_avx2_vec_dot(wtype, n, (const char *)w + (size_t)r * row_bytes, xq);
}

void kern_avx2_matmat(stp_type wtype, int64_t n, const void *w, size_t row_bytes, const void *xq,
                      size_t xq_stride, int64_t n_vec, float *y, size_t y_stride, int64_t r0,
                      int64_t r1) {
    if (wtype == STP_TYPE_Q4_0 || wtype == STP_TYPE_Q8_0) {
        /* 4 rows stay in L1 while every vector passes */
        for (int64_t r = r0; r < r1; r += 4) {
            const int64_t re = r1 - r < 4 ? r1 : r + 4;
            for (int64_t v = 0; v < n_vec; v++)
                s_matvec_q(wtype, n / QK8_0, w, row_bytes, (const char *)xq + (size_t)v * xq_stride,
                           NULL, n / QK8_0, y + (size_t)v * y_stride + (r - r0), r, re);
        }
        return;
    }
    for (int64_t r = r0; r < r1; r++) { /* other types: rows outer, vectors inner */
        const char *row = (const char *)w + (size_t)r * row_bytes;
        for (int64_t v = 0; v < n_vec; v++)
            y[(size_t)v * y_stride + (size_t)(r - r0)] =
                kern_avx2_vec_dot(wtype, n, row, (const char *)xq + (size_t)v * xq_stride);
    }
}

/* stack_bl is filled before use (s_mask_list); GCC cannot see that through the inlining. */
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
void kern_avx2_matvec_sparse(stp_type wtype, int64_t n, const void *w, size_t row_bytes,
                             const void *xq, const uint8_t *block_mask, float *y, int64_t r0,
                             int64_t r1) {
    const int64_t nb = n / QK8_0;
    int32_t stack_bl[1024];
    int32_t *bl = NULL;
    if (wtype == STP_TYPE_Q4_0 || wtype == STP_TYPE_Q8_0)
        bl = nb <= 1024 ? stack_bl : malloc(sizeof(int32_t) * (size_t)nb);
    if (!bl) { /* other types, or no memory: the reference (identical results) */
        kern_matvec_sparse_ref(wtype, n, w, row_bytes, xq, block_mask, y, r0, r1);
        return;
    }
    const int64_t nact = s_mask_list(block_mask, nb, bl);
    s_matvec_q(wtype, nb, w, row_bytes, xq, bl, nact, y, r0, r1);
    if (bl != stack_bl) free(bl);
}
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

void kern_avx2_axpy_row(stp_type wtype, int64_t n, const void *w_row, float a, float *y) {
    switch (wtype) {
    case STP_TYPE_F32: {
        const float *w = w_row;
        const __m256 av = _mm256_set1_ps(a);
        int64_t i = 0;
        for (; i + 8 <= n; i += 8)
            _mm256_storeu_ps(y + i,
                             _mm256_fmadd_ps(av, _mm256_loadu_ps(w + i), _mm256_loadu_ps(y + i)));
        for (; i < n; i++)
            y[i] += a * w[i];
        return;
    }
    case STP_TYPE_F16: {
        const stp_fp16 *w = w_row;
        const __m256 av = _mm256_set1_ps(a);
        int64_t i = 0;
        for (; i + 8 <= n; i += 8) {
            __m256 wv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + i)));
            _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, wv, _mm256_loadu_ps(y + i)));
        }
        for (; i < n; i++)
            y[i] += a * kern_fp16_to_f32(w[i]);
        return;
    }
    case STP_TYPE_Q4_0: {
        const block_q4_0 *b = w_row;
        const __m128i m4 = _mm_set1_epi8(0x0F), off = _mm_set1_epi8(8);
        for (int64_t i = 0; i < n / QK4_0; i++, y += 32) {
            const __m256 dv = _mm256_set1_ps(a * s_h2f(&b[i].d));
            const __m128i q = _mm_loadu_si128((const __m128i *)b[i].qs);
            const __m128i lo = _mm_sub_epi8(_mm_and_si128(q, m4), off);
            const __m128i hi = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(q, 4), m4), off);
            const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
            for (int k = 0; k < 4; k++) {
                __m256 wv = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(parts[k]));
                _mm256_storeu_ps(y + 8 * k, _mm256_fmadd_ps(dv, wv, _mm256_loadu_ps(y + 8 * k)));
            }
        }
        return;
    }
    case STP_TYPE_Q8_0: {
        const block_q8_0 *b = w_row;
        for (int64_t i = 0; i < n / QK8_0; i++, y += 32) {
            const __m256 dv = _mm256_set1_ps(a * s_h2f(&b[i].d));
            for (int k = 0; k < 4; k++) {
                __m128i q = _mm_loadl_epi64((const __m128i *)(b[i].qs + 8 * k));
                __m256 wv = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
                _mm256_storeu_ps(y + 8 * k, _mm256_fmadd_ps(dv, wv, _mm256_loadu_ps(y + 8 * k)));
            }
        }
        return;
    }
    default: kern_axpy_row_ref(wtype, n, w_row, a, y); return;
    }
}

void kern_avx2_matvec_rows(stp_type wtype, int64_t n, const void *w, size_t row_bytes,
                           const void *xq, const int32_t *rows, int64_t n_rows, float *y) {
    for (int64_t i = 0; i < n_rows; i++)
        y[rows[i]] =
            kern_avx2_vec_dot(wtype, n, (const uint8_t *)w + (size_t)rows[i] * row_bytes, xq);
}

/* ---- Q4_0 in the q4_0x16 layout (kern.h) ---------------------------------------------------- *
 * Per (group, block) and half (rows 0-7 / 8-15): 4 ymm loads, register k = bytes 4k..4k+3 of 8
 * rows (row in int32 lane). Nibbles (0..15) x broadcast activation dwords through maddubs: the
 * 8 int16 partials per lane stay within +-30720, so they are added in int16, then madd(1) gives
 * the row's exact block sum in its lane, plus -8 * sum(x). acc8 = fma(isum8, dw8 * dx, acc8). */
static inline __attribute__((always_inline)) void s_x16_block(const kern_x16_job *j,
                                                              const uint8_t *q, const uint8_t *s,
                                                              int64_t b, __m256 *acc,
                                                              const int nv) {
    const __m256i m0f = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    const int64_t e = b - j->c0;
#pragma GCC unroll 9
    for (int half = 0; half < 2; half++) {
        __m256i lo[4], hi[4];
#pragma GCC unroll 9
        for (int k = 0; k < 4; k++) {
            const __m256i w = _mm256_loadu_si256((const __m256i *)(q + 64 * k + 32 * half));
            lo[k] = _mm256_and_si256(w, m0f);
            hi[k] = _mm256_and_si256(_mm256_srli_epi16(w, 4), m0f);
        }
        const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s + 16 * half)));
#pragma GCC unroll 9
        for (int v = 0; v < nv; v++) {
            const int8_t *xv = j->x[v][b].qs;
            __m256i s16 = _mm256_setzero_si256();
#pragma GCC unroll 9
            for (int k = 0; k < 4; k++) {
                int32_t xl, xh;
                memcpy(&xl, xv + 4 * k, 4);
                memcpy(&xh, xv + 16 + 4 * k, 4);
                s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(lo[k], _mm256_set1_epi32(xl)));
                s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(hi[k], _mm256_set1_epi32(xh)));
            }
            const __m256i isum = _mm256_add_epi32(_mm256_madd_epi16(s16, ones),
                                                  _mm256_set1_epi32(j->corr[v * j->stride + e]));
            const __m256 sc = _mm256_mul_ps(dw, _mm256_set1_ps(j->dx[v * j->stride + e]));
            acc[2 * v + half] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), sc, acc[2 * v + half]);
        }
    }
}

static inline __attribute__((always_inline)) void s_x16_group(const kern_x16_job *j, int64_t c1,
                                                              const int nv) {
    __m256 acc[8];
#pragma GCC unroll 9
    for (int v = 0; v < nv; v++) {
        acc[2 * v] = j->c0 == 0 ? _mm256_setzero_ps() : _mm256_loadu_ps(j->y[v]);
        acc[2 * v + 1] = j->c0 == 0 ? _mm256_setzero_ps() : _mm256_loadu_ps(j->y[v] + 8);
    }
    int64_t b = j->c0;
    for (; b + 1 < c1; b += 2) { /* a block pair: 9 cache lines, prefetched ahead into L1 / L2 */
        const uint8_t *p = j->G + (size_t)(b >> 1) * KERN_Q4X16_PAIR;
#pragma GCC unroll 9
        for (int l = 0; l < 9; l++)
            _mm_prefetch((const char *)(p + 4 * KERN_Q4X16_PAIR + 64 * l), _MM_HINT_T0);
#pragma GCC unroll 9
        for (int l = 0; l < 9; l++)
            _mm_prefetch((const char *)(p + 14 * KERN_Q4X16_PAIR + 64 * l), _MM_HINT_T1);
        s_x16_block(j, p, p + 512, b, acc, nv);
        s_x16_block(j, p + 256, p + 544, b + 1, acc, nv);
    }
    if (b < c1)
        s_x16_block(j, j->G + kern_q4x16_qoff(b), j->G + kern_q4x16_soff(j->nb, b), b, acc, nv);
#pragma GCC unroll 9
    for (int v = 0; v < nv; v++) {
        _mm256_storeu_ps(j->y[v], acc[2 * v]);
        _mm256_storeu_ps(j->y[v] + 8, acc[2 * v + 1]);
    }
}

static void s_x16_group1(const kern_x16_job *j, int64_t c1) {
    s_x16_group(j, c1, 1);
}
static void s_x16_group2(const kern_x16_job *j, int64_t c1) {
    s_x16_group(j, c1, 2);
}
static void s_x16_group3(const kern_x16_job *j, int64_t c1) {
    s_x16_group(j, c1, 3);
}
static void s_x16_group4(const kern_x16_job *j, int64_t c1) {
    s_x16_group(j, c1, 4);
}

static void s_matmat_x16(int64_t n_cols, const void *wp, const void *xq, size_t xq_stride,
                         int64_t n_vec, float *y, size_t y_stride, int64_t g0, int64_t g1) {
    static void (*const grp[4])(const kern_x16_job *, int64_t) = {s_x16_group1, s_x16_group2,
                                                                  s_x16_group3, s_x16_group4};
    kern_q4x16_drive(n_cols, wp, xq, xq_stride, n_vec, y, y_stride, g0, g1, grp);
}

static void s_matvec_x16(int64_t n_cols, const void *wp, const void *xq, float *y, int64_t g0,
                         int64_t g1) {
    s_matmat_x16(n_cols, wp, xq, 0, 1, y, 0, g0, g1);
}

const kern_ops kern_ops_avx2_table = {
    .level = "avx2",
    .quantize_act = kern_avx2_quantize_act,
    .vec_dot = kern_avx2_vec_dot,
    .matvec = kern_avx2_matvec,
    .dequantize_row = kern_dequantize_row_ref,
    .matmat = kern_avx2_matmat,
    .axpy_row = kern_avx2_axpy_row,
    .matvec_sparse = kern_avx2_matvec_sparse,
    .matvec_rows = kern_avx2_matvec_rows,
    .matvec_q4_0x16 = s_matvec_x16,
    .matmat_q4_0x16 = s_matmat_x16,
    .down_t_matvec = kern_down_t_matvec_avx2,
    .pack_q4_0x16 = kern_q4_0x16_pack,
};
