/* pipe_backend: the multi-sequence backend (common/gen/backend.h) over the pipeline's attention
 * worker, so the coordinator runs the same scheduler (common/gen/sched.h) as `stpipe serve
 * --model`.
 *
 * eval sends one EvalRequest (proto/eval.proto) with one EvalSeq per entry, pos0 = what the
 * backend believes the slot holds (after seq_keep, which is local: the next eval's pos0 tells the
 * worker), and reads each entry's last logits from the activation region at the reply's offset.
 * The conversation with the attention worker lives here: heartbeats (Ping/Pong, MDP style), the
 * eval timeout, "busy" retries, retries after a peer failure behind the worker, and the KV
 * rebuild after a restart: the backend keeps every slot's evaluated token ids and, once the
 * worker has lost its caches (a Pong from a new pid, an ERANGE answer, a peer failure), the next
 * eval replays every non-empty slot from position 0 together with its new tokens (batched prefill
 * gives the same bits as decoding, so requests complete with the same ids).
 *
 * The worker's shape (slots, positions per slot, micro-batch) comes from its Pong (Pong.n_seq,
 * n_ctx, n_ubatch) when it says, else from the coordinator's own --parallel, --ctx-size and
 * --ubatch (stpipe-up gives every stage the same); pipe_backend_new waits for the first Pong.
 *
 * eval blocks until its reply; while it waits it calls the caller's wait hook (the coordinator
 * answers its clients' Pings and queues their messages there). Between evals the caller polls
 * pipe_backend_socket and calls pipe_backend_idle (Pongs, heartbeats, stale replies). */
#ifndef STP_PIPE_BACKEND_H
#define STP_PIPE_BACKEND_H

#include <stdbool.h>

#include "gen/backend.h"
#include "model/model.h"
#include "stats/stats.h"

typedef struct pipe_backend_params {
    const char *run_dir;
    const char *model_path; /* the GGUF: config, tokenizer (owned by the backend) */
    void *zctx;             /* zmq context (not owned) */
    int hb_ms;              /* heartbeat interval (> 0) */
    int n_ctx;              /* used when the worker does not say (Pong.n_ctx 0): 0 = model's */
    int n_ubatch;           /* the same for the micro-batch: 0 = 512 */
    int n_seq;              /* the same for the slots (--parallel, which stpipe-up gives every
                               stage): 0 = 1 */
    stats *st;              /* counters and latencies (not owned; may be NULL) */
    const char *stage;      /* log prefix */
    /* Called while eval waits (at least every 100 ms, and when wait_sock is readable); may be
     * NULL. It must not call into the backend. */
    void (*wait_fn)(void *ud);
    void *wait_ud;
    void *wait_sock; /* polled beside attn.sock while waiting (may be NULL) */
} pipe_backend_params;

/* Opens the model's config and tokenizer, connects to attn.sock and waits for the worker's first
 * Pong (until it comes or stage_stopping(): STP_EINTR). */
int pipe_backend_new(backend **out, const pipe_backend_params *p, stp_err *err);

/* The DEALER socket to the attention worker (poll it; then call pipe_backend_idle). */
void *pipe_backend_socket(backend *b);
/* Between evals: reads what the worker sent (Pongs, late replies), pings it when due. */
void pipe_backend_idle(backend *b);
/* The model's configuration. */
const model_config *pipe_backend_config(const backend *b);

/* Evaluates n tokens on seq with every row's logits (all: n x n_vocab floats), one EvalSeq with
 * all_logits (prompt logits for --logits-out). */
int pipe_backend_eval_all(backend *b, int seq, const int32_t *tokens, int n, float *all,
                          stp_err *err);

/* Cumulative milliseconds the attention worker spent waiting on other stages (EvalReply.ipc_ms),
 * summed over evals, and the count of evals. */
double pipe_backend_ipc_ms(const backend *b);

#endif
