/* test_kern: the kernel module against hand-computed values and against its own reference.
 *
 * Covers fp16/bf16 rounding (exhaustive midpoints), quantize -> dequantize error bounds,
 * hand-built K-quant blocks (scale packing, Q3_K hmask, Q6_K offset, Q4_K/Q5_K mins), vec_dot
 * against a float64 dot of the dequantized operands, round-half-even activation ties, and
 * every SIMD level from kern_ops_all() against the reference on random data. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "kern/kern.h"
#include "th_skip.h"

/* ---- helpers -------------------------------------------------------------------------------- */

typedef struct rng {
    uint64_t s;
} rng;

static uint32_t rng_u32(rng *r) {
    r->s = r->s * 6364136223846793005ULL + 1442695040888963407ULL;
    return (uint32_t)(r->s >> 33);
}

static float rng_unif(rng *r) { /* [-1, 1) */
    return (float)rng_u32(r) / 2147483648.0f - 1.0f;
}

static float rng_gauss(rng *r) {
    float s = 0;
    for (int i = 0; i < 4; i++)
        s += rng_unif(r);
    return s * 0.8660254f;
}

static void *xalloc(size_t n) {
    void *p = aligned_alloc(64, (n + 63) / 64 * 64);
    assert_non_null(p);
    memset(p, 0, (n + 63) / 64 * 64);
    return p;
}

static uint32_t f2u(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static float u2f(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static size_t row_size(stp_type t, int64_t n) {
    return tensor_type_row_size(t, n);
}

/* Dequantize an activation (any act format) to float. */
static void act_dequant(stp_type wtype, const void *xq, float *x, int64_t n) {
    switch (kern_act_type(wtype)) {
    case STP_TYPE_Q8_K: {
        const block_q8_K *b = xq;
        for (int64_t i = 0; i < n; i++)
            x[i] = b[i / QK_K].d * (float)b[i / QK_K].qs[i % QK_K];
        break;
    }
    case STP_TYPE_Q8_1: {
        const block_q8_1 *b = xq;
        for (int64_t i = 0; i < n; i++)
            x[i] = kern_fp16_to_f32(b[i / 32].d) * (float)b[i / 32].qs[i % 32];
        break;
    }
    default: kern_dequantize_row_ref(kern_act_type(wtype), xq, x, n); break;
    }
}

/* Random weight row of type t: quantized from floats where a quantizer exists, else random
 * bytes with sane fp16 scales. zero_block >= 0 zeroes that block entirely. */
static void make_row(rng *r, stp_type t, int64_t n, void *dst, int zero_block) {
    float *f = malloc(sizeof(float) * (size_t)n);
    for (int64_t i = 0; i < n; i++)
        f[i] = rng_gauss(r);
    if (kern_quantize_row_ref(t, f, dst, n) != 0) {
        uint8_t *p = dst;
        const size_t bytes = row_size(t, n);
        for (size_t i = 0; i < bytes; i++)
            p[i] = (uint8_t)rng_u32(r);
        const int64_t nb = n / QK_K;
        for (int64_t b = 0; b < nb; b++) {
            stp_fp16 d = kern_f32_to_fp16(0.01f + 0.01f * rng_unif(r));
            stp_fp16 dm = kern_f32_to_fp16(0.005f + 0.004f * rng_unif(r));
            if (t == STP_TYPE_Q3_K) memcpy(&((block_q3_K *)dst)[b].d, &d, 2);
            if (t == STP_TYPE_Q6_K) memcpy(&((block_q6_K *)dst)[b].d, &d, 2);
            if (t == STP_TYPE_Q4_K) {
                ((block_q4_K *)dst)[b].d = d;
                ((block_q4_K *)dst)[b].dmin = dm;
            }
            if (t == STP_TYPE_Q5_K) {
                ((block_q5_K *)dst)[b].d = d;
                ((block_q5_K *)dst)[b].dmin = dm;
            }
        }
    }
    if (zero_block >= 0) {
        const stp_type_info *ti = tensor_type_info(t);
        const size_t bs = ti->blck == 1 ? 32 * ti->size : ti->size;
        if ((size_t)(zero_block + 1) * bs <= row_size(t, n))
            memset((uint8_t *)dst + (size_t)zero_block * bs, 0, bs);
    }
    free(f);
}

static const stp_type k_all_types[] = {STP_TYPE_F32,  STP_TYPE_F16,  STP_TYPE_BF16, STP_TYPE_Q8_0,
                                       STP_TYPE_Q4_0, STP_TYPE_Q4_1, STP_TYPE_Q3_K, STP_TYPE_Q4_K,
                                       STP_TYPE_Q5_K, STP_TYPE_Q6_K};
#define N_TYPES (sizeof k_all_types / sizeof k_all_types[0])

/* ---- fp16 / bf16 ---------------------------------------------------------------------------- */

static void test_kern_fp16_known_values(void **state) {
    (void)state;
    assert_int_equal(kern_f32_to_fp16(1.0f), 0x3C00);
    assert_int_equal(kern_f32_to_fp16(-2.0f), 0xC000);
    assert_int_equal(kern_f32_to_fp16(65504.0f), 0x7BFF);
    assert_int_equal(kern_f32_to_fp16(65519.99f), 0x7BFF);
    assert_int_equal(kern_f32_to_fp16(65520.0f), 0x7C00); /* tie to even -> inf */
    assert_int_equal(kern_f32_to_fp16(1e9f), 0x7C00);
    assert_int_equal(kern_f32_to_fp16(-INFINITY), 0xFC00);
    assert_int_equal(kern_f32_to_fp16(ldexpf(1, -24)), 0x0001);
    assert_int_equal(kern_f32_to_fp16(ldexpf(1, -25)), 0x0000);        /* tie -> even 0 */
    assert_int_equal(kern_f32_to_fp16(ldexpf(3, -25)), 0x0002);        /* 1.5 ulp -> 2 */
    assert_int_equal(kern_f32_to_fp16(ldexpf(1.5f, -25)), 0x0001);     /* 0.75 ulp -> 1 */
    assert_int_equal(kern_f32_to_fp16(1.0f + ldexpf(1, -11)), 0x3C00); /* tie -> even */
    assert_int_equal(kern_f32_to_fp16(1.0f + ldexpf(3, -11)), 0x3C02); /* tie -> even */
    assert_int_equal(kern_f32_to_fp16(ldexpf(1023, -24) + ldexpf(1, -25)), 0x0400); /* -> normal */
    stp_fp16 nan = kern_f32_to_fp16(NAN);
    assert_true((nan & 0x7C00) == 0x7C00 && (nan & 0x3FF) != 0 && (nan & 0x200));
    assert_true(isnan(kern_fp16_to_f32(0x7C01)));
    assert_true(isinf(kern_fp16_to_f32(0x7C00)));
    assert_true(kern_fp16_to_f32(0x0001) == ldexpf(1, -24));
    assert_true(kern_fp16_to_f32(0x3555) == 0.333251953125f);
}

static void test_kern_fp16_exhaustive_roundtrip_and_ties(void **state) {
    (void)state;
    for (uint32_t h = 0; h < 0x10000; h++) {
        if ((h & 0x7C00) == 0x7C00 && (h & 0x3FF)) continue; /* NaN */
        const float f = kern_fp16_to_f32((stp_fp16)h);
        assert_int_equal(kern_f32_to_fp16(f), h);
        if ((h & 0x7FFF) >= 0x7BFF) continue;
        /* midpoint to the next value of larger magnitude: ties to even, and 1 float ulp
         * either side goes to the nearer one */
        const float g = kern_fp16_to_f32((stp_fp16)(h + 1));
        const float mid = (float)(((double)f + (double)g) / 2);
        const uint32_t even = (h & 1) ? h + 1 : h;
        assert_int_equal(kern_f32_to_fp16(mid), even);
        assert_int_equal(kern_f32_to_fp16(u2f(f2u(mid) + 1)), h + 1);
        if (f2u(mid) & 0x7FFFFFFF) assert_int_equal(kern_f32_to_fp16(u2f(f2u(mid) - 1)), h);
    }
}

static void test_kern_bf16_rounding(void **state) {
    (void)state;
    assert_int_equal(kern_f32_to_bf16(1.0f), 0x3F80);
    assert_int_equal(kern_f32_to_bf16(u2f(0x3F808000)), 0x3F80); /* tie -> even */
    assert_int_equal(kern_f32_to_bf16(u2f(0x3F818000)), 0x3F82); /* tie -> even (up) */
    assert_int_equal(kern_f32_to_bf16(u2f(0x3F808001)), 0x3F81);
    assert_int_equal(kern_f32_to_bf16(u2f(0x7F800001)), 0x7FC0); /* signalling NaN -> quiet */
    assert_int_equal(kern_f32_to_bf16(u2f(0xFFC00000)), 0xFFC0);
    assert_int_equal(kern_f32_to_bf16(INFINITY), 0x7F80);
    assert_int_equal(kern_f32_to_bf16(u2f(0x7F7FFFFF)), 0x7F80); /* rounds up to inf */
    for (uint32_t h = 0; h < 0x10000; h++) {
        if ((h & 0x7F80) == 0x7F80 && (h & 0x7F)) continue;
        assert_int_equal(kern_f32_to_bf16(kern_bf16_to_f32((stp_bf16)h)), h);
    }
}

/* ---- quantize -> dequantize ----------------------------------------------------------------- */

static void test_kern_weight_quantize_roundtrip(void **state) {
    (void)state;
    rng r = {42};
    const stp_type types[] = {STP_TYPE_F32,  STP_TYPE_F16,  STP_TYPE_BF16,
                              STP_TYPE_Q8_0, STP_TYPE_Q4_0, STP_TYPE_Q4_1};
    const int64_t n = 32 * 64;
    float *x = xalloc(sizeof(float) * n), *y = xalloc(sizeof(float) * n);
    void *q = xalloc(row_size(STP_TYPE_F32, n));
    for (size_t t = 0; t < sizeof types / sizeof types[0]; t++) {
        for (int64_t i = 0; i < n; i++)
            x[i] = rng_gauss(&r) * (1.0f + (float)(i / 32));
        for (int i = 64; i < 96; i++)
            x[i] = 0.0f; /* an all-zero block */
        assert_int_equal(kern_quantize_row_ref(types[t], x, q, n), 0);
        kern_dequantize_row_ref(types[t], q, y, n);
        for (int64_t b = 0; b < n / 32; b++) {
            float amax = 0, mn = INFINITY, mx = -INFINITY;
            for (int j = 0; j < 32; j++) {
                amax = fmaxf(amax, fabsf(x[32 * b + j]));
                mn = fminf(mn, x[32 * b + j]);
                mx = fmaxf(mx, x[32 * b + j]);
            }
            for (int j = 0; j < 32; j++) {
                const float xv = x[32 * b + j], err = fabsf(y[32 * b + j] - xv);
                float bound;
                switch (types[t]) {
                case STP_TYPE_F32: bound = 0; break;
                case STP_TYPE_F16: bound = fabsf(xv) * ldexpf(1, -11); break;
                case STP_TYPE_BF16: bound = fabsf(xv) * ldexpf(1, -8); break;
                case STP_TYPE_Q8_0:
                    bound = amax / 127 * 0.5f * 1.001f + amax * ldexpf(1, -11);
                    break;
                case STP_TYPE_Q4_0: bound = amax / 8 * 1.001f + amax * ldexpf(1, -10); break;
                default:
                    bound = (mx - mn) / 15 * 0.5f * 1.001f + (fabsf(mn) + mx - mn) * ldexpf(1, -10);
                }
                if (err > bound)
                    fail_msg("%s block %ld elem %d: err %g > %g", tensor_type_name(types[t]),
                             (long)b, j, err, bound);
            }
        }
    }
    free(x);
    free(y);
    free(q);
}

static void test_kern_act_quantize_roundtrip(void **state) {
    (void)state;
    rng r = {7};
    const stp_type wtypes[] = {STP_TYPE_Q4_0, STP_TYPE_Q4_1, STP_TYPE_Q4_K, STP_TYPE_F16,
                               STP_TYPE_BF16};
    const int64_t n = 1024;
    float *x = xalloc(sizeof(float) * n), *y = xalloc(sizeof(float) * n);
    void *q = xalloc(kern_act_size(STP_TYPE_F32, n));
    for (size_t t = 0; t < sizeof wtypes / sizeof wtypes[0]; t++) {
        const int64_t bl = kern_act_type(wtypes[t]) == STP_TYPE_Q8_K ? 256 : 32;
        for (int64_t i = 0; i < n; i++)
            x[i] = rng_gauss(&r) * 3;
        for (int64_t i = bl; i < 2 * bl; i++)
            x[i] = 0.0f;
        kern_quantize_act_ref(wtypes[t], x, q, n);
        act_dequant(wtypes[t], q, y, n);
        for (int64_t b = 0; b < n / bl; b++) {
            float amax = 0;
            for (int j = 0; j < bl; j++)
                amax = fmaxf(amax, fabsf(x[bl * b + j]));
            for (int j = 0; j < bl; j++) {
                const float xv = x[bl * b + j], err = fabsf(y[bl * b + j] - xv);
                float bound;
                switch (kern_act_type(wtypes[t])) {
                case STP_TYPE_F16: bound = fabsf(xv) * ldexpf(1, -11); break;
                case STP_TYPE_BF16: bound = fabsf(xv) * ldexpf(1, -8); break;
                case STP_TYPE_Q8_K: bound = amax / 127 * 0.5f * 1.001f; break;
                default: bound = amax / 127 * 0.5f * 1.001f + amax * ldexpf(1, -11);
                }
                if (err > bound)
                    fail_msg("act %s block %ld: err %g > %g", tensor_type_name(wtypes[t]), (long)b,
                             err, bound);
            }
        }
        if (kern_act_type(wtypes[t]) == STP_TYPE_Q8_1) { /* s = fp16(d * sum q), d float32 */
            const block_q8_1 *b = q;
            for (int64_t i = 0; i < n / 32; i++) {
                float amax = 0;
                int sum = 0;
                for (int j = 0; j < 32; j++) {
                    amax = fmaxf(amax, fabsf(x[32 * i + j]));
                    sum += b[i].qs[j];
                }
                assert_int_equal(b[i].s, kern_f32_to_fp16(amax / 127.0f * (float)sum));
            }
        }
        if (kern_act_type(wtypes[t]) == STP_TYPE_Q8_K) { /* bsums and d exact */
            const block_q8_K *b = q;
            assert_true(b[1].d == 0.0f);
            for (int64_t i = 0; i < n / 256; i++)
                for (int g = 0; g < 16; g++) {
                    int sum = 0;
                    for (int j = 0; j < 16; j++)
                        sum += b[i].qs[16 * g + j];
                    assert_int_equal(b[i].bsums[g], sum);
                }
        }
    }
    free(x);
    free(y);
    free(q);
}

/* ---- rounding ties -------------------------------------------------------------------------- */

static void test_kern_q8_0_act_ties_round_to_even(void **state) {
    (void)state;
    const kern_ops *ops[4];
    const int nops = kern_ops_all(ops, 4);
    float x[32] = {127.0f, 0.5f, 1.5f, 2.5f, -0.5f, -1.5f, -2.5f, 3.5f, 100.5f, -126.5f};
    const int8_t want[10] = {127, 0, 2, 2, 0, -2, -2, 4, 100, -126};
    for (int k = 0; k < nops; k++) {
        block_q8_0 q;
        ops[k]->quantize_act(STP_TYPE_Q4_0, x, &q, 32);
        for (int j = 0; j < 10; j++)
            assert_int_equal(q.qs[j], want[j]);
        assert_int_equal(q.d, kern_f32_to_fp16(1.0f));
        block_q8_K qk[1];
        float xk[256] = {0};
        memcpy(xk, x, sizeof x);
        ops[k]->quantize_act(STP_TYPE_Q6_K, xk, qk, 256); /* max = +127: iscale = -1 */
        for (int j = 0; j < 10; j++)
            assert_int_equal(qk[0].qs[j], -want[j]);
        assert_true(qk[0].d == -1.0f);
        xk[0] = -127.0f; /* first max now negative: iscale = +1 */
        xk[20] = 127.0f; /* a later +127 must not be the max; -127/-127*127 -> 127 */
        ops[k]->quantize_act(STP_TYPE_Q4_K, xk, qk, 256);
        assert_int_equal(qk[0].qs[0], -127);
        assert_int_equal(qk[0].qs[20], 127);
        for (int j = 1; j < 10; j++)
            assert_int_equal(qk[0].qs[j], want[j]);
    }
    /* the weight quantizer rounds half away from zero (ggml's roundf) */
    block_q8_0 w;
    assert_int_equal(kern_quantize_row_ref(STP_TYPE_Q8_0, x, &w, 32), 0);
    const int8_t want_w[10] = {127, 1, 2, 3, -1, -2, -3, 4, 101, -127};
    for (int j = 0; j < 10; j++)
        assert_int_equal(w.qs[j], want_w[j]);
}

/* ---- hand-built K-quant blocks -------------------------------------------------------------- */

/* Pack 8 six-bit scales and mins the way ggml's Q4_K/Q5_K do. */
static void pack_k4_scales(const uint8_t sc[8], const uint8_t m[8], uint8_t out[12]) {
    for (int j = 0; j < 4; j++) {
        out[j] = (uint8_t)((sc[j] & 63) | ((sc[j + 4] >> 4) << 6));
        out[j + 4] = (uint8_t)((m[j] & 63) | ((m[j + 4] >> 4) << 6));
        out[j + 8] = (uint8_t)((sc[j + 4] & 0xF) | ((m[j + 4] & 0xF) << 4));
    }
}

static void test_kern_q4_K_q5_K_hand_built(void **state) {
    (void)state;
    uint8_t sc[8], mn[8];
    for (int j = 0; j < 8; j++) {
        sc[j] = (uint8_t)(j + 1 + (j >= 4 ? 40 : 0)); /* 4-7 use the top 2 bits */
        mn[j] = (uint8_t)(2 * j + 3 + (j >= 4 ? 33 : 0));
    }
    block_q4_K b4;
    block_q5_K b5;
    memset(&b4, 0, sizeof b4);
    memset(&b5, 0, sizeof b5);
    b4.d = b5.d = kern_f32_to_fp16(0.5f);
    b4.dmin = b5.dmin = kern_f32_to_fp16(0.25f);
    pack_k4_scales(sc, mn, b4.scales);
    pack_k4_scales(sc, mn, b5.scales);
    for (int e = 0; e < 256; e++) {
        const int j = e / 32, c = j / 2, h = j % 2, l = e % 32;
        const int q4 = (e * 7) % 16, q5 = (e * 11) % 32;
        b4.qs[32 * c + l] |= (uint8_t)(q4 << (4 * h));
        b5.qs[32 * c + l] |= (uint8_t)((q5 & 15) << (4 * h));
        if (q5 & 16) b5.qh[l] |= (uint8_t)(1 << j);
    }
    float y4[256], y5[256];
    kern_dequantize_row_ref(STP_TYPE_Q4_K, &b4, y4, 256);
    kern_dequantize_row_ref(STP_TYPE_Q5_K, &b5, y5, 256);
    for (int e = 0; e < 256; e++) {
        const int j = e / 32;
        const float w4 = 0.5f * sc[j] * (float)((e * 7) % 16) - 0.25f * mn[j];
        const float w5 = 0.5f * sc[j] * (float)((e * 11) % 32) - 0.25f * mn[j];
        assert_float_equal(y4[e], w4, 1e-6);
        assert_float_equal(y5[e], w5, 1e-6);
    }
}

static void test_kern_q6_K_hand_built(void **state) {
    (void)state;
    block_q6_K b;
    memset(&b, 0, sizeof b);
    b.d = kern_f32_to_fp16(0.25f);
    for (int j = 0; j < 16; j++)
        b.scales[j] = (int8_t)(j * 9 - 70); /* negative and positive */
    for (int e = 0; e < 256; e++) {
        const int h = e / 128, k = e % 128, g = k / 32, l = k % 32, q = (e * 5 + 3) % 64;
        uint8_t *ql = b.ql + 64 * h + (g & 1) * 32 + l;
        *ql |= (uint8_t)((q & 15) << (g >= 2 ? 4 : 0));
        b.qh[32 * h + l] |= (uint8_t)((q >> 4) << (2 * g));
    }
    float y[256];
    kern_dequantize_row_ref(STP_TYPE_Q6_K, &b, y, 256);
    for (int e = 0; e < 256; e++) {
        const float want = 0.25f * (float)b.scales[e / 16] * (float)((e * 5 + 3) % 64 - 32);
        assert_float_equal(y[e], want, 1e-6);
    }
}

static void test_kern_q3_K_hand_built(void **state) {
    (void)state;
    block_q3_K b;
    memset(&b, 0, sizeof b);
    b.d = kern_f32_to_fp16(0.5f);
    int s[16];
    for (int j = 0; j < 16; j++) {
        s[j] = (j * 23 + 5) % 64; /* 6-bit stored scale, value s - 32 */
        if (j < 8)
            b.scales[j] |= (uint8_t)(s[j] & 15);
        else
            b.scales[j - 8] |= (uint8_t)((s[j] & 15) << 4);
        b.scales[8 + j % 4] |= (uint8_t)((s[j] >> 4) << (2 * (j / 4)));
    }
    for (int e = 0; e < 256; e++) {
        const int h = e / 128, k = e % 128, sg = k / 32, l = k % 32, q = (e * 3) % 8 - 4;
        b.qs[32 * h + l] |= (uint8_t)(((q + 4) & 3) << (2 * sg));
        if (q >= 0) b.hmask[l] |= (uint8_t)(1 << (4 * h + sg)); /* set bit = no -4 */
    }
    float y[256];
    kern_dequantize_row_ref(STP_TYPE_Q3_K, &b, y, 256);
    for (int e = 0; e < 256; e++) {
        const float want = 0.5f * (float)(s[e / 16] - 32) * (float)((e * 3) % 8 - 4);
        assert_float_equal(y[e], want, 1e-6);
    }
}

/* ---- vec_dot against dequantized operands --------------------------------------------------- */

static void test_kern_vec_dot_matches_dequant(void **state) {
    (void)state;
    rng r = {99};
    const int64_t n = 1024;
    for (size_t t = 0; t < N_TYPES; t++) {
        const stp_type wt = k_all_types[t];
        void *w = xalloc(row_size(wt, n));
        void *xq = xalloc(kern_act_size(wt, n));
        float *x = xalloc(sizeof(float) * n), *wd = xalloc(sizeof(float) * n),
              *xd = xalloc(sizeof(float) * n);
        for (int rep = 0; rep < 4; rep++) {
            make_row(&r, wt, n, w, rep == 1 ? 1 : -1);
            for (int64_t i = 0; i < n; i++)
                x[i] = rng_gauss(&r);
            if (rep == 2) memset(x, 0, sizeof(float) * 256);
            kern_quantize_act_ref(wt, x, xq, n);
            kern_dequantize_row_ref(wt, w, wd, n);
            act_dequant(wt, xq, xd, n);
            double want = 0, mag = 0;
            for (int64_t i = 0; i < n; i++) {
                want += (double)wd[i] * xd[i];
                mag += fabs((double)wd[i] * xd[i]);
            }
            if (wt == STP_TYPE_Q4_1) { /* ggml's min term uses the stored block sum s */
                const block_q4_1 *bw = w;
                const block_q8_1 *bx = xq;
                for (int64_t b = 0; b < n / 32; b++) {
                    double dsum = 0;
                    for (int j = 0; j < 32; j++)
                        dsum += xd[32 * b + j];
                    want += (double)kern_fp16_to_f32(bw[b].m) *
                            ((double)kern_fp16_to_f32(bx[b].s) - dsum);
                }
            }
            const float got = kern_vec_dot_ref(wt, n, w, xq);
            if (fabs(got - want) > 1e-4 * mag + 1e-6)
                fail_msg("%s rep %d: vec_dot %g, dequant dot %g (mag %g)", tensor_type_name(wt),
                         rep, got, want, mag);
        }
        free(w);
        free(xq);
        free(x);
        free(wd);
        free(xd);
    }
}

/* ---- SIMD levels against the reference ------------------------------------------------------ */

static void check_close(const char *what, const kern_ops *o, stp_type wt, float got, float want,
                        double mag) {
    if ((wt == STP_TYPE_Q4_0 || wt == STP_TYPE_Q8_0) && f2u(got) != f2u(want))
        fail_msg("%s %s %s: got %.9g want %.9g (must be bit-identical)", o->level,
                 tensor_type_name(wt), what, got, want);
    if (!(fabs((double)got - want) <= 1e-5 * mag + 1e-6))
        fail_msg("%s %s %s: got %.9g want %.9g (mag %g)", o->level, tensor_type_name(wt), what, got,
                 want, mag);
}

static void test_kern_simd_matches_ref(void **state) {
    (void)state;
    const kern_ops *ops[4];
    const int nops = kern_ops_all(ops, 4);
    assert_true(nops >= 1);
    assert_string_equal(ops[0]->level, "ref");
    rng r = {2024};
    const int64_t rows_list[] = {1, 3, 4, 5, 7, 9};
    const int64_t ns_small[] = {32, 64, 96, 256 + 32, 4096 + 96}; /* odd blocks, > one chunk */
    const int64_t ns_k[] = {256, 768};
    for (size_t t = 0; t < N_TYPES; t++) {
        const stp_type wt = k_all_types[t];
        const int is_k = tensor_type_info(wt)->blck == 256;
        const int64_t *ns = is_k ? ns_k : ns_small;
        const size_t nn = is_k ? 2 : 5;
        for (size_t ni = 0; ni < nn; ni++) {
            const int64_t n = ns[ni];
            const int64_t rows = rows_list[(ni + t) % 6] + (ni == 0 ? 4 : 0);
            const size_t rb = row_size(wt, n), xs = kern_act_size(wt, n);
            uint8_t *w = xalloc(rb * (size_t)rows);
            for (int64_t k = 0; k < rows; k++)
                make_row(&r, wt, n, w + k * rb, k == 1 ? 0 : -1);
            const int nv = 3;
            float *x = xalloc(sizeof(float) * (size_t)n * nv);
            for (int64_t i = 0; i < n * nv; i++)
                x[i] = rng_gauss(&r) * 2;
            memset(x, 0, sizeof(float) * (size_t)(is_k ? 256 : 32)); /* a zero act block */
            uint8_t *xq_ref = xalloc(xs * nv), *xq = xalloc(xs * nv);
            for (int v = 0; v < nv; v++)
                kern_quantize_act_ref(wt, x + v * n, xq_ref + v * xs, n);
            float *want = xalloc(sizeof(float) * rows * nv),
                  *got = xalloc(sizeof(float) * rows * nv);
            double *mag = xalloc(sizeof(double) * rows * nv);
            float *wd = xalloc(sizeof(float) * n), *xd = xalloc(sizeof(float) * n);
            for (int v = 0; v < nv; v++) {
                kern_matvec_ref(wt, n, w, rb, xq_ref + v * xs, want + v * rows, 0, rows);
                act_dequant(wt, xq_ref + v * xs, xd, n);
                for (int64_t k = 0; k < rows; k++) {
                    kern_dequantize_row_ref(wt, w + k * rb, wd, n);
                    double m = 0;
                    for (int64_t i = 0; i < n; i++)
                        m += fabs((double)wd[i] * xd[i]);
                    mag[v * rows + k] = m;
                }
            }
            for (int o = 0; o < nops; o++) {
                for (int v = 0; v < nv; v++)
                    ops[o]->quantize_act(wt, x + v * n, xq + v * xs, n);
                if (memcmp(xq, xq_ref, xs * nv) != 0)
                    fail_msg("%s quantize_act for %s differs from ref", ops[o]->level,
                             tensor_type_name(wt));
                for (int v = 0; v < nv; v++) {
                    ops[o]->matvec(wt, n, w, rb, xq + v * xs, got, 0, rows);
                    for (int64_t k = 0; k < rows; k++)
                        check_close("matvec", ops[o], wt, got[k], want[v * rows + k],
                                    mag[v * rows + k]);
                    ops[o]->matvec(wt, n, w, rb, xq + v * xs, got, 1, rows); /* offset r0 */
                    for (int64_t k = 1; k < rows; k++)
                        check_close("matvec r0", ops[o], wt, got[k - 1], want[v * rows + k],
                                    mag[v * rows + k]);
                    for (int64_t k = 0; k < rows; k++)
                        check_close("vec_dot", ops[o], wt,
                                    ops[o]->vec_dot(wt, n, w + k * rb, xq + v * xs),
                                    want[v * rows + k], mag[v * rows + k]);
                }
                /* matmat with y_stride > rows and r0 > 0 */
                const size_t ys = (size_t)rows + 2;
                float *ym = xalloc(sizeof(float) * ys * nv);
                ops[o]->matmat(wt, n, w, rb, xq, xs, nv, ym, ys, 1, rows);
                for (int v = 0; v < nv; v++)
                    for (int64_t k = 1; k < rows; k++)
                        check_close("matmat", ops[o], wt, ym[v * ys + k - 1], want[v * rows + k],
                                    mag[v * rows + k]);
                free(ym);
                /* axpy_row vs reference */
                float *ya = xalloc(sizeof(float) * n), *yb = xalloc(sizeof(float) * n);
                for (int64_t i = 0; i < n; i++)
                    ya[i] = yb[i] = x[i];
                kern_axpy_row_ref(wt, n, w + rb * (size_t)(rows - 1), -0.75f, ya);
                ops[o]->axpy_row(wt, n, w + rb * (size_t)(rows - 1), -0.75f, yb);
                for (int64_t i = 0; i < n; i++)
                    if (fabsf(ya[i] - yb[i]) > 1e-5f * (fabsf(ya[i]) + fabsf(x[i])) + 1e-6f)
                        fail_msg("%s axpy %s [%ld]: %g vs %g", ops[o]->level, tensor_type_name(wt),
                                 (long)i, yb[i], ya[i]);
                /* dequantize_row equal */
                ops[o]->dequantize_row(wt, w, ya, n);
                kern_dequantize_row_ref(wt, w, yb, n);
                assert_memory_equal(ya, yb, sizeof(float) * n);
                free(ya);
                free(yb);
            }
            free(w);
            free(x);
            free(xq_ref);
            free(xq);
            free(want);
            free(got);
            free(mag);
            free(wd);
            free(xd);
        }
    }
}

/* Q4_0/Q8_0: every level bit-identical to the reference for matvec (row groups of 16 and 8 plus
 * tails, r0 > 0), vec_dot, matmat and matvec_sparse; the sparse form equals matvec when the
 * mask marks every nonzero activation block, and the reference follows ggml's order (checked
 * on a hand-computed two-block example). */
static void test_kern_q_simd_bit_exact(void **state) {
    (void)state;
    const kern_ops *ops[4];
    const int nops = kern_ops_all(ops, 4);
    rng r = {77};
    const stp_type types[] = {STP_TYPE_Q4_0, STP_TYPE_Q8_0};
    const int64_t ns[] = {32, 96, 4096 + 96, 16384 + 32};
    const int64_t rows_l[] = {1, 5, 16, 37};
    for (int t = 0; t < 2; t++) {
        const stp_type wt = types[t];
        for (int ni = 0; ni < 4; ni++) {
            const int64_t n = ns[ni], nb = n / 32;
            const int64_t rows = rows_l[(ni + t) % 4] + (ni == 3 ? 0 : 16 * ni);
            const size_t rb = row_size(wt, n), xs = kern_act_size(wt, n);
            uint8_t *w = xalloc(rb * (size_t)rows);
            for (int64_t k = 0; k < rows; k++)
                make_row(&r, wt, n, w + k * rb, k == 1 ? 0 : -1);
            const int nv = 5;
            float *x = xalloc(sizeof(float) * (size_t)(n * nv));
            uint8_t *mask = xalloc((size_t)nb), *xq = xalloc(xs * nv);
            for (int64_t i = 0; i < n * nv; i++)
                x[i] = rng_gauss(&r) * 3;
            for (int64_t b = 0; b < nb; b++) { /* vector 0: ~75% zero blocks (ReGLU-like) */
                mask[b] = (uint8_t)(rng_u32(&r) % 4 == 0);
                if (!mask[b]) memset(x + 32 * b, 0, sizeof(float) * 32);
            }
            for (int v = 0; v < nv; v++)
                kern_quantize_act_ref(wt, x + v * n, xq + v * xs, n);
            float *want = xalloc(sizeof(float) * (size_t)(rows * nv));
            float *got = xalloc(sizeof(float) * (size_t)(rows * nv));
            for (int v = 0; v < nv; v++)
                kern_matvec_ref(wt, n, w, rb, xq + v * xs, want + v * rows, 0, rows);
            kern_matvec_sparse_ref(wt, n, w, rb, xq, mask, got, 0, rows);
            assert_memory_equal(got, want, sizeof(float) * (size_t)rows);
            for (int o = 0; o < nops; o++) {
                for (int v = 0; v < nv; v++) {
                    ops[o]->matvec(wt, n, w, rb, xq + v * xs, got, 0, rows);
                    for (int64_t k = 0; k < rows; k++)
                        check_close("matvec", ops[o], wt, got[k], want[v * rows + k], 0);
                    ops[o]->matvec(wt, n, w, rb, xq + v * xs, got, 3, rows);
                    for (int64_t k = 3; k < rows; k++)
                        check_close("matvec r0=3", ops[o], wt, got[k - 3], want[v * rows + k], 0);
                    for (int64_t k = 0; k < rows; k += 3)
                        check_close("vec_dot", ops[o], wt,
                                    ops[o]->vec_dot(wt, n, w + k * rb, xq + v * xs),
                                    want[v * rows + k], 0);
                }
                ops[o]->matmat(wt, n, w, rb, xq, xs, nv, got, (size_t)rows, 0, rows);
                for (int64_t k = 0; k < rows * nv; k++)
                    check_close("matmat", ops[o], wt, got[k], want[k], 0);
                ops[o]->matvec_sparse(wt, n, w, rb, xq, mask, got, 1, rows);
                for (int64_t k = 1; k < rows; k++)
                    check_close("matvec_sparse", ops[o], wt, got[k - 1], want[k], 0);
            }
            free(w);
            free(x);
            free(mask);
            free(xq);
            free(want);
            free(got);
        }
    }
    /* Order check by hand: two Q8_0 blocks, weights 1 everywhere, d_w = 1; activation lanes. */
    block_q8_0 wb[2], xb[2];
    for (int b = 0; b < 2; b++) {
        wb[b].d = kern_f32_to_fp16(1.0f);
        memset(wb[b].qs, 1, 32);
        xb[b].d = kern_f32_to_fp16(b ? 1.0f / 1024 : 1024.0f);
        memset(xb[b].qs, 0, 32);
    }
    xb[0].qs[0] = 1;  /* lane 0 of block 0: 1024 */
    xb[1].qs[4] = 1;  /* lane 1 of block 1: 1/1024 */
    xb[1].qs[31] = 3; /* lane 7 of block 1: 3/1024 */
    const float want8 = ((1024.0f + 0.0f) + (0.0f + 0.0f)) + ((1.0f / 1024 + 3.0f / 1024) + 0.0f);
    assert_true(f2u(kern_vec_dot_ref(STP_TYPE_Q8_0, 64, wb, xb)) == f2u(want8));
}

/* quantize_act of every level must be bit-identical to the reference on random data, including
 * values near rounding boundaries and blocks whose largest |x| occurs with both signs. */
static void test_kern_simd_quantize_act_exact(void **state) {
    (void)state;
    const kern_ops *ops[4];
    const int nops = kern_ops_all(ops, 4);
    rng r = {5};
    const int64_t n = 256 * 16;
    float *x = xalloc(sizeof(float) * n);
    uint8_t *a = xalloc(kern_act_size(STP_TYPE_F32, n)),
            *b = xalloc(kern_act_size(STP_TYPE_F32, n));
    const stp_type wts[] = {STP_TYPE_Q4_0, STP_TYPE_Q8_0, STP_TYPE_Q4_1, STP_TYPE_Q4_K,
                            STP_TYPE_Q6_K, STP_TYPE_F16,  STP_TYPE_BF16, STP_TYPE_F32};
    for (int rep = 0; rep < 20; rep++) {
        for (int64_t i = 0; i < n; i++) {
            x[i] = rng_gauss(&r) * (rep + 1);
            if (rng_u32(&r) % 8 == 0)
                x[i] = (float)((int)(rng_u32(&r) % 255) - 127) * 0.5f; /* ties */
        }
        x[300] = 9.0f * (rep + 1); /* both signs of the max in block 1 */
        x[400] = -9.0f * (rep + 1);
        for (size_t t = 0; t < sizeof wts / sizeof wts[0]; t++) {
            kern_quantize_act_ref(wts[t], x, a, n);
            for (int o = 0; o < nops; o++) {
                ops[o]->quantize_act(wts[t], x, b, n);
                if (memcmp(a, b, kern_act_size(wts[t], n)))
                    fail_msg("%s quantize_act(%s) differs from ref (rep %d)", ops[o]->level,
                             tensor_type_name(wts[t]), rep);
            }
        }
    }
    free(x);
    free(a);
    free(b);
}

/* ---- dispatch ------------------------------------------------------------------------------- */

static int child_level_is(const char *env, const char *want_one_of) {
    pid_t pid = fork();
    if (pid == 0) {
        setenv("STP_KERNELS", env, 1);
        const kern_ops *o = kern_ops_get();
        _exit(o && strstr(want_one_of, o->level) ? 0 : 1);
    }
    int st = 0;
    waitpid(pid, &st, 0);
    return WIFEXITED(st) && WEXITSTATUS(st) == 0;
}

static void test_kern_dispatch_levels(void **state) {
    (void)state;
    const kern_ops *ops[4];
    const int nops = kern_ops_all(ops, 4);
    const kern_ops *best = ops[nops - 1];
    /* children first: they must inherit a process that has not chosen its table yet */
    assert_true(child_level_is("ref", "ref"));
    assert_true(child_level_is("avx2", nops >= 2 ? "avx2" : "ref"));
    assert_true(child_level_is("avx512", best->level)); /* never above what the CPU has */
    assert_true(child_level_is("bogus", best->level));
    const kern_ops *got = kern_ops_get();
    assert_non_null(got);
    if (!getenv("STP_KERNELS")) assert_ptr_equal(got, best);
    assert_ptr_equal(kern_ops_get(), got);
    for (int o = 0; o < nops; o++) {
        assert_non_null(ops[o]->quantize_act);
        assert_non_null(ops[o]->matmat);
        assert_non_null(ops[o]->axpy_row);
    }
    printf("kern levels on this CPU:");
    for (int o = 0; o < nops; o++)
        printf(" %s", ops[o]->level);
    printf("\n");
#if defined(__x86_64__) || defined(__i386__)
    /* a level built in but missing on this CPU goes untested by every "each level against the
     * reference" test: a CPU-feature skip, printed and counted */
    static const char *const built[] = {"avx2", "avx512vnni"};
    for (int b = 0; b < 2; b++) {
        bool has = false;
        for (int o = 0; o < nops; o++)
            has |= !strcmp(ops[o]->level, built[b]);
        if (!has) th_cpu_skip_note(__func__, built[b]);
    }
#endif
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_kern_fp16_known_values),
        cmocka_unit_test(test_kern_fp16_exhaustive_roundtrip_and_ties),
        cmocka_unit_test(test_kern_bf16_rounding),
        cmocka_unit_test(test_kern_weight_quantize_roundtrip),
        cmocka_unit_test(test_kern_act_quantize_roundtrip),
        cmocka_unit_test(test_kern_q8_0_act_ties_round_to_even),
        cmocka_unit_test(test_kern_q4_K_q5_K_hand_built),
        cmocka_unit_test(test_kern_q6_K_hand_built),
        cmocka_unit_test(test_kern_q3_K_hand_built),
        cmocka_unit_test(test_kern_vec_dot_matches_dequant),
        cmocka_unit_test(test_kern_simd_matches_ref),
        cmocka_unit_test(test_kern_q_simd_bit_exact),
        cmocka_unit_test(test_kern_simd_quantize_act_exact),
        cmocka_unit_test(test_kern_dispatch_levels),
    };
    return th_exit_code(cmocka_run_group_tests(tests, NULL, NULL));
}
