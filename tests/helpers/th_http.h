/* th_http: a small HTTP/1.1 client for the `stpipe serve` tests and a server starter: raw
 * requests (to send malformed ones), Connection: close, chunked bodies decoded, every read
 * bounded by a deadline. Servers listen on 127.0.0.1 with --port 0; the port is read from the
 * "listening on" line of their stderr. */
#ifndef TH_HTTP_H
#define TH_HTTP_H

#include <stdbool.h>
#include <stddef.h>
#include <sys/types.h>

typedef struct th_server {
    pid_t pid;
    int port;
    char err_path[4096];
} th_server;

/* Starts `stpipe serve --model DATA/model --port 0 --threads 1 [args...]` (args NULL-ended,
 * at most 24) with stderr to $STP_TMP/<tag>.err, and waits up to 60 s for its port. 0 or -1. */
int th_server_start(th_server *s, const char *model, const char *const *args, const char *tag);
/* SIGTERM, then up to 20 s (SIGKILL after): the exit status, or -1. */
int th_server_stop(th_server *s);

typedef struct th_http_resp {
    int status;    /* 0: the server closed without an answer */
    char *headers; /* status line and headers */
    char *body;    /* de-chunked */
} th_http_resp;

/* A connected socket to 127.0.0.1:port (receive timeout 120 s), or -1. */
int th_http_connect(int port);
/* Writes all of buf (false if the peer closed first). */
bool th_http_write(int fd, const void *buf, size_t len);
/* Writes one request on fd: method, path, extra header lines (each ending "\r\n", may be
 * NULL), body (may be NULL); Connection: close. False if the peer closed first. */
bool th_http_send(int fd, const char *method, const char *path, const char *headers,
                  const char *body);
/* Reads the response until the server closes, closes fd, and decodes it. */
th_http_resp th_http_read(int fd);
/* The same, giving up at deadline (th_now() seconds; 0: none): then *timed_out (may be NULL)
 * is set and what came so far is decoded. */
th_http_resp th_http_read_by(int fd, double deadline, bool *timed_out);
/* One request (th_http_send) on a new connection, and its answer (status 0 when the
 * connection fails). */
th_http_resp th_http(int port, const char *method, const char *path, const char *headers,
                     const char *body);
/* Sends raw bytes as they are and reads the answer. */
th_http_resp th_http_raw(int port, const char *raw, size_t len);
void th_http_free(th_http_resp *r);
/* Value of the first line of a /metrics body starting with name (e.g.
 * "stpipe_queue_running "), or -1 when absent. */
long long th_metric(const char *metrics, const char *name);

#endif
