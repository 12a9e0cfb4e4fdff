/* cli_pipeline: `stpipe generate --pipeline RUN_DIR`, the coordinator's client; see
 * cli_pipeline.h. */
#include "cli_pipeline.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "msg/msg.h"
#include "pipe_client.h"

/* One request's state between the client's callbacks. */
typedef struct gen_state {
    const pipeline_gen_opts *o;
    uint64_t rid;
    bool fin, ok;
    FILE *lf;
    double t0, last_progress;
    int n_text;
} gen_state;

static void s_on_text(void *ud, uint64_t rid, const char *text, size_t len) {
    gen_state *g = ud;
    if (rid != g->rid) return;
    g->last_progress = msg_now_us();
    g->n_text++;
    if (g->o->ids_out) return;
    if (g->o->on_text) {
        g->o->on_text(g->o->ud, text, len);
    } else {
        fwrite(text, 1, len, stdout);
        fflush(stdout);
    }
}

static void s_on_logits(void *ud, uint64_t rid, int first_row, int n_rows, int n_vocab,
                        const void *data, size_t len) {
    (void)first_row, (void)n_rows, (void)n_vocab;
    gen_state *g = ud;
    if (rid != g->rid || !g->o->logits_out) return;
    g->last_progress = msg_now_us();
    if (!g->lf) g->lf = fopen(g->o->logits_out, "wb");
    if (!g->lf || fwrite(data, 1, len, g->lf) != len) {
        fprintf(stderr, "stpipe generate: cannot write '%s'\n", g->o->logits_out);
        g->fin = true;
    }
}

static void s_on_done(void *ud, uint64_t rid, const pipe_client_done *d) {
    gen_state *g = ud;
    const pipeline_gen_opts *o = g->o;
    if (rid != g->rid) return;
    if (o->result) {
        *o->result = (pipeline_gen_result){.n_prompt = d->n_prompt,
                                           .n_gen = d->n_gen,
                                           .prompt_ms = d->prompt_ms,
                                           .gen_ms = d->gen_ms,
                                           .ipc_ms = d->ipc_ms,
                                           .n_prompt_eval = d->n_prompt_eval,
                                           .ttft_ms = d->ttft_ms,
                                           .stages = d->stages};
        snprintf(o->result->stop_reason, sizeof o->result->stop_reason, "%s", d->stop_reason);
    }
    if (o->on_text) {
        if (d->tail_len) o->on_text(o->ud, d->tail, d->tail_len);
    } else if (o->ids_out) {
        for (int i = 0; i < d->n_gen; i++)
            printf(i ? " %d" : "%d", d->ids[i]);
        printf("\n");
    } else {
        if (d->tail_len) fwrite(d->tail, 1, d->tail_len, stdout);
        printf("\n");
    }
    if (!o->quiet) {
        double gen_s = d->gen_ms * 1e-3;
        fprintf(stderr,
                "pipeline %s | prompt %d tokens (%d evaluated) in %.3f s | generated %d tokens in "
                "%.3f s (%.1f tok/s) | ipc %.1f%% of decode | total %.3f s\n",
                o->run_dir, d->n_prompt, d->n_prompt_eval, d->prompt_ms * 1e-3, d->n_gen, gen_s,
                d->n_gen > 1 && gen_s > 0 ? (d->n_gen - 1) / gen_s : 0.0,
                d->gen_ms > 0 ? 100.0 * d->ipc_ms / d->gen_ms : 0.0, (msg_now_us() - g->t0) * 1e-6);
    }
    g->ok = true;
    g->fin = true;
}

static void s_on_error(void *ud, uint64_t rid, int code, const char *what) {
    (void)code;
    gen_state *g = ud;
    if (rid != g->rid) return;
    fprintf(stderr, "\nstpipe generate: %s\n", what);
    g->fin = true;
}

/* The coordinator still runs it: progress for an answer that streams no text (ids only, a
 * model without a tokenizer); the coordinator's own eval timeout bounds a stuck pipeline. */
static void s_on_alive(void *ud, uint64_t rid) {
    gen_state *g = ud;
    if (rid == g->rid && g->o->ids_out) g->last_progress = msg_now_us();
}

int cli_generate_pipeline(const pipeline_gen_opts *o) {
    stp_err err = {0};
    gen_state g = {.o = o, .t0 = msg_now_us()};
    pipe_client_cb cb = {s_on_text, s_on_logits, s_on_done, s_on_error, s_on_alive, &g};
    pipe_client *pc = NULL;
    if (pipe_client_new(&pc, o->run_dir, &cb, &err)) {
        fprintf(stderr, "stpipe generate: %s\n", err.msg);
        return 1;
    }
    pipe_client_req rq = {.prompt_ids = o->prompt_ids,
                          .n_prompt = o->n_prompt,
                          .prompt_text = o->prompt_text,
                          .chat = o->chat,
                          .system = o->system,
                          .parse_special = o->parse_special,
                          .messages = o->messages,
                          .n_messages = o->n_messages,
                          .n_predict = o->n_predict,
                          .sp = o->sp,
                          .ignore_eos = o->ignore_eos,
                          .want_text = !o->ids_out,
                          .want_prompt_logits = o->logits_out != NULL,
                          .n_untimed = o->n_untimed,
                          .stop = o->stop,
                          .n_stop = o->n_stop};
    if (pipe_client_submit(pc, &rq, &g.rid, &err)) {
        fprintf(stderr, "stpipe generate: %s\n", err.msg);
        pipe_client_destroy(&pc);
        return 1;
    }
    /* Progress: no text for `timeout` ms fails; until the first text the prompt's evaluation is
     * allowed 250 ms more per prompt token (a floor of 4 tokens/s: a long prompt under a memory
     * budget streams every expert), counting a text prompt's bytes as its tokens (never fewer).
     * Liveness is pipe_client's (heartbeats). */
    int timeout = o->timeout_ms > 0 ? o->timeout_ms : 120000;
    double n_units = o->prompt_ids ? (double)o->n_prompt
                     : o->prompt_text
                         ? (double)strlen(o->prompt_text) + (o->system ? strlen(o->system) : 0)
                         : 0.0;
    for (size_t i = 0; o->messages && i < o->n_messages; i++)
        n_units += (double)strlen(o->messages[i].content) + 8;
    const double prefill_allow_ms = 250.0 * n_units;
    g.last_progress = msg_now_us();
    double cancelled_at = 0;
    while (!g.fin) {
        double now = msg_now_us();
        if (o->cancel && *o->cancel && !cancelled_at) { /* Ctrl-C: end the answer there */
            pipe_client_cancel(pc, g.rid);
            cancelled_at = now;
        }
        if (cancelled_at && (now - cancelled_at) * 1e-3 > 5000) break;
        if ((now - g.last_progress) * 1e-3 > timeout + (g.n_text == 0 ? prefill_allow_ms : 0)) {
            fprintf(stderr, "\nstpipe generate: no progress from the pipeline in %s within %d s\n",
                    o->run_dir, timeout / 1000);
            break;
        }
        if (pipe_client_poll(pc, 100, &err) == STP_ETIMEDOUT) {
            fprintf(stderr, "\nstpipe generate: %s: %s\n", o->run_dir, err.msg);
            break;
        }
    }
    int status = g.ok || (cancelled_at && !g.fin) ? 0 : 1;
    pipe_client_destroy(&pc); /* cancels the request if it is still running */
    if (g.lf && fclose(g.lf)) status = 1;
    return status;
}
