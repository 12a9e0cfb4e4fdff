/* cli_generate: `stpipe generate`, text generation in-process (the reference engine).
 * Parses the flags into a generate_opts, builds the prompt (text, ids or chat), evaluates it
 * in one batched pass, then samples token by token, streaming text (or ids) to stdout and
 * timings to stderr. */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cli.h"
#include "cli_pipeline.h"
#include "gen/token_step.h"
#include "model/engine.h"
#include "model/kv_cache.h"
#include "model/sampler.h"
#include "tokenizer/tokenizer.h"

typedef struct generate_opts {
    const char *model, *prompt, *prompt_ids, *prompt_file, *system, *logits_out, *pipeline;
    bool help, chat, ids_out, ignore_eos, no_parse_special, quiet;
    kv_dtype kv_type;
    int n_predict, threads, ctx, sparse_head;
    sampler_params sp;
} generate_opts;

#define F(x) offsetof(generate_opts, x)
static const opt_def s_opts[] = {
    CLI_OPT_HELP(generate_opts),
    CLI_OPT_MODEL(generate_opts, "SmallThinker GGUF file"),
    CLI_OPT_PIPELINE(generate_opts, "generate through a running pipeline (deploy/stpipe-up)"),
    {"--prompt", NULL, OPT_STR, 0, 0, NULL, "TEXT",
     "prompt text (special tokens like <|im_start|> are parsed)", F(prompt), NULL, "-p"},
    {"--prompt-ids", NULL, OPT_STR, 0, 0, NULL, "\"I ...\"",
     "prompt as token ids (no tokenizer needed)", F(prompt_ids), NULL, NULL},
    {"--file", NULL, OPT_STR, 0, 0, NULL, "F", "read the prompt text from F (- for stdin)",
     F(prompt_file), NULL, "-f"},
    {"--chat", NULL, OPT_FLAG, 0, 0, NULL, NULL,
     "wrap the prompt as a ChatML user message (+ --system TEXT); their <|...|> is plain text",
     F(chat), NULL, NULL},
    {"--system", NULL, OPT_STR, 0, 0, NULL, "TEXT", "system message for --chat", F(system), NULL,
     NULL},
    CLI_OPT_N_PREDICT(generate_opts, "64", "tokens to generate (-1 = until end of text)"),
    CLI_OPTS_SAMPLING(generate_opts, "0", "0", "1", "24301", "random seed for sampling"),
    CLI_OPT_THREADS(generate_opts, "2", "compute threads"),
    CLI_OPT_CTX(generate_opts, 1),
    CLI_OPT_SPARSE_HEAD(generate_opts),
    CLI_OPT_CACHE_TYPE(generate_opts, "KV cache: f16 (as llama.cpp's default), f32 (as the "
                                      "golden data, -ctk/-ctv f32: twice the bytes) or q8_0 (27% "
                                      "of f32's)"),
    {"--ids", NULL, OPT_FLAG, 0, 0, NULL, NULL,
     "print generated token ids on one line instead of text", F(ids_out), NULL, NULL},
    {"--ignore-eos", NULL, OPT_FLAG, 0, 0, NULL, NULL,
     "keep generating after an end-of-generation token", F(ignore_eos), NULL, NULL},
    {"--no-parse-special", NULL, OPT_FLAG, 0, 0, NULL, NULL,
     "treat <|...|> in the prompt as plain text (always so with --chat)", F(no_parse_special), NULL,
     NULL},
    {"--logits-out", NULL, OPT_STR, 0, 0, NULL, "FILE",
     "write float32 logits of every prompt position [n_prompt][n_vocab]", F(logits_out), NULL,
     NULL},
    {"--quiet", NULL, OPT_FLAG, 0, 0, NULL, NULL, "no timings on stderr", F(quiet), NULL, NULL},
};
#undef F

static void s_usage(FILE *f) {
    cli_opts_help(
        f,
        "usage: stpipe generate --model FILE (--prompt TEXT | --prompt-ids \"ID ...\" | --file F)\n"
        "                       [options]\n",
        s_opts, CLI_NOPTS(s_opts), NULL);
}

static double s_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int s_parse(int argc, char **argv, generate_opts *o) {
    memset(o, 0, sizeof *o);
    sampler_params_default(&o->sp);
    int rc = cli_opts_parse("generate", s_opts, CLI_NOPTS(s_opts), o, argc, argv, s_usage);
    if (rc) return rc;
    if (!o->model && !o->pipeline) {
        fprintf(stderr, "stpipe generate: --model FILE is required (see stpipe generate --help)\n");
        return 2;
    }
    if (o->pipeline && cli_opt_given(argc, argv, "--cache-type")) {
        fprintf(stderr, "stpipe generate: a pipeline's cache type is set when it starts "
                        "(deploy/stpipe-up --cache-type f16)\n");
        return 2;
    }
    if (!!o->prompt + !!o->prompt_ids + !!o->prompt_file != 1) {
        fprintf(stderr, "stpipe generate: give exactly one of --prompt, --prompt-ids, --file\n");
        return 2;
    }
    if (o->prompt_ids) { /* a malformed id list is a usage error: check it before loading */
        int32_t *tmp = NULL;
        int n = cli_parse_ids(o->prompt_ids, &tmp);
        free(tmp);
        if (n < 0) return 2;
        if (n == 0) {
            fprintf(stderr, "stpipe generate: --prompt-ids holds no ids\n");
            return 2;
        }
    }
    return 0;
}

/* Builds the prompt ids; returns count or -1. */
static int s_prompt_ids(const generate_opts *o, const tokenizer *tok, int32_t **ids) {
    if (o->prompt_ids) return cli_parse_ids(o->prompt_ids, ids);
    size_t len = 0;
    char *owned = NULL;
    const char *text = o->prompt;
    if (o->prompt_file) {
        owned = cli_read_file(o->prompt_file, &len);
        if (!owned) return -1;
        text = owned;
    } else {
        len = strlen(text);
    }
    stp_err err = {0};
    size_t n_ids = 0;
    int rc;
    if (o->chat) { /* the template's markers are special tokens, the messages' text is not */
        chat_msg msgs[2];
        size_t n = 0;
        if (o->system) msgs[n++] = (chat_msg){"system", o->system};
        msgs[n++] = (chat_msg){"user", text};
        rc = tokenizer_chat_encode(tok, msgs, n, true, ids, &n_ids, &err);
    } else {
        int flags = o->no_parse_special ? 0 : TOK_PARSE_SPECIAL;
        rc = tokenizer_encode(tok, text, len, flags, ids, &n_ids, &err);
    }
    free(owned);
    if (rc) {
        fprintf(stderr, "stpipe generate: %s%s\n",
                o->chat ? "" : "cannot tokenize the prompt: ", err.msg);
        return -1;
    }
    return (int)n_ids;
}

static volatile sig_atomic_t s_sigint; /* Ctrl-C during `generate --pipeline` */

static void s_on_sigint(int sig) {
    (void)sig;
    s_sigint = 1;
}

/* Through the pipeline. Ctrl-C cancels the request at the coordinator (CancelRequest: its ROUTER
 * cannot see a client go away), prints the answer so far and exits 130. */
static int s_generate_pipeline(const generate_opts *o) {
    pipeline_gen_opts po = {0};
    int32_t *ids = NULL;
    char *text = NULL;
    size_t len = 0;
    po.run_dir = o->pipeline;
    if (o->prompt_ids) {
        int n = cli_parse_ids(o->prompt_ids, &ids);
        if (n < 0) return 2;
        po.prompt_ids = ids;
        po.n_prompt = n;
    } else if (o->prompt_file) {
        if (!(text = cli_read_file(o->prompt_file, &len))) return 1;
        po.prompt_text = text;
    } else {
        po.prompt_text = o->prompt;
    }
    po.chat = o->chat;
    po.system = o->system;
    po.parse_special = !o->no_parse_special;
    po.n_predict = o->n_predict;
    po.sp = o->sp;
    po.ids_out = o->ids_out;
    po.ignore_eos = o->ignore_eos;
    po.quiet = o->quiet;
    po.logits_out = o->logits_out;
    po.cancel = &s_sigint;
    struct sigaction sa = {0}, old;
    sa.sa_handler = s_on_sigint;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, &old);
    int rc = cli_generate_pipeline(&po);
    sigaction(SIGINT, &old, NULL);
    free(ids);
    free(text);
    return s_sigint ? 130 : rc;
}

int cli_generate(int argc, char **argv) {
    generate_opts o;
    int rc = s_parse(argc, argv, &o);
    if (rc) return rc == CLI_HELP ? 0 : rc;
    if (o.pipeline) return s_generate_pipeline(&o);

    stp_err err = {0};
    model *m = NULL;
    tokenizer *tok = NULL;
    engine *e = NULL;
    token_step *step = NULL;
    int32_t *ids = NULL, *gen = NULL;
    float *logits = NULL;
    int status = 1;

    double t0 = s_now();
    if (model_open(&m, o.model, &err)) {
        fprintf(stderr, "stpipe generate: %s\n", err.msg);
        goto out;
    }
    if (m->warning[0] && !o.quiet) fprintf(stderr, "warning: %s\n", m->warning);
    bool need_tok = !o.prompt_ids || !o.ids_out;
    if (need_tok && tokenizer_new(&tok, m->gguf, &err)) {
        if (!o.prompt_ids) {
            fprintf(stderr, "stpipe generate: %s\n", err.msg);
            goto out;
        }
        tok = NULL; /* ids in, text out without a tokenizer: print ids instead */
        o.ids_out = true;
    }
    int n_prompt = s_prompt_ids(&o, tok, &ids);
    if (n_prompt < 0) goto out;
    if (n_prompt == 0) {
        fprintf(stderr, "stpipe generate: the prompt is empty (no tokens)\n");
        goto out;
    }
    engine_params ep = {.n_threads = (int)o.threads,
                        .n_ctx = (int)o.ctx,
                        .kv_type = o.kv_type,
                        .sparse_head_candidates = o.sparse_head,
                        .progress = cli_progress};
    if (engine_new(&e, m, &ep, &err)) {
        fprintf(stderr, "stpipe generate: %s\n", err.msg);
        goto out;
    }
    const int V = m->cfg.n_vocab;
    if (n_prompt > engine_n_ctx(e)) {
        fprintf(stderr,
                "stpipe generate: the prompt has %d tokens but the context holds %d "
                "(use --ctx-size up to %d or a shorter prompt)\n",
                n_prompt, engine_n_ctx(e), m->cfg.n_ctx_train);
        goto out;
    }
    long long n_max = o.n_predict < 0 ? engine_n_ctx(e) - n_prompt : o.n_predict;
    token_step_params tp = {
        .sp = o.sp, .n_vocab = V, .max_tokens = n_max, .ignore_eos = o.ignore_eos, .tok = tok};
    tp.no_text = o.ids_out;
    if (token_step_new(&step, &tp, &err)) {
        fprintf(stderr, "stpipe generate: %s\n", err.msg);
        goto out;
    }
    logits = malloc(sizeof(float) * (size_t)V * (o.logits_out ? (size_t)n_prompt : 1));
    gen = malloc(sizeof(int32_t) * (size_t)(n_max > 0 ? n_max : 1));
    if (!logits || !gen) {
        fprintf(stderr, "stpipe generate: out of memory\n");
        goto out;
    }
    double t_load = s_now() - t0;

    t0 = s_now();
    if (engine_eval(e, ids, n_prompt, logits, o.logits_out != NULL, &err)) {
        fprintf(stderr, "stpipe generate: %s\n", err.msg);
        goto out;
    }
    double t_prompt = s_now() - t0;
    if (o.logits_out) {
        FILE *f = fopen(o.logits_out, "wb");
        if (!f || fwrite(logits, sizeof(float), (size_t)V * n_prompt, f) != (size_t)V * n_prompt) {
            fprintf(stderr, "stpipe generate: cannot write '%s'\n", o.logits_out);
            if (f) fclose(f);
            goto out;
        }
        fclose(f);
        memmove(logits, logits + (size_t)(n_prompt - 1) * V, sizeof(float) * V);
    }
    token_step_prompt(step, ids, n_prompt);

    token_step_out so;
    int n_gen = 0;
    t0 = s_now();
    for (;;) {
        if (token_step_next(step, logits, &so)) {
            fprintf(stderr, "\nstpipe generate: out of memory\n");
            goto out;
        }
        if (so.id < 0) break; /* --n-predict 0 */
        gen[n_gen++] = so.id;
        if (so.len) {
            fwrite(so.text, 1, so.len, stdout);
            fflush(stdout);
        }
        if (so.finish) break;
        if (engine_n_past(e) >= engine_n_ctx(e)) {
            fprintf(stderr, "\nstpipe generate: context full after %d tokens\n", n_gen);
            break;
        }
        if (engine_eval(e, &so.id, 1, logits, false, &err)) {
            fprintf(stderr, "\nstpipe generate: %s\n", err.msg);
            goto out;
        }
    }
    double t_gen = s_now() - t0;
    if (o.ids_out) {
        for (int i = 0; i < n_gen; i++)
            printf(i ? " %d" : "%d", gen[i]);
        printf("\n");
    } else {
        if (token_step_end(step, &so)) goto out;
        fwrite(so.text, 1, so.len, stdout);
        printf("\n");
    }
    if (!o.quiet) {
        const engine_stats *st = engine_get_stats(e);
        fprintf(stderr,
                "load %.2f s | prompt %d tokens in %.3f s (%.1f tok/s) | generated %d tokens in "
                "%.3f s (%.1f tok/s) | experts: %.1f%% of neurons idle\n",
                t_load, n_prompt, t_prompt, n_prompt / t_prompt, n_gen, t_gen,
                n_gen > 1 ? (n_gen - 1) / t_gen : 0.0,
                st->neurons_total ? 100.0 * (1.0 - (double)st->neurons_active / st->neurons_total)
                                  : 0.0);
    }
    status = 0;
out:
    free(ids);
    free(gen);
    free(logits);
    token_step_destroy(&step);
    engine_destroy(&e);
    tokenizer_destroy(&tok);
    model_close(&m);
    return status;
}
