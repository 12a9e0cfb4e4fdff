/* cli_bench: `stpipe bench`, llama-bench-style throughput of prompt processing (pp) and token
 * generation (tg), with repetitions (mean +- sd), peak memory, the per-stage time split and the
 * machine it ran on. Markdown by default, --json for scripts (built with jansson, so any model
 * path gives valid JSON). In-process engine, or a running pipeline (--pipeline RUN_DIR: the
 * coordinator's own prompt and generation times, the IPC share of decode and the summed PSS of
 * the stage processes). `-d LIST` runs every test after a prompt of that many tokens, as
 * llama-bench's -d: its time is not counted (decode speed falls with the context, so a figure
 * at an empty context alone hides the cost of attention over the cache). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include <jansson.h>

#include "cli.h"
#include "cli_pipeline.h"
#include "kern/kern.h"
#include "model/engine.h"
#include "util/sysinfo.h"

typedef struct bench_result {
    char test[32];
    int n_tokens, depth;
    double mean, sd; /* tokens per second */
    engine_stats st; /* accumulated over repetitions */
    int reps;
} bench_result;

static double s_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int s_parse_list(const char *s, int *out, int cap) {
    int n = 0;
    while (*s && n < cap) {
        char *end;
        long v = strtol(s, &end, 10);
        if (end == s || v < 0 || v > 1 << 20) return -1;
        out[n++] = (int)v;
        s = *end == ',' ? end + 1 : end;
        if (*end && *end != ',') return -1;
    }
    return n;
}

static void s_usage(FILE *f) {
    fprintf(f,
            "usage: stpipe bench (--model FILE | --pipeline RUN_DIR) [-p 64,512] [-n 128] [-r 3]\n"
            "                    [-d 0,2048] [--threads N] [--cache-type f32|f16|q8_0] [--json]\n"
            "  -p LIST    prompt sizes to time (batched prefill), default 64,512\n"
            "  -n LIST    generation lengths to time (one token per pass), default 128\n"
            "  -d LIST    context depths: each test runs after a prompt of that many tokens,\n"
            "             whose time is not counted (llama-bench's -d), default 0\n"
            "  -r N       repetitions per test (mean +- sd), default 3\n"
            "  --threads N  compute threads (default 2; in-process only)\n"
            "  --cache-type T  KV cache f32 (default), f16 or q8_0 (in-process only; a\n"
            "             pipeline's is set by deploy/stpipe-up --cache-type)\n"
            "  --pipeline RUN_DIR  time a running pipeline (deploy/stpipe-up) instead; prompts\n"
            "             are random ids below 1000, or below the vocabulary with --model\n"
            "  --json     machine-readable output\n");
}

/* The name of a test, as llama-bench prints it: "tg128", "pp512 @ d2048". */
static void s_test_name(char *out, size_t cap, bool pp, int n, int depth) {
    if (depth > 0)
        snprintf(out, cap, "%s%d @ d%d", pp ? "pp" : "tg", n, depth);
    else
        snprintf(out, cap, "%s%d", pp ? "pp" : "tg", n);
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

/* The machine object of the JSON output. */
static json_t *s_json_machine(const char *cpu, long ncpu, const char *level) {
    json_t *mach = json_object();
    json_object_set_new(mach, "cpu", s_json_str(cpu));
    json_object_set_new(mach, "cores", json_integer(ncpu));
    json_object_set_new(mach, "simd", json_string(level));
    return mach;
}

/* Prints a JSON document on stdout and frees it. */
static void s_json_print(json_t *root) {
    char *txt = json_dumps(root, JSON_PRESERVE_ORDER | JSON_REAL_PRECISION(8));
    if (txt) printf("%s\n", txt);
    free(txt);
    json_decref(root);
}

/* The benchmark prompt: n pseudo-random ids below V, the same for every run (malloc'd). */
static int32_t *s_random_tokens(int n, int V) {
    int32_t *toks = malloc(sizeof(int32_t) * (size_t)n);
    uint64_t x = 42;
    for (int i = 0; toks && i < n; i++) {
        x = x * 6364136223846793005ull + 1442695040888963407ull;
        toks[i] = (int32_t)((x >> 33) % (uint64_t)V);
    }
    return toks;
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

/* `stpipe bench --pipeline RUN_DIR`: the same tests through a running pipeline. At depth d a
 * pp test sends d + n prompt ids of which the first d are evaluated before the coordinator's
 * prompt clock starts (GenerateRequest.n_untimed); a tg test sends d + 1 and times the
 * generation only. */
static int s_bench_pipeline(const char *run_dir, int V, const int *pp, int n_pp, const int *tg,
                            int n_tg, const int *dp, int n_dp, int reps, bool json) {
    int max_n = 1;
    for (int di = 0; di < n_dp; di++) {
        for (int i = 0; i < n_pp; i++)
            max_n = dp[di] + pp[i] > max_n ? dp[di] + pp[i] : max_n;
        max_n = dp[di] + 1 > max_n ? dp[di] + 1 : max_n;
    }
    int32_t *toks = s_random_tokens(max_n, V);
    if (!toks) return 1;
    pipeline_gen_opts o = {.run_dir = run_dir,
                           .parse_special = true,
                           .ignore_eos = true,
                           .quiet = true,
                           .on_text = s_discard,
                           .timeout_ms = 600000};
    sampler_params_default(&o.sp);
    o.sp.temperature = 0;
    struct {
        char test[32];
        int depth;
        double mean, sd, ipc;
    } res[64];
    int nres = 0, status = 0;
    pipeline_gen_result gr;
    o.result = &gr;
    o.prompt_ids = toks; /* warm-up: one short request */
    o.n_prompt = 1;
    o.n_predict = 2;
    if (cli_generate_pipeline(&o)) {
        free(toks);
        return 1;
    }
    for (int di = 0; di < n_dp && !status; di++) {
        const int d = dp[di];
        for (int kind = 0; kind < 2 && !status; kind++) {
            int n_tests = kind == 0 ? n_pp : n_tg;
            for (int ti = 0; ti < n_tests && nres < 64 && !status; ti++) {
                int n = kind == 0 ? pp[ti] : tg[ti];
                if (n <= 0) continue;
                double sum = 0, sum2 = 0, ipc = 0;
                for (int rep = 0; rep < reps && !status; rep++) {
                    /* pp: d + n prompt tokens (d untimed), one generated (its time is the
                     * prefill); tg: d + 1 prompt tokens, n + 1 generated (the first comes from
                     * the prefill) */
                    o.n_prompt = kind == 0 ? d + n : d + 1;
                    o.n_untimed = kind == 0 ? d : 0;
                    o.n_predict = kind == 0 ? 1 : n + 1;
                    memset(&gr, 0, sizeof gr);
                    if (cli_generate_pipeline(&o) || (kind == 0 ? gr.prompt_ms : gr.gen_ms) <= 0) {
                        status = 1;
                        break;
                    }
                    double tps =
                        kind == 0 ? n / (gr.prompt_ms * 1e-3) : (gr.n_gen - 1) / (gr.gen_ms * 1e-3);
                    sum += tps;
                    sum2 += tps * tps;
                    if (kind == 1) ipc += gr.ipc_ms / gr.gen_ms;
                }
                if (status) break;
                s_test_name(res[nres].test, sizeof res[nres].test, kind == 0, n, d);
                res[nres].depth = d;
                res[nres].mean = sum / reps;
                res[nres].sd = s_sd(sum, sum2, reps);
                res[nres].ipc = kind == 1 ? ipc / reps : -1;
                nres++;
            }
        }
    }
    free(toks);
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
    if (json) {
        json_t *root = json_object(), *arr = json_array();
        json_object_set_new(root, "machine", s_json_machine(cpu, ncpu, kern_ops_get()->level));
        json_object_set_new(root, "pipeline", s_json_str(run_dir));
        json_object_set_new(root, "pss_bytes", json_integer((json_int_t)pss));
        for (int i = 0; i < nres; i++) {
            json_t *r = json_object();
            json_object_set_new(r, "test", json_string(res[i].test));
            json_object_set_new(r, "depth", json_integer(res[i].depth));
            json_object_set_new(r, "tokens_per_second", json_real(res[i].mean));
            json_object_set_new(r, "sd", json_real(res[i].sd));
            json_object_set_new(r, "reps", json_integer(reps));
            if (res[i].ipc >= 0) json_object_set_new(r, "ipc_share", json_real(res[i].ipc));
            json_array_append_new(arr, r);
        }
        json_object_set_new(root, "results", arr);
        s_json_print(root);
    } else {
        printf("machine: %s, %ld cores, kernels %s\n", cpu, ncpu, kern_ops_get()->level);
        printf("pipeline: %s, total PSS of the stages %.1f MiB\n\n", run_dir, pss / 1048576.0);
        printf("| test | t/s | IPC share of decode |\n| ---: | ---: | ---: |\n");
        for (int i = 0; i < nres; i++) {
            printf("| %s | %.2f ± %.2f | ", res[i].test, res[i].mean, res[i].sd);
            if (res[i].ipc >= 0)
                printf("%.1f%% |\n", 100.0 * res[i].ipc);
            else
                printf("- |\n");
        }
    }
    return 0;
}

int cli_bench(int argc, char **argv) {
    const char *path = NULL, *run_dir = NULL;
    int pp[16] = {64, 512}, tg[16] = {128}, dp[16] = {0}, n_pp = 2, n_tg = 1, n_dp = 1;
    long long reps = 3, threads = 2;
    bool json = false;
    kv_dtype kv_type = KV_F32;
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (cli_opt_is(a, "--help") || cli_opt_is(a, "-h")) {
            s_usage(stdout);
            return 0;
        } else if ((cli_opt_is(a, "--model") || cli_opt_is(a, "-m")) && v) {
            path = v;
            i++;
        } else if (cli_opt_is(a, "--pipeline") && v) {
            run_dir = v;
            i++;
        } else if (cli_opt_is(a, "-p") && v) {
            if ((n_pp = s_parse_list(v, pp, 16)) < 0) goto bad;
            i++;
        } else if (cli_opt_is(a, "-n") && v) {
            if ((n_tg = s_parse_list(v, tg, 16)) < 0) goto bad;
            i++;
        } else if (cli_opt_is(a, "-d") && v) {
            if ((n_dp = s_parse_list(v, dp, 16)) <= 0) goto bad;
            i++;
        } else if (cli_opt_is(a, "-r") && v) {
            if (cli_parse_int(v, "-r", 1, 1000, &reps)) return 2;
            i++;
        } else if ((cli_opt_is(a, "--threads") || cli_opt_is(a, "-t")) && v) {
            if (cli_parse_int(v, "--threads", 1, 256, &threads)) return 2;
            i++;
        } else if (cli_opt_is(a, "--cache-type") && v) {
            stp_err e = {0};
            if (kv_cache_parse_type(v, &kv_type, &e)) {
                fprintf(stderr, "stpipe bench: %s\n", e.msg);
                return 2;
            }
            i++;
        } else if (cli_opt_is(a, "--json")) {
            json = true;
        } else {
            goto bad;
        }
        continue;
    bad:
        fprintf(stderr, "stpipe bench: bad option '%s'\n", a);
        s_usage(stderr);
        return 2;
    }
    stp_err err = {0};
    if (run_dir) {
        int V = 1000;
        if (path) {
            model *pm = NULL;
            if (model_open(&pm, path, &err)) {
                fprintf(stderr, "stpipe bench: %s\n", err.msg);
                return 1;
            }
            V = pm->cfg.n_vocab;
            model_close(&pm);
        }
        return s_bench_pipeline(run_dir, V, pp, n_pp, tg, n_tg, dp, n_dp, (int)reps, json);
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
    engine_params ep = {
        .n_threads = (int)threads, .n_ctx = max_ctx, .kv_type = kv_type, .progress = cli_progress};
    if (engine_new(&e, m, &ep, &err)) {
        fprintf(stderr, "stpipe bench: %s\n", err.msg);
        model_close(&m);
        return 1;
    }
    const int V = m->cfg.n_vocab;
    float *logits = malloc(sizeof(float) * V);
    int32_t *toks = s_random_tokens(max_ctx, V);
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
                s_test_name(r->test, sizeof r->test, kind == 0, n, d);
                r->n_tokens = n;
                r->depth = d;
                double sum = 0, sum2 = 0;
                engine_stats st = {0};
                for (int rep = 0; rep < reps; rep++) {
                    engine_reset(e);
                    int rc = d > 0 ? engine_eval(e, toks, d, logits, false, &err) : 0;
                    engine_reset_stats(e); /* the depth prompt is not counted */
                    double t0 = s_now();
                    if (kind == 0) {
                        if (!rc) rc = engine_eval(e, toks + d, n, logits, false, &err);
                    } else {
                        for (int i = 0; i < n && !rc; i++)
                            rc = engine_eval(e, &toks[d + i], 1, logits, false, &err);
                    }
                    if (rc) {
                        fprintf(stderr, "stpipe bench: %s\n", err.msg);
                        goto out;
                    }
                    double tps = n / (s_now() - t0);
                    sum += tps;
                    sum2 += tps * tps;
                    s_stats_add(&st, engine_get_stats(e));
                }
                r->reps = (int)reps;
                r->mean = sum / reps;
                r->sd = s_sd(sum, sum2, (int)reps);
                r->st = st;
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
    if (json) {
        json_t *root = json_object(), *arr = json_array();
        json_object_set_new(root, "machine", s_json_machine(cpu, ncpu, level));
        json_object_set_new(root, "model", s_json_str(path));
        json_object_set_new(root, "model_bytes", json_integer((json_int_t)gguf_file_size(m->gguf)));
        json_object_set_new(root, "threads", json_integer(threads));
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
            json_array_append_new(arr, r);
        }
        json_object_set_new(root, "results", arr);
        s_json_print(root);
    } else {
        printf("machine: %s, %ld cores, kernels %s\n", cpu, ncpu, level);
        printf("model: %s (%.2f GiB), threads %lld, peak RSS %.1f MiB, PSS %.1f MiB\n\n", path,
               gguf_file_size(m->gguf) / 1073741824.0, threads, ru.ru_maxrss / 1024.0,
               pss / 1048576.0);
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
    }
out:
    free(logits);
    free(toks);
    engine_destroy(&e);
    model_close(&m);
    return 0;
}
