/* test_serve: `stpipe serve` end to end over real sockets: /health, /v1/models, a greedy
 * completion and chat completion equal to `stpipe generate` (ids and text), streamed chunks
 * concatenating to the same text and ending with [DONE], 400 on bad JSON and missing fields,
 * 503 when the queue (--queue 1) is full, /metrics names, and a clean exit on SIGTERM.
 * The servers listen on 127.0.0.1 with --port 0 (the port is read from their stderr); the
 * client is a small hand-written HTTP/1.1 client (Connection: close, chunked decoding). */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "th_gguf.h"
#include "th_proc.h"
#include "th_skip.h"

#define DENSE "tiny-dense-attn-f32.gguf"
#define QWEN "tiny-qwen-vocab-q4_0-pure.gguf"

extern char **environ;

typedef struct server {
    pid_t pid;
    int port;
    char err_path[4096];
} server;

typedef struct http_resp {
    int status;
    char *headers;
    char *body; /* de-chunked */
} http_resp;

static server s_dense, s_qwen;

/* Starts `stpipe serve --model DATA/model --port 0 [extra...]` and waits for its port. */
static int s_server_start(server *s, const char *model, const char *queue) {
    char bin[4096], mp[4096];
    th_bin_path(bin, sizeof bin, "stpipe");
    th_data_path(mp, sizeof mp, model);
    th_tmp_path(s->err_path, sizeof s->err_path, queue[0] == '1' ? "serve1.err" : "serve8.err");
    const char *argv[] = {bin,       "serve", "--model",   mp,  "--port", "0",
                          "--queue", queue,   "--threads", "1", NULL};
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
    posix_spawn_file_actions_addopen(&fa, 1, "/dev/null", O_WRONLY, 0);
    posix_spawn_file_actions_addopen(&fa, 2, s->err_path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    int rc = posix_spawn(&s->pid, bin, &fa, NULL, (char *const *)argv, environ);
    posix_spawn_file_actions_destroy(&fa);
    if (rc) return -1;
    /* up to 60 s (sanitizer builds load slowly); false at once when the server exits */
    const char *ready = "listening on http://127.0.0.1:";
    if (!th_wait_file_has(s->err_path, ready, s->pid, 60)) {
        th_wait(s->pid, 0); /* reaped, killed first if it still runs */
        s->pid = 0;
        return -1;
    }
    char *e = th_slurp_str(s->err_path);
    s->port = atoi(strstr(e, ready) + strlen(ready));
    free(e);
    return 0;
}

/* SIGTERM, then wait up to 20 s (SIGKILL after). Returns the exit status or -1. */
static int s_server_stop(server *s) {
    if (s->pid <= 0) return -1;
    kill(s->pid, SIGTERM);
    int rc = th_wait(s->pid, 20);
    s->pid = 0;
    return rc;
}

/* ---- the HTTP client ------------------------------------------------------------------------ */

static int s_connect(int port) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
    struct timeval tv = {.tv_sec = 120};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    if (connect(fd, (struct sockaddr *)&a, sizeof a)) {
        close(fd);
        return -1;
    }
    return fd;
}

static void s_send_req(int fd, const char *method, const char *path, const char *body) {
    char head[1024];
    size_t bl = body ? strlen(body) : 0;
    int n = snprintf(head, sizeof head,
                     "%s %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                     "Content-Type: application/json\r\nContent-Length: %zu\r\n\r\n",
                     method, path, bl);
    assert_int_equal(write(fd, head, (size_t)n), n);
    if (bl) assert_int_equal(write(fd, body, bl), (ssize_t)bl);
}

/* Reads the whole response (until the server closes) and decodes it. */
static http_resp s_read_resp(int fd) {
    size_t cap = 65536, len = 0;
    char *raw = malloc(cap + 1);
    for (;;) {
        if (len == cap) raw = realloc(raw, (cap *= 2) + 1);
        ssize_t r = read(fd, raw + len, cap - len);
        if (r <= 0) break;
        len += (size_t)r;
    }
    close(fd);
    raw[len] = 0;
    http_resp h = {0};
    char *sep = strstr(raw, "\r\n\r\n");
    if (!sep) fail_msg("no HTTP header in response: %s", raw);
    *sep = 0;
    h.headers = strdup(raw);
    sscanf(raw, "HTTP/1.%*d %d", &h.status);
    const char *b = sep + 4;
    if (strcasestr(h.headers, "transfer-encoding: chunked")) {
        h.body = calloc(len + 1, 1);
        size_t out = 0;
        for (;;) {
            char *end;
            unsigned long n = strtoul(b, &end, 16);
            if (end == b || n == 0) break;
            b = strstr(end, "\r\n") + 2;
            memcpy(h.body + out, b, n);
            out += n;
            b += n + 2;
        }
    } else {
        h.body = strdup(b);
    }
    free(raw);
    return h;
}

static http_resp s_http(int port, const char *method, const char *path, const char *body) {
    int fd = s_connect(port);
    if (fd < 0) fail_msg("cannot connect to 127.0.0.1:%d", port);
    s_send_req(fd, method, path, body);
    return s_read_resp(fd);
}

static void s_resp_free(http_resp *h) {
    free(h->headers);
    free(h->body);
}

static json_t *s_json(const http_resp *h) {
    json_error_t je;
    json_t *j = json_loads(h->body, 0, &je);
    if (!j) fail_msg("response is not JSON (%s): %s", je.text, h->body);
    return j;
}

/* `stpipe generate` output (stdout) for args. */
static char *s_generate(const char *const *args) {
    char bin[4096], po[4096];
    th_bin_path(bin, sizeof bin, "stpipe");
    th_tmp_path(po, sizeof po, "serve_gen.out");
    const char *argv[32];
    int n = 0;
    argv[n++] = bin;
    argv[n++] = "generate";
    for (int i = 0; args[i]; i++)
        argv[n++] = args[i];
    argv[n] = NULL;
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, 1, po, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    posix_spawn_file_actions_addopen(&fa, 2, "/dev/null", O_WRONLY, 0);
    pid_t pid;
    assert_int_equal(posix_spawn(&pid, bin, &fa, NULL, (char *const *)argv, environ), 0);
    posix_spawn_file_actions_destroy(&fa);
    int st;
    waitpid(pid, &st, 0);
    assert_true(WIFEXITED(st) && WEXITSTATUS(st) == 0);
    char *out = th_slurp_str(po);
    size_t l = strlen(out);
    if (l && out[l - 1] == '\n') out[l - 1] = 0; /* generate ends with a newline */
    return out;
}

static char *s_ids_string(json_t *tokens) {
    char *s = calloc(json_array_size(tokens) * 12 + 1, 1);
    size_t i;
    json_t *v;
    json_array_foreach(tokens, i, v) {
        sprintf(s + strlen(s), i ? " %lld" : "%lld", (long long)json_integer_value(v));
    }
    return s;
}

/* ---- tests ---------------------------------------------------------------------------------- */

static int s_setup(void **state) {
    (void)state;
    signal(SIGPIPE, SIG_IGN);
    if (s_server_start(&s_dense, DENSE, "8")) return -1;
    if (s_server_start(&s_qwen, QWEN, "1")) return -1;
    return 0;
}

static int s_teardown(void **state) {
    (void)state;
    int a = s_server_stop(&s_dense), b = s_server_stop(&s_qwen);
    if (a != 0 || b != 0) {
        char *e = th_slurp_str(s_dense.err_path);
        fprintf(stderr, "server exit codes %d %d; stderr: %s\n", a, b, e);
        free(e);
        return -1;
    }
    return 0;
}

static void test_serve_health_and_models(void **state) {
    (void)state;
    http_resp h = s_http(s_dense.port, "GET", "/health", NULL);
    assert_int_equal(h.status, 200);
    assert_non_null(strstr(h.body, "\"ok\""));
    s_resp_free(&h);
    h = s_http(s_dense.port, "GET", "/v1/models", NULL);
    assert_int_equal(h.status, 200);
    json_t *j = s_json(&h);
    assert_string_equal(json_string_value(json_object_get(j, "object")), "list");
    json_t *m = json_array_get(json_object_get(j, "data"), 0);
    assert_string_equal(json_string_value(json_object_get(m, "id")), "tiny-dense-attn-f32");
    assert_string_equal(json_string_value(json_object_get(m, "object")), "model");
    json_decref(j);
    s_resp_free(&h);
    h = s_http(s_dense.port, "GET", "/nope", NULL);
    assert_int_equal(h.status, 404);
    s_resp_free(&h);
    h = s_http(s_dense.port, "GET", "/v1/completions", NULL);
    assert_int_equal(h.status, 405);
    s_resp_free(&h);
}

static void test_serve_completion_matches_generate(void **state) {
    (void)state;
    char mp[4096];
    th_data_path(mp, sizeof mp, DENSE);
    const char *ga[] = {"--model", mp, "--prompt", "Hello world", "-n", "24", "--ids", NULL};
    char *want_ids = s_generate(ga);
    const char *gt[] = {"--model", mp, "--prompt", "Hello world", "-n", "24", "--quiet", NULL};
    char *want_text = s_generate(gt);
    http_resp h = s_http(s_dense.port, "POST", "/v1/completions",
                         "{\"model\":\"x\",\"prompt\":\"Hello world\",\"max_tokens\":24,"
                         "\"temperature\":0,\"return_tokens\":true}");
    assert_int_equal(h.status, 200);
    json_t *j = s_json(&h);
    char *got_ids = s_ids_string(json_object_get(j, "tokens"));
    assert_string_equal(got_ids, want_ids);
    json_t *c = json_array_get(json_object_get(j, "choices"), 0);
    assert_string_equal(json_string_value(json_object_get(c, "text")), want_text);
    json_t *u = json_object_get(j, "usage");
    assert_true(json_integer_value(json_object_get(u, "prompt_tokens")) > 0);
    assert_int_equal(json_integer_value(json_object_get(u, "completion_tokens")),
                     json_array_size(json_object_get(j, "tokens")));
    const char *fin = json_string_value(json_object_get(c, "finish_reason"));
    assert_true(!strcmp(fin, "length") || !strcmp(fin, "stop"));
    assert_string_equal(json_string_value(json_object_get(j, "object")), "text_completion");
    free(got_ids);
    free(want_ids);
    free(want_text);
    json_decref(j);
    s_resp_free(&h);
}

static const char *s_chat_body(bool stream) {
    return stream ? "{\"messages\":[{\"role\":\"system\",\"content\":\"Be brief.\"},{\"role\":"
                    "\"user\",\"content\":\"What is the capital of France?\"}],\"max_tokens\":20,"
                    "\"temperature\":0,\"stream\":true,\"stream_options\":{\"include_usage\":true}}"
                  : "{\"messages\":[{\"role\":\"system\",\"content\":\"Be brief.\"},{\"role\":"
                    "\"user\",\"content\":[{\"type\":\"text\",\"text\":\"What is the capital of "
                    "France?\"}]}],\"max_tokens\":20,\"temperature\":0,\"return_tokens\":true}";
}

static void test_serve_chat_matches_generate_and_stream(void **state) {
    (void)state;
    char mp[4096];
    th_data_path(mp, sizeof mp, QWEN);
    const char *ga[] = {"--model",
                        mp,
                        "--chat",
                        "--system",
                        "Be brief.",
                        "--prompt",
                        "What is the capital of France?",
                        "-n",
                        "20",
                        "--ids",
                        NULL};
    char *want_ids = s_generate(ga);
    http_resp h = s_http(s_qwen.port, "POST", "/v1/chat/completions", s_chat_body(false));
    assert_int_equal(h.status, 200);
    json_t *j = s_json(&h);
    char *got_ids = s_ids_string(json_object_get(j, "tokens"));
    assert_string_equal(got_ids, want_ids);
    json_t *msg = json_object_get(json_array_get(json_object_get(j, "choices"), 0), "message");
    assert_string_equal(json_string_value(json_object_get(msg, "role")), "assistant");
    const char *text = json_string_value(json_object_get(msg, "content"));
    assert_true(strlen(text) > 0);

    /* the same request streamed: chunks concatenate to the same text */
    http_resp hs = s_http(s_qwen.port, "POST", "/v1/chat/completions", s_chat_body(true));
    assert_int_equal(hs.status, 200);
    assert_non_null(strcasestr(hs.headers, "content-type: text/event-stream"));
    char *cat = calloc(strlen(hs.body) + 1, 1);
    int n_events = 0, n_usage = 0;
    bool done = false, finished = false;
    for (char *line = strtok(hs.body, "\n"); line; line = strtok(NULL, "\n")) {
        assert_true(!strncmp(line, "data: ", 6));
        assert_false(done); /* nothing after [DONE] */
        if (!strcmp(line + 6, "[DONE]")) {
            done = true;
            continue;
        }
        json_error_t je;
        json_t *ev = json_loads(line + 6, 0, &je);
        assert_non_null(ev);
        assert_string_equal(json_string_value(json_object_get(ev, "object")),
                            "chat.completion.chunk");
        json_t *ch = json_array_get(json_object_get(ev, "choices"), 0);
        if (!ch) {
            json_t *u = json_object_get(ev, "usage");
            assert_int_equal(json_integer_value(json_object_get(u, "completion_tokens")), 20);
            n_usage++;
        } else {
            const char *piece =
                json_string_value(json_object_get(json_object_get(ch, "delta"), "content"));
            if (piece) strcat(cat, piece);
            if (json_is_string(json_object_get(ch, "finish_reason"))) {
                assert_string_equal(json_string_value(json_object_get(ch, "finish_reason")),
                                    "length");
                finished = true;
            }
        }
        n_events++;
        json_decref(ev);
    }
    assert_true(done && finished);
    assert_int_equal(n_usage, 1);
    assert_true(n_events >= 4);
    assert_string_equal(cat, text);
    free(cat);
    free(got_ids);
    free(want_ids);
    json_decref(j);
    s_resp_free(&h);
    s_resp_free(&hs);
}

static void s_expect_400(const char *path, const char *body, const char *needle) {
    http_resp h = s_http(s_dense.port, "POST", path, body);
    if (h.status != 400) fail_msg("%s %s: status %d (want 400): %s", path, body, h.status, h.body);
    json_t *j = s_json(&h);
    json_t *e = json_object_get(j, "error");
    const char *m = json_string_value(json_object_get(e, "message"));
    assert_non_null(m);
    if (!strstr(m, needle)) fail_msg("%s: message '%s' lacks '%s'", body, m, needle);
    assert_string_equal(json_string_value(json_object_get(e, "type")), "invalid_request_error");
    json_decref(j);
    s_resp_free(&h);
}

static void test_serve_bad_requests_are_400(void **state) {
    (void)state;
    s_expect_400("/v1/chat/completions", "{\"messages\": [", "invalid JSON");
    s_expect_400("/v1/chat/completions", "[1,2]", "JSON object");
    s_expect_400("/v1/chat/completions", "{\"model\":\"m\"}", "'messages' is required");
    s_expect_400("/v1/chat/completions", "{\"messages\":[{\"content\":\"hi\"}]}", "role");
    s_expect_400("/v1/completions", "{\"max_tokens\":3}", "'prompt' is required");
    s_expect_400("/v1/completions", "{\"prompt\":\"a\",\"temperature\":\"hot\"}",
                 "'temperature' must be a number");
    s_expect_400("/v1/completions", "{\"prompt\":\"a\",\"max_tokens\":0}", "'max_tokens'");
    s_expect_400("/v1/completions", "{\"prompt\":\"a\",\"stop\":7}", "'stop'");
    s_expect_400("/v1/completions", "{\"prompt\":\"a\",\"n\":2}", "'n' must be 1");
}

static void test_serve_stop_string(void **state) {
    (void)state;
    /* find the greedy text, then stop at a piece of it */
    http_resp h = s_http(s_dense.port, "POST", "/v1/completions",
                         "{\"prompt\":\"Hello world\",\"max_tokens\":24,\"temperature\":0}");
    json_t *j = s_json(&h);
    const char *text = json_string_value(
        json_object_get(json_array_get(json_object_get(j, "choices"), 0), "text"));
    size_t tl = strlen(text);
    assert_true(tl >= 6);
    char stop[4] = {0};
    size_t at = tl / 2;
    while (at < tl && ((unsigned char)text[at] & 0xC0) == 0x80)
        at++;
    if (at + 2 > tl || (unsigned char)text[at] >= 0x80 || (unsigned char)text[at + 1] >= 0x80)
        at = 0; /* pick the first two ASCII bytes instead */
    while (at + 1 < tl && ((unsigned char)text[at] >= 0x80 || (unsigned char)text[at + 1] >= 0x80))
        at++;
    if (at + 1 >= tl) th_cannot_run("no two adjacent ASCII bytes in %s", text);
    memcpy(stop, text + at, 2);
    size_t first = (size_t)(strstr(text, stop) - text);
    char body[256];
    snprintf(body, sizeof body,
             "{\"prompt\":\"Hello world\",\"max_tokens\":24,\"temperature\":0,\"stop\":[\"%s\"]}",
             stop);
    http_resp h2 = s_http(s_dense.port, "POST", "/v1/completions", body);
    assert_int_equal(h2.status, 200);
    json_t *j2 = s_json(&h2);
    json_t *c2 = json_array_get(json_object_get(j2, "choices"), 0);
    const char *t2 = json_string_value(json_object_get(c2, "text"));
    assert_int_equal(strlen(t2), first);
    assert_memory_equal(t2, text, first);
    assert_string_equal(json_string_value(json_object_get(c2, "finish_reason")), "stop");
    json_decref(j);
    json_decref(j2);
    s_resp_free(&h);
    s_resp_free(&h2);
}

/* The server's metrics say a request runs. */
static bool s_first_runs(void *ctx) {
    (void)ctx;
    http_resp m = s_http(s_qwen.port, "GET", "/metrics", NULL);
    bool running = strstr(m.body, "\nstpipe_queue_running 1") != NULL;
    s_resp_free(&m);
    return running;
}

static void test_serve_queue_full_is_503(void **state) {
    (void)state;
    /* --queue 1: one request runs, one waits, the rest are refused at once */
    enum { N = 4 };
    const char *body = "{\"prompt\":\"Hello\",\"max_tokens\":300,\"ignore_eos\":true,"
                       "\"temperature\":0}";
    int fds[N];
    fds[0] = s_connect(s_qwen.port);
    assert_true(fds[0] >= 0);
    s_send_req(fds[0], "POST", "/v1/completions", body);
    if (!th_wait_until(s_first_runs, NULL, 5)) fail_msg("the first request never started");
    for (int i = 1; i < N; i++) {
        fds[i] = s_connect(s_qwen.port);
        assert_true(fds[i] >= 0);
        s_send_req(fds[i], "POST", "/v1/completions", body);
    }
    int ok = 0, busy = 0;
    for (int i = 0; i < N; i++) {
        http_resp h = s_read_resp(fds[i]);
        if (h.status == 200) {
            json_t *j = s_json(&h);
            json_t *u = json_object_get(j, "usage");
            assert_int_equal(json_integer_value(json_object_get(u, "completion_tokens")), 300);
            json_decref(j);
            ok++;
        } else if (h.status == 503) {
            assert_true(i > 0);
            json_t *j = s_json(&h);
            json_t *e = json_object_get(j, "error");
            assert_non_null(
                strstr(json_string_value(json_object_get(e, "message")), "server busy"));
            assert_string_equal(json_string_value(json_object_get(e, "type")), "server_error");
            json_decref(j);
            busy++;
        } else {
            fail_msg("unexpected status %d: %s", h.status, h.body);
        }
        s_resp_free(&h);
    }
    assert_int_equal(ok, 2);   /* the running one and the queued one */
    assert_int_equal(busy, 2); /* the others found the queue full */
}

static void test_serve_metrics(void **state) {
    (void)state;
    http_resp g = s_http(s_dense.port, "POST", "/v1/completions",
                         "{\"prompt\":\"Hi\",\"max_tokens\":4,\"temperature\":0}");
    assert_int_equal(g.status, 200);
    s_resp_free(&g);
    http_resp h = s_http(s_dense.port, "GET", "/metrics", NULL);
    assert_int_equal(h.status, 200);
    assert_non_null(strcasestr(h.headers, "content-type: text/plain; version=0.0.4"));
    static const char *const names[] = {
        "stpipe_requests_total{endpoint=\"/v1/completions\",code=\"200\"}",
        "stpipe_prompt_tokens_total ",
        "stpipe_generated_tokens_total ",
        "stpipe_queue_waiting ",
        "stpipe_request_duration_seconds_bucket{le=\"+Inf\"}",
        "stpipe_time_to_first_token_seconds_count ",
        "stpipe_prompt_tokens_per_second_bucket",
        "stpipe_generation_tokens_per_second_sum ",
        "stpipe_stage_duration_ms_bucket{stage=\"router\",le=",
        "stpipe_stage_duration_ms_bucket{stage=\"attention\",le=",
        "stpipe_stage_duration_ms_bucket{stage=\"experts\",le=",
        "stpipe_stage_duration_ms_count{stage=\"lm_head\"}",
        "# TYPE stpipe_stage_duration_ms histogram",
    };
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
        if (!strstr(h.body, names[i])) fail_msg("/metrics lacks %s:\n%s", names[i], h.body);
    /* at least the 4 generated tokens above were counted */
    const char *p = strstr(h.body, "\nstpipe_generated_tokens_total ");
    assert_true(atoll(p + strlen("\nstpipe_generated_tokens_total ")) >= 4);
    s_resp_free(&h);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_serve_health_and_models),
        cmocka_unit_test(test_serve_completion_matches_generate),
        cmocka_unit_test(test_serve_chat_matches_generate_and_stream),
        cmocka_unit_test(test_serve_bad_requests_are_400),
        cmocka_unit_test(test_serve_stop_string),
        cmocka_unit_test(test_serve_queue_full_is_503),
        cmocka_unit_test(test_serve_metrics),
    };
    alarm(600); /* bounded in time even if a server hangs */
    return cmocka_run_group_tests(tests, s_setup, s_teardown);
}
