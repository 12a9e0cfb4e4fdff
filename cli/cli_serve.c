/* cli_serve: `stpipe serve`, the OpenAI-compatible HTTP server over one in-process engine.
 * Parses the flags, opens the backend, starts http_server and waits for SIGINT/SIGTERM; prints
 * "listening on http://HOST:PORT" on stderr once it accepts connections (with --port 0 the
 * port is the one the system picked). The API key comes from --api-key or, so that it does
 * not show in ps, from the environment (STP_API_KEY, read by the option table). Endpoints, fields
 * and limits: docs/SERVER.md. */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "backend.h"
#include "cli.h"
#include "http_server.h"

static volatile sig_atomic_t s_stop;

static void s_on_signal(int sig) {
    (void)sig;
    s_stop = 1;
}

typedef struct serve_opts {
    const char *model, *host, *pipeline, *cors, *api_key;
    bool help;
    int port, threads, queue, ctx, max_tokens, max_body, idle, max_conn, sparse_head;
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
     "requests that may wait behind the running one; more get 503", F(queue), NULL, NULL},
    CLI_OPT_CTX(serve_opts, 16),
    CLI_OPT_SPARSE_HEAD(serve_opts),
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
    CLI_OPT_PIPELINE(serve_opts, "serve through a running pipeline (not available yet)"),
};
#undef F

static void s_usage(FILE *f) {
    cli_opts_help(f, "usage: stpipe serve --model FILE [options]\n", s_opts, CLI_NOPTS(s_opts),
                  "Endpoints: POST /v1/chat/completions, POST /v1/completions (\"stream\": true "
                  "for server-sent events),\nGET /v1/models, GET /health, GET /metrics. See "
                  "docs/SERVER.md.\n");
}

int cli_serve(int argc, char **argv) {
    serve_opts o;
    memset(&o, 0, sizeof o);
    int bad = cli_opts_parse("serve", s_opts, CLI_NOPTS(s_opts), &o, argc, argv, s_usage);
    if (bad) return bad == CLI_HELP ? 0 : bad;
    const char *model = o.model, *host = o.host, *pipeline = o.pipeline, *cors = o.cors;
    const char *api_key = o.api_key;
    const int queue = o.queue, max_tokens = o.max_tokens;
    if (pipeline) {
        fprintf(stderr, "stpipe serve: --pipeline is not available yet (no pipeline backend in "
                        "this build); use --model FILE for the in-process engine\n");
        return 2;
    }
    if (!model) {
        fprintf(stderr, "stpipe serve: --model FILE is required (see stpipe serve --help)\n");
        return 2;
    }
    stp_err err = {0};
    backend *b = NULL;
    http_server *srv = NULL;
    backend_engine_params bp = {.model_path = model,
                                .n_threads = o.threads,
                                .n_ctx = o.ctx,
                                .sparse_head_candidates = o.sparse_head};
    if (backend_engine_new(&b, &bp, &err)) {
        fprintf(stderr, "stpipe serve: %s\n", err.msg);
        return 1;
    }
    if (b->warning[0]) fprintf(stderr, "warning: %s\n", b->warning);
    /* signals: set before the threads start so they inherit the mask-free default */
    struct sigaction sa = {0};
    sa.sa_handler = s_on_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
    http_server_config hc = {.host = host,
                             .port = o.port,
                             .queue_max = queue,
                             .max_body = o.max_body,
                             .idle_timeout = o.idle,
                             .max_connections = o.max_conn,
                             .max_tokens_default = max_tokens,
                             .cors_origin = cors,
                             .api_key = api_key && *api_key ? api_key : NULL};
    if (http_server_new(&srv, &hc, b, &err)) {
        fprintf(stderr, "stpipe serve: %s\n", err.msg);
        backend_destroy(&b);
        return 1;
    }
    bool v6 = strchr(host, ':') != NULL;
    fprintf(stderr,
            "stpipe serve: model %s, context %d, queue %d, max_tokens default %d, prompt "
            "text up to %zu bytes, %s, %s; listening on http://%s%s%s:%d\n",
            b->name, backend_n_ctx(b), queue, max_tokens, http_server_prompt_bytes_max(srv),
            hc.api_key ? "API key required" : "no API key", cors ? "CORS on" : "CORS off",
            v6 ? "[" : "", host, v6 ? "]" : "", http_server_port(srv));
    fflush(stderr);
    while (!s_stop)
        pause();
    fprintf(stderr, "stpipe serve: stopping\n");
    http_server_destroy(&srv);
    backend_destroy(&b);
    return 0;
}
