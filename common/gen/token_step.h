/* token_step: one step of generation, the same for `stpipe generate`, chat, serve and the
 * coordinator process: logits -> the next id, the text to stream now and whether generation is
 * over (end-of-generation token, stop string, max tokens).
 *
 * A token_step is made per request and holds all of its state (sampler, detokenizer, the answer
 * text, what was streamed), so several run side by side. The caller owns the loop: it evaluates
 * the prompt, hands the prompt ids to token_step_prompt (repetition penalties), then calls
 * token_step_next on each logits row and evaluates out.id while out.finish is NONE. Limits the
 * step cannot see (a full context, cancellation) end the answer with token_step_end.
 *
 * Text: an end-of-generation id has none; other ids are detokenized in whole UTF-8 characters
 * (a character split across ids comes out with the id that completes it). Text that may still
 * be the start of a stop string is held back until it cannot; a stop string found is cut with
 * everything after it and never streamed. When the answer ends (a finish, or token_step_end),
 * the held text is released and an unfinished character at the end becomes U+FFFD (not after a
 * stop string). The streamed pieces concatenated are the answer text, token_step_text. */
#ifndef STP_TOKEN_STEP_H
#define STP_TOKEN_STEP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "model/sampler.h"
#include "tokenizer/tokenizer.h"
#include "util/stp_err.h"

typedef enum token_finish {
    TOKEN_FINISH_NONE = 0, /* go on: evaluate out.id and step again */
    TOKEN_FINISH_EOS,      /* an end-of-generation id (not with ignore_eos) */
    TOKEN_FINISH_STOP,     /* a stop string */
    TOKEN_FINISH_LENGTH,   /* max_tokens ids sampled */
} token_finish;

typedef struct token_step_params {
    sampler_params sp;
    int n_vocab;
    long long max_tokens;    /* < 0: no limit; 0: nothing is sampled */
    const char *const *stop; /* stop strings (copied; empty ones ignored) */
    int n_stop;
    bool ignore_eos;      /* an end-of-generation id does not finish (it still has no text) */
    const tokenizer *tok; /* end-of-generation ids and text; NULL: ids only, never eos */
    bool no_text;         /* ids only although tok is given (eos still recognised) */
} token_step_params;

typedef struct token_step_out {
    int32_t id;       /* the sampled id; -1 when none was (max_tokens reached, or finished) */
    bool eog;         /* id is an end-of-generation token */
    const char *text; /* text to stream now, whole UTF-8 characters; valid until the next call */
    size_t len;
    token_finish finish;
} token_step_out;

typedef struct token_step token_step;

int token_step_new(token_step **out, const token_step_params *p, stp_err *err);
void token_step_destroy(token_step **self_p);

/* Records prompt (or earlier) ids for the sampler's penalties. */
void token_step_prompt(token_step *s, const int32_t *ids, int n);
/* Samples from logits (modified by penalties) and accepts the id: token_step_accept. */
int token_step_next(token_step *s, float *logits, token_step_out *out);
/* The step for an id chosen elsewhere: penalties, eos, text, stop strings, max tokens. Once
 * finished, both calls return id -1, no text and the same finish. 0 or STP_ENOMEM. */
int token_step_accept(token_step *s, int32_t id, token_step_out *out);
/* Ends the answer where it is (the caller's limit): out gets the held text and the flushed
 * unfinished character; out->finish is the step's (NONE if it had not finished). */
int token_step_end(token_step *s, token_step_out *out);

/* The answer so far (stop string cut), NUL-terminated; streamed or not. */
const char *token_step_text(const token_step *s, size_t *len);
long long token_step_n_gen(const token_step *s); /* ids sampled or accepted */

#endif
