/* th_pipeline: starting, inspecting and stopping pipeline runs in tests (see th_pipeline.h). */
#include "th_pipeline.h"

#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <jansson.h>
#include <zmq.h>

#include "client.pb-c.h"
#include "msg/msg.h"

#include "th_proc.h"

void th_golden_load(th_golden *g, const char *stem) {
    char path[1024];
    snprintf(path, sizeof path, "%s/%s.short.json", th_env("STP_TEST_DATA"), stem);
    json_error_t je;
    json_t *j = json_load_file(path, 0, &je);
    assert_non_null(j);
    snprintf(g->model, sizeof g->model, "%s/%s.gguf", th_env("STP_TEST_DATA"), stem);
    json_t *pi = json_object_get(j, "prompt_ids");
    size_t at = 0;
    g->ids[0] = 0;
    for (size_t i = 0; i < json_array_size(pi) && at < sizeof g->ids; i++)
        at += (size_t)snprintf(g->ids + at, sizeof g->ids - at, i ? " %lld" : "%lld",
                               (long long)json_integer_value(json_array_get(pi, i)));
    json_t *gi = json_object_get(j, "greedy_ids");
    g->n_greedy = (int)json_array_size(gi);
    if (g->n_greedy > 256) g->n_greedy = 256;
    for (int i = 0; i < g->n_greedy; i++)
        g->greedy[i] = (int)json_integer_value(json_array_get(gi, (size_t)i));
    json_decref(j);
}

const char *th_pipe_dir(char *buf, size_t cap, const char *kind, const char *tag) {
    mkdir(th_env("STP_TMP"), 0700);
    snprintf(buf, cap, "%s/%s-%s-%d", th_env("STP_TMP"), kind, tag, (int)getpid());
    return buf;
}

int th_pipe_up(const char *dir, const char *model, int workers, int timeout_s, double run_timeout_s,
               const char *const *extra) {
    char up[1024], w[16], t[16], me[16];
    snprintf(up, sizeof up, "%s/deploy/stpipe-up", th_env("STP_SOURCE_DIR"));
    snprintf(w, sizeof w, "%d", workers);
    snprintf(t, sizeof t, "%d", timeout_s);
    snprintf(me, sizeof me, "%d", (int)getpid()); /* a test killed by a timeout leaves nothing */
    char *argv[32] = {"bash",         up,
                      "--model",      (char *)model,
                      "--run-dir",    (char *)dir,
                      "--workers",    w,
                      "--bin-dir",    (char *)th_env("STP_BIN_DIR"),
                      "--timeout",    t,
                      "--threads",    "1",
                      "--owner-pid",  me,
                      "--cache-type", "f32"};
    int a = 18;
    for (int i = 0; extra && extra[i] && a < 30; i++)
        argv[a++] = (char *)extra[i];
    argv[a] = NULL;
    return th_run(argv, NULL, run_timeout_s);
}

int th_pipe_down(const char *dir, double timeout_s) {
    char down[1024];
    snprintf(down, sizeof down, "%s/deploy/stpipe-down", th_env("STP_SOURCE_DIR"));
    char *argv[] = {"bash", down, (char *)dir, NULL};
    return th_run(argv, NULL, timeout_s);
}

void th_pipe_prefix(const char *dir, char *buf, size_t cap) {
    char p[1100];
    snprintf(p, sizeof p, "%s/shm_prefix", dir);
    char *s = th_slurp(p, NULL);
    assert_non_null(s);
    s[strcspn(s, "\n")] = 0;
    snprintf(buf, cap, "%s", s);
    free(s);
}

int th_pipe_pids(const char *dir, int *pids, int cap) {
    char p[1100];
    snprintf(p, sizeof p, "%s/pids", dir);
    FILE *f = fopen(p, "r");
    if (!f) return 0;
    int n = 0;
    char name[64];
    while (n < cap && fscanf(f, "%63s %d", name, &pids[n]) == 2)
        n++;
    fclose(f);
    return n;
}

bool th_stage_alive(int pid, const char *dir) {
    char cp[64];
    snprintf(cp, sizeof cp, "/proc/%d/cmdline", pid);
    size_t len = 0;
    char *cl = th_slurp(cp, &len);
    for (size_t i = 0; cl && i < len; i++) /* the arguments are NUL-separated */
        if (!cl[i]) cl[i] = ' ';
    bool alive = cl && strstr(cl, "stpipe-") && (!dir || strstr(cl, dir));
    free(cl);
    return alive;
}

int th_shm_count(const char *prefix) {
    DIR *d = opendir("/dev/shm");
    int n = 0;
    size_t pl = strlen(prefix);
    for (struct dirent *e; d && (e = readdir(d));)
        if (!strncmp(e->d_name, prefix, pl) && e->d_name[pl] == '-') n++;
    if (d) closedir(d);
    return n;
}

long long th_stage_counter(const char *dir, const char *stage, const char *name) {
    char bin[1024], out[1200];
    snprintf(bin, sizeof bin, "%s/stpipe", th_env("STP_BIN_DIR"));
    snprintf(out, sizeof out, "%s/stats.json", dir);
    char *argv[] = {bin, "stats", "--run-dir", (char *)dir, "--json", NULL};
    assert_int_equal(th_run(argv, out, 30), 0);
    char *s = th_slurp(out, NULL);
    assert_non_null(s);
    json_error_t je;
    json_t *root = json_loads(s, 0, &je);
    free(s);
    assert_non_null(root);
    json_t *v = json_object_get(json_object_get(json_object_get(root, stage), "counters"), name);
    long long x = v ? json_integer_value(v) : -1;
    json_decref(root);
    return x;
}

void *th_stats_sub(void *zctx, const char *dir, const char *sock) {
    char ep[1200];
    stp_err err = {0};
    assert_int_equal(msg_endpoint(ep, sizeof ep, dir, sock, &err), 0);
    void *s = msg_socket(zctx, ZMQ_SUB, ep, false, &err);
    assert_non_null(s);
    zmq_setsockopt(s, ZMQ_SUBSCRIBE, "", 0);
    return s;
}

Stp__StatsReport *th_stats_next(void *sub, int timeout_ms) {
    bool rd = false;
    if (timeout_ms <= 0 || !msg_poll(&sub, 1, &rd, timeout_ms) || !rd) return NULL;
    msg_in in;
    stp_err err = {0};
    if (msg_recv(sub, false, &in, &err) <= 0) return NULL;
    Stp__StatsReport *rep = stp__stats_report__unpack(NULL, in.len, in.data);
    msg_in_free(&in);
    return rep;
}

long long th_stats_counter(const Stp__StatsReport *rep, const char *name) {
    for (size_t i = 0; i < rep->n_counters; i++)
        if (!strcmp(rep->counters[i]->name, name)) return (long long)rep->counters[i]->value;
    return -1;
}

void th_client_request(void *sock, void *rq) {
    Stp__ClientMsg m;
    stp__client_msg__init(&m);
    m.version = STP_PROTO_VERSION;
    m.body_case = STP__CLIENT_MSG__BODY_REQUEST;
    m.request = rq;
    assert_int_equal(msg_send(sock, NULL, 0, &m.base, NULL), 0);
}

void *th_client_recv(void *sock, int timeout_ms) {
    bool rd = false;
    if (!msg_poll(&sock, 1, &rd, timeout_ms) || !rd) return NULL;
    msg_in in;
    if (msg_recv(sock, false, &in, NULL) <= 0) return NULL;
    Stp__ClientMsg *m = stp__client_msg__unpack(NULL, in.len, in.data);
    msg_in_free(&in);
    assert_non_null(m);
    return m;
}

void th_client_cancel(void *sock, uint64_t rid) {
    Stp__CancelRequest c;
    stp__cancel_request__init(&c);
    c.request_id = rid;
    Stp__ClientMsg m;
    stp__client_msg__init(&m);
    m.version = STP_PROTO_VERSION;
    m.body_case = STP__CLIENT_MSG__BODY_CANCEL;
    m.cancel = &c;
    assert_int_equal(msg_send(sock, NULL, 0, &m.base, NULL), 0);
}
