/* test_kern_golden: the quantizers and dequantizers against llama-quantize's output.
 *
 * Model A's F32 weights requantized with kern_quantize_row_ref must reproduce the bytes of the
 * golden Q8_0 / Q4_0 / BF16 / F16 files exactly (they were made by ggml's reference quantizers
 * and numpy's RNE), and dequantizing those files must stay within each format's error bound.
 * The K-quant files (model D) check every SIMD level against the reference on real tensors. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gguf/gguf.h"
#include "kern/kern.h"

static gguf_file *open_data(const char *name) {
    const char *dir = getenv("STP_TEST_DATA");
    assert_non_null(dir);
    char path[1024];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    gguf_file *f = NULL;
    stp_err err = {0};
    if (gguf_open(&f, path, &err) != 0) fail_msg("%s: %s", path, err.msg);
    return f;
}

/* Every non-F32 tensor of qname: requantize the F32 source, compare bytes; dequantize and
 * compare with the source within the format's bound. Returns the number of tensors checked. */
static int check_file(const char *qname, stp_type want_type) {
    gguf_file *src = open_data("tiny-dense-attn-f32.gguf");
    gguf_file *q = open_data(qname);
    int checked = 0;
    for (size_t i = 0; i < gguf_tensor_count(q); i++) {
        const gguf_tensor *t = gguf_tensor_at(q, i);
        if (t->type == STP_TYPE_F32) continue;
        char name[256];
        snprintf(name, sizeof name, "%.*s", (int)t->name.len, t->name.ptr);
        const gguf_tensor *s = gguf_tensor_find(src, name);
        assert_non_null(s);
        assert_int_equal(s->type, STP_TYPE_F32);
        const int64_t n = t->ne[0], rows = t->ne[1] * t->ne[2] * t->ne[3];
        const size_t rb = tensor_type_row_size(t->type, n);
        assert_int_equal(rb * (size_t)rows, t->nbytes);
        uint8_t *buf = malloc(rb);
        float *deq = malloc(sizeof(float) * (size_t)n);
        for (int64_t r = 0; r < rows; r++) {
            const float *x = (const float *)s->data + r * n;
            const uint8_t *golden = (const uint8_t *)t->data + (size_t)r * rb;
            assert_int_equal(kern_quantize_row_ref(t->type, x, buf, n), 0);
            if (memcmp(buf, golden, rb) != 0)
                fail_msg("%s %s row %ld: requantized bytes differ from llama-quantize's", qname,
                         name, (long)r);
            kern_dequantize_row_ref(t->type, golden, deq, n);
            for (int64_t b = 0; b < n / 32; b++) {
                float amax = 0;
                for (int j = 0; j < 32; j++)
                    amax = fmaxf(amax, fabsf(x[32 * b + j]));
                for (int j = 0; j < 32; j++) {
                    const float xv = x[32 * b + j], err = fabsf(deq[32 * b + j] - xv);
                    float bound;
                    switch (t->type) {
                    case STP_TYPE_F16: bound = fabsf(xv) * ldexpf(1, -11) + ldexpf(1, -24); break;
                    case STP_TYPE_BF16: bound = fabsf(xv) * ldexpf(1, -8); break;
                    case STP_TYPE_Q8_0: bound = amax / 254 * 1.001f + amax * ldexpf(1, -11); break;
                    default: bound = amax / 8 * 1.001f + amax * ldexpf(1, -10); break;
                    }
                    if (err > bound) fail_msg("%s %s: err %g > %g", qname, name, err, bound);
                }
            }
        }
        if (want_type != STP_TYPE_COUNT) assert_int_equal(t->type, want_type);
        free(buf);
        free(deq);
        checked++;
    }
    gguf_close(&q);
    gguf_close(&src);
    return checked;
}

static void test_kern_golden_q8_0_bytes(void **state) {
    (void)state;
    assert_int_equal(check_file("tiny-dense-attn-q8_0.gguf", STP_TYPE_Q8_0), 29);
}

static void test_kern_golden_q4_0_pure_bytes(void **state) {
    (void)state;
    assert_int_equal(check_file("tiny-dense-attn-q4_0-pure.gguf", STP_TYPE_Q4_0), 29);
}

static void test_kern_golden_q4_0_mix_bytes(void **state) {
    (void)state;
    assert_int_equal(check_file("tiny-dense-attn-q4_0.gguf", STP_TYPE_COUNT), 29);
}

static void test_kern_golden_bf16_bytes(void **state) {
    (void)state;
    assert_int_equal(check_file("tiny-dense-attn-bf16.gguf", STP_TYPE_BF16), 29);
}

static void test_kern_golden_f16_bytes(void **state) {
    (void)state;
    assert_int_equal(check_file("tiny-dense-attn-f16.gguf", STP_TYPE_F16), 29);
}

/* Real llama-quantize K-quant / Q4_1 tensors: every level's matvec equals the reference. */
static void test_kern_golden_kquant_simd_vs_ref(void **state) {
    (void)state;
    const char *files[] = {"tiny-kquant-q4_k_s.gguf", "tiny-kquant-q3_k_m.gguf",
                           "tiny-kquant-q4_1.gguf", "tiny-kquant-q4_0.gguf"};
    const kern_ops *ops[4];
    const int nops = kern_ops_all(ops, 4);
    int seen[STP_TYPE_COUNT] = {0};
    for (size_t fi = 0; fi < sizeof files / sizeof files[0]; fi++) {
        gguf_file *f = open_data(files[fi]);
        for (size_t i = 0; i < gguf_tensor_count(f); i++) {
            const gguf_tensor *t = gguf_tensor_at(f, i);
            if (t->type == STP_TYPE_F32 || t->n_dims < 2) continue;
            const int64_t n = t->ne[0], rows = t->ne[1] < 64 ? t->ne[1] : 64;
            const size_t rb = tensor_type_row_size(t->type, n);
            float *x = malloc(sizeof(float) * (size_t)n), *want = malloc(sizeof(float) * rows),
                  *got = malloc(sizeof(float) * rows), *deq = malloc(sizeof(float) * (size_t)n);
            void *xq = aligned_alloc(64, (kern_act_size(t->type, n) + 63) / 64 * 64);
            for (int64_t k = 0; k < n; k++)
                x[k] = sinf((float)k * 0.37f) * (1.0f + (float)(k % 7));
            kern_quantize_act_ref(t->type, x, xq, n);
            kern_matvec_ref(t->type, n, t->data, rb, xq, want, 0, rows);
            double mag = 0;
            kern_dequantize_row_ref(t->type, t->data, deq, n);
            for (int64_t k = 0; k < n; k++) {
                assert_true(isfinite(deq[k]) && fabsf(deq[k]) < 10.0f);
                mag += fabs(deq[k] * x[k]);
            }
            for (int o = 0; o < nops; o++) {
                ops[o]->matvec(t->type, n, t->data, rb, xq, got, 0, rows);
                for (int64_t k = 0; k < rows; k++)
                    if (fabsf(got[k] - want[k]) >
                        1e-5f * (float)mag + 1e-5f * fabsf(want[k]) + 1e-6f)
                        fail_msg("%s %s %.*s row %ld: %g vs %g", files[fi], ops[o]->level,
                                 (int)t->name.len, t->name.ptr, (long)k, got[k], want[k]);
            }
            seen[t->type]++;
            free(x);
            free(want);
            free(got);
            free(deq);
            free(xq);
        }
        gguf_close(&f);
    }
    assert_true(seen[STP_TYPE_Q3_K] && seen[STP_TYPE_Q4_K] && seen[STP_TYPE_Q5_K] &&
                seen[STP_TYPE_Q6_K] && seen[STP_TYPE_Q4_1] && seen[STP_TYPE_Q4_0] &&
                seen[STP_TYPE_Q8_0]);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_kern_golden_q8_0_bytes),
        cmocka_unit_test(test_kern_golden_q4_0_pure_bytes),
        cmocka_unit_test(test_kern_golden_q4_0_mix_bytes),
        cmocka_unit_test(test_kern_golden_bf16_bytes),
        cmocka_unit_test(test_kern_golden_f16_bytes),
        cmocka_unit_test(test_kern_golden_kquant_simd_vs_ref),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
