/* model_config: reads SmallThinker hyper-parameters from GGUF metadata; see model_config.h. */
#include "model/model_config.h"

#include <stdio.h>
#include <string.h>

#define ARCH "smallthinker"

static int s_get_int(const gguf_file *g, const char *key, int *out, int min, int max, bool required,
                     stp_err *err) {
    uint64_t v;
    int rc = gguf_get_u64(g, key, &v, err);
    if (rc == STP_EINVAL && !required) return 0;
    if (rc == STP_EINVAL)
        return stp_err_set(err, STP_EFORMAT, "%s: required key '%s' is missing", gguf_path(g), key);
    if (rc) return rc;
    if (v < (uint64_t)min || v > (uint64_t)max)
        return stp_err_set(err, STP_EFORMAT, "%s: key '%s' = %llu is outside %d..%d", gguf_path(g),
                           key, (unsigned long long)v, min, max);
    *out = (int)v;
    return 0;
}

int model_config_load(model_config *cfg, const gguf_file *g, char *warn, size_t warn_cap,
                      stp_err *err) {
    memset(cfg, 0, sizeof *cfg);
    if (warn && warn_cap) warn[0] = 0;
    char arch[64];
    int rc = gguf_get_cstr(g, "general.architecture", arch, sizeof arch, err);
    if (rc == STP_EINVAL)
        return stp_err_set(err, STP_EFORMAT, "%s: no general.architecture key: not a model file",
                           gguf_path(g));
    if (rc) return rc;
    if (strcmp(arch, ARCH))
        return stp_err_set(err, STP_EUNSUPPORTED,
                           "%s: architecture '%s' is not supported (stpipe runs '%s' models only)",
                           gguf_path(g), arch, ARCH);

    struct {
        const char *key;
        int *dst;
        int min, max;
        bool required;
    } ints[] = {
        {ARCH ".block_count", &cfg->n_layer, 1, 4096, true},
        {ARCH ".embedding_length", &cfg->n_embd, 1, 1 << 20, true},
        {ARCH ".attention.head_count", &cfg->n_head, 1, 4096, true},
        {ARCH ".attention.head_count_kv", &cfg->n_head_kv, 1, 4096, false},
        {ARCH ".attention.key_length", &cfg->head_dim, 2, STP_MAX_HEAD_DIM, false},
        {ARCH ".context_length", &cfg->n_ctx_train, 1, 1 << 24, true},
        {ARCH ".expert_count", &cfg->n_expert, 1, STP_MAX_EXPERTS, true},
        {ARCH ".expert_used_count", &cfg->n_expert_used, 1, STP_MAX_EXPERTS, true},
        {ARCH ".expert_feed_forward_length", &cfg->n_ff_exp, 1, 1 << 20, true},
        {ARCH ".attention.sliding_window", &cfg->sliding_window, 0, 1 << 24, false},
    };
    cfg->n_head_kv = -1;
    cfg->head_dim = -1;
    for (size_t i = 0; i < sizeof ints / sizeof ints[0]; i++) {
        rc =
            s_get_int(g, ints[i].key, ints[i].dst, ints[i].min, ints[i].max, ints[i].required, err);
        if (rc) return rc;
    }
    if (cfg->n_head_kv < 0) cfg->n_head_kv = cfg->n_head;
    if (cfg->head_dim < 0) {
        if (cfg->n_embd % cfg->n_head)
            return stp_err_set(err, STP_EFORMAT,
                               "%s: no attention.key_length and embedding_length %d is not a "
                               "multiple of head_count %d",
                               gguf_path(g), cfg->n_embd, cfg->n_head);
        cfg->head_dim = cfg->n_embd / cfg->n_head;
        if (cfg->head_dim < 2 || cfg->head_dim > STP_MAX_HEAD_DIM)
            return stp_err_set(err, STP_EFORMAT,
                               "%s: derived head size %d (embedding_length / head_count) is "
                               "outside 2..%d",
                               gguf_path(g), cfg->head_dim, STP_MAX_HEAD_DIM);
    }
    int vlen = cfg->head_dim;
    rc = s_get_int(g, ARCH ".attention.value_length", &vlen, 1, 4096, false, err);
    if (rc) return rc;
    if (vlen != cfg->head_dim)
        return stp_err_set(err, STP_EUNSUPPORTED, "%s: key_length %d != value_length %d",
                           gguf_path(g), cfg->head_dim, vlen);
    if (cfg->n_head % cfg->n_head_kv)
        return stp_err_set(err, STP_EFORMAT,
                           "%s: head_count %d is not a multiple of head_count_kv %d", gguf_path(g),
                           cfg->n_head, cfg->n_head_kv);
    if (cfg->head_dim % 2)
        return stp_err_set(err, STP_EFORMAT, "%s: key_length %d must be even for RoPE",
                           gguf_path(g), cfg->head_dim);
    if (cfg->n_expert_used > cfg->n_expert)
        return stp_err_set(err, STP_EFORMAT, "%s: expert_used_count %d > expert_count %d",
                           gguf_path(g), cfg->n_expert_used, cfg->n_expert);

    cfg->rope_base = 10000.0f;
    rc = gguf_get_f32(g, ARCH ".rope.freq_base", &cfg->rope_base, err);
    if (rc && rc != STP_EINVAL) return rc;
    cfg->rms_eps = 1e-6f;
    rc = gguf_get_f32(g, ARCH ".attention.layer_norm_rms_epsilon", &cfg->rms_eps, err);
    if (rc && rc != STP_EINVAL) return rc;
    if (!(cfg->rope_base > 0) || !(cfg->rms_eps > 0))
        return stp_err_set(err, STP_EFORMAT, "%s: rope.freq_base and rms epsilon must be > 0",
                           gguf_path(g));

    uint32_t gf = 0;
    rc = gguf_get_u32(g, ARCH ".expert_gating_func", &gf, err);
    if (rc == STP_EINVAL) {
        cfg->gating_guessed = true;
        cfg->gating = cfg->n_expert <= 32 ? GATING_SIGMOID : GATING_SOFTMAX;
        if (warn)
            snprintf(warn, warn_cap,
                     "%s: no %s.expert_gating_func key; using %s gating for %d experts",
                     gguf_path(g), ARCH, cfg->gating == GATING_SIGMOID ? "sigmoid" : "softmax",
                     cfg->n_expert);
    } else if (rc) {
        return rc;
    } else if (gf == 1 || gf == 2) {
        cfg->gating = (model_gating)gf;
    } else {
        return stp_err_set(err, STP_EUNSUPPORTED,
                           "%s: expert_gating_func = %u is not supported (1 softmax, 2 sigmoid)",
                           gguf_path(g), gf);
    }

    cfg->nope_step = 0;
    if (cfg->sliding_window > 0) {
        cfg->nope_step = 4;
        uint32_t pat = 0;
        rc = gguf_get_u32(g, ARCH ".attention.sliding_window_pattern", &pat, err);
        if (rc && rc != STP_EINVAL) return rc;
    }
    cfg->tied = gguf_tensor_find(g, "output.weight") == NULL;
    const gguf_tensor *te = gguf_tensor_find(g, "token_embd.weight");
    if (!te)
        return stp_err_set(err, STP_EFORMAT, "%s: tensor 'token_embd.weight' is missing",
                           gguf_path(g));
    cfg->n_vocab = (int)te->ne[1];
    return 0;
}

bool model_config_layer_rope(const model_config *cfg, int il) {
    return !(cfg->nope_step > 0 && il % cfg->nope_step == 0);
}

int model_config_layer_window(const model_config *cfg, int il) {
    if (cfg->sliding_window <= 0 || il % cfg->nope_step == 0) return 0;
    return cfg->sliding_window;
}
