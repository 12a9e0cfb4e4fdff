/* th_proc: running programs from tests with deadlines and captured output (see th_proc.h). */
#include "th_proc.h"

#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
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
    /* read to EOF: /proc files report size 0 */
    size_t cap = 4096, n = 0;
    char *b = malloc(cap + 1);
    while (b) {
        n += fread(b + n, 1, cap - n, f);
        if (n < cap) break;
        char *nb = realloc(b, 2 * cap + 1);
        if (!nb) {
            free(b);
            b = NULL;
            break;
        }
        b = nb;
        cap *= 2;
    }
    fclose(f);
    if (b) b[n] = 0;
    if (len) *len = b ? n : 0;
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

static int s_status(int st) {
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}

int th_exited(pid_t p) {
    int st;
    return p > 0 && waitpid(p, &st, WNOHANG) == p ? s_status(st) : -1;
}

int th_wait(pid_t p, double timeout_s) {
    if (p <= 0) return -1;
    int fd = (int)syscall(SYS_pidfd_open, p, 0), st;
    double end = th_now() + timeout_s;
    for (;;) {
        if (waitpid(p, &st, WNOHANG) == p) {
            if (fd >= 0) close(fd);
            return s_status(st);
        }
        double left = end - th_now();
        if (left <= 0) break;
        if (fd >= 0) { /* readable when p exits */
            struct pollfd pf = {.fd = fd, .events = POLLIN};
            poll(&pf, 1, (int)(left * 1000) + 1);
        } else { /* no pidfd (kernel < 5.3): check again shortly */
            struct timespec d = {0, 2 * 1000 * 1000};
            nanosleep(&d, NULL);
        }
    }
    if (fd >= 0) close(fd);
    kill(p, SIGKILL);
    waitpid(p, NULL, 0);
    return -1;
}

bool th_wait_until(bool (*cond)(void *ctx), void *ctx, double timeout_s) {
    double end = th_now() + timeout_s;
    long ms = 1;
    for (;;) {
        if (cond(ctx)) return true;
        if (th_now() >= end) return false;
        struct timespec d = {0, ms * 1000 * 1000};
        nanosleep(&d, NULL);
        if (ms < 20) ms *= 2;
    }
}

/* Whether pid still runs: a child of ours that exited is seen without reaping it (WNOWAIT). */
static bool s_running(pid_t pid) {
    siginfo_t si;
    memset(&si, 0, sizeof si);
    if (waitid(P_PID, (id_t)pid, &si, WEXITED | WNOHANG | WNOWAIT) == 0) return si.si_pid == 0;
    return kill(pid, 0) == 0;
}

typedef struct s_file_has {
    const char *path, *needle;
    pid_t pid;
    bool gone;
} s_file_has;

static bool s_file_has_cond(void *ctx) {
    s_file_has *c = ctx;
    bool ended = c->pid > 0 && !s_running(c->pid); /* before the read: what it wrote counts */
    size_t len = 0;
    char *s = th_slurp(c->path, &len);
    bool ok = s && (*c->needle ? strstr(s, c->needle) != NULL : len > 0);
    free(s);
    if (!ok && ended) c->gone = true;
    return ok || c->gone;
}

bool th_wait_file_has(const char *path, const char *needle, pid_t pid, double timeout_s) {
    s_file_has c = {path, needle ? needle : "", pid, false};
    return th_wait_until(s_file_has_cond, &c, timeout_s) && !c.gone;
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
