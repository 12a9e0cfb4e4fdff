/* stpipe-storage-daemon: owns the expert weights, streams them into a shared-memory pool under
 * a memory budget and answers residency questions (see README.md). Thin shell over storage.c:
 * its own options (s_opts below: --memory-budget, --layout-dir, --cache-policy, --pool-experts,
 * --attn-threads, --trace-decisions, and STP_LFU_HALF_LIFE, environment only, for experiments),
 * each also from its STP_* variable, are taken out of argv by opt_parse; the common ones are left
 * to stage_parse. The environment is read there and nowhere else. */
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "msg/stage.h"
#include "opt/opt.h"
#include "plan/budget.h"
#include "storage.h"

static int s_size(const char *v, void *field, stp_err *err) {
    return *v ? budget_parse_size(v, (uint64_t *)field, err) : 0; /* "": unlimited */
}

#define F(x) offsetof(storage_opts, x)
static const opt_def s_opts[] = {
    {"--memory-budget", "STP_MEMORY_BUDGET", OPT_FN, 0, 0, NULL, "B",
     "whole pipeline's memory (4G, 512M; none: unlimited)", F(memory_budget), s_size, NULL},
    {"--layout-dir", "STP_LAYOUT_DIR", OPT_STR, 0, 0, NULL, "DIR",
     "expert layout file's directory (none: next to the model)", F(layout_dir), NULL, NULL},
    {"--cache-policy", "STP_CACHE_POLICY", OPT_STR, 0, 0, NULL, "lru|lfu", "pool eviction policy",
     F(policy), NULL, NULL},
    {"--pool-experts", "STP_POOL_EXPERTS", OPT_INT, 0, 1 << 20, "0", "N",
     "pool slots regardless of the budget (0: from the budget)", F(pool_experts), NULL, NULL},
    {"--attn-threads", NULL, OPT_INT, 1, 256, NULL, "N", "the attention worker's threads (plan)",
     F(attn_threads), NULL, NULL},
    {"--trace-decisions", "STP_TRACE_DECISIONS", OPT_STR, 0, 0, NULL, "FILE",
     "append each decode decision (bench/cache_sim.py)", F(trace), NULL, NULL},
    {NULL, "STP_LFU_HALF_LIFE", OPT_DOUBLE, 0, 1e9, NULL, "T",
     "lfu's half-life in tokens (experiments; 0: default)", F(lfu_half_life), NULL, NULL},
};
#undef F
#define S_NOPTS (sizeof s_opts / sizeof s_opts[0])

int main(int argc, char **argv) {
    char *extra = NULL;
    size_t extra_len = 0;
    FILE *f = open_memstream(&extra, &extra_len);
    if (f) {
        opt_help(s_opts, S_NOPTS, f);
        fclose(f);
    }
    bool help = stage_wants_help(argc, argv, "storage-daemon", extra);
    free(extra);
    if (help) return 0;
    stage_opts o;
    storage_opts so = {0};
    stp_err err = {0};
    int rc = opt_parse(s_opts, S_NOPTS, &so, &argc, argv, OPT_KEEP_UNKNOWN, &err);
    if (rc || stage_parse(&o, argc, argv, "storage-daemon", &err) ||
        stage_setup(&o, "storage-daemon", &err)) {
        fprintf(stderr, "stpipe-storage-daemon: %s\n", err.msg);
        return 2;
    }
    so.workers = o.workers;
    storage *s = NULL;
    rc = storage_new(&s, &o, &so, &err);
    if (!rc) rc = storage_run(s, &err);
    storage_destroy(&s);
    if (rc) fprintf(stderr, "stpipe-storage-daemon: %s\n", err.msg);
    return rc ? 1 : 0;
}
