/* th_proc: running programs from tests with deadlines and captured output (see th_proc.h). */
#include "th_proc.h"

#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "th_gguf.h"

extern char **environ;

const char *th_env(const char *k) {
    const char *v = getenv(k);
    return v ? v : "";
}

double th_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

const char *th_bin_path(char *buf, size_t cap, const char *prog) {
    const char *dir = getenv("STP_BIN_DIR");
    snprintf(buf, cap, "%s/%s", dir && *dir ? dir : "build/bin", prog);
    return buf;
}

char *th_slurp(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    if (n < 0) n = 0;
    char *b = malloc((size_t)n + 1);
    size_t r = b ? fread(b, 1, (size_t)n, f) : 0;
    if (b) b[r] = 0;
    fclose(f);
    if (len) *len = r;
    return b;
}

char *th_slurp_str(const char *path) {
    char *s = th_slurp(path, NULL);
    return s ? s : strdup("");
}

pid_t th_spawn(char *const argv[], const char *out_path, const char *err_path) {
    pid_t p = fork();
    if (p == 0) {
        int fd = open(out_path ? out_path : "/dev/null", O_WRONLY | O_CREAT | O_TRUNC, 0600);
        if (fd >= 0) dup2(fd, 1);
        if (err_path) {
            int fe = open(err_path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
            if (fe >= 0) dup2(fe, 2);
        }
        execvp(argv[0], argv);
        _exit(127);
    }
    return p;
}

int th_wait(pid_t p, double timeout_s) {
    if (p < 0) return -1;
    double t0 = th_now();
    while (th_now() - t0 < timeout_s) {
        int st;
        if (waitpid(p, &st, WNOHANG) == p)
            return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
        usleep(20000);
    }
    kill(p, SIGKILL);
    waitpid(p, NULL, 0);
    return -1;
}

int th_run(char *const argv[], const char *out_path, double timeout_s) {
    return th_wait(th_spawn(argv, out_path, NULL), timeout_s);
}

th_run_out th_run_stpipe(const char *const *args, const char *input, const char *tag) {
    char bin[4096], pi[4096], po[4096], pe[4096], name[256];
    th_bin_path(bin, sizeof bin, "stpipe");
    snprintf(name, sizeof name, "%s_stdin.txt", tag);
    th_tmp_path(pi, sizeof pi, name);
    snprintf(name, sizeof name, "%s_stdout.txt", tag);
    th_tmp_path(po, sizeof po, name);
    snprintf(name, sizeof name, "%s_stderr.txt", tag);
    th_tmp_path(pe, sizeof pe, name);
    if (input) {
        FILE *f = fopen(pi, "wb");
        if (f) {
            fputs(input, f);
            fclose(f);
        }
    }
    const char *argv[64];
    int n = 0;
    argv[n++] = bin;
    for (int i = 0; args[i] && n < 63; i++)
        argv[n++] = args[i];
    argv[n] = NULL;
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, 0, input ? pi : "/dev/null", O_RDONLY, 0);
    posix_spawn_file_actions_addopen(&fa, 1, po, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    posix_spawn_file_actions_addopen(&fa, 2, pe, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    pid_t pid;
    int rc = posix_spawn(&pid, bin, &fa, NULL, (char *const *)argv, environ);
    posix_spawn_file_actions_destroy(&fa);
    if (rc) fail_msg("cannot run %s: %s", bin, strerror(rc));
    th_run_out r;
    int st = 0;
    waitpid(pid, &st, 0);
    r.status = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
    r.out = th_slurp_str(po);
    r.err = th_slurp_str(pe);
    unlink(po);
    unlink(pe);
    if (input) unlink(pi);
    return r;
}

void th_run_out_free(th_run_out *r) {
    free(r->out);
    free(r->err);
    r->out = r->err = NULL;
}
