/* backend: what a generation loop needs from "something that turns tokens into logits".
 *
 * A backend holds one sequence (a KV cache): eval appends tokens at positions n_past.. and
 * returns the last token's logits; reset forgets the sequence. The in-process engine implements
 * it (backend_engine.c); a pipeline backend (coordinator + workers) can implement the same
 * vtable later, so `stpipe chat` and `stpipe serve` need no change to use it.
 * Not thread-safe: one caller at a time (the server's worker thread, the chat loop). */
#ifndef STP_BACKEND_H
#define STP_BACKEND_H

#include <stdint.h>

#include "model/engine.h"
#include "tokenizer/tokenizer.h"
#include "util/stp_err.h"

typedef struct backend backend;

typedef struct backend_ops {
    /* Evaluates n tokens at n_past..n_past+n-1; writes n_vocab logits of the last one to
     * logits_out (may be NULL). STP_ERANGE (nothing changed) when the context would overflow. */
    int (*eval)(backend *b, const int32_t *tokens, int n, float *logits_out, stp_err *err);
    void (*reset)(backend *b); /* empty the sequence (n_past = 0) */
    int (*n_vocab)(const backend *b);
    int (*n_ctx)(const backend *b);
    int (*n_past)(const backend *b);
    /* Cumulative stage timings and counters (engine_stats layout); NULL if not available. */
    const engine_stats *(*stats)(const backend *b);
    void (*destroy)(backend *b); /* frees everything the backend owns */
} backend_ops;

/* Every implementation starts its struct with this header. */
struct backend {
    const backend_ops *ops;
    const tokenizer *tok; /* owned by the backend; NULL if the model has no usable tokenizer */
    char name[128];       /* model name shown to users (file name without .gguf) */
    char warning[512];    /* non-fatal note from loading ("" if none) */
};

typedef struct backend_engine_params {
    const char *model_path;
    int n_threads;              /* >= 1 */
    int n_ctx;                  /* 0: min(model's, 4096) */
    kv_dtype kv_type;           /* KV cache f32 (0), f16, q8_0 */
    int sparse_head_candidates; /* 0: full LM head; else engine_params' sparse head C */
} backend_engine_params;

/* The in-process engine: opens the GGUF, its tokenizer (required) and an engine. */
int backend_engine_new(backend **out, const backend_engine_params *p, stp_err *err);

/* Thin wrappers over the vtable. */
static inline int backend_eval(backend *b, const int32_t *t, int n, float *logits, stp_err *err) {
    return b->ops->eval(b, t, n, logits, err);
}
static inline void backend_reset(backend *b) {
    b->ops->reset(b);
}
static inline int backend_n_vocab(const backend *b) {
    return b->ops->n_vocab(b);
}
static inline int backend_n_ctx(const backend *b) {
    return b->ops->n_ctx(b);
}
static inline int backend_n_past(const backend *b) {
    return b->ops->n_past(b);
}
static inline const engine_stats *backend_stats(const backend *b) {
    return b->ops->stats ? b->ops->stats(b) : NULL;
}
/* Destroys *self_p (NULL allowed) and clears the pointer. */
static inline void backend_destroy(backend **self_p) {
    if (self_p && *self_p) {
        (*self_p)->ops->destroy(*self_p);
        *self_p = NULL;
    }
}

#endif
