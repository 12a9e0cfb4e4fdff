/* test_chat: `stpipe chat` with stdin not a tty: a scripted conversation (/system, two turns,
 * /reset, a third turn, /quit) gives one answer line per turn, tok/s per answer on stderr and
 * a clean exit; greedy answers equal `stpipe generate` on the same ChatML prompt, including the
 * second turn (whose prompt continues the KV cache of the first), and usage errors exit 2. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <fcntl.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "th_gguf.h"
#include "th_proc.h"
#include "tokenizer/tokenizer.h"

#define QWEN "tiny-qwen-vocab-q4_0-pure.gguf"

/* Runs stpipe with args, stdin from the text in input. */
static th_run_out s_run(const char *const *args, const char *input) {
    return th_run_stpipe(args, input, "chat");
}

static int s_count(const char *hay, const char *needle) {
    int n = 0;
    for (const char *p = strstr(hay, needle); p; p = strstr(p + 1, needle))
        n++;
    return n;
}

/* Line i (0-based) of s, malloc'd. */
static char *s_line(const char *s, int i) {
    for (; i > 0 && s; i--) {
        s = strchr(s, '\n');
        if (s) s++;
    }
    if (!s) return strdup("");
    const char *e = strchr(s, '\n');
    return strndup(s, e ? (size_t)(e - s) : strlen(s));
}

/* `stpipe generate --prompt-ids ... -n 8` text (greedy). */
static char *s_generate_ids(const char *model, const int32_t *ids, size_t n, const char *fmt) {
    char *list = calloc(n * 12 + 1, 1);
    for (size_t i = 0; i < n; i++)
        sprintf(list + strlen(list), i ? " %d" : "%d", ids[i]);
    const char *args[] = {"generate", "--model", model, "--prompt-ids", list,
                          "-n",       "8",       fmt,   "--quiet",      NULL};
    th_run_out r = s_run(args, "");
    free(list);
    assert_int_equal(r.status, 0);
    free(r.err);
    size_t l = strlen(r.out);
    if (l && r.out[l - 1] == '\n') r.out[l - 1] = 0;
    return r.out;
}

static void test_chat_scripted_conversation(void **state) {
    (void)state;
    char mp[4096];
    th_data_path(mp, sizeof mp, QWEN);
    const char *args[] = {"chat", "--model", mp, "--temp", "0", "-n", "8", NULL};
    th_run_out r = s_run(args, "/system Be brief.\nWhat is the capital of France?\nAnd Germany?\n"
                               "/reset\nWhat is the capital of France?\n/quit\n");
    if (r.status != 0) fail_msg("exit %d\nstdout: %s\nstderr: %s", r.status, r.out, r.err);
    assert_int_equal(s_count(r.out, "\n"), 3);    /* one line per answer */
    assert_int_equal(s_count(r.err, "tok/s"), 6); /* gen + prompt speed per answer */
    assert_non_null(strstr(r.err, "[system message set"));
    assert_non_null(strstr(r.err, "[conversation reset]"));
    char *a1 = s_line(r.out, 0), *a2 = s_line(r.out, 1), *a3 = s_line(r.out, 2);
    assert_true(strlen(a1) > 0 && strlen(a2) > 0);
    /* after /reset the system message stays: the same question gives the same greedy answer */
    assert_string_equal(a3, a1);

    /* the answers equal fresh greedy generations over the same tokens */
    stp_err err = {0};
    gguf_file *g = NULL;
    tokenizer *tok = NULL;
    assert_int_equal(gguf_open(&g, mp, &err), 0);
    assert_int_equal(tokenizer_new(&tok, g, &err), 0);
    const char *t1 = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is the "
                     "capital of France?<|im_end|>\n<|im_start|>assistant\n";
    int32_t *p1 = NULL;
    size_t n1 = 0;
    assert_int_equal(tokenizer_encode(tok, t1, strlen(t1), TOK_PARSE_SPECIAL, &p1, &n1, &err), 0);
    char *want1 = s_generate_ids(mp, p1, n1, "--quiet");
    assert_string_equal(a1, want1);
    /* turn 2 = turn 1 prompt + its 8 answer ids + "<|im_end|>\n" + the new user turn */
    char *ids1 = s_generate_ids(mp, p1, n1, "--ids");
    const char *t2 = "<|im_end|>\n<|im_start|>user\nAnd Germany?<|im_end|>\n<|im_start|>"
                     "assistant\n";
    int32_t *p2 = NULL;
    size_t n2 = 0;
    assert_int_equal(tokenizer_encode(tok, t2, strlen(t2), TOK_PARSE_SPECIAL, &p2, &n2, &err), 0);
    int32_t *all = malloc((n1 + 8 + n2) * sizeof *all);
    memcpy(all, p1, n1 * sizeof *all);
    size_t n = n1;
    for (char *s = ids1, *end; *s; s = end) {
        long v = strtol(s, &end, 10);
        if (end == s) break;
        all[n++] = (int32_t)v;
    }
    assert_int_equal(n, n1 + 8); /* no end-of-generation in 8 tokens for this model */
    memcpy(all + n, p2, n2 * sizeof *all);
    n += n2;
    char *want2 = s_generate_ids(mp, all, n, "--quiet");
    assert_string_equal(a2, want2);
    free(want1);
    free(want2);
    free(ids1);
    free(all);
    free(p1);
    free(p2);
    free(a1);
    free(a2);
    free(a3);
    tokenizer_destroy(&tok);
    gguf_close(&g);
    th_run_out_free(&r);
}

static void test_chat_end_of_input_and_usage(void **state) {
    (void)state;
    char mp[4096];
    th_data_path(mp, sizeof mp, QWEN);
    /* a fixed seed: with the clock's, about 1 seed in 60 samples a token holding a newline and
     * the line count below is off (seen in CI) */
    const char *a1[] = {"chat", "--model", mp, "-n", "4", "--seed", "1", NULL};
    th_run_out r = s_run(a1, "Hello\n\n/unknown\n"); /* no /quit: end of input ends the chat */
    assert_int_equal(r.status, 0);
    assert_int_equal(s_count(r.out, "\n"), 1);
    assert_non_null(strstr(r.err, "unknown command /unknown"));
    th_run_out_free(&r);
    const char *a2[] = {"chat", NULL};
    r = s_run(a2, "");
    assert_int_equal(r.status, 2);
    assert_non_null(strstr(r.err, "give --model FILE or --pipeline RUN_DIR"));
    th_run_out_free(&r);
    const char *a3[] = {"chat", "--model", "m.gguf", "--pipeline", "/tmp/x", NULL};
    r = s_run(a3, "");
    assert_int_equal(r.status,
                     2); /* one backend or the other (tests/integration/test_chat_pipeline.c) */
    assert_non_null(strstr(r.err, "give --model FILE or --pipeline RUN_DIR"));
    th_run_out_free(&r);
    const char *a4[] = {"chat", "--help", NULL};
    r = s_run(a4, "");
    assert_int_equal(r.status, 0);
    assert_non_null(strstr(r.out, "/reset"));
    th_run_out_free(&r);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_chat_scripted_conversation),
        cmocka_unit_test(test_chat_end_of_input_and_usage),
    };
    alarm(600);
    return cmocka_run_group_tests(tests, NULL, NULL);
}
