/* test_sched: the continuous-batching scheduler (common/gen/sched.h) on the in-process engine
 * backend and a tiny Q4_0 model.
 * - Same answer under load: greedy and seeded sampled requests give the same ids alone and
 *   batched with others, submitted together or joining while others decode, with a prompt
 *   chunk smaller than the prompts (so prompts are read over several steps beside decoding),
 *   each chunk beside decoding requests taken whole, a layer a step, or in the default slices;
 *   and a burst (three arriving together beside one answering, two beside two) read whole in
 *   one step, or in slices when it does not fit one; one arriving beside answers is sliced.
 * - Prefix reuse: a follow-up prompt that extends the previous prompt and answer evaluates only
 *   the new tokens (n_cached) and answers as a fresh slot does; the least recently used idle
 *   slot is the one taken over.
 * - Cancellation before and during generation, a prompt longer than the context, and waiting
 *   for a slot when all are taken. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gen/backend.h"
#include "gen/sched.h"
#include "th_gguf.h"

#define MODEL "tiny-hybrid-attn-q4_0-pure.gguf"
#define N_REQ 4
#define N_GEN 12

typedef struct outcome {
    bool done;
    int rc;
    gen_result res;
    int n_emit;
} outcome;

static void s_done(void *ud, gen_result *res, int rc, const stp_err *err) {
    (void)err;
    outcome *o = ud;
    assert_false(o->done);
    o->done = true;
    o->rc = rc;
    o->res = *res;
}

static int s_emit(void *ud, const char *text, size_t len) {
    (void)text;
    assert_true(len > 0);
    ((outcome *)ud)->n_emit++;
    return 0;
}

static backend *s_backend(int n_seq) {
    char path[512];
    backend *b = NULL;
    stp_err err = {0};
    backend_engine_params p = {.model_path = th_data_path(path, sizeof path, MODEL),
                               .n_threads = 2,
                               .n_ctx = 96,
                               .n_seq = n_seq};
    if (backend_engine_new(&b, &p, &err)) fail_msg("%s", err.msg);
    return b;
}

/* Prompt i: a few ids in range, different per request, sharing nothing. */
static int s_prompt(int32_t *p, int i, int V) {
    int n = 9 + 7 * i;
    uint32_t r = 77u + (uint32_t)i * 1000u;
    for (int k = 0; k < n; k++) {
        r = r * 1103515245u + 12345u;
        p[k] = (int32_t)((r >> 8) % (uint32_t)V);
    }
    return n;
}

static gen_params s_params(int i) {
    gen_params g = {.max_tokens = N_GEN, .ignore_eos = true};
    sampler_params_default(&g.sp);
    if (i % 2 == 0) {
        g.sp.temperature = 0; /* greedy */
    } else {
        g.sp.temperature = 0.8f;
        g.sp.top_k = 20;
        g.sp.top_p = 0.95f;
        g.sp.seed = 1234u + (uint64_t)i;
    }
    return g;
}

static void s_submit(sched *s, const int32_t *p, int n, const gen_params *g, outcome *o,
                     const volatile sig_atomic_t *cancel) {
    stp_err err = {0};
    sched_req r = {.prompt = p,
                   .n_prompt = n,
                   .gp = *g,
                   .emit = s_emit,
                   .done = s_done,
                   .ud = o,
                   .cancel = cancel};
    if (sched_submit(s, &r, &err)) fail_msg("%s", err.msg);
}

static void s_drain(sched *s) {
    for (int guard = 0; sched_busy(s); guard++) {
        assert_true(guard < 10000);
        sched_step(s);
    }
}

/* Requests 0..n_first-1 until they answer, then requests n_first..n_req-1 together; each
 * request's ids must equal alone[i]'s. *step: the counters the step after their arrival added;
 * *end: the scheduler's counters at the end. */
static void s_burst(backend *b, const sched_params *sp, int n_first, int n_req, int32_t p[][64],
                    const int *n, const gen_params *g, const outcome *alone, sched_stats *step,
                    sched_stats *end) {
    outcome o[N_REQ] = {0};
    sched *s = NULL;
    stp_err err = {0};
    assert_int_equal(sched_new(&s, b, sp, &err), 0);
    for (int i = 0; i < n_first; i++)
        s_submit(s, p[i], n[i], &g[i], &o[i], NULL);
    sched_step(s); /* their prompts, with nobody answering: now they answer */
    sched_step(s);
    for (int i = n_first; i < n_req; i++)
        s_submit(s, p[i], n[i], &g[i], &o[i], NULL);
    const sched_stats pre = *sched_get_stats(s);
    sched_step(s);
    const sched_stats *st = sched_get_stats(s);
    step->tokens_prefilled = st->tokens_prefilled - pre.tokens_prefilled;
    step->tokens_decoded = st->tokens_decoded - pre.tokens_decoded;
    s_drain(s);
    *end = *sched_get_stats(s);
    sched_destroy(&s);
    for (int i = 0; i < n_req; i++) {
        assert_true(o[i].done);
        assert_int_equal(o[i].rc, 0);
        if (memcmp(alone[i].res.ids, o[i].res.ids, sizeof(int32_t) * N_GEN))
            fail_msg("request %d: ids in a burst differ from alone", i);
        gen_result_fini(&o[i].res);
    }
}

static void test_sched_same_ids_alone_and_batched(void **state) {
    (void)state;
    backend *b = s_backend(N_REQ);
    const int V = backend_n_vocab(b);
    int32_t p[N_REQ][64];
    int n[N_REQ];
    gen_params g[N_REQ];
    for (int i = 0; i < N_REQ; i++)
        n[i] = s_prompt(p[i], i, V), g[i] = s_params(i);
    stp_err err = {0};
    const sched_params sp = {.prefill_chunk = 4};
    sched *s = NULL;

    /* alone: one request at a time on a fresh scheduler (empty slots) */
    outcome alone[N_REQ] = {0};
    for (int i = 0; i < N_REQ; i++) {
        assert_int_equal(sched_new(&s, b, &sp, &err), 0);
        s_submit(s, p[i], n[i], &g[i], &alone[i], NULL);
        s_drain(s);
        sched_destroy(&s);
        assert_true(alone[i].done);
        assert_int_equal(alone[i].rc, 0);
        assert_int_equal(alone[i].res.n_gen, N_GEN);
        assert_int_equal(alone[i].res.finish, GEN_FINISH_LENGTH);
    }
    /* together, all submitted at once */
    outcome both[N_REQ] = {0};
    assert_int_equal(sched_new(&s, b, &sp, &err), 0);
    for (int i = 0; i < N_REQ; i++)
        s_submit(s, p[i], n[i], &g[i], &both[i], NULL);
    int steps = 0;
    while (sched_busy(s))
        sched_step(s), steps++;
    sched_destroy(&s);
    /* batched: fewer steps than the requests one after another */
    assert_true(steps < N_REQ * N_GEN);
    /* staggered: request i joins after i * 3 steps, while the others decode; its prompt chunks
     * go through every layer in their step, one layer a step, or the default slice */
    const int layers[3] = {-1, 1, 0};
    unsigned long long slices[3] = {0};
    for (int v = 0; v < 3; v++) {
        outcome late[N_REQ] = {0};
        sched_params spl = sp;
        spl.prefill_layers = layers[v];
        assert_int_equal(sched_new(&s, b, &spl, &err), 0);
        for (int k = 0, next = 0; next < N_REQ || sched_busy(s); k++) {
            if (next < N_REQ && k == next * 3) {
                s_submit(s, p[next], n[next], &g[next], &late[next], NULL);
                next++;
            }
            sched_step(s);
        }
        slices[v] = sched_get_stats(s)->prefill_slices;
        sched_destroy(&s);
        for (int i = 0; i < N_REQ; i++) {
            assert_true(late[i].done);
            assert_int_equal(late[i].rc, 0);
            assert_int_equal(late[i].res.n_gen, N_GEN);
            if (memcmp(alone[i].res.ids, late[i].res.ids, sizeof(int32_t) * N_GEN))
                fail_msg("request %d: ids joining late (prefill layers %d) differ from alone", i,
                         layers[v]);
            gen_result_fini(&late[i].res);
        }
    }
    /* chunks beside decoding requests went part way through the layers in some steps (the
     * default slice is a layer for this 6-layer model), never when taken whole */
    assert_int_equal(slices[0], 0);
    assert_true(slices[1] >= 5 && slices[2] == slices[1]);
    /* a burst: request 0 answers, then the three others arrive together (more reading than
     * answering): their prompts are read whole beside it, in one step, not sliced; the same ids */
    sched_stats step, end;
    s_burst(b, &sp, 1, N_REQ, p, n, g, alone, &step, &end);
    assert_int_equal(step.tokens_prefilled, (unsigned long long)(n[1] + n[2] + n[3]));
    assert_int_equal(end.prefill_slices, 0);
    /* as many arriving as answering (two and two) are a burst too */
    s_burst(b, &sp, 2, N_REQ, p, n, g, alone, &step, &end);
    assert_int_equal(step.tokens_prefilled, (unsigned long long)(n[2] + n[3]));
    assert_int_equal(end.prefill_slices, 0);
    /* one arriving alone is not, beside three answering or beside one: its chunks go in
     * slices */
    s_burst(b, &sp, 3, N_REQ, p, n, g, alone, &step, &end);
    assert_int_equal(step.tokens_decoded, 3);
    assert_int_equal(step.tokens_prefilled, 0);
    assert_true(end.prefill_slices > 0);
    s_burst(b, &sp, 1, 2, p, n, g, alone, &step, &end);
    assert_int_equal(step.tokens_decoded, 1);
    assert_int_equal(step.tokens_prefilled, 0);
    assert_true(end.prefill_slices > 0);
    /* a burst larger than a step (40 tokens a step, 69 to read) goes in slices, as prompts
     * beside answers do: the answering request never waits more than a step */
    sched_params small = sp;
    small.n_batch = 40;
    s_burst(b, &small, 1, N_REQ, p, n, g, alone, &step, &end);
    assert_int_equal(step.tokens_decoded, 1); /* request 0 went on */
    assert_true(end.prefill_slices > 0);
    for (int i = 0; i < N_REQ; i++) {
        assert_true(both[i].done);
        assert_int_equal(both[i].rc, 0);
        assert_int_equal(both[i].res.n_gen, N_GEN);
        if (memcmp(alone[i].res.ids, both[i].res.ids, sizeof(int32_t) * N_GEN))
            fail_msg("request %d: ids batched differ from alone", i);
        assert_string_equal(alone[i].res.text, both[i].res.text);
        gen_result_fini(&alone[i].res);
        gen_result_fini(&both[i].res);
    }
    backend_destroy(&b);
}

static void test_sched_prefix_reuse(void **state) {
    (void)state;
    backend *b = s_backend(2);
    const int V = backend_n_vocab(b);
    int32_t p[96];
    int n = s_prompt(p, 2, V);
    gen_params g = s_params(0);
    stp_err err = {0};
    sched *s = NULL;
    assert_int_equal(sched_new(&s, b, NULL, &err), 0);
    outcome first = {0};
    s_submit(s, p, n, &g, &first, NULL);
    s_drain(s);
    assert_int_equal(first.res.n_cached, 0);
    /* the next turn: prompt + answer + 5 new ids; the slot holds the prompt and every answer id
     * but the last (never evaluated) */
    int32_t q[96];
    memcpy(q, p, sizeof(int32_t) * (size_t)n);
    memcpy(q + n, first.res.ids, sizeof(int32_t) * N_GEN);
    int m = n + N_GEN;
    for (int k = 0; k < 5; k++)
        q[m++] = (int32_t)((k * 37 + 11) % V);
    outcome second = {0};
    s_submit(s, q, m, &g, &second, NULL);
    s_drain(s);
    assert_int_equal(second.rc, 0);
    assert_int_equal(second.res.n_cached, n + N_GEN - 1);
    assert_int_equal(second.res.n_prompt, m);
    assert_int_equal(sched_get_stats(s)->tokens_reused, (unsigned long long)(n + N_GEN - 1));
    /* a fresh scheduler (slots emptied) gives the same answer */
    sched_destroy(&s);
    assert_int_equal(sched_new(&s, b, NULL, &err), 0);
    outcome fresh = {0};
    s_submit(s, q, m, &g, &fresh, NULL);
    s_drain(s);
    assert_int_equal(fresh.res.n_cached, 0);
    assert_memory_equal(fresh.res.ids, second.res.ids, sizeof(int32_t) * N_GEN);
    /* the same prompt again: all but its last token reused */
    outcome again = {0};
    s_submit(s, q, m, &g, &again, NULL);
    s_drain(s);
    assert_int_equal(again.res.n_cached, m - 1);
    assert_memory_equal(again.res.ids, second.res.ids, sizeof(int32_t) * N_GEN);
    sched_destroy(&s);
    gen_result_fini(&first.res);
    gen_result_fini(&second.res);
    gen_result_fini(&fresh.res);
    gen_result_fini(&again.res);
    backend_destroy(&b);
}

static void test_sched_cancel_errors_and_waiting(void **state) {
    (void)state;
    backend *b = s_backend(1);
    const int V = backend_n_vocab(b);
    int32_t p[200];
    int n = s_prompt(p, 1, V);
    gen_params g = s_params(0);
    stp_err err = {0};
    sched *s = NULL;
    assert_int_equal(sched_new(&s, b, NULL, &err), 0);
    /* a prompt longer than the context: done with STP_ERANGE, nothing evaluated */
    for (int k = 0; k < 120; k++)
        p[k] = (int32_t)(k % V);
    outcome big = {0};
    s_submit(s, p, 120, &g, &big, NULL);
    sched_step(s);
    assert_true(big.done);
    assert_int_equal(big.rc, STP_ERANGE);
    gen_result_fini(&big.res);
    /* one slot: the second request waits until the first is done */
    n = s_prompt(p, 1, V);
    volatile sig_atomic_t cancel = 0;
    outcome a = {0}, w = {0};
    s_submit(s, p, n, &g, &a, &cancel);
    s_submit(s, p, n, &g, &w, NULL);
    sched_step(s);
    assert_int_equal(sched_n_running(s), 1);
    assert_int_equal(sched_n_waiting(s), 1);
    /* cancel the first while it generates: it ends at its next token with what it has */
    for (int k = 0; k < 3; k++) /* the prompt was read in the first step: 3 tokens more */
        sched_step(s);
    assert_false(a.done);
    cancel = 1;
    sched_step(s);
    assert_true(a.done);
    assert_int_equal(a.rc, 0);
    assert_int_equal(a.res.finish, GEN_FINISH_CANCEL);
    assert_int_equal(a.res.n_gen, 4);
    s_drain(s);
    assert_true(w.done);
    assert_int_equal(w.res.n_gen, N_GEN);
    /* cancelled while waiting: never admitted */
    volatile sig_atomic_t c2 = 1;
    outcome x = {0};
    s_submit(s, p, n, &g, &x, &c2);
    s_drain(s);
    assert_true(x.done);
    assert_int_equal(x.res.finish, GEN_FINISH_CANCEL);
    assert_int_equal(x.res.n_gen, 0);
    /* destroying with a request in flight ends it as cancelled */
    outcome y = {0};
    s_submit(s, p, n, &g, &y, NULL);
    sched_step(s);
    sched_destroy(&s);
    assert_true(y.done);
    assert_int_equal(y.res.finish, GEN_FINISH_CANCEL);
    gen_result_fini(&a.res);
    gen_result_fini(&w.res);
    gen_result_fini(&x.res);
    gen_result_fini(&y.res);
    backend_destroy(&b);
}

/* The KV pool (kv_positions): idle slots give their positions back, least recently used first,
 * and when answering requests fill the pool the most recently admitted one ends (length) while
 * the other goes on to its max_tokens with the ids it has alone. */
static void test_sched_kv_pool(void **state) {
    (void)state;
    backend *b = s_backend(3);
    const int V = backend_n_vocab(b);
    int32_t p[3][64];
    int n0 = s_prompt(p[0], 1, V), n1 = s_prompt(p[1], 3, V), n2 = s_prompt(p[2], 0, V);
    gen_params g = s_params(0);
    stp_err err = {0};
    sched *s = NULL;
    sched_params sp = {.kv_positions = 62}; /* x and y answered: 30 + 11 and 9 + 11 */
    assert_int_equal(sched_new(&s, b, &sp, &err), 0);
    outcome a = {0}, x = {0}, y = {0};
    s_submit(s, p[0], n0, &g, &a, NULL);
    s_drain(s);
    assert_int_equal(backend_seq_n_past(b, 0), n0 + N_GEN - 1); /* 27 held by an idle slot */
    s_submit(s, p[1], n1, &g, &x, NULL);                        /* 30 */
    s_submit(s, p[2], n2, &g, &y, NULL);                        /* 9 */
    sched_step(s);
    assert_int_equal(sched_n_running(s), 2);
    assert_int_equal(sched_get_stats(s)->slots_evicted, 1);
    assert_int_equal(backend_seq_n_past(b, 0), 0);
    s_drain(s);
    assert_int_equal(x.res.n_gen, N_GEN);
    assert_int_equal(y.res.n_gen, N_GEN);
    sched_destroy(&s);

    /* pool of 40: two answers of prompt 16 + 9; the later one ends when the pool is full */
    sp.kv_positions = 40;
    assert_int_equal(sched_new(&s, b, &sp, &err), 0);
    gen_params lg = g;
    lg.max_tokens = 20;
    outcome alone = {0}, first = {0}, second = {0};
    s_submit(s, p[0], n0, &lg, &alone, NULL);
    s_drain(s);
    sched_destroy(&s);
    assert_int_equal(sched_new(&s, b, &sp, &err), 0);
    s_submit(s, p[0], n0, &lg, &first, NULL);
    s_submit(s, p[2], n2, &lg, &second, NULL);
    s_drain(s);
    assert_int_equal(first.res.n_gen, 20);
    assert_memory_equal(first.res.ids, alone.res.ids, sizeof(int32_t) * 20);
    assert_int_equal(second.res.finish, GEN_FINISH_LENGTH);
    assert_true(second.res.n_gen < 20);
    assert_true(sched_get_stats(s)->pool_full >= 1);
    /* a prompt larger than the pool is refused */
    int32_t big[48];
    for (int k = 0; k < 48; k++)
        big[k] = (int32_t)(k % V);
    outcome z = {0};
    s_submit(s, big, 48, &g, &z, NULL);
    s_drain(s);
    assert_int_equal(z.rc, STP_ERANGE);
    sched_destroy(&s);
    outcome *all[] = {&a, &x, &y, &alone, &first, &second, &z};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
        gen_result_fini(&all[i]->res);
    backend_destroy(&b);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_sched_same_ids_alone_and_batched),
        cmocka_unit_test(test_sched_prefix_reuse),
        cmocka_unit_test(test_sched_cancel_errors_and_waiting),
        cmocka_unit_test(test_sched_kv_pool),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
