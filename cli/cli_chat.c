/* cli_chat: `stpipe chat`, an interactive chat with history on a backend (in-process engine)
 * or through a running pipeline (--pipeline RUN_DIR: each turn sends the whole conversation's
 * messages to the coordinator, which formats and tokenizes the ChatML prompt (the messages'
 * text as plain text, never special tokens), samples and streams the answer back; its
 * scheduler finds the conversation's earlier turns still in a sequence slot (prefix reuse) and
 * evaluates only the new tokens).
 *
 * The KV cache is kept across turns: each turn evaluates only its new tokens (the previous
 * answer's unevaluated last token, "<|im_end|>\n" and the ChatML user turn). When the context
 * would overflow, the oldest exchanges are dropped and the rest re-evaluated. Ctrl-C stops the
 * current answer; at the prompt a second Ctrl-C exits. Reads lines from stdin (a tty or not);
 * answers go to stdout as they are produced, notes and tok/s to stderr. */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "gen/backend.h"
#include "cli.h"
#include "cli_pipeline.h"
#include "gen/gen_loop.h"

static volatile sig_atomic_t s_interrupted; /* set by SIGINT, cleared by the loop */

typedef struct chat_opts {
    const char *model, *system, *pipeline;
    bool help;
    int threads, ctx, n_predict, sparse_head;
    sampler_params sp;
    kv_dtype kv_type;
} chat_opts;

static const opt_def s_opts[] = {
    CLI_OPT_HELP(chat_opts),
    CLI_OPT_MODEL(chat_opts, "SmallThinker GGUF file (in-process engine)"),
    CLI_OPT_PIPELINE(chat_opts, "chat through a running pipeline (deploy/stpipe-up)"),
    {"--system", NULL, OPT_STR, 0, 0, NULL, "TEXT", "system message", offsetof(chat_opts, system),
     NULL, NULL},
    CLI_OPT_N_PREDICT(chat_opts, "1024", "max tokens per answer (-1 = until the context is full)"),
    CLI_OPTS_SAMPLING(chat_opts, "0.6", "20", "0.95", "-1", "random seed (-1 = from the clock)"),
    CLI_OPT_THREADS(chat_opts, "2", "compute threads"),
    CLI_OPT_CTX(chat_opts, 16),
    CLI_OPT_SPARSE_HEAD(chat_opts),
    CLI_OPT_CACHE_TYPE(chat_opts, "KV cache f32, f16 or q8_0 (--model only)"),
};

typedef struct chat_state {
    backend *b;
    chat_opts *o;
    chat_msg *msgs; /* history: optional system, then user/assistant pairs (contents malloc'd) */
    size_t n_msgs, cap_msgs;
    int32_t pending; /* last sampled token of the previous answer (not evaluated), -1 if none */
    bool tty;
} chat_state;

static void s_usage(FILE *f) {
    cli_opts_help(f, "usage: stpipe chat --model FILE [options]\n", s_opts, CLI_NOPTS(s_opts),
                  "In the chat: /reset forgets the conversation, /system TEXT sets the system "
                  "message\n(and resets), /quit exits. Ctrl-C stops an answer; twice at the "
                  "prompt exits.\n");
}

static void s_on_sigint(int sig) {
    (void)sig;
    s_interrupted = 1;
}

static int s_parse(int argc, char **argv, chat_opts *o) {
    memset(o, 0, sizeof *o);
    sampler_params_default(&o->sp);
    int rc = cli_opts_parse("chat", s_opts, CLI_NOPTS(s_opts), o, argc, argv, s_usage);
    if (rc) return rc;
    if (o->sp.seed == UINT64_MAX) /* the default, -1: from the clock */
        o->sp.seed = (uint64_t)time(NULL) ^ ((uint64_t)getpid() << 20);
    if (!!o->model == !!o->pipeline) {
        fprintf(stderr, "stpipe chat: give --model FILE or --pipeline RUN_DIR (see stpipe chat "
                        "--help)\n");
        return 2;
    }
    return 0;
}

/* ---- history ------------------------------------------------------------------------------ */

static int s_push(chat_state *c, const char *role, const char *content) {
    if (c->n_msgs == c->cap_msgs) {
        size_t nc = c->cap_msgs ? c->cap_msgs * 2 : 8;
        chat_msg *nm = realloc(c->msgs, nc * sizeof *nm);
        if (!nm) return STP_ENOMEM;
        c->msgs = nm;
        c->cap_msgs = nc;
    }
    char *dup = strdup(content);
    if (!dup) return STP_ENOMEM;
    c->msgs[c->n_msgs++] = (chat_msg){role, dup};
    return 0;
}

/* Forgets the conversation (keeps the system message) and empties the KV cache. */
static void s_clear(chat_state *c) {
    size_t keep = c->n_msgs && !strcmp(c->msgs[0].role, "system") ? 1 : 0;
    for (size_t i = keep; i < c->n_msgs; i++)
        free((char *)c->msgs[i].content);
    c->n_msgs = keep;
    c->pending = -1;
    if (c->b) backend_reset(c->b);
}

static void s_set_system(chat_state *c, const char *text) {
    s_clear(c);
    if (c->n_msgs) { /* drop the old system message */
        free((char *)c->msgs[0].content);
        c->n_msgs = 0;
    }
    if (text && *text) s_push(c, "system", text);
}

/* Encodes msgs[from..n) in ChatML (+ generation prompt), prefixed with prefix (template text:
 * its special tokens are parsed); the messages' text is plain text, never special tokens. */
static int s_encode(chat_state *c, const char *prefix, size_t from, int32_t **ids, size_t *n_ids,
                    stp_err *err) {
    const size_t n = c->n_msgs - from;
    char *fmt = NULL;
    tok_span *plain = malloc((n ? n : 1) * sizeof *plain);
    if (!plain) return stp_err_set(err, STP_ENOMEM, "out of memory");
    int rc = tokenizer_chat_format(c->b->tok, c->msgs + from, n, true, &fmt, plain, err);
    if (rc) {
        free(plain);
        return rc;
    }
    size_t pl = strlen(prefix), fl = strlen(fmt);
    char *text = malloc(pl + fl + 1);
    if (!text) {
        free(fmt);
        free(plain);
        return stp_err_set(err, STP_ENOMEM, "out of memory");
    }
    memcpy(text, prefix, pl);
    memcpy(text + pl, fmt, fl + 1);
    free(fmt);
    for (size_t i = 0; i < n; i++)
        plain[i].off += pl;
    rc = tokenizer_encode_spans(c->b->tok, text, pl + fl, TOK_PARSE_SPECIAL, plain, n, ids, n_ids,
                                err);
    free(text);
    free(plain);
    return rc;
}

/* Builds the tokens to evaluate for the user message just pushed (the last message). Keeps
 * the KV cache when the turn fits, else drops the oldest exchanges and starts over. */
static int s_turn_tokens(chat_state *c, int32_t **ids, int *n_out, stp_err *err) {
    const int n_ctx = backend_n_ctx(c->b);
    int reserve =
        c->o->n_predict > 0 && c->o->n_predict < n_ctx / 4 ? (int)c->o->n_predict : n_ctx / 4;
    size_t n_ids = 0;
    int rc;
    if (backend_n_past(c->b) > 0) { /* continue: close the answer, add the user turn */
        if ((rc = s_encode(c, "<|im_end|>\n", c->n_msgs - 1, ids, &n_ids, err))) return rc;
        int extra = c->pending >= 0 ? 1 : 0;
        if (backend_n_past(c->b) + extra + (int)n_ids + reserve <= n_ctx) {
            if (extra) {
                int32_t *ni = realloc(*ids, (n_ids + 1) * sizeof *ni);
                if (!ni) return stp_err_set(err, STP_ENOMEM, "out of memory");
                memmove(ni + 1, ni, n_ids * sizeof *ni);
                ni[0] = c->pending;
                *ids = ni;
                n_ids++;
            }
            *n_out = (int)n_ids;
            return 0;
        }
        free(*ids);
        *ids = NULL;
    }
    /* fresh sequence: the whole history, dropping the oldest exchanges until it fits */
    size_t first = c->n_msgs && !strcmp(c->msgs[0].role, "system") ? 1 : 0;
    bool dropped = false;
    for (;;) {
        if ((rc = s_encode(c, "", 0, ids, &n_ids, err))) return rc;
        if ((int)n_ids + reserve <= n_ctx || c->n_msgs - first <= 1) break;
        free(*ids);
        *ids = NULL;
        /* drop one user/assistant exchange after the system message */
        size_t k = c->n_msgs - first - 1 >= 2 ? 2 : 1;
        for (size_t i = first; i < first + k; i++)
            free((char *)c->msgs[i].content);
        memmove(c->msgs + first, c->msgs + first + k, (c->n_msgs - first - k) * sizeof *c->msgs);
        c->n_msgs -= k;
        dropped = true;
    }
    if ((int)n_ids >= n_ctx) {
        free(*ids);
        *ids = NULL;
        return stp_err_set(err, STP_ERANGE,
                           "the message needs %zu tokens but the context holds %d (use a "
                           "shorter message or a larger --ctx-size)",
                           n_ids, n_ctx);
    }
    if (dropped) fprintf(stderr, "[context full: dropped the oldest exchanges]\n");
    backend_reset(c->b);
    c->pending = -1;
    *n_out = (int)n_ids;
    return 0;
}

static int s_emit(void *ud, const char *text, size_t len) {
    (void)ud;
    fwrite(text, 1, len, stdout);
    fflush(stdout);
    return 0;
}

/* One exchange: the user's line is the last message. */
static int s_answer(chat_state *c) {
    stp_err err = {0};
    int32_t *ids = NULL;
    int n = 0;
    if (s_turn_tokens(c, &ids, &n, &err)) {
        fprintf(stderr, "stpipe chat: %s\n", err.msg);
        free((char *)c->msgs[--c->n_msgs].content); /* forget the message that did not fit */
        return 0;
    }
    gen_params gp = {.sp = c->o->sp, .max_tokens = (int)c->o->n_predict};
    gp.sp.seed += c->n_msgs; /* a different draw each turn, reproducible with --seed */
    gen_result res;
    s_interrupted = 0;
    int rc = gen_run(c->b, ids, n, &gp, s_emit, NULL, &s_interrupted, &res, &err);
    free(ids);
    fputc('\n', stdout);
    fflush(stdout);
    if (rc) {
        fprintf(stderr, "stpipe chat: %s (conversation reset)\n", err.msg);
        gen_result_fini(&res);
        s_clear(c);
        return 0;
    }
    int32_t last = res.n_gen ? res.ids[res.n_gen - 1] : -1;
    c->pending = last >= 0 && !tokenizer_is_eog(c->b->tok, last) ? last : -1;
    if (res.finish == GEN_FINISH_CANCEL) c->pending = -1; /* cancelled: all were evaluated */
    s_push(c, "assistant", res.text);
    fprintf(stderr, "[%s%d tokens, %.1f tok/s | prompt %d tokens, %.1f tok/s]\n",
            res.finish == GEN_FINISH_CANCEL ? "stopped: " : "", res.n_gen,
            res.n_gen > 1 && res.t_gen > 0 ? (res.n_gen - 1) / res.t_gen : 0.0, res.n_prompt,
            res.t_prompt > 0 ? res.n_prompt / res.t_prompt : 0.0);
    s_interrupted = 0;
    gen_result_fini(&res);
    return 0;
}

/* ---- through a pipeline ----------------------------------------------------------------- */

typedef struct text_buf {
    char *p;
    size_t n, cap;
} text_buf;

static void s_collect(void *ud, const char *text, size_t len) {
    text_buf *b = ud;
    fwrite(text, 1, len, stdout);
    fflush(stdout);
    if (b->n + len + 1 > b->cap) {
        size_t nc = (b->n + len + 1) * 2;
        char *np = realloc(b->p, nc);
        if (!np) return;
        b->p = np;
        b->cap = nc;
    }
    memcpy(b->p + b->n, text, len);
    b->n += len;
    b->p[b->n] = 0;
}

/* The whole conversation goes as messages: the coordinator formats the ChatML prompt (with the
 * generation prompt) and tokenizes the messages' text as plain text, as s_encode does. */
static int s_answer_pipeline(chat_state *c) {
    text_buf tb = {0};
    pipeline_gen_result gr = {0};
    pipeline_gen_opts po = {.run_dir = c->o->pipeline,
                            .result = &gr,
                            .messages = c->msgs,
                            .n_messages = c->n_msgs,
                            .n_predict = c->o->n_predict,
                            .sp = c->o->sp,
                            .quiet = true,
                            .on_text = s_collect,
                            .ud = &tb,
                            .cancel = &s_interrupted};
    po.sp.seed += c->n_msgs;
    s_interrupted = 0;
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    int rc = cli_generate_pipeline(&po);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    bool stopped = s_interrupted;
    s_interrupted = 0;
    fputc('\n', stdout);
    fflush(stdout);
    if (rc) {
        fprintf(stderr, "stpipe chat: the pipeline did not answer (message dropped)\n");
        free((char *)c->msgs[--c->n_msgs].content);
        free(tb.p);
        return 0;
    }
    s_push(c, "assistant", tb.p ? tb.p : "");
    double gen_s = gr.gen_ms * 1e-3;
    fprintf(stderr,
            "[%s%d tokens, %.1f tok/s | prompt %d tokens (%d evaluated) in %.3f s | %.1f s]\n",
            stopped ? "stopped: " : "", gr.n_gen,
            gr.n_gen > 1 && gen_s > 0 ? (gr.n_gen - 1) / gen_s : 0.0, gr.n_prompt, gr.n_prompt_eval,
            gr.prompt_ms * 1e-3, (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) * 1e-9);
    free(tb.p);
    return 0;
}

int cli_chat(int argc, char **argv) {
    chat_opts o;
    int rc = s_parse(argc, argv, &o);
    if (rc) return rc == CLI_HELP ? 0 : rc;
    stp_err err = {0};
    chat_state c = {.o = &o, .pending = -1, .tty = isatty(0)};
    backend_engine_params bp = {.model_path = o.model,
                                .n_threads = (int)o.threads,
                                .n_ctx = (int)o.ctx,
                                .kv_type = o.kv_type,
                                .progress = cli_progress,
                                .sparse_head_candidates = o.sparse_head};
    if (o.model && backend_engine_new(&c.b, &bp, &err)) {
        fprintf(stderr, "stpipe chat: %s\n", err.msg);
        return 1;
    }
    if (c.b && c.b->warning[0]) fprintf(stderr, "warning: %s\n", c.b->warning);
    if (o.system) s_set_system(&c, o.system);

    struct sigaction sa = {0}, old;
    sa.sa_handler = s_on_sigint;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = 0; /* no SA_RESTART: a Ctrl-C interrupts the read at the prompt */
    sigaction(SIGINT, &sa, &old);
    if (c.tty && c.b)
        fprintf(stderr,
                "stpipe chat: %s, context %d tokens. /reset, /system TEXT, /quit; "
                "Ctrl-C stops an answer.\n",
                c.b->name, backend_n_ctx(c.b));
    else if (c.tty)
        fprintf(stderr,
                "stpipe chat: pipeline %s. /reset, /system TEXT, /quit; Ctrl-C stops "
                "an answer.\n",
                o.pipeline);

    char *line = NULL;
    size_t cap = 0;
    bool armed = false; /* a Ctrl-C at the prompt: the next one exits */
    for (;;) {
        if (c.tty) {
            fputs("> ", stdout);
            fflush(stdout);
        }
        errno = 0;
        ssize_t len = getline(&line, &cap, stdin);
        if (len < 0) {
            if (s_interrupted || errno == EINTR) {
                clearerr(stdin);
                s_interrupted = 0;
                if (armed) break;
                armed = true;
                fprintf(stderr, "\n(Ctrl-C again or /quit to exit)\n");
                continue;
            }
            if (c.tty) fputc('\n', stdout);
            break; /* end of input */
        }
        armed = false;
        while (len > 0 && (line[len - 1] == '\n' || line[len - 1] == '\r'))
            line[--len] = 0;
        if (len == 0) continue;
        if (!strcmp(line, "/quit") || !strcmp(line, "/exit")) break;
        if (!strcmp(line, "/reset")) {
            s_clear(&c);
            fprintf(stderr, "[conversation reset]\n");
            continue;
        }
        if (!strncmp(line, "/system", 7) && (line[7] == ' ' || !line[7])) {
            const char *text = line[7] ? line + 8 : "";
            s_set_system(&c, text);
            fprintf(stderr, *text ? "[system message set; conversation reset]\n"
                                  : "[system message cleared; conversation reset]\n");
            continue;
        }
        if (line[0] == '/' && strncmp(line, "//", 2)) {
            fprintf(stderr,
                    "[unknown command %s: /reset, /system TEXT, /quit; start with // to "
                    "send a line beginning with /]\n",
                    line);
            continue;
        }
        if (s_push(&c, "user", line[0] == '/' ? line + 1 : line)) {
            fprintf(stderr, "stpipe chat: out of memory\n");
            break;
        }
        if (c.b)
            s_answer(&c);
        else
            s_answer_pipeline(&c);
    }
    sigaction(SIGINT, &old, NULL);
    free(line);
    for (size_t i = 0; i < c.n_msgs; i++)
        free((char *)c.msgs[i].content);
    free(c.msgs);
    backend_destroy(&c.b);
    return 0;
}
