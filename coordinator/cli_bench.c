/* cli_bench: `stpipe bench`, llama-bench-style throughput of prompt processing (pp) and token
 * generation (tg), with repetitions (mean +- sd), peak memory, the per-stage time split and the
 * machine it ran on. Markdown by default, --json for scripts. In-process engine. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include "cli.h"
#include "kern/kern.h"
#include "model/engine.h"
#include "util/sysinfo.h"

typedef struct bench_result {
    char test[32];
    int n_tokens;
    double mean, sd;  /* tokens per second */
    engine_stats st;  /* accumulated over repetitions */
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
    fprintf(f, "usage: stpipe bench --model FILE [-p 64,512] [-n 128] [-r 3] [--threads N] [--json]\n"
               "  -p LIST    prompt sizes to time (batched prefill), default 64,512\n"
               "  -n LIST    generation lengths to time (one token per pass), default 128\n"
               "  -r N       repetitions per test (mean +- sd), default 3\n"
               "  --threads N  compute threads (default 2)\n"
               "  --json     machine-readable output\n");
}

int cli_bench(int argc, char **argv) {
    const char *path = NULL;
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
    if (!path) {
        s_usage(stderr);
        return 2;
    }
    stp_err err = {0};
    model *m = NULL;
    engine *e = NULL;
    if (model_open(&m, path, &err)) {
        fprintf(stderr, "stpipe bench: %s\n", err.msg);
        return 1;
    }
    int max_ctx = 1;
    for (int i = 0; i < n_pp; i++) max_ctx = pp[i] > max_ctx ? pp[i] : max_ctx;
    for (int i = 0; i < n_tg; i++) max_ctx = tg[i] + 1 > max_ctx ? tg[i] + 1 : max_ctx;
    engine_params ep = {.n_threads = (int)threads, .n_ctx = max_ctx, .progress = cli_progress};
    if (engine_new(&e, m, &ep, &err)) {
        fprintf(stderr, "stpipe bench: %s\n", err.msg);
        model_close(&m);
        return 1;
    }
    const int V = m->cfg.n_vocab;
    float *logits = malloc(sizeof(float) * V);
    int32_t *toks = malloc(sizeof(int32_t) * max_ctx);
    uint64_t x = 42;
    for (int i = 0; i < max_ctx; i++) {
        x = x * 6364136223846793005ull + 1442695040888963407ull;
        toks[i] = (int32_t)((x >> 33) % (uint64_t)V);
    }
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
                    for (int i = 0; i < n && !rc; i++) rc = engine_eval(e, &toks[i], 1, logits, false, &err);
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
            r->sd = reps > 1 ? sqrt(fmax(0, (sum2 - sum * sum / reps) / (reps - 1))) : 0;
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
        printf("{\"machine\": {\"cpu\": \"%s\", \"cores\": %ld, \"simd\": \"%s\"}, \"model\": \"%s\", "
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
        printf("| test | t/s | ms/token: router | attention | experts | LM head | neurons idle |\n");
        printf("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n");
        for (int i = 0; i < nres; i++) {
            const engine_stats *s = &res[i].st;
            printf("| %s | %.2f ± %.2f | %.3f | %.3f | %.3f | %.3f | %.1f%% |\n", res[i].test,
                   res[i].mean, res[i].sd, s->ns_router / 1e6 / s->tokens,
                   s->ns_attn / 1e6 / s->tokens, s->ns_moe / 1e6 / s->tokens,
                   s->ns_head / 1e6 / s->tokens,
                   s->neurons_total ? 100.0 * (1.0 - (double)s->neurons_active / s->neurons_total) : 0.0);
        }
    }
out:
    free(logits);
    free(toks);
    engine_destroy(&e);
    model_close(&m);
    return 0;
}
