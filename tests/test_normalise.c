/*
 * test_normalise.c - reward normalisation: moments streamed in batches,
 * statistics stored in the model and its checkpoints, normalised scores,
 * and every error path.
 */
// clang-format off
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>
// clang-format on

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "testutil.h"

/* 1 when the n bytes at buf contain the string s. */
static int contains(const unsigned char *buf, size_t n, const char *s) {
  const size_t k = strlen(s);
  for (size_t i = 0; i + k <= n; i++)
    if (memcmp(buf + i, s, k) == 0) return 1;
  return 0;
}

/* Rewards with a large common offset, where E[r^2] - E[r]^2 would cancel. */
static void make_rewards(float *r, uint64_t n) {
  prmt_rng g = {5};
  for (uint64_t i = 0; i < n; i++) r[i] = (float)(1.0e4 + 0.5 * prmt_normal(&g));
}

/* Two passes in long double: the reference mean and population std. */
static void reference(const float *r, uint64_t n, double *mean, double *sd) {
  long double s = 0.0L, ss = 0.0L;
  for (uint64_t i = 0; i < n; i++) s += r[i];
  const long double m = s / (long double)n;
  for (uint64_t i = 0; i < n; i++) ss += (r[i] - m) * (r[i] - m);
  *mean = (double)m;
  *sd = (double)sqrtl(ss / (long double)n);
}

static void test_moments_any_batching(void **state) {
  (void)state;
  enum { N = 10007 };
  float *r = malloc(N * sizeof *r);
  assert_non_null(r);
  make_rewards(r, N);
  double ref_mean, ref_sd;
  reference(r, N, &ref_mean, &ref_sd);
  const uint64_t batch[4] = {N, 1, 64, 999};
  for (int k = 0; k < 4; k++) {
    prm_reward_moments m = PRM_REWARD_MOMENTS_INIT;
    for (uint64_t i = 0; i < N; i += batch[k])
      assert_int_equal(prm_reward_moments_add(&m, r + i, N - i < batch[k] ? N - i : batch[k]),
                       PRM_OK);
    assert_int_equal(m.count, N);
    const double sd = sqrt(m.m2 / (double)m.count);
    if (fabs(m.mean - ref_mean) > 1e-12 * ref_mean || fabs(sd - ref_sd) > 1e-9 * ref_sd)
      fail_msg("batches of %llu: mean %.17g sd %.17g, reference %.17g %.17g",
               (unsigned long long)batch[k], m.mean, sd, ref_mean, ref_sd);
  }
  free(r);
}

static void test_normalised_scores(void **state) {
  (void)state;
  /* the reference set: scores of a linear model on random features */
  enum { N = 512, D = 8 };
  prm_model *m = prmt_linear(D, 3);
  prm_ctx *c = prmt_ctx(m, 64, 1);
  float *x = malloc(N * D * sizeof *x), s[N];
  assert_non_null(x);
  prmt_rng g = {9};
  prmt_fill_normal(&g, x, N * D, 1.0);
  prm_reward_moments mo = PRM_REWARD_MOMENTS_INIT;
  for (int i = 0; i < N; i += 64) {
    prm_batch b = prmt_batch(x + i * D, 64, D);
    assert_int_equal(prm_ctx_forward(c, &b, s + i, 64), PRM_OK);
    assert_int_equal(prm_reward_moments_add(&mo, s + i, 64), PRM_OK);
  }
  double mean = -1, sd = -1;
  assert_int_equal(prm_model_reward_norm(m, &mean, &sd), PRM_ERR_STATE);
  float keep[N];
  memcpy(keep, s, sizeof s);
  assert_int_equal(prm_model_normalise_rewards(m, s, N), PRM_ERR_STATE);
  assert_memory_equal(keep, s, sizeof s); /* untouched */
  assert_int_equal(prm_model_set_reward_norm(m, &mo), PRM_OK);
  assert_int_equal(prm_model_reward_norm(m, &mean, &sd), PRM_OK);
  assert_true(mean == mo.mean && sd == sqrt(mo.m2 / (double)mo.count));
  assert_int_equal(prm_model_normalise_rewards(m, s, N), PRM_OK);
  /* the reference set, normalised: mean 0 and std 1 */
  double rm, rs;
  reference(s, N, &rm, &rs);
  assert_true(fabs(rm) < 1e-6 && fabs(rs - 1.0) < 1e-6);
  for (int i = 0; i < N; i++)
    assert_true(s[i] == (float)(((double)keep[i] - mean) / sd));

  /* checkpoints keep the statistics exactly; a model without them saves none */
  size_t n = 0;
  assert_int_equal(prm_model_save_buffer(m, NULL, 0, &n), PRM_OK);
  unsigned char *buf = malloc(n);
  assert_int_equal(prm_model_save_buffer(m, buf, n, &n), PRM_OK);
  assert_true(contains(buf, n, "\"reward_mean\""));
  prm_model *back = NULL;
  assert_int_equal(prm_model_load_buffer(&back, buf, n), PRM_OK);
  double bm, bs;
  assert_int_equal(prm_model_reward_norm(back, &bm, &bs), PRM_OK);
  assert_true(bm == mean && bs == sd); /* bit for bit */
  prm_model_free(back);
  free(buf);
  assert_int_equal(prm_model_set_reward_norm(m, NULL), PRM_OK); /* removed */
  assert_int_equal(prm_model_reward_norm(m, NULL, NULL), PRM_ERR_STATE);
  assert_int_equal(prm_model_save_buffer(m, NULL, 0, &n), PRM_OK);
  buf = malloc(n);
  assert_int_equal(prm_model_save_buffer(m, buf, n, &n), PRM_OK);
  assert_false(contains(buf, n, "reward_mean"));
  free(buf);
  free(x);
  prm_ctx_free(c);
  prm_model_free(m);
}

static void test_errors(void **state) {
  (void)state;
  prm_model *m = prmt_linear(2, 1);
  prm_reward_moments mo = PRM_REWARD_MOMENTS_INIT, bad = PRM_REWARD_MOMENTS_INIT;
  const float one[1] = {1.0f}, same[3] = {2.0f, 2.0f, 2.0f}, nan3[3] = {1.0f, NAN, 2.0f};
  assert_int_equal(prm_reward_moments_init(NULL, 1), PRM_ERR_NULL);
  assert_int_equal(prm_reward_moments_init(&mo, 2), PRM_ERR_VERSION);
  assert_int_equal(prm_reward_moments_add(NULL, one, 1), PRM_ERR_NULL);
  assert_int_equal(prm_reward_moments_add(&mo, NULL, 1), PRM_ERR_NULL);
  assert_int_equal(prm_reward_moments_add(&mo, NULL, 0), PRM_OK); /* nothing to add */
  bad.version = 7;
  assert_int_equal(prm_reward_moments_add(&bad, one, 1), PRM_ERR_VERSION);
  assert_int_equal(prm_reward_moments_add(&mo, one, 1), PRM_OK);
  prm_reward_moments before = mo;
  assert_int_equal(prm_reward_moments_add(&mo, nan3, 3), PRM_ERR_NONFINITE);
  assert_non_null(strstr(prm_last_errmsg(), "rewards[1]"));
  /* unchanged (fields compared: the struct has padding after version) */
  assert_true(mo.count == before.count && mo.mean == before.mean && mo.m2 == before.m2);
  /* one reward: no spread yet */
  assert_int_equal(prm_model_set_reward_norm(m, &mo), PRM_ERR_INVALID);
  assert_non_null(strstr(prm_model_errmsg(m), "at least 2"));
  /* equal rewards: std 0 */
  prm_reward_moments flat = PRM_REWARD_MOMENTS_INIT;
  assert_int_equal(prm_reward_moments_add(&flat, same, 3), PRM_OK);
  assert_int_equal(prm_model_set_reward_norm(m, &flat), PRM_ERR_INVALID);
  assert_int_equal(prm_model_set_reward_norm(m, &bad), PRM_ERR_VERSION);
  assert_int_equal(prm_model_set_reward_norm(NULL, &mo), PRM_ERR_NULL);
  assert_int_equal(prm_model_reward_norm(NULL, NULL, NULL), PRM_ERR_NULL);
  assert_int_equal(prm_model_reward_norm(m, NULL, NULL), PRM_ERR_STATE);
  /* with statistics: NaN rewards are refused and left as they are */
  const float two[2] = {1.0f, 3.0f};
  prm_reward_moments ok = PRM_REWARD_MOMENTS_INIT;
  assert_int_equal(prm_reward_moments_add(&ok, two, 2), PRM_OK);
  assert_int_equal(prm_model_set_reward_norm(m, &ok), PRM_OK);
  float r[3];
  memcpy(r, nan3, sizeof r);
  assert_int_equal(prm_model_normalise_rewards(m, r, 3), PRM_ERR_NONFINITE);
  assert_true(r[0] == 1.0f && isnan(r[1]) && r[2] == 2.0f);
  assert_int_equal(prm_model_normalise_rewards(NULL, r, 3), PRM_ERR_NULL);
  assert_int_equal(prm_model_normalise_rewards(m, NULL, 3), PRM_ERR_NULL);
  assert_int_equal(prm_model_normalise_rewards(m, NULL, 0), PRM_OK);
  prm_model_free(m);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_moments_any_batching),
      cmocka_unit_test(test_normalised_scores),
      cmocka_unit_test(test_errors),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
