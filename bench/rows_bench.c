/* rows_bench: what reading a scattered subset of a matrix's rows costs on this host, against
 * reading all of it. The experts' `up` rows and down_t neurons of a ReGLU token are such a
 * subset (the active neurons, about half of them with random weights, in no order), so this is
 * the floor under the roofline's experts stage: the roofline counts the bytes of the active rows,
 * while the memory system may move more (the hardware prefetchers run past a row's end into the
 * idle rows beside it).
 *
 * MiB of memory holds matrices of F Q4_0 rows by C columns (an expert's `up` at the 4b's shape by
 * default), cold (larger than the caches), on 2 MiB pages where the kernel grants them; a packed
 * q4_0x16 copy of the same size sits beside it (twice MiB in all).
 * For each share of rows (1/8 to all of them, a random subset drawn with a fixed seed, the same in
 * every matrix, rows in ascending order, as the kernels walk them), T threads, each over its share
 * of the matrices, time:
 *   all, read    every 64-byte line of every matrix, one load a line (the bare read: the memory's
 *                pace);
 *   subset, read the lines of the subset's rows only, the same way;
 *   subset, rows the Q4_0 row kernel (kern_ops' matvec_rows) over the subset.
 * First, the same way, every row through the packed q4_0x16 matvec (kern_ops' matvec_q4_0x16,
 * the streamed products: attention, gates, LM head) against the bare read of the same bytes:
 * how close the streamed stages can come to the memory's pace.
 * Rounds alternate the three, so a drift of the shared host moves all of them; each figure is
 * the median over rounds (wall time). The "of all" columns are the subset's time over the bare
 * read of everything in the same round: 0.5 at half the rows would mean rows cost what their
 * bytes do. A pass's time runs from the first thread's start to the last one's end. Before
 * timing, the packed matvec's outputs are checked against the row kernel's over every row of the
 * last matrix (the same bits, kern.h): a mismatch exits 1. Prints the CPU and the run's steal.
 * Not a test.
 *
 * Usage: rows_bench [-F rows, 768] [-C cols, 1536] [-m MiB, 1024] [-t threads, 2] [-r rounds, 9] */
#include <errno.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#include "kern/kern.h"
#include "util/sysinfo.h"

#define MAX_THREADS 16
#define Y_STRIDE 65536 /* outputs per thread (the -F bound) */

typedef struct rb_run {
    const kern_ops *ops;
    const uint8_t *w;
    size_t mat_bytes, row_bytes;
    int cols;
    int64_t m0, m1; /* this thread's matrices */
    const int32_t *rows;
    int n_rows; /* 0: every row, bare */
    int kernel; /* 1: matvec_rows over rows; 2: matvec_q4_0x16 (w is the packed copy) */
    const void *xq;
    float *y;
    pthread_barrier_t *bar;
    double t0, t1; /* this thread's start and end */
    uint32_t sink;
} rb_run;

static double s_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* One aligned 8-byte load in every 64-byte line [p, p + n) touches, XOR-ed: each line comes into
 * the cache (a load a line; the loads are not the limit). */
static uint64_t s_read(uint64_t acc, const uint8_t *p, size_t n) {
    const uintptr_t end = (uintptr_t)p + n;
    for (uintptr_t a = (uintptr_t)p & ~(uintptr_t)63; a < end; a += 64)
        acc ^= *(const uint64_t *)a;
    return acc;
}

static void *s_thread(void *arg) {
    rb_run *r = arg;
    pthread_barrier_wait(r->bar);
    r->t0 = s_now();
    uint64_t acc = 0;
    for (int64_t m = r->m0; m < r->m1; m++) {
        const uint8_t *w = r->w + (size_t)m * r->mat_bytes;
        if (r->kernel == 2)
            r->ops->matvec_q4_0x16(r->cols, w, r->xq, r->y, 0, r->n_rows / 16);
        else if (r->kernel)
            r->ops->matvec_rows(STP_TYPE_Q4_0, r->cols, w, r->row_bytes, r->xq, r->rows, r->n_rows,
                                r->y);
        else if (!r->n_rows)
            acc = s_read(acc, w, r->mat_bytes);
        else
            for (int k = 0; k < r->n_rows; k++)
                acc = s_read(acc, w + (size_t)r->rows[k] * r->row_bytes, r->row_bytes);
    }
    r->sink = (uint32_t)(acc ^ acc >> 32);
    r->t1 = s_now();
    pthread_barrier_wait(r->bar);
    return NULL;
}

/* A pass over matrices of mat_bytes each from w (a bare read of every line unless set further). */
static rb_run s_run_over(const kern_ops *ops, const uint8_t *w, size_t mat_bytes, size_t row_bytes,
                         int cols, const void *xq, float *y) {
    return (rb_run){.ops = ops,
                    .w = w,
                    .mat_bytes = mat_bytes,
                    .row_bytes = row_bytes,
                    .cols = cols,
                    .xq = xq,
                    .y = y};
}

/* One timed pass of nth threads over all matrices: seconds from the first thread's start to the
 * last one's end. A team that cannot be set up ends the program (exit 1). */
static double s_pass(const rb_run *base, int nth, int64_t n_mat) {
    rb_run r[MAX_THREADS];
    pthread_t th[MAX_THREADS];
    pthread_barrier_t bar;
    if (pthread_barrier_init(&bar, NULL, (unsigned)nth + 1)) {
        fprintf(stderr, "rows_bench: cannot make a barrier for %d threads\n", nth);
        exit(1);
    }
    int started = 0;
    for (int i = 0; i < nth; i++) {
        r[i] = *base;
        r[i].m0 = n_mat * i / nth;
        r[i].m1 = n_mat * (i + 1) / nth;
        r[i].bar = &bar;
        r[i].y = base->y + (size_t)i * Y_STRIDE;
        if (pthread_create(&th[i], NULL, s_thread, &r[i])) break;
        started++;
    }
    if (started < nth) { /* the started ones wait at the first barrier for nth + 1 parties */
        fprintf(stderr, "rows_bench: cannot start thread %d of %d\n", started + 1, nth);
        exit(1);
    }
    pthread_barrier_wait(&bar); /* all started */
    pthread_barrier_wait(&bar); /* all done */
    for (int i = 0; i < nth; i++)
        pthread_join(th[i], NULL);
    pthread_barrier_destroy(&bar);
    double t0 = r[0].t0, t1 = r[0].t1;
    for (int i = 1; i < nth; i++) {
        t0 = r[i].t0 < t0 ? r[i].t0 : t0;
        t1 = r[i].t1 > t1 ? r[i].t1 : t1;
    }
    return t1 - t0;
}

/* The value of flag `name` as a long in [lo, hi], whole (no trailing characters); else an error
 * and false. */
static bool s_arg_long(const char *name, const char *v, long lo, long hi, long *out) {
    char *end;
    errno = 0;
    const long x = strtol(v, &end, 10);
    if (errno || end == v || *end || x < lo || x > hi) {
        fprintf(stderr, "rows_bench: %s %s: a whole number in %ld..%ld\n", name, v, lo, hi);
        return false;
    }
    *out = x;
    return true;
}

/* xorshift32: the subsets' draws and the matrices' bytes (the same on every libc). */
static uint32_t s_xorshift(uint32_t *h) {
    *h ^= *h << 13, *h ^= *h >> 17, *h ^= *h << 5;
    return *h;
}

static int s_cmp(const void *a, const void *b) {
    const double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double s_median(double *v, int n) {
    qsort(v, (size_t)n, sizeof *v, s_cmp);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

int main(int argc, char **argv) {
    long F = 768, C = 1536, nth = 2, rounds = 9, mib = 1024;
    for (int i = 1; i < argc; i += 2) {
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        bool ok = v != NULL;
        if (ok && !strcmp(argv[i], "-F"))
            ok = s_arg_long("-F", v, 16, Y_STRIDE, &F);
        else if (ok && !strcmp(argv[i], "-C"))
            ok = s_arg_long("-C", v, 32, 65536, &C);
        else if (ok && !strcmp(argv[i], "-m"))
            ok = s_arg_long("-m", v, 1, 1L << 20, &mib);
        else if (ok && !strcmp(argv[i], "-t"))
            ok = s_arg_long("-t", v, 1, MAX_THREADS, &nth);
        else if (ok && !strcmp(argv[i], "-r"))
            ok = s_arg_long("-r", v, 1, 101, &rounds);
        else
            ok = false;
        if (!ok) {
            fprintf(stderr, "usage: rows_bench [-F rows, 768] [-C cols, 1536] [-m MiB, 1024] [-t "
                            "threads, 2] [-r rounds, 9]\n");
            return 2;
        }
    }
    if (F % 16 || C % 32) {
        fprintf(stderr,
                "rows_bench: -F %ld, -C %ld: rows a multiple of 16, columns of 32 (the "
                "packed layout's groups and Q4_0's blocks)\n",
                F, C);
        return 2;
    }
    const size_t row_bytes = (size_t)C / 32 * 18, mat_bytes = (size_t)F * row_bytes;
    int64_t n_mat = (int64_t)((size_t)mib * 1048576 / mat_bytes);
    if (n_mat < nth) n_mat = nth;
    const size_t bytes = mat_bytes * (size_t)n_mat, huge = (size_t)2 << 20;
    uint8_t *w = aligned_alloc(huge, (bytes + huge - 1) / huge * huge);
    float *y = aligned_alloc(64, sizeof(float) * Y_STRIDE * MAX_THREADS);
    int32_t *sub = malloc(sizeof(int32_t) * (size_t)F);
    uint8_t *xq = malloc((size_t)C / 32 * 34);
    if (!w || !y || !sub || !xq) {
        fprintf(stderr, "rows_bench: out of memory for %zu bytes\n", bytes);
        return 1;
    }
    const size_t packed_bytes = kern_q4_0x16_size(F, C),
                 packed_stride = (packed_bytes + 63) / 64 * 64;
    const size_t pbytes = packed_stride * (size_t)n_mat;
    uint8_t *wp = aligned_alloc(huge, (pbytes + huge - 1) / huge * huge);
    if (!wp) {
        fprintf(stderr, "rows_bench: out of memory for the packed copy (%zu bytes)\n", pbytes);
        return 1;
    }
    madvise(w, bytes, MADV_HUGEPAGE); /* advice only */
    madvise(wp, pbytes, MADV_HUGEPAGE);
    uint32_t h = 2463534242u;
    for (size_t i = 0; i < bytes; i++) /* xorshift bytes, then a scale of 1.0 per block */
        w[i] = (uint8_t)s_xorshift(&h);
    for (size_t i = 0; i < bytes; i += 18)
        w[i] = 0x00, w[i + 1] = 0x3c;
    for (int b = 0; b < C / 32; b++) {
        xq[b * 34] = 0x00, xq[b * 34 + 1] = 0x3c;
        for (int j = 0; j < 32; j++)
            xq[b * 34 + 2 + j] = (uint8_t)(j * 7 - 100);
    }
    memset(y, 0, sizeof(float) * Y_STRIDE * MAX_THREADS);
    const kern_ops *ops = kern_ops_get();
    for (int64_t m = 0; m < n_mat; m++)
        ops->pack_q4_0x16(w + (size_t)m * mat_bytes, row_bytes, F, C,
                          wp + (size_t)m * packed_stride);
    { /* the packed product against the row kernel over every row of the last matrix */
        const size_t last = (size_t)(n_mat - 1);
        for (long i = 0; i < F; i++)
            sub[i] = (int32_t)i;
        ops->matvec_q4_0x16(C, wp + last * packed_stride, xq, y, 0, F / 16);
        ops->matvec_rows(STP_TYPE_Q4_0, C, w + last * mat_bytes, row_bytes, xq, sub, F,
                         y + Y_STRIDE);
        for (long i = 0; i < F; i++)
            if (memcmp(&y[i], &y[Y_STRIDE + i], sizeof(float))) {
                fprintf(stderr,
                        "rows_bench: row %ld: packed matvec %.9g, row kernel %.9g (the same bits "
                        "expected)\n",
                        i, y[i], y[Y_STRIDE + i]);
                return 1;
            }
    }

    char cpu[256];
    sysinfo_cpu_model(cpu, sizeof cpu);
    sysinfo_cpu_time c0, c1;
    sysinfo_cpu_time_read(&c0);
    printf(
        "rows_bench: CPU %s, kernels %s, %ld threads; %lld matrices of %ld x %ld Q4_0 (%zu bytes "
        "a row, %.0f MiB and its packed copy), %ld alternating rounds, median\n",
        cpu, ops->level, nth, (long long)n_mat, F, C, row_bytes, (double)bytes / 1048576.0, rounds);
    {
        double t_rd[101], t_mv[101], r_mv[101];
        rb_run base = s_run_over(ops, wp, packed_stride, row_bytes, (int)C, xq, y);
        base.n_rows = (int)F;
        for (int k = 0; k < rounds; k++) {
            rb_run rd = base, mv = base;
            rd.n_rows = 0;
            mv.kernel = 2;
            t_rd[k] = s_pass(&rd, (int)nth, n_mat);
            t_mv[k] = s_pass(&mv, (int)nth, n_mat);
            r_mv[k] = t_mv[k] / t_rd[k];
        }
        const double rd_s = s_median(t_rd, (int)rounds);
        printf("every row, packed: bare read %.2f ms (%.1f GB/s), q4_0x16 matvec %.2f ms: %.2f of "
               "the read\n",
               1e3 * rd_s, (double)pbytes / rd_s / 1e9, 1e3 * s_median(t_mv, (int)rounds),
               s_median(r_mv, (int)rounds));
    }
    if (bytes < (size_t)256 << 20)
        printf("note: %.0f MiB may sit in the caches; the figures are then not the memory's\n",
               (double)bytes / 1048576.0);
    printf("| rows read | all, read ms | subset, read ms | of all | subset, rows ms | of all |\n");
    printf("| ---: | ---: | ---: | ---: | ---: | ---: |\n");
    static const int eighths[] = {1, 2, 3, 4, 6, 8};
    for (size_t d = 0; d < sizeof eighths / sizeof eighths[0]; d++) {
        uint32_t hs = 12345u + 7919u * (uint32_t)d;
        int n = 0;
        for (long i = 0; i < F; i++)
            if ((int)(s_xorshift(&hs) >> 29) < eighths[d]) sub[n++] = (int32_t)i;
        if (!n) sub[n++] = 0;
        double t_all[101], t_sub[101], t_ker[101], r_sub[101], r_ker[101];
        rb_run base = s_run_over(ops, w, mat_bytes, row_bytes, (int)C, xq, y);
        base.rows = sub;
        for (int k = 0; k < rounds; k++) {
            rb_run a = base, s = base, kr = base;
            a.n_rows = 0;
            s.n_rows = n;
            kr.n_rows = n, kr.kernel = 1;
            t_all[k] = s_pass(&a, (int)nth, n_mat);
            t_sub[k] = s_pass(&s, (int)nth, n_mat);
            t_ker[k] = s_pass(&kr, (int)nth, n_mat);
            r_sub[k] = t_sub[k] / t_all[k];
            r_ker[k] = t_ker[k] / t_all[k];
        }
        printf("| %d of %ld (%.0f%%) | %.2f (%.1f GB/s) | %.2f | %.2f | %.2f | %.2f |\n", n, F,
               100.0 * n / F, 1e3 * s_median(t_all, (int)rounds),
               (double)bytes / s_median(t_all, (int)rounds) / 1e9,
               1e3 * s_median(t_sub, (int)rounds), s_median(r_sub, (int)rounds),
               1e3 * s_median(t_ker, (int)rounds), s_median(r_ker, (int)rounds));
    }
    sysinfo_cpu_time_read(&c1);
    printf("(\"of all\": median over rounds of the subset's time / the same round's read of every "
           "byte; CPU steal %.1f%% during the run)\n",
           100.0 * sysinfo_steal_share(&c0, &c1));
    free(w), free(wp), free(y), free(sub), free(xq);
    return 0;
}
