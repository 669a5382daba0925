/*
 * mlp.c - the mlp architecture: hidden layers h <- act(W h + b) over dense
 * features, then r = w . h (no bias: it cancels in r_c - r_r).
 *
 * Shapes below: n = rows of the batch, d = input size, h_l = width of hidden
 * layer l, L = number of hidden layers (1..PRM_MAX_HIDDEN). Row-major.
 *
 * Forward:        A_0 = X (n, d)
 *                 Z_l = A_{l-1} W_l^T + b_l     (n, h_l)    W_l (h_l, h_{l-1})
 *                 A_l = act(Z_l)                (n, h_l)
 *                 s   = A_L w                   (n)         w = score.weight
 * Backward:       gw += A_L^T ds ;  dA_L = ds w^T
 *                 dZ_l = dA_l * act'(Z_l)     (act'(Z_l) saved by the forward)
 *                 gW_l += dZ_l^T A_{l-1} ;  gb_l += colsum(dZ_l)
 *                 dA_{l-1} = dZ_l W_l        (skipped for l = 1: no input grad)
 *
 * Parameters (PyTorch nn.Linear order, [out, in] weights): layers.0.weight
 * [h0, d], layers.0.bias [h0], ..., layers.{L-1}.bias, score.weight [1, h_{L-1}].
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

/* One dense layer y = x W^T + b inside the arena; W is [out, in] row-major. */
typedef struct mlp_dense {
  uint64_t in, out;
  uint64_t w_off; /* [out, in] */
  uint64_t b_off; /* [out] */
} mlp_dense;

typedef struct mlp_layout {
  uint32_t n_hidden;
  uint64_t max_width; /* widest hidden layer */
  mlp_dense hidden[PRM_MAX_HIDDEN];
} mlp_layout;

#define LAYOUT(m) ((const mlp_layout *)(m)->layout)

/* ---- model -------------------------------------------------------------------------- */

static int mlp_normalise(prm_model_options *o, uint64_t *n_params, uint32_t *n_tensors) {
  int rc;
  if ((rc = prmi_check_dim(o->input_size, "input_size")) != PRM_OK) return rc;
  if (prmi_activation_name(o->activation) == NULL)
    return prmi_fail(NULL, PRM_ERR_INVALID, "model: unknown activation %d", (int)o->activation);
  if (o->n_hidden < 1 || o->n_hidden > PRM_MAX_HIDDEN)
    return prmi_fail(NULL, PRM_ERR_INVALID, "model: n_hidden %u not in [1, %d]",
                     (unsigned)o->n_hidden, PRM_MAX_HIDDEN);
  for (uint32_t i = 0; i < o->n_hidden; i++) {
    char what[32];
    snprintf(what, sizeof what, "hidden[%u]", (unsigned)i);
    if ((rc = prmi_check_dim(o->hidden[i], what)) != PRM_OK) return rc;
  }
  const prm_model_options d = PRM_MODEL_OPTIONS_INIT;
  for (uint32_t i = o->n_hidden; i < PRM_MAX_HIDDEN; i++)
    o->hidden[i] = 0;
  o->vocab_size = o->n_ctx = o->n_embd = o->n_layer = o->n_head = 0;
  o->n_kv_head = o->head_dim = o->n_ffn = 0;
  o->rope_theta = d.rope_theta;
  o->rms_eps = d.rms_eps;
  o->attn_bias = o->qk_norm = 0;
  uint64_t total = 0, in = o->input_size;
  for (uint32_t i = 0; i < o->n_hidden && total <= PRMI_MAX_PARAMS; i++) {
    total += (in + 1) * o->hidden[i];
    in = o->hidden[i];
  }
  *n_params = total + in;
  *n_tensors = 2 * o->n_hidden + 1;
  return PRM_OK;
}

static int mlp_layout_new(prm_model *m) {
  mlp_layout *L = calloc(1, sizeof *L);
  if (L == NULL) return PRM_ERR_NOMEM;
  m->layout = L;
  uint64_t in = m->opts.input_size;
  L->n_hidden = m->opts.n_hidden;
  for (uint32_t i = 0; i < L->n_hidden; i++) {
    char name[PRMI_NAME_SIZE];
    mlp_dense *D = &L->hidden[i];
    D->in = in;
    D->out = m->opts.hidden[i];
    snprintf(name, sizeof name, "layers.%u.weight", (unsigned)i);
    D->w_off = prmi_model_add_tensor(m, name, 2, D->out, D->in);
    snprintf(name, sizeof name, "layers.%u.bias", (unsigned)i);
    D->b_off = prmi_model_add_tensor(m, name, 1, D->out, 0);
    if (D->out > L->max_width) L->max_width = D->out;
    in = D->out;
  }
  m->head_in = in;
  m->head_w = prmi_model_add_tensor(m, "score.weight", 2, 1, in);
  return PRM_OK;
}

/* Weights U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (PyTorch's nn.Linear bound);
 * biases U(-0.1, 0.1) so that tests see non-trivial biases. linear.c uses
 * it too. */
void prmi_init_feature_model(prm_model *m, uint64_t seed) {
  for (uint32_t t = 0; t < m->n_tensors; t++) {
    const prmi_tensor *T = &m->tensors[t];
    uint64_t s = prmi_init_stream(seed, t);
    float *p = m->params + T->offset;
    double a = T->ndim == 2 ? 1.0 / sqrt((double)T->shape[1]) : 0.1;
    for (uint64_t i = 0; i < T->numel; i++)
      p[i] = prmi_init_uniform(&s, a);
  }
}

static int mlp_trainable_from_block(prm_model *m, uint64_t k, uint64_t *off) {
  const mlp_layout *L = LAYOUT(m);
  if (k > L->n_hidden)
    return prmi_fail(NULL, PRM_ERR_INVALID,
                     "prm_model_set_trainable: %llu layers, the model has %u",
                     (unsigned long long)k, (unsigned)L->n_hidden);
  *off = L->hidden[L->n_hidden - k].w_off;
  return PRM_OK;
}

/* ---- checkpoints ------------------------------------------------------------------------ */

static void mlp_meta_write(const prm_model_options *o, prmi_meta_out *out) {
  char hidden[PRM_MAX_HIDDEN * 22 + 4];
  size_t n = 0;
  prmi_meta_put_u64(out, "d", o->input_size);
  /* json.dumps style, as torch_ref writes it: "[1024, 256]" */
  n += (size_t)snprintf(hidden + n, sizeof hidden - n, "[");
  for (uint32_t i = 0; i < o->n_hidden; i++)
    n += (size_t)snprintf(hidden + n, sizeof hidden - n, "%s%llu", i ? ", " : "",
                          (unsigned long long)o->hidden[i]);
  snprintf(hidden + n, sizeof hidden - n, "]");
  prmi_meta_put(out, "hidden", hidden);
  const char *act = prmi_activation_name(o->activation);
  prmi_meta_put(out, "act", act != NULL ? act : "");
}

static int mlp_detect(const prmi_ckpt *c) {
  uint32_t nd;
  uint64_t sh[2];
  return prmi_ckpt_shape(c, "layers.0.weight", &nd, sh);
}

/* "[a, b, ...]": at most PRM_MAX_HIDDEN positive decimals. */
static int parse_hidden(const char *s, prm_model_options *o) {
  uint32_t n = 0;
  while (*s == ' ')
    s++;
  if (*s++ != '[') return -1;
  for (;;) {
    while (*s == ' ')
      s++;
    if (*s == ']' && n == 0) break;
    if (*s < '1' || *s > '9' || n == PRM_MAX_HIDDEN) return -1;
    uint64_t v = 0;
    for (; *s >= '0' && *s <= '9'; s++) {
      if (v > PRMI_MAX_DIM) return -1;
      v = v * 10 + (uint64_t)(*s - '0');
    }
    o->hidden[n++] = v;
    while (*s == ' ')
      s++;
    if (*s == ']') break;
    if (*s++ != ',') return -1;
  }
  s++;
  while (*s == ' ')
    s++;
  if (*s != '\0') return -1;
  o->n_hidden = n;
  return 0;
}

/* input size from "d" or the first layer; the hidden widths from "hidden" or
 * the layers present; the activation from "act" (required: no silent
 * default, as in torch_ref). */
int prmi_feature_input_size(const prmi_ckpt *c, const char *first, prm_model_options *o) {
  uint32_t nd;
  uint64_t sh[2];
  int rc = prmi_ckpt_meta_u64(c, "d", &o->input_size);
  if (rc < 0) return rc;
  if (rc == 0) {
    if (!prmi_ckpt_shape(c, first, &nd, sh))
      return prmi_fail(NULL, PRM_ERR_FORMAT, "missing tensor %s", first);
    if (nd != 2 || sh[1] == 0)
      return prmi_fail(NULL, PRM_ERR_FORMAT, "tensor %s must be 2-D and non-empty", first);
    o->input_size = sh[1];
  }
  return PRM_OK;
}

static int mlp_config(const prmi_ckpt *c, prm_model_options *o) {
  uint32_t nd;
  uint64_t sh[2];
  int rc = prmi_feature_input_size(c, "layers.0.weight", o);
  if (rc != PRM_OK) return rc;
  const char *hidden = prmi_ckpt_meta(c, "hidden");
  if (hidden != NULL) {
    if (parse_hidden(hidden, o) != 0)
      return prmi_fail(NULL, PRM_ERR_FORMAT,
                       "__metadata__ hidden='%.64s' is not a list of at most %d integers", hidden,
                       PRM_MAX_HIDDEN);
  } else {
    char name[PRMI_NAME_SIZE];
    for (o->n_hidden = 0;; o->n_hidden++) {
      snprintf(name, sizeof name, "layers.%u.weight", (unsigned)o->n_hidden);
      if (!prmi_ckpt_shape(c, name, &nd, sh)) break;
      if (o->n_hidden == PRM_MAX_HIDDEN)
        return prmi_fail(NULL, PRM_ERR_FORMAT, "mlp has more than %d hidden layers",
                         PRM_MAX_HIDDEN);
      if (nd != 2) return prmi_fail(NULL, PRM_ERR_FORMAT, "tensor %s must be 2-D", name);
      o->hidden[o->n_hidden] = sh[0];
    }
  }
  if (o->n_hidden == 0)
    return prmi_fail(NULL, PRM_ERR_FORMAT, "mlp checkpoint has no hidden layer");
  for (uint32_t i = 0; i < o->n_hidden; i++)
    if (o->hidden[i] == 0)
      return prmi_fail(NULL, PRM_ERR_FORMAT, "hidden layer %u has width 0", (unsigned)i);
  const char *act = prmi_ckpt_meta(c, "act");
  if (act == NULL)
    return prmi_fail(NULL, PRM_ERR_FORMAT,
                     "mlp checkpoint lacks the 'act' __metadata__ key (relu, gelu or tanh)");
  o->activation = prmi_activation_from_name(act);
  if (o->activation == 0)
    return prmi_fail(NULL, PRM_ERR_FORMAT, "unknown activation '%.64s' in __metadata__", act);
  return PRM_OK;
}

/* ---- contexts ------------------------------------------------------------------------- */

typedef struct mlp_acts {
  float *input;   /* (R, d) copy of the last forward's features (training) */
  const float *x; /* features of the last forward: input, or borrowed */
  uint64_t x_stride;
  uint32_t n_hidden;
  float *act[PRM_MAX_HIDDEN];   /* (R, h_l) activations A_l (training) */
  float *dact[PRM_MAX_HIDDEN];  /* (R, h_l) act'(Z_l), saved by the forward (training) */
  float *scratch_a, *scratch_b; /* (R, max_width): deltas, or inference ping-pong */
} mlp_acts;

static void mlp_ctx_free(void *p) {
  mlp_acts *a = p;
  if (a == NULL) return;
  for (uint32_t l = 0; l < a->n_hidden; l++) {
    prmi_free(a->act[l]);
    prmi_free(a->dact[l]);
  }
  prmi_free(a->input);
  prmi_free(a->scratch_a);
  prmi_free(a->scratch_b);
  free(a);
}

/* Inference ping-pongs between two (R, max_width) buffers; training keeps
 * A_l and act'(Z_l) of every layer, a copy of the input, and uses the
 * scratch for deltas. */
static double mlp_ctx_floats(const prm_model *m, uint64_t R, uint64_t max_len, int inference,
                             uint32_t n_workers) {
  (void)n_workers; /* runs on the caller */
  (void)max_len;
  const mlp_layout *L = LAYOUT(m);
  double f = 2.0 * (double)R * (double)L->max_width;
  if (!inference) {
    f += (double)R * (double)m->opts.input_size;
    for (uint32_t l = 0; l < L->n_hidden; l++)
      f += 2.0 * (double)R * (double)L->hidden[l].out;
  }
  return f;
}

static int mlp_ctx_new(prm_ctx *c) {
  const prm_model *m = c->model;
  const mlp_layout *L = LAYOUT(m);
  const uint64_t n = c->max_rows;
  mlp_acts *a = calloc(1, sizeof *a);
  if (a == NULL) return PRM_ERR_NOMEM;
  c->acts = a;
  a->n_hidden = L->n_hidden;
  a->scratch_a = prmi_calloc(n * L->max_width, sizeof(float));
  a->scratch_b = prmi_calloc(n * L->max_width, sizeof(float));
  int ok = a->scratch_a != NULL && a->scratch_b != NULL;
  if (ok && !c->inference) {
    a->input = prmi_calloc(n * m->opts.input_size, sizeof(float));
    ok = a->input != NULL;
    for (uint32_t l = 0; ok && l < L->n_hidden; l++) {
      a->dact[l] = prmi_calloc(n * L->hidden[l].out, sizeof(float));
      a->act[l] = prmi_calloc(n * L->hidden[l].out, sizeof(float));
      ok = a->dact[l] != NULL && a->act[l] != NULL;
    }
  }
  return ok ? PRM_OK : PRM_ERR_NOMEM;
}

static int mlp_check_batch(prm_ctx *ctx, const prm_batch *b, uint64_t *stride) {
  return prmi_check_feature_batch(ctx, b, ctx->model->opts.input_size, stride);
}

/*
 * The forward computation proper. x has `n` rows of stride `ldx`.
 * Non-finite input is caught cheaply: every output of the first linear map
 * (Z_1) is a dot product with a whole input row, so an Inf or NaN feature
 * makes its row non-finite (Inf * 0 is NaN). With `check`, returns 0 as soon
 * as Z_1 is non-finite; otherwise computes everything and returns 1.
 */
static int forward_rows(prm_ctx *ctx, const float *x, uint64_t ldx, uint64_t n, float *scores,
                        int check) {
  const prm_model *m = ctx->model;
  const mlp_layout *L = LAYOUT(m);
  mlp_acts *A = ctx->acts;
  const float *p = m->params;
  const float *a_prev = x;
  uint64_t ld_prev = ldx;
  for (uint64_t l = 0; l < L->n_hidden; l++) {
    const mlp_dense *D = &L->hidden[l];
    /* Z_l is computed into the activation buffer and activated in place:
     * inference ping-pongs between the two scratch buffers, training keeps
     * A_l and act'(Z_l) for the backward. */
    float *a = ctx->inference ? ((l % 2 == 0) ? A->scratch_a : A->scratch_b) : A->act[l];
    for (uint64_t i = 0; i < n; i++)
      memcpy(a + i * D->out, p + D->b_off, D->out * sizeof(float));
    prmi_gemm(0, 1, n, D->out, D->in, 1.0f, a_prev, ld_prev, p + D->w_off, D->in, 1.0f, a, D->out);
    if (check && l == 0 && !prmi_all_finite(a, n * D->out)) return 0;
    if (ctx->inference)
      prmi_act_forward(m->opts.activation, a, n * D->out);
    else
      prmi_act_forward_grad(m->opts.activation, a, A->dact[l], n * D->out);
    a_prev = a;
    ld_prev = D->out;
  }
  prmi_gemv(0, n, m->head_in, 1.0f, a_prev, ld_prev, p + m->head_w, 0.0f, scores);
  return 1;
}

static int mlp_forward(prm_ctx *ctx, const prm_batch *b, uint64_t stride, float *scores,
                       int copy_input) {
  mlp_acts *A = ctx->acts;
  const uint64_t n = b->n, d = b->n_features;
  const float *x = b->features;
  uint64_t ldx = stride;
  int rc, checked = 0;
  if (copy_input && !ctx->inference) {
    if (ctx->have_forward) {
      /* The pending forward's features live in A->input: validate before
       * the copy overwrites them, so that a failed forward leaves the
       * pending one ready for its backward. */
      if ((rc = prmi_report_nonfinite_feature(ctx, b, stride)) != PRM_OK) return rc;
      for (uint64_t i = 0; i < n; i++)
        memcpy(A->input + i * d, x + i * stride, d * sizeof(float));
    } else if (!prmi_copy_features(A->input, x, n, d, stride)) {
      /* Nothing pending: A->input is free scratch, so copy and check in one
       * pass; a failure leaves no state behind that anyone can observe. */
      if ((rc = prmi_report_nonfinite_feature(ctx, b, stride)) != PRM_OK) return rc;
    }
    checked = 1;
    x = A->input;
    ldx = d;
  }
  if (!forward_rows(ctx, x, ldx, n, scores, !checked)) {
    if ((rc = prmi_report_nonfinite_feature(ctx, b, stride)) != PRM_OK) return rc;
    /* Finite features but a non-finite first layer: the parameters overflow.
     * Such scores are returned as they are (NaN/Inf) and the loss functions
     * reject them; run the forward to the end so that they are defined. */
    forward_rows(ctx, x, ldx, n, scores, 0);
  }
  A->x = x;
  A->x_stride = ldx;
  return PRM_OK;
}

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

static void mlp_backward(prm_ctx *ctx, const float *dscores, uint64_t n) {
  const prm_model *m = ctx->model;
  const mlp_layout *Ly = LAYOUT(m);
  mlp_acts *A = ctx->acts;
  const float *p = m->params;
  const uint64_t toff = ctx->trainable_offset;
  float *g = ctx->grads; /* parameter j's gradient is g[j - toff], j >= toff */
  const uint64_t L = Ly->n_hidden;

  prmi_gemv(1, n, m->head_in, 1.0f, A->act[L - 1], m->head_in, dscores, 1.0f,
            g + (m->head_w - toff));
  /* dz: dZ_l of the layer at hand; other: where dA_{l-1} goes */
  float *dz = A->scratch_a, *other = A->scratch_b;
  for (uint64_t l = L; l-- > 0;) {
    const mlp_dense *D = &Ly->hidden[l];
    if (D->w_off < toff) break; /* frozen, and so is every layer below */
    if (l == L - 1)
      prmi_top_delta(dz, g + (D->b_off - toff), dscores, p + m->head_w, A->dact[l], n, D->out);
    else
      prmi_hidden_delta(dz, g + (D->b_off - toff), A->dact[l], n, D->out);
    const float *a_prev = l ? A->act[l - 1] : A->x;
    const uint64_t ld_prev = l ? D->in : A->x_stride;
    prmi_gemm(1, 0, D->out, D->in, n, 1.0f, dz, D->out, a_prev, ld_prev, 1.0f,
              g + (D->w_off - toff), D->in);
    if (l > 0 && Ly->hidden[l - 1].w_off >= toff) {
      prmi_gemm(0, 0, n, D->in, D->out, 1.0f, dz, D->out, p + D->w_off, D->in, 0.0f, other, D->in);
      float *t = dz;
      dz = other;
      other = t;
    }
  }
}

const prmi_arch prmi_arch_mlp = {
    .id = PRM_ARCH_MLP,
    .name = "mlp",
    .article = "an mlp",
    .tokens = 0,
    .normalise = mlp_normalise,
    .layout = mlp_layout_new,
    .layout_free = free, /* the layout is one allocation */
    .init = prmi_init_feature_model,
    .trainable_from_block = mlp_trainable_from_block,
    .meta_write = mlp_meta_write,
    .detect = mlp_detect,
    .config = mlp_config,
    .tensor_alias = NULL,
    .ignorable = NULL,
    .ctx_new = mlp_ctx_new,
    .ctx_free = mlp_ctx_free,
    .ctx_floats = mlp_ctx_floats,
    .check_batch = mlp_check_batch,
    .forward = mlp_forward,
    .backward = mlp_backward,
    .pair_grad = NULL,
};
