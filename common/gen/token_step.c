/* token_step: sample, end of generation, streamed text and stop strings for one request; see
 * token_step.h. All state is in the struct (no statics): one step per sequence. */
#include "token_step.h"

#include <stdlib.h>
#include <string.h>

struct token_step {
    token_step_params p; /* p.stop points at stops */
    char **stops;        /* copies of the non-empty stop strings */
    int n_stops;
    size_t max_stop; /* longest stop string, bytes */
    sampler *smp;
    tok_stream ts;
    bool text;       /* detokenize (tok given, text wanted) */
    size_t push_cap; /* room one tok_stream_push or flush may write */
    char *buf;       /* the answer, NUL-terminated */
    size_t len, cap;
    size_t sent; /* bytes of buf handed out to stream */
    long long n_gen;
    token_finish finish;
    bool ended; /* finished or token_step_end: nothing more is sampled or streamed */
};

int token_step_new(token_step **out, const token_step_params *p, stp_err *err) {
    *out = NULL;
    token_step *s = calloc(1, sizeof *s);
    if (!s) return stp_err_set(err, STP_ENOMEM, "token_step: out of memory");
    s->p = *p;
    s->text = p->tok && !p->no_text;
    s->push_cap = 3 * (p->tok ? tokenizer_max_token_bytes(p->tok) : 128) + 16;
    s->cap = 256;
    s->buf = malloc(s->cap);
    s->stops = calloc(p->n_stop > 0 ? (size_t)p->n_stop : 1, sizeof *s->stops);
    int rc = s->buf && s->stops ? 0 : STP_ENOMEM;
    for (int i = 0; !rc && i < p->n_stop; i++) {
        size_t sl = p->stop[i] ? strlen(p->stop[i]) : 0;
        if (!sl) continue;
        if (!(s->stops[s->n_stops] = strdup(p->stop[i])))
            rc = STP_ENOMEM;
        else
            s->n_stops++;
        if (sl > s->max_stop) s->max_stop = sl;
    }
    s->p.stop = (const char *const *)s->stops;
    s->p.n_stop = s->n_stops;
    if (rc) {
        token_step_destroy(&s);
        return stp_err_set(err, rc, "token_step: out of memory");
    }
    if ((rc = sampler_new(&s->smp, &p->sp, p->n_vocab, err))) {
        token_step_destroy(&s);
        return rc;
    }
    s->buf[0] = 0;
    if (p->tok) tok_stream_init(&s->ts, p->tok);
    *out = s;
    return 0;
}

void token_step_destroy(token_step **self_p) {
    token_step *s = *self_p;
    if (!s) return;
    for (int i = 0; s->stops && i < s->n_stops; i++)
        free(s->stops[i]);
    free(s->stops);
    free(s->buf);
    sampler_destroy(&s->smp);
    free(s);
    *self_p = NULL;
}

void token_step_prompt(token_step *s, const int32_t *ids, int n) {
    for (int i = 0; i < n; i++)
        sampler_accept(s->smp, ids[i]);
}

/* Room for extra more bytes and the NUL. */
static int s_reserve(token_step *s, size_t extra) {
    if (s->len + extra + 1 <= s->cap) return 0;
    size_t nc = s->cap;
    while (nc < s->len + extra + 1)
        nc *= 2;
    char *nb = realloc(s->buf, nc);
    if (!nb) return STP_ENOMEM;
    s->buf = nb;
    s->cap = nc;
    return 0;
}

/* Earliest stop string occurrence starting at or after from; its offset or -1. */
static long s_find_stop(const token_step *s, size_t from) {
    long best = -1;
    for (int i = 0; i < s->n_stops; i++) {
        size_t sl = strlen(s->stops[i]);
        if (sl > s->len) continue;
        const char *hit = memmem(s->buf + from, s->len - from, s->stops[i], sl);
        if (hit && (best < 0 || hit - s->buf < best)) best = hit - s->buf;
    }
    return best;
}

/* Length of the longest suffix of the unsent text that is a proper prefix of a stop string:
 * those bytes are held back until they can no longer start a stop string. */
static size_t s_held_tail(const token_step *s) {
    size_t held = 0;
    for (int i = 0; i < s->n_stops; i++) {
        const char *st = s->stops[i];
        for (size_t k = strlen(st) - 1; k > held; k--) {
            if (k > s->len - s->sent) continue;
            if (!memcmp(s->buf + s->len - k, st, k)) {
                held = k;
                break;
            }
        }
    }
    return held;
}

/* Ends the answer: flushes an unfinished character (unless a stop string cut the text) and
 * hands out everything not yet streamed. */
static int s_release(token_step *s, bool flush, token_step_out *out) {
    if (flush && s->text) {
        if (s_reserve(s, s->push_cap)) return STP_ENOMEM;
        s->len += tok_stream_flush(&s->ts, s->buf + s->len, s->push_cap);
        s->buf[s->len] = 0;
    }
    out->text = s->buf + s->sent;
    out->len = s->len - s->sent;
    out->finish = s->finish;
    s->sent = s->len;
    s->ended = true;
    return 0;
}

static bool s_at_limit(const token_step *s) {
    return s->p.max_tokens >= 0 && s->n_gen >= s->p.max_tokens;
}

int token_step_accept(token_step *s, int32_t id, token_step_out *out) {
    *out = (token_step_out){.id = -1, .text = s->buf + s->sent, .finish = s->finish};
    if (s->ended) return 0;
    if (s_at_limit(s)) {
        s->finish = TOKEN_FINISH_LENGTH;
        return s_release(s, true, out);
    }
    if (id < 0 || id >= s->p.n_vocab) return STP_EINVAL;
    sampler_accept(s->smp, id);
    s->n_gen++;
    out->id = id;
    out->eog = s->p.tok && tokenizer_is_eog(s->p.tok, id);
    bool cut = false;
    if (out->eog && !s->p.ignore_eos) {
        s->finish = TOKEN_FINISH_EOS;
    } else if (!out->eog && s->text) {
        if (s_reserve(s, s->push_cap)) return STP_ENOMEM;
        size_t from = s->len > s->max_stop ? s->len - s->max_stop : 0;
        s->len += tok_stream_push(&s->ts, id, s->buf + s->len, s->push_cap);
        s->buf[s->len] = 0;
        long at = s->n_stops ? s_find_stop(s, from) : -1;
        if (at >= 0) {
            s->len = (size_t)at; /* cut the stop string and anything after it */
            s->buf[s->len] = 0;
            s->finish = TOKEN_FINISH_STOP;
            cut = true;
        }
    }
    if (!s->finish && s_at_limit(s)) s->finish = TOKEN_FINISH_LENGTH;
    if (s->finish) return s_release(s, !cut, out);
    size_t upto = s->len - s_held_tail(s); /* what can no longer become part of a stop string */
    out->text = s->buf + s->sent;
    out->len = upto - s->sent;
    s->sent = upto;
    return 0;
}

int token_step_next(token_step *s, float *logits, token_step_out *out) {
    int32_t id = s->ended || s_at_limit(s) ? -1 : sampler_sample(s->smp, logits);
    return token_step_accept(s, id, out);
}

int token_step_end(token_step *s, token_step_out *out) {
    *out = (token_step_out){.id = -1, .text = s->buf + s->sent, .finish = s->finish};
    return s->ended ? 0 : s_release(s, true, out);
}

const char *token_step_text(const token_step *s, size_t *len) {
    if (len) *len = s->len;
    return s->buf;
}

long long token_step_n_gen(const token_step *s) {
    return s->n_gen;
}
