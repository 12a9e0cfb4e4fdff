/* test_engine: engine_eval's contract on the tiny F32 models: batched prefill equals
 * token-by-token decoding (1e-5), micro-batch chunking equals one batch, reset + re-eval and
 * 1 vs 2 threads reproduce logits bit for bit, f16 and q8_0 KV caches stay within measured bounds
 * of the f32 cache, context overflow and bad ids fail with
 * STP_ERANGE changing nothing, and sliding-window layers (a copy of the hybrid model with a
 * window of 5) give the same logits whatever the KV ring size. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "model/engine.h"
#include "th_gguf.h"

#define DENSE "tiny-dense-attn-f32.gguf"
#define HYBRID "tiny-hybrid-attn-f32.gguf"
#define NTOK 40
#define BOUND_Q8 8.0f /* measured 4.9 (f16: 0.046) */

static engine *s_engine(const model *m, int threads, int n_ctx, int n_ubatch) {
    engine *e = NULL;
    stp_err err = {0};
    engine_params p = {.n_threads = threads, .n_ctx = n_ctx, .n_ubatch = n_ubatch};
    if (engine_new(&e, m, &p, &err)) fail_msg("%s", err.msg);
    return e;
}

/* Deterministic token ids in range. */
static void s_tokens(int32_t *t, int n, int V, uint32_t seed) {
    for (int i = 0; i < n; i++) {
        seed = seed * 1103515245u + 12345u;
        t[i] = (int32_t)((seed >> 8) % (uint32_t)V);
    }
}

/* All-position logits of n tokens in one eval. */
static float *s_batched(engine *e, const int32_t *t, int n, int V) {
    float *l = malloc(sizeof(float) * (size_t)n * V);
    stp_err err = {0};
    if (engine_eval(e, t, n, l, true, &err)) fail_msg("%s", err.msg);
    return l;
}

/* Same, one token per eval (last-token logits). */
static float *s_stepwise(engine *e, const int32_t *t, int n, int V) {
    float *l = malloc(sizeof(float) * (size_t)n * V);
    stp_err err = {0};
    for (int i = 0; i < n; i++)
        if (engine_eval(e, t + i, 1, l + (size_t)i * V, false, &err)) fail_msg("%s", err.msg);
    return l;
}

static float s_max_diff(const float *a, const float *b, size_t n) {
    float d = 0;
    for (size_t i = 0; i < n; i++) {
        float x = fabsf(a[i] - b[i]);
        if (!(x <= d)) d = x; /* NaN propagates */
    }
    return d;
}

/* got and want bit for bit, else the test fails saying what differs and by how much. */
static void s_same_bits(const char *file, const char *what, const float *got, const float *want,
                        size_t n) {
    if (memcmp(got, want, sizeof(float) * n))
        fail_msg("%s: %s (max %g)", file, what, s_max_diff(got, want, n));
}

static void s_batched_vs_stepwise(const char *file) {
    model *m = th_model_open(file);
    const int V = m->cfg.n_vocab;
    int32_t t[NTOK];
    s_tokens(t, NTOK, V, 1);
    engine *a = s_engine(m, 2, 64, 0), *b = s_engine(m, 2, 64, 0);
    float *la = s_batched(a, t, NTOK, V), *lb = s_stepwise(b, t, NTOK, V);
    float d = s_max_diff(la, lb, (size_t)NTOK * V);
    if (!(d <= 1e-5f)) fail_msg("%s: batched vs token-by-token max diff %g", file, d);
    assert_int_equal(engine_n_past(a), NTOK);
    assert_int_equal(engine_n_past(b), NTOK);
    assert_int_equal(engine_get_stats(a)->tokens, NTOK);
    free(la);
    free(lb);
    engine_destroy(&a);
    engine_destroy(&b);
    assert_null(a);
    model_close(&m);
}

/* A float16 KV cache (--cache-type f16): half the bytes; the logits of 145 tokens on the golden
 * dense model stay within 0.1 of the float32 cache's (its golden "mixed" prompt: 0.046, where
 * llama.cpp's own F16 cache moves them 0.044, ../shared/golden README section 3), and batched
 * evaluation still equals token-by-token. */
static void test_engine_f16_cache(void **state) {
    (void)state;
    model *m = th_model_open(DENSE);
    const int V = m->cfg.n_vocab, N = 145;
    int32_t t[145];
    s_tokens(t, N, V, 7);
    engine *e = NULL, *h = NULL, *h2 = NULL;
    stp_err err = {0};
    engine_params p = {.n_threads = 2, .n_ctx = 256};
    if (engine_new(&e, m, &p, &err)) fail_msg("%s", err.msg);
    p.kv_type = KV_F16;
    if (engine_new(&h, m, &p, &err) || engine_new(&h2, m, &p, &err)) fail_msg("%s", err.msg);
    assert_int_equal(engine_kv_bytes(h) * 2, engine_kv_bytes(e));
    float *l32 = s_batched(e, t, N, V), *l16 = s_batched(h, t, N, V),
          *s16 = s_stepwise(h2, t, N, V);
    float d = s_max_diff(l32, l16, (size_t)N * V);
    if (!(d > 0 && d <= 0.1f)) fail_msg("f16 vs f32 cache: max logit diff %g", d);
    d = s_max_diff(l16, s16, (size_t)N * V);
    if (!(d <= 1e-5f)) fail_msg("f16 cache: batched vs token-by-token max diff %g", d);
    free(l32), free(l16), free(s16);
    engine_destroy(&e), engine_destroy(&h), engine_destroy(&h2);
    model_close(&m);
}

/* A Q8_0 KV cache (--cache-type q8_0): 34/128 of the f32 cache's bytes; on 145 tokens of the
 * golden dense model the logits move from the f32 cache's by more than zero and less than the
 * bound (measured 4.9, where f16 moves them 0.046: Q8_0 keeps ~8 bits per value, and this random
 * model amplifies; the golden long prompts are test_kv_long's), and batched evaluation
 * still equals token-by-token. */
static void test_engine_q8_0_cache(void **state) {
    (void)state;
    model *m = th_model_open(DENSE);
    const int V = m->cfg.n_vocab, N = 145;
    int32_t t[145];
    s_tokens(t, N, V, 7);
    engine *e = NULL, *q = NULL, *q2 = NULL;
    stp_err err = {0};
    engine_params p = {.n_threads = 2, .n_ctx = 256};
    if (engine_new(&e, m, &p, &err)) fail_msg("%s", err.msg);
    p.kv_type = KV_Q8_0;
    if (engine_new(&q, m, &p, &err) || engine_new(&q2, m, &p, &err)) fail_msg("%s", err.msg);
    assert_int_equal(engine_kv_bytes(q) * 128, engine_kv_bytes(e) * 34);
    float *l32 = s_batched(e, t, N, V), *l8 = s_batched(q, t, N, V), *s8 = s_stepwise(q2, t, N, V);
    float d = s_max_diff(l32, l8, (size_t)N * V);
    if (!(d > 0 && d <= BOUND_Q8)) fail_msg("q8_0 vs f32 cache: max logit diff %g", d);
    d = s_max_diff(l8, s8, (size_t)N * V);
    if (!(d <= 1e-5f)) fail_msg("q8_0 cache: batched vs token-by-token max diff %g", d);
    free(l32), free(l8), free(s8);
    engine_destroy(&e), engine_destroy(&q), engine_destroy(&q2);
    model_close(&m);
}

static void test_engine_batched_equals_stepwise_dense(void **state) {
    (void)state;
    s_batched_vs_stepwise(DENSE);
}

static void test_engine_batched_equals_stepwise_hybrid(void **state) {
    (void)state;
    s_batched_vs_stepwise(HYBRID);
}

static void test_engine_ubatch_chunking(void **state) {
    (void)state;
    model *m = th_model_open(HYBRID);
    const int V = m->cfg.n_vocab;
    int32_t t[NTOK];
    s_tokens(t, NTOK, V, 2);
    engine *one = s_engine(m, 2, 64, 0);
    float *ref = s_batched(one, t, NTOK, V);
    const int ubs[] = {1, 3, 7, 16, NTOK - 1};
    for (size_t k = 0; k < sizeof ubs / sizeof ubs[0]; k++) {
        engine *e = s_engine(m, 2, 64, ubs[k]);
        float *l = s_batched(e, t, NTOK, V);
        float d = s_max_diff(ref, l, (size_t)NTOK * V);
        if (!(d <= 1e-5f)) fail_msg("n_ubatch %d: max diff %g vs one batch", ubs[k], d);
        /* last-token-only logits are the last row */
        engine_reset(e);
        float last[512];
        stp_err err = {0};
        assert_true(V <= 512);
        assert_int_equal(engine_eval(e, t, NTOK, last, false, &err), 0);
        assert_memory_equal(last, l + (size_t)(NTOK - 1) * V, sizeof(float) * V);
        free(l);
        engine_destroy(&e);
    }
    free(ref);
    engine_destroy(&one);
    model_close(&m);
}

static void test_engine_reset_reproduces(void **state) {
    (void)state;
    model *m = th_model_open(DENSE);
    const int V = m->cfg.n_vocab;
    int32_t t[NTOK], other[10];
    s_tokens(t, NTOK, V, 3);
    s_tokens(other, 10, V, 4);
    engine *e = s_engine(m, 2, 64, 0);
    float *a = s_batched(e, t, NTOK, V);
    engine_reset(e);
    assert_int_equal(engine_n_past(e), 0);
    float *junk = s_batched(e, other, 10, V); /* leaves stale KV entries behind */
    engine_reset(e);
    float *b = s_batched(e, t, NTOK, V);
    assert_memory_equal(a, b, sizeof(float) * NTOK * V);
    /* NULL logits are allowed and evaluate all the same */
    engine_reset(e);
    stp_err err = {0};
    assert_int_equal(engine_eval(e, t, NTOK - 1, NULL, false, &err), 0);
    float last[512];
    assert_int_equal(engine_eval(e, t + NTOK - 1, 1, last, false, &err), 0);
    float d = s_max_diff(last, a + (size_t)(NTOK - 1) * V, (size_t)V);
    assert_true(d <= 1e-5f);
    free(a);
    free(b);
    free(junk);
    engine_destroy(&e);
    model_close(&m);
}

static void s_threads_identical(const char *file) {
    model *m = th_model_open(file);
    const int V = m->cfg.n_vocab;
    int32_t t[NTOK];
    s_tokens(t, NTOK, V, 5);
    engine *e1 = s_engine(m, 1, 64, 0), *e2 = s_engine(m, 2, 64, 0), *e3 = s_engine(m, 3, 64, 0);
    float *a = s_batched(e1, t, NTOK, V), *b = s_batched(e2, t, NTOK, V),
          *c = s_batched(e3, t, NTOK, V);
    s_same_bits(file, "1 vs 2 threads differ", a, b, (size_t)(NTOK * V));
    s_same_bits(file, "1 vs 3 threads differ", a, c, (size_t)(NTOK * V));
    /* decode steps too */
    int32_t next[8];
    s_tokens(next, 8, V, 6);
    float *sa = s_stepwise(e1, next, 8, V), *sb = s_stepwise(e2, next, 8, V);
    s_same_bits(file, "decode 1 vs 2 threads differ", sa, sb, (size_t)(8 * V));
    free(a);
    free(b);
    free(c);
    free(sa);
    free(sb);
    engine_destroy(&e1);
    engine_destroy(&e2);
    engine_destroy(&e3);
    model_close(&m);
}

static void test_engine_threads_bit_exact_dense(void **state) {
    (void)state;
    s_threads_identical(DENSE);
}

static void test_engine_threads_bit_exact_hybrid(void **state) {
    (void)state;
    s_threads_identical(HYBRID);
}

static void test_engine_context_overflow(void **state) {
    (void)state;
    model *m = th_model_open(DENSE);
    const int V = m->cfg.n_vocab;
    int32_t t[16];
    s_tokens(t, 16, V, 7);
    engine *e = s_engine(m, 2, 16, 0), *ref = s_engine(m, 2, 16, 0);
    assert_int_equal(engine_n_ctx(e), 16);
    stp_err err = {0};
    float *l = malloc(sizeof(float) * 16 * V);
    assert_int_equal(engine_eval(e, t, 10, l, true, &err), 0);
    const float sentinel = 12345.0f;
    for (int i = 0; i < 16 * V; i++)
        l[i] = sentinel;
    assert_int_equal(engine_eval(e, t + 10, 7, l, true, &err), STP_ERANGE);
    assert_non_null(strstr(err.msg, "context"));
    assert_int_equal(engine_n_past(e), 10);
    for (int i = 0; i < 16 * V; i++)
        assert_true(l[i] == sentinel); /* logits untouched */
    assert_int_equal(engine_eval(e, t, 17, l, true, &err), STP_ERANGE);
    /* the sequence continues as if the failed calls never happened */
    assert_int_equal(engine_eval(e, t + 10, 6, l, true, &err), 0);
    assert_int_equal(engine_n_past(e), 16);
    float *r = s_batched(ref, t, 16, V);
    float d = s_max_diff(l, r + (size_t)10 * V, (size_t)6 * V);
    assert_true(d <= 1e-5f);
    /* full: even one token is refused */
    assert_int_equal(engine_eval(e, t, 1, l, false, &err), STP_ERANGE);
    assert_int_equal(engine_n_past(e), 16);
    free(l);
    free(r);
    engine_destroy(&e);
    engine_destroy(&ref);
    model_close(&m);
}

static void test_engine_bad_token_id(void **state) {
    (void)state;
    model *m = th_model_open(DENSE);
    const int V = m->cfg.n_vocab;
    engine *e = s_engine(m, 1, 32, 0);
    stp_err err = {0};
    int32_t good[3] = {1, 2, 3};
    float l[512];
    assert_int_equal(engine_eval(e, good, 3, l, false, &err), 0);
    int32_t bad1[3] = {1, V, 2};
    assert_int_equal(engine_eval(e, bad1, 3, l, false, &err), STP_ERANGE);
    assert_non_null(strstr(err.msg, "320"));
    assert_non_null(strstr(err.msg, "index 1"));
    int32_t bad2[2] = {-1, 0};
    assert_int_equal(engine_eval(e, bad2, 2, l, false, &err), STP_ERANGE);
    assert_int_equal(engine_n_past(e), 3);
    assert_int_equal(engine_get_stats(e)->tokens, 3);
    assert_int_equal(engine_eval(e, good, 0, l, false, &err), STP_EINVAL);
    assert_int_equal(engine_n_past(e), 3);
    engine_destroy(&e);
    model_close(&m);
}

static void test_engine_new_checks(void **state) {
    (void)state;
    model *m = th_model_open(DENSE);
    engine *e = NULL;
    stp_err err = {0};
    engine_params p = {.n_threads = 1, .n_ctx = 4097};
    assert_int_equal(engine_new(&e, m, &p, &err), STP_EINVAL);
    assert_null(e);
    p.n_ctx = 0; /* default: min(model, 4096) */
    assert_int_equal(engine_new(&e, m, &p, &err), 0);
    assert_int_equal(engine_n_ctx(e), 4096);
    assert_true(engine_kv_bytes(e) > 0);
    assert_true(engine_scratch_bytes(e) > 0);
    engine_destroy(&e);
    engine_destroy(&e);
    model_close(&m);
}

/* A copy of the hybrid model with attention.sliding_window = 5. */
static void test_engine_sliding_window_ring(void **state) {
    (void)state;
    char p[4096], src[4096];
    th_kv_edit kv[] = {{.key = "smallthinker.attention.sliding_window", .op = TH_KV_U32, .u32 = 5}};
    th_copy_opts o = {.kv = kv, .n_kv = 1};
    stp_err err = {0};
    th_tmp_path(p, sizeof p, "engine_swa5.gguf");
    if (th_gguf_copy(th_data_path(src, sizeof src, HYBRID), p, &o, &err)) fail_msg("%s", err.msg);
    model *m = NULL;
    if (model_open(&m, p, &err)) fail_msg("%s", err.msg);
    model *full = th_model_open(HYBRID);
    assert_int_equal(model_config_layer_window(&m->cfg, 1), 5);
    const int V = m->cfg.n_vocab;
    int32_t t[NTOK];
    s_tokens(t, NTOK, V, 8);
    /* n_ubatch = n_ctx: no ring (cap = n_ctx); 7: ring of 12; stepwise: ring of 6 */
    engine *flat = s_engine(m, 2, 64, 64), *ring = s_engine(m, 2, 64, 7),
           *step = s_engine(m, 2, 64, 1), *wide = s_engine(full, 2, 64, 0);
    float *lf = s_batched(flat, t, NTOK, V), *lr = s_batched(ring, t, NTOK, V),
          *ls = s_stepwise(step, t, NTOK, V), *lw = s_batched(wide, t, NTOK, V);
    float d1 = s_max_diff(lf, lr, (size_t)NTOK * V), d2 = s_max_diff(lf, ls, (size_t)NTOK * V);
    if (!(d1 <= 1e-5f)) fail_msg("window 5: ring (ubatch 7) vs flat max diff %g", d1);
    if (!(d2 <= 1e-5f)) fail_msg("window 5: stepwise vs flat max diff %g", d2);
    /* positions 0..4 see their whole past either way; later ones must differ */
    float early = s_max_diff(lf, lw, (size_t)5 * V);
    float late = s_max_diff(lf + (size_t)10 * V, lw + (size_t)10 * V, (size_t)(NTOK - 10) * V);
    if (!(early <= 1e-5f)) fail_msg("window 5 vs 4096 differ at positions < 5: %g", early);
    if (!(late > 1e-3f)) fail_msg("window 5 has no effect (max diff %g)", late);
    free(lf);
    free(lr);
    free(ls);
    free(lw);
    engine_destroy(&flat);
    engine_destroy(&ring);
    engine_destroy(&step);
    engine_destroy(&wide);
    model_close(&m);
    model_close(&full);
    unlink(p);
}

/* Synthetic 64-expert softmax model: batched == stepwise, and threads bit-exact. */
static void test_engine_synthetic_64_experts(void **state) {
    (void)state;
    char p[4096];
    stp_err err = {0};
    th_model_spec s = th_model_spec_small(64);
    s.n_expert_used = 6;
    s.untied = true;
    th_tmp_path(p, sizeof p, "engine_x64.gguf");
    if (th_model_write(p, &s, &err)) fail_msg("%s", err.msg);
    model *m = NULL;
    if (model_open(&m, p, &err)) fail_msg("%s", err.msg);
    assert_int_equal(m->cfg.gating, GATING_SOFTMAX);
    const int V = m->cfg.n_vocab;
    int32_t t[24];
    s_tokens(t, 24, V, 9);
    engine *a = s_engine(m, 1, 32, 0), *b = s_engine(m, 2, 32, 0);
    float *la = s_batched(a, t, 24, V), *lb = s_stepwise(b, t, 24, V);
    float d = s_max_diff(la, lb, (size_t)24 * V);
    if (!(d <= 1e-5f)) fail_msg("64 experts: batched vs stepwise %g", d);
    for (int i = 0; i < 24 * V; i++)
        assert_true(isfinite(la[i]));
    free(la);
    free(lb);
    engine_destroy(&a);
    engine_destroy(&b);
    model_close(&m);
    unlink(p);
}

/* Regression: a 1-head model with n_embd 1026 and no key_length derives head_dim 1026 >
 * STP_MAX_HEAD_DIM; it used to open and overflow the RoPE/attention stack arrays. It must be
 * refused at open. (Writes a 17 MB file.) */
static void test_engine_head_dim_over_max_refused(void **state) {
    (void)state;
    char p[4096];
    stp_err err = {0};
    th_model_spec s = th_model_spec_small(8);
    s.n_layer = 1;
    s.n_embd = 1026;
    s.n_head = 1;
    s.n_head_kv = 1;
    s.head_dim = 0; /* key_length absent */
    th_tmp_path(p, sizeof p, "engine_hd1026.gguf");
    if (th_model_write(p, &s, &err)) fail_msg("%s", err.msg);
    model *m = NULL;
    int rc = model_open(&m, p, &err);
    if (rc == 0) {
        engine *e = s_engine(m, 1, 8, 0);
        int32_t t[2] = {1, 2};
        float l[64];
        engine_eval(e, t, 2, l, false, &err); /* overflows the stack arrays */
        engine_destroy(&e);
        model_close(&m);
    }
    unlink(p);
    assert_int_equal(rc, STP_EFORMAT);
}

/* Several sequences in one engine_eval_batch: each sequence's logits equal, bit for bit, the
 * same tokens evaluated alone (Q4_0 models, whose batched matmul equals the matvec bit for bit),
 * whether its prompt is cut into chunks or not, with decode steps of other sequences beside it,
 * or its chunks taken a layer a call (engine_seq_eval.upto); and engine_seq_keep resumes a kept
 * prefix with the bits of evaluating it whole. */
static void s_batch_invariance(const char *file) {
    model *m = th_model_open(file);
    const int V = m->cfg.n_vocab;
    enum { NP = 29, NQ = 11 };
    int32_t p[NP], q[NQ];
    s_tokens(p, NP, V, 7);
    s_tokens(q, NQ, V, 8);
    stp_err err = {0};
    /* alone: p whole, then one more token; q whole */
    engine *a = s_engine(m, 2, 64, 0);
    float *lp = malloc(sizeof(float) * V), *lp2 = malloc(sizeof(float) * V),
          *lq = malloc(sizeof(float) * V), *got = malloc(sizeof(float) * V),
          *got2 = malloc(sizeof(float) * V);
    assert_int_equal(engine_eval(a, p, NP - 1, NULL, false, &err), 0);
    assert_int_equal(engine_eval(a, p + NP - 1, 1, lp, false, &err), 0);
    engine_reset(a);
    assert_int_equal(engine_eval(a, q, NQ, lq, false, &err), 0);
    engine_reset(a);
    assert_int_equal(engine_eval(a, p, NP, lp2, false, &err), 0);

    /* batched: sequence 1 takes q in chunks of 4 while sequence 0 takes p in chunks of 5 */
    engine *b = s_engine(m, 2, 64, 8);
    engine_params ep = {.n_threads = 2, .n_ctx = 64, .n_ubatch = 8, .n_seq = 3};
    engine_destroy(&b);
    if (engine_new(&b, m, &ep, &err)) fail_msg("%s", err.msg);
    assert_int_equal(engine_n_seq(b), 3);
    int ip = 0, iq = 0;
    while (ip < NP || iq < NQ) {
        engine_seq_eval be[2];
        int n = 0;
        int cp = NP - ip < 5 ? NP - ip : 5, cq = NQ - iq < 4 ? NQ - iq : 4;
        if (cp) be[n++] = (engine_seq_eval){0, p + ip, cp, ip + cp == NP ? got : NULL, 0, 0};
        if (cq) be[n++] = (engine_seq_eval){2, q + iq, cq, iq + cq == NQ ? got2 : NULL, 0, 0};
        if (engine_eval_batch(b, be, n, &err)) fail_msg("%s", err.msg);
        ip += cp, iq += cq;
    }
    assert_int_equal(engine_seq_n_past(b, 0), NP);
    assert_int_equal(engine_seq_n_past(b, 1), 0);
    assert_int_equal(engine_seq_n_past(b, 2), NQ);
    s_same_bits(file, "chunked p beside q differs from p alone", got, lp2, (size_t)V);
    s_same_bits(file, "chunked q beside p differs from q alone", got2, lq, (size_t)V);
    /* keep p's first NP-1 positions and evaluate its last token again */
    assert_int_equal(engine_seq_keep(b, 0, NP - 1), NP - 1);
    engine_seq_eval one = {0, p + NP - 1, 1, got, 0, 0};
    assert_int_equal(engine_eval_batch(b, &one, 1, &err), 0);
    s_same_bits(file, "kept prefix + last token differs", got, lp, (size_t)V);
    /* errors change nothing */
    engine_seq_eval twice[2] = {{0, p, 1, NULL, 0, 0}, {0, q, 1, NULL, 0, 0}};
    assert_int_equal(engine_eval_batch(b, twice, 2, &err), STP_EINVAL);
    engine_seq_eval bad = {3, p, 1, NULL, 0, 0};
    assert_int_equal(engine_eval_batch(b, &bad, 1, &err), STP_EINVAL);
    assert_int_equal(engine_seq_n_past(b, 0), NP);

    /* q in chunks of 4, each taken a layer a call (engine_seq_eval.upto), beside p a token a
     * call: the same bits as each alone */
    const int NL = m->cfg.n_layer;
    for (int i = 0; i < 3; i++)
        engine_seq_keep(b, i, 0);
    memset(got, 0, sizeof(float) * V), memset(got2, 0, sizeof(float) * V);
    int calls = 0;
    for (ip = 0, iq = 0; ip < NP || iq < NQ; calls++) {
        engine_seq_eval be[2];
        int n = 0, cq = NQ - iq < 4 ? NQ - iq : 4;
        const int done = engine_seq_layers_done(b, 2), layer = done + 1;
        if (ip < NP) be[n++] = (engine_seq_eval){0, p + ip, 1, ip + 1 == NP ? got : NULL, 0, 0};
        const bool on_q = iq < NQ;
        if (on_q)
            be[n++] = (engine_seq_eval){2, q + iq, cq, iq + cq == NQ ? got2 : NULL, layer, done};
        if (engine_eval_batch(b, be, n, &err)) fail_msg("%s", err.msg);
        ip += ip < NP;
        if (!on_q) continue;
        assert_int_equal(engine_seq_n_past(b, 2), iq + (layer == NL ? cq : 0));
        assert_int_equal(engine_seq_layers_done(b, 2), layer == NL ? 0 : layer);
        iq += layer == NL ? cq : 0;
    }
    assert_int_equal(calls, ((NQ + 3) / 4) * NL > NP ? ((NQ + 3) / 4) * NL : NP);
    s_same_bits(file, "p beside q's layer slices differs from p alone", got, lp2, (size_t)V);
    s_same_bits(file, "q in layer slices differs from q alone", got2, lq, (size_t)V);
    /* a slice not last, layers out of range: refused, nothing changed; a plain entry or
     * engine_seq_keep drops the part-way chunk; a chunk whose `from` is not what the engine holds
     * (another chunk of the same size left part way) starts again at layer 0: p's first 4
     * tokens give their logits alone, not q's rows */
    float *l4 = malloc(sizeof(float) * V);
    engine_reset(a);
    assert_int_equal(engine_eval(a, p, 4, l4, false, &err), 0);
    engine_seq_keep(b, 2, 0);
    engine_seq_eval first = {2, q, 4, NULL, 1, 0};
    assert_int_equal(engine_eval_batch(b, &first, 1, &err), 0);
    assert_int_equal(engine_seq_layers_done(b, 2), 1);
    engine_seq_eval not_last[2] = {{2, q, 4, NULL, 2, 1}, {0, p, 1, NULL, 0, 0}};
    assert_int_equal(engine_eval_batch(b, not_last, 2, &err), STP_EINVAL);
    engine_seq_eval plain = {2, q, 4, NULL, 0, 0}, back = {2, q, 4, NULL, 1, 1},
                    over = {2, q, 4, NULL, NL + 1, 1}, other = {2, p, 4, got, NL, 0};
    assert_int_equal(engine_eval_batch(b, &back, 1, &err), STP_EINVAL);
    assert_int_equal(engine_eval_batch(b, &over, 1, &err), STP_EINVAL);
    assert_int_equal(engine_seq_layers_done(b, 2), 1);
    assert_int_equal(engine_seq_n_past(b, 2), 0);
    assert_int_equal(engine_eval_batch(b, &other, 1, &err), 0);
    assert_int_equal(engine_seq_layers_done(b, 2), 0);
    assert_int_equal(engine_seq_n_past(b, 2), 4);
    s_same_bits(file, "a new chunk took a stale chunk's rows", got, l4, (size_t)V);
    assert_int_equal(engine_seq_keep(b, 2, 0), 0);
    assert_int_equal(engine_eval_batch(b, &first, 1, &err), 0);
    assert_int_equal(engine_seq_keep(b, 2, 0), 0);
    assert_int_equal(engine_seq_layers_done(b, 2), 0);
    assert_int_equal(engine_eval_batch(b, &first, 1, &err), 0);
    assert_int_equal(engine_eval_batch(b, &plain, 1, &err), 0);
    assert_int_equal(engine_seq_layers_done(b, 2), 0);
    assert_int_equal(engine_seq_n_past(b, 2), 4);
    /* the engine keeps one chunk part way: sequence 2's chunk taken part way drops sequence 0's,
     * which then starts again at layer 0 though its `from` says 1; both give their bits alone */
    float *lq4 = malloc(sizeof(float) * V);
    engine_reset(a);
    assert_int_equal(engine_eval(a, q, 4, lq4, false, &err), 0);
    for (int i = 0; i < 3; i++)
        engine_seq_keep(b, i, 0);
    engine_seq_eval p_first = {0, p, 4, NULL, 1, 0}, q_first = {2, q, 4, NULL, 1, 0};
    engine_seq_eval p_rest = {0, p, 4, got, NL, 1}, q_rest = {2, q, 4, got2, NL, 1};
    assert_int_equal(engine_eval_batch(b, &p_first, 1, &err), 0);
    assert_int_equal(engine_seq_layers_done(b, 0), 1);
    /* another sequence's plain entry or keep leaves it */
    engine_seq_eval q_one = {2, q, 1, NULL, 0, 0};
    assert_int_equal(engine_eval_batch(b, &q_one, 1, &err), 0);
    assert_int_equal(engine_seq_keep(b, 2, 0), 0);
    assert_int_equal(engine_seq_layers_done(b, 0), 1);
    assert_int_equal(engine_eval_batch(b, &q_first, 1, &err), 0);
    assert_int_equal(engine_seq_layers_done(b, 2), 1);
    assert_int_equal(engine_seq_layers_done(b, 0), 0);
    assert_int_equal(engine_eval_batch(b, &p_rest, 1, &err), 0);
    assert_int_equal(engine_seq_n_past(b, 0), 4);
    assert_int_equal(engine_seq_layers_done(b, 2), 0);
    assert_int_equal(engine_eval_batch(b, &q_rest, 1, &err), 0);
    assert_int_equal(engine_seq_n_past(b, 2), 4);
    s_same_bits(file, "a chunk whose rows another took differs", got, l4, (size_t)V);
    s_same_bits(file, "a chunk that took another's rows differs", got2, lq4, (size_t)V);
    free(l4), free(lq4);

    free(lp), free(lp2), free(lq), free(got), free(got2);
    engine_destroy(&a);
    engine_destroy(&b);
    model_close(&m);
}

/* A chunk left part way wrote keys past n_past into a sliding-window ring (layer 1 of the hybrid
 * model, window 4096, ring 4096 + n_ubatch): those slots held the oldest positions. Keeping a
 * prefix afterwards must count them (the slot's high-water mark, not n_past): the kept prefix
 * and a continuation give the bits of evaluating them fresh. */
static void test_engine_keep_after_chunk_part_way(void **state) {
    (void)state;
    model *m = th_model_open("tiny-hybrid-attn-q4_0-pure.gguf");
    const int V = m->cfg.n_vocab;
    enum { N0 = 4150, NC = 64, KEEP = 3000, NU = 8 };
    int32_t *t = malloc(sizeof(int32_t) * (N0 + NC)), u[NU];
    s_tokens(t, N0 + NC, V, 31);
    s_tokens(u, NU, V, 32);
    stp_err err = {0};
    engine *e = s_engine(m, 2, 4400, 64);
    assert_int_equal(engine_eval(e, t, N0, NULL, false, &err), 0);
    engine_seq_eval part = {0, t + N0, NC, NULL, 2, 0}; /* layers 0 (full) and 1 (window) */
    assert_int_equal(engine_eval_batch(e, &part, 1, &err), 0);
    assert_int_equal(engine_seq_layers_done(e, 0), 2);
    const int kept = engine_seq_keep(e, 0, KEEP);
    assert_true(kept < KEEP); /* the ring no longer holds what position KEEP looks back to */
    float *got = malloc(sizeof(float) * V), *want = malloc(sizeof(float) * V);
    int32_t *rest = malloc(sizeof(int32_t) * (KEEP + NU));
    memcpy(rest, t, sizeof(int32_t) * KEEP);
    memcpy(rest + KEEP, u, sizeof(u));
    assert_int_equal(engine_eval(e, rest + kept, KEEP + NU - kept, got, false, &err), 0);
    engine *f = s_engine(m, 2, 4400, 64);
    assert_int_equal(engine_eval(f, rest, KEEP + NU, want, false, &err), 0);
    s_same_bits("tiny-hybrid-attn-q4_0-pure.gguf", "kept prefix after a chunk part way differs",
                got, want, (size_t)V);
    free(t), free(got), free(want), free(rest);
    engine_destroy(&e);
    engine_destroy(&f);
    model_close(&m);
}

static void test_engine_batch_invariance_dense(void **state) {
    (void)state;
    s_batch_invariance("tiny-dense-attn-q4_0-pure.gguf");
}

static void test_engine_batch_invariance_hybrid(void **state) {
    (void)state;
    s_batch_invariance("tiny-hybrid-attn-q4_0-pure.gguf");
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_engine_batched_equals_stepwise_dense),
        cmocka_unit_test(test_engine_batched_equals_stepwise_hybrid),
        cmocka_unit_test(test_engine_ubatch_chunking),
        cmocka_unit_test(test_engine_reset_reproduces),
        cmocka_unit_test(test_engine_threads_bit_exact_dense),
        cmocka_unit_test(test_engine_threads_bit_exact_hybrid),
        cmocka_unit_test(test_engine_context_overflow),
        cmocka_unit_test(test_engine_bad_token_id),
        cmocka_unit_test(test_engine_new_checks),
        cmocka_unit_test(test_engine_f16_cache),
        cmocka_unit_test(test_engine_q8_0_cache),
        cmocka_unit_test(test_engine_sliding_window_ring),
        cmocka_unit_test(test_engine_synthetic_64_experts),
        cmocka_unit_test(test_engine_head_dim_over_max_refused),
        cmocka_unit_test(test_engine_batch_invariance_dense),
        cmocka_unit_test(test_engine_keep_after_chunk_part_way),
        cmocka_unit_test(test_engine_batch_invariance_hybrid),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
