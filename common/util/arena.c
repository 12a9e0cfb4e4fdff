/* arena: buffers carved in order from one 2 MiB-aligned mapping; see arena.h.
 *
 * Invariants:
 * 1. base is 2 MiB-aligned and cap a multiple of 2 MiB, so every whole 2 MiB page of the
 *    buffers can be a huge page (the mapping is over-reserved by 2 MiB and trimmed to align).
 * 2. used only grows; [base, base + used) is handed out, the rest is never touched. */
#include "util/arena.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#define HUGE_PAGE ((size_t)2 << 20)
#define ALIGN ((size_t)64) /* every buffer starts on a cache line */

struct arena {
    uint8_t *base;
    size_t cap, used;
};

static bool s_wanted(void) {
    const char *v = getenv("STP_HUGEPAGES");
    return !v || strcmp(v, "0") != 0;
}

bool arena_advise(void *p, size_t n) {
#ifdef MADV_HUGEPAGE
    if (!p || !n || !s_wanted()) return false;
    /* madvise needs a page-aligned start; the whole 2 MiB pages inside are what can be huge */
    const uintptr_t a = ((uintptr_t)p + HUGE_PAGE - 1) & ~(uintptr_t)(HUGE_PAGE - 1),
                    b = ((uintptr_t)p + n) & ~(uintptr_t)(HUGE_PAGE - 1);
    return b > a && madvise((void *)a, b - a, MADV_HUGEPAGE) == 0;
#else
    (void)p, (void)n;
    return false;
#endif
}

int arena_new(arena **out, size_t bytes, stp_err *err) {
    *out = NULL;
    arena *a = calloc(1, sizeof *a);
    if (!a) return stp_err_set(err, STP_ENOMEM, "arena: out of memory");
    a->cap = (bytes + HUGE_PAGE - 1) & ~(HUGE_PAGE - 1);
    if (!a->cap) a->cap = HUGE_PAGE;
    const size_t span = a->cap + HUGE_PAGE;
    uint8_t *p = mmap(NULL, span, PROT_READ | PROT_WRITE,
                      MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) {
        free(a);
        return stp_err_set(err, STP_ENOMEM, "arena: cannot reserve %zu bytes", span);
    }
    uint8_t *base = (uint8_t *)(((uintptr_t)p + HUGE_PAGE - 1) & ~(uintptr_t)(HUGE_PAGE - 1));
    if (base > p) munmap(p, (size_t)(base - p));
    if (base + a->cap < p + span) munmap(base + a->cap, (size_t)(p + span - (base + a->cap)));
    a->base = base;
    arena_advise(base, a->cap);
    *out = a;
    return 0;
}

void arena_destroy(arena **self_p) {
    arena *a = *self_p;
    if (!a) return;
    munmap(a->base, a->cap);
    free(a);
    *self_p = NULL;
}

size_t arena_room(size_t n, size_t each) {
    return n * ((each + ALIGN - 1) & ~(ALIGN - 1));
}

void *arena_alloc(arena *a, size_t n) {
    if (!a) return NULL;
    const size_t at = (a->used + ALIGN - 1) & ~(ALIGN - 1);
    if (n > a->cap || at > a->cap - n) return NULL;
    a->used = at + n;
    return a->base + at;
}

size_t arena_used(const arena *a) {
    return a ? a->used : 0;
}
