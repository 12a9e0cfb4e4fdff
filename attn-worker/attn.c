/* attn: the attention worker: the seam that runs common/model's layer loop (forward_ubatch)
 * with the expert workers (decisions, residency, dispatch), and message handling; see attn.h. */
#include "attn.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <unistd.h>

#include <zmq.h>

#include "eval.pb-c.h"
#include "layer.pb-c.h"
#include "model/attention.h"
#include "model/forward.h"
#include "model/kv_cache.h"
#include "model/model.h"
#include "model/moe.h"
#include "model/ops.h"
#include "msg/lane.h"
#include "msg/msg.h"
#include "router.pb-c.h"
#include "shm/shm.h"
#include "stats/stats.h"
#include "util/fileio.h"

#define STAGE "attn-worker"
#define MAX_WORKERS LANE_MAX /* expert sockets + attn.sock fit in MSG_POLL_MAX */
#define RETRY_MS 2000        /* resend work to a silent expert worker after this long */
#define GIVEUP_MS                                                                                  \
    30000 /* then fail the eval (the coordinator retries it twice: > the                           \
           * supervisor's 30 s restart backoff) */

/* need: the layer waits for the Residency; quiet: a need answered only with an error (the
 * layer takes its experts from the pool table as they land); hint: all resident; prefetch: the
 * next layer's prediction */
typedef enum { DECISION_NEED, DECISION_QUIET, DECISION_HINT, DECISION_PREFETCH } decision_kind;

/* A hint held back until the next message to the daemon (s_send_decision). */
typedef struct pending_hint {
    uint64_t seq;
    int layer, n;
    uint32_t ex[STP_MAX_EXPERTS], cnt[STP_MAX_EXPERTS];
} pending_hint;

/* One dispatch of a layer's experts: the resident ones go out at once, the ones the storage
 * daemon is still reading follow in more batches as they land (at most ATTN_BATCHES in all). */
#define ATTN_BATCHES 4
typedef struct work_batch {
    uint64_t seq; /* its own work sequence number (workers answer each batch) */
    int n_tokens, n_pending;
    int nl[MAX_WORKERS];
    Stp__ExpertLoc copies[STP_MAX_EXPERTS];
    Stp__ExpertLoc *lists[MAX_WORKERS][STP_MAX_EXPERTS];
    bool pending[MAX_WORKERS];
    bool via_lane[MAX_WORKERS];     /* sent through the worker's lane (else its zmq socket) */
    uint32_t lane_pos[MAX_WORKERS]; /* the lane entry it went into */
    double sent[MAX_WORKERS];
    double compute_us; /* longest worker compute of the batch */
} work_batch;

/* The layer being run: what s_routed decided before attention, for s_run after it. */
typedef struct layer_plan {
    uint64_t seq; /* the decision's sequence number */
    int n, n_ready;
    bool resident; /* every expert READY when the decision went out */
    uint32_t ex[STP_MAX_EXPERTS], cnt[STP_MAX_EXPERTS]; /* experts ascending, tokens on each */
    Stp__ExpertLoc loc[STP_MAX_EXPERTS];
    bool ready[STP_MAX_EXPERTS];
} layer_plan;

struct attn_worker {
    stage_opts o;
    model *m;
    threadpool *tp;
    compute_ctx cc;
    int n_seq;     /* sequence slots (--parallel) */
    kv_cache **kv; /* (n_seq) each slot's caches */
    int *n_past;   /* (n_seq) positions each slot holds */
    int *wend;     /* (n_seq) during an eval: 1 + the highest position written (0: none) */
    int *high;     /* (n_seq) 1 + the highest position written since the slot was last emptied (a
                    * ring overwrote what lay below it whatever n_past says now: the keep rule is
                    * asked with it, as engine.c does) */
    forward_seg *segs; /* (n_ubatch) one micro-batch's segments */
    int *old_past;     /* (n_seq) during an eval: each entry's n_past before it */
    forward_part part; /* a prompt chunk part way through the layers (EvalSeq.upto) */
    int32_t *r_past;   /* (n_seq) the reply's n_past per entry */
    uint64_t *r_off;   /* (n_seq) the reply's logits offset per entry */
    attn_scratch *as;
    int n_ctx, n_ubatch, n_workers;
    bool decode;  /* the micro-batch being run is one token per sequence (but a chunk part way) */
    int n_dec;    /* decode: its first n_dec rows are those tokens (the rest a chunk's) */
    int prefetch; /* decode: predicted experts of the next layer sent ahead (0: off) */
    shm_region act;
    act_header *ah;
    lane_block *lanes;       /* in the activation region; NULL: ZeroMQ only (STP_LANES=0) */
    _Atomic uint64_t *floor; /* the region's work floor (lane.h), with or without lanes */
    uint8_t *lane_buf;       /* (LANE_MSG_MAX) a reply copied out of a lane */
    shm_region pool; /* the weight pool, read-only: slot states for the residency fast path */
    float *h, *selw_shm, *y;  /* in the activation region */
    float *logits_shm;        /* in the activation region: (n_seq, n_vocab), row s: slot s */
    int32_t *sel;             /* in the activation region */
    float *x, *ffn, *rlogits; /* (n_ubatch, n_embd) / (n_ubatch, n_expert) */
    forward_heads_buf *hb;    /* the LM head's rows (n_seq at once) */
    /* token_embd rows are read with pread, not through the mapping: a touched mapped row
     * brings in its whole (up to 2 MiB) page-cache folio, counted in this process's PSS, and a
     * long conversation would map most of the table outside the memory budget */
    int embd_fd;
    uint64_t embd_off; /* file offset of token_embd's data */
    uint8_t *embd_row;
    void *zctx, *sock, *storage, *pub;
    void *exp[MAX_WORKERS];
    stats *st;
    uint64_t seq; /* per-layer message sequence, increasing across restarts */
    work_batch batch[ATTN_BATCHES];
    layer_plan cur;
    pending_hint *hints; /* (n_layer) held back, oldest first */
    uint64_t *route;     /* (n_layer, n_expert) decode tokens routed to each expert: table
                            route.decode of the stats (routing entropy in stpipe-membench) */
    int n_hints;
    /* per-eval accumulators */
    double ipc_us;
    uint64_t active, total, down;
    double router_us, attn_us, experts_us, head_us; /* the roofline's stages */
};

/* ---------------------------------------------------------------------------------------- */
/* set-up */

int attn_worker_new(attn_worker **out, const stage_opts *o, stp_err *err) {
    *out = NULL;
    attn_worker *a = calloc(1, sizeof *a);
    if (!a) return stp_err_set(err, STP_ENOMEM, "out of memory");
    a->embd_fd = -1;
    a->o = *o;
    a->n_workers = o->workers < MAX_WORKERS ? o->workers : MAX_WORKERS;
    a->prefetch = o->prefetch; /* --prefetch / STP_PREFETCH; -1: n_expert_used, once open */
    int rc = stats_new(&a->st, STAGE, err);
    if (!rc) rc = model_open(&a->m, o->model, err);
    if (rc) goto fail;
    const model_config *c = &a->m->cfg;
    a->embd_fd = open(o->model, O_RDONLY | O_CLOEXEC);
    if (a->embd_fd < 0) {
        rc = stp_err_set(err, STP_EIO, "%s: %s", o->model, strerror(errno));
        goto fail;
    }
    a->embd_off =
        (uint64_t)((const uint8_t *)a->m->tok_embd.data - (const uint8_t *)gguf_base(a->m->gguf));
    if (a->prefetch < 0) a->prefetch = c->n_expert_used;
    if (a->prefetch > c->n_expert) a->prefetch = c->n_expert;
    a->n_ctx = o->n_ctx > 0 ? o->n_ctx : (c->n_ctx_train < 4096 ? c->n_ctx_train : 4096);
    if (a->n_ctx > c->n_ctx_train) {
        rc = stp_err_set(err, STP_EINVAL, "context %d is larger than the model's %d", a->n_ctx,
                         c->n_ctx_train);
        goto fail;
    }
    a->n_ubatch = o->n_ubatch > 0 ? o->n_ubatch : 512;
    if (a->n_ubatch > a->n_ctx) a->n_ubatch = a->n_ctx;
    if ((rc = threadpool_new(&a->tp, o->threads, err))) goto fail;
    if ((rc = stage_pin_threads(o, a->tp, 0, err))) goto fail;
    threadpool_set_spin_ns(a->tp, STAGE_SPIN_NS); /* the cores go to the other stages between */
    a->cc.ops = kern_ops_get();
    a->cc.tp = a->tp;
    /* attention and LM head in the row-interleaved Q4_0 layout (same bits, faster); the
     * experts' weights are the storage daemon's, never touched here */
    if ((rc = model_enable_packing(a->m, MODEL_PACK_ATTN | MODEL_PACK_HEAD, err))) goto fail;
    if ((rc = model_pack_all(a->m, a->tp, NULL, NULL, err))) goto fail;
    a->n_seq = o->n_seq > 0 ? o->n_seq : 1;
    a->kv = calloc((size_t)a->n_seq, sizeof *a->kv);
    a->n_past = calloc((size_t)a->n_seq, sizeof *a->n_past);
    a->wend = calloc((size_t)a->n_seq, sizeof *a->wend);
    a->high = calloc((size_t)a->n_seq, sizeof *a->high);
    a->segs = calloc((size_t)a->n_ubatch, sizeof *a->segs);
    a->old_past = calloc((size_t)a->n_seq, sizeof *a->old_past);
    a->r_past = calloc((size_t)a->n_seq, sizeof *a->r_past);
    a->r_off = calloc((size_t)a->n_seq, sizeof *a->r_off);
    if (!a->kv || !a->n_past || !a->wend || !a->high || !a->segs || !a->old_past || !a->r_past ||
        !a->r_off) {
        rc = stp_err_set(err, STP_ENOMEM, "attn-worker: out of memory");
        goto fail;
    }
    for (int i = 0; i < a->n_seq; i++)
        if ((rc = kv_cache_new(&a->kv[i], c, a->n_ctx, a->n_ubatch, o->kv_type, err))) goto fail;
    if ((rc = attn_scratch_new(&a->as, c, a->n_ubatch, a->n_ctx, o->threads, err))) goto fail;
    const int E = c->n_embd, K = c->n_expert_used;
    a->x = malloc((size_t)a->n_ubatch * E * sizeof(float));
    a->ffn = malloc((size_t)a->n_ubatch * E * sizeof(float));
    a->rlogits = malloc((size_t)a->n_ubatch * c->n_expert * sizeof(float));
    a->embd_row = malloc(a->m->tok_embd.row_bytes);
    a->hints = calloc((size_t)c->n_layer, sizeof *a->hints);
    if ((rc = forward_heads_buf_new(&a->hb, c, a->n_seq, a->n_ubatch, err))) goto fail;
    if (!a->x || !a->ffn || !a->rlogits || !a->embd_row || !a->hints) {
        rc = stp_err_set(err, STP_ENOMEM, "attn-worker: out of memory");
        goto fail;
    }
    /* activation region */
    act_header lay;
    act_layout(&lay, a->n_ubatch, E, K, c->n_vocab, a->n_seq);
    if (getrandom(&lay.epoch, sizeof lay.epoch, 0) != sizeof lay.epoch) lay.epoch = 1;
    char name[160];
    if ((rc = stage_shm_name(name, sizeof name, o->run_dir, "act", err))) goto fail;
    if ((rc = shm_region_create(&a->act, name, lay.size, err))) goto fail;
    a->ah = (act_header *)a->act.base;
    *a->ah = lay;
    a->h = (float *)(a->act.base + lay.off_h);
    a->sel = (int32_t *)(a->act.base + lay.off_sel);
    a->selw_shm = (float *)(a->act.base + lay.off_w);
    a->y = (float *)(a->act.base + lay.off_y);
    a->logits_shm = (float *)(a->act.base + lay.off_logits);
    a->floor = &((lane_block *)(a->act.base + lay.off_lanes))->floor;
    const char *ln = getenv("STP_LANES");
    if (!(ln && !strcmp(ln, "0"))) {
        a->lanes = (lane_block *)(a->act.base + lay.off_lanes);
        atomic_store(&a->lanes->active, 1);
        /* the expert workers' threads and this team's take turns on the cores */
        threadpool_set_handoff(a->tp, &a->lanes->attn_cores, &a->lanes->expert_cores,
                               STAGE_HANDOFF_NS);
    }
    if (!(a->lane_buf = malloc(LANE_MSG_MAX))) {
        rc = stp_err_set(err, STP_ENOMEM, "attn-worker: out of memory");
        goto fail;
    }
    a->seq = (uint64_t)msg_now_us() << 8; /* increasing across restarts of this stage */
    /* sockets */
    a->zctx = zmq_ctx_new();
    stage_zmq_affinity(a->zctx); /* its threads not on this thread's one core */
    char ep[512];
    rc = STP_EIO;
    if (msg_endpoint(ep, sizeof ep, o->run_dir, "attn", err) ||
        !(a->sock = msg_socket(a->zctx, ZMQ_ROUTER, ep, true, err)))
        goto fail;
    if (msg_endpoint(ep, sizeof ep, o->run_dir, "stats-attn", err) ||
        !(a->pub = msg_socket(a->zctx, ZMQ_PUB, ep, true, err)))
        goto fail;
    if (msg_endpoint(ep, sizeof ep, o->run_dir, "storage", err) ||
        !(a->storage = msg_socket(a->zctx, ZMQ_DEALER, ep, false, err)))
        goto fail;
    for (int i = 0; i < a->n_workers; i++) {
        char nm[32];
        snprintf(nm, sizeof nm, "expert-%d", i);
        if (msg_endpoint(ep, sizeof ep, o->run_dir, nm, err) ||
            !(a->exp[i] = msg_socket(a->zctx, ZMQ_DEALER, ep, false, err)))
            goto fail;
    }
    stats_set(a->st, "kv.bytes", a->kv[0]->bytes * (uint64_t)a->n_seq);
    stats_set(a->st, "parallel", (uint64_t)a->n_seq);
    if (!(a->route = calloc((size_t)c->n_layer * (size_t)c->n_expert, sizeof *a->route))) {
        rc = stp_err_set(err, STP_ENOMEM, "out of memory");
        goto fail;
    }
    stats_table(a->st, "route.decode", a->route, c->n_layer, c->n_expert);
    *out = a;
    return 0;
fail:
    attn_worker_destroy(&a);
    return rc;
}

void attn_worker_destroy(attn_worker **self_p) {
    attn_worker *a = *self_p;
    if (!a) return;
    msg_close(&a->sock);
    msg_close(&a->pub);
    msg_close(&a->storage);
    for (int i = 0; i < MAX_WORKERS; i++)
        msg_close(&a->exp[i]);
    if (a->zctx) zmq_ctx_term(a->zctx);
    threadpool_set_handoff(a->tp, NULL, NULL, 0); /* its words are in the region */
    shm_region_close(&a->act);
    shm_region_close(&a->pool);
    threadpool_destroy(&a->tp);
    for (int i = 0; a->kv && i < a->n_seq; i++)
        kv_cache_destroy(&a->kv[i]);
    free(a->kv);
    free(a->n_past);
    free(a->wend);
    free(a->high);
    free(a->segs);
    free(a->old_past);
    forward_part_free(&a->part);
    free(a->r_past);
    free(a->r_off);
    attn_scratch_destroy(&a->as);
    free(a->x);
    free(a->ffn);
    free(a->rlogits);
    forward_heads_buf_destroy(&a->hb);
    free(a->embd_row);
    free(a->hints);
    free(a->route);
    if (a->embd_fd >= 0) close(a->embd_fd);
    free(a->lane_buf);
    model_close(&a->m);
    stats_destroy(&a->st);
    free(a);
    *self_p = NULL;
}

/* ---------------------------------------------------------------------------------------- */
/* talking to the storage daemon and the expert workers */

static void s_handle(attn_worker *a, msg_in *in, bool busy);
static int s_drain_lanes(attn_worker *a, work_batch *bs, int nb, int il, int *n_pending,
                         stp_err *err);

/* Handles what waits on attn.sock. busy: an eval is waiting on other stages; heartbeats are
 * still answered (the coordinator must not mistake a long eval for a dead worker), anything else
 * is validated as usual and a second EvalRequest is refused as busy. */
static void s_serve(attn_worker *a, bool busy) {
    stp_err e = {0};
    for (int i = 0; i < 16; i++) {
        msg_in in;
        int rc = msg_recv(a->sock, true, &in, &e);
        if (rc == 0) break;
        stats_add(a->st, "bytes.in", in.len);
        if (rc < 0) {
            if (stats_bad(a->st, "frames")) stage_log(STAGE, "invalid message: %s", e.msg);
        } else {
            s_handle(a, &in, busy);
        }
        msg_in_free(&in);
    }
}

static int s_send_now(attn_worker *a, uint64_t seq, int il, const uint32_t *ex, const uint32_t *cnt,
                      int n, decision_kind kind, stp_err *err) {
    Stp__RouterDecision d;
    stp__router_decision__init(&d);
    d.seq = seq;
    d.layer = (uint32_t)il;
    d.n_experts = (size_t)n;
    d.experts = (uint32_t *)ex;
    d.n_counts = (size_t)n;
    d.counts = (uint32_t *)cnt;
    d.prefetch = kind == DECISION_PREFETCH;
    d.hint = kind == DECISION_HINT;
    d.quiet = kind == DECISION_QUIET;
    Stp__RouterMsg m;
    stp__router_msg__init(&m);
    m.version = STP_PROTO_VERSION;
    m.body_case = STP__ROUTER_MSG__BODY_DECISION;
    m.decision = &d;
    bool blocking = kind == DECISION_NEED || kind == DECISION_QUIET;
    return blocking ? msg_send(a->storage, NULL, 0, &m.base, err)
                    : msg_try_send(a->storage, NULL, 0, &m.base, err);
}

/* Sends the held-back hints, oldest first (a hint that finds the daemon's queue full is
 * dropped: it only counts uses). */
static void s_flush_hints(attn_worker *a) {
    for (int i = 0; i < a->n_hints; i++) {
        const pending_hint *h = &a->hints[i];
        if (s_send_now(a, h->seq, h->layer, h->ex, h->cnt, h->n, DECISION_HINT, NULL))
            stats_add(a->st, "decision.dropped", 1);
    }
    a->n_hints = 0;
}

/* A RouterDecision to the storage daemon: a need or a quiet need (blocking send), a hint or a
 * prefetch (never block). Hints are held back and go out, in order, right before the next
 * other message (or at the end of the micro-batch): the daemon evicts only while it handles a
 * need or a prefetch, so it has seen every earlier decision whenever it chooses a victim, and
 * a run of resident layers costs the daemon and both zmq I/O threads one wake-up instead of
 * one per layer (each wake-up on 2 cores pre-empts a compute thread). */
static int s_send_decision(attn_worker *a, uint64_t seq, int il, const uint32_t *ex,
                           const uint32_t *cnt, int n, decision_kind kind, stp_err *err) {
    if (kind == DECISION_HINT) {
        if (a->n_hints == a->m->cfg.n_layer) s_flush_hints(a);
        pending_hint *h = &a->hints[a->n_hints++];
        h->seq = seq;
        h->layer = il;
        h->n = n;
        memcpy(h->ex, ex, (size_t)n * sizeof *ex);
        memcpy(h->cnt, cnt, (size_t)n * sizeof *cnt);
        return 0;
    }
    s_flush_hints(a);
    return s_send_now(a, seq, il, ex, cnt, n, kind, err);
}

/* Maps the weight pool (again, when a restarted storage daemon recreated it); once per eval.
 * Without a usable pool the residency fast path is off (every layer waits for Residency). */
static void s_pool_refresh(attn_worker *a) {
    if (a->pool.base && shm_region_current(&a->pool)) return;
    shm_region_close(&a->pool);
    char name[160];
    stp_err e = {0};
    if (stage_shm_name(name, sizeof name, a->o.run_dir, "pool", &e) ||
        shm_region_open(&a->pool, name, false, &e) ||
        pool_check(&a->pool, a->m->cfg.n_layer, a->m->cfg.n_expert, &e)) {
        shm_region_close(&a->pool);
        return;
    }
    stats_add(a->st, "pool.maps", 1);
}

/* Residency fast path: the experts the pool already shows READY have the offsets and
 * generations the daemon's Residency would give (only the daemon changes slots; a decision
 * never evicts an expert it needs, and a prefetch never evicts one of its own layer or of the
 * last decision), so they can go to the expert workers at once. Fills loc[i] and ready[i];
 * returns how many are ready. The expert workers re-check state and generation. */
static int s_pool_lookup(attn_worker *a, int il, const uint32_t *ex, int n, Stp__ExpertLoc *loc,
                         bool *ready) {
    if (!a->pool.base) return 0;
    const pool_header *ph = (const pool_header *)a->pool.base;
    const uint32_t X = (uint32_t)a->m->cfg.n_expert;
    int nr = 0;
    for (int i = 0; i < n; i++) {
        const pool_slot *sl = &ph->slots[(uint32_t)il * X + ex[i]];
        ready[i] = __atomic_load_n(&sl->state, __ATOMIC_ACQUIRE) == POOL_READY;
        if (!ready[i]) continue;
        stp__expert_loc__init(&loc[i]);
        loc[i].expert = ex[i];
        loc[i].offset = sl->offset;
        loc[i].generation = sl->generation;
        nr++;
    }
    return nr;
}

/* Every expert resident for good (POOL_COMPLETE): decisions would tell the daemon nothing. */
static bool s_pool_complete(const attn_worker *a) {
    return a->pool.base && (((const pool_header *)a->pool.base)->flags & POOL_COMPLETE);
}

/* Decode prefetch: the router of layer il + 1 applied to layer il's residual after attention
 * (x lacks only this layer's expert output) predicts the experts layer il + 1 will route to
 * (most of the top-4 on the 4b preset, more than from the residual before attention:
 * docs/BENCHMARKS.md). Those not
 * resident go to the daemon now, as a hint it reads while this layer's experts and the next
 * attention run. */
static void s_prefetch(attn_worker *a, int il, int T, const float *x) {
    const model_config *c = &a->m->cfg;
    const int X = c->n_expert;
    if (a->prefetch <= 0 || il + 1 >= c->n_layer || !a->pool.base || s_pool_complete(a)) return;
    /* T rows, one token of each sequence being decoded: the union of their predictions. The
     * router logits buffer is free here (this layer's routing is in sel/w already) */
    float *lg = a->rlogits;
    attention_router(&a->cc, a->m, il + 1, x, T, lg, a->as);
    bool pick[STP_MAX_EXPERTS] = {false};
    for (int t = 0; t < T; t++) {
        int32_t top[STP_MAX_EXPERTS];
        ops_top_k(lg + (size_t)t * X, X, a->prefetch, top); /* by logit: the gating is monotone */
        for (int k = 0; k < a->prefetch; k++)
            pick[top[k]] = true;
    }
    uint32_t ex[STP_MAX_EXPERTS], cnt[STP_MAX_EXPERTS] = {0};
    int n = 0;
    for (int e = 0; e < X; e++) /* a decision lists experts ascending */
        if (pick[e]) ex[n++] = (uint32_t)e;
    Stp__ExpertLoc loc[STP_MAX_EXPERTS];
    bool ready[STP_MAX_EXPERTS];
    if (s_pool_lookup(a, il + 1, ex, n, loc, ready) == n) return;
    bool sent = !s_send_decision(a, a->seq, il + 1, ex, cnt, n, DECISION_PREFETCH, NULL);
    stats_add(a->st, sent ? "prefetch.sent" : "prefetch.dropped", 1);
}

/* Drops the replies no layer waited for (never blocks), so they cannot pile up in the socket:
 * the Residency of a layer whose reads landed during its attention, an error about a hint. */
static void s_drain_storage(attn_worker *a) {
    stp_err e = {0};
    for (int i = 0; i < 64; i++) {
        msg_in in;
        if (msg_recv(a->storage, false, &in, &e) <= 0) break;
        msg_in_free(&in);
        stats_add(a->st, "storage.async_replies", 1);
    }
}

/* One message waiting on the storage socket, for the decision seq of layer il (n experts):
 * 0 with loc[] filled (its Residency), < 0 (its error, or a Residency that does not fit), 1
 * (nothing, or something stale: dropped). */
static int s_storage_reply(attn_worker *a, uint64_t seq, int il, int n, Stp__ExpertLoc *loc,
                           stp_err *err) {
    msg_in in;
    if (msg_recv(a->storage, false, &in, err) <= 0) return 1;
    Stp__RouterMsg *m = stp__router_msg__unpack(NULL, in.len, in.data);
    msg_in_free(&in);
    int res = 1;
    if (!m || m->version != STP_PROTO_VERSION) {
        if (stats_bad(a->st, "storage_reply"))
            stage_log(STAGE, "invalid message from the storage daemon");
    } else if (m->body_case == STP__ROUTER_MSG__BODY_ERROR && m->error->seq == seq) {
        res = stp_err_set(err, STP_EPEER, "storage daemon: %s", m->error->what);
    } else if (m->body_case == STP__ROUTER_MSG__BODY_RESIDENCY && m->residency->seq == seq) {
        const Stp__Residency *r = m->residency;
        if (r->layer != (uint32_t)il || r->n_experts != (size_t)n || r->n_ready != (size_t)n) {
            res = stp_err_set(err, STP_EPROTO, "storage daemon: residency does not match");
        } else {
            res = 0;
            for (int i = 0; i < n; i++) {
                loc[i] = *r->experts[i];
                if (!r->ready[i])
                    res = stp_err_set(err, STP_EPEER, "expert %u of layer %d not resident",
                                      loc[i].expert, il);
            }
        }
    } else {
        stats_add(a->st, "storage.stale_replies", 1);
    }
    if (m) stp__router_msg__free_unpacked(m, NULL);
    return res;
}

/* Sends batch b's work for worker wi: through its lane when the worker is attached to one
 * (a store, then a futex wake: at once, or by the caller when *woken is given, set false), else
 * (not attached yet, ring full, STP_LANES=0) its zmq socket. */
static int s_send_work(attn_worker *a, int wi, work_batch *b, int il, bool *woken, stp_err *err) {
    Stp__ExpertWork w;
    stp__expert_work__init(&w);
    w.seq = b->seq;
    w.layer = (uint32_t)il;
    w.n_tokens = (uint32_t)b->n_tokens;
    w.n_experts = (size_t)b->nl[wi];
    w.experts = b->lists[wi];
    w.act_epoch = a->ah->epoch;
    w.sent_us = msg_now_us();
    Stp__LayerMsg m;
    stp__layer_msg__init(&m);
    m.version = STP_PROTO_VERSION;
    m.body_case = STP__LAYER_MSG__BODY_WORK;
    m.work = &w;
    lane_pair *lp = a->lanes ? &a->lanes->lanes[wi] : NULL;
    const bool attached = lp && atomic_load_explicit(&lp->pid, memory_order_acquire) != 0;
    if (attached) {
        lane_expect(a->lanes, 1, false); /* before the worker can answer */
        uint32_t *pos = &b->lane_pos[wi];
        if ((woken ? lane_put(&lp->work, &m.base, pos) : lane_send(&lp->work, &m.base, pos)) == 0) {
            if (woken) *woken = false;
            b->via_lane[wi] = true;
            stats_add(a->st, "lane.work_sent", 1);
            return 0;
        }
        lane_expect(a->lanes, -1, false);
    }
    b->via_lane[wi] = false;
    stats_add(a->st, "msg.work_sent", 1);
    int rc = msg_send(a->exp[wi], NULL, 0, &m.base, err);
    /* an attached worker sleeps on its lane: knock, so it looks at its socket now */
    if (attached) lane_wake(&lp->work.head);
    return rc;
}

/* Dispatches experts (loc[], cnt[], n) over the workers as one batch of work with its own
 * sequence number: by slot count, largest first, to the least loaded worker. */
static int s_dispatch(attn_worker *a, work_batch *b, int il, int T, const Stp__ExpertLoc *loc,
                      const uint32_t *cnt, int n, stp_err *err) {
    int NW = a->n_workers;
    int owner[STP_MAX_EXPERTS], order[STP_MAX_EXPERTS];
    uint64_t load[MAX_WORKERS] = {0};
    for (int i = 0; i < n; i++)
        order[i] = i;
    for (int i = 1; i < n; i++) /* insertion sort by count desc, stable */
        for (int j = i; j > 0 && cnt[order[j]] > cnt[order[j - 1]]; j--) {
            int t = order[j];
            order[j] = order[j - 1];
            order[j - 1] = t;
        }
    for (int i = 0; i < n; i++) {
        int best = 0;
        for (int wi = 1; wi < NW; wi++)
            if (load[wi] < load[best]) best = wi;
        owner[order[i]] = best;
        load[best] += cnt[order[i]];
    }
    memset(b->nl, 0, sizeof b->nl);
    for (int i = 0; i < n; i++) { /* ascending expert order within each list */
        stp__expert_loc__init(&b->copies[i]);
        b->copies[i].expert = loc[i].expert;
        b->copies[i].offset = loc[i].offset;
        b->copies[i].generation = loc[i].generation;
        b->lists[owner[i]][b->nl[owner[i]]++] = &b->copies[i];
    }
    b->seq = ++a->seq;
    b->n_tokens = T;
    b->n_pending = 0;
    b->compute_us = 0;
    double t0 = msg_now_us();
    bool woken[MAX_WORKERS];
    int rc = 0;
    for (int wi = 0; wi < NW; wi++)
        woken[wi] = true;
    for (int wi = 0; wi < NW; wi++) {
        b->pending[wi] = false;
        if (!b->nl[wi]) continue;
        if ((rc = s_send_work(a, wi, b, il, &woken[wi], err))) break;
        b->pending[wi] = true;
        b->sent[wi] = t0;
        b->n_pending++;
    }
    /* Every lane's work is in before any worker wakes, and worker 0 wakes last: with pinned
     * threads (stage_pin_threads, one core list for both stages) it shares this thread's core,
     * and woken first it took the core at once and ran its whole share before this thread could
     * hand the others theirs (one in ten layers ran its two halves one after the other:
     * docs/BENCHMARKS.md, session 15). */
    for (int wi = NW - 1; wi >= 0; wi--)
        if (!woken[wi]) lane_wake(&a->lanes->lanes[wi].work.head);
    return rc;
}

/* s_dispatch of the experts i with ready[i] == want. */
static int s_dispatch_where(attn_worker *a, work_batch *b, int il, int T, const Stp__ExpertLoc *loc,
                            const uint32_t *cnt, const bool *ready, bool want, int n,
                            stp_err *err) {
    Stp__ExpertLoc part[STP_MAX_EXPERTS];
    uint32_t pcnt[STP_MAX_EXPERTS];
    int np = 0;
    for (int i = 0; i < n; i++)
        if (ready[i] == want) {
            part[np] = loc[i];
            pcnt[np++] = cnt[i];
        }
    return s_dispatch(a, b, il, T, part, pcnt, np, err);
}

/* Dispatches layer il's experts that are not out yet (out[i] false) as their reads land, in
 * batches bs[*nb..]: the daemon bumps the pool's `landed` word after each read (shm.h), and
 * the experts READY since the last look go out together, up to ATTN_BATCHES per layer (the
 * last takes all the rest). The daemon's Residency (sent when all have landed) covers what the
 * pool does not show: a pool not mapped or replaced by a restarted daemon, a failed read. A
 * daemon silent for RETRY_MS gets the decision again (it may have been restarted and lost it).
 * *t_last: when the last batch went out. */
static int s_dispatch_landing(attn_worker *a, uint64_t seq, int il, int T, const uint32_t *ex,
                              const uint32_t *cnt, int n, bool *out, work_batch *bs, int *nb,
                              double *t_last, stp_err *err) {
    const pool_header *ph = a->pool.base ? (const pool_header *)a->pool.base : NULL;
    double t0 = msg_now_us(), sent = t0, served = t0;
    Stp__ExpertLoc loc[STP_MAX_EXPERTS];
    bool ready[STP_MAX_EXPERTS], go[STP_MAX_EXPERTS];
    for (;;) {
        const uint32_t seen = ph ? atomic_load_explicit(&ph->landed, memory_order_acquire) : 0;
        int res = 1;
        int n_out = 0, n_new = 0;
        if (ph) {
            s_pool_lookup(a, il, ex, n, loc, ready);
        } else {
            memset(ready, 0, (size_t)n * sizeof *ready);
        }
        /* the daemon's answer: every location it gives is good (READY when it was sent) */
        bool rd[2] = {false, false};
        void *socks[2] = {a->storage, a->sock};
        if (msg_poll(socks, 2, rd, 0) && rd[0]) {
            Stp__ExpertLoc rloc[STP_MAX_EXPERTS];
            res = s_storage_reply(a, seq, il, n, rloc, err);
            if (res < 0) return res;
            if (res == 0)
                for (int i = 0; i < n; i++)
                    if (!out[i]) {
                        loc[i] = rloc[i];
                        ready[i] = true;
                    }
        }
        for (int i = 0; i < n; i++) {
            go[i] = !out[i] && ready[i];
            n_out += out[i];
            n_new += go[i];
        }
        if (n_new && (n_out + n_new == n || *nb < ATTN_BATCHES - 1)) {
            int rc = s_dispatch_where(a, &bs[(*nb)++], il, T, loc, cnt, go, true, n, err);
            if (rc) return rc;
            for (int i = 0; i < n; i++)
                out[i] |= go[i];
            n_out += n_new;
            *t_last = msg_now_us();
        }
        if (n_out == n) return 0;
        double now = msg_now_us();
        double left = GIVEUP_MS - (now - t0) * 1e-3;
        if (left <= 0 || stage_stopping())
            return stp_err_set(err, STP_ETIMEDOUT,
                               "the storage daemon did not answer for layer %d in %d ms", il,
                               GIVEUP_MS);
        if ((now - sent) * 1e-3 > RETRY_MS) {
            stats_add(a->st, "decision.resends", 1);
            stage_log(STAGE, "storage daemon silent for %d ms on layer %d: resending", RETRY_MS,
                      il);
            int rc = s_send_decision(a, seq, il, ex, cnt, n, DECISION_NEED, err);
            if (rc) return rc;
            sent = now;
        }
        if (rd[1] || (now - served) * 1e-3 > 20) { /* heartbeats during a long wait */
            served = now;
            if (rd[1] || (msg_poll(&a->sock, 1, rd, 0) && rd[0])) s_serve(a, true);
        }
        if (res == 0) continue; /* (a Residency came: look again at once) */
        if (ph)
            lane_wait((_Atomic uint32_t *)&ph->landed, seen, 1); /* a read lands: woken */
        else
            msg_poll(socks, 1, rd, 200);
    }
}

/* One reply m (consumed) from worker wi for the batches bs: a batch's ExpertDone clears it, an
 * error fails the layer, anything else is stale. 1: go on; <= 0: stop with that result. */
static int s_on_reply(attn_worker *a, work_batch *bs, int nb, int wi, int il, Stp__LayerMsg *m,
                      int *n_pending, stp_err *err) {
    int res = 1;
    work_batch *b = NULL;
    for (int i = 0; i < nb && m && m->version == STP_PROTO_VERSION; i++) {
        uint64_t seq = m->body_case == STP__LAYER_MSG__BODY_DONE    ? m->done->seq
                       : m->body_case == STP__LAYER_MSG__BODY_ERROR ? m->error->seq
                                                                    : 0;
        if (bs[i].pending[wi] && seq == bs[i].seq) b = &bs[i];
    }
    if (!m || m->version != STP_PROTO_VERSION) {
        if (stats_bad(a->st, "expert_reply"))
            stage_log(STAGE, "invalid message from expert worker %d", wi);
    } else if (b && m->body_case == STP__LAYER_MSG__BODY_ERROR) {
        res = stp_err_set(err, STP_EPEER, "expert worker %d: %s", wi, m->error->what);
    } else if (b && m->body_case == STP__LAYER_MSG__BODY_DONE && m->done->layer == (uint32_t)il) {
        b->pending[wi] = false;
        b->n_pending--;
        (*n_pending)--;
        if (m->done->compute_us > b->compute_us) b->compute_us = m->done->compute_us;
        stats_handover(a->st, "handover.back", m->done->sent_us);
        a->active += m->done->active_neurons;
        a->total += m->done->total_neurons;
        a->down += m->done->down_neurons;
    } else {
        stats_add(a->st, "expert.stale_replies", 1);
    }
    if (m) stp__layer_msg__free_unpacked(m, NULL);
    return res;
}

/* Batch b's work for worker wi again (it may have been restarted): a lane entry the worker has
 * not taken yet is only rung again (a restarted worker takes it from the ring); taken work is
 * sent again (the worker answers a duplicate without recomputing). */
static int s_resend(attn_worker *a, work_batch *b, int wi, int il, stp_err *err) {
    stats_add(a->st, "work.resends", 1);
    stage_log(STAGE, "expert worker %d silent for %d ms on layer %d: resending", wi, RETRY_MS, il);
    b->sent[wi] = msg_now_us();
    if (b->via_lane[wi]) {
        lane_ring *r = &a->lanes->lanes[wi].work;
        if (!lane_taken(r, b->lane_pos[wi])) {
            lane_wake(&r->head);
            return 0;
        }
    }
    return s_send_work(a, wi, b, il, NULL, err);
}

/* Takes every reply waiting in the workers' lanes (stale ones too, so a ring never fills). */
static int s_drain_lanes(attn_worker *a, work_batch *bs, int nb, int il, int *n_pending,
                         stp_err *err) {
    for (int wi = 0; a->lanes && wi < a->n_workers; wi++) {
        size_t len;
        while (lane_take(&a->lanes->lanes[wi].done, a->lane_buf, &len)) {
            stats_add(a->st, "lane.replies", 1);
            Stp__LayerMsg *m = stp__layer_msg__unpack(NULL, len, a->lane_buf);
            int res = s_on_reply(a, bs, nb, wi, il, m, n_pending, err);
            if (res <= 0) return res;
        }
    }
    return 1;
}

/* Waits until every worker answered every dispatched batch (nb of them); a worker silent for
 * RETRY_MS gets its work again (it may have been restarted), GIVEUP_MS fails the layer. Lane
 * replies are waited for on the lanes' bell (a futex), zmq replies with zmq_poll; attn.sock is
 * served in between (at least every 20 ms), so heartbeats are answered during long layers. */
static int s_collect(attn_worker *a, work_batch *bs, int nb, int il, stp_err *err) {
    const int NW = a->n_workers;
    const double t0 = msg_now_us();
    double served = t0;
    int n_pending = 0;
    for (int i = 0; i < nb; i++)
        n_pending += bs[i].n_pending;
    while (n_pending) {
        const uint32_t bell = a->lanes ? atomic_load(&a->lanes->bell) : 0;
        int res = s_drain_lanes(a, bs, nb, il, &n_pending, err);
        if (res <= 0) return res;
        if (!n_pending) break;
        double now = msg_now_us();
        if ((now - t0) * 1e-3 > GIVEUP_MS || stage_stopping())
            return stp_err_set(err, STP_ETIMEDOUT,
                               "expert workers did not answer layer %d in %d ms", il, GIVEUP_MS);
        void *socks[MAX_WORKERS + 1];
        int idx[MAX_WORKERS], np = 0;
        bool on_lane = false;
        for (int wi = 0; wi < NW; wi++) {
            bool z = false;
            for (int i = 0; i < nb; i++) {
                work_batch *b = &bs[i];
                if (!b->pending[wi]) continue;
                if ((now - b->sent[wi]) * 1e-3 > RETRY_MS && (res = s_resend(a, b, wi, il, err)))
                    return res;
                on_lane |= b->via_lane[wi];
                z |= !b->via_lane[wi];
            }
            if (z) {
                socks[np] = a->exp[wi];
                idx[np++] = wi;
            }
        }
        if (!np) { /* only lanes: sleep on their bell */
            lane_wait(&a->lanes->bell, bell, 20);
            if (msg_now_us() - served < 20e3) continue;
            served = msg_now_us();
            bool rd;
            if (msg_poll(&a->sock, 1, &rd, 0) && rd) s_serve(a, true);
            continue;
        }
        socks[np] = a->sock;
        bool rd[MAX_WORKERS + 1];
        msg_poll(socks, np + 1, rd, on_lane ? 1 : 200);
        if (rd[np]) s_serve(a, true);
        for (int p = 0; p < np; p++) {
            int wi = idx[p];
            msg_in in;
            if (!rd[p] || msg_recv(a->exp[wi], false, &in, err) <= 0) continue;
            Stp__LayerMsg *m = stp__layer_msg__unpack(NULL, in.len, in.data);
            msg_in_free(&in);
            if ((res = s_on_reply(a, bs, nb, wi, il, m, &n_pending, err)) <= 0) return res;
        }
    }
    return 0;
}

/* ---------------------------------------------------------------------------------------- */
/* the layer loop's seam and the micro-batch */

/* x = token_embd[id], the row read from the file (see embd_fd) */
static int s_embed(attn_worker *a, int32_t id, float *x, stp_err *err) {
    const tensor_view *t = &a->m->tok_embd;
    ssize_t got = fileio_pread_full(a->embd_fd, a->embd_row, t->row_bytes,
                                    a->embd_off + (uint64_t)id * t->row_bytes);
    if (got != (ssize_t)t->row_bytes)
        return stp_err_set(err, STP_EIO, "reading token %d's embedding: %s", id,
                           got < 0 ? strerror(errno) : "end of file");
    a->cc.ops->dequantize_row(t->type, a->embd_row, x, t->n_cols);
    return 0;
}

/* The seam, before attention: layer il's routing (sel/w, already in the activation region) is
 * known. The decision goes to the storage daemon now, so its reads overlap the attention: a
 * hint when the pool shows every expert READY (nothing at all when every expert is resident for
 * good), else a quiet need (the layer takes its experts from the pool table as they land), or a
 * need the layer waits on when no pool is mapped. */
static int s_routed(void *ctx, int il, int T, const int32_t *sel, const float *w, stp_err *err) {
    (void)w;
    attn_worker *a = ctx;
    const model_config *c = &a->m->cfg;
    const int K = c->n_expert_used, X = c->n_expert;
    layer_plan *p = &a->cur;
    p->seq = ++a->seq;
    if (a->lanes) lane_expect(a->lanes, 0, true); /* earlier layers' replies are not awaited */
    atomic_store_explicit(a->floor, p->seq, memory_order_release); /* earlier work is stale */
    /* replies nobody waits for (work of an eval that failed, done by a worker that came back)
     * would fill the done rings (LANE_DEPTH entries): a reply finding its ring full is lost */
    int none = 0;
    s_drain_lanes(a, NULL, 0, il, &none, NULL);
    uint32_t cnt_by[STP_MAX_EXPERTS] = {0};
    for (int i = 0; i < T * K; i++)
        cnt_by[sel[i]]++;
    if (a->decode)
        for (int i = 0; i < a->n_dec * K; i++)
            a->route[(size_t)il * X + (size_t)sel[i]]++;
    p->n = 0;
    for (int e = 0; e < X; e++)
        if (cnt_by[e]) {
            p->ex[p->n] = (uint32_t)e;
            p->cnt[p->n++] = cnt_by[e];
        }
    p->n_ready = s_pool_lookup(a, il, p->ex, p->n, p->loc, p->ready);
    p->resident = p->n_ready == p->n;
    if (p->resident && s_pool_complete(a)) return 0;
    return s_send_decision(a, p->seq, il, p->ex, p->cnt, p->n,
                           p->resident    ? DECISION_HINT
                           : a->pool.base ? DECISION_QUIET
                                          : DECISION_NEED,
                           err);
}

/* The seam after attention: layer il's experts on h (in the activation region) by the expert
 * workers. The resident experts go out at once, the ones being read follow as they land
 * (s_dispatch_landing); then out = sum over k, in k order, of w_k * y_k, as moe_forward sums.
 * In decode, x (the residual after attention) first predicts the next layer's experts. */
static int s_run(void *ctx, int il, int T, const float *x, const float *h, const int32_t *sel,
                 const float *w, float *out, stp_err *err) {
    (void)h;
    (void)sel;
    attn_worker *a = ctx;
    const int E = a->m->cfg.n_embd, K = a->m->cfg.n_expert_used;
    layer_plan *p = &a->cur;
    if (a->decode) s_prefetch(a, il, a->n_dec, x); /* one token per sequence */
    double t2 = msg_now_us();
    threadpool_park(a->tp); /* the cores are the expert workers' until they answer */
    int nb = 0, rc;
    double t3 = t2; /* the weights are all in */
    /* looked up again: a (prefetch) read may have landed during attention; when all did, the
     * layer does not wait, and the Residency reply is dropped later as stale */
    if (!p->resident && (p->n_ready = s_pool_lookup(a, il, p->ex, p->n, p->loc, p->ready)) == p->n)
        stats_add(a->st, "residency.landed", 1);
    s_drain_storage(a);
    if (p->n_ready == p->n) {
        if ((rc = s_dispatch(a, &a->batch[nb++], il, T, p->loc, p->cnt, p->n, err))) return rc;
    } else {
        if (p->n_ready && (rc = s_dispatch_where(a, &a->batch[nb++], il, T, p->loc, p->cnt,
                                                 p->ready, true, p->n, err)))
            return rc;
        if ((rc = s_dispatch_landing(a, p->seq, il, T, p->ex, p->cnt, p->n, p->ready, a->batch, &nb,
                                     &t3, err)))
            return rc;
    }
    if ((rc = s_collect(a, a->batch, nb, il, err))) return rc;
    double t4 = msg_now_us();
    /* the cores are back: the team wakes while this thread sums, so the next layer's first
     * section (the router) does not wait for an idle core to be scheduled */
    threadpool_wake(a->tp);
    /* stall: the wait for weights not covered by the earlier batches' compute */
    double compute = 0, covered = 0;
    for (int i = 0; i < nb; i++) {
        compute += a->batch[i].compute_us;
        if (i < nb - 1) covered += a->batch[i].compute_us;
    }
    double stall = (t3 - t2) - covered;
    if (stall < 0) stall = 0;
    double ipc = (t4 - t2) - stall - compute;
    if (ipc < 0) ipc = 0;
    a->ipc_us += ipc;
    stats_latency(a->st, "residency_wait", stall);
    stats_latency(a->st, "experts_wait", t4 - t3);
    stats_latency(a->st, "layer_ipc", ipc);

    moe_weighted_sum(out, a->y, w, T, K, E);
    return 0;
}

static void s_timed(void *ctx, int il, const forward_layer_ns *t) {
    (void)il;
    attn_worker *a = ctx;
    a->router_us += (double)t->router * 1e-3;
    a->attn_us += (double)t->attn * 1e-3;
    a->experts_us += (double)t->experts * 1e-3;
    stats_latency(a->st, "router", (double)t->router * 1e-3);
    stats_latency(a->st, "attention", (double)t->attn * 1e-3);
    stats_latency(a->st, "layer", (double)(t->router + t->attn + t->experts) * 1e-3);
}

/* One micro-batch: the tokens of entries q->seqs[i0..i0+n_e) from token `first` of the first
 * on, T in all (s_run's cut; engine.c's s_ubatch builds its segments the same way): their
 * embeddings, common/model's layer loop with one segment per entry (attention on that slot's
 * caches) and the expert workers as its seam, then the LM head of each entry's last token when
 * it falls in this micro-batch (into its slot's row of the activation region), or of every token
 * (all, one entry only). Slots advance only when the micro-batch succeeded. */
static int s_ubatch(attn_worker *a, const Stp__EvalRequest *q, int i0, int n_e, int first, int T,
                    float *all, stp_err *err) {
    const model *m = a->m;
    const model_config *c = &m->cfg;
    const int E = c->n_embd, V = c->n_vocab;
    int row = 0;
    a->decode = true;
    a->n_dec = 0;
    for (int k = 0; k < n_e && row < T; k++) {
        const Stp__EvalSeq *e = q->seqs[i0 + k];
        const int slot = (int)e->slot, lo = k == 0 ? first : 0;
        int n = (int)e->n_tokens - lo;
        if (n > T - row) n = T - row;
        a->segs[k] = (forward_seg){a->kv[slot], a->n_past[slot], n};
        if (!e->upto || k < n_e - 1) a->decode &= n == 1 && e->n_tokens == 1, a->n_dec += n;
        if (!forward_part_rows(&a->part, slot, (int)e->upto, a->x + (size_t)row * E, n, E))
            for (int t = 0; t < n; t++) {
                int rc = s_embed(a, e->tokens[lo + t], a->x + (size_t)(row + t) * E, err);
                if (rc) return rc;
            }
        a->wend[slot] = a->n_past[slot] + n; /* the caches change from here on */
        if (a->high[slot] < a->wend[slot]) a->high[slot] = a->wend[slot];
        row += n;
    }
    a->decode = a->decode && a->n_dec > 0;
    /* a chunk taken a few layers a request is the last entry (s_check) */
    const Stp__EvalSeq *tail = q->seqs[i0 + n_e - 1]->upto ? q->seqs[i0 + n_e - 1] : NULL;
    forward_state fs = {&a->cc,     m,      a->as,       a->x, a->h, a->ffn,
                        a->rlogits, a->sel, a->selw_shm, 0,    0};
    if (tail) forward_part_tail(&fs, &a->part, (int)tail->slot, (int)tail->upto);
    const forward_experts fx = {.ctx = a, .routed = s_routed, .run = s_run, .timed = s_timed};
    int rc = forward_ubatch(&fs, a->segs, n_e, &fx, err);
    if (rc) return rc;
    if (tail) { /* not through yet: its rows wait for the next request, no position, no logits */
        const int n = a->segs[n_e - 1].n;
        if (!forward_part_end(&a->part, a->x + (size_t)(T - n) * E, n, E, (int)tail->upto,
                              c->n_layer))
            n_e--;
    }
    s_flush_hints(a); /* the daemon's use counts are current between micro-batches */
    double tl = msg_now_us();
    row = 0;
    for (int k = 0; k < n_e; k++) {
        const Stp__EvalSeq *e = q->seqs[i0 + k];
        const int slot = (int)e->slot, lo = k == 0 ? first : 0, n = a->segs[k].n;
        a->n_past[slot] += n;
        for (int t = 0; t < n; t++) {
            const bool last = lo + t == (int)e->n_tokens - 1;
            if (all || (last && e->want_logits)) {
                forward_heads_add(a->hb, a->x + (size_t)(row + t) * E,
                                  all ? all + (size_t)(lo + t) * V
                                      : a->logits_shm + (size_t)slot * V);
            }
        }
        row += n;
    }
    /* every row wanting logits in one product */
    forward_heads_run(&a->cc, m, a->hb);
    for (int k = 0; all && k < n_e; k++) {
        const Stp__EvalSeq *e = q->seqs[i0 + k];
        const int lo = k == 0 ? first : 0, last = (int)e->n_tokens - 1;
        if (e->want_logits && last >= lo && last < lo + a->segs[k].n)
            memcpy(a->logits_shm + (size_t)e->slot * V, all + (size_t)last * V,
                   (size_t)V * sizeof(float));
    }
    const double head_us = msg_now_us() - tl;
    a->head_us += head_us;
    stats_latency(a->st, "lm_head", head_us);
    return 0;
}

static int s_entry_n(const void *q, int k) {
    return (int)((const Stp__EvalRequest *)q)->seqs[k]->n_tokens;
}

/* Runs the request's entries in micro-batches of at most n_ubatch tokens, in order (an entry may
 * be split), cut as the engine cuts them (forward_cut_next). */
static int s_run_request(attn_worker *a, const Stp__EvalRequest *q, float *all, stp_err *err) {
    forward_cut c = {0};
    while (forward_cut_next(&c, q, (int)q->n_seqs, s_entry_n, a->n_ubatch)) {
        int rc = s_ubatch(a, q, c.i, c.n_e, c.first, c.T, all, err);
        if (rc) return rc;
    }
    return 0;
}

/* ---------------------------------------------------------------------------------------- */
/* requests from the coordinator */

static void s_reply(attn_worker *a, const msg_in *in, Stp__EvalMsg *r) {
    r->version = STP_PROTO_VERSION;
    if (msg_send(a->sock, in->id, in->id_len, &r->base, NULL)) stats_add(a->st, "send_errors", 1);
}

static void s_error(attn_worker *a, const msg_in *in, const char *kind, uint64_t seq, int code,
                    const char *what) {
    if (kind && stats_bad(a->st, kind)) stage_log(STAGE, "invalid message (%s): %s", kind, what);
    Stp__StpError e;
    stp__stp_error__init(&e);
    e.code = code;
    e.what = (char *)what;
    e.seq = seq;
    Stp__EvalMsg r;
    stp__eval_msg__init(&r);
    r.body_case = STP__EVAL_MSG__BODY_ERROR;
    r.error = &e;
    s_reply(a, in, &r);
}

/* Checks a request without changing anything: 0, or the error's code with its text in buf and
 * the statistics counter it counts under in *kind. */
static int s_check(const attn_worker *a, const Stp__EvalRequest *q, char *buf, size_t cap,
                   const char **kind) {
    const model_config *c = &a->m->cfg;
    *kind = "eval_seq";
    if (q->n_seqs == 0) {
        snprintf(buf, cap, "eval of no sequence");
        return STP_EINVAL;
    }
    if (q->all_logits && (q->n_seqs != 1 || q->seqs[0]->upto)) {
        snprintf(buf, cap, "all_logits with %zu sequences or a chunk part way (one whole only)",
                 q->n_seqs);
        return STP_EINVAL;
    }
    bool releasing = !q->all_logits; /* every entry without tokens: a release (s_release) */
    size_t total = 0;                /* tokens in all (a chunk part way: one micro-batch) */
    for (size_t i = 0; i < q->n_seqs; i++) {
        releasing = releasing && q->seqs[i]->n_tokens == 0;
        total += q->seqs[i]->n_tokens;
    }
    for (size_t i = 0; i < q->n_seqs; i++) {
        const Stp__EvalSeq *e = q->seqs[i];
        if (e->slot >= (uint32_t)a->n_seq) {
            snprintf(buf, cap, "sequence slot %u is outside 0..%d (--parallel %d)", e->slot,
                     a->n_seq - 1, a->n_seq);
            return STP_EINVAL;
        }
        for (size_t j = 0; j < i; j++)
            if (q->seqs[j]->slot == e->slot) {
                snprintf(buf, cap, "sequence slot %u appears twice in an eval", e->slot);
                return STP_EINVAL;
            }
        const int n = (int)(e->n_tokens < INT32_MAX ? e->n_tokens : INT32_MAX);
        const int past = a->n_past[e->slot];
        *kind = "eval_range";
        if (n <= 0 && (!releasing || e->want_logits)) {
            snprintf(buf, cap,
                     "eval of 0 tokens in slot %u (a request of entries without "
                     "tokens only releases memory)",
                     e->slot);
            return STP_EINVAL;
        }
        if (e->pos0 < 0 || e->pos0 > past) {
            snprintf(buf, cap, "slot %u: position %d is outside 0..%d (the positions it holds)",
                     e->slot, e->pos0, past);
            return STP_ERANGE;
        }
        const int high = a->high[e->slot] > past ? a->high[e->slot] : past;
        if (kv_cache_keep_max(a->kv[e->slot], high, e->pos0) != e->pos0) {
            snprintf(buf, cap,
                     "slot %u: the first %d of its %d positions cannot be kept (its "
                     "sliding-window caches have moved on; start again at 0)",
                     e->slot, e->pos0, past);
            return STP_ERANGE;
        }
        if (n > a->n_ctx - e->pos0) {
            snprintf(buf, cap, "slot %u: eval of %d tokens at position %d: the context is %d",
                     e->slot, n, e->pos0, a->n_ctx);
            return STP_ERANGE;
        }
        const char *why = forward_part_check(
            (int)(e->from < INT32_MAX ? e->from : INT32_MAX),
            (int)(e->upto < INT32_MAX ? e->upto : INT32_MAX), c->n_layer, (int)i, (int)q->n_seqs,
            (int)(total < INT32_MAX ? total : INT32_MAX), a->n_ubatch);
        if (why) {
            *kind = "eval_seq";
            snprintf(buf, cap, "slot %u: %s", e->slot, why);
            return STP_EINVAL;
        }
        *kind = "eval_token";
        for (int t = 0; t < n; t++)
            if (e->tokens[t] < 0 || e->tokens[t] >= c->n_vocab) {
                snprintf(buf, cap, "slot %u: token id %d at index %d is outside 0..%d", e->slot,
                         e->tokens[t], t, c->n_vocab - 1);
                return STP_ERANGE;
            }
        *kind = "eval_seq";
    }
    return 0;
}

/* After a failed micro-batch: each slot of the request goes back to the positions it held
 * before the request when its caches still hold them (nothing written to it yet, or only
 * appended at its old end and the sliding-window rule keeps them), else to 0. */
static void s_rollback(attn_worker *a, const Stp__EvalRequest *q, const int *old) {
    for (size_t i = 0; i < q->n_seqs; i++) {
        const Stp__EvalSeq *e = q->seqs[i];
        const int s = (int)e->slot;
        forward_part_drop(&a->part, s); /* its rows may be half way through a layer */
        if (!a->wend[s] ||
            (e->pos0 == old[i] && kv_cache_keep_max(a->kv[s], a->high[s], old[i]) == old[i])) {
            a->n_past[s] = old[i];
        } else {
            a->n_past[s] = a->high[s] = 0;
            kv_cache_release(a->kv[s], 0);
        }
    }
}

/* A request whose entries have no tokens: each slot keeps its first pos0 positions and gives
 * the memory of the rest back (the coordinator's KV pool emptied an idle slot). */
static void s_release(attn_worker *a, const msg_in *in, const Stp__EvalRequest *q) {
    int32_t *past = a->r_past;
    uint64_t *off = a->r_off;
    for (size_t i = 0; i < q->n_seqs; i++) {
        const Stp__EvalSeq *e = q->seqs[i];
        /* a chunk left part way wrote past n_past (even when another slot's chunk has since
         * taken the rows): the high-water mark says so */
        if (e->pos0 < a->n_past[e->slot] || a->high[e->slot] > a->n_past[e->slot]) {
            a->n_past[e->slot] = e->pos0;
            kv_cache_release(a->kv[e->slot], e->pos0);
        }
        if (!e->pos0) a->high[e->slot] = 0;
        forward_part_drop(&a->part, (int)e->slot);
        past[i] = a->n_past[e->slot];
        off[i] = 0;
    }
    stats_add(a->st, "kv.releases", (uint64_t)q->n_seqs);
    Stp__EvalReply r;
    stp__eval_reply__init(&r);
    r.seq = q->seq;
    r.n_n_past = q->n_seqs;
    r.n_past = past;
    r.n_vocab = a->m->cfg.n_vocab;
    r.n_logits_offset = q->n_seqs;
    r.logits_offset = off;
    r.act_epoch = a->ah->epoch;
    Stp__EvalMsg m;
    stp__eval_msg__init(&m);
    m.body_case = STP__EVAL_MSG__BODY_REPLY;
    m.reply = &r;
    s_reply(a, in, &m);
}

static void s_eval(attn_worker *a, const msg_in *in, const Stp__EvalRequest *q) {
    const model_config *c = &a->m->cfg;
    char buf[256];
    const char *kind = NULL;
    int rc = s_check(a, q, buf, sizeof buf, &kind);
    if (rc) return s_error(a, in, kind, q->seq, rc, buf);
    if (q->seqs[0]->n_tokens == 0) return s_release(a, in, q);
    const int nb = (int)q->n_seqs, V = c->n_vocab;
    int n = 0, *old = a->old_past; /* entries are distinct slots: at most n_seq */
    bool decode = true;
    for (int i = 0; i < nb; i++) {
        const Stp__EvalSeq *e = q->seqs[i];
        if (e->pos0 != a->n_past[e->slot]) forward_part_drop(&a->part, (int)e->slot); /* moved */
        if (forward_part_begin(&a->part, (int)e->slot, (int)e->from, (int)e->upto, (int)e->n_tokens,
                               c->n_layer, c->n_embd))
            return s_error(a, in, NULL, q->seq, STP_ENOMEM, "out of memory for a prompt chunk");
    }
    for (int i = 0; i < nb; i++) {
        const Stp__EvalSeq *e = q->seqs[i];
        n += (int)e->n_tokens;
        decode &= e->n_tokens == 1;
        old[i] = a->n_past[e->slot];
        a->n_past[e->slot] = e->pos0; /* keeps its first pos0 positions */
        a->wend[e->slot] = 0;
    }
    float *all = NULL;
    if (q->all_logits) {
        all = malloc((size_t)n * V * sizeof(float));
        if (!all) {
            for (int i = 0; i < nb; i++)
                a->n_past[q->seqs[i]->slot] = old[i];
            return s_error(a, in, NULL, q->seq, STP_ENOMEM, "out of memory for logits");
        }
    }
    double t0 = msg_now_us();
    a->ipc_us = a->router_us = a->attn_us = a->experts_us = a->head_us = 0;
    a->active = a->total = a->down = 0;
    s_pool_refresh(a);
    stp_err err = {0};
    rc = s_run_request(a, q, all, &err);
    double us = msg_now_us() - t0;
    if (rc) {
        free(all);
        s_rollback(a, q, old);
        stage_log(STAGE, "eval failed: %s", err.msg);
        stats_add(a->st, "eval.errors", 1);
        return s_error(a, in, NULL, q->seq, rc, err.msg);
    }
    stats_latency(a->st, decode ? "eval.decode" : "eval.batch", us);
    stats_add(a->st, "msg.eval", 1);
    stats_add(a->st, "eval.seqs", (uint64_t)nb);
    int n_through = n; /* a chunk part way counts when it is through */
    for (int i = 0; i < nb; i++)
        if (!forward_part_through((int)q->seqs[i]->upto, c->n_layer))
            n_through -= (int)q->seqs[i]->n_tokens;
    stats_add(a->st, "tokens", (uint64_t)n_through);
    stats_add(a->st, "ipc_us", (uint64_t)a->ipc_us);
    stats_add(a->st, "eval_us", (uint64_t)us);
    if (decode) { /* one token of each of nb sequences */
        stats_add(a->st, "decode.tokens", (uint64_t)nb);
        stats_add(a->st, "decode.ipc_us", (uint64_t)a->ipc_us);
        stats_add(a->st, "decode.eval_us", (uint64_t)us);
        stats_latency(a->st, "ipc_per_token", a->ipc_us / nb);
    }
    int32_t *past = a->r_past;
    uint64_t *off = a->r_off;
    for (int i = 0; i < nb; i++) {
        const Stp__EvalSeq *e = q->seqs[i];
        /* a slot cut back (pos0 < its old n_past) gives the pages past its new end back, as
         * engine_seq_keep does (kv_cache_release); done only now, so that a failed request
         * could still fall back to the old positions */
        const int end =
            a->n_past[e->slot] > a->wend[e->slot] ? a->n_past[e->slot] : a->wend[e->slot];
        if (e->pos0 < old[i]) kv_cache_release(a->kv[e->slot], end); /* a chunk part way: past */
        if (!e->pos0) a->high[e->slot] = end; /* started again at 0: only this is written */
        past[i] = a->n_past[e->slot];
        const bool through = forward_part_through((int)e->upto, c->n_layer); /* else no logits */
        off[i] = e->want_logits && through
                     ? a->ah->off_logits + (uint64_t)e->slot * V * sizeof(float)
                     : 0;
    }
    Stp__EvalReply r;
    stp__eval_reply__init(&r);
    r.seq = q->seq;
    r.n_n_past = (size_t)nb;
    r.n_past = past;
    r.n_vocab = V;
    r.n_logits_offset = (size_t)nb;
    r.logits_offset = off;
    r.act_epoch = a->ah->epoch;
    if (all) {
        r.logits.data = (uint8_t *)all;
        r.logits.len = (size_t)n * V * sizeof(float);
    }
    r.compute_ms = (us - a->ipc_us) * 1e-3;
    r.ipc_ms = a->ipc_us * 1e-3;
    r.active_neurons = a->active;
    r.total_neurons = a->total;
    r.down_neurons = a->down;
    r.router_ms = a->router_us * 1e-3;
    r.attn_ms = a->attn_us * 1e-3;
    r.experts_ms = a->experts_us * 1e-3;
    r.head_ms = a->head_us * 1e-3;
    Stp__EvalMsg out;
    stp__eval_msg__init(&out);
    out.body_case = STP__EVAL_MSG__BODY_REPLY;
    out.reply = &r;
    s_reply(a, in, &out);
    free(all);
}

static void s_handle(attn_worker *a, msg_in *in, bool busy) {
    Stp__EvalMsg *m = stp__eval_msg__unpack(NULL, in->len, in->data);
    if (!m) return s_error(a, in, "undecodable", 0, STP_EPROTO, "not an EvalMsg");
    if (m->version != STP_PROTO_VERSION) {
        char b[96];
        snprintf(b, sizeof b, "protocol version %u, expected %u", m->version, STP_PROTO_VERSION);
        s_error(a, in, "version", 0, STP_EPROTO, b);
    } else if (m->body_case == STP__EVAL_MSG__BODY_PING) {
        Stp__Pong p;
        stp__pong__init(&p);
        p.nonce = m->ping->nonce;
        p.stage = STAGE;
        p.pid = (int32_t)getpid();
        p.n_seq = a->n_seq; /* the coordinator's multi-sequence backend sizes itself from these */
        p.n_ctx = a->n_ctx;
        p.n_ubatch = a->n_ubatch;
        Stp__EvalMsg r;
        stp__eval_msg__init(&r);
        r.body_case = STP__EVAL_MSG__BODY_PONG;
        r.pong = &p;
        s_reply(a, in, &r);
    } else if (m->body_case == STP__EVAL_MSG__BODY_REQUEST && busy) {
        s_error(a, in, NULL, m->request->seq, STP_EBUSY, "busy: an eval is running");
    } else if (m->body_case == STP__EVAL_MSG__BODY_REQUEST) {
        s_eval(a, in, m->request);
    } else {
        s_error(a, in, "unexpected", 0, STP_EPROTO, "expected EvalRequest or Ping");
    }
    stp__eval_msg__free_unpacked(m, NULL);
}

int attn_worker_run(attn_worker *a, stp_err *err) {
    (void)err;
    stp_err e2 = {0};
    if (stage_ready(a->o.run_dir, "attn", &e2)) stage_log(STAGE, "%s", e2.msg);
    while (!stage_stopping()) {
        bool rd[1];
        if (msg_poll(&a->sock, 1, rd, 250) && rd[0]) s_serve(a, false);
        stats_publish(a->st, a->pub, 500, false);
    }
    stage_unready(a->o.run_dir, "attn");
    return 0;
}
