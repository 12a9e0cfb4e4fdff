/* sysinfo: CPU model, PSS and CPU steal from /proc; see sysinfo.h. */
#include "util/sysinfo.h"

#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* The value of a "key<blanks>: value" line of /proc/cpuinfo whose key is exactly `key`, else NULL
 * ("model" must not match "model name"). */
static const char *s_cpuinfo_value(const char *line, const char *key) {
    const size_t n = strlen(key);
    if (strncmp(line, key, n)) return NULL;
    const char *p = line + n + strspn(line + n, "\t ");
    if (*p != ':') return NULL;
    return p + 1 + (p[1] == ' ');
}

void sysinfo_cpu_model_parse(FILE *f, char *buf, size_t cap) {
    char name[256] = "", line[512];
    int family = -1, model = -1;
    const char *v;
    bool line_start = true; /* fgets returns a line longer than the buffer (flags) in pieces */
    while (fgets(line, sizeof line, f)) {
        const bool piece = !line_start;
        line_start = strchr(line, '\n') != NULL;
        if (piece) continue;
        if (line[0] == '\n') break; /* the first processor's block only */
        line[strcspn(line, "\n")] = 0;
        if ((v = s_cpuinfo_value(line, "model name")))
            snprintf(name, sizeof name, "%s", v);
        else if ((v = s_cpuinfo_value(line, "cpu family")))
            family = atoi(v);
        else if ((v = s_cpuinfo_value(line, "model")))
            model = atoi(v);
    }
    if (!name[0]) snprintf(name, sizeof name, "unknown CPU");
    if (family >= 0 && model >= 0)
        snprintf(buf, cap, "%s (family %d, model %d)", name, family, model);
    else
        snprintf(buf, cap, "%s", name);
}

void sysinfo_cpu_model(char *buf, size_t cap) {
    snprintf(buf, cap, "unknown CPU");
    FILE *f = fopen("/proc/cpuinfo", "r");
    if (!f) return;
    sysinfo_cpu_model_parse(f, buf, cap);
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

int sysinfo_cpu_time_read(sysinfo_cpu_time *out) {
    memset(out, 0, sizeof *out);
    FILE *f = fopen("/proc/stat", "r");
    if (!f) return -1;
    unsigned long long v[8] = {0};
    int n = fscanf(f, "cpu %llu %llu %llu %llu %llu %llu %llu %llu", &v[0], &v[1], &v[2], &v[3],
                   &v[4], &v[5], &v[6], &v[7]);
    fclose(f);
    if (n < 4) return -1;
    /* user nice system idle iowait irq softirq steal; guest time is already inside user */
    for (int i = 0; i < n; i++)
        out->total += v[i];
    out->steal = n >= 8 ? v[7] : 0;
    return 0;
}

double sysinfo_steal_share(const sysinfo_cpu_time *a, const sysinfo_cpu_time *b) {
    if (b->total <= a->total || b->steal < a->steal) return 0;
    return (double)(b->steal - a->steal) / (double)(b->total - a->total);
}
