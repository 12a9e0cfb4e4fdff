/* sysinfo: facts about the machine that benchmarks print beside their figures. */
#ifndef STP_SYSINFO_H
#define STP_SYSINFO_H

#include <stddef.h>

/* The CPU's model name from /proc/cpuinfo ("unknown CPU" if it cannot be read). */
void sysinfo_cpu_model(char *buf, size_t cap);
/* Proportional set size of process pid (0 = this process) in bytes, 0 if unknown. */
size_t sysinfo_pss(int pid);

#endif
