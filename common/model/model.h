/* model: a SmallThinker GGUF file opened for inference: config plus views of every weight.
 *
 * Weights stay in the read-only mapping of the file (no copy); a tensor_view names a matrix
 * (or a stack of expert matrices) and how to step through its rows. model_open checks every
 * tensor's presence, shape and type against the config, so the forward pass never has to.
 * Norm vectors are converted to float once (they are F32 in every known file). */
#ifndef STP_MODEL_H
#define STP_MODEL_H

#include <stddef.h>
#include <stdint.h>

#include "gguf/gguf.h"
#include "model/model_config.h"
#include "util/arena.h"
#include "util/threadpool.h"

typedef struct tensor_view {
    char name[64]; /* GGUF tensor name, for messages */
    const uint8_t *data;
    stp_type type;
    int64_t n_cols; /* ne[0]: elements per row (the contiguous, reduced dimension) */
    int64_t n_rows; /* ne[1]: output rows */
    int64_t n_mat;  /* ne[2]: matrices stacked (experts), 1 otherwise */
    size_t row_bytes;
    size_t mat_bytes;    /* row_bytes * n_rows */
    uint8_t **packed;    /* (n_mat) row-interleaved Q4_0 images (kern q4_0x16), built on first use
                          * when packing is enabled and the matrix qualifies; else NULL */
    struct model *owner; /* the model whose arena holds the images and counts their bytes */
} tensor_view;

typedef struct layer_weights {
    const float *attn_norm; /* (n_embd) */
    const float *ffn_norm;  /* (n_embd) */
    tensor_view wq;         /* (n_head*head_dim rows, n_embd cols) */
    tensor_view wk, wv;     /* (n_head_kv*head_dim, n_embd) */
    tensor_view wo;         /* (n_embd, n_head*head_dim) */
    tensor_view router;     /* (n_expert, n_embd) ffn_gate_inp */
    tensor_view gate_exps;  /* (n_expert) x (n_ff_exp, n_embd) */
    tensor_view up_exps;    /* (n_expert) x (n_ff_exp, n_embd) */
    tensor_view down_exps;  /* (n_expert) x (n_embd, n_ff_exp) */
} layer_weights;

typedef struct model {
    gguf_file *gguf;
    model_config cfg;
    char warning[512];        /* non-fatal note from loading ("" if none) */
    tensor_view tok_embd;     /* (n_vocab, n_embd) */
    tensor_view output;       /* LM head: output.weight, or tok_embd when tied */
    const float *output_norm; /* (n_embd) */
    layer_weights *layers;    /* (n_layer) */
    float *owned_norms;       /* converted norm vectors when not stored as F32 */
    size_t weight_bytes;      /* all tensor bytes */
    size_t expert_bytes;      /* the gate/up/down expert stacks */
    size_t packed_bytes;      /* row-interleaved images built so far */
    arena *images;            /* where they live (2 MiB pages; util/arena.h), once packing is on */
} model;

int model_open(model **out, const char *path, stp_err *err);
void model_close(model **self_p);

/* Lets the Q4_0 matrices the decoder streams most (attention, expert gate, LM head) be used in
 * the row-interleaved layout of kern's q4_0x16 kernels (same values, same results, faster).
 * Images are built on first use by model_packed; the file pages they replace are released.
 * A no-op on CPUs without SIMD kernels. */
enum { MODEL_PACK_ATTN = 1, MODEL_PACK_HEAD = 2, MODEL_PACK_GATE = 4, MODEL_PACK_ALL = 7 };
int model_enable_packing(model *m, int which, stp_err *err);
/* The packed image of matrix `mat` of t, building it now if needed (not thread-safe: call it
 * before handing work to a thread team); NULL if t is not packed. */
const uint8_t *model_packed(const tensor_view *t, int64_t mat);
size_t model_packed_bytes(const model *m);
/* Releases the whole pages of [p, p + n) of the file mapping from this process (they stay in the
 * page cache): called once a re-laid-out image has replaced them. */
void model_release_pages(const uint8_t *p, size_t n);
/* Progress of a long load step: frac in [0, 1]; called from the caller's thread. */
typedef void (*model_progress_fn)(void *ud, const char *what, double frac);

/* Builds every packed image now, split over the team (load time instead of first use).
 * progress may be NULL. */
int model_pack_all(model *m, threadpool *tp, model_progress_fn progress, void *ud, stp_err *err);

/* Maps in now (page tables filled, read from disk if the page cache lost them) the file pages
 * the decoder reads in place: every layer's expert `up` stack (the matrices neither packed nor
 * re-laid out). A token touches a few experts of each layer, so without this the first tokens
 * of a run fault the rest in one by one, reading the disk mid-generation after another program
 * pushed them out of the page cache. Advice only: a failure leaves them to fault in as before. */
void model_populate(const model *m, model_progress_fn progress, void *ud);

#endif
