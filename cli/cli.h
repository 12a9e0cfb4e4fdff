/* cli: the `stpipe` command-line tool's subcommands. Each lives in cli_<name>.c and takes the
 * arguments from the subcommand name on (argv[0] is the name); it returns the process exit code (0
 * ok, 1 runtime error, 2 usage error). Options are opt_def tables (common/opt); the rows several
 * commands share and the helpers are here and in cli_util.c. */
#ifndef STP_CLI_H
#define STP_CLI_H

#include <math.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "opt/opt.h"

int cli_generate(int argc, char **argv);
int cli_info(int argc, char **argv);
int cli_tokenize(int argc, char **argv);
int cli_detokenize(int argc, char **argv);
int cli_bench(int argc, char **argv);
int cli_chat(int argc, char **argv);
int cli_serve(int argc, char **argv);

/* Options. Each command declares its options as an opt_def table (common/opt) over its own
 * struct; the options several commands take are declared once here, as rows over a struct T
 * with fields of these names (help, model, threads, ctx, kv_type, n_predict, pipeline, sp), with
 * the command's own defaults and help where they differ. --help is generated from the table. */
#define CLI_OPT_HELP(T)                                                                            \
    { "--help", NULL, OPT_FLAG, 0, 0, NULL, NULL, "this help", offsetof(T, help), NULL, "-h" }
#define CLI_OPT_MODEL(T, help)                                                                     \
    { "--model", NULL, OPT_STR, 0, 0, NULL, "FILE", help, offsetof(T, model), NULL, "-m" }
#define CLI_OPT_PIPELINE(T, help)                                                                  \
    { "--pipeline", NULL, OPT_STR, 0, 0, NULL, "RUN_DIR", help, offsetof(T, pipeline), NULL, NULL }
#define CLI_OPT_THREADS(T, def, help)                                                              \
    { "--threads", NULL, OPT_INT, 1, 256, def, "N", help, offsetof(T, threads), NULL, "-t" }
#define CLI_OPT_CTX(T, lo)                                                                         \
    {                                                                                              \
        "--ctx-size", NULL, OPT_INT, lo, 1 << 24, NULL, "N",                                       \
            "context length (default min(model, 4096))", offsetof(T, ctx), NULL, "-c"              \
    }
/* The KV cache type; f16 by default, as llama.cpp's -ctk/-ctv (half of f32's bytes read per token
 * at depth). The golden data are made with f32 caches: comparisons with it pass --cache-type f32.
 */
#define CLI_OPT_CACHE_TYPE(T, help)                                                                \
    {                                                                                              \
        "--cache-type", NULL, OPT_FN, 0, 0, "f16", "f32|f16|q8_0", help, offsetof(T, kv_type),     \
            cli_opt_cache_type, NULL                                                               \
    }
#define CLI_OPT_N_PREDICT(T, def, help)                                                            \
    {                                                                                              \
        "--n-predict", NULL, OPT_INT, -1, 1 << 24, def, "N", help, offsetof(T, n_predict), NULL,   \
            "-n"                                                                                   \
    }
/* The sparse LM head (model/lm_head.h), over an int field sparse_head. */
#define CLI_OPT_SPARSE_HEAD(T)                                                                     \
    {                                                                                              \
        "--sparse-head", NULL, OPT_INT, 0, 1 << 24, "0", "C",                                      \
            "sparse LM head: exact logits only for the C rows a 1-bit sketch of the head ranks "   \
            "highest, the rest -inf (0 = off: the full head)",                                     \
            offsetof(T, sparse_head), NULL, NULL                                                   \
    }
/* Sampling (model/sampler.h): temperature, the filters, the penalties and the seed. */
#define CLI_OPT_FLOAT(T, name, def, mv, help, field)                                               \
    { name, NULL, OPT_FLOAT, -INFINITY, INFINITY, def, mv, help, offsetof(T, field), NULL, NULL }
#define CLI_OPT_TOP_K(T, def)                                                                      \
    {                                                                                              \
        "--top-k", NULL, OPT_INT, 0, 1 << 24, def, "K", "top-k filter (0 = off)",                  \
            offsetof(T, sp.top_k), NULL, NULL                                                      \
    }
#define CLI_OPT_SEED(T, def, help)                                                                 \
    {                                                                                              \
        "--seed", NULL, OPT_U64, 0, 4611686018427387904.0, def, "S", help, offsetof(T, sp.seed),   \
            NULL, NULL                                                                             \
    }
#define CLI_OPTS_SAMPLING(T, temp_def, top_k_def, top_p_def, seed_def, seed_help)                  \
    CLI_OPT_FLOAT(T, "--temp", temp_def, "T", "temperature (0 = greedy, ties to the lowest id)",   \
                  sp.temperature),                                                                 \
        CLI_OPT_TOP_K(T, top_k_def),                                                               \
        CLI_OPT_FLOAT(T, "--top-p", top_p_def, "P", "top-p filter (1 = off)", sp.top_p),           \
        CLI_OPT_FLOAT(T, "--min-p", "0", "P", "min-p filter (0 = off)", sp.min_p),                 \
        CLI_OPT_FLOAT(T, "--repeat-penalty", "1", "R", "repetition penalty (1 = off)",             \
                      sp.repeat_penalty),                                                          \
        CLI_OPT_FLOAT(T, "--presence-penalty", "0", "P", "presence penalty (0 = off)",             \
                      sp.presence_penalty),                                                        \
        CLI_OPT_FLOAT(T, "--frequency-penalty", "0", "F", "frequency penalty (0 = off)",           \
                      sp.frequency_penalty),                                                       \
        CLI_OPT_SEED(T, seed_def, seed_help)
#define CLI_NOPTS(t) (sizeof(t) / sizeof((t)[0]))

/* An OPT_FN for --cache-type: f32, f16 or q8_0 into a kv_dtype. */
int cli_opt_cache_type(const char *v, void *field, stp_err *err);
/* True when argv[1..] holds the option name ("--name value" or "--name=value"): for an option
 * whose default cannot tell "not given" from a value (a pipeline ignores --cache-type). */
bool cli_opt_given(int argc, char **argv, const char *name);
/* Parses argv (argv[0] is the command's name) by the table t into base; fields the table does
 * not hold keep what the caller set. Returns 0; CLI_HELP after usage(stdout) when --help was
 * given (the command exits 0); or 2, a usage error, after printing "stpipe CMD: <error> (see
 * stpipe CMD --help)". */
enum { CLI_HELP = -1 };
int cli_opts_parse(const char *cmd, const opt_def *t, size_t n, void *base, int argc, char **argv,
                   void (*usage)(FILE *f));
/* The --help text: usage (its "usage: stpipe ..." lines), the table, then notes (or NULL). */
void cli_opts_help(FILE *f, const char *usage, const opt_def *t, size_t n, const char *notes);
/* Parses "1 2 3" (spaces or commas) into a malloc'd array; returns count or -1 (message printed).
 */
int cli_parse_ids(const char *s, int32_t **ids);
/* A model_progress_fn: a bar on stderr when it is a terminal, nothing otherwise. */
void cli_progress(void *ud, const char *what, double frac);
/* Reads a whole file (or "-" for stdin) into a malloc'd NUL-terminated buffer. */
char *cli_read_file(const char *path, size_t *len);

#endif
