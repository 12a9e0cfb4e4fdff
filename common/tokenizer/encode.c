/* encode.c: text to ids. Steps, in order: (1) added tokens are split off on the raw bytes
 * (leftmost, longest; CONTROL only with TOK_PARSE_SPECIAL, USER_DEFINED always); (2) each text
 * run is cut into chunks at points where no pre-tokenizer piece can straddle (see s_find_cut),
 * which bounds memory on huge inputs; (3) per chunk invalid UTF-8 bytes become U+FFFD, then NFC
 * (utf8proc; skipped for pure ASCII or with TOK_NO_NORMALIZE); (4) the qwen2 regex (PCRE2,
 * UTF+UCP, JIT) splits the chunk into pieces; (5) each piece is BPE-merged (bpe.c).
 * Plain spans (tokenizer_encode_spans: the chat messages' text) only ever match USER_DEFINED
 * tokens in step (1), so text there that spells a CONTROL token stays text; the text runs are
 * the same as without spans, so text that spells none gets the same ids.
 * Never reads past len; NUL bytes are ordinary characters. See common/tokenizer/README.md. */
#include "tokenizer/tok_internal.h"
#include "tokenizer/tok_utf8.h"

#include <stdlib.h>
#include <string.h>
#include <utf8proc.h>

#define CHUNK_TARGET (64 * 1024) /* chunks are cut at the first safe point after this */
#define CACHE_MIN_LEN 4096       /* inputs shorter than this skip the piece cache */

typedef struct enc_ctx {
    const tokenizer *t;
    int flags;
    pcre2_match_data *md;
    pcre2_match_context *mctx;
    pcre2_jit_stack *jit_stack;
    tok_bpe *bpe;
    unsigned char *san; /* sanitised copy of a chunk (when it had invalid UTF-8) */
    size_t san_cap;
    unsigned char *nfc; /* NFC of the current chunk */
    size_t nfc_len, nfc_cap;
    int32_t *ids;
    size_t n_ids, cap_ids;
    stp_err *err;
} enc_ctx;

/* ------------------------------------------------------------------------------------------
 * Chunking
 * ------------------------------------------------------------------------------------------ */

static inline bool s_is_alpha(unsigned char c) {
    return (c | 0x20) >= 'a' && (c | 0x20) <= 'z';
}

/* Returns a length k <= n such that no pre-tokenizer piece crosses p[k] and NFC(p) ==
 * NFC(p[0..k)) + NFC(p[k..n)). Safe points (both sides plain ASCII):
 *   "\n|A": a piece holding '\n' never continues into a letter and letters never take a '\n'
 *           prefix;
 *   "a| b": a piece holding a letter ends with that letter, and " b" starts the next piece.
 * An ASCII character is a starter that composes with nothing before it, so NFC is safe too. */
static size_t s_find_cut(const unsigned char *p, size_t n) {
    if (n <= CHUNK_TARGET) return n;
    for (size_t i = CHUNK_TARGET; i + 1 < n; i++) {
        if (!s_is_alpha(p[i + 1])) continue;
        if (p[i] == '\n') return i + 1;
        if (p[i] == ' ' && s_is_alpha(p[i - 1])) return i;
    }
    return n;
}

/* ------------------------------------------------------------------------------------------
 * One chunk: sanitise, normalise, split, merge
 * ------------------------------------------------------------------------------------------ */

/* Copies p into ctx->san with every invalid byte replaced by U+FFFD; returns the new length or
 * (size_t)-1 on allocation failure. */
static size_t s_sanitize(enc_ctx *c, const unsigned char *p, size_t n) {
    if (n > (SIZE_MAX - 4) / 3) return (size_t)-1;
    size_t need = 3 * n + 4;
    if (need > c->san_cap) {
        unsigned char *q = realloc(c->san, need);
        if (!q) return (size_t)-1;
        c->san = q;
        c->san_cap = need;
    }
    size_t o = 0, i = 0;
    while (i < n) {
        int k = tok_utf8_decode(p + i, n - i, NULL);
        if (k > 0) {
            memcpy(c->san + o, p + i, (size_t)k);
            o += (size_t)k;
            i += (size_t)k;
        } else {
            memcpy(c->san + o, "\xEF\xBF\xBD", 3);
            o += 3;
            i++;
        }
    }
    return o;
}

static int s_split_and_merge(enc_ctx *c, const unsigned char *s, size_t n) {
    const tokenizer *t = c->t;
    size_t off = 0;
    while (off < n) {
        int rc = pcre2_match(t->re, s, n, off, PCRE2_NO_UTF_CHECK, c->md, c->mctx);
        size_t start, end;
        if (rc == PCRE2_ERROR_NOMATCH) {
            start = end = n;
        } else if (rc < 0) {
            PCRE2_UCHAR msg[256];
            pcre2_get_error_message(rc, msg, sizeof msg);
            return stp_err_set(c->err, STP_ERANGE,
                               "tokenize: the pre-tokenizer regex failed at "
                               "byte %zu of a %zu-byte chunk: %s",
                               off, n, (char *)msg);
        } else {
            PCRE2_SIZE *ov = pcre2_get_ovector_pointer(c->md);
            start = ov[0];
            end = ov[1];
        }
        if (start > off) { /* text no alternative matched: its own piece (cannot happen with
                              the qwen2 regex, kept for safety) */
            rc = tok_bpe_piece(t, c->bpe, s + off, start - off, &c->ids, &c->n_ids, &c->cap_ids);
            if (rc) return rc;
        }
        if (end == start && start < n) { /* empty match: step one character */
            int k = tok_utf8_decode(s + start, n - start, NULL);
            end = start + (size_t)(k > 0 ? k : 1);
        }
        if (end > start) {
            rc = tok_bpe_piece(t, c->bpe, s + start, end - start, &c->ids, &c->n_ids, &c->cap_ids);
            if (rc) return rc;
        }
        off = end;
    }
    return 0;
}

/* True for code points that NFC leaves alone whatever surrounds them on the left: NFC-stable
 * on their own, and their canonical decomposition starts with a starter that is never the
 * second part of a composition (so nothing before them composes with them, and a cut before
 * them is safe). Conservative ranges (ASCII, Latin up to U+02FF, kana, CJK, Hangul syllables,
 * full-width forms); test_tokenizer checks every one against utf8proc's tables. */
bool tok_nfc_inert(uint32_t cp) {
    if (cp < 0x300) return true;
    if (cp < 0x3000) return false;
    if (cp <= 0x3029 || (cp >= 0x3030 && cp <= 0x303F)) return true;
    if ((cp >= 0x3041 && cp <= 0x3096) || (cp >= 0x30A0 && cp <= 0x30FF)) return true;
    if ((cp >= 0x3400 && cp <= 0x4DBF) || (cp >= 0x4E00 && cp <= 0x9FFF)) return true;
    if (cp >= 0xAC00 && cp <= 0xD7A3) return true;
    return cp >= 0xFF01 && cp <= 0xFFEE;
}

static int s_out_append(enc_ctx *c, const void *p, size_t n) {
    if (c->nfc_len + n > c->nfc_cap) {
        size_t nc = c->nfc_cap ? c->nfc_cap : 4096;
        while (nc < c->nfc_len + n)
            nc *= 2;
        unsigned char *q = realloc(c->nfc, nc);
        if (!q) return STP_ENOMEM;
        c->nfc = q;
        c->nfc_cap = nc;
    }
    memcpy(c->nfc + c->nfc_len, p, n);
    c->nfc_len += n;
    return 0;
}

/* NFC of valid UTF-8 s into c->nfc. Text is cut before every inert character (NFC never
 * composes across such a cut); runs of inert characters are copied, and only the segments
 * holding something else go through utf8proc. */
static int s_normalize(enc_ctx *c, const unsigned char *s, size_t m) {
    c->nfc_len = 0;
    size_t i = 0;
    while (i < m) {
        /* a run of inert characters [i, j); last = start of the run's last character */
        size_t j = i, last = i;
        uint32_t cp = 0;
        int k = 0;
        while (j < m) {
            if (s[j] < 0x80) {
                last = j++;
                continue;
            }
            k = tok_utf8_decode(s + j, m - j, &cp);
            if (k <= 0 || !tok_nfc_inert(cp)) break;
            last = j;
            j += (size_t)k;
        }
        if (j == m) return s_out_append(c, s + i, m - i);
        size_t seg = j > i ? last : j; /* the starter before the run may compose: include it */
        if (seg > i && s_out_append(c, s + i, seg - i)) return STP_ENOMEM;
        /* the segment runs to the next inert character */
        size_t e = j;
        while (e < m) {
            k = tok_utf8_decode(s + e, m - e, &cp);
            if (k <= 0) k = 1;
            if (e > j && tok_nfc_inert(cp)) break;
            e += (size_t)k;
        }
        utf8proc_uint8_t *nfc = NULL;
        utf8proc_ssize_t r = utf8proc_map(s + seg, (utf8proc_ssize_t)(e - seg), &nfc,
                                          UTF8PROC_STABLE | UTF8PROC_COMPOSE);
        if (r < 0) {
            free(nfc);
            return stp_err_set(c->err, r == UTF8PROC_ERROR_NOMEM ? STP_ENOMEM : STP_EINVAL,
                               "tokenize: NFC normalisation failed: %s", utf8proc_errmsg(r));
        }
        int rc = s_out_append(c, nfc, (size_t)r);
        free(nfc);
        if (rc) return rc;
        i = e;
    }
    return 0;
}

static int s_encode_chunk(enc_ctx *c, const unsigned char *p, size_t n) {
    bool ascii = true, valid = true;
    for (size_t i = 0; i < n;) {
        if (p[i] < 0x80) {
            i++;
            continue;
        }
        ascii = false;
        int k = tok_utf8_decode(p + i, n - i, NULL);
        if (k <= 0) {
            valid = false;
            break;
        }
        i += (size_t)k;
    }
    const unsigned char *s = p;
    size_t m = n;
    if (!valid) {
        m = s_sanitize(c, p, n);
        if (m == (size_t)-1) return stp_err_set(c->err, STP_ENOMEM, "tokenize: out of memory");
        s = c->san;
    }
    if (ascii || (c->flags & TOK_NO_NORMALIZE)) return s_split_and_merge(c, s, m);
    int rc = s_normalize(c, s, m);
    if (rc) return rc == STP_ENOMEM ? stp_err_set(c->err, rc, "tokenize: out of memory") : rc;
    return s_split_and_merge(c, c->nfc, c->nfc_len);
}

static int s_encode_text(enc_ctx *c, const unsigned char *p, size_t n) {
    while (n > 0) {
        size_t k = s_find_cut(p, n);
        int rc = s_encode_chunk(c, p, k);
        if (rc) return rc;
        p += k;
        n -= k;
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------
 * Added-token split and entry point
 * ------------------------------------------------------------------------------------------ */

/* The longest added token allowed by flags that starts at p and ends within n bytes, or -1. */
static int32_t s_match_special(const tokenizer *t, int flags, const unsigned char *p, size_t n) {
    uint32_t b = t->special_begin[p[0]], e = t->special_begin[p[0] + 1];
    for (uint32_t j = b; j < e; j++) { /* longest first */
        int32_t id = t->special[j];
        if (t->type[id] != TOK_TYPE_USER_DEFINED && !(flags & TOK_PARSE_SPECIAL)) continue;
        uint32_t len = t->text_len[id];
        if (len <= n && !memcmp(p, t->text_arena + t->text_off[id], len)) return id;
    }
    return -1;
}

/* STP_EINVAL unless the spans are in order, do not overlap and lie within len bytes. */
static int s_check_spans(const tok_span *plain, size_t n_plain, size_t len, stp_err *err) {
    size_t end = 0;
    for (size_t k = 0; k < n_plain; k++) {
        if (plain[k].off < end || plain[k].off > len || plain[k].len > len - plain[k].off)
            return stp_err_set(err, STP_EINVAL,
                               "tokenize: plain span %zu (%zu+%zu) is out of order or past the "
                               "%zu-byte text",
                               k, plain[k].off, plain[k].len, len);
        end = plain[k].off + plain[k].len;
    }
    return 0;
}

int tokenizer_encode(const tokenizer *t, const char *text, size_t len, int flags, int32_t **ids,
                     size_t *n_ids, stp_err *err) {
    return tokenizer_encode_spans(t, text, len, flags, NULL, 0, ids, n_ids, err);
}

int tokenizer_encode_spans(const tokenizer *t, const char *text, size_t len, int flags,
                           const tok_span *plain, size_t n_plain, int32_t **ids, size_t *n_ids,
                           stp_err *err) {
    *ids = NULL;
    *n_ids = 0;
    if (len == 0) return 0;
    if (!text) return stp_err_set(err, STP_EINVAL, "tokenize: text is NULL but len is %zu", len);
    if (n_plain && !plain)
        return stp_err_set(err, STP_EINVAL, "tokenize: %zu plain spans but no array", n_plain);
    int rc = s_check_spans(plain, n_plain, len, err);
    if (rc) return rc;
    enc_ctx c = {.t = t, .flags = flags, .err = err};
    c.md = pcre2_match_data_create(1, NULL);
    c.mctx = pcre2_match_context_create(NULL);
    if (!c.md || !c.mctx) {
        rc = stp_err_set(err, STP_ENOMEM, "tokenize: out of memory");
        goto done;
    }
    /* Each match costs O(length of the whitespace or punctuation run it scans) and consumes
     * nearly all of it, so the default limit (10M steps) would only refuse long runs of spaces
     * (100 MB of them) without protecting anything. */
    pcre2_set_match_limit(c.mctx, UINT32_MAX);
    if (t->re_jit) {
        c.jit_stack = pcre2_jit_stack_create(32 * 1024, 8 * 1024 * 1024, NULL);
        if (c.jit_stack) pcre2_jit_stack_assign(c.mctx, NULL, c.jit_stack);
    }
    if (tok_bpe_new(&c.bpe, len >= CACHE_MIN_LEN) != 0) {
        rc = stp_err_set(err, STP_ENOMEM, "tokenize: out of memory");
        goto done;
    }
    const unsigned char *p = (const unsigned char *)text;
    size_t seg = 0, k = 0; /* plain[k]: the first span that does not end at or before i */
    for (size_t i = 0; i < len;) {
        if (t->special_begin[p[i]] == t->special_begin[p[i] + 1]) {
            i++;
            continue;
        }
        /* An added token must lie wholly inside one plain span (then CONTROL tokens do not
         * match there) or wholly outside all of them. */
        while (k < n_plain && plain[k].off + plain[k].len <= i)
            k++;
        int fl = flags;
        size_t lim = len;
        if (k < n_plain && plain[k].off <= i) {
            fl &= ~TOK_PARSE_SPECIAL;
            lim = plain[k].off + plain[k].len;
        } else if (k < n_plain) {
            lim = plain[k].off;
        }
        int32_t id = s_match_special(t, fl, p + i, lim - i);
        if (id < 0) {
            i++;
            continue;
        }
        if ((rc = s_encode_text(&c, p + seg, i - seg)) != 0) goto done;
        if ((rc = tok_ids_push(&c.ids, &c.n_ids, &c.cap_ids, id)) != 0) {
            stp_err_set(err, rc, "tokenize: out of memory");
            goto done;
        }
        i += t->text_len[id];
        seg = i;
    }
    rc = s_encode_text(&c, p + seg, len - seg);
done:
    if (rc == STP_ENOMEM && err && err->code != STP_ENOMEM)
        stp_err_set(err, rc, "tokenize: out of memory after %zu ids", c.n_ids);
    if (c.md) pcre2_match_data_free(c.md);
    if (c.mctx) pcre2_match_context_free(c.mctx);
    if (c.jit_stack) pcre2_jit_stack_free(c.jit_stack);
    tok_bpe_destroy(&c.bpe);
    free(c.san);
    free(c.nfc);
    if (rc) {
        free(c.ids);
        return rc;
    }
    *ids = c.ids;
    *n_ids = c.n_ids;
    return 0;
}
