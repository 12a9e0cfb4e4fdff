/* threadpool: fork-join sections over a fixed team; see threadpool.h.
 *
 * Invariants:
 * 1. `gen` only increases; a worker runs a section exactly once per increment it observes.
 * 2. `pending` counts workers still inside the current section; the caller returns only when it
 *    reaches 0, so fn/ctx stay valid for the whole section.
 * 3. Sleeping happens only on futexes (the bell for workers, pending for the caller) after a
 *    bounded spin, so an idle pool burns no CPU. The bell is rung after every change a sleeping
 *    worker waits for (a section, the end of a park), and a worker reads it before looking at
 *    them, so no wake-up is lost. */
#include "util/threadpool.h"

#include <immintrin.h>
#include <linux/futex.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define SPIN_NS_DEFAULT 200000L /* how long a waiter spins before sleeping */

struct threadpool {
    int n;
    pthread_t *threads;
    _Atomic int gen;     /* section generation */
    _Atomic int bell;    /* rung after gen or park_gen changes (futex word for workers) */
    _Atomic int pending; /* workers not yet done with the current section (futex word) */
    _Atomic int stop;
    _Atomic long spin_ns;
    /* the generation threadpool_park was called after: a worker waiting for the section after
     * that one sleeps at once instead of spinning (-1: never parked) */
    _Atomic int park_gen;
    threadpool_fn fn;
    void *ctx;
};

typedef struct worker_arg {
    threadpool *tp;
    int ith;
} worker_arg;

static long s_futex(_Atomic int *addr, int op, int val) {
    return syscall(SYS_futex, (int *)addr, op | FUTEX_PRIVATE_FLAG, val, NULL, NULL, 0);
}

static long s_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000L + ts.tv_nsec;
}

/* Waits until *addr != old, spinning for up to spin_ns first (not at all while *park == old),
 * then sleeping: on *addr itself without a bell; with one, on the bell, which every section
 * start and every threadpool_wake ring after changing *addr or *park, so neither is missed.
 * Woken by threadpool_wake (the bell rang, *addr unchanged), it spins again for up to spin_ns. */
static void s_wait_change(_Atomic int *addr, int old, long spin_ns, _Atomic int *park,
                          _Atomic int *bell) {
    for (;;) {
        long t0 = 0;
        for (int i = 0;; i++) {
            if (atomic_load_explicit(addr, memory_order_acquire) != old) return;
            if (park && atomic_load_explicit(park, memory_order_relaxed) == old) break;
            if ((i & 255) == 255) {
                long t = s_now_ns();
                if (!t0)
                    t0 = t;
                else if (t - t0 > spin_ns)
                    break;
            }
            _mm_pause();
        }
        if (!bell) {
            while (atomic_load_explicit(addr, memory_order_acquire) == old)
                s_futex(addr, FUTEX_WAIT, old);
            return;
        }
        for (;;) {
            const int rung = atomic_load_explicit(bell, memory_order_acquire);
            if (atomic_load_explicit(addr, memory_order_acquire) != old) return;
            s_futex(bell, FUTEX_WAIT, rung);
            if (atomic_load_explicit(bell, memory_order_acquire) != rung) break;
        }
        if (atomic_load_explicit(addr, memory_order_acquire) != old) return;
    }
}

/* Rings the workers' bell: after a new section or the end of a park. */
static void s_ring(threadpool *tp) {
    atomic_fetch_add_explicit(&tp->bell, 1, memory_order_acq_rel);
    s_futex(&tp->bell, FUTEX_WAKE, 1 << 30);
}

static void *s_worker(void *p) {
    worker_arg *a = p;
    threadpool *tp = a->tp;
    int ith = a->ith;
    free(a);
    int seen = 0; /* gen is 0 at creation: a section started before this thread ran is not missed */
    for (;;) {
        s_wait_change(&tp->gen, seen, atomic_load_explicit(&tp->spin_ns, memory_order_relaxed),
                      &tp->park_gen, &tp->bell);
        seen = atomic_load_explicit(&tp->gen, memory_order_acquire);
        if (atomic_load(&tp->stop)) break;
        tp->fn(tp->ctx, ith, tp->n);
        if (atomic_fetch_sub_explicit(&tp->pending, 1, memory_order_acq_rel) == 1)
            s_futex(&tp->pending, FUTEX_WAKE, 1);
    }
    return NULL;
}

int threadpool_new(threadpool **out, int n_threads, stp_err *err) {
    *out = NULL;
    if (n_threads < 1 || n_threads > 256)
        return stp_err_set(err, STP_EINVAL, "threads must be 1..256, got %d", n_threads);
    threadpool *tp = calloc(1, sizeof *tp);
    if (!tp) return stp_err_set(err, STP_ENOMEM, "threadpool: out of memory");
    tp->n = 1;
    atomic_store(&tp->spin_ns, SPIN_NS_DEFAULT);
    atomic_store(&tp->park_gen, -1);
    tp->threads = calloc((size_t)n_threads, sizeof *tp->threads);
    if (!tp->threads) goto fail;
    for (int i = 1; i < n_threads; i++) {
        worker_arg *a = malloc(sizeof *a);
        if (!a) goto fail;
        a->tp = tp;
        a->ith = i;
        if (pthread_create(&tp->threads[i], NULL, s_worker, a)) {
            free(a);
            goto fail;
        }
        tp->n = i + 1;
    }
    *out = tp;
    return 0;
fail:
    threadpool_destroy(&tp);
    return stp_err_set(err, STP_ENOMEM, "threadpool: cannot start %d threads", n_threads);
}

void threadpool_destroy(threadpool **self_p) {
    threadpool *tp = *self_p;
    if (!tp) return;
    atomic_store(&tp->stop, 1);
    atomic_fetch_add(&tp->gen, 1);
    s_ring(tp);
    for (int i = 1; i < tp->n; i++)
        pthread_join(tp->threads[i], NULL);
    free(tp->threads);
    free(tp);
    *self_p = NULL;
}

void threadpool_set_spin_ns(threadpool *tp, long ns) {
    if (tp) atomic_store(&tp->spin_ns, ns < 0 ? 0 : ns);
}

void threadpool_park(threadpool *tp) {
    if (tp)
        atomic_store_explicit(&tp->park_gen, atomic_load_explicit(&tp->gen, memory_order_acquire),
                              memory_order_relaxed);
}

void threadpool_wake(threadpool *tp) {
    if (!tp || tp->n == 1) return;
    atomic_store_explicit(&tp->park_gen, -1, memory_order_relaxed);
    s_ring(tp);
}

int threadpool_size(const threadpool *tp) {
    return tp ? tp->n : 1;
}

void threadpool_run(threadpool *tp, threadpool_fn fn, void *ctx) {
    if (!tp || tp->n == 1) {
        fn(ctx, 0, 1);
        return;
    }
    tp->fn = fn;
    tp->ctx = ctx;
    atomic_store_explicit(&tp->pending, tp->n - 1, memory_order_release);
    atomic_fetch_add_explicit(&tp->gen, 1, memory_order_acq_rel);
    s_ring(tp);
    fn(ctx, 0, tp->n);
    for (;;) {
        int p = atomic_load_explicit(&tp->pending, memory_order_acquire);
        if (p == 0) break;
        s_wait_change(&tp->pending, p, atomic_load_explicit(&tp->spin_ns, memory_order_relaxed),
                      NULL, NULL);
    }
}

void threadpool_chunk(long n, int ith, int nth, long align, long *begin, long *end) {
    if (align < 1) align = 1;
    long units = (n + align - 1) / align;
    long per = units / nth, extra = units % nth;
    long ub = ith * per + (ith < extra ? ith : extra);
    long ue = ub + per + (ith < extra ? 1 : 0);
    long b = ub * align, e = ue * align;
    *begin = b < n ? b : n;
    *end = e < n ? e : n;
}
