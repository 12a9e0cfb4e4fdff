/* cache_replay: a decision trace through a policy over a fixed number of frames; see
 * cache_replay.h. */
#include "cache/cache_replay.h"

#include <limits.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cache/cache_policy.h"

/* ---- traces ---- */

static int s_push(int32_t **a, int *cap, int n, int32_t v) {
    if (n == *cap) {
        int nc = *cap ? 2 * *cap : 256;
        int32_t *na = realloc(*a, (size_t)nc * sizeof *na);
        if (!na) return -1;
        *a = na;
        *cap = nc;
    }
    (*a)[n] = v;
    return 0;
}

int cache_trace_parse(cache_trace *t, const char *text, int n_expert, stp_err *err) {
    memset(t, 0, sizeof *t);
    int cap_d = 0, cap_o = 0, n_ent = 0, line = 0, max_x = -1;
    int32_t *layer_of = NULL, *expert = NULL; /* first parse into (layer, expert) pairs */
    int cap_l = 0, cap_x = 0;
    int rc = 0;
    for (const char *p = text; *p;) {
        const char *eol = strchr(p, '\n');
        size_t len = eol ? (size_t)(eol - p) : strlen(p);
        line++;
        char buf[4096];
        if (len >= sizeof buf) {
            rc = stp_err_set(err, STP_EFORMAT, "trace line %d: longer than %zu", line, sizeof buf);
            goto fail;
        }
        memcpy(buf, p, len);
        buf[len] = 0;
        p += len + (eol ? 1 : 0);
        char *s = buf, *end;
        long layer = strtol(s, &end, 10);
        if (end == s) {
            for (; *s == ' ' || *s == '\t' || *s == '\r'; s++) {
            }
            if (!*s) continue; /* blank */
            rc = stp_err_set(err, STP_EFORMAT, "trace line %d: expected 'layer expert...'", line);
            goto fail;
        }
        if (layer < 0 || layer > 100000) {
            rc = stp_err_set(err, STP_EFORMAT, "trace line %d: layer %ld", line, layer);
            goto fail;
        }
        if (layer == 0 || t->n_dec == 0) t->n_tok++;
        if (s_push(&t->tok, &cap_d, t->n_dec, t->n_tok - 1) ||
            s_push(&t->off, &cap_o, t->n_dec, n_ent))
            goto oom;
        t->n_dec++;
        if (layer + 1 > t->n_layer) t->n_layer = (int)layer + 1;
        for (s = end;;) {
            long x = strtol(s, &end, 10);
            if (end == s) break;
            if (x < 0 || (n_expert > 0 && x >= n_expert)) {
                rc = stp_err_set(err, STP_EFORMAT, "trace line %d: expert %ld", line, x);
                goto fail;
            }
            if (x > max_x) max_x = (int)x;
            if (s_push(&layer_of, &cap_l, n_ent, (int32_t)layer) ||
                s_push(&expert, &cap_x, n_ent, (int32_t)x))
                goto oom;
            n_ent++;
            s = end;
        }
        for (; *s == ' ' || *s == '\t' || *s == '\r'; s++) {
        }
        if (*s) {
            rc = stp_err_set(err, STP_EFORMAT, "trace line %d: expected 'layer expert...'", line);
            goto fail;
        }
    }
    if (s_push(&t->off, &cap_o, t->n_dec, n_ent)) goto oom;
    t->n_expert = n_expert > 0 ? n_expert : max_x + 1;
    t->ent = malloc((size_t)(n_ent ? n_ent : 1) * sizeof *t->ent);
    if (!t->ent) goto oom;
    for (int i = 0; i < n_ent; i++)
        t->ent[i] = layer_of[i] * t->n_expert + expert[i];
    free(layer_of);
    free(expert);
    return 0;
oom:
    rc = stp_err_set(err, STP_ENOMEM, "trace: out of memory");
fail:
    free(layer_of);
    free(expert);
    cache_trace_fini(t);
    return rc;
}

int cache_trace_read(cache_trace *t, const char *path, int n_expert, stp_err *err) {
    memset(t, 0, sizeof *t);
    FILE *f = fopen(path, "rb");
    if (!f) return stp_err_set(err, STP_EIO, "%s: cannot open", path);
    char *text = NULL;
    size_t len = 0, cap = 0, got;
    int rc = 0;
    do {
        if (cap - len < 65536) {
            char *nt = realloc(text, cap = cap * 2 + 65536 + 1);
            if (!nt) {
                rc = stp_err_set(err, STP_ENOMEM, "%s: out of memory", path);
                break;
            }
            text = nt;
        }
        got = fread(text + len, 1, cap - len - 1, f);
        len += got;
    } while (got);
    if (!rc && ferror(f)) rc = stp_err_set(err, STP_EIO, "%s: read error", path);
    fclose(f);
    if (!rc) {
        text[len] = 0;
        rc = cache_trace_parse(t, text, n_expert, err);
        if (rc) stp_err_prefix(err, "%s", path);
    }
    free(text);
    return rc;
}

void cache_trace_fini(cache_trace *t) {
    free(t->tok);
    free(t->off);
    free(t->ent);
    memset(t, 0, sizeof *t);
}

/* ---- replay ---- */

enum { R_LFU, R_LRU, R_PIN, R_OPT };

/* A replay's state: frames in order (as the daemon's frame table), the policy, and for opt
 * each entry's next use. */
typedef struct replay {
    const cache_trace *t;
    int kind, frames, n_used;
    int32_t *owner;    /* (frames) entry or -1 */
    int32_t *where;    /* (entries) frame or -1 */
    uint8_t *pinned;   /* (entries) pin: never a victim while another candidate exists */
    int32_t *next_dec; /* (off[n_dec]) opt: the next decision using ent[j] (INT_MAX: none) */
    int32_t *next_of;  /* (entries) opt: as of the entry's last use */
    int32_t *cand;     /* (frames) */
    cache_policy *pol; /* lfu or lru (pin and opt: lru, for last uses) */
} replay;

static bool s_in_decision(const cache_trace *t, int d, int e) {
    for (int j = t->off[d]; j < t->off[d + 1]; j++)
        if (t->ent[j] == e) return true;
    return false;
}

/* Opt's victim: the farthest next use, then the oldest last use, then the first. */
static int s_opt_victim(const replay *r, int n) {
    int best = -1;
    for (int i = 0; i < n; i++) {
        int e = r->cand[i], b = best < 0 ? -1 : r->cand[best];
        if (best < 0 || r->next_of[e] > r->next_of[b] ||
            (r->next_of[e] == r->next_of[b] &&
             cache_policy_last_use(r->pol, e) < cache_policy_last_use(r->pol, b)))
            best = i;
    }
    return best;
}

/* The frame for entry e, needed by decision d: a free one or a victim's. -1 if none. */
static int s_frame(replay *r, int d) {
    if (r->n_used < r->frames) return r->n_used++;
    int n = 0;
    for (int pass = 0; pass < 2 && !n; pass++) /* pin: pinned entries only when nothing else */
        for (int f = 0; f < r->frames; f++) {
            int o = r->owner[f];
            if (s_in_decision(r->t, d, o) || (pass == 0 && r->pinned && r->pinned[o])) continue;
            r->cand[n++] = o;
        }
    if (!n) return -1;
    int v = r->kind == R_OPT ? s_opt_victim(r, n) : cache_policy_victim(r->pol, r->cand, n);
    int f = r->where[r->cand[v]];
    r->where[r->cand[v]] = -1;
    return f;
}

/* The pin set: the entries used most over the trace (ties: first used first), frames - one
 * layer of them. */
static int s_pins(replay *r) {
    const cache_trace *t = r->t;
    const int N = t->n_layer * t->n_expert, want = r->frames - t->n_expert;
    int32_t *uses = calloc((size_t)N, sizeof *uses), *first = malloc((size_t)N * sizeof *first);
    r->pinned = calloc((size_t)N, 1);
    if (!uses || !first || !r->pinned) {
        free(uses);
        free(first);
        return -1;
    }
    for (int i = 0; i < N; i++)
        first[i] = INT_MAX;
    for (int j = 0; j < t->off[t->n_dec]; j++) {
        if (!uses[t->ent[j]]++) first[t->ent[j]] = j;
    }
    for (int k = 0; k < want; k++) {
        int best = -1;
        for (int e = 0; e < N; e++)
            if (!r->pinned[e] && uses[e] &&
                (best < 0 || uses[e] > uses[best] ||
                 (uses[e] == uses[best] && first[e] < first[best])))
                best = e;
        if (best < 0) break;
        r->pinned[best] = 1;
    }
    free(uses);
    free(first);
    return 0;
}

static int s_next_uses(replay *r) {
    const cache_trace *t = r->t;
    const int N = t->n_layer * t->n_expert;
    r->next_dec = malloc((size_t)(t->off[t->n_dec] ? t->off[t->n_dec] : 1) * sizeof(int32_t));
    r->next_of = malloc((size_t)N * sizeof(int32_t));
    if (!r->next_dec || !r->next_of) return -1;
    for (int e = 0; e < N; e++)
        r->next_of[e] = INT_MAX; /* (as "upcoming" first) */
    for (int d = t->n_dec - 1; d >= 0; d--)
        for (int j = t->off[d]; j < t->off[d + 1]; j++) {
            r->next_dec[j] = r->next_of[t->ent[j]];
            r->next_of[t->ent[j]] = d;
        }
    return 0;
}

static void s_replay_free(replay *r) {
    free(r->owner);
    free(r->where);
    free(r->pinned);
    free(r->next_dec);
    free(r->next_of);
    free(r->cand);
    cache_policy_destroy(&r->pol);
}

int cache_replay(const cache_trace *t, const cache_replay_opts *o, cache_replay_result *res,
                 stp_err *err) {
    memset(res, 0, sizeof *res);
    replay r = {.t = t, .frames = o->frames};
    const char *names[] = {"lfu", "lru", "pin", "opt"};
    r.kind = -1;
    for (int k = 0; k < 4; k++)
        if (o->policy && !strcmp(o->policy, names[k])) r.kind = k;
    if (r.kind < 0)
        return stp_err_set(err, STP_EINVAL, "replay policy '%s': lfu, lru, pin or opt",
                           o->policy ? o->policy : "");
    if (o->frames <= 0) return stp_err_set(err, STP_EINVAL, "replay: %d frames", o->frames);
    const int N = t->n_layer * t->n_expert;
    if (N <= 0) return 0;
    double hl = o->half_life > 0 ? o->half_life : CACHE_POLICY_HALF_LIFE;
    cache_policy_config pc = {.kind = r.kind == R_LFU ? CACHE_POLICY_LFU : CACHE_POLICY_LRU,
                              .n_entries = N,
                              .half_life = hl * t->n_layer};
    int rc = cache_policy_new(&r.pol, &pc, err);
    if (rc) return rc;
    r.owner = malloc((size_t)o->frames * sizeof *r.owner);
    r.where = malloc((size_t)N * sizeof *r.where);
    r.cand = malloc((size_t)o->frames * sizeof *r.cand);
    if (!r.owner || !r.where || !r.cand || (r.kind == R_PIN && s_pins(&r)) ||
        (r.kind == R_OPT && s_next_uses(&r))) {
        s_replay_free(&r);
        return stp_err_set(err, STP_ENOMEM, "replay: out of memory");
    }
    for (int e = 0; e < N; e++)
        r.where[e] = -1;
    for (int d = 0; d < t->n_dec; d++) {
        const bool count = t->tok[d] >= o->warmup;
        cache_policy_tick(r.pol);
        for (int j = t->off[d]; j < t->off[d + 1]; j++) {
            int e = t->ent[j];
            cache_policy_touch(r.pol, e);
            if (r.next_of) r.next_of[e] = r.next_dec[j];
            if (r.where[e] >= 0) continue;
            res->misses += count;
            int f = s_frame(&r, d);
            if (f < 0) {
                s_replay_free(&r);
                return stp_err_set(err, STP_ERANGE, "replay: decision %d needs more than %d frames",
                                   d, o->frames);
            }
            r.owner[f] = e;
            r.where[e] = f;
        }
    }
    res->tokens = t->n_tok > o->warmup ? t->n_tok - o->warmup : 0;
    s_replay_free(&r);
    return 0;
}
