/* test_membw: the read-bandwidth test of `stpipe bench` (util/membw.h) gives a plausible figure
 * on 1 and 2 threads, sizes its buffer beyond the last-level cache within its bounds and refuses
 * a buffer it cannot allocate; the steal reading of /proc/stat (util/sysinfo.h) is a share. */
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

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_membw_plausible_figures),
        cmocka_unit_test(test_membw_default_size_beyond_llc),
        cmocka_unit_test(test_membw_refuses_impossible_buffer),
        cmocka_unit_test(test_membw_steal_share),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
