/* th_skip: the only ways a test may skip. A CPU-feature skip (this CPU lacks the instruction set
 * a kernel level needs) is allowed anywhere: it prints "CPU-FEATURE SKIP: <test>: needs <level>
 * ..." and is recorded, and th_exit_code() then turns the executable's result into 77, which
 * ctest (SKIP_RETURN_CODE) counts and lists as Skipped. Any other reason a test cannot run fails
 * it under CI=true and is a cmocka skip with the reason printed otherwise. The record is a file
 * per process ($STP_TMP/cpu-skips/<pid>), so the helpers keep no state in memory. */
#ifndef TH_SKIP_H
#define TH_SKIP_H

#include <stdbool.h>

/* The exit code a ctest SKIP_RETURN_CODE stands for. */
#define TH_SKIP_EXIT 77

/* Whether CI=true (then a test that cannot run fails instead of skipping). */
bool th_ci(void);

/* Returns when kernel level `level` ("avx2", "avx512vnni") or a higher one is the process's
 * kernel table. Otherwise: a CPU-feature skip when this CPU lacks the level, and a cannot-run
 * (th_cannot_run) when STP_KERNELS holds it back. */
#define th_need_kern_level(level) th_need_kern_level_at(__func__, (level))
void th_need_kern_level_at(const char *test, const char *level);

/* Records and prints a CPU-feature skip of `test` (level: what it needs) without leaving the
 * test: for tests that run what they can and leave out one level. */
void th_cpu_skip_note(const char *test, const char *level);

/* The test cannot run (why: printed): fails it under CI=true, skips it otherwise. */
#define th_cannot_run(...) th_cannot_run_at(__func__, __VA_ARGS__)
void th_cannot_run_at(const char *test, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* main's exit code from cmocka's result rc: rc when a test failed, else TH_SKIP_EXIT when this
 * process recorded a CPU-feature skip, else 0. */
int th_exit_code(int rc);

#endif
