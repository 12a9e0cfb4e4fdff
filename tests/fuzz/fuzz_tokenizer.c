/* fuzz_tokenizer: libFuzzer target for the Qwen2 BPE tokenizer (common/tokenizer/).
 *
 * The vocabulary (tests/data/tokenizer/qwen2-vocab.gguf) is loaded once in
 * LLVMFuzzerInitialize from $STP_TEST_DATA, else from STP_FUZZ_DATA_DIR compiled in by CMake.
 * Each input is used twice:
 * 1. as text, encoded with every combination of TOK_PARSE_SPECIAL and TOK_NO_NORMALIZE: every
 *    id is in the vocabulary; decode() succeeds and is valid UTF-8 (invalid input bytes become
 *    U+FFFD); for valid UTF-8 input decode(encode(x)) == x with TOK_NO_NORMALIZE and == NFC(x)
 *    otherwise (utf8proc; when the text contains '<', an added token may split the NFC runs, so
 *    only NFC(decode) == NFC(x) is required); the streaming decoder fed the same ids emits only
 *    valid UTF-8 chunks whose concatenation equals decode() when decode() is valid UTF-8;
 *    tokenizer_chat_format on the text as a user message succeeds, and its ids
 *    (tokenizer_chat_encode, and tokenizer_encode_spans on the formatted text with its spans)
 *    hold exactly the template's five CONTROL tokens, whatever the content spells;
 * 2. as a sequence of little-endian 16-bit ids modulo n_vocab + 64 (so some are out of range):
 *    decode() refuses exactly the sequences with an out-of-range id, and the streaming decoder
 *    still emits only valid UTF-8 (held bytes of cut characters become U+FFFD). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <utf8proc.h>

#include "gguf/gguf.h"
#include "tokenizer/tokenizer.h"

#ifndef STP_FUZZ_DATA_DIR
#define STP_FUZZ_DATA_DIR "tests/data"
#endif

#define FUZZ_CHECK(cond)                                                                           \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "fuzz_tokenizer: check failed at line %d: %s\n", __LINE__, #cond);     \
            abort();                                                                               \
        }                                                                                          \
    } while (0)

#define FZ_STREAM_CAP 512

/* The one tokenizer of this process: libFuzzer gives the target no other place to keep it. */
static tokenizer *fz_tok;

/* Strict UTF-8: no overlongs, no surrogates, nothing above U+10FFFF. */
static bool fz_utf8_valid(const uint8_t *s, size_t n) {
    size_t i = 0;
    while (i < n) {
        utf8proc_int32_t cp;
        utf8proc_ssize_t k = utf8proc_iterate(s + i, (utf8proc_ssize_t)(n - i), &cp);
        if (k <= 0 || cp < 0) return false;
        i += (size_t)k;
    }
    return true;
}

/* NFC of n bytes of valid UTF-8 (NUL bytes included); malloc'd, length in *out_len. */
static uint8_t *fz_nfc(const uint8_t *s, size_t n, size_t *out_len) {
    utf8proc_uint8_t *dst = NULL;
    utf8proc_ssize_t r =
        utf8proc_map(s, (utf8proc_ssize_t)n, &dst, UTF8PROC_STABLE | UTF8PROC_COMPOSE);
    FUZZ_CHECK(r >= 0 && dst);
    *out_len = (size_t)r;
    return dst;
}

static bool fz_eq(const void *a, size_t na, const void *b, size_t nb) {
    return na == nb && (na == 0 || memcmp(a, b, na) == 0);
}

/* Feeds ids to a streaming decoder; every chunk must be valid UTF-8. Returns the concatenation
 * (malloc'd, *len bytes). */
static char *fz_stream(const int32_t *ids, size_t n, size_t *len) {
    tok_stream st;
    tok_stream_init(&st, fz_tok);
    size_t cap = (n + 1) * FZ_STREAM_CAP, used = 0;
    char *all = malloc(cap);
    FUZZ_CHECK(all);
    for (size_t i = 0; i <= n; i++) {
        char chunk[FZ_STREAM_CAP];
        size_t k = i < n ? tok_stream_push(&st, ids[i], chunk, sizeof chunk)
                         : tok_stream_flush(&st, chunk, sizeof chunk);
        FUZZ_CHECK(k <= sizeof chunk);
        FUZZ_CHECK(fz_utf8_valid((const uint8_t *)chunk, k));
        memcpy(all + used, chunk, k);
        used += k;
    }
    FUZZ_CHECK(st.n_held == 0);
    *len = used;
    return all;
}

static void fz_text(const uint8_t *data, size_t size) {
    bool valid = fz_utf8_valid(data, size);
    bool has_lt = memchr(data, '<', size) != NULL;
    int32_t n_vocab = tokenizer_n_vocab(fz_tok);
    for (int flags = 0; flags < 4; flags++) {
        int32_t *ids = NULL;
        size_t n = 0;
        stp_err err = {0};
        int rc = tokenizer_encode(fz_tok, (const char *)data, size, flags, &ids, &n, &err);
        FUZZ_CHECK(rc == 0);
        FUZZ_CHECK(n == 0 ? ids == NULL : ids != NULL);
        FUZZ_CHECK(size == 0 || n > 0);
        for (size_t i = 0; i < n; i++)
            FUZZ_CHECK(ids[i] >= 0 && ids[i] < n_vocab);
        char *dec = NULL;
        size_t dlen = 0;
        rc = tokenizer_decode(fz_tok, ids, n, &dec, &dlen, &err);
        FUZZ_CHECK(rc == 0 && dec && dec[dlen] == 0);
        FUZZ_CHECK(fz_utf8_valid((const uint8_t *)dec, dlen));
        if (valid) {
            if (flags & TOK_NO_NORMALIZE) {
                FUZZ_CHECK(fz_eq(dec, dlen, data, size));
            } else {
                size_t nlen, dnlen;
                uint8_t *nfc = fz_nfc(data, size, &nlen);
                if (!has_lt) {
                    FUZZ_CHECK(fz_eq(dec, dlen, nfc, nlen));
                } else {
                    uint8_t *dnfc = fz_nfc((const uint8_t *)dec, dlen, &dnlen);
                    FUZZ_CHECK(fz_eq(dnfc, dnlen, nfc, nlen));
                    free(dnfc);
                }
                free(nfc);
            }
        }
        size_t slen;
        char *streamed = fz_stream(ids, n, &slen);
        FUZZ_CHECK(fz_eq(streamed, slen, dec, dlen));
        free(streamed);
        free(dec);
        free(ids);
    }

    /* Chat format: the text as the user's content (up to its first NUL). */
    char *content = malloc(size + 1);
    FUZZ_CHECK(content);
    memcpy(content, data, size);
    content[size] = 0;
    chat_msg msgs[2] = {{"system", "You are a fuzzer."}, {"user", content}};
    char *chat = NULL;
    stp_err err = {0};
    tok_span plain[2];
    FUZZ_CHECK(tokenizer_chat_format(fz_tok, msgs, 2, true, &chat, plain, &err) == 0 && chat);
    int32_t *ids = NULL, *ids2 = NULL;
    size_t n = 0, n2 = 0;
    FUZZ_CHECK(tokenizer_encode_spans(fz_tok, chat, strlen(chat), TOK_PARSE_SPECIAL, plain, 2, &ids,
                                      &n, &err) == 0);
    FUZZ_CHECK(tokenizer_chat_encode(fz_tok, msgs, 2, true, &ids2, &n2, &err) == 0);
    FUZZ_CHECK(n == n2 && !memcmp(ids, ids2, n * sizeof *ids));
    size_t n_control = 0;
    for (size_t i = 0; i < n; i++)
        n_control += tokenizer_token_type(fz_tok, ids[i]) == TOK_TYPE_CONTROL;
    FUZZ_CHECK(n_control == 5); /* im_start, im_end per message, im_start of the answer */
    free(ids);
    free(ids2);
    free(chat);
    free(content);
}

static void fz_ids(const uint8_t *data, size_t size) {
    int32_t n_vocab = tokenizer_n_vocab(fz_tok);
    size_t n = size / 2;
    int32_t *ids = malloc((n ? n : 1) * sizeof *ids);
    FUZZ_CHECK(ids);
    bool in_range = true;
    for (size_t i = 0; i < n; i++) {
        uint32_t v = (uint32_t)data[2 * i] | (uint32_t)data[2 * i + 1] << 8;
        /* Spread 16 bits over the whole vocabulary (151k) plus 64 ids past its end. */
        ids[i] = (int32_t)((v * 3u + (uint32_t)(i & 1)) % (uint32_t)(n_vocab + 64));
        if (ids[i] >= n_vocab) in_range = false;
    }
    char *dec = NULL;
    size_t dlen = 0;
    stp_err err = {0};
    int rc = tokenizer_decode(fz_tok, ids, n, &dec, &dlen, &err);
    if (in_range) {
        FUZZ_CHECK(rc == 0 && dec && dec[dlen] == 0);
    } else {
        FUZZ_CHECK(rc == STP_ERANGE && err.msg[0]);
    }
    size_t slen;
    char *streamed = fz_stream(ids, n, &slen);
    if (rc == 0 && fz_utf8_valid((const uint8_t *)dec, dlen))
        FUZZ_CHECK(fz_eq(streamed, slen, dec, dlen));
    for (size_t i = 0; i < n; i++) {
        const char *b;
        size_t bl;
        int r = tokenizer_token_bytes(fz_tok, ids[i], &b, &bl);
        FUZZ_CHECK(ids[i] < n_vocab ? r == 0 && (bl == 0 || b) : r == STP_ERANGE);
        FUZZ_CHECK(bl <= tokenizer_max_token_bytes(fz_tok) || ids[i] >= n_vocab);
    }
    free(streamed);
    free(dec);
    free(ids);
}

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc;
    (void)argv;
    const char *dir = getenv("STP_TEST_DATA");
    char path[4096];
    snprintf(path, sizeof path, "%s/tokenizer/qwen2-vocab.gguf",
             dir && *dir ? dir : STP_FUZZ_DATA_DIR);
    gguf_file *g = NULL;
    stp_err err = {0};
    if (gguf_open(&g, path, &err) || tokenizer_new(&fz_tok, g, &err)) {
        fprintf(stderr, "fuzz_tokenizer: cannot load %s: %s (set STP_TEST_DATA)\n", path, err.msg);
        exit(2);
    }
    gguf_close(&g);
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    fz_text(data, size);
    fz_ids(data, size);
    return 0;
}
