/*
 * test_ties_ranks.c - the tie models of prm_loss_bt (Rao-Kupper, Davidson),
 * the K-wise ranking losses (prm_loss_rank: InstructGPT pairwise,
 * Plackett-Luce), the version-2 statistics (calibration, exact rankings, tie
 * probabilities) and the group one-call paths: closed forms against naive
 * probability-space formulas, finite differences, the reductions to
 * Bradley-Terry, extreme scores, and every error path. Parity with the
 * PyTorch reference is in test_parity_rank.c, recovery of known parameters
 * in test_learning_rank.c.
 */
// clang-format off
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>
// clang-format on

#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "testutil.h"

#define assert_close(got, want, tol)                                                               \
  do {                                                                                             \
    double got_ = (double)(got), want_ = (double)(want), tol_ = (double)(tol);                     \
    if (!(fabs(got_ - want_) <= tol_))                                                             \
      fail_msg("%s = %.17g, expected %.17g (|diff| %.3g > tol %.3g)", #got, got_, want_,           \
               fabs(got_ - want_), tol_);                                                          \
  } while (0)
#define assert_rel(got, want, rel) assert_close(got, want, (rel) * fabs((double)(want)) + 1e-300)

#define N 8

/* ---- helpers --------------------------------------------------------------------------------- */

static double pair_loss(const float *rc, const float *rr, uint64_t n, const prm_loss_options *o,
                        float *dc, float *dr, prm_loss_stats *st) {
  double l = NAN;
  int rc_ = prm_loss_bt(rc, rr, n, o, &l, st, dc, dr);
  if (rc_ != PRM_OK) fail_msg("prm_loss_bt: %s (%s)", prm_status_string(rc_), prm_last_errmsg());
  return l;
}

static double rank_loss(const float *s, uint64_t n, const int32_t *sizes, uint64_t g,
                        const prm_rank_options *o, float *d, prm_loss_stats *st) {
  double l = NAN;
  int rc_ = prm_loss_rank(s, n, sizes, g, o, &l, st, d);
  if (rc_ != PRM_OK) fail_msg("prm_loss_rank: %s (%s)", prm_status_string(rc_), prm_last_errmsg());
  return l;
}

typedef struct pair_data {
  float rc[N], rr[N], margin[N], label[N], weight[N];
  uint8_t tie[N];
} pair_data;

static void pair_fill(pair_data *d, uint64_t seed) {
  prmt_rng r = {seed};
  prmt_fill_normal(&r, d->rc, N, 2.0);
  prmt_fill_normal(&r, d->rr, N, 2.0);
  prmt_fill_normal(&r, d->margin, N, 0.5);
  for (int i = 0; i < N; i++) {
    d->label[i] = (float)prmt_uniform(&r);
    d->weight[i] = (float)(0.5 + prmt_uniform(&r));
    d->tie[i] = (uint8_t)(i % 3 == 0); /* ties mixed with untied pairs */
  }
  d->label[1] = 1.0f;
  d->label[2] = 0.0f;
}

/* Central difference of a double loss in one float input (step 2^-10,
 * the actual perturbation measured). */
typedef double (*loss_fn)(void *arg);
static double fd_at(float *x, loss_fn f, void *arg) {
  const float x0 = *x, xp = x0 + 0x1p-10f, xm = x0 - 0x1p-10f;
  *x = xp;
  const double lp = f(arg);
  *x = xm;
  const double lm = f(arg);
  *x = x0;
  return (lp - lm) / ((double)xp - (double)xm);
}

typedef struct pair_arg {
  pair_data *d;
  const prm_loss_options *o;
} pair_arg;
static double pair_arg_loss(void *a) {
  pair_arg *p = a;
  return pair_loss(p->d->rc, p->d->rr, N, p->o, NULL, NULL, NULL);
}

static void check_pair_fd(pair_data *d, const prm_loss_options *o) {
  float dc[N], dr[N];
  pair_loss(d->rc, d->rr, N, o, dc, dr, NULL);
  pair_arg a = {d, o};
  for (int i = 0; i < N; i++) {
    const double fc = fd_at(&d->rc[i], pair_arg_loss, &a);
    const double fr = fd_at(&d->rr[i], pair_arg_loss, &a);
    assert_close(dc[i], fc, 1e-6 + 1e-5 * fabs(fc));
    assert_close(dr[i], fr, 1e-6 + 1e-5 * fabs(fr));
  }
}

/* ---- ties: closed forms ------------------------------------------------------------------------ */

/* Naive probability-space Rao-Kupper and Davidson (moderate scores only). */
static void rk_naive(double a, double b, double theta, double *pw, double *pl, double *pt) {
  const double ea = exp(a), eb = exp(b);
  *pw = ea / (ea + theta * eb);
  *pl = eb / (eb + theta * ea);
  *pt = (theta * theta - 1.0) * ea * eb / ((ea + theta * eb) * (theta * ea + eb));
}
static void dv_naive(double a, double b, double nu, double *pw, double *pl, double *pt) {
  const double ea = exp(a), eb = exp(b), em = nu * exp(0.5 * (a + b)), den = ea + eb + em;
  *pw = ea / den;
  *pl = eb / den;
  *pt = em / den;
}

static void test_tie_closed_forms(void **state) {
  (void)state;
  pair_data d;
  pair_fill(&d, 11);
  for (int model = PRM_TIE_RAO_KUPPER; model <= PRM_TIE_DAVIDSON; model++) {
    const double param = model == PRM_TIE_RAO_KUPPER ? 1.8 : 0.7;
    prm_loss_options o = PRM_LOSS_OPTIONS_INIT;
    o.tie_model = model;
    o.tie_param = param;
    o.tie = d.tie;
    o.label = d.label;
    o.weight = d.weight;
    o.margin = d.margin;
    o.center_coef = 0.05;
    prm_loss_stats st = PRM_LOSS_STATS_INIT;
    const double got = pair_loss(d.rc, d.rr, N, &o, NULL, NULL, &st);
    double want = 0.0, sq = 0.0, pt_tied = 0.0, pt_untied = 0.0, brier = 0.0;
    int n_tied = 0;
    for (int i = 0; i < N; i++) {
      double pw, pl, pt;
      const double a = d.rc[i], b = (double)d.rr[i] + d.margin[i]; /* z = a - b - m */
      if (model == PRM_TIE_RAO_KUPPER)
        rk_naive(a, b, param, &pw, &pl, &pt);
      else
        dv_naive(a, b, param, &pw, &pl, &pt);
      assert_close(pw + pl + pt, 1.0, 1e-12);
      const double p = d.label[i];
      want += d.weight[i] * (d.tie[i] ? -log(pt) : -(p * log(pw) + (1 - p) * log(pl)));
      sq += ((double)d.rc[i] + d.rr[i]) * ((double)d.rc[i] + d.rr[i]);
      /* statistics use r_c - r_r without the margin */
      if (model == PRM_TIE_RAO_KUPPER)
        rk_naive(d.rc[i], d.rr[i], param, &pw, &pl, &pt);
      else
        dv_naive(d.rc[i], d.rr[i], param, &pw, &pl, &pt);
      if (d.tie[i]) {
        n_tied++;
        pt_tied += pt;
      } else {
        pt_untied += pt;
        const double phat = pw / (pw + pl);
        brier += (phat - p) * (phat - p);
      }
    }
    want = want / N + 0.05 * sq / N;
    assert_rel(got, want, 1e-12);
    assert_int_equal(st.n_tied, n_tied);
    assert_int_equal(st.n_compared, N - n_tied);
    assert_rel(st.tie_prob_tied, pt_tied / n_tied, 1e-12);
    assert_rel(st.tie_prob_untied, pt_untied / (N - n_tied), 1e-12);
    assert_rel(st.brier, brier / (N - n_tied), 1e-12);
    assert_rel(st.loss, got, 0);
  }
}

static void test_tie_fd(void **state) {
  (void)state;
  for (uint64_t seed = 1; seed <= 3; seed++)
    for (int model = PRM_TIE_RAO_KUPPER; model <= PRM_TIE_DAVIDSON; model++)
      for (int variant = 0; variant < 3; variant++) {
        pair_data d;
        pair_fill(&d, seed * 7 + (uint64_t)model);
        prm_loss_options o = PRM_LOSS_OPTIONS_INIT;
        o.tie_model = model;
        o.tie_param = model == PRM_TIE_RAO_KUPPER ? 1.0 + 0.6 * (double)seed : 0.3 * (double)seed;
        o.tie = d.tie;
        if (variant >= 1) { /* every option at once */
          o.label = d.label;
          o.weight = d.weight;
          o.margin = d.margin;
        }
        if (variant == 2) o.center_coef = 0.1;
        check_pair_fd(&d, &o);
      }
}

/* theta = 1 / nu = 0 without ties is Bradley-Terry, to rounding. */
static void test_tie_reduces_to_bt(void **state) {
  (void)state;
  pair_data d;
  pair_fill(&d, 5);
  prm_loss_options bt = PRM_LOSS_OPTIONS_INIT;
  bt.label = d.label;
  bt.weight = d.weight;
  bt.margin = d.margin;
  bt.center_coef = 0.01;
  float bc[N], br[N], tc[N], tr[N];
  prm_loss_stats sb = PRM_LOSS_STATS_INIT, stt = PRM_LOSS_STATS_INIT;
  const double lb = pair_loss(d.rc, d.rr, N, &bt, bc, br, &sb);
  const uint8_t none[N] = {0};
  for (int model = PRM_TIE_RAO_KUPPER; model <= PRM_TIE_DAVIDSON; model++)
    for (int flags = 0; flags < 2; flags++) {
      prm_loss_options o = bt;
      o.tie_model = model;
      o.tie_param = model == PRM_TIE_RAO_KUPPER ? 1.0 : 0.0;
      o.tie = flags ? none : NULL; /* all-zero flags are no flags */
      const double lt = pair_loss(d.rc, d.rr, N, &o, tc, tr, &stt);
      assert_rel(lt, lb, 1e-14);
      for (int i = 0; i < N; i++) {
        assert_close(tc[i], bc[i], 1e-7 * fabs(bc[i]) + 1e-12);
        assert_close(tr[i], br[i], 1e-7 * fabs(br[i]) + 1e-12);
      }
      assert_rel(stt.brier, sb.brier, 1e-14);
      assert_rel(stt.ece, sb.ece, 1e-14);
      assert_true(stt.accuracy == sb.accuracy && stt.margin_mean == sb.margin_mean);
      assert_true(stt.tie_prob_tied == 0.0 && stt.tie_prob_untied == 0.0);
    }
}

/* |z| up to 2 FLT_MAX: finite loss and gradients, the right limits. */
static void test_tie_extremes(void **state) {
  (void)state;
  const float big[6] = {1e30f, -1e30f, FLT_MAX, -FLT_MAX, 1e30f, 0.0f};
  const float small[6] = {-1e30f, 1e30f, -FLT_MAX, FLT_MAX, 1e30f, 1e30f};
  const uint8_t tie[6] = {1, 1, 0, 1, 1, 0};
  for (int model = PRM_TIE_RAO_KUPPER; model <= PRM_TIE_DAVIDSON; model++) {
    prm_loss_options o = PRM_LOSS_OPTIONS_INIT;
    o.tie_model = model;
    o.tie_param = model == PRM_TIE_RAO_KUPPER ? 2.0 : 1.0;
    o.tie = tie;
    float dc[6], dr[6];
    prm_loss_stats st = PRM_LOSS_STATS_INIT;
    const double l = pair_loss(big, small, 6, &o, dc, dr, &st);
    assert_true(isfinite(l) && l > 1e29);
    for (int i = 0; i < 6; i++) assert_true(isfinite(dc[i]) && isfinite(dr[i]));
    /* a tie 2e30 apart: the loss grows like |z| (RK) or |z|/2 (Davidson),
     * the gradient is +-1/n (RK: s(lp - z) + s(z + lp) -> 1) or +-1/(2n) */
    const double slope = model == PRM_TIE_RAO_KUPPER ? 1.0 : 0.5;
    assert_close(dc[0], slope / 6, 1e-7);
    assert_close(dr[0], -slope / 6, 1e-7);
    assert_close(dc[4], 0.0, 1e-7); /* a tie at equal scores: the optimum */
    assert_true(st.tie_prob_tied >= 0.0 && st.tie_prob_tied <= 1.0);
    assert_true(isfinite(st.ece) && isfinite(st.brier) && isfinite(st.reward_std));
    /* a confident correct untied pair keeps a tiny but nonzero gradient */
    const float c1[1] = {30.0f}, r1[1] = {0.0f};
    float g1[1], h1[1];
    o.tie = NULL;
    pair_loss(c1, r1, 1, &o, g1, h1, NULL);
    /* RK: -s(log 2 - 30) ~ -2e-13; Davidson: -(P_l + P_t/2) ~ -1.5e-7 */
    assert_true(g1[0] < 0.0f && g1[0] > -1e-6f);
  }
}

/* ---- rankings ------------------------------------------------------------------------------------ */

static const int32_t SIZES[4] = {3, 2, 5, 4};
#define ROWS 14

static void rank_fill(float *s, uint64_t seed) {
  prmt_rng r = {seed};
  prmt_fill_normal(&r, s, ROWS, 1.5);
}

/* Naive probability-space group terms. */
static double naive_rank(const float *s, const int32_t *sizes, int G, int pl, const float *w) {
  double total = 0.0;
  const float *r = s;
  for (int g = 0; g < G; r += sizes[g], g++) {
    const int K = sizes[g];
    double l = 0.0;
    if (pl) {
      for (int k = 0; k < K - 1; k++) {
        double den = 0.0;
        for (int j = k; j < K; j++) den += exp(r[j]);
        l -= log(exp(r[k]) / den);
      }
      l /= K - 1;
    } else {
      for (int a = 0; a < K; a++)
        for (int b = a + 1; b < K; b++) l -= log(1.0 / (1.0 + exp((double)r[b] - r[a])));
      l /= K * (K - 1) / 2.0;
    }
    total += (w ? w[g] : 1.0) * l;
  }
  return total / G;
}

typedef struct rank_arg {
  float *s;
  const prm_rank_options *o;
} rank_arg;
static double rank_arg_loss(void *a) {
  rank_arg *p = a;
  return rank_loss(p->s, ROWS, SIZES, 4, p->o, NULL, NULL);
}

static void test_rank_closed_forms_and_fd(void **state) {
  (void)state;
  const float w[4] = {1.0f, 0.5f, 2.0f, 0.0f};
  for (int pl = 0; pl < 2; pl++)
    for (int weighted = 0; weighted < 2; weighted++)
      for (uint64_t seed = 1; seed <= 3; seed++) {
        float s[ROWS], d[ROWS];
        rank_fill(s, seed);
        prm_rank_options o = PRM_RANK_OPTIONS_INIT;
        o.loss = pl ? PRM_RANK_PLACKETT_LUCE : PRM_RANK_PAIRWISE;
        o.weight = weighted ? w : NULL;
        const double l = rank_loss(s, ROWS, SIZES, 4, &o, d, NULL);
        const double want = naive_rank(s, SIZES, 4, pl, o.weight);
        if (fabs(l - want) > 1e-12 * fabs(want))
          fail_msg("pl %d weighted %d seed %d: %.17g vs naive %.17g", pl, weighted, (int)seed, l,
                   want);
        rank_arg a = {s, &o};
        for (int i = 0; i < ROWS; i++) {
          const double f = fd_at(&s[i], rank_arg_loss, &a);
          assert_close(d[i], f, 1e-6 + 1e-5 * fabs(f));
        }
        /* a zero-weight group gets no gradient */
        if (weighted)
          for (int i = ROWS - 4; i < ROWS; i++) assert_true(d[i] == 0.0f);
      }
}

/* K = 2: both ranking losses are Bradley-Terry (groups of 2 are pairs). */
static void test_rank_k2_is_bt(void **state) {
  (void)state;
  pair_data d;
  pair_fill(&d, 9);
  float s[2 * N];
  int32_t sizes[N];
  for (int i = 0; i < N; i++) {
    s[2 * i] = d.rc[i];
    s[2 * i + 1] = d.rr[i];
    sizes[i] = 2;
  }
  prm_loss_options bo = PRM_LOSS_OPTIONS_INIT;
  bo.weight = d.weight;
  float bc[N], br[N], g[2 * N];
  prm_loss_stats sb = PRM_LOSS_STATS_INIT, sr = PRM_LOSS_STATS_INIT;
  const double lb = pair_loss(d.rc, d.rr, N, &bo, bc, br, &sb);
  for (int pl = 0; pl < 2; pl++) {
    prm_rank_options o = PRM_RANK_OPTIONS_INIT;
    o.loss = pl ? PRM_RANK_PLACKETT_LUCE : PRM_RANK_PAIRWISE;
    o.weight = d.weight;
    const double lr = rank_loss(s, 2 * N, sizes, N, &o, g, &sr);
    assert_rel(lr, lb, 1e-14);
    for (int i = 0; i < N; i++) {
      assert_close(g[2 * i], bc[i], 1e-7 * fabs(bc[i]) + 1e-12);
      assert_close(g[2 * i + 1], br[i], 1e-7 * fabs(br[i]) + 1e-12);
    }
    assert_true(sr.accuracy == sb.accuracy && sr.n_compared == sb.n_compared);
    assert_rel(sr.brier, sb.brier, 1e-14);
    assert_rel(sr.ece, sb.ece, 1e-14);
    assert_rel(sr.margin_mean, sb.margin_mean, 1e-14);
    assert_rel(sr.reward_std, sb.reward_std, 1e-14);
    assert_true(sr.exact_rate == sb.exact_rate);
  }
}

static void test_rank_extremes(void **state) {
  (void)state;
  const float s[7] = {1e30f, -1e30f, FLT_MAX, -1e30f, 0.0f, 1e30f, -FLT_MAX};
  const int32_t sizes[2] = {3, 4};
  for (int pl = 0; pl < 2; pl++) {
    prm_rank_options o = PRM_RANK_OPTIONS_INIT;
    o.loss = pl ? PRM_RANK_PLACKETT_LUCE : PRM_RANK_PAIRWISE;
    float d[7];
    prm_loss_stats st = PRM_LOSS_STATS_INIT;
    const double l = rank_loss(s, 7, sizes, 2, &o, d, &st);
    assert_true(isfinite(l) && l > 1e29);
    for (int i = 0; i < 7; i++) assert_true(isfinite(d[i]) && fabs(d[i]) <= 1.0f);
    assert_true(isfinite(st.reward_std) && isfinite(st.ece) && isfinite(st.margin_mean));
  }
  /* a perfectly ranked group of huge gaps: loss ~ 0, gradients ~ 0 but the
   * formulas keep them nonzero instead of rounding 1 - s to 0 */
  const float good[3] = {60.0f, 30.0f, 0.0f};
  const int32_t k3 = 3;
  for (int pl = 0; pl < 2; pl++) {
    prm_rank_options o = PRM_RANK_OPTIONS_INIT;
    o.loss = pl ? PRM_RANK_PLACKETT_LUCE : PRM_RANK_PAIRWISE;
    float d[3];
    const double l = rank_loss(good, 3, &k3, 1, &o, d, NULL);
    assert_true(l > 0.0 && l < 1e-12);
    assert_true(d[0] < 0.0f && d[2] > 0.0f && d[0] > -1e-12f);
  }
}

/* Plackett-Luce gradients at scores near 1e30, where log-sum-exps rounded to
 * a double lose their small log terms (found by test_parity_rank: 0.4.0's
 * first version returned [-0.5, 1.0] for [1e30, 1e30]). Each group's gradient
 * must also sum to 0 (adding a constant to a group changes nothing). */
static void test_rank_pl_huge_scores(void **state) {
  (void)state;
  static const struct {
    int32_t K;
    float s[5];
    double want[5];
  } cases[] = {
      {2, {1e30f, 1e30f}, {-0.5, 0.5}},
      {2, {1e16f, 1e16f}, {-0.5, 0.5}},
      {3, {0.0f, 0.0f, 1e30f}, {-0.5, -0.5, 1.0}},
      {3, {0.0f, 0.0f, 1e13f}, {-0.5, -0.5, 1.0}},
      {3, {1e12f, 1e12f, 1e12f}, {-1.0 / 3, -1.0 / 12, 5.0 / 12}},
  };
  for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
    const int32_t K = cases[c].K;
    float d[5];
    prm_rank_options o = PRM_RANK_OPTIONS_INIT;
    o.loss = PRM_RANK_PLACKETT_LUCE;
    const double l = rank_loss(cases[c].s, (uint64_t)K, &K, 1, &o, d, NULL);
    assert_true(isfinite(l));
    double sum = 0.0;
    for (int j = 0; j < K; j++) sum += d[j];
    assert_close(sum, 0.0, 1e-7);
    for (int j = 0; j < K; j++) assert_close(d[j], cases[c].want[j], 1e-7);
  }
  /* A group of five where every choice is certain in the model's eyes */
  const float s5[5] = {0.3f, 1e30f, -0.2f, -1e30f, 5e29f};
  const int32_t K5 = 5;
  float d5[5];
  prm_rank_options o = PRM_RANK_OPTIONS_INIT;
  o.loss = PRM_RANK_PLACKETT_LUCE;
  rank_loss(s5, 5, &K5, 1, &o, d5, NULL);
  /* choices: k=0 picks 0.3 among {.., 1e30, ..}: e^{r_j - L_0} = 1 for j = 1;
   * k=1 picks 1e30 (certain); k=2 picks -0.2 among {-0.2, -1e30, 5e29}:
   * 5e29 takes it; k=3 picks -1e30 among {-1e30, 5e29}: 5e29 again. So
   * d = (1/4)[-1, 1 + 1 - 1, -1, -1, 2] = [-0.25, 0.25, -0.25, -0.25, 0.5] */
  const double want5[5] = {-0.25, 0.25, -0.25, -0.25, 0.5};
  for (int j = 0; j < 5; j++) assert_close(d5[j], want5[j], 1e-7);
}

static void test_rank_stats(void **state) {
  (void)state;
  /* group 0 exactly right, group 1 one swap, group 2 has equal scores */
  const float s[9] = {3, 2, 1, 1, 2, 0, 5, 5, 4};
  const int32_t sizes[3] = {3, 3, 3};
  prm_loss_stats st = PRM_LOSS_STATS_INIT;
  rank_loss(s, 9, sizes, 3, NULL, NULL, &st);
  assert_int_equal(st.n_compared, 9);
  /* pairs: g0 3 wins; g1 (1,2) loss, (1,0) win, (2,0) win; g2 tie, 2 wins */
  assert_close(st.accuracy, 7.5 / 9, 1e-15);
  assert_close(st.exact_rate, 1.0 / 3, 1e-15);
  assert_close(st.margin_mean, (1 + 2 + 1 + -1 + 1 + 2 + 0 + 1 + 1) / 9.0, 1e-15);
  assert_close(st.reward_mean, 23.0 / 9, 1e-15);
  assert_true(st.n_tied == 0 && st.tie_prob_tied == 0.0 && st.tie_prob_untied == 0.0);
  /* Brier and ECE recomputed here: y = 1, p = s(r_a - r_b), each pair also
   * entered mirrored for the ECE */
  double sp[10] = {0}, sy[10] = {0}, brier = 0.0;
  const float *r = s;
  for (int g = 0; g < 3; r += 3, g++)
    for (int a = 0; a < 3; a++)
      for (int b = a + 1; b < 3; b++) {
        const double p = 1.0 / (1.0 + exp(-((double)r[a] - r[b])));
        brier += (p - 1) * (p - 1);
        int k = (int)(p * 10);
        sp[k > 9 ? 9 : k] += p;
        sy[k > 9 ? 9 : k] += 1;
        k = (int)((1 - p) * 10);
        sp[k > 9 ? 9 : k] += 1 - p;
      }
  double ece = 0.0;
  for (int k = 0; k < 10; k++) ece += fabs(sp[k] - sy[k]);
  assert_close(st.brier, brier / 9, 1e-15);
  assert_close(st.ece, ece / 18, 1e-15);
}

/* Calibration does not depend on which response a pair lists first, and a
 * calibrated predictor gets an ECE near 0. */
static void test_calibration(void **state) {
  (void)state;
  enum { P = 20000 };
  float *a = malloc(P * sizeof(float)), *b = malloc(P * sizeof(float)), *lab = malloc(P * 4);
  float *fa = malloc(P * sizeof(float)), *fb = malloc(P * sizeof(float)), *flab = malloc(P * 4);
  prmt_rng r = {77};
  for (int i = 0; i < P; i++) {
    /* scores from a true reward; the outcome drawn with P = s(a - b) */
    a[i] = (float)(2.0 * prmt_normal(&r));
    b[i] = (float)(2.0 * prmt_normal(&r));
    const double p = 1.0 / (1.0 + exp(-((double)a[i] - b[i])));
    const int first_wins = prmt_uniform(&r) < p;
    /* the data lists the winner first */
    fa[i] = first_wins ? a[i] : b[i];
    fb[i] = first_wins ? b[i] : a[i];
    lab[i] = first_wins ? 1.0f : 0.0f; /* the same data, listed in a fixed order */
    flab[i] = 1.0f;
  }
  prm_loss_options o1 = PRM_LOSS_OPTIONS_INIT, o2 = PRM_LOSS_OPTIONS_INIT;
  o1.label = flab;
  o2.label = lab;
  prm_loss_stats s1 = PRM_LOSS_STATS_INIT, s2 = PRM_LOSS_STATS_INIT;
  pair_loss(fa, fb, P, &o1, NULL, NULL, &s1);
  pair_loss(a, b, P, &o2, NULL, NULL, &s2);
  assert_close(s1.brier, s2.brier, 1e-12);
  assert_close(s1.ece, s2.ece, 1e-12);
  /* calibrated by construction: ECE is sampling noise (~0.005 at 20k) */
  assert_true(s1.ece < 0.02);
  /* an overconfident predictor (scores x3) is visibly miscalibrated */
  for (int i = 0; i < P; i++) {
    fa[i] *= 3.0f;
    fb[i] *= 3.0f;
  }
  prm_loss_stats s3 = PRM_LOSS_STATS_INIT;
  pair_loss(fa, fb, P, &o1, NULL, NULL, &s3);
  printf("calibrated ECE %.4f Brier %.4f; overconfident x3 ECE %.4f Brier %.4f\n", s1.ece,
         s1.brier, s3.ece, s3.brier);
  assert_true(s3.ece > 0.1 && s3.brier > s1.brier);
  free(a), free(b), free(lab), free(fa), free(fb), free(flab);
}

/* ---- errors -------------------------------------------------------------------------------------- */

typedef struct outs {
  double loss;
  prm_loss_stats st;
  float d[ROWS];
} outs;

static void outs_fill(outs *o) {
  o->loss = 42.0;
  memset(&o->st, 0x5A, sizeof o->st);
  o->st.version = PRM_LOSS_STATS_VERSION;
  for (int i = 0; i < ROWS; i++) o->d[i] = 42.0f;
}

static void outs_untouched(const outs *o) {
  assert_true(o->loss == 42.0);
  const unsigned char *p = (const unsigned char *)&o->st;
  for (size_t i = offsetof(prm_loss_stats, loss); i < sizeof o->st; i++)
    if (p[i] != 0x5A) fail_msg("stats byte %zu changed", i);
  for (int i = 0; i < ROWS; i++) assert_true(o->d[i] == 42.0f);
}

static void expect_pair_fail(int status, const char *needle, const prm_loss_options *o) {
  const float rc[3] = {1, 2, 3}, rr[3] = {0, 2, 5};
  outs out;
  outs_fill(&out);
  assert_int_equal(prm_loss_bt(rc, rr, 3, o, &out.loss, &out.st, out.d, out.d + 3), status);
  if (strstr(prm_last_errmsg(), needle) == NULL)
    fail_msg("message \"%s\" lacks \"%s\"", prm_last_errmsg(), needle);
  outs_untouched(&out);
}

static void test_tie_errors(void **state) {
  (void)state;
  const uint8_t tie[3] = {1, 0, 0}, bad[3] = {0, 2, 0}, none[3] = {0, 0, 0};
  prm_loss_options o = PRM_LOSS_OPTIONS_INIT;
  o.tie = none;
  expect_pair_fail(PRM_ERR_INVALID, "without a tie model", &o);
  o = (prm_loss_options)PRM_LOSS_OPTIONS_INIT;
  o.tie_param = 2.0;
  expect_pair_fail(PRM_ERR_INVALID, "without a tie model", &o);
  o.tie_model = 3;
  expect_pair_fail(PRM_ERR_INVALID, "tie_model 3 is unknown", &o);
  o.tie_model = -1;
  expect_pair_fail(PRM_ERR_INVALID, "unknown", &o);
  o.tie_model = PRM_TIE_RAO_KUPPER;
  o.tie_param = 0.999;
  expect_pair_fail(PRM_ERR_INVALID, "theta", &o);
  o.tie_param = NAN;
  expect_pair_fail(PRM_ERR_NONFINITE, "not finite", &o);
  o.tie_param = INFINITY;
  expect_pair_fail(PRM_ERR_NONFINITE, "not finite", &o);
  o.tie_param = 1.0;
  o.tie = tie;
  expect_pair_fail(PRM_ERR_INVALID, "ties probability 0", &o);
  o.tie_param = 1.5;
  o.tie = bad;
  expect_pair_fail(PRM_ERR_INVALID, "tie[1] = 2", &o);
  o.tie_model = PRM_TIE_DAVIDSON;
  o.tie = NULL;
  o.tie_param = -0.1;
  expect_pair_fail(PRM_ERR_INVALID, "nu", &o);
  o.tie_param = 0.0;
  o.tie = tie;
  expect_pair_fail(PRM_ERR_INVALID, "ties probability 0", &o);
  /* the same options are valid with an allowed parameter */
  o.tie_param = 0.5;
  const float rc[3] = {1, 2, 3}, rr[3] = {0, 2, 5};
  assert_int_equal(prm_loss_bt(rc, rr, 3, &o, NULL, NULL, NULL, NULL), PRM_OK);
}

static void expect_rank_fail(int status, const char *needle, const float *s, uint64_t n,
                             const int32_t *sizes, uint64_t g, const prm_rank_options *o,
                             uint32_t stats_version) {
  outs out;
  outs_fill(&out);
  out.st.version = stats_version;
  assert_int_equal(prm_loss_rank(s, n, sizes, g, o, &out.loss, &out.st, out.d), status);
  if (strstr(prm_last_errmsg(), needle) == NULL)
    fail_msg("message \"%s\" lacks \"%s\"", prm_last_errmsg(), needle);
  out.st.version = PRM_LOSS_STATS_VERSION;
  outs_untouched(&out);
}

static void test_rank_errors(void **state) {
  (void)state;
  float s[ROWS];
  rank_fill(s, 3);
  const uint32_t V = PRM_LOSS_STATS_VERSION;
  expect_rank_fail(PRM_ERR_NULL, "scores", NULL, ROWS, SIZES, 4, NULL, V);
  expect_rank_fail(PRM_ERR_NULL, "group_sizes", s, ROWS, NULL, 4, NULL, V);
  expect_rank_fail(PRM_ERR_SIZE, "n_groups is 0", s, ROWS, SIZES, 0, NULL, V);
  const int32_t one[4] = {3, 1, 5, 5}, neg[4] = {3, -2, 5, 8}, big[2] = {INT32_MAX, INT32_MAX};
  expect_rank_fail(PRM_ERR_SIZE, "group_sizes[1] = 1", s, ROWS, one, 4, NULL, V);
  expect_rank_fail(PRM_ERR_SIZE, "group_sizes[1] = -2", s, ROWS, neg, 4, NULL, V);
  expect_rank_fail(PRM_ERR_SIZE, "more than the 14 scores", s, ROWS, big, 2, NULL, V);
  expect_rank_fail(PRM_ERR_SIZE, "more than the 13 scores", s, ROWS - 1, SIZES, 4, NULL, V);
  expect_rank_fail(PRM_ERR_SIZE, "hold 10 rows but there are 14", s, ROWS, SIZES, 3, NULL, V);
  prm_rank_options o = PRM_RANK_OPTIONS_INIT;
  o.loss = 0;
  expect_rank_fail(PRM_ERR_INVALID, "loss 0 is unknown", s, ROWS, SIZES, 4, &o, V);
  o.loss = PRM_RANK_PLACKETT_LUCE;
  const float wneg[4] = {1, 1, -0.5f, 1}, wnan[4] = {1, NAN, 1, 1};
  o.weight = wneg;
  expect_rank_fail(PRM_ERR_INVALID, "weight[2]", s, ROWS, SIZES, 4, &o, V);
  o.weight = wnan;
  expect_rank_fail(PRM_ERR_NONFINITE, "weight[1]", s, ROWS, SIZES, 4, &o, V);
  o.weight = NULL;
  o.version = 9;
  expect_rank_fail(PRM_ERR_VERSION, "version 9", s, ROWS, SIZES, 4, &o, V);
  expect_rank_fail(PRM_ERR_VERSION, "stats", s, ROWS, SIZES, 4, NULL, 0);
  s[5] = NAN;
  expect_rank_fail(PRM_ERR_NONFINITE, "scores[5]", s, ROWS, SIZES, 4, NULL, V);
  s[5] = INFINITY;
  expect_rank_fail(PRM_ERR_NONFINITE, "scores[5]", s, ROWS, SIZES, 4, NULL, V);
  ASSERT_FAILS(prm_rank_options_init(NULL, 1), PRM_ERR_NULL);
  ASSERT_FAILS(prm_rank_options_init(&o, 2), PRM_ERR_VERSION);
}

/* ---- one-call paths ----------------------------------------------------------------------------- */

/* prm_train_step_groups = forward + prm_loss_rank + backward + step, bit for
 * bit; prm_evaluate_groups = forward + prm_loss_rank statistics. */
static void test_groups_one_call(void **state) {
  (void)state;
  enum { D = 6 };
  const uint64_t hidden[1] = {5};
  float x[ROWS * D];
  prmt_rng r = {21};
  prmt_fill_normal(&r, x, ROWS * D, 1.0);
  const prm_batch b = prmt_batch(x, ROWS, D);
  for (int pl = 0; pl < 2; pl++) {
    prm_model *m1 = prmt_mlp(D, hidden, 1, PRM_ACT_GELU_TANH, 3);
    prm_model *m2 = prmt_mlp(D, hidden, 1, PRM_ACT_GELU_TANH, 3);
    prm_ctx *c1 = prmt_ctx(m1, ROWS, 0), *c2 = prmt_ctx(m2, ROWS, 0);
    prm_optimizer *o1 = prmt_adamw(m1, 1e-2), *o2 = prmt_adamw(m2, 1e-2);
    prm_rank_options ro = PRM_RANK_OPTIONS_INIT;
    ro.loss = pl ? PRM_RANK_PLACKETT_LUCE : PRM_RANK_PAIRWISE;
    for (int step = 0; step < 3; step++) {
      prm_loss_stats s1 = PRM_LOSS_STATS_INIT, s2 = PRM_LOSS_STATS_INIT;
      assert_int_equal(prm_train_step_groups(c1, o1, &b, SIZES, 4, &ro, &s1), PRM_OK);
      float sc[ROWS], d[ROWS];
      assert_int_equal(prm_ctx_forward(c2, &b, sc, ROWS), PRM_OK);
      rank_loss(sc, ROWS, SIZES, 4, &ro, d, &s2);
      assert_int_equal(prm_ctx_backward(c2, d, ROWS), PRM_OK);
      assert_int_equal(prm_optimizer_step(o2, c2), PRM_OK);
      assert_memory_equal(&s1, &s2, sizeof s1);
    }
    uint64_t np = 0;
    const float *p1 = prm_model_params(m1, &np), *p2 = prm_model_params(m2, NULL);
    assert_memory_equal(p1, p2, np * sizeof(float));
    /* evaluation on an inference context */
    prm_ctx *ci = prmt_ctx(m1, ROWS, 1);
    prm_loss_stats se = PRM_LOSS_STATS_INIT, sm = PRM_LOSS_STATS_INIT;
    assert_int_equal(prm_evaluate_groups(ci, &b, SIZES, 4, &ro, &se), PRM_OK);
    float sc[ROWS];
    assert_int_equal(prm_ctx_forward(ci, &b, sc, ROWS), PRM_OK);
    rank_loss(sc, ROWS, SIZES, 4, &ro, NULL, &sm);
    assert_memory_equal(&se, &sm, sizeof se);
    prm_ctx_free(ci);
    prm_optimizer_free(o1), prm_optimizer_free(o2);
    prm_ctx_free(c1), prm_ctx_free(c2);
    prm_model_free(m1), prm_model_free(m2);
  }
}

/* Bad group arguments: a specific status and message, nothing changed, a
 * pending forward kept. */
static void test_groups_one_call_errors(void **state) {
  (void)state;
  enum { D = 4 };
  float x[ROWS * D];
  prmt_rng r = {8};
  prmt_fill_normal(&r, x, ROWS * D, 1.0);
  prm_model *m = prmt_linear(D, 1);
  prm_ctx *c = prmt_ctx(m, ROWS - 1, 0); /* one row short of the batch */
  prm_optimizer *o = prmt_adamw(m, 1e-2);
  const prm_batch b = prmt_batch(x, ROWS, D);
  const prm_batch small = prmt_batch(x, 7, D);
  float sc[7], g[7] = {1, 1, 1, 1, 1, 1, 1};
  assert_int_equal(prm_ctx_forward(c, &small, sc, 7), PRM_OK); /* pending */
  prmt_snap snap = prmt_take_snap(m, c);
  ASSERT_FAILS(prm_train_step_groups(c, o, &b, SIZES, 4, NULL, NULL), PRM_ERR_SIZE);
  assert_non_null(strstr(prm_ctx_errmsg(c), "more than the context's max_rows 13"));
  ASSERT_FAILS(prm_evaluate_groups(c, &b, SIZES, 4, NULL, NULL), PRM_ERR_SIZE);
  const int32_t s7[2] = {3, 3}, s1[2] = {6, 1};
  ASSERT_FAILS(prm_train_step_groups(c, o, &small, s7, 2, NULL, NULL), PRM_ERR_SIZE);
  assert_non_null(strstr(prm_ctx_errmsg(c), "6 rows but there are 7"));
  ASSERT_FAILS(prm_train_step_groups(c, o, &small, s1, 2, NULL, NULL), PRM_ERR_SIZE);
  ASSERT_FAILS(prm_train_step_groups(c, o, &small, NULL, 2, NULL, NULL), PRM_ERR_NULL);
  ASSERT_FAILS(prm_train_step_groups(c, o, NULL, s7, 2, NULL, NULL), PRM_ERR_NULL);
  ASSERT_FAILS(prm_train_step_groups(NULL, o, &small, s7, 2, NULL, NULL), PRM_ERR_NULL);
  ASSERT_FAILS(prm_train_step_groups(c, NULL, &small, s7, 2, NULL, NULL), PRM_ERR_NULL);
  const int32_t s34[2] = {3, 4};
  prm_rank_options ro = PRM_RANK_OPTIONS_INIT;
  ro.loss = 7;
  ASSERT_FAILS(prm_train_step_groups(c, o, &small, s34, 2, &ro, NULL), PRM_ERR_INVALID);
  prm_loss_stats bad = PRM_LOSS_STATS_INIT;
  bad.version = 3;
  ASSERT_FAILS(prm_evaluate_groups(c, &small, s34, 2, NULL, &bad), PRM_ERR_VERSION);
  float xn[7 * D];
  memcpy(xn, x, sizeof xn);
  xn[2 * D + 1] = NAN;
  const prm_batch nanb = prmt_batch(xn, 7, D);
  ASSERT_FAILS(prm_train_step_groups(c, o, &nanb, s34, 2, NULL, NULL), PRM_ERR_NONFINITE);
  prmt_assert_unchanged(&snap, m, c);
  prmt_free_snap(&snap);
  /* the invalid calls kept the pending forward; the NaN batch ran its
   * forward and dropped it */
  ASSERT_FAILS(prm_ctx_backward(c, g, 7), PRM_ERR_STATE);
  /* an inference context cannot train */
  prm_ctx *ci = prmt_ctx(m, ROWS, 1);
  ASSERT_FAILS(prm_train_step_groups(ci, o, &small, s34, 2, NULL, NULL), PRM_ERR_STATE);
  prm_ctx_free(ci);
  prm_optimizer_free(o);
  prm_ctx_free(c);
  prm_model_free(m);
}

/* The kept pending forward, separately: invalid group arguments change
 * nothing, so the backward of an earlier forward still runs. */
static void test_groups_keep_pending_forward(void **state) {
  (void)state;
  enum { D = 4 };
  float x[7 * D], sc[7], g[7] = {1, -1, 1, -1, 1, -1, 1};
  prmt_rng r = {9};
  prmt_fill_normal(&r, x, 7 * D, 1.0);
  prm_model *m = prmt_linear(D, 1);
  prm_ctx *c = prmt_ctx(m, 7, 0);
  prm_optimizer *o = prmt_adamw(m, 1e-2);
  const prm_batch b = prmt_batch(x, 7, D);
  const int32_t bad[2] = {3, 3};
  assert_int_equal(prm_ctx_forward(c, &b, sc, 7), PRM_OK);
  ASSERT_FAILS(prm_train_step_groups(c, o, &b, bad, 2, NULL, NULL), PRM_ERR_SIZE);
  ASSERT_FAILS(prm_evaluate_groups(c, &b, bad, 2, NULL, NULL), PRM_ERR_SIZE);
  assert_int_equal(prm_ctx_backward(c, g, 7), PRM_OK);
  prm_optimizer_free(o);
  prm_ctx_free(c);
  prm_model_free(m);
}

/* Ties through the one-call path, on linear's blocked pair gradient (the
 * tie flags are offset per block): same as forward + prm_loss_bt +
 * backward, to the rounding of the summation order. */
static void test_ties_one_call_linear_blocks(void **state) {
  (void)state;
  enum { D = 1024, P = 100 }; /* blocks of 32 pairs at d = 1024 */
  float *x = malloc(sizeof(float) * 2 * P * D);
  float w[P];
  uint8_t tie[P];
  uint64_t n_tied = 0;
  prmt_rng r = {31};
  prmt_fill_normal(&r, x, 2 * P * D, 0.1);
  for (int i = 0; i < P; i++) {
    tie[i] = (uint8_t)(i % 4 == 1 || i > 90); /* ties in every block */
    n_tied += tie[i];
    w[i] = (float)(0.5 + prmt_uniform(&r));
  }
  for (int model = PRM_TIE_RAO_KUPPER; model <= PRM_TIE_DAVIDSON; model++) {
    prm_model *m = prmt_linear(D, 2);
    prm_ctx *c1 = prmt_ctx(m, 2 * P, 0), *c2 = prmt_ctx(m, 2 * P, 0);
    prm_optimizer *o = prmt_adamw(m, 0.0); /* lr 0: the step leaves the model alone */
    prm_loss_options lo = PRM_LOSS_OPTIONS_INIT;
    lo.tie_model = model;
    lo.tie_param = model == PRM_TIE_RAO_KUPPER ? 2.0 : 1.0;
    lo.tie = tie;
    lo.weight = w;
    const prm_batch b = prmt_batch(x, 2 * P, D);
    /* the generic path's gradient in c2 */
    float sc[2 * P], d[2 * P];
    prm_loss_stats s1 = PRM_LOSS_STATS_INIT, s2 = PRM_LOSS_STATS_INIT;
    assert_int_equal(prm_ctx_forward(c2, &b, sc, 2 * P), PRM_OK);
    pair_loss(sc, sc + P, P, &lo, d, d + P, &s2);
    assert_int_equal(prm_ctx_backward(c2, d, 2 * P), PRM_OK);
    uint64_t ng = 0;
    float *g2 = prm_ctx_grads(c2, &ng);
    /* the one-call path's, read back through the optimizer's gradient
     * norm: the step clears c1's gradients */
    assert_int_equal(prm_train_step(c1, o, &b, &lo, &s1), PRM_OK);
    double n2 = 0.0;
    for (uint64_t j = 0; j < ng; j++) n2 += (double)g2[j] * g2[j];
    assert_rel(prm_optimizer_last_grad_norm(o), sqrt(n2), 1e-5);
    assert_rel(s1.loss, s2.loss, 1e-6);
    assert_true(s1.n_tied == s2.n_tied && s1.n_tied == n_tied);
    assert_rel(s1.tie_prob_tied, s2.tie_prob_tied, 1e-6);
    prm_optimizer_free(o);
    prm_ctx_free(c1), prm_ctx_free(c2);
    prm_model_free(m);
  }
  free(x);
}

/* Group batches of a token model: ragged sequences, groups of different K. */
static void test_groups_tokens(void **state) {
  (void)state;
  enum { T = 8, R = 7 };
  const int32_t lengths[R] = {3, 8, 1, 5, 2, 7, 4}, sizes[2] = {3, 4};
  int32_t tokens[R * T];
  prmt_rng r = {4};
  prmt_fill_tokens(&r, tokens, lengths, R, T, 11, 0);
  prm_model *m = prmt_gpt2(11, T, 8, 2, 2, 5);
  prm_ctx *c = prmt_tok_ctx(m, R, T, 0), *ci = prmt_tok_ctx(m, R, T, 1);
  prm_optimizer *o = prmt_adamw(m, 1e-3);
  const prm_batch b = prmt_tok_batch(tokens, lengths, R, T);
  prm_rank_options ro = PRM_RANK_OPTIONS_INIT;
  ro.loss = PRM_RANK_PLACKETT_LUCE;
  float sc[R];
  prm_loss_stats se = PRM_LOSS_STATS_INIT, sm = PRM_LOSS_STATS_INIT;
  assert_int_equal(prm_evaluate_groups(ci, &b, sizes, 2, &ro, &se), PRM_OK);
  prmt_forward_ok(ci, &b, sc);
  rank_loss(sc, R, sizes, 2, &ro, NULL, &sm);
  assert_memory_equal(&se, &sm, sizeof se);
  double first = se.loss;
  for (int i = 0; i < 30; i++)
    assert_int_equal(prm_train_step_groups(c, o, &b, sizes, 2, &ro, NULL), PRM_OK);
  assert_int_equal(prm_evaluate_groups(ci, &b, sizes, 2, &ro, &se), PRM_OK);
  assert_true(se.loss < first); /* it learns the two rankings */
  prm_optimizer_free(o);
  prm_ctx_free(c), prm_ctx_free(ci);
  prm_model_free(m);
}

/* ---- finite differences through models ---------------------------------------------------- */

#define RIDGE 0.05

/* The whole loss (ties or ranking) of a batch as a function of the model's
 * parameters, for prmt_check_fd. */
typedef struct model_loss {
  prm_ctx *ci; /* inference context */
  const prm_batch *b;
  const int32_t *sizes; /* groups, or NULL: a pair batch with lo */
  uint64_t n_groups;
  const prm_rank_options *ro;
  const prm_loss_options *lo;
} model_loss;

static double model_loss_eval(void *arg) {
  model_loss *a = arg;
  float s[16];
  prmt_forward_ok(a->ci, a->b, s);
  if (a->sizes != NULL) {
    /* + c/N sum s_i^2, as centring does for pairs: a loss of score
     * differences alone gives transformer.ln_f.bias (a shift of every
     * score) a zero gradient, which finite differences cannot check */
    double sq = 0.0;
    for (uint64_t i = 0; i < a->b->n; i++) sq += (double)s[i] * s[i];
    return rank_loss(s, a->b->n, a->sizes, a->n_groups, a->ro, NULL, NULL) +
           RIDGE * sq / (double)a->b->n;
  }
  const uint64_t P = a->b->n / 2;
  return pair_loss(s, s + P, P, a->lo, NULL, NULL, NULL);
}

/* Analytic gradients (forward, loss gradient, backward) of every tensor
 * against finite differences of the loss, for a Davidson tie batch and a
 * Plackett-Luce / pairwise group batch on mlp, gpt2 and llama. */
static void test_fd_through_models(void **state) {
  (void)state;
  enum { R = 8, T = 6, D = 5 };
  const int32_t lengths[R] = {3, 6, 1, 4, 2, 6, 5, 3}, sizes[3] = {3, 2, 3};
  const uint8_t tie[R / 2] = {1, 0, 0, 1};
  int32_t tokens[R * T];
  float x[R * D];
  prmt_rng r = {12};
  prmt_fill_tokens(&r, tokens, lengths, R, T, 11, 0);
  prmt_fill_normal(&r, x, R * D, 1.0);
  prm_loss_options lo = PRM_LOSS_OPTIONS_INIT;
  lo.tie_model = PRM_TIE_DAVIDSON;
  lo.tie_param = 0.7;
  lo.tie = tie;
  lo.center_coef = RIDGE;
  for (int arch = 0; arch < 3; arch++) {
    prm_model *m;
    prm_batch b;
    if (arch == 0) {
      const uint64_t hidden[1] = {4};
      m = prmt_mlp(D, hidden, 1, PRM_ACT_TANH, 3);
      b = prmt_batch(x, R, D);
    } else {
      prm_model_options o = prmt_gpt2_options(11, T, 8, 2, 2, 4);
      if (arch == 2) { /* llama with grouped-query attention */
        o.arch = PRM_ARCH_LLAMA;
        o.n_kv_head = 1;
      }
      assert_int_equal(prm_model_new(&m, &o), PRM_OK);
      prmt_perturb_tensors(m, "", 9, 0.3); /* leave the init's symmetric point */
      b = prmt_tok_batch(tokens, lengths, R, T);
    }
    prm_ctx *c = arch ? prmt_tok_ctx(m, R, T, 0) : prmt_ctx(m, R, 0);
    prm_ctx *ci = arch ? prmt_tok_ctx(m, R, T, 1) : prmt_ctx(m, R, 1);
    for (int kind = 0; kind < 3; kind++) {
      prm_rank_options ro = PRM_RANK_OPTIONS_INIT;
      ro.loss = kind == 1 ? PRM_RANK_PLACKETT_LUCE : PRM_RANK_PAIRWISE;
      model_loss a = {ci, &b, kind ? sizes : NULL, 3, &ro, &lo};
      float s[R], d[R];
      assert_int_equal(prm_ctx_zero_grad(c), PRM_OK);
      prmt_forward_ok(c, &b, s);
      if (kind) {
        rank_loss(s, R, sizes, 3, &ro, d, NULL);
        for (int i = 0; i < R; i++) d[i] += (float)(2.0 * RIDGE * s[i] / R);
      } else
        pair_loss(s, s + R / 2, R / 2, &lo, d, d + R / 2, NULL);
      assert_int_equal(prm_ctx_backward(c, d, R), PRM_OK);
      const float *an = prm_ctx_grads(c, NULL);
      double worst = 0.0, worst_norm = 0.0;
      /* every 9th element of the token models' matrices (all of the 1-D
       * tensors): this test also runs under valgrind */
      prmt_check_fd(m, an, model_loss_eval, &a, arch ? 9 : 3, NULL, &worst, &worst_norm);
      print_message("    %s, %s: worst element %.2e, tensor norm %.2e\n",
                    arch == 0 ? "mlp" : (arch == 1 ? "gpt2" : "llama"),
                    kind == 0 ? "davidson ties" : (kind == 1 ? "plackett-luce" : "pairwise"),
                    worst, worst_norm);
    }
    prm_ctx_free(c), prm_ctx_free(ci);
    prm_model_free(m);
  }
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_tie_closed_forms),
      cmocka_unit_test(test_tie_fd),
      cmocka_unit_test(test_tie_reduces_to_bt),
      cmocka_unit_test(test_tie_extremes),
      cmocka_unit_test(test_rank_closed_forms_and_fd),
      cmocka_unit_test(test_rank_k2_is_bt),
      cmocka_unit_test(test_rank_extremes),
      cmocka_unit_test(test_rank_pl_huge_scores),
      cmocka_unit_test(test_rank_stats),
      cmocka_unit_test(test_calibration),
      cmocka_unit_test(test_tie_errors),
      cmocka_unit_test(test_rank_errors),
      cmocka_unit_test(test_groups_one_call),
      cmocka_unit_test(test_groups_one_call_errors),
      cmocka_unit_test(test_groups_keep_pending_forward),
      cmocka_unit_test(test_ties_one_call_linear_blocks),
      cmocka_unit_test(test_groups_tokens),
      cmocka_unit_test(test_fd_through_models),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
