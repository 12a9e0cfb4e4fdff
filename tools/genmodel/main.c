/* stpipe-genmodel: command line of the random-weight SmallThinker GGUF generator.
 *
 * Parses flags into a gm_config (preset first, then overrides in any order), then gm_run.
 * Exit codes: 0 ok, 1 runtime error, 2 usage error. See tools/genmodel/README.md. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "genmodel.h"

static void s_usage(FILE *f) {
    fputs("usage: stpipe-genmodel [--preset tiny|4b|21b] [-o FILE] [options]\n"
          "shape:  --n-layer N --n-embd N --n-head N --n-head-kv N --head-dim N --n-expert N\n"
          "        --n-expert-used N --n-ff-exp N --n-vocab N --n-ctx N\n"
          "        --gating sigmoid|softmax|none --sliding-window N (0 = no key)\n"
          "        --untied | --tied  --rope-base F  --rms-eps F\n"
          "data:   --dtype f32|f16|bf16|q8_0|q4_0  --seed N  --threads N (default 2)\n"
          "init:   --init unit|normal --gain F --qk-gain F --router-gain F --embd-scale F\n"
          "        --output-scale F --norm-noise F --skew F --idle-bias B\n"
          "vocab:  --tokenizer-json FILE  --vocab-only  --name NAME\n"
          "report: --report-routing (print expert popularity of random hidden states;\n"
          "        without -o nothing is written)\n",
          f);
}

static int s_u32(const char *s, uint32_t *out) {
    char *end;
    unsigned long long v = strtoull(s, &end, 10);
    if (!*s || *end || v > 0xffffffffull) return -1;
    *out = (uint32_t)v;
    return 0;
}

static int s_f32(const char *s, float *out) {
    char *end;
    double v = strtod(s, &end);
    if (!*s || *end || !isfinite(v)) return -1;
    *out = (float)v;
    return 0;
}

int main(int argc, char **argv) {
    gm_config cfg;
    stp_err err = {0};
    const char *preset = "tiny";
    for (int i = 1; i < argc - 1; i++)
        if (strcmp(argv[i], "--preset") == 0) preset = argv[i + 1];
    if (gm_config_preset(&cfg, preset, &err)) {
        fprintf(stderr, "stpipe-genmodel: %s\n", err.msg);
        return 2;
    }
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        int bad = 0, used = 1;
        /* flags without a value */
        if (strcmp(a, "--untied") == 0)
            cfg.tied = false, used = 0;
        else if (strcmp(a, "--tied") == 0)
            cfg.tied = true, used = 0;
        else if (strcmp(a, "--vocab-only") == 0)
            cfg.vocab_only = true, used = 0;
        else if (strcmp(a, "--report-routing") == 0)
            cfg.report_routing = true, used = 0;
        else if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) {
            s_usage(stdout);
            return 0;
        } else if (!v) {
            fprintf(stderr, "stpipe-genmodel: %s needs a value (or is unknown)\n", a);
            s_usage(stderr);
            return 2;
        }
        /* flags with a value */
        else if (strcmp(a, "--preset") == 0)
            (void)0;
        else if (strcmp(a, "-o") == 0 || strcmp(a, "--output") == 0)
            cfg.out = v;
        else if (strcmp(a, "--n-layer") == 0)
            bad = s_u32(v, &cfg.n_layer);
        else if (strcmp(a, "--n-embd") == 0)
            bad = s_u32(v, &cfg.n_embd);
        else if (strcmp(a, "--n-head") == 0)
            bad = s_u32(v, &cfg.n_head);
        else if (strcmp(a, "--n-head-kv") == 0)
            bad = s_u32(v, &cfg.n_head_kv);
        else if (strcmp(a, "--head-dim") == 0)
            bad = s_u32(v, &cfg.head_dim);
        else if (strcmp(a, "--n-expert") == 0)
            bad = s_u32(v, &cfg.n_expert);
        else if (strcmp(a, "--n-expert-used") == 0)
            bad = s_u32(v, &cfg.n_expert_used);
        else if (strcmp(a, "--n-ff-exp") == 0)
            bad = s_u32(v, &cfg.n_ff_exp);
        else if (strcmp(a, "--n-vocab") == 0)
            bad = s_u32(v, &cfg.n_vocab);
        else if (strcmp(a, "--n-ctx") == 0)
            bad = s_u32(v, &cfg.n_ctx);
        else if (strcmp(a, "--sliding-window") == 0)
            bad = s_u32(v, &cfg.sliding_window);
        else if (strcmp(a, "--rope-base") == 0)
            bad = s_f32(v, &cfg.rope_base);
        else if (strcmp(a, "--rms-eps") == 0)
            bad = s_f32(v, &cfg.rms_eps);
        else if (strcmp(a, "--gain") == 0)
            bad = s_f32(v, &cfg.gain);
        else if (strcmp(a, "--qk-gain") == 0)
            bad = s_f32(v, &cfg.qk_gain);
        else if (strcmp(a, "--router-gain") == 0)
            bad = s_f32(v, &cfg.router_gain);
        else if (strcmp(a, "--embd-scale") == 0)
            bad = s_f32(v, &cfg.embd_scale);
        else if (strcmp(a, "--output-scale") == 0)
            bad = s_f32(v, &cfg.output_scale);
        else if (strcmp(a, "--norm-noise") == 0)
            bad = s_f32(v, &cfg.norm_noise);
        else if (strcmp(a, "--skew") == 0)
            bad = s_f32(v, &cfg.skew) || cfg.skew < 0;
        else if (strcmp(a, "--idle-bias") == 0)
            bad = s_f32(v, &cfg.idle_bias) || cfg.idle_bias < 0 || cfg.idle_bias > 16;
        else if (strcmp(a, "--tokenizer-json") == 0)
            cfg.tokenizer_json = v;
        else if (strcmp(a, "--name") == 0)
            snprintf(cfg.name, sizeof cfg.name, "%s", v);
        else if (strcmp(a, "--seed") == 0) {
            char *end;
            cfg.seed = strtoull(v, &end, 10);
            bad = !*v || *end;
        } else if (strcmp(a, "--threads") == 0) {
            uint32_t t;
            bad = s_u32(v, &t);
            cfg.threads = (int)t;
        } else if (strcmp(a, "--gating") == 0) {
            if (strcmp(v, "sigmoid") == 0)
                cfg.gating = GM_GATING_SIGMOID;
            else if (strcmp(v, "softmax") == 0)
                cfg.gating = GM_GATING_SOFTMAX;
            else if (strcmp(v, "none") == 0)
                cfg.gating = GM_GATING_NONE;
            else
                bad = 1;
        } else if (strcmp(a, "--init") == 0) {
            if (strcmp(v, "unit") == 0)
                cfg.init = GM_INIT_UNIT;
            else if (strcmp(v, "normal") == 0)
                cfg.init = GM_INIT_NORMAL;
            else
                bad = 1;
        } else if (strcmp(a, "--dtype") == 0) {
            static const struct {
                const char *n;
                stp_type t;
            } dt[] = {{"f32", STP_TYPE_F32},
                      {"f16", STP_TYPE_F16},
                      {"bf16", STP_TYPE_BF16},
                      {"q8_0", STP_TYPE_Q8_0},
                      {"q4_0", STP_TYPE_Q4_0}};
            bad = 1;
            for (size_t k = 0; k < sizeof dt / sizeof dt[0]; k++)
                if (strcmp(v, dt[k].n) == 0) cfg.dtype = dt[k].t, bad = 0;
        } else {
            fprintf(stderr, "stpipe-genmodel: unknown option %s\n", a);
            s_usage(stderr);
            return 2;
        }
        if (bad) {
            fprintf(stderr, "stpipe-genmodel: bad value '%s' for %s\n", v, a);
            return 2;
        }
        i += used;
    }
    if (!cfg.out && !cfg.report_routing) {
        fprintf(stderr, "stpipe-genmodel: -o FILE is required (or --report-routing)\n");
        s_usage(stderr);
        return 2;
    }
    if (gm_config_finalize(&cfg, &err)) {
        fprintf(stderr, "stpipe-genmodel: %s\n", err.msg);
        return 2;
    }
    if (gm_run(&cfg, &err)) {
        fprintf(stderr, "stpipe-genmodel: %s\n", err.msg);
        return 1;
    }
    return 0;
}
