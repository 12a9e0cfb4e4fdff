/* opt: one option table (name, environment variable, type, bounds, default, help) and the one
 * parser over it, shared by the stages and the CLI, so that an option is declared once and its
 * value, its checks, its error messages and its --help line all come from that declaration.
 *
 * A table is an array of opt_def; each entry writes one field of a caller's struct (offset from
 * a base pointer). opt_parse sets every default, then takes the environment, then argv: argv
 * beats the environment, the environment beats the default. Library code: it never prints or
 * exits; errors name the option (or the variable) and the accepted range. */
#ifndef STP_OPT_H
#define STP_OPT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>

#include "util/stp_err.h"

typedef enum opt_type {
    OPT_FLAG,   /* bool; takes no value ("1"/"0" in the environment) */
    OPT_INT,    /* int, decimal, within [lo, hi] */
    OPT_DOUBLE, /* double, within [lo, hi]; -INFINITY..INFINITY: any finite number */
    OPT_FLOAT,  /* float, as OPT_DOUBLE (and finite as a float) */
    OPT_U64,    /* uint64_t, decimal, within [lo, hi] (a default may be "-1": UINT64_MAX) */
    OPT_STR,    /* const char *, pointing into argv or the environment (not copied) */
    OPT_FN,     /* parsed by fn into the field */
} opt_type;

typedef struct opt_def {
    const char *name; /* "--threads"; NULL: environment only */
    const char *env;  /* "STP_PREFETCH"; NULL: command line only */
    opt_type type;
    double lo, hi;       /* OPT_INT, OPT_DOUBLE: accepted range (both ends included) */
    const char *def;     /* default, parsed like a value but not range-checked (a field's
                          * "unset" value, e.g. 0 = "from the run directory", may lie outside
                          * the range); NULL: the field is zeroed */
    const char *metavar; /* "N", "FILE" in the help text */
    const char *help;    /* one line */
    size_t off;          /* offsetof the field in the caller's struct */
    /* OPT_FN: parse v into field; an error message need not name the option (opt_parse
     * prefixes it). */
    int (*fn)(const char *v, void *field, stp_err *err);
    const char *alias; /* "-t": a short form of name, the same in every way; NULL: none */
} opt_def;

enum {
    OPT_KEEP_UNKNOWN = 1, /* leave unknown arguments in argv (compacted, argv[0] kept) for a
                           * second parser; without it an unknown argument is an error */
    OPT_NO_ENV = 2,       /* ignore the environment (tests, programs that take argv only) */
};

/* Sets defaults, then the environment (a variable that is unset or empty is skipped), then
 * argv[1..] ("--name value" or "--name=value", or the alias: "-t 2", "-t=2"; a flag takes no
 * value). Errors name the form the user typed ("-t needs ..."). With OPT_KEEP_UNKNOWN,
 * *argc and argv are rewritten to hold argv[0] and the arguments no entry took. Returns 0 or
 * STP_EINVAL, the message naming the option or variable:
 *   "--threads needs an integer in 1..256 (got 'x')", "STP_PREFETCH=x needs an integer ...",
 *   "--model needs a value", "unknown option '--x'". */
int opt_parse(const opt_def *t, size_t n, void *base, int *argc, char **argv, int flags,
              stp_err *err);

/* Writes one line per entry ("-t, --threads N", help, range, default, variable) to f. */
void opt_help(const opt_def *t, size_t n, FILE *f);

/* The entry for "--name" or its alias (or "--name=..."), NULL if none. */
const opt_def *opt_find(const opt_def *t, size_t n, const char *arg);

#endif
