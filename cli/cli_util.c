/* cli_util: helpers shared by the stpipe subcommands (the option table's parse and help with
 * the CLI's messages, token id lists, files, the progress bar); see cli.h. */
#include "cli.h"
#include "model/kv_cache.h"

#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int cli_opt_cache_type(const char *v, void *field, stp_err *err) {
    return kv_cache_parse_type(v, (kv_dtype *)field, err);
}

bool cli_opt_given(int argc, char **argv, const char *name) {
    const size_t n = strlen(name);
    for (int i = 1; i < argc; i++)
        if (!strncmp(argv[i], name, n) && (argv[i][n] == '\0' || argv[i][n] == '=')) return true;
    return false;
}

int cli_opts_parse(const char *cmd, const opt_def *t, size_t n, void *base, int argc, char **argv,
                   void (*usage)(FILE *f)) {
    stp_err err = {0};
    if (opt_parse(t, n, base, &argc, argv, 0, &err)) {
        fprintf(stderr, "stpipe %s: %s (see stpipe %s --help)\n", cmd, err.msg, cmd);
        return 2;
    }
    const opt_def *h = opt_find(t, n, "--help");
    if (h && *(const bool *)((const char *)base + h->off)) {
        usage(stdout);
        return CLI_HELP;
    }
    return 0;
}

void cli_opts_help(FILE *f, const char *usage, const opt_def *t, size_t n, const char *notes) {
    fputs(usage, f);
    opt_help(t, n, f);
    if (notes) fputs(notes, f);
}

int cli_parse_ids(const char *s, int32_t **ids) {
    size_t cap = 16, n = 0;
    int32_t *v = malloc(cap * sizeof *v);
    if (!v) return -1;
    const char *p = s;
    for (;;) {
        while (*p == ' ' || *p == ',' || *p == '\t' || *p == '\n' || *p == '[' || *p == ']')
            p++;
        if (!*p) break;
        char *end;
        errno = 0;
        long long x = strtoll(p, &end, 10);
        if (end == p || errno || x < 0 || x > INT32_MAX) {
            fprintf(stderr,
                    "stpipe: bad token id near '%.20s' (ids are non-negative integers "
                    "separated by spaces)\n",
                    p);
            free(v);
            return -1;
        }
        if (n == cap) {
            cap *= 2;
            int32_t *nv = realloc(v, cap * sizeof *v);
            if (!nv) {
                free(v);
                return -1;
            }
            v = nv;
        }
        v[n++] = (int32_t)x;
        p = end;
    }
    *ids = v;
    return (int)n;
}

char *cli_read_file(const char *path, size_t *len) {
    FILE *f = strcmp(path, "-") ? fopen(path, "rb") : stdin;
    if (!f) {
        fprintf(stderr, "stpipe: cannot open '%s': %s\n", path, strerror(errno));
        return NULL;
    }
    size_t cap = 1 << 16, n = 0;
    char *buf = malloc(cap + 1);
    while (buf) {
        size_t r = fread(buf + n, 1, cap - n, f);
        n += r;
        if (n < cap) break;
        cap *= 2;
        char *nb = realloc(buf, cap + 1);
        if (!nb) {
            free(buf);
            buf = NULL;
        } else {
            buf = nb;
        }
    }
    if (f != stdin) fclose(f);
    if (!buf) {
        fprintf(stderr, "stpipe: out of memory reading '%s'\n", path);
        return NULL;
    }
    buf[n] = 0;
    if (len) *len = n;
    return buf;
}

void cli_progress(void *ud, const char *what, double frac) {
    (void)ud;
    if (!isatty(2)) return;
    int w = (int)(frac * 30 + 0.5);
    fprintf(stderr, "\r%-28s [%-30.*s] %3d%%", what, w, "##############################",
            (int)(frac * 100 + 0.5));
    if (frac >= 1.0) fputc('\n', stderr);
    fflush(stderr);
}
