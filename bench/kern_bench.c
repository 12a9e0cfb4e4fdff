/* kern_bench: matvec / matmat throughput of every kernel level on this CPU, in GB/s of weights.
 *
 * For each weight type (Q4_0, Q8_0, Q4_K, Q6_K, F16) and each level kern_ops_all() offers, it
 * streams a set of 4096x4096 matrices larger than the last-level cache (so the figure is a
 * memory-bound decode figure, not an L3 one) through matvec with 1 and 2 threads (rows split in
 * halves), and through matmat with 8 and 32 vectors (1 thread). Q4_0 is also run in the
 * row-interleaved q4_0x16 layout (rows "q4_0x16": matvec_q4_0x16 / matmat_q4_0x16, the same
 * bytes re-arranged). "rows/2" is matvec_rows over a random half of each matrix's rows (a ReGLU-
 * sparse `up` product's access: short scattered rows). Prints the CPU model first.
 * Time is per-thread CPU time (the slowest thread), so other load on a shared machine does not
 * count; memory-bandwidth contention from other processes still does.
 * Usage: kern_bench [MiB per type, default 640] [rows=cols, default 4096] [type, e.g. q4_0].
 * Not a test. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include "util/sysinfo.h"
#include "kern/kern.h"

typedef struct job {
    const kern_ops *ops;
    stp_type t;
    int64_t n, rows, n_mat, n_vec;
    size_t rb, mat_bytes;
    const uint8_t *w;
    const void *xq;
    size_t xs;
    float *y;
    int64_t r0, r1;
    int packed;          /* w is in the q4_0x16 layout: matvec_q4_0x16 / matmat_q4_0x16 */
    const int32_t *list; /* matvec_rows over these rows of each matrix (NULL: all rows) */
    int64_t n_list;
    double cpu_s; /* this thread's CPU time for the sweep */
} job;

static double s_cpu_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void *s_run(void *arg) {
    job *j = arg;
    const double t0 = s_cpu_now();
    for (int64_t m = 0; m < j->n_mat; m++) {
        const uint8_t *w = j->w + (size_t)m * j->mat_bytes;
        if (j->list)
            j->ops->matvec_rows(j->t, j->n, w, j->rb, j->xq, j->list, j->n_list, j->y);
        else if (j->packed && j->n_vec == 1)
            j->ops->matvec_q4_0x16(j->n, w, j->xq, j->y, j->r0 / 16, j->r1 / 16);
        else if (j->packed)
            j->ops->matmat_q4_0x16(j->n, w, j->xq, j->xs, j->n_vec, j->y, (size_t)j->rows,
                                   j->r0 / 16, j->r1 / 16);
        else if (j->n_vec == 1)
            j->ops->matvec(j->t, j->n, w, j->rb, j->xq, j->y, j->r0, j->r1);
        else
            j->ops->matmat(j->t, j->n, w, j->rb, j->xq, j->xs, j->n_vec, j->y, (size_t)j->rows,
                           j->r0, j->r1);
    }
    j->cpu_s = s_cpu_now() - t0;
    return NULL;
}

/* Best of 3 sweeps over all matrices; returns GB/s of weight bytes. */
static double s_measure(job base, int threads) {
    double best = 1e30;
    for (int rep = 0; rep < 3; rep++) {
        job jobs[2];
        pthread_t th[2];
        for (int k = 0; k < threads; k++) {
            jobs[k] = base;
            jobs[k].r0 = base.rows / 16 * k / threads * 16; /* whole 16-row groups */
            jobs[k].r1 = base.rows / 16 * (k + 1) / threads * 16;
            jobs[k].y = base.y + (size_t)jobs[k].r0;
            if (k > 0) pthread_create(&th[k], NULL, s_run, &jobs[k]);
        }
        s_run(&jobs[0]);
        for (int k = 1; k < threads; k++)
            pthread_join(th[k], NULL);
        double dt = 0; /* CPU time of the slowest thread: the machine is shared, wall time lies */
        for (int k = 0; k < threads; k++)
            if (jobs[k].cpu_s > dt) dt = jobs[k].cpu_s;
        if (dt < best) best = dt;
    }
    const double bytes = base.list ? (double)base.rb * (double)base.n_list : (double)base.mat_bytes;
    return bytes * (double)base.n_mat / best / 1e9;
}

int main(int argc, char **argv) {
    const double mib = argc > 1 ? atof(argv[1]) : 640.0;
    const int64_t n = argc > 2 ? atoll(argv[2]) : 4096, rows = n;
    const char *only = argc > 3 ? argv[3] : NULL; /* e.g. "q4_0": one type */
    char cpu[256];
    sysinfo_cpu_model(cpu, sizeof cpu);
    printf("kern_bench: CPU %s; %lldx%lld matrices, %.0f MiB of weights per type\n", cpu,
           (long long)rows, (long long)n, mib);
    const kern_ops *ops[4];
    const int nops = kern_ops_all(ops, 4);
    const stp_type types[] = {STP_TYPE_Q4_0, STP_TYPE_Q8_0, STP_TYPE_Q4_K, STP_TYPE_Q6_K,
                              STP_TYPE_F16};
    printf("%-7s %-11s %9s %9s %13s %13s %13s\n", "type", "level", "mv 1t", "mv 2t", "mm8 1t",
           "mm32 1t", "rows/2 1t");
    uint64_t seed = 1;
    for (size_t t = 0; t < sizeof types / sizeof types[0]; t++) {
        const stp_type wt = types[t];
        if (only && strcasecmp(only, tensor_type_name(wt)) != 0) continue;
        const size_t rb = tensor_type_row_size(wt, n), mat = rb * (size_t)rows;
        int64_t n_mat = (int64_t)(mib * 1048576.0 / (double)mat);
        if (n_mat < 1) n_mat = 1;
        uint8_t *w = malloc(mat * (size_t)n_mat);
        float *f = malloc(sizeof(float) * (size_t)n * 32);
        const size_t xs = kern_act_size(wt, n);
        uint8_t *xq = malloc(xs * 32);
        float *y = malloc(sizeof(float) * (size_t)rows * 32);
        int32_t *list = malloc(sizeof(int32_t) * (size_t)rows);
        if (!w || !f || !xq || !y || !list) {
            fprintf(stderr, "kern_bench: out of memory\n");
            return 1;
        }
        /* one valid matrix: random bytes, then sane fp16 scales (no NaN/subnormal stalls) */
        for (size_t i = 0; i < mat; i++) {
            seed = seed * 6364136223846793005ULL + 1442695040888963407ULL;
            w[i] = (uint8_t)(seed >> 56);
        }
        for (int64_t r = 0; r < rows; r++) {
            uint8_t *row = w + (size_t)r * rb;
            if (wt == STP_TYPE_Q4_0 || wt == STP_TYPE_Q8_0) {
                const size_t bs = wt == STP_TYPE_Q4_0 ? 18 : 34;
                for (int64_t b = 0; b < n / 32; b++)
                    memcpy(row + (size_t)b * bs, &(uint16_t){0x2000}, 2);
            } else if (wt == STP_TYPE_Q4_K) {
                for (int64_t b = 0; b < n / 256; b++)
                    memcpy(row + (size_t)b * 144, &(uint32_t){0x20002000u}, 4);
            } else if (wt == STP_TYPE_Q6_K) {
                for (int64_t b = 0; b < n / 256; b++)
                    memcpy(row + (size_t)b * 210 + 208, &(uint16_t){0x2000}, 2);
            } else {
                for (int64_t i = 0; i < n; i++)
                    memcpy(row + 2 * i, &(uint16_t){(uint16_t)(0x2000 | (i & 0x3FF))}, 2);
            }
        }
        for (int64_t m = 1; m < n_mat; m++)
            memcpy(w + (size_t)m * mat, w, mat);
        for (int64_t i = 0; i < n * 32; i++) {
            seed = seed * 6364136223846793005ULL + 1442695040888963407ULL;
            f[i] = (float)((int64_t)(seed >> 40) - (1 << 23)) / (float)(1 << 23);
        }
        /* a random half of the rows, in order: a ReGLU-sparse `up` product's rows */
        int64_t n_list = 0;
        for (int64_t r = 0; r < rows; r++) {
            seed = seed * 6364136223846793005ULL + 1442695040888963407ULL;
            if (seed >> 63) list[n_list++] = (int32_t)r;
        }
        /* Q4_0 also in the row-interleaved q4_0x16 layout (rows "q4_0x16"), same matrices */
        uint8_t *wp = NULL;
        if (wt == STP_TYPE_Q4_0 && kern_q4_0x16_size(rows, n) == mat) {
            wp = aligned_alloc(64, mat * (size_t)n_mat);
            if (!wp) {
                fprintf(stderr, "kern_bench: out of memory\n");
                return 1;
            }
            kern_q4_0x16_pack(w, rb, rows, n, wp);
            for (int64_t m = 1; m < n_mat; m++)
                memcpy(wp + (size_t)m * mat, wp, mat);
        }
        for (int oo = 0; oo < (wp ? 2 : 1) * nops; oo++) {
            const int o = oo % nops, packed = oo >= nops;
            for (int v = 0; v < 32; v++)
                ops[o]->quantize_act(wt, f + v * n, xq + v * xs, n);
            job j = {.ops = ops[o],
                     .t = wt,
                     .n = n,
                     .rows = rows,
                     .n_mat = n_mat,
                     .n_vec = 1,
                     .rb = rb,
                     .mat_bytes = mat,
                     .w = packed ? wp : w,
                     .packed = packed,
                     .xq = xq,
                     .xs = xs,
                     .y = y};
            const int is_ref = !strcmp(ops[o]->level, "ref");
            if (is_ref) j.n_mat = n_mat < 4 ? n_mat : 4; /* the reference is slow; stay short */
            const double mv1 = s_measure(j, 1), mv2 = s_measure(j, 2);
            j.n_vec = 8;
            j.n_mat = n_mat < 8 ? n_mat : 8;
            if (is_ref) j.n_mat = 1;
            const double mm8 = s_measure(j, 1);
            j.n_vec = 32;
            const double mm32 = s_measure(j, 1);
            double rows1 = 0; /* the row-subset product (not in the packed layout) */
            if (!packed) {
                j.n_vec = 1;
                j.n_mat = is_ref ? 1 : n_mat;
                j.list = list;
                j.n_list = n_list;
                rows1 = s_measure(j, 1);
            }
            printf("%-7s %-11s %7.2f GB/s %5.2f GB/s %7.2f GB/s %7.2f GB/s",
                   packed ? "q4_0x16" : tensor_type_name(wt), ops[o]->level, mv1, mv2, mm8, mm32);
            if (packed)
                printf("             -\n");
            else
                printf(" %7.2f GB/s\n", rows1);
            fflush(stdout);
        }
        free(w);
        free(wp);
        free(f);
        free(xq);
        free(y);
        free(list);
    }
    printf("(mm8/mm32: matmat with 8/32 vectors, GB/s of weights per pass over all vectors;\n"
           " rows/2: matvec_rows over a random half of the rows, GB/s of the rows read)\n");
    return 0;
}
