/* test_down_t: the neuron-major `down` layout gives exactly the dense product (every kernel
 * level's Q4_0 matvec) through every level's kern_ops down_t_matvec, reference included, for
 * sparse and dense activations, and skips idle neurons; packed back into q4_0x16 it gives the
 * bytes kern_q4_0x16_pack gives from the GGUF rows. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdbool.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdlib.h>
#include <string.h>

#include "model/down_t.h"
#include "th_skip.h"

static float s_rand(uint64_t *s) {
    *s = *s * 6364136223846793005ull + 1442695040888963407ull;
    return (float)((*s >> 40) & 0xFFFFFF) / 16777216.0f * 2.0f - 1.0f;
}

/* The down_t image of a one-matrix Q4_0 stack w (n_embd rows of n_ff), malloc'd. */
static uint8_t *s_image(const uint8_t *w, size_t rb, int n_embd, int n_ff) {
    tensor_view tv = {.data = w,
                      .type = STP_TYPE_Q4_0,
                      .n_cols = n_ff,
                      .n_rows = n_embd,
                      .n_mat = 1,
                      .row_bytes = rb,
                      .mat_bytes = rb * n_embd};
    uint8_t *img = malloc(down_t_expert_bytes(STP_TYPE_Q4_0, n_embd, n_ff));
    down_t_build_expert(&tv, 0, img);
    return img;
}

/* The image packed back into q4_0x16 (a prefill's batched path), in two row ranges as threads
 * do, gives the bytes kern_q4_0x16_pack gives from the GGUF rows. */
static void s_check_pack(const uint8_t *w, size_t rb, const uint8_t *img, int n_embd, int n_ff) {
    size_t pb = kern_q4_0x16_size(n_embd, n_ff), group = kern_q4_0x16_size(16, n_ff);
    uint8_t *p1 = malloc(pb), *p2 = malloc(pb);
    kern_q4_0x16_pack(w, rb, n_embd, n_ff, p1);
    down_t_pack_x16(img, n_embd, n_ff, 0, n_embd / 2, p2);
    down_t_pack_x16(img, n_embd, n_ff, n_embd / 2, n_embd, p2 + (size_t)(n_embd / 2 / 16) * group);
    assert_memory_equal(p1, p2, pb);
    free(p1), free(p2);
}

/* n_embd rows of n_ff; activation with `idle` percent of neurons exactly 0. */
static void s_check(int n_embd, int n_ff, int idle, uint64_t seed) {
    const size_t rb = tensor_type_row_size(STP_TYPE_Q4_0, n_ff);
    uint8_t *w = malloc(rb * n_embd);
    float *row = malloc(sizeof(float) * n_ff);
    for (int r = 0; r < n_embd; r++) {
        for (int i = 0; i < n_ff; i++)
            row[i] = s_rand(&seed) * 0.05f;
        kern_quantize_row_ref(STP_TYPE_Q4_0, row, w + (size_t)r * rb, n_ff);
    }
    int64_t active = 0;
    for (int i = 0; i < n_ff; i++) {
        float u = s_rand(&seed);
        row[i] = (u + 1.0f) * 50.0f < (float)idle ? 0.0f : s_rand(&seed) * 3.0f;
    }
    uint8_t *xq = malloc(kern_act_size(STP_TYPE_Q4_0, n_ff));
    kern_quantize_act_ref(STP_TYPE_Q4_0, row, xq, n_ff);
    const block_q8_0 *a = (const block_q8_0 *)xq;
    for (int i = 0; i < n_ff; i++)
        active += a[i / 32].qs[i % 32] != 0;

    uint8_t *img = s_image(w, rb, n_embd, n_ff);
    float *y = malloc(sizeof(float) * n_embd), *ref = malloc(sizeof(float) * n_embd);
    const kern_ops *levels[4];
    int n = kern_ops_all(levels, 4);
    levels[0]->matvec(STP_TYPE_Q4_0, n_ff, w, rb, xq, ref, 0, n_embd);
    for (int l = 0; l < n; l++) {
        float *dense = malloc(sizeof(float) * n_embd);
        levels[l]->matvec(STP_TYPE_Q4_0, n_ff, w, rb, xq, dense, 0, n_embd);
        assert_memory_equal(dense, ref, sizeof(float) * n_embd);
        free(dense);
        /* in two thread-like halves of the row-pair range, as the engine splits it */
        memset(y, 0xFF, sizeof(float) * n_embd);
        int64_t c = levels[l]->down_t_matvec(img, n_embd, n_ff, a, y, 0, n_embd / 4);
        c += levels[l]->down_t_matvec(img, n_embd, n_ff, a, y, n_embd / 4, n_embd / 2);
        assert_int_equal(c, 2 * active);
        assert_memory_equal(y, ref, sizeof(float) * n_embd);
    }
    if (n_embd % 32 == 0) s_check_pack(w, rb, img, n_embd, n_ff);
    free(w), free(row), free(xq), free(img), free(y), free(ref);
}

static void test_down_t_dense_activation(void **state) {
    (void)state;
    s_check(256, 128, 0, 1);
}
static void test_down_t_half_idle(void **state) {
    (void)state;
    s_check(1536, 768, 50, 2);
}
static void test_down_t_mostly_idle(void **state) {
    (void)state;
    s_check(512, 256, 95, 3);
}
/* Any fp16 scale (subnormal, zero, negative, large) survives the trip through the image's
 * fp16 scales back into the packed layout bit for bit. */
static void test_down_t_pack_any_scale(void **state) {
    (void)state;
    const int n_embd = 512, n_ff = 256;
    const size_t rb = tensor_type_row_size(STP_TYPE_Q4_0, n_ff);
    uint8_t *w = malloc(rb * n_embd);
    uint64_t seed = 7;
    for (size_t i = 0; i < rb * n_embd; i++) {
        seed = seed * 6364136223846793005ull + 1442695040888963407ull;
        w[i] = (uint8_t)(seed >> 56);
    }
    for (int r = 0; r < n_embd; r++)
        for (int b = 0; b < n_ff / 32; b++) {
            block_q4_0 *blk = (block_q4_0 *)(w + (size_t)r * rb) + b;
            if ((blk->d & 0x7C00) == 0x7C00) blk->d &= 0x83FF; /* no inf/nan: a subnormal */
        }
    uint8_t *img = s_image(w, rb, n_embd, n_ff);
    s_check_pack(w, rb, img, n_embd, n_ff);
    free(w), free(img);
}

/* Every level gives the reference's bits over ranges that are not whole 64-row blocks (the
 * avx512vnni kernel's tail goes through the avx2 one) and at the integer extremes: nibbles 0
 * and 15 against qa = -127 and 127, every neuron active, so each row sum is the largest
 * possible. */
static void s_check_levels(const uint8_t *img, int n_embd, int n_ff, const block_q8_0 *a) {
    float *y1 = malloc(sizeof(float) * n_embd), *y2 = malloc(sizeof(float) * n_embd);
    const int H = n_embd / 2, cut[] = {0, 80, 144, H - 17, H};
    const kern_ops *levels[4];
    int n = kern_ops_all(levels, 4);
    /* a level this CPU cannot run is a CPU-feature skip: printed and counted */
    const char *want[] = {"avx2", "avx512vnni"};
    for (int w = 0; w < 2; w++) {
        bool have = false;
        for (int l = 0; l < n; l++)
            have |= !strcmp(levels[l]->level, want[w]);
        if (!have) th_cpu_skip_note("test_down_t_levels_match_ref", want[w]);
    }
    int64_t c1 = levels[0]->down_t_matvec(img, n_embd, n_ff, a, y1, 0, H);
    for (int l = 1; l < n; l++) {
        int64_t c2 = 0;
        memset(y2, 0xFF, sizeof(float) * n_embd);
        for (int i = 0; i + 1 < 5; i++)
            c2 += levels[l]->down_t_matvec(img, n_embd, n_ff, a, y2, cut[i], cut[i + 1]);
        assert_int_equal(c2, 4 * c1);
        assert_memory_equal(y1, y2, sizeof(float) * n_embd);
    }
    free(y1), free(y2);
}

static void test_down_t_levels_match_ref(void **state) {
    (void)state;
    const int n_embd = 1536, n_ff = 768;
    const size_t rb = tensor_type_row_size(STP_TYPE_Q4_0, n_ff);
    uint8_t *w = malloc(rb * n_embd);
    block_q8_0 *a = malloc(sizeof(block_q8_0) * (n_ff / 32));
    uint64_t seed = 11;
    for (int extreme = 0; extreme < 2; extreme++) {
        for (size_t i = 0; i < rb * n_embd; i++) {
            seed = seed * 6364136223846793005ull + 1442695040888963407ull;
            w[i] = extreme ? ((seed >> 60) & 1 ? 0xFF : 0x00) : (uint8_t)(seed >> 56);
        }
        for (int r = 0; r < n_embd; r++)
            for (int b = 0; b < n_ff / 32; b++) /* finite scales: 1.0 or a small random one */
                ((block_q4_0 *)(w + (size_t)r * rb))[b].d =
                    extreme ? 0x3C00 : (uint16_t)(0x2000 | ((r * 31 + b) & 0x3FF));
        for (int b = 0; b < n_ff / 32; b++) {
            a[b].d = 0x3C00;
            for (int j = 0; j < 32; j++) {
                seed = seed * 6364136223846793005ull + 1442695040888963407ull;
                int v = (int)((seed >> 56) & 0xFF) - 128;
                if (extreme)
                    v = (seed >> 61) & 1 ? 127 : -127;
                else if (b % 5 == 0 || (v > -40 && v < 40))
                    v = 0; /* whole idle groups and a third idle neurons */
                a[b].qs[j] = (int8_t)(v < -127 ? -127 : v);
            }
        }
        uint8_t *img = s_image(w, rb, n_embd, n_ff);
        s_check_levels(img, n_embd, n_ff, a);
        free(img);
    }
    free(w), free(a);
}

static void test_down_t_unsupported_type(void **state) {
    (void)state;
    assert_int_equal(down_t_expert_bytes(STP_TYPE_Q8_0, 64, 32), 0);
    assert_int_equal(down_t_expert_bytes(STP_TYPE_Q4_0, 64, 48), 0);
    assert_true(down_t_expert_bytes(STP_TYPE_Q4_0, 64, 64) > 0);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_down_t_dense_activation),
        cmocka_unit_test(test_down_t_half_idle),
        cmocka_unit_test(test_down_t_mostly_idle),
        cmocka_unit_test(test_down_t_pack_any_scale),
        cmocka_unit_test(test_down_t_levels_match_ref),
        cmocka_unit_test(test_down_t_unsupported_type),
    };
    return th_exit_code(cmocka_run_group_tests(tests, NULL, NULL));
}
