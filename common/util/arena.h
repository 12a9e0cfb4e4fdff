/* arena: long-lived buffers (weight images) carved in order from one mapping backed by 2 MiB
 * pages where the kernel gives them.
 *
 * Why: a decode step streams ~400 MB of weight images spread over thousands of separate
 * allocations of 0.2-1.3 MB each. Each is too small and unaligned for a transparent huge page,
 * so every 4 KiB of weights costs a TLB miss and a page walk; scattered reads (ReGLU-sparse rows)
 * pay one per row. One 2 MiB-aligned mapping with MADV_HUGEPAGE lets the kernel (THP "madvise",
 * the common default, or "always") back it with 2 MiB pages: 512x fewer misses. Measured in
 * docs/BENCHMARKS.md (session 18).
 *
 * Nothing is freed alone: buffers live until arena_destroy. The mapping is reserved, not
 * committed (MAP_NORESERVE): only the pages of buffers handed out are ever backed, and a
 * reservation larger than what is used costs address space only. STP_HUGEPAGES=0 in the
 * environment leaves the advice out (4 KiB pages, as a malloc'd buffer), for comparisons. */
#ifndef STP_ARENA_H
#define STP_ARENA_H

#include <stdbool.h>
#include <stddef.h>

#include "util/stp_err.h"

typedef struct arena arena;

/* Reserves room for `bytes` (rounded up to 2 MiB). */
int arena_new(arena **out, size_t bytes, stp_err *err);
/* The bytes an arena hands n buffers of `each` bytes in (each starts 64-byte aligned). */
size_t arena_room(size_t n, size_t each);
void arena_destroy(arena **self_p);
/* The next n bytes, 64-byte aligned; NULL when they do not fit in what is left (or a is NULL). */
void *arena_alloc(arena *a, size_t n);
/* Bytes handed out so far (with alignment padding). */
size_t arena_used(const arena *a);
/* Asks for 2 MiB pages on an existing mapping (a shared-memory segment): advice only, honoured
 * where the mapping's filesystem allows it (tmpfs mounted huge=advise or within_size, or the
 * kernel's shmem_enabled "force"); STP_HUGEPAGES=0 skips it. Returns whether the advice was
 * accepted (not whether pages are huge). */
bool arena_advise(void *p, size_t n);

#endif
