/* io: io_uring + O_DIRECT reader with pread / buffered fallbacks; see io.h. */
#include "io/io.h"

#include <errno.h>
#include <fcntl.h>
#include <liburing.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

/* One request in flight: a copy of it, its progress (a short read is resubmitted for the rest)
 * and the caller's tag. */
typedef struct s_inflight {
    io_req q;
    size_t done;
    uint64_t tag;
    bool busy;
} s_inflight;

struct io_reader {
    int fd;
    bool direct;
    bool uring;
    struct io_uring ring;
    int depth;
    uint64_t bytes;
    char path[256];
    int efd; /* eventfd the ring signals on each completion (-1: none) */
    int n_busy;
    s_inflight *fl;     /* (depth) */
    int *pread_rc;      /* (depth) without io_uring: each request's result */
    stp_err *pread_err; /* (depth) */
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
    r->efd = -1;
    r->fl = calloc((size_t)r->depth, sizeof *r->fl);
    r->pread_rc = calloc((size_t)r->depth, sizeof *r->pread_rc);
    r->pread_err = calloc((size_t)r->depth, sizeof *r->pread_err);
    if (!r->fl || !r->pread_rc || !r->pread_err) {
        io_reader_close(&r);
        return stp_err_set(err, STP_ENOMEM, "io reader: out of memory");
    }
    /* each request may need two entries at once (a resubmitted short read) */
    if (want_uring && io_uring_queue_init((unsigned)r->depth * 2, &r->ring, 0) == 0) {
        r->uring = true;
        r->efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
        if (r->efd >= 0 && io_uring_register_eventfd(&r->ring, r->efd) < 0) {
            close(r->efd);
            r->efd = -1;
        }
    }
    *out = r;
    return 0;
}

void io_reader_close(io_reader **self_p) {
    io_reader *r = *self_p;
    if (!r) return;
    while (r->n_busy > 0) { /* the buffers are the caller's: nothing may land after close */
        io_done d[16];
        io_reap(r, d, 16, true);
    }
    if (r->uring) io_uring_queue_exit(&r->ring);
    if (r->efd >= 0) close(r->efd);
    if (r->fd >= 0) close(r->fd);
    free(r->fl);
    free(r->pread_rc);
    free(r->pread_err);
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

static void s_submit(io_reader *r, s_inflight *f) {
    struct io_uring_sqe *sqe = io_uring_get_sqe(&r->ring);
    io_uring_prep_read(sqe, r->fd, (uint8_t *)f->q.dst + f->done, (unsigned)(f->q.len - f->done),
                       f->q.off + f->done);
    io_uring_sqe_set_data(sqe, f);
}

static int s_check_aligned(const io_reader *r, const io_req *q, stp_err *err) {
    if (r->direct && ((q->off | q->len | (uintptr_t)q->dst) & (IO_ALIGN - 1)))
        return stp_err_set(err, STP_EINVAL,
                           "read %s: request (offset %llu, %zu bytes) not %u-aligned", r->path,
                           (unsigned long long)q->off, q->len, IO_ALIGN);
    return 0;
}

int io_start(io_reader *r, const io_req *q, uint64_t tag, stp_err *err) {
    int rc = s_check_aligned(r, q, err);
    if (rc) return rc;
    if (r->n_busy >= r->depth)
        return stp_err_set(err, STP_EBUSY, "io: %d reads in flight", r->depth);
    s_inflight *f = NULL;
    for (int i = 0; i < r->depth && !f; i++)
        if (!r->fl[i].busy) f = &r->fl[i];
    *f = (s_inflight){*q, 0, tag, true};
    r->n_busy++;
    if (!r->uring) { /* read now; the completion is handed out by the next io_reap */
        r->pread_rc[f - r->fl] = s_pread_one(r, q, &r->pread_err[f - r->fl]);
        f->done = q->len;
        return 0;
    }
    s_submit(r, f);
    int s = io_uring_submit(&r->ring);
    if (s < 0 && s != -EINTR && s != -EAGAIN && s != -EBUSY) {
        /* (the sqe stays queued and goes with the next submit; report, do not lose track) */
        return stp_err_set(err, STP_EIO, "io_uring_submit: %s", strerror(-s));
    }
    return 0;
}

int io_in_flight(const io_reader *r) {
    return r->n_busy;
}

int io_capacity(const io_reader *r) {
    return r->depth;
}

int io_fd(const io_reader *r) {
    return r->efd;
}

/* Finishes f: a completion for the caller. */
static void s_finish(io_reader *r, s_inflight *f, int rc, const char *msg, io_done *d) {
    d->tag = f->tag;
    d->rc = rc;
    snprintf(d->msg, sizeof d->msg, "%s", rc ? msg : "");
    if (!rc && !r->direct)
        posix_fadvise(r->fd, (off_t)f->q.off, (off_t)f->q.len, POSIX_FADV_DONTNEED);
    f->busy = false;
    r->n_busy--;
}

int io_reap(io_reader *r, io_done *out, int max, bool wait) {
    int n = 0;
    if (r->efd >= 0) { /* clear the doorbell before looking: a later completion rings again */
        uint64_t v;
        ssize_t rd = read(r->efd, &v, sizeof v);
        (void)rd;
    }
    if (!r->uring) {
        for (int i = 0; i < r->depth && n < max; i++)
            if (r->fl[i].busy)
                s_finish(r, &r->fl[i], r->pread_rc[i], r->pread_err[i].msg, &out[n++]);
        return n;
    }
    while (n < max && r->n_busy > 0) {
        struct io_uring_cqe *cqe;
        int w = (wait && n == 0) ? io_uring_wait_cqe(&r->ring, &cqe)
                                 : io_uring_peek_cqe(&r->ring, &cqe);
        if (w == -EINTR) continue;
        if (w == -EAGAIN) break; /* nothing completed (peek) */
        if (w < 0) {             /* the ring itself failed: every request is lost */
            for (int i = 0; i < r->depth && n < max; i++)
                if (r->fl[i].busy)
                    s_finish(r, &r->fl[i], STP_EIO, "io_uring_wait_cqe failed", &out[n++]);
            break;
        }
        s_inflight *f = io_uring_cqe_get_data(cqe);
        int res = cqe->res;
        io_uring_cqe_seen(&r->ring, cqe);
        if (res == -EINTR || res == -EAGAIN) {
            s_submit(r, f);
            io_uring_submit(&r->ring);
            continue;
        }
        if (res < 0 || (res == 0 && f->done < f->q.len)) {
            /* finish this one synchronously (handles EINVAL from O_DIRECT by reopening) */
            stp_err e = {0};
            int rc = 0;
            io_req rest = {f->q.off + f->done, f->q.len - f->done, (uint8_t *)f->q.dst + f->done};
            if (res < 0 && res != -EINVAL)
                rc = stp_err_set(&e, STP_EIO, "read %s: %s", r->path, strerror(-res));
            else
                rc = s_pread_one(r, &rest, &e);
            s_finish(r, f, rc, e.msg, &out[n++]);
            continue;
        }
        f->done += (size_t)res;
        r->bytes += (size_t)res;
        if (f->done < f->q.len) {
            s_submit(r, f);
            io_uring_submit(&r->ring);
        } else {
            s_finish(r, f, 0, NULL, &out[n++]);
        }
    }
    return n;
}

int io_read_all(io_reader *r, const io_req *reqs, int n, stp_err *err) {
    for (int i = 0; i < n; i++) {
        int rc = s_check_aligned(r, &reqs[i], err);
        if (rc) return rc;
    }
    int next = 0, rc = 0;
    io_done d[16];
    while ((next < n && !rc) || r->n_busy) {
        while (next < n && !rc && r->n_busy < r->depth)
            rc = io_start(r, &reqs[next], (uint64_t)next, err), next++;
        int got = io_reap(r, d, 16, true);
        for (int i = 0; i < got; i++)
            if (d[i].rc && !rc) rc = stp_err_set(err, d[i].rc, "%s", d[i].msg);
    }
    return rc;
}
