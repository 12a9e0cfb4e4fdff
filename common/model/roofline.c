/* roofline: bytes per decoded token per stage; see roofline.h. Per-layer sums where the tensors
 * say it exactly (attention, router, gate); the up and down counters of the engine are summed
 * over layers, so their bytes per row are the mean over layers (equal in every known file). */
#include "model/roofline.h"

static const char *const s_names[ROOFLINE_N] = {"attention", "router", "experts", "lm_head"};

const char *roofline_stage_name(roofline_stage s) {
    return s >= 0 && s < ROOFLINE_N ? s_names[s] : "?";
}

/* Positions a query at pos attends in layer il (window honoured). */
static double s_attended(const model_config *c, int il, long pos) {
    const int w = model_config_layer_window(c, il);
    return w > 0 && pos + 1 > w ? (double)w : (double)(pos + 1);
}

void roofline_decode_bytes(const model *m, int pos0, int n, double kv_elem_bytes,
                           const engine_stats *st, roofline_bytes *out) {
    const model_config *c = &m->cfg;
    const double tokens = st->tokens ? (double)st->tokens : 1.0;
    if (n < 1) n = 1;
    const double kv_row = (double)c->n_head_kv * c->head_dim * 2 * kv_elem_bytes; /* K + V */
    double attn_w = 0, kv = 0, router = 0, gate = 0, up_row = 0, down_neuron = 0;
    for (int il = 0; il < c->n_layer; il++) {
        const layer_weights *L = &m->layers[il];
        attn_w += (double)(L->wq.mat_bytes + L->wk.mat_bytes + L->wv.mat_bytes + L->wo.mat_bytes);
        router += (double)L->router.mat_bytes;
        gate += (double)c->n_expert_used * (double)L->gate_exps.mat_bytes;
        up_row += (double)L->up_exps.row_bytes / c->n_layer;
        down_neuron += (double)L->down_exps.mat_bytes / c->n_ff_exp / c->n_layer;
        double pos_sum = 0;
        for (int t = 0; t < n; t++)
            pos_sum += s_attended(c, il, (long)pos0 + t);
        kv += pos_sum / n * kv_row;
    }
    out->attn_kv = kv;
    out->stage[ROOFLINE_ATTN] = attn_w + kv;
    out->stage[ROOFLINE_ROUTER] = router;
    out->stage[ROOFLINE_EXPERTS] =
        gate +
        ((double)st->neurons_active * up_row + (double)st->down_neurons * down_neuron) / tokens;
    out->stage[ROOFLINE_HEAD] = (double)m->output.mat_bytes;
}
