/* test_pipe_client: the pipeline client's liveness rule against a coordinator that stops
 * answering (a ROUTER socket in this test that reads and never replies). Why: `stpipe serve
 * --pipeline` fails its requests when the coordinator is silent for STAGE_LIVENESS heartbeats;
 * a coordinator that was only slow would otherwise go on generating those answers for nobody,
 * so the client also cancels each one there before failing it. Checked: the request fails
 * through on_error with STP_ETIMEDOUT, exactly once, and the coordinator's socket then holds a
 * CancelRequest naming it. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <zmq.h>

#include "client.pb-c.h"
#include "msg/msg.h"
#include "pipe_client.h"

typedef struct seen {
    int errors, done;
    int code;
    uint64_t rid;
} seen;

static void s_on_error(void *ud, uint64_t rid, int code, const char *what) {
    (void)what;
    seen *s = ud;
    s->errors++;
    s->code = code;
    s->rid = rid;
}

static void s_on_done(void *ud, uint64_t rid, const pipe_client_done *d) {
    (void)rid;
    (void)d;
    ((seen *)ud)->done++;
}

/* Reads one message from the fake coordinator (deadline 5 s): the client's ClientMsg. */
static Stp__ClientMsg *s_read(void *router) {
    zmq_pollitem_t it = {.socket = router, .events = ZMQ_POLLIN};
    if (zmq_poll(&it, 1, 5000) != 1) return NULL;
    zmq_msg_t id, body;
    zmq_msg_init(&id);
    zmq_msg_init(&body);
    assert_true(zmq_msg_recv(&id, router, 0) >= 0);
    assert_true(zmq_msg_more(&id));
    assert_true(zmq_msg_recv(&body, router, 0) >= 0);
    Stp__ClientMsg *m = stp__client_msg__unpack(NULL, zmq_msg_size(&body), zmq_msg_data(&body));
    zmq_msg_close(&id);
    zmq_msg_close(&body);
    return m;
}

static void test_pipe_client_silent_coordinator_cancels(void **st) {
    (void)st;
    setenv("STP_HEARTBEAT_MS", "50", 1);
    void *zctx = zmq_ctx_new();
    void *router = zmq_socket(zctx, ZMQ_ROUTER);
    assert_non_null(router);
    int linger = 0;
    zmq_setsockopt(router, ZMQ_LINGER, &linger, sizeof linger);
    assert_int_equal(zmq_bind(router, "tcp://127.0.0.1:*"), 0);
    char ep[256];
    size_t len = sizeof ep;
    assert_int_equal(zmq_getsockopt(router, ZMQ_LAST_ENDPOINT, ep, &len), 0);

    seen sn = {0};
    const pipe_client_cb cb = {.on_error = s_on_error, .on_done = s_on_done, .ud = &sn};
    pipe_client *c = NULL;
    stp_err err = {0};
    assert_int_equal(pipe_client_new(&c, ep, &cb, &err), 0);
    assert_int_equal(pipe_client_heartbeat_ms(c), 50);
    const int32_t ids[3] = {1, 2, 3};
    pipe_client_req rq = {.prompt_ids = ids, .n_prompt = 3, .n_predict = 100};
    uint64_t rid = 0;
    assert_int_equal(pipe_client_submit(c, &rq, &rid, &err), 0);
    Stp__ClientMsg *m = s_read(router);
    assert_non_null(m);
    assert_int_equal(m->body_case, STP__CLIENT_MSG__BODY_REQUEST);
    assert_true(m->request->request_id == rid);
    stp__client_msg__free_unpacked(m, NULL);

    /* silence: the client pings, then gives up after STAGE_LIVENESS intervals (deadline 5 s) */
    int rc = 0;
    double t0 = msg_now_us();
    while (!rc && (msg_now_us() - t0) < 5e6)
        rc = pipe_client_poll(c, 20, &err);
    assert_int_equal(rc, STP_ETIMEDOUT);
    assert_int_equal(sn.errors, 1);
    assert_int_equal(sn.code, STP_ETIMEDOUT);
    assert_true(sn.rid == rid);
    assert_int_equal(sn.done, 0);
    assert_int_equal(pipe_client_n_active(c), 0);

    /* what reached the coordinator after the request: pings, then the cancel of rid */
    bool cancelled = false;
    for (int i = 0; i < 64 && !cancelled; i++) {
        m = s_read(router);
        assert_non_null(m); /* the cancel must come before the socket runs dry */
        if (m->body_case == STP__CLIENT_MSG__BODY_CANCEL)
            cancelled = m->cancel->request_id == rid;
        else
            assert_int_equal(m->body_case, STP__CLIENT_MSG__BODY_PING);
        stp__client_msg__free_unpacked(m, NULL);
    }
    assert_true(cancelled);

    /* failed once: later polls report nothing more */
    assert_int_equal(pipe_client_poll(c, 0, &err), 0);
    assert_int_equal(sn.errors, 1);
    pipe_client_destroy(&c);
    zmq_close(router);
    zmq_ctx_term(zctx);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_pipe_client_silent_coordinator_cancels),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
