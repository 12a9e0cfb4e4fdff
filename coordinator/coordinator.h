/* coordinator: the pipeline's front door. It owns the tokenizer, the chat template, sampling and
 * the request queue; clients (`stpipe generate --pipeline`) talk to it on client.sock, and it
 * drives the attention worker one micro-batch (prompt) or token (decode) at a time on attn.sock.
 * One request runs at a time; up to --queue more wait (then "busy"). Logits of the last token
 * are read from the activation region (read-only mapping), never copied through a socket. */
#ifndef STP_COORDINATOR_H
#define STP_COORDINATOR_H

#include "msg/stage.h"

typedef struct coordinator coordinator;

int coordinator_new(coordinator **out, const stage_opts *o, stp_err *err);
int coordinator_run(coordinator *c, stp_err *err);
void coordinator_destroy(coordinator **self_p);

#endif
