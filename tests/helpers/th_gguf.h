/* th_gguf: test helpers that build GGUF files for model, engine and CLI tests.
 *
 * th_gguf_copy rewrites an existing GGUF (typically a tiny model from tests/data) with edits:
 * keys dropped or replaced or added, one tensor dropped, reshaped or re-declared with another
 * type (its data then becomes deterministic bytes of the right size; F16/BF16 are converted).
 * th_model_write synthesises a small random-weight SmallThinker model of any shape (F32).
 * Paths: th_tmp_path names a file under $STP_TMP (created on first use), th_data_path one
 * under $STP_TEST_DATA. Compiled into every test executable, so everything is th_-prefixed. */
#ifndef TH_GGUF_H
#define TH_GGUF_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "gguf/gguf.h"

typedef enum th_kv_op { TH_KV_DROP = 1, TH_KV_U32, TH_KV_F32, TH_KV_STR } th_kv_op;

typedef struct th_kv_edit {
    const char *key;
    th_kv_op op;
    uint32_t u32;
    float f32;
    const char *str;
} th_kv_edit;

typedef struct th_copy_opts {
    const th_kv_edit *kv; /* applied in place; keys not in the source are appended */
    int n_kv;
    const char *drop_tensor;    /* NULL: none */
    const char *retype_tensor;  /* NULL: none */
    stp_type retype;            /* new type of retype_tensor */
    const char *reshape_tensor; /* NULL: none; new ne given in reshape_ne (same element count) */
    int64_t reshape_ne[4];
    uint32_t reshape_n_dims;
} th_copy_opts;

/* 0 on success, else a negative code with err filled. */
int th_gguf_copy(const char *src, const char *dst, const th_copy_opts *o, stp_err *err);

typedef struct th_model_spec {
    const char *arch; /* NULL: "smallthinker" */
    int n_layer, n_embd, n_head, n_head_kv, head_dim, n_expert, n_expert_used, n_ff, n_vocab;
    int n_ctx;                 /* head_dim <= 0: key/value_length absent (n_embd / n_head) */
    int gating;                /* 0: key absent, else the expert_gating_func value */
    int sliding_window;        /* 0: key absent */
    bool untied;               /* write output.weight */
    const char *retype_tensor; /* declare this tensor with retype (deterministic bytes) */
    stp_type retype;
    uint64_t seed;
} th_model_spec;

/* A spec for a 2-layer model with n_expert experts and small widths. */
th_model_spec th_model_spec_small(int n_expert);
int th_model_write(const char *path, const th_model_spec *s, stp_err *err);

/* Paths in static per-call-site buffers are avoided: callers pass buf/cap. */
const char *th_tmp_path(char *buf, size_t cap, const char *name);
const char *th_data_path(char *buf, size_t cap, const char *name);

/* Opens the model tests/data/<name> (the test fails, with the reason, when it cannot). */
struct model;
struct model *th_model_open(const char *name);

#endif
