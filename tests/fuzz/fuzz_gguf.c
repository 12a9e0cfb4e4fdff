/* fuzz_gguf: libFuzzer target for the GGUF reader (common/gguf/gguf_read.c) and the model
 * loader on top of it (model_config_load, model_open).
 *
 * The input is a whole GGUF image. gguf_open_memory either refuses it (then the handle must be
 * NULL and the error message a NUL-terminated non-empty string) or accepts it; after acceptance
 * every pointer the reader hands out must lie inside the image, so this target reads every
 * byte of every key, string, array element and tensor data range (ASan flags any byte outside)
 * and checks the documented invariants: tensor data at data_offset + a multiple of the
 * alignment, nbytes equal to the type's row size times the rows, no two tensors overlapping,
 * kv_find/tensor_find agreeing with the index walk. Then the typed getters run on every key,
 * model_config_load on the handle, and, when the config loads, model_open on a memfd copy of
 * the image (model_open only takes a path). Any violated invariant aborts (a crash for
 * libFuzzer). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "gguf/gguf.h"
#include "model/model.h"
#include "model/model_config.h"

#include "fuzz_gguf.h"

#define FUZZ_CHECK(cond)                                                                           \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "fuzz_gguf: check failed at line %d: %s\n", __LINE__, #cond);          \
            abort();                                                                               \
        }                                                                                          \
    } while (0)

typedef struct fz_range {
    uint64_t lo, hi;
} fz_range;

/* Sum of n bytes that must lie inside [base, base + size): every byte is read. */
static uint64_t fz_touch(const uint8_t *base, size_t size, const void *p, uint64_t n) {
    if (n == 0) return 0;
    const uint8_t *b = p;
    FUZZ_CHECK(b >= base && n <= size && (size_t)(b - base) <= size - n);
    uint64_t s = 0;
    for (uint64_t i = 0; i < n; i++)
        s += b[i];
    return s;
}

static uint64_t fz_str(const uint8_t *base, size_t size, gguf_str s) {
    return fz_touch(base, size, s.ptr, s.len) + s.len;
}

static int fz_cmp_range(const void *a, const void *b) {
    const fz_range *x = a, *y = b;
    return x->lo < y->lo ? -1 : x->lo > y->lo;
}

/* Key as a NUL-terminated copy (keys may hold NUL bytes: then find() cannot name them). */
static char *fz_key_cstr(gguf_str k) {
    char *c = malloc(k.len + 1);
    FUZZ_CHECK(c);
    memcpy(c, k.ptr, k.len);
    c[k.len] = 0;
    return c;
}

static uint64_t fz_walk_kvs(const gguf_file *g, const uint8_t *base, size_t size) {
    uint64_t sum = 0;
    size_t n = gguf_kv_count(g);
    for (size_t i = 0; i < n; i++) {
        const gguf_kv *kv = gguf_kv_at(g, i);
        FUZZ_CHECK(kv);
        FUZZ_CHECK(kv->offset < size);
        sum += fz_str(base, size, kv->key);
        switch (kv->type) {
        case GGUF_VT_STRING: sum += fz_str(base, size, kv->v.str); break;
        case GGUF_VT_ARRAY: {
            FUZZ_CHECK(kv->v.arr.type != GGUF_VT_ARRAY && kv->v.arr.type < GGUF_VT_COUNT);
            if (kv->v.arr.type == GGUF_VT_STRING) {
                FUZZ_CHECK(kv->v.arr.n == 0 || kv->v.arr.strs);
                for (uint64_t j = 0; j < kv->v.arr.n; j++)
                    sum += fz_str(base, size, kv->v.arr.strs[j]);
            } else {
                size_t es = gguf_vtype_size(kv->v.arr.type);
                FUZZ_CHECK(es);
                FUZZ_CHECK(kv->v.arr.n <= size / es);
                sum += fz_touch(base, size, kv->v.arr.data, kv->v.arr.n * es);
            }
            break;
        }
        case GGUF_VT_BOOL: FUZZ_CHECK(kv->v.u64 <= 1); break;
        default: FUZZ_CHECK(kv->type < GGUF_VT_COUNT); sum += kv->v.u64;
        }

        /* The getters on this key: none may crash; when find() can name the key (no NUL byte),
         * it returns a kv with the same key. */
        if (memchr(kv->key.ptr, 0, kv->key.len)) continue;
        char *key = fz_key_cstr(kv->key);
        const gguf_kv *found = gguf_kv_find(g, key);
        FUZZ_CHECK(found && found->key.len == kv->key.len &&
                   memcmp(found->key.ptr, kv->key.ptr, kv->key.len) == 0);
        stp_err err = {0};
        uint64_t u64;
        uint32_t u32;
        int64_t i64;
        float f32;
        bool b;
        gguf_str s;
        char buf[16];
        const gguf_kv *arr;
        sum += gguf_get_u64(g, key, &u64, &err) == 0 ? u64 : 1;
        sum += gguf_get_u32(g, key, &u32, &err) == 0 ? u32 : 1;
        sum += gguf_get_i64(g, key, &i64, &err) == 0 ? (uint64_t)i64 : 1;
        sum += gguf_get_f32(g, key, &f32, &err) == 0 ? (f32 == f32) : 1;
        sum += gguf_get_bool(g, key, &b, &err) == 0 ? b : 1;
        if (gguf_get_str(g, key, &s, &err) == 0) sum += fz_str(base, size, s);
        if (gguf_get_cstr(g, key, buf, sizeof buf, &err) == 0)
            FUZZ_CHECK(memchr(buf, 0, sizeof buf) != NULL);
        for (int t = 0; t < GGUF_VT_COUNT; t++)
            if (gguf_get_arr(g, key, (gguf_vtype)t, &arr, &err) == 0)
                FUZZ_CHECK(arr == found && arr->type == GGUF_VT_ARRAY);
        FUZZ_CHECK(memchr(err.msg, 0, sizeof err.msg) != NULL);
        free(key);
    }
    return sum;
}

static uint64_t fz_walk_tensors(const gguf_file *g, const uint8_t *base, size_t size) {
    uint64_t sum = 0;
    size_t n = gguf_tensor_count(g);
    uint64_t align = gguf_alignment(g), data_off = gguf_data_offset(g);
    FUZZ_CHECK(align && (align & (align - 1)) == 0);
    FUZZ_CHECK(n == 0 || data_off <= size);
    fz_range *r = calloc(n ? n : 1, sizeof *r);
    FUZZ_CHECK(r);
    size_t nr = 0;
    for (size_t i = 0; i < n; i++) {
        const gguf_tensor *t = gguf_tensor_at(g, i);
        FUZZ_CHECK(t);
        sum += fz_str(base, size, t->name);
        FUZZ_CHECK(t->n_dims >= 1 && t->n_dims <= GGUF_MAX_DIMS);
        int64_t rows = 1;
        for (uint32_t d = 0; d < GGUF_MAX_DIMS; d++) {
            FUZZ_CHECK(t->ne[d] >= 0);
            if (d >= t->n_dims) FUZZ_CHECK(t->ne[d] == 1);
            if (d > 0) {
                FUZZ_CHECK(t->ne[d] == 0 || rows <= INT64_MAX / t->ne[d]);
                rows *= t->ne[d];
            }
        }
        FUZZ_CHECK(tensor_type_info(t->type) != NULL);
        size_t row = tensor_type_row_size(t->type, t->ne[0]);
        FUZZ_CHECK(row || t->ne[0] == 0);
        FUZZ_CHECK(rows == 0 || (uint64_t)row <= UINT64_MAX / (uint64_t)rows);
        FUZZ_CHECK(t->nbytes == (uint64_t)row * (uint64_t)rows);
        FUZZ_CHECK(t->offset >= data_off && (t->offset - data_off) % align == 0);
        FUZZ_CHECK((const uint8_t *)t->data == base + t->offset);
        sum += fz_touch(base, size, t->data, t->nbytes);
        if (t->nbytes) r[nr++] = (fz_range){t->offset, t->offset + t->nbytes};
        if (!memchr(t->name.ptr, 0, t->name.len)) {
            char *name = fz_key_cstr(t->name);
            const gguf_tensor *f = gguf_tensor_find(g, name);
            FUZZ_CHECK(f && f->name.len == t->name.len &&
                       memcmp(f->name.ptr, t->name.ptr, t->name.len) == 0);
            free(name);
        }
    }
    qsort(r, nr, sizeof *r, fz_cmp_range);
    for (size_t i = 1; i < nr; i++)
        FUZZ_CHECK(r[i].lo >= r[i - 1].hi);
    free(r);
    return sum;
}

/* model_open on a memfd holding the image (the path is /proc/self/fd/N). */
static int fz_model_open(const uint8_t *data, size_t size) {
    int fd = memfd_create("fuzz_gguf", MFD_CLOEXEC);
    int out = FZ_GGUF_MODEL_REFUSED;
    if (fd < 0) return out;
    size_t off = 0;
    while (off < size) {
        ssize_t w = write(fd, data + off, size - off);
        if (w <= 0) break;
        off += (size_t)w;
    }
    if (off == size) {
        char path[64];
        snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
        model *m = NULL;
        stp_err err = {0};
        int rc = model_open(&m, path, &err);
        if (rc == 0) {
            FUZZ_CHECK(m && m->cfg.n_layer > 0 && m->layers);
            model_close(&m);
            FUZZ_CHECK(m == NULL);
            out = FZ_GGUF_LOADED;
        } else {
            FUZZ_CHECK(rc < 0 && m == NULL && err.msg[0]);
        }
    }
    close(fd);
    return out;
}

int fz_gguf_check(const uint8_t *data, size_t size) {
    gguf_file *g = (gguf_file *)1;
    stp_err err = {0};
    int rc = gguf_open_memory(&g, data, size, "fuzz", &err);
    if (rc != 0) {
        FUZZ_CHECK(rc < 0 && g == NULL);
        FUZZ_CHECK(err.code == rc && err.msg[0] && memchr(err.msg, 0, sizeof err.msg));
        return FZ_GGUF_REFUSED;
    }
    FUZZ_CHECK(g && gguf_file_size(g) == size);
    const uint8_t *base = gguf_base(g);
    FUZZ_CHECK(base == data || size == 0);
    FUZZ_CHECK(gguf_version(g) == 2 || gguf_version(g) == 3);
    volatile uint64_t sum = fz_walk_kvs(g, base, size) + fz_walk_tensors(g, base, size);
    (void)sum;

    model_config cfg;
    char warn[256] = "";
    stp_err cerr = {0};
    rc = model_config_load(&cfg, g, warn, sizeof warn, &cerr);
    if (rc == 0) {
        FUZZ_CHECK(cfg.n_layer > 0 && cfg.n_embd > 0 && cfg.n_head > 0 && cfg.n_head_kv > 0);
        FUZZ_CHECK(cfg.n_expert_used > 0 && cfg.n_expert_used <= cfg.n_expert);
        FUZZ_CHECK(cfg.n_expert <= STP_MAX_EXPERTS && cfg.head_dim > 0);
        FUZZ_CHECK(cfg.head_dim <= STP_MAX_HEAD_DIM);
        for (int il = 0; il < cfg.n_layer && il < 64; il++) {
            (void)model_config_layer_rope(&cfg, il);
            FUZZ_CHECK(model_config_layer_window(&cfg, il) >= 0);
        }
    } else {
        FUZZ_CHECK(rc < 0 && cerr.msg[0]);
    }
    gguf_close(&g);
    FUZZ_CHECK(g == NULL);
    return rc == 0 ? fz_model_open(data, size) : FZ_GGUF_MODEL_REFUSED;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    (void)fz_gguf_check(data, size);
    return 0;
}
