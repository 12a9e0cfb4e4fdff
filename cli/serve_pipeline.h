/* serve_pipeline: runs `stpipe serve --pipeline RUN_DIR`'s generation jobs on the pipeline's
 * coordinator instead of a local scheduler. A job is a sched_req (common/gen/sched.h: prompt
 * ids, gen_params with sampling, stop strings and max_tokens, emit, done, cancel flag); submit
 * sends it as a GenerateRequest on client.sock (pipe_client.h), the coordinator's TokenEvents
 * become emit calls, its GenerateDone a gen_result for done (finish, counts, ids, text, timings).
 * A raised cancel flag, or emit returning nonzero, sends a CancelRequest (the answer then ends
 * with GEN_FINISH_CANCEL at the coordinator's next token). The coordinator batches the jobs
 * (continuous batching over the attention worker's slots); this side only forwards.
 *
 * Also: serve_pipeline_info asks the coordinator (a Ping) for its model file and context, for
 * the HTTP side's tokenizer and limits.
 * Not thread-safe: one thread (the HTTP server's worker) submits, steps and gets the callbacks,
 * which run inside serve_pipeline_step and serve_pipeline_destroy. */
#ifndef STP_SERVE_PIPELINE_H
#define STP_SERVE_PIPELINE_H

#include <stdbool.h>

#include "gen/sched.h"

typedef struct serve_pipeline serve_pipeline;

int serve_pipeline_new(serve_pipeline **out, const char *run_dir, stp_err *err);
/* Ends every job still running (done with GEN_FINISH_CANCEL, after a CancelRequest). */
void serve_pipeline_destroy(serve_pipeline **self_p);
/* Sends the job (prompt, stop strings copied). Fails (done not called) when out of memory or
 * the coordinator cannot be reached. */
int serve_pipeline_submit(serve_pipeline *s, const sched_req *r, stp_err *err);
bool serve_pipeline_busy(const serve_pipeline *s); /* jobs in flight */
int serve_pipeline_n_running(const serve_pipeline *s);
/* Waits up to timeout_ms for the coordinator's messages and runs the callbacks; forwards raised
 * cancel flags. Returns the number of messages handled. */
int serve_pipeline_step(serve_pipeline *s, int timeout_ms);

/* The coordinator's model file (absolute path), slots and positions per slot (its Pong), waiting
 * up to timeout_ms. */
int serve_pipeline_info(const char *run_dir, char *model, size_t cap, int *n_seq, int *n_ctx,
                        int timeout_ms, stp_err *err);

#endif
