/*
 * optim.c - optimizers (SGD, Adam, AdamW), global gradient-norm clipping,
 * learning-rate schedules and gradient accumulation.
 *
 * The update formulas follow torch.optim.SGD / Adam / AdamW operation by
 * operation in fp32 (scalars computed in double, then rounded to float the way
 * PyTorch rounds a Python float scalar), so a run matches the PyTorch
 * reference to rounding. docs/optimizers.md has the formulas.
 *
 * An applied update costs three passes over the arena:
 *   1. sum of squares of the raw gradient in double: gives the global norm,
 *      and doubles as the NaN/Inf check (the sum is finite iff every gradient
 *      is: a float squared is below 1.2e77, so a double sum cannot overflow);
 *   2. a dry run of the update that writes nothing and only checks that every
 *      new parameter and moment is finite: finite gradients and options can
 *      still overflow float (a huge lr, a tiny eps, a huge gradient squared
 *      into v), and a step must never leave a non-finite parameter;
 *   3. one fused loop per segment: scale, decay, moments, parameter update
 *      and zeroing of the gradient -- the same arithmetic as pass 2 (one
 *      inline function), so what was checked is what gets written.
 * Nothing is allocated after prm_optimizer_new. The kernels are compiled per
 * ISA (PRMI_TARGET_CLONES) with identical results: elementwise arithmetic, no
 * FMA contraction, and a fixed order of the partial sums.
 */
#include <float.h>
#include <math.h>
#include <string.h>

#include "internal.h"

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

/* A double option that the kernels use as a float: finite after rounding. */
static int float_finite(double x) { return isfinite(x) && fabs(x) <= (double)FLT_MAX; }

/*
 * Check the options; PRM_OK or PRM_ERR_INVALID with a thread message naming
 * the field. Also
 * used for the options read from an optimizer state (optim_io.c). Every
 * option is checked in the precision the update uses: the kernels run in
 * float, so eps = 1e-50 (0 as a float) is refused, not only eps <= 0.
 */
int prmi_optimizer_validate(const prm_optimizer_options *o, const char *fn) {
  if (o->algorithm != PRM_OPT_SGD && o->algorithm != PRM_OPT_ADAM && o->algorithm != PRM_OPT_ADAMW)
    return prmi_fail(NULL, PRM_ERR_INVALID, "%s: unknown algorithm %d", fn, (int)o->algorithm);
  if (o->schedule != PRM_SCHED_CONSTANT && o->schedule != PRM_SCHED_LINEAR &&
      o->schedule != PRM_SCHED_COSINE)
    return prmi_fail(NULL, PRM_ERR_INVALID, "%s: unknown schedule %d", fn, (int)o->schedule);
  /* Written as !(ok) so that NaN fails every test. */
  if (!(float_finite(o->lr) && o->lr >= 0.0))
    return prmi_fail(NULL, PRM_ERR_INVALID, "%s: lr = %g must be >= 0 and finite as a float", fn,
                     o->lr);
  if (!(o->beta1 >= 0.0 && o->beta1 < 1.0))
    return prmi_fail(NULL, PRM_ERR_INVALID, "%s: beta1 = %g is outside [0, 1)", fn, o->beta1);
  if (!(o->beta2 >= 0.0 && o->beta2 < 1.0))
    return prmi_fail(NULL, PRM_ERR_INVALID, "%s: beta2 = %g is outside [0, 1)", fn, o->beta2);
  if (!(float_finite(o->eps) && (float)o->eps > 0.0f))
    return prmi_fail(NULL, PRM_ERR_INVALID,
                     "%s: eps = %g must be > 0 and finite as a float (the smallest is %g)", fn,
                     o->eps, (double)FLT_TRUE_MIN);
  if (!(float_finite(o->weight_decay) && o->weight_decay >= 0.0))
    return prmi_fail(NULL, PRM_ERR_INVALID, "%s: weight_decay = %g must be finite and >= 0", fn,
                     o->weight_decay);
  if (!(float_finite(o->momentum) && o->momentum >= 0.0))
    return prmi_fail(NULL, PRM_ERR_INVALID, "%s: momentum = %g must be finite and >= 0", fn,
                     o->momentum);
  if (o->nesterov != 0 && !(o->momentum > 0.0))
    return prmi_fail(NULL, PRM_ERR_INVALID, "%s: nesterov requires momentum > 0", fn);
  if (!(float_finite(o->max_grad_norm) && o->max_grad_norm >= 0.0))
    return prmi_fail(NULL, PRM_ERR_INVALID,
                     "%s: max_grad_norm = %g must be finite and >= 0 (0 = off)", fn,
                     o->max_grad_norm);
  if (o->accumulation_steps == 0)
    return prmi_fail(NULL, PRM_ERR_INVALID, "%s: accumulation_steps must be >= 1", fn);
  if (!(float_finite(o->min_lr) && o->min_lr >= 0.0))
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
  if (opt->segs == NULL) return prmi_fail(NULL, PRM_ERR_NOMEM, "optimizer: out of memory");
  uint64_t cursor = 0;
  for (uint32_t i = 0; i <= model->n_tensors; i++) {
    if (i < model->n_tensors && model->tensors[i].offset < opt->toff) continue; /* frozen */
    uint64_t off = (i < model->n_tensors ? model->tensors[i].offset : model->n_params) - opt->toff;
    uint64_t numel = i < model->n_tensors ? model->tensors[i].numel : 0;
    if (off < cursor || numel > opt->n_params - off)
      return prmi_fail(NULL, PRM_ERR_INVALID, "optimizer: model tensor %u lies outside the arena",
                       (unsigned)i);
    prmi_opt_segment run[2] = {{cursor, off - cursor, 1}, {off, numel, 1}};
    if (i < model->n_tensors)
      run[1].decay = !(opt->opts.no_decay_1d != 0 && model->tensors[i].ndim == 1);
    for (int r = 0; r < 2; r++) {
      if (run[r].numel == 0) continue;
      prmi_opt_segment *last = opt->n_segs > 0 ? &opt->segs[opt->n_segs - 1] : NULL;
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
  prmi_errslot_destroy(&opt->err);
  prmi_free(opt);
}

int prmi_opt_record(const prm_optimizer *opt, int status) {
  return opt != NULL ? prmi_errslot_record(&opt->err, status) : status;
}

int prmi_optimizer_alloc(prm_optimizer **out, prm_model *model, const prm_optimizer_options *o,
                         const char *fn) {
  *out = NULL;
  prm_optimizer *opt = prmi_calloc(1, sizeof *opt);
  if (opt == NULL || prmi_errslot_init(&opt->err) != PRM_OK) {
    prmi_free(opt);
    return prmi_model_record(model, prmi_fail(NULL, PRM_ERR_NOMEM, "%s: out of memory", fn));
  }
  opt->lr_scale = 1.0;
  opt->model = model;
  opt->opts = *o;
  opt->toff = model->trainable_offset;
  opt->n_params = model->n_params - opt->toff;
  int rc = build_segments(opt);
  if (rc != PRM_OK) {
    prm_optimizer_free(opt);
    return prmi_model_record(model, rc);
  }
  /* State only for the algorithm that needs it (zero-initialised, which is
   * also exactly PyTorch's first step: b = mu*0 + g = g, m = 0 + (1-b1) g). */
  int need_m = o->algorithm != PRM_OPT_SGD || o->momentum > 0.0;
  int need_v = o->algorithm != PRM_OPT_SGD;
  if (need_m) opt->m = prmi_calloc(opt->n_params, sizeof(float));
  if (need_v) opt->v = prmi_calloc(opt->n_params, sizeof(float));
  if ((need_m && opt->m == NULL) || (need_v && opt->v == NULL)) {
    const uint64_t np = opt->n_params;
    prm_optimizer_free(opt);
    return prmi_model_record(
        model, prmi_fail(NULL, PRM_ERR_NOMEM,
                         "%s: cannot allocate %.1f MiB for the moments of %llu parameters", fn,
                         (double)((need_m + need_v) * np * sizeof(float)) / 1048576.0,
                         (unsigned long long)np));
  }
  *out = opt;
  return PRM_OK;
}

int prm_optimizer_new(prm_optimizer **out, prm_model *model, const prm_optimizer_options *opts) {
  if (out == NULL)
    return prmi_model_record(model,
                             prmi_fail(NULL, PRM_ERR_NULL, "prm_optimizer_new: out is NULL"));
  *out = NULL;
  if (model == NULL) return prmi_fail(NULL, PRM_ERR_NULL, "prm_optimizer_new: model is NULL");
  /* From here on failures also go to the model's message: the call takes
   * the model non-const, and a host that checks prm_model_errmsg finds why. */
  int rc = prmi_check_version(NULL, opts, PRM_OPTIMIZER_OPTIONS_VERSION,
                              "prm_optimizer_new: prm_optimizer_options");
  if (rc != PRM_OK) return prmi_model_record(model, rc);
  /* Fields a caller's older struct version lacks keep their defaults. */
  prm_optimizer_options o = PRM_OPTIMIZER_OPTIONS_INIT;
  memcpy(&o, opts, options_size(opts->version));
  o.version = PRM_OPTIMIZER_OPTIONS_VERSION;
  rc = prmi_optimizer_validate(&o, "prm_optimizer_new");
  if (rc != PRM_OK) return prmi_model_record(model, rc);
  return prmi_optimizer_alloc(out, model, &o, "prm_optimizer_new");
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

/* The rate of the next update: the schedule times prm_optimizer_set_lr_scale's
 * factor (1 unless set: x * 1.0 is x, so runs that never set it are
 * unchanged bit for bit). */
static double effective_lr(const prm_optimizer *opt) {
  return scheduled_lr(&opt->opts, opt->num_updates) * opt->lr_scale;
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

/* Magnitude bits of a float: finite iff below 0x7f800000. */
static inline uint32_t mag_bits(float x) {
  uint32_t u;
  memcpy(&u, &x, sizeof u);
  return u & 0x7fffffffu;
}

/* One element of Adam(W), PyTorch's operation order:
 *   p *= decay; g += l2 p; m = lerp(m, g, 1-b1); v = v b2 + (1-b2) g g;
 *   p += -step * m / (sqrt(v)/bc2_sqrt + eps) */
static inline void adam_elem(float p, float g, float m, float v, const adam_coef *c, float *po,
                             float *mo, float *vo) {
  float pi = p * c->decay;
  float gi = c->gscale * g + c->l2 * pi;
  float mi = m + c->w1 * (gi - m);
  float vi = v * c->beta2 + c->w2 * gi * gi;
  float denom = sqrtf(vi) / c->bc2_sqrt + c->eps;
  *po = pi + c->neg_step * mi / denom;
  *mo = mi;
  *vo = vi;
}

/* Pass 2 for Adam(W): 1 when the update of these n elements leaves every
 * parameter and moment finite. Writes nothing. */
PRMI_TARGET_CLONES
static int prmi_adam_check(const float *restrict p, const float *restrict g,
                           const float *restrict m, const float *restrict v, uint64_t n,
                           const adam_coef *c) {
  const adam_coef k = *c;
  uint32_t mx = 0;
  for (uint64_t i = 0; i < n; i++) {
    float po, mo, vo;
    adam_elem(p[i], g[i], m[i], v[i], &k, &po, &mo, &vo);
    uint32_t a = mag_bits(po), b = mag_bits(mo), d = mag_bits(vo);
    a = a > b ? a : b; /* a max, not an OR: OR-ing finite patterns can */
    a = a > d ? a : d; /* set every exponent bit */
    mx = a > mx ? a : mx;
  }
  return mx < 0x7f800000u;
}

/* Pass 3 for Adam(W): the update, and grad = 0. Vectorises only with
 * -fno-math-errno (else sqrtf may set errno). */
PRMI_TARGET_CLONES
static void prmi_adam_kernel(float *restrict p, float *restrict g, float *restrict m,
                             float *restrict v, uint64_t n, const adam_coef *c) {
  const adam_coef k = *c;
  for (uint64_t i = 0; i < n; i++) {
    adam_elem(p[i], g[i], m[i], v[i], &k, &p[i], &m[i], &v[i]);
    g[i] = 0.0f;
  }
}

/* Per-update fp32 coefficients of SGD. */
typedef struct sgd_coef {
  float gscale, wd, mu, neg_lr;
} sgd_coef;

/* One element of SGD (torch.optim.SGD, dampening 0):
 *   g += wd p; b = mu b + g; g = nesterov ? g + mu b : b; p += -lr g.
 * momentum 0: b is unused (*bo = 0). The branches on the loop-invariant
 * `momentum` and `nesterov` are hoisted by the compiler. */
static inline void sgd_elem(float p, float g, float b, const sgd_coef *c, int momentum,
                            int nesterov, float *po, float *bo) {
  float gi = c->gscale * g + c->wd * p;
  if (!momentum) {
    *po = p + c->neg_lr * gi;
    *bo = 0.0f;
    return;
  }
  float bi = b * c->mu + gi;
  *bo = bi;
  *po = p + c->neg_lr * (nesterov ? gi + c->mu * bi : bi);
}

/* Pass 2 for SGD (b NULL: no momentum): 1 when every new parameter and
 * momentum value is finite. Writes nothing. */
PRMI_TARGET_CLONES
static int prmi_sgd_check(const float *restrict p, const float *restrict g, const float *restrict b,
                          uint64_t n, const sgd_coef *c, int nesterov) {
  const sgd_coef k = *c;
  uint32_t mx = 0;
  for (uint64_t i = 0; i < n; i++) {
    float po, bo;
    sgd_elem(p[i], g[i], b != NULL ? b[i] : 0.0f, &k, b != NULL, nesterov, &po, &bo);
    uint32_t a = mag_bits(po), e = mag_bits(bo);
    a = a > e ? a : e;
    mx = a > mx ? a : mx;
  }
  return mx < 0x7f800000u;
}

/* Pass 3 for SGD: the update, and grad = 0. */
PRMI_TARGET_CLONES
static void prmi_sgd_kernel(float *restrict p, float *restrict g, float *restrict b, uint64_t n,
                            const sgd_coef *c, int nesterov) {
  const sgd_coef k = *c;
  if (b == NULL) {
    for (uint64_t i = 0; i < n; i++) {
      float bo;
      sgd_elem(p[i], g[i], 0.0f, &k, 0, 0, &p[i], &bo);
      g[i] = 0.0f;
    }
  } else {
    for (uint64_t i = 0; i < n; i++) {
      sgd_elem(p[i], g[i], b[i], &k, 1, nesterov, &p[i], &b[i]);
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
    return prmi_fail(NULL, PRM_ERR_NONFINITE_GRAD,
                     "prm_optimizer_step: non-finite gradient at parameter %llu; "
                     "nothing was updated",
                     (unsigned long long)(opt->toff + bad));
  }
  double inv_k = 1.0 / (double)o->accumulation_steps;
  double norm = sqrt(ss) * inv_k;
  double clip = 1.0;
  if (o->max_grad_norm > 0.0) clip = fmin(1.0, o->max_grad_norm / (norm + 1e-6));
  double lr = effective_lr(opt);
  float gscale = (float)(inv_k * clip);

  /* Coefficients per segment (they differ only in weight decay). */
  sgd_coef sc = {gscale, 0.0f, (float)o->momentum, (float)(-lr)};
  adam_coef ac;
  if (o->algorithm != PRM_OPT_SGD) {
    double step = (double)(opt->num_updates + 1);
    double bc1 = 1.0 - pow(o->beta1, step);
    double bc2 = 1.0 - pow(o->beta2, step);
    ac.gscale = gscale;
    ac.w1 = (float)(1.0 - o->beta1);
    ac.beta2 = (float)o->beta2;
    ac.w2 = (float)(1.0 - o->beta2);
    ac.bc2_sqrt = (float)sqrt(bc2);
    ac.eps = (float)o->eps;
    ac.neg_step = (float)(-(lr / bc1));
  }
  /* pass 2 (check, write == 0), then pass 3 (write == 1) */
  for (int write = 0; write < 2; write++) {
    for (uint32_t s = 0; s < opt->n_segs; s++) {
      const prmi_opt_segment *sg = &opt->segs[s];
      const double wd = sg->decay ? o->weight_decay : 0.0;
      float *p = params + sg->offset, *g = grads + sg->offset;
      int ok = 1;
      if (o->algorithm == PRM_OPT_SGD) {
        float *b = opt->m ? opt->m + sg->offset : NULL;
        sc.wd = (float)wd;
        if (write)
          prmi_sgd_kernel(p, g, b, sg->numel, &sc, o->nesterov != 0);
        else
          ok = prmi_sgd_check(p, g, b, sg->numel, &sc, o->nesterov != 0);
      } else {
        if (o->algorithm == PRM_OPT_ADAMW) {
          ac.decay = (float)(1.0 - lr * wd);
          ac.l2 = 0.0f;
        } else {
          ac.decay = 1.0f;
          ac.l2 = (float)wd;
        }
        float *m = opt->m + sg->offset, *v = opt->v + sg->offset;
        if (write)
          prmi_adam_kernel(p, g, m, v, sg->numel, &ac);
        else
          ok = prmi_adam_check(p, g, m, v, sg->numel, &ac);
      }
      if (!ok)
        return prmi_fail(NULL, PRM_ERR_NONFINITE_GRAD,
                         "prm_optimizer_step: the update would overflow a parameter or moment "
                         "to Inf/NaN in parameters [%llu, %llu) (lr %g; gradient norm %g); "
                         "nothing was updated",
                         (unsigned long long)(opt->toff + sg->offset),
                         (unsigned long long)(opt->toff + sg->offset + sg->numel), lr, norm);
    }
  }
  opt->last_grad_norm = norm;
  opt->num_updates++;
  opt->micro = 0;
  return PRM_OK;
}

static int step(prm_optimizer *opt, prm_ctx *ctx) {
  if (ctx == NULL) return prmi_fail(NULL, PRM_ERR_NULL, "prm_optimizer_step: ctx is NULL");
  if (ctx->model != opt->model)
    return prmi_fail(NULL, PRM_ERR_MISMATCH,
                     "prm_optimizer_step: ctx belongs to another model than the optimizer");
  if (ctx->grads == NULL)
    return prmi_fail(NULL, PRM_ERR_STATE,
                     "prm_optimizer_step: ctx is an inference context (no gradients)");
  if (ctx->trainable_offset != opt->toff || opt->toff != opt->model->trainable_offset)
    return prmi_fail(NULL, PRM_ERR_MISMATCH,
                     "prm_optimizer_step: the model's trainable parameters changed since the "
                     "optimizer or the context was created");
  if (opt->micro + 1 < opt->opts.accumulation_steps) {
    opt->micro++;
    return PRM_OK;
  }
  return apply_update(opt, ctx->grads);
}

int prm_optimizer_step(prm_optimizer *opt, prm_ctx *ctx) {
  if (opt == NULL)
    return prmi_ctx_record(ctx, prmi_fail(NULL, PRM_ERR_NULL, "prm_optimizer_step: opt is NULL"));
  int rc = step(opt, ctx);
  if (rc != PRM_OK) prmi_ctx_record(ctx, prmi_opt_record(opt, rc));
  return rc;
}

/* ---- learning rate ------------------------------------------------------------ */

/* Checks shared by prm_optimizer_set_lr and prm_optimizer_set_lr_scale (and
 * the loader): base lr and scale as the options require, and a peak
 * effective rate lr * scale that stays finite as a float (the schedule
 * never exceeds lr: warm-up rises to it, decays fall from it). */
int prmi_optimizer_check_lr(const prm_optimizer_options *o, double lr, double scale,
                            const char *fn) {
  if (!(float_finite(lr) && lr >= 0.0))
    return prmi_fail(NULL, PRM_ERR_INVALID, "%s: lr = %g must be >= 0 and finite as a float", fn,
                     lr);
  if ((o->schedule == PRM_SCHED_LINEAR || o->schedule == PRM_SCHED_COSINE) && o->min_lr > lr)
    return prmi_fail(NULL, PRM_ERR_INVALID,
                     "%s: lr = %g is below min_lr = %g, the floor of the %s decay", fn, lr,
                     o->min_lr, o->schedule == PRM_SCHED_LINEAR ? "linear" : "cosine");
  if (!(isfinite(scale) && scale >= 0.0))
    return prmi_fail(NULL, PRM_ERR_INVALID, "%s: lr scale = %g must be finite and >= 0", fn, scale);
  if (!float_finite(lr * scale))
    return prmi_fail(NULL, PRM_ERR_INVALID,
                     "%s: lr %g times scale %g = %g is not finite as a float", fn, lr, scale,
                     lr * scale);
  return PRM_OK;
}

int prm_optimizer_set_lr(prm_optimizer *opt, double lr) {
  if (opt == NULL) return prmi_fail(NULL, PRM_ERR_NULL, "prm_optimizer_set_lr: opt is NULL");
  int rc = prmi_optimizer_check_lr(&opt->opts, lr, opt->lr_scale, "prm_optimizer_set_lr");
  if (rc != PRM_OK) return prmi_opt_record(opt, rc);
  opt->opts.lr = lr;
  return PRM_OK;
}

int prm_optimizer_set_lr_scale(prm_optimizer *opt, double scale) {
  if (opt == NULL) return prmi_fail(NULL, PRM_ERR_NULL, "prm_optimizer_set_lr_scale: opt is NULL");
  int rc = prmi_optimizer_check_lr(&opt->opts, opt->opts.lr, scale, "prm_optimizer_set_lr_scale");
  if (rc != PRM_OK) return prmi_opt_record(opt, rc);
  opt->lr_scale = scale;
  return PRM_OK;
}

/* ---- queries ------------------------------------------------------------------ */

uint64_t prm_optimizer_num_updates(const prm_optimizer *opt) {
  return opt == NULL ? 0 : opt->num_updates;
}

double prm_optimizer_lr(const prm_optimizer *opt) { return opt == NULL ? 0.0 : effective_lr(opt); }

double prm_optimizer_lr_scale(const prm_optimizer *opt) {
  return opt == NULL ? 0.0 : opt->lr_scale;
}

double prm_optimizer_last_grad_norm(const prm_optimizer *opt) {
  return opt == NULL ? 0.0 : opt->last_grad_norm;
}

const char *prm_optimizer_errmsg(const prm_optimizer *opt) {
  return opt == NULL ? "" : prmi_errslot_read(&opt->err, PRMI_ERRSLOT_OPTIMIZER);
}

const prm_model *prmi_optimizer_model(const prm_optimizer *opt) { return opt->model; }

uint64_t prmi_optimizer_trainable_offset(const prm_optimizer *opt) { return opt->toff; }
