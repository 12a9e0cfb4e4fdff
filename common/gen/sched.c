/* sched: continuous batching with chunked prefill and prefix reuse over a backend; see sched.h.
 *
 * A request moves WAIT -> PREFILL -> DECODE -> finished. Its slot keeps the ids the slot's
 * caches hold (ids[0..n) at positions 0..n-1): the prompt as it is evaluated, then each sampled
 * id once it has been evaluated (the last one sampled never is). That list is what prefix
 * reuse compares a new prompt with. */
#include "gen/sched.h"

#include <stdlib.h>
#include <string.h>

#include "gen/token_step.h"
#include "model/forward.h"

typedef enum r_state { R_WAIT, R_PREFILL, R_DECODE } r_state;

typedef struct s_req {
    sched_req r;
    int32_t *prompt; /* copy of r.prompt */
    r_state st;
    int slot;
    int pos;       /* prompt tokens in the slot's caches */
    int part_n;    /* a chunk of part_n tokens from pos is part way through the layers (0: none) */
    int part_done; /* its layers done */
    int32_t next;  /* DECODE: the sampled id to evaluate */
    token_step *step;
    gen_result res;
    size_t ids_cap;
    float *logits; /* n_vocab */
    bool refused;  /* emit asked to stop */
    double t_submit, t_admit, t_gen0;
    struct s_req *next_wait;
} s_req;

typedef struct s_slot {
    int32_t *ids; /* n_ctx */
    int n;
    unsigned long long used; /* step of the last use (least recently used goes first) */
    s_req *req;              /* the request holding it, or NULL */
} s_slot;

struct sched {
    backend *b;
    int V, n_ctx, n_slots, chunk, n_batch;
    int n_layer, span; /* a chunk beside decoding requests runs span layers a step (0: all) */
    long long kv_max;  /* the KV pool: positions all slots may hold */
    s_slot *slots;
    s_req *wait_head, *wait_tail;
    int n_waiting;
    s_req **run; /* (n_slots) requests holding a slot, in admission order */
    int n_run;
    backend_seq_eval *q; /* (n_slots) one step's entries */
    s_req **q_req;
    sched_stats stats;
};

int sched_new(sched **out, backend *b, const sched_params *p, stp_err *err) {
    *out = NULL;
    sched *s = calloc(1, sizeof *s);
    if (!s) return stp_err_set(err, STP_ENOMEM, "out of memory");
    s->b = b;
    s->V = backend_n_vocab(b);
    s->n_ctx = backend_n_ctx(b);
    s->n_slots = backend_n_seq(b);
    s->n_batch = p && p->n_batch > 0 ? p->n_batch : backend_n_batch(b);
    if (s->n_batch > backend_n_batch(b)) s->n_batch = backend_n_batch(b);
    s->chunk = p && p->prefill_chunk > 0 ? p->prefill_chunk : 64;
    s->kv_max = (long long)s->n_slots * s->n_ctx;
    if (p && p->kv_positions > 0 && p->kv_positions < s->kv_max) s->kv_max = p->kv_positions;
    if (s->chunk > s->n_batch) s->chunk = s->n_batch;
    s->n_layer = backend_n_layer(b);
    const int pl = p ? p->prefill_layers : 0;
    if (s->n_layer > 0 && pl >= 0)
        s->span = pl > 0 ? pl : (s->n_layer + SCHED_PREFILL_SLICES - 1) / SCHED_PREFILL_SLICES;
    if (s->span >= s->n_layer) s->span = 0;
    s->slots = calloc((size_t)s->n_slots, sizeof *s->slots);
    s->run = calloc((size_t)s->n_slots, sizeof *s->run);
    s->q = calloc((size_t)s->n_slots, sizeof *s->q);
    s->q_req = calloc((size_t)s->n_slots, sizeof *s->q_req);
    int rc = 0;
    if (!s->slots || !s->run || !s->q || !s->q_req) rc = STP_ENOMEM;
    for (int i = 0; !rc && i < s->n_slots; i++) {
        if (!(s->slots[i].ids = malloc(sizeof(int32_t) * (size_t)s->n_ctx))) rc = STP_ENOMEM;
        backend_seq_keep(b, i, 0); /* what the slot holds is unknown: start empty */
    }
    if (rc) {
        sched_destroy(&s);
        return stp_err_set(err, STP_ENOMEM, "out of memory");
    }
    *out = s;
    return 0;
}

static void s_req_free(s_req *rq) {
    token_step_destroy(&rq->step);
    gen_result_fini(&rq->res);
    free(rq->prompt);
    free(rq->logits);
    free(rq);
}

/* Ends rq: flushes its text, calls done, frees it and releases its slot (which keeps its ids). */
static void s_finish(sched *s, s_req *rq, gen_finish finish, int rc, const stp_err *err) {
    gen_result *res = &rq->res;
    if (rq->step) {
        token_step_out o;
        if (!token_step_end(rq->step, &o) && rq->r.emit && !rq->refused && o.len)
            rq->r.emit(rq->r.ud, o.text, o.len);
        size_t len = 0;
        const char *text = token_step_text(rq->step, &len);
        if ((res->text = malloc(len + 1))) {
            memcpy(res->text, text, len + 1);
            res->len = len;
        }
    }
    if (!rc) res->finish = finish;
    if (rq->t_gen0 > 0) res->t_gen = gen_now() - rq->t_gen0;
    if (rq->st != R_WAIT) {
        s->slots[rq->slot].req = NULL;
        int j = 0;
        for (int i = 0; i < s->n_run; i++)
            if (s->run[i] != rq) s->run[j++] = s->run[i];
        s->n_run = j;
    }
    gen_result out = *res;
    memset(res, 0, sizeof *res);
    rq->r.done(rq->r.ud, &out, rc, err);
    s_req_free(rq);
}

void sched_destroy(sched **self_p) {
    sched *s = *self_p;
    if (!s) return;
    while (s->n_run > 0)
        s_finish(s, s->run[0], GEN_FINISH_CANCEL, 0, NULL);
    while (s->wait_head) {
        s_req *rq = s->wait_head;
        s->wait_head = rq->next_wait;
        s_finish(s, rq, GEN_FINISH_CANCEL, 0, NULL);
    }
    for (int i = 0; s->slots && i < s->n_slots; i++)
        free(s->slots[i].ids);
    free(s->slots);
    free(s->run);
    free(s->q);
    free(s->q_req);
    free(s);
    *self_p = NULL;
}

int sched_submit(sched *s, const sched_req *r, stp_err *err) {
    if (!r->done || !r->prompt || r->n_prompt < 1)
        return stp_err_set(err, STP_EINVAL, "the prompt is empty (no tokens)");
    s_req *rq = calloc(1, sizeof *rq);
    if (rq) rq->prompt = malloc(sizeof(int32_t) * (size_t)r->n_prompt);
    if (rq) rq->logits = malloc(sizeof(float) * (size_t)s->V);
    if (!rq || !rq->prompt || !rq->logits) {
        if (rq) s_req_free(rq);
        return stp_err_set(err, STP_ENOMEM, "out of memory");
    }
    rq->r = *r;
    memcpy(rq->prompt, r->prompt, sizeof(int32_t) * (size_t)r->n_prompt);
    rq->r.prompt = rq->prompt;
    rq->t_submit = gen_now();
    if (s->wait_tail)
        s->wait_tail->next_wait = rq;
    else
        s->wait_head = rq;
    s->wait_tail = rq;
    s->n_waiting++;
    s->stats.requests++;
    return 0;
}

bool sched_busy(const sched *s) {
    return s->n_run > 0 || s->wait_head;
}
int sched_n_running(const sched *s) {
    return s->n_run;
}
int sched_n_waiting(const sched *s) {
    return s->n_waiting;
}
const sched_stats *sched_get_stats(const sched *s) {
    return &s->stats;
}

static bool s_cancelled(const s_req *rq) {
    return rq->r.cancel && *rq->r.cancel;
}

/* Positions the slots hold, plus the prompt positions admitted requests are still to read. */
static long long s_kv_used(const sched *s) {
    long long u = 0;
    for (int i = 0; i < s->n_slots; i++)
        u += s->slots[i].n;
    for (int i = 0; i < s->n_run; i++)
        if (s->run[i]->st == R_PREFILL) u += s->run[i]->r.n_prompt - s->run[i]->pos;
    return u;
}

/* Empties idle slots (least recently used first, never `keep`) until `need` more positions fit
 * in the pool. True when they do. */
static bool s_kv_make_room(sched *s, long long need, int keep) {
    long long used = s_kv_used(s);
    while (used + need > s->kv_max) {
        int lru = -1;
        for (int i = 0; i < s->n_slots; i++) {
            const s_slot *sl = &s->slots[i];
            if (i == keep || sl->req || !sl->n) continue;
            if (lru < 0 || sl->used < s->slots[lru].used) lru = i;
        }
        if (lru < 0) return false;
        used -= s->slots[lru].n;
        s->slots[lru].n = backend_seq_keep(s->b, lru, 0);
        s->stats.slots_evicted++;
    }
    return true;
}

/* The free slot for prompt p: longest common prefix with what it holds, then least recently
 * used. *lcp: that prefix's length. */
static int s_pick_slot(const sched *s, const int32_t *p, int n, int *lcp) {
    int best = -1, best_l = -1;
    for (int i = 0; i < s->n_slots; i++) {
        const s_slot *sl = &s->slots[i];
        if (sl->req) continue;
        int l = 0;
        while (l < sl->n && l < n && sl->ids[l] == p[l])
            l++;
        if (l > best_l || (l == best_l && sl->used < s->slots[best].used)) best = i, best_l = l;
    }
    *lcp = best_l;
    return best;
}

/* Waiting requests take free slots, in arrival order. */
static void s_admit(sched *s) {
    while (s->wait_head) {
        s_req *rq = s->wait_head;
        const int n = rq->r.n_prompt;
        const bool cancelled = s_cancelled(rq), too_long = n > s->n_ctx || n > s->kv_max;
        if (!cancelled && s->n_run == s->n_slots) break;
        int lcp = 0, slot = -1;
        if (!cancelled && !too_long) {
            slot = s_pick_slot(s, rq->prompt, n, &lcp);
            /* its prompt must fit in the pool beside what runs (idle slots make room): the
             * slot goes from what it holds to the prompt (kept part and reservation) */
            if (!s_kv_make_room(s, n - s->slots[slot].n, slot)) break; /* running ones free it */
        }
        s->wait_head = rq->next_wait;
        if (!s->wait_head) s->wait_tail = NULL;
        s->n_waiting--;
        rq->next_wait = NULL;
        if (cancelled) {
            s_finish(s, rq, GEN_FINISH_CANCEL, 0, NULL);
            continue;
        }
        stp_err err = {0};
        if (too_long) {
            stp_err_set(&err, STP_ERANGE, "the prompt needs %d tokens but the context has %d", n,
                        n > s->n_ctx ? s->n_ctx : (int)s->kv_max);
            s_finish(s, rq, GEN_FINISH_LENGTH, STP_ERANGE, &err);
            continue;
        }
        /* a full context ends the answer as max_tokens does: the last id sampled is not
         * evaluated, so the context holds room + 1 of them */
        long long room = s->n_ctx - n + 1;
        const gen_params *gp = &rq->r.gp;
        token_step_params tp = {
            .sp = gp->sp,
            .n_vocab = s->V,
            .max_tokens = gp->max_tokens > 0 && gp->max_tokens < room ? gp->max_tokens : room,
            .stop = gp->stop,
            .n_stop = gp->n_stop,
            .ignore_eos = gp->ignore_eos,
            .tok = s->b->tok};
        int rc = token_step_new(&rq->step, &tp, &err);
        if (rc) {
            s_finish(s, rq, GEN_FINISH_LENGTH, rc, &err);
            continue;
        }
        s_slot *sl = &s->slots[slot];
        int keep = backend_seq_keep(s->b, slot, lcp < n - 1 ? lcp : n - 1);
        sl->n = keep;
        sl->req = rq;
        rq->slot = slot;
        rq->pos = keep;
        rq->res.n_cached = keep;
        rq->st = R_PREFILL;
        rq->t_admit = gen_now();
        s->stats.tokens_reused += (unsigned long long)keep;
        s->run[s->n_run++] = rq;
    }
}

/* Appends id to rq's answer ids. */
static int s_push_id(s_req *rq, int32_t id) {
    gen_result *res = &rq->res;
    if ((size_t)res->n_gen == rq->ids_cap) {
        size_t nc = rq->ids_cap ? rq->ids_cap * 2 : 64;
        int32_t *ni = realloc(res->ids, nc * sizeof *ni);
        if (!ni) return STP_ENOMEM;
        res->ids = ni;
        rq->ids_cap = nc;
    }
    res->ids[res->n_gen++] = id;
    return 0;
}

/* rq's logits are fresh: sample, stream, and finish or go on decoding. */
static void s_sample(sched *s, s_req *rq) {
    if (s_cancelled(rq)) {
        s_finish(s, rq, GEN_FINISH_CANCEL, 0, NULL);
        return;
    }
    token_step_out o;
    stp_err err = {0};
    if (token_step_next(rq->step, rq->logits, &o) || (o.id >= 0 && s_push_id(rq, o.id))) {
        stp_err_set(&err, STP_ENOMEM, "out of memory");
        s_finish(s, rq, GEN_FINISH_LENGTH, STP_ENOMEM, &err);
        return;
    }
    gen_result *res = &rq->res;
    if (res->n_gen == 1 && o.id >= 0) {
        res->t_first = gen_now() - rq->t_submit;
        rq->t_gen0 = gen_now();
    }
    gen_finish fin = o.finish == TOKEN_FINISH_LENGTH ? GEN_FINISH_LENGTH : GEN_FINISH_STOP;
    if (o.len && rq->r.emit && rq->r.emit(rq->r.ud, o.text, o.len)) {
        rq->refused = true;
        s_finish(s, rq, o.finish ? fin : GEN_FINISH_CANCEL, 0, NULL);
        return;
    }
    if (o.finish) {
        s_finish(s, rq, fin, 0, NULL);
        return;
    }
    rq->next = o.id;
    rq->st = R_DECODE;
}

int sched_step(sched *s) {
    for (int i = 0; i < s->n_run;) /* cancelled while reading its prompt or decoding */
        if (s_cancelled(s->run[i]))
            s_finish(s, s->run[i], GEN_FINISH_CANCEL, 0, NULL);
        else
            i++;
    s_admit(s);
    if (!s->n_run) return 0;
    /* the next token of every decoding request, then whole prompt chunks (chunks end at
     * multiples of `chunk` and at the prompt's end), in admission order, while they fit; with
     * requests decoding (and no burst, below), at most one chunk per step so their tokens keep
     * flowing */
    int n_dec = 0, n_reading = 0; /* answering; reading their prompts (unread ids left) */
    long long unread = 0;
    for (int i = 0; i < s->n_run; i++) {
        n_dec += s->run[i]->st == R_DECODE;
        if (s->run[i]->st == R_PREFILL)
            n_reading++, unread += s->run[i]->r.n_prompt - s->run[i]->pos;
    }
    while (n_dec > 0 && !s_kv_make_room(s, n_dec, -1)) {
        /* the pool is full: the most recently admitted answering request ends */
        for (int i = s->n_run - 1; i >= 0; i--)
            if (s->run[i]->st == R_DECODE) {
                s->stats.pool_full++;
                s_finish(s, s->run[i], GEN_FINISH_LENGTH, 0, NULL);
                break;
            }
        n_dec--;
    }
    if (!s->n_run) return 0;
    int n_q = 0, budget = s->n_batch, n_decoding = 0;
    for (int i = 0; i < s->n_run; i++) {
        s_req *rq = s->run[i];
        if (rq->st != R_DECODE || budget < 1) continue;
        s->q[n_q] = (backend_seq_eval){rq->slot, &rq->next, 1, rq->logits, 0, 0};
        s->q_req[n_q++] = rq;
        budget--;
        n_decoding++;
    }
    /* A burst (two or more requests reading their prompts, at least as many as answering, as
     * when several arrive together) that one step can read is read as if nobody answered: whole
     * chunks of every prompt in one step, so they share each weight read (on a memory budget,
     * each expert read from disk) instead of going one prompt a slice a step after another (the
     * k-th waiting k prompts' slices); the answering requests wait that one step out. Otherwise
     * (a single prompt beside answers, longer prompts too), one chunk a step, in slices of
     * layers. (The pool-full ending above ends answering requests only, so the reading counts
     * still hold.) */
    const bool burst = n_reading >= 2 && n_reading >= n_decoding && unread <= budget;
    const bool sliced = n_decoding > 0 && !burst;
    int prefill_max = sliced ? s->chunk : budget;
    for (int i = 0; i < s->n_run && prefill_max > 0; i++) {
        s_req *rq = s->run[i];
        if (rq->st != R_PREFILL) continue;
        const int n = rq->r.n_prompt;
        int take = 0, upto = 0;
        if (rq->part_n) { /* a chunk part way through: its next layers (the rest if no one
                           * decodes), alone, as the step's last entry */
            if (rq->part_n > budget) break;
            take = rq->part_n;
            upto = sliced && rq->part_done + s->span < s->n_layer ? rq->part_done + s->span
                                                                  : s->n_layer;
        } else {
            for (;;) { /* whole chunks */
                int at = rq->pos + take;
                int c = s->chunk - at % s->chunk;
                if (c > n - at) c = n - at;
                if (c <= 0 || take + c > budget || take + c > prefill_max) break;
                take += c;
            }
            if (!take) continue;
            if (sliced && s->span) upto = s->span; /* its first layers */
        }
        bool last = rq->pos + take == n;
        s->q[n_q] =
            (backend_seq_eval){rq->slot, rq->prompt + rq->pos,    take, last ? rq->logits : NULL,
                               upto,     upto ? rq->part_done : 0};
        s->q_req[n_q++] = rq;
        budget -= take;
        prefill_max -= take;
        if (upto) break; /* the last entry of the step */
    }
    if (!n_q) return 0;
    s->stats.steps++;

    stp_err err = {0};
    int rc = backend_eval_batch(s->b, s->q, n_q, &err);
    int n_tok = s->n_batch - budget; /* a chunk part way counts when it is through */
    if (!forward_part_through(s->q[n_q - 1].upto, s->n_layer)) n_tok -= s->q[n_q - 1].n;
    if (rc) {
        /* the backend may have lost these sequences' caches: forget what their slots held */
        for (int i = 0; i < n_q; i++) {
            s_req *rq = s->q_req[i];
            s->slots[rq->slot].n = backend_seq_keep(s->b, rq->slot, 0);
            s_finish(s, rq, GEN_FINISH_LENGTH, rc, &err);
        }
        return n_tok;
    }
    for (int i = 0; i < n_q; i++) {
        s_req *rq = s->q_req[i];
        s_slot *sl = &s->slots[rq->slot];
        const backend_seq_eval *e = &s->q[i];
        if (!forward_part_through(e->upto, s->n_layer)) { /* not through its layers yet */
            rq->part_n = e->n;
            rq->part_done = e->upto;
            s->stats.prefill_slices++;
            continue;
        }
        rq->part_n = rq->part_done = 0;
        memcpy(sl->ids + sl->n, e->tokens, sizeof(int32_t) * (size_t)e->n);
        sl->n += e->n;
        sl->used = s->stats.steps;
        if (rq->st == R_DECODE) {
            s->stats.tokens_decoded++;
            s_sample(s, rq);
            continue;
        }
        s->stats.tokens_prefilled += (unsigned long long)e->n;
        rq->pos += e->n;
        if (rq->pos < rq->r.n_prompt) continue;
        rq->res.n_prompt = rq->r.n_prompt;
        rq->res.t_prompt = gen_now() - rq->t_admit;
        token_step_prompt(rq->step, rq->prompt, rq->r.n_prompt);
        s_sample(s, rq);
    }
    return n_tok;
}
