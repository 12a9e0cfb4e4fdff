/* backend_engine: the backend vtable (backend.h) over the in-process engine (model/engine.h).
 * Owns the model mapping, the tokenizer and the engine; eval asks only for the last logits. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gen/backend.h"

typedef struct backend_engine {
    backend base; /* must stay first */
    model *m;
    tokenizer *tok;
    engine *e;
} backend_engine;

static int s_eval(backend *b, const backend_seq_eval *q, int n_q, stp_err *err) {
    return engine_eval_batch(((backend_engine *)b)->e, q, n_q, err);
}

static int s_seq_keep(backend *b, int seq, int n_keep) {
    return engine_seq_keep(((backend_engine *)b)->e, seq, n_keep);
}

static int s_seq_n_past(const backend *b, int seq) {
    return engine_seq_n_past(((const backend_engine *)b)->e, seq);
}

static int s_n_seq(const backend *b) {
    return engine_n_seq(((const backend_engine *)b)->e);
}

static int s_n_batch(const backend *b) {
    return engine_n_ubatch(((const backend_engine *)b)->e);
}

static int s_n_vocab(const backend *b) {
    return ((const backend_engine *)b)->m->cfg.n_vocab;
}

static int s_n_ctx(const backend *b) {
    return engine_n_ctx(((const backend_engine *)b)->e);
}

static const engine_stats *s_stats(const backend *b) {
    return engine_get_stats(((const backend_engine *)b)->e);
}

static int s_n_layer(const backend *b) {
    return ((const backend_engine *)b)->m->cfg.n_layer;
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
    .seq_keep = s_seq_keep,
    .seq_n_past = s_seq_n_past,
    .n_seq = s_n_seq,
    .n_batch = s_n_batch,
    .n_vocab = s_n_vocab,
    .n_ctx = s_n_ctx,
    .stats = s_stats,
    .destroy = s_destroy,
    .n_layer = s_n_layer,
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
                        .n_seq = p->n_seq,
                        .sparse_head_candidates = p->sparse_head_candidates,
                        .progress = p->progress};
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
