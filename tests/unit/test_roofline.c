/* test_roofline: the bytes per decoded token of model/roofline.h on a hand-built model of
 * four layers (layer 0 full attention, layers 1-3 a window of 4): K/V rows honour the window,
 * the gate counts n_expert_used experts in full, up and down follow the engine's counters
 * (several runs' counters divide by their token count), the LM head is read once. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <string.h>

#include "model/roofline.h"

static void s_view(tensor_view *t, size_t row_bytes, int64_t rows) {
    memset(t, 0, sizeof *t);
    t->row_bytes = row_bytes;
    t->n_rows = rows;
    t->n_mat = 1;
    t->mat_bytes = row_bytes * (size_t)rows;
}

static void test_roofline_window_and_counters(void **state) {
    (void)state;
    layer_weights L[4];
    model m;
    memset(&m, 0, sizeof m);
    m.cfg = (model_config){.n_layer = 4,
                           .n_embd = 8,
                           .n_head = 2,
                           .n_head_kv = 1,
                           .head_dim = 2,
                           .n_expert = 4,
                           .n_expert_used = 2,
                           .n_ff_exp = 16,
                           .n_vocab = 10,
                           .sliding_window = 4,
                           .nope_step = 4};
    for (int il = 0; il < 4; il++) {
        s_view(&L[il].wq, 100, 4);       /* 400 */
        s_view(&L[il].wk, 10, 2);        /* 20 */
        s_view(&L[il].wv, 10, 2);        /* 20 */
        s_view(&L[il].wo, 60, 10);       /* 600 */
        s_view(&L[il].router, 32, 4);    /* 128 */
        s_view(&L[il].gate_exps, 9, 16); /* 144 an expert */
        s_view(&L[il].up_exps, 9, 16);   /* 9 a row */
        s_view(&L[il].down_exps, 5, 8);  /* 40 a matrix of 16 neurons: 2.5 a neuron */
    }
    m.layers = L;
    s_view(&m.output, 7, 10); /* 70 */
    /* two runs of 2 tokens at positions 6, 7: 500 up rows and 300 down neurons in all */
    engine_stats st = {.tokens = 4, .neurons_active = 500, .down_neurons = 300};
    roofline_bytes rb;
    roofline_decode_bytes(&m, 6, 2, 4.0, &st, &rb);
    /* K+V row: 1 head x 2 dims x 2 x 4 bytes = 16; layer 0 attends 7 and 8 (mean 7.5), the
     * windowed layers 4 each */
    const double kv = (7.5 + 3 * 4) * 16;
    assert_true(rb.attn_kv == kv);
    assert_true(rb.stage[ROOFLINE_ATTN] == 4 * 1040 + kv);
    assert_true(rb.stage[ROOFLINE_ROUTER] == 4 * 128);
    assert_true(rb.stage[ROOFLINE_EXPERTS] == 4 * 2 * 144 + (500 * 9 + 300 * 2.5) / 4);
    assert_true(rb.stage[ROOFLINE_HEAD] == 70);
    /* an f16 cache halves the K/V part only; a context inside the window reads every row */
    roofline_decode_bytes(&m, 0, 3, 2.0, &st, &rb);
    assert_true(rb.attn_kv == 4 * 2.0 * 8); /* 4 layers x mean of 1, 2, 3 x row of 8 */
    assert_string_equal(roofline_stage_name(ROOFLINE_HEAD), "lm_head");
    assert_string_equal(roofline_stage_name(ROOFLINE_N), "?");
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_roofline_window_and_counters),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
