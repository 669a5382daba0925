/*
 * test_model.c - models and contexts: creation, queries, forward against a
 * naive double-precision reference, backward against finite differences,
 * gradient accumulation, the one-call train step / evaluate, and the error
 * paths of every model, context and batch function.
 */
// clang-format off
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>
// clang-format on

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#if defined(__GLIBC__)
#include <malloc.h>
#endif

#include "testutil.h"

/* ---- a naive reference forward in double ----------------------------------------- */

static double act_ref(int32_t act, double z) {
  switch (act) {
  case PRM_ACT_RELU: return z > 0 ? z : 0;
  case PRM_ACT_TANH: return tanh(z);
  default: return 0.5 * z * (1 + tanh(0.7978845608028654 * (z + 0.044715 * z * z * z)));
  }
}

/* Score of one row with the model's current parameters, all in double. */
static double ref_score(prm_model *m, const float *x) {
  prm_model_options o;
  prm_model_options_init(&o, PRM_MODEL_OPTIONS_VERSION);
  assert_int_equal(prm_model_get_options(m, &o), PRM_OK);
  const float *p = prm_model_params(m, NULL);
  double h[2][4096];
  uint64_t in = o.input_size;
  for (uint64_t j = 0; j < in; j++)
    h[0][j] = x[j];
  int cur = 0;
  uint32_t t = 0;
  for (uint32_t l = 0; l < (o.arch == PRM_ARCH_MLP ? o.n_hidden : 0); l++) {
    uint64_t w_off, b_off, out = o.hidden[l];
    assert_int_equal(prm_model_tensor_info(m, t++, NULL, &w_off, NULL, NULL), PRM_OK);
    assert_int_equal(prm_model_tensor_info(m, t++, NULL, &b_off, NULL, NULL), PRM_OK);
    for (uint64_t r = 0; r < out; r++) {
      double s = p[b_off + r];
      for (uint64_t c = 0; c < in; c++)
        s += (double)p[w_off + r * in + c] * h[cur][c];
      h[1 - cur][r] = act_ref(o.activation, s);
    }
    cur = 1 - cur;
    in = out;
  }
  uint64_t s_off;
  assert_int_equal(prm_model_tensor_info(m, t, NULL, &s_off, NULL, NULL), PRM_OK);
  double s = 0;
  for (uint64_t c = 0; c < in; c++)
    s += (double)p[s_off + c] * h[cur][c];
  return s;
}

/* ---- options and creation ----------------------------------------------------------- */

static void test_model_options_errors(void **state) {
  (void)state;
  prm_model_options o;
  ASSERT_FAILS(prm_model_options_init(NULL, 1), PRM_ERR_NULL);
  ASSERT_FAILS(prm_model_options_init(&o, 0), PRM_ERR_VERSION);
  ASSERT_FAILS(prm_model_options_init(&o, PRM_MODEL_OPTIONS_VERSION + 1), PRM_ERR_VERSION);
  assert_int_equal(prm_model_options_init(&o, PRM_MODEL_OPTIONS_VERSION), PRM_OK);
  assert_int_equal(o.version, PRM_MODEL_OPTIONS_VERSION);
  assert_int_equal(o.arch, PRM_ARCH_LINEAR);
  assert_int_equal(o.activation, PRM_ACT_GELU_TANH);
}

static void test_model_new_errors(void **state) {
  (void)state;
  prm_model_options o = PRM_MODEL_OPTIONS_INIT;
  prm_model *m = (prm_model *)&o; /* must be reset to NULL on failure */
  o.input_size = 4;
  ASSERT_FAILS(prm_model_new(NULL, &o), PRM_ERR_NULL);
  ASSERT_FAILS(prm_model_new(&m, NULL), PRM_ERR_NULL);
  assert_null(m);

  prm_model_options bad;
#define TRY(field_edit, status)                                                                    \
  do {                                                                                             \
    bad = o;                                                                                       \
    field_edit;                                                                                    \
    m = (prm_model *)&o;                                                                           \
    ASSERT_FAILS(prm_model_new(&m, &bad), status);                                                 \
    assert_null(m);                                                                                \
  } while (0)
  TRY(bad.version = 0, PRM_ERR_VERSION);
  TRY(bad.version = 99, PRM_ERR_VERSION);
  TRY(bad.arch = 0, PRM_ERR_INVALID);
  TRY(bad.arch = 77, PRM_ERR_INVALID);
  TRY(bad.arch = PRM_ARCH_GPT2, PRM_ERR_INVALID); /* vocab_size 0 */
  TRY(bad.input_size = 0, PRM_ERR_INVALID);
  TRY(bad.input_size = (uint64_t)1 << 31, PRM_ERR_INVALID);
  TRY((bad.arch = PRM_ARCH_MLP, bad.n_hidden = 0), PRM_ERR_INVALID);
  TRY((bad.arch = PRM_ARCH_MLP, bad.n_hidden = PRM_MAX_HIDDEN + 1), PRM_ERR_INVALID);
  TRY((bad.arch = PRM_ARCH_MLP, bad.n_hidden = 2, bad.hidden[0] = 3, bad.hidden[1] = 0),
      PRM_ERR_INVALID);
  TRY((bad.arch = PRM_ARCH_MLP, bad.n_hidden = 1, bad.hidden[0] = 3, bad.activation = 9),
      PRM_ERR_INVALID);
  /* 2^30 x 2^30 weights: rejected before any allocation */
  TRY((bad.arch = PRM_ARCH_MLP, bad.input_size = (uint64_t)1 << 30, bad.n_hidden = 1,
       bad.hidden[0] = (uint64_t)1 << 30),
      PRM_ERR_INVALID);
#undef TRY
}

static void test_model_queries(void **state) {
  (void)state;
  uint64_t hidden[2] = {5, 3};
  prm_model *m = prmt_mlp(4, hidden, 2, PRM_ACT_TANH, 7);
  assert_int_equal(prm_model_arch(m), PRM_ARCH_MLP);
  assert_int_equal(prm_model_input_size(m), 4);
  assert_int_equal(prm_model_num_params(m), 5 * 4 + 5 + 3 * 5 + 3 + 3);
  assert_int_equal(prm_model_num_tensors(m), 5);
  const char *names[5] = {"layers.0.weight", "layers.0.bias", "layers.1.weight", "layers.1.bias",
                          "score.weight"};
  uint64_t expect_off[5] = {0, 20, 25, 40, 43};
  uint64_t expect_shape[5][2] = {{5, 4}, {5, 0}, {3, 5}, {3, 0}, {1, 3}};
  for (uint32_t i = 0; i < 5; i++) {
    const char *name;
    uint64_t off, shape[2];
    uint32_t ndim;
    assert_int_equal(prm_model_tensor_info(m, i, &name, &off, &ndim, shape), PRM_OK);
    assert_string_equal(name, names[i]);
    assert_int_equal(off, expect_off[i]);
    assert_int_equal(ndim, expect_shape[i][1] ? 2 : 1);
    assert_int_equal(shape[0], expect_shape[i][0]);
    assert_int_equal(shape[1], expect_shape[i][1]);
  }
  assert_int_equal(prm_model_tensor_info(m, 0, NULL, NULL, NULL, NULL), PRM_OK);
  ASSERT_FAILS(prm_model_tensor_info(m, 5, NULL, NULL, NULL, NULL), PRM_ERR_INVALID);
  ASSERT_FAILS(prm_model_tensor_info(NULL, 0, NULL, NULL, NULL, NULL), PRM_ERR_NULL);

  prm_model_options o;
  prm_model_options_init(&o, PRM_MODEL_OPTIONS_VERSION);
  assert_int_equal(prm_model_get_options(m, &o), PRM_OK);
  assert_int_equal(o.arch, PRM_ARCH_MLP);
  assert_int_equal(o.n_hidden, 2);
  assert_int_equal(o.hidden[1], 3);
  assert_int_equal(o.activation, PRM_ACT_TANH);
  assert_int_equal(o.seed, 7);
  ASSERT_FAILS(prm_model_get_options(NULL, &o), PRM_ERR_NULL);
  ASSERT_FAILS(prm_model_get_options(m, NULL), PRM_ERR_NULL);
  o.version = 0;
  ASSERT_FAILS(prm_model_get_options(m, &o), PRM_ERR_VERSION);

  /* NULL-tolerant queries */
  uint64_t n = 99;
  assert_null(prm_model_params(NULL, &n));
  assert_int_equal(n, 0);
  assert_int_equal(prm_model_arch(NULL), 0);
  assert_int_equal(prm_model_input_size(NULL), 0);
  assert_int_equal(prm_model_num_params(NULL), 0);
  assert_int_equal(prm_model_num_tensors(NULL), 0);
  assert_string_equal(prm_model_errmsg(NULL), "");
  /* the model's message is that of the last failing call that took it */
  assert_non_null(strstr(prm_model_errmsg(m), "version 0"));
  prm_model_free(NULL);
  prm_model_free(m);
}

static void test_model_init_deterministic(void **state) {
  (void)state;
  uint64_t hidden[1] = {8};
  prm_model *a = prmt_mlp(6, hidden, 1, PRM_ACT_RELU, 11);
  prm_model *b = prmt_mlp(6, hidden, 1, PRM_ACT_RELU, 11);
  prm_model *c = prmt_mlp(6, hidden, 1, PRM_ACT_RELU, 12);
  uint64_t n;
  const float *pa = prm_model_params(a, &n);
  assert_memory_equal(pa, prm_model_params(b, NULL), n * sizeof(float));
  assert_memory_not_equal(pa, prm_model_params(c, NULL), n * sizeof(float));
  /* weights within the nn.Linear bound 1/sqrt(fan_in), biases within 0.1 */
  for (uint64_t i = 0; i < 48; i++)
    assert_true(fabsf(pa[i]) <= 1.0f / sqrtf(6.0f));
  for (uint64_t i = 48; i < 56; i++)
    assert_true(fabsf(pa[i]) <= 0.1f);
  prm_model_free(a);
  prm_model_free(b);
  prm_model_free(c);
}

/* ---- contexts --------------------------------------------------------------------- */

static void test_ctx_errors(void **state) {
  (void)state;
  prm_model *m = prmt_linear(3, 1);
  prm_ctx_options o;
  ASSERT_FAILS(prm_ctx_options_init(NULL, 1), PRM_ERR_NULL);
  ASSERT_FAILS(prm_ctx_options_init(&o, 0), PRM_ERR_VERSION);
  ASSERT_FAILS(prm_ctx_options_init(&o, PRM_CTX_OPTIONS_VERSION + 1), PRM_ERR_VERSION);
  assert_int_equal(prm_ctx_options_init(&o, PRM_CTX_OPTIONS_VERSION), PRM_OK);
  prm_ctx *c = (prm_ctx *)&o;
  ASSERT_FAILS(prm_ctx_new(NULL, m, &o), PRM_ERR_NULL);
  ASSERT_FAILS(prm_ctx_new(&c, NULL, &o), PRM_ERR_NULL);
  assert_null(c);
  ASSERT_FAILS(prm_ctx_new(&c, m, NULL), PRM_ERR_NULL);
  ASSERT_FAILS(prm_ctx_new(&c, m, &o), PRM_ERR_INVALID); /* max_rows 0 */
  o.max_rows = 4;
  o.version = 5;
  ASSERT_FAILS(prm_ctx_new(&c, m, &o), PRM_ERR_VERSION);
  assert_null(c);

  /* inference contexts have no gradients and refuse backward */
  prm_ctx *inf = prmt_ctx(m, 4, 1);
  uint64_t n = 9;
  assert_null(prm_ctx_grads(inf, &n));
  assert_int_equal(n, 0);
  assert_ptr_equal(prm_ctx_model(inf), m);
  float x[6] = {1, 2, 3, 4, 5, 6}, s[2], ds[2] = {1, 1};
  prm_batch b = prmt_batch(x, 2, 3);
  assert_int_equal(prm_ctx_forward(inf, &b, s, 2), PRM_OK);
  ASSERT_FAILS(prm_ctx_backward(inf, ds, 2), PRM_ERR_STATE);
  assert_true(prm_ctx_errmsg(inf)[0] != '\0');
  ASSERT_FAILS(prm_ctx_zero_grad(inf), PRM_ERR_STATE);
  ASSERT_FAILS(prm_ctx_zero_grad(NULL), PRM_ERR_NULL);
  assert_null(prm_ctx_model(NULL));
  assert_string_equal(prm_ctx_errmsg(NULL), "");
  assert_null(prm_ctx_grads(NULL, NULL));
  prm_ctx_free(NULL);
  prm_ctx_free(inf);
  prm_model_free(m);
}

static void test_batch_init(void **state) {
  (void)state;
  prm_batch b;
  ASSERT_FAILS(prm_batch_init(NULL, 1), PRM_ERR_NULL);
  ASSERT_FAILS(prm_batch_init(&b, 0), PRM_ERR_VERSION);
  ASSERT_FAILS(prm_batch_init(&b, PRM_BATCH_VERSION + 1), PRM_ERR_VERSION);
  assert_int_equal(prm_batch_init(&b, PRM_BATCH_VERSION), PRM_OK);
  assert_int_equal(b.n, 0);
  assert_null(b.features);
}

static void test_forward_errors(void **state) {
  (void)state;
  prm_model *m = prmt_linear(3, 1);
  prm_ctx *c = prmt_ctx(m, 4, 0);
  float x[12], s[4] = {7, 7, 7, 7}, ds[2] = {0.5f, -1.0f};
  for (int i = 0; i < 12; i++)
    x[i] = (float)i / 10.0f;
  prm_batch b = prmt_batch(x, 2, 3);
  /* a good forward pending its backward, which must survive the failures */
  assert_int_equal(prm_ctx_forward(c, &b, s, 4), PRM_OK);

  ASSERT_FAILS(prm_ctx_forward(NULL, &b, s, 4), PRM_ERR_NULL);
  ASSERT_FAILS(prm_ctx_forward(c, NULL, s, 4), PRM_ERR_NULL);
  assert_true(prm_ctx_errmsg(c)[0] != '\0');
  ASSERT_FAILS(prm_ctx_forward(c, &b, NULL, 4), PRM_ERR_NULL);
  ASSERT_FAILS(prm_ctx_forward(c, &b, s, 1), PRM_ERR_SIZE);
  prm_batch bad = b;
  bad.version = 0;
  ASSERT_FAILS(prm_ctx_forward(c, &bad, s, 4), PRM_ERR_VERSION);
  bad = b;
  bad.features = NULL;
  ASSERT_FAILS(prm_ctx_forward(c, &bad, s, 4), PRM_ERR_NULL);
  bad = b;
  bad.n_features = 2;
  ASSERT_FAILS(prm_ctx_forward(c, &bad, s, 4), PRM_ERR_SIZE);
  bad = b;
  bad.n = 0;
  ASSERT_FAILS(prm_ctx_forward(c, &bad, s, 4), PRM_ERR_SIZE);
  bad = b;
  bad.n = 5;
  ASSERT_FAILS(prm_ctx_forward(c, &bad, s, 5), PRM_ERR_SIZE);
  bad = b;
  bad.row_stride = 2;
  ASSERT_FAILS(prm_ctx_forward(c, &bad, s, 4), PRM_ERR_SIZE);
  float keep[4];
  memcpy(keep, s, sizeof s);
  x[4] = NAN;
  ASSERT_FAILS(prm_ctx_forward(c, &b, s, 4), PRM_ERR_NONFINITE);
  assert_non_null(strstr(prm_ctx_errmsg(c), "[1, 1]"));
  x[4] = INFINITY;
  ASSERT_FAILS(prm_ctx_forward(c, &b, s, 4), PRM_ERR_NONFINITE);
  assert_memory_equal(keep, s, sizeof s); /* training forward: rejected before writing */
  x[4] = 0.4f;

  /* the pending forward is intact: its gradient is X^T ds */
  assert_int_equal(prm_ctx_backward(c, ds, 2), PRM_OK);
  const float *g = prm_ctx_grads(c, NULL);
  for (int j = 0; j < 3; j++)
    assert_float_equal(g[j], 0.5f * x[j] - 1.0f * x[3 + j], 1e-6);

  /* no forward pending: copy and check share one pass, and still reject */
  x[4] = NAN;
  ASSERT_FAILS(prm_ctx_forward(c, &b, s, 4), PRM_ERR_NONFINITE);
  assert_non_null(strstr(prm_ctx_errmsg(c), "[1, 1]"));
  assert_memory_equal(keep, s, sizeof s);
  x[4] = 0.4f;

  /* backward errors leave the gradients alone */
  float before[3];
  memcpy(before, g, sizeof before);
  ASSERT_FAILS(prm_ctx_backward(c, ds, 2), PRM_ERR_STATE); /* one backward per forward */
  assert_int_equal(prm_ctx_forward(c, &b, s, 4), PRM_OK);
  ASSERT_FAILS(prm_ctx_backward(NULL, ds, 2), PRM_ERR_NULL);
  ASSERT_FAILS(prm_ctx_backward(c, NULL, 2), PRM_ERR_NULL);
  ASSERT_FAILS(prm_ctx_backward(c, ds, 3), PRM_ERR_SIZE);
  ds[1] = NAN;
  ASSERT_FAILS(prm_ctx_backward(c, ds, 2), PRM_ERR_NONFINITE);
  assert_memory_equal(before, g, sizeof before);
  prm_ctx_free(c);
  prm_model_free(m);
}

/* Non-finite features are caught also on the path that does not copy them
 * (inference forward, evaluate), for every architecture. */
static void test_nonfinite_features_all_paths(void **state) {
  (void)state;
  uint64_t hidden[1] = {4};
  prm_model *ms[2] = {prmt_linear(5, 2), prmt_mlp(5, hidden, 1, PRM_ACT_RELU, 2)};
  for (int k = 0; k < 2; k++) {
    prm_ctx *inf = prmt_ctx(ms[k], 4, 1);
    float x[20] = {0}, s[4];
    prm_batch b = prmt_batch(x, 4, 5);
    x[17] = -INFINITY;
    ASSERT_FAILS(prm_ctx_forward(inf, &b, s, 4), PRM_ERR_NONFINITE);
    assert_non_null(strstr(prm_ctx_errmsg(inf), "[3, 2]"));
    ASSERT_FAILS(prm_evaluate(inf, &b, NULL, NULL), PRM_ERR_NONFINITE);
    x[17] = NAN;
    ASSERT_FAILS(prm_evaluate(inf, &b, NULL, NULL), PRM_ERR_NONFINITE);
    prm_ctx_free(inf);
    prm_model_free(ms[k]);
  }
}

/* ---- forward correctness ---------------------------------------------------------- */

static void check_forward(prm_model *m, uint64_t d, uint64_t stride) {
  prmt_rng r = {99};
  const uint64_t n = 7;
  float *x = calloc(n * stride, sizeof(float));
  prmt_fill_normal(&r, x, n * stride, 1.0);
  float s_train[7], s_inf[7];
  prm_ctx *c = prmt_ctx(m, n, 0), *ci = prmt_ctx(m, n, 1);
  prm_batch b = prmt_batch(x, n, d);
  b.row_stride = stride;
  assert_int_equal(prm_ctx_forward(c, &b, s_train, n), PRM_OK);
  assert_int_equal(prm_ctx_forward(ci, &b, s_inf, n), PRM_OK);
  for (uint64_t i = 0; i < n; i++) {
    double ref = ref_score(m, x + i * stride);
    assert_true(fabs(s_train[i] - ref) <= 1e-5 * (1 + fabs(ref)));
    assert_true(s_inf[i] == s_train[i]); /* same kernels, same bits */
  }
  prm_ctx_free(c);
  prm_ctx_free(ci);
  free(x);
}

static void test_forward_matches_reference(void **state) {
  (void)state;
  prm_model *lin = prmt_linear(9, 3);
  check_forward(lin, 9, 9);
  check_forward(lin, 9, 13);
  prm_model_free(lin);
  int32_t acts[3] = {PRM_ACT_RELU, PRM_ACT_GELU_TANH, PRM_ACT_TANH};
  uint64_t hidden[3] = {11, 6, 4};
  for (int a = 0; a < 3; a++) {
    prm_model *m = prmt_mlp(9, hidden, 3, acts[a], 5);
    check_forward(m, 9, 9);
    check_forward(m, 9, 12);
    prm_model_free(m);
  }
}

/* ---- gradients against finite differences ------------------------------------------ */

/* L(theta) = sum_i g_i s_i(theta) in double, from an inference context. */
static double weighted_scores(prm_ctx *ci, const prm_batch *b, const float *g) {
  float s[16];
  assert_int_equal(prm_ctx_forward(ci, b, s, 16), PRM_OK);
  double acc = 0;
  for (uint64_t i = 0; i < b->n; i++)
    acc += (double)g[i] * s[i];
  return acc;
}

/*
 * Compare the analytic gradient of sum_i g_i s_i with central differences on
 * every parameter. fp32 forward: step h = 1e-2 on inputs scaled so the
 * pre-activations are O(1); the check is |fd - an| <= tol * (|fd| + |an|) + atol.
 */
static void check_gradients(prm_model *m, uint64_t d, double tol, double atol) {
  prm_model_options mo = PRM_MODEL_OPTIONS_INIT;
  assert_int_equal(prm_model_get_options(m, &mo), PRM_OK);
  const int act = mo.arch == PRM_ARCH_MLP ? mo.activation : 0;
  prmt_rng r = {1234};
  const uint64_t n = 6;
  float x[6 * 16], g[6];
  assert_true(d <= 16);
  prmt_fill_normal(&r, x, n * d, 1.0);
  prmt_fill_normal(&r, g, n, 1.0);
  prm_batch b = prmt_batch(x, n, d);
  prm_ctx *c = prmt_ctx(m, n, 0), *ci = prmt_ctx(m, n, 1);
  float s[6];
  assert_int_equal(prm_ctx_forward(c, &b, s, n), PRM_OK);
  assert_int_equal(prm_ctx_backward(c, g, n), PRM_OK);
  uint64_t np;
  float *p = prm_model_params(m, &np);
  const float *an = prm_ctx_grads(c, NULL);
  double worst = 0;
  const double l0 = weighted_scores(ci, &b, g);
  uint64_t kinks = 0;
  for (uint64_t j = 0; j < np; j++) {
    const float old = p[j];
    const float h = 1e-2f;
    p[j] = old + h;
    double lp = weighted_scores(ci, &b, g);
    p[j] = old - h;
    double lm = weighted_scores(ci, &b, g);
    p[j] = old;
    double fd = (lp - lm) / (2.0 * h);
    /* relu is piecewise linear: where the one-sided slopes disagree a kink
     * lies within h and the difference quotient means nothing there. */
    double right = (lp - l0) / h, left = (l0 - lm) / h;
    if (act == PRM_ACT_RELU && fabs(right - left) > tol * (fabs(right) + fabs(left)) + atol) {
      kinks++;
      continue;
    }
    double err = fabs(fd - an[j]) - tol * (fabs(fd) + fabs(an[j])) - atol;
    if (err > worst) worst = err;
    if (err > 0)
      fprintf(stderr, "act %d param %llu: fd %.6g analytic %.6g\n", act, (unsigned long long)j, fd,
              (double)an[j]);
  }
  assert_true(worst <= 0);
  assert_true(kinks * 5 <= np); /* most parameters were checked */
  prm_ctx_free(c);
  prm_ctx_free(ci);
}

static void test_gradients_linear(void **state) {
  (void)state;
  prm_model *m = prmt_linear(10, 4);
  check_gradients(m, 10, 1e-3, 1e-4); /* linear: FD is exact up to rounding */
  prm_model_free(m);
}

static void test_gradients_mlp(void **state) {
  (void)state;
  uint64_t hidden[2] = {7, 5};
  /* smooth activations: central differences have O(h^2) error */
  prm_model *g = prmt_mlp(8, hidden, 2, PRM_ACT_GELU_TANH, 21);
  check_gradients(g, 8, 2e-3, 2e-4);
  prm_model_free(g);
  prm_model *t = prmt_mlp(8, hidden, 2, PRM_ACT_TANH, 22);
  check_gradients(t, 8, 2e-3, 2e-4);
  prm_model_free(t);
  /* relu: piecewise linear, exact unless a step crosses a kink (skipped) */
  prm_model *rl = prmt_mlp(8, hidden, 2, PRM_ACT_RELU, 23);
  check_gradients(rl, 8, 2e-3, 2e-4);
  prm_model_free(rl);
  uint64_t one[1] = {9};
  prm_model *single = prmt_mlp(5, one, 1, PRM_ACT_GELU_TANH, 24);
  check_gradients(single, 5, 2e-3, 2e-4);
  prm_model_free(single);
}

/* The whole chain: loss with every option -> scores -> parameters. */
static void test_gradients_through_loss(void **state) {
  (void)state;
  uint64_t hidden[1] = {6};
  prm_model *m = prmt_mlp(5, hidden, 1, PRM_ACT_GELU_TANH, 31);
  const uint64_t P = 4;
  float x[8 * 5];
  prmt_rng r = {5};
  prmt_fill_normal(&r, x, 8 * 5, 1.0);
  float margin[4] = {0.1f, 0.0f, 0.3f, 0.2f}, label[4] = {1.0f, 0.9f, 0.2f, 0.5f};
  float weight[4] = {1.0f, 2.0f, 0.5f, 1.5f};
  prm_loss_options lo = PRM_LOSS_OPTIONS_INIT;
  lo.margin = margin;
  lo.label = label;
  lo.weight = weight;
  lo.center_coef = 0.05;
  prm_batch b = prmt_batch(x, 2 * P, 5);
  prm_ctx *c = prmt_ctx(m, 8, 0), *ci = prmt_ctx(m, 8, 1);
  float s[8], ds[8];
  assert_int_equal(prm_ctx_forward(c, &b, s, 8), PRM_OK);
  double loss0;
  assert_int_equal(prm_loss_bt(s, s + P, P, &lo, &loss0, NULL, ds, ds + P), PRM_OK);
  assert_int_equal(prm_ctx_backward(c, ds, 8), PRM_OK);
  uint64_t np;
  float *p = prm_model_params(m, &np);
  const float *an = prm_ctx_grads(c, NULL);
  for (uint64_t j = 0; j < np; j++) {
    const float old = p[j], h = 1e-2f;
    double l[2];
    for (int k = 0; k < 2; k++) {
      p[j] = old + (k ? -h : h);
      assert_int_equal(prm_ctx_forward(ci, &b, s, 8), PRM_OK);
      assert_int_equal(prm_loss_bt(s, s + P, P, &lo, &l[k], NULL, NULL, NULL), PRM_OK);
    }
    p[j] = old;
    double fd = (l[0] - l[1]) / (2.0 * h);
    assert_true(fabs(fd - an[j]) <= 3e-3 * (fabs(fd) + fabs(an[j])) + 2e-4);
  }
  prm_ctx_free(c);
  prm_ctx_free(ci);
  prm_model_free(m);
}

static void test_gradient_accumulation(void **state) {
  (void)state;
  uint64_t hidden[1] = {4};
  prm_model *m = prmt_mlp(3, hidden, 1, PRM_ACT_TANH, 8);
  prm_ctx *c = prmt_ctx(m, 4, 0);
  float x1[6] = {1, 2, 3, -1, 0, 1}, x2[12] = {0.5f, 0, 1, 2, 2, 2, -1, -1, 0, 3, 1, 0};
  float g1[2] = {1, -1}, g2[4] = {0.5f, 0.25f, -2, 1}, s[4];
  uint64_t np;
  prm_model_params(m, &np);
  float *sum = calloc(np, sizeof(float)), *one = calloc(np, sizeof(float));
  prm_batch b1 = prmt_batch(x1, 2, 3), b2 = prmt_batch(x2, 4, 3);
  /* separately */
  assert_int_equal(prm_ctx_forward(c, &b1, s, 4), PRM_OK);
  assert_int_equal(prm_ctx_backward(c, g1, 2), PRM_OK);
  memcpy(one, prm_ctx_grads(c, NULL), np * sizeof(float));
  assert_int_equal(prm_ctx_zero_grad(c), PRM_OK);
  for (uint64_t j = 0; j < np; j++)
    assert_true(prm_ctx_grads(c, NULL)[j] == 0.0f);
  assert_int_equal(prm_ctx_forward(c, &b2, s, 4), PRM_OK);
  assert_int_equal(prm_ctx_backward(c, g2, 4), PRM_OK);
  for (uint64_t j = 0; j < np; j++)
    sum[j] = one[j] + prm_ctx_grads(c, NULL)[j];
  /* accumulated */
  assert_int_equal(prm_ctx_zero_grad(c), PRM_OK);
  assert_int_equal(prm_ctx_forward(c, &b1, s, 4), PRM_OK);
  assert_int_equal(prm_ctx_backward(c, g1, 2), PRM_OK);
  assert_int_equal(prm_ctx_forward(c, &b2, s, 4), PRM_OK);
  assert_int_equal(prm_ctx_backward(c, g2, 4), PRM_OK);
  for (uint64_t j = 0; j < np; j++)
    assert_float_equal(prm_ctx_grads(c, NULL)[j], sum[j], 1e-6);
  free(sum);
  free(one);
  prm_ctx_free(c);
  prm_model_free(m);
}

/* ---- train step and evaluate ------------------------------------------------------- */

static prm_optimizer *adamw(prm_model *m) {
  prm_optimizer_options o = PRM_OPTIMIZER_OPTIONS_INIT;
  o.lr = 1e-2;
  o.weight_decay = 0.01;
  prm_optimizer *opt = NULL;
  assert_int_equal(prm_optimizer_new(&opt, m, &o), PRM_OK);
  return opt;
}

/* prm_train_step equals forward + loss + backward + step, bit for bit. */
static void test_train_step_equals_manual(void **state) {
  (void)state;
  uint64_t hidden[1] = {8};
  prm_model *a = prmt_mlp(6, hidden, 1, PRM_ACT_GELU_TANH, 3);
  prm_model *b = prmt_mlp(6, hidden, 1, PRM_ACT_GELU_TANH, 3);
  prm_ctx *ca = prmt_ctx(a, 10, 0), *cb = prmt_ctx(b, 10, 0);
  prm_optimizer *oa = adamw(a), *ob = adamw(b);
  prmt_rng r = {77};
  float x[10 * 6], s[10], ds[10];
  float margin[5] = {0.5f, 0, 0, 1, 0};
  prm_loss_options lo = PRM_LOSS_OPTIONS_INIT;
  lo.margin = margin;
  for (int step = 0; step < 5; step++) {
    prmt_fill_normal(&r, x, 60, 1.0);
    prm_batch bt = prmt_batch(x, 10, 6);
    prm_loss_stats st = PRM_LOSS_STATS_INIT, sm = PRM_LOSS_STATS_INIT;
    assert_int_equal(prm_train_step(ca, oa, &bt, &lo, &st), PRM_OK);
    assert_int_equal(prm_ctx_forward(cb, &bt, s, 10), PRM_OK);
    assert_int_equal(prm_loss_bt(s, s + 5, 5, &lo, NULL, &sm, ds, ds + 5), PRM_OK);
    assert_int_equal(prm_ctx_backward(cb, ds, 10), PRM_OK);
    assert_int_equal(prm_optimizer_step(ob, cb), PRM_OK);
    assert_true(st.loss == sm.loss);
    assert_true(st.accuracy == sm.accuracy);
  }
  uint64_t np;
  const float *pa = prm_model_params(a, &np);
  assert_memory_equal(pa, prm_model_params(b, NULL), np * sizeof(float));
  assert_int_equal(prm_optimizer_num_updates(oa), 5);
  prm_optimizer_free(oa);
  prm_optimizer_free(ob);
  prm_ctx_free(ca);
  prm_ctx_free(cb);
  prm_model_free(a);
  prm_model_free(b);
}

/* The linear model's one-call step works in blocks of pairs (features are
 * read once); it must agree with the split calls and fail atomically. */
static void test_train_step_linear_blocked(void **state) {
  (void)state;
  const uint64_t d = 2048, P = 40; /* 16 pairs per block: 3 blocks, the last short */
  prm_model *a = prmt_linear(d, 4), *b = prmt_linear(d, 4);
  prm_ctx *ca = prmt_ctx(a, 2 * P, 0), *cb = prmt_ctx(b, 2 * P, 0);
  prm_optimizer_options oo = PRM_OPTIMIZER_OPTIONS_INIT;
  oo.algorithm = PRM_OPT_SGD;
  oo.lr = 0.1;
  prm_optimizer *oa = NULL, *ob = NULL;
  assert_int_equal(prm_optimizer_new(&oa, a, &oo), PRM_OK);
  assert_int_equal(prm_optimizer_new(&ob, b, &oo), PRM_OK);
  float *x = malloc(sizeof(float) * 2 * P * (d + 3)), *s = malloc(sizeof(float) * 2 * P);
  float *ds = malloc(sizeof(float) * 2 * P);
  float margin[40], label[40], weight[40];
  prmt_rng r = {8};
  prmt_fill_normal(&r, x, 2 * P * (d + 3), 1.0);
  for (uint64_t i = 0; i < P; i++) {
    margin[i] = (float)(0.1 * (double)(i % 3));
    label[i] = (float)(0.6 + 0.01 * (double)i);
    weight[i] = (float)(0.5 + 0.05 * (double)i);
  }
  prm_loss_options lo = PRM_LOSS_OPTIONS_INIT;
  lo.margin = margin;
  lo.label = label;
  lo.weight = weight;
  lo.center_coef = 0.01;
  prm_batch bt = prmt_batch(x, 2 * P, d);
  bt.row_stride = d + 3;
  prm_loss_stats sa = PRM_LOSS_STATS_INIT, sb = PRM_LOSS_STATS_INIT;
  assert_int_equal(prm_train_step(ca, oa, &bt, &lo, &sa), PRM_OK);
  assert_int_equal(prm_ctx_forward(cb, &bt, s, 2 * P), PRM_OK);
  assert_int_equal(prm_loss_bt(s, s + P, P, &lo, NULL, &sb, ds, ds + P), PRM_OK);
  assert_int_equal(prm_ctx_backward(cb, ds, 2 * P), PRM_OK);
  assert_int_equal(prm_optimizer_step(ob, cb), PRM_OK);
  assert_float_equal(sa.loss, sb.loss, 1e-6 * fabs(sb.loss));
  assert_true(sa.accuracy == sb.accuracy);
  const float *pa = prm_model_params(a, NULL), *pb = prm_model_params(b, NULL);
  for (uint64_t j = 0; j < d; j++)
    assert_float_equal(pa[j], pb[j], 1e-6 + 1e-5 * fabs(pb[j]));

  /* failures in the last block leave the model and the gradients alone */
  float *before = malloc(sizeof(float) * d);
  memcpy(before, pa, sizeof(float) * d);
  x[(2 * P - 1) * (d + 3) + 5] = NAN; /* last rejected row */
  ASSERT_FAILS(prm_train_step(ca, oa, &bt, &lo, NULL), PRM_ERR_NONFINITE);
  assert_non_null(strstr(prm_ctx_errmsg(ca), "[79, 5]"));
  x[(2 * P - 1) * (d + 3) + 5] = 0.0f;
  label[P - 1] = 2.0f;
  ASSERT_FAILS(prm_train_step(ca, oa, &bt, &lo, NULL), PRM_ERR_INVALID);
  label[P - 1] = 1.0f;
  assert_memory_equal(before, pa, sizeof(float) * d);
  for (uint64_t j = 0; j < d; j++)
    assert_true(prm_ctx_grads(ca, NULL)[j] == 0.0f);
  /* parameters so large that finite features give infinite scores */
  float *pw = prm_model_params(a, NULL);
  for (uint64_t j = 0; j < d; j++)
    pw[j] = 3e38f;
  ASSERT_FAILS(prm_train_step(ca, oa, &bt, &lo, NULL), PRM_ERR_NONFINITE);
  for (uint64_t j = 0; j < d; j++)
    assert_true(prm_ctx_grads(ca, NULL)[j] == 0.0f);
  free(before);
  free(x);
  free(s);
  free(ds);
  prm_optimizer_free(oa);
  prm_optimizer_free(ob);
  prm_ctx_free(ca);
  prm_ctx_free(cb);
  prm_model_free(a);
  prm_model_free(b);
}

static void test_train_step_errors(void **state) {
  (void)state;
  prm_model *m = prmt_linear(2, 1), *other = prmt_linear(2, 1);
  prm_ctx *c = prmt_ctx(m, 4, 0), *inf = prmt_ctx(m, 4, 1);
  prm_optimizer *opt = adamw(m), *opt_other = adamw(other);
  float x[8] = {1, 0, 0, 1, 1, 1, 0, 0};
  prm_batch b = prmt_batch(x, 4, 2);
  uint64_t np;
  float *p = prm_model_params(m, &np), before[2];
  memcpy(before, p, sizeof before);
  ASSERT_FAILS(prm_train_step(NULL, opt, &b, NULL, NULL), PRM_ERR_NULL);
  ASSERT_FAILS(prm_train_step(c, NULL, &b, NULL, NULL), PRM_ERR_NULL);
  ASSERT_FAILS(prm_train_step(c, opt, NULL, NULL, NULL), PRM_ERR_NULL);
  ASSERT_FAILS(prm_train_step(inf, opt, &b, NULL, NULL), PRM_ERR_STATE);
  ASSERT_FAILS(prm_train_step(c, opt_other, &b, NULL, NULL), PRM_ERR_MISMATCH);
  prm_batch odd = b;
  odd.n = 3;
  ASSERT_FAILS(prm_train_step(c, opt, &odd, NULL, NULL), PRM_ERR_SIZE);
  odd.n = 0;
  ASSERT_FAILS(prm_evaluate(c, &odd, NULL, NULL), PRM_ERR_SIZE);
  prm_batch bad = b;
  bad.version = 3;
  ASSERT_FAILS(prm_train_step(c, opt, &bad, NULL, NULL), PRM_ERR_VERSION);
  float label[2] = {1.5f, 0.0f};
  prm_loss_options lo = PRM_LOSS_OPTIONS_INIT;
  lo.label = label;
  ASSERT_FAILS(prm_train_step(c, opt, &b, &lo, NULL), PRM_ERR_INVALID);
  assert_true(prm_ctx_errmsg(c)[0] != '\0');
  x[5] = NAN;
  ASSERT_FAILS(prm_train_step(c, opt, &b, NULL, NULL), PRM_ERR_NONFINITE);
  ASSERT_FAILS(prm_evaluate(NULL, &b, NULL, NULL), PRM_ERR_NULL);
  x[5] = 1;
  /* nothing changed by any of the failures */
  assert_memory_equal(before, p, sizeof before);
  for (uint64_t j = 0; j < np; j++)
    assert_true(prm_ctx_grads(c, NULL)[j] == 0.0f);
  assert_int_equal(prm_optimizer_num_updates(opt), 0);
  /* a backward after a failed train step is refused: nothing is pending */
  float ds[4] = {0};
  ASSERT_FAILS(prm_ctx_backward(c, ds, 4), PRM_ERR_STATE);
  prm_optimizer_free(opt);
  prm_optimizer_free(opt_other);
  prm_ctx_free(c);
  prm_ctx_free(inf);
  prm_model_free(m);
  prm_model_free(other);
}

static void test_evaluate(void **state) {
  (void)state;
  prm_model *m = prmt_linear(3, 9);
  prm_ctx *inf = prmt_ctx(m, 6, 1), *c = prmt_ctx(m, 6, 0);
  prmt_rng r = {4};
  float x[18], s[6];
  prmt_fill_normal(&r, x, 18, 1.0);
  prm_batch b = prmt_batch(x, 6, 3);
  prm_loss_stats se = PRM_LOSS_STATS_INIT, sr = PRM_LOSS_STATS_INIT, st = PRM_LOSS_STATS_INIT;
  assert_int_equal(prm_evaluate(inf, &b, NULL, &se), PRM_OK);
  assert_int_equal(prm_ctx_forward(inf, &b, s, 6), PRM_OK);
  assert_int_equal(prm_loss_bt(s, s + 3, 3, NULL, NULL, &sr, NULL, NULL), PRM_OK);
  assert_true(se.loss == sr.loss && se.accuracy == sr.accuracy);
  assert_true(se.reward_std == sr.reward_std && se.margin_mean == sr.margin_mean);
  /* on a training context: same numbers, no gradient, nothing pending */
  assert_int_equal(prm_evaluate(c, &b, NULL, &st), PRM_OK);
  assert_true(st.loss == se.loss);
  float ds[6] = {0};
  ASSERT_FAILS(prm_ctx_backward(c, ds, 6), PRM_ERR_STATE);
  prm_ctx_free(inf);
  prm_ctx_free(c);
  prm_model_free(m);
}

/* No heap allocation inside a training step after the first (glibc only). */
static void test_no_allocation_in_steps(void **state) {
  (void)state;
#if defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 33))
  uint64_t hidden[2] = {64, 32};
  prm_model *m = prmt_mlp(48, hidden, 2, PRM_ACT_GELU_TANH, 1);
  prm_ctx *c = prmt_ctx(m, 64, 0);
  prm_optimizer *opt = adamw(m);
  prmt_rng r = {2};
  float *x = malloc(64 * 48 * sizeof(float));
  prmt_fill_normal(&r, x, 64 * 48, 1.0);
  prm_batch b = prmt_batch(x, 64, 48);
  prm_loss_stats st = PRM_LOSS_STATS_INIT;
  assert_int_equal(prm_train_step(c, opt, &b, NULL, &st), PRM_OK);
  struct mallinfo2 before = mallinfo2();
  for (int i = 0; i < 20; i++)
    assert_int_equal(prm_train_step(c, opt, &b, NULL, &st), PRM_OK);
  assert_int_equal(prm_evaluate(c, &b, NULL, &st), PRM_OK);
  struct mallinfo2 after = mallinfo2();
  assert_int_equal(before.uordblks, after.uordblks);
  assert_int_equal(before.hblks, after.hblks);
  free(x);
  prm_optimizer_free(opt);
  prm_ctx_free(c);
  prm_model_free(m);
#else
  skip();
#endif
}

static void test_status_strings(void **state) {
  (void)state;
  for (int s = 0; s >= -12; s--) {
    const char *t = prm_status_string(s);
    assert_non_null(t);
    assert_true(strncmp(t, "PRM_", 4) == 0);
  }
  assert_string_equal(prm_status_string(-999), "unknown status");
  assert_string_equal(prm_status_string(5), "unknown status");
  assert_int_equal(prm_version_number(), PRM_VERSION_NUMBER);
  assert_string_equal(prm_version_string(), PRM_VERSION_STRING);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_status_strings),
      cmocka_unit_test(test_model_options_errors),
      cmocka_unit_test(test_model_new_errors),
      cmocka_unit_test(test_model_queries),
      cmocka_unit_test(test_model_init_deterministic),
      cmocka_unit_test(test_ctx_errors),
      cmocka_unit_test(test_batch_init),
      cmocka_unit_test(test_forward_errors),
      cmocka_unit_test(test_nonfinite_features_all_paths),
      cmocka_unit_test(test_forward_matches_reference),
      cmocka_unit_test(test_gradients_linear),
      cmocka_unit_test(test_gradients_mlp),
      cmocka_unit_test(test_gradients_through_loss),
      cmocka_unit_test(test_gradient_accumulation),
      cmocka_unit_test(test_train_step_equals_manual),
      cmocka_unit_test(test_train_step_linear_blocked),
      cmocka_unit_test(test_train_step_errors),
      cmocka_unit_test(test_evaluate),
      cmocka_unit_test(test_no_allocation_in_steps),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
