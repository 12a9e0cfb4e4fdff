/* http_api: OpenAI request bodies -> http_job (prompt tokens, sampling, stops) and the JSON of
 * answers, stream chunks and errors. Pure functions over jansson; no I/O, no locks.
 * Unknown request fields are ignored (clients send many); wrong types are a 400 naming the
 * field. Defaults are the SmallThinker authors' sampling (temperature 0.6, top-k 20, top-p
 * 0.95). Chat roles are system, user and assistant, spelled exactly (a role is written into the
 * template, so anything else could open a turn of its own); a message's content is plain text,
 * its special-token text never parsed (only a /v1/completions prompt string parses special
 * tokens, as llama.cpp's server does). A prompt text longer than the
 * limit is refused (413) before it is tokenized. See docs/SERVER.md for the field list. */
#include <jansson.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "http_server.h"

#define HTTP_MAX_STOP 16

static int s_bad(char *msg, size_t cap, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int s_bad(char *msg, size_t cap, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, cap, fmt, ap);
    va_end(ap);
    return 400;
}

/* The server ran out of memory: 500, not the client's fault. */
static int s_oom(char *msg, size_t cap) {
    snprintf(msg, cap, "out of memory");
    return 500;
}

/* Reads an optional number field into *out (null = absent). */
static int s_num(json_t *root, const char *key, double lo, double hi, double *out, bool *set,
                 char *msg, size_t cap) {
    json_t *v = json_object_get(root, key);
    if (set) *set = false;
    if (!v || json_is_null(v)) return 0;
    if (!json_is_number(v)) return s_bad(msg, cap, "'%s' must be a number", key);
    double d = json_number_value(v);
    if (!isfinite(d) || d < lo || d > hi)
        return s_bad(msg, cap, "'%s' must be between %g and %g, got %g", key, lo, hi, d);
    *out = d;
    if (set) *set = true;
    return 0;
}

static int s_int(json_t *root, const char *key, long long lo, long long hi, long long *out,
                 bool *set, char *msg, size_t cap) {
    json_t *v = json_object_get(root, key);
    if (set) *set = false;
    if (!v || json_is_null(v)) return 0;
    if (!json_is_integer(v)) return s_bad(msg, cap, "'%s' must be an integer", key);
    long long n = json_integer_value(v);
    if (n < lo || n > hi)
        return s_bad(msg, cap, "'%s' must be between %lld and %lld, got %lld", key, lo, hi, n);
    *out = n;
    if (set) *set = true;
    return 0;
}

static int s_bool(json_t *root, const char *key, bool *out, char *msg, size_t cap) {
    json_t *v = json_object_get(root, key);
    if (!v || json_is_null(v)) return 0;
    if (!json_is_boolean(v)) return s_bad(msg, cap, "'%s' must be true or false", key);
    *out = json_is_true(v);
    return 0;
}

/* Message content: a string, null, or an array of {"type":"text","text":...} parts. */
static int s_content(json_t *c, size_t i, char **out, char *msg, size_t cap) {
    if (!c || json_is_null(c)) {
        *out = strdup("");
    } else if (json_is_string(c)) {
        *out = strdup(json_string_value(c));
    } else if (json_is_array(c)) {
        size_t len = 0, k;
        json_t *part;
        json_array_foreach(c, k, part) {
            json_t *t = json_object_get(part, "text");
            const char *type = json_string_value(json_object_get(part, "type"));
            if (!type || strcmp(type, "text") || !json_is_string(t))
                return s_bad(msg, cap,
                             "messages[%zu].content[%zu]: only text parts "
                             "({\"type\": \"text\", \"text\": ...}) are supported",
                             i, k);
            len += json_string_length(t);
        }
        *out = malloc(len + 1);
        if (*out) {
            len = 0;
            json_array_foreach(c, k, part) {
                json_t *t = json_object_get(part, "text");
                memcpy(*out + len, json_string_value(t), json_string_length(t));
                len += json_string_length(t);
            }
            (*out)[len] = 0;
        }
    } else {
        return s_bad(msg, cap, "messages[%zu].content must be a string or an array of text parts",
                     i);
    }
    return *out ? 0 : s_oom(msg, cap);
}

size_t http_api_prompt_bytes_max(int n_ctx, size_t max_token_bytes) {
    return (size_t)(n_ctx > 0 ? n_ctx : 1) * (max_token_bytes ? max_token_bytes : 1);
}

/* 413 when the prompt text is longer than the limit (it cannot fit the context). */
static int s_too_long(size_t len, const http_api_limits *lim, char *msg, size_t cap) {
    if (!lim->max_prompt_bytes || len <= lim->max_prompt_bytes) return 0;
    s_bad(msg, cap,
          "the prompt has %zu bytes of text, more than the %zu that %d tokens of context can "
          "hold (shorten it, or restart the server with a larger --ctx-size)",
          len, lim->max_prompt_bytes, lim->n_ctx);
    return 413;
}

/* With TOK_PARSE_SPECIAL in flags special tokens written in text are parsed (a raw prompt, as
 * llama.cpp's server does), except in the plain spans (a chat's messages: OpenAI's API takes
 * their content as text). */
static int s_encode(http_job *job, const tokenizer *tok, const char *text, int flags,
                    const tok_span *plain, size_t n_plain, char *msg, size_t cap) {
    stp_err err = {0};
    size_t n = 0;
    if (tokenizer_encode_spans(tok, text, strlen(text), flags, plain, n_plain, &job->prompt, &n,
                               &err))
        return s_bad(msg, cap, "cannot tokenize the prompt: %s", err.msg);
    job->n_prompt = (int)n;
    return 0;
}

/* A chat's ids: the memo's ids of the longest earlier exchange the chat continues (the same
 * text and messages up to where that answer's message ends and the template's <|im_end|>
 * follows), then the rest encoded; without a memo or a match, the whole text encoded. */
static int s_encode_chat(http_job *job, const tokenizer *tok, chat_memo *memo, const char *text,
                         const tok_span *plain, size_t n_plain, char *msg, size_t cap) {
    int32_t *head = NULL;
    size_t n_head = 0, cut = memo ? chat_memo_find(memo, text, strlen(text), plain, n_plain,
                                                   "<|im_end|>", &head, &n_head)
                                  : 0;
    if (!cut) return s_encode(job, tok, text, TOK_PARSE_SPECIAL, plain, n_plain, msg, cap);
    size_t first = 0; /* spans after the cut, moved to the rest's offsets */
    while (first < n_plain && plain[first].off < cut)
        first++;
    tok_span *rest = malloc((n_plain - first + 1) * sizeof *rest);
    for (size_t i = first; rest && i < n_plain; i++)
        rest[i - first] = (tok_span){plain[i].off - cut, plain[i].len};
    int rc =
        rest ? s_encode(job, tok, text + cut, TOK_PARSE_SPECIAL, rest, n_plain - first, msg, cap)
             : s_oom(msg, cap);
    free(rest);
    int32_t *ids = rc ? NULL : malloc(sizeof *ids * (n_head + (size_t)job->n_prompt));
    if (!rc && !ids) rc = s_oom(msg, cap);
    if (!rc) {
        if (n_head) memcpy(ids, head, sizeof *ids * n_head);
        if (job->n_prompt) memcpy(ids + n_head, job->prompt, sizeof *ids * (size_t)job->n_prompt);
        free(job->prompt);
        job->prompt = ids;
        job->n_prompt += (int)n_head;
    }
    free(head);
    return rc;
}

static int s_chat_prompt(http_job *job, json_t *root, const tokenizer *tok,
                         const http_api_limits *lim, chat_memo *memo, bool add_generation_prompt,
                         char *msg, size_t cap) {
    json_t *msgs = json_object_get(root, "messages");
    if (!json_is_array(msgs) || json_array_size(msgs) == 0)
        return s_bad(msg, cap,
                     "'messages' is required: a non-empty array of {\"role\", "
                     "\"content\"} objects");
    size_t n = json_array_size(msgs);
    chat_msg *cm = calloc(n, sizeof *cm);
    char **owned = calloc(n, sizeof *owned);
    int rc = 0;
    if (!cm || !owned) rc = s_oom(msg, cap);
    for (size_t i = 0; !rc && i < n; i++) {
        json_t *m = json_array_get(msgs, i);
        const char *role = json_string_value(json_object_get(m, "role"));
        if (!json_is_object(m) || !role || !*role) {
            rc = s_bad(msg, cap, "messages[%zu] needs a \"role\" string", i);
            break;
        }
        if (!tokenizer_chat_role_ok(role)) {
            char shown[40];
            size_t k = 0;
            for (const char *p = role; *p && k + 1 < sizeof shown; p++) /* printable ASCII only */
                shown[k++] = *p >= 0x20 && *p < 0x7f && *p != '"' ? *p : '?';
            shown[k] = 0;
            rc = s_bad(msg, cap,
                       "messages[%zu].role \"%s\" is not one of \"system\", \"user\", "
                       "\"assistant\" (no tool turns in stpipe's ChatML template)",
                       i, shown);
            break;
        }
        if ((rc = s_content(json_object_get(m, "content"), i, &owned[i], msg, cap))) break;
        cm[i] = (chat_msg){role, owned[i]};
    }
    char *text = NULL;
    stp_err err = {0};
    tok_span *plain = rc ? NULL : malloc(n * sizeof *plain);
    if (!rc && !plain) rc = s_oom(msg, cap);
    if (!rc && tokenizer_chat_format(tok, cm, n, add_generation_prompt, &text, plain, &err))
        rc = s_bad(msg, cap, "cannot format the chat: %s", err.msg);
    if (!rc) rc = s_too_long(strlen(text), lim, msg, cap);
    if (!rc) rc = s_encode_chat(job, tok, memo, text, plain, n, msg, cap); /* contents: plain */
    if (!rc && memo) { /* kept for the memo's entry when the answer is done */
        job->prompt_text = text;
        job->prompt_text_len = strlen(text);
        job->plain = plain;
        job->n_plain = n;
        text = NULL;
        plain = NULL;
    }
    free(text);
    free(plain);
    for (size_t i = 0; owned && i < n; i++)
        free(owned[i]);
    free(owned);
    free(cm);
    return rc;
}

static int s_completion_prompt(http_job *job, json_t *root, const tokenizer *tok,
                               const http_api_limits *lim, char *msg, size_t cap) {
    int n_vocab = tokenizer_n_vocab(tok), rc;
    json_t *p = json_object_get(root, "prompt");
    if (json_is_array(p) && json_array_size(p) == 1 && json_is_string(json_array_get(p, 0)))
        p = json_array_get(p, 0);
    if (json_is_string(p)) {
        if ((rc = s_too_long(json_string_length(p), lim, msg, cap))) return rc;
        return s_encode(job, tok, json_string_value(p), TOK_PARSE_SPECIAL, NULL, 0, msg, cap);
    }
    if (json_is_array(p) && json_array_size(p) > 0) { /* token ids */
        size_t n = json_array_size(p), i;
        json_t *v;
        job->prompt = malloc(n * sizeof *job->prompt);
        if (!job->prompt) return s_oom(msg, cap);
        json_array_foreach(p, i, v) {
            if (!json_is_integer(v) || json_integer_value(v) < 0 ||
                json_integer_value(v) >= n_vocab)
                return s_bad(msg, cap,
                             "'prompt' must be a string, or an array of token ids in "
                             "0..%d (one prompt per request)",
                             n_vocab - 1);
            job->prompt[i] = (int32_t)json_integer_value(v);
        }
        job->n_prompt = (int)n;
        return 0;
    }
    return s_bad(msg, cap, "'prompt' is required: a string (or an array of token ids)");
}

/* The body as a JSON object, or 400 with msg. */
static int s_body_object(const char *body, size_t len, json_t **root, char *msg, size_t cap) {
    json_error_t je;
    *root = json_loadb(body, len, 0, &je);
    if (!*root)
        return s_bad(msg, cap, "invalid JSON at line %d column %d: %s", je.line, je.column,
                     je.text);
    if (json_is_object(*root)) return 0;
    json_decref(*root);
    *root = NULL;
    return s_bad(msg, cap, "the request body must be a JSON object");
}

int http_api_parse(http_job *job, http_kind kind, const char *body, size_t len,
                   const tokenizer *tok, const http_api_limits *lim, chat_memo *memo,
                   uint64_t default_seed, char *msg, size_t cap) {
    const int n_ctx = lim->n_ctx;
    job->kind = kind;
    json_t *root;
    int rc = s_body_object(body, len, &root, msg, cap);
    if (rc) return rc;
    json_t *model = json_object_get(root, "model");
    if (model && !json_is_null(model) && !json_is_string(model)) {
        rc = s_bad(msg, cap, "'model' must be a string");
        goto out;
    }
    gen_params *gp = &job->gp;
    sampler_params_default(&gp->sp);
    gp->sp.temperature = 0.6f;
    gp->sp.top_k = 20;
    gp->sp.top_p = 0.95f;
    gp->sp.penalty_last_n = 64;
    gp->sp.seed = default_seed;
    double d;
    long long n;
    bool set;
#define NUM(key, lo, hi, field)                                                                    \
    if ((rc = s_num(root, key, lo, hi, &d, &set, msg, cap))) goto out;                             \
    if (set) gp->sp.field = (float)d;
    NUM("temperature", 0, 100, temperature)
    NUM("top_p", 0, 1, top_p)
    NUM("min_p", 0, 1, min_p)
    NUM("presence_penalty", -2, 2, presence_penalty)
    NUM("frequency_penalty", -2, 2, frequency_penalty)
    NUM("repeat_penalty", 0, 10, repeat_penalty)
#undef NUM
    if ((rc = s_int(root, "top_k", 0, 1 << 24, &n, &set, msg, cap))) goto out;
    if (set) gp->sp.top_k = (int)n;
    if ((rc = s_int(root, "seed", INT64_MIN, INT64_MAX, &n, &set, msg, cap))) goto out;
    if (set) gp->sp.seed = (uint64_t)n;
    if ((rc = s_int(root, "n", 1, 1, &n, &set, msg, cap))) {
        rc = s_bad(msg, cap, "only one choice per request is supported ('n' must be 1)");
        goto out;
    }
    long long max_tokens = 0;
    if ((rc = s_int(root, "max_tokens", 1, 1 << 24, &max_tokens, &set, msg, cap))) goto out;
    if (!set &&
        (rc = s_int(root, "max_completion_tokens", 1, 1 << 24, &max_tokens, &set, msg, cap)))
        goto out;
    gp->max_tokens = set ? (int)max_tokens : lim->max_tokens_default; /* 0: until ctx is full */
    if ((rc = s_bool(root, "stream", &job->stream, msg, cap))) goto out;
    if ((rc = s_bool(root, "ignore_eos", &gp->ignore_eos, msg, cap))) goto out;
    if ((rc = s_bool(root, "return_tokens", &job->return_tokens, msg, cap))) goto out;
    json_t *so = json_object_get(root, "stream_options");
    if (json_is_object(so) && (rc = s_bool(so, "include_usage", &job->include_usage, msg, cap)))
        goto out;
    json_t *stop = json_object_get(root, "stop");
    if (stop && !json_is_null(stop)) {
        size_t ns = json_is_string(stop) ? 1 : json_is_array(stop) ? json_array_size(stop) : 0;
        if ((!json_is_string(stop) && !json_is_array(stop)) || ns > HTTP_MAX_STOP) {
            rc = s_bad(msg, cap, "'stop' must be a string or an array of up to %d strings",
                       HTTP_MAX_STOP);
            goto out;
        }
        job->stop = calloc(ns ? ns : 1, sizeof *job->stop);
        for (size_t i = 0; job->stop && i < ns; i++) {
            json_t *s = json_is_string(stop) ? stop : json_array_get(stop, i);
            if (!json_is_string(s) || json_string_length(s) == 0) {
                rc = s_bad(msg, cap, "'stop' entries must be non-empty strings");
                goto out;
            }
            job->stop[i] = strdup(json_string_value(s));
            if (!job->stop[i]) break;
            gp->n_stop++;
        }
        gp->stop = (const char *const *)job->stop;
    }
    rc = kind == HTTP_KIND_CHAT ? s_chat_prompt(job, root, tok, lim, memo, true, msg, cap)
                                : s_completion_prompt(job, root, tok, lim, msg, cap);
    if (rc) goto out;
    if (job->n_prompt == 0) {
        rc = s_bad(msg, cap, "the prompt is empty (no tokens)");
        goto out;
    }
    if (job->n_prompt >= n_ctx) {
        rc = s_bad(msg, cap,
                   "the prompt has %d tokens but the context holds %d (shorten it, or restart "
                   "the server with a larger --ctx-size)",
                   job->n_prompt, n_ctx);
        goto out;
    }
out:
    json_decref(root);
    return rc;
}

void http_api_job_fini(http_job *job) {
    for (int i = 0; job->stop && i < job->gp.n_stop; i++)
        free(job->stop[i]);
    free(job->stop);
    free(job->prompt);
    free(job->prompt_text);
    free(job->plain);
    free(job->out);
    gen_result_fini(&job->res);
}

const char *http_api_finish_name(gen_finish f) {
    return f == GEN_FINISH_LENGTH ? "length" : "stop"; /* a cancelled answer ends as "stop" */
}

static char *s_dump(json_t *j) {
    char *s = j ? json_dumps(j, JSON_COMPACT) : NULL;
    json_decref(j);
    return s;
}

static int s_completion_tokens(const http_job *job) {
    return job->res.n_gen;
}

static json_t *s_usage(const http_job *job) {
    int c = s_completion_tokens(job);
    return json_pack("{s:i, s:i, s:i, s:{s:i}}", "prompt_tokens", job->res.n_prompt,
                     "completion_tokens", c, "total_tokens", job->res.n_prompt + c,
                     "prompt_tokens_details", "cached_tokens", job->res.n_cached);
}

static json_t *s_timings(const http_job *job) {
    const gen_result *r = &job->res;
    const int n_eval = r->n_prompt - r->n_cached; /* prompt tokens evaluated */
    return json_pack(
        "{s:f, s:i, s:f, s:f, s:f, s:f}", "queue_ms", (job->t_start - job->t_arrive) * 1e3,
        "cache_n", r->n_cached, "prompt_ms", r->t_prompt * 1e3, "prompt_per_second",
        r->t_prompt > 0 ? n_eval / r->t_prompt : 0.0, "predicted_ms", r->t_gen * 1e3,
        "predicted_per_second", r->n_gen > 1 && r->t_gen > 0 ? (r->n_gen - 1) / r->t_gen : 0.0);
}

char *http_api_response(const http_job *job, const char *model) {
    const gen_result *r = &job->res;
    json_t *text = json_stringn(r->text ? r->text : "", r->len);
    json_t *choice;
    if (job->kind == HTTP_KIND_CHAT)
        choice = json_pack("{s:i, s:{s:s, s:o}, s:n, s:s}", "index", 0, "message", "role",
                           "assistant", "content", text, "logprobs", "finish_reason",
                           http_api_finish_name(r->finish));
    else
        choice = json_pack("{s:i, s:o, s:n, s:s}", "index", 0, "text", text, "logprobs",
                           "finish_reason", http_api_finish_name(r->finish));
    json_t *root = json_pack("{s:s, s:s, s:I, s:s, s:[o], s:o, s:o}", "id", job->id, "object",
                             job->kind == HTTP_KIND_CHAT ? "chat.completion" : "text_completion",
                             "created", (json_int_t)job->created, "model", model, "choices", choice,
                             "usage", s_usage(job), "timings", s_timings(job));
    if (root && job->return_tokens) {
        json_t *ids = json_array();
        for (int i = 0; i < r->n_gen; i++)
            json_array_append_new(ids, json_integer(r->ids[i]));
        json_object_set_new(root, "tokens", ids);
    }
    return s_dump(root);
}

char *http_api_chunk(const http_job *job, const char *model, const char *text, size_t len,
                     bool first, const char *finish, bool usage) {
    bool chat = job->kind == HTTP_KIND_CHAT;
    json_t *choices = json_array();
    if (!usage) {
        json_t *c;
        json_t *fin = finish ? json_string(finish) : json_null();
        if (chat) {
            json_t *delta = json_object();
            if (first) json_object_set_new(delta, "role", json_string("assistant"));
            if (!finish) json_object_set_new(delta, "content", json_stringn(text, len));
            c = json_pack("{s:i, s:o, s:n, s:o}", "index", 0, "delta", delta, "logprobs",
                          "finish_reason", fin);
        } else {
            c = json_pack("{s:i, s:s%, s:n, s:o}", "index", 0, "text", finish ? "" : text,
                          finish ? (size_t)0 : len, "logprobs", "finish_reason", fin);
        }
        json_array_append_new(choices, c);
    }
    json_t *root = json_pack("{s:s, s:s, s:I, s:s, s:o}", "id", job->id, "object",
                             chat ? "chat.completion.chunk" : "text_completion", "created",
                             (json_int_t)job->created, "model", model, "choices", choices);
    if (root && usage) json_object_set_new(root, "usage", s_usage(job));
    if (root && finish) json_object_set_new(root, "timings", s_timings(job));
    char *js = s_dump(root);
    if (!js) return NULL;
    size_t jl = strlen(js);
    char *ev = malloc(jl + 9);
    if (ev) {
        memcpy(ev, "data: ", 6);
        memcpy(ev + 6, js, jl);
        memcpy(ev + 6 + jl, "\n\n", 3);
    }
    free(js);
    return ev;
}

/* ---- /tokenize and /detokenize -------------------------------------------------------------- *
 * The request shapes of both peers: llama.cpp's server ("content", "add_special",
 * "parse_special", "with_pieces"; answers "tokens" and /detokenize's "content") and vLLM's
 * ("prompt" or "messages" with "add_generation_prompt"; answers "tokens", "count",
 * "max_model_len" and /detokenize's "prompt"). One answer carries the fields of both. */

/* A token's piece: its text when it is UTF-8, else its bytes as numbers (llama.cpp's form). */
static json_t *s_piece(const tokenizer *tok, int32_t id) {
    const char *b = NULL;
    size_t n = 0;
    tokenizer_token_bytes(tok, id, &b, &n);
    json_t *p = json_stringn(b ? b : "", n); /* NULL when not UTF-8 */
    if (p) return p;
    p = json_array();
    for (size_t i = 0; i < n; i++)
        json_array_append_new(p, json_integer((unsigned char)b[i]));
    return p;
}

int http_api_tokenize(const char *body, size_t len, const tokenizer *tok,
                      const http_api_limits *lim, char **out, char *msg, size_t cap) {
    *out = NULL;
    json_t *root;
    int rc = s_body_object(body, len, &root, msg, cap);
    if (rc) return rc;
    bool add_special = false, parse_special = true, with_pieces = false, add_gen = true;
    http_job job = {0}; /* the ids, as a generation request's prompt */
    if ((rc = s_bool(root, "add_special", &add_special, msg, cap)) ||
        (rc = s_bool(root, "parse_special", &parse_special, msg, cap)) ||
        (rc = s_bool(root, "with_pieces", &with_pieces, msg, cap)) ||
        (rc = s_bool(root, "add_generation_prompt", &add_gen, msg, cap)))
        goto out;
    (void)add_special; /* the Qwen vocabulary adds no BOS or EOS (tokenizer.h) */
    json_t *text = json_object_get(root, "content");
    if (!text) text = json_object_get(root, "prompt");
    json_t *msgs = json_object_get(root, "messages");
    if (msgs && !json_is_null(msgs)) {
        rc = s_chat_prompt(&job, root, tok, lim, NULL, add_gen, msg, cap);
    } else if (json_is_string(text)) { /* as a /v1/completions prompt string */
        if (!(rc = s_too_long(json_string_length(text), lim, msg, cap)))
            rc = s_encode(&job, tok, json_string_value(text), parse_special ? TOK_PARSE_SPECIAL : 0,
                          NULL, 0, msg, cap);
    } else {
        rc =
            s_bad(msg, cap, "'content' (or 'prompt') is required: a string; or 'messages': a chat");
    }
    if (!rc && job.n_prompt > lim->n_ctx) /* answers stay a context's worth of ids */
        rc = s_bad(msg, cap,
                   "the text has %d tokens, more than the context's %d (tokenize it in parts)",
                   job.n_prompt, lim->n_ctx);
    if (rc) goto out;
    json_t *ids = json_array();
    for (int i = 0; ids && i < job.n_prompt; i++)
        json_array_append_new(ids, with_pieces ? json_pack("{s:i, s:o}", "id", job.prompt[i],
                                                           "piece", s_piece(tok, job.prompt[i]))
                                               : json_integer(job.prompt[i]));
    *out = s_dump(json_pack("{s:o, s:i, s:i}", "tokens", ids, "count", job.n_prompt,
                            "max_model_len", lim->n_ctx));
    if (!*out) rc = s_oom(msg, cap);
out:
    http_api_job_fini(&job);
    json_decref(root);
    return rc;
}

int http_api_detokenize(const char *body, size_t len, const tokenizer *tok,
                        const http_api_limits *lim, char **out, char *msg, size_t cap) {
    *out = NULL;
    json_t *root;
    int rc = s_body_object(body, len, &root, msg, cap);
    if (rc) return rc;
    json_t *ids = json_object_get(root, "tokens");
    const size_t n = json_array_size(ids), max_n = (size_t)(lim->n_ctx > 0 ? lim->n_ctx : 1);
    const int32_t n_vocab = tokenizer_n_vocab(tok);
    const size_t each = 3 * tokenizer_max_token_bytes(tok) + 12; /* tok_stream_push's room */
    char *text = NULL;
    size_t at = 0, need = each; /* the text's room: each byte may become 3 (U+FFFD) */
    if (!json_is_array(ids)) {
        rc = s_bad(msg, cap, "'tokens' is required: an array of token ids");
    } else if (n > max_n) {
        rc = s_bad(msg, cap, "'tokens' has %zu ids, more than the context's %zu", n, max_n);
    }
    for (size_t i = 0; !rc && i < n; i++) {
        json_t *v = json_array_get(ids, i);
        const char *b;
        size_t nb = 0;
        if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) >= n_vocab)
            rc = s_bad(msg, cap, "tokens[%zu] must be a token id in 0..%d", i, n_vocab - 1);
        else
            tokenizer_token_bytes(tok, (int32_t)json_integer_value(v), &b, &nb);
        need += 3 * nb;
    }
    if (!rc && !(text = malloc(need + each))) rc = s_oom(msg, cap);
    tok_stream ts; /* every chunk valid UTF-8: a bad byte becomes U+FFFD, as in answers */
    tok_stream_init(&ts, tok);
    for (size_t i = 0; !rc && i < n; i++)
        at += tok_stream_push(&ts, (int32_t)json_integer_value(json_array_get(ids, i)), text + at,
                              need + each - at);
    if (!rc) {
        at += tok_stream_flush(&ts, text + at, need + each - at);
        *out = s_dump(json_pack("{s:s%, s:s%}", "content", text, at, "prompt", text, at));
        if (!*out) rc = s_oom(msg, cap);
    }
    free(text);
    json_decref(root);
    return rc;
}

char *http_api_error(const char *msg, const char *type, int code) {
    size_t n = strlen(msg);
    char *text = malloc(n + 1);
    if (!text) return NULL;
    memcpy(text, msg, n + 1);
    json_t *probe = json_stringn(text, n); /* NULL when not UTF-8 */
    if (!probe)                            /* keep ASCII, the rest becomes '?' */
        for (size_t i = 0; i < n; i++)
            if ((unsigned char)text[i] >= 0x80) text[i] = '?';
    json_decref(probe);
    char *out = s_dump(json_pack("{s:{s:s, s:s, s:n, s:i}}", "error", "message", text, "type", type,
                                 "param", "code", code));
    free(text);
    return out;
}
