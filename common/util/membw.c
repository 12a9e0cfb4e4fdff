/* membw: read bandwidth from the best of a few summing passes over a buffer beyond the LLC; see
 * membw.h. The sum is returned through a volatile sink so the compiler keeps every load; the
 * loads are 64-byte GCC vectors (the compiler splits them to the build's ISA width) into four
 * independent accumulators, so the loop is bound by memory, not by an add chain. */
#include "util/membw.h"

#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

typedef uint64_t s_v8 __attribute__((vector_size(64)));

typedef struct membw_section {
    const s_v8 *buf;
    size_t n_vec;      /* 64-byte vectors in buf */
    uint64_t sums[64]; /* per thread, kept so the loads are not dead */
} membw_section;

static double s_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* Sums vectors [b, e) of buf. */
static uint64_t s_sum(const s_v8 *buf, size_t b, size_t e) {
    s_v8 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
    size_t i = b;
    for (; i + 4 <= e; i += 4) {
        a0 += buf[i];
        a1 += buf[i + 1];
        a2 += buf[i + 2];
        a3 += buf[i + 3];
    }
    for (; i < e; i++)
        a0 += buf[i];
    s_v8 a = a0 + a1 + a2 + a3;
    uint64_t s = 0;
    for (int k = 0; k < 8; k++)
        s += a[k];
    return s;
}

static void s_worker(void *ctx, int ith, int nth) {
    membw_section *s = ctx;
    long b, e;
    threadpool_chunk((long)s->n_vec, ith, nth, 64, &b, &e);
    uint64_t v = s_sum(s->buf, (size_t)b, (size_t)e);
    if (ith < 64) s->sums[ith] = v;
}

/* The last-level cache of cpu0 in bytes (0 if unknown): sysfs's highest cache level (what the
 * kernel reports for this core's own cache), else sysconf (glibc's figure can be far off under a
 * hypervisor: 320 MiB for a 32 MiB Zen 4 L3 on this project's hosts). */
static size_t s_llc_bytes(void) {
    size_t best = 0;
    for (int idx = 0; idx < 8; idx++) {
        char path[96], unit = 0;
        snprintf(path, sizeof path, "/sys/devices/system/cpu/cpu0/cache/index%d/size", idx);
        FILE *f = fopen(path, "r");
        if (!f) break;
        unsigned long v = 0;
        if (fscanf(f, "%lu%c", &v, &unit) >= 1) {
            size_t bytes = v * (unit == 'K' ? 1024ul : unit == 'M' ? 1048576ul : 1ul);
            best = bytes > best ? bytes : best;
        }
        fclose(f);
    }
    if (best) return best;
    long l3 = -1;
#ifdef _SC_LEVEL3_CACHE_SIZE
    l3 = sysconf(_SC_LEVEL3_CACHE_SIZE);
#endif
    return l3 > 0 ? (size_t)l3 : 0;
}

size_t membw_default_bytes(void) {
    const size_t lo = (size_t)256 << 20, hi = (size_t)1 << 30;
    size_t four = 4 * s_llc_bytes();
    return four < lo ? lo : four > hi ? hi : four;
}

int membw_measure(threadpool *tp, size_t bytes, int reps, membw_result *out, stp_err *err) {
    const double t_start = s_now();
    if (!bytes) bytes = membw_default_bytes();
    if (reps <= 0) reps = 3;
    bytes = (bytes + 4095) & ~(size_t)4095;
    /* mmap, not malloc: the buffer goes back to the kernel at once, and an impossible size is
     * a plain ENOMEM (a sanitizer's allocator would abort) */
    void *map = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    s_v8 *buf = map == MAP_FAILED ? NULL : map;
    if (!buf)
        return stp_err_set(err, STP_ENOMEM, "membw: cannot allocate the %zu MiB test buffer",
                           bytes >> 20);
#ifdef MADV_HUGEPAGE
    madvise(buf, bytes, MADV_HUGEPAGE); /* fewer page faults and TLB misses; advice only */
#endif
    memset(buf, 1, bytes); /* real pages, not the shared zero page */
    membw_section s = {.buf = buf, .n_vec = bytes / sizeof(s_v8)};
    memset(out, 0, sizeof *out);
    out->bytes = bytes;
    out->n_threads = tp ? threadpool_size(tp) : 1;
    volatile uint64_t sink = 0;
    for (int pass = 0; pass < 2; pass++) {
        double best = 0;
        for (int r = 0; r < reps; r++) {
            double t0 = s_now();
            if (pass == 0 || !tp) {
                s.sums[0] = s_sum(buf, 0, s.n_vec);
            } else {
                threadpool_run(tp, s_worker, &s);
            }
            double dt = s_now() - t0;
            sink += s.sums[0];
            double gbps = dt > 0 ? (double)bytes / dt * 1e-9 : 0;
            best = gbps > best ? gbps : best;
        }
        if (pass == 0)
            out->gbps_1 = best;
        else
            out->gbps_n = best;
    }
    (void)sink;
    munmap(buf, bytes);
    out->seconds = s_now() - t_start;
    return 0;
}
