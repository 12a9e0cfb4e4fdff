/* cli_info: `stpipe info`, what a model file holds and what running it will cost: in process
 * (engine_new's own counts) and, with --memory-budget, the pipeline's plan (common/plan/budget.h:
 * the same function the storage daemon sizes its pool by, so the two never disagree). */
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "cli.h"
#include "layout/layout.h"
#include "model/engine.h"
#include "model/kv_cache.h"
#include "plan/budget.h"
#include "util/sysinfo.h"

typedef struct info_opts {
    const char *model;
    bool help, tensors;
    int ctx, workers, threads, parallel, kv_pool;
    kv_dtype kv_type;
    uint64_t budget;
} info_opts;

/* --memory-budget: a size (1G, 800M, ...) above 0. */
static int s_budget(const char *v, void *field, stp_err *err) {
    int rc = budget_parse_size(v, (uint64_t *)field, err);
    if (!rc && !*(uint64_t *)field) rc = stp_err_set(err, STP_EINVAL, "> 0");
    return rc;
}

#define F(x) offsetof(info_opts, x)
static const opt_def s_opts[] = {
    CLI_OPT_HELP(info_opts),
    CLI_OPT_MODEL(info_opts, "GGUF file"),
    CLI_OPT_CTX(info_opts, 1),
    CLI_OPT_CACHE_TYPE(info_opts, "KV cache type"),
    {"--tensors", NULL, OPT_FLAG, 0, 0, NULL, NULL, "list every tensor", F(tensors), NULL, NULL},
    {"--memory-budget", NULL, OPT_FN, 0, 0, NULL, "B", "the pipeline's plan under B (1G, 800M)",
     F(budget), s_budget, NULL},
    {"--workers", NULL, OPT_INT, 1, 64, "1", "N", "plan: expert workers", F(workers), NULL, NULL},
    {"--parallel", NULL, OPT_INT, 1, 256, "4", "N",
     "plan: the attention worker's sequence slots (a KV cache each)", F(parallel), NULL, NULL},
    {"--kv-pool", NULL, OPT_INT, 0, 1 << 24, "0", "N",
     "plan: KV positions the slots hold at once (0: parallel x ctx-size)", F(kv_pool), NULL, NULL},
    CLI_OPT_THREADS(info_opts, "1", "plan: the attention worker's threads (as the daemon plans)"),
};
#undef F

static void s_usage(FILE *f) {
    cli_opts_help(
        f,
        "usage: stpipe info --model FILE [--ctx-size N] [--cache-type f32|f16|q8_0] [--tensors]\n"
        "                   [--memory-budget B [--workers N] [--threads N] [--parallel N] "
        "[--kv-pool N]]\n"
        "  prints architecture, shapes, tensor types and sizes, and the memory the\n"
        "  in-process engine will use (weights mapped from the file + KV cache + scratch);\n"
        "  with --memory-budget (1G, 800M, ...) the pipeline's plan under that budget, as\n"
        "  the storage daemon computes it: what each stage needs outside the expert pool,\n"
        "  the minimum budget and the pool's frames. Exit status 1 when the budget is below\n"
        "  the minimum.\n",
        s_opts, CLI_NOPTS(s_opts), NULL);
}

static double s_mib(size_t b) {
    return (double)b / (1024.0 * 1024.0);
}

/* The pipeline's plan under --memory-budget; 1 when the budget is below the minimum. */
static int s_print_plan(const model *m, const budget_params *bp) {
    budget_plan p;
    stp_err err = {0};
    int rc = budget_plan_compute(&p, bp, &err);
    printf("pipeline plan   budget %.1f MiB, context %d, KV cache %s, %d sequence%s, %d expert "
           "worker%s, %d attention thread%s\n",
           s_mib(p.budget), p.n_ctx, kv_cache_type_name(p.kv_type), p.n_seq, p.n_seq > 1 ? "s" : "",
           p.workers, p.workers > 1 ? "s" : "", p.threads, p.threads > 1 ? "s" : "");
    printf("  non-expert weights    %9.1f MiB (attention worker)\n", s_mib(p.non_expert));
    printf("  KV cache              %9.1f MiB (a pool of %d positions over %d slot%s)\n",
           s_mib(p.kv), p.kv_pool, p.n_seq, p.n_seq > 1 ? "s" : "");
    printf("  activation region     %9.1f MiB (ubatch %d)\n", s_mib(p.act), p.n_ubatch);
    printf("  attention scratch     %9.1f MiB + buffers %.1f MiB\n", s_mib(p.attn_scratch),
           s_mib(p.attn_buffers));
    printf("  expert workers        %9.1f MiB (%d x %.1f MiB scratch)\n",
           s_mib((size_t)p.workers * p.worker), p.workers, s_mib(p.worker));
    printf("  processes             %9.1f MiB (%d stages + tokenizer)\n", s_mib(p.overhead),
           3 + p.workers);
    printf("  pool table            %9.1f MiB\n", s_mib(p.table));
    printf("  fixed                 %9.1f MiB\n", s_mib(p.fixed));
    printf("  minimum budget        %9.1f MiB (fixed + one layer: %d experts of %.2f MiB)\n",
           s_mib(p.minimum), m->cfg.n_expert, s_mib(p.frame_bytes));
    if (rc) {
        printf("  pool                  none: the budget %.1f MiB is below the minimum %.1f MiB\n",
               s_mib(p.budget), s_mib(p.minimum));
        fprintf(stderr, "stpipe info: %s\n", err.msg);
        return 1;
    }
    printf("  pool                  %9.1f MiB: %d of %d experts (%.1f%%)%s\n", s_mib(p.pool_bytes),
           p.frames, p.all_frames, 100.0 * p.frames / p.all_frames,
           p.frames == p.all_frames ? ", every expert resident" : ", the rest streamed");
    return 0;
}

int cli_info(int argc, char **argv) {
    info_opts o;
    memset(&o, 0, sizeof o);
    int bad = cli_opts_parse("info", s_opts, CLI_NOPTS(s_opts), &o, argc, argv, s_usage);
    if (bad) return bad == CLI_HELP ? 0 : bad;
    if (!o.model) {
        fprintf(stderr, "stpipe info: --model FILE is required\n");
        s_usage(stderr);
        return 2;
    }
    const char *path = o.model;
    const int ctx = o.ctx, workers = o.workers, threads = o.threads, parallel = o.parallel;
    const bool tensors = o.tensors;
    const kv_dtype kv_type = o.kv_type;
    const uint64_t budget = o.budget;
    stp_err err = {0};
    model *m = NULL;
    if (model_open(&m, path, &err)) {
        fprintf(stderr, "stpipe info: %s\n", err.msg);
        return 1;
    }
    const model_config *c = &m->cfg;
    printf("file            %s (GGUF v%u, %.1f MiB)\n", path, gguf_version(m->gguf),
           s_mib(gguf_file_size(m->gguf)));
    printf("architecture    smallthinker\n");
    printf("layers          %d\n", c->n_layer);
    printf("embedding       %d\n", c->n_embd);
    printf("heads           %d query / %d kv, head dim %d\n", c->n_head, c->n_head_kv, c->head_dim);
    printf("experts         %d, %d used per token, ffn %d, %s gating%s\n", c->n_expert,
           c->n_expert_used, c->n_ff_exp, c->gating == GATING_SIGMOID ? "sigmoid" : "softmax",
           c->gating_guessed ? " (guessed: key absent)" : "");
    if (c->sliding_window)
        printf("attention       layers %% %d == 0: NoPE + full; others: RoPE + window %d\n",
               c->nope_step, c->sliding_window);
    else
        printf("attention       every layer RoPE + full causal\n");
    printf("rope base       %g, rms eps %g\n", c->rope_base, c->rms_eps);
    printf("vocabulary      %d, LM head %s\n", c->n_vocab,
           c->tied ? "tied (token_embd)" : "output.weight");
    printf("context         %d (trained)\n", c->n_ctx_train);

    /* tensor types */
    size_t per_type[STP_TYPE_COUNT] = {0}, cnt_type[STP_TYPE_COUNT] = {0};
    for (size_t i = 0; i < gguf_tensor_count(m->gguf); i++) {
        const gguf_tensor *t = gguf_tensor_at(m->gguf, i);
        per_type[t->type] += t->nbytes;
        cnt_type[t->type]++;
        if (tensors)
            printf("  %-32.*s %-5s [%lld, %lld, %lld] %.2f MiB\n", (int)t->name.len, t->name.ptr,
                   tensor_type_name(t->type), (long long)t->ne[0], (long long)t->ne[1],
                   (long long)t->ne[2], s_mib(t->nbytes));
    }
    printf("tensor types   ");
    for (int ty = 0; ty < STP_TYPE_COUNT; ty++)
        if (cnt_type[ty])
            printf(" %s x%zu (%.1f MiB)", tensor_type_name(ty), cnt_type[ty], s_mib(per_type[ty]));
    printf("\n");
    printf("weights         %.1f MiB, of which experts %.1f MiB (%.1f%%)\n", s_mib(m->weight_bytes),
           s_mib(m->expert_bytes), 100.0 * m->expert_bytes / (double)m->weight_bytes);
    size_t active = m->expert_bytes / c->n_expert * c->n_expert_used;
    printf("per token       %.1f MiB of expert weights read (dense), plus attention and LM head\n",
           s_mib(active));
    char cpu[256]; /* the machine the plans below are for, as stpipe bench names it */
    sysinfo_cpu_model(cpu, sizeof cpu);
    printf("machine         %s, %ld cores\n", cpu, sysconf(_SC_NPROCESSORS_ONLN));

    engine *e = NULL;
    engine_params ep = {.n_threads = 1, .n_ctx = (int)ctx, .kv_type = kv_type};
    if (engine_new(&e, m, &ep, &err)) {
        fprintf(stderr, "stpipe info: %s\n", err.msg);
        model_close(&m);
        return 1;
    }
    printf(
        "memory          weights %.1f MiB (mapped) + KV cache %.1f MiB (ctx %d) + scratch %.1f MiB"
        " = %.1f MiB\n",
        s_mib(m->weight_bytes), s_mib(engine_kv_bytes(e)), engine_n_ctx(e),
        s_mib(engine_scratch_bytes(e)),
        s_mib(m->weight_bytes + engine_kv_bytes(e) + engine_scratch_bytes(e)));
    engine_destroy(&e);
    int rc = 0;
    if (budget) {
        budget_params bp = {.cfg = c,
                            .non_expert = m->weight_bytes - m->expert_bytes,
                            .frame_bytes = layout_frame_bytes(m, layout_wants_flags(m)),
                            .n_ctx = (int)ctx,
                            .kv_type = kv_type,
                            .n_seq = (int)parallel,
                            .kv_pool = o.kv_pool,
                            .workers = (int)workers,
                            .threads = (int)threads,
                            .budget = budget};
        rc = s_print_plan(m, &bp);
    }
    model_close(&m);
    return rc;
}
