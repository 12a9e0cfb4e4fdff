/* tokenizer_bench: tokenizer throughput on a deterministic English+CJK text (default 10 MB),
 * built from fixed sentences picked by a seeded LCG, tokenized with qwen2-vocab.gguf. Prints
 * MB/s, the CPU model, the ids made, peak RSS, and a peer's figure if given (--peer-mbps, e.g.
 * llama.cpp's measured on the same text written out with --write-text). Not a test. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

#include "util/sysinfo.h"
#include "gguf/gguf.h"
#include "tokenizer/tokenizer.h"

static const char *const s_en[] = {
    "The quick brown fox jumps over the lazy dog. ",
    "Mixture-of-experts models route each token to a few experts, which keeps inference cheap. ",
    "In 2025, the committee published 17 recommendations; only 3 were adopted.\n",
    "She said: \"It's not what you think, it's what you do.\" ",
    "Memory bandwidth, not compute, bounds decoding on commodity CPUs. ",
    "    for (int i = 0; i < n; i++) { sum += x[i] * w[i]; }\n",
    "Prices rose 4.5% to $1,299.99 (see Table 2).\n\n",
    "I'LL be there at 10:30 -- don't wait up, we've got work to do. ",
};
static const char *const s_cjk[] = {
    "東京は日本の首都であり、世界最大の都市圏の一つです。",
    "人工智能正在改变我们的生活方式和工作方式。",
    "混合专家模型在推理时只激活一小部分参数。\n",
    "서울은 대한민국의 수도입니다. ",
    "今日はいい天気ですね。散歩に行きましょう！",
    "这个模型的词表有十五万个词元。",
};

static double s_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* Deterministic text of about size bytes: ~70% English and ~30% CJK sentences (by count). */
static char *s_make_text(size_t size, size_t *len) {
    char *s = malloc(size + 256);
    if (!s) return NULL;
    size_t n = 0;
    uint64_t x = 0x2545F4914F6CDD1Dull;
    while (n < size) {
        x = x * 6364136223846793005ull + 1442695040888963407ull;
        unsigned r = (unsigned)(x >> 33);
        const char *p = (r % 10 < 7) ? s_en[(r / 10) % 8] : s_cjk[(r / 10) % 6];
        size_t l = strlen(p);
        if (n + l > size + 255) break;
        memcpy(s + n, p, l);
        n += l;
    }
    *len = n;
    return s;
}

static void s_usage(FILE *f) {
    fprintf(f, "usage: tokenizer_bench [--model GGUF] [--mb N] [--runs N] [--text FILE]\n"
               "                       [--write-text FILE] [--peer-mbps X] [--peer-name NAME]\n"
               "  --mb N          size of the generated text in MB (default 10; 100 for the\n"
               "                  large-input check)\n"
               "  --text FILE     tokenize FILE instead of the generated text\n"
               "  --write-text F  write the generated text to F (to time a peer on it) and exit\n"
               "  --peer-mbps X   a peer's throughput on the same text, printed beside ours\n");
}

int main(int argc, char **argv) {
    const char *model = STP_SOURCE_DIR "/tests/data/tokenizer/qwen2-vocab.gguf";
    const char *text_path = NULL, *write_path = NULL, *peer_name = "llama.cpp";
    double mb = 10, peer = 0;
    int runs = 3;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--model") && i + 1 < argc)
            model = argv[++i];
        else if (!strcmp(argv[i], "--mb") && i + 1 < argc)
            mb = atof(argv[++i]);
        else if (!strcmp(argv[i], "--runs") && i + 1 < argc)
            runs = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--text") && i + 1 < argc)
            text_path = argv[++i];
        else if (!strcmp(argv[i], "--write-text") && i + 1 < argc)
            write_path = argv[++i];
        else if (!strcmp(argv[i], "--peer-mbps") && i + 1 < argc)
            peer = atof(argv[++i]);
        else if (!strcmp(argv[i], "--peer-name") && i + 1 < argc)
            peer_name = argv[++i];
        else {
            s_usage(strcmp(argv[i], "--help") ? stderr : stdout);
            return strcmp(argv[i], "--help") ? 2 : 0;
        }
    }
    if (mb <= 0 || mb > 4096 || runs < 1) {
        fprintf(stderr, "tokenizer_bench: --mb must be in (0, 4096] and --runs >= 1\n");
        return 2;
    }
    size_t len = 0;
    char *text = NULL;
    if (text_path) {
        FILE *f = fopen(text_path, "rb");
        if (!f) {
            perror(text_path);
            return 1;
        }
        fseek(f, 0, SEEK_END);
        long sz = ftell(f);
        fseek(f, 0, SEEK_SET);
        text = malloc((size_t)sz + 1);
        len = text ? fread(text, 1, (size_t)sz, f) : 0;
        fclose(f);
    } else {
        text = s_make_text((size_t)(mb * 1e6), &len);
    }
    if (!text) {
        fprintf(stderr, "tokenizer_bench: out of memory\n");
        return 1;
    }
    if (write_path) {
        FILE *f = fopen(write_path, "wb");
        if (!f || fwrite(text, 1, len, f) != len || fclose(f)) {
            perror(write_path);
            return 1;
        }
        printf("wrote %zu bytes to %s\n", len, write_path);
        free(text);
        return 0;
    }
    stp_err err = {0};
    gguf_file *g = NULL;
    tokenizer *t = NULL;
    double t0 = s_now();
    if (gguf_open(&g, model, &err) || tokenizer_new(&t, g, &err)) {
        fprintf(stderr, "tokenizer_bench: %s\n", err.msg);
        gguf_close(&g);
        free(text);
        return 1;
    }
    double t_load = s_now() - t0;
    char cpu[256];
    sysinfo_cpu_model(cpu, sizeof cpu);
    double best = 1e30;
    size_t n_ids = 0;
    for (int r = 0; r < runs; r++) {
        int32_t *ids = NULL;
        t0 = s_now();
        if (tokenizer_encode(t, text, len, 0, &ids, &n_ids, &err)) {
            fprintf(stderr, "tokenizer_bench: %s\n", err.msg);
            return 1;
        }
        double dt = s_now() - t0;
        if (dt < best) best = dt;
        free(ids);
    }
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    double mbps = (double)len / 1e6 / best;
    printf("machine     %s (1 thread)\n", cpu);
    printf("model       %s (load %.2f s)\n", model, t_load);
    printf("text        %.2f MB (%s), %zu ids, %.2f bytes/id\n", (double)len / 1e6,
           text_path ? text_path : "generated English+CJK", n_ids, (double)len / (double)n_ids);
    printf("encode      best of %d: %.3f s = %.2f MB/s, %.2f M ids/s\n", runs, best, mbps,
           (double)n_ids / 1e6 / best);
    printf("peak RSS    %.1f MB\n", (double)ru.ru_maxrss / 1024.0);
    if (peer > 0) printf("peer        %s %.2f MB/s (ratio %.2fx)\n", peer_name, peer, mbps / peer);
    tokenizer_destroy(&t);
    gguf_close(&g);
    free(text);
    return 0;
}
