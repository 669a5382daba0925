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
 *                 dZ_l = dA_l * act'(Z_l)     (act'(Z_l) saved by the forward)
 *                 gW_l += dZ_l^T A_{l-1} ;  gb_l += colsum(dZ_l)
 *                 dA_{l-1} = dZ_l W_l        (skipped for l = 1: no input grad)
 * linear is the L = 0 case: s = X w, gw += X^T ds.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

/* ---- options, creation --------------------------------------------------------------- */

int prm_ctx_options_init(prm_ctx_options *opts, uint32_t version) {
  const prm_ctx_options d = PRM_CTX_OPTIONS_INIT;
  return prmi_init_struct(opts, &d, sizeof d, version, PRM_CTX_OPTIONS_VERSION,
                          "prm_ctx_options_init");
}

void prm_ctx_free(prm_ctx *ctx) {
  if (ctx == NULL) return;
  /* Nothing of the model is read: contexts and models may be freed in any
   * order. */
  if (ctx->dact != NULL)
    for (uint32_t l = 0; l < ctx->n_hidden; l++)
      prmi_free(ctx->dact[l]);
  if (ctx->act != NULL)
    for (uint32_t l = 0; l < ctx->n_hidden; l++)
      prmi_free(ctx->act[l]);
  free(ctx->dact);
  free(ctx->act);
  prmi_free(ctx->input);
  prmi_free(ctx->scratch_a);
  prmi_free(ctx->scratch_b);
  prmi_free(ctx->grads);
  prmi_free(ctx->scores);
  prmi_free(ctx->dscores);
  prmi_gpt2_acts_free(ctx->gpt2);
  free(ctx);
}

/*
 * The NOMEM message: how much the context needed, and for what. Sizes of
 * the buffers prm_ctx_new allocates, in bytes (double: only for the message).
 */
static int fail_nomem(const prm_model *m, const prm_ctx_options *opts, uint64_t max_len) {
  const double n = (double)opts->max_rows, f = sizeof(float);
  const int train = opts->inference == 0;
  double acts = 0.0;
  if (m->opts.arch == PRM_ARCH_GPT2) {
    acts = f * (double)prmi_gpt2_acts_floats(m, opts->max_rows, max_len, !train);
  } else {
    acts = (m->n_hidden > 0 ? 2.0 * n * (double)m->max_width * f : 0.0);
    if (train) {
      acts += n * (double)m->opts.input_size * f;
      for (uint32_t l = 0; l < m->n_hidden; l++)
        acts += 2.0 * n * (double)m->hidden[l].out * f;
    }
  }
  const double grads = train ? (double)(m->n_params - m->trainable_offset) * f : 0.0;
  const double MiB = 1024.0 * 1024.0;
  if (m->opts.arch == PRM_ARCH_GPT2)
    return prmi_fail(NULL, PRM_ERR_NOMEM,
                     "prm_ctx_new: cannot allocate %.1f MiB for a %s context of %llu rows x %llu "
                     "tokens (activations %.1f MiB, gradients %.1f MiB)",
                     (acts + grads) / MiB, train ? "training" : "inference",
                     (unsigned long long)opts->max_rows, (unsigned long long)max_len, acts / MiB,
                     grads / MiB);
  return prmi_fail(NULL, PRM_ERR_NOMEM,
                   "prm_ctx_new: cannot allocate %.1f MiB for a %s context of %llu rows "
                   "(activations %.1f MiB, gradients %.1f MiB)",
                   (acts + grads) / MiB, train ? "training" : "inference",
                   (unsigned long long)opts->max_rows, acts / MiB, grads / MiB);
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

  const int gpt2 = model->opts.arch == PRM_ARCH_GPT2;
  uint64_t max_len = 0;
  if (gpt2) {
    max_len = opts->max_len ? opts->max_len : model->opts.n_ctx;
    if (max_len > model->opts.n_ctx)
      return prmi_fail(NULL, PRM_ERR_INVALID, "prm_ctx_new: max_len %llu > the model's n_ctx %llu",
                       (unsigned long long)max_len, (unsigned long long)model->opts.n_ctx);
    if (max_len > PRMI_MAX_DIM / opts->max_rows)
      return prmi_fail(NULL, PRM_ERR_INVALID, "prm_ctx_new: max_rows * max_len > 2^30 tokens");
  }

  prm_ctx *c = calloc(1, sizeof *c);
  if (c == NULL) return prmi_fail(NULL, PRM_ERR_NOMEM, "prm_ctx_new: out of memory");
  c->model = model;
  c->n_hidden = model->n_hidden;
  c->inference = opts->inference != 0;
  c->max_rows = opts->max_rows;
  c->max_len = max_len;
  c->trainable_offset = model->trainable_offset;
  const uint64_t n = opts->max_rows, L = model->n_hidden, w = model->max_width;
  int ok = 1;
  c->scores = prmi_calloc(n, sizeof(float));
  ok = ok && c->scores != NULL;
  if (gpt2) {
    c->gpt2 = prmi_gpt2_acts_new(model, n, max_len, c->inference);
    ok = ok && c->gpt2 != NULL;
  }
  if (L > 0) {
    /* Inference ping-pongs between two (n, max_width) buffers; training
     * keeps A_l and act'(Z_l) of every layer and uses the scratch for deltas. */
    c->scratch_a = prmi_calloc(n * w, sizeof(float));
    c->scratch_b = prmi_calloc(n * w, sizeof(float));
    ok = ok && c->scratch_a != NULL && c->scratch_b != NULL;
  }
  if (!c->inference && ok) {
    c->dscores = prmi_calloc(n, sizeof(float));
    c->grads = prmi_calloc(model->n_params - c->trainable_offset, sizeof(float));
    if (!gpt2) c->input = prmi_calloc(n * model->opts.input_size, sizeof(float));
    ok = c->dscores != NULL && c->grads != NULL && (gpt2 || c->input != NULL);
    if (ok && L > 0) {
      c->dact = calloc(L, sizeof *c->dact);
      c->act = calloc(L, sizeof *c->act);
      ok = c->dact != NULL && c->act != NULL;
      for (uint32_t l = 0; ok && l < L; l++) {
        c->dact[l] = prmi_calloc(n * model->hidden[l].out, sizeof(float));
        c->act[l] = prmi_calloc(n * model->hidden[l].out, sizeof(float));
        ok = c->dact[l] != NULL && c->act[l] != NULL;
      }
    }
  }
  if (!ok) {
    prm_ctx_free(c);
    return fail_nomem(model, opts, max_len);
  }
  *out = c;
  return PRM_OK;
}

const prm_model *prm_ctx_model(const prm_ctx *ctx) { return ctx ? ctx->model : NULL; }

const char *prm_ctx_errmsg(const prm_ctx *ctx) { return ctx ? ctx->errmsg : ""; }

/* ---- forward ------------------------------------------------------------------------ */

int prm_batch_init(prm_batch *batch, uint32_t version) {
  const prm_batch d = PRM_BATCH_INIT;
  return prmi_init_struct(batch, &d, sizeof d, version, PRM_BATCH_VERSION, "prm_batch_init");
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

/*
 * Copy n rows of d features (source row stride `stride`) into dst (n, d) and
 * check them on the way: 1 when every feature is finite. One pass over the
 * batch instead of a check and then a copy. The check is an integer max of
 * the magnitude bits, which vectorises without reassociating float sums.
 */
PRMI_TARGET_CLONES
static int prmi_copy_finite(float *restrict dst, const float *restrict src, uint64_t n, uint64_t d,
                            uint64_t stride) {
  uint32_t mx = 0;
  for (uint64_t i = 0; i < n; i++) {
    const float *restrict row = src + i * stride;
    float *restrict out = dst + i * d;
    for (uint64_t j = 0; j < d; j++) {
      float v = row[j];
      uint32_t u;
      memcpy(&u, &v, sizeof u);
      u &= 0x7fffffffu;
      mx = u > mx ? u : mx;
      out[j] = v;
    }
  }
  return mx < 0x7f800000u;
}

/* Checks shared by every entry point that takes a batch. */
int prmi_check_batch(prm_ctx *ctx, const prm_batch *b, uint64_t *stride) {
  int rc = prmi_check_version(ctx->errmsg, b, PRM_BATCH_VERSION, "prm_batch");
  if (rc != PRM_OK) return rc;
  const prm_model *m = ctx->model;
  *stride = 0;
  if (m->opts.arch == PRM_ARCH_GPT2) return prmi_gpt2_check_batch(ctx, b);
  if (b->features == NULL)
    return prmi_fail(ctx->errmsg, PRM_ERR_NULL, "forward: batch->features is NULL");
  if (b->n_features != m->opts.input_size)
    return prmi_fail(ctx->errmsg, PRM_ERR_SIZE,
                     "forward: batch has %llu features, model takes %llu",
                     (unsigned long long)b->n_features, (unsigned long long)m->opts.input_size);
  if (b->n < 1 || b->n > ctx->max_rows)
    return prmi_fail(ctx->errmsg, PRM_ERR_SIZE, "forward: %llu rows, context holds 1..%llu",
                     (unsigned long long)b->n, (unsigned long long)ctx->max_rows);
  const uint64_t st = b->row_stride ? b->row_stride : b->n_features;
  if (st < b->n_features)
    return prmi_fail(ctx->errmsg, PRM_ERR_SIZE, "forward: row_stride %llu < n_features %llu",
                     (unsigned long long)st, (unsigned long long)b->n_features);
  if (st > PRMI_MAX_DIM)
    return prmi_fail(ctx->errmsg, PRM_ERR_SIZE, "forward: row_stride %llu exceeds 2^30",
                     (unsigned long long)st);
  *stride = st;
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
    /* Z_l is computed into the activation buffer and activated in place:
     * inference ping-pongs between the two scratch buffers, training keeps
     * A_l and act'(Z_l) for the backward. */
    float *a = ctx->inference ? ((l % 2 == 0) ? ctx->scratch_a : ctx->scratch_b) : ctx->act[l];
    for (uint64_t i = 0; i < n; i++)
      memcpy(a + i * D->out, p + D->b_off, D->out * sizeof(float));
    prmi_gemm(0, 1, n, D->out, D->in, 1.0f, a_prev, ld_prev, p + D->w_off, D->in, 1.0f, a, D->out);
    if (check && l == 0 && !prmi_all_finite(a, n * D->out)) return 0;
    if (ctx->inference)
      prmi_act_forward(m->opts.activation, a, n * D->out);
    else
      prmi_act_forward_grad(m->opts.activation, a, ctx->dact[l], n * D->out);
    a_prev = a;
    ld_prev = D->out;
  }
  prmi_gemv(0, n, m->head.in, 1.0f, a_prev, ld_prev, p + m->head.w_off, 0.0f, scores);
  if (check && L == 0 && !prmi_all_finite(scores, n)) return 0;
  return 1;
}

int prmi_ctx_forward(prm_ctx *ctx, const prm_batch *batch, uint64_t stride, float *scores,
                     int copy_input) {
  int rc;
  if (ctx->gpt2 != NULL) {
    /* token ids are validated before anything is written, and packed into
     * the context: no borrowed input survives the call */
    ctx->have_forward = 0;
    prmi_gpt2_forward(ctx, batch, scores);
    if (!ctx->inference) {
      ctx->last_n = batch->n;
      ctx->have_forward = 1;
    }
    return PRM_OK;
  }
  const uint64_t n = batch->n, d = batch->n_features;
  const float *x = batch->features;
  uint64_t ldx = stride;
  int checked = 0;
  if (copy_input && !ctx->inference) {
    if (ctx->have_forward) {
      /* The pending forward's features live in ctx->input: validate before
       * the copy overwrites them, so that a failed forward leaves the
       * pending one ready for its backward. */
      rc = report_nonfinite_feature(ctx, batch, stride);
      if (rc != PRM_OK) return rc;
      for (uint64_t i = 0; i < n; i++)
        memcpy(ctx->input + i * d, x + i * stride, d * sizeof(float));
    } else if (!prmi_copy_finite(ctx->input, x, n, d, stride)) {
      /* Nothing pending (the usual forward-backward loop): ctx->input is
       * free scratch, so copy and check in one pass; a failure leaves no
       * state behind that anyone can observe. */
      rc = report_nonfinite_feature(ctx, batch, stride);
      if (rc != PRM_OK) return rc;
    }
    checked = 1;
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
  uint64_t stride = 0;
  int rc = prmi_check_batch(ctx, batch, &stride);
  if (rc != PRM_OK) return rc;
  /* The scores go to the context's buffer first and reach the caller only on
   * success: non-finite features are found during the computation (after
   * the first linear map), and a failed call must not have written them. */
  rc = prmi_ctx_forward(ctx, batch, stride, ctx->scores, 1);
  if (rc != PRM_OK) return rc;
  memcpy(scores, ctx->scores, batch->n * sizeof(float));
  return PRM_OK;
}

/* ---- backward ---------------------------------------------------------------------- */

/*
 * Top hidden layer, one pass: dZ = (ds w^T) * act'(Z) and gb += colsum(dZ).
 * dz, dact (n, h); ds (n); w, gb (h).
 */
PRMI_TARGET_CLONES
static void prmi_top_delta(float *restrict dz, float *restrict gb, const float *ds,
                           const float *restrict w, const float *restrict dact, uint64_t n,
                           uint64_t h) {
  for (uint64_t i = 0; i < n; i++) {
    const float dsi = ds[i];
    float *restrict dzi = dz + i * h;
    const float *restrict di = dact + i * h;
    for (uint64_t j = 0; j < h; j++) {
      float v = (dsi * w[j]) * di[j];
      dzi[j] = v;
      gb[j] += v;
    }
  }
}

/* Lower hidden layers, one pass: dZ = dA * act'(Z) in place (dz holds dA on
 * entry) and gb += colsum(dZ). dz, dact (n, h); gb (h). */
PRMI_TARGET_CLONES
static void prmi_hidden_delta(float *restrict dz, float *restrict gb, const float *restrict dact,
                              uint64_t n, uint64_t h) {
  for (uint64_t i = 0; i < n; i++) {
    float *restrict dzi = dz + i * h;
    const float *restrict di = dact + i * h;
    for (uint64_t j = 0; j < h; j++) {
      float v = dzi[j] * di[j];
      dzi[j] = v;
      gb[j] += v;
    }
  }
}

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
  if (ctx->trainable_offset != ctx->model->trainable_offset)
    return prmi_fail(ctx->errmsg, PRM_ERR_MISMATCH,
                     "prm_ctx_backward: the model's trainable parameters changed since this "
                     "context was created; create a new context");
  if (ctx->gpt2 != NULL) {
    prmi_gpt2_backward(ctx, dscores, n);
    ctx->have_forward = 0;
    return PRM_OK;
  }

  const prm_model *m = ctx->model;
  const float *p = m->params;
  const uint64_t toff = ctx->trainable_offset;
  float *g = ctx->grads; /* parameter j's gradient is g[j - toff], j >= toff */
  const uint64_t L = m->n_hidden;
  const float *a_last = L ? ctx->act[L - 1] : ctx->x;
  const uint64_t ld_last = L ? m->head.in : ctx->x_stride;

  prmi_gemv(1, n, m->head.in, 1.0f, a_last, ld_last, dscores, 1.0f, g + (m->head.w_off - toff));
  if (L > 0) {
    /* dz: dZ_l of the layer at hand; other: where dA_{l-1} goes */
    float *dz = ctx->scratch_a, *other = ctx->scratch_b;
    for (uint64_t l = L; l-- > 0;) {
      const prmi_dense *D = &m->hidden[l];
      if (D->w_off < toff) break; /* frozen, and so is every layer below */
      if (l == L - 1)
        prmi_top_delta(dz, g + (D->b_off - toff), dscores, p + m->head.w_off, ctx->dact[l], n,
                       D->out);
      else
        prmi_hidden_delta(dz, g + (D->b_off - toff), ctx->dact[l], n, D->out);
      const float *a_prev = l ? ctx->act[l - 1] : ctx->x;
      const uint64_t ld_prev = l ? D->in : ctx->x_stride;
      prmi_gemm(1, 0, D->out, D->in, n, 1.0f, dz, D->out, a_prev, ld_prev, 1.0f,
                g + (D->w_off - toff), D->in);
      if (l > 0 && m->hidden[l - 1].w_off >= toff) {
        prmi_gemm(0, 0, n, D->in, D->out, 1.0f, dz, D->out, p + D->w_off, D->in, 0.0f, other,
                  D->in);
        float *t = dz;
        dz = other;
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
  memset(ctx->grads, 0, (ctx->model->n_params - ctx->trainable_offset) * sizeof(float));
  return PRM_OK;
}

float *prm_ctx_grads(prm_ctx *ctx, uint64_t *n) {
  if (ctx == NULL || ctx->inference) {
    if (n != NULL) *n = 0;
    return NULL;
  }
  if (n != NULL) *n = ctx->model->n_params - ctx->trainable_offset;
  return ctx->grads;
}
