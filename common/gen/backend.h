/* backend: what a generation loop needs from "something that turns tokens into logits".
 *
 * A backend holds n_seq sequences (KV caches, "slots"): eval appends tokens to one or more of
 * them in one pass (continuous batching: sched.h) and returns each one's last logits; seq_keep
 * cuts a sequence back to a prefix (0 forgets it). The in-process engine implements it
 * (backend_engine.c); the coordinator implements it over the attention worker
 * (coordinator/), so the same scheduler and generation loop run on either.
 * Not thread-safe: one caller at a time (the server's worker thread, the chat loop). */
#ifndef STP_BACKEND_H
#define STP_BACKEND_H

#include <stdint.h>

#include "model/engine.h"
#include "tokenizer/tokenizer.h"
#include "util/stp_err.h"

typedef struct backend backend;

/* One sequence's part of an evaluation: tokens appended at its positions n_past.., the last
 * one's n_vocab logits written to logits (NULL: none). The engine's own type. */
typedef engine_seq_eval backend_seq_eval;

typedef struct backend_ops {
    /* Evaluates every entry (each seq at most once) in one pass. A token's result does not
     * depend on the other entries. On an error nothing changed when the backend could check
     * first (STP_EINVAL, STP_ERANGE: context full); otherwise (a failed stage) the sequences in
     * q are left empty (n_past 0). */
    int (*eval)(backend *b, const backend_seq_eval *q, int n_q, stp_err *err);
    /* Keeps the first n_keep positions of seq (see engine_seq_keep); returns what was kept. */
    int (*seq_keep)(backend *b, int seq, int n_keep);
    int (*seq_n_past)(const backend *b, int seq);
    int (*n_seq)(const backend *b);
    int (*n_batch)(const backend *b); /* tokens one pass evaluates at most (the micro-batch) */
    int (*n_vocab)(const backend *b);
    int (*n_ctx)(const backend *b); /* positions per sequence */
    /* Cumulative stage timings and counters (engine_stats layout); NULL if not available. */
    const engine_stats *(*stats)(const backend *b);
    void (*destroy)(backend *b); /* frees everything the backend owns */
    /* Optional: the model's layers when eval takes a prompt chunk a few layers a call
     * (backend_seq_eval.upto); NULL: it does not. */
    int (*n_layer)(const backend *b);
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
    int n_seq;                  /* sequences (slots); 0: 1 */
    int sparse_head_candidates; /* 0: full LM head; else engine_params' sparse head C */
    model_progress_fn progress; /* optional: load-time image building (engine_params) */
} backend_engine_params;

/* The in-process engine: opens the GGUF, its tokenizer (required) and an engine. */
int backend_engine_new(backend **out, const backend_engine_params *p, stp_err *err);

/* Thin wrappers over the vtable; backend_eval, _reset and _n_past work on sequence 0 (the one
 * sequence of `stpipe chat`). */
static inline int backend_eval_batch(backend *b, const backend_seq_eval *q, int n_q, stp_err *err) {
    return b->ops->eval(b, q, n_q, err);
}
static inline int backend_eval(backend *b, const int32_t *t, int n, float *logits, stp_err *err) {
    const backend_seq_eval q = {0, t, n, logits, 0, 0};
    return b->ops->eval(b, &q, 1, err);
}
static inline void backend_reset(backend *b) {
    b->ops->seq_keep(b, 0, 0);
}
static inline int backend_seq_keep(backend *b, int seq, int n_keep) {
    return b->ops->seq_keep(b, seq, n_keep);
}
/* Layers a prompt chunk can be split over (backend_seq_eval.upto), or 0 when it cannot. */
static inline int backend_n_layer(const backend *b) {
    return b->ops->n_layer ? b->ops->n_layer(b) : 0;
}
static inline int backend_seq_n_past(const backend *b, int seq) {
    return b->ops->seq_n_past(b, seq);
}
static inline int backend_n_seq(const backend *b) {
    return b->ops->n_seq(b);
}
static inline int backend_n_batch(const backend *b) {
    return b->ops->n_batch(b);
}
static inline int backend_n_vocab(const backend *b) {
    return b->ops->n_vocab(b);
}
static inline int backend_n_ctx(const backend *b) {
    return b->ops->n_ctx(b);
}
static inline int backend_n_past(const backend *b) {
    return b->ops->seq_n_past(b, 0);
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
