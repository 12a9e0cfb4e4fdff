/* storage: weight pool owner and residency server; see storage.h and README.md. */
#include "storage.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include <zmq.h>

#include "model/model.h"
#include "msg/msg.h"
#include "router.pb-c.h"
#include "shm/shm.h"
#include "stats/stats.h"

#define STAGE "storage-daemon"

struct storage {
    stage_opts o;
    model *m;
    shm_region pool;
    void *zctx, *sock, *pub;
    stats *st;
};

static int s_fill_pool(storage *s, stp_err *err) {
    const model_config *c = &s->m->cfg;
    const int NL = c->n_layer, X = c->n_expert;
    size_t total = pool_table_bytes(NL, X);
    for (int il = 0; il < NL; il++) {
        const layer_weights *L = &s->m->layers[il];
        size_t off[3], b;
        pool_slot_parts(L->gate_exps.mat_bytes, L->up_exps.mat_bytes, L->down_exps.mat_bytes, off,
                        &b);
        total += (size_t)X * ((b + POOL_ALIGN - 1) / POOL_ALIGN * POOL_ALIGN);
    }
    char name[160];
    int rc = stage_shm_name(name, sizeof name, s->o.run_dir, "pool", err);
    if (rc) return rc;
    rc = shm_region_create(&s->pool, name, total, err);
    if (rc) return rc;
    pool_header *h = (pool_header *)s->pool.base;
    h->magic = POOL_MAGIC;
    h->version = POOL_VERSION;
    h->n_layer = (uint32_t)NL;
    h->n_expert = (uint32_t)X;
    h->size = total;
    h->data_offset = pool_table_bytes(NL, X);
    uint64_t at = h->data_offset;
    double t0 = msg_now_us();
    for (int il = 0; il < NL && !stage_stopping(); il++) {
        const layer_weights *L = &s->m->layers[il];
        const tensor_view *tv[3] = {&L->gate_exps, &L->up_exps, &L->down_exps};
        size_t off[3], b;
        pool_slot_parts(tv[0]->mat_bytes, tv[1]->mat_bytes, tv[2]->mat_bytes, off, &b);
        for (int e = 0; e < X; e++) {
            pool_slot *sl = &h->slots[il * X + e];
            sl->state = POOL_LOADING;
            for (int k = 0; k < 3; k++)
                memcpy(s->pool.base + at + off[k], tv[k]->data + (size_t)e * tv[k]->mat_bytes,
                       tv[k]->mat_bytes);
            sl->offset = at;
            sl->bytes = b;
            sl->generation = 1;
            __atomic_store_n(&sl->state, POOL_READY, __ATOMIC_RELEASE);
            at += (b + POOL_ALIGN - 1) / POOL_ALIGN * POOL_ALIGN;
        }
        /* The GGUF pages of this layer's experts are not needed again in this process. */
        for (int k = 0; k < 3; k++) {
            uintptr_t p0 = (uintptr_t)tv[k]->data & ~(uintptr_t)4095;
            uintptr_t p1 = (uintptr_t)(tv[k]->data + (size_t)X * tv[k]->mat_bytes);
            madvise((void *)p0, p1 - p0, MADV_DONTNEED);
        }
    }
    stats_add(s->st, "pool.bytes", total);
    stats_add(s->st, "pool.experts_resident", (uint64_t)NL * X);
    if (s->o.verbose)
        stage_log(STAGE, "pool %s: %.1f MiB in %.2f s", name, total / 1048576.0,
                  (msg_now_us() - t0) * 1e-6);
    return 0;
}

int storage_new(storage **out, const stage_opts *o, stp_err *err) {
    *out = NULL;
    storage *s = calloc(1, sizeof *s);
    if (!s) return stp_err_set(err, STP_ENOMEM, "out of memory");
    s->o = *o;
    int rc = stats_new(&s->st, STAGE, err);
    if (!rc) rc = model_open(&s->m, o->model, err);
    if (!rc) rc = s_fill_pool(s, err);
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
    shm_region_close(&s->pool);
    model_close(&s->m);
    stats_destroy(&s->st);
    free(s);
    *self_p = NULL;
}

static void s_reply(storage *s, const msg_in *in, Stp__RouterMsg *r) {
    r->version = STP_PROTO_VERSION;
    if (msg_send(s->sock, in->id, in->id_len, &r->base, NULL)) stats_add(s->st, "send_errors", 1);
}

static void s_error(storage *s, const msg_in *in, const char *kind, uint64_t seq, int code,
                    const char *what) {
    if (stats_bad(s->st, kind)) stage_log(STAGE, "invalid message (%s): %s", kind, what);
    Stp__StpError e;
    stp__stp_error__init(&e);
    e.code = code;
    e.what = (char *)what;
    e.seq = seq;
    Stp__RouterMsg r;
    stp__router_msg__init(&r);
    r.body_case = STP__ROUTER_MSG__BODY_ERROR;
    r.error = &e;
    s_reply(s, in, &r);
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
        const Stp__RouterDecision *d = m->decision;
        char buf[160];
        const char *bad = s_check(s, d, buf, sizeof buf);
        if (*bad) {
            s_error(s, in, "decision", d->seq, STP_EPROTO, bad);
        } else {
            const pool_header *h = (const pool_header *)s->pool.base;
            Stp__ExpertLoc locs[STP_MAX_EXPERTS], *lp[STP_MAX_EXPERTS];
            protobuf_c_boolean ready[STP_MAX_EXPERTS];
            uint64_t hits = 0;
            for (size_t i = 0; i < d->n_experts; i++) {
                const pool_slot *sl = &h->slots[d->layer * h->n_expert + d->experts[i]];
                stp__expert_loc__init(&locs[i]);
                locs[i].expert = d->experts[i];
                locs[i].offset = sl->offset;
                locs[i].generation = sl->generation;
                ready[i] = __atomic_load_n(&sl->state, __ATOMIC_ACQUIRE) == POOL_READY;
                hits += ready[i];
                lp[i] = &locs[i];
            }
            Stp__Residency res;
            stp__residency__init(&res);
            res.seq = d->seq;
            res.layer = d->layer;
            res.n_experts = d->n_experts;
            res.experts = lp;
            res.n_ready = d->n_experts;
            res.ready = ready;
            Stp__RouterMsg r;
            stp__router_msg__init(&r);
            r.body_case = STP__ROUTER_MSG__BODY_RESIDENCY;
            r.residency = &res;
            s_reply(s, in, &r);
            stats_add(s->st, "msg.decision", 1);
            stats_add(s->st, "cache.hits", hits);
            stats_add(s->st, "cache.misses", d->n_experts - hits);
            stats_latency(s->st, "decision", msg_now_us() - t0);
        }
    }
    stp__router_msg__free_unpacked(m, NULL);
}

int storage_run(storage *s, stp_err *err) {
    (void)err;
    stp_err e2 = {0};
    if (stage_ready(s->o.run_dir, "storage", &e2)) stage_log(STAGE, "%s", e2.msg);
    while (!stage_stopping()) {
        bool rd[1];
        void *socks[1] = {s->sock};
        if (msg_poll(socks, 1, rd, 250) && rd[0]) {
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
            }
        }
        stats_publish(s->st, s->pub, 500, false);
    }
    stage_unready(s->o.run_dir, "storage");
    return 0;
}
