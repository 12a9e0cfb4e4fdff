/* coordinator: the pipeline's front door. Clients' GenerateRequests (client.sock, ROUTER: many
 * clients, many requests each) become requests of the continuous-batching scheduler
 * (common/gen/sched.h) over the attention worker (pipe_backend.h); its callbacks stream
 * TokenEvents and end with GenerateDone. See coordinator.h and README.md. */
#include "coordinator.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <zmq.h>

#include "client.pb-c.h"
#include "gen/sched.h"
#include "msg/msg.h"
#include "pipe_backend.h"
#include "stats/stats.h"
#include "tokenizer/tokenizer.h"

#define STAGE "coordinator"

typedef enum creq_state {
    CREQ_PENDING, /* received; submitted to the scheduler at the next turn of the loop */
    CREQ_DIRECT,  /* wants prompt logits or no token: runs on the backend alone when it is idle */
    CREQ_PREFIX,  /* its untimed prefix (n_untimed) runs as a request of its own */
    CREQ_RUNNING, /* in the scheduler */
} creq_state;

/* A client's request while the coordinator knows it. */
typedef struct creq {
    struct creq *next;
    struct coordinator *c;
    uint8_t id[MSG_ID_MAX]; /* the client's ROUTER id */
    size_t id_len;
    Stp__ClientMsg *msg; /* owns the GenerateRequest (and the stop strings) */
    const Stp__GenerateRequest *rq;
    uint64_t rid;
    int32_t *ids; /* the prompt */
    int n_prompt;
    creq_state state;
    volatile sig_atomic_t cancel; /* CancelRequest, or the client gone */
    bool gone;
    bool prefix_done; /* the untimed prefix ran (or there is none to run) */
    int n_events;
    double t_arrive_us, t_first_us, ipc0_ms;
    engine_stats es0; /* the backend's stage counters at the first token */
} creq;

struct coordinator {
    stage_opts o;
    int cap;
    void *zctx, *client, *pub;
    backend *b;
    sched *s;
    stats *st;
    char model_abs[4096]; /* the model file's absolute path (told to clients in Pong.model) */
    creq *head, *tail;    /* live requests in arrival order */
    int n_live;
};

int coordinator_new(coordinator **out, const stage_opts *o, stp_err *err) {
    *out = NULL;
    coordinator *c = calloc(1, sizeof *c);
    if (!c) return stp_err_set(err, STP_ENOMEM, "out of memory");
    c->o = *o;
    c->cap = o->queue > 0 ? o->queue : 8;
    int rc = stats_new(&c->st, STAGE, err);
    if (rc) goto fail;
    if (!o->model || !realpath(o->model, c->model_abs))
        snprintf(c->model_abs, sizeof c->model_abs, "%s", o->model ? o->model : "");
    c->zctx = zmq_ctx_new();
    char ep[512];
    rc = STP_EIO;
    if (msg_endpoint(ep, sizeof ep, o->run_dir, "client", err) ||
        !(c->client = msg_socket(c->zctx, ZMQ_ROUTER, ep, true, err)))
        goto fail;
    if (o->bind_tcp) {
        if (msg_tcp_endpoint(ep, sizeof ep, o->bind_tcp, o->bind_public, err) ||
            msg_bind_more(c->client, ep, err)) {
            rc = STP_EINVAL;
            goto fail;
        }
        stage_log(STAGE, "clients also on %s", ep);
    }
    if (msg_endpoint(ep, sizeof ep, o->run_dir, "stats-coordinator", err) ||
        !(c->pub = msg_socket(c->zctx, ZMQ_PUB, ep, true, err)))
        goto fail;
    *out = c;
    return 0;
fail:
    coordinator_destroy(&c);
    return rc;
}

static void s_creq_free(creq *r) {
    if (r->msg) stp__client_msg__free_unpacked(r->msg, NULL);
    free(r->ids);
    free(r);
}

/* Unlinks r from the live list and frees it. */
static void s_creq_end(coordinator *c, creq *r) {
    creq **pp = &c->head, *prev = NULL;
    while (*pp && *pp != r) {
        prev = *pp;
        pp = &(*pp)->next;
    }
    if (*pp) {
        *pp = r->next;
        if (c->tail == r) c->tail = prev;
        c->n_live--;
    }
    s_creq_free(r);
}

void coordinator_destroy(coordinator **self_p) {
    coordinator *c = *self_p;
    if (!c) return;
    sched_destroy(&c->s); /* done callbacks of running requests free them */
    while (c->head)
        s_creq_end(c, c->head);
    backend_destroy(&c->b);
    msg_close(&c->client);
    msg_close(&c->pub);
    if (c->zctx) zmq_ctx_term(c->zctx);
    stats_destroy(&c->st);
    free(c);
    *self_p = NULL;
}

/* ---------------------------------------------------------------------------------------- */
/* replies to clients */

/* 0, or STP_EPEER when the client is gone (its request can be dropped). */
static int s_send_client(coordinator *c, const uint8_t *id, size_t id_len, Stp__ClientMsg *m) {
    m->version = STP_PROTO_VERSION;
    int rc = msg_send(c->client, id, id_len, &m->base, NULL);
    if (rc) stats_add(c->st, rc == STP_EPEER ? "send_client_gone" : "send_errors", 1);
    return rc;
}

static int s_send_req(creq *r, Stp__ClientMsg *m) {
    if (r->gone) return STP_EPEER;
    int rc = s_send_client(r->c, r->id, r->id_len, m);
    if (rc == STP_EPEER) {
        stage_log(STAGE, "request %llu: the client is gone: cancelled", (unsigned long long)r->rid);
        r->gone = true;
        r->cancel = 1;
    }
    return rc;
}

static void s_client_error(coordinator *c, const uint8_t *id, size_t id_len, const char *kind,
                           uint64_t rid, int code, const char *what) {
    if (kind && stats_bad(c->st, kind)) stage_log(STAGE, "invalid request (%s): %s", kind, what);
    Stp__StpError e;
    stp__stp_error__init(&e);
    e.code = code;
    e.what = (char *)what;
    e.seq = rid;
    Stp__ClientMsg r;
    stp__client_msg__init(&r);
    r.body_case = STP__CLIENT_MSG__BODY_ERROR;
    r.error = &e;
    s_send_client(c, id, id_len, &r);
}

/* Fails r with an error to its client and forgets it (not while the scheduler holds it). */
static void s_fail(coordinator *c, creq *r, int code, const char *what) {
    stage_log(STAGE, "request %llu failed: %s", (unsigned long long)r->rid, what);
    stats_add(c->st, "requests.failed", 1);
    if (!r->gone) s_client_error(c, r->id, r->id_len, NULL, r->rid, code, what);
    s_creq_end(c, r);
}

static void s_send_done(creq *r, const char *reason, int n_prompt_eval, int n_gen,
                        const int32_t *ids, double prompt_ms, double gen_ms) {
    coordinator *c = r->c;
    Stp__GenerateDone d;
    stp__generate_done__init(&d);
    d.request_id = r->rid;
    d.n_prompt = r->n_prompt;
    d.n_prompt_eval = n_prompt_eval;
    d.n_gen = n_gen;
    d.n_ids = (size_t)n_gen;
    d.ids = (int32_t *)ids;
    d.prompt_ms = prompt_ms;
    d.gen_ms = gen_ms;
    d.ipc_ms = r->t_first_us ? pipe_backend_ipc_ms(c->b) - r->ipc0_ms : 0;
    d.ttft_ms = r->t_first_us ? (r->t_first_us - r->t_arrive_us) * 1e-3 : 0;
    const engine_stats *es = backend_stats(c->b);
    if (r->t_first_us && es) { /* the evals since the first token */
        d.router_ms = (double)(es->ns_router - r->es0.ns_router) * 1e-6;
        d.attn_ms = (double)(es->ns_attn - r->es0.ns_attn) * 1e-6;
        d.experts_ms = (double)(es->ns_moe - r->es0.ns_moe) * 1e-6;
        d.head_ms = (double)(es->ns_head - r->es0.ns_head) * 1e-6;
        d.neurons_total = es->neurons_total - r->es0.neurons_total;
        d.neurons_active = es->neurons_active - r->es0.neurons_active;
        d.down_neurons = es->down_neurons - r->es0.down_neurons;
    }
    d.stop_reason = (char *)reason;
    Stp__ClientMsg m;
    stp__client_msg__init(&m);
    m.body_case = STP__CLIENT_MSG__BODY_DONE;
    m.done = &d;
    s_send_req(r, &m);
    /* every request received ends counted once: done, cancelled or failed */
    stats_add(c->st, strcmp(reason, "cancel") ? "requests.done" : "requests.cancelled", 1);
    stats_latency(c->st, "request", msg_now_us() - r->t_arrive_us);
}

/* ---------------------------------------------------------------------------------------- */
/* the scheduler's callbacks */

static int s_emit(void *ud, const char *text, size_t len) {
    creq *r = ud;
    if (!r->t_first_us) {
        r->t_first_us = msg_now_us();
        r->ipc0_ms = pipe_backend_ipc_ms(r->c->b);
        const engine_stats *es = backend_stats(r->c->b);
        if (es) r->es0 = *es;
    }
    Stp__TokenEvent te;
    stp__token_event__init(&te);
    te.request_id = r->rid;
    te.index = r->n_events++;
    te.id = -1;
    te.text.data = (uint8_t *)text;
    te.text.len = len;
    Stp__ClientMsg m;
    stp__client_msg__init(&m);
    m.body_case = STP__CLIENT_MSG__BODY_TOKEN;
    m.token = &te;
    stats_add(r->c->st, "events.token", 1);
    return s_send_req(r, &m) == STP_EPEER || r->cancel;
}

static const char *s_reason(const creq *r, const gen_result *res) {
    coordinator *c = r->c;
    if (res->finish == GEN_FINISH_CANCEL) return "cancel";
    if (res->finish == GEN_FINISH_STOP)
        return res->n_gen > 0 && c->b->tok && tokenizer_is_eog(c->b->tok, res->ids[res->n_gen - 1])
                   ? "eog"
                   : "stop";
    return r->rq->n_predict > 0 && res->n_gen >= r->rq->n_predict ? "length" : "context";
}

static void s_on_done(void *ud, gen_result *res, int rc, const stp_err *err) {
    creq *r = ud;
    coordinator *c = r->c;
    if (r->state == CREQ_PREFIX && !rc && !r->cancel) {
        /* the untimed prefix is in a slot: now the whole prompt, timed (prefix reuse) */
        r->state = CREQ_PENDING;
        gen_result_fini(res);
        return;
    }
    if (rc) {
        s_fail(c, r, rc, err && err->msg[0] ? err->msg : "generation failed");
    } else {
        const char *reason = r->state == CREQ_PREFIX ? "cancel" : s_reason(r, res);
        stats_add(c->st, "tokens.generated", (uint64_t)res->n_gen);
        s_send_done(r, reason, res->n_prompt - res->n_cached, res->n_gen, res->ids,
                    res->t_prompt * 1e3, res->t_gen * 1e3);
        s_creq_end(c, r);
    }
    gen_result_fini(res);
}

/* ---------------------------------------------------------------------------------------- */
/* requests */

static const char *s_check_request(const coordinator *c, const Stp__GenerateRequest *r, char *b,
                                   size_t cap) {
    int V = backend_n_vocab(c->b);
    const bool has_text = r->prompt_text && r->prompt_text[0];
    if ((r->n_prompt_ids > 0) + has_text + (r->n_messages > 0) > 1)
        return "give one of ids, text or messages";
    if (!r->n_prompt_ids && !has_text && !r->n_messages) return "the prompt is empty";
    if ((has_text || r->n_messages) && !c->b->tok)
        return "this model has no tokenizer: send token ids";
    for (size_t i = 0; i < r->n_messages; i++) {
        if (!r->messages[i] || !r->messages[i]->role || !r->messages[i]->role[0] ||
            !r->messages[i]->content) {
            snprintf(b, cap, "message %zu has no role", i);
            return b;
        }
        if (!tokenizer_chat_role_ok(r->messages[i]->role)) {
            snprintf(b, cap, "message %zu: role must be system, user or assistant", i);
            return b;
        }
    }
    for (size_t i = 0; i < r->n_prompt_ids; i++)
        if (r->prompt_ids[i] < 0 || r->prompt_ids[i] >= V) {
            snprintf(b, cap, "token id %d at index %zu is outside 0..%d", r->prompt_ids[i], i,
                     V - 1);
            return b;
        }
    if (r->n_predict < -1) return "n_predict must be >= -1";
    if (r->sampling) {
        const Stp__SamplingParams *s = r->sampling;
        if (!isfinite(s->temperature) || !isfinite(s->top_p) || !isfinite(s->min_p) ||
            !isfinite(s->repeat_penalty) || !isfinite(s->presence_penalty) ||
            !isfinite(s->frequency_penalty) || s->top_k < 0 || s->penalty_last_n < 0)
            return "invalid sampling parameters";
    }
    if (r->n_stop > 16) return "at most 16 stop strings";
    return "";
}

/* The prompt ids of r: given, or the tokenized text, or ChatML (messages, or chat: system and
 * prompt_text as the user message) whose messages are plain text. */
static int s_prompt(coordinator *c, creq *r, stp_err *err) {
    const Stp__GenerateRequest *q = r->rq;
    if (q->n_prompt_ids) {
        r->ids = malloc(sizeof(int32_t) * q->n_prompt_ids);
        if (!r->ids) return stp_err_set(err, STP_ENOMEM, "out of memory");
        memcpy(r->ids, q->prompt_ids, sizeof(int32_t) * q->n_prompt_ids);
        r->n_prompt = (int)q->n_prompt_ids;
        return 0;
    }
    size_t n_ids = 0;
    int rc;
    if (q->n_messages || q->chat) { /* ChatML: the messages' text never becomes special tokens */
        chat_msg two[2], *msgs = two;
        size_t n = 0;
        if (q->n_messages) {
            if (!(msgs = malloc(q->n_messages * sizeof *msgs)))
                return stp_err_set(err, STP_ENOMEM, "out of memory");
            for (; n < q->n_messages; n++)
                msgs[n] = (chat_msg){q->messages[n]->role, q->messages[n]->content};
        } else {
            if (q->system && q->system[0]) msgs[n++] = (chat_msg){"system", q->system};
            msgs[n++] = (chat_msg){"user", q->prompt_text};
        }
        rc = tokenizer_chat_encode(c->b->tok, msgs, n, true, &r->ids, &n_ids, err);
        if (msgs != two) free(msgs);
    } else {
        int flags = q->parse_special ? TOK_PARSE_SPECIAL : 0;
        rc = tokenizer_encode(c->b->tok, q->prompt_text, strlen(q->prompt_text), flags, &r->ids,
                              &n_ids, err);
    }
    if (rc) return rc;
    r->n_prompt = (int)n_ids;
    if (!n_ids) return stp_err_set(err, STP_EINVAL, "the prompt is empty (no tokens)");
    return 0;
}

static void s_gen_params(const creq *r, gen_params *gp) {
    const Stp__GenerateRequest *q = r->rq;
    memset(gp, 0, sizeof *gp);
    sampler_params_default(&gp->sp);
    if (q->sampling) {
        const Stp__SamplingParams *s = q->sampling;
        gp->sp.temperature = s->temperature;
        gp->sp.top_k = s->top_k;
        gp->sp.top_p = s->top_p;
        gp->sp.min_p = s->min_p;
        gp->sp.repeat_penalty = s->repeat_penalty;
        gp->sp.presence_penalty = s->presence_penalty;
        gp->sp.frequency_penalty = s->frequency_penalty;
        gp->sp.penalty_last_n = s->penalty_last_n;
        gp->sp.seed = s->seed;
    }
    gp->max_tokens = q->n_predict > 0 ? q->n_predict : 0;
    gp->stop = (const char *const *)q->stop;
    gp->n_stop = (int)q->n_stop;
    gp->ignore_eos = q->ignore_eos;
}

/* Hands r to the scheduler: its untimed prefix first when it has one, else the whole prompt. */
static void s_submit(coordinator *c, creq *r) {
    sched_req sr = {.prompt = r->ids,
                    .n_prompt = r->n_prompt,
                    .emit = s_emit,
                    .done = s_on_done,
                    .ud = r,
                    .cancel = &r->cancel};
    s_gen_params(r, &sr.gp);
    int n_untimed = r->rq->n_untimed;
    if (r->state == CREQ_PENDING && n_untimed > 0 && n_untimed < r->n_prompt &&
        !r->rq->want_prompt_logits && !r->prefix_done) {
        /* one greedy token after the prefix leaves exactly the prefix in a slot */
        r->state = CREQ_PREFIX;
        r->prefix_done = true;
        sr.n_prompt = n_untimed;
        sampler_params_default(&sr.gp.sp);
        sr.gp.max_tokens = 1;
        sr.gp.n_stop = 0;
        sr.gp.stop = NULL;
        sr.emit = NULL;
    } else {
        r->state = CREQ_RUNNING;
        r->t_arrive_us = r->t_arrive_us ? r->t_arrive_us : msg_now_us();
    }
    stp_err err = {0};
    if (sched_submit(c->s, &sr, &err)) s_fail(c, r, err.code ? err.code : STP_ENOMEM, err.msg);
}

/* A request that wants prompt logits or no token, on the backend alone (the scheduler is idle):
 * the prompt in sequence 0 (all rows when asked), PromptLogits, then either GenerateDone (no
 * token) or the scheduler, which evaluates the prompt again (sequence 0 is emptied first, so
 * its prefix is not taken for reused). */
static void s_run_direct(coordinator *c, creq *r) {
    const Stp__GenerateRequest *q = r->rq;
    backend *b = c->b;
    stp_err err = {0};
    int V = backend_n_vocab(b);
    if (r->n_prompt > backend_n_ctx(b)) {
        char m[160];
        snprintf(m, sizeof m, "the prompt has %d tokens but the context holds %d", r->n_prompt,
                 backend_n_ctx(b));
        return s_fail(c, r, STP_ERANGE, m);
    }
    backend_seq_keep(b, 0, 0);
    double t0 = msg_now_us();
    int rc;
    float *all = NULL;
    if (q->want_prompt_logits) {
        all = malloc((size_t)r->n_prompt * V * sizeof(float));
        rc = all ? pipe_backend_eval_all(b, 0, r->ids, r->n_prompt, all, &err)
                 : stp_err_set(&err, STP_ENOMEM, "out of memory for the prompt logits");
    } else {
        rc = backend_eval(b, r->ids, r->n_prompt, NULL, &err);
    }
    double prompt_ms = (msg_now_us() - t0) * 1e-3;
    backend_seq_keep(b, 0, 0);
    if (rc) {
        free(all);
        return s_fail(c, r, rc, err.msg);
    }
    if (all) {
        Stp__PromptLogits pl;
        stp__prompt_logits__init(&pl);
        pl.request_id = r->rid;
        pl.first_row = 0;
        pl.n_rows = r->n_prompt;
        pl.n_vocab = V;
        pl.data.data = (uint8_t *)all;
        pl.data.len = (size_t)r->n_prompt * V * sizeof(float);
        Stp__ClientMsg m;
        stp__client_msg__init(&m);
        m.body_case = STP__CLIENT_MSG__BODY_LOGITS;
        m.logits = &pl;
        s_send_req(r, &m);
        free(all);
    }
    if (q->n_predict == 0 || r->cancel) {
        s_send_done(r, r->cancel ? "cancel" : "length", r->n_prompt, 0, NULL, prompt_ms, 0);
        return s_creq_end(c, r);
    }
    s_submit(c, r);
}

/* Submits what waits (requests received, prefixes done); direct requests when idle. */
static void s_dispatch(coordinator *c) {
    for (creq *r = c->head, *next; r; r = next) {
        next = r->next;
        if (r->state == CREQ_PENDING) {
            if (r->cancel) {
                s_send_done(r, "cancel", 0, 0, NULL, 0, 0);
                s_creq_end(c, r);
            } else {
                s_submit(c, r);
            }
        } else if (r->state == CREQ_DIRECT && r->cancel) {
            s_send_done(r, "cancel", 0, 0, NULL, 0, 0);
            s_creq_end(c, r);
        } else if (r->state == CREQ_DIRECT && !sched_busy(c->s)) {
            s_run_direct(c, r);
        }
    }
    stats_set(c->st, "queue.depth", (uint64_t)sched_n_waiting(c->s));
    stats_set(c->st, "requests.running", (uint64_t)sched_n_running(c->s));
    stats_set(c->st, "sched.prefill_slices", sched_get_stats(c->s)->prefill_slices);
    stats_set(c->st, "sched.tokens_reused", sched_get_stats(c->s)->tokens_reused);
}

static creq *s_find(coordinator *c, const uint8_t *id, size_t id_len, uint64_t rid) {
    for (creq *r = c->head; r; r = r->next)
        if (r->rid == rid && (!id || (r->id_len == id_len && !memcmp(r->id, id, id_len)))) return r;
    return NULL;
}

/* A GenerateRequest: checked, tokenized and queued (the list owns m). */
static void s_on_request(coordinator *c, msg_in *in, Stp__ClientMsg *m) {
    char b[200];
    const Stp__GenerateRequest *q = m->request;
    const char *bad = s_check_request(c, q, b, sizeof b);
    if (*bad) {
        s_client_error(c, in->id, in->id_len, "request", q->request_id, STP_EINVAL, bad);
        stp__client_msg__free_unpacked(m, NULL);
        return;
    }
    if (c->n_live >= backend_n_seq(c->b) + c->cap) {
        stats_add(c->st, "requests.busy", 1);
        s_client_error(c, in->id, in->id_len, NULL, q->request_id, STP_EBUSY,
                       "busy: the request queue is full, retry later");
        stp__client_msg__free_unpacked(m, NULL);
        return;
    }
    creq *r = calloc(1, sizeof *r);
    if (!r) {
        s_client_error(c, in->id, in->id_len, NULL, q->request_id, STP_ENOMEM, "out of memory");
        stp__client_msg__free_unpacked(m, NULL);
        return;
    }
    r->c = c;
    memcpy(r->id, in->id, in->id_len);
    r->id_len = in->id_len;
    r->msg = m;
    r->rq = q;
    r->rid = q->request_id;
    r->t_arrive_us = msg_now_us();
    r->state = q->want_prompt_logits || q->n_predict == 0 ? CREQ_DIRECT : CREQ_PENDING;
    if (c->tail)
        c->tail->next = r;
    else
        c->head = r;
    c->tail = r;
    c->n_live++;
    stats_add(c->st, "requests.received", 1);
    stp_err err = {0};
    int rc = s_prompt(c, r, &err);
    if (rc) return s_fail(c, r, STP_EINVAL, err.msg);
    if (r->n_prompt > backend_n_ctx(c->b)) {
        snprintf(b, sizeof b, "the prompt has %d tokens but the context holds %d", r->n_prompt,
                 backend_n_ctx(c->b));
        return s_fail(c, r, STP_ERANGE, b);
    }
}

static void s_on_client(coordinator *c, msg_in *in) {
    Stp__ClientMsg *m = stp__client_msg__unpack(NULL, in->len, in->data);
    if (!m)
        return s_client_error(c, in->id, in->id_len, "undecodable", 0, STP_EPROTO,
                              "not a ClientMsg");
    char b[200];
    if (m->version != STP_PROTO_VERSION) {
        snprintf(b, sizeof b, "protocol version %u, expected %u", m->version, STP_PROTO_VERSION);
        s_client_error(c, in->id, in->id_len, "version", 0, STP_EPROTO, b);
    } else if (m->body_case == STP__CLIENT_MSG__BODY_PING) {
        Stp__Pong p;
        stp__pong__init(&p);
        p.nonce = m->ping->nonce;
        p.stage = STAGE;
        p.pid = (int32_t)getpid();
        p.request_id = m->ping->request_id;
        p.known = s_find(c, NULL, 0, p.request_id) != NULL;
        p.n_seq = backend_n_seq(c->b);
        p.n_ctx = backend_n_ctx(c->b);
        p.model = c->model_abs;
        Stp__ClientMsg r;
        stp__client_msg__init(&r);
        r.body_case = STP__CLIENT_MSG__BODY_PONG;
        r.pong = &p;
        s_send_client(c, in->id, in->id_len, &r);
    } else if (m->body_case == STP__CLIENT_MSG__BODY_CANCEL) {
        creq *r = s_find(c, in->id, in->id_len, m->cancel->request_id);
        if (r) r->cancel = 1; /* the scheduler ends it at its next token */
        stats_add(c->st, "requests.cancel_asked", 1);
    } else if (m->body_case == STP__CLIENT_MSG__BODY_REQUEST) {
        return s_on_request(c, in, m); /* owns m */
    } else {
        s_client_error(c, in->id, in->id_len, "unexpected", 0, STP_EPROTO,
                       "expected GenerateRequest, CancelRequest or Ping");
    }
    stp__client_msg__free_unpacked(m, NULL);
}

/* Reads what clients sent (at most 64 messages). */
static void s_drain_clients(coordinator *c) {
    stp_err e = {0};
    for (int i = 0; i < 64; i++) {
        int ev = 0;
        size_t sz = sizeof ev;
        if (zmq_getsockopt(c->client, ZMQ_EVENTS, &ev, &sz) || !(ev & ZMQ_POLLIN)) break;
        msg_in in;
        int rc = msg_recv(c->client, true, &in, &e);
        if (rc == 0) break;
        if (rc < 0) {
            if (stats_bad(c->st, "frames")) stage_log(STAGE, "invalid message: %s", e.msg);
            continue;
        }
        stats_add(c->st, "bytes.client_in", in.len);
        s_on_client(c, &in);
        msg_in_free(&in);
    }
}

/* The backend's wait hook: clients are answered while an eval runs (new requests wait in the
 * list until the step is over). */
static void s_while_eval(void *ud) {
    coordinator *c = ud;
    if (!c->b) return; /* still connecting: clients wait */
    s_drain_clients(c);
    stats_publish(c->st, c->pub, 500, false);
}

int coordinator_run(coordinator *c, stp_err *err) {
    pipe_backend_params bp = {.run_dir = c->o.run_dir,
                              .model_path = c->o.model,
                              .zctx = c->zctx,
                              .hb_ms = c->o.heartbeat_ms > 0 ? c->o.heartbeat_ms
                                                             : stage_heartbeat_ms(c->o.run_dir),
                              .n_ctx = c->o.n_ctx,
                              .n_ubatch = c->o.n_ubatch,
                              .n_seq = c->o.n_seq,
                              .st = c->st,
                              .stage = STAGE,
                              .wait_fn = s_while_eval,
                              .wait_ud = c,
                              .wait_sock = c->client};
    int rc = pipe_backend_new(&c->b, &bp, err);
    if (!rc)
        rc = sched_new(
            &c->s, c->b,
            &(sched_params){.kv_positions = c->o.kv_pool, .prefill_layers = c->o.prefill_layers},
            err);
    if (rc) return stage_stopping() ? 0 : rc;
    stp_err e2 = {0};
    if (stage_ready(c->o.run_dir, "coordinator", &e2)) stage_log(STAGE, "%s", e2.msg);
    while (!stage_stopping()) {
        void *socks[2] = {c->client, pipe_backend_socket(c->b)};
        bool rd[2];
        bool busy = sched_busy(c->s);
        long hb = bp.hb_ms / 2 < 250 ? bp.hb_ms / 2 : 250;
        msg_poll(socks, 2, rd, busy ? 0 : hb);
        s_drain_clients(c);
        pipe_backend_idle(c->b);
        s_dispatch(c);
        if (sched_busy(c->s)) sched_step(c->s);
        s_dispatch(c); /* prefixes done in this step go on at once */
        stats_publish(c->st, c->pub, 500, false);
    }
    stage_unready(c->o.run_dir, "coordinator");
    return 0;
}
