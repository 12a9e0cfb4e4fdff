/* lane: shared-memory rings with futex doorbells for the layer hot path; see lane.h. */
#include "msg/lane.h"

#include <limits.h>
#include <linux/futex.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "util/stp_err.h"

/* Shared (not FUTEX_PRIVATE_FLAG) futexes: the words live in a MAP_SHARED segment that two
 * processes map, and the kernel keys them by the page, not by the address. */
static long s_futex(_Atomic uint32_t *word, int op, uint32_t val, const struct timespec *ts) {
    return syscall(SYS_futex, (uint32_t *)word, op, val, ts, NULL, 0);
}

int lane_put(lane_ring *r, const ProtobufCMessage *m, uint32_t *pos) {
    size_t n = protobuf_c_message_get_packed_size(m);
    if (n > LANE_MSG_MAX) return STP_EBUSY;
    uint32_t h = atomic_load_explicit(&r->head, memory_order_relaxed);
    uint32_t t = atomic_load_explicit(&r->tail, memory_order_acquire);
    if (h - t >= LANE_DEPTH) return STP_EBUSY;
    lane_entry *e = &r->e[h % LANE_DEPTH];
    e->len = (uint32_t)protobuf_c_message_pack(m, e->data);
    atomic_store_explicit(&r->head, h + 1, memory_order_release);
    if (pos) *pos = h;
    return 0;
}

int lane_send(lane_ring *r, const ProtobufCMessage *m, uint32_t *pos) {
    int rc = lane_put(r, m, pos);
    if (!rc) lane_wake(&r->head);
    return rc;
}

int lane_reply(lane_block *b, lane_ring *r, const ProtobufCMessage *m) {
    int rc = lane_put(r, m, NULL);
    if (rc) return rc;
    int32_t left = atomic_fetch_sub_explicit(&b->outstanding, 1, memory_order_acq_rel);
    atomic_fetch_add_explicit(&b->bell, 1, memory_order_release);
    if (left <= 1) lane_wake(&b->bell);
    return 0;
}

void lane_expect(lane_block *b, int n, bool reset) {
    if (reset)
        atomic_store_explicit(&b->outstanding, n, memory_order_release);
    else
        atomic_fetch_add_explicit(&b->outstanding, n, memory_order_acq_rel);
}

int lane_take(lane_ring *r, uint8_t *buf, size_t *len) {
    uint32_t t = atomic_load_explicit(&r->tail, memory_order_relaxed);
    uint32_t h = atomic_load_explicit(&r->head, memory_order_acquire);
    if (t == h) return 0;
    const lane_entry *e = &r->e[t % LANE_DEPTH];
    uint32_t n = e->len;
    if (n > LANE_MSG_MAX) n = 0; /* not a length this side wrote: decodes as nothing */
    memcpy(buf, e->data, n);
    *len = n;
    atomic_store_explicit(&r->tail, t + 1, memory_order_release);
    return 1;
}

bool lane_taken(const lane_ring *r, uint32_t pos) {
    uint32_t t = atomic_load_explicit(&((lane_ring *)r)->tail, memory_order_acquire);
    return (int32_t)(t - pos) > 0;
}

void lane_wait(_Atomic uint32_t *word, uint32_t seen, int timeout_ms) {
    if (atomic_load_explicit(word, memory_order_acquire) != seen) return;
    struct timespec ts = {timeout_ms / 1000, (long)(timeout_ms % 1000) * 1000000L};
    s_futex(word, FUTEX_WAIT, seen, &ts); /* EAGAIN (changed), ETIMEDOUT, EINTR: all fine */
}

void lane_wake(_Atomic uint32_t *word) {
    s_futex(word, FUTEX_WAKE, INT_MAX, NULL);
}
