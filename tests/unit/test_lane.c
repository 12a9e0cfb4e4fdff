/* test_lane: the shared-memory message rings (common/msg/lane.h): order, full and oversized
 * refusals, a corrupt length, wrap-around of the counters, and a round trip between two
 * processes sleeping on the shared futexes. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>

#include "layer.pb-c.h"
#include "msg/lane.h"
#include "msg/msg.h"
#include "util/stp_err.h"

static lane_block *s_block(void) {
    void *p =
        mmap(NULL, sizeof(lane_block), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    assert_true(p != MAP_FAILED);
    return p;
}

/* A Ping envelope with the given nonce (and stage name, to make it longer). */
static Stp__LayerMsg *s_ping(Stp__LayerMsg *m, Stp__Ping *p, uint64_t nonce) {
    stp__ping__init(p);
    p->nonce = nonce;
    stp__layer_msg__init(m);
    m->version = STP_PROTO_VERSION;
    m->body_case = STP__LAYER_MSG__BODY_PING;
    m->ping = p;
    return m;
}

static uint64_t s_nonce(const uint8_t *buf, size_t len) {
    Stp__LayerMsg *m = stp__layer_msg__unpack(NULL, len, buf);
    assert_non_null(m);
    assert_int_equal(m->body_case, STP__LAYER_MSG__BODY_PING);
    uint64_t n = m->ping->nonce;
    stp__layer_msg__free_unpacked(m, NULL);
    return n;
}

static void test_lane_order_and_full(void **st) {
    (void)st;
    lane_block *b = s_block();
    lane_ring *r = &b->lanes[0].work;
    Stp__LayerMsg m;
    Stp__Ping p;
    uint8_t buf[LANE_MSG_MAX];
    size_t len;
    assert_int_equal(lane_take(r, buf, &len), 0); /* empty */
    uint32_t pos[LANE_DEPTH];
    for (int i = 0; i < LANE_DEPTH; i++)
        assert_int_equal(lane_put(r, &s_ping(&m, &p, 100 + i)->base, &pos[i]), 0);
    assert_int_equal(lane_send(r, &s_ping(&m, &p, 999)->base, NULL), STP_EBUSY); /* full */
    assert_false(lane_taken(r, pos[0]));
    for (int i = 0; i < LANE_DEPTH; i++) {
        assert_int_equal(lane_take(r, buf, &len), 1);
        assert_int_equal(s_nonce(buf, len), 100 + i);
        assert_true(lane_taken(r, pos[i]));
        if (i + 1 < LANE_DEPTH) assert_false(lane_taken(r, pos[i + 1]));
    }
    assert_int_equal(lane_take(r, buf, &len), 0);
    munmap(b, sizeof *b);
}

static void test_lane_oversized_and_corrupt(void **st) {
    (void)st;
    lane_block *b = s_block();
    lane_ring *r = &b->lanes[3].done;
    /* a message larger than an entry is refused (the caller sends it by zmq) */
    Stp__Pong pong;
    stp__pong__init(&pong);
    char *big = malloc(LANE_MSG_MAX + 10);
    memset(big, 'x', LANE_MSG_MAX + 9);
    big[LANE_MSG_MAX + 9] = 0;
    pong.stage = big;
    Stp__LayerMsg m;
    stp__layer_msg__init(&m);
    m.version = STP_PROTO_VERSION;
    m.body_case = STP__LAYER_MSG__BODY_PONG;
    m.pong = &pong;
    assert_int_equal(lane_reply(b, r, &m.base), STP_EBUSY);
    assert_int_equal(atomic_load(&r->head), 0);
    free(big);
    /* a length the producer never wrote is taken as an empty message, and the ring goes on */
    Stp__Ping p;
    lane_expect(b, 2, true);
    assert_int_equal(lane_reply(b, r, &s_ping(&m, &p, 7)->base), 0);
    assert_int_equal(atomic_load(&b->bell), 1);
    assert_int_equal(atomic_load(&b->outstanding), 1);
    r->e[0].len = 0xffffffffu;
    uint8_t buf[LANE_MSG_MAX];
    size_t len = 99;
    assert_int_equal(lane_take(r, buf, &len), 1);
    assert_int_equal(len, 0);
    Stp__LayerMsg *e = stp__layer_msg__unpack(NULL, len, buf); /* the receiver refuses it */
    assert_true(!e || e->version != STP_PROTO_VERSION);
    if (e) stp__layer_msg__free_unpacked(e, NULL);
    assert_int_equal(lane_reply(b, r, &s_ping(&m, &p, 8)->base), 0);
    assert_int_equal(atomic_load(&b->bell), 2);
    assert_int_equal(atomic_load(&b->outstanding), 0);
    assert_int_equal(lane_take(r, buf, &len), 1);
    assert_int_equal(s_nonce(buf, len), 8);
    munmap(b, sizeof *b);
}

/* head and tail are uint32 counters: they wrap, and the ring does not notice */
static void test_lane_wraps(void **st) {
    (void)st;
    lane_block *b = s_block();
    lane_ring *r = &b->lanes[1].work;
    atomic_store(&r->head, UINT32_MAX - 1);
    atomic_store(&r->tail, UINT32_MAX - 1);
    Stp__LayerMsg m;
    Stp__Ping p;
    uint8_t buf[LANE_MSG_MAX];
    size_t len;
    uint32_t pos = 0;
    for (uint64_t i = 0; i < 3 * LANE_DEPTH; i++) {
        assert_int_equal(lane_put(r, &s_ping(&m, &p, i)->base, &pos), 0);
        assert_int_equal(lane_put(r, &s_ping(&m, &p, i + 1000)->base, NULL), 0);
        assert_int_equal(lane_take(r, buf, &len), 1);
        assert_int_equal(s_nonce(buf, len), i);
        assert_true(lane_taken(r, pos));
        assert_int_equal(lane_take(r, buf, &len), 1);
        assert_int_equal(s_nonce(buf, len), i + 1000);
    }
    assert_true(atomic_load(&r->head) < 100); /* wrapped */
    munmap(b, sizeof *b);
}

/* Two processes: the child sleeps on its work ring, answers every Ping with nonce + 1 into the
 * done ring (ringing the bell), and exits on nonce 0. The parent sleeps on the bell. */
static void test_lane_two_processes(void **st) {
    (void)st;
    lane_block *b = s_block();
    lane_pair *lp = &b->lanes[2];
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        uint8_t buf[LANE_MSG_MAX];
        size_t len;
        for (int spins = 0; spins < 10000;) {
            uint32_t seen = atomic_load(&lp->work.head);
            if (!lane_take(&lp->work, buf, &len)) {
                lane_wait(&lp->work.head, seen, 100);
                spins++;
                continue;
            }
            uint64_t n = s_nonce(buf, len);
            if (n == 0) _exit(0);
            Stp__LayerMsg m;
            Stp__Ping p;
            if (lane_reply(b, &lp->done, &s_ping(&m, &p, n + 1)->base)) _exit(3);
        }
        _exit(2);
    }
    Stp__LayerMsg m;
    Stp__Ping p;
    uint8_t buf[LANE_MSG_MAX];
    size_t len;
    for (uint64_t i = 1; i <= 2000; i++) {
        lane_expect(b, 1, true);
        assert_int_equal(lane_send(&lp->work, &s_ping(&m, &p, i * 10)->base, NULL), 0);
        int waits = 0;
        for (;;) {
            uint32_t bell = atomic_load(&b->bell);
            if (lane_take(&lp->done, buf, &len)) break;
            assert_true(++waits < 100); /* 100 x 100 ms: the child is stuck */
            lane_wait(&b->bell, bell, 100);
        }
        assert_int_equal(s_nonce(buf, len), i * 10 + 1);
    }
    assert_int_equal(lane_send(&lp->work, &s_ping(&m, &p, 0)->base, NULL), 0);
    int status = 0;
    assert_int_equal(waitpid(pid, &status, 0), pid);
    assert_true(WIFEXITED(status));
    assert_int_equal(WEXITSTATUS(status), 0);
    munmap(b, sizeof *b);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_lane_order_and_full),
        cmocka_unit_test(test_lane_oversized_and_corrupt),
        cmocka_unit_test(test_lane_wraps),
        cmocka_unit_test(test_lane_two_processes),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
