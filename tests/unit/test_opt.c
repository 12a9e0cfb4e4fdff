/* test_opt: the option table parser (common/opt): defaults, environment fallback, argv beating
 * the environment, "--name value" and "--name=value", flags, bounds and malformed values with
 * errors naming the option or variable, custom parsers, unknown options (an error, or kept in
 * argv for a second parser), and the help text generated from the table; short aliases (-t),
 * float and uint64 fields, and unbounded numbers (the CLI's sampling options). */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdbool.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
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
    {"--threads", NULL, OPT_INT, 1, 256, "1", "N", "compute threads", F(threads), NULL, NULL},
    {"--prefetch", "STP_T_PREFETCH", OPT_INT, -1, 64, "-1", "N", "sent ahead", F(prefetch), NULL,
     NULL},
    {NULL, "STP_T_HALF_LIFE", OPT_DOUBLE, 0, 1000, NULL, "T", "half-life", F(half_life), NULL,
     NULL},
    {"--model", NULL, OPT_STR, 0, 0, NULL, "FILE", "GGUF model", F(model), NULL, NULL},
    {"--verbose", "STP_T_VERBOSE", OPT_FLAG, 0, 0, NULL, NULL, "log more", F(verbose), NULL, NULL},
    {"--mode", NULL, OPT_FN, 0, 0, "a", "a|b", "mode", F(mode), s_mode, NULL},
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

/* The help text of a table (malloc'd), and its length. */
static char *s_help(const opt_def *t, size_t n, size_t *len) {
    char *buf = NULL;
    size_t l = 0;
    FILE *f = open_memstream(&buf, &l);
    assert_non_null(f);
    opt_help(t, n, f);
    fclose(f);
    if (len) *len = l;
    return buf;
}

static void test_help(void **st) {
    (void)st;
    size_t len = 0;
    char *buf = s_help(s_t, N, &len);
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

typedef struct t_more {
    int threads;
    float temp;
    uint64_t seed;
    const char *model;
    bool help;
} t_more;

#define G(x) offsetof(t_more, x)
static const opt_def s_more[] = {
    {"--threads", NULL, OPT_INT, 1, 256, "2", "N", "compute threads", G(threads), NULL, "-t"},
    {"--temp", NULL, OPT_FLOAT, -INFINITY, INFINITY, "0.6", "T", "temperature", G(temp), NULL,
     NULL},
    {"--seed", NULL, OPT_U64, 0, 4611686018427387904.0, "-1", "S", "seed (-1: clock)", G(seed),
     NULL, NULL},
    {"--model", NULL, OPT_STR, 0, 0, NULL, "FILE", "GGUF model", G(model), NULL, "-m"},
    {"--help", NULL, OPT_FLAG, 0, 0, NULL, NULL, "this help", G(help), NULL, "-h"},
};
#undef G
#define N_MORE (sizeof s_more / sizeof s_more[0])

static int s_more_run(t_more *o, int argc, char **argv, stp_err *err) {
    memset(o, 0x5a, sizeof *o);
    return opt_parse(s_more, N_MORE, o, &argc, argv, OPT_NO_ENV, err);
}

static void s_more_err(char **argv, int argc, const char *want) {
    t_more o;
    stp_err err = {0};
    assert_int_equal(s_more_run(&o, argc, argv, &err), STP_EINVAL);
    if (!strstr(err.msg, want)) fail_msg("'%s' lacks '%s'", err.msg, want);
}

static void test_alias_float_u64(void **st) {
    (void)st;
    t_more o;
    stp_err err = {0};
    /* defaults: a float, and the "-1" marker of an unset uint64 (outside the range: not checked) */
    assert_int_equal(s_more_run(&o, 1, (char *[]){"p", NULL}, &err), 0);
    assert_int_equal(o.threads, 2);
    assert_true(o.temp == (float)0.6);
    assert_true(o.seed == UINT64_MAX);
    assert_null(o.model);
    assert_false(o.help);
    /* an alias is its option: "-t 8", "-m=x", "-h" */
    char *a1[] = {"p",      "-t",   "8",      "-m=x.gguf",           "-h",
                  "--temp", "-1.5", "--seed", "4611686018427387904", NULL};
    assert_int_equal(s_more_run(&o, 9, a1, &err), 0);
    assert_int_equal(o.threads, 8);
    assert_string_equal(o.model, "x.gguf");
    assert_true(o.help);
    assert_true(o.temp == -1.5f);
    assert_true(o.seed == 4611686018427387904ull);
    char *a2[] = {"p", "--threads=3", "--seed", "0", "--temp=1e30", NULL};
    assert_int_equal(s_more_run(&o, 5, a2, &err), 0);
    assert_int_equal(o.threads, 3);
    assert_true(o.seed == 0);
    assert_true(o.temp == (float)1e30);
    /* errors name the form typed */
    s_more_err((char *[]){"p", "-t", "0", NULL}, 3, "-t needs an integer in 1..256 (got '0')");
    s_more_err((char *[]){"p", "-m", NULL}, 2, "-m needs a value");
    s_more_err((char *[]){"p", "-tx", NULL}, 2, "unknown option '-tx'");
    /* unbounded numbers: any finite value, and one a float holds */
    s_more_err((char *[]){"p", "--temp", "x", NULL}, 3, "--temp needs a number (got 'x')");
    s_more_err((char *[]){"p", "--temp", "inf", NULL}, 3, "--temp needs a number");
    s_more_err((char *[]){"p", "--temp", "1e39", NULL}, 3, "(got '1e39')");
    /* uint64: the range, no sign on the command line */
    s_more_err((char *[]){"p", "--seed", "-1", NULL}, 3,
               "--seed needs an integer in 0..4611686018427387904 (got '-1')");
    s_more_err((char *[]){"p", "--seed", "4611686018427387905", NULL}, 3, "--seed needs");
    s_more_err((char *[]){"p", "--seed", "99999999999999999999", NULL}, 3, "--seed needs");
    s_more_err((char *[]){"p", "--seed", "1x", NULL}, 3, "--seed needs");
    /* help: "-t, --threads N", no range for an unbounded number, the uint64's range */
    char *buf = s_help(s_more, N_MORE, NULL);
    assert_non_null(strstr(buf, "-t, --threads N"));
    assert_non_null(strstr(buf, "-h, --help "));
    assert_non_null(strstr(buf, "temperature [default 0.6]"));
    assert_non_null(strstr(buf, "(0..4611686018427387904) [default -1]"));
    free(buf);
    assert_ptr_equal(opt_find(s_more, N_MORE, "-m"), &s_more[3]);
    assert_null(opt_find(s_more, N_MORE, "-"));
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_defaults),        cmocka_unit_test(test_argv_forms),
        cmocka_unit_test(test_env_fallback),    cmocka_unit_test(test_errors),
        cmocka_unit_test(test_keep_unknown),    cmocka_unit_test(test_help),
        cmocka_unit_test(test_alias_float_u64),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
