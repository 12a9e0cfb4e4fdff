/* bpe.c: byte-pair merging of one pre-tokenizer piece, by merge rank, in O(n log n): the piece's
 * bytes start as one symbol each in a doubly linked list, candidate pairs wait in a binary heap
 * ordered by (rank, position) and stale entries are skipped when popped (each entry records the
 * two ids it was made for; a symbol's id only ever changes into a longer token, so equal ids mean
 * the pair is still current). Ties on rank go to the leftmost pair, as in Hugging Face's BPE.
 * A per-call cache maps short pieces to their ids (English text repeats pieces a lot).
 * Pieces longer than TOK_BPE_MAX_PIECE bytes are merged in slices of that size (see README). */
#include "tokenizer/tok_internal.h"

#include <stdlib.h>
#include <string.h>

#define TOK_BPE_MAX_PIECE (256 * 1024)
#define CACHE_SLOTS 65536u /* power of two */
#define CACHE_MAX_ENTRIES (CACHE_SLOTS / 2)
#define CACHE_MAX_KEY 64
#define CACHE_KEY_ARENA (CACHE_MAX_ENTRIES * 16u)
#define CACHE_ID_ARENA (CACHE_MAX_ENTRIES * 8u)

typedef struct bpe_ent {
    int32_t rank;
    int32_t pos; /* left symbol */
    int32_t left_id;
    int32_t right_id;
    int32_t result;
} bpe_ent;

typedef struct cache_slot {
    uint64_t hash; /* 0: empty */
    uint32_t key_off;
    uint32_t id_off;
    uint16_t key_len;
    uint16_t n_ids;
} cache_slot;

struct tok_bpe {
    int32_t *id, *prev, *next; /* (cap_sym) symbol list; id -1 marks a merged-away symbol */
    size_t cap_sym;
    bpe_ent *heap;
    size_t n_heap, cap_heap;
    cache_slot *slots; /* NULL when the cache is off */
    unsigned char *keys;
    int32_t *cids;
    size_t key_used, id_used, n_entries;
};

/* ------------------------------------------------------------------------------------------
 * Lifecycle
 * ------------------------------------------------------------------------------------------ */

int tok_bpe_new(tok_bpe **out, bool with_cache) {
    tok_bpe *b = calloc(1, sizeof *b);
    if (!b) return STP_ENOMEM;
    if (with_cache) {
        b->slots = calloc(CACHE_SLOTS, sizeof *b->slots);
        b->keys = malloc(CACHE_KEY_ARENA);
        b->cids = malloc(CACHE_ID_ARENA * sizeof *b->cids);
        if (!b->slots || !b->keys || !b->cids) {
            tok_bpe_destroy(&b);
            return STP_ENOMEM;
        }
    }
    *out = b;
    return 0;
}

void tok_bpe_destroy(tok_bpe **self_p) {
    if (!self_p || !*self_p) return;
    tok_bpe *b = *self_p;
    free(b->id);
    free(b->prev);
    free(b->next);
    free(b->heap);
    free(b->slots);
    free(b->keys);
    free(b->cids);
    free(b);
    *self_p = NULL;
}

/* ------------------------------------------------------------------------------------------
 * Heap
 * ------------------------------------------------------------------------------------------ */

static inline bool s_less(const bpe_ent *a, const bpe_ent *b) {
    return a->rank < b->rank || (a->rank == b->rank && a->pos < b->pos);
}

static int s_heap_push(tok_bpe *b, bpe_ent e) {
    if (b->n_heap == b->cap_heap) {
        size_t nc = b->cap_heap ? b->cap_heap * 2 : 64;
        bpe_ent *p = realloc(b->heap, nc * sizeof *p);
        if (!p) return STP_ENOMEM;
        b->heap = p;
        b->cap_heap = nc;
    }
    size_t i = b->n_heap++;
    while (i > 0) {
        size_t parent = (i - 1) / 2;
        if (!s_less(&e, &b->heap[parent])) break;
        b->heap[i] = b->heap[parent];
        i = parent;
    }
    b->heap[i] = e;
    return 0;
}

static bpe_ent s_heap_pop(tok_bpe *b) {
    bpe_ent top = b->heap[0];
    bpe_ent last = b->heap[--b->n_heap];
    size_t n = b->n_heap, i = 0;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= n) break;
        if (c + 1 < n && s_less(&b->heap[c + 1], &b->heap[c])) c++;
        if (!s_less(&b->heap[c], &last)) break;
        b->heap[i] = b->heap[c];
        i = c;
    }
    if (n) b->heap[i] = last;
    return top;
}

static int s_try_pair(const tokenizer *t, tok_bpe *b, int32_t left) {
    int32_t right = b->next[left];
    if (right < 0) return 0;
    int32_t res;
    int32_t rank = tok_merge_find(t, b->id[left], b->id[right], &res);
    if (rank < 0) return 0;
    bpe_ent e = {rank, left, b->id[left], b->id[right], res};
    return s_heap_push(b, e);
}

/* ------------------------------------------------------------------------------------------
 * Merge loop
 * ------------------------------------------------------------------------------------------ */

static int s_reserve_syms(tok_bpe *b, size_t n) {
    if (n <= b->cap_sym) return 0;
    size_t nc = b->cap_sym ? b->cap_sym : 64;
    while (nc < n)
        nc *= 2;
    int32_t *a = realloc(b->id, nc * sizeof *a);
    if (!a) return STP_ENOMEM;
    b->id = a;
    a = realloc(b->prev, nc * sizeof *a);
    if (!a) return STP_ENOMEM;
    b->prev = a;
    a = realloc(b->next, nc * sizeof *a);
    if (!a) return STP_ENOMEM;
    b->next = a;
    b->cap_sym = nc;
    return 0;
}

static int s_merge(const tokenizer *t, tok_bpe *b, const unsigned char *p, size_t n, int32_t **ids,
                   size_t *n_ids, size_t *cap_ids) {
    int rc;
    if (n == 1) return tok_ids_push(ids, n_ids, cap_ids, t->byte_id[p[0]]);
    if ((rc = s_reserve_syms(b, n)) != 0) return rc;
    for (size_t i = 0; i < n; i++) {
        b->id[i] = t->byte_id[p[i]];
        b->prev[i] = (int32_t)i - 1;
        b->next[i] = i + 1 < n ? (int32_t)i + 1 : -1;
    }
    b->n_heap = 0;
    for (size_t i = 0; i + 1 < n; i++)
        if ((rc = s_try_pair(t, b, (int32_t)i)) != 0) return rc;
    while (b->n_heap > 0) {
        bpe_ent e = s_heap_pop(b);
        int32_t l = e.pos;
        if (b->id[l] != e.left_id) continue;
        int32_t r = b->next[l];
        if (r < 0 || b->id[r] != e.right_id) continue;
        b->id[l] = e.result;
        b->id[r] = -1;
        b->next[l] = b->next[r];
        if (b->next[r] >= 0) b->prev[b->next[r]] = l;
        if (b->prev[l] >= 0 && (rc = s_try_pair(t, b, b->prev[l])) != 0) return rc;
        if ((rc = s_try_pair(t, b, l)) != 0) return rc;
    }
    for (int32_t i = 0; i >= 0; i = b->next[i])
        if ((rc = tok_ids_push(ids, n_ids, cap_ids, b->id[i])) != 0) return rc;
    return 0;
}

/* ------------------------------------------------------------------------------------------
 * Cache and entry point
 * ------------------------------------------------------------------------------------------ */

static void s_cache_clear(tok_bpe *b) {
    memset(b->slots, 0, CACHE_SLOTS * sizeof *b->slots);
    b->key_used = b->id_used = b->n_entries = 0;
}

int tok_bpe_piece(const tokenizer *t, tok_bpe *b, const unsigned char *piece, size_t n,
                  int32_t **ids, size_t *n_ids, size_t *cap_ids) {
    if (n == 0) return 0;
    if (n > TOK_BPE_MAX_PIECE) { /* pathological piece: merge in slices at character starts */
        while (n > 0) {
            size_t k = n > TOK_BPE_MAX_PIECE ? TOK_BPE_MAX_PIECE : n;
            while (k < n && k > 1 && (piece[k] & 0xC0) == 0x80)
                k--;
            int rc = s_merge(t, b, piece, k, ids, n_ids, cap_ids);
            if (rc) return rc;
            piece += k;
            n -= k;
        }
        return 0;
    }
    if (!b->slots || n > CACHE_MAX_KEY || n == 1)
        return s_merge(t, b, piece, n, ids, n_ids, cap_ids);
    uint64_t h = tok_hash_bytes(piece, n) | 1;
    size_t i = (size_t)(h >> 16) & (CACHE_SLOTS - 1);
    for (;; i = (i + 1) & (CACHE_SLOTS - 1)) {
        cache_slot *s = &b->slots[i];
        if (s->hash == 0) break;
        if (s->hash == h && s->key_len == n && !memcmp(b->keys + s->key_off, piece, n)) {
            for (uint32_t j = 0; j < s->n_ids; j++) {
                int rc = tok_ids_push(ids, n_ids, cap_ids, b->cids[s->id_off + j]);
                if (rc) return rc;
            }
            return 0;
        }
    }
    size_t before = *n_ids;
    int rc = s_merge(t, b, piece, n, ids, n_ids, cap_ids);
    if (rc) return rc;
    size_t got = *n_ids - before;
    if (b->n_entries >= CACHE_MAX_ENTRIES || b->key_used + n > CACHE_KEY_ARENA ||
        b->id_used + got > CACHE_ID_ARENA) {
        s_cache_clear(b);
        i = (size_t)(h >> 16) & (CACHE_SLOTS - 1);
        while (b->slots[i].hash != 0)
            i = (i + 1) & (CACHE_SLOTS - 1);
    }
    cache_slot *s = &b->slots[i];
    s->hash = h;
    s->key_off = (uint32_t)b->key_used;
    s->key_len = (uint16_t)n;
    s->id_off = (uint32_t)b->id_used;
    s->n_ids = (uint16_t)got;
    memcpy(b->keys + b->key_used, piece, n);
    memcpy(b->cids + b->id_used, *ids + before, got * sizeof(int32_t));
    b->key_used += n;
    b->id_used += got;
    b->n_entries++;
    return 0;
}
