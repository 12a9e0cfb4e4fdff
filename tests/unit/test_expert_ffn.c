/* test_expert_ffn: expert_ffn_run (the FFN both moe_forward and the expert worker run) gives,
 * for every slot, the bits of a plain per-slot product (dense matvecs of gate, up and down)
 * through every path it picks: a group longer than a chunk (split at 256), more packing runs
 * than one wave holds, short runs with each slot's active `up` rows, down from GGUF rows or
 * from down_t images (single-slot sparse products, batches packed from the rows or back from
 * the image), gate from rows or its q4_0x16 image, on 1 and 2 threads, and a decode step's
 * short runs as one task per run (its slots sharing each block of up and down_t) on 1, 2 and
 * 3 threads; outputs land in the rows y_row names, and the statistics count exactly (active
 * neurons; down neurons: every slot's n_ff, or with down_t images its nonzero activations). */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdlib.h>
#include <string.h>

#include "model/down_t.h"
#include "model/expert_ffn.h"

/* n_embd and n_ff large enough that a task's up rows (640: blocks of 256, 256, 128) and down_t
 * row pairs (544: 256, 256 and a 32-pair tail below the 64 of the AVX-512 kernel) go in several
 * blocks */
enum { E = 1088, F = 640, X = 12, T = 64 };
/* slots per expert: one group longer than a chunk, single slots, ten runs that pack `down`
 * (in two waves; `up` packs from EXPERT_FFN_PACK_UP_MIN slots: the long group's two runs) */
static const int k_n[X] = {300, 1, 9, 10, 10, 10, 10, 10, 10, 10, 10, 3};
/* a decode step's slots: every run shorter than a packing run, so with images each run is one
 * task (gate, its slots' up rows, down_t) */
static const int k_decode[X] = {1, 1, 2, 1, 3, 1, 1, 1, 2, 1, 1, 7};

static float s_rand(uint64_t *s) {
    *s = *s * 6364136223846793005ull + 1442695040888963407ull;
    return (float)((*s >> 40) & 0xFFFFFF) / 16777216.0f * 2.0f - 1.0f;
}

/* A (X, rows, cols) Q4_0 stack of random weights as a tensor view (data malloc'd). */
static tensor_view s_stack(int rows, int cols, uint64_t *seed) {
    const size_t rb = tensor_type_row_size(STP_TYPE_Q4_0, cols);
    uint8_t *w = malloc(rb * rows * X);
    float *row = malloc(sizeof(float) * cols);
    for (int r = 0; r < rows * X; r++) {
        for (int i = 0; i < cols; i++)
            row[i] = s_rand(seed) * 0.1f;
        kern_quantize_row_ref(STP_TYPE_Q4_0, row, w + (size_t)r * rb, cols);
    }
    free(row);
    return (tensor_view){.data = w,
                         .type = STP_TYPE_Q4_0,
                         .n_cols = cols,
                         .n_rows = rows,
                         .n_mat = X,
                         .row_bytes = rb,
                         .mat_bytes = rb * rows};
}

/* Slot s's output by dense matvecs, one vector at a time; its active neurons. *nz gets the
 * nonzero quants of its down activation (the neurons a down_t product computes). */
static uint64_t s_reference(const kern_ops *ops, const layer_weights *L, int e, const float *h,
                            float *y, uint64_t *nz) {
    uint8_t xq[E * 2], aq[F * 2];
    float g[F], u[F];
    ops->quantize_act(STP_TYPE_Q4_0, h, xq, E);
    ops->matvec(STP_TYPE_Q4_0, E, L->gate_exps.data + (size_t)e * L->gate_exps.mat_bytes,
                L->gate_exps.row_bytes, xq, g, 0, F);
    ops->matvec(STP_TYPE_Q4_0, E, L->up_exps.data + (size_t)e * L->up_exps.mat_bytes,
                L->up_exps.row_bytes, xq, u, 0, F);
    uint64_t active = 0;
    for (int i = 0; i < F; i++) {
        active += g[i] > 0.0f;
        g[i] = g[i] > 0.0f ? g[i] * u[i] : 0.0f;
    }
    ops->quantize_act(STP_TYPE_Q4_0, g, aq, F);
    for (int b = 0; b < F / 32; b++)
        for (int j = 0; j < 32; j++)
            *nz += ((const block_q8_0 *)aq)[b].qs[j] != 0;
    ops->matvec(STP_TYPE_Q4_0, F, L->down_exps.data + (size_t)e * L->down_exps.mat_bytes,
                L->down_exps.row_bytes, aq, y, 0, E);
    return active;
}

/* images: IMG_GATE (the gate's q4_0x16 image), IMG_DOWN_T (down_t images); st: the statistics. */
enum { IMG_GATE = 1, IMG_DOWN_T = 2, IMG_BOTH = 3 };
static void s_check(int threads, int images, const int *counts, expert_ffn_stats *st_out) {
    const kern_ops *ops = kern_ops_get();
    uint64_t seed = 5;
    layer_weights L = {.gate_exps = s_stack(F, E, &seed),
                       .up_exps = s_stack(F, E, &seed),
                       .down_exps = s_stack(E, F, &seed)};
    float *h = malloc(sizeof(float) * T * E);
    for (int i = 0; i < T * E; i++)
        h[i] = s_rand(&seed);
    int S = 0;
    for (int e = 0; e < X; e++)
        S += counts[e];
    int32_t *tok = malloc(sizeof(int32_t) * S), *y_row = malloc(sizeof(int32_t) * S);
    float *y = malloc(sizeof(float) * S * E), *ref = malloc(sizeof(float) * S * E);
    expert_ffn_group groups[X];
    uint8_t *gate_x16[X], *dt[X];
    uint64_t active = 0, down = 0; /* the statistics expected */
    for (int e = 0, s0 = 0; e < X; s0 += counts[e++]) {
        gate_x16[e] = dt[e] = NULL;
        if (images & IMG_GATE) {
            gate_x16[e] = aligned_alloc(64, kern_q4_0x16_size(F, E));
            kern_q4_0x16_pack(L.gate_exps.data + (size_t)e * L.gate_exps.mat_bytes,
                              L.gate_exps.row_bytes, F, E, gate_x16[e]);
        }
        if (images & IMG_DOWN_T) {
            dt[e] = malloc(down_t_expert_bytes(STP_TYPE_Q4_0, E, F));
            down_t_build_expert(&L.down_exps, e, dt[e]);
        }
        groups[e] = (expert_ffn_group){
            .w = {.gate = gate_x16[e] ? gate_x16[e]
                                      : L.gate_exps.data + (size_t)e * L.gate_exps.mat_bytes,
                  .gate_x16 = gate_x16[e],
                  .up = L.up_exps.data + (size_t)e * L.up_exps.mat_bytes,
                  /* with images: the rows too for even experts (in process: batched runs
                   * pack the rows), only the image for odd ones (a pool slot) */
                  .down =
                      dt[e] && e % 2 ? NULL : L.down_exps.data + (size_t)e * L.down_exps.mat_bytes,
                  .down_t = dt[e]},
            .s0 = s0,
            .n = counts[e]};
        for (int s = s0; s < s0 + counts[e]; s++) {
            tok[s] = (s * 7) % T;
            y_row[s] = S - 1 - s; /* outputs land in the rows named, here reversed */
            uint64_t nz = 0;
            active +=
                s_reference(ops, &L, e, h + (size_t)tok[s] * E, ref + (size_t)y_row[s] * E, &nz);
            /* down_t products skip idle neurons; packed runs and GGUF rows compute them all */
            down += (images & IMG_DOWN_T) && counts[e] < MM_PACK_MIN_VEC ? nz : (uint64_t)F;
        }
    }
    model_config cfg = {.n_embd = E, .n_ff_exp = F};
    expert_ffn *f = NULL;
    stp_err err = {0};
    assert_int_equal(expert_ffn_new(&f, &cfg, &err), 0);
    threadpool *tp = NULL;
    assert_int_equal(threadpool_new(&tp, threads, &err), 0);
    compute_ctx cc = {.ops = ops, .tp = tp};
    expert_ffn_stats st = {0, 0};
    memset(y, 0xFF, sizeof(float) * S * E);
    expert_ffn_run(f, &cc, &L, groups, X, h, tok, y, y_row, &st);
    assert_memory_equal(y, ref, sizeof(float) * S * E);
    assert_int_equal(st.active, active);
    assert_int_equal(st.down, down);
    if (st_out) *st_out = st;
    assert_true(st.down > 0 && st.down <= (uint64_t)S * F);
    threadpool_destroy(&tp);
    expert_ffn_destroy(&f);
    assert_null(f);
    for (int e = 0; e < X; e++)
        free(gate_x16[e]), free(dt[e]);
    free((void *)L.gate_exps.data), free((void *)L.up_exps.data), free((void *)L.down_exps.data);
    free(h), free(tok), free(y_row), free(y), free(ref);
}

static void test_expert_ffn_rows_one_thread(void **state) {
    (void)state;
    s_check(1, 0, k_n, NULL);
}
static void test_expert_ffn_rows_two_threads(void **state) {
    (void)state;
    s_check(2, 0, k_n, NULL);
}
static void test_expert_ffn_images_one_thread(void **state) {
    (void)state;
    s_check(1, IMG_BOTH, k_n, NULL);
}
static void test_expert_ffn_images_two_threads(void **state) {
    (void)state;
    s_check(2, IMG_BOTH, k_n, NULL);
}

/* the tasks on 1, 2 and 3 threads against the reference (s_check holds their statistics to
 * the reference's counts), and equal to each other */
static void test_expert_ffn_tasks(void **state) {
    (void)state;
    expert_ffn_stats one, two, three;
    s_check(1, IMG_BOTH, k_decode, &one);
    s_check(2, IMG_BOTH, k_decode, &two);
    s_check(3, IMG_BOTH, k_decode, &three);
    assert_int_equal(two.active, one.active);
    assert_int_equal(two.down, one.down);
    assert_int_equal(three.active, one.active);
    assert_int_equal(three.down, one.down);
}
/* tasks with the gate from its GGUF rows (no image), and short runs without down_t images
 * (the phased path on 2 threads) */
static void test_expert_ffn_tasks_plain_gate(void **state) {
    (void)state;
    s_check(2, IMG_DOWN_T, k_decode, NULL);
    s_check(2, 0, k_decode, NULL);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_expert_ffn_rows_one_thread),
        cmocka_unit_test(test_expert_ffn_rows_two_threads),
        cmocka_unit_test(test_expert_ffn_images_one_thread),
        cmocka_unit_test(test_expert_ffn_images_two_threads),
        cmocka_unit_test(test_expert_ffn_tasks),
        cmocka_unit_test(test_expert_ffn_tasks_plain_gate),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
