/* pipe_client: the coordinator's client protocol (proto/client.proto) for several requests in
 * flight over one DEALER on RUN_DIR/client.sock (or tcp://HOST:PORT). `stpipe generate/chat
 * --pipeline` run one request on it, `stpipe serve --pipeline` many (cli_serve_pipeline.c).
 *
 * Liveness (MDP style): after hb ms without a message the client pings the coordinator, naming
 * its requests in turn; a coordinator silent for STAGE_LIVENESS intervals is dead
 * (pipe_client_poll fails every request, after sending each one's CancelRequest: a coordinator
 * that was only slow must not run them on for nobody), one that answers that it no longer knows a
 * request was restarted (that request fails). Silence counts only while a request is in flight: the
 * clock starts when the first one is submitted, so a caller may leave the client unpolled
 * while idle. A request ends exactly once: on_done or on_error.
 * Not thread-safe: one thread submits, cancels and polls. */
#ifndef STP_PIPE_CLIENT_H
#define STP_PIPE_CLIENT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "model/engine.h"
#include "model/sampler.h"
#include "tokenizer/tokenizer.h"
#include "util/stp_err.h"

typedef struct pipe_client pipe_client;

typedef struct pipe_client_req {
    const int32_t *prompt_ids; /* either ids ... */
    int n_prompt;
    const char *prompt_text; /* ... or text, tokenized by the coordinator */
    bool chat;               /* prompt_text is one user message: ChatML with system */
    const char *system;
    bool parse_special;
    const chat_msg *messages; /* ... or a conversation (ChatML, its text never special tokens) */
    size_t n_messages;
    long long n_predict; /* -1: until end of generation or a full context; 0: prompt only */
    sampler_params sp;
    bool ignore_eos, want_text, want_prompt_logits;
    int n_untimed;
    const char *const *stop;
    int n_stop;
} pipe_client_req;

/* What GenerateDone reported (times in ms). */
typedef struct pipe_client_done {
    int n_prompt, n_prompt_eval, n_gen;
    const int32_t *ids; /* n_gen ids; valid during the callback */
    double prompt_ms, gen_ms, ipc_ms, ttft_ms;
    /* the attention worker's evals from the first token on (GenerateDone): time per decode
     * stage and the expert workers' neuron counts (tokens: 0, GenerateDone does not say) */
    engine_stats stages;
    const char *stop_reason; /* "length", "context", "eog", "stop", "cancel" */
    const char *tail;        /* held-back text flushed at the end (may be empty) */
    size_t tail_len;
} pipe_client_done;

typedef struct pipe_client_cb {
    void (*on_text)(void *ud, uint64_t rid, const char *text, size_t len);
    /* rows [first_row, first_row + n_rows) of the prompt's logits, float32 */
    void (*on_logits)(void *ud, uint64_t rid, int first_row, int n_rows, int n_vocab,
                      const void *data, size_t len);
    void (*on_done)(void *ud, uint64_t rid, const pipe_client_done *d);
    void (*on_error)(void *ud, uint64_t rid, int code, const char *what);
    /* optional: the coordinator's Pong says it still runs rid (an answer without text, e.g.
     * ids only on a model without a tokenizer, streams no events) */
    void (*on_alive)(void *ud, uint64_t rid);
    void *ud;
} pipe_client_cb;

/* run_dir: a run directory, or tcp://HOST:PORT of a coordinator started with --bind-tcp. */
int pipe_client_new(pipe_client **out, const char *run_dir, const pipe_client_cb *cb, stp_err *err);
void pipe_client_destroy(pipe_client **self_p); /* cancels what is still in flight */

/* Sends a GenerateRequest; *rid is its request id (random). */
int pipe_client_submit(pipe_client *c, const pipe_client_req *r, uint64_t *rid, stp_err *err);
/* Sends a CancelRequest: the request ends at its next token with stop_reason "cancel". */
int pipe_client_cancel(pipe_client *c, uint64_t rid);
/* Waits up to timeout_ms for messages and runs the callbacks; pings when due. Returns 0, or
 * STP_ETIMEDOUT when the coordinator stopped answering (every request failed via on_error). */
int pipe_client_poll(pipe_client *c, int timeout_ms, stp_err *err);
int pipe_client_n_active(const pipe_client *c); /* requests in flight */
void *pipe_client_socket(pipe_client *c);       /* to poll beside other sockets */
int pipe_client_heartbeat_ms(const pipe_client *c);

#endif
