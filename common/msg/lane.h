/* lane: the hot path's transport between the attention worker and one expert worker: two
 * single-producer single-consumer rings of packed protobuf-c messages in the activation region,
 * each with a futex doorbell, instead of a ZeroMQ socket.
 *
 * Why: a ZeroMQ message between two processes crosses four threads (sender, its I/O thread, the
 * receiver's I/O thread, the receiver), so one ExpertWork/ExpertDone round trip is eight thread
 * hand-overs, twice per layer per token; on 2 cores that was a noticeable share of decode time,
 * larger with two expert workers than with one (docs/BENCHMARKS.md). A lane hands a message
 * over with one store and one FUTEX_WAKE: the receiving thread itself is woken.
 *
 * The messages are the same LayerMsg envelopes the ZeroMQ sockets carry (packed by
 * protobuf-c, validated the same way on receipt); only the carrier differs. A message that does
 * not fit an entry (LANE_MSG_MAX) or a full ring is the caller's cue to use ZeroMQ instead.
 *
 * Invariants
 * 1. One producer and one consumer per ring. head counts entries put, tail entries taken
 *    (uint32, wrapping); 0 <= head - tail <= LANE_DEPTH. The producer writes entry head % D,
 *    then publishes head + 1 (release); the consumer copies entry tail % D out, then publishes
 *    tail + 1 (release), so the producer never overwrites an entry being read.
 * 2. A consumer trusts nothing in the ring: a length over LANE_MSG_MAX is taken as an empty
 *    (undecodable) message, and the bytes are copied out before they are decoded.
 * 3. Waiting is FUTEX_WAIT on a shared word with a timeout (never a busy spin); the waiter loads
 *    the word before checking for work, so a put between the check and the wait is not lost.
 * 4. The rings live in the attention worker's region: they survive an expert worker's restart
 *    (the new process takes what its predecessor left), and a restarted attention worker makes a
 *    new region (workers re-attach when shm_region_current says so). */
#ifndef STP_LANE_H
#define STP_LANE_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <protobuf-c/protobuf-c.h>

#define LANE_MAX 16        /* lanes in a region: one per expert worker index */
#define LANE_DEPTH 4       /* entries per ring (a layer has at most 4 batches: attn.c) */
#define LANE_MSG_MAX 4088u /* bytes of one packed message (64 experts of work take ~1.8 KB) */

typedef struct lane_entry {
    uint32_t len;
    uint32_t pad;
    uint8_t data[LANE_MSG_MAX];
} lane_entry;

typedef struct lane_ring {
    _Alignas(64) _Atomic uint32_t head; /* entries put; the consumer's futex word */
    _Alignas(64) _Atomic uint32_t tail; /* entries taken */
    _Alignas(64) lane_entry e[LANE_DEPTH];
} lane_ring;

/* One expert worker's pair of rings. */
typedef struct lane_pair {
    _Alignas(64) _Atomic int32_t pid; /* the expert worker attached (0: none; use ZeroMQ) */
    lane_ring work;                   /* attention worker -> expert worker */
    lane_ring done;                   /* expert worker -> attention worker */
} lane_pair;

typedef struct lane_block {
    /* bumped after every put into a done ring: the attention worker sleeps on this one word
     * while it waits for several workers */
    _Alignas(64) _Atomic uint32_t bell;
    /* 1: the attention worker sends layer work through the lanes (0: by zmq only, and expert
     * workers do not attach, so they keep waiting on their sockets) */
    _Atomic uint32_t active;
    /* replies the attention worker still waits for (lane_expect); the reply that takes it to 0
     * wakes it, the others only bump the bell: one wake-up per layer however many workers */
    _Atomic int32_t outstanding;
    /* work whose seq is below this belongs to a layer the attention worker is done with (or
     * gave up on): a worker that finds it later (left in a ring or a zmq queue while it was
     * dead) drops it unread, so it cannot overwrite the current layer's outputs */
    _Atomic uint64_t floor;
    /* the two stages' hand-off words (threadpool_set_handoff): the attention worker's idle
     * compute threads sleep on attn_cores while its pool is parked, every expert worker's on
     * expert_cores; a thread giving its core up rings the other word */
    _Alignas(64) _Atomic uint32_t attn_cores;
    _Alignas(64) _Atomic uint32_t expert_cores;
    lane_pair lanes[LANE_MAX];
} lane_block;

/* Packs m into the ring's next entry and publishes it (no wake). *pos (optional) receives the
 * entry's position for lane_taken. 0, or STP_EBUSY when the ring is full or m is larger than
 * LANE_MSG_MAX (nothing was put). */
int lane_put(lane_ring *r, const ProtobufCMessage *m, uint32_t *pos);
/* lane_put, then wakes the ring's consumer (who sleeps on head). */
int lane_send(lane_ring *r, const ProtobufCMessage *m, uint32_t *pos);
/* lane_put into a done ring of b, then bumps b's bell, waking the attention worker when this is
 * the last reply it expects (or when it expects none: a late or unexpected reply wakes it too,
 * which costs a look, never a hang). */
int lane_reply(lane_block *b, lane_ring *r, const ProtobufCMessage *m);
/* The attention worker is about to send n works through lanes: reset (the first batch of a
 * layer: what an earlier layer left unanswered no longer counts) or add to the count. */
void lane_expect(lane_block *b, int n, bool reset);
/* Copies the oldest entry into buf (LANE_MSG_MAX bytes) and frees it: 1 with *len set, 0 when
 * the ring is empty. */
int lane_take(lane_ring *r, uint8_t *buf, size_t *len);
/* Whether the entry put at pos has been taken by the consumer. */
bool lane_taken(const lane_ring *r, uint32_t pos);
/* Sleeps until *word differs from seen, a wake, or timeout_ms (>= 0) passes (waiters must not
 * rely on being woken: a skipped wake costs at most the timeout). */
void lane_wait(_Atomic uint32_t *word, uint32_t seen, int timeout_ms);
/* Wakes every waiter on word. */
void lane_wake(_Atomic uint32_t *word);

#endif
