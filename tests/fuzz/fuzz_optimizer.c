/*
 * fuzz_optimizer.c - libFuzzer target for the optimizer-state loader.
 *
 * A state only loads for the model it was saved with, so the target builds
 * that model once (a small gpt2 with its first block frozen, and an mlp, by
 * the input's first byte) and feeds the rest of the input to
 * prm_optimizer_load_buffer. A state that loads is used: one step on a
 * context with a small gradient, a save, a reload and a byte comparison of
 * the two saves. The seeds (tests/fuzz/seeds_optimizer) are states of these
 * models written by tests/fuzz/make_optimizer_seeds.c.
 *
 * Build and run as fuzz_checkpoint (tests/fuzz/fuzz_checkpoint.c).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "optimizer_models.h"
#include "prefrm.h"

#define REQUIRE(cond)                                                                              \
  do {                                                                                             \
    if (!(cond)) __builtin_trap();                                                                 \
  } while (0)

/* The two models states are fuzzed against (built once, never written by a
 * failed load: a load that fails changes nothing). */
static prm_model *model_for(unsigned selector) {
  static prm_model *models[2];
  const unsigned k = selector & 1u;
  if (models[k] == NULL) models[k] = fuzz_optimizer_model_new(k);
  REQUIRE(models[k] != NULL);
  return models[k];
}

static void use_state(prm_optimizer *opt, prm_model *m) {
  prm_ctx_options co = PRM_CTX_OPTIONS_INIT;
  co.max_rows = 2;
  co.max_len = prm_model_arch(m) == PRM_ARCH_GPT2 ? 4 : 0;
  prm_ctx *c = NULL;
  REQUIRE(prm_ctx_new(&c, m, &co) == PRM_OK);
  uint64_t n = 0;
  float *g = prm_ctx_grads(c, &n);
  for (uint64_t i = 0; i < n; i++)
    g[i] = 1e-3f * (float)(i % 5);
  /* the parameters are restored afterwards, so that every input sees the
   * same model */
  uint64_t np = 0;
  float *p = prm_model_params(m, &np), *keep = malloc(np * sizeof(float));
  REQUIRE(keep != NULL);
  memcpy(keep, p, np * sizeof(float));
  int rc = prm_optimizer_step(opt, c);
  REQUIRE(rc == PRM_OK || rc == PRM_ERR_NONFINITE_GRAD);
  for (uint64_t i = 0; i < np; i++)
    REQUIRE(p[i] == p[i] && p[i] - p[i] == 0.0f); /* finite */
  memcpy(p, keep, np * sizeof(float));
  free(keep);
  prm_ctx_free(c);

  size_t s1 = 0, s2 = 0;
  REQUIRE(prm_optimizer_save_buffer(opt, NULL, 0, &s1) == PRM_OK);
  unsigned char *a = malloc(s1), *b = NULL;
  REQUIRE(a != NULL && prm_optimizer_save_buffer(opt, a, s1, &s1) == PRM_OK);
  prm_optimizer *back = NULL;
  REQUIRE(prm_optimizer_load_buffer(&back, m, a, s1) == PRM_OK);
  REQUIRE(prm_optimizer_save_buffer(back, NULL, 0, &s2) == PRM_OK && s2 == s1);
  b = malloc(s2);
  REQUIRE(b != NULL && prm_optimizer_save_buffer(back, b, s2, &s2) == PRM_OK);
  REQUIRE(memcmp(a, b, s1) == 0);
  prm_optimizer_free(back);
  free(a);
  free(b);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size < 1) return 0;
  prm_model *m = model_for(data[0]);
  prm_optimizer *opt = NULL;
  int rc = prm_optimizer_load_buffer(&opt, m, data + 1, size - 1);
  REQUIRE((rc == PRM_OK) == (opt != NULL));
  if (opt != NULL) use_state(opt, m);
  prm_optimizer_free(opt);
  return 0;
}
