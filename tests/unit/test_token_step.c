/* test_token_step: the token step (gen/token_step.h) on hand-made logits with the Qwen2
 * vocabulary: greedy and seeded sampling (reproducible, the sampler's own ids), stop strings
 * split across tokens (held back, then cut) or not matching (held text released), a UTF-8
 * character split across tokens, the eos and length finishes, and ids-only steps. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gen/token_step.h"
#include "gguf/gguf.h"
#include "tokenizer/tokenizer.h"

typedef struct fixture {
    gguf_file *g;
    tokenizer *t;
    int V;
    float *logits;
} fixture;

static fixture *s_f; /* the suite's tokenizer (set up once) */

static int s_setup(void **state) {
    (void)state;
    const char *d = getenv("STP_TEST_DATA");
    char path[4096];
    snprintf(path, sizeof path, "%s/tokenizer/qwen2-vocab.gguf", d ? d : "tests/data");
    stp_err err = {0};
    s_f = calloc(1, sizeof *s_f);
    if (!s_f || gguf_open(&s_f->g, path, &err) || tokenizer_new(&s_f->t, s_f->g, &err)) {
        fprintf(stderr, "%s: %s\n", path, err.msg);
        return -1;
    }
    s_f->V = tokenizer_n_vocab(s_f->t);
    s_f->logits = malloc(sizeof(float) * (size_t)s_f->V);
    return s_f->logits ? 0 : -1;
}

static int s_teardown(void **state) {
    (void)state;
    tokenizer_destroy(&s_f->t);
    gguf_close(&s_f->g);
    free(s_f->logits);
    free(s_f);
    return 0;
}

/* The id of a text that is one token. */
static int32_t s_id(const char *text) {
    int32_t *ids = NULL;
    size_t n = 0;
    stp_err err = {0};
    assert_int_equal(
        tokenizer_encode(s_f->t, text, strlen(text), TOK_PARSE_SPECIAL, &ids, &n, &err), 0);
    assert_int_equal(n, 1);
    int32_t id = ids[0];
    free(ids);
    return id;
}

/* Greedy params over the Qwen vocabulary with the tokenizer. */
static token_step_params s_params(void) {
    token_step_params p = {.n_vocab = s_f->V, .max_tokens = -1, .tok = s_f->t};
    sampler_params_default(&p.sp);
    return p;
}

static token_step *s_new(const token_step_params *p) {
    token_step *s = NULL;
    stp_err err = {0};
    assert_int_equal(token_step_new(&s, p, &err), 0);
    assert_non_null(s);
    return s;
}

/* Logits whose argmax is id (a second, lower peak keeps it a real choice). */
static float *s_peak(int32_t id) {
    for (int i = 0; i < s_f->V; i++)
        s_f->logits[i] = (float)(i % 7) * 0.01f;
    s_f->logits[(id + 1) % s_f->V] = 5.0f;
    s_f->logits[id] = 9.0f;
    return s_f->logits;
}

/* One greedy step to id; checks the id and the streamed text. */
static token_step_out s_step(token_step *s, int32_t id, const char *want_text) {
    token_step_out o;
    assert_int_equal(token_step_next(s, s_peak(id), &o), 0);
    assert_int_equal(o.id, id);
    assert_int_equal(o.len, strlen(want_text));
    assert_memory_equal(o.text, want_text, o.len);
    return o;
}

static void test_token_step_greedy(void **state) {
    (void)state;
    token_step_params p = s_params();
    token_step *s = s_new(&p);
    const char *words[] = {"Hello", ",", " world", "!"};
    for (int i = 0; i < 4; i++) {
        token_step_out o = s_step(s, s_id(words[i]), words[i]);
        assert_int_equal(o.finish, TOKEN_FINISH_NONE);
        assert_false(o.eog);
    }
    size_t len = 0;
    assert_string_equal(token_step_text(s, &len), "Hello, world!");
    assert_int_equal(len, 13);
    assert_int_equal(token_step_n_gen(s), 4);
    token_step_destroy(&s);
    assert_null(s);
}

/* 64 draws at temperature 1 over 16 near-equal ids: the same seed gives the same ids, the
 * sampler's own (the step adds nothing to sampling); another seed gives others. */
static void s_draws(uint64_t seed, int32_t *ids, bool bare) {
    token_step_params p = s_params();
    p.sp.temperature = 1.0f;
    p.sp.seed = seed;
    token_step *s = bare ? NULL : s_new(&p);
    sampler *smp = NULL;
    stp_err err = {0};
    if (bare) assert_int_equal(sampler_new(&smp, &p.sp, s_f->V, &err), 0);
    for (int k = 0; k < 64; k++) {
        for (int i = 0; i < s_f->V; i++)
            s_f->logits[i] = i < 16 ? 1.0f + 0.01f * (float)i : -30.0f;
        if (bare) {
            ids[k] = sampler_sample(smp, s_f->logits);
            sampler_accept(smp, ids[k]);
            continue;
        }
        token_step_out o;
        assert_int_equal(token_step_next(s, s_f->logits, &o), 0);
        assert_int_equal(o.finish, TOKEN_FINISH_NONE);
        ids[k] = o.id;
    }
    token_step_destroy(&s);
    sampler_destroy(&smp);
}

static void test_token_step_seeded_reproducible(void **state) {
    (void)state;
    int32_t a[64], b[64], c[64], bare[64];
    s_draws(42, a, false);
    s_draws(42, b, false);
    s_draws(43, c, false);
    s_draws(42, bare, true);
    assert_memory_equal(a, b, sizeof a);
    assert_memory_equal(a, bare, sizeof a);
    assert_memory_not_equal(a, c, sizeof a);
    int distinct = 0;
    for (int i = 0; i < 16; i++)
        for (int k = 0; k < 64; k++)
            if (a[k] == i) {
                distinct++;
                break;
            }
    assert_true(distinct >= 8); /* really sampled, not greedy */
}

/* The prompt ids reach the penalties: with a repeat penalty the prompt's top id loses. */
static void test_token_step_prompt_penalties(void **state) {
    (void)state;
    token_step_params p = s_params();
    p.sp.repeat_penalty = 100.0f;
    p.sp.penalty_last_n = 8;
    token_step *s = s_new(&p);
    int32_t prompt[2] = {s_id("Hello"), s_id(",")};
    token_step_prompt(s, prompt, 2);
    token_step_out o;
    assert_int_equal(token_step_next(s, s_peak(prompt[0]), &o), 0);
    assert_int_equal(o.id, prompt[0] + 1);
    token_step_destroy(&s);
}

/* "STOP" arrives as S, T, O, P after "ab": the prefix is held, then cut with the stop. */
static void test_token_step_stop_split(void **state) {
    (void)state;
    const char *stops[] = {"never", "STOP"};
    token_step_params p = s_params();
    p.stop = stops;
    p.n_stop = 2;
    token_step *s = s_new(&p);
    s_step(s, s_id("ab"), "ab");
    s_step(s, s_id("S"), "");
    s_step(s, s_id("T"), "");
    token_step_out o = s_step(s, s_id("O"), "");
    assert_int_equal(o.finish, TOKEN_FINISH_NONE);
    o = s_step(s, s_id("P"), "");
    assert_int_equal(o.finish, TOKEN_FINISH_STOP);
    size_t len = 0;
    assert_string_equal(token_step_text(s, &len), "ab");
    /* finished: nothing more is sampled or streamed */
    assert_int_equal(token_step_next(s, s_peak(s_id("x")), &o), 0);
    assert_int_equal(o.id, -1);
    assert_int_equal(o.len, 0);
    assert_int_equal(o.finish, TOKEN_FINISH_STOP);
    assert_int_equal(token_step_end(s, &o), 0);
    assert_int_equal(o.len, 0);
    assert_int_equal(token_step_n_gen(s), 5);
    token_step_destroy(&s);
}

/* A stop string inside one token: the text before it streams, the rest is dropped. */
static void test_token_step_stop_inside_token(void **state) {
    (void)state;
    const char *stops[] = {"ll"};
    token_step_params p = s_params();
    p.stop = stops;
    p.n_stop = 1;
    token_step *s = s_new(&p);
    token_step_out o = s_step(s, s_id("Hello"), "He");
    assert_int_equal(o.finish, TOKEN_FINISH_STOP);
    assert_string_equal(token_step_text(s, NULL), "He");
    token_step_destroy(&s);
}

/* "ST" looks like the start of "STOP", then "X" comes: the held "ST" is released with it. */
static void test_token_step_stop_no_match(void **state) {
    (void)state;
    const char *stops[] = {"STOP"};
    token_step_params p = s_params();
    p.stop = stops;
    p.n_stop = 1;
    token_step *s = s_new(&p);
    s_step(s, s_id("a"), "a");
    s_step(s, s_id("S"), "");
    s_step(s, s_id("T"), "");
    token_step_out o = s_step(s, s_id("X"), "STX");
    assert_int_equal(o.finish, TOKEN_FINISH_NONE);
    /* held again, then the answer ends at eos: the held text is released, not dropped */
    s_step(s, s_id("ST"), "");
    o = s_step(s, s_id("<|im_end|>"), "ST");
    assert_true(o.eog);
    assert_int_equal(o.finish, TOKEN_FINISH_EOS);
    assert_string_equal(token_step_text(s, NULL), "aSTXST");
    token_step_destroy(&s);
}

/* The caller's own limit (context full, cancel): token_step_end releases the held text. */
static void test_token_step_end_releases(void **state) {
    (void)state;
    const char *stops[] = {"STOP"};
    token_step_params p = s_params();
    p.stop = stops;
    p.n_stop = 1;
    token_step *s = s_new(&p);
    s_step(s, s_id("a"), "a");
    s_step(s, s_id("ST"), "");
    token_step_out o;
    assert_int_equal(token_step_end(s, &o), 0);
    assert_int_equal(o.finish, TOKEN_FINISH_NONE);
    assert_int_equal(o.len, 2);
    assert_memory_equal(o.text, "ST", 2);
    assert_int_equal(token_step_next(s, s_peak(s_id("x")), &o), 0);
    assert_int_equal(o.id, -1); /* ended: nothing sampled */
    token_step_destroy(&s);
}

/* "é" is C3 A9: the byte tokens "Ã" (C3) and "©" (A9) make it in two steps. */
static void test_token_step_utf8_split(void **state) {
    (void)state;
    int32_t c3 = tokenizer_token_id(s_f->t, "\xc3\x83"),
            a9 = tokenizer_token_id(s_f->t, "\xc2\xa9");
    assert_true(c3 >= 0 && a9 >= 0);
    token_step_params p = s_params();
    token_step *s = s_new(&p);
    s_step(s, s_id("ab"), "ab");
    s_step(s, c3, "");
    s_step(s, a9, "\xc3\xa9");
    /* an unfinished character at the end (here: length) becomes U+FFFD */
    token_step_destroy(&s);
    p.max_tokens = 2;
    s = s_new(&p);
    s_step(s, s_id("ab"), "ab");
    token_step_out o = s_step(s, c3, "\xef\xbf\xbd");
    assert_int_equal(o.finish, TOKEN_FINISH_LENGTH);
    assert_string_equal(token_step_text(s, NULL), "ab\xef\xbf\xbd");
    token_step_destroy(&s);
}

/* A stop string of a multi-byte character split across tokens is still found and cut. */
static void test_token_step_utf8_stop(void **state) {
    (void)state;
    int32_t c3 = tokenizer_token_id(s_f->t, "\xc3\x83"),
            a9 = tokenizer_token_id(s_f->t, "\xc2\xa9");
    const char *stops[] = {"\xc3\xa9!"};
    token_step_params p = s_params();
    p.stop = stops;
    p.n_stop = 1;
    token_step *s = s_new(&p);
    s_step(s, s_id("ab"), "ab");
    s_step(s, c3, "");
    s_step(s, a9, ""); /* "é" may start "é!" */
    token_step_out o = s_step(s, s_id("!"), "");
    assert_int_equal(o.finish, TOKEN_FINISH_STOP);
    assert_string_equal(token_step_text(s, NULL), "ab");
    token_step_destroy(&s);
}

static void test_token_step_eos(void **state) {
    (void)state;
    int32_t eos = s_id("<|im_end|>");
    token_step_params p = s_params();
    token_step *s = s_new(&p);
    s_step(s, s_id("ab"), "ab");
    token_step_out o = s_step(s, eos, "");
    assert_true(o.eog);
    assert_int_equal(o.finish, TOKEN_FINISH_EOS);
    assert_string_equal(token_step_text(s, NULL), "ab"); /* no text for the eos id */
    token_step_destroy(&s);
    /* ignore_eos: the eos id has no text and the answer goes on */
    p.ignore_eos = true;
    s = s_new(&p);
    o = s_step(s, eos, "");
    assert_true(o.eog);
    assert_int_equal(o.finish, TOKEN_FINISH_NONE);
    s_step(s, s_id("ab"), "ab");
    token_step_destroy(&s);
}

static void test_token_step_length(void **state) {
    (void)state;
    token_step_params p = s_params();
    p.max_tokens = 2;
    token_step *s = s_new(&p);
    token_step_out o = s_step(s, s_id("ab"), "ab");
    assert_int_equal(o.finish, TOKEN_FINISH_NONE);
    o = s_step(s, s_id("cd"), "cd");
    assert_int_equal(o.finish, TOKEN_FINISH_LENGTH);
    assert_int_equal(token_step_next(s, s_peak(5), &o), 0);
    assert_int_equal(o.id, -1);
    assert_int_equal(o.finish, TOKEN_FINISH_LENGTH);
    assert_int_equal(token_step_n_gen(s), 2);
    token_step_destroy(&s);
    /* max_tokens 0: nothing is sampled */
    p.max_tokens = 0;
    s = s_new(&p);
    assert_int_equal(token_step_next(s, s_peak(5), &o), 0);
    assert_int_equal(o.id, -1);
    assert_int_equal(o.finish, TOKEN_FINISH_LENGTH);
    assert_int_equal(token_step_n_gen(s), 0);
    token_step_destroy(&s);
}

/* Ids only: no text, eos still ends the answer; without a tokenizer there is no eos. */
static void test_token_step_ids_only(void **state) {
    (void)state;
    int32_t eos = s_id("<|im_end|>");
    token_step_params p = s_params();
    p.no_text = true;
    token_step *s = s_new(&p);
    s_step(s, s_id("ab"), "");
    token_step_out o = s_step(s, eos, "");
    assert_int_equal(o.finish, TOKEN_FINISH_EOS);
    token_step_destroy(&s);
    p.tok = NULL;
    s = s_new(&p);
    o = s_step(s, eos, "");
    assert_false(o.eog);
    assert_int_equal(o.finish, TOKEN_FINISH_NONE);
    assert_int_equal(token_step_accept(s, s_f->V, &o), STP_EINVAL); /* out of range */
    token_step_destroy(&s);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_token_step_greedy),
        cmocka_unit_test(test_token_step_seeded_reproducible),
        cmocka_unit_test(test_token_step_prompt_penalties),
        cmocka_unit_test(test_token_step_stop_split),
        cmocka_unit_test(test_token_step_stop_inside_token),
        cmocka_unit_test(test_token_step_stop_no_match),
        cmocka_unit_test(test_token_step_end_releases),
        cmocka_unit_test(test_token_step_utf8_split),
        cmocka_unit_test(test_token_step_utf8_stop),
        cmocka_unit_test(test_token_step_eos),
        cmocka_unit_test(test_token_step_length),
        cmocka_unit_test(test_token_step_ids_only),
    };
    return cmocka_run_group_tests(tests, s_setup, s_teardown);
}
