/* gen_loop: prompt -> eval -> sample -> stream, shared by chat and serve; see gen_loop.h.
 * Stop strings are matched on the decoded text; the streamed text never contains a stop
 * string or a prefix of one that was later completed. */
#include "gen_loop.h"

#include <stdlib.h>
#include <string.h>
#include <time.h>

double gen_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

void gen_result_fini(gen_result *res) {
    if (!res) return;
    free(res->ids);
    free(res->text);
    memset(res, 0, sizeof *res);
}

/* Appends len bytes to the result text. */
static int s_append(gen_result *res, size_t *cap, const char *s, size_t len) {
    if (res->len + len + 1 > *cap) {
        size_t nc = *cap ? *cap : 256;
        while (nc < res->len + len + 1)
            nc *= 2;
        char *nt = realloc(res->text, nc);
        if (!nt) return STP_ENOMEM;
        res->text = nt;
        *cap = nc;
    }
    memcpy(res->text + res->len, s, len);
    res->len += len;
    res->text[res->len] = 0;
    return 0;
}

/* Earliest stop string occurrence starting at or after from; returns its offset or -1. */
static long s_find_stop(const gen_result *res, size_t from, const gen_params *p) {
    long best = -1;
    for (int i = 0; i < p->n_stop; i++) {
        const char *st = p->stop[i];
        size_t sl = strlen(st);
        if (!sl || sl > res->len) continue;
        const char *hit = memmem(res->text + from, res->len - from, st, sl);
        if (hit && (best < 0 || hit - res->text < best)) best = hit - res->text;
    }
    return best;
}

/* Length of the longest suffix of the text (after from) that is a proper prefix of a stop
 * string: those bytes are held back until they can no longer start a stop string. */
static size_t s_held_tail(const gen_result *res, size_t from, const gen_params *p) {
    size_t held = 0;
    for (int i = 0; i < p->n_stop; i++) {
        size_t sl = strlen(p->stop[i]);
        for (size_t k = sl > 0 ? sl - 1 : 0; k > held; k--) {
            if (k > res->len - from) continue;
            if (!memcmp(res->text + res->len - k, p->stop[i], k)) {
                held = k;
                break;
            }
        }
    }
    return held;
}

int gen_run(backend *b, const int32_t *prompt, int n_prompt, const gen_params *p, gen_emit_fn emit,
            void *ud, const volatile sig_atomic_t *cancel, gen_result *res, stp_err *err) {
    memset(res, 0, sizeof *res);
    double t_start = gen_now();
    const tokenizer *tok = b->tok;
    const int V = backend_n_vocab(b), n_ctx = backend_n_ctx(b);
    int rc = 0;
    sampler *smp = NULL;
    float *logits = NULL;
    size_t text_cap = 0, ids_cap = 0, sent = 0;
    if (n_prompt < 1) return stp_err_set(err, STP_EINVAL, "the prompt is empty (no tokens)");
    if (backend_n_past(b) + n_prompt > n_ctx)
        return stp_err_set(err, STP_ERANGE,
                           "the prompt needs %d tokens but the context has %d of %d free", n_prompt,
                           n_ctx - backend_n_past(b), n_ctx);
    if ((rc = sampler_new(&smp, &p->sp, V, err))) return rc;
    logits = malloc(sizeof(float) * (size_t)V);
    size_t sbuf_cap = 3 * (tok ? tokenizer_max_token_bytes(tok) : 128) + 16;
    char *sbuf = malloc(sbuf_cap);
    if (!logits || !sbuf || s_append(res, &text_cap, "", 0)) {
        rc = stp_err_set(err, STP_ENOMEM, "out of memory");
        goto out;
    }
    double t0 = gen_now();
    if ((rc = backend_eval(b, prompt, n_prompt, logits, err))) goto out;
    res->t_prompt = gen_now() - t0;
    res->n_prompt = n_prompt;
    for (int i = 0; i < n_prompt; i++)
        sampler_accept(smp, prompt[i]);

    tok_stream ts;
    tok_stream_init(&ts, tok);
    size_t max_stop = 0;
    for (int i = 0; i < p->n_stop; i++)
        if (strlen(p->stop[i]) > max_stop) max_stop = strlen(p->stop[i]);
    res->finish = GEN_FINISH_LENGTH;
    t0 = gen_now();
    bool done = false, cut = false, refused = false;
    while (!done) {
        if (cancel && *cancel) {
            res->finish = GEN_FINISH_CANCEL;
            break;
        }
        int32_t id = sampler_sample(smp, logits);
        sampler_accept(smp, id);
        if ((size_t)res->n_gen == ids_cap) {
            size_t nc = ids_cap ? ids_cap * 2 : 64;
            int32_t *ni = realloc(res->ids, nc * sizeof *ni);
            if (!ni) {
                rc = stp_err_set(err, STP_ENOMEM, "out of memory");
                goto out;
            }
            res->ids = ni;
            ids_cap = nc;
        }
        res->ids[res->n_gen++] = id;
        if (res->n_gen == 1) res->t_first = gen_now() - t_start;
        bool eog = tok && tokenizer_is_eog(tok, id);
        if (eog && !p->ignore_eos) {
            res->finish = GEN_FINISH_STOP;
            done = true;
        } else if (!eog && tok) {
            size_t nb = tok_stream_push(&ts, id, sbuf, sbuf_cap);
            size_t from = res->len > max_stop ? res->len - max_stop : 0;
            if (nb && (rc = s_append(res, &text_cap, sbuf, nb))) goto out;
            long at = p->n_stop ? s_find_stop(res, from, p) : -1;
            if (at >= 0) {
                res->len = (size_t)at; /* cut the stop string and anything after it */
                res->text[res->len] = 0;
                res->finish = GEN_FINISH_STOP;
                done = cut = true;
            }
        }
        if (!done && p->max_tokens > 0 && res->n_gen >= p->max_tokens) done = true;
        if (!done && backend_n_past(b) >= n_ctx) done = true; /* context full: length */
        /* stream what can no longer become part of a stop string */
        size_t upto = done ? res->len : res->len - s_held_tail(res, sent, p);
        if (upto > sent && emit) {
            if (emit(ud, res->text + sent, upto - sent)) {
                if (!done) res->finish = GEN_FINISH_CANCEL;
                done = refused = true;
            }
        }
        if (upto > sent) sent = upto;
        if (done) break;
        if ((rc = backend_eval(b, &id, 1, logits, err))) goto out;
    }
    if (tok && !cut) { /* an unfinished character at the end becomes U+FFFD */
        size_t nb = tok_stream_flush(&ts, sbuf, sbuf_cap);
        if (nb && (rc = s_append(res, &text_cap, sbuf, nb))) goto out;
    }
    if (emit && !refused && res->len > sent) emit(ud, res->text + sent, res->len - sent);
    res->t_gen = gen_now() - t0;
out:
    free(sbuf);
    free(logits);
    sampler_destroy(&smp);
    return rc;
}
