/* engine: the in-process SmallThinker forward pass (reference engine and `stpipe generate`).
 *
 * One engine holds n_seq sequences (slots), each with its KV caches (full for global layers, a
 * ring of the window for sliding-window layers), scratch activations for a micro-batch of tokens,
 * and a thread team. engine_eval appends tokens to sequence 0 at positions n_past.. and returns
 * logits; engine_eval_batch appends tokens to several sequences in one pass (continuous
 * batching: the weights are read once for all of them). The layer loop is
 * forward.h's, with moe_forward as its expert seam; the attention worker runs the same loop with
 * the expert workers as the seam, so both give the same bits. */
#ifndef STP_ENGINE_H
#define STP_ENGINE_H

#include <stdbool.h>
#include <stdint.h>

#include "model/kv_cache.h"
#include "model/model.h"

typedef struct engine_params {
    int n_threads;    /* team size (>= 1) */
    int n_ctx;        /* context length in tokens; 0 = min(model's, 4096) */
    int n_ubatch;     /* tokens per forward micro-batch; 0 = 512 */
    kv_dtype kv_type; /* KV cache f32 (0), f16 or q8_0 (llama.cpp's -ctk/-ctv) */
    int n_seq;        /* sequences (slots), each with n_ctx positions; 0 = 1 */
    bool dense_down;  /* disable the neuron-sparse down layout (for comparisons) */
    bool no_packing;  /* keep every matrix in the file's layout (for comparisons) */
    bool lazy;        /* build packed/neuron-major images on first use instead of at load */
    int sparse_head_candidates; /* 0: full LM head; else the sparse head's C rows (lm_head.h) */
    model_progress_fn progress; /* optional: reports the load-time image building */
    void *progress_ud;
} engine_params;

typedef struct engine_stats {
    uint64_t tokens;         /* tokens evaluated */
    uint64_t neurons_total;  /* expert neurons evaluated (token x expert x n_ff) */
    uint64_t neurons_active; /* of which relu(gate) > 0 */
    uint64_t down_neurons;   /* neurons whose `down` column was read (sparse down skips the rest) */
    uint64_t ns_embed, ns_router, ns_attn, ns_moe, ns_head; /* time per stage, nanoseconds */
} engine_stats;

typedef struct engine engine;

int engine_new(engine **out, const model *m, const engine_params *p, stp_err *err);
void engine_destroy(engine **self_p);

/* Evaluates n tokens at positions n_past..n_past+n-1. logits receives n x n_vocab floats when
 * all_logits, else n_vocab floats for the last token (may be NULL). Fails with STP_ERANGE when
 * the context would overflow (nothing is changed then). */
int engine_eval(engine *e, const int32_t *tokens, int n, float *logits, bool all_logits,
                stp_err *err);
void engine_reset(engine *e);       /* forget every sequence (KV caches emptied) */
int engine_n_past(const engine *e); /* of sequence 0 */
int engine_n_ctx(const engine *e);  /* positions per sequence */

/* One sequence's part of a batched evaluation. */
typedef struct engine_seq_eval {
    int seq;               /* 0..n_seq-1; each sequence at most once per call */
    const int32_t *tokens; /* appended at the sequence's positions n_past.. */
    int n;                 /* >= 1 */
    float *logits;         /* n_vocab logits of the last token, or NULL */
    /* 0: every layer. Else this entry is a prompt chunk taken a few layers a step (so that the
     * sequences decoding beside it are not held for the whole chunk): it runs from where the
     * last call for seq stopped (layer 0 the first time) to layer `upto` (exclusive, at most
     * n_layer); its hidden states wait in the engine between calls, which pass the same tokens
     * and n (forward_part). Its positions are taken, and logits written, at the call that
     * reaches n_layer. It must be the batch's last entry and fit in one micro-batch with the
     * others. A plain entry for seq, engine_seq_keep, or an entry with upto for another
     * sequence (the engine keeps one chunk part way) drops a chunk part way. */
    int upto;
    int from; /* with upto: the layers the caller saw done (0 the first time); when the engine
               * holds something else for seq, the chunk starts again at layer 0 */
} engine_seq_eval;

/* Evaluates every entry's tokens in one pass per micro-batch (entries are packed into
 * micro-batches of n_ubatch tokens in order; an entry may be split). Each token's result is the
 * same whatever else is in the batch (a micro-batch runs attention per sequence and every other
 * step row by row). Checks everything first (STP_EINVAL for a bad or repeated seq, STP_ERANGE for
 * a full context or a bad token id): on an error nothing has changed. */
int engine_eval_batch(engine *e, const engine_seq_eval *b, int n_b, stp_err *err);
int engine_n_seq(const engine *e);
int engine_n_ubatch(const engine *e);
/* Layers of a chunk already run for seq (engine_seq_eval.upto; 0: none pending). */
int engine_seq_layers_done(const engine *e, int seq);
int engine_seq_n_past(const engine *e, int seq);
/* Keeps the first n_keep positions of sequence seq (n_keep <= n_past) so that a request sharing
 * that prefix evaluates only the rest. Sliding-window rings may already have overwritten keys
 * the next position needs (kv_cache_keep_max): then less is kept (0). Returns what was kept. */
int engine_seq_keep(engine *e, int seq, int n_keep);
size_t engine_kv_bytes(const engine *e);
size_t engine_scratch_bytes(const engine *e);
const engine_stats *engine_get_stats(const engine *e);
/* The last evaluated token's final hidden state (n_embd, before the output norm; the LM head's
 * input), valid until the next eval; NULL before the first. */
const float *engine_last_hidden(const engine *e);
void engine_reset_stats(engine *e);

#endif
