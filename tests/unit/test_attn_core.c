/* test_attn_core: the AVX2 build of one attention head gives the same bits as the generic build
 * (ring-buffer wrap, windows, several head sizes), with a float32 and with a float16 cache; a
 * float16 cache gives the bits of a float32 cache holding the same (rounded) values. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdlib.h>
#include <string.h>

#include "kern/kern.h"
#include "model/attn_core.h"
#include "th_skip.h"

static float s_rand(uint64_t *s) {
    *s = *s * 6364136223846793005ull + 1442695040888963407ull;
    return (float)((*s >> 40) & 0xFFFFFF) / 16777216.0f * 2.0f - 1.0f;
}

/* (callers first th_need_kern_level("avx2"): the AVX2 kernel is compared with the reference) */
static void s_check(int D, int cap, int lo, int hi, uint64_t seed) {
    const int stride = 3 * D;
    float *q = malloc(sizeof(float) * D), *k = malloc(sizeof(float) * cap * stride),
          *v = malloc(sizeof(float) * cap * stride), *o1 = malloc(sizeof(float) * D),
          *o2 = malloc(sizeof(float) * D);
    double *sc = malloc(sizeof(double) * (hi - lo + 1));
    for (int i = 0; i < D; i++)
        q[i] = s_rand(&seed) * 3;
    for (int i = 0; i < cap * stride; i++)
        k[i] = s_rand(&seed) * 3, v[i] = s_rand(&seed);
    attn_head_args a = {.q = q,
                        .k = k + D,
                        .v = v + D,
                        .stride = stride,
                        .cap = cap,
                        .lo = lo,
                        .hi = hi,
                        .D = D,
                        .out = o1,
                        .sc = sc};
    attn_head_generic(&a);
    a.out = o2;
    attn_head_avx2(&a);
    assert_memory_equal(o1, o2, sizeof(float) * D);
    /* the same cache in float16: both builds agree, and equal float32 rounded the same way */
    uint16_t *kh = malloc(sizeof(uint16_t) * cap * stride),
             *vh = malloc(sizeof(uint16_t) * cap * stride);
    for (int i = 0; i < cap * stride; i++) {
        kh[i] = kern_f32_to_fp16(k[i]), vh[i] = kern_f32_to_fp16(v[i]);
        k[i] = kern_fp16_to_f32(kh[i]), v[i] = kern_fp16_to_f32(vh[i]);
    }
    a.out = o1;
    attn_head_generic(&a); /* float32 holding the rounded values */
    attn_head_args ah = a;
    ah.k = ah.v = NULL;
    ah.kh = kh + D, ah.vh = vh + D;
    ah.out = o2;
    attn_head_generic(&ah);
    assert_memory_equal(o1, o2, sizeof(float) * D);
    attn_head_avx2(&ah);
    assert_memory_equal(o1, o2, sizeof(float) * D);
    free(q), free(k), free(v), free(o1), free(o2), free(sc), free(kh), free(vh);
}

static void test_attn_core_full(void **state) {
    (void)state;
    th_need_kern_level("avx2");
    s_check(128, 600, 0, 599, 1);
    s_check(16, 40, 0, 0, 2);
    s_check(64, 300, 0, 170, 3);
}
static void test_attn_core_ring_wrap(void **state) {
    (void)state;
    th_need_kern_level("avx2");
    s_check(128, 100, 950, 1030, 4); /* positions wrap around the ring */
    s_check(36, 17, 33, 49, 5);      /* D not a multiple of 32 */
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_attn_core_full),
        cmocka_unit_test(test_attn_core_ring_wrap),
    };
    return th_exit_code(cmocka_run_group_tests(tests, NULL, NULL));
}
