/* cli_bench: `stpipe bench`, llama-bench-style throughput of prompt processing (pp) and token
 * generation (tg), with repetitions (mean +- sd), peak memory, the per-stage time split and the
 * machine it ran on. Markdown by default, --json for scripts. In-process engine, or a running
 * pipeline (--pipeline RUN_DIR: the coordinator's own prompt and generation times, the IPC share
 * of decode and the summed PSS of the stage processes). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include "cli.h"
#include "cli_pipeline.h"
#include "kern/kern.h"
#include "model/engine.h"
#include "util/sysinfo.h"

typedef struct bench_result {
    char test[32];
    int n_tokens;
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
            "                    [--threads N] [--json]\n"
            "  -p LIST    prompt sizes to time (batched prefill), default 64,512\n"
            "  -n LIST    generation lengths to time (one token per pass), default 128\n"
            "  -r N       repetitions per test (mean +- sd), default 3\n"
            "  --threads N  compute threads (default 2; in-process only)\n"
            "  --pipeline RUN_DIR  time a running pipeline (deploy/stpipe-up) instead; prompts\n"
            "             are random ids below 1000, or below the vocabulary with --model\n"
            "  --json     machine-readable output\n");
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

/* `stpipe bench --pipeline RUN_DIR`: the same tests through a running pipeline. */
static int s_bench_pipeline(const char *run_dir, int V, const int *pp, int n_pp, const int *tg,
                            int n_tg, int reps, bool json) {
    int max_n = 1;
    for (int i = 0; i < n_pp; i++)
        max_n = pp[i] > max_n ? pp[i] : max_n;
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
        double mean, sd, ipc;
    } res[32];
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
    for (int kind = 0; kind < 2 && !status; kind++) {
        int n_tests = kind == 0 ? n_pp : n_tg;
        for (int ti = 0; ti < n_tests && nres < 32 && !status; ti++) {
            int n = kind == 0 ? pp[ti] : tg[ti];
            if (n <= 0) continue;
            double sum = 0, sum2 = 0, ipc = 0;
            for (int rep = 0; rep < reps && !status; rep++) {
                /* pp: n prompt tokens, one generated (its time is the prefill); tg: one prompt
                 * token, n + 1 generated (the first comes from the prefill) */
                o.n_prompt = kind == 0 ? n : 1;
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
            snprintf(res[nres].test, sizeof res[nres].test, "%s%d", kind == 0 ? "pp" : "tg", n);
            res[nres].mean = sum / reps;
            res[nres].sd = s_sd(sum, sum2, reps);
            res[nres].ipc = kind == 1 ? ipc / reps : -1;
            nres++;
        }
    }
    free(toks);
    if (status) {
        fprintf(stderr, "stpipe bench: the pipeline in %s failed a request\n", run_dir);
        return 1;
    }
    char cpu[256];
    sysinfo_cpu_model(cpu, sizeof cpu);
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    size_t pss = s_pipeline_pss(run_dir);
    if (json) {
        printf("{\"machine\": {\"cpu\": \"%s\", \"cores\": %ld, \"simd\": \"%s\"}, "
               "\"pipeline\": \"%s\", \"pss_bytes\": %zu, \"results\": [",
               cpu, ncpu, kern_ops_get()->level, run_dir, pss);
        for (int i = 0; i < nres; i++) {
            printf("%s{\"test\": \"%s\", \"tokens_per_second\": %.3f, \"sd\": %.3f, \"reps\": %d",
                   i ? ", " : "", res[i].test, res[i].mean, res[i].sd, reps);
            if (res[i].ipc >= 0) printf(", \"ipc_share\": %.4f", res[i].ipc);
            printf("}");
        }
        printf("]}\n");
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
    int pp[16] = {64, 512}, tg[16] = {128}, n_pp = 2, n_tg = 1;
    long long reps = 3, threads = 2;
    bool json = false;
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
        } else if (cli_opt_is(a, "-r") && v) {
            if (cli_parse_int(v, "-r", 1, 1000, &reps)) return 2;
            i++;
        } else if ((cli_opt_is(a, "--threads") || cli_opt_is(a, "-t")) && v) {
            if (cli_parse_int(v, "--threads", 1, 256, &threads)) return 2;
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
        return s_bench_pipeline(run_dir, V, pp, n_pp, tg, n_tg, (int)reps, json);
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
    int max_ctx = 1;
    for (int i = 0; i < n_pp; i++)
        max_ctx = pp[i] > max_ctx ? pp[i] : max_ctx;
    for (int i = 0; i < n_tg; i++)
        max_ctx = tg[i] + 1 > max_ctx ? tg[i] + 1 : max_ctx;
    engine_params ep = {.n_threads = (int)threads, .n_ctx = max_ctx, .progress = cli_progress};
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

    bench_result res[32];
    int nres = 0;
    for (int kind = 0; kind < 2; kind++) {
        int n_tests = kind == 0 ? n_pp : n_tg;
        for (int ti = 0; ti < n_tests && nres < 32; ti++) {
            int n = kind == 0 ? pp[ti] : tg[ti];
            if (n <= 0) continue;
            bench_result *r = &res[nres++];
            memset(r, 0, sizeof *r);
            snprintf(r->test, sizeof r->test, "%s%d", kind == 0 ? "pp" : "tg", n);
            r->n_tokens = n;
            double sum = 0, sum2 = 0;
            engine_reset_stats(e);
            for (int rep = 0; rep < reps; rep++) {
                engine_reset(e);
                double t0 = s_now();
                int rc = 0;
                if (kind == 0) {
                    rc = engine_eval(e, toks, n, logits, false, &err);
                } else {
                    for (int i = 0; i < n && !rc; i++)
                        rc = engine_eval(e, &toks[i], 1, logits, false, &err);
                }
                if (rc) {
                    fprintf(stderr, "stpipe bench: %s\n", err.msg);
                    goto out;
                }
                double tps = n / (s_now() - t0);
                sum += tps;
                sum2 += tps * tps;
            }
            r->reps = (int)reps;
            r->mean = sum / reps;
            r->sd = s_sd(sum, sum2, (int)reps);
            r->st = *engine_get_stats(e);
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
        printf(
            "{\"machine\": {\"cpu\": \"%s\", \"cores\": %ld, \"simd\": \"%s\"}, \"model\": \"%s\", "
            "\"model_bytes\": %zu, \"threads\": %lld, \"peak_rss_bytes\": %ld, \"pss_bytes\": %zu, "
            "\"results\": [",
            cpu, ncpu, level, path, gguf_file_size(m->gguf), threads, ru.ru_maxrss * 1024L, pss);
        for (int i = 0; i < nres; i++) {
            const engine_stats *s = &res[i].st;
            printf("%s{\"test\": \"%s\", \"tokens_per_second\": %.3f, \"sd\": %.3f, \"reps\": %d, "
                   "\"ms_per_token\": {\"embed\": %.4f, \"router\": %.4f, \"attention\": %.4f, "
                   "\"experts\": %.4f, \"lm_head\": %.4f}, \"neurons_idle\": %.4f}",
                   i ? ", " : "", res[i].test, res[i].mean, res[i].sd, res[i].reps,
                   s->ns_embed / 1e6 / s->tokens, s->ns_router / 1e6 / s->tokens,
                   s->ns_attn / 1e6 / s->tokens, s->ns_moe / 1e6 / s->tokens,
                   s->ns_head / 1e6 / s->tokens,
                   s->neurons_total ? 1.0 - (double)s->neurons_active / s->neurons_total : 0.0);
        }
        printf("]}\n");
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
