/* test_attn_core: the flash-style attention kernels (attn_core.h: generic, AVX2 and AVX-512
 * builds, whichever the CPU runs) against the double-precision two-pass reference attn_head_ref,
 * on ragged lengths (1 position, tile and chunk edges, several chunks), sliding windows and
 * ring-buffer wrap, group sizes 1, 6 and 7, head sizes 16..128, scores that rise along the
 * context (the running max is raised and the sums rescaled many times), a float32, a float16 and
 * a Q8_0 cache; a float16 or Q8_0 cache gives the bits of a float32 cache holding the same rounded
 * values (Q8_0 blocks over the whole row, straddling two heads when D < 32, as kv_cache stores
 * them), and
 * a query computed chunk by chunk in any order of chunks, merged in position order, gives the
 * bits of the whole query (what lets threads split a token's chunks), and several kv groups in
 * one pass over the rows (n_grp) or several queries (n_q, consecutive tokens of a prefill, with
 * causal and sliding-window ranges) give each group's and query's bits of a call of its own. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdbool.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kern/kern.h"
#include "model/attn_core.h"
#include "th_skip.h"

static float s_rand(uint64_t *s) {
    *s = *s * 6364136223846793005ull + 1442695040888963407ull;
    return (float)((*s >> 40) & 0xFFFFFF) / 16777216.0f * 2.0f - 1.0f;
}

typedef struct level {
    const char *name;
    attn_group_fn fn;
} level;

/* The kernel builds this CPU runs: the generic one always, the others where kern has them. */
static int s_levels(level *out) {
    int n = 0;
    out[n++] = (level){"generic", attn_group_generic};
    const kern_ops *all[8];
    const int n_ops = kern_ops_all(all, 8);
    bool avx2 = false, avx512 = false;
    for (int i = 0; i < n_ops; i++) {
        if (!strcmp(all[i]->level, "avx2"))
            out[n++] = (level){"avx2", attn_group_avx2}, avx2 = true;
        if (!strcmp(all[i]->level, "avx512vnni")) {
            out[n++] = (level){"avx512", attn_group_avx512};
            out[n++] = (level){"avx512_l1", attn_group_avx512_l1}; /* avx512's bits (below) */
            avx512 = true;
        }
    }
    /* a build this CPU cannot run is a CPU-feature skip: printed and counted */
    if (!avx2) th_cpu_skip_note("test_attn_core", "avx2");
    if (!avx512) th_cpu_skip_note("test_attn_core", "avx512vnni");
    return n;
}

/* One query of G heads over positions lo..hi of a cache of cap slots, at every level. rise > 0
 * makes later keys score higher (the running max keeps rising). */
static void s_check(int G, int D, int cap, int lo, int hi, float rise, uint64_t seed) {
    const int stride = 3 * G * D; /* other groups' rows in between, as in the real cache */
    const size_t nc = (size_t)cap * stride;
    float *q = malloc(sizeof(float) * G * D), *k = malloc(sizeof(float) * nc),
          *v = malloc(sizeof(float) * nc), *ref = malloc(sizeof(float) * G * D),
          *o1 = malloc(sizeof(float) * G * D), *o2 = malloc(sizeof(float) * G * D);
    double *part = malloc(sizeof(double) * G * (D + 2));
    float *work = aligned_alloc(64, sizeof(float) * attn_work_floats(G, D, 1));
    double *sc = malloc(sizeof(double) * (hi - lo + 1)),
           *st = malloc(sizeof(double) * attn_merge_doubles(G, D));
    uint16_t *kh = malloc(sizeof(uint16_t) * nc), *vh = malloc(sizeof(uint16_t) * nc);
    const bool q8ok = stride % QK8_0 == 0; /* a cache row of whole blocks (kv_cache_new's rule) */
    block_q8_0 *kq = malloc(sizeof(block_q8_0) * (nc / QK8_0 + 1)),
               *vq = malloc(sizeof(block_q8_0) * (nc / QK8_0 + 1));
    for (int i = 0; i < G * D; i++)
        q[i] = s_rand(&seed) * 3;
    for (size_t i = 0; i < nc; i++) {
        const int pos_rank = (int)((i / stride - lo % cap + cap) % cap); /* ~ position - lo */
        k[i] = s_rand(&seed) * 3 * (1.0f + rise * pos_rank / cap), v[i] = s_rand(&seed);
    }
    for (int half = 0; half < 3; half++) {
        if (half == 2 && !q8ok) break;
        if (half == 1) /* the same values rounded to float16, in both layouts */
            for (size_t i = 0; i < nc; i++) {
                kh[i] = kern_f32_to_fp16(k[i]), vh[i] = kern_f32_to_fp16(v[i]);
                k[i] = kern_fp16_to_f32(kh[i]), v[i] = kern_fp16_to_f32(vh[i]);
            }
        if (half == 2) { /* quantized row by row as kv_cache_store does, and dequantized */
            for (int r = 0; r < cap; r++) {
                kern_quantize_act_ref(STP_TYPE_Q8_0, k + (size_t)r * stride,
                                      kq + (size_t)r * stride / QK8_0, stride);
                kern_quantize_act_ref(STP_TYPE_Q8_0, v + (size_t)r * stride,
                                      vq + (size_t)r * stride / QK8_0, stride);
            }
            double err = 0;
            for (size_t i = 0; i < nc; i++) {
                const block_q8_0 *bk = kq + i / QK8_0, *bv = vq + i / QK8_0;
                const float k8 = (float)bk->qs[i % QK8_0] * kern_fp16_to_f32(bk->d),
                            v8 = (float)bv->qs[i % QK8_0] * kern_fp16_to_f32(bv->d);
                err = fmax(err, fabs(k8 - k[i]) / (fabs(kern_fp16_to_f32(bk->d)) + 1e-30));
                err = fmax(err, fabs(v8 - v[i]) / (fabs(kern_fp16_to_f32(bv->d)) + 1e-30));
                k[i] = k8, v[i] = v8;
            }
            /* half a step, plus d rounded to fp16 (127 * 2^-11 of a step at most): rounded, not cut
             */
            assert_true(err > 0.2 && err < 0.57);
        }
        attn_group_args a = {.q = q,
                             .G = G,
                             .D = D,
                             .k = k + D,
                             .v = v + D,
                             .stride = stride,
                             .cap = cap,
                             .lo = lo,
                             .hi = hi,
                             .m = part,
                             .s = part + G,
                             .acc = part + 2 * G,
                             .work = work};
        double max_ref = 0;
        for (int h = 0; h < G; h++)
            attn_head_ref(&a, h, ref + (size_t)h * D, sc);
        for (int i = 0; i < G * D; i++)
            max_ref = fmax(max_ref, fabs(ref[i]));
        assert_true(max_ref > 0.01); /* a real average, not all zero */
        level lv[4];
        const int n_lv = s_levels(lv);
        float *o_avx512 = malloc(sizeof(float) * G * D); /* the other prefetch: the same bits */
        for (int l = 0; l < n_lv; l++) {
            attn_group_args b = a;
            attn_group_query(lv[l].fn, &b, st, o1);
            if (!strcmp(lv[l].name, "avx512")) memcpy(o_avx512, o1, sizeof(float) * G * D);
            if (!strcmp(lv[l].name, "avx512_l1"))
                assert_memory_equal(o1, o_avx512, sizeof(float) * G * D);
            for (int i = 0; i < G * D; i++)
                if (!(fabsf(o1[i] - ref[i]) <= 2e-6f + 2e-5f * fabsf(ref[i])))
                    fail_msg("%s G%d D%d cap%d %d..%d %s: out[%d] %.9g, reference %.9g", lv[l].name,
                             G, D, cap, lo, hi,
                             half == 2 ? "q8_0"
                             : half    ? "f16"
                                       : "f32",
                             i, o1[i], ref[i]);
            if (half) { /* the float16 / Q8_0 cache: the bits of the float32 one holding its values
                         */
                b = a;
                b.k = b.v = NULL;
                if (half == 1)
                    b.kh = kh + D, b.vh = vh + D;
                else
                    b.kq = kq, b.vq = vq, b.qoff = D;
                attn_group_query(lv[l].fn, &b, st, o2);
                assert_memory_equal(o1, o2, sizeof(float) * G * D);
                /* and the reference reads the same values from it */
                float *r2 = malloc(sizeof(float) * D);
                attn_head_ref(&b, G - 1, r2, sc);
                assert_memory_equal(r2, ref + (size_t)(G - 1) * D, sizeof(float) * D);
                free(r2);
            }
            /* chunks computed last to first, kept, then merged in order: the same bits */
            const int c_first = lo / ATTN_CHUNK, n_ch = hi / ATTN_CHUNK - c_first + 1;
            double *parts = malloc(sizeof(double) * n_ch * G * (D + 2));
            for (int ci = n_ch - 1; ci >= 0; ci--) {
                b = a;
                double *pp = parts + (size_t)ci * G * (D + 2);
                b.m = pp, b.s = pp + G, b.acc = pp + 2 * G;
                b.c0 = (c_first + ci) * ATTN_CHUNK, b.c1 = b.c0 + ATTN_CHUNK;
                lv[l].fn(&b);
            }
            attn_merge_init(st, G, D);
            for (int ci = 0; ci < n_ch; ci++) {
                const double *pp = parts + (size_t)ci * G * (D + 2);
                attn_merge_add(st, G, D, pp, pp + G, pp + 2 * G);
            }
            attn_merge_out(st, G, D, o2);
            assert_memory_equal(o1, o2, sizeof(float) * G * D);
            free(parts);
        }
        free(o_avx512);
    }
    free(q), free(k), free(v), free(ref), free(o1), free(o2), free(part), free(work), free(sc),
        free(st), free(kh), free(vh), free(kq), free(vq);
}

static void test_attn_core_ragged(void **state) {
    (void)state;
    s_check(6, 128, 1200, 0, 0, 0, 1);     /* one position */
    s_check(6, 128, 1200, 0, 31, 0, 2);    /* one tile */
    s_check(6, 128, 1200, 0, 32, 0, 3);    /* a tile and one */
    s_check(6, 128, 1200, 0, 255, 0, 4);   /* one chunk */
    s_check(7, 128, 1200, 0, 256, 0, 5);   /* a chunk and one */
    s_check(1, 64, 1200, 0, 1030, 0, 6);   /* several chunks, one head */
    s_check(6, 128, 1200, 5, 777, 0, 7);   /* starts inside a tile */
    s_check(2, 16, 300, 0, 170, 0, 8);     /* small heads */
    s_check(3, 36, 80, 17, 49, 0, 9);      /* D not a multiple of the vector width */
    s_check(6, 128, 2100, 0, 2047, 0, 10); /* a long context */
}

static void test_attn_core_rising_scores(void **state) {
    (void)state;
    s_check(6, 128, 1200, 0, 1100, 2.0f, 11);
    s_check(7, 64, 600, 3, 599, 4.0f, 12);
}

static void test_attn_core_window_ring(void **state) {
    (void)state;
    s_check(6, 128, 100, 950, 1030, 0, 13);  /* positions wrap around a ring of 100 */
    s_check(7, 128, 600, 4000, 4511, 0, 14); /* a 512 window in a 600-slot ring, 3 chunks */
    s_check(3, 36, 17, 33, 49, 0, 15);
}

/* Random cached rows (cap rows of stride values) in every cache type: k, v float32; kh, vh
 * float16; kq, vq Q8_0 (q8ok: stride a multiple of QK8_0). Drawn from *seed after the caller's
 * queries. */
typedef struct kv_fixture {
    float *k, *v;
    uint16_t *kh, *vh;
    block_q8_0 *kq, *vq;
    bool q8ok;
} kv_fixture;

static void s_kv_fill(kv_fixture *f, int cap, int stride, uint64_t *seed) {
    const size_t nc = (size_t)cap * stride;
    f->k = malloc(sizeof(float) * nc), f->v = malloc(sizeof(float) * nc);
    f->kh = malloc(sizeof(uint16_t) * nc), f->vh = malloc(sizeof(uint16_t) * nc);
    f->kq = malloc(sizeof(block_q8_0) * (nc / QK8_0 + 1));
    f->vq = malloc(sizeof(block_q8_0) * (nc / QK8_0 + 1));
    for (size_t i = 0; i < nc; i++)
        f->k[i] = s_rand(seed) * 3, f->v[i] = s_rand(seed);
    for (size_t i = 0; i < nc; i++)
        f->kh[i] = kern_f32_to_fp16(f->k[i]), f->vh[i] = kern_f32_to_fp16(f->v[i]);
    f->q8ok = stride % QK8_0 == 0;
    if (f->q8ok)
        for (int r = 0; r < cap; r++) {
            kern_quantize_act_ref(STP_TYPE_Q8_0, f->k + (size_t)r * stride,
                                  f->kq + (size_t)r * stride / QK8_0, stride);
            kern_quantize_act_ref(STP_TYPE_Q8_0, f->v + (size_t)r * stride,
                                  f->vq + (size_t)r * stride / QK8_0, stride);
        }
}

static void s_kv_free(kv_fixture *f) {
    free(f->k), free(f->v), free(f->kh), free(f->vh), free(f->kq), free(f->vq);
}

/* n_grp consecutive kv heads of a row in one call: each head's bits are those of its group's own
 * call (f32, f16 and Q8_0 caches; rows of ng kv heads plus one more in between). */
static void s_check_groups(int ng, int G, int D, int cap, int lo, int hi, uint64_t seed) {
    const int stride = (ng + 1) * D, H = ng * G;
    float *q = malloc(sizeof(float) * H * D), *o1 = malloc(sizeof(float) * H * D),
          *o2 = malloc(sizeof(float) * H * D);
    double *part = malloc(sizeof(double) * H * (D + 2)),
           *st = malloc(sizeof(double) * attn_merge_doubles(H, D));
    float *work = aligned_alloc(64, sizeof(float) * attn_work_floats(G, D, ng));
    for (int i = 0; i < H * D; i++)
        q[i] = s_rand(&seed) * 3;
    kv_fixture f;
    s_kv_fill(&f, cap, stride, &seed);
    level lv[4];
    const int n_lv = s_levels(lv);
    for (int l = 0; l < n_lv; l++)
        for (int type = 0; type < (f.q8ok ? 3 : 2); type++) {
            attn_group_args a = {.G = G,
                                 .D = D,
                                 .stride = stride,
                                 .cap = cap,
                                 .lo = lo,
                                 .hi = hi,
                                 .m = part,
                                 .s = part + H,
                                 .acc = part + 2 * H,
                                 .work = work};
            for (int g = -1; g < ng; g++) { /* g -1: all groups in one call */
                attn_group_args b = a;
                const int g0 = g < 0 ? 0 : g, e = D + g0 * D; /* the first kv head is the 2nd */
                b.n_grp = g < 0 ? ng : 1;
                b.q = q + (size_t)g0 * G * D;
                if (type == 0) b.k = f.k + e, b.v = f.v + e;
                if (type == 1) b.kh = f.kh + e, b.vh = f.vh + e;
                if (type == 2) b.kq = f.kq, b.vq = f.vq, b.qoff = e;
                attn_group_query(lv[l].fn, &b, st, (g < 0 ? o1 : o2 + (size_t)g0 * G * D));
            }
            if (memcmp(o1, o2, sizeof(float) * H * D))
                fail_msg("%s ng%d G%d D%d %d..%d type %d: groups in one pass differ", lv[l].name,
                         ng, G, D, lo, hi, type);
        }
    free(q), free(o1), free(o2), free(part), free(st), free(work);
    s_kv_free(&f);
}

static void test_attn_core_groups(void **state) {
    (void)state;
    s_check_groups(2, 6, 128, 1200, 0, 1100, 21);  /* the 4b shape */
    s_check_groups(4, 7, 128, 600, 3, 599, 22);    /* the 21b shape, odd G */
    s_check_groups(2, 2, 16, 300, 5, 170, 23);     /* small heads: Q8_0 blocks span heads */
    s_check_groups(3, 3, 36, 80, 17, 49, 24);      /* D not a multiple of the vector width */
    s_check_groups(2, 6, 128, 100, 950, 1030, 25); /* a ring */
}

/* n_q consecutive tokens at p0.. (window w, 0: none) over a ring of cap slots, ng kv groups: one
 * pass gives each query's bits of its own call, at every level and cache type. */
static void s_check_queries(int nq, int ng, int G, int D, int cap, int p0, int w, uint64_t seed) {
    const int stride = ng * D, H = ng * G, qs = H * D + 5; /* queries not contiguous */
    float *q = malloc(sizeof(float) * nq * qs), *o1 = malloc(sizeof(float) * nq * H * D),
          *o2 = malloc(sizeof(float) * nq * H * D);
    double *part = malloc(sizeof(double) * ATTN_NQ * H * (D + 2)),
           *st = malloc(sizeof(double) * attn_merge_doubles(ATTN_NQ * H, D));
    float *work = aligned_alloc(64, sizeof(float) * attn_work_floats(G, D, ng));
    for (int i = 0; i < nq * qs; i++)
        q[i] = s_rand(&seed) * 3;
    kv_fixture f;
    s_kv_fill(&f, cap, stride, &seed);
    level lv[4];
    const int n_lv = s_levels(lv);
    for (int l = 0; l < n_lv; l++)
        for (int type = 0; type < (f.q8ok ? 3 : 2); type++) {
            attn_group_args a = {
                .G = G, .D = D, .n_grp = ng, .stride = stride, .cap = cap, .m = part, .work = work};
            if (type == 0) a.k = f.k, a.v = f.v;
            if (type == 1) a.kh = f.kh, a.vh = f.vh;
            if (type == 2) a.kq = f.kq, a.vq = f.vq;
            attn_group_args b = a; /* all queries in one pass */
            b.q = q, b.n_q = nq, b.q_stride = qs;
            b.s = part + nq * H, b.acc = part + 2 * nq * H;
            for (int i = 0; i < nq; i++) {
                const int p = p0 + i, lo = w > 0 && p - w + 1 > 0 ? p - w + 1 : 0;
                b.qlo[i] = lo, b.qhi[i] = p;
                b.lo = i == 0 || lo < b.lo ? lo : b.lo, b.hi = p;
                attn_group_args c = a; /* query i alone */
                c.q = q + (size_t)i * qs, c.lo = lo, c.hi = p;
                c.s = part + H, c.acc = part + 2 * H;
                attn_group_query(lv[l].fn, &c, st, o2 + (size_t)i * H * D);
            }
            attn_group_query(lv[l].fn, &b, st, o1);
            if (memcmp(o1, o2, sizeof(float) * nq * H * D))
                fail_msg("%s nq%d ng%d G%d D%d p0 %d window %d type %d: queries in one pass differ",
                         lv[l].name, nq, ng, G, D, p0, w, type);
        }
    free(q), free(o1), free(o2), free(part), free(st), free(work);
    s_kv_free(&f);
}

static void test_attn_core_queries(void **state) {
    (void)state;
    s_check_queries(4, 2, 6, 128, 1200, 1000, 0, 31);  /* the 4b shape, causal */
    s_check_queries(4, 2, 6, 128, 1200, 0, 0, 32);     /* from position 0: 1..4 positions */
    s_check_queries(3, 1, 7, 64, 1200, 253, 0, 33);    /* across a chunk edge */
    s_check_queries(4, 4, 7, 128, 600, 1030, 512, 34); /* a 512 window in a 600-slot ring */
    s_check_queries(4, 2, 6, 128, 600, 510, 512, 35);  /* the window starts inside the batch */
    s_check_queries(2, 3, 3, 36, 80, 45, 20, 36);      /* D not a multiple of the vector width */
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_attn_core_ragged),
        cmocka_unit_test(test_attn_core_rising_scores),
        cmocka_unit_test(test_attn_core_window_ring),
        cmocka_unit_test(test_attn_core_groups),
        cmocka_unit_test(test_attn_core_queries),
    };
    return th_exit_code(cmocka_run_group_tests(tests, NULL, NULL));
}
