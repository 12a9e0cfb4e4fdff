/* genmodel: the random-weight SmallThinker GGUF generator behind `stpipe-genmodel`.
 *
 * A model is fully described by gm_config (shape, dtype, init knobs, seed); the same config gives
 * byte-identical files whatever the thread count, because every slice of rows draws from its own
 * RNG stream keyed by (seed, tensor name, slice index). Tensors are generated, quantized and
 * streamed one slice batch at a time, so memory stays small for any model size.
 * See tools/genmodel/README.md. */
#ifndef STP_GENMODEL_H
#define STP_GENMODEL_H

#include <stdbool.h>
#include <stdint.h>

#include "gguf/gguf.h"
#include "util/stp_err.h"

typedef enum gm_gating {
    GM_GATING_NONE = 0,
    GM_GATING_SOFTMAX = 1,
    GM_GATING_SIGMOID = 2
} gm_gating;
typedef enum gm_init { GM_INIT_UNIT = 0, GM_INIT_NORMAL = 1 } gm_init;

typedef struct gm_config {
    char preset[16];
    char name[128]; /* general.name; "" = derived from preset and seed */
    uint32_t n_layer, n_embd, n_head, n_head_kv, head_dim;
    uint32_t n_expert, n_expert_used, n_ff_exp, n_vocab, n_ctx;
    gm_gating gating;
    uint32_t sliding_window; /* 0 = key omitted */
    bool tied;               /* true = no output.weight */
    stp_type dtype;          /* every matrix; norms and router stay F32 */
    uint64_t seed;
    float rope_base, rms_eps;
    /* init knobs; NaN = "derive the default from the shape" (gm_config_finalize) */
    gm_init init;
    float gain, qk_gain, router_gain, embd_scale, output_scale, norm_noise, skew;
    /* ReGLU activity: 0 = symmetric gates (about half the neurons idle, any input); B > 0 gives
     * every token embedding a shared direction u and moves every expert gate row against it,
     * so a neuron idles more often: P(idle) ~ Phi(B * cos(h, u)) (README "Idle neurons") */
    float idle_bias;
    bool vocab_only;
    const char *tokenizer_json; /* NULL = synthetic byte-level BPE */
    const char *out;            /* NULL = write nothing (only --report-routing) */
    bool report_routing;
    int threads;
} gm_config;

/* Vocabulary: n tokens with types, plus merges ("left right"), special ids. */
typedef struct gm_vocab {
    char **tokens;  /* (n) UTF-8 strings, owned */
    int32_t *types; /* (n) 1 normal, 3 control, 4 user defined, 5 unused */
    uint32_t n;
    char **merges; /* (n_merges) owned */
    uint32_t n_merges;
    uint32_t bos, eos, pad;
    bool chat_template; /* write the ChatML template */
} gm_vocab;

/* Fills cfg with a preset ("tiny", "4b", "21b"); knobs left NaN. */
int gm_config_preset(gm_config *cfg, const char *preset, stp_err *err);
/* Derives unset knobs from the shape and checks the shape against the dtype. */
int gm_config_finalize(gm_config *cfg, stp_err *err);

/* Synthetic byte-level BPE: 256 byte tokens, merges, then 3 control tokens at the end. */
int gm_vocab_synth(gm_vocab *v, uint32_t n_vocab, stp_err *err);
/* Hugging Face tokenizer.json import, padded to n_vocab with [PAD<id>] tokens. */
int gm_vocab_from_hf(gm_vocab *v, const char *path, uint32_t n_vocab, stp_err *err);
void gm_vocab_fini(gm_vocab *v);

/* Writes cfg->out (unless NULL) and prints the routing report if asked. */
int gm_run(const gm_config *cfg, stp_err *err);

#endif
