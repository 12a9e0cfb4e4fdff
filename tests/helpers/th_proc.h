/* th_proc: test helpers that run programs and read their output, shared by the integration
 * tests (pipeline, fault, stream, msgfuzz, chat, cli, serve). Children are started with
 * fork/execvp, stdout (and optionally stdin/stderr) redirected to files; waiting is bounded
 * by a deadline after which the child is SIGKILLed. No global state; th_-prefixed because
 * every helper file is compiled into every test executable. */
#ifndef TH_PROC_H
#define TH_PROC_H

#include <stdbool.h>
#include <stddef.h>
#include <sys/types.h>

/* getenv(k), or "" when unset. */
const char *th_env(const char *k);
/* CLOCK_MONOTONIC in seconds. */
double th_now(void);
/* $STP_BIN_DIR/prog (build/bin when unset or empty) into buf. */
const char *th_bin_path(char *buf, size_t cap, const char *prog);

/* Whole file as a NUL-terminated malloc'd string (len: its size, may be NULL); NULL when the
 * file cannot be opened. th_slurp_str returns "" (malloc'd) instead of NULL. */
char *th_slurp(const char *path, size_t *len);
char *th_slurp_str(const char *path);

/* Starts argv (PATH searched) with stdout to out_path (NULL: /dev/null) and stderr to err_path
 * (NULL: inherited); returns the pid or -1. */
pid_t th_spawn(char *const argv[], const char *out_path, const char *err_path);
/* Waits for p up to timeout_s: the exit status, 128 + signal, or -1 on timeout (then killed).
 * Woken by the exit itself (a pidfd), not by polling. */
int th_wait(pid_t p, double timeout_s);
/* The exit status of p if it has ended (reaped), else -1 (it still runs). */
int th_exited(pid_t p);

/* Waits until cond(ctx) holds, checking it again after 1, 2, 4 ... (at most 20) ms, up to
 * timeout_s; returns whether it held. The wait for a condition a test cannot be woken by. */
bool th_wait_until(bool (*cond)(void *ctx), void *ctx, double timeout_s);
/* Waits until the file at path contains needle ("": until it is not empty); false on timeout,
 * or as soon as pid (when > 0) has exited without writing it. */
bool th_wait_file_has(const char *path, const char *needle, pid_t pid, double timeout_s);
/* th_wait(th_spawn(argv, out_path, NULL), timeout_s). */
int th_run(char *const argv[], const char *out_path, double timeout_s);

/* One run of $STP_BIN_DIR/stpipe with captured output. */
typedef struct th_run_out {
    int status; /* exit code, or 128 + signal */
    char *out, *err;
} th_run_out;

/* Runs stpipe with args (NULL-terminated, at most 62) and stdin from the text input (NULL:
 * /dev/null), waiting for it to end; stdout and stderr go through $STP_TMP/<tag>_stdout.txt
 * and <tag>_stderr.txt. Fails the
 * test when it cannot be started. */
th_run_out th_run_stpipe(const char *const *args, const char *input, const char *tag);
void th_run_out_free(th_run_out *r);

#endif
