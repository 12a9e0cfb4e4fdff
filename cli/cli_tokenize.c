/* cli_tokenize: `stpipe tokenize` (text to ids, one per line with the token's text, or --ids on
 * one line) and `stpipe detokenize` (ids to text). Both load only the GGUF metadata, so a
 * vocabulary-only file works as well as a full model. See common/tokenizer/README.md. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "gguf/gguf.h"
#include "tokenizer/tokenizer.h"

typedef struct tok_opts {
    const char *model, *text, *file, *ids_s;
    bool help, ids_only, no_parse_special, no_normalize;
} tok_opts;

#define F(x) offsetof(tok_opts, x)
static const opt_def s_tokenize_opts[] = {
    CLI_OPT_HELP(tok_opts),
    CLI_OPT_MODEL(tok_opts, "GGUF file (a vocabulary-only one will do)"),
    {"--text", NULL, OPT_STR, 0, 0, NULL, "TEXT", "the text", F(text), NULL, NULL},
    {"--file", NULL, OPT_STR, 0, 0, NULL, "FILE",
     "read the text from FILE (-: stdin; the bytes exactly, no newline removed)", F(file), NULL,
     NULL},
    {"--ids", NULL, OPT_FLAG, 0, 0, NULL, NULL, "print only the ids, space-separated on one line",
     F(ids_only), NULL, NULL},
    {"--no-parse-special", NULL, OPT_FLAG, 0, 0, NULL, NULL,
     "treat <|im_start|> etc. in the text as plain text (special tokens are recognised by "
     "default)",
     F(no_parse_special), NULL, NULL},
    {"--no-normalize", NULL, OPT_FLAG, 0, 0, NULL, NULL,
     "skip NFC normalisation (gives llama.cpp's ids on non-NFC text; the default gives the "
     "Hugging Face tokenizer's)",
     F(no_normalize), NULL, NULL},
};
static const opt_def s_detokenize_opts[] = {
    CLI_OPT_HELP(tok_opts),
    CLI_OPT_MODEL(tok_opts, "GGUF file (a vocabulary-only one will do)"),
    {"--ids", NULL, OPT_STR, 0, 0, NULL, "\"ID ID ...\"", "token ids (spaces or commas between)",
     F(ids_s), NULL, NULL},
};
#undef F

static void s_tokenize_usage(FILE *f) {
    cli_opts_help(f,
                  "usage: stpipe tokenize --model FILE (--text TEXT | --file FILE) [--ids]\n"
                  "                       [--no-parse-special] [--no-normalize]\n"
                  "  prints the token ids of the text, one per line with the token's text\n"
                  "  ('   9707 -> 'Hello''), as llama-tokenize does.\n",
                  s_tokenize_opts, CLI_NOPTS(s_tokenize_opts), NULL);
}

static void s_detokenize_usage(FILE *f) {
    cli_opts_help(f,
                  "usage: stpipe detokenize --model FILE --ids \"ID ID ...\"\n"
                  "  prints the text of the token ids (spaces or commas between ids) and a "
                  "newline\n",
                  s_detokenize_opts, CLI_NOPTS(s_detokenize_opts), NULL);
}

static int s_open(const char *cmd, const char *path, gguf_file **g, tokenizer **t) {
    stp_err err = {0};
    if (gguf_open(g, path, &err)) {
        fprintf(stderr, "stpipe %s: %s\n  (check the --model path; it must be a GGUF file)\n", cmd,
                err.msg);
        return 1;
    }
    if (tokenizer_new(t, *g, &err)) {
        fprintf(stderr, "stpipe %s: %s\n", cmd, err.msg);
        gguf_close(g);
        return 1;
    }
    return 0;
}

/* Prints a token's bytes between quotes, escaping what a terminal would mangle. */
static void s_print_piece(const char *b, size_t n) {
    putchar('\'');
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)b[i];
        if (c == '\n')
            fputs("\\n", stdout);
        else if (c == '\r')
            fputs("\\r", stdout);
        else if (c == '\t')
            fputs("\\t", stdout);
        else if (c == '\\')
            fputs("\\\\", stdout);
        else if (c < 0x20 || c == 0x7f)
            printf("\\x%02x", c);
        else if (c < 0x80)
            putchar(c);
        else {
            /* a complete UTF-8 character prints as is; stray bytes as \xNN */
            size_t len = c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : c >= 0xC2 ? 2 : 0;
            bool ok = len > 0 && i + len <= n;
            for (size_t k = 1; ok && k < len; k++)
                ok = ((unsigned char)b[i + k] & 0xC0) == 0x80;
            if (ok) {
                fwrite(b + i, 1, len, stdout);
                i += len - 1;
            } else {
                printf("\\x%02x", c);
            }
        }
    }
    putchar('\'');
}

int cli_tokenize(int argc, char **argv) {
    tok_opts o;
    memset(&o, 0, sizeof o);
    int bad = cli_opts_parse("tokenize", s_tokenize_opts, CLI_NOPTS(s_tokenize_opts), &o, argc,
                             argv, s_tokenize_usage);
    if (bad) return bad == CLI_HELP ? 0 : bad;
    const char *model = o.model, *text = o.text, *file = o.file;
    const bool ids_only = o.ids_only;
    int flags = TOK_PARSE_SPECIAL;
    if (o.no_parse_special) flags &= ~TOK_PARSE_SPECIAL;
    if (o.no_normalize) flags |= TOK_NO_NORMALIZE;
    if (!model || (!text == !file)) {
        fprintf(stderr, "stpipe tokenize: need --model and exactly one of --text or --file\n");
        s_tokenize_usage(stderr);
        return 2;
    }
    size_t len = 0;
    char *buf = NULL;
    if (file) {
        buf = cli_read_file(file, &len);
        if (!buf) return 1;
    } else {
        len = strlen(text);
    }
    gguf_file *g = NULL;
    tokenizer *t = NULL;
    if (s_open("tokenize", model, &g, &t)) {
        free(buf);
        return 1;
    }
    int32_t *ids = NULL;
    size_t n = 0;
    stp_err err = {0};
    int rc = tokenizer_encode(t, buf ? buf : text, len, flags, &ids, &n, &err);
    if (rc) {
        fprintf(stderr, "stpipe tokenize: %s\n", err.msg);
    } else if (ids_only) {
        for (size_t i = 0; i < n; i++)
            printf(i ? " %d" : "%d", ids[i]);
        putchar('\n');
    } else {
        for (size_t i = 0; i < n; i++) {
            const char *b;
            size_t bl;
            tokenizer_token_bytes(t, ids[i], &b, &bl);
            printf("%6d -> ", ids[i]);
            s_print_piece(b, bl);
            putchar('\n');
        }
    }
    free(ids);
    free(buf);
    tokenizer_destroy(&t);
    gguf_close(&g);
    if (fflush(stdout) != 0) return 1;
    return rc ? 1 : 0;
}

int cli_detokenize(int argc, char **argv) {
    tok_opts o;
    memset(&o, 0, sizeof o);
    int bad = cli_opts_parse("detokenize", s_detokenize_opts, CLI_NOPTS(s_detokenize_opts), &o,
                             argc, argv, s_detokenize_usage);
    if (bad) return bad == CLI_HELP ? 0 : bad;
    const char *model = o.model, *ids_s = o.ids_s;
    if (!model || !ids_s) {
        fprintf(stderr, "stpipe detokenize: need --model and --ids\n");
        s_detokenize_usage(stderr);
        return 2;
    }
    int32_t *ids = NULL;
    int n = cli_parse_ids(ids_s, &ids);
    if (n < 0) return 2;
    gguf_file *g = NULL;
    tokenizer *t = NULL;
    if (s_open("detokenize", model, &g, &t)) {
        free(ids);
        return 1;
    }
    char *text = NULL;
    size_t len = 0;
    stp_err err = {0};
    int rc = tokenizer_decode(t, ids, (size_t)n, &text, &len, &err);
    if (rc) {
        fprintf(stderr,
                "stpipe detokenize: %s\n  (ids come from `stpipe tokenize --ids` with the "
                "same model)\n",
                err.msg);
    } else {
        fwrite(text, 1, len, stdout);
        putchar('\n');
    }
    free(text);
    free(ids);
    tokenizer_destroy(&t);
    gguf_close(&g);
    if (fflush(stdout) != 0) return 1;
    return rc ? 1 : 0;
}
