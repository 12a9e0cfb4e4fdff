/* stats: counters, log-scale latency histograms and their StatsReport; see stats.h. */
#include "stats/stats.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "msg/msg.h"
#include "stats.pb-c.h"

typedef struct counter {
    char name[48];
    uint64_t v;
} counter;

typedef struct latency {
    char name[48];
    uint64_t n;
    double sum, max;
    uint32_t b[STATS_BUCKETS];
} latency;

typedef struct table {
    char name[48];
    const uint64_t *v; /* (rows, cols), the caller's */
    int rows, cols;
} table;

struct stats {
    char stage[48];
    double t0_us, last_pub_us;
    int n_c, n_l, n_t;
    counter c[STATS_MAX_COUNTERS];
    latency l[STATS_MAX_LATENCIES];
    table t[STATS_MAX_TABLES];
};

int stats_new(stats **out, const char *stage, stp_err *err) {
    stats *s = calloc(1, sizeof *s);
    if (!s) return stp_err_set(err, STP_ENOMEM, "stats: out of memory");
    snprintf(s->stage, sizeof s->stage, "%s", stage);
    s->t0_us = msg_now_us();
    *out = s;
    return 0;
}

void stats_destroy(stats **self_p) {
    free(*self_p);
    *self_p = NULL;
}

static counter *s_counter(stats *s, const char *name) {
    for (int i = 0; i < s->n_c; i++)
        if (!strcmp(s->c[i].name, name)) return &s->c[i];
    if (s->n_c == STATS_MAX_COUNTERS) return NULL;
    counter *c = &s->c[s->n_c++];
    snprintf(c->name, sizeof c->name, "%s", name);
    c->v = 0;
    return c;
}

void stats_add(stats *s, const char *name, uint64_t v) {
    counter *c = s_counter(s, name);
    if (c) c->v += v;
}

void stats_set(stats *s, const char *name, uint64_t v) {
    counter *c = s_counter(s, name);
    if (c) c->v = v;
}

uint64_t stats_get(const stats *s, const char *name) {
    for (int i = 0; i < s->n_c; i++)
        if (!strcmp(s->c[i].name, name)) return s->c[i].v;
    return 0;
}

void stats_table(stats *s, const char *name, const uint64_t *v, int rows, int cols) {
    table *t = NULL;
    for (int i = 0; i < s->n_t; i++)
        if (!strcmp(s->t[i].name, name)) t = &s->t[i];
    if (!t) {
        if (s->n_t == STATS_MAX_TABLES) return;
        t = &s->t[s->n_t++];
        snprintf(t->name, sizeof t->name, "%s", name);
    }
    t->v = v;
    t->rows = rows > 0 && v ? rows : 0;
    t->cols = cols > 0 && v ? cols : 0;
}

bool stats_bad(stats *s, const char *kind) {
    char name[48];
    snprintf(name, sizeof name, "bad.%s", kind);
    counter *c = s_counter(s, name);
    if (!c) return false;
    return c->v++ == 0;
}

static int s_bucket(double us) {
    if (!(us >= 1.0)) return 0;
    int b = (int)(log2(us) * 8.0) + 1;
    return b >= STATS_BUCKETS ? STATS_BUCKETS - 1 : b;
}

static double s_bucket_mid(int b) {
    if (b == 0) return 0.5;
    return exp2(((double)b - 0.5) / 8.0);
}

void stats_latency(stats *s, const char *name, double us) {
    latency *l = NULL;
    for (int i = 0; i < s->n_l; i++)
        if (!strcmp(s->l[i].name, name)) l = &s->l[i];
    if (!l) {
        if (s->n_l == STATS_MAX_LATENCIES) return;
        l = &s->l[s->n_l++];
        memset(l, 0, sizeof *l);
        snprintf(l->name, sizeof l->name, "%s", name);
    }
    if (us < 0) us = 0;
    l->n++;
    l->sum += us;
    if (us > l->max) l->max = us;
    l->b[s_bucket(us)]++;
}

static double s_quant(const latency *l, double q) {
    if (!l->n) return 0;
    uint64_t want = (uint64_t)ceil(q * (double)l->n), acc = 0;
    if (want < 1) want = 1;
    for (int b = 0; b < STATS_BUCKETS; b++) {
        acc += l->b[b];
        if (acc >= want) {
            double v = s_bucket_mid(b);
            return v > l->max ? l->max : v;
        }
    }
    return l->max;
}

void stats_handover(stats *s, const char *name, double sent_us) {
    double d = msg_now_us() - sent_us;
    if (sent_us > 0 && d >= 0 && d < 10e6) stats_latency(s, name, d);
}

double stats_quantile(const stats *s, const char *name, double q) {
    for (int i = 0; i < s->n_l; i++)
        if (!strcmp(s->l[i].name, name)) return s_quant(&s->l[i], q);
    return 0;
}

int stats_publish(stats *s, void *pub, double interval_ms, bool force) {
    double now = msg_now_us();
    if (!force && now - s->last_pub_us < interval_ms * 1e3) return 0;
    s->last_pub_us = now;
    Stp__Counter cs[STATS_MAX_COUNTERS], *cp[STATS_MAX_COUNTERS];
    Stp__Latency ls[STATS_MAX_LATENCIES], *lp[STATS_MAX_LATENCIES];
    for (int i = 0; i < s->n_c; i++) {
        stp__counter__init(&cs[i]);
        cs[i].name = s->c[i].name;
        cs[i].value = s->c[i].v;
        cp[i] = &cs[i];
    }
    for (int i = 0; i < s->n_l; i++) {
        const latency *l = &s->l[i];
        stp__latency__init(&ls[i]);
        ls[i].name = (char *)l->name;
        ls[i].count = l->n;
        ls[i].p50_us = s_quant(l, 0.50);
        ls[i].p90_us = s_quant(l, 0.90);
        ls[i].p99_us = s_quant(l, 0.99);
        ls[i].max_us = l->max;
        ls[i].sum_us = l->sum;
        lp[i] = &ls[i];
    }
    Stp__Table ts[STATS_MAX_TABLES], *tp[STATS_MAX_TABLES];
    for (int i = 0; i < s->n_t; i++) {
        stp__table__init(&ts[i]);
        ts[i].name = s->t[i].name;
        ts[i].rows = (uint32_t)s->t[i].rows;
        ts[i].cols = (uint32_t)s->t[i].cols;
        ts[i].n_values = (size_t)s->t[i].rows * (size_t)s->t[i].cols;
        ts[i].values = (uint64_t *)s->t[i].v;
        tp[i] = &ts[i];
    }
    Stp__StatsReport r;
    stp__stats_report__init(&r);
    r.version = STP_PROTO_VERSION;
    r.stage = s->stage;
    r.pid = (int32_t)getpid();
    r.uptime_s = (now - s->t0_us) * 1e-6;
    r.n_counters = (size_t)s->n_c;
    r.counters = cp;
    r.n_latencies = (size_t)s->n_l;
    r.latencies = lp;
    r.n_tables = (size_t)s->n_t;
    r.tables = tp;
    return msg_send(pub, NULL, 0, &r.base, NULL);
}
