/* opt: the option table parser (defaults, environment, argv) and its help text; see opt.h. */
#include "opt/opt.h"

#include <errno.h>
#include <float.h>
#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static void *s_field(const opt_def *d, void *base) {
    return (char *)base + d->off;
}

/* Parses v into the entry's field; who names the source ("--x" or "STP_X=v:") in messages. */
static int s_set(const opt_def *d, void *base, const char *v, bool check, const char *who,
                 stp_err *err) {
    void *f = s_field(d, base);
    switch (d->type) {
    case OPT_FLAG:
        if (!strcmp(v, "1") || !strcmp(v, "true") || !strcmp(v, "yes") || !strcmp(v, "on"))
            *(bool *)f = true;
        else if (!strcmp(v, "0") || !strcmp(v, "false") || !strcmp(v, "no") || !strcmp(v, "off"))
            *(bool *)f = false;
        else
            return stp_err_set(err, STP_EINVAL, "%s needs 1 or 0 (got '%s')", who, v);
        return 0;
    case OPT_INT: {
        char *end = NULL;
        errno = 0;
        long long x = strtoll(v, &end, 10);
        if (errno || end == v || *end || x < INT_MIN || x > INT_MAX ||
            (check && (x < d->lo || x > d->hi)))
            return stp_err_set(err, STP_EINVAL, "%s needs an integer in %.0f..%.0f (got '%s')", who,
                               d->lo, d->hi, v);
        *(int *)f = (int)x;
        return 0;
    }
    case OPT_DOUBLE:
    case OPT_FLOAT: {
        char *end = NULL;
        errno = 0;
        double x = strtod(v, &end);
        bool any = isinf(d->lo) && isinf(d->hi); /* unbounded: any finite number */
        if (errno || end == v || *end || !isfinite(x) ||
            (d->type == OPT_FLOAT && fabs(x) > FLT_MAX) || (check && (x < d->lo || x > d->hi))) {
            if (any) return stp_err_set(err, STP_EINVAL, "%s needs a number (got '%s')", who, v);
            return stp_err_set(err, STP_EINVAL, "%s needs a number in %g..%g (got '%s')", who,
                               d->lo, d->hi, v);
        }
        if (d->type == OPT_FLOAT)
            *(float *)f = (float)x;
        else
            *(double *)f = x;
        return 0;
    }
    case OPT_U64: {
        char *end = NULL;
        errno = 0;
        unsigned long long x = strtoull(v, &end, 10);
        if (errno || end == v || *end || (check && strchr(v, '-')) ||
            (check && (x < (unsigned long long)d->lo || x > (unsigned long long)d->hi)))
            return stp_err_set(err, STP_EINVAL, "%s needs an integer in %.0f..%.0f (got '%s')", who,
                               d->lo, d->hi, v);
        *(uint64_t *)f = (uint64_t)x;
        return 0;
    }
    case OPT_STR: *(const char **)f = v; return 0;
    case OPT_FN: {
        int rc = d->fn(v, f, err);
        if (rc) stp_err_prefix(err, "%s", who);
        return rc;
    }
    }
    return stp_err_set(err, STP_EINVAL, "%s: bad option table entry", who);
}

/* The length of arg's option part if it is "name" or "name=...", else 0. */
static size_t s_match(const char *arg, const char *name) {
    size_t l = name ? strlen(name) : 0;
    return l && !strncmp(arg, name, l) && (arg[l] == '\0' || arg[l] == '=') ? l : 0;
}

const opt_def *opt_find(const opt_def *t, size_t n, const char *arg) {
    for (size_t i = 0; i < n; i++)
        if (s_match(arg, t[i].name) || s_match(arg, t[i].alias)) return &t[i];
    return NULL;
}

int opt_parse(const opt_def *t, size_t n, void *base, int *argc, char **argv, int flags,
              stp_err *err) {
    for (size_t i = 0; i < n; i++) {
        void *f = s_field(&t[i], base);
        switch (t[i].type) {
        case OPT_FLAG: *(bool *)f = false; break;
        case OPT_INT: *(int *)f = 0; break;
        case OPT_DOUBLE: *(double *)f = 0; break;
        case OPT_FLOAT: *(float *)f = 0; break;
        case OPT_U64: *(uint64_t *)f = 0; break;
        case OPT_STR: *(const char **)f = NULL; break;
        case OPT_FN: break; /* fn's field: the caller's zeroed struct, or def below */
        }
        if (t[i].def) {
            const char *who = t[i].name ? t[i].name : t[i].env;
            int rc = s_set(&t[i], base, t[i].def, false, who, err);
            if (rc) return rc;
        }
    }
    if (!(flags & OPT_NO_ENV))
        for (size_t i = 0; i < n; i++) {
            const char *v = t[i].env ? getenv(t[i].env) : NULL;
            if (!v || !*v) continue;
            char who[128];
            snprintf(who, sizeof who, "%s=%s", t[i].env, v);
            int rc = s_set(&t[i], base, v, true, who, err);
            if (rc) return rc;
        }
    int kept = 1;
    for (int i = 1; i < *argc; i++) {
        const char *a = argv[i];
        const opt_def *d = opt_find(t, n, a);
        if (!d) {
            if (!(flags & OPT_KEEP_UNKNOWN))
                return stp_err_set(err, STP_EINVAL, "unknown option '%s'", a);
            argv[kept++] = argv[i];
            continue;
        }
        size_t l = s_match(a, d->name) ? strlen(d->name) : strlen(d->alias);
        char who[64]; /* the form the user typed: "-t" or "--threads" */
        snprintf(who, sizeof who, "%.*s", (int)l, a);
        const char *eq = a[l] == '=' ? a + l + 1 : NULL;
        int rc;
        if (d->type == OPT_FLAG && !eq) {
            *(bool *)s_field(d, base) = true;
            continue;
        }
        const char *v = eq;
        if (!v) {
            if (i + 1 >= *argc) return stp_err_set(err, STP_EINVAL, "%s needs a value", who);
            v = argv[++i];
        }
        if ((rc = s_set(d, base, v, true, who, err))) return rc;
    }
    if (flags & OPT_KEEP_UNKNOWN) {
        *argc = kept;
        argv[kept] = NULL;
    }
    return 0;
}

void opt_help(const opt_def *t, size_t n, FILE *f) {
    for (size_t i = 0; i < n; i++) {
        const opt_def *d = &t[i];
        char lhs[64];
        const char *mv = d->type == OPT_FLAG ? "" : d->metavar ? d->metavar : "V";
        if (d->name)
            snprintf(lhs, sizeof lhs, "%s%s%s%s%s", d->alias ? d->alias : "", d->alias ? ", " : "",
                     d->name, *mv ? " " : "", mv);
        else
            snprintf(lhs, sizeof lhs, "%s=%s", d->env, d->metavar ? d->metavar : "V");
        fprintf(f, "  %-26s %s", lhs, d->help ? d->help : "");
        if (d->type == OPT_INT || d->type == OPT_U64) fprintf(f, " (%.0f..%.0f)", d->lo, d->hi);
        if ((d->type == OPT_DOUBLE || d->type == OPT_FLOAT) && !(isinf(d->lo) && isinf(d->hi)))
            fprintf(f, " (%g..%g)", d->lo, d->hi);
        if (d->def && d->type != OPT_FLAG) fprintf(f, " [default %s]", d->def);
        if (d->env && d->name) fprintf(f, " [env %s]", d->env);
        fputc('\n', f);
    }
}
