/* pipe_client: several GenerateRequests in flight to the coordinator over one DEALER, with
 * heartbeats and cancellation; see pipe_client.h. */
#include "pipe_client.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>

#include <zmq.h>

#include "client.pb-c.h"
#include "msg/msg.h"
#include "msg/stage.h"

struct pipe_client {
    void *zctx, *s;
    pipe_client_cb cb;
    int hb;
    uint64_t *rids; /* in flight */
    int n, cap;
    unsigned ping_turn;
    double last_rx, last_ping;
    uint64_t nonce;
};

/* Heartbeat interval towards the coordinator: STP_HEARTBEAT_MS, else the run's, else 1000. */
static int s_heartbeat_ms(const char *run_dir) {
    const char *e = getenv("STP_HEARTBEAT_MS");
    int ms = e ? atoi(e) : 0;
    if (ms >= 50 && ms <= 60000) return ms;
    return strncmp(run_dir, "tcp://", 6) ? stage_heartbeat_ms(run_dir) : STAGE_HEARTBEAT_MS_DEF;
}

int pipe_client_new(pipe_client **out, const char *run_dir, const pipe_client_cb *cb,
                    stp_err *err) {
    *out = NULL;
    pipe_client *c = calloc(1, sizeof *c);
    if (!c) return stp_err_set(err, STP_ENOMEM, "out of memory");
    c->cb = *cb;
    c->hb = s_heartbeat_ms(run_dir);
    c->zctx = zmq_ctx_new();
    char ep[512];
    bool tcp = !strncmp(run_dir, "tcp://", 6); /* a coordinator started with --bind-tcp */
    if (tcp && (size_t)snprintf(ep, sizeof ep, "%s", run_dir) >= sizeof ep) ep[0] = 0;
    if ((!tcp && msg_endpoint(ep, sizeof ep, run_dir, "client", err)) ||
        !(c->s = msg_socket(c->zctx, ZMQ_DEALER, ep, false, err))) {
        pipe_client_destroy(&c);
        return STP_EIO;
    }
    c->last_rx = c->last_ping = msg_now_us();
    *out = c;
    return 0;
}

void pipe_client_destroy(pipe_client **self_p) {
    pipe_client *c = *self_p;
    if (!c) return;
    for (int i = 0; c->s && i < c->n; i++)
        pipe_client_cancel(c, c->rids[i]);
    msg_close(&c->s);
    if (c->zctx) zmq_ctx_term(c->zctx);
    free(c->rids);
    free(c);
    *self_p = NULL;
}

void *pipe_client_socket(pipe_client *c) {
    return c->s;
}
int pipe_client_n_active(const pipe_client *c) {
    return c->n;
}
int pipe_client_heartbeat_ms(const pipe_client *c) {
    return c->hb;
}

static int s_find(const pipe_client *c, uint64_t rid) {
    for (int i = 0; i < c->n; i++)
        if (c->rids[i] == rid) return i;
    return -1;
}

/* Forgets rid; true when it was in flight. */
static bool s_forget(pipe_client *c, uint64_t rid) {
    int i = s_find(c, rid);
    if (i < 0) return false;
    c->rids[i] = c->rids[--c->n];
    return true;
}

static int s_send(pipe_client *c, Stp__ClientMsg *m, stp_err *err) {
    m->version = STP_PROTO_VERSION;
    return msg_send(c->s, NULL, 0, &m->base, err);
}

int pipe_client_submit(pipe_client *c, const pipe_client_req *o, uint64_t *rid_out, stp_err *err) {
    if (c->n == c->cap) {
        int nc = c->cap ? 2 * c->cap : 8;
        uint64_t *n = realloc(c->rids, sizeof *n * (size_t)nc);
        if (!n) return stp_err_set(err, STP_ENOMEM, "out of memory");
        c->rids = n;
        c->cap = nc;
    }
    Stp__SamplingParams sp;
    stp__sampling_params__init(&sp);
    sp.temperature = o->sp.temperature;
    sp.top_k = o->sp.top_k;
    sp.top_p = o->sp.top_p;
    sp.min_p = o->sp.min_p;
    sp.repeat_penalty = o->sp.repeat_penalty;
    sp.presence_penalty = o->sp.presence_penalty;
    sp.frequency_penalty = o->sp.frequency_penalty;
    sp.penalty_last_n = o->sp.penalty_last_n;
    sp.seed = o->sp.seed;
    Stp__GenerateRequest rq;
    stp__generate_request__init(&rq);
    uint64_t rid = 0;
    while (!rid || s_find(c, rid) >= 0)
        if (getrandom(&rid, sizeof rid, 0) != sizeof rid) rid = (uint64_t)msg_now_us();
    rq.request_id = rid;
    rq.n_prompt_ids = o->prompt_ids ? (size_t)o->n_prompt : 0;
    rq.prompt_ids = (int32_t *)o->prompt_ids;
    rq.n_untimed = o->n_untimed;
    rq.prompt_text = (char *)(o->prompt_text ? o->prompt_text : "");
    rq.chat = o->chat;
    rq.system = (char *)(o->system ? o->system : "");
    rq.parse_special = o->parse_special;
    rq.n_predict = (int32_t)(o->n_predict > INT32_MAX ? INT32_MAX : o->n_predict);
    rq.ignore_eos = o->ignore_eos;
    rq.want_prompt_logits = o->want_prompt_logits;
    rq.want_text = o->want_text;
    rq.sampling = &sp;
    rq.n_stop = o->stop ? (size_t)o->n_stop : 0;
    rq.stop = (char **)o->stop;
    Stp__ChatMessage *cm = NULL, **cmp = NULL;
    if (o->messages && o->n_messages) {
        cm = calloc(o->n_messages, sizeof *cm);
        cmp = calloc(o->n_messages, sizeof *cmp);
        if (!cm || !cmp) {
            free(cm);
            free(cmp);
            return stp_err_set(err, STP_ENOMEM, "out of memory");
        }
        for (size_t i = 0; i < o->n_messages; i++) {
            stp__chat_message__init(&cm[i]);
            cm[i].role = (char *)o->messages[i].role;
            cm[i].content = (char *)o->messages[i].content;
            cmp[i] = &cm[i];
        }
        rq.n_messages = o->n_messages;
        rq.messages = cmp;
    }
    Stp__ClientMsg m;
    stp__client_msg__init(&m);
    m.body_case = STP__CLIENT_MSG__BODY_REQUEST;
    m.request = &rq;
    int rc = s_send(c, &m, err);
    free(cm);
    free(cmp);
    if (rc) return rc;
    /* the first job in flight starts the liveness clock: the coordinator had nothing to say
     * while none was, however long that was (a caller polls only while it waits for jobs) */
    if (!c->n) c->last_rx = msg_now_us();
    c->rids[c->n++] = rid;
    *rid_out = rid;
    return 0;
}

/* A CancelRequest for rid; wait: block up to the send timeout when the socket is full, else
 * drop it (a coordinator deemed dead must not stall the caller once per request). */
static int s_cancel(pipe_client *c, uint64_t rid, bool wait) {
    Stp__CancelRequest cr;
    stp__cancel_request__init(&cr);
    cr.request_id = rid;
    Stp__ClientMsg m;
    stp__client_msg__init(&m);
    m.body_case = STP__CLIENT_MSG__BODY_CANCEL;
    m.cancel = &cr;
    if (wait) return s_send(c, &m, NULL);
    m.version = STP_PROTO_VERSION;
    return msg_try_send(c->s, NULL, 0, &m.base, NULL);
}

int pipe_client_cancel(pipe_client *c, uint64_t rid) {
    return s_cancel(c, rid, true);
}

static void s_fail(pipe_client *c, uint64_t rid, int code, const char *what) {
    if (s_forget(c, rid) && c->cb.on_error) c->cb.on_error(c->cb.ud, rid, code, what);
}

static void s_ping(pipe_client *c) {
    Stp__Ping p;
    stp__ping__init(&p);
    p.nonce = ++c->nonce;
    p.request_id = c->n ? c->rids[c->ping_turn++ % (unsigned)c->n] : 0;
    Stp__ClientMsg m;
    stp__client_msg__init(&m);
    m.body_case = STP__CLIENT_MSG__BODY_PING;
    m.ping = &p;
    s_send(c, &m, NULL);
    c->last_ping = msg_now_us();
}

static void s_handle(pipe_client *c, const Stp__ClientMsg *r) {
    switch (r->body_case) {
    case STP__CLIENT_MSG__BODY_ERROR: {
        const char *what = r->error->what ? r->error->what : "error";
        if (r->error->seq) {
            s_fail(c, r->error->seq, r->error->code, what);
        } else { /* about no request in particular (an invalid message): fail them all */
            while (c->n)
                s_fail(c, c->rids[0], r->error->code, what);
        }
        break;
    }
    case STP__CLIENT_MSG__BODY_PONG:
        if (r->pong->request_id && !r->pong->known && s_find(c, r->pong->request_id) >= 0) {
            char b[200];
            snprintf(b, sizeof b,
                     "the coordinator (pid %d) no longer knows this request: it was restarted; "
                     "the request is lost, retry it",
                     r->pong->pid);
            s_fail(c, r->pong->request_id, STP_EPEER, b);
        } else if (r->pong->request_id && r->pong->known && c->cb.on_alive &&
                   s_find(c, r->pong->request_id) >= 0) {
            c->cb.on_alive(c->cb.ud, r->pong->request_id);
        }
        break;
    case STP__CLIENT_MSG__BODY_LOGITS: {
        const Stp__PromptLogits *pl = r->logits;
        if (s_find(c, pl->request_id) >= 0 && c->cb.on_logits)
            c->cb.on_logits(c->cb.ud, pl->request_id, pl->first_row, pl->n_rows, pl->n_vocab,
                            pl->data.data, pl->data.len);
        break;
    }
    case STP__CLIENT_MSG__BODY_TOKEN:
        if (s_find(c, r->token->request_id) >= 0 && r->token->text.len && c->cb.on_text)
            c->cb.on_text(c->cb.ud, r->token->request_id, (const char *)r->token->text.data,
                          r->token->text.len);
        break;
    case STP__CLIENT_MSG__BODY_DONE: {
        const Stp__GenerateDone *d = r->done;
        if (!s_forget(c, d->request_id)) break;
        pipe_client_done pd = {.n_prompt = d->n_prompt,
                               .n_prompt_eval = d->n_prompt_eval,
                               .n_gen = d->n_gen,
                               .ids = d->ids,
                               .prompt_ms = d->prompt_ms,
                               .gen_ms = d->gen_ms,
                               .ipc_ms = d->ipc_ms,
                               .ttft_ms = d->ttft_ms,
                               .stages = {.neurons_total = d->neurons_total,
                                          .neurons_active = d->neurons_active,
                                          .down_neurons = d->down_neurons,
                                          .ns_router = (uint64_t)(d->router_ms * 1e6),
                                          .ns_attn = (uint64_t)(d->attn_ms * 1e6),
                                          .ns_moe = (uint64_t)(d->experts_ms * 1e6),
                                          .ns_head = (uint64_t)(d->head_ms * 1e6)},
                               .stop_reason = d->stop_reason ? d->stop_reason : "",
                               .tail = (const char *)d->tail_text.data,
                               .tail_len = d->tail_text.len};
        if (d->n_ids < (size_t)d->n_gen) pd.n_gen = (int)d->n_ids;
        if (c->cb.on_done) c->cb.on_done(c->cb.ud, d->request_id, &pd);
        break;
    }
    default: break;
    }
}

int pipe_client_poll(pipe_client *c, int timeout_ms, stp_err *err) {
    double now = msg_now_us();
    bool queued = false; /* replies waiting in the socket are not silence (a slow caller) */
    if (c->n && (now - c->last_rx) * 1e-3 > (double)STAGE_LIVENESS * c->hb &&
        !(msg_poll(&c->s, 1, &queued, 0) && queued)) {
        char b[200];
        snprintf(b, sizeof b,
                 "the coordinator is not answering (%d heartbeats of %d ms missed; is the "
                 "pipeline running? deploy/stpipe-up)",
                 STAGE_LIVENESS, c->hb);
        stp_err_set(err, STP_ETIMEDOUT, "%s", b);
        /* a coordinator that is only slow would run these on unseen: cancel them there too
         * (queued by the socket; dropped with it if the coordinator is gone) */
        for (int i = 0; i < c->n; i++)
            s_cancel(c, c->rids[i], false);
        while (c->n)
            s_fail(c, c->rids[0], STP_ETIMEDOUT, b);
        c->last_rx = now;
        return STP_ETIMEDOUT;
    }
    if (!c->n) c->last_rx = now; /* nothing expected */
    if (c->n && (now - c->last_ping) * 1e-3 >= c->hb && (now - c->last_rx) * 1e-3 >= c->hb)
        s_ping(c);
    if (timeout_ms > c->hb / 2) timeout_ms = c->hb / 2;
    bool rd = false;
    if (!msg_poll(&c->s, 1, &rd, timeout_ms) || !rd) return 0;
    for (int i = 0; i < 256; i++) {
        int ev = 0;
        size_t sz = sizeof ev;
        if (zmq_getsockopt(c->s, ZMQ_EVENTS, &ev, &sz) || !(ev & ZMQ_POLLIN)) break;
        msg_in in;
        stp_err e = {0};
        if (msg_recv(c->s, false, &in, &e) <= 0) continue;
        c->last_rx = msg_now_us();
        Stp__ClientMsg *r = stp__client_msg__unpack(NULL, in.len, in.data);
        msg_in_free(&in);
        if (!r || r->version != STP_PROTO_VERSION) {
            if (r) stp__client_msg__free_unpacked(r, NULL);
            while (c->n)
                s_fail(c, c->rids[0], STP_EPROTO, "invalid reply from the coordinator");
            return 0;
        }
        s_handle(c, r);
        stp__client_msg__free_unpacked(r, NULL);
    }
    return 0;
}
