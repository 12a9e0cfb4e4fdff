/* threadpool: a fixed team of threads that run one parallel section at a time.
 *
 * threadpool_run(tp, fn, ctx) calls fn(ctx, ith, nth) on every thread of the team (the caller is
 * thread 0) and returns when all have finished. Workers wait for the next section by spinning
 * briefly (a section usually follows within microseconds during decoding) and then sleeping on a
 * futex, so an idle engine uses no CPU. Not reentrant: one section at a time per pool. */
#ifndef STP_THREADPOOL_H
#define STP_THREADPOOL_H

#include <stdatomic.h>
#include <stdint.h>

#include "util/stp_err.h"

typedef struct threadpool threadpool;
typedef void (*threadpool_fn)(void *ctx, int ith, int nth);

int threadpool_new(threadpool **out, int n_threads, stp_err *err);
void threadpool_destroy(threadpool **self_p);
int threadpool_size(const threadpool *tp);
/* How long an idle thread spins before sleeping (default 200 µs, good while one process owns
 * the cores; pipeline stages that hand the cores to each other use ~20 µs). */
void threadpool_set_spin_ns(threadpool *tp, long ns);
/* Idle threads stop spinning now and sleep until the next section: for a stage that hands the
 * cores to another process (the spin would take a core the other side needs). No-op on NULL. */
void threadpool_park(threadpool *tp);
/* Ends a park ahead of the next section: sleeping idle threads wake and spin again (for the
 * spin time), so the section that follows does not wait for them to be scheduled. For a stage
 * taking the cores back while its own thread still has serial work to do. No-op on NULL. */
void threadpool_wake(threadpool *tp);
void threadpool_run(threadpool *tp, threadpool_fn fn, void *ctx);
/* Two stages that take turns on the same cores (the attention worker and an expert worker, their
 * thread i pinned to one core): while this pool is parked its idle threads sleep on `mine`, a
 * word in shared memory, and a thread going to sleep for a park first rings `theirs`, the other
 * stage's word. So the thread that takes a core next is woken by the one leaving it, on that
 * core, and, woken so, spins for up to handed_ns although its own pool is still parked, until
 * its next section starts. Reason: a wake-up sent from another core to a core that has gone
 * idle costs ~25 us under a hypervisor whose idle vCPUs halt at once (~3 us where they poll),
 * twice per layer. mine NULL: off (the pool's own bell). Runs an empty section: call it between
 * sections, and with NULLs before the words' memory goes away (on return no thread holds
 * them). No-op on NULL or one thread. */
void threadpool_set_handoff(threadpool *tp, _Atomic uint32_t *mine, _Atomic uint32_t *theirs,
                            long handed_ns);

/* Splits [0, n) into nth nearly equal chunks (multiples of align when possible); thread ith's. */
void threadpool_chunk(long n, int ith, int nth, long align, long *begin, long *end);

#endif
