/*
 * consumer.c - the smallest program built against an *installed* libprefrm.
 *
 * .ci/run builds it twice from an install prefix, once with
 * `pkg-config --cflags --libs prefrm` and once through CMake's
 * find_package(prefrm) -> prefrm::prefrm, and runs both. It checks that the
 * installed header and library agree (version), then creates a linear reward
 * model, scores one row with an inference context and prints the score.
 * Not part of the main build.
 */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include <prefrm.h>

#define D 4

static int check(int rc, const char *what) {
  if (rc != PRM_OK)
    fprintf(stderr, "consumer: %s failed: %s (%s)\n", what,
            prm_status_string(rc), prm_last_errmsg());
  return rc != PRM_OK;
}

int main(void) {
  printf("libprefrm %s (header %s)\n", prm_version_string(), PRM_VERSION_STRING);
  if (prm_version_number() != PRM_VERSION_NUMBER ||
      strcmp(prm_version_string(), PRM_VERSION_STRING) != 0) {
    fprintf(stderr, "consumer: header and library versions differ\n");
    return 1;
  }

  prm_model_options mo;
  if (check(prm_model_options_init(&mo, PRM_MODEL_OPTIONS_VERSION), "options"))
    return 1;
  mo.arch = PRM_ARCH_LINEAR;
  mo.input_size = D;
  mo.seed = 7;

  prm_model *model = NULL;
  prm_ctx *ctx = NULL;
  int failed = check(prm_model_new(&model, &mo), "prm_model_new");

  prm_ctx_options co = PRM_CTX_OPTIONS_INIT;
  co.inference = 1;
  co.max_rows = 1;
  if (!failed) failed = check(prm_ctx_new(&ctx, model, &co), "prm_ctx_new");

  const float row[D] = {0.5f, -1.0f, 0.25f, 2.0f};
  float score = NAN;
  if (!failed) {
    prm_batch batch = PRM_BATCH_INIT;
    batch.n = 1;
    batch.features = row;
    batch.n_features = D;
    failed = check(prm_ctx_forward(ctx, &batch, &score, 1), "prm_ctx_forward");
  }
  if (!failed) {
    /* A linear model scores w . x: recompute it from the flat parameters. */
    uint64_t n = 0;
    const float *w = prm_model_params(model, &n);
    double expect = 0.0;
    for (uint64_t j = 0; j < n && j < D; j++) expect += (double)w[j] * row[j];
    if (n != D || !isfinite(score) || fabs(score - expect) > 1e-5 * (1.0 + fabs(expect))) {
      fprintf(stderr, "consumer: score %g, expected w.x = %g (%llu params)\n",
              (double)score, expect, (unsigned long long)n);
      failed = 1;
    } else {
      printf("linear model (d=%d) scored a row: %.6f\n", D, (double)score);
    }
  }
  prm_ctx_free(ctx);
  prm_model_free(model);
  return failed;
}
