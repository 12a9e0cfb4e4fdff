/* expert_ffn: the routed experts' FFN over slots, chunked, with packing waves; see
 * expert_ffn.h. Every path (packed, row subset, down_t) gives the dense product's bits
 * (README.md invariants 4 and 8), so the choices here are speed only. */
#include "model/expert_ffn.h"

#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "model/down_t.h"

struct expert_ffn {
    int E, F;
    float *g, *u;                 /* (CHUNK, F) gate, then the ReGLU activation; up */
    float *ys;                    /* (CHUNK, E) down outputs in chunk order */
    int32_t *active;              /* (CHUNK, F) each slot's active neurons (short runs) */
    uint8_t *xq_h, *xq_h2, *xq_a; /* (CHUNK) quantized inputs of gate, up (if its format
                                   * differs), down */
    uint8_t *pack_up, *pack_down; /* (PACKS) q4_0x16 images, 64-byte aligned; NULL: the shape
                                   * cannot be packed */
    size_t pack_up_bytes, pack_down_bytes; /* per image, rounded up to 64 */
    size_t bytes;
};

/* Slots of a run from which `up` is packed and computed dense for all of them at once; a
 * shorter run computes each slot's active rows only (about half of them), slot after slot, so
 * rows the slots share come from cache. Packing costs a pass over the matrix and computes every
 * row; below this it loses (docs/BENCHMARKS.md, session 13: pp64). `down` packs from
 * MM_PACK_MIN_VEC slots (its single-slot products skip idle neurons already). */
#define EXPERT_FFN_PACK_UP_MIN 32

/* A run of one expert's slots inside a chunk. */
typedef struct ffn_run {
    const expert_ffn_weights *w;
    int s0; /* first slot (caller's numbering) */
    int l0; /* its row in the chunk's scratch */
    int n;
} ffn_run;

static uint8_t *s_alloc_packs(size_t image, size_t *stride) {
    *stride = (image + 63) & ~(size_t)63;
    return image ? aligned_alloc(64, *stride * EXPERT_FFN_PACKS) : NULL;
}

int expert_ffn_new(expert_ffn **out, const model_config *cfg, stp_err *err) {
    *out = NULL;
    expert_ffn *f = calloc(1, sizeof *f);
    if (!f) return stp_err_set(err, STP_ENOMEM, "expert scratch: out of memory");
    const size_t S = EXPERT_FFN_CHUNK, E = (size_t)cfg->n_embd, F = (size_t)cfg->n_ff_exp;
    const size_t act = (E > F ? E : F) * 4 + 64; /* F32 activations are the widest format */
    f->E = cfg->n_embd;
    f->F = cfg->n_ff_exp;
    f->g = malloc(S * F * sizeof(float));
    f->u = malloc(S * F * sizeof(float));
    f->ys = malloc(S * E * sizeof(float));
    f->active = malloc(S * F * sizeof(int32_t));
    f->xq_h = malloc(S * act);
    f->xq_h2 = malloc(S * act);
    f->xq_a = malloc(S * act);
    const size_t up = kern_q4_0x16_size((int64_t)F, (int64_t)E);
    /* a down_t image packs back by halves of n_embd rows: each half whole 16-row groups */
    const size_t down = E % 32 == 0 ? kern_q4_0x16_size((int64_t)E, (int64_t)F) : 0;
    f->pack_up = s_alloc_packs(up, &f->pack_up_bytes);
    f->pack_down = s_alloc_packs(down, &f->pack_down_bytes);
    f->bytes = S * (3 * F + E) * 4 + 3 * S * act +
               EXPERT_FFN_PACKS * (f->pack_up_bytes + f->pack_down_bytes);
    if (!f->g || !f->u || !f->ys || !f->active || !f->xq_h || !f->xq_h2 || !f->xq_a ||
        (up && !f->pack_up) || (down && !f->pack_down)) {
        expert_ffn_destroy(&f);
        return stp_err_set(err, STP_ENOMEM, "expert scratch: out of memory");
    }
    *out = f;
    return 0;
}

void expert_ffn_destroy(expert_ffn **self_p) {
    expert_ffn *f = *self_p;
    if (!f) return;
    free(f->g);
    free(f->u);
    free(f->ys);
    free(f->active);
    free(f->xq_h);
    free(f->xq_h2);
    free(f->xq_a);
    free(f->pack_up);
    free(f->pack_down);
    free(f);
    *self_p = NULL;
}

size_t expert_ffn_bytes(const expert_ffn *f) {
    return f ? f->bytes : 0;
}

/* The single-slot down products over down_t images, rows split over the team. */
typedef struct dt_section {
    const kern_ops *ops;
    const uint8_t *img[EXPERT_FFN_CHUNK];
    const uint8_t *xq[EXPERT_FFN_CHUNK];
    float *y[EXPERT_FFN_CHUNK];
    int n, n_embd, n_ff;
    int64_t computed[64]; /* per thread */
} dt_section;

static void s_dt_worker(void *p, int ith, int nth) {
    dt_section *d = p;
    long k0, k1;
    threadpool_chunk(d->n_embd / 2, ith, nth, 16, &k0, &k1);
    int64_t c = 0;
    for (int i = 0; i < d->n && k0 < k1; i++)
        c += d->ops->down_t_matvec(d->img[i], d->n_embd, d->n_ff, (const block_q8_0 *)d->xq[i],
                                   d->y[i], (int)k0, (int)k1);
    if (ith < 64) d->computed[ith] = c;
}

/* gate for every run, one section (the q4_0x16 image when given: every row range ops_mm_run
 * hands out is a multiple of 16 rows, so the packed kernel always runs). */
static void s_gate(expert_ffn *f, const compute_ctx *cc, const layer_weights *L, const ffn_run *r,
                   int nr) {
    const stp_type tg = L->gate_exps.type;
    const size_t sg = kern_act_size(tg, f->E);
    mm_job jobs[EXPERT_FFN_CHUNK];
    for (int q = 0; q < nr; q++)
        jobs[q] = (mm_job){.type = tg,
                           .n_cols = f->E,
                           .w = r[q].w->gate,
                           .wp = r[q].w->gate_x16,
                           .row_bytes = L->gate_exps.row_bytes,
                           .xq = f->xq_h + (size_t)r[q].l0 * sg,
                           .xq_stride = sg,
                           .n_vec = r[q].n,
                           .y = f->g + (size_t)r[q].l0 * f->F,
                           .y_stride = (size_t)f->F,
                           .n_rows = f->F};
    ops_mm_run(cc, jobs, nr);
}

/* up: runs too short to pack compute each slot's active rows only (a job per slot; a slot's
 * jobs follow each other, so rows two slots share are read from memory once, mostly); runs of
 * many slots pack the matrix, at most EXPERT_FFN_PACKS at a time (waves). Returns the active
 * neurons. */
static uint64_t s_up(expert_ffn *f, const compute_ctx *cc, const layer_weights *L, const ffn_run *r,
                     int nr) {
    const stp_type tg = L->gate_exps.type, tu = L->up_exps.type;
    const size_t su = kern_act_size(tu, f->E);
    const uint8_t *xq_up = kern_act_type(tu) == kern_act_type(tg) ? f->xq_h : f->xq_h2;
    const int F = f->F;
    mm_job jobs[EXPERT_FFN_CHUNK];
    uint64_t active = 0;
    for (int q = 0; q < nr;) {
        int nj = 0, n_pack = 0;
        for (; q < nr; q++) {
            const int n = r[q].n, l0 = r[q].l0;
            const bool pack = tu == STP_TYPE_Q4_0 && f->pack_up && n >= EXPERT_FFN_PACK_UP_MIN;
            if (pack && n_pack == EXPERT_FFN_PACKS) break; /* next wave */
            if (n < EXPERT_FFN_PACK_UP_MIN) {              /* each slot's active rows */
                for (int l = l0; l < l0 + n; l++) {
                    int32_t *rows = f->active + (size_t)l * F;
                    const int na = ops_active_rows(f->g + (size_t)l * F, F, rows);
                    active += (uint64_t)na;
                    if (na)
                        jobs[nj++] = (mm_job){.type = tu,
                                              .n_cols = f->E,
                                              .w = r[q].w->up,
                                              .row_bytes = L->up_exps.row_bytes,
                                              .xq = xq_up + (size_t)l * su,
                                              .xq_stride = su,
                                              .n_vec = 1,
                                              .y = f->u + (size_t)l * F,
                                              .y_stride = (size_t)F,
                                              .n_rows = na,
                                              .rows = rows};
                }
                continue;
            }
            mm_job j = {.type = tu,
                        .n_cols = f->E,
                        .w = r[q].w->up,
                        .row_bytes = L->up_exps.row_bytes,
                        .xq = xq_up + (size_t)l0 * su,
                        .xq_stride = su,
                        .n_vec = n,
                        .y = f->u + (size_t)l0 * F,
                        .y_stride = (size_t)F,
                        .n_rows = F};
            if (pack) j.pack_scratch = f->pack_up + (size_t)n_pack++ * f->pack_up_bytes;
            active += ops_count_active(f->g + (size_t)l0 * F, (size_t)n, F);
            jobs[nj++] = j;
        }
        ops_mm_run(cc, jobs, nj);
    }
    return active;
}

/* down: runs of many slots as batched jobs, in waves of EXPERT_FFN_PACKS, packed from the GGUF
 * rows when the caller has them (a plain byte shuffle), else from the down_t image; with a
 * down_t image, the other runs one slot at a time, idle neurons skipped; without, dense.
 * Returns the neurons computed. */
static uint64_t s_down(expert_ffn *f, const compute_ctx *cc, const layer_weights *L,
                       const ffn_run *r, int nr) {
    const stp_type td = L->down_exps.type;
    const size_t sd = kern_act_size(td, f->F);
    const int E = f->E, F = f->F;
    mm_job jobs[EXPERT_FFN_CHUNK];
    uint64_t computed = 0;
    dt_section d = {.ops = cc->ops, .n = 0, .n_embd = E, .n_ff = F};
    for (int q = 0; q < nr;) {
        int nj = 0, n_pack = 0;
        for (; q < nr; q++) {
            const int n = r[q].n, l0 = r[q].l0;
            const uint8_t *img = r[q].w->down_t, *rows = r[q].w->down;
            const bool pack = td == STP_TYPE_Q4_0 && f->pack_down && n >= MM_PACK_MIN_VEC;
            if (img && !pack) { /* single-slot products, after the waves */
                for (int l = l0; l < l0 + n; l++, d.n++) {
                    d.img[d.n] = img;
                    d.xq[d.n] = f->xq_a + (size_t)l * sd;
                    d.y[d.n] = f->ys + (size_t)l * E;
                }
                continue;
            }
            if (pack && n_pack == EXPERT_FFN_PACKS) break; /* next wave */
            mm_job j = {.type = td,
                        .n_cols = F,
                        .w = rows,
                        .row_bytes = L->down_exps.row_bytes, /* also sizes the section */
                        .xq = f->xq_a + (size_t)l0 * sd,
                        .xq_stride = sd,
                        .n_vec = n,
                        .y = f->ys + (size_t)l0 * E,
                        .y_stride = (size_t)E,
                        .n_rows = E,
                        .down_t = rows ? NULL : img};
            if (pack) j.pack_scratch = f->pack_down + (size_t)n_pack++ * f->pack_down_bytes;
            jobs[nj++] = j;
            computed += (uint64_t)n * F;
        }
        if (nj) ops_mm_run(cc, jobs, nj);
    }
    if (d.n) {
        threadpool_run(cc->tp, s_dt_worker, &d);
        /* every thread walks the same neurons (the set depends on the activation only) over its
         * own rows: the count is one thread's, not the sum over the team */
        int64_t most = 0;
        for (int i = 0; i < 64; i++)
            most = d.computed[i] > most ? d.computed[i] : most;
        computed += (uint64_t)most;
    }
    return computed;
}

/* g = relu(g) * u, then quantized for down into xa. A select, so an idle neuron's u, never
 * computed, is not used: the product's bits and-ed with an all-ones or all-zeros mask (+0.0f),
 * written so the compiler emits no branch (GCC made the ?: a jump, mispredicted for about half
 * the neurons: 4.7% of a 64-token prefill). */
static void s_reglu(const kern_ops *ops, stp_type td, float *g, const float *u, int F,
                    uint8_t *xa) {
    for (int i = 0; i < F; i++) {
        const float a = g[i] * u[i];
        uint32_t bits;
        memcpy(&bits, &a, sizeof bits);
        bits &= -(uint32_t)(g[i] > 0.0f);
        memcpy(&g[i], &bits, sizeof bits);
    }
    ops->quantize_act(td, g, xa, F);
}

/* ---- short runs as tasks (decode) ----------------------------------------------------------- *
 * When every run of a chunk has few slots, each run (an expert and its 1..MM_PACK_MIN_VEC-1
 * slots) is one task: gate, the active rows of up, ReGLU and down over the down_t image, for
 * all its slots; the team's threads take tasks from a shared counter, largest runs first. One
 * section per chunk instead of three, and the threads are at different phases at any moment, so
 * one streams a gate while the other gathers scattered up rows or down_t neurons (those are
 * bound by the misses a core keeps in flight, not by the bus). A run of several slots (several
 * sequences routed to one expert) reads its matrices from memory once: gate in one batched
 * product, up and down in blocks small enough to stay in L2 while each slot takes its rows of
 * the block. Every product is the same kernel on the same rows as in the phased path below
 * (matmat equals matvec per row; a row subset or a skipped idle neuron changes no bit): the same
 * bits. */
#define TASK_UP_BLOCK 256 /* rows of up: 216 KiB of Q4_0 rows for the 4b's n_embd */
#define TASK_DT_BLOCK 256 /* row pairs of a down_t image: 256 bytes of each neuron */

typedef struct task_section {
    expert_ffn *f;
    const compute_ctx *cc;
    const layer_weights *L;
    const ffn_run *r;
    int order[EXPERT_FFN_CHUNK]; /* runs, largest first */
    int nr;
    _Atomic int next;
    _Atomic uint64_t active, down; /* summed over the slots */
} task_section;

/* Run r's FFN for all its slots (rows l0.. of the chunk's scratch). Returns the down neurons;
 * adds the active ones to *active. */
static uint64_t s_task_run(expert_ffn *f, const kern_ops *ops, const layer_weights *L,
                           const ffn_run *r, uint64_t *active) {
    const int E = f->E, F = f->F, H = E / 2, n = r->n, l0 = r->l0;
    const stp_type tg = L->gate_exps.type, tu = L->up_exps.type, td = L->down_exps.type;
    const size_t sg = kern_act_size(tg, E), su = kern_act_size(tu, E), sd = kern_act_size(td, F);
    const uint8_t *xq_up = kern_act_type(tu) == kern_act_type(tg) ? f->xq_h : f->xq_h2;
    const expert_ffn_weights *w = r->w;
    float *g = f->g + (size_t)l0 * F;
    const uint8_t *xg = f->xq_h + (size_t)l0 * sg;
    if (w->gate_x16 && n == 1)
        ops->matvec_q4_0x16(E, w->gate_x16, xg, g, 0, F / 16);
    else if (w->gate_x16)
        ops->matmat_q4_0x16(E, w->gate_x16, xg, sg, n, g, (size_t)F, 0, F / 16);
    else if (n == 1)
        ops->matvec(tg, E, w->gate, L->gate_exps.row_bytes, xg, g, 0, F);
    else
        ops->matmat(tg, E, w->gate, L->gate_exps.row_bytes, xg, sg, n, g, (size_t)F, 0, F);
    /* n < MM_PACK_MIN_VEC: s_tasks_apply takes no longer run */
    int n_act[MM_PACK_MIN_VEC], cur[MM_PACK_MIN_VEC] = {0};
    for (int i = 0; i < n; i++) {
        const int l = l0 + i;
        n_act[i] = ops_active_rows(f->g + (size_t)l * F, F, f->active + (size_t)l * F);
        *active += (uint64_t)n_act[i];
    }
    for (int b = 0; b < F; b += TASK_UP_BLOCK) /* each slot's active rows of the block */
        for (int i = 0; i < n; i++) {
            const int l = l0 + i;
            const int32_t *rows = f->active + (size_t)l * F;
            int c = cur[i];
            while (c < n_act[i] && (n == 1 || rows[c] < b + TASK_UP_BLOCK))
                c++;
            if (c > cur[i])
                ops->matvec_rows(tu, E, w->up, L->up_exps.row_bytes, xq_up + (size_t)l * su,
                                 rows + cur[i], c - cur[i], f->u + (size_t)l * F);
            cur[i] = c;
        }
    for (int i = 0; i < n; i++) {
        const int l = l0 + i;
        s_reglu(ops, td, f->g + (size_t)l * F, f->u + (size_t)l * F, F, f->xq_a + (size_t)l * sd);
    }
    uint64_t down = 0;
    for (int k = 0, k1; k < H; k = k1) { /* each slot's product over the block */
        k1 = n == 1 || k + TASK_DT_BLOCK > H ? H : k + TASK_DT_BLOCK;
        for (int i = 0; i < n; i++) {
            const int l = l0 + i;
            const int64_t c =
                ops->down_t_matvec(w->down_t, E, F, (const block_q8_0 *)(f->xq_a + (size_t)l * sd),
                                   f->ys + (size_t)l * E, k, k1);
            if (k == 0) down += (uint64_t)c; /* the same neurons in every block */
        }
    }
    return down;
}

static void s_task_worker(void *p, int ith, int nth) {
    (void)ith, (void)nth;
    task_section *t = p;
    uint64_t active = 0, down = 0;
    for (;;) {
        const int i = atomic_fetch_add_explicit(&t->next, 1, memory_order_relaxed);
        if (i >= t->nr) break;
        down += s_task_run(t->f, t->cc->ops, t->L, &t->r[t->order[i]], &active);
    }
    atomic_fetch_add_explicit(&t->active, active, memory_order_relaxed);
    atomic_fetch_add_explicit(&t->down, down, memory_order_relaxed);
}

/* The task path applies: a task for each thread at least (one run alone runs faster split
 * over the team), every run short, every run with its down_t image and a Q4_0 down (the
 * image's type). Any gate and up type: their matvec / matmat / matvec_rows give the bits of
 * the phased path's products. */
static bool s_tasks_apply(const expert_ffn *f, const compute_ctx *cc, const layer_weights *L,
                          const ffn_run *r, int nr) {
    if (nr < threadpool_size(cc->tp) || f->F % 16) return false;
    if (L->down_exps.type != STP_TYPE_Q4_0) return false;
    for (int q = 0; q < nr; q++)
        if (r[q].n >= MM_PACK_MIN_VEC || !r[q].w->down_t) return false;
    return true;
}

/* The chunk's down outputs to their rows of y. */
static void s_scatter(const expert_ffn *f, const ffn_run *r, int nr, float *y,
                      const int32_t *y_row) {
    for (int q = 0; q < nr; q++)
        for (int i = 0; i < r[q].n; i++)
            memcpy(y + (size_t)y_row[r[q].s0 + i] * f->E, f->ys + (size_t)(r[q].l0 + i) * f->E,
                   (size_t)f->E * sizeof(float));
}

/* One chunk: runs r[0..nr), cs slots in all. */
static void s_chunk(expert_ffn *f, const compute_ctx *cc, const layer_weights *L, const ffn_run *r,
                    int nr, int cs, const float *h, const int32_t *tok, float *y,
                    const int32_t *y_row, expert_ffn_stats *st) {
    const int E = f->E, F = f->F;
    const stp_type tg = L->gate_exps.type, tu = L->up_exps.type, td = L->down_exps.type;
    const size_t sg = kern_act_size(tg, E), su = kern_act_size(tu, E), sd = kern_act_size(td, F);
    const bool up_shares = kern_act_type(tu) == kern_act_type(tg);
    for (int q = 0; q < nr; q++)
        for (int i = 0; i < r[q].n; i++) {
            const float *hv = h + (size_t)tok[r[q].s0 + i] * E;
            const int l = r[q].l0 + i;
            cc->ops->quantize_act(tg, hv, f->xq_h + (size_t)l * sg, E);
            if (!up_shares) cc->ops->quantize_act(tu, hv, f->xq_h2 + (size_t)l * su, E);
        }
    if (s_tasks_apply(f, cc, L, r, nr)) {
        task_section t = {.f = f, .cc = cc, .L = L, .r = r, .nr = nr};
        int no = 0; /* largest runs first, so the last tasks taken are short */
        for (int n = MM_PACK_MIN_VEC - 1; n > 0; n--)
            for (int q = 0; q < nr; q++)
                if (r[q].n == n) t.order[no++] = q;
        atomic_init(&t.next, 0);
        atomic_init(&t.active, 0);
        atomic_init(&t.down, 0);
        threadpool_run(cc->tp, s_task_worker, &t);
        if (st) st->active += atomic_load(&t.active), st->down += atomic_load(&t.down);
        s_scatter(f, r, nr, y, y_row);
        return;
    }
    s_gate(f, cc, L, r, nr);
    const uint64_t active = s_up(f, cc, L, r, nr);
    for (int l = 0; l < cs; l++)
        s_reglu(cc->ops, td, f->g + (size_t)l * F, f->u + (size_t)l * F, F,
                f->xq_a + (size_t)l * sd);
    const uint64_t down = s_down(f, cc, L, r, nr);
    s_scatter(f, r, nr, y, y_row);
    if (st) {
        st->active += active;
        st->down += down;
    }
}

void expert_ffn_run(expert_ffn *f, const compute_ctx *cc, const layer_weights *L,
                    const expert_ffn_group *groups, int ng, const float *h, const int32_t *tok,
                    float *y, const int32_t *y_row, expert_ffn_stats *st) {
    ffn_run r[EXPERT_FFN_CHUNK];
    int nr = 0, cs = 0;
    for (int q = 0; q < ng; q++)
        for (int s = groups[q].s0, end = s + groups[q].n; s < end; s += EXPERT_FFN_CHUNK) {
            const int n = end - s < EXPERT_FFN_CHUNK ? end - s : EXPERT_FFN_CHUNK;
            if (cs + n > EXPERT_FFN_CHUNK) { /* this run starts the next chunk */
                s_chunk(f, cc, L, r, nr, cs, h, tok, y, y_row, st);
                nr = cs = 0;
            }
            r[nr++] = (ffn_run){&groups[q].w, s, cs, n};
            cs += n;
        }
    if (nr) s_chunk(f, cc, L, r, nr, cs, h, tok, y, y_row, st);
}
