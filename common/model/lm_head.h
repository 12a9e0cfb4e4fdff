/* lm_head: an optional sparse LM head. A cheap predictor picks C candidate vocabulary rows, the
 * exact logits are computed for those rows only; every other row gets -INFINITY, so no sampler
 * can pick it.
 *
 * Why: the full head, output (n_vocab x n_embd) · hn, reads the whole output matrix per decoded
 * token, the largest single read of a decode step of the small SmallThinker (151936 rows). The
 * model authors' engine (PowerInfer's smallthinker/, `sparse_lmhead.cpp`) ships a *trained*
 * predictor in their own GGUF (`lm_head_profiler`: two Q4_0 matrices, n_embd -> h -> n_vocab,
 * no activation between, a row is computed when its score > 0, the others are left at 0, batch
 * 1 only). Standard GGUF files carry no such tensor, so this head builds its predictor at load
 * time from the output matrix itself and needs no training:
 *
 *   sketch: per row r, the sign bits of its n_embd weights and s_r = mean |w_r| (1 bit a
 *           weight: an eighth of the bytes of F32, ~2/9 of Q4_0's 4.5 bits);
 *   score:  s_r * sum_j x_j * sign(w_rj), with x rounded to 5-bit integers (one scale), as
 *           integer table lookups (4 sign bits index a 16-entry table of +-x sums: AVX2
 *           pshufb, 32 rows per step) -- exact integer sums, the same on every kernel level;
 *   pick:   the C rows of largest score (ties to the lower id);
 *   exact:  those C rows through the engine's own row-subset product (ops_mm_run with rows),
 *           the same activation rounding and kernel as the full head, so a candidate's logit
 *           has the full head's bits.
 *
 * Sign quantization keeps the direction of every row, whatever the weights: on Gaussian-like
 * rows the sketch score correlates with the exact logit at about sqrt(2/pi) ~ 0.8, so the true
 * top tokens land inside a top-C list a few hundred long. A low-rank sketch would not work on
 * random test weights (flat spectrum); on trained weights the authors' trained predictor is
 * sharper than this one, and activation outliers (a few very large hidden dimensions) make the
 * single 5-bit scale coarse for the other dimensions: measure agreement on a real model before
 * relying on small C. Off by default (C = 0: the engine uses forward_head, today's bits).
 * Only the last token's logits of an eval use it (all_logits keeps the full head). */
#ifndef STP_LM_HEAD_H
#define STP_LM_HEAD_H

#include <stddef.h>
#include <stdint.h>

#include "model/model.h"
#include "model/ops.h"

typedef struct lm_head lm_head;

/* Builds the sketch of m->output (split over cc->tp). n_candidates in 1..n_vocab. */
int lm_head_new(lm_head **out, const compute_ctx *cc, const model *m, int n_candidates,
                stp_err *err);
void lm_head_destroy(lm_head **self_p);

/* Candidate count C and the sketch's bytes (read once per token). */
int lm_head_candidates(const lm_head *h);
size_t lm_head_bytes(const lm_head *h);

/* The predictor alone: the C candidate rows for hidden state x (n_embd, before the final norm),
 * ascending, into rows (C ints); fills the internal score buffer. Returns C. */
int lm_head_predict(lm_head *h, const compute_ctx *cc, const float *x, int32_t *rows);

/* logits (n_vocab) for hidden state x (n_embd): the full head's value on the C predicted rows,
 * -INFINITY elsewhere. Same contract as forward_head otherwise. */
void lm_head_eval(lm_head *h, const compute_ctx *cc, const float *x, float *logits);

/* Sketch scores of the last lm_head_predict/lm_head_eval (n_vocab floats), for tests and the
 * agreement tool. */
const float *lm_head_scores(const lm_head *h);

/* One group of 32 rows' integer sign-sketch sums (exposed for the kernel test): bits is the
 * group's (n_embd/8) x 32 bytes, tab the (n_embd/8) x 2 x 32 lookup tables; out[32]. */
void lm_head_group_scores_ref(const uint8_t *bits, const uint8_t *tab, int n_embd, int32_t *out);
void lm_head_group_scores_avx2(const uint8_t *bits, const uint8_t *tab, int n_embd, int32_t *out);

#endif
