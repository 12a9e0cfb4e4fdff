/* io: io_uring + O_DIRECT reader with pread / buffered fallbacks; see io.h. */
#include "io/io.h"

#include <errno.h>
#include <fcntl.h>
#include <liburing.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

struct io_reader {
    int fd;
    bool direct;
    bool uring;
    struct io_uring ring;
    int depth;
    uint64_t bytes;
    char path[256];
};

static int s_open_fd(io_reader *r, const char *path, bool want_direct, stp_err *err) {
    if (want_direct) {
        r->fd = open(path, O_RDONLY | O_CLOEXEC | O_DIRECT);
        if (r->fd >= 0) {
            r->direct = true;
            return 0;
        }
    }
    r->fd = open(path, O_RDONLY | O_CLOEXEC);
    if (r->fd < 0) return stp_err_set(err, STP_EIO, "open %s: %s", path, strerror(errno));
    r->direct = false;
    return 0;
}

int io_reader_open(io_reader **out, const char *path, int depth, stp_err *err) {
    *out = NULL;
    io_reader *r = calloc(1, sizeof *r);
    if (!r) return stp_err_set(err, STP_ENOMEM, "io reader: out of memory");
    const char *mode = getenv("STP_IO");
    if (!mode || !*mode) mode = "auto";
    bool want_uring = strcmp(mode, "pread") && strcmp(mode, "pread-buffered");
    bool want_direct = strcmp(mode, "buffered") && strcmp(mode, "pread-buffered");
    snprintf(r->path, sizeof r->path, "%s", path);
    r->depth = depth < 1 ? 1 : depth > 256 ? 256 : depth;
    int rc = s_open_fd(r, path, want_direct, err);
    if (rc) {
        free(r);
        return rc;
    }
    if (want_uring && io_uring_queue_init((unsigned)r->depth, &r->ring, 0) == 0) r->uring = true;
    *out = r;
    return 0;
}

void io_reader_close(io_reader **self_p) {
    io_reader *r = *self_p;
    if (!r) return;
    if (r->uring) io_uring_queue_exit(&r->ring);
    if (r->fd >= 0) close(r->fd);
    free(r);
    *self_p = NULL;
}

const char *io_reader_mode(const io_reader *r) {
    return r->uring ? (r->direct ? "uring+direct" : "uring")
                    : (r->direct ? "pread+direct" : "pread");
}

bool io_reader_direct(const io_reader *r) {
    return r->direct;
}

uint64_t io_reader_bytes(const io_reader *r) {
    return r->bytes;
}

/* The file rejected O_DIRECT at read time (some file systems accept the open flag only):
 * reopen buffered and continue. */
static int s_drop_direct(io_reader *r, stp_err *err) {
    close(r->fd);
    r->fd = -1;
    return s_open_fd(r, r->path, false, err);
}

static int s_pread_one(io_reader *r, const io_req *q, stp_err *err) {
    size_t done = 0;
    while (done < q->len) {
        ssize_t n = pread(r->fd, (uint8_t *)q->dst + done, q->len - done, (off_t)(q->off + done));
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && errno == EINVAL && r->direct) {
            int rc = s_drop_direct(r, err);
            if (rc) return rc;
            continue;
        }
        if (n < 0) return stp_err_set(err, STP_EIO, "read %s: %s", r->path, strerror(errno));
        if (n == 0)
            return stp_err_set(err, STP_EIO, "read %s: end of file at %llu", r->path,
                               (unsigned long long)(q->off + done));
        done += (size_t)n;
    }
    if (!r->direct) posix_fadvise(r->fd, (off_t)q->off, (off_t)q->len, POSIX_FADV_DONTNEED);
    r->bytes += q->len;
    return 0;
}

/* One request in flight: its progress (a short read is resubmitted for the rest). */
typedef struct s_inflight {
    const io_req *q;
    size_t done;
} s_inflight;

static void s_submit(io_reader *r, s_inflight *f) {
    struct io_uring_sqe *sqe = io_uring_get_sqe(&r->ring);
    io_uring_prep_read(sqe, r->fd, (uint8_t *)f->q->dst + f->done, (unsigned)(f->q->len - f->done),
                       f->q->off + f->done);
    io_uring_sqe_set_data(sqe, f);
}

static int s_uring_all(io_reader *r, const io_req *reqs, int n, stp_err *err) {
    s_inflight fl[256];
    memset(fl, 0, sizeof fl);
    int next = 0, inflight = 0, rc = 0;
    while (next < n || inflight) {
        while (next < n && inflight < r->depth) {
            s_inflight *f = NULL;
            for (int i = 0; i < r->depth; i++)
                if (!fl[i].q) {
                    f = &fl[i];
                    break;
                }
            f->q = &reqs[next++];
            f->done = 0;
            s_submit(r, f);
            inflight++;
        }
        int s = io_uring_submit(&r->ring);
        if (s < 0 && s != -EINTR) {
            rc = stp_err_set(err, STP_EIO, "io_uring_submit: %s", strerror(-s));
            break;
        }
        struct io_uring_cqe *cqe;
        int w = io_uring_wait_cqe(&r->ring, &cqe);
        if (w == -EINTR) continue;
        if (w < 0) {
            rc = stp_err_set(err, STP_EIO, "io_uring_wait_cqe: %s", strerror(-w));
            break;
        }
        s_inflight *f = io_uring_cqe_get_data(cqe);
        int res = cqe->res;
        io_uring_cqe_seen(&r->ring, cqe);
        if (res == -EINTR || res == -EAGAIN) {
            s_submit(r, f);
            continue;
        }
        if (res < 0 || (res == 0 && f->done < f->q->len)) {
            /* finish this one synchronously (handles EINVAL from O_DIRECT by reopening) */
            if (!rc) {
                io_req rest = {f->q->off + f->done, f->q->len - f->done,
                               (uint8_t *)f->q->dst + f->done};
                if (res < 0 && res != -EINVAL)
                    rc = stp_err_set(err, STP_EIO, "read %s: %s", r->path, strerror(-res));
                else
                    rc = s_pread_one(r, &rest, err);
            }
            f->q = NULL;
            inflight--;
            continue;
        }
        f->done += (size_t)res;
        r->bytes += (size_t)res;
        if (f->done < f->q->len) {
            s_submit(r, f);
        } else {
            if (!r->direct)
                posix_fadvise(r->fd, (off_t)f->q->off, (off_t)f->q->len, POSIX_FADV_DONTNEED);
            f->q = NULL;
            inflight--;
        }
        if (rc) break;
    }
    /* drain what is still in flight before returning an error (the buffers are the caller's) */
    while (inflight > 0) {
        struct io_uring_cqe *cqe;
        io_uring_submit(&r->ring);
        if (io_uring_wait_cqe(&r->ring, &cqe) < 0) break;
        io_uring_cqe_seen(&r->ring, cqe);
        inflight--;
    }
    return rc;
}

int io_read_all(io_reader *r, const io_req *reqs, int n, stp_err *err) {
    for (int i = 0; i < n; i++) {
        const io_req *q = &reqs[i];
        if (r->direct && ((q->off | q->len | (uintptr_t)q->dst) & (IO_ALIGN - 1)))
            return stp_err_set(err, STP_EINVAL,
                               "read %s: request %d (offset %llu, %zu bytes) not %u-aligned",
                               r->path, i, (unsigned long long)q->off, q->len, IO_ALIGN);
    }
    if (r->uring) return s_uring_all(r, reqs, n, err);
    for (int i = 0; i < n; i++) {
        int rc = s_pread_one(r, &reqs[i], err);
        if (rc) return rc;
    }
    return 0;
}
