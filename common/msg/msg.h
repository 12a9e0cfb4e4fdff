/* msg: the transport seam between pipeline stages: ZeroMQ sockets on ipc:// endpoints in the run
 * directory, carrying one protobuf-c envelope per message (ClientMsg, EvalMsg, LayerMsg,
 * RouterMsg, StatsReport; see proto/).
 *
 * Framing: a DEALER sends [payload]; a ROUTER receives [peer id][payload] and answers with the
 * same id. msg_recv accepts exactly that shape and nothing else; the caller then unpacks the
 * payload, checks the envelope's version (STP_PROTO_VERSION) and validates the body before use.
 * Every stage uses these calls and nothing else from zmq, so another transport (tcp across
 * hosts, a different library) replaces this file only. */
#ifndef STP_MSG_H
#define STP_MSG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <protobuf-c/protobuf-c.h>

#include "util/stp_err.h"

/* 3: EvalSeq.upto/from (a prompt chunk a few layers a step): a stage that ignored them would run
 * a slice's chunk whole, so stages of version 2 must not be mixed with 3 */
#define STP_PROTO_VERSION 3u
#define MSG_ID_MAX 256           /* ROUTER peer ids (zmq makes 5-byte ones) */
#define MSG_MAX_BYTES (1u << 30) /* larger payloads are refused before decoding */
#define MSG_SEND_TIMEOUT_MS 5000 /* a send blocked at the high-water mark fails after this */

/* One received message: the peer id (ROUTER sockets only) and the payload. */
typedef struct msg_in {
    uint8_t id[MSG_ID_MAX];
    size_t id_len;
    uint8_t *data; /* malloc'd payload */
    size_t len;
} msg_in;

/* "ipc://<run_dir>/<name>.sock" into out. */
int msg_endpoint(char *out, size_t cap, const char *run_dir, const char *name, stp_err *err);

/* A tcp endpoint from an operator's spec: "PORT" gives "tcp://127.0.0.1:PORT"; "ADDR:PORT"
 * gives that address. A wildcard address ("*", "0.0.0.0", "::", "[::]") is refused unless
 * allow_public (the operator asked for every interface explicitly). STP_EINVAL on a bad spec. */
int msg_tcp_endpoint(char *out, size_t cap, const char *spec, bool allow_public, stp_err *err);

/* A socket of zmq type `type` bound (bind) or connected to endpoint; linger 0, the given
 * high-water marks (0: zmq default). Binding an ipc endpoint removes a stale socket file first
 * and makes the new one 0600. Binding tcp to a wildcard address is refused (use
 * msg_tcp_endpoint with allow_public and msg_bind_more). A ROUTER reports sends to a peer that
 * is gone (ZMQ_ROUTER_MANDATORY): msg_send returns STP_EPEER. */
void *msg_socket(void *zctx, int type, const char *endpoint, bool bind, stp_err *err);
void msg_close(void **sock_p);

/* Binds an existing socket to one more endpoint (no wildcard check: the caller validated it
 * with msg_tcp_endpoint). */
int msg_bind_more(void *sock, const char *endpoint, stp_err *err);

/* Packs m and sends it (prefixed by the peer id when id_len > 0). 0, STP_EPEER (a ROUTER's
 * peer is gone) or STP_EIO. */
int msg_send(void *sock, const uint8_t *id, size_t id_len, const ProtobufCMessage *m, stp_err *err);
/* Like msg_send but never blocks: STP_EBUSY (nothing sent) when the peer's queue is full. For
 * messages that are only hints (a router decision whose experts are all resident). */
int msg_try_send(void *sock, const uint8_t *id, size_t id_len, const ProtobufCMessage *m,
                 stp_err *err);

/* Receives one whole message without waiting (call after zmq_poll says readable). router: the
 * socket is a ROUTER (first frame is the peer id). Returns 1 with *in filled (free with
 * msg_in_free), 0 when nothing was waiting, or STP_EPROTO when the frames have the wrong shape
 * (the message is consumed and dropped; in->id is still filled when known). */
int msg_recv(void *sock, bool router, msg_in *in, stp_err *err);
void msg_in_free(msg_in *in);

/* Waits up to timeout_ms (-1: forever) for one of n (<= MSG_POLL_MAX) sockets to become
 * readable; fills ready[i]. Returns the number readable, 0 on timeout or interruption by a
 * signal. */
#define MSG_POLL_MAX 32
int msg_poll(void **socks, int n, bool *ready, long timeout_ms);

/* Monotonic clock in microseconds. */
double msg_now_us(void);

#endif
