/* stage: what every pipeline process does the same way: command-line options, pinning (cores
 * and NUMA node), signals, dying with the supervisor, the ready file, and run-directory names
 * (sockets, shared-memory segments).
 *
 * Invariants:
 * 1. A stage exits when its supervisor dies: PR_SET_PDEATHSIG(SIGTERM), and a parent that is
 *    already gone at start-up is detected (getppid() differs from --parent-pid or is 1).
 * 2. Shared-memory names are "/<prefix>-<what>", prefix read from <run_dir>/shm_prefix (written
 *    by deploy/stpipe-up) or derived from the run directory's real path; the supervisor removes
 *    /dev/shm/<prefix>-* after any exit, so a crashed stage leaves nothing behind.
 * 3. <run_dir>/<stage>.ready holds the pid once the stage serves; it is removed on a clean exit. */
#ifndef STP_STAGE_H
#define STP_STAGE_H

#include <stdbool.h>
#include <stddef.h>

#include "util/stp_err.h"

typedef struct stage_opts {
    const char *run_dir;
    const char *model;
    const char *cpus; /* "0-3,6" or NULL */
    int numa_node;    /* -1: no binding */
    int threads;      /* compute threads (>= 1) */
    int index;        /* expert worker index */
    int workers;      /* number of expert workers (attn-worker) */
    int n_ctx;        /* 0: model default (min(train, 4096)) */
    int n_ubatch;     /* 0: 512 */
    int parent_pid;   /* 0: unknown */
    int queue;        /* coordinator: queued requests before "busy" (0: 8) */
    bool verbose;
} stage_opts;

/* Parses the common options; unknown ones are an error. Returns 0, or STP_EINVAL (message in
 * err); "--help" gives STP_EINVAL with the usage text. */
int stage_parse(stage_opts *o, int argc, char **argv, const char *stage, stp_err *err);

/* Death signal, parent check, SIGINT/SIGTERM handlers (set the stop flag), SIGPIPE ignored,
 * then pinning. */
int stage_setup(const stage_opts *o, const char *stage, stp_err *err);

/* True once SIGINT/SIGTERM arrived (the one process-wide flag: a signal handler can set nothing
 * else). */
bool stage_stopping(void);

/* Applies --cpus (sched_setaffinity) and --numa-node (libnuma: run on the node's cores, allocate
 * from its memory; a no-op but accepted on single-node machines). */
int stage_pin(const char *cpus, int numa_node, stp_err *err);

int stage_ready(const char *run_dir, const char *name, stp_err *err);
void stage_unready(const char *run_dir, const char *name);

/* "/<prefix>-<what>" for a shared-memory segment of this run. */
int stage_shm_name(char *out, size_t cap, const char *run_dir, const char *what, stp_err *err);

/* Logs "stpipe-<stage>[pid]: message" to stderr. */
void stage_log(const char *stage, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#endif
