/* c_reference.c - the C side of test_bitwise.py: train the same model on the
 * same data as the Python test and save the model and optimizer state.
 *
 * usage: c_reference DATA MODEL_OUT OPT_OUT
 * DATA: uint32 header {arch, d, hidden, seed, steps, P} (hidden 0: linear),
 *       then steps * 2P * d float32 features (per step: P chosen rows, then
 *       P rejected rows), little-endian as the host writes it.
 * Steps 0..steps-2 are prm_train_step with center_coef 0.01; the last one is
 * prm_ctx_forward + prm_loss_bt + prm_ctx_backward + prm_optimizer_step.
 * Exit status 0 on success; anything else prints the failure. */
#include <prefrm.h>
#include <stdio.h>
#include <stdlib.h>

#define CHECK(call)                                                        \
  do {                                                                     \
    int rc_ = (call);                                                      \
    if (rc_ != PRM_OK) {                                                   \
      fprintf(stderr, "%s: %s: %s\n", #call, prm_status_string(rc_),       \
              prm_last_errmsg());                                          \
      return 1;                                                            \
    }                                                                      \
  } while (0)

int main(int argc, char **argv) {
  if (argc != 4) return 2;
  FILE *f = fopen(argv[1], "rb");
  uint32_t hdr[6];
  if (!f || fread(hdr, sizeof hdr, 1, f) != 1) return 3;
  uint32_t arch = hdr[0], d = hdr[1], hidden = hdr[2], seed = hdr[3];
  uint32_t steps = hdr[4], P = hdr[5];
  size_t per = (size_t)2 * P * d;
  float *x = malloc(sizeof(float) * per * steps);
  if (!x || fread(x, sizeof(float), per * steps, f) != per * steps) return 4;
  fclose(f);

  prm_model_options mo;
  CHECK(prm_model_options_init(&mo, PRM_MODEL_OPTIONS_VERSION));
  mo.arch = (int32_t)arch;
  mo.seed = seed;
  mo.input_size = d;
  if (hidden) {
    mo.n_hidden = 1;
    mo.hidden[0] = hidden;
  }
  prm_model *m;
  CHECK(prm_model_new(&m, &mo));
  prm_ctx_options co;
  CHECK(prm_ctx_options_init(&co, PRM_CTX_OPTIONS_VERSION));
  co.max_rows = 2 * P;
  prm_ctx *ctx;
  CHECK(prm_ctx_new(&ctx, m, &co));
  prm_optimizer_options oo;
  CHECK(prm_optimizer_options_init(&oo, PRM_OPTIMIZER_OPTIONS_VERSION));
  oo.lr = 1e-2;
  prm_optimizer *opt;
  CHECK(prm_optimizer_new(&opt, m, &oo));
  prm_loss_options lo;
  CHECK(prm_loss_options_init(&lo, PRM_LOSS_OPTIONS_VERSION));
  lo.center_coef = 0.01;

  for (uint32_t s = 0; s + 1 < steps; s++) {
    prm_batch b;
    CHECK(prm_batch_init(&b, PRM_BATCH_VERSION));
    b.n = 2 * P;
    b.features = x + s * per;
    b.n_features = d;
    CHECK(prm_train_step(ctx, opt, &b, &lo, NULL));
  }
  /* last step by hand */
  prm_batch b;
  CHECK(prm_batch_init(&b, PRM_BATCH_VERSION));
  b.n = 2 * P;
  b.features = x + (size_t)(steps - 1) * per;
  b.n_features = d;
  float *sc = malloc(sizeof(float) * 4 * P);
  CHECK(prm_ctx_forward(ctx, &b, sc, 2 * P));
  CHECK(prm_loss_bt(sc, sc + P, P, &lo, NULL, NULL, sc + 2 * P, sc + 3 * P));
  CHECK(prm_ctx_backward(ctx, sc + 2 * P, 2 * P));
  CHECK(prm_optimizer_step(opt, ctx));

  CHECK(prm_model_save(m, argv[2]));
  CHECK(prm_optimizer_save(opt, argv[3]));
  prm_optimizer_free(opt);
  prm_ctx_free(ctx);
  prm_model_free(m);
  free(sc);
  free(x);
  return 0;
}
