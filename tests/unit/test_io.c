/* test_io: the expert reader (common/io) returns the file's bytes through every path: io_uring
 * with O_DIRECT (a file under STP_TMP, on the build disk), pread (STP_IO=pread), buffered
 * (STP_IO=buffered), and on tmpfs (/dev/shm), which rejects O_DIRECT; misaligned requests are
 * refused while O_DIRECT is on; the asynchronous calls (io_start / io_reap) hand out each request
 * once with its tag. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "io/io.h"

#define N (3u << 20)

static void s_write(const char *path) {
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    for (uint32_t i = 0; i < N / 4; i++) {
        uint32_t v = i * 2654435761u;
        fwrite(&v, 4, 1, f);
    }
    fclose(f);
}

/* Reads the file in uneven aligned pieces (more than the queue depth) and checks every byte. */
static void s_read_check(const char *path, const char *mode, bool expect_direct) {
    if (mode)
        setenv("STP_IO", mode, 1);
    else
        unsetenv("STP_IO");
    io_reader *r = NULL;
    stp_err err = {0};
    assert_int_equal(io_reader_open(&r, path, 4, &err), 0);
    assert_int_equal(io_reader_direct(r), expect_direct);
    uint8_t *buf = aligned_alloc(IO_ALIGN, N);
    memset(buf, 0xAA, N);
    io_req q[12];
    size_t at = 0;
    for (int i = 0; i < 12; i++) {
        size_t len = (i == 11) ? N - at : (size_t)(i % 3 + 1) * 4 * IO_ALIGN;
        q[i] = (io_req){at, len, buf + at};
        at += len;
    }
    assert_int_equal(io_read_all(r, q, 12, &err), 0);
    for (uint32_t i = 0; i < N / 4; i++) {
        uint32_t v;
        memcpy(&v, buf + 4 * (size_t)i, 4);
        assert_int_equal(v, i * 2654435761u);
    }
    assert_int_equal(io_reader_bytes(r), N);
    if (expect_direct) {
        io_req bad = {100, 4096, buf};
        assert_int_equal(io_read_all(r, &bad, 1, &err), STP_EINVAL);
    }
    free(buf);
    io_reader_close(&r);
    unsetenv("STP_IO");
}

static void test_io_reads_every_path_on_disk(void **st) {
    (void)st;
    char path[1024];
    mkdir(getenv("STP_TMP"), 0700);
    snprintf(path, sizeof path, "%s/io-%d.bin", getenv("STP_TMP"), (int)getpid());
    s_write(path);
    s_read_check(path, NULL, true);
    s_read_check(path, "pread", true);
    s_read_check(path, "buffered", false);
    s_read_check(path, "pread-buffered", false);
    unlink(path);
}

static void s_tmpfs_path(char *path, size_t cap) {
    snprintf(path, cap, "/dev/shm/stp-io-test-%d", (int)getpid());
}

/* Removes the tmpfs file even when an assertion ended the test early. */
static int s_tmpfs_teardown(void **st) {
    (void)st;
    char path[128];
    s_tmpfs_path(path, sizeof path);
    unlink(path);
    return 0;
}

static void test_io_tmpfs_falls_back_to_buffered(void **st) {
    (void)st;
    char path[128];
    s_tmpfs_path(path, sizeof path);
    s_write(path);
    /* tmpfs refuses O_DIRECT at open (or at read time: the reader reopens buffered) */
    io_reader *r = NULL;
    stp_err err = {0};
    assert_int_equal(io_reader_open(&r, path, 4, &err), 0);
    bool direct = io_reader_direct(r);
    io_reader_close(&r);
    s_read_check(path, NULL, direct);
    s_read_check(path, "pread", direct);
    unlink(path);
}

/* io_start / io_reap: every request completes once, with its tag, and its bytes are the file's;
 * more requests than io_capacity are refused (STP_EBUSY) until some are reaped. */
static void s_async_check(const char *path, const char *mode) {
    if (mode)
        setenv("STP_IO", mode, 1);
    else
        unsetenv("STP_IO");
    io_reader *r = NULL;
    stp_err err = {0};
    assert_int_equal(io_reader_open(&r, path, 2, &err), 0);
    assert_int_equal(io_capacity(r), 2);
    uint8_t *buf = aligned_alloc(IO_ALIGN, N);
    memset(buf, 0xAA, N);
    const uint64_t piece = N / 3;
    int seen[3] = {0}, started = 0, done = 0;
    while (done < 3) {
        while (started < 3) {
            io_req q = {started * piece, piece, buf + started * piece};
            int rc = io_start(r, &q, 100 + (uint64_t)started, &err);
            if (rc == STP_EBUSY) break;
            assert_int_equal(rc, 0);
            started++;
        }
        assert_true(io_in_flight(r) <= 2);
        io_done d[4];
        int got = io_reap(r, d, 4, true);
        assert_true(got > 0);
        for (int i = 0; i < got; i++) {
            assert_int_equal(d[i].rc, 0);
            assert_true(d[i].tag >= 100 && d[i].tag < 103);
            seen[d[i].tag - 100]++;
            done++;
        }
    }
    assert_int_equal(io_in_flight(r), 0);
    for (int i = 0; i < 3; i++)
        assert_int_equal(seen[i], 1);
    for (uint32_t i = 0; i < N / 4; i++) {
        uint32_t v;
        memcpy(&v, buf + 4 * (size_t)i, 4);
        assert_int_equal(v, i * 2654435761u);
    }
    io_reader_close(&r);
    free(buf);
    unsetenv("STP_IO");
}

static void test_io_async_reads_complete_once_with_their_tags(void **st) {
    (void)st;
    char path[1024];
    mkdir(getenv("STP_TMP"), 0700);
    snprintf(path, sizeof path, "%s/io-async-%d.bin", getenv("STP_TMP"), (int)getpid());
    s_write(path);
    s_async_check(path, NULL);
    s_async_check(path, "pread");
    s_async_check(path, "buffered");
    unlink(path);
}

static void test_io_missing_file_is_an_error(void **st) {
    (void)st;
    io_reader *r = NULL;
    stp_err err = {0};
    assert_int_equal(io_reader_open(&r, "/nonexistent/x", 4, &err), STP_EIO);
    assert_null(r);
    assert_non_null(strstr(err.msg, "/nonexistent/x"));
}

int main(void) {
    const struct CMUnitTest t[] = {
        cmocka_unit_test(test_io_reads_every_path_on_disk),
        cmocka_unit_test_teardown(test_io_tmpfs_falls_back_to_buffered, s_tmpfs_teardown),
        cmocka_unit_test(test_io_async_reads_complete_once_with_their_tags),
        cmocka_unit_test(test_io_missing_file_is_an_error),
    };
    return cmocka_run_group_tests(t, NULL, NULL);
}
