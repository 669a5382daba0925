/*
 * rank_train.c - train a reward model from K-wise rankings.
 *
 * 1. Invent a hidden "true" reward r*(x) = w* . x over 16 features.
 * 2. Make groups of K = 4 responses to one prompt and let a simulated
 *    labeller rank each group by Plackett-Luce: the best is picked with
 *    probability softmax(r*) over the group, the second best the same way
 *    among the rest, and so on.
 * 3. Train a linear reward model on the ranked groups with prm_train_step_groups
 *    and the InstructGPT pairwise loss (default) or the Plackett-Luce loss:
 *        rank_train [--loss pairwise|plackett-luce]
 * 4. Each epoch, print on held-out groups (prm_evaluate_groups, statistics
 *    version 2): the loss, pairwise accuracy, exact-ranking rate, Brier
 *    score and expected calibration error. The first line gives the same
 *    figures for r* itself (prm_loss_rank on the true rewards): no model
 *    beats it on average, a good one gets close.
 *
 * A group batch is an ordinary prm_batch whose rows are the groups back to
 * back, each best first, plus an array of group sizes (K may differ between
 * groups; here it is 4 for all). Every libprefrm call returns a status;
 * CHECK() prints the message and stops the program on failure.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <prefrm.h>

#define D 16         /* features per response */
#define K 4          /* responses per group */
#define N_TRAIN 4000 /* ranked training groups */
#define N_TEST 1000  /* held-out groups */
#define GROUPS 32    /* groups per training step (128 rows) */
#define EPOCHS 6

#define CHECK(call)                                                                                \
  do {                                                                                             \
    int rc_ = (call);                                                                              \
    if (rc_ != PRM_OK) {                                                                           \
      fprintf(stderr, "%s failed: %s (%s)\n", #call, prm_status_string(rc_), prm_last_errmsg());   \
      exit(1);                                                                                     \
    }                                                                                              \
  } while (0)

/* A tiny deterministic generator for the synthetic data (not the library's). */
static unsigned long long rng_state = 7;
static double uniform(void) {
  rng_state = rng_state * 6364136223846793005ull + 1442695040888963407ull;
  return (double)(rng_state >> 11) * 0x1.0p-53;
}
static double normal(void) {
  double u = uniform() + 1e-12, v = uniform();
  return sqrt(-2.0 * log(u)) * cos(6.283185307179586 * v);
}

static double w_true[D];
static double true_reward(const float *x) {
  double r = 0.0;
  for (int j = 0; j < D; j++)
    r += w_true[j] * x[j];
  return r;
}

/*
 * Make n ranked groups: rows g*K .. g*K+K-1 of `rows` are group g, best
 * first -- the layout prm_train_step_groups expects. The true rewards of the
 * rows go to `r` (n*K floats) unless it is NULL.
 */
static void make_groups(float *rows, float *r, int n) {
  for (int g = 0; g < n; g++) {
    float x[K][D];
    double rw[K];
    int left[K]; /* responses not yet ranked */
    for (int k = 0; k < K; k++) {
      for (int j = 0; j < D; j++)
        x[k][j] = (float)normal();
      rw[k] = true_reward(x[k]);
      left[k] = k;
    }
    for (int pos = 0; pos < K; pos++) {
      int nl = K - pos, pick = nl - 1;
      double p[K], sum = 0.0, mx = -INFINITY;
      for (int i = 0; i < nl; i++)
        mx = fmax(mx, rw[left[i]]);
      for (int i = 0; i < nl; i++)
        sum += p[i] = exp(rw[left[i]] - mx);
      double u = uniform() * sum;
      for (int i = 0; i < nl - 1; i++) {
        if (u < p[i]) {
          pick = i;
          break;
        }
        u -= p[i];
      }
      memcpy(rows + ((size_t)g * K + pos) * D, x[left[pick]], sizeof x[0]);
      if (r) r[(size_t)g * K + pos] = (float)rw[left[pick]];
      left[pick] = left[nl - 1];
    }
  }
}

static void print_stats(const char *what, double train_loss, const prm_loss_stats *s) {
  if (train_loss >= 0)
    printf("%-8s train loss %.4f  held-out loss %.4f", what, train_loss, s->loss);
  else
    printf("%-8s                    held-out loss %.4f", what, s->loss);
  printf("  pair accuracy %.4f  exact ranking %.4f  Brier %.4f  ECE %.4f\n", s->accuracy,
         s->exact_rate, s->brier, s->ece);
}

int main(int argc, char **argv) {
  int32_t loss = PRM_RANK_PAIRWISE;
  for (int i = 1; i < argc; i++) {
    if (strcmp(argv[i], "--loss") == 0 && i + 1 < argc) {
      const char *l = argv[++i];
      if (strcmp(l, "pairwise") == 0) {
        loss = PRM_RANK_PAIRWISE;
      } else if (strcmp(l, "plackett-luce") == 0) {
        loss = PRM_RANK_PLACKETT_LUCE;
      } else {
        fprintf(stderr, "unknown loss '%s' (pairwise or plackett-luce)\n", l);
        return 2;
      }
    } else {
      fprintf(stderr, "usage: %s [--loss pairwise|plackett-luce]\n", argv[0]);
      return 2;
    }
  }

  /* |w*| = 2: reward gaps are large enough to rank by, small enough to be noisy. */
  double norm = 0.0;
  for (int j = 0; j < D; j++) {
    w_true[j] = normal();
    norm += w_true[j] * w_true[j];
  }
  for (int j = 0; j < D; j++)
    w_true[j] *= 2.0 / sqrt(norm);

  float *train = malloc(sizeof(float) * N_TRAIN * K * D);
  float *test = malloc(sizeof(float) * N_TEST * K * D);
  float *r_test = malloc(sizeof(float) * N_TEST * K);
  int32_t *sizes = malloc(sizeof(int32_t) * N_TEST);
  if (!train || !test || !r_test || !sizes) return 1;
  make_groups(train, NULL, N_TRAIN);
  make_groups(test, r_test, N_TEST);
  for (int g = 0; g < N_TEST; g++)
    sizes[g] = K;

  prm_rank_options ro;
  CHECK(prm_rank_options_init(&ro, PRM_RANK_OPTIONS_VERSION));
  ro.loss = loss;

  /* The true reward's own figures on the held-out groups: the target. */
  prm_loss_stats bayes;
  CHECK(prm_loss_stats_init(&bayes, PRM_LOSS_STATS_VERSION));
  CHECK(prm_loss_rank(r_test, (uint64_t)N_TEST * K, sizes, N_TEST, &ro, NULL, &bayes, NULL));

  prm_model_options mo;
  CHECK(prm_model_options_init(&mo, PRM_MODEL_OPTIONS_VERSION));
  mo.arch = PRM_ARCH_LINEAR;
  mo.input_size = D;
  mo.seed = 1;
  prm_model *model = NULL;
  CHECK(prm_model_new(&model, &mo));

  /* One training context big enough for the whole held-out set. */
  prm_ctx_options co;
  CHECK(prm_ctx_options_init(&co, PRM_CTX_OPTIONS_VERSION));
  co.max_rows = (uint64_t)N_TEST * K;
  prm_ctx *ctx = NULL;
  CHECK(prm_ctx_new(&ctx, model, &co));

  /* Adam, decaying linearly to 0 over the run. */
  prm_optimizer_options oo;
  CHECK(prm_optimizer_options_init(&oo, PRM_OPTIMIZER_OPTIONS_VERSION));
  oo.algorithm = PRM_OPT_ADAM;
  oo.lr = 0.05;
  oo.schedule = PRM_SCHED_LINEAR;
  oo.total_steps = EPOCHS * (N_TRAIN / GROUPS);
  prm_optimizer *opt = NULL;
  CHECK(prm_optimizer_new(&opt, model, &oo));

  printf("libprefrm %s: linear %d -> 1, %s loss, %d training groups of %d, %d held out\n",
         prm_version_string(), D, loss == PRM_RANK_PAIRWISE ? "pairwise" : "plackett-luce", N_TRAIN,
         K, N_TEST);
  print_stats("true r*", -1.0, &bayes);
  for (int epoch = 1; epoch <= EPOCHS; epoch++) {
    double loss_sum = 0.0;
    int steps = 0;
    for (int start = 0; start + GROUPS <= N_TRAIN; start += GROUPS) {
      /* The groups of one step are contiguous rows: point the batch at them. */
      prm_batch b;
      CHECK(prm_batch_init(&b, PRM_BATCH_VERSION));
      b.features = train + (size_t)start * K * D;
      b.n = (uint64_t)GROUPS * K;
      b.n_features = D;
      prm_loss_stats st;
      CHECK(prm_loss_stats_init(&st, PRM_LOSS_STATS_VERSION));
      CHECK(prm_train_step_groups(ctx, opt, &b, sizes, GROUPS, &ro, &st));
      loss_sum += st.loss;
      steps++;
    }
    prm_batch tb;
    CHECK(prm_batch_init(&tb, PRM_BATCH_VERSION));
    tb.features = test;
    tb.n = (uint64_t)N_TEST * K;
    tb.n_features = D;
    prm_loss_stats ts;
    CHECK(prm_loss_stats_init(&ts, PRM_LOSS_STATS_VERSION));
    CHECK(prm_evaluate_groups(ctx, &tb, sizes, N_TEST, &ro, &ts));
    char what[16];
    snprintf(what, sizeof what, "epoch %d", epoch);
    print_stats(what, loss_sum / steps, &ts);
  }

  prm_optimizer_free(opt);
  prm_ctx_free(ctx);
  prm_model_free(model);
  free(train);
  free(test);
  free(r_test);
  free(sizes);
  return 0;
}
