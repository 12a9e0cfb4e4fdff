/* model_config: SmallThinker hyper-parameters read from GGUF metadata.
 *
 * Follows llama.cpp's reading of the `smallthinker.*` keys (docs/ARCHITECTURE.md, and
 * ../shared/docs/smallthinker.md §3): gating from expert_gating_func (absent: sigmoid for 32
 * experts, softmax for 64, with a warning); attention.sliding_window present means layers
 * il % 4 == 0 are NoPE + full attention and the others RoPE + the window. */
#ifndef STP_MODEL_CONFIG_H
#define STP_MODEL_CONFIG_H

#include <stdbool.h>
#include <stdint.h>

#include "gguf/gguf.h"

#define STP_MAX_EXPERTS 256   /* real models have 32 or 64 */
#define STP_MAX_HEAD_DIM 1024 /* real models have 128 */

typedef enum model_gating { GATING_SOFTMAX = 1, GATING_SIGMOID = 2 } model_gating;

typedef struct model_config {
    int n_layer;
    int n_embd;
    int n_head;
    int n_head_kv;
    int head_dim; /* attention.key_length (== value_length) */
    int n_vocab;
    int n_ctx_train;
    int n_expert;
    int n_expert_used;
    int n_ff_exp; /* expert_feed_forward_length */
    float rope_base;
    float rms_eps;
    model_gating gating;
    bool gating_guessed; /* expert_gating_func was absent */
    int sliding_window;  /* 0: every layer RoPE + full attention */
    int nope_step;       /* layers il % nope_step == 0 are NoPE + full (4 when windowed) */
    bool tied;           /* no output.weight: token_embd is the LM head */
} model_config;

/* Reads and checks the hyper-parameters; refuses other architectures. warn (may be NULL) gets
 * a message when a default was applied (e.g. gating guessed). */
int model_config_load(model_config *cfg, const gguf_file *g, char *warn, size_t warn_cap,
                      stp_err *err);

/* Layer il applies RoPE (false on NoPE layers of windowed models). */
bool model_config_layer_rope(const model_config *cfg, int il);
/* Window of layer il in positions; 0 means full causal attention. */
int model_config_layer_window(const model_config *cfg, int il);

#endif
