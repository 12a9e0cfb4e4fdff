/* gguf: a reader for GGUF v2/v3 files (mmap, validated) and a streaming writer.
 *
 * The reader trusts nothing in the file: magic, version, counts, string and array lengths,
 * tensor dims and types, offsets and alignment are all checked against the file size before
 * anything is handed out, and every error names the file, what is wrong and the byte offset.
 * After gguf_open succeeds every pointer it hands out lies inside the mapping.
 * The writer streams: metadata and tensor infos first, then tensor data appended one tensor
 * at a time, so a model larger than RAM can be written. See common/gguf/README.md. */
#ifndef STP_GGUF_H
#define STP_GGUF_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "gguf/tensor_type.h"
#include "util/stp_err.h"

#define GGUF_MAGIC 0x46554747u /* "GGUF" little-endian */
#define GGUF_DEFAULT_ALIGNMENT 32
#define GGUF_MAX_DIMS 4

typedef enum gguf_vtype {
    GGUF_VT_UINT8 = 0,
    GGUF_VT_INT8 = 1,
    GGUF_VT_UINT16 = 2,
    GGUF_VT_INT16 = 3,
    GGUF_VT_UINT32 = 4,
    GGUF_VT_INT32 = 5,
    GGUF_VT_FLOAT32 = 6,
    GGUF_VT_BOOL = 7,
    GGUF_VT_STRING = 8,
    GGUF_VT_ARRAY = 9,
    GGUF_VT_UINT64 = 10,
    GGUF_VT_INT64 = 11,
    GGUF_VT_FLOAT64 = 12,
    GGUF_VT_COUNT
} gguf_vtype;

/* A string inside the mapping: not NUL-terminated. */
typedef struct gguf_str {
    const char *ptr;
    uint64_t len;
} gguf_str;

typedef struct gguf_kv {
    gguf_str key;
    gguf_vtype type;
    uint64_t offset; /* byte offset of the key in the file (for error messages) */
    union {
        uint64_t u64; /* UINT8..UINT64, BOOL (0/1) */
        int64_t i64;  /* INT8..INT64 */
        double f64;   /* FLOAT32, FLOAT64 */
        gguf_str str; /* STRING */
        struct {
            gguf_vtype type;      /* element type (never ARRAY: nested arrays are refused) */
            uint64_t n;           /* element count */
            const void *data;     /* first element in the mapping (for numeric arrays) */
            const gguf_str *strs; /* for STRING arrays: n decoded strings (owned by the file) */
        } arr;
    } v;
} gguf_kv;

typedef struct gguf_tensor {
    gguf_str name;
    uint32_t n_dims;
    int64_t ne[GGUF_MAX_DIMS]; /* ne[0] is contiguous; unused dims are 1 */
    stp_type type;
    uint64_t offset; /* absolute byte offset of the data in the file */
    uint64_t nbytes;
    const void *data; /* inside the mapping */
} gguf_tensor;

typedef struct gguf_file gguf_file;

/* Maps and validates path. On failure *out is NULL and err says file, problem and offset. */
int gguf_open(gguf_file **out, const char *path, stp_err *err);
/* Validates an in-memory image (not copied; must outlive the handle). name is used in errors. */
int gguf_open_memory(gguf_file **out, const void *data, size_t size, const char *name,
                     stp_err *err);
void gguf_close(gguf_file **self_p);

uint32_t gguf_version(const gguf_file *f);
const char *gguf_path(const gguf_file *f);
size_t gguf_file_size(const gguf_file *f);
uint64_t gguf_alignment(const gguf_file *f);
uint64_t gguf_data_offset(const gguf_file *f); /* start of the tensor data section */
const void *gguf_base(const gguf_file *f);     /* start of the mapping */

size_t gguf_kv_count(const gguf_file *f);
const gguf_kv *gguf_kv_at(const gguf_file *f, size_t i);
const gguf_kv *gguf_kv_find(const gguf_file *f, const char *key); /* NULL if absent */

/* Typed getters: 0 on success, STP_ERANGE-free conversions between integer widths are allowed
 * when the value fits; STP_EFORMAT (with a message naming the key) on a type mismatch;
 * -ENOENT-like STP_EINVAL when absent (err untouched when absent so callers can default). */
int gguf_get_u64(const gguf_file *f, const char *key, uint64_t *out, stp_err *err);
int gguf_get_u32(const gguf_file *f, const char *key, uint32_t *out, stp_err *err);
int gguf_get_i64(const gguf_file *f, const char *key, int64_t *out, stp_err *err);
int gguf_get_f32(const gguf_file *f, const char *key, float *out, stp_err *err);
int gguf_get_bool(const gguf_file *f, const char *key, bool *out, stp_err *err);
int gguf_get_str(const gguf_file *f, const char *key, gguf_str *out, stp_err *err);
/* Copies a string value into buf (NUL-terminated, truncated to cap-1). */
int gguf_get_cstr(const gguf_file *f, const char *key, char *buf, size_t cap, stp_err *err);
/* Array of the given element type; *out receives the kv. */
int gguf_get_arr(const gguf_file *f, const char *key, gguf_vtype elem, const gguf_kv **out,
                 stp_err *err);
bool gguf_str_eq(gguf_str s, const char *cstr);
/* Bytes of one scalar of value type t; 0 for STRING, ARRAY and unknown types. */
size_t gguf_vtype_size(uint32_t t);

size_t gguf_tensor_count(const gguf_file *f);
const gguf_tensor *gguf_tensor_at(const gguf_file *f, size_t i);
const gguf_tensor *gguf_tensor_find(const gguf_file *f, const char *name); /* NULL if absent */

/* ---- writer ------------------------------------------------------------------------------ */

typedef struct gguf_writer gguf_writer;

int gguf_writer_new(gguf_writer **out, const char *path, stp_err *err);
void gguf_writer_destroy(gguf_writer **self_p); /* also removes the file if not finished */

/* Metadata (in call order). */
int gguf_writer_kv_u32(gguf_writer *w, const char *key, uint32_t v);
int gguf_writer_kv_i32(gguf_writer *w, const char *key, int32_t v);
int gguf_writer_kv_u64(gguf_writer *w, const char *key, uint64_t v);
int gguf_writer_kv_f32(gguf_writer *w, const char *key, float v);
int gguf_writer_kv_bool(gguf_writer *w, const char *key, bool v);
int gguf_writer_kv_str(gguf_writer *w, const char *key, const char *v);
int gguf_writer_kv_arr(gguf_writer *w, const char *key, gguf_vtype elem, const void *data,
                       uint64_t n); /* numeric arrays */
int gguf_writer_kv_arr_str(gguf_writer *w, const char *key, const char *const *strs, uint64_t n);

/* Declare every tensor (name, type, ne) before writing any data. */
int gguf_writer_add_tensor(gguf_writer *w, const char *name, stp_type type, uint32_t n_dims,
                           const int64_t *ne);
/* Writes the header; then tensor data in declaration order, possibly in several chunks each. */
int gguf_writer_begin_data(gguf_writer *w, stp_err *err);
int gguf_writer_write(gguf_writer *w, const void *data, size_t n, stp_err *err);
/* Pads, checks every declared tensor got exactly its bytes, fsyncs and closes. */
int gguf_writer_finish(gguf_writer *w, stp_err *err);

#endif
