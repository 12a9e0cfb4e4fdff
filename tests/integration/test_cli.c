/* test_cli: the `stpipe` program end to end ($STP_BIN_DIR/stpipe): greedy generation and
 * --logits-out against the golden data of tiny-dense-attn-f32, `info` output (and the pipeline
 * plan it prints under --memory-budget: the storage daemon's frames), --help and usage
 * errors (exit 2), runtime errors (exit 1, one line naming the file and the problem) for a
 * missing, truncated, foreign-architecture or unsupported-type GGUF and an oversized prompt,
 * the tokenize / detokenize round trip, and `bench --json -d` (valid JSON for a model path with a
 * quote in it; one result per test and depth; the read bandwidth, the run's steal and, per tg
 * test, the roofline with bytes per stage equal to a hand count from the tiny model's shapes). */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <fcntl.h>
#include <jansson.h>
#include <math.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "layout/layout.h"
#include "model/model.h"
#include "plan/budget.h"
#include "th_gguf.h"
#include "th_proc.h"

#define DENSE "tiny-dense-attn-f32.gguf"
#define GOLDEN "tiny-dense-attn-f32.short.json"

/* Runs stpipe with args (NULL-terminated); captures stdout and stderr. */
static th_run_out s_run(const char *const *args) {
    return th_run_stpipe(args, NULL, "cli");
}

static int s_lines(const char *s) {
    int n = 0;
    for (; *s; s++)
        n += *s == '\n';
    return n;
}

static void s_expect(const th_run_out *r, int status, const char *what) {
    if (r->status != status)
        fail_msg("%s: exit %d (want %d)\nstdout: %s\nstderr: %s", what, r->status, status, r->out,
                 r->err);
}

/* Exit 1 with a single stderr line containing every needle. */
static void s_expect_error(const th_run_out *r, const char *what, const char *n1, const char *n2) {
    s_expect(r, 1, what);
    if (s_lines(r->err) != 1) fail_msg("%s: want one line on stderr, got: %s", what, r->err);
    if (n1 && !strstr(r->err, n1)) fail_msg("%s: stderr lacks '%s': %s", what, n1, r->err);
    if (n2 && !strstr(r->err, n2)) fail_msg("%s: stderr lacks '%s': %s", what, n2, r->err);
}

static json_t *s_golden(void) {
    char p[4096];
    json_error_t je;
    json_t *j = json_load_file(th_data_path(p, sizeof p, GOLDEN), 0, &je);
    if (!j) fail_msg("%s: %s", p, je.text);
    return j;
}

/* "72 101 ..." from the golden prompt ids. */
static char *s_prompt_ids(json_t *g) {
    json_t *a = json_object_get(g, "prompt_ids");
    char *s = calloc(json_array_size(a) * 12 + 1, 1);
    for (size_t i = 0; i < json_array_size(a); i++)
        sprintf(s + strlen(s), i ? " %lld" : "%lld",
                (long long)json_integer_value(json_array_get(a, i)));
    return s;
}

static char *s_greedy8(json_t *g) {
    json_t *a = json_object_get(g, "greedy_ids");
    char *s = calloc(8 * 12 + 2, 1);
    for (size_t i = 0; i < 8; i++)
        sprintf(s + strlen(s), i ? " %lld" : "%lld",
                (long long)json_integer_value(json_array_get(a, i)));
    strcat(s, "\n");
    return s;
}

static void test_cli_generate_golden_greedy(void **state) {
    (void)state;
    char m[4096];
    th_data_path(m, sizeof m, DENSE);
    json_t *g = s_golden();
    char *ids = s_prompt_ids(g), *want = s_greedy8(g);
    const char *a1[] = {"generate", "--model", m,   "--prompt-ids", ids,   "--ids", "-n",
                        "8",        "--temp",  "0", "--cache-type", "f32", NULL};
    th_run_out r = s_run(a1);
    s_expect(&r, 0, "generate --prompt-ids");
    assert_string_equal(r.out, want);
    assert_non_null(strstr(r.err, "prompt 27 tokens")); /* timings go to stderr */
    th_run_out_free(&r);
    /* the text prompt tokenizes to the same ids; one thread and the default f16 cache give the
     * same tokens on this short prompt */
    const char *prompt = json_string_value(json_object_get(g, "prompt"));
    const char *a2[] = {"generate", "-m", m,           "--prompt", prompt,    "--ids",
                        "-n",       "8",  "--threads", "1",        "--quiet", NULL};
    r = s_run(a2);
    s_expect(&r, 0, "generate --prompt");
    assert_string_equal(r.out, want);
    assert_string_equal(r.err, "");
    th_run_out_free(&r);
    free(ids);
    free(want);
    json_decref(g);
}

static void test_cli_generate_logits_out(void **state) {
    (void)state;
    char m[4096], lo[4096];
    th_data_path(m, sizeof m, DENSE);
    th_tmp_path(lo, sizeof lo, "cli_logits.f32");
    json_t *g = s_golden();
    char *ids = s_prompt_ids(g);
    const char *a[] = {"generate", "--model",      m,  "--prompt-ids", ids,   "--ids",   "-n",
                       "2",        "--logits-out", lo, "--cache-type", "f32", "--quiet", NULL};
    th_run_out r = s_run(a);
    s_expect(&r, 0, "generate --logits-out");
    th_run_out_free(&r);
    const int n = (int)json_integer_value(json_object_get(g, "prompt_n_tokens"));
    const int V = (int)json_integer_value(json_object_get(g, "n_vocab"));
    FILE *f = fopen(lo, "rb");
    assert_non_null(f);
    float *l = malloc(sizeof(float) * (size_t)n * V + 4);
    size_t got = fread(l, sizeof(float), (size_t)n * V + 1, f);
    fclose(f);
    assert_int_equal(got, (size_t)n * V);
    json_t *pos = json_object_get(g, "logits_positions"), *rows = json_object_get(g, "logits");
    float maxd = 0;
    for (size_t i = 0; i < json_array_size(pos); i++) {
        int p = (int)json_integer_value(json_array_get(pos, i));
        json_t *row = json_array_get(rows, i);
        assert_int_equal(json_array_size(row), V);
        for (int v = 0; v < V; v++) {
            float d =
                fabsf(l[(size_t)p * V + v] - (float)json_number_value(json_array_get(row, v)));
            if (!(d <= maxd)) maxd = d;
        }
    }
    if (!(maxd <= 5e-4f)) fail_msg("--logits-out vs golden: max diff %g", maxd);
    free(l);
    free(ids);
    unlink(lo);
    json_decref(g);
}

static void test_cli_generate_seeded_sampling(void **state) {
    (void)state;
    char m[4096];
    th_data_path(m, sizeof m, DENSE);
    const char *a[] = {"generate", "--model", m,     "--prompt-ids", "1 2 3", "--ids",   "-n",
                       "12",       "--temp",  "1.5", "--seed",       "42",    "--quiet", NULL};
    th_run_out r1 = s_run(a), r2 = s_run(a);
    s_expect(&r1, 0, "sampling run 1");
    s_expect(&r2, 0, "sampling run 2");
    assert_string_equal(r1.out, r2.out);
    int n = 0;
    for (char *p = r1.out; *p; p++)
        n += *p == ' ';
    assert_int_equal(n, 11); /* 12 ids */
    th_run_out_free(&r1);
    th_run_out_free(&r2);
    const char *z[] = {"generate", "--model", m,   "--prompt-ids", "1 2 3",
                       "--ids",    "-n",      "0", "--quiet",      NULL};
    r1 = s_run(z);
    s_expect(&r1, 0, "-n 0");
    assert_string_equal(r1.out, "\n");
    th_run_out_free(&r1);
}

static void test_cli_info_shapes(void **state) {
    (void)state;
    char m[4096];
    th_data_path(m, sizeof m, DENSE);
    const char *a[] = {"info", "--model", m, NULL};
    th_run_out r = s_run(a);
    s_expect(&r, 0, "info");
    const char *want[] = {
        "architecture    smallthinker\n",
        "layers          4\n",
        "embedding       64\n",
        "heads           4 query / 2 kv, head dim 16\n",
        "experts         8, 2 used per token, ffn 32, sigmoid gating\n",
        "attention       every layer RoPE + full causal\n",
        "vocabulary      320, LM head tied (token_embd)\n",
        "context         4096 (trained)\n",
        "F32 x42",
        "\nmachine         ", /* the CPU as stpipe bench names it, and the cores */
        " cores\n",
    };
    for (size_t i = 0; i < sizeof want / sizeof want[0]; i++)
        if (!strstr(r.out, want[i])) fail_msg("info lacks '%s':\n%s", want[i], r.out);
    th_run_out_free(&r);
    char h[4096];
    th_data_path(h, sizeof h, "tiny-hybrid-attn-f32.gguf");
    const char *b[] = {"info", "-m", h, "--ctx-size", "128", "--tensors", NULL};
    r = s_run(b);
    s_expect(&r, 0, "info hybrid");
    assert_non_null(strstr(r.out, "layers % 4 == 0: NoPE + full; others: RoPE + window 4096\n"));
    assert_non_null(strstr(r.out, "softmax gating"));
    assert_non_null(strstr(r.out, "LM head output.weight"));
    assert_non_null(strstr(r.out, "blk.5.ffn_down_exps.weight"));
    assert_non_null(strstr(r.out, "(ctx 128)"));
    th_run_out_free(&r);
}

/* info --memory-budget prints the plan the daemon would make (3 sequence slots): three frames
 * past the minimum give one layer + 3; a byte under the minimum is refused (exit 1) naming the
 * minimum. */
static void test_cli_info_memory_budget(void **state) {
    (void)state;
    char m[4096], arg[64], want[128];
    th_data_path(m, sizeof m, "tiny-dense-attn-q4_0-pure.gguf");
    model *mo = NULL;
    stp_err err = {0};
    if (model_open(&mo, m, &err)) fail_msg("%s", err.msg);
    budget_params bp = {.cfg = &mo->cfg,
                        .non_expert = mo->weight_bytes - mo->expert_bytes,
                        .frame_bytes = layout_frame_bytes(mo, layout_wants_flags(mo)),
                        .n_ctx = 128,
                        .kv_type = KV_F16,
                        .n_seq = 3,
                        .workers = 2};
    budget_plan p;
    assert_int_equal(budget_plan_compute(&p, &bp, &err), 0);
    const int X = mo->cfg.n_expert, all = p.all_frames;
    snprintf(arg, sizeof arg, "%llu", (unsigned long long)(p.minimum + 3 * p.frame_bytes));
    const char *a[] = {"info", "--model",
                       m,      "--ctx-size",
                       "128",  "--cache-type",
                       "f16",  "--memory-budget",
                       arg,    "--workers",
                       "2",    "--parallel",
                       "3",    NULL};
    th_run_out r = s_run(a);
    s_expect(&r, 0, "info --memory-budget");
    snprintf(want, sizeof want, ": %d of %d experts", X + 3, all);
    if (!strstr(r.out, want)) fail_msg("info lacks '%s':\n%s", want, r.out);
    snprintf(want, sizeof want, "minimum budget%17.1f MiB", p.minimum / (1024.0 * 1024.0));
    if (!strstr(r.out, want)) fail_msg("info lacks '%s':\n%s", want, r.out);
    assert_non_null(strstr(r.out, "context 128, KV cache f16, 3 sequences, 2 expert workers"));
    th_run_out_free(&r);
    snprintf(arg, sizeof arg, "%llu", (unsigned long long)(p.minimum - 1));
    r = s_run(a);
    s_expect_error(&r, "info under the minimum", "too small", "the minimum is");
    assert_non_null(strstr(r.out, "is below the minimum"));
    th_run_out_free(&r);
    model_close(&mo);
}

static double s_num(json_t *o, const char *k) {
    json_t *v = json_object_get(o, k);
    if (!json_is_number(v)) fail_msg("bench --json: no number '%s'", k);
    return json_number_value(v);
}

/* The roofline of a tg test of n tokens after depth d on the tiny F32 model, against bytes
 * counted by hand from its shapes (every weight 4 bytes an element, the cache f16): attention
 * wq, wo (E x H*D), wk, wv (E x Hkv*D) per layer plus K and V of the attended positions
 * (d+1 .. d+n, no window: their mean is d + (n+1)/2); router X x E; experts the gate of K
 * experts in full, up for the active neurons the bench reports, down for every neuron (F32 has
 * no sparse down: K*F per layer); LM head V x E (tied). */
static void s_check_roofline(const char *path, json_t *rl, int d, int n, double bw) {
    if (!json_is_object(rl)) fail_msg("tg result without a roofline object");
    model *mo = NULL;
    stp_err err = {0};
    assert_int_equal(model_open(&mo, path, &err), 0);
    const model_config *c = &mo->cfg;
    assert_int_equal(c->sliding_window, 0);
    const double L = c->n_layer, E = c->n_embd, H = c->n_head, Hkv = c->n_head_kv, D = c->head_dim,
                 X = c->n_expert, K = c->n_expert_used, F = c->n_ff_exp, V = c->n_vocab;
    model_close(&mo);
    const double kv = L * (d + (n + 1) / 2.0) * Hkv * D * 2 * 2; /* f16, the default */
    const double attn = L * (2 * E * H * D + 2 * E * Hkv * D) * 4 + kv;
    const double router = L * X * E * 4, head = V * E * 4;
    const double active = s_num(rl, "neurons_active_per_token");
    assert_true(active > 0 && active < L * K * F); /* ReGLU: some rows skipped, some computed */
    assert_true(s_num(rl, "down_neurons_per_token") == L * K * F);
    const double experts = L * K * F * E * 4 + active * E * 4 + L * K * F * E * 4;
    json_t *st = json_object_get(rl, "stages");
    const char *names[] = {"attention", "router", "experts", "lm_head"};
    const double want[] = {attn, router, experts, head};
    double total = 0;
    for (int i = 0; i < 4; i++) {
        json_t *o = json_object_get(st, names[i]);
        const double b = s_num(o, "bytes_per_token"), ms = s_num(o, "ms_per_token");
        if (fabs(b - want[i]) > 1e-6 * want[i])
            fail_msg("roofline %s at d%d: %.1f bytes/token, by hand %.1f", names[i], d, b, want[i]);
        assert_true(ms > 0);
        const double g = b / (ms * 1e-3) * 1e-9;
        assert_true(fabs(s_num(o, "gbps") - g) <= 1e-6 * g);
        assert_true(fabs(s_num(o, "roofline_share") - g / bw) <= 1e-6 * g / bw);
        total += b;
    }
    assert_true(fabs(s_num(json_object_get(st, "attention"), "kv_bytes_per_token") - kv) <=
                1e-6 * kv);
    assert_true(fabs(s_num(rl, "total_bytes_per_token") - total) <= 1e-6 * total);
    assert_true(s_num(rl, "bandwidth_gbps") == bw);
    /* the stages are parts of the decode time of the same repetitions */
    const double dec = s_num(rl, "decode_ms_per_token"), stages = s_num(rl, "total_ms_per_token");
    if (!(dec > 0 && stages <= 1.05 * dec))
        fail_msg("roofline at d%d: stages %.3f ms a token, decode %.3f ms", d, stages, dec);
}

/* The attention kernel's prefetch choice is on bench's machine line, and STP_ATTN_PREFETCH
 * sets it where the AVX-512 kernels run (elsewhere it is always l2). */
static void test_cli_bench_attention_prefetch(void **state) {
    (void)state;
    char m[4096];
    th_data_path(m, sizeof m, DENSE);
    const char *a[] = {"bench", "--model", m, "-p", "0", "-n", "2", "-r", "1", NULL};
    const char *want[] = {"l1", "l2"};
    for (int i = 0; i < 2; i++) {
        setenv("STP_ATTN_PREFETCH", want[i], 1);
        th_run_out r = s_run(a);
        s_expect(&r, 0, "bench with STP_ATTN_PREFETCH");
        const char *line = strstr(r.out, "machine: ");
        assert_non_null(line);
        char expect[64];
        snprintf(expect, sizeof expect, "attention rows prefetched into %s\n",
                 strstr(line, "kernels avx512vnni") ? want[i] : "l2");
        if (!strstr(line, expect)) fail_msg("machine line without '%s': %.200s", expect, line);
        th_run_out_free(&r);
    }
    unsetenv("STP_ATTN_PREFETCH");
}

/* `stpipe bench --json -d`: JSON built by a library (a '"' in the model path stays valid), one
 * result per (depth, test) in order, named as llama-bench names them. */
static void test_cli_bench_json_depth(void **state) {
    (void)state;
    char m[4096], dir[] = "/tmp/stp-bench-XXXXXX", link[4200];
    th_data_path(m, sizeof m, DENSE);
    assert_non_null(mkdtemp(dir));
    snprintf(link, sizeof link, "%s/a\"b.gguf", dir);
    assert_int_equal(symlink(m, link), 0);
    const char *a[] = {"bench", "--model", link, "-p", "4",      "-n", "3",
                       "-d",    "0,5",     "-r", "1",  "--json", NULL};
    th_run_out r = s_run(a);
    s_expect(&r, 0, "bench --json -d");
    json_error_t je;
    json_t *j = json_loads(r.out, 0, &je);
    if (!j) fail_msg("bench --json: %s\n%s", je.text, r.out);
    assert_string_equal(json_string_value(json_object_get(j, "model")), link);
    json_t *res = json_object_get(j, "results");
    json_t *rbw = json_object_get(json_object_get(j, "machine"), "read_bandwidth");
    const double bw = json_real_value(json_object_get(rbw, "roofline_gbps"));
    assert_true(bw == fmax(json_real_value(json_object_get(rbw, "gbps_n_threads")),
                           json_real_value(json_object_get(rbw, "gbps_1_thread"))));
    if (!(bw > 0.2 && bw < 2000)) fail_msg("bench: implausible read bandwidth %g GB/s", bw);
    assert_true(json_real_value(json_object_get(rbw, "gbps_1_thread")) > 0.2);
    const double steal =
        json_real_value(json_object_get(json_object_get(j, "machine"), "steal_share"));
    assert_true(steal >= 0 && steal <= 1);
    const char *names[] = {"pp4", "tg3", "pp4 @ d5", "tg3 @ d5"};
    assert_int_equal(json_array_size(res), 4);
    for (int i = 0; i < 4; i++) {
        json_t *t = json_array_get(res, i);
        assert_string_equal(json_string_value(json_object_get(t, "test")), names[i]);
        assert_int_equal(json_integer_value(json_object_get(t, "depth")), i < 2 ? 0 : 5);
        assert_true(json_real_value(json_object_get(t, "tokens_per_second")) > 0);
        assert_true(
            json_real_value(json_object_get(json_object_get(t, "ms_per_token"), "attention")) > 0);
        if (i % 2 == 0)
            assert_null(json_object_get(t, "roofline")); /* pp tests have none */
        else
            s_check_roofline(m, json_object_get(t, "roofline"), i < 2 ? 0 : 5, 3, bw);
    }
    json_decref(j);
    th_run_out_free(&r);
    unlink(link);
    rmdir(dir);
}

static void test_cli_help_exits_0(void **state) {
    (void)state;
    const char *cmds[] = {"generate", "info", "tokenize", "detokenize", "bench"};
    for (size_t i = 0; i < sizeof cmds / sizeof cmds[0]; i++) {
        const char *a[] = {cmds[i], "--help", NULL};
        th_run_out r = s_run(a);
        if (r.status != 0 || !strstr(r.out, "usage: stpipe"))
            fail_msg("stpipe %s --help: exit %d, stdout: %s", cmds[i], r.status, r.out);
        th_run_out_free(&r);
    }
    /* the help is the option table: the shared rows with the command's own defaults */
    const char *g[] = {"generate", "--help", NULL};
    th_run_out r = s_run(g);
    s_expect(&r, 0, "stpipe generate --help");
    assert_non_null(strstr(r.out, "-n, --n-predict N"));
    assert_non_null(strstr(r.out, "[default 24301]"));
    assert_non_null(strstr(r.out, "--cache-type f32|f16|q8_0"));
    th_run_out_free(&r);
    const char *c[] = {"chat", "--help", NULL};
    r = s_run(c);
    s_expect(&r, 0, "stpipe chat --help");
    assert_non_null(strstr(r.out, "usage: stpipe chat"));
    assert_non_null(strstr(r.out, "[default 0.6]"));
    th_run_out_free(&r);
    const char *a[] = {"--help", NULL};
    r = s_run(a);
    s_expect(&r, 0, "stpipe --help");
    assert_non_null(strstr(r.out, "generate"));
    th_run_out_free(&r);
}

static void test_cli_bad_usage_exits_2(void **state) {
    (void)state;
    char m[4096];
    th_data_path(m, sizeof m, DENSE);
    const char *cases[][12] = {
        {NULL},
        {"frobnicate", NULL},
        {"generate", "--prompt-ids", "1", NULL},
        {"generate", "--model", m, NULL},
        {"generate", "--model", m, "--prompt", "a", "--prompt-ids", "1", NULL},
        {"generate", "--model", m, "--prompt-ids", "1", "--bogus", NULL},
        {"generate", "--model", m, "--prompt-ids", "1", "-n", "many", NULL},
        {"generate", "--model", m, "--prompt-ids", "1", "--threads", "0", NULL},
        {"generate", "--model", m, "--prompt-ids", "1", "--temp", NULL},
        {"info", NULL},
        {"info", "--model", m, "--bogus", NULL},
        {"tokenize", "--model", m, NULL},
        {"detokenize", "--model", m, "--ids", "1 x", NULL},
        {"detokenize", "--model", m, NULL},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        th_run_out r = s_run(cases[i]);
        if (r.status != 2 || r.err[0] == 0)
            fail_msg("usage case %zu (%s %s): exit %d, stderr '%s'", i,
                     cases[i][0] ? cases[i][0] : "", cases[i][0] && cases[i][1] ? cases[i][1] : "",
                     r.status, r.err);
        th_run_out_free(&r);
    }
    /* an option's error names it as typed, with its range, on one line */
    const char *n[] = {"generate", "--model", m, "--prompt-ids", "1", "-n", "many", NULL};
    th_run_out r = s_run(n);
    if (r.status != 2 || !strstr(r.err, "stpipe generate: -n needs an integer in -1..16777216 "
                                        "(got 'many')"))
        fail_msg("-n many: exit %d, stderr '%s'", r.status, r.err);
    th_run_out_free(&r);
    /* a pipeline's cache type is stpipe-up's: --cache-type given with --pipeline is refused,
     * before any connection (the run directory need not exist) */
    const char *p[] = {
        "generate", "--pipeline", "/nonexistent-run", "--prompt", "a", "--cache-type", "f32", NULL};
    r = s_run(p);
    if (r.status != 2 || !strstr(r.err, "stpipe-up --cache-type"))
        fail_msg("--pipeline --cache-type: exit %d, stderr '%s'", r.status, r.err);
    th_run_out_free(&r);
}

/* BUG (cli/cli_generate.c, cli_generate): a malformed --prompt-ids value ("1 x") is a
 * usage error, but it is parsed only after the model is loaded (s_prompt_ids) and the failure
 * exits 1 (status stays 1 at `if (n_prompt < 0) goto out;`), while detokenize exits 2 for the
 * same mistake. Fix: parse --prompt-ids in s_parse (store the ids in generate_opts) and return 2
 * there. (regression test). */
static void test_cli_bad_prompt_ids_exit_2(void **state) {
    (void)state;
    char m[4096];
    th_data_path(m, sizeof m, DENSE);
    const char *a[] = {"generate", "--model", m, "--prompt-ids", "1 x", "--quiet", NULL};
    th_run_out r = s_run(a);
    if (r.status != 2 || !strstr(r.err, "'x'"))
        fail_msg("--prompt-ids '1 x': exit %d (want 2), stderr: %s", r.status, r.err);
    th_run_out_free(&r);
}

/* generate and info on a bad file: exit 1, one line naming the file and the problem. */
static void s_bad_model(const char *path, const char *problem) {
    const char *a[] = {"generate", "--model", path, "--prompt-ids", "1 2", "--quiet", NULL};
    th_run_out r = s_run(a);
    s_expect_error(&r, "generate on a bad model", path, problem);
    th_run_out_free(&r);
    const char *b[] = {"info", "--model", path, NULL};
    r = s_run(b);
    s_expect_error(&r, "info on a bad model", path, problem);
    assert_string_equal(r.out, "");
    th_run_out_free(&r);
}

static void test_cli_missing_file(void **state) {
    (void)state;
    s_bad_model("/nonexistent/dir/model.gguf", "No such file");
}

static void test_cli_truncated_gguf(void **state) {
    (void)state;
    char src[4096], p[4096];
    th_data_path(src, sizeof src, DENSE);
    th_tmp_path(p, sizeof p, "cli_truncated.gguf");
    FILE *in = fopen(src, "rb"), *out = fopen(p, "wb");
    assert_non_null(in);
    assert_non_null(out);
    char buf[4096];
    size_t total = 0, n;
    while ((n = fread(buf, 1, sizeof buf, in)) > 0 && total < 300000) {
        fwrite(buf, 1, n, out);
        total += n;
    }
    fclose(in);
    fclose(out);
    s_bad_model(p, "truncated");
    /* header cut in the middle of the metadata */
    assert_int_equal(truncate(p, 100), 0);
    s_bad_model(p, "truncated");
    unlink(p);
}

static void test_cli_foreign_architecture(void **state) {
    (void)state;
    char src[4096], p[4096];
    th_kv_edit kv[] = {{.key = "general.architecture", .op = TH_KV_STR, .str = "llama"}};
    th_copy_opts o = {.kv = kv, .n_kv = 1};
    stp_err err = {0};
    th_tmp_path(p, sizeof p, "cli_llama.gguf");
    if (th_gguf_copy(th_data_path(src, sizeof src, DENSE), p, &o, &err)) fail_msg("%s", err.msg);
    s_bad_model(p, "'llama' is not supported");
    unlink(p);
}

static void test_cli_unsupported_tensor_type(void **state) {
    (void)state;
    char p[4096];
    stp_err err = {0};
    th_model_spec s = th_model_spec_small(8);
    s.n_embd = 256;
    s.retype_tensor = "blk.0.ffn_gate_exps.weight";
    s.retype = STP_TYPE_IQ2_XXS;
    th_tmp_path(p, sizeof p, "cli_iq2.gguf");
    if (th_model_write(p, &s, &err)) fail_msg("%s", err.msg);
    s_bad_model(p, "'blk.0.ffn_gate_exps.weight' has type IQ2_XXS");
    unlink(p);
}

static void test_cli_prompt_longer_than_context(void **state) {
    (void)state;
    char m[4096];
    th_data_path(m, sizeof m, DENSE);
    const char *a[] = {
        "generate", "--model", m,   "--prompt-ids", "1 2 3 4 5 6 7 8 9 10", "--ctx-size",
        "8",        "--quiet", NULL};
    th_run_out r = s_run(a);
    s_expect_error(&r, "prompt > ctx", "10 tokens", "context holds 8");
    assert_string_equal(r.out, "");
    th_run_out_free(&r);
    /* a token id outside the vocabulary */
    const char *b[] = {"generate", "--model", m, "--prompt-ids", "1 320", "--quiet", NULL};
    r = s_run(b);
    s_expect_error(&r, "id out of range", "320", NULL);
    th_run_out_free(&r);
}

static void test_cli_gating_guess_warns(void **state) {
    (void)state;
    char src[4096], p[4096];
    th_kv_edit kv[] = {{.key = "smallthinker.expert_gating_func", .op = TH_KV_DROP}};
    th_copy_opts o = {.kv = kv, .n_kv = 1};
    stp_err err = {0};
    th_tmp_path(p, sizeof p, "cli_nogate.gguf");
    if (th_gguf_copy(th_data_path(src, sizeof src, DENSE), p, &o, &err)) fail_msg("%s", err.msg);
    const char *a[] = {"generate", "--model", p, "--prompt-ids", "1 2", "--ids", "-n", "2", NULL};
    th_run_out r = s_run(a);
    s_expect(&r, 0, "generate without gating key");
    assert_non_null(strstr(r.err, "warning: "));
    assert_non_null(strstr(r.err, "sigmoid"));
    th_run_out_free(&r);
    const char *b[] = {"info", "--model", p, NULL};
    r = s_run(b);
    s_expect(&r, 0, "info without gating key");
    assert_non_null(strstr(r.out, "sigmoid gating (guessed: key absent)"));
    th_run_out_free(&r);
    unlink(p);
}

static void test_cli_tokenize_roundtrip(void **state) {
    (void)state;
    char m[4096];
    th_data_path(m, sizeof m, DENSE);
    json_t *g = s_golden();
    const char *prompt = json_string_value(json_object_get(g, "prompt"));
    char *ids = s_prompt_ids(g);
    const char *a[] = {"tokenize", "--model", m, "--text", prompt, "--ids", NULL};
    th_run_out r = s_run(a);
    s_expect(&r, 0, "tokenize --ids");
    char want[4096];
    snprintf(want, sizeof want, "%s\n", ids);
    assert_string_equal(r.out, want);
    th_run_out_free(&r);
    const char *b[] = {"detokenize", "--model", m, "--ids", ids, NULL};
    r = s_run(b);
    s_expect(&r, 0, "detokenize");
    snprintf(want, sizeof want, "%s\n", prompt);
    assert_string_equal(r.out, want);
    th_run_out_free(&r);
    /* the listing form: one id per line with its text */
    const char *c[] = {"tokenize", "--model", m, "--text", "Hello", NULL};
    r = s_run(c);
    s_expect(&r, 0, "tokenize listing");
    assert_non_null(strstr(r.out, "    72 -> 'H'\n"));
    th_run_out_free(&r);
    /* unicode and special text survive the round trip */
    const char *text = "na\xc3\xafve caf\xc3\xa9 \xe2\x82\xac 42\n\ttabs";
    const char *d[] = {"tokenize", "--model", m, "--text", text, "--ids", NULL};
    r = s_run(d);
    s_expect(&r, 0, "tokenize unicode");
    r.out[strcspn(r.out, "\n")] = 0;
    const char *e[] = {"detokenize", "--model", m, "--ids", r.out, NULL};
    th_run_out r2 = s_run(e);
    s_expect(&r2, 0, "detokenize unicode");
    snprintf(want, sizeof want, "%s\n", text);
    assert_string_equal(r2.out, want);
    th_run_out_free(&r);
    th_run_out_free(&r2);
    /* a missing model file is a runtime error naming the file */
    const char *f[] = {"tokenize", "--model", "/nonexistent/x.gguf", "--text", "a", NULL};
    r = s_run(f);
    s_expect(&r, 1, "tokenize missing file");
    assert_non_null(strstr(r.err, "/nonexistent/x.gguf"));
    th_run_out_free(&r);
    free(ids);
    json_decref(g);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_cli_generate_golden_greedy),
        cmocka_unit_test(test_cli_generate_logits_out),
        cmocka_unit_test(test_cli_generate_seeded_sampling),
        cmocka_unit_test(test_cli_info_shapes),
        cmocka_unit_test(test_cli_info_memory_budget),
        cmocka_unit_test(test_cli_help_exits_0),
        cmocka_unit_test(test_cli_bad_usage_exits_2),
        cmocka_unit_test(test_cli_bad_prompt_ids_exit_2),
        cmocka_unit_test(test_cli_missing_file),
        cmocka_unit_test(test_cli_truncated_gguf),
        cmocka_unit_test(test_cli_foreign_architecture),
        cmocka_unit_test(test_cli_unsupported_tensor_type),
        cmocka_unit_test(test_cli_prompt_longer_than_context),
        cmocka_unit_test(test_cli_gating_guess_warns),
        cmocka_unit_test(test_cli_tokenize_roundtrip),
        cmocka_unit_test(test_cli_bench_json_depth),
        cmocka_unit_test(test_cli_bench_attention_prefetch),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
