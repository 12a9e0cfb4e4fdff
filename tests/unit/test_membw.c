/* test_membw: the read-bandwidth test of `stpipe bench` (util/membw.h) gives a plausible figure
 * on 1 and 2 threads, sizes its buffer beyond the last-level cache within its bounds and refuses
 * a buffer it cannot allocate; the steal reading of /proc/stat (util/sysinfo.h) is a share and
 * the CPU line names the family and model of the first processor. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <string.h>

#include "util/membw.h"
#include "util/sysinfo.h"

/* Any memory this century reads between 0.2 and 2000 GB/s; a broken timer or a loop the
 * compiler dropped lands outside. */
static void s_plausible(double gbps) {
    if (!(gbps > 0.2 && gbps < 2000)) fail_msg("implausible bandwidth %.3f GB/s", gbps);
}

static void test_membw_plausible_figures(void **state) {
    (void)state;
    threadpool *tp = NULL;
    stp_err err = {0};
    assert_int_equal(threadpool_new(&tp, 2, &err), 0);
    membw_result r;
    /* 64 MiB keeps the test short; the default size is checked below */
    assert_int_equal(membw_measure(tp, (size_t)64 << 20, 2, &r, &err), 0);
    assert_int_equal(r.n_threads, 2);
    assert_true(r.bytes == (size_t)64 << 20);
    s_plausible(r.gbps_1);
    s_plausible(r.gbps_n);
    assert_true(r.seconds > 0 && r.seconds < 60);
    threadpool_destroy(&tp);

    assert_int_equal(membw_measure(NULL, (size_t)16 << 20, 1, &r, &err), 0);
    assert_int_equal(r.n_threads, 1);
    s_plausible(r.gbps_1);
    s_plausible(r.gbps_n);
}

static void test_membw_default_size_beyond_llc(void **state) {
    (void)state;
    size_t b = membw_default_bytes();
    assert_true(b >= (size_t)256 << 20);
    assert_true(b <= (size_t)1 << 30);
}

static void test_membw_refuses_impossible_buffer(void **state) {
    (void)state;
    stp_err err = {0};
    membw_result r;
    assert_int_equal(membw_measure(NULL, (size_t)1 << 62, 1, &r, &err), STP_ENOMEM);
    assert_non_null(strstr(err.msg, "MiB"));
}

static void test_membw_steal_share(void **state) {
    (void)state;
    sysinfo_cpu_time a, b;
    assert_int_equal(sysinfo_cpu_time_read(&a), 0);
    assert_true(a.total > 0 && a.steal <= a.total);
    volatile double x = 0;
    for (int i = 0; i < 20000000; i++) /* let the clock tick */
        x += i;
    assert_int_equal(sysinfo_cpu_time_read(&b), 0);
    double s = sysinfo_steal_share(&a, &b);
    assert_true(s >= 0 && s <= 1);
    assert_true(sysinfo_steal_share(&b, &a) == 0); /* readings out of order */
    sysinfo_cpu_time c = {.total = 100, .steal = 10}, d = {.total = 300, .steal = 60};
    assert_true(sysinfo_steal_share(&c, &d) == 0.25);
}

/* The CPU line: the first processor's name with its family and model ("model" is not "model
 * name"), the name alone when the numbers are missing, "unknown CPU" without a name. */
static void s_cpu_of(const char *text, char *buf, size_t cap) {
    FILE *f = fmemopen((void *)text, strlen(text), "r");
    assert_non_null(f);
    sysinfo_cpu_model_parse(f, buf, cap);
    fclose(f);
}

static void test_sysinfo_cpu_model(void **state) {
    (void)state;
    char buf[256];
    s_cpu_of("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\n"
             "model name\t: AMD EPYC\nstepping\t: 1\n\nprocessor\t: 1\ncpu family\t: 25\n"
             "model\t\t: 17\nmodel name\t: other\n",
             buf, sizeof buf);
    assert_string_equal(buf, "AMD EPYC (family 26, model 2)");
    /* a line longer than the parser's buffer, its newline alone in the last piece: not a blank
     * line ending the block */
    char text[1024];
    snprintf(text, sizeof text, "flags\t\t: %0*d\nmodel name\t: Long Flags CPU\n", 511 - 9, 0);
    s_cpu_of(text, buf, sizeof buf);
    assert_string_equal(buf, "Long Flags CPU");
    s_cpu_of("model name\t: Intel(R) Xeon(R) Processor\nflags\t\t: fpu\n", buf, sizeof buf);
    assert_string_equal(buf, "Intel(R) Xeon(R) Processor");
    s_cpu_of("cpu family\t: 6\nmodel\t\t: 143\n", buf, sizeof buf);
    assert_string_equal(buf, "unknown CPU (family 6, model 143)");
    s_cpu_of("", buf, sizeof buf);
    assert_string_equal(buf, "unknown CPU");
    sysinfo_cpu_model(buf, sizeof buf); /* this machine's: some text, never empty */
    assert_true(buf[0] != 0);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_membw_plausible_figures),
        cmocka_unit_test(test_membw_default_size_beyond_llc),
        cmocka_unit_test(test_membw_refuses_impossible_buffer),
        cmocka_unit_test(test_membw_steal_share),
        cmocka_unit_test(test_sysinfo_cpu_model),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
