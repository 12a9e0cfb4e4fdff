/* storage: expert layout file -> weight pool streaming under a memory budget, residency server;
 * see storage.h and README.md. */
#include "storage.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <zmq.h>

#include "cache/cache_policy.h"
#include "io/io.h"
#include "layout/layout.h"
#include "msg/lane.h"
#include "msg/msg.h"
#include "plan/budget.h"
#include "router.pb-c.h"
#include "shm/shm.h"
#include "stats/stats.h"

#define STAGE "storage-daemon"
#define MiB (1024.0 * 1024.0)
/* One read request. An expert (~2 MiB on the 4b preset) goes as four reads in flight at once:
 * it lands sooner than as two of 1 MiB (less stall per token at 1 GiB), and 256 KiB was no
 * better (docs/BENCHMARKS.md). */
#define STORAGE_READ_CHUNK (1u << 19)
/* Experts read at once. The disk gains nothing from a deeper queue (1 MiB reads were slower
 * eight at a time than two: docs/BENCHMARKS.md) and a demand read would wait behind more
 * prefetches. */
#define STORAGE_READS_AHEAD 1
/* Decisions waiting for their reads at once (the attention worker is sequential: one, plus a
 * resend or a restarted worker's). */
#define STORAGE_WAITERS 8

/* A decision answered when its last expert lands. */
typedef struct waiter {
    uint8_t id[MSG_ID_MAX];
    size_t id_len;
    uint64_t seq;
    uint32_t layer;
    int n;
    int32_t need[STP_MAX_EXPERTS];
    uint32_t experts[STP_MAX_EXPERTS];
    double t0;
    bool decode;
    bool quiet; /* answered only with an error */
} waiter;

/* Entries to read, in order (each entry at most once in all queues). */
typedef struct read_queue {
    int32_t *e; /* (NL * X) */
    int head, n, cap;
} read_queue;

struct storage {
    stage_opts o;
    storage_opts so;
    model *m;
    layout *lay;
    io_reader *io;
    budget_plan plan;
    shm_region pool;
    void *zctx, *sock, *pub;
    stats *st;
    int NL, X;
    cache_policy_kind policy;
    double half_life;     /* lfu, in tokens */
    cache_policy *pol;    /* victims (common/cache): ticks once per decision */
    int32_t *frame_owner; /* (frames) entry (layer * X + expert) or -1 */
    int32_t *entry_frame; /* (NL * X) frame or -1 */
    int32_t *cand;        /* (frames) eviction candidates, frame order */
    uint64_t gen;
    int n_used_frames;
    int32_t held[STP_MAX_EXPERTS]; /* the last decision's entries: in use, never evicted */
    int n_held;
    uint8_t *prefetched; /* (NL * X) read by a prefetch and not used since */
    FILE *trace;         /* decode decisions, a line each: "layer expert..." (--trace-decisions) */
    /* reads: an entry with a frame is READY, or LOADING and then queued (demand first, then
     * prefetch) or in flight (chunks[e] reads outstanding) */
    read_queue demand, ahead;
    uint8_t *queued;      /* (NL * X) 1: in demand, 2: in ahead */
    uint8_t *pf_queued;   /* (NL * X) queued by a prediction (its read counts as a prefetch) */
    uint8_t *chunks;      /* (NL * X) reads in flight */
    uint8_t *failed;      /* (NL * X) a read of the entry failed (answered when its last lands) */
    double *read_t0;      /* (NL * X) when its reads started */
    int n_reading;        /* entries in flight */
    int32_t *free_frames; /* frames given back (a cancelled prefetch, a failed read) */
    int n_free;
    waiter waiters[STORAGE_WAITERS];
    int n_waiters;
    char read_err[160]; /* the last failed read's message */
};

/* ---- cache ---- */

static bool s_in(const int32_t *list, int n, int e) {
    for (int i = 0; i < n; i++)
        if (list[i] == e) return true;
    return false;
}

/* A frame for a new entry: a free one, else the policy's victim among READY entries the
 * current decision (need[], n_need) does not use; for a prefetch (which runs while the expert
 * workers compute the last decision) also not the last decision's nor any of the predicted
 * layer's. Entries being read or queued are never victims. -1 if none. The mechanism picks the
 * candidates (frame order); the policy picks among them. */
static int s_victim(storage *s, const int32_t *need, int n_need, bool prefetch) {
    if (s->n_free) return s->free_frames[--s->n_free];
    if (s->n_used_frames < s->plan.frames) return s->n_used_frames++;
    const pool_header *h = (const pool_header *)s->pool.base;
    int n = 0;
    for (int f = 0; f < s->plan.frames; f++) {
        int e = s->frame_owner[f];
        if (e < 0 || h->slots[e].state != POOL_READY || s_in(need, n_need, e)) continue;
        /* a prefetch keeps its own layer (the attention worker may have dispatched any of its
         * READY experts before the layer's decision arrives) and the last decision */
        if (prefetch && (e / s->X == need[0] / s->X || s_in(s->held, s->n_held, e))) continue;
        s->cand[n++] = e;
    }
    int v = cache_policy_victim(s->pol, s->cand, n);
    return v < 0 ? -1 : s->entry_frame[s->cand[v]];
}

static void s_queue_push(read_queue *q, int32_t e) {
    q->e[(q->head + q->n++) % q->cap] = e;
}

static int32_t s_queue_pop(read_queue *q) {
    int32_t e = q->e[q->head];
    q->head = (q->head + 1) % q->cap;
    q->n--;
    return e;
}

/* Gives entry e's frame back (its slot EMPTY with a new generation). */
static void s_release(storage *s, int e) {
    pool_header *h = (pool_header *)s->pool.base;
    int f = s->entry_frame[e];
    __atomic_store_n(&h->slots[e].state, POOL_EMPTY, __ATOMIC_RELEASE);
    h->slots[e].generation = ++s->gen;
    s->entry_frame[e] = -1;
    s->frame_owner[f] = -1;
    s->free_frames[s->n_free++] = f;
    s->prefetched[e] = 0;
}

/* Takes frame f for entry e (evicting its READY owner) and queues the read. */
static void s_assign(storage *s, int e, int f, bool prefetch) {
    pool_header *h = (pool_header *)s->pool.base;
    int old = s->frame_owner[f];
    if (old >= 0) { /* invalidate before the bytes change */
        pool_slot *os = &h->slots[old];
        __atomic_store_n(&os->state, POOL_EMPTY, __ATOMIC_RELEASE);
        os->generation = ++s->gen;
        s->entry_frame[old] = -1;
        stats_add(s->st, "cache.evictions", 1);
        if (s->prefetched[old]) {
            s->prefetched[old] = 0;
            stats_add(s->st, "prefetch.wasted", 1);
        }
    }
    s->prefetched[e] = prefetch;
    s->frame_owner[f] = e;
    s->entry_frame[e] = f;
    pool_slot *sl = &h->slots[e];
    __atomic_store_n(&sl->state, POOL_LOADING, __ATOMIC_RELEASE);
    sl->generation = ++s->gen;
    sl->offset = h->data_offset + (uint64_t)f * s->plan.frame_bytes;
    const layout_entry *le = &s->lay->e[(size_t)e * 3];
    sl->bytes = le[2].off - le[0].off + le[2].bytes; /* = pool_slot_parts' total */
    s->queued[e] = prefetch ? 2 : 1;
    s->pf_queued[e] = prefetch;
    s_queue_push(prefetch ? &s->ahead : &s->demand, e);
}

/* Starts queued reads (demand first) while fewer than STORAGE_READS_AHEAD are in flight. */
static void s_pump(storage *s) {
    const pool_header *h = (const pool_header *)s->pool.base;
    while (s->n_reading < STORAGE_READS_AHEAD && (s->demand.n || s->ahead.n)) {
        read_queue *q = s->demand.n ? &s->demand : &s->ahead;
        int32_t e = s_queue_pop(q);
        if (s->queued[e] != (q == &s->demand ? 1 : 2)) continue; /* moved or cancelled */
        s->queued[e] = 0;
        int il = e / s->X, x = e % s->X;
        uint64_t fo = layout_record_off(s->lay, il, x), len = layout_record_bytes(s->lay, il, x);
        uint8_t *dst = s->pool.base + h->slots[e].offset;
        s->read_t0[e] = msg_now_us();
        s->failed[e] = 0;
        for (uint64_t at = 0; at < len; at += STORAGE_READ_CHUNK) {
            uint64_t l = len - at < STORAGE_READ_CHUNK ? len - at : STORAGE_READ_CHUNK;
            io_req rq = {fo + at, (size_t)l, dst + at};
            stp_err err = {0};
            if (io_start(s->io, &rq, (uint64_t)e, &err)) {
                s->failed[e] = 1;
                snprintf(s->read_err, sizeof s->read_err, "%.150s", err.msg);
                break;
            }
            s->chunks[e]++;
        }
        if (s->chunks[e]) {
            s->n_reading++;
            stats_add(s->st, "read.bytes", len);
            if (s->pf_queued[e]) { /* (a prediction, maybe needed since: still its read) */
                stats_add(s->st, "prefetch.reads", 1);
                stats_add(s->st, "prefetch.bytes", len);
            }
        } else {
            s_release(s, e); /* nothing started: answered as a failed read */
            s->failed[e] = 1;
        }
    }
}

static int s_reap(storage *s, bool wait);

/* Makes every needed entry resident or on its way: queues reads of the missing ones (a
 * decision's before every prefetch; a prefetch's queued entries it needs become demand) and
 * counts hits (entries with a frame, landed or not) and misses. A prefetch (a prediction)
 * touches no use counts and stops at the first entry it has no frame for. Returns the misses. */
static int s_make_resident(storage *s, const int32_t *need, int n, bool prefetch) {
    int misses = 0;
    if (!prefetch) {
        cache_policy_tick(s->pol);
        for (int i = 0; i < n; i++)
            if (s->queued[need[i]] == 2) { /* predicted, not started: now needed */
                s->queued[need[i]] = 1;
                s_queue_push(&s->demand, need[i]);
            }
        while (s->ahead.n) { /* the other predictions not started are stale: frames back */
            int32_t e = s_queue_pop(&s->ahead);
            if (s->queued[e] != 2) continue;
            s->queued[e] = 0;
            s_release(s, e);
            stats_add(s->st, "prefetch.cancelled", 1);
        }
    }
    for (int i = 0; i < n; i++) {
        int e = need[i];
        if (!prefetch) cache_policy_touch(s->pol, e);
        if (s->entry_frame[e] >= 0) {
            if (!prefetch && s->prefetched[e]) {
                s->prefetched[e] = 0;
                stats_add(s->st, "prefetch.used", 1);
            }
            continue;
        }
        int f = s_victim(s, need, n, prefetch);
        /* a decision may find every other frame being read (the pool's minimum is one layer):
         * those land, become evictable, and it takes one */
        while (f < 0 && !prefetch && s->n_reading && s_reap(s, true) >= 0)
            f = s_victim(s, need, n, prefetch);
        if (f < 0) return prefetch ? misses : -1;
        s_assign(s, e, f, prefetch);
        misses++;
    }
    s_pump(s);
    return misses;
}

/* All of the decision's entries READY (0), still coming (1) or one failed to read (-1). */
static int s_resident(const storage *s, const int32_t *need, int n) {
    const pool_header *h = (const pool_header *)s->pool.base;
    int res = 0;
    for (int i = 0; i < n; i++) {
        int e = need[i];
        if (s->entry_frame[e] < 0) return -1;
        if (__atomic_load_n(&h->slots[e].state, __ATOMIC_ACQUIRE) != POOL_READY) res = 1;
    }
    return res;
}

/* Takes the completions: an entry whose last read landed becomes READY (or, failed, gives its
 * frame back). Returns the entries that finished. */
static int s_reap(storage *s, bool wait) {
    pool_header *h = (pool_header *)s->pool.base;
    io_done d[32];
    int got = io_reap(s->io, d, 32, wait), finished = 0, landed = 0;
    for (int i = 0; i < got; i++) {
        int e = (int)d[i].tag;
        if (d[i].rc) {
            s->failed[e] = 1;
            snprintf(s->read_err, sizeof s->read_err, "%s", d[i].msg);
        }
        if (--s->chunks[e]) continue;
        s->n_reading--;
        finished++;
        double us = msg_now_us() - s->read_t0[e];
        stats_add(s->st, "read.us", (uint64_t)us);
        stats_latency(s->st, "read", us);
        if (s->failed[e]) {
            stage_log(STAGE, "reading expert %d of layer %d: %s", e % s->X, e / s->X, s->read_err);
            s_release(s, e);
        } else {
            __atomic_store_n(&h->slots[e].state, POOL_READY, __ATOMIC_RELEASE);
            landed++;
        }
    }
    if (landed) { /* the attention worker may be sleeping on it (shm.h) */
        atomic_fetch_add_explicit(&h->landed, 1, memory_order_release);
        lane_wake(&h->landed);
    }
    if (got) s_pump(s);
    return finished;
}

static int s_open_layout(storage *s, stp_err *err) {
    char path[4096];
    int rc = layout_path(path, sizeof path, s->o.model, s->so.layout_dir, err);
    if (rc) return rc;
    bool rebuilt = false;
    double t0 = msg_now_us();
    rc = layout_ensure(&s->lay, s->m, s->o.model, path, layout_wants_flags(s->m), stderr, &rebuilt,
                       err);
    if (rc) return rc;
    if (rebuilt) stage_log(STAGE, "built %s in %.1f s", path, (msg_now_us() - t0) * 1e-6);
    return io_reader_open(&s->io, path, 64, err);
}

static int s_create_pool(storage *s, stp_err *err) {
    const int NL = s->NL, X = s->X;
    uint64_t frame = 0;
    for (int il = 0; il < NL; il++)
        for (int x = 0; x < X; x++) {
            uint64_t b = layout_record_bytes(s->lay, il, x);
            if (b > frame) frame = b;
        }
    budget_params bp = {.cfg = &s->m->cfg,
                        .non_expert = s->m->weight_bytes - s->m->expert_bytes,
                        .frame_bytes = frame,
                        .n_ctx = s->o.n_ctx,
                        .n_ubatch = s->o.n_ubatch,
                        .kv_type = s->o.kv_type,
                        .n_seq = s->o.n_seq, /* --parallel: the attention worker's slots */
                        .kv_pool = s->o.kv_pool,
                        .workers = s->so.workers > 0 ? s->so.workers : 2,
                        .threads = s->so.attn_threads > 0 ? s->so.attn_threads : 1,
                        .budget = s->so.memory_budget,
                        .pool_experts = s->so.pool_experts};
    stp_err e2 = {0};
    int rc = budget_plan_compute(&s->plan, &bp, &e2);
    if (rc) return stp_err_set(err, rc, "%s: %s", s->o.model, e2.msg);
    size_t n = (size_t)NL * X;
    s->frame_owner = malloc((size_t)s->plan.frames * sizeof(int32_t));
    s->entry_frame = malloc(n * sizeof(int32_t));
    s->cand = malloc((size_t)s->plan.frames * sizeof(int32_t));
    s->prefetched = calloc(n, 1);
    s->queued = calloc(n, 1);
    s->pf_queued = calloc(n, 1);
    s->chunks = calloc(n, 1);
    s->failed = calloc(n, 1);
    s->read_t0 = calloc(n, sizeof(double));
    s->demand.e = calloc(n, sizeof(int32_t));
    s->ahead.e = calloc(n, sizeof(int32_t));
    s->demand.cap = s->ahead.cap = (int)n;
    s->free_frames = calloc((size_t)s->plan.frames, sizeof(int32_t));
    cache_policy_config pc = {
        .kind = s->policy, .n_entries = NL * X, .half_life = s->half_life * NL};
    if ((rc = cache_policy_new(&s->pol, &pc, err))) return rc;
    if (!s->frame_owner || !s->entry_frame || !s->cand || !s->prefetched || !s->queued ||
        !s->pf_queued || !s->chunks || !s->failed || !s->read_t0 || !s->demand.e || !s->ahead.e ||
        !s->free_frames)
        return stp_err_set(err, STP_ENOMEM, "out of memory");
    for (int f = 0; f < s->plan.frames; f++)
        s->frame_owner[f] = -1;
    for (size_t i = 0; i < n; i++)
        s->entry_frame[i] = -1;
    size_t total = s->plan.pool_bytes;
    char name[160];
    if ((rc = stage_shm_name(name, sizeof name, s->o.run_dir, "pool", err))) return rc;
    if ((rc = shm_region_create(&s->pool, name, total, err))) return rc;
    pool_header *h = (pool_header *)s->pool.base;
    h->magic = POOL_MAGIC;
    h->version = POOL_VERSION;
    h->n_layer = (uint32_t)NL;
    h->n_expert = (uint32_t)X;
    h->size = total;
    h->data_offset = pool_table_bytes(NL, X);
    h->flags = (s->lay->h.flags & LAYOUT_DOWN_T) ? POOL_DOWN_T : 0;
    if (s->lay->h.flags & LAYOUT_GATE_X16) h->flags |= POOL_GATE_X16;
    stats_set(s->st, "pool.bytes", total);
    stats_set(s->st, "pool.frames", (uint64_t)s->plan.frames);
    stats_set(s->st, "budget.bytes", s->so.memory_budget);
    stats_set(s->st, "budget.minimum", s->plan.minimum);
    stage_log(STAGE,
              "pool %.1f MiB: %d of %d experts (%.2f MiB each), budget %.0f MiB (minimum %.0f), "
              "policy %s, reads %s",
              total / MiB, s->plan.frames, NL * X, frame / MiB, s->so.memory_budget / MiB,
              s->plan.minimum / MiB, cache_policy_name(s->policy), io_reader_mode(s->io));
    if (s->plan.frames == NL * X) { /* everything fits: read it all now */
        double t0 = msg_now_us();
        for (int il = 0; il < NL && !stage_stopping(); il++) {
            int32_t need[STP_MAX_EXPERTS];
            for (int x = 0; x < X; x++)
                need[x] = il * X + x;
            s_make_resident(s, need, X, false);
            while (s->n_reading)
                s_reap(s, true);
            if (s_resident(s, need, X))
                return stp_err_set(err, STP_EIO, "reading the experts of layer %d: %s", il,
                                   s->read_err);
        }
        if (!stage_stopping()) h->flags |= POOL_COMPLETE; /* (read by others only after ready) */
        stage_log(STAGE, "all experts resident in %.2f s", (msg_now_us() - t0) * 1e-6);
    }
    return 0;
}

int storage_new(storage **out, const stage_opts *o, const storage_opts *so, stp_err *err) {
    *out = NULL;
    storage *s = calloc(1, sizeof *s);
    if (!s) return stp_err_set(err, STP_ENOMEM, "out of memory");
    s->o = *o;
    s->so = *so;
    s->policy = CACHE_POLICY_LFU;
    s->half_life = so->lfu_half_life > 0 ? so->lfu_half_life : CACHE_POLICY_HALF_LIFE;
    int rc = 0;
    if (so->policy) rc = cache_policy_parse(so->policy, &s->policy, err);
    if (!rc) rc = stats_new(&s->st, STAGE, err);
    if (!rc) rc = model_open(&s->m, o->model, err);
    if (!rc) {
        s->NL = s->m->cfg.n_layer;
        s->X = s->m->cfg.n_expert;
        rc = s_open_layout(s, err);
    }
    if (!rc) rc = s_create_pool(s, err);
    if (!rc && so->trace && *so->trace && !(s->trace = fopen(so->trace, "a")))
        rc = stp_err_set(err, STP_EIO, "--trace-decisions %s: %s", so->trace, strerror(errno));
    if (rc) goto fail;
    s->zctx = zmq_ctx_new();
    char ep[512];
    if ((rc = msg_endpoint(ep, sizeof ep, o->run_dir, "storage", err))) goto fail;
    if (!(s->sock = msg_socket(s->zctx, ZMQ_ROUTER, ep, true, err))) goto fail_io;
    if ((rc = msg_endpoint(ep, sizeof ep, o->run_dir, "stats-storage", err))) goto fail;
    if (!(s->pub = msg_socket(s->zctx, ZMQ_PUB, ep, true, err))) goto fail_io;
    *out = s;
    return 0;
fail_io:
    rc = STP_EIO;
fail:
    storage_destroy(&s);
    return rc;
}

void storage_destroy(storage **self_p) {
    storage *s = *self_p;
    if (!s) return;
    msg_close(&s->sock);
    msg_close(&s->pub);
    if (s->zctx) zmq_ctx_term(s->zctx);
    io_reader_close(&s->io); /* (waits for reads in flight: they land in the pool) */
    shm_region_close(&s->pool);
    layout_close(&s->lay);
    model_close(&s->m);
    stats_destroy(&s->st);
    free(s->frame_owner);
    free(s->entry_frame);
    free(s->cand);
    cache_policy_destroy(&s->pol);
    free(s->prefetched);
    free(s->queued);
    free(s->pf_queued);
    free(s->chunks);
    free(s->failed);
    free(s->read_t0);
    free(s->demand.e);
    free(s->ahead.e);
    free(s->free_frames);
    if (s->trace) fclose(s->trace);
    free(s);
    *self_p = NULL;
}

/* Sends r (version set here) to the peer id of the socket. */
static void s_send_to(storage *s, const uint8_t *id, size_t id_len, Stp__RouterMsg *r) {
    r->version = STP_PROTO_VERSION;
    if (msg_send(s->sock, id, id_len, &r->base, NULL)) stats_add(s->st, "send_errors", 1);
}

static void s_reply(storage *s, const msg_in *in, Stp__RouterMsg *r) {
    s_send_to(s, in->id, in->id_len, r);
}

/* Validates a decision; "" when fine, else what is wrong. */
static const char *s_check(const storage *s, const Stp__RouterDecision *d, char *buf, size_t cap) {
    const model_config *c = &s->m->cfg;
    if (d->layer >= (uint32_t)c->n_layer) {
        snprintf(buf, cap, "layer %u outside 0..%d", d->layer, c->n_layer - 1);
        return buf;
    }
    if (d->n_experts == 0 || d->n_experts > (size_t)c->n_expert) {
        snprintf(buf, cap, "%zu experts (1..%d allowed)", d->n_experts, c->n_expert);
        return buf;
    }
    if (d->n_counts && d->n_counts != d->n_experts) {
        snprintf(buf, cap, "%zu counts for %zu experts", d->n_counts, d->n_experts);
        return buf;
    }
    for (size_t i = 0; i < d->n_experts; i++)
        if (d->experts[i] >= (uint32_t)c->n_expert || (i && d->experts[i] <= d->experts[i - 1])) {
            snprintf(buf, cap, "expert list not ascending in 0..%d", c->n_expert - 1);
            return buf;
        }
    return "";
}

/* Residency for a decision whose experts are all READY. */
static void s_answer(storage *s, const uint8_t *id, size_t id_len, uint64_t seq, uint32_t layer,
                     const uint32_t *experts, const int32_t *need, int n, double t0) {
    const pool_header *h = (const pool_header *)s->pool.base;
    Stp__ExpertLoc locs[STP_MAX_EXPERTS], *lp[STP_MAX_EXPERTS];
    protobuf_c_boolean ready[STP_MAX_EXPERTS];
    for (int i = 0; i < n; i++) {
        const pool_slot *sl = &h->slots[need[i]];
        stp__expert_loc__init(&locs[i]);
        locs[i].expert = experts[i];
        locs[i].offset = sl->offset;
        locs[i].generation = sl->generation;
        ready[i] = __atomic_load_n(&sl->state, __ATOMIC_ACQUIRE) == POOL_READY;
        lp[i] = &locs[i];
    }
    Stp__Residency res;
    stp__residency__init(&res);
    res.seq = seq;
    res.layer = layer;
    res.n_experts = (size_t)n;
    res.experts = lp;
    res.n_ready = (size_t)n;
    res.ready = ready;
    Stp__RouterMsg r;
    stp__router_msg__init(&r);
    r.body_case = STP__ROUTER_MSG__BODY_RESIDENCY;
    r.residency = &res;
    s_send_to(s, id, id_len, &r);
    stats_add(s->st, "msg.decision", 1);
    stats_latency(s->st, "decision", msg_now_us() - t0);
}

static void s_error_to(storage *s, const uint8_t *id, size_t id_len, uint64_t seq, int code,
                       const char *what) {
    Stp__StpError e;
    stp__stp_error__init(&e);
    e.code = code;
    e.what = (char *)what;
    e.seq = seq;
    Stp__RouterMsg r;
    stp__router_msg__init(&r);
    r.body_case = STP__ROUTER_MSG__BODY_ERROR;
    r.error = &e;
    s_send_to(s, id, id_len, &r);
}

static void s_error(storage *s, const msg_in *in, const char *kind, uint64_t seq, int code,
                    const char *what) {
    if (stats_bad(s->st, kind)) stage_log(STAGE, "invalid message (%s): %s", kind, what);
    s_error_to(s, in->id, in->id_len, seq, code, what);
}

/* Answers the waiting decisions whose experts all landed (or one of which failed). */
static void s_answer_waiters(storage *s) {
    for (int i = 0; i < s->n_waiters;) {
        waiter *w = &s->waiters[i];
        int res = s_resident(s, w->need, w->n);
        if (res > 0) {
            i++;
            continue;
        }
        if (res == 0) {
            if (w->quiet)
                stats_add(s->st, "msg.quiet", 1);
            else
                s_answer(s, w->id, w->id_len, w->seq, w->layer, w->experts, w->need, w->n, w->t0);
            if (w->decode) stats_add(s->st, "decode.read_us", (uint64_t)(msg_now_us() - w->t0));
        } else {
            stats_add(s->st, "bad.read", 1);
            char what[200];
            snprintf(what, sizeof what, "layer %u: %s", w->layer, s->read_err);
            s_error_to(s, w->id, w->id_len, w->seq, STP_EIO, what);
        }
        s->waiters[i] = s->waiters[--s->n_waiters];
    }
}

static void s_decide(storage *s, msg_in *in, const Stp__RouterDecision *d, double t0) {
    int32_t need[STP_MAX_EXPERTS];
    uint64_t total = 0;
    const int n = (int)d->n_experts;
    for (int i = 0; i < n; i++) {
        need[i] = (int32_t)(d->layer * (uint32_t)s->X + d->experts[i]);
        total += d->n_counts ? d->counts[i] : 0;
    }
    bool decode = d->n_counts && total <= (uint64_t)s->m->cfg.n_expert_used;
    if (d->prefetch) { /* a prediction: queue reads of what is missing, answer nothing */
        stats_add(s->st, "msg.prefetch", 1);
        s_make_resident(s, need, n, true);
        return;
    }
    if (s->trace && decode) {
        fprintf(s->trace, "%u", d->layer);
        for (int i = 0; i < n; i++)
            fprintf(s->trace, " %u", d->experts[i]);
        fputc('\n', s->trace);
        if (d->layer + 1 == (uint32_t)s->NL) fflush(s->trace);
    }
    memcpy(s->held, need, (size_t)n * sizeof *need);
    s->n_held = n;
    int misses = s_make_resident(s, need, n, false);
    if (misses < 0) {
        stage_log(STAGE, "pool: no free slot for layer %u", d->layer);
        return s_error(s, in, "read", d->seq, STP_ERANGE, "pool: no free slot");
    }
    stats_add(s->st, "cache.hits", (uint64_t)(n - misses));
    stats_add(s->st, "cache.misses", (uint64_t)misses);
    if (decode) {
        stats_add(s->st, "decode.decisions", 1);
        stats_add(s->st, "decode.hits", (uint64_t)(n - misses));
        stats_add(s->st, "decode.misses", (uint64_t)misses);
        stats_add(s->st, "decode.read_bytes", (uint64_t)misses * s->plan.frame_bytes);
    }
    if (d->hint) { /* (the attention worker computes them already; it wants no answer) */
        stats_add(s->st, "msg.hint", 1);
        return;
    }
    const bool quiet = d->quiet; /* answered only with an error */
    int res = s_resident(s, need, n);
    if (res == 0 && quiet) {
        stats_add(s->st, "msg.quiet", 1);
        return;
    }
    if (res == 0) return s_answer(s, in->id, in->id_len, d->seq, d->layer, d->experts, need, n, t0);
    if (res < 0) {
        stats_add(s->st, "bad.read", 1);
        return s_error(s, in, "read", d->seq, STP_EIO, s->read_err);
    }
    if (s->n_waiters == STORAGE_WAITERS)
        return s_error(s, in, "busy", d->seq, STP_EBUSY, "too many decisions waiting for reads");
    waiter *w = &s->waiters[s->n_waiters++];
    memcpy(w->id, in->id, in->id_len);
    w->id_len = in->id_len;
    w->seq = d->seq;
    w->layer = d->layer;
    w->n = n;
    memcpy(w->need, need, (size_t)n * sizeof *need);
    memcpy(w->experts, d->experts, (size_t)n * sizeof *d->experts);
    w->t0 = t0;
    w->decode = decode;
    w->quiet = quiet;
}

static void s_handle(storage *s, msg_in *in) {
    double t0 = msg_now_us();
    Stp__RouterMsg *m = stp__router_msg__unpack(NULL, in->len, in->data);
    if (!m) return s_error(s, in, "undecodable", 0, STP_EPROTO, "not a RouterMsg");
    if (m->version != STP_PROTO_VERSION) {
        char w[96];
        snprintf(w, sizeof w, "protocol version %u, expected %u", m->version, STP_PROTO_VERSION);
        s_error(s, in, "version", 0, STP_EPROTO, w);
    } else if (m->body_case == STP__ROUTER_MSG__BODY_PING) {
        Stp__Pong p;
        stp__pong__init(&p);
        p.nonce = m->ping->nonce;
        p.stage = STAGE;
        Stp__RouterMsg r;
        stp__router_msg__init(&r);
        r.body_case = STP__ROUTER_MSG__BODY_PONG;
        r.pong = &p;
        s_reply(s, in, &r);
    } else if (m->body_case != STP__ROUTER_MSG__BODY_DECISION) {
        s_error(s, in, "unexpected", 0, STP_EPROTO, "expected a RouterDecision or Ping");
    } else {
        char buf[160];
        const char *bad = s_check(s, m->decision, buf, sizeof buf);
        if (*bad)
            s_error(s, in, "decision", m->decision->seq, STP_EPROTO, bad);
        else
            s_decide(s, in, m->decision, t0);
    }
    stp__router_msg__free_unpacked(m, NULL);
}

int storage_run(storage *s, stp_err *err) {
    (void)err;
    stp_err e2 = {0};
    if (stage_ready(s->o.run_dir, "storage", &e2)) stage_log(STAGE, "%s", e2.msg);
    while (!stage_stopping()) {
        /* the socket and the reads' eventfd; without one, reads finish inside io_start */
        zmq_pollitem_t it[2] = {{s->sock, 0, ZMQ_POLLIN, 0}, {NULL, io_fd(s->io), ZMQ_POLLIN, 0}};
        int n_it = it[1].fd >= 0 && s->n_reading ? 2 : 1;
        long timeout = s->n_reading && n_it == 1 ? 0 : 250;
        if (zmq_poll(it, n_it, timeout) > 0 && (it[0].revents & ZMQ_POLLIN)) {
            for (int i = 0; i < 64; i++) {
                msg_in in;
                int rc = msg_recv(s->sock, true, &in, &e2);
                if (rc == 0) break;
                stats_add(s->st, "bytes.in", in.len);
                if (rc < 0) {
                    if (stats_bad(s->st, "frames")) stage_log(STAGE, "invalid message: %s", e2.msg);
                } else {
                    s_handle(s, &in);
                }
                msg_in_free(&in);
                if (s->n_reading && s_reap(s, false)) s_answer_waiters(s);
            }
        }
        if (s->n_reading && s_reap(s, false)) s_answer_waiters(s);
        if (s->n_waiters && !s->n_reading) s_answer_waiters(s); /* (failed before any read) */
        stats_publish(s->st, s->pub, 500, false);
    }
    stage_unready(s->o.run_dir, "storage");
    return 0;
}
