/*
 * train.c - the one-call paths: prm_train_step and prm_evaluate.
 *
 * Both forward the pair batch as one batch of 2P rows without copying the
 * features (the batch outlives the backward inside the call), so the common
 * training loop pays for no copy of the input. An architecture may give the
 * whole pair gradient in one pass instead (pair_grad, lib/arch.h: linear
 * does, being bound by memory bandwidth). Group batches (K-wise rankings)
 * take the same road with prm_loss_rank in place of prm_loss_bt.
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

/* The checks prm_train_step and prm_train_step_groups share before the batch. */
static int check_trainer(prm_ctx *ctx, prm_optimizer *opt, const char *fn) {
  if (ctx == NULL) return prmi_fail(NULL, PRM_ERR_NULL, "%s: ctx is NULL", fn);
  if (opt == NULL) return prmi_fail(ctx->errmsg, PRM_ERR_NULL, "%s: opt is NULL", fn);
  if (ctx->inference) return prmi_fail(ctx->errmsg, PRM_ERR_STATE, "%s: inference context", fn);
  if (prmi_optimizer_model(opt) != ctx->model)
    return prmi_fail(ctx->errmsg, PRM_ERR_MISMATCH,
                     "%s: optimizer and context belong to different models", fn);
  /* checked here too, so that a stale object fails before anything runs */
  const uint64_t toff = ctx->model->trainable_offset;
  if (ctx->trainable_offset != toff || prmi_optimizer_trainable_offset(opt) != toff)
    return prmi_fail(ctx->errmsg, PRM_ERR_MISMATCH,
                     "%s: the model's trainable parameters changed since the context or the "
                     "optimizer was created; create new ones",
                     fn);
  return PRM_OK;
}

/*
 * The loss of one-call training: a pair batch (rank_sizes == NULL) or a
 * group batch, on the scores in ctx->scores, writing d(loss)/d(scores) into
 * ctx->dscores when grads is set. Cannot fail on arguments (checked before
 * the forward); only on non-finite scores.
 */
typedef struct batch_loss {
  const prm_loss_options *pair_opts;
  const int32_t *rank_sizes;
  uint64_t n_groups;
  const prm_rank_options *rank_opts;
} batch_loss;

static int run_loss(prm_ctx *ctx, const batch_loss *bl, uint64_t n, int grads,
                    prm_loss_stats *stats) {
  int rc;
  if (bl->rank_sizes != NULL) {
    rc = prm_loss_rank(ctx->scores, n, bl->rank_sizes, bl->n_groups, bl->rank_opts, NULL, stats,
                       grads ? ctx->dscores : NULL);
  } else {
    const uint64_t P = n / 2;
    rc = prm_loss_bt(ctx->scores, ctx->scores + P, P, bl->pair_opts, NULL, stats,
                     grads ? ctx->dscores : NULL, grads ? ctx->dscores + P : NULL);
  }
  return rc == PRM_OK ? PRM_OK : prmi_adopt_error(ctx->errmsg, rc);
}

/* forward + loss + backward + step, once every argument has been checked */
static int train_core(prm_ctx *ctx, prm_optimizer *opt, const prm_batch *batch, uint64_t stride,
                      const batch_loss *bl, prm_loss_stats *stats) {
  int rc;
  /* From here on the call computes: a pending forward is dropped. */
  ctx->have_forward = 0;
  if (bl->rank_sizes == NULL && ctx->arch->pair_grad != NULL) {
    rc = ctx->arch->pair_grad(ctx, batch, batch->n / 2, bl->pair_opts, stats);
    if (rc != PRM_OK) return rc;
  } else {
    rc = prmi_ctx_forward(ctx, batch, stride, ctx->scores, 0);
    if (rc == PRM_OK) rc = run_loss(ctx, bl, batch->n, 1, stats);
    if (rc == PRM_OK) rc = prm_ctx_backward(ctx, ctx->dscores, batch->n);
    if (rc != PRM_OK) {
      ctx->have_forward = 0; /* the borrowed features must not outlive the call */
      return rc;
    }
  }
  rc = prm_optimizer_step(opt, ctx);
  if (rc != PRM_OK) return prmi_adopt_error(ctx->errmsg, rc);
  return PRM_OK;
}

static int train_step(prm_ctx *ctx, prm_optimizer *opt, const prm_batch *pairs,
                      const prm_loss_options *loss_opts, prm_loss_stats *stats) {
  int rc = check_trainer(ctx, opt, "prm_train_step");
  if (rc != PRM_OK) return rc;
  uint64_t P = 0, stride = 0;
  rc = check_pairs(ctx, pairs, loss_opts, stats, &P, &stride);
  if (rc != PRM_OK) return rc;
  const batch_loss bl = {loss_opts, NULL, 0, NULL};
  return train_core(ctx, opt, pairs, stride, &bl, stats);
}

/* A failure of a one-call trainer is recorded in both handles it takes. */
/* The forward of every evaluation: scores into ctx->scores. The features
 * are borrowed, so no backward may follow: the forward is not kept. */
static int evaluate_forward(prm_ctx *ctx, const prm_batch *batch, uint64_t stride) {
  int rc = prmi_ctx_forward(ctx, batch, stride, ctx->scores, 0);
  ctx->have_forward = 0;
  return rc;
}

int prm_train_step(prm_ctx *ctx, prm_optimizer *opt, const prm_batch *pairs,
                   const prm_loss_options *loss_opts, prm_loss_stats *stats) {
  const int rc = train_step(ctx, opt, pairs, loss_opts, stats);
  return prmi_opt_record(opt, prmi_ctx_record(ctx, rc));
}

static int evaluate(prm_ctx *ctx, const prm_batch *pairs, const prm_loss_options *loss_opts,
                    prm_loss_stats *stats) {
  uint64_t P = 0, stride = 0;
  int rc = check_pairs(ctx, pairs, loss_opts, stats, &P, &stride);
  if (rc != PRM_OK) return rc;
  rc = evaluate_forward(ctx, pairs, stride);
  if (rc != PRM_OK) return rc;
  const batch_loss bl = {loss_opts, NULL, 0, NULL};
  return run_loss(ctx, &bl, pairs->n, 0, stats);
}

int prm_evaluate(prm_ctx *ctx, const prm_batch *pairs, const prm_loss_options *loss_opts,
                 prm_loss_stats *stats) {
  if (ctx == NULL) return prmi_fail(NULL, PRM_ERR_NULL, "prm_evaluate: ctx is NULL");
  return prmi_ctx_record(ctx, evaluate(ctx, pairs, loss_opts, stats));
}

/* The group-batch counterpart of check_pairs. */
static int check_groups(prm_ctx *ctx, const prm_batch *batch, const int32_t *group_sizes,
                        uint64_t n_groups, const prm_rank_options *rank_opts,
                        const prm_loss_stats *stats, uint64_t *stride) {
  if (batch == NULL) return prmi_fail(ctx->errmsg, PRM_ERR_NULL, "batch is NULL");
  int rc = prmi_check_version(ctx->errmsg, batch, PRM_BATCH_VERSION, "prm_batch");
  if (rc != PRM_OK) return rc;
  /* the sizes first: a group batch larger than the context is named as such */
  rc = prmi_rank_check_args(group_sizes, n_groups, batch->n, rank_opts, stats);
  if (rc != PRM_OK) return prmi_adopt_error(ctx->errmsg, rc);
  if (batch->n > ctx->max_rows)
    return prmi_fail(ctx->errmsg, PRM_ERR_SIZE,
                     "the %llu groups hold %llu rows, more than the context's max_rows %llu",
                     (unsigned long long)n_groups, (unsigned long long)batch->n,
                     (unsigned long long)ctx->max_rows);
  return prmi_check_batch(ctx, batch, stride);
}

static int train_step_groups(prm_ctx *ctx, prm_optimizer *opt, const prm_batch *batch,
                             const int32_t *group_sizes, uint64_t n_groups,
                             const prm_rank_options *rank_opts, prm_loss_stats *stats) {
  int rc = check_trainer(ctx, opt, "prm_train_step_groups");
  if (rc != PRM_OK) return rc;
  uint64_t stride = 0;
  rc = check_groups(ctx, batch, group_sizes, n_groups, rank_opts, stats, &stride);
  if (rc != PRM_OK) return rc;
  const batch_loss bl = {NULL, group_sizes, n_groups, rank_opts};
  return train_core(ctx, opt, batch, stride, &bl, stats);
}

int prm_train_step_groups(prm_ctx *ctx, prm_optimizer *opt, const prm_batch *batch,
                          const int32_t *group_sizes, uint64_t n_groups,
                          const prm_rank_options *rank_opts, prm_loss_stats *stats) {
  const int rc = train_step_groups(ctx, opt, batch, group_sizes, n_groups, rank_opts, stats);
  return prmi_opt_record(opt, prmi_ctx_record(ctx, rc));
}

static int evaluate_groups(prm_ctx *ctx, const prm_batch *batch, const int32_t *group_sizes,
                           uint64_t n_groups, const prm_rank_options *rank_opts,
                           prm_loss_stats *stats) {
  uint64_t stride = 0;
  int rc = check_groups(ctx, batch, group_sizes, n_groups, rank_opts, stats, &stride);
  if (rc != PRM_OK) return rc;
  rc = evaluate_forward(ctx, batch, stride);
  if (rc != PRM_OK) return rc;
  const batch_loss bl = {NULL, group_sizes, n_groups, rank_opts};
  return run_loss(ctx, &bl, batch->n, 0, stats);
}

int prm_evaluate_groups(prm_ctx *ctx, const prm_batch *batch, const int32_t *group_sizes,
                        uint64_t n_groups, const prm_rank_options *rank_opts,
                        prm_loss_stats *stats) {
  if (ctx == NULL) return prmi_fail(NULL, PRM_ERR_NULL, "prm_evaluate_groups: ctx is NULL");
  return prmi_ctx_record(ctx, evaluate_groups(ctx, batch, group_sizes, n_groups, rank_opts, stats));
}

/* ---- accumulating evaluation ------------------------------------------------------------ */

/* The accumulator of an accumulating evaluation: initialised, and empty or
 * of this kind. */
static int check_accum(const prm_eval_accum *acc, int32_t kind, const char *fn) {
  int rc = prmi_check_version(NULL, acc, PRM_EVAL_ACCUM_VERSION, "acc");
  if (rc != PRM_OK) return rc;
  if (acc->kind != PRM_EVAL_EMPTY && acc->kind != PRM_EVAL_PAIRS && acc->kind != PRM_EVAL_GROUPS)
    return prmi_fail(NULL, PRM_ERR_INVALID, "%s: acc->kind = %d is no prm_eval_kind", fn,
                     (int)acc->kind);
  if (acc->kind != PRM_EVAL_EMPTY && acc->kind != kind)
    return prmi_fail(NULL, PRM_ERR_MISMATCH,
                     "%s: the accumulator holds %s batches; %s batches need another one", fn,
                     acc->kind == PRM_EVAL_PAIRS ? "pair" : "group",
                     kind == PRM_EVAL_PAIRS ? "pair" : "group");
  return PRM_OK;
}

static int evaluate_accum(prm_ctx *ctx, const prm_batch *pairs, const prm_loss_options *loss_opts,
                          prm_eval_accum *acc) {
  uint64_t P = 0, stride = 0;
  int rc = check_pairs(ctx, pairs, loss_opts, NULL, &P, &stride);
  if (rc == PRM_OK) rc = check_accum(acc, PRM_EVAL_PAIRS, "prm_evaluate_accum");
  if (rc != PRM_OK) return rc;
  rc = evaluate_forward(ctx, pairs, stride);
  if (rc != PRM_OK) return rc;
  prm_eval_accum batch;
  rc = prmi_loss_bt_accum(ctx->scores, ctx->scores + P, P, loss_opts, &batch);
  if (rc != PRM_OK) return rc;
  prmi_eval_accum_merge(acc, &batch);
  return PRM_OK;
}

int prm_evaluate_accum(prm_ctx *ctx, const prm_batch *pairs, const prm_loss_options *loss_opts,
                       prm_eval_accum *acc) {
  if (ctx == NULL) return prmi_fail(NULL, PRM_ERR_NULL, "prm_evaluate_accum: ctx is NULL");
  return prmi_ctx_record(ctx, evaluate_accum(ctx, pairs, loss_opts, acc));
}

static int evaluate_groups_accum(prm_ctx *ctx, const prm_batch *batch, const int32_t *group_sizes,
                                 uint64_t n_groups, const prm_rank_options *rank_opts,
                                 prm_eval_accum *acc) {
  uint64_t stride = 0;
  int rc = check_groups(ctx, batch, group_sizes, n_groups, rank_opts, NULL, &stride);
  if (rc == PRM_OK) rc = check_accum(acc, PRM_EVAL_GROUPS, "prm_evaluate_groups_accum");
  if (rc != PRM_OK) return rc;
  rc = evaluate_forward(ctx, batch, stride);
  if (rc != PRM_OK) return rc;
  prm_eval_accum one;
  rc = prmi_loss_rank_accum(ctx->scores, batch->n, group_sizes, n_groups, rank_opts, &one);
  if (rc != PRM_OK) return rc;
  prmi_eval_accum_merge(acc, &one);
  return PRM_OK;
}

int prm_evaluate_groups_accum(prm_ctx *ctx, const prm_batch *batch, const int32_t *group_sizes,
                              uint64_t n_groups, const prm_rank_options *rank_opts,
                              prm_eval_accum *acc) {
  if (ctx == NULL) return prmi_fail(NULL, PRM_ERR_NULL, "prm_evaluate_groups_accum: ctx is NULL");
  return prmi_ctx_record(ctx,
                         evaluate_groups_accum(ctx, batch, group_sizes, n_groups, rank_opts, acc));
}
