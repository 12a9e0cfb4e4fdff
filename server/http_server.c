/* http_server: libmicrohttpd daemon (a thread per connection), routing, the bounded request
 * queue and the single worker thread that owns the backend; see http_server.h.
 *
 * Before the body is read a request must pass the guards (URL, route, CORS origin, API key,
 * Content-Length): a refusal is answered at once and the body never read. A generation request
 * is then parsed and tokenized on its connection thread (400/413 on any problem), and queued
 * (503 when queue_max jobs already wait for a slot; those a free slot takes at once do not
 * count). The connection thread waits for the job in poll() on two descriptors: the job's
 * eventfd (the worker adds to it on new output and when done) and the client's socket (a
 * hang-up). Non-streaming requests wait for the whole answer; streaming ones get a chunked
 * response whose reader waits for each server-sent event. A client that goes away cancels its
 * job: a queued one leaves the queue, a running one stops at the next token. While a
 * connection waits for its job the idle timeout is off (generating is not idling); it restarts
 * when the wait ends. */
#include <arpa/inet.h>
#include <errno.h>
#include <jansson.h>
#include <microhttpd.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "http_server.h"

struct http_server {
    http_model mi;
    http_runner run;
    backend *b;        /* local runner: the backend (NULL with a caller's runner) */
    sched *sched;      /* local runner: its scheduler (worker thread only) */
    engine_stats last; /* local runner: the backend's counters after the last step */
    http_server_config cfg;
    struct MHD_Daemon *d;
    pthread_t worker;
    bool worker_started;
    pthread_mutex_t mu;    /* guards everything below and the shared fields of every job */
    pthread_cond_t wake;   /* worker: a job was queued or stopping */
    http_job *head, *tail; /* waiting, in arrival order */
    int n_waiting;
    http_job *running; /* handed to the runner (linked by next) */
    int n_running;
    int n_free; /* slots free when the worker last looked, plus one per job ended since (its
                   slot is freed by the step that ended it): that many waiting jobs start at once
                   and do not count against queue_max */
    bool stopping;
    unsigned long long seq;
    http_metrics *metrics;
    chat_memo *memo; /* the ids of recent answers, by their chat text */
    http_api_limits lim;
    int port;
};

typedef struct http_conn { /* one request on a connection */
    int route;             /* index in s_routes, set when the request passed the guards */
    bool answered;         /* refused before its body was read */
    char *body;
    size_t len, cap;
    bool too_big;
} http_conn;

enum { R_CHAT, R_COMPLETIONS, R_MODELS, R_HEALTH, R_METRICS, R_TOKENIZE, R_DETOKENIZE, N_ROUTES };
static const struct route {
    const char *path;
    bool post;
    bool guarded; /* behind the CORS origin and the API key (the API proper; /health and
                   * /metrics stay open to probes and scrapers) */
} s_routes[N_ROUTES] = {[R_CHAT] = {"/v1/chat/completions", true, true},
                        [R_COMPLETIONS] = {"/v1/completions", true, true},
                        [R_MODELS] = {"/v1/models", false, true},
                        [R_HEALTH] = {"/health", false, false},
                        [R_METRICS] = {"/metrics", false, false},
                        [R_TOKENIZE] = {"/tokenize", true, true},
                        [R_DETOKENIZE] = {"/detokenize", true, true}};

/* Status counted (not sent) for a request whose client went away: nginx's "client closed". */
#define HTTP_CLIENT_GONE 499

/* ---- jobs -------------------------------------------------------------------------------------
 */

/* Drops one reference; call with s->mu held. */
static void s_job_unref(http_job *job) {
    if (--job->refs > 0) return;
    http_api_job_fini(job);
    if (job->efd >= 0) close(job->efd);
    free(job);
}

/* Wakes the connection waiting for job (s_wait); call with s->mu held. */
static void s_job_notify(http_job *job) {
    uint64_t one = 1;
    if (job->efd >= 0 && write(job->efd, &one, sizeof one) < 0) {
        /* the counter cannot overflow at one per event; nothing else can fail here */
    }
}

/* The client of job went away: cancel it (a queued job leaves the queue, a running one stops
 * at its next token) and count it, once. Call with s->mu held. */
static void s_job_abandon(http_server *s, http_job *job) {
    if (job->done || job->cancel) return;
    job->cancel = 1;
    bool queued = job->queued;
    if (queued) {
        http_job **pp = &s->head, *prev = NULL;
        while (*pp && *pp != job) {
            prev = *pp;
            pp = &(*pp)->next;
        }
        if (*pp) {
            *pp = job->next;
            if (s->tail == job) s->tail = prev;
            job->next = NULL;
        }
        job->queued = false;
        job->done = true;
        s->n_waiting--;
        http_metrics_queue(s->metrics, s->n_waiting, s->n_running);
        job->refs--; /* the worker's reference: it will never see the job */
    }
    http_metrics_client_gone(s->metrics, !queued);
}

/* Appends an SSE event (takes ownership of ev); call with s->mu held. */
static void s_job_append(http_job *job, char *ev) {
    if (!ev) return;
    size_t n = strlen(ev);
    if (job->out_len + n > job->out_cap) {
        size_t nc = job->out_cap ? job->out_cap : 1024;
        while (nc < job->out_len + n)
            nc *= 2;
        char *no = realloc(job->out, nc);
        if (!no) {
            free(ev);
            return;
        }
        job->out = no;
        job->out_cap = nc;
    }
    memcpy(job->out + job->out_len, ev, n);
    job->out_len += n;
    free(ev);
    s_job_notify(job);
}

static int s_emit(void *ud, const char *text, size_t len) {
    http_job *job = ud;
    http_server *s = job->srv;
    char *ev = http_api_chunk(job, s->mi.name, text, len, false, NULL, false);
    pthread_mutex_lock(&s->mu);
    s_job_append(job, ev);
    int stop = job->cancel != 0;
    pthread_mutex_unlock(&s->mu);
    return stop;
}

/* A finished chat's text, spans and ids into the memo, when its answer's text stands for its
 * ids (chat_memo.h, invariant 2): its ids' bytes are the text returned, none is a control id. */
static void s_memo_put(http_server *s, const http_job *job, const gen_result *res) {
    const tokenizer *tok = s->mi.tok;
    if (!s->memo || !job->prompt_text || !tok || !job->n_plain) return;
    size_t n = res->n_gen > 0 && res->ids ? (size_t)res->n_gen : 0;
    if (res->finish == GEN_FINISH_STOP) { /* an end-of-generation id, not a stop string */
        if (!n || !tokenizer_is_eog(tok, res->ids[n - 1])) return;
        n--;
    } else if (res->finish != GEN_FINISH_LENGTH) {
        return;
    }
    const size_t alen = res->text ? res->len : 0;
    size_t at = 0;
    for (size_t i = 0; i < n; i++) {
        const int ty = tokenizer_token_type(tok, res->ids[i]);
        const char *b;
        size_t bl;
        if (ty == TOK_TYPE_CONTROL || ty == TOK_TYPE_UNUSED ||
            tokenizer_token_bytes(tok, res->ids[i], &b, &bl) || bl > alen - at ||
            memcmp(res->text + at, b, bl))
            return;
        at += bl;
    }
    if (at != alen) return;
    /* the answer's message: "assistant\n" (after the last <|im_start|>) and the answer */
    const char *open = "<|im_start|>", *p = job->prompt_text, *last = NULL;
    while ((p = strstr(p, open)))
        last = p++;
    const size_t plen = job->prompt_text_len, tlen = plen + alen, n_ids = (size_t)job->n_prompt + n;
    if (!last) return;
    char *text = malloc(tlen + 1);
    tok_span *spans = malloc(sizeof *spans * (job->n_plain + 1));
    int32_t *ids = malloc(sizeof *ids * (n_ids ? n_ids : 1));
    if (text && spans && ids) {
        memcpy(text, job->prompt_text, plen);
        if (alen) memcpy(text + plen, res->text, alen);
        text[tlen] = 0;
        memcpy(spans, job->plain, sizeof *spans * job->n_plain);
        const size_t a0 = (size_t)(last - job->prompt_text) + strlen(open);
        spans[job->n_plain] = (tok_span){a0, tlen - a0};
        memcpy(ids, job->prompt, sizeof *ids * (size_t)job->n_prompt);
        if (n) memcpy(ids + job->n_prompt, res->ids, sizeof *ids * n);
    }
    chat_memo_put(s->memo, text, tlen, spans, job->n_plain + 1, ids, n_ids); /* takes them */
}

/* The runner finished job (worker thread, no lock held): its answer's last events, the
 * metrics, the memo, and the connection is woken. */
static void s_done(void *ud, gen_result *res, int rc, const stp_err *err) {
    http_job *job = ud;
    http_server *s = job->srv;
    gen_result_fini(&job->res);
    job->res = *res;
    job->t_end = gen_now();
    job->rc = rc;
    if (rc) snprintf(job->errmsg, sizeof job->errmsg, "%s", err ? err->msg : "failed");
    if (!rc) s_memo_put(s, job, &job->res);
    http_metrics_generation(s->metrics, job);
    pthread_mutex_lock(&s->mu);
    if (job->stream) {
        if (rc) {
            char *e = http_api_error(job->errmsg, "server_error", 500);
            size_t n = e ? strlen(e) : 0;
            char *ev = e ? malloc(n + 9) : NULL;
            if (ev) snprintf(ev, n + 9, "data: %s\n\n", e);
            free(e);
            s_job_append(job, ev);
        } else {
            const char *fin = http_api_finish_name(job->res.finish);
            s_job_append(job, http_api_chunk(job, s->mi.name, NULL, 0, false, fin, false));
            if (job->include_usage)
                s_job_append(job, http_api_chunk(job, s->mi.name, NULL, 0, false, NULL, true));
        }
        s_job_append(job, strdup("data: [DONE]\n\n"));
    }
    http_job **pp = &s->running;
    while (*pp && *pp != job)
        pp = &(*pp)->next;
    if (*pp) *pp = job->next;
    job->next = NULL;
    s->n_running--;
    /* its slot is free, or is being freed by the step that ended it: a request that arrives
     * before the worker looks again is queued for it, not refused as if all were busy */
    if (job->started) s->n_free++;
    http_metrics_queue(s->metrics, s->n_waiting, s->n_running);
    job->done = true;
    s_job_notify(job);
    s_job_unref(job);
    pthread_mutex_unlock(&s->mu);
}

/* Hands job to the runner (worker thread, no lock held). */
static void s_start(http_server *s, http_job *job) {
    stp_err err = {0};
    if (job->stream) {
        char *ev = http_api_chunk(job, s->mi.name, "", 0, true, NULL, false);
        pthread_mutex_lock(&s->mu);
        s_job_append(job, ev);
        pthread_mutex_unlock(&s->mu);
    }
    if (job->cancel) {
        stp_err_set(&err, STP_EBUSY,
                    "the request was cancelled (client gone or server shutting down)");
        gen_result none = {0};
        s_done(job, &none, STP_EBUSY, &err);
        return;
    }
    const sched_req r = {.prompt = job->prompt,
                         .n_prompt = job->n_prompt,
                         .gp = job->gp,
                         .emit = job->stream ? s_emit : NULL,
                         .done = s_done,
                         .ud = job,
                         .cancel = &job->cancel};
    int rc = s->run.submit(s->run.ctx, &r, &err);
    if (rc) {
        gen_result none = {0};
        s_done(job, &none, rc, &err);
    }
}

static void *s_worker(void *arg) {
    http_server *s = arg;
    pthread_mutex_lock(&s->mu);
    for (;;) {
        while (s->head && s->run.n_free(s->run.ctx) > 0) {
            http_job *job = s->head;
            s->head = job->next;
            if (!s->head) s->tail = NULL;
            s->n_waiting--;
            job->queued = false;
            job->started = true;
            job->next = s->running;
            s->running = job;
            s->n_running++;
            job->t_start = gen_now();
            if (s->stopping) job->cancel = 1;
            if (s->n_free > 0) s->n_free--;
            http_metrics_queue(s->metrics, s->n_waiting, s->n_running);
            pthread_mutex_unlock(&s->mu);
            s_start(s, job);
            pthread_mutex_lock(&s->mu);
        }
        s->n_free = s->run.n_free(s->run.ctx);
        if (!s->run.busy(s->run.ctx)) {
            if (s->stopping && !s->head) break;
            if (!s->head) pthread_cond_wait(&s->wake, &s->mu);
            continue;
        }
        pthread_mutex_unlock(&s->mu);
        s->run.step(s->run.ctx);
        pthread_mutex_lock(&s->mu);
    }
    pthread_mutex_unlock(&s->mu);
    return NULL;
}

/* ---- the local runner: a sched over the backend, on the worker thread ------------------------ */

static int s_local_submit(void *ctx, const sched_req *r, stp_err *err) {
    return sched_submit(((http_server *)ctx)->sched, r, err);
}

static bool s_local_busy(void *ctx) {
    return sched_busy(((http_server *)ctx)->sched);
}

static int s_local_n_free(void *ctx) {
    http_server *s = ctx;
    return backend_n_seq(s->b) - sched_n_running(s->sched) - sched_n_waiting(s->sched);
}

static void s_local_step(void *ctx) {
    http_server *s = ctx;
    int n = sched_step(s->sched);
    const engine_stats *st = backend_stats(s->b);
    if (!st) {
        http_metrics_step(s->metrics, n, NULL);
        return;
    }
    engine_stats d = {.ns_embed = st->ns_embed - s->last.ns_embed,
                      .ns_router = st->ns_router - s->last.ns_router,
                      .ns_attn = st->ns_attn - s->last.ns_attn,
                      .ns_moe = st->ns_moe - s->last.ns_moe,
                      .ns_head = st->ns_head - s->last.ns_head};
    s->last = *st;
    http_metrics_step(s->metrics, n, &d);
}

/* ---- responses ------------------------------------------------------------------------------ */

/* CORS headers for the request's Origin (none unless --cors names it, or is "*"). */
static void s_cors_headers(http_server *s, struct MHD_Connection *c, struct MHD_Response *r,
                           bool preflight) {
    if (!s->cfg.cors_origin) return;
    const char *origin = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Origin");
    const char *allow = http_guard_cors(s->cfg.cors_origin, origin);
    MHD_add_response_header(r, "Vary", "Origin");
    if (!allow) return;
    MHD_add_response_header(r, "Access-Control-Allow-Origin", allow);
    if (preflight) {
        MHD_add_response_header(r, "Access-Control-Allow-Methods", "GET, POST, OPTIONS");
        MHD_add_response_header(r, "Access-Control-Allow-Headers", "Content-Type, Authorization");
        MHD_add_response_header(r, "Access-Control-Max-Age", "600");
    }
}

static enum MHD_Result s_send(http_server *s, struct MHD_Connection *c, const char *endpoint,
                              int status, const char *ctype, char *body) {
    if (!body) {
        status = 500;
        ctype = "application/json";
        body = strdup("{\"error\":{\"message\":\"out of memory\",\"type\":\"server_error\"}}");
        if (!body) return MHD_NO;
    }
    struct MHD_Response *r =
        MHD_create_response_from_buffer(strlen(body), body, MHD_RESPMEM_MUST_FREE);
    if (!r) {
        free(body);
        return MHD_NO;
    }
    MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, ctype);
    if (status == 401) MHD_add_response_header(r, MHD_HTTP_HEADER_WWW_AUTHENTICATE, "Bearer");
    s_cors_headers(s, c, r, false);
    enum MHD_Result ret = MHD_queue_response(c, (unsigned)status, r);
    MHD_destroy_response(r);
    http_metrics_request(s->metrics, endpoint, status);
    return ret;
}

static enum MHD_Result s_error(http_server *s, struct MHD_Connection *c, const char *endpoint,
                               int status, const char *msg) {
    const char *type = status == 401                   ? "authentication_error"
                       : status == 403                 ? "permission_error"
                       : status == 404                 ? "not_found_error"
                       : status >= 400 && status < 500 ? "invalid_request_error"
                                                       : "server_error";
    return s_send(s, c, endpoint, status, "application/json", http_api_error(msg, type, status));
}

/* ---- waiting for a job ---------------------------------------------------------------------- */

/* Waits until the job is done (or, for_data, has output not yet sent), or its client hangs
 * up; then cancels the job and returns false. Call without s->mu. The eventfd keeps a count
 * until read, so a wake-up between the check and poll() is not lost. */
static bool s_wait(http_server *s, http_job *job, bool for_data) {
    for (;;) {
        pthread_mutex_lock(&s->mu);
        const bool done = job->done;
        bool ready = done || (for_data && job->out_sent < job->out_len);
        pthread_mutex_unlock(&s->mu);
        struct pollfd p[2] = {{.fd = job->efd, .events = POLLIN},
                              {.fd = job->sock, .events = POLLRDHUP}};
        if (done) return true;
        if (ready) {
            /* output is waiting: still look at the client first (a fast generator would
             * otherwise never let the hang-up be seen, and run to the end for nobody) */
            struct pollfd h = p[1];
            if (job->sock < 0 || poll(&h, 1, 0) <= 0 ||
                !(h.revents & (POLLRDHUP | POLLHUP | POLLERR)))
                return true;
            pthread_mutex_lock(&s->mu);
            s_job_abandon(s, job);
            pthread_mutex_unlock(&s->mu);
            return false;
        }
        int n = poll(p, job->sock >= 0 ? 2 : 1, -1);
        if (n < 0 && errno != EINTR) return true; /* cannot watch: the caller reads on */
        if (n <= 0) continue;
        if (p[0].revents & POLLIN) {
            uint64_t v;
            if (read(job->efd, &v, sizeof v) < 0) { /* EAGAIN: another reader took it */
            }
        }
        if (job->sock >= 0 && (p[1].revents & (POLLRDHUP | POLLHUP | POLLERR))) {
            pthread_mutex_lock(&s->mu);
            s_job_abandon(s, job);
            pthread_mutex_unlock(&s->mu);
            return false;
        }
    }
}

/* The idle timeout is off while the connection waits for its job, and restarts after. */
static void s_timeout(http_server *s, struct MHD_Connection *c, bool waiting) {
    MHD_set_connection_option(c, MHD_CONNECTION_OPTION_TIMEOUT,
                              waiting ? 0u : (unsigned)s->cfg.idle_timeout);
}

static ssize_t s_reader(void *cls, uint64_t pos, char *buf, size_t max) {
    (void)pos;
    http_job *job = cls;
    http_server *s = job->srv;
    s_timeout(s, job->conn, true);
    bool alive = s_wait(s, job, true);
    s_timeout(s, job->conn, false);
    if (!alive) return MHD_CONTENT_READER_END_WITH_ERROR;
    pthread_mutex_lock(&s->mu);
    ssize_t n = MHD_CONTENT_READER_END_OF_STREAM;
    if (job->out_sent < job->out_len) {
        size_t k = job->out_len - job->out_sent;
        if (k > max) k = max;
        memcpy(buf, job->out + job->out_sent, k);
        job->out_sent += k;
        if (job->out_sent == job->out_len) job->out_sent = job->out_len = 0;
        n = (ssize_t)k;
    }
    pthread_mutex_unlock(&s->mu);
    return n;
}

static void s_reader_free(void *cls) {
    http_job *job = cls;
    http_server *s = job->srv;
    pthread_mutex_lock(&s->mu);
    s_job_abandon(s, job); /* the stream ended before the job did: the client went away */
    s_job_unref(job);
    pthread_mutex_unlock(&s->mu);
}

/* 413 for a body over --max-body (found only as it arrived: no Content-Length said so). */
static enum MHD_Result s_too_big(http_server *s, struct MHD_Connection *c, const char *endpoint) {
    char msg[128];
    snprintf(msg, sizeof msg, "the request body is larger than %d bytes (--max-body)",
             s->cfg.max_body);
    return s_error(s, c, endpoint, 413, msg);
}

static enum MHD_Result s_generate(http_server *s, struct MHD_Connection *c, const char *endpoint,
                                  http_kind kind, http_conn *hc) {
    if (hc->too_big) return s_too_big(s, c, endpoint);
    http_job *job = calloc(1, sizeof *job);
    if (!job) return s_error(s, c, endpoint, 500, "out of memory");
    job->srv = s;
    job->refs = 1;
    job->conn = c;
    job->efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    const union MHD_ConnectionInfo *ci =
        MHD_get_connection_info(c, MHD_CONNECTION_INFO_CONNECTION_FD);
    job->sock = ci ? ci->connect_fd : -1;
    if (job->efd < 0) {
        s_job_unref(job);
        return s_error(s, c, endpoint, 500, "cannot create an eventfd (out of descriptors?)");
    }
    pthread_mutex_lock(&s->mu);
    unsigned long long seq = ++s->seq;
    pthread_mutex_unlock(&s->mu);
    job->created = (long long)time(NULL);
    snprintf(job->id, sizeof job->id, "%s-%llx%04llx", kind == HTTP_KIND_CHAT ? "chatcmpl" : "cmpl",
             (unsigned long long)job->created, seq & 0xffff);
    char msg[768];
    uint64_t seed = (uint64_t)job->created * 0x9E3779B97F4A7C15ull + seq;
    int status = http_api_parse(job, kind, hc->body ? hc->body : "", hc->len, s->mi.tok, &s->lim,
                                s->memo, seed, msg, sizeof msg);
    if (status) {
        pthread_mutex_lock(&s->mu);
        s_job_unref(job);
        pthread_mutex_unlock(&s->mu);
        return s_error(s, c, endpoint, status, msg);
    }
    job->t_arrive = gen_now();
    pthread_mutex_lock(&s->mu);
    if (s->stopping || s->n_waiting >= s->cfg.queue_max + s->n_free) {
        int waiting = s->n_waiting;
        bool stopping = s->stopping;
        s_job_unref(job);
        pthread_mutex_unlock(&s->mu);
        if (stopping) return s_error(s, c, endpoint, 503, "server shutting down");
        snprintf(msg, sizeof msg,
                 "server busy: %d requests already waiting (queue limit %d, set with --queue); "
                 "retry later",
                 waiting, s->cfg.queue_max);
        return s_error(s, c, endpoint, 503, msg);
    }
    job->refs = 2; /* this connection and the worker */
    job->queued = true;
    if (s->tail)
        s->tail->next = job;
    else
        s->head = job;
    s->tail = job;
    s->n_waiting++;
    http_metrics_queue(s->metrics, s->n_waiting, s->n_running);
    pthread_cond_signal(&s->wake);
    pthread_mutex_unlock(&s->mu);
    if (job->stream) {
        struct MHD_Response *r =
            MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, 4096, s_reader, job, s_reader_free);
        if (!r) {
            s_reader_free(job);
            return MHD_NO;
        }
        MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, "text/event-stream");
        MHD_add_response_header(r, MHD_HTTP_HEADER_CACHE_CONTROL, "no-cache");
        s_cors_headers(s, c, r, false);
        enum MHD_Result ret = MHD_queue_response(c, MHD_HTTP_OK, r);
        MHD_destroy_response(r);
        http_metrics_request(s->metrics, endpoint, 200);
        return ret;
    }
    s_timeout(s, c, true);
    bool alive = s_wait(s, job, false);
    s_timeout(s, c, false);
    enum MHD_Result ret;
    if (!alive) {
        http_metrics_request(s->metrics, endpoint, HTTP_CLIENT_GONE);
        ret = MHD_NO; /* close the connection: nobody reads it */
    } else if (job->rc) {
        ret = s_error(s, c, endpoint, job->rc == STP_EBUSY ? 503 : 500, job->errmsg);
    } else {
        ret = s_send(s, c, endpoint, 200, "application/json", http_api_response(job, s->mi.name));
    }
    pthread_mutex_lock(&s->mu);
    s_job_unref(job);
    pthread_mutex_unlock(&s->mu);
    return ret;
}

/* POST /tokenize, /detokenize: answered on the connection's thread with the model's tokenizer
 * (immutable, shared by every connection); the runner is not involved. */
static enum MHD_Result s_tokens(http_server *s, struct MHD_Connection *c, const char *endpoint,
                                http_conn *hc) {
    if (hc->too_big) return s_too_big(s, c, endpoint);
    if (!s->mi.tok) return s_error(s, c, endpoint, 500, "this server has no tokenizer");
    char msg[768], *out = NULL;
    const char *body = hc->body ? hc->body : "";
    int status =
        hc->route == R_TOKENIZE
            ? http_api_tokenize(body, hc->len, s->mi.tok, &s->lim, &out, msg, sizeof msg)
            : http_api_detokenize(body, hc->len, s->mi.tok, &s->lim, &out, msg, sizeof msg);
    if (status) return s_error(s, c, endpoint, status, msg);
    return s_send(s, c, endpoint, 200, "application/json", out);
}

/* /metrics: the server's own (with the chat memo's counters), then the runner's (the pipeline's
 * stages). */
static char *s_metrics_text(http_server *s) {
    char *a = http_metrics_render(s->metrics, s->memo);
    char *b = a && s->run.metrics ? s->run.metrics(s->run.ctx) : NULL;
    if (!b) return a;
    size_t la = strlen(a), lb = strlen(b);
    char *t = realloc(a, la + lb + 1);
    if (t) memcpy(t + la, b, lb + 1);
    free(b);
    return t ? t : a;
}

static char *s_models_json(http_server *s) {
    json_t *j =
        json_pack("{s:s, s:[{s:s, s:s, s:I, s:s, s:{s:i, s:i}}]}", "object", "list", "data", "id",
                  s->mi.name, "object", "model", "created", (json_int_t)time(NULL), "owned_by",
                  "stpipe", "meta", "n_ctx", s->mi.n_ctx, "n_vocab", s->mi.n_vocab);
    char *out = j ? json_dumps(j, JSON_COMPACT) : NULL;
    json_decref(j);
    return out;
}

/* OPTIONS: the methods, and the CORS preflight answer when the origin is allowed. */
static enum MHD_Result s_preflight(http_server *s, struct MHD_Connection *c, const char *endpoint) {
    struct MHD_Response *r = MHD_create_response_from_buffer(0, NULL, MHD_RESPMEM_PERSISTENT);
    if (!r) return MHD_NO;
    MHD_add_response_header(r, "Allow", "GET, POST, OPTIONS");
    s_cors_headers(s, c, r, true);
    enum MHD_Result ret = MHD_queue_response(c, 204, r);
    MHD_destroy_response(r);
    http_metrics_request(s->metrics, endpoint, 204);
    return ret;
}

/* The checks made on the first call, before any of the body is read: a refusal is queued now
 * (libmicrohttpd then never reads the body). Returns MHD_YES to go on reading. */
static enum MHD_Result s_admit(http_server *s, struct MHD_Connection *c, const char *url,
                               const char *method, http_conn *hc) {
    hc->answered = true;
    if (!http_guard_url_ok(url))
        return s_error(s, c, "other", 400,
                       "the URL is not valid: once percent-decoded it must be UTF-8 text "
                       "without control characters");
    int r = -1;
    for (int i = 0; i < N_ROUTES; i++)
        if (!strcmp(url, s_routes[i].path)) r = i;
    const char *endpoint = r >= 0 ? s_routes[r].path : "other";
    if (!strcmp(method, "OPTIONS")) return s_preflight(s, c, endpoint);
    if (r < 0) {
        char msg[600];
        snprintf(msg, sizeof msg,
                 "no endpoint %.400s (try POST /v1/chat/completions, POST /v1/completions, GET "
                 "/v1/models, /health, /metrics, POST /tokenize, POST /detokenize)",
                 url);
        return s_error(s, c, endpoint, 404, msg);
    }
    bool get = !strcmp(method, "GET") || !strcmp(method, "HEAD");
    if (s_routes[r].post ? strcmp(method, "POST") : !get) {
        char msg[128];
        snprintf(msg, sizeof msg, "%s needs %s", url, s_routes[r].post ? "POST" : "GET");
        return s_error(s, c, endpoint, 405, msg);
    }
    if (s_routes[r].guarded) {
        const char *origin = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Origin");
        if (origin && !http_guard_cors(s->cfg.cors_origin, origin))
            return s_error(s, c, endpoint, 403,
                           "cross-origin requests are not allowed from this origin (start the "
                           "server with --cors ORIGIN to allow one)");
        const char *auth = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Authorization");
        if (!http_guard_bearer_ok(auth, s->cfg.api_key))
            return s_error(s, c, endpoint, 401,
                           auth ? "invalid API key (send the server's key as Authorization: "
                                  "Bearer KEY)"
                                : "missing API key (send Authorization: Bearer KEY)");
    }
    const char *cl = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Content-Length");
    if (cl && strtoull(cl, NULL, 10) > (unsigned long long)s->cfg.max_body) {
        char msg[160];
        snprintf(msg, sizeof msg,
                 "the request body (%.20s bytes) is larger than %d bytes (--max-body)", cl,
                 s->cfg.max_body);
        return s_error(s, c, endpoint, 413, msg);
    }
    hc->answered = false;
    hc->route = r;
    return MHD_YES;
}

static enum MHD_Result s_handler(void *cls, struct MHD_Connection *c, const char *url,
                                 const char *method, const char *version, const char *upload,
                                 size_t *upload_size, void **con_cls) {
    (void)version;
    http_server *s = cls;
    http_conn *hc = *con_cls;
    if (!hc) {
        hc = calloc(1, sizeof *hc);
        if (!hc) return MHD_NO;
        *con_cls = hc;
        return s_admit(s, c, url, method, hc);
    }
    if (hc->answered) {
        *upload_size = 0;
        return MHD_YES;
    }
    if (*upload_size) {
        size_t n = *upload_size;
        *upload_size = 0;
        if (hc->too_big || hc->len + n > (size_t)s->cfg.max_body) {
            hc->too_big = true;
            return MHD_YES;
        }
        if (hc->len + n + 1 > hc->cap) {
            size_t nc = hc->cap ? hc->cap : 4096;
            while (nc < hc->len + n + 1)
                nc *= 2;
            char *nb = realloc(hc->body, nc);
            if (!nb) return MHD_NO;
            hc->body = nb;
            hc->cap = nc;
        }
        memcpy(hc->body + hc->len, upload, n);
        hc->len += n;
        hc->body[hc->len] = 0;
        return MHD_YES;
    }
    const char *path = s_routes[hc->route].path;
    switch (hc->route) {
    case R_CHAT: return s_generate(s, c, path, HTTP_KIND_CHAT, hc);
    case R_COMPLETIONS: return s_generate(s, c, path, HTTP_KIND_COMPLETION, hc);
    case R_MODELS: return s_send(s, c, path, 200, "application/json", s_models_json(s));
    case R_HEALTH:
        return s_send(s, c, path, 200, "application/json", strdup("{\"status\":\"ok\"}"));
    case R_TOKENIZE:
    case R_DETOKENIZE: return s_tokens(s, c, path, hc);
    default:
        return s_send(s, c, path, 200, "text/plain; version=0.0.4; charset=utf-8",
                      s_metrics_text(s));
    }
}

static void s_completed(void *cls, struct MHD_Connection *c, void **con_cls,
                        enum MHD_RequestTerminationCode toe) {
    (void)cls;
    (void)c;
    (void)toe;
    http_conn *hc = *con_cls;
    if (hc) {
        free(hc->body);
        free(hc);
        *con_cls = NULL;
    }
}

/* URL decoding as libmicrohttpd's, except that a decoded NUL becomes DEL: the URL check then
 * refuses it (400) instead of the path being cut short at the NUL. */
static size_t s_unescape(void *cls, struct MHD_Connection *c, char *uri) {
    (void)cls;
    (void)c;
    size_t n = MHD_http_unescape(uri);
    for (size_t i = 0; i < n; i++)
        if (!uri[i]) uri[i] = 0x7F;
    return n;
}

/* ---- lifecycle ------------------------------------------------------------------------------ */

/* The server; b and sc (owned from here on) are the local runner's, or NULL. */
static int s_new(http_server **out, const http_server_config *cfg, const http_model *mi,
                 const http_runner *runner, backend *b, sched *sc, stp_err *err) {
    *out = NULL;
    http_server *s = calloc(1, sizeof *s);
    if (!s) {
        sched_destroy(&sc);
        return stp_err_set(err, STP_ENOMEM, "out of memory");
    }
    s->b = b;
    s->sched = sc;
    if (b) {
        const engine_stats *st = backend_stats(b);
        if (st) s->last = *st;
    }
    s->mi = *mi;
    s->run = *runner;
    if (b) s->run.ctx = s;
    s->cfg = *cfg;
    if (s->cfg.queue_max < 0) s->cfg.queue_max = 0;
    if (s->cfg.max_body <= 0) s->cfg.max_body = 8 << 20;
    if (s->cfg.idle_timeout <= 0) s->cfg.idle_timeout = 10;
    if (s->cfg.max_connections <= 0) s->cfg.max_connections = 256;
    if (s->cfg.max_tokens_default < 0) s->cfg.max_tokens_default = 1024;
    if (s->cfg.api_key && !s->cfg.api_key[0]) s->cfg.api_key = NULL;
    s->lim.n_ctx = mi->n_ctx;
    s->lim.max_tokens_default = s->cfg.max_tokens_default;
    s->lim.max_prompt_bytes =
        http_api_prompt_bytes_max(s->lim.n_ctx, mi->tok ? tokenizer_max_token_bytes(mi->tok) : 1);
    pthread_mutex_init(&s->mu, NULL);
    pthread_cond_init(&s->wake, NULL);
    int rc;
    const char *host = cfg->host ? cfg->host : "127.0.0.1";
    if (!strcmp(host, "localhost")) host = "127.0.0.1";
    struct sockaddr_in a4 = {0};
    struct sockaddr_in6 a6 = {0};
    const struct sockaddr *sa;
    unsigned flags =
        MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_THREAD_PER_CONNECTION | MHD_USE_ERROR_LOG;
    if (inet_pton(AF_INET, host, &a4.sin_addr) == 1) {
        a4.sin_family = AF_INET;
        a4.sin_port = htons((uint16_t)cfg->port);
        sa = (const struct sockaddr *)&a4;
    } else if (inet_pton(AF_INET6, host, &a6.sin6_addr) == 1) {
        a6.sin6_family = AF_INET6;
        a6.sin6_port = htons((uint16_t)cfg->port);
        sa = (const struct sockaddr *)&a6;
        flags |= MHD_USE_IPv6;
    } else {
        rc = stp_err_set(err, STP_EINVAL,
                         "--host '%s' is not a numeric IPv4/IPv6 address (e.g. 127.0.0.1, "
                         "0.0.0.0, ::1)",
                         host);
        goto fail;
    }
    s->n_free = s->run.n_free(s->run.ctx); /* no worker yet: this thread may ask */
    if (cfg->chat_memo > 0) s->memo = chat_memo_new(cfg->chat_memo);
    if ((cfg->chat_memo > 0 && !s->memo) || http_metrics_new(&s->metrics)) {
        rc = stp_err_set(err, STP_ENOMEM, "out of memory");
        goto fail;
    }
    if (pthread_create(&s->worker, NULL, s_worker, s)) {
        rc = stp_err_set(err, STP_ENOMEM, "cannot start the worker thread");
        goto fail;
    }
    s->worker_started = true;
    s->d = MHD_start_daemon(flags, (uint16_t)cfg->port, NULL, NULL, s_handler, s,
                            MHD_OPTION_SOCK_ADDR, sa, MHD_OPTION_NOTIFY_COMPLETED, s_completed, s,
                            MHD_OPTION_CONNECTION_LIMIT, (unsigned)s->cfg.max_connections,
                            MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)s->cfg.idle_timeout,
                            MHD_OPTION_UNESCAPE_CALLBACK, s_unescape, s, MHD_OPTION_END);
    if (!s->d) {
        rc = stp_err_set(err, STP_EIO,
                         "cannot listen on %s port %d (in use? try another --port, or --port 0 "
                         "for any free one)",
                         host, cfg->port);
        goto fail;
    }
    const union MHD_DaemonInfo *di = MHD_get_daemon_info(s->d, MHD_DAEMON_INFO_BIND_PORT);
    s->port = di ? di->port : cfg->port;
    *out = s;
    return 0;
fail:
    http_server_destroy(&s);
    return rc;
}

int http_server_new(http_server **out, const http_server_config *cfg, backend *b, stp_err *err) {
    sched *sc = NULL;
    const sched_params sp = {.prefill_chunk = cfg->prefill_chunk,
                             .prefill_layers = cfg->prefill_layers,
                             .kv_positions = cfg->kv_positions};
    int rc = sched_new(&sc, b, &sp, err);
    if (rc) return rc;
    const http_model mi = {b->name, b->tok, backend_n_ctx(b), backend_n_vocab(b)};
    const http_runner run = {.submit = s_local_submit,
                             .busy = s_local_busy,
                             .n_free = s_local_n_free,
                             .step = s_local_step};
    return s_new(out, cfg, &mi, &run, b, sc, err);
}

int http_server_new_runner(http_server **out, const http_server_config *cfg, const http_model *mi,
                           const http_runner *runner, stp_err *err) {
    return s_new(out, cfg, mi, runner, NULL, NULL, err);
}

int http_server_port(const http_server *s) {
    return s->port;
}

size_t http_server_prompt_bytes_max(const http_server *s) {
    return s->lim.max_prompt_bytes;
}

void http_server_destroy(http_server **self_p) {
    if (!self_p || !*self_p) return;
    http_server *s = *self_p;
    pthread_mutex_lock(&s->mu);
    s->stopping = true;
    for (http_job *j = s->head; j; j = j->next)
        j->cancel = 1;
    for (http_job *j = s->running; j; j = j->next)
        j->cancel = 1;
    pthread_cond_broadcast(&s->wake);
    pthread_mutex_unlock(&s->mu);
    if (s->worker_started) pthread_join(s->worker, NULL);
    sched_destroy(&s->sched); /* every request has ended (cancelled): nothing is called back */
    if (s->d) MHD_stop_daemon(s->d);
    http_metrics_destroy(&s->metrics);
    chat_memo_destroy(&s->memo);
    pthread_cond_destroy(&s->wake);
    pthread_mutex_destroy(&s->mu);
    free(s);
    *self_p = NULL;
}
