/* test_cache_policy: the expert cache policies (common/cache/cache_policy.h) and the trace
 * replay (cache_replay.h) on traces worked out by hand (hits, misses and victims), and Belady's
 * bound: opt's misses equal an exhaustive search's minimum on small traces, and lfu, lru and pin
 * never miss less than opt on random and looping traces. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cache/cache_policy.h"
#include "cache/cache_replay.h"

static cache_policy *s_new(cache_policy_kind kind, int n, double half_life) {
    cache_policy *p = NULL;
    stp_err err = {0};
    cache_policy_config c = {.kind = kind, .n_entries = n, .half_life = half_life};
    if (cache_policy_new(&p, &c, &err)) fail_msg("%s", err.msg);
    return p;
}

/* Misses of a replay of text (n_expert experts a layer). */
static long s_misses(const char *text, int n_expert, const char *policy, int frames, int warmup,
                     double half_life) {
    cache_trace t;
    stp_err err = {0};
    if (cache_trace_parse(&t, text, n_expert, &err)) fail_msg("%s", err.msg);
    cache_replay_opts o = {
        .policy = policy, .frames = frames, .half_life = half_life, .warmup = warmup};
    cache_replay_result r;
    int rc = cache_replay(&t, &o, &r, &err);
    cache_trace_fini(&t);
    if (rc) fail_msg("%s", err.msg);
    return (long)r.misses;
}

static void test_cache_policy_lru_victim_by_hand(void **st) {
    (void)st;
    cache_policy *p = s_new(CACHE_POLICY_LRU, 4, 0);
    const int32_t c3[] = {0, 1, 2};
    for (int e = 0; e < 3; e++) { /* uses 0, 1, 2 at ticks 1, 2, 3 */
        cache_policy_tick(p);
        cache_policy_touch(p, e);
    }
    assert_int_equal(cache_policy_victim(p, c3, 3), 0);
    cache_policy_tick(p);
    cache_policy_touch(p, 0); /* 0 is the newest now: 1 goes */
    assert_int_equal(cache_policy_victim(p, c3, 3), 1);
    assert_int_equal(cache_policy_last_use(p, 0), 4);
    assert_true(cache_policy_score(p, 0) == 0.0);
    /* a never-used entry (3) is older than all; no candidate: -1 */
    const int32_t c4[] = {2, 3, 1};
    assert_int_equal(cache_policy_victim(p, c4, 3), 1);
    assert_int_equal(cache_policy_victim(p, c4, 0), -1);
    cache_policy_destroy(&p);
    assert_null(p);
    cache_policy_destroy(&p); /* (NULL is fine) */
}

static void test_cache_policy_lfu_decay_by_hand(void **st) {
    (void)st;
    /* half-life 1 tick: 0 used at ticks 1 and 2 -> 1 * 1/2 + 1 = 1.5 at tick 2; 1 used at 2 -> 1 */
    cache_policy *p = s_new(CACHE_POLICY_LFU, 3, 1.0);
    cache_policy_tick(p);
    cache_policy_touch(p, 0);
    cache_policy_tick(p);
    cache_policy_touch(p, 0);
    cache_policy_touch(p, 1);
    assert_float_equal(cache_policy_score(p, 0), 1.5, 1e-12);
    assert_float_equal(cache_policy_score(p, 1), 1.0, 1e-12);
    cache_policy_tick(p); /* tick 3: 0.75 and 0.5 */
    assert_float_equal(cache_policy_score(p, 0), 0.75, 1e-12);
    assert_float_equal(cache_policy_score(p, 1), 0.5, 1e-12);
    const int32_t c[] = {0, 1};
    assert_int_equal(cache_policy_victim(p, c, 2), 1);
    /* three ticks later 1 used once more: 0.5/8 + 1 = 1.0625 against 0.75/8: 0 goes */
    for (int i = 0; i < 3; i++)
        cache_policy_tick(p);
    cache_policy_touch(p, 1);
    assert_float_equal(cache_policy_score(p, 1), 1.0625, 1e-12);
    assert_int_equal(cache_policy_victim(p, c, 2), 0);
    /* never used: score 0, goes first */
    const int32_t c3[] = {0, 1, 2};
    assert_int_equal(cache_policy_victim(p, c3, 3), 2);
    cache_policy_destroy(&p);
}

static void test_cache_policy_ties(void **st) {
    (void)st;
    /* equal counts: the older last use goes; equal in everything: the first candidate */
    cache_policy *p = s_new(CACHE_POLICY_LFU, 4, 1e12);
    cache_policy_tick(p);
    cache_policy_touch(p, 2);
    cache_policy_touch(p, 3);
    cache_policy_tick(p);
    cache_policy_touch(p, 1);
    const int32_t a[] = {1, 2, 3}, b[] = {3, 2};
    assert_int_equal(cache_policy_victim(p, a, 3), 1); /* 2: count 1 like the others, older */
    assert_int_equal(cache_policy_victim(p, b, 2), 0); /* 3 and 2 tie in everything */
    cache_policy_destroy(&p);
}

static void test_cache_policy_parse_and_config(void **st) {
    (void)st;
    cache_policy_kind k = CACHE_POLICY_LFU;
    stp_err err = {0};
    assert_int_equal(cache_policy_parse("lru", &k, &err), 0);
    assert_int_equal(k, CACHE_POLICY_LRU);
    assert_int_equal(cache_policy_parse("lfu", &k, &err), 0);
    assert_int_equal(k, CACHE_POLICY_LFU);
    assert_int_equal(cache_policy_parse("arc", &k, &err), STP_EINVAL);
    assert_non_null(strstr(err.msg, "lru or lfu"));
    assert_string_equal(cache_policy_name(CACHE_POLICY_LRU), "lru");
    assert_string_equal(cache_policy_name(CACHE_POLICY_LFU), "lfu");
    cache_policy *p = NULL;
    cache_policy_config bad = {.kind = CACHE_POLICY_LFU, .n_entries = 4, .half_life = 0};
    assert_int_equal(cache_policy_new(&p, &bad, &err), STP_EINVAL);
    assert_null(p);
}

static void test_cache_policy_replay_by_hand(void **st) {
    (void)st;
    /* one layer of 4 experts, one expert a decision, 2 frames; uses 0 1 2 0 1 2.
     * lru misses all 6. lfu (half-life 32 tokens): 2 evicts 0 (2^(-2/32) < 2^(-1/32)), 0 evicts
     * 1, 1 evicts 2, 2 misses: all 6. Belady: 0 and 1 miss; 2 evicts 1 (next used at 5, 0 at
     * 4); 0 hits; 1 evicts 0 (never again; 2 is used at 6); 2 hits: 4 misses. */
    const char *t = "0 0\n0 1\n0 2\n0 0\n0 1\n0 2\n";
    assert_int_equal(s_misses(t, 4, "lru", 2, 0, 0), 6);
    assert_int_equal(s_misses(t, 4, "lfu", 2, 0, 0), 6);
    assert_int_equal(s_misses(t, 4, "opt", 2, 0, 0), 4);
    /* a hot expert with cold ones between, 2 frames, no decay: 0 0 0 1 2 0 3 1 0.
     * lru: 0; 1; 2 evicts 0; 0 evicts 1; 3 evicts 2; 1 evicts 0; 0 evicts 3: 7 misses.
     * lfu: 0; 1; 2 evicts 1 (count 1 < 3); 0 hits; 3 evicts 2; 1 evicts 3; 0 hits: 5.
     * opt: 0; 1; 2 evicts 1 (next at 8, 0 at 6); 0 hits; 3 evicts 2 (never again); 1 evicts
     * 3; 0 hits: 5. */
    const char *t2 = "0 0\n0 0\n0 0\n0 1\n0 2\n0 0\n0 3\n0 1\n0 0\n";
    assert_int_equal(s_misses(t2, 4, "lru", 2, 0, 0), 7);
    assert_int_equal(s_misses(t2, 4, "lfu", 2, 0, 1e9), 5);
    assert_int_equal(s_misses(t2, 4, "opt", 2, 0, 0), 5);
    /* warm-up: the first 3 tokens are replayed but not counted */
    assert_int_equal(s_misses(t, 4, "lru", 2, 3, 0), 3);
    /* a decision's own experts never evict each other */
    assert_int_equal(s_misses("0 0 1\n0 0 1\n", 2, "lru", 2, 0, 0), 2);
    /* two layers: entries are layer * X + expert, a token is a run starting at layer 0:
     * 4 frames hold both tokens' experts */
    assert_int_equal(s_misses("0 0 1\n1 0 1\n0 0 1\n1 0 1\n", 2, "lru", 4, 0, 0), 4);
    assert_int_equal(s_misses("0 0 1\n1 0 1\n0 0 1\n1 0 1\n", 2, "lru", 2, 0, 0), 8);
}

static void test_cache_policy_replay_errors(void **st) {
    (void)st;
    cache_trace t;
    stp_err err = {0};
    assert_int_equal(cache_trace_parse(&t, "0 1\n0 x\n", 0, &err), STP_EFORMAT);
    assert_non_null(strstr(err.msg, "line 2"));
    assert_int_equal(cache_trace_parse(&t, "0 1\n0 4\n", 4, &err), STP_EFORMAT);
    assert_int_equal(cache_trace_parse(&t, "\n0 1 3\n\n1 2\n0 0\n", 0, &err), 0);
    assert_int_equal(t.n_dec, 3);
    assert_int_equal(t.n_tok, 2);
    assert_int_equal(t.n_layer, 2);
    assert_int_equal(t.n_expert, 4);
    assert_int_equal(t.ent[2], 1 * 4 + 2);
    cache_replay_opts o = {.policy = "lru", .frames = 1};
    cache_replay_result r;
    assert_int_equal(cache_replay(&t, &o, &r, &err), STP_ERANGE); /* 2 experts, 1 frame */
    o.policy = "clock";
    o.frames = 4;
    assert_int_equal(cache_replay(&t, &o, &r, &err), STP_EINVAL);
    cache_trace_fini(&t);
}

/* ---- Belady's bound ---- */

/* The fewest misses any eviction choices give (one entry a decision): exhaustive search. */
static int s_min_misses(const int *seq, int n, int i, int *res, int n_res, int frames) {
    if (i == n) return 0;
    for (int k = 0; k < n_res; k++)
        if (res[k] == seq[i]) return s_min_misses(seq, n, i + 1, res, n_res, frames);
    if (n_res < frames) {
        res[n_res] = seq[i];
        int m = 1 + s_min_misses(seq, n, i + 1, res, n_res + 1, frames);
        return m;
    }
    int best = 1 << 30;
    for (int k = 0; k < n_res; k++) {
        int keep = res[k];
        res[k] = seq[i];
        int m = 1 + s_min_misses(seq, n, i + 1, res, n_res, frames);
        res[k] = keep;
        if (m < best) best = m;
    }
    return best;
}

static void test_cache_policy_opt_is_the_minimum(void **st) {
    (void)st;
    unsigned seed = 11;
    for (int trial = 0; trial < 40; trial++) {
        int seq[11], n = 11, frames = 2 + trial % 2, res[4];
        char text[256];
        size_t len = 0;
        for (int i = 0; i < n; i++) {
            seq[i] = (int)((seed = seed * 1103515245u + 12345u) >> 16) % 5;
            len += (size_t)snprintf(text + len, sizeof text - len, "0 %d\n", seq[i]);
        }
        int best = s_min_misses(seq, n, 0, res, 0, frames);
        assert_int_equal(s_misses(text, 5, "opt", frames, 0, 0), best);
        assert_true(s_misses(text, 5, "lru", frames, 0, 0) >= best);
        assert_true(s_misses(text, 5, "lfu", frames, 0, 0) >= best);
    }
}

static void test_cache_policy_online_not_below_opt(void **st) {
    (void)st;
    /* random skewed traces: 4 layers of 8 experts, 2 a decision, half from a hot 3 */
    unsigned seed = 7;
    static char text[1 << 16];
    for (int trial = 0; trial < 6; trial++) {
        size_t len = 0;
        for (int tok = 0; tok < 80; tok++)
            for (int layer = 0; layer < 4; layer++) {
                int span = ((seed = seed * 1103515245u + 12345u) >> 16) % 2 ? 8 : 3;
                int a = (int)((seed = seed * 1103515245u + 12345u) >> 16) % span, b;
                do
                    b = (int)((seed = seed * 1103515245u + 12345u) >> 16) % span;
                while (b == a);
                len += (size_t)snprintf(text + len, sizeof text - len, "%d %d %d\n", layer,
                                        a < b ? a : b, a < b ? b : a);
            }
        for (int frames = 8; frames <= 24; frames += 8) {
            long opt = s_misses(text, 8, "opt", frames, 4, 0);
            const char *pols[] = {"lru", "lfu", "pin"};
            for (int k = 0; k < 3; k++)
                assert_true(s_misses(text, 8, pols[k], frames, 4, 2) >= opt);
            assert_true(opt > 0);
        }
    }
    /* a loop over 5 experts in 4 frames: lru misses every use, opt about one in four */
    size_t len = 0;
    for (int i = 0; i < 100; i++)
        len += (size_t)snprintf(text + len, sizeof text - len, "0 %d\n", i % 5);
    assert_int_equal(s_misses(text, 5, "lru", 4, 0, 0), 100);
    long opt = s_misses(text, 5, "opt", 4, 0, 0);
    assert_true(opt >= 5 && opt <= 5 + 96 / 3);
    assert_true(s_misses(text, 5, "lfu", 4, 0, 0) >= opt);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_cache_policy_lru_victim_by_hand),
        cmocka_unit_test(test_cache_policy_lfu_decay_by_hand),
        cmocka_unit_test(test_cache_policy_ties),
        cmocka_unit_test(test_cache_policy_parse_and_config),
        cmocka_unit_test(test_cache_policy_replay_by_hand),
        cmocka_unit_test(test_cache_policy_replay_errors),
        cmocka_unit_test(test_cache_policy_opt_is_the_minimum),
        cmocka_unit_test(test_cache_policy_online_not_below_opt),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
