/*
 * linear.c - the linear architecture: r = w . x over dense features (no
 * bias: it cancels in r_c - r_r). One tensor, score.weight [1, d].
 *
 * Forward s = X w (n); backward gw += X^T ds. The one-call training step has
 * its own path (pair_grad, below): the step is bound by memory bandwidth,
 * and scoring, differentiating and accumulating blocks of pairs while they
 * are in cache reads the features once instead of twice.
 */
#include <stdlib.h>
#include <string.h>

#include "internal.h"

/* ---- model -------------------------------------------------------------------------- */

static int linear_normalise(prm_model_options *o, uint64_t *n_params, uint32_t *n_tensors) {
  int rc;
  if ((rc = prmi_check_dim(o->input_size, "input_size")) != PRM_OK) return rc;
  const prm_model_options d = PRM_MODEL_OPTIONS_INIT;
  o->activation = d.activation;
  o->n_hidden = 0;
  for (uint32_t i = 0; i < PRM_MAX_HIDDEN; i++)
    o->hidden[i] = 0;
  o->vocab_size = o->n_ctx = o->n_embd = o->n_layer = o->n_head = 0;
  o->n_kv_head = o->head_dim = o->n_ffn = 0;
  o->rope_theta = d.rope_theta;
  o->rms_eps = d.rms_eps;
  o->attn_bias = o->qk_norm = 0;
  *n_params = o->input_size;
  *n_tensors = 1;
  return PRM_OK;
}

static int linear_layout(prm_model *m) {
  m->head_in = m->opts.input_size;
  m->head_w = prmi_model_add_tensor(m, "score.weight", 2, 1, m->head_in);
  return PRM_OK;
}

static int linear_trainable_from_block(prm_model *m, uint64_t k, uint64_t *off) {
  (void)m;
  (void)k;
  (void)off;
  return prmi_fail(NULL, PRM_ERR_INVALID,
                   "prm_model_set_trainable: a linear model has no blocks (use 0 or -1)");
}

/* ---- checkpoints ------------------------------------------------------------------------ */

static void linear_meta_write(const prm_model_options *o, prmi_meta_out *out) {
  prmi_meta_put_u64(out, "d", o->input_size);
}

/* The fallback of files without a "model" key: any file with score.weight. */
static int linear_detect(const prmi_ckpt *c) {
  uint32_t nd;
  uint64_t sh[2];
  return prmi_ckpt_shape(c, "score.weight", &nd, sh);
}

static int linear_config(const prmi_ckpt *c, prm_model_options *o) {
  return prmi_feature_input_size(c, "score.weight", o);
}

/* ---- contexts ------------------------------------------------------------------------- */

typedef struct linear_acts {
  float *input;   /* (R, d) copy of the last forward's features (training); the
                     one-call path uses its first d floats as gradient scratch */
  const float *x; /* features of the last forward: input, or borrowed */
  uint64_t x_stride;
} linear_acts;

static void linear_ctx_free(void *p) {
  linear_acts *a = p;
  if (a == NULL) return;
  prmi_free(a->input);
  free(a);
}

static double linear_ctx_floats(const prm_model *m, uint64_t R, uint64_t max_len, int inference,
                                uint32_t n_workers) {
  (void)n_workers; /* runs on the caller */
  (void)max_len;
  return inference ? 0.0 : (double)R * (double)m->opts.input_size;
}

static int linear_ctx_new(prm_ctx *c) {
  linear_acts *a = calloc(1, sizeof *a);
  if (a == NULL) return PRM_ERR_NOMEM;
  c->acts = a;
  if (!c->inference) {
    a->input = prmi_calloc(c->max_rows * c->model->opts.input_size, sizeof(float));
    if (a->input == NULL) return PRM_ERR_NOMEM;
  }
  return PRM_OK;
}

static int linear_check_batch(prm_ctx *ctx, const prm_batch *b, uint64_t *stride) {
  return prmi_check_feature_batch(ctx, b, ctx->model->opts.input_size, stride);
}

/* Non-finite input shows in the scores (each is a dot product with a whole
 * row: Inf * 0 is NaN), so the input is only scanned when a score is. */
static int linear_forward(prm_ctx *ctx, const prm_batch *b, uint64_t stride, float *scores,
                          int copy_input) {
  const prm_model *m = ctx->model;
  linear_acts *A = ctx->acts;
  const uint64_t n = b->n, d = b->n_features;
  const float *x = b->features;
  uint64_t ldx = stride;
  int rc;
  if (copy_input && !ctx->inference) {
    if (ctx->have_forward) {
      /* validate before the copy overwrites the pending forward's features */
      if ((rc = prmi_report_nonfinite_feature(ctx, b, stride)) != PRM_OK) return rc;
      for (uint64_t i = 0; i < n; i++)
        memcpy(A->input + i * d, x + i * stride, d * sizeof(float));
    } else if (!prmi_copy_features(A->input, x, n, d, stride)) {
      if ((rc = prmi_report_nonfinite_feature(ctx, b, stride)) != PRM_OK) return rc;
    }
    x = A->input;
    ldx = d;
  }
  prmi_gemv(0, n, d, 1.0f, x, ldx, m->params + m->head_w, 0.0f, scores);
  if (!prmi_all_finite(scores, n)) {
    /* a bad feature, or else parameters that overflow (scores returned as
     * they are; the loss functions reject them) */
    if ((rc = prmi_report_nonfinite_feature(ctx, b, stride)) != PRM_OK) return rc;
  }
  A->x = x;
  A->x_stride = ldx;
  return PRM_OK;
}

static void linear_backward(prm_ctx *ctx, const float *dscores, uint64_t n) {
  const prm_model *m = ctx->model;
  linear_acts *A = ctx->acts;
  float *g = prmi_grad_slot(ctx, m->head_w); /* never frozen: the head always trains */
  prmi_gemv(1, n, m->head_in, 1.0f, A->x, A->x_stride, dscores, 1.0f, g);
}

/*
 * The gradient of a pair batch in blocks of pairs.
 *
 * The Bradley-Terry gradient of a pair depends on that pair's two scores
 * only, so a block's rows can be scored, differentiated and accumulated
 * (g += X_block^T ds_block) while they are still in cache: the features are
 * read from memory once instead of twice. Blocks hold about 256 KiB of
 * features, well inside L2.
 *
 * Same math as forward + prm_loss_bt + backward; the rounding differs only
 * in the order of the sums. The gradient is accumulated in scratch (the
 * context's input copy, unused by the one-call path) and added to the
 * context's gradients only when every block succeeded, so a failure changes
 * nothing. On a non-finite score the ordinary forward reruns to name the
 * culprit.
 */
static int linear_pair_grad(prm_ctx *ctx, const prm_batch *pairs, uint64_t P,
                            const prm_loss_options *loss_opts, prm_loss_stats *stats) {
  const prm_model *m = ctx->model;
  linear_acts *A = ctx->acts;
  const uint64_t d = m->opts.input_size;
  const uint64_t ld = pairs->row_stride ? pairs->row_stride : d;
  const float *w = m->params + m->head_w;
  float *s = ctx->scores, *ds = ctx->dscores, *gs = A->input;
  uint64_t block = (256u << 10) / (2 * sizeof(float) * d);
  if (block < 1) block = 1;
  if (block > P) block = P;
  /* every option array is per pair: offset them per block */
  const prm_loss_options full = prmi_loss_options_read(loss_opts);
  prm_loss_options bo = full;

  for (uint64_t j = 0; j < d; j++)
    gs[j] = 0.0f;
  for (uint64_t i0 = 0; i0 < P; i0 += block) {
    const uint64_t nb = P - i0 < block ? P - i0 : block;
    const float *xc = pairs->features + i0 * ld, *xr = pairs->features + (P + i0) * ld;
    prmi_gemv(0, nb, d, 1.0f, xc, ld, w, 0.0f, s + i0);
    prmi_gemv(0, nb, d, 1.0f, xr, ld, w, 0.0f, s + P + i0);
    if (!prmi_all_finite(s + i0, nb) || !prmi_all_finite(s + P + i0, nb)) {
      int rc = prmi_report_nonfinite_feature(ctx, pairs, ld);
      if (rc != PRM_OK) return rc;
      /* finite features, overflowing parameters: the loss names the score */
      prmi_gemv(0, 2 * P, d, 1.0f, pairs->features, ld, w, 0.0f, s);
      rc = prm_loss_bt(s, s + P, P, loss_opts, NULL, NULL, NULL, NULL);
      return prmi_adopt_error(ctx->errmsg, rc != PRM_OK ? rc : PRM_ERR_NONFINITE);
    }
    bo.margin = full.margin ? full.margin + i0 : NULL;
    bo.label = full.label ? full.label + i0 : NULL;
    bo.weight = full.weight ? full.weight + i0 : NULL;
    bo.tie = full.tie ? full.tie + i0 : NULL;
    /* cannot fail: the scores are finite and the options were validated
     * over the whole batch (so messages index the batch, not the block) */
    int rc = prm_loss_bt(s + i0, s + P + i0, nb, &bo, NULL, NULL, ds + i0,
                         ds + P + i0);
    if (rc != PRM_OK) return prmi_adopt_error(ctx->errmsg, rc);
    /* prm_loss_bt averaged over nb pairs; the batch loss averages over P */
    const float scale = (float)((double)nb / (double)P);
    for (uint64_t k = 0; k < nb; k++) {
      ds[i0 + k] *= scale;
      ds[P + i0 + k] *= scale;
    }
    prmi_gemv(1, nb, d, 1.0f, xc, ld, ds + i0, 1.0f, gs);
    prmi_gemv(1, nb, d, 1.0f, xr, ld, ds + P + i0, 1.0f, gs);
  }
  int rc = prm_loss_bt(s, s + P, P, loss_opts, NULL, stats, NULL, NULL);
  if (rc != PRM_OK) return prmi_adopt_error(ctx->errmsg, rc);
  float *g = prmi_grad_slot(ctx, m->head_w);
  for (uint64_t j = 0; j < d; j++)
    g[j] += gs[j];
  return PRM_OK;
}

const prmi_arch prmi_arch_linear = {
    .id = PRM_ARCH_LINEAR,
    .name = "linear",
    .article = "a linear",
    .tokens = 0,
    .normalise = linear_normalise,
    .layout = linear_layout,
    .layout_free = NULL,
    .init = prmi_init_feature_model,
    .trainable_from_block = linear_trainable_from_block,
    .meta_write = linear_meta_write,
    .detect = linear_detect,
    .config = linear_config,
    .tensor_alias = NULL,
    .ignorable = NULL,
    .ctx_new = linear_ctx_new,
    .ctx_free = linear_ctx_free,
    .ctx_floats = linear_ctx_floats,
    .check_batch = linear_check_batch,
    .forward = linear_forward,
    .backward = linear_backward,
    .pair_grad = linear_pair_grad,
};
