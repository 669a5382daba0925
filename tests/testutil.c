#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
/* cmocka.h needs the three headers above first */
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#if defined(__GLIBC__)
#include <malloc.h>
#endif

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
  for (size_t i = 0; i < n; i++)
    x[i] = (float)(scale * prmt_normal(r));
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
  for (uint32_t i = 0; i < n_hidden; i++)
    o.hidden[i] = hidden[i];
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

/* ---- token models (gpt2, llama) ----------------------------------------- */

void prmt_perturb_tensors(prm_model *m, const char *part, uint64_t seed, double a) {
  float *p = prm_model_params(m, NULL);
  prmt_rng r = {seed};
  for (uint32_t t = 0; t < prm_model_num_tensors(m); t++) {
    const char *name;
    uint64_t off, shape[2];
    uint32_t nd;
    assert_int_equal(prm_model_tensor_info(m, t, &name, &off, &nd, shape), PRM_OK);
    if (strstr(name, part) == NULL) continue;
    prmt_add_uniform(&r, p + off, nd == 2 ? shape[0] * shape[1] : shape[0], a);
  }
}

void prmt_fill_tokens(prmt_rng *r, int32_t *tokens, const int32_t *lengths, uint64_t n,
                      uint64_t stride, uint64_t V, int32_t pad) {
  for (uint64_t i = 0; i < n; i++)
    for (uint64_t t = 0; t < stride; t++)
      tokens[i * stride + t] = (int32_t)t < lengths[i] ? (int32_t)(prmt_next(r) % V) : pad;
}

void prmt_forward_ok(prm_ctx *c, const prm_batch *b, float *scores) {
  int rc = prm_ctx_forward(c, b, scores, b->n);
  if (rc != PRM_OK) fail_msg("prm_ctx_forward: %s (%s)", prm_status_string(rc), prm_ctx_errmsg(c));
}

prm_optimizer *prmt_adamw(prm_model *m, double lr) {
  prm_optimizer_options o;
  assert_int_equal(prm_optimizer_options_init(&o, PRM_OPTIMIZER_OPTIONS_VERSION), PRM_OK);
  o.algorithm = PRM_OPT_ADAMW;
  o.lr = lr;
  o.weight_decay = 0.01;
  prm_optimizer *opt = NULL;
  int rc = prm_optimizer_new(&opt, m, &o);
  if (rc != PRM_OK)
    fail_msg("prm_optimizer_new: %s (%s)", prm_status_string(rc), prm_last_errmsg());
  return opt;
}

uint64_t prmt_tensor_offset(const prm_model *m, const char *want) {
  for (uint32_t t = 0; t < prm_model_num_tensors(m); t++) {
    const char *name;
    uint64_t off;
    assert_int_equal(prm_model_tensor_info(m, t, &name, &off, NULL, NULL), PRM_OK);
    if (strcmp(name, want) == 0) return off;
  }
  fail_msg("no tensor named %s", want);
  return 0;
}

void prmt_score_and_grad(prm_ctx *c, const prm_batch *b, const float *g, float *s, float *grads) {
  uint64_t ng;
  assert_int_equal(prm_ctx_zero_grad(c), PRM_OK);
  prmt_forward_ok(c, b, s);
  assert_int_equal(prm_ctx_backward(c, g, b->n), PRM_OK);
  const float *gr = prm_ctx_grads(c, &ng);
  memcpy(grads, gr, ng * sizeof(float));
}

double prmt_weighted_sum(prm_ctx *ci, const prm_batch *b, const float *g) {
  float s[PRMT_FD_MAX_ROWS];
  assert_true(b->n <= PRMT_FD_MAX_ROWS);
  prmt_forward_ok(ci, b, s);
  double l = 0.0;
  for (uint64_t i = 0; i < b->n; i++)
    l += (double)g[i] * s[i];
  return l;
}

double prmt_ws_loss(void *arg) {
  prmt_ws *w = arg;
  return prmt_weighted_sum(w->ci, w->b, w->g);
}

void prmt_check_fd(prm_model *m, const float *an, double (*loss)(void *), void *arg, uint64_t every,
                   const char *what, double *worst_elem, double *worst_norm) {
  const char *pre = what != NULL ? what : "", *sep = what != NULL ? ": " : "";
  float *p = prm_model_params(m, NULL);
  double worst_all = 0.0, worst_n = 0.0;
  for (uint32_t t = 0; t < prm_model_num_tensors(m); t++) {
    const char *name;
    uint64_t off, shape[2];
    uint32_t nd;
    assert_int_equal(prm_model_tensor_info(m, t, &name, &off, &nd, shape), PRM_OK);
    const uint64_t numel = nd == 2 ? shape[0] * shape[1] : shape[0];
    double worst = 0.0, gmax = 0.0, dn2 = 0.0, an2 = 0.0;
    for (uint64_t j = off; j < off + numel; j += nd == 2 ? every : 1) {
      const float old = p[j];
      double l[4];
      for (int k = 0; k < 4; k++) {
        p[j] = old + (k < 2 ? PRMT_FD_H : 2 * PRMT_FD_H) * (k % 2 ? -1.0f : 1.0f);
        l[k] = loss(arg);
      }
      p[j] = old;
      const double d1 = (l[0] - l[1]) / (2.0 * (double)PRMT_FD_H);
      const double d2 = (l[2] - l[3]) / (4.0 * (double)PRMT_FD_H);
      const double fd = (4.0 * d1 - d2) / 3.0;
      const double err = fabs(fd - an[j]) / (1e-3 + fabs(fd) + fabs(an[j]));
      if (err > worst) worst = err;
      if (fabs(an[j]) > gmax) gmax = fabs(an[j]);
      dn2 += (fd - an[j]) * (fd - an[j]);
      an2 += (double)an[j] * an[j];
      if (err > PRMT_FD_TOL)
        fail_msg("%s%s%s[%llu]: analytic %.6g, finite difference %.6g (rel %.3g)", pre, sep, name,
                 (unsigned long long)(j - off), (double)an[j], fd, err);
    }
    /* a tensor whose gradient is all zero would check nothing: only rows of
     * position or token embeddings the batch never uses may be zero, never
     * a whole tensor */
    if (gmax == 0.0) fail_msg("%s%s%s: gradient identically zero", pre, sep, name);
    const double nerr = sqrt(dn2 / an2);
    if (nerr > PRMT_FD_NORM_TOL)
      fail_msg("%s%s%s: ||fd - an|| / ||an|| = %.3g > %.0e", pre, sep, name, nerr,
               PRMT_FD_NORM_TOL);
    if (nerr > worst_n) worst_n = nerr;
    if (worst > worst_all) worst_all = worst;
  }
  *worst_elem = worst_all;
  *worst_norm = worst_n;
}

prmt_snap prmt_take_snap(prm_model *m, prm_ctx *c) {
  prmt_snap s;
  const float *p = prm_model_params(m, &s.np);
  const float *g = prm_ctx_grads(c, &s.ng);
  s.params = malloc(s.np * sizeof(float));
  s.grads = malloc(s.ng * sizeof(float));
  assert_non_null(s.params);
  assert_non_null(s.grads);
  memcpy(s.params, p, s.np * sizeof(float));
  memcpy(s.grads, g, s.ng * sizeof(float));
  return s;
}

void prmt_assert_unchanged(const prmt_snap *s, prm_model *m, prm_ctx *c) {
  assert_memory_equal(s->params, prm_model_params(m, NULL), s->np * sizeof(float));
  assert_memory_equal(s->grads, prm_ctx_grads(c, NULL), s->ng * sizeof(float));
}

void prmt_free_snap(prmt_snap *s) {
  free(s->params);
  free(s->grads);
}

void prmt_check_bad_token_batches(prm_model *m) {
  enum { N = 4, S = 8 };
  const int32_t len[N] = {3, 8, 1, 5};
  int32_t tok[N * S], tok2[N * S];
  prmt_rng r = {52};
  prmt_fill_tokens(&r, tok, len, N, S, 11, 0);
  prmt_fill_tokens(&r, tok2, len, N, S, 11, 0);
  const float ds1[N] = {1.0f, -0.5f, 0.25f, 0.75f}, ds2[N] = {-1.0f, 0.5f, 2.0f, -0.25f};
  const prm_batch good = prmt_tok_batch(tok, len, N, S), good2 = prmt_tok_batch(tok2, len, N, S);

  /* the reference: forward/backward good, forward/backward good2 */
  prm_ctx *ref = prmt_tok_ctx(m, N, 8, 0);
  float s[N];
  prmt_forward_ok(ref, &good, s);
  assert_int_equal(prm_ctx_backward(ref, ds1, N), PRM_OK);
  prmt_forward_ok(ref, &good2, s);
  assert_int_equal(prm_ctx_backward(ref, ds2, N), PRM_OK);

  /* the same with every bad call in between: accumulated gradients and a
   * pending forward that must survive each failure */
  prm_ctx *c = prmt_tok_ctx(m, N, 8, 0);
  prmt_forward_ok(c, &good, s);
  assert_int_equal(prm_ctx_backward(c, ds1, N), PRM_OK);
  prmt_forward_ok(c, &good2, s);
  prmt_snap sn = prmt_take_snap(m, c);

  int32_t bt[N * S], bl[N];
  prm_batch bb;
  float out[N + 1];
#define BAD(edit, status)                                                                          \
  do {                                                                                             \
    memcpy(bt, tok, sizeof bt);                                                                    \
    memcpy(bl, len, sizeof bl);                                                                    \
    bb = prmt_tok_batch(bt, bl, N, S);                                                             \
    edit;                                                                                          \
    for (int k_ = 0; k_ <= N; k_++)                                                                \
      out[k_] = 12345.0f;                                                                          \
    ASSERT_FAILS(prm_ctx_forward(c, &bb, out, N + 1), status);                                     \
    assert_true(prm_ctx_errmsg(c)[0] != '\0');                                                     \
    for (int k_ = 0; k_ <= N; k_++)                                                                \
      assert_true(out[k_] == 12345.0f);                                                            \
    prmt_assert_unchanged(&sn, m, c);                                                              \
  } while (0)
  BAD(bt[1 * S + 2] = -1, PRM_ERR_INVALID); /* id < 0 */
  BAD(bt[3 * S + 4] = 11, PRM_ERR_INVALID); /* id == vocab (last valid position) */
  BAD(bt[0] = INT32_MAX, PRM_ERR_INVALID);  /* id >= vocab */
  BAD(bl[2] = 0, PRM_ERR_SIZE);             /* length 0 */
  BAD(bl[0] = -3, PRM_ERR_SIZE);            /* negative length */
  BAD(bl[1] = 9, PRM_ERR_SIZE);             /* > max_len (and > n_ctx) */
  BAD(bb.token_stride = 6, PRM_ERR_SIZE);   /* length 8 > token_stride 6 */
  BAD(bb.n = N + 1, PRM_ERR_SIZE);          /* more sequences than max_rows */
  BAD(bb.n = 0, PRM_ERR_SIZE);
  BAD(bb.tokens = NULL, PRM_ERR_NULL);
  BAD(bb.lengths = NULL, PRM_ERR_NULL);
  BAD(bb.version = 0, PRM_ERR_VERSION);
#undef BAD
  /* a context with a smaller max_len rejects what the model could take */
  prm_ctx *c4 = prmt_tok_ctx(m, N, 4, 0);
  ASSERT_FAILS(prm_ctx_forward(c4, &good, out, N), PRM_ERR_SIZE);
  prm_ctx_free(c4);

  /* the pending forward is still good2's: its backward gives the reference */
  assert_int_equal(prm_ctx_backward(c, ds2, N), PRM_OK);
  assert_memory_equal(prm_ctx_grads(c, NULL), prm_ctx_grads(ref, NULL), sn.ng * sizeof(float));
  prmt_free_snap(&sn);

  /* evaluate and train_step run the same checks and change nothing either */
  prm_batch bad = good;
  memcpy(bt, tok, sizeof bt);
  bt[S + 7] = 11;
  bad.tokens = bt;
  prm_loss_stats st = PRM_LOSS_STATS_INIT;
  sn = prmt_take_snap(m, c);
  ASSERT_FAILS(prm_evaluate(c, &bad, NULL, &st), PRM_ERR_INVALID);
  prmt_assert_unchanged(&sn, m, c);
  prmt_free_snap(&sn);

  prm_optimizer *opt = prmt_adamw(m, 1e-3);
  sn = prmt_take_snap(m, c);
  ASSERT_FAILS(prm_train_step(c, opt, &bad, NULL, &st), PRM_ERR_INVALID);
  assert_true(prm_ctx_errmsg(c)[0] != '\0');
  assert_int_equal(prm_optimizer_num_updates(opt), 0);
  prmt_assert_unchanged(&sn, m, c);
  prmt_free_snap(&sn);

  prm_optimizer_free(opt);
  prm_ctx_free(c);
  prm_ctx_free(ref);
}

/* ---- the counting task --------------------------------------------------- */

#define LT_PAIRS 8

static int count3(const int32_t *t, int32_t n) {
  int c = 0;
  for (int32_t i = 0; i < n; i++)
    c += t[i] == 3;
  return c;
}

static void random_seq(prmt_rng *r, int32_t *t, int32_t *len) {
  *len = 4 + (int32_t)(prmt_next(r) % (PRMT_LT_S - 3));
  /* token 3 with probability 1/4, otherwise any other id */
  for (int32_t i = 0; i < PRMT_LT_S; i++) {
    if (i >= *len) {
      t[i] = 0;
    } else if (prmt_uniform(r) < 0.25) {
      t[i] = 3;
    } else {
      int32_t v = (int32_t)(prmt_next(r) % (PRMT_LT_V - 1));
      t[i] = v >= 3 ? v + 1 : v;
    }
  }
}

/* n pairs: rows 0..n-1 chosen, n..2n-1 rejected. */
static void make_pairs(prmt_rng *r, int32_t *tok, int32_t *len, int n) {
  for (int i = 0; i < n; i++) {
    int32_t a[PRMT_LT_S], b[PRMT_LT_S], la, lb;
    do {
      random_seq(r, a, &la);
      random_seq(r, b, &lb);
    } while (count3(a, la) == count3(b, lb));
    const int a_wins = count3(a, la) > count3(b, lb);
    memcpy(tok + i * PRMT_LT_S, a_wins ? a : b, sizeof a);
    memcpy(tok + (n + i) * PRMT_LT_S, a_wins ? b : a, sizeof a);
    len[i] = a_wins ? la : lb;
    len[n + i] = a_wins ? lb : la;
  }
}

void prmt_count_task_learns(prm_model *m, int steps, double lr, uint64_t warmup,
                            double min_accuracy) {
  enum { N_TEST = 300 };
  prm_ctx *c = prmt_tok_ctx(m, 2 * LT_PAIRS, PRMT_LT_S, 0),
          *ci = prmt_tok_ctx(m, 2 * N_TEST, PRMT_LT_S, 1);
  prm_optimizer_options oo = PRM_OPTIMIZER_OPTIONS_INIT;
  oo.lr = lr;
  oo.weight_decay = 0.01;
  oo.schedule = PRM_SCHED_COSINE;
  oo.warmup_steps = warmup;
  oo.total_steps = (uint64_t)steps;
  oo.max_grad_norm = 1.0;
  prm_optimizer *opt = NULL;
  assert_int_equal(prm_optimizer_new(&opt, m, &oo), PRM_OK);
  prmt_rng r = {92};
  static int32_t test_tok[2 * N_TEST * PRMT_LT_S], test_len[2 * N_TEST];
  static int32_t tok[2 * LT_PAIRS * PRMT_LT_S], len[2 * LT_PAIRS];
  make_pairs(&r, test_tok, test_len, N_TEST);
  const prm_batch tb = prmt_tok_batch(test_tok, test_len, 2 * N_TEST, PRMT_LT_S);
  prm_loss_stats st = PRM_LOSS_STATS_INIT, ts = PRM_LOSS_STATS_INIT;
  assert_int_equal(prm_evaluate(ci, &tb, NULL, &ts), PRM_OK);
  const double acc0 = ts.accuracy;
  for (int step = 0; step < steps; step++) {
    make_pairs(&r, tok, len, LT_PAIRS); /* fresh pairs every step */
    const prm_batch b = prmt_tok_batch(tok, len, 2 * LT_PAIRS, PRMT_LT_S);
    assert_int_equal(prm_train_step(c, opt, &b, NULL, &st), PRM_OK);
  }
  assert_int_equal(prm_evaluate(ci, &tb, NULL, &ts), PRM_OK);
  print_message("    held-out accuracy %.3f -> %.3f, loss %.4f\n", acc0, ts.accuracy, ts.loss);
  assert_true(ts.accuracy >= min_accuracy);
  prm_optimizer_free(opt);
  prm_ctx_free(c);
  prm_ctx_free(ci);
}

/* ---- allocation ---------------------------------------------------------- */

void prmt_check_no_allocation(prm_model *m, const int32_t *lengths, uint64_t n, uint64_t stride,
                              uint64_t V, int steps) {
#if defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 33))
  int32_t *tok = malloc(n * stride * sizeof *tok);
  float *s = malloc(n * sizeof *s);
  assert_non_null(tok);
  assert_non_null(s);
  prmt_rng r = {102};
  prmt_fill_tokens(&r, tok, lengths, n, stride, V, 0);
  prm_ctx *c = prmt_tok_ctx(m, n, stride, 0), *ci = prmt_tok_ctx(m, n, stride, 1);
  prm_optimizer *opt = prmt_adamw(m, 1e-3);
  const prm_batch b = prmt_tok_batch(tok, lengths, n, stride);
  prm_loss_stats st = PRM_LOSS_STATS_INIT;
  assert_int_equal(prm_train_step(c, opt, &b, NULL, &st), PRM_OK);
  prmt_forward_ok(ci, &b, s);
  struct mallinfo2 before = mallinfo2();
  for (int i = 0; i < steps; i++)
    assert_int_equal(prm_train_step(c, opt, &b, NULL, &st), PRM_OK);
  assert_int_equal(prm_evaluate(c, &b, NULL, &st), PRM_OK);
  prmt_forward_ok(ci, &b, s);
  prmt_forward_ok(c, &b, s);
  assert_int_equal(prm_ctx_backward(c, s, n), PRM_OK);
  struct mallinfo2 after = mallinfo2();
  assert_int_equal(before.uordblks, after.uordblks);
  assert_int_equal(before.hblks, after.hblks);
  prm_optimizer_free(opt);
  prm_ctx_free(c);
  prm_ctx_free(ci);
  free(tok);
  free(s);
#else
  (void)m;
  (void)lengths;
  (void)n;
  (void)stride;
  (void)V;
  (void)steps;
  skip();
#endif
}

/* ---- skipping ------------------------------------------------------------ */

int prmt_n_skipped = 0;

int prmt_exit(int failed, size_t n_cases) {
  if (failed == 0 && n_cases > 0 && (size_t)prmt_n_skipped >= n_cases) return 77;
  return failed;
}
