/* shm: POSIX shared-memory segments of a pipeline run, and the two layouts they hold.
 *
 * The weight pool (created by the storage daemon, mapped read-only by expert workers): a header,
 * a slot table [layer][expert] and the slots' bytes. A slot holds one expert's gate | up | down
 * matrices, each 4 KiB aligned (down neuron-major when the header has POOL_DOWN_T, gate
 * row-interleaved q4_0x16 when it has POOL_GATE_X16). A slot is
 * readable while its state is POOL_READY and its generation equals the one the daemon announced; a
 * streaming daemon (issue 6) bumps the generation before reusing a slot's bytes.
 *
 * The activation region (created by the attention worker, mapped by expert workers and the
 * coordinator): h (n_ubatch x n_embd) normed FFN input, sel/w (n_ubatch x n_used) selection,
 * y (n_ubatch x n_used x n_embd) one expert output per (token, k) slot, logits (n_vocab), and
 * the lanes (one pair of message rings per expert worker, common/msg/lane.h). Writers and
 * readers hand over with lane or zmq messages (a release store or a syscall), which order the
 * accesses.
 *
 * Segments are created 0600 with O_EXCL (a stale one of a crashed run is replaced) and unlinked
 * by their creator on close. */
#ifndef STP_SHM_H
#define STP_SHM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdatomic.h>
#include <stdint.h>

#include "util/stp_err.h"

typedef struct shm_region {
    char name[160];
    uint8_t *base;
    size_t size;
    bool owner;   /* created here: unlinked by shm_region_close */
    uint64_t ino; /* inode of the mapped segment (shm_region_current) */
} shm_region;

int shm_region_create(shm_region *r, const char *name, size_t size, stp_err *err);
/* Maps an existing segment (whole size); read-only unless writable. */
int shm_region_open(shm_region *r, const char *name, bool writable, stp_err *err);
void shm_region_close(shm_region *r);
/* Whether the segment under r's name is still the one mapped (not unlinked and recreated by a
 * restarted creator). One stat(2). */
bool shm_region_current(const shm_region *r);

/* ---- weight pool ---- */
#define POOL_MAGIC 0x4c4f4f50u /* "POOL" */
#define POOL_VERSION 3u
#define POOL_DOWN_T 1u /* flags: down parts are down_t images (common/model/down_t.h) */
/* flags: gate parts are q4_0x16 images (kern_q4_0x16_pack of the GGUF rows; same size), set
 * when every layer's gate is Q4_0 with n_ff_exp % 16 == 0; up stays in GGUF rows */
#define POOL_GATE_X16 2u
/* flags: every expert has its own slot and is READY (no budget, or one large enough): nothing
 * is ever evicted, so router decisions carry no information for the daemon */
#define POOL_COMPLETE 4u
#define POOL_ALIGN 4096u

enum { POOL_EMPTY = 0, POOL_LOADING = 1, POOL_READY = 2 };

typedef struct pool_slot {
    uint64_t offset;     /* from the pool base */
    uint64_t bytes;      /* gate + up + down */
    uint64_t generation; /* changes whenever the bytes are replaced */
    uint32_t state;      /* POOL_* */
    uint32_t pad;
} pool_slot;

typedef struct pool_header {
    uint32_t magic, version;
    uint32_t n_layer, n_expert;
    uint64_t size;        /* whole segment */
    uint64_t data_offset; /* first slot byte */
    uint64_t flags;       /* POOL_DOWN_T | POOL_GATE_X16 | POOL_COMPLETE */
    /* bumped, then futex-woken, after slots become READY: the attention worker sleeps on it
     * while a layer's experts are being read and dispatches each as it lands */
    _Atomic uint32_t landed;
    uint32_t pad;
    pool_slot slots[]; /* [layer * n_expert + expert] */
} pool_header;

/* Bytes of header + table, rounded to POOL_ALIGN. */
size_t pool_table_bytes(int n_layer, int n_expert);
/* Where gate, up and down start inside a slot (POOL_ALIGN aligned, as in the expert layout
 * file, so one O_DIRECT read fills a slot) and the slot's size. down_bytes is the down_t image
 * size when the pool has POOL_DOWN_T. */
void pool_slot_parts(size_t gate_bytes, size_t up_bytes, size_t down_bytes, size_t off[3],
                     size_t *total);
/* Checks magic, version, dims and that every slot lies inside the segment. */
int pool_check(const shm_region *r, int n_layer, int n_expert, stp_err *err);

/* ---- activation region ---- */
#define ACT_MAGIC 0x54434153u /* "SACT" */
#define ACT_VERSION 4u

typedef struct act_header {
    uint32_t magic, version;
    uint32_t n_ubatch, n_embd, n_used, n_vocab;
    uint32_t n_logits; /* rows of n_vocab logits: one per sequence slot (--parallel) */
    uint32_t reserved;
    uint64_t off_h, off_sel, off_w, off_y, off_logits;
    uint64_t off_lanes; /* lane_block (common/msg/lane.h): the expert workers' rings */
    uint64_t size;
    uint64_t epoch; /* set by the creator; messages name it so readers detect a new region */
} act_header;

/* Fills the layout (offsets 64-byte aligned) for the given dimensions; n_logits rows of logits
 * (the attention worker's sequence slots: row s holds slot s's last logits). */
void act_layout(act_header *h, int n_ubatch, int n_embd, int n_used, int n_vocab, int n_logits);
/* Checks the region's header against the reader's model dimensions (epoch not compared). */
int act_check(const shm_region *r, int n_embd, int n_used, int n_vocab, stp_err *err);

#endif
