/* cli_util: option parsing helpers shared by the stpipe subcommands; see cli.h. */
#include "cli.h"
#include "model/sampler.h"

#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

bool cli_opt_is(const char *arg, const char *name) {
    return arg && !strcmp(arg, name);
}

int cli_parse_int(const char *s, const char *what, long long min, long long max, long long *out) {
    char *end;
    errno = 0;
    long long v = strtoll(s ? s : "", &end, 10);
    if (!s || !*s || *end || errno || v < min || v > max) {
        fprintf(stderr, "stpipe: %s must be an integer in %lld..%lld, got '%s'\n", what, min, max,
                s ? s : "");
        return -1;
    }
    *out = v;
    return 0;
}

int cli_parse_float(const char *s, const char *what, double *out) {
    char *end;
    errno = 0;
    double v = strtod(s ? s : "", &end);
    if (!s || !*s || *end || errno || !isfinite(v)) {
        fprintf(stderr, "stpipe: %s must be a finite number, got '%s'\n", what, s ? s : "");
        return -1;
    }
    *out = v;
    return 0;
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

int cli_sampling_opt(const char *arg, const char *v, sampler_params *sp) {
    static const char *const floats[] = {"--temp",
                                         "--top-p",
                                         "--min-p",
                                         "--repeat-penalty",
                                         "--presence-penalty",
                                         "--frequency-penalty"};
    float *const fdst[] = {
        &sp->temperature,      &sp->top_p, &sp->min_p, &sp->repeat_penalty, &sp->presence_penalty,
        &sp->frequency_penalty};
    int which = -1;
    for (int i = 0; i < 6; i++)
        if (cli_opt_is(arg, floats[i])) which = i;
    bool is_int = cli_opt_is(arg, "--top-k") || cli_opt_is(arg, "--seed");
    if (which < 0 && !is_int) return 0;
    if (!v) {
        fprintf(stderr, "stpipe: %s needs a value\n", arg);
        return -1;
    }
    long long n;
    double d;
    if (which >= 0) {
        if (cli_parse_float(v, arg, &d)) return -1;
        *fdst[which] = (float)d;
    } else if (cli_opt_is(arg, "--top-k")) {
        if (cli_parse_int(v, arg, 0, 1 << 24, &n)) return -1;
        sp->top_k = (int)n;
    } else {
        if (cli_parse_int(v, arg, 0, (1LL << 62), &n)) return -1;
        sp->seed = (uint64_t)n;
    }
    return 1;
}
