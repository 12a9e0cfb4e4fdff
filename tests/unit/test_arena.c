/* test_arena: buffers carved in order (64-byte aligned, never past the reservation; the room a
 * reservation needs), and 2 MiB pages behind them where the kernel's THP mode allows (madvise or
 * always): the kernel's own count (/proc/self/smaps AnonHugePages of the mapping) says so; with
 * STP_HUGEPAGES=0 and THP "madvise" the mapping has none. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "util/arena.h"

#define MIB ((size_t)1 << 20)

/* The kernel's THP mode: "always", "madvise" or "never" (the bracketed word), "" if unknown. */
static void s_thp_mode(char *out, size_t n) {
    out[0] = '\0';
    FILE *f = fopen("/sys/kernel/mm/transparent_hugepage/enabled", "r");
    if (!f) return;
    char line[128] = "";
    if (fgets(line, sizeof line, f)) {
        char *a = strchr(line, '['), *b = a ? strchr(a, ']') : NULL;
        if (a && b && (size_t)(b - a) < n) {
            memcpy(out, a + 1, (size_t)(b - a - 1));
            out[b - a - 1] = '\0';
        }
    }
    fclose(f);
}

/* AnonHugePages (kB) of the mapping holding p, from /proc/self/smaps; -1 if not found. */
static long s_huge_kb(const void *p) {
    FILE *f = fopen("/proc/self/smaps", "r");
    if (!f) return -1;
    char line[512];
    bool in = false;
    long kb = -1;
    const uintptr_t a = (uintptr_t)p;
    while (fgets(line, sizeof line, f)) {
        unsigned long lo, hi;
        if (sscanf(line, "%lx-%lx ", &lo, &hi) == 2 && strchr(line, '-') < strchr(line, ' ')) {
            in = a >= lo && a < hi;
            continue;
        }
        if (in && sscanf(line, "AnonHugePages: %ld kB", &kb) == 1) break;
    }
    fclose(f);
    return kb;
}

static void test_arena_carves_in_order(void **state) {
    (void)state;
    arena *a = NULL;
    stp_err err = {0};
    if (arena_new(&a, 3 * MIB, &err)) fail_msg("%s", err.msg);
    assert_int_equal(arena_used(a), 0);
    uint8_t *p = arena_alloc(a, 100), *q = arena_alloc(a, 1000);
    assert_non_null(p);
    assert_non_null(q);
    assert_int_equal((uintptr_t)p % (2 * MIB), 0); /* the mapping starts on a huge page */
    assert_int_equal((uintptr_t)q % 64, 0);
    assert_ptr_equal(q, p + 128); /* in order, the next 64-byte boundary */
    assert_int_equal(arena_used(a), 128 + 1000);
    memset(p, 1, 100);
    memset(q, 2, 1000);
    assert_int_equal(p[99], 1);
    /* what a reservation for buffers needs: each padded to the next 64-byte boundary */
    assert_int_equal(arena_room(1, 100) + arena_room(1, 1000), arena_used(a) + 24);
    assert_int_equal(arena_room(3, 64), 192);
    assert_int_equal(arena_room(0, 100), 0);
    /* 3 MiB rounds up to 4: what is left fits, one byte more does not, and nothing moves */
    const size_t left = 4 * MIB - 1152;
    assert_null(arena_alloc(a, left + 1));
    assert_null(arena_alloc(a, SIZE_MAX));
    assert_int_equal(arena_used(a), 1128);
    uint8_t *r = arena_alloc(a, left);
    assert_non_null(r);
    r[left - 1] = 3; /* the last byte is backed */
    assert_null(arena_alloc(a, 1));
    arena_destroy(&a);
    assert_null(a);
    arena_destroy(&a); /* twice: a no-op */
    assert_null(arena_alloc(NULL, 1));
}

/* n MiB written in a fresh arena; returns the mapping's AnonHugePages in kB */
static long s_touched_huge_kb(size_t n_mib) {
    arena *a = NULL;
    stp_err err = {0};
    if (arena_new(&a, n_mib * MIB, &err)) fail_msg("%s", err.msg);
    uint8_t *p = arena_alloc(a, n_mib * MIB);
    assert_non_null(p);
    memset(p, 7, n_mib * MIB);
    const long kb = s_huge_kb(p);
    arena_destroy(&a);
    return kb;
}

static void test_arena_gets_huge_pages(void **state) {
    (void)state;
    char mode[32];
    s_thp_mode(mode, sizeof mode);
    unsetenv("STP_HUGEPAGES");
    const long kb = s_touched_huge_kb(8);
    print_message("THP mode '%s': 8 MiB written, %ld kB in huge pages\n", mode, kb);
    assert_true(kb >= 0);
    /* a host out of contiguous memory may still give fewer; at least one of four */
    if (!strcmp(mode, "always") || !strcmp(mode, "madvise")) assert_true(kb >= 2048);
    setenv("STP_HUGEPAGES", "0", 1);
    const long off = s_touched_huge_kb(8);
    unsetenv("STP_HUGEPAGES");
    if (!strcmp(mode, "madvise")) assert_int_equal(off, 0);
}

static void test_arena_advise_needs_a_whole_huge_page(void **state) {
    (void)state;
    arena *a = NULL;
    stp_err err = {0};
    if (arena_new(&a, 4 * MIB, &err)) fail_msg("%s", err.msg);
    uint8_t *p = arena_alloc(a, 4 * MIB);
    assert_false(arena_advise(p + 64, MIB)); /* no whole 2 MiB page inside */
    assert_false(arena_advise(NULL, 4 * MIB));
    assert_true(arena_advise(p, 4 * MIB));
    setenv("STP_HUGEPAGES", "0", 1);
    assert_false(arena_advise(p, 4 * MIB));
    unsetenv("STP_HUGEPAGES");
    arena_destroy(&a);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_arena_carves_in_order),
        cmocka_unit_test(test_arena_gets_huge_pages),
        cmocka_unit_test(test_arena_advise_needs_a_whole_huge_page),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
