/*
 * train.c - the one-call paths: prm_train_step and prm_evaluate.
 *
 * Both forward the pair batch as one batch of 2P rows without copying the
 * features (the batch outlives the backward inside the call), so the common
 * training loop pays for no copy of the input.
 */
#include "internal.h"

/* Checks common to both entry points; returns P (pairs) through *n_pairs. */
static int check_pairs(prm_ctx *ctx, const prm_batch *pairs, uint64_t *n_pairs) {
  if (pairs == NULL) return prmi_fail(ctx->errmsg, PRM_ERR_NULL, "pairs is NULL");
  int rc = prmi_check_version(ctx->errmsg, pairs, PRM_BATCH_VERSION, "prm_batch");
  if (rc != PRM_OK) return rc;
  if (pairs->n < 2 || pairs->n % 2 != 0)
    return prmi_fail(ctx->errmsg, PRM_ERR_SIZE,
                     "pair batch needs an even number of rows >= 2 (P chosen, then P rejected), "
                     "got %llu",
                     (unsigned long long)pairs->n);
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
  uint64_t P = 0;
  int rc = check_pairs(ctx, pairs, &P);
  if (rc != PRM_OK) return rc;

  rc = prmi_ctx_forward(ctx, pairs, ctx->scores, 0);
  if (rc != PRM_OK) return rc;
  rc = prm_loss_bt(ctx->scores, ctx->scores + P, P, loss_opts, NULL, stats, ctx->dscores,
                   ctx->dscores + P);
  if (rc != PRM_OK) {
    ctx->have_forward = 0; /* the borrowed features must not outlive the call */
    return prmi_adopt_error(ctx->errmsg, rc);
  }
  rc = prm_ctx_backward(ctx, ctx->dscores, pairs->n);
  if (rc != PRM_OK) return rc;
  rc = prm_optimizer_step(opt, ctx);
  if (rc != PRM_OK) return prmi_adopt_error(ctx->errmsg, rc);
  return PRM_OK;
}

int prm_evaluate(prm_ctx *ctx, const prm_batch *pairs, const prm_loss_options *loss_opts,
                 prm_loss_stats *stats) {
  if (ctx == NULL) return prmi_fail(NULL, PRM_ERR_NULL, "prm_evaluate: ctx is NULL");
  uint64_t P = 0;
  int rc = check_pairs(ctx, pairs, &P);
  if (rc != PRM_OK) return rc;
  rc = prmi_ctx_forward(ctx, pairs, ctx->scores, 0);
  ctx->have_forward = 0; /* borrowed features: no backward after evaluate */
  if (rc != PRM_OK) return rc;
  rc = prm_loss_bt(ctx->scores, ctx->scores + P, P, loss_opts, NULL, stats, NULL, NULL);
  if (rc != PRM_OK) return prmi_adopt_error(ctx->errmsg, rc);
  return PRM_OK;
}
