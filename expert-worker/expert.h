/* expert: the expert worker's logic. Given layer l and a list of experts (with their pool
 * offsets), it computes, for every (token, k) slot whose selected expert is in the list,
 * y = down_e · (relu(gate_e · h_t) * (up_e · h_t)) into the activation region by the
 * in-process engine's own function (expert_ffn_run, tokens grouped by expert in token order)
 * over the pool slots' images, so outputs are bit-identical. What is its own: the message loop,
 * validation, the pool and region mappings. The attention worker sums the outputs in k order. */
#ifndef STP_EXPERT_H
#define STP_EXPERT_H

#include "msg/stage.h"

typedef struct expert_worker expert_worker;

int expert_worker_new(expert_worker **out, const stage_opts *o, stp_err *err);
int expert_worker_run(expert_worker *w, stp_err *err);
void expert_worker_destroy(expert_worker **self_p);

#endif
