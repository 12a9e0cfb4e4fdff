/* test_kern_rows: matvec_rows (a row subset) gives the same bits as matvec on those rows, at
 * every kernel level this CPU supports, for the types with SIMD row kernels and a K-quant. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdlib.h>
#include <string.h>

#include "kern/kern.h"

static float s_rand(uint64_t *s) {
    *s = *s * 6364136223846793005ull + 1442695040888963407ull;
    return (float)((*s >> 40) & 0xFFFFFF) / 16777216.0f * 2.0f - 1.0f;
}

static void s_check(stp_type t, int64_t n, int64_t rows) {
    uint64_t seed = 7 + (uint64_t)t;
    size_t rb = tensor_type_row_size(t, n);
    uint8_t *w = malloc(rb * rows);
    float *src = malloc(sizeof(float) * n);
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t i = 0; i < n; i++)
            src[i] = s_rand(&seed);
        if (t == STP_TYPE_Q4_0 || t == STP_TYPE_Q8_0 || t == STP_TYPE_F16 || t == STP_TYPE_F32)
            assert_int_equal(kern_quantize_row_ref(t, src, w + r * rb, n), 0);
    }
    for (int64_t i = 0; i < n; i++)
        src[i] = s_rand(&seed);
    uint8_t *xq = malloc(kern_act_size(t, n));
    int32_t *list = malloc(sizeof(int32_t) * rows);
    int64_t nl = 0;
    for (int64_t r = 0; r < rows; r++)
        if ((r * 7 + 3) % 5 < 3) list[nl++] = (int32_t)r; /* ~60% of rows, irregular */
    float *full = malloc(sizeof(float) * rows), *sub = malloc(sizeof(float) * rows);
    const kern_ops *levels[4];
    int nlev = kern_ops_all(levels, 4);
    for (int l = 0; l < nlev; l++) {
        levels[l]->quantize_act(t, src, xq, n);
        levels[l]->matvec(t, n, w, rb, xq, full, 0, rows);
        memset(sub, 0, sizeof(float) * rows);
        levels[l]->matvec_rows(t, n, w, rb, xq, list, nl, sub);
        for (int64_t i = 0; i < nl; i++)
            assert_memory_equal(&sub[list[i]], &full[list[i]], sizeof(float));
    }
    free(w), free(src), free(xq), free(list), free(full), free(sub);
}

static void test_kern_rows_q4_0(void **state) {
    (void)state;
    s_check(STP_TYPE_Q4_0, 1536, 77);
}
static void test_kern_rows_q8_0(void **state) {
    (void)state;
    s_check(STP_TYPE_Q8_0, 512, 41);
}
static void test_kern_rows_f16(void **state) {
    (void)state;
    s_check(STP_TYPE_F16, 256, 19);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_kern_rows_q4_0),
        cmocka_unit_test(test_kern_rows_q8_0),
        cmocka_unit_test(test_kern_rows_f16),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
