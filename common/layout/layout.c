/* layout: build, validate and open the expert layout file; see layout.h. */
#include "layout/layout.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "kern/kern.h"
#include "model/down_t.h"
#include "util/fileio.h"

static uint64_t s_fnv(uint64_t h, const void *p, size_t n) {
    const uint8_t *b = p;
    for (size_t i = 0; i < n; i++) {
        h ^= b[i];
        h *= 0x100000001b3ull;
    }
    return h;
}

static uint64_t s_al(uint64_t x) {
    return (x + LAYOUT_ALIGN - 1) / LAYOUT_ALIGN * LAYOUT_ALIGN;
}

int layout_path(char *out, size_t cap, const char *model_path, const char *dir, stp_err *err) {
    const char *base = strrchr(model_path, '/');
    base = base ? base + 1 : model_path;
    char cache[4096];
    if (!dir || !*dir) { /* $XDG_CACHE_HOME/stpipe or ~/.cache/stpipe */
        const char *x = getenv("XDG_CACHE_HOME"), *home = getenv("HOME");
        if (x && *x)
            snprintf(cache, sizeof cache, "%s/stpipe", x);
        else
            snprintf(cache, sizeof cache, "%s/.cache/stpipe", home && *home ? home : "/tmp");
        char parent[4096];
        snprintf(parent, sizeof parent, "%s", cache);
        char *sl = strrchr(parent, '/');
        if (sl && sl != parent) {
            *sl = 0;
            mkdir(parent, 0755);
        }
        mkdir(cache, 0755);
        dir = cache;
    }
    /* the model's real path in the name: two models with one base name do not share a file */
    char real[4096];
    if (!realpath(model_path, real)) snprintf(real, sizeof real, "%s", model_path);
    uint64_t h = s_fnv(0xcbf29ce484222325ull, real, strlen(real));
    int n = snprintf(out, cap, "%s/%s.%08x.stpipe-layout", dir, base, (unsigned)(h ^ (h >> 32)));
    if (n < 0 || (size_t)n >= cap) return stp_err_set(err, STP_EINVAL, "layout path too long");
    return 0;
}

bool layout_wants_down_t(const model *m) {
    if (!strcmp(kern_ops_get()->level, "ref")) return false;
    for (int il = 0; il < m->cfg.n_layer; il++)
        if (!down_t_expert_bytes(m->layers[il].down_exps.type, m->cfg.n_embd, m->cfg.n_ff_exp))
            return false;
    return true;
}

uint32_t layout_wants_flags(const model *m) {
    uint32_t f = layout_wants_down_t(m) ? LAYOUT_DOWN_T : 0;
    bool gate_x16 = m->cfg.n_layer > 0;
    for (int il = 0; il < m->cfg.n_layer; il++) {
        const tensor_view *g = &m->layers[il].gate_exps;
        size_t img = g->type == STP_TYPE_Q4_0 ? kern_q4_0x16_size(g->n_rows, g->n_cols) : 0;
        if (!img || img != g->mat_bytes) gate_x16 = false;
    }
    return f | (gate_x16 ? LAYOUT_GATE_X16 : 0);
}

void layout_matrix_bytes(const model *m, int layer, uint32_t flags, size_t bytes[3]) {
    const layer_weights *L = &m->layers[layer];
    bytes[0] = L->gate_exps.mat_bytes;
    bytes[1] = L->up_exps.mat_bytes;
    bytes[2] = (flags & LAYOUT_DOWN_T)
                   ? down_t_expert_bytes(L->down_exps.type, m->cfg.n_embd, m->cfg.n_ff_exp)
                   : L->down_exps.mat_bytes;
}

uint64_t layout_frame_bytes(const model *m, uint32_t flags) {
    uint64_t frame = 0;
    for (int il = 0; il < m->cfg.n_layer; il++) {
        size_t b[3];
        layout_matrix_bytes(m, il, flags, b);
        uint64_t r = s_al(b[0]) + s_al(b[1]) + s_al(b[2]); /* (parts back to back, aligned) */
        if (r > frame) frame = r;
    }
    return frame;
}

/* Hash of what the records are made of: the expert tensors' names, types, shapes and places. */
static uint64_t s_tensor_hash(const model *m) {
    uint64_t h = 0xcbf29ce484222325ull;
    const uint8_t *base = m->layers[0].gate_exps.data;
    for (int il = 0; il < m->cfg.n_layer; il++) {
        const tensor_view *tv[3] = {&m->layers[il].gate_exps, &m->layers[il].up_exps,
                                    &m->layers[il].down_exps};
        for (int k = 0; k < 3; k++) {
            int64_t v[5] = {(int64_t)tv[k]->type, tv[k]->n_cols, tv[k]->n_rows, tv[k]->n_mat,
                            (int64_t)(tv[k]->data - base)};
            h = s_fnv(h, tv[k]->name, strnlen(tv[k]->name, sizeof tv[k]->name));
            h = s_fnv(h, v, sizeof v);
        }
    }
    return h;
}

/* The header and table a build of this model would write (checksum not set). */
static int s_plan(layout *l, const model *m, const char *model_path, uint32_t flags, stp_err *err) {
    struct stat st;
    if (stat(model_path, &st))
        return stp_err_set(err, STP_EIO, "stat %s: %s", model_path, strerror(errno));
    const int NL = m->cfg.n_layer, X = m->cfg.n_expert;
    memset(&l->h, 0, sizeof l->h);
    l->h.magic = LAYOUT_MAGIC;
    l->h.version = LAYOUT_VERSION;
    l->h.flags = flags;
    l->h.n_layer = (uint32_t)NL;
    l->h.n_expert = (uint32_t)X;
    l->h.model_size = (uint64_t)st.st_size;
    l->h.model_mtime_ns =
        (uint64_t)st.st_mtim.tv_sec * 1000000000ull + (uint64_t)st.st_mtim.tv_nsec;
    l->h.tensor_hash = s_tensor_hash(m);
    l->h.table_offset = LAYOUT_ALIGN;
    size_t n = (size_t)NL * X * 3;
    l->h.data_offset = s_al(l->h.table_offset + n * sizeof(layout_entry));
    l->e = calloc(n, sizeof(layout_entry));
    if (!l->e) return stp_err_set(err, STP_ENOMEM, "layout table: out of memory");
    uint64_t at = l->h.data_offset;
    for (int il = 0; il < NL; il++) {
        size_t b[3];
        layout_matrix_bytes(m, il, flags, b);
        for (int x = 0; x < X; x++)
            for (int k = 0; k < 3; k++) {
                layout_entry *e = &l->e[((size_t)il * X + x) * 3 + k];
                e->off = at;
                e->bytes = b[k];
                at += s_al(b[k]);
            }
    }
    l->h.file_size = at;
    return 0;
}

static uint64_t s_checksum(const layout *l) {
    layout_header h = l->h;
    h.checksum = 0;
    uint64_t c = s_fnv(0xcbf29ce484222325ull, &h, sizeof h);
    return s_fnv(c, l->e, (size_t)l->h.n_layer * l->h.n_expert * 3 * sizeof(layout_entry));
}

void layout_close(layout **self_p) {
    layout *l = *self_p;
    if (!l) return;
    free(l->e);
    free(l);
    *self_p = NULL;
}

/* 0 when all n bytes at off were read */
static int s_read_full(int fd, void *dst, size_t n, uint64_t off) {
    return fileio_pread_full(fd, dst, n, off) == (ssize_t)n ? 0 : -1;
}

int layout_open(layout **out, const model *m, const char *model_path, const char *path,
                uint32_t flags, stp_err *err) {
    *out = NULL;
    layout *want = calloc(1, sizeof *want), *l = calloc(1, sizeof *l);
    int rc = 0, fd = -1;
    if (!want || !l) {
        rc = stp_err_set(err, STP_ENOMEM, "layout: out of memory");
        goto out;
    }
    if ((rc = s_plan(want, m, model_path, flags, err))) goto out;
    fd = open(path, O_RDONLY | O_CLOEXEC);
    struct stat st;
    if (fd < 0 || fstat(fd, &st)) {
        rc = stp_err_set(err, STP_EFORMAT, "layout %s: %s", path, strerror(errno));
        goto out;
    }
    snprintf(l->path, sizeof l->path, "%s", path);
    if (s_read_full(fd, &l->h, sizeof l->h, 0)) {
        rc = stp_err_set(err, STP_EFORMAT, "layout %s: no header", path);
        goto out;
    }
    const char *why = NULL;
    if (l->h.magic != LAYOUT_MAGIC)
        why = "not a layout file";
    else if (l->h.version != LAYOUT_VERSION)
        why = "another version";
    else if (l->h.flags != want->h.flags)
        why = "built for other matrix layouts (flags)";
    else if (l->h.n_layer != want->h.n_layer || l->h.n_expert != want->h.n_expert)
        why = "built for other dimensions";
    else if (l->h.model_size != want->h.model_size || l->h.model_mtime_ns != want->h.model_mtime_ns)
        why = "the model file changed (size or mtime)";
    else if (l->h.tensor_hash != want->h.tensor_hash)
        why = "the expert tensors changed";
    else if (l->h.table_offset != want->h.table_offset || l->h.data_offset != want->h.data_offset ||
             l->h.file_size != want->h.file_size)
        why = "unexpected offsets";
    else if ((uint64_t)st.st_size != l->h.file_size)
        why = "truncated (file size)";
    if (why) {
        rc = stp_err_set(err, STP_EFORMAT, "layout %s: %s", path, why);
        goto out;
    }
    size_t n = (size_t)l->h.n_layer * l->h.n_expert * 3;
    l->e = malloc(n * sizeof(layout_entry));
    if (!l->e) {
        rc = stp_err_set(err, STP_ENOMEM, "layout: out of memory");
        goto out;
    }
    if (s_read_full(fd, l->e, n * sizeof(layout_entry), l->h.table_offset) ||
        s_checksum(l) != l->h.checksum || memcmp(l->e, want->e, n * sizeof(layout_entry))) {
        rc = stp_err_set(err, STP_EFORMAT, "layout %s: checksum or table mismatch", path);
        goto out;
    }
    *out = l;
    l = NULL;
out:
    if (fd >= 0) close(fd);
    layout_close(&l);
    layout_close(&want);
    return rc;
}

static int s_write_full(int fd, const void *src, size_t n, uint64_t off) {
    size_t done = 0;
    while (done < n) {
        ssize_t r = pwrite(fd, (const uint8_t *)src + done, n - done, (off_t)(off + done));
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return -1;
        done += (size_t)r;
    }
    return 0;
}

static void s_progress(FILE *f, bool tty, uint64_t done, uint64_t total, int *last) {
    if (!f) return;
    int pct = total ? (int)(done * 100 / total) : 100;
    if (tty) {
        if (pct == *last) return;
        int w = pct / 4;
        fprintf(f, "\rbuilding expert layout [%.*s%*s] %3d%% %.0f/%.0f MiB", w,
                "#########################", 25 - w, "", pct, done / 1048576.0, total / 1048576.0);
        if (pct == 100) fputc('\n', f);
    } else {
        if (pct / 25 == *last / 25 && *last >= 0) return;
        fprintf(f, "building expert layout: %d%% (%.0f/%.0f MiB)\n", pct, done / 1048576.0,
                total / 1048576.0);
    }
    *last = pct;
    fflush(f);
}

int layout_build(const model *m, const char *model_path, const char *path, uint32_t flags,
                 FILE *progress, stp_err *err) {
    layout *l = calloc(1, sizeof *l);
    if (!l) return stp_err_set(err, STP_ENOMEM, "layout: out of memory");
    int rc = s_plan(l, m, model_path, flags, err);
    char tmp[4200];
    snprintf(tmp, sizeof tmp, "%s.tmp.%d", path, (int)getpid());
    int fd = -1, mfd = -1;
    uint8_t *buf = NULL;
    if (rc) goto out;
    fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) {
        rc = stp_err_set(err, STP_EIO, "layout: cannot create %s: %s", tmp, strerror(errno));
        goto out;
    }
    mfd = open(model_path, O_RDONLY | O_CLOEXEC); /* to drop the model's cached pages */
    const int NL = m->cfg.n_layer, X = m->cfg.n_expert;
    size_t maxrec = 0;
    for (int il = 0; il < NL; il++) {
        size_t b[3];
        layout_matrix_bytes(m, il, flags, b);
        size_t r = s_al(b[0]) + s_al(b[1]) + s_al(b[2]);
        if (r > maxrec) maxrec = r;
    }
    buf = aligned_alloc(LAYOUT_ALIGN, maxrec);
    if (!buf) {
        rc = stp_err_set(err, STP_ENOMEM, "layout: out of memory");
        goto out;
    }
    bool tty = progress && isatty(fileno(progress));
    int last = -1;
    uint64_t total = l->h.file_size - l->h.data_offset, done = 0;
    for (int il = 0; il < NL; il++) {
        const layer_weights *L = &m->layers[il];
        const tensor_view *tv[3] = {&L->gate_exps, &L->up_exps, &L->down_exps};
        for (int x = 0; x < X; x++) {
            const layout_entry *e = &l->e[((size_t)il * X + x) * 3];
            size_t span = e[2].off + s_al(e[2].bytes) - e[0].off;
            memset(buf, 0, span);
            for (int k = 0; k < 3; k++) {
                uint8_t *dst = buf + (e[k].off - e[0].off);
                const uint8_t *src = tv[k]->data + (size_t)x * tv[k]->mat_bytes;
                if (k == 2 && (flags & LAYOUT_DOWN_T))
                    down_t_build_expert(tv[2], x, dst);
                else if (k == 0 && (flags & LAYOUT_GATE_X16))
                    kern_ops_get()->pack_q4_0x16(src, tv[0]->row_bytes, tv[0]->n_rows,
                                                 tv[0]->n_cols, dst);
                else
                    memcpy(dst, src, e[k].bytes);
            }
            if (s_write_full(fd, buf, span, e[0].off)) {
                rc = stp_err_set(err, STP_EIO, "layout: write %s: %s", tmp, strerror(errno));
                goto out;
            }
            done += span;
            s_progress(progress, tty, done, total, &last);
        }
        /* neither the model's pages nor the written ones should stay cached because of us */
        for (int k = 0; k < 3; k++) {
            uintptr_t p0 = (uintptr_t)tv[k]->data & ~(uintptr_t)4095;
            uintptr_t p1 = (uintptr_t)(tv[k]->data + (size_t)X * tv[k]->mat_bytes);
            madvise((void *)p0, p1 - p0, MADV_DONTNEED);
        }
        fdatasync(fd);
        posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
        if (mfd >= 0) posix_fadvise(mfd, 0, 0, POSIX_FADV_DONTNEED);
    }
    l->h.checksum = s_checksum(l);
    size_t tb = (size_t)NL * X * 3 * sizeof(layout_entry);
    if (s_write_full(fd, l->e, tb, l->h.table_offset) || s_write_full(fd, &l->h, sizeof l->h, 0) ||
        ftruncate(fd, (off_t)l->h.file_size) || fdatasync(fd)) {
        rc = stp_err_set(err, STP_EIO, "layout: write %s: %s", tmp, strerror(errno));
        goto out;
    }
    posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
    if (rename(tmp, path)) {
        rc = stp_err_set(err, STP_EIO, "layout: rename to %s: %s", path, strerror(errno));
        goto out;
    }
out:
    if (fd >= 0) close(fd);
    if (mfd >= 0) close(mfd);
    if (rc) unlink(tmp);
    free(buf);
    layout_close(&l);
    return rc;
}

int layout_ensure(layout **out, const model *m, const char *model_path, const char *path,
                  uint32_t flags, FILE *progress, bool *rebuilt, stp_err *err) {
    if (rebuilt) *rebuilt = false;
    stp_err why = {0};
    int rc = layout_open(out, m, model_path, path, flags, &why);
    if (rc != STP_EFORMAT) return rc ? stp_err_set(err, rc, "%s", why.msg) : 0;
    if (progress) fprintf(progress, "%s: rebuilding\n", why.msg);
    if ((rc = layout_build(m, model_path, path, flags, progress, err))) return rc;
    if (rebuilt) *rebuilt = true;
    return layout_open(out, m, model_path, path, flags, err);
}

uint64_t layout_record_off(const layout *l, int layer, int expert) {
    return l->e[((size_t)layer * l->h.n_expert + expert) * 3].off;
}

uint64_t layout_record_bytes(const layout *l, int layer, int expert) {
    const layout_entry *e = &l->e[((size_t)layer * l->h.n_expert + expert) * 3];
    return e[2].off + s_al(e[2].bytes) - e[0].off;
}
