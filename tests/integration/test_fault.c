/* test_fault: the pipeline under faults (issue 7). On the tiny F32 golden model with 2 expert
 * workers, each stage (coordinator, attention worker, storage daemon, expert worker) is killed
 * with SIGKILL, and separately frozen with SIGSTOP, in the middle of a long greedy generation:
 * the supervisor restarts it, the request in flight either completes with the uninterrupted
 * run's ids or fails with a clear error (never hangs), and the next request gives the golden
 * ids. Also: the coordinator's bounded queue answers "busy", the run directory, sockets and
 * shared memory are private, the stats socket accepts no commands, tcp binds only where asked.
 * Every run ends with stpipe-down: no stage process and no /dev/shm/<prefix>-* left.
 * STP_FAULT_ROUNDS (default 5) sets the faults per stage; a table of outcomes is printed. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
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
#include "msg/msg.h"
#include "stats.pb-c.h"
#include "th_pipeline.h"
#include "th_proc.h"

#define N_LONG 600 /* tokens of the generation that gets the fault */

typedef struct run {
    char dir[1024];
    char prefix[128];
} run;

static char s_current_dir[1024];

static int s_teardown(void **st) {
    (void)st;
    if (s_current_dir[0]) th_pipe_down(s_current_dir, 60);
    s_current_dir[0] = 0;
    return 0;
}

/* stpipe-up with 2 expert workers and extra options (NULL-terminated). */
static int s_up(run *r, const th_golden *g, const char *tag, const char *const *extra) {
    th_pipe_dir(r->dir, sizeof r->dir, "fault", tag);
    snprintf(s_current_dir, sizeof s_current_dir, "%s", r->dir);
    int rc = th_pipe_up(r->dir, g->model, 2, 60, 120, extra);
    if (rc) return rc;
    th_pipe_prefix(r->dir, r->prefix, sizeof r->prefix);
    return 0;
}

/* stpipe-down, then no stage process of the run alive and no shm segment left. */
static void s_down_and_check(run *r) {
    int pids[512];
    char p[1100];
    snprintf(p, sizeof p, "%s/pids", r->dir);
    assert_int_equal(access(p, R_OK), 0);
    int n = th_pipe_pids(r->dir, pids, 512);
    assert_int_equal(th_pipe_down(r->dir, 60), 0);
    s_current_dir[0] = 0;
    for (int i = 0; i < n; i++) {
        bool alive = th_stage_alive(pids[i], r->dir);
        if (alive) fprintf(stderr, "stage pid %d survived stpipe-down\n", pids[i]);
        assert_false(alive);
    }
    assert_int_equal(th_shm_count(r->prefix), 0);
    DIR *d = opendir(r->dir);
    for (struct dirent *e; d && (e = readdir(d));) {
        size_t l = strlen(e->d_name);
        assert_false(l > 5 && !strcmp(e->d_name + l - 5, ".sock")); /* no stale socket */
    }
    if (d) closedir(d);
}

static int s_ready_pid(const run *r, const char *stage) {
    char p[1200];
    snprintf(p, sizeof p, "%s/%s.ready", r->dir, stage);
    char *s = th_slurp(p, NULL);
    int pid = s ? atoi(s) : 0;
    free(s);
    return pid;
}

/* Starts a greedy generation (stdout -> out, stderr -> err); returns its pid. ids: the ids on
 * one line at the end; else the text, written as each token comes (so a test sees the request
 * in flight). */
static pid_t s_gen_start(const run *r, const th_golden *g, int n, const char *out, const char *err,
                         bool ids) {
    char bin[1024], nbuf[16];
    snprintf(bin, sizeof bin, "%s/stpipe", th_env("STP_BIN_DIR"));
    snprintf(nbuf, sizeof nbuf, "%d", n);
    char *argv[] = {
        bin,  "generate", "--pipeline", (char *)r->dir, "--prompt-ids",       (char *)g->ids,
        "-n", nbuf,       "--quiet",    "--ignore-eos", ids ? "--ids" : NULL, NULL};
    return th_spawn(argv, out, err);
}

static int s_parse_ids(const char *path, int *ids, int cap) {
    char *s = th_slurp(path, NULL);
    int n = 0;
    for (char *p = s, *end; p && *p && n < cap; p = end) {
        long v = strtol(p, &end, 10);
        if (end == p) break;
        ids[n++] = (int)v;
    }
    free(s);
    return n;
}

static const char *const s_stages[5] = {"coordinator", "attn", "storage", "expert-0", "expert-1"};

/* Every stage's ready file names a running stage of this run. */
static bool s_all_ready(void *ctx) {
    const run *r = ctx;
    for (int k = 0; k < 5; k++) {
        int p = s_ready_pid(r, s_stages[k]);
        if (p <= 0 || !th_stage_alive(p, r->dir)) return false;
    }
    return true;
}

/* The next request after a fault: golden greedy ids. A request sent to a stage that is still
 * restarting fails cleanly; then it is retried once every stage is ready again. */
static bool s_next_ok(const run *r, const th_golden *g) {
    char out[1200];
    snprintf(out, sizeof out, "%s/next.out", r->dir);
    for (int attempt = 0; attempt < 3; attempt++) {
        if (!th_wait_until(s_all_ready, (void *)r, 60)) return false;
        int rc = th_wait(s_gen_start(r, g, g->n_greedy, out, NULL, true), 120);
        int ids[512], n = s_parse_ids(out, ids, 512);
        bool ok = rc == 0 && n == g->n_greedy;
        for (int i = 0; ok && i < n; i++)
            ok = ids[i] == g->greedy[i];
        if (ok) return true;
        fprintf(stderr, "next request after a fault: attempt %d failed (rc %d, %d ids)\n",
                attempt + 1, rc, n);
    }
    return false;
}

typedef struct restart_wait {
    const run *r;
    const char *stage;
    int old, now;
} restart_wait;

static bool s_restarted(void *ctx) {
    restart_wait *w = ctx;
    int p = s_ready_pid(w->r, w->stage);
    w->now = p > 0 && p != w->old && kill(p, 0) == 0 ? p : 0;
    return w->now > 0;
}

/* Waits until <stage>.ready names a pid other than old (the supervisor restarted it). */
static int s_wait_restart(const run *r, const char *stage, int old, double timeout_s) {
    restart_wait w = {r, stage, old, 0};
    return th_wait_until(s_restarted, &w, timeout_s) ? w.now : 0;
}

typedef struct outcome {
    int injected, in_flight, completed, failed_clear, bad, next_ok;
    double detect_s; /* worst time from the fault to the new stage being ready (backoff too) */
    double first_s;  /* the same for the first fault (no backoff) */
} outcome;

static int s_rounds(void) {
    int n = atoi(th_env("STP_FAULT_ROUNDS"));
    return n > 0 ? n : 5;
}

/* One fault (sig) on one stage during a long generation, injected once its first tokens are
 * out (ref: the uninterrupted run's text); updates o. */
static void s_fault_once(const run *r, const th_golden *g, const char *stage, int sig,
                         const char *ref, outcome *o) {
    char out[1200], err[1200];
    snprintf(out, sizeof out, "%s/fault.out", r->dir);
    snprintf(err, sizeof err, "%s/fault.err", r->dir);
    int victim = s_ready_pid(r, stage);
    assert_true(victim > 0);
    /* a generation that ends between its first tokens and the fault (the test was not
     * scheduled for its ~0.3 s) proves nothing: started again, at most 5 times */
    pid_t gen = 0;
    int rc = 0;
    bool flight = false;
    for (int attempt = 0; attempt < 5 && !flight; attempt++) {
        gen = s_gen_start(r, g, N_LONG, out, err, false);
        assert_true(gen > 0);
        bool started = th_wait_file_has(out, "", gen, 60);
        rc = th_exited(gen);
        flight = rc < 0;
        if (!started && flight) th_wait(gen, 0); /* no token in 60 s: killed */
        assert_true(started);
        if (!flight) fprintf(stderr, "fault %s: the generation ended before the fault\n", stage);
    }
    double t0 = th_now();
    assert_int_equal(kill(victim, sig), 0);
    o->injected++;
    o->in_flight += flight;
    if (flight) rc = th_wait(gen, 180);
    char *text = th_slurp(out, NULL);
    char *emsg = th_slurp(err, NULL);
    bool same = text && !strcmp(text, ref);
    free(text);
    if (rc == 0 && same) {
        /* a request that ended before the fault proves nothing about recovery: not counted */
        if (flight) o->completed++;
    } else if (rc > 0 && rc < 128 && emsg && strstr(emsg, "stpipe generate: ")) {
        fprintf(stderr, "fault %s sig %d: failed with: %s", stage, sig, emsg);
        char cmd[2200];
        snprintf(cmd, sizeof cmd, "tail -n 4 %s/coordinator.log %s/attn.log >&2", r->dir, r->dir);
        if (system(cmd)) fprintf(stderr, "(no stage logs)\n");
        o->failed_clear++;
    } else {
        fprintf(stderr, "fault %s sig %d: rc %d, %s text, stderr: %s\n", stage, sig, rc,
                same ? "same" : "other", emsg ? emsg : "");
        o->bad++;
    }
    free(emsg);
    int again = s_wait_restart(r, stage, victim, 120);
    double dt = th_now() - t0;
    if (dt > o->detect_s) o->detect_s = dt;
    if (o->injected == 1) o->first_s = dt;
    assert_true(again > 0);
    if (sig == SIGSTOP) assert_int_not_equal(kill(victim, 0), 0); /* killed, not resumed */
    o->next_ok += s_next_ok(r, g);
}

static void s_fault_case(int sig, const char *tag, const char *const *extra) {
    th_golden g;
    th_golden_load(&g, "tiny-dense-attn-f32");
    run r;
    assert_int_equal(s_up(&r, &g, tag, extra), 0);
    /* the uninterrupted run: its ids start with the golden ones, and its text is what a
     * completed request must give */
    char out[1200];
    snprintf(out, sizeof out, "%s/ref.out", r.dir);
    assert_int_equal(th_wait(s_gen_start(&r, &g, N_LONG, out, NULL, true), 180), 0);
    static int ref[N_LONG + 8];
    int n_ref = s_parse_ids(out, ref, N_LONG + 8);
    assert_int_equal(n_ref, N_LONG);
    for (int i = 0; i < g.n_greedy; i++)
        assert_int_equal(ref[i], g.greedy[i]);
    assert_int_equal(th_wait(s_gen_start(&r, &g, N_LONG, out, NULL, false), 180), 0);
    char *ref_text = th_slurp(out, NULL);
    assert_non_null(ref_text);
    assert_true(strlen(ref_text) > 0);
    const char *stages[4] = {"coordinator", "attn", "storage", "expert-1"};
    outcome oc[4];
    memset(oc, 0, sizeof oc);
    int rounds = s_rounds();
    const char *only = th_env("STP_FAULT_STAGES"); /* e.g. "attn,storage" (debugging) */
    for (int k = 0; k < 4; k++)
        for (int i = 0; i < rounds && (!*only || strstr(only, stages[k])); i++)
            s_fault_once(&r, &g, stages[k], sig, ref_text, &oc[k]);
    free(ref_text);
    printf("\n%s faults (%d per stage, generation of %d tokens, fault after its first tokens)\n",
           sig == SIGKILL ? "kill -9" : "SIGSTOP", rounds, N_LONG);
    printf("| stage | injected | in flight | completed (same text) | failed, clear error | hang or "
           "wrong | next request ok | first fault->ready s | worst (with backoff) s |\n"
           "|---|---|---|---|---|---|---|---|---|\n");
    for (int k = 0; k < 4; k++)
        printf("| %s | %d | %d | %d | %d | %d | %d | %.2f | %.2f |\n", stages[k], oc[k].injected,
               oc[k].in_flight, oc[k].completed, oc[k].failed_clear, oc[k].bad, oc[k].next_ok,
               oc[k].first_s, oc[k].detect_s);
    fflush(stdout);
    for (int k = 0; k < 4; k++) {
        assert_int_equal(oc[k].bad, 0);
        assert_int_equal(oc[k].in_flight, oc[k].injected); /* each fault hit a request */
        assert_int_equal(oc[k].next_ok, oc[k].injected);
        if (k > 0) assert_int_equal(oc[k].completed, oc[k].in_flight); /* recovered */
    }
    s_down_and_check(&r);
}

static void test_fault_kill9_each_stage(void **st) {
    (void)st;
    s_fault_case(SIGKILL, "kill", NULL);
}

static void test_fault_sigstop_each_stage(void **st) {
    (void)st;
    const char *extra[] = {"--heartbeat-ms", "300", NULL};
    s_fault_case(SIGSTOP, "stop", extra);
}

/* ---- busy queue ---- */

static void test_fault_busy_queue(void **st) {
    (void)st;
    th_golden g;
    th_golden_load(&g, "tiny-dense-attn-f32");
    run r;
    /* one sequence slot: one request runs at a time, two more wait */
    const char *extra[] = {"--queue", "2", "--parallel", "1", NULL};
    assert_int_equal(s_up(&r, &g, "busy", extra), 0);
    void *zctx = zmq_ctx_new();
    char ep[1200];
    stp_err err = {0};
    assert_int_equal(msg_endpoint(ep, sizeof ep, r.dir, "client", &err), 0);
    void *s = msg_socket(zctx, ZMQ_DEALER, ep, false, &err);
    assert_non_null(s);
    int32_t prompt[64];
    int np = 0;
    for (char *p = g.ids, *end; *p && np < 64; p = end) {
        prompt[np++] = (int32_t)strtol(p, &end, 10);
        if (end == p) break;
    }
    enum { N_REQ = 8 };
    for (int i = 0; i < N_REQ; i++) { /* one burst: 1 runs, 2 wait, the rest are refused */
        Stp__GenerateRequest q;
        stp__generate_request__init(&q);
        q.request_id = 100 + (uint64_t)i;
        q.n_prompt_ids = (size_t)np;
        q.prompt_ids = prompt;
        q.n_predict = 200;
        q.ignore_eos = true;
        Stp__ClientMsg m;
        stp__client_msg__init(&m);
        m.version = STP_PROTO_VERSION;
        m.body_case = STP__CLIENT_MSG__BODY_REQUEST;
        m.request = &q;
        assert_int_equal(msg_send(s, NULL, 0, &m.base, &err), 0);
    }
    int done = 0, busy = 0, other = 0;
    double t0 = th_now();
    while (done + busy + other < N_REQ && th_now() - t0 < 120) {
        Stp__ClientMsg *m = th_client_recv(s, 1000);
        if (!m) continue;
        if (m->body_case == STP__CLIENT_MSG__BODY_DONE) done++;
        if (m->body_case == STP__CLIENT_MSG__BODY_ERROR) {
            if (m->error->code == STP_EBUSY && strstr(m->error->what, "busy"))
                busy++;
            else
                other++;
        }
        stp__client_msg__free_unpacked(m, NULL);
    }
    zmq_close(s);
    zmq_ctx_term(zctx);
    printf("busy queue (--queue 2, %d requests in one burst): %d done, %d busy, %d other\n", N_REQ,
           done, busy, other);
    assert_int_equal(other, 0);
    assert_int_equal(done + busy, N_REQ);
    assert_true(done >= 2 && done <= 3); /* one ran while the queue held two */
    assert_true(busy >= N_REQ - 3);
    assert_true(s_next_ok(&r, &g));
    s_down_and_check(&r);
}

/* ---- security ---- */

/* Sum of the bad.* counters of one stage (newest StatsReport; -1 when none came). */
static long long s_bad_sum(void *zctx, const run *r, const char *stats_sock) {
    void *s = th_stats_sub(zctx, r->dir, stats_sock);
    Stp__StatsReport *rep = th_stats_next(s, 5000);
    long long v = rep ? 0 : -1;
    for (size_t i = 0; rep && i < rep->n_counters; i++)
        if (!strncmp(rep->counters[i]->name, "bad.", 4)) v += (long long)rep->counters[i]->value;
    if (rep) stp__stats_report__free_unpacked(rep, NULL);
    zmq_close(s);
    return v;
}

/* Connects sock to ep and waits up to timeout_ms for the socket monitor's event `want`. */
static bool s_connect_wait(void *zctx, void *sock, const char *ep, int want, int timeout_ms) {
    char mon[64];
    snprintf(mon, sizeof mon, "inproc://fault-monitor-%p", sock);
    if (zmq_socket_monitor(sock, mon, ZMQ_EVENT_ALL)) return false;
    void *m = zmq_socket(zctx, ZMQ_PAIR);
    bool ok = false;
    if (!zmq_connect(m, mon) && !zmq_connect(sock, ep)) {
        double end = th_now() + timeout_ms * 1e-3;
        while (!ok && th_now() < end) {
            zmq_pollitem_t it = {m, 0, ZMQ_POLLIN, 0};
            if (zmq_poll(&it, 1, (long)((end - th_now()) * 1000) + 1) <= 0) continue;
            uint8_t ev[6];
            char addr[256];
            if (zmq_recv(m, ev, sizeof ev, 0) < 2) break;
            zmq_recv(m, addr, sizeof addr, 0); /* the endpoint frame */
            uint16_t e;
            memcpy(&e, ev, 2);
            ok = e == want;
        }
    }
    zmq_socket_monitor(sock, NULL, 0);
    zmq_close(m);
    return ok;
}

static void test_fault_security(void **st) {
    (void)st;
    th_golden g;
    th_golden_load(&g, "tiny-dense-attn-f32");
    /* tcp: a wildcard address is refused without --bind-public; the default host is loopback */
    char ep[256];
    stp_err err = {0};
    assert_int_equal(msg_tcp_endpoint(ep, sizeof ep, "0.0.0.0:5555", false, &err), STP_EINVAL);
    assert_int_equal(msg_tcp_endpoint(ep, sizeof ep, "*:5555", false, &err), STP_EINVAL);
    assert_int_equal(msg_tcp_endpoint(ep, sizeof ep, "5555", false, &err), 0);
    assert_string_equal(ep, "tcp://127.0.0.1:5555");
    assert_int_equal(msg_tcp_endpoint(ep, sizeof ep, "127.0.0.2:6000", false, &err), 0);
    assert_string_equal(ep, "tcp://127.0.0.2:6000");
    assert_int_equal(msg_tcp_endpoint(ep, sizeof ep, "0.0.0.0:5555", true, &err), 0);
    assert_int_equal(msg_tcp_endpoint(ep, sizeof ep, "nope", false, &err), STP_EINVAL);
    void *zctx = zmq_ctx_new();
    assert_null(msg_socket(zctx, ZMQ_ROUTER, "tcp://0.0.0.0:5555", true, &err));
    assert_null(msg_socket(zctx, ZMQ_ROUTER, "tcp://*:5555", true, &err));
    run r;
    const char *bad[] = {"--bind-tcp", "0.0.0.0:5555", NULL};
    assert_int_not_equal(s_up(&r, &g, "sec0", bad), 0);
    s_teardown(NULL);

    int port = 20000 + (int)(getpid() % 20000);
    char spec[16];
    snprintf(spec, sizeof spec, "%d", port);
    const char *extra[] = {"--bind-tcp", spec, NULL};
    assert_int_equal(s_up(&r, &g, "sec", extra), 0);
    /* the run directory is 0700 and holds every socket, each 0600 */
    struct stat sb;
    assert_int_equal(stat(r.dir, &sb), 0);
    assert_int_equal(sb.st_mode & 0777, 0700);
    DIR *d = opendir(r.dir);
    int n_sock = 0;
    for (struct dirent *e; d && (e = readdir(d));) {
        char p[2400];
        snprintf(p, sizeof p, "%s/%s", r.dir, e->d_name);
        if (lstat(p, &sb) || !S_ISSOCK(sb.st_mode)) continue;
        n_sock++;
        assert_int_equal(sb.st_mode & 077, 0);
    }
    closedir(d);
    assert_true(n_sock >= 9); /* client attn storage expert-0/1 + 4 stats */
    /* shared memory: nothing writable (or readable) by other users */
    d = opendir("/dev/shm");
    int n_shm = 0;
    size_t pl = strlen(r.prefix);
    for (struct dirent *e; d && (e = readdir(d));) {
        if (strncmp(e->d_name, r.prefix, pl) || e->d_name[pl] != '-') continue;
        char p[600];
        snprintf(p, sizeof p, "/dev/shm/%s", e->d_name);
        assert_int_equal(stat(p, &sb), 0);
        assert_int_equal(sb.st_mode & 077, 0);
        n_shm++;
    }
    closedir(d);
    assert_true(n_shm >= 2); /* pool and activation region */
    /* the stats socket is read-only: messages sent to it change nothing */
    int pid_attn = s_ready_pid(&r, "attn");
    long long bad0 = s_bad_sum(zctx, &r, "stats-attn");
    assert_true(bad0 >= 0);
    char sep[1200];
    msg_endpoint(sep, sizeof sep, r.dir, "stats-attn", &err);
    void *xs = zmq_socket(zctx, ZMQ_XSUB), *dl = zmq_socket(zctx, ZMQ_DEALER);
    int linger = 0, unlimited = 0; /* the XSUB queues all the junk and the barrier after it */
    zmq_setsockopt(xs, ZMQ_SNDHWM, &unlimited, sizeof unlimited);
    zmq_setsockopt(xs, ZMQ_LINGER, &linger, sizeof linger);
    zmq_setsockopt(dl, ZMQ_LINGER, &linger, sizeof linger);
    /* connected before the junk goes out: the XSUB through its handshake, the DEALER (which a
     * PUB refuses) as far as the connection */
    assert_true(s_connect_wait(zctx, xs, sep, ZMQ_EVENT_HANDSHAKE_SUCCEEDED, 10000));
    assert_true(s_connect_wait(zctx, dl, sep, ZMQ_EVENT_CONNECTED, 10000));
    uint8_t junk[512];
    srand(7);
    for (int i = 0; i < 2000; i++) {
        for (size_t k = 0; k < sizeof junk; k++)
            junk[k] = (uint8_t)rand();
        size_t len = 1 + (size_t)rand() % sizeof junk;
        zmq_send(dl, junk, len, ZMQ_DONTWAIT);
        /* a subscription in the junk never covers the reports (they start with 0x08), so the
         * barrier below sees no report before its own subscription */
        if (junk[0] == 1 && len < 3) len = 3;
        if (junk[0] == 1 && junk[1] == 0x08) junk[1] = 0x09;
        zmq_send(xs, junk, len, ZMQ_DONTWAIT);
    }
    /* barrier: subscribe to everything after the junk; the stage takes subscriptions in order,
     * so its first report to arrive was sent after it had taken in all the junk */
    assert_int_equal(zmq_send(xs, "\x01", 1, 0), 1);
    bool rd;
    assert_int_equal(msg_poll(&xs, 1, &rd, 10000), 1);
    assert_true(rd);
    assert_int_equal(msg_poll(&dl, 1, &rd, 500), 0); /* no answer */
    zmq_close(xs);
    zmq_close(dl);
    assert_true(th_stage_alive(pid_attn, r.dir)); /* the junk did not kill it */
    assert_int_equal(s_ready_pid(&r, "attn"), pid_attn);
    assert_int_equal(s_bad_sum(zctx, &r, "stats-attn"), bad0); /* nothing was read */
    zmq_ctx_term(zctx);
    /* tcp client on 127.0.0.1 */
    char tcp[64], bin[1024], out[1200];
    snprintf(tcp, sizeof tcp, "tcp://127.0.0.1:%d", port);
    snprintf(bin, sizeof bin, "%s/stpipe", th_env("STP_BIN_DIR"));
    snprintf(out, sizeof out, "%s/tcp.out", r.dir);
    char nb[16];
    snprintf(nb, sizeof nb, "%d", g.n_greedy);
    char *argv[] = {bin, "generate", "--pipeline", tcp, "--prompt-ids", g.ids, "-n",
                    nb,  "--ids",    "--quiet",    NULL};
    assert_int_equal(th_run(argv, out, 120), 0);
    int ids[512], n = s_parse_ids(out, ids, 512);
    assert_int_equal(n, g.n_greedy);
    for (int i = 0; i < n; i++)
        assert_int_equal(ids[i], g.greedy[i]);
    s_down_and_check(&r);
}

int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_teardown(test_fault_security, s_teardown),
        cmocka_unit_test_teardown(test_fault_busy_queue, s_teardown),
        cmocka_unit_test_teardown(test_fault_kill9_each_stage, s_teardown),
        cmocka_unit_test_teardown(test_fault_sigstop_each_stage, s_teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
