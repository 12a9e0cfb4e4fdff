/* test_threadpool: fork-join sections (every thread runs each section exactly once, the caller
 * returns only after all finished), argument checks, teardown races, idle pools using no CPU,
 * and threadpool_chunk's partition of [0, n). */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <dirent.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <linux/futex.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "th_proc.h"
#include "util/threadpool.h"

#define MAXT 8

typedef struct sect {
    _Atomic int calls[MAXT];
    int plain[MAXT]; /* written without atomics: the join must publish them */
    _Atomic int bad_nth;
    int expect_nth;
    int round;
} sect;

static void s_fn(void *p, int ith, int nth) {
    sect *s = p;
    if (nth != s->expect_nth || ith < 0 || ith >= nth) atomic_fetch_add(&s->bad_nth, 1);
    if (ith >= 0 && ith < MAXT) {
        atomic_fetch_add(&s->calls[ith], 1);
        s->plain[ith] = s->round;
    }
}

static void test_threadpool_new_checks_size(void **state) {
    (void)state;
    threadpool *tp = (threadpool *)1;
    stp_err err = {0};
    assert_int_equal(threadpool_new(&tp, 0, &err), STP_EINVAL);
    assert_null(tp);
    assert_int_equal(threadpool_new(&tp, 257, &err), STP_EINVAL);
    assert_non_null(strstr(err.msg, "257"));
    assert_int_equal(threadpool_size(NULL), 1);
}

static void test_threadpool_each_thread_once_per_section(void **state) {
    (void)state;
    const int sizes[] = {1, 2, 3, 5, MAXT};
    for (size_t k = 0; k < sizeof sizes / sizeof sizes[0]; k++) {
        int n = sizes[k];
        threadpool *tp = NULL;
        stp_err err = {0};
        if (threadpool_new(&tp, n, &err)) fail_msg("%s", err.msg);
        assert_int_equal(threadpool_size(tp), n);
        sect s;
        memset(&s, 0, sizeof s);
        s.expect_nth = n;
        const int rounds = n > 2 ? 100 : 1000; /* oversubscribed teams are slower */
        for (int r = 1; r <= rounds; r++) {
            s.round = r;
            threadpool_run(tp, s_fn, &s);
            for (int i = 0; i < n; i++) {
                if (atomic_load(&s.calls[i]) != r)
                    fail_msg("n=%d round %d: thread %d ran %d times", n, r, i,
                             atomic_load(&s.calls[i]));
                if (s.plain[i] != r)
                    fail_msg("n=%d round %d: thread %d's write not visible", n, r, i);
            }
        }
        for (int i = n; i < MAXT; i++)
            assert_int_equal(atomic_load(&s.calls[i]), 0);
        assert_int_equal(atomic_load(&s.bad_nth), 0);
        threadpool_destroy(&tp);
        assert_null(tp);
    }
}

static void test_threadpool_null_runs_inline(void **state) {
    (void)state;
    sect s;
    memset(&s, 0, sizeof s);
    s.expect_nth = 1;
    s.round = 7;
    threadpool_run(NULL, s_fn, &s);
    assert_int_equal(atomic_load(&s.calls[0]), 1);
    assert_int_equal(s.plain[0], 7);
    threadpool *none = NULL;
    threadpool_destroy(&none); /* NULL is fine */
}

static void test_threadpool_destroy_right_after_new(void **state) {
    (void)state;
    for (int i = 0; i < 50; i++) {
        threadpool *tp = NULL;
        stp_err err = {0};
        if (threadpool_new(&tp, 3, &err)) fail_msg("%s", err.msg);
        if (i % 2) {
            sect s;
            memset(&s, 0, sizeof s);
            s.expect_nth = 3;
            threadpool_run(tp, s_fn, &s);
            assert_int_equal(atomic_load(&s.calls[2]), 1);
        }
        threadpool_destroy(&tp);
    }
}

/* Sum of 0..n-1 over a section using threadpool_chunk: checks partition + join together. */
typedef struct sum_ctx {
    long n;
    long partial[MAXT];
} sum_ctx;

static void s_sum(void *p, int ith, int nth) {
    sum_ctx *c = p;
    long b, e, acc = 0;
    threadpool_chunk(c->n, ith, nth, 4, &b, &e);
    for (long i = b; i < e; i++)
        acc += i;
    c->partial[ith] = acc;
}

static void test_threadpool_chunked_sum(void **state) {
    (void)state;
    threadpool *tp = NULL;
    stp_err err = {0};
    if (threadpool_new(&tp, 2, &err)) fail_msg("%s", err.msg);
    for (long n = 0; n < 300; n += 7) {
        sum_ctx c = {.n = n};
        threadpool_run(tp, s_sum, &c);
        assert_int_equal(c.partial[0] + c.partial[1], n * (n - 1) / 2);
    }
    threadpool_destroy(&tp);
}

/* Every thread but this one is asleep (state S or D in /proc/self/task/<tid>/stat). */
static bool s_others_asleep(void *ctx) {
    (void)ctx;
    DIR *d = opendir("/proc/self/task");
    bool asleep = d != NULL;
    for (struct dirent *e; asleep && (e = readdir(d));) {
        if (e->d_name[0] == '.' || atoi(e->d_name) == (int)syscall(SYS_gettid)) continue;
        char p[300], st[512];
        snprintf(p, sizeof p, "/proc/self/task/%s/stat", e->d_name);
        FILE *f = fopen(p, "r");
        if (!f) continue; /* the thread ended */
        size_t n = fread(st, 1, sizeof st - 1, f);
        fclose(f);
        st[n] = 0;
        const char *c = strrchr(st, ')'); /* "tid (comm) S ..." */
        asleep = c && (c[2] == 'S' || c[2] == 'D');
    }
    if (d) closedir(d);
    return asleep;
}

/* CPU seconds this process uses in a 0.2 s window. */
static double s_cpu_window(void) {
    struct timespec c0, c1, d = {0, 200 * 1000 * 1000};
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &c0);
    nanosleep(&d, NULL); /* the measurement window, not a wait for anything */
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &c1);
    return (double)(c1.tv_sec - c0.tv_sec) + (double)(c1.tv_nsec - c0.tv_nsec) * 1e-9;
}

/* CPU seconds this process uses in 0.2 s, measured once the pool's threads sleep (past their
 * spin). */
static double s_idle_cpu(void) {
    if (!th_wait_until(s_others_asleep, NULL, 5)) fail_msg("the pool's threads never slept");
    return s_cpu_window();
}

static void test_threadpool_idle_uses_no_cpu(void **state) {
    (void)state;
    threadpool *tp = NULL;
    stp_err err = {0};
    if (threadpool_new(&tp, 2, &err)) fail_msg("%s", err.msg);
    sect s;
    memset(&s, 0, sizeof s);
    s.expect_nth = 2;
    threadpool_run(tp, s_fn, &s);
    double cpu = s_idle_cpu(); /* past the spin phase */
    if (cpu > 0.05) fail_msg("idle pool used %.3f s of CPU in 0.2 s", cpu);
    threadpool_run(tp, s_fn, &s); /* still wakes up */
    assert_int_equal(atomic_load(&s.calls[1]), 2);
    threadpool_destroy(&tp);
}

/* A two-thread pool told to spin for 10 s after a section, after one section, then parked. */
static threadpool *s_parked_pool(sect *s) {
    threadpool *tp = NULL;
    stp_err err = {0};
    if (threadpool_new(&tp, 2, &err)) fail_msg("%s", err.msg);
    threadpool_set_spin_ns(tp, 10L * 1000 * 1000 * 1000);
    memset(s, 0, sizeof *s);
    s->expect_nth = 2;
    threadpool_run(tp, s_fn, s);
    threadpool_park(tp);
    return tp;
}

/* A pool told to spin for 10 s after a section stops spinning when parked. */
static void test_threadpool_park_stops_the_spin(void **state) {
    (void)state;
    sect s;
    threadpool *tp = s_parked_pool(&s);
    double cpu = s_idle_cpu(); /* the worker notices within a few hundred pause loops */
    if (cpu > 0.05) fail_msg("parked pool used %.3f s of CPU in 0.2 s", cpu);
    threadpool_run(tp, s_fn, &s); /* still wakes up */
    assert_int_equal(atomic_load(&s.calls[1]), 2);
    threadpool_destroy(&tp);
}

static bool s_others_awake(void *ctx) {
    return !s_others_asleep(ctx);
}

/* A parked pool's sleeping thread, woken by threadpool_wake, spins again (for its spin time:
 * here 10 s, so it is seen running and using CPU), a second park puts it back to sleep, and
 * the next section still runs on both threads. */
static void test_threadpool_wake_ends_the_park(void **state) {
    (void)state;
    sect s;
    threadpool *tp = s_parked_pool(&s);
    if (!th_wait_until(s_others_asleep, NULL, 5)) fail_msg("the parked thread never slept");
    threadpool_wake(tp);
    if (!th_wait_until(s_others_awake, NULL, 5)) fail_msg("the woken thread never ran");
    double cpu = s_cpu_window();
    if (cpu < 0.05) fail_msg("the woken thread used only %.3f s of CPU in 0.2 s", cpu);
    threadpool_park(tp);
    if (s_idle_cpu() > 0.05) fail_msg("the pool parked again still spins");
    threadpool_run(tp, s_fn, &s);
    assert_int_equal(atomic_load(&s.calls[1]), 2);
    threadpool_destroy(&tp);
}

typedef struct word_watch {
    _Atomic uint32_t *w;
    uint32_t seen;
} word_watch;

static bool s_word_moved(void *ctx) {
    const word_watch *ww = ctx;
    return atomic_load(ww->w) != ww->seen;
}

/* Hand-off words (threadpool_set_handoff), in shared memory as between two stages: a park rings
 * the other stage's word (the worker going to sleep for it, or the park itself when the worker
 * slept already); one woken on its own word while
 * parked (the other stage handing the core back) spins for the hand-off time (10 s here, so it
 * is seen using CPU) and the next section still runs on both threads; a second park rings
 * again; with NULLs the words' memory can go away and the pool goes on. */
static void test_threadpool_handoff(void **state) {
    (void)state;
    _Atomic uint32_t *words =
        mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    assert_true(words != MAP_FAILED);
    _Atomic uint32_t *mine = &words[0], *theirs = &words[16];
    threadpool *tp = NULL;
    stp_err err = {0};
    if (threadpool_new(&tp, 2, &err)) fail_msg("%s", err.msg);
    threadpool_set_handoff(tp, mine, theirs, 10L * 1000 * 1000 * 1000);
    sect s;
    memset(&s, 0, sizeof s);
    s.expect_nth = 2;
    threadpool_run(tp, s_fn, &s);
    word_watch ww = {theirs, atomic_load(theirs)};
    threadpool_park(tp);
    if (!th_wait_until(s_word_moved, &ww, 5)) fail_msg("a park did not ring theirs");
    if (!th_wait_until(s_others_asleep, NULL, 5)) fail_msg("the parked worker never slept");
    if (s_cpu_window() > 0.05) fail_msg("the parked pool spins");

    /* the other stage hands the core back: the worker spins although the park holds */
    atomic_fetch_add(mine, 1);
    syscall(SYS_futex, (uint32_t *)mine, FUTEX_WAKE, 1 << 30, NULL, NULL, 0);
    if (!th_wait_until(s_others_awake, NULL, 5)) fail_msg("the handed worker never ran");
    double cpu = s_cpu_window();
    if (cpu < 0.05) fail_msg("the handed worker used only %.3f s of CPU in 0.2 s", cpu);
    threadpool_run(tp, s_fn, &s);
    assert_int_equal(atomic_load(&s.calls[1]), 2);

    ww.seen = atomic_load(theirs);
    threadpool_park(tp);
    if (!th_wait_until(s_word_moved, &ww, 5)) fail_msg("a second park did not ring theirs");
    if (!th_wait_until(s_others_asleep, NULL, 5)) fail_msg("the worker parked again never slept");

    threadpool_set_handoff(tp, NULL, NULL, 0);
    munmap((void *)words, 4096);
    for (int i = 0; i < 3; i++) { /* the words are gone: sections, parks and sleeps go on */
        threadpool_run(tp, s_fn, &s);
        threadpool_park(tp);
    }
    assert_int_equal(atomic_load(&s.calls[1]), 5);
    if (!th_wait_until(s_others_asleep, NULL, 5)) fail_msg("the worker never slept");
    threadpool_destroy(&tp);
}

static void test_threadpool_chunk_partition(void **state) {
    (void)state;
    const long aligns[] = {0, 1, 3, 4, 32};
    for (long n = 0; n <= 200; n++)
        for (int nth = 1; nth <= 7; nth++)
            for (size_t a = 0; a < sizeof aligns / sizeof aligns[0]; a++) {
                long al = aligns[a] < 1 ? 1 : aligns[a];
                long prev_end = 0, min_len = n + 1, max_len = -1;
                for (int ith = 0; ith < nth; ith++) {
                    long b = -1, e = -1;
                    threadpool_chunk(n, ith, nth, aligns[a], &b, &e);
                    if (b != prev_end || e < b || e > n)
                        fail_msg("n=%ld nth=%d align=%ld ith=%d: [%ld, %ld) after %ld", n, nth,
                                 aligns[a], ith, b, e, prev_end);
                    if (b < n && b % al) fail_msg("n=%ld align=%ld: begin %ld unaligned", n, al, b);
                    prev_end = e;
                    if (e - b < min_len) min_len = e - b;
                    if (e - b > max_len) max_len = e - b;
                }
                if (prev_end != n) fail_msg("n=%ld nth=%d: covers only [0, %ld)", n, nth, prev_end);
                /* balanced: chunks differ by at most one alignment unit (the last may be short) */
                if (max_len - min_len > 2 * al)
                    fail_msg("n=%ld nth=%d align=%ld: chunk sizes %ld..%ld", n, nth, al, min_len,
                             max_len);
            }
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_threadpool_new_checks_size),
        cmocka_unit_test(test_threadpool_each_thread_once_per_section),
        cmocka_unit_test(test_threadpool_null_runs_inline),
        cmocka_unit_test(test_threadpool_destroy_right_after_new),
        cmocka_unit_test(test_threadpool_chunked_sum),
        cmocka_unit_test(test_threadpool_idle_uses_no_cpu),
        cmocka_unit_test(test_threadpool_handoff),
        cmocka_unit_test(test_threadpool_park_stops_the_spin),
        cmocka_unit_test(test_threadpool_wake_ends_the_park),
        cmocka_unit_test(test_threadpool_chunk_partition),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
