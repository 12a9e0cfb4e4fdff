/* gen_loop: prompt -> eval -> token step -> stream, shared by chat and serve; see gen_loop.h.
 * Sampling, end of generation, text and stop strings are the token step's (gen/token_step.h);
 * this loop adds the backend, cancellation, the emit callback and the timings. */
#include "gen/gen_loop.h"

#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "gen/token_step.h"

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

int gen_run(backend *b, const int32_t *prompt, int n_prompt, const gen_params *p, gen_emit_fn emit,
            void *ud, const volatile sig_atomic_t *cancel, gen_result *res, stp_err *err) {
    memset(res, 0, sizeof *res);
    double t_start = gen_now();
    const int V = backend_n_vocab(b), n_ctx = backend_n_ctx(b);
    int rc = 0;
    token_step *step = NULL;
    float *logits = NULL;
    size_t ids_cap = 0;
    if (n_prompt < 1) return stp_err_set(err, STP_EINVAL, "the prompt is empty (no tokens)");
    if (backend_n_past(b) + n_prompt > n_ctx)
        return stp_err_set(err, STP_ERANGE,
                           "the prompt needs %d tokens but the context has %d of %d free", n_prompt,
                           n_ctx - backend_n_past(b), n_ctx);
    /* a full context ends the answer as max_tokens does: the last id sampled is not evaluated,
     * so the context holds room + 1 of them */
    long long room = n_ctx - (backend_n_past(b) + n_prompt) + 1;
    token_step_params tp = {.sp = p->sp,
                            .n_vocab = V,
                            .max_tokens =
                                p->max_tokens > 0 && p->max_tokens < room ? p->max_tokens : room,
                            .stop = p->stop,
                            .n_stop = p->n_stop,
                            .ignore_eos = p->ignore_eos,
                            .tok = b->tok};
    if ((rc = token_step_new(&step, &tp, err))) return rc;
    logits = malloc(sizeof(float) * (size_t)V);
    if (!logits) {
        rc = stp_err_set(err, STP_ENOMEM, "out of memory");
        goto out;
    }
    double t0 = gen_now();
    if ((rc = backend_eval(b, prompt, n_prompt, logits, err))) goto out;
    res->t_prompt = gen_now() - t0;
    res->n_prompt = n_prompt;
    token_step_prompt(step, prompt, n_prompt);

    res->finish = GEN_FINISH_LENGTH;
    t0 = gen_now();
    token_step_out o;
    bool refused = false;
    for (;;) {
        if (cancel && *cancel) {
            res->finish = GEN_FINISH_CANCEL;
            break;
        }
        if ((rc = token_step_next(step, logits, &o))) {
            rc = stp_err_set(err, rc, "out of memory");
            goto out;
        }
        if (o.id >= 0 && (size_t)res->n_gen == ids_cap) {
            size_t nc = ids_cap ? ids_cap * 2 : 64;
            int32_t *ni = realloc(res->ids, nc * sizeof *ni);
            if (!ni) {
                rc = stp_err_set(err, STP_ENOMEM, "out of memory");
                goto out;
            }
            res->ids = ni;
            ids_cap = nc;
        }
        if (o.id >= 0) res->ids[res->n_gen++] = o.id;
        if (res->n_gen == 1 && o.id >= 0) res->t_first = gen_now() - t_start;
        if (o.finish)
            res->finish = o.finish == TOKEN_FINISH_LENGTH ? GEN_FINISH_LENGTH : GEN_FINISH_STOP;
        if (o.len && emit && emit(ud, o.text, o.len)) {
            if (!o.finish) res->finish = GEN_FINISH_CANCEL;
            refused = true;
            break;
        }
        if (o.finish) break;
        if ((rc = backend_eval(b, &o.id, 1, logits, err))) goto out;
    }
    /* an answer cut short (cancel, emit refused): the held text and an unfinished character */
    if ((rc = token_step_end(step, &o))) {
        rc = stp_err_set(err, rc, "out of memory");
        goto out;
    }
    if (emit && !refused && o.len) emit(ud, o.text, o.len);
    res->t_gen = gen_now() - t0;
out:;
    size_t len = 0;
    const char *text = step ? token_step_text(step, &len) : "";
    if ((res->text = malloc(len + 1))) {
        memcpy(res->text, text, len + 1);
        res->len = len;
    } else if (!rc) {
        rc = stp_err_set(err, STP_ENOMEM, "out of memory");
    }
    free(logits);
    token_step_destroy(&step);
    return rc;
}
