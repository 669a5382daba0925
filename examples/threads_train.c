/*
 * threads_train.c - data-parallel training on host threads, one model.
 *
 * The library has no threads of its own; the host brings them. Here every
 * step of N_THREADS worker threads each runs forward, loss and backward on
 * its shard of the batch, in its own context on the one shared model (the
 * model is only read meanwhile). The main thread then averages the workers'
 * gradients into worker 0's context and makes the one optimizer step,
 * which writes the model while no worker runs (docs/api.md, Threads).
 *
 * Errors: a worker records the status of its failing call and copies the
 * text of prm_last_errmsg() before it returns. That text lives in the
 * worker thread's own storage, which ends with the thread, and prm_loss_bt
 * (a pure function) has no handle to keep a message in. At the end the
 * program feeds one worker a shard with a NaN feature on purpose and
 * prints what the main thread received (docs/cookbook.md).
 *
 * BLAS threads: with threads of your own, run the BLAS single-threaded,
 * e.g. OPENBLAS_NUM_THREADS=1 (docs/deployment.md).
 *
 *   OPENBLAS_NUM_THREADS=1 ./build/examples/threads_train
 */
#define _POSIX_C_SOURCE 200809L
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <prefrm.h>

#define D 32         /* features per response */
#define N_THREADS 4  /* worker threads */
#define S 32         /* pairs per worker and step: a step trains on N_THREADS * S pairs */
#define STEPS 100

#define CHECK(call)                                                                                \
  do {                                                                                             \
    if ((rc = (call)) != PRM_OK) goto fail;                                                        \
  } while (0)

typedef struct worker {
  prm_ctx *ctx;      /* this thread's own context on the shared model */
  const float *rows; /* its shard: S chosen rows, then S rejected rows */
  double loss;       /* out: the shard's mean loss */
  int rc;            /* out: PRM_OK, or the status of the call that failed */
  char err[256];     /* out: that call's prm_last_errmsg(), copied */
} worker;

/* Forward, loss and backward of one shard (the backward adds to the
 * context's gradients). Runs on a worker thread. */
static void *run_shard(void *arg) {
  worker *w = arg;
  float scores[2 * S], dscores[2 * S];
  prm_batch b = PRM_BATCH_INIT;
  b.features = w->rows;
  b.n = 2 * S;
  b.n_features = D;
  w->err[0] = '\0';
  w->rc = prm_ctx_forward(w->ctx, &b, scores, 2 * S);
  if (w->rc == PRM_OK)
    w->rc = prm_loss_bt(scores, scores + S, S, NULL, &w->loss, NULL, dscores, dscores + S);
  if (w->rc == PRM_OK) w->rc = prm_ctx_backward(w->ctx, dscores, 2 * S);
  if (w->rc != PRM_OK) /* the text is this thread's: copy it while the thread lives */
    snprintf(w->err, sizeof w->err, "%s", prm_last_errmsg());
  return NULL;
}

/* Run every worker on its own thread and wait for all of them. Returns the
 * index of the first worker that failed, or -1. */
static int run_workers(worker *w) {
  pthread_t tid[N_THREADS];
  for (int k = 0; k < N_THREADS; k++)
    if (pthread_create(&tid[k], NULL, run_shard, &w[k]) != 0) {
      fprintf(stderr, "pthread_create failed\n");
      exit(1);
    }
  for (int k = 0; k < N_THREADS; k++) pthread_join(tid[k], NULL);
  for (int k = 0; k < N_THREADS; k++)
    if (w[k].rc != PRM_OK) return k;
  return -1;
}

/* A small deterministic generator for the synthetic data (not the library's). */
static unsigned long long rng_state = 3;
static float uniform_pm1(void) {
  rng_state = rng_state * 6364136223846793005ull + 1442695040888963407ull;
  return (float)((double)(rng_state >> 11) * 0x1.0p-52 - 1.0);
}

/* One step's data: N_THREADS shards of S pairs, the better response of each
 * pair (larger w . x) listed first. */
static void make_step(float *data, const float *w) {
  for (int k = 0; k < N_THREADS; k++) {
    float *chosen = data + (size_t)k * 2 * S * D, *rejected = chosen + S * D;
    for (int i = 0; i < S; i++) {
      float *a = chosen + i * D, *b = rejected + i * D, ra = 0.0f, rb = 0.0f;
      for (int j = 0; j < D; j++) {
        a[j] = uniform_pm1();
        b[j] = uniform_pm1();
        ra += w[j] * a[j];
        rb += w[j] * b[j];
      }
      if (ra < rb)
        for (int j = 0; j < D; j++) {
          float t = a[j];
          a[j] = b[j];
          b[j] = t;
        }
    }
  }
}

int main(void) {
  int rc = PRM_OK;
  prm_model *model = NULL;
  prm_optimizer *opt = NULL;
  worker w[N_THREADS];
  memset(w, 0, sizeof w);
  float hidden[D];
  for (int j = 0; j < D; j++) hidden[j] = uniform_pm1();
  float *data = malloc(sizeof(float) * N_THREADS * 2 * S * D);
  float *sum = NULL, *buf = NULL;
  if (!data) return 1;

  prm_model_options mo = PRM_MODEL_OPTIONS_INIT;
  mo.arch = PRM_ARCH_MLP;
  mo.input_size = D;
  mo.n_hidden = 1;
  mo.hidden[0] = 64;
  mo.seed = 3;
  CHECK(prm_model_new(&model, &mo));
  prm_ctx_options co = PRM_CTX_OPTIONS_INIT;
  co.max_rows = 2 * S;
  for (int k = 0; k < N_THREADS; k++) {
    CHECK(prm_ctx_new(&w[k].ctx, model, &co));
    w[k].rows = data + (size_t)k * 2 * S * D;
  }
  prm_optimizer_options oo = PRM_OPTIMIZER_OPTIONS_INIT;
  oo.lr = 3e-3;
  CHECK(prm_optimizer_new(&opt, model, &oo));

  const uint64_t n = prm_ctx_num_grads(w[0].ctx);
  sum = malloc(sizeof(float) * n);
  buf = malloc(sizeof(float) * n);
  if (!sum || !buf) {
    rc = PRM_ERR_NOMEM;
    goto fail;
  }

  for (int step = 0; step < STEPS; step++) {
    make_step(data, hidden);
    int bad = run_workers(w);
    if (bad >= 0) {
      fprintf(stderr, "worker %d: %s: %s\n", bad, prm_status_string(w[bad].rc), w[bad].err);
      goto fail;
    }
    /* the mean of the workers' gradients into worker 0's context, then one step */
    CHECK(prm_ctx_read_grads(w[0].ctx, 0, sum, n));
    for (int k = 1; k < N_THREADS; k++) {
      CHECK(prm_ctx_read_grads(w[k].ctx, 0, buf, n));
      for (uint64_t i = 0; i < n; i++) sum[i] += buf[i];
      CHECK(prm_ctx_zero_grad(w[k].ctx)); /* backward adds: start the next step from 0 */
    }
    for (uint64_t i = 0; i < n; i++) sum[i] /= N_THREADS;
    CHECK(prm_ctx_write_grads(w[0].ctx, 0, sum, n));
    CHECK(prm_optimizer_step(opt, w[0].ctx)); /* applies the update, zeroes ctx 0's gradients */
    if (step % 25 == 0 || step == STEPS - 1) {
      double loss = 0.0;
      for (int k = 0; k < N_THREADS; k++) loss += w[k].loss / N_THREADS;
      printf("step %d loss %.4f (%d threads x %d pairs)\n", step, loss, N_THREADS, S);
    }
  }

  /* A bad shard on purpose: worker 2 gets a NaN feature. Its forward fails,
   * and the message reaches the main thread through the worker struct. */
  make_step(data, hidden);
  data[2 * 2 * S * D + 5] = NAN;
  int bad = run_workers(w);
  if (bad != 2 || w[2].rc != PRM_ERR_NONFINITE || w[2].err[0] == '\0') {
    fprintf(stderr, "expected worker 2 to fail with PRM_ERR_NONFINITE and a message\n");
    rc = PRM_ERR_STATE;
    goto fail;
  }
  printf("worker %d failed as planned: %s: %s\n", bad, prm_status_string(w[bad].rc), w[bad].err);

fail:
  if (rc != PRM_OK) fprintf(stderr, "%s: %s\n", prm_status_string(rc), prm_last_errmsg());
  prm_optimizer_free(opt);
  for (int k = 0; k < N_THREADS; k++) prm_ctx_free(w[k].ctx);
  prm_model_free(model);
  free(data);
  free(sum);
  free(buf);
  return rc == PRM_OK ? 0 : 1;
}
