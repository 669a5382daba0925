/*
 * test_api.c - the interface as a foreign-language binding meets it: the
 * per-handle error message rule (which calls write which handle's message,
 * that successes never clear it, and that a shared model's message is safe
 * to write and read from many threads at once), and every error path of
 * the message-related calls. The threaded tests are meant for
 * ThreadSanitizer too (-DPRM_SANITIZE=thread).
 */
#define _POSIX_C_SOURCE 200809L
// clang-format off
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>
// clang-format on

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz/optimizer_models.h"
#include "testutil.h"

/* The call failed with `status`, and both the thread's message and the
 * handle's (an expression giving a message) contain `needle`. */
#define ASSERT_FAIL_MSG(call, status, handle_msg, needle)                                          \
  do {                                                                                             \
    assert_int_equal((call), (status));                                                            \
    if (strstr(prm_last_errmsg(), (needle)) == NULL)                                               \
      fail_msg("thread message '%s' lacks '%s'", prm_last_errmsg(), (needle));                     \
    if (strstr((handle_msg), (needle)) == NULL)                                                    \
      fail_msg("handle message '%s' lacks '%s'", (handle_msg), (needle));                          \
  } while (0)

#define ASSERT_MSG_IS(msg, needle)                                                                 \
  do {                                                                                             \
    if (strstr((msg), (needle)) == NULL) fail_msg("message '%s' lacks '%s'", (msg), (needle));     \
  } while (0)

static prm_optimizer *make_sgd(prm_model *m, double lr) {
  prm_optimizer_options o = PRM_OPTIMIZER_OPTIONS_INIT;
  o.algorithm = PRM_OPT_SGD;
  o.lr = lr;
  prm_optimizer *opt = NULL;
  assert_int_equal(prm_optimizer_new(&opt, m, &o), PRM_OK);
  return opt;
}

/* ---- the message rule: models --------------------------------------------------------- */

static void test_model_errmsg_rule(void **state) {
  (void)state;
  char path[512];
  prm_model *m = prmt_linear(3, 1);
  assert_string_equal(prm_model_errmsg(m), "");
  assert_string_equal(prm_model_errmsg(NULL), "");

  /* a non-const call */
  ASSERT_FAIL_MSG(prm_model_set_trainable(m, 2), PRM_ERR_INVALID, prm_model_errmsg(m), "no blocks");
  /* successes leave it alone */
  const char *name = NULL;
  assert_int_equal(prm_model_tensor_info(m, 0, &name, NULL, NULL, NULL), PRM_OK);
  assert_int_equal(prm_model_set_trainable(m, -1), PRM_OK);
  ASSERT_MSG_IS(prm_model_errmsg(m), "no blocks");
  /* const calls replace it */
  ASSERT_FAIL_MSG(prm_model_tensor_info(m, 7, NULL, NULL, NULL, NULL), PRM_ERR_INVALID,
                  prm_model_errmsg(m), "index 7");
  prm_model_options mo = PRM_MODEL_OPTIONS_INIT;
  mo.version = 99;
  ASSERT_FAIL_MSG(prm_model_get_options(m, &mo), PRM_ERR_VERSION, prm_model_errmsg(m), "99");
  ASSERT_FAIL_MSG(prm_model_get_options(m, NULL), PRM_ERR_NULL, prm_model_errmsg(m), "NULL");
  ASSERT_FAIL_MSG(prm_model_reward_norm(m, NULL, NULL), PRM_ERR_STATE, prm_model_errmsg(m),
                  "prm_model_reward_norm");
  float r[2] = {1.0f, NAN};
  ASSERT_FAIL_MSG(prm_model_normalise_rewards(m, r, 2), PRM_ERR_STATE, prm_model_errmsg(m),
                  "prm_model_normalise_rewards");
  ASSERT_FAIL_MSG(prm_model_normalise_rewards(m, NULL, 2), PRM_ERR_NULL, prm_model_errmsg(m),
                  "rewards is NULL");
  prm_reward_moments mom = PRM_REWARD_MOMENTS_INIT;
  ASSERT_FAIL_MSG(prm_model_set_reward_norm(m, &mom), PRM_ERR_INVALID, prm_model_errmsg(m),
                  "at least 2");
  float rw[3] = {1.0f, 2.0f, 4.0f};
  assert_int_equal(prm_reward_moments_add(&mom, rw, 3), PRM_OK);
  assert_int_equal(prm_model_set_reward_norm(m, &mom), PRM_OK);
  ASSERT_FAIL_MSG(prm_model_normalise_rewards(m, r, 2), PRM_ERR_NONFINITE, prm_model_errmsg(m),
                  "NaN");
  mom.version = 0;
  ASSERT_FAIL_MSG(prm_model_set_reward_norm(m, &mom), PRM_ERR_VERSION, prm_model_errmsg(m),
                  "version");

  /* calls that take the model beside other things */
  prm_ctx_options co = PRM_CTX_OPTIONS_INIT;
  prm_ctx *c = NULL;
  ASSERT_FAIL_MSG(prm_ctx_new(&c, m, &co), PRM_ERR_INVALID, prm_model_errmsg(m), "max_rows");
  assert_null(c);
  co.version = 42;
  ASSERT_FAIL_MSG(prm_ctx_new(&c, m, &co), PRM_ERR_VERSION, prm_model_errmsg(m), "42");
  ASSERT_FAIL_MSG(prm_ctx_new(NULL, m, &co), PRM_ERR_NULL, prm_model_errmsg(m), "out is NULL");
  ASSERT_FAIL_MSG(prm_ctx_new(&c, m, NULL), PRM_ERR_NULL, prm_model_errmsg(m), "prm_ctx_options");
  size_t need = 0;
  ASSERT_FAIL_MSG(prm_model_save_buffer(m, NULL, 0, NULL), PRM_ERR_NULL, prm_model_errmsg(m),
                  "size_out");
  assert_int_equal(prm_model_save_buffer(m, NULL, 0, &need), PRM_OK);
  unsigned char small[8];
  ASSERT_FAIL_MSG(prm_model_save_buffer(m, small, sizeof small, &need), PRM_ERR_SIZE,
                  prm_model_errmsg(m), "capacity");
  ASSERT_FAIL_MSG(prm_model_save(m, NULL), PRM_ERR_NULL, prm_model_errmsg(m), "path is NULL");
  ASSERT_FAIL_MSG(prm_model_save(m, "/nonexistent-dir/x/model.safetensors"), PRM_ERR_IO,
                  prm_model_errmsg(m), "nonexistent-dir");
  prm_optimizer_options oo = PRM_OPTIMIZER_OPTIONS_INIT;
  oo.lr = -1.0;
  prm_optimizer *opt = NULL;
  ASSERT_FAIL_MSG(prm_optimizer_new(&opt, m, &oo), PRM_ERR_INVALID, prm_model_errmsg(m), "lr");
  ASSERT_FAIL_MSG(prm_optimizer_new(NULL, m, &oo), PRM_ERR_NULL, prm_model_errmsg(m),
                  "out is NULL");
  const char junk[] = "plain text, not a checkpoint";
  ASSERT_FAIL_MSG(prm_optimizer_load_buffer(&opt, m, junk, sizeof junk), PRM_ERR_FORMAT,
                  prm_model_errmsg(m), "not a safetensors file");
  ASSERT_FAIL_MSG(prm_optimizer_load_buffer(&opt, m, NULL, 4), PRM_ERR_NULL, prm_model_errmsg(m),
                  "buf is NULL");
  ASSERT_FAIL_MSG(prm_optimizer_load_buffer(NULL, m, junk, 4), PRM_ERR_NULL, prm_model_errmsg(m),
                  "out is NULL");
  ASSERT_FAIL_MSG(prm_optimizer_load(&opt, m, NULL), PRM_ERR_NULL, prm_model_errmsg(m),
                  "path is NULL");
  ASSERT_FAIL_MSG(prm_optimizer_load(NULL, m, "x"), PRM_ERR_NULL, prm_model_errmsg(m),
                  "out is NULL");
  prmt_tmp_path(path, sizeof path, "api_missing_state");
  ASSERT_FAIL_MSG(prm_optimizer_load(&opt, m, path), PRM_ERR_IO, prm_model_errmsg(m),
                  "api_missing_state");
  assert_null(opt);

  /* the thread-local copy: a pointer keeps its text until the thread's
   * next prm_model_errmsg, whatever fails meanwhile */
  const char *held = prm_model_errmsg(m);
  ASSERT_MSG_IS(held, "api_missing_state");
  assert_int_equal(prm_model_tensor_info(m, 9, NULL, NULL, NULL, NULL), PRM_ERR_INVALID);
  ASSERT_MSG_IS(held, "api_missing_state");
  ASSERT_MSG_IS(prm_model_errmsg(m), "index 9");

  /* prm_model_params(NULL): nothing to record in, the thread says why */
  uint64_t np = 5;
  assert_null(prm_model_params(NULL, &np));
  assert_int_equal(np, 0);
  ASSERT_MSG_IS(prm_last_errmsg(), "model is NULL");
  ASSERT_MSG_IS(prm_model_errmsg(m), "index 9"); /* another handle is not touched */
  prm_model_free(m);
}

/* ---- the message rule: contexts and optimizers ------------------------------------------ */

static void test_ctx_and_optimizer_errmsg_rule(void **state) {
  (void)state;
  prm_model *m = prmt_linear(3, 2);
  prm_ctx *c = prmt_ctx(m, 4, 0), *inf = prmt_ctx(m, 4, 1);
  prm_optimizer *opt = make_sgd(m, 0.1);
  assert_string_equal(prm_ctx_errmsg(c), "");
  assert_string_equal(prm_ctx_errmsg(NULL), "");
  assert_string_equal(prm_optimizer_errmsg(opt), "");
  assert_string_equal(prm_optimizer_errmsg(NULL), "");

  float x[12] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2, 3}, s[4], ds[4] = {1, -1, 0.5f, 0};
  prm_batch b = prmt_batch(x, 4, 3);
  ASSERT_FAIL_MSG(prm_ctx_forward(c, &b, s, 3), PRM_ERR_SIZE, prm_ctx_errmsg(c), "scores holds");
  ASSERT_FAIL_MSG(prm_ctx_backward(c, ds, 4), PRM_ERR_STATE, prm_ctx_errmsg(c), "no forward");
  assert_int_equal(prm_ctx_forward(c, &b, s, 4), PRM_OK); /* a success keeps the message */
  ASSERT_MSG_IS(prm_ctx_errmsg(c), "no forward");
  ASSERT_FAIL_MSG(prm_ctx_zero_grad(inf), PRM_ERR_STATE, prm_ctx_errmsg(inf), "inference");

  /* item: prm_ctx_grads of an inference context is NULL, with a message */
  uint64_t n = 99;
  assert_null(prm_ctx_grads(inf, &n));
  assert_int_equal(n, 0);
  ASSERT_MSG_IS(prm_ctx_errmsg(inf), "prm_ctx_grads: inference context");
  ASSERT_MSG_IS(prm_last_errmsg(), "prm_ctx_grads: inference context");
  assert_null(prm_ctx_grads(NULL, &n));
  ASSERT_MSG_IS(prm_last_errmsg(), "prm_ctx_grads: ctx is NULL");
  assert_non_null(prm_ctx_grads(c, &n));
  assert_int_equal(n, 3);

  /* a step failing on its context writes both handles */
  ASSERT_FAIL_MSG(prm_optimizer_step(opt, inf), PRM_ERR_STATE, prm_optimizer_errmsg(opt),
                  "inference context");
  ASSERT_MSG_IS(prm_ctx_errmsg(inf), "prm_optimizer_step: ctx is an inference context");
  ASSERT_FAIL_MSG(prm_optimizer_step(NULL, c), PRM_ERR_NULL, prm_ctx_errmsg(c), "opt is NULL");
  ASSERT_FAIL_MSG(prm_optimizer_step(opt, NULL), PRM_ERR_NULL, prm_optimizer_errmsg(opt),
                  "ctx is NULL");
  /* a context of another model */
  prm_model *m2 = prmt_linear(3, 3);
  prm_ctx *c2 = prmt_ctx(m2, 4, 0);
  ASSERT_FAIL_MSG(prm_optimizer_step(opt, c2), PRM_ERR_MISMATCH, prm_optimizer_errmsg(opt),
                  "another model");
  ASSERT_MSG_IS(prm_ctx_errmsg(c2), "another model");
  /* non-finite gradients */
  uint64_t ng;
  float *g = prm_ctx_grads(c, &ng);
  g[1] = NAN;
  ASSERT_FAIL_MSG(prm_optimizer_step(opt, c), PRM_ERR_NONFINITE_GRAD, prm_optimizer_errmsg(opt),
                  "non-finite gradient at parameter 1");
  ASSERT_MSG_IS(prm_ctx_errmsg(c), "non-finite gradient at parameter 1");
  assert_int_equal(prm_ctx_zero_grad(c), PRM_OK);

  /* one-call paths: the context and the optimizer */
  prm_batch odd = prmt_batch(x, 3, 3);
  ASSERT_FAIL_MSG(prm_train_step(c, opt, &odd, NULL, NULL), PRM_ERR_SIZE, prm_ctx_errmsg(c),
                  "even number");
  ASSERT_MSG_IS(prm_optimizer_errmsg(opt), "even number");
  ASSERT_FAIL_MSG(prm_train_step(inf, opt, &b, NULL, NULL), PRM_ERR_STATE,
                  prm_optimizer_errmsg(opt), "prm_train_step: inference context");
  ASSERT_FAIL_MSG(prm_train_step(c2, opt, &b, NULL, NULL), PRM_ERR_MISMATCH,
                  prm_optimizer_errmsg(opt), "different models");
  ASSERT_MSG_IS(prm_ctx_errmsg(c2), "different models");
  ASSERT_FAIL_MSG(prm_train_step(c, NULL, &b, NULL, NULL), PRM_ERR_NULL, prm_ctx_errmsg(c),
                  "opt is NULL");
  assert_int_equal(prm_train_step(c, opt, &b, NULL, NULL), PRM_OK);
  ASSERT_MSG_IS(prm_ctx_errmsg(c), "opt is NULL");
  ASSERT_MSG_IS(prm_optimizer_errmsg(opt), "different models");
  int32_t sizes[2] = {2, 1};
  ASSERT_FAIL_MSG(prm_train_step_groups(c, opt, &b, sizes, 2, NULL, NULL), PRM_ERR_SIZE,
                  prm_optimizer_errmsg(opt), "group_sizes[1]");
  ASSERT_MSG_IS(prm_ctx_errmsg(c), "group_sizes[1]");
  ASSERT_FAIL_MSG(prm_evaluate(inf, &odd, NULL, NULL), PRM_ERR_SIZE, prm_ctx_errmsg(inf),
                  "even number");
  ASSERT_FAIL_MSG(prm_evaluate_groups(inf, &b, sizes, 2, NULL, NULL), PRM_ERR_SIZE,
                  prm_ctx_errmsg(inf), "group_sizes[1]");
  x[4] = INFINITY;
  ASSERT_FAIL_MSG(prm_evaluate(inf, &b, NULL, NULL), PRM_ERR_NONFINITE, prm_ctx_errmsg(inf), "Inf");

  /* optimizer saves are const calls: they write the optimizer's message */
  ASSERT_FAIL_MSG(prm_optimizer_save(opt, NULL), PRM_ERR_NULL, prm_optimizer_errmsg(opt),
                  "path is NULL");
  ASSERT_FAIL_MSG(prm_optimizer_save(opt, "/nonexistent-dir/y/opt.safetensors"), PRM_ERR_IO,
                  prm_optimizer_errmsg(opt), "nonexistent-dir");
  size_t need;
  ASSERT_FAIL_MSG(prm_optimizer_save_buffer(opt, NULL, 0, NULL), PRM_ERR_NULL,
                  prm_optimizer_errmsg(opt), "size_out");
  unsigned char small[4];
  ASSERT_FAIL_MSG(prm_optimizer_save_buffer(opt, small, sizeof small, &need), PRM_ERR_SIZE,
                  prm_optimizer_errmsg(opt), "capacity");
  /* the copy keeps its text until this thread's next prm_optimizer_errmsg,
   * and a model message read meanwhile uses another buffer */
  const char *held = prm_optimizer_errmsg(opt);
  assert_int_equal(prm_optimizer_save(opt, NULL), PRM_ERR_NULL);
  assert_string_equal(prm_model_errmsg(m), "");
  ASSERT_MSG_IS(held, "capacity");
  ASSERT_MSG_IS(prm_optimizer_errmsg(opt), "path is NULL");

  /* the model was not an argument of any call above */
  assert_string_equal(prm_model_errmsg(m), "");
  prm_optimizer_free(opt);
  prm_ctx_free(c);
  prm_ctx_free(inf);
  prm_ctx_free(c2);
  prm_model_free(m);
  prm_model_free(m2);
}

/* ---- the message of a shared model under concurrent failures ------------------------------ */

#define ERR_THREADS 4
#define ERR_ROUNDS 300

typedef struct err_worker {
  prm_model *model;
  int id;
  int bad; /* messages read that are none of the expected ones */
  char sample[256];
} err_worker;

/* A message any worker may have left in the shared model: complete, never
 * a mix of two (the lock) and never another model's. */
static int expected_message(const char *msg) {
  if (msg[0] == '\0') return 1;
  unsigned idx;
  if (sscanf(msg, "prm_model_tensor_info: index %u >= 1 tensors", &idx) == 1)
    return idx >= 100 && idx < 100 + ERR_THREADS;
  return strcmp(msg, "prm_ctx_new: max_rows 0 not in [1, 2^30]") == 0 ||
         strcmp(msg, "prm_model_reward_norm: the model has no normalisation statistics "
                     "(prm_model_set_reward_norm)") == 0;
}

static void *err_worker_main(void *arg) {
  err_worker *w = arg;
  const prm_model *m = w->model;
  prm_ctx_options co = PRM_CTX_OPTIONS_INIT; /* max_rows 0: refused */
  prm_ctx *inf = prmt_ctx(m, 2, 1);
  float x[6] = {1, 2, 3, 4, 5, 6}, s[2];
  prm_batch b = prmt_batch(x, 2, 3);
  for (int r = 0; r < ERR_ROUNDS; r++) {
    prm_ctx *c = NULL;
    switch ((r + w->id) % 4) {
    case 0: prm_model_tensor_info(m, 100 + (uint32_t)w->id, NULL, NULL, NULL, NULL); break;
    case 1: prm_ctx_new(&c, m, &co); break;
    case 2: prm_model_reward_norm(m, NULL, NULL); break;
    default: prm_ctx_forward(inf, &b, s, 2); break; /* a success on the shared model */
    }
    const char *msg = prm_model_errmsg(m);
    if (!expected_message(msg)) {
      w->bad++;
      snprintf(w->sample, sizeof w->sample, "%s", msg);
    }
  }
  prm_ctx_free(inf);
  return NULL;
}

static void test_shared_model_errmsg_threads(void **state) {
  (void)state;
  prm_model *m = prmt_linear(3, 4);
  err_worker w[ERR_THREADS];
  pthread_t th[ERR_THREADS];
  for (int t = 0; t < ERR_THREADS; t++) {
    w[t].model = m;
    w[t].id = t;
    w[t].bad = 0;
    w[t].sample[0] = '\0';
    assert_int_equal(pthread_create(&th[t], NULL, err_worker_main, &w[t]), 0);
  }
  for (int t = 0; t < ERR_THREADS; t++)
    assert_int_equal(pthread_join(th[t], NULL), 0);
  for (int t = 0; t < ERR_THREADS; t++)
    if (w[t].bad)
      fail_msg("thread %d read %d unexpected messages, e.g. '%s'", t, w[t].bad, w[t].sample);
  assert_true(expected_message(prm_model_errmsg(m)));
  assert_true(prm_model_errmsg(m)[0] != '\0');
  prm_model_free(m);
}

/* Two threads saving one optimizer (a const call) to bad paths at once, and
 * reading its message meanwhile. */
typedef struct save_worker {
  const prm_optimizer *opt;
  int id, bad;
} save_worker;

static void *save_worker_main(void *arg) {
  save_worker *w = arg;
  char path[64];
  snprintf(path, sizeof path, "/nonexistent-dir/%d/opt.safetensors", w->id);
  for (int r = 0; r < ERR_ROUNDS / 3; r++) {
    if (prm_optimizer_save(w->opt, path) != PRM_ERR_IO) w->bad++;
    const char *msg = prm_optimizer_errmsg(w->opt);
    if (strstr(msg, "/nonexistent-dir/") == NULL || strstr(msg, "/opt.safetensors") == NULL)
      w->bad++;
  }
  return NULL;
}

static void test_shared_optimizer_errmsg_threads(void **state) {
  (void)state;
  prm_model *m = prmt_linear(3, 5);
  prm_optimizer *opt = make_sgd(m, 0.1);
  save_worker w[2] = {{opt, 0, 0}, {opt, 1, 0}};
  pthread_t th[2];
  for (int t = 0; t < 2; t++)
    assert_int_equal(pthread_create(&th[t], NULL, save_worker_main, &w[t]), 0);
  for (int t = 0; t < 2; t++)
    assert_int_equal(pthread_join(th[t], NULL), 0);
  assert_int_equal(w[0].bad + w[1].bad, 0);
  prm_optimizer_free(opt);
  prm_model_free(m);
}

/* ---- loading a file of another kind ------------------------------------------------------ */

/* Every loader says "not a safetensors file" for bytes of another kind:
 * text, random bytes whose first 8 give an absurd or merely too large
 * header length, a header that is not a JSON object, and files too short to
 * hold one; a real safetensors file cut short says "truncated". */
static void check_not_safetensors(const unsigned char *bytes, size_t n, const char *what,
                                  const char *needle) {
  prm_model *m = NULL, *host = prmt_linear(3, 9);
  prm_optimizer *opt = NULL;
  int rc = prm_model_load_buffer(&m, bytes, n);
  if (rc != PRM_ERR_FORMAT || strstr(prm_last_errmsg(), needle) == NULL)
    fail_msg("%s: %s (%s), expected '%s'", what, prm_status_string(rc), prm_last_errmsg(), needle);
  assert_null(m);
  assert_int_equal(prm_model_load_pretrained_buffer(&m, bytes, n, NULL, NULL), PRM_ERR_FORMAT);
  ASSERT_MSG_IS(prm_last_errmsg(), needle);
  assert_int_equal(prm_optimizer_load_buffer(&opt, host, bytes, n), PRM_ERR_FORMAT);
  ASSERT_MSG_IS(prm_model_errmsg(host), needle);
  /* and from a file */
  char path[512];
  prmt_tmp_path(path, sizeof path, "api_not_safetensors");
  FILE *f = fopen(path, "wb");
  assert_non_null(f);
  assert_int_equal(fwrite(bytes, 1, n, f), n);
  fclose(f);
  assert_int_equal(prm_model_load(&m, path), PRM_ERR_FORMAT);
  ASSERT_MSG_IS(prm_last_errmsg(), needle);
  remove(path);
  prm_model_free(host);
}

static void test_not_a_safetensors_file(void **state) {
  (void)state;
  const char *text = "# a README, or a JSONL file given by mistake\n{\"prompt\": \"hi\"}\n";
  check_not_safetensors((const unsigned char *)text, strlen(text), "text",
                        "not a safetensors file");
  /* random bytes: an absurd header length */
  unsigned char rnd[200];
  prmt_rng r = {77};
  for (size_t i = 0; i < sizeof rnd; i++)
    rnd[i] = (unsigned char)(prmt_next(&r) >> 56);
  rnd[7] = 0x9c;
  check_not_safetensors(rnd, sizeof rnd, "random", "not a safetensors file: header length");
  /* a plausible length beyond the end of the file, but no '{' where the
   * header would start: another kind of file, not a truncated one */
  unsigned char len_past_end[64] = {0};
  len_past_end[1] = 0x10; /* 4096 */
  static const char zipish[] = "PK\x03\x04 zip-like bytes";
  memcpy(len_past_end + 8, zipish, sizeof zipish - 1);
  check_not_safetensors(len_past_end, sizeof len_past_end, "length past the end",
                        "not a safetensors file: its header does not start with '{'");
  /* a header of a fitting length that is not a JSON object */
  unsigned char not_obj[8 + 6] = {6, 0, 0, 0, 0, 0, 0, 0, ' ', '[', '1', ',', '2', ']'};
  check_not_safetensors(not_obj, sizeof not_obj, "a JSON array",
                        "not a safetensors file: its header does not start with '{' (byte 9");
  /* too short to hold a header, or an empty header */
  check_not_safetensors((const unsigned char *)"", 0, "empty", "not a safetensors file");
  check_not_safetensors((const unsigned char *)"abc", 3, "3 bytes",
                        "shorter than the header length");
  unsigned char zero[8] = {0};
  check_not_safetensors(zero, sizeof zero, "header length 0",
                        "not a safetensors file: a header of 0 bytes");
  /* a real file cut inside its header: truncated, not "another kind" */
  prm_model *m = prmt_linear(3, 1);
  size_t n = 0;
  assert_int_equal(prm_model_save_buffer(m, NULL, 0, &n), PRM_OK);
  unsigned char *buf = malloc(n);
  assert_non_null(buf);
  assert_int_equal(prm_model_save_buffer(m, buf, n, &n), PRM_OK);
  prm_model *back = NULL;
  assert_int_equal(prm_model_load_buffer(&back, buf, 20), PRM_ERR_FORMAT);
  ASSERT_MSG_IS(prm_last_errmsg(), "truncated");
  if (strstr(prm_last_errmsg(), "not a safetensors file:") != NULL)
    fail_msg("a truncated checkpoint called another kind of file: %s", prm_last_errmsg());
  assert_int_equal(prm_model_load_buffer(&back, buf, n), PRM_OK);
  prm_model_free(back);
  free(buf);
  prm_model_free(m);
}

/* ---- size getters ------------------------------------------------------------------------ */

static void test_size_getters(void **state) {
  (void)state;
  prm_model *lin = prmt_linear(3, 1);
  prm_model *tok = prmt_gpt2(11, 8, 8, 2, 2, 1);
  assert_int_equal(prm_model_max_len(lin), 0);
  assert_int_equal(prm_model_vocab_size(lin), 0);
  assert_int_equal(prm_model_max_len(tok), 8);
  assert_int_equal(prm_model_vocab_size(tok), 11);
  assert_int_equal(prm_model_max_len(NULL), 0);
  assert_int_equal(prm_model_vocab_size(NULL), 0);

  prm_ctx *c = prmt_ctx(lin, 6, 0), *ci = prmt_ctx(lin, 5, 1);
  prm_ctx *t = prmt_tok_ctx(tok, 4, 0, 0), *t5 = prmt_tok_ctx(tok, 3, 5, 1);
  assert_int_equal(prm_ctx_max_rows(c), 6);
  assert_int_equal(prm_ctx_max_rows(ci), 5);
  assert_int_equal(prm_ctx_max_rows(t5), 3);
  assert_int_equal(prm_ctx_max_len(c), 0);
  assert_int_equal(prm_ctx_max_len(t), 8); /* 0 asked: the model's n_ctx */
  assert_int_equal(prm_ctx_max_len(t5), 5);
  assert_int_equal(prm_ctx_is_inference(c), 0);
  assert_int_equal(prm_ctx_is_inference(ci), 1);
  assert_int_equal(prm_ctx_is_inference(t5), 1);
  uint64_t n = 0;
  assert_non_null(prm_ctx_grads(c, &n));
  assert_int_equal(prm_ctx_num_grads(c), n);
  assert_int_equal(prm_ctx_num_grads(c), prm_model_num_params(lin));
  assert_int_equal(prm_ctx_num_grads(ci), 0);
  assert_int_equal(prm_ctx_num_grads(t), prm_model_num_params(tok));
  /* the trainable set as it was when the context was created */
  assert_int_equal(prm_model_set_trainable(tok, 0), PRM_OK);
  prm_ctx *head = prmt_tok_ctx(tok, 2, 0, 0);
  assert_int_equal(prm_ctx_num_grads(head), 8); /* score.weight [1, 8] */
  assert_int_equal(prm_ctx_num_grads(t), prm_model_num_params(tok));
  assert_int_equal(prm_ctx_max_rows(NULL), 0);
  assert_int_equal(prm_ctx_max_len(NULL), 0);
  assert_int_equal(prm_ctx_is_inference(NULL), 0);
  assert_int_equal(prm_ctx_num_grads(NULL), 0);
  prm_ctx_free(head);
  prm_ctx_free(c);
  prm_ctx_free(ci);
  prm_ctx_free(t);
  prm_ctx_free(t5);
  prm_model_free(lin);
  prm_model_free(tok);
}

/* ---- copying parameters in and out ------------------------------------------------------ */

static void test_model_copy_in_out(void **state) {
  (void)state;
  const uint64_t hidden[1] = {4};
  prm_model *m = prmt_mlp(3, hidden, 1, PRM_ACT_TANH, 3);
  uint64_t np = 0;
  float *arena = prm_model_params(m, &np);
  assert_int_equal(np, 4 * 3 + 4 + 4);
  const uint32_t nt = prm_model_num_tensors(m);
  float buf[32], back[32];

  /* every tensor by name, read and written against the arena */
  for (uint32_t i = 0; i < nt; i++) {
    const char *name = NULL;
    uint64_t off = 0, shape[2];
    uint32_t nd = 0, idx = 999;
    assert_int_equal(prm_model_tensor_info(m, i, &name, &off, &nd, shape), PRM_OK);
    assert_int_equal(prm_model_find_tensor(m, name, &idx), PRM_OK);
    assert_int_equal(idx, i);
    const uint64_t numel = nd == 2 ? shape[0] * shape[1] : shape[0];
    assert_int_equal(prm_model_read_tensor(m, i, buf, numel), PRM_OK);
    assert_memory_equal(buf, arena + off, numel * sizeof(float));
    for (uint64_t k = 0; k < numel; k++)
      buf[k] = (float)(i * 100 + k) * 0.25f;
    assert_int_equal(prm_model_write_tensor(m, i, buf, numel), PRM_OK);
    assert_memory_equal(arena + off, buf, numel * sizeof(float));
    assert_int_equal(prm_model_read_tensor(m, i, back, numel), PRM_OK);
    assert_memory_equal(back, buf, numel * sizeof(float));
  }
  /* a write takes effect: a zero head scores 0 */
  uint32_t head = 0;
  assert_int_equal(prm_model_find_tensor(m, "score.weight", &head), PRM_OK);
  const float zeros[4] = {0, 0, 0, 0};
  assert_int_equal(prm_model_write_tensor(m, head, zeros, 4), PRM_OK);
  prm_ctx *ci = prmt_ctx(m, 1, 1);
  float x[3] = {1, -2, 3}, score = 1.0f;
  prm_batch b = prmt_batch(x, 1, 3);
  assert_int_equal(prm_ctx_forward(ci, &b, &score, 1), PRM_OK);
  assert_true(score == 0.0f);

  /* flat slices */
  float all[20], part[5];
  assert_int_equal(prm_model_read_params(m, 0, all, np), PRM_OK);
  assert_memory_equal(all, arena, np * sizeof(float));
  for (int k = 0; k < 5; k++)
    part[k] = -1.5f * (float)k;
  assert_int_equal(prm_model_write_params(m, np - 5, part, 5), PRM_OK);
  assert_memory_equal(arena + np - 5, part, sizeof part);
  assert_int_equal(prm_model_read_params(m, np - 5, back, 5), PRM_OK);
  assert_memory_equal(back, part, sizeof part);
  assert_int_equal(prm_model_read_params(m, np, NULL, 0), PRM_OK); /* empty, at the end */
  assert_int_equal(prm_model_write_params(m, 3, NULL, 0), PRM_OK);

  /* every error path: status, messages, nothing changed */
  assert_int_equal(prm_model_read_params(m, 0, all, np), PRM_OK);
  float nan_buf[20];
  memcpy(nan_buf, all, sizeof all);
  uint32_t idx = 7;
  ASSERT_FAIL_MSG(prm_model_find_tensor(m, "layers.9.weight", &idx), PRM_ERR_INVALID,
                  prm_model_errmsg(m), "no tensor named 'layers.9.weight'");
  assert_int_equal(idx, 7);
  ASSERT_FAIL_MSG(prm_model_find_tensor(m, NULL, &idx), PRM_ERR_NULL, prm_model_errmsg(m),
                  "name is NULL");
  ASSERT_FAIL_MSG(prm_model_find_tensor(m, "score.weight", NULL), PRM_ERR_NULL, prm_model_errmsg(m),
                  "index is NULL");
  ASSERT_FAILS(prm_model_find_tensor(NULL, "score.weight", &idx), PRM_ERR_NULL);

  ASSERT_FAIL_MSG(prm_model_read_tensor(m, nt, buf, 4), PRM_ERR_INVALID, prm_model_errmsg(m),
                  "index 3 >= 3 tensors");
  ASSERT_FAIL_MSG(prm_model_read_tensor(m, head, buf, 5), PRM_ERR_SIZE, prm_model_errmsg(m),
                  "score.weight has 4 elements, n is 5");
  ASSERT_FAIL_MSG(prm_model_read_tensor(m, head, NULL, 4), PRM_ERR_NULL, prm_model_errmsg(m),
                  "dst is NULL");
  ASSERT_FAILS(prm_model_read_tensor(NULL, head, buf, 4), PRM_ERR_NULL);
  ASSERT_FAIL_MSG(prm_model_write_tensor(m, nt, buf, 4), PRM_ERR_INVALID, prm_model_errmsg(m),
                  "index 3");
  ASSERT_FAIL_MSG(prm_model_write_tensor(m, head, buf, 3), PRM_ERR_SIZE, prm_model_errmsg(m),
                  "n is 3");
  ASSERT_FAIL_MSG(prm_model_write_tensor(m, head, NULL, 4), PRM_ERR_NULL, prm_model_errmsg(m),
                  "src is NULL");
  ASSERT_FAILS(prm_model_write_tensor(NULL, head, buf, 4), PRM_ERR_NULL);
  const float bad_head[4] = {1, 2, NAN, 4}, inf_head[4] = {INFINITY, 0, 0, 0};
  ASSERT_FAIL_MSG(prm_model_write_tensor(m, head, bad_head, 4), PRM_ERR_NONFINITE,
                  prm_model_errmsg(m), "src[2] is NaN");
  ASSERT_FAIL_MSG(prm_model_write_tensor(m, head, inf_head, 4), PRM_ERR_NONFINITE,
                  prm_model_errmsg(m), "src[0] is Inf");

  ASSERT_FAIL_MSG(prm_model_read_params(m, np + 1, NULL, 0), PRM_ERR_SIZE, prm_model_errmsg(m),
                  "reach past the 20 parameters");
  ASSERT_FAIL_MSG(prm_model_read_params(m, 15, buf, 6), PRM_ERR_SIZE, prm_model_errmsg(m),
                  "offset 15 and n 6");
  /* offset + n wraps around 2^64: still refused */
  ASSERT_FAIL_MSG(prm_model_read_params(m, 2, buf, UINT64_MAX), PRM_ERR_SIZE, prm_model_errmsg(m),
                  "reach past");
  ASSERT_FAIL_MSG(prm_model_write_params(m, UINT64_MAX, buf, 2), PRM_ERR_SIZE, prm_model_errmsg(m),
                  "reach past");
  ASSERT_FAIL_MSG(prm_model_read_params(m, 0, NULL, 1), PRM_ERR_NULL, prm_model_errmsg(m),
                  "dst is NULL");
  ASSERT_FAILS(prm_model_read_params(NULL, 0, buf, 1), PRM_ERR_NULL);
  ASSERT_FAIL_MSG(prm_model_write_params(m, 0, NULL, 1), PRM_ERR_NULL, prm_model_errmsg(m),
                  "src is NULL");
  ASSERT_FAILS(prm_model_write_params(NULL, 0, buf, 1), PRM_ERR_NULL);
  nan_buf[19] = NAN;
  ASSERT_FAIL_MSG(prm_model_write_params(m, 0, nan_buf, np), PRM_ERR_NONFINITE, prm_model_errmsg(m),
                  "src[19] is NaN");
  assert_memory_equal(arena, all, np * sizeof(float)); /* nothing was written */
  prm_ctx_free(ci);
  prm_model_free(m);
}

/* ---- copying gradients in and out ------------------------------------------------------- */

static void test_ctx_grad_copy_in_out(void **state) {
  (void)state;
  const uint64_t hidden[1] = {4};
  prm_model *m = prmt_mlp(3, hidden, 1, PRM_ACT_TANH, 4);
  const uint64_t np = prm_model_num_params(m);
  prm_ctx *c = prmt_ctx(m, 2, 0), *ci = prmt_ctx(m, 2, 1);
  float x[6] = {1, 2, 3, -1, 0.5f, 2}, s[2], ds[2] = {0.5f, -1.0f};
  prm_batch b = prmt_batch(x, 2, 3);
  assert_int_equal(prm_ctx_forward(c, &b, s, 2), PRM_OK);
  assert_int_equal(prm_ctx_backward(c, ds, 2), PRM_OK);
  uint64_t ng = 0;
  float *g = prm_ctx_grads(c, &ng);
  assert_int_equal(ng, np);
  float all[20], t[20];
  assert_int_equal(prm_ctx_read_grads(c, 0, all, ng), PRM_OK);
  assert_memory_equal(all, g, ng * sizeof(float));
  for (uint32_t i = 0; i < prm_model_num_tensors(m); i++) {
    uint64_t off, shape[2];
    uint32_t nd;
    assert_int_equal(prm_model_tensor_info(m, i, NULL, &off, &nd, shape), PRM_OK);
    const uint64_t numel = nd == 2 ? shape[0] * shape[1] : shape[0];
    assert_int_equal(prm_ctx_read_grad(c, i, t, numel), PRM_OK);
    assert_memory_equal(t, g + off, numel * sizeof(float));
  }
  /* written gradients are what the next step uses: SGD p -= lr g */
  float mine[20], p0[20], p1[20];
  for (uint64_t k = 0; k < np; k++)
    mine[k] = (float)k - 7.0f;
  assert_int_equal(prm_ctx_write_grads(c, 0, mine, 10), PRM_OK);
  assert_int_equal(prm_ctx_write_grads(c, 10, mine + 10, np - 10), PRM_OK);
  assert_memory_equal(g, mine, np * sizeof(float));
  uint32_t head = 0;
  assert_int_equal(prm_model_find_tensor(m, "score.weight", &head), PRM_OK);
  const float hg[4] = {0.25f, 0.5f, -0.25f, 1.0f};
  assert_int_equal(prm_ctx_write_grad(c, head, hg, 4), PRM_OK);
  assert_memory_equal(g + np - 4, hg, sizeof hg);
  memcpy(mine + np - 4, hg, sizeof hg);
  assert_int_equal(prm_model_read_params(m, 0, p0, np), PRM_OK);
  prm_optimizer *opt = make_sgd(m, 0.5);
  assert_int_equal(prm_optimizer_step(opt, c), PRM_OK);
  assert_int_equal(prm_model_read_params(m, 0, p1, np), PRM_OK);
  for (uint64_t k = 0; k < np; k++)
    assert_true(p1[k] == p0[k] + (float)-0.5 * mine[k]);
  assert_int_equal(prm_ctx_read_grads(c, 0, all, np), PRM_OK); /* the step zeroed them */
  for (uint64_t k = 0; k < np; k++)
    assert_true(all[k] == 0.0f);
  assert_int_equal(prm_ctx_read_grads(c, np, NULL, 0), PRM_OK);
  assert_int_equal(prm_ctx_write_grads(c, 0, NULL, 0), PRM_OK);

  /* error paths */
  memcpy(all, g, np * sizeof(float));
  ASSERT_FAILS(prm_ctx_read_grads(NULL, 0, t, 1), PRM_ERR_NULL);
  ASSERT_FAILS(prm_ctx_write_grads(NULL, 0, t, 1), PRM_ERR_NULL);
  ASSERT_FAILS(prm_ctx_read_grad(NULL, 0, t, 1), PRM_ERR_NULL);
  ASSERT_FAILS(prm_ctx_write_grad(NULL, 0, t, 1), PRM_ERR_NULL);
  ASSERT_FAIL_MSG(prm_ctx_read_grads(ci, 0, t, 1), PRM_ERR_STATE, prm_ctx_errmsg(ci),
                  "prm_ctx_read_grads: inference context");
  ASSERT_FAIL_MSG(prm_ctx_write_grads(ci, 0, t, 1), PRM_ERR_STATE, prm_ctx_errmsg(ci),
                  "prm_ctx_write_grads: inference context");
  ASSERT_FAIL_MSG(prm_ctx_read_grad(ci, head, t, 4), PRM_ERR_STATE, prm_ctx_errmsg(ci),
                  "prm_ctx_read_grad: inference context");
  ASSERT_FAIL_MSG(prm_ctx_write_grad(ci, head, hg, 4), PRM_ERR_STATE, prm_ctx_errmsg(ci),
                  "prm_ctx_write_grad: inference context");
  ASSERT_FAIL_MSG(prm_ctx_read_grads(c, np - 1, t, 2), PRM_ERR_SIZE, prm_ctx_errmsg(c),
                  "reach past the 20 gradients");
  ASSERT_FAIL_MSG(prm_ctx_read_grads(c, np + 1, NULL, 0), PRM_ERR_SIZE, prm_ctx_errmsg(c),
                  "reach past");
  ASSERT_FAIL_MSG(prm_ctx_write_grads(c, 1, t, UINT64_MAX), PRM_ERR_SIZE, prm_ctx_errmsg(c),
                  "reach past");
  ASSERT_FAIL_MSG(prm_ctx_read_grads(c, 0, NULL, 1), PRM_ERR_NULL, prm_ctx_errmsg(c),
                  "dst is NULL");
  ASSERT_FAIL_MSG(prm_ctx_write_grads(c, 0, NULL, 1), PRM_ERR_NULL, prm_ctx_errmsg(c),
                  "src is NULL");
  float bad[20];
  memcpy(bad, mine, sizeof bad);
  bad[11] = -INFINITY;
  ASSERT_FAIL_MSG(prm_ctx_write_grads(c, 0, bad, np), PRM_ERR_NONFINITE, prm_ctx_errmsg(c),
                  "src[11] is Inf");
  ASSERT_FAIL_MSG(prm_ctx_read_grad(c, 3, t, 4), PRM_ERR_INVALID, prm_ctx_errmsg(c),
                  "index 3 >= 3 tensors");
  ASSERT_FAIL_MSG(prm_ctx_write_grad(c, 99, hg, 4), PRM_ERR_INVALID, prm_ctx_errmsg(c), "index 99");
  ASSERT_FAIL_MSG(prm_ctx_read_grad(c, head, t, 3), PRM_ERR_SIZE, prm_ctx_errmsg(c), "n is 3");
  ASSERT_FAIL_MSG(prm_ctx_write_grad(c, head, hg, 5), PRM_ERR_SIZE, prm_ctx_errmsg(c), "n is 5");
  ASSERT_FAIL_MSG(prm_ctx_read_grad(c, head, NULL, 4), PRM_ERR_NULL, prm_ctx_errmsg(c),
                  "dst is NULL");
  ASSERT_FAIL_MSG(prm_ctx_write_grad(c, head, NULL, 4), PRM_ERR_NULL, prm_ctx_errmsg(c),
                  "src is NULL");
  const float nan4[4] = {0, 0, 0, NAN};
  ASSERT_FAIL_MSG(prm_ctx_write_grad(c, head, nan4, 4), PRM_ERR_NONFINITE, prm_ctx_errmsg(c),
                  "src[3] is NaN");
  assert_memory_equal(g, all, np * sizeof(float)); /* no failure wrote anything */

  /* a frozen tensor has no gradient in a context created after freezing */
  assert_int_equal(prm_model_set_trainable(m, 0), PRM_OK);
  prm_ctx *hc = prmt_ctx(m, 2, 0);
  assert_int_equal(prm_ctx_num_grads(hc), 4);
  ASSERT_FAIL_MSG(prm_ctx_read_grad(hc, 0, t, 12), PRM_ERR_STATE, prm_ctx_errmsg(hc),
                  "tensor layers.0.weight is frozen");
  ASSERT_FAIL_MSG(prm_ctx_write_grad(hc, 1, t, 4), PRM_ERR_STATE, prm_ctx_errmsg(hc),
                  "tensor layers.0.bias is frozen");
  assert_int_equal(prm_ctx_write_grad(hc, head, hg, 4), PRM_OK);
  assert_int_equal(prm_ctx_read_grads(hc, 0, t, 4), PRM_OK);
  assert_memory_equal(t, hg, sizeof hg);
  ASSERT_FAIL_MSG(prm_ctx_read_grads(hc, 0, t, 5), PRM_ERR_SIZE, prm_ctx_errmsg(hc),
                  "the 4 gradients");
  /* the older context keeps the layout it was created with */
  assert_int_equal(prm_ctx_read_grad(c, 0, t, 12), PRM_OK);
  prm_optimizer_free(opt);
  prm_ctx_free(hc);
  prm_ctx_free(c);
  prm_ctx_free(ci);
  prm_model_free(m);
}

/* ---- learning-rate control --------------------------------------------------------------- */

static prm_optimizer *make_opt(prm_model *m, int32_t algo, int32_t sched, double lr,
                               double min_lr) {
  prm_optimizer_options o = PRM_OPTIMIZER_OPTIONS_INIT;
  o.algorithm = algo;
  o.lr = lr;
  o.min_lr = min_lr;
  o.schedule = sched;
  o.weight_decay = 0.01;
  o.warmup_steps = sched == PRM_SCHED_CONSTANT ? 0 : 2;
  o.total_steps = sched == PRM_SCHED_CONSTANT ? 0 : 10;
  prm_optimizer *opt = NULL;
  assert_int_equal(prm_optimizer_new(&opt, m, &o), PRM_OK);
  return opt;
}

/* One step with gradient g (np floats) written into c. */
static void step_with(prm_optimizer *opt, prm_ctx *c, const float *g, uint64_t np) {
  assert_int_equal(prm_ctx_write_grads(c, 0, g, np), PRM_OK);
  int rc = prm_optimizer_step(opt, c);
  if (rc != PRM_OK) fail_msg("step: %s (%s)", prm_status_string(rc), prm_optimizer_errmsg(opt));
}

static void test_lr_control(void **state) {
  (void)state;
  prm_model *m = prmt_linear(4, 5), *twin_m = prmt_linear(4, 5);
  prm_ctx *c = prmt_ctx(m, 2, 0), *twin_c = prmt_ctx(twin_m, 2, 0);
  const float g[4] = {0.5f, -1.0f, 0.25f, 2.0f};

  /* the schedule applies on top of a new base lr: the same rates as an
   * optimizer created with it */
  prm_optimizer *opt = make_opt(m, PRM_OPT_ADAMW, PRM_SCHED_COSINE, 1e-2, 1e-4);
  prm_optimizer *twin = make_opt(twin_m, PRM_OPT_ADAMW, PRM_SCHED_COSINE, 3e-2, 1e-4);
  assert_true(prm_optimizer_lr_scale(opt) == 1.0);
  assert_true(prm_optimizer_lr(opt) == 0.0); /* warm-up starts at 0 */
  assert_int_equal(prm_optimizer_set_lr(opt, 3e-2), PRM_OK);
  for (int t = 0; t < 12; t++) {
    assert_true(prm_optimizer_lr(opt) == prm_optimizer_lr(twin));
    step_with(opt, c, g, 4);
    step_with(twin, twin_c, g, 4);
  }
  assert_memory_equal(prm_model_params(m, NULL), prm_model_params(twin_m, NULL), 4 * sizeof(float));
  /* the scale multiplies the scheduled rate */
  prm_optimizer_free(opt);
  prm_optimizer_free(twin);
  opt = make_opt(m, PRM_OPT_ADAMW, PRM_SCHED_LINEAR, 1e-2, 1e-3);
  twin = make_opt(twin_m, PRM_OPT_ADAMW, PRM_SCHED_LINEAR, 1e-2, 1e-3);
  assert_int_equal(prm_optimizer_set_lr_scale(opt, 0.3), PRM_OK);
  assert_true(prm_optimizer_lr_scale(opt) == 0.3);
  for (int t = 0; t < 12; t++) {
    assert_true(prm_optimizer_lr(opt) == prm_optimizer_lr(twin) * 0.3);
    step_with(opt, c, g, 4);
    step_with(twin, twin_c, g, 4);
  }
  prm_optimizer_free(opt);
  prm_optimizer_free(twin);

  /* the update uses the effective rate: SGD with lr 0.1 at scale 0.5 equals
   * lr 0.05 set later, bit for bit; scale 0 leaves the parameters alone */
  float p0[4], pa[4], pb[4];
  assert_int_equal(prm_model_read_params(m, 0, p0, 4), PRM_OK);
  assert_int_equal(prm_model_write_params(twin_m, 0, p0, 4), PRM_OK);
  opt = make_opt(m, PRM_OPT_SGD, PRM_SCHED_CONSTANT, 0.1, 0.0);
  twin = make_opt(twin_m, PRM_OPT_SGD, PRM_SCHED_CONSTANT, 1.0, 0.0);
  assert_int_equal(prm_optimizer_set_lr_scale(opt, 0.5), PRM_OK);
  assert_int_equal(prm_optimizer_set_lr(twin, 0.05), PRM_OK);
  assert_true(prm_optimizer_lr(opt) == prm_optimizer_lr(twin));
  step_with(opt, c, g, 4);
  step_with(twin, twin_c, g, 4);
  assert_int_equal(prm_model_read_params(m, 0, pa, 4), PRM_OK);
  assert_int_equal(prm_model_read_params(twin_m, 0, pb, 4), PRM_OK);
  assert_memory_equal(pa, pb, sizeof pa);
  for (int k = 0; k < 4; k++) { /* torch.optim.SGD with weight decay 0.01, in float */
    const float gk = 1.0f * g[k] + (float)0.01 * p0[k];
    assert_true(pa[k] == p0[k] + (float)-0.05 * gk);
  }
  assert_int_equal(prm_optimizer_set_lr_scale(opt, 0.0), PRM_OK);
  assert_true(prm_optimizer_lr(opt) == 0.0);
  step_with(opt, c, g, 4);
  assert_int_equal(prm_model_read_params(m, 0, pb, 4), PRM_OK);
  assert_memory_equal(pa, pb, sizeof pa);
  prm_optimizer_free(opt);
  prm_optimizer_free(twin);

  /* error paths: the optimizer is unchanged, the message says why */
  opt = make_opt(m, PRM_OPT_ADAMW, PRM_SCHED_COSINE, 1e-2, 1e-4);
  const double before = prm_optimizer_lr(opt);
  ASSERT_FAILS(prm_optimizer_set_lr(NULL, 1.0), PRM_ERR_NULL);
  ASSERT_FAILS(prm_optimizer_set_lr_scale(NULL, 1.0), PRM_ERR_NULL);
  ASSERT_FAIL_MSG(prm_optimizer_set_lr(opt, -1e-3), PRM_ERR_INVALID, prm_optimizer_errmsg(opt),
                  "lr = -0.001 must be >= 0");
  ASSERT_FAIL_MSG(prm_optimizer_set_lr(opt, NAN), PRM_ERR_INVALID, prm_optimizer_errmsg(opt),
                  "finite");
  ASSERT_FAIL_MSG(prm_optimizer_set_lr(opt, INFINITY), PRM_ERR_INVALID, prm_optimizer_errmsg(opt),
                  "finite");
  ASSERT_FAIL_MSG(prm_optimizer_set_lr(opt, 1e39), PRM_ERR_INVALID, prm_optimizer_errmsg(opt),
                  "finite as a float");
  ASSERT_FAIL_MSG(prm_optimizer_set_lr(opt, 5e-5), PRM_ERR_INVALID, prm_optimizer_errmsg(opt),
                  "below min_lr = 0.0001, the floor of the cosine decay");
  assert_int_equal(prm_optimizer_set_lr(opt, 1e-4), PRM_OK); /* min_lr itself is fine */
  ASSERT_FAIL_MSG(prm_optimizer_set_lr_scale(opt, -0.5), PRM_ERR_INVALID, prm_optimizer_errmsg(opt),
                  "lr scale = -0.5 must be finite and >= 0");
  ASSERT_FAIL_MSG(prm_optimizer_set_lr_scale(opt, NAN), PRM_ERR_INVALID, prm_optimizer_errmsg(opt),
                  "lr scale");
  ASSERT_FAIL_MSG(prm_optimizer_set_lr_scale(opt, INFINITY), PRM_ERR_INVALID,
                  prm_optimizer_errmsg(opt), "lr scale");
  ASSERT_FAIL_MSG(prm_optimizer_set_lr_scale(opt, 1e300), PRM_ERR_INVALID,
                  prm_optimizer_errmsg(opt), "is not finite as a float");
  assert_int_equal(prm_optimizer_set_lr_scale(opt, 1e41), PRM_OK); /* 1e-4 * 1e41 fits */
  ASSERT_FAIL_MSG(prm_optimizer_set_lr(opt, 1e-2), PRM_ERR_INVALID, prm_optimizer_errmsg(opt),
                  "times scale");
  assert_int_equal(prm_optimizer_set_lr_scale(opt, 1.0), PRM_OK);
  assert_int_equal(prm_optimizer_set_lr(opt, 1e-2), PRM_OK);
  assert_true(prm_optimizer_lr(opt) == before);
  assert_true(prm_optimizer_lr_scale(NULL) == 0.0);
  prm_optimizer_free(opt);
  /* a constant schedule has no floor to respect */
  opt = make_opt(m, PRM_OPT_SGD, PRM_SCHED_CONSTANT, 1e-2, 1e-3);
  assert_int_equal(prm_optimizer_set_lr(opt, 1e-4), PRM_OK);
  assert_true(prm_optimizer_lr(opt) == 1e-4);
  prm_optimizer_free(opt);
  prm_ctx_free(c);
  prm_ctx_free(twin_c);
  prm_model_free(m);
  prm_model_free(twin_m);
}

/* The bytes of a saved optimizer state. */
static unsigned char *save_state(const prm_optimizer *opt, size_t *n) {
  assert_int_equal(prm_optimizer_save_buffer(opt, NULL, 0, n), PRM_OK);
  unsigned char *b = malloc(*n);
  assert_non_null(b);
  assert_int_equal(prm_optimizer_save_buffer(opt, b, *n, n), PRM_OK);
  return b;
}

/* 1 when the header of a safetensors buffer contains `s`. */
static int header_has(const unsigned char *b, size_t n, const char *s) {
  uint64_t h = 0;
  for (int i = 0; i < 8; i++)
    h |= (uint64_t)b[i] << (8 * i);
  assert_true(h <= n - 8);
  const size_t k = strlen(s);
  for (uint64_t i = 0; i + k <= h; i++)
    if (memcmp(b + 8 + i, s, k) == 0) return 1;
  return 0;
}

/* A copy of a state whose header has `from` replaced by `to`. */
static unsigned char *rewrite_header(const unsigned char *b, size_t n, const char *from,
                                     const char *to, size_t *n_out) {
  uint64_t h = 0;
  for (int i = 0; i < 8; i++)
    h |= (uint64_t)b[i] << (8 * i);
  const size_t kf = strlen(from), kt = strlen(to);
  size_t at = 0;
  while (at + kf <= h && memcmp(b + 8 + at, from, kf) != 0)
    at++;
  if (at + kf > h) fail_msg("'%s' is not in the header", from);
  const uint64_t nh = h - kf + kt;
  *n_out = n - kf + kt;
  unsigned char *out = malloc(*n_out);
  assert_non_null(out);
  for (int i = 0; i < 8; i++)
    out[i] = (unsigned char)(nh >> (8 * i));
  memcpy(out + 8, b + 8, at);
  memcpy(out + 8 + at, to, kt);
  memcpy(out + 8 + at + kt, b + 8 + at + kf, n - 8 - at - kf);
  return out;
}

/* Training with a changed lr and scale, saved and resumed, writes the same
 * parameters as the uninterrupted run. */
static void test_lr_resume_bit_exact(void **state) {
  (void)state;
  const uint64_t hidden[1] = {5};
  prm_model *m = prmt_mlp(4, hidden, 1, PRM_ACT_GELU_TANH, 6);
  const uint64_t np = prm_model_num_params(m);
  prm_ctx *c = prmt_ctx(m, 8, 0);
  prm_optimizer *opt = make_opt(m, PRM_OPT_ADAMW, PRM_SCHED_COSINE, 1e-2, 1e-4);
  prmt_rng r = {31};
  float x[10][32];
  for (int i = 0; i < 10; i++)
    prmt_fill_normal(&r, x[i], 32, 1.0);
  for (int i = 0; i < 3; i++) {
    prm_batch b = prmt_batch(x[i], 8, 4);
    assert_int_equal(prm_train_step(c, opt, &b, NULL, NULL), PRM_OK);
  }
  /* a scale of 1 keeps the state at version 1, byte for byte as 0.3 wrote it */
  size_t n1;
  unsigned char *v1 = save_state(opt, &n1);
  assert_true(header_has(v1, n1, "\"optimizer_version\":\"1\""));
  assert_false(header_has(v1, n1, "lr_scale"));
  assert_int_equal(prm_optimizer_set_lr(opt, 2e-2), PRM_OK);
  assert_int_equal(prm_optimizer_set_lr_scale(opt, 0.7), PRM_OK);
  size_t nm, no;
  assert_int_equal(prm_model_save_buffer(m, NULL, 0, &nm), PRM_OK);
  unsigned char *mb = malloc(nm);
  assert_non_null(mb);
  assert_int_equal(prm_model_save_buffer(m, mb, nm, &nm), PRM_OK);
  unsigned char *ob = save_state(opt, &no);
  assert_true(header_has(ob, no, "\"optimizer_version\":\"2\""));
  assert_true(header_has(ob, no, "\"lr_scale\":\"0.69999999999999996\""));
  assert_true(header_has(ob, no, "\"lr\":\"0.02\""));
  for (int i = 3; i < 10; i++) {
    prm_batch b = prmt_batch(x[i], 8, 4);
    assert_int_equal(prm_train_step(c, opt, &b, NULL, NULL), PRM_OK);
  }
  /* resume */
  prm_model *m2 = NULL;
  prm_optimizer *o2 = NULL;
  assert_int_equal(prm_model_load_buffer(&m2, mb, nm), PRM_OK);
  assert_int_equal(prm_optimizer_load_buffer(&o2, m2, ob, no), PRM_OK);
  assert_true(prm_optimizer_lr_scale(o2) == 0.7);
  prm_ctx *c2 = prmt_ctx(m2, 8, 0);
  for (int i = 3; i < 10; i++) {
    prm_batch b = prmt_batch(x[i], 8, 4);
    assert_int_equal(prm_train_step(c2, o2, &b, NULL, NULL), PRM_OK);
  }
  assert_memory_equal(prm_model_params(m, NULL), prm_model_params(m2, NULL), np * sizeof(float));
  assert_true(prm_optimizer_lr(o2) == prm_optimizer_lr(opt));
  /* a re-save of the loaded state is the same bytes */
  size_t nr;
  prm_optimizer *o3 = NULL;
  assert_int_equal(prm_optimizer_load_buffer(&o3, m2, ob, no), PRM_OK);
  unsigned char *rb = save_state(o3, &nr);
  assert_int_equal(nr, no);
  assert_memory_equal(rb, ob, no);
  prm_optimizer_free(o3);
  free(rb);

  /* a version-1 state loads with scale 1 */
  assert_int_equal(prm_optimizer_load_buffer(&o3, m2, v1, n1), PRM_OK);
  assert_true(prm_optimizer_lr_scale(o3) == 1.0);
  prm_optimizer_free(o3);
  /* malformed scales */
  size_t nb;
  unsigned char *bad = rewrite_header(ob, no, "\"lr_scale\"", "\"lr_scalE\"", &nb);
  ASSERT_FAIL_MSG(prm_optimizer_load_buffer(&o3, m2, bad, nb), PRM_ERR_FORMAT, prm_model_errmsg(m2),
                  "lacks 'lr_scale'");
  free(bad);
  bad = rewrite_header(ob, no, "\"lr_scale\":\"", "\"lr_scale\":\"-", &nb);
  ASSERT_FAIL_MSG(prm_optimizer_load_buffer(&o3, m2, bad, nb), PRM_ERR_FORMAT, prm_model_errmsg(m2),
                  "lr_scale rejected");
  free(bad);
  bad =
      rewrite_header(ob, no, "\"lr_scale\":\"0.69999999999999996\"", "\"lr_scale\":\"1e300\"", &nb);
  ASSERT_FAIL_MSG(prm_optimizer_load_buffer(&o3, m2, bad, nb), PRM_ERR_FORMAT, prm_model_errmsg(m2),
                  "lr_scale rejected");
  free(bad);
  bad = rewrite_header(ob, no, "\"lr_scale\":\"", "\"lr_scale\":\"x", &nb);
  ASSERT_FAIL_MSG(prm_optimizer_load_buffer(&o3, m2, bad, nb), PRM_ERR_FORMAT, prm_model_errmsg(m2),
                  "lr_scale");
  free(bad);
  bad = rewrite_header(ob, no, "\"optimizer_version\":\"2\"", "\"optimizer_version\":\"3\"", &nb);
  ASSERT_FAIL_MSG(prm_optimizer_load_buffer(&o3, m2, bad, nb), PRM_ERR_UNSUPPORTED,
                  prm_model_errmsg(m2), "versions 1 to 2");
  free(bad);
  /* version 1 ignores a scale key (it has none) */
  bad = rewrite_header(ob, no, "\"optimizer_version\":\"2\"", "\"optimizer_version\":\"1\"", &nb);
  assert_int_equal(prm_optimizer_load_buffer(&o3, m2, bad, nb), PRM_OK);
  assert_true(prm_optimizer_lr_scale(o3) == 1.0);
  prm_optimizer_free(o3);
  free(bad);

  free(v1);
  free(mb);
  free(ob);
  prm_ctx_free(c);
  prm_ctx_free(c2);
  prm_optimizer_free(opt);
  prm_optimizer_free(o2);
  prm_model_free(m);
  prm_model_free(m2);
}

/* The committed optimizer states (tests/fuzz/seeds_optimizer: a byte
 * choosing the model, then a version-1 state written before lr control
 * existed) load with scale 1, and this library writes them back as
 * version 1. */
static void test_lr_old_states(void **state) {
  (void)state;
  static const char *const seeds[] = {"gpt2_adam_fresh", "gpt2_adamw", "gpt2_sgd",
                                      "mlp_adam_fresh",  "mlp_adamw",  "mlp_sgd"};
  for (size_t i = 0; i < sizeof seeds / sizeof seeds[0]; i++) {
    char path[1024];
    snprintf(path, sizeof path, "%s/../fuzz/seeds_optimizer/%s", PRM_CORPUS_DIR, seeds[i]);
    FILE *f = fopen(path, "rb");
    if (f == NULL) fail_msg("cannot open %s", path);
    unsigned char data[8192];
    const size_t size = fread(data, 1, sizeof data, f);
    fclose(f);
    assert_true(size > 1 && size < sizeof data);
    prm_model *m = fuzz_optimizer_model_new(data[0] & 1u);
    assert_non_null(m);
    assert_true(header_has(data + 1, size - 1, "\"optimizer_version\":\"1\""));
    prm_optimizer *opt = NULL;
    int rc = prm_optimizer_load_buffer(&opt, m, data + 1, size - 1);
    if (rc != PRM_OK) fail_msg("%s: %s (%s)", seeds[i], prm_status_string(rc), prm_last_errmsg());
    assert_true(prm_optimizer_lr_scale(opt) == 1.0);
    size_t n;
    unsigned char *b = save_state(opt, &n);
    assert_true(header_has(b, n, "\"optimizer_version\":\"1\""));
    assert_false(header_has(b, n, "lr_scale"));
    free(b);
    prm_optimizer_free(opt);
    prm_model_free(m);
  }
}

/* ---- accumulated evaluation -------------------------------------------------------------- */

/* a and b agree to `rel` relative to their size (exactly when both are 0). */
static void assert_close(double a, double b, double rel, const char *what) {
  const double tol = rel * fmax(fabs(a), fabs(b));
  if (!(fabs(a - b) <= tol)) fail_msg("%s: %.17g vs %.17g (tolerance %g)", what, a, b, tol);
}

static void assert_stats_close(const prm_loss_stats *a, const prm_loss_stats *b, double rel) {
  assert_close(a->loss, b->loss, rel, "loss");
  assert_close(a->accuracy, b->accuracy, rel, "accuracy");
  assert_close(a->reward_mean, b->reward_mean, rel, "reward_mean");
  assert_close(a->reward_std, b->reward_std, rel, "reward_std");
  assert_close(a->margin_mean, b->margin_mean, rel, "margin_mean");
  assert_close(a->brier, b->brier, rel, "brier");
  assert_close(a->ece, b->ece, rel, "ece");
  assert_close(a->exact_rate, b->exact_rate, rel, "exact_rate");
  assert_close(a->tie_prob_tied, b->tie_prob_tied, rel, "tie_prob_tied");
  assert_close(a->tie_prob_untied, b->tie_prob_untied, rel, "tie_prob_untied");
  assert_int_equal(a->n_compared, b->n_compared);
  assert_int_equal(a->n_tied, b->n_tied);
}

#define EV_P 40    /* pairs in the set */
#define EV_D 6     /* features */
#define EV_ROWS 24 /* context rows: the set does not fit one batch */

/* A pair set: chosen rows then rejected rows, with every option array. */
typedef struct pair_set {
  float x[2 * EV_P * EV_D]; /* chosen block, then rejected block */
  float label[EV_P], weight[EV_P], margin[EV_P];
  uint8_t tie[EV_P];
} pair_set;

static void make_pair_set(pair_set *ps, uint64_t seed) {
  prmt_rng r = {seed};
  prmt_fill_normal(&r, ps->x, 2 * EV_P * EV_D, 1.0);
  for (int i = 0; i < EV_P; i++) {
    ps->label[i] = (float)prmt_uniform(&r);
    ps->weight[i] = (float)(2.0 * prmt_uniform(&r));
    ps->margin[i] = (float)(prmt_uniform(&r) - 0.5);
    ps->tie[i] = prmt_uniform(&r) < 0.25;
  }
  /* an equal pair (accuracy counts it 1/2) */
  memcpy(ps->x + (size_t)(EV_P + 3) * EV_D, ps->x + 3 * EV_D, EV_D * sizeof(float));
  ps->tie[3] = 0;
}

/* Rows [i0, i0 + n) of the set's pairs as one pair batch in buf. */
static prm_batch pair_chunk(const pair_set *ps, int i0, int n, float *buf) {
  memcpy(buf, ps->x + (size_t)i0 * EV_D, (size_t)n * EV_D * sizeof(float));
  memcpy(buf + (size_t)n * EV_D, ps->x + (size_t)(EV_P + i0) * EV_D,
         (size_t)n * EV_D * sizeof(float));
  return prmt_batch(buf, 2 * (uint64_t)n, EV_D);
}

static prm_loss_options pair_options(const pair_set *ps, int i0, int tie_model) {
  prm_loss_options o = PRM_LOSS_OPTIONS_INIT;
  o.label = ps->label + i0;
  o.weight = ps->weight + i0;
  o.margin = ps->margin + i0;
  o.center_coef = 0.01;
  if (tie_model != PRM_TIE_NONE) {
    o.tie_model = tie_model;
    o.tie_param = tie_model == PRM_TIE_DAVIDSON ? 0.6 : 1.7;
    o.tie = ps->tie + i0;
  }
  return o;
}

static void test_eval_accum_pairs(void **state) {
  (void)state;
  const uint64_t hidden[1] = {8};
  prm_model *m = prmt_mlp(EV_D, hidden, 1, PRM_ACT_GELU_TANH, 12);
  prm_ctx *c = prmt_ctx(m, EV_ROWS, 1);
  pair_set ps;
  make_pair_set(&ps, 99);
  const int chunks[] = {7, 1, 12, 10, 10}; /* 40 pairs */
  static const int tie_models[] = {PRM_TIE_NONE, PRM_TIE_DAVIDSON, PRM_TIE_RAO_KUPPER};
  for (int tmi = 0; tmi < 3; tmi++) {
    const int tm = tie_models[tmi];
    prm_eval_accum acc;
    assert_int_equal(prm_eval_accum_init(&acc, PRM_EVAL_ACCUM_VERSION), PRM_OK);
    float rc[EV_P], rr[EV_P], buf[EV_ROWS * EV_D], sc[EV_ROWS];
    int i0 = 0;
    for (size_t k = 0; k < sizeof chunks / sizeof chunks[0]; k++) {
      const int n = chunks[k];
      prm_batch b = pair_chunk(&ps, i0, n, buf);
      /* the scores this chunk gets, for the one-batch reference */
      assert_int_equal(prm_ctx_forward(c, &b, sc, EV_ROWS), PRM_OK);
      memcpy(rc + i0, sc, (size_t)n * sizeof(float));
      memcpy(rr + i0, sc + n, (size_t)n * sizeof(float));
      const prm_loss_options o = pair_options(&ps, i0, tm);
      assert_int_equal(prm_evaluate_accum(c, &b, &o, &acc), PRM_OK);
      assert_int_equal(acc.kind, PRM_EVAL_PAIRS);
      i0 += n;
      assert_int_equal(acc.n_units, (uint64_t)i0);
    }
    /* the reference: every pair as one batch of the pure loss */
    const prm_loss_options all = pair_options(&ps, 0, tm);
    prm_loss_stats ref = PRM_LOSS_STATS_INIT, got = PRM_LOSS_STATS_INIT;
    assert_int_equal(prm_loss_bt(rc, rr, EV_P, &all, NULL, &ref, NULL, NULL), PRM_OK);
    assert_int_equal(prm_eval_accum_stats(&acc, &got), PRM_OK);
    assert_stats_close(&got, &ref, 1e-12);
    assert_int_equal(acc.n_rewards, 2 * EV_P);
    assert_int_equal(acc.n_compared + acc.n_tied, EV_P);
    if (tm != PRM_TIE_NONE) assert_true(ref.n_tied > 0 && ref.tie_prob_tied > 0.0);
    assert_true(ref.accuracy != floor(ref.accuracy * ref.n_compared) / ref.n_compared); /* a 1/2 */

    /* one batch accumulated alone equals prm_evaluate's statistics: every
     * field bit for bit but the loss, (loss * P) / P */
    prm_eval_accum one = PRM_EVAL_ACCUM_INIT;
    prm_batch b = pair_chunk(&ps, 5, 12, buf);
    const prm_loss_options o = pair_options(&ps, 5, tm);
    prm_loss_stats ev = PRM_LOSS_STATS_INIT, st = PRM_LOSS_STATS_INIT;
    assert_int_equal(prm_evaluate(c, &b, &o, &ev), PRM_OK);
    assert_int_equal(prm_evaluate_accum(c, &b, &o, &one), PRM_OK);
    assert_int_equal(prm_eval_accum_stats(&one, &st), PRM_OK);
    assert_close(st.loss, ev.loss, 1e-15, "single-batch loss");
    st.loss = ev.loss;
    assert_memory_equal(&st, &ev, sizeof st);
  }
  prm_ctx_free(c);
  prm_model_free(m);
}

/* The same set through a training context as one prm_evaluate of all its
 * rows: the forward of a larger batch may round differently (BLAS), so
 * only to float precision. */
static void test_eval_accum_matches_one_evaluate(void **state) {
  (void)state;
  prm_model *m = prmt_linear(EV_D, 13);
  prm_ctx *big = prmt_ctx(m, 2 * EV_P, 0), *small = prmt_ctx(m, 16, 0);
  pair_set ps;
  make_pair_set(&ps, 7);
  float buf[16 * EV_D];
  prm_eval_accum acc = PRM_EVAL_ACCUM_INIT;
  for (int i0 = 0; i0 < EV_P; i0 += 8) {
    prm_batch b = pair_chunk(&ps, i0, 8, buf);
    const prm_loss_options o = pair_options(&ps, i0, PRM_TIE_NONE);
    assert_int_equal(prm_evaluate_accum(small, &b, &o, &acc), PRM_OK);
  }
  prm_batch whole = prmt_batch(ps.x, 2 * EV_P, EV_D);
  const prm_loss_options o = pair_options(&ps, 0, PRM_TIE_NONE);
  prm_loss_stats ref = PRM_LOSS_STATS_INIT, got = PRM_LOSS_STATS_INIT;
  assert_int_equal(prm_evaluate(big, &whole, &o, &ref), PRM_OK);
  assert_int_equal(prm_eval_accum_stats(&acc, &got), PRM_OK);
  assert_stats_close(&got, &ref, 1e-5);
  prm_ctx_free(big);
  prm_ctx_free(small);
  prm_model_free(m);
}

static void test_eval_accum_groups(void **state) {
  (void)state;
  const uint64_t hidden[1] = {8};
  prm_model *m = prmt_mlp(EV_D, hidden, 1, PRM_ACT_TANH, 14);
  prm_ctx *c = prmt_ctx(m, EV_ROWS, 0);
  enum { G = 12 };
  const int32_t sizes[G] = {2, 5, 3, 3, 4, 2, 6, 2, 3, 4, 2, 3}; /* 39 rows */
  float weight[G], x[39 * EV_D], sc[39], buf[EV_ROWS];
  prmt_rng r = {5};
  prmt_fill_normal(&r, x, 39 * EV_D, 1.0);
  for (int g = 0; g < G; g++)
    weight[g] = (float)(0.5 + prmt_uniform(&r));
  const int cuts[] = {0, 3, 4, 8, 12}; /* group ranges of the chunks */
  for (int pl = 0; pl < 2; pl++) {
    prm_eval_accum acc;
    assert_int_equal(prm_eval_accum_init(&acc, 1), PRM_OK);
    int row = 0;
    for (int k = 0; k + 1 < 5; k++) {
      int rows = 0;
      for (int g = cuts[k]; g < cuts[k + 1]; g++)
        rows += sizes[g];
      prm_batch b = prmt_batch(x + (size_t)row * EV_D, (uint64_t)rows, EV_D);
      assert_int_equal(prm_ctx_forward(c, &b, buf, EV_ROWS), PRM_OK);
      memcpy(sc + row, buf, (size_t)rows * sizeof(float));
      prm_rank_options ro = PRM_RANK_OPTIONS_INIT;
      ro.loss = pl ? PRM_RANK_PLACKETT_LUCE : PRM_RANK_PAIRWISE;
      ro.weight = weight + cuts[k];
      assert_int_equal(prm_evaluate_groups_accum(c, &b, sizes + cuts[k],
                                                 (uint64_t)(cuts[k + 1] - cuts[k]), &ro, &acc),
                       PRM_OK);
      row += rows;
    }
    assert_int_equal(acc.kind, PRM_EVAL_GROUPS);
    assert_int_equal(acc.n_units, G);
    assert_int_equal(acc.n_rewards, 39);
    prm_rank_options ro = PRM_RANK_OPTIONS_INIT;
    ro.loss = pl ? PRM_RANK_PLACKETT_LUCE : PRM_RANK_PAIRWISE;
    ro.weight = weight;
    prm_loss_stats ref = PRM_LOSS_STATS_INIT, got = PRM_LOSS_STATS_INIT;
    assert_int_equal(prm_loss_rank(sc, 39, sizes, G, &ro, NULL, &ref, NULL), PRM_OK);
    assert_int_equal(prm_eval_accum_stats(&acc, &got), PRM_OK);
    assert_stats_close(&got, &ref, 1e-12);
    assert_int_equal(got.n_tied, 0);
  }
  prm_ctx_free(c);
  prm_model_free(m);
}

/* Rewards on a big common offset: the merged spread keeps its digits where
 * sums of squares would cancel. */
static void test_eval_accum_reward_spread(void **state) {
  (void)state;
  prm_model *m = prmt_linear(1, 15);
  uint32_t head = 0;
  assert_int_equal(prm_model_find_tensor(m, "score.weight", &head), PRM_OK);
  const float one = 1.0f;
  assert_int_equal(prm_model_write_tensor(m, head, &one, 1), PRM_OK); /* r = x */
  prm_ctx *c = prmt_ctx(m, 8, 1);
  float x[64], rc[32], rr[32];
  for (int i = 0; i < 32; i++) {
    rc[i] = x[i] = 1e6f + (float)(i % 5);
    rr[i] = x[32 + i] = 1e6f - (float)(i % 3);
  }
  prm_eval_accum acc = PRM_EVAL_ACCUM_INIT;
  float buf[8];
  for (int i0 = 0; i0 < 32; i0 += 4) {
    memcpy(buf, x + i0, 4 * sizeof(float));
    memcpy(buf + 4, x + 32 + i0, 4 * sizeof(float));
    prm_batch b = prmt_batch(buf, 8, 1);
    assert_int_equal(prm_evaluate_accum(c, &b, NULL, &acc), PRM_OK);
  }
  prm_loss_stats ref = PRM_LOSS_STATS_INIT, got = PRM_LOSS_STATS_INIT;
  assert_int_equal(prm_loss_bt(rc, rr, 32, NULL, NULL, &ref, NULL, NULL), PRM_OK);
  assert_int_equal(prm_eval_accum_stats(&acc, &got), PRM_OK);
  assert_stats_close(&got, &ref, 1e-12);
  assert_true(got.reward_std > 1.0 && got.reward_std < 3.0);
  prm_ctx_free(c);
  prm_model_free(m);
}

static void test_eval_accum_errors(void **state) {
  (void)state;
  prm_model *m = prmt_linear(EV_D, 16);
  prm_ctx *c = prmt_ctx(m, 8, 0);
  pair_set ps;
  make_pair_set(&ps, 3);
  float buf[8 * EV_D];
  prm_batch b = pair_chunk(&ps, 0, 4, buf);
  prm_eval_accum acc = PRM_EVAL_ACCUM_INIT, snap;

  /* init: the macro and the function agree; versions */
  prm_eval_accum fn;
  memset(&fn, 0xab, sizeof fn);
  assert_int_equal(prm_eval_accum_init(&fn, PRM_EVAL_ACCUM_VERSION), PRM_OK);
  assert_memory_equal(&fn, &acc, sizeof fn);
  ASSERT_FAILS(prm_eval_accum_init(NULL, 1), PRM_ERR_NULL);
  ASSERT_FAILS(prm_eval_accum_init(&fn, 0), PRM_ERR_VERSION);
  ASSERT_FAILS(prm_eval_accum_init(&fn, 2), PRM_ERR_VERSION);

  /* stats of nothing */
  prm_loss_stats st = PRM_LOSS_STATS_INIT, keep;
  st.loss = 42.0;
  keep = st;
  ASSERT_FAILS(prm_eval_accum_stats(&acc, &st), PRM_ERR_STATE);
  ASSERT_MSG_IS(prm_last_errmsg(), "empty");
  ASSERT_FAILS(prm_eval_accum_stats(NULL, &st), PRM_ERR_NULL);
  ASSERT_FAILS(prm_eval_accum_stats(&acc, NULL), PRM_ERR_NULL);

  /* prm_evaluate_accum: every argument, acc unchanged, messages in ctx */
  assert_int_equal(prm_evaluate_accum(c, &b, NULL, &acc), PRM_OK);
  snap = acc;
  ASSERT_FAILS(prm_evaluate_accum(NULL, &b, NULL, &acc), PRM_ERR_NULL);
  ASSERT_FAIL_MSG(prm_evaluate_accum(c, NULL, NULL, &acc), PRM_ERR_NULL, prm_ctx_errmsg(c),
                  "pairs is NULL");
  ASSERT_FAIL_MSG(prm_evaluate_accum(c, &b, NULL, NULL), PRM_ERR_NULL, prm_ctx_errmsg(c),
                  "acc is NULL");
  prm_batch odd = b;
  odd.n = 7;
  ASSERT_FAIL_MSG(prm_evaluate_accum(c, &odd, NULL, &acc), PRM_ERR_SIZE, prm_ctx_errmsg(c),
                  "even number");
  prm_loss_options bad = PRM_LOSS_OPTIONS_INIT;
  const float labels[4] = {0.5f, 2.0f, 0.5f, 0.5f};
  bad.label = labels;
  ASSERT_FAIL_MSG(prm_evaluate_accum(c, &b, &bad, &acc), PRM_ERR_INVALID, prm_ctx_errmsg(c),
                  "label[1]");
  prm_eval_accum wrong = acc;
  wrong.version = 3;
  ASSERT_FAIL_MSG(prm_evaluate_accum(c, &b, NULL, &wrong), PRM_ERR_VERSION, prm_ctx_errmsg(c),
                  "acc: version 3");
  wrong = acc;
  wrong.kind = 9;
  ASSERT_FAIL_MSG(prm_evaluate_accum(c, &b, NULL, &wrong), PRM_ERR_INVALID, prm_ctx_errmsg(c),
                  "acc->kind = 9");
  buf[5] = NAN;
  ASSERT_FAIL_MSG(prm_evaluate_accum(c, &b, NULL, &acc), PRM_ERR_NONFINITE, prm_ctx_errmsg(c),
                  "NaN");
  buf[5] = 0.5f;
  assert_memory_equal(&acc, &snap, sizeof acc);

  /* pairs and groups do not mix, either way */
  const int32_t sizes[2] = {3, 5};
  ASSERT_FAIL_MSG(prm_evaluate_groups_accum(c, &b, sizes, 2, NULL, &acc), PRM_ERR_MISMATCH,
                  prm_ctx_errmsg(c), "holds pair batches; group batches need another one");
  prm_eval_accum gacc = PRM_EVAL_ACCUM_INIT;
  assert_int_equal(prm_evaluate_groups_accum(c, &b, sizes, 2, NULL, &gacc), PRM_OK);
  prm_eval_accum gsnap = gacc;
  ASSERT_FAIL_MSG(prm_evaluate_accum(c, &b, NULL, &gacc), PRM_ERR_MISMATCH, prm_ctx_errmsg(c),
                  "holds group batches; pair batches need another one");
  ASSERT_FAILS(prm_evaluate_groups_accum(NULL, &b, sizes, 2, NULL, &gacc), PRM_ERR_NULL);
  ASSERT_FAIL_MSG(prm_evaluate_groups_accum(c, NULL, sizes, 2, NULL, &gacc), PRM_ERR_NULL,
                  prm_ctx_errmsg(c), "batch is NULL");
  ASSERT_FAIL_MSG(prm_evaluate_groups_accum(c, &b, sizes, 2, NULL, NULL), PRM_ERR_NULL,
                  prm_ctx_errmsg(c), "acc is NULL");
  const int32_t short_sizes[2] = {3, 4};
  ASSERT_FAIL_MSG(prm_evaluate_groups_accum(c, &b, short_sizes, 2, NULL, &gacc), PRM_ERR_SIZE,
                  prm_ctx_errmsg(c), "7 rows but there are 8");
  prm_rank_options ro = PRM_RANK_OPTIONS_INIT;
  ro.loss = 7;
  ASSERT_FAIL_MSG(prm_evaluate_groups_accum(c, &b, sizes, 2, &ro, &gacc), PRM_ERR_INVALID,
                  prm_ctx_errmsg(c), "loss 7");
  wrong = gacc;
  wrong.kind = -1;
  ASSERT_FAIL_MSG(prm_evaluate_groups_accum(c, &b, sizes, 2, NULL, &wrong), PRM_ERR_INVALID,
                  prm_ctx_errmsg(c), "kind = -1");
  buf[0] = INFINITY;
  ASSERT_FAIL_MSG(prm_evaluate_groups_accum(c, &b, sizes, 2, NULL, &gacc), PRM_ERR_NONFINITE,
                  prm_ctx_errmsg(c), "Inf");
  buf[0] = 0.25f;
  assert_memory_equal(&gacc, &gsnap, sizeof gacc);

  /* a pending forward survives argument errors, as for prm_evaluate */
  float s[8], ds[8] = {1, 1, 1, 1, -1, -1, -1, -1};
  assert_int_equal(prm_ctx_forward(c, &b, s, 8), PRM_OK);
  assert_int_equal(prm_evaluate_accum(c, &odd, NULL, &acc), PRM_ERR_SIZE);
  assert_int_equal(prm_evaluate_accum(c, &b, NULL, &gacc), PRM_ERR_MISMATCH);
  assert_int_equal(prm_ctx_backward(c, ds, 8), PRM_OK);
  /* and a successful one consumes it */
  assert_int_equal(prm_ctx_forward(c, &b, s, 8), PRM_OK);
  assert_int_equal(prm_evaluate_accum(c, &b, NULL, &acc), PRM_OK);
  assert_int_equal(prm_ctx_backward(c, ds, 8), PRM_ERR_STATE);

  /* prm_eval_accum_stats: versions, kinds, contradictory counts; out kept */
  st = keep;
  wrong = acc;
  wrong.version = 0;
  ASSERT_FAILS(prm_eval_accum_stats(&wrong, &st), PRM_ERR_VERSION);
  prm_loss_stats v9 = keep;
  v9.version = 9;
  ASSERT_FAILS(prm_eval_accum_stats(&acc, &v9), PRM_ERR_VERSION);
  wrong = acc;
  wrong.kind = 3;
  ASSERT_FAILS(prm_eval_accum_stats(&wrong, &st), PRM_ERR_INVALID);
  ASSERT_MSG_IS(prm_last_errmsg(), "acc->kind = 3");
  wrong = acc;
  wrong.n_rewards++;
  ASSERT_FAILS(prm_eval_accum_stats(&wrong, &st), PRM_ERR_INVALID);
  ASSERT_MSG_IS(prm_last_errmsg(), "contradict");
  wrong = acc;
  wrong.n_units = 0;
  ASSERT_FAILS(prm_eval_accum_stats(&wrong, &st), PRM_ERR_INVALID);
  wrong = gacc;
  wrong.n_compared = 1;
  ASSERT_FAILS(prm_eval_accum_stats(&wrong, &st), PRM_ERR_INVALID);
  assert_memory_equal(&st, &keep, sizeof st);
  /* a version-1 struct gets its fields only */
  struct {
    prm_loss_stats s;
    char guard[64];
  } v1;
  memset(&v1, 0x5a, sizeof v1);
  v1.s.version = 1;
  assert_int_equal(prm_eval_accum_stats(&acc, &v1.s), PRM_OK);
  assert_int_equal(v1.s.version, 1);
  const unsigned char *tail = (const unsigned char *)&v1.s + offsetof(prm_loss_stats, brier);
  for (size_t k = 0; k < sizeof v1.s - offsetof(prm_loss_stats, brier); k++)
    assert_int_equal(tail[k], 0x5a);
  assert_true(v1.s.loss > 0.0);
  prm_ctx_free(c);
  prm_model_free(m);
}

/* What bindings hard-code: pinned enum values and the LP64 layout. */
static void test_eval_accum_abi(void **state) {
  (void)state;
  assert_int_equal(PRM_EVAL_EMPTY, 0);
  assert_int_equal(PRM_EVAL_PAIRS, 1);
  assert_int_equal(PRM_EVAL_GROUPS, 2);
  assert_int_equal(PRM_EVAL_ACCUM_VERSION, 1);
  assert_int_equal(PRM_EVAL_CALIB_BINS, 10);
  if (sizeof(void *) != 8) skip();
  assert_int_equal(sizeof(prm_eval_accum), 272);
  assert_int_equal(offsetof(prm_eval_accum, kind), 4);
  assert_int_equal(offsetof(prm_eval_accum, n_units), 8);
  assert_int_equal(offsetof(prm_eval_accum, loss_sum), 16);
  assert_int_equal(offsetof(prm_eval_accum, n_rewards), 24);
  assert_int_equal(offsetof(prm_eval_accum, reward_m2), 40);
  assert_int_equal(offsetof(prm_eval_accum, n_compared), 48);
  assert_int_equal(offsetof(prm_eval_accum, brier_sum), 72);
  assert_int_equal(offsetof(prm_eval_accum, calib_p), 80);
  assert_int_equal(offsetof(prm_eval_accum, calib_y), 160);
  assert_int_equal(offsetof(prm_eval_accum, n_exact), 240);
  assert_int_equal(offsetof(prm_eval_accum, tie_prob_untied_sum), 264);
}

/* ---- gathering token sequences ----------------------------------------------------------- */

static void test_tokens_gather(void **state) {
  (void)state;
  const int32_t s0[] = {3, 1, 4, 1, 5}, s1[] = {9}, s2[] = {2, 6, 5, 3, 5, 8, 9};
  const int32_t *const seqs[3] = {s0, s1, s2};
  const int32_t lengths[3] = {5, 1, 7};
  int32_t dst[3 * 8];
  assert_int_equal(prm_tokens_gather(dst, 8, 3, seqs, lengths, -1), PRM_OK);
  const int32_t want[3 * 8] = {3,  1,  4,  1,  5, -1, -1, -1, 9, -1, -1, -1,
                               -1, -1, -1, -1, 2, 6,  5,  3,  5, 8,  9,  -1};
  assert_memory_equal(dst, want, sizeof want);
  /* exactly full rows */
  int32_t tight[7];
  assert_int_equal(prm_tokens_gather(tight, 7, 1, seqs + 2, lengths + 2, 0), PRM_OK);
  assert_memory_equal(tight, s2, sizeof s2);
  assert_int_equal(prm_tokens_gather(NULL, 0, 0, NULL, NULL, 0), PRM_OK); /* nothing to do */

  /* the gathered batch scores as a hand-built one */
  prm_model *m = prmt_gpt2(11, 8, 8, 2, 2, 21);
  prm_ctx *c = prmt_tok_ctx(m, 3, 0, 1);
  assert_int_equal(prm_tokens_gather(dst, prm_ctx_max_len(c), 3, seqs, lengths, 0), PRM_OK);
  prm_batch b = prmt_tok_batch(dst, lengths, 3, 8);
  float sa[3], sb[3];
  assert_int_equal(prm_ctx_forward(c, &b, sa, 3), PRM_OK);
  int32_t manual[3 * 8] = {0};
  for (int i = 0; i < 3; i++)
    memcpy(manual + 8 * i, seqs[i], (size_t)lengths[i] * 4);
  b = prmt_tok_batch(manual, lengths, 3, 8);
  assert_int_equal(prm_ctx_forward(c, &b, sb, 3), PRM_OK);
  assert_memory_equal(sa, sb, sizeof sa);
  prm_ctx_free(c);
  prm_model_free(m);

  /* every error: the status, a message naming the row, dst untouched */
  int32_t guard[3 * 8];
  for (int i = 0; i < 24; i++)
    guard[i] = 77;
  memcpy(dst, guard, sizeof dst);
  ASSERT_FAILS(prm_tokens_gather(NULL, 8, 3, seqs, lengths, 0), PRM_ERR_NULL);
  ASSERT_MSG_IS(prm_last_errmsg(), "dst is NULL");
  ASSERT_FAILS(prm_tokens_gather(dst, 8, 3, NULL, lengths, 0), PRM_ERR_NULL);
  ASSERT_MSG_IS(prm_last_errmsg(), "seqs is NULL");
  ASSERT_FAILS(prm_tokens_gather(dst, 8, 3, seqs, NULL, 0), PRM_ERR_NULL);
  ASSERT_MSG_IS(prm_last_errmsg(), "lengths is NULL");
  ASSERT_FAILS(prm_tokens_gather(dst, 0, 3, seqs, lengths, 0), PRM_ERR_SIZE);
  ASSERT_MSG_IS(prm_last_errmsg(), "stride is 0");
  ASSERT_FAILS(prm_tokens_gather(dst, 6, 3, seqs, lengths, 0), PRM_ERR_SIZE);
  ASSERT_MSG_IS(prm_last_errmsg(), "lengths[2] = 7 not in [1, 6]");
  const int32_t zero_len[3] = {5, 0, 7}, neg_len[3] = {-2, 1, 7};
  ASSERT_FAILS(prm_tokens_gather(dst, 8, 3, seqs, zero_len, 0), PRM_ERR_SIZE);
  ASSERT_MSG_IS(prm_last_errmsg(), "lengths[1] = 0");
  ASSERT_FAILS(prm_tokens_gather(dst, 8, 3, seqs, neg_len, 0), PRM_ERR_SIZE);
  ASSERT_MSG_IS(prm_last_errmsg(), "lengths[0] = -2");
  const int32_t *const holes[3] = {s0, NULL, s2};
  ASSERT_FAILS(prm_tokens_gather(dst, 8, 3, holes, lengths, 0), PRM_ERR_NULL);
  ASSERT_MSG_IS(prm_last_errmsg(), "seqs[1] is NULL");
  ASSERT_FAILS(prm_tokens_gather(dst, UINT64_MAX / 2, 3, seqs, lengths, 0), PRM_ERR_SIZE);
  ASSERT_MSG_IS(prm_last_errmsg(), "address space");
  ASSERT_FAILS(prm_tokens_gather(dst, 8, UINT64_MAX / 8, seqs, lengths, 0), PRM_ERR_SIZE);
  assert_memory_equal(dst, guard, sizeof dst);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_model_errmsg_rule),
      cmocka_unit_test(test_ctx_and_optimizer_errmsg_rule),
      cmocka_unit_test(test_shared_model_errmsg_threads),
      cmocka_unit_test(test_shared_optimizer_errmsg_threads),
      cmocka_unit_test(test_not_a_safetensors_file),
      cmocka_unit_test(test_size_getters),
      cmocka_unit_test(test_model_copy_in_out),
      cmocka_unit_test(test_ctx_grad_copy_in_out),
      cmocka_unit_test(test_lr_control),
      cmocka_unit_test(test_lr_resume_bit_exact),
      cmocka_unit_test(test_lr_old_states),
      cmocka_unit_test(test_eval_accum_pairs),
      cmocka_unit_test(test_eval_accum_matches_one_evaluate),
      cmocka_unit_test(test_eval_accum_groups),
      cmocka_unit_test(test_eval_accum_reward_spread),
      cmocka_unit_test(test_eval_accum_errors),
      cmocka_unit_test(test_eval_accum_abi),
      cmocka_unit_test(test_tokens_gather),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
