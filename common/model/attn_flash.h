/* attn_flash: the body of the chunk kernel of attn_core.h, written once with GCC vector types
 * and included by each build: attention.c (generic, AF_W 4, multiply then add), attention_avx2.c
 * (AF_W 8, fused multiply-add) and attention_avx512.c (AF_W 16, fused). The includer defines
 * AF_W (floats per vector), AF_NAME (the function), AF_FMA(a, b, c) = a * b + c on af_v and
 * either AF_LOADH(p) (AF_W float16 at p as an af_v: float16 rows are read in place and widened
 * in registers where they are used) or AF_WIDEN(dst, src, n) (n float16 to float: each tile's
 * rows widened once into floats); Q8_0 rows are dequantized exactly (d * q, the floats of
 * attn_dequant_q8_0) into tile buffers; every type meets the same float arithmetic on the same
 * floats. The levels sum in different orders, so their bits differ by float rounding
 * (test_attn_core holds each to attn_head_ref); one level gives the same bits at any thread count,
 * batched or not.
 *
 * Per tile of ATTN_TILE positions: the key rows in blocks of AF_RB, whole (all n_grp kv heads,
 * in position order), each block requested into L2 AF_PF_KD rows ahead with the value rows
 * AF_PF_VD ahead (half-row reads, one kv head after another, left the hardware prefetchers far
 * behind); for each query and group the G heads' scores over the block (q·k over D in AF_W lanes,
 * reduced in a fixed tree, times 1/sqrt(D); AF_RB rows by AF_HB heads keep their accumulators and
 * loaded vectors in registers). Then per query and group: each head's max raised (acc and s,
 * double, scaled by exp(old - new) when it rises), p = exp(score - max) with a polynomial expf
 * (Cephes, <= 2 ulp), the tile's sum of p in position order, and the values: AF_HB heads at a
 * time share each loaded row, AF_VU vectors of dimensions per head stay in registers over the
 * tile, and the tile's float sums are added to acc in double. Every cached row is read once per
 * call (a token, or a prefill's block of tokens), not once per head or group. The blocking changes
 * no sum's order: a head's bits are those of one query, one row and one head at a time. */
#include <math.h>
#include <stdint.h>
#include <string.h>

typedef float af_v __attribute__((vector_size(AF_W * 4)));
typedef int32_t af_vi __attribute__((vector_size(AF_W * 4)));
typedef float af_vu __attribute__((vector_size(AF_W * 4), aligned(4), may_alias));

static inline af_v s_af_load(const float *p) {
    return *(const af_vu *)p;
}
static inline void s_af_store(float *p, af_v x) {
    *(af_vu *)p = x;
}
#if AF_W == 16
typedef float af_v8 __attribute__((vector_size(32)));
#define AF_BCAST(x) ((af_v){x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x})
#elif AF_W == 8
#define AF_BCAST(x) ((af_v){x, x, x, x, x, x, x, x})
#else
#define AF_BCAST(x) ((af_v){x, x, x, x})
#endif
typedef float af_v4 __attribute__((vector_size(16)));

static inline af_v s_af_splat(float x) {
    return AF_BCAST(x);
}

/* With AF_LOADH a float16 row is read as it is and widened in registers (AF_W halves to an
 * af_v, an exact conversion), so it costs no float copy in the cache; the row pointers of a call
 * point to floats (f32 cache, dequantized Q8_0) or to halves (f16 cache), `half` says which.
 * Without it (the generic build, whose conversion is a function call per element) each tile's
 * rows are widened once into floats, as Q8_0 rows are dequantized. */
#ifdef AF_LOADH
#define AF_HALF_IN_PLACE 1
#else
#define AF_HALF_IN_PLACE 0
#endif
static inline __attribute__((always_inline)) af_v s_af_loadr(const void *row, size_t i,
                                                             const int half) {
#if AF_HALF_IN_PLACE
    if (half) return AF_LOADH((const uint16_t *)row + i);
#endif
    (void)half;
    return s_af_load((const float *)row + i);
}
static inline __attribute__((always_inline)) float s_af_elem(const void *row, size_t i,
                                                             const int half) {
    return half ? kern_fp16_to_f32(((const uint16_t *)row)[i]) : ((const float *)row)[i];
}
static inline __attribute__((always_inline)) const void *s_af_adv(const void *row, size_t i,
                                                                  const int half) {
    return (const char *)row + i * (half ? 2 : 4);
}

/* Lanes summed as a tree: halves added until one lane is left (the same tree at every call),
 * in registers: t[i] + t[i + AF_W/2], ..., then (t0 + t2) + (t1 + t3). */
static inline float s_af_hsum(af_v x) {
#if AF_W == 16
    const af_v8 h8 = __builtin_shufflevector(x, x, 0, 1, 2, 3, 4, 5, 6, 7) +
                     __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15);
    const af_v4 h =
        __builtin_shufflevector(h8, h8, 0, 1, 2, 3) + __builtin_shufflevector(h8, h8, 4, 5, 6, 7);
#elif AF_W == 8
    const af_v4 h =
        __builtin_shufflevector(x, x, 0, 1, 2, 3) + __builtin_shufflevector(x, x, 4, 5, 6, 7);
#else
    const af_v4 h = x;
#endif
    return (h[0] + h[2]) + (h[1] + h[3]);
}

/* Half vectors of floats and vectors of doubles (AF_W / 2 lanes): a tile's float sums are
 * widened and added to the double accumulators a vector at a time (each lane on its own, the same
 * bits as one at a time). */
typedef float af_vh __attribute__((vector_size(AF_W * 2)));
typedef double af_vd __attribute__((vector_size(AF_W * 4)));
typedef double af_vdu __attribute__((vector_size(AF_W * 4), aligned(8), may_alias));
#if AF_W == 16
#define AF_LO(x) __builtin_shufflevector(x, x, 0, 1, 2, 3, 4, 5, 6, 7)
#define AF_HI(x) __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15)
#elif AF_W == 8
#define AF_LO(x) __builtin_shufflevector(x, x, 0, 1, 2, 3)
#define AF_HI(x) __builtin_shufflevector(x, x, 4, 5, 6, 7)
#else
#define AF_LO(x) __builtin_shufflevector(x, x, 0, 1)
#define AF_HI(x) __builtin_shufflevector(x, x, 2, 3)
#endif

/* acc[0..AF_W) += x, in double. */
static inline void s_af_add_dv(double *acc, af_v x) {
    af_vdu *a = (af_vdu *)acc;
    a[0] = a[0] + __builtin_convertvector((af_vh)AF_LO(x), af_vd);
    a[1] = a[1] + __builtin_convertvector((af_vh)AF_HI(x), af_vd);
}

/* a[0..n) *= al. */
static inline void s_af_scale_d(double *a, double al, int n) {
    int i = 0;
    for (; i + AF_W / 2 <= n; i += AF_W / 2)
        *(af_vdu *)(a + i) = *(af_vdu *)(a + i) * al;
    for (; i < n; i++)
        a[i] *= al;
}

/* exp(x) for x <= 0; 0 below -87 (and for -inf, a masked lane). Cephes expf's reduction and
 * polynomial; 2^n built in the exponent bits. */
static inline af_v s_af_exp(af_v x) {
    const af_vi live = x >= -87.0f;
    x = (af_v)(((af_vi)x & live) | ((af_vi)s_af_splat(-87.0f) & ~live));
    const af_v t = x * 1.44269504088896341f + 12582912.0f; /* round(x / ln 2) + 1.5 * 2^23 */
    const af_v n = t - 12582912.0f;
    const af_vi ni = (af_vi)t - 0x4B400000;
    af_v r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    af_v p = s_af_splat(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    const af_v y = p * (r * r) + r + 1.0f;
    const af_v pow2n = (af_v)((ni + 127) << 23);
    return (af_v)((af_vi)(y * pow2n) & live);
}

/* Blocking of the score products: AF_RB rows by AF_HB heads at once (independent accumulators
 * hide the FMA latency; a loaded key vector serves AF_HB heads, a query vector AF_RB rows).
 * AF_KEEP holds a loaded vector in a register, so the compiler does not fold it into each use as
 * a memory operand (that loads it again per use: the load ports, not the FMAs, were the limit). */
#define AF_RB 4
#if AF_W == 16
#define AF_HB 3
#else
#define AF_HB 2
#endif
#define AF_KEEP(x) __asm__("" : "+v"(x))

#if AF_W == 16 && defined(__AVX512F__)
/* {s_af_hsum(x[j]) * scale, j = 0..3} for four vectors at once: each step of the halving tree
 * adds the same lanes, two or four vectors' lanes side by side in a register. */
static inline __m128 s_af_hsum4(const af_v *x, float scale) {
    const __m512 a0 = (__m512)x[0], a1 = (__m512)x[1], a2 = (__m512)x[2], a3 = (__m512)x[3];
    /* t[i] + t[i + 8]: a0's in lanes 0..7, a1's in 8..15 (u01), a2's and a3's (u23) */
    const __m512 u01 = _mm512_add_ps(_mm512_shuffle_f32x4(a0, a1, _MM_SHUFFLE(1, 0, 1, 0)),
                                     _mm512_shuffle_f32x4(a0, a1, _MM_SHUFFLE(3, 2, 3, 2)));
    const __m512 u23 = _mm512_add_ps(_mm512_shuffle_f32x4(a2, a3, _MM_SHUFFLE(1, 0, 1, 0)),
                                     _mm512_shuffle_f32x4(a2, a3, _MM_SHUFFLE(3, 2, 3, 2)));
    /* t[i] + t[i + 4]: vector k's four in 128-bit lane k */
    const __m512 v = _mm512_add_ps(_mm512_shuffle_f32x4(u01, u23, _MM_SHUFFLE(2, 0, 2, 0)),
                                   _mm512_shuffle_f32x4(u01, u23, _MM_SHUFFLE(3, 1, 3, 1)));
    /* (t0 + t2) + (t1 + t3) in element 0 of each 128-bit lane */
    const __m512 w = _mm512_add_ps(v, _mm512_permute_ps(v, _MM_SHUFFLE(1, 0, 3, 2)));
    const __m512 y = _mm512_add_ps(w, _mm512_permute_ps(w, _MM_SHUFFLE(2, 3, 0, 1)));
    const __m512 z =
        _mm512_permutexvar_ps(_mm512_set_epi32(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 12, 8, 4, 0), y);
    return _mm_mul_ps(_mm512_castps512_ps128(z), _mm_set1_ps(scale));
}
#endif

/* sc[h * ATTN_TILE + r] = (q_h . k_r) * scale for the tile's n rows and the G heads. Each dot
 * product is one accumulator over D in order, the halving tree, then the tail in order: the order
 * of llamafile's tinyBLAS f32 kernel that ggml uses for K.Q on x86 at the same vector width.
 * Missing rows and heads of a block repeat the last one, unused. */
static inline __attribute__((always_inline)) void s_af_scores(const float *q, int G, int D,
                                                              const void *const *kr, size_t e,
                                                              int r0, int n, float scale, float *sc,
                                                              const int half) {
    const int D0 = D - D % AF_W;
    {
        const void *k[AF_RB];
#pragma GCC unroll 8
        for (int j = 0; j < AF_RB; j++)
            k[j] = s_af_adv(kr[r0 + j < n ? r0 + j : n - 1], e, half);
        for (int h = 0; h < G; h += AF_HB) {
            const float *qh[AF_HB];
            af_v acc[AF_HB][AF_RB];
#pragma GCC unroll 8
            for (int b = 0; b < AF_HB; b++) {
                qh[b] = q + (size_t)(h + b < G ? h + b : G - 1) * D;
#pragma GCC unroll 8
                for (int j = 0; j < AF_RB; j++)
                    acc[b][j] = (af_v){0};
            }
            for (int i = 0; i < D0; i += AF_W) {
                af_v x[AF_HB];
#pragma GCC unroll 8
                for (int b = 0; b < AF_HB; b++) {
                    x[b] = s_af_load(qh[b] + i);
                    AF_KEEP(x[b]);
                }
#pragma GCC unroll 8
                for (int j = 0; j < AF_RB; j++) {
                    af_v kv = s_af_loadr(k[j], (size_t)i, half);
                    AF_KEEP(kv);
#pragma GCC unroll 8
                    for (int b = 0; b < AF_HB; b++)
                        acc[b][j] = AF_FMA(kv, x[b], acc[b][j]);
                }
            }
#if AF_W == 16 && AF_RB == 4 && defined(__AVX512F__)
            if (D0 == D) { /* the four rows' trees side by side in one register, stored whole:
                            * a row's ATTN_TILE scores have room for them (r0 + 4 <= ATTN_TILE),
                            * and the softmax sets those past n to -inf */
#pragma GCC unroll 8
                for (int b = 0; b < AF_HB; b++)
                    if (h + b < G)
                        _mm_storeu_ps(sc + (h + b) * ATTN_TILE + r0, s_af_hsum4(acc[b], scale));
                continue;
            }
#endif
#pragma GCC unroll 8
            for (int b = 0; b < AF_HB; b++)
#pragma GCC unroll 8
                for (int j = 0; j < AF_RB; j++) {
                    float d = s_af_hsum(acc[b][j]);
                    for (int i = D0; i < D; i++)
                        d += qh[b][i] * s_af_elem(k[j], (size_t)i, half);
                    if (h + b < G && r0 + j < n) sc[(h + b) * ATTN_TILE + r0 + j] = d * scale;
                }
        }
    }
}

/* Vectors of dimensions one pass over the tile's rows keeps in registers per head (AF_HB heads
 * at once, each loaded value vector serving all of them). */
#define AF_VU (AF_W == 16 ? 8 : 4)

/* acc[b * D + i] (+)= the sum over the tile's n rows of p[b * ATTN_TILE + r] * v[r][i] for the nh
 * (1..AF_HB) heads b: each element summed in float over the tile in row order, added in double.
 * Missing heads of a block repeat the last one, unused. */
static inline __attribute__((always_inline)) void s_af_values(const void *const *vr, size_t e,
                                                              int n, int D, const float *p,
                                                              double *acc, int nh, const int half) {
    const float *ph[AF_HB];
#pragma GCC unroll 8
    for (int b = 0; b < AF_HB; b++)
        ph[b] = p + (b < nh ? b : nh - 1) * ATTN_TILE;
    int i0 = 0;
    for (; i0 + AF_VU * AF_W <= D; i0 += AF_VU * AF_W) {
        af_v x[AF_HB][AF_VU];
#pragma GCC unroll 8
        for (int b = 0; b < AF_HB; b++)
#pragma GCC unroll 8
            for (int u = 0; u < AF_VU; u++)
                x[b][u] = (af_v){0};
        for (int r = 0; r < n; r++) {
            af_v w[AF_HB];
#pragma GCC unroll 8
            for (int b = 0; b < AF_HB; b++)
                w[b] = s_af_splat(ph[b][r]);
            const void *vp = s_af_adv(vr[r], e + (size_t)i0, half);
#pragma GCC unroll 8
            for (int u = 0; u < AF_VU; u++) {
                af_v v = s_af_loadr(vp, (size_t)(u * AF_W), half);
                AF_KEEP(v);
#pragma GCC unroll 8
                for (int b = 0; b < AF_HB; b++)
                    x[b][u] = AF_FMA(w[b], v, x[b][u]);
            }
        }
#pragma GCC unroll 8
        for (int b = 0; b < AF_HB; b++)
            if (b < nh)
#pragma GCC unroll 8
                for (int u = 0; u < AF_VU; u++)
                    s_af_add_dv(acc + (size_t)b * D + i0 + u * AF_W, x[b][u]);
    }
    for (int b = 0; b < nh; b++) {
        const float *pb = ph[b];
        double *ab = acc + (size_t)b * D;
        int i = i0;
        for (; i + AF_W <= D; i += AF_W) {
            af_v x = {0};
            for (int r = 0; r < n; r++)
                x = AF_FMA(s_af_splat(pb[r]), s_af_loadr(vr[r], e + (size_t)i, half), x);
            s_af_add_dv(ab + i, x);
        }
        for (; i < D; i++) {
            float x = 0;
            for (int r = 0; r < n; r++)
                x += pb[r] * s_af_elem(vr[r], e + (size_t)i, half);
            ab[i] += (double)x;
        }
    }
}

/* n values of a Q8_0 row from element e0 as floats, d * q: whole blocks AF_W lanes at a time
 * (the products are exact, so the same floats as attn_dequant_q8_0, which takes the rest). The
 * AVX builds widen the bytes and the scale with their own instructions (GCC 12 made scalar code
 * of the generic vector conversion). */
static inline void s_af_dequant(float *dst, const block_q8_0 *row, size_t e0, int n) {
    if (e0 % QK8_0 || n % QK8_0) {
        attn_dequant_q8_0(dst, row, e0, n);
        return;
    }
    const block_q8_0 *b = row + e0 / QK8_0;
    for (int i = 0; i < n / QK8_0; i++) {
#if defined(__F16C__)
        const float df = _cvtsh_ss(b[i].d);
#else
        const float df = kern_fp16_to_f32(b[i].d);
#endif
#if AF_W == 16 && defined(__AVX512F__)
        const __m512 d = _mm512_set1_ps(df);
        for (int j = 0; j < QK8_0; j += 16) {
            const __m512i q = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(b[i].qs + j)));
            _mm512_storeu_ps(dst + i * QK8_0 + j, _mm512_mul_ps(_mm512_cvtepi32_ps(q), d));
        }
#elif AF_W == 8 && defined(__AVX2__)
        const __m256 d = _mm256_set1_ps(df);
        for (int j = 0; j < QK8_0; j += 8) {
            const __m256i q = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(b[i].qs + j)));
            _mm256_storeu_ps(dst + i * QK8_0 + j, _mm256_mul_ps(_mm256_cvtepi32_ps(q), d));
        }
#else
        for (int j = 0; j < QK8_0; j++)
            dst[i * QK8_0 + j] = (float)b[i].qs[j] * df;
#endif
    }
}

/* The online softmax step of a tile of n scores per head (sc, (G, ATTN_TILE)): each head's max
 * raised to the tile's (acc and s rescaled by exp(old - new), in double), p = exp(score - max) in
 * place (0 past n), and the sum of p in position order added to s in double. Eight heads' sums
 * run side by side. */
static inline void s_af_softmax(float *sc, int G, int D, int n, double *m, double *s, double *acc) {
    for (int h = 0; h < G; h++) {
        float *p = sc + h * ATTN_TILE;
        for (int r = n; r < ATTN_TILE; r++)
            p[r] = -INFINITY;
        af_v mx = s_af_load(p);
        for (int r = AF_W; r < ATTN_TILE; r += AF_W) {
            const af_v x = s_af_load(p + r);
            const af_vi gt = x > mx;
            mx = (af_v)(((af_vi)x & gt) | ((af_vi)mx & ~gt));
        }
#if AF_W == 16 && defined(__AVX512F__)
        const float mt = _mm512_reduce_max_ps((__m512)mx); /* a max in any order is the max */
#else
        float mt = mx[0];
        for (int i = 1; i < AF_W; i++)
            mt = mx[i] > mt ? mx[i] : mt;
#endif
        if (mt > m[h]) {
            const double al = exp(m[h] - (double)mt);
            s[h] *= al;
            s_af_scale_d(acc + (size_t)h * D, al, D);
            m[h] = mt;
        }
        const af_v mv = s_af_splat((float)m[h]);
        for (int r = 0; r < ATTN_TILE; r += AF_W)
            s_af_store(p + r, s_af_exp(s_af_load(p + r) - mv));
    }
    for (int h = 0; h < G; h += 8) {
        const float *ph[8];
        float sh[8];
#pragma GCC unroll 8
        for (int b = 0; b < 8; b++)
            ph[b] = sc + (h + b < G ? h + b : h) * ATTN_TILE, sh[b] = 0.0f;
        for (int r = 0; r < n; r++)
#pragma GCC unroll 8
            for (int b = 0; b < 8; b++)
                sh[b] += ph[b][r];
        for (int b = 0; b < 8 && h + b < G; b++)
            s[h + b] += (double)sh[b];
    }
}

/* Row r of the tile (n_grp kv heads side by side): the cache's own row (f32, or f16 read in
 * place), or widened / dequantized into buf as floats. */
static inline const void *s_af_row(const attn_group_args *a, int ng, size_t off, float *buf,
                                   const float *f, const uint16_t *h, const block_q8_0 *q) {
    if (f) return f + off;
#if AF_HALF_IN_PLACE
    if (h) return h + off;
#else
    if (h) {
        AF_WIDEN(buf, h + off, ng * a->D);
        return buf;
    }
#endif
    s_af_dequant(buf, q + off / QK8_0, (size_t)a->qoff, ng * a->D);
    return buf;
}

/* Bytes of a row's n_grp kv heads and their start in the key (value) array at a slot. */
static inline const char *s_af_rowp(const attn_group_args *a, int ng, int slot, int v,
                                    size_t *bytes) {
    const size_t off = (size_t)slot * a->stride;
    if (a->k) {
        *bytes = (size_t)ng * a->D * 4;
        return (const char *)((v ? a->v : a->k) + off);
    }
    if (a->kh) {
        *bytes = (size_t)ng * a->D * 2;
        return (const char *)((v ? a->vh : a->kh) + off);
    }
    *bytes = ((size_t)ng * a->D + QK8_0 - 1) / QK8_0 * sizeof(block_q8_0);
    return (const char *)((v ? a->vq : a->kq) + (off + (size_t)a->qoff) / QK8_0);
}

/* Software prefetch into L2 (an asm statement: GCC 12 dropped __builtin_prefetch from this kernel
 * at -O2) of the key rows AF_PF_KD positions and the value rows AF_PF_VD positions ahead of the
 * block of rows being scored: the distances that streamed fastest here (nearer or into L1 was
 * slower, the values as far ahead as the keys too). */
#ifndef AF_PF
#define AF_PF(p) __asm__ volatile("prefetcht1 %0" : : "m"(*(const char *)(p)))
#endif
#ifndef AF_PF_KD
#define AF_PF_KD 128
#define AF_PF_VD 64
#endif
#ifndef AF_PF_VSPREAD /* value rows requested during the value sums, spread over them (the         \
                       * memory keeps streaming while the values are summed) rather than with the  \
                       * key rows: faster with two threads streaming */
#define AF_PF_VSPREAD 1
#endif

/* The rows' lines (of all n_grp kv heads, whole) requested into the cache, one per 64 bytes. */
static inline void s_af_prefetch(const attn_group_args *a, int ng, int slot, int nrow, int v) {
    for (int r = 0; r < nrow; r++, slot = slot + 1 == a->cap ? 0 : slot + 1) {
        size_t bytes;
        const char *p = s_af_rowp(a, ng, slot, v, &bytes);
        for (size_t b = 0; b < bytes; b += 64)
            AF_PF(p + b);
    }
}

/* Per tile, the cached rows are read in position order, whole (all n_grp kv heads) and once per
 * call: for each query the scores of every group over each block of AF_RB key rows (key rows
 * requested AF_PF_KD ahead as the blocks are reached), then per query and group softmax and the
 * value sums (value rows requested AF_PF_VD ahead, spread over the sums). (A kv head's half rows
 * one group after another left the prefetchers far behind.) */
static inline __attribute__((always_inline)) void s_af_run(const attn_group_args *a,
                                                           const int half) {
    const int G = a->G, D = a->D, cap = a->cap, ng = a->n_grp > 0 ? a->n_grp : 1, GH = ng * G;
    const int nq = a->n_q > 1 ? a->n_q : 1;
    const float scale = 1.0f / sqrtf((float)D);
    const size_t W = (size_t)ng * D;
    float *sc = a->work;                                 /* (nq, GH, ATTN_TILE) scores, then p */
    float *kbuf = sc + (size_t)ATTN_NQ * GH * ATTN_TILE; /* (ATTN_TILE, W) keys as floats */
    float *vbuf = kbuf + (size_t)ATTN_TILE * W;          /* (ATTN_TILE, W) values as floats */
    const void *kr[ATTN_TILE], *vr[ATTN_TILE];
    int qb[ATTN_NQ], qe[ATTN_NQ], jb = a->c1, je = a->c0, hmax = a->hi;
    for (int i = 0; i < nq; i++) { /* each query's positions in this chunk: qb..qe-1 */
        const int lo = nq > 1 ? a->qlo[i] : a->lo, hi = nq > 1 ? a->qhi[i] : a->hi;
        qb[i] = lo > a->c0 ? lo : a->c0;
        qe[i] = hi + 1 < a->c1 ? hi + 1 : a->c1;
        if (qb[i] < qe[i]) jb = qb[i] < jb ? qb[i] : jb, je = qe[i] > je ? qe[i] : je;
        hmax = hi > hmax ? hi : hmax;
    }
    const int pf_last = a->pf_end > 0 && a->pf_end - 1 < hmax ? a->pf_end - 1 : hmax;
    for (int h = 0; h < nq * GH; h++)
        a->m[h] = -INFINITY, a->s[h] = 0.0f;
    for (size_t i = 0; i < (size_t)nq * GH * D; i++)
        a->acc[i] = 0.0;
    for (int t0 = jb - jb % ATTN_TILE; t0 < je; t0 += ATTN_TILE) {
        const int j0 = t0 > jb ? t0 : jb;
        const int j1 = t0 + ATTN_TILE < je ? t0 + ATTN_TILE : je, n = j1 - j0;
        const int slot0 = j0 % cap;
        int ready = 0; /* rows 0..ready-1 of the tile: requested ahead and kr set */
        for (int i = 0; i < nq; i++) {
            const int ri0 = (qb[i] > j0 ? qb[i] : j0) - j0, ri1 = (qe[i] < j1 ? qe[i] : j1) - j0;
            const int ni = ri1 - ri0;
            for (int r0 = 0; r0 < ni; r0 += AF_RB) {
                for (const int need = ri0 + r0 + AF_RB < n ? ri0 + r0 + AF_RB : n; ready < need;) {
                    const int nr = n - ready < AF_RB ? n - ready : AF_RB;
                    const int jk = j0 + ready + AF_PF_KD, jv = j0 + ready + AF_PF_VD;
                    if (AF_PF_KD > 0 && jk <= pf_last)
                        s_af_prefetch(a, ng, jk % cap,
                                      pf_last + 1 - jk < nr ? pf_last + 1 - jk : nr, 0);
                    if (!AF_PF_VSPREAD && AF_PF_VD >= 0 && jv <= pf_last)
                        s_af_prefetch(a, ng, jv % cap,
                                      pf_last + 1 - jv < nr ? pf_last + 1 - jv : nr, 1);
                    for (int r = ready, slot = (slot0 + ready) % cap; r < ready + nr;
                         r++, slot = slot + 1 == cap ? 0 : slot + 1)
                        kr[r] = s_af_row(a, ng, (size_t)slot * a->stride, kbuf + (size_t)r * W,
                                         a->k, a->kh, a->kq);
                    ready += nr;
                }
                const float *qi = a->q + (size_t)i * a->q_stride;
                for (int g = 0; g < ng; g++)
                    s_af_scores(qi + (size_t)g * G * D, G, D, kr + ri0, (size_t)g * D, r0, ni,
                                scale, sc + ((size_t)i * GH + (size_t)g * G) * ATTN_TILE, half);
            }
        }
        for (int r = 0, slot = slot0; r < n; r++, slot = slot + 1 == cap ? 0 : slot + 1)
            vr[r] =
                s_af_row(a, ng, (size_t)slot * a->stride, vbuf + (size_t)r * W, a->v, a->vh, a->vq);
        const int n_calls = nq * ng * ((G + AF_HB - 1) / AF_HB);
        const int vstep = (n + n_calls - 1) / n_calls;
        int vp = 0; /* rows of the tile whose value rows AF_PF_VD ahead are requested */
        for (int i = 0; i < nq; i++) {
            const int ri0 = (qb[i] > j0 ? qb[i] : j0) - j0, ri1 = (qe[i] < j1 ? qe[i] : j1) - j0;
            const int ni = ri1 - ri0;
            if (ni <= 0) continue;
            for (int g = 0; g < ng; g++) {
                const size_t hh = (size_t)i * GH + (size_t)g * G; /* first head of the group */
                float *scg = sc + hh * ATTN_TILE;
                double *accg = a->acc + hh * D;
                s_af_softmax(scg, G, D, ni, a->m + hh, a->s + hh, accg);
                for (int h = 0; h < G; h += AF_HB) {
                    if (AF_PF_VSPREAD && vp < n) {
                        const int jv = j0 + vp + AF_PF_VD, nr = n - vp < vstep ? n - vp : vstep;
                        if (jv <= pf_last)
                            s_af_prefetch(a, ng, jv % cap,
                                          pf_last + 1 - jv < nr ? pf_last + 1 - jv : nr, 1);
                        vp += nr;
                    }
                    s_af_values(vr + ri0, (size_t)g * D, ni, D, scg + h * ATTN_TILE,
                                accg + (size_t)h * D, G - h < AF_HB ? G - h : AF_HB, half);
                }
            }
        }
    }
}

void AF_NAME(const attn_group_args *a) {
    if (a->kh && AF_HALF_IN_PLACE)
        s_af_run(a, 1);
    else
        s_af_run(a, 0);
}
