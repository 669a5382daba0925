/*
 * test_learning.c - statistical test: preferences sampled from a known linear
 * reward are learned. d = 32, 20 000 training pairs drawn from the
 * Bradley-Terry model P(a > b) = sigmoid(w* . (a - b)).
 *   - cosine similarity of the learned weights with w* >= 0.99;
 *   - held-out accuracy within 1 point of the Bayes-optimal accuracy (how
 *     often the true reward agrees with the held-out labels).
 * Seeds are fixed, so the test is deterministic; the thresholds hold with a
 * wide margin (see the figures printed on failure).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "testutil.h"

#define D 32
#define N_TRAIN 20000
#define N_TEST 10000
#define PAIRS 100
#define EPOCHS 6

/* n pairs: rows [0, n) chosen, [n, 2n) rejected. Returns the number of
 * pairs whose label agrees with the true reward (Bayes-optimal decisions). */
static int sample_pairs(prmt_rng *r, const double *w, float *rows, int n) {
  int agree = 0;
  for (int i = 0; i < n; i++) {
    float a[D], b[D];
    double delta = 0;
    for (int j = 0; j < D; j++) {
      a[j] = (float)prmt_normal(r);
      b[j] = (float)prmt_normal(r);
      delta += w[j] * ((double)a[j] - b[j]);
    }
    int a_wins = prmt_uniform(r) < 1.0 / (1.0 + exp(-delta));
    memcpy(rows + (size_t)i * D, a_wins ? a : b, sizeof a);
    memcpy(rows + (size_t)(n + i) * D, a_wins ? b : a, sizeof a);
    agree += (delta > 0) == a_wins;
  }
  return agree;
}

static void test_recovers_linear_reward(void **state) {
  (void)state;
  prmt_rng r = {31337};
  double w_true[D], norm = 0;
  for (int j = 0; j < D; j++) {
    w_true[j] = prmt_normal(&r);
    norm += w_true[j] * w_true[j];
  }
  /* |w*| = 2: reward differences have std 2 * sqrt(2), labels are noisy
   * (Bayes accuracy about 0.8), so the test is about estimation, not luck. */
  for (int j = 0; j < D; j++) w_true[j] *= 2.0 / sqrt(norm);

  float *train = malloc(sizeof(float) * 2 * N_TRAIN * D);
  float *test = malloc(sizeof(float) * 2 * N_TEST * D);
  float *batch = malloc(sizeof(float) * 2 * PAIRS * D);
  sample_pairs(&r, w_true, train, N_TRAIN);
  double bayes = (double)sample_pairs(&r, w_true, test, N_TEST) / N_TEST;

  prm_model *m = prmt_linear(D, 1);
  prm_ctx *c = prmt_ctx(m, 2 * N_TEST, 0);
  prm_optimizer_options oo = PRM_OPTIMIZER_OPTIONS_INIT;
  oo.algorithm = PRM_OPT_ADAM;
  oo.lr = 0.05;
  oo.schedule = PRM_SCHED_LINEAR;
  oo.total_steps = EPOCHS * (N_TRAIN / PAIRS);
  prm_optimizer *opt = NULL;
  assert_int_equal(prm_optimizer_new(&opt, m, &oo), PRM_OK);

  for (int e = 0; e < EPOCHS; e++) {
    for (int s = 0; s < N_TRAIN; s += PAIRS) {
      memcpy(batch, train + (size_t)s * D, sizeof(float) * PAIRS * D);
      memcpy(batch + PAIRS * D, train + (size_t)(N_TRAIN + s) * D, sizeof(float) * PAIRS * D);
      prm_batch b = prmt_batch(batch, 2 * PAIRS, D);
      assert_int_equal(prm_train_step(c, opt, &b, NULL, NULL), PRM_OK);
    }
  }

  const float *w = prm_model_params(m, NULL);
  double dot = 0, nw = 0, nt = 0;
  for (int j = 0; j < D; j++) {
    dot += w[j] * w_true[j];
    nw += (double)w[j] * w[j];
    nt += w_true[j] * w_true[j];
  }
  double cosine = dot / sqrt(nw * nt);
  prm_batch tb = prmt_batch(test, 2 * N_TEST, D);
  prm_loss_stats st = PRM_LOSS_STATS_INIT;
  assert_int_equal(prm_evaluate(c, &tb, NULL, &st), PRM_OK);
  printf("cosine(w, w*) = %.5f, |w| = %.3f (|w*| = 2), held-out accuracy %.4f, Bayes %.4f\n",
         cosine, sqrt(nw), st.accuracy, bayes);
  assert_true(cosine >= 0.99);
  assert_true(fabs(st.accuracy - bayes) <= 0.01);

  prm_optimizer_free(opt);
  prm_ctx_free(c);
  prm_model_free(m);
  free(train);
  free(test);
  free(batch);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_recovers_linear_reward),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
