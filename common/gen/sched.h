/* sched: continuous batching of generation requests over a multi-sequence backend.
 *
 * Requests wait in arrival order until a sequence slot of the backend is free. Each step
 * evaluates, in one backend pass, the next token of every decoding request and a bounded chunk
 * of waiting prompt tokens (chunked prefill: streams keep flowing while a long prompt is read),
 * then samples every request whose logits came back (common/gen/token_step: sampling, stop
 * strings, streamed text, finish reasons). Requests join and leave between steps.
 *
 * Prefix reuse: a finished request leaves its tokens in its slot. A new request takes the idle
 * slot whose tokens share the longest prefix with its prompt (ties and no match: the least
 * recently used slot) and evaluates only the rest, down to at least its last prompt token (its
 * logits start the answer). Sliding-window layers keep a prefix only while their rings still
 * hold what the next position looks at (kv_cache_keep_max); otherwise the prompt is evaluated
 * whole.
 *
 * KV pool: the slots together hold at most kv_positions positions (a memory budget reserves
 * that many, not n_seq x n_ctx; a backend's caches cost memory only for positions held). A
 * request is admitted when its prompt (what is not reused) fits beside what the running
 * requests hold and the prompts they are still reading; idle slots give their positions back,
 * least recently used first, when needed. When the pool is full, the most recently admitted
 * answering request ends as if its context were full (finish length).
 *
 * Same answer under load: a prompt is cut into chunks at fixed positions (multiples of
 * prefill_chunk, and its end), whatever else runs, and a step only takes whole chunks; every
 * other part of a step is row by row (backend.h), so a request gets the same ids alone or batched
 * (given the same slot contents: prefix reuse changes where its first chunk starts).
 *
 * Not thread-safe: one thread submits, steps and receives the callbacks (which run inside
 * sched_step, sched_submit or sched_destroy). */
#ifndef STP_SCHED_H
#define STP_SCHED_H

#include <signal.h>
#include <stdbool.h>

#include "gen/backend.h"
#include "gen/gen_loop.h"

typedef struct sched sched;

typedef struct sched_params {
    int prefill_chunk; /* prompt tokens per chunk (chunks start at multiples of it); 0: 64 */
    int n_batch;       /* tokens per step at most; 0: the backend's n_batch */
    int kv_positions;  /* positions all slots may hold at once (the KV pool); 0: n_seq x n_ctx */
    /* While requests decode, a prompt chunk runs this many layers a step (its tokens wait in
     * the backend between steps), so a step beside decoding sequences costs them a slice of the
     * chunk, not all of it; 0: the model's layers / SCHED_PREFILL_SLICES (rounded up); < 0, or
     * a backend that cannot (backend_n_layer 0): the whole chunk in one step. Not in a burst:
     * when two or more requests are reading their prompts, at least as many as decoding, and
     * one step holds what they have left to read, the step reads all of it, as with nobody
     * decoding (they share the weight reads). */
    int prefill_layers;
} sched_params;

#define SCHED_PREFILL_SLICES 16

/* The end of a request: called once, with res (prompt and answer counts, ids, text, timings,
 * finish) whose buffers become the callee's (gen_result_fini them); rc is 0 or the negative
 * STP_E* that ended it (err says why: a prompt that does not fit, a failed backend). */
typedef void (*sched_done_fn)(void *ud, gen_result *res, int rc, const stp_err *err);

typedef struct sched_req {
    const int32_t *prompt; /* copied */
    int n_prompt;          /* >= 1 */
    gen_params gp;         /* gp.stop (and its strings) must live until done is called */
    gen_emit_fn emit;      /* new text (may be NULL); nonzero cancels */
    sched_done_fn done;    /* required */
    void *ud;
    const volatile sig_atomic_t *cancel; /* polled before each token (may be NULL) */
} sched_req;

int sched_new(sched **out, backend *b, const sched_params *p, stp_err *err);
/* Ends every request (done with GEN_FINISH_CANCEL) and frees the scheduler. */
void sched_destroy(sched **self_p);
/* Queues a request. Fails (nothing queued, done not called) only when out of memory or the
 * request is malformed (no prompt, no done). */
int sched_submit(sched *s, const sched_req *r, stp_err *err);
/* True when a request waits or runs (sched_step has work). */
bool sched_busy(const sched *s);
int sched_n_running(const sched *s); /* requests holding a slot */
int sched_n_waiting(const sched *s); /* requests waiting for one */
/* One step: admits waiting requests to free slots, evaluates, samples, streams, finishes. A
 * backend failure ends the requests of that step (done with its error); the others go on.
 * Returns the number of tokens evaluated (0: nothing to do). */
int sched_step(sched *s);

/* Counters since sched_new (for /metrics and tests). */
typedef struct sched_stats {
    unsigned long long steps, tokens_decoded, tokens_prefilled, tokens_reused, requests;
    unsigned long long slots_evicted;  /* idle slots emptied to make room in the KV pool */
    unsigned long long pool_full;      /* answers ended because the KV pool was full */
    unsigned long long prefill_slices; /* steps that took a prompt chunk part way through the
                                        * layers and not yet to the last (prefill_layers) */
} sched_stats;
const sched_stats *sched_get_stats(const sched *s);

#endif
