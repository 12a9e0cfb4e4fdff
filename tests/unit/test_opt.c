/* test_opt: the option table parser (common/opt): defaults, environment fallback, argv beating
 * the environment, "--name value" and "--name=value", flags, bounds and malformed values with
 * errors naming the option or variable, custom parsers, unknown options (an error, or kept in
 * argv for a second parser), and the help text generated from the table. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdbool.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "opt/opt.h"

typedef struct t_opts {
    int threads;
    int prefetch;
    double half_life;
    const char *model;
    bool verbose;
    int mode; /* via s_mode: "a" -> 1, "b" -> 2 */
} t_opts;

static int s_mode(const char *v, void *field, stp_err *err) {
    if (!strcmp(v, "a") || !strcmp(v, "b")) {
        *(int *)field = v[0] - 'a' + 1;
        return 0;
    }
    return stp_err_set(err, STP_EINVAL, "'%s': a or b", v);
}

#define F(x) offsetof(t_opts, x)
static const opt_def s_t[] = {
    {"--threads", NULL, OPT_INT, 1, 256, "1", "N", "compute threads", F(threads), NULL},
    {"--prefetch", "STP_T_PREFETCH", OPT_INT, -1, 64, "-1", "N", "sent ahead", F(prefetch), NULL},
    {NULL, "STP_T_HALF_LIFE", OPT_DOUBLE, 0, 1000, NULL, "T", "half-life", F(half_life), NULL},
    {"--model", NULL, OPT_STR, 0, 0, NULL, "FILE", "GGUF model", F(model), NULL},
    {"--verbose", "STP_T_VERBOSE", OPT_FLAG, 0, 0, NULL, NULL, "log more", F(verbose), NULL},
    {"--mode", NULL, OPT_FN, 0, 0, "a", "a|b", "mode", F(mode), s_mode},
};
#undef F
#define N (sizeof s_t / sizeof s_t[0])

static int s_run(t_opts *o, int flags, stp_err *err, int *argc, char **argv) {
    memset(o, 0x5a, sizeof *o); /* defaults must overwrite everything */
    return opt_parse(s_t, N, o, argc, argv, flags, err);
}

static void s_clear_env(void) {
    unsetenv("STP_T_PREFETCH");
    unsetenv("STP_T_HALF_LIFE");
    unsetenv("STP_T_VERBOSE");
}

static void test_defaults(void **st) {
    (void)st;
    s_clear_env();
    char *argv[] = {"prog", NULL};
    int argc = 1;
    t_opts o;
    stp_err err = {0};
    assert_int_equal(s_run(&o, 0, &err, &argc, argv), 0);
    assert_int_equal(o.threads, 1);
    assert_int_equal(o.prefetch, -1);
    assert_true(o.half_life == 0.0);
    assert_null(o.model);
    assert_false(o.verbose);
    assert_int_equal(o.mode, 1);
}

static void test_argv_forms(void **st) {
    (void)st;
    s_clear_env();
    char *argv[] = {"prog", "--threads",    "8", "--model=m.gguf", "--verbose", "--mode",
                    "b",    "--prefetch=0", NULL};
    int argc = 8;
    t_opts o;
    stp_err err = {0};
    assert_int_equal(s_run(&o, 0, &err, &argc, argv), 0);
    assert_int_equal(o.threads, 8);
    assert_string_equal(o.model, "m.gguf");
    assert_true(o.verbose);
    assert_int_equal(o.mode, 2);
    assert_int_equal(o.prefetch, 0);
}

static void test_env_fallback(void **st) {
    (void)st;
    s_clear_env();
    setenv("STP_T_PREFETCH", "3", 1);
    setenv("STP_T_HALF_LIFE", "12.5", 1);
    setenv("STP_T_VERBOSE", "1", 1);
    char *argv[] = {"prog", NULL};
    int argc = 1;
    t_opts o;
    stp_err err = {0};
    assert_int_equal(s_run(&o, 0, &err, &argc, argv), 0);
    assert_int_equal(o.prefetch, 3);
    assert_true(o.half_life == 12.5);
    assert_true(o.verbose);
    /* argv beats the environment */
    char *argv2[] = {"prog", "--prefetch", "5", NULL};
    argc = 3;
    assert_int_equal(s_run(&o, 0, &err, &argc, argv2), 0);
    assert_int_equal(o.prefetch, 5);
    /* an empty variable counts as unset; OPT_NO_ENV ignores the environment */
    setenv("STP_T_PREFETCH", "", 1);
    argc = 1;
    assert_int_equal(s_run(&o, 0, &err, &argc, argv), 0);
    assert_int_equal(o.prefetch, -1);
    setenv("STP_T_PREFETCH", "7", 1);
    assert_int_equal(s_run(&o, OPT_NO_ENV, &err, &argc, argv), 0);
    assert_int_equal(o.prefetch, -1);
    assert_false(o.verbose);
    s_clear_env();
}

static void s_expect_err(char **argv, int argc, const char *want) {
    t_opts o;
    stp_err err = {0};
    assert_int_equal(s_run(&o, 0, &err, &argc, argv), STP_EINVAL);
    if (!strstr(err.msg, want)) fail_msg("'%s' lacks '%s'", err.msg, want);
}

static void test_errors(void **st) {
    (void)st;
    s_clear_env();
    s_expect_err((char *[]){"p", "--threads", "0", NULL}, 3,
                 "--threads needs an integer in 1..256 (got '0')");
    s_expect_err((char *[]){"p", "--threads", "257", NULL}, 3, "1..256");
    s_expect_err((char *[]){"p", "--threads", "4x", NULL}, 3, "(got '4x')");
    s_expect_err((char *[]){"p", "--threads=", NULL}, 2, "--threads needs an integer");
    s_expect_err((char *[]){"p", "--threads", "99999999999", NULL}, 3, "--threads");
    s_expect_err((char *[]){"p", "--model", NULL}, 2, "--model needs a value");
    s_expect_err((char *[]){"p", "--bogus", NULL}, 2, "unknown option '--bogus'");
    s_expect_err((char *[]){"p", "--threadsX", "1", NULL}, 3, "unknown option '--threadsX'");
    s_expect_err((char *[]){"p", "--mode", "c", NULL}, 3, "--mode: 'c': a or b");
    s_expect_err((char *[]){"p", "--verbose=maybe", NULL}, 2, "--verbose needs 1 or 0");
    setenv("STP_T_PREFETCH", "65", 1);
    s_expect_err((char *[]){"p", NULL}, 1, "STP_T_PREFETCH=65 needs an integer in -1..64");
    s_clear_env();
    setenv("STP_T_HALF_LIFE", "-1", 1);
    s_expect_err((char *[]){"p", NULL}, 1, "STP_T_HALF_LIFE=-1 needs a number in 0..1000");
    s_clear_env();
}

static void test_keep_unknown(void **st) {
    (void)st;
    s_clear_env();
    char *argv[] = {"prog", "--run-dir", "/r", "--threads", "2", "--x=1", "--verbose", NULL};
    int argc = 7;
    t_opts o;
    stp_err err = {0};
    assert_int_equal(s_run(&o, OPT_KEEP_UNKNOWN, &err, &argc, argv), 0);
    assert_int_equal(o.threads, 2);
    assert_true(o.verbose);
    assert_int_equal(argc, 4);
    assert_string_equal(argv[0], "prog");
    assert_string_equal(argv[1], "--run-dir");
    assert_string_equal(argv[2], "/r");
    assert_string_equal(argv[3], "--x=1");
    assert_null(argv[4]);
}

static void test_help(void **st) {
    (void)st;
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    assert_non_null(f);
    opt_help(s_t, N, f);
    fclose(f);
    /* one line per entry, with metavar, range, default and variable */
    int lines = 0;
    for (size_t i = 0; i < len; i++)
        lines += buf[i] == '\n';
    assert_int_equal(lines, (int)N);
    assert_non_null(strstr(buf, "--threads N"));
    assert_non_null(strstr(buf, "compute threads (1..256) [default 1]"));
    assert_non_null(strstr(buf, "[env STP_T_PREFETCH]"));
    assert_non_null(strstr(buf, "STP_T_HALF_LIFE=T"));
    assert_non_null(strstr(buf, "--verbose "));
    assert_null(strstr(buf, "--verbose N"));
    assert_non_null(strstr(buf, "--mode a|b"));
    free(buf);
    assert_non_null(opt_find(s_t, N, "--model=x"));
    assert_null(opt_find(s_t, N, "--mod"));
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_defaults),     cmocka_unit_test(test_argv_forms),
        cmocka_unit_test(test_env_fallback), cmocka_unit_test(test_errors),
        cmocka_unit_test(test_keep_unknown), cmocka_unit_test(test_help),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
