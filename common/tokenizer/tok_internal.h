/* tok_internal: the tokenizer's private layout, shared by tokenizer.c (load, lookups, decode),
 * bpe.c (merge loop and piece cache), encode.c (normalise, split, drive BPE) and chat.c.
 * Nothing here is part of the public API; see common/tokenizer/README.md for the invariants. */
#ifndef STP_TOK_INTERNAL_H
#define STP_TOK_INTERNAL_H

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include "tokenizer/tokenizer.h"

/* A merge rule: the pair (left id, right id) becomes result with priority rank (lower first). */
typedef struct tok_merge {
    uint64_t key; /* ((uint64_t)left << 32) | right; 0 marks an empty slot (id pair 0,0 is
                     stored with key UINT64_MAX instead) */
    int32_t rank;
    int32_t result;
} tok_merge;

struct tokenizer {
    int32_t n_vocab;
    char *text_arena;    /* every token's vocabulary text, NUL-terminated */
    uint32_t *text_off;  /* (n_vocab) offset of the text in text_arena */
    uint32_t *text_len;  /* (n_vocab) */
    char *bytes_arena;   /* every token's decoded bytes */
    uint32_t *bytes_off; /* (n_vocab) */
    uint32_t *bytes_len; /* (n_vocab) */
    uint8_t *type;       /* (n_vocab) TOK_TYPE_* */
    int32_t *text_hash;  /* (text_hash_mask + 1) open addressing: token id or -1 */
    size_t text_hash_mask;
    tok_merge *merges; /* (merge_mask + 1) open addressing on key */
    size_t merge_mask;
    int32_t byte_id[256];  /* token of each raw byte (all 256 must exist) */
    uint32_t byte_cp[256]; /* GPT-2 byte-to-unicode mapping */
    int16_t cp_byte[324];  /* reverse mapping for code points < 324, -1 if none */
    /* added tokens matched inside text: CONTROL/UNKNOWN (with TOK_PARSE_SPECIAL) and
     * USER_DEFINED (always), longest first within each first byte */
    int32_t *special; /* (n_special) ids */
    size_t n_special;
    uint32_t special_begin[257]; /* special[special_begin[b] .. special_begin[b+1]) start with
                                    byte b */
    int32_t bos, eos, pad, eot, im_start, im_end;
    size_t max_token_bytes; /* longest bytes_len */
    char *chat_template;    /* NULL if the GGUF has none */
    pcre2_code *re;         /* the qwen2 pre-tokenizer regex, JIT-compiled when possible */
    bool re_jit;
};

uint64_t tok_hash_bytes(const void *p, size_t n);

/* Looks up the merge of (left, right); returns its rank (and *result) or -1. */
static inline int32_t tok_merge_find(const tokenizer *t, int32_t left, int32_t right,
                                     int32_t *result) {
    uint64_t key = ((uint64_t)(uint32_t)left << 32) | (uint32_t)right;
    if (key == 0) key = UINT64_MAX;
    uint64_t h = key * 0x9E3779B97F4A7C15ull;
    size_t i = (size_t)(h >> 20) & t->merge_mask;
    for (;;) {
        const tok_merge *m = &t->merges[i];
        if (m->key == key) {
            *result = m->result;
            return m->rank;
        }
        if (m->key == 0) return -1;
        i = (i + 1) & t->merge_mask;
    }
}

/* ---- bpe.c ---- */
typedef struct tok_bpe tok_bpe; /* per-call scratch: symbol arrays, heap, piece cache */
int tok_bpe_new(tok_bpe **out, bool with_cache);
void tok_bpe_destroy(tok_bpe **self_p);
/* BPE-encodes one pre-tokenizer piece (raw bytes) and appends the ids to *ids (growing it). */
int tok_bpe_piece(const tokenizer *t, tok_bpe *b, const unsigned char *piece, size_t n,
                  int32_t **ids, size_t *n_ids, size_t *cap_ids);

/* ---- encode.c ---- */
bool tok_nfc_inert(uint32_t cp); /* NFC never changes or composes onto cp (exported for tests) */

/* ---- growable id vector ---- */
int tok_ids_push(int32_t **ids, size_t *n, size_t *cap, int32_t id);

#endif
