/* chat_memo: the ids of the server's last answers, by their chat text; see chat_memo.h. A small
 * array searched whole (a few entries per sequence slot), compared byte by byte. */
#include "chat_memo.h"

#include <pthread.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

typedef struct s_entry {
    char *text; /* NULL: empty */
    size_t len;
    int32_t *ids;
    size_t n_ids;
    tok_span *spans;
    size_t n_spans;
    unsigned long long used; /* clock of the last put or hit */
} s_entry;

struct chat_memo {
    pthread_mutex_t mu;
    s_entry *e;
    int n;
    unsigned long long clock, lookups, hits;
};

chat_memo *chat_memo_new(int n) {
    chat_memo *m = calloc(1, sizeof *m);
    if (!m) return NULL;
    m->n = n > 0 ? n : 1;
    m->e = calloc((size_t)m->n, sizeof *m->e);
    if (!m->e) {
        free(m);
        return NULL;
    }
    pthread_mutex_init(&m->mu, NULL);
    return m;
}

static void s_clear(s_entry *e) {
    free(e->text);
    free(e->ids);
    free(e->spans);
    *e = (s_entry){0};
}

void chat_memo_destroy(chat_memo **self_p) {
    chat_memo *m = *self_p;
    if (!m) return;
    for (int i = 0; i < m->n; i++)
        s_clear(&m->e[i]);
    free(m->e);
    pthread_mutex_destroy(&m->mu);
    free(m);
    *self_p = NULL;
}

void chat_memo_put(chat_memo *m, char *text, size_t len, tok_span *spans, size_t n_spans,
                   int32_t *ids, size_t n_ids) {
    if (!text || !spans || !ids || !n_spans ||
        spans[n_spans - 1].off + spans[n_spans - 1].len != len) {
        free(text);
        free(spans);
        free(ids);
        return;
    }
    pthread_mutex_lock(&m->mu);
    int slot = 0;
    for (int k = 0; k < m->n; k++) {
        const s_entry *e = &m->e[k];
        if (e->text && e->len <= len && !memcmp(e->text, text, e->len)) { /* a turn earlier */
            slot = k;
            break;
        }
        if (!e->text || (m->e[slot].text && e->used < m->e[slot].used)) slot = k;
    }
    s_clear(&m->e[slot]);
    m->e[slot] = (s_entry){text, len, ids, n_ids, spans, n_spans, ++m->clock};
    pthread_mutex_unlock(&m->mu);
}

/* Whether the chat (text, spans) continues entry e (chat_memo_find's rule). */
static bool s_continues(const s_entry *e, const char *text, size_t len, const tok_span *spans,
                        size_t n_spans, const char *next, size_t next_len) {
    if (e->len > len || len - e->len < next_len || e->n_spans > n_spans) return false;
    for (size_t k = 0; k < e->n_spans; k++)
        if (spans[k].off != e->spans[k].off || spans[k].len != e->spans[k].len) return false;
    return !memcmp(text + e->len, next, next_len) && !memcmp(e->text, text, e->len);
}

size_t chat_memo_find(chat_memo *m, const char *text, size_t len, const tok_span *spans,
                      size_t n_spans, const char *next, int32_t **ids, size_t *n_ids) {
    *ids = NULL;
    *n_ids = 0;
    const size_t next_len = strlen(next);
    pthread_mutex_lock(&m->mu);
    m->lookups++;
    int best = -1;
    for (int k = 0; k < m->n; k++) {
        const s_entry *e = &m->e[k];
        if (e->text && (best < 0 || e->len > m->e[best].len) &&
            s_continues(e, text, len, spans, n_spans, next, next_len))
            best = k;
    }
    size_t found = 0;
    if (best >= 0) {
        s_entry *e = &m->e[best];
        *ids = malloc(sizeof **ids * (e->n_ids ? e->n_ids : 1));
        if (*ids) {
            if (e->n_ids) memcpy(*ids, e->ids, sizeof **ids * e->n_ids);
            *n_ids = e->n_ids;
            found = e->len;
            e->used = ++m->clock;
            m->hits++;
        }
    }
    pthread_mutex_unlock(&m->mu);
    return found;
}

void chat_memo_counts(chat_memo *m, unsigned long long *lookups, unsigned long long *hits) {
    pthread_mutex_lock(&m->mu);
    *lookups = m->lookups;
    *hits = m->hits;
    pthread_mutex_unlock(&m->mu);
}
