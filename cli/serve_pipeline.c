/* serve_pipeline: `stpipe serve --pipeline`'s jobs forwarded to the coordinator (GenerateRequest,
 * TokenEvent -> emit, GenerateDone -> done, cancel flag -> CancelRequest); see
 * serve_pipeline.h. */
#include "serve_pipeline.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <zmq.h>

#include "client.pb-c.h"
#include "msg/msg.h"
#include "pipe_client.h"
#include "tokenizer/tokenizer.h"

typedef struct sp_job {
    struct sp_job *next;
    uint64_t rid;
    gen_emit_fn emit;
    sched_done_fn done;
    void *ud;
    const volatile sig_atomic_t *cancel;
    int n_prompt;
    bool cancel_sent, emit_refused;
    char *text; /* the answer so far */
    size_t len, cap;
    double t0, t_first; /* gen_now() at submit, at the first text */
} sp_job;

struct serve_pipeline {
    pipe_client *pc;
    sp_job *jobs;
    int n_jobs, handled;
};

static sp_job *s_find(serve_pipeline *s, uint64_t rid, sp_job ***link) {
    for (sp_job **pp = &s->jobs; *pp; pp = &(*pp)->next)
        if ((*pp)->rid == rid) {
            if (link) *link = pp;
            return *pp;
        }
    return NULL;
}

static void s_unlink_free(serve_pipeline *s, sp_job *j) {
    sp_job **pp = NULL;
    if (s_find(s, j->rid, &pp)) {
        *pp = j->next;
        s->n_jobs--;
    }
    free(j->text);
    free(j);
}

static int s_append(sp_job *j, const char *t, size_t n) {
    if (j->len + n + 1 > j->cap) {
        size_t nc = (j->len + n + 1) * 2;
        char *p = realloc(j->text, nc);
        if (!p) return STP_ENOMEM;
        j->text = p;
        j->cap = nc;
    }
    memcpy(j->text + j->len, t, n);
    j->len += n;
    j->text[j->len] = 0;
    return 0;
}

/* Ends j with done (rc 0: a gen_result from d, or a cancel with nothing when d is NULL). */
static void s_finish(serve_pipeline *s, sp_job *j, const pipe_client_done *d, int rc,
                     const char *what) {
    gen_result res;
    memset(&res, 0, sizeof res);
    res.n_prompt = j->n_prompt;
    res.finish = GEN_FINISH_CANCEL;
    if (d) {
        const char *r = d->stop_reason;
        res.finish = !strcmp(r, "eog") || !strcmp(r, "stop")         ? GEN_FINISH_STOP
                     : !strcmp(r, "length") || !strcmp(r, "context") ? GEN_FINISH_LENGTH
                                                                     : GEN_FINISH_CANCEL;
        res.n_gen = d->n_gen;
        if (d->n_gen > 0 && (res.ids = malloc(sizeof(int32_t) * (size_t)d->n_gen)))
            memcpy(res.ids, d->ids, sizeof(int32_t) * (size_t)d->n_gen);
        if (!res.ids) res.n_gen = 0;
        res.n_cached = d->n_prompt_eval >= 0 && d->n_prompt_eval <= j->n_prompt
                           ? j->n_prompt - d->n_prompt_eval
                           : 0;
        res.t_prompt = d->prompt_ms * 1e-3;
        res.t_gen = d->gen_ms * 1e-3;
    }
    res.t_first = j->t_first ? j->t_first - j->t0 : 0;
    if (!j->text) s_append(j, "", 0);
    res.text = j->text; /* the callee's now */
    res.len = j->len;
    j->text = NULL;
    stp_err err = {0};
    if (rc) stp_err_set(&err, rc, "%s", what ? what : "the pipeline failed");
    sched_done_fn done = j->done;
    void *ud = j->ud;
    s_unlink_free(s, j);
    done(ud, &res, rc, &err);
}

static void s_on_text(void *ud, uint64_t rid, const char *text, size_t len) {
    serve_pipeline *s = ud;
    sp_job *j = s_find(s, rid, NULL);
    s->handled++;
    if (!j) return;
    if (!j->t_first) j->t_first = gen_now();
    s_append(j, text, len);
    if (j->emit && !j->emit_refused && j->emit(j->ud, text, len)) j->emit_refused = true;
}

static void s_on_done(void *ud, uint64_t rid, const pipe_client_done *d) {
    serve_pipeline *s = ud;
    s->handled++;
    sp_job *j = s_find(s, rid, NULL);
    if (!j) return;
    if (d->tail_len) s_on_text(s, rid, d->tail, d->tail_len);
    s_finish(s, j, d, 0, NULL);
}

static void s_on_error(void *ud, uint64_t rid, int code, const char *what) {
    serve_pipeline *s = ud;
    s->handled++;
    sp_job *j = s_find(s, rid, NULL);
    if (j) s_finish(s, j, NULL, code ? code : STP_EPEER, what);
}

int serve_pipeline_new(serve_pipeline **out, const char *run_dir, stp_err *err) {
    *out = NULL;
    serve_pipeline *s = calloc(1, sizeof *s);
    if (!s) return stp_err_set(err, STP_ENOMEM, "out of memory");
    pipe_client_cb cb = {
        .on_text = s_on_text, .on_done = s_on_done, .on_error = s_on_error, .ud = s};
    int rc = pipe_client_new(&s->pc, run_dir, &cb, err);
    if (rc) {
        free(s);
        return rc;
    }
    *out = s;
    return 0;
}

void serve_pipeline_destroy(serve_pipeline **self_p) {
    serve_pipeline *s = *self_p;
    if (!s) return;
    for (sp_job *j = s->jobs; j; j = j->next)
        if (!j->cancel_sent) pipe_client_cancel(s->pc, j->rid), j->cancel_sent = true;
    double t0 = gen_now();
    while (s->jobs && gen_now() - t0 < 2.0)
        pipe_client_poll(s->pc, 50, NULL);
    while (s->jobs)
        s_finish(s, s->jobs, NULL, 0, NULL);
    pipe_client_destroy(&s->pc);
    free(s);
    *self_p = NULL;
}

int serve_pipeline_submit(serve_pipeline *s, const sched_req *r, stp_err *err) {
    if (!r->prompt || r->n_prompt < 1 || !r->done)
        return stp_err_set(err, STP_EINVAL, "a job needs a prompt and a done callback");
    sp_job *j = calloc(1, sizeof *j);
    if (!j) return stp_err_set(err, STP_ENOMEM, "out of memory");
    j->emit = r->emit;
    j->done = r->done;
    j->ud = r->ud;
    j->cancel = r->cancel;
    j->n_prompt = r->n_prompt;
    j->t0 = gen_now();
    pipe_client_req q = {.prompt_ids = r->prompt,
                         .n_prompt = r->n_prompt,
                         .n_predict = r->gp.max_tokens > 0 ? r->gp.max_tokens : -1,
                         .sp = r->gp.sp,
                         .ignore_eos = r->gp.ignore_eos,
                         .want_text = true,
                         .stop = r->gp.stop,
                         .n_stop = r->gp.n_stop};
    int rc = pipe_client_submit(s->pc, &q, &j->rid, err);
    if (rc) {
        free(j);
        return rc;
    }
    j->next = s->jobs;
    s->jobs = j;
    s->n_jobs++;
    return 0;
}

bool serve_pipeline_busy(const serve_pipeline *s) {
    return s->jobs != NULL;
}

int serve_pipeline_n_running(const serve_pipeline *s) {
    return s->n_jobs;
}

int serve_pipeline_step(serve_pipeline *s, int timeout_ms) {
    for (sp_job *j = s->jobs; j; j = j->next)
        if (!j->cancel_sent && ((j->cancel && *j->cancel) || j->emit_refused)) {
            pipe_client_cancel(s->pc, j->rid);
            j->cancel_sent = true;
        }
    s->handled = 0;
    pipe_client_poll(s->pc, timeout_ms, NULL);
    return s->handled;
}

int serve_pipeline_info(const char *run_dir, char *model, size_t cap, int *n_seq, int *n_ctx,
                        int timeout_ms, stp_err *err) {
    char ep[512];
    void *zctx = zmq_ctx_new(), *sock = NULL;
    int rc = STP_EIO;
    bool tcp = !strncmp(run_dir, "tcp://", 6);
    if (tcp && (size_t)snprintf(ep, sizeof ep, "%s", run_dir) >= sizeof ep) ep[0] = 0;
    if ((!tcp && msg_endpoint(ep, sizeof ep, run_dir, "client", err)) ||
        !(sock = msg_socket(zctx, ZMQ_DEALER, ep, false, err)))
        goto out;
    Stp__Ping p;
    stp__ping__init(&p);
    p.nonce = 1;
    Stp__ClientMsg m;
    stp__client_msg__init(&m);
    m.version = STP_PROTO_VERSION;
    m.body_case = STP__CLIENT_MSG__BODY_PING;
    m.ping = &p;
    if ((rc = msg_send(sock, NULL, 0, &m.base, err))) goto out;
    rc = stp_err_set(err, STP_ETIMEDOUT,
                     "no answer from the coordinator in %s (is the pipeline running? "
                     "deploy/stpipe-up)",
                     run_dir);
    for (double t0 = msg_now_us(); (msg_now_us() - t0) * 1e-3 < timeout_ms;) {
        bool rd = false;
        if (!msg_poll(&sock, 1, &rd, 100) || !rd) continue;
        msg_in in;
        if (msg_recv(sock, false, &in, NULL) <= 0) continue;
        Stp__ClientMsg *r = stp__client_msg__unpack(NULL, in.len, in.data);
        msg_in_free(&in);
        if (r && r->version == STP_PROTO_VERSION && r->body_case == STP__CLIENT_MSG__BODY_PONG) {
            snprintf(model, cap, "%s", r->pong->model ? r->pong->model : "");
            *n_seq = r->pong->n_seq;
            *n_ctx = r->pong->n_ctx;
            rc = 0;
            err->code = 0;
            err->msg[0] = 0;
        }
        if (r) stp__client_msg__free_unpacked(r, NULL);
        if (!rc) break;
    }
out:
    msg_close(&sock);
    zmq_ctx_term(zctx);
    return rc;
}
