/*
 * train.c - the one-call paths: prm_train_step and prm_evaluate.
 *
 * Both forward the pair batch as one batch of 2P rows without copying the
 * features (the batch outlives the backward inside the call), so the common
 * training loop pays for no copy of the input.
 */
#include "internal.h"

/*
 * Every check of both entry points that can be made before the forward: the
 * batch (as a forward checks it), its pair layout, the loss options and the
 * statistics struct. Until these pass nothing is changed -- not even a
 * forward pending from prm_ctx_forward. Returns P (pairs) through *n_pairs
 * and the row stride through *stride.
 */
static int check_pairs(prm_ctx *ctx, const prm_batch *pairs, const prm_loss_options *loss_opts,
                       const prm_loss_stats *stats, uint64_t *n_pairs, uint64_t *stride) {
  if (pairs == NULL) return prmi_fail(ctx->errmsg, PRM_ERR_NULL, "pairs is NULL");
  int rc = prmi_check_version(ctx->errmsg, pairs, PRM_BATCH_VERSION, "prm_batch");
  if (rc != PRM_OK) return rc;
  if (pairs->n < 2 || pairs->n % 2 != 0)
    return prmi_fail(ctx->errmsg, PRM_ERR_SIZE,
                     "pair batch needs an even number of rows >= 2 (P chosen, then P rejected), "
                     "got %llu",
                     (unsigned long long)pairs->n);
  rc = prmi_check_batch(ctx, pairs, stride);
  if (rc != PRM_OK) return rc;
  rc = prmi_loss_check_args(loss_opts, stats, pairs->n / 2);
  if (rc != PRM_OK) return prmi_adopt_error(ctx->errmsg, rc);
  *n_pairs = pairs->n / 2;
  return PRM_OK;
}

/*
 * The gradient for a linear model, in blocks of pairs.
 *
 * The Bradley-Terry gradient of a pair depends on that pair's two scores
 * only, so a block's rows can be scored, differentiated and accumulated
 * (g += X_block^T ds_block) while they are still in cache: the features are
 * read from memory once instead of twice (the step is bandwidth-bound).
 * Blocks hold about 256 KiB of features, well inside L2.
 *
 * Same math as forward + prm_loss_bt + backward; the rounding differs only
 * in the order of the sums. The gradient is accumulated in scratch (the
 * context's input copy, unused by the one-call path) and added to the
 * context's gradients only when every block succeeded, so a failure changes
 * nothing. On a non-finite score the ordinary forward reruns to name the
 * culprit.
 */
static int linear_grad_blocked(prm_ctx *ctx, const prm_batch *pairs, uint64_t P,
                               const prm_loss_options *loss_opts, prm_loss_stats *stats) {
  const prm_model *m = ctx->model;
  const uint64_t d = m->opts.input_size;
  const uint64_t ld = pairs->row_stride ? pairs->row_stride : d;
  const float *w = m->params + m->head.w_off;
  float *s = ctx->scores, *ds = ctx->dscores, *gs = ctx->input;
  uint64_t block = (256u << 10) / (2 * sizeof(float) * d);
  if (block < 1) block = 1;
  if (block > P) block = P;
  /* every version-1 option array is per pair: offset them per block */
  prm_loss_options bo = PRM_LOSS_OPTIONS_INIT;
  if (loss_opts != NULL) bo = *loss_opts;

  for (uint64_t j = 0; j < d; j++)
    gs[j] = 0.0f;
  for (uint64_t i0 = 0; i0 < P; i0 += block) {
    const uint64_t nb = P - i0 < block ? P - i0 : block;
    const float *xc = pairs->features + i0 * ld, *xr = pairs->features + (P + i0) * ld;
    prmi_gemv(0, nb, d, 1.0f, xc, ld, w, 0.0f, s + i0);
    prmi_gemv(0, nb, d, 1.0f, xr, ld, w, 0.0f, s + P + i0);
    if (!prmi_all_finite(s + i0, nb) || !prmi_all_finite(s + P + i0, nb)) {
      int rc = prmi_ctx_forward(ctx, pairs, ld, s, 0); /* names a bad feature */
      ctx->have_forward = 0;
      if (rc == PRM_OK) rc = prm_loss_bt(s, s + P, P, loss_opts, NULL, NULL, NULL, NULL);
      return prmi_adopt_error(ctx->errmsg, rc != PRM_OK ? rc : PRM_ERR_NONFINITE);
    }
    if (loss_opts != NULL) {
      bo.margin = loss_opts->margin ? loss_opts->margin + i0 : NULL;
      bo.label = loss_opts->label ? loss_opts->label + i0 : NULL;
      bo.weight = loss_opts->weight ? loss_opts->weight + i0 : NULL;
    }
    /* cannot fail: the scores are finite and check_pairs validated the
     * options over the whole batch (so messages index the batch, not the
     * block) */
    int rc = prm_loss_bt(s + i0, s + P + i0, nb, loss_opts ? &bo : NULL, NULL, NULL, ds + i0,
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
  float *g = ctx->grads + (m->head.w_off - ctx->trainable_offset);
  for (uint64_t j = 0; j < d; j++)
    g[j] += gs[j];
  return PRM_OK;
}

int prm_train_step(prm_ctx *ctx, prm_optimizer *opt, const prm_batch *pairs,
                   const prm_loss_options *loss_opts, prm_loss_stats *stats) {
  if (ctx == NULL) return prmi_fail(NULL, PRM_ERR_NULL, "prm_train_step: ctx is NULL");
  if (opt == NULL) return prmi_fail(ctx->errmsg, PRM_ERR_NULL, "prm_train_step: opt is NULL");
  if (ctx->inference)
    return prmi_fail(ctx->errmsg, PRM_ERR_STATE, "prm_train_step: inference context");
  if (prmi_optimizer_model(opt) != ctx->model)
    return prmi_fail(ctx->errmsg, PRM_ERR_MISMATCH,
                     "prm_train_step: optimizer and context belong to different models");
  /* checked here too, so that a stale object fails before anything runs */
  const uint64_t toff = ctx->model->trainable_offset;
  if (ctx->trainable_offset != toff || prmi_optimizer_trainable_offset(opt) != toff)
    return prmi_fail(ctx->errmsg, PRM_ERR_MISMATCH,
                     "prm_train_step: the model's trainable parameters changed since the context "
                     "or the optimizer was created; create new ones");
  uint64_t P = 0, stride = 0;
  int rc = check_pairs(ctx, pairs, loss_opts, stats, &P, &stride);
  if (rc != PRM_OK) return rc;

  /* From here on the call computes: a pending forward is dropped. */
  ctx->have_forward = 0;
  if (ctx->model->opts.arch == PRM_ARCH_LINEAR) {
    rc = linear_grad_blocked(ctx, pairs, P, loss_opts, stats);
    if (rc != PRM_OK) return rc;
  } else {
    rc = prmi_ctx_forward(ctx, pairs, stride, ctx->scores, 0);
    if (rc != PRM_OK) {
      ctx->have_forward = 0;
      return rc;
    }
    rc = prm_loss_bt(ctx->scores, ctx->scores + P, P, loss_opts, NULL, stats, ctx->dscores,
                     ctx->dscores + P);
    if (rc != PRM_OK) {
      ctx->have_forward = 0; /* the borrowed features must not outlive the call */
      return prmi_adopt_error(ctx->errmsg, rc);
    }
    rc = prm_ctx_backward(ctx, ctx->dscores, pairs->n);
    if (rc != PRM_OK) {
      ctx->have_forward = 0;
      return rc;
    }
  }
  rc = prm_optimizer_step(opt, ctx);
  if (rc != PRM_OK) return prmi_adopt_error(ctx->errmsg, rc);
  return PRM_OK;
}

int prm_evaluate(prm_ctx *ctx, const prm_batch *pairs, const prm_loss_options *loss_opts,
                 prm_loss_stats *stats) {
  if (ctx == NULL) return prmi_fail(NULL, PRM_ERR_NULL, "prm_evaluate: ctx is NULL");
  uint64_t P = 0, stride = 0;
  int rc = check_pairs(ctx, pairs, loss_opts, stats, &P, &stride);
  if (rc != PRM_OK) return rc;
  rc = prmi_ctx_forward(ctx, pairs, stride, ctx->scores, 0);
  ctx->have_forward = 0; /* borrowed features: no backward after evaluate */
  if (rc != PRM_OK) return rc;
  rc = prm_loss_bt(ctx->scores, ctx->scores + P, P, loss_opts, NULL, stats, NULL, NULL);
  if (rc != PRM_OK) return prmi_adopt_error(ctx->errmsg, rc);
  return PRM_OK;
}
