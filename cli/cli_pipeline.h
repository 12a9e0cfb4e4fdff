/* cli_pipeline: the client side of `stpipe generate --pipeline RUN_DIR` (and `stpipe stats`).
 * It sends one GenerateRequest to the coordinator on RUN_DIR/client.sock (pipe_client.h) and
 * prints the streamed text exactly as the in-process command does (text, or the ids with --ids,
 * which come with GenerateDone), then the timings. When *cancel becomes nonzero (Ctrl-C) it sends
 * a CancelRequest and waits (a few seconds at most) for the end of the answer. */
#ifndef STP_CLI_PIPELINE_H
#define STP_CLI_PIPELINE_H

#include <signal.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "model/sampler.h"
#include "pipe_client.h"
#include "tokenizer/tokenizer.h"

/* What the coordinator's GenerateDone reported (times in ms). */
typedef struct pipeline_gen_result {
    int n_prompt, n_gen;
    double prompt_ms, gen_ms, ipc_ms;
    int n_prompt_eval; /* prompt tokens evaluated (the rest reused from a slot) */
    double ttft_ms;
    char stop_reason[16];
    engine_stats stages; /* GenerateDone's (pipe_client_done) */
} pipeline_gen_result;

typedef struct pipeline_gen_opts {
    const char *run_dir;
    const int32_t *prompt_ids; /* either ids ... */
    int n_prompt;
    int n_untimed; /* leading prompt ids evaluated before the prompt clock starts (bench -d) */
    const char *prompt_text; /* ... or text, tokenized by the coordinator */
    bool chat;
    const char *system;
    bool parse_special;       /* default true, as in-process */
    const chat_msg *messages; /* ... or a conversation (ChatML, its text never special tokens) */
    size_t n_messages;
    long long n_predict;     /* -1: until end of generation */
    const char *const *stop; /* stop strings */
    int n_stop;
    sampler_params sp;
    bool ids_out, ignore_eos, quiet;
    const char *logits_out; /* float32 logits of every prompt position */
    int timeout_ms;         /* no message for this long fails (0: 120000) */
    /* Optional streaming hooks (stpipe chat): text goes to on_text instead of stdout (no
     * newline or ids are printed); when *cancel becomes nonzero the request is cancelled
     * (CancelRequest) and the answer so far ends it. */
    void (*on_text)(void *ud, const char *text, size_t len);
    void *ud;
    const volatile sig_atomic_t *cancel;
    pipeline_gen_result *result; /* optional: filled when the request completes */
} pipeline_gen_opts;

/* Returns the process exit code (0 ok, 1 error). */
int cli_generate_pipeline(const pipeline_gen_opts *o);

/* `stpipe stats --run-dir D [--watch] [--json]` */
int cli_stats(int argc, char **argv);

#endif
