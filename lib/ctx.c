/*
 * ctx.c - contexts: buffers sized at creation, forward and backward of the
 * feature models (linear, mlp).
 *
 * Shapes below: n = rows of the batch, d = input size, h_l = width of hidden
 * layer l, L = number of hidden layers. Row-major throughout.
 *
 * Forward (mlp):  A_0 = X (n, d)
 *                 Z_l = A_{l-1} W_l^T + b_l     (n, h_l)    W_l (h_l, h_{l-1})
 *                 A_l = act(Z_l)                (n, h_l)
 *                 s   = A_L w                   (n)         w = score.weight
 * Backward:       gw += A_L^T ds ;  dA_L = ds w^T
 *                 dZ_l = dA_l * act'(Z_l)
 *                 gW_l += dZ_l^T A_{l-1} ;  gb_l += colsum(dZ_l)
 *                 dA_{l-1} = dZ_l W_l        (skipped for l = 1: no input grad)
 * linear is the L = 0 case: s = X w, gw += X^T ds.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

/* ---- activations ------------------------------------------------------------------- */

#define GELU_K 0.7978845608028654f /* sqrt(2/pi) */
#define GELU_C 0.044715f

static void act_forward(int32_t act, const float *z, float *a, uint64_t n) {
  switch (act) {
  case PRM_ACT_RELU:
    for (uint64_t i = 0; i < n; i++) a[i] = z[i] > 0.0f ? z[i] : 0.0f;
    break;
  case PRM_ACT_TANH:
    for (uint64_t i = 0; i < n; i++) a[i] = tanhf(z[i]);
    break;
  default: /* PRM_ACT_GELU_TANH */
    for (uint64_t i = 0; i < n; i++) {
      float x = z[i];
      a[i] = 0.5f * x * (1.0f + tanhf(GELU_K * (x + GELU_C * x * x * x)));
    }
    break;
  }
}

/* dz = da * act'(z), given z and a = act(z). In place (dz == da) is fine. */
static void act_backward(int32_t act, const float *z, const float *a, const float *da,
                         float *dz, uint64_t n) {
  switch (act) {
  case PRM_ACT_RELU:
    for (uint64_t i = 0; i < n; i++) dz[i] = z[i] > 0.0f ? da[i] : 0.0f;
    break;
  case PRM_ACT_TANH:
    for (uint64_t i = 0; i < n; i++) dz[i] = da[i] * (1.0f - a[i] * a[i]);
    break;
  default: /* PRM_ACT_GELU_TANH: d/dx 0.5x(1+t), t = tanh(u), u = k(x + c x^3) */
    for (uint64_t i = 0; i < n; i++) {
      float x = z[i];
      float t = tanhf(GELU_K * (x + GELU_C * x * x * x));
      float du = GELU_K * (1.0f + 3.0f * GELU_C * x * x);
      dz[i] = da[i] * (0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * du);
    }
    break;
  }
}

/* ---- options, creation --------------------------------------------------------------- */

int prm_ctx_options_init(prm_ctx_options *opts, uint32_t version) {
  if (opts == NULL) return prmi_fail(NULL, PRM_ERR_NULL, "prm_ctx_options_init: opts is NULL");
  if (version < 1 || version > PRM_CTX_OPTIONS_VERSION)
    return prmi_fail(NULL, PRM_ERR_VERSION,
                     "prm_ctx_options_init: version %u unknown (newest is %u)", (unsigned)version,
                     (unsigned)PRM_CTX_OPTIONS_VERSION);
  prm_ctx_options d = PRM_CTX_OPTIONS_INIT;
  *opts = d;
  opts->version = version;
  return PRM_OK;
}

void prm_ctx_free(prm_ctx *ctx) {
  if (ctx == NULL) return;
  if (ctx->pre != NULL)
    for (uint32_t l = 0; l < ctx->model->n_hidden; l++) prmi_free(ctx->pre[l]);
  if (ctx->act != NULL)
    for (uint32_t l = 0; l < ctx->model->n_hidden; l++) prmi_free(ctx->act[l]);
  free(ctx->pre);
  free(ctx->act);
  prmi_free(ctx->input);
  prmi_free(ctx->scratch_a);
  prmi_free(ctx->scratch_b);
  prmi_free(ctx->grads);
  prmi_free(ctx->scores);
  prmi_free(ctx->dscores);
  free(ctx);
}

int prm_ctx_new(prm_ctx **out, const prm_model *model, const prm_ctx_options *opts) {
  if (out == NULL) return prmi_fail(NULL, PRM_ERR_NULL, "prm_ctx_new: out is NULL");
  *out = NULL;
  if (model == NULL) return prmi_fail(NULL, PRM_ERR_NULL, "prm_ctx_new: model is NULL");
  int rc = prmi_check_version(NULL, opts, PRM_CTX_OPTIONS_VERSION, "prm_ctx_options");
  if (rc != PRM_OK) return rc;
  if (opts->max_rows < 1 || opts->max_rows > PRMI_MAX_DIM)
    return prmi_fail(NULL, PRM_ERR_INVALID, "prm_ctx_new: max_rows %llu not in [1, 2^30]",
                     (unsigned long long)opts->max_rows);

  prm_ctx *c = calloc(1, sizeof *c);
  if (c == NULL) return prmi_fail(NULL, PRM_ERR_NOMEM, "prm_ctx_new: out of memory");
  c->model = model;
  c->inference = opts->inference != 0;
  c->max_rows = opts->max_rows;
  const uint64_t n = opts->max_rows, L = model->n_hidden, w = model->max_width;
  int ok = 1;
  c->scores = prmi_calloc(n, sizeof(float));
  ok = ok && c->scores != NULL;
  if (L > 0) {
    /* Inference ping-pongs between two (n, max_width) buffers; training
     * keeps Z_l and A_l of every layer and uses the scratch for deltas. */
    c->scratch_a = prmi_calloc(n * w, sizeof(float));
    c->scratch_b = prmi_calloc(n * w, sizeof(float));
    ok = ok && c->scratch_a != NULL && c->scratch_b != NULL;
  }
  if (!c->inference && ok) {
    c->dscores = prmi_calloc(n, sizeof(float));
    c->grads = prmi_calloc(model->n_params, sizeof(float));
    c->input = prmi_calloc(n * model->opts.input_size, sizeof(float));
    ok = c->dscores != NULL && c->grads != NULL && c->input != NULL;
    if (ok && L > 0) {
      c->pre = calloc(L, sizeof *c->pre);
      c->act = calloc(L, sizeof *c->act);
      ok = c->pre != NULL && c->act != NULL;
      for (uint32_t l = 0; ok && l < L; l++) {
        c->pre[l] = prmi_calloc(n * model->hidden[l].out, sizeof(float));
        c->act[l] = prmi_calloc(n * model->hidden[l].out, sizeof(float));
        ok = c->pre[l] != NULL && c->act[l] != NULL;
      }
    }
  }
  if (!ok) {
    prm_ctx_free(c);
    return prmi_fail(NULL, PRM_ERR_NOMEM, "prm_ctx_new: cannot allocate buffers for %llu rows",
                     (unsigned long long)n);
  }
  *out = c;
  return PRM_OK;
}

const prm_model *prm_ctx_model(const prm_ctx *ctx) { return ctx ? ctx->model : NULL; }

const char *prm_ctx_errmsg(const prm_ctx *ctx) { return ctx ? ctx->errmsg : ""; }

/* ---- forward ------------------------------------------------------------------------ */

int prm_batch_init(prm_batch *batch, uint32_t version) {
  if (batch == NULL) return prmi_fail(NULL, PRM_ERR_NULL, "prm_batch_init: batch is NULL");
  if (version < 1 || version > PRM_BATCH_VERSION)
    return prmi_fail(NULL, PRM_ERR_VERSION, "prm_batch_init: version %u unknown (newest is %u)",
                     (unsigned)version, (unsigned)PRM_BATCH_VERSION);
  prm_batch d = PRM_BATCH_INIT;
  *batch = d;
  batch->version = version;
  return PRM_OK;
}

/* Name the first non-finite feature in the error message. */
static int report_nonfinite_feature(prm_ctx *ctx, const prm_batch *b, uint64_t stride) {
  const uint64_t d = b->n_features;
  for (uint64_t i = 0; i < b->n; i++) {
    const float *row = b->features + i * stride;
    if (prmi_all_finite(row, d)) continue;
    for (uint64_t j = 0; j < d; j++)
      if (!isfinite(row[j]))
        return prmi_fail(ctx->errmsg, PRM_ERR_NONFINITE, "forward: feature [%llu, %llu] is %s",
                         (unsigned long long)i, (unsigned long long)j,
                         isnan(row[j]) ? "NaN" : "Inf");
  }
  return PRM_OK;
}

/* Checks shared by every entry point that takes a batch. */
int prmi_check_batch(prm_ctx *ctx, const prm_batch *b, uint64_t *stride) {
  int rc = prmi_check_version(ctx->errmsg, b, PRM_BATCH_VERSION, "prm_batch");
  if (rc != PRM_OK) return rc;
  const prm_model *m = ctx->model;
  if (b->features == NULL)
    return prmi_fail(ctx->errmsg, PRM_ERR_NULL, "forward: batch->features is NULL");
  if (b->n_features != m->opts.input_size)
    return prmi_fail(ctx->errmsg, PRM_ERR_SIZE, "forward: batch has %llu features, model takes %llu",
                     (unsigned long long)b->n_features, (unsigned long long)m->opts.input_size);
  if (b->n < 1 || b->n > ctx->max_rows)
    return prmi_fail(ctx->errmsg, PRM_ERR_SIZE, "forward: %llu rows, context holds 1..%llu",
                     (unsigned long long)b->n, (unsigned long long)ctx->max_rows);
  *stride = b->row_stride ? b->row_stride : b->n_features;
  if (*stride < b->n_features || *stride > PRMI_MAX_DIM)
    return prmi_fail(ctx->errmsg, PRM_ERR_SIZE, "forward: row_stride %llu < n_features %llu",
                     (unsigned long long)*stride, (unsigned long long)b->n_features);
  return PRM_OK;
}

/*
 * The forward computation proper, on validated input. x has `n` rows of
 * stride `ldx`. Non-finite input is caught cheaply: every output of the
 * first linear map (the scores for linear, Z_1 for mlp) is a dot product
 * with a whole input row, so an Inf or NaN feature makes its row non-finite
 * (Inf * 0 is NaN). Only then is the input scanned, to name the culprit.
 * With `check`, returns 0 as soon as the first linear map is non-finite;
 * otherwise always computes everything and returns 1.
 */
static int forward_rows(prm_ctx *ctx, const float *x, uint64_t ldx, uint64_t n, float *scores,
                        int check) {
  const prm_model *m = ctx->model;
  const float *p = m->params;
  const uint64_t L = m->n_hidden;
  const float *a_prev = x;
  uint64_t ld_prev = ldx;
  for (uint64_t l = 0; l < L; l++) {
    const prmi_dense *D = &m->hidden[l];
    float *z, *a;
    if (ctx->inference) {
      z = a = (l % 2 == 0) ? ctx->scratch_a : ctx->scratch_b; /* act in place */
    } else {
      z = ctx->pre[l];
      a = ctx->act[l];
    }
    for (uint64_t i = 0; i < n; i++) memcpy(z + i * D->out, p + D->b_off, D->out * sizeof(float));
    prmi_gemm(0, 1, n, D->out, D->in, 1.0f, a_prev, ld_prev, p + D->w_off, D->in, 1.0f, z, D->out);
    if (check && l == 0 && !prmi_all_finite(z, n * D->out)) return 0;
    act_forward(m->opts.activation, z, a, n * D->out);
    a_prev = a;
    ld_prev = D->out;
  }
  prmi_gemv(0, n, m->head.in, 1.0f, a_prev, ld_prev, p + m->head.w_off, 0.0f, scores);
  if (check && L == 0 && !prmi_all_finite(scores, n)) return 0;
  return 1;
}

int prmi_ctx_forward(prm_ctx *ctx, const prm_batch *batch, float *scores, int copy_input) {
  uint64_t stride = 0;
  int rc = prmi_check_batch(ctx, batch, &stride);
  if (rc != PRM_OK) return rc;
  const uint64_t n = batch->n, d = batch->n_features;
  const float *x = batch->features;
  uint64_t ldx = stride;
  int checked = 0;
  if (copy_input && !ctx->inference) {
    /* Validate before the copy overwrites anything: a failed forward leaves
     * the previous one ready for its backward. */
    rc = report_nonfinite_feature(ctx, batch, stride);
    if (rc != PRM_OK) return rc;
    checked = 1;
    for (uint64_t i = 0; i < n; i++) memcpy(ctx->input + i * d, x + i * stride, d * sizeof(float));
    x = ctx->input;
    ldx = d;
  }
  ctx->have_forward = 0;
  if (!forward_rows(ctx, x, ldx, n, scores, !checked)) {
    rc = report_nonfinite_feature(ctx, batch, stride);
    if (rc != PRM_OK) return rc;
    /* Finite features but a non-finite first layer: the parameters overflow.
     * Such scores are returned as they are (NaN/Inf) and the loss functions
     * reject them; run the forward to the end so that they are defined. */
    forward_rows(ctx, x, ldx, n, scores, 0);
  }
  if (!ctx->inference) {
    ctx->x = x;
    ctx->x_stride = ldx;
    ctx->last_n = n;
    ctx->have_forward = 1;
  }
  return PRM_OK;
}

int prm_ctx_forward(prm_ctx *ctx, const prm_batch *batch, float *scores, uint64_t n_scores) {
  if (ctx == NULL) return prmi_fail(NULL, PRM_ERR_NULL, "prm_ctx_forward: ctx is NULL");
  if (batch == NULL) return prmi_fail(ctx->errmsg, PRM_ERR_NULL, "prm_ctx_forward: batch is NULL");
  if (scores == NULL)
    return prmi_fail(ctx->errmsg, PRM_ERR_NULL, "prm_ctx_forward: scores is NULL");
  if (batch->version >= 1 && batch->version <= PRM_BATCH_VERSION && n_scores < batch->n)
    return prmi_fail(ctx->errmsg, PRM_ERR_SIZE, "prm_ctx_forward: scores holds %llu < %llu rows",
                     (unsigned long long)n_scores, (unsigned long long)batch->n);
  return prmi_ctx_forward(ctx, batch, scores, 1);
}

/* ---- backward ---------------------------------------------------------------------- */

int prm_ctx_backward(prm_ctx *ctx, const float *dscores, uint64_t n) {
  if (ctx == NULL) return prmi_fail(NULL, PRM_ERR_NULL, "prm_ctx_backward: ctx is NULL");
  if (dscores == NULL)
    return prmi_fail(ctx->errmsg, PRM_ERR_NULL, "prm_ctx_backward: dscores is NULL");
  if (ctx->inference)
    return prmi_fail(ctx->errmsg, PRM_ERR_STATE, "prm_ctx_backward: inference context");
  if (!ctx->have_forward)
    return prmi_fail(ctx->errmsg, PRM_ERR_STATE,
                     "prm_ctx_backward: no forward to back-propagate (one backward per forward)");
  if (n != ctx->last_n)
    return prmi_fail(ctx->errmsg, PRM_ERR_SIZE, "prm_ctx_backward: %llu dscores, forward had %llu",
                     (unsigned long long)n, (unsigned long long)ctx->last_n);
  if (!prmi_all_finite(dscores, n))
    return prmi_fail(ctx->errmsg, PRM_ERR_NONFINITE, "prm_ctx_backward: NaN/Inf in dscores");

  const prm_model *m = ctx->model;
  const float *p = m->params;
  float *g = ctx->grads;
  const uint64_t L = m->n_hidden;
  const float *a_last = L ? ctx->act[L - 1] : ctx->x;
  const uint64_t ld_last = L ? m->head.in : ctx->x_stride;

  prmi_gemv(1, n, m->head.in, 1.0f, a_last, ld_last, dscores, 1.0f, g + m->head.w_off);
  if (L > 0) {
    float *da = ctx->scratch_a, *other = ctx->scratch_b;
    const float *w = p + m->head.w_off;
    const uint64_t h = m->head.in;
    for (uint64_t i = 0; i < n; i++)
      for (uint64_t j = 0; j < h; j++) da[i * h + j] = dscores[i] * w[j];
    for (uint64_t l = L; l-- > 0;) {
      const prmi_dense *D = &m->hidden[l];
      act_backward(m->opts.activation, ctx->pre[l], ctx->act[l], da, da, n * D->out);
      const float *a_prev = l ? ctx->act[l - 1] : ctx->x;
      const uint64_t ld_prev = l ? D->in : ctx->x_stride;
      prmi_gemm(1, 0, D->out, D->in, n, 1.0f, da, D->out, a_prev, ld_prev, 1.0f, g + D->w_off,
                D->in);
      float *gb = g + D->b_off;
      for (uint64_t i = 0; i < n; i++)
        for (uint64_t j = 0; j < D->out; j++) gb[j] += da[i * D->out + j];
      if (l > 0) {
        prmi_gemm(0, 0, n, D->in, D->out, 1.0f, da, D->out, p + D->w_off, D->in, 0.0f, other,
                  D->in);
        float *t = da;
        da = other;
        other = t;
      }
    }
  }
  ctx->have_forward = 0;
  return PRM_OK;
}

int prm_ctx_zero_grad(prm_ctx *ctx) {
  if (ctx == NULL) return prmi_fail(NULL, PRM_ERR_NULL, "prm_ctx_zero_grad: ctx is NULL");
  if (ctx->inference)
    return prmi_fail(ctx->errmsg, PRM_ERR_STATE, "prm_ctx_zero_grad: inference context");
  memset(ctx->grads, 0, ctx->model->n_params * sizeof(float));
  return PRM_OK;
}

float *prm_ctx_grads(prm_ctx *ctx, uint64_t *n) {
  if (ctx == NULL || ctx->inference) {
    if (n != NULL) *n = 0;
    return NULL;
  }
  if (n != NULL) *n = ctx->model->n_params;
  return ctx->grads;
}
