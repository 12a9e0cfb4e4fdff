/* ops: the numeric building blocks of a SmallThinker layer, shared by the in-process engine
 * and the pipeline stages, written to round the way ggml's CPU backend does (see
 * ../shared/docs/smallthinker.md §2 and common/kern/README.md):
 * - rmsnorm: sum of squares in double, scale = 1/sqrtf(mean + eps) in float, then (x*scale)*w;
 * - RoPE NeoX: pair (i, i + d/2), angle a running float32 product p * base^(-2/d)^i;
 * - gating: float32 sigmoid/softmax, top-k by probability (ties: lower expert first), weights
 *   renormalised over the selected experts;
 * - matmuls: activations rounded to the weight type's activation format (kern_act_type) first.
 * The matmul executor runs a list of jobs over a thread team, splitting their rows. */
#ifndef STP_OPS_H
#define STP_OPS_H

#include <stddef.h>
#include <stdint.h>

#include "kern/kern.h"
#include "model/model.h"
#include "util/threadpool.h"

typedef struct compute_ctx {
    const kern_ops *ops;
    threadpool *tp; /* may be NULL: single thread */
} compute_ctx;

/* y[v][r] = W[r] · x_v for the job's rows, x_v already quantized (xq). */
typedef struct mm_job {
    stp_type type;
    int64_t n_cols;
    const uint8_t *w; /* first row of the matrix */
    size_t row_bytes;
    const uint8_t *xq; /* quantized activations of vector 0 */
    size_t xq_stride;  /* bytes between vectors */
    int n_vec;
    float *y;              /* output of vector 0, indexed by row */
    size_t y_stride;       /* floats between vectors */
    int64_t n_rows;        /* rows to compute: 0..n_rows-1, or rows[0..n_rows-1] */
    const int32_t *rows;   /* optional row subset (n_vec must be 1) */
    const uint8_t *wp;     /* optional q4_0x16 image of the same matrix (faster, same bits) */
    uint8_t *pack_scratch; /* optional: room for a q4_0x16 image of the matrix; a Q4_0 job with
                            * many vectors and no wp packs its rows there first (each chunk
                            * of rows a thread takes, its own groups) and runs the packed
                            * kernel: same bits */
    const uint8_t *down_t; /* optional, with pack_scratch: the matrix is this down_t image
                            * (down_t.h; w unused, row_bytes still the Q4_0 row size: it sizes
                            * the parallel section), packed from it for any n_vec */
} mm_job;

/* Fewest vectors for which packing a Q4_0 matrix on the fly pays for itself. */
#define MM_PACK_MIN_VEC 8

/* Runs all jobs (in one parallel section). */
void ops_mm_run(const compute_ctx *cc, const mm_job *jobs, int n_jobs);

/* Quantizes T vectors of n floats (stride n) into the activation format of wtype; xq receives
 * T * kern_act_size(wtype, n) bytes. Returns the per-vector stride in bytes. */
size_t ops_quantize_acts(const compute_ctx *cc, stp_type wtype, const float *x, int64_t n, int T,
                         uint8_t *xq);

/* The job of a whole matrix (mat of a stack, with its q4_0x16 image when it has one) over T
 * vectors already quantized in xq (xq_stride bytes apart): y[v * y_stride + r] = W[r] · x_v. */
mm_job ops_matrix_job(const tensor_view *w, int64_t mat, const uint8_t *xq, size_t xq_stride, int T,
                      float *y, size_t y_stride);

/* Convenience: y (T x rows) = W x (T x n_cols) for a whole matrix (one mat of a stack). */
void ops_matmul(const compute_ctx *cc, const tensor_view *w, int64_t mat, const float *x, int T,
                float *y, uint8_t *xq_scratch);

void ops_rmsnorm(const float *x, const float *w, float *y, int n, float eps);
/* Rotates n_heads heads of head_dim floats (contiguous) at position pos, NeoX pairing (the
 * angles of the last position are kept per thread: a token's layers share them). */
void ops_rope_neox(float *v, int n_heads, int head_dim, int pos, float base);

/* Indices of the k largest of v[0..n), largest first; ties keep the lower index first. */
void ops_top_k(const float *v, int n, int k, int32_t *sel);
/* From router logits (n_expert) to the selected experts and their weights (n_expert_used). */
void ops_route(const model_config *cfg, const float *logits, int32_t *sel, float *weight);

/* ReGLU sparsity. Neurons with relu(gate) > 0 over n gate rows of F values (the statistic); and
 * those of one row, ascending, into rows (room for F: the `up` rows a single token needs): their
 * count. */
uint64_t ops_count_active(const float *g, size_t n, int F);
int ops_active_rows(const float *g, int F, int32_t *rows);

/* Row of an embedding matrix as floats. */
void ops_embed(const compute_ctx *cc, const tensor_view *tok_embd, int32_t id, float *out);

#endif
