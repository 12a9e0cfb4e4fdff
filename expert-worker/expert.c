/* expert: the expert worker's message loop, work validation, pool and activation-region mappings;
 * the computation is common/model/expert_ffn.c. See expert.h and README.md. */
#include "expert.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <zmq.h>

#include "layer.pb-c.h"
#include "layout/layout.h"
#include "model/down_t.h"
#include "model/expert_ffn.h"
#include "model/model.h"
#include "model/ops.h"
#include "msg/lane.h"
#include "msg/msg.h"
#include "shm/shm.h"
#include "stats/stats.h"

#define STAGE "expert-worker"

struct expert_worker {
    stage_opts o;
    char name[32]; /* "expert-<i>" */
    model *m;
    threadpool *tp;
    compute_ctx cc;
    shm_region pool, act;
    const act_header *ah;
    lane_block *lanes; /* the mapped region's lanes: bell, work floor (NULL: not mapped) */
    lane_pair *lane;   /* this worker's rings there, once attached (NULL: zmq only) */
    uint8_t *lane_buf; /* (LANE_MSG_MAX) work copied out of the lane */
    void *zctx, *sock, *pub;
    stats *st;
    bool down_t;             /* the pool's down parts are down_t images (POOL_DOWN_T) */
    bool gate_x16;           /* the pool's gate parts are q4_0x16 images (POOL_GATE_X16) */
    int S;                   /* max slots = n_ubatch * n_used */
    int32_t *slot_t;         /* (S) token of each grouped slot */
    int32_t *slot_row;       /* (S) its row of y in the activation region: t * n_used + k */
    expert_ffn_group *group; /* (n_expert) the work's experts: their slots and pool images */
    expert_ffn *ffn;         /* the FFN's chunk scratch */
    /* newest work done for the peer last_id: from that peer, older work is a stale resend and
     * equal work a duplicate (another peer's numbers are not comparable) */
    uint64_t last_seq;
    uint8_t last_id[MSG_ID_MAX];
    size_t last_id_len;
    uint32_t last_slots;
};

static void s_free_scratch(expert_worker *w) {
    free(w->slot_t);
    free(w->slot_row);
    w->slot_t = w->slot_row = NULL;
}

static int s_map_pool(expert_worker *w, stp_err *err) {
    const model_config *c = &w->m->cfg;
    char name[160];
    int rc = stage_shm_name(name, sizeof name, w->o.run_dir, "pool", err);
    if (!rc) rc = shm_region_open(&w->pool, name, false, err);
    if (!rc) rc = pool_check(&w->pool, c->n_layer, c->n_expert, err);
    if (!rc) w->down_t = (((const pool_header *)w->pool.base)->flags & POOL_DOWN_T) != 0;
    if (!rc) w->gate_x16 = (((const pool_header *)w->pool.base)->flags & POOL_GATE_X16) != 0;
    if (!rc && w->gate_x16 && !(layout_wants_flags(w->m) & LAYOUT_GATE_X16))
        rc = stp_err_set(err, STP_EUNSUPPORTED, "pool holds q4_0x16 gates this model cannot use");
    if (!rc && w->down_t && !layout_wants_down_t(w->m))
        rc = stp_err_set(err, STP_EUNSUPPORTED,
                         "pool holds neuron-major down images this CPU "
                         "or model cannot use");
    return rc;
}

/* The weight pool again when the storage daemon was restarted and made a new one (work the
 * mapped pool cannot serve is the sign: the slot table it names is another pool's). True when
 * a different pool is mapped now. Costs nothing on the hot path: only failed checks come here. */
static bool s_remap_pool(expert_worker *w) {
    if (shm_region_current(&w->pool)) return false;
    shm_region keep = w->pool;
    stp_err err = {0};
    memset(&w->pool, 0, sizeof w->pool);
    if (s_map_pool(w, &err)) { /* (not ready yet: the work fails, the layer is retried) */
        shm_region_close(&w->pool);
        w->pool = keep;
        return false;
    }
    shm_region_close(&keep);
    stats_add(w->st, "pool.maps", 1);
    stage_log(w->name, "mapped the storage daemon's new weight pool");
    return true;
}

/* Maps the activation region (created by the attention worker, which starts after us) when work
 * names a region other than the mapped one (epoch), or, with epoch NULL, whenever the region
 * under the run's name is not the mapped one (the run loop's look every 250 ms); then takes
 * this worker's lane when the attention worker uses lanes. */
static int s_map_act(expert_worker *w, const uint64_t *epoch, stp_err *err) {
    if (w->ah && (epoch ? w->ah->epoch == *epoch : shm_region_current(&w->act))) return 0;
    const model_config *c = &w->m->cfg;
    shm_region fresh;
    char name[160];
    int rc = stage_shm_name(name, sizeof name, w->o.run_dir, "act", err);
    if (rc) return rc;
    if ((rc = shm_region_open(&fresh, name, true, err))) return rc;
    rc = act_check(&fresh, c->n_embd, c->n_expert_used, c->n_vocab, err);
    if (!rc && epoch && ((const act_header *)fresh.base)->epoch != *epoch)
        rc = stp_err_set(err, STP_EPROTO, "activation region epoch %llu, work names %llu",
                         (unsigned long long)((const act_header *)fresh.base)->epoch,
                         (unsigned long long)*epoch);
    if (rc) { /* keep the current mapping: the work was wrong, not the region */
        shm_region_close(&fresh);
        return rc;
    }
    threadpool_set_handoff(w->tp, NULL, NULL, 0); /* its words are in the old region */
    shm_region_close(&w->act);
    s_free_scratch(w);
    w->act = fresh;
    w->ah = (const act_header *)w->act.base;
    w->lane = NULL;
    w->lanes = NULL;
    w->S = (int)w->ah->n_ubatch * c->n_expert_used;
    w->slot_t = malloc((size_t)w->S * sizeof(int32_t));
    w->slot_row = malloc((size_t)w->S * sizeof(int32_t));
    if (!w->slot_t || !w->slot_row) {
        shm_region_close(&w->act);
        w->ah = NULL;
        s_free_scratch(w);
        return stp_err_set(err, STP_ENOMEM, "expert scratch: out of memory");
    }
    stats_add(w->st, "act.maps", 1);
    w->lanes = (lane_block *)(w->act.base + w->ah->off_lanes);
    if (w->o.index < LANE_MAX && atomic_load(&w->lanes->active)) {
        /* attach: from now on the attention worker uses the lane */
        w->lane = &w->lanes->lanes[w->o.index];
        atomic_store_explicit(&w->lane->pid, (int32_t)getpid(), memory_order_release);
        /* the attention worker's threads and this team's take turns on the cores */
        threadpool_set_handoff(w->tp, &w->lanes->expert_cores, &w->lanes->attn_cores,
                               STAGE_HANDOFF_NS);
    }
    return 0;
}

int expert_worker_new(expert_worker **out, const stage_opts *o, stp_err *err) {
    *out = NULL;
    expert_worker *w = calloc(1, sizeof *w);
    if (!w) return stp_err_set(err, STP_ENOMEM, "out of memory");
    w->o = *o;
    snprintf(w->name, sizeof w->name, "expert-%d", o->index);
    int rc = stats_new(&w->st, w->name, err);
    if (!rc) rc = model_open(&w->m, o->model, err);
    if (!rc) rc = threadpool_new(&w->tp, o->threads, err);
    if (!rc) rc = stage_pin_threads(o, w->tp, o->index * o->threads, err);
    if (!rc) threadpool_set_spin_ns(w->tp, STAGE_SPIN_NS); /* cores go to other stages between */
    if (!rc) rc = s_map_pool(w, err);
    if (!rc) rc = expert_ffn_new(&w->ffn, &w->m->cfg, err);
    if (!rc && !(w->group = malloc(sizeof(expert_ffn_group) * (size_t)w->m->cfg.n_expert)))
        rc = stp_err_set(err, STP_ENOMEM, "out of memory");
    if (!rc && !(w->lane_buf = malloc(LANE_MSG_MAX)))
        rc = stp_err_set(err, STP_ENOMEM, "out of memory");
    if (rc) goto fail;
    w->cc.ops = kern_ops_get();
    w->cc.tp = w->tp;
    w->zctx = zmq_ctx_new();
    stage_zmq_affinity(w->zctx); /* its threads not on this thread's one core */
    char ep[512], sn[48];
    if ((rc = msg_endpoint(ep, sizeof ep, o->run_dir, w->name, err))) goto fail;
    rc = STP_EIO;
    if (!(w->sock = msg_socket(w->zctx, ZMQ_ROUTER, ep, true, err))) goto fail;
    snprintf(sn, sizeof sn, "stats-%s", w->name);
    if ((rc = msg_endpoint(ep, sizeof ep, o->run_dir, sn, err))) goto fail;
    rc = STP_EIO;
    if (!(w->pub = msg_socket(w->zctx, ZMQ_PUB, ep, true, err))) goto fail;
    *out = w;
    return 0;
fail:
    expert_worker_destroy(&w);
    return rc;
}

void expert_worker_destroy(expert_worker **self_p) {
    expert_worker *w = *self_p;
    if (!w) return;
    msg_close(&w->sock);
    msg_close(&w->pub);
    if (w->zctx) zmq_ctx_term(w->zctx);
    if (w->lane) /* detach, unless a successor took the lane already */
        atomic_compare_exchange_strong(&w->lane->pid, &(int32_t){(int32_t)getpid()}, 0);
    free(w->lane_buf);
    shm_region_close(&w->pool);
    threadpool_set_handoff(w->tp, NULL, NULL, 0); /* its words are in the region */
    shm_region_close(&w->act);
    threadpool_destroy(&w->tp);
    model_close(&w->m);
    stats_destroy(&w->st);
    s_free_scratch(w);
    expert_ffn_destroy(&w->ffn);
    free(w->group);
    free(w);
    *self_p = NULL;
}

/* Computes the slots of the listed experts; returns slots done. Inputs validated by caller.
 * Slots are grouped by expert (list order, tokens in order), each expert's matrices are its
 * pool slot's images, and the FFN is moe_forward's (expert_ffn_run), outputs straight into the
 * activation region's y rows. */
static int s_compute(expert_worker *w, int il, int T, const Stp__ExpertWork *wk,
                     expert_ffn_stats *st_out) {
    const model_config *c = &w->m->cfg;
    const layer_weights *L = &w->m->layers[il];
    const int K = c->n_expert_used;
    const int32_t *sel = (const int32_t *)(w->act.base + w->ah->off_sel);
    size_t off[3], sb;
    pool_slot_parts(L->gate_exps.mat_bytes, L->up_exps.mat_bytes,
                    w->down_t ? down_t_expert_bytes(L->down_exps.type, c->n_embd, c->n_ff_exp)
                              : L->down_exps.mat_bytes,
                    off, &sb);
    int S = 0;
    for (int j = 0; j < (int)wk->n_experts; j++) {
        const int32_t e = (int32_t)wk->experts[j]->expert;
        const uint8_t *base = w->pool.base + wk->experts[j]->offset;
        expert_ffn_group *g = &w->group[j];
        *g = (expert_ffn_group){.w = {.gate = base + off[0],
                                      .gate_x16 = w->gate_x16 ? base + off[0] : NULL,
                                      .up = base + off[1],
                                      .down = w->down_t ? NULL : base + off[2],
                                      .down_t = w->down_t ? base + off[2] : NULL},
                                .s0 = S};
        for (int i = 0; i < T * K; i++)
            if (sel[i] == e) {
                w->slot_t[S] = i / K;
                w->slot_row[S++] = i;
            }
        g->n = S - g->s0;
    }
    uint8_t *act = w->act.base;
    *st_out = (expert_ffn_stats){0, 0};
    expert_ffn_run(w->ffn, &w->cc, L, w->group, (int)wk->n_experts,
                   (const float *)(act + w->ah->off_h), w->slot_t, (float *)(act + w->ah->off_y),
                   w->slot_row, st_out);
    return S;
}

/* Answers work the way it came: lane work (lane != NULL) into the lane's done ring (ringing the
 * attention worker's bell), zmq work to its peer. */
static void s_reply(expert_worker *w, const msg_in *in, lane_pair *lane, Stp__LayerMsg *r) {
    r->version = STP_PROTO_VERSION;
    if (lane ? lane_reply(w->lanes, &lane->done, &r->base) != 0
             : msg_send(w->sock, in->id, in->id_len, &r->base, NULL) != 0)
        stats_add(w->st, "send_errors", 1);
}

static void s_error(expert_worker *w, const msg_in *in, lane_pair *lane, const char *kind,
                    uint64_t seq, int code, const char *what) {
    if (stats_bad(w->st, kind)) stage_log(w->name, "invalid message (%s): %s", kind, what);
    Stp__StpError e;
    stp__stp_error__init(&e);
    e.code = code;
    e.what = (char *)what;
    e.seq = seq;
    Stp__LayerMsg r;
    stp__layer_msg__init(&r);
    r.body_case = STP__LAYER_MSG__BODY_ERROR;
    r.error = &e;
    s_reply(w, in, lane, &r);
}

/* Validates work against the model, the pool table and the selection in the activation
 * region; "" when fine. */
static const char *s_check(const expert_worker *w, const Stp__ExpertWork *wk, char *buf,
                           size_t cap) {
    const model_config *c = &w->m->cfg;
    const int X = c->n_expert;
    if (wk->layer >= (uint32_t)c->n_layer) {
        snprintf(buf, cap, "layer %u outside 0..%d", wk->layer, c->n_layer - 1);
        return buf;
    }
    if (wk->n_tokens == 0 || wk->n_tokens > 65536) {
        snprintf(buf, cap, "%u tokens", wk->n_tokens);
        return buf;
    }
    if (wk->n_experts == 0 || wk->n_experts > (size_t)X) {
        snprintf(buf, cap, "%zu experts (1..%d allowed)", wk->n_experts, X);
        return buf;
    }
    const pool_header *ph = (const pool_header *)w->pool.base;
    const layer_weights *L = &w->m->layers[wk->layer];
    size_t off[3], sb;
    pool_slot_parts(L->gate_exps.mat_bytes, L->up_exps.mat_bytes,
                    w->down_t ? down_t_expert_bytes(L->down_exps.type, c->n_embd, c->n_ff_exp)
                              : L->down_exps.mat_bytes,
                    off, &sb);
    for (size_t j = 0; j < wk->n_experts; j++) {
        const Stp__ExpertLoc *e = wk->experts[j];
        if (e->expert >= (uint32_t)X || (j && e->expert <= wk->experts[j - 1]->expert)) {
            snprintf(buf, cap, "expert list not ascending in 0..%d", X - 1);
            return buf;
        }
        const pool_slot *sl = &ph->slots[wk->layer * (uint32_t)X + e->expert];
        if (__atomic_load_n(&sl->state, __ATOMIC_ACQUIRE) != POOL_READY ||
            sl->generation != e->generation || sl->offset != e->offset || sl->bytes != sb ||
            e->offset > w->pool.size || sb > w->pool.size - e->offset) {
            snprintf(buf, cap, "expert %u of layer %u is not resident at offset %llu gen %llu",
                     e->expert, wk->layer, (unsigned long long)e->offset,
                     (unsigned long long)e->generation);
            return buf;
        }
    }
    return "";
}

/* The selection the attention worker left in the activation region. */
static const char *s_check_sel(const expert_worker *w, const Stp__ExpertWork *wk, char *buf,
                               size_t cap) {
    const int K = w->m->cfg.n_expert_used, X = w->m->cfg.n_expert;
    if (wk->n_tokens > w->ah->n_ubatch) {
        snprintf(buf, cap, "%u tokens (1..%u allowed)", wk->n_tokens, w->ah->n_ubatch);
        return buf;
    }
    const int32_t *sel = (const int32_t *)(w->act.base + w->ah->off_sel);
    for (uint32_t i = 0; i < wk->n_tokens * (uint32_t)K; i++)
        if (sel[i] < 0 || sel[i] >= X) {
            snprintf(buf, cap, "selection %d at slot %u outside 0..%d", sel[i], i, X - 1);
            return buf;
        }
    return "";
}

/* One LayerMsg from a zmq peer, or from the lane (lane != NULL, in->id_len == 0). */
static void s_handle(expert_worker *w, msg_in *in, lane_pair *lane) {
    double t0 = msg_now_us();
    Stp__LayerMsg *m = stp__layer_msg__unpack(NULL, in->len, in->data);
    if (!m) return s_error(w, in, lane, "undecodable", 0, STP_EPROTO, "not a LayerMsg");
    if (m->version != STP_PROTO_VERSION) {
        char b[96];
        snprintf(b, sizeof b, "protocol version %u, expected %u", m->version, STP_PROTO_VERSION);
        s_error(w, in, lane, "version", 0, STP_EPROTO, b);
    } else if (m->body_case == STP__LAYER_MSG__BODY_PING) {
        Stp__Pong p;
        stp__pong__init(&p);
        p.nonce = m->ping->nonce;
        p.stage = w->name;
        Stp__LayerMsg r;
        stp__layer_msg__init(&r);
        r.body_case = STP__LAYER_MSG__BODY_PONG;
        r.pong = &p;
        s_reply(w, in, lane, &r);
    } else if (m->body_case != STP__LAYER_MSG__BODY_WORK) {
        s_error(w, in, lane, "unexpected", 0, STP_EPROTO, "expected ExpertWork or Ping");
    } else {
        const Stp__ExpertWork *wk = m->work;
        char buf[200];
        stp_err me = {0};
        const char *bad = "";
        bool same_peer = in->id_len == w->last_id_len && !memcmp(in->id, w->last_id, in->id_len);
        if (same_peer && wk->seq < w->last_seq) {
            /* a resend that arrived late: the selection in shm belongs to newer work now */
            stats_add(w->st, "work.stale", 1);
            goto out;
        }
        bool dup = same_peer && wk->seq == w->last_seq;
        stats_handover(w->st, "handover.in", wk->sent_us);
        if (dup) { /* a resend of finished work: answer again */
            stats_add(w->st, "work.duplicate", 1);
        } else if (*(bad = s_check(w, wk, buf, sizeof buf)) && !s_remap_pool(w)) {
        } else if (*bad && *(bad = s_check(w, wk, buf, sizeof buf))) {
        } else if (s_map_act(w, &wk->act_epoch, &me)) {
            bad = me.msg;
        } else if (wk->seq < atomic_load_explicit(&w->lanes->floor, memory_order_acquire)) {
            /* work of a layer the attention worker has left (queued while this worker was
             * down): computing it now would overwrite the current layer's y rows */
            stats_add(w->st, "work.stale", 1);
            goto out;
        } else {
            bad = s_check_sel(w, wk, buf, sizeof buf);
        }
        if (*bad) {
            s_error(w, in, lane, "work", wk->seq, STP_EPROTO, bad);
        } else {
            expert_ffn_stats st = {0, 0}; /* a duplicate's neurons were counted the first time */
            int S = (int)w->last_slots;
            if (!dup) S = s_compute(w, (int)wk->layer, (int)wk->n_tokens, wk, &st);
            w->last_seq = wk->seq;
            memcpy(w->last_id, in->id, in->id_len);
            w->last_id_len = in->id_len;
            w->last_slots = (uint32_t)S;
            double us = msg_now_us() - t0;
            Stp__ExpertDone d;
            stp__expert_done__init(&d);
            d.seq = wk->seq;
            d.layer = wk->layer;
            d.n_slots = (uint32_t)S;
            d.active_neurons = st.active;
            d.total_neurons = (uint64_t)S * (uint64_t)w->m->cfg.n_ff_exp;
            d.down_neurons = st.down;
            d.compute_us = us;
            d.sent_us = msg_now_us();
            Stp__LayerMsg r;
            stp__layer_msg__init(&r);
            r.body_case = STP__LAYER_MSG__BODY_DONE;
            r.done = &d;
            threadpool_park(w->tp); /* the cores go back to the attention worker */
            s_reply(w, in, lane, &r);
            stats_add(w->st, "msg.work", 1);
            stats_add(w->st, "slots", (uint64_t)S);
            stats_add(w->st, "neurons.active", st.active);
            stats_add(w->st, "neurons.total", d.total_neurons);
            stats_add(w->st, "bytes.act_out", (uint64_t)S * w->m->cfg.n_embd * 4);
            stats_latency(w->st, wk->n_tokens == 1 ? "work.decode" : "work.batch", us);
        }
    }
out:
    stp__layer_msg__free_unpacked(m, NULL);
}

/* Handles the work waiting in this worker's lane; whether there was any. */
static bool s_serve_lane(expert_worker *w) {
    bool any = false;
    msg_in in = {.id_len = 0, .data = w->lane_buf};
    while (w->lane && lane_take(&w->lane->work, w->lane_buf, &in.len)) {
        stats_add(w->st, "bytes.in", in.len);
        stats_add(w->st, "lane.work", 1);
        s_handle(w, &in, w->lane);
        any = true;
    }
    return any;
}

/* Serves the zmq socket: waits up to timeout_ms, then handles what is there; whether there was
 * anything. */
static bool s_serve_sock(expert_worker *w, long timeout_ms) {
    bool rd[1];
    void *socks[1] = {w->sock};
    double tw = msg_now_us();
    if (!msg_poll(socks, 1, rd, timeout_ms) || !rd[0]) return false;
    if (timeout_ms) stats_latency(w->st, "idle_wait", msg_now_us() - tw);
    stp_err e2 = {0};
    for (int i = 0; i < 64; i++) {
        msg_in in;
        int rc = msg_recv(w->sock, true, &in, &e2);
        if (rc == 0) break;
        stats_add(w->st, "bytes.in", in.len);
        if (rc < 0) {
            if (stats_bad(w->st, "frames")) stage_log(w->name, "invalid message: %s", e2.msg);
        } else {
            s_handle(w, &in, NULL);
        }
        msg_in_free(&in);
    }
    return true;
}

/* The loop: work from the lane once attached to the attention worker's region (a futex wait
 * between layers), from the zmq socket before that and for pings and fallbacks. Every 250 ms the
 * region is looked for (it appears after us, and a restarted attention worker makes a new one). */
int expert_worker_run(expert_worker *w, stp_err *err) {
    (void)err;
    stp_err e2 = {0};
    if (stage_ready(w->o.run_dir, w->name, &e2)) stage_log(w->name, "%s", e2.msg);
    double looked = 0;
    while (!stage_stopping()) {
        double now = msg_now_us();
        if (now - looked > 250e3) {
            looked = now;
            s_map_act(w, NULL, &e2); /* absent or not yet valid: zmq work maps it later */
        }
        if (!w->lane) {
            s_serve_sock(w, 250);
        } else {
            uint32_t seen = atomic_load_explicit(&w->lane->work.head, memory_order_acquire);
            bool any = s_serve_lane(w);
            any |= s_serve_sock(w, 0);
            if (!any) {
                double tw = msg_now_us();
                lane_wait(&w->lane->work.head, seen, 50);
                double waited = msg_now_us() - tw;
                if (atomic_load_explicit(&w->lane->work.head, memory_order_acquire) != seen)
                    stats_latency(w->st, "idle_wait", waited);
                else if (waited < 45e3) /* a knock: zmq work is on its way to the socket */
                    s_serve_sock(w, 5);
            }
        }
        stats_publish(w->st, w->pub, 500, false);
    }
    stage_unready(w->o.run_dir, w->name);
    return 0;
}
