/* kv_cache: full caches for global layers, rings for sliding-window layers, in f32, f16 or Q8_0;
 * see kv_cache.h. */
#include "model/kv_cache.h"

#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

/* Layer buffers are anonymous mappings: pages are backed only once written (a slot costs
 * memory for the positions it holds, not for its capacity) and kv_cache_release gives them back
 * (madvise DONTNEED: they read as zeros again). */
static void *s_map(size_t n) {
    void *p =
        mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    return p == MAP_FAILED ? NULL : p;
}

int kv_cache_new(kv_cache **out, const model_config *cfg, int n_ctx, int n_ubatch, kv_dtype type,
                 stp_err *err) {
    *out = NULL;
    if (type == KV_Q8_0 && cfg->n_head_kv * cfg->head_dim % QK8_0)
        return stp_err_set(err, STP_EINVAL,
                           "kv cache: q8_0 needs n_head_kv * head_dim a multiple of %d (%d)", QK8_0,
                           cfg->n_head_kv * cfg->head_dim);
    kv_cache *c = calloc(1, sizeof *c);
    if (!c) return stp_err_set(err, STP_ENOMEM, "kv cache: out of memory");
    c->n_layer = cfg->n_layer;
    c->n_ctx = n_ctx;
    c->kv_dim = cfg->n_head_kv * cfg->head_dim;
    c->type = type;
    c->layers = calloc((size_t)cfg->n_layer, sizeof *c->layers);
    if (!c->layers) goto fail;
    const size_t row = kv_cache_row_bytes(type, c->kv_dim);
    for (int il = 0; il < cfg->n_layer; il++) {
        kv_layer *l = &c->layers[il];
        l->window = model_config_layer_window(cfg, il);
        l->cap = n_ctx;
        if (l->window > 0 && l->window + n_ubatch < n_ctx) l->cap = l->window + n_ubatch;
        const size_t n = (size_t)l->cap * row;
        void *k = s_map(n), *v = s_map(n);
        l->map_bytes = n;
        if (type == KV_F16)
            l->kh = k, l->vh = v;
        else if (type == KV_Q8_0)
            l->kq = k, l->vq = v;
        else
            l->k = k, l->v = v;
        if (!k || !v) {
            if (k) munmap(k, n);
            if (v) munmap(v, n);
            l->kh = l->vh = NULL, l->kq = l->vq = NULL, l->k = l->v = NULL;
            goto fail;
        }
        c->bytes += 2 * n;
    }
    *out = c;
    return 0;
fail:
    kv_cache_destroy(&c);
    return stp_err_set(err, STP_ENOMEM, "kv cache: out of memory for %d positions", n_ctx);
}

void kv_cache_destroy(kv_cache **self_p) {
    kv_cache *c = *self_p;
    if (!c) return;
    if (c->layers)
        for (int il = 0; il < c->n_layer; il++) {
            kv_layer *l = &c->layers[il];
            void *bufs[6] = {l->k, l->v, l->kh, l->vh, l->kq, l->vq};
            for (int i = 0; i < 6; i++)
                if (bufs[i]) munmap(bufs[i], l->map_bytes);
        }
    free(c->layers);
    free(c);
    *self_p = NULL;
}

void kv_cache_store(const kv_cache *c, kv_layer *l, int slot, const float *k, const float *v) {
    const size_t n = (size_t)c->kv_dim, at = (size_t)slot * n;
    if (c->type == KV_F32) {
        memcpy(l->k + at, k, n * sizeof(float));
        memcpy(l->v + at, v, n * sizeof(float));
    } else if (c->type == KV_F16) { /* rounded to nearest even, as ggml's F16 cache */
        for (size_t i = 0; i < n; i++) {
            l->kh[at + i] = kern_f32_to_fp16(k[i]);
            l->vh[at + i] = kern_f32_to_fp16(v[i]);
        }
    } else { /* ggml-cpu's quantize_row_q8_0 on x86 = the Q8_0 activation quantizer */
        kern_quantize_act_ref(STP_TYPE_Q8_0, k, l->kq + at / QK8_0, (int64_t)n);
        kern_quantize_act_ref(STP_TYPE_Q8_0, v, l->vq + at / QK8_0, (int64_t)n);
    }
}

static const char *const s_names[] = {"f32", "f16", "q8_0"};

const char *kv_cache_type_name(kv_dtype type) {
    return (unsigned)type < 3 ? s_names[type] : "?";
}

int kv_cache_parse_type(const char *s, kv_dtype *type, stp_err *err) {
    for (int i = 0; i < 3; i++)
        if (!strcmp(s, s_names[i])) {
            *type = (kv_dtype)i;
            return 0;
        }
    return stp_err_set(err, STP_EINVAL, "cache type '%s': f32, f16 or q8_0", s);
}

int kv_cache_keep_max(const kv_cache *c, int n_past, int n_keep) {
    if (n_keep <= 0) return 0;
    if (n_keep > n_past) n_keep = n_past;
    for (int il = 0; il < c->n_layer; il++) {
        const kv_layer *l = &c->layers[il];
        if (!l->window || n_past <= l->cap) continue;
        if (n_keep - l->window + 1 < n_past - l->cap) return 0;
    }
    return n_keep;
}

/* The bytes of positions >= n_keep, whole pages only, back to the system. */
static void s_release(void *buf, size_t map_bytes, size_t from) {
    if (!buf) return;
    const size_t pg = (size_t)sysconf(_SC_PAGESIZE);
    size_t a = (from + pg - 1) / pg * pg;
    if (a < map_bytes) madvise((char *)buf + a, map_bytes - a, MADV_DONTNEED);
}

void kv_cache_release(kv_cache *c, int n_keep) {
    const size_t row = kv_cache_row_bytes(c->type, c->kv_dim);
    for (int il = 0; il < c->n_layer; il++) {
        kv_layer *l = &c->layers[il];
        /* a ring keeps its slots while any position is kept (they are reused in a cycle) */
        size_t from =
            l->window && l->cap < c->n_ctx && n_keep > 0 ? l->map_bytes : (size_t)n_keep * row;
        void *bufs[6] = {l->k, l->v, l->kh, l->vh, l->kq, l->vq};
        for (int i = 0; i < 6; i++)
            s_release(bufs[i], l->map_bytes, from);
    }
}

size_t kv_cache_pool_bytes(const model_config *cfg, int n_ctx, int n_ubatch, kv_dtype type,
                           int n_seq, long long n_pos) {
    const size_t row = kv_cache_row_bytes(type, cfg->n_head_kv * cfg->head_dim);
    size_t b = 0;
    for (int il = 0; il < cfg->n_layer; il++) {
        int w = model_config_layer_window(cfg, il), cap = n_ctx;
        if (w > 0 && w + n_ubatch < n_ctx) cap = w + n_ubatch;
        long long held = (long long)n_seq * cap; /* every cache full */
        b += 2 * (size_t)(n_pos < held ? n_pos : held) * row;
    }
    return b;
}
