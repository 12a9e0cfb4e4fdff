/* fuzz_seeds: writes the seed corpora of the fuzz targets (tests/fuzz/corpus/<target>/).
 * Usage: fuzz_seeds DATA_DIR OUT_DIR     (DATA_DIR: tests/data; OUT_DIR: tests/fuzz/corpus)
 *
 * fuzz_gguf: tiny synthetic SmallThinker models written with the GGUF writer (they open and
 *   pass model_open: 1 layer, 8-wide, 2 experts; dense, windowed, untied variants), plus the
 *   header and metadata (up to the data section) of the smallest golden GGUFs in DATA_DIR
 *   (real keys and tokenizer arrays; refused because the tensors' data is cut off).
 * fuzz_tokenizer: every 2nd text of DATA_DIR/tokenizer/cases.jsonl (about 40 texts).
 * fuzz_msg: for every message type, a packed instance with every field set (strings "ab",
 *   bytes, two elements per repeated field, nested messages), one per oneof member, each
 *   prefixed by the type's index byte (see fuzz_msg.c).
 * Not a libFuzzer target: re-run it only when the formats change (the corpus is committed). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>
#include <protobuf-c/protobuf-c.h>

#include "fuzz_msg_types.h"
#include "gguf/gguf.h"

static int fs_write(const char *dir, const char *name, const void *data, size_t n) {
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "wb");
    if (!f || fwrite(data, 1, n, f) != n) {
        fprintf(stderr, "fuzz_seeds: cannot write %s\n", path);
        if (f) fclose(f);
        return -1;
    }
    return fclose(f);
}

/* ---- GGUF --------------------------------------------------------------------------------- */

typedef struct fs_model {
    const char *name;
    bool window, untied, gating;
    stp_type type;
} fs_model;

static int fs_model_write(const char *path, const fs_model *m) {
    const int n_embd = 8, n_head = 2, n_kv = 1, hd = 4, n_exp = 2, n_ff = 8, n_vocab = 8;
    stp_err err = {0};
    gguf_writer *w = NULL;
    if (gguf_writer_new(&w, path, &err)) goto fail;
    gguf_writer_kv_str(w, "general.architecture", "smallthinker");
    gguf_writer_kv_u32(w, "smallthinker.block_count", 1);
    gguf_writer_kv_u32(w, "smallthinker.context_length", 64);
    gguf_writer_kv_u32(w, "smallthinker.embedding_length", n_embd);
    gguf_writer_kv_u32(w, "smallthinker.attention.head_count", n_head);
    gguf_writer_kv_u32(w, "smallthinker.attention.head_count_kv", n_kv);
    gguf_writer_kv_u32(w, "smallthinker.attention.key_length", hd);
    gguf_writer_kv_u32(w, "smallthinker.attention.value_length", hd);
    gguf_writer_kv_f32(w, "smallthinker.attention.layer_norm_rms_epsilon", 1e-6f);
    gguf_writer_kv_f32(w, "smallthinker.rope.freq_base", 10000.0f);
    gguf_writer_kv_u32(w, "smallthinker.expert_count", n_exp);
    gguf_writer_kv_u32(w, "smallthinker.expert_used_count", 1);
    gguf_writer_kv_u32(w, "smallthinker.expert_feed_forward_length", n_ff);
    gguf_writer_kv_u32(w, "smallthinker.feed_forward_length", n_ff);
    if (m->gating) gguf_writer_kv_u32(w, "smallthinker.expert_gating_func", 2);
    if (m->window) gguf_writer_kv_u32(w, "smallthinker.attention.sliding_window", 16);
    const char *toks[8] = {"a", "b", "c", "d", "e", "f", "g", "h"};
    gguf_writer_kv_arr_str(w, "tokenizer.ggml.tokens", toks, 8);
    int32_t types[8] = {1, 1, 1, 1, 1, 1, 3, 3};
    gguf_writer_kv_arr(w, "tokenizer.ggml.token_type", GGUF_VT_INT32, types, 8);

    struct {
        const char *name;
        uint32_t nd;
        int64_t ne[3];
        bool norm;
    } t[] = {
        {"token_embd.weight", 2, {n_embd, n_vocab, 1}, false},
        {"output_norm.weight", 1, {n_embd, 1, 1}, true},
        {"output.weight", 2, {n_embd, n_vocab, 1}, false},
        {"blk.0.attn_norm.weight", 1, {n_embd, 1, 1}, true},
        {"blk.0.attn_q.weight", 2, {n_embd, n_head * hd, 1}, false},
        {"blk.0.attn_k.weight", 2, {n_embd, n_kv * hd, 1}, false},
        {"blk.0.attn_v.weight", 2, {n_embd, n_kv * hd, 1}, false},
        {"blk.0.attn_output.weight", 2, {n_head * hd, n_embd, 1}, false},
        {"blk.0.ffn_norm.weight", 1, {n_embd, 1, 1}, true},
        {"blk.0.ffn_gate_inp.weight", 2, {n_embd, n_exp, 1}, false},
        {"blk.0.ffn_gate_exps.weight", 3, {n_embd, n_ff, n_exp}, false},
        {"blk.0.ffn_up_exps.weight", 3, {n_embd, n_ff, n_exp}, false},
        {"blk.0.ffn_down_exps.weight", 3, {n_ff, n_embd, n_exp}, false},
    };
    size_t nt = sizeof t / sizeof t[0];
    for (size_t i = 0; i < nt; i++) {
        if (!m->untied && strcmp(t[i].name, "output.weight") == 0) continue;
        stp_type ty = t[i].norm ? STP_TYPE_F32 : m->type;
        if (gguf_writer_add_tensor(w, t[i].name, ty, t[i].nd, t[i].ne)) goto fail;
    }
    if (gguf_writer_begin_data(w, &err)) goto fail;
    for (size_t i = 0; i < nt; i++) {
        if (!m->untied && strcmp(t[i].name, "output.weight") == 0) continue;
        stp_type ty = t[i].norm ? STP_TYPE_F32 : m->type;
        int64_t n = t[i].ne[0] * t[i].ne[1] * t[i].ne[2];
        size_t bytes = tensor_type_row_size(ty, t[i].ne[0]) * (size_t)(n / t[i].ne[0]);
        uint8_t *buf = calloc(bytes, 1);
        if (!buf) goto fail;
        if (ty == STP_TYPE_F32)
            for (int64_t j = 0; j < n; j++)
                ((float *)buf)[j] = t[i].norm ? 1.0f : 0.01f * (float)j;
        int rc = gguf_writer_write(w, buf, bytes, &err);
        free(buf);
        if (rc) goto fail;
    }
    if (gguf_writer_finish(w, &err)) goto fail;
    gguf_writer_destroy(&w);
    return 0;
fail:
    fprintf(stderr, "fuzz_seeds: %s: %s\n", path, err.msg);
    gguf_writer_destroy(&w);
    return -1;
}

/* The first data_offset bytes of a golden GGUF (header, keys, tensor infos). */
static int fs_gguf_meta(const char *data_dir, const char *out, const char *stem) {
    char path[4096], name[256];
    snprintf(path, sizeof path, "%s/%s.gguf", data_dir, stem);
    gguf_file *g = NULL;
    stp_err err = {0};
    if (gguf_open(&g, path, &err)) {
        fprintf(stderr, "fuzz_seeds: %s\n", err.msg);
        return -1;
    }
    snprintf(name, sizeof name, "meta-%s.gguf", stem);
    int rc = fs_write(out, name, gguf_base(g), gguf_data_offset(g));
    gguf_close(&g);
    return rc;
}

static int fs_gguf(const char *data_dir, const char *out) {
    static const fs_model models[] = {
        {"tiny-f32.gguf", false, false, true, STP_TYPE_F32},
        {"tiny-window-untied-f32.gguf", true, true, false, STP_TYPE_F32},
        {"tiny-f16.gguf", false, false, true, STP_TYPE_F16},
    };
    for (size_t i = 0; i < sizeof models / sizeof models[0]; i++) {
        char path[4096];
        snprintf(path, sizeof path, "%s/%s", out, models[i].name);
        if (fs_model_write(path, &models[i])) return -1;
    }
    if (fs_gguf_meta(data_dir, out, "tiny-dense-attn-q4_0-pure")) return -1;
    return fs_gguf_meta(data_dir, out, "tiny-hybrid-attn-q4_0-pure");
}

/* ---- tokenizer ---------------------------------------------------------------------------- */

static int fs_tokenizer(const char *data_dir, const char *out) {
    char path[4096];
    snprintf(path, sizeof path, "%s/tokenizer/cases.jsonl", data_dir);
    FILE *f = fopen(path, "r");
    if (!f) return fprintf(stderr, "fuzz_seeds: cannot read %s\n", path), -1;
    char *line = NULL;
    size_t cap = 0;
    int i = 0, rc = 0;
    while (rc == 0 && getline(&line, &cap, f) > 0) {
        if (i++ % 2) continue;
        json_error_t je;
        json_t *j = json_loads(line, 0, &je);
        json_t *text = j ? json_object_get(j, "text") : NULL;
        if (text && json_is_string(text) && json_string_length(text) > 0) {
            char name[64];
            snprintf(name, sizeof name, "case-%04d.txt", i - 1);
            rc = fs_write(out, name, json_string_value(text), json_string_length(text));
        }
        json_decref(j);
    }
    free(line);
    fclose(f);
    return rc;
}

/* ---- messages ----------------------------------------------------------------------------- */

static size_t fs_scalar_size(ProtobufCType t) {
    switch (t) {
    case PROTOBUF_C_TYPE_INT64:
    case PROTOBUF_C_TYPE_SINT64:
    case PROTOBUF_C_TYPE_SFIXED64:
    case PROTOBUF_C_TYPE_UINT64:
    case PROTOBUF_C_TYPE_FIXED64:
    case PROTOBUF_C_TYPE_DOUBLE: return 8;
    case PROTOBUF_C_TYPE_BOOL: return sizeof(protobuf_c_boolean);
    case PROTOBUF_C_TYPE_STRING: return sizeof(char *);
    case PROTOBUF_C_TYPE_BYTES: return sizeof(ProtobufCBinaryData);
    case PROTOBUF_C_TYPE_MESSAGE: return sizeof(ProtobufCMessage *);
    default: return 4;
    }
}

static ProtobufCMessage *fs_new(const ProtobufCMessageDescriptor *d, int oneof_pick, int depth);

/* One value of f at p (malloc'd pointers, so protobuf_c_message_free_unpacked frees them). */
static void fs_value(const ProtobufCFieldDescriptor *f, void *p, int k, int depth) {
    switch (f->type) {
    case PROTOBUF_C_TYPE_STRING: *(char **)p = strdup(k ? "cd" : "ab"); break;
    case PROTOBUF_C_TYPE_BYTES: {
        ProtobufCBinaryData *b = p;
        b->len = 8;
        b->data = malloc(8);
        for (int i = 0; i < 8; i++)
            b->data[i] = (uint8_t)(i * 37 + k);
        break;
    }
    case PROTOBUF_C_TYPE_MESSAGE:
        *(ProtobufCMessage **)p =
            fs_new((const ProtobufCMessageDescriptor *)f->descriptor, 0, depth + 1);
        break;
    case PROTOBUF_C_TYPE_FLOAT: *(float *)p = 0.5f + (float)k; break;
    case PROTOBUF_C_TYPE_DOUBLE: *(double *)p = 1.25 + k; break;
    case PROTOBUF_C_TYPE_BOOL: *(protobuf_c_boolean *)p = 1; break;
    default:
        if (fs_scalar_size(f->type) == 8)
            *(uint64_t *)p = 3 + (uint64_t)k;
        else
            *(uint32_t *)p = 1 + (uint32_t)k;
    }
}

/* A message with every field set; of each oneof, the member number oneof_pick (mod size). */
static ProtobufCMessage *fs_new(const ProtobufCMessageDescriptor *d, int oneof_pick, int depth) {
    ProtobufCMessage *m = calloc(1, d->sizeof_message);
    protobuf_c_message_init(d, m);
    uint8_t *base = (uint8_t *)m;
    int n_oneof = 0;
    for (unsigned i = 0; i < d->n_fields; i++)
        if (d->fields[i].flags & PROTOBUF_C_FIELD_FLAG_ONEOF) n_oneof++;
    int oneof_i = 0;
    for (unsigned i = 0; i < d->n_fields; i++) {
        const ProtobufCFieldDescriptor *f = &d->fields[i];
        void *p = base + f->offset;
        if (f->type == PROTOBUF_C_TYPE_MESSAGE && depth >= 3) continue;
        if (f->flags & PROTOBUF_C_FIELD_FLAG_ONEOF) {
            if (oneof_i++ != oneof_pick % n_oneof) continue;
            *(uint32_t *)(base + f->quantifier_offset) = f->id;
            fs_value(f, p, 0, depth);
        } else if (f->label == PROTOBUF_C_LABEL_REPEATED) {
            size_t es = fs_scalar_size(f->type);
            uint8_t *arr = calloc(2, es);
            for (int k = 0; k < 2; k++)
                fs_value(f, arr + (size_t)k * es, k, depth);
            *(size_t *)(base + f->quantifier_offset) = 2;
            *(void **)p = arr;
        } else {
            fs_value(f, p, 0, depth);
        }
    }
    return m;
}

static int fs_msg(const char *out) {
    for (int t = 0; t < FZ_MSG_N_TYPES; t++) {
        const ProtobufCMessageDescriptor *d = fz_msg_types[t];
        int n_oneof = 0;
        for (unsigned i = 0; i < d->n_fields; i++)
            if (d->fields[i].flags & PROTOBUF_C_FIELD_FLAG_ONEOF) n_oneof++;
        for (int pick = 0; pick < (n_oneof ? n_oneof : 1); pick++) {
            ProtobufCMessage *m = fs_new(d, pick, 0);
            size_t n = protobuf_c_message_get_packed_size(m);
            uint8_t *buf = malloc(n + 1);
            buf[0] = (uint8_t)t;
            protobuf_c_message_pack(m, buf + 1);
            char name[128];
            snprintf(name, sizeof name, "%02d-%s-%d.bin", t, d->short_name, pick);
            int rc = fs_write(out, name, buf, n + 1);
            free(buf);
            protobuf_c_message_free_unpacked(m, NULL);
            if (rc) return rc;
        }
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: fuzz_seeds DATA_DIR OUT_DIR (OUT_DIR/<target>/ must exist)\n");
        return 2;
    }
    char dir[4096];
    snprintf(dir, sizeof dir, "%s/fuzz_gguf", argv[2]);
    if (fs_gguf(argv[1], dir)) return 1;
    snprintf(dir, sizeof dir, "%s/fuzz_tokenizer", argv[2]);
    if (fs_tokenizer(argv[1], dir)) return 1;
    snprintf(dir, sizeof dir, "%s/fuzz_msg", argv[2]);
    if (fs_msg(dir)) return 1;
    return 0;
}
