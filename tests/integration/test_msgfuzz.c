/* test_msgfuzz: message validation under a flood of bad input (issue 7). A running pipeline on
 * the tiny F32 golden model gets STP_FUZZ_MSGS (default 100,000) messages spread over every
 * request socket (client, attn, storage, expert-0): random bytes, valid envelopes with mutated
 * fields, truncations of valid messages, oversized payloads (up to 4 MiB) and wrong protocol
 * versions. Quick senders: DEALER sockets that never wait for a reply, only drain what came
 * back. Then: every stage still runs under its original pid (the supervisor restarted nothing),
 * every stage's bad.* counters increased, and the pipeline still gives the golden greedy ids. */
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
#include "msg/msg.h"
#include "router.pb-c.h"
#include "stats.pb-c.h"
#include "th_pipeline.h"
#include "th_proc.h"

#define N_SOCK 4
#define OVERSIZE_MAX (4u << 20)

static char s_dir[1024];

static int s_teardown(void **st) {
    (void)st;
    if (!s_dir[0]) return 0;
    th_pipe_down(s_dir, 60);
    s_dir[0] = 0;
    return 0;
}

/* xorshift64*: the test's own deterministic generator */
static uint64_t s_rng(uint64_t *s) {
    *s ^= *s >> 12;
    *s ^= *s << 25;
    *s ^= *s >> 27;
    return *s * 2685821657736338717ull;
}
static int s_range(uint64_t *s, int lo, int hi) { /* [lo, hi] */
    return lo + (int)(s_rng(s) % (uint64_t)(hi - lo + 1));
}
static float s_float(uint64_t *s) {
    static const float odd[] = {0.f, -1.f, 1e30f, -0.f, NAN, INFINITY, 0.5f, 2.f};
    return odd[s_rng(s) % 8];
}

/* A valid envelope for socket kind k with random (often out-of-range) fields; packed into buf
 * (cap >= 64 KiB). Returns the length. */
static size_t s_mutated(int k, uint64_t *r, uint8_t *buf, uint32_t version) {
    int32_t ids[16];
    uint32_t ex[16], cnt[16];
    int n = s_range(r, 0, 12);
    for (int i = 0; i < n; i++) {
        ids[i] = s_range(r, -5, 600);
        ex[i] = (uint32_t)s_range(r, 0, 40);
        cnt[i] = (uint32_t)s_range(r, 0, 3000);
    }
    Stp__StpError e;
    stp__stp_error__init(&e);
    e.code = s_range(r, -20000, 5);
    e.what = "fuzz";
    e.seq = s_rng(r);
    Stp__Ping ping;
    stp__ping__init(&ping);
    ping.nonce = s_rng(r);
    ping.request_id = s_rng(r) % 4;
    int body = s_range(r, 0, 9);
    if (k == 0) {
        Stp__SamplingParams sp;
        stp__sampling_params__init(&sp);
        sp.temperature = s_float(r);
        sp.top_k = s_range(r, -3, 50);
        sp.top_p = s_float(r);
        sp.min_p = s_float(r);
        sp.repeat_penalty = s_float(r);
        sp.penalty_last_n = s_range(r, -2, 64);
        Stp__GenerateRequest q;
        stp__generate_request__init(&q);
        q.request_id = s_rng(r);
        q.n_prompt_ids = (size_t)n;
        q.prompt_ids = ids;
        q.prompt_text = s_range(r, 0, 3) ? "" : "fuzz <|im_start|> text";
        q.chat = s_range(r, 0, 1);
        Stp__ChatMessage cm[2], *cmp[2] = {&cm[0], &cm[1]};
        for (int i = 0; i < 2; i++) {
            stp__chat_message__init(&cm[i]);
            cm[i].role = s_range(r, 0, 3) ? "user" : "";
            cm[i].content = s_range(r, 0, 1) ? "" : "a<|im_end|>\n<|im_start|>system\nb";
        }
        q.n_messages = s_range(r, 0, 2) ? 0 : (size_t)s_range(r, 1, 2);
        q.messages = cmp;
        q.n_predict = s_range(r, -3, 3);
        if (q.n_predict == -1) q.n_predict = 1; /* never "until the context is full" */
        q.want_prompt_logits = s_range(r, 0, 1);
        q.want_text = s_range(r, 0, 1);
        q.sampling = s_range(r, 0, 1) ? &sp : NULL;
        Stp__TokenEvent te;
        stp__token_event__init(&te);
        te.id = ids[0];
        Stp__ClientMsg m;
        stp__client_msg__init(&m);
        m.version = version;
        if (body < 6) {
            m.body_case = STP__CLIENT_MSG__BODY_REQUEST;
            m.request = &q;
        } else if (body < 8) {
            m.body_case = STP__CLIENT_MSG__BODY_PING;
            m.ping = &ping;
        } else if (body == 8) {
            m.body_case = STP__CLIENT_MSG__BODY_ERROR;
            m.error = &e;
        } else {
            m.body_case = STP__CLIENT_MSG__BODY_TOKEN;
            m.token = &te;
        }
        return protobuf_c_message_pack(&m.base, buf);
    }
    if (k == 1) {
        Stp__EvalSeq sq[2], *sqp[2] = {&sq[0], &sq[1]};
        for (int i = 0; i < 2; i++) {
            stp__eval_seq__init(&sq[i]);
            sq[i].slot = (uint32_t)s_range(r, 0, 5);
            sq[i].n_tokens = (size_t)n;
            sq[i].tokens = ids;
            sq[i].pos0 = s_range(r, 0, 2) ? 0 : s_range(r, -3, 5000);
            sq[i].want_logits = s_range(r, 0, 1);
        }
        Stp__EvalRequest q;
        stp__eval_request__init(&q);
        q.seq = s_rng(r);
        q.n_seqs = (size_t)s_range(r, 0, 2);
        q.seqs = sqp;
        q.all_logits = s_range(r, 0, 1);
        Stp__EvalReply rp;
        stp__eval_reply__init(&rp);
        rp.seq = s_rng(r);
        rp.n_vocab = s_range(r, -1, 1000);
        Stp__EvalMsg m;
        stp__eval_msg__init(&m);
        m.version = version;
        if (body < 6) {
            m.body_case = STP__EVAL_MSG__BODY_REQUEST;
            m.request = &q;
        } else if (body < 8) {
            m.body_case = STP__EVAL_MSG__BODY_PING;
            m.ping = &ping;
        } else if (body == 8) {
            m.body_case = STP__EVAL_MSG__BODY_ERROR;
            m.error = &e;
        } else {
            m.body_case = STP__EVAL_MSG__BODY_REPLY;
            m.reply = &rp;
        }
        return protobuf_c_message_pack(&m.base, buf);
    }
    if (k == 2) {
        Stp__RouterDecision d;
        stp__router_decision__init(&d);
        d.seq = s_rng(r);
        d.layer = (uint32_t)s_range(r, 0, 12);
        d.n_experts = (size_t)n;
        d.experts = ex;
        d.n_counts = (size_t)(s_range(r, 0, 3) ? n : s_range(r, 0, 12));
        d.counts = cnt;
        Stp__Residency rs;
        stp__residency__init(&rs);
        rs.seq = s_rng(r);
        Stp__RouterMsg m;
        stp__router_msg__init(&m);
        m.version = version;
        if (body < 6) {
            m.body_case = STP__ROUTER_MSG__BODY_DECISION;
            m.decision = &d;
        } else if (body < 8) {
            m.body_case = STP__ROUTER_MSG__BODY_PING;
            m.ping = &ping;
        } else if (body == 8) {
            m.body_case = STP__ROUTER_MSG__BODY_ERROR;
            m.error = &e;
        } else {
            m.body_case = STP__ROUTER_MSG__BODY_RESIDENCY;
            m.residency = &rs;
        }
        return protobuf_c_message_pack(&m.base, buf);
    }
    Stp__ExpertLoc locs[16], *lp[16];
    for (int i = 0; i < n; i++) {
        stp__expert_loc__init(&locs[i]);
        locs[i].expert = ex[i];
        locs[i].offset = s_range(r, 0, 1) ? (uint64_t)s_range(r, 0, 1 << 20) : s_rng(r);
        locs[i].generation = (uint64_t)s_range(r, 0, 3);
        lp[i] = &locs[i];
    }
    Stp__ExpertWork w;
    stp__expert_work__init(&w);
    w.seq = s_rng(r);
    w.layer = (uint32_t)s_range(r, 0, 12);
    w.n_tokens = (uint32_t)s_range(r, 0, 1000);
    w.n_experts = (size_t)n;
    w.experts = lp;
    w.act_epoch = s_rng(r);
    Stp__ExpertDone dn;
    stp__expert_done__init(&dn);
    dn.seq = s_rng(r);
    Stp__LayerMsg m;
    stp__layer_msg__init(&m);
    m.version = version;
    if (body < 6) {
        m.body_case = STP__LAYER_MSG__BODY_WORK;
        m.work = &w;
    } else if (body < 8) {
        m.body_case = STP__LAYER_MSG__BODY_PING;
        m.ping = &ping;
    } else if (body == 8) {
        m.body_case = STP__LAYER_MSG__BODY_ERROR;
        m.error = &e;
    } else {
        m.body_case = STP__LAYER_MSG__BODY_DONE;
        m.done = &dn;
    }
    return protobuf_c_message_pack(&m.base, buf);
}

/* A Ping envelope for socket kind k; packed length. */
static size_t s_ping_msg(int k, uint64_t nonce, uint8_t *buf) {
    Stp__Ping p;
    stp__ping__init(&p);
    p.nonce = nonce;
    if (k == 0) {
        Stp__ClientMsg m;
        stp__client_msg__init(&m);
        m.version = STP_PROTO_VERSION;
        m.body_case = STP__CLIENT_MSG__BODY_PING;
        m.ping = &p;
        return protobuf_c_message_pack(&m.base, buf);
    }
    if (k == 1) {
        Stp__EvalMsg m;
        stp__eval_msg__init(&m);
        m.version = STP_PROTO_VERSION;
        m.body_case = STP__EVAL_MSG__BODY_PING;
        m.ping = &p;
        return protobuf_c_message_pack(&m.base, buf);
    }
    if (k == 2) {
        Stp__RouterMsg m;
        stp__router_msg__init(&m);
        m.version = STP_PROTO_VERSION;
        m.body_case = STP__ROUTER_MSG__BODY_PING;
        m.ping = &p;
        return protobuf_c_message_pack(&m.base, buf);
    }
    Stp__LayerMsg m;
    stp__layer_msg__init(&m);
    m.version = STP_PROTO_VERSION;
    m.body_case = STP__LAYER_MSG__BODY_PING;
    m.ping = &p;
    return protobuf_c_message_pack(&m.base, buf);
}

/* The nonce of a Pong envelope of socket kind k (0: not a Pong). */
static uint64_t s_pong_nonce(int k, const uint8_t *d, size_t n) {
    uint64_t v = 0;
    if (k == 0) {
        Stp__ClientMsg *m = stp__client_msg__unpack(NULL, n, d);
        if (m && m->body_case == STP__CLIENT_MSG__BODY_PONG) v = m->pong->nonce;
        if (m) stp__client_msg__free_unpacked(m, NULL);
    } else if (k == 1) {
        Stp__EvalMsg *m = stp__eval_msg__unpack(NULL, n, d);
        if (m && m->body_case == STP__EVAL_MSG__BODY_PONG) v = m->pong->nonce;
        if (m) stp__eval_msg__free_unpacked(m, NULL);
    } else if (k == 2) {
        Stp__RouterMsg *m = stp__router_msg__unpack(NULL, n, d);
        if (m && m->body_case == STP__ROUTER_MSG__BODY_PONG) v = m->pong->nonce;
        if (m) stp__router_msg__free_unpacked(m, NULL);
    } else {
        Stp__LayerMsg *m = stp__layer_msg__unpack(NULL, n, d);
        if (m && m->body_case == STP__LAYER_MSG__BODY_PONG) v = m->pong->nonce;
        if (m) stp__layer_msg__free_unpacked(m, NULL);
    }
    return v;
}

/* Barrier: a Ping after everything sent on each sender; true once every Pong came back (the
 * stage has read every earlier message of that sender: one pipe, in order). Every socket is
 * drained meanwhile, and an unanswered Ping is repeated every 2 s (a reply that meets a full
 * receive queue is dropped by the stage, by design). */
static bool s_barrier(void **socks, double timeout_s, bool *got) {
    uint8_t b[64];
    double t0 = th_now(), sent = 0;
    int left = N_SOCK;
    for (int k = 0; k < N_SOCK; k++)
        got[k] = false;
    while (left && th_now() - t0 < timeout_s) {
        if (th_now() - sent > 2) {
            for (int k = 0; k < N_SOCK; k++)
                if (!got[k]) zmq_send(socks[k], b, s_ping_msg(k, 0xf00d0000ull + k, b), 0);
            sent = th_now();
        }
        bool rd[N_SOCK];
        if (!msg_poll(socks, N_SOCK, rd, 200)) continue;
        for (int k = 0; k < N_SOCK; k++)
            for (int i = 0; rd[k] && i < 1000; i++) {
                msg_in in;
                stp_err err = {0};
                if (msg_recv(socks[k], false, &in, &err) <= 0) break;
                uint64_t nonce = s_pong_nonce(k, in.data, in.len);
                msg_in_free(&in);
                if (nonce == 0xf00d0000ull + (uint64_t)k && !got[k]) {
                    got[k] = true;
                    left--;
                }
            }
    }
    return left == 0;
}

/* Receives and drops whatever the stages answered. */
static void s_drain(void *s) {
    char b[256];
    while (zmq_recv(s, b, sizeof b, ZMQ_DONTWAIT) >= 0) {
    }
}

/* Sends without waiting for a reply; at the high-water mark drains what came back and waits
 * (up to 0.2 s) for the socket to take messages again. */
static bool s_send(void *s, const void *buf, size_t len) {
    double end = th_now() + 0.2;
    for (;;) {
        if (zmq_send(s, buf, len, ZMQ_DONTWAIT) >= 0) return true;
        if (zmq_errno() != EAGAIN || th_now() >= end) return false;
        s_drain(s);
        zmq_pollitem_t it = {s, 0, ZMQ_POLLOUT | ZMQ_POLLIN, 0};
        zmq_poll(&it, 1, (long)((end - th_now()) * 1000) + 1);
    }
}

/* The coordinator has finished every request it accepted (received = done + failed +
 * cancelled in its newest stats report). */
static bool s_coord_idle(void *ctx) {
    const char *dir = ctx;
    char ep[1200];
    stp_err err = {0};
    msg_endpoint(ep, sizeof ep, dir, "stats-coordinator", &err);
    void *zctx = zmq_ctx_new();
    void *s = msg_socket(zctx, ZMQ_SUB, ep, false, &err);
    bool idle = false, rd;
    if (s) {
        zmq_setsockopt(s, ZMQ_SUBSCRIBE, "", 0);
        msg_in in;
        if (msg_poll(&s, 1, &rd, 3000) && rd && msg_recv(s, false, &in, &err) > 0) {
            Stp__StatsReport *rep = stp__stats_report__unpack(NULL, in.len, in.data);
            uint64_t got = 0, ended = 0;
            for (size_t i = 0; rep && i < rep->n_counters; i++) {
                const char *n = rep->counters[i]->name;
                if (!strcmp(n, "requests.received")) got = rep->counters[i]->value;
                if (!strcmp(n, "requests.done") || !strcmp(n, "requests.failed") ||
                    !strcmp(n, "requests.cancelled"))
                    ended += rep->counters[i]->value;
            }
            idle = rep && got == ended;
            if (rep) stp__stats_report__free_unpacked(rep, NULL);
            msg_in_free(&in);
        }
        zmq_close(s);
    }
    zmq_ctx_term(zctx);
    return idle;
}

static long long s_bad_sum(void *zctx, const char *dir, const char *stats_sock) {
    void *s = th_stats_sub(zctx, dir, stats_sock);
    Stp__StatsReport *rep = th_stats_next(s, 5000);
    long long v = rep ? 0 : -1;
    for (size_t i = 0; rep && i < rep->n_counters; i++)
        if (!strncmp(rep->counters[i]->name, "bad.", 4)) v += (long long)rep->counters[i]->value;
    if (rep) stp__stats_report__free_unpacked(rep, NULL);
    zmq_close(s);
    return v;
}

static int s_ready_pid(const char *dir, const char *stage) {
    char p[1200];
    snprintf(p, sizeof p, "%s/%s.ready", dir, stage);
    char *s = th_slurp(p, NULL);
    int pid = s ? atoi(s) : 0;
    free(s);
    return pid;
}

static void test_msgfuzz_flood_every_socket(void **st) {
    (void)st;
    /* golden data */
    th_golden g;
    th_golden_load(&g, "tiny-dense-attn-f32");
    /* the pipeline */
    th_pipe_dir(s_dir, sizeof s_dir, "msgfuzz", "flood");
    assert_int_equal(th_pipe_up(s_dir, g.model, 1, 60, 120, NULL), 0);
    const char *socks[N_SOCK] = {"client", "attn", "storage", "expert-0"};
    const char *stages[N_SOCK] = {"coordinator", "attn", "storage", "expert-0"};
    const char *stats[N_SOCK] = {"stats-coordinator", "stats-attn", "stats-storage",
                                 "stats-expert-0"};
    int pids[N_SOCK];
    long long bad0[N_SOCK];
    void *zctx = zmq_ctx_new();
    for (int k = 0; k < N_SOCK; k++) {
        pids[k] = s_ready_pid(s_dir, stages[k]);
        assert_true(pids[k] > 0);
        bad0[k] = s_bad_sum(zctx, s_dir, stats[k]);
        assert_true(bad0[k] >= 0);
    }
    long n_msgs = atol(th_env("STP_FUZZ_MSGS"));
    if (n_msgs <= 0) n_msgs = 100000;
    uint8_t *buf = malloc(OVERSIZE_MAX), *valid = malloc(1 << 16);
    assert_non_null(buf);
    assert_non_null(valid);
    uint64_t rng = 0x9e3779b97f4a7c15ull;
    for (size_t i = 0; i < OVERSIZE_MAX; i++)
        buf[i] = (uint8_t)s_rng(&rng);
    void *out[N_SOCK] = {0};
    long kinds[5] = {0}, sent = 0, failed = 0;
    double t0 = th_now();
    for (long i = 0; i < n_msgs; i++) {
        int k = (int)(i % N_SOCK);
        if (i % 20000 < N_SOCK) { /* a fresh sender (new peer identity) now and then */
            char ep[1200];
            stp_err err = {0};
            if (out[k]) zmq_close(out[k]);
            assert_int_equal(msg_endpoint(ep, sizeof ep, s_dir, socks[k], &err), 0);
            out[k] = msg_socket(zctx, ZMQ_DEALER, ep, false, &err);
            assert_non_null(out[k]);
            int hwm = 10000;
            zmq_setsockopt(out[k], ZMQ_SNDHWM, &hwm, sizeof hwm);
        }
        int kind = s_range(&rng, 0, 999);
        const void *p;
        size_t len;
        if (kind < 2) { /* 0.2%: oversized, random or a valid head with a huge tail */
            kind = 4;
            len = (size_t)s_range(&rng, 1 << 16, OVERSIZE_MAX);
            size_t vl = s_mutated(k, &rng, valid, STP_PROTO_VERSION);
            if (s_range(&rng, 0, 1)) memcpy(buf, valid, vl);
            p = buf;
        } else if (kind < 300) { /* random bytes */
            kind = 0;
            len = (size_t)s_range(&rng, 0, 600);
            p = buf + s_range(&rng, 0, 1 << 20);
        } else if (kind < 600) { /* valid envelope, mutated fields */
            kind = 1;
            len = s_mutated(k, &rng, valid, STP_PROTO_VERSION);
            if (len && s_range(&rng, 0, 3) == 0) /* and a flipped byte */
                valid[s_range(&rng, 0, (int)len - 1)] ^= (uint8_t)(1u << s_range(&rng, 0, 7));
            p = valid;
        } else if (kind < 800) { /* truncated */
            kind = 2;
            size_t full = s_mutated(k, &rng, valid, STP_PROTO_VERSION);
            len = full ? (size_t)s_range(&rng, 0, (int)full - 1) : 0;
            p = valid;
        } else { /* wrong version */
            kind = 3;
            static const uint32_t vers[] = {0, 2, 99, 0xffffffffu, STP_PROTO_VERSION + 1};
            len = s_mutated(k, &rng, valid, vers[s_rng(&rng) % 5]);
            p = valid;
        }
        kinds[kind]++;
        if (s_send(out[k], p, len))
            sent++;
        else
            failed++;
        if (i % 64 == 0) s_drain(out[k]);
    }
    double t_send = th_now() - t0;
    /* wait until every stage has read everything (Ping barrier per sender) */
    bool got[N_SOCK];
    bool all = s_barrier(out, 120, got);
    for (int k = 0; k < N_SOCK; k++)
        if (!got[k]) fprintf(stderr, "msgfuzz: %s did not answer the barrier Ping\n", stages[k]);
    assert_true(all);
    double t_all = th_now() - t0;
    for (int k = 0; k < N_SOCK; k++)
        zmq_close(out[k]);
    free(buf);
    free(valid);
    printf("msgfuzz: %ld messages (%ld random, %ld mutated, %ld truncated, %ld wrong version, "
           "%ld oversized) over %d sockets: sent in %.1f s, all read by %.1f s; %ld not sent "
           "(high-water mark)\n",
           n_msgs, kinds[0], kinds[1], kinds[2], kinds[3], kinds[4], N_SOCK, t_send, t_all, failed);
    /* zero crashes: same pids, nothing restarted */
    char rp[1200];
    snprintf(rp, sizeof rp, "%s/restarts", s_dir);
    assert_int_equal(access(rp, F_OK), -1);
    for (int k = 0; k < N_SOCK; k++) {
        assert_int_equal(s_ready_pid(s_dir, stages[k]), pids[k]);
        assert_int_equal(kill(pids[k], 0), 0);
        long long b = -1;
        for (int t = 0; t < 10 && b <= bad0[k]; t++)
            b = s_bad_sum(zctx, s_dir, stats[k]);
        printf("msgfuzz: %-12s bad.* %lld -> %lld\n", stages[k], bad0[k], b);
        assert_true(b > bad0[k]);
    }
    zmq_ctx_term(zctx);
    assert_true(sent > n_msgs * 9 / 10);
    /* still correct: golden greedy ids, once the requests among the fuzz have drained */
    assert_true(th_wait_until(s_coord_idle, s_dir, 120));
    char bin[1024], outp[1200], nb[16];
    snprintf(bin, sizeof bin, "%s/stpipe", th_env("STP_BIN_DIR"));
    snprintf(outp, sizeof outp, "%s/gen.out", s_dir);
    snprintf(nb, sizeof nb, "%d", g.n_greedy);
    char *gargv[] = {bin, "generate", "--pipeline", s_dir, "--prompt-ids", g.ids, "-n",
                     nb,  "--ids",    "--quiet",    NULL};
    int rc = th_run(gargv, outp, 120);
    char *s = th_slurp(outp, NULL);
    int n_ids = 0, ids[512];
    for (char *p = s, *end; rc == 0 && p && *p && n_ids < 512; p = end) {
        long v = strtol(p, &end, 10);
        if (end == p) break;
        ids[n_ids++] = (int)v;
    }
    free(s);
    assert_int_equal(rc, 0);
    assert_int_equal(n_ids, g.n_greedy);
    assert_memory_equal(ids, g.greedy, sizeof(int) * (size_t)n_ids);
    assert_int_equal(th_pipe_down(s_dir, 60), 0);
    s_dir[0] = 0;
    for (int k = 0; k < N_SOCK; k++)
        assert_int_not_equal(kill(pids[k], 0), 0);
}

int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_teardown(test_msgfuzz_flood_every_socket, s_teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
