/* stpipe-coordinator: tokenizer, sampling and the client API of the pipeline (see README.md).
 * Thin shell over coordinator.c. */
#include <stdio.h>

#include "coordinator.h"
#include "msg/stage.h"

int main(int argc, char **argv) {
    if (stage_wants_help(argc, argv, "coordinator", NULL)) return 0;
    stage_opts o;
    stp_err err = {0};
    if (stage_parse(&o, argc, argv, "coordinator", &err) || stage_setup(&o, "coordinator", &err)) {
        fprintf(stderr, "stpipe-coordinator: %s\n", err.msg);
        return 2;
    }
    coordinator *c = NULL;
    int rc = coordinator_new(&c, &o, &err);
    if (!rc) rc = coordinator_run(c, &err);
    coordinator_destroy(&c);
    if (rc) fprintf(stderr, "stpipe-coordinator: %s\n", err.msg);
    return rc ? 1 : 0;
}
