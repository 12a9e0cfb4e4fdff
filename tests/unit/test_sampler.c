/* test_sampler: greedy argmax (ties to the lowest id), the filters (top-k, top-p, min-p),
 * temperature, the repetition/presence/frequency penalties and seeded determinism. Statistical
 * checks draw a few thousand tokens with a fixed seed, with tolerances of > 5 sigma. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <string.h>

#include "model/sampler.h"

static sampler *s_new(const sampler_params *p, int n_vocab) {
    sampler *s = NULL;
    stp_err err = {0};
    if (sampler_new(&s, p, n_vocab, &err)) fail_msg("%s", err.msg);
    return s;
}

/* Draws n tokens from fixed logits (copied each time); counts per id. */
static void s_histogram(sampler *s, const float *logits, int V, int n, int *count) {
    float tmp[64];
    memset(count, 0, sizeof(int) * V);
    for (int i = 0; i < n; i++) {
        memcpy(tmp, logits, sizeof(float) * V);
        int32_t id = sampler_sample(s, tmp);
        assert_true(id >= 0 && id < V);
        count[id]++;
    }
}

static void test_sampler_argmax_ties_lowest(void **state) {
    (void)state;
    const float a[] = {1, 3, 2, 3, 3};
    assert_int_equal(sampler_argmax(a, 5), 1);
    const float b[] = {0, 0, 0, 0};
    assert_int_equal(sampler_argmax(b, 4), 0);
    const float c[] = {-5, -4, -3, -2};
    assert_int_equal(sampler_argmax(c, 4), 3);
    const float d[] = {7};
    assert_int_equal(sampler_argmax(d, 1), 0);
    const float e[] = {-INFINITY, -1e30f, -INFINITY};
    assert_int_equal(sampler_argmax(e, 3), 1);
    /* against the plain loop on long rows: the maximum in the tail past the last 8, twice,
     * -0 beside +0, NaNs (skipped; a NaN first logit gives 0) */
    enum { N = 1003 };
    float v[N];
    uint64_t x = 7;
    for (int t = 0; t < 6; t++) {
        for (int i = 0; i < N; i++) {
            x = x * 6364136223846793005ULL + 1442695040888963407ULL;
            v[i] = (float)((int)(x >> 40) % 1000) / 10.0f - 50.0f;
        }
        if (t == 1) v[N - 1] = 100.0f, v[N - 2] = 100.0f;
        if (t == 2) v[17] = NAN, v[300] = 200.0f, v[301] = 200.0f;
        if (t == 3) v[0] = NAN;
        if (t == 4) v[5] = 300.0f, v[9] = -0.0f;
        if (t == 5)
            for (int i = 0; i < N; i++)
                v[i] = i % 2 ? -0.0f : 0.0f;
        int32_t best = 0;
        for (int i = 1; i < N; i++)
            if (v[i] > v[best]) best = i;
        assert_int_equal(sampler_argmax(v, N), best);
    }
}

static void test_sampler_greedy_default(void **state) {
    (void)state;
    sampler_params p;
    sampler_params_default(&p);
    assert_true(p.temperature <= 0.0f);
    sampler *s = s_new(&p, 6);
    float l[] = {0.5f, 2.0f, -1.0f, 2.0f, 1.9f, 0.0f};
    for (int i = 0; i < 5; i++)
        assert_int_equal(sampler_sample(s, l), 1);
    sampler_accept(s, 1); /* penalties are off by default: still 1 */
    assert_int_equal(sampler_sample(s, l), 1);
    const float want[] = {0.5f, 2.0f, -1.0f, 2.0f, 1.9f, 0.0f};
    assert_memory_equal(l, want, sizeof want); /* logits untouched */
    sampler_destroy(&s);
    assert_null(s);
    sampler_destroy(&s);
}

static void test_sampler_top_k_1_is_greedy(void **state) {
    (void)state;
    sampler_params p;
    sampler_params_default(&p);
    p.temperature = 1.5f;
    p.top_k = 1;
    sampler *s = s_new(&p, 5);
    const float l[] = {1.0f, 4.0f, 4.0f, 3.9f, 0.0f};
    int count[5];
    s_histogram(s, l, 5, 500, count);
    assert_int_equal(count[1], 500); /* tie 1/2 resolved to the lowest id */
    sampler_destroy(&s);
}

static void test_sampler_seeded_determinism(void **state) {
    (void)state;
    sampler_params p;
    sampler_params_default(&p);
    p.temperature = 1.0f;
    p.seed = 1234;
    float l[16];
    for (int i = 0; i < 16; i++)
        l[i] = (float)(i % 5) * 0.3f;
    sampler *a = s_new(&p, 16), *b = s_new(&p, 16);
    p.seed = 1235;
    sampler *c = s_new(&p, 16);
    int differ = 0;
    for (int i = 0; i < 300; i++) {
        float la[16], lb[16], lc[16];
        memcpy(la, l, sizeof l);
        memcpy(lb, l, sizeof l);
        memcpy(lc, l, sizeof l);
        int32_t x = sampler_sample(a, la), y = sampler_sample(b, lb), z = sampler_sample(c, lc);
        assert_int_equal(x, y);
        differ += x != z;
    }
    assert_true(differ > 100); /* another seed gives another sequence */
    sampler_destroy(&a);
    sampler_destroy(&b);
    sampler_destroy(&c);
}

static void test_sampler_temperature_distribution(void **state) {
    (void)state;
    sampler_params p;
    sampler_params_default(&p);
    p.temperature = 1.0f;
    p.seed = 99;
    const float probs[] = {0.5f, 0.3f, 0.2f};
    float l[3];
    for (int i = 0; i < 3; i++)
        l[i] = logf(probs[i]);
    sampler *s = s_new(&p, 3);
    int count[3];
    const int N = 20000;
    s_histogram(s, l, 3, N, count);
    for (int i = 0; i < 3; i++)
        assert_float_equal((double)count[i] / N, probs[i], 0.02);
    sampler_destroy(&s);

    /* T = 2 on logits {1, 0}: p0 = 1 / (1 + e^-0.5) = 0.6225 */
    p.temperature = 2.0f;
    s = s_new(&p, 2);
    const float l2[] = {1.0f, 0.0f};
    s_histogram(s, l2, 2, N, count);
    assert_float_equal((double)count[0] / N, 1.0 / (1.0 + exp(-0.5)), 0.02);
    sampler_destroy(&s);

    /* a low temperature concentrates on the top token */
    p.temperature = 0.05f;
    s = s_new(&p, 2);
    const float l3[] = {0.0f, 1.0f};
    s_histogram(s, l3, 2, 2000, count);
    assert_int_equal(count[1], 2000);
    sampler_destroy(&s);
}

static void test_sampler_top_k(void **state) {
    (void)state;
    sampler_params p;
    sampler_params_default(&p);
    p.temperature = 1.0f;
    p.top_k = 2;
    sampler *s = s_new(&p, 5);
    const float l[] = {0.0f, 1.0f, 0.9f, 1.1f, 0.5f}; /* top 2: ids 3, 1 */
    int count[5];
    s_histogram(s, l, 5, 4000, count);
    assert_int_equal(count[3] + count[1], 4000);
    assert_true(count[3] > 1600 && count[1] > 1400);
    sampler_destroy(&s);
}

static void test_sampler_top_p(void **state) {
    (void)state;
    sampler_params p;
    sampler_params_default(&p);
    p.temperature = 1.0f;
    p.top_p = 0.75f; /* probabilities 0.5, 0.3, 0.15, 0.05: keeps the first two */
    const float probs[] = {0.15f, 0.5f, 0.05f, 0.3f};
    float l[4];
    for (int i = 0; i < 4; i++)
        l[i] = logf(probs[i]);
    sampler *s = s_new(&p, 4);
    int count[4];
    s_histogram(s, l, 4, 5000, count);
    assert_int_equal(count[0] + count[2], 0);
    assert_float_equal((double)count[1] / 5000, 0.5 / 0.8, 0.03); /* renormalised */
    sampler_destroy(&s);

    /* top_p tiny: only the best survives */
    p.top_p = 0.01f;
    s = s_new(&p, 4);
    s_histogram(s, l, 4, 500, count);
    assert_int_equal(count[1], 500);
    sampler_destroy(&s);
}

static void test_sampler_min_p(void **state) {
    (void)state;
    sampler_params p;
    sampler_params_default(&p);
    p.temperature = 1.0f;
    p.min_p = 0.2f; /* threshold 0.1: 0.5, 0.3, 0.15 stay, 0.05 goes */
    const float probs[] = {0.05f, 0.3f, 0.5f, 0.15f};
    float l[4];
    for (int i = 0; i < 4; i++)
        l[i] = logf(probs[i]);
    sampler *s = s_new(&p, 4);
    int count[4];
    s_histogram(s, l, 4, 5000, count);
    assert_int_equal(count[0], 0);
    assert_true(count[3] > 500); /* 0.15 / 0.95 = 16% */
    sampler_destroy(&s);
}

static void test_sampler_repeat_penalty(void **state) {
    (void)state;
    sampler_params p;
    sampler_params_default(&p);
    p.repeat_penalty = 2.0f;
    sampler *s = s_new(&p, 4);
    sampler_accept(s, 0);
    sampler_accept(s, 0); /* twice: still divided once */
    sampler_accept(s, 2);
    float l[] = {2.0f, 1.5f, -1.0f, 0.0f};
    assert_int_equal(sampler_sample(s, l), 1);
    assert_float_equal(l[0], 1.0f, 0.0f);  /* positive: divided */
    assert_float_equal(l[1], 1.5f, 0.0f);  /* not seen */
    assert_float_equal(l[2], -2.0f, 0.0f); /* negative: multiplied */
    assert_float_equal(l[3], 0.0f, 0.0f);
    /* the counts survive a sample (the marking is undone) */
    float l2[] = {2.0f, 1.5f, -1.0f, 0.0f};
    sampler_sample(s, l2);
    assert_float_equal(l2[0], 1.0f, 0.0f);
    assert_float_equal(l2[2], -2.0f, 0.0f);
    sampler_reset(s);
    float l3[] = {2.0f, 1.5f, -1.0f, 0.0f};
    assert_int_equal(sampler_sample(s, l3), 0);
    assert_float_equal(l3[0], 2.0f, 0.0f);
    sampler_destroy(&s);
}

static void test_sampler_presence_frequency_penalty(void **state) {
    (void)state;
    sampler_params p;
    sampler_params_default(&p);
    p.presence_penalty = 0.5f;
    p.frequency_penalty = 0.25f;
    sampler *s = s_new(&p, 3);
    sampler_accept(s, 1);
    sampler_accept(s, 1);
    sampler_accept(s, 1);
    sampler_accept(s, 2);
    float l[] = {0.0f, 3.0f, 1.0f};
    sampler_sample(s, l);
    assert_float_equal(l[0], 0.0f, 0.0f);
    assert_float_equal(l[1], 3.0f - (3 * 0.25f + 0.5f), 1e-6f);
    assert_float_equal(l[2], 1.0f - (1 * 0.25f + 0.5f), 1e-6f);
    sampler_destroy(&s);
}

static void test_sampler_penalty_window(void **state) {
    (void)state;
    sampler_params p;
    sampler_params_default(&p);
    p.repeat_penalty = 4.0f;
    p.penalty_last_n = 2;
    sampler *s = s_new(&p, 4);
    sampler_accept(s, 0);
    sampler_accept(s, 1);
    sampler_accept(s, 2);  /* 0 leaves the window */
    sampler_accept(s, 99); /* out of range: ignored */
    sampler_accept(s, -1);
    float l[] = {4.0f, 4.0f, 4.0f, 4.0f};
    sampler_sample(s, l);
    assert_float_equal(l[0], 4.0f, 0.0f);
    assert_float_equal(l[1], 1.0f, 0.0f);
    assert_float_equal(l[2], 1.0f, 0.0f);
    assert_float_equal(l[3], 4.0f, 0.0f);
    sampler_destroy(&s);

    p.penalty_last_n = 0; /* off */
    s = s_new(&p, 4);
    sampler_accept(s, 0);
    float l2[] = {4.0f, 1.0f, 1.0f, 1.0f};
    assert_int_equal(sampler_sample(s, l2), 0);
    assert_float_equal(l2[0], 4.0f, 0.0f);
    sampler_destroy(&s);
}

static void test_sampler_ring_wraps_many_times(void **state) {
    (void)state;
    sampler_params p;
    sampler_params_default(&p);
    p.frequency_penalty = 1.0f;
    p.penalty_last_n = 5;
    sampler *s = s_new(&p, 8);
    for (int i = 0; i < 1003; i++)
        sampler_accept(s, i % 8); /* window: 6 7 0 1 2 (i=998..1002) */
    float l[8] = {0};
    sampler_sample(s, l);
    const float want[8] = {-1, -1, -1, 0, 0, 0, -1, -1};
    for (int i = 0; i < 8; i++)
        assert_float_equal(l[i], want[i], 0.0f);
    sampler_destroy(&s);
}

/* A large vocabulary without top-k sorts its candidates with a radix sort, a top-k heap's with
 * qsort: both must give the same order (logit descending, ties by id, -0 == +0), hence the same
 * draws; without top-p both draw in id order, again the same draws. Sampler A keeps every token but
 * one far below (no filter); B takes the top V - 1 of the same logits (the same set, through the
 * heap). Many ties, zeros of both signs; with and without top-p. */
static void test_sampler_large_vocab_order(void **state) {
    (void)state;
    enum { V = 20000 };
    static float logits[V], tmp[V];
    uint64_t x = 12345;
    for (int i = 0; i < V; i++) {
        x = x * 6364136223846793005ull + 1442695040888963407ull;
        const int r = (int)(x >> 33) % 60;
        logits[i] = r == 0 ? -0.0f : r == 1 ? 0.0f : (float)(r - 30) / 8.0f; /* ties */
    }
    logits[777] = -1e30f; /* below every filter-less floor; the heap's one left out */
    for (int top_p = 0; top_p < 2; top_p++) {
        sampler_params p;
        sampler_params_default(&p);
        p.temperature = 0.8f;
        p.top_p = top_p ? 0.9f : 1.0f;
        p.seed = 99;
        sampler *a = s_new(&p, V);
        p.top_k = V - 1;
        sampler *b = s_new(&p, V);
        for (int i = 0; i < 300; i++) {
            memcpy(tmp, logits, sizeof tmp);
            const int32_t ia = sampler_sample(a, tmp);
            memcpy(tmp, logits, sizeof tmp);
            const int32_t ib = sampler_sample(b, tmp);
            if (ia != ib)
                fail_msg("draw %d (top_p %.1f): %d without top-k, %d with", i, p.top_p, ia, ib);
            assert_int_not_equal(ia, 777);
        }
        sampler_destroy(&a);
        sampler_destroy(&b);
    }
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_sampler_argmax_ties_lowest),
        cmocka_unit_test(test_sampler_greedy_default),
        cmocka_unit_test(test_sampler_top_k_1_is_greedy),
        cmocka_unit_test(test_sampler_seeded_determinism),
        cmocka_unit_test(test_sampler_temperature_distribution),
        cmocka_unit_test(test_sampler_top_k),
        cmocka_unit_test(test_sampler_top_p),
        cmocka_unit_test(test_sampler_min_p),
        cmocka_unit_test(test_sampler_repeat_penalty),
        cmocka_unit_test(test_sampler_presence_frequency_penalty),
        cmocka_unit_test(test_sampler_penalty_window),
        cmocka_unit_test(test_sampler_ring_wraps_many_times),
        cmocka_unit_test(test_sampler_large_vocab_order),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
