/* sampler: picks the next token from logits.
 *
 * Greedy when temperature <= 0: argmax, ties to the lowest id (as the golden data). Otherwise
 * the llama.cpp order: repetition/presence/frequency penalties over the last penalty_last_n
 * tokens, top-k, top-p, min-p, temperature, then a draw from a seeded generator (state kept in
 * the sampler, so a seed reproduces a run). */
#ifndef STP_SAMPLER_H
#define STP_SAMPLER_H

#include <stdbool.h>
#include <stdint.h>

#include "util/stp_err.h"

typedef struct sampler_params {
    float temperature;    /* <= 0: greedy */
    int top_k;            /* <= 0: off */
    float top_p;          /* >= 1: off */
    float min_p;          /* <= 0: off */
    float repeat_penalty; /* 1: off */
    float presence_penalty;
    float frequency_penalty;
    int penalty_last_n; /* tokens looked back for penalties */
    uint64_t seed;
} sampler_params;

void sampler_params_default(sampler_params *p); /* greedy, everything off */

typedef struct sampler sampler;

int sampler_new(sampler **out, const sampler_params *p, int n_vocab, stp_err *err);
void sampler_destroy(sampler **self_p);
/* Picks a token; logits may be modified (penalties). */
int32_t sampler_sample(sampler *s, float *logits);
/* Records a token for the penalties (prompt and generated tokens). */
void sampler_accept(sampler *s, int32_t id);
void sampler_reset(sampler *s);

/* Plain argmax, lowest id on ties, NaNs skipped (0 when logits[0] is NaN). */
int32_t sampler_argmax(const float *logits, int n);

#endif
