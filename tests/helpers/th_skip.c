/* th_skip: CPU-feature skips recorded per process, other skips failing under CI (see th_skip.h). */
#include "th_skip.h"

#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kern/kern.h"
#include "th_gguf.h"

bool th_ci(void) {
    const char *v = getenv("CI");
    return v && !strcmp(v, "true");
}

/* ref < avx2 < avx512vnni (kern_ops_all's order); -1 for a name it does not know. */
static int s_rank(const char *level) {
    static const char *const order[] = {"ref", "avx2", "avx512vnni"};
    for (int i = 0; i < 3; i++)
        if (!strcmp(level, order[i])) return i;
    return -1;
}

static const char *s_record_path(char *buf, size_t cap) {
    char name[64];
    snprintf(name, sizeof name, "cpu-skips-%d.txt", (int)getpid());
    return th_tmp_path(buf, cap, name);
}

void th_cpu_skip_note(const char *test, const char *level) {
    const kern_ops *ops[8];
    int n = kern_ops_all(ops, 8);
    char line[512], path[1024];
    snprintf(line, sizeof line, "CPU-FEATURE SKIP: %s: needs the %s kernels; this CPU's best is %s",
             test, level, n > 0 ? ops[n - 1]->level : "?");
    printf("%s\n", line);
    fflush(stdout);
    FILE *f = fopen(s_record_path(path, sizeof path), "a");
    if (!f) fail_msg("%s: cannot record the skip in %s", test, path);
    fprintf(f, "%s\n", line);
    fclose(f);
}

void th_cannot_run_at(const char *test, const char *fmt, ...) {
    char why[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(why, sizeof why, fmt, ap);
    va_end(ap);
    if (th_ci())
        fail_msg("%s cannot run (CI=true, so this fails instead of skipping): %s", test, why);
    printf("SKIP: %s: %s\n", test, why);
    fflush(stdout);
    skip();
}

void th_need_kern_level_at(const char *test, const char *level) {
    if (s_rank(level) < 0) fail_msg("%s: unknown kernel level '%s'", test, level);
    if (s_rank(kern_ops_get()->level) >= s_rank(level)) return;
    const kern_ops *ops[8];
    int n = kern_ops_all(ops, 8);
    if (n > 0 && s_rank(ops[n - 1]->level) >= s_rank(level))
        th_cannot_run_at(test, "STP_KERNELS=%s holds back the %s kernels this CPU has",
                         getenv("STP_KERNELS") ? getenv("STP_KERNELS") : "", level);
    th_cpu_skip_note(test, level);
    skip();
}

int th_exit_code(int rc) {
    char path[1024];
    s_record_path(path, sizeof path);
    bool skipped = access(path, F_OK) == 0;
    unlink(path);
    if (rc) return rc;
    return skipped ? TH_SKIP_EXIT : 0;
}
