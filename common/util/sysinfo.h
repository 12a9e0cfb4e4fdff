/* sysinfo: facts about the machine that benchmarks print beside their figures (CPU model,
 * PSS, CPU steal from /proc/stat). */
#ifndef STP_SYSINFO_H
#define STP_SYSINFO_H

#include <stddef.h>
#include <stdio.h>

/* The CPU's model name from /proc/cpuinfo with its family and model numbers, which tell apart
 * CPUs a hypervisor gives one name ("AMD EPYC (family 26, model 2)": AMD's family 25 is Zen 3 or
 * Zen 4, family 26 Zen 5); "unknown CPU" if it cannot be read. */
void sysinfo_cpu_model(char *buf, size_t cap);
/* The same from an open cpuinfo text (its first processor block). */
void sysinfo_cpu_model_parse(FILE *f, char *buf, size_t cap);
/* Proportional set size of process pid (0 = this process) in bytes, 0 if unknown. */
size_t sysinfo_pss(int pid);

/* The machine's CPU time from /proc/stat's "cpu" line, in clock ticks: all of it and the part
 * the hypervisor gave to other guests (steal). Two readings bracket a run. */
typedef struct sysinfo_cpu_time {
    unsigned long long total, steal;
} sysinfo_cpu_time;
/* 0, or -1 when /proc/stat cannot be read or parsed (then *out is zeroed). */
int sysinfo_cpu_time_read(sysinfo_cpu_time *out);
/* Steal as a share (0..1) of the CPU time between two readings; 0 when nothing elapsed. */
double sysinfo_steal_share(const sysinfo_cpu_time *a, const sysinfo_cpu_time *b);

#endif
