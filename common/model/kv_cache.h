/* kv_cache: per-layer keys and values of one sequence, in float32 (as llama.cpp with -ctk f32).
 *
 * Global (full-attention) layers keep every position: slot = pos. Sliding-window layers keep a
 * ring of window + n_ubatch slots: slot = pos % cap. The extra n_ubatch slots let a whole
 * micro-batch be appended before its attention runs without overwriting a key that an earlier
 * query of the same batch still sees (the oldest key query p needs is p - window + 1). */
#ifndef STP_KV_CACHE_H
#define STP_KV_CACHE_H

#include <stddef.h>

#include "model/model_config.h"
#include "util/stp_err.h"

typedef struct kv_layer {
    float *k;    /* (cap, n_head_kv*head_dim) */
    float *v;    /* (cap, n_head_kv*head_dim) */
    int cap;     /* slots */
    int window;  /* 0: full attention */
} kv_layer;

typedef struct kv_cache {
    int n_layer;
    int n_ctx;
    int kv_dim;  /* n_head_kv * head_dim */
    kv_layer *layers;
    size_t bytes;
} kv_cache;

int kv_cache_new(kv_cache **out, const model_config *cfg, int n_ctx, int n_ubatch, stp_err *err);
void kv_cache_destroy(kv_cache **self_p);
/* Slot of position pos in layer l. */
static inline int kv_cache_slot(const kv_layer *l, int pos) {
    return pos % l->cap;
}

#endif
