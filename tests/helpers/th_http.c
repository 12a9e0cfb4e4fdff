/* th_http: HTTP client and `stpipe serve` starter for the serve tests; see th_http.h. */
#include "th_http.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <unistd.h>

#include "th_gguf.h"
#include "th_proc.h"

int th_server_start(th_server *s, const char *model, const char *const *args, const char *tag) {
    char bin[4096], mp[4096], name[256];
    th_bin_path(bin, sizeof bin, "stpipe");
    th_data_path(mp, sizeof mp, model);
    snprintf(name, sizeof name, "%s.err", tag);
    th_tmp_path(s->err_path, sizeof s->err_path, name);
    char *argv[40] = {bin, "serve", "--model", mp, "--port", "0", "--threads", "1"};
    int n = 8;
    for (int i = 0; args && args[i] && n < 32; i++)
        argv[n++] = (char *)args[i];
    argv[n] = NULL;
    unlink(s->err_path);
    s->pid = th_spawn(argv, NULL, s->err_path);
    if (s->pid < 0) return -1;
    const char *key = "listening on http://127.0.0.1:";
    double deadline = th_now() + 60; /* sanitizer builds load slowly */
    while (th_now() < deadline) {
        char *e = th_slurp_str(s->err_path);
        const char *p = strstr(e, key);
        if (p) s->port = atoi(p + strlen(key));
        free(e);
        if (p) return 0;
        int st;
        if (waitpid(s->pid, &st, WNOHANG) == s->pid) {
            s->pid = 0;
            return -1;
        }
        usleep(20000); /* polling the log file for the condition, up to the deadline */
    }
    return -1;
}

int th_server_stop(th_server *s) {
    if (s->pid <= 0) return -1;
    kill(s->pid, SIGTERM);
    int st = th_wait(s->pid, 20);
    s->pid = 0;
    return st;
}

int th_http_connect(int port) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return -1;
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

bool th_http_write(int fd, const void *buf, size_t len) {
    const char *p = buf;
    while (len > 0) {
        ssize_t w = send(fd, p, len, MSG_NOSIGNAL);
        if (w <= 0) return false;
        p += w;
        len -= (size_t)w;
    }
    return true;
}

th_http_resp th_http_read(int fd) {
    return th_http_read_by(fd, 0, NULL);
}

th_http_resp th_http_read_by(int fd, double deadline, bool *timed_out) {
    if (timed_out) *timed_out = false;
    size_t cap = 65536, len = 0;
    char *raw = malloc(cap + 1);
    for (;;) {
        if (len == cap) raw = realloc(raw, (cap *= 2) + 1);
        if (deadline > 0) {
            double left = deadline - th_now();
            struct pollfd p = {.fd = fd, .events = POLLIN};
            int n = left > 0 ? poll(&p, 1, (int)(left * 1000) + 1) : 0;
            if (n < 0 && errno == EINTR) continue;
            if (n == 0) {
                if (timed_out) *timed_out = true;
                break;
            }
        }
        ssize_t r = read(fd, raw + len, cap - len);
        if (r <= 0) break;
        len += (size_t)r;
    }
    close(fd);
    raw[len] = 0;
    th_http_resp h = {0};
    char *start = raw;
    while (!strncmp(start, "HTTP/1.1 100", 12) && strstr(start, "\r\n\r\n"))
        start = strstr(start, "\r\n\r\n") + 4; /* skip "100 Continue" */
    char *sep = strstr(start, "\r\n\r\n");
    if (!sep) {
        h.headers = strdup(start);
        h.body = strdup("");
        free(raw);
        return h;
    }
    *sep = 0;
    h.headers = strdup(start);
    sscanf(start, "HTTP/1.%*d %d", &h.status);
    const char *b = sep + 4;
    if (strcasestr(h.headers, "transfer-encoding: chunked")) {
        h.body = calloc(len + 1, 1);
        size_t out = 0;
        for (;;) {
            char *end;
            unsigned long n = strtoul(b, &end, 16);
            const char *data = end == b ? NULL : strstr(end, "\r\n");
            if (!data || n == 0 || n > (size_t)(raw + len - data)) break;
            memcpy(h.body + out, data + 2, n);
            out += n;
            b = data + 2 + n + 2;
            if (b > raw + len) break;
        }
    } else {
        h.body = strdup(b);
    }
    free(raw);
    return h;
}

bool th_http_send(int fd, const char *method, const char *path, const char *headers,
                  const char *body) {
    size_t bl = body ? strlen(body) : 0;
    size_t cap = strlen(path) + (headers ? strlen(headers) : 0) + 256;
    char *head = malloc(cap);
    int n = snprintf(head, cap,
                     "%s %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                     "Content-Type: application/json\r\nContent-Length: %zu\r\n%s\r\n",
                     method, path, bl, headers ? headers : "");
    bool ok = th_http_write(fd, head, (size_t)n) && (!bl || th_http_write(fd, body, bl));
    free(head);
    return ok;
}

th_http_resp th_http(int port, const char *method, const char *path, const char *headers,
                     const char *body) {
    int fd = th_http_connect(port);
    if (fd < 0) return (th_http_resp){0, strdup(""), strdup("")};
    th_http_send(fd, method, path, headers, body);
    return th_http_read(fd);
}

th_http_resp th_http_raw(int port, const char *raw, size_t len) {
    int fd = th_http_connect(port);
    if (fd < 0) return (th_http_resp){0, strdup(""), strdup("")};
    th_http_write(fd, raw, len);
    return th_http_read(fd);
}

void th_http_free(th_http_resp *r) {
    free(r->headers);
    free(r->body);
    r->headers = r->body = NULL;
}

long long th_metric(const char *metrics, const char *name) {
    size_t nl = strlen(name);
    for (const char *p = metrics; p && *p; p = strchr(p, '\n') ? strchr(p, '\n') + 1 : NULL)
        if (!strncmp(p, name, nl)) return atoll(p + nl);
    return -1;
}
