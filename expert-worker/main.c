/* stpipe-expert-worker: computes routed experts for the attention worker from the shared weight
 * pool (see README.md). Thin shell over expert.c. */
#include <stdio.h>

#include "expert.h"
#include "msg/stage.h"

int main(int argc, char **argv) {
    if (stage_wants_help(argc, argv, "expert-worker", NULL)) return 0;
    stage_opts o;
    stp_err err = {0};
    if (stage_parse(&o, argc, argv, "expert-worker", &err) ||
        stage_setup(&o, "expert-worker", &err)) {
        fprintf(stderr, "stpipe-expert-worker: %s\n", err.msg);
        return 2;
    }
    expert_worker *w = NULL;
    int rc = expert_worker_new(&w, &o, &err);
    if (!rc) rc = expert_worker_run(w, &err);
    expert_worker_destroy(&w);
    if (rc) fprintf(stderr, "stpipe-expert-worker[%d]: %s\n", o.index, err.msg);
    return rc ? 1 : 0;
}
