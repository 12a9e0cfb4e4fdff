/* http_server: the OpenAI-compatible HTTP front of `stpipe serve` (libmicrohttpd), its request
 * queue and the worker thread that runs every request on one backend, one at a time.
 *
 * Files: http_server.c (daemon, routing, queue, worker, SSE streaming), http_api.c (request
 * JSON -> http_job, responses and chunks), http_metrics.c (Prometheus counters/histograms).
 * Invariants: 1. only the worker thread touches the backend; 2. a job is freed when both the
 * connection and the worker have let go of it (refs, under the server mutex); 3. at most
 * queue_max jobs wait (the running one not counted), the next gets 503 at once. See
 * docs/SERVER.md. */
#ifndef STP_HTTP_SERVER_H
#define STP_HTTP_SERVER_H

#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "backend.h"
#include "gen_loop.h"

/* ---- server --------------------------------------------------------------------------------- */

typedef struct http_server_config {
    const char *host; /* numeric IPv4/IPv6 address or "localhost"; NULL: 127.0.0.1 */
    int port;         /* 0: any free port (see http_server_port) */
    int queue_max;    /* jobs that may wait behind the running one */
    int max_body;     /* largest request body in bytes */
} http_server_config;

typedef struct http_server http_server;

int http_server_new(http_server **out, const http_server_config *cfg, backend *b, stp_err *err);
int http_server_port(const http_server *s);
/* Cancels the running and queued jobs, stops the daemon and the worker. */
void http_server_destroy(http_server **self_p);

/* ---- jobs (http_api.c) ---------------------------------------------------------------------- */

typedef enum http_kind { HTTP_KIND_CHAT, HTTP_KIND_COMPLETION } http_kind;

typedef struct http_job {
    /* request, fixed once parsed */
    http_kind kind;
    bool stream, include_usage, return_tokens;
    gen_params gp;
    char **stop; /* gp.stop points here */
    int32_t *prompt;
    int n_prompt;
    char id[48];
    long long created;
    double t_arrive; /* gen_now() when the request was complete */
    /* shared with the worker, under the server mutex */
    int refs;
    bool done;
    volatile sig_atomic_t cancel; /* client gone or server stopping */
    pthread_cond_t cond;
    char *out; /* SSE bytes produced (stream) */
    size_t out_len, out_cap, out_sent;
    int rc; /* generation failure (negative STP_E*), 0 if fine */
    char errmsg[1024];
    gen_result res;
    double t_start, t_end;   /* worker start / end (gen_now) */
    struct http_job *next;   /* queue link */
    struct http_server *srv; /* owner (its mutex guards the shared fields) */
} http_job;

/* Parses a request body into job (prompt tokens, parameters). Returns 0 or an HTTP status
 * (400) with msg filled. */
int http_api_parse(http_job *job, http_kind kind, const char *body, size_t len,
                   const tokenizer *tok, int n_ctx, uint64_t default_seed, char *msg, size_t cap);
void http_api_job_fini(http_job *job);
/* Complete JSON body of a non-streaming answer (malloc'd). */
char *http_api_response(const http_job *job, const char *model);
/* One SSE event "data: {...}\n\n" (malloc'd): a delta with text (role chunk when first), or the
 * final chunk when finish is not NULL, or the usage chunk when usage. */
char *http_api_chunk(const http_job *job, const char *model, const char *text, size_t len,
                     bool first, const char *finish, bool usage);
/* {"error": {"message": msg, "type": type, "code": code}} (malloc'd). */
char *http_api_error(const char *msg, const char *type, int code);
const char *http_api_finish_name(gen_finish f);

/* ---- metrics (http_metrics.c) -----------------------------------------------------------------
 */

typedef struct http_metrics http_metrics;

int http_metrics_new(http_metrics **out);
void http_metrics_destroy(http_metrics **self_p);
/* Counts one answered request. endpoint: the path, status: the HTTP status sent. */
void http_metrics_request(http_metrics *m, const char *endpoint, int status);
/* Records one finished generation: queue wait, durations, tokens, stage time delta. */
void http_metrics_generation(http_metrics *m, const http_job *job, const engine_stats *delta);
void http_metrics_queue(http_metrics *m, int waiting, int running);
/* Prometheus text exposition (malloc'd). */
char *http_metrics_render(http_metrics *m);

#endif
