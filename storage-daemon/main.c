/* stpipe-storage-daemon: owns the expert weights, streams them into a shared-memory pool under
 * a memory budget and answers residency questions (see README.md). Thin shell over storage.c:
 * it takes its own options (--memory-budget, --layout-dir, --cache-policy, --pool-experts, also
 * from the environment as STP_MEMORY_BUDGET, STP_LAYOUT_DIR, STP_CACHE_POLICY,
 * STP_POOL_EXPERTS; --attn-threads N, the attention worker's threads, for the plan;
 * --trace-decisions FILE or STP_TRACE_DECISIONS; lfu's half-life from
 * STP_LFU_HALF_LIFE only, for experiments) out of argv and leaves the common ones to
 * stage_parse. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "msg/stage.h"
#include "plan/budget.h"
#include "storage.h"

static int s_take(int *argc, char **argv, const char *name, const char **val, stp_err *err) {
    for (int i = 1; i < *argc; i++) {
        size_t n = strlen(name);
        const char *v = NULL;
        int used = 0;
        if (!strcmp(argv[i], name)) {
            if (i + 1 >= *argc) return stp_err_set(err, STP_EINVAL, "%s needs a value", name);
            v = argv[i + 1];
            used = 2;
        } else if (!strncmp(argv[i], name, n) && argv[i][n] == '=') {
            v = argv[i] + n + 1;
            used = 1;
        }
        if (!used) continue;
        *val = v;
        memmove(&argv[i], &argv[i + used], (size_t)(*argc - i - used + 1) * sizeof *argv);
        *argc -= used;
        i--;
    }
    return 0;
}

int main(int argc, char **argv) {
    if (stage_wants_help(
            argc, argv, "storage-daemon",
            "         [--memory-budget B] [--layout-dir DIR] [--cache-policy lru|lfu] "
            "[--pool-experts N]\n         [--attn-threads N] [--trace-decisions FILE]\n"))
        return 0;
    stage_opts o;
    storage_opts so = {0};
    stp_err err = {0};
    const char *budget = getenv("STP_MEMORY_BUDGET"), *frames = getenv("STP_POOL_EXPERTS");
    const char *attn_threads = NULL;
    so.layout_dir = getenv("STP_LAYOUT_DIR");
    so.policy = getenv("STP_CACHE_POLICY");
    so.trace = getenv("STP_TRACE_DECISIONS");
    const char *hl = getenv("STP_LFU_HALF_LIFE"); /* for experiments (bench/cache_sim.py) */
    if (hl && *hl) so.lfu_half_life = atof(hl);
    int rc = s_take(&argc, argv, "--memory-budget", &budget, &err);
    if (!rc) rc = s_take(&argc, argv, "--layout-dir", &so.layout_dir, &err);
    if (!rc) rc = s_take(&argc, argv, "--cache-policy", &so.policy, &err);
    if (!rc) rc = s_take(&argc, argv, "--pool-experts", &frames, &err);
    if (!rc) rc = s_take(&argc, argv, "--trace-decisions", &so.trace, &err);
    if (!rc) rc = s_take(&argc, argv, "--attn-threads", &attn_threads, &err);
    if (!rc && attn_threads) {
        char *end;
        long v = strtol(attn_threads, &end, 10);
        if (*end || v < 1 || v > 256)
            rc = stp_err_set(&err, STP_EINVAL, "--attn-threads: expected 1..256, got '%s'",
                             attn_threads);
        so.attn_threads = (int)v;
    }
    if (!rc && budget && *budget) rc = budget_parse_size(budget, &so.memory_budget, &err);
    if (!rc && frames && *frames) so.pool_experts = atoi(frames);
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
