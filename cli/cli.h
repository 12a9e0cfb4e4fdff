/* cli: the `stpipe` command-line tool's subcommands. Each lives in cli_<name>.c and takes the
 * arguments after the subcommand name; it returns the process exit code (0 ok, 1 runtime error,
 * 2 usage error). Shared option helpers are in cli_util.c. */
#ifndef STP_CLI_H
#define STP_CLI_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

int cli_generate(int argc, char **argv);
int cli_info(int argc, char **argv);
int cli_tokenize(int argc, char **argv);
int cli_detokenize(int argc, char **argv);
int cli_bench(int argc, char **argv);
int cli_chat(int argc, char **argv);
int cli_serve(int argc, char **argv);

/* Helpers shared by subcommands. */
bool cli_opt_is(const char *arg, const char *name); /* "--name" */
int cli_parse_int(const char *s, const char *what, long long min, long long max, long long *out);
int cli_parse_float(const char *s, const char *what, double *out);
/* Parses "1 2 3" (spaces or commas) into a malloc'd array; returns count or -1 (message printed).
 */
int cli_parse_ids(const char *s, int32_t **ids);
/* If arg is a sampling option (--temp --top-k --top-p --min-p --repeat-penalty
 * --presence-penalty --frequency-penalty --seed), parses its value v into sp and returns 1;
 * 0 if arg is not one; -1 on a missing or bad value (message printed). */
struct sampler_params;
int cli_sampling_opt(const char *arg, const char *v, struct sampler_params *sp);
/* A model_progress_fn: a bar on stderr when it is a terminal, nothing otherwise. */
void cli_progress(void *ud, const char *what, double frac);
/* Reads a whole file (or "-" for stdin) into a malloc'd NUL-terminated buffer. */
char *cli_read_file(const char *path, size_t *len);

#endif
