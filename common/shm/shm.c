/* shm: shared-memory segments, weight pool and activation region layouts; see shm.h. */
#include "shm/shm.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "msg/lane.h"
#include "util/arena.h"

int shm_region_create(shm_region *r, const char *name, size_t size, stp_err *err) {
    memset(r, 0, sizeof *r);
    snprintf(r->name, sizeof r->name, "%s", name);
    int fd = shm_open(name, O_RDWR | O_CREAT | O_EXCL, 0600);
    if (fd < 0 && errno == EEXIST) { /* left by a crashed run of the same directory */
        shm_unlink(name);
        fd = shm_open(name, O_RDWR | O_CREAT | O_EXCL, 0600);
    }
    if (fd < 0) return stp_err_set(err, STP_EIO, "shm_open %s: %s", name, strerror(errno));
    fchmod(fd, 0600); /* umask may have removed bits, never added: make it exact */
    if (ftruncate(fd, (off_t)size)) {
        int e = errno;
        close(fd);
        shm_unlink(name);
        return stp_err_set(err, STP_EIO, "shm %s: cannot size to %zu bytes: %s", name, size,
                           strerror(e));
    }
    struct stat st;
    r->ino = fstat(fd, &st) ? 0 : (uint64_t)st.st_ino;
    void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (p == MAP_FAILED) {
        shm_unlink(name);
        return stp_err_set(err, STP_EIO, "mmap %s (%zu bytes): %s", name, size, strerror(errno));
    }
    arena_advise(p, size); /* 2 MiB pages where the mount allows them (util/arena.h) */
    r->base = p;
    r->size = size;
    r->owner = true;
    return 0;
}

int shm_region_open(shm_region *r, const char *name, bool writable, stp_err *err) {
    memset(r, 0, sizeof *r);
    snprintf(r->name, sizeof r->name, "%s", name);
    int fd = shm_open(name, writable ? O_RDWR : O_RDONLY, 0);
    if (fd < 0) return stp_err_set(err, STP_EIO, "shm_open %s: %s", name, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) || st.st_size <= 0) {
        close(fd);
        return stp_err_set(err, STP_EIO, "shm %s: empty or unreadable", name);
    }
    void *p =
        mmap(NULL, (size_t)st.st_size, PROT_READ | (writable ? PROT_WRITE : 0), MAP_SHARED, fd, 0);
    close(fd);
    r->ino = (uint64_t)st.st_ino;
    if (p == MAP_FAILED) return stp_err_set(err, STP_EIO, "mmap %s: %s", name, strerror(errno));
    arena_advise(p, (size_t)st.st_size); /* each mapping asks, for its own page tables */
    r->base = p;
    r->size = (size_t)st.st_size;
    return 0;
}

bool shm_region_current(const shm_region *r) {
    if (!r->base || r->name[0] != '/') return false;
    char path[200];
    snprintf(path, sizeof path, "/dev/shm%s", r->name);
    struct stat st;
    return !stat(path, &st) && (uint64_t)st.st_ino == r->ino;
}

void shm_region_close(shm_region *r) {
    if (r->base) munmap(r->base, r->size);
    if (r->owner) shm_unlink(r->name);
    r->base = NULL;
    r->owner = false;
}

size_t pool_table_bytes(int n_layer, int n_expert) {
    size_t b = sizeof(pool_header) + (size_t)n_layer * n_expert * sizeof(pool_slot);
    return (b + POOL_ALIGN - 1) / POOL_ALIGN * POOL_ALIGN;
}

void pool_slot_parts(size_t gate_bytes, size_t up_bytes, size_t down_bytes, size_t off[3],
                     size_t *total) {
    off[0] = 0;
    const size_t a = POOL_ALIGN - 1;
    off[1] = (gate_bytes + a) & ~a;
    off[2] = (off[1] + up_bytes + a) & ~a;
    *total = off[2] + down_bytes;
}

int pool_check(const shm_region *r, int n_layer, int n_expert, stp_err *err) {
    if (r->size < sizeof(pool_header))
        return stp_err_set(err, STP_EFORMAT, "pool %s: too small", r->name);
    const pool_header *h = (const pool_header *)r->base;
    if (h->magic != POOL_MAGIC || h->version != POOL_VERSION)
        return stp_err_set(err, STP_EFORMAT, "pool %s: bad magic/version", r->name);
    if ((int)h->n_layer != n_layer || (int)h->n_expert != n_expert || h->size != r->size)
        return stp_err_set(
            err, STP_EFORMAT, "pool %s: %u layers x %u experts, %llu bytes; the model has %d x %d",
            r->name, h->n_layer, h->n_expert, (unsigned long long)h->size, n_layer, n_expert);
    if (pool_table_bytes(n_layer, n_expert) > r->size)
        return stp_err_set(err, STP_EFORMAT, "pool %s: table larger than the segment", r->name);
    for (int i = 0; i < n_layer * n_expert; i++) {
        const pool_slot *s = &h->slots[i];
        if (s->state == POOL_EMPTY) continue;
        if (s->offset < h->data_offset || s->offset > r->size || s->bytes > r->size - s->offset)
            return stp_err_set(err, STP_EFORMAT, "pool %s: slot %d outside the segment", r->name,
                               i);
    }
    return 0;
}

static uint64_t s_al(uint64_t x) {
    return (x + 63) & ~(uint64_t)63;
}

void act_layout(act_header *h, int n_ubatch, int n_embd, int n_used, int n_vocab, int n_logits) {
    memset(h, 0, sizeof *h);
    h->magic = ACT_MAGIC;
    h->version = ACT_VERSION;
    h->n_ubatch = (uint32_t)n_ubatch;
    h->n_embd = (uint32_t)n_embd;
    h->n_used = (uint32_t)n_used;
    h->n_vocab = (uint32_t)n_vocab;
    h->n_logits = (uint32_t)n_logits;
    uint64_t T = (uint64_t)n_ubatch, E = (uint64_t)n_embd, K = (uint64_t)n_used;
    h->off_h = s_al(sizeof *h);
    h->off_sel = s_al(h->off_h + T * E * 4);
    h->off_w = s_al(h->off_sel + T * K * 4);
    h->off_y = s_al(h->off_w + T * K * 4);
    h->off_logits = s_al(h->off_y + T * K * E * 4);
    h->off_lanes = s_al(h->off_logits + (uint64_t)n_logits * n_vocab * 4);
    h->size = s_al(h->off_lanes + sizeof(lane_block));
}

int act_check(const shm_region *r, int n_embd, int n_used, int n_vocab, stp_err *err) {
    if (r->size < sizeof(act_header))
        return stp_err_set(err, STP_EFORMAT, "activations %s: too small", r->name);
    const act_header *h = (const act_header *)r->base;
    act_header want;
    act_layout(&want, (int)h->n_ubatch, n_embd, n_used, n_vocab, (int)h->n_logits);
    want.epoch = h->epoch;
    if (h->magic != ACT_MAGIC || h->version != ACT_VERSION || h->n_ubatch == 0 ||
        h->n_logits == 0 || memcmp(h, &want, sizeof want) != 0 || h->size > r->size)
        return stp_err_set(err, STP_EFORMAT,
                           "activations %s: layout does not match this model (%d x %d, %d)",
                           r->name, n_embd, n_used, n_vocab);
    return 0;
}
