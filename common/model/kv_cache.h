/* kv_cache: per-layer keys and values of one sequence, in float32 (as llama.cpp with -ctk f32,
 * the default: the golden data's setting), float16 (as llama.cpp's own default, -ctk f16: half
 * the memory, so a memory budget leaves more room to the expert cache; keys and values are
 * rounded to nearest even when stored and widened exactly when read) or Q8_0 (llama.cpp's
 * -ctk q8_0 -ctv q8_0: 34 bytes per 32 values, 27% of f32; each row quantized in blocks of 32
 * as ggml's CPU backend stores a Q8_0 cache row on x86, quantize_row_q8_0: d = fp16(amax/127),
 * q = round-half-even(x * 127/amax), the repo's Q8_0 activation quantizer; read back exactly as
 * d * q).
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

#include "kern/kern.h"
#include "model/model_config.h"
#include "util/stp_err.h"

typedef enum kv_dtype { KV_F32 = 0, KV_F16, KV_Q8_0 } kv_dtype;

typedef struct kv_layer {
    float *k; /* (cap, n_head_kv*head_dim); NULL unless a float32 cache */
    float *v;
    uint16_t *kh; /* (cap, n_head_kv*head_dim) IEEE half; NULL unless a float16 cache */
    uint16_t *vh;
    block_q8_0 *kq; /* (cap, n_head_kv*head_dim/32) blocks; NULL unless a Q8_0 cache */
    block_q8_0 *vq;
    int cap;          /* slots */
    int window;       /* 0: full attention */
    size_t map_bytes; /* bytes of each of its two buffers (anonymous mappings) */
} kv_layer;

typedef struct kv_cache {
    int n_layer;
    int n_ctx;
    int kv_dim; /* n_head_kv * head_dim */
    kv_dtype type;
    kv_layer *layers;
    size_t bytes;
} kv_cache;

/* Bytes of one slot's keys (or values) of kv_dim elements in type t (Q8_0: 34 per 32). */
static inline size_t kv_cache_row_bytes(kv_dtype t, int kv_dim) {
    switch (t) {
    case KV_F16: return (size_t)kv_dim * 2;
    case KV_Q8_0: return (size_t)(kv_dim / QK8_0) * sizeof(block_q8_0);
    default: return (size_t)kv_dim * 4;
    }
}

/* STP_EINVAL for a Q8_0 cache whose row (n_head_kv * head_dim) is not a multiple of 32. Blocks
 * run over the row as in ggml's cache tensor; with head_dim < 32 a block spans two KV heads
 * (llama.cpp refuses such a cache; the tiny test models have head_dim 16). */
int kv_cache_new(kv_cache **out, const model_config *cfg, int n_ctx, int n_ubatch, kv_dtype type,
                 stp_err *err);
/* "f32", "f16" or "q8_0" -> *type; STP_EINVAL (with the accepted names) otherwise. */
int kv_cache_parse_type(const char *s, kv_dtype *type, stp_err *err);
/* "f32", "f16", "q8_0". */
const char *kv_cache_type_name(kv_dtype type);
void kv_cache_destroy(kv_cache **self_p);
/* Slot of position pos in layer l. */
static inline int kv_cache_slot(const kv_layer *l, int pos) {
    return pos % l->cap;
}
/* Of a sequence holding positions 0..n_past-1, how many of the first n_keep can be kept so that
 * evaluation resumes at position n_keep: n_keep itself when every layer still holds the keys
 * positions n_keep.. will look at, else 0. Global layers hold every position. A sliding-window
 * ring of cap slots holds positions >= n_past - cap; the query at n_keep looks back to
 * n_keep - window + 1; so a ring allows n_keep when n_past <= cap or
 * n_keep - window + 1 >= n_past - cap (the prefix ends at most cap - window - 1 positions before
 * n_past). */
int kv_cache_keep_max(const kv_cache *c, int n_past, int n_keep);
/* Gives the memory of positions >= n_keep back to the system (whole pages; a sliding-window
 * ring only when nothing is kept): a sequence cut back by prefix reuse or emptied costs only
 * what it still holds. The cache's buffers are mapped lazily, so a position costs memory once
 * written. */
void kv_cache_release(kv_cache *c, int n_keep);
/* The most bytes n_seq caches of n_ctx positions take while they hold n_pos positions in all
 * (a global layer costs every position held; a sliding-window ring at most its cap per cache):
 * what the memory-budget plan reserves for a KV pool (n_seq = 1, n_pos = n_ctx: one full
 * cache, kv_cache_new's mappings). */
size_t kv_cache_pool_bytes(const model_config *cfg, int n_ctx, int n_ubatch, kv_dtype type,
                           int n_seq, long long n_pos);
/* Stores one position's keys and values (kv_dim floats each) in slot, converted to the cache
 * type (rounding as the header says). */
void kv_cache_store(const kv_cache *c, kv_layer *l, int slot, const float *k, const float *v);

#endif
