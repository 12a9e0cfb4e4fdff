/* pipe_backend: backend.h over the attention worker (EvalRequest per pass, logits from the
 * activation region, heartbeats, retries, KV rebuild by replaying every slot); see
 * pipe_backend.h. */
#include "pipe_backend.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <zmq.h>

#include "eval.pb-c.h"
#include "model/forward.h"
#include "model/kv_cache.h"
#include "msg/msg.h"
#include "msg/stage.h"
#include "shm/shm.h"

/* An eval that takes longer than 60 s plus 250 ms per token it carries fails (a dead or stopped
 * attention worker is found sooner, by its heartbeats; this bounds a live one that stopped
 * making progress; a long prompt under a memory budget reads most experts once per
 * micro-batch). */
#define ATTN_TIMEOUT_MS 60000
#define ATTN_TIMEOUT_PER_TOKEN_MS 250
#define MAX_REBUILDS 4       /* lost caches (restarts, peer failures) one eval survives */
#define MAX_PEER_RETRIES 2   /* of those, evals failed by a dead expert worker or daemon */
#define MAX_BUSY_RETRIES 600 /* "busy" answers to one eval, BUSY_RETRY_MS apart */
#define BUSY_RETRY_MS 20
#define WAIT_HOOK_MS 100 /* the wait hook runs at least this often while an eval waits */

typedef struct pipe_slot {
    int32_t *ids; /* the tokens at positions 0..n_past-1 (capacity n_ctx) */
    int n_past;
    int high;     /* 1 + the highest position sent since the slot was last emptied (a chunk part
                   * way wrote past n_past): the keep rule is asked with it, as the worker does */
    bool release; /* cut back by seq_keep: the worker still holds (and maps) more */
} pipe_slot;

typedef struct pipe_backend {
    backend base;
    pipe_backend_params p;
    model *m;
    void *attn;
    shm_region act;
    uint64_t act_epoch;
    int n_seq, n_ctx, n_ubatch, V;
    pipe_slot *slots;
    kv_cache shape; /* layers' windows and ring sizes only (kv_cache_keep_max), no buffers */
    bool lost;      /* the worker lost its caches: the next eval replays every slot first */
    uint64_t seq;
    /* heartbeat (MDP style: a Ping every interval, silent for STAGE_LIVENESS intervals = dead,
     * a Pong from another pid = restarted) */
    int attn_pid;
    bool alive;
    double last_rx, last_ping;
    uint64_t nonce;
    double ipc_ms;
    engine_stats es;
} pipe_backend;

/* What one wait for a reply ended with. */
enum { WAIT_MSG = 0, WAIT_LOST = 1 };

static void s_ping(pipe_backend *p) {
    Stp__Ping pg;
    stp__ping__init(&pg);
    pg.nonce = ++p->nonce;
    Stp__EvalMsg m;
    stp__eval_msg__init(&m);
    m.version = STP_PROTO_VERSION;
    m.body_case = STP__EVAL_MSG__BODY_PING;
    m.ping = &pg;
    p->last_ping = msg_now_us();
    if (msg_send(p->attn, NULL, 0, &m.base, NULL)) stats_add(p->p.st, "send_errors", 1);
}

/* Heartbeat bookkeeping: ping every interval; a worker silent for STAGE_LIVENESS intervals
 * counts as dead (the supervisor restarts it; its first Pong, from a new pid, marks the caches
 * lost). */
static void s_heartbeat(pipe_backend *p) {
    double now = msg_now_us();
    if ((now - p->last_ping) * 1e-3 >= p->p.hb_ms) s_ping(p);
    if (p->alive && (now - p->last_rx) * 1e-3 > (double)STAGE_LIVENESS * p->p.hb_ms) {
        p->alive = false;
        stats_add(p->p.st, "attn.liveness_lost", 1);
        stage_log(p->p.stage, "the attention worker (pid %d) missed %d heartbeats", p->attn_pid,
                  STAGE_LIVENESS);
    }
}

static void s_on_pong(pipe_backend *p, const Stp__Pong *pg) {
    if (pg->pid <= 0) return;
    if (p->attn_pid && pg->pid != p->attn_pid) {
        stage_log(p->p.stage, "the attention worker is now pid %d (was %d)", pg->pid, p->attn_pid);
        p->lost = true;
    }
    if (!p->alive) stats_add(p->p.st, "attn.liveness_back", 1);
    p->alive = true;
    p->attn_pid = pg->pid;
}

/* Receives one message from the worker: Pongs are handled; anything else is returned (NULL:
 * nothing, or a Pong). */
static Stp__EvalMsg *s_recv(pipe_backend *p) {
    msg_in in;
    stp_err e = {0};
    int rc = msg_recv(p->attn, false, &in, &e);
    if (rc == 0) return NULL;
    if (rc < 0) {
        if (stats_bad(p->p.st, "frames")) stage_log(p->p.stage, "invalid message: %s", e.msg);
        return NULL;
    }
    stats_add(p->p.st, "bytes.attn_in", in.len);
    Stp__EvalMsg *m = stp__eval_msg__unpack(NULL, in.len, in.data);
    msg_in_free(&in);
    if (!m || m->version != STP_PROTO_VERSION) {
        if (stats_bad(p->p.st, "attn_reply"))
            stage_log(p->p.stage, "invalid message from attn-worker");
        if (m) stp__eval_msg__free_unpacked(m, NULL);
        return NULL;
    }
    p->last_rx = msg_now_us();
    if (m->body_case == STP__EVAL_MSG__BODY_PONG) {
        s_on_pong(p, m->pong);
        stp__eval_msg__free_unpacked(m, NULL);
        return NULL;
    }
    return m;
}

void pipe_backend_idle(backend *b) {
    pipe_backend *p = (pipe_backend *)b;
    for (int i = 0; i < 64; i++) {
        int ev = 0;
        size_t sz = sizeof ev;
        if (zmq_getsockopt(p->attn, ZMQ_EVENTS, &ev, &sz) || !(ev & ZMQ_POLLIN)) break;
        Stp__EvalMsg *m = s_recv(p);
        if (m) {
            stats_add(p->p.st, "attn.stale_replies", 1);
            stp__eval_msg__free_unpacked(m, NULL);
        }
    }
    s_heartbeat(p);
}

void *pipe_backend_socket(backend *b) {
    return ((pipe_backend *)b)->attn;
}

const model_config *pipe_backend_config(const backend *b) {
    return &((const pipe_backend *)b)->m->cfg;
}

double pipe_backend_ipc_ms(const backend *b) {
    return ((const pipe_backend *)b)->ipc_ms;
}

/* Waits for the reply (or error) to eval `seq` until deadline_us, running the heartbeat and the
 * wait hook. WAIT_MSG with *out set, WAIT_LOST (the worker restarted: the eval is lost), or
 * STP_ETIMEDOUT / STP_EIO (stopping). */
static int s_wait(pipe_backend *p, uint64_t seq, double deadline_us, Stp__EvalMsg **out) {
    *out = NULL;
    for (;;) {
        if (p->lost) return WAIT_LOST;
        double now = msg_now_us();
        if (now >= deadline_us) return STP_ETIMEDOUT;
        if (stage_stopping()) return STP_EIO;
        void *socks[2] = {p->attn, p->p.wait_sock};
        bool rd[2] = {false, false};
        long ms = p->p.hb_ms / 2 < WAIT_HOOK_MS ? p->p.hb_ms / 2 : WAIT_HOOK_MS;
        msg_poll(socks, p->p.wait_sock ? 2 : 1, rd, ms);
        if (rd[0]) {
            for (int i = 0; i < 64; i++) {
                int ev = 0;
                size_t sz = sizeof ev;
                if (zmq_getsockopt(p->attn, ZMQ_EVENTS, &ev, &sz) || !(ev & ZMQ_POLLIN)) break;
                Stp__EvalMsg *m = s_recv(p);
                if (!m) continue;
                uint64_t s = m->body_case == STP__EVAL_MSG__BODY_REPLY   ? m->reply->seq
                             : m->body_case == STP__EVAL_MSG__BODY_ERROR ? m->error->seq
                                                                         : 0;
                if (s == seq) {
                    *out = m;
                    return WAIT_MSG;
                }
                stats_add(p->p.st, "attn.stale_replies", 1);
                stp__eval_msg__free_unpacked(m, NULL);
            }
        }
        s_heartbeat(p);
        if (p->p.wait_fn) p->p.wait_fn(p->p.wait_ud);
    }
}

/* Sleeps ms while keeping the heartbeat and the wait hook going. */
static void s_pause(pipe_backend *p, int ms) {
    double until = msg_now_us() + ms * 1e3;
    Stp__EvalMsg *m = NULL;
    if (s_wait(p, 0, until, &m) == WAIT_MSG && m) stp__eval_msg__free_unpacked(m, NULL);
}

/* The activation region the reply's offsets refer to (reopened when its epoch changed). */
static int s_act(pipe_backend *p, uint64_t epoch, stp_err *err) {
    if (epoch == p->act_epoch && p->act.base) return 0;
    char name[160];
    shm_region_close(&p->act);
    const model_config *c = &p->m->cfg;
    if (stage_shm_name(name, sizeof name, p->p.run_dir, "act", err) ||
        shm_region_open(&p->act, name, false, err) ||
        act_check(&p->act, c->n_embd, c->n_expert_used, p->V, err)) {
        shm_region_close(&p->act);
        return STP_EPEER;
    }
    if (((const act_header *)p->act.base)->epoch != epoch) {
        shm_region_close(&p->act);
        return stp_err_set(err, STP_EPEER, "the activation region changed");
    }
    p->act_epoch = epoch;
    return 0;
}

/* One EvalRequest of n entries (slots, pos0s, token arrays, counts, want flags); on success
 * *reply_out is the reply message (the caller frees it). Returns 0, WAIT_LOST, or an error
 * (negative; retriable ones are reported through *code). */
typedef struct pipe_entry {
    int slot, pos0, n;
    const int32_t *tokens;
    bool want;
    int upto, from; /* backend_seq_eval's */
    bool through;   /* the entry's tokens go through every layer: its positions are taken */
} pipe_entry;

static int s_send(pipe_backend *p, const pipe_entry *e, int n, bool all, uint64_t *seq_out) {
    Stp__EvalSeq *qs = calloc((size_t)n, sizeof *qs);
    Stp__EvalSeq **qp = calloc((size_t)n, sizeof *qp);
    int rc = STP_ENOMEM;
    if (qs && qp) {
        for (int i = 0; i < n; i++) {
            stp__eval_seq__init(&qs[i]);
            qs[i].slot = (uint32_t)e[i].slot;
            qs[i].pos0 = e[i].pos0;
            qs[i].n_tokens = (size_t)e[i].n;
            qs[i].tokens = (int32_t *)e[i].tokens;
            qs[i].want_logits = e[i].want;
            qs[i].upto = (uint32_t)e[i].upto;
            qs[i].from = (uint32_t)e[i].from;
            qp[i] = &qs[i];
        }
        Stp__EvalRequest q;
        stp__eval_request__init(&q);
        q.seq = *seq_out = ++p->seq;
        q.n_seqs = (size_t)n;
        q.seqs = qp;
        q.all_logits = all;
        Stp__EvalMsg m;
        stp__eval_msg__init(&m);
        m.version = STP_PROTO_VERSION;
        m.body_case = STP__EVAL_MSG__BODY_REQUEST;
        m.request = &q;
        stats_add(p->p.st, "msg.eval_sent", 1);
        rc = msg_send(p->attn, NULL, 0, &m.base, NULL);
    }
    free(qs);
    free(qp);
    return rc;
}

/* Sends entries and waits for a reply whose n_past match, retrying "busy" answers. Returns 0
 * (*reply set), WAIT_LOST (the caches are gone: replay and send again), or a failure. */
static int s_exchange(pipe_backend *p, const pipe_entry *e, int n, bool all, int *peer_retries,
                      Stp__EvalMsg **reply, stp_err *err) {
    *reply = NULL;
    long tokens = 0;
    bool from_zero = true;
    for (int i = 0; i < n; i++) {
        tokens += e[i].n;
        from_zero = from_zero && e[i].pos0 == 0;
    }
    for (int busy = 0;;) {
        uint64_t seq = 0;
        double t0 = msg_now_us();
        if (s_send(p, e, n, all, &seq))
            return stp_err_set(err, STP_EIO, "cannot reach the attention worker");
        Stp__EvalMsg *m = NULL;
        int rc = s_wait(
            p, seq, t0 + (ATTN_TIMEOUT_MS + (double)ATTN_TIMEOUT_PER_TOKEN_MS * tokens) * 1e3, &m);
        if (rc == WAIT_LOST) return WAIT_LOST;
        if (rc == STP_ETIMEDOUT)
            return stp_err_set(err, rc, "the attention worker did not answer in time");
        if (rc) return stp_err_set(err, rc, "stopping");
        stats_latency(p->p.st, tokens == n ? "eval.decode" : "eval.prompt", msg_now_us() - t0);
        if (m->body_case == STP__EVAL_MSG__BODY_REPLY) {
            *reply = m;
            return 0;
        }
        if (m->body_case != STP__EVAL_MSG__BODY_ERROR) {
            stp__eval_msg__free_unpacked(m, NULL);
            return stp_err_set(err, STP_EPROTO, "unexpected answer from the attention worker");
        }
        int code = m->error->code ? m->error->code : STP_EPEER;
        stp_err_set(err, code, "attention worker: %s", m->error->what ? m->error->what : "");
        stp__eval_msg__free_unpacked(m, NULL);
        if (code == STP_ERANGE && !from_zero) {
            /* a restarted worker is at position 0 */
            p->lost = true;
            return WAIT_LOST;
        }
        if (code == STP_EBUSY && busy < MAX_BUSY_RETRIES) {
            /* the worker still runs an earlier eval of ours (its answer will be stale) */
            busy++;
            stats_add(p->p.st, "attn.busy_retries", 1);
            s_pause(p, BUSY_RETRY_MS);
            if (p->lost) return WAIT_LOST;
            continue;
        }
        if ((code == STP_EPEER || code == STP_ETIMEDOUT) && *peer_retries < MAX_PEER_RETRIES) {
            /* a stage behind the worker died or was restarted mid-eval: its caches may hold
             * part of the eval, so start over from position 0 */
            ++*peer_retries;
            stage_log(p->p.stage, "%s: replaying", err->msg);
            p->lost = true;
            return WAIT_LOST;
        }
        return code;
    }
}

/* After lost caches: replays every non-empty slot from position 0 (no logits). */
static int s_replay(pipe_backend *p, int *rebuilds, int *peer_retries, stp_err *err) {
    pipe_entry *e = calloc((size_t)p->n_seq, sizeof *e);
    if (!e) return stp_err_set(err, STP_ENOMEM, "out of memory");
    int rc = WAIT_LOST;
    while (rc == WAIT_LOST) {
        if (++*rebuilds > MAX_REBUILDS) {
            rc = stp_err_set(err, STP_EPEER, "the attention worker failed %d times during an eval",
                             *rebuilds);
            break;
        }
        p->lost = false;
        int n = 0, tokens = 0;
        for (int s = 0; s < p->n_seq; s++)
            if (p->slots[s].n_past > 0) {
                e[n++] = (pipe_entry){s, 0, p->slots[s].n_past, p->slots[s].ids, false, 0, 0, true};
                tokens += p->slots[s].n_past;
            }
        stats_add(p->p.st, "attn.rebuilds", 1);
        if (!n) {
            rc = 0;
            break;
        }
        stage_log(p->p.stage, "rebuilding the attention worker's caches (%d slots, %d tokens)", n,
                  tokens);
        Stp__EvalMsg *m = NULL;
        rc = s_exchange(p, e, n, false, peer_retries, &m, err);
        if (m) stp__eval_msg__free_unpacked(m, NULL);
    }
    free(e);
    return rc;
}

static void s_forget(pipe_backend *p, const backend_seq_eval *q, int n_q) {
    for (int i = 0; i < n_q; i++)
        p->slots[q[i].seq].n_past = p->slots[q[i].seq].high = 0;
}

/* Slots cut back by seq_keep and not in q (those are cut back by their entry's pos0) give their
 * memory back now: one request of entries without tokens (the worker keeps pos0 positions and
 * releases the rest; nothing is evaluated). Best effort: a failure only leaves the memory
 * mapped until the slot's next eval, which cuts it back anyway. */
static void s_release(pipe_backend *p, const backend_seq_eval *q, int n_q) {
    pipe_entry e[64];
    int n = 0;
    for (int s = 0; s < p->n_seq && n < (int)(sizeof e / sizeof e[0]); s++) {
        if (!p->slots[s].release) continue;
        bool in_q = false;
        for (int i = 0; i < n_q; i++)
            in_q = in_q || q[i].seq == s;
        p->slots[s].release = false;
        if (!in_q) e[n++] = (pipe_entry){s, p->slots[s].n_past, 0, NULL, false, 0, 0, true};
    }
    if (!n || p->lost) return;
    int peer_retries = MAX_PEER_RETRIES; /* no retry: it is only memory */
    Stp__EvalMsg *m = NULL;
    stp_err err = {0};
    if (s_exchange(p, e, n, false, &peer_retries, &m, &err) == 0) {
        stats_add(p->p.st, "kv.releases", (uint64_t)n);
    } else {
        stage_log("coordinator", "releasing %d slots' memory failed: %s", n, err.msg);
    }
    if (m) stp__eval_msg__free_unpacked(m, NULL);
}

static int s_eval_any(pipe_backend *p, const backend_seq_eval *q, int n_q, float *all,
                      stp_err *err) {
    if (n_q < 1 || (all && n_q != 1)) return stp_err_set(err, STP_EINVAL, "empty evaluation");
    for (int i = 0; i < n_q; i++) {
        if (q[i].seq < 0 || q[i].seq >= p->n_seq || q[i].n < 1 || !q[i].tokens)
            return stp_err_set(err, STP_EINVAL, "bad evaluation entry (seq %d, %d tokens)",
                               q[i].seq, q[i].n);
        for (int j = 0; j < i; j++)
            if (q[j].seq == q[i].seq)
                return stp_err_set(err, STP_EINVAL, "sequence %d twice in one eval", q[i].seq);
        if (q[i].n > p->n_ctx - p->slots[q[i].seq].n_past)
            return stp_err_set(err, STP_ERANGE, "the context is full (%d + %d > %d)",
                               p->slots[q[i].seq].n_past, q[i].n, p->n_ctx);
        for (int t = 0; t < q[i].n; t++)
            if (q[i].tokens[t] < 0 || q[i].tokens[t] >= p->V)
                return stp_err_set(err, STP_EINVAL, "token id %d outside 0..%d", q[i].tokens[t],
                                   p->V - 1);
    }
    s_release(p, q, n_q);
    pipe_entry *e = calloc((size_t)n_q, sizeof *e);
    if (!e) return stp_err_set(err, STP_ENOMEM, "out of memory");
    int rebuilds = 0, peer_retries = 0, rc = WAIT_LOST, total = 0;
    Stp__EvalMsg *m = NULL;
    for (int i = 0; i < n_q; i++) {
        const pipe_slot *s = &p->slots[q[i].seq];
        const bool through = forward_part_through(q[i].upto, p->m->cfg.n_layer);
        e[i] = (pipe_entry){q[i].seq,  s->n_past, q[i].n, q[i].tokens, q[i].logits != NULL,
                            q[i].upto, q[i].from, through};
        total += q[i].n;
    }
    while (rc == WAIT_LOST) {
        if (p->lost && (rc = s_replay(p, &rebuilds, &peer_retries, err))) break;
        rc = s_exchange(p, e, n_q, all != NULL, &peer_retries, &m, err);
        if (rc == WAIT_LOST && ++rebuilds > MAX_REBUILDS) {
            rc = stp_err_set(err, STP_EPEER, "the attention worker failed %d times during an eval",
                             rebuilds);
            p->lost = true;
        }
    }
    if (!rc) {
        const Stp__EvalReply *r = m->reply;
        if (r->n_vocab != p->V || r->n_n_past != (size_t)n_q || r->n_logits_offset != (size_t)n_q)
            rc = stp_err_set(err, STP_EPROTO, "the attention worker's reply does not match");
        for (int i = 0; !rc && i < n_q; i++)
            if (r->n_past[i] != e[i].pos0 + (e[i].through ? e[i].n : 0))
                rc = stp_err_set(err, STP_EPROTO,
                                 "the attention worker's reply does not match (slot %d at %d, "
                                 "expected %d)",
                                 e[i].slot, r->n_past[i], e[i].pos0 + (e[i].through ? e[i].n : 0));
        if (!rc && all && r->logits.len != (size_t)total * p->V * sizeof(float))
            rc = stp_err_set(err, STP_EPROTO, "prompt logits missing");
        bool any = false;
        for (int i = 0; i < n_q; i++)
            any = any || q[i].logits;
        if (!rc && any) rc = s_act(p, r->act_epoch, err);
        for (int i = 0; !rc && i < n_q; i++) {
            if (!q[i].logits || !e[i].through) continue;
            uint64_t off = r->logits_offset[i];
            if (off < sizeof(act_header) || off + (uint64_t)p->V * sizeof(float) > p->act.size) {
                rc = stp_err_set(err, STP_EPROTO, "logits offset outside the activation region");
                break;
            }
            memcpy(q[i].logits, p->act.base + off, (size_t)p->V * sizeof(float));
        }
        if (!rc && all) memcpy(all, r->logits.data, r->logits.len);
        if (!rc) {
            for (int i = 0; i < n_q; i++) {
                pipe_slot *s = &p->slots[q[i].seq];
                if (s->high < e[i].pos0 + e[i].n) s->high = e[i].pos0 + e[i].n;
                if (!e[i].through) continue; /* a chunk part way: the worker holds its rows */
                memcpy(s->ids + s->n_past, q[i].tokens, sizeof(int32_t) * (size_t)q[i].n);
                s->n_past += q[i].n;
            }
            p->ipc_ms += r->ipc_ms;
            for (int i = 0; i < n_q; i++) /* a chunk part way counts when it is through */
                p->es.tokens += e[i].through ? (uint64_t)e[i].n : 0;
            p->es.neurons_total += r->total_neurons;
            p->es.neurons_active += r->active_neurons;
            p->es.down_neurons += r->down_neurons;
            p->es.ns_router += (uint64_t)(r->router_ms * 1e6);
            p->es.ns_attn += (uint64_t)(r->attn_ms * 1e6);
            p->es.ns_moe += (uint64_t)(r->experts_ms * 1e6);
            p->es.ns_head += (uint64_t)(r->head_ms * 1e6);
        }
    }
    if (m) stp__eval_msg__free_unpacked(m, NULL);
    free(e);
    if (rc) {
        /* the worker may hold part of it: those sequences start over (the next eval's pos0 0) */
        s_forget(p, q, n_q);
        stats_add(p->p.st, "eval.failed", 1);
    }
    return rc;
}

static int s_eval(backend *b, const backend_seq_eval *q, int n_q, stp_err *err) {
    return s_eval_any((pipe_backend *)b, q, n_q, NULL, err);
}

int pipe_backend_eval_all(backend *b, int seq, const int32_t *tokens, int n, float *all,
                          stp_err *err) {
    const backend_seq_eval q = {seq, tokens, n, NULL, 0, 0};
    return s_eval_any((pipe_backend *)b, &q, 1, all, err);
}

static int s_seq_keep(backend *b, int seq, int n_keep) {
    pipe_backend *p = (pipe_backend *)b;
    if (seq < 0 || seq >= p->n_seq) return 0;
    pipe_slot *s = &p->slots[seq];
    if (n_keep > s->n_past) n_keep = s->n_past;
    int kept = kv_cache_keep_max(&p->shape, s->high > s->n_past ? s->high : s->n_past, n_keep);
    if (kept < s->n_past || s->high > s->n_past) s->release = true;
    s->n_past = kept;
    if (!kept) s->high = 0;
    return s->n_past;
}

static int s_seq_n_past(const backend *b, int seq) {
    const pipe_backend *p = (const pipe_backend *)b;
    return seq >= 0 && seq < p->n_seq ? p->slots[seq].n_past : 0;
}
static int s_n_seq(const backend *b) {
    return ((const pipe_backend *)b)->n_seq;
}
static int s_n_batch(const backend *b) {
    return ((const pipe_backend *)b)->n_ubatch;
}
static int s_n_vocab(const backend *b) {
    return ((const pipe_backend *)b)->V;
}
static int s_n_ctx(const backend *b) {
    return ((const pipe_backend *)b)->n_ctx;
}
static const engine_stats *s_stats(const backend *b) {
    return &((const pipe_backend *)b)->es;
}

static void s_destroy(backend *b) {
    pipe_backend *p = (pipe_backend *)b;
    for (int s = 0; p->slots && s < p->n_seq; s++)
        free(p->slots[s].ids);
    free(p->slots);
    free(p->shape.layers);
    msg_close(&p->attn);
    shm_region_close(&p->act);
    tokenizer *t = (tokenizer *)p->base.tok;
    tokenizer_destroy(&t);
    model_close(&p->m);
    free(p);
}

/* A chunk can go through the layers over several requests: the attention worker keeps its
 * rows (forward_part) between them, and starts it again from layer 0 when it lost them. */
static int s_n_layer(const backend *b) {
    return ((const pipe_backend *)b)->m->cfg.n_layer;
}

static const backend_ops s_ops = {s_eval,    s_seq_keep, s_seq_n_past, s_n_seq,   s_n_batch,
                                  s_n_vocab, s_n_ctx,    s_stats,      s_destroy, s_n_layer};

/* Pings until the worker's first Pong: its pid and shape. */
static int s_handshake(pipe_backend *p, int *n_seq, int *n_ctx, int *n_ubatch, stp_err *err) {
    for (;;) {
        if (stage_stopping()) return stp_err_set(err, STP_EIO, "stopping");
        double now = msg_now_us();
        if ((now - p->last_ping) * 1e-3 >= p->p.hb_ms) s_ping(p);
        bool rd = false;
        msg_poll(&p->attn, 1, &rd, WAIT_HOOK_MS);
        if (p->p.wait_fn) p->p.wait_fn(p->p.wait_ud);
        if (!rd) continue;
        msg_in in;
        stp_err e = {0};
        if (msg_recv(p->attn, false, &in, &e) <= 0) continue;
        Stp__EvalMsg *m = stp__eval_msg__unpack(NULL, in.len, in.data);
        msg_in_free(&in);
        if (m && m->version == STP_PROTO_VERSION && m->body_case == STP__EVAL_MSG__BODY_PONG &&
            m->pong->pid > 0) {
            p->attn_pid = m->pong->pid;
            *n_seq = m->pong->n_seq;
            *n_ctx = m->pong->n_ctx;
            *n_ubatch = m->pong->n_ubatch;
            p->last_rx = msg_now_us();
            p->alive = true;
            stp__eval_msg__free_unpacked(m, NULL);
            return 0;
        }
        if (m) stp__eval_msg__free_unpacked(m, NULL);
    }
}

int pipe_backend_new(backend **out, const pipe_backend_params *pp, stp_err *err) {
    *out = NULL;
    pipe_backend *p = calloc(1, sizeof *p);
    if (!p) return stp_err_set(err, STP_ENOMEM, "out of memory");
    p->base.ops = &s_ops;
    p->p = *pp;
    if (p->p.hb_ms <= 0) p->p.hb_ms = STAGE_HEARTBEAT_MS_DEF;
    if (!p->p.stage) p->p.stage = "coordinator";
    p->seq = (uint64_t)msg_now_us() << 8;
    int rc = model_open(&p->m, pp->model_path, err);
    if (rc) goto fail;
    const model_config *c = &p->m->cfg;
    p->V = c->n_vocab;
    stp_err te = {0};
    tokenizer *tok = NULL;
    if (tokenizer_new(&tok, p->m->gguf, &te)) {
        tok = NULL;
        stage_log(p->p.stage, "no tokenizer (%s): token ids only", te.msg);
    }
    p->base.tok = tok;
    const char *slash = strrchr(pp->model_path, '/');
    snprintf(p->base.name, sizeof p->base.name, "%s", slash ? slash + 1 : pp->model_path);
    char *dot = strstr(p->base.name, ".gguf");
    if (dot && !dot[5]) *dot = 0;
    char ep[512];
    if (msg_endpoint(ep, sizeof ep, pp->run_dir, "attn", err) ||
        !(p->attn = msg_socket(pp->zctx, ZMQ_DEALER, ep, false, err))) {
        rc = STP_EIO;
        goto fail;
    }
    int n_seq = 0, n_ctx = 0, n_ubatch = 0;
    if ((rc = s_handshake(p, &n_seq, &n_ctx, &n_ubatch, err))) goto fail;
    p->n_seq = n_seq > 0 ? n_seq : pp->n_seq > 0 ? pp->n_seq : 1;
    p->n_ctx = n_ctx > 0               ? n_ctx
               : pp->n_ctx > 0         ? pp->n_ctx
               : c->n_ctx_train < 4096 ? c->n_ctx_train
                                       : 4096;
    p->n_ubatch = n_ubatch > 0 ? n_ubatch : pp->n_ubatch > 0 ? pp->n_ubatch : 512;
    if (p->n_ubatch > p->n_ctx) p->n_ubatch = p->n_ctx;
    p->slots = calloc((size_t)p->n_seq, sizeof *p->slots);
    p->shape.layers = calloc((size_t)c->n_layer, sizeof *p->shape.layers);
    if (!p->slots || !p->shape.layers) goto oom;
    for (int s = 0; s < p->n_seq; s++)
        if (!(p->slots[s].ids = malloc(sizeof(int32_t) * (size_t)p->n_ctx))) goto oom;
    /* the worker's ring sizes (kv_cache_new's rule) for kv_cache_keep_max */
    p->shape.n_layer = c->n_layer;
    p->shape.n_ctx = p->n_ctx;
    for (int il = 0; il < c->n_layer; il++) {
        kv_layer *l = &p->shape.layers[il];
        l->window = model_config_layer_window(c, il);
        l->cap = p->n_ctx;
        if (l->window > 0 && l->window + p->n_ubatch < p->n_ctx) l->cap = l->window + p->n_ubatch;
    }
    stage_log(p->p.stage, "attention worker pid %d: %d slots of %d positions, micro-batch %d",
              p->attn_pid, p->n_seq, p->n_ctx, p->n_ubatch);
    *out = &p->base;
    return 0;
oom:
    rc = stp_err_set(err, STP_ENOMEM, "out of memory");
fail:
    s_destroy(&p->base);
    return rc;
}
