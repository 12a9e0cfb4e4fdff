/* test_serve_pipeline_load: `stpipe serve --pipeline RUN_DIR` under 64 connections at once
 * (issue 17's last target). A pipeline with 2 slots (stpipe-up --parallel 2) and its server
 * (--queue 8, the default) get 32 idle connections (half of them with a partial request line)
 * and, after a quiet spell longer than the server's liveness window for the coordinator, 32
 * clients started at once, each a small seeded completion or chat, streaming or not. While
 * they run, /health on a fresh connection must answer 200 within 1 s every time (the HTTP side
 * is never blocked by the pipeline); every client must get, before its deadline, either a
 * well-formed 200 (completion_tokens = max_tokens) or the full queue's 503, and at least
 * slots + queue of them a 200 (the first 10 all fit). Afterwards no sequence is lost: nothing
 * runs or waits (the server's gauges, the coordinator's counters), the server's and the
 * coordinator's counts match what the clients saw, the idle connections are still open, and
 * seeded requests on both slots at once give the ids and text they gave alone before the
 * load. Every wait is for a condition with a deadline (the quiet spell: for the time itself).
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <jansson.h>

#include "msg/stage.h"
#include "th_http.h"
#include "th_pipeline.h"
#include "th_proc.h"

#define MODEL "tiny-qwen-vocab-q4_0-pure.gguf"
#define CHAT "/v1/chat/completions"
#define COMPL "/v1/completions"

enum { N_IDLE = 32, N_REQ = 32, N_SLOTS = 2, QUEUE = 8 };
static const double s_req_deadline_s = 40; /* past this a request hung */
static const double s_health_max_s = 1.0;  /* what /health may take */

static char s_dir[1024];
static th_server s_srv;

/* ---- the clients -------------------------------------------------------------------------- */

typedef struct client {
    int port;
    bool chat, stream;
    int max_tokens;
    char body[640];
    pthread_barrier_t *go;
    th_http_resp r;
    bool timed_out, no_connect;
    double dt; /* send to last byte */
} client;

static pthread_mutex_t s_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t s_cv; /* a client finished (CLOCK_MONOTONIC) */
static int s_n_done;

static void *s_client(void *arg) {
    client *c = arg;
    pthread_barrier_wait(c->go);
    double t0 = th_now();
    int fd = th_http_connect(c->port);
    if (fd < 0) {
        c->no_connect = true;
    } else {
        th_http_send(fd, "POST", c->chat ? CHAT : COMPL, NULL, c->body);
        c->r = th_http_read_by(fd, t0 + s_req_deadline_s, &c->timed_out);
    }
    c->dt = th_now() - t0;
    pthread_mutex_lock(&s_mu);
    s_n_done++;
    pthread_cond_signal(&s_cv);
    pthread_mutex_unlock(&s_mu);
    return NULL;
}

/* A seeded sampled request (ignore_eos: exactly max_tokens tokens). */
static void s_body(char *b, size_t cap, bool chat, const char *prompt, int max_tokens,
                   long long seed, bool stream) {
    char head[256];
    if (chat)
        snprintf(head, sizeof head, "\"messages\":[{\"role\":\"user\",\"content\":\"%s\"}]",
                 prompt);
    else
        snprintf(head, sizeof head, "\"prompt\":\"%s\"", prompt);
    snprintf(b, cap,
             "{%s,\"max_tokens\":%d,\"temperature\":0.8,\"seed\":%lld,\"ignore_eos\":true,"
             "\"return_tokens\":true,\"stream\":%s%s}",
             head, max_tokens, seed, stream ? "true" : "false",
             stream ? ",\"stream_options\":{\"include_usage\":true}" : "");
}

static json_t *s_json(const char *text, int i) {
    json_error_t je;
    json_t *j = json_loads(text, 0, &je);
    if (!j) fail_msg("request %d: not JSON (%s): %.300s", i, je.text, text);
    return j;
}

/* A 200's body: a whole answer of max_tokens tokens (a JSON body, or an SSE stream ending in
 * [DONE] with a "length" finish and the usage). */
static void s_check_ok(const client *c, int i) {
    long long completion = -1;
    if (!c->stream) {
        json_t *j = s_json(c->r.body, i);
        assert_string_equal(json_string_value(json_object_get(j, "object")),
                            c->chat ? "chat.completion" : "text_completion");
        json_t *ch = json_array_get(json_object_get(j, "choices"), 0);
        assert_string_equal(json_string_value(json_object_get(ch, "finish_reason")), "length");
        assert_non_null(
            json_string_value(c->chat ? json_object_get(json_object_get(ch, "message"), "content")
                                      : json_object_get(ch, "text")));
        assert_int_equal(json_array_size(json_object_get(j, "tokens")), c->max_tokens);
        completion =
            json_integer_value(json_object_get(json_object_get(j, "usage"), "completion_tokens"));
        json_decref(j);
    } else {
        int n_finish = 0;
        bool done = false;
        for (const char *p = c->r.body; *p;) {
            const char *end = strstr(p, "\n\n");
            if (!end) fail_msg("request %d: a stream event without its end: %.300s", i, p);
            if (done) fail_msg("request %d: events after [DONE]", i);
            if (strncmp(p, "data: ", 6)) fail_msg("request %d: not an SSE data line: %.80s", i, p);
            p += 6;
            if (!strncmp(p, "[DONE]\n\n", 8)) {
                done = true;
            } else {
                char *ev = strndup(p, (size_t)(end - p));
                json_t *j = s_json(ev, i);
                free(ev);
                if (json_object_get(j, "error")) fail_msg("request %d: an error event", i);
                assert_string_equal(json_string_value(json_object_get(j, "object")),
                                    c->chat ? "chat.completion.chunk" : "text_completion");
                const char *fin = json_string_value(json_object_get(
                    json_array_get(json_object_get(j, "choices"), 0), "finish_reason"));
                if (fin) {
                    assert_string_equal(fin, "length");
                    n_finish++;
                }
                json_t *u = json_object_get(j, "usage");
                if (u) completion = json_integer_value(json_object_get(u, "completion_tokens"));
                json_decref(j);
            }
            p = end + 2;
        }
        if (!done || n_finish != 1)
            fail_msg("request %d: stream %s, %d finish events", i, done ? "ended" : "cut",
                     n_finish);
    }
    if (completion != c->max_tokens)
        fail_msg("request %d: completion_tokens %lld, want %d", i, completion, c->max_tokens);
}

/* A 503: the JSON error of a refusal. */
static void s_check_busy(const client *c, int i) {
    json_t *j = s_json(c->r.body, i);
    json_t *e = json_object_get(j, "error");
    const char *m = json_string_value(json_object_get(e, "message"));
    if (!m || !strstr(m, "busy")) fail_msg("request %d: 503 without 'busy': %s", i, c->r.body);
    assert_int_equal(json_integer_value(json_object_get(e, "code")), 503);
    json_decref(j);
}

/* ---- what the server and the coordinator count ------------------------------------------- */

typedef struct counts {
    long long ok[2], busy[2]; /* [chat] 200s and 503s */
    long long length, cancelled, gone_q, gone_r, gen_tokens, waiting, running;
} counts;

static long long s_m(const char *body, const char *name) {
    long long v = th_metric(body, name);
    return v < 0 ? 0 : v; /* a counter not shown yet is 0 */
}

static counts s_server_counts(void) {
    th_http_resp m = th_http(s_srv.port, "GET", "/metrics", NULL, NULL);
    assert_int_equal(m.status, 200);
    counts c = {.ok = {s_m(m.body, "stpipe_requests_total{endpoint=\"" COMPL "\",code=\"200\"} "),
                       s_m(m.body, "stpipe_requests_total{endpoint=\"" CHAT "\",code=\"200\"} ")},
                .busy = {s_m(m.body, "stpipe_requests_total{endpoint=\"" COMPL "\",code=\"503\"} "),
                         s_m(m.body, "stpipe_requests_total{endpoint=\"" CHAT "\",code=\"503\"} ")},
                .length = s_m(m.body, "stpipe_generations_total{finish=\"length\"} "),
                .cancelled = s_m(m.body, "stpipe_generations_total{finish=\"cancelled\"} "),
                .gone_q = s_m(m.body, "stpipe_client_disconnects_total{state=\"queued\"} "),
                .gone_r = s_m(m.body, "stpipe_client_disconnects_total{state=\"running\"} "),
                .gen_tokens = s_m(m.body, "stpipe_generated_tokens_total "),
                .waiting = th_metric(m.body, "stpipe_queue_waiting "),
                .running = th_metric(m.body, "stpipe_queue_running ")};
    th_http_free(&m);
    return c;
}

enum { C_RECEIVED, C_DONE, C_CANCELLED, C_FAILED, C_BUSY, C_RUNNING, C_DEPTH, N_C };
static const char *const s_coord_names[N_C] = {
    "requests.received", "requests.done",    "requests.cancelled", "requests.failed",
    "requests.busy",     "requests.running", "queue.depth"};

/* The coordinator's counters (absent: 0), from one `stpipe stats --json`. */
static void s_coord_counts(long long v[N_C]) {
    char bin[1024], out[1200];
    snprintf(bin, sizeof bin, "%s/stpipe", th_env("STP_BIN_DIR"));
    snprintf(out, sizeof out, "%s/stats.json", s_dir);
    char *argv[] = {bin, "stats", "--run-dir", s_dir, "--json", NULL};
    assert_int_equal(th_run(argv, out, 30), 0);
    char *s = th_slurp(out, NULL);
    assert_non_null(s);
    json_t *root = s_json(s, -1);
    free(s);
    json_t *cs = json_object_get(json_object_get(root, "coordinator"), "counters");
    assert_non_null(cs);
    for (int i = 0; i < N_C; i++)
        v[i] = json_integer_value(json_object_get(cs, s_coord_names[i])); /* absent: 0 */
    json_decref(root);
}

/* ---- the reference requests --------------------------------------------------------------- */

typedef struct ref {
    char ids[1024], text[1024];
} ref;

static void s_ref_of(const th_http_resp *r, ref *out) {
    if (r->status != 200) fail_msg("reference request: status %d: %s", r->status, r->body);
    json_t *j = s_json(r->body, -1);
    json_t *ch = json_array_get(json_object_get(j, "choices"), 0);
    const char *text = json_string_value(json_object_get(ch, "text"));
    if (!text) text = json_string_value(json_object_get(json_object_get(ch, "message"), "content"));
    assert_non_null(text);
    snprintf(out->text, sizeof out->text, "%s", text);
    size_t i, n = 0;
    json_t *v;
    out->ids[0] = 0;
    json_array_foreach(json_object_get(j, "tokens"), i, v) {
        n += (size_t)snprintf(out->ids + n, sizeof out->ids - n, i ? " %lld" : "%lld",
                              json_integer_value(v));
    }
    assert_true(n > 0 && n < sizeof out->ids);
    json_decref(j);
}

/* ---- the test ----------------------------------------------------------------------------- */

static int s_teardown(void **st) {
    (void)st;
    if (s_srv.pid > 0) th_server_stop(&s_srv);
    s_srv.pid = 0;
    if (s_dir[0]) th_pipe_down(s_dir, 30);
    s_dir[0] = 0;
    return 0;
}

static void test_serve_pipeline_load(void **st) {
    (void)st;
    double t_test = th_now();
    char model[1024];
    snprintf(model, sizeof model, "%s/%s", th_env("STP_TEST_DATA"), MODEL);
    th_pipe_dir(s_dir, sizeof s_dir, "pipe", "load");
    const char *extra[] = {"--parallel", "2", NULL}; /* N_SLOTS */
    assert_int_equal(th_pipe_up(s_dir, model, 1, 30, 60, extra), 0);
    /* the idle connections stay open for the whole test (the default timeout is 10 s); --queue
     * is the default, named because the counts below depend on it (QUEUE) */
    const char *args[] = {"--pipeline", s_dir, "--idle-timeout", "120", "--queue", "8", NULL};
    assert_int_equal(th_server_start(&s_srv, MODEL, args, "serve-pipe-load"), 0);

    /* before the load: a seeded completion and chat, each alone */
    static const char *const ref_prompt = "A quiet morning in the village";
    char ref_body[2][640];
    ref before[2];
    for (int k = 0; k < 2; k++) {
        s_body(ref_body[k], sizeof ref_body[k], k == 1, ref_prompt, 6, 4242, false);
        th_http_resp r = th_http(s_srv.port, "POST", k ? CHAT : COMPL, NULL, ref_body[k]);
        s_ref_of(&r, &before[k]);
        th_http_free(&r);
    }
    double t_quiet = th_now(); /* the server's last generation request before the load */
    counts m0 = s_server_counts();
    long long c0[N_C];
    s_coord_counts(c0);

    /* 32 idle connections; every other one has written part of a request line */
    int idle[N_IDLE];
    for (int i = 0; i < N_IDLE; i++) {
        idle[i] = th_http_connect(s_srv.port);
        assert_true(idle[i] >= 0);
        if (i % 2) assert_true(th_http_write(idle[i], "POST /v1/compl", 14));
    }

    /* the load comes after a quiet spell longer than the server's liveness window for the
     * coordinator (STAGE_LIVENESS heartbeats of the run's interval): its first requests
     * must not be taken for a coordinator that stopped answering. The time is the condition
     * here, so it is waited out. */
    char path[1200];
    snprintf(path, sizeof path, "%s/heartbeat_ms", s_dir);
    char *hb_text = th_slurp(path, NULL);
    int hb_ms = hb_text && atoi(hb_text) > 0 ? atoi(hb_text) : 1000;
    free(hb_text);
    for (double until = t_quiet + STAGE_LIVENESS * hb_ms * 1e-3 + 0.5, left;
         (left = until - th_now()) > 0;)
        usleep((useconds_t)(left * 1e6) + 1);

    /* 32 clients at once: completions and chats, streaming and not, 2..4 tokens, fixed seeds */
    static const char *const prompts[] = {"Once upon a time", "The capital of France is", "Hello",
                                          "In the beginning"};
    static client cl[N_REQ];
    pthread_t th[N_REQ];
    pthread_barrier_t go;
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&s_cv, &ca);
    pthread_condattr_destroy(&ca);
    s_n_done = 0;
    assert_int_equal(pthread_barrier_init(&go, NULL, N_REQ + 1), 0); /* and the prober */
    for (int i = 0; i < N_REQ; i++) {
        client *c = &cl[i];
        memset(c, 0, sizeof *c);
        c->port = s_srv.port;
        c->chat = i % 2;
        c->stream = (i / 2) % 2;
        c->max_tokens = 2 + i % 3;
        c->go = &go;
        s_body(c->body, sizeof c->body, c->chat, prompts[i % 4], c->max_tokens, 1000 + i,
               c->stream);
        assert_int_equal(pthread_create(&th[i], NULL, s_client, c), 0);
    }

    /* /health on a fresh connection, from the moment the clients start, again and again until
     * every client has its answer (a probe every 20 ms at most: the wait ends at once when the
     * last client finishes) */
    pthread_barrier_wait(&go);
    int n_probes = 0, n_slow = 0, worst_status = 200;
    double max_health = 0;
    pthread_mutex_lock(&s_mu);
    while (s_n_done < N_REQ) {
        pthread_mutex_unlock(&s_mu);
        double t0 = th_now();
        int fd = th_http_connect(s_srv.port);
        th_http_resp h = {0};
        if (fd >= 0 && th_http_send(fd, "GET", "/health", NULL, NULL))
            h = th_http_read_by(fd, t0 + 10, NULL);
        else if (fd >= 0)
            close(fd);
        double dt = th_now() - t0;
        n_probes++;
        if (dt > max_health) max_health = dt;
        if (dt >= s_health_max_s) n_slow++;
        if (h.status != 200) worst_status = h.status;
        th_http_free(&h);
        pthread_mutex_lock(&s_mu);
        if (s_n_done < N_REQ) {
            struct timespec ts;
            clock_gettime(CLOCK_MONOTONIC, &ts);
            ts.tv_nsec += 20 * 1000000L;
            if (ts.tv_nsec >= 1000000000L) ts.tv_sec++, ts.tv_nsec -= 1000000000L;
            int rc = pthread_cond_timedwait(&s_cv, &s_mu, &ts);
            assert_true(rc == 0 || rc == ETIMEDOUT);
        }
    }
    pthread_mutex_unlock(&s_mu);
    double t_load = th_now() - t_test;
    for (int i = 0; i < N_REQ; i++)
        pthread_join(th[i], NULL); /* each ended by its deadline */
    pthread_barrier_destroy(&go);
    pthread_cond_destroy(&s_cv);

    /* every request: a whole answer or a 503, before its deadline */
    int ok[2] = {0}, busy[2] = {0}, tokens = 0;
    double max_req = 0;
    for (int i = 0; i < N_REQ; i++) {
        client *c = &cl[i];
        if (c->no_connect) fail_msg("request %d: cannot connect", i);
        if (c->timed_out)
            fail_msg("request %d (%s, %s) hung: no whole answer after %.0f s (status %d)", i,
                     c->chat ? "chat" : "completion", c->stream ? "stream" : "not streaming",
                     s_req_deadline_s, c->r.status);
        if (c->dt > max_req) max_req = c->dt;
        if (c->r.status == 200) {
            s_check_ok(c, i);
            ok[c->chat]++;
            tokens += c->max_tokens;
        } else if (c->r.status == 503) {
            s_check_busy(c, i);
            busy[c->chat]++;
        } else {
            fail_msg("request %d: status %d: %s", i, c->r.status, c->r.body);
        }
        th_http_free(&c->r);
    }
    printf("load: %d requests: %d+%d served (completion+chat), %d+%d refused with 503; longest "
           "%.2f s; /health: %d probes, longest %.3f s; %.1f s since the test started\n",
           N_REQ, ok[0], ok[1], busy[0], busy[1], max_req, n_probes, max_health, t_load);
    if (n_slow || worst_status != 200)
        fail_msg("/health: %d of %d probes took 1 s or more (longest %.3f s), status %d", n_slow,
                 n_probes, max_health, worst_status);
    /* the slots and the queue were full before the first refusal: a request that a free slot
     * would take at once does not count against the queue */
    if (ok[0] + ok[1] < N_SLOTS + QUEUE)
        fail_msg("%d requests served: fewer than %d slots + a queue of %d", ok[0] + ok[1], N_SLOTS,
                 QUEUE);

    /* the idle connections are all still open, and nothing was said on them */
    struct pollfd p[N_IDLE];
    for (int i = 0; i < N_IDLE; i++)
        p[i] = (struct pollfd){.fd = idle[i], .events = POLLIN};
    int n_ev = poll(p, N_IDLE, 0);
    if (n_ev) fail_msg("%d idle connections were answered or closed during the load", n_ev);
    for (int i = 0; i < N_IDLE; i++)
        close(idle[i]);

    /* no sequence lost: the server's gauges and counts, ... */
    counts m1 = s_server_counts();
    assert_int_equal(m1.waiting, 0);
    assert_int_equal(m1.running, 0);
    for (int k = 0; k < 2; k++) {
        assert_int_equal(m1.ok[k] - m0.ok[k], ok[k]);
        assert_int_equal(m1.busy[k] - m0.busy[k], busy[k]);
    }
    assert_int_equal(m1.length - m0.length, ok[0] + ok[1]);
    assert_int_equal(m1.cancelled - m0.cancelled, 0);
    assert_int_equal(m1.gone_q + m1.gone_r - m0.gone_q - m0.gone_r, 0);
    assert_int_equal(m1.gen_tokens - m0.gen_tokens, tokens);
    /* ... and the coordinator's: every request it got is done, nothing runs or waits (its
     * counters are published every 500 ms: read again until they say so, up to 20 s) */
    long long c1[N_C];
    double end = th_now() + 20;
    for (;;) {
        s_coord_counts(c1);
        if ((c1[C_DONE] - c0[C_DONE] == ok[0] + ok[1] && c1[C_RUNNING] == 0 && c1[C_DEPTH] == 0) ||
            th_now() > end)
            break;
    }
    assert_int_equal(c1[C_RECEIVED] - c0[C_RECEIVED], ok[0] + ok[1]);
    assert_int_equal(c1[C_DONE] - c0[C_DONE], ok[0] + ok[1]);
    assert_int_equal(c1[C_CANCELLED] - c0[C_CANCELLED], 0);
    assert_int_equal(c1[C_FAILED] - c0[C_FAILED], 0);
    assert_int_equal(c1[C_BUSY] - c0[C_BUSY], 0);
    assert_int_equal(c1[C_RUNNING], 0);
    assert_int_equal(c1[C_DEPTH], 0);

    /* both slots still work: the two reference requests at once give what they gave alone */
    int fds[2];
    for (int k = 0; k < 2; k++) {
        fds[k] = th_http_connect(s_srv.port);
        assert_true(fds[k] >= 0);
        assert_true(th_http_send(fds[k], "POST", k ? CHAT : COMPL, NULL, ref_body[k]));
    }
    for (int k = 0; k < 2; k++) {
        bool late = false;
        th_http_resp r = th_http_read_by(fds[k], th_now() + s_req_deadline_s, &late);
        assert_false(late);
        ref after;
        s_ref_of(&r, &after);
        th_http_free(&r);
        assert_string_equal(after.ids, before[k].ids);
        assert_string_equal(after.text, before[k].text);
    }
    th_http_resp h = th_http(s_srv.port, "GET", "/health", NULL, NULL);
    assert_int_equal(h.status, 200);
    th_http_free(&h);

    assert_int_equal(th_server_stop(&s_srv), 0);
    s_srv.pid = 0;
    assert_int_equal(th_pipe_down(s_dir, 30), 0);
    s_dir[0] = 0;
}

int main(void) {
    signal(SIGPIPE, SIG_IGN);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_teardown(test_serve_pipeline_load, s_teardown),
    };
    alarm(300); /* bounded in time even if the server hangs */
    return cmocka_run_group_tests(tests, NULL, NULL);
}
