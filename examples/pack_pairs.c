/*
 * pack_pairs.c - pair batches from data stored some other way.
 *
 * prm_train_step and prm_evaluate read a pair batch of 2P rows: the P chosen
 * responses first, then the P rejected ones in the same order. Data often
 * comes otherwise. This program takes the same pairs stored two ways and
 * trains three copies of one model, one per recipe of docs/cookbook.md:
 *
 *   A. interleaved (chosen 0, rejected 0, chosen 1, ...): copy the rows
 *      into a batch buffer, then prm_train_step;
 *   B. two separate arrays (all chosen rows, all rejected rows): two
 *      memcpy into the batch buffer, then prm_train_step;
 *   C. interleaved, without copying the features: forward the rows in their
 *      stored order with the split calls and reorder only the 2P scores and
 *      their gradients.
 *
 * A and B build the same batch and must agree bit for bit; C computes the
 * same loss up to the order of float additions in the gradient.
 *
 *   ./build/examples/pack_pairs
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <prefrm.h>

#define D 16      /* features per response */
#define P 64      /* pairs per step */
#define N_PAIRS 4096
#define STEPS (N_PAIRS / P)

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

/* One training step on p interleaved pairs without copying the features.
 * scores and dscores hold 2p floats, sc, sr, dc and dr p floats each. */
static int step_interleaved(prm_ctx *ctx, prm_optimizer *opt, const float *pairs, uint64_t p,
                            float *scores, float *dscores, float *sc, float *sr, float *dc,
                            float *dr, double *loss) {
  prm_batch b = PRM_BATCH_INIT;
  b.features = pairs; /* 2p rows in their stored order: c0 r0 c1 r1 ... */
  b.n = 2 * p;
  b.n_features = D;
  int rc = prm_ctx_forward(ctx, &b, scores, 2 * p);
  if (rc != PRM_OK) return rc;
  for (uint64_t i = 0; i < p; i++) {
    sc[i] = scores[2 * i];
    sr[i] = scores[2 * i + 1];
  }
  rc = prm_loss_bt(sc, sr, p, NULL, loss, NULL, dc, dr);
  if (rc != PRM_OK) return rc;
  for (uint64_t i = 0; i < p; i++) {
    dscores[2 * i] = dc[i];
    dscores[2 * i + 1] = dr[i];
  }
  rc = prm_ctx_backward(ctx, dscores, 2 * p); /* row j's gradient goes with row j */
  if (rc != PRM_OK) return rc;
  return prm_optimizer_step(opt, ctx);
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
  mo.seed = 4; /* the same initial parameters for the three copies */
  CHECK(prm_model_new(&t->model, &mo));
  prm_ctx_options co = PRM_CTX_OPTIONS_INIT;
  co.max_rows = 2 * P;
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
  float *pairs = malloc(sizeof(float) * 2 * N_PAIRS * D);
  float *chosen = malloc(sizeof(float) * N_PAIRS * D);
  float *rejected = malloc(sizeof(float) * N_PAIRS * D);
  float *batch = malloc(sizeof(float) * 2 * P * D);
  if (!pairs || !chosen || !rejected || !batch) return 1;
  float w[D];
  for (int j = 0; j < D; j++) w[j] = uniform_pm1();
  for (int i = 0; i < N_PAIRS; i++) {
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

  trainee ta, tb, tc;
  trainee_new(&ta);
  trainee_new(&tb);
  trainee_new(&tc);
  float scores[2 * P], dscores[2 * P], sc[P], sr[P], dc[P], dr[P];
  double max_diff = 0.0;
  for (int s = 0; s < STEPS; s++) {
    const uint64_t first = (uint64_t)s * P;
    prm_batch b = PRM_BATCH_INIT;
    b.features = batch;
    b.n = 2 * P;
    b.n_features = D;
    prm_loss_stats sa = PRM_LOSS_STATS_INIT, sb = PRM_LOSS_STATS_INIT;

    pack_interleaved(batch, pairs + first * 2 * D, P, D); /* A */
    CHECK(prm_train_step(ta.ctx, ta.opt, &b, NULL, &sa));

    pack_separate(batch, chosen + first * D, rejected + first * D, P, D); /* B */
    CHECK(prm_train_step(tb.ctx, tb.opt, &b, NULL, &sb));

    double lc = 0.0; /* C */
    CHECK(step_interleaved(tc.ctx, tc.opt, pairs + first * 2 * D, P, scores, dscores, sc, sr, dc,
                           dr, &lc));

    if (sa.loss != sb.loss) {
      fprintf(stderr, "step %d: A and B differ (%.17g vs %.17g)\n", s, sa.loss, sb.loss);
      return 1;
    }
    if (fabs(sa.loss - lc) > max_diff) max_diff = fabs(sa.loss - lc);
    if (s % 16 == 0 || s == STEPS - 1)
      printf("step %2d loss A %.6f  B %.6f  C %.6f\n", s, sa.loss, sb.loss, lc);
  }
  printf("A and B equal bit for bit; C within %.1e of them\n", max_diff);
  trainee_free(&ta);
  trainee_free(&tb);
  trainee_free(&tc);
  free(pairs);
  free(chosen);
  free(rejected);
  free(batch);
  return max_diff < 1e-4 ? 0 : 1;
}
