/*
 * eval_large.c - evaluate a set larger than a context, and fit reward
 * normalisation on it.
 *
 * A context holds at most max_rows rows per forward, fixed when it is
 * created. An evaluation set of 10 000 pairs is therefore evaluated in
 * chunks, and the statistics of the whole set have to be combined from the
 * chunks. Some combine by a weighted mean; the reward spread (reward_std)
 * and the calibration error (ece) do not. prm_evaluate_accum keeps the sums
 * every statistic needs, and prm_eval_accum_stats gives the figures one
 * batch holding the whole set would give (docs/cookbook.md has the table).
 *
 * The set here comes from two sources, stored one after the other, whose
 * rewards sit at different levels (say, two policies): each chunk sees
 * one source, so the naive mean of the chunks' reward_std misses the spread
 * between the sources. The program prints both and checks the accumulated
 * figures against one big batch.
 *
 * It then streams the same responses through an inference context into
 * prm_reward_moments, stores the mean and standard deviation in the model
 * (saved with it in rm.safetensors) and normalises new scores with them
 * (docs/checkpoint-format.md, Reward normalisation).
 *
 *   ./build/examples/eval_large
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <prefrm.h>

#define D 8
#define N_EVAL 10000 /* evaluation pairs */
#define CHUNK 256    /* pairs per forward: the context holds 2 * CHUNK rows */
#define ROWS 1024    /* rows per forward when scoring single responses */

#define CHECK(call)                                                                                \
  do {                                                                                             \
    int rc_ = (call);                                                                              \
    if (rc_ != PRM_OK) {                                                                           \
      fprintf(stderr, "%s failed: %s (%s)\n", #call, prm_status_string(rc_), prm_last_errmsg());   \
      exit(1);                                                                                     \
    }                                                                                              \
  } while (0)

/* A small deterministic generator for the synthetic data (not the library's). */
static unsigned long long rng_state = 5;
static double uniform(void) {
  rng_state = rng_state * 6364136223846793005ull + 1442695040888963407ull;
  return (double)(rng_state >> 11) * 0x1.0p-53;
}
static double normal(void) {
  double u = uniform() + 1e-12, v = uniform();
  return sqrt(-2.0 * log(u)) * cos(6.283185307179586 * v);
}

/* Chunk `rows` <- pairs first .. first + p - 1 of the set, stored as two
 * separate arrays: the p chosen rows, then the p rejected rows. */
static void pack_chunk(float *rows, const float *chosen, const float *rejected, uint64_t first,
                       uint64_t p) {
  memcpy(rows, chosen + first * D, sizeof(float) * p * D);
  memcpy(rows + p * D, rejected + first * D, sizeof(float) * p * D);
}

int main(void) {
  /* The evaluation set: all chosen rows, then all rejected rows, so `chosen`
   * and `rejected` are two separate arrays and `set` is every response. */
  float *set = malloc(sizeof(float) * 2 * N_EVAL * D);
  float *rows = malloc(sizeof(float) * 2 * CHUNK * D);
  float *scores = malloc(sizeof(float) * ROWS);
  if (!set || !rows || !scores) return 1;
  float *chosen = set, *rejected = set + (size_t)N_EVAL * D;
  for (uint64_t i = 0; i < N_EVAL; i++) {
    const float level = i < N_EVAL / 2 ? 2.0f : -2.0f; /* the source of the pair */
    for (int j = 0; j < D; j++) {
      chosen[i * D + j] = (float)normal() + (j == 0 ? level + 0.5f : 0.0f);
      rejected[i * D + j] = (float)normal() + (j == 0 ? level - 0.5f : 0.0f);
    }
  }

  /* A linear reward model that reads feature 0, as a trained one would. */
  prm_model_options mo = PRM_MODEL_OPTIONS_INIT;
  mo.arch = PRM_ARCH_LINEAR;
  mo.input_size = D;
  prm_model *model = NULL;
  CHECK(prm_model_new(&model, &mo));
  float w[D] = {1.0f, 0.1f, -0.1f, 0.05f, 0.0f, 0.0f, 0.0f, 0.0f};
  CHECK(prm_model_write_params(model, 0, w, D));

  prm_ctx_options co = PRM_CTX_OPTIONS_INIT;
  co.inference = 1;
  co.max_rows = 2 * CHUNK;
  prm_ctx *ctx = NULL;
  CHECK(prm_ctx_new(&ctx, model, &co));

  /* 1. The whole set, chunk by chunk, into one accumulator. */
  prm_eval_accum acc = PRM_EVAL_ACCUM_INIT;
  for (uint64_t first = 0; first < N_EVAL; first += CHUNK) {
    const uint64_t p = N_EVAL - first < CHUNK ? N_EVAL - first : CHUNK; /* the last is short */
    pack_chunk(rows, chosen, rejected, first, p); /* p chosen rows, then p rejected rows */
    prm_batch b = PRM_BATCH_INIT;
    b.features = rows;
    b.n = 2 * p;
    b.n_features = D;
    CHECK(prm_evaluate_accum(ctx, &b, NULL, &acc));
  }
  prm_loss_stats st = PRM_LOSS_STATS_INIT;
  CHECK(prm_eval_accum_stats(&acc, &st));
  printf("eval loss %.4f accuracy %.4f ece %.4f reward mean %.3f std %.3f (%d pairs)\n", st.loss,
         st.accuracy, st.ece, st.reward_mean, st.reward_std, N_EVAL);

  /* What not to do: average the chunks' own statistics. */
  double naive_std = 0.0, naive_ece = 0.0;
  int n_chunks = 0;
  for (uint64_t first = 0; first < N_EVAL; first += CHUNK) {
    const uint64_t p = N_EVAL - first < CHUNK ? N_EVAL - first : CHUNK;
    pack_chunk(rows, chosen, rejected, first, p);
    prm_batch b = PRM_BATCH_INIT;
    b.features = rows;
    b.n = 2 * p;
    b.n_features = D;
    prm_loss_stats cs = PRM_LOSS_STATS_INIT;
    CHECK(prm_evaluate(ctx, &b, NULL, &cs));
    naive_std += cs.reward_std;
    naive_ece += cs.ece;
    n_chunks++;
  }
  printf("mean of the %d chunks' reward_std %.3f and ece %.4f: not the set's figures\n",
         n_chunks, naive_std / n_chunks, naive_ece / n_chunks);

  /* The same set as one batch, in a context big enough for it: the
   * accumulated figures agree up to the order of the additions. */
  prm_ctx_options bo = co;
  bo.max_rows = 2 * N_EVAL;
  prm_ctx *big = NULL;
  CHECK(prm_ctx_new(&big, model, &bo));
  prm_batch all = PRM_BATCH_INIT;
  all.features = set;
  all.n = 2 * N_EVAL;
  all.n_features = D;
  prm_loss_stats one = PRM_LOSS_STATS_INIT;
  CHECK(prm_evaluate(big, &all, NULL, &one));
  prm_ctx_free(big);
  const double d = fabs(one.reward_std - st.reward_std) + fabs(one.loss - st.loss) +
                   fabs(one.accuracy - st.accuracy) + fabs(one.ece - st.ece);
  if (d > 1e-9) {
    fprintf(stderr, "accumulated statistics differ from one batch's (%g)\n", d);
    return 1;
  }

  /* 2. Reward normalisation for the RL stage, fitted on the same responses. */
  prm_ctx_options so = PRM_CTX_OPTIONS_INIT;
  so.inference = 1;
  so.max_rows = ROWS;
  prm_ctx *scorer = NULL;
  CHECK(prm_ctx_new(&scorer, model, &so));
  const uint64_t n_ref = 2 * N_EVAL;
  const float *ref = set;
  prm_reward_moments mom = PRM_REWARD_MOMENTS_INIT;
  for (uint64_t first = 0; first < n_ref; first += ROWS) { /* the reference set, streamed */
    const uint64_t n = n_ref - first < ROWS ? n_ref - first : ROWS;
    prm_batch b = PRM_BATCH_INIT;
    b.features = ref + first * D;
    b.n = n;
    b.n_features = D;
    CHECK(prm_ctx_forward(scorer, &b, scores, n));
    CHECK(prm_reward_moments_add(&mom, scores, n)); /* merged exactly, batch by batch */
  }
  CHECK(prm_model_set_reward_norm(model, &mom)); /* mean and population std */
  CHECK(prm_model_save(model, "rm.safetensors"));  /* saved with the model */
  /* ... and at scoring time, in the RL loop: */
  prm_batch rollouts = PRM_BATCH_INIT;
  rollouts.features = chosen;
  rollouts.n = 4;
  rollouts.n_features = D;
  CHECK(prm_ctx_forward(scorer, &rollouts, scores, rollouts.n));
  CHECK(prm_model_normalise_rewards(model, scores, rollouts.n)); /* (r - mean) / std */

  double mean = 0.0, std = 0.0;
  CHECK(prm_model_reward_norm(model, &mean, &std));
  printf("reward normalisation: mean %.3f std %.3f (accumulated: %.3f %.3f); "
         "normalised rewards %.3f %.3f %.3f %.3f\n",
         mean, std, st.reward_mean, st.reward_std, (double)scores[0], (double)scores[1],
         (double)scores[2], (double)scores[3]);

  prm_ctx_free(scorer);
  prm_ctx_free(ctx);
  prm_model_free(model);
  free(set);
  free(rows);
  free(scores);
  return 0;
}
