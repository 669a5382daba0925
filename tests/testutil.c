#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include "testutil.h"

uint64_t prmt_next(prmt_rng *r) {
  uint64_t z = (r->s += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

double prmt_uniform(prmt_rng *r) { return (double)(prmt_next(r) >> 11) * 0x1.0p-53; }

double prmt_normal(prmt_rng *r) {
  double u1 = prmt_uniform(r), u2 = prmt_uniform(r);
  if (u1 < 1e-300) u1 = 1e-300;
  return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}

void prmt_fill_normal(prmt_rng *r, float *x, size_t n, double scale) {
  for (size_t i = 0; i < n; i++) x[i] = (float)(scale * prmt_normal(r));
}

void prmt_add_uniform(prmt_rng *r, float *x, size_t n, double a) {
  for (size_t i = 0; i < n; i++)
    x[i] += (float)((2.0 * prmt_uniform(r) - 1.0) * a);
}

/* prm_model_new, failing the test on error. */
static prm_model *new_model(const prm_model_options *o) {
  prm_model *m = NULL;
  int rc = prm_model_new(&m, o);
  if (rc != PRM_OK) fail_msg("prm_model_new: %s (%s)", prm_status_string(rc), prm_last_errmsg());
  return m;
}

prm_model *prmt_linear(uint64_t d, uint64_t seed) {
  prm_model_options o;
  assert_int_equal(prm_model_options_init(&o, PRM_MODEL_OPTIONS_VERSION), PRM_OK);
  o.arch = PRM_ARCH_LINEAR;
  o.input_size = d;
  o.seed = seed;
  return new_model(&o);
}

prm_model *prmt_mlp(uint64_t d, const uint64_t *hidden, uint32_t n_hidden, int32_t act,
                    uint64_t seed) {
  prm_model_options o;
  assert_int_equal(prm_model_options_init(&o, PRM_MODEL_OPTIONS_VERSION), PRM_OK);
  o.arch = PRM_ARCH_MLP;
  o.input_size = d;
  o.seed = seed;
  o.activation = act;
  o.n_hidden = n_hidden;
  for (uint32_t i = 0; i < n_hidden; i++) o.hidden[i] = hidden[i];
  return new_model(&o);
}

prm_model_options prmt_gpt2_options(uint64_t V, uint64_t n_ctx, uint64_t C, uint64_t L, uint64_t H,
                                    uint64_t seed) {
  prm_model_options o;
  assert_int_equal(prm_model_options_init(&o, PRM_MODEL_OPTIONS_VERSION), PRM_OK);
  o.arch = PRM_ARCH_GPT2;
  o.vocab_size = V;
  o.n_ctx = n_ctx;
  o.n_embd = C;
  o.n_layer = L;
  o.n_head = H;
  o.seed = seed;
  return o;
}

prm_model *prmt_gpt2(uint64_t V, uint64_t n_ctx, uint64_t C, uint64_t L, uint64_t H,
                     uint64_t seed) {
  prm_model_options o = prmt_gpt2_options(V, n_ctx, C, L, H, seed);
  return new_model(&o);
}

prm_ctx *prmt_ctx(const prm_model *m, uint64_t max_rows, int inference) {
  return prmt_tok_ctx(m, max_rows, 0, inference);
}

prm_ctx *prmt_tok_ctx(const prm_model *m, uint64_t max_rows, uint64_t max_len, int inference) {
  prm_ctx_options o;
  assert_int_equal(prm_ctx_options_init(&o, PRM_CTX_OPTIONS_VERSION), PRM_OK);
  o.max_rows = max_rows;
  o.max_len = max_len;
  o.inference = inference;
  prm_ctx *c = NULL;
  int rc = prm_ctx_new(&c, m, &o);
  if (rc != PRM_OK) fail_msg("prm_ctx_new: %s (%s)", prm_status_string(rc), prm_last_errmsg());
  return c;
}

prm_batch prmt_batch(const float *x, uint64_t n, uint64_t d) {
  prm_batch b;
  assert_int_equal(prm_batch_init(&b, PRM_BATCH_VERSION), PRM_OK);
  b.features = x;
  b.n = n;
  b.n_features = d;
  return b;
}

prm_batch prmt_tok_batch(const int32_t *tokens, const int32_t *lengths, uint64_t n,
                         uint64_t stride) {
  prm_batch b;
  assert_int_equal(prm_batch_init(&b, PRM_BATCH_VERSION), PRM_OK);
  b.n = n;
  b.tokens = tokens;
  b.lengths = lengths;
  b.token_stride = stride;
  return b;
}

int prmt_shared_path(char *buf, size_t size, const char *rel) {
  struct stat st;
  if (stat(PRM_SHARED_DIR, &st) != 0 || !S_ISDIR(st.st_mode)) return 0;
  snprintf(buf, size, "%s/%s", PRM_SHARED_DIR, rel);
  return 1;
}

int prmt_have_torch(void) {
  static int cached = -1; /* test-process state only */
  if (cached < 0) {
    char cmd[512];
    snprintf(cmd, sizeof cmd, "%s -c 'import torch' >/dev/null 2>&1", PRM_PYTHON);
    cached = system(cmd) == 0;
  }
  return cached;
}

void prmt_tmp_path(char *buf, size_t size, const char *name) {
  snprintf(buf, size, "%s/%s.%ld", PRM_TEST_TMPDIR, name, (long)getpid());
}
