/* cache_policy: which cached entry to evict, apart from any cache's mechanism (PostgreSQL's
 * freelist.c beside its buffer manager). The storage daemon keeps the expert pool (reads, slot
 * states, protocol) and asks this module only two things: "these entries were used now" and
 * "which of these candidates goes". No I/O, no clock: time is the caller's tick (one per
 * decision in the daemon).
 *
 *   lfu  least frequently used with exponential decay: each use adds 1 to a count that halves
 *        every `half_life` ticks; the lowest decayed count goes, ties to the least recent use.
 *   lru  least recently used.
 * Either way a tie on everything goes to the first candidate in the caller's order.
 * Entries are 0..n_entries-1 (the daemon's layer * n_expert + expert). See README.md. */
#ifndef STP_CACHE_POLICY_H
#define STP_CACHE_POLICY_H

#include <stdint.h>

#include "util/stp_err.h"

/* lfu's default half-life in tokens (the storage daemon's ticks are decisions: tokens *
 * n_layer); why 32: docs/BENCHMARKS.md. */
#define CACHE_POLICY_HALF_LIFE 32

typedef enum cache_policy_kind { CACHE_POLICY_LFU = 0, CACHE_POLICY_LRU = 1 } cache_policy_kind;

typedef struct cache_policy_config {
    cache_policy_kind kind;
    int n_entries;
    double half_life; /* lfu: ticks after which a use counts half (> 0) */
} cache_policy_config;

typedef struct cache_policy cache_policy;

int cache_policy_new(cache_policy **out, const cache_policy_config *cfg, stp_err *err);
void cache_policy_destroy(cache_policy **self_p);

/* "lfu" / "lru" -> kind; STP_EINVAL naming the accepted ones otherwise. */
int cache_policy_parse(const char *name, cache_policy_kind *kind, stp_err *err);
const char *cache_policy_name(cache_policy_kind kind);

/* Time moves on by one tick (the daemon: a decision). */
void cache_policy_tick(cache_policy *p);
/* Entry e was used at the current tick. */
void cache_policy_touch(cache_policy *p, int e);
/* lfu: e's decayed use count now; lru: 0. */
double cache_policy_score(const cache_policy *p, int e);
/* The tick of e's last use (0: never). */
uint64_t cache_policy_last_use(const cache_policy *p, int e);
/* Index in cand[0..n) of the entry to evict: the lowest score, then the oldest last use, then
 * the first; -1 when n == 0. */
int cache_policy_victim(const cache_policy *p, const int32_t *cand, int n);

#endif
