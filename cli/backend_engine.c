/* backend_engine: the backend vtable (backend.h) over the in-process engine (model/engine.h).
 * Owns the model mapping, the tokenizer and the engine; eval asks only for the last logits. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "cli.h"

typedef struct backend_engine {
    backend base; /* must stay first */
    model *m;
    tokenizer *tok;
    engine *e;
} backend_engine;

static int s_eval(backend *b, const int32_t *t, int n, float *logits, stp_err *err) {
    backend_engine *be = (backend_engine *)b;
    return engine_eval(be->e, t, n, logits, false, err);
}

static void s_reset(backend *b) {
    engine_reset(((backend_engine *)b)->e);
}

static int s_n_vocab(const backend *b) {
    return ((const backend_engine *)b)->m->cfg.n_vocab;
}

static int s_n_ctx(const backend *b) {
    return engine_n_ctx(((const backend_engine *)b)->e);
}

static int s_n_past(const backend *b) {
    return engine_n_past(((const backend_engine *)b)->e);
}

static const engine_stats *s_stats(const backend *b) {
    return engine_get_stats(((const backend_engine *)b)->e);
}

static void s_destroy(backend *b) {
    backend_engine *be = (backend_engine *)b;
    engine_destroy(&be->e);
    tokenizer_destroy(&be->tok);
    model_close(&be->m);
    free(be);
}

static const backend_ops s_ops = {
    .eval = s_eval,
    .reset = s_reset,
    .n_vocab = s_n_vocab,
    .n_ctx = s_n_ctx,
    .n_past = s_n_past,
    .stats = s_stats,
    .destroy = s_destroy,
};

int backend_engine_new(backend **out, const backend_engine_params *p, stp_err *err) {
    *out = NULL;
    backend_engine *be = calloc(1, sizeof *be);
    if (!be) return stp_err_set(err, STP_ENOMEM, "out of memory");
    be->base.ops = &s_ops;
    int rc = model_open(&be->m, p->model_path, err);
    if (rc) goto fail;
    snprintf(be->base.warning, sizeof be->base.warning, "%s", be->m->warning);
    rc = tokenizer_new(&be->tok, be->m->gguf, err);
    if (rc) {
        stp_err_prefix(err, "%s: the model's tokenizer cannot be used", p->model_path);
        goto fail;
    }
    be->base.tok = be->tok;
    engine_params ep = {.n_threads = p->n_threads > 0 ? p->n_threads : 1,
                        .n_ctx = p->n_ctx,
                        .kv_type = p->kv_type,
                        .sparse_head_candidates = p->sparse_head_candidates,
                        .progress = cli_progress};
    rc = engine_new(&be->e, be->m, &ep, err);
    if (rc) goto fail;
    const char *slash = strrchr(p->model_path, '/');
    const char *base = slash ? slash + 1 : p->model_path;
    size_t len = strlen(base);
    if (len > 5 && !strcmp(base + len - 5, ".gguf")) len -= 5;
    if (len >= sizeof be->base.name) len = sizeof be->base.name - 1;
    memcpy(be->base.name, base, len);
    be->base.name[len] = 0;
    *out = &be->base;
    return 0;
fail:
    s_destroy(&be->base);
    return rc;
}
