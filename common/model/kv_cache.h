/* kv_cache: per-layer keys and values of one sequence, in float32 (as llama.cpp with -ctk f32,
 * the default: the golden data's setting) or float16 (as llama.cpp's own default, -ctk f16: half
 * the memory, so a memory budget leaves more room to the expert cache; keys and values are
 * rounded to nearest even when stored and widened exactly when read).
 *
 * Global (full-attention) layers keep every position: slot = pos. Sliding-window layers keep a
 * ring of window + n_ubatch slots: slot = pos % cap. The extra n_ubatch slots let a whole
 * micro-batch be appended before its attention runs without overwriting a key that an earlier
 * query of the same batch still sees (the oldest key query p needs is p - window + 1). */
#ifndef STP_KV_CACHE_H
#define STP_KV_CACHE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "model/model_config.h"
#include "util/stp_err.h"

typedef struct kv_layer {
    float *k; /* (cap, n_head_kv*head_dim); NULL in a float16 cache */
    float *v;
    uint16_t *kh; /* (cap, n_head_kv*head_dim) IEEE half; NULL in a float32 cache */
    uint16_t *vh;
    int cap;    /* slots */
    int window; /* 0: full attention */
} kv_layer;

typedef struct kv_cache {
    int n_layer;
    int n_ctx;
    int kv_dim; /* n_head_kv * head_dim */
    bool f16;
    kv_layer *layers;
    size_t bytes;
} kv_cache;

int kv_cache_new(kv_cache **out, const model_config *cfg, int n_ctx, int n_ubatch, bool f16,
                 stp_err *err);
/* "f32" or "f16" -> *f16; STP_EINVAL (with the accepted names) otherwise. */
int kv_cache_parse_type(const char *s, bool *f16, stp_err *err);
void kv_cache_destroy(kv_cache **self_p);
/* Slot of position pos in layer l. */
static inline int kv_cache_slot(const kv_layer *l, int pos) {
    return pos % l->cap;
}

#endif
