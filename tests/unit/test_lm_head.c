/* test_lm_head: the sparse LM head (model/lm_head.h) on the tiny Q4_0 (packed full head) and F32
 * models. With C = n_vocab it gives the full head's bits (forward_head); with C < n_vocab exactly
 * C rows are finite and each equals the full head's value for that row bit for bit; an engine
 * with sparse_head_candidates = 0 gives the same bits as before (as one with C = n_vocab), and
 * one with C < n_vocab the full head's bits on its candidates; the predictor ranks first the row
 * a hidden state was built from; the AVX2 sketch kernel gives the reference's integers. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kern/kern.h"
#include "model/engine.h"
#include "model/forward.h"
#include "model/lm_head.h"
#include "model/ops.h"
#include "th_gguf.h"
#include "th_skip.h"

#define Q40 "tiny-dense-attn-q4_0-pure.gguf"
#define F32 "tiny-dense-attn-f32.gguf"

/* A deterministic hidden state in [-2, 2). */
static void s_hidden(float *x, int n, uint32_t seed) {
    for (int i = 0; i < n; i++) {
        seed = seed * 1103515245u + 12345u;
        x[i] = (float)((seed >> 8) % 4096) / 1024.0f - 2.0f;
    }
}

/* forward_head's logits for x, on a packed model as the engine does. */
static float *s_full(const compute_ctx *cc, model *m, const float *x) {
    const model_config *c = &m->cfg;
    stp_err err = {0};
    if (model_enable_packing(m, MODEL_PACK_ALL, &err)) fail_msg("%s", err.msg);
    float *hn = malloc(sizeof(float) * c->n_embd), *l = malloc(sizeof(float) * c->n_vocab);
    uint8_t *xq = malloc((size_t)c->n_embd * 4 + 64);
    forward_head(cc, m, x, hn, xq, l);
    free(hn);
    free(xq);
    return l;
}

static void s_check_model(const char *file) {
    model *m = th_model_open(file);
    const int V = m->cfg.n_vocab, E = m->cfg.n_embd;
    stp_err err = {0};
    threadpool *tp = NULL;
    if (threadpool_new(&tp, 2, &err)) fail_msg("%s", err.msg);
    const compute_ctx cc = {kern_ops_get(), tp};
    float *x = malloc(sizeof(float) * E), *l = malloc(sizeof(float) * V);
    for (int trial = 0; trial < 3; trial++) {
        s_hidden(x, E, 17u + (uint32_t)trial);
        float *full = s_full(&cc, m, x);
        /* C = n_vocab: the full head, bit for bit */
        lm_head *h = NULL;
        if (lm_head_new(&h, &cc, m, V, &err)) fail_msg("%s", err.msg);
        lm_head_eval(h, &cc, x, l);
        if (memcmp(l, full, sizeof(float) * V)) fail_msg("%s: C = n_vocab differs", file);
        lm_head_destroy(&h);
        /* C < n_vocab: C finite rows, each the full head's bits */
        const int cs[] = {1, 7, V / 3, V - 1};
        for (size_t k = 0; k < sizeof cs / sizeof cs[0]; k++) {
            const int C = cs[k];
            if (lm_head_new(&h, &cc, m, C, &err)) fail_msg("%s", err.msg);
            assert_int_equal(lm_head_candidates(h), C);
            lm_head_eval(h, &cc, x, l);
            int n_fin = 0;
            for (int i = 0; i < V; i++) {
                if (l[i] == -INFINITY) continue;
                n_fin++;
                if (memcmp(&l[i], &full[i], sizeof(float)))
                    fail_msg("%s: C=%d row %d: %.9g vs full %.9g", file, C, i, l[i], full[i]);
            }
            assert_int_equal(n_fin, C);
            /* the candidates are the C best sketch scores */
            const float *sc = lm_head_scores(h);
            float worst_in = INFINITY, best_out = -INFINITY;
            for (int i = 0; i < V; i++) {
                if (l[i] != -INFINITY)
                    worst_in = sc[i] < worst_in ? sc[i] : worst_in;
                else
                    best_out = sc[i] > best_out ? sc[i] : best_out;
            }
            assert_true(worst_in >= best_out);
            lm_head_destroy(&h);
        }
        free(full);
    }
    assert_int_equal(lm_head_new(&(lm_head *){NULL}, &cc, m, 0, &err), STP_EINVAL);
    assert_int_equal(lm_head_new(&(lm_head *){NULL}, &cc, m, V + 1, &err), STP_EINVAL);
    free(x);
    free(l);
    threadpool_destroy(&tp);
    model_close(&m);
}

static void test_lm_head_equals_full_head_q4_0(void **state) {
    (void)state;
    s_check_model(Q40);
}

static void test_lm_head_equals_full_head_f32(void **state) {
    (void)state;
    s_check_model(F32);
}

/* Last-token logits of n tokens, one eval each, from an engine with C candidates. */
static float *s_engine_logits(const model *m, int C, const int32_t *t, int n) {
    const int V = m->cfg.n_vocab;
    engine *e = NULL;
    stp_err err = {0};
    engine_params p = {.n_threads = 2, .n_ctx = 64, .sparse_head_candidates = C};
    if (engine_new(&e, m, &p, &err)) fail_msg("%s", err.msg);
    float *l = malloc(sizeof(float) * (size_t)n * V);
    for (int i = 0; i < n; i++)
        if (engine_eval(e, t + i, 1, l + (size_t)i * V, false, &err)) fail_msg("%s", err.msg);
    engine_destroy(&e);
    return l;
}

static void test_lm_head_engine(void **state) {
    (void)state;
    const char *files[] = {Q40, F32};
    for (int f = 0; f < 2; f++) {
        model *m = th_model_open(files[f]);
        const int V = m->cfg.n_vocab, N = 12;
        int32_t t[12];
        for (int i = 0; i < N; i++)
            t[i] = (int32_t)((i * 7919 + 13) % V);
        float *off = s_engine_logits(m, 0, t, N);
        /* engine_params zeroed but for the threads and context: the same bits as off */
        engine *e = NULL;
        stp_err err = {0};
        engine_params p = {.n_threads = 2, .n_ctx = 64};
        if (engine_new(&e, m, &p, &err)) fail_msg("%s", err.msg);
        float *l = malloc(sizeof(float) * V);
        for (int i = 0; i < N; i++) {
            if (engine_eval(e, t + i, 1, l, false, &err)) fail_msg("%s", err.msg);
            assert_memory_equal(l, off + (size_t)i * V, sizeof(float) * V);
        }
        engine_destroy(&e);
        free(l);
        float *all = s_engine_logits(m, V, t, N);
        if (memcmp(all, off, sizeof(float) * (size_t)N * V))
            fail_msg("%s: engine with C = n_vocab differs from the full head", files[f]);
        const int C = V / 4;
        float *sp = s_engine_logits(m, C, t, N);
        for (int i = 0; i < N; i++) {
            int n_fin = 0;
            for (int r = 0; r < V; r++) {
                const size_t k = (size_t)i * V + r;
                if (sp[k] == -INFINITY) continue;
                n_fin++;
                if (memcmp(&sp[k], &off[k], sizeof(float)))
                    fail_msg("%s: token %d row %d: %g vs %g", files[f], i, r, sp[k], off[k]);
            }
            assert_int_equal(n_fin, C);
        }
        free(off);
        free(all);
        free(sp);
        model_close(&m);
    }
}

/* A hidden state built from row r (x_j = w_rj / output_norm_j): the sketch ranks r first. */
static void test_lm_head_predictor_top1(void **state) {
    (void)state;
    const char *files[] = {Q40, F32};
    for (int f = 0; f < 2; f++) {
        model *m = th_model_open(files[f]);
        const int V = m->cfg.n_vocab, E = m->cfg.n_embd;
        const tensor_view *w = &m->output;
        stp_err err = {0};
        const compute_ctx cc = {kern_ops_get(), NULL};
        lm_head *h = NULL;
        if (lm_head_new(&h, &cc, m, 1, &err)) fail_msg("%s", err.msg);
        float *x = malloc(sizeof(float) * E);
        int32_t row = -1;
        for (int r = 3; r < V; r += V / 7) {
            kern_dequantize_row_ref(w->type, w->data + (size_t)r * w->row_bytes, x, E);
            for (int j = 0; j < E; j++)
                x[j] = m->output_norm[j] != 0.0f ? x[j] / m->output_norm[j] : 0.0f;
            assert_int_equal(lm_head_predict(h, &cc, x, &row), 1);
            if (row != r) fail_msg("%s: row %d predicted %d", files[f], r, row);
        }
        free(x);
        lm_head_destroy(&h);
        model_close(&m);
    }
}

/* A synthetic F32 model with 6000 rows (not a multiple of 32: a padded group), untied head: the
 * selection through the sampled threshold gives exactly the C best scores, ties to the lower id
 * (checked against a sort of all scores), the logits the full head's bits. */
static void test_lm_head_large_vocab(void **state) {
    (void)state;
    char p[4096];
    stp_err err = {0};
    th_model_spec s = th_model_spec_small(4);
    s.n_vocab = 6000;
    s.n_embd = 128; /* a 96 KiB sketch: scored by the thread team */
    s.untied = true;
    th_tmp_path(p, sizeof p, "lm_head_v6000.gguf");
    if (th_model_write(p, &s, &err)) fail_msg("%s", err.msg);
    model *m = NULL;
    if (model_open(&m, p, &err)) fail_msg("%s", err.msg);
    const int V = m->cfg.n_vocab, E = m->cfg.n_embd;
    assert_int_equal(V, 6000);
    threadpool *tp = NULL;
    if (threadpool_new(&tp, 2, &err)) fail_msg("%s", err.msg);
    const compute_ctx cc = {kern_ops_get(), tp};
    float *x = malloc(sizeof(float) * E), *l = malloc(sizeof(float) * V);
    int32_t *order = malloc(sizeof(int32_t) * V);
    const int cs[] = {1, 20, 300, 1500, 4000};
    for (size_t k = 0; k < sizeof cs / sizeof cs[0]; k++) {
        const int C = cs[k];
        lm_head *h = NULL;
        if (lm_head_new(&h, &cc, m, C, &err)) fail_msg("%s", err.msg);
        for (int trial = 0; trial < 4; trial++) {
            s_hidden(x, E, 1000u * (uint32_t)k + (uint32_t)trial);
            if (trial == 3) /* a constant state: many equal scores */
                for (int j = 0; j < E; j++)
                    x[j] = 1.0f;
            float *full = s_full(&cc, m, x);
            lm_head_eval(h, &cc, x, l);
            /* expected: the first C of all ids by (score desc, id asc) */
            const float *sc = lm_head_scores(h);
            for (int i = 0; i < V; i++)
                order[i] = i;
            for (int i = 1; i < V; i++) { /* insertion sort: V is small */
                int32_t v = order[i];
                int j = i;
                while (j > 0 && (sc[order[j - 1]] < sc[v] ||
                                 (sc[order[j - 1]] == sc[v] && order[j - 1] > v))) {
                    order[j] = order[j - 1];
                    j--;
                }
                order[j] = v;
            }
            int n_fin = 0;
            for (int i = 0; i < V; i++)
                n_fin += l[i] != -INFINITY;
            assert_int_equal(n_fin, C);
            for (int i = 0; i < C; i++) {
                const int32_t r = order[i];
                if (l[r] == -INFINITY)
                    fail_msg("C=%d trial %d: row %d (rank %d) missing", C, trial, r, i);
                if (memcmp(&l[r], &full[r], sizeof(float))) fail_msg("C=%d row %d differs", C, r);
            }
            free(full);
        }
        lm_head_destroy(&h);
    }
    free(x);
    free(l);
    free(order);
    threadpool_destroy(&tp);
    model_close(&m);
}

static void test_lm_head_kernel_avx2(void **state) {
    (void)state;
    th_need_kern_level("avx2");
    const int sizes[] = {8, 64, 1536, 2560, 4096};
    for (size_t k = 0; k < sizeof sizes / sizeof sizes[0]; k++) {
        const int E = sizes[k], S = E / 8;
        uint8_t *bits = aligned_alloc(64, ((size_t)S * 32 + 64 + 63) & ~(size_t)63);
        uint8_t *tab = aligned_alloc(64, (size_t)S * 64);
        uint32_t seed = 99u + (uint32_t)E;
        for (int i = 0; i < S * 32; i++) {
            seed = seed * 1103515245u + 12345u;
            bits[i] = (uint8_t)(seed >> 16);
        }
        /* tables within the format's range [4, 124], extremes included */
        for (int s = 0; s < S; s++)
            for (int half = 0; half < 2; half++)
                for (int e = 0; e < 16; e++) {
                    seed = seed * 1103515245u + 12345u;
                    uint8_t v = (uint8_t)(4 + (seed >> 16) % 121);
                    if (s % 5 == 0) v = 124;
                    tab[s * 64 + 32 * half + e] = tab[s * 64 + 32 * half + 16 + e] = v;
                }
        int32_t a[32], b[32];
        lm_head_group_scores_ref(bits, tab, E, a);
        lm_head_group_scores_avx2(bits, tab, E, b);
        assert_memory_equal(a, b, sizeof a);
        free(bits);
        free(tab);
    }
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_lm_head_equals_full_head_q4_0),
        cmocka_unit_test(test_lm_head_equals_full_head_f32),
        cmocka_unit_test(test_lm_head_engine),
        cmocka_unit_test(test_lm_head_predictor_top1),
        cmocka_unit_test(test_lm_head_large_vocab),
        cmocka_unit_test(test_lm_head_kernel_avx2),
    };
    return th_exit_code(cmocka_run_group_tests(tests, NULL, NULL));
}
