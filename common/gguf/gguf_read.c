/* gguf_read: the validating GGUF v2/v3 reader (the reader half of gguf.h).
 *
 * gguf_open maps the file read-only (MAP_PRIVATE); gguf_open_memory validates a caller's image.
 * Everything in the file is checked against caps and the bytes left before it is used or
 * allocated for; after a successful open every pointer handed out lies inside the image and
 * every tensor's data range is inside the file and overlaps no other. Little-endian only.
 * Not here: the writer (gguf_write.c), and whether the engine can compute with a tensor type
 * (the model loader asks tensor_type_supported). Invariants: common/gguf/README.md. */
#include "gguf/gguf.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

// ------------------------------------------------------------------------------------------------
// Limits (see README.md, "Validation invariants")

#define GGUF_HEADER_SIZE 24u             /* magic, version, n_tensors, n_kv */
#define GGUF_MAX_KV (1u << 20)           /* real files have a few dozen keys */
#define GGUF_MAX_TENSORS (1u << 20)      /* real files have a few thousand tensors at most */
#define GGUF_MAX_KEY_LEN (1u << 20)      /* per key and per tensor name */
#define GGUF_MAX_VAL_LEN (64u << 20)     /* per string value (also per array element) */
#define GGUF_MIN_KV_BYTES (8u + 4u + 1u) /* key length, type, smallest value */
#define GGUF_MIN_TENSOR_BYTES                                                                      \
    (8u + 4u + 8u + 4u + 8u) /* name length, n_dims, ne[0], type, offset */

// ------------------------------------------------------------------------------------------------
// Types

/* Open-addressing hash index over names (keys or tensor names): slots hold index + 1, 0 = empty. */
typedef struct s_index {
    uint32_t *slots;
    size_t mask; /* capacity - 1 (capacity is a power of two, at least 2x the entries) */
} s_index;

struct gguf_file {
    char *name;           /* path or caller's name, for messages */
    const uint8_t *base;  /* the image */
    size_t size;          /* bytes in the image */
    void *map;            /* mmap'd region (gguf_open only), else NULL */
    uint32_t version;     /* 2 or 3 */
    uint64_t alignment;   /* general.alignment or 32 */
    uint64_t data_offset; /* header end padded to alignment */
    size_t n_kv;
    gguf_kv *kvs; /* (n_kv); string arrays own a malloc'd strs table */
    size_t n_tensors;
    gguf_tensor *tensors; /* (n_tensors) */
    s_index kv_index;
    s_index tensor_index;
};

/* A bounds-checked little-endian cursor over the image. */
typedef struct s_rd {
    const uint8_t *p;
    size_t size;
    size_t pos;
    const char *name;
    stp_err *err;
} s_rd;

// ------------------------------------------------------------------------------------------------
// Helpers

static uint64_t s_hash(const void *data, size_t n) {
    const uint8_t *p = data;
    uint64_t h = 1469598103934665603ull; /* FNV-1a */
    for (size_t i = 0; i < n; i++)
        h = (h ^ p[i]) * 1099511628211ull;
    return h ^ (h >> 29);
}

/* Printable, bounded copy of s for messages (names in a corrupt file may hold anything). */
static const char *s_quote(gguf_str s, char *buf, size_t cap) {
    size_t n = 0, lim = cap - 4;
    for (uint64_t i = 0; i < s.len && n < lim; i++) {
        unsigned char c = (unsigned char)s.ptr[i];
        buf[n++] = (c >= 0x20 && c < 0x7f) ? (char)c : '?';
    }
    if (s.len > lim) {
        memcpy(buf + n, "...", 3);
        n += 3;
    }
    buf[n] = 0;
    return buf;
}

static const char *s_vtype_name(uint32_t t) {
    static const char *const names[GGUF_VT_COUNT] = {
        "UINT8", "INT8",   "UINT16", "INT16",  "UINT32", "INT32",   "FLOAT32",
        "BOOL",  "STRING", "ARRAY",  "UINT64", "INT64",  "FLOAT64",
    };
    return t < GGUF_VT_COUNT ? names[t] : "unknown";
}

size_t gguf_vtype_size(uint32_t t) {
    switch (t) {
    case GGUF_VT_UINT8:
    case GGUF_VT_INT8:
    case GGUF_VT_BOOL: return 1;
    case GGUF_VT_UINT16:
    case GGUF_VT_INT16: return 2;
    case GGUF_VT_UINT32:
    case GGUF_VT_INT32:
    case GGUF_VT_FLOAT32: return 4;
    case GGUF_VT_UINT64:
    case GGUF_VT_INT64:
    case GGUF_VT_FLOAT64: return 8;
    default: return 0;
    }
}

static uint64_t s_le(const uint8_t *p, size_t n) {
    uint64_t v = 0;
    for (size_t i = 0; i < n; i++)
        v |= (uint64_t)p[i] << (8 * i);
    return v;
}

static size_t s_left(const s_rd *r) {
    return r->size - r->pos;
}

/* Reads an n-byte little-endian integer; what names the field in the error. */
static int s_rd_uint(s_rd *r, size_t n, uint64_t *out, const char *what) {
    *out = 0;
    if (s_left(r) < n)
        return stp_err_set(r->err, STP_EFORMAT,
                           "%s: truncated at offset 0x%zx: %s needs %zu bytes, %zu left", r->name,
                           r->pos, what, n, s_left(r));
    *out = s_le(r->p + r->pos, n);
    r->pos += n;
    return 0;
}

/* Reads a GGUF string (u64 length + bytes) of at most cap bytes. */
static int s_rd_str(s_rd *r, gguf_str *out, uint64_t cap, const char *what) {
    size_t at = r->pos;
    uint64_t len;
    int rc = s_rd_uint(r, 8, &len, what);
    if (rc) return rc;
    if (len > cap)
        return stp_err_set(r->err, STP_EFORMAT,
                           "%s: %s at offset 0x%zx: length %" PRIu64 " exceeds the cap of %" PRIu64
                           " bytes",
                           r->name, what, at, len, cap);
    if (len > s_left(r))
        return stp_err_set(r->err, STP_EFORMAT,
                           "%s: %s at offset 0x%zx: length %" PRIu64
                           " runs past the end of the file (%zu bytes left)",
                           r->name, what, at, len, s_left(r));
    out->ptr = (const char *)r->p + r->pos;
    out->len = len;
    r->pos += (size_t)len;
    return 0;
}

// ------------------------------------------------------------------------------------------------
// Name index

static int s_index_init(s_index *ix, size_t n) {
    size_t cap = 16;
    while (cap < 2 * n)
        cap <<= 1;
    ix->slots = calloc(cap, sizeof *ix->slots);
    if (!ix->slots) return STP_ENOMEM;
    ix->mask = cap - 1;
    return 0;
}

/* Looks name up among entries whose gguf_str sits at base + i*stride; returns index or -1. */
static long s_index_find(const s_index *ix, const void *base, size_t stride, const char *s,
                         size_t len) {
    if (!ix->slots) return -1;
    for (size_t h = s_hash(s, len) & ix->mask;; h = (h + 1) & ix->mask) {
        uint32_t v = ix->slots[h];
        if (!v) return -1;
        const gguf_str *k = (const gguf_str *)((const char *)base + (size_t)(v - 1) * stride);
        if (k->len == len && memcmp(k->ptr, s, len) == 0) return (long)(v - 1);
    }
}

/* Inserts entry i; returns the index of an existing entry with the same name, or -1. */
static long s_index_insert(s_index *ix, const void *base, size_t stride, uint32_t i) {
    const gguf_str *k = (const gguf_str *)((const char *)base + (size_t)i * stride);
    for (size_t h = s_hash(k->ptr, (size_t)k->len) & ix->mask;; h = (h + 1) & ix->mask) {
        uint32_t v = ix->slots[h];
        if (!v) {
            ix->slots[h] = i + 1;
            return -1;
        }
        const gguf_str *o = (const gguf_str *)((const char *)base + (size_t)(v - 1) * stride);
        if (o->len == k->len && memcmp(o->ptr, k->ptr, (size_t)k->len) == 0) return (long)(v - 1);
    }
}

// ------------------------------------------------------------------------------------------------
// Parsing

static int s_parse_header(gguf_file *f, s_rd *r, uint64_t *n_tensors, uint64_t *n_kv) {
    uint64_t magic, version;
    if (r->size < GGUF_HEADER_SIZE)
        return stp_err_set(
            r->err, STP_EFORMAT,
            "%s: truncated at offset 0x0: the GGUF header needs %u bytes, file has %zu", r->name,
            GGUF_HEADER_SIZE, r->size);
    s_rd_uint(r, 4, &magic, "magic");
    if (magic != GGUF_MAGIC) {
        if (magic == __builtin_bswap32(GGUF_MAGIC))
            return stp_err_set(r->err, STP_EFORMAT,
                               "%s: bad magic at offset 0x0: 0x%08" PRIx64
                               " is byte-swapped \"GGUF\" (0x%08x); is there a mismatch between "
                               "the host and model endianness?",
                               r->name, magic, GGUF_MAGIC);
        return stp_err_set(
            r->err, STP_EFORMAT,
            "%s: bad magic at offset 0x0: expected 0x%08x (\"GGUF\"), got 0x%08" PRIx64
            " (not a GGUF file)",
            r->name, GGUF_MAGIC, magic);
    }
    s_rd_uint(r, 4, &version, "version");
    if (version == 1)
        return stp_err_set(r->err, STP_EFORMAT,
                           "%s: unsupported GGUF version 1 at offset 0x4: v1 files (32-bit counts) "
                           "are not supported, expected version 2 or 3; re-convert the model",
                           r->name);
    if (version != 2 && version != 3) {
        uint32_t sw = __builtin_bswap32((uint32_t)version);
        if (sw >= 1 && sw <= 3)
            return stp_err_set(r->err, STP_EFORMAT,
                               "%s: bad GGUF version at offset 0x4: 0x%08" PRIx64
                               " is version %u byte-swapped; is there a mismatch between the host "
                               "and model endianness? (only little-endian files are supported)",
                               r->name, version, sw);
        return stp_err_set(
            r->err, STP_EFORMAT,
            "%s: unsupported GGUF version at offset 0x4: expected 2 or 3, got %" PRIu64, r->name,
            version);
    }
    f->version = (uint32_t)version;
    s_rd_uint(r, 8, n_tensors, "n_tensors");
    s_rd_uint(r, 8, n_kv, "n_kv");
    if (*n_tensors > GGUF_MAX_TENSORS)
        return stp_err_set(r->err, STP_EFORMAT,
                           "%s: bad tensor count at offset 0x8: %" PRIu64 " exceeds the cap of %u",
                           r->name, *n_tensors, GGUF_MAX_TENSORS);
    if (*n_kv > GGUF_MAX_KV)
        return stp_err_set(r->err, STP_EFORMAT,
                           "%s: bad key-value count at offset 0x10: %" PRIu64
                           " exceeds the cap of %u",
                           r->name, *n_kv, GGUF_MAX_KV);
    uint64_t need = *n_tensors * GGUF_MIN_TENSOR_BYTES + *n_kv * GGUF_MIN_KV_BYTES;
    if (need > s_left(r))
        return stp_err_set(r->err, STP_EFORMAT,
                           "%s: bad counts at offset 0x8: %" PRIu64 " tensors and %" PRIu64
                           " key-values need at least %" PRIu64 " bytes, %zu left",
                           r->name, *n_tensors, *n_kv, need, s_left(r));
    return 0;
}

/* Reads one scalar of type t (not STRING/ARRAY) into kv's value union. */
static void s_scalar_store(gguf_kv *kv, uint32_t t, const uint8_t *p) {
    uint64_t raw = s_le(p, gguf_vtype_size(t));
    switch (t) {
    case GGUF_VT_INT8: kv->v.i64 = (int8_t)raw; break;
    case GGUF_VT_INT16: kv->v.i64 = (int16_t)raw; break;
    case GGUF_VT_INT32: kv->v.i64 = (int32_t)raw; break;
    case GGUF_VT_INT64: kv->v.i64 = (int64_t)raw; break;
    case GGUF_VT_FLOAT32: {
        uint32_t b = (uint32_t)raw;
        float x;
        memcpy(&x, &b, sizeof x);
        kv->v.f64 = x;
        break;
    }
    case GGUF_VT_FLOAT64: memcpy(&kv->v.f64, &raw, sizeof raw); break;
    default: kv->v.u64 = raw; break; /* unsigned, BOOL */
    }
}

static int s_parse_array(gguf_file *f, s_rd *r, gguf_kv *kv, const char *key) {
    size_t at = r->pos;
    uint64_t et, n;
    int rc = s_rd_uint(r, 4, &et, "array element type");
    if (rc) return rc;
    if (et == GGUF_VT_ARRAY)
        return stp_err_set(r->err, STP_EFORMAT,
                           "%s: key '%s' at offset 0x%zx: nested arrays are not supported", f->name,
                           key, at);
    if (et >= GGUF_VT_COUNT)
        return stp_err_set(r->err, STP_EFORMAT,
                           "%s: key '%s' at offset 0x%zx: unknown array element type %" PRIu64
                           " (expected 0..%d)",
                           f->name, key, at, et, GGUF_VT_COUNT - 1);
    if ((rc = s_rd_uint(r, 8, &n, "array length"))) return rc;
    kv->v.arr.type = (gguf_vtype)et;
    kv->v.arr.n = n;
    kv->v.arr.data = r->p + r->pos;
    kv->v.arr.strs = NULL;
    if (et != GGUF_VT_STRING) {
        size_t es = gguf_vtype_size((uint32_t)et);
        if (n > s_left(r) / es)
            return stp_err_set(r->err, STP_EFORMAT,
                               "%s: key '%s' at offset 0x%zx: array of %" PRIu64
                               " %s (%zu bytes each) runs past the end of the file, %zu bytes left",
                               f->name, key, at, n, s_vtype_name((uint32_t)et), es, s_left(r));
        if (et == GGUF_VT_BOOL) {
            for (uint64_t i = 0; i < n; i++)
                if (r->p[r->pos + i] > 1)
                    return stp_err_set(r->err, STP_EFORMAT,
                                       "%s: key '%s' at offset 0x%zx: bool element %" PRIu64
                                       " is %u, expected 0 or 1",
                                       f->name, key, r->pos + (size_t)i, i, r->p[r->pos + i]);
        }
        r->pos += (size_t)(n * es);
        return 0;
    }
    /* STRING array: each element needs at least its 8-byte length, which bounds the table. */
    if (n > s_left(r) / 8 || n > SIZE_MAX / sizeof(gguf_str))
        return stp_err_set(r->err, STP_EFORMAT,
                           "%s: key '%s' at offset 0x%zx: array of %" PRIu64
                           " strings needs at least 8 bytes per string, %zu left",
                           f->name, key, at, n, s_left(r));
    gguf_str *strs = malloc(n ? (size_t)n * sizeof *strs : 1);
    if (!strs)
        return stp_err_set(r->err, STP_ENOMEM, "%s: key '%s': no memory for %" PRIu64 " strings",
                           f->name, key, n);
    kv->v.arr.strs = strs; /* owned from here on: freed by gguf_close even on failure */
    for (uint64_t i = 0; i < n; i++) {
        size_t eat = r->pos;
        uint64_t len;
        if (s_left(r) < 8)
            return stp_err_set(r->err, STP_EFORMAT,
                               "%s: key '%s': truncated at offset 0x%zx: string %" PRIu64
                               " of %" PRIu64 " needs 8 bytes for its length, %zu left",
                               f->name, key, eat, i, n, s_left(r));
        len = s_le(r->p + r->pos, 8);
        r->pos += 8;
        if (len > GGUF_MAX_VAL_LEN || len > s_left(r))
            return stp_err_set(r->err, STP_EFORMAT,
                               "%s: key '%s': string %" PRIu64 " at offset 0x%zx: length %" PRIu64
                               " %s (%zu bytes left, cap %u)",
                               f->name, key, i, eat, len,
                               len > GGUF_MAX_VAL_LEN ? "exceeds the cap" : "runs past end of file",
                               s_left(r), GGUF_MAX_VAL_LEN);
        strs[i].ptr = (const char *)r->p + r->pos;
        strs[i].len = len;
        r->pos += (size_t)len;
    }
    return 0;
}

static int s_parse_kvs(gguf_file *f, s_rd *r, uint64_t n_kv) {
    f->kvs = calloc(n_kv ? n_kv : 1, sizeof *f->kvs);
    if (!f->kvs)
        return stp_err_set(r->err, STP_ENOMEM, "%s: no memory for %" PRIu64 " keys", f->name, n_kv);
    int rc = s_index_init(&f->kv_index, n_kv);
    if (rc) return stp_err_set(r->err, rc, "%s: no memory for the key index", f->name);
    for (uint64_t i = 0; i < n_kv; i++) {
        gguf_kv *kv = &f->kvs[i];
        char key[96];
        size_t at = r->pos;
        uint64_t t;
        kv->offset = at;
        if ((rc = s_rd_str(r, &kv->key, GGUF_MAX_KEY_LEN, "key"))) return rc;
        f->n_kv = i + 1; /* kv now counts for cleanup (its strs table, if any) */
        s_quote(kv->key, key, sizeof key);
        if (kv->key.len == 0)
            return stp_err_set(r->err, STP_EFORMAT, "%s: key %" PRIu64 " at offset 0x%zx is empty",
                               f->name, i, at);
        long dup = s_index_insert(&f->kv_index, f->kvs, sizeof *f->kvs, (uint32_t)i);
        if (dup >= 0)
            return stp_err_set(r->err, STP_EFORMAT,
                               "%s: duplicate key '%s' at offset 0x%zx (first at offset 0x%" PRIx64
                               ")",
                               f->name, key, at, f->kvs[dup].offset);
        size_t tat = r->pos;
        if ((rc = s_rd_uint(r, 4, &t, "value type"))) return rc;
        if (t >= GGUF_VT_COUNT)
            return stp_err_set(r->err, STP_EFORMAT,
                               "%s: key '%s' at offset 0x%zx: unknown value type %" PRIu64
                               " (expected 0..%d)",
                               f->name, key, tat, t, GGUF_VT_COUNT - 1);
        kv->type = (gguf_vtype)t;
        if (t == GGUF_VT_STRING) {
            char what[128];
            snprintf(what, sizeof what, "key '%s' string value", key);
            if ((rc = s_rd_str(r, &kv->v.str, GGUF_MAX_VAL_LEN, what))) return rc;
        } else if (t == GGUF_VT_ARRAY) {
            if ((rc = s_parse_array(f, r, kv, key))) return rc;
        } else {
            size_t n = gguf_vtype_size((uint32_t)t);
            if (s_left(r) < n)
                return stp_err_set(r->err, STP_EFORMAT,
                                   "%s: key '%s': truncated at offset 0x%zx: %s value needs %zu "
                                   "bytes, %zu left",
                                   f->name, key, r->pos, s_vtype_name((uint32_t)t), n, s_left(r));
            if (t == GGUF_VT_BOOL && r->p[r->pos] > 1)
                return stp_err_set(
                    r->err, STP_EFORMAT,
                    "%s: key '%s' at offset 0x%zx: bool value is %u, expected 0 or 1", f->name, key,
                    r->pos, r->p[r->pos]);
            s_scalar_store(kv, (uint32_t)t, r->p + r->pos);
            r->pos += n;
        }
    }
    return 0;
}

static int s_parse_alignment(gguf_file *f, stp_err *err) {
    f->alignment = GGUF_DEFAULT_ALIGNMENT;
    const gguf_kv *kv = gguf_kv_find(f, "general.alignment");
    if (!kv) return 0;
    if (kv->type != GGUF_VT_UINT32)
        return stp_err_set(err, STP_EFORMAT,
                           "%s: key 'general.alignment' at offset 0x%" PRIx64
                           ": type is %s, expected UINT32",
                           f->name, kv->offset, s_vtype_name(kv->type));
    if (kv->v.u64 == 0 || (kv->v.u64 & (kv->v.u64 - 1)))
        return stp_err_set(err, STP_EFORMAT,
                           "%s: key 'general.alignment' at offset 0x%" PRIx64 ": %" PRIu64
                           " is not a nonzero power of two",
                           f->name, kv->offset, kv->v.u64);
    f->alignment = kv->v.u64;
    return 0;
}

/* Reads the tensor infos; offsets are still relative to the data section afterwards. */
static int s_parse_tensor_infos(gguf_file *f, s_rd *r, uint64_t n_tensors) {
    f->tensors = calloc(n_tensors ? n_tensors : 1, sizeof *f->tensors);
    if (!f->tensors)
        return stp_err_set(r->err, STP_ENOMEM, "%s: no memory for %" PRIu64 " tensors", f->name,
                           n_tensors);
    int rc = s_index_init(&f->tensor_index, n_tensors);
    if (rc) return stp_err_set(r->err, rc, "%s: no memory for the tensor index", f->name);
    for (uint64_t i = 0; i < n_tensors; i++) {
        gguf_tensor *t = &f->tensors[i];
        char name[96];
        size_t at = r->pos;
        uint64_t v;
        if ((rc = s_rd_str(r, &t->name, GGUF_MAX_KEY_LEN, "tensor name"))) return rc;
        f->n_tensors = i + 1;
        s_quote(t->name, name, sizeof name);
        if (t->name.len == 0)
            return stp_err_set(r->err, STP_EFORMAT,
                               "%s: tensor %" PRIu64 " at offset 0x%zx has an empty name", f->name,
                               i, at);
        long dup = s_index_insert(&f->tensor_index, f->tensors, sizeof *f->tensors, (uint32_t)i);
        if (dup >= 0)
            return stp_err_set(r->err, STP_EFORMAT,
                               "%s: duplicate tensor '%s' at offset 0x%zx (tensor %" PRIu64
                               " has the same name as tensor %ld)",
                               f->name, name, at, i, dup);
        size_t dat = r->pos;
        if ((rc = s_rd_uint(r, 4, &v, "tensor n_dims"))) return rc;
        if (v < 1 || v > GGUF_MAX_DIMS)
            return stp_err_set(r->err, STP_EFORMAT,
                               "%s: tensor '%s' at offset 0x%zx: n_dims is %" PRIu64
                               ", expected 1..%d",
                               f->name, name, dat, v, GGUF_MAX_DIMS);
        t->n_dims = (uint32_t)v;
        /* nel is the element count; span multiplies the nonzero dims, so no product of
         * dims (rows = ne[1] * ne[2] * ne[3] included) can overflow even when ne[0] == 0 */
        int64_t nel = 1, span = 1;
        bool ovf = false;
        for (int d = 0; d < GGUF_MAX_DIMS; d++)
            t->ne[d] = 1;
        for (uint32_t d = 0; d < t->n_dims; d++) {
            size_t eat = r->pos;
            if ((rc = s_rd_uint(r, 8, &v, "tensor ne"))) return rc;
            t->ne[d] = (int64_t)v;
            if (t->ne[d] < 0)
                return stp_err_set(r->err, STP_EFORMAT,
                                   "%s: tensor '%s' at offset 0x%zx: ne[%u] = %" PRId64
                                   " is negative",
                                   f->name, name, eat, d, t->ne[d]);
            ovf = __builtin_mul_overflow(nel, t->ne[d], &nel) ||
                  __builtin_mul_overflow(span, t->ne[d] ? t->ne[d] : 1, &span);
            if (ovf)
                return stp_err_set(r->err, STP_EFORMAT,
                                   "%s: tensor '%s' at offset 0x%zx: element count overflows "
                                   "int64 at ne[%u] = %" PRId64,
                                   f->name, name, eat, d, t->ne[d]);
        }
        size_t tat = r->pos;
        if ((rc = s_rd_uint(r, 4, &v, "tensor type"))) return rc;
        const stp_type_info *ti = tensor_type_info((uint32_t)v);
        if (!ti)
            return stp_err_set(r->err, STP_EFORMAT,
                               "%s: tensor '%s' at offset 0x%zx: unknown tensor type id %" PRIu64,
                               f->name, name, tat, v);
        t->type = (stp_type)v;
        if (t->ne[0] % ti->blck)
            return stp_err_set(r->err, STP_EFORMAT,
                               "%s: tensor '%s' at offset 0x%zx: ne[0] = %" PRId64
                               " is not a multiple of the %s block size %u",
                               f->name, name, tat, t->ne[0], ti->name, ti->blck);
        /* nbytes = rows * row bytes, in uint64 with overflow checks */
        uint64_t nb = 0;
        ovf = __builtin_mul_overflow((uint64_t)(t->ne[0] / ti->blck), (uint64_t)ti->size, &nb);
        for (int d = 1; d < GGUF_MAX_DIMS && !ovf; d++)
            ovf = __builtin_mul_overflow(nb, (uint64_t)t->ne[d], &nb);
        if (ovf || nb > SIZE_MAX)
            return stp_err_set(r->err, STP_EFORMAT,
                               "%s: tensor '%s' at offset 0x%zx: byte size of %" PRId64
                               " %s elements overflows 64 bits",
                               f->name, name, tat, nel, ti->name);
        t->nbytes = nb;
        size_t oat = r->pos;
        if ((rc = s_rd_uint(r, 8, &t->offset, "tensor offset"))) return rc;
        if (t->offset % f->alignment)
            return stp_err_set(r->err, STP_EFORMAT,
                               "%s: tensor '%s' at offset 0x%zx: data offset %" PRIu64
                               " is not a multiple of the alignment %" PRIu64,
                               f->name, name, oat, t->offset, f->alignment);
    }
    return 0;
}

static int s_cmp_offset(const void *a, const void *b) {
    const gguf_tensor *x = *(const gguf_tensor *const *)a, *y = *(const gguf_tensor *const *)b;
    if (x->offset != y->offset) return x->offset < y->offset ? -1 : 1;
    return x->nbytes < y->nbytes ? -1 : x->nbytes > y->nbytes;
}

/* Places the data section and checks every tensor's range is in the file and overlaps no other. */
static int s_place_tensors(gguf_file *f, size_t header_end, stp_err *err) {
    uint64_t pad = (f->alignment - header_end % f->alignment) % f->alignment;
    f->data_offset = header_end + pad;
    if (f->n_tensors == 0) return 0; /* vocab-only files may end right after the header */
    if (f->data_offset > f->size)
        return stp_err_set(err, STP_EFORMAT,
                           "%s: truncated at offset 0x%zx: the data section should start at "
                           "offset 0x%" PRIx64 " (header end padded to %" PRIu64
                           "), file has %zu bytes",
                           f->name, header_end, f->data_offset, f->alignment, f->size);
    uint64_t avail = f->size - f->data_offset;
    for (size_t i = 0; i < f->n_tensors; i++) {
        gguf_tensor *t = &f->tensors[i];
        char name[96];
        if (t->offset > avail || t->nbytes > avail - t->offset)
            return stp_err_set(err, STP_EFORMAT,
                               "%s: tensor '%s' at offset 0x%" PRIx64 ": data needs %" PRIu64
                               " bytes, %" PRIu64 " left",
                               f->name, s_quote(t->name, name, sizeof name),
                               f->data_offset + t->offset, t->nbytes,
                               t->offset > avail ? 0 : avail - t->offset);
        t->offset += f->data_offset;
        t->data = f->base + t->offset;
    }
    const gguf_tensor **order = malloc(f->n_tensors * sizeof *order);
    if (!order) return stp_err_set(err, STP_ENOMEM, "%s: no memory to sort tensors", f->name);
    for (size_t i = 0; i < f->n_tensors; i++)
        order[i] = &f->tensors[i];
    qsort(order, f->n_tensors, sizeof *order, s_cmp_offset);
    const gguf_tensor *prev = NULL;
    int rc = 0;
    for (size_t i = 0; i < f->n_tensors && !rc; i++) {
        const gguf_tensor *t = order[i];
        if (t->nbytes == 0) continue;
        if (prev && t->offset < prev->offset + prev->nbytes) {
            char a[96], b[96];
            rc = stp_err_set(err, STP_EFORMAT,
                             "%s: tensor '%s' at offset 0x%" PRIx64 " overlaps tensor '%s' at "
                             "offset 0x%" PRIx64 " (which ends at 0x%" PRIx64 ")",
                             f->name, s_quote(t->name, a, sizeof a), t->offset,
                             s_quote(prev->name, b, sizeof b), prev->offset,
                             prev->offset + prev->nbytes);
        }
        prev = t;
    }
    free(order);
    return rc;
}

static int s_parse(gguf_file *f, stp_err *err) {
    s_rd r = {.p = f->base, .size = f->size, .pos = 0, .name = f->name, .err = err};
    uint64_t n_tensors = 0, n_kv = 0;
    int rc = s_parse_header(f, &r, &n_tensors, &n_kv);
    if (!rc) rc = s_parse_kvs(f, &r, n_kv);
    if (!rc) rc = s_parse_alignment(f, err);
    if (!rc) rc = s_parse_tensor_infos(f, &r, n_tensors);
    if (!rc) rc = s_place_tensors(f, r.pos, err);
    return rc;
}

// ------------------------------------------------------------------------------------------------
// Lifecycle

static int s_new(gguf_file **out, const char *name, stp_err *err) {
    gguf_file *f = calloc(1, sizeof *f);
    if (f) f->name = strdup(name ? name : "<memory>");
    if (!f || !f->name) {
        free(f);
        return stp_err_set(err, STP_ENOMEM, "%s: no memory", name ? name : "<memory>");
    }
    *out = f;
    return 0;
}

int gguf_open_memory(gguf_file **out, const void *data, size_t size, const char *name,
                     stp_err *err) {
    if (!out) return stp_err_set(err, STP_EINVAL, "gguf_open_memory: out is NULL");
    *out = NULL;
    if (!data && size)
        return stp_err_set(err, STP_EINVAL, "%s: gguf_open_memory: data is NULL",
                           name ? name : "<memory>");
    gguf_file *f;
    int rc = s_new(&f, name, err);
    if (rc) return rc;
    f->base = data ? data : (const uint8_t *)"";
    f->size = size;
    if ((rc = s_parse(f, err))) {
        gguf_close(&f);
        return rc;
    }
    *out = f;
    return 0;
}

int gguf_open(gguf_file **out, const char *path, stp_err *err) {
    if (!out || !path) return stp_err_set(err, STP_EINVAL, "gguf_open: NULL argument");
    *out = NULL;
    gguf_file *f;
    int rc = s_new(&f, path, err);
    if (rc) return rc;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    struct stat st;
    if (fd < 0) {
        rc = -errno;
        stp_err_set(err, rc, "%s: cannot open: %s", path, strerror(-rc));
        goto fail;
    }
    if (fstat(fd, &st) != 0) {
        rc = -errno;
        stp_err_set(err, rc, "%s: cannot stat: %s", path, strerror(-rc));
        goto fail;
    }
    if (!S_ISREG(st.st_mode)) {
        rc = stp_err_set(err, STP_EFORMAT, "%s: not a regular file", path);
        goto fail;
    }
    if (st.st_size < (off_t)GGUF_HEADER_SIZE) {
        rc = stp_err_set(err, STP_EFORMAT,
                         "%s: truncated at offset 0x0: the GGUF header needs %u bytes, file has "
                         "%lld",
                         path, GGUF_HEADER_SIZE, (long long)st.st_size);
        goto fail;
    }
    if ((uint64_t)st.st_size > SIZE_MAX) {
        rc = stp_err_set(err, STP_EIO, "%s: file too large to map", path);
        goto fail;
    }
    f->size = (size_t)st.st_size;
    void *m = mmap(NULL, f->size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (m == MAP_FAILED) {
        rc = -errno;
        stp_err_set(err, rc, "%s: mmap of %zu bytes failed: %s", path, f->size, strerror(-rc));
        goto fail;
    }
    close(fd);
    fd = -1;
    f->map = m;
    f->base = m;
    if ((rc = s_parse(f, err))) goto fail;
    *out = f;
    return 0;
fail:
    if (fd >= 0) close(fd);
    gguf_close(&f);
    return rc;
}

void gguf_close(gguf_file **self_p) {
    if (!self_p || !*self_p) return;
    gguf_file *f = *self_p;
    for (size_t i = 0; f->kvs && i < f->n_kv; i++)
        if (f->kvs[i].type == GGUF_VT_ARRAY) free((void *)f->kvs[i].v.arr.strs);
    free(f->kvs);
    free(f->tensors);
    free(f->kv_index.slots);
    free(f->tensor_index.slots);
    if (f->map) munmap(f->map, f->size);
    free(f->name);
    free(f);
    *self_p = NULL;
}

// ------------------------------------------------------------------------------------------------
// Accessors

uint32_t gguf_version(const gguf_file *f) {
    return f->version;
}
const char *gguf_path(const gguf_file *f) {
    return f->name;
}
size_t gguf_file_size(const gguf_file *f) {
    return f->size;
}
uint64_t gguf_alignment(const gguf_file *f) {
    return f->alignment;
}
uint64_t gguf_data_offset(const gguf_file *f) {
    return f->data_offset;
}
const void *gguf_base(const gguf_file *f) {
    return f->base;
}
size_t gguf_kv_count(const gguf_file *f) {
    return f->n_kv;
}
const gguf_kv *gguf_kv_at(const gguf_file *f, size_t i) {
    return i < f->n_kv ? &f->kvs[i] : NULL;
}
size_t gguf_tensor_count(const gguf_file *f) {
    return f->n_tensors;
}
const gguf_tensor *gguf_tensor_at(const gguf_file *f, size_t i) {
    return i < f->n_tensors ? &f->tensors[i] : NULL;
}

const gguf_kv *gguf_kv_find(const gguf_file *f, const char *key) {
    if (!f || !key) return NULL;
    long i = s_index_find(&f->kv_index, f->kvs, sizeof *f->kvs, key, strlen(key));
    return i < 0 ? NULL : &f->kvs[i];
}

const gguf_tensor *gguf_tensor_find(const gguf_file *f, const char *name) {
    if (!f || !name) return NULL;
    long i = s_index_find(&f->tensor_index, f->tensors, sizeof *f->tensors, name, strlen(name));
    return i < 0 ? NULL : &f->tensors[i];
}

bool gguf_str_eq(gguf_str s, const char *cstr) {
    if (!cstr) return false;
    if (s.len >= SIZE_MAX) return false;
    return strnlen(cstr, (size_t)s.len + 1) == s.len && memcmp(s.ptr, cstr, (size_t)s.len) == 0;
}

// ------------------------------------------------------------------------------------------------
// Typed getters

static bool s_is_unsigned(gguf_vtype t) {
    return t == GGUF_VT_UINT8 || t == GGUF_VT_UINT16 || t == GGUF_VT_UINT32 || t == GGUF_VT_UINT64;
}
static bool s_is_signed(gguf_vtype t) {
    return t == GGUF_VT_INT8 || t == GGUF_VT_INT16 || t == GGUF_VT_INT32 || t == GGUF_VT_INT64;
}

/* Finds key; STP_EINVAL (err untouched) when absent or f/key NULL. */
static int s_get(const gguf_file *f, const char *key, const gguf_kv **kv) {
    *kv = gguf_kv_find(f, key);
    return *kv ? 0 : STP_EINVAL;
}

static int s_mismatch(const gguf_file *f, const gguf_kv *kv, const char *key, const char *want,
                      stp_err *err) {
    return stp_err_set(err, STP_EFORMAT,
                       "%s: key '%s' at offset 0x%" PRIx64 ": type is %s, expected %s", f->name,
                       key, kv->offset, s_vtype_name(kv->type), want);
}

static int s_get_uint(const gguf_file *f, const char *key, uint64_t max, const char *want,
                      uint64_t *out, stp_err *err) {
    const gguf_kv *kv;
    if (s_get(f, key, &kv)) return STP_EINVAL;
    uint64_t v;
    if (s_is_unsigned(kv->type)) {
        v = kv->v.u64;
    } else if (s_is_signed(kv->type)) {
        if (kv->v.i64 < 0)
            return stp_err_set(err, STP_EFORMAT,
                               "%s: key '%s' at offset 0x%" PRIx64 ": value %" PRId64
                               " is negative, expected %s",
                               f->name, key, kv->offset, kv->v.i64, want);
        v = (uint64_t)kv->v.i64;
    } else {
        return s_mismatch(f, kv, key, want, err);
    }
    if (v > max)
        return stp_err_set(err, STP_EFORMAT,
                           "%s: key '%s' at offset 0x%" PRIx64 ": value %" PRIu64
                           " does not fit %s (max %" PRIu64 ")",
                           f->name, key, kv->offset, v, want, max);
    *out = v;
    return 0;
}

int gguf_get_u64(const gguf_file *f, const char *key, uint64_t *out, stp_err *err) {
    return s_get_uint(f, key, UINT64_MAX, "an unsigned 64-bit integer", out, err);
}

int gguf_get_u32(const gguf_file *f, const char *key, uint32_t *out, stp_err *err) {
    uint64_t v;
    int rc = s_get_uint(f, key, UINT32_MAX, "an unsigned 32-bit integer", &v, err);
    if (!rc) *out = (uint32_t)v;
    return rc;
}

int gguf_get_i64(const gguf_file *f, const char *key, int64_t *out, stp_err *err) {
    const gguf_kv *kv;
    if (s_get(f, key, &kv)) return STP_EINVAL;
    if (s_is_signed(kv->type)) {
        *out = kv->v.i64;
        return 0;
    }
    if (!s_is_unsigned(kv->type)) return s_mismatch(f, kv, key, "a signed 64-bit integer", err);
    if (kv->v.u64 > INT64_MAX)
        return stp_err_set(err, STP_EFORMAT,
                           "%s: key '%s' at offset 0x%" PRIx64 ": value %" PRIu64
                           " does not fit int64",
                           f->name, key, kv->offset, kv->v.u64);
    *out = (int64_t)kv->v.u64;
    return 0;
}

int gguf_get_f32(const gguf_file *f, const char *key, float *out, stp_err *err) {
    const gguf_kv *kv;
    if (s_get(f, key, &kv)) return STP_EINVAL;
    if (kv->type != GGUF_VT_FLOAT32 && kv->type != GGUF_VT_FLOAT64)
        return s_mismatch(f, kv, key, "FLOAT32 or FLOAT64", err);
    *out = (float)kv->v.f64;
    return 0;
}

int gguf_get_bool(const gguf_file *f, const char *key, bool *out, stp_err *err) {
    const gguf_kv *kv;
    if (s_get(f, key, &kv)) return STP_EINVAL;
    if (kv->type != GGUF_VT_BOOL) return s_mismatch(f, kv, key, "BOOL", err);
    *out = kv->v.u64 != 0;
    return 0;
}

int gguf_get_str(const gguf_file *f, const char *key, gguf_str *out, stp_err *err) {
    const gguf_kv *kv;
    if (s_get(f, key, &kv)) return STP_EINVAL;
    if (kv->type != GGUF_VT_STRING) return s_mismatch(f, kv, key, "STRING", err);
    *out = kv->v.str;
    return 0;
}

int gguf_get_cstr(const gguf_file *f, const char *key, char *buf, size_t cap, stp_err *err) {
    gguf_str s = {NULL, 0};
    int rc = gguf_get_str(f, key, &s, err);
    if (rc) return rc;
    if (!buf || cap == 0)
        return stp_err_set(err, STP_EINVAL, "%s: key '%s': gguf_get_cstr needs a buffer", f->name,
                           key);
    size_t n = s.len < cap - 1 ? (size_t)s.len : cap - 1;
    memcpy(buf, s.ptr, n);
    buf[n] = 0;
    return 0;
}

int gguf_get_arr(const gguf_file *f, const char *key, gguf_vtype elem, const gguf_kv **out,
                 stp_err *err) {
    const gguf_kv *kv;
    if (s_get(f, key, &kv)) return STP_EINVAL;
    if (kv->type != GGUF_VT_ARRAY) {
        char want[48];
        snprintf(want, sizeof want, "ARRAY of %s", s_vtype_name(elem));
        return s_mismatch(f, kv, key, want, err);
    }
    if (kv->v.arr.type != elem)
        return stp_err_set(
            err, STP_EFORMAT,
            "%s: key '%s' at offset 0x%" PRIx64 ": array elements are %s, expected %s", f->name,
            key, kv->offset, s_vtype_name(kv->v.arr.type), s_vtype_name(elem));
    *out = kv;
    return 0;
}
