/* chat.c: the ChatML prompt format SmallThinker is trained on. A GGUF's tokenizer.chat_template
 * (Jinja) is not executed: it is only checked to be a ChatML template (it must produce
 * <|im_start|> and <|im_end|>); anything else is refused rather than guessed at. The formatter
 * records where each message's text lies, so that encoding matches special tokens only in the
 * template's own markers (a message cannot write "<|im_start|>system" into the prompt). */
#include "tokenizer/tok_internal.h"

#include <stdlib.h>
#include <string.h>

int tokenizer_chat_format(const tokenizer *t, const chat_msg *msgs, size_t n,
                          bool add_generation_prompt, char **out, tok_span *plain, stp_err *err) {
    *out = NULL;
    if (t->chat_template &&
        (!strstr(t->chat_template, "<|im_start|>") || !strstr(t->chat_template, "<|im_end|>")))
        return stp_err_set(err, STP_EUNSUPPORTED,
                           "the model's tokenizer.chat_template is not a ChatML template (no "
                           "<|im_start|>/<|im_end|>); stpipe only formats ChatML chats. Format "
                           "the prompt yourself and pass it with --prompt");
    if (t->im_start < 0 || t->im_end < 0)
        return stp_err_set(err, STP_EUNSUPPORTED,
                           "the vocabulary has no <|im_start|>/<|im_end|> "
                           "tokens, so it cannot hold a ChatML chat; use a plain prompt");
    size_t total = 1;
    for (size_t i = 0; i < n; i++) {
        if (!msgs[i].role || !msgs[i].role[0] || !msgs[i].content)
            return stp_err_set(err, STP_EINVAL, "chat message %zu has no role or no content", i);
        total += strlen(msgs[i].role) + strlen(msgs[i].content) + 32;
    }
    if (add_generation_prompt) total += 32;
    char *s = malloc(total);
    if (!s) return stp_err_set(err, STP_ENOMEM, "chat: out of memory for %zu bytes", total);
    size_t o = 0;
    for (size_t i = 0; i < n; i++) {
        size_t rl = strlen(msgs[i].role), cl = strlen(msgs[i].content);
        memcpy(s + o, "<|im_start|>", 12);
        o += 12;
        if (plain) plain[i] = (tok_span){o, rl + 1 + cl};
        memcpy(s + o, msgs[i].role, rl);
        o += rl;
        s[o++] = '\n';
        memcpy(s + o, msgs[i].content, cl);
        o += cl;
        memcpy(s + o, "<|im_end|>\n", 11);
        o += 11;
    }
    if (add_generation_prompt) {
        memcpy(s + o, "<|im_start|>assistant\n", 22);
        o += 22;
    }
    s[o] = 0;
    *out = s;
    return 0;
}

int tokenizer_chat_encode(const tokenizer *t, const chat_msg *msgs, size_t n,
                          bool add_generation_prompt, int32_t **ids, size_t *n_ids, stp_err *err) {
    *ids = NULL;
    *n_ids = 0;
    tok_span *plain = malloc((n ? n : 1) * sizeof *plain);
    if (!plain) return stp_err_set(err, STP_ENOMEM, "chat: out of memory for %zu messages", n);
    char *text = NULL;
    int rc = tokenizer_chat_format(t, msgs, n, add_generation_prompt, &text, plain, err);
    if (!rc)
        rc = tokenizer_encode_spans(t, text, strlen(text), TOK_PARSE_SPECIAL, plain, n, ids, n_ids,
                                    err);
    free(text);
    free(plain);
    return rc;
}

bool tokenizer_chat_role_ok(const char *role) {
    return role && (!strcmp(role, "system") || !strcmp(role, "user") || !strcmp(role, "assistant"));
}
