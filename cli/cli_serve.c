/* cli_serve: `stpipe serve`, the OpenAI-compatible HTTP server over the in-process engine with
 * --parallel sequence slots (continuous batching and prefix reuse: common/gen/sched.h), or over
 * a running pipeline (--pipeline RUN_DIR: the jobs go to the coordinator, whose scheduler runs
 * them over the attention worker's slots; serve_pipeline.h).
 * Parses the flags, opens the backend, starts http_server and waits for SIGINT/SIGTERM; prints
 * "listening on http://HOST:PORT" on stderr once it accepts connections (with --port 0 the
 * port is the one the system picked). The API key comes from --api-key or, so that it does
 * not show in ps, from the environment (STP_API_KEY, read by the option table). Endpoints, fields
 * and limits: docs/SERVER.md. */
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "gen/backend.h"
#include "cli.h"
#include "gguf/gguf.h"
#include "http_server.h"
#include "model/kv_cache.h"
#include "serve_pipeline.h"
#include "tokenizer/tokenizer.h"

static volatile sig_atomic_t s_stop;

static void s_on_signal(int sig) {
    (void)sig;
    s_stop = 1;
}

/* SIGINT and SIGTERM stay blocked from the start in every thread (each inherits the mask of
 * the thread that creates it: the engine's team, the server's, ZeroMQ's), and the main thread
 * takes them only inside sigsuspend. `while (!s_stop) pause();` lost a stop two ways: a
 * signal between the test and pause() (nothing wakes pause), and a signal the kernel handed
 * to another thread (the flag set, the main thread asleep on). One arriving while the model
 * loads waits, pending, and stops the server as soon as it is up. */
static void s_stop_block(sigset_t *old) {
    sigset_t stop;
    sigemptyset(&stop);
    sigaddset(&stop, SIGINT);
    sigaddset(&stop, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &stop, old);
}

static void s_stop_wait(const sigset_t *old) {
    sigset_t wait = *old; /* the mask from before, with the two open even if a parent blocked
                           * them; sigsuspend sets it atomically, for the wait only */
    sigdelset(&wait, SIGINT);
    sigdelset(&wait, SIGTERM);
    while (!s_stop)
        sigsuspend(&wait);
    pthread_sigmask(SIG_SETMASK, old, NULL);
}

typedef struct serve_opts {
    const char *model, *host, *pipeline, *cors, *api_key;
    bool help;
    int port, threads, queue, ctx, max_tokens, max_body, idle, max_conn, parallel, chunk, kv_pool,
        sparse_head, chat_memo, prefill_layers;
    kv_dtype kv_type;
} serve_opts;

#define F(x) offsetof(serve_opts, x)
static const opt_def s_opts[] = {
    CLI_OPT_HELP(serve_opts),
    CLI_OPT_MODEL(serve_opts, "SmallThinker GGUF file (in-process engine)"),
    {"--host", NULL, OPT_STR, 0, 0, "127.0.0.1", "ADDR",
     "address to listen on (0.0.0.0 for every interface)", F(host), NULL, NULL},
    {"--port", NULL, OPT_INT, 0, 65535, "8080", "N", "TCP port (0 = any free port, printed)",
     F(port), NULL, NULL},
    CLI_OPT_THREADS(serve_opts, "2", "compute threads"),
    {"--queue", NULL, OPT_INT, 0, 4096, "8", "N",
     "requests that may wait for a free slot; more get 503", F(queue), NULL, NULL},
    CLI_OPT_CTX(serve_opts, 16),
    {"--parallel", NULL, OPT_INT, 1, 64, "4", "N",
     "sequence slots: requests generated at once (each with its own KV cache of --ctx-size "
     "positions, kept after the answer for prefix reuse)",
     F(parallel), NULL, "-np"},
    {"--kv-pool", NULL, OPT_INT, 0, 1 << 24, "0", "N",
     "KV positions all slots hold at once (idle slots give theirs back when needed; 0 = "
     "parallel x ctx-size)",
     F(kv_pool), NULL, NULL},
    {"--prefill-chunk", NULL, OPT_INT, 1, 4096, "64", "N",
     "prompt tokens a step evaluates beside decoding requests (larger: faster prompts, longer "
     "pauses in the other streams)",
     F(chunk), NULL, NULL},
    {"--prefill-layers", NULL, OPT_INT, -1, 4096, "0", "N",
     "while requests decode, a prompt chunk runs N layers a step, so their streams pause for "
     "a slice of it (0 = the model's layers / 16, rounded up; -1 = the whole chunk in one step; "
     "--model only: a pipeline's is stpipe-up --prefill-layers)",
     F(prefill_layers), NULL, NULL},
    {"--chat-memo", NULL, OPT_INT, 0, 65536, "16", "N",
     "answers kept so that a chat's next turn, which sends the answer back as text, starts with "
     "the ids the model wrote (those its slot holds) instead of the text's encoding; 0 = off: "
     "every chat encoded whole, its ids a function of its text alone (docs/SERVER.md)",
     F(chat_memo), NULL, NULL},
    CLI_OPT_SPARSE_HEAD(serve_opts),
    CLI_OPT_CACHE_TYPE(serve_opts, "KV cache f16, f32 or q8_0 (--model only; a pipeline's is set "
                                   "by deploy/stpipe-up --cache-type)"),
    {"--max-tokens-default", NULL, OPT_INT, 0, 1 << 24, "1024", "N",
     "answer length when a request gives no max_tokens (0 = until the context is full)",
     F(max_tokens), NULL, NULL},
    {"--max-body", NULL, OPT_INT, 1024, 1 << 30, "8388608", "BYTES",
     "largest request body; bigger ones get 413", F(max_body), NULL, NULL},
    {"--idle-timeout", NULL, OPT_INT, 1, 3600, "10", "S",
     "close a connection silent for S seconds (not counting the time its answer is generated)",
     F(idle), NULL, NULL},
    {"--max-connections", NULL, OPT_INT, 2, 4096, "256", "N",
     "open connections, one thread each; more are closed at once", F(max_conn), NULL, NULL},
    {"--cors", NULL, OPT_STR, 0, 0, NULL, "ORIGIN",
     "allow cross-origin requests from ORIGIN (e.g. http://localhost:3000; \"*\" = any); "
     "default: none, and a request to /v1/ with another Origin header gets 403",
     F(cors), NULL, NULL},
    {"--api-key", "STP_API_KEY", OPT_STR, 0, 0, NULL, "KEY",
     "require \"Authorization: Bearer KEY\" on /v1/ (else 401); the variable keeps the key "
     "out of ps",
     F(api_key), NULL, NULL},
    CLI_OPT_PIPELINE(serve_opts, "serve through a running pipeline (deploy/stpipe-up; its "
                                 "coordinator's model, slots and context)"),
};
#undef F

static void s_usage(FILE *f) {
    cli_opts_help(f, "usage: stpipe serve (--model FILE | --pipeline RUN_DIR) [options]\n", s_opts,
                  CLI_NOPTS(s_opts),
                  "Endpoints: POST /v1/chat/completions, POST /v1/completions (\"stream\": true "
                  "for server-sent events),\nGET /v1/models, GET /health, GET /metrics. See "
                  "docs/SERVER.md.\n");
}

/* ---- --pipeline: the coordinator runs the jobs ------------------------------------------- */

typedef struct pipe_runner_ctx {
    serve_pipeline *sp;
    int n_seq;
} pipe_runner_ctx;

static int s_pr_submit(void *ctx, const sched_req *r, stp_err *err) {
    return serve_pipeline_submit(((pipe_runner_ctx *)ctx)->sp, r, err);
}
static bool s_pr_busy(void *ctx) {
    return serve_pipeline_busy(((pipe_runner_ctx *)ctx)->sp);
}
/* As many jobs in flight as the coordinator has slots: the others wait in the HTTP queue (its
 * 503 beyond --queue), not in the coordinator's. */
static int s_pr_n_free(void *ctx) {
    pipe_runner_ctx *p = ctx;
    int n = p->n_seq - serve_pipeline_n_running(p->sp);
    return n > 0 ? n : 0;
}
static void s_pr_step(void *ctx) {
    serve_pipeline_step(((pipe_runner_ctx *)ctx)->sp, 20);
}

/* The model file's tokenizer and name (--model, else the coordinator's file). */
static int s_serve_pipeline(const serve_opts *o, const http_server_config *hc,
                            const sigset_t *old) {
    stp_err err = {0};
    char path[4096];
    int n_seq = 0, n_ctx = 0;
    if (serve_pipeline_info(o->pipeline, path, sizeof path, &n_seq, &n_ctx, 10000, &err)) {
        fprintf(stderr, "stpipe serve: %s\n", err.msg);
        return 1;
    }
    if (o->model) snprintf(path, sizeof path, "%s", o->model);
    if (!path[0] || n_ctx <= 0) {
        fprintf(stderr,
                "stpipe serve: the coordinator in %s did not say its model and context "
                "(an older coordinator?)\n",
                o->pipeline);
        return 1;
    }
    gguf_file *g = NULL;
    tokenizer *tok = NULL;
    if (gguf_open(&g, path, &err) || tokenizer_new(&tok, g, &err)) {
        fprintf(stderr, "stpipe serve: %s: %s (give the model with --model FILE)\n", path, err.msg);
        gguf_close(&g);
        return 1;
    }
    char name[128];
    const char *slash = strrchr(path, '/');
    const char *base = slash ? slash + 1 : path;
    size_t nl = strlen(base) < sizeof name ? strlen(base) : sizeof name - 1;
    memcpy(name, base, nl);
    name[nl] = 0;
    char *dot = strstr(name, ".gguf");
    if (dot && !dot[5]) *dot = 0;
    pipe_runner_ctx pr = {.n_seq = n_seq > 0 ? n_seq : 1};
    http_server *srv = NULL;
    int status = 1;
    if (serve_pipeline_new(&pr.sp, o->pipeline, &err)) {
        fprintf(stderr, "stpipe serve: %s\n", err.msg);
        goto out;
    }
    const http_model mi = {
        .name = name, .tok = tok, .n_ctx = n_ctx, .n_vocab = tokenizer_n_vocab(tok)};
    const http_runner run = {.ctx = &pr,
                             .submit = s_pr_submit,
                             .busy = s_pr_busy,
                             .n_free = s_pr_n_free,
                             .step = s_pr_step};
    if (http_server_new_runner(&srv, hc, &mi, &run, &err)) {
        fprintf(stderr, "stpipe serve: %s\n", err.msg);
        goto out;
    }
    bool v6 = strchr(hc->host, ':') != NULL;
    fprintf(stderr,
            "stpipe serve: pipeline %s, model %s, %d slots of context %d, queue %d, max_tokens "
            "default %d, prompt text up to %zu bytes, %s, %s; listening on http://%s%s%s:%d\n",
            o->pipeline, name, pr.n_seq, n_ctx, hc->queue_max, hc->max_tokens_default,
            http_server_prompt_bytes_max(srv), hc->api_key ? "API key required" : "no API key",
            hc->cors_origin ? "CORS on" : "CORS off", v6 ? "[" : "", hc->host, v6 ? "]" : "",
            http_server_port(srv));
    fflush(stderr);
    s_stop_wait(old);
    fprintf(stderr, "stpipe serve: stopping\n");
    status = 0;
out:
    http_server_destroy(&srv); /* stops the worker thread: then the runner can go */
    serve_pipeline_destroy(&pr.sp);
    tokenizer_destroy(&tok);
    gguf_close(&g);
    return status;
}

int cli_serve(int argc, char **argv) {
    serve_opts o;
    memset(&o, 0, sizeof o);
    int bad = cli_opts_parse("serve", s_opts, CLI_NOPTS(s_opts), &o, argc, argv, s_usage);
    if (bad) return bad == CLI_HELP ? 0 : bad;
    const char *model = o.model, *host = o.host, *pipeline = o.pipeline, *cors = o.cors;
    const char *api_key = o.api_key;
    const int queue = o.queue, max_tokens = o.max_tokens;
    if (!model && !pipeline) {
        fprintf(stderr, "stpipe serve: --model FILE or --pipeline RUN_DIR is required (see stpipe "
                        "serve --help)\n");
        return 2;
    }
    /* signals: handled before any thread starts, blocked in all but the final wait */
    struct sigaction sa = {0};
    sa.sa_handler = s_on_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
    sigset_t old;
    s_stop_block(&old);
    http_server_config hc = {.host = host,
                             .port = o.port,
                             .queue_max = queue,
                             .max_body = o.max_body,
                             .idle_timeout = o.idle,
                             .max_connections = o.max_conn,
                             .max_tokens_default = max_tokens,
                             .cors_origin = cors,
                             .prefill_chunk = o.chunk,
                             .prefill_layers = o.prefill_layers,
                             .kv_positions = o.kv_pool,
                             .chat_memo = o.chat_memo,
                             .api_key = api_key && *api_key ? api_key : NULL};
    if (pipeline) return s_serve_pipeline(&o, &hc, &old);
    stp_err err = {0};
    backend *b = NULL;
    http_server *srv = NULL;
    backend_engine_params bp = {.model_path = model,
                                .n_threads = o.threads,
                                .n_ctx = o.ctx,
                                .n_seq = o.parallel,
                                .kv_type = o.kv_type,
                                .sparse_head_candidates = o.sparse_head,
                                .progress = cli_progress};
    if (backend_engine_new(&b, &bp, &err)) {
        fprintf(stderr, "stpipe serve: %s\n", err.msg);
        return 1;
    }
    if (b->warning[0]) fprintf(stderr, "warning: %s\n", b->warning);
    if (http_server_new(&srv, &hc, b, &err)) {
        fprintf(stderr, "stpipe serve: %s\n", err.msg);
        backend_destroy(&b);
        return 1;
    }
    bool v6 = strchr(host, ':') != NULL;
    fprintf(stderr,
            "stpipe serve: model %s, %d slots of context %d, KV cache %s, queue %d, max_tokens "
            "default %d, prompt text up to %zu bytes, %s, %s; listening on http://%s%s%s:%d\n",
            b->name, backend_n_seq(b), backend_n_ctx(b), kv_cache_type_name(o.kv_type), queue,
            max_tokens, http_server_prompt_bytes_max(srv),
            hc.api_key ? "API key required" : "no API key", cors ? "CORS on" : "CORS off",
            v6 ? "[" : "", host, v6 ? "]" : "", http_server_port(srv));
    fflush(stderr);
    s_stop_wait(&old);
    fprintf(stderr, "stpipe serve: stopping\n");
    http_server_destroy(&srv);
    backend_destroy(&b);
    return 0;
}
