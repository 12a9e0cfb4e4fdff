/* test_gguf_fuzz: random corruption of real GGUF files must never crash the reader.
 *
 * A golden file is loaded into an exact-size heap buffer (so ASan catches any over-read), then
 * bytes at random offsets (fixed seed, reproducible) are flipped or overwritten with hostile
 * 64-bit values, the image is opened with gguf_open_memory, and the bytes are restored.
 * Each corrupted image must either be refused with STP_EFORMAT and a message naming the file
 * and an offset, or load and then satisfy every guarantee of common/gguf/README.md. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gguf/gguf.h"
#include "th_gguf.h"
#include "th_proc.h"

typedef struct fuzz_stats {
    int loaded;
    int refused;
} fuzz_stats;

static uint64_t rng_next(uint64_t *s) { /* xorshift64* */
    *s ^= *s >> 12;
    *s ^= *s << 25;
    *s ^= *s >> 27;
    return *s * 2685821657736338717ull;
}

static uint8_t *read_data(const char *rel, size_t *size) {
    char path[4096];
    uint8_t *p = (uint8_t *)th_slurp(th_data_path(path, sizeof path, rel), size);
    assert_non_null(p);
    return p;
}

/* Everything the reader promises after a successful open; touches every byte handed out. */
static void check_loaded(const gguf_file *f, const uint8_t *img, size_t size) {
    const uint8_t *end = img + size;
    unsigned sum = 0;
    assert_ptr_equal(gguf_base(f), img);
    assert_true(gguf_version(f) == 2 || gguf_version(f) == 3);
    uint64_t al = gguf_alignment(f);
    assert_true(al && !(al & (al - 1)));
    assert_int_equal(gguf_data_offset(f) % al, 0);
    for (size_t i = 0; i < gguf_kv_count(f); i++) {
        const gguf_kv *kv = gguf_kv_at(f, i);
        assert_true(kv->key.len > 0);
        assert_true((const uint8_t *)kv->key.ptr >= img &&
                    kv->key.len <= (uint64_t)(end - (const uint8_t *)kv->key.ptr));
        for (uint64_t j = 0; j < kv->key.len; j++)
            sum += (uint8_t)kv->key.ptr[j];
        assert_true(kv->type < GGUF_VT_COUNT);
        if (kv->type == GGUF_VT_STRING) {
            assert_true((const uint8_t *)kv->v.str.ptr >= img &&
                        kv->v.str.len <= (uint64_t)(end - (const uint8_t *)kv->v.str.ptr));
            if (kv->v.str.len) sum += (uint8_t)kv->v.str.ptr[kv->v.str.len - 1];
        } else if (kv->type == GGUF_VT_ARRAY) {
            assert_true(kv->v.arr.type < GGUF_VT_COUNT && kv->v.arr.type != GGUF_VT_ARRAY);
            const uint8_t *d = kv->v.arr.data;
            assert_true(d >= img && d <= end);
            if (kv->v.arr.type == GGUF_VT_STRING) {
                for (uint64_t j = 0; j < kv->v.arr.n; j++) {
                    gguf_str s = kv->v.arr.strs[j];
                    assert_true((const uint8_t *)s.ptr >= img &&
                                s.len <= (uint64_t)(end - (const uint8_t *)s.ptr));
                    if (s.len) sum += (uint8_t)s.ptr[0] + (uint8_t)s.ptr[s.len - 1];
                }
            } else if (kv->v.arr.n) {
                assert_true(kv->v.arr.n <= (uint64_t)(end - d));
                sum += d[kv->v.arr.n - 1];
            }
        }
    }
    for (size_t i = 0; i < gguf_tensor_count(f); i++) {
        const gguf_tensor *t = gguf_tensor_at(f, i);
        assert_true(t->n_dims >= 1 && t->n_dims <= GGUF_MAX_DIMS);
        assert_non_null(tensor_type_info(t->type));
        assert_true(t->offset >= gguf_data_offset(f) && t->offset % al == 0);
        assert_true(t->offset <= size && t->nbytes <= size - t->offset);
        assert_ptr_equal(t->data, img + t->offset);
        if (t->nbytes)
            sum += ((const uint8_t *)t->data)[0] + ((const uint8_t *)t->data)[t->nbytes - 1];
        char name[512];
        if (t->name.len < sizeof name && !memchr(t->name.ptr, 0, (size_t)t->name.len)) {
            memcpy(name, t->name.ptr, (size_t)t->name.len);
            name[t->name.len] = 0;
            assert_ptr_equal(gguf_tensor_find(f, name), t);
        }
    }
    (void)sum;
}

static void try_image(const uint8_t *img, size_t size, fuzz_stats *st) {
    gguf_file *f = (gguf_file *)0x1;
    stp_err err = {0};
    int rc = gguf_open_memory(&f, img, size, "fuzz.gguf", &err);
    if (rc == 0) {
        check_loaded(f, img, size);
        gguf_close(&f);
        st->loaded++;
        return;
    }
    if (rc != STP_EFORMAT || !strstr(err.msg, "fuzz.gguf: ") || !strstr(err.msg, "offset 0x"))
        fprintf(stderr, "rc %d message '%s'\n", rc, err.msg);
    assert_int_equal(rc, STP_EFORMAT);
    assert_null(f);
    assert_non_null(strstr(err.msg, "fuzz.gguf: "));
    assert_non_null(strstr(err.msg, "offset 0x"));
    st->refused++;
}

/* Header-biased offset: 3 in 4 land before the data section, where the structure is. */
static size_t pick_offset(uint64_t *rng, size_t header, size_t size) {
    uint64_t r = rng_next(rng);
    return (r & 3) ? (size_t)((r >> 2) % header) : (size_t)((r >> 2) % size);
}

static void fuzz_file(const char *rel, uint64_t seed, int n_flip, int n_multi, int n_word,
                      fuzz_stats *st) {
    size_t size;
    uint8_t *img = read_data(rel, &size);
    gguf_file *f = NULL;
    stp_err err = {0};
    assert_int_equal(gguf_open_memory(&f, img, size, rel, &err), 0);
    size_t header = (size_t)gguf_data_offset(f);
    if (header > size) header = size;
    gguf_close(&f);
    uint64_t rng = seed;

    /* 1. one byte XORed with a random nonzero value */
    for (int i = 0; i < n_flip; i++) {
        size_t at = pick_offset(&rng, header, size);
        uint8_t old = img[at];
        img[at] ^= (uint8_t)(1 + rng_next(&rng) % 255);
        try_image(img, size, st);
        img[at] = old;
    }
    /* 2. two to eight bytes at once */
    for (int i = 0; i < n_multi; i++) {
        size_t at[8];
        uint8_t old[8];
        int k = 2 + (int)(rng_next(&rng) % 7);
        for (int j = 0; j < k; j++) {
            at[j] = pick_offset(&rng, header, size);
            old[j] = img[at[j]];
            img[at[j]] ^= (uint8_t)(1 + rng_next(&rng) % 255);
        }
        try_image(img, size, st);
        for (int j = k - 1; j >= 0; j--)
            img[at[j]] = old[j];
    }
    /* 3. a hostile 64-bit value at an arbitrary (unaligned) header offset: hits counts,
     * lengths, dims and offsets much more often than single flips do */
    static const uint64_t words[] = {0,          UINT64_MAX,
                                     1ull << 63, (1ull << 63) - 1,
                                     1ull << 32, 0xffffffffull,
                                     1ull << 20, (1ull << 26) + 1,
                                     7,          9};
    for (int i = 0; i < n_word; i++) {
        size_t at = (size_t)(rng_next(&rng) % (header >= 8 ? header - 7 : 1));
        uint8_t old[8];
        uint64_t w = words[rng_next(&rng) % (sizeof words / sizeof words[0])];
        size_t n = size - at < 8 ? size - at : 8;
        memcpy(old, img + at, n);
        for (size_t j = 0; j < n; j++)
            img[at + j] = (uint8_t)(w >> (8 * j));
        try_image(img, size, st);
        memcpy(img + at, old, n);
    }
    /* the restored image still loads */
    assert_int_equal(gguf_open_memory(&f, img, size, rel, &err), 0);
    gguf_close(&f);
    free(img);
}

static void test_gguf_fuzz_random_byte_flips(void **state) {
    (void)state;
    fuzz_stats st = {0};
    fuzz_file("tiny-dense-attn-q4_0.gguf", 0x5eed2025ull, 1000, 0, 0, &st);
    fprintf(stderr, "  1000 single-byte flips: %d refused, %d loaded\n", st.refused, st.loaded);
    assert_int_equal(st.loaded + st.refused, 1000);
    assert_true(st.refused > 100); /* most header flips are caught */
    assert_true(st.loaded > 100);  /* flips in tensor data and in values are harmless */
}

static void test_gguf_fuzz_multi_byte_and_words(void **state) {
    (void)state;
    fuzz_stats st = {0};
    fuzz_file("tiny-dense-attn-q4_0.gguf", 0xabcdefull, 0, 500, 500, &st);
    fprintf(stderr, "  500 multi-byte + 500 word overwrites: %d refused, %d loaded\n", st.refused,
            st.loaded);
    assert_int_equal(st.loaded + st.refused, 1000);
    assert_true(st.refused > 300);
}

static void test_gguf_fuzz_kquant_and_vocab(void **state) {
    (void)state;
    fuzz_stats st = {0};
    fuzz_file("tiny-kquant-q4_k_s.gguf", 7, 300, 100, 200, &st);
    /* the vocab-only file: 300k strings, so fewer rounds; all corruption lands in metadata */
    fuzz_file("tokenizer/qwen2-vocab.gguf", 11, 60, 20, 60, &st);
    fprintf(stderr, "  kquant + vocab: %d refused, %d loaded\n", st.refused, st.loaded);
    assert_int_equal(st.loaded + st.refused, 740);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_gguf_fuzz_random_byte_flips),
        cmocka_unit_test(test_gguf_fuzz_multi_byte_and_words),
        cmocka_unit_test(test_gguf_fuzz_kquant_and_vocab),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
