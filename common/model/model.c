/* model: opens a SmallThinker GGUF and checks every weight against the config; see model.h. */
#include "model/model.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "kern/kern.h"

typedef struct view_req {
    int64_t ne[3]; /* expected ne[0..2] (ne[2] = 1 for matrices) */
    int n_dims;    /* 1, 2 or 3 */
} view_req;

static int s_view(const model *m, tensor_view *v, const char *name, view_req req, stp_err *err) {
    const gguf_tensor *t = gguf_tensor_find(m->gguf, name);
    const char *path = gguf_path(m->gguf);
    if (!t) return stp_err_set(err, STP_EFORMAT, "%s: tensor '%s' is missing", path, name);
    if (!tensor_type_supported(t->type))
        return stp_err_set(err, STP_EUNSUPPORTED,
                           "%s: tensor '%s' has type %s, which stpipe does not support (supported: "
                           "F32 F16 BF16 Q8_0 Q4_0 Q4_1 Q3_K Q4_K Q5_K Q6_K)",
                           path, name, tensor_type_name(t->type));
    int64_t ne[3] = {t->ne[0], t->n_dims > 1 ? t->ne[1] : 1, t->n_dims > 2 ? t->ne[2] : 1};
    bool ok = (int)t->n_dims <= req.n_dims && (t->n_dims < 4 || t->ne[3] == 1);
    for (int i = 0; i < 3; i++)
        ok = ok && ne[i] == (i < req.n_dims ? req.ne[i] : 1);
    if (!ok)
        return stp_err_set(
            err, STP_EFORMAT,
            "%s: tensor '%s' has shape [%lld, %lld, %lld], expected [%lld, %lld, %lld]", path, name,
            (long long)ne[0], (long long)ne[1], (long long)ne[2], (long long)req.ne[0],
            (long long)(req.n_dims > 1 ? req.ne[1] : 1),
            (long long)(req.n_dims > 2 ? req.ne[2] : 1));
    snprintf(v->name, sizeof v->name, "%.*s", (int)(t->name.len < 63 ? t->name.len : 63),
             t->name.ptr);
    v->data = t->data;
    v->type = t->type;
    v->n_cols = ne[0];
    v->n_rows = ne[1];
    v->n_mat = ne[2];
    v->row_bytes = tensor_type_row_size(t->type, ne[0]);
    v->mat_bytes = v->row_bytes * (size_t)ne[1];
    return 0;
}

/* A norm vector as floats: points into the file when F32, else converted into owned memory. */
static int s_norm(model *m, const float **out, const char *name, float **owned_slot, stp_err *err) {
    tensor_view v;
    view_req r = {{m->cfg.n_embd, 1, 1}, 1};
    int rc = s_view(m, &v, name, r, err);
    if (rc) return rc;
    if (v.type == STP_TYPE_F32) {
        *out = (const float *)v.data;
        return 0;
    }
    kern_dequantize_row_ref(v.type, v.data, *owned_slot, m->cfg.n_embd);
    *out = *owned_slot;
    *owned_slot += m->cfg.n_embd;
    return 0;
}

/* Tensors every layer has: attn_norm, q, k, v, output, ffn_norm, router, gate, up, down. */
#define MODEL_LAYER_TENSORS 10

int model_open(model **out, const char *path, stp_err *err) {
    *out = NULL;
    model *m = calloc(1, sizeof *m);
    if (!m) return stp_err_set(err, STP_ENOMEM, "%s: out of memory", path);
    int rc = gguf_open(&m->gguf, path, err);
    if (rc) goto fail;
    rc = model_config_load(&m->cfg, m->gguf, m->warning, sizeof m->warning, err);
    if (rc) goto fail;
    const model_config *c = &m->cfg;
    if (gguf_tensor_count(m->gguf) == 0) {
        rc = stp_err_set(err, STP_EFORMAT,
                         "%s: the file holds no tensors (a vocabulary-only GGUF?)", path);
        goto fail;
    }
    const int64_t E = c->n_embd, Q = (int64_t)c->n_head * c->head_dim,
                  KV = (int64_t)c->n_head_kv * c->head_dim, F = c->n_ff_exp, X = c->n_expert;
    /* the embedding's shape bounds n_embd by the file's size before anything is sized by it */
    rc = s_view(m, &m->tok_embd, "token_embd.weight", (view_req){{E, c->n_vocab, 1}, 2}, err);
    if (rc) goto fail;
    if (c->tied) {
        m->output = m->tok_embd;
    } else {
        rc = s_view(m, &m->output, "output.weight", (view_req){{E, c->n_vocab, 1}, 2}, err);
        if (rc) goto fail;
    }
    if ((size_t)c->n_layer * MODEL_LAYER_TENSORS > gguf_tensor_count(m->gguf)) {
        rc = stp_err_set(err, STP_EFORMAT,
                         "%s: block_count is %d but the file holds only %zu tensors (a layer "
                         "has %d)",
                         path, c->n_layer, gguf_tensor_count(m->gguf), MODEL_LAYER_TENSORS);
        goto fail;
    }
    m->layers = calloc((size_t)c->n_layer, sizeof *m->layers);
    m->owned_norms = malloc(sizeof(float) * (size_t)c->n_embd * (2 * (size_t)c->n_layer + 1));
    if (!m->layers || !m->owned_norms) {
        rc = stp_err_set(err, STP_ENOMEM, "%s: out of memory", path);
        goto fail;
    }
    float *slot = m->owned_norms;
    rc = s_norm(m, &m->output_norm, "output_norm.weight", &slot, err);
    if (rc) goto fail;
    for (int il = 0; il < c->n_layer; il++) {
        layer_weights *L = &m->layers[il];
        char name[96];
#define VIEW(field, suffix, n0, n1, n2, nd)                                                        \
    snprintf(name, sizeof name, "blk.%d." suffix ".weight", il);                                   \
    rc = s_view(m, &L->field, name, (view_req){{n0, n1, n2}, nd}, err);                            \
    if (rc) goto fail;
        VIEW(wq, "attn_q", E, Q, 1, 2)
        VIEW(wk, "attn_k", E, KV, 1, 2)
        VIEW(wv, "attn_v", E, KV, 1, 2)
        VIEW(wo, "attn_output", Q, E, 1, 2)
        VIEW(router, "ffn_gate_inp", E, X, 1, 2)
        VIEW(gate_exps, "ffn_gate_exps", E, F, X, 3)
        VIEW(up_exps, "ffn_up_exps", E, F, X, 3)
        VIEW(down_exps, "ffn_down_exps", F, E, X, 3)
#undef VIEW
        snprintf(name, sizeof name, "blk.%d.attn_norm.weight", il);
        rc = s_norm(m, &L->attn_norm, name, &slot, err);
        if (rc) goto fail;
        snprintf(name, sizeof name, "blk.%d.ffn_norm.weight", il);
        rc = s_norm(m, &L->ffn_norm, name, &slot, err);
        if (rc) goto fail;
        m->expert_bytes +=
            L->gate_exps.mat_bytes * X + L->up_exps.mat_bytes * X + L->down_exps.mat_bytes * X;
    }
    for (size_t i = 0; i < gguf_tensor_count(m->gguf); i++)
        m->weight_bytes += gguf_tensor_at(m->gguf, i)->nbytes;
    *out = m;
    return 0;
fail:
    model_close(&m);
    return rc;
}

/* The views of the given MODEL_PACK_* groups (all of them for freeing). */
static int s_packable_views(model *m, int which, tensor_view **out, int cap) {
    int n = 0;
    if ((which & MODEL_PACK_HEAD) && n < cap) out[n++] = &m->output;
    for (int il = 0; il < m->cfg.n_layer; il++) {
        layer_weights *L = &m->layers[il];
        tensor_view *attn[] = {&L->wq, &L->wk, &L->wv, &L->wo};
        if (which & MODEL_PACK_ATTN)
            for (size_t i = 0; i < 4 && n < cap; i++)
                out[n++] = attn[i];
        if ((which & MODEL_PACK_GATE) && n < cap) out[n++] = &L->gate_exps;
    }
    return n;
}

/* A matrix of q4_0x16 image: Q4_0 in whole groups of 16 rows. */
static bool s_packable(const tensor_view *t) {
    return t->type == STP_TYPE_Q4_0 && t->n_rows % 16 == 0;
}

int model_enable_packing(model *m, int which, stp_err *err) {
    if (!strcmp(kern_ops_get()->level, "ref") || !m->layers) return 0;
    int cap = 1 + 5 * m->cfg.n_layer;
    tensor_view **views = malloc(sizeof *views * (size_t)cap);
    if (!views) return stp_err_set(err, STP_ENOMEM, "packing: out of memory");
    if (!m->images) { /* room for every image packing could ever build (reserved, not used) */
        int n = s_packable_views(m, MODEL_PACK_ALL, views, cap);
        size_t bytes = 0;
        for (int i = 0; i < n; i++)
            if (s_packable(views[i]))
                bytes += arena_room((size_t)views[i]->n_mat,
                                    kern_q4_0x16_size(views[i]->n_rows, views[i]->n_cols));
        int rc = arena_new(&m->images, bytes, err);
        if (rc) {
            free(views);
            return rc;
        }
    }
    int n = s_packable_views(m, which, views, cap);
    for (int i = 0; i < n; i++) {
        tensor_view *t = views[i];
        if (t->packed || !s_packable(t)) continue;
        t->packed = calloc((size_t)t->n_mat, sizeof(uint8_t *));
        if (!t->packed) {
            free(views);
            return stp_err_set(err, STP_ENOMEM, "packing: out of memory");
        }
        t->owner = m;
    }
    free(views);
    return 0;
}

void model_release_pages(const uint8_t *p, size_t n) {
    const uintptr_t pg = (uintptr_t)sysconf(_SC_PAGESIZE);
    uintptr_t a = ((uintptr_t)p + pg - 1) & ~(pg - 1), b = ((uintptr_t)p + n) & ~(pg - 1);
    if (b > a) madvise((void *)a, b - a, MADV_DONTNEED);
}

/* Whole pages of [p, p + n) filled in (MADV_POPULATE_READ, Linux 5.14), else touched a page at a
 * time. */
static void s_populate(const uint8_t *p, size_t n) {
    const uintptr_t pg = (uintptr_t)sysconf(_SC_PAGESIZE);
    const uintptr_t a = (uintptr_t)p & ~(pg - 1), b = (uintptr_t)p + n;
#ifdef MADV_POPULATE_READ
    if (madvise((void *)a, b - a, MADV_POPULATE_READ) == 0) return;
#endif
    volatile uint8_t sink = 0;
    for (uintptr_t q = (uintptr_t)p; q < b; q = (q & ~(pg - 1)) + pg)
        sink ^= *(const volatile uint8_t *)q;
    (void)sink;
}

void model_populate(const model *m, model_progress_fn progress, void *ud) {
    for (int il = 0; il < m->cfg.n_layer; il++) {
        const tensor_view *t = &m->layers[il].up_exps;
        if (t->data && !t->packed) s_populate(t->data, (size_t)t->n_mat * t->mat_bytes);
        if (progress) progress(ud, "expert up rows", (double)(il + 1) / m->cfg.n_layer);
    }
}

typedef struct pack_item {
    const tensor_view *t;
    int64_t mat;
} pack_item;

typedef struct pack_section {
    pack_item *items;
    long n;
} pack_section;

static void s_pack_worker(void *p, int ith, int nth) {
    pack_section *s = p;
    long b, e;
    threadpool_chunk(s->n, ith, nth, 1, &b, &e);
    for (long i = b; i < e; i++) {
        const tensor_view *t = s->items[i].t;
        const uint8_t *src = t->data + (size_t)s->items[i].mat * t->mat_bytes;
        kern_ops_get()->pack_q4_0x16(src, t->row_bytes, t->n_rows, t->n_cols,
                                     t->packed[s->items[i].mat]);
        model_release_pages(src, t->mat_bytes);
    }
}

int model_pack_all(model *m, threadpool *tp, model_progress_fn progress, void *ud, stp_err *err) {
    if (!m->layers) return 0;
    int cap = 1 + 5 * m->cfg.n_layer;
    tensor_view **views = malloc(sizeof *views * (size_t)cap);
    long n_items = 0, cap_items = 0;
    pack_item *items = NULL;
    int rc = 0;
    if (!views) return stp_err_set(err, STP_ENOMEM, "packing: out of memory");
    int n = s_packable_views(m, MODEL_PACK_ALL, views, cap);
    for (int i = 0; i < n; i++)
        cap_items += views[i]->packed ? views[i]->n_mat : 0;
    items = malloc(sizeof *items * (size_t)(cap_items ? cap_items : 1));
    if (!items) {
        rc = stp_err_set(err, STP_ENOMEM, "packing: out of memory");
        goto out;
    }
    for (int i = 0; i < n; i++) {
        tensor_view *t = views[i];
        if (!t->packed) continue;
        for (int64_t k = 0; k < t->n_mat; k++) {
            if (t->packed[k]) continue;
            size_t bytes = kern_q4_0x16_size(t->n_rows, t->n_cols);
            t->packed[k] = arena_alloc(m->images, bytes);
            if (!t->packed[k]) {
                rc = stp_err_set(err, STP_ENOMEM, "packing %s: out of memory", t->name);
                goto out;
            }
            m->packed_bytes += bytes;
            items[n_items++] = (pack_item){t, k};
        }
    }
    /* in slices, so progress can be reported between them */
    const long slice = n_items / 32 + 1;
    for (long i = 0; i < n_items; i += slice) {
        pack_section s = {items + i, n_items - i < slice ? n_items - i : slice};
        threadpool_run(tp, s_pack_worker, &s);
        if (progress) progress(ud, "packing Q4_0 weights", (double)(i + s.n) / n_items);
    }
out:
    free(items);
    free(views);
    return rc;
}

const uint8_t *model_packed(const tensor_view *t, int64_t mat) {
    if (!t->packed) return NULL;
    if (!t->packed[mat]) {
        size_t bytes = kern_q4_0x16_size(t->n_rows, t->n_cols);
        uint8_t *img = arena_alloc(t->owner->images, bytes); /* pairs on cache lines */
        if (!img) return NULL;                               /* the unpacked path still works */
        const uint8_t *src = t->data + (size_t)mat * t->mat_bytes;
        kern_ops_get()->pack_q4_0x16(src, t->row_bytes, t->n_rows, t->n_cols, img);
        t->packed[mat] = img;
        t->owner->packed_bytes += bytes;
        model_release_pages(src, t->mat_bytes); /* the image replaces these file pages */
    }
    return t->packed[mat];
}

size_t model_packed_bytes(const model *m) {
    return m->packed_bytes;
}

void model_close(model **self_p) {
    model *m = *self_p;
    if (!m) return;
    if (m->layers) {
        tensor_view **views = malloc(sizeof *views * (size_t)(1 + 5 * m->cfg.n_layer));
        int n = views ? s_packable_views(m, MODEL_PACK_ALL, views, 1 + 5 * m->cfg.n_layer) : 0;
        for (int i = 0; i < n; i++) {
            free(views[i]->packed); /* the images are the arena's */
        }
        free(views);
    }
    arena_destroy(&m->images);
    gguf_close(&m->gguf);
    free(m->layers);
    free(m->owned_norms);
    free(m);
    *self_p = NULL;
}
