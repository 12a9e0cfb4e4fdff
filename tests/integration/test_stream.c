/* test_stream: the pipeline streaming experts under a memory budget. With a weight pool of one
 * layer's experts (STP_POOL_EXPERTS, the smallest the daemon allows) every layer evicts and
 * re-reads experts from the expert layout file, and `stpipe generate --pipeline` must still give
 * the golden greedy ids of a Q4_0 model (down streamed as neuron-major images), through io_uring
 * + O_DIRECT and through the pread fallback; a truncated layout file is rebuilt, not trusted; a
 * budget below the minimum is refused with a message naming the minimum. */
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

static const char *s_env(const char *k) {
    const char *v = getenv(k);
    return v ? v : "";
}

static int s_run(char *const argv[], const char *out_path, int timeout_s) {
    pid_t p = fork();
    if (p == 0) {
        int fd = open(out_path ? out_path : "/dev/null", O_WRONLY | O_CREAT | O_TRUNC, 0600);
        if (fd >= 0) dup2(fd, 1);
        execvp(argv[0], argv);
        _exit(127);
    }
    for (int i = 0; i < timeout_s * 20; i++) {
        int st;
        if (waitpid(p, &st, WNOHANG) == p) return WIFEXITED(st) ? WEXITSTATUS(st) : 128;
        usleep(50000);
    }
    kill(p, SIGKILL);
    waitpid(p, NULL, 0);
    return -1;
}

static char *s_slurp(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *b = malloc((size_t)n + 1);
    if (b && fread(b, 1, (size_t)n, f) != (size_t)n) n = 0;
    if (b) b[n] = 0;
    fclose(f);
    return b;
}

static char s_dir[1024];

static int s_teardown(void **st) {
    (void)st;
    if (!s_dir[0]) return 0;
    char down[1024];
    snprintf(down, sizeof down, "%s/deploy/stpipe-down", s_env("STP_SOURCE_DIR"));
    char *argv[] = {"bash", down, s_dir, NULL};
    s_run(argv, NULL, 30);
    s_dir[0] = 0;
    return 0;
}

static int s_up(const char *model, const char *tag) {
    char up[1024], bin[1024], lay[1024];
    snprintf(s_dir, sizeof s_dir, "%s/stream-%s-%d", s_env("STP_TMP"), tag, (int)getpid());
    mkdir(s_env("STP_TMP"), 0700);
    snprintf(lay, sizeof lay, "%s/layouts", s_env("STP_TMP"));
    mkdir(lay, 0700);
    setenv("STP_LAYOUT_DIR", lay, 1);
    snprintf(up, sizeof up, "%s/deploy/stpipe-up", s_env("STP_SOURCE_DIR"));
    snprintf(bin, sizeof bin, "%s", s_env("STP_BIN_DIR"));
    char *argv[] = {"bash",      up,          "--model",   (char *)model, "--run-dir",
                    s_dir,       "--workers", "2",         "--bin-dir",   bin,
                    "--timeout", "60",        "--threads", "1",           NULL};
    return s_run(argv, NULL, 90);
}

/* Generates the golden prompt's continuation and compares the ids; returns storage evictions
 * and misses from the stats. */
static void s_check_golden(const char *stem, uint64_t *evictions, uint64_t *misses) {
    char path[1024], model[1024], ids[4096] = "", out[1200], n[16];
    snprintf(path, sizeof path, "%s/%s.short.json", s_env("STP_TEST_DATA"), stem);
    snprintf(model, sizeof model, "%s/%s.gguf", s_env("STP_TEST_DATA"), stem);
    json_error_t je;
    json_t *j = json_load_file(path, 0, &je);
    assert_non_null(j);
    json_t *pi = json_object_get(j, "prompt_ids"), *gi = json_object_get(j, "greedy_ids");
    size_t at = 0;
    for (size_t i = 0; i < json_array_size(pi); i++)
        at += (size_t)snprintf(ids + at, sizeof ids - at, i ? " %lld" : "%lld",
                               (long long)json_integer_value(json_array_get(pi, i)));
    snprintf(n, sizeof n, "%zu", json_array_size(gi));
    char gen[1024];
    snprintf(gen, sizeof gen, "%s/stpipe", s_env("STP_BIN_DIR"));
    snprintf(out, sizeof out, "%s.ids", s_dir);
    char *argv[] = {gen,           "generate", "--pipeline", s_dir,          "--prompt-ids", ids,
                    "--n-predict", n,          "--ids",      "--ignore-eos", "--quiet",      NULL};
    assert_int_equal(s_run(argv, out, 120), 0);
    char *got = s_slurp(out);
    assert_non_null(got);
    char *p = got;
    for (size_t i = 0; i < json_array_size(gi); i++) {
        long v = strtol(p, &p, 10);
        assert_int_equal(v, json_integer_value(json_array_get(gi, i)));
    }
    free(got);
    json_decref(j);
    /* the storage daemon's counters */
    usleep(700000);
    char *sargv[] = {gen, "stats", "--run-dir", s_dir, "--json", NULL};
    snprintf(out, sizeof out, "%s.stats", s_dir);
    assert_int_equal(s_run(sargv, out, 30), 0);
    json_t *st = json_load_file(out, 0, &je);
    assert_non_null(st);
    json_t *c = json_object_get(json_object_get(st, "storage-daemon"), "counters");
    *evictions = (uint64_t)json_integer_value(json_object_get(c, "cache.evictions"));
    *misses = (uint64_t)json_integer_value(json_object_get(c, "cache.misses"));
    json_decref(st);
}

static void s_stream_case(const char *stem, const char *io, const char *tag) {
    char model[1024];
    snprintf(model, sizeof model, "%s/%s.gguf", s_env("STP_TEST_DATA"), stem);
    setenv("STP_POOL_EXPERTS", "1", 1); /* clamped up to one layer's experts */
    setenv("STP_CACHE_POLICY", "lru", 1);
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
    s_stream_case("tiny-dense-attn-q4_0-pure", "auto", "uring");
}

static void
test_stream_evicting_pool_gives_golden_ids_pread_and_rebuilds_truncated_layout(void **st) {
    (void)st;
    /* truncate the layout a previous case built: it must be rebuilt, not trusted */
    char pat[1100];
    snprintf(pat, sizeof pat, "%s/layouts/tiny-dense-attn-q4_0-pure.gguf.*.stpipe-layout",
             s_env("STP_TMP"));
    glob_t g;
    if (glob(pat, 0, NULL, &g) == 0) {
        struct stat sb;
        if (!stat(g.gl_pathv[0], &sb)) assert_int_equal(truncate(g.gl_pathv[0], sb.st_size / 2), 0);
        globfree(&g);
    }
    s_stream_case("tiny-dense-attn-q4_0-pure", "pread-buffered", "pread");
    /* the rebuilt file has its full size again */
    assert_int_equal(glob(pat, 0, NULL, &g), 0);
    struct stat sb;
    assert_int_equal(stat(g.gl_pathv[0], &sb), 0);
    assert_true(sb.st_size % 4096 == 0 && sb.st_size > 8192);
    globfree(&g);
}

static void test_stream_hybrid_f32_dense_down_golden(void **st) {
    (void)st; /* F32 down stays in the GGUF row layout (no down_t) */
    s_stream_case("tiny-hybrid-attn-f32", "pread", "f32");
}

static void test_stream_budget_too_small_is_refused_with_minimum(void **st) {
    (void)st;
    char model[1024];
    snprintf(model, sizeof model, "%s/tiny-dense-attn-q4_0-pure.gguf", s_env("STP_TEST_DATA"));
    setenv("STP_MEMORY_BUDGET", "1M", 1);
    assert_int_not_equal(s_up(model, "small"), 0);
    unsetenv("STP_MEMORY_BUDGET");
    char log[1100];
    snprintf(log, sizeof log, "%s/storage.log", s_dir);
    char *l = s_slurp(log);
    assert_non_null(l);
    assert_non_null(strstr(l, "too small"));
    assert_non_null(strstr(l, "the minimum is"));
    free(l);
    s_teardown(NULL);
}

int main(void) {
    const struct CMUnitTest t[] = {
        cmocka_unit_test_teardown(test_stream_evicting_pool_gives_golden_ids_uring, s_teardown),
        cmocka_unit_test_teardown(
            test_stream_evicting_pool_gives_golden_ids_pread_and_rebuilds_truncated_layout,
            s_teardown),
        cmocka_unit_test_teardown(test_stream_hybrid_f32_dense_down_golden, s_teardown),
        cmocka_unit_test_teardown(test_stream_budget_too_small_is_refused_with_minimum, s_teardown),
    };
    return cmocka_run_group_tests(t, NULL, NULL);
}
