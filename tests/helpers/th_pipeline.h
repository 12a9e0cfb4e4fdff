/* th_pipeline: test helpers around the multi-process pipeline (deploy/stpipe-up and
 * stpipe-down) and the golden JSONs it is checked against. Run directories are paths the
 * caller owns (usually under $STP_TMP); nothing here keeps state between calls. */
#ifndef TH_PIPELINE_H
#define TH_PIPELINE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "stats.pb-c.h"

/* A golden case: $STP_TEST_DATA/<stem>.gguf and the prompt/greedy ids of <stem>.short.json. */
typedef struct th_golden {
    char model[512];
    char ids[4096]; /* prompt ids as "1 2 3" */
    int greedy[256];
    int n_greedy;
} th_golden;

/* Loads <stem>.short.json (asserts it parses). */
void th_golden_load(th_golden *g, const char *stem);

/* "$STP_TMP/<kind>-<tag>-<pid>" into buf ($STP_TMP is created). */
const char *th_pipe_dir(char *buf, size_t cap, const char *kind, const char *tag);

/* bash deploy/stpipe-up --model M --run-dir D --workers W --bin-dir $STP_BIN_DIR --timeout T
 * --threads 1 --cache-type f32 [extra...] (the golden data's cache type; a --cache-type in extra
 * comes later and wins) with a deadline of run_timeout_s; returns the exit status. */
int th_pipe_up(const char *dir, const char *model, int workers, int timeout_s, double run_timeout_s,
               const char *const *extra);
/* bash deploy/stpipe-down D; returns the exit status. */
int th_pipe_down(const char *dir, double timeout_s);
/* The run's shared-memory prefix (D/shm_prefix, first line) into buf; asserts it exists. */
void th_pipe_prefix(const char *dir, char *buf, size_t cap);
/* The pids in D/pids (every stage ever started); returns how many (0: no file). */
int th_pipe_pids(const char *dir, int *pids, int cap);
/* Whether pid runs a stage (cmdline has "stpipe-", and dir too when dir is not NULL). */
bool th_stage_alive(int pid, const char *dir);
/* The counter `name` of stage `stage` ("coordinator", "attn-worker"...) in `stpipe stats
 * --run-dir D --json`, -1 if absent (asserts the command works). */
long long th_stage_counter(const char *dir, const char *stage, const char *name);
/* A SUB socket on the stats socket `sock` ("stats-attn", "stats-coordinator"...) of run dir D:
 * every report from now on, one every 500 ms (asserts it opens). zmq_close it. */
void *th_stats_sub(void *zctx, const char *dir, const char *sock);
/* The next report on sub within timeout_ms; NULL when none came or it did not decode. Free it
 * with stp__stats_report__free_unpacked. */
Stp__StatsReport *th_stats_next(void *sub, int timeout_ms);
/* Counter `name` of rep, -1 when it has none. */
long long th_stats_counter(const Stp__StatsReport *rep, const char *name);
/* Sends rq (a GenerateRequest) / a CancelRequest of rid to a coordinator's client socket (a
 * DEALER on D/client.sock), wrapped in a ClientMsg of this build's protocol version; asserts
 * the send worked. rq is a Stp__GenerateRequest (client.pb-c.h). */
void th_client_request(void *sock, void *rq);
void th_client_cancel(void *sock, uint64_t rid);
/* The next ClientMsg on that socket within timeout_ms (asserts it unpacks), or NULL when none
 * came; the caller frees it with stp__client_msg__free_unpacked. */
void *th_client_recv(void *sock, int timeout_ms);
/* /dev/shm entries named <prefix>-*. */
int th_shm_count(const char *prefix);

#endif
