/* cache_replay: the storage daemon's decision trace (--trace-decisions) through the C cache
 * policies (common/cache: the daemon's own lfu and lru, plus pin and Belady's opt) at several
 * pool sizes. Prints machine-readable lines for bench/cache_sim.py, which formats them:
 *   trace TOKENS LAYERS EXPERTS USES
 *   FRAMES POLICY MISSES TOKENS_COUNTED
 * usage: cache_replay TRACE --frames N[,N...] [--policies lru,lfu,pin,opt] [--half-life TOKENS]
 *                     [--warmup TOKENS] [--n-expert X] */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cache/cache_replay.h"

int main(int argc, char **argv) {
    const char *path = NULL, *frames = NULL, *policies = "lru,lfu,pin,opt";
    double half_life = 0;
    int warmup = 32, n_expert = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--frames") && v)
            frames = argv[++i];
        else if (!strcmp(a, "--policies") && v)
            policies = argv[++i];
        else if (!strcmp(a, "--half-life") && v)
            half_life = atof(argv[++i]);
        else if (!strcmp(a, "--warmup") && v)
            warmup = atoi(argv[++i]);
        else if (!strcmp(a, "--n-expert") && v)
            n_expert = atoi(argv[++i]);
        else if (a[0] != '-' && !path)
            path = a;
        else {
            fprintf(stderr, "usage: cache_replay TRACE --frames N[,N...] [--policies LIST] "
                            "[--half-life T] [--warmup T] [--n-expert X]\n");
            return 2;
        }
    }
    if (!path || !frames) {
        fprintf(stderr, "cache_replay: TRACE and --frames are needed\n");
        return 2;
    }
    cache_trace t;
    stp_err err = {0};
    if (cache_trace_read(&t, path, n_expert, &err)) {
        fprintf(stderr, "cache_replay: %s\n", err.msg);
        return 1;
    }
    printf("trace %d %d %d %d\n", t.n_tok, t.n_layer, t.n_expert, t.off[t.n_dec]);
    int rc = 0;
    char fl[1024], pl[256];
    snprintf(fl, sizeof fl, "%s", frames);
    for (char *fs = strtok(fl, ","); fs && !rc; fs = strtok(NULL, ",")) {
        int nf = atoi(fs);
        snprintf(pl, sizeof pl, "%s", policies);
        char *save = NULL;
        for (char *p = strtok_r(pl, ",", &save); p && !rc; p = strtok_r(NULL, ",", &save)) {
            cache_replay_opts o = {
                .policy = p, .frames = nf, .half_life = half_life, .warmup = warmup};
            cache_replay_result r;
            if ((rc = cache_replay(&t, &o, &r, &err)))
                fprintf(stderr, "cache_replay: %s\n", err.msg);
            else
                printf("%d %s %llu %d\n", nf, p, (unsigned long long)r.misses, r.tokens);
        }
    }
    cache_trace_fini(&t);
    return rc ? 1 : 0;
}
