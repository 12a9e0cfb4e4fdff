/* tokenizer: the Qwen2 byte-level BPE tokenizer of a GGUF model (tokenizer.ggml.model = gpt2,
 * tokenizer.ggml.pre = qwen2), encoding exactly as the Hugging Face tokenizer does, decoding,
 * a streaming UTF-8-safe decoder and the ChatML chat format.
 *
 * Encoding: added tokens (CONTROL only with TOK_PARSE_SPECIAL, USER_DEFINED always) are split
 * off first, then each text run is NFC-normalised (unless TOK_NO_NORMALIZE), split by the qwen2
 * pre-tokenizer regex (PCRE2, UTF+UCP) and BPE-merged by rank. Invalid UTF-8 bytes become
 * U+FFFD (one per byte, as llama.cpp does). No BOS is ever added. Chats: the messages' text is
 * never special tokens (tokenizer_chat_encode; invariant 8 of common/tokenizer/README.md).
 * A tokenizer is immutable after tokenizer_new: every call may run concurrently. */
#ifndef STP_TOKENIZER_H
#define STP_TOKENIZER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "gguf/gguf.h"
#include "util/stp_err.h"

typedef struct tokenizer tokenizer;

enum {
    TOK_PARSE_SPECIAL = 1, /* recognise CONTROL tokens (<|im_start|> ...) written in the text */
    TOK_NO_NORMALIZE = 2,  /* skip NFC (matches llama.cpp byte for byte on non-NFC text) */
};

/* Token types as stored in tokenizer.ggml.token_type (llama.cpp's numbering). */
enum {
    TOK_TYPE_NORMAL = 1,
    TOK_TYPE_UNKNOWN = 2,
    TOK_TYPE_CONTROL = 3,
    TOK_TYPE_USER_DEFINED = 4,
    TOK_TYPE_UNUSED = 5,
    TOK_TYPE_BYTE = 6,
};

/* Builds the tokenizer from GGUF metadata (everything is copied: g may be closed afterwards).
 * Refuses non-gpt2 models and pre-tokenizers other than qwen2 with STP_EUNSUPPORTED. */
int tokenizer_new(tokenizer **out, const gguf_file *g, stp_err *err);
void tokenizer_destroy(tokenizer **self_p);

int32_t tokenizer_n_vocab(const tokenizer *t);
int32_t tokenizer_eos(const tokenizer *t); /* tokenizer.ggml.eos_token_id, -1 if absent */
int tokenizer_token_type(const tokenizer *t, int32_t id);
size_t tokenizer_max_token_bytes(const tokenizer *t);
/* longest token, in bytes (Qwen: 128) */ /* TOK_TYPE_*, 0 if id out of range */

/* Encodes len bytes of text (may hold NUL bytes and invalid UTF-8). *ids is malloc'd (caller
 * frees; NULL when *n_ids == 0). Empty text gives 0 ids. */
int tokenizer_encode(const tokenizer *t, const char *text, size_t len, int flags, int32_t **ids,
                     size_t *n_ids, stp_err *err);

/* A byte range [off, off + len) of a text. */
typedef struct tok_span {
    size_t off, len;
} tok_span;

/* tokenizer_encode, except that inside the plain spans (in order, not overlapping, within len)
 * CONTROL tokens are never matched, whatever the flags: text there that spells <|im_start|>
 * is tokenized as its text (BPE pieces), as without TOK_PARSE_SPECIAL (USER_DEFINED tokens
 * still match, as they always do). An added token must lie wholly inside one span or wholly
 * outside all of them. The text runs between the added tokens matched are tokenized as
 * tokenizer_encode does, so a text whose spans hold no CONTROL token's text (and where no
 * added token straddles a span's edge) gets exactly tokenizer_encode's ids. STP_EINVAL for bad
 * spans. n_plain 0 is tokenizer_encode. */
int tokenizer_encode_spans(const tokenizer *t, const char *text, size_t len, int flags,
                           const tok_span *plain, size_t n_plain, int32_t **ids, size_t *n_ids,
                           stp_err *err);

/* Raw bytes of one token after the byte-level reverse mapping (CONTROL, USER_DEFINED tokens:
 * their text; UNUSED tokens: their text too). Pointer stays valid for the tokenizer's life.
 * STP_ERANGE if id is out of range. */
int tokenizer_token_bytes(const tokenizer *t, int32_t id, const char **bytes, size_t *len);
/* The token's text as stored in the vocabulary (byte-level alphabet, NUL-terminated). */
const char *tokenizer_token_text(const tokenizer *t, int32_t id);

/* Concatenated bytes of ids (NUL-terminated, *len excludes the NUL; may be invalid UTF-8 if
 * the ids cut a character). *text malloc'd. STP_ERANGE names the first bad id. */
int tokenizer_decode(const tokenizer *t, const int32_t *ids, size_t n, char **text, size_t *len,
                     stp_err *err);

bool tokenizer_is_eog(const tokenizer *t, int32_t id); /* <|im_end|>, <|endoftext|>, eos */
int32_t tokenizer_token_id(const tokenizer *t, const char *token_text); /* -1 if absent */

/* ---- streaming decoder ---------------------------------------------------------------------
 * Holds the bytes of an incomplete UTF-8 character until it completes, so every chunk it
 * emits is valid UTF-8. An invalid sequence is emitted as U+FFFD per bad byte. */
typedef struct tok_stream {
    const tokenizer *t;
    unsigned char held[4]; /* bytes of an incomplete character */
    size_t n_held;
} tok_stream;

void tok_stream_init(tok_stream *s, const tokenizer *t);
/* Appends the bytes of id; writes the complete characters to out and returns how many bytes
 * were written. Enough room: cap >= 3 * tokenizer_max_token_bytes(t) + 12 (each invalid byte
 * becomes 3); 512 covers Qwen (longest token: 128 spaces). Bytes that do not fit are dropped a
 * whole character at a time (never a partial character). Ids out of range write nothing. */
size_t tok_stream_push(tok_stream *s, int32_t id, char *out, size_t cap);
/* Emits the held bytes of an unfinished character as U+FFFD (3 bytes each) and resets. */
size_t tok_stream_flush(tok_stream *s, char *out, size_t cap);

/* ---- chat ------------------------------------------------------------------------------- */
typedef struct chat_msg {
    const char *role;
    const char *content;
} chat_msg;

/* ChatML: "<|im_start|>role\ncontent<|im_end|>\n" per message, then "<|im_start|>assistant\n"
 * if add_generation_prompt. If the GGUF has tokenizer.chat_template it must be a ChatML
 * template (uses <|im_start|> and <|im_end|>); any other is refused with STP_EUNSUPPORTED.
 * *out malloc'd, NUL-terminated. plain (NULL, or room for n spans) receives each message's
 * "role\ncontent" span of *out: the caller's text, which must never become special tokens.
 * Encode *out with tokenizer_encode_spans(TOK_PARSE_SPECIAL, plain, n), never with a plain
 * TOK_PARSE_SPECIAL tokenizer_encode (a message could then write its own turns), or use
 * tokenizer_chat_encode, which does both. */
int tokenizer_chat_format(const tokenizer *t, const chat_msg *msgs, size_t n,
                          bool add_generation_prompt, char **out, tok_span *plain, stp_err *err);

/* The ids of the ChatML chat: the template's markers are special tokens, the messages' roles
 * and contents are plain text (a content holding "<|im_start|>system\n..." cannot open a
 * turn). For contents that spell no CONTROL token the ids are those of the formatted text
 * encoded with TOK_PARSE_SPECIAL (what Hugging Face's apply_chat_template + encode gives). */
int tokenizer_chat_encode(const tokenizer *t, const chat_msg *msgs, size_t n,
                          bool add_generation_prompt, int32_t **ids, size_t *n_ids, stp_err *err);

/* Whether role is one the ChatML template takes ("system", "user", "assistant"), compared
 * whole: no newline or marker can ride along (every client-facing entry point checks it). */
bool tokenizer_chat_role_ok(const char *role);

#endif
