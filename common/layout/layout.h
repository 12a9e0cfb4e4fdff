/* layout: the expert layout file, a copy of every (layer, expert, matrix) of a model's routed
 * experts laid out for streaming: built once in a cache directory (or next to the model with
 * --layout-dir) and reused.
 *
 * Why: the storage daemon reads experts with O_DIRECT, which needs 4 KiB-aligned offsets and
 * lengths; in the GGUF an expert's matrices are neither aligned nor adjacent. Here one expert is
 * one contiguous record  [gate | pad][up | pad][down | pad], every part 4 KiB aligned, so one
 * read fills one pool slot (the pool uses the same part offsets: pool_slot_parts). `up` keeps
 * the GGUF row layout (the sparse product reads active rows); a Q4_0 `down` is stored
 * neuron-major (common/model/down_t.h: down_t_build_expert), the layout the expert workers'
 * sparse product reads, so one neuron's weights are contiguous; a Q4_0 `gate` is stored as its
 * row-interleaved q4_0x16 image (kern_q4_0x16_pack), the layout of the dense gate product. So
 * neither the storage daemon nor a worker converts anything after a read.
 *
 * File: a 4 KiB header (magic, version, flags, dims, model file size + mtime, a hash of the
 * expert tensor infos, offsets, file size, checksum), then the entry table
 * [layer][expert][matrix] of (offset, bytes), then the records. A file is trusted only if the
 * magic, version, flags, dims, model size/mtime/hash, file size and the checksum of header and
 * table all match; otherwise layout_ensure rebuilds it (written to a temporary name, renamed
 * when complete, so a crash never leaves a half file under the real name). */
#ifndef STP_LAYOUT_H
#define STP_LAYOUT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "model/model.h"
#include "util/stp_err.h"

#define LAYOUT_MAGIC 0x5459414c50545353ull /* "SSTPLAYT" */
#define LAYOUT_VERSION 2u                  /* 2: down_t keeps fp16 scales */
#define LAYOUT_ALIGN 4096u
#define LAYOUT_DOWN_T 1u   /* flag: down stored as down_t images */
#define LAYOUT_GATE_X16 2u /* flag: gate stored as q4_0x16 images */

enum { LAYOUT_GATE = 0, LAYOUT_UP = 1, LAYOUT_DOWN = 2 };

typedef struct layout_entry {
    uint64_t off;   /* file offset, LAYOUT_ALIGN aligned */
    uint64_t bytes; /* matrix bytes (without padding) */
} layout_entry;

typedef struct layout_header {
    uint64_t magic;
    uint32_t version, flags;
    uint32_t n_layer, n_expert;
    uint64_t model_size, model_mtime_ns, tensor_hash;
    uint64_t table_offset, data_offset, file_size;
    uint64_t checksum; /* FNV-1a 64 of this header (checksum = 0) and the table */
} layout_header;

typedef struct layout {
    char path[4096];
    layout_header h;
    layout_entry *e; /* [(layer * n_expert + expert) * 3 + matrix] */
} layout;

/* Where the layout of model_path lives: DIR/<model base name>.<hash of its real path>
 * .stpipe-layout, DIR = dir if given (e.g. the model's own directory), else
 * $XDG_CACHE_HOME/stpipe or ~/.cache/stpipe (created). */
int layout_path(char *out, size_t cap, const char *model_path, const char *dir, stp_err *err);
/* Whether a layout for this machine stores down as down_t (Q4_0 down everywhere and SIMD
 * kernels available). */
bool layout_wants_down_t(const model *m);
/* The LAYOUT_* flags a layout of this model is built with here: LAYOUT_DOWN_T as above,
 * LAYOUT_GATE_X16 when every layer's gate is Q4_0 and packable. */
uint32_t layout_wants_flags(const model *m);
/* Opens and validates an existing file; STP_EFORMAT (reason in err) if it is missing, stale,
 * truncated or corrupt. */
int layout_open(layout **out, const model *m, const char *model_path, const char *path,
                uint32_t flags, stp_err *err);
/* Builds path from the model (progress to `progress` if not NULL: a bar on a tty, a few lines
 * otherwise). */
int layout_build(const model *m, const char *model_path, const char *path, uint32_t flags,
                 FILE *progress, stp_err *err);
/* layout_open, and layout_build + layout_open when the file is not trustworthy. *rebuilt says
 * whether it was (re)built. */
int layout_ensure(layout **out, const model *m, const char *model_path, const char *path,
                  uint32_t flags, FILE *progress, bool *rebuilt, stp_err *err);
void layout_close(layout **self_p);

/* The record of (layer, expert): file offset of its gate and its span (4 KiB multiple). */
uint64_t layout_record_off(const layout *l, int layer, int expert);
uint64_t layout_record_bytes(const layout *l, int layer, int expert);
/* The bytes of each matrix of a layer's experts as stored (down: down_t size if flagged; a
 * q4_0x16 gate image has the GGUF rows' size). */
void layout_matrix_bytes(const model *m, int layer, uint32_t flags, size_t bytes[3]);
/* The largest record a layout of m with these flags holds (= the largest layout_record_bytes
 * of the built file: one pool frame), computed without building or opening it. */
uint64_t layout_frame_bytes(const model *m, uint32_t flags);

#endif
