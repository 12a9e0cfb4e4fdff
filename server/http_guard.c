/* http_guard: the checks `stpipe serve` makes on a request before it reads the body: the
 * Bearer API key (compared in constant time), the CORS origin, and the decoded URL. Pure
 * functions over strings; the server decides what to answer (docs/SERVER.md, "Limits").
 * Invariant: nothing here depends on the backend, so the same checks front any engine. */
#include <stdint.h>
#include <string.h>
#include <strings.h>

#include "http_server.h"

bool http_guard_bearer_ok(const char *authorization, const char *key) {
    if (!key || !*key) return true;
    if (!authorization || strncasecmp(authorization, "Bearer ", 7)) return false;
    const char *got = authorization + 7;
    while (*got == ' ')
        got++;
    size_t gl = strlen(got), kl = strlen(key);
    while (gl > 0 && got[gl - 1] == ' ')
        gl--;
    /* every byte of the key is compared whatever the earlier ones were; a length difference
     * counts as a difference (the key's length is all the timing can tell) */
    unsigned diff = gl != kl;
    for (size_t i = 0; i < kl; i++)
        diff |= (unsigned char)key[i] ^ (unsigned char)(i < gl ? got[i] : 0);
    return diff == 0;
}

/* Length of the UTF-8 sequence at p (1-4) if it is well formed (no overlong forms, no
 * surrogates, at most U+10FFFF), else 0. */
static size_t s_utf8_len(const unsigned char *p) {
    unsigned c = p[0];
    if (c < 0x80) return 1;
    size_t n = c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : c >= 0xC2 ? 2 : 0;
    if (!n || c > 0xF4) return 0;
    for (size_t i = 1; i < n; i++)
        if ((p[i] & 0xC0) != 0x80) return 0;
    if (c == 0xE0 && p[1] < 0xA0) return 0;  /* overlong */
    if (c == 0xED && p[1] >= 0xA0) return 0; /* surrogate */
    if (c == 0xF0 && p[1] < 0x90) return 0;  /* overlong */
    if (c == 0xF4 && p[1] >= 0x90) return 0; /* above U+10FFFF */
    return n;
}

bool http_guard_url_ok(const char *url) {
    const unsigned char *p = (const unsigned char *)url;
    while (*p) {
        if (*p < 0x20 || *p == 0x7F) return false;
        size_t n = s_utf8_len(p);
        if (!n) return false;
        p += n;
    }
    return true;
}

const char *http_guard_cors(const char *allowed, const char *origin) {
    if (!allowed || !origin) return NULL;
    if (!strcmp(allowed, "*")) return "*";
    return strcmp(allowed, origin) ? NULL : allowed;
}
