/* test_attn_seq: the attention worker's sequence slots (--parallel), spoken to directly over
 * attn.sock, without a coordinator. A minimal pipeline (storage daemon, one expert worker, the
 * attention worker with --parallel 3; a pool of a quarter of the experts, so that they stream)
 * runs a copy of the tiny hybrid Q4_0 model whose sliding window is 5 (so the KV rings are smaller
 * than the context and the keep rule bites). Every EvalRequest is mirrored on an in-process engine
 * with 3 sequences (engine_seq_keep + engine_eval_batch, or engine_eval for all_logits): the n_past
 * the worker answers and the logits it leaves in the activation region (at the offsets it answers)
 * or inline must equal the engine's bit for bit. Requests hold 2 and 3 slots, entries split across
 * micro-batches of 4, prefixes are kept with pos0, and malformed requests (repeated slot, slot out
 * of range, pos0 beyond n_past or past the sliding-window keep rule, bad token, all_logits with two
 * entries) are answered with an StpError and change nothing. Then a micro-batch that fails (the
 * expert worker killed: the worker gives up after 30 s) leaves each slot where its caches still
 * hold it, else at 0, and the next request (the worker restarted) matches the engine again. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <zmq.h>

#include "eval.pb-c.h"
#include "model/engine.h"
#include "model/kv_cache.h"
#include "model/model.h"
#include "msg/msg.h"
#include "msg/stage.h"
#include "shm/shm.h"
#include "stats.pb-c.h"
#include "th_gguf.h"
#include "th_pipeline.h"
#include "th_proc.h"

#define SRC_MODEL "tiny-hybrid-attn-q4_0-pure.gguf"
#define N_SEQ 3
#define N_CTX 64
#define N_UBATCH 4
#define WINDOW 5

/* The pipeline and the reference of the group. */
static struct {
    char dir[1024], model[1024], prefix[128];
    pid_t pid[3]; /* storage, expert-0, attn */
    void *zctx, *sock;
    shm_region act;
    model *m;
    engine *e;
    int V;
    uint64_t seq;
} s_g;

/* One entry of a request. */
typedef struct ent {
    int slot, pos0;
    const int32_t *tokens;
    int n;
    bool want;
} ent;

static void s_tokens(int32_t *t, int n, int V, uint32_t seed) {
    for (int i = 0; i < n; i++) {
        seed = seed * 1103515245u + 12345u;
        t[i] = (int32_t)((seed >> 8) % (uint32_t)V);
    }
}

static pid_t s_start(const char *name, const char *const *args) {
    char bin[1024], log[1100];
    th_bin_path(bin, sizeof bin, name);
    snprintf(log, sizeof log, "%s/%s.log", s_g.dir, name);
    char *argv[32] = {bin, "--run-dir", s_g.dir, "--model", s_g.model};
    int a = 5;
    for (int i = 0; args[i] && a < 31; i++)
        argv[a++] = (char *)args[i];
    argv[a] = NULL;
    pid_t p = th_spawn(argv, log, log);
    assert_true(p > 0);
    return p;
}

static void s_wait_ready(const char *stage, pid_t p) {
    char ready[1100];
    snprintf(ready, sizeof ready, "%s/%s.ready", s_g.dir, stage);
    if (!th_wait_file_has(ready, "", p, 120)) fail_msg("stage %s did not become ready", stage);
}

static int s_group_setup(void **st) {
    (void)st;
    memset(&s_g, 0, sizeof s_g);
    char src[1024];
    stp_err err = {0};
    /* the hybrid model with a window of 5: rings of 5 + 4 slots in a context of 64 */
    th_kv_edit kv[] = {
        {.key = "smallthinker.attention.sliding_window", .op = TH_KV_U32, .u32 = WINDOW}};
    th_copy_opts o = {.kv = kv, .n_kv = 1};
    th_tmp_path(s_g.model, sizeof s_g.model, "attn_seq_swa5.gguf");
    if (th_gguf_copy(th_data_path(src, sizeof src, SRC_MODEL), s_g.model, &o, &err))
        fail_msg("%s", err.msg);
    snprintf(s_g.dir, sizeof s_g.dir, "%s/attn-seq-%d", th_env("STP_TMP"), (int)getpid());
    mkdir(th_env("STP_TMP"), 0700);
    mkdir(s_g.dir, 0700);
    char p[1100], lay[1100];
    snprintf(p, sizeof p, "%s/shm_prefix", s_g.dir);
    snprintf(s_g.prefix, sizeof s_g.prefix, "stp-attnseq-%d", (int)getpid());
    FILE *f = fopen(p, "w");
    assert_non_null(f);
    fprintf(f, "%s\n", s_g.prefix);
    fclose(f);
    snprintf(lay, sizeof lay, "%s/layout", s_g.dir);
    mkdir(lay, 0700);
    /* a pool of 12 of the 48 experts: decisions, reads as they land and the decode prefetch of
     * several sequences are on the way of every layer */
    const char *sa[] = {"--workers",  "1", "--attn-threads", "1",  "--layout-dir", lay,
                        "--parallel", "3", "--pool-experts", "12", "--cache-type", "f32",
                        NULL};
    s_g.pid[0] = s_start("stpipe-storage-daemon", sa);
    s_wait_ready("storage", s_g.pid[0]);
    const char *ea[] = {"--index", "0", "--threads", "1", NULL};
    s_g.pid[1] = s_start("stpipe-expert-worker", ea);
    s_wait_ready("expert-0", s_g.pid[1]);
    const char *aa[] = {"--workers",  "1",  "--threads", "1", "--parallel",   "3",
                        "--ctx-size", "64", "--ubatch",  "4", "--cache-type", "f32",
                        NULL}; /* as the engine */
    s_g.pid[2] = s_start("stpipe-attn-worker", aa);
    s_wait_ready("attn", s_g.pid[2]);

    char ep[1200], name[200];
    s_g.zctx = zmq_ctx_new();
    if (msg_endpoint(ep, sizeof ep, s_g.dir, "attn", &err)) fail_msg("%s", err.msg);
    s_g.sock = msg_socket(s_g.zctx, ZMQ_DEALER, ep, false, &err);
    assert_non_null(s_g.sock);
    if (stage_shm_name(name, sizeof name, s_g.dir, "act", &err) ||
        shm_region_open(&s_g.act, name, false, &err))
        fail_msg("%s", err.msg);
    const act_header *ah = (const act_header *)s_g.act.base;
    assert_int_equal(ah->n_logits, N_SEQ);

    if (model_open(&s_g.m, s_g.model, &err)) fail_msg("%s", err.msg);
    assert_int_equal(model_config_layer_window(&s_g.m->cfg, 1), WINDOW);
    s_g.V = s_g.m->cfg.n_vocab;
    engine_params ep2 = {
        .n_threads = 1, .n_ctx = N_CTX, .n_ubatch = N_UBATCH, .n_seq = N_SEQ, .kv_type = KV_F32};
    if (engine_new(&s_g.e, s_g.m, &ep2, &err)) fail_msg("%s", err.msg);
    return 0;
}

static int s_group_teardown(void **st) {
    (void)st;
    msg_close(&s_g.sock);
    if (s_g.zctx) zmq_ctx_term(s_g.zctx);
    shm_region_close(&s_g.act);
    for (int i = 2; i >= 0; i--)
        if (s_g.pid[i] > 0) {
            kill(s_g.pid[i], SIGTERM);
            if (th_wait(s_g.pid[i], 10) < 0) fprintf(stderr, "stage %d ignored SIGTERM\n", i);
        }
    char cmd[1400];
    snprintf(cmd, sizeof cmd, "rm -rf '%s' /dev/shm/%s-*", s_g.dir, s_g.prefix);
    if (system(cmd)) fprintf(stderr, "cleanup failed: %s\n", cmd);
    engine_destroy(&s_g.e);
    model_close(&s_g.m);
    unlink(s_g.model);
    return 0;
}

/* Sends the request and returns the reply (or error) message; fails the test after 60 s. */
static Stp__EvalMsg *s_send(const ent *es, int n, bool all) {
    Stp__EvalSeq sq[8], *sp[8];
    assert_true(n <= 8);
    for (int i = 0; i < n; i++) {
        stp__eval_seq__init(&sq[i]);
        sq[i].slot = (uint32_t)es[i].slot;
        sq[i].pos0 = es[i].pos0;
        sq[i].n_tokens = (size_t)es[i].n;
        sq[i].tokens = (int32_t *)es[i].tokens;
        sq[i].want_logits = es[i].want;
        sp[i] = &sq[i];
    }
    Stp__EvalRequest q;
    stp__eval_request__init(&q);
    q.seq = ++s_g.seq;
    q.n_seqs = (size_t)n;
    q.seqs = sp;
    q.all_logits = all;
    Stp__EvalMsg m;
    stp__eval_msg__init(&m);
    m.version = STP_PROTO_VERSION;
    m.body_case = STP__EVAL_MSG__BODY_REQUEST;
    m.request = &q;
    stp_err err = {0};
    if (msg_send(s_g.sock, NULL, 0, &m.base, &err)) fail_msg("send: %s", err.msg);
    for (double t0 = th_now(); th_now() - t0 < 60;) {
        bool rd;
        if (!msg_poll(&s_g.sock, 1, &rd, 500) || !rd) continue;
        msg_in in;
        if (msg_recv(s_g.sock, false, &in, &err) <= 0) continue;
        Stp__EvalMsg *r = stp__eval_msg__unpack(NULL, in.len, in.data);
        msg_in_free(&in);
        assert_non_null(r);
        uint64_t seq = r->body_case == STP__EVAL_MSG__BODY_REPLY   ? r->reply->seq
                       : r->body_case == STP__EVAL_MSG__BODY_ERROR ? r->error->seq
                                                                   : 0;
        if (seq == q.seq) return r;
        stp__eval_msg__free_unpacked(r, NULL);
    }
    fail_msg("no answer to eval %llu in 60 s", (unsigned long long)q.seq);
    return NULL;
}

/* The request on both sides; the worker's answer must be the engine's, bit for bit. */
static void s_same(const ent *es, int n, const char *what) {
    const int V = s_g.V;
    engine_seq_eval b[8];
    float *lg = calloc((size_t)n * V, sizeof(float));
    assert_non_null(lg);
    for (int i = 0; i < n; i++) {
        assert_int_equal(engine_seq_keep(s_g.e, es[i].slot, es[i].pos0), es[i].pos0);
        b[i] = (engine_seq_eval){es[i].slot, es[i].tokens, es[i].n, lg + (size_t)i * V, 0, 0};
    }
    stp_err err = {0};
    if (engine_eval_batch(s_g.e, b, n, &err)) fail_msg("%s: engine: %s", what, err.msg);
    Stp__EvalMsg *r = s_send(es, n, false);
    if (r->body_case != STP__EVAL_MSG__BODY_REPLY)
        fail_msg("%s: error %d: %s", what,
                 r->body_case == STP__EVAL_MSG__BODY_ERROR ? r->error->code : -1,
                 r->body_case == STP__EVAL_MSG__BODY_ERROR ? r->error->what : "?");
    const Stp__EvalReply *rp = r->reply;
    const act_header *ah = (const act_header *)s_g.act.base;
    assert_int_equal(rp->n_n_past, (size_t)n);
    assert_int_equal(rp->n_logits_offset, (size_t)n);
    assert_int_equal(rp->n_vocab, V);
    assert_int_equal(rp->act_epoch, ah->epoch);
    for (int i = 0; i < n; i++) {
        assert_int_equal(rp->n_past[i], engine_seq_n_past(s_g.e, es[i].slot));
        if (!es[i].want) {
            assert_int_equal(rp->logits_offset[i], 0);
            continue;
        }
        assert_int_equal(rp->logits_offset[i],
                         ah->off_logits + (uint64_t)es[i].slot * V * sizeof(float));
        const float *got = (const float *)(s_g.act.base + rp->logits_offset[i]);
        if (memcmp(got, lg + (size_t)i * V, (size_t)V * sizeof(float))) {
            int k = 0;
            while (got[k] == lg[(size_t)i * V + k])
                k++;
            fail_msg("%s: entry %d (slot %d): logit %d is %.9g, the engine's %.9g", what, i,
                     es[i].slot, k, got[k], lg[(size_t)i * V + k]);
        }
    }
    stp__eval_msg__free_unpacked(r, NULL);
    free(lg);
}

/* A Ping is answered with the worker's shape: slots, positions per slot, micro-batch. */
static void test_attn_seq_pong_says_the_slots(void **st) {
    (void)st;
    Stp__Ping pg;
    stp__ping__init(&pg);
    pg.nonce = 77;
    Stp__EvalMsg m;
    stp__eval_msg__init(&m);
    m.version = STP_PROTO_VERSION;
    m.body_case = STP__EVAL_MSG__BODY_PING;
    m.ping = &pg;
    stp_err err = {0};
    if (msg_send(s_g.sock, NULL, 0, &m.base, &err)) fail_msg("send: %s", err.msg);
    for (double t0 = th_now(); th_now() - t0 < 10;) {
        bool rd;
        msg_in in;
        if (!msg_poll(&s_g.sock, 1, &rd, 500) || !rd || msg_recv(s_g.sock, false, &in, &err) <= 0)
            continue;
        Stp__EvalMsg *r = stp__eval_msg__unpack(NULL, in.len, in.data);
        msg_in_free(&in);
        assert_non_null(r);
        if (r->body_case == STP__EVAL_MSG__BODY_PONG && r->pong->nonce == 77) {
            assert_int_equal(r->pong->pid, s_g.pid[2]);
            assert_int_equal(r->pong->n_seq, N_SEQ);
            assert_int_equal(r->pong->n_ctx, N_CTX);
            assert_int_equal(r->pong->n_ubatch, N_UBATCH);
            stp__eval_msg__free_unpacked(r, NULL);
            return;
        }
        stp__eval_msg__free_unpacked(r, NULL);
    }
    fail_msg("no Pong in 10 s");
}

/* The request must be refused with code and a message containing needle. */
static void s_refused(const ent *es, int n, bool all, int code, const char *needle) {
    Stp__EvalMsg *r = s_send(es, n, all);
    if (r->body_case != STP__EVAL_MSG__BODY_ERROR) fail_msg("'%s' was not refused", needle);
    if (r->error->code != code || !strstr(r->error->what, needle))
        fail_msg("refused with %d '%s', expected %d '%s'", r->error->code, r->error->what, code,
                 needle);
    stp__eval_msg__free_unpacked(r, NULL);
}

/* The attention worker's counter from its next stats report (0: none in 3 s). */
static uint64_t s_stat(const char *counter) {
    void *s = th_stats_sub(s_g.zctx, s_g.dir, "stats-attn");
    Stp__StatsReport *r = th_stats_next(s, 3000);
    const long long v = r ? th_stats_counter(r, counter) : -1;
    if (r) stp__stats_report__free_unpacked(r, NULL);
    msg_close(&s);
    return v < 0 ? 0 : (uint64_t)v;
}

/* counter reaches want within a few reports (they come every 500 ms) */
static void s_stat_is(const char *counter, uint64_t want) {
    uint64_t v = 0;
    for (int i = 0; i < 10 && v != want; i++)
        v = s_stat(counter);
    if (v != want)
        fail_msg("attn-worker counter %s is %llu, expected %llu", counter, (unsigned long long)v,
                 (unsigned long long)want);
}

/* Two and three slots per request, split over micro-batches, decode steps, kept prefixes, the
 * sliding-window keep rule, all_logits, and errors that change nothing: always the engine's
 * bits. */
static void test_attn_seq_equals_engine_batch(void **st) {
    (void)st;
    const int V = s_g.V;
    int32_t ta[16], tb[16], tc[16], td[16], tl[N_CTX], bad[2] = {1, V};
    s_tokens(ta, 16, V, 1);
    s_tokens(tb, 16, V, 2);
    s_tokens(tc, 16, V, 3);
    s_tokens(td, 16, V, 4);
    s_tokens(tl, N_CTX, V, 5);

    /* prompts of 7 and 5 tokens in micro-batches [0:4] [0:3 2:1] [2:4] */
    ent r1[] = {{0, 0, ta, 7, true}, {2, 0, tb, 5, true}};
    s_same(r1, 2, "two prompts");
    /* a decode step of both, in the other order */
    ent r2[] = {{2, 5, tb + 5, 1, true}, {0, 7, ta + 7, 1, true}};
    s_same(r2, 2, "decode of two");
    /* a third sequence without logits, and slot 0 keeping 6 of its 8 positions */
    ent r3[] = {{1, 0, tc, 3, false}, {0, 6, td, 2, true}, {2, 6, tb + 6, 1, true}};
    s_same(r3, 3, "three slots, a kept prefix");

    /* refused, changing nothing */
    ent e1[] = {{0, 8, ta, 1, true}, {0, 8, tb, 1, true}};
    s_refused(e1, 2, false, STP_EINVAL, "appears twice");
    ent e2[] = {{0, 8, ta, 1, true}, {3, 0, tb, 1, true}};
    s_refused(e2, 2, false, STP_EINVAL, "outside 0..2");
    ent e3[] = {{1, 5, tc, 1, true}};
    s_refused(e3, 1, false, STP_ERANGE, "position 5 is outside 0..3");
    ent e4[] = {{1, 3, bad, 2, true}};
    s_refused(e4, 1, false, STP_ERANGE, "token id");
    ent e5[] = {{1, 3, tc, 1, true}, {2, 7, tb, 1, true}};
    s_refused(e5, 2, true, STP_EINVAL, "all_logits");
    ent e6[] = {{1, 3, tc, 0, true}};
    s_refused(e6, 1, false, STP_EINVAL, "0 tokens");
    ent e7[] = {{1, 3, tl, N_CTX - 2, true}};
    s_refused(e7, 1, false, STP_ERANGE, "the context is 64");

    /* slot 2 grows past its rings (5 + 4 slots): an early prefix can no longer be kept, a late
     * one can (position p looks back to p - 4) */
    ent r4[] = {{2, 7, tc, 10, true}, {1, 3, td, 1, true}};
    s_same(r4, 2, "slot 2 past its rings");
    ent e8[] = {{2, 3, ta, 1, true}};
    s_refused(e8, 1, false, STP_ERANGE, "cannot be kept");
    ent r5[] = {{2, 13, ta, 2, true}, {0, 8, tb, 3, true}};
    s_same(r5, 2, "a late prefix kept past the rings");
    /* a restart at 0 is always allowed */
    ent r6[] = {{2, 0, td, 6, true}};
    s_same(r6, 1, "slot 2 restarted");

    /* all_logits of one entry: every row inline, the last one also in the slot's row */
    ent r7[] = {{0, 11, tc, 6, true}};
    float *all = calloc((size_t)6 * V, sizeof(float));
    assert_non_null(all);
    assert_int_equal(engine_seq_keep(s_g.e, 0, 11), 11);
    stp_err err = {0};
    if (engine_eval(s_g.e, tc, 6, all, true, &err)) fail_msg("%s", err.msg);
    Stp__EvalMsg *r = s_send(r7, 1, true);
    assert_int_equal(r->body_case, STP__EVAL_MSG__BODY_REPLY);
    assert_int_equal(r->reply->n_past[0], 17);
    assert_int_equal(r->reply->logits.len, (size_t)6 * V * sizeof(float));
    assert_memory_equal(r->reply->logits.data, all, (size_t)6 * V * sizeof(float));
    assert_memory_equal(s_g.act.base + r->reply->logits_offset[0], all + (size_t)5 * V,
                        (size_t)V * sizeof(float));
    stp__eval_msg__free_unpacked(r, NULL);
    free(all);

    /* and everything still agrees */
    ent r8[] = {{1, 4, ta, 5, true}, {2, 6, tb, 1, true}, {0, 17, td, 2, true}};
    s_same(r8, 3, "after the errors");

    /* statistics: every token evaluated; decode = the one request of a token per entry */
    s_stat_is("tokens", 12 + 2 + 6 + 11 + 5 + 6 + 6 + 8);
    s_stat_is("msg.eval", 8);
    s_stat_is("eval.seqs", 2 + 2 + 3 + 2 + 2 + 1 + 1 + 3);
    s_stat_is("decode.tokens", 2);
    /* the refusals, by kind */
    s_stat_is("bad.eval_seq", 3);
    s_stat_is("bad.eval_range", 4);
    s_stat_is("bad.eval_token", 1);
    s_stat_is("eval.errors", 0);
}

/* A micro-batch that fails (the expert worker is gone: the worker gives up after 30 s): the
 * request's slots go back to their n_past from before it where the caches still hold it (an
 * append, or a slot not reached), else to 0 (a slot whose kept prefix was overwritten); the
 * others stay. Runs after test_attn_seq_equals_engine_batch (slots at 19, 9, 7). */
static void test_attn_seq_failed_ubatch_rolls_back(void **st) {
    (void)st;
    const int V = s_g.V;
    int32_t t[8];
    s_tokens(t, 8, V, 6);
    assert_int_equal(engine_seq_n_past(s_g.e, 0), 19);
    assert_int_equal(engine_seq_n_past(s_g.e, 1), 9);
    assert_int_equal(engine_seq_n_past(s_g.e, 2), 7);
    /* micro-batches [0:3 1:1] [1:1 2:3] [2:1]: the first fails, having written slots 0 and 1 */
    ent f[] = {{0, 19, t, 3, true}, {1, 5, t, 2, true}, {2, 7, t, 4, true}};
    kill(s_g.pid[1], SIGKILL);
    th_wait(s_g.pid[1], 10);
    Stp__EvalMsg *r = s_send(f, 3, false);
    /* the expert worker comes back, as stpipe-up's supervisor restarts it */
    char ready[1100];
    snprintf(ready, sizeof ready, "%s/expert-0.ready", s_g.dir);
    unlink(ready);
    const char *ea[] = {"--index", "0", "--threads", "1", NULL};
    s_g.pid[1] = s_start("stpipe-expert-worker", ea);
    s_wait_ready("expert-0", s_g.pid[1]);
    assert_int_equal(r->body_case, STP__EVAL_MSG__BODY_ERROR);
    assert_non_null(strstr(r->error->what, "did not answer"));
    stp__eval_msg__free_unpacked(r, NULL);
    /* slot 1 kept 5 of 9 and was overwritten from there: 0 */
    ent e1[] = {{1, 1, t, 1, true}};
    s_refused(e1, 1, false, STP_ERANGE, "position 1 is outside 0..0");
    assert_int_equal(engine_seq_keep(s_g.e, 1, 0), 0);
    /* slot 0 appended at 19 (its rings still hold what 19 looks back to), slot 2 was not
     * reached: both where they were */
    ent ok[] = {{0, 19, t + 3, 2, true}, {2, 7, t + 5, 1, true}, {1, 0, t, 3, true}};
    s_same(ok, 3, "after a failed micro-batch");
    s_stat_is("eval.errors", 1);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_attn_seq_pong_says_the_slots),
        cmocka_unit_test(test_attn_seq_equals_engine_batch),
        cmocka_unit_test(test_attn_seq_failed_ubatch_rolls_back),
    };
    return cmocka_run_group_tests(tests, s_group_setup, s_group_teardown);
}
