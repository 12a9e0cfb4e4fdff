/* cache_replay: replays a storage daemon's decision trace (--trace-decisions: a line
 * "layer expert expert ..." per decode decision, layer 0 starting a token) through a cache of
 * `frames` entries the way the daemon runs its pool: per decision one tick, then for each
 * expert a use; a missing one takes a free frame or evicts a victim the decision does not need.
 * Policies: lfu and lru (cache_policy.h, the daemon's own code), pin (the experts most used
 * over the whole trace pinned in all but one layer's frames, the rest lru: a clairvoyant static
 * split) and opt (Belady: evict the entry whose next use is farthest; the fewest misses any
 * policy without prefetching can have). bench/cache_replay and tests/unit/test_cache_policy.c
 * use it; the daemon's prefetches and read timing are not modelled. */
#ifndef STP_CACHE_REPLAY_H
#define STP_CACHE_REPLAY_H

#include <stdint.h>

#include "util/stp_err.h"

typedef struct cache_trace {
    int n_layer, n_expert; /* entries are layer * n_expert + expert */
    int n_dec, n_tok;      /* decisions, tokens */
    int32_t *tok;          /* (n_dec) token of each decision */
    int32_t *off;          /* (n_dec + 1) first entry of each decision in ent */
    int32_t *ent;          /* (off[n_dec]) */
} cache_trace;

/* Parses trace text; n_expert 0: 1 + the largest expert seen. STP_EFORMAT naming the line when
 * a line is not numbers or an expert is out of range. */
int cache_trace_parse(cache_trace *t, const char *text, int n_expert, stp_err *err);
int cache_trace_read(cache_trace *t, const char *path, int n_expert, stp_err *err);
void cache_trace_fini(cache_trace *t);

typedef struct cache_replay_opts {
    const char *policy; /* "lfu", "lru", "pin", "opt" */
    int frames;
    double half_life; /* lfu, in tokens (<= 0: CACHE_POLICY_HALF_LIFE) */
    int warmup;       /* tokens replayed before misses count */
} cache_replay_opts;

typedef struct cache_replay_result {
    uint64_t misses; /* counted after the warm-up */
    int tokens;      /* tokens counted */
} cache_replay_result;

/* STP_EINVAL for an unknown policy, STP_ERANGE when a decision needs more than `frames`. */
int cache_replay(const cache_trace *t, const cache_replay_opts *o, cache_replay_result *r,
                 stp_err *err);

#endif
