/* cli_stats: `stpipe stats --run-dir D [--watch] [--json]`: subscribes to every stage's stats
 * socket (RUN_DIR/stats-*.sock, PUB, read-only), takes the newest report of each and prints one
 * table (latency quantiles per stage and message type, then counters; a stage's tables only
 * as their size and sum), or JSON (tables as arrays of rows). */
#include <glob.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <jansson.h>
#include <zmq.h>

#include "cli.h"
#include "cli_pipeline.h"
#include "msg/msg.h"
#include "stats.pb-c.h"

#define MAX_STAGES 40

static void s_table(Stp__StatsReport **r, int n) {
    printf("%-16s %-18s %9s %10s %10s %10s %10s\n", "stage", "latency", "count", "p50 us", "p90 us",
           "p99 us", "max us");
    for (int i = 0; i < n; i++)
        for (size_t j = 0; j < r[i]->n_latencies; j++) {
            const Stp__Latency *l = r[i]->latencies[j];
            printf("%-16s %-18s %9llu %10.1f %10.1f %10.1f %10.1f\n", j ? "" : r[i]->stage, l->name,
                   (unsigned long long)l->count, l->p50_us, l->p90_us, l->p99_us, l->max_us);
        }
    printf("\n%-16s %-8s %-8s %s\n", "stage", "pid", "uptime", "counters");
    for (int i = 0; i < n; i++) {
        printf("%-16s %-8d %-8.0f", r[i]->stage, r[i]->pid, r[i]->uptime_s);
        int col = 34;
        for (size_t j = 0; j < r[i]->n_counters; j++) {
            char b[96];
            int w = snprintf(b, sizeof b, " %s=%llu", r[i]->counters[j]->name,
                             (unsigned long long)r[i]->counters[j]->value);
            if (col + w > 110) {
                printf("\n%34s", "");
                col = 34;
            }
            fputs(b, stdout);
            col += w;
        }
        printf("\n");
        uint64_t ipc = 0, ev = 0, nt = 0;
        for (size_t j = 0; j < r[i]->n_counters; j++) {
            const Stp__Counter *c = r[i]->counters[j];
            if (!strcmp(c->name, "decode.ipc_us")) ipc = c->value;
            if (!strcmp(c->name, "decode.eval_us")) ev = c->value;
            if (!strcmp(c->name, "decode.tokens")) nt = c->value;
        }
        if (ev && nt)
            printf("%34s decode: %.2f ms/token, ipc %.3f ms/token = %.1f%% of decode\n", "",
                   ev * 1e-3 / nt, ipc * 1e-3 / nt, 100.0 * ipc / ev);
        for (size_t j = 0; j < r[i]->n_tables; j++) {
            const Stp__Table *t = r[i]->tables[j];
            uint64_t sum = 0;
            for (size_t k = 0; k < t->n_values; k++)
                sum += t->values[k];
            printf("%34s table %s: %u x %u, sum %llu (--json has it)\n", "", t->name, t->rows,
                   t->cols, (unsigned long long)sum);
        }
    }
}

static void s_json(Stp__StatsReport **r, int n) {
    json_t *root = json_object();
    for (int i = 0; i < n; i++) {
        json_t *st = json_object(), *cs = json_object(), *ls = json_object();
        json_object_set_new(st, "pid", json_integer(r[i]->pid));
        json_object_set_new(st, "uptime_s", json_real(r[i]->uptime_s));
        for (size_t j = 0; j < r[i]->n_counters; j++)
            json_object_set_new(cs, r[i]->counters[j]->name,
                                json_integer((json_int_t)r[i]->counters[j]->value));
        for (size_t j = 0; j < r[i]->n_latencies; j++) {
            const Stp__Latency *l = r[i]->latencies[j];
            json_object_set_new(ls, l->name,
                                json_pack("{s:I,s:f,s:f,s:f,s:f,s:f}", "count",
                                          (json_int_t)l->count, "p50_us", l->p50_us, "p90_us",
                                          l->p90_us, "p99_us", l->p99_us, "max_us", l->max_us,
                                          "sum_us", l->sum_us));
        }
        json_object_set_new(st, "counters", cs);
        json_object_set_new(st, "latencies", ls);
        if (r[i]->n_tables) {
            json_t *ts = json_object();
            for (size_t j = 0; j < r[i]->n_tables; j++) {
                const Stp__Table *t = r[i]->tables[j];
                json_t *rows = json_array();
                for (uint32_t y = 0; y < t->rows; y++) {
                    json_t *row = json_array();
                    for (uint32_t x = 0; x < t->cols; x++) {
                        size_t k = (size_t)y * t->cols + x;
                        json_array_append_new(
                            row, json_integer(k < t->n_values ? (json_int_t)t->values[k] : 0));
                    }
                    json_array_append_new(rows, row);
                }
                json_object_set_new(ts, t->name, rows);
            }
            json_object_set_new(st, "tables", ts);
        }
        json_object_set_new(root, r[i]->stage, st);
    }
    char *s = json_dumps(root, JSON_INDENT(1) | JSON_SORT_KEYS);
    if (s) puts(s);
    free(s);
    json_decref(root);
}

typedef struct stats_opts {
    const char *run_dir;
    bool help, watch, json;
} stats_opts;

#define F(x) offsetof(stats_opts, x)
static const opt_def s_opts[] = {
    CLI_OPT_HELP(stats_opts),
    {"--run-dir", NULL, OPT_STR, 0, 0, NULL, "DIR", "the pipeline's run directory", F(run_dir),
     NULL, NULL},
    {"--watch", NULL, OPT_FLAG, 0, 0, NULL, NULL, "refresh the table every second", F(watch), NULL,
     NULL},
    {"--json", NULL, OPT_FLAG, 0, 0, NULL, NULL, "one JSON document for scripts", F(json), NULL,
     NULL},
};
#undef F

static void s_usage(FILE *f) {
    cli_opts_help(f,
                  "usage: stpipe stats --run-dir DIR [--watch] [--json]\n"
                  "  one table of every stage's counters and latency percentiles (p50/p90/p99),\n"
                  "  read from the stages' read-only stats sockets\n",
                  s_opts, CLI_NOPTS(s_opts), NULL);
}

int cli_stats(int argc, char **argv) {
    stats_opts o;
    memset(&o, 0, sizeof o);
    int bad = cli_opts_parse("stats", s_opts, CLI_NOPTS(s_opts), &o, argc, argv, s_usage);
    if (bad) return bad == CLI_HELP ? 0 : bad;
    const char *run_dir = o.run_dir;
    const bool watch = o.watch, json = o.json;
    if (!run_dir) {
        s_usage(stderr);
        return 2;
    }
    char pat[4200];
    snprintf(pat, sizeof pat, "%s/stats-*.sock", run_dir);
    glob_t g;
    if (glob(pat, 0, NULL, &g) || g.gl_pathc == 0) {
        fprintf(stderr, "stpipe stats: no stats sockets in %s (is the pipeline running?)\n",
                run_dir);
        return 1;
    }
    void *zctx = zmq_ctx_new();
    void *subs[MAX_STAGES];
    int ns = 0;
    for (size_t i = 0; i < g.gl_pathc && ns < MAX_STAGES; i++) {
        char ep[4200];
        snprintf(ep, sizeof ep, "ipc://%s", g.gl_pathv[i]);
        stp_err err = {0};
        void *s = msg_socket(zctx, ZMQ_SUB, ep, false, &err);
        if (!s) continue;
        zmq_setsockopt(s, ZMQ_SUBSCRIBE, "", 0);
        subs[ns++] = s;
    }
    globfree(&g);
    int status = 1;
    do {
        Stp__StatsReport *rep[MAX_STAGES] = {0};
        int got = 0;
        double t0 = msg_now_us();
        while (got < ns && (msg_now_us() - t0) < 1.5e6) {
            bool rd[MAX_STAGES];
            msg_poll(subs, ns > 16 ? 16 : ns, rd, 100);
            for (int i = 0; i < ns && i < 16; i++) {
                if (!rd[i]) continue;
                msg_in in;
                stp_err err = {0};
                while (msg_recv(subs[i], false, &in, &err) > 0) {
                    Stp__StatsReport *r = stp__stats_report__unpack(NULL, in.len, in.data);
                    msg_in_free(&in);
                    if (!r || r->version != STP_PROTO_VERSION) {
                        if (r) stp__stats_report__free_unpacked(r, NULL);
                        continue;
                    }
                    if (!rep[i])
                        got++;
                    else
                        stp__stats_report__free_unpacked(rep[i], NULL);
                    rep[i] = r;
                }
            }
        }
        Stp__StatsReport *list[MAX_STAGES];
        int n = 0;
        for (int i = 0; i < ns; i++)
            if (rep[i]) list[n++] = rep[i];
        if (watch && !json) printf("\033[H\033[2J");
        if (!n)
            fprintf(stderr, "stpipe stats: no stage answered within 1.5 s\n");
        else if (json)
            s_json(list, n);
        else
            s_table(list, n);
        fflush(stdout);
        if (n) status = 0;
        for (int i = 0; i < ns; i++)
            if (rep[i]) stp__stats_report__free_unpacked(rep[i], NULL);
        if (watch) sleep(1);
    } while (watch);
    for (int i = 0; i < ns; i++)
        msg_close(&subs[i]);
    zmq_ctx_term(zctx);
    return status;
}
