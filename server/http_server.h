/* http_server: the OpenAI-compatible HTTP front of `stpipe serve` (libmicrohttpd), its request
 * queue and the worker thread that hands requests to a runner: a continuous-batching scheduler
 * (common/gen/sched.h) over a local backend, several requests at once, or the caller's runner
 * (`stpipe serve --pipeline`: the coordinator's scheduler, over client.sock).
 *
 * Files: http_server.c (daemon, routing, queue, worker, SSE streaming, client-gone watch),
 * http_api.c (request JSON -> http_job, responses and chunks), http_guard.c (API key, CORS
 * origin, URL checks), http_metrics.c (Prometheus counters/histograms).
 * Invariants: 1. only the worker thread touches the backend; 2. a job is freed when both the
 * connection and the worker have let go of it (refs, under the server mutex); 3. at most
 * queue_max jobs wait for a slot (the running ones, and those a free slot takes at once, not
 * counted), the next gets 503 at once; 4. the HTTP side knows a job only by its cancel flag
 * and its output: a client that goes away raises the flag (a queued job leaves the queue at
 * once), whatever runs the job stops at its next token. See docs/SERVER.md. */
#ifndef STP_HTTP_SERVER_H
#define STP_HTTP_SERVER_H

#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "gen/backend.h"
#include "gen/gen_loop.h"
#include "gen/sched.h"
#include "chat_memo.h"

/* ---- server --------------------------------------------------------------------------------- */

/* What runs the jobs. The worker thread calls submit for a queued job while n_free > 0, step
 * while busy, and sleeps until a job arrives when not busy. The sched_req callbacks (emit, done)
 * must run on the worker thread, inside submit or step. A step may wait (a few milliseconds) for
 * something to happen. */
typedef struct http_runner {
    void *ctx;
    int (*submit)(void *ctx, const sched_req *r, stp_err *err);
    bool (*busy)(void *ctx);
    int (*n_free)(void *ctx); /* jobs it would start now (asked on the worker thread, and once
                                 by http_server_new* before that thread starts) */
    void (*step)(void *ctx);
    /* Optional: Prometheus text appended to /metrics (malloc'd; NULL: none). Called on a
     * connection thread: must be thread-safe. */
    char *(*metrics)(void *ctx);
} http_runner;

/* The model a runner serves (what the HTTP side needs to parse and describe requests). */
typedef struct http_model {
    const char *name;
    const tokenizer *tok;
    int n_ctx; /* context of one request (prompt + answer) */
    int n_vocab;
} http_model;

typedef struct http_server_config {
    const char *host;        /* numeric IPv4/IPv6 address or "localhost"; NULL: 127.0.0.1 */
    int port;                /* 0: any free port (see http_server_port) */
    int queue_max;           /* jobs that may wait behind the running one */
    int max_body;            /* largest request body in bytes; <= 0: 8 MiB */
    int idle_timeout;        /* seconds a connection may stay silent (not counting the time its
                                answer is being generated); <= 0: 10 */
    int max_connections;     /* open connections (one thread each); <= 0: 256 */
    int max_tokens_default;  /* max_tokens of a request that names none; 0: until the context
                                is full; < 0: 1024 */
    const char *cors_origin; /* the one origin allowed cross-origin ("*": any); NULL: none */
    const char *api_key;     /* required as "Authorization: Bearer KEY" on /v1/ paths; NULL: none */
    int prefill_chunk;       /* sched_params.prefill_chunk of the local scheduler; 0: default */
    int prefill_layers;      /* sched_params.prefill_layers of the local scheduler; 0: default */
    int kv_positions;        /* sched_params.kv_positions of the local scheduler; 0: all */
    int chat_memo;           /* answers the chat memo keeps (chat_memo.h); 0: no memo */
} http_server_config;

typedef struct http_server http_server;

/* Serves b: a sched over it on the worker thread (as many requests at once as b has sequences;
 * cfg->prefill_chunk). */
int http_server_new(http_server **out, const http_server_config *cfg, backend *b, stp_err *err);
/* Serves through runner (copied; its ctx stays the caller's and must outlive the server). */
int http_server_new_runner(http_server **out, const http_server_config *cfg, const http_model *mi,
                           const http_runner *runner, stp_err *err);
int http_server_port(const http_server *s);
/* Longest prompt text accepted (http_api_prompt_bytes_max of the context). */
size_t http_server_prompt_bytes_max(const http_server *s);
/* Cancels the running and queued jobs, stops the daemon and the worker. */
void http_server_destroy(http_server **self_p);

/* ---- jobs (http_api.c) ---------------------------------------------------------------------- */

typedef enum http_kind { HTTP_KIND_CHAT, HTTP_KIND_COMPLETION } http_kind;

struct MHD_Connection;

typedef struct http_job {
    /* request, fixed once parsed */
    http_kind kind;
    bool stream, include_usage, return_tokens;
    gen_params gp;
    char **stop; /* gp.stop points here */
    int32_t *prompt;
    int n_prompt;
    char *prompt_text; /* the chat's text (with a memo; NULL otherwise) */
    size_t prompt_text_len;
    tok_span *plain; /* its messages' plain spans (with prompt_text) */
    size_t n_plain;
    char id[48];
    long long created;
    double t_arrive; /* gen_now() when the request was complete */
    /* shared with the worker, under the server mutex */
    int refs;
    bool done;
    volatile sig_atomic_t cancel; /* client gone or server stopping */
    bool queued;                  /* in the server's queue (not yet taken by the worker) */
    int efd;                      /* eventfd: the worker adds 1 on new output and when done */
    int sock;                     /* the client's socket (watched for a hang-up), -1 if unknown */
    struct MHD_Connection *conn;  /* its connection (used on the connection's thread only) */
    char *out;                    /* SSE bytes produced (stream) */
    size_t out_len, out_cap, out_sent;
    int rc; /* generation failure (negative STP_E*), 0 if fine */
    char errmsg[1024];
    gen_result res;
    double t_start, t_end;   /* worker start / end (gen_now) */
    bool started;            /* handed to the runner */
    struct http_job *next;   /* queue link */
    struct http_server *srv; /* owner (its mutex guards the shared fields) */
} http_job;

typedef struct http_api_limits {
    int n_ctx;               /* context per request (prompt + answer) */
    int max_tokens_default;  /* max_tokens when the request names none; 0: until the context */
    size_t max_prompt_bytes; /* prompt text longer than this: 413 before tokenizing */
} http_api_limits;

/* Longest prompt text that can fit n_ctx tokens: every token stands for at most
 * max_token_bytes bytes of text, so a text longer than n_ctx * max_token_bytes bytes has more
 * than n_ctx tokens. */
size_t http_api_prompt_bytes_max(int n_ctx, size_t max_token_bytes);
/* Parses a request body into job (prompt tokens, parameters). Returns 0 or an HTTP status
 * (400, 413 for a prompt over lim->max_prompt_bytes, 500 out of memory) with msg filled. With a
 * memo (may be NULL) a chat starting with an earlier exchange's text takes that exchange's ids and
 * keeps its text and spans (job->prompt_text, job->plain) for the memo's entry of its own answer.
 */
int http_api_parse(http_job *job, http_kind kind, const char *body, size_t len,
                   const tokenizer *tok, const http_api_limits *lim, chat_memo *memo,
                   uint64_t default_seed, char *msg, size_t cap);
void http_api_job_fini(http_job *job);
/* Complete JSON body of a non-streaming answer (malloc'd). */
char *http_api_response(const http_job *job, const char *model);
/* One SSE event "data: {...}\n\n" (malloc'd): a delta with text (role chunk when first), or the
 * final chunk when finish is not NULL, or the usage chunk when usage. */
char *http_api_chunk(const http_job *job, const char *model, const char *text, size_t len,
                     bool first, const char *finish, bool usage);
/* POST /tokenize (llama.cpp's and vLLM's shapes): {"content" or "prompt": text,
 * "parse_special" (true), "with_pieces" (false)} or {"messages": chat, "add_generation_prompt"
 * (true)} -> *out = {"tokens": ids (or {"id", "piece"} objects), "count", "max_model_len"}
 * (malloc'd). A chat is encoded afresh as a chat request's is (roles checked, contents plain
 * text; the chat memo is not consulted). Returns 0, or 400 (also: more ids than lim->n_ctx),
 * 413 (text longer than lim->max_prompt_bytes) or 500 (out of memory), msg filled. */
int http_api_tokenize(const char *body, size_t len, const tokenizer *tok,
                      const http_api_limits *lim, char **out, char *msg, size_t cap);
/* POST /detokenize: {"tokens": ids} (at most lim->n_ctx) -> *out = {"content": text, "prompt":
 * text}, the text UTF-8 (a byte of a cut character becomes U+FFFD, as in answers). 0, 400 or
 * 500 (out of memory). */
int http_api_detokenize(const char *body, size_t len, const tokenizer *tok,
                        const http_api_limits *lim, char **out, char *msg, size_t cap);
/* {"error": {"message": msg, "type": type, "code": code}} (malloc'd); bytes of msg that are
 * not UTF-8 text become '?'. */
char *http_api_error(const char *msg, const char *type, int code);
const char *http_api_finish_name(gen_finish f);

/* ---- guards (http_guard.c) -------------------------------------------------------------------
 */

/* True when the Authorization header value is "Bearer <key>" (scheme case-insensitive); the
 * key is compared in time independent of where it differs. */
bool http_guard_bearer_ok(const char *authorization, const char *key);
/* True when url (percent-decoded) is UTF-8 text without control characters. */
bool http_guard_url_ok(const char *url);
/* The Access-Control-Allow-Origin value for a request's Origin header (NULL when absent), or
 * NULL: allowed is the configured origin (NULL: none, "*": any). */
const char *http_guard_cors(const char *allowed, const char *origin);

/* ---- metrics (http_metrics.c) -----------------------------------------------------------------
 */

typedef struct http_metrics http_metrics;

int http_metrics_new(http_metrics **out);
void http_metrics_destroy(http_metrics **self_p);
/* Counts one answered request. endpoint: the path, status: the HTTP status sent. */
void http_metrics_request(http_metrics *m, const char *endpoint, int status);
/* Records one finished generation: queue wait, durations, tokens. */
void http_metrics_generation(http_metrics *m, const http_job *job);
/* Records one scheduler step: tokens evaluated, the stage time it took (delta of the backend's
 * counters; NULL: unknown). */
void http_metrics_step(http_metrics *m, int n_tokens, const engine_stats *delta);
void http_metrics_queue(http_metrics *m, int waiting, int running);
/* Counts a request whose client went away before its answer was complete. */
void http_metrics_client_gone(http_metrics *m, bool running);
/* Prometheus text exposition (malloc'd), with the chat memo's lookups and hits when memo is not
 * NULL. */
char *http_metrics_render(http_metrics *m, chat_memo *memo);

#endif
