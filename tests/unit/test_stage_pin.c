/* test_stage_pin: --pin-threads parsed into the stage options, and stage_pin_threads putting
 * thread i of a team on core first + i of the process's cores (counting round), each on exactly
 * one; without the flag nothing changes; a ZeroMQ context started afterwards keeps the
 * process's cores for its threads (stage_zmq_affinity). */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <dirent.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <zmq.h>

#include "msg/stage.h"
#include "util/threadpool.h"

#define NT 3

typedef struct seen {
    int n_cpus[NT]; /* cores in each thread's mask */
    int cpu[NT];    /* its first (the only one when pinned) */
} seen;

static void s_look(void *p, int ith, int nth) {
    (void)nth;
    seen *s = p;
    cpu_set_t set;
    CPU_ZERO(&set);
    if (sched_getaffinity(0, sizeof set, &set)) return;
    s->n_cpus[ith] = CPU_COUNT(&set);
    s->cpu[ith] = -1;
    for (int c = 0; c < CPU_SETSIZE && s->cpu[ith] < 0; c++)
        if (CPU_ISSET(c, &set)) s->cpu[ith] = c;
}

static void test_stage_pin_threads_parse(void **st) {
    (void)st;
    stage_opts o;
    stp_err err = {0};
    char *a1[] = {"x", "--run-dir", "/tmp", "--model", "m.gguf", NULL};
    assert_int_equal(stage_parse(&o, 5, a1, "test", &err), 0);
    assert_false(o.pin_threads);
    char *a2[] = {"x", "--run-dir", "/tmp", "--model", "m.gguf", "--pin-threads", NULL};
    assert_int_equal(stage_parse(&o, 6, a2, "test", &err), 0);
    assert_true(o.pin_threads);
}

static void test_stage_pin_threads_places(void **st) {
    (void)st;
    cpu_set_t all;
    assert_int_equal(sched_getaffinity(0, sizeof all, &all), 0);
    int cpus[CPU_SETSIZE], n = 0;
    for (int c = 0; c < CPU_SETSIZE; c++)
        if (CPU_ISSET(c, &all)) cpus[n++] = c;
    assert_true(n >= 1);

    threadpool *tp = NULL;
    stp_err err = {0};
    assert_int_equal(threadpool_new(&tp, NT, &err), 0);
    stage_opts o;
    memset(&o, 0, sizeof o);
    seen s;
    memset(&s, 0, sizeof s);
    /* not asked for: every thread keeps the process's cores */
    assert_int_equal(stage_pin_threads(&o, tp, 0, &err), 0);
    threadpool_run(tp, s_look, &s);
    for (int i = 0; i < NT; i++)
        assert_int_equal(s.n_cpus[i], n);

    o.pin_threads = true;
    for (int first = 0; first < 3; first++) {
        assert_int_equal(stage_pin_threads(&o, tp, first, &err), 0);
        memset(&s, 0, sizeof s);
        threadpool_run(tp, s_look, &s);
        for (int i = 0; i < NT; i++) {
            assert_int_equal(s.n_cpus[i], 1);
            assert_int_equal(s.cpu[i], cpus[(first + i) % n]);
        }
        /* the next round chooses from the process's cores again, not the last pin's one */
        threadpool_destroy(&tp);
        assert_int_equal(sched_setaffinity(0, sizeof all, &all), 0);
        assert_int_equal(threadpool_new(&tp, NT, &err), 0);
    }
    assert_int_equal(stage_pin_threads(&o, NULL, 0, &err), 0); /* no team: nothing to do */
    threadpool_destroy(&tp);
    assert_int_equal(sched_setaffinity(0, sizeof all, &all), 0);
}

/* Cores in the mask of this process's threads whose name starts with prefix (-1: none). */
static int s_thread_cpus(const char *prefix) {
    DIR *d = opendir("/proc/self/task");
    if (!d) return -1;
    int found = -1;
    struct dirent *e;
    while ((e = readdir(d)) && found < 0) {
        if (e->d_name[0] == '.') continue;
        char path[300], comm[64] = "";
        snprintf(path, sizeof path, "/proc/self/task/%s/comm", e->d_name);
        FILE *f = fopen(path, "r");
        if (!f) continue;
        if (!fgets(comm, sizeof comm, f)) comm[0] = 0;
        fclose(f);
        if (strncmp(comm, prefix, strlen(prefix))) continue;
        cpu_set_t set;
        if (sched_getaffinity((pid_t)atoi(e->d_name), sizeof set, &set) == 0)
            found = CPU_COUNT(&set);
    }
    closedir(d);
    return found;
}

/* After the caller is pinned to one core, ZeroMQ's threads and the heartbeat keep the stage's. */
static void test_stage_pin_threads_helpers(void **st) {
    (void)st;
    cpu_set_t all;
    assert_int_equal(sched_getaffinity(0, sizeof all, &all), 0);
    const int n = CPU_COUNT(&all);
    threadpool *tp = NULL;
    stp_err err = {0};
    assert_int_equal(threadpool_new(&tp, 1, &err), 0);
    stage_opts o;
    memset(&o, 0, sizeof o);
    o.pin_threads = true;
    assert_int_equal(stage_pin_threads(&o, tp, 0, &err), 0);
    cpu_set_t now;
    assert_int_equal(sched_getaffinity(0, sizeof now, &now), 0);
    assert_int_equal(CPU_COUNT(&now), 1);
    void *zctx = zmq_ctx_new();
    assert_non_null(zctx);
    assert_int_equal(stage_zmq_affinity(zctx), 0);
    void *sock = zmq_socket(zctx, ZMQ_PAIR); /* starts the context's threads */
    assert_non_null(sock);
    /* the thread sets its affinity, then its name, after zmq_socket returned: wait for the name
     * (bounded) */
    int got = -1;
    for (int i = 0; i < 5000 && (got = s_thread_cpus("ZMQbg/IO")) < 0; i++)
        nanosleep(&(struct timespec){0, 1000000}, NULL);
    assert_int_equal(got, n);
    zmq_close(sock);
    zmq_ctx_term(zctx);
    threadpool_destroy(&tp);
    assert_int_equal(sched_setaffinity(0, sizeof all, &all), 0);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_stage_pin_threads_parse),
        cmocka_unit_test(test_stage_pin_threads_places),
        cmocka_unit_test(test_stage_pin_threads_helpers),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
