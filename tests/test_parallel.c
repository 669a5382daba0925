/*
 * test_parallel.c - one context on several threads (prm_ctx_options
 * version 2: n_workers, parallel_for) and the shipped pool (prm_pool).
 *
 * The contract under test: results are bit-identical for any parallel_for
 * and any number of workers -- 1 (no parallel_for), pools of 2, 3 and 4
 * workers, and a host loop that runs the tasks backwards on one thread --
 * for scores, gradients and one-call steps, with and without shared
 * prefixes, on every token architecture. CI runs this file under TSan too.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "prefrm.h"
#include "testutil.h"

#define V 53
#define CTX 72
#define ROWS 8

/* ---- the pool on its own -------------------------------------------------------------------- */

typedef struct count_job {
  int *hits;        /* per task */
  int *busy;        /* per worker: 1 while a task runs on it */
  uint32_t workers; /* ids must be below this */
  int bad;
  pthread_mutex_t mu;
} count_job;

static void count_task(void *arg, uint32_t t, uint32_t w) {
  count_job *j = arg;
  pthread_mutex_lock(&j->mu);
  j->hits[t]++;
  if (w >= j->workers || j->busy[w]) j->bad = 1; /* unknown id, or two tasks on one worker */
  if (w < j->workers) j->busy[w] = 1;
  pthread_mutex_unlock(&j->mu);
  volatile double x = 0; /* a little work, so that workers overlap */
  for (int i = 0; i < 2000; i++) x = x + sqrt((double)i);
  if (x < 0) j->bad = 1; /* never: keeps x used */
  pthread_mutex_lock(&j->mu);
  if (w < j->workers) j->busy[w] = 0;
  pthread_mutex_unlock(&j->mu);
}

static void test_pool_runs_every_task_once(void **state) {
  (void)state;
  for (uint32_t nw = 1; nw <= 4; nw++) {
    prm_pool *pool = NULL;
    assert_int_equal(prm_pool_new(&pool, nw), PRM_OK);
    assert_int_equal(prm_pool_size(pool), nw);
    for (uint32_t n_tasks = 0; n_tasks <= 37; n_tasks += 37 / 4) {
      int hits[64] = {0}, busy[8] = {0};
      count_job j = {hits, busy, nw, 0, PTHREAD_MUTEX_INITIALIZER};
      for (int rep = 0; rep < 3; rep++) prm_pool_parallel_for(pool, n_tasks, count_task, &j);
      for (uint32_t t = 0; t < n_tasks; t++) assert_int_equal(hits[t], 3);
      assert_int_equal(j.bad, 0);
    }
    prm_pool_free(pool);
  }
  prm_pool_free(NULL);
  assert_int_equal(prm_pool_size(NULL), 0);
}

static void test_pool_errors(void **state) {
  (void)state;
  prm_pool *pool = (prm_pool *)(uintptr_t)1;
  ASSERT_FAILS(prm_pool_new(NULL, 2), PRM_ERR_NULL);
  ASSERT_FAILS(prm_pool_new(&pool, 0), PRM_ERR_INVALID);
  assert_null(pool);
  ASSERT_FAILS(prm_pool_new(&pool, 1025), PRM_ERR_INVALID);
  assert_null(pool);
}

/* ---- contexts --------------------------------------------------------------------------------- */

/* A host loop unlike the pool: one thread, tasks in reverse order, worker
 * ids cycling through 0..2. */
static void backwards_for(void *arg, uint32_t n_tasks, prm_task_fn task, void *task_arg) {
  (void)arg;
  for (uint32_t t = n_tasks; t-- > 0;) task(task_arg, t, t % 3);
}

static prm_model *token_model(int kind) {
  prm_model_options o;
  if (kind == 0) {
    o = prmt_gpt2_options(V, CTX, 48, 3, 4, 2);
  } else {
    assert_int_equal(prm_model_options_init(&o, PRM_MODEL_OPTIONS_VERSION), PRM_OK);
    o.arch = PRM_ARCH_LLAMA;
    o.vocab_size = V;
    o.n_ctx = CTX;
    o.n_embd = 48;
    o.n_layer = 3;
    o.n_head = 6;
    o.n_kv_head = 2;
    o.n_ffn = 64;
    o.qk_norm = kind == 2;
    o.attn_bias = kind == 2;
    o.seed = 2;
  }
  prm_model *m = NULL;
  int rc = prm_model_new(&m, &o);
  if (rc != PRM_OK) fail_msg("prm_model_new: %s (%s)", prm_status_string(rc), prm_last_errmsg());
  prmt_perturb_tensors(m, "", 3, 0.2);
  return m;
}

/* ctx with a given loop: nw = 0 -> no parallel_for; nw > 0 -> pool of nw;
 * nw < 0 -> backwards_for with 3 workers. */
static prm_ctx *ctx_with(const prm_model *m, int inference, int nw, prm_pool **pool) {
  prm_ctx_options o;
  assert_int_equal(prm_ctx_options_init(&o, PRM_CTX_OPTIONS_VERSION), PRM_OK);
  o.inference = inference;
  o.max_rows = ROWS;
  o.max_len = CTX;
  *pool = NULL;
  if (nw > 0) {
    assert_int_equal(prm_pool_new(pool, (uint32_t)nw), PRM_OK);
    o.n_workers = prm_pool_size(*pool);
    o.parallel_for = prm_pool_parallel_for;
    o.parallel_arg = *pool;
  } else if (nw < 0) {
    o.n_workers = 3;
    o.parallel_for = backwards_for;
  }
  prm_ctx *c = NULL;
  int rc = prm_ctx_new(&c, m, &o);
  if (rc != PRM_OK) fail_msg("prm_ctx_new: %s (%s)", prm_status_string(rc), prm_last_errmsg());
  return c;
}

typedef struct batch_data {
  int32_t tokens[ROWS * CTX], len[ROWS], prow[ROWS], plen[ROWS];
} batch_data;

/* Four pairs of ragged sequences; with `share`, each rejected row declares
 * its pair's prompt. */
static prm_batch make_pairs(batch_data *d, int share) {
  static const int32_t prompt[4] = {40, 3, 25, 1};
  static const int32_t rc[4] = {20, 60, 33, 1}, rr[4] = {31, 9, 47, 70};
  prmt_rng r = {17};
  for (int j = 0; j < 4; j++) {
    d->len[j] = prompt[j] + rc[j];
    d->len[4 + j] = prompt[j] + rr[j];
    d->prow[j] = d->plen[j] = 0;
    d->prow[4 + j] = j;
    d->plen[4 + j] = prompt[j];
  }
  prmt_fill_tokens(&r, d->tokens, d->len, ROWS, CTX, V, 0);
  for (int j = 0; j < 4; j++)
    memcpy(d->tokens + (4 + j) * CTX, d->tokens + j * CTX, (size_t)prompt[j] * sizeof(int32_t));
  prm_batch b = prmt_tok_batch(d->tokens, d->len, ROWS, CTX);
  if (share) {
    b.prefix_row = d->prow;
    b.prefix_len = d->plen;
  }
  return b;
}

/* Scores, gradients, and parameters after two one-call AdamW steps. */
typedef struct outcome {
  float scores[ROWS], inf_scores[ROWS];
  float *grads, *params;
  double loss;
} outcome;

static void run(int kind, int nw, int share, outcome *out) {
  prm_model *m = token_model(kind);
  prm_pool *pool = NULL, *ipool = NULL;
  prm_ctx *c = ctx_with(m, 0, nw, &pool), *ci = ctx_with(m, 1, nw, &ipool);
  batch_data *d = malloc(sizeof *d);
  assert_non_null(d);
  prm_batch b = make_pairs(d, share);
  float g[ROWS];
  for (int i = 0; i < ROWS; i++) g[i] = 0.3f * (float)(i % 3) - 0.4f;
  const uint64_t np = prm_model_num_params(m);
  out->grads = malloc(np * sizeof(float));
  out->params = malloc(np * sizeof(float));
  assert_non_null(out->grads);
  assert_non_null(out->params);
  prmt_score_and_grad(c, &b, g, out->scores, out->grads);
  prmt_forward_ok(ci, &b, out->inf_scores);
  prm_optimizer *opt = prmt_adamw(m, 1e-3);
  prm_loss_stats st;
  assert_int_equal(prm_loss_stats_init(&st, PRM_LOSS_STATS_VERSION), PRM_OK);
  assert_int_equal(prm_ctx_zero_grad(c), PRM_OK);
  for (int s = 0; s < 2; s++) assert_int_equal(prm_train_step(c, opt, &b, NULL, &st), PRM_OK);
  out->loss = st.loss;
  uint64_t n;
  memcpy(out->params, prm_model_params(m, &n), np * sizeof(float));
  prm_optimizer_free(opt);
  prm_ctx_free(c);
  prm_ctx_free(ci);
  prm_pool_free(pool);
  prm_pool_free(ipool);
  free(d);
  prm_model_free(m);
}

static void check_invariance(int kind) {
  static const int loops[] = {1, 2, 3, 4, -1};
  const char *name = kind == 0 ? "gpt2" : kind == 1 ? "llama GQA" : "llama qk-norm+bias";
  for (int share = 0; share <= 1; share++) {
    outcome ref;
    run(kind, 0, share, &ref);
    prm_model *m = token_model(kind);
    const uint64_t np = prm_model_num_params(m);
    prm_model_free(m);
    for (size_t k = 0; k < sizeof loops / sizeof loops[0]; k++) {
      outcome o;
      run(kind, loops[k], share, &o);
      if (memcmp(o.scores, ref.scores, sizeof o.scores) != 0 ||
          memcmp(o.inf_scores, ref.inf_scores, sizeof o.inf_scores) != 0 ||
          memcmp(o.grads, ref.grads, np * sizeof(float)) != 0 ||
          memcmp(o.params, ref.params, np * sizeof(float)) != 0 || o.loss != ref.loss)
        fail_msg("%s, %s prefixes: workers %d differ from one thread", name,
                 share ? "shared" : "no", loops[k]);
      free(o.grads);
      free(o.params);
    }
    /* inference scores equal training scores */
    assert_memory_equal(ref.scores, ref.inf_scores, sizeof ref.scores);
    free(ref.grads);
    free(ref.params);
  }
}

static void test_gpt2_any_thread_count(void **state) {
  (void)state;
  check_invariance(0);
}

static void test_llama_any_thread_count(void **state) {
  (void)state;
  check_invariance(1);
  check_invariance(2);
}

/*
 * The one-call step equals the split calls bit for bit on the token models
 * (docs/api.md says so): forward, prm_loss_bt, backward and an AdamW step
 * by hand against prm_train_step, both on a pool of 2, with shared
 * prefixes.
 */
static void test_one_call_equals_split(void **state) {
  (void)state;
  for (int kind = 0; kind <= 2; kind++) {
    prm_model *ma = token_model(kind), *mb = token_model(kind);
    prm_pool *pa = NULL, *pb = NULL;
    prm_ctx *ca = ctx_with(ma, 0, 2, &pa), *cb = ctx_with(mb, 0, 2, &pb);
    prm_optimizer *oa = prmt_adamw(ma, 1e-3), *ob = prmt_adamw(mb, 1e-3);
    batch_data *d = malloc(sizeof *d);
    assert_non_null(d);
    prm_batch b = make_pairs(d, 1);
    prm_loss_stats st;
    assert_int_equal(prm_loss_stats_init(&st, PRM_LOSS_STATS_VERSION), PRM_OK);
    for (int step = 0; step < 2; step++) {
      float s[ROWS], ds[ROWS];
      double loss;
      prmt_forward_ok(ca, &b, s);
      assert_int_equal(prm_loss_bt(s, s + ROWS / 2, ROWS / 2, NULL, &loss, &st, ds, ds + ROWS / 2),
                       PRM_OK);
      assert_int_equal(prm_ctx_backward(ca, ds, ROWS), PRM_OK);
      assert_int_equal(prm_optimizer_step(oa, ca), PRM_OK);
      assert_int_equal(prm_train_step(cb, ob, &b, NULL, &st), PRM_OK);
      assert_true(st.loss == loss);
    }
    uint64_t n;
    const float *a = prm_model_params(ma, &n), *bb = prm_model_params(mb, &n);
    assert_memory_equal(a, bb, n * sizeof(float));
    free(d);
    prm_optimizer_free(oa);
    prm_optimizer_free(ob);
    prm_ctx_free(ca);
    prm_ctx_free(cb);
    prm_pool_free(pa);
    prm_pool_free(pb);
    prm_model_free(ma);
    prm_model_free(mb);
  }
}

/* Several contexts, each with its own pool, scoring concurrently from host
 * threads, agree with one context on one thread (TSan: no race between the
 * pools' workers, the shared model and the contexts). */
typedef struct score_thread {
  const prm_model *m;
  const prm_batch *b;
  float scores[ROWS];
  int rc;
} score_thread;

static void *score_main(void *arg) {
  score_thread *t = arg;
  prm_pool *pool = NULL;
  prm_ctx_options o;
  prm_ctx_options_init(&o, PRM_CTX_OPTIONS_VERSION);
  o.inference = 1;
  o.max_rows = ROWS;
  t->rc = prm_pool_new(&pool, 2);
  if (t->rc != PRM_OK) return NULL;
  o.n_workers = 2;
  o.parallel_for = prm_pool_parallel_for;
  o.parallel_arg = pool;
  prm_ctx *c = NULL;
  t->rc = prm_ctx_new(&c, t->m, &o);
  for (int rep = 0; rep < 3 && t->rc == PRM_OK; rep++)
    t->rc = prm_ctx_forward(c, t->b, t->scores, ROWS);
  prm_ctx_free(c);
  prm_pool_free(pool);
  return NULL;
}

static void test_concurrent_contexts(void **state) {
  (void)state;
  prm_model *m = token_model(0);
  batch_data *d = malloc(sizeof *d);
  assert_non_null(d);
  prm_batch b = make_pairs(d, 1);
  prm_pool *none = NULL;
  prm_ctx *c = ctx_with(m, 1, 0, &none);
  float ref[ROWS];
  prmt_forward_ok(c, &b, ref);
  score_thread t[3];
  pthread_t th[3];
  for (int i = 0; i < 3; i++) {
    t[i].m = m;
    t[i].b = &b;
    assert_int_equal(pthread_create(&th[i], NULL, score_main, &t[i]), 0);
  }
  for (int i = 0; i < 3; i++) {
    pthread_join(th[i], NULL);
    assert_int_equal(t[i].rc, PRM_OK);
    assert_memory_equal(t[i].scores, ref, sizeof ref);
  }
  prm_ctx_free(c);
  free(d);
  prm_model_free(m);
}

/* Options: n_workers bounds; version 1 read in its own bytes. */
static void test_options(void **state) {
  (void)state;
  prm_model *m = token_model(0);
  prm_ctx_options o;
  assert_int_equal(prm_ctx_options_init(&o, PRM_CTX_OPTIONS_VERSION), PRM_OK);
  assert_int_equal(o.n_workers, 1);
  assert_null(o.parallel_for);
  o.max_rows = 2;
  o.n_workers = 1025;
  o.parallel_for = backwards_for;
  prm_ctx *c = (prm_ctx *)(uintptr_t)1;
  ASSERT_FAILS(prm_ctx_new(&c, m, &o), PRM_ERR_INVALID);
  assert_null(c);
  /* a version-1 struct ends before n_workers: init writes only its bytes,
   * and prm_ctx_new reads only them */
  unsigned char buf[sizeof(prm_ctx_options) + 8];
  memset(buf, 0x5A, sizeof buf);
  assert_int_equal(prm_ctx_options_init((prm_ctx_options *)(void *)buf, 1), PRM_OK);
  const size_t v1 = offsetof(prm_ctx_options, n_workers);
  for (size_t i = v1; i < sizeof buf; i++) assert_int_equal(buf[i], 0x5A);
  prm_ctx_options *o1 = (prm_ctx_options *)(void *)buf;
  o1->max_rows = 2;
  assert_int_equal(prm_ctx_new(&c, m, o1), PRM_OK); /* garbage past v1 never read */
  prm_ctx_free(c);
  prm_model_free(m);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_pool_runs_every_task_once),
      cmocka_unit_test(test_pool_errors),
      cmocka_unit_test(test_options),
      cmocka_unit_test(test_gpt2_any_thread_count),
      cmocka_unit_test(test_llama_any_thread_count),
      cmocka_unit_test(test_concurrent_contexts),
      cmocka_unit_test(test_one_call_equals_split),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
