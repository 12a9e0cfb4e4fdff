/* cli_info: `stpipe info`, what a model file holds and what running it will cost. */
#include <stdio.h>
#include <string.h>

#include "cli.h"
#include "model/engine.h"

static void s_usage(FILE *f) {
    fprintf(f,
            "usage: stpipe info --model FILE [--ctx-size N] [--tensors]\n"
            "  prints architecture, shapes, tensor types and sizes, and the memory the\n"
            "  in-process engine will use (weights mapped from the file + KV cache + scratch)\n");
}

static double s_mib(size_t b) {
    return (double)b / (1024.0 * 1024.0);
}

int cli_info(int argc, char **argv) {
    const char *path = NULL;
    long long ctx = 0;
    bool tensors = false;
    for (int i = 0; i < argc; i++) {
        if (cli_opt_is(argv[i], "--help") || cli_opt_is(argv[i], "-h")) {
            s_usage(stdout);
            return 0;
        } else if ((cli_opt_is(argv[i], "--model") || cli_opt_is(argv[i], "-m")) && i + 1 < argc) {
            path = argv[++i];
        } else if (cli_opt_is(argv[i], "--ctx-size") && i + 1 < argc) {
            if (cli_parse_int(argv[++i], "--ctx-size", 1, 1 << 24, &ctx)) return 2;
        } else if (cli_opt_is(argv[i], "--tensors")) {
            tensors = true;
        } else if (i + 1 == argc && (cli_opt_is(argv[i], "--model") || cli_opt_is(argv[i], "-m") ||
                                     cli_opt_is(argv[i], "--ctx-size"))) {
            fprintf(stderr, "stpipe info: %s needs a value\n", argv[i]);
            return 2;
        } else {
            fprintf(stderr, "stpipe info: unknown option '%s'\n", argv[i]);
            s_usage(stderr);
            return 2;
        }
    }
    if (!path) {
        s_usage(stderr);
        return 2;
    }
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

    engine *e = NULL;
    engine_params ep = {.n_threads = 1, .n_ctx = (int)ctx};
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
    model_close(&m);
    return 0;
}
