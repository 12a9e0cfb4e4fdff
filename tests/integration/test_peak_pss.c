/* test_peak_pss: the memory budget holds as a whole. A generated model whose experts do not all
 * fit (4 layers x 16 experts of 0.84 MiB, Q4_0) runs under --memory-budget 150M while
 * deploy/stpipe-pss (the sampler stpipe-membench uses) samples the total PSS of every stage and
 * the supervisor every 50 ms from before start-up to the end: a sampled chat answer, then a
 * request that fills the context (1024). The test fails when the peak passed the budget, when
 * the pool held every expert (the budget would not matter), or when the sampler saw too little
 * (fewer samples than the run's length allows, or less than the pool). Label slow (a few s). */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <unistd.h>

#include <jansson.h>

#include "th_pipeline.h"
#include "th_proc.h"

#define BUDGET "150M"
#define BUDGET_BYTES (150.0 * 1024 * 1024)
#define N_LAYER 4
#define N_EXPERT 16
#define CTX 1024

static char s_dir[1024], s_model[1024], s_lay[1024], s_out[1100];
static pid_t s_sampler = -1;

static int s_teardown(void **st) {
    (void)st;
    if (s_sampler > 0) {
        kill(s_sampler, SIGTERM);
        th_wait(s_sampler, 10);
        s_sampler = -1;
    }
    if (s_dir[0]) th_pipe_down(s_dir, 30);
    s_dir[0] = 0;
    if (s_out[0]) unlink(s_out);
    if (s_model[0]) unlink(s_model);
    if (s_lay[0]) {
        char rm[1200];
        snprintf(rm, sizeof rm, "rm -rf '%s'", s_lay);
        char *rmargv[] = {"sh", "-c", rm, NULL};
        th_run(rmargv, NULL, 30);
    }
    s_out[0] = s_model[0] = s_lay[0] = 0;
    return 0;
}

/* counters.<name> of one stage in `stpipe stats --json` (asserts it is there) */
static long long s_counter(json_t *stats, const char *stage, const char *name) {
    json_t *v = json_object_get(json_object_get(json_object_get(stats, stage), "counters"), name);
    if (!v) fail_msg("stats: %s has no counter %s", stage, name);
    return (long long)json_integer_value(v);
}

static void test_peak_pss_within_budget(void **st) {
    (void)st;
    char py[] = "python3";
    char *which[] = {"sh", "-c", "command -v python3", NULL};
    if (th_run(which, NULL, 10) != 0) {
        if (!strcmp(th_env("CI"), "true")) fail_msg("python3 is needed (deploy/stpipe-pss)");
        skip();
    }
    char *model = s_model, *lay = s_lay, *out = s_out, pss[1024], gm[1024];
    th_pipe_dir(s_model, sizeof s_model, "peak", "model.gguf");
    th_pipe_dir(s_lay, sizeof s_lay, "peak", "layout");
    th_pipe_dir(s_dir, sizeof s_dir, "peak", "run");
    snprintf(s_out, sizeof s_out, "%s.pss.json", s_dir);
    snprintf(pss, sizeof pss, "%s/deploy/stpipe-pss", th_env("STP_SOURCE_DIR"));
    unlink(out);

    /* 4 x 16 experts of 3 x 512 x 1024 Q4_0 = 54 MiB; the daemon's plan leaves ~40 of them a
     * pool at 150 MiB (minimum 118 MiB at context 1024) */
    th_bin_path(gm, sizeof gm, "stpipe-genmodel");
    char *genargv[] = {gm,     "--preset",   "tiny", "--n-layer",       "4", "--n-embd",
                       "512",  "--n-head",   "8",    "--n-head-kv",     "2", "--head-dim",
                       "64",   "--n-expert", "16",   "--n-expert-used", "2", "--n-ff-exp",
                       "1024", "--dtype",    "q4_0", "--seed",          "7", "-o",
                       model,  NULL};
    assert_int_equal(th_run(genargv, NULL, 60), 0);

    char me[16];
    snprintf(me, sizeof me, "%d", (int)getpid());
    char *sargv[] = {py,  pss,           "--run-dir", s_dir,      "--interval-ms", "50", "--out",
                     out, "--owner-pid", me,          "--budget", BUDGET,          NULL};
    s_sampler = th_spawn(sargv, NULL, NULL);
    assert_true(s_sampler > 0);
    const double t0 = th_now();

    const char *extra[] = {"--memory-budget",
                           BUDGET,
                           "--layout-dir",
                           lay,
                           "--ctx-size",
                           "1024",
                           "--cache-type",
                           "f16",
                           NULL}; /* stpipe-up's default, not th_pipe_up's golden f32 */
    assert_int_equal(th_pipe_up(s_dir, model, 2, 60, 90, extra), 0);

    const char *chat[] = {
        "generate", "--pipeline", s_dir,     "--chat", "--prompt", "Tell me about the sea.",
        "--temp",   "0.6",        "--top-k", "20",     "--top-p",  "0.95",
        "--seed",   "1001",       "-n",      "48",     "--ids",    "--ignore-eos",
        NULL};
    th_run_out r = th_run_stpipe(chat, NULL, "peak_pss_chat");
    assert_int_equal(r.status, 0);
    assert_non_null(strstr(r.err, "generated 48 tokens"));
    th_run_out_free(&r);

    /* fill the context: CTX - 64 prompt ids (ordinary tokens of the synthetic vocab), 60 more */
    char *ids = malloc((size_t)CTX * 8);
    assert_non_null(ids);
    size_t o = 0;
    for (int i = 0; i < CTX - 64; i++)
        o += (size_t)sprintf(ids + o, i ? " %d" : "%d", 32 + (i * 37) % 220);
    const char *full[] = {"generate", "--pipeline", s_dir,   "--prompt-ids", ids,
                          "-n",       "60",         "--ids", "--ignore-eos", NULL};
    r = th_run_stpipe(full, NULL, "peak_pss_full");
    free(ids);
    assert_int_equal(r.status, 0);
    assert_non_null(strstr(r.err, "generated 60 tokens"));
    th_run_out_free(&r);

    const char *sa[] = {"stats", "--run-dir", s_dir, "--json", NULL};
    r = th_run_stpipe(sa, NULL, "peak_pss_stats");
    assert_int_equal(r.status, 0);
    json_error_t je;
    json_t *stats = json_loads(r.out, 0, &je);
    th_run_out_free(&r);
    assert_non_null(stats);
    long long frames = s_counter(stats, "storage-daemon", "pool.frames");
    long long pool_bytes = s_counter(stats, "storage-daemon", "pool.bytes");
    long long misses = s_counter(stats, "storage-daemon", "decode.misses");
    json_decref(stats);
    assert_true(frames >= N_EXPERT && frames < N_LAYER * N_EXPERT); /* the budget matters */
    assert_true(misses > 0);

    /* the sampler's verdict: 0 = the peak stayed within the budget, 1 = it passed it */
    kill(s_sampler, SIGTERM);
    int rc = th_wait(s_sampler, 10);
    s_sampler = -1;
    const double secs = th_now() - t0;
    char *js = th_slurp(out, NULL);
    assert_non_null(js);
    json_t *res = json_loads(js, 0, &je);
    free(js);
    assert_non_null(res);
    double peak = (double)json_integer_value(json_object_get(res, "peak_bytes"));
    long long samples = json_integer_value(json_object_get(res, "samples"));
    print_message("peak PSS %.1f MiB (budget %s, pool %.1f MiB of %lld frames), %lld samples in "
                  "%.1f s, longest gap %.0f ms\n",
                  peak / 1048576.0, BUDGET, pool_bytes / 1048576.0, frames, samples, secs,
                  json_real_value(json_object_get(res, "longest_gap_ms")));
    json_decref(res);
    assert_true(peak <= BUDGET_BYTES);
    assert_int_equal(rc, 0);
    assert_true(peak >= (double)pool_bytes); /* it saw the stages, the pool among them */
    assert_true(samples >= (long long)(secs / 0.05 / 4)); /* ~50 ms apart, on a busy host */

    assert_int_equal(th_pipe_down(s_dir, 30), 0);
    s_dir[0] = 0; /* the teardown removes the files */
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_teardown(test_peak_pss_within_budget, s_teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
