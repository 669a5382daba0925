/*
 * pack_pairs.c - pair batches from data stored some other way.
 *
 * prm_train_step and prm_evaluate read a pair batch of 2P rows: the P chosen
 * responses first, then the P rejected ones in the same order. Data often
 * comes otherwise. This program keeps the same pairs two ways and uses the
 * recipes of docs/cookbook.md:
 *
 *   A. interleaved (chosen 0, rejected 0, chosen 1, ...): copy the rows
 *      into a batch buffer, then prm_train_step;
 *   B. two separate arrays (all chosen rows, all rejected rows): two
 *      memcpy into the batch buffer, then prm_train_step;
 *   C. interleaved, evaluated without copying: an inference context scores
 *      the rows in their stored order, the 2P scores are reordered, and
 *      prm_loss_bt computes the statistics.
 *
 * A and B train two copies of one model on the same batches and must agree
 * bit for bit; C's held-out statistics must agree with prm_evaluate's on
 * the packed batch.
 *
 *   ./build/examples/pack_pairs
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <prefrm.h>

#define D 16 /* features per response */
#define P 64 /* pairs per step */
#define N_PAIRS 4096
#define N_TEST 512 /* held-out pairs, after the training pairs */

#define CHECK(call)                                                                                \
  do {                                                                                             \
    int rc_ = (call);                                                                              \
    if (rc_ != PRM_OK) {                                                                           \
      fprintf(stderr, "%s failed: %s (%s)\n", #call, prm_status_string(rc_), prm_last_errmsg());   \
      exit(1);                                                                                     \
    }                                                                                              \
  } while (0)

/* Interleaved storage: row 2i is pair i's chosen response, row 2i + 1 its
 * rejected one. Copy p pairs into the layout the library reads. */
static void pack_interleaved(float *batch, const float *pairs, uint64_t p, uint64_t d) {
  for (uint64_t i = 0; i < p; i++) {
    memcpy(batch + i * d, pairs + (2 * i) * d, sizeof(float) * d);           /* chosen */
    memcpy(batch + (p + i) * d, pairs + (2 * i + 1) * d, sizeof(float) * d); /* rejected */
  }
}

/* Two arrays, chosen[i] and rejected[i] being pair i: two copies. */
static void pack_separate(float *batch, const float *chosen, const float *rejected, uint64_t p,
                          uint64_t d) {
  memcpy(batch, chosen, sizeof(float) * p * d);
  memcpy(batch + p * d, rejected, sizeof(float) * p * d);
}

/* Statistics of p interleaved pairs, scored in their stored order by an
 * inference context (which reads the rows where they are). scores holds 2p
 * floats, sc and sr p floats each. */
static int evaluate_interleaved(prm_ctx *scorer, const float *pairs, uint64_t p, float *scores,
                                float *sc, float *sr, double *loss, prm_loss_stats *st) {
  prm_batch b = PRM_BATCH_INIT;
  b.features = pairs; /* 2p rows in their stored order: c0 r0 c1 r1 ... */
  b.n = 2 * p;
  b.n_features = D;
  int rc = prm_ctx_forward(scorer, &b, scores, 2 * p);
  if (rc != PRM_OK) return rc;
  for (uint64_t i = 0; i < p; i++) {
    sc[i] = scores[2 * i];     /* chosen */
    sr[i] = scores[2 * i + 1]; /* rejected */
  }
  return prm_loss_bt(sc, sr, p, NULL, loss, st, NULL, NULL);
}

/* A small deterministic generator for the synthetic data (not the library's). */
static unsigned long long rng_state = 9;
static float uniform_pm1(void) {
  rng_state = rng_state * 6364136223846793005ull + 1442695040888963407ull;
  return (float)((double)(rng_state >> 11) * 0x1.0p-52 - 1.0);
}

typedef struct trainee {
  prm_model *model;
  prm_ctx *ctx;
  prm_optimizer *opt;
} trainee;

static void trainee_new(trainee *t) {
  prm_model_options mo = PRM_MODEL_OPTIONS_INIT;
  mo.arch = PRM_ARCH_MLP;
  mo.input_size = D;
  mo.n_hidden = 1;
  mo.hidden[0] = 32;
  mo.seed = 4; /* the same initial parameters for both copies */
  CHECK(prm_model_new(&t->model, &mo));
  prm_ctx_options co = PRM_CTX_OPTIONS_INIT;
  co.max_rows = 2 * N_TEST;
  CHECK(prm_ctx_new(&t->ctx, t->model, &co));
  prm_optimizer_options oo = PRM_OPTIMIZER_OPTIONS_INIT;
  oo.lr = 3e-3;
  CHECK(prm_optimizer_new(&t->opt, t->model, &oo));
}

static void trainee_free(trainee *t) {
  prm_optimizer_free(t->opt);
  prm_ctx_free(t->ctx);
  prm_model_free(t->model);
}

int main(void) {
  /* The same pairs, stored interleaved and as two separate arrays. */
  const int n = N_PAIRS + N_TEST;
  float *pairs = malloc(sizeof(float) * 2 * n * D);
  float *chosen = malloc(sizeof(float) * n * D);
  float *rejected = malloc(sizeof(float) * n * D);
  float *batch = malloc(sizeof(float) * 2 * N_TEST * D);
  float *scores = malloc(sizeof(float) * 2 * N_TEST);
  float *sc = malloc(sizeof(float) * N_TEST), *sr = malloc(sizeof(float) * N_TEST);
  if (!pairs || !chosen || !rejected || !batch || !scores || !sc || !sr) return 1;
  float w[D];
  for (int j = 0; j < D; j++) w[j] = uniform_pm1();
  for (int i = 0; i < n; i++) {
    float a[D], b[D], ra = 0.0f, rb = 0.0f;
    for (int j = 0; j < D; j++) {
      a[j] = uniform_pm1();
      b[j] = uniform_pm1();
      ra += w[j] * a[j];
      rb += w[j] * b[j];
    }
    const float *c = ra >= rb ? a : b, *r = ra >= rb ? b : a;
    memcpy(pairs + (size_t)(2 * i) * D, c, sizeof a);
    memcpy(pairs + (size_t)(2 * i + 1) * D, r, sizeof a);
    memcpy(chosen + (size_t)i * D, c, sizeof a);
    memcpy(rejected + (size_t)i * D, r, sizeof a);
  }

  trainee ta, tb;
  trainee_new(&ta);
  trainee_new(&tb);
  prm_batch b = PRM_BATCH_INIT;
  b.features = batch;
  b.n = 2 * P;
  b.n_features = D;
  for (uint64_t first = 0; first < N_PAIRS; first += P) {
    prm_loss_stats sa = PRM_LOSS_STATS_INIT, sb = PRM_LOSS_STATS_INIT;
    pack_interleaved(batch, pairs + first * 2 * D, P, D); /* A */
    CHECK(prm_train_step(ta.ctx, ta.opt, &b, NULL, &sa));
    pack_separate(batch, chosen + first * D, rejected + first * D, P, D); /* B */
    CHECK(prm_train_step(tb.ctx, tb.opt, &b, NULL, &sb));
    if (sa.loss != sb.loss) {
      fprintf(stderr, "pairs %llu: A and B differ (%.17g vs %.17g)\n", (unsigned long long)first,
              sa.loss, sb.loss);
      return 1;
    }
    if (first % (16 * P) == 0) printf("pairs %4llu: loss %.6f (A and B)\n",
                                      (unsigned long long)first, sa.loss);
  }

  /* Held-out pairs: packed into a batch for prm_evaluate, and scored where
   * they lie (C). */
  prm_ctx_options so = PRM_CTX_OPTIONS_INIT;
  so.inference = 1;
  so.max_rows = 2 * N_TEST;
  prm_ctx *scorer = NULL;
  CHECK(prm_ctx_new(&scorer, ta.model, &so));
  const float *test = pairs + (size_t)2 * N_PAIRS * D;
  pack_interleaved(batch, test, N_TEST, D);
  prm_batch held = PRM_BATCH_INIT;
  held.features = batch;
  held.n = 2 * N_TEST;
  held.n_features = D;
  prm_loss_stats packed = PRM_LOSS_STATS_INIT, in_place = PRM_LOSS_STATS_INIT;
  CHECK(prm_evaluate(scorer, &held, NULL, &packed));
  double loss = 0.0;
  CHECK(evaluate_interleaved(scorer, test, N_TEST, scores, sc, sr, &loss, &in_place));
  printf("held-out, packed:   loss %.6f accuracy %.4f\n", packed.loss, packed.accuracy);
  printf("held-out, in place: loss %.6f accuracy %.4f\n", in_place.loss, in_place.accuracy);
  const int agree = fabs(packed.loss - in_place.loss) < 1e-6 && packed.accuracy == in_place.accuracy;

  prm_ctx_free(scorer);
  trainee_free(&ta);
  trainee_free(&tb);
  free(pairs);
  free(chosen);
  free(rejected);
  free(batch);
  free(scores);
  free(sc);
  free(sr);
  if (!agree) fprintf(stderr, "the two evaluations disagree\n");
  return agree ? 0 : 1;
}
