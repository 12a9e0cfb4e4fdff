/* budget: the pipeline's memory plan from sizes; see budget.h and README.md. */
#include "plan/budget.h"

#include <ctype.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "kern/kern.h"
#include "model/attention.h"
#include "model/expert_ffn.h"
#include "model/forward.h"
#include "shm/shm.h"

#define MiB (1024.0 * 1024.0)

/* ---- what each stage allocates ---- */

uint64_t budget_kv_bytes(const model_config *c, int n_ctx, int n_ubatch, kv_dtype type) {
    return kv_cache_pool_bytes(c, n_ctx, n_ubatch, type, 1, n_ctx); /* the cache's own count */
}

uint64_t budget_attn_scratch_bytes(const model_config *c, int n_ubatch, int n_ctx, int threads) {
    return attn_scratch_size(c, n_ubatch, n_ctx, threads); /* the attention module's own count */
}

uint64_t budget_worker_bytes(const model_config *c) {
    /* per chunk slot: gate, up and active rows (counted as four rows of n_ff_exp: the spare
     * one covers the per-slot index arrays), a down output row, three quantized activations;
     * then the packed up and down images of one wave */
    const uint64_t E = (uint64_t)c->n_embd, F = (uint64_t)c->n_ff_exp, wide = E > F ? E : F;
    return (uint64_t)EXPERT_FFN_CHUNK * (4 * F * 4 + E * 4 + 3 * (wide * 4 + 64)) +
           (uint64_t)EXPERT_FFN_PACKS * 2 * kern_q4_0x16_size((int64_t)F, (int64_t)E);
}

/* ---- the plan ---- */

int budget_plan_compute(budget_plan *p, const budget_params *bp, stp_err *err) {
    const model_config *c = bp->cfg;
    memset(p, 0, sizeof *p);
    p->n_ctx = bp->n_ctx > 0 ? bp->n_ctx : (c->n_ctx_train < 4096 ? c->n_ctx_train : 4096);
    p->n_ubatch = bp->n_ubatch > 0 ? bp->n_ubatch : 512;
    if (p->n_ubatch > p->n_ctx) p->n_ubatch = p->n_ctx;
    p->n_seq = bp->n_seq > 0 ? bp->n_seq : 1;
    p->workers = bp->workers > 0 ? bp->workers : 1;
    p->threads = bp->threads > 0 ? bp->threads : 1;
    p->kv_type = bp->kv_type;
    p->budget = bp->budget;
    p->frame_bytes = bp->frame_bytes;
    const int NL = c->n_layer, X = c->n_expert;
    const uint64_t E = (uint64_t)c->n_embd;
    p->non_expert = bp->non_expert;
    p->kv_pool =
        bp->kv_pool > 0 && bp->kv_pool < p->n_seq * p->n_ctx ? bp->kv_pool : p->n_seq * p->n_ctx;
    p->kv = kv_cache_pool_bytes(c, p->n_ctx, p->n_ubatch, p->kv_type, p->n_seq, p->kv_pool);
    act_header ah;
    act_layout(&ah, p->n_ubatch, c->n_embd, c->n_expert_used, c->n_vocab, p->n_seq);
    p->act = ah.size;
    p->attn_scratch = budget_attn_scratch_bytes(c, p->n_ubatch, p->n_ctx, p->threads);
    /* the attention worker's residual, h and router rows per token (four of n_embd), a prompt
     * chunk's rows kept part way through the layers (one of n_embd per token: forward_part) and
     * the LM head's rows (one per slot; the queue of a micro-batch's rows) */
    p->attn_buffers =
        (uint64_t)p->n_ubatch * E * 4 * 5 + forward_heads_buf_size(c, p->n_seq, p->n_ubatch);
    p->worker = budget_worker_bytes(c);
    p->scratch = p->attn_scratch + p->attn_buffers + (uint64_t)p->workers * p->worker;
    /* the coordinator, the attention worker, the storage daemon and the workers; the
     * coordinator's tokenizer */
    p->overhead = (uint64_t)(3 + p->workers) * BUDGET_PROC_OVERHEAD +
                  (uint64_t)c->n_vocab * BUDGET_TOKENIZER_BYTES;
    p->table = pool_table_bytes(NL, X);
    p->fixed = p->non_expert + p->kv + p->act + p->scratch + p->overhead + p->table;
    p->minimum = p->fixed + (uint64_t)X * p->frame_bytes;
    p->all_frames = NL * X;
    uint64_t all = (uint64_t)p->all_frames;
    if (bp->pool_experts > 0) {
        p->frames = bp->pool_experts < X ? X : bp->pool_experts;
        if ((uint64_t)p->frames > all) p->frames = (int)all;
    } else if (!bp->budget) {
        p->frames = (int)all;
    } else if (bp->budget < p->minimum || !p->frame_bytes) {
        return stp_err_set(
            err, STP_EINVAL,
            "memory budget %.0f MiB is too small at context %d with %d sequence slots: the "
            "minimum is %.0f MiB (non-expert weights %.0f, KV cache %.0f, activations %.0f, "
            "scratch %.0f, processes %.0f, one layer of experts %.0f MiB)",
            bp->budget / MiB, p->n_ctx, p->n_seq, p->minimum / MiB, p->non_expert / MiB,
            p->kv / MiB, p->act / MiB, p->scratch / MiB, p->overhead / MiB,
            (double)X * p->frame_bytes / MiB);
    } else {
        uint64_t n = (bp->budget - p->fixed) / p->frame_bytes;
        p->frames = (int)(n > all ? all : n);
    }
    p->pool_bytes = p->table + (uint64_t)p->frames * p->frame_bytes;
    return 0;
}

int budget_parse_size(const char *s, uint64_t *out, stp_err *err) {
    char *end;
    double v = strtod(s, &end);
    if (end == s || !isfinite(v) || v < 0)
        return stp_err_set(err, STP_EINVAL, "memory budget '%s': expected a size like 1G or 800M",
                           s);
    double mul = 1;
    switch (toupper((unsigned char)*end)) {
    case 'K':
        mul = 1024.0;
        end++;
        break;
    case 'M':
        mul = MiB;
        end++;
        break;
    case 'G':
        mul = MiB * 1024;
        end++;
        break;
    case 'T':
        mul = MiB * 1024 * 1024;
        end++;
        break;
    default: break;
    }
    if (!strcasecmp(end, "iB") || !strcasecmp(end, "B")) end += strlen(end);
    if (*end) return stp_err_set(err, STP_EINVAL, "memory budget '%s': unknown unit", s);
    *out = (uint64_t)(v * mul);
    return 0;
}
