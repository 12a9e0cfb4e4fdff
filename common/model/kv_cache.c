/* kv_cache: full caches for global layers, rings for sliding-window layers; see kv_cache.h. */
#include "model/kv_cache.h"

#include <stdlib.h>
#include <string.h>

int kv_cache_new(kv_cache **out, const model_config *cfg, int n_ctx, int n_ubatch, bool f16,
                 stp_err *err) {
    *out = NULL;
    kv_cache *c = calloc(1, sizeof *c);
    if (!c) return stp_err_set(err, STP_ENOMEM, "kv cache: out of memory");
    c->n_layer = cfg->n_layer;
    c->n_ctx = n_ctx;
    c->kv_dim = cfg->n_head_kv * cfg->head_dim;
    c->f16 = f16;
    c->layers = calloc((size_t)cfg->n_layer, sizeof *c->layers);
    if (!c->layers) goto fail;
    for (int il = 0; il < cfg->n_layer; il++) {
        kv_layer *l = &c->layers[il];
        l->window = model_config_layer_window(cfg, il);
        l->cap = n_ctx;
        if (l->window > 0 && l->window + n_ubatch < n_ctx) l->cap = l->window + n_ubatch;
        size_t n = (size_t)l->cap * (size_t)c->kv_dim;
        if (f16) {
            l->kh = malloc(n * sizeof(uint16_t));
            l->vh = malloc(n * sizeof(uint16_t));
            if (!l->kh || !l->vh) goto fail;
            c->bytes += 2 * n * sizeof(uint16_t);
        } else {
            l->k = malloc(n * sizeof(float));
            l->v = malloc(n * sizeof(float));
            if (!l->k || !l->v) goto fail;
            c->bytes += 2 * n * sizeof(float);
        }
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
            free(c->layers[il].k);
            free(c->layers[il].v);
            free(c->layers[il].kh);
            free(c->layers[il].vh);
        }
    free(c->layers);
    free(c);
    *self_p = NULL;
}

int kv_cache_parse_type(const char *s, bool *f16, stp_err *err) {
    if (!strcmp(s, "f32") || !strcmp(s, "f16")) {
        *f16 = !strcmp(s, "f16");
        return 0;
    }
    return stp_err_set(err, STP_EINVAL, "cache type '%s': f32 or f16", s);
}
