/* ops: layer building blocks with ggml-compatible rounding; see ops.h. */
#include "model/ops.h"

#include <math.h>
#include <stdatomic.h>
#include <string.h>

#include "model/down_t.h"

typedef struct mm_section {
    const compute_ctx *cc;
    const mm_job *jobs;
    int n_jobs;
    int64_t rows;         /* the jobs' rows, concatenated */
    int64_t chunk;        /* rows handed out at a time (a multiple of 16) */
    _Atomic int64_t next; /* first row not yet handed out */
} mm_section;

static void s_mm_job_range(const compute_ctx *cc, const mm_job *j, int64_t r0, int64_t r1) {
    const kern_ops *ops = cc->ops;
    if (j->rows) {
        ops->matvec_rows(j->type, j->n_cols, j->w, j->row_bytes, j->xq, j->rows + r0, r1 - r0,
                         j->y);
        return;
    }
    if (j->wp && r0 % 16 == 0 && r1 % 16 == 0) {
        if (j->n_vec > 1)
            ops->matmat_q4_0x16(j->n_cols, j->wp, j->xq, j->xq_stride, j->n_vec, j->y + r0,
                                j->y_stride, r0 / 16, r1 / 16);
        else
            ops->matvec_q4_0x16(j->n_cols, j->wp, j->xq, j->y + r0, r0 / 16, r1 / 16);
        return;
    }
    if (j->pack_scratch && j->type == STP_TYPE_Q4_0 && (j->n_vec >= MM_PACK_MIN_VEC || j->down_t) &&
        r0 % 16 == 0 && r1 % 16 == 0 && j->n_rows % 16 == 0) {
        /* groups r0/16..r1/16 of the image depend only on rows r0..r1: pack just those */
        const size_t gstride = kern_q4_0x16_size(16, j->n_cols);
        uint8_t *dst = j->pack_scratch + (size_t)(r0 / 16) * gstride;
        if (j->down_t)
            down_t_pack_x16(j->down_t, (int)j->n_rows, (int)j->n_cols, r0, r1, dst);
        else
            ops->pack_q4_0x16(j->w + (size_t)r0 * j->row_bytes, j->row_bytes, r1 - r0, j->n_cols,
                              dst);
        ops->matmat_q4_0x16(j->n_cols, dst, j->xq, j->xq_stride, j->n_vec, j->y + r0, j->y_stride,
                            0, (r1 - r0) / 16);
        return;
    }
    if (j->n_vec > 1 && ops->matmat) {
        ops->matmat(j->type, j->n_cols, j->w, j->row_bytes, j->xq, j->xq_stride, j->n_vec,
                    j->y + r0, j->y_stride, r0, r1);
        return;
    }
    for (int v = 0; v < j->n_vec; v++)
        ops->matvec(j->type, j->n_cols, j->w, j->row_bytes, j->xq + (size_t)v * j->xq_stride,
                    j->y + (size_t)v * j->y_stride + r0, r0, r1);
}

/* Rows [b, e) of the jobs' concatenated rows. */
static void s_mm_rows(const mm_section *s, int64_t b, int64_t e) {
    int64_t base = 0;
    for (int i = 0; i < s->n_jobs && b < e; i++) {
        const mm_job *j = &s->jobs[i];
        int64_t lo = base, hi = base + j->n_rows;
        base = hi;
        if (hi <= b || lo >= e) continue;
        int64_t r0 = (b > lo ? b : lo) - lo, r1 = (e < hi ? e : hi) - lo;
        s_mm_job_range(s->cc, j, r0, r1);
    }
}

/* Each thread takes the next chunk of rows until none is left: a thread whose memory reads are
 * slower for a while (the other vCPU's neighbour, a page it faults in) takes fewer chunks instead
 * of holding the others at the section's end. Which thread computes a row changes no bit. */
static void s_mm_worker(void *p, int ith, int nth) {
    mm_section *s = p;
    (void)ith, (void)nth;
    for (;;) {
        const int64_t b = atomic_fetch_add_explicit(&s->next, s->chunk, memory_order_relaxed);
        if (b >= s->rows) return;
        s_mm_rows(s, b, b + s->chunk < s->rows ? b + s->chunk : s->rows);
    }
}

/* Below this many weight bytes a section costs more to hand out than to compute alone. */
#define MM_INLINE_BYTES (64 * 1024)
/* Chunks per thread a section is cut into. */
#define MM_CHUNKS 8

void ops_mm_run(const compute_ctx *cc, const mm_job *jobs, int n_jobs) {
    mm_section s = {.cc = cc, .jobs = jobs, .n_jobs = n_jobs};
    size_t bytes = 0;
    for (int i = 0; i < n_jobs; i++) {
        bytes += (size_t)jobs[i].n_rows * jobs[i].row_bytes;
        s.rows += jobs[i].n_rows;
    }
    const int nth = threadpool_size(cc->tp);
    if (bytes < MM_INLINE_BYTES || nth == 1) {
        s_mm_rows(&s, 0, s.rows);
        return;
    }
    /* MM_CHUNKS chunks per thread: few enough that each is a long sequential read */
    const int64_t per = (s.rows + (int64_t)nth * MM_CHUNKS - 1) / ((int64_t)nth * MM_CHUNKS);
    s.chunk = (per + 15) / 16 * 16;
    atomic_init(&s.next, 0);
    threadpool_run(cc->tp, s_mm_worker, &s);
}

size_t ops_quantize_acts(const compute_ctx *cc, stp_type wtype, const float *x, int64_t n, int T,
                         uint8_t *xq) {
    size_t stride = kern_act_size(wtype, n);
    for (int t = 0; t < T; t++)
        cc->ops->quantize_act(wtype, x + (size_t)t * n, xq + t * stride, n);
    return stride;
}

mm_job ops_matrix_job(const tensor_view *w, int64_t mat, const uint8_t *xq, size_t xq_stride, int T,
                      float *y, size_t y_stride) {
    return (mm_job){.type = w->type,
                    .n_cols = w->n_cols,
                    .w = w->data + (size_t)mat * w->mat_bytes,
                    .row_bytes = w->row_bytes,
                    .xq = xq,
                    .xq_stride = xq_stride,
                    .n_vec = T,
                    .y = y,
                    .y_stride = y_stride,
                    .n_rows = w->n_rows,
                    .wp = model_packed(w, mat)};
}

void ops_matmul(const compute_ctx *cc, const tensor_view *w, int64_t mat, const float *x, int T,
                float *y, uint8_t *xq_scratch) {
    size_t stride = ops_quantize_acts(cc, w->type, x, w->n_cols, T, xq_scratch);
    const mm_job j = ops_matrix_job(w, mat, xq_scratch, stride, T, y, (size_t)w->n_rows);
    ops_mm_run(cc, &j, 1);
}

void ops_rmsnorm(const float *x, const float *w, float *y, int n, float eps) {
    double sum = 0.0;
    for (int i = 0; i < n; i++)
        sum += (double)(x[i] * x[i]);
    const float mean = (float)(sum / n);
    const float scale = 1.0f / sqrtf(mean + eps);
    for (int i = 0; i < n; i++)
        y[i] = (x[i] * scale) * w[i];
}

/* The last position's rotation, per thread: every RoPE layer of a token uses the same one, so
 * its 2 x head_dim/2 sines and cosines are computed once per token instead of once per layer. */
typedef struct rope_angles {
    int pos, head_dim;
    float base;
    float cs[STP_MAX_HEAD_DIM / 2], sn[STP_MAX_HEAD_DIM / 2];
} rope_angles;
static _Thread_local rope_angles s_rope = {.pos = -1};

void ops_rope_neox(float *v, int n_heads, int head_dim, int pos, float base) {
    const int half = head_dim / 2;
    rope_angles *r = &s_rope;
    if (r->pos != pos || r->head_dim != head_dim || r->base != base) {
        const float theta_scale = powf(base, -2.0f / (float)head_dim);
        float theta = (float)pos;
        for (int i = 0; i < half; i++) {
            r->cs[i] = cosf(theta);
            r->sn[i] = sinf(theta);
            theta *= theta_scale;
        }
        r->pos = pos, r->head_dim = head_dim, r->base = base;
    }
    const float *cs = r->cs, *sn = r->sn;
    for (int h = 0; h < n_heads; h++) {
        float *q = v + (size_t)h * head_dim;
        for (int i = 0; i < half; i++) {
            const float x0 = q[i], x1 = q[i + half];
            q[i] = x0 * cs[i] - x1 * sn[i];
            q[i + half] = x0 * sn[i] + x1 * cs[i];
        }
    }
}

void ops_top_k(const float *v, int n, int k, int32_t *sel) {
    bool taken[STP_MAX_EXPERTS] = {false};
    for (int j = 0; j < k; j++) {
        int best = -1;
        for (int i = 0; i < n; i++)
            if (!taken[i] && (best < 0 || v[i] > v[best])) best = i;
        taken[best] = true;
        sel[j] = best;
    }
}

uint64_t ops_count_active(const float *g, size_t n, int F) {
    uint64_t a = 0;
    for (size_t i = 0; i < n * (size_t)F; i++)
        a += g[i] > 0.0f;
    return a;
}

int ops_active_rows(const float *g, int F, int32_t *rows) {
    /* branch-free: about half the neurons are active in no predictable order, and a branch per
     * neuron mispredicted that often cost more than the writes */
    int na = 0;
    for (int i = 0; i < F; i++) {
        rows[na] = i;
        na += g[i] > 0.0f;
    }
    return na;
}

void ops_route(const model_config *cfg, const float *logits, int32_t *sel, float *weight) {
    const int X = cfg->n_expert, K = cfg->n_expert_used;
    float probs[STP_MAX_EXPERTS];
    if (cfg->gating == GATING_SIGMOID) {
        for (int i = 0; i < X; i++)
            probs[i] = 1.0f / (1.0f + expf(-logits[i]));
    } else {
        float max = -INFINITY;
        for (int i = 0; i < X; i++)
            max = logits[i] > max ? logits[i] : max;
        double sum = 0.0;
        for (int i = 0; i < X; i++) {
            probs[i] = expf(logits[i] - max);
            sum += probs[i];
        }
        const float inv = (float)(1.0 / sum);
        for (int i = 0; i < X; i++)
            probs[i] *= inv;
    }
    ops_top_k(probs, X, K, sel);
    float sum = 0.0f;
    for (int k = 0; k < K; k++)
        sum += probs[sel[k]];
    for (int k = 0; k < K; k++)
        weight[k] = probs[sel[k]] / sum;
}

void ops_embed(const compute_ctx *cc, const tensor_view *tok_embd, int32_t id, float *out) {
    cc->ops->dequantize_row(tok_embd->type, tok_embd->data + (size_t)id * tok_embd->row_bytes, out,
                            tok_embd->n_cols);
}
