/* tokenizer.c: builds the tokenizer from GGUF metadata (vocabulary, token types, merges, special
 * ids, chat template), and the lookups and decoding that need no regex: token text and bytes,
 * decode, the streaming UTF-8-safe decoder. Encoding is in encode.c and bpe.c.
 * Invariant: after tokenizer_new everything is immutable and owned by the tokenizer (nothing
 * points into the GGUF mapping). See common/tokenizer/README.md. */
#include "tokenizer/tok_internal.h"
#include "tokenizer/tok_utf8.h"

#include <stdlib.h>
#include <string.h>

/* The Qwen2 / Hugging Face pre-tokenizer split regex (tokenizer.json, pre_tokenizer Split). */
static const char s_qwen2_regex[] = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|"
                                    "\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
                                    "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

#define TOK_MAX_VOCAB (1 << 24)
#define TOK_MAX_TOKEN_LEN 4096

/* ------------------------------------------------------------------------------------------
 * Helpers
 * ------------------------------------------------------------------------------------------ */

uint64_t tok_hash_bytes(const void *p, size_t n) {
    const unsigned char *s = p;
    uint64_t h = 0xcbf29ce484222325ull ^ (n * 0x9E3779B97F4A7C15ull);
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, s, 8);
        h = (h ^ w) * 0x100000001b3ull;
        h ^= h >> 29;
        s += 8;
        n -= 8;
    }
    while (n--)
        h = (h ^ *s++) * 0x100000001b3ull;
    h ^= h >> 32;
    h *= 0xd6e8feb86659fd93ull;
    h ^= h >> 32;
    return h;
}

int tok_ids_push(int32_t **ids, size_t *n, size_t *cap, int32_t id) {
    if (*n == *cap) {
        size_t nc = *cap ? *cap * 2 : 256;
        int32_t *p = realloc(*ids, nc * sizeof *p);
        if (!p) return STP_ENOMEM;
        *ids = p;
        *cap = nc;
    }
    (*ids)[(*n)++] = id;
    return 0;
}

static size_t s_pow2_at_least(size_t n) {
    size_t p = 16;
    while (p < n)
        p <<= 1;
    return p;
}

static int32_t s_text_find(const tokenizer *t, const char *s, size_t n) {
    size_t i = (size_t)tok_hash_bytes(s, n) & t->text_hash_mask;
    for (;;) {
        int32_t id = t->text_hash[i];
        if (id < 0) return -1;
        if (t->text_len[id] == n && !memcmp(t->text_arena + t->text_off[id], s, n)) return id;
        i = (i + 1) & t->text_hash_mask;
    }
}

static void s_byte_map_init(tokenizer *t) {
    uint32_t extra = 0;
    for (int b = 0; b < 256; b++) {
        bool self = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174);
        t->byte_cp[b] = self ? (uint32_t)b : 256 + extra++;
    }
    for (int i = 0; i < 324; i++)
        t->cp_byte[i] = -1;
    for (int b = 0; b < 256; b++)
        t->cp_byte[t->byte_cp[b]] = (int16_t)b;
}

/* Reverse byte-level mapping of one NORMAL token's text into out (at most len bytes: each
 * character maps to one byte, or stays as its UTF-8 when outside the alphabet). */
static size_t s_unmap_text(const tokenizer *t, const char *s, size_t n, char *out) {
    size_t o = 0, i = 0;
    while (i < n) {
        uint32_t cp;
        int k = tok_utf8_decode((const unsigned char *)s + i, n - i, &cp);
        if (k <= 0) { /* not valid UTF-8 in the vocabulary: keep the byte */
            out[o++] = s[i++];
            continue;
        }
        if (cp < 324 && t->cp_byte[cp] >= 0) {
            out[o++] = (char)t->cp_byte[cp];
        } else {
            memcpy(out + o, s + i, (size_t)k);
            o += (size_t)k;
        }
        i += (size_t)k;
    }
    return o;
}

static int s_cmp_special(const void *a, const void *b, void *ctx) {
    const tokenizer *t = ctx;
    int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    unsigned char fx = (unsigned char)t->text_arena[t->text_off[x]];
    unsigned char fy = (unsigned char)t->text_arena[t->text_off[y]];
    if (fx != fy) return fx < fy ? -1 : 1;
    if (t->text_len[x] != t->text_len[y]) return t->text_len[x] > t->text_len[y] ? -1 : 1;
    return x < y ? -1 : x > y;
}

static int32_t s_get_id(const gguf_file *g, const char *key) {
    uint32_t v;
    stp_err e = {0};
    if (gguf_get_u32(g, key, &v, &e) != 0) return -1;
    return v > INT32_MAX ? -1 : (int32_t)v;
}

/* ------------------------------------------------------------------------------------------
 * Lifecycle
 * ------------------------------------------------------------------------------------------ */

static int s_load_vocab(tokenizer *t, const gguf_file *g, stp_err *err) {
    const gguf_kv *tok_kv = NULL, *type_kv = NULL;
    int rc = gguf_get_arr(g, "tokenizer.ggml.tokens", GGUF_VT_STRING, &tok_kv, err);
    if (rc)
        return stp_err_set(err, rc == STP_EINVAL ? STP_EFORMAT : rc,
                           "%s: tokenizer.ggml.tokens is missing or not a string array; the "
                           "model file has no tokenizer (re-convert it with its tokenizer)",
                           gguf_path(g));
    uint64_t n = tok_kv->v.arr.n;
    if (n == 0 || n > TOK_MAX_VOCAB)
        return stp_err_set(err, STP_EFORMAT,
                           "%s: tokenizer.ggml.tokens has %llu entries "
                           "(expected 1..%d)",
                           gguf_path(g), (unsigned long long)n, TOK_MAX_VOCAB);
    t->n_vocab = (int32_t)n;
    const unsigned char *types = NULL; /* int32 array in the mapping, maybe unaligned */
    if (gguf_get_arr(g, "tokenizer.ggml.token_type", GGUF_VT_INT32, &type_kv, NULL) == 0) {
        if (type_kv->v.arr.n != n)
            return stp_err_set(err, STP_EFORMAT,
                               "%s: tokenizer.ggml.token_type has %llu entries, "
                               "tokenizer.ggml.tokens has %llu",
                               gguf_path(g), (unsigned long long)type_kv->v.arr.n,
                               (unsigned long long)n);
        types = type_kv->v.arr.data;
    }
    size_t total = 0;
    for (uint64_t i = 0; i < n; i++) {
        if (tok_kv->v.arr.strs[i].len > TOK_MAX_TOKEN_LEN)
            return stp_err_set(err, STP_EFORMAT, "%s: token %llu is %llu bytes long (max %d)",
                               gguf_path(g), (unsigned long long)i,
                               (unsigned long long)tok_kv->v.arr.strs[i].len, TOK_MAX_TOKEN_LEN);
        total += tok_kv->v.arr.strs[i].len + 1;
    }
    if (total > UINT32_MAX)
        return stp_err_set(err, STP_EFORMAT, "%s: vocabulary too large", gguf_path(g));
    t->text_arena = malloc(total);
    t->bytes_arena = malloc(total);
    t->text_off = malloc(n * sizeof *t->text_off);
    t->text_len = malloc(n * sizeof *t->text_len);
    t->bytes_off = malloc(n * sizeof *t->bytes_off);
    t->bytes_len = malloc(n * sizeof *t->bytes_len);
    t->type = malloc(n);
    t->text_hash_mask = s_pow2_at_least(n * 2) - 1;
    t->text_hash = malloc((t->text_hash_mask + 1) * sizeof *t->text_hash);
    if (!t->text_arena || !t->bytes_arena || !t->text_off || !t->text_len || !t->bytes_off ||
        !t->bytes_len || !t->type || !t->text_hash)
        return stp_err_set(err, STP_ENOMEM, "tokenizer: out of memory for %llu tokens",
                           (unsigned long long)n);
    memset(t->text_hash, 0xff, (t->text_hash_mask + 1) * sizeof *t->text_hash);
    size_t off = 0, boff = 0;
    for (uint64_t i = 0; i < n; i++) {
        gguf_str s = tok_kv->v.arr.strs[i];
        int32_t ty = TOK_TYPE_NORMAL;
        if (types) memcpy(&ty, types + 4 * i, 4);
        if (ty < TOK_TYPE_NORMAL || ty > TOK_TYPE_BYTE) ty = TOK_TYPE_NORMAL;
        t->type[i] = (uint8_t)ty;
        t->text_off[i] = (uint32_t)off;
        t->text_len[i] = (uint32_t)s.len;
        memcpy(t->text_arena + off, s.ptr, s.len);
        t->text_arena[off + s.len] = 0;
        t->bytes_off[i] = (uint32_t)boff;
        if (ty == TOK_TYPE_NORMAL || ty == TOK_TYPE_BYTE || ty == TOK_TYPE_UNKNOWN) {
            boff += s_unmap_text(t, s.ptr, s.len, t->bytes_arena + boff);
        } else {
            memcpy(t->bytes_arena + boff, s.ptr, s.len);
            boff += s.len;
        }
        t->bytes_len[i] = (uint32_t)(boff - t->bytes_off[i]);
        if (t->bytes_len[i] > t->max_token_bytes) t->max_token_bytes = t->bytes_len[i];
        off += s.len + 1;
        /* first occurrence wins on duplicate texts */
        if (s_text_find(t, s.ptr, s.len) < 0) {
            size_t h = (size_t)tok_hash_bytes(s.ptr, s.len) & t->text_hash_mask;
            while (t->text_hash[h] >= 0)
                h = (h + 1) & t->text_hash_mask;
            t->text_hash[h] = (int32_t)i;
        }
    }
    for (int b = 0; b < 256; b++) {
        char u[4];
        size_t k = tok_utf8_encode(t->byte_cp[b], u);
        t->byte_id[b] = s_text_find(t, u, k);
        if (t->byte_id[b] < 0)
            return stp_err_set(err, STP_EFORMAT,
                               "%s: the vocabulary has no token for byte 0x%02x "
                               "(a byte-level BPE vocabulary needs all 256)",
                               gguf_path(g), b);
    }
    return 0;
}

static int s_load_merges(tokenizer *t, const gguf_file *g, stp_err *err) {
    const gguf_kv *kv = NULL;
    int rc = gguf_get_arr(g, "tokenizer.ggml.merges", GGUF_VT_STRING, &kv, err);
    if (rc)
        return stp_err_set(err, rc == STP_EINVAL ? STP_EFORMAT : rc,
                           "%s: tokenizer.ggml.merges is missing or not a string array (a "
                           "gpt2 tokenizer needs its merges)",
                           gguf_path(g));
    uint64_t n = kv->v.arr.n;
    if (n > INT32_MAX) return stp_err_set(err, STP_EFORMAT, "%s: too many merges", gguf_path(g));
    t->merge_mask = s_pow2_at_least(n * 2 + 1) - 1;
    t->merges = calloc(t->merge_mask + 1, sizeof *t->merges);
    char *buf = malloc(2 * TOK_MAX_TOKEN_LEN + 2);
    if (!t->merges || !buf) {
        free(buf);
        return stp_err_set(err, STP_ENOMEM, "tokenizer: out of memory for %llu merges",
                           (unsigned long long)n);
    }
    for (uint64_t r = 0; r < n; r++) {
        gguf_str s = kv->v.arr.strs[r];
        const char *sp = s.len > 1 ? memchr(s.ptr + 1, ' ', s.len - 1) : NULL;
        if (!sp || s.len > 2 * TOK_MAX_TOKEN_LEN + 1) {
            free(buf);
            return stp_err_set(err, STP_EFORMAT, "%s: merge %llu '%.*s' is not \"left right\"",
                               gguf_path(g), (unsigned long long)r, (int)(s.len > 80 ? 80 : s.len),
                               s.ptr);
        }
        size_t ll = (size_t)(sp - s.ptr), rl = s.len - ll - 1;
        int32_t l = s_text_find(t, s.ptr, ll), rr = s_text_find(t, sp + 1, rl);
        memcpy(buf, s.ptr, ll);
        memcpy(buf + ll, sp + 1, rl);
        int32_t res = s_text_find(t, buf, ll + rl);
        if (l < 0 || rr < 0 || res < 0) continue; /* unusable merge: never applies */
        uint64_t key = ((uint64_t)(uint32_t)l << 32) | (uint32_t)rr;
        if (key == 0) key = UINT64_MAX;
        size_t i = (size_t)((key * 0x9E3779B97F4A7C15ull) >> 20) & t->merge_mask;
        while (t->merges[i].key != 0 && t->merges[i].key != key)
            i = (i + 1) & t->merge_mask;
        if (t->merges[i].key == key) continue; /* the first (lowest rank) rule wins */
        t->merges[i].key = key;
        t->merges[i].rank = (int32_t)r;
        t->merges[i].result = res;
    }
    free(buf);
    return 0;
}

static int s_load_special(tokenizer *t, const gguf_file *g) {
    size_t ns = 0;
    for (int32_t i = 0; i < t->n_vocab; i++) {
        int ty = t->type[i];
        if ((ty == TOK_TYPE_CONTROL || ty == TOK_TYPE_USER_DEFINED || ty == TOK_TYPE_UNKNOWN) &&
            t->text_len[i] > 0)
            ns++;
    }
    t->special = malloc((ns ? ns : 1) * sizeof *t->special);
    if (!t->special) return STP_ENOMEM;
    for (int32_t i = 0; i < t->n_vocab; i++) {
        int ty = t->type[i];
        if ((ty == TOK_TYPE_CONTROL || ty == TOK_TYPE_USER_DEFINED || ty == TOK_TYPE_UNKNOWN) &&
            t->text_len[i] > 0) {
            t->special[t->n_special++] = i;
        }
    }
    qsort_r(t->special, t->n_special, sizeof *t->special, s_cmp_special, t);
    size_t j = 0;
    for (int b = 0; b < 256; b++) {
        t->special_begin[b] = (uint32_t)j;
        while (j < t->n_special && (unsigned char)t->text_arena[t->text_off[t->special[j]]] == b)
            j++;
    }
    t->special_begin[256] = (uint32_t)j;
    t->bos = s_get_id(g, "tokenizer.ggml.bos_token_id");
    t->eos = s_get_id(g, "tokenizer.ggml.eos_token_id");
    t->pad = s_get_id(g, "tokenizer.ggml.padding_token_id");
    if (t->bos >= t->n_vocab) t->bos = -1;
    if (t->eos >= t->n_vocab) t->eos = -1;
    if (t->pad >= t->n_vocab) t->pad = -1;
    t->eot = s_text_find(t, "<|endoftext|>", 13);
    t->im_start = s_text_find(t, "<|im_start|>", 12);
    t->im_end = s_text_find(t, "<|im_end|>", 10);
    return 0;
}

static int s_compile_regex(tokenizer *t, stp_err *err) {
    int ec;
    PCRE2_SIZE eo;
    t->re = pcre2_compile((PCRE2_SPTR)s_qwen2_regex, PCRE2_ZERO_TERMINATED, PCRE2_UTF | PCRE2_UCP,
                          &ec, &eo, NULL);
    if (!t->re) {
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(ec, msg, sizeof msg);
        return stp_err_set(err, STP_EUNSUPPORTED,
                           "tokenizer: PCRE2 refused the qwen2 regex at "
                           "offset %zu: %s (PCRE2 needs Unicode support)",
                           (size_t)eo, (char *)msg);
    }
    t->re_jit = pcre2_jit_compile(t->re, PCRE2_JIT_COMPLETE) == 0;
    return 0;
}

int tokenizer_new(tokenizer **out, const gguf_file *g, stp_err *err) {
    *out = NULL;
    char model[64] = "", pre[64] = "";
    if (gguf_get_cstr(g, "tokenizer.ggml.model", model, sizeof model, NULL) != 0)
        return stp_err_set(err, STP_EFORMAT,
                           "%s: no tokenizer.ggml.model key: the file carries no "
                           "tokenizer; use a GGUF converted with its tokenizer",
                           gguf_path(g));
    if (strcmp(model, "gpt2") != 0)
        return stp_err_set(err, STP_EUNSUPPORTED,
                           "%s: tokenizer.ggml.model is '%s'; stpipe "
                           "supports only 'gpt2' (byte-level BPE, as in SmallThinker/Qwen2)",
                           gguf_path(g), model);
    if (gguf_get_cstr(g, "tokenizer.ggml.pre", pre, sizeof pre, NULL) != 0)
        return stp_err_set(err, STP_EUNSUPPORTED,
                           "%s: no tokenizer.ggml.pre key: the pre-tokenizer "
                           "is unknown; stpipe supports only 'qwen2' (re-convert the model)",
                           gguf_path(g));
    if (strcmp(pre, "qwen2") != 0)
        return stp_err_set(err, STP_EUNSUPPORTED,
                           "%s: tokenizer.ggml.pre is '%s'; stpipe "
                           "supports only the 'qwen2' pre-tokenizer",
                           gguf_path(g), pre);
    tokenizer *t = calloc(1, sizeof *t);
    if (!t) return stp_err_set(err, STP_ENOMEM, "tokenizer: out of memory");
    s_byte_map_init(t);
    int rc = s_load_vocab(t, g, err);
    if (!rc) rc = s_load_merges(t, g, err);
    if (!rc && (rc = s_load_special(t, g)) != 0) stp_err_set(err, rc, "tokenizer: out of memory");
    if (!rc) {
        gguf_str tmpl;
        if (gguf_get_str(g, "tokenizer.chat_template", &tmpl, NULL) == 0) {
            t->chat_template = malloc(tmpl.len + 1);
            if (!t->chat_template)
                rc = stp_err_set(err, STP_ENOMEM, "tokenizer: out of memory");
            else {
                memcpy(t->chat_template, tmpl.ptr, tmpl.len);
                t->chat_template[tmpl.len] = 0;
            }
        }
    }
    if (!rc) rc = s_compile_regex(t, err);
    if (rc) {
        tokenizer_destroy(&t);
        return rc;
    }
    *out = t;
    return 0;
}

void tokenizer_destroy(tokenizer **self_p) {
    if (!self_p || !*self_p) return;
    tokenizer *t = *self_p;
    free(t->text_arena);
    free(t->bytes_arena);
    free(t->text_off);
    free(t->text_len);
    free(t->bytes_off);
    free(t->bytes_len);
    free(t->type);
    free(t->text_hash);
    free(t->merges);
    free(t->special);
    free(t->chat_template);
    if (t->re) pcre2_code_free(t->re);
    free(t);
    *self_p = NULL;
}

/* ------------------------------------------------------------------------------------------
 * Lookups and decoding
 * ------------------------------------------------------------------------------------------ */

int32_t tokenizer_n_vocab(const tokenizer *t) {
    return t->n_vocab;
}

size_t tokenizer_max_token_bytes(const tokenizer *t) {
    return t->max_token_bytes;
}

int32_t tokenizer_eos(const tokenizer *t) {
    return t->eos;
}

int tokenizer_token_type(const tokenizer *t, int32_t id) {
    return id >= 0 && id < t->n_vocab ? t->type[id] : 0;
}

int32_t tokenizer_token_id(const tokenizer *t, const char *token_text) {
    return token_text ? s_text_find(t, token_text, strlen(token_text)) : -1;
}

const char *tokenizer_token_text(const tokenizer *t, int32_t id) {
    return id >= 0 && id < t->n_vocab ? t->text_arena + t->text_off[id] : NULL;
}

int tokenizer_token_bytes(const tokenizer *t, int32_t id, const char **bytes, size_t *len) {
    if (id < 0 || id >= t->n_vocab) {
        *bytes = "";
        *len = 0;
        return STP_ERANGE;
    }
    *bytes = t->bytes_arena + t->bytes_off[id];
    *len = t->bytes_len[id];
    return 0;
}

bool tokenizer_is_eog(const tokenizer *t, int32_t id) {
    return id >= 0 && (id == t->eos || id == t->eot || id == t->im_end);
}

int tokenizer_decode(const tokenizer *t, const int32_t *ids, size_t n, char **text, size_t *len,
                     stp_err *err) {
    *text = NULL;
    *len = 0;
    size_t total = 0;
    for (size_t i = 0; i < n; i++) {
        if (ids[i] < 0 || ids[i] >= t->n_vocab)
            return stp_err_set(err, STP_ERANGE,
                               "token id %d (at position %zu) is outside the "
                               "vocabulary 0..%d",
                               ids[i], i, t->n_vocab - 1);
        total += t->bytes_len[ids[i]];
    }
    char *s = malloc(total + 1);
    if (!s) return stp_err_set(err, STP_ENOMEM, "decode: out of memory for %zu bytes", total);
    size_t o = 0;
    for (size_t i = 0; i < n; i++) {
        memcpy(s + o, t->bytes_arena + t->bytes_off[ids[i]], t->bytes_len[ids[i]]);
        o += t->bytes_len[ids[i]];
    }
    s[o] = 0;
    *text = s;
    *len = o;
    return 0;
}

/* ------------------------------------------------------------------------------------------
 * Streaming decoder
 * ------------------------------------------------------------------------------------------ */

void tok_stream_init(tok_stream *s, const tokenizer *t) {
    memset(s, 0, sizeof *s);
    s->t = t;
}

/* Writes n bytes if they fit; returns false (writing nothing) otherwise. */
static bool s_put(char *out, size_t cap, size_t *o, const void *p, size_t n) {
    if (*o + n > cap) return false;
    memcpy(out + *o, p, n);
    *o += n;
    return true;
}

/* Feeds bytes through the held state, emitting complete characters. */
static size_t s_stream_feed(tok_stream *s, const unsigned char *p, size_t n, char *out,
                            size_t cap) {
    size_t o = 0, i = 0;
    while (s->n_held > 0 && i < n) { /* complete the held character first */
        s->held[s->n_held++] = p[i++];
        int k = tok_utf8_decode(s->held, s->n_held, NULL);
        if (k > 0) {
            s_put(out, cap, &o, s->held, (size_t)k);
            s->n_held = 0;
        } else if (k < 0) { /* the held prefix is broken: first byte is U+FFFD, replay rest */
            unsigned char rest[4];
            size_t nr = s->n_held - 1;
            memcpy(rest, s->held + 1, nr);
            s->n_held = 0;
            s_put(out, cap, &o, "\xEF\xBF\xBD", 3);
            o += s_stream_feed(s, rest, nr, out + o, cap - o);
        }
    }
    while (i < n) {
        int k = tok_utf8_decode(p + i, n - i, NULL);
        if (k > 0) {
            s_put(out, cap, &o, p + i, (size_t)k);
            i += (size_t)k;
        } else if (k == 0) { /* incomplete at the end: hold it */
            memcpy(s->held, p + i, n - i);
            s->n_held = n - i;
            i = n;
        } else {
            s_put(out, cap, &o, "\xEF\xBF\xBD", 3);
            i++;
        }
    }
    return o;
}

size_t tok_stream_push(tok_stream *s, int32_t id, char *out, size_t cap) {
    const char *b;
    size_t n;
    if (tokenizer_token_bytes(s->t, id, &b, &n) != 0) return 0;
    return s_stream_feed(s, (const unsigned char *)b, n, out, cap);
}

size_t tok_stream_flush(tok_stream *s, char *out, size_t cap) {
    size_t o = 0;
    while (s->n_held > 0) { /* an unfinished character: each held byte becomes U+FFFD */
        s_put(out, cap, &o, "\xEF\xBF\xBD", 3);
        s->n_held--;
    }
    return o;
}
