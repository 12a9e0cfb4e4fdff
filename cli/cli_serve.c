/* cli_serve: `stpipe serve`, the OpenAI-compatible HTTP server over one in-process engine.
 * Parses the flags, opens the backend, starts http_server and waits for SIGINT/SIGTERM; prints
 * "listening on http://HOST:PORT" on stderr once it accepts connections (with --port 0 the
 * port is the one the system picked). The API key comes from --api-key or, so that it does
 * not show in ps, from the environment (STP_API_KEY). Endpoints, fields and limits:
 * docs/SERVER.md. */
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

static void s_usage(FILE *f) {
    fprintf(f, "usage: stpipe serve --model FILE [options]\n"
               "  --model FILE      SmallThinker GGUF file (in-process engine)\n"
               "  --host ADDR       address to listen on (default 127.0.0.1; 0.0.0.0 for every "
               "interface)\n"
               "  --port N          TCP port (default 8080; 0 = any free port, printed)\n"
               "  --threads N       compute threads (default 2)\n"
               "  --queue N         requests that may wait behind the running one (default 8); "
               "more get 503\n"
               "  --ctx-size N      context length per request (default min(model, 4096))\n"
               "  --max-tokens-default N  answer length when a request gives no max_tokens\n"
               "                    (default 1024; 0 = until the context is full)\n"
               "  --max-body BYTES  largest request body (default 8388608); bigger ones get 413\n"
               "  --idle-timeout S  close a connection silent for S seconds (default 10; not\n"
               "                    counting the time its answer is generated)\n"
               "  --max-connections N  open connections, one thread each (default 256); more\n"
               "                    are closed at once\n"
               "  --cors ORIGIN     allow cross-origin requests from ORIGIN (e.g.\n"
               "                    http://localhost:3000; \"*\" = any); default: none, and a\n"
               "                    request to /v1/ with another Origin header gets 403\n"
               "  --api-key KEY     require \"Authorization: Bearer KEY\" on /v1/ (else 401);\n"
               "                    default: $STP_API_KEY if set (keeps the key out of ps)\n"
               "  --pipeline DIR    serve through a running pipeline (not available yet)\n"
               "Endpoints: POST /v1/chat/completions, POST /v1/completions (\"stream\": true for "
               "server-sent events),\nGET /v1/models, GET /health, GET /metrics. See "
               "docs/SERVER.md.\n");
}

int cli_serve(int argc, char **argv) {
    const char *model = NULL, *host = "127.0.0.1", *pipeline = NULL, *cors = NULL;
    const char *api_key = getenv("STP_API_KEY");
    long long port = 8080, threads = 2, queue = 8, ctx = 0, max_tokens = 1024;
    long long max_body = 8 << 20, idle = 10, max_conn = 256;
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (cli_opt_is(a, "--help") || cli_opt_is(a, "-h")) {
            s_usage(stdout);
            return 0;
        }
        if (!v) {
            fprintf(stderr, "stpipe serve: %s\n",
                    cli_opt_is(a, "--model") || a[0] == '-'
                        ? "option needs a value (see stpipe serve "
                          "--help)"
                        : "unexpected argument (see stpipe serve "
                          "--help)");
            return 2;
        }
        i++;
        if (cli_opt_is(a, "--model") || cli_opt_is(a, "-m"))
            model = v;
        else if (cli_opt_is(a, "--host"))
            host = v;
        else if (cli_opt_is(a, "--pipeline"))
            pipeline = v;
        else if (cli_opt_is(a, "--port")) {
            if (cli_parse_int(v, a, 0, 65535, &port)) return 2;
        } else if (cli_opt_is(a, "--threads") || cli_opt_is(a, "-t")) {
            if (cli_parse_int(v, a, 1, 256, &threads)) return 2;
        } else if (cli_opt_is(a, "--queue")) {
            if (cli_parse_int(v, a, 0, 4096, &queue)) return 2;
        } else if (cli_opt_is(a, "--ctx-size") || cli_opt_is(a, "-c")) {
            if (cli_parse_int(v, a, 16, 1 << 24, &ctx)) return 2;
        } else if (cli_opt_is(a, "--max-tokens-default")) {
            if (cli_parse_int(v, a, 0, 1 << 24, &max_tokens)) return 2;
        } else if (cli_opt_is(a, "--max-body")) {
            if (cli_parse_int(v, a, 1024, 1 << 30, &max_body)) return 2;
        } else if (cli_opt_is(a, "--idle-timeout")) {
            if (cli_parse_int(v, a, 1, 3600, &idle)) return 2;
        } else if (cli_opt_is(a, "--max-connections")) {
            if (cli_parse_int(v, a, 2, 4096, &max_conn)) return 2;
        } else if (cli_opt_is(a, "--cors")) {
            cors = v;
        } else if (cli_opt_is(a, "--api-key")) {
            api_key = v;
        } else {
            fprintf(stderr, "stpipe serve: unknown option '%s' (see stpipe serve --help)\n", a);
            return 2;
        }
    }
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
    backend_engine_params bp = {.model_path = model, .n_threads = (int)threads, .n_ctx = (int)ctx};
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
                             .port = (int)port,
                             .queue_max = (int)queue,
                             .max_body = (int)max_body,
                             .idle_timeout = (int)idle,
                             .max_connections = (int)max_conn,
                             .max_tokens_default = (int)max_tokens,
                             .cors_origin = cors,
                             .api_key = api_key && *api_key ? api_key : NULL};
    if (http_server_new(&srv, &hc, b, &err)) {
        fprintf(stderr, "stpipe serve: %s\n", err.msg);
        backend_destroy(&b);
        return 1;
    }
    bool v6 = strchr(host, ':') != NULL;
    fprintf(stderr,
            "stpipe serve: model %s, context %d, queue %lld, max_tokens default %lld, prompt "
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
