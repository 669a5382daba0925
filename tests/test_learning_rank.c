/*
 * test_learning_rank.c - statistical tests of the tie and ranking losses: data
 * sampled from a hidden linear reward r = w* . x (d = 32, |w*| = 2) under each
 * loss's own generative model are learned by a linear model through the
 * one-call paths (as test_learning.c does for plain Bradley-Terry).
 *   - Ties: 20 000 training pairs whose outcome (win, lose, tie) is drawn from
 *     Rao-Kupper (theta* = 1.8) or Davidson (nu* = 0.8); prm_train_step with
 *     loss options version 2. Training starts from a wrong guess of the tie
 *     parameter; after every epoch the parameter is re-fitted by a 1-D
 *     golden-section search of the training loss over the parameter with the
 *     model's scores held fixed (prm_ctx_forward + prm_loss_bt), and the next
 *     epoch trains with it (coordinate descent on the joint likelihood).
 *   - Rankings: 20 000 training groups of K = 4 responses ranked by
 *     Plackett-Luce (sequential choice, softmax of the remaining rewards);
 *     prm_train_step_groups with the InstructGPT pairwise loss and with the
 *     Plackett-Luce loss. Both are consistent here: the pairwise marginal of
 *     Plackett-Luce is P(a above b) = sigmoid(r_a - r_b), so the pairwise loss
 *     is a sum of correctly specified Bradley-Terry likelihoods.
 * Each test asserts cosine(w, w*) >= 0.99, |w| within 10% of |w*| = 2 (the
 * losses are likelihoods of the sampling model, so the scale is identified
 * too) and, on held-out data (stats version 2 from prm_evaluate /
 * prm_evaluate_groups): accuracy within 1 point of the Bayes rate (how often
 * w* itself agrees with the held-out labels), ECE < 0.05, the exact-ranking
 * rate within 2 points of w*'s (rankings) or above 0.5 (pairs), and the
 * counts n_compared and n_tied. The tie tests also require the recovered
 * parameter within 10% of the truth (see TIE_TOL) and the model's mean
 * P(tie) over tied and over untied held-out pairs within 0.02 of the true
 * model's. Seeds are fixed, so the tests are deterministic; each prints its
 * figures.
 */
// clang-format off
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>
// clang-format on

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "testutil.h"

#define D 32
#define N_TRAIN 20000 /* training pairs or groups */
#define N_TEST 10000  /* held-out pairs or groups */
#define EPOCHS 6
#define PAIRS 100 /* pairs per step */
#define K 4       /* responses per group */
#define GROUPS 50 /* groups per step (200 rows) */
#define N_IMPLIED (K * (K - 1) / 2)

/*
 * Tolerance of the recovered tie parameter: relative 10%. Its standard error
 * with 20 000 pairs, from the curvature of the summed training loss at the
 * optimum (observed Fisher information with the scores fixed, printed as
 * "se"), is 0.018 = 1.0% of theta* = 1.8 and 0.015 = 1.9% of nu* = 0.8; over
 * 20 seeds the error had sd 0.9% (Rao-Kupper) and 1.4% (Davidson), at most
 * 1.8% and 3.9%. 10% is over 5 standard errors, while a wrong tie probability
 * (e.g. theta^2 for theta) or a wrong generative model lands far outside it.
 * The other thresholds have similar margins over those 20 seeds: |w| within
 * 4% of |w*|, accuracy within 0.3 points of Bayes, ECE below 0.015, P(tie)
 * within 0.007 of the truth, exact-ranking rate within 0.4 points of w*'s.
 */
#define TIE_TOL 0.10

#define CHECK_OK(call)                                                                             \
  do {                                                                                             \
    int rc_ = (call);                                                                              \
    if (rc_ != PRM_OK) fail_msg("%s: %s (%s)", #call, prm_status_string(rc_), prm_last_errmsg());  \
  } while (0)

/* w* ~ N(0, I), scaled to |w*| = 2: reward differences of two responses have
 * std 2 sqrt(2), so labels are noisy and the test is about estimation. */
static void draw_w(prmt_rng *r, double *w) {
  double norm = 0;
  for (int j = 0; j < D; j++) {
    w[j] = prmt_normal(r);
    norm += w[j] * w[j];
  }
  for (int j = 0; j < D; j++)
    w[j] *= 2.0 / sqrt(norm);
}

static double reward(const double *w, const float *x) {
  double s = 0;
  for (int j = 0; j < D; j++)
    s += w[j] * x[j];
  return s;
}

/* cos(w, w*) of the model's weights; |w| to *norm. */
static double cosine_with(prm_model *m, const double *w_true, double *norm) {
  const float *w = prm_model_params(m, NULL);
  double dot = 0, nw = 0, nt = 0;
  for (int j = 0; j < D; j++) {
    dot += w[j] * w_true[j];
    nw += (double)w[j] * w[j];
    nt += w_true[j] * w_true[j];
  }
  *norm = sqrt(nw);
  return dot / sqrt(nw * nt);
}

/* Adam, lr 0.05 decaying linearly to 0 over the run (as test_learning.c). */
static prm_optimizer *new_adam(prm_model *m, uint64_t total_steps) {
  prm_optimizer_options oo;
  CHECK_OK(prm_optimizer_options_init(&oo, PRM_OPTIMIZER_OPTIONS_VERSION));
  oo.algorithm = PRM_OPT_ADAM;
  oo.lr = 0.05;
  oo.schedule = PRM_SCHED_LINEAR;
  oo.total_steps = total_steps;
  prm_optimizer *opt = NULL;
  CHECK_OK(prm_optimizer_new(&opt, m, &oo));
  return opt;
}

/* ---- ties ----------------------------------------------------------------- */

/* A pair set: rows [0, n) are the first response of each pair (the winner,
 * or either response of a tie), rows [n, 2n) the second; tie[i] = 1 marks a
 * tie. */
typedef struct tie_set {
  int n;
  float *rows;
  uint8_t *tie;
  int n_tied;
  int bayes_agree;         /* untied pairs whose winner w* scores higher */
  double true_ptie_tied;   /* mean true P(tie) over the tied pairs */
  double true_ptie_untied; /* ... and over the untied ones */
} tie_set;

/* P_win, P_lose, P_tie of a pair with reward difference z (first - second)
 * under the tie model with parameter `param` (prefrm.h, prm_loss_bt). */
static void tie_probs(int model, double param, double z, double p[3]) {
  if (model == PRM_TIE_RAO_KUPPER) {
    p[0] = 1.0 / (1.0 + param * exp(-z)); /* sigmoid(z - log theta) */
    p[1] = 1.0 / (1.0 + param * exp(z));
  } else { /* Davidson: e^{+-z/2} / (e^{z/2} + e^{-z/2} + nu) */
    p[0] = 1.0 / (1.0 + exp(-z) + param * exp(-0.5 * z));
    p[1] = 1.0 / (1.0 + exp(z) + param * exp(0.5 * z));
  }
  p[2] = 1.0 - p[0] - p[1];
}

static void sample_ties(prmt_rng *r, const double *w, int model, double param, int n, tie_set *s) {
  memset(s, 0, sizeof *s);
  s->n = n;
  s->rows = malloc(sizeof(float) * 2 * (size_t)n * D);
  s->tie = malloc((size_t)n);
  assert_non_null(s->rows);
  assert_non_null(s->tie);
  for (int i = 0; i < n; i++) {
    float a[D], b[D];
    for (int j = 0; j < D; j++) {
      a[j] = (float)prmt_normal(r);
      b[j] = (float)prmt_normal(r);
    }
    double z = reward(w, a) - reward(w, b), p[3];
    tie_probs(model, param, z, p);
    double u = prmt_uniform(r);
    int lose = u >= p[0] && u < p[0] + p[1];
    s->tie[i] = u >= p[0] + p[1];
    memcpy(s->rows + (size_t)i * D, lose ? b : a, sizeof a);
    memcpy(s->rows + (size_t)(n + i) * D, lose ? a : b, sizeof a);
    if (s->tie[i]) {
      s->n_tied++;
      s->true_ptie_tied += p[2];
    } else {
      s->true_ptie_untied += p[2];
      s->bayes_agree += lose ? z < 0 : z > 0;
    }
  }
  s->true_ptie_tied /= s->n_tied;
  s->true_ptie_untied /= n - s->n_tied;
}

static void free_ties(tie_set *s) {
  free(s->rows);
  free(s->tie);
}

/* The mean pair loss of scores sc (2n: first responses, then second) as a
 * function of the tie parameter. */
static double tie_nll(const float *sc, const tie_set *s, int model, double param) {
  prm_loss_options lo;
  CHECK_OK(prm_loss_options_init(&lo, 2));
  lo.tie_model = model;
  lo.tie_param = param;
  lo.tie = s->tie;
  double loss = 0;
  CHECK_OK(prm_loss_bt(sc, sc + s->n, (uint64_t)s->n, &lo, &loss, NULL, NULL, NULL));
  return loss;
}

/*
 * Fit the tie parameter to the training set with the model's scores fixed:
 * golden-section search of the mean loss over u = log(theta - 1) (Rao-Kupper)
 * or u = log(nu) (Davidson) in [log 1e-3, log 20]; the loss is unimodal in
 * the parameter. Its standard error, 1 / sqrt(n L''), goes to *se.
 */
static double fit_tie_param(prm_ctx *c, const tie_set *s, int model, float *sc, double *se) {
  prm_batch b = prmt_batch(s->rows, 2 * (uint64_t)s->n, D);
  CHECK_OK(prm_ctx_forward(c, &b, sc, 2 * (uint64_t)s->n));
  const double off = model == PRM_TIE_RAO_KUPPER ? 1.0 : 0.0, g = 0.5 * (sqrt(5.0) - 1.0);
  double lo = log(1e-3), hi = log(20.0);
  double x1 = hi - g * (hi - lo), x2 = lo + g * (hi - lo);
  double f1 = tie_nll(sc, s, model, off + exp(x1)), f2 = tie_nll(sc, s, model, off + exp(x2));
  for (int it = 0; it < 50; it++) {
    if (f1 < f2) {
      hi = x2, x2 = x1, f2 = f1;
      x1 = hi - g * (hi - lo);
      f1 = tie_nll(sc, s, model, off + exp(x1));
    } else {
      lo = x1, x1 = x2, f1 = f2;
      x2 = lo + g * (hi - lo);
      f2 = tie_nll(sc, s, model, off + exp(x2));
    }
  }
  double p = off + exp(0.5 * (lo + hi)), h = 0.01 * (p - off);
  double curv =
      (tie_nll(sc, s, model, p + h) - 2 * tie_nll(sc, s, model, p) + tie_nll(sc, s, model, p - h)) /
      (h * h);
  *se = curv > 0 ? 1.0 / sqrt(s->n * curv) : INFINITY;
  return p;
}

static void learn_ties(int model, double truth, double guess, uint64_t seed, const char *name) {
  prmt_rng r = {seed};
  double w_true[D];
  draw_w(&r, w_true);
  tie_set tr, te;
  sample_ties(&r, w_true, model, truth, N_TRAIN, &tr);
  sample_ties(&r, w_true, model, truth, N_TEST, &te);

  prm_model *m = prmt_linear(D, 1);
  prm_ctx *c = prmt_ctx(m, 2 * N_TRAIN, 0);
  prm_optimizer *opt = new_adam(m, EPOCHS * (N_TRAIN / PAIRS));
  float *batch = malloc(sizeof(float) * 2 * PAIRS * D);
  float *sc = malloc(sizeof(float) * 2 * N_TRAIN);
  assert_non_null(batch);
  assert_non_null(sc);

  prm_loss_options lo;
  CHECK_OK(prm_loss_options_init(&lo, PRM_LOSS_OPTIONS_VERSION));
  lo.tie_model = model;
  lo.tie_param = guess;
  double se = 0;
  printf("%s: %d of %d training pairs tied; parameter per epoch: %.4f", name, tr.n_tied, N_TRAIN,
         guess);
  for (int e = 0; e < EPOCHS; e++) {
    for (int s = 0; s < N_TRAIN; s += PAIRS) {
      memcpy(batch, tr.rows + (size_t)s * D, sizeof(float) * PAIRS * D);
      memcpy(batch + PAIRS * D, tr.rows + (size_t)(N_TRAIN + s) * D, sizeof(float) * PAIRS * D);
      prm_batch b = prmt_batch(batch, 2 * PAIRS, D);
      lo.tie = tr.tie + s;
      CHECK_OK(prm_train_step(c, opt, &b, &lo, NULL));
    }
    lo.tie_param = fit_tie_param(c, &tr, model, sc, &se);
    printf(" -> %.4f", lo.tie_param);
  }
  printf("\n");

  double norm, cosine = cosine_with(m, w_true, &norm);
  prm_batch tb = prmt_batch(te.rows, 2 * N_TEST, D);
  prm_loss_stats st;
  CHECK_OK(prm_loss_stats_init(&st, PRM_LOSS_STATS_VERSION));
  lo.tie = te.tie;
  CHECK_OK(prm_evaluate(c, &tb, &lo, &st));
  double bayes = (double)te.bayes_agree / (N_TEST - te.n_tied);
  printf("%s: recovered %.4f (truth %.4f, se %.4f, error %+.2f%%); cosine(w, w*) = %.5f, |w| = "
         "%.3f (|w*| = 2)\n",
         name, lo.tie_param, truth, se, 100 * (lo.tie_param / truth - 1), cosine, norm);
  printf("%s: held-out accuracy %.4f (Bayes %.4f), ECE %.4f, Brier %.4f, exact %.4f, P(tie) "
         "tied %.4f (true %.4f), untied %.4f (true %.4f), n_compared %llu, n_tied %llu\n",
         name, st.accuracy, bayes, st.ece, st.brier, st.exact_rate, st.tie_prob_tied,
         te.true_ptie_tied, st.tie_prob_untied, te.true_ptie_untied,
         (unsigned long long)st.n_compared, (unsigned long long)st.n_tied);
  assert_true(cosine >= 0.99);
  assert_true(fabs(norm / 2 - 1) <= 0.10);
  assert_true(fabs(lo.tie_param / truth - 1) <= TIE_TOL);
  assert_int_equal(st.n_tied, te.n_tied);
  assert_int_equal(st.n_compared, N_TEST - te.n_tied);
  assert_true(fabs(st.accuracy - bayes) <= 0.01);
  assert_true(st.ece < 0.05);
  assert_true(st.exact_rate > 0.5);
  assert_true(fabs(st.tie_prob_tied - te.true_ptie_tied) <= 0.02);
  assert_true(fabs(st.tie_prob_untied - te.true_ptie_untied) <= 0.02);

  prm_optimizer_free(opt);
  prm_ctx_free(c);
  prm_model_free(m);
  free_ties(&tr);
  free_ties(&te);
  free(batch);
  free(sc);
}

static void test_rao_kupper_ties(void **state) {
  (void)state;
  learn_ties(PRM_TIE_RAO_KUPPER, 1.8, 1.2, 4242, "rao-kupper");
}

static void test_davidson_ties(void **state) {
  (void)state;
  learn_ties(PRM_TIE_DAVIDSON, 0.8, 0.2, 4343, "davidson");
}

/* ---- rankings ------------------------------------------------------------- */

/* n groups of K rows, each group ranked best first. */
typedef struct rank_set {
  int n;
  float *rows;
  int bayes_pairs; /* implied pairs that w* orders as the ranking does */
  int bayes_exact; /* groups that w* ranks exactly as the ranking */
} rank_set;

/* Plackett-Luce: pick the best of the remaining responses with probability
 * softmax of their rewards, then the best of the rest, and so on. */
static void sample_rankings(prmt_rng *r, const double *w, int n, rank_set *s) {
  memset(s, 0, sizeof *s);
  s->n = n;
  s->rows = malloc(sizeof(float) * (size_t)n * K * D);
  assert_non_null(s->rows);
  for (int g = 0; g < n; g++) {
    float x[K][D];
    double rw[K], ranked[K];
    int left[K];
    for (int k = 0; k < K; k++) {
      for (int j = 0; j < D; j++)
        x[k][j] = (float)prmt_normal(r);
      rw[k] = reward(w, x[k]);
      left[k] = k;
    }
    for (int pos = 0; pos < K; pos++) {
      int nl = K - pos, pick = nl - 1;
      double mx = -INFINITY, sum = 0, p[K];
      for (int i = 0; i < nl; i++)
        mx = fmax(mx, rw[left[i]]);
      for (int i = 0; i < nl; i++)
        sum += p[i] = exp(rw[left[i]] - mx);
      double u = prmt_uniform(r) * sum;
      for (int i = 0; i < nl - 1; i++) {
        if (u < p[i]) {
          pick = i;
          break;
        }
        u -= p[i];
      }
      memcpy(s->rows + ((size_t)g * K + pos) * D, x[left[pick]], sizeof x[0]);
      ranked[pos] = rw[left[pick]];
      left[pick] = left[nl - 1];
    }
    int exact = 1;
    for (int a = 0; a < K; a++)
      for (int b = a + 1; b < K; b++) {
        s->bayes_pairs += ranked[a] > ranked[b];
        exact &= ranked[a] > ranked[b];
      }
    s->bayes_exact += exact;
  }
}

static void learn_rankings(int loss, uint64_t seed, const char *name) {
  prmt_rng r = {seed};
  double w_true[D];
  draw_w(&r, w_true);
  rank_set tr, te;
  sample_rankings(&r, w_true, N_TRAIN, &tr);
  sample_rankings(&r, w_true, N_TEST, &te);
  int32_t *sizes = malloc(sizeof(int32_t) * N_TEST);
  assert_non_null(sizes);
  for (int g = 0; g < N_TEST; g++)
    sizes[g] = K;

  prm_model *m = prmt_linear(D, 1);
  prm_ctx *c = prmt_ctx(m, (uint64_t)N_TEST * K, 0);
  prm_optimizer *opt = new_adam(m, EPOCHS * (N_TRAIN / GROUPS));
  prm_rank_options ro;
  CHECK_OK(prm_rank_options_init(&ro, PRM_RANK_OPTIONS_VERSION));
  ro.loss = loss;
  for (int e = 0; e < EPOCHS; e++)
    for (int s = 0; s < N_TRAIN; s += GROUPS) {
      /* the groups of a step are contiguous rows: no gathering */
      prm_batch b = prmt_batch(tr.rows + (size_t)s * K * D, GROUPS * K, D);
      CHECK_OK(prm_train_step_groups(c, opt, &b, sizes, GROUPS, &ro, NULL));
    }

  double norm, cosine = cosine_with(m, w_true, &norm);
  prm_batch tb = prmt_batch(te.rows, (uint64_t)N_TEST * K, D);
  prm_loss_stats st;
  CHECK_OK(prm_loss_stats_init(&st, PRM_LOSS_STATS_VERSION));
  CHECK_OK(prm_evaluate_groups(c, &tb, sizes, N_TEST, &ro, &st));
  double bayes = (double)te.bayes_pairs / ((double)N_TEST * N_IMPLIED);
  double bayes_exact = (double)te.bayes_exact / N_TEST;
  printf("%s: cosine(w, w*) = %.5f, |w| = %.3f (|w*| = 2); held-out pairwise accuracy %.4f "
         "(Bayes %.4f), exact %.4f (w*: %.4f), ECE %.4f, Brier %.4f, loss %.4f\n",
         name, cosine, norm, st.accuracy, bayes, st.exact_rate, bayes_exact, st.ece, st.brier,
         st.loss);
  assert_true(cosine >= 0.99);
  assert_true(fabs(norm / 2 - 1) <= 0.10);
  assert_int_equal(st.n_compared, (uint64_t)N_TEST * N_IMPLIED);
  assert_int_equal(st.n_tied, 0);
  assert_true(fabs(st.accuracy - bayes) <= 0.01);
  assert_true(fabs(st.exact_rate - bayes_exact) <= 0.02);
  assert_true(st.ece < 0.05);

  prm_optimizer_free(opt);
  prm_ctx_free(c);
  prm_model_free(m);
  free(tr.rows);
  free(te.rows);
  free(sizes);
}

static void test_pairwise_rankings(void **state) {
  (void)state;
  learn_rankings(PRM_RANK_PAIRWISE, 5151, "instructgpt pairwise, K = 4");
}

static void test_plackett_luce_rankings(void **state) {
  (void)state;
  learn_rankings(PRM_RANK_PLACKETT_LUCE, 5252, "plackett-luce, K = 4");
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_rao_kupper_ties),
      cmocka_unit_test(test_davidson_ties),
      cmocka_unit_test(test_pairwise_rankings),
      cmocka_unit_test(test_plackett_luce_rankings),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
