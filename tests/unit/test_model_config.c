/* test_model_config: hyper-parameters from GGUF metadata (model_config_load) and the weight
 * checks of model_open, on the tiny golden models and on edited or synthetic GGUFs written
 * with the GGUF writer (tests/helpers/th_gguf.h) under $STP_TMP. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kern/kern.h"
#include "model/model.h"
#include "th_gguf.h"

#define DENSE "tiny-dense-attn-f32.gguf"
#define HYBRID "tiny-hybrid-attn-f32.gguf"

/* Loads the config of path; returns the rc, err and warn filled. */
static int s_load(const char *path, model_config *cfg, char *warn, size_t cap, stp_err *err) {
    gguf_file *g = NULL;
    int rc = gguf_open(&g, path, err);
    if (rc) fail_msg("%s", err->msg);
    rc = model_config_load(cfg, g, warn, cap, err);
    gguf_close(&g);
    return rc;
}

/* Copies the dense tiny model with kv edits to tmp name; returns the path in buf. */
static const char *s_copy(char *buf, size_t cap, const char *name, const th_copy_opts *o) {
    char src[4096];
    stp_err err = {0};
    th_tmp_path(buf, cap, name);
    if (th_gguf_copy(th_data_path(src, sizeof src, DENSE), buf, o, &err)) fail_msg("%s", err.msg);
    return buf;
}

static const char *s_synth(char *buf, size_t cap, const char *name, const th_model_spec *s) {
    stp_err err = {0};
    th_tmp_path(buf, cap, name);
    if (th_model_write(buf, s, &err)) fail_msg("%s", err.msg);
    return buf;
}

static void test_model_config_dense_values(void **state) {
    (void)state;
    char p[4096], warn[256];
    model_config c;
    stp_err err = {0};
    assert_int_equal(s_load(th_data_path(p, sizeof p, DENSE), &c, warn, sizeof warn, &err), 0);
    assert_int_equal(c.n_layer, 4);
    assert_int_equal(c.n_embd, 64);
    assert_int_equal(c.n_head, 4);
    assert_int_equal(c.n_head_kv, 2);
    assert_int_equal(c.head_dim, 16);
    assert_int_equal(c.n_vocab, 320);
    assert_int_equal(c.n_ctx_train, 4096);
    assert_int_equal(c.n_expert, 8);
    assert_int_equal(c.n_expert_used, 2);
    assert_int_equal(c.n_ff_exp, 32);
    assert_float_equal(c.rope_base, 1500000.0f, 0.5f);
    assert_float_equal(c.rms_eps, 1e-6f, 1e-12f);
    assert_int_equal(c.gating, GATING_SIGMOID);
    assert_false(c.gating_guessed);
    assert_string_equal(warn, "");
    assert_int_equal(c.sliding_window, 0);
    assert_true(c.tied);
    for (int il = 0; il < c.n_layer; il++) {
        assert_true(model_config_layer_rope(&c, il));
        assert_int_equal(model_config_layer_window(&c, il), 0);
    }
}

static void test_model_config_hybrid_layers(void **state) {
    (void)state;
    char p[4096];
    model_config c;
    stp_err err = {0};
    assert_int_equal(s_load(th_data_path(p, sizeof p, HYBRID), &c, NULL, 0, &err), 0);
    assert_int_equal(c.n_layer, 6);
    assert_int_equal(c.gating, GATING_SOFTMAX);
    assert_false(c.gating_guessed);
    assert_int_equal(c.sliding_window, 4096);
    assert_int_equal(c.nope_step, 4);
    assert_false(c.tied);
    assert_int_equal(c.n_ctx_train, 8192);
    for (int il = 0; il < c.n_layer; il++) {
        bool global = il % 4 == 0;
        assert_int_equal(model_config_layer_rope(&c, il), !global);
        assert_int_equal(model_config_layer_window(&c, il), global ? 0 : 4096);
    }
}

static void test_model_config_sliding_window_added(void **state) {
    (void)state;
    char p[4096];
    th_kv_edit kv[] = {{.key = "smallthinker.attention.sliding_window", .op = TH_KV_U32, .u32 = 8}};
    th_copy_opts o = {.kv = kv, .n_kv = 1};
    s_copy(p, sizeof p, "cfg_swa.gguf", &o);
    model_config c;
    stp_err err = {0};
    assert_int_equal(s_load(p, &c, NULL, 0, &err), 0);
    assert_int_equal(c.sliding_window, 8);
    const bool rope[4] = {false, true, true, true};
    const int win[4] = {0, 8, 8, 8};
    for (int il = 0; il < 4; il++) {
        assert_int_equal(model_config_layer_rope(&c, il), rope[il]);
        assert_int_equal(model_config_layer_window(&c, il), win[il]);
    }
    unlink(p);
}

static void test_model_config_gating_absent_small_is_sigmoid(void **state) {
    (void)state;
    char p[4096], warn[512];
    th_kv_edit kv[] = {{.key = "smallthinker.expert_gating_func", .op = TH_KV_DROP}};
    th_copy_opts o = {.kv = kv, .n_kv = 1};
    s_copy(p, sizeof p, "cfg_nogate.gguf", &o);
    model_config c;
    stp_err err = {0};
    assert_int_equal(s_load(p, &c, warn, sizeof warn, &err), 0);
    assert_int_equal(c.gating, GATING_SIGMOID);
    assert_true(c.gating_guessed);
    assert_non_null(strstr(warn, "sigmoid"));
    assert_non_null(strstr(warn, "expert_gating_func"));
    /* model_open keeps the warning for the CLI */
    model *m = NULL;
    assert_int_equal(model_open(&m, p, &err), 0);
    assert_non_null(strstr(m->warning, "sigmoid"));
    model_close(&m);
    assert_null(m);
    unlink(p);
}

static void s_gating_guess(int n_expert, model_gating want, const char *word) {
    char p[4096], name[64], warn[512];
    snprintf(name, sizeof name, "cfg_guess_%d.gguf", n_expert);
    th_model_spec s = th_model_spec_small(n_expert);
    s_synth(p, sizeof p, name, &s);
    model_config c;
    stp_err err = {0};
    assert_int_equal(s_load(p, &c, warn, sizeof warn, &err), 0);
    assert_int_equal(c.n_expert, n_expert);
    assert_int_equal(c.gating, want);
    assert_true(c.gating_guessed);
    assert_non_null(strstr(warn, word));
    char num[16];
    snprintf(num, sizeof num, "%d", n_expert);
    assert_non_null(strstr(warn, num));
    /* the whole model opens (tensor shapes of the synthetic writer match the config) */
    model *m = NULL;
    if (model_open(&m, p, &err)) fail_msg("%s", err.msg);
    assert_int_equal(m->layers[1].gate_exps.n_mat, n_expert);
    model_close(&m);
    unlink(p);
}

static void test_model_config_gating_absent_32_sigmoid(void **state) {
    (void)state;
    s_gating_guess(32, GATING_SIGMOID, "sigmoid");
}

static void test_model_config_gating_absent_64_softmax(void **state) {
    (void)state;
    s_gating_guess(64, GATING_SOFTMAX, "softmax");
}

static void test_model_config_gating_explicit_overrides_guess(void **state) {
    (void)state;
    char p[4096], warn[128];
    th_model_spec s = th_model_spec_small(64);
    s.gating = 2; /* sigmoid although 64 experts */
    s_synth(p, sizeof p, "cfg_gate64s.gguf", &s);
    model_config c;
    stp_err err = {0};
    assert_int_equal(s_load(p, &c, warn, sizeof warn, &err), 0);
    assert_int_equal(c.gating, GATING_SIGMOID);
    assert_false(c.gating_guessed);
    assert_string_equal(warn, "");
    unlink(p);
}

static void test_model_config_gating_unknown_refused(void **state) {
    (void)state;
    char p[4096];
    th_kv_edit kv[] = {{.key = "smallthinker.expert_gating_func", .op = TH_KV_U32, .u32 = 3}};
    th_copy_opts o = {.kv = kv, .n_kv = 1};
    s_copy(p, sizeof p, "cfg_gate3.gguf", &o);
    model_config c;
    stp_err err = {0};
    assert_int_equal(s_load(p, &c, NULL, 0, &err), STP_EUNSUPPORTED);
    assert_non_null(strstr(err.msg, "expert_gating_func"));
    unlink(p);
}

static void test_model_config_other_arch_refused(void **state) {
    (void)state;
    char p[4096];
    th_kv_edit kv[] = {{.key = "general.architecture", .op = TH_KV_STR, .str = "llama"}};
    th_copy_opts o = {.kv = kv, .n_kv = 1};
    s_copy(p, sizeof p, "cfg_llama.gguf", &o);
    model_config c;
    stp_err err = {0};
    assert_int_equal(s_load(p, &c, NULL, 0, &err), STP_EUNSUPPORTED);
    assert_non_null(strstr(err.msg, "'llama'"));
    assert_non_null(strstr(err.msg, p));
    model *m = NULL;
    assert_int_equal(model_open(&m, p, &err), STP_EUNSUPPORTED);
    assert_null(m);
    unlink(p);
}

static void test_model_config_no_arch_refused(void **state) {
    (void)state;
    char p[4096];
    th_kv_edit kv[] = {{.key = "general.architecture", .op = TH_KV_DROP}};
    th_copy_opts o = {.kv = kv, .n_kv = 1};
    s_copy(p, sizeof p, "cfg_noarch.gguf", &o);
    model_config c;
    stp_err err = {0};
    assert_int_equal(s_load(p, &c, NULL, 0, &err), STP_EFORMAT);
    assert_non_null(strstr(err.msg, "general.architecture"));
    unlink(p);
}

/* One edited key must be refused with code and a message containing needle. */
static void s_refused(const th_kv_edit *e, int code, const char *needle) {
    char p[4096];
    th_copy_opts o = {.kv = e, .n_kv = 1};
    s_copy(p, sizeof p, "cfg_bad.gguf", &o);
    model_config c;
    stp_err err = {0};
    int rc = s_load(p, &c, NULL, 0, &err);
    if (rc != code) fail_msg("%s: rc %d (want %d): %s", e->key, rc, code, err.msg);
    if (!strstr(err.msg, needle)) fail_msg("%s: message '%s' lacks '%s'", e->key, err.msg, needle);
    unlink(p);
}

static void test_model_config_ranges_refused(void **state) {
    (void)state;
    const th_kv_edit bad[] = {
        {.key = "smallthinker.expert_used_count", .op = TH_KV_U32, .u32 = 9},
        {.key = "smallthinker.expert_count", .op = TH_KV_U32, .u32 = 0},
        {.key = "smallthinker.expert_count", .op = TH_KV_U32, .u32 = 257},
        {.key = "smallthinker.block_count", .op = TH_KV_U32, .u32 = 0},
        {.key = "smallthinker.attention.head_count_kv", .op = TH_KV_U32, .u32 = 3},
        {.key = "smallthinker.attention.key_length", .op = TH_KV_U32, .u32 = 2000},
        {.key = "smallthinker.rope.freq_base", .op = TH_KV_F32, .f32 = 0.0f},
        {.key = "smallthinker.attention.layer_norm_rms_epsilon", .op = TH_KV_F32, .f32 = -1.0f},
        {.key = "smallthinker.block_count", .op = TH_KV_DROP},
        {.key = "smallthinker.expert_feed_forward_length", .op = TH_KV_DROP},
        {.key = "smallthinker.block_count", .op = TH_KV_STR, .str = "four"},
    };
    const char *needle[] = {"expert_used_count", "expert_count",
                            "expert_count",      "block_count",
                            "head_count_kv",     "key_length",
                            "freq_base",         "epsilon",
                            "block_count",       "expert_feed_forward_length",
                            "block_count"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        s_refused(&bad[i], STP_EFORMAT, needle[i]);
}

static void test_model_config_key_value_length_mismatch(void **state) {
    (void)state;
    const th_kv_edit e = {.key = "smallthinker.attention.value_length", .op = TH_KV_U32, .u32 = 32};
    s_refused(&e, STP_EUNSUPPORTED, "value_length");
}

static void test_model_config_odd_head_dim_refused(void **state) {
    (void)state;
    char p[4096];
    th_model_spec s = th_model_spec_small(8);
    s.head_dim = 15;
    s_synth(p, sizeof p, "cfg_odd.gguf", &s);
    model_config c;
    stp_err err = {0};
    assert_int_equal(s_load(p, &c, NULL, 0, &err), STP_EFORMAT);
    assert_non_null(strstr(err.msg, "even"));
    unlink(p);
}

static void test_model_config_defaults(void **state) {
    (void)state;
    char p[4096];
    /* head_count_kv, key/value_length absent: kv = heads, head_dim = n_embd / heads */
    th_kv_edit kv[] = {
        {.key = "smallthinker.attention.head_count_kv", .op = TH_KV_DROP},
        {.key = "smallthinker.attention.key_length", .op = TH_KV_DROP},
        {.key = "smallthinker.attention.value_length", .op = TH_KV_DROP},
        {.key = "smallthinker.rope.freq_base", .op = TH_KV_DROP},
    };
    th_copy_opts o = {.kv = kv, .n_kv = 4};
    s_copy(p, sizeof p, "cfg_defaults.gguf", &o);
    model_config c;
    stp_err err = {0};
    assert_int_equal(s_load(p, &c, NULL, 0, &err), 0);
    assert_int_equal(c.n_head_kv, 4);
    assert_int_equal(c.head_dim, 16);
    assert_float_equal(c.rope_base, 10000.0f, 0.0f);
    /* the file's attn_k is [64, 32] but the config now wants [64, 64] */
    model *m = NULL;
    assert_int_equal(model_open(&m, p, &err), STP_EFORMAT);
    assert_non_null(strstr(err.msg, "blk.0.attn_k.weight"));
    unlink(p);
}

/* Regression: a head size derived from n_embd / n_head (no attention.key_length) is range-checked
 * like the key, so 0 or > STP_MAX_HEAD_DIM cannot overflow the RoPE/attention stack arrays. */
static void test_model_config_derived_head_dim_checked(void **state) {
    (void)state;
    const struct { uint32_t embd, heads; } cases[] = {{4096, 2}, {64, 128}}; /* head_dim 2048, 0 */
    for (size_t i = 0; i < 2; i++) {
        char p[4096];
        th_kv_edit kv[] = {
            {.key = "smallthinker.attention.key_length", .op = TH_KV_DROP},
            {.key = "smallthinker.attention.value_length", .op = TH_KV_DROP},
            {.key = "smallthinker.embedding_length", .op = TH_KV_U32, .u32 = cases[i].embd},
            {.key = "smallthinker.attention.head_count", .op = TH_KV_U32, .u32 = cases[i].heads},
            {.key = "smallthinker.attention.head_count_kv", .op = TH_KV_U32, .u32 = cases[i].heads},
        };
        th_copy_opts o = {.kv = kv, .n_kv = 5};
        s_copy(p, sizeof p, "cfg_headdim.gguf", &o);
        model_config c;
        stp_err err = {0};
        int rc = s_load(p, &c, NULL, 0, &err);
        unlink(p);
        if (rc != STP_EFORMAT)
            fail_msg("n_embd %u / n_head %u: rc %d, head_dim %d accepted", cases[i].embd,
                     cases[i].heads, rc, c.head_dim);
    }
}

/* ---- model_open ---------------------------------------------------------------------------- */

static void test_model_open_dense_views(void **state) {
    (void)state;
    char p[4096];
    model *m = NULL;
    stp_err err = {0};
    if (model_open(&m, th_data_path(p, sizeof p, DENSE), &err)) fail_msg("%s", err.msg);
    const model_config *c = &m->cfg;
    assert_string_equal(m->warning, "");
    assert_string_equal(m->tok_embd.name, "token_embd.weight");
    assert_int_equal(m->tok_embd.n_cols, 64);
    assert_int_equal(m->tok_embd.n_rows, 320);
    assert_int_equal(m->tok_embd.row_bytes, 64 * 4);
    /* tied: the LM head is the embedding */
    assert_ptr_equal(m->output.data, m->tok_embd.data);
    assert_non_null(m->output_norm);
    size_t total = 0, experts = 0;
    for (size_t i = 0; i < gguf_tensor_count(m->gguf); i++)
        total += gguf_tensor_at(m->gguf, i)->nbytes;
    assert_int_equal(m->weight_bytes, total);
    for (int il = 0; il < c->n_layer; il++) {
        const layer_weights *L = &m->layers[il];
        char want[64];
        snprintf(want, sizeof want, "blk.%d.ffn_down_exps.weight", il);
        assert_string_equal(L->down_exps.name, want);
        assert_int_equal(L->wq.n_rows, 64);
        assert_int_equal(L->wk.n_rows, 32);
        assert_int_equal(L->wo.n_cols, 64);
        assert_int_equal(L->router.n_rows, 8);
        assert_int_equal(L->gate_exps.n_cols, 64);
        assert_int_equal(L->gate_exps.n_rows, 32);
        assert_int_equal(L->gate_exps.n_mat, 8);
        assert_int_equal(L->down_exps.n_cols, 32);
        assert_int_equal(L->down_exps.n_rows, 64);
        assert_int_equal(L->down_exps.mat_bytes, 32 * 64 * 4);
        assert_non_null(L->attn_norm);
        assert_non_null(L->ffn_norm);
        experts += 3 * 8 * 32 * 64 * 4;
    }
    assert_int_equal(m->expert_bytes, experts);
    model_close(&m);
    assert_null(m);
    model_close(&m); /* NULL is fine */
}

static void test_model_open_hybrid_untied(void **state) {
    (void)state;
    char p[4096];
    model *m = NULL;
    stp_err err = {0};
    if (model_open(&m, th_data_path(p, sizeof p, HYBRID), &err)) fail_msg("%s", err.msg);
    assert_string_equal(m->output.name, "output.weight");
    assert_ptr_not_equal(m->output.data, m->tok_embd.data);
    model_close(&m);
}

static void test_model_open_missing_tensor(void **state) {
    (void)state;
    char p[4096];
    th_copy_opts o = {.drop_tensor = "blk.2.attn_v.weight"};
    s_copy(p, sizeof p, "mdl_missing.gguf", &o);
    model *m = NULL;
    stp_err err = {0};
    assert_int_equal(model_open(&m, p, &err), STP_EFORMAT);
    assert_null(m);
    assert_non_null(strstr(err.msg, "blk.2.attn_v.weight"));
    assert_non_null(strstr(err.msg, "missing"));
    assert_non_null(strstr(err.msg, p));
    unlink(p);
}

static void test_model_open_wrong_shape(void **state) {
    (void)state;
    char p[4096];
    /* attn_k [64, 32] declared as [32, 64]: same bytes, wrong orientation */
    th_copy_opts o = {
        .reshape_tensor = "blk.1.attn_k.weight", .reshape_ne = {32, 64, 1, 1}, .reshape_n_dims = 2};
    s_copy(p, sizeof p, "mdl_shape.gguf", &o);
    model *m = NULL;
    stp_err err = {0};
    assert_int_equal(model_open(&m, p, &err), STP_EFORMAT);
    assert_non_null(strstr(err.msg, "blk.1.attn_k.weight"));
    assert_non_null(strstr(err.msg, "[32, 64, 1]"));
    assert_non_null(strstr(err.msg, "[64, 32, 1]"));
    unlink(p);
}

static void test_model_open_expert_stack_wrong_count(void **state) {
    (void)state;
    char p[4096];
    /* ffn_up_exps [64, 32, 8] declared as [64, 64, 4] */
    th_copy_opts o = {.reshape_tensor = "blk.3.ffn_up_exps.weight",
                      .reshape_ne = {64, 64, 4, 1},
                      .reshape_n_dims = 3};
    s_copy(p, sizeof p, "mdl_exps.gguf", &o);
    model *m = NULL;
    stp_err err = {0};
    assert_int_equal(model_open(&m, p, &err), STP_EFORMAT);
    assert_non_null(strstr(err.msg, "blk.3.ffn_up_exps.weight"));
    unlink(p);
}

static void test_model_open_unsupported_type_q5_0(void **state) {
    (void)state;
    char p[4096];
    th_copy_opts o = {.retype_tensor = "blk.0.ffn_up_exps.weight", .retype = STP_TYPE_Q5_0};
    s_copy(p, sizeof p, "mdl_q5_0.gguf", &o);
    model *m = NULL;
    stp_err err = {0};
    assert_int_equal(model_open(&m, p, &err), STP_EUNSUPPORTED);
    assert_null(m);
    assert_non_null(strstr(err.msg, "blk.0.ffn_up_exps.weight"));
    assert_non_null(strstr(err.msg, "Q5_0"));
    unlink(p);
}

static void test_model_open_unsupported_type_iq2_xxs(void **state) {
    (void)state;
    char p[4096];
    th_model_spec s = th_model_spec_small(8);
    s.n_embd = 256; /* IQ2_XXS rows need a multiple of 256 elements */
    s.retype_tensor = "blk.1.attn_q.weight";
    s.retype = STP_TYPE_IQ2_XXS;
    s_synth(p, sizeof p, "mdl_iq2.gguf", &s);
    model *m = NULL;
    stp_err err = {0};
    assert_int_equal(model_open(&m, p, &err), STP_EUNSUPPORTED);
    assert_non_null(strstr(err.msg, "blk.1.attn_q.weight"));
    assert_non_null(strstr(err.msg, "IQ2_XXS"));
    unlink(p);
}

static void test_model_open_f16_norm_converted(void **state) {
    (void)state;
    char p[4096], src[4096];
    th_copy_opts o = {.retype_tensor = "output_norm.weight", .retype = STP_TYPE_F16};
    s_copy(p, sizeof p, "mdl_f16norm.gguf", &o);
    model *m = NULL, *ref = NULL;
    stp_err err = {0};
    if (model_open(&m, p, &err)) fail_msg("%s", err.msg);
    if (model_open(&ref, th_data_path(src, sizeof src, DENSE), &err)) fail_msg("%s", err.msg);
    for (int i = 0; i < 64; i++) {
        float want = kern_fp16_to_f32(kern_f32_to_fp16(ref->output_norm[i]));
        assert_float_equal(m->output_norm[i], want, 0.0f);
    }
    /* other norms still point into the mapping */
    assert_memory_equal(m->layers[0].attn_norm, ref->layers[0].attn_norm, 64 * sizeof(float));
    model_close(&m);
    model_close(&ref);
    unlink(p);
}

static void test_model_open_not_a_file(void **state) {
    (void)state;
    model *m = NULL;
    stp_err err = {0};
    const char *p = "/nonexistent/stpipe-test.gguf";
    assert_true(model_open(&m, p, &err) < 0);
    assert_null(m);
    assert_non_null(strstr(err.msg, p));
}

static void test_model_open_vocab_only_refused(void **state) {
    (void)state;
    char p[4096];
    model *m = NULL;
    stp_err err = {0};
    assert_true(model_open(&m, th_data_path(p, sizeof p, "tokenizer/qwen2-vocab.gguf"), &err) < 0);
    assert_null(m);
    assert_non_null(strstr(err.msg, "qwen2-vocab.gguf"));
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_model_config_dense_values),
        cmocka_unit_test(test_model_config_hybrid_layers),
        cmocka_unit_test(test_model_config_sliding_window_added),
        cmocka_unit_test(test_model_config_gating_absent_small_is_sigmoid),
        cmocka_unit_test(test_model_config_gating_absent_32_sigmoid),
        cmocka_unit_test(test_model_config_gating_absent_64_softmax),
        cmocka_unit_test(test_model_config_gating_explicit_overrides_guess),
        cmocka_unit_test(test_model_config_gating_unknown_refused),
        cmocka_unit_test(test_model_config_other_arch_refused),
        cmocka_unit_test(test_model_config_no_arch_refused),
        cmocka_unit_test(test_model_config_ranges_refused),
        cmocka_unit_test(test_model_config_key_value_length_mismatch),
        cmocka_unit_test(test_model_config_odd_head_dim_refused),
        cmocka_unit_test(test_model_config_defaults),
        cmocka_unit_test(test_model_config_derived_head_dim_checked),
        cmocka_unit_test(test_model_open_dense_views),
        cmocka_unit_test(test_model_open_hybrid_untied),
        cmocka_unit_test(test_model_open_missing_tensor),
        cmocka_unit_test(test_model_open_wrong_shape),
        cmocka_unit_test(test_model_open_expert_stack_wrong_count),
        cmocka_unit_test(test_model_open_unsupported_type_q5_0),
        cmocka_unit_test(test_model_open_unsupported_type_iq2_xxs),
        cmocka_unit_test(test_model_open_f16_norm_converted),
        cmocka_unit_test(test_model_open_not_a_file),
        cmocka_unit_test(test_model_open_vocab_only_refused),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
