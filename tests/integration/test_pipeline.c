/* test_pipeline: the real multi-process pipeline, end to end. Starts it with deploy/stpipe-up
 * (1 and 2 expert workers) on the F32 golden models, checks `stpipe generate --pipeline` gives
 * the golden greedy ids and the in-process engine's logits (1e-4 relative), that a SIGKILLed
 * expert worker is restarted and the next request succeeds, that malformed messages to every
 * socket are counted and answered without a crash, and that stpipe-down leaves no process and
 * no /dev/shm segment behind. Run directories live under STP_TMP. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <jansson.h>
#include <zmq.h>

#include "client.pb-c.h"
#include "eval.pb-c.h"
#include "layer.pb-c.h"
#include "model/model.h"
#include "msg/msg.h"
#include "router.pb-c.h"
#include "stats.pb-c.h"
#include "th_pipeline.h"
#include "th_proc.h"

typedef struct run {
    char dir[1024];
    char prefix[128];
} run;

/* The run of the current test, stopped by the teardown when an assertion left it running, and
 * a generation the test started (killed and reaped by the teardown). */
static char s_current_dir[1024];
static pid_t s_gen_pid;

static int s_teardown(void **st) {
    (void)st;
    if (s_gen_pid > 0) th_wait(s_gen_pid, 0); /* kills and reaps it */
    s_gen_pid = 0;
    if (!s_current_dir[0]) return 0;
    th_pipe_down(s_current_dir, 30);
    s_current_dir[0] = 0;
    return 0;
}

static int s_up_with(run *r, const char *model, int workers, const char *tag,
                     const char *const *extra) {
    th_pipe_dir(r->dir, sizeof r->dir, "pipe", tag);
    snprintf(s_current_dir, sizeof s_current_dir, "%s", r->dir);
    int rc = th_pipe_up(r->dir, model, workers, 30, 60, extra);
    if (rc) return rc;
    th_pipe_prefix(r->dir, r->prefix, sizeof r->prefix);
    return 0;
}

static int s_up(run *r, const char *model, int workers, const char *tag) {
    return s_up_with(r, model, workers, tag, NULL);
}

/* stpipe-down, then: no stage process alive, no shm segment of the run. */
static void s_down_and_check(run *r) {
    int pids[32];
    int n = th_pipe_pids(r->dir, pids, 32);
    assert_true(n >= 4);
    assert_int_equal(th_pipe_down(r->dir, 30), 0);
    for (int i = 0; i < n; i++) {
        bool alive = th_stage_alive(pids[i], NULL);
        if (alive) fprintf(stderr, "stage pid %d survived stpipe-down\n", pids[i]);
        assert_false(alive);
    }
    assert_int_equal(th_shm_count(r->prefix), 0);
}

/* Generates greedily through the pipeline; fills ids; returns the exit status. */
static int s_generate(const run *r, const th_golden *g, int n, const char *logits_out, int *ids,
                      int *n_ids, const char *extra) {
    char bin[1024], out[1100], nbuf[16];
    snprintf(bin, sizeof bin, "%s/stpipe", th_env("STP_BIN_DIR"));
    snprintf(out, sizeof out, "%s/gen-%d.out", r->dir, (int)getpid());
    snprintf(nbuf, sizeof nbuf, "%d", n);
    char *argv[16] = {
        bin,  "generate", "--pipeline", (char *)r->dir, "--prompt-ids", (char *)g->ids,
        "-n", nbuf,       "--ids",      "--quiet"};
    int a = 10;
    if (logits_out) {
        argv[a++] = "--logits-out";
        argv[a++] = (char *)logits_out;
    }
    if (extra) argv[a++] = (char *)extra;
    argv[a] = NULL;
    int rc = th_run(argv, out, 120);
    char *s = th_slurp(out, NULL);
    *n_ids = 0;
    for (char *p = s, *end; p && *p && *n_ids < 4096; p = end) {
        long v = strtol(p, &end, 10);
        if (end == p) break;
        ids[(*n_ids)++] = (int)v;
    }
    free(s);
    return rc;
}

/* The float32 logits files pl (pipeline) and il (in-process) have the same size and agree
 * within 1e-4 relative (to max(1, |logit|)). */
static void s_logits_match(const char *pl, const char *il) {
    size_t lp = 0, li = 0;
    char *bp = th_slurp(pl, &lp), *bi = th_slurp(il, &li);
    assert_non_null(bp);
    assert_non_null(bi);
    assert_true(lp > 0);
    assert_int_equal(lp, li);
    const float *fp = (const float *)bp, *fi = (const float *)bi;
    double worst = 0;
    for (size_t i = 0; i < lp / 4; i++) {
        double d = fabs((double)fp[i] - fi[i]) / fmax(1.0, fabs((double)fi[i]));
        if (d > worst) worst = d;
    }
    free(bp);
    free(bi);
    assert_true(worst <= 1e-4);
}

/* A counter of one stage's newest StatsReport; -1 when the report or the counter is missing. */
static long long s_counter(void *zctx, const run *r, const char *stage_sock, const char *counter) {
    void *s = th_stats_sub(zctx, r->dir, stage_sock);
    Stp__StatsReport *rep = th_stats_next(s, 3000);
    const long long v = rep ? th_stats_counter(rep, counter) : -1;
    if (rep) stp__stats_report__free_unpacked(rep, NULL);
    zmq_close(s);
    return v;
}
static uint64_t s_stat(void *zctx, const run *r, const char *stage_sock, const char *counter);

/* Golden ids and logits through a pipeline of `workers` expert workers; lanes: the layer work
 * goes through the shared-memory lanes (else STP_LANES=0: ZeroMQ only), checked in the stats. */
/* extra: more stpipe-up options (NULL: th_pipe_up's, one attention thread) */
static void s_golden_case_with(const char *stem, int workers, bool lanes,
                               const char *const *extra) {
    th_golden g;
    th_golden_load(&g, stem);
    run r;
    char tag[128];
    snprintf(tag, sizeof tag, "%s-w%d%s%s", stem, workers, lanes ? "" : "-zmq", extra ? "-x" : "");
    if (!lanes) setenv("STP_LANES", "0", 1);
    int up = s_up_with(&r, g.model, workers, tag, extra);
    unsetenv("STP_LANES");
    assert_int_equal(up, 0);
    char pl[1200], il[1200];
    snprintf(pl, sizeof pl, "%s/pipe.logits", r.dir);
    snprintf(il, sizeof il, "%s/inproc.logits", r.dir);
    int ids[4096], n = 0;
    int rc = s_generate(&r, &g, g.n_greedy, pl, ids, &n, NULL);
    assert_int_equal(rc, 0);
    assert_int_equal(n, g.n_greedy);
    for (int i = 0; i < n; i++)
        assert_int_equal(ids[i], g.greedy[i]);
    /* logits: the in-process engine on the same prompt */
    char bin[1024];
    snprintf(bin, sizeof bin, "%s/stpipe", th_env("STP_BIN_DIR"));
    char *argv[] = {
        bin,     "generate", "--model",   g.model, "--prompt-ids", g.ids, "-n",           "1",
        "--ids", "--quiet",  "--threads", "1",     "--cache-type", "f32", "--logits-out", il,
        NULL}; /* th_pipe_up's */
    assert_int_equal(th_run(argv, NULL, 60), 0);
    s_logits_match(pl, il);
    /* which carrier the work took: every worker got lane work, or none did */
    void *zctx = zmq_ctx_new();
    uint64_t via_lane = 0, via_zmq = 0;
    for (int i = 0; i < 10 && !(lanes ? via_lane : via_zmq); i++) {
        via_lane = s_stat(zctx, &r, "stats-attn", "lane.work_sent");
        via_zmq = s_stat(zctx, &r, "stats-attn", "msg.work_sent");
    }
    if (lanes) {
        assert_true(via_lane > 0);
        for (int wi = 0; wi < workers; wi++) {
            char sock[32];
            snprintf(sock, sizeof sock, "stats-expert-%d", wi);
            uint64_t got = 0;
            for (int i = 0; i < 10 && !got; i++)
                got = s_stat(zctx, &r, sock, "lane.work");
            assert_true(got > 0);
        }
    } else {
        assert_int_equal(via_lane, 0);
        assert_true(via_zmq > 0);
    }
    zmq_ctx_term(zctx);
    s_down_and_check(&r);
}

/* --cache-type T (stpipe-up, the attention worker's KV cache): the pipeline's prompt logits
 * are the in-process engine's with the same cache type bit for bit (both run attention_attend
 * over the same kv_cache code), and so are the greedy ids. */
static void s_cache_type_case(const char *type) {
    th_golden g;
    th_golden_load(&g, "tiny-dense-attn-f32");
    run r;
    const char *const extra[] = {"--cache-type", type, NULL};
    th_pipe_dir(r.dir, sizeof r.dir, "pipe", type);
    snprintf(s_current_dir, sizeof s_current_dir, "%s", r.dir);
    assert_int_equal(th_pipe_up(r.dir, g.model, 1, 30, 60, extra), 0);
    th_pipe_prefix(r.dir, r.prefix, sizeof r.prefix);
    char pl[1200], il[1200], out[1200], bin[1024];
    snprintf(pl, sizeof pl, "%s/pipe.logits", r.dir);
    snprintf(il, sizeof il, "%s/inproc.logits", r.dir);
    snprintf(out, sizeof out, "%s/inproc.ids", r.dir);
    int ids[64], n = 0;
    assert_int_equal(s_generate(&r, &g, 16, pl, ids, &n, NULL), 0);
    assert_int_equal(n, 16);
    snprintf(bin, sizeof bin, "%s/stpipe", th_env("STP_BIN_DIR"));
    char *argv[] = {bin,         "generate", "--model",      g.model,      "--prompt-ids",
                    g.ids,       "-n",       "16",           "--ids",      "--quiet",
                    "--threads", "1",        "--cache-type", (char *)type, "--logits-out",
                    il,          NULL};
    assert_int_equal(th_run(argv, out, 60), 0);
    char *txt = th_slurp(out, NULL);
    assert_non_null(txt);
    char *p = txt;
    for (int i = 0; i < n; i++)
        assert_int_equal(strtol(p, &p, 10), ids[i]);
    free(txt);
    s_logits_match(pl, il);
    size_t lp = 0, li = 0;
    char *bp = th_slurp(pl, &lp), *bi = th_slurp(il, &li);
    assert_non_null(bp);
    assert_non_null(bi);
    assert_int_equal(lp, li);
    assert_memory_equal(bp, bi, lp);
    free(bp), free(bi);
    s_down_and_check(&r);
}

static void test_pipeline_f16_cache(void **st) {
    (void)st;
    s_cache_type_case("f16");
}

static void test_pipeline_q8_0_cache(void **st) {
    (void)st;
    s_cache_type_case("q8_0");
}

/* `stpipe bench --pipeline -d`: prompt and generation speed through a running pipeline, at depth
 * 0 and after 5 tokens (the coordinator evaluates them before its prompt clock starts), with the
 * IPC share of decode and the stages' summed PSS, as JSON; each tg test with its roofline: the
 * attention worker's stage times (each > 0, together within the decode time) and the bytes
 * model/roofline.c counts (test_cli holds them to a hand count) from the expert workers' neuron
 * counts (F32: no sparse down, so every neuron of the chosen experts). */
static void test_pipeline_bench(void **st) {
    (void)st;
    th_golden g;
    th_golden_load(&g, "tiny-dense-attn-f32");
    run r;
    assert_int_equal(s_up(&r, g.model, 1, "bench"), 0);
    char bin[1024], out[1100];
    snprintf(bin, sizeof bin, "%s/stpipe", th_env("STP_BIN_DIR"));
    snprintf(out, sizeof out, "%s/bench.json", r.dir);
    char *argv[] = {bin,  "bench", "--pipeline", r.dir, "--model", g.model,        "-p",
                    "8",  "-n",    "6",          "-r",  "2",       "--cache-type", "f32",
                    "-d", "0,5",   "--json",     NULL};
    assert_int_equal(th_run(argv, out, 120), 0);
    json_error_t je;
    json_t *j = json_load_file(out, 0, &je);
    assert_non_null(j);
    assert_true(json_integer_value(json_object_get(j, "pss_bytes")) > 0);
    /* the host's read bandwidth in the header here too */
    json_t *bw = json_object_get(json_object_get(j, "machine"), "read_bandwidth");
    assert_true(json_real_value(json_object_get(bw, "roofline_gbps")) > 0.2);
    model *mo = NULL;
    stp_err err = {0};
    assert_int_equal(model_open(&mo, g.model, &err), 0);
    const double all_neurons = (double)mo->cfg.n_layer * mo->cfg.n_expert_used * mo->cfg.n_ff_exp;
    model_close(&mo);
    json_t *res = json_object_get(j, "results");
    assert_int_equal(json_array_size(res), 4); /* pp8, tg6, then both after 5 tokens */
    const char *names[] = {"pp8", "tg6", "pp8 @ d5", "tg6 @ d5"};
    for (int i = 0; i < 4; i++) {
        json_t *t = json_array_get(res, i);
        assert_string_equal(json_string_value(json_object_get(t, "test")), names[i]);
        assert_int_equal(json_integer_value(json_object_get(t, "depth")), i < 2 ? 0 : 5);
        assert_true(json_real_value(json_object_get(t, "tokens_per_second")) > 0);
        json_t *rl = json_object_get(t, "roofline");
        if (i % 2 == 0) {
            assert_null(rl); /* pp tests have none */
            continue;
        }
        double ipc = json_real_value(json_object_get(t, "ipc_share"));
        assert_true(ipc > 0 && ipc < 1);
        assert_non_null(rl);
        json_t *pos = json_object_get(rl, "positions"); /* the prompt is depth + 1 ids */
        assert_int_equal(json_integer_value(json_array_get(pos, 0)), i < 2 ? 1 : 6);
        assert_int_equal(json_integer_value(json_array_get(pos, 1)), i < 2 ? 6 : 11);
        double ms = 0;
        const char *stages[] = {"attention", "router", "experts", "lm_head"};
        for (int k = 0; k < 4; k++) {
            json_t *o = json_object_get(json_object_get(rl, "stages"), stages[k]);
            assert_true(json_real_value(json_object_get(o, "ms_per_token")) > 0);
            assert_true(json_real_value(json_object_get(o, "bytes_per_token")) > 0);
            ms += json_real_value(json_object_get(o, "ms_per_token"));
        }
        /* within the decode time of the same repetitions (not 1 / the mean rate: two
         * repetitions of different speed average differently) */
        const double dec = json_real_value(json_object_get(rl, "decode_ms_per_token"));
        assert_true(dec > 0);
        if (ms > 1.05 * dec)
            fail_msg("%s: stages %.3f ms a token, decode %.3f ms", names[i], ms, dec);
        const double act = json_real_value(json_object_get(rl, "neurons_active_per_token"));
        const double down = json_real_value(json_object_get(rl, "down_neurons_per_token"));
        assert_true(act > 0 && act < all_neurons);
        assert_true(down == all_neurons);
    }
    json_decref(j);
    /* runs after it on the same pipeline: a prefill test finds no earlier request's prompt in
     * a slot. A tg test after 5 tokens leaves its prompt (a leading id, then the random ids) in
     * a slot; a pp8 test that started the same way (as each run's requests once did) would be
     * read from there, 6 of its 8 ids. The coordinator counts the ids it reused: at most a
     * chance match of one leading id among this 320-id vocabulary, sent again. */
    void *zctx = zmq_ctx_new();
    const long long before = s_counter(zctx, &r, "stats-coordinator", "sched.tokens_reused");
    char *deep[] = {bin,  "bench", "--pipeline", r.dir, "--model", g.model, "-p", "0",
                    "-n", "2",     "-r",         "1",   "-d",      "5",     NULL};
    char *pp[] = {bin, "bench", "--pipeline", r.dir, "--model", g.model, "-p",
                  "8", "-n",    "0",          "-r",  "1",       NULL};
    assert_int_equal(th_run(deep, out, 120), 0);
    assert_int_equal(th_run(pp, out, 120), 0);
    const long long after = s_counter(zctx, &r, "stats-coordinator", "sched.tokens_reused");
    zmq_ctx_term(zctx);
    assert_true(before >= 0 && after >= before);
    if (after - before > 2) fail_msg("the pp test reused %lld prompt ids", after - before);
    /* --parallel 2: two requests at once, their steps batched. Sent together they usually
     * reach the coordinator before its first step and answer together (15 more entries than
     * evaluations over both tests); on a loaded host the second may come a step late and be
     * sliced beside the first's answer (12). Either way several evaluations carry both
     * sequences. Each depth is read once, then reused from its slot (5 ids each) by the timed
     * request. */
    zctx = zmq_ctx_new();
    const long long seqs0 = s_counter(zctx, &r, "stats-attn", "eval.seqs");
    const long long evals0 = s_counter(zctx, &r, "stats-attn", "msg.eval");
    const long long reused0 = s_counter(zctx, &r, "stats-coordinator", "sched.tokens_reused");
    char *par[] = {bin, "bench", "--pipeline", r.dir, "--model", g.model,  "-p",         "0", "-n",
                   "6", "-r",    "1",          "-d",  "0,5",     "--json", "--parallel", "2", NULL};
    assert_int_equal(th_run(par, out, 120), 0);
    const long long seqs1 = s_counter(zctx, &r, "stats-attn", "eval.seqs");
    const long long evals1 = s_counter(zctx, &r, "stats-attn", "msg.eval");
    const long long reused1 = s_counter(zctx, &r, "stats-coordinator", "sched.tokens_reused");
    zmq_ctx_term(zctx);
    assert_true(seqs0 >= 0 && evals0 >= 0 && reused0 >= 0);
    if ((seqs1 - seqs0) - (evals1 - evals0) < 6)
        fail_msg("--parallel 2: %lld sequences in %lld evaluations", seqs1 - seqs0,
                 evals1 - evals0);
    assert_true(reused1 - reused0 >= 10);
    j = json_load_file(out, 0, &je);
    assert_non_null(j);
    res = json_object_get(j, "results");
    assert_int_equal(json_array_size(res), 2);
    const char *par_names[] = {"tg6 x2", "tg6 @ d5 x2"};
    for (int i = 0; i < 2; i++) {
        json_t *t = json_array_get(res, i);
        assert_string_equal(json_string_value(json_object_get(t, "test")), par_names[i]);
        assert_true(json_real_value(json_object_get(t, "tokens_per_second")) > 0);
        const double ipc = json_real_value(json_object_get(t, "ipc_share"));
        assert_true(ipc > 0 && ipc < 1);
    }
    json_decref(j);
    /* a tg test whose depth and length the context (4096) does not hold fails, saying so: the
     * answer stops at the context's end (it once reported the tokens it got as the test's) */
    char err_path[1100];
    snprintf(err_path, sizeof err_path, "%s/bench.err", r.dir);
    char *full[] = {bin,  "bench", "--pipeline", r.dir, "--model", g.model, "-p", "0",
                    "-n", "10",    "-r",         "1",   "-d",      "4090",  NULL};
    assert_int_not_equal(th_wait(th_spawn(full, out, err_path), 120), 0);
    char *msg = th_slurp_str(err_path);
    assert_non_null(msg);
    if (!strstr(msg, "stopped after 6 of 11 tokens (context)")) fail_msg("stderr: %s", msg);
    free(msg);
    s_down_and_check(&r);
}

static void s_golden_case(const char *stem, int workers, bool lanes) {
    s_golden_case_with(stem, workers, lanes, NULL);
}

static void test_pipeline_dense_1_worker(void **st) {
    (void)st;
    s_golden_case("tiny-dense-attn-f32", 1, true);
}
static void test_pipeline_dense_2_workers(void **st) {
    (void)st;
    s_golden_case("tiny-dense-attn-f32", 2, true);
}
static void test_pipeline_hybrid_1_worker(void **st) {
    (void)st;
    s_golden_case("tiny-hybrid-attn-f32", 1, true);
}
static void test_pipeline_hybrid_2_workers(void **st) {
    (void)st;
    s_golden_case("tiny-hybrid-attn-f32", 2, true);
}
/* two attention threads and one expert worker with two: the teams hand their cores to each
 * other through the lane block's words (threadpool_set_handoff), the same bits */
static void test_pipeline_hybrid_handoff(void **st) {
    (void)st;
    const char *extra[] = {"--threads", "2", "--expert-threads", "2", NULL};
    s_golden_case_with("tiny-hybrid-attn-f32", 1, true, extra);
}
/* the ZeroMQ carrier (STP_LANES=0), which also serves until a worker attaches to its lane */
static void test_pipeline_hybrid_2_workers_zmq(void **st) {
    (void)st;
    s_golden_case("tiny-hybrid-attn-f32", 2, false);
}

static int s_ready_pid(const run *r, const char *stage) {
    char p[1200];
    snprintf(p, sizeof p, "%s/%s.ready", r->dir, stage);
    char *s = th_slurp(p, NULL);
    int pid = s ? atoi(s) : 0;
    free(s);
    return pid;
}

/* Starts a greedy generation of n tokens whose text goes to out as it is generated (flushed per
 * token: the test sees the request in flight); returns its pid. */
static pid_t s_gen_text_start(const run *r, const th_golden *g, int n, const char *out,
                              const char *err) {
    char bin[1024], nbuf[16];
    snprintf(bin, sizeof bin, "%s/stpipe", th_env("STP_BIN_DIR"));
    snprintf(nbuf, sizeof nbuf, "%d", n);
    char *argv[] = {bin,
                    "generate",
                    "--pipeline",
                    (char *)r->dir,
                    "--prompt-ids",
                    (char *)g->ids,
                    "-n",
                    nbuf,
                    "--quiet",
                    "--ignore-eos",
                    NULL};
    return th_spawn(argv, out, err);
}

typedef struct restart_wait {
    const run *r;
    int old, now;
} restart_wait;

static bool s_restarted(void *ctx) {
    restart_wait *w = ctx;
    w->now = s_ready_pid(w->r, "expert-1");
    return w->now > 0 && w->now != w->old;
}

/* kill -9 of an expert worker while a long generation is in flight (its first tokens are out,
 * it has not ended): the supervisor restarts the worker, the attention worker resends the work,
 * and the request completes with the text of an uninterrupted run; the next request gives the
 * golden ids. */
static void test_pipeline_expert_crash_restart(void **st) {
    (void)st;
    enum { N = 1000 }; /* ~0.5 s of decoding on this model: the fault lands mid-request */
    th_golden g;
    th_golden_load(&g, "tiny-dense-attn-f32");
    run r;
    assert_int_equal(s_up(&r, g.model, 2, "crash"), 0);
    char ref[1200], out[1200], err[1200];
    snprintf(ref, sizeof ref, "%s/ref.txt", r.dir);
    snprintf(out, sizeof out, "%s/fault.txt", r.dir);
    snprintf(err, sizeof err, "%s/fault.err", r.dir);
    assert_int_equal(th_wait(s_gen_text_start(&r, &g, N, ref, NULL), 120), 0);
    char *want = th_slurp(ref, NULL);
    assert_non_null(want);
    assert_true(strlen(want) > 0);
    int victim = s_ready_pid(&r, "expert-1");
    assert_true(victim > 0);
    s_gen_pid = s_gen_text_start(&r, &g, N, out, err);
    assert_true(s_gen_pid > 0);
    assert_true(th_wait_file_has(out, "", s_gen_pid, 60)); /* its first tokens are out */
    if (th_exited(s_gen_pid) >= 0) fail_msg("the generation ended before the fault");
    assert_int_equal(kill(victim, SIGKILL), 0);
    int rc = th_wait(s_gen_pid, 120); /* -1: still running at the deadline (then killed) */
    s_gen_pid = 0;
    char *got = th_slurp(out, NULL), *emsg = th_slurp_str(err);
    if (rc != 0) fail_msg("the request in flight ended with %d: %s", rc, emsg);
    free(emsg);
    assert_non_null(got);
    assert_string_equal(got, want);
    free(got);
    free(want);
    restart_wait w = {&r, victim, 0}; /* restarted with a new pid */
    assert_true(th_wait_until(s_restarted, &w, 30));
    int ids[4096], n = 0;
    assert_int_equal(s_generate(&r, &g, g.n_greedy, NULL, ids, &n, NULL), 0);
    assert_int_equal(n, g.n_greedy);
    for (int i = 0; i < n; i++)
        assert_int_equal(ids[i], g.greedy[i]);
    s_down_and_check(&r);
}

/* ---- malformed messages ---- */

/* Sends raw bytes on a DEALER to RUN_DIR/<name>.sock; returns the reply's length (-1: none). */
static int s_send_raw(void *zctx, const run *r, const char *name, const void *buf, size_t len,
                      uint8_t *reply, size_t cap) {
    char ep[1200];
    stp_err err = {0};
    assert_int_equal(msg_endpoint(ep, sizeof ep, r->dir, name, &err), 0);
    void *s = msg_socket(zctx, ZMQ_DEALER, ep, false, &err);
    assert_non_null(s);
    zmq_send(s, buf, len, 0);
    bool rd;
    int got = -1;
    if (msg_poll(&s, 1, &rd, 3000) && rd) {
        got = zmq_recv(s, reply, cap, 0);
    }
    zmq_close(s);
    return got;
}

static size_t s_pack(const ProtobufCMessage *m, uint8_t *buf) {
    return protobuf_c_message_pack(m, buf);
}

/* The newest StatsReport of one stage; counter value by name (0 when missing). */
static uint64_t s_stat(void *zctx, const run *r, const char *stage_sock, const char *counter) {
    const long long v = s_counter(zctx, r, stage_sock, counter);
    return v < 0 ? 0 : (uint64_t)v;
}

typedef struct stages_gone {
    const int *pids;
    int n;
    const char *prefix;
} stages_gone;

static bool s_stages_gone(void *ctx) {
    stages_gone *w = ctx;
    for (int i = 0; i < w->n; i++)
        if (th_stage_alive(w->pids[i], NULL)) return false;
    return true;
}

static bool s_shm_gone(void *ctx) {
    return th_shm_count(((stages_gone *)ctx)->prefix) == 0;
}

/* stpipe-up --owner-pid (the test helpers pass their own pid): when the owner exits without
 * stopping the pipeline (a test killed by a timeout), the supervisor stops every stage and
 * removes the run's shared memory. */
static void test_pipeline_owner_gone(void **st) {
    (void)st;
    th_golden g;
    th_golden_load(&g, "tiny-dense-attn-f32");
    run r;
    th_pipe_dir(r.dir, sizeof r.dir, "pipe", "owner");
    snprintf(s_current_dir, sizeof s_current_dir, "%s", r.dir);
    int up[2], go[2];
    assert_int_equal(pipe(up), 0);
    assert_int_equal(pipe(go), 0);
    pid_t child = fork();
    assert_true(child >= 0);
    if (child == 0) { /* the owner: starts the pipeline, then exits when told (no stpipe-down) */
        char rc = th_pipe_up(r.dir, g.model, 1, 30, 60, NULL) ? 1 : 0, x;
        if (write(up[1], &rc, 1) != 1 || read(go[0], &x, 1) < 0) _exit(2);
        _exit(0);
    }
    char rc = 1;
    assert_int_equal(read(up[0], &rc, 1), 1);
    assert_int_equal(rc, 0);
    th_pipe_prefix(r.dir, r.prefix, sizeof r.prefix);
    int pids[32];
    int n = th_pipe_pids(r.dir, pids, 32);
    assert_true(n >= 4);
    assert_int_equal(th_shm_count(r.prefix) > 0, 1);
    assert_int_equal(write(go[1], "x", 1), 1);
    int status = 0;
    assert_int_equal(waitpid(child, &status, 0), child);
    for (int i = 0; i < 2; i++) {
        close(up[i]);
        close(go[i]);
    }
    stages_gone w = {pids, n, r.prefix};
    assert_true(th_wait_until(s_stages_gone, &w, 10)); /* the supervisor polls every 200 ms */
    /* removed after the stages exit */
    assert_true(th_wait_until(s_shm_gone, &w, 5));
}

static void test_pipeline_malformed_messages(void **st) {
    (void)st;
    th_golden g;
    th_golden_load(&g, "tiny-dense-attn-f32");
    run r;
    assert_int_equal(s_up(&r, g.model, 1, "fuzz"), 0);
    void *zctx = zmq_ctx_new();
    uint8_t junk[300], buf[4096], reply[65536];
    srand(1234);
    for (size_t i = 0; i < sizeof junk; i++)
        junk[i] = (uint8_t)rand();
    const char *socks[4] = {"client", "attn", "storage", "expert-0"};
    const char *stats_socks[4] = {"stats-coordinator", "stats-attn", "stats-storage",
                                  "stats-expert-0"};
    for (int k = 0; k < 4; k++) {
        /* 1. random bytes: answered with an error (undecodable) */
        assert_true(s_send_raw(zctx, &r, socks[k], junk, sizeof junk, reply, sizeof reply) > 0);
        /* 2. a well-formed envelope of the wrong version; 3. an out-of-range body */
        size_t n_wrong = 0, n_range = 0;
        uint8_t range[4096];
        if (k == 0) {
            Stp__ClientMsg m;
            stp__client_msg__init(&m);
            m.version = 99;
            n_wrong = s_pack(&m.base, buf);
            Stp__GenerateRequest q;
            stp__generate_request__init(&q);
            int32_t bad_id = 1 << 30;
            q.n_prompt_ids = 1;
            q.prompt_ids = &bad_id;
            m.version = STP_PROTO_VERSION;
            m.body_case = STP__CLIENT_MSG__BODY_REQUEST;
            m.request = &q;
            n_range = s_pack(&m.base, range);
        } else if (k == 1) {
            Stp__EvalMsg m;
            stp__eval_msg__init(&m);
            m.version = 99;
            n_wrong = s_pack(&m.base, buf);
            Stp__EvalSeq sq, *sqp = &sq;
            stp__eval_seq__init(&sq);
            int32_t bad_id = -5;
            sq.n_tokens = 1;
            sq.tokens = &bad_id;
            Stp__EvalRequest q;
            stp__eval_request__init(&q);
            q.n_seqs = 1;
            q.seqs = &sqp;
            m.version = STP_PROTO_VERSION;
            m.body_case = STP__EVAL_MSG__BODY_REQUEST;
            m.request = &q;
            n_range = s_pack(&m.base, range);
        } else if (k == 2) {
            Stp__RouterMsg m;
            stp__router_msg__init(&m);
            m.version = 99;
            n_wrong = s_pack(&m.base, buf);
            Stp__RouterDecision d;
            stp__router_decision__init(&d);
            uint32_t e = 0;
            d.layer = 999;
            d.n_experts = 1;
            d.experts = &e;
            m.version = STP_PROTO_VERSION;
            m.body_case = STP__ROUTER_MSG__BODY_DECISION;
            m.decision = &d;
            n_range = s_pack(&m.base, range);
        } else {
            Stp__LayerMsg m;
            stp__layer_msg__init(&m);
            m.version = 99;
            n_wrong = s_pack(&m.base, buf);
            Stp__ExpertWork w;
            stp__expert_work__init(&w);
            Stp__ExpertLoc loc, *lp = &loc;
            stp__expert_loc__init(&loc);
            w.seq = UINT64_MAX; /* newer than anything the attention worker sent */
            w.layer = 999;
            w.n_tokens = 1;
            w.n_experts = 1;
            w.experts = &lp;
            m.version = STP_PROTO_VERSION;
            m.body_case = STP__LAYER_MSG__BODY_WORK;
            m.work = &w;
            n_range = s_pack(&m.base, range);
        }
        assert_true(s_send_raw(zctx, &r, socks[k], buf, n_wrong, reply, sizeof reply) > 0);
        assert_true(s_send_raw(zctx, &r, socks[k], range, n_range, reply, sizeof reply) > 0);
        /* counted, by kind */
        uint64_t undec = 0, version = 0;
        for (int i = 0; i < 10 && (!undec || !version); i++) {
            undec = s_stat(zctx, &r, stats_socks[k], "bad.undecodable");
            version = s_stat(zctx, &r, stats_socks[k], "bad.version");
        }
        assert_true(undec >= 1);
        assert_true(version >= 1);
    }
    zmq_ctx_term(zctx);
    /* everything still alive and correct */
    int ids[4096], n = 0;
    assert_int_equal(s_generate(&r, &g, g.n_greedy, NULL, ids, &n, NULL), 0);
    assert_int_equal(n, g.n_greedy);
    for (int i = 0; i < n; i++)
        assert_int_equal(ids[i], g.greedy[i]);
    s_down_and_check(&r);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_teardown(test_pipeline_dense_1_worker, s_teardown),
        cmocka_unit_test_teardown(test_pipeline_f16_cache, s_teardown),
        cmocka_unit_test_teardown(test_pipeline_q8_0_cache, s_teardown),
        cmocka_unit_test_teardown(test_pipeline_bench, s_teardown),
        cmocka_unit_test_teardown(test_pipeline_dense_2_workers, s_teardown),
        cmocka_unit_test_teardown(test_pipeline_hybrid_1_worker, s_teardown),
        cmocka_unit_test_teardown(test_pipeline_hybrid_2_workers, s_teardown),
        cmocka_unit_test_teardown(test_pipeline_hybrid_2_workers_zmq, s_teardown),
        cmocka_unit_test_teardown(test_pipeline_hybrid_handoff, s_teardown),
        cmocka_unit_test_teardown(test_pipeline_expert_crash_restart, s_teardown),
        cmocka_unit_test_teardown(test_pipeline_malformed_messages, s_teardown),
        cmocka_unit_test_teardown(test_pipeline_owner_gone, s_teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
