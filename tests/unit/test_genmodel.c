/* test_genmodel: stpipe-genmodel (run from STP_BIN_DIR) -> gguf_open round trips.
 *
 * Checks metadata keys and tensor shapes/types against what was asked and against the golden
 * tiny file's layout, determinism (same seed and any thread count: same bytes; other seed:
 * other bytes), the init scale, the shape/dtype refusal, and that importing the golden
 * tokenizer.json gives exactly qwen2-vocab.gguf's tokens, types and merges. Tiny shapes only. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "gguf/gguf.h"

static char s_tmp[1024];

static const char *tmp_file(char *buf, size_t cap, const char *name) {
    snprintf(buf, cap, "%s/test_genmodel.%d.%s", s_tmp, (int)getpid(), name);
    return buf;
}

/* Runs stpipe-genmodel with args; returns its exit status. */
static int genmodel(const char *args) {
    const char *bin = getenv("STP_BIN_DIR");
    char cmd[8192];
    snprintf(cmd, sizeof cmd, "%s/stpipe-genmodel %s 2>/dev/null >/dev/null", bin ? bin : ".",
             args);
    int st = system(cmd);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

static const char *data_path(char *buf, size_t cap, const char *rel) {
    const char *d = getenv("STP_TEST_DATA");
    snprintf(buf, cap, "%s/%s", d ? d : "tests/data", rel);
    return buf;
}

static gguf_file *open_ok(const char *path) {
    gguf_file *f = NULL;
    stp_err err = {0};
    int rc = gguf_open(&f, path, &err);
    if (rc) fprintf(stderr, "%s\n", err.msg);
    assert_int_equal(rc, 0);
    return f;
}

static uint32_t get_u32(gguf_file *f, const char *key) {
    uint32_t v = 0;
    stp_err err = {0};
    assert_int_equal(gguf_get_u32(f, key, &v, &err), 0);
    return v;
}

static void check_tensor(gguf_file *f, const char *name, stp_type type, int64_t ne0, int64_t ne1,
                         int64_t ne2) {
    const gguf_tensor *t = gguf_tensor_find(f, name);
    if (!t) fprintf(stderr, "missing tensor %s\n", name);
    assert_non_null(t);
    assert_int_equal(t->type, type);
    assert_int_equal(t->ne[0], ne0);
    assert_int_equal(t->ne[1], ne1);
    assert_int_equal(t->ne[2], ne2);
}

static uint64_t file_hash(const char *path) {
    FILE *fp = fopen(path, "rb");
    assert_non_null(fp);
    uint64_t h = 1469598103934665603ull;
    int c;
    while ((c = fgetc(fp)) != EOF)
        h = (h ^ (uint8_t)c) * 1099511628211ull;
    fclose(fp);
    return h;
}

static void test_genmodel_tiny_matches_golden_layout(void **state) {
    (void)state;
    char path[4096], gpath[4096];
    tmp_file(path, sizeof path, "tiny.gguf");
    assert_int_equal(genmodel("--preset tiny --seed 5 -o"), 2); /* -o needs a file */
    char args[9000];
    snprintf(args, sizeof args, "--preset tiny --seed 5 -o %s", path);
    assert_int_equal(genmodel(args), 0);
    gguf_file *f = open_ok(path);
    gguf_file *g = open_ok(data_path(gpath, sizeof gpath, "tiny-dense-attn-f32.gguf"));
    /* every golden key is present, with the same type; shape keys have the same value */
    for (size_t i = 0; i < gguf_kv_count(g); i++) {
        const gguf_kv *gk = gguf_kv_at(g, i);
        char key[256];
        snprintf(key, sizeof key, "%.*s", (int)gk->key.len, gk->key.ptr);
        const gguf_kv *k = gguf_kv_find(f, key);
        if (!k) fprintf(stderr, "missing key %s\n", key);
        assert_non_null(k);
        assert_int_equal(k->type, gk->type);
        if (gk->type == GGUF_VT_UINT32) assert_int_equal(k->v.u64, gk->v.u64);
        if (gk->type == GGUF_VT_FLOAT32) assert_true(k->v.f64 == gk->v.f64);
    }
    assert_int_equal(get_u32(f, "general.alignment"), 32);
    /* same tensors, names, order, types and shapes */
    assert_int_equal(gguf_tensor_count(f), gguf_tensor_count(g));
    for (size_t i = 0; i < gguf_tensor_count(g); i++) {
        const gguf_tensor *a = gguf_tensor_at(f, i), *b = gguf_tensor_at(g, i);
        assert_int_equal(a->name.len, b->name.len);
        assert_memory_equal(a->name.ptr, b->name.ptr, a->name.len);
        assert_int_equal(a->type, b->type);
        assert_int_equal(a->n_dims, b->n_dims);
        assert_memory_equal(a->ne, b->ne, sizeof a->ne);
    }
    /* vocabulary layout: 256 byte tokens identical, 61 merges, control tokens at the end */
    const gguf_kv *ta = NULL, *tb = NULL, *ty = NULL, *mg = NULL;
    stp_err err = {0};
    assert_int_equal(gguf_get_arr(f, "tokenizer.ggml.tokens", GGUF_VT_STRING, &ta, &err), 0);
    assert_int_equal(gguf_get_arr(g, "tokenizer.ggml.tokens", GGUF_VT_STRING, &tb, &err), 0);
    assert_int_equal(ta->v.arr.n, 320);
    for (int i = 0; i < 256; i++) {
        assert_int_equal(ta->v.arr.strs[i].len, tb->v.arr.strs[i].len);
        assert_memory_equal(ta->v.arr.strs[i].ptr, tb->v.arr.strs[i].ptr, ta->v.arr.strs[i].len);
    }
    assert_true(gguf_str_eq(ta->v.arr.strs[317], "<|endoftext|>"));
    assert_true(gguf_str_eq(ta->v.arr.strs[318], "<|im_start|>"));
    assert_true(gguf_str_eq(ta->v.arr.strs[319], "<|im_end|>"));
    assert_int_equal(gguf_get_arr(f, "tokenizer.ggml.token_type", GGUF_VT_INT32, &ty, &err), 0);
    int32_t types[320]; /* array data in the mapping need not be 4-byte aligned */
    memcpy(types, ty->v.arr.data, sizeof types);
    for (int i = 0; i < 317; i++)
        assert_int_equal(types[i], 1);
    for (int i = 317; i < 320; i++)
        assert_int_equal(types[i], 3);
    assert_int_equal(gguf_get_arr(f, "tokenizer.ggml.merges", GGUF_VT_STRING, &mg, &err), 0);
    assert_int_equal(mg->v.arr.n, 61);
    gguf_close(&g);
    gguf_close(&f);
    unlink(path);
}

static void test_genmodel_init_scale(void **state) {
    (void)state;
    char path[4096], args[9000];
    tmp_file(path, sizeof path, "scale.gguf");
    snprintf(args, sizeof args, "--preset tiny --seed 9 --gain 2 --qk-gain 2 -o %s", path);
    assert_int_equal(genmodel(args), 0);
    gguf_file *f = open_ok(path);
    struct {
        const char *name;
        double mean, std;
    } want[] = {{"blk.1.attn_q.weight", 0, 2.0 / 8},
                {"blk.1.attn_v.weight", 0, 1.0 / 8},
                {"blk.1.ffn_down_exps.weight", 0, 2.0 / sqrt(32.0)},
                {"token_embd.weight", 0, 0.3},
                {"blk.2.ffn_norm.weight", 1, 0.1}};
    for (size_t k = 0; k < sizeof want / sizeof want[0]; k++) {
        const gguf_tensor *t = gguf_tensor_find(f, want[k].name);
        assert_non_null(t);
        const float *x = t->data;
        size_t n = t->nbytes / 4;
        double s = 0, s2 = 0;
        for (size_t i = 0; i < n; i++)
            s += x[i], s2 += (double)x[i] * x[i];
        double mean = s / (double)n, sd = sqrt(s2 / (double)n - mean * mean);
        double tol = 4 * want[k].std / sqrt((double)n) + 0.01 * want[k].std;
        assert_true(fabs(mean - want[k].mean) < 4 * want[k].std / sqrt((double)n) + 1e-3);
        assert_true(fabs(sd - want[k].std) < tol * 3);
    }
    gguf_close(&f);
    unlink(path);
}

static void test_genmodel_dtypes(void **state) {
    (void)state;
    static const struct {
        const char *flag;
        stp_type t;
        uint32_t ftype;
    } dt[] = {{"f16", STP_TYPE_F16, 1},
              {"bf16", STP_TYPE_BF16, 32},
              {"q8_0", STP_TYPE_Q8_0, 7},
              {"q4_0", STP_TYPE_Q4_0, 2}};
    for (size_t i = 0; i < sizeof dt / sizeof dt[0]; i++) {
        char path[4096], args[9000];
        tmp_file(path, sizeof path, dt[i].flag);
        snprintf(args, sizeof args, "--preset tiny --dtype %s -o %s", dt[i].flag, path);
        assert_int_equal(genmodel(args), 0);
        gguf_file *f = open_ok(path);
        assert_int_equal(get_u32(f, "general.file_type"), dt[i].ftype);
        check_tensor(f, "token_embd.weight", dt[i].t, 64, 320, 1);
        check_tensor(f, "blk.3.attn_q.weight", dt[i].t, 64, 64, 1);
        check_tensor(f, "blk.3.attn_k.weight", dt[i].t, 64, 32, 1);
        check_tensor(f, "blk.3.attn_output.weight", dt[i].t, 64, 64, 1);
        check_tensor(f, "blk.3.ffn_gate_exps.weight", dt[i].t, 64, 32, 8);
        check_tensor(f, "blk.3.ffn_up_exps.weight", dt[i].t, 64, 32, 8);
        check_tensor(f, "blk.3.ffn_down_exps.weight", dt[i].t, 32, 64, 8);
        check_tensor(f, "blk.3.ffn_gate_inp.weight", STP_TYPE_F32, 64, 8, 1);
        check_tensor(f, "blk.3.attn_norm.weight", STP_TYPE_F32, 64, 1, 1);
        check_tensor(f, "output_norm.weight", STP_TYPE_F32, 64, 1, 1);
        assert_null(gguf_tensor_find(f, "output.weight"));
        gguf_close(&f);
        unlink(path);
    }
}

static void test_genmodel_deterministic(void **state) {
    (void)state;
    char a[4096], b[4096], c[4096], args[9000];
    tmp_file(a, sizeof a, "det-a.gguf");
    tmp_file(b, sizeof b, "det-b.gguf");
    tmp_file(c, sizeof c, "det-c.gguf");
    /* n_embd 1024 so a matrix spans several slices and both threads share the work */
    const char *shape = "--preset tiny --n-embd 1024 --n-layer 1 --n-ff-exp 64 --dtype q4_0";
    snprintf(args, sizeof args, "%s --seed 42 --threads 1 -o %s", shape, a);
    assert_int_equal(genmodel(args), 0);
    snprintf(args, sizeof args, "%s --seed 42 --threads 2 -o %s", shape, b);
    assert_int_equal(genmodel(args), 0);
    snprintf(args, sizeof args, "%s --seed 43 --threads 2 -o %s", shape, c);
    assert_int_equal(genmodel(args), 0);
    assert_true(file_hash(a) == file_hash(b));
    assert_true(file_hash(a) != file_hash(c));
    /* the difference is in the weights, not only in general.name */
    gguf_file *fa = open_ok(a), *fc = open_ok(c);
    const gguf_tensor *ta = gguf_tensor_find(fa, "blk.0.attn_q.weight");
    const gguf_tensor *tc = gguf_tensor_find(fc, "blk.0.attn_q.weight");
    assert_int_equal(ta->nbytes, tc->nbytes);
    assert_true(memcmp(ta->data, tc->data, ta->nbytes) != 0);
    gguf_close(&fa);
    gguf_close(&fc);
    unlink(a);
    unlink(b);
    unlink(c);
}

static void test_genmodel_hybrid_options(void **state) {
    (void)state;
    char path[4096], args[9000];
    tmp_file(path, sizeof path, "hybrid.gguf");
    snprintf(args, sizeof args,
             "--preset tiny --n-layer 6 --gating softmax --untied --sliding-window 4096 "
             "--n-ctx 8192 --n-head 8 --n-head-kv 4 --head-dim 8 --n-expert 16 --n-expert-used 3 "
             "--n-ff-exp 48 --n-vocab 300 -o %s",
             path);
    assert_int_equal(genmodel(args), 0);
    gguf_file *f = open_ok(path);
    assert_int_equal(get_u32(f, "smallthinker.block_count"), 6);
    assert_int_equal(get_u32(f, "smallthinker.expert_gating_func"), 1);
    assert_int_equal(get_u32(f, "smallthinker.attention.sliding_window"), 4096);
    assert_int_equal(get_u32(f, "smallthinker.context_length"), 8192);
    assert_int_equal(get_u32(f, "smallthinker.attention.head_count"), 8);
    assert_int_equal(get_u32(f, "smallthinker.attention.head_count_kv"), 4);
    assert_int_equal(get_u32(f, "smallthinker.attention.key_length"), 8);
    assert_int_equal(get_u32(f, "smallthinker.expert_count"), 16);
    assert_int_equal(get_u32(f, "smallthinker.expert_used_count"), 3);
    assert_int_equal(get_u32(f, "smallthinker.expert_feed_forward_length"), 48);
    assert_int_equal(get_u32(f, "tokenizer.ggml.eos_token_id"), 299);
    assert_int_equal(gguf_tensor_count(f), 3 + 6 * 10);
    check_tensor(f, "output.weight", STP_TYPE_F32, 64, 300, 1);
    check_tensor(f, "blk.5.attn_q.weight", STP_TYPE_F32, 64, 64, 1);
    check_tensor(f, "blk.5.attn_k.weight", STP_TYPE_F32, 64, 32, 1);
    check_tensor(f, "blk.5.ffn_down_exps.weight", STP_TYPE_F32, 48, 64, 16);
    check_tensor(f, "blk.5.ffn_gate_inp.weight", STP_TYPE_F32, 64, 16, 1);
    gguf_close(&f);

    snprintf(args, sizeof args, "--preset tiny --gating none -o %s", path);
    assert_int_equal(genmodel(args), 0);
    f = open_ok(path);
    assert_null(gguf_kv_find(f, "smallthinker.expert_gating_func"));
    assert_null(gguf_kv_find(f, "smallthinker.attention.sliding_window"));
    gguf_close(&f);
    unlink(path);
}

/* --idle-bias B: only token_embd and ffn_gate_exps change; every embedding row moved by the same
 * vector A * u (A = embd_scale * sqrt(n_embd), 2.4 for tiny), every gate row by -B / sqrt(n_embd)
 * * u; and a gate applied to a normalized embedding idles more often than without (about
 * Phi(B * 0.7) against a half). F32, so the differences are exact up to rounding. */
static void test_genmodel_idle_bias(void **state) {
    (void)state;
    char a[4096], b[4096], args[9000];
    tmp_file(a, sizeof a, "idle-a.gguf");
    tmp_file(b, sizeof b, "idle-b.gguf");
    snprintf(args, sizeof args, "--preset tiny --idle-bias -1 -o %s", b);
    assert_int_equal(genmodel(args), 2);
    snprintf(args, sizeof args, "--preset tiny --seed 5 -o %s", a);
    assert_int_equal(genmodel(args), 0);
    snprintf(args, sizeof args, "--preset tiny --seed 5 --idle-bias 2 -o %s", b);
    assert_int_equal(genmodel(args), 0);
    gguf_file *fa = open_ok(a), *fb = open_ok(b);
    const int E = 64, V = 320, F = 32, X = 8;
    for (size_t i = 0; i < gguf_tensor_count(fa); i++) {
        const gguf_tensor *ta = gguf_tensor_at(fa, i);
        char name[128];
        snprintf(name, sizeof name, "%.*s", (int)ta->name.len, ta->name.ptr);
        const gguf_tensor *tb = gguf_tensor_find(fb, name);
        assert_non_null(tb);
        assert_int_equal(ta->nbytes, tb->nbytes);
        const bool moved =
            !strcmp(name, "token_embd.weight") || strstr(name, "ffn_gate_exps.weight") != NULL;
        assert_int_equal(memcmp(ta->data, tb->data, ta->nbytes) != 0, moved);
    }
    /* the shared direction, from the first embedding row's difference */
    const float *ea = gguf_tensor_find(fa, "token_embd.weight")->data;
    const float *eb = gguf_tensor_find(fb, "token_embd.weight")->data;
    double u[64], n2 = 0;
    for (int i = 0; i < E; i++)
        u[i] = (double)eb[i] - ea[i], n2 += u[i] * u[i];
    assert_true(fabs(sqrt(n2) - 0.3 * 8) < 1e-3);
    for (int i = 0; i < E; i++)
        u[i] /= sqrt(n2);
    for (int v = 0; v < V; v++)
        for (int i = 0; i < E; i++)
            assert_true(fabs(((double)eb[v * E + i] - ea[v * E + i]) - 2.4 * u[i]) < 1e-5);
    const float *ga = gguf_tensor_find(fa, "blk.0.ffn_gate_exps.weight")->data;
    const float *gb = gguf_tensor_find(fb, "blk.0.ffn_gate_exps.weight")->data;
    for (int r = 0; r < F * X; r++)
        for (int i = 0; i < E; i++)
            assert_true(fabs(((double)gb[r * E + i] - ga[r * E + i]) + 2.0 / 8 * u[i]) < 1e-6);
    /* gate pre-activations on RMS-normalized embeddings: the share <= 0 */
    long idle[2] = {0, 0}, n = 0;
    for (int v = 0; v < V; v++) {
        for (int m = 0; m < 2; m++) {
            const float *e = (m ? eb : ea) + (size_t)v * E, *g = m ? gb : ga;
            double ss = 0;
            for (int i = 0; i < E; i++)
                ss += (double)e[i] * e[i];
            const double inv = 1.0 / sqrt(ss / E);
            for (int r = 0; r < F * X; r++) {
                double d = 0;
                for (int i = 0; i < E; i++)
                    d += (double)g[r * E + i] * e[i] * inv;
                idle[m] += d <= 0;
            }
        }
        n += F * X;
    }
    const double pa = (double)idle[0] / n, pb = (double)idle[1] / n;
    print_message("idle share on normalized embeddings: %.3f without, %.3f with --idle-bias 2\n",
                  pa, pb);
    assert_true(pa > 0.45 && pa < 0.55);
    assert_true(pb > 0.85);
    gguf_close(&fa);
    gguf_close(&fb);
    unlink(a);
    unlink(b);
}

static void test_genmodel_refuses_bad_shape(void **state) {
    (void)state;
    char path[4096], args[9000];
    tmp_file(path, sizeof path, "bad.gguf");
    snprintf(args, sizeof args, "--preset tiny --dtype q4_0 --n-embd 48 -o %s", path);
    assert_int_equal(genmodel(args), 2);
    assert_int_not_equal(access(path, F_OK), 0);
    snprintf(args, sizeof args, "--preset tiny --n-head 3 --n-head-kv 2 -o %s", path);
    assert_int_equal(genmodel(args), 2);
    snprintf(args, sizeof args, "--preset nope -o %s", path);
    assert_int_equal(genmodel(args), 2);
    snprintf(args, sizeof args, "--preset tiny --n-vocab 200 -o %s", path);
    assert_int_equal(genmodel(args), 1);
    assert_int_not_equal(access(path, F_OK), 0);
}

static void test_genmodel_hf_tokenizer_matches_golden_vocab(void **state) {
    (void)state;
    char path[4096], tj[4096], gp[4096], args[9000];
    tmp_file(path, sizeof path, "qwen-vocab.gguf");
    data_path(tj, sizeof tj, "tokenizer/tokenizer.json");
    snprintf(args, sizeof args,
             "--preset tiny --n-vocab 151936 --tokenizer-json %s --vocab-only --name qwen2-vocab "
             "-o %s",
             tj, path);
    assert_int_equal(genmodel(args), 0);
    gguf_file *f = open_ok(path);
    gguf_file *g = open_ok(data_path(gp, sizeof gp, "tokenizer/qwen2-vocab.gguf"));
    assert_int_equal(gguf_tensor_count(f), 0);
    const char *arrays[] = {"tokenizer.ggml.tokens", "tokenizer.ggml.merges"};
    stp_err err = {0};
    for (int k = 0; k < 2; k++) {
        const gguf_kv *a = NULL, *b = NULL;
        assert_int_equal(gguf_get_arr(f, arrays[k], GGUF_VT_STRING, &a, &err), 0);
        assert_int_equal(gguf_get_arr(g, arrays[k], GGUF_VT_STRING, &b, &err), 0);
        assert_int_equal(a->v.arr.n, b->v.arr.n);
        for (uint64_t i = 0; i < a->v.arr.n; i++) {
            if (a->v.arr.strs[i].len != b->v.arr.strs[i].len ||
                memcmp(a->v.arr.strs[i].ptr, b->v.arr.strs[i].ptr, a->v.arr.strs[i].len) != 0)
                fail_msg("%s[%llu] differs", arrays[k], (unsigned long long)i);
        }
    }
    const gguf_kv *a = NULL, *b = NULL;
    assert_int_equal(gguf_get_arr(f, "tokenizer.ggml.token_type", GGUF_VT_INT32, &a, &err), 0);
    assert_int_equal(gguf_get_arr(g, "tokenizer.ggml.token_type", GGUF_VT_INT32, &b, &err), 0);
    assert_int_equal(a->v.arr.n, 151936);
    assert_int_equal(b->v.arr.n, 151936);
    assert_memory_equal(a->v.arr.data, b->v.arr.data, 151936 * 4);
    const char *ids[] = {"tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                         "tokenizer.ggml.padding_token_id"};
    for (int k = 0; k < 3; k++)
        assert_int_equal(get_u32(f, ids[k]), get_u32(g, ids[k]));
    bool add_bos = true;
    assert_int_equal(gguf_get_bool(f, "tokenizer.ggml.add_bos_token", &add_bos, &err), 0);
    assert_false(add_bos);
    char s[64];
    assert_int_equal(gguf_get_cstr(f, "tokenizer.ggml.pre", s, sizeof s, &err), 0);
    assert_string_equal(s, "qwen2");
    assert_non_null(gguf_kv_find(f, "tokenizer.chat_template"));
    gguf_close(&g);
    gguf_close(&f);
    unlink(path);
}

int main(void) {
    const char *tmp = getenv("STP_TMP");
    snprintf(s_tmp, sizeof s_tmp, "%s", tmp ? tmp : "/tmp");
    mkdir(s_tmp, 0777);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_genmodel_tiny_matches_golden_layout),
        cmocka_unit_test(test_genmodel_init_scale),
        cmocka_unit_test(test_genmodel_dtypes),
        cmocka_unit_test(test_genmodel_deterministic),
        cmocka_unit_test(test_genmodel_hybrid_options),
        cmocka_unit_test(test_genmodel_idle_bias),
        cmocka_unit_test(test_genmodel_refuses_bad_shape),
        cmocka_unit_test(test_genmodel_hf_tokenizer_matches_golden_vocab),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
