/*
 * fuzz_checkpoint.c - libFuzzer target for the checkpoint loaders.
 *
 * Every input goes through prm_model_load_buffer and
 * prm_model_load_pretrained_buffer. A model that loads is then used as a
 * host would: one forward on a small batch (features or tokens, whatever its
 * architecture takes), a save to a buffer, a reload of that buffer, and a
 * byte comparison of the two saves -- so a file the loader accepts must also
 * be one the rest of the library can work with, and must round-trip.
 *
 * Build (clang): CC=clang cmake -B build-fuzz -DPRM_FUZZ=ON
 *   && cmake --build build-fuzz --target fuzz_checkpoint
 * Run:   build-fuzz/tests/fuzz_checkpoint -max_total_time=60 CORPUS_DIR tests/fuzz/seeds
 * (.ci/run's fuzz job does this on a copy of the seeds, after replaying
 * tests/corpus and the seeds once.) The seeds are small valid files of every
 * architecture and Hugging Face layout (written by the library and by the
 * PyTorch reference).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "prefrm.h"

/* A failed invariant: abort, which libFuzzer reports with the input. */
#define REQUIRE(cond)                                                                              \
  do {                                                                                             \
    if (!(cond)) __builtin_trap();                                                                 \
  } while (0)

static void use_model(prm_model *m) {
  prm_model_options o = PRM_MODEL_OPTIONS_INIT;
  REQUIRE(prm_model_get_options(m, &o) == PRM_OK);
  prm_ctx_options co = PRM_CTX_OPTIONS_INIT;
  co.max_rows = 2;
  co.inference = 1;
  prm_batch b = PRM_BATCH_INIT;
  b.n = 2;
  float scores[2], *x = NULL;
  int32_t ids[2 * 8], len[2] = {3, 8};
  if (o.arch == PRM_ARCH_GPT2 || o.arch == PRM_ARCH_LLAMA) {
    co.max_len = o.n_ctx < 8 ? o.n_ctx : 8; /* n_ctx may be large: keep the context small */
    len[0] = len[0] > (int32_t)co.max_len ? (int32_t)co.max_len : len[0];
    len[1] = (int32_t)co.max_len;
    for (int i = 0; i < 16; i++) ids[i] = (int32_t)((uint64_t)(i * 5 + 1) % o.vocab_size);
    b.tokens = ids;
    b.token_stride = 8;
    b.lengths = len;
  } else {
    x = calloc(2 * o.input_size, sizeof(float)); /* the file held input_size floats */
    REQUIRE(x != NULL);
    for (uint64_t i = 0; i < 2 * o.input_size; i++) x[i] = (float)(i % 7) * 0.25f - 0.5f;
    b.features = x;
    b.n_features = o.input_size;
  }
  prm_ctx *c = NULL;
  if (prm_ctx_new(&c, m, &co) == PRM_OK) {
    REQUIRE(prm_ctx_forward(c, &b, scores, 2) == PRM_OK);
    prm_ctx_free(c);
  }
  free(x);

  size_t n = 0, n2 = 0;
  REQUIRE(prm_model_save_buffer(m, NULL, 0, &n) == PRM_OK);
  unsigned char *a = malloc(n), *a2 = NULL;
  REQUIRE(a != NULL);
  REQUIRE(prm_model_save_buffer(m, a, n, &n) == PRM_OK);
  prm_model *back = NULL;
  REQUIRE(prm_model_load_buffer(&back, a, n) == PRM_OK);
  REQUIRE(prm_model_save_buffer(back, NULL, 0, &n2) == PRM_OK && n2 == n);
  a2 = malloc(n2);
  REQUIRE(a2 != NULL);
  REQUIRE(prm_model_save_buffer(back, a2, n2, &n2) == PRM_OK);
  REQUIRE(memcmp(a, a2, n) == 0);
  prm_model_free(back);
  free(a);
  free(a2);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  prm_model *m = NULL;
  int rc = prm_model_load_buffer(&m, data, size);
  REQUIRE((rc == PRM_OK) == (m != NULL));
  if (m != NULL) use_model(m);
  prm_model_free(m);

  m = NULL;
  prm_load_report rep = PRM_LOAD_REPORT_INIT;
  char text[256];
  rep.text = text;
  rep.text_size = sizeof text;
  rc = prm_model_load_pretrained_buffer(&m, data, size, NULL, &rep);
  REQUIRE((rc == PRM_OK) == (m != NULL));
  if (m != NULL) {
    REQUIRE(strlen(text) < sizeof text);
    use_model(m);
  }
  prm_model_free(m);
  return 0;
}
