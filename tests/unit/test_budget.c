/* test_budget: the pipeline's memory plan (common/plan/budget.h). The sizes it counts equal what
 * the stages allocate (kv_cache_new's and attn_scratch_new's byte counts, the built layout's
 * largest record), a hand-worked configuration gives hand-computed bytes, and the plan's frames,
 * minimum and refusal follow from them at the edges (the minimum itself, one byte below). */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "layout/layout.h"
#include "model/attention.h"
#include "model/kv_cache.h"
#include "model/model.h"
#include "model/forward.h"
#include "plan/budget.h"
#include "th_gguf.h"
#include "shm/shm.h"

/* A config with every size the plan reads set by hand (the rest zero). */
static model_config s_hand_config(void) {
    model_config c;
    memset(&c, 0, sizeof c);
    c.n_layer = 4;
    c.n_embd = 64;
    c.n_head = 4;
    c.n_head_kv = 2;
    c.head_dim = 16;
    c.n_expert = 8;
    c.n_expert_used = 2;
    c.n_ff_exp = 32;
    c.n_vocab = 100;
    c.n_ctx_train = 2048;
    c.sliding_window = 16;
    c.nope_step = 4;
    return c;
}

static void test_budget_kv_bytes_by_hand(void **st) {
    (void)st;
    model_config c = s_hand_config();
    /* kv_dim 32; layer 0 NoPE: 100 slots; layers 1-3 window 16 + ubatch 8 = 24 slots:
     * 2 * (100 + 3 * 24) * 32 * 4 = 44032 in f32, half in f16 */
    assert_int_equal(budget_kv_bytes(&c, 100, 8, false), 44032);
    assert_int_equal(budget_kv_bytes(&c, 100, 8, true), 22016);
    /* a ring as long as the context stays n_ctx: 2 * 4 * 20 * 32 * 4 */
    assert_int_equal(budget_kv_bytes(&c, 20, 8, false), 20480);
    c.sliding_window = 0;
    assert_int_equal(budget_kv_bytes(&c, 100, 8, false), 2 * 4 * 100 * 32 * 4);
}

static void test_budget_kv_bytes_equal_kv_cache(void **st) {
    (void)st;
    const char *models[] = {"tiny-dense-attn-f32.gguf", "tiny-hybrid-attn-f32.gguf"};
    const int ctx[] = {16, 300, 1024, 5000}, ub[] = {1, 8, 512}; /* (window 4096) */
    int rings = 0;
    for (int mi = 0; mi < 2; mi++) {
        model *m = th_model_open(models[mi]);
        for (int i = 0; i < 4; i++)
            for (int j = 0; j < 3; j++)
                for (int ty = KV_F32; ty <= KV_Q8_0; ty++) {
                    kv_cache *kv = NULL;
                    stp_err err = {0};
                    int u = ub[j] < ctx[i] ? ub[j] : ctx[i];
                    assert_int_equal(kv_cache_new(&kv, &m->cfg, ctx[i], u, ty, &err), 0);
                    assert_int_equal(budget_kv_bytes(&m->cfg, ctx[i], u, ty), kv->bytes);
                    for (int il = 0; il < kv->n_layer; il++)
                        rings += kv->layers[il].cap < ctx[i];
                    kv_cache_destroy(&kv);
                }
        model_close(&m);
    }
    assert_true(rings > 0); /* the hybrid model's windowed layers were rings somewhere */
}

static void test_budget_attn_scratch_equal_attn_scratch(void **st) {
    (void)st;
    model *m = th_model_open("tiny-hybrid-attn-f32.gguf");
    const int ctx[] = {16, 1024}, ub[] = {1, 16}, thr[] = {1, 2, 3};
    for (int i = 0; i < 2; i++)
        for (int j = 0; j < 2; j++)
            for (int k = 0; k < 3; k++) {
                attn_scratch *as = NULL;
                stp_err err = {0};
                assert_int_equal(attn_scratch_new(&as, &m->cfg, ub[j], ctx[i], thr[k], &err), 0);
                assert_int_equal(budget_attn_scratch_bytes(&m->cfg, ub[j], ctx[i], thr[k]),
                                 attn_scratch_bytes(as));
                attn_scratch_destroy(&as);
            }
    model_close(&m);
}

static void test_budget_frame_bytes_equal_built_layout(void **st) {
    (void)st;
    char model_path[1024], dir[1024], path[4096];
    snprintf(model_path, sizeof model_path, "%s/tiny-dense-attn-q4_0-pure.gguf",
             getenv("STP_TEST_DATA"));
    mkdir(getenv("STP_TMP"), 0700);
    snprintf(dir, sizeof dir, "%s/budget-unit-%d", getenv("STP_TMP"), (int)getpid());
    mkdir(dir, 0700);
    stp_err err = {0};
    assert_int_equal(layout_path(path, sizeof path, model_path, dir, &err), 0);
    model *m = th_model_open("tiny-dense-attn-q4_0-pure.gguf");
    uint32_t fl = layout_wants_flags(m);
    layout *l = NULL;
    bool rebuilt = false;
    assert_int_equal(layout_ensure(&l, m, model_path, path, fl, NULL, &rebuilt, &err), 0);
    uint64_t largest = 0;
    for (int il = 0; il < m->cfg.n_layer; il++)
        for (int x = 0; x < m->cfg.n_expert; x++)
            if (layout_record_bytes(l, il, x) > largest) largest = layout_record_bytes(l, il, x);
    assert_true(largest > 0);
    assert_int_equal(layout_frame_bytes(m, fl), largest);
    layout_close(&l);
    model_close(&m);
    unlink(path);
    rmdir(dir);
}

/* The plan of the hand config with a 1 MiB frame. */
static int s_plan(budget_plan *p, uint64_t budget, stp_err *err) {
    static model_config c;
    c = s_hand_config();
    budget_params bp = {.cfg = &c,
                        .non_expert = 1000000,
                        .frame_bytes = 1 << 20,
                        .n_ctx = 100,
                        .n_ubatch = 8,
                        .budget = budget};
    return budget_plan_compute(p, &bp, err);
}

static void test_budget_plan_parts_add_up(void **st) {
    (void)st;
    budget_plan p;
    stp_err err = {0};
    assert_int_equal(s_plan(&p, 0, &err), 0);
    model_config c = s_hand_config();
    act_header ah;
    act_layout(&ah, 8, 64, 2, 100, 1);
    assert_int_equal(p.kv, 44032);
    assert_int_equal(p.act, ah.size);
    assert_int_equal(p.attn_scratch, budget_attn_scratch_bytes(&c, 8, 100, 1));
    /* x, h, ffn and router rows, a chunk's rows part way (forward_part); the LM head's normed
     * row and activations (one slot) and its queue of the micro-batch's rows (two pointers each) */
    assert_int_equal(p.attn_buffers,
                     8 * 64 * 4 * 5 + 64 * 4 + 64 * 4 + 64 + 8 * 2 * (int)sizeof(void *));
    assert_int_equal(p.worker, budget_worker_bytes(&c));
    assert_int_equal(p.scratch, p.attn_scratch + p.attn_buffers + p.worker);
    assert_int_equal(p.overhead, 4 * BUDGET_PROC_OVERHEAD + 100 * BUDGET_TOKENIZER_BYTES);
    assert_int_equal(p.table, pool_table_bytes(4, 8));
    assert_int_equal(p.fixed, 1000000 + p.kv + p.act + p.scratch + p.overhead + p.table);
    assert_int_equal(p.minimum, p.fixed + 8 * (1 << 20));
    /* unlimited: every expert */
    assert_int_equal(p.frames, 32);
    assert_int_equal(p.all_frames, 32);
    assert_int_equal(p.pool_bytes, p.table + 32ull * (1 << 20));
}

static void test_budget_plan_frames_at_the_edges(void **st) {
    (void)st;
    budget_plan p;
    stp_err err = {0};
    assert_int_equal(s_plan(&p, 0, &err), 0);
    const uint64_t min = p.minimum, fixed = p.fixed;
    /* the minimum gives one layer; a frame more gives one more; a byte less gives the same */
    assert_int_equal(s_plan(&p, min, &err), 0);
    assert_int_equal(p.frames, 8);
    assert_int_equal(s_plan(&p, min + (1 << 20) - 1, &err), 0);
    assert_int_equal(p.frames, 8);
    assert_int_equal(s_plan(&p, min + (1 << 20), &err), 0);
    assert_int_equal(p.frames, 9);
    assert_int_equal(p.pool_bytes, p.table + 9ull * (1 << 20));
    /* more than everything: every expert, no more */
    assert_int_equal(s_plan(&p, fixed + 1000ull * (1 << 20), &err), 0);
    assert_int_equal(p.frames, 32);
    /* one byte below the minimum: refused, the minimum in the message, the plan still filled */
    assert_int_equal(s_plan(&p, min - 1, &err), STP_EINVAL);
    assert_non_null(strstr(err.msg, "the minimum is"));
    assert_int_equal(p.minimum, min);
    assert_int_equal(p.frames, 0);
}

static void test_budget_plan_parameters(void **st) {
    (void)st;
    model_config c = s_hand_config();
    budget_params bp = {.cfg = &c, .frame_bytes = 4096, .n_ctx = 100, .n_ubatch = 8};
    budget_plan one, p;
    stp_err err = {0};
    assert_int_equal(budget_plan_compute(&one, &bp, &err), 0);
    /* defaults: 1 sequence, 1 worker, 1 thread; context from the model up to 4096 */
    assert_int_equal(one.n_seq, 1);
    assert_int_equal(one.workers, 1);
    assert_int_equal(one.threads, 1);
    bp.n_seq = 3;
    assert_int_equal(budget_plan_compute(&p, &bp, &err), 0);
    assert_int_equal(p.kv, 3 * one.kv);
    /* the activation region holds a row of logits per slot; the rest does not depend on it */
    act_header ah;
    act_layout(&ah, 8, c.n_embd, c.n_expert_used, c.n_vocab, 3);
    assert_int_equal(p.act, ah.size);
    assert_true(p.act >= one.act + 2ull * c.n_vocab * 4 - 64); /* rows rounded to 64 bytes */
    /* the LM head's rows: three, and a logits row each */
    const uint64_t heads = p.scratch - one.scratch;
    assert_int_equal(heads, 2 * (64 * 4 + 64 * 4 + 64) + 3ull * c.n_vocab * 4);
    assert_int_equal(heads, forward_heads_buf_size(&c, 3, 8) - forward_heads_buf_size(&c, 1, 8));
    assert_int_equal(p.fixed - one.fixed, 2 * one.kv + (p.act - one.act) + heads);
    assert_int_equal(p.minimum - one.minimum, p.fixed - one.fixed);
    /* a budget that holds one slot's plan but not three slots' is refused, naming the slots */
    bp.budget = one.minimum;
    assert_int_equal(budget_plan_compute(&p, &bp, &err), STP_EINVAL);
    assert_non_null(strstr(err.msg, "with 3 sequence slots"));
    bp.budget = 0;
    bp.n_seq = 1;
    bp.workers = 2;
    assert_int_equal(budget_plan_compute(&p, &bp, &err), 0);
    assert_int_equal(p.scratch, one.scratch + one.worker);
    assert_int_equal(p.overhead, one.overhead + BUDGET_PROC_OVERHEAD);
    bp.workers = 1;
    bp.threads = 3;
    assert_int_equal(budget_plan_compute(&p, &bp, &err), 0);
    /* each thread adds its attention work area and chunk partials */
    assert_int_equal(p.attn_scratch, attn_scratch_size(&c, 8, 100, 3));
    assert_true(p.attn_scratch > one.attn_scratch);
    bp.threads = 1;
    bp.kv_type = KV_F16;
    assert_int_equal(budget_plan_compute(&p, &bp, &err), 0);
    assert_int_equal(p.kv * 2, one.kv);
    bp.kv_type = KV_Q8_0; /* 34 bytes per 32 values: 34/128 of f32's */
    assert_int_equal(budget_plan_compute(&p, &bp, &err), 0);
    assert_int_equal(p.kv * 128, one.kv * 34);
    bp.kv_type = KV_F32;
    bp.n_ctx = 0;
    bp.n_ubatch = 0;
    assert_int_equal(budget_plan_compute(&p, &bp, &err), 0);
    assert_int_equal(p.n_ctx, 2048);
    assert_int_equal(p.n_ubatch, 512);
    c.n_ctx_train = 32768;
    assert_int_equal(budget_plan_compute(&p, &bp, &err), 0);
    assert_int_equal(p.n_ctx, 4096);
    /* a fixed pool size (tests): at least one layer, at most everything */
    bp.pool_experts = 3;
    assert_int_equal(budget_plan_compute(&p, &bp, &err), 0);
    assert_int_equal(p.frames, 8);
    bp.pool_experts = 10;
    assert_int_equal(budget_plan_compute(&p, &bp, &err), 0);
    assert_int_equal(p.frames, 10);
    bp.pool_experts = 1000;
    assert_int_equal(budget_plan_compute(&p, &bp, &err), 0);
    assert_int_equal(p.frames, 32);
}

static void test_budget_parse_size(void **st) {
    (void)st;
    uint64_t v = 0;
    stp_err err = {0};
    assert_int_equal(budget_parse_size("1G", &v, &err), 0);
    assert_int_equal(v, 1ull << 30);
    assert_int_equal(budget_parse_size("800M", &v, &err), 0);
    assert_int_equal(v, 800ull << 20);
    assert_int_equal(budget_parse_size("1.5GiB", &v, &err), 0);
    assert_int_equal(v, 3ull << 29);
    assert_int_equal(budget_parse_size("123456", &v, &err), 0);
    assert_int_equal(v, 123456);
    assert_int_equal(budget_parse_size("2k", &v, &err), 0);
    assert_int_equal(v, 2048);
    assert_int_equal(budget_parse_size("12X", &v, &err), STP_EINVAL);
    assert_int_equal(budget_parse_size("G", &v, &err), STP_EINVAL);
    assert_int_equal(budget_parse_size("-1G", &v, &err), STP_EINVAL);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_budget_kv_bytes_by_hand),
        cmocka_unit_test(test_budget_kv_bytes_equal_kv_cache),
        cmocka_unit_test(test_budget_attn_scratch_equal_attn_scratch),
        cmocka_unit_test(test_budget_frame_bytes_equal_built_layout),
        cmocka_unit_test(test_budget_plan_parts_add_up),
        cmocka_unit_test(test_budget_plan_frames_at_the_edges),
        cmocka_unit_test(test_budget_plan_parameters),
        cmocka_unit_test(test_budget_parse_size),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
