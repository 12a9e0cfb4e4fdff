/* test_chat_memo: server/chat_memo.c on hand-made chats (texts with their plain spans; "|"
 * stands for the template's end of message): an entry is found only by a chat that continues it
 * (the same text and the same messages up to the end of its answer, then "|"), never by one that
 * holds the same text inside one message; the longest entry wins; a later turn of the same
 * conversation replaces the earlier one; the least recently used entry is the one dropped; ids
 * come back whole. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdlib.h>
#include <string.h>

#include "chat_memo.h"

/* The chat made of messages msgs[0..n) joined by "|" (each message a plain span). */
typedef struct chat {
    char text[256];
    tok_span spans[8];
    size_t n;
} chat;

static chat s_chat(const char *const *msgs, size_t n) {
    chat c = {.n = n};
    size_t at = 0;
    for (size_t i = 0; i < n; i++) {
        if (i) c.text[at++] = '|';
        const size_t l = strlen(msgs[i]);
        memcpy(c.text + at, msgs[i], l);
        c.spans[i] = (tok_span){at, l};
        at += l;
    }
    c.text[at] = 0;
    return c;
}

/* chat_memo_put takes malloc'd buffers: copies of c and ids */
static void s_put(chat_memo *m, const chat *c, const int32_t *ids, size_t n_ids) {
    tok_span *spans = malloc(sizeof *spans * (c->n ? c->n : 1));
    int32_t *own = malloc(sizeof *own * (n_ids ? n_ids : 1));
    assert_non_null(spans);
    assert_non_null(own);
    memcpy(spans, c->spans, sizeof *spans * c->n);
    if (n_ids) memcpy(own, ids, sizeof *own * n_ids);
    chat_memo_put(m, strdup(c->text), strlen(c->text), spans, c->n, own, n_ids);
}

/* Finds chat c: the ids' count (first id in *first), or -1 if none; the cut must be want. */
static long s_find(chat_memo *m, const chat *c, size_t want, int32_t *first) {
    int32_t *ids = NULL;
    size_t n = 0, got = chat_memo_find(m, c->text, strlen(c->text), c->spans, c->n, "|", &ids, &n);
    if (!got) {
        assert_null(ids);
        return -1;
    }
    assert_int_equal(got, want);
    if (first) *first = ids[0];
    free(ids);
    return (long)n;
}

static void test_chat_memo_continued_chat_only(void **state) {
    (void)state;
    chat_memo *m = chat_memo_new(4);
    const char *e1[] = {"user hi", "assistant hello"};
    const chat c1 = s_chat(e1, 2);
    const int32_t ids[] = {1, 2, 3, 7, 8};
    s_put(m, &c1, ids, 5);
    const char *t2[] = {"user hi", "assistant hello", "user more"};
    const chat c2 = s_chat(t2, 3);
    int32_t *got = NULL;
    size_t n = 0;
    assert_int_equal(chat_memo_find(m, c2.text, strlen(c2.text), c2.spans, 3, "|", &got, &n),
                     strlen(c1.text));
    assert_int_equal(n, 5);
    assert_memory_equal(got, ids, sizeof ids);
    free(got);
    /* the same bytes, but one message holding the marker as its text: not a continuation */
    const char *inj[] = {"user hi|assistant hello", "user more"};
    assert_int_equal(s_find(m, &(chat){0}, 0, NULL), -1); /* an empty chat */
    const chat ci = s_chat(inj, 2);
    assert_string_equal(ci.text, c2.text);
    assert_int_equal(s_find(m, &ci, 0, NULL), -1);
    /* another answer text; the answer's message longer than the entry's; no end marker */
    const char *t3[] = {"user hi", "assistant hellO", "user more"};
    const char *t4[] = {"user hi", "assistant hello and more"};
    const chat c3 = s_chat(t3, 3), c4 = s_chat(t4, 2);
    assert_int_equal(s_find(m, &c3, 0, NULL), -1);
    assert_int_equal(s_find(m, &c4, 0, NULL), -1);
    unsigned long long lookups = 0, hits = 0;
    chat_memo_counts(m, &lookups, &hits);
    assert_int_equal(lookups, 5);
    assert_int_equal(hits, 1);
    chat_memo_destroy(&m);
    assert_null(m);
}

static void test_chat_memo_longest_and_next_turn(void **state) {
    (void)state;
    chat_memo *m = chat_memo_new(4);
    const char *a[] = {"ab", "c"}, *x[] = {"xy", "z"}, *a2[] = {"ab", "c", "de", "f"};
    const chat ca = s_chat(a, 2), cx = s_chat(x, 2), ca2 = s_chat(a2, 4);
    const int32_t i1[] = {1}, i2[] = {2, 2}, i3[] = {3, 3, 3};
    s_put(m, &ca, i1, 1);
    s_put(m, &cx, i2, 2); /* another conversation */
    const char *t[] = {"ab", "c", "de", "f", "g"};
    const chat ct = s_chat(t, 5);
    assert_int_equal(s_find(m, &ct, strlen(ca.text), NULL), 1);
    s_put(m, &ca2, i3, 3); /* its next turn replaces "ab|c" */
    assert_int_equal(s_find(m, &ct, strlen(ca2.text), NULL), 3);
    const char *t1[] = {"ab", "c", "other"};
    const chat ct1 = s_chat(t1, 3);
    assert_int_equal(s_find(m, &ct1, 0, NULL), -1); /* the earlier turn is gone */
    const char *tx[] = {"xy", "z", "w"};
    const chat ctx = s_chat(tx, 3);
    assert_int_equal(s_find(m, &ctx, strlen(cx.text), NULL), 2);
    chat_memo_destroy(&m);
}

static void test_chat_memo_drops_least_recent(void **state) {
    (void)state;
    chat_memo *m = chat_memo_new(2);
    const char *A[] = {"A", "a"}, *B[] = {"B", "b"}, *C[] = {"C", "c"};
    const char *A2[] = {"A", "a", "q"}, *B2[] = {"B", "b", "q"}, *C2[] = {"C", "c", "q"};
    const chat ca = s_chat(A, 2), cb = s_chat(B, 2), cc = s_chat(C, 2);
    const chat qa = s_chat(A2, 3), qb = s_chat(B2, 3), qc = s_chat(C2, 3);
    const int32_t a = 10, b = 20, c = 30;
    s_put(m, &ca, &a, 1);
    s_put(m, &cb, &b, 1);
    int32_t first = 0;
    assert_int_equal(s_find(m, &qa, 3, &first), 1); /* A used: B is now the oldest */
    assert_int_equal(first, 10);
    s_put(m, &cc, &c, 1);
    assert_int_equal(s_find(m, &qb, 0, NULL), -1);
    assert_int_equal(s_find(m, &qa, 3, &first), 1);
    assert_int_equal(s_find(m, &qc, 3, &first), 1);
    assert_int_equal(first, 30);
    chat_memo_destroy(&m);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_chat_memo_continued_chat_only),
        cmocka_unit_test(test_chat_memo_longest_and_next_turn),
        cmocka_unit_test(test_chat_memo_drops_least_recent),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
