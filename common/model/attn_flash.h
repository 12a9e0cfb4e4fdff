/* attn_flash: the body of the chunk kernel of attn_core.h, written once with GCC vector types
 * and included by each build: attention.c (generic, AF_W 4, multiply then add), attention_avx2.c
 * (AF_W 8, fused multiply-add) and attention_avx512.c (AF_W 16, fused). The includer defines
 * AF_W (floats per vector), AF_NAME (the function), AF_FMA(a, b, c) = a * b + c on af_v and
 * AF_WIDEN(dst, src, n) (n float16 to float); Q8_0 rows are dequantized exactly (d * q, the
 * floats of attn_dequant_q8_0) into the same tile buffers. The levels sum in different orders, so
 * their bits differ by float rounding (test_attn_core holds each to attn_head_ref); one level gives
 * the same bits at any thread count, batched or not.
 *
 * Per tile of ATTN_TILE positions: the G heads' scores (q·k over D in AF_W lanes, reduced in a
 * fixed tree, times 1/sqrt(D)), each head's max raised (acc and s, double, scaled by
 * exp(old - new) when it rises), p = exp(score - max) with a polynomial expf (Cephes, <= 2 ulp),
 * the tile's sum of p in position order, then the values: two heads at a time share each row,
 * 8 vectors of dimensions stay in registers over the tile, and the tile's float sums are added
 * to acc in double. Every cached row is read once per group, not once per head. */
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

/* sc[h * ATTN_TILE + r] = (q_h . k_r) * scale for the tile's n rows and the G heads. Each dot
 * product is one accumulator over D in order, the halving tree, then the tail in order: the order
 * of llamafile's tinyBLAS f32 kernel that ggml uses for K.Q on x86 at the same vector width. Four
 * rows by two heads run at once (eight independent accumulators: the FMA latency is hidden and a
 * loaded key vector serves two heads); missing rows and heads repeat the last one, unused. */
static inline void s_af_scores(const float *q, int G, int D, const float *const *kr, int n,
                               float scale, float *sc) {
    const int D0 = D - D % AF_W;
    for (int r0 = 0; r0 < n; r0 += 4) {
        const float *k0 = kr[r0], *k1 = kr[r0 + 1 < n ? r0 + 1 : r0],
                    *k2 = kr[r0 + 2 < n ? r0 + 2 : r0], *k3 = kr[r0 + 3 < n ? r0 + 3 : r0];
        for (int h = 0; h < G; h += 2) {
            const float *qa = q + (size_t)h * D, *qb = q + (size_t)(h + 1 < G ? h + 1 : h) * D;
            af_v a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, b0 = {0}, b1 = {0}, b2 = {0}, b3 = {0};
            for (int i = 0; i < D0; i += AF_W) {
                const af_v x = s_af_load(qa + i), y = s_af_load(qb + i);
                af_v k = s_af_load(k0 + i);
                a0 = AF_FMA(k, x, a0), b0 = AF_FMA(k, y, b0);
                k = s_af_load(k1 + i);
                a1 = AF_FMA(k, x, a1), b1 = AF_FMA(k, y, b1);
                k = s_af_load(k2 + i);
                a2 = AF_FMA(k, x, a2), b2 = AF_FMA(k, y, b2);
                k = s_af_load(k3 + i);
                a3 = AF_FMA(k, x, a3), b3 = AF_FMA(k, y, b3);
            }
            float d[8] = {s_af_hsum(a0), s_af_hsum(a1), s_af_hsum(a2), s_af_hsum(a3),
                          s_af_hsum(b0), s_af_hsum(b1), s_af_hsum(b2), s_af_hsum(b3)};
            const float *kk[4] = {k0, k1, k2, k3};
            for (int j = 0; j < 4; j++)
                for (int i = D0; i < D; i++) {
                    d[j] += qa[i] * kk[j][i];
                    d[4 + j] += qb[i] * kk[j][i];
                }
            for (int j = 0; j < 4 && r0 + j < n; j++) {
                sc[h * ATTN_TILE + r0 + j] = d[j] * scale;
                if (h + 1 < G) sc[(h + 1) * ATTN_TILE + r0 + j] = d[4 + j] * scale;
            }
        }
    }
}

/* acc[0..n) += x (a tile's float sum, added in double). */
static inline void s_af_add_d(double *acc, const float *x, int n) {
    for (int i = 0; i < n; i++)
        acc[i] += (double)x[i];
}

/* Vectors of dimensions one pass over the tile's rows keeps in registers per head (two heads). */
#define AF_VU (AF_W == 16 ? 8 : 4)

/* acc0/acc1 (+)= the sum over the tile's n rows of p0[r] * v[r] (p1: a second head, or NULL),
 * summed in float over the tile in row order, added in double. */
static inline void s_af_values(const float *const *vr, int n, int D, const float *p0,
                               const float *p1, double *acc0, double *acc1) {
    float t0[AF_VU * AF_W], t1[AF_VU * AF_W];
    int i0 = 0;
    for (; i0 + AF_VU * AF_W <= D; i0 += AF_VU * AF_W) {
        af_v x0[AF_VU], x1[AF_VU];
#pragma GCC unroll 8
        for (int u = 0; u < AF_VU; u++)
            x0[u] = (af_v){0}, x1[u] = (af_v){0};
        for (int r = 0; r < n; r++) {
            const af_v w0 = s_af_splat(p0[r]), w1 = s_af_splat(p1 ? p1[r] : 0.0f);
            const float *vp = vr[r] + i0;
#pragma GCC unroll 8
            for (int u = 0; u < AF_VU; u++) {
                const af_v v = s_af_load(vp + u * AF_W);
                x0[u] = AF_FMA(w0, v, x0[u]);
                x1[u] = AF_FMA(w1, v, x1[u]);
            }
        }
#pragma GCC unroll 8
        for (int u = 0; u < AF_VU; u++)
            s_af_store(t0 + u * AF_W, x0[u]), s_af_store(t1 + u * AF_W, x1[u]);
        s_af_add_d(acc0 + i0, t0, AF_VU * AF_W);
        if (p1) s_af_add_d(acc1 + i0, t1, AF_VU * AF_W);
    }
    for (; i0 + AF_W <= D; i0 += AF_W) {
        af_v x0 = {0}, x1 = {0};
        for (int r = 0; r < n; r++) {
            const af_v v = s_af_load(vr[r] + i0);
            x0 = AF_FMA(s_af_splat(p0[r]), v, x0);
            x1 = AF_FMA(s_af_splat(p1 ? p1[r] : 0.0f), v, x1);
        }
        s_af_store(t0, x0), s_af_store(t1, x1);
        s_af_add_d(acc0 + i0, t0, AF_W);
        if (p1) s_af_add_d(acc1 + i0, t1, AF_W);
    }
    for (; i0 < D; i0++) {
        float x0 = 0, x1 = 0;
        for (int r = 0; r < n; r++) {
            x0 += p0[r] * vr[r][i0];
            x1 += (p1 ? p1[r] : 0.0f) * vr[r][i0];
        }
        acc0[i0] += (double)x0;
        if (p1) acc1[i0] += (double)x1;
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

void AF_NAME(const attn_group_args *a) {
    const int G = a->G, D = a->D, cap = a->cap;
    const int j_begin = a->lo > a->c0 ? a->lo : a->c0;
    const int j_end = a->hi + 1 < a->c1 ? a->hi + 1 : a->c1;
    const float scale = 1.0f / sqrtf((float)D);
    double *m = a->m, *s = a->s, *acc = a->acc;
    float *sc = a->work;                        /* (G, ATTN_TILE) scores, then p */
    float *kbuf = sc + (size_t)G * ATTN_TILE;   /* (ATTN_TILE, D) widened f16 keys */
    float *vbuf = kbuf + (size_t)ATTN_TILE * D; /* (ATTN_TILE, D) widened f16 values */
    const float *kr[ATTN_TILE], *vr[ATTN_TILE];
    for (int h = 0; h < G; h++)
        m[h] = -INFINITY, s[h] = 0.0f;
    for (size_t i = 0; i < (size_t)G * D; i++)
        acc[i] = 0.0;
    if (j_begin >= j_end) return;
    for (int t0 = j_begin - j_begin % ATTN_TILE; t0 < j_end; t0 += ATTN_TILE) {
        const int j0 = t0 > j_begin ? t0 : j_begin;
        const int j1 = t0 + ATTN_TILE < j_end ? t0 + ATTN_TILE : j_end, n = j1 - j0;
        for (int r = 0, slot = j0 % cap; r < n; r++, slot = slot + 1 == cap ? 0 : slot + 1) {
            const size_t off = (size_t)slot * a->stride;
            if (a->k) {
                kr[r] = a->k + off, vr[r] = a->v + off;
            } else {
                if (a->kh)
                    AF_WIDEN(kbuf + (size_t)r * D, a->kh + off, D);
                else
                    s_af_dequant(kbuf + (size_t)r * D, a->kq + off / QK8_0, a->qoff, D);
                kr[r] = kbuf + (size_t)r * D, vr[r] = vbuf + (size_t)r * D;
            }
        }
        s_af_scores(a->q, G, D, kr, n, scale, sc);
        if (a->vh)
            for (int r = 0, slot = j0 % cap; r < n; r++, slot = slot + 1 == cap ? 0 : slot + 1)
                AF_WIDEN(vbuf + (size_t)r * D, a->vh + (size_t)slot * a->stride, D);
        else if (a->vq)
            for (int r = 0, slot = j0 % cap; r < n; r++, slot = slot + 1 == cap ? 0 : slot + 1)
                s_af_dequant(vbuf + (size_t)r * D, a->vq + (size_t)slot * a->stride / QK8_0,
                             a->qoff, D);
        for (int h = 0; h < G; h++) {
            float *p = sc + h * ATTN_TILE;
            float mt = -INFINITY;
            for (int r = 0; r < n; r++)
                mt = p[r] > mt ? p[r] : mt;
            for (int r = n; r < ATTN_TILE; r++)
                p[r] = -INFINITY;
            if (mt > m[h]) {
                const double al = exp(m[h] - (double)mt);
                s[h] *= al;
                double *ah = acc + (size_t)h * D;
                for (int i = 0; i < D; i++)
                    ah[i] *= al;
                m[h] = mt;
            }
            const af_v mv = s_af_splat((float)m[h]);
            for (int r = 0; r < ATTN_TILE; r += AF_W)
                s_af_store(p + r, s_af_exp(s_af_load(p + r) - mv));
            float sum = 0.0f;
            for (int r = 0; r < n; r++)
                sum += p[r];
            s[h] += (double)sum;
        }
        for (int h = 0; h < G; h += 2)
            s_af_values(vr, n, D, sc + h * ATTN_TILE, h + 1 < G ? sc + (h + 1) * ATTN_TILE : NULL,
                        acc + (size_t)h * D, h + 1 < G ? acc + (size_t)(h + 1) * D : NULL);
    }
}
