/* test_kv_cache: what kv_cache_store keeps and how it is read back, per cache type: f32 exactly,
 * f16 rounded to nearest even, q8_0 as ggml-cpu's quantize_row_q8_0 on x86 (d = fp16(amax/127),
 * q = round-half-even(x * 127/amax); checked on hand-made blocks with ties, and within half a
 * step plus d's fp16 rounding on random rows read through attn_dequant_q8_0, the kernel's
 * reader); slots wrap on the sliding-window rings; bytes are 4, 2 and 34/32 per value; a q8_0
 * row that is not whole blocks is refused; the type names parse both ways. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "model/attn_core.h"
#include "model/kv_cache.h"
#include "model/model.h"
#include "th_gguf.h"

static float s_rand(uint64_t *s) {
    *s = *s * 6364136223846793005ull + 1442695040888963407ull;
    return (float)((*s >> 40) & 0xFFFFFF) / 16777216.0f * 2.0f - 1.0f;
}

/* Hand-made rows: amax 127 makes id = 1, so q = round-half-even(x) is visible. */
static void test_kv_cache_q8_0_rounding(void **state) {
    (void)state;
    model *m = th_model_open("tiny-hybrid-attn-f32.gguf");
    kv_cache *c = NULL;
    stp_err err = {0};
    assert_int_equal(kv_cache_new(&c, &m->cfg, 16, 4, KV_Q8_0, &err), 0);
    const int n = c->kv_dim;
    assert_int_equal(n % QK8_0, 0);
    float *k = calloc((size_t)n, sizeof(float)), *v = calloc((size_t)n, sizeof(float));
    k[0] = 127.0f, k[1] = 2.5f, k[2] = -3.5f, k[3] = 0.5f, k[4] = -126.6f, k[5] = 1.49f;
    /* v: the second block of k's values halved; its first block all zero (d 0, q 0) */
    for (int i = 0; i < 6 && QK8_0 + i < n; i++)
        v[QK8_0 + i] = k[i] * 0.5f;
    kv_cache_store(c, &c->layers[0], 3, k, v);
    const block_q8_0 *bk = c->layers[0].kq + 3 * n / QK8_0, *bv = c->layers[0].vq + 3 * n / QK8_0;
    assert_int_equal(bk->d, kern_f32_to_fp16(1.0f));
    const int8_t want[6] = {127, 2, -4, 0, -127, 1}; /* ties to even, as _mm256_round_ps */
    assert_memory_equal(bk->qs, want, 6);
    for (int j = 6; j < QK8_0; j++)
        assert_int_equal(bk->qs[j], 0);
    assert_int_equal(bv[0].d, 0);
    if (n >= 2 * QK8_0) {
        assert_int_equal(bv[1].d, kern_f32_to_fp16(0.5f));
        assert_memory_equal(bv[1].qs, want, 6); /* x * 127/63.5 = 2x */
    }
    float out[QK8_0];
    attn_dequant_q8_0(out, bk, 0, QK8_0);
    assert_true(out[0] == 127.0f && out[1] == 2.0f && out[2] == -4.0f && out[4] == -127.0f);
    free(k), free(v);
    kv_cache_destroy(&c);
    model_close(&m);
}

/* Random rows stored at positions past the ring of a sliding-window layer, read back. */
static void test_kv_cache_round_trip(void **state) {
    (void)state;
    model *m = th_model_open("tiny-hybrid-attn-f32.gguf");
    const int n_ctx = 6000, ub = 8; /* window 4096: rings of 4104 slots */
    kv_cache *c[3] = {NULL};
    stp_err err = {0};
    for (int t = 0; t < 3; t++)
        assert_int_equal(kv_cache_new(&c[t], &m->cfg, n_ctx, ub, (kv_dtype)t, &err), 0);
    assert_int_equal(c[1]->bytes * 2, c[0]->bytes);
    assert_int_equal(c[2]->bytes * 128, c[0]->bytes * 34);
    const int n = c[0]->kv_dim;
    float *k = malloc(sizeof(float) * n), *v = malloc(sizeof(float) * n),
          *r = malloc(sizeof(float) * n);
    uint64_t seed = 5;
    int rings = 0;
    double worst = 0;
    for (int il = 0; il < c[0]->n_layer; il++) {
        const int cap = c[0]->layers[il].cap;
        rings += cap < n_ctx;
        const int pos[] = {0, 1, cap - 1, cap, cap + 7, n_ctx - 1};
        for (size_t pi = 0; pi < sizeof pos / sizeof pos[0]; pi++) {
            const int p = pos[pi];
            for (int i = 0; i < n; i++)
                k[i] = s_rand(&seed) * (1 + il), v[i] = s_rand(&seed) * 0.01f;
            for (int t = 0; t < 3; t++) {
                kv_layer *l = &c[t]->layers[il];
                assert_int_equal(l->cap, cap);
                kv_cache_store(c[t], l, kv_cache_slot(l, p), k, v);
            }
            const size_t s = (size_t)kv_cache_slot(&c[0]->layers[il], p);
            assert_true(p < cap ? s == (size_t)p : s == (size_t)(p % cap));
            assert_memory_equal(c[0]->layers[il].k + s * n, k, sizeof(float) * n);
            assert_memory_equal(c[0]->layers[il].v + s * n, v, sizeof(float) * n);
            for (int i = 0; i < n; i++) {
                assert_int_equal(c[1]->layers[il].kh[s * n + i], kern_f32_to_fp16(k[i]));
                assert_int_equal(c[1]->layers[il].vh[s * n + i], kern_f32_to_fp16(v[i]));
            }
            for (int kv = 0; kv < 2; kv++) {
                const float *x = kv ? v : k;
                const block_q8_0 *row =
                    (kv ? c[2]->layers[il].vq : c[2]->layers[il].kq) + s * n / QK8_0;
                attn_dequant_q8_0(r, row, 0, n);
                for (int b = 0; b < n / QK8_0; b++) {
                    float amax = 0;
                    for (int j = 0; j < QK8_0; j++)
                        amax = fmaxf(amax, fabsf(x[b * QK8_0 + j]));
                    assert_int_equal(row[b].d, kern_f32_to_fp16(amax / 127.0f));
                    const float d = kern_fp16_to_f32(row[b].d);
                    for (int j = 0; j < QK8_0; j++) {
                        const double e = fabs(r[b * QK8_0 + j] - x[b * QK8_0 + j]) / d;
                        worst = fmax(worst, e);
                    }
                }
            }
        }
    }
    assert_true(rings > 0);
    /* half a step, plus d rounded to fp16 (127 * 2^-11 of a step at most) */
    if (!(worst > 0.3 && worst < 0.57)) fail_msg("q8_0 round trip: %g of a step", worst);
    free(k), free(v), free(r);
    for (int t = 0; t < 3; t++)
        kv_cache_destroy(&c[t]);
    model_close(&m);
}

static void test_kv_cache_types(void **state) {
    (void)state;
    stp_err err = {0};
    kv_dtype t = KV_F32;
    const char *names[] = {"f32", "f16", "q8_0"};
    for (int i = 0; i < 3; i++) {
        assert_int_equal(kv_cache_parse_type(names[i], &t, &err), 0);
        assert_int_equal(t, i);
        assert_string_equal(kv_cache_type_name(t), names[i]);
    }
    assert_int_equal(kv_cache_parse_type("q4_0", &t, &err), STP_EINVAL);
    assert_non_null(strstr(err.msg, "q8_0"));
    model *m = th_model_open("tiny-dense-attn-f32.gguf");
    model_config cfg = m->cfg;
    cfg.head_dim = 12; /* 2 kv heads: rows of 24 values, not whole blocks */
    kv_cache *c = NULL;
    assert_int_equal(kv_cache_new(&c, &cfg, 16, 4, KV_Q8_0, &err), STP_EINVAL);
    assert_null(c);
    assert_int_equal(kv_cache_new(&c, &cfg, 16, 4, KV_F16, &err), 0);
    kv_cache_destroy(&c);
    model_close(&m);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_kv_cache_q8_0_rounding),
        cmocka_unit_test(test_kv_cache_round_trip),
        cmocka_unit_test(test_kv_cache_types),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
