/* attn_flash: the body of the chunk kernel of attn_core.h, written once with GCC vector types
 * and included by each build: attention.c (generic, AF_W 4, multiply then add), attention_avx2.c
 * (AF_W 8, fused multiply-add) and attention_avx512.c (AF_W 16, fused). The includer defines
 * AF_W (floats per vector), AF_NAME (the function), AF_FMA(a, b, c) = a * b + c on af_v and
 * AF_WIDEN(dst, src, n) (n float16 to float); Q8_0 rows are dequantized exactly (d * q, the
 * floats of attn_dequant_q8_0) into the same tile buffers. The levels sum in different orders, so
 * their bits differ by float rounding (test_attn_core holds each to attn_head_ref); one level gives
 * the same bits at any thread count, batched or not.
 *
 * Per tile of ATTN_TILE positions, for each of the n_grp kv groups in turn (the tile's whole rows
 * are requested into L2 one tile ahead: half-row reads left the hardware prefetchers behind): the
 * G heads' scores (q·k over D in AF_W lanes, reduced in a fixed tree, times 1/sqrt(D); blocks of
 * AF_RB rows by AF_HB heads keep their accumulators and loaded vectors in registers), each head's
 * max raised (acc and s, double, scaled by exp(old - new) when it rises), p = exp(score - max)
 * with a polynomial expf (Cephes, <= 2 ulp), the tile's sum of p in position order, then the
 * values: AF_HB heads at a time share each loaded row, AF_VU vectors of dimensions per head stay
 * in registers over the tile, and the tile's float sums are added to acc in double. Every cached
 * row is read once per token, not once per head or per group. The register blocking changes no
 * sum's order: a head's bits are those of one row and one head at a time. */
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

/* sc[h * ATTN_TILE + r] = (q_h . k_r) * scale for the tile's n rows and the G heads. Each dot
 * product is one accumulator over D in order, the halving tree, then the tail in order: the order
 * of llamafile's tinyBLAS f32 kernel that ggml uses for K.Q on x86 at the same vector width.
 * Missing rows and heads of a block repeat the last one, unused. */
static inline void s_af_scores(const float *q, int G, int D, const float *const *kr, int n,
                               float scale, float *sc) {
    const int D0 = D - D % AF_W;
    for (int r0 = 0; r0 < n; r0 += AF_RB) {
        const float *k[AF_RB];
#pragma GCC unroll 8
        for (int j = 0; j < AF_RB; j++)
            k[j] = kr[r0 + j < n ? r0 + j : n - 1];
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
                    af_v kv = s_af_load(k[j] + i);
                    AF_KEEP(kv);
#pragma GCC unroll 8
                    for (int b = 0; b < AF_HB; b++)
                        acc[b][j] = AF_FMA(kv, x[b], acc[b][j]);
                }
            }
#pragma GCC unroll 8
            for (int b = 0; b < AF_HB; b++)
#pragma GCC unroll 8
                for (int j = 0; j < AF_RB; j++) {
                    float d = s_af_hsum(acc[b][j]);
                    for (int i = D0; i < D; i++)
                        d += qh[b][i] * k[j][i];
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
static inline void s_af_values(const float *const *vr, int n, int D, const float *p, double *acc,
                               int nh) {
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
            const float *vp = vr[r] + i0;
#pragma GCC unroll 8
            for (int u = 0; u < AF_VU; u++) {
                af_v v = s_af_load(vp + u * AF_W);
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
                x = AF_FMA(s_af_splat(pb[r]), s_af_load(vr[r] + i), x);
            s_af_add_dv(ab + i, x);
        }
        for (; i < D; i++) {
            float x = 0;
            for (int r = 0; r < n; r++)
                x += pb[r] * vr[r][i];
            ab[i] += (double)x;
        }
    }
}

/* n values of a Q8_0 row from element e0 as floats, d * q: whole blocks AF_W lanes at a time
 * (the products are exact, so the same floats as attn_dequant_q8_0, which takes the rest). */
static inline void s_af_dequant(float *dst, const block_q8_0 *row, size_t e0, int n) {
    if (e0 % QK8_0 || n % QK8_0) {
        attn_dequant_q8_0(dst, row, e0, n);
        return;
    }
    typedef int8_t af_vb __attribute__((vector_size(AF_W), aligned(1), may_alias));
    const block_q8_0 *b = row + e0 / QK8_0;
    for (int i = 0; i < n / QK8_0; i++) {
        const af_v d = s_af_splat(kern_fp16_to_f32(b[i].d));
        for (int j = 0; j < QK8_0; j += AF_W) {
            const af_vi q = __builtin_convertvector(*(const af_vb *)(b[i].qs + j), af_vi);
            s_af_store(dst + i * QK8_0 + j, __builtin_convertvector(q, af_v) * d);
        }
    }
}

/* The online softmax step of a tile of n scores per head (sc, (G, ATTN_TILE)): each head's max
 * raised to the tile's (acc and s rescaled by exp(old - new), in double), p = exp(score - max) in
 * place (0 past n), and the sum of p in position order added to s in double. Four heads' sums
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
        float mt = mx[0];
        for (int i = 1; i < AF_W; i++)
            mt = mx[i] > mt ? mx[i] : mt;
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
    for (int h = 0; h < G; h += 4) {
        const float *p0 = sc + h * ATTN_TILE, *p1 = sc + (h + 1 < G ? h + 1 : h) * ATTN_TILE,
                    *p2 = sc + (h + 2 < G ? h + 2 : h) * ATTN_TILE,
                    *p3 = sc + (h + 3 < G ? h + 3 : h) * ATTN_TILE;
        float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
        for (int r = 0; r < n; r++)
            s0 += p0[r], s1 += p1[r], s2 += p2[r], s3 += p3[r];
        s[h] += (double)s0;
        if (h + 1 < G) s[h + 1] += (double)s1;
        if (h + 2 < G) s[h + 2] += (double)s2;
        if (h + 3 < G) s[h + 3] += (double)s3;
    }
}

/* The key and value rows of positions j0..j1-1 requested into the cache ahead of their tile, one
 * request per 64-byte line, all n_grp kv heads' parts of a row at once: whole rows in position
 * order (a full layer's tile is one contiguous block). Reading half of every row, as one kv head
 * does, left the hardware prefetchers far behind (a third of a full stream's bandwidth). */
#ifndef AF_PF /* into L2: a tile of whole rows ahead is more than L1 holds */
#define AF_PF(p) __builtin_prefetch(p, 0, 2)
#endif
static inline void s_af_prefetch(const attn_group_args *a, int ng, int j0, int j1) {
    size_t bytes, esz;
    const char *kb, *vb;
    if (a->k)
        kb = (const char *)a->k, vb = (const char *)a->v, esz = 4;
    else if (a->kh)
        kb = (const char *)a->kh, vb = (const char *)a->vh, esz = 2;
    else
        kb = (const char *)(a->kq + a->qoff / QK8_0), vb = (const char *)(a->vq + a->qoff / QK8_0),
        esz = 0;
    bytes = esz ? (size_t)ng * a->D * esz
                : ((size_t)ng * a->D + QK8_0 - 1) / QK8_0 * sizeof(block_q8_0);
    for (int j = j0, slot = j0 % a->cap; j < j1; j++, slot = slot + 1 == a->cap ? 0 : slot + 1) {
        const size_t off = esz ? (size_t)slot * a->stride * esz
                               : (size_t)slot * a->stride / QK8_0 * sizeof(block_q8_0);
        for (size_t b = 0; b < bytes; b += 64)
            AF_PF(kb + off + b);
        for (size_t b = 0; b < bytes; b += 64)
            AF_PF(vb + off + b);
    }
}

void AF_NAME(const attn_group_args *a) {
    const int G = a->G, D = a->D, cap = a->cap, ng = a->n_grp > 0 ? a->n_grp : 1, GH = ng * G;
    const int j_begin = a->lo > a->c0 ? a->lo : a->c0;
    const int j_end = a->hi + 1 < a->c1 ? a->hi + 1 : a->c1;
    const float scale = 1.0f / sqrtf((float)D);
    float *sc = a->work;                        /* (G, ATTN_TILE) scores, then p */
    float *kbuf = sc + (size_t)G * ATTN_TILE;   /* (ATTN_TILE, D) widened f16 keys */
    float *vbuf = kbuf + (size_t)ATTN_TILE * D; /* (ATTN_TILE, D) widened f16 values */
    const float *kr[ATTN_TILE], *vr[ATTN_TILE];
    for (int h = 0; h < GH; h++)
        a->m[h] = -INFINITY, a->s[h] = 0.0f;
    for (size_t i = 0; i < (size_t)GH * D; i++)
        a->acc[i] = 0.0;
    if (j_begin >= j_end) return;
    for (int t0 = j_begin - j_begin % ATTN_TILE; t0 < j_end; t0 += ATTN_TILE) {
        const int j0 = t0 > j_begin ? t0 : j_begin;
        const int j1 = t0 + ATTN_TILE < j_end ? t0 + ATTN_TILE : j_end, n = j1 - j0;
        s_af_prefetch(a, ng, j1, j1 + ATTN_TILE < j_end ? j1 + ATTN_TILE : j_end);
        for (int g = 0; g < ng; g++) {      /* the groups one after another over the tile's rows */
            const size_t e = (size_t)g * D; /* this kv head's first element in a row */
            const int qoff = a->qoff + g * D;
            double *m = a->m + g * G, *s = a->s + g * G, *acc = a->acc + (size_t)g * G * D;
            for (int r = 0, slot = j0 % cap; r < n; r++, slot = slot + 1 == cap ? 0 : slot + 1) {
                const size_t off = (size_t)slot * a->stride;
                if (a->k) {
                    kr[r] = a->k + e + off, vr[r] = a->v + e + off;
                } else {
                    if (a->kh)
                        AF_WIDEN(kbuf + (size_t)r * D, a->kh + e + off, D);
                    else
                        s_af_dequant(kbuf + (size_t)r * D, a->kq + off / QK8_0, qoff, D);
                    kr[r] = kbuf + (size_t)r * D, vr[r] = vbuf + (size_t)r * D;
                }
            }
            s_af_scores(a->q + e * G, G, D, kr, n, scale, sc);
            if (a->vh)
                for (int r = 0, slot = j0 % cap; r < n; r++, slot = slot + 1 == cap ? 0 : slot + 1)
                    AF_WIDEN(vbuf + (size_t)r * D, a->vh + e + (size_t)slot * a->stride, D);
            else if (a->vq)
                for (int r = 0, slot = j0 % cap; r < n; r++, slot = slot + 1 == cap ? 0 : slot + 1)
                    s_af_dequant(vbuf + (size_t)r * D, a->vq + (size_t)slot * a->stride / QK8_0,
                                 qoff, D);
            s_af_softmax(sc, G, D, n, m, s, acc);
            for (int h = 0; h < G; h += AF_HB)
                s_af_values(vr, n, D, sc + h * ATTN_TILE, acc + (size_t)h * D,
                            G - h < AF_HB ? G - h : AF_HB);
        }
    }
}
