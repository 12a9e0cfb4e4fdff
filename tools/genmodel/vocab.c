/* vocab: the tokenizer metadata of generated models.
 *
 * Either a synthetic but valid byte-level BPE laid out as the golden tiny vocabulary (ids 0..255
 * are the bytes in GPT-2's byte-to-unicode alphabet, id == byte value; then one token per merge,
 * learnt greedily on a small built-in English text and, past that, extended by appending letters;
 * then <|endoftext|>, <|im_start|>, <|im_end|> as the last three ids), or a Hugging Face
 * tokenizer.json typed as llama.cpp's converter types it (see /work/shared/golden/README.md §7).
 * Invariant: every token string is unique and every merge's result is a token. */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "genmodel.h"

enum { TOK_NORMAL = 1, TOK_CONTROL = 3, TOK_USER = 4, TOK_UNUSED = 5 };

/* ------------------------------------------------------------------------------------------ */
/* String set (open addressing, FNV-1a) mapping a token string to its id                      */
/* ------------------------------------------------------------------------------------------ */

typedef struct strset {
    int32_t *slot; /* -1 = empty, else index into the token array */
    size_t cap;    /* power of two */
} strset;

static uint64_t s_hash(const char *s) {
    uint64_t h = 1469598103934665603ull;
    for (; *s; s++)
        h = (h ^ (uint8_t)*s) * 1099511628211ull;
    return h;
}

static int s_set_init(strset *set, size_t n) {
    set->cap = 1024;
    while (set->cap < n * 2)
        set->cap *= 2;
    set->slot = malloc(set->cap * sizeof *set->slot);
    if (!set->slot) return STP_ENOMEM;
    memset(set->slot, 0xff, set->cap * sizeof *set->slot);
    return 0;
}

/* Returns the id of s, or -1 and (if insert_id >= 0) inserts it under insert_id. */
static int32_t s_set_find(strset *set, char **tokens, const char *s, int32_t insert_id) {
    size_t i = (size_t)s_hash(s) & (set->cap - 1);
    while (set->slot[i] >= 0) {
        if (strcmp(tokens[set->slot[i]], s) == 0) return set->slot[i];
        i = (i + 1) & (set->cap - 1);
    }
    if (insert_id >= 0) set->slot[i] = insert_id;
    return -1;
}

/* ------------------------------------------------------------------------------------------ */
/* Helpers                                                                                    */
/* ------------------------------------------------------------------------------------------ */

void gm_vocab_fini(gm_vocab *v) {
    if (!v) return;
    if (v->tokens)
        for (uint32_t i = 0; i < v->n; i++)
            free(v->tokens[i]);
    if (v->merges)
        for (uint32_t i = 0; i < v->n_merges; i++)
            free(v->merges[i]);
    free(v->tokens);
    free(v->types);
    free(v->merges);
    memset(v, 0, sizeof *v);
}

static int s_vocab_alloc(gm_vocab *v, uint32_t n, uint32_t max_merges) {
    memset(v, 0, sizeof *v);
    v->tokens = calloc(n, sizeof *v->tokens);
    v->types = calloc(n, sizeof *v->types);
    v->merges = calloc(max_merges ? max_merges : 1, sizeof *v->merges);
    if (!v->tokens || !v->types || !v->merges) return STP_ENOMEM;
    v->n = n;
    return 0;
}

static char *s_concat(const char *a, const char *sep, const char *b) {
    size_t la = strlen(a), ls = strlen(sep), lb = strlen(b);
    char *r = malloc(la + ls + lb + 1);
    if (!r) return NULL;
    memcpy(r, a, la);
    memcpy(r + la, sep, ls);
    memcpy(r + la + ls, b, lb + 1);
    return r;
}

/* GPT-2 bytes_to_unicode: printable bytes map to themselves, the others to U+0100 upwards. */
static uint32_t s_byte_cp(int b) {
    if ((b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255))
        return (uint32_t)b;
    int n = 0;
    for (int c = 0; c < b; c++)
        if (!((c >= 33 && c <= 126) || (c >= 161 && c <= 172) || (c >= 174 && c <= 255))) n++;
    return 256u + (uint32_t)n;
}

static void s_utf8(uint32_t cp, char *out) {
    if (cp < 0x80) {
        out[0] = (char)cp;
        out[1] = 0;
    } else { /* cp < 0x800 for every byte code point */
        out[0] = (char)(0xC0 | (cp >> 6));
        out[1] = (char)(0x80 | (cp & 0x3F));
        out[2] = 0;
    }
}

/* ------------------------------------------------------------------------------------------ */
/* Synthetic vocabulary                                                                       */
/* ------------------------------------------------------------------------------------------ */

static const char s_corpus[] =
    "The small model thinks about the next token. The experts of the model are small and the "
    "router sends each token to the experts that fit it best. The engine reads the weights of "
    "the experts from memory and the attention of the model looks at the tokens before it. "
    "This is the reference engine for the mixture of experts model and it is the same as the "
    "reference in every test. A token is a piece of text and the model turns text into tokens "
    "and tokens into text. The inference engine runs the model on the machine with all of the "
    "layers and each layer has an attention part and an expert part. When the model thinks "
    "about a question it writes the answer one token at a time and the engine measures the "
    "speed of each step. There are many experts in each layer but only a few of them run for "
    "each token, which makes the model fast and the answer good. The context of the model holds "
    "the keys and the values of the tokens that came before, and the cache keeps them in memory "
    "so that the next token does not need to compute them again. In the end the model writes "
    "text that people can read, and the test compares the text with the reference text.";

static int s_cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

#define MAX_WORDS 512
#define MAX_SYMS 64

typedef struct corpus_word {
    int32_t sym[MAX_SYMS];
    int n;
    int count;
} corpus_word;

int gm_vocab_synth(gm_vocab *v, uint32_t n_vocab, stp_err *err) {
    if (n_vocab < 259)
        return stp_err_set(err, STP_EINVAL, "synthetic vocabulary needs n_vocab >= 259, got %u",
                           n_vocab);
    uint32_t n_bpe = n_vocab - 3; /* tokens before the three control tokens */
    int rc = s_vocab_alloc(v, n_vocab, n_bpe - 256 + 4096);
    strset set = {0};
    corpus_word *words = calloc(MAX_WORDS, sizeof *words);
    uint64_t *pairs = malloc(MAX_WORDS * MAX_SYMS * sizeof *pairs);
    if (rc || !words || !pairs || s_set_init(&set, n_vocab)) goto oom;
    uint32_t max_merges = n_bpe - 256 + 4096;

    for (int b = 0; b < 256; b++) {
        char s[4];
        s_utf8(s_byte_cp(b), s);
        v->tokens[b] = strdup(s);
        v->types[b] = TOK_NORMAL;
        if (!v->tokens[b]) goto oom;
        s_set_find(&set, v->tokens, s, b);
    }
    uint32_t n_tok = 256;

    /* Split the corpus into unique words, a leading space staying with its word. */
    int n_words = 0;
    const char *p = s_corpus;
    while (*p) {
        const char *start = p;
        p++;
        while (*p && *p != ' ')
            p++;
        corpus_word wd = {.n = 0, .count = 1};
        for (const char *q = start; q < p && wd.n < MAX_SYMS; q++)
            wd.sym[wd.n++] = (uint8_t)*q;
        int found = -1;
        for (int i = 0; i < n_words && found < 0; i++)
            if (words[i].n == wd.n && memcmp(words[i].sym, wd.sym, (size_t)wd.n * 4) == 0)
                found = i;
        if (found >= 0)
            words[found].count++;
        else if (n_words < MAX_WORDS)
            words[n_words++] = wd;
    }

    /* Greedy BPE training: merge the most frequent adjacent pair (ties: lowest ids). */
    while (n_tok < n_bpe && v->n_merges < max_merges) {
        int32_t best_a = -1, best_b = -1;
        int best_c = 1; /* a pair must occur at least twice to be learnt */
        size_t np = 0;
        for (int i = 0; i < n_words; i++)
            for (int j = 0; j + 1 < words[i].n; j++)
                pairs[np++] = ((uint64_t)(uint32_t)words[i].sym[j] << 40) |
                              ((uint64_t)(uint32_t)words[i].sym[j + 1] << 16) |
                              (uint64_t)(uint16_t)words[i].count;
        qsort(pairs, np, sizeof *pairs, s_cmp_u64);
        for (size_t i = 0; i < np;) {
            uint64_t key = pairs[i] >> 16;
            int c = 0;
            for (; i < np && (pairs[i] >> 16) == key; i++)
                c += (int)(pairs[i] & 0xffff);
            if (c > best_c) { /* sorted by (a, b): the first maximum has the lowest ids */
                best_c = c;
                best_a = (int32_t)(key >> 24);
                best_b = (int32_t)(key & 0xffffff);
            }
        }
        if (best_a < 0) break;
        char *tok = s_concat(v->tokens[best_a], "", v->tokens[best_b]);
        char *mrg = s_concat(v->tokens[best_a], " ", v->tokens[best_b]);
        if (!tok || !mrg) {
            free(tok);
            free(mrg);
            goto oom;
        }
        v->merges[v->n_merges++] = mrg;
        int32_t id = s_set_find(&set, v->tokens, tok, -1);
        if (id < 0) {
            id = (int32_t)n_tok;
            v->tokens[n_tok] = tok;
            v->types[n_tok] = TOK_NORMAL;
            s_set_find(&set, v->tokens, tok, id);
            n_tok++;
        } else {
            free(tok);
        }
        for (int i = 0; i < n_words; i++) {
            int o = 0;
            for (int j = 0; j < words[i].n; j++) {
                if (j + 1 < words[i].n && words[i].sym[j] == best_a &&
                    words[i].sym[j + 1] == best_b) {
                    words[i].sym[o++] = id;
                    j++;
                } else {
                    words[i].sym[o++] = words[i].sym[j];
                }
            }
            words[i].n = o;
        }
    }

    /* Past the corpus: extend existing tokens by one letter, in id order, until full. */
    static const char letters[] = "etaoinshrdlucmfwypvbgkjqxz";
    for (uint32_t base = 256; n_tok < n_bpe; base++) {
        if (base >= n_tok) base = 32; /* restart from the byte tokens (' ' = 'Ġ' and up) */
        for (const char *l = letters; *l && n_tok < n_bpe; l++) {
            char lt[2] = {*l, 0};
            char *tok = s_concat(v->tokens[base], "", lt);
            if (!tok) goto oom;
            if (s_set_find(&set, v->tokens, tok, -1) >= 0) {
                free(tok);
                continue;
            }
            char *mrg = s_concat(v->tokens[base], " ", lt);
            if (!mrg) {
                free(tok);
                goto oom;
            }
            if (v->n_merges == max_merges) {
                char **m = realloc(v->merges, (size_t)(max_merges * 2) * sizeof *m);
                if (!m) {
                    free(tok);
                    free(mrg);
                    goto oom;
                }
                v->merges = m;
                max_merges *= 2;
            }
            v->merges[v->n_merges++] = mrg;
            v->tokens[n_tok] = tok;
            v->types[n_tok] = TOK_NORMAL;
            s_set_find(&set, v->tokens, tok, (int32_t)n_tok);
            n_tok++;
        }
    }

    static const char *ctl[3] = {"<|endoftext|>", "<|im_start|>", "<|im_end|>"};
    for (int i = 0; i < 3; i++) {
        v->tokens[n_bpe + (uint32_t)i] = strdup(ctl[i]);
        v->types[n_bpe + (uint32_t)i] = TOK_CONTROL;
        if (!v->tokens[n_bpe + (uint32_t)i]) goto oom;
    }
    v->bos = v->pad = n_bpe;
    v->eos = n_bpe + 2;
    v->chat_template = false; /* the golden tiny files carry none */
    free(words);
    free(pairs);
    free(set.slot);
    return 0;
oom:
    free(words);
    free(pairs);
    free(set.slot);
    gm_vocab_fini(v);
    return stp_err_set(err, STP_ENOMEM, "synthetic vocabulary: out of memory");
}

/* ------------------------------------------------------------------------------------------ */
/* Hugging Face tokenizer.json                                                                */
/* ------------------------------------------------------------------------------------------ */

int gm_vocab_from_hf(gm_vocab *v, const char *path, uint32_t n_vocab, stp_err *err) {
    json_error_t je;
    json_t *root = json_load_file(path, 0, &je);
    if (!root) return stp_err_set(err, STP_EFORMAT, "%s:%d: %s", path, je.line, je.text);
    int rc = STP_EFORMAT;
    json_t *model = json_object_get(root, "model");
    json_t *vocab = json_object_get(model, "vocab");
    json_t *merges = json_object_get(model, "merges");
    json_t *added = json_object_get(root, "added_tokens");
    if (!json_is_object(vocab) || !json_is_array(merges)) {
        stp_err_set(err, rc, "%s: model.vocab (object) and model.merges (array) required", path);
        goto done;
    }
    size_t n_merges = json_array_size(merges);
    if (s_vocab_alloc(v, n_vocab, (uint32_t)n_merges)) {
        rc = stp_err_set(err, STP_ENOMEM, "%s: out of memory", path);
        goto done;
    }
    const char *key;
    json_t *val;
    json_object_foreach(vocab, key, val) {
        json_int_t id = json_integer_value(val);
        if (!json_is_integer(val) || id < 0 || id >= (json_int_t)n_vocab) {
            stp_err_set(err, rc, "%s: vocab entry '%s' has id %lld outside 0..%u", path, key,
                        (long long)id, n_vocab - 1);
            goto done;
        }
        if (v->tokens[id]) {
            stp_err_set(err, rc, "%s: id %lld used twice", path, (long long)id);
            goto done;
        }
        if (!(v->tokens[id] = strdup(key))) goto oom;
        v->types[id] = TOK_NORMAL;
    }
    size_t i;
    json_array_foreach(added, i, val) {
        json_t *jid = json_object_get(val, "id");
        const char *content = json_string_value(json_object_get(val, "content"));
        json_int_t id = json_integer_value(jid);
        if (!json_is_integer(jid) || !content || id < 0 || id >= (json_int_t)n_vocab) {
            stp_err_set(err, rc, "%s: added_tokens[%zu] malformed or id outside 0..%u", path, i,
                        n_vocab - 1);
            goto done;
        }
        size_t len = strlen(content);
        bool special = json_is_true(json_object_get(val, "special"));
        bool looks_ctl =
            len >= 4 && strncmp(content, "<|", 2) == 0 && strcmp(content + len - 2, "|>") == 0;
        free(v->tokens[id]);
        if (!(v->tokens[id] = strdup(content))) goto oom;
        v->types[id] = special || looks_ctl ? TOK_CONTROL : TOK_USER;
    }
    for (uint32_t id = 0; id < n_vocab; id++) {
        if (v->tokens[id]) continue;
        char buf[32];
        snprintf(buf, sizeof buf, "[PAD%u]", id);
        if (!(v->tokens[id] = strdup(buf))) goto oom;
        v->types[id] = TOK_UNUSED;
    }
    json_array_foreach(merges, i, val) {
        char *m = NULL;
        if (json_is_string(val)) {
            m = strdup(json_string_value(val));
        } else if (json_is_array(val) && json_array_size(val) == 2 &&
                   json_is_string(json_array_get(val, 0)) &&
                   json_is_string(json_array_get(val, 1))) {
            m = s_concat(json_string_value(json_array_get(val, 0)), " ",
                         json_string_value(json_array_get(val, 1)));
        } else {
            stp_err_set(err, rc, "%s: model.merges[%zu] is neither \"a b\" nor [a, b]", path, i);
            goto done;
        }
        if (!m) goto oom;
        v->merges[v->n_merges++] = m;
    }
    /* Special ids by content (Qwen2: 151643, 151645), falling back to the Qwen2 numbers. */
    v->bos = v->pad = 151643;
    v->eos = 151645;
    for (uint32_t id = 0; id < n_vocab; id++) {
        if (strcmp(v->tokens[id], "<|endoftext|>") == 0) v->bos = v->pad = id;
        if (strcmp(v->tokens[id], "<|im_end|>") == 0) v->eos = id;
    }
    v->chat_template = true;
    rc = 0;
    goto done;
oom:
    rc = stp_err_set(err, STP_ENOMEM, "%s: out of memory", path);
done:
    if (rc) gm_vocab_fini(v);
    json_decref(root);
    return rc;
}
