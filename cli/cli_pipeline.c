/* cli_pipeline: `stpipe generate --pipeline RUN_DIR`, the coordinator's client; see
 * cli_pipeline.h. */
#include "cli_pipeline.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>

#include <zmq.h>

#include "client.pb-c.h"
#include "msg/msg.h"
#include "msg/stage.h"

/* Heartbeat interval towards the coordinator: STP_HEARTBEAT_MS, else the run's, else 1000. */
static int s_heartbeat_ms(const char *run_dir) {
    const char *e = getenv("STP_HEARTBEAT_MS");
    int ms = e ? atoi(e) : 0;
    if (ms >= 50 && ms <= 60000) return ms;
    return strncmp(run_dir, "tcp://", 6) ? stage_heartbeat_ms(run_dir) : STAGE_HEARTBEAT_MS_DEF;
}

static int s_ping(void *s, uint64_t nonce, uint64_t rid) {
    Stp__Ping p;
    stp__ping__init(&p);
    p.nonce = nonce;
    p.request_id = rid;
    Stp__ClientMsg m;
    stp__client_msg__init(&m);
    m.version = STP_PROTO_VERSION;
    m.body_case = STP__CLIENT_MSG__BODY_PING;
    m.ping = &p;
    return msg_send(s, NULL, 0, &m.base, NULL);
}

int cli_generate_pipeline(const pipeline_gen_opts *o) {
    stp_err err = {0};
    char ep[512];
    int status = 1;
    void *zctx = zmq_ctx_new(), *s = NULL;
    FILE *lf = NULL;
    bool tcp = !strncmp(o->run_dir, "tcp://", 6); /* a coordinator started with --bind-tcp */
    if (tcp && (size_t)snprintf(ep, sizeof ep, "%s", o->run_dir) >= sizeof ep) ep[0] = 0;
    if ((!tcp && msg_endpoint(ep, sizeof ep, o->run_dir, "client", &err)) ||
        !(s = msg_socket(zctx, ZMQ_DEALER, ep, false, &err))) {
        fprintf(stderr, "stpipe generate: %s\n", err.msg);
        goto out;
    }
    Stp__SamplingParams sp;
    stp__sampling_params__init(&sp);
    sp.temperature = o->sp.temperature;
    sp.top_k = o->sp.top_k;
    sp.top_p = o->sp.top_p;
    sp.min_p = o->sp.min_p;
    sp.repeat_penalty = o->sp.repeat_penalty;
    sp.presence_penalty = o->sp.presence_penalty;
    sp.frequency_penalty = o->sp.frequency_penalty;
    sp.penalty_last_n = o->sp.penalty_last_n;
    sp.seed = o->sp.seed;
    Stp__GenerateRequest rq;
    stp__generate_request__init(&rq);
    uint64_t rid = 0;
    if (getrandom(&rid, sizeof rid, 0) != sizeof rid) rid = (uint64_t)msg_now_us();
    rq.request_id = rid;
    rq.n_prompt_ids = o->prompt_ids ? (size_t)o->n_prompt : 0;
    rq.prompt_ids = (int32_t *)o->prompt_ids;
    rq.n_untimed = o->n_untimed;
    rq.prompt_text = (char *)(o->prompt_text ? o->prompt_text : "");
    rq.chat = o->chat;
    rq.system = (char *)(o->system ? o->system : "");
    rq.parse_special = o->parse_special;
    rq.n_predict = (int32_t)(o->n_predict > INT32_MAX ? INT32_MAX : o->n_predict);
    rq.ignore_eos = o->ignore_eos;
    rq.want_prompt_logits = o->logits_out != NULL;
    rq.want_text = !o->ids_out;
    rq.sampling = &sp;
    Stp__ClientMsg m;
    stp__client_msg__init(&m);
    m.version = STP_PROTO_VERSION;
    m.body_case = STP__CLIENT_MSG__BODY_REQUEST;
    m.request = &rq;
    double t0 = msg_now_us();
    if (msg_send(s, NULL, 0, &m.base, &err)) {
        fprintf(stderr, "stpipe generate: %s\n", err.msg);
        goto out;
    }
    /* Liveness (MDP style): after hb ms without a message the client pings; a coordinator
     * silent for STAGE_LIVENESS intervals is dead, one that no longer knows the request was
     * restarted. Progress: no token for `timeout` ms fails too; until the first token the
     * prompt's evaluation (one message, no events) is allowed 250 ms more per prompt token (a
     * floor of 4 tokens/s: a long prompt under a memory budget streams every expert), counting a
     * text prompt's bytes as its tokens (never fewer). */
    int timeout = o->timeout_ms > 0 ? o->timeout_ms : 120000;
    const double n_units =
        o->prompt_ids    ? (double)o->n_prompt
        : o->prompt_text ? (double)strlen(o->prompt_text) + (o->system ? strlen(o->system) : 0)
                         : 0.0;
    const double prefill_allow_ms = 250.0 * n_units;
    int hb = s_heartbeat_ms(o->run_dir);
    double last_rx = msg_now_us(), last_progress = last_rx, last_ping = last_rx;
    uint64_t nonce = 0;
    int cap = 64, n_ids = 0;
    int32_t *ids = malloc(sizeof(int32_t) * (size_t)cap);
    double t_first = 0;
    for (bool fin = false; !fin;) {
        bool rd;
        double now = msg_now_us();
        if (o->cancel && *o->cancel) { /* abandoned by the caller (Ctrl-C in chat) */
            status = 0;
            break;
        }
        if ((now - last_progress) * 1e-3 > timeout + (n_ids == 0 ? prefill_allow_ms : 0)) {
            fprintf(stderr, "\nstpipe generate: no progress from the pipeline in %s within %d s\n",
                    o->run_dir, timeout / 1000);
            break;
        }
        if ((now - last_rx) * 1e-3 > (double)STAGE_LIVENESS * hb) {
            fprintf(stderr,
                    "\nstpipe generate: the coordinator in %s is not answering (%d heartbeats of "
                    "%d ms missed; is the pipeline running? deploy/stpipe-up)\n",
                    o->run_dir, STAGE_LIVENESS, hb);
            break;
        }
        if ((now - last_ping) * 1e-3 >= hb && (now - last_rx) * 1e-3 >= hb) {
            s_ping(s, ++nonce, rid);
            last_ping = now;
        }
        if (!msg_poll(&s, 1, &rd, hb / 2) || !rd) continue;
        msg_in in;
        if (msg_recv(s, false, &in, &err) <= 0) continue;
        last_rx = msg_now_us();
        Stp__ClientMsg *r = stp__client_msg__unpack(NULL, in.len, in.data);
        msg_in_free(&in);
        if (!r || r->version != STP_PROTO_VERSION) {
            fprintf(stderr, "stpipe generate: invalid reply from the coordinator\n");
            if (r) stp__client_msg__free_unpacked(r, NULL);
            break;
        }
        switch (r->body_case) {
        case STP__CLIENT_MSG__BODY_ERROR:
            fprintf(stderr, "\nstpipe generate: %s\n", r->error->what);
            fin = true;
            break;
        case STP__CLIENT_MSG__BODY_PONG:
            if (r->pong->request_id == rid && !r->pong->known) {
                fprintf(stderr,
                        "\nstpipe generate: the coordinator (pid %d) no longer knows this "
                        "request: it was restarted; the request is lost, retry it\n",
                        r->pong->pid);
                fin = true;
            }
            break;
        case STP__CLIENT_MSG__BODY_LOGITS: {
            const Stp__PromptLogits *pl = r->logits;
            if (!lf) lf = fopen(o->logits_out, "wb");
            if (!lf || fwrite(pl->data.data, 1, pl->data.len, lf) != pl->data.len) {
                fprintf(stderr, "stpipe generate: cannot write '%s'\n", o->logits_out);
                fin = true;
            }
            break;
        }
        case STP__CLIENT_MSG__BODY_TOKEN:
            if (r->token->request_id != rid) break;
            last_progress = msg_now_us();
            if (!t_first) t_first = msg_now_us();
            if (n_ids == cap) {
                cap *= 2;
                int32_t *nids = realloc(ids, sizeof(int32_t) * (size_t)cap);
                if (!nids) {
                    fin = true;
                    break;
                }
                ids = nids;
            }
            ids[n_ids++] = r->token->id;
            if (!o->ids_out && r->token->text.len) {
                if (o->on_text) {
                    o->on_text(o->ud, (const char *)r->token->text.data, r->token->text.len);
                } else {
                    fwrite(r->token->text.data, 1, r->token->text.len, stdout);
                    fflush(stdout);
                }
            }
            break;
        case STP__CLIENT_MSG__BODY_DONE: {
            const Stp__GenerateDone *d = r->done;
            if (o->result)
                *o->result = (pipeline_gen_result){d->n_prompt, d->n_gen, d->prompt_ms, d->gen_ms,
                                                   d->ipc_ms};
            if (o->on_text) {
                if (d->tail_text.len)
                    o->on_text(o->ud, (const char *)d->tail_text.data, d->tail_text.len);
            } else if (o->ids_out) {
                for (int i = 0; i < n_ids; i++)
                    printf(i ? " %d" : "%d", ids[i]);
                printf("\n");
            } else {
                if (d->tail_text.len) fwrite(d->tail_text.data, 1, d->tail_text.len, stdout);
                printf("\n");
            }
            if (!o->quiet) {
                double gen_s = d->gen_ms * 1e-3;
                fprintf(stderr,
                        "pipeline %s | prompt %d tokens in %.3f s | generated %d tokens in %.3f s "
                        "(%.1f tok/s) | ipc %.1f%% of decode | total %.3f s\n",
                        o->run_dir, d->n_prompt, d->prompt_ms * 1e-3, d->n_gen, gen_s,
                        d->n_gen > 1 && gen_s > 0 ? (d->n_gen - 1) / gen_s : 0.0,
                        d->gen_ms > 0 ? 100.0 * d->ipc_ms / d->gen_ms : 0.0,
                        (msg_now_us() - t0) * 1e-6);
            }
            status = 0;
            fin = true;
            break;
        }
        default: break;
        }
        stp__client_msg__free_unpacked(r, NULL);
    }
    free(ids);
out:
    if (lf && fclose(lf)) status = 1;
    msg_close(&s);
    zmq_ctx_term(zctx);
    return status;
}
