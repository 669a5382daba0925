/*
 * optim.c - optimizers (SGD, Adam, AdamW), global gradient-norm clipping,
 * learning-rate schedules and gradient accumulation.
 *
 * The update formulas follow torch.optim.SGD / Adam / AdamW operation by
 * operation in fp32 (scalars computed in double, then rounded to float the way
 * PyTorch rounds a Python float scalar), so a run matches the PyTorch
 * reference to rounding. docs/optimizers.md has the formulas.
 *
 * An applied update costs two passes over the arena:
 *   1. sum of squares of the raw gradient in double: gives the global norm,
 *      and doubles as the NaN/Inf check (the sum is finite iff every gradient
 *      is: a float squared is below 1.2e77, so a double sum cannot overflow);
 *   2. one fused loop per segment: scale, decay, moments, parameter update
 *      and zeroing of the gradient.
 * Nothing is allocated after prm_optimizer_new. The kernels are compiled per
 * ISA (PRMI_TARGET_CLONES) with identical results: elementwise arithmetic, no
 * FMA contraction, and a fixed order of the partial sums.
 */
#include <math.h>
#include <string.h>

#include "internal.h"

/* A run of the arena that shares one weight-decay setting. */
typedef struct opt_segment {
  uint64_t offset, numel;
  int decay; /* 0: weight decay off (no_decay_1d and a 1-D tensor) */
} opt_segment;

struct prm_optimizer {
  prm_model *model;           /* borrowed */
  prm_optimizer_options opts; /* validated copy, newest struct version */
  uint64_t toff;              /* the model's trainable_offset at creation */
  uint64_t n_params;          /* trainable parameters [toff, toff + n_params) */
  /* Adam(W): first moment m. SGD with momentum: momentum buffer. Else NULL. */
  float *m;          /* [n_params], 64-byte aligned */
  float *v;          /* Adam(W): second moment [n_params]; else NULL */
  opt_segment *segs; /* cover [0, n_params) in order */
  uint32_t n_segs;
  uint64_t num_updates;  /* applied updates */
  uint32_t micro;        /* step calls counted in the current accumulation cycle */
  double last_grad_norm; /* norm (after 1/k, before clipping) of the last update */
  char errmsg[PRMI_ERRMSG_SIZE];
};

/* ---- options ------------------------------------------------------------- */

/* Bytes of prm_optimizer_options that exist in struct version `version`. */
static size_t options_size(uint32_t version) {
  (void)version; /* only version 1 exists so far */
  return sizeof(prm_optimizer_options);
}

int prm_optimizer_options_init(prm_optimizer_options *opts, uint32_t version) {
  const prm_optimizer_options d = PRM_OPTIMIZER_OPTIONS_INIT;
  return prmi_init_struct(opts, &d, options_size(version), version, PRM_OPTIMIZER_OPTIONS_VERSION,
                          "prm_optimizer_options_init");
}

/* Check the options; PRM_OK or PRM_ERR_INVALID with a message naming the field. */
static int validate_options(const prm_optimizer_options *o) {
  const char *fn = "prm_optimizer_new";
  if (o->algorithm != PRM_OPT_SGD && o->algorithm != PRM_OPT_ADAM && o->algorithm != PRM_OPT_ADAMW)
    return prmi_fail(NULL, PRM_ERR_INVALID, "%s: unknown algorithm %d", fn, (int)o->algorithm);
  if (o->schedule != PRM_SCHED_CONSTANT && o->schedule != PRM_SCHED_LINEAR &&
      o->schedule != PRM_SCHED_COSINE)
    return prmi_fail(NULL, PRM_ERR_INVALID, "%s: unknown schedule %d", fn, (int)o->schedule);
  /* Written as !(ok) so that NaN fails every test. */
  if (!(isfinite(o->lr) && o->lr >= 0.0))
    return prmi_fail(NULL, PRM_ERR_INVALID, "%s: lr = %g must be finite and >= 0", fn, o->lr);
  if (!(o->beta1 >= 0.0 && o->beta1 < 1.0))
    return prmi_fail(NULL, PRM_ERR_INVALID, "%s: beta1 = %g is outside [0, 1)", fn, o->beta1);
  if (!(o->beta2 >= 0.0 && o->beta2 < 1.0))
    return prmi_fail(NULL, PRM_ERR_INVALID, "%s: beta2 = %g is outside [0, 1)", fn, o->beta2);
  if (!(isfinite(o->eps) && o->eps > 0.0))
    return prmi_fail(NULL, PRM_ERR_INVALID, "%s: eps = %g must be finite and > 0", fn, o->eps);
  if (!(isfinite(o->weight_decay) && o->weight_decay >= 0.0))
    return prmi_fail(NULL, PRM_ERR_INVALID, "%s: weight_decay = %g must be finite and >= 0", fn,
                     o->weight_decay);
  if (!(isfinite(o->momentum) && o->momentum >= 0.0))
    return prmi_fail(NULL, PRM_ERR_INVALID, "%s: momentum = %g must be finite and >= 0", fn,
                     o->momentum);
  if (o->nesterov != 0 && !(o->momentum > 0.0))
    return prmi_fail(NULL, PRM_ERR_INVALID, "%s: nesterov requires momentum > 0", fn);
  if (!(isfinite(o->max_grad_norm) && o->max_grad_norm >= 0.0))
    return prmi_fail(NULL, PRM_ERR_INVALID,
                     "%s: max_grad_norm = %g must be finite and >= 0 (0 = off)", fn,
                     o->max_grad_norm);
  if (o->accumulation_steps == 0)
    return prmi_fail(NULL, PRM_ERR_INVALID, "%s: accumulation_steps must be >= 1", fn);
  if (!(isfinite(o->min_lr) && o->min_lr >= 0.0))
    return prmi_fail(NULL, PRM_ERR_INVALID, "%s: min_lr = %g must be finite and >= 0", fn,
                     o->min_lr);
  if (o->schedule == PRM_SCHED_LINEAR || o->schedule == PRM_SCHED_COSINE) {
    if (o->total_steps == 0)
      return prmi_fail(NULL, PRM_ERR_INVALID, "%s: linear/cosine schedule needs total_steps >= 1",
                       fn);
    if (o->warmup_steps > o->total_steps)
      return prmi_fail(NULL, PRM_ERR_INVALID, "%s: warmup_steps = %llu exceeds total_steps = %llu",
                       fn, (unsigned long long)o->warmup_steps, (unsigned long long)o->total_steps);
    if (o->min_lr > o->lr)
      return prmi_fail(NULL, PRM_ERR_INVALID, "%s: min_lr = %g exceeds lr = %g", fn, o->min_lr,
                       o->lr);
  }
  return PRM_OK;
}

/*
 * Split the trainable suffix of the arena into runs of equal weight-decay
 * setting (offsets relative to its start), merging
 * neighbours, so the update runs as few long loops as possible (one loop for
 * the whole arena unless no_decay_1d is on). Arena parts no tensor describes
 * (none today) are decayed like any parameter.
 */
static int build_segments(prm_optimizer *opt) {
  const prm_model *model = opt->model;
  uint32_t cap = 2 * model->n_tensors + 1;
  opt->segs = prmi_calloc(cap, sizeof *opt->segs);
  if (opt->segs == NULL) return prmi_fail(NULL, PRM_ERR_NOMEM, "prm_optimizer_new: out of memory");
  uint64_t cursor = 0;
  for (uint32_t i = 0; i <= model->n_tensors; i++) {
    if (i < model->n_tensors && model->tensors[i].offset < opt->toff) continue; /* frozen */
    uint64_t off = (i < model->n_tensors ? model->tensors[i].offset : model->n_params) - opt->toff;
    uint64_t numel = i < model->n_tensors ? model->tensors[i].numel : 0;
    if (off < cursor || numel > opt->n_params - off)
      return prmi_fail(NULL, PRM_ERR_INVALID,
                       "prm_optimizer_new: model tensor %u lies outside the arena", (unsigned)i);
    opt_segment run[2] = {{cursor, off - cursor, 1}, {off, numel, 1}};
    if (i < model->n_tensors)
      run[1].decay = !(opt->opts.no_decay_1d != 0 && model->tensors[i].ndim == 1);
    for (int r = 0; r < 2; r++) {
      if (run[r].numel == 0) continue;
      opt_segment *last = opt->n_segs > 0 ? &opt->segs[opt->n_segs - 1] : NULL;
      if (last != NULL && last->decay == run[r].decay &&
          last->offset + last->numel == run[r].offset)
        last->numel += run[r].numel;
      else
        opt->segs[opt->n_segs++] = run[r];
    }
    cursor = off + numel;
  }
  return PRM_OK;
}

void prm_optimizer_free(prm_optimizer *opt) {
  if (opt == NULL) return;
  prmi_free(opt->m);
  prmi_free(opt->v);
  prmi_free(opt->segs);
  prmi_free(opt);
}

int prm_optimizer_new(prm_optimizer **out, prm_model *model, const prm_optimizer_options *opts) {
  if (out == NULL) return prmi_fail(NULL, PRM_ERR_NULL, "prm_optimizer_new: out is NULL");
  *out = NULL;
  if (model == NULL) return prmi_fail(NULL, PRM_ERR_NULL, "prm_optimizer_new: model is NULL");
  int rc = prmi_check_version(NULL, opts, PRM_OPTIMIZER_OPTIONS_VERSION,
                              "prm_optimizer_new: prm_optimizer_options");
  if (rc != PRM_OK) return rc;
  /* Fields a caller's older struct version lacks keep their defaults. */
  prm_optimizer_options o = PRM_OPTIMIZER_OPTIONS_INIT;
  memcpy(&o, opts, options_size(opts->version));
  o.version = PRM_OPTIMIZER_OPTIONS_VERSION;
  rc = validate_options(&o);
  if (rc != PRM_OK) return rc;

  prm_optimizer *opt = prmi_calloc(1, sizeof *opt);
  if (opt == NULL) return prmi_fail(NULL, PRM_ERR_NOMEM, "prm_optimizer_new: out of memory");
  opt->model = model;
  opt->opts = o;
  opt->toff = model->trainable_offset;
  opt->n_params = model->n_params - opt->toff;
  rc = build_segments(opt);
  if (rc != PRM_OK) {
    prm_optimizer_free(opt);
    return rc;
  }
  /* State only for the algorithm that needs it (zero-initialised, which is
   * also exactly PyTorch's first step: b = mu*0 + g = g, m = 0 + (1-b1) g). */
  int need_m = o.algorithm != PRM_OPT_SGD || o.momentum > 0.0;
  int need_v = o.algorithm != PRM_OPT_SGD;
  if (need_m) opt->m = prmi_calloc(opt->n_params, sizeof(float));
  if (need_v) opt->v = prmi_calloc(opt->n_params, sizeof(float));
  if ((need_m && opt->m == NULL) || (need_v && opt->v == NULL)) {
    prm_optimizer_free(opt);
    return prmi_fail(NULL, PRM_ERR_NOMEM, "prm_optimizer_new: out of memory for %llu moments",
                     (unsigned long long)opt->n_params);
  }
  *out = opt;
  return PRM_OK;
}

/* ---- schedule -------------------------------------------------------------- */

/*
 * Learning rate of update t (0-based), Hugging Face get_*_schedule_with_warmup
 * semantics with a floor:
 *   t < W:                 lr * t / W
 *   constant:              lr
 *   linear, W <= t < T:    min_lr + (lr - min_lr) * (T - t) / (T - W)
 *   cosine, W <= t < T:    min_lr + (lr - min_lr) * 0.5 (1 + cos(pi (t - W) / (T - W)))
 *   linear/cosine, t >= T: min_lr
 */
static double scheduled_lr(const prm_optimizer_options *o, uint64_t t) {
  if (t < o->warmup_steps) return o->lr * (double)t / (double)o->warmup_steps;
  if (o->schedule == PRM_SCHED_CONSTANT) return o->lr;
  if (t >= o->total_steps) return o->min_lr;
  double progress = (double)(t - o->warmup_steps) / (double)(o->total_steps - o->warmup_steps);
  double factor = o->schedule == PRM_SCHED_LINEAR
                      ? 1.0 - progress
                      : 0.5 * (1.0 + cos(3.14159265358979323846 * progress));
  return o->min_lr + (o->lr - o->min_lr) * factor;
}

/* ---- kernels ---------------------------------------------------------------- */

/* Sum of squares in double, 8 independent partial sums so the loop vectorises
 * without reassociation flags and stays deterministic. */
PRMI_TARGET_CLONES
static double prmi_sum_squares(const float *restrict g, uint64_t n) {
  double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  uint64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; j++) {
      double x = (double)g[i + (uint64_t)j];
      acc[j] += x * x;
    }
  for (; i < n; i++) {
    double x = (double)g[i];
    acc[0] += x * x;
  }
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

/* Per-update fp32 coefficients of Adam(W); see docs/optimizers.md. */
typedef struct adam_coef {
  float gscale;    /* 1/k times the clip factor */
  float decay;     /* AdamW: 1 - lr*wd (1 without decay); Adam: 1 */
  float l2;        /* Adam: wd (0 without decay); AdamW: 0 */
  float w1;        /* 1 - beta1 */
  float beta2, w2; /* beta2, 1 - beta2 */
  float bc2_sqrt;  /* sqrt(1 - beta2^step) */
  float eps;
  float neg_step; /* -lr / (1 - beta1^step) */
} adam_coef;

/* Adam(W) over n elements, PyTorch's operation order:
 *   p *= decay; g += l2 p; m = lerp(m, g, 1-b1); v = v b2 + (1-b2) g g;
 *   p += -step * m / (sqrt(v)/bc2_sqrt + eps); grad = 0 */
PRMI_TARGET_CLONES
static void prmi_adam_kernel(float *restrict p, float *restrict g, float *restrict m,
                             float *restrict v, uint64_t n, const adam_coef *c) {
  const float gscale = c->gscale, decay = c->decay, l2 = c->l2, w1 = c->w1, b2 = c->beta2,
              w2 = c->w2, bc2 = c->bc2_sqrt, eps = c->eps, neg_step = c->neg_step;
  /* Vectorises only with -fno-math-errno (else sqrtf may set errno). */
  for (uint64_t i = 0; i < n; i++) {
    float pi = p[i] * decay;
    float gi = gscale * g[i] + l2 * pi;
    float mi = m[i] + w1 * (gi - m[i]);
    float vi = v[i] * b2 + w2 * gi * gi;
    float denom = sqrtf(vi) / bc2 + eps;
    p[i] = pi + neg_step * mi / denom;
    m[i] = mi;
    v[i] = vi;
    g[i] = 0.0f;
  }
}

/* SGD over n elements (torch.optim.SGD, dampening 0):
 *   g += wd p; b = mu b + g; g = nesterov ? g + mu b : b; p += -lr g; grad = 0.
 * b == NULL: no momentum. */
PRMI_TARGET_CLONES
static void prmi_sgd_kernel(float *restrict p, float *restrict g, float *restrict b, uint64_t n,
                            float gscale, float wd, float mu, int nesterov, float neg_lr) {
  if (b == NULL) {
    for (uint64_t i = 0; i < n; i++) {
      float gi = gscale * g[i] + wd * p[i];
      p[i] = p[i] + neg_lr * gi;
      g[i] = 0.0f;
    }
  } else if (!nesterov) {
    for (uint64_t i = 0; i < n; i++) {
      float gi = gscale * g[i] + wd * p[i];
      float bi = b[i] * mu + gi;
      b[i] = bi;
      p[i] = p[i] + neg_lr * bi;
      g[i] = 0.0f;
    }
  } else {
    for (uint64_t i = 0; i < n; i++) {
      float gi = gscale * g[i] + wd * p[i];
      float bi = b[i] * mu + gi;
      b[i] = bi;
      p[i] = p[i] + neg_lr * (gi + mu * bi);
      g[i] = 0.0f;
    }
  }
}

/* ---- step ---------------------------------------------------------------------- */

/* Apply one update with the gradients in `grads`; see the order in prefrm.h. */
static int apply_update(prm_optimizer *opt, float *grads) {
  const prm_optimizer_options *o = &opt->opts;
  float *params = opt->model->params + opt->toff;

  double ss = prmi_sum_squares(grads, opt->n_params);
  if (!isfinite(ss)) {
    uint64_t bad = 0;
    while (bad < opt->n_params && isfinite(grads[bad]))
      bad++;
    return prmi_fail(opt->errmsg, PRM_ERR_NONFINITE_GRAD,
                     "prm_optimizer_step: non-finite gradient at parameter %llu; "
                     "nothing was updated",
                     (unsigned long long)bad);
  }
  double inv_k = 1.0 / (double)o->accumulation_steps;
  double norm = sqrt(ss) * inv_k;
  double clip = 1.0;
  if (o->max_grad_norm > 0.0) clip = fmin(1.0, o->max_grad_norm / (norm + 1e-6));
  double lr = scheduled_lr(o, opt->num_updates);
  float gscale = (float)(inv_k * clip);

  if (o->algorithm == PRM_OPT_SGD) {
    float mu = (float)o->momentum;
    float neg_lr = (float)(-lr);
    for (uint32_t s = 0; s < opt->n_segs; s++) {
      const opt_segment *sg = &opt->segs[s];
      float wd = sg->decay ? (float)o->weight_decay : 0.0f;
      prmi_sgd_kernel(params + sg->offset, grads + sg->offset, opt->m ? opt->m + sg->offset : NULL,
                      sg->numel, gscale, wd, mu, o->nesterov != 0, neg_lr);
    }
  } else {
    double step = (double)(opt->num_updates + 1);
    double bc1 = 1.0 - pow(o->beta1, step);
    double bc2 = 1.0 - pow(o->beta2, step);
    adam_coef c;
    c.gscale = gscale;
    c.w1 = (float)(1.0 - o->beta1);
    c.beta2 = (float)o->beta2;
    c.w2 = (float)(1.0 - o->beta2);
    c.bc2_sqrt = (float)sqrt(bc2);
    c.eps = (float)o->eps;
    c.neg_step = (float)(-(lr / bc1));
    for (uint32_t s = 0; s < opt->n_segs; s++) {
      const opt_segment *sg = &opt->segs[s];
      double wd = sg->decay ? o->weight_decay : 0.0;
      if (o->algorithm == PRM_OPT_ADAMW) {
        c.decay = (float)(1.0 - lr * wd);
        c.l2 = 0.0f;
      } else {
        c.decay = 1.0f;
        c.l2 = (float)wd;
      }
      prmi_adam_kernel(params + sg->offset, grads + sg->offset, opt->m + sg->offset,
                       opt->v + sg->offset, sg->numel, &c);
    }
  }
  opt->last_grad_norm = norm;
  opt->num_updates++;
  opt->micro = 0;
  return PRM_OK;
}

int prm_optimizer_step(prm_optimizer *opt, prm_ctx *ctx) {
  if (opt == NULL) return prmi_fail(NULL, PRM_ERR_NULL, "prm_optimizer_step: opt is NULL");
  if (ctx == NULL) return prmi_fail(opt->errmsg, PRM_ERR_NULL, "prm_optimizer_step: ctx is NULL");
  if (ctx->model != opt->model)
    return prmi_fail(opt->errmsg, PRM_ERR_MISMATCH,
                     "prm_optimizer_step: ctx belongs to another model than the optimizer");
  if (ctx->grads == NULL)
    return prmi_fail(opt->errmsg, PRM_ERR_STATE,
                     "prm_optimizer_step: ctx is an inference context (no gradients)");
  if (ctx->trainable_offset != opt->toff || opt->toff != opt->model->trainable_offset)
    return prmi_fail(opt->errmsg, PRM_ERR_MISMATCH,
                     "prm_optimizer_step: the model's trainable parameters changed since the "
                     "optimizer or the context was created");
  if (opt->micro + 1 < opt->opts.accumulation_steps) {
    opt->micro++;
    return PRM_OK;
  }
  return apply_update(opt, ctx->grads);
}

/* ---- queries ------------------------------------------------------------------ */

uint64_t prm_optimizer_num_updates(const prm_optimizer *opt) {
  return opt == NULL ? 0 : opt->num_updates;
}

double prm_optimizer_lr(const prm_optimizer *opt) {
  return opt == NULL ? 0.0 : scheduled_lr(&opt->opts, opt->num_updates);
}

double prm_optimizer_last_grad_norm(const prm_optimizer *opt) {
  return opt == NULL ? 0.0 : opt->last_grad_norm;
}

const char *prm_optimizer_errmsg(const prm_optimizer *opt) {
  return opt == NULL ? "" : opt->errmsg;
}

const prm_model *prmi_optimizer_model(const prm_optimizer *opt) { return opt->model; }

uint64_t prmi_optimizer_trainable_offset(const prm_optimizer *opt) { return opt->toff; }
