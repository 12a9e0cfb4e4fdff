/* gen_loop: the generation loop shared by `stpipe chat` and `stpipe serve`: evaluate the prompt
 * tokens on a backend, then sample, stream text, evaluate, until end of generation, a stop
 * string, max tokens, a full context or cancellation.
 *
 * The prompt is appended to whatever the backend already holds (the chat keeps its KV cache
 * across turns); the caller resets the backend for a fresh sequence. On return the backend
 * holds the prompt and every generated token except the last one sampled (never evaluated):
 * gen_result.ids lets the caller append it next time. Text is streamed in valid UTF-8 chunks,
 * with any text that could still become a stop string held back until it cannot. */
#ifndef STP_GEN_LOOP_H
#define STP_GEN_LOOP_H

#include <signal.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "gen/backend.h"
#include "model/sampler.h"

typedef enum gen_finish {
    GEN_FINISH_STOP = 0,   /* end-of-generation token or a stop string */
    GEN_FINISH_LENGTH = 1, /* max_tokens reached or the context is full */
    GEN_FINISH_CANCEL = 2, /* the cancel flag was raised or emit asked to stop */
} gen_finish;

typedef struct gen_params {
    sampler_params sp;
    int max_tokens;          /* <= 0: until the context is full */
    const char *const *stop; /* stop strings (not included in the output) */
    int n_stop;
    bool ignore_eos; /* keep going past end-of-generation tokens */
} gen_params;

/* Receives each chunk of new text (valid UTF-8, len > 0). Returns nonzero to cancel. */
typedef int (*gen_emit_fn)(void *ud, const char *text, size_t len);

typedef struct gen_result {
    gen_finish finish;
    int n_prompt; /* prompt tokens (evaluated, or found in the cache: n_cached of them) */
    int n_cached; /* prompt tokens a scheduler found in its slot's cache (prefix reuse) */
    int n_gen;    /* tokens sampled (including an end-of-generation token) */
    int32_t *ids; /* n_gen sampled ids (malloc'd) */
    char *text;   /* the whole answer (stop string cut off), NUL-terminated, malloc'd */
    size_t len;
    double t_prompt; /* seconds evaluating the prompt */
    double t_gen;    /* seconds from the first sampled token to the last */
    double t_first;  /* seconds from the call to the first token streamed (or sampled) */
} gen_result;

/* Runs the loop (n_prompt >= 1). cancel (may be NULL) is polled before each token. Fails
 * (negative STP_E*, err filled) if the prompt does not fit in the context (STP_ERANGE) or the
 * backend fails; res is valid for gen_result_fini either way. */
int gen_run(backend *b, const int32_t *prompt, int n_prompt, const gen_params *p, gen_emit_fn emit,
            void *ud, const volatile sig_atomic_t *cancel, gen_result *res, stp_err *err);
void gen_result_fini(gen_result *res);

/* Seconds on the monotonic clock. */
double gen_now(void);

#endif
