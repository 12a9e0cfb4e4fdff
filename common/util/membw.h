/* membw: a short read-bandwidth test, the yardstick of `stpipe bench`'s roofline.
 *
 * Sums a buffer well above the last-level cache (membw_default_bytes: 4x the LLC, within
 * 256 MiB..1 GiB) with wide loads, on 1 thread and on every thread of a team, and keeps the best of
 * a few passes each (the least disturbed by other processes). It measures what a decode step needs,
 * streaming reads; it leaves out writes, latency and NUMA placement. See util/README.md. */
#ifndef STP_MEMBW_H
#define STP_MEMBW_H

#include <stddef.h>

#include "util/stp_err.h"
#include "util/threadpool.h"

typedef struct membw_result {
    double gbps_1;  /* best single-thread read bandwidth, 1e9 bytes per second */
    double gbps_n;  /* best with every thread of the team */
    int n_threads;  /* team size of gbps_n */
    size_t bytes;   /* buffer size */
    double seconds; /* wall time of the whole test, set-up included */
} membw_result;

/* Bytes of the test buffer: 4 x the last-level cache (sysfs, else sysconf), within 256 MiB..1 GiB.
 */
size_t membw_default_bytes(void);
/* Runs the test over a buffer of `bytes` (0: membw_default_bytes) with `reps` passes per thread
 * count (0: 3). tp may be NULL (then gbps_n = gbps_1). STP_ENOMEM when the buffer cannot be
 * allocated. */
int membw_measure(threadpool *tp, size_t bytes, int reps, membw_result *out, stp_err *err);

#endif
