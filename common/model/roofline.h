/* roofline: the bytes one decoded token reads, per stage of the forward pass, from the model's
 * tensors and the engine's counters, so `stpipe bench` can set each stage's time against the
 * host's read bandwidth (util/membw.h).
 *
 * Counted: every weight matrix a stage streams for one token (attention: wq, wk, wv, wo and the
 * K and V rows it attends, honouring sliding windows; router: ffn_gate_inp; experts: gate of the
 * n_expert_used chosen experts, up only for the rows the engine computed (relu(gate) > 0), down
 * for the neurons it counted (neuron-sparse decode) or all of them (dense); LM head: output).
 * Left out: norm vectors (n_embd floats), activations, KV writes. See model/README.md. */
#ifndef STP_ROOFLINE_H
#define STP_ROOFLINE_H

#include "model/engine.h"
#include "model/model.h"

typedef enum roofline_stage {
    ROOFLINE_ATTN,    /* weights + KV reads */
    ROOFLINE_ROUTER,  /* ffn_gate_inp */
    ROOFLINE_EXPERTS, /* gate, up, down of the chosen experts */
    ROOFLINE_HEAD,    /* output (LM head) */
    ROOFLINE_N
} roofline_stage;

typedef struct roofline_bytes {
    double stage[ROOFLINE_N]; /* bytes read per token */
    double attn_kv;           /* of stage[ROOFLINE_ATTN], the K and V rows */
} roofline_bytes;

/* Bytes per token of a decode of n tokens, one per step, at positions pos0..pos0+n-1 (each with
 * its LM head). kv_elem_bytes: bytes per cached element (4 for f32, 2 for f16, 34/32 for q8_0).
 * st: the engine's counters over one or more such runs (its neuron counts are divided by
 * st->tokens). */
void roofline_decode_bytes(const model *m, int pos0, int n, double kv_elem_bytes,
                           const engine_stats *st, roofline_bytes *out);
/* Short name of a stage ("attention", "router", "experts", "lm_head"). */
const char *roofline_stage_name(roofline_stage s);

#endif
