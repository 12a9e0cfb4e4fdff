/* test_gguf: the GGUF reader against the golden files and against hand-built corrupt images.
 *
 * Real files: every .gguf in tests/data and the vocab-only qwen2-vocab.gguf open, with known facts
 * checked (counts, keys, shapes, type mixes, vocabulary strings cross-checked with tokenizer.json).
 * Corrupt images are written byte by byte by a test-local builder (no dependency on the writer);
 * each must be refused with STP_EFORMAT and a message naming the file and the exact offset.
 * Truncating a real file at every header byte and many data offsets must be refused cleanly. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <dirent.h>
#include <errno.h>
#include <inttypes.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "gguf/gguf.h"
#include "th_gguf.h"
#include "th_proc.h"

// ------------------------------------------------------------------------------------------------
// Helpers

static const char *data_dir(void) {
    const char *d = getenv("STP_TEST_DATA");
    return d ? d : "tests/data";
}

static void data_path(char *buf, size_t cap, const char *rel) {
    snprintf(buf, cap, "%s/%s", data_dir(), rel);
}

static uint8_t *read_whole(const char *path, size_t *size) {
    uint8_t *p = (uint8_t *)th_slurp(path, size);
    assert_non_null(p);
    return p;
}

static gguf_file *open_data(const char *rel) {
    char path[4096];
    data_path(path, sizeof path, rel);
    gguf_file *f = NULL;
    stp_err err = {0};
    int rc = gguf_open(&f, path, &err);
    if (rc) fprintf(stderr, "open %s: %s\n", path, err.msg);
    assert_int_equal(rc, 0);
    assert_non_null(f);
    return f;
}

/* ---- tiny GGUF image builder (bytes written by hand, little-endian) ---- */

typedef struct tb {
    uint8_t *p;
    size_t n, cap;
} tb;

static void tb_raw(tb *b, const void *d, size_t n) {
    if (n == 0) return;
    if (b->n + n > b->cap) {
        b->cap = (b->n + n) * 2 + 64;
        b->p = realloc(b->p, b->cap);
        assert_non_null(b->p);
    }
    memcpy(b->p + b->n, d, n);
    b->n += n;
}
static void tb_le(tb *b, uint64_t v, size_t n) {
    uint8_t x[8];
    for (size_t i = 0; i < n; i++)
        x[i] = (uint8_t)(v >> (8 * i));
    tb_raw(b, x, n);
}
static void tb_u32(tb *b, uint32_t v) {
    tb_le(b, v, 4);
}
static void tb_u64(tb *b, uint64_t v) {
    tb_le(b, v, 8);
}
static void tb_str(tb *b, const char *s) {
    tb_u64(b, strlen(s));
    tb_raw(b, s, strlen(s));
}
static void tb_header(tb *b, uint32_t version, uint64_t n_tensors, uint64_t n_kv) {
    tb_u32(b, GGUF_MAGIC);
    tb_u32(b, version);
    tb_u64(b, n_tensors);
    tb_u64(b, n_kv);
}
static void tb_kv_u32(tb *b, const char *k, uint32_t v) {
    tb_str(b, k);
    tb_u32(b, GGUF_VT_UINT32);
    tb_u32(b, v);
}
static void tb_kv_str(tb *b, const char *k, const char *v) {
    tb_str(b, k);
    tb_u32(b, GGUF_VT_STRING);
    tb_str(b, v);
}
static void tb_tensor(tb *b, const char *name, uint32_t n_dims, const int64_t *ne, uint32_t type,
                      uint64_t off) {
    tb_str(b, name);
    tb_u32(b, n_dims);
    for (uint32_t i = 0; i < n_dims; i++)
        tb_u64(b, (uint64_t)ne[i]);
    tb_u32(b, type);
    tb_u64(b, off);
}
static void tb_pad(tb *b, size_t align) {
    while (b->n % align)
        tb_le(b, 0, 1);
}
static void tb_zeros(tb *b, size_t n) {
    for (size_t i = 0; i < n; i++)
        tb_le(b, 0, 1);
}

/* Opens the image from an exact-size heap copy (so ASan sees any over-read). */
static int open_image(const tb *b, gguf_file **f, stp_err *err) {
    uint8_t *copy = malloc(b->n ? b->n : 1);
    assert_non_null(copy);
    if (b->n) memcpy(copy, b->p, b->n);
    int rc = gguf_open_memory(f, copy, b->n, "test.gguf", err);
    if (rc) {
        assert_null(*f);
        free(copy);
    }
    return rc; /* on success the caller frees gguf_base() after gguf_close */
}

static void close_image(gguf_file **f) {
    void *base = (void *)gguf_base(*f);
    gguf_close(f);
    assert_null(*f);
    free(base);
}

/* Asserts b is refused with STP_EFORMAT and a message naming the file, offset and needle. */
static void expect_refused(tb *b, size_t offset, const char *needle) {
    gguf_file *f = NULL;
    stp_err err = {0};
    int rc = open_image(b, &f, &err);
    char off[32];
    snprintf(off, sizeof off, "offset 0x%zx", offset);
    if (getenv("STP_TEST_VERBOSE")) fprintf(stderr, "  refused: %s\n", err.msg);
    if (rc != STP_EFORMAT || !strstr(err.msg, "test.gguf: ") || !strstr(err.msg, off) ||
        !strstr(err.msg, needle))
        fprintf(stderr, "rc %d, message '%s'; wanted '%s' and '%s'\n", rc, err.msg, off, needle);
    assert_int_equal(rc, STP_EFORMAT);
    assert_int_equal(err.code, STP_EFORMAT);
    assert_non_null(strstr(err.msg, "test.gguf: "));
    assert_non_null(strstr(err.msg, off));
    assert_non_null(strstr(err.msg, needle));
    free(b->p);
    memset(b, 0, sizeof *b);
}

static const int64_t NE_A[1] = {8};     /* F32: 32 bytes */
static const int64_t NE_B[2] = {32, 2}; /* Q4_0: 2 blocks of 18 = 36 bytes */

/* A valid image: 2 keys, tensors a (F32 [8] @0) and b (Q4_0 [32,2] @32), 96 data bytes. */
static void build_valid(tb *b) {
    tb_header(b, 3, 2, 2);
    tb_kv_str(b, "general.architecture", "smallthinker");
    tb_kv_u32(b, "general.alignment", 32);
    tb_tensor(b, "a", 1, NE_A, STP_TYPE_F32, 0);
    tb_tensor(b, "b", 2, NE_B, STP_TYPE_Q4_0, 32);
    tb_pad(b, 32);
    tb_zeros(b, 96);
}

// ------------------------------------------------------------------------------------------------
// Real files

typedef struct file_fact {
    const char *name;
    size_t size;
    size_t n_tensors;
    int counts[STP_TYPE_COUNT]; /* tensors per type id (from golden/README.md) */
} file_fact;

static const file_fact FACTS[] = {
    {"tiny-dense-attn-f32.gguf", 1084640, 42, {[STP_TYPE_F32] = 42}},
    {"tiny-dense-attn-f16.gguf", 552160, 42, {[STP_TYPE_F16] = 29, [STP_TYPE_F32] = 13}},
    {"tiny-dense-attn-bf16.gguf", 552192, 42, {[STP_TYPE_BF16] = 29, [STP_TYPE_F32] = 13}},
    {"tiny-dense-attn-q8_0.gguf", 302592, 42, {[STP_TYPE_Q8_0] = 29, [STP_TYPE_F32] = 13}},
    {"tiny-dense-attn-q4_0-pure.gguf", 169472, 42, {[STP_TYPE_Q4_0] = 29, [STP_TYPE_F32] = 13}},
    {"tiny-dense-attn-q4_0.gguf",
     187904,
     42,
     {[STP_TYPE_Q4_0] = 20, [STP_TYPE_Q8_0] = 9, [STP_TYPE_F32] = 13}},
    {"tiny-hybrid-attn-f32.gguf", 1664576, 63, {[STP_TYPE_F32] = 63}},
    {"tiny-hybrid-attn-q4_0-pure.gguf", 256608, 63, {[STP_TYPE_Q4_0] = 44, [STP_TYPE_F32] = 19}},
    {"tiny-qwen-vocab-q4_0-pure.gguf", 11549952, 42, {[STP_TYPE_Q4_0] = 29, [STP_TYPE_F32] = 13}},
    {"tiny-kquant-q4_k_s.gguf",
     2169216,
     22,
     {[STP_TYPE_Q4_K] = 8,
      [STP_TYPE_Q5_K] = 2,
      [STP_TYPE_Q6_K] = 1,
      [STP_TYPE_Q8_0] = 4,
      [STP_TYPE_F32] = 7}},
    {"tiny-kquant-q3_k_m.gguf",
     1873280,
     22,
     {[STP_TYPE_Q3_K] = 6,
      [STP_TYPE_Q4_K] = 2,
      [STP_TYPE_Q5_K] = 2,
      [STP_TYPE_Q6_K] = 1,
      [STP_TYPE_Q8_0] = 4,
      [STP_TYPE_F32] = 7}},
    {"tiny-kquant-q4_1.gguf",
     2365824,
     22,
     {[STP_TYPE_Q4_1] = 10, [STP_TYPE_Q6_K] = 1, [STP_TYPE_Q8_0] = 4, [STP_TYPE_F32] = 7}},
    {"tiny-kquant-q4_0.gguf",
     2152832,
     22,
     {[STP_TYPE_Q4_0] = 10, [STP_TYPE_Q6_K] = 1, [STP_TYPE_Q8_0] = 4, [STP_TYPE_F32] = 7}},
    {"tokenizer/qwen2-vocab.gguf", 5928800, 0, {0}},
};
#define N_FACTS (sizeof FACTS / sizeof FACTS[0])

/* Checks what the reader guarantees after open: pointers inside, ranges disjoint, finds work. */
static void check_invariants(const gguf_file *f) {
    const uint8_t *base = gguf_base(f), *end = base + gguf_file_size(f);
    assert_int_equal(gguf_data_offset(f) % gguf_alignment(f), 0);
    for (size_t i = 0; i < gguf_kv_count(f); i++) {
        const gguf_kv *kv = gguf_kv_at(f, i);
        assert_true((const uint8_t *)kv->key.ptr >= base &&
                    (const uint8_t *)kv->key.ptr + kv->key.len <= end);
        if (kv->type == GGUF_VT_ARRAY && kv->v.arr.type == GGUF_VT_STRING) {
            for (uint64_t j = 0; j < kv->v.arr.n; j++) {
                const gguf_str *s = &kv->v.arr.strs[j];
                assert_true((const uint8_t *)s->ptr >= base &&
                            (const uint8_t *)s->ptr + s->len <= end);
            }
        }
    }
    uint64_t prev_end = gguf_data_offset(f);
    for (size_t i = 0; i < gguf_tensor_count(f); i++) {
        const gguf_tensor *t = gguf_tensor_at(f, i);
        assert_true(t->n_dims >= 1 && t->n_dims <= GGUF_MAX_DIMS);
        assert_true(t->offset >= gguf_data_offset(f));
        assert_true(t->offset + t->nbytes <= gguf_file_size(f));
        assert_ptr_equal(t->data, base + t->offset);
        assert_int_equal(t->offset % gguf_alignment(f), 0);
        /* golden files are written in order, so ranges are increasing */
        assert_true(t->offset >= prev_end);
        prev_end = t->offset + t->nbytes;
        char name[256];
        snprintf(name, sizeof name, "%.*s", (int)t->name.len, t->name.ptr);
        assert_ptr_equal(gguf_tensor_find(f, name), t);
        assert_true(gguf_str_eq(t->name, name));
    }
    assert_null(gguf_kv_find(f, ""));
    assert_null(gguf_tensor_at(f, gguf_tensor_count(f)));
    assert_null(gguf_kv_at(f, gguf_kv_count(f)));
}

static void test_gguf_open_every_golden_file(void **state) {
    (void)state;
    for (size_t i = 0; i < N_FACTS; i++) {
        gguf_file *f = open_data(FACTS[i].name);
        assert_int_equal(gguf_version(f), 3);
        assert_int_equal(gguf_file_size(f), FACTS[i].size);
        assert_int_equal(gguf_tensor_count(f), FACTS[i].n_tensors);
        assert_int_equal(gguf_alignment(f), 32);
        int counts[STP_TYPE_COUNT] = {0};
        for (size_t j = 0; j < gguf_tensor_count(f); j++)
            counts[gguf_tensor_at(f, j)->type]++;
        assert_memory_equal(counts, FACTS[i].counts, sizeof counts);
        char arch[64];
        assert_int_equal(gguf_get_cstr(f, "general.architecture", arch, sizeof arch, NULL), 0);
        assert_string_equal(arch, "smallthinker");
        check_invariants(f);
        gguf_close(&f);
        assert_null(f);
    }
    /* and every *.gguf in the directory opens (new golden files are covered automatically) */
    DIR *d = opendir(data_dir());
    assert_non_null(d);
    int n = 0;
    for (struct dirent *e; (e = readdir(d));) {
        size_t l = strlen(e->d_name);
        if (l < 5 || strcmp(e->d_name + l - 5, ".gguf")) continue;
        gguf_file *f = open_data(e->d_name);
        check_invariants(f);
        gguf_close(&f);
        n++;
    }
    closedir(d);
    assert_true(n >= 13);
}

static void test_gguf_dense_f32_facts(void **state) {
    (void)state;
    gguf_file *f = open_data("tiny-dense-attn-f32.gguf");
    stp_err err = {0};
    assert_int_equal(gguf_tensor_count(f), 42);
    gguf_str s;
    assert_int_equal(gguf_get_str(f, "general.architecture", &s, &err), 0);
    assert_true(gguf_str_eq(s, "smallthinker"));
    assert_false(gguf_str_eq(s, "smallthinke"));
    assert_false(gguf_str_eq(s, "smallthinkerX"));
    uint32_t u32;
    assert_int_equal(gguf_get_u32(f, "smallthinker.block_count", &u32, &err), 0);
    assert_int_equal(u32, 4);
    assert_int_equal(gguf_get_u32(f, "smallthinker.expert_gating_func", &u32, &err), 0);
    assert_int_equal(u32, 2);
    uint64_t u64;
    assert_int_equal(gguf_get_u64(f, "smallthinker.context_length", &u64, &err), 0);
    assert_int_equal(u64, 4096);
    int64_t i64;
    assert_int_equal(gguf_get_i64(f, "smallthinker.embedding_length", &i64, &err), 0);
    assert_int_equal(i64, 64);
    float x;
    assert_int_equal(gguf_get_f32(f, "smallthinker.rope.freq_base", &x, &err), 0);
    assert_float_equal(x, 1.5e6f, 0);
    assert_int_equal(gguf_get_f32(f, "smallthinker.attention.layer_norm_rms_epsilon", &x, &err), 0);
    assert_float_equal(x, 1e-6f, 0);
    bool bv = true;
    assert_int_equal(gguf_get_bool(f, "tokenizer.ggml.add_bos_token", &bv, &err), 0);
    assert_false(bv);
    const gguf_tensor *t = gguf_tensor_find(f, "token_embd.weight");
    assert_non_null(t);
    assert_int_equal(t->n_dims, 2);
    assert_int_equal(t->ne[0], 64);
    assert_int_equal(t->ne[1], 320);
    assert_int_equal(t->ne[2], 1);
    assert_int_equal(t->ne[3], 1);
    assert_int_equal(t->type, STP_TYPE_F32);
    assert_int_equal(t->nbytes, 64 * 320 * 4);
    assert_int_equal(t->offset, gguf_data_offset(f));
    t = gguf_tensor_find(f, "blk.2.ffn_down_exps.weight");
    assert_non_null(t);
    assert_int_equal(t->n_dims, 3);
    assert_int_equal(t->ne[0], 32);
    assert_int_equal(t->ne[1], 64);
    assert_int_equal(t->ne[2], 8);
    assert_null(gguf_tensor_find(f, "output.weight")); /* tied embeddings */
    assert_null(gguf_tensor_find(f, "token_embd.weigh"));
    const gguf_kv *kv;
    assert_int_equal(gguf_get_arr(f, "tokenizer.ggml.tokens", GGUF_VT_STRING, &kv, &err), 0);
    assert_int_equal(kv->v.arr.n, 320);
    assert_true(gguf_str_eq(kv->v.arr.strs[318], "<|im_start|>"));
    assert_true(gguf_str_eq(kv->v.arr.strs[65], "A"));
    assert_int_equal(gguf_get_arr(f, "tokenizer.ggml.token_type", GGUF_VT_INT32, &kv, &err), 0);
    assert_int_equal(kv->v.arr.n, 320);
    int32_t tt;
    memcpy(&tt, (const char *)kv->v.arr.data + 317 * 4, 4);
    assert_int_equal(tt, 3); /* CONTROL */
    assert_int_equal(gguf_get_arr(f, "tokenizer.ggml.merges", GGUF_VT_STRING, &kv, &err), 0);
    assert_int_equal(kv->v.arr.n, 61);
    gguf_close(&f);
}

static void test_gguf_kquant_types(void **state) {
    (void)state;
    gguf_file *f = open_data("tiny-kquant-q4_k_s.gguf");
    static const struct {
        const char *name;
        stp_type type;
    } want[] = {
        {"token_embd.weight", STP_TYPE_Q6_K},        {"blk.0.attn_q.weight", STP_TYPE_Q4_K},
        {"blk.1.attn_k.weight", STP_TYPE_Q8_0},      {"blk.0.attn_v.weight", STP_TYPE_Q8_0},
        {"blk.1.attn_output.weight", STP_TYPE_Q5_K}, {"blk.0.ffn_gate_exps.weight", STP_TYPE_Q4_K},
        {"blk.1.ffn_up_exps.weight", STP_TYPE_Q4_K}, {"blk.0.ffn_down_exps.weight", STP_TYPE_Q4_K},
        {"blk.0.ffn_gate_inp.weight", STP_TYPE_F32}, {"output_norm.weight", STP_TYPE_F32},
    };
    for (size_t i = 0; i < sizeof want / sizeof want[0]; i++) {
        const gguf_tensor *t = gguf_tensor_find(f, want[i].name);
        assert_non_null(t);
        assert_int_equal(t->type, want[i].type);
        assert_int_equal(t->ne[0], 256);
        assert_int_equal(t->nbytes, tensor_type_row_size(t->type, t->ne[0]) *
                                        (uint64_t)(t->ne[1] * t->ne[2] * t->ne[3]));
    }
    const gguf_tensor *t = gguf_tensor_find(f, "blk.0.ffn_up_exps.weight");
    assert_int_equal(t->ne[1], 256);
    assert_int_equal(t->ne[2], 8);
    assert_int_equal(t->nbytes, 256 / 256 * 144 * 256 * 8);
    gguf_close(&f);
}

static void test_gguf_vocab_only_file(void **state) {
    (void)state;
    gguf_file *f = open_data("tokenizer/qwen2-vocab.gguf");
    stp_err err = {0};
    assert_int_equal(gguf_tensor_count(f), 0);
    const gguf_kv *tok, *mer, *typ;
    assert_int_equal(gguf_get_arr(f, "tokenizer.ggml.tokens", GGUF_VT_STRING, &tok, &err), 0);
    assert_int_equal(gguf_get_arr(f, "tokenizer.ggml.merges", GGUF_VT_STRING, &mer, &err), 0);
    assert_int_equal(gguf_get_arr(f, "tokenizer.ggml.token_type", GGUF_VT_INT32, &typ, &err), 0);
    assert_int_equal(tok->v.arr.n, 151936);
    assert_int_equal(mer->v.arr.n, 151387);
    assert_int_equal(typ->v.arr.n, 151936);
    assert_true(gguf_str_eq(tok->v.arr.strs[151644], "<|im_start|>"));
    assert_true(gguf_str_eq(tok->v.arr.strs[151643], "<|endoftext|>"));
    assert_true(gguf_str_eq(tok->v.arr.strs[151645], "<|im_end|>"));
    assert_true(gguf_str_eq(mer->v.arr.strs[0], "\xc4\xa0 \xc4\xa0")); /* "Ġ Ġ" */
    uint32_t eos;
    assert_int_equal(gguf_get_u32(f, "tokenizer.ggml.eos_token_id", &eos, &err), 0);
    assert_int_equal(eos, 151645);

    /* cross-check every vocab string and merge with tokenizer.json */
    char path[4096];
    data_path(path, sizeof path, "tokenizer/tokenizer.json");
    json_error_t jerr;
    json_t *root = json_load_file(path, 0, &jerr);
    assert_non_null(root);
    json_t *model = json_object_get(root, "model");
    json_t *vocab = json_object_get(model, "vocab");
    const char *k;
    json_t *v;
    size_t n_checked = 0;
    json_object_foreach(vocab, k, v) {
        json_int_t id = json_integer_value(v);
        assert_true(id >= 0 && (uint64_t)id < tok->v.arr.n);
        assert_true(gguf_str_eq(tok->v.arr.strs[id], k));
        n_checked++;
    }
    assert_int_equal(n_checked, 151643);
    json_t *added = json_object_get(root, "added_tokens");
    size_t i;
    json_array_foreach(added, i, v) {
        json_int_t id = json_integer_value(json_object_get(v, "id"));
        assert_true(
            gguf_str_eq(tok->v.arr.strs[id], json_string_value(json_object_get(v, "content"))));
    }
    json_t *merges = json_object_get(model, "merges");
    assert_int_equal(json_array_size(merges), mer->v.arr.n);
    json_array_foreach(merges, i, v) {
        char buf[1024];
        if (json_is_array(v))
            snprintf(buf, sizeof buf, "%s %s", json_string_value(json_array_get(v, 0)),
                     json_string_value(json_array_get(v, 1)));
        else
            snprintf(buf, sizeof buf, "%s", json_string_value(v));
        assert_true(gguf_str_eq(mer->v.arr.strs[i], buf));
    }
    json_decref(root);
    check_invariants(f);
    gguf_close(&f);
}

static void test_gguf_open_missing_file(void **state) {
    (void)state;
    gguf_file *f = (gguf_file *)0x1;
    stp_err err = {0};
    int rc = gguf_open(&f, "/nonexistent/dir/model.gguf", &err);
    assert_int_equal(rc, -ENOENT);
    assert_null(f);
    assert_non_null(strstr(err.msg, "/nonexistent/dir/model.gguf"));
}

static void test_gguf_open_truncated_file_on_disk(void **state) {
    (void)state;
    char src[4096], dst[4096];
    data_path(src, sizeof src, "tiny-dense-attn-q4_0.gguf");
    const char *tmp = getenv("STP_TMP");
    if (!tmp) tmp = "/tmp";
    mkdir(tmp, 0777);
    snprintf(dst, sizeof dst, "%s/test_gguf_truncated.%d.gguf", tmp, (int)getpid());
    size_t n;
    uint8_t *p = read_whole(src, &n);
    const size_t cut[] = {0, 10, 24, 100, n - 1};
    for (size_t i = 0; i < sizeof cut / sizeof cut[0]; i++) {
        FILE *fp = fopen(dst, "wb");
        assert_non_null(fp);
        assert_int_equal(fwrite(p, 1, cut[i], fp), cut[i]);
        fclose(fp);
        gguf_file *f = NULL;
        stp_err err = {0};
        assert_int_equal(gguf_open(&f, dst, &err), STP_EFORMAT);
        assert_null(f);
        assert_non_null(strstr(err.msg, dst));
        assert_non_null(strstr(err.msg, "offset 0x"));
    }
    unlink(dst);
    free(p);
}

/* Every prefix covering the header (each byte) and a few hundred after it must be refused. */
static void truncate_file(const char *rel, size_t dense, size_t n_sparse) {
    char path[4096];
    data_path(path, sizeof path, rel);
    size_t n;
    uint8_t *whole = read_whole(path, &n);
    size_t tried = 0;
    for (size_t cut = 0; cut < n; cut = cut < dense ? cut + 1 : cut + (n - dense) / n_sparse + 1) {
        uint8_t *copy = malloc(cut ? cut : 1);
        assert_non_null(copy);
        memcpy(copy, whole, cut);
        gguf_file *f = NULL;
        stp_err err = {0};
        int rc = gguf_open_memory(&f, copy, cut, "cut.gguf", &err);
        if (rc != STP_EFORMAT || !strstr(err.msg, "cut.gguf: ") || !strstr(err.msg, "offset 0x"))
            fprintf(stderr, "%s cut at %zu: rc %d '%s'\n", rel, cut, rc, err.msg);
        assert_int_equal(rc, STP_EFORMAT);
        assert_null(f);
        assert_non_null(strstr(err.msg, "offset 0x"));
        free(copy);
        tried++;
    }
    assert_true(tried >= dense);
    free(whole);
}

static void test_gguf_truncated_prefixes_refused(void **state) {
    (void)state;
    gguf_file *f = open_data("tiny-dense-attn-q4_0.gguf");
    size_t header = (size_t)gguf_data_offset(f); /* 9216: every byte of the header region */
    gguf_close(&f);
    assert_true(header > 4096);
    truncate_file("tiny-dense-attn-q4_0.gguf", header, 400);
    truncate_file("tiny-kquant-q4_k_s.gguf", 4096, 300);
    /* vocab-only: no tensors, so the string tables themselves must catch every cut */
    truncate_file("tokenizer/qwen2-vocab.gguf", 2048, 150);
}

// ------------------------------------------------------------------------------------------------
// Hand-built images

static void test_gguf_builder_image_is_valid(void **state) {
    (void)state;
    tb b = {0};
    build_valid(&b);
    gguf_file *f = NULL;
    stp_err err = {0};
    int rc = open_image(&b, &f, &err);
    if (rc) fprintf(stderr, "%s\n", err.msg);
    assert_int_equal(rc, 0);
    assert_string_equal(gguf_path(f), "test.gguf");
    assert_int_equal(gguf_kv_count(f), 2);
    assert_int_equal(gguf_tensor_count(f), 2);
    const gguf_tensor *a = gguf_tensor_find(f, "a"), *bt = gguf_tensor_find(f, "b");
    assert_non_null(a);
    assert_non_null(bt);
    assert_int_equal(a->offset, gguf_data_offset(f));
    assert_int_equal(a->nbytes, 32);
    assert_int_equal(bt->offset, gguf_data_offset(f) + 32);
    assert_int_equal(bt->nbytes, 36);
    assert_int_equal(bt->ne[2], 1);
    check_invariants(f);
    close_image(&f);
    free(b.p);
}

static void test_gguf_default_alignment_and_v2(void **state) {
    (void)state;
    tb b = {0};
    tb_header(&b, 2, 1, 1);
    tb_kv_str(&b, "general.architecture", "x");
    tb_tensor(&b, "a", 1, NE_A, STP_TYPE_F32, 0);
    size_t hdr = b.n;
    tb_pad(&b, 32);
    tb_zeros(&b, 32);
    gguf_file *f = NULL;
    stp_err err = {0};
    assert_int_equal(open_image(&b, &f, &err), 0);
    assert_int_equal(gguf_version(f), 2);
    assert_int_equal(gguf_alignment(f), 32);
    assert_int_equal(gguf_data_offset(f), (hdr + 31) / 32 * 32);
    close_image(&f);
    free(b.p);

    /* alignment 64 moves the data section and requires 64-aligned offsets */
    memset(&b, 0, sizeof b);
    tb_header(&b, 3, 1, 1);
    tb_kv_u32(&b, "general.alignment", 64);
    tb_tensor(&b, "a", 1, NE_A, STP_TYPE_F32, 0);
    tb_pad(&b, 64);
    tb_zeros(&b, 64);
    assert_int_equal(open_image(&b, &f, &err), 0);
    assert_int_equal(gguf_alignment(f), 64);
    assert_int_equal(gguf_data_offset(f) % 64, 0);
    close_image(&f);
    free(b.p);
}

static void test_gguf_typed_getters(void **state) {
    (void)state;
    tb b = {0};
    tb_header(&b, 3, 0, 12);
    tb_str(&b, "u8");
    tb_u32(&b, GGUF_VT_UINT8);
    tb_le(&b, 200, 1);
    tb_str(&b, "i32neg");
    tb_u32(&b, GGUF_VT_INT32);
    tb_u32(&b, (uint32_t)-5);
    tb_str(&b, "i32pos");
    tb_u32(&b, GGUF_VT_INT32);
    tb_u32(&b, 7);
    tb_str(&b, "u64big");
    tb_u32(&b, GGUF_VT_UINT64);
    tb_u64(&b, 1ull << 40);
    tb_str(&b, "u64small");
    tb_u32(&b, GGUF_VT_UINT64);
    tb_u64(&b, 12345);
    tb_str(&b, "f32");
    tb_u32(&b, GGUF_VT_FLOAT32);
    float fv = 0.5f;
    tb_raw(&b, &fv, 4);
    tb_str(&b, "f64");
    tb_u32(&b, GGUF_VT_FLOAT64);
    double dv = -2.25;
    tb_raw(&b, &dv, 8);
    tb_str(&b, "flag");
    tb_u32(&b, GGUF_VT_BOOL);
    tb_le(&b, 1, 1);
    tb_kv_str(&b, "name", "hello world");
    tb_str(&b, "arr_i32");
    tb_u32(&b, GGUF_VT_ARRAY);
    tb_u32(&b, GGUF_VT_INT32);
    tb_u64(&b, 3);
    tb_u32(&b, 1);
    tb_u32(&b, 2);
    tb_u32(&b, 3);
    tb_str(&b, "arr_str");
    tb_u32(&b, GGUF_VT_ARRAY);
    tb_u32(&b, GGUF_VT_STRING);
    tb_u64(&b, 3);
    tb_str(&b, "x");
    tb_str(&b, "");
    tb_str(&b, "zz");
    tb_str(&b, "i64min");
    tb_u32(&b, GGUF_VT_INT64);
    tb_u64(&b, 1ull << 63);
    gguf_file *f = NULL;
    stp_err err = {0};
    int rc = open_image(&b, &f, &err);
    if (rc) fprintf(stderr, "%s\n", err.msg);
    assert_int_equal(rc, 0);
    assert_int_equal(gguf_tensor_count(f), 0);

    uint32_t u32 = 0;
    uint64_t u64 = 0;
    int64_t i64 = 0;
    float x = 0;
    bool bv = false;
    gguf_str s;
    char buf[6];
    const gguf_kv *kv;
    assert_int_equal(gguf_get_u32(f, "u8", &u32, &err), 0);
    assert_int_equal(u32, 200);
    assert_int_equal(gguf_get_u32(f, "i32pos", &u32, &err), 0);
    assert_int_equal(u32, 7);
    assert_int_equal(gguf_get_u32(f, "u64small", &u32, &err), 0);
    assert_int_equal(u32, 12345);
    assert_int_equal(gguf_get_u64(f, "u64big", &u64, &err), 0);
    assert_int_equal(u64, 1ull << 40);
    assert_int_equal(gguf_get_i64(f, "i32neg", &i64, &err), 0);
    assert_int_equal(i64, -5);
    assert_int_equal(gguf_get_i64(f, "u8", &i64, &err), 0);
    assert_int_equal(i64, 200);
    assert_int_equal(gguf_get_i64(f, "i64min", &i64, &err), 0);
    assert_true(i64 == INT64_MIN);
    assert_int_equal(gguf_get_f32(f, "f32", &x, &err), 0);
    assert_float_equal(x, 0.5f, 0);
    assert_int_equal(gguf_get_f32(f, "f64", &x, &err), 0);
    assert_float_equal(x, -2.25f, 0);
    assert_int_equal(gguf_get_bool(f, "flag", &bv, &err), 0);
    assert_true(bv);
    assert_int_equal(gguf_get_str(f, "name", &s, &err), 0);
    assert_true(gguf_str_eq(s, "hello world"));
    assert_int_equal(gguf_get_cstr(f, "name", buf, sizeof buf, &err), 0);
    assert_string_equal(buf, "hello"); /* truncated to cap-1 */
    assert_int_equal(gguf_get_arr(f, "arr_i32", GGUF_VT_INT32, &kv, &err), 0);
    assert_int_equal(kv->v.arr.n, 3);
    int32_t third;
    memcpy(&third, (const char *)kv->v.arr.data + 8, 4);
    assert_int_equal(third, 3);
    assert_int_equal(gguf_get_arr(f, "arr_str", GGUF_VT_STRING, &kv, &err), 0);
    assert_true(gguf_str_eq(kv->v.arr.strs[0], "x"));
    assert_true(gguf_str_eq(kv->v.arr.strs[1], ""));
    assert_true(gguf_str_eq(kv->v.arr.strs[2], "zz"));

    /* mismatches: STP_EFORMAT naming the key */
    static const struct {
        const char *key;
        int which; /* 0 u32, 1 u64, 2 i64, 3 f32, 4 bool, 5 str, 6 arr(STRING) */
    } bad[] = {
        {"i32neg", 0},  {"u64big", 0}, {"f32", 0},    {"name", 1},    {"i32neg", 1},
        {"f64", 2},     {"u8", 3},     {"flag", 0},   {"u8", 4},      {"f32", 5},
        {"arr_i32", 6}, {"name", 6},   {"i64min", 1}, {"arr_str", 5},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        memset(&err, 0, sizeof err);
        switch (bad[i].which) {
        case 0: rc = gguf_get_u32(f, bad[i].key, &u32, &err); break;
        case 1: rc = gguf_get_u64(f, bad[i].key, &u64, &err); break;
        case 2: rc = gguf_get_i64(f, bad[i].key, &i64, &err); break;
        case 3: rc = gguf_get_f32(f, bad[i].key, &x, &err); break;
        case 4: rc = gguf_get_bool(f, bad[i].key, &bv, &err); break;
        case 5: rc = gguf_get_str(f, bad[i].key, &s, &err); break;
        default: rc = gguf_get_arr(f, bad[i].key, GGUF_VT_STRING, &kv, &err); break;
        }
        char q[64];
        snprintf(q, sizeof q, "'%s'", bad[i].key);
        if (rc != STP_EFORMAT || !strstr(err.msg, q))
            fprintf(stderr, "%s/%d: rc %d '%s'\n", bad[i].key, bad[i].which, rc, err.msg);
        assert_int_equal(rc, STP_EFORMAT);
        assert_non_null(strstr(err.msg, q));
        assert_non_null(strstr(err.msg, "test.gguf"));
    }
    /* absent: STP_EINVAL and err untouched */
    memset(&err, 0, sizeof err);
    strcpy(err.msg, "sentinel");
    u32 = 99;
    assert_int_equal(gguf_get_u32(f, "missing", &u32, &err), STP_EINVAL);
    assert_int_equal(gguf_get_u64(f, "missing", &u64, &err), STP_EINVAL);
    assert_int_equal(gguf_get_i64(f, "missing", &i64, &err), STP_EINVAL);
    assert_int_equal(gguf_get_f32(f, "missing", &x, &err), STP_EINVAL);
    assert_int_equal(gguf_get_bool(f, "missing", &bv, &err), STP_EINVAL);
    assert_int_equal(gguf_get_str(f, "missing", &s, &err), STP_EINVAL);
    assert_int_equal(gguf_get_cstr(f, "missing", buf, sizeof buf, &err), STP_EINVAL);
    assert_int_equal(gguf_get_arr(f, "missing", GGUF_VT_INT32, &kv, &err), STP_EINVAL);
    assert_int_equal(u32, 99);
    assert_int_equal(err.code, 0);
    assert_string_equal(err.msg, "sentinel");
    assert_null(gguf_kv_find(f, "missing"));
    assert_non_null(gguf_kv_find(f, "arr_str"));
    close_image(&f);
    free(b.p);
}

/* ---- corruptions: each refused with STP_EFORMAT and the exact offset ---- */

static void test_gguf_bad_magic(void **state) {
    (void)state;
    tb b = {0};
    build_valid(&b);
    memcpy(b.p, "GGML", 4);
    expect_refused(&b, 0, "bad magic");
    build_valid(&b);
    for (int i = 0; i < 2; i++) { /* byte-swapped magic "FUGG" */
        uint8_t t = b.p[i];
        b.p[i] = b.p[3 - i];
        b.p[3 - i] = t;
    }
    expect_refused(&b, 0, "endianness");
    /* shorter than a header */
    tb_raw(&b, "GGUF", 4);
    expect_refused(&b, 0, "truncated");
    tb_raw(&b, "", 0);
    expect_refused(&b, 0, "truncated");
}

static void test_gguf_bad_version(void **state) {
    (void)state;
    tb b = {0};
    tb_header(&b, 1, 0, 0);
    expect_refused(&b, 4, "version 1");
    tb_header(&b, 0x03000000u, 0, 0); /* v3 written big-endian */
    expect_refused(&b, 4, "endianness");
    tb_header(&b, 0x02000000u, 0, 0);
    expect_refused(&b, 4, "endianness");
    tb_header(&b, 4, 0, 0);
    expect_refused(&b, 4, "expected 2 or 3");
}

static void test_gguf_huge_counts(void **state) {
    (void)state;
    tb b = {0};
    tb_header(&b, 3, 0, UINT64_MAX);
    expect_refused(&b, 0x10, "key-value count");
    tb_header(&b, 3, 1ull << 40, 0);
    expect_refused(&b, 0x8, "tensor count");
    /* within the caps, but the file is far too small for them */
    build_valid(&b);
    b.p[16] = 0x00;
    b.p[17] = 0x10; /* n_kv = 4096 */
    expect_refused(&b, 0x8, "bytes");
    build_valid(&b);
    b.p[9] = 0x20; /* n_tensors = 8194 */
    expect_refused(&b, 0x8, "bytes");
}

static void test_gguf_bad_strings(void **state) {
    (void)state;
    tb b = {0};
    /* key length past EOF */
    tb_header(&b, 3, 0, 1);
    size_t at = b.n;
    tb_u64(&b, 1000);
    tb_raw(&b, "general.x", 9);
    tb_zeros(&b, 4);
    expect_refused(&b, at, "past the end");
    /* key length over the 1 MiB cap */
    tb_header(&b, 3, 0, 1);
    at = b.n;
    tb_u64(&b, UINT64_MAX);
    tb_zeros(&b, 16);
    expect_refused(&b, at, "cap");
    /* value length past EOF */
    tb_header(&b, 3, 0, 1);
    tb_str(&b, "k");
    tb_u32(&b, GGUF_VT_STRING);
    at = b.n;
    tb_u64(&b, 5);
    tb_raw(&b, "abcd", 4);
    expect_refused(&b, at, "past the end");
    /* empty key */
    tb_header(&b, 3, 0, 1);
    at = b.n;
    tb_kv_u32(&b, "", 1);
    expect_refused(&b, at, "empty");
    /* string element past EOF inside a string array */
    tb_header(&b, 3, 0, 1);
    tb_str(&b, "tokens");
    tb_u32(&b, GGUF_VT_ARRAY);
    tb_u32(&b, GGUF_VT_STRING);
    tb_u64(&b, 2);
    tb_str(&b, "ok");
    at = b.n;
    tb_u64(&b, 1ull << 62);
    tb_raw(&b, "x", 1);
    expect_refused(&b, at, "string 1");
}

static void test_gguf_bad_arrays(void **state) {
    (void)state;
    tb b = {0};
    /* huge numeric array count */
    tb_header(&b, 3, 0, 1);
    tb_str(&b, "a");
    tb_u32(&b, GGUF_VT_ARRAY);
    size_t at = b.n;
    tb_u32(&b, GGUF_VT_UINT64);
    tb_u64(&b, 1ull << 61); /* * 8 overflows 64 bits */
    tb_zeros(&b, 64);
    expect_refused(&b, at, "runs past the end");
    /* huge string array count (would allocate 16 * n bytes) */
    tb_header(&b, 3, 0, 1);
    tb_str(&b, "a");
    tb_u32(&b, GGUF_VT_ARRAY);
    at = b.n;
    tb_u32(&b, GGUF_VT_STRING);
    tb_u64(&b, UINT64_MAX);
    tb_zeros(&b, 64);
    expect_refused(&b, at, "strings");
    /* one element too many */
    tb_header(&b, 3, 0, 1);
    tb_str(&b, "a");
    tb_u32(&b, GGUF_VT_ARRAY);
    at = b.n;
    tb_u32(&b, GGUF_VT_INT32);
    tb_u64(&b, 3);
    tb_u32(&b, 1);
    tb_u32(&b, 2);
    expect_refused(&b, at, "INT32");
    /* nested array */
    tb_header(&b, 3, 0, 1);
    tb_str(&b, "a");
    tb_u32(&b, GGUF_VT_ARRAY);
    at = b.n;
    tb_u32(&b, GGUF_VT_ARRAY);
    tb_u64(&b, 1);
    tb_u32(&b, GGUF_VT_INT32);
    tb_u64(&b, 1);
    tb_u32(&b, 1);
    expect_refused(&b, at, "nested");
    /* unknown element type */
    tb_header(&b, 3, 0, 1);
    tb_str(&b, "a");
    tb_u32(&b, GGUF_VT_ARRAY);
    at = b.n;
    tb_u32(&b, 13);
    tb_u64(&b, 0);
    expect_refused(&b, at, "unknown array element type 13");
    /* bool array element not 0/1 */
    tb_header(&b, 3, 0, 1);
    tb_str(&b, "a");
    tb_u32(&b, GGUF_VT_ARRAY);
    tb_u32(&b, GGUF_VT_BOOL);
    tb_u64(&b, 3);
    tb_le(&b, 1, 1);
    at = b.n;
    tb_le(&b, 2, 1);
    tb_le(&b, 0, 1);
    expect_refused(&b, at, "bool");
}

static void test_gguf_bad_kvs(void **state) {
    (void)state;
    tb b = {0};
    /* unknown value type */
    tb_header(&b, 3, 0, 1);
    tb_str(&b, "general.x");
    size_t at = b.n;
    tb_u32(&b, 13);
    tb_u32(&b, 0);
    expect_refused(&b, at, "unknown value type 13");
    tb_header(&b, 3, 0, 1);
    tb_str(&b, "general.x");
    at = b.n;
    tb_u32(&b, 0xffffffffu);
    tb_u32(&b, 0);
    expect_refused(&b, at, "unknown value type");
    /* duplicate key */
    tb_header(&b, 3, 0, 3);
    tb_kv_u32(&b, "a.b", 1);
    tb_kv_u32(&b, "a.c", 1);
    at = b.n;
    tb_kv_str(&b, "a.b", "again");
    expect_refused(&b, at, "duplicate key 'a.b'");
    /* scalar value cut short */
    tb_header(&b, 3, 0, 1);
    tb_str(&b, "k");
    tb_u32(&b, GGUF_VT_UINT64);
    at = b.n;
    tb_u32(&b, 0);
    expect_refused(&b, at, "truncated");
    /* bool value 2 */
    tb_header(&b, 3, 0, 1);
    tb_str(&b, "k");
    tb_u32(&b, GGUF_VT_BOOL);
    at = b.n;
    tb_le(&b, 2, 1);
    tb_zeros(&b, 16);
    expect_refused(&b, at, "bool");
}

static void test_gguf_bad_alignment(void **state) {
    (void)state;
    const uint32_t bad[] = {0, 3, 48, 0xffffffffu};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        tb b = {0};
        tb_header(&b, 3, 0, 1);
        size_t at = b.n;
        tb_kv_u32(&b, "general.alignment", bad[i]);
        expect_refused(&b, at, "power of two");
    }
    tb b = {0};
    tb_header(&b, 3, 0, 1);
    size_t at = b.n;
    tb_kv_str(&b, "general.alignment", "32");
    expect_refused(&b, at, "expected UINT32");
}

/* Builds [header, 1 key, tensors before the bad one] and returns the builder for the test to go on.
 */
static void tensor_prefix(tb *b, uint64_t n_tensors) {
    tb_header(b, 3, n_tensors, 1);
    tb_kv_str(b, "general.architecture", "smallthinker");
}

static void test_gguf_bad_tensor_infos(void **state) {
    (void)state;
    tb b = {0};
    size_t at;
    /* duplicate tensor */
    tensor_prefix(&b, 2);
    tb_tensor(&b, "blk.0.w", 1, NE_A, STP_TYPE_F32, 0);
    at = b.n;
    tb_tensor(&b, "blk.0.w", 1, NE_A, STP_TYPE_F32, 32);
    tb_pad(&b, 32);
    tb_zeros(&b, 64);
    expect_refused(&b, at, "duplicate tensor 'blk.0.w'");
    /* n_dims 0 and 5 */
    const uint32_t dims[] = {0, 5};
    for (int i = 0; i < 2; i++) {
        tensor_prefix(&b, 1);
        tb_str(&b, "w");
        at = b.n;
        tb_u32(&b, dims[i]);
        tb_zeros(&b, 64);
        expect_refused(&b, at, "n_dims");
    }
    /* negative ne */
    tensor_prefix(&b, 1);
    tb_str(&b, "w");
    tb_u32(&b, 2);
    tb_u64(&b, 32);
    at = b.n;
    tb_u64(&b, (uint64_t)-1);
    tb_u32(&b, STP_TYPE_F32);
    tb_u64(&b, 0);
    tb_zeros(&b, 64);
    expect_refused(&b, at, "negative");
    /* element count overflowing int64 */
    tensor_prefix(&b, 1);
    tb_str(&b, "w");
    tb_u32(&b, 3);
    tb_u64(&b, 1ull << 32);
    tb_u64(&b, 1ull << 30);
    at = b.n;
    tb_u64(&b, 2);
    tb_u32(&b, STP_TYPE_F32);
    tb_u64(&b, 0);
    tb_zeros(&b, 64);
    expect_refused(&b, at, "overflows");
    /* an empty tensor (ne[0] = 0) whose row count ne[1] * ne[2] overflows int64: the
     * element count is 0, but code that counts rows must not overflow (found by fuzz_gguf) */
    tensor_prefix(&b, 1);
    tb_str(&b, "w");
    tb_u32(&b, 3);
    tb_u64(&b, 0);
    tb_u64(&b, 1ull << 62);
    at = b.n;
    tb_u64(&b, 4);
    tb_u32(&b, STP_TYPE_F32);
    tb_u64(&b, 0);
    tb_zeros(&b, 64);
    expect_refused(&b, at, "overflows");
    /* byte size overflowing (elements fit int64, bytes do not) */
    tensor_prefix(&b, 1);
    tb_str(&b, "w");
    tb_u32(&b, 2);
    tb_u64(&b, 1ull << 31);
    tb_u64(&b, 1ull << 31);
    at = b.n;
    tb_u32(&b, STP_TYPE_F64);
    tb_u64(&b, 0);
    tb_zeros(&b, 64);
    expect_refused(&b, at, "overflows");
    /* a single row whose byte size overflows (2^62 F64 elements = 2^65 bytes) */
    tensor_prefix(&b, 1);
    tb_str(&b, "w");
    tb_u32(&b, 1);
    tb_u64(&b, 1ull << 62);
    at = b.n;
    tb_u32(&b, STP_TYPE_F64);
    tb_u64(&b, 0);
    tb_zeros(&b, 64);
    expect_refused(&b, at, "overflows");
    /* unknown tensor types: a hole in the id table (4) and past it */
    const uint32_t types[] = {4, 31, 40, 0xffffffffu};
    for (int i = 0; i < 4; i++) {
        tensor_prefix(&b, 1);
        tb_str(&b, "w");
        tb_u32(&b, 1);
        tb_u64(&b, 32);
        at = b.n;
        tb_u32(&b, types[i]);
        tb_u64(&b, 0);
        tb_zeros(&b, 64);
        expect_refused(&b, at, "unknown tensor type");
    }
    /* ne[0] not a multiple of the block size */
    tensor_prefix(&b, 1);
    tb_str(&b, "w");
    tb_u32(&b, 1);
    tb_u64(&b, 48);
    at = b.n;
    tb_u32(&b, STP_TYPE_Q4_K);
    tb_u64(&b, 0);
    tb_zeros(&b, 256);
    expect_refused(&b, at, "block size 256");
    /* misaligned offset */
    tensor_prefix(&b, 2);
    tb_tensor(&b, "a", 1, NE_A, STP_TYPE_F32, 0);
    tb_str(&b, "b");
    tb_u32(&b, 1);
    tb_u64(&b, 8);
    tb_u32(&b, STP_TYPE_F32);
    at = b.n;
    tb_u64(&b, 40);
    tb_pad(&b, 32);
    tb_zeros(&b, 128);
    expect_refused(&b, at, "not a multiple of the alignment 32");
    /* a tensor name with junk bytes is printed safely */
    tensor_prefix(&b, 1);
    tb_str(&b, "bad\nname\x01");
    at = b.n;
    tb_u32(&b, 9);
    tb_zeros(&b, 64);
    expect_refused(&b, at, "'bad?name?'");
}

static void test_gguf_bad_tensor_data(void **state) {
    (void)state;
    tb b = {0};
    /* offset past EOF */
    tensor_prefix(&b, 1);
    tb_tensor(&b, "w", 1, NE_A, STP_TYPE_F32, 1024);
    tb_pad(&b, 32);
    size_t data = b.n;
    tb_zeros(&b, 64);
    expect_refused(&b, data + 1024, "data needs 32 bytes, 0 left");
    /* data one block short */
    tensor_prefix(&b, 1);
    tb_tensor(&b, "w", 2, NE_B, STP_TYPE_Q4_0, 0);
    tb_pad(&b, 32);
    data = b.n;
    tb_zeros(&b, 35);
    expect_refused(&b, data, "data needs 36 bytes, 35 left");
    /* huge offset (near UINT64_MAX, aligned) */
    tensor_prefix(&b, 1);
    tb_tensor(&b, "w", 1, NE_A, STP_TYPE_F32, UINT64_MAX & ~31ull);
    tb_pad(&b, 32);
    tb_zeros(&b, 64);
    gguf_file *f = NULL;
    stp_err err = {0};
    assert_int_equal(open_image(&b, &f, &err), STP_EFORMAT);
    assert_non_null(strstr(err.msg, "data needs 32 bytes, 0 left"));
    free(b.p);
    memset(&b, 0, sizeof b);
    /* overlapping tensors (b starts inside a) */
    tensor_prefix(&b, 2);
    const int64_t ne64[1] = {64};
    tb_tensor(&b, "a", 1, ne64, STP_TYPE_F32, 0); /* 256 bytes */
    tb_tensor(&b, "b", 1, NE_A, STP_TYPE_F32, 128);
    tb_pad(&b, 32);
    data = b.n;
    tb_zeros(&b, 512);
    expect_refused(&b, data + 128, "overlaps tensor 'a'");
    /* overlap found whatever the declaration order */
    tensor_prefix(&b, 3);
    tb_tensor(&b, "c", 1, NE_A, STP_TYPE_F32, 256);
    tb_tensor(&b, "b", 1, NE_A, STP_TYPE_F32, 32);
    tb_tensor(&b, "a", 1, ne64, STP_TYPE_F32, 64); /* [64, 320) covers c */
    tb_pad(&b, 32);
    data = b.n;
    tb_zeros(&b, 512);
    expect_refused(&b, data + 256, "overlaps tensor 'a'");
    /* header ends past the file when there are tensors */
    tensor_prefix(&b, 1);
    const int64_t ne0[1] = {0};
    tb_tensor(&b, "w", 1, ne0, STP_TYPE_F32, 0);
    size_t hdr = b.n;
    assert_true(hdr % 32 != 0);
    expect_refused(&b, hdr, "data section");
}

static void test_gguf_empty_tensor_and_zero_tensor_file(void **state) {
    (void)state;
    tb b = {0};
    /* a 0-element tensor is allowed, has 0 bytes and overlaps nothing */
    tensor_prefix(&b, 2);
    const int64_t ne[2] = {32, 0};
    tb_tensor(&b, "empty", 2, ne, STP_TYPE_Q8_0, 0);
    tb_tensor(&b, "a", 1, NE_A, STP_TYPE_F32, 0);
    tb_pad(&b, 32);
    tb_zeros(&b, 32);
    gguf_file *f = NULL;
    stp_err err = {0};
    int rc = open_image(&b, &f, &err);
    if (rc) fprintf(stderr, "%s\n", err.msg);
    assert_int_equal(rc, 0);
    assert_int_equal(gguf_tensor_find(f, "empty")->nbytes, 0);
    close_image(&f);
    free(b.p);
    /* metadata only, file ends right after the header (not padded) */
    memset(&b, 0, sizeof b);
    tb_header(&b, 3, 0, 1);
    tb_kv_str(&b, "general.architecture", "smallthinker!");
    assert_true(b.n % 32 != 0);
    assert_int_equal(open_image(&b, &f, &err), 0);
    assert_int_equal(gguf_tensor_count(f), 0);
    assert_null(gguf_tensor_find(f, "a"));
    close_image(&f);
    free(b.p);
    /* a completely empty header */
    memset(&b, 0, sizeof b);
    tb_header(&b, 3, 0, 0);
    assert_int_equal(open_image(&b, &f, &err), 0);
    assert_int_equal(gguf_kv_count(f), 0);
    close_image(&f);
    free(b.p);
}

static void test_gguf_null_arguments(void **state) {
    (void)state;
    stp_err err = {0};
    gguf_file *f = NULL;
    assert_int_equal(gguf_open_memory(&f, NULL, 10, "x", &err), STP_EINVAL);
    assert_int_equal(gguf_open_memory(NULL, "x", 1, "x", &err), STP_EINVAL);
    assert_int_equal(gguf_open(&f, NULL, &err), STP_EINVAL);
    assert_int_equal(gguf_open_memory(&f, NULL, 0, NULL, &err), STP_EFORMAT);
    assert_non_null(strstr(err.msg, "<memory>"));
    gguf_close(NULL);
    gguf_close(&f);
    assert_false(gguf_str_eq((gguf_str){"a", 1}, NULL));
    assert_true(gguf_str_eq((gguf_str){"", 0}, ""));
    assert_false(gguf_str_eq((gguf_str){"a\0b", 3}, "a"));
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_gguf_open_every_golden_file),
        cmocka_unit_test(test_gguf_dense_f32_facts),
        cmocka_unit_test(test_gguf_kquant_types),
        cmocka_unit_test(test_gguf_vocab_only_file),
        cmocka_unit_test(test_gguf_open_missing_file),
        cmocka_unit_test(test_gguf_open_truncated_file_on_disk),
        cmocka_unit_test(test_gguf_truncated_prefixes_refused),
        cmocka_unit_test(test_gguf_builder_image_is_valid),
        cmocka_unit_test(test_gguf_default_alignment_and_v2),
        cmocka_unit_test(test_gguf_typed_getters),
        cmocka_unit_test(test_gguf_bad_magic),
        cmocka_unit_test(test_gguf_bad_version),
        cmocka_unit_test(test_gguf_huge_counts),
        cmocka_unit_test(test_gguf_bad_strings),
        cmocka_unit_test(test_gguf_bad_arrays),
        cmocka_unit_test(test_gguf_bad_kvs),
        cmocka_unit_test(test_gguf_bad_alignment),
        cmocka_unit_test(test_gguf_bad_tensor_infos),
        cmocka_unit_test(test_gguf_bad_tensor_data),
        cmocka_unit_test(test_gguf_empty_tensor_and_zero_tensor_file),
        cmocka_unit_test(test_gguf_null_arguments),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
