/* cli_bench: `stpipe bench`, llama-bench-style throughput of prompt processing (pp) and token
 * generation (tg), with repetitions (mean +- sd), peak memory, the per-stage time split and the
 * machine it ran on. Markdown by default, --json for scripts (built with jansson, so any model
 * path gives valid JSON). In-process engine, or a running pipeline (--pipeline RUN_DIR: the
 * coordinator's own prompt and generation times, the IPC share of decode and the summed PSS of
 * the stage processes). `-d LIST` runs every test after a prompt of that many tokens, as
 * llama-bench's -d: its time is not counted (decode speed falls with the context, so a figure
 * at an empty context alone hides the cost of attention over the cache). The header gives the
 * host's read bandwidth (util/membw.h, 1 and N threads) and the CPU steal of the run; each
 * in-process tg test is followed by its roofline: per decode stage the bytes read per token
 * (model/roofline.h) and the share of the bandwidth (the larger of the 1- and N-thread
 * figures) its measured time achieves. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <jansson.h>

#include "cli.h"
#include "cli_pipeline.h"
#include "kern/kern.h"
#include "model/attention.h"
#include "model/engine.h"
#include "model/roofline.h"
#include "msg/msg.h"
#include "util/membw.h"
#include "util/sysinfo.h"

typedef struct bench_result {
    char test[32];
    int n_tokens, depth;
    int pos0;        /* tg: the first position decoded (depth; depth + 1 through a pipeline) */
    double mean, sd; /* tokens per second */
    engine_stats st; /* accumulated over repetitions */
    int reps;
    bool tg;
    roofline_bytes rb; /* tg: bytes per token per stage */
    double wall_ms;    /* the timed part of every repetition, summed (the span st covers) */
} bench_result;

/* What the header reports beside the machine: the bandwidth test and the run's CPU steal. */
typedef struct bench_host {
    membw_result bw; /* gbps_n == 0: not measured */
    double roof;     /* the yardstick: max(gbps_1, gbps_n), 0 if not measured */
    sysinfo_cpu_time t0;
    double steal; /* share of the run's CPU time, 0..1 */
} bench_host;

static double s_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* A list of sizes ("64,512"): up to 16 integers in 0..2^20. */
typedef struct bench_list {
    int v[16];
    int n;
} bench_list;

static int s_list(const char *s, void *field, stp_err *err) {
    bench_list *l = field;
    l->n = 0;
    while (*s && l->n < 16) {
        char *end;
        long v = strtol(s, &end, 10);
        if (end == s || v < 0 || v > 1 << 20 || (*end && *end != ','))
            return stp_err_set(err, STP_EINVAL, "up to 16 integers in 0..1048576, commas between");
        l->v[l->n++] = (int)v;
        s = *end == ',' ? end + 1 : end;
    }
    return 0;
}

static int s_list_nonempty(const char *s, void *field, stp_err *err) {
    int rc = s_list(s, field, err);
    if (!rc && !((bench_list *)field)->n) rc = stp_err_set(err, STP_EINVAL, "at least one depth");
    return rc;
}

typedef struct bench_opts {
    const char *model, *pipeline;
    bool help, json;
    bench_list pp, tg, dp;
    int reps, threads, sparse_head, parallel;
    kv_dtype kv_type;
} bench_opts;

#define F(x) offsetof(bench_opts, x)
static const opt_def s_opts[] = {
    CLI_OPT_HELP(bench_opts),
    CLI_OPT_MODEL(bench_opts, "SmallThinker GGUF file"),
    CLI_OPT_PIPELINE(bench_opts, "time a running pipeline (deploy/stpipe-up) instead; prompts "
                                 "are random ids below 1000, or below the vocabulary with --model"),
    {"-p", NULL, OPT_FN, 0, 0, "64,512", "LIST", "prompt sizes to time (batched prefill)", F(pp),
     s_list, NULL},
    {"-n", NULL, OPT_FN, 0, 0, "128", "LIST", "generation lengths to time (one token per pass)",
     F(tg), s_list, NULL},
    {"-d", NULL, OPT_FN, 0, 0, "0", "LIST",
     "context depths: each test runs after a prompt of that many tokens, whose time is not "
     "counted (llama-bench's -d)",
     F(dp), s_list_nonempty, NULL},
    {"-r", NULL, OPT_INT, 1, 1000, "3", "N", "repetitions per test (mean +- sd)", F(reps), NULL,
     NULL},
    CLI_OPT_THREADS(bench_opts, "2",
                    "compute threads (in-process only) and threads of the bandwidth test"),
    CLI_OPT_CACHE_TYPE(bench_opts, "KV cache f32, f16 or q8_0 (with --pipeline: the type "
                                   "deploy/stpipe-up gave it, for the roofline's KV bytes)"),
    CLI_OPT_SPARSE_HEAD(bench_opts),
    {"--parallel", "-np", OPT_INT, 1, 64, "1", "N",
     "sequences at once (llama-batched-bench's -npl): each has its own depth prompt, a pp test "
     "evaluates N prompts in one batch, a tg test steps N sequences together; t/s counts every "
     "sequence's tokens. With --pipeline: N requests at once (at most the pipeline's slots), tg "
     "tests only",
     F(parallel), NULL, NULL},
    {"--json", NULL, OPT_FLAG, 0, 0, NULL, NULL, "machine-readable output", F(json), NULL, NULL},
};
#undef F

static void s_usage(FILE *f) {
    cli_opts_help(
        f,
        "usage: stpipe bench (--model FILE | --pipeline RUN_DIR) [-p 64,512] [-n 128] [-r 3]\n"
        "                    [-d 0,2048] [--threads N] [--cache-type f32|f16|q8_0]\n"
        "                    [--sparse-head C] [--parallel N] [--json]\n",
        s_opts, CLI_NOPTS(s_opts),
        "The header gives the CPU, its read bandwidth (a ~0.5 s test summing a buffer of\n"
        "4x the last-level cache, at least 256 MiB, on 1 and N threads, best of 5) and the\n"
        "CPU steal % of the run (/proc/stat). Each tg test is followed by its roofline:\n"
        "per decode stage (attention with its KV reads, router, experts, LM head) ms and\n"
        "MB read per token, the GB/s that makes and its share of the roofline, the larger\n"
        "of the two bandwidths (N threads can read at least as fast as one; a pass another\n"
        "process disturbed is slower). With --pipeline it needs --model (the pipeline's\n"
        "file, for the bytes); the stage times are the attention worker's, its experts\n"
        "stage the whole expert step (dispatch, the workers, the wait, the weighted sum).\n");
}

/* The name of a test, as llama-bench prints it: "tg128", "pp512 @ d2048". */
static void s_test_name(char *out, size_t cap, bool pp, int n, int depth, int P) {
    int k = depth > 0 ? snprintf(out, cap, "%s%d @ d%d", pp ? "pp" : "tg", n, depth)
                      : snprintf(out, cap, "%s%d", pp ? "pp" : "tg", n);
    if (P > 1 && k > 0 && (size_t)k < cap) snprintf(out + k, cap - (size_t)k, " x%d", P);
}

/* n tokens of each of the P sequences (sequence i's from toks + i * stride + off) in one batch;
 * logits (P, n_vocab) of each one's last token. */
static int s_eval_seqs(engine *e, int P, const int32_t *toks, int stride, int off, int n,
                       float *logits, int V, stp_err *err) {
    engine_seq_eval b[64];
    for (int i = 0; i < P; i++)
        b[i] =
            (engine_seq_eval){i, toks + (size_t)i * stride + off, n, logits + (size_t)i * V, 0, 0};
    return engine_eval_batch(e, b, P, err);
}

/* A JSON string of s; bytes that are not UTF-8 (a path may hold any) become '?'. */
static json_t *s_json_str(const char *s) {
    json_t *j = json_string(s);
    if (j) return j;
    char *c = strdup(s);
    if (!c) return json_null();
    for (unsigned char *p = (unsigned char *)c; *p; p++)
        if (*p >= 0x80) *p = '?';
    j = json_string(c);
    free(c);
    return j ? j : json_null();
}

/* The machine object of the JSON output (with the bandwidth test and the run's steal). */
static json_t *s_json_machine(const char *cpu, long ncpu, const char *level, const bench_host *h) {
    json_t *mach = json_object(), *bw = json_object();
    json_object_set_new(mach, "cpu", s_json_str(cpu));
    json_object_set_new(mach, "cores", json_integer(ncpu));
    json_object_set_new(mach, "simd", json_string(level));
    json_object_set_new(bw, "gbps_1_thread", json_real(h->bw.gbps_1));
    json_object_set_new(bw, "gbps_n_threads", json_real(h->bw.gbps_n));
    json_object_set_new(bw, "threads", json_integer(h->bw.n_threads));
    json_object_set_new(bw, "buffer_bytes", json_integer((json_int_t)h->bw.bytes));
    json_object_set_new(bw, "roofline_gbps", json_real(h->roof));
    json_object_set_new(mach, "read_bandwidth", bw);
    json_object_set_new(mach, "steal_share", json_real(h->steal));
    return mach;
}

/* What the bandwidth test's child process writes back through its pipe. */
typedef struct s_membw_reply {
    int rc;
    membw_result bw;
    char msg[sizeof(((stp_err *)0)->msg)];
} s_membw_reply;

/* The bandwidth test itself (in the child of s_host_begin). */
static int s_membw(int n_threads, membw_result *bw, stp_err *err) {
    threadpool *tp = NULL;
    int rc = threadpool_new(&tp, n_threads, err);
    if (!rc) rc = membw_measure(tp, 0, 5, bw, err);
    threadpool_destroy(&tp);
    return rc;
}

/* Measures the read bandwidth on 1 and n threads and starts the steal clock. The test runs in a
 * child process, so its buffer (256 MiB or more) stays out of the peak RSS reported for the
 * engine; called before any thread exists. A failure leaves the figures at 0 and says so on
 * stderr (the benchmark itself still runs). */
static void s_host_begin(bench_host *h, int n_threads) {
    memset(h, 0, sizeof *h);
    sysinfo_cpu_time_read(&h->t0);
    stp_err err = {0};
    int fd[2];
    pid_t pid = -1;
    if (pipe(fd) == 0) {
        fflush(NULL);
        pid = fork();
        if (pid == 0) {
            close(fd[0]);
            membw_result bw;
            int rc = s_membw(n_threads, &bw, &err);
            s_membw_reply msg = {.rc = rc, .bw = bw};
            snprintf(msg.msg, sizeof msg.msg, "%s", err.msg);
            ssize_t w = write(fd[1], &msg, sizeof msg);
            _exit(w == (ssize_t)sizeof msg ? 0 : 1);
        }
        close(fd[1]);
        if (pid > 0) {
            s_membw_reply msg;
            ssize_t n = read(fd[0], &msg, sizeof msg);
            waitpid(pid, NULL, 0);
            if (n == (ssize_t)sizeof msg && !msg.rc)
                h->bw = msg.bw;
            else
                fprintf(stderr, "stpipe bench: no bandwidth figure: %s\n",
                        n == (ssize_t)sizeof msg ? msg.msg : "the test process failed");
        }
        close(fd[0]);
    }
    if (pid < 0 && s_membw(n_threads, &h->bw, &err)) /* no pipe or fork: test in process */
        fprintf(stderr, "stpipe bench: no bandwidth figure: %s\n", err.msg);
    h->roof = h->bw.gbps_n > h->bw.gbps_1 ? h->bw.gbps_n : h->bw.gbps_1;
}

static void s_host_end(bench_host *h) {
    sysinfo_cpu_time t1;
    if (!sysinfo_cpu_time_read(&t1)) h->steal = sysinfo_steal_share(&h->t0, &t1);
}

/* The header line of the machine, in both modes. */
static void s_print_machine(const char *cpu, long ncpu, const char *level, const bench_host *h) {
    const compute_ctx cc = {.ops = kern_ops_get()};
    printf("machine: %s, %ld cores, kernels %s, attention rows prefetched into %s\n", cpu, ncpu,
           level, attention_prefetch_name(&cc));
    printf("read bandwidth: %.1f GB/s on 1 thread, %.1f GB/s on %d (best of 5 over %zu MiB); "
           "CPU steal %.1f%% during the run\n",
           h->bw.gbps_1, h->bw.gbps_n, h->bw.n_threads, h->bw.bytes >> 20, 100.0 * h->steal);
}

/* Achieved GB/s of `bytes` in `ms`, and its share of the roofline (0 if unknown). */
static double s_gbps(double bytes, double ms) {
    return ms > 0 ? bytes / (ms * 1e-3) * 1e-9 : 0;
}
static double s_share(const bench_host *h, double gbps) {
    return h->roof > 0 ? gbps / h->roof : 0;
}

/* The ms per token of each roofline stage from a test's counters. */
static void s_stage_ms(const engine_stats *s, double ms[ROOFLINE_N]) {
    const double tk = s->tokens ? (double)s->tokens : 1.0;
    ms[ROOFLINE_ATTN] = s->ns_attn / 1e6 / tk;
    ms[ROOFLINE_ROUTER] = s->ns_router / 1e6 / tk;
    ms[ROOFLINE_EXPERTS] = s->ns_moe / 1e6 / tk;
    ms[ROOFLINE_HEAD] = s->ns_head / 1e6 / tk;
}

/* The roofline object of a tg result: per stage ms, bytes, GB/s and share; plus the total. */
static json_t *s_json_roofline(const bench_result *r, const bench_host *h) {
    json_t *o = json_object(), *stages = json_object();
    double ms[ROOFLINE_N], ms_sum = 0, b_sum = 0;
    s_stage_ms(&r->st, ms);
    const double tk = r->st.tokens ? (double)r->st.tokens : 1.0;
    for (int i = 0; i < ROOFLINE_N; i++) {
        json_t *st = json_object();
        const double g = s_gbps(r->rb.stage[i], ms[i]);
        json_object_set_new(st, "ms_per_token", json_real(ms[i]));
        json_object_set_new(st, "bytes_per_token", json_real(r->rb.stage[i]));
        if (i == ROOFLINE_ATTN)
            json_object_set_new(st, "kv_bytes_per_token", json_real(r->rb.attn_kv));
        json_object_set_new(st, "gbps", json_real(g));
        json_object_set_new(st, "roofline_share", json_real(s_share(h, g)));
        json_object_set_new(stages, roofline_stage_name(i), st);
        ms_sum += ms[i];
        b_sum += r->rb.stage[i];
    }
    json_object_set_new(o, "bandwidth_gbps", json_real(h->roof));
    json_object_set_new(o, "positions", json_pack("[i,i]", r->pos0, r->pos0 + r->n_tokens - 1));
    json_object_set_new(o, "neurons_active_per_token", json_real(r->st.neurons_active / tk));
    json_object_set_new(o, "down_neurons_per_token", json_real(r->st.down_neurons / tk));
    json_object_set_new(o, "stages", stages);
    json_object_set_new(o, "total_ms_per_token", json_real(ms_sum));
    /* the decode time the stages are part of, over the same repetitions (tokens_per_second is
     * their mean rate, as llama-bench's: not the same average when the repetitions differ) */
    json_object_set_new(o, "decode_ms_per_token", json_real(r->wall_ms / tk));
    json_object_set_new(o, "total_bytes_per_token", json_real(b_sum));
    json_object_set_new(o, "total_gbps", json_real(s_gbps(b_sum, ms_sum)));
    json_object_set_new(o, "total_roofline_share", json_real(s_share(h, s_gbps(b_sum, ms_sum))));
    return o;
}

/* The roofline table of a tg result (markdown). */
static void s_print_roofline(const bench_result *r, const bench_host *h) {
    static const char *const label[ROOFLINE_N] = {"attention", "router", "experts", "LM head"};
    double ms[ROOFLINE_N], ms_sum = 0, b_sum = 0;
    s_stage_ms(&r->st, ms);
    printf("\nroofline of %s (positions %d..%d, %.1f GB/s = 100%%):\n\n", r->test, r->pos0,
           r->pos0 + r->n_tokens - 1, h->roof);
    printf("| stage | ms/token | MB/token | GB/s | %% of roofline |\n");
    printf("| --- | ---: | ---: | ---: | ---: |\n");
    for (int i = 0; i < ROOFLINE_N; i++) {
        const double g = s_gbps(r->rb.stage[i], ms[i]);
        if (i == ROOFLINE_ATTN)
            printf("| attention (KV %.2f MB) ", r->rb.attn_kv / 1e6);
        else
            printf("| %s ", label[i]);
        printf("| %.3f | %.2f | %.1f | %.0f%% |\n", ms[i], r->rb.stage[i] / 1e6, g,
               100.0 * s_share(h, g));
        ms_sum += ms[i];
        b_sum += r->rb.stage[i];
    }
    const double g = s_gbps(b_sum, ms_sum);
    printf("| total | %.3f | %.2f | %.1f | %.0f%% |\n", ms_sum, b_sum / 1e6, g,
           100.0 * s_share(h, g));
}

/* Prints a JSON document on stdout and frees it. */
static void s_json_print(json_t *root) {
    char *txt = json_dumps(root, JSON_PRESERVE_ORDER | JSON_REAL_PRECISION(8));
    if (txt) printf("%s\n", txt);
    free(txt);
    json_decref(root);
}

/* The benchmark prompt: n pseudo-random ids below V, the same for every run (malloc'd). */
/* The next id below V of the generator *x (a 64-bit LCG, its high bits). */
static int32_t s_next_id(uint64_t *x, int V) {
    *x = *x * 6364136223846793005ull + 1442695040888963407ull;
    return (int32_t)((*x >> 33) % (uint64_t)V);
}

static int32_t *s_random_tokens(int n, int V) {
    int32_t *toks = malloc(sizeof(int32_t) * (size_t)n);
    uint64_t x = 42;
    for (int i = 0; toks && i < n; i++)
        toks[i] = s_next_id(&x, V);
    return toks;
}

/* The cache's bytes per element for the roofline: 4 (f32), 2 (f16), 34/32 (q8_0). */
static double s_kv_elem_bytes(const model *m, kv_dtype t) {
    const int kv_dim = m->cfg.n_head_kv * m->cfg.head_dim;
    return (double)kv_cache_row_bytes(t, kv_dim) / kv_dim;
}

/* Adds one repetition's stage counters to the test's total. */
static void s_stats_add(engine_stats *t, const engine_stats *s) {
    t->tokens += s->tokens;
    t->neurons_total += s->neurons_total;
    t->neurons_active += s->neurons_active;
    t->down_neurons += s->down_neurons;
    t->ns_embed += s->ns_embed;
    t->ns_router += s->ns_router;
    t->ns_attn += s->ns_attn;
    t->ns_moe += s->ns_moe;
    t->ns_head += s->ns_head;
}

/* Sample standard deviation from the sum and sum of squares of reps values. */
static double s_sd(double sum, double sum2, int reps) {
    return reps > 1 ? sqrt(fmax(0, (sum2 - sum * sum / reps) / (reps - 1))) : 0;
}

static void s_discard(void *ud, const char *text, size_t len) {
    (void)ud, (void)text, (void)len;
}

/* Sum of Pss over the stage processes listed in RUN_DIR/pids ("name pid" lines): shared
 * memory counted once. 0 when unknown. */
static size_t s_pipeline_pss(const char *run_dir) {
    char path[4200], name[64];
    snprintf(path, sizeof path, "%s/pids", run_dir);
    FILE *f = fopen(path, "r");
    if (!f) return 0;
    size_t total = 0;
    int pid;
    while (fscanf(f, "%63s %d", name, &pid) == 2)
        total += sysinfo_pss(pid);
    fclose(f);
    return total;
}

/* ---- --parallel P through a pipeline ------------------------------------------------------- *
 * P requests in flight at once over one client, each its own prompt, as P chat clients would
 * send them; the coordinator's scheduler batches their decode steps. A tg test fills P slots
 * with the depth prompts first (one token each: a prompt-only request leaves no slot behind),
 * then sends the same P prompts again with n + 1 to generate: each reuses its depth from its
 * slot and evaluates one id; sent together over one socket they reach the coordinator before its
 * first step (a warning says when they did not: the answers started apart). The figure is every
 * sequence's generated tokens (the first of each comes from the prefill) over the span from the
 * first sequence's first token to the last one's end (the coordinator's generation time of each,
 * ended at the client's clock when its GenerateDone arrives). */
typedef struct par_run {
    int P, n_done, n_err;
    uint64_t rid[64];
    int n_gen[64], n_prompt_eval[64];
    double end_us[64], gen_ms[64], ipc_ms[64];
} par_run;

static int s_par_find(const par_run *pr, uint64_t rid) {
    for (int i = 0; i < pr->P; i++)
        if (pr->rid[i] == rid) return i;
    return -1;
}

static void s_par_text(void *ud, uint64_t rid, const char *text, size_t len) {
    (void)ud, (void)rid, (void)text, (void)len;
}

static void s_par_done(void *ud, uint64_t rid, const pipe_client_done *d) {
    par_run *pr = ud;
    const int i = s_par_find(pr, rid);
    if (i < 0) return;
    pr->n_gen[i] = d->n_gen;
    pr->n_prompt_eval[i] = d->n_prompt_eval;
    pr->gen_ms[i] = d->gen_ms;
    pr->ipc_ms[i] = d->ipc_ms;
    pr->end_us[i] = msg_now_us();
    pr->n_done++;
}

static void s_par_error(void *ud, uint64_t rid, int code, const char *what) {
    par_run *pr = ud;
    if (s_par_find(pr, rid) < 0) return;
    fprintf(stderr, "stpipe bench: a request failed (%d): %s\n", code, what);
    pr->n_err++;
}

/* Sends P requests (prompt i: prompts + i * stride, n_prompt ids; greedy, n_predict each) and
 * waits for all of them. 0, or 1 after a failure (printed). */
static int s_par_send(pipe_client *pc, par_run *pr, const int32_t *prompts, size_t stride,
                      int n_prompt, long long n_predict) {
    stp_err err = {0};
    pr->n_done = pr->n_err = 0;
    for (int i = 0; i < pr->P; i++) {
        pipe_client_req rq = {.prompt_ids = prompts + (size_t)i * stride,
                              .n_prompt = n_prompt,
                              .parse_special = true,
                              .n_predict = n_predict,
                              .ignore_eos = true,
                              .want_text = true};
        sampler_params_default(&rq.sp);
        rq.sp.temperature = 0;
        pr->rid[i] = 0;
        if (pipe_client_submit(pc, &rq, &pr->rid[i], &err)) {
            fprintf(stderr, "stpipe bench: %s\n", err.msg);
            return 1;
        }
    }
    const double t0 = msg_now_us();
    while (pr->n_done + pr->n_err < pr->P) {
        if (pipe_client_poll(pc, 100, &err) == STP_ETIMEDOUT) {
            fprintf(stderr, "stpipe bench: %s\n", err.msg);
            return 1;
        }
        if ((msg_now_us() - t0) * 1e-6 > 600) {
            fprintf(stderr, "stpipe bench: no answer from the pipeline within 600 s\n");
            return 1;
        }
    }
    return pr->n_err ? 1 : 0;
}

/* One repetition of tg n at depth d for P sequences: *tps (every sequence's tokens a second),
 * *ipc (mean IPC share of the answers' generation time). lead: the sequences' leading ids. */
static int s_par_tg(pipe_client *pc, par_run *pr, int32_t *prompts, size_t stride, int d, int n,
                    int V, uint64_t *lead, double *tps, double *ipc) {
    for (int i = 0; i < pr->P; i++) { /* ids no slot holds, different for every sequence */
        int32_t *q = prompts + (size_t)i * stride;
        q[0] = s_next_id(lead, V);
        if (d > 0) q[1] = s_next_id(lead, V);
    }
    if (d > 0 && s_par_send(pc, pr, prompts, stride, d + 1, 1)) return 1; /* the depths */
    if (s_par_send(pc, pr, prompts, stride, d + 1, n + 1)) return 1;
    double first = 0, last_first = 0, last = 0, sum_ipc = 0;
    long long tokens = 0;
    int fresh = 0;
    for (int i = 0; i < pr->P; i++) {
        if (pr->n_gen[i] < n + 1 || pr->gen_ms[i] <= 0) {
            fprintf(stderr,
                    "stpipe bench: sequence %d stopped after %d of %d tokens (depth + n beyond "
                    "the pipeline's context?)\n",
                    i, pr->n_gen[i], n + 1);
            return 1;
        }
        const double f = pr->end_us[i] - pr->gen_ms[i] * 1e3;
        first = i == 0 || f < first ? f : first;
        last_first = f > last_first ? f : last_first;
        last = pr->end_us[i] > last ? pr->end_us[i] : last;
        tokens += pr->n_gen[i] - 1;
        sum_ipc += pr->ipc_ms[i] / pr->gen_ms[i];
        fresh += d > 0 && pr->n_prompt_eval[i] > 1;
    }
    if (fresh) /* more sequences than slots: some waited for a slot, or were evicted */
        fprintf(stderr,
                "stpipe bench: %d of %d sequences read their depth again (more than the "
                "pipeline's slots?)\n",
                fresh, pr->P);
    if (last_first - first > 0.1 * (last - first)) /* the figure mixes fewer sequences in */
        fprintf(stderr,
                "stpipe bench: the answers started %.0f ms apart in a span of %.0f ms (more "
                "sequences than slots, or requests read one after another)\n",
                (last_first - first) * 1e-3, (last - first) * 1e-3);
    *tps = (double)tokens / ((last - first) * 1e-6);
    *ipc = sum_ipc / pr->P;
    return 0;
}

/* `stpipe bench --pipeline RUN_DIR`: the same tests through a running pipeline. At depth d a
 * pp test sends d + n prompt ids of which the first d are evaluated before the coordinator's
 * prompt clock starts (GenerateRequest.n_untimed); a tg test sends d + 1 and times the
 * generation only. A pp test's prompt starts with two ids drawn for it (seeded from the clock
 * and the pid), so the coordinator's prefix reuse finds no earlier request's prompt in a slot,
 * of this run or of an earlier one on the same pipeline; a repetition that was served from a
 * slot anyway (GenerateDone's evaluated count short of the prompt) is sent again with other
 * ids, so a prefill figure never counts reused tokens. A tg test times the generation only: its
 * depth may come from a slot (the same keys and values), which spares re-reading it. */
static int s_bench_pipeline(const char *run_dir, const model *pm, kv_dtype kv_type, int V,
                            const int *pp, int n_pp, const int *tg, int n_tg, const int *dp,
                            int n_dp, int reps, int P, bool json, bench_host *host) {
    int max_n = 1;
    for (int di = 0; di < n_dp; di++) {
        for (int i = 0; i < n_pp; i++)
            max_n = dp[di] + pp[i] > max_n ? dp[di] + pp[i] : max_n;
        max_n = dp[di] + 1 > max_n ? dp[di] + 1 : max_n;
    }
    int32_t *toks = s_random_tokens(max_n * P, V); /* sequence i (--parallel): toks + i * max_n */
    if (!toks) return 1;
    par_run pr = {.P = P};
    pipe_client *pc = NULL;
    pipeline_gen_opts o = {.run_dir = run_dir,
                           .parse_special = true,
                           .ignore_eos = true,
                           .quiet = true,
                           .on_text = s_discard,
                           .timeout_ms = 600000};
    sampler_params_default(&o.sp);
    o.sp.temperature = 0;
    struct {
        bench_result r; /* st and rb: a tg test's roofline, with pm */
        double ipc;
    } res[64];
    int nres = 0, status = 0, n_sent = 0;
    const int32_t first0 = toks[0], second0 = max_n > 1 ? toks[1] : 0;
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    uint64_t lead = (uint64_t)now.tv_sec * 1000000007u ^ (uint64_t)now.tv_nsec ^
                    (uint64_t)getpid() << 32; /* the pp tests' leading ids */
    pipeline_gen_result gr;
    o.result = &gr;
    o.prompt_ids = toks; /* warm-up: one short request */
    o.n_prompt = 1;
    o.n_predict = 2;
    if (cli_generate_pipeline(&o)) {
        free(toks);
        return 1;
    }
    if (P > 1) {
        const pipe_client_cb cb = {
            .on_text = s_par_text, .on_done = s_par_done, .on_error = s_par_error, .ud = &pr};
        stp_err err = {0};
        if (pipe_client_new(&pc, run_dir, &cb, &err)) {
            fprintf(stderr, "stpipe bench: %s\n", err.msg);
            free(toks);
            return 1;
        }
        if (n_pp && (n_pp > 1 || pp[0] > 0))
            fprintf(stderr, "stpipe bench: --parallel through a pipeline times tg tests only; "
                            "the pp tests are skipped\n");
    }
    for (int di = 0; di < n_dp && !status; di++) {
        const int d = dp[di];
        for (int kind = 0; kind < 2 && !status; kind++) {
            int n_tests = kind == 0 ? n_pp : n_tg;
            for (int ti = 0; ti < n_tests && nres < 64 && !status; ti++) {
                int n = kind == 0 ? pp[ti] : tg[ti];
                if (n <= 0 || (P > 1 && kind == 0)) continue;
                double sum = 0, sum2 = 0, ipc = 0, wall_ms = 0;
                engine_stats st;
                memset(&st, 0, sizeof st);
                for (int rep = 0; rep < reps && !status; rep++) {
                    if (P > 1) {
                        double tps = 0, share = 0;
                        status =
                            s_par_tg(pc, &pr, toks, (size_t)max_n, d, n, V, &lead, &tps, &share);
                        sum += tps;
                        sum2 += tps * tps;
                        ipc += share;
                        continue;
                    }
                    /* pp: d + n prompt tokens (d untimed: the coordinator reads them as a request
                     * of their own, then the rest from that slot), one generated (its time is the
                     * prefill); tg: d + 1 prompt tokens, n + 1 generated (the first comes from
                     * the prefill) */
                    o.n_prompt = kind == 0 ? d + n : d + 1;
                    o.n_untimed = kind == 0 ? d : 0;
                    o.n_predict = kind == 0 ? 1 : n + 1;
                    for (int tries = 0;; tries++) {
                        if (kind == 0) { /* ids no slot holds (above) */
                            toks[0] = s_next_id(&lead, V);
                            if (o.n_prompt > 1) toks[1] = s_next_id(&lead, V);
                        } else { /* the same ids each run after the first (above) */
                            toks[0] = (int32_t)((first0 + ++n_sent) % V);
                            if (max_n > 1) toks[1] = second0;
                        }
                        memset(&gr, 0, sizeof gr);
                        if (cli_generate_pipeline(&o) ||
                            (kind == 0 ? gr.prompt_ms : gr.gen_ms) <= 0) {
                            status = 1;
                            break;
                        }
                        if (kind == 1 && gr.n_gen < n + 1) { /* a tg test answers in full */
                            fprintf(stderr,
                                    "stpipe bench: tg%d at depth %d: the pipeline stopped after "
                                    "%d of %d tokens (%s): depth + n beyond its context "
                                    "(deploy/stpipe-up --ctx-size)?\n",
                                    n, d, gr.n_gen, n + 1, gr.stop_reason);
                            status = 1;
                            break;
                        }
                        if (kind == 1 || gr.n_prompt_eval >= o.n_prompt - o.n_untimed) break;
                        if (tries == 3) { /* cannot happen short of a broken coordinator */
                            fprintf(stderr,
                                    "stpipe bench: the pipeline reused %d of %d timed prompt ids\n",
                                    n - gr.n_prompt_eval, n);
                            status = 1;
                            break;
                        }
                    }
                    if (status) break;
                    double tps =
                        kind == 0 ? n / (gr.prompt_ms * 1e-3) : (gr.n_gen - 1) / (gr.gen_ms * 1e-3);
                    sum += tps;
                    sum2 += tps * tps;
                    if (kind == 1) {
                        wall_ms += gr.gen_ms;
                        ipc += gr.ipc_ms / gr.gen_ms;
                        gr.stages.tokens = (uint64_t)(gr.n_gen - 1); /* an eval a later token */
                        s_stats_add(&st, &gr.stages);
                    }
                }
                if (status) break;
                bench_result *r = &res[nres].r;
                memset(r, 0, sizeof *r);
                s_test_name(r->test, sizeof r->test, kind == 0, n, d, P);
                r->depth = d;
                r->pos0 = d + 1; /* a tg test's prompt is d + 1 ids */
                r->n_tokens = n;
                r->mean = sum / reps;
                r->sd = s_sd(sum, sum2, reps);
                r->reps = reps;
                r->tg =
                    kind == 1 && pm && st.tokens; /* no roofline for P > 1 (in process neither) */
                r->st = st;
                r->wall_ms = wall_ms;
                if (r->tg)
                    roofline_decode_bytes(pm, r->pos0, n, s_kv_elem_bytes(pm, kv_type), &st,
                                          &r->rb);
                res[nres].ipc = kind == 1 ? ipc / reps : -1;
                nres++;
            }
        }
    }
    free(toks);
    pipe_client_destroy(&pc);
    if (status) {
        fprintf(stderr,
                "stpipe bench: the pipeline in %s failed a request (a depth beyond its context?)\n",
                run_dir);
        return 1;
    }
    char cpu[256];
    sysinfo_cpu_model(cpu, sizeof cpu);
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    size_t pss = s_pipeline_pss(run_dir);
    s_host_end(host);
    if (json) {
        json_t *root = json_object(), *arr = json_array();
        json_object_set_new(root, "machine",
                            s_json_machine(cpu, ncpu, kern_ops_get()->level, host));
        json_object_set_new(root, "pipeline", s_json_str(run_dir));
        json_object_set_new(root, "pss_bytes", json_integer((json_int_t)pss));
        for (int i = 0; i < nres; i++) {
            const bench_result *b = &res[i].r;
            json_t *r = json_object();
            json_object_set_new(r, "test", json_string(b->test));
            json_object_set_new(r, "depth", json_integer(b->depth));
            json_object_set_new(r, "parallel", json_integer(P));
            json_object_set_new(r, "tokens_per_second", json_real(b->mean));
            json_object_set_new(r, "sd", json_real(b->sd));
            json_object_set_new(r, "reps", json_integer(reps));
            if (res[i].ipc >= 0) json_object_set_new(r, "ipc_share", json_real(res[i].ipc));
            if (b->tg) json_object_set_new(r, "roofline", s_json_roofline(b, host));
            json_array_append_new(arr, r);
        }
        json_object_set_new(root, "results", arr);
        s_json_print(root);
    } else {
        s_print_machine(cpu, ncpu, kern_ops_get()->level, host);
        printf("pipeline: %s, total PSS of the stages %.1f MiB\n", run_dir, pss / 1048576.0);
        if (!pm)
            printf("(the per-stage roofline needs --model: the pipeline's file, for the bytes "
                   "each stage reads)\n");
        printf("\n| test | t/s | IPC share of decode |\n| ---: | ---: | ---: |\n");
        for (int i = 0; i < nres; i++) {
            printf("| %s | %.2f ± %.2f | ", res[i].r.test, res[i].r.mean, res[i].r.sd);
            if (res[i].ipc >= 0)
                printf("%.1f%% |\n", 100.0 * res[i].ipc);
            else
                printf("- |\n");
        }
        for (int i = 0; i < nres; i++)
            if (res[i].r.tg) s_print_roofline(&res[i].r, host);
    }
    return 0;
}

int cli_bench(int argc, char **argv) {
    bench_opts o;
    memset(&o, 0, sizeof o);
    int bad = cli_opts_parse("bench", s_opts, CLI_NOPTS(s_opts), &o, argc, argv, s_usage);
    if (bad) return bad == CLI_HELP ? 0 : bad;
    const char *path = o.model, *run_dir = o.pipeline;
    const int *pp = o.pp.v, *tg = o.tg.v, *dp = o.dp.v;
    const int n_pp = o.pp.n, n_tg = o.tg.n, n_dp = o.dp.n, reps = o.reps, threads = o.threads;
    const bool json = o.json;
    const kv_dtype kv_type = o.kv_type;
    const int P = o.parallel > 0 ? o.parallel : 1;
    stp_err err = {0};
    bench_host host;
    s_host_begin(&host, (int)threads);
    if (run_dir) {
        model *pm = NULL; /* with --model: the vocabulary and the roofline's bytes */
        if (path && model_open(&pm, path, &err)) {
            fprintf(stderr, "stpipe bench: %s\n", err.msg);
            return 1;
        }
        const int rc = s_bench_pipeline(run_dir, pm, kv_type, pm ? pm->cfg.n_vocab : 1000, pp, n_pp,
                                        tg, n_tg, dp, n_dp, (int)reps, P, json, &host);
        model_close(&pm);
        return rc;
    }
    if (!path) {
        s_usage(stderr);
        return 2;
    }
    model *m = NULL;
    engine *e = NULL;
    if (model_open(&m, path, &err)) {
        fprintf(stderr, "stpipe bench: %s\n", err.msg);
        return 1;
    }
    int max_ctx = 1, max_d = 0;
    for (int i = 0; i < n_dp; i++)
        max_d = dp[i] > max_d ? dp[i] : max_d;
    for (int i = 0; i < n_pp; i++)
        max_ctx = pp[i] > max_ctx ? pp[i] : max_ctx;
    for (int i = 0; i < n_tg; i++)
        max_ctx = tg[i] + 1 > max_ctx ? tg[i] + 1 : max_ctx;
    max_ctx += max_d;
    engine_params ep = {.n_threads = (int)threads,
                        .n_ctx = max_ctx,
                        .kv_type = kv_type,
                        .sparse_head_candidates = o.sparse_head,
                        .n_seq = P,
                        .progress = cli_progress};
    if (engine_new(&e, m, &ep, &err)) {
        fprintf(stderr, "stpipe bench: %s\n", err.msg);
        model_close(&m);
        return 1;
    }
    const int V = m->cfg.n_vocab;
    float *logits = malloc(sizeof(float) * V * P);
    int32_t *toks = s_random_tokens(max_ctx * P, V); /* sequence i: from toks + i * max_ctx */
    /* warm-up: touch the weights once so page-cache misses do not count */
    engine_eval(e, toks, 1, logits, false, &err);
    engine_reset(e);

    bench_result res[64];
    int nres = 0;
    for (int di = 0; di < n_dp; di++) {
        const int d = dp[di];
        for (int kind = 0; kind < 2; kind++) {
            int n_tests = kind == 0 ? n_pp : n_tg;
            for (int ti = 0; ti < n_tests && nres < 64; ti++) {
                int n = kind == 0 ? pp[ti] : tg[ti];
                if (n <= 0) continue;
                bench_result *r = &res[nres++];
                memset(r, 0, sizeof *r);
                s_test_name(r->test, sizeof r->test, kind == 0, n, d, P);
                r->n_tokens = n;
                r->depth = r->pos0 = d;
                double sum = 0, sum2 = 0;
                engine_stats st = {0};
                for (int rep = 0; rep < reps; rep++) {
                    engine_reset(e);
                    int rc = d > 0 ? s_eval_seqs(e, P, toks, max_ctx, 0, d, logits, V, &err) : 0;
                    engine_reset_stats(e); /* the depth prompt is not counted */
                    double t0 = s_now();
                    if (kind == 0) {
                        if (!rc) rc = s_eval_seqs(e, P, toks, max_ctx, d, n, logits, V, &err);
                    } else {
                        for (int i = 0; i < n && !rc; i++)
                            rc = s_eval_seqs(e, P, toks, max_ctx, d + i, 1, logits, V, &err);
                    }
                    if (rc) {
                        fprintf(stderr, "stpipe bench: %s\n", err.msg);
                        goto out;
                    }
                    const double dt = s_now() - t0;
                    double tps = (double)n * P / dt;
                    r->wall_ms += dt * 1e3;
                    sum += tps;
                    sum2 += tps * tps;
                    s_stats_add(&st, engine_get_stats(e));
                }
                r->reps = (int)reps;
                r->mean = sum / reps;
                r->sd = s_sd(sum, sum2, (int)reps);
                r->st = st;
                r->tg = kind == 1;
                if (r->tg && P == 1)
                    roofline_decode_bytes(m, d, n, s_kv_elem_bytes(m, kv_type), &st, &r->rb);
                if (r->tg && o.sparse_head > 0) /* sketch (1 bit + a float a row), C rows */
                    r->rb.stage[ROOFLINE_HEAD] =
                        m->output.n_rows * (m->output.n_cols / 8.0 + 4) +
                        (double)(o.sparse_head < m->output.n_rows ? o.sparse_head
                                                                  : m->output.n_rows) *
                            m->output.row_bytes;
            }
        }
    }

    char cpu[256];
    sysinfo_cpu_model(cpu, sizeof cpu);
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    size_t pss = sysinfo_pss(0);
    const char *level = kern_ops_get()->level;
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    s_host_end(&host);
    if (json) {
        json_t *root = json_object(), *arr = json_array();
        json_object_set_new(root, "machine", s_json_machine(cpu, ncpu, level, &host));
        json_object_set_new(root, "model", s_json_str(path));
        json_object_set_new(root, "model_bytes", json_integer((json_int_t)gguf_file_size(m->gguf)));
        json_object_set_new(root, "threads", json_integer(threads));
        json_object_set_new(root, "sparse_head_candidates", json_integer(o.sparse_head));
        json_object_set_new(root, "peak_rss_bytes", json_integer((json_int_t)ru.ru_maxrss * 1024));
        json_object_set_new(root, "pss_bytes", json_integer((json_int_t)pss));
        for (int i = 0; i < nres; i++) {
            const engine_stats *s = &res[i].st;
            const double tk = s->tokens ? (double)s->tokens : 1.0;
            json_t *r = json_object(), *ms = json_object();
            json_object_set_new(r, "test", json_string(res[i].test));
            json_object_set_new(r, "depth", json_integer(res[i].depth));
            json_object_set_new(r, "tokens_per_second", json_real(res[i].mean));
            json_object_set_new(r, "sd", json_real(res[i].sd));
            json_object_set_new(r, "reps", json_integer(res[i].reps));
            json_object_set_new(ms, "embed", json_real(s->ns_embed / 1e6 / tk));
            json_object_set_new(ms, "router", json_real(s->ns_router / 1e6 / tk));
            json_object_set_new(ms, "attention", json_real(s->ns_attn / 1e6 / tk));
            json_object_set_new(ms, "experts", json_real(s->ns_moe / 1e6 / tk));
            json_object_set_new(ms, "lm_head", json_real(s->ns_head / 1e6 / tk));
            json_object_set_new(r, "ms_per_token", ms);
            json_object_set_new(r, "neurons_idle",
                                json_real(s->neurons_total
                                              ? 1.0 - (double)s->neurons_active / s->neurons_total
                                              : 0.0));
            json_object_set_new(r, "parallel", json_integer(P));
            if (res[i].tg && P == 1)
                json_object_set_new(r, "roofline", s_json_roofline(&res[i], &host));
            json_array_append_new(arr, r);
        }
        json_object_set_new(root, "results", arr);
        s_json_print(root);
    } else {
        s_print_machine(cpu, ncpu, level, &host);
        printf("model: %s (%.2f GiB), threads %d, peak RSS %.1f MiB, PSS %.1f MiB", path,
               gguf_file_size(m->gguf) / 1073741824.0, threads, ru.ru_maxrss / 1024.0,
               pss / 1048576.0);
        if (o.sparse_head > 0) printf(", sparse LM head C %d", o.sparse_head);
        printf("\n\n");
        printf(
            "| test | t/s | ms/token: router | attention | experts | LM head | neurons idle |\n");
        printf("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n");
        for (int i = 0; i < nres; i++) {
            const engine_stats *s = &res[i].st;
            printf("| %s | %.2f ± %.2f | %.3f | %.3f | %.3f | %.3f | %.1f%% |\n", res[i].test,
                   res[i].mean, res[i].sd, s->ns_router / 1e6 / s->tokens,
                   s->ns_attn / 1e6 / s->tokens, s->ns_moe / 1e6 / s->tokens,
                   s->ns_head / 1e6 / s->tokens,
                   s->neurons_total ? 100.0 * (1.0 - (double)s->neurons_active / s->neurons_total)
                                    : 0.0);
        }
        for (int i = 0; i < nres; i++)
            if (res[i].tg && P == 1) s_print_roofline(&res[i], &host);
    }
out:
    free(logits);
    free(toks);
    engine_destroy(&e);
    model_close(&m);
    return 0;
}
