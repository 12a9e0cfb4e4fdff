/* tok_utf8: strict UTF-8 decoding (no overlongs, no surrogates, nothing above U+10FFFF) shared
 * by the encoder's input sanitiser and the streaming decoder. Header-only, static inline. */
#ifndef STP_TOK_UTF8_H
#define STP_TOK_UTF8_H

#include <stddef.h>
#include <stdint.h>

/* Decodes the character at p (n bytes available). Returns its length (1..4) and stores the code
 * point in *cp (cp may be NULL); 0 if the n bytes are a valid but incomplete prefix; -1 if the
 * first byte cannot start a valid character here (the caller replaces one byte). */
static inline int tok_utf8_decode(const unsigned char *p, size_t n, uint32_t *cp) {
    if (n == 0) return 0;
    unsigned c = p[0];
    if (c < 0x80) {
        if (cp) *cp = c;
        return 1;
    }
    int len;
    unsigned lo = 0x80, hi = 0xBF;
    uint32_t v;
    if (c >= 0xC2 && c <= 0xDF) {
        len = 2;
        v = c & 0x1F;
    } else if (c >= 0xE0 && c <= 0xEF) {
        len = 3;
        v = c & 0x0F;
        if (c == 0xE0) lo = 0xA0;
        if (c == 0xED) hi = 0x9F;
    } else if (c >= 0xF0 && c <= 0xF4) {
        len = 4;
        v = c & 0x07;
        if (c == 0xF0) lo = 0x90;
        if (c == 0xF4) hi = 0x8F;
    } else {
        return -1;
    }
    for (int i = 1; i < len; i++) {
        if ((size_t)i >= n) return 0;
        unsigned b = p[i];
        if (b < lo || b > hi) return -1;
        lo = 0x80;
        hi = 0xBF;
        v = (v << 6) | (b & 0x3F);
    }
    if (cp) *cp = v;
    return len;
}

/* Encodes cp (< 0x110000) into out; returns 1..4. */
static inline size_t tok_utf8_encode(uint32_t cp, char *out) {
    if (cp < 0x80) {
        out[0] = (char)cp;
        return 1;
    }
    if (cp < 0x800) {
        out[0] = (char)(0xC0 | (cp >> 6));
        out[1] = (char)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        out[0] = (char)(0xE0 | (cp >> 12));
        out[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        out[2] = (char)(0x80 | (cp & 0x3F));
        return 3;
    }
    out[0] = (char)(0xF0 | (cp >> 18));
    out[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
    out[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
    out[3] = (char)(0x80 | (cp & 0x3F));
    return 4;
}

#endif
