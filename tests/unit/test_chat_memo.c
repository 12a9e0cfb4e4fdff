/* test_chat_memo: server/chat_memo.c on hand-made texts: an entry is found only as a prefix
 * ending at an allowed cut, the longest one wins, a later turn of the same conversation replaces
 * the earlier one, the least recently used entry is the one dropped, and ids come back whole. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdlib.h>
#include <string.h>

#include "chat_memo.h"

/* Finds text with the one cut `cut` (0: its whole length); the ids' count, or -1 if none. */
static long s_find(chat_memo *m, const char *text, size_t cut, int32_t *first) {
    int32_t *ids = NULL;
    size_t n = 0, c = cut ? cut : strlen(text);
    size_t got = chat_memo_find(m, text, strlen(text), &c, 1, &ids, &n);
    if (!got) {
        assert_null(ids);
        return -1;
    }
    assert_int_equal(got, c);
    if (first) *first = ids[0];
    free(ids);
    return (long)n;
}

static void test_chat_memo_prefix_at_a_cut(void **state) {
    (void)state;
    chat_memo *m = chat_memo_new(4);
    const int32_t p[] = {1, 2, 3}, a[] = {7, 8};
    chat_memo_put(m, "<s>user\nhi<e>\n<s>assistant\n", 27, "hello", 5, p, 3, a, 2);
    const char *t2 = "<s>user\nhi<e>\n<s>assistant\nhello<e>\n<s>user\nmore<e>\n";
    int32_t *ids = NULL;
    size_t n = 0;
    const size_t at = 32; /* the answer's end */
    assert_int_equal(chat_memo_find(m, t2, strlen(t2), &at, 1, &ids, &n), 32);
    assert_int_equal(n, 5);
    const int32_t want[] = {1, 2, 3, 7, 8};
    assert_memory_equal(ids, want, sizeof want);
    free(ids);
    /* the same text cut elsewhere, a text that differs in the answer, one too short: none */
    assert_int_equal(s_find(m, t2, 31, NULL), -1);
    assert_int_equal(s_find(m, "<s>user\nhi<e>\n<s>assistant\nhellO<e>\n", 32, NULL), -1);
    assert_int_equal(s_find(m, "<s>user\nhi<e>\n<s>assistant\nhell", 0, NULL), -1);
    unsigned long long lookups = 0, hits = 0;
    chat_memo_counts(m, &lookups, &hits);
    assert_int_equal(lookups, 4);
    assert_int_equal(hits, 1);
    chat_memo_destroy(&m);
    assert_null(m);
}

static void test_chat_memo_longest_and_next_turn(void **state) {
    (void)state;
    chat_memo *m = chat_memo_new(4);
    const int32_t x[] = {1}, y[] = {2, 2}, z[] = {3, 3, 3};
    chat_memo_put(m, "ab", 2, "c", 1, x, 1, NULL, 0); /* "abc" -> 1 id */
    chat_memo_put(m, "xy", 2, "z", 1, y, 2, NULL, 0); /* another conversation */
    const char *t = "abcdef|";
    int32_t *ids = NULL;
    size_t n = 0;
    const size_t cuts[] = {3, 6};
    assert_int_equal(chat_memo_find(m, t, strlen(t), cuts, 2, &ids, &n), 3);
    assert_int_equal(n, 1);
    free(ids);
    chat_memo_put(m, "abc", 3, "def", 3, z, 3, NULL, 0); /* its next turn replaces "abc" */
    assert_int_equal(chat_memo_find(m, t, strlen(t), cuts, 2, &ids, &n), 6);
    assert_int_equal(n, 3);
    free(ids);
    assert_int_equal(s_find(m, t, 3, NULL), -1); /* the earlier turn is gone */
    assert_int_equal(s_find(m, "xyz|", 3, NULL), 2);
    chat_memo_destroy(&m);
}

static void test_chat_memo_drops_least_recent(void **state) {
    (void)state;
    chat_memo *m = chat_memo_new(2);
    const int32_t a = 10, b = 20, c = 30;
    chat_memo_put(m, "A", 1, "a", 1, &a, 1, NULL, 0);
    chat_memo_put(m, "B", 1, "b", 1, &b, 1, NULL, 0);
    int32_t first = 0;
    assert_int_equal(s_find(m, "Aa|", 2, &first), 1); /* A used: B is now the oldest */
    assert_int_equal(first, 10);
    chat_memo_put(m, "C", 1, "c", 1, &c, 1, NULL, 0);
    assert_int_equal(s_find(m, "Bb|", 2, NULL), -1);
    assert_int_equal(s_find(m, "Aa|", 2, &first), 1);
    assert_int_equal(s_find(m, "Cc|", 2, &first), 1);
    assert_int_equal(first, 30);
    chat_memo_destroy(&m);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_chat_memo_prefix_at_a_cut),
        cmocka_unit_test(test_chat_memo_longest_and_next_turn),
        cmocka_unit_test(test_chat_memo_drops_least_recent),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
