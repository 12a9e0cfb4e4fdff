/* test_stream: the pipeline streaming experts under a memory budget. With a weight pool of one
 * layer's experts (STP_POOL_EXPERTS, the smallest the daemon allows) every layer evicts and
 * re-reads experts from the expert layout file, and `stpipe generate --pipeline` must still give
 * the golden greedy ids of a Q4_0 model (down streamed as neuron-major images), through io_uring
 * + O_DIRECT and through the pread fallback; a truncated layout file is rebuilt, not trusted; a
 * budget below the minimum is refused with a message naming the minimum; the decode prefetch of
 * the next layer's predicted experts reads ahead and keeps the ids; a storage daemon killed
 * between two requests is restarted with a new pool, which the expert workers map: the next
 * request gives the same ids. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <fcntl.h>
#include <glob.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <jansson.h>

#include "th_pipeline.h"
#include "th_proc.h"

static char s_dir[1024];

static int s_teardown(void **st) {
    (void)st;
    if (!s_dir[0]) return 0;
    th_pipe_down(s_dir, 30);
    s_dir[0] = 0;
    return 0;
}

static int s_up(const char *model, const char *tag) {
    char lay[1024];
    th_pipe_dir(s_dir, sizeof s_dir, "stream", tag);
    snprintf(lay, sizeof lay, "%s/layouts", th_env("STP_TMP"));
    mkdir(lay, 0700);
    setenv("STP_LAYOUT_DIR", lay, 1);
    return th_pipe_up(s_dir, model, 2, 60, 90, NULL);
}

/* The storage daemon's counters after a run. */
typedef struct counters {
    uint64_t evictions, misses, pf_reads, pf_used;
} counters;

typedef struct stats_wait {
    const char *bin, *out;
    json_t *st; /* `stpipe stats --json` with a storage-daemon report */
} stats_wait;

static bool s_storage_stats(void *ctx) {
    stats_wait *w = ctx;
    char *argv[] = {(char *)w->bin, "stats", "--run-dir", s_dir, "--json", NULL};
    if (th_run(argv, w->out, 30)) return false;
    json_error_t je;
    w->st = json_load_file(w->out, 0, &je);
    if (w->st && json_object_get(w->st, "storage-daemon")) return true;
    json_decref(w->st);
    w->st = NULL;
    return false;
}

/* Generates the golden prompt's continuation and compares the ids; returns storage evictions
 * and reads (misses + prefetches) from the stats. */
static void s_check_golden_c(const char *stem, counters *k) {
    char out[1200], n[16];
    th_golden g;
    th_golden_load(&g, stem);
    snprintf(n, sizeof n, "%d", g.n_greedy);
    char gen[1024];
    snprintf(gen, sizeof gen, "%s/stpipe", th_env("STP_BIN_DIR"));
    snprintf(out, sizeof out, "%s.ids", s_dir);
    char *argv[] = {gen,           "generate", "--pipeline", s_dir,          "--prompt-ids", g.ids,
                    "--n-predict", n,          "--ids",      "--ignore-eos", "--quiet",      NULL};
    assert_int_equal(th_run(argv, out, 120), 0);
    char *got = th_slurp(out, NULL);
    assert_non_null(got);
    char *p = got;
    for (int i = 0; i < g.n_greedy; i++) {
        long v = strtol(p, &p, 10);
        assert_int_equal(v, g.greedy[i]);
    }
    free(got);
    /* the storage daemon's counters: `stpipe stats` subscribes now, so the report it gets was
     * published after the generation ended */
    snprintf(out, sizeof out, "%s.stats", s_dir);
    stats_wait w = {gen, out, NULL};
    assert_true(th_wait_until(s_storage_stats, &w, 30));
    json_t *st = w.st;
    json_t *c = json_object_get(json_object_get(st, "storage-daemon"), "counters");
#define C(name) (uint64_t) json_integer_value(json_object_get(c, name))
    k->evictions = C("cache.evictions");
    k->misses = C("cache.misses");
    k->pf_reads = C("prefetch.reads");
    k->pf_used = C("prefetch.used");
#undef C
    json_decref(st);
}

static void s_check_golden(const char *stem, uint64_t *evictions, uint64_t *reads) {
    counters k;
    s_check_golden_c(stem, &k);
    *evictions = k.evictions;
    *reads = k.misses + k.pf_reads; /* the decisions' misses and the next-layer prefetches */
}

static void s_stream_case(const char *stem, const char *io, const char *policy, const char *tag) {
    char model[1024];
    snprintf(model, sizeof model, "%s/%s.gguf", th_env("STP_TEST_DATA"), stem);
    setenv("STP_POOL_EXPERTS", "1", 1); /* clamped up to one layer's experts */
    setenv("STP_CACHE_POLICY", policy, 1);
    setenv("STP_IO", io, 1);
    assert_int_equal(s_up(model, tag), 0);
    uint64_t ev = 0, miss = 0;
    s_check_golden(stem, &ev, &miss);
    assert_true(ev > 0);
    assert_true(miss > ev / 2);
    s_teardown(NULL);
    unsetenv("STP_POOL_EXPERTS");
    unsetenv("STP_CACHE_POLICY");
    unsetenv("STP_IO");
}

static void test_stream_evicting_pool_gives_golden_ids_uring(void **st) {
    (void)st;
    s_stream_case("tiny-dense-attn-q4_0-pure", "auto", "lru", "uring");
}

static void
test_stream_evicting_pool_gives_golden_ids_pread_and_rebuilds_truncated_layout(void **st) {
    (void)st;
    /* truncate the layout a previous case built: it must be rebuilt, not trusted */
    char pat[1100];
    snprintf(pat, sizeof pat, "%s/layouts/tiny-dense-attn-q4_0-pure.gguf.*.stpipe-layout",
             th_env("STP_TMP"));
    glob_t g;
    if (glob(pat, 0, NULL, &g) == 0) {
        struct stat sb;
        if (!stat(g.gl_pathv[0], &sb)) assert_int_equal(truncate(g.gl_pathv[0], sb.st_size / 2), 0);
        globfree(&g);
    }
    s_stream_case("tiny-dense-attn-q4_0-pure", "pread-buffered", "lfu", "pread");
    /* the rebuilt file has its full size again */
    assert_int_equal(glob(pat, 0, NULL, &g), 0);
    struct stat sb;
    assert_int_equal(stat(g.gl_pathv[0], &sb), 0);
    assert_true(sb.st_size % 4096 == 0 && sb.st_size > 8192);
    globfree(&g);
}

static void test_stream_hybrid_f32_dense_down_golden(void **st) {
    (void)st; /* F32 down stays in the GGUF row layout (no down_t) */
    s_stream_case("tiny-hybrid-attn-f32", "pread", "lfu", "f32");
}

/* Decode prefetch: with half the experts in the pool, the attention worker's predictions of
 * the next layer's experts are read ahead, most of them are then used, and the ids stay the
 * golden ones; with --prefetch 0 (STP_PREFETCH) none are read. */
static void test_stream_prefetch_reads_ahead_golden(void **st) {
    (void)st;
    char model[1024];
    snprintf(model, sizeof model, "%s/tiny-dense-attn-q4_0-pure.gguf", th_env("STP_TEST_DATA"));
    setenv("STP_POOL_EXPERTS", "16", 1); /* of 4 layers x 8 experts */
    setenv("STP_CACHE_POLICY", "lru", 1);
    const char *pf[2] = {"0", "2"};
    for (int i = 0; i < 2; i++) {
        setenv("STP_PREFETCH", pf[i], 1);
        assert_int_equal(s_up(model, i ? "pf2" : "pf0"), 0);
        counters k;
        s_check_golden_c("tiny-dense-attn-q4_0-pure", &k);
        printf("prefetch %s: misses %llu, prefetched %llu, of them used %llu, evictions %llu\n",
               pf[i], (unsigned long long)k.misses, (unsigned long long)k.pf_reads,
               (unsigned long long)k.pf_used, (unsigned long long)k.evictions);
        if (i == 0) assert_int_equal(k.pf_reads, 0);
        if (i == 1) {
            assert_true(k.pf_reads > 0);
            assert_true(k.pf_used * 2 > k.pf_reads); /* most predictions were right */
        }
        s_teardown(NULL);
    }
    unsetenv("STP_PREFETCH");
    unsetenv("STP_POOL_EXPERTS");
    unsetenv("STP_CACHE_POLICY");
}

static void test_stream_budget_too_small_is_refused_with_minimum(void **st) {
    (void)st;
    char model[1024];
    snprintf(model, sizeof model, "%s/tiny-dense-attn-q4_0-pure.gguf", th_env("STP_TEST_DATA"));
    setenv("STP_MEMORY_BUDGET", "1M", 1);
    assert_int_not_equal(s_up(model, "small"), 0);
    unsetenv("STP_MEMORY_BUDGET");
    char log[1100];
    snprintf(log, sizeof log, "%s/storage.log", s_dir);
    char *l = th_slurp(log, NULL);
    assert_non_null(l);
    assert_non_null(strstr(l, "too small"));
    assert_non_null(strstr(l, "the minimum is"));
    free(l);
    s_teardown(NULL);
}

/* Generates n ids of the golden prompt through the pipeline into ids: how many, or -1 when the
 * generation failed. */
static int s_gen_ids(const th_golden *g, int n, int *ids) {
    char bin[1024], out[1200], nb[16];
    snprintf(bin, sizeof bin, "%s/stpipe", th_env("STP_BIN_DIR"));
    snprintf(out, sizeof out, "%s/gen.out", s_dir);
    snprintf(nb, sizeof nb, "%d", n);
    char *argv[] = {bin,  "generate", "--pipeline", s_dir,     "--prompt-ids", (char *)g->ids,
                    "-n", nb,         "--ids",      "--quiet", "--ignore-eos", NULL};
    int rc = th_wait(th_spawn(argv, out, NULL), 120);
    char *txt = th_slurp(out, NULL);
    int k = 0;
    for (char *q = txt, *end; q && *q && k < n; q = end) {
        long v = strtol(q, &end, 10);
        if (end == q) break;
        ids[k++] = (int)v;
    }
    free(txt);
    return rc ? -1 : k;
}

typedef struct restart_wait {
    const char *ready; /* the storage daemon's ready file */
    int old;
} restart_wait;

/* The ready file names a pid other than the killed one. */
static bool s_restarted(void *ctx) {
    restart_wait *w = ctx;
    char *now = th_slurp(w->ready, NULL);
    int p = now ? atoi(now) : 0;
    free(now);
    return p > 0 && p != w->old;
}

static void test_stream_storage_restart_new_pool_same_ids(void **st) {
    (void)st;
    char model[1024];
    snprintf(model, sizeof model, "%s/tiny-dense-attn-q4_0.gguf", th_env("STP_TEST_DATA"));
    th_golden g;
    th_golden_load(&g, "tiny-dense-attn-q4_0");
    setenv("STP_POOL_EXPERTS", "1", 1); /* every layer streams */
    unsetenv("STP_IO");
    assert_int_equal(s_up(model, "restart"), 0);
    enum { N = 200 };
    static int ref[N], got[N];
    assert_int_equal(s_gen_ids(&g, N, ref), N);
    /* the daemon dies; the supervisor restarts it with a new, empty pool */
    char rf[1100];
    snprintf(rf, sizeof rf, "%s/storage.ready", s_dir);
    char *old = th_slurp(rf, NULL);
    assert_non_null(old);
    assert_int_equal(kill(atoi(old), SIGKILL), 0);
    restart_wait w = {rf, atoi(old)};
    assert_true(th_wait_until(s_restarted, &w, 30));
    free(old);
    /* the same request through the new pool: the expert workers map it (before, every layer
     * failed "not resident" against the dead daemon's pool for good) */
    assert_int_equal(s_gen_ids(&g, N, got), N);
    for (int i = 0; i < N; i++)
        assert_int_equal(got[i], ref[i]);
    char cmd[1200];
    snprintf(cmd, sizeof cmd, "grep -q 'new weight pool' %s/expert-*.log", s_dir);
    assert_int_equal(system(cmd), 0);
    s_teardown(NULL);
    unsetenv("STP_POOL_EXPERTS");
}

int main(void) {
    const struct CMUnitTest t[] = {
        cmocka_unit_test_teardown(test_stream_evicting_pool_gives_golden_ids_uring, s_teardown),
        cmocka_unit_test_teardown(
            test_stream_evicting_pool_gives_golden_ids_pread_and_rebuilds_truncated_layout,
            s_teardown),
        cmocka_unit_test_teardown(test_stream_hybrid_f32_dense_down_golden, s_teardown),
        cmocka_unit_test_teardown(test_stream_prefetch_reads_ahead_golden, s_teardown),
        cmocka_unit_test_teardown(test_stream_budget_too_small_is_refused_with_minimum, s_teardown),
        cmocka_unit_test_teardown(test_stream_storage_restart_new_pool_same_ids, s_teardown),
    };
    return cmocka_run_group_tests(t, NULL, NULL);
}
