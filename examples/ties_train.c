/*
 * ties_train.c - train on preference data that contains ties.
 *
 * Labellers often answer "about the same". Plain Bradley-Terry has no such
 * outcome and the ties would have to be dropped; a tie model (Davidson or
 * Rao-Kupper, docs/losses.md) learns from them too. Here:
 *
 * 1. A hidden reward r*(x) = w . x over D features.
 * 2. A simulated labeller compares two responses as Davidson's model says,
 *    with nu = 0.8: a win, a loss or a tie, ties most likely when the two
 *    rewards are close. A tie is flagged tie[i] = 1 (its order is
 *    irrelevant); otherwise the winner is listed first.
 * 3. A linear reward model is trained with the Davidson loss in one call
 *    (prm_train_step with the tie options).
 * 4. Each epoch prints, on held-out pairs, the accuracy over the untied
 *    pairs and the model's mean P(tie) over the pairs labelled a tie and
 *    over the others: a model that sees the ties rates the first higher.
 *
 *   ./build/examples/ties_train
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <prefrm.h>

#define D 8
#define NU 0.8       /* the labeller's tie propensity, also given to the loss */
#define N_TRAIN 4096 /* training pairs */
#define N_TEST 1024  /* held-out pairs */
#define P 64         /* pairs per step */
#define EPOCHS 4

#define CHECK(call)                                                                                \
  do {                                                                                             \
    int rc_ = (call);                                                                              \
    if (rc_ != PRM_OK) {                                                                           \
      fprintf(stderr, "%s failed: %s (%s)\n", #call, prm_status_string(rc_), prm_last_errmsg());   \
      exit(1);                                                                                     \
    }                                                                                              \
  } while (0)

/* A small deterministic generator for the synthetic data (not the library's). */
static unsigned long long rng_state = 21;
static double uniform(void) {
  rng_state = rng_state * 6364136223846793005ull + 1442695040888963407ull;
  return (double)(rng_state >> 11) * 0x1.0p-53;
}

/* n pairs in batches of p: for each batch, p first rows then p second rows
 * (the winner first unless tie[i]), as prm_train_step expects. */
static void make_pairs(float *rows, uint8_t *tie, int n, int p, const float *w) {
  for (int i = 0; i < n; i++) {
    float a[D], b[D];
    double ra = 0.0, rb = 0.0;
    for (int j = 0; j < D; j++) {
      a[j] = (float)(2.0 * uniform() - 1.0);
      b[j] = (float)(2.0 * uniform() - 1.0);
      ra += w[j] * a[j];
      rb += w[j] * b[j];
    }
    /* Davidson: P_win : P_lose : P_tie = e^ra : e^rb : nu e^((ra + rb) / 2) */
    const double h = (ra - rb) / 2.0, den = exp(h) + exp(-h) + NU;
    const double u = uniform(), p_win = exp(h) / den, p_tie = NU / den;
    tie[i] = u >= p_win && u < p_win + p_tie;
    const int b_won = u >= p_win + p_tie;
    const float *first = b_won ? b : a, *second = b_won ? a : b;
    const int batch = i / p, k = i % p;
    memcpy(rows + ((size_t)batch * 2 * p + k) * D, first, sizeof a);
    memcpy(rows + ((size_t)batch * 2 * p + p + k) * D, second, sizeof a);
  }
}

int main(void) {
  float w[D];
  for (int j = 0; j < D; j++) w[j] = (float)(6.0 * uniform() - 3.0);
  float *train = malloc(sizeof(float) * 2 * N_TRAIN * D);
  float *test = malloc(sizeof(float) * 2 * N_TEST * D);
  uint8_t *train_tie = malloc(N_TRAIN), *test_tie = malloc(N_TEST);
  if (!train || !test || !train_tie || !test_tie) return 1;
  make_pairs(train, train_tie, N_TRAIN, P, w);
  make_pairs(test, test_tie, N_TEST, N_TEST, w); /* one batch of N_TEST pairs */

  prm_model_options mo = PRM_MODEL_OPTIONS_INIT;
  mo.arch = PRM_ARCH_LINEAR;
  mo.input_size = D;
  prm_model *model = NULL;
  CHECK(prm_model_new(&model, &mo));
  prm_ctx_options co = PRM_CTX_OPTIONS_INIT;
  co.max_rows = 2 * N_TEST;
  prm_ctx *ctx = NULL;
  CHECK(prm_ctx_new(&ctx, model, &co));
  prm_optimizer_options oo = PRM_OPTIMIZER_OPTIONS_INIT;
  oo.lr = 0.05;
  prm_optimizer *opt = NULL;
  CHECK(prm_optimizer_new(&opt, model, &oo));

  for (int epoch = 1; epoch <= EPOCHS; epoch++) {
    for (int s = 0; s < N_TRAIN / P; s++) {
      const uint8_t *tie = train_tie + (size_t)s * P;
      prm_batch pairs = PRM_BATCH_INIT;
      pairs.features = train + (size_t)s * 2 * P * D;
      pairs.n = 2 * P;
      pairs.n_features = D;
      /* pairs[i] judged a tie by the labeller -> tie[i] = 1 */
      prm_loss_options lo = PRM_LOSS_OPTIONS_INIT;
      lo.tie_model = PRM_TIE_DAVIDSON;
      lo.tie_param = NU;  /* nu; estimate it as docs/losses.md describes */
      lo.tie = tie;       /* uint8_t[P] */
      prm_loss_stats st = PRM_LOSS_STATS_INIT;
      CHECK(prm_train_step(ctx, opt, &pairs, &lo, &st));
    }
    prm_batch tb = PRM_BATCH_INIT;
    tb.features = test;
    tb.n = 2 * N_TEST;
    tb.n_features = D;
    prm_loss_options lo = PRM_LOSS_OPTIONS_INIT;
    lo.tie_model = PRM_TIE_DAVIDSON;
    lo.tie_param = NU;
    lo.tie = test_tie;
    prm_loss_stats ts = PRM_LOSS_STATS_INIT;
    CHECK(prm_evaluate(ctx, &tb, &lo, &ts));
    /* ts.tie_prob_tied vs ts.tie_prob_untied: does the model see the ties? */
    printf("epoch %d  held-out loss %.4f  accuracy %.3f (%llu untied)  "
           "P(tie): %.3f on the %llu ties, %.3f on the others\n",
           epoch, ts.loss, ts.accuracy, (unsigned long long)ts.n_compared, ts.tie_prob_tied,
           (unsigned long long)ts.n_tied, ts.tie_prob_untied);
  }
  prm_optimizer_free(opt);
  prm_ctx_free(ctx);
  prm_model_free(model);
  free(train);
  free(test);
  free(train_tie);
  free(test_tie);
  return 0;
}
