/* coordinator: the pipeline's front door. It owns the tokenizer, the chat template and sampling;
 * clients (`stpipe generate/chat/serve --pipeline`) talk to it on client.sock (many clients,
 * many requests each), and it runs their requests together with the continuous-batching
 * scheduler (common/gen/sched.h) over the attention worker's sequence slots (pipe_backend.h).
 * Up to --queue requests beyond the slots wait (then "busy"). Logits are read from the
 * activation region (read-only mapping), never copied through a socket. */
#ifndef STP_COORDINATOR_H
#define STP_COORDINATOR_H

#include "msg/stage.h"

typedef struct coordinator coordinator;

int coordinator_new(coordinator **out, const stage_opts *o, stp_err *err);
/* Connects to the attention worker (waits for its first Pong), then serves until SIGTERM. */
int coordinator_run(coordinator *c, stp_err *err);
void coordinator_destroy(coordinator **self_p);

#endif
