/* io: bulk reads of a weight file into memory the caller owns, with io_uring (liburing) and
 * O_DIRECT when the kernel and the file system allow it, and plain pread otherwise.
 *
 * Why: the storage daemon streams experts from disk while attention runs. O_DIRECT keeps the
 * page cache out of the picture (a cached read would fake a hit, and its pages would count in
 * nobody's budget); io_uring keeps several reads in flight on one thread. Containers may forbid
 * io_uring and tmpfs rejects O_DIRECT, so both have fallbacks: io_uring -> pread, O_DIRECT ->
 * buffered reads followed by POSIX_FADV_DONTNEED on the range read (the cache still does not
 * fake later hits).
 *
 * The environment variable STP_IO picks a path for tests and measurements: "pread" (no
 * io_uring), "buffered" (no O_DIRECT), "pread-buffered" (neither); unset or "auto" tries the
 * fastest first.
 *
 * Invariant: with O_DIRECT every request's offset, length and destination must be multiples of
 * IO_ALIGN; io_read_all checks this and refuses misaligned requests (STP_EINVAL). */
#ifndef STP_IO_H
#define STP_IO_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "util/stp_err.h"

#define IO_ALIGN 4096u

typedef struct io_reader io_reader;

typedef struct io_req {
    uint64_t off; /* file offset */
    size_t len;
    void *dst;
} io_req;

/* Opens path for reading; depth = reads in flight (io_uring queue size). */
int io_reader_open(io_reader **out, const char *path, int depth, stp_err *err);
void io_reader_close(io_reader **self_p);
/* Reads every request completely and returns when all are done (0) or one failed. */
int io_read_all(io_reader *r, const io_req *reqs, int n, stp_err *err);

/* Asynchronous reads, for a caller that keeps serving while reads are in flight (the storage
 * daemon). io_start submits one request (STP_EBUSY when io_capacity requests are in flight;
 * STP_EINVAL when misaligned under O_DIRECT); io_reap hands out requests that completed in
 * full (or failed: rc and msg), at most max, waiting for the first one when wait is set. Short
 * reads are resubmitted inside. Without io_uring io_start reads at once and the next io_reap
 * returns the completion. io_fd is an eventfd readable when a completion may be waiting (poll it
 * beside sockets; -1 without io_uring: reap after every io_start instead). */
typedef struct io_done {
    uint64_t tag; /* io_start's */
    int rc;       /* 0 or an STP_E* code */
    char msg[160];
} io_done;
int io_start(io_reader *r, const io_req *q, uint64_t tag, stp_err *err);
int io_reap(io_reader *r, io_done *out, int max, bool wait);
int io_in_flight(const io_reader *r);
int io_capacity(const io_reader *r);
int io_fd(const io_reader *r);
/* "uring+direct", "uring", "pread+direct" or "pread". */
const char *io_reader_mode(const io_reader *r);
bool io_reader_direct(const io_reader *r);
/* Bytes read so far. */
uint64_t io_reader_bytes(const io_reader *r);

#endif
