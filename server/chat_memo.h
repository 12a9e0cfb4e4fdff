/* chat_memo: the ids of the server's last answers, found again by the text a client sends back.
 *
 * A chat client sends the whole conversation every turn, the previous answer as the text the
 * server returned. Encoding that text again need not give the ids the model wrote (byte-level
 * BPE does not round-trip every id sequence; with random weights it almost never does), and
 * every id after the first difference misses the prefix the scheduler's slot still holds: the
 * answer, and all that follows, is read again. The memo keeps, for the last few answers, the
 * text of the chat up to the end of the answer, its messages' plain spans and the ids the model
 * read and wrote. A chat that continues such an entry (the same text and the same messages up to
 * the end of that answer's message, then the template's <|im_end|>, a special token, where the
 * encoder splits the text anyway) takes the entry's ids and encodes only the rest.
 *
 * Invariants:
 * 1. An entry's ids are those a request read (its prompt) followed by those it wrote (its answer
 *    less a final end-of-generation id), and its text is the chat text that request was encoded
 *    from followed by the answer exactly as the server returned it.
 * 2. Only answers whose text stands for their ids are kept: ended by length or by an
 *    end-of-generation token (not cut by a stop string or cancelled), their ids' bytes exactly
 *    the text returned (no U+FFFD standing for a cut character) and no CONTROL or UNUSED id
 *    among them (their text, sent back, is plain text in a message, never that id). The caller
 *    checks this (chat_memo_put takes what it is given).
 * 3. A match is a chat whose plain spans (its messages) start with the entry's exactly: text a
 *    client sent inside one message never takes ids the entry had for template markers, and the
 *    cut is where a message ends.
 * 4. At most n entries (least recently used replaced); an entry whose text is a prefix of a new
 *    one (the same conversation, a turn earlier) is replaced by it.
 * Thread-safe (one mutex): requests are encoded on connection threads, answers recorded on the
 * worker thread. */
#ifndef STP_CHAT_MEMO_H
#define STP_CHAT_MEMO_H

#include <stddef.h>
#include <stdint.h>

#include "tokenizer/tokenizer.h"

typedef struct chat_memo chat_memo;

/* A memo of n entries (n >= 1); NULL when out of memory. */
chat_memo *chat_memo_new(int n);
void chat_memo_destroy(chat_memo **self_p);

/* Records an exchange and takes its malloc'd buffers (freed here when not kept): the chat text up
 * to the end of its answer (len bytes), its plain spans (the prompt's messages, then the answer's
 * message, which ends at len) and its ids (prompt, then answer). A NULL buffer (the caller ran
 * out of memory) records nothing: the memo is an optimisation. */
void chat_memo_put(chat_memo *m, char *text, size_t len, tok_span *spans, size_t n_spans,
                   int32_t *ids, size_t n_ids);

/* The longest entry the chat (text[0..len), its plain spans) continues: the entry's text is
 * text[0..L), its spans are the chat's first spans, the last of them ends at L, and text[L..]
 * starts with `next`. Its ids are copied to *ids (malloc'd, *n_ids of them) and L returned; 0
 * (and *ids NULL) when none is. */
size_t chat_memo_find(chat_memo *m, const char *text, size_t len, const tok_span *spans,
                      size_t n_spans, const char *next, int32_t **ids, size_t *n_ids);

/* Lookups and hits since chat_memo_new. */
void chat_memo_counts(chat_memo *m, unsigned long long *lookups, unsigned long long *hits);

#endif
