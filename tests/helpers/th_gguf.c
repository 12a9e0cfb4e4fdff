/* th_gguf: builds GGUF files for tests (edited copies, synthetic models); see th_gguf.h. */
#include "th_gguf.h"

#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "kern/kern.h"
#include "model/model.h"

const char *th_tmp_path(char *buf, size_t cap, const char *name) {
    const char *dir = getenv("STP_TMP");
    if (!dir || !*dir) dir = "/tmp";
    mkdir(dir, 0755); /* EEXIST is fine */
    snprintf(buf, cap, "%s/%s", dir, name);
    return buf;
}

const char *th_data_path(char *buf, size_t cap, const char *name) {
    const char *dir = getenv("STP_TEST_DATA");
    snprintf(buf, cap, "%s/%s", dir && *dir ? dir : "tests/data", name);
    return buf;
}

static const th_kv_edit *th_find_edit(const th_copy_opts *o, const char *key) {
    for (int i = 0; o && i < o->n_kv; i++)
        if (!strcmp(o->kv[i].key, key)) return &o->kv[i];
    return NULL;
}

static void th_apply_edit(gguf_writer *w, const th_kv_edit *e) {
    switch (e->op) {
    case TH_KV_U32: gguf_writer_kv_u32(w, e->key, e->u32); break;
    case TH_KV_F32: gguf_writer_kv_f32(w, e->key, e->f32); break;
    case TH_KV_STR: gguf_writer_kv_str(w, e->key, e->str); break;
    default: break;
    }
}

static void th_copy_kv(gguf_writer *w, const gguf_kv *kv, const char *key) {
    switch (kv->type) {
    case GGUF_VT_UINT8:
    case GGUF_VT_UINT16:
    case GGUF_VT_UINT32: gguf_writer_kv_u32(w, key, (uint32_t)kv->v.u64); break;
    case GGUF_VT_INT8:
    case GGUF_VT_INT16:
    case GGUF_VT_INT32: gguf_writer_kv_i32(w, key, (int32_t)kv->v.i64); break;
    case GGUF_VT_UINT64:
    case GGUF_VT_INT64: gguf_writer_kv_u64(w, key, kv->v.u64); break;
    case GGUF_VT_FLOAT32:
    case GGUF_VT_FLOAT64: gguf_writer_kv_f32(w, key, (float)kv->v.f64); break;
    case GGUF_VT_BOOL: gguf_writer_kv_bool(w, key, kv->v.u64 != 0); break;
    case GGUF_VT_STRING: {
        char *s = strndup(kv->v.str.ptr, kv->v.str.len);
        gguf_writer_kv_str(w, key, s);
        free(s);
        break;
    }
    case GGUF_VT_ARRAY:
        if (kv->v.arr.type == GGUF_VT_STRING) {
            uint64_t n = kv->v.arr.n;
            char **strs = calloc(n ? n : 1, sizeof *strs);
            for (uint64_t i = 0; i < n; i++)
                strs[i] = strndup(kv->v.arr.strs[i].ptr, kv->v.arr.strs[i].len);
            gguf_writer_kv_arr_str(w, key, (const char *const *)strs, n);
            for (uint64_t i = 0; i < n; i++)
                free(strs[i]);
            free(strs);
        } else {
            gguf_writer_kv_arr(w, key, kv->v.arr.type, kv->v.arr.data, kv->v.arr.n);
        }
        break;
    default: break;
    }
}

static uint64_t th_nbytes(stp_type type, uint32_t n_dims, const int64_t *ne) {
    uint64_t rows = 1;
    for (uint32_t d = 1; d < n_dims; d++)
        rows *= (uint64_t)ne[d];
    return (uint64_t)tensor_type_row_size(type, ne[0]) * rows;
}

/* Bytes for a tensor declared with type `to` whose source is `src` (F32 converts to F16/BF16). */
static uint8_t *th_convert(const gguf_tensor *src, stp_type to, uint64_t nbytes) {
    uint8_t *buf = calloc(nbytes ? nbytes : 1, 1);
    if (!buf || src->type != STP_TYPE_F32 || (to != STP_TYPE_F16 && to != STP_TYPE_BF16))
        return buf;
    const float *f = src->data;
    uint16_t *h = (uint16_t *)buf;
    for (uint64_t i = 0; i < nbytes / 2; i++) {
        float v;
        memcpy(&v, &f[i], sizeof v);
        h[i] = to == STP_TYPE_F16 ? kern_f32_to_fp16(v) : kern_f32_to_bf16(v);
    }
    return buf;
}

int th_gguf_copy(const char *src, const char *dst, const th_copy_opts *o, stp_err *err) {
    gguf_file *g = NULL;
    gguf_writer *w = NULL;
    int rc = gguf_open(&g, src, err);
    if (rc) return rc;
    rc = gguf_writer_new(&w, dst, err);
    if (rc) goto out;
    char key[512];
    for (size_t i = 0; i < gguf_kv_count(g); i++) {
        const gguf_kv *kv = gguf_kv_at(g, i);
        snprintf(key, sizeof key, "%.*s", (int)kv->key.len, kv->key.ptr);
        if (!strcmp(key, "general.alignment")) continue; /* the writer writes its own */
        const th_kv_edit *e = th_find_edit(o, key);
        if (e)
            th_apply_edit(w, e);
        else
            th_copy_kv(w, kv, key);
    }
    for (int i = 0; o && i < o->n_kv; i++)
        if (!gguf_kv_find(g, o->kv[i].key)) th_apply_edit(w, &o->kv[i]);

    char name[256];
    for (size_t i = 0; i < gguf_tensor_count(g); i++) {
        const gguf_tensor *t = gguf_tensor_at(g, i);
        snprintf(name, sizeof name, "%.*s", (int)t->name.len, t->name.ptr);
        if (o && o->drop_tensor && !strcmp(name, o->drop_tensor)) continue;
        stp_type type = t->type;
        uint32_t nd = t->n_dims;
        const int64_t *ne = t->ne;
        if (o && o->retype_tensor && !strcmp(name, o->retype_tensor)) type = o->retype;
        if (o && o->reshape_tensor && !strcmp(name, o->reshape_tensor)) {
            nd = o->reshape_n_dims;
            ne = o->reshape_ne;
        }
        gguf_writer_add_tensor(w, name, type, nd, ne);
    }
    rc = gguf_writer_begin_data(w, err);
    if (rc) goto out;
    for (size_t i = 0; i < gguf_tensor_count(g); i++) {
        const gguf_tensor *t = gguf_tensor_at(g, i);
        snprintf(name, sizeof name, "%.*s", (int)t->name.len, t->name.ptr);
        if (o && o->drop_tensor && !strcmp(name, o->drop_tensor)) continue;
        if (o && o->retype_tensor && !strcmp(name, o->retype_tensor)) {
            uint64_t nb = th_nbytes(o->retype, t->n_dims, t->ne);
            uint8_t *buf = th_convert(t, o->retype, nb);
            rc = buf ? gguf_writer_write(w, buf, nb, err) : STP_ENOMEM;
            free(buf);
        } else {
            rc = gguf_writer_write(w, t->data, t->nbytes, err);
        }
        if (rc) goto out;
    }
    rc = gguf_writer_finish(w, err);
out:
    gguf_writer_destroy(&w);
    gguf_close(&g);
    return rc;
}

th_model_spec th_model_spec_small(int n_expert) {
    th_model_spec s = {
        .n_layer = 2,
        .n_embd = 32,
        .n_head = 2,
        .n_head_kv = 1,
        .head_dim = 16,
        .n_expert = n_expert,
        .n_expert_used = 2,
        .n_ff = 16,
        .n_vocab = 64,
        .n_ctx = 256,
        .seed = 7,
    };
    return s;
}

static float th_rand(uint64_t *x) {
    *x = *x * 6364136223846793005ull + 1442695040888963407ull;
    return (float)((*x >> 40) & 0xffffff) / 16777216.0f - 0.5f;
}

typedef struct th_tdecl {
    char name[64];
    uint32_t nd;
    int64_t ne[4];
    bool norm;
} th_tdecl;

int th_model_write(const char *path, const th_model_spec *s, stp_err *err) {
    gguf_writer *w = NULL;
    int rc = gguf_writer_new(&w, path, err);
    if (rc) return rc;
    const char *a = s->arch ? s->arch : "smallthinker";
    char k[128];
    gguf_writer_kv_str(w, "general.architecture", a);
#define KVU(suffix, v)                                                                             \
    snprintf(k, sizeof k, "%s." suffix, a);                                                        \
    gguf_writer_kv_u32(w, k, (uint32_t)(v));
    KVU("block_count", s->n_layer)
    KVU("context_length", s->n_ctx)
    KVU("embedding_length", s->n_embd)
    KVU("expert_feed_forward_length", s->n_ff)
    KVU("attention.head_count", s->n_head)
    KVU("attention.head_count_kv", s->n_head_kv)
    if (s->head_dim > 0) {
        KVU("attention.key_length", s->head_dim)
        KVU("attention.value_length", s->head_dim)
    }
    KVU("expert_count", s->n_expert)
    KVU("expert_used_count", s->n_expert_used)
    if (s->gating) {
        KVU("expert_gating_func", s->gating)
    }
    if (s->sliding_window) {
        KVU("attention.sliding_window", s->sliding_window)
    }
#undef KVU
    snprintf(k, sizeof k, "%s.rope.freq_base", a);
    gguf_writer_kv_f32(w, k, 10000.0f);
    snprintf(k, sizeof k, "%s.attention.layer_norm_rms_epsilon", a);
    gguf_writer_kv_f32(w, k, 1e-6f);

    const int64_t D = s->head_dim > 0 ? s->head_dim : s->n_embd / s->n_head;
    const int64_t E = s->n_embd, Q = (int64_t)s->n_head * D, KV = (int64_t)s->n_head_kv * D,
                  F = s->n_ff, X = s->n_expert, V = s->n_vocab;
    size_t cap = 3 + 10 * (size_t)s->n_layer, n = 0;
    th_tdecl *td = calloc(cap, sizeof *td);
    if (!td) {
        gguf_writer_destroy(&w);
        return STP_ENOMEM;
    }
#define DECL(nm, ndims, n0, n1, n2, isnorm)                                                        \
    do {                                                                                           \
        th_tdecl *d = &td[n++];                                                                    \
        snprintf(d->name, sizeof d->name, "%s", nm);                                               \
        d->nd = ndims;                                                                             \
        d->ne[0] = n0;                                                                             \
        d->ne[1] = n1;                                                                             \
        d->ne[2] = n2;                                                                             \
        d->ne[3] = 1;                                                                              \
        d->norm = isnorm;                                                                          \
    } while (0)
    DECL("token_embd.weight", 2, E, V, 1, false);
    DECL("output_norm.weight", 1, E, 1, 1, true);
    if (s->untied) DECL("output.weight", 2, E, V, 1, false);
    char nm[64];
    for (int il = 0; il < s->n_layer; il++) {
#define LDECL(sfx, ndims, n0, n1, n2, isnorm)                                                      \
    snprintf(nm, sizeof nm, "blk.%d." sfx ".weight", il);                                          \
    DECL(nm, ndims, n0, n1, n2, isnorm);
        LDECL("attn_norm", 1, E, 1, 1, true)
        LDECL("attn_q", 2, E, Q, 1, false)
        LDECL("attn_k", 2, E, KV, 1, false)
        LDECL("attn_v", 2, E, KV, 1, false)
        LDECL("attn_output", 2, Q, E, 1, false)
        LDECL("ffn_norm", 1, E, 1, 1, true)
        LDECL("ffn_gate_inp", 2, E, X, 1, false)
        LDECL("ffn_gate_exps", 3, E, F, X, false)
        LDECL("ffn_up_exps", 3, E, F, X, false)
        LDECL("ffn_down_exps", 3, F, E, X, false)
#undef LDECL
    }
#undef DECL
    for (size_t i = 0; i < n; i++) {
        stp_type ty = STP_TYPE_F32;
        if (s->retype_tensor && !strcmp(td[i].name, s->retype_tensor)) ty = s->retype;
        gguf_writer_add_tensor(w, td[i].name, ty, td[i].nd, td[i].ne);
    }
    rc = gguf_writer_begin_data(w, err);
    uint64_t x = s->seed * 2654435761u + 1;
    for (size_t i = 0; i < n && !rc; i++) {
        stp_type ty = STP_TYPE_F32;
        if (s->retype_tensor && !strcmp(td[i].name, s->retype_tensor)) ty = s->retype;
        uint64_t nb = th_nbytes(ty, td[i].nd, td[i].ne);
        uint8_t *buf = calloc(nb ? nb : 1, 1);
        if (!buf) {
            rc = STP_ENOMEM;
            break;
        }
        if (ty == STP_TYPE_F32) {
            float *f = (float *)buf;
            float scale = td[i].norm ? 0.2f : 1.0f / (float)td[i].ne[0];
            for (uint64_t j = 0; j < nb / 4; j++)
                f[j] = td[i].norm ? 1.0f + scale * th_rand(&x) : 4.0f * scale * th_rand(&x) * 8.0f;
        }
        rc = gguf_writer_write(w, buf, nb, err);
        free(buf);
    }
    if (!rc) rc = gguf_writer_finish(w, err);
    free(td);
    gguf_writer_destroy(&w);
    return rc;
}

model *th_model_open(const char *name) {
    char p[4096];
    model *m = NULL;
    stp_err err = {0};
    if (model_open(&m, th_data_path(p, sizeof p, name), &err)) fail_msg("%s", err.msg);
    return m;
}
