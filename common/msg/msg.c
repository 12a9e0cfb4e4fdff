/* msg: zmq sockets carrying protobuf-c envelopes; see msg.h. */
#include "msg/msg.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <zmq.h>

int msg_endpoint(char *out, size_t cap, const char *run_dir, const char *name, stp_err *err) {
    int n = snprintf(out, cap, "ipc://%s/%s.sock", run_dir, name);
    if (n < 0 || (size_t)n >= cap || n - 6 >= 107) /* sun_path holds 107 characters */
        return stp_err_set(err, STP_EINVAL, "socket path '%s/%s.sock' is too long", run_dir, name);
    return 0;
}

static bool s_wildcard(const char *host, size_t n) {
    static const char *const any[] = {"*", "0.0.0.0", "::", "[::]", "0", ""};
    for (size_t i = 0; i < sizeof any / sizeof any[0]; i++)
        if (strlen(any[i]) == n && !strncmp(host, any[i], n)) return true;
    return false;
}

int msg_tcp_endpoint(char *out, size_t cap, const char *spec, bool allow_public, stp_err *err) {
    if (!spec || !*spec) return stp_err_set(err, STP_EINVAL, "empty tcp address");
    if (!strncmp(spec, "tcp://", 6)) spec += 6;
    const char *colon = strrchr(spec, ':');
    const char *port = colon ? colon + 1 : spec;
    size_t hn = colon ? (size_t)(colon - spec) : 0;
    char *end = NULL;
    long p = strtol(port, &end, 10);
    if (end == port || *end || p < 1 || p > 65535)
        return stp_err_set(err, STP_EINVAL, "tcp address '%s': expected PORT or ADDR:PORT", spec);
    if (colon && s_wildcard(spec, hn) && !allow_public)
        return stp_err_set(err, STP_EINVAL,
                           "tcp address '%s' listens on every interface: refused (give a "
                           "specific address, or allow it explicitly with --bind-public)",
                           spec);
    int n = colon ? snprintf(out, cap, "tcp://%.*s:%ld", (int)hn, spec, p)
                  : snprintf(out, cap, "tcp://127.0.0.1:%ld", p);
    if (n < 0 || (size_t)n >= cap) return stp_err_set(err, STP_EINVAL, "tcp address too long");
    return 0;
}

/* True for "tcp://<wildcard>:port". */
static bool s_tcp_wildcard(const char *endpoint) {
    if (strncmp(endpoint, "tcp://", 6)) return false;
    const char *h = endpoint + 6, *colon = strrchr(h, ':');
    return colon && s_wildcard(h, (size_t)(colon - h));
}

int msg_bind_more(void *sock, const char *endpoint, stp_err *err) {
    if (zmq_bind(sock, endpoint))
        return stp_err_set(err, STP_EIO, "bind %s: %s", endpoint, zmq_strerror(zmq_errno()));
    return 0;
}

void *msg_socket(void *zctx, int type, const char *endpoint, bool bind, stp_err *err) {
    if (bind && s_tcp_wildcard(endpoint)) {
        stp_err_set(err, STP_EINVAL, "bind %s: every interface: refused", endpoint);
        return NULL;
    }
    void *s = zmq_socket(zctx, type);
    if (!s) {
        stp_err_set(err, STP_EIO, "zmq_socket: %s", zmq_strerror(zmq_errno()));
        return NULL;
    }
    int linger = 0, one = 1;
    zmq_setsockopt(s, ZMQ_LINGER, &linger, sizeof linger);
    if (type == ZMQ_ROUTER) zmq_setsockopt(s, ZMQ_ROUTER_MANDATORY, &one, sizeof one);
    int sndtimeo = MSG_SEND_TIMEOUT_MS; /* a send never blocks forever (peer stopped) */
    zmq_setsockopt(s, ZMQ_SNDTIMEO, &sndtimeo, sizeof sndtimeo);
    int rc;
    if (bind) {
        if (strncmp(endpoint, "ipc://", 6) == 0) unlink(endpoint + 6);
        rc = zmq_bind(s, endpoint);
        if (rc == 0 && strncmp(endpoint, "ipc://", 6) == 0) chmod(endpoint + 6, 0600);
    } else {
        rc = zmq_connect(s, endpoint);
    }
    if (rc) {
        stp_err_set(err, STP_EIO, "%s %s: %s", bind ? "bind" : "connect", endpoint,
                    zmq_strerror(zmq_errno()));
        zmq_close(s);
        return NULL;
    }
    return s;
}

void msg_close(void **sock_p) {
    if (*sock_p) zmq_close(*sock_p);
    *sock_p = NULL;
}

static void s_free_buf(void *data, void *hint) {
    (void)hint;
    free(data);
}

static int s_send(void *sock, const uint8_t *id, size_t id_len, const ProtobufCMessage *m,
                  int flags, stp_err *err) {
    size_t len = protobuf_c_message_get_packed_size(m);
    uint8_t *buf = malloc(len ? len : 1);
    if (!buf) return stp_err_set(err, STP_ENOMEM, "msg_send: out of memory (%zu bytes)", len);
    protobuf_c_message_pack(m, buf);
    if (id_len && zmq_send(sock, id, id_len, ZMQ_SNDMORE | ZMQ_DONTWAIT) < 0) {
        int e = zmq_errno();
        free(buf);
        return stp_err_set(err, e == EHOSTUNREACH ? STP_EPEER : STP_EIO, "send: %s",
                           zmq_strerror(e));
    }
    zmq_msg_t zm;
    zmq_msg_init_data(&zm, buf, len, s_free_buf, NULL);
    /* Blocks only at the high-water mark (a stopped peer), at most MSG_SEND_TIMEOUT_MS. */
    if (zmq_msg_send(&zm, sock, flags) < 0) {
        int e = zmq_errno();
        zmq_msg_close(&zm);
        if (e == EAGAIN && (flags & ZMQ_DONTWAIT))
            return stp_err_set(err, STP_EBUSY, "send: the peer's queue is full");
        return stp_err_set(err, STP_EIO, "send: %s", zmq_strerror(e));
    }
    return 0;
}

int msg_send(void *sock, const uint8_t *id, size_t id_len, const ProtobufCMessage *m,
             stp_err *err) {
    return s_send(sock, id, id_len, m, 0, err);
}

int msg_try_send(void *sock, const uint8_t *id, size_t id_len, const ProtobufCMessage *m,
                 stp_err *err) {
    return s_send(sock, id, id_len, m, ZMQ_DONTWAIT, err);
}

void msg_in_free(msg_in *in) {
    free(in->data);
    in->data = NULL;
    in->len = 0;
}

/* Drops the remaining frames of a message. */
static void s_drain(void *sock) {
    int more = 1;
    size_t sz = sizeof more;
    while (zmq_getsockopt(sock, ZMQ_RCVMORE, &more, &sz) == 0 && more) {
        zmq_msg_t m;
        zmq_msg_init(&m);
        zmq_msg_recv(&m, sock, 0);
        zmq_msg_close(&m);
        sz = sizeof more;
    }
}

int msg_recv(void *sock, bool router, msg_in *in, stp_err *err) {
    memset(in, 0, sizeof *in);
    zmq_msg_t f;
    zmq_msg_init(&f);
    if (zmq_msg_recv(&f, sock, ZMQ_DONTWAIT) < 0) {
        zmq_msg_close(&f);
        return 0;
    }
    if (router) {
        size_t n = zmq_msg_size(&f);
        bool more = zmq_msg_more(&f);
        if (n > MSG_ID_MAX) n = MSG_ID_MAX;
        memcpy(in->id, zmq_msg_data(&f), n);
        in->id_len = n;
        zmq_msg_close(&f);
        if (!more) return stp_err_set(err, STP_EPROTO, "message without payload frame");
        zmq_msg_init(&f);
        if (zmq_msg_recv(&f, sock, 0) < 0) {
            zmq_msg_close(&f);
            return stp_err_set(err, STP_EPROTO, "message without payload frame");
        }
    }
    if (zmq_msg_more(&f)) {
        zmq_msg_close(&f);
        s_drain(sock);
        return stp_err_set(err, STP_EPROTO, "message with extra frames");
    }
    size_t len = zmq_msg_size(&f);
    if (len > MSG_MAX_BYTES) {
        zmq_msg_close(&f);
        return stp_err_set(err, STP_EPROTO, "message of %zu bytes is too large", len);
    }
    in->data = malloc(len ? len : 1);
    if (!in->data) {
        zmq_msg_close(&f);
        return stp_err_set(err, STP_ENOMEM, "out of memory for a %zu-byte message", len);
    }
    memcpy(in->data, zmq_msg_data(&f), len);
    in->len = len;
    zmq_msg_close(&f);
    return 1;
}

int msg_poll(void **socks, int n, bool *ready, long timeout_ms) {
    zmq_pollitem_t items[MSG_POLL_MAX];
    if (n > MSG_POLL_MAX) n = MSG_POLL_MAX;
    for (int i = 0; i < n; i++)
        items[i] = (zmq_pollitem_t){socks[i], 0, ZMQ_POLLIN, 0};
    int rc = zmq_poll(items, n, timeout_ms);
    for (int i = 0; i < n; i++)
        ready[i] = rc > 0 && (items[i].revents & ZMQ_POLLIN);
    return rc > 0 ? rc : 0;
}

double msg_now_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e6 + ts.tv_nsec * 1e-3;
}
