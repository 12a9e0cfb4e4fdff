/* test_attn_core: the AVX2 build of one attention head gives the same bits as the generic build
 * (ring-buffer wrap, windows, several head sizes). */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdlib.h>
#include <string.h>

#include "kern/kern.h"
#include "model/attn_core.h"

static float s_rand(uint64_t *s) {
    *s = *s * 6364136223846793005ull + 1442695040888963407ull;
    return (float)((*s >> 40) & 0xFFFFFF) / 16777216.0f * 2.0f - 1.0f;
}

static void s_check(int D, int cap, int lo, int hi, uint64_t seed) {
    if (!strcmp(kern_ops_get()->level, "ref")) skip(); /* no AVX2 on this CPU */
    const int stride = 3 * D;
    float *q = malloc(sizeof(float) * D), *k = malloc(sizeof(float) * cap * stride),
          *v = malloc(sizeof(float) * cap * stride), *o1 = malloc(sizeof(float) * D),
          *o2 = malloc(sizeof(float) * D);
    double *sc = malloc(sizeof(double) * (hi - lo + 1));
    for (int i = 0; i < D; i++) q[i] = s_rand(&seed) * 3;
    for (int i = 0; i < cap * stride; i++) k[i] = s_rand(&seed) * 3, v[i] = s_rand(&seed);
    attn_head_args a = {.q = q, .k = k + D, .v = v + D, .stride = stride, .cap = cap, .lo = lo,
                        .hi = hi, .D = D, .out = o1, .sc = sc};
    attn_head_generic(&a);
    a.out = o2;
    attn_head_avx2(&a);
    assert_memory_equal(o1, o2, sizeof(float) * D);
    free(q), free(k), free(v), free(o1), free(o2), free(sc);
}

static void test_attn_core_full(void **state) {
    (void)state;
    s_check(128, 600, 0, 599, 1);
    s_check(16, 40, 0, 0, 2);
    s_check(64, 300, 0, 170, 3);
}
static void test_attn_core_ring_wrap(void **state) {
    (void)state;
    s_check(128, 100, 950, 1030, 4); /* positions wrap around the ring */
    s_check(36, 17, 33, 49, 5);      /* D not a multiple of 32 */
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_attn_core_full),
        cmocka_unit_test(test_attn_core_ring_wrap),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
