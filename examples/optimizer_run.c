/*
 * optimizer_run.c - the optimizer of docs/optimizers.md in one run.
 *
 * AdamW with warm-up, cosine decay to a floor and gradient clipping, an
 * update every K = 4 micro-batches (gradient accumulation), a host-side
 * reduce-on-plateau rule that halves the rate through the lr scale when the
 * validation loss stops improving, and a checkpoint: after SAVE_AT updates
 * the model and the optimizer (its lr scale included) are saved, every
 * handle is freed, and the run resumes from the two files in fresh handles,
 * as a new process would.
 *
 * The same run is also made without the interruption; the program checks
 * that both end with the same parameters, bit for bit. (The host's own
 * state -- its position in the data, the plateau counters -- is the host's
 * to save; here it simply stays in memory.)
 *
 *   ./build/examples/optimizer_run
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <prefrm.h>

#define D 16         /* features per response */
#define MB 16        /* pairs per micro-batch */
#define K 4          /* micro-batches per update */
#define UPDATES 200  /* the whole run */
#define N_TRAIN 4096 /* training pairs */
#define N_VAL 256    /* validation pairs */
#define SAVE_AT 150  /* updates before the checkpoint */

/* A small deterministic generator for the synthetic data (not the library's). */
static unsigned long long rng_state = 17;
static double uniform(void) {
  rng_state = rng_state * 6364136223846793005ull + 1442695040888963407ull;
  return (double)(rng_state >> 11) * 0x1.0p-53;
}

/* Pairs as p chosen rows then p rejected rows per block of p pairs. */
typedef struct dataset {
  float train[2 * N_TRAIN * D]; /* blocks of MB pairs */
  float val[2 * N_VAL * D];     /* one block of N_VAL pairs */
} dataset;

/* Noisy labels: the labeller prefers a with probability s(3 (w.a - w.b)). */
static void make_pairs(float *rows, int n, int p, const float *w) {
  for (int i = 0; i < n; i++) {
    float a[D], b[D];
    double ra = 0.0, rb = 0.0;
    for (int j = 0; j < D; j++) {
      a[j] = (float)(2.0 * uniform() - 1.0);
      b[j] = (float)(2.0 * uniform() - 1.0);
      ra += w[j] * a[j];
      rb += w[j] * b[j];
    }
    const int a_wins = uniform() < 1.0 / (1.0 + exp(-3.0 * (ra - rb)));
    float *block = rows + (size_t)(i / p) * 2 * p * D;
    memcpy(block + (size_t)(i % p) * D, a_wins ? a : b, sizeof a);
    memcpy(block + (size_t)(p + i % p) * D, a_wins ? b : a, sizeof a);
  }
}

/* What the host keeps between updates. */
typedef struct host_state {
  const char *name; /* of the run, for the log */
  uint64_t micro;   /* micro-batches consumed */
  double best;      /* best validation loss so far */
  int bad_evals;    /* validations since it last improved */
} host_state;

static int new_ctx(prm_ctx **ctx, const prm_model *model) {
  prm_ctx_options co = PRM_CTX_OPTIONS_INIT;
  co.max_rows = 2 * N_VAL; /* the largest batch: the validation set */
  return prm_ctx_new(ctx, model, &co);
}

/* Forward, loss and backward of the next micro-batch: the gradients add up
 * in the context until an applying optimizer step. */
static int micro_batch(prm_ctx *ctx, const dataset *ds, uint64_t i) {
  float scores[2 * MB], dscores[2 * MB];
  double loss = 0.0;
  prm_batch b = PRM_BATCH_INIT;
  b.features = ds->train + (i % (N_TRAIN / MB)) * 2 * MB * D;
  b.n = 2 * MB;
  b.n_features = D;
  int rc = prm_ctx_forward(ctx, &b, scores, 2 * MB);
  if (rc == PRM_OK) rc = prm_loss_bt(scores, scores + MB, MB, NULL, &loss, NULL, dscores, dscores + MB);
  if (rc == PRM_OK) rc = prm_ctx_backward(ctx, dscores, 2 * MB);
  return rc;
}

static int validation_loss(prm_ctx *ctx, const dataset *ds, double *loss) {
  prm_batch b = PRM_BATCH_INIT;
  b.features = ds->val;
  b.n = 2 * N_VAL;
  b.n_features = D;
  prm_loss_stats st = PRM_LOSS_STATS_INIT;
  int rc = prm_evaluate(ctx, &b, NULL, &st); /* forward and loss only: gradients untouched */
  *loss = st.loss;
  return rc;
}

/* Train until the optimizer has applied `until` updates. */
static int run_updates(prm_ctx *ctx, prm_optimizer *opt, const dataset *ds, uint64_t until,
                       host_state *hs) {
  int rc = PRM_OK;
  uint64_t logged = prm_optimizer_num_updates(opt);
  while (prm_optimizer_num_updates(opt) < until) {
    if ((rc = micro_batch(ctx, ds, hs->micro++)) != PRM_OK) return rc;
    const double lr = prm_optimizer_lr(opt); /* the rate of the update this call may apply */
    rc = prm_optimizer_step(opt, ctx);
    if (rc == PRM_ERR_NONFINITE_GRAD) {
      /* Drop what was accumulated. The next call applies again, dividing by
       * K: feed it a full cycle's worth (K micro-batches, stepping after
       * each would apply early), or accept the smaller step. */
      fprintf(stderr, "skipped: %s\n", prm_optimizer_errmsg(opt));
      prm_ctx_zero_grad(ctx);
      continue;
    }
    if (rc != PRM_OK) return rc;
    if (prm_optimizer_num_updates(opt) == logged) continue; /* a counting call: no update */
    logged = prm_optimizer_num_updates(opt);
    if (logged % 10 != 0) continue;

    double val_loss = 0.0;
    if ((rc = validation_loss(ctx, ds, &val_loss)) != PRM_OK) return rc;
    printf("%s: update %3llu grad_norm %.3f lr %.2e val_loss %.4f\n", hs->name,
           (unsigned long long)logged, prm_optimizer_last_grad_norm(opt), lr, val_loss);
    /* reduce on plateau, decided by the host from its validation loss */
    if (val_loss < hs->best - 1e-3) {
      hs->best = val_loss;
      hs->bad_evals = 0;
    } else if (++hs->bad_evals == 2) {
      rc = prm_optimizer_set_lr_scale(opt, prm_optimizer_lr_scale(opt) * 0.5);
      if (rc != PRM_OK) return rc;
      hs->bad_evals = 0;
      printf("%s: plateau, lr scale now %g\n", hs->name, prm_optimizer_lr_scale(opt));
    }
  }
  return PRM_OK;
}

/* Resume from the saved files in fresh handles, as a new process would, and
 * train on until `until` updates; the final parameters go to `params`. */
static int resume(const dataset *ds, uint64_t until, host_state *hs, float *params, uint64_t n) {
  prm_model *model = NULL;
  prm_ctx *ctx = NULL;
  prm_optimizer *opt = NULL;
  int rc = prm_model_load(&model, "model.safetensors"); /* also restores the trainable set */
  if (rc == PRM_OK) rc = new_ctx(&ctx, model);          /* contexts after the load */
  if (rc == PRM_OK) rc = prm_optimizer_load(&opt, model, "optimizer.safetensors");
  if (rc == PRM_OK) rc = run_updates(ctx, opt, ds, until, hs);
  if (rc == PRM_OK) rc = prm_model_read_params(model, 0, params, n);
  if (rc != PRM_OK) fprintf(stderr, "resume: %s: %s\n", prm_status_string(rc), prm_last_errmsg());
  prm_optimizer_free(opt);
  prm_ctx_free(ctx);
  prm_model_free(model);
  return rc;
}

/* One run from scratch: straight through, or with a save and a resume.
 * The final parameters go to `params` (n floats). */
static int run(const dataset *ds, int interrupt, float *params, uint64_t n) {
  host_state hs = {interrupt ? "resumed" : "straight", 0, INFINITY, 0};
  prm_model *model = NULL;
  prm_ctx *ctx = NULL;
  prm_optimizer *opt = NULL;
  prm_model_options mo = PRM_MODEL_OPTIONS_INIT;
  mo.arch = PRM_ARCH_MLP;
  mo.input_size = D;
  mo.n_hidden = 1;
  mo.hidden[0] = 32;
  mo.seed = 5;
  int rc = prm_model_new(&model, &mo);
  if (rc != PRM_OK) goto fail;
  if (prm_model_num_params(model) != n) {
    fprintf(stderr, "the model has %llu parameters, not %llu\n",
            (unsigned long long)prm_model_num_params(model), (unsigned long long)n);
    rc = PRM_ERR_SIZE;
    goto fail;
  }
  if ((rc = new_ctx(&ctx, model)) != PRM_OK) goto fail;

  prm_optimizer_options oo;
  prm_optimizer_options_init(&oo, PRM_OPTIMIZER_OPTIONS_VERSION);
  oo.algorithm = PRM_OPT_ADAMW;
  oo.lr = 1e-2;
  oo.weight_decay = 0.01;
  oo.no_decay_1d = 1;
  oo.max_grad_norm = 1.0;
  oo.schedule = PRM_SCHED_COSINE;
  oo.warmup_steps = 20;
  oo.total_steps = UPDATES;
  oo.min_lr = 1e-5;
  oo.accumulation_steps = K; /* an update every K micro-batches */
  if ((rc = prm_optimizer_new(&opt, model, &oo)) != PRM_OK) goto fail;

  if (!interrupt) {
    if ((rc = run_updates(ctx, opt, ds, UPDATES, &hs)) != PRM_OK) goto fail;
    rc = prm_model_read_params(model, 0, params, n);
    goto fail; /* free everything */
  }
  if ((rc = run_updates(ctx, opt, ds, SAVE_AT, &hs)) != PRM_OK) goto fail;
  /* saving, e.g. every 1000 updates, between steps */
  if ((rc = prm_model_save(model, "model.safetensors")) != PRM_OK) goto fail;
  if ((rc = prm_optimizer_save(opt, "optimizer.safetensors")) != PRM_OK) goto fail;
  prm_optimizer_free(opt);
  prm_ctx_free(ctx);
  prm_model_free(model);
  printf("%s: saved after %d updates, all handles freed\n", hs.name, SAVE_AT);
  return resume(ds, UPDATES, &hs, params, n);
fail:
  if (rc != PRM_OK) fprintf(stderr, "%s: %s\n", prm_status_string(rc), prm_last_errmsg());
  prm_optimizer_free(opt);
  prm_ctx_free(ctx);
  prm_model_free(model);
  return rc;
}

int main(void) {
  static dataset ds;
  float w[D];
  for (int j = 0; j < D; j++) w[j] = (float)(2.0 * uniform() - 1.0);
  make_pairs(ds.train, N_TRAIN, MB, w);
  make_pairs(ds.val, N_VAL, N_VAL, w);

  const uint64_t n = (uint64_t)D * 32 + 32 + 32; /* mlp D -> 32 -> 1: weights, bias, head */
  float *a = malloc(sizeof(float) * n), *b = malloc(sizeof(float) * n);
  int rc = a && b ? PRM_OK : PRM_ERR_NOMEM;
  if (rc == PRM_OK) rc = run(&ds, 0, a, n);
  if (rc == PRM_OK) rc = run(&ds, 1, b, n);
  if (rc == PRM_OK && memcmp(a, b, sizeof(float) * n) != 0) {
    fprintf(stderr, "the resumed run ended with other parameters than the straight one\n");
    rc = PRM_ERR_STATE;
  }
  if (rc == PRM_OK) printf("resumed run = straight run, bit for bit (%llu parameters)\n",
                           (unsigned long long)n);
  free(a);
  free(b);
  return rc == PRM_OK ? 0 : 1;
}
