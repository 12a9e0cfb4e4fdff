/* cache_policy: lfu (decayed counts) and lru victims over caller-given candidates; see
 * cache_policy.h and README.md. */
#include "cache/cache_policy.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

struct cache_policy {
    cache_policy_kind kind;
    int n;
    double half_life;    /* ticks */
    uint64_t tick;       /* now */
    uint64_t *last_use;  /* (n) tick of the last use */
    double *freq;        /* (n) decayed use count as of freq_tick */
    uint64_t *freq_tick; /* (n) */
};

int cache_policy_new(cache_policy **out, const cache_policy_config *cfg, stp_err *err) {
    *out = NULL;
    if (cfg->n_entries <= 0 || (cfg->kind == CACHE_POLICY_LFU && !(cfg->half_life > 0)))
        return stp_err_set(err, STP_EINVAL, "cache policy: %d entries, half-life %g",
                           cfg->n_entries, cfg->half_life);
    cache_policy *p = calloc(1, sizeof *p);
    if (!p) goto fail;
    p->kind = cfg->kind;
    p->n = cfg->n_entries;
    p->half_life = cfg->half_life;
    p->last_use = calloc((size_t)p->n, sizeof *p->last_use);
    p->freq = calloc((size_t)p->n, sizeof *p->freq);
    p->freq_tick = calloc((size_t)p->n, sizeof *p->freq_tick);
    if (!p->last_use || !p->freq || !p->freq_tick) goto fail;
    *out = p;
    return 0;
fail:
    cache_policy_destroy(&p);
    return stp_err_set(err, STP_ENOMEM, "cache policy: out of memory");
}

void cache_policy_destroy(cache_policy **self_p) {
    cache_policy *p = *self_p;
    if (!p) return;
    free(p->last_use);
    free(p->freq);
    free(p->freq_tick);
    free(p);
    *self_p = NULL;
}

int cache_policy_parse(const char *name, cache_policy_kind *kind, stp_err *err) {
    if (!strcmp(name, "lfu") || !strcmp(name, "lru")) {
        *kind = !strcmp(name, "lru") ? CACHE_POLICY_LRU : CACHE_POLICY_LFU;
        return 0;
    }
    return stp_err_set(err, STP_EINVAL, "cache policy '%s': lru or lfu", name);
}

const char *cache_policy_name(cache_policy_kind kind) {
    return kind == CACHE_POLICY_LRU ? "lru" : "lfu";
}

void cache_policy_tick(cache_policy *p) {
    p->tick++;
}

double cache_policy_score(const cache_policy *p, int e) {
    if (p->kind == CACHE_POLICY_LRU) return 0.0;
    double age = (double)(p->tick - p->freq_tick[e]);
    return p->freq[e] * exp2(-age / p->half_life);
}

void cache_policy_touch(cache_policy *p, int e) {
    p->last_use[e] = p->tick;
    if (p->kind == CACHE_POLICY_LRU) return;
    p->freq[e] = cache_policy_score(p, e) + 1.0;
    p->freq_tick[e] = p->tick;
}

uint64_t cache_policy_last_use(const cache_policy *p, int e) {
    return p->last_use[e];
}

int cache_policy_victim(const cache_policy *p, const int32_t *cand, int n) {
    int best = -1;
    double best_score = 0;
    uint64_t best_use = 0;
    for (int i = 0; i < n; i++) {
        int e = cand[i];
        double sc = cache_policy_score(p, e);
        if (best < 0 || sc < best_score || (sc == best_score && p->last_use[e] < best_use)) {
            best = i;
            best_score = sc;
            best_use = p->last_use[e];
        }
    }
    return best;
}
