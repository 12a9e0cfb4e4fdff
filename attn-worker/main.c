/* stpipe-attn-worker: embeddings, attention, KV cache, router and LM head of the pipeline (see
 * README.md). Thin shell over attn.c. */
#include <stdio.h>

#include "attn.h"
#include "msg/stage.h"

int main(int argc, char **argv) {
    if (stage_wants_help(argc, argv, "attn-worker", NULL)) return 0;
    stage_opts o;
    stp_err err = {0};
    if (stage_parse(&o, argc, argv, "attn-worker", &err) || stage_setup(&o, "attn-worker", &err)) {
        fprintf(stderr, "stpipe-attn-worker: %s\n", err.msg);
        return 2;
    }
    attn_worker *a = NULL;
    int rc = attn_worker_new(&a, &o, &err);
    if (!rc) rc = attn_worker_run(a, &err);
    attn_worker_destroy(&a);
    if (rc) fprintf(stderr, "stpipe-attn-worker: %s\n", err.msg);
    return rc ? 1 : 0;
}
