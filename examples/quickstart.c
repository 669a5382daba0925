/*
 * quickstart.c - train a reward model from pairwise preferences.
 *
 * 1. Invent a hidden "true" reward r*(x) over 16 features.
 * 2. Sample pairs (a, b) and let a simulated labeller prefer a with
 *    probability sigmoid(r*(a) - r*(b)) -- the Bradley-Terry model.
 * 3. Train an mlp reward model on the labelled pairs with AdamW.
 * 4. Each epoch, print the training loss and the held-out accuracy next to
 *    the Bayes-optimal accuracy (how often r* itself agrees with the labels):
 *    no model can beat it on average, a good one gets close.
 *
 * Build and run: see README.md. Every libprefrm call returns a status;
 * CHECK() prints the message and stops the program on failure.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <prefrm.h>

#define D 16         /* features per response */
#define N_TRAIN 8000 /* labelled training pairs */
#define N_TEST 2000  /* held-out pairs */
#define PAIRS 64     /* pairs per training step */
#define EPOCHS 8

#define CHECK(call)                                                                  \
  do {                                                                               \
    int rc_ = (call);                                                                \
    if (rc_ != PRM_OK) {                                                             \
      fprintf(stderr, "%s failed: %s (%s)\n", #call, prm_status_string(rc_),          \
              prm_last_errmsg());                                                    \
      exit(1);                                                                       \
    }                                                                                \
  } while (0)

/* A tiny deterministic generator for the synthetic data (not the library's). */
static unsigned long long rng_state = 42;
static double uniform(void) {
  rng_state = rng_state * 6364136223846793005ull + 1442695040888963407ull;
  return (double)(rng_state >> 11) * 0x1.0p-53;
}
static double normal(void) {
  double u = uniform() + 1e-12, v = uniform();
  return sqrt(-2.0 * log(u)) * cos(6.283185307179586 * v);
}

/* The hidden reward: a few tanh units, so a linear model cannot fit it. */
static float U[4][D];
static double true_reward(const float *x) {
  double r = 0.0;
  for (int k = 0; k < 4; k++) {
    double s = 0.0;
    for (int j = 0; j < D; j++) s += U[k][j] * x[j];
    r += (k % 2 ? -1.5 : 2.0) * tanh(s);
  }
  return r;
}

/*
 * Make n labelled pairs. Row i (< n) of `rows` is the chosen response of pair
 * i and row n + i the rejected one: the layout prm_train_step expects.
 * Returns how many labels the true reward agrees with.
 */
static int make_pairs(float *rows, int n) {
  int agree = 0;
  for (int i = 0; i < n; i++) {
    float a[D], b[D];
    for (int j = 0; j < D; j++) a[j] = (float)normal(), b[j] = (float)normal();
    double delta = true_reward(a) - true_reward(b);
    int a_wins = uniform() < 1.0 / (1.0 + exp(-delta));
    memcpy(rows + (size_t)i * D, a_wins ? a : b, sizeof a);
    memcpy(rows + (size_t)(n + i) * D, a_wins ? b : a, sizeof a);
    agree += (delta > 0) == a_wins;
  }
  return agree;
}

int main(void) {
  for (int k = 0; k < 4; k++)
    for (int j = 0; j < D; j++) U[k][j] = (float)(normal() / sqrt(D));

  float *train = malloc(sizeof(float) * 2 * N_TRAIN * D);
  float *test = malloc(sizeof(float) * 2 * N_TEST * D);
  float *batch_rows = malloc(sizeof(float) * 2 * PAIRS * D);
  if (!train || !test || !batch_rows) return 1;
  make_pairs(train, N_TRAIN);
  double bayes = (double)make_pairs(test, N_TEST) / N_TEST;

  /* The model: 16 -> 64 -> 64 -> score, GELU. */
  prm_model_options mo = PRM_MODEL_OPTIONS_INIT;
  mo.arch = PRM_ARCH_MLP;
  mo.input_size = D;
  mo.n_hidden = 2;
  mo.hidden[0] = 64;
  mo.hidden[1] = 64;
  mo.activation = PRM_ACT_GELU_TANH;
  mo.seed = 1;
  prm_model *model = NULL;
  CHECK(prm_model_new(&model, &mo));

  /* One training context big enough for the whole test set (2 rows a pair). */
  prm_ctx_options co = PRM_CTX_OPTIONS_INIT;
  co.max_rows = 2 * N_TEST;
  prm_ctx *ctx = NULL;
  CHECK(prm_ctx_new(&ctx, model, &co));

  /* AdamW with a short warm-up and cosine decay over the whole run. */
  prm_optimizer_options oo = PRM_OPTIMIZER_OPTIONS_INIT;
  oo.algorithm = PRM_OPT_ADAMW;
  oo.lr = 3e-3;
  oo.weight_decay = 0.01;
  oo.schedule = PRM_SCHED_COSINE;
  oo.warmup_steps = 50;
  oo.total_steps = EPOCHS * (N_TRAIN / PAIRS);
  prm_optimizer *opt = NULL;
  CHECK(prm_optimizer_new(&opt, model, &oo));

  printf("libprefrm %s: mlp %d-64-64-1, %d training pairs, %d held out\n",
         prm_version_string(), D, N_TRAIN, N_TEST);
  for (int epoch = 1; epoch <= EPOCHS; epoch++) {
    double loss_sum = 0.0;
    int steps = 0;
    for (int start = 0; start + PAIRS <= N_TRAIN; start += PAIRS) {
      /* Gather this step's chosen rows, then its rejected rows. */
      memcpy(batch_rows, train + (size_t)start * D, sizeof(float) * PAIRS * D);
      memcpy(batch_rows + PAIRS * D, train + (size_t)(N_TRAIN + start) * D,
             sizeof(float) * PAIRS * D);
      prm_batch b = PRM_BATCH_INIT;
      b.features = batch_rows;
      b.n = 2 * PAIRS;
      b.n_features = D;
      prm_loss_stats st = PRM_LOSS_STATS_INIT;
      CHECK(prm_train_step(ctx, opt, &b, NULL, &st));
      loss_sum += st.loss;
      steps++;
    }
    prm_batch tb = PRM_BATCH_INIT;
    tb.features = test;
    tb.n = 2 * N_TEST;
    tb.n_features = D;
    prm_loss_stats ts = PRM_LOSS_STATS_INIT;
    CHECK(prm_evaluate(ctx, &tb, NULL, &ts));
    printf("epoch %d  train loss %.4f  held-out loss %.4f  accuracy %.4f  (Bayes-optimal %.4f)\n",
           epoch, loss_sum / steps, ts.loss, ts.accuracy, bayes);
  }

  prm_optimizer_free(opt);
  prm_ctx_free(ctx);
  prm_model_free(model);
  free(train);
  free(test);
  free(batch_rows);
  return 0;
}
