/* test_gguf_write: the streaming GGUF writer, checked by reading its files back with gguf_open.
 *
 * Covers every metadata value type, string arrays, tensors of several types written in uneven
 * chunks, alignment padding (default 32 and general.alignment 64), and the refusals: finish()
 * with bytes missing, writing past the last tensor, duplicate keys and tensors. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "gguf/gguf.h"

static void tmp_path(char *buf, size_t cap, const char *name) {
    const char *tmp = getenv("STP_TMP");
    if (!tmp) tmp = "/tmp";
    mkdir(tmp, 0777);
    snprintf(buf, cap, "%s/test_gguf_write.%d.%s", tmp, (int)getpid(), name);
}

static bool file_exists(const char *p) {
    struct stat st;
    return stat(p, &st) == 0;
}

static void test_gguf_write_roundtrip_all_types(void **state) {
    (void)state;
    char path[4096];
    tmp_path(path, sizeof path, "all.gguf");
    stp_err err = {0};
    gguf_writer *w = NULL;
    assert_int_equal(gguf_writer_new(&w, path, &err), 0);
    assert_int_equal(gguf_writer_kv_str(w, "general.architecture", "smallthinker"), 0);
    assert_int_equal(gguf_writer_kv_u32(w, "k.u32", 4000000000u), 0);
    assert_int_equal(gguf_writer_kv_i32(w, "k.i32", -123456), 0);
    assert_int_equal(gguf_writer_kv_u64(w, "k.u64", 0x123456789abcdefull), 0);
    assert_int_equal(gguf_writer_kv_f32(w, "k.f32", 1.5e6f), 0);
    assert_int_equal(gguf_writer_kv_bool(w, "k.bool", true), 0);
    assert_int_equal(gguf_writer_kv_str(w, "k.empty", ""), 0);
    const int32_t i32s[5] = {1, -2, 3, -4, 5};
    const float f32s[3] = {0.25f, -1.0f, 3.5f};
    const uint8_t u8s[3] = {7, 8, 9};
    assert_int_equal(gguf_writer_kv_arr(w, "a.i32", GGUF_VT_INT32, i32s, 5), 0);
    assert_int_equal(gguf_writer_kv_arr(w, "a.f32", GGUF_VT_FLOAT32, f32s, 3), 0);
    assert_int_equal(gguf_writer_kv_arr(w, "a.u8", GGUF_VT_UINT8, u8s, 3), 0);
    assert_int_equal(gguf_writer_kv_arr(w, "a.empty", GGUF_VT_INT32, NULL, 0), 0);
    const char *strs[4] = {"Ġt", "h e", "", "<|im_end|>"};
    assert_int_equal(gguf_writer_kv_arr_str(w, "a.str", strs, 4), 0);

    /* F32 of 3 (12 bytes -> padded), Q8_0 2x32 (68 bytes), F16 5x3 (30 bytes), I8 7 */
    const int64_t ne_a[1] = {3}, ne_b[2] = {32, 2}, ne_c[2] = {5, 3}, ne_d[1] = {7};
    assert_int_equal(gguf_writer_add_tensor(w, "a", STP_TYPE_F32, 1, ne_a), 0);
    assert_int_equal(gguf_writer_add_tensor(w, "b", STP_TYPE_Q8_0, 2, ne_b), 0);
    assert_int_equal(gguf_writer_add_tensor(w, "c", STP_TYPE_F16, 2, ne_c), 0);
    assert_int_equal(gguf_writer_add_tensor(w, "d", STP_TYPE_I8, 1, ne_d), 0);
    assert_int_equal(gguf_writer_begin_data(w, &err), 0);
    uint8_t data[12 + 68 + 30 + 7];
    for (size_t i = 0; i < sizeof data; i++)
        data[i] = (uint8_t)(i * 7 + 1);
    /* uneven chunks crossing tensor boundaries */
    size_t chunks[] = {5, 10, 60, 1, 40, 1};
    size_t off = 0;
    for (size_t i = 0; i < sizeof chunks / sizeof chunks[0]; i++) {
        assert_int_equal(gguf_writer_write(w, data + off, chunks[i], &err), 0);
        off += chunks[i];
    }
    assert_int_equal(off, sizeof data);
    assert_int_equal(gguf_writer_finish(w, &err), 0);
    gguf_writer_destroy(&w);
    assert_null(w);
    assert_true(file_exists(path));

    gguf_file *f = NULL;
    int rc = gguf_open(&f, path, &err);
    if (rc) fprintf(stderr, "%s\n", err.msg);
    assert_int_equal(rc, 0);
    assert_int_equal(gguf_version(f), 3);
    assert_int_equal(gguf_kv_count(f), 12);
    uint32_t u32;
    uint64_t u64;
    int64_t i64;
    float f32;
    bool b;
    char s[64];
    assert_int_equal(gguf_get_u32(f, "k.u32", &u32, &err), 0);
    assert_int_equal(u32, 4000000000u);
    assert_int_equal(gguf_get_i64(f, "k.i32", &i64, &err), 0);
    assert_int_equal(i64, -123456);
    assert_int_equal(gguf_get_u64(f, "k.u64", &u64, &err), 0);
    assert_int_equal(u64, 0x123456789abcdefull);
    assert_int_equal(gguf_get_f32(f, "k.f32", &f32, &err), 0);
    assert_true(f32 == 1.5e6f);
    assert_int_equal(gguf_get_bool(f, "k.bool", &b, &err), 0);
    assert_true(b);
    assert_int_equal(gguf_get_cstr(f, "general.architecture", s, sizeof s, &err), 0);
    assert_string_equal(s, "smallthinker");
    assert_int_equal(gguf_get_cstr(f, "k.empty", s, sizeof s, &err), 0);
    assert_string_equal(s, "");
    assert_int_equal(gguf_kv_find(f, "k.u32")->type, GGUF_VT_UINT32);
    assert_int_equal(gguf_kv_find(f, "k.i32")->type, GGUF_VT_INT32);
    assert_int_equal(gguf_kv_find(f, "k.u64")->type, GGUF_VT_UINT64);
    assert_int_equal(gguf_kv_find(f, "k.bool")->type, GGUF_VT_BOOL);

    const gguf_kv *kv = NULL;
    assert_int_equal(gguf_get_arr(f, "a.i32", GGUF_VT_INT32, &kv, &err), 0);
    assert_int_equal(kv->v.arr.n, 5);
    assert_memory_equal(kv->v.arr.data, i32s, sizeof i32s);
    assert_int_equal(gguf_get_arr(f, "a.f32", GGUF_VT_FLOAT32, &kv, &err), 0);
    assert_memory_equal(kv->v.arr.data, f32s, sizeof f32s);
    assert_int_equal(gguf_get_arr(f, "a.u8", GGUF_VT_UINT8, &kv, &err), 0);
    assert_memory_equal(kv->v.arr.data, u8s, sizeof u8s);
    assert_int_equal(gguf_get_arr(f, "a.empty", GGUF_VT_INT32, &kv, &err), 0);
    assert_int_equal(kv->v.arr.n, 0);
    assert_int_equal(gguf_get_arr(f, "a.str", GGUF_VT_STRING, &kv, &err), 0);
    assert_int_equal(kv->v.arr.n, 4);
    for (int i = 0; i < 4; i++)
        assert_true(gguf_str_eq(kv->v.arr.strs[i], strs[i]));

    assert_int_equal(gguf_tensor_count(f), 4);
    assert_int_equal(gguf_alignment(f), 32);
    assert_int_equal(gguf_data_offset(f) % 32, 0);
    const char *names[4] = {"a", "b", "c", "d"};
    const stp_type types[4] = {STP_TYPE_F32, STP_TYPE_Q8_0, STP_TYPE_F16, STP_TYPE_I8};
    const size_t sizes[4] = {12, 68, 30, 7};
    off = 0;
    for (int i = 0; i < 4; i++) {
        const gguf_tensor *t = gguf_tensor_find(f, names[i]);
        assert_non_null(t);
        assert_int_equal(t->type, types[i]);
        assert_int_equal(t->nbytes, sizes[i]);
        assert_int_equal((t->offset - gguf_data_offset(f)) % 32, 0);
        assert_memory_equal(t->data, data + off, sizes[i]);
        off += sizes[i];
    }
    const gguf_tensor *tb = gguf_tensor_find(f, "b");
    assert_int_equal(tb->n_dims, 2);
    assert_int_equal(tb->ne[0], 32);
    assert_int_equal(tb->ne[1], 2);
    assert_int_equal(tb->ne[2], 1);
    /* the file ends right after the last tensor, padded */
    const gguf_tensor *td = gguf_tensor_find(f, "d");
    assert_int_equal(gguf_file_size(f), td->offset + 32);
    gguf_close(&f);
    unlink(path);
}

static void test_gguf_write_custom_alignment(void **state) {
    (void)state;
    char path[4096];
    tmp_path(path, sizeof path, "align.gguf");
    stp_err err = {0};
    gguf_writer *w = NULL;
    assert_int_equal(gguf_writer_new(&w, path, &err), 0);
    assert_int_equal(gguf_writer_kv_u32(w, "general.alignment", 64), 0);
    const int64_t ne[1] = {5};
    assert_int_equal(gguf_writer_add_tensor(w, "x", STP_TYPE_F32, 1, ne), 0);
    assert_int_equal(gguf_writer_add_tensor(w, "y", STP_TYPE_F32, 1, ne), 0);
    assert_int_equal(gguf_writer_begin_data(w, &err), 0);
    float v[10] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10};
    assert_int_equal(gguf_writer_write(w, v, sizeof v, &err), 0);
    assert_int_equal(gguf_writer_finish(w, &err), 0);
    gguf_writer_destroy(&w);
    gguf_file *f = NULL;
    assert_int_equal(gguf_open(&f, path, &err), 0);
    assert_int_equal(gguf_alignment(f), 64);
    assert_int_equal(gguf_data_offset(f) % 64, 0);
    const gguf_tensor *y = gguf_tensor_find(f, "y");
    assert_int_equal(y->offset - gguf_data_offset(f), 64);
    assert_memory_equal(y->data, v + 5, 5 * sizeof(float));
    gguf_close(&f);
    unlink(path);
}

static void test_gguf_write_vocab_only_no_tensors(void **state) {
    (void)state;
    char path[4096];
    tmp_path(path, sizeof path, "meta.gguf");
    stp_err err = {0};
    gguf_writer *w = NULL;
    assert_int_equal(gguf_writer_new(&w, path, &err), 0);
    assert_int_equal(gguf_writer_kv_str(w, "general.name", "x"), 0);
    assert_int_equal(gguf_writer_finish(w, &err), 0); /* begin_data implied */
    gguf_writer_destroy(&w);
    gguf_file *f = NULL;
    assert_int_equal(gguf_open(&f, path, &err), 0);
    assert_int_equal(gguf_tensor_count(f), 0);
    assert_int_equal(gguf_kv_count(f), 1);
    gguf_close(&f);
    unlink(path);
}

static void test_gguf_write_finish_refuses_missing_bytes(void **state) {
    (void)state;
    char path[4096];
    tmp_path(path, sizeof path, "short.gguf");
    stp_err err = {0};
    gguf_writer *w = NULL;
    assert_int_equal(gguf_writer_new(&w, path, &err), 0);
    const int64_t ne[2] = {32, 4};
    assert_int_equal(gguf_writer_add_tensor(w, "first", STP_TYPE_F32, 1, ne), 0);
    assert_int_equal(gguf_writer_add_tensor(w, "second", STP_TYPE_Q4_0, 2, ne), 0);
    assert_int_equal(gguf_writer_begin_data(w, &err), 0);
    uint8_t buf[128 + 72] = {0};
    assert_int_equal(gguf_writer_write(w, buf, 128 + 10, &err), 0);
    assert_int_not_equal(gguf_writer_finish(w, &err), 0);
    assert_non_null(strstr(err.msg, "second"));
    assert_non_null(strstr(err.msg, "10 of its 72"));
    /* the rest can still be written; then one byte too many is refused */
    assert_int_equal(gguf_writer_write(w, buf, 62, &err), 0);
    assert_int_equal(gguf_writer_write(w, buf, 1, &err), STP_ERANGE);
    gguf_writer_destroy(&w); /* not finished: removed */
    assert_false(file_exists(path));
}

static void test_gguf_write_refuses_bad_declarations(void **state) {
    (void)state;
    char path[4096];
    tmp_path(path, sizeof path, "dup.gguf");
    stp_err err = {0};
    gguf_writer *w = NULL;
    assert_int_equal(gguf_writer_new(&w, path, &err), 0);
    assert_int_equal(gguf_writer_kv_u32(w, "a", 1), 0);
    assert_int_not_equal(gguf_writer_kv_u32(w, "a", 2), 0);
    assert_int_not_equal(gguf_writer_begin_data(w, &err), 0);
    assert_non_null(strstr(err.msg, "duplicate key 'a'"));
    gguf_writer_destroy(&w);
    assert_false(file_exists(path));

    assert_int_equal(gguf_writer_new(&w, path, &err), 0);
    const int64_t ne[1] = {33};
    assert_int_not_equal(gguf_writer_add_tensor(w, "q", STP_TYPE_Q4_0, 1, ne), 0);
    assert_int_not_equal(gguf_writer_begin_data(w, &err), 0);
    assert_non_null(strstr(err.msg, "'q'"));
    gguf_writer_destroy(&w);

    assert_int_equal(gguf_writer_new(&w, path, &err), 0);
    const int64_t ne2[1] = {32};
    assert_int_equal(gguf_writer_add_tensor(w, "t", STP_TYPE_F32, 1, ne2), 0);
    assert_int_not_equal(gguf_writer_add_tensor(w, "t", STP_TYPE_F32, 1, ne2), 0);
    gguf_writer_destroy(&w);
    assert_false(file_exists(path));

    assert_int_not_equal(gguf_writer_new(&w, "/nonexistent-dir/x.gguf", &err), 0);
    assert_null(w);
    assert_non_null(strstr(err.msg, "/nonexistent-dir/x.gguf"));
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_gguf_write_roundtrip_all_types),
        cmocka_unit_test(test_gguf_write_custom_alignment),
        cmocka_unit_test(test_gguf_write_vocab_only_no_tensors),
        cmocka_unit_test(test_gguf_write_finish_refuses_missing_bytes),
        cmocka_unit_test(test_gguf_write_refuses_bad_declarations),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
