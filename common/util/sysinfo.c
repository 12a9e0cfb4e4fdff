/* sysinfo: CPU model and PSS from /proc; see sysinfo.h. */
#include "util/sysinfo.h"

#include <stdio.h>
#include <string.h>

void sysinfo_cpu_model(char *buf, size_t cap) {
    snprintf(buf, cap, "unknown CPU");
    FILE *f = fopen("/proc/cpuinfo", "r");
    if (!f) return;
    char line[512];
    while (fgets(line, sizeof line, f)) {
        if (strncmp(line, "model name", 10)) continue;
        const char *p = strchr(line, ':');
        if (p) {
            p += p[1] == ' ' ? 2 : 1;
            snprintf(buf, cap, "%.*s", (int)strcspn(p, "\n"), p);
        }
        break;
    }
    fclose(f);
}

size_t sysinfo_pss(int pid) {
    char path[64];
    if (pid > 0)
        snprintf(path, sizeof path, "/proc/%d/smaps_rollup", pid);
    else
        snprintf(path, sizeof path, "/proc/self/smaps_rollup");
    FILE *f = fopen(path, "r");
    if (!f) return 0;
    char line[256];
    size_t kb = 0;
    while (fgets(line, sizeof line, f))
        if (sscanf(line, "Pss: %zu kB", &kb) == 1) break;
    fclose(f);
    return kb * 1024;
}
