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

void chat_memo_put(chat_memo *m, const char *prompt_text, size_t prompt_len, const char *answer,
                   size_t answer_len, const int32_t *prompt, size_t n_prompt,
                   const int32_t *answer_ids, size_t n_answer) {
    const size_t len = prompt_len + answer_len, n_ids = n_prompt + n_answer;
    char *text = malloc(len + 1);
    int32_t *ids = malloc(sizeof *ids * (n_ids ? n_ids : 1));
    if (!text || !ids) {
        free(text);
        free(ids);
        return;
    }
    memcpy(text, prompt_text, prompt_len);
    memcpy(text + prompt_len, answer, answer_len);
    text[len] = 0;
    memcpy(ids, prompt, sizeof *ids * n_prompt);
    memcpy(ids + n_prompt, answer_ids, sizeof *ids * n_answer);
    pthread_mutex_lock(&m->mu);
    int slot = 0;
    for (int i = 0; i < m->n; i++) {
        const s_entry *e = &m->e[i];
        if (e->text && e->len <= len && !memcmp(e->text, text, e->len)) { /* a turn earlier */
            slot = i;
            break;
        }
        if (!e->text || (m->e[slot].text && e->used < m->e[slot].used)) slot = i;
    }
    s_clear(&m->e[slot]);
    m->e[slot] = (s_entry){text, len, ids, n_ids, ++m->clock};
    pthread_mutex_unlock(&m->mu);
}

size_t chat_memo_find(chat_memo *m, const char *text, size_t len, const size_t *cuts, size_t n_cuts,
                      int32_t **ids, size_t *n_ids) {
    *ids = NULL;
    *n_ids = 0;
    pthread_mutex_lock(&m->mu);
    m->lookups++;
    int best = -1;
    for (int i = 0; i < m->n; i++) {
        const s_entry *e = &m->e[i];
        if (!e->text || e->len > len || (best >= 0 && e->len <= m->e[best].len)) continue;
        bool cut = false;
        for (size_t c = 0; c < n_cuts && !cut; c++)
            cut = cuts[c] == e->len;
        if (cut && !memcmp(e->text, text, e->len)) best = i;
    }
    size_t found = 0;
    if (best >= 0) {
        s_entry *e = &m->e[best];
        *ids = malloc(sizeof **ids * (e->n_ids ? e->n_ids : 1));
        if (*ids) {
            memcpy(*ids, e->ids, sizeof **ids * e->n_ids);
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
