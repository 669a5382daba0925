/*
 * test_threads.c - reentrancy: one model shared by N contexts on N threads
 * gives bit-identical scores and gradients to serial use, and error messages
 * stay per thread. Also run under ThreadSanitizer by .ci/run.
 */
#define _POSIX_C_SOURCE 200809L
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "testutil.h"

#define N_THREADS 4
#define ROWS 32
#define D 24
#define ROUNDS 20

typedef struct job {
  const prm_model *model;
  const float *x;    /* (ROUNDS, ROWS, D) features of this job */
  const float *ds;   /* (ROUNDS, ROWS) output gradients */
  float *scores;     /* (ROUNDS, ROWS) inference scores */
  float *train_scores;
  float *grads;      /* [n_params] accumulated over all rounds */
  int status;
} job;

/* What each thread does, and what the serial reference does the same way:
 * score with an inference context, then forward/backward with a training
 * context, accumulating gradients over the rounds. */
static void run_job(job *j) {
  prm_ctx_options io = PRM_CTX_OPTIONS_INIT, to = PRM_CTX_OPTIONS_INIT;
  io.inference = 1;
  io.max_rows = to.max_rows = ROWS;
  prm_ctx *inf = NULL, *tr = NULL;
  j->status = prm_ctx_new(&inf, j->model, &io);
  if (j->status == PRM_OK) j->status = prm_ctx_new(&tr, j->model, &to);
  for (int r = 0; r < ROUNDS && j->status == PRM_OK; r++) {
    prm_batch b = PRM_BATCH_INIT;
    b.features = j->x + (size_t)r * ROWS * D;
    b.n = ROWS;
    b.n_features = D;
    j->status = prm_ctx_forward(inf, &b, j->scores + r * ROWS, ROWS);
    if (j->status == PRM_OK) j->status = prm_ctx_forward(tr, &b, j->train_scores + r * ROWS, ROWS);
    if (j->status == PRM_OK) j->status = prm_ctx_backward(tr, j->ds + r * ROWS, ROWS);
  }
  if (j->status == PRM_OK) {
    uint64_t n;
    const float *g = prm_ctx_grads(tr, &n);
    memcpy(j->grads, g, n * sizeof(float));
  }
  prm_ctx_free(inf);
  prm_ctx_free(tr);
}

static void *thread_main(void *arg) {
  run_job(arg);
  return NULL;
}

static void check_model(prm_model *m) {
  const uint64_t np = prm_model_num_params(m);
  job serial[N_THREADS], par[N_THREADS];
  prmt_rng r = {2024};
  for (int t = 0; t < N_THREADS; t++) {
    float *x = malloc(sizeof(float) * ROUNDS * ROWS * D);
    float *ds = malloc(sizeof(float) * ROUNDS * ROWS);
    prmt_fill_normal(&r, x, ROUNDS * ROWS * D, 1.0);
    prmt_fill_normal(&r, ds, ROUNDS * ROWS, 1.0);
    job *js[2] = {&serial[t], &par[t]};
    for (int k = 0; k < 2; k++) {
      js[k]->model = m;
      js[k]->x = x;
      js[k]->ds = ds;
      js[k]->scores = malloc(sizeof(float) * ROUNDS * ROWS);
      js[k]->train_scores = malloc(sizeof(float) * ROUNDS * ROWS);
      js[k]->grads = malloc(sizeof(float) * np);
      js[k]->status = -100;
    }
  }
  for (int t = 0; t < N_THREADS; t++) run_job(&serial[t]);
  pthread_t th[N_THREADS];
  for (int t = 0; t < N_THREADS; t++)
    assert_int_equal(pthread_create(&th[t], NULL, thread_main, &par[t]), 0);
  for (int t = 0; t < N_THREADS; t++) assert_int_equal(pthread_join(th[t], NULL), 0);
  for (int t = 0; t < N_THREADS; t++) {
    assert_int_equal(serial[t].status, PRM_OK);
    assert_int_equal(par[t].status, PRM_OK);
    assert_memory_equal(serial[t].scores, par[t].scores, sizeof(float) * ROUNDS * ROWS);
    assert_memory_equal(serial[t].train_scores, par[t].train_scores,
                        sizeof(float) * ROUNDS * ROWS);
    assert_memory_equal(serial[t].scores, serial[t].train_scores, sizeof(float) * ROUNDS * ROWS);
    assert_memory_equal(serial[t].grads, par[t].grads, sizeof(float) * np);
  }
  for (int t = 0; t < N_THREADS; t++) {
    free((void *)serial[t].x);
    free((void *)serial[t].ds);
    job *js[2] = {&serial[t], &par[t]};
    for (int k = 0; k < 2; k++) {
      free(js[k]->scores);
      free(js[k]->train_scores);
      free(js[k]->grads);
    }
  }
}

static void test_shared_linear(void **state) {
  (void)state;
  prm_model *m = prmt_linear(D, 5);
  check_model(m);
  prm_model_free(m);
}

static void test_shared_mlp(void **state) {
  (void)state;
  uint64_t hidden[2] = {40, 16};
  prm_model *m = prmt_mlp(D, hidden, 2, PRM_ACT_GELU_TANH, 6);
  check_model(m);
  prm_model_free(m);
}

/* Each thread sees its own last error message. */
typedef struct err_job {
  int status;
  char msg[256];
  int wait_for; /* 1: fail, then re-read after the other thread failed too */
} err_job;

static pthread_barrier_t barrier;

static void *err_thread(void *arg) {
  err_job *e = arg;
  prm_model_options o = PRM_MODEL_OPTIONS_INIT;
  prm_model *m = NULL;
  if (e->wait_for) o.version = 999; /* PRM_ERR_VERSION */
  else o.input_size = 0;            /* PRM_ERR_INVALID */
  e->status = prm_model_new(&m, &o);
  pthread_barrier_wait(&barrier); /* both threads have failed now */
  strncpy(e->msg, prm_last_errmsg(), sizeof e->msg - 1);
  e->msg[sizeof e->msg - 1] = '\0';
  return NULL;
}

static void test_thread_local_errors(void **state) {
  (void)state;
  err_job a = {0, "", 1}, b = {0, "", 0};
  assert_int_equal(pthread_barrier_init(&barrier, NULL, 2), 0);
  pthread_t ta, tb;
  assert_int_equal(pthread_create(&ta, NULL, err_thread, &a), 0);
  assert_int_equal(pthread_create(&tb, NULL, err_thread, &b), 0);
  pthread_join(ta, NULL);
  pthread_join(tb, NULL);
  pthread_barrier_destroy(&barrier);
  assert_int_equal(a.status, PRM_ERR_VERSION);
  assert_int_equal(b.status, PRM_ERR_INVALID);
  assert_non_null(strstr(a.msg, "version"));
  assert_non_null(strstr(b.msg, "input_size"));
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_shared_linear),
      cmocka_unit_test(test_shared_mlp),
      cmocka_unit_test(test_thread_local_errors),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
