/* lm_head_bench: how closely the sparse LM head (model/lm_head.h) agrees with the full head, and
 * how much faster it is, on the hidden states of long sampled generations.
 *
 * Phase 1: for each prompt, the in-process engine (full head) generates N tokens sampled at
 * temperature 0.6, top-k 20, top-p 0.95 (chat's defaults), seeded; the final hidden state of
 * every step is kept. Phase 2 (the engine gone, a fresh team of T threads): for every kept state
 * the full head (forward_head, packed as the engine has it) and, for each C asked for, the sparse
 * head are evaluated, alternately, each timed. Per step it compares:
 *   top-1     argmax of the sparse logits == argmax of the full logits;
 *   TV        total-variation distance 1/2 sum |P - Q| between the distributions the sampler
 *             draws from (top-k, top-p over the T=1 softmax, then temperature; sampler.c's order)
 *             of the full logits (P) and of the sparse logits (Q);
 *   mass      P's probability on rows the sparse head computed (1 - mass: tokens it can never
 *             produce at that step);
 *   recall    fraction of the full head's top-20 ids among the candidates.
 * Prints per prompt and overall, then the heads' median ms per token. Prompts are the model's
 * tokenizer's encoding of five fixed texts (random ids when the file has no tokenizer).
 * With -g B (phase 3), per C: decode speed of an engine with the full head against one with the
 * sparse head, paired: B blocks of 16 one-token evals on each engine in turn (which goes first
 * alternates), tok/s per block; prints the medians and the median of the blocks' ratios (robust
 * to other load on a shared host that drifts slower than a block).
 * Usage: lm_head_bench MODEL [-n tokens per prompt, 256] [-C list, 256,1024,4096] [-t threads, 2]
 *        [-s seed, 1] [-g blocks, 0]. Not a test. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kern/kern.h"
#include "model/engine.h"
#include "model/forward.h"
#include "model/lm_head.h"
#include "model/model.h"
#include "model/ops.h"
#include "model/sampler.h"
#include "tokenizer/tokenizer.h"

#define N_PROMPTS 5
#define MAX_C 16
#define TEMP 0.6f
#define TOP_K 20
#define TOP_P 0.95f

static const char *s_prompts[N_PROMPTS] = {
    "<|im_start|>user\nCalculate the integral of f(x) = sin(x) from 0 to 3pi/4.<|im_end|>\n"
    "<|im_start|>assistant\n",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "def quicksort(xs):\n    \"\"\"Sort a list of integers.\"\"\"\n",
    "The mixture-of-experts architecture routes each token to a few experts, so that",
    "<|im_start|>user\nWrite a short letter to a friend about your trip to Kyoto.<|im_end|>\n"
    "<|im_start|>assistant\n",
};

static double s_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int s_cmp_d(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double s_median(double *v, int n) {
    qsort(v, (size_t)n, sizeof(double), s_cmp_d);
    return n ? (n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2])) : 0.0;
}

/* The sampler's distribution (sampler.c: top-k, softmax, top-p, temperature) as n (id, p)
 * pairs, best first. ids/p: TOP_K entries. */
static int s_dist(const float *l, int V, int32_t *ids, double *p) {
    int n = 0;
    for (int i = 0; i < V; i++) { /* insertion into the top-k list (logit desc, id asc) */
        if (n == TOP_K && !(l[i] > l[ids[n - 1]])) continue;
        int j = n < TOP_K ? n++ : n - 1;
        while (j > 0 && l[i] > l[ids[j - 1]]) {
            ids[j] = ids[j - 1];
            j--;
        }
        ids[j] = i;
    }
    double sum = 0;
    for (int i = 0; i < n; i++)
        sum += p[i] = exp((double)l[ids[i]] - l[ids[0]]);
    int keep = n;
    double cum = 0;
    for (int i = 0; i < n; i++) {
        cum += p[i] / sum;
        if (cum >= TOP_P) {
            keep = i + 1;
            break;
        }
    }
    sum = 0;
    for (int i = 0; i < keep; i++)
        sum += p[i] = exp(((double)l[ids[i]] - l[ids[0]]) / TEMP);
    for (int i = 0; i < keep; i++)
        p[i] /= sum;
    return keep;
}

typedef struct acc {
    long steps, top1;
    double tv, tv_max, mass, recall;
} acc;

static void s_print(const char *name, const acc *a) {
    const double n = a->steps ? (double)a->steps : 1.0;
    printf("| %s | %ld | %.2f%% | %.4f | %.4f | %.4f | %.2f%% |\n", name, a->steps,
           100.0 * a->top1 / n, a->tv / n, a->tv_max, a->mass / n, 100.0 * a->recall / n);
}

/* Phase 3: paired decode speed, full head vs sparse head (see the top comment). */
static int s_paired_tg(const model *m, const int *cs, int nc, int n_blocks, int threads) {
    const int V = m->cfg.n_vocab, BL = 16;
    stp_err err = {0};
    float *logits = malloc(sizeof(float) * V);
    double *tf = malloc(sizeof(double) * n_blocks), *ts = malloc(sizeof(double) * n_blocks);
    double *ratio = malloc(sizeof(double) * n_blocks);
    printf("paired decode, %d blocks of %d tokens per engine, threads %d\n\n", n_blocks, BL,
           threads);
    printf("| C | full tok/s | sparse tok/s | median ratio | full head ms | sparse head ms |\n"
           "| ---: | ---: | ---: | ---: | ---: | ---: |\n");
    for (int ci = 0; ci < nc; ci++) {
        engine *e[2] = {NULL, NULL};
        for (int k = 0; k < 2; k++) {
            engine_params ep = {.n_threads = threads,
                                .n_ctx = n_blocks * BL + 1,
                                .sparse_head_candidates = k ? (cs[ci] < V ? cs[ci] : V) : 0};
            if (engine_new(&e[k], m, &ep, &err)) {
                fprintf(stderr, "lm_head_bench: %s\n", err.msg);
                return 1;
            }
        }
        uint64_t head_ns[2] = {0, 0}, toks[2] = {0, 0};
        for (int b = 0; b < n_blocks; b++) {
            for (int o = 0; o < 2; o++) {
                const int k = (b + o) % 2; /* which goes first alternates */
                const engine_stats *st = engine_get_stats(e[k]);
                const uint64_t h0 = st->ns_head, t0n = st->tokens;
                double t0 = s_now();
                for (int i = 0; i < BL; i++) {
                    int32_t id = (int32_t)((b * BL + i) * 2654435761u % (uint32_t)V);
                    if (engine_eval(e[k], &id, 1, logits, false, &err)) {
                        fprintf(stderr, "lm_head_bench: %s\n", err.msg);
                        return 1;
                    }
                }
                const double tps = BL / (s_now() - t0);
                (k ? ts : tf)[b] = tps;
                head_ns[k] += st->ns_head - h0;
                toks[k] += st->tokens - t0n;
            }
            ratio[b] = ts[b] / tf[b];
        }
        const double mf = s_median(tf, n_blocks), ms = s_median(ts, n_blocks);
        printf("| %d | %.2f | %.2f | %.3f | %.3f | %.3f |\n", cs[ci], mf, ms,
               s_median(ratio, n_blocks), head_ns[0] / 1e6 / (double)toks[0],
               head_ns[1] / 1e6 / (double)toks[1]);
        fflush(stdout);
        engine_destroy(&e[0]);
        engine_destroy(&e[1]);
    }
    free(logits);
    free(tf);
    free(ts);
    free(ratio);
    return 0;
}

int main(int argc, char **argv) {
    const char *path = NULL;
    int n_gen = 256, threads = 2, n_blocks = 0, nc = 3, cs[MAX_C] = {256, 1024, 4096};
    unsigned long long seed = 1;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "-n") && i + 1 < argc)
            n_gen = atoi(argv[++i]);
        else if (!strcmp(argv[i], "-t") && i + 1 < argc)
            threads = atoi(argv[++i]);
        else if (!strcmp(argv[i], "-g") && i + 1 < argc)
            n_blocks = atoi(argv[++i]);
        else if (!strcmp(argv[i], "-s") && i + 1 < argc)
            seed = strtoull(argv[++i], NULL, 10);
        else if (!strcmp(argv[i], "-C") && i + 1 < argc) {
            nc = 0;
            for (char *s = argv[++i]; *s && nc < MAX_C;) {
                char *end;
                cs[nc++] = (int)strtol(s, &end, 10);
                s = *end == ',' ? end + 1 : end;
                if (end == s && *s) break;
            }
        } else if (!path)
            path = argv[i];
    }
    if (!path || n_gen < 1 || threads < 1 || nc < 1) {
        fprintf(stderr,
                "usage: lm_head_bench MODEL [-n N] [-C 256,1024,4096] [-t T] [-s S] [-g B]\n");
        return 2;
    }
    stp_err err = {0};
    model *m = NULL;
    if (model_open(&m, path, &err)) {
        fprintf(stderr, "lm_head_bench: %s\n", err.msg);
        return 1;
    }
    const int V = m->cfg.n_vocab, E = m->cfg.n_embd;
    tokenizer *tok = NULL;
    if (tokenizer_new(&tok, m->gguf, &err)) tok = NULL;

    /* ---- phase 1: sampled generations with the full head, hidden states kept ---- */
    int32_t *prompt_ids[N_PROMPTS];
    int n_prompt[N_PROMPTS];
    int max_prompt = 0;
    for (int p = 0; p < N_PROMPTS; p++) {
        int32_t *ids = NULL;
        size_t nn = 0;
        int n = tok && !tokenizer_encode(tok, s_prompts[p], strlen(s_prompts[p]), TOK_PARSE_SPECIAL,
                                         &ids, &nn, &err)
                    ? (int)nn
                    : 0;
        if (n <= 0) { /* no tokenizer: 24 deterministic ids */
            free(ids);
            n = 24;
            ids = malloc(sizeof(int32_t) * n);
            for (int i = 0; i < n; i++)
                ids[i] = (int32_t)((p * 7919 + i * 104729 + 11) % V);
        }
        prompt_ids[p] = ids;
        n_prompt[p] = n;
        max_prompt = n > max_prompt ? n : max_prompt;
    }
    engine *e = NULL;
    engine_params ep = {.n_threads = threads, .n_ctx = max_prompt + n_gen + 1};
    if (engine_new(&e, m, &ep, &err)) {
        fprintf(stderr, "lm_head_bench: %s\n", err.msg);
        return 1;
    }
    float *states = malloc(sizeof(float) * (size_t)N_PROMPTS * n_gen * E);
    int32_t *argmax1 = malloc(sizeof(int32_t) * (size_t)N_PROMPTS * n_gen);
    float *logits = malloc(sizeof(float) * V), *lsp = malloc(sizeof(float) * V);
    double t_gen = s_now();
    for (int p = 0; p < N_PROMPTS; p++) {
        sampler_params sp;
        sampler_params_default(&sp);
        sp.temperature = TEMP;
        sp.top_k = TOP_K;
        sp.top_p = TOP_P;
        sp.seed = seed * 1000 + (unsigned)p;
        sampler *smp = NULL;
        if (sampler_new(&smp, &sp, V, &err)) return 1;
        engine_reset(e);
        int rc = engine_eval(e, prompt_ids[p], n_prompt[p], logits, false, &err);
        for (int s = 0; s < n_gen && !rc; s++) {
            const size_t k = (size_t)p * n_gen + s;
            memcpy(states + k * E, engine_last_hidden(e), sizeof(float) * E);
            argmax1[k] = sampler_argmax(logits, V);
            int32_t id = sampler_sample(smp, logits);
            sampler_accept(smp, id);
            if (s + 1 < n_gen) rc = engine_eval(e, &id, 1, logits, false, &err);
        }
        sampler_destroy(&smp);
        if (rc) {
            fprintf(stderr, "lm_head_bench: %s\n", err.msg);
            return 1;
        }
    }
    t_gen = s_now() - t_gen;
    engine_destroy(&e);

    /* ---- phase 2: both heads on every kept state ---- */
    threadpool *tp = NULL;
    if (threadpool_new(&tp, threads, &err)) return 1;
    const compute_ctx cc = {kern_ops_get(), tp};
    /* the full head packed, as the engine has it; built now, so the sparse head's first touch of
     * the file rows (its sketch build) is not undone by the packing's page release */
    if (model_enable_packing(m, MODEL_PACK_HEAD, &err) || model_pack_all(m, tp, NULL, NULL, &err))
        return 1;
    float *hn = malloc(sizeof(float) * E);
    uint8_t *xq = malloc((size_t)E * 4 + 64);
    const int S = N_PROMPTS * n_gen;
    double *t_full = malloc(sizeof(double) * S), *t_sp = malloc(sizeof(double) * S);
    printf("model %s: n_vocab %d, n_embd %d, head %s; %d prompts x %d sampled tokens (T %.2f, "
           "top-k %d, top-p %.2f, seed %llu; generation %.1f s); threads %d, kernels %s\n\n",
           path, V, E, tensor_type_name(m->output.type), N_PROMPTS, n_gen, TEMP, TOP_K, TOP_P, seed,
           t_gen, threads, cc.ops->level);
    for (int ci = 0; ci < nc; ci++) {
        const int C = cs[ci] < 1 ? 1 : cs[ci] > V ? V : cs[ci];
        lm_head *h = NULL;
        if (lm_head_new(&h, &cc, m, C, &err)) {
            fprintf(stderr, "lm_head_bench: %s\n", err.msg);
            return 1;
        }
        printf("C = %d (%.2f%% of the vocabulary; sketch %.2f MB + %.2f MB of rows vs %.2f MB "
               "a token)\n\n",
               C, 100.0 * C / V, lm_head_bytes(h) / 1e6, (double)C * m->output.row_bytes / 1e6,
               (double)V * m->output.row_bytes / 1e6);
        printf("| prompt | steps | top-1 agree | mean TV | max TV | mean P mass kept | top-20 "
               "recall |\n| ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n");
        acc all = {0};
        long mismatch = 0;
        for (int p = 0; p < N_PROMPTS; p++) {
            acc a = {0};
            for (int s = 0; s < n_gen; s++) {
                const size_t k = (size_t)p * n_gen + s;
                const float *x = states + k * E;
                double t0 = s_now();
                forward_head(&cc, m, x, hn, xq, logits);
                double t1 = s_now();
                lm_head_eval(h, &cc, x, lsp);
                double t2 = s_now();
                t_full[k] = t1 - t0;
                t_sp[k] = t2 - t1;
                const int32_t am = sampler_argmax(logits, V);
                mismatch += am != argmax1[k];
                int32_t ip[TOP_K], iq[TOP_K], i20[TOP_K];
                double pp[TOP_K], pq[TOP_K];
                const int np = s_dist(logits, V, ip, pp), nq = s_dist(lsp, V, iq, pq);
                /* TV over the union of the two supports */
                double tv = 0;
                for (int i = 0; i < np; i++) {
                    double q = 0;
                    for (int j = 0; j < nq; j++)
                        if (iq[j] == ip[i]) q = pq[j];
                    tv += fabs(pp[i] - q);
                }
                for (int j = 0; j < nq; j++) {
                    int in = 0;
                    for (int i = 0; i < np; i++)
                        in |= ip[i] == iq[j];
                    if (!in) tv += pq[j];
                }
                tv *= 0.5;
                double mass = 0;
                for (int i = 0; i < np; i++)
                    mass += lsp[ip[i]] != -INFINITY ? pp[i] : 0.0;
                /* top-20 of the full logits, untruncated by top-p */
                int n20 = 0;
                for (int i = 0; i < V; i++) {
                    if (n20 == TOP_K && !(logits[i] > logits[i20[n20 - 1]])) continue;
                    int j = n20 < TOP_K ? n20++ : n20 - 1;
                    while (j > 0 && logits[i] > logits[i20[j - 1]]) {
                        i20[j] = i20[j - 1];
                        j--;
                    }
                    i20[j] = i;
                }
                int hit = 0;
                for (int i = 0; i < n20; i++)
                    hit += lsp[i20[i]] != -INFINITY;
                a.steps++;
                a.top1 += sampler_argmax(lsp, V) == am;
                a.tv += tv;
                a.tv_max = tv > a.tv_max ? tv : a.tv_max;
                a.mass += mass;
                a.recall += (double)hit / n20;
            }
            char name[16];
            snprintf(name, sizeof name, "%d", p + 1);
            s_print(name, &a);
            all.steps += a.steps;
            all.top1 += a.top1;
            all.tv += a.tv;
            all.tv_max = a.tv_max > all.tv_max ? a.tv_max : all.tv_max;
            all.mass += a.mass;
            all.recall += a.recall;
        }
        s_print("all", &all);
        const double mf = s_median(t_full, S) * 1e3, ms = s_median(t_sp, S) * 1e3;
        printf("\nhead ms/token (median of %d): full %.3f, sparse %.3f (%.2fx)%s\n\n", S, mf, ms,
               mf / ms,
               mismatch ? " -- WARNING: recomputed full head differs from the engine's" : "");
        lm_head_destroy(&h);
    }
    free(states);
    free(argmax1);
    free(logits);
    free(lsp);
    free(hn);
    free(xq);
    free(t_full);
    free(t_sp);
    for (int p = 0; p < N_PROMPTS; p++)
        free(prompt_ids[p]);
    threadpool_destroy(&tp);
    if (n_blocks > 0 && s_paired_tg(m, cs, nc, n_blocks, threads)) return 1;
    tokenizer_destroy(&tok);
    model_close(&m);
    return 0;
}
