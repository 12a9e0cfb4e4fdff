/* sampler_bench: time of one sampler_sample call on a SmallThinker-sized vocabulary (151936
 * logits), for the settings users reach: greedy (the CLI's default), a temperature alone
 * (`stpipe generate --temp T`, an API request with top_k 0), with top-p, with top-k (the
 * server's and chat's defaults: top-k 20, top-p 0.95) and llama.cpp's usual set. The logits are
 * seeded normal draws of a given spread (random-weight models give a flat row: every token
 * within the no-filter floor; a real model's are more peaked). Best of R calls, the CPU model
 * printed first. Usage: sampler_bench [spread, default 3] [R, default 50]. Not a test. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "util/sysinfo.h"
#include "model/sampler.h"

static double s_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

int main(int argc, char **argv) {
    const int V = 151936;
    const double spread = argc > 1 ? atof(argv[1]) : 3.0;
    const int reps = argc > 2 ? atoi(argv[2]) : 50;
    float *logits = malloc(sizeof(float) * V), *tmp = malloc(sizeof(float) * V);
    if (!logits || !tmp || reps < 1) {
        fprintf(stderr, "sampler_bench: out of memory or bad arguments\n");
        return 1;
    }
    uint64_t x = 1;
    for (int i = 0; i < V; i++) { /* Box-Muller on a seeded LCG */
        x = x * 6364136223846793005ULL + 1442695040888963407ULL;
        const double u1 = ((double)(x >> 11) + 1.0) / 9007199254740993.0;
        x = x * 6364136223846793005ULL + 1442695040888963407ULL;
        const double u2 = (double)(x >> 11) / 9007199254740992.0;
        logits[i] = (float)(spread * sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
    }
    char cpu[256];
    sysinfo_cpu_model(cpu, sizeof cpu);
    printf("sampler_bench: CPU %s; %d logits, normal with sd %.2f; best of %d calls\n", cpu, V,
           spread, reps);
    static const struct {
        const char *name;
        float temp, top_p, min_p;
        int top_k;
    } cfg[] = {
        {"greedy", 0, 1, 0, 0},
        {"temperature 0.6", 0.6f, 1, 0, 0},
        {"temperature 0.6, top-p 0.95", 0.6f, 0.95f, 0, 0},
        {"temperature 0.6, top-k 20, top-p 0.95", 0.6f, 0.95f, 0, 20},
        {"temperature 0.8, top-k 40, top-p 0.95, min-p 0.05", 0.8f, 0.95f, 0.05f, 40},
    };
    for (size_t c = 0; c < sizeof cfg / sizeof cfg[0]; c++) {
        sampler_params p;
        sampler_params_default(&p);
        p.temperature = cfg[c].temp;
        p.top_p = cfg[c].top_p;
        p.min_p = cfg[c].min_p;
        p.top_k = cfg[c].top_k;
        p.seed = 1;
        sampler *s = NULL;
        stp_err err = {0};
        if (sampler_new(&s, &p, V, &err)) {
            fprintf(stderr, "sampler_bench: %s\n", err.msg);
            return 1;
        }
        double best = 1e30;
        for (int r = 0; r < reps; r++) {
            memcpy(tmp, logits, sizeof(float) * V);
            const double t0 = s_now();
            sampler_sample(s, tmp);
            const double dt = s_now() - t0;
            best = dt < best ? dt : best;
        }
        printf("%-52s %8.1f us\n", cfg[c].name, best * 1e6);
        sampler_destroy(&s);
    }
    free(logits);
    free(tmp);
    return 0;
}
