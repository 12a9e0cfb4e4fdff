/* gguf_corrupt: issue 7 item 7. Golden GGUF models truncated or altered at N random offsets
 * (default 1000 per file, a fixed seed so every run tests the same cases) go through every
 * check of fuzz_gguf (fz_gguf_check: gguf_open_memory, full walk, model_config_load,
 * model_open). Each must be refused with a clear error or load; never crash. Moreover:
 * - a truncation anywhere before the end of the last tensor's data must be refused;
 * - a change that hits only weight bytes (after the data offset) must still load.
 * Half the offsets fall in the header/metadata (where most of the parsing is), half anywhere.
 * Usage: gguf_corrupt [N [SEED]]   (files from $STP_TEST_DATA, else the compiled-in path)
 * Prints one table row per file and mutation: cases, refused by the reader, refused by the
 * model loader, loaded. Exit 1 when an expectation fails (a crash aborts). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz_gguf.h"
#include "gguf/gguf.h"

#ifndef STP_FUZZ_DATA_DIR
#define STP_FUZZ_DATA_DIR "tests/data"
#endif

static const char *const gc_files[] = {
    "tiny-dense-attn-q4_0-pure.gguf",
    "tiny-hybrid-attn-f32.gguf",
    "tiny-kquant-q4_k_s.gguf",
};

static uint64_t gc_rand(uint64_t *x) {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    return *x;
}

static uint8_t *gc_read(const char *path, size_t *size) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    uint8_t *buf = n > 0 ? malloc((size_t)n) : NULL;
    if (buf && fread(buf, 1, (size_t)n, f) != (size_t)n) {
        free(buf);
        buf = NULL;
    }
    fclose(f);
    *size = (size_t)n;
    return buf;
}

int main(int argc, char **argv) {
    int n_cases = argc > 1 ? atoi(argv[1]) : 1000;
    uint64_t seed = argc > 2 ? strtoull(argv[2], NULL, 0) : 0x5eed5eedull;
    const char *dir = getenv("STP_TEST_DATA");
    if (!dir || !*dir) dir = STP_FUZZ_DATA_DIR;
    int failures = 0;
    printf("%-32s %-9s %6s %8s %8s %7s\n", "file", "mutation", "cases", "refused", "model-rf",
           "loaded");
    for (size_t fi = 0; fi < sizeof gc_files / sizeof gc_files[0]; fi++) {
        char path[4096];
        snprintf(path, sizeof path, "%s/%s", dir, gc_files[fi]);
        size_t size;
        uint8_t *orig = gc_read(path, &size);
        if (!orig) {
            fprintf(stderr, "gguf_corrupt: cannot read %s\n", path);
            return 2;
        }
        gguf_file *g = NULL;
        stp_err err = {0};
        if (gguf_open_memory(&g, orig, size, path, &err) ||
            fz_gguf_check(orig, size) != FZ_GGUF_LOADED) {
            fprintf(stderr, "gguf_corrupt: %s does not load unchanged: %s\n", path, err.msg);
            return 2;
        }
        uint64_t data_off = gguf_data_offset(g), data_end = 0;
        for (size_t i = 0; i < gguf_tensor_count(g); i++) {
            const gguf_tensor *t = gguf_tensor_at(g, i);
            if (t->offset + t->nbytes > data_end) data_end = t->offset + t->nbytes;
        }
        gguf_close(&g);

        uint8_t *img = malloc(size);
        int count[2][3] = {{0}};
        uint64_t x = seed ^ (fi + 1) * 0x9e3779b97f4a7c15ull;
        for (int c = 0; c < n_cases; c++) {
            uint64_t r = gc_rand(&x);
            size_t off = (c & 1) ? (size_t)(r % size) : (size_t)(r % data_off);
            int mode = (c >> 1) & 1; /* 0: truncate at off, 1: alter the byte at off */
            memcpy(img, orig, size);
            size_t len = size;
            if (mode == 0) {
                len = off;
            } else {
                uint8_t v = (uint8_t)(gc_rand(&x) >> 32);
                img[off] = (c & 2) ? (uint8_t)(img[off] ^ (1u << (v & 7))) /* one bit */
                                   : (uint8_t)(v == img[off] ? v + 1 : v);
            }
            int out = fz_gguf_check(img, len);
            count[mode][out]++;
            bool bad = (mode == 0 && len < data_end && out == FZ_GGUF_LOADED) ||
                       (mode == 1 && off >= data_off && out != FZ_GGUF_LOADED);
            if (bad) {
                failures++;
                fprintf(stderr, "gguf_corrupt: %s: %s at offset %zu (data at %llu..%llu): %s\n",
                        gc_files[fi], mode ? "altered byte" : "truncation", off,
                        (unsigned long long)data_off, (unsigned long long)data_end,
                        out == FZ_GGUF_LOADED ? "loaded" : "refused");
            }
        }
        for (int m = 0; m < 2; m++)
            printf("%-32s %-9s %6d %8d %8d %7d\n", gc_files[fi], m ? "altered" : "truncated",
                   count[m][0] + count[m][1] + count[m][2], count[m][0], count[m][1], count[m][2]);
        free(img);
        free(orig);
    }
    printf("gguf_corrupt: %d unexpected outcome(s)\n", failures);
    return failures ? 1 : 0;
}
