/*
 * train.c - the one-call paths: prm_train_step and prm_evaluate.
 *
 * Both forward the pair batch as one batch of 2P rows without copying the
 * features (the batch outlives the backward inside the call), so the common
 * training loop pays for no copy of the input. An architecture may give the
 * whole pair gradient in one pass instead (pair_grad, lib/arch.h: linear
 * does, being bound by memory bandwidth).
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
  if (ctx->arch->pair_grad != NULL) {
    rc = ctx->arch->pair_grad(ctx, pairs, P, loss_opts, stats);
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
