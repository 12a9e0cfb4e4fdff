/* threadpool: fork-join sections over a fixed team; see threadpool.h.
 *
 * Invariants:
 * 1. `gen` only increases; a worker runs a section exactly once per increment it observes.
 * 2. `pending` counts workers still inside the current section; the caller returns only when it
 *    reaches 0, so fn/ctx stay valid for the whole section.
 * 3. Sleeping happens only on futexes (the bell for workers, pending for the caller) after a
 *    bounded spin, so an idle pool burns no CPU. The bell is rung after every change a sleeping
 *    worker waits for (a section, the end of a park), and a worker reads it before looking at
 *    them, so no wake-up is lost.
 * 4. With a hand-off word (threadpool_set_handoff) a worker sleeps on it instead, and every ring
 *    rings both; a worker reads the word's address again after reading its value and sleeps only
 *    if it is unchanged, so a switch of words loses no wake-up either. Once
 *    threadpool_set_handoff returns, no worker holds the previous words (a section ran since). */
#include "util/threadpool.h"

#include <immintrin.h>
#include <linux/futex.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define SPIN_NS_DEFAULT 200000L /* how long a waiter spins before sleeping */

struct threadpool {
    int n;
    pthread_t *threads;
    _Atomic int gen;       /* section generation */
    _Atomic uint32_t bell; /* rung after gen or park_gen changes (futex word for workers) */
    _Atomic uint32_t *_Atomic mine;   /* hand-off: workers sleep here instead (shared memory) */
    _Atomic uint32_t *_Atomic theirs; /* hand-off: rung by a worker going to sleep for a park */
    _Atomic long handed_ns;           /* hand-off: how long a worker woken on mine spins */
    _Atomic int sleeping;             /* workers in (or about to enter) FUTEX_WAIT */
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

/* A futex operation on a 32-bit word; shared: a word other processes may wait on too (no
 * FUTEX_PRIVATE_FLAG). */
static long s_futex(void *addr, int op, uint32_t val, bool shared) {
    return syscall(SYS_futex, addr, op | (shared ? 0 : FUTEX_PRIVATE_FLAG), val, NULL, NULL, 0);
}

static long s_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000L + ts.tv_nsec;
}

/* Spins until *addr != old (true), or for up to spin_ns or until *park == old (false; park may be
 * NULL). */
static bool s_spin(_Atomic int *addr, int old, long spin_ns, _Atomic int *park) {
    long t0 = 0;
    for (int i = 0;; i++) {
        if (atomic_load_explicit(addr, memory_order_acquire) != old) return true;
        if (park && atomic_load_explicit(park, memory_order_relaxed) == old) return false;
        if ((i & 255) == 255) {
            long t = s_now_ns();
            if (!t0)
                t0 = t;
            else if (t - t0 > spin_ns)
                return false;
        }
        _mm_pause();
    }
}

/* The caller's wait for the workers: until *addr != old, spinning for up to spin_ns first, then
 * sleeping on *addr. */
static void s_wait_change(_Atomic int *addr, int old, long spin_ns) {
    if (s_spin(addr, old, spin_ns, NULL)) return;
    while (atomic_load_explicit(addr, memory_order_acquire) == old)
        s_futex(addr, FUTEX_WAIT, (uint32_t)old, false);
}

/* Bumps a futex word and wakes everyone sleeping on it (shared: a word another process may
 * sleep on, so not FUTEX_PRIVATE_FLAG). */
static void s_ring_word(_Atomic uint32_t *w, bool shared) {
    atomic_fetch_add_explicit(w, 1, memory_order_seq_cst);
    s_futex(w, FUTEX_WAKE, 1u << 30, shared);
}

/* A worker's wait for the section after `seen`: it spins for up to spin_ns (not at all while
 * parked after seen), then sleeps on the bell (or the hand-off word), which every section start
 * and every threadpool_wake ring after changing gen or park_gen, so neither is missed. Woken by
 * threadpool_wake (the bell rang, gen unchanged) it spins again for up to spin_ns. With a
 * hand-off word: a worker going to sleep for a park first rings the other stage's word (once
 * per wait), and one woken on its word while parked (the other stage handed the core back)
 * spins for up to handed_ns although the park holds. */
static void s_worker_wait(threadpool *tp, int seen) {
    bool handed = false, rang = false;
    for (;;) {
        const long spin =
            atomic_load_explicit(handed ? &tp->handed_ns : &tp->spin_ns, memory_order_relaxed);
        if (s_spin(&tp->gen, seen, spin, handed ? NULL : &tp->park_gen)) return;
        handed = false;
        _Atomic uint32_t *mine = atomic_load(&tp->mine);
        _Atomic uint32_t *w = mine ? mine : &tp->bell;
        const uint32_t rung = atomic_load(w);
        if (atomic_load(&tp->mine) != mine) continue; /* switched meanwhile (invariant 4) */
        if (atomic_load_explicit(&tp->gen, memory_order_acquire) != seen) return;
        /* counted asleep before looking at the park, which looks at the count after setting
         * it: a park this thread does not see, threadpool_park sees this thread asleep */
        atomic_fetch_add(&tp->sleeping, 1);
        const bool parked = atomic_load(&tp->park_gen) == seen;
        if (parked && mine && !rang) {
            _Atomic uint32_t *theirs = atomic_load(&tp->theirs);
            if (theirs) s_ring_word(theirs, true);
            rang = true;
        }
        s_futex(w, FUTEX_WAIT, rung, mine != NULL);
        atomic_fetch_sub(&tp->sleeping, 1);
        /* rung while parked (it may have slept since before the park): the other stage handed
         * the core back; this wait does not ring theirs again */
        handed = mine && atomic_load(w) != rung && atomic_load(&tp->park_gen) == seen;
        rang |= handed;
    }
}

/* Rings the workers' bell: after a new section or the end of a park. */
static void s_ring(threadpool *tp) {
    s_ring_word(&tp->bell, false);
    _Atomic uint32_t *mine = atomic_load(&tp->mine);
    if (mine) s_ring_word(mine, true);
}

static void *s_worker(void *p) {
    worker_arg *a = p;
    threadpool *tp = a->tp;
    int ith = a->ith;
    free(a);
    int seen = 0; /* gen is 0 at creation: a section started before this thread ran is not missed */
    for (;;) {
        s_worker_wait(tp, seen);
        seen = atomic_load_explicit(&tp->gen, memory_order_acquire);
        if (atomic_load(&tp->stop)) break;
        tp->fn(tp->ctx, ith, tp->n);
        if (atomic_fetch_sub_explicit(&tp->pending, 1, memory_order_acq_rel) == 1)
            s_futex(&tp->pending, FUTEX_WAKE, 1, false);
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
    if (!tp) return;
    atomic_store(&tp->park_gen, atomic_load_explicit(&tp->gen, memory_order_acquire));
    /* a worker that went to sleep before the park (its spin ran out) did not ring theirs */
    _Atomic uint32_t *theirs = atomic_load(&tp->theirs);
    if (theirs && atomic_load(&tp->sleeping) > 0) s_ring_word(theirs, true);
}

void threadpool_wake(threadpool *tp) {
    if (!tp || tp->n == 1) return;
    atomic_store_explicit(&tp->park_gen, -1, memory_order_relaxed);
    s_ring(tp);
}

static void s_noop(void *ctx, int ith, int nth) {
    (void)ctx, (void)ith, (void)nth;
}

void threadpool_set_handoff(threadpool *tp, _Atomic uint32_t *mine, _Atomic uint32_t *theirs,
                            long handed_ns) {
    if (!tp || tp->n == 1) return;
    atomic_store(&tp->handed_ns, handed_ns < 0 ? 0 : handed_ns);
    atomic_store(&tp->theirs, theirs);
    _Atomic uint32_t *old = atomic_exchange(&tp->mine, mine);
    if (old) s_ring_word(old, true);  /* its sleepers wake and look at the new word */
    threadpool_run(tp, s_noop, NULL); /* every worker has left the wait that held old */
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
        s_wait_change(&tp->pending, p, atomic_load_explicit(&tp->spin_ns, memory_order_relaxed));
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
