/*
 * test_loss.c - the Bradley-Terry loss (prm_loss_bt) and its option/statistics
 * structs: closed forms, finite-difference gradients of every variant,
 * stability for huge scores, statistics, and every error path.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
/* cmocka.h needs the three headers above first */
#include <cmocka.h>

#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "testutil.h"

#define LN2 0.69314718055994530942

#define assert_close(got, want, tol)                                                               \
  do {                                                                                             \
    double got_ = (double)(got), want_ = (double)(want), tol_ = (double)(tol);                     \
    if (!(fabs(got_ - want_) <= tol_))                                                             \
      fail_msg("%s = %.17g, expected %.17g (|diff| %.3g > tol %.3g)", #got, got_, want_,           \
               fabs(got_ - want_), tol_);                                                          \
  } while (0)

/* Relative closeness for values spanning many magnitudes. */
#define assert_rel(got, want, rel) assert_close(got, want, (rel)*fabs((double)(want)))

static double sigmoid(double z) { return 1.0 / (1.0 + exp(-z)); }

/* -log s(z), straightforward; fine for the moderate z the tests feed it. */
static double nls(double z) { return log1p(exp(-z)); }

static prm_loss_options opts_default(void) {
  prm_loss_options o;
  assert_int_equal(prm_loss_options_init(&o, PRM_LOSS_OPTIONS_VERSION), PRM_OK);
  return o;
}

static prm_loss_stats stats_default(void) {
  prm_loss_stats s;
  assert_int_equal(prm_loss_stats_init(&s, PRM_LOSS_STATS_VERSION), PRM_OK);
  return s;
}

/* Loss only; fails the test on error. */
static double loss_of(const float *rc, const float *rr, uint64_t n, const prm_loss_options *o) {
  double l = NAN;
  int st = prm_loss_bt(rc, rr, n, o, &l, NULL, NULL, NULL);
  if (st != PRM_OK) fail_msg("prm_loss_bt: %s (%s)", prm_status_string(st), prm_last_errmsg());
  return l;
}

/* Loss and gradients; fails the test on error. */
static double loss_grad(const float *rc, const float *rr, uint64_t n, const prm_loss_options *o,
                        float *dc, float *dr) {
  double l = NAN;
  int st = prm_loss_bt(rc, rr, n, o, &l, NULL, dc, dr);
  if (st != PRM_OK) fail_msg("prm_loss_bt: %s (%s)", prm_status_string(st), prm_last_errmsg());
  return l;
}

/* ---- finite differences -------------------------------------------------------- */

#define FD_N 9

/*
 * Central difference of the (double) loss with respect to one float score.
 * The step 2^-10 is exact for |x| < 2^13, but the actual perturbation is
 * measured anyway so the check stays honest for any x.
 */
static double fd_derivative(float *rc, float *rr, uint64_t n, const prm_loss_options *o, float *x) {
  const float x0 = *x;
  const float xp = x0 + 0x1p-10f, xm = x0 - 0x1p-10f;
  *x = xp;
  double lp = loss_of(rc, rr, n, o);
  *x = xm;
  double lm = loss_of(rc, rr, n, o);
  *x = x0;
  return (lp - lm) / ((double)xp - (double)xm);
}

static void check_fd(float *rc, float *rr, uint64_t n, const prm_loss_options *o) {
  float dc[FD_N], dr[FD_N];
  assert_true(n <= FD_N);
  loss_grad(rc, rr, n, o, dc, dr);
  for (uint64_t i = 0; i < n; i++) {
    double fc = fd_derivative(rc, rr, n, o, &rc[i]);
    double fr = fd_derivative(rc, rr, n, o, &rr[i]);
    /* float gradients carry ~6e-8 relative rounding; the O(h^2) truncation
     * error of the central difference is ~1e-7 for these smooth losses. */
    assert_close(dc[i], fc, 1e-6 + 1e-5 * fabs(fc));
    assert_close(dr[i], fr, 1e-6 + 1e-5 * fabs(fr));
  }
}

typedef struct fd_data {
  float rc[FD_N], rr[FD_N], margin[FD_N], label[FD_N], weight[FD_N];
} fd_data;

static void fd_fill(fd_data *d, uint64_t seed) {
  prmt_rng r = {seed};
  prmt_fill_normal(&r, d->rc, FD_N, 2.0);
  prmt_fill_normal(&r, d->rr, FD_N, 2.0);
  prmt_fill_normal(&r, d->margin, FD_N, 1.0);
  for (int i = 0; i < FD_N; i++) {
    d->label[i] = (float)prmt_uniform(&r);
    d->weight[i] = (float)(2.0 * prmt_uniform(&r));
  }
  d->label[0] = 1.0f; /* the edges of the valid ranges too */
  d->label[1] = 0.0f;
  d->weight[2] = 0.0f;
}

static void test_fd_plain(void **state) {
  (void)state;
  fd_data d;
  for (uint64_t seed = 1; seed <= 3; seed++) {
    fd_fill(&d, seed);
    check_fd(d.rc, d.rr, FD_N, NULL);
    prm_loss_options o = opts_default(); /* explicit defaults = NULL opts */
    check_fd(d.rc, d.rr, FD_N, &o);
  }
  /* a single pair */
  fd_fill(&d, 4);
  check_fd(d.rc, d.rr, 1, NULL);
}

static void test_fd_margin(void **state) {
  (void)state;
  fd_data d;
  fd_fill(&d, 11);
  prm_loss_options o = opts_default();
  o.margin = d.margin;
  check_fd(d.rc, d.rr, FD_N, &o);
}

static void test_fd_label(void **state) {
  (void)state;
  fd_data d;
  fd_fill(&d, 12);
  prm_loss_options o = opts_default();
  o.label = d.label;
  check_fd(d.rc, d.rr, FD_N, &o);
}

static void test_fd_weight(void **state) {
  (void)state;
  fd_data d;
  fd_fill(&d, 13);
  prm_loss_options o = opts_default();
  o.weight = d.weight;
  check_fd(d.rc, d.rr, FD_N, &o);
}

static void test_fd_center(void **state) {
  (void)state;
  fd_data d;
  fd_fill(&d, 14);
  prm_loss_options o = opts_default();
  o.center_coef = 0.37;
  check_fd(d.rc, d.rr, FD_N, &o);
  o.center_coef = 5.0; /* centring dominating the pair term */
  check_fd(d.rc, d.rr, FD_N, &o);
}

static void test_fd_combined(void **state) {
  (void)state;
  fd_data d;
  for (uint64_t seed = 21; seed <= 24; seed++) {
    fd_fill(&d, seed);
    prm_loss_options o = opts_default();
    o.margin = d.margin;
    o.label = d.label;
    o.weight = d.weight;
    o.center_coef = 0.05;
    check_fd(d.rc, d.rr, FD_N, &o);
  }
}

/* Large |z|: the gradients are ~e^-|z|, far below what 1 - s(z) resolves. */
static void test_fd_tiny_gradients(void **state) {
  (void)state;
  float rc[4] = {30.0f, 45.0f, -2.0f, 0.5f}, rr[4] = {0.0f, 2.0f, 36.0f, -40.0f};
  float dc[4], dr[4];
  loss_grad(rc, rr, 4, NULL, dc, dr);
  for (int i = 0; i < 4; i++) {
    double z = (double)rc[i] - (double)rr[i];
    double want = -sigmoid(-z) / 4.0; /* s(z) - 1 = -s(-z) */
    assert_rel(dc[i], want, 1e-6);
    assert_rel(dr[i], -want, 1e-6);
  }
  check_fd(rc, rr, 4, NULL);
  /* p = 0 mirrors it: gradient s(z) for very negative z */
  float lab[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  prm_loss_options o = opts_default();
  o.label = lab;
  loss_grad(rr, rc, 4, &o, dc, dr);
  for (int i = 0; i < 4; i++) {
    double z = (double)rr[i] - (double)rc[i];
    assert_rel(dc[i], sigmoid(z) / 4.0, 1e-6);
  }
  check_fd(rr, rc, 4, &o);
}

/* ---- closed forms ----------------------------------------------------------------- */

static void test_closed_forms(void **state) {
  (void)state;
  float dc[2], dr[2];

  /* z = 0: loss log 2, gradient -/+ 1/(2n) */
  float a[2] = {0.0f, 3.5f}, b[2] = {0.0f, 3.5f};
  assert_close(loss_grad(a, b, 2, NULL, dc, dr), LN2, 1e-15);
  assert_close(dc[0], -0.25, 0.0);
  assert_close(dr[1], 0.25, 0.0);

  /* z = 1: log(1 + e^-1), gradient -s(-1) */
  float c1 = 1.0f, r0 = 0.0f;
  assert_close(loss_grad(&c1, &r0, 1, NULL, dc, dr), nls(1.0), 1e-15);
  assert_close(dc[0], -sigmoid(-1.0), 1e-7);
  assert_close(dr[0], sigmoid(-1.0), 1e-7);

  /* margin (Llama 2): r_c - r_r = 1 with margin 1 is z = 0 */
  float c2 = 2.0f, r1 = 1.0f, m1 = 1.0f;
  prm_loss_options o = opts_default();
  o.margin = &m1;
  assert_close(loss_grad(&c2, &r1, 1, &o, dc, dr), LN2, 1e-15);
  assert_close(dc[0], -0.5, 0.0);
  /* a negative margin makes the pair easier */
  float mneg = -1.0f;
  o.margin = &mneg;
  assert_close(loss_of(&c2, &r1, 1, &o), nls(2.0), 1e-15);

  /* soft label p = 0.25 at z = 1 */
  float p = 0.25f;
  o = opts_default();
  o.label = &p;
  assert_close(loss_grad(&c1, &r0, 1, &o, dc, dr), 0.25 * nls(1.0) + 0.75 * nls(-1.0), 1e-15);
  assert_close(dc[0], sigmoid(1.0) - 0.25, 1e-7);
  assert_close(dr[0], 0.25 - sigmoid(1.0), 1e-7);

  /* weights: mean over n of w_i l_i (not normalised by sum w) */
  float wc[2] = {0.0f, 1.0f}, wr[2] = {0.0f, 0.0f}, w[2] = {2.0f, 0.5f};
  o = opts_default();
  o.weight = w;
  assert_close(loss_grad(wc, wr, 2, &o, dc, dr), (2.0 * LN2 + 0.5 * nls(1.0)) / 2.0, 1e-15);
  assert_close(dc[0], 2.0 * -0.5 / 2.0, 1e-7);
  assert_close(dc[1], 0.5 * -sigmoid(-1.0) / 2.0, 1e-7);

  /* centring: r_c = 1, r_r = 2, c = 0.1 -> z = -1, (r_c + r_r)^2 = 9 */
  float c3 = 1.0f, r2 = 2.0f;
  o = opts_default();
  o.center_coef = 0.1;
  assert_close(loss_grad(&c3, &r2, 1, &o, dc, dr), nls(-1.0) + 0.9, 1e-15);
  assert_close(dc[0], -sigmoid(1.0) + 0.6, 1e-7);
  assert_close(dr[0], sigmoid(1.0) + 0.6, 1e-7);
  /* centring only sees r_c + r_r: zero when they cancel */
  float c4 = 1.0f, r4 = -1.0f;
  assert_close(loss_of(&c4, &r4, 1, &o), nls(2.0), 1e-15);

  /* loss pointer is optional: gradients alone */
  assert_int_equal(prm_loss_bt(&c1, &r0, 1, NULL, NULL, NULL, dc, dr), PRM_OK);
  assert_close(dc[0], -sigmoid(-1.0), 1e-7);
  /* nothing requested at all is still a valid (validating) call */
  assert_int_equal(prm_loss_bt(&c1, &r0, 1, NULL, NULL, NULL, NULL, NULL), PRM_OK);
}

/* Options that equal the defaults give bit-identical results. */
static void test_neutral_options(void **state) {
  (void)state;
  fd_data d;
  fd_fill(&d, 31);
  float ones[FD_N], zeros[FD_N];
  for (int i = 0; i < FD_N; i++)
    ones[i] = 1.0f, zeros[i] = 0.0f;
  float dc0[FD_N], dr0[FD_N], dc1[FD_N], dr1[FD_N];
  double l0 = loss_grad(d.rc, d.rr, FD_N, NULL, dc0, dr0);
  prm_loss_options o = opts_default();
  o.label = ones;
  o.weight = ones;
  o.margin = zeros;
  double l1 = loss_grad(d.rc, d.rr, FD_N, &o, dc1, dr1);
  assert_true(l0 == l1);
  assert_memory_equal(dc0, dc1, sizeof dc0);
  assert_memory_equal(dr0, dr1, sizeof dr0);
}

/* Label smoothing: p = 0.5 makes the loss symmetric in the two responses. */
static void test_label_smoothing(void **state) {
  (void)state;
  fd_data d;
  fd_fill(&d, 41);
  float half[FD_N];
  for (int i = 0; i < FD_N; i++)
    half[i] = 0.5f;
  prm_loss_options o = opts_default();
  o.label = half;
  float dc[FD_N], dr[FD_N], sc[FD_N], sr[FD_N];
  double l = loss_grad(d.rc, d.rr, FD_N, &o, dc, dr);
  double ls = loss_grad(d.rr, d.rc, FD_N, &o, sc, sr); /* swapped */
  assert_close(ls, l, 1e-15 * l);
  for (int i = 0; i < FD_N; i++) {
    assert_close(sc[i], dr[i], 0.0);
    assert_close(sr[i], dc[i], 0.0);
    assert_close(dc[i], -dr[i], 0.0);
  }
  /* at z = 0 the optimum: loss log 2, zero gradient */
  float z0 = 1.25f;
  assert_close(loss_grad(&z0, &z0, 1, &o, dc, dr), LN2, 1e-15);
  assert_close(dc[0], 0.0, 0.0);
  /* smoothing eps = 0.1: p = 0.9 -> 0.9 (-log s(z)) + 0.1 (-log s(-z)) */
  float p = 0.9f, c = 2.0f, r = 0.0f;
  o.label = &p;
  assert_close(loss_grad(&c, &r, 1, &o, dc, dr),
               (double)p * nls(2.0) + (1.0 - (double)p) * nls(-2.0), 1e-15);
  assert_close(dc[0], sigmoid(2.0) - (double)p, 1e-7);
  /* ...whose gradient changes sign beyond the target: z large pushes back */
  float cbig = 10.0f;
  loss_grad(&cbig, &r, 1, &o, dc, dr);
  assert_true(dc[0] > 0.0f);
}

/* ---- stability ---------------------------------------------------------------------- */

static void test_stability_huge(void **state) {
  (void)state;
  float dc[4], dr[4];
  const float big = 1e30f;

  /* z = +1e30: loss exactly 0, gradient exactly 0 (limit -e^-z) */
  float c = big, r = 0.0f;
  assert_close(loss_grad(&c, &r, 1, NULL, dc, dr), 0.0, 0.0);
  assert_true(dc[0] == 0.0f && dr[0] == 0.0f);

  /* z = -1e30: loss = |z| (softplus(x) -> x), gradient -1 / +1 */
  c = -big;
  assert_close(loss_grad(&c, &r, 1, NULL, dc, dr), (double)big, 0.0);
  assert_close(dc[0], -1.0, 0.0);
  assert_close(dr[0], 1.0, 0.0);

  /* FLT_MAX apart in both directions: z = +-2 FLT_MAX is still exact in double */
  float cm[2] = {FLT_MAX, -FLT_MAX}, rm[2] = {-FLT_MAX, FLT_MAX};
  double l = loss_grad(cm, rm, 2, NULL, dc, dr);
  assert_close(l, 2.0 * (double)FLT_MAX / 2.0, 0.0);
  assert_true(dc[0] == 0.0f && dr[0] == 0.0f);
  assert_close(dc[1], -0.5, 0.0);
  assert_close(dr[1], 0.5, 0.0);

  /* with margins -FLT_MAX on top: |z| = 3 FLT_MAX */
  float m[2] = {-FLT_MAX, FLT_MAX};
  prm_loss_options o = opts_default();
  o.margin = m;
  l = loss_grad(cm, rm, 2, &o, dc, dr);
  assert_close(l, 3.0 * (double)FLT_MAX / 2.0, 0.0);
  assert_true(isfinite(dc[0]) && isfinite(dc[1]));

  /* soft label at z = -1e30: each side contributes half */
  float half = 0.5f, cneg = -big, zero = 0.0f;
  o = opts_default();
  o.label = &half;
  assert_close(loss_grad(&cneg, &zero, 1, &o, dc, dr), 0.5 * (double)big, 0.0);
  assert_close(dc[0], -0.5, 0.0);

  /* weights at FLT_MAX times a loss of 2 FLT_MAX: fine in double */
  float wmax = FLT_MAX, cmx = -FLT_MAX, rmx = FLT_MAX;
  o = opts_default();
  o.weight = &wmax;
  l = loss_grad(&cmx, &rmx, 1, &o, dc, dr);
  assert_true(isfinite(l));
  assert_rel(l, 2.0 * (double)FLT_MAX * (double)FLT_MAX, 1e-15);
  assert_close(dc[0], -(double)FLT_MAX, 0.0);

  /* centring at FLT_MAX: loss (2 FLT_MAX)^2 is finite in double; the gradient
   * 4 FLT_MAX does not fit a float and saturates at FLT_MAX */
  float fm = FLT_MAX;
  o = opts_default();
  o.center_coef = 1.0;
  l = loss_grad(&fm, &fm, 1, &o, dc, dr);
  assert_rel(l, 4.0 * (double)FLT_MAX * (double)FLT_MAX, 1e-15);
  assert_true(dc[0] == FLT_MAX && dr[0] == FLT_MAX);
  float fmn = -FLT_MAX;
  loss_grad(&fmn, &fmn, 1, &o, dc, dr);
  assert_true(dc[0] == -FLT_MAX && dr[0] == -FLT_MAX);

  /* denormals and signed zeros are ordinary finite inputs */
  float sub[3] = {FLT_TRUE_MIN, -0.0f, 1e-40f}, zs[3] = {0.0f, 0.0f, -1e-40f};
  l = loss_grad(sub, zs, 3, NULL, dc, dr);
  assert_close(l, LN2, 1e-15);
}

/* ---- statistics ---------------------------------------------------------------------- */

static void test_stats(void **state) {
  (void)state;
  /* rewards 1,2,3,0 | 0,2,4,0: mean 1.5, squared deviations sum 16 -> var 2 */
  float rc[4] = {1.0f, 2.0f, 3.0f, 0.0f}, rr[4] = {0.0f, 2.0f, 4.0f, 0.0f};
  prm_loss_stats s = stats_default();
  double l = NAN;
  assert_int_equal(prm_loss_bt(rc, rr, 4, NULL, &l, &s, NULL, NULL), PRM_OK);
  assert_int_equal(s.version, PRM_LOSS_STATS_VERSION);
  assert_true(s.loss == l);
  assert_close(l, (nls(1.0) + LN2 + nls(-1.0) + LN2) / 4.0, 1e-15);
  assert_close(s.accuracy, (1.0 + 0.5 + 0.0 + 0.5) / 4.0, 0.0); /* ties count 1/2 */
  assert_close(s.reward_mean, 1.5, 1e-15);
  assert_close(s.reward_std, sqrt(2.0), 1e-15);
  assert_close(s.margin_mean, 0.0, 1e-15);

  /* margins change the loss, never the accuracy or margin_mean */
  float m[4] = {5.0f, 5.0f, -5.0f, 5.0f};
  prm_loss_options o = opts_default();
  o.margin = m;
  prm_loss_stats s2 = stats_default();
  assert_int_equal(prm_loss_bt(rc, rr, 4, &o, NULL, &s2, NULL, NULL), PRM_OK);
  assert_close(s2.accuracy, s.accuracy, 0.0);
  assert_close(s2.margin_mean, 0.0, 1e-15);
  assert_close(s2.reward_std, s.reward_std, 0.0);
  assert_true(s2.loss > s.loss);

  /* all correct, all wrong, mean margin */
  float a[3] = {3.0f, 1.0f, 0.5f}, b[3] = {1.0f, 0.0f, -1.0f};
  prm_loss_stats s3 = stats_default();
  assert_int_equal(prm_loss_bt(a, b, 3, NULL, NULL, &s3, NULL, NULL), PRM_OK);
  assert_close(s3.accuracy, 1.0, 0.0);
  assert_close(s3.margin_mean, (2.0 + 1.0 + 1.5) / 3.0, 1e-15);
  assert_int_equal(prm_loss_bt(b, a, 3, NULL, NULL, &s3, NULL, NULL), PRM_OK);
  assert_close(s3.accuracy, 0.0, 0.0);
  assert_close(s3.margin_mean, -(2.0 + 1.0 + 1.5) / 3.0, 1e-15);

  /* a big common offset does not cost precision (two-pass std) */
  float oc[2] = {1000000.5f, 1000001.5f}, orr[2] = {999999.5f, 1000000.5f};
  prm_loss_stats s4 = stats_default();
  assert_int_equal(prm_loss_bt(oc, orr, 2, NULL, NULL, &s4, NULL, NULL), PRM_OK);
  assert_close(s4.reward_mean, 1000000.5, 0.0);
  assert_close(s4.reward_std, sqrt(0.5), 1e-12);
  assert_close(s4.accuracy, 1.0, 0.0);

  /* all equal: std exactly 0, accuracy 1/2 */
  float e[2] = {7.0f, 7.0f};
  assert_int_equal(prm_loss_bt(e, e, 2, NULL, NULL, &s4, NULL, NULL), PRM_OK);
  assert_close(s4.reward_std, 0.0, 0.0);
  assert_close(s4.accuracy, 0.5, 0.0);
  assert_close(s4.loss, LN2, 1e-15);

  /* stats with weights/centring report the same loss as *loss */
  fd_data d;
  fd_fill(&d, 51);
  o = opts_default();
  o.weight = d.weight;
  o.label = d.label;
  o.center_coef = 0.2;
  prm_loss_stats s5 = stats_default();
  float dc[FD_N], dr[FD_N];
  assert_int_equal(prm_loss_bt(d.rc, d.rr, FD_N, &o, &l, &s5, dc, dr), PRM_OK);
  assert_true(s5.loss == l);
}

/* ---- errors --------------------------------------------------------------------------- */

#define SENT 777.0f

typedef struct outputs {
  double loss;
  prm_loss_stats stats;
  float dc[4], dr[4];
} outputs;

static void outputs_fill(outputs *o) {
  o->loss = SENT;
  o->stats.version = PRM_LOSS_STATS_VERSION;
  o->stats.loss = o->stats.accuracy = o->stats.reward_mean = SENT;
  o->stats.reward_std = o->stats.margin_mean = SENT;
  for (int i = 0; i < 4; i++)
    o->dc[i] = o->dr[i] = SENT;
}

static void outputs_untouched(const outputs *o, uint32_t stats_version) {
  assert_true(o->loss == SENT);
  assert_int_equal(o->stats.version, stats_version);
  assert_true(o->stats.loss == SENT && o->stats.accuracy == SENT);
  assert_true(o->stats.reward_mean == SENT && o->stats.reward_std == SENT);
  assert_true(o->stats.margin_mean == SENT);
  for (int i = 0; i < 4; i++)
    assert_true(o->dc[i] == SENT && o->dr[i] == SENT);
}

/* Run prm_loss_bt with every output requested; expect `status`, a message
 * containing `needle`, and untouched outputs. */
static void expect_fail(int status, const char *needle, const float *rc, const float *rr,
                        uint64_t n, const prm_loss_options *opt, uint32_t stats_version) {
  outputs out;
  outputs_fill(&out);
  out.stats.version = stats_version;
  int st = prm_loss_bt(rc, rr, n, opt, &out.loss, &out.stats, out.dc, out.dr);
  if (st != status)
    fail_msg("expected %s, got %s (%s)", prm_status_string(status), prm_status_string(st),
             prm_last_errmsg());
  const char *msg = prm_last_errmsg();
  assert_non_null(msg);
  assert_true(msg[0] != '\0');
  if (strstr(msg, needle) == NULL) fail_msg("message \"%s\" lacks \"%s\"", msg, needle);
  outputs_untouched(&out, stats_version);
}

static const float GOOD_C[4] = {1.0f, 2.0f, 3.0f, 4.0f};
static const float GOOD_R[4] = {0.0f, 2.5f, 1.0f, 4.0f};

static void test_err_pointers_sizes(void **state) {
  (void)state;
  const uint32_t V = PRM_LOSS_STATS_VERSION;
  expect_fail(PRM_ERR_NULL, "r_chosen", NULL, GOOD_R, 4, NULL, V);
  expect_fail(PRM_ERR_NULL, "r_rejected", GOOD_C, NULL, 4, NULL, V);
  expect_fail(PRM_ERR_SIZE, "n_pairs", GOOD_C, GOOD_R, 0, NULL, V);

  /* exactly one gradient pointer */
  outputs out;
  outputs_fill(&out);
  assert_int_equal(prm_loss_bt(GOOD_C, GOOD_R, 4, NULL, &out.loss, &out.stats, out.dc, NULL),
                   PRM_ERR_INVALID);
  assert_non_null(strstr(prm_last_errmsg(), "d_rejected is NULL"));
  outputs_untouched(&out, V);
  assert_int_equal(prm_loss_bt(GOOD_C, GOOD_R, 4, NULL, &out.loss, &out.stats, NULL, out.dr),
                   PRM_ERR_INVALID);
  assert_non_null(strstr(prm_last_errmsg(), "d_chosen is NULL"));
  outputs_untouched(&out, V);
}

static void test_err_versions(void **state) {
  (void)state;
  prm_loss_options o = opts_default();
  o.version = 0;
  expect_fail(PRM_ERR_VERSION, "opts", GOOD_C, GOOD_R, 4, &o, PRM_LOSS_STATS_VERSION);
  o.version = PRM_LOSS_OPTIONS_VERSION + 1;
  expect_fail(PRM_ERR_VERSION, "opts", GOOD_C, GOOD_R, 4, &o, PRM_LOSS_STATS_VERSION);
  expect_fail(PRM_ERR_VERSION, "stats", GOOD_C, GOOD_R, 4, NULL, 0);
  expect_fail(PRM_ERR_VERSION, "stats", GOOD_C, GOOD_R, 4, NULL, PRM_LOSS_STATS_VERSION + 1);
}

static void test_err_nonfinite(void **state) {
  (void)state;
  const uint32_t V = PRM_LOSS_STATS_VERSION;
  float bad[4];
  const float vals[3] = {NAN, INFINITY, -INFINITY};
  for (int k = 0; k < 3; k++) {
    memcpy(bad, GOOD_C, sizeof bad);
    bad[2] = vals[k];
    expect_fail(PRM_ERR_NONFINITE, "r_chosen[2]", bad, GOOD_R, 4, NULL, V);
    memcpy(bad, GOOD_R, sizeof bad);
    bad[1] = vals[k];
    expect_fail(PRM_ERR_NONFINITE, "r_rejected[1]", GOOD_C, bad, 4, NULL, V);

    prm_loss_options o = opts_default();
    float arr[4] = {0.0f, 0.5f, 1.0f, 0.25f};
    arr[3] = vals[k];
    o.margin = arr;
    expect_fail(PRM_ERR_NONFINITE, "margin[3]", GOOD_C, GOOD_R, 4, &o, V);
    o = opts_default();
    o.label = arr;
    expect_fail(PRM_ERR_NONFINITE, "label[3]", GOOD_C, GOOD_R, 4, &o, V);
    o = opts_default();
    o.weight = arr;
    expect_fail(PRM_ERR_NONFINITE, "weight[3]", GOOD_C, GOOD_R, 4, &o, V);
    o = opts_default();
    o.center_coef = (double)vals[k];
    expect_fail(PRM_ERR_NONFINITE, "center_coef", GOOD_C, GOOD_R, 4, &o, V);
  }
}

static void test_err_ranges(void **state) {
  (void)state;
  const uint32_t V = PRM_LOSS_STATS_VERSION;
  prm_loss_options o = opts_default();
  float lab[4] = {1.0f, 1.5f, 0.0f, 0.5f};
  o.label = lab;
  expect_fail(PRM_ERR_INVALID, "label[1]", GOOD_C, GOOD_R, 4, &o, V);
  lab[1] = -0.125f;
  expect_fail(PRM_ERR_INVALID, "label[1]", GOOD_C, GOOD_R, 4, &o, V);
  lab[1] = nextafterf(1.0f, 2.0f);
  expect_fail(PRM_ERR_INVALID, "label[1]", GOOD_C, GOOD_R, 4, &o, V);

  o = opts_default();
  float w[4] = {1.0f, 0.0f, -0.0f, -1e-30f};
  o.weight = w;
  expect_fail(PRM_ERR_INVALID, "weight[3]", GOOD_C, GOOD_R, 4, &o, V);

  o = opts_default();
  o.center_coef = -1e-3;
  expect_fail(PRM_ERR_INVALID, "center_coef", GOOD_C, GOOD_R, 4, &o, V);

  /* the edges are accepted: labels 0 and 1, weights +0 and -0, coef 0 */
  o = opts_default();
  lab[1] = 1.0f;
  w[3] = 0.0f;
  o.label = lab;
  o.weight = w;
  o.center_coef = 0.0;
  double l = NAN;
  assert_int_equal(prm_loss_bt(GOOD_C, GOOD_R, 4, &o, &l, NULL, NULL, NULL), PRM_OK);
  assert_true(isfinite(l));
}

/* The finiteness scan works in blocks; a bad value anywhere is found and named. */
static void test_err_nonfinite_long(void **state) {
  (void)state;
  enum { N = 10007 };
  float *rc = malloc(N * sizeof *rc), *rr = malloc(N * sizeof *rr);
  assert_non_null(rc);
  assert_non_null(rr);
  prmt_rng r = {61};
  prmt_fill_normal(&r, rc, N, 1.0);
  prmt_fill_normal(&r, rr, N, 1.0);
  rc[17] = FLT_MAX; /* large but finite values must pass */
  rr[5000] = -FLT_MAX;
  double l = NAN;
  assert_int_equal(prm_loss_bt(rc, rr, N, NULL, &l, NULL, NULL, NULL), PRM_OK);
  assert_true(isfinite(l));

  const size_t where[] = {0, 4095, 4096, 8191, 8192, N - 1};
  char needle[32];
  for (size_t k = 0; k < sizeof where / sizeof where[0]; k++) {
    float keep = rr[where[k]];
    rr[where[k]] = k % 2 ? NAN : -INFINITY;
    snprintf(needle, sizeof needle, "r_rejected[%zu]", where[k]);
    l = SENT;
    assert_int_equal(prm_loss_bt(rc, rr, N, NULL, &l, NULL, NULL, NULL), PRM_ERR_NONFINITE);
    if (strstr(prm_last_errmsg(), needle) == NULL)
      fail_msg("message \"%s\" lacks \"%s\"", prm_last_errmsg(), needle);
    assert_true(l == SENT);
    rr[where[k]] = keep;
  }
  free(rc);
  free(rr);
}

/* ---- init functions ------------------------------------------------------------------- */

static void test_options_init(void **state) {
  (void)state;
  const prm_loss_options macro = PRM_LOSS_OPTIONS_INIT;
  prm_loss_options o;
  memset(&o, 0xAB, sizeof o);
  assert_int_equal(prm_loss_options_init(&o, PRM_LOSS_OPTIONS_VERSION), PRM_OK);
  assert_int_equal(o.version, macro.version);
  assert_null(o.margin);
  assert_null(o.label);
  assert_null(o.weight);
  assert_true(o.center_coef == 0.0);

  assert_int_equal(prm_loss_options_init(NULL, PRM_LOSS_OPTIONS_VERSION), PRM_ERR_NULL);
  assert_true(prm_last_errmsg()[0] != '\0');
  assert_non_null(strstr(prm_last_errmsg(), "NULL"));

  prm_loss_options before;
  memset(&o, 0xCD, sizeof o);
  memcpy(&before, &o, sizeof o);
  assert_int_equal(prm_loss_options_init(&o, 0), PRM_ERR_VERSION);
  assert_non_null(strstr(prm_last_errmsg(), "version 0"));
  assert_memory_equal(&o, &before, sizeof o);
  assert_int_equal(prm_loss_options_init(&o, PRM_LOSS_OPTIONS_VERSION + 1), PRM_ERR_VERSION);
  assert_true(prm_last_errmsg()[0] != '\0');
  assert_memory_equal(&o, &before, sizeof o);

  /* the macro and the function agree and are accepted by prm_loss_bt */
  double l1 = loss_of(GOOD_C, GOOD_R, 4, &macro);
  double l2 = loss_of(GOOD_C, GOOD_R, 4, NULL);
  assert_true(l1 == l2);
}

static void test_stats_init(void **state) {
  (void)state;
  const prm_loss_stats macro = PRM_LOSS_STATS_INIT;
  prm_loss_stats s;
  memset(&s, 0xAB, sizeof s);
  assert_int_equal(prm_loss_stats_init(&s, PRM_LOSS_STATS_VERSION), PRM_OK);
  assert_int_equal(s.version, macro.version);
  assert_true(s.loss == 0.0 && s.accuracy == 0.0 && s.reward_mean == 0.0);
  assert_true(s.reward_std == 0.0 && s.margin_mean == 0.0);

  assert_int_equal(prm_loss_stats_init(NULL, PRM_LOSS_STATS_VERSION), PRM_ERR_NULL);
  assert_non_null(strstr(prm_last_errmsg(), "NULL"));

  prm_loss_stats before;
  memset(&s, 0xCD, sizeof s);
  memcpy(&before, &s, sizeof s);
  assert_int_equal(prm_loss_stats_init(&s, 0), PRM_ERR_VERSION);
  assert_non_null(strstr(prm_last_errmsg(), "version 0"));
  assert_memory_equal(&s, &before, sizeof s);
  assert_int_equal(prm_loss_stats_init(&s, PRM_LOSS_STATS_VERSION + 1), PRM_ERR_VERSION);
  assert_true(prm_last_errmsg()[0] != '\0');
  assert_memory_equal(&s, &before, sizeof s);

  /* a macro-initialised struct is accepted */
  prm_loss_stats sm = PRM_LOSS_STATS_INIT;
  assert_int_equal(prm_loss_bt(GOOD_C, GOOD_R, 4, NULL, NULL, &sm, NULL, NULL), PRM_OK);
  assert_true(sm.accuracy > 0.0);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_fd_plain),           cmocka_unit_test(test_fd_margin),
      cmocka_unit_test(test_fd_label),           cmocka_unit_test(test_fd_weight),
      cmocka_unit_test(test_fd_center),          cmocka_unit_test(test_fd_combined),
      cmocka_unit_test(test_fd_tiny_gradients),  cmocka_unit_test(test_closed_forms),
      cmocka_unit_test(test_neutral_options),    cmocka_unit_test(test_label_smoothing),
      cmocka_unit_test(test_stability_huge),     cmocka_unit_test(test_stats),
      cmocka_unit_test(test_err_pointers_sizes), cmocka_unit_test(test_err_versions),
      cmocka_unit_test(test_err_nonfinite),      cmocka_unit_test(test_err_ranges),
      cmocka_unit_test(test_err_nonfinite_long), cmocka_unit_test(test_options_init),
      cmocka_unit_test(test_stats_init),
  };
  return cmocka_run_group_tests_name("loss", tests, NULL, NULL);
}
