/*
 * test_optim.c - optimizers: SGD / Adam / AdamW against double-precision
 * reference implementations written here, weight-decay conventions, clipping,
 * schedules, accumulation, the NaN policy, and every error path.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
/* cmocka.h needs the three headers above first */
#include <cmocka.h>

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "testutil.h"

static const double PI = 3.14159265358979323846;

/* ---- helpers ---------------------------------------------------------------- */

static prm_optimizer_options default_opts(void) {
  prm_optimizer_options o;
  assert_int_equal(prm_optimizer_options_init(&o, PRM_OPTIMIZER_OPTIONS_VERSION), PRM_OK);
  return o;
}

static prm_optimizer *make_opt(prm_model *m, const prm_optimizer_options *o) {
  prm_optimizer *opt = NULL;
  int rc = prm_optimizer_new(&opt, m, o);
  if (rc != PRM_OK)
    fail_msg("prm_optimizer_new: %s (%s)", prm_status_string(rc), prm_last_errmsg());
  return opt;
}

static prm_model *small_mlp(uint64_t seed) {
  static const uint64_t hidden[2] = {5, 3};
  return prmt_mlp(4, hidden, 2, PRM_ACT_TANH, seed);
}

/* Per-element flag: 1 when the element belongs to a 1-D tensor. */
static int *one_d_mask(const prm_model *m) {
  uint64_t n = prm_model_num_params(m);
  int *mask = calloc(n, sizeof *mask);
  assert_non_null(mask);
  for (uint32_t t = 0; t < prm_model_num_tensors(m); t++) {
    uint64_t off, shape[2];
    uint32_t ndim;
    assert_int_equal(prm_model_tensor_info(m, t, NULL, &off, &ndim, shape), PRM_OK);
    uint64_t numel = ndim == 2 ? shape[0] * shape[1] : shape[0];
    for (uint64_t i = 0; i < numel; i++)
      mask[off + i] = ndim == 1;
  }
  return mask;
}

static void assert_close(double got, double want, double rtol, double atol, const char *what,
                         uint64_t i) {
  if (!(fabs(got - want) <= atol + rtol * fabs(want)))
    fail_msg("%s[%llu]: got %.9g want %.9g", what, (unsigned long long)i, got, want);
}

/* ---- double-precision reference optimizer --------------------------------------- */

typedef struct ref_opt {
  prm_optimizer_options o;
  uint64_t n, t;
  double *p, *m, *v;
  const int *one_d; /* may be NULL */
} ref_opt;

static void ref_init(ref_opt *r, const prm_optimizer_options *o, const float *params, uint64_t n,
                     const int *one_d) {
  r->o = *o;
  r->n = n;
  r->t = 0;
  r->p = calloc(n, sizeof(double));
  r->m = calloc(n, sizeof(double));
  r->v = calloc(n, sizeof(double));
  assert_true(r->p && r->m && r->v);
  for (uint64_t i = 0; i < n; i++)
    r->p[i] = params[i];
  r->one_d = one_d;
}

static void ref_free(ref_opt *r) {
  free(r->p);
  free(r->m);
  free(r->v);
}

/* Textbook update with gradient g (already scaled/clipped) and learning rate lr. */
static void ref_update(ref_opt *r, const double *g, double lr) {
  const prm_optimizer_options *o = &r->o;
  r->t++;
  double bc1 = 1.0 - pow(o->beta1, (double)r->t), bc2 = 1.0 - pow(o->beta2, (double)r->t);
  for (uint64_t i = 0; i < r->n; i++) {
    double wd = (o->no_decay_1d && r->one_d && r->one_d[i]) ? 0.0 : o->weight_decay;
    double p = r->p[i], gi = g[i];
    switch (o->algorithm) {
    case PRM_OPT_SGD:
      gi += wd * p;
      if (o->momentum > 0) {
        r->m[i] = r->t == 1 ? gi : o->momentum * r->m[i] + gi;
        gi = o->nesterov ? gi + o->momentum * r->m[i] : r->m[i];
      }
      p -= lr * gi;
      break;
    case PRM_OPT_ADAM:
    case PRM_OPT_ADAMW:
      if (o->algorithm == PRM_OPT_ADAMW)
        p *= 1.0 - lr * wd;
      else
        gi += wd * p;
      r->m[i] = o->beta1 * r->m[i] + (1 - o->beta1) * gi;
      r->v[i] = o->beta2 * r->v[i] + (1 - o->beta2) * gi * gi;
      p -= lr * (r->m[i] / bc1) / (sqrt(r->v[i] / bc2) + o->eps);
      break;
    default: fail();
    }
    r->p[i] = p;
  }
}

/* Run `steps` updates of the library and the reference with the same random
 * gradients; compare parameters after each. */
static void check_against_reference(prm_model *m, const prm_optimizer_options *o, int steps,
                                    double rtol) {
  uint64_t n;
  float *params = prm_model_params(m, &n);
  int *mask = one_d_mask(m);
  prm_ctx *ctx = prmt_ctx(m, 2, 0);
  prm_optimizer *opt = make_opt(m, o);
  ref_opt r;
  ref_init(&r, o, params, n, mask);
  double *g = calloc(n, sizeof *g);
  assert_non_null(g);
  prmt_rng rng = {42};
  for (int s = 0; s < steps; s++) {
    float *grads = prm_ctx_grads(ctx, NULL);
    prmt_fill_normal(&rng, grads, n, 1.0);
    for (uint64_t i = 0; i < n; i++)
      g[i] = grads[i];
    assert_int_equal(prm_optimizer_step(opt, ctx), PRM_OK);
    ref_update(&r, g, o->lr);
    for (uint64_t i = 0; i < n; i++) {
      /* absolute part: a few fp32 ulps at the parameter scale (~0.5), for
       * parameters that pass near zero */
      assert_close(params[i], r.p[i], rtol, 2e-7, "param", i);
      assert_true(grads[i] == 0.0f);
    }
  }
  assert_int_equal(prm_optimizer_num_updates(opt), (uint64_t)steps);
  free(g);
  ref_free(&r);
  free(mask);
  prm_optimizer_free(opt);
  prm_ctx_free(ctx);
}

/* ---- options and errors ------------------------------------------------------------- */

static void test_options_init(void **state) {
  (void)state;
  prm_optimizer_options o;
  memset(&o, 0xab, sizeof o);
  assert_int_equal(prm_optimizer_options_init(&o, PRM_OPTIMIZER_OPTIONS_VERSION), PRM_OK);
  prm_optimizer_options d = PRM_OPTIMIZER_OPTIONS_INIT;
  assert_int_equal(o.version, PRM_OPTIMIZER_OPTIONS_VERSION);
  assert_int_equal(o.algorithm, PRM_OPT_ADAMW);
  assert_true(o.lr == 1e-3 && o.beta1 == 0.9 && o.beta2 == 0.999 && o.eps == 1e-8);
  assert_true(o.weight_decay == 0.0 && o.momentum == 0.0 && o.max_grad_norm == 0.0);
  assert_int_equal(o.schedule, PRM_SCHED_CONSTANT);
  assert_int_equal(o.accumulation_steps, 1);
  assert_int_equal(o.nesterov, 0);
  assert_int_equal(o.no_decay_1d, 0);
  assert_int_equal(o.warmup_steps, 0);
  assert_int_equal(o.total_steps, 0);
  assert_true(o.min_lr == 0.0);
  assert_memory_equal(&o, &d, sizeof o);

  assert_int_equal(prm_optimizer_options_init(NULL, PRM_OPTIMIZER_OPTIONS_VERSION), PRM_ERR_NULL);
  assert_true(strlen(prm_last_errmsg()) > 0);
  assert_int_equal(prm_optimizer_options_init(&o, 0), PRM_ERR_VERSION);
  assert_int_equal(prm_optimizer_options_init(&o, PRM_OPTIMIZER_OPTIONS_VERSION + 1),
                   PRM_ERR_VERSION);
}

enum { N_BAD = 25 };

/* Make option set `which` invalid; returns a label for failure messages. */
static const char *make_bad(prm_optimizer_options *o, int which) {
  switch (which) {
  case 0: o->algorithm = 0; return "algorithm 0";
  case 1: o->algorithm = 4; return "algorithm 4";
  case 2: o->schedule = 0; return "schedule 0";
  case 3: o->schedule = 99; return "schedule 99";
  case 4: o->lr = -1e-3; return "lr < 0";
  case 5: o->lr = NAN; return "lr NaN";
  case 6: o->lr = INFINITY; return "lr Inf";
  case 7: o->beta1 = -0.1; return "beta1 < 0";
  case 8: o->beta1 = 1.0; return "beta1 = 1";
  case 9: o->beta2 = 1.0; return "beta2 = 1";
  case 10: o->beta2 = NAN; return "beta2 NaN";
  case 11: o->eps = 0.0; return "eps 0";
  case 12: o->eps = -1e-8; return "eps < 0";
  case 13: o->weight_decay = -0.01; return "weight_decay < 0";
  case 14:
    o->algorithm = PRM_OPT_SGD;
    o->momentum = -0.5;
    return "momentum < 0";
  case 15:
    o->algorithm = PRM_OPT_SGD;
    o->nesterov = 1;
    return "nesterov without momentum";
  case 16: o->max_grad_norm = -1.0; return "max_grad_norm < 0";
  case 17: o->max_grad_norm = INFINITY; return "max_grad_norm Inf";
  case 18: o->accumulation_steps = 0; return "accumulation_steps 0";
  case 19: o->schedule = PRM_SCHED_LINEAR; return "linear without total_steps";
  case 20: o->schedule = PRM_SCHED_COSINE; return "cosine without total_steps";
  case 21:
    o->schedule = PRM_SCHED_LINEAR;
    o->total_steps = 10;
    o->warmup_steps = 11;
    return "warmup > total";
  case 22: o->min_lr = -1e-5; return "min_lr < 0";
  case 23:
    o->schedule = PRM_SCHED_COSINE;
    o->total_steps = 10;
    o->min_lr = 1.0;
    return "min_lr > lr";
  case 24: o->weight_decay = NAN; return "weight_decay NaN";
  default: fail(); return "";
  }
}

static void test_new_errors(void **state) {
  (void)state;
  prm_model *m = prmt_linear(3, 1);
  prm_optimizer_options o = default_opts();
  prm_optimizer *opt = (prm_optimizer *)&o; /* any non-NULL value: must be reset */

  assert_int_equal(prm_optimizer_new(NULL, m, &o), PRM_ERR_NULL);
  assert_int_equal(prm_optimizer_new(&opt, NULL, &o), PRM_ERR_NULL);
  assert_null(opt);
  opt = (prm_optimizer *)&o;
  assert_int_equal(prm_optimizer_new(&opt, m, NULL), PRM_ERR_NULL);
  assert_null(opt);
  o.version = 0;
  opt = (prm_optimizer *)&o;
  assert_int_equal(prm_optimizer_new(&opt, m, &o), PRM_ERR_VERSION);
  assert_null(opt);
  o.version = PRM_OPTIMIZER_OPTIONS_VERSION + 1;
  assert_int_equal(prm_optimizer_new(&opt, m, &o), PRM_ERR_VERSION);
  assert_null(opt);

  for (int which = 0; which < N_BAD; which++) {
    o = default_opts();
    const char *label = make_bad(&o, which);
    opt = (prm_optimizer *)&o;
    int rc = prm_optimizer_new(&opt, m, &o);
    if (rc != PRM_ERR_INVALID) fail_msg("%s: got %s", label, prm_status_string(rc));
    assert_null(opt);
    assert_true(strlen(prm_last_errmsg()) > 0);
  }

  /* Boundary values that are valid. */
  o = default_opts();
  o.beta1 = 0.0;
  o.beta2 = 0.0;
  o.lr = 0.0;
  opt = make_opt(m, &o);
  prm_optimizer_free(opt);
  o = default_opts();
  o.schedule = PRM_SCHED_LINEAR;
  o.warmup_steps = o.total_steps = 5;
  opt = make_opt(m, &o);
  prm_optimizer_free(opt);
  o = default_opts();
  o.warmup_steps = 7; /* constant: total_steps unused */
  opt = make_opt(m, &o);
  prm_optimizer_free(opt);
  prm_optimizer_free(NULL);
  prm_model_free(m);
}

static void test_step_errors(void **state) {
  (void)state;
  prm_model *m = prmt_linear(3, 1);
  prm_model *other = prmt_linear(3, 1);
  prm_ctx *ctx = prmt_ctx(m, 2, 0);
  prm_ctx *ictx = prmt_ctx(m, 2, 1);
  prm_ctx *octx = prmt_ctx(other, 2, 0);
  prm_optimizer_options o = default_opts();
  prm_optimizer *opt = make_opt(m, &o);
  assert_string_equal(prm_optimizer_errmsg(opt), "");

  assert_int_equal(prm_optimizer_step(NULL, ctx), PRM_ERR_NULL);
  assert_int_equal(prm_optimizer_step(opt, NULL), PRM_ERR_NULL);
  assert_true(strlen(prm_optimizer_errmsg(opt)) > 0);
  assert_int_equal(prm_optimizer_step(opt, octx), PRM_ERR_MISMATCH);
  assert_non_null(strstr(prm_optimizer_errmsg(opt), "model"));
  assert_int_equal(prm_optimizer_step(opt, ictx), PRM_ERR_STATE);
  assert_non_null(strstr(prm_optimizer_errmsg(opt), "inference"));
  assert_string_equal(prm_last_errmsg(), prm_optimizer_errmsg(opt));
  assert_int_equal(prm_optimizer_num_updates(opt), 0);

  /* NULL queries */
  assert_int_equal(prm_optimizer_num_updates(NULL), 0);
  assert_true(prm_optimizer_lr(NULL) == 0.0);
  assert_true(prm_optimizer_last_grad_norm(NULL) == 0.0);
  assert_string_equal(prm_optimizer_errmsg(NULL), "");
  assert_true(prm_optimizer_last_grad_norm(opt) == 0.0);
  assert_true(prm_optimizer_lr(opt) == 1e-3);

  prm_optimizer_free(opt);
  prm_ctx_free(ctx);
  prm_ctx_free(ictx);
  prm_ctx_free(octx);
  prm_model_free(m);
  prm_model_free(other);
}

/* ---- algorithms against the reference ------------------------------------------------ */

static void test_sgd_reference(void **state) {
  (void)state;
  prm_model *m = small_mlp(3);
  prm_optimizer_options o = default_opts();
  o.algorithm = PRM_OPT_SGD;
  o.lr = 0.05;
  check_against_reference(m, &o, 6, 1e-6); /* plain */
  o.weight_decay = 0.1;
  o.momentum = 0.9;
  check_against_reference(m, &o, 6, 1e-6); /* heavy ball + L2 */
  o.nesterov = 1;
  o.no_decay_1d = 1;
  check_against_reference(m, &o, 6, 1e-6); /* Nesterov, biases undecayed */
  prm_model_free(m);
}

static void test_adam_reference(void **state) {
  (void)state;
  prm_model *m = small_mlp(4);
  prm_optimizer_options o = default_opts();
  o.algorithm = PRM_OPT_ADAM;
  o.lr = 0.01;
  check_against_reference(m, &o, 8, 1e-6);
  o.weight_decay = 0.05;
  o.beta1 = 0.8;
  o.beta2 = 0.95;
  check_against_reference(m, &o, 8, 1e-6);
  o.no_decay_1d = 1;
  check_against_reference(m, &o, 8, 1e-6);
  prm_model_free(m);
}

static void test_adamw_reference(void **state) {
  (void)state;
  prm_model *m = small_mlp(5);
  prm_optimizer_options o = default_opts();
  o.lr = 0.01;
  o.weight_decay = 0.1;
  check_against_reference(m, &o, 8, 1e-6);
  o.no_decay_1d = 1;
  o.eps = 1e-6;
  check_against_reference(m, &o, 8, 1e-6);
  prm_model_free(m);
}

/* AdamW with a constant gradient moves each parameter by lr * sign(g) per step
 * (m_hat = g, v_hat = g^2) after the decoupled decay p *= 1 - lr wd. */
static void test_adamw_known_values(void **state) {
  (void)state;
  prm_model *m = prmt_linear(2, 1);
  prm_ctx *ctx = prmt_ctx(m, 2, 0);
  float *p = prm_model_params(m, NULL);
  float *g = prm_ctx_grads(ctx, NULL);
  p[0] = 1.0f;
  p[1] = -2.0f;
  prm_optimizer_options o = default_opts();
  o.lr = 0.1;
  o.weight_decay = 0.01;
  prm_optimizer *opt = make_opt(m, &o);
  g[0] = 0.5f;
  g[1] = 0.1f;
  assert_int_equal(prm_optimizer_step(opt, ctx), PRM_OK);
  /* 1 * 0.999 - 0.1 = 0.899; -2 * 0.999 - 0.1 = -2.098 */
  assert_float_equal(p[0], 0.899, 1e-6);
  assert_float_equal(p[1], -2.098, 1e-6);
  assert_true(g[0] == 0.0f && g[1] == 0.0f);
  assert_float_equal(prm_optimizer_last_grad_norm(opt), sqrt(0.26), 1e-7);
  g[0] = 0.5f;
  g[1] = 0.1f;
  assert_int_equal(prm_optimizer_step(opt, ctx), PRM_OK);
  /* 0.899 * 0.999 - 0.1 = 0.798101; -2.098 * 0.999 - 0.1 = -2.195902 */
  assert_float_equal(p[0], 0.798101, 1e-6);
  assert_float_equal(p[1], -2.195902, 1e-6);
  assert_int_equal(prm_optimizer_num_updates(opt), 2);
  prm_optimizer_free(opt);
  prm_ctx_free(ctx);
  prm_model_free(m);
}

/* With zero gradients AdamW changes parameters only through decay: weights
 * shrink by 1 - lr wd, and with no_decay_1d the biases stay bit-identical. */
static void test_no_decay_1d(void **state) {
  (void)state;
  for (int nd = 0; nd <= 1; nd++) {
    prm_model *m = small_mlp(6);
    prm_ctx *ctx = prmt_ctx(m, 2, 0);
    uint64_t n;
    float *p = prm_model_params(m, &n);
    float *before = malloc(n * sizeof *before);
    assert_non_null(before);
    memcpy(before, p, n * sizeof *p);
    int *mask = one_d_mask(m);
    prm_optimizer_options o = default_opts();
    o.lr = 0.1;
    o.weight_decay = 0.5;
    o.no_decay_1d = nd;
    prm_optimizer *opt = make_opt(m, &o);
    assert_int_equal(prm_optimizer_step(opt, ctx), PRM_OK);
    int n_bias = 0;
    for (uint64_t i = 0; i < n; i++) {
      if (nd && mask[i]) {
        assert_true(p[i] == before[i]);
        n_bias++;
      } else {
        assert_float_equal(p[i], before[i] * 0.95, 1e-7);
      }
    }
    assert_int_equal(n_bias, nd ? 5 + 3 : 0);
    free(mask);
    free(before);
    prm_optimizer_free(opt);
    prm_ctx_free(ctx);
    prm_model_free(m);
  }
}

/* ---- clipping --------------------------------------------------------------------- */

static void test_clipping(void **state) {
  (void)state;
  prm_model *m = prmt_linear(4, 2);
  prm_ctx *ctx = prmt_ctx(m, 2, 0);
  float *p = prm_model_params(m, NULL);
  float *g = prm_ctx_grads(ctx, NULL);
  prm_optimizer_options o = default_opts();
  o.algorithm = PRM_OPT_SGD;
  o.lr = 1.0;
  o.max_grad_norm = 1.0;
  prm_optimizer *opt = make_opt(m, &o);
  const float gv[4] = {3.0f, 0.0f, -4.0f, 0.0f}; /* norm 5 */
  float before[4];

  memcpy(before, p, sizeof before);
  memcpy(g, gv, sizeof gv);
  assert_int_equal(prm_optimizer_step(opt, ctx), PRM_OK);
  assert_float_equal(prm_optimizer_last_grad_norm(opt), 5.0, 1e-12);
  double scale = 1.0 / (5.0 + 1e-6);
  for (int i = 0; i < 4; i++)
    assert_float_equal(p[i], before[i] - gv[i] * scale, 1e-6);

  /* A norm below the threshold is not scaled. */
  memcpy(before, p, sizeof before);
  for (int i = 0; i < 4; i++)
    g[i] = gv[i] * 0.1f;
  assert_int_equal(prm_optimizer_step(opt, ctx), PRM_OK);
  assert_float_equal(prm_optimizer_last_grad_norm(opt), 0.5, 1e-7);
  for (int i = 0; i < 4; i++)
    assert_float_equal(p[i], before[i] - gv[i] * 0.1, 1e-6);
  prm_optimizer_free(opt);

  /* The recorded norm is that of the accumulated gradient / k, before clipping. */
  o.accumulation_steps = 2;
  o.max_grad_norm = 0.5;
  opt = make_opt(m, &o);
  memcpy(before, p, sizeof before);
  memcpy(g, gv, sizeof gv);
  assert_int_equal(prm_optimizer_step(opt, ctx), PRM_OK);
  for (int i = 0; i < 4; i++)
    g[i] += gv[i];
  assert_int_equal(prm_optimizer_step(opt, ctx), PRM_OK);
  assert_float_equal(prm_optimizer_last_grad_norm(opt), 5.0, 1e-12);
  scale = 0.5 / (5.0 + 1e-6);
  for (int i = 0; i < 4; i++)
    assert_float_equal(p[i], before[i] - gv[i] * scale, 1e-6);
  prm_optimizer_free(opt);
  prm_ctx_free(ctx);
  prm_model_free(m);
}

/* ---- schedules --------------------------------------------------------------------- */

static double expected_lr(const prm_optimizer_options *o, uint64_t t) {
  double lr = o->lr, lo = o->min_lr, W = (double)o->warmup_steps, T = (double)o->total_steps;
  if ((double)t < W) return lr * (double)t / W;
  if (o->schedule == PRM_SCHED_CONSTANT) return lr;
  if ((double)t >= T) return lo;
  double progress = ((double)t - W) / (T - W);
  if (o->schedule == PRM_SCHED_LINEAR) return lo + (lr - lo) * (T - (double)t) / (T - W);
  return lo + (lr - lo) * 0.5 * (1.0 + cos(PI * progress));
}

/* Step a one-parameter SGD model whose gradient is always 1: the parameter
 * moves by exactly the lr each update used. */
static void check_schedule(const prm_optimizer_options *o, uint64_t n_updates) {
  prm_model *m = prmt_linear(1, 3);
  prm_ctx *ctx = prmt_ctx(m, 2, 0);
  float *p = prm_model_params(m, NULL);
  float *g = prm_ctx_grads(ctx, NULL);
  prm_optimizer *opt = make_opt(m, o);
  for (uint64_t t = 0; t < n_updates; t++) {
    double want = expected_lr(o, t);
    assert_float_equal(prm_optimizer_lr(opt), want, 1e-15);
    p[0] = 0.0f;
    g[0] = 1.0f;
    assert_int_equal(prm_optimizer_step(opt, ctx), PRM_OK);
    assert_float_equal(p[0], -want, 1e-9);
  }
  prm_optimizer_free(opt);
  prm_ctx_free(ctx);
  prm_model_free(m);
}

static void test_schedules(void **state) {
  (void)state;
  prm_optimizer_options o = default_opts();
  o.algorithm = PRM_OPT_SGD;
  o.lr = 0.1;
  check_schedule(&o, 5); /* constant, no warm-up */
  o.warmup_steps = 4;
  check_schedule(&o, 10);
  o.schedule = PRM_SCHED_LINEAR;
  o.total_steps = 10;
  o.warmup_steps = 3;
  check_schedule(&o, 15);
  o.min_lr = 0.01;
  check_schedule(&o, 15);
  o.schedule = PRM_SCHED_COSINE;
  check_schedule(&o, 15);
  o.min_lr = 0.0;
  o.warmup_steps = 0;
  check_schedule(&o, 15);
  o.warmup_steps = o.total_steps; /* warm-up straight into the floor */
  check_schedule(&o, 13);

  /* Landmarks written out: W=2, T=6, lr 1, min_lr 0.2. */
  prm_model *m = prmt_linear(1, 3);
  prm_ctx *ctx = prmt_ctx(m, 2, 0);
  o = default_opts();
  o.algorithm = PRM_OPT_SGD;
  o.lr = 1.0;
  o.min_lr = 0.2;
  o.warmup_steps = 2;
  o.total_steps = 6;
  o.schedule = PRM_SCHED_COSINE;
  prm_optimizer *opt = make_opt(m, &o);
  const double cosine[9] = {0.0, 0.5,
                            1.0, 0.2 + 0.8 * 0.5 * (1 + cos(PI / 4)),
                            0.6, 0.2 + 0.8 * 0.5 * (1 + cos(3 * PI / 4)),
                            0.2, 0.2,
                            0.2};
  for (int t = 0; t < 9; t++) {
    assert_float_equal(prm_optimizer_lr(opt), cosine[t], 1e-12);
    assert_int_equal(prm_optimizer_step(opt, ctx), PRM_OK);
  }
  prm_optimizer_free(opt);
  o.schedule = PRM_SCHED_LINEAR;
  opt = make_opt(m, &o);
  const double linear[9] = {0.0, 0.5, 1.0, 0.8, 0.6, 0.4, 0.2, 0.2, 0.2};
  for (int t = 0; t < 9; t++) {
    assert_float_equal(prm_optimizer_lr(opt), linear[t], 1e-12);
    assert_int_equal(prm_optimizer_step(opt, ctx), PRM_OK);
  }
  prm_optimizer_free(opt);
  prm_ctx_free(ctx);
  prm_model_free(m);
}

/* ---- accumulation -------------------------------------------------------------------- */

static void test_accumulation(void **state) {
  (void)state;
  prm_model *ma = small_mlp(8), *mb = small_mlp(8);
  prm_ctx *ca = prmt_ctx(ma, 2, 0), *cb = prmt_ctx(mb, 2, 0);
  uint64_t n;
  float *pa = prm_model_params(ma, &n), *pb = prm_model_params(mb, NULL);
  float *ga = prm_ctx_grads(ca, NULL), *gb = prm_ctx_grads(cb, NULL);
  assert_memory_equal(pa, pb, n * sizeof *pa);
  float *snap = malloc(n * sizeof *snap);
  float *part = malloc(n * sizeof *part);
  assert_true(snap && part);

  prm_optimizer_options o = default_opts();
  o.lr = 0.01;
  o.weight_decay = 0.01;
  o.max_grad_norm = 1.0;
  prm_optimizer *ob = make_opt(mb, &o);
  o.accumulation_steps = 3;
  prm_optimizer *oa = make_opt(ma, &o);

  prmt_rng rng = {7};
  for (int cycle = 0; cycle < 2; cycle++) {
    memset(gb, 0, n * sizeof *gb);
    for (int call = 0; call < 3; call++) {
      /* a "backward": add a partial gradient into the accumulator */
      prmt_fill_normal(&rng, part, n, 1.0);
      for (uint64_t i = 0; i < n; i++) {
        ga[i] += part[i];
        gb[i] += part[i];
      }
      memcpy(snap, pa, n * sizeof *pa);
      assert_int_equal(prm_optimizer_step(oa, ca), PRM_OK);
      if (call < 2) { /* counted only: nothing changes */
        assert_memory_equal(snap, pa, n * sizeof *pa);
        assert_int_equal(prm_optimizer_num_updates(oa), (uint64_t)cycle);
        assert_true(ga[0] != 0.0f);
      }
    }
    for (uint64_t i = 0; i < n; i++) {
      assert_true(ga[i] == 0.0f);
      gb[i] = gb[i] / 3.0f;
    }
    assert_int_equal(prm_optimizer_step(ob, cb), PRM_OK);
    assert_int_equal(prm_optimizer_num_updates(oa), (uint64_t)cycle + 1);
    assert_float_equal(prm_optimizer_last_grad_norm(oa), prm_optimizer_last_grad_norm(ob),
                       1e-6 * prm_optimizer_last_grad_norm(ob));
    for (uint64_t i = 0; i < n; i++)
      assert_close(pa[i], pb[i], 1e-6, 1e-8, "param", i);
  }
  free(snap);
  free(part);
  prm_optimizer_free(oa);
  prm_optimizer_free(ob);
  prm_ctx_free(ca);
  prm_ctx_free(cb);
  prm_model_free(ma);
  prm_model_free(mb);
}

/* ---- NaN / Inf policy -------------------------------------------------------------------- */

static void test_nonfinite(void **state) {
  (void)state;
  const float bad[2] = {NAN, INFINITY};
  for (int algo = PRM_OPT_SGD; algo <= PRM_OPT_ADAMW; algo++) {
    for (int b = 0; b < 2; b++) {
      /* Twin models: `a` sees a failing step in the middle, `r` does not. */
      prm_model *ma = small_mlp(9), *mr = small_mlp(9);
      prm_ctx *ca = prmt_ctx(ma, 2, 0), *cr = prmt_ctx(mr, 2, 0);
      uint64_t n;
      float *pa = prm_model_params(ma, &n), *pr = prm_model_params(mr, NULL);
      float *ga = prm_ctx_grads(ca, NULL), *gr = prm_ctx_grads(cr, NULL);
      prm_optimizer_options o = default_opts();
      o.algorithm = algo;
      o.momentum = algo == PRM_OPT_SGD ? 0.9 : 0.0;
      o.lr = 0.01;
      o.weight_decay = 0.01;
      o.schedule = PRM_SCHED_LINEAR;
      o.warmup_steps = 1;
      o.total_steps = 10;
      prm_optimizer *oa = make_opt(ma, &o), *orf = make_opt(mr, &o);
      float *snap = malloc(n * sizeof *snap);
      assert_non_null(snap);
      prmt_rng rng = {11};

      for (int s = 0; s < 3; s++) {
        prmt_fill_normal(&rng, ga, n, 1.0);
        memcpy(gr, ga, n * sizeof *ga);
        if (s == 2) { /* failing step first */
          memcpy(snap, pa, n * sizeof *pa);
          double norm = prm_optimizer_last_grad_norm(oa);
          double lr = prm_optimizer_lr(oa);
          float keep = ga[n / 2];
          ga[n / 2] = bad[b];
          assert_int_equal(prm_optimizer_step(oa, ca), PRM_ERR_NONFINITE_GRAD);
          assert_true(strlen(prm_optimizer_errmsg(oa)) > 0);
          assert_memory_equal(snap, pa, n * sizeof *pa);
          assert_int_equal(prm_optimizer_num_updates(oa), 2);
          assert_true(prm_optimizer_last_grad_norm(oa) == norm);
          assert_true(prm_optimizer_lr(oa) == lr);
          assert_true(isnan(ga[n / 2]) || isinf(ga[n / 2])); /* kept for inspection */
          ga[n / 2] = keep;
        }
        assert_int_equal(prm_optimizer_step(oa, ca), PRM_OK);
        assert_int_equal(prm_optimizer_step(orf, cr), PRM_OK);
        /* moments and counters untouched by the failure: identical results */
        assert_memory_equal(pa, pr, n * sizeof *pa);
      }
      free(snap);
      prm_optimizer_free(oa);
      prm_optimizer_free(orf);
      prm_ctx_free(ca);
      prm_ctx_free(cr);
      prm_model_free(ma);
      prm_model_free(mr);
    }
  }
}

/* ---- end to end ------------------------------------------------------------------------- */

static double pair_loss_and_backward(prm_ctx *ctx, const prm_batch *b, uint64_t pairs,
                                     int backward) {
  float scores[64], dscores[64];
  double loss = 0;
  assert_int_equal(prm_ctx_forward(ctx, b, scores, 2 * pairs), PRM_OK);
  assert_int_equal(
      prm_loss_bt(scores, scores + pairs, pairs, NULL, &loss, NULL, dscores, dscores + pairs),
      PRM_OK);
  if (backward) assert_int_equal(prm_ctx_backward(ctx, dscores, 2 * pairs), PRM_OK);
  return loss;
}

static void test_end_to_end(void **state) {
  (void)state;
  enum { D = 6, P = 16 };
  prm_model *m = prmt_linear(D, 5);
  prm_ctx *ctx = prmt_ctx(m, 2 * P, 0);
  prmt_rng rng = {13};
  double w_true[D];
  for (int j = 0; j < D; j++)
    w_true[j] = prmt_normal(&rng);
  float x[2 * P * D];
  for (int i = 0; i < P; i++) {
    float a[D], c[D];
    prmt_fill_normal(&rng, a, D, 1.0);
    prmt_fill_normal(&rng, c, D, 1.0);
    double ra = 0, rc = 0;
    for (int j = 0; j < D; j++) {
      ra += w_true[j] * a[j];
      rc += w_true[j] * c[j];
    }
    memcpy(&x[i * D], ra >= rc ? a : c, sizeof a);       /* chosen */
    memcpy(&x[(P + i) * D], ra >= rc ? c : a, sizeof a); /* rejected */
  }
  prm_batch b = prmt_batch(x, 2 * P, D);
  prm_optimizer_options o = default_opts();
  o.lr = 0.05;
  o.weight_decay = 0.01;
  prm_optimizer *opt = make_opt(m, &o);
  double first = pair_loss_and_backward(ctx, &b, P, 0);
  assert_int_equal(prm_ctx_zero_grad(ctx), PRM_OK);
  double prev = first;
  for (int s = 0; s < 30; s++) {
    pair_loss_and_backward(ctx, &b, P, 1);
    assert_int_equal(prm_optimizer_step(opt, ctx), PRM_OK);
    assert_true(prm_optimizer_last_grad_norm(opt) > 0.0);
    if (s < 5) { /* early steps descend monotonically */
      double now = pair_loss_and_backward(ctx, &b, P, 0);
      assert_true(now < prev);
      prev = now;
    }
  }
  double last = pair_loss_and_backward(ctx, &b, P, 0);
  assert_true(last < 0.7 * first);
  prm_optimizer_free(opt);
  prm_ctx_free(ctx);
  prm_model_free(m);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_options_init),       cmocka_unit_test(test_new_errors),
      cmocka_unit_test(test_step_errors),        cmocka_unit_test(test_sgd_reference),
      cmocka_unit_test(test_adam_reference),     cmocka_unit_test(test_adamw_reference),
      cmocka_unit_test(test_adamw_known_values), cmocka_unit_test(test_no_decay_1d),
      cmocka_unit_test(test_clipping),           cmocka_unit_test(test_schedules),
      cmocka_unit_test(test_accumulation),       cmocka_unit_test(test_nonfinite),
      cmocka_unit_test(test_end_to_end),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
