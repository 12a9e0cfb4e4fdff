/* storage: the storage daemon's logic. It owns the expert weights: at start it copies every
 * (layer, expert)'s gate | up | down matrices from the GGUF into the weight pool (shm.h), then
 * answers router decisions with the residency (offset, generation, ready) of each expert the
 * layer needs. In this version every expert stays resident; a streaming daemon keeps the same
 * protocol and answers once the reads are done. */
#ifndef STP_STORAGE_H
#define STP_STORAGE_H

#include "msg/stage.h"

typedef struct storage storage;

int storage_new(storage **out, const stage_opts *o, stp_err *err);
/* Serves until SIGINT/SIGTERM; 0 on a clean stop. */
int storage_run(storage *s, stp_err *err);
void storage_destroy(storage **self_p);

#endif
