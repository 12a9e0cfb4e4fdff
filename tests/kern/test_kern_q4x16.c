/* test_kern_q4x16: the row-interleaved Q4_0 layout (q4_0x16) and its kernels.
 *
 * Packing is checked byte by byte against the layout documented in kern.h; every level's
 * matvec_q4_0x16 / matmat_q4_0x16 must give exactly the bits of the reference Q4_0 matvec on the
 * unpacked matrix (odd block counts, one block, row groups g0 > 0, n_vec 1..9 and 33, block
 * and vector chunking inside the SIMD drivers, extreme nibbles and activations). */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdlib.h>
#include <string.h>

#include "kern/kern.h"

static uint64_t s_next(uint64_t *s) {
    *s = *s * 6364136223846793005ull + 1442695040888963407ull;
    return *s >> 33;
}

static float s_rand(uint64_t *s) { /* [-1, 1) */
    return (float)(s_next(s) & 0xFFFFFF) / 16777216.0f * 2.0f - 1.0f;
}

static void *s_alloc(size_t n) {
    void *p = aligned_alloc(64, (n + 63) / 64 * 64);
    assert_non_null(p);
    memset(p, 0, (n + 63) / 64 * 64);
    return p;
}

/* A random Q4_0 matrix quantized from floats; extreme != 0 sets every quant byte to 0x00 or
 * 0xFF (nibbles 0 / 15, the largest products). */
static uint8_t *s_matrix(uint64_t *seed, int64_t rows, int64_t n, int extreme) {
    const size_t rb = tensor_type_row_size(STP_TYPE_Q4_0, n);
    uint8_t *w = s_alloc(rb * (size_t)rows);
    float *f = malloc(sizeof(float) * (size_t)n);
    assert_non_null(f);
    for (int64_t r = 0; r < rows; r++) {
        const float amp = 0.1f + (float)(r % 7);
        for (int64_t i = 0; i < n; i++)
            f[i] = amp * s_rand(seed);
        assert_int_equal(kern_quantize_row_ref(STP_TYPE_Q4_0, f, w + (size_t)r * rb, n), 0);
        if (extreme)
            for (int64_t b = 0; b < n / 32; b++)
                memset(w + (size_t)r * rb + (size_t)b * 18 + 2, (r + b) & 1 ? 0xFF : 0x00, 16);
    }
    free(f);
    return w;
}

static void test_kern_q4x16_size(void **state) {
    (void)state;
    assert_int_equal(kern_q4_0x16_size(16, 32), 16 * 18);
    assert_int_equal(kern_q4_0x16_size(4096, 4096), (size_t)4096 * 128 * 18);
    assert_int_equal(kern_q4_0x16_size(8, 32), 0);
    assert_int_equal(kern_q4_0x16_size(24, 32), 0);
    assert_int_equal(kern_q4_0x16_size(16, 48), 0);
    assert_int_equal(kern_q4_0x16_size(0, 32), 0);
    assert_int_equal(kern_q4_0x16_size(16, 0), 0);
    assert_int_equal(kern_q4_0x16_size(-16, 32), 0);
}

/* Every byte lands where kern.h says (nb = 3: one pair plus an odd last block). */
static void test_kern_q4x16_pack_layout(void **state) {
    (void)state;
    const int64_t rows = 32, n = 96, nb = 3;
    const size_t rb = 54;
    uint8_t *w = s_alloc(rb * rows), *p = s_alloc(kern_q4_0x16_size(rows, n));
    for (size_t i = 0; i < rb * rows; i++)
        w[i] = (uint8_t)(i * 131 + 7);
    kern_q4_0x16_pack(w, rb, rows, n, p);
    for (int64_t r = 0; r < rows; r++) {
        const uint8_t *G = p + (size_t)(r / 16) * (size_t)nb * 288;
        const int i = (int)(r % 16);
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *src = w + (size_t)r * rb + (size_t)b * 18;
            const size_t qo = b == 0 ? 0 : b == 1 ? 256 : 576;
            const size_t so = b == 0 ? 512 : b == 1 ? 544 : 576 + 256;
            assert_memory_equal(G + so + 2 * i, src, 2);
            for (int k = 0; k < 4; k++)
                assert_memory_equal(G + qo + 64 * k + 4 * i, src + 2 + 4 * k, 4);
        }
    }
    free(w), free(p);
}

/* Every level's pack_q4_0x16 writes the reference's bytes: odd and even block counts, rows
 * longer than a block pair (a 1536-column matrix's 864-byte rows), a row stride wider than the
 * row (a matrix inside a larger buffer). The matrix is malloc'd to its exact size, so a read
 * past its last block is an ASan error. The levels are those this CPU has (printed). */
static void test_kern_q4x16_pack_levels(void **state) {
    (void)state;
    const kern_ops *lv[4];
    const int nl = kern_ops_all(lv, 4);
    for (int l = 0; l < nl; l++)
        print_message("pack_q4_0x16 at level %s\n", lv[l]->level);
    const int64_t shapes[][3] = {{16, 32, 18}, {32, 96, 54}, {48, 1536, 864}, {32, 768, 500}};
    for (size_t c = 0; c < sizeof shapes / sizeof shapes[0]; c++) {
        const int64_t rows = shapes[c][0], n = shapes[c][1];
        const size_t rb = (size_t)shapes[c][2], bytes = kern_q4_0x16_size(rows, n);
        uint8_t *w = malloc(rb * (size_t)rows), *want = s_alloc(bytes), *got = s_alloc(bytes);
        assert_non_null(w);
        for (size_t i = 0; i < rb * (size_t)rows; i++)
            w[i] = (uint8_t)(i * 131 + 7 + c);
        kern_q4_0x16_pack(w, rb, rows, n, want);
        for (int l = 0; l < nl; l++) {
            memset(got, 0xA5, bytes);
            lv[l]->pack_q4_0x16(w, rb, rows, n, got);
            assert_memory_equal(got, want, bytes);
        }
        free(w), free(want), free(got);
    }
}

/* All levels, matvec and matmat, against kern_matvec_ref on the unpacked matrix. */
static void s_check(int64_t rows, int64_t n, int extreme, int64_t max_vec, uint64_t seed) {
    const size_t rb = tensor_type_row_size(STP_TYPE_Q4_0, n);
    uint8_t *w = s_matrix(&seed, rows, n, extreme);
    uint8_t *wp = s_alloc(kern_q4_0x16_size(rows, n));
    kern_q4_0x16_pack(w, rb, rows, n, wp);
    const size_t xs = kern_act_size(STP_TYPE_Q4_0, n);
    uint8_t *xq = s_alloc(xs * (size_t)max_vec);
    float *f = malloc(sizeof(float) * (size_t)n);
    assert_non_null(f);
    for (int64_t v = 0; v < max_vec; v++) {
        for (int64_t i = 0; i < n; i++)
            f[i] = extreme ? ((i + v) % 3 == 0 ? -1.0f : 1.0f) : s_rand(&seed) * (float)(v + 1);
        kern_quantize_act_ref(STP_TYPE_Q4_0, f, xq + (size_t)v * xs, n);
    }
    if (extreme) /* -128 is outside what quantize_act makes, but the kernels must take it */
        for (int64_t b = 0; b < n / 32; b++)
            memset(xq + (size_t)b * 34 + 2, 0x80, 32);
    const size_t ys = (size_t)rows + 5;
    float *want = s_alloc(sizeof(float) * ys * (size_t)max_vec);
    float *got = s_alloc(sizeof(float) * ys * (size_t)max_vec);
    for (int64_t v = 0; v < max_vec; v++)
        kern_matvec_ref(STP_TYPE_Q4_0, n, w, rb, xq + (size_t)v * xs, want + (size_t)v * ys, 0,
                        rows);
    const int64_t ng = rows / 16;
    const kern_ops *lv[4];
    const int nl = kern_ops_all(lv, 4);
    for (int l = 0; l < nl; l++) {
        /* the level's own unpacked matvec agrees with the reference (context for the bits) */
        lv[l]->matvec(STP_TYPE_Q4_0, n, w, rb, xq, got, 0, rows);
        assert_memory_equal(got, want, sizeof(float) * (size_t)rows);
        for (int64_t g0 = 0; g0 < ng; g0 += (ng > 2 ? ng - 1 : 1)) {
            memset(got, 0xA5, sizeof(float) * ys);
            lv[l]->matvec_q4_0x16(n, wp, xq, got, g0, ng);
            if (memcmp(got, want + 16 * g0, sizeof(float) * (size_t)(16 * (ng - g0))) != 0)
                fail_msg("%s matvec_q4_0x16 rows=%lld n=%lld g0=%lld", lv[l]->level,
                         (long long)rows, (long long)n, (long long)g0);
            /* nothing written past the range */
            const uint32_t canary = 0xA5A5A5A5u;
            assert_memory_equal(&got[16 * (ng - g0)], &canary, 4);
        }
        for (int64_t nv = 1; nv <= max_vec; nv = nv < 9 ? nv + 1 : max_vec + (nv == max_vec)) {
            const int64_t g0 = ng > 1 ? 1 : 0;
            memset(got, 0xA5, sizeof(float) * ys * (size_t)max_vec);
            lv[l]->matmat_q4_0x16(n, wp, xq, xs, nv, got, ys, g0, ng);
            for (int64_t v = 0; v < nv; v++)
                if (memcmp(got + (size_t)v * ys, want + (size_t)v * ys + 16 * g0,
                           sizeof(float) * (size_t)(16 * (ng - g0))) != 0)
                    fail_msg("%s matmat_q4_0x16 rows=%lld n=%lld nv=%lld v=%lld", lv[l]->level,
                             (long long)rows, (long long)n, (long long)nv, (long long)v);
        }
    }
    free(w), free(wp), free(xq), free(f), free(want), free(got);
}

static void test_kern_q4x16_one_block(void **state) {
    (void)state;
    s_check(16, 32, 0, 9, 1);
}
static void test_kern_q4x16_odd_blocks(void **state) {
    (void)state;
    s_check(48, 32 * 7, 0, 9, 2);
    s_check(32, 32 * 45, 0, 9, 3);
}
static void test_kern_q4x16_even_blocks(void **state) {
    (void)state;
    s_check(64, 512, 0, 9, 4);
}
static void test_kern_q4x16_extreme_values(void **state) {
    (void)state;
    s_check(32, 32 * 9, 1, 9, 5);
}
/* 33 vectors: two vector chunks; 131 blocks > the 128-block chunk at 32 vectors. */
static void test_kern_q4x16_chunked_matmat(void **state) {
    (void)state;
    s_check(32, 32 * 131, 0, 33, 6);
}
/* 4097 blocks: more than one block chunk even for a single vector. */
static void test_kern_q4x16_chunked_matvec(void **state) {
    (void)state;
    s_check(16, 32 * 4097, 0, 2, 7);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_kern_q4x16_size),
        cmocka_unit_test(test_kern_q4x16_pack_layout),
        cmocka_unit_test(test_kern_q4x16_pack_levels),
        cmocka_unit_test(test_kern_q4x16_one_block),
        cmocka_unit_test(test_kern_q4x16_odd_blocks),
        cmocka_unit_test(test_kern_q4x16_even_blocks),
        cmocka_unit_test(test_kern_q4x16_extreme_values),
        cmocka_unit_test(test_kern_q4x16_chunked_matmat),
        cmocka_unit_test(test_kern_q4x16_chunked_matvec),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
