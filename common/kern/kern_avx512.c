/* kern_avx512: AVX-512 (F/BW/VL/DQ) + VNNI kernels, the "avx512vnni" level.
 *
 * The decode hot path: Q4_0 and Q8_0 matvec/matmat with vpdpbusd, bit-identical to the
 * reference (dot_ref.c), i.e. to what ggml-cpu computes on x86:
 *  - Q4_0 (ggml's repacked q4_0_8x8 gemv/gemm): 16 rows per pass, one row per float lane. Per
 *    block, 4 registers hold 4 rows x 4 int32 partial sums each; an unpack/add transpose reduces
 *    them to one exact integer per row, and acc16 = fma(isum16, dw16 * dx, acc16) is the
 *    per-row sequential fma. The 16 fp16 weight scales come from one gather.
 *  - Q8_0 (ggml_vec_dot_q8_0_q8_0 / tinyBLAS): 8 float lanes per row, two rows per register,
 *    8 rows per pass; each row's 8 lanes are reduced at the end in hsum_float_8's order.
 * Rows past the end of a pass are clamped to the last valid row (computed, then dropped).
 * The other types use the avx2 kernels (this level implies AVX2). See README.md. */
#include <immintrin.h>
#include <stdlib.h>
#include <string.h>

#include "kern/kern_internal.h"

/* Prefetch distance in bytes along each row (past the row's end it is harmless). */
#define S_PF 768

static inline int64_t s_blk(const int32_t *bl, int64_t i) {
    return bl ? bl[i] : i;
}

/* hsum_float_8 of an 8-lane vector: ((a0+a4) + (a2+a6)) + ((a1+a5) + (a3+a7)). */
static inline float s_hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_extractf128_ps(v, 1), _mm256_castps256_ps128(v));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* ---- Q4_0: 16 rows per pass ----------------------------------------------------------------- */

/* 4 rows' 16 quant bytes of one block (rows at p + o0..o3) in the 4 128-bit lanes. */
static inline __m512i s_load4x16(const uint8_t *p, size_t o0, size_t o1, size_t o2, size_t o3) {
    __m512i v = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)(p + o0)));
    v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(p + o1)), 1);
    v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(p + o2)), 2);
    return _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(p + o3)), 3);
}

/* The 8 fp16 scales at p + off[0..8), by word inserts from scalar loads: two of these replace a
 * 16-dword gather, which was the row kernel's slowest step on Zen 4 (docs/BENCHMARKS.md). */
static inline __m128i s_scales8(const uint8_t *p, const size_t *off) {
    __m128i s = _mm_cvtsi32_si128(kern_ld16(p + off[0]));
    s = _mm_insert_epi16(s, kern_ld16(p + off[1]), 1);
    s = _mm_insert_epi16(s, kern_ld16(p + off[2]), 2);
    s = _mm_insert_epi16(s, kern_ld16(p + off[3]), 3);
    s = _mm_insert_epi16(s, kern_ld16(p + off[4]), 4);
    s = _mm_insert_epi16(s, kern_ld16(p + off[5]), 5);
    s = _mm_insert_epi16(s, kern_ld16(p + off[6]), 6);
    return _mm_insert_epi16(s, kern_ld16(p + off[7]), 7);
}

/* Rows at w + off[k] (k < 16) over blocks bl -> out[0..15]. Prefetch: with next == NULL, S_PF bytes
 * ahead along each row (long, consecutive rows); else the whole of the next 16 rows (w + next[k],
 * row_bytes each), a few lines per block step: listed rows are short and scattered, too short for
 * S_PF to reach. */
static void s_q4_0_rows16(const uint8_t *w, const size_t off[16], const block_q8_0 *x,
                          const int32_t *bl, int64_t nact, float out[16], const size_t *next,
                          size_t row_bytes) {
    const __m512i m4 = _mm512_set1_epi8(0x0F), eight = _mm512_set1_epi8(8);
    __m512 acc = _mm512_setzero_ps();
    /* next rows' lines: pf_per per block step, row pf_r, line pf_c (counters, no division in
     * the loop) */
    const int64_t lpr = (int64_t)(row_bytes + 127) / 64;
    const int64_t pf_per = next && nact > 0 ? (16 * lpr + nact - 1) / nact : 0;
    int64_t pf_r = 0, pf_c = 0;
    for (int64_t i = 0; i < nact; i++) {
        const int64_t b = s_blk(bl, i);
        const __m512i xlo = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)x[b].qs));
        const __m512i xhi =
            _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(x[b].qs + 16)));
        /* -8 * sum x per int32 lane: folds the Q4_0 offset into the accumulator's start */
        const __m512i corr = _mm512_sub_epi32(
            _mm512_setzero_si512(),
            _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), eight, xlo), eight,
                                xhi));
        const uint8_t *p = w + (size_t)b * sizeof(block_q4_0);
        if (!next) { /* S_PF bytes ahead: half of the rows per block (36 < 64 bytes) */
            for (int k = (int)(i & 1) * 8; k < (int)(i & 1) * 8 + 8; k++)
                _mm_prefetch((const char *)(p + off[k] + S_PF), _MM_HINT_T0);
        } else { /* the next pf_per of the next rows' 16 * lpr lines */
            for (int64_t e = 0; e < pf_per && pf_r < 16; e++) {
                _mm_prefetch((const char *)(w + next[pf_r] + 64 * pf_c), _MM_HINT_T1);
                if (++pf_c == lpr) pf_c = 0, pf_r++;
            }
        }
        __m512i a[4];
#pragma GCC unroll 4 /* else GCC keeps a loop and a[] on the stack (-20% from memory) */
        for (int k = 0; k < 4; k++) { /* register k: rows k, 4+k, 8+k, 12+k */
            const __m512i q = s_load4x16(p + 2, off[k], off[4 + k], off[8 + k], off[12 + k]);
            const __m512i lo = _mm512_and_si512(q, m4);
            const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(q, 4), m4);
            a[k] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(corr, lo, xlo), hi, xhi);
        }
        /* 4x4 transpose-add inside each 128-bit lane: lane L gets rows 4L..4L+3 */
        const __m512i s01 =
            _mm512_add_epi32(_mm512_unpacklo_epi32(a[0], a[1]), _mm512_unpackhi_epi32(a[0], a[1]));
        const __m512i s23 =
            _mm512_add_epi32(_mm512_unpacklo_epi32(a[2], a[3]), _mm512_unpackhi_epi32(a[2], a[3]));
        const __m512i isum =
            _mm512_add_epi32(_mm512_unpacklo_epi64(s01, s23), _mm512_unpackhi_epi64(s01, s23));
        const __m512 dw = _mm512_cvtph_ps(_mm256_inserti128_si256(
            _mm256_castsi128_si256(s_scales8(p, off)), s_scales8(p, off + 8), 1));
        const __m512 sc = _mm512_mul_ps(dw, _mm512_set1_ps(_cvtsh_ss(x[b].d)));
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), sc, acc);
    }
    _mm512_storeu_ps(out, acc);
}

/* ---- Q8_0: 8 rows per pass, two rows per register ------------------------------------------- */

static void s_q8_0_rows8(const uint8_t *w, const size_t off[8], const block_q8_0 *x,
                         const int32_t *bl, int64_t nact, float out[8]) {
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    const __m256i vidx = _mm256_setr_epi32((int)off[0], (int)off[1], (int)off[2], (int)off[3],
                                           (int)off[4], (int)off[5], (int)off[6], (int)off[7]);
    const __m512i sel0 = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    const __m512i two = _mm512_set1_epi32(2);
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                     _mm512_setzero_ps()};
    for (int64_t i = 0; i < nact; i++) {
        const int64_t b = s_blk(bl, i);
        const __m512i xv = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)x[b].qs));
        /* w ^ 0x80 = w + 128 as unsigned: start from -128 * (sum of each 4 x) */
        const __m512i corr = _mm512_sub_epi32(
            _mm512_setzero_si512(), _mm512_dpbusd_epi32(_mm512_setzero_si512(), flip, xv));
        const uint8_t *p = w + (size_t)b * sizeof(block_q8_0);
#pragma GCC unroll 8
        for (int k = 0; k < 8; k++)
            _mm_prefetch((const char *)(p + off[k] + S_PF), _MM_HINT_T0);
        const __m256i g = _mm256_i32gather_epi32((const int *)(const void *)p, vidx, 1);
        const __m256 sc8 = _mm256_mul_ps(_mm256_cvtph_ps(_mm256_cvtepi32_epi16(g)),
                                         _mm256_set1_ps(_cvtsh_ss(x[b].d)));
        const __m512 sc = _mm512_castps256_ps512(sc8);
        __m512i sel = sel0;
#pragma GCC unroll 4
        for (int k = 0; k < 4; k++) {
            __m512i q =
                _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(p + off[2 * k] + 2)));
            q = _mm512_inserti64x4(q, _mm256_loadu_si256((const __m256i *)(p + off[2 * k + 1] + 2)),
                                   1);
            const __m512i s = _mm512_dpbusd_epi32(corr, _mm512_xor_si512(q, flip), xv);
            acc[k] = _mm512_fmadd_ps(_mm512_permutexvar_ps(sel, sc), _mm512_cvtepi32_ps(s), acc[k]);
            sel = _mm512_add_epi32(sel, two);
        }
    }
    for (int k = 0; k < 4; k++) {
        out[2 * k] = s_hsum256(_mm512_castps512_ps256(acc[k]));
        out[2 * k + 1] =
            s_hsum256(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc[k]), 1)));
    }
}

/* One Q8_0 row (vec_dot). */
static float s_q8_0_row1(const uint8_t *w, const block_q8_0 *x, const int32_t *bl, int64_t nact) {
    const __m256i flip = _mm256_set1_epi8((char)0x80);
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < nact; i++) {
        const int64_t b = s_blk(bl, i);
        const __m256i xv = _mm256_loadu_si256((const __m256i *)x[b].qs);
        const __m256i corr = _mm256_sub_epi32(
            _mm256_setzero_si256(), _mm256_dpbusd_epi32(_mm256_setzero_si256(), flip, xv));
        const uint8_t *blk = w + (size_t)b * sizeof(block_q8_0);
        const __m256i q = _mm256_loadu_si256((const __m256i *)(blk + 2));
        const __m256i s = _mm256_dpbusd_epi32(corr, _mm256_xor_si256(q, flip), xv);
        acc = _mm256_fmadd_ps(_mm256_set1_ps(_cvtsh_ss(kern_ld16(blk)) * _cvtsh_ss(x[b].d)),
                              _mm256_cvtepi32_ps(s), acc);
    }
    return s_hsum256(acc);
}

/* ---- drivers -------------------------------------------------------------------------------- */

static void s_matvec_q(stp_type wtype, const void *w, size_t rb, const void *xq, const int32_t *bl,
                       int64_t nact, float *y, int64_t r0, int64_t r1) {
    const int per = wtype == STP_TYPE_Q4_0 ? 16 : 8;
    for (int64_t r = r0; r < r1; r += per) {
        const int nr = r1 - r >= per ? per : (int)(r1 - r);
        const uint8_t *wr = (const uint8_t *)w + (size_t)r * rb;
        float out[16];
        if (wtype == STP_TYPE_Q8_0 && nr == 1) {
            y[r - r0] = s_q8_0_row1(wr, xq, bl, nact);
            continue;
        }
        size_t off[16];
        for (int k = 0; k < per; k++)
            off[k] = (size_t)(k < nr ? k : nr - 1) * rb;
        if (wtype == STP_TYPE_Q4_0)
            s_q4_0_rows16(wr, off, xq, bl, nact, out, NULL, 0);
        else
            s_q8_0_rows8(wr, off, xq, bl, nact, out);
        for (int k = 0; k < nr; k++)
            y[r - r0 + k] = out[k];
    }
}

/* The gathers take 32-bit row offsets: 15 rows of the matrix must fit. */
static int s_ok(stp_type wtype, size_t rb) {
    return (wtype == STP_TYPE_Q4_0 || wtype == STP_TYPE_Q8_0) && rb <= (size_t)INT32_MAX / 16;
}

static float s_vec_dot(stp_type wtype, int64_t n, const void *w_row, const void *xq) {
    if (s_ok(wtype, 0)) {
        float y;
        s_matvec_q(wtype, w_row, 0, xq, NULL, n / QK8_0, &y, 0, 1);
        return y;
    }
    return kern_avx2_vec_dot(wtype, n, w_row, xq);
}

static void s_matvec(stp_type wtype, int64_t n, const void *w, size_t row_bytes, const void *xq,
                     float *y, int64_t r0, int64_t r1) {
    if (s_ok(wtype, row_bytes))
        s_matvec_q(wtype, w, row_bytes, xq, NULL, n / QK8_0, y, r0, r1);
    else
        kern_avx2_matvec(wtype, n, w, row_bytes, xq, y, r0, r1);
}

static void s_matmat(stp_type wtype, int64_t n, const void *w, size_t row_bytes, const void *xq,
                     size_t xq_stride, int64_t n_vec, float *y, size_t y_stride, int64_t r0,
                     int64_t r1) {
    if (!s_ok(wtype, row_bytes)) {
        kern_avx2_matmat(wtype, n, w, row_bytes, xq, xq_stride, n_vec, y, y_stride, r0, r1);
        return;
    }
    const int64_t per = wtype == STP_TYPE_Q4_0 ? 16 : 8;
    for (int64_t r = r0; r < r1; r += per) { /* a row group stays in L1/L2 for all vectors */
        const int64_t re = r1 - r < per ? r1 : r + per;
        for (int64_t v = 0; v < n_vec; v++)
            s_matvec_q(wtype, w, row_bytes, (const char *)xq + (size_t)v * xq_stride, NULL,
                       n / QK8_0, y + (size_t)v * y_stride + (r - r0), r, re);
    }
}

/* off[k] = byte offset of listed row i0 + k for k < per (the last listed row repeated past the
 * end: computed, then dropped). */
static void s_rows_off(const int32_t *rows, int64_t n_rows, int64_t i0, int per, size_t row_bytes,
                       size_t off[16]) {
    const int nr = n_rows - i0 >= per ? per : (int)(n_rows - i0);
    for (int k = 0; k < per; k++)
        off[k] = (size_t)rows[i0 + (k < nr ? k : nr - 1)] * row_bytes;
}

/* A row subset: groups of 16 (Q4_0) or 8 (Q8_0) listed rows through the same gather kernels. */
static void s_matvec_rows(stp_type wtype, int64_t n, const void *w, size_t row_bytes,
                          const void *xq, const int32_t *rows, int64_t n_rows, float *y) {
    int32_t max_row = 0;
    for (int64_t i = 0; i < n_rows; i++)
        max_row = rows[i] > max_row ? rows[i] : max_row;
    if (!s_ok(wtype, row_bytes) || (size_t)max_row * row_bytes > (size_t)INT32_MAX - row_bytes) {
        kern_avx2_matvec_rows(wtype, n, w, row_bytes, xq, rows, n_rows, y);
        return;
    }
    const int per = wtype == STP_TYPE_Q4_0 ? 16 : 8;
    size_t offs[2][16]; /* this pass's rows and the next's (Q4_0 prefetches the next) */
    for (int64_t i = 0; i < n_rows; i += per) {
        const int nr = n_rows - i >= per ? per : (int)(n_rows - i);
        size_t *off = offs[(i / per) & 1], *next = offs[(i / per + 1) & 1];
        float out[16];
        if (i == 0) s_rows_off(rows, n_rows, 0, per, row_bytes, off);
        const bool more = i + per < n_rows;
        if (more) s_rows_off(rows, n_rows, i + per, per, row_bytes, next);
        if (wtype == STP_TYPE_Q8_0 && nr == 1) {
            y[rows[i]] = s_q8_0_row1((const uint8_t *)w + off[0], xq, NULL, n / QK8_0);
            continue;
        }
        if (wtype == STP_TYPE_Q4_0)
            s_q4_0_rows16(w, off, xq, NULL, n / QK8_0, out, more ? next : NULL, row_bytes);
        else
            s_q8_0_rows8(w, off, xq, NULL, n / QK8_0, out);
        for (int k = 0; k < nr; k++)
            y[rows[i + k]] = out[k];
    }
}

/* stack_bl is filled before use (s_mask_list); GCC cannot see that through the inlining. */
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
static void s_matvec_sparse(stp_type wtype, int64_t n, const void *w, size_t row_bytes,
                            const void *xq, const uint8_t *block_mask, float *y, int64_t r0,
                            int64_t r1) {
    const int64_t nb = n / QK8_0;
    int32_t stack_bl[1024];
    int32_t *bl = NULL;
    if (s_ok(wtype, row_bytes)) bl = nb <= 1024 ? stack_bl : malloc(sizeof(int32_t) * (size_t)nb);
    if (!bl) {
        kern_avx2_matvec_sparse(wtype, n, w, row_bytes, xq, block_mask, y, r0, r1);
        return;
    }
    int64_t nact = 0;
    for (int64_t b = 0; b < nb; b++)
        if (block_mask[b]) bl[nact++] = (int32_t)b;
    s_matvec_q(wtype, w, row_bytes, xq, bl, nact, y, r0, r1);
    if (bl != stack_bl) free(bl);
}
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

/* ---- Q4_0 in the q4_0x16 layout (kern.h) ---------------------------------------------------- *
 * Per (group, block): 4 aligned zmm loads hold the 256 quant bytes, register k = bytes 4k..4k+3
 * of the 16 rows (row i in int32 lane i). Low nibbles (q & 0x0F) against the broadcast x[4k..]
 * and high nibbles kept in place (q & 0xF0, i.e. 16 * nibble) against x[16+4k..] give, after
 * 4 + 4 vpdpbusd and one exact >> 4, row i's integer block sum in lane i directly (no transpose,
 * no gather); the accumulator starts from -8 * sum(x) (precomputed once per call). One ymm load
 * of the 16 fp16 scales, vcvtph2ps, * dx, and acc16 = fma(isum16, scale16, acc16): the per-row
 * sequential fma of the reference. Up to 4 vectors share each weight load (matmat). */

/* Software prefetch along the packed stream, per block pair (9 lines): into L1 4 pairs ahead and
 * into L2 14 pairs ahead. Both levels were faster than L1 only, and L1 only faster than none,
 * reaching the bare read loop's memory limit (docs/BENCHMARKS.md, kernels). */
#ifndef S_X16_PF
#define S_X16_PF (4 * KERN_Q4X16_PAIR)
#endif
#ifndef S_X16_PF2
#define S_X16_PF2 (14 * KERN_Q4X16_PAIR)
#endif
static inline __attribute__((always_inline)) void s_x16_block(const kern_x16_job *j,
                                                              const uint8_t *q, const uint8_t *s,
                                                              int64_t b, __m512 *acc,
                                                              const int nv) {
    const __m512i m0f = _mm512_set1_epi8(0x0F), mf0 = _mm512_set1_epi8((char)0xF0);
    __m512i lo[4], hi[4];
#pragma GCC unroll 9
    for (int k = 0; k < 4; k++) {
        const __m512i w = _mm512_loadu_si512((const void *)(q + 64 * k));
        lo[k] = _mm512_and_si512(w, m0f);
        hi[k] = _mm512_and_si512(w, mf0);
    }
    const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)s));
    const int64_t e = b - j->c0;
#pragma GCC unroll 9
    for (int v = 0; v < nv; v++) {
        const int8_t *xv = j->x[v][b].qs;
        __m512i a = _mm512_set1_epi32(j->corr[v * j->stride + e]), h = _mm512_setzero_si512();
#pragma GCC unroll 9
        for (int k = 0; k < 4; k++) {
            int32_t xl, xh;
            memcpy(&xl, xv + 4 * k, 4);
            memcpy(&xh, xv + 16 + 4 * k, 4);
            a = _mm512_dpbusd_epi32(a, lo[k], _mm512_set1_epi32(xl));
            h = _mm512_dpbusd_epi32(h, hi[k], _mm512_set1_epi32(xh));
        }
        const __m512i isum = _mm512_add_epi32(a, _mm512_srai_epi32(h, 4));
        const __m512 sc = _mm512_mul_ps(dw, _mm512_set1_ps(j->dx[v * j->stride + e]));
        acc[v] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), sc, acc[v]);
    }
}

/* Blocks c0..c1-1 of one group for nv vectors; acc starts at 0 (c0 == 0) or at y. */
static inline __attribute__((always_inline)) void s_x16_group(const kern_x16_job *j, int64_t c1,
                                                              const int nv) {
    __m512 acc[4];
#pragma GCC unroll 9
    for (int v = 0; v < nv; v++)
        acc[v] = j->c0 == 0 ? _mm512_setzero_ps() : _mm512_loadu_ps(j->y[v]);
    int64_t b = j->c0;
    for (; b + 1 < c1; b += 2) {
        const uint8_t *p = j->G + (size_t)(b >> 1) * KERN_Q4X16_PAIR;
#pragma GCC unroll 9
        for (int l = 0; l < 9; l++)
            _mm_prefetch((const char *)(p + S_X16_PF + 64 * l), _MM_HINT_T0);
#pragma GCC unroll 9
        for (int l = 0; l < 9; l++)
            _mm_prefetch((const char *)(p + S_X16_PF2 + 64 * l), _MM_HINT_T1);
        s_x16_block(j, p, p + 512, b, acc, nv);
        s_x16_block(j, p + 256, p + 544, b + 1, acc, nv);
    }
    if (b < c1)
        s_x16_block(j, j->G + kern_q4x16_qoff(b), j->G + kern_q4x16_soff(j->nb, b), b, acc, nv);
#pragma GCC unroll 9
    for (int v = 0; v < nv; v++)
        _mm512_storeu_ps(j->y[v], acc[v]);
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

/* kern_q4_0x16_pack with whole-register moves: per block of 16 rows, each row's 16 quant bytes
 * are loaded (one 128-bit load), four rows to a register, and a 16 x 4 dword transpose (two
 * rounds of permutes) gives the four 64-byte lines [dword k of rows 0..15]; the 16 fp16 scales
 * come in one gather. The same bytes as the reference (test_kern_q4x16). */
static void s_pack_x16(const void *w, size_t row_bytes, int64_t n_rows, int64_t n_cols, void *dst) {
    const int64_t nb = n_cols / QK4_0, ng = n_rows / 16;
    if (row_bytes > (size_t)INT32_MAX / 16) {
        kern_q4_0x16_pack(w, row_bytes, n_rows, n_cols, dst);
        return;
    }
    const size_t gstride = (size_t)nb * 16 * sizeof(block_q4_0);
    const __m512i vidx =
        _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                           _mm512_set1_epi32((int)row_bytes));
    /* round 1: of rows 0..7 (a: rows 0-3, b: rows 4-7), dwords k and k+1 -> [k: rows 0-7 | k+1:
     * rows 0-7]; element e of a register pair is a's e (e < 16) or b's e - 16 */
    const __m512i p01 = _mm512_set_epi32(29, 25, 21, 17, 13, 9, 5, 1, 28, 24, 20, 16, 12, 8, 4, 0);
    const __m512i p23 =
        _mm512_set_epi32(31, 27, 23, 19, 15, 11, 7, 3, 30, 26, 22, 18, 14, 10, 6, 2);
    for (int64_t g = 0; g < ng; g++) {
        const uint8_t *R = (const uint8_t *)w + (size_t)(16 * g) * row_bytes;
        uint8_t *G = (uint8_t *)dst + (size_t)g * gstride;
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *B = R + (size_t)b * sizeof(block_q4_0);
            __m512i v[4];
            for (int r = 0; r < 4; r++) {
                const uint8_t *p = B + 2 + (size_t)(4 * r) * row_bytes;
                __m512i x = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)p));
                x = _mm512_inserti32x4(x, _mm_loadu_si128((const __m128i *)(p + row_bytes)), 1);
                x = _mm512_inserti32x4(x, _mm_loadu_si128((const __m128i *)(p + 2 * row_bytes)), 2);
                v[r] =
                    _mm512_inserti32x4(x, _mm_loadu_si128((const __m128i *)(p + 3 * row_bytes)), 3);
            }
            const __m512i lo01 = _mm512_permutex2var_epi32(v[0], p01, v[1]);
            const __m512i lo23 = _mm512_permutex2var_epi32(v[0], p23, v[1]);
            const __m512i hi01 = _mm512_permutex2var_epi32(v[2], p01, v[3]);
            const __m512i hi23 = _mm512_permutex2var_epi32(v[2], p23, v[3]);
            uint8_t *q = G + kern_q4x16_qoff(b);
            _mm512_storeu_si512(q, _mm512_shuffle_i64x2(lo01, hi01, 0x44));
            _mm512_storeu_si512(q + 64, _mm512_shuffle_i64x2(lo01, hi01, 0xEE));
            _mm512_storeu_si512(q + 128, _mm512_shuffle_i64x2(lo23, hi23, 0x44));
            _mm512_storeu_si512(q + 192, _mm512_shuffle_i64x2(lo23, hi23, 0xEE));
            const __m512i sc = _mm512_i32gather_epi32(vidx, B, 1); /* scale, then 2 quant bytes */
            _mm256_storeu_si256((__m256i *)(G + kern_q4x16_soff(nb, b)), _mm512_cvtepi32_epi16(sc));
        }
    }
}

const kern_ops kern_ops_avx512_table = {
    .level = "avx512vnni",
    .quantize_act = kern_avx2_quantize_act,
    .vec_dot = s_vec_dot,
    .matvec = s_matvec,
    .dequantize_row = kern_dequantize_row_ref,
    .matmat = s_matmat,
    .axpy_row = kern_avx2_axpy_row,
    .matvec_sparse = s_matvec_sparse,
    .matvec_rows = s_matvec_rows,
    .matvec_q4_0x16 = s_matvec_x16,
    .matmat_q4_0x16 = s_matmat_x16,
    .down_t_matvec = kern_down_t_matvec_avx512,
    .pack_q4_0x16 = s_pack_x16,
};
