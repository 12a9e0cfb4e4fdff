/* coordinator: request queue, tokenization, sampling and the attention-worker loop; see
 * coordinator.h and README.md. */
#include "coordinator.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <zmq.h>

#include "client.pb-c.h"
#include "eval.pb-c.h"
#include "gen/token_step.h"
#include "model/model.h"
#include "msg/msg.h"
#include "shm/shm.h"
#include "stats/stats.h"
#include "tokenizer/tokenizer.h"

#define STAGE "coordinator"
/* An eval that takes longer than 60 s plus 250 ms per token it carries fails the request (a
 * dead or stopped attention worker is found sooner, by its heartbeats; this bounds a live one
 * that stopped making progress). A 960-token prompt of the 21b preset under an 8 GiB budget
 * took over 60 s on 2 cores: the prefill reads most experts once per micro-batch. */
#define ATTN_TIMEOUT_MS 60000
#define ATTN_TIMEOUT_PER_TOKEN_MS 250
#define MAX_REBUILDS 4       /* attention-worker restarts one request survives */
#define MAX_PEER_RETRIES 2   /* evals failed by a dead expert worker or daemon, retried */
#define MAX_BUSY_RETRIES 600 /* "busy" answers to one request's evals, BUSY_RETRY_MS apart */
#define BUSY_RETRY_MS 20

typedef struct job {
    uint8_t id[MSG_ID_MAX];
    size_t id_len;
    Stp__ClientMsg *msg; /* owns the request */
} job;

typedef struct active {
    bool on;
    job j;
    const Stp__GenerateRequest *rq;
    token_step *step; /* sampling, end of generation, text */
    int32_t *ids;     /* prompt, then the generated tokens (capacity n_ctx + 1) */
    int n_prompt, n_gen, n_past;
    int n_sent;       /* tokens of the eval in flight */
    int sent_pid;     /* the attention worker's pid when it was sent (0: unknown) */
    int rebuilds;     /* KV-cache rebuilds after attention-worker restarts */
    int peer_retries; /* of those, after a peer failure behind the attention worker */
    /* the eval in flight, to send again when the worker answers "busy" (it is still running
     * an earlier eval of this request: a rebuild raced with a restart's Pong) */
    const int32_t *sent_tokens;
    int sent_pos0, busy_retries;
    bool sent_all;
    double busy_retry_at; /* 0: none pending */
    uint64_t seq;
    bool prompt_phase;
    bool depth_phase; /* the untimed prompt prefix (GenerateRequest.n_untimed) is in flight */
    double t_start, t_sent, t_prompt_ms, t_gen0, ipc_ms;
} active;

struct coordinator {
    stage_opts o;
    model *m;
    tokenizer *tok; /* NULL: ids only */
    int n_ctx, V, cap;
    void *zctx, *client, *attn, *pub;
    shm_region act;
    uint64_t act_epoch;
    job *queue;
    int q_head, q_len;
    active a;
    float *logits;
    uint64_t seq;
    stats *st;
    /* heartbeat with the attention worker (MDP style: a Ping every interval, silent for
     * STAGE_LIVENESS intervals = dead; a Pong from another pid = restarted) */
    int hb_ms, attn_pid;
    bool attn_alive;
    double attn_last_rx, attn_last_ping;
    uint64_t ping_nonce;
};

int coordinator_new(coordinator **out, const stage_opts *o, stp_err *err) {
    *out = NULL;
    coordinator *c = calloc(1, sizeof *c);
    if (!c) return stp_err_set(err, STP_ENOMEM, "out of memory");
    c->o = *o;
    c->cap = o->queue > 0 ? o->queue : 8;
    c->hb_ms = o->heartbeat_ms > 0 ? o->heartbeat_ms : STAGE_HEARTBEAT_MS_DEF;
    c->attn_alive = true;
    c->attn_last_rx = msg_now_us();
    int rc = stats_new(&c->st, STAGE, err);
    if (!rc) rc = model_open(&c->m, o->model, err);
    if (rc) goto fail;
    const model_config *mc = &c->m->cfg;
    c->V = mc->n_vocab;
    c->n_ctx = o->n_ctx > 0 ? o->n_ctx : (mc->n_ctx_train < 4096 ? mc->n_ctx_train : 4096);
    stp_err te = {0};
    if (tokenizer_new(&c->tok, c->m->gguf, &te)) {
        c->tok = NULL;
        stage_log(STAGE, "no tokenizer (%s): token ids only", te.msg);
    }
    c->queue = calloc((size_t)c->cap, sizeof(job));
    c->logits = malloc((size_t)c->V * sizeof(float));
    if (!c->queue || !c->logits) {
        rc = stp_err_set(err, STP_ENOMEM, "out of memory");
        goto fail;
    }
    c->seq = (uint64_t)msg_now_us() << 8;
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
    if (msg_endpoint(ep, sizeof ep, o->run_dir, "attn", err) ||
        !(c->attn = msg_socket(c->zctx, ZMQ_DEALER, ep, false, err)))
        goto fail;
    *out = c;
    return 0;
fail:
    coordinator_destroy(&c);
    return rc;
}

static void s_job_free(job *j) {
    if (j->msg) stp__client_msg__free_unpacked(j->msg, NULL);
    j->msg = NULL;
}

static void s_active_end(coordinator *c) {
    active *a = &c->a;
    if (!a->on) return;
    s_job_free(&a->j);
    token_step_destroy(&a->step);
    free(a->ids);
    memset(a, 0, sizeof *a);
}

void coordinator_destroy(coordinator **self_p) {
    coordinator *c = *self_p;
    if (!c) return;
    s_active_end(c);
    for (int i = 0; c->queue && i < c->q_len; i++)
        s_job_free(&c->queue[(c->q_head + i) % c->cap]);
    free(c->queue);
    free(c->logits);
    msg_close(&c->client);
    msg_close(&c->attn);
    msg_close(&c->pub);
    if (c->zctx) zmq_ctx_term(c->zctx);
    shm_region_close(&c->act);
    tokenizer_destroy(&c->tok);
    model_close(&c->m);
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

static void s_fail_active(coordinator *c, int code, const char *what) {
    active *a = &c->a;
    stage_log(STAGE, "request %llu failed: %s", (unsigned long long)a->rq->request_id, what);
    stats_add(c->st, "requests.failed", 1);
    s_client_error(c, a->j.id, a->j.id_len, NULL, a->rq->request_id, code, what);
    s_active_end(c);
}

/* ---------------------------------------------------------------------------------------- */
/* driving the attention worker */

static int s_send_eval(coordinator *c, const int32_t *tokens, int n, int pos0, bool all) {
    active *a = &c->a;
    Stp__EvalRequest q;
    stp__eval_request__init(&q);
    q.seq = a->seq = ++c->seq;
    q.n_tokens = (size_t)n;
    q.tokens = (int32_t *)tokens;
    q.pos0 = pos0;
    q.all_logits = all;
    a->n_sent = n;
    a->sent_tokens = tokens;
    a->sent_pos0 = pos0;
    a->sent_all = all;
    a->busy_retry_at = 0;
    a->sent_pid = c->attn_alive ? c->attn_pid : 0;
    Stp__EvalMsg m;
    stp__eval_msg__init(&m);
    m.version = STP_PROTO_VERSION;
    m.body_case = STP__EVAL_MSG__BODY_REQUEST;
    m.request = &q;
    a->t_sent = msg_now_us();
    stats_add(c->st, "msg.eval_sent", 1);
    return msg_send(c->attn, NULL, 0, &m.base, NULL);
}

static const char *s_check_request(const coordinator *c, const Stp__GenerateRequest *r, char *b,
                                   size_t cap) {
    if (r->n_prompt_ids && r->prompt_text && r->prompt_text[0]) return "give ids or text, not both";
    if (!r->n_prompt_ids && !(r->prompt_text && r->prompt_text[0])) return "the prompt is empty";
    if ((r->prompt_text && r->prompt_text[0]) && !c->tok)
        return "this model has no tokenizer: send token ids";
    for (size_t i = 0; i < r->n_prompt_ids; i++)
        if (r->prompt_ids[i] < 0 || r->prompt_ids[i] >= c->V) {
            snprintf(b, cap, "token id %d at index %zu is outside 0..%d", r->prompt_ids[i], i,
                     c->V - 1);
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
    return "";
}

/* The active request's token step: its sampling, max tokens, eos and whether it wants text. */
static int s_step_new(coordinator *c, stp_err *err) {
    active *a = &c->a;
    const Stp__GenerateRequest *r = a->rq;
    token_step_params tp = {.n_vocab = c->V,
                            .max_tokens = r->n_predict < 0 ? c->n_ctx - a->n_prompt : r->n_predict,
                            .ignore_eos = r->ignore_eos,
                            .tok = c->tok,
                            .no_text = !r->want_text};
    sampler_params_default(&tp.sp);
    if (r->sampling) {
        const Stp__SamplingParams *s = r->sampling;
        tp.sp.temperature = s->temperature;
        tp.sp.top_k = s->top_k;
        tp.sp.top_p = s->top_p;
        tp.sp.min_p = s->min_p;
        tp.sp.repeat_penalty = s->repeat_penalty;
        tp.sp.presence_penalty = s->presence_penalty;
        tp.sp.frequency_penalty = s->frequency_penalty;
        tp.sp.penalty_last_n = s->penalty_last_n;
        tp.sp.seed = s->seed;
    }
    return token_step_new(&a->step, &tp, err);
}

/* Starts the next queued request (tokenize, token step, prompt eval). */
static void s_start_next(coordinator *c) {
    while (!c->a.on && c->q_len) {
        job j = c->queue[c->q_head];
        c->q_head = (c->q_head + 1) % c->cap;
        c->q_len--;
        stats_set(c->st, "queue.depth", (uint64_t)c->q_len);
        active *a = &c->a;
        memset(a, 0, sizeof *a);
        a->on = true;
        a->j = j;
        a->rq = j.msg->request;
        a->t_start = msg_now_us();
        const Stp__GenerateRequest *r = a->rq;
        stp_err err = {0};
        if (r->n_prompt_ids) {
            a->n_prompt = (int)r->n_prompt_ids;
            a->ids = malloc(sizeof(int32_t) * (r->n_prompt_ids > (size_t)c->n_ctx
                                                   ? r->n_prompt_ids
                                                   : (size_t)c->n_ctx + 1));
            if (a->ids) memcpy(a->ids, r->prompt_ids, sizeof(int32_t) * r->n_prompt_ids);
        } else {
            char *chat = NULL;
            const char *text = r->prompt_text;
            if (r->chat) {
                chat_msg msgs[2];
                size_t n = 0;
                if (r->system && r->system[0]) msgs[n++] = (chat_msg){"system", r->system};
                msgs[n++] = (chat_msg){"user", r->prompt_text};
                if (tokenizer_chat_format(c->tok, msgs, n, true, &chat, &err)) {
                    s_fail_active(c, STP_EINVAL, err.msg);
                    continue;
                }
                text = chat;
            }
            size_t n_ids = 0;
            int flags = r->parse_special || r->chat ? TOK_PARSE_SPECIAL : 0;
            int rc = tokenizer_encode(c->tok, text, strlen(text), flags, &a->ids, &n_ids, &err);
            free(chat);
            if (rc) {
                s_fail_active(c, STP_EINVAL, err.msg);
                continue;
            }
            a->n_prompt = (int)n_ids;
        }
        if (!a->ids || a->n_prompt == 0) {
            s_fail_active(c, STP_EINVAL, "the prompt is empty (no tokens)");
            continue;
        }
        if (a->n_prompt <= c->n_ctx) { /* room for the generated tokens (KV rebuilds) */
            int32_t *grown = realloc(a->ids, sizeof(int32_t) * ((size_t)c->n_ctx + 1));
            if (!grown) {
                s_fail_active(c, STP_ENOMEM, "out of memory");
                continue;
            }
            a->ids = grown;
        }
        if (a->n_prompt > c->n_ctx) {
            char b[160];
            snprintf(b, sizeof b, "the prompt has %d tokens but the context holds %d", a->n_prompt,
                     c->n_ctx);
            s_fail_active(c, STP_ERANGE, b);
            continue;
        }
        if (s_step_new(c, &err)) {
            s_fail_active(c, STP_EINVAL, err.msg);
            continue;
        }
        token_step_prompt(a->step, a->ids, a->n_prompt);
        a->prompt_phase = true;
        a->depth_phase = r->n_untimed > 0 && r->n_untimed < a->n_prompt && !r->want_prompt_logits;
        if (a->depth_phase ? s_send_eval(c, a->ids, r->n_untimed, 0, false)
                           : s_send_eval(c, a->ids, a->n_prompt, 0, r->want_prompt_logits))
            s_fail_active(c, STP_EIO, "cannot reach the attention worker");
    }
}

/* Ends the active request; the text the token step still held goes out as the tail. */
static void s_done(coordinator *c, const char *reason) {
    active *a = &c->a;
    Stp__GenerateDone d;
    stp__generate_done__init(&d);
    token_step_out end;
    if (token_step_end(a->step, &end)) end.len = 0;
    d.request_id = a->rq->request_id;
    d.n_prompt = a->n_prompt;
    d.n_gen = a->n_gen;
    d.prompt_ms = a->t_prompt_ms;
    d.gen_ms = a->t_gen0 ? (msg_now_us() - a->t_gen0) * 1e-3 : 0;
    d.ipc_ms = a->ipc_ms;
    d.stop_reason = (char *)reason;
    d.tail_text.data = (uint8_t *)end.text;
    d.tail_text.len = end.len;
    Stp__ClientMsg m;
    stp__client_msg__init(&m);
    m.body_case = STP__CLIENT_MSG__BODY_DONE;
    m.done = &d;
    s_send_client(c, a->j.id, a->j.id_len, &m);
    stats_add(c->st, "requests.done", 1);
    stats_latency(c->st, "request", msg_now_us() - a->t_start);
    s_active_end(c);
}

/* An EvalReply for the active request: send logits, sample, stream, continue or finish. */
static void s_on_reply(coordinator *c, const Stp__EvalReply *r) {
    active *a = &c->a;
    double now = msg_now_us();
    stats_latency(c->st, a->prompt_phase ? "eval.prompt" : "eval.decode", now - a->t_sent);
    if (r->n_vocab != c->V || r->n_past != a->n_past + a->n_sent)
        return s_fail_active(c, STP_EPROTO, "the attention worker's reply does not match");
    a->n_past = r->n_past;
    if (a->depth_phase) { /* the untimed prefix is in the cache: now time the rest */
        a->depth_phase = false;
        a->t_start = now;
        if (s_send_eval(c, a->ids + a->n_past, a->n_prompt - a->n_past, a->n_past, false))
            s_fail_active(c, STP_EIO, "cannot reach the attention worker");
        return;
    }
    if (!a->prompt_phase) a->ipc_ms += r->ipc_ms;
    if (r->act_epoch != c->act_epoch || !c->act.base) {
        char name[160];
        stp_err e = {0};
        shm_region_close(&c->act);
        if (stage_shm_name(name, sizeof name, c->o.run_dir, "act", &e) ||
            shm_region_open(&c->act, name, false, &e) ||
            act_check(&c->act, c->m->cfg.n_embd, c->m->cfg.n_expert_used, c->V, &e) ||
            ((const act_header *)c->act.base)->epoch != r->act_epoch) {
            shm_region_close(&c->act);
            return s_fail_active(c, STP_EPEER, e.msg[0] ? e.msg : "activation region changed");
        }
        c->act_epoch = r->act_epoch;
    }
    const act_header *ah = (const act_header *)c->act.base;
    if (r->logits_offset != ah->off_logits)
        return s_fail_active(c, STP_EPROTO, "logits offset does not match the region");
    memcpy(c->logits, c->act.base + ah->off_logits, (size_t)c->V * sizeof(float));
    if (a->prompt_phase) {
        a->t_prompt_ms = (now - a->t_start) * 1e-3;
        if (a->rq->want_prompt_logits) {
            if (r->logits.len != (size_t)a->n_prompt * c->V * sizeof(float))
                return s_fail_active(c, STP_EPROTO, "prompt logits missing");
            Stp__PromptLogits pl;
            stp__prompt_logits__init(&pl);
            pl.request_id = a->rq->request_id;
            pl.first_row = 0;
            pl.n_rows = a->n_prompt;
            pl.n_vocab = c->V;
            pl.data = r->logits;
            Stp__ClientMsg m;
            stp__client_msg__init(&m);
            m.body_case = STP__CLIENT_MSG__BODY_LOGITS;
            m.logits = &pl;
            s_send_client(c, a->j.id, a->j.id_len, &m);
        }
        a->prompt_phase = false;
        a->t_gen0 = now;
    }
    token_step_out so;
    if (token_step_next(a->step, c->logits, &so))
        return s_fail_active(c, STP_ENOMEM, "out of memory");
    if (so.id < 0) return s_done(c, "length"); /* n_predict 0 */
    int32_t id = so.id;
    a->n_gen++;
    Stp__TokenEvent te;
    stp__token_event__init(&te);
    te.request_id = a->rq->request_id;
    te.index = a->n_gen - 1;
    te.id = id;
    te.eog = so.eog;
    te.text.data = (uint8_t *)so.text;
    te.text.len = so.len;
    Stp__ClientMsg m;
    stp__client_msg__init(&m);
    m.body_case = STP__CLIENT_MSG__BODY_TOKEN;
    m.token = &te;
    if (s_send_client(c, a->j.id, a->j.id_len, &m) == STP_EPEER) {
        stage_log(STAGE, "request %llu: the client is gone: cancelled",
                  (unsigned long long)a->rq->request_id);
        stats_add(c->st, "requests.cancelled", 1);
        return s_active_end(c);
    }
    a->ids[a->n_prompt + a->n_gen - 1] = id;
    stats_add(c->st, "tokens.generated", 1);
    if (so.finish == TOKEN_FINISH_EOS) return s_done(c, "eog");
    if (so.finish) return s_done(c, "length");
    if (a->n_past >= c->n_ctx) return s_done(c, "context");
    if (s_send_eval(c, &id, 1, a->n_past, false))
        s_fail_active(c, STP_EIO, "cannot reach the attention worker");
}

/* The attention worker restarted (or lost the eval): its KV cache is gone. Re-evaluate the
 * prompt and every token generated so far from position 0 (batched prefill gives the same bits
 * as token-by-token decode), then continue as if the lost eval had answered. */
static void s_rebuild(coordinator *c, const char *why) {
    active *a = &c->a;
    if (++a->rebuilds > MAX_REBUILDS) {
        char b[200];
        snprintf(b, sizeof b, "the attention worker failed %d times during this request (%s)",
                 a->rebuilds, why);
        return s_fail_active(c, STP_EPEER, b);
    }
    int n = a->n_prompt + a->n_gen;
    stage_log(STAGE, "request %llu: %s: rebuilding the KV cache (%d tokens, rebuild %d)",
              (unsigned long long)a->rq->request_id, why, n, a->rebuilds);
    stats_add(c->st, "attn.rebuilds", 1);
    a->n_past = 0;
    a->depth_phase = false;
    if (s_send_eval(c, a->ids, n, 0, a->prompt_phase && a->rq->want_prompt_logits))
        s_fail_active(c, STP_EIO, "cannot reach the attention worker");
}

static void s_ping_attn(coordinator *c) {
    Stp__Ping p;
    stp__ping__init(&p);
    p.nonce = ++c->ping_nonce;
    Stp__EvalMsg m;
    stp__eval_msg__init(&m);
    m.version = STP_PROTO_VERSION;
    m.body_case = STP__EVAL_MSG__BODY_PING;
    m.ping = &p;
    c->attn_last_ping = msg_now_us();
    if (msg_send(c->attn, NULL, 0, &m.base, NULL)) stats_add(c->st, "send_errors", 1);
}

/* Heartbeat bookkeeping once per loop: ping every interval; an attention worker silent for
 * STAGE_LIVENESS intervals counts as dead (the supervisor restarts it; its first Pong, from a
 * new pid, triggers the rebuild). */
static void s_heartbeat(coordinator *c) {
    double now = msg_now_us();
    if ((now - c->attn_last_ping) * 1e-3 >= c->hb_ms) s_ping_attn(c);
    if (c->attn_alive && (now - c->attn_last_rx) * 1e-3 > (double)STAGE_LIVENESS * c->hb_ms) {
        c->attn_alive = false;
        stats_add(c->st, "attn.liveness_lost", 1);
        stage_log(STAGE, "the attention worker (pid %d) missed %d heartbeats", c->attn_pid,
                  STAGE_LIVENESS);
    }
}

static void s_on_attn_pong(coordinator *c, const Stp__Pong *p) {
    int pid = p->pid;
    if (pid <= 0) return;
    bool changed = c->attn_pid && pid != c->attn_pid;
    if (changed) stage_log(STAGE, "the attention worker is now pid %d (was %d)", pid, c->attn_pid);
    if (!c->attn_alive) stats_add(c->st, "attn.liveness_back", 1);
    c->attn_alive = true;
    c->attn_pid = pid;
    active *a = &c->a;
    if (!a->on) return;
    if (a->sent_pid == 0) a->sent_pid = pid; /* sent before the first Pong: assume this one */
    if (a->sent_pid != pid) s_rebuild(c, "the attention worker restarted");
}

static void s_on_attn(coordinator *c, msg_in *in) {
    Stp__EvalMsg *m = stp__eval_msg__unpack(NULL, in->len, in->data);
    if (m && m->version == STP_PROTO_VERSION) c->attn_last_rx = msg_now_us();
    if (!m || m->version != STP_PROTO_VERSION) {
        if (stats_bad(c->st, "attn_reply")) stage_log(STAGE, "invalid message from attn-worker");
    } else if (m->body_case == STP__EVAL_MSG__BODY_PONG) {
        s_on_attn_pong(c, m->pong);
    } else if (!c->a.on) {
        stats_add(c->st, "attn.stale_replies", 1);
    } else if (m->body_case == STP__EVAL_MSG__BODY_ERROR && m->error->seq == c->a.seq &&
               m->error->code == STP_ERANGE && c->a.n_past > 0) {
        s_rebuild(c, m->error->what); /* a restarted worker is at position 0 */
    } else if (m->body_case == STP__EVAL_MSG__BODY_ERROR && m->error->seq == c->a.seq &&
               m->error->code == STP_EBUSY && c->a.busy_retries < MAX_BUSY_RETRIES) {
        /* the worker is still running an earlier eval of ours (its answer will be stale):
         * send this one again shortly */
        c->a.busy_retries++;
        c->a.busy_retry_at = msg_now_us() + BUSY_RETRY_MS * 1e3;
        stats_add(c->st, "attn.busy_retries", 1);
    } else if (m->body_case == STP__EVAL_MSG__BODY_ERROR && m->error->seq == c->a.seq &&
               (m->error->code == STP_EPEER || m->error->code == STP_ETIMEDOUT) &&
               c->a.peer_retries < MAX_PEER_RETRIES) {
        /* a stage behind the attention worker died or was restarted mid-eval: its KV cache
         * may hold part of the eval, so start over from position 0 */
        c->a.peer_retries++;
        s_rebuild(c, m->error->what);
    } else if (m->body_case == STP__EVAL_MSG__BODY_ERROR && m->error->seq == c->a.seq) {
        s_fail_active(c, m->error->code ? m->error->code : STP_EPEER, m->error->what);
    } else if (m->body_case == STP__EVAL_MSG__BODY_REPLY && m->reply->seq == c->a.seq) {
        s_on_reply(c, m->reply);
    } else {
        stats_add(c->st, "attn.stale_replies", 1);
    }
    if (m) stp__eval_msg__free_unpacked(m, NULL);
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
        p.known = c->a.on && c->a.rq->request_id == p.request_id;
        for (int i = 0; i < c->q_len && !p.known; i++)
            p.known = c->queue[(c->q_head + i) % c->cap].msg->request->request_id == p.request_id;
        Stp__ClientMsg r;
        stp__client_msg__init(&r);
        r.body_case = STP__CLIENT_MSG__BODY_PONG;
        r.pong = &p;
        s_send_client(c, in->id, in->id_len, &r);
    } else if (m->body_case != STP__CLIENT_MSG__BODY_REQUEST) {
        s_client_error(c, in->id, in->id_len, "unexpected", 0, STP_EPROTO,
                       "expected GenerateRequest or Ping");
    } else {
        const char *bad = s_check_request(c, m->request, b, sizeof b);
        if (*bad) {
            s_client_error(c, in->id, in->id_len, "request", m->request->request_id, STP_EINVAL,
                           bad);
        } else if (c->q_len == c->cap) {
            stats_add(c->st, "requests.busy", 1);
            s_client_error(c, in->id, in->id_len, NULL, m->request->request_id, STP_EBUSY,
                           "busy: the request queue is full, retry later");
        } else {
            job *j = &c->queue[(c->q_head + c->q_len) % c->cap];
            memcpy(j->id, in->id, in->id_len);
            j->id_len = in->id_len;
            j->msg = m;
            c->q_len++;
            stats_add(c->st, "requests.received", 1);
            stats_set(c->st, "queue.depth", (uint64_t)c->q_len);
            return; /* the queue owns m */
        }
    }
    stp__client_msg__free_unpacked(m, NULL);
}

int coordinator_run(coordinator *c, stp_err *err) {
    (void)err;
    stp_err e2 = {0};
    if (stage_ready(c->o.run_dir, "coordinator", &e2)) stage_log(STAGE, "%s", e2.msg);
    while (!stage_stopping()) {
        void *socks[2] = {c->client, c->attn};
        bool rd[2];
        long wait_ms = c->hb_ms / 2 < 250 ? c->hb_ms / 2 : 250;
        if (c->a.on && c->a.busy_retry_at) wait_ms = BUSY_RETRY_MS;
        msg_poll(socks, 2, rd, wait_ms);
        for (int s = 0; s < 2; s++) {
            if (!rd[s]) continue;
            for (int i = 0; i < 64; i++) {
                msg_in in;
                int rc = msg_recv(socks[s], s == 0, &in, &e2);
                if (rc == 0) break;
                stats_add(c->st, s == 0 ? "bytes.client_in" : "bytes.attn_in", in.len);
                if (rc < 0) {
                    if (stats_bad(c->st, "frames")) stage_log(STAGE, "invalid message: %s", e2.msg);
                } else if (s == 0) {
                    s_on_client(c, &in);
                } else {
                    s_on_attn(c, &in);
                }
                msg_in_free(&in);
            }
        }
        s_heartbeat(c);
        if (c->a.on && c->a.busy_retry_at && msg_now_us() >= c->a.busy_retry_at &&
            s_send_eval(c, c->a.sent_tokens, c->a.n_sent, c->a.sent_pos0, c->a.sent_all))
            s_fail_active(c, STP_EIO, "cannot reach the attention worker");
        if (c->a.on && (msg_now_us() - c->a.t_sent) * 1e-3 >
                           ATTN_TIMEOUT_MS + (double)ATTN_TIMEOUT_PER_TOKEN_MS * c->a.n_sent)
            s_fail_active(c, STP_ETIMEDOUT, "the attention worker did not answer in time");
        s_start_next(c);
        stats_publish(c->st, c->pub, 500, false);
    }
    stage_unready(c->o.run_dir, "coordinator");
    return 0;
}
