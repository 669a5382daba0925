/*
 * train_loop.c - the complete training loop of docs/api.md.
 *
 * train() trains an mlp reward model on batches of preference pairs with
 * AdamW, a warm-up, cosine decay and gradient clipping; a batch whose
 * gradient is not finite is skipped rather than fatal, and the model is
 * saved atomically to rm.safetensors. It works for any number of batches
 * from 1 up: the warm-up is a tenth of the run.
 *
 * main() makes synthetic batches (a hidden linear preference over D
 * features, the better response of each pair listed first) so the program
 * runs anywhere:
 *
 *   ./build/examples/train_loop [N_BATCHES]      (default 200)
 */
#include <stdio.h>
#include <stdlib.h>

#include <prefrm.h>

#define D 16     /* features per response */
#define PAIRS 32 /* pairs per batch */

/* batches[i]: n_pairs chosen rows, then n_pairs rejected rows, d floats each */
static int train(const float *const *batches, size_t n_batches, uint64_t n_pairs, uint64_t d) {
  prm_model_options mo = PRM_MODEL_OPTIONS_INIT;
  mo.arch = PRM_ARCH_MLP;
  mo.input_size = d;
  mo.n_hidden = 1;
  mo.hidden[0] = 256;
  mo.activation = PRM_ACT_GELU_TANH;
  mo.seed = 42;
  prm_model *model = NULL;
  prm_ctx *ctx = NULL;
  prm_optimizer *opt = NULL;
  int rc = prm_model_new(&model, &mo);
  if (rc != PRM_OK) goto fail;

  prm_ctx_options co = PRM_CTX_OPTIONS_INIT;
  co.max_rows = 2 * n_pairs;
  if ((rc = prm_ctx_new(&ctx, model, &co)) != PRM_OK) goto fail;

  prm_optimizer_options oo = PRM_OPTIMIZER_OPTIONS_INIT;
  oo.algorithm = PRM_OPT_ADAMW;
  oo.lr = 1e-3;
  oo.weight_decay = 0.01;
  oo.no_decay_1d = 1;               /* no decay on biases */
  oo.max_grad_norm = 1.0;
  oo.schedule = PRM_SCHED_COSINE;
  oo.total_steps = n_batches;       /* one update per batch */
  oo.warmup_steps = n_batches / 10; /* may not exceed total_steps */
  if ((rc = prm_optimizer_new(&opt, model, &oo)) != PRM_OK) goto fail;

  for (size_t i = 0; i < n_batches; i++) {
    prm_batch b = PRM_BATCH_INIT;
    b.features = batches[i];
    b.n = 2 * n_pairs;
    b.n_features = d;
    const double lr = prm_optimizer_lr(opt); /* the rate of this step's update */
    prm_loss_stats st = PRM_LOSS_STATS_INIT;
    rc = prm_train_step(ctx, opt, &b, NULL, &st);
    if (rc == PRM_ERR_NONFINITE_GRAD) { /* skip a bad batch, keep training */
      fprintf(stderr, "step %zu skipped: %s\n", i, prm_ctx_errmsg(ctx));
      prm_ctx_zero_grad(ctx);
      continue;
    }
    if (rc != PRM_OK) goto fail;
    if (i % 50 == 0 || i + 1 == n_batches)
      printf("step %zu loss %.4f acc %.3f lr %.2e\n", i, st.loss, st.accuracy, lr);
  }
  rc = prm_model_save(model, "rm.safetensors"); /* atomic: a crash leaves the old file */
  if (rc != PRM_OK) goto fail;
  prm_optimizer_free(opt);
  prm_ctx_free(ctx);
  prm_model_free(model);
  return 0;
fail:
  fprintf(stderr, "%s: %s\n", prm_status_string(rc), prm_last_errmsg());
  prm_optimizer_free(opt);
  prm_ctx_free(ctx);
  prm_model_free(model);
  return 1;
}

/* A small deterministic generator for the synthetic data (not the library's). */
static unsigned long long rng_state = 7;
static float uniform_pm1(void) {
  rng_state = rng_state * 6364136223846793005ull + 1442695040888963407ull;
  return (float)((double)(rng_state >> 11) * 0x1.0p-52 - 1.0);
}

int main(int argc, char **argv) {
  long n_batches = argc > 1 ? strtol(argv[1], NULL, 10) : 200;
  if (n_batches < 1) {
    fprintf(stderr, "usage: %s [N_BATCHES >= 1]\n", argv[0]);
    return 2;
  }
  /* The hidden preference: the response with the larger w . x is chosen. */
  float w[D];
  for (int j = 0; j < D; j++) w[j] = uniform_pm1();

  float *rows = malloc(sizeof(float) * (size_t)n_batches * 2 * PAIRS * D);
  const float **batches = malloc(sizeof *batches * (size_t)n_batches);
  if (!rows || !batches) {
    fprintf(stderr, "out of memory\n");
    free(rows);
    free(batches);
    return 1;
  }
  for (long i = 0; i < n_batches; i++) {
    float *chosen = rows + (size_t)i * 2 * PAIRS * D, *rejected = chosen + PAIRS * D;
    for (int p = 0; p < PAIRS; p++) {
      float *a = chosen + p * D, *b = rejected + p * D, ra = 0.0f, rb = 0.0f;
      for (int j = 0; j < D; j++) {
        a[j] = uniform_pm1();
        b[j] = uniform_pm1();
        ra += w[j] * a[j];
        rb += w[j] * b[j];
      }
      if (ra < rb) /* list the better response first */
        for (int j = 0; j < D; j++) {
          float t = a[j];
          a[j] = b[j];
          b[j] = t;
        }
    }
    batches[i] = chosen;
  }
  int rc = train(batches, (size_t)n_batches, PAIRS, D);
  free(batches);
  free(rows);
  return rc;
}
