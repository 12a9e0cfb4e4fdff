/* gguf_write: the streaming half of gguf.h, writing GGUF v3 files.
 *
 * Metadata and tensor declarations are buffered in memory (they are small); tensor data is never
 * buffered here: gguf_writer_write appends the caller's bytes straight to the file, one tensor
 * after the other in declaration order, padding each to the alignment. So a model larger than
 * RAM can be written one slice at a time. Invariant: the header written by begin_data names
 * offsets that finish() verifies were filled exactly; a file that was not finished is removed.
 * The metadata calls take no stp_err: their first failure is kept and reported by begin_data.
 * See common/gguf/README.md. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "gguf/gguf.h"

/* ------------------------------------------------------------------------------------------ */
/* Types                                                                                      */
/* ------------------------------------------------------------------------------------------ */

typedef struct gw_buf {
    uint8_t *p;
    size_t len, cap;
} gw_buf;

typedef struct gw_tensor {
    char *name;
    stp_type type;
    uint32_t n_dims;
    int64_t ne[GGUF_MAX_DIMS];
    uint64_t nbytes;
    uint64_t offset; /* relative to the start of the data section */
} gw_tensor;

enum { GW_META = 0, GW_DATA = 1, GW_DONE = 2 };

struct gguf_writer {
    char *path;
    FILE *fp;
    int state;
    gw_buf kv; /* serialized key/value pairs */
    uint64_t n_kv;
    char **keys;        /* for duplicate detection */
    gw_tensor *tensors; /* (n_tensors) declared tensors */
    size_t n_tensors, cap_tensors;
    uint64_t alignment;
    size_t cur;        /* tensor being written */
    uint64_t cur_done; /* bytes of tensors[cur] written so far */
    int sticky_rc;     /* first metadata error, reported by begin_data */
    char sticky_msg[512];
};

static int s_fail(gguf_writer *w, int rc, const char *fmt, const char *a);

/* ------------------------------------------------------------------------------------------ */
/* Buffer helpers                                                                             */
/* ------------------------------------------------------------------------------------------ */

static int s_buf_put(gw_buf *b, const void *data, size_t n) {
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->len + n)
            cap *= 2;
        uint8_t *p = realloc(b->p, cap);
        if (!p) return STP_ENOMEM;
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->len, data, n);
    b->len += n;
    return 0;
}

static int s_buf_u32(gw_buf *b, uint32_t v) {
    return s_buf_put(b, &v, sizeof v); /* GGUF is little-endian, as is every supported host */
}

static int s_buf_u64(gw_buf *b, uint64_t v) {
    return s_buf_put(b, &v, sizeof v);
}

static int s_buf_str(gw_buf *b, const char *s) {
    size_t n = strlen(s);
    int rc = s_buf_u64(b, (uint64_t)n);
    return rc ? rc : s_buf_put(b, s, n);
}

/* ------------------------------------------------------------------------------------------ */
/* Lifecycle                                                                                  */
/* ------------------------------------------------------------------------------------------ */

int gguf_writer_new(gguf_writer **out, const char *path, stp_err *err) {
    *out = NULL;
    if (!path || !*path) return stp_err_set(err, STP_EINVAL, "gguf writer: empty path");
    gguf_writer *w = calloc(1, sizeof *w);
    if (!w) return stp_err_set(err, STP_ENOMEM, "%s: out of memory", path);
    w->alignment = GGUF_DEFAULT_ALIGNMENT;
    w->path = strdup(path);
    if (!w->path) {
        free(w);
        return stp_err_set(err, STP_ENOMEM, "%s: out of memory", path);
    }
    w->fp = fopen(path, "wb");
    if (!w->fp) {
        int e = errno;
        stp_err_set(err, -e, "%s: cannot create: %s", path, strerror(e));
        free(w->path);
        free(w);
        return -e;
    }
    setvbuf(w->fp, NULL, _IOFBF, 1 << 20);
    *out = w;
    return 0;
}

void gguf_writer_destroy(gguf_writer **self_p) {
    if (!self_p || !*self_p) return;
    gguf_writer *w = *self_p;
    if (w->fp) {
        fclose(w->fp);
        w->fp = NULL;
    }
    if (w->state != GW_DONE && w->path) unlink(w->path);
    for (uint64_t i = 0; i < w->n_kv; i++)
        free(w->keys[i]);
    free(w->keys);
    for (size_t i = 0; i < w->n_tensors; i++)
        free(w->tensors[i].name);
    free(w->tensors);
    free(w->kv.p);
    free(w->path);
    free(w);
    *self_p = NULL;
}

/* ------------------------------------------------------------------------------------------ */
/* Metadata                                                                                   */
/* ------------------------------------------------------------------------------------------ */

static int s_fail(gguf_writer *w, int rc, const char *fmt, const char *a) {
    if (!w->sticky_rc) {
        w->sticky_rc = rc;
        snprintf(w->sticky_msg, sizeof w->sticky_msg, fmt, a ? a : "");
    }
    return rc;
}

/* Checks state and key, records the key, and appends key + value type. */
static int s_kv_begin(gguf_writer *w, const char *key, gguf_vtype t) {
    if (!w) return STP_EINVAL;
    if (w->sticky_rc) return w->sticky_rc;
    if (w->state != GW_META) return s_fail(w, STP_EINVAL, "key '%s' added after begin_data", key);
    if (!key || !*key) return s_fail(w, STP_EINVAL, "empty key%s", "");
    for (uint64_t i = 0; i < w->n_kv; i++)
        if (strcmp(w->keys[i], key) == 0) return s_fail(w, STP_EINVAL, "duplicate key '%s'", key);
    char **keys = realloc(w->keys, (size_t)(w->n_kv + 1) * sizeof *keys);
    if (!keys) return s_fail(w, STP_ENOMEM, "out of memory at key '%s'", key);
    w->keys = keys;
    keys[w->n_kv] = strdup(key);
    if (!keys[w->n_kv]) return s_fail(w, STP_ENOMEM, "out of memory at key '%s'", key);
    w->n_kv++;
    int rc = s_buf_str(&w->kv, key);
    if (!rc) rc = s_buf_u32(&w->kv, (uint32_t)t);
    if (rc) return s_fail(w, rc, "out of memory at key '%s'", key);
    return 0;
}

static int s_kv_scalar(gguf_writer *w, const char *key, gguf_vtype t, const void *v, size_t n) {
    int rc = s_kv_begin(w, key, t);
    if (rc) return rc;
    rc = s_buf_put(&w->kv, v, n);
    return rc ? s_fail(w, rc, "out of memory at key '%s'", key) : 0;
}

int gguf_writer_kv_u32(gguf_writer *w, const char *key, uint32_t v) {
    int rc = s_kv_scalar(w, key, GGUF_VT_UINT32, &v, sizeof v);
    if (!rc && strcmp(key, "general.alignment") == 0) {
        if (v == 0 || (v & (v - 1)) != 0)
            return s_fail(w, STP_EINVAL, "general.alignment %s is not a power of 2", "");
        w->alignment = v;
    }
    return rc;
}

int gguf_writer_kv_i32(gguf_writer *w, const char *key, int32_t v) {
    return s_kv_scalar(w, key, GGUF_VT_INT32, &v, sizeof v);
}

int gguf_writer_kv_u64(gguf_writer *w, const char *key, uint64_t v) {
    return s_kv_scalar(w, key, GGUF_VT_UINT64, &v, sizeof v);
}

int gguf_writer_kv_f32(gguf_writer *w, const char *key, float v) {
    return s_kv_scalar(w, key, GGUF_VT_FLOAT32, &v, sizeof v);
}

int gguf_writer_kv_bool(gguf_writer *w, const char *key, bool v) {
    uint8_t b = v ? 1 : 0;
    return s_kv_scalar(w, key, GGUF_VT_BOOL, &b, 1);
}

int gguf_writer_kv_str(gguf_writer *w, const char *key, const char *v) {
    if (!v) return w ? s_fail(w, STP_EINVAL, "NULL string for key '%s'", key) : STP_EINVAL;
    int rc = s_kv_begin(w, key, GGUF_VT_STRING);
    if (rc) return rc;
    rc = s_buf_str(&w->kv, v);
    return rc ? s_fail(w, rc, "out of memory at key '%s'", key) : 0;
}

int gguf_writer_kv_arr(gguf_writer *w, const char *key, gguf_vtype elem, const void *data,
                       uint64_t n) {
    size_t es = gguf_vtype_size(elem);
    if (!w) return STP_EINVAL;
    if (es == 0) return s_fail(w, STP_EINVAL, "key '%s': not a numeric array element type", key);
    if (n && !data) return s_fail(w, STP_EINVAL, "key '%s': NULL array data", key);
    if (n > SIZE_MAX / es) return s_fail(w, STP_ERANGE, "key '%s': array too long", key);
    int rc = s_kv_begin(w, key, GGUF_VT_ARRAY);
    if (!rc) rc = s_buf_u32(&w->kv, (uint32_t)elem);
    if (!rc) rc = s_buf_u64(&w->kv, n);
    if (!rc && n) rc = s_buf_put(&w->kv, data, (size_t)n * es);
    if (rc && !w->sticky_rc) return s_fail(w, rc, "out of memory at key '%s'", key);
    return rc;
}

int gguf_writer_kv_arr_str(gguf_writer *w, const char *key, const char *const *strs, uint64_t n) {
    if (!w) return STP_EINVAL;
    if (n && !strs) return s_fail(w, STP_EINVAL, "key '%s': NULL string array", key);
    for (uint64_t i = 0; i < n; i++)
        if (!strs[i]) return s_fail(w, STP_EINVAL, "key '%s': NULL string in array", key);
    int rc = s_kv_begin(w, key, GGUF_VT_ARRAY);
    if (!rc) rc = s_buf_u32(&w->kv, (uint32_t)GGUF_VT_STRING);
    if (!rc) rc = s_buf_u64(&w->kv, n);
    for (uint64_t i = 0; !rc && i < n; i++)
        rc = s_buf_str(&w->kv, strs[i]);
    if (rc && !w->sticky_rc) return s_fail(w, rc, "out of memory at key '%s'", key);
    return rc;
}

/* ------------------------------------------------------------------------------------------ */
/* Tensors                                                                                    */
/* ------------------------------------------------------------------------------------------ */

int gguf_writer_add_tensor(gguf_writer *w, const char *name, stp_type type, uint32_t n_dims,
                           const int64_t *ne) {
    if (!w) return STP_EINVAL;
    if (w->sticky_rc) return w->sticky_rc;
    if (w->state != GW_META)
        return s_fail(w, STP_EINVAL, "tensor '%s' declared after begin_data", name);
    if (!name || !*name) return s_fail(w, STP_EINVAL, "empty tensor name%s", "");
    if (n_dims < 1 || n_dims > GGUF_MAX_DIMS || !ne)
        return s_fail(w, STP_EINVAL, "tensor '%s': n_dims must be 1..4", name);
    const stp_type_info *ti = tensor_type_info((uint32_t)type);
    if (!ti || !ti->name) return s_fail(w, STP_EINVAL, "tensor '%s': unknown type", name);
    uint64_t nel = 1;
    for (uint32_t d = 0; d < n_dims; d++) {
        if (ne[d] <= 0) return s_fail(w, STP_EINVAL, "tensor '%s': dimension <= 0", name);
        if (nel > UINT64_MAX / (uint64_t)ne[d])
            return s_fail(w, STP_ERANGE, "tensor '%s': too many elements", name);
        nel *= (uint64_t)ne[d];
    }
    if (ne[0] % ti->blck != 0)
        return s_fail(w, STP_EINVAL, "tensor '%s': ne[0] is not a multiple of the block size",
                      name);
    for (size_t i = 0; i < w->n_tensors; i++)
        if (strcmp(w->tensors[i].name, name) == 0)
            return s_fail(w, STP_EINVAL, "duplicate tensor '%s'", name);
    if (w->n_tensors == w->cap_tensors) {
        size_t cap = w->cap_tensors ? w->cap_tensors * 2 : 64;
        gw_tensor *t = realloc(w->tensors, cap * sizeof *t);
        if (!t) return s_fail(w, STP_ENOMEM, "out of memory at tensor '%s'", name);
        w->tensors = t;
        w->cap_tensors = cap;
    }
    gw_tensor *t = &w->tensors[w->n_tensors];
    memset(t, 0, sizeof *t);
    t->name = strdup(name);
    if (!t->name) return s_fail(w, STP_ENOMEM, "out of memory at tensor '%s'", name);
    t->type = type;
    t->n_dims = n_dims;
    for (uint32_t d = 0; d < GGUF_MAX_DIMS; d++)
        t->ne[d] = d < n_dims ? ne[d] : 1;
    t->nbytes = nel / ti->blck * ti->size;
    w->n_tensors++;
    return 0;
}

static uint64_t s_pad(uint64_t x, uint64_t a) {
    return (x + a - 1) / a * a;
}

static int s_write(gguf_writer *w, const void *p, size_t n, stp_err *err) {
    if (n && fwrite(p, 1, n, w->fp) != n) {
        int e = errno ? errno : EIO;
        return stp_err_set(err, -e, "%s: write failed: %s", w->path, strerror(e));
    }
    return 0;
}

static int s_write_zeros(gguf_writer *w, uint64_t n, stp_err *err) {
    static const uint8_t zeros[64];
    while (n) {
        size_t k = n < sizeof zeros ? (size_t)n : sizeof zeros;
        int rc = s_write(w, zeros, k, err);
        if (rc) return rc;
        n -= k;
    }
    return 0;
}

int gguf_writer_begin_data(gguf_writer *w, stp_err *err) {
    if (!w) return stp_err_set(err, STP_EINVAL, "gguf writer: NULL");
    if (w->sticky_rc) return stp_err_set(err, w->sticky_rc, "%s: %s", w->path, w->sticky_msg);
    if (w->state != GW_META)
        return stp_err_set(err, STP_EINVAL, "%s: begin_data called twice", w->path);
    gw_buf h = {0};
    int rc = s_buf_u32(&h, GGUF_MAGIC);
    if (!rc) rc = s_buf_u32(&h, 3);
    if (!rc) rc = s_buf_u64(&h, (uint64_t)w->n_tensors);
    if (!rc) rc = s_buf_u64(&h, w->n_kv);
    if (!rc && w->kv.len) rc = s_buf_put(&h, w->kv.p, w->kv.len);
    uint64_t off = 0;
    for (size_t i = 0; !rc && i < w->n_tensors; i++) {
        gw_tensor *t = &w->tensors[i];
        t->offset = off;
        off = s_pad(off + t->nbytes, w->alignment);
        rc = s_buf_str(&h, t->name);
        if (!rc) rc = s_buf_u32(&h, t->n_dims);
        for (uint32_t d = 0; !rc && d < t->n_dims; d++)
            rc = s_buf_u64(&h, (uint64_t)t->ne[d]);
        if (!rc) rc = s_buf_u32(&h, (uint32_t)t->type);
        if (!rc) rc = s_buf_u64(&h, t->offset);
    }
    if (rc) {
        free(h.p);
        return stp_err_set(err, rc, "%s: out of memory building the header", w->path);
    }
    uint64_t pad = s_pad(h.len, w->alignment) - h.len;
    rc = s_write(w, h.p, h.len, err);
    free(h.p);
    if (!rc) rc = s_write_zeros(w, pad, err);
    if (rc) return rc;
    w->state = GW_DATA;
    w->cur = 0;
    w->cur_done = 0;
    return 0;
}

int gguf_writer_write(gguf_writer *w, const void *data, size_t n, stp_err *err) {
    if (!w) return stp_err_set(err, STP_EINVAL, "gguf writer: NULL");
    if (w->state != GW_DATA)
        return stp_err_set(err, STP_EINVAL, "%s: write outside the data phase", w->path);
    const uint8_t *p = data;
    while (n) {
        if (w->cur >= w->n_tensors)
            return stp_err_set(err, STP_ERANGE, "%s: %zu bytes written past the last tensor",
                               w->path, n);
        gw_tensor *t = &w->tensors[w->cur];
        uint64_t left = t->nbytes - w->cur_done;
        size_t k = n < left ? n : (size_t)left;
        int rc = s_write(w, p, k, err);
        if (rc) return rc;
        p += k;
        n -= k;
        w->cur_done += k;
        if (w->cur_done == t->nbytes) {
            rc = s_write_zeros(w, s_pad(t->nbytes, w->alignment) - t->nbytes, err);
            if (rc) return rc;
            w->cur++;
            w->cur_done = 0;
        }
    }
    return 0;
}

int gguf_writer_finish(gguf_writer *w, stp_err *err) {
    if (!w) return stp_err_set(err, STP_EINVAL, "gguf writer: NULL");
    if (w->state == GW_META) {
        int rc = gguf_writer_begin_data(w, err);
        if (rc) return rc;
    }
    if (w->state != GW_DATA)
        return stp_err_set(err, STP_EINVAL, "%s: finish called twice", w->path);
    if (w->cur < w->n_tensors) {
        const gw_tensor *t = &w->tensors[w->cur];
        return stp_err_set(err, STP_EINVAL,
                           "%s: tensor '%s' got %llu of its %llu bytes (%zu of %zu tensors "
                           "complete)",
                           w->path, t->name, (unsigned long long)w->cur_done,
                           (unsigned long long)t->nbytes, w->cur, w->n_tensors);
    }
    if (fflush(w->fp) != 0 || fsync(fileno(w->fp)) != 0) {
        int e = errno;
        return stp_err_set(err, -e, "%s: flush failed: %s", w->path, strerror(e));
    }
    FILE *fp = w->fp;
    w->fp = NULL;
    if (fclose(fp) != 0) {
        int e = errno;
        return stp_err_set(err, -e, "%s: close failed: %s", w->path, strerror(e));
    }
    w->state = GW_DONE;
    return 0;
}
