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
 * 3. <run_dir>/<stage>.ready holds the pid once the stage serves; it is removed on a clean exit.
 * 4. Liveness: from stage_ready on, a heartbeat thread touches <stage>.ready (mtime) every
 *    heartbeat interval (RUN_DIR/heartbeat_ms, written by deploy/stpipe-up; default 1000 ms). A
 *    stopped or frozen process stops touching it; the supervisor kills a stage whose file is
 *    older than STAGE_LIVENESS intervals and restarts it, as after a crash. */
#ifndef STP_STAGE_H
/* Spin of a stage's compute team before sleeping: short, since between sections the cores are
 * needed by the other stages (shorter than the thread pool's default decoded faster on 2 cores:
 * docs/BENCHMARKS.md). */
#define STAGE_SPIN_NS 20000L
/* How long a compute thread woken by the other stage handing its core over spins for its next
 * section (threadpool_set_handoff): the other stage's dispatch or reply takes 10-40 us. */
#define STAGE_HANDOFF_NS 100000L
#define STP_STAGE_H

#include <stdbool.h>
#include <stddef.h>

#include "model/kv_cache.h"
#include "util/stp_err.h"
#include "util/threadpool.h"

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
    kv_dtype kv_type; /* --cache-type f32|f16|q8_0 (attention worker; the daemon's plan) */
    int parent_pid;   /* 0: unknown */
    int queue;        /* coordinator: queued requests before "busy" (0: 8) */
    bool verbose;
    int heartbeat_ms;     /* peer heartbeat interval (0: RUN_DIR/heartbeat_ms or 1000) */
    const char *bind_tcp; /* coordinator: also serve clients on tcp (PORT or ADDR:PORT) */
    bool bind_public;     /* allow a wildcard address in bind_tcp (0.0.0.0, *, ::) */
    int prefetch; /* attn-worker: experts sent ahead per layer (-1: n_expert_used; STP_PREFETCH) */
    int n_seq;    /* --parallel: the attention worker's sequence slots, each with its KV cache
                   * (the storage daemon's plan counts them) */
    int kv_pool;  /* --kv-pool: KV positions all slots hold at once (the coordinator's scheduler
                   * keeps to it, the daemon's plan reserves it); 0: n_seq x n_ctx */
    bool pin_threads;   /* --pin-threads: each compute thread on one core (stage_pin_threads) */
    int prefill_layers; /* --prefill-layers: sched_params.prefill_layers of the coordinator */
} stage_opts;

#define STAGE_LIVENESS 3            /* missed heartbeats before a peer counts as dead */
#define STAGE_HEARTBEAT_MS_DEF 1000 /* default heartbeat interval */

/* Parses the common options (the table in stage.c, common/opt: defaults, then the environment,
 * then argv); unknown ones are an error. Returns 0, or STP_EINVAL (message in
 * err); "--help" gives STP_EINVAL with the usage text. */
int stage_parse(stage_opts *o, int argc, char **argv, const char *stage, stp_err *err);
/* True (after printing the usage to stdout, with extra lines for stage-specific options) when
 * argv asks for --help or -h: the process then exits 0. */
bool stage_wants_help(int argc, char **argv, const char *stage, const char *extra);

/* Death signal, parent check, SIGINT/SIGTERM handlers (set the stop flag), SIGPIPE ignored,
 * then pinning. */
int stage_setup(const stage_opts *o, const char *stage, stp_err *err);

/* True once SIGINT/SIGTERM arrived (the one process-wide flag: a signal handler can set nothing
 * else). */
bool stage_stopping(void);

/* Applies --cpus (sched_setaffinity) and --numa-node (libnuma: run on the node's cores, allocate
 * from its memory; a no-op but accepted on single-node machines). */
int stage_pin(const char *cpus, int numa_node, stp_err *err);

/* --pin-threads: thread i of the team tp (the caller is thread 0) runs on core first + i of the
 * cores the calling thread may use (the stage's --cpus or --numa-node, else what it inherited),
 * counting round. Stages that hand the same cores back and forth (the attention worker's team,
 * expert worker I's threads from I x threads on) then meet on fixed cores: with the same core
 * list for both, each core holds one thread of each, and a woken thread finds its core where it
 * left it. Threads started afterwards get the stage's cores back, not their creator's one:
 * stage_ready's heartbeat here, ZeroMQ's through stage_zmq_affinity. No-op (0) when not asked
 * for or tp is NULL; a mask that cannot be read (more CPUs than cpu_set_t) leaves the threads
 * where they are, with a warning. */
int stage_pin_threads(const stage_opts *o, threadpool *tp, int first, stp_err *err);
/* Gives a ZeroMQ context's threads the stage's cores (ZMQ_THREAD_AFFINITY_CPU_ADD) when
 * stage_pin_threads pinned this thread; call before its first socket. 0, or -1 (errno). */
int stage_zmq_affinity(void *zctx);

/* Writes <run_dir>/<name>.ready (the pid) and starts the liveness heartbeat (invariant 4). */
int stage_ready(const char *run_dir, const char *name, stp_err *err);

/* The heartbeat interval of a run: RUN_DIR/heartbeat_ms when present (50..60000), else 1000. */
int stage_heartbeat_ms(const char *run_dir);
void stage_unready(const char *run_dir, const char *name);

/* "/<prefix>-<what>" for a shared-memory segment of this run. */
int stage_shm_name(char *out, size_t cap, const char *run_dir, const char *what, stp_err *err);

/* Logs "stpipe-<stage>[pid]: message" to stderr. */
void stage_log(const char *stage, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#endif
