/* stpipe-storage-daemon: owns the expert weights in a shared-memory pool and answers residency
 * questions (see README.md). Thin shell over storage.c. */
#include <stdio.h>

#include "msg/stage.h"
#include "storage.h"

int main(int argc, char **argv) {
    stage_opts o;
    stp_err err = {0};
    if (stage_parse(&o, argc, argv, "storage-daemon", &err) ||
        stage_setup(&o, "storage-daemon", &err)) {
        fprintf(stderr, "stpipe-storage-daemon: %s\n", err.msg);
        return 2;
    }
    storage *s = NULL;
    int rc = storage_new(&s, &o, &err);
    if (!rc) rc = storage_run(s, &err);
    storage_destroy(&s);
    if (rc) fprintf(stderr, "stpipe-storage-daemon: %s\n", err.msg);
    return rc ? 1 : 0;
}
