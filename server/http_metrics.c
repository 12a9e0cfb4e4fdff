/* http_metrics: the counters and histograms behind GET /metrics (Prometheus text format 0.0.4).
 * Updated by the connection threads (request counts) and the worker (one record per finished
 * generation, with the engine's per-stage time spent on it); one mutex guards everything. */
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "http_server.h"

enum { N_ENDPOINTS = 8, MIN_CODE = 100, MAX_CODE = 599, MAX_BUCKETS = 14 };

typedef struct histo {
    const double *le; /* upper bounds, ascending; +Inf implied */
    int n_le;
    uint64_t counts[MAX_BUCKETS + 1]; /* per bucket (not cumulative); last = above every bound */
    double sum;
    uint64_t n;
} histo;

static const char *const s_endpoints[N_ENDPOINTS] = {"/v1/chat/completions",
                                                     "/v1/completions",
                                                     "/v1/models",
                                                     "/health",
                                                     "/metrics",
                                                     "/tokenize",
                                                     "/detokenize",
                                                     "other"};

static const double s_le_seconds[] = {0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                                      1,     2.5,  5,     10,   30,  60,   120};
static const double s_le_ms[] = {0.1, 0.25, 0.5, 1,   2.5,  5,    10,
                                 25,  50,   100, 250, 1000, 5000, 30000};
static const double s_le_tps[] = {1,   5,    10,   25,   50,    100,   250,
                                  500, 1000, 2500, 5000, 10000, 25000, 100000};

enum { ST_EMBED, ST_ROUTER, ST_ATTN, ST_EXPERTS, ST_HEAD, N_STAGES };
static const char *const s_stage_names[N_STAGES] = {"embed", "router", "attention", "experts",
                                                    "lm_head"};

struct http_metrics {
    pthread_mutex_t mu;
    uint64_t requests[N_ENDPOINTS][MAX_CODE - MIN_CODE + 1]; /* by status code */
    uint64_t prompt_tokens, generated_tokens, finished[3];
    uint64_t client_gone[2]; /* [0] while queued, [1] while running */
    int queue_waiting, queue_running;
    uint64_t steps, step_tokens, cached_tokens;
    histo request_s, queue_s, first_token_s, prompt_tps, gen_tps, stage_ms[N_STAGES];
};

static void s_histo_init(histo *h, const double *le, int n) {
    memset(h, 0, sizeof *h);
    h->le = le;
    h->n_le = n;
}

static void s_histo_add(histo *h, double v) {
    int i = 0;
    while (i < h->n_le && v > h->le[i])
        i++;
    h->counts[i]++;
    h->sum += v;
    h->n++;
}

int http_metrics_new(http_metrics **out) {
    http_metrics *m = calloc(1, sizeof *m);
    if (!m) return STP_ENOMEM;
    pthread_mutex_init(&m->mu, NULL);
#define N(a) (int)(sizeof a / sizeof a[0])
    s_histo_init(&m->request_s, s_le_seconds, N(s_le_seconds));
    s_histo_init(&m->queue_s, s_le_seconds, N(s_le_seconds));
    s_histo_init(&m->first_token_s, s_le_seconds, N(s_le_seconds));
    s_histo_init(&m->prompt_tps, s_le_tps, N(s_le_tps));
    s_histo_init(&m->gen_tps, s_le_tps, N(s_le_tps));
    for (int i = 0; i < N_STAGES; i++)
        s_histo_init(&m->stage_ms[i], s_le_ms, N(s_le_ms));
#undef N
    *out = m;
    return 0;
}

void http_metrics_destroy(http_metrics **self_p) {
    if (!self_p || !*self_p) return;
    pthread_mutex_destroy(&(*self_p)->mu);
    free(*self_p);
    *self_p = NULL;
}

void http_metrics_request(http_metrics *m, const char *endpoint, int status) {
    int e = N_ENDPOINTS - 1; /* "other" endpoint by default */
    for (int i = 0; i < N_ENDPOINTS - 1; i++)
        if (!strcmp(endpoint, s_endpoints[i])) {
            e = i;
            break;
        }
    if (status < MIN_CODE || status > MAX_CODE) return; /* HTTP has no such status */
    pthread_mutex_lock(&m->mu);
    m->requests[e][status - MIN_CODE]++;
    pthread_mutex_unlock(&m->mu);
}

void http_metrics_queue(http_metrics *m, int waiting, int running) {
    pthread_mutex_lock(&m->mu);
    m->queue_waiting = waiting;
    m->queue_running = running;
    pthread_mutex_unlock(&m->mu);
}

void http_metrics_client_gone(http_metrics *m, bool running) {
    pthread_mutex_lock(&m->mu);
    m->client_gone[running]++;
    pthread_mutex_unlock(&m->mu);
}

void http_metrics_step(http_metrics *m, int n_tokens, const engine_stats *d) {
    pthread_mutex_lock(&m->mu);
    m->steps++;
    m->step_tokens += (uint64_t)n_tokens;
    if (d) {
        const uint64_t ns[N_STAGES] = {d->ns_embed, d->ns_router, d->ns_attn, d->ns_moe,
                                       d->ns_head};
        for (int i = 0; i < N_STAGES; i++)
            s_histo_add(&m->stage_ms[i], (double)ns[i] * 1e-6);
    }
    pthread_mutex_unlock(&m->mu);
}

void http_metrics_generation(http_metrics *m, const http_job *job) {
    const gen_result *r = &job->res;
    pthread_mutex_lock(&m->mu);
    m->prompt_tokens += (uint64_t)r->n_prompt;
    m->generated_tokens += (uint64_t)r->n_gen;
    if (!job->rc) m->finished[r->finish]++;
    s_histo_add(&m->request_s, job->t_end - job->t_arrive);
    s_histo_add(&m->queue_s, job->t_start - job->t_arrive);
    if (r->n_gen) s_histo_add(&m->first_token_s, job->t_start - job->t_arrive + r->t_first);
    if (r->n_prompt > r->n_cached && r->t_prompt > 0)
        s_histo_add(&m->prompt_tps, (r->n_prompt - r->n_cached) / r->t_prompt);
    if (r->n_gen > 1 && r->t_gen > 0) s_histo_add(&m->gen_tps, (r->n_gen - 1) / r->t_gen);
    m->cached_tokens += (uint64_t)r->n_cached;
    pthread_mutex_unlock(&m->mu);
}

/* ---- rendering ------------------------------------------------------------------------------ */

typedef struct sbuf {
    char *p;
    size_t len, cap;
    bool oom;
} sbuf;

static void s_printf(sbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void s_printf(sbuf *b, const char *fmt, ...) {
    for (;;) {
        va_list ap;
        va_start(ap, fmt);
        int n = b->oom ? -1 : vsnprintf(b->p + b->len, b->cap - b->len, fmt, ap);
        va_end(ap);
        if (n < 0) {
            b->oom = true;
            return;
        }
        if ((size_t)n < b->cap - b->len) {
            b->len += (size_t)n;
            return;
        }
        size_t nc = b->cap * 2 + (size_t)n;
        char *np = realloc(b->p, nc);
        if (!np) {
            b->oom = true;
            return;
        }
        b->p = np;
        b->cap = nc;
    }
}

static void s_histo_render(sbuf *b, const char *name, const char *labels, const histo *h) {
    uint64_t cum = 0;
    const char *sep = labels[0] ? "," : "";
    for (int i = 0; i < h->n_le; i++) {
        cum += h->counts[i];
        s_printf(b, "%s_bucket{%s%sle=\"%g\"} %llu\n", name, labels, sep, h->le[i],
                 (unsigned long long)cum);
    }
    cum += h->counts[h->n_le];
    s_printf(b, "%s_bucket{%s%sle=\"+Inf\"} %llu\n", name, labels, sep, (unsigned long long)cum);
    if (labels[0])
        s_printf(b, "%s_sum{%s} %.6f\n%s_count{%s} %llu\n", name, labels, h->sum, name, labels,
                 (unsigned long long)h->n);
    else
        s_printf(b, "%s_sum %.6f\n%s_count %llu\n", name, h->sum, name, (unsigned long long)h->n);
}

static void s_histo_one(sbuf *b, const char *name, const char *help, const histo *h) {
    s_printf(b, "# HELP %s %s\n# TYPE %s histogram\n", name, help, name);
    s_histo_render(b, name, "", h);
}

char *http_metrics_render(http_metrics *m, chat_memo *memo) {
    sbuf b = {.p = malloc(8192), .cap = 8192};
    if (!b.p) return NULL;
    b.p[0] = 0;
    pthread_mutex_lock(&m->mu);
    s_printf(&b, "# HELP stpipe_requests_total HTTP requests answered, by endpoint and status.\n"
                 "# TYPE stpipe_requests_total counter\n");
    for (int e = 0; e < N_ENDPOINTS; e++)
        for (int c = MIN_CODE; c <= MAX_CODE; c++)
            if (m->requests[e][c - MIN_CODE] || (c == 200 && e < 2))
                s_printf(&b, "stpipe_requests_total{endpoint=\"%s\",code=\"%d\"} %llu\n",
                         s_endpoints[e], c, (unsigned long long)m->requests[e][c - MIN_CODE]);
    s_printf(&b,
             "# HELP stpipe_client_disconnects_total Requests whose client closed the "
             "connection before the answer was complete (the request was dropped or stopped).\n"
             "# TYPE stpipe_client_disconnects_total counter\n"
             "stpipe_client_disconnects_total{state=\"queued\"} %llu\n"
             "stpipe_client_disconnects_total{state=\"running\"} %llu\n",
             (unsigned long long)m->client_gone[0], (unsigned long long)m->client_gone[1]);
    s_printf(
        &b,
        "# HELP stpipe_prompt_tokens_total Prompt tokens (evaluated, or found in a slot's cache).\n"
        "# TYPE stpipe_prompt_tokens_total counter\nstpipe_prompt_tokens_total %llu\n"
        "# HELP stpipe_generated_tokens_total Tokens sampled.\n"
        "# TYPE stpipe_generated_tokens_total counter\nstpipe_generated_tokens_total %llu\n"
        "# HELP stpipe_generations_total Finished generations by finish reason.\n"
        "# TYPE stpipe_generations_total counter\n"
        "stpipe_generations_total{finish=\"stop\"} %llu\n"
        "stpipe_generations_total{finish=\"length\"} %llu\n"
        "stpipe_generations_total{finish=\"cancelled\"} %llu\n"
        "# HELP stpipe_queue_waiting Requests waiting for the worker.\n"
        "# TYPE stpipe_queue_waiting gauge\nstpipe_queue_waiting %d\n"
        "# HELP stpipe_queue_running Requests being generated (at most the sequence slots).\n"
        "# TYPE stpipe_queue_running gauge\nstpipe_queue_running %d\n",
        (unsigned long long)m->prompt_tokens, (unsigned long long)m->generated_tokens,
        (unsigned long long)m->finished[GEN_FINISH_STOP],
        (unsigned long long)m->finished[GEN_FINISH_LENGTH],
        (unsigned long long)m->finished[GEN_FINISH_CANCEL], m->queue_waiting, m->queue_running);
    s_histo_one(&b, "stpipe_request_duration_seconds",
                "Time from a complete request to the end of its answer.", &m->request_s);
    s_histo_one(&b, "stpipe_queue_wait_seconds", "Time a request waited for the worker.",
                &m->queue_s);
    s_histo_one(&b, "stpipe_time_to_first_token_seconds",
                "Time from a complete request to its first sampled token.", &m->first_token_s);
    s_histo_one(&b, "stpipe_prompt_tokens_per_second", "Prompt evaluation speed per request.",
                &m->prompt_tps);
    s_histo_one(&b, "stpipe_generation_tokens_per_second", "Generation speed per request.",
                &m->gen_tps);
    s_printf(&b,
             "# HELP stpipe_steps_total Scheduler steps (one backend pass each).\n"
             "# TYPE stpipe_steps_total counter\nstpipe_steps_total %llu\n"
             "# HELP stpipe_step_tokens_total Tokens evaluated by the steps (decode and prompt).\n"
             "# TYPE stpipe_step_tokens_total counter\nstpipe_step_tokens_total %llu\n"
             "# HELP stpipe_prompt_tokens_cached_total Prompt tokens found in a slot's cache "
             "(prefix reuse: not evaluated).\n"
             "# TYPE stpipe_prompt_tokens_cached_total counter\n"
             "stpipe_prompt_tokens_cached_total %llu\n",
             (unsigned long long)m->steps, (unsigned long long)m->step_tokens,
             (unsigned long long)m->cached_tokens);
    s_printf(&b, "# HELP stpipe_stage_duration_ms Engine time per scheduler step in each "
                 "forward-pass stage (milliseconds).\n# TYPE stpipe_stage_duration_ms histogram\n");
    for (int i = 0; i < N_STAGES; i++) {
        char lab[64];
        snprintf(lab, sizeof lab, "stage=\"%s\"", s_stage_names[i]);
        s_histo_render(&b, "stpipe_stage_duration_ms", lab, &m->stage_ms[i]);
    }
    pthread_mutex_unlock(&m->mu);
    if (memo) {
        unsigned long long lookups = 0, hits = 0;
        chat_memo_counts(memo, &lookups, &hits);
        s_printf(&b,
                 "# HELP stpipe_chat_memo_lookups_total Chats looked up in the chat memo.\n"
                 "# TYPE stpipe_chat_memo_lookups_total counter\n"
                 "stpipe_chat_memo_lookups_total %llu\n"
                 "# HELP stpipe_chat_memo_hits_total Chats that started with a kept answer's ids.\n"
                 "# TYPE stpipe_chat_memo_hits_total counter\nstpipe_chat_memo_hits_total %llu\n",
                 lookups, hits);
    }
    if (b.oom) {
        free(b.p);
        return NULL;
    }
    return b.p;
}
