/* test_layout: the expert layout file of a Q4_0 model: records 4 KiB aligned, gate/up equal to
 * the GGUF bytes, down equal to down_t_build_expert's image; reopened without a rebuild; a
 * truncated, corrupted or stale (model mtime changed) file is refused by layout_open and rebuilt
 * by layout_ensure. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "kern/kern.h"
#include "layout/layout.h"
#include "model/down_t.h"

static char s_path[1024];

static model *s_open(void) {
    char p[1024];
    snprintf(p, sizeof p, "%s/tiny-dense-attn-q4_0-pure.gguf", getenv("STP_TEST_DATA"));
    model *m = NULL;
    stp_err err = {0};
    assert_int_equal(model_open(&m, p, &err), 0);
    return m;
}

static const char *s_model_path(void) {
    static char p[1024];
    snprintf(p, sizeof p, "%s/tiny-dense-attn-q4_0-pure.gguf", getenv("STP_TEST_DATA"));
    return p;
}

static void s_setup_path(void) {
    mkdir(getenv("STP_TMP"), 0700);
    char dir[1024];
    snprintf(dir, sizeof dir, "%s/layout-unit-%d", getenv("STP_TMP"), (int)getpid());
    mkdir(dir, 0700);
    stp_err err = {0};
    assert_int_equal(layout_path(s_path, sizeof s_path, s_model_path(), dir, &err), 0);
}

static void test_layout_records_match_model(void **st) {
    (void)st;
    s_setup_path();
    model *m = s_open();
    uint32_t fl = layout_wants_flags(m);
    bool rebuilt = false;
    layout *l = NULL;
    stp_err err = {0};
    unlink(s_path);
    assert_int_equal(layout_ensure(&l, m, s_model_path(), s_path, fl, NULL, &rebuilt, &err), 0);
    assert_true(rebuilt);
    const int NL = m->cfg.n_layer, X = m->cfg.n_expert;
    FILE *f = fopen(s_path, "rb");
    assert_non_null(f);
    for (int il = 0; il < NL; il++)
        for (int x = 0; x < X; x++) {
            const layer_weights *L = &m->layers[il];
            const tensor_view *tv[3] = {&L->gate_exps, &L->up_exps, &L->down_exps};
            for (int k = 0; k < 3; k++) {
                const layout_entry *e = &l->e[((size_t)il * X + x) * 3 + k];
                assert_int_equal(e->off % LAYOUT_ALIGN, 0);
                uint8_t *got = malloc(e->bytes), *want = malloc(e->bytes);
                fseek(f, (long)e->off, SEEK_SET);
                assert_int_equal(fread(got, 1, e->bytes, f), e->bytes);
                if (k == 2 && (fl & LAYOUT_DOWN_T))
                    down_t_build_expert(tv[2], x, want);
                else if (k == 0 && (fl & LAYOUT_GATE_X16))
                    kern_q4_0x16_pack(tv[0]->data + (size_t)x * tv[0]->mat_bytes, tv[0]->row_bytes,
                                      tv[0]->n_rows, tv[0]->n_cols, want);
                else
                    memcpy(want, tv[k]->data + (size_t)x * tv[k]->mat_bytes, e->bytes);
                assert_memory_equal(got, want, e->bytes);
                free(got);
                free(want);
            }
            assert_int_equal(layout_record_bytes(l, il, x) % LAYOUT_ALIGN, 0);
        }
    fclose(f);
    layout_close(&l);
    /* a second open trusts it */
    assert_int_equal(layout_ensure(&l, m, s_model_path(), s_path, fl, NULL, &rebuilt, &err), 0);
    assert_false(rebuilt);
    layout_close(&l);
    model_close(&m);
}

static void test_layout_damaged_files_are_rebuilt(void **st) {
    (void)st;
    s_setup_path();
    model *m = s_open();
    uint32_t fl = layout_wants_flags(m);
    bool rebuilt = false;
    layout *l = NULL;
    stp_err err = {0};
    assert_int_equal(layout_ensure(&l, m, s_model_path(), s_path, fl, NULL, &rebuilt, &err), 0);
    layout_close(&l);
    struct stat sb;
    assert_int_equal(stat(s_path, &sb), 0);
    /* truncated */
    assert_int_equal(truncate(s_path, sb.st_size - 4096), 0);
    assert_int_equal(layout_open(&l, m, s_model_path(), s_path, fl, &err), STP_EFORMAT);
    assert_non_null(strstr(err.msg, "truncated"));
    assert_int_equal(layout_ensure(&l, m, s_model_path(), s_path, fl, NULL, &rebuilt, &err), 0);
    assert_true(rebuilt);
    layout_close(&l);
    /* one table byte flipped */
    int fd = open(s_path, O_RDWR);
    uint8_t b;
    assert_int_equal(pread(fd, &b, 1, LAYOUT_ALIGN + 3), 1);
    b ^= 0x40;
    assert_int_equal(pwrite(fd, &b, 1, LAYOUT_ALIGN + 3), 1);
    close(fd);
    assert_int_equal(layout_open(&l, m, s_model_path(), s_path, fl, &err), STP_EFORMAT);
    assert_int_equal(layout_ensure(&l, m, s_model_path(), s_path, fl, NULL, &rebuilt, &err), 0);
    assert_true(rebuilt);
    layout_close(&l);
    /* other matrix layouts than asked for */
    assert_int_equal(layout_open(&l, m, s_model_path(), s_path, fl ^ LAYOUT_GATE_X16, &err),
                     STP_EFORMAT);
    assert_int_equal(layout_open(&l, m, s_model_path(), s_path, fl ^ LAYOUT_DOWN_T, &err),
                     STP_EFORMAT);
    /* not a layout at all */
    fd = open(s_path, O_RDWR);
    assert_int_equal(pwrite(fd, "garbage!", 8, 0), 8);
    close(fd);
    assert_int_equal(layout_open(&l, m, s_model_path(), s_path, fl, &err), STP_EFORMAT);
    assert_non_null(strstr(err.msg, "not a layout"));
    unlink(s_path);
    model_close(&m);
}

int main(void) {
    const struct CMUnitTest t[] = {
        cmocka_unit_test(test_layout_records_match_model),
        cmocka_unit_test(test_layout_damaged_files_are_rebuilt),
    };
    return cmocka_run_group_tests(t, NULL, NULL);
}
