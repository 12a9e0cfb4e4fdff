/* stats: a stage's counters and latency histograms, published on its stats socket.
 *
 * Counters are named uint64 values (messages by type, bytes moved, invalid messages by kind,
 * cache hits, queue depth as a gauge). Latencies go into log-scale histograms (8 buckets per
 * power of two from 1 us, so a quantile is within 9% of the truth) and are published as
 * p50/p90/p99/max/sum. One stats object per stage, used from the stage's main thread only.
 * The stats socket is a PUB socket: it never reads, so it accepts no commands. */
#ifndef STP_STATS_H
#define STP_STATS_H

#include <stdbool.h>
#include <stdint.h>

#include "util/stp_err.h"

#define STATS_MAX_COUNTERS 64
#define STATS_MAX_LATENCIES 24
#define STATS_BUCKETS 256
#define STATS_MAX_TABLES 4

typedef struct stats stats;

int stats_new(stats **out, const char *stage, stp_err *err);
void stats_destroy(stats **self_p);

void stats_add(stats *s, const char *name, uint64_t v);
void stats_set(stats *s, const char *name, uint64_t v); /* gauge */
uint64_t stats_get(const stats *s, const char *name);
void stats_latency(stats *s, const char *name, double us);
/* Records now - sent_us (a sender's msg_now_us stamp) as a latency when it is plausible (the
 * sender shares this host's monotonic clock: 0..10 s ago); else nothing. */
void stats_handover(stats *s, const char *name, double sent_us);
/* Quantile q (0..1) of a latency, in us (0 if none recorded). */
double stats_quantile(const stats *s, const char *name, double q);

/* Publishes the caller's rows x cols counters (row-major) as table `name` with every report.
 * The caller owns v, keeps it alive as long as s and updates it from the stats' thread; a
 * second call with the same name replaces the first. Beyond STATS_MAX_TABLES: ignored. */
void stats_table(stats *s, const char *name, const uint64_t *v, int rows, int cols);

/* Counts an invalid message of the given kind ("bad.<kind>"); true the first time, so the
 * caller logs each kind once. */
bool stats_bad(stats *s, const char *kind);

/* Publishes a StatsReport (stats.proto) on a PUB socket; at most every interval_ms unless
 * force. */
int stats_publish(stats *s, void *pub, double interval_ms, bool force);

#endif
