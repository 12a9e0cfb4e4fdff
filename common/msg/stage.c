/* stage: options, pinning, signals and run-directory names shared by every stage; see stage.h. */
#include "msg/stage.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <numa.h>
#include <zmq.h>

#include "model/kv_cache.h"
#include "opt/opt.h"
#include "util/threadpool.h"

/* The only mutable file-scope state: written by the signal handler, read by the main loop. */
static volatile sig_atomic_t s_stop;

static void s_on_signal(int sig) {
    (void)sig;
    s_stop = 1;
}

bool stage_stopping(void) {
    return s_stop != 0;
}

static int s_cache_type(const char *v, void *field, stp_err *err) {
    return kv_cache_parse_type(v, (kv_dtype *)field, err);
}

#define F(x) offsetof(stage_opts, x)
/* Every stage takes every common option; a stage ignores what it does not use. */
static const opt_def s_opts[] = {
    {"--run-dir", NULL, OPT_STR, 0, 0, NULL, "DIR", "run directory (sockets, ready files)",
     F(run_dir), NULL, NULL},
    {"--model", NULL, OPT_STR, 0, 0, NULL, "FILE", "GGUF model", F(model), NULL, NULL},
    {"--threads", NULL, OPT_INT, 1, 256, "1", "N", "compute threads", F(threads), NULL, NULL},
    {"--cpus", NULL, OPT_STR, 0, 0, NULL, "LIST", "pin to these cores (0-3,6)", F(cpus), NULL,
     NULL},
    {"--numa-node", NULL, OPT_INT, -1, 1023, "-1", "N", "bind to a NUMA node (-1: none)",
     F(numa_node), NULL, NULL},
    {"--index", NULL, OPT_INT, 0, 255, "0", "I", "expert worker index", F(index), NULL, NULL},
    {"--workers", NULL, OPT_INT, 1, 64, "1", "N", "number of expert workers", F(workers), NULL,
     NULL},
    {"--ctx-size", NULL, OPT_INT, 0, 1 << 24, "0", "N", "context (0: min(train, 4096))", F(n_ctx),
     NULL, NULL},
    {"--ubatch", NULL, OPT_INT, 0, 1 << 16, "0", "N", "micro-batch (0: 512)", F(n_ubatch), NULL,
     NULL},
    {"--cache-type", NULL, OPT_FN, 0, 0, "f16", "f32|f16|q8_0", "KV cache type", F(kv_type),
     s_cache_type, NULL},
    {"--parent-pid", NULL, OPT_INT, 0, INT32_MAX, "0", "PID", "supervisor (0: unknown)",
     F(parent_pid), NULL, NULL},
    {"--queue", NULL, OPT_INT, 0, 4096, "0", "N", "coordinator: queued requests (0: 8)", F(queue),
     NULL, NULL},
    {"--heartbeat-ms", NULL, OPT_INT, 50, 60000, "0", "N",
     "heartbeat interval (0: RUN_DIR/heartbeat_ms or 1000)", F(heartbeat_ms), NULL, NULL},
    {"--bind-tcp", NULL, OPT_STR, 0, 0, NULL, "PORT|ADDR:PORT", "coordinator: also serve on tcp",
     F(bind_tcp), NULL, NULL},
    {"--pin-threads", NULL, OPT_FLAG, 0, 0, NULL, NULL,
     "pin compute thread i to the stage's i-th core (expert worker I: from I x threads on)",
     F(pin_threads), NULL, NULL},
    {"--bind-public", NULL, OPT_FLAG, 0, 0, NULL, NULL, "allow a wildcard --bind-tcp address",
     F(bind_public), NULL, NULL},
    {"--prefetch", "STP_PREFETCH", OPT_INT, -1, 1024, "-1", "N",
     "attn-worker: experts sent ahead per layer (-1: n_expert_used, 0: off)", F(prefetch), NULL,
     NULL},
    {"--parallel", NULL, OPT_INT, 1, 256, "4", "N",
     "attn-worker: sequence slots, each with its KV cache (the daemon's plan counts them)",
     F(n_seq), NULL, NULL},
    {"--kv-pool", NULL, OPT_INT, 0, 1 << 24, "0", "N",
     "KV positions all slots hold at once (coordinator: scheduler; storage: plan); 0: "
     "parallel x ctx-size",
     F(kv_pool), NULL, NULL},
    {"--prefill-layers", NULL, OPT_INT, -1, 4096, "0", "N",
     "coordinator: while requests decode, a prompt chunk runs N layers a step (0: the model's "
     "layers / 16, rounded up; -1: the whole chunk in one step)",
     F(prefill_layers), NULL, NULL},
    {"--verbose", NULL, OPT_FLAG, 0, 0, NULL, NULL, "log more", F(verbose), NULL, NULL},
};
#undef F
#define S_NOPTS (sizeof s_opts / sizeof s_opts[0])

bool stage_wants_help(int argc, char **argv, const char *stage, const char *extra) {
    for (int i = 1; i < argc; i++)
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            printf("usage: stpipe-%s --run-dir DIR --model FILE [options]\noptions:\n", stage);
            opt_help(s_opts, S_NOPTS, stdout);
            if (extra) fputs(extra, stdout);
            printf("Started by deploy/stpipe-up (see deploy/README.md); not meant to be run by "
                   "hand.\n");
            return true;
        }
    return false;
}

int stage_parse(stage_opts *o, int argc, char **argv, const char *stage, stp_err *err) {
    memset(o, 0, sizeof *o);
    for (int i = 1; i < argc; i++)
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h"))
            return stp_err_set(err, STP_EINVAL,
                               "usage: stpipe-%s --run-dir DIR --model FILE "
                               "[options] (--help lists them)",
                               stage);
    int rc = opt_parse(s_opts, S_NOPTS, o, &argc, argv, 0, err);
    if (rc) return rc;
    if (!o->run_dir || !o->model)
        return stp_err_set(err, STP_EINVAL, "--run-dir and --model are required (see --help)");
    if (!o->heartbeat_ms) o->heartbeat_ms = stage_heartbeat_ms(o->run_dir);
    return 0;
}

int stage_pin(const char *cpus, int numa_node, stp_err *err) {
    if (cpus && *cpus) {
        cpu_set_t set;
        CPU_ZERO(&set);
        const char *p = cpus;
        while (*p) {
            char *end;
            long a = strtol(p, &end, 10), b = a;
            if (end == p || a < 0 || a >= CPU_SETSIZE) goto bad;
            p = end;
            if (*p == '-') {
                b = strtol(p + 1, &end, 10);
                if (end == p + 1 || b < a || b >= CPU_SETSIZE) goto bad;
                p = end;
            }
            for (long c = a; c <= b; c++)
                CPU_SET((int)c, &set);
            if (*p == ',')
                p++;
            else if (*p)
                goto bad;
        }
        if (sched_setaffinity(0, sizeof set, &set))
            return stp_err_set(err, STP_EINVAL, "--cpus %s: sched_setaffinity: %s", cpus,
                               strerror(errno));
    }
    if (numa_node >= 0) {
        if (numa_available() < 0) {
            if (numa_node != 0)
                return stp_err_set(err, STP_EINVAL, "--numa-node %d: no NUMA support here",
                                   numa_node);
            return 0; /* node 0 is the whole machine */
        }
        if (numa_node > numa_max_node())
            return stp_err_set(err, STP_EINVAL, "--numa-node %d: this machine has nodes 0..%d",
                               numa_node, numa_max_node());
        if (!cpus && numa_run_on_node(numa_node))
            return stp_err_set(err, STP_EINVAL, "--numa-node %d: %s", numa_node, strerror(errno));
        numa_set_preferred(numa_node);
    }
    return 0;
bad:
    return stp_err_set(err, STP_EINVAL, "--cpus '%s': expected a list like 0-3,6", cpus);
}

/* The stage's cores as they were before stage_pin_threads pinned the calling thread to one:
 * the cores its team is placed on, and the mask every thread started later (ZeroMQ's, the
 * heartbeat) gets back. */
static cpu_set_t s_stage_cpus;
static bool s_pinned;

typedef struct pin_section {
    int n, first;       /* cores in s_stage_cpus; the core index of thread 0 */
    _Atomic int failed; /* an errno */
} pin_section;

static void s_pin_worker(void *p, int ith, int nth) {
    (void)nth;
    pin_section *s = p;
    int k = (s->first + ith) % s->n, c = 0; /* the k-th core of the stage's, counting from 0 */
    while (!CPU_ISSET(c, &s_stage_cpus) || k--)
        c++;
    cpu_set_t one;
    CPU_ZERO(&one);
    CPU_SET(c, &one);
    if (sched_setaffinity(0, sizeof one, &one)) atomic_store(&s->failed, errno); /* this thread */
}

int stage_pin_threads(const stage_opts *o, threadpool *tp, int first, stp_err *err) {
    if (!o->pin_threads || !tp) return 0;
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set)) {
        /* a kernel with more CPUs than cpu_set_t holds: the threads stay where they are */
        fprintf(stderr, "--pin-threads: sched_getaffinity: %s; threads not pinned\n",
                strerror(errno));
        return 0;
    }
    s_stage_cpus = set;
    s_pinned = true;
    pin_section s = {.n = CPU_COUNT(&set), .first = first < 0 ? 0 : first};
    atomic_init(&s.failed, 0);
    threadpool_run(tp, s_pin_worker, &s);
    const int e = atomic_load(&s.failed);
    if (e) return stp_err_set(err, STP_EINVAL, "--pin-threads: sched_setaffinity: %s", strerror(e));
    return 0;
}

int stage_zmq_affinity(void *zctx) {
    if (!s_pinned || !zctx) return 0;
    for (int c = 0; c < CPU_SETSIZE; c++)
        if (CPU_ISSET(c, &s_stage_cpus) && zmq_ctx_set(zctx, ZMQ_THREAD_AFFINITY_CPU_ADD, c))
            return -1;
    return 0;
}

int stage_setup(const stage_opts *o, const char *stage, stp_err *err) {
    prctl(PR_SET_PDEATHSIG, SIGTERM);
    if (o->parent_pid > 0 && getppid() != o->parent_pid)
        return stp_err_set(err, STP_EPEER, "%s: the supervisor (pid %d) is gone", stage,
                           o->parent_pid);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = s_on_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
    return stage_pin(o->cpus, o->numa_node, err);
}

int stage_heartbeat_ms(const char *run_dir) {
    char path[PATH_MAX];
    snprintf(path, sizeof path, "%s/heartbeat_ms", run_dir);
    FILE *f = fopen(path, "r");
    int ms = 0;
    if (f) {
        if (fscanf(f, "%d", &ms) != 1) ms = 0;
        fclose(f);
    }
    return ms >= 50 && ms <= 60000 ? ms : STAGE_HEARTBEAT_MS_DEF;
}

/* The heartbeat thread's state: owned (and freed) by the thread. */
typedef struct heartbeat {
    char path[PATH_MAX];
    long ms;
} heartbeat;

/* Touches the ready file every interval until the stage stops or the file is gone (removed by
 * stage_unready, or by the supervisor's clean-up). SIGSTOP freezes this thread with the rest of
 * the process, which is what the supervisor detects. */
static void *s_heartbeat(void *arg) {
    heartbeat *h = arg;
    while (!s_stop) {
        struct timespec ts = {h->ms / 1000, (h->ms % 1000) * 1000000L};
        nanosleep(&ts, NULL);
        if (utimensat(AT_FDCWD, h->path, NULL, 0) && errno == ENOENT) break;
    }
    free(h);
    return NULL;
}

int stage_ready(const char *run_dir, const char *name, stp_err *err) {
    char path[PATH_MAX], tmp[PATH_MAX + 8];
    snprintf(path, sizeof path, "%s/%s.ready", run_dir, name);
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    FILE *f = fopen(tmp, "w");
    if (!f) return stp_err_set(err, STP_EIO, "cannot write %s: %s", tmp, strerror(errno));
    fprintf(f, "%d\n", (int)getpid());
    fclose(f);
    if (rename(tmp, path))
        return stp_err_set(err, STP_EIO, "cannot write %s: %s", path, strerror(errno));
    heartbeat *h = malloc(sizeof *h);
    if (!h) return stp_err_set(err, STP_ENOMEM, "out of memory");
    snprintf(h->path, sizeof h->path, "%s", path);
    h->ms = stage_heartbeat_ms(run_dir);
    pthread_t t;
    pthread_attr_t at;
    pthread_attr_init(&at);
    pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&at, 256 * 1024);
    if (s_pinned) /* not the one core of the thread starting it (stage_pin_threads) */
        pthread_attr_setaffinity_np(&at, sizeof s_stage_cpus, &s_stage_cpus);
    sigset_t block, old; /* signals go to the main thread, whose zmq_poll they interrupt */
    sigemptyset(&block);
    sigaddset(&block, SIGINT);
    sigaddset(&block, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &block, &old);
    int rc = pthread_create(&t, &at, s_heartbeat, h);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    pthread_attr_destroy(&at);
    if (rc) {
        free(h);
        return stp_err_set(err, STP_EIO, "heartbeat thread: %s", strerror(rc));
    }
    return 0;
}

void stage_unready(const char *run_dir, const char *name) {
    char path[PATH_MAX];
    snprintf(path, sizeof path, "%s/%s.ready", run_dir, name);
    unlink(path);
}

int stage_shm_name(char *out, size_t cap, const char *run_dir, const char *what, stp_err *err) {
    char path[PATH_MAX], prefix[128] = "";
    snprintf(path, sizeof path, "%s/shm_prefix", run_dir);
    FILE *f = fopen(path, "r");
    if (f) {
        if (!fgets(prefix, sizeof prefix, f)) prefix[0] = 0;
        fclose(f);
        prefix[strcspn(prefix, "\r\n")] = 0;
        for (char *c = prefix; *c; c++)
            if (*c == '/') *c = '_';
    }
    if (!prefix[0]) {
        char real[PATH_MAX];
        if (!realpath(run_dir, real))
            return stp_err_set(err, STP_EIO, "run dir %s: %s", run_dir, strerror(errno));
        uint64_t h = 1469598103934665603ull; /* FNV-1a */
        for (const char *c = real; *c; c++)
            h = (h ^ (uint8_t)*c) * 1099511628211ull;
        snprintf(prefix, sizeof prefix, "stp-%016llx", (unsigned long long)h);
    }
    int n = snprintf(out, cap, "/%s-%s", prefix, what);
    if (n < 0 || (size_t)n >= cap) return stp_err_set(err, STP_EINVAL, "shm name too long");
    return 0;
}

void stage_log(const char *stage, const char *fmt, ...) {
    char buf[1200];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    fprintf(stderr, "stpipe-%s[%d]: %s\n", stage, (int)getpid(), buf);
}
