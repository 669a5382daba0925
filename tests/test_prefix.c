/*
 * test_prefix.c - shared prefixes in token batches (prm_batch version 2).
 *
 * A row that declares a shared prefix (prefix_row, prefix_len) must score,
 * and back-propagate, like the same row without the declaration: the
 * declaration only changes which tokens are computed once. Every case
 * compares the declared batch with the undeclared one, on gpt2 and llama
 * (GQA, biases, q/k norm), with ragged prompts and responses, prefixes of
 * one token and of a whole sequence, several rows per prefix, chains (a row
 * sharing with a row that itself shares), training and inference contexts,
 * the split calls and the one-call paths. Bad declarations are rejected with
 * nothing changed.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "prefrm.h"
#include "testutil.h"

#define V 61
#define CTX 80
#define MAXR 12

/* ---- models ----------------------------------------------------------------------------- */

static prm_model *model_of(int kind, uint64_t L) {
  prm_model_options o;
  if (kind == 0) {
    o = prmt_gpt2_options(V, CTX, 32, L, 4, 5);
  } else {
    assert_int_equal(prm_model_options_init(&o, PRM_MODEL_OPTIONS_VERSION), PRM_OK);
    o.arch = PRM_ARCH_LLAMA;
    o.vocab_size = V;
    o.n_ctx = CTX;
    o.n_embd = 32;
    o.n_layer = L;
    o.n_head = 4;
    o.n_kv_head = kind == 1 ? 2 : 1;
    o.head_dim = kind == 1 ? 8 : 12;
    o.n_ffn = 48;
    o.attn_bias = kind == 1;
    o.qk_norm = kind == 2;
    o.seed = 5;
  }
  prm_model *m = NULL;
  int rc = prm_model_new(&m, &o);
  if (rc != PRM_OK) fail_msg("prm_model_new: %s (%s)", prm_status_string(rc), prm_last_errmsg());
  /* away from init, so that attention is far from uniform */
  prmt_perturb_tensors(m, "", 11, 0.2);
  return m;
}

static const char *kind_name(int kind) {
  return kind == 0 ? "gpt2" : kind == 1 ? "llama GQA+bias" : "llama MQA+qk-norm";
}

/* ---- the batch ---------------------------------------------------------------------------- */

/*
 * Twelve rows over CTX-wide rows, every way a row can share:
 *   0: prompt A (37 tokens) + response              len 70 (crosses 32-blocks)
 *   1: shares A with 0, own response                len 52
 *   2: the whole of row 0 (identical sequence)       len 70, prefix 70
 *   3: A alone (a row that is only the prefix)       len 37, prefix 37
 *   4: shares 1 token with row 1                     len 45, prefix 1
 *   5: no sharing                                    len 33
 *   6: shares 20 of row 5                            len 66
 *   7: chain: row 1's first 45 (A + 8 of row 1's own) len 60, prefix 45 of row 1
 *   8: shares 31 with row 6 (within row 5's part)    len 31, prefix 31 (whole)
 *   9: no sharing, length 1                          len 1
 *  10: shares 1 = whole with row 9                   len 1, prefix 1
 *  11: shares 64 with row 6 (beyond two 32-blocks)   len 79, prefix 64
 */
typedef struct shared_batch {
  int32_t tokens[MAXR * CTX];
  int32_t len[MAXR], prow[MAXR], plen[MAXR];
  uint64_t n;
} shared_batch;

static void make_batch(shared_batch *s, uint64_t seed) {
  static const int32_t len[MAXR] = {70, 52, 70, 37, 45, 33, 66, 60, 31, 1, 1, 79};
  static const int32_t prow[MAXR] = {0, 0, 0, 0, 1, 0, 5, 1, 6, 0, 9, 6};
  static const int32_t plen[MAXR] = {0, 37, 70, 37, 1, 0, 20, 45, 31, 0, 1, 64};
  prmt_rng r = {seed};
  s->n = MAXR;
  memcpy(s->len, len, sizeof len);
  memcpy(s->prow, prow, sizeof prow);
  memcpy(s->plen, plen, sizeof plen);
  prmt_fill_tokens(&r, s->tokens, s->len, s->n, CTX, V, 0);
  for (uint64_t i = 0; i < s->n; i++) /* copy the declared prefixes, rows in order */
    for (int32_t t = 0; t < s->plen[i]; t++)
      s->tokens[i * CTX + (uint64_t)t] = s->tokens[(uint64_t)s->prow[i] * CTX + (uint64_t)t];
}

static prm_batch batch_of(shared_batch *s, int declare) {
  prm_batch b = prmt_tok_batch(s->tokens, s->len, s->n, CTX);
  assert_int_equal(b.version, 2);
  if (declare) {
    b.prefix_row = s->prow;
    b.prefix_len = s->plen;
  }
  return b;
}

/* ---- comparisons -------------------------------------------------------------------------- */

/* max |a - b| <= tol * max(max|b|, tiny) */
static void assert_close(const float *a, const float *b, uint64_t n, double tol, const char *what) {
  double mb = 1e-30, md = 0.0;
  uint64_t worst = 0;
  for (uint64_t i = 0; i < n; i++) {
    mb = fmax(mb, fabs((double)b[i]));
    double d = fabs((double)a[i] - (double)b[i]);
    if (d > md) {
      md = d;
      worst = i;
    }
  }
  if (md > tol * mb)
    fail_msg("%s: element %llu differs by %.3g (shared %.9g, unshared %.9g; scale %.3g)", what,
             (unsigned long long)worst, md, (double)a[worst], (double)b[worst], mb);
}

/* ---- tests -------------------------------------------------------------------------------- */

/* Split calls, training context: scores and every parameter's gradient. */
static void check_split(int kind, uint64_t L) {
  prm_model *m = model_of(kind, L);
  prm_ctx *c = prmt_tok_ctx(m, MAXR, CTX, 0);
  shared_batch *s = malloc(sizeof *s);
  assert_non_null(s);
  make_batch(s, 100 + (uint64_t)kind);
  prmt_rng r = {7};
  float g[MAXR], s_sh[MAXR], s_un[MAXR];
  for (int i = 0; i < MAXR; i++) g[i] = (float)(prmt_uniform(&r) * 2 - 1);
  const uint64_t np = prm_model_num_params(m);
  float *gr_sh = malloc(np * sizeof(float)), *gr_un = malloc(np * sizeof(float));
  assert_non_null(gr_sh);
  assert_non_null(gr_un);
  prm_batch bs = batch_of(s, 1), bu = batch_of(s, 0);
  uint64_t total = 0, own = 0;
  for (uint64_t i = 0; i < s->n; i++) {
    total += (uint64_t)s->len[i];
    own += (uint64_t)(s->len[i] - s->plen[i]);
  }
  assert_int_equal(prm_ctx_tokens_computed(c), 0);
  prmt_score_and_grad(c, &bu, g, s_un, gr_un);
  assert_int_equal(prm_ctx_tokens_computed(c), total);
  prmt_score_and_grad(c, &bs, g, s_sh, gr_sh);
  /* each shared token computed once: 545 tokens, 239 of them own */
  assert_int_equal(prm_ctx_tokens_computed(c), own);
  assert_int_equal(total, 545);
  assert_int_equal(own, 239);
  char what[96];
  snprintf(what, sizeof what, "%s L=%llu scores", kind_name(kind), (unsigned long long)L);
  assert_close(s_sh, s_un, MAXR, 2e-6, what);
  /* identical sequences score identically (rows 0 and 2) */
  assert_true(fabsf(s_sh[0] - s_sh[2]) <= 1e-6f * (1.0f + fabsf(s_sh[0])));
  snprintf(what, sizeof what, "%s L=%llu gradients", kind_name(kind), (unsigned long long)L);
  assert_close(gr_sh, gr_un, np, 2e-5, what);

  /* inference context: the same scores */
  prm_ctx *ci = prmt_tok_ctx(m, MAXR, CTX, 1);
  float s_inf[MAXR];
  prmt_forward_ok(ci, &bs, s_inf);
  snprintf(what, sizeof what, "%s L=%llu inference scores", kind_name(kind), (unsigned long long)L);
  assert_close(s_inf, s_un, MAXR, 2e-6, what);

  prm_ctx_free(ci);
  prm_ctx_free(c);
  free(gr_sh);
  free(gr_un);
  free(s);
  prm_model_free(m);
}

static void test_split_gpt2(void **state) {
  (void)state;
  for (uint64_t L = 1; L <= 3; L++) check_split(0, L);
}

static void test_split_llama(void **state) {
  (void)state;
  for (int kind = 1; kind <= 2; kind++)
    for (uint64_t L = 1; L <= 2; L++) check_split(kind, L);
}

static prm_optimizer *sgd(prm_model *m) {
  prm_optimizer_options o;
  assert_int_equal(prm_optimizer_options_init(&o, PRM_OPTIMIZER_OPTIONS_VERSION), PRM_OK);
  o.algorithm = PRM_OPT_SGD;
  o.lr = 0.05;
  prm_optimizer *opt = NULL;
  assert_int_equal(prm_optimizer_new(&opt, m, &o), PRM_OK);
  return opt;
}

/*
 * One-call paths on a pair batch whose rejected rows share the prompt with
 * their chosen rows: prm_evaluate's statistics and prm_train_step's loss and
 * updated parameters equal those of the undeclared batch.
 */
static void check_one_call(int kind) {
  enum { P = 5 };
  static const int32_t prompt[P] = {30, 1, 12, 44, 20};
  static const int32_t resp_c[P] = {9, 20, 1, 30, 5};
  static const int32_t resp_r[P] = {14, 3, 25, 1, 5};
  int32_t tokens[2 * P * CTX], len[2 * P], prow[2 * P], plen[2 * P];
  prmt_rng r = {31};
  for (int j = 0; j < P; j++) {
    len[j] = prompt[j] + resp_c[j];
    len[P + j] = prompt[j] + resp_r[j];
    prow[j] = plen[j] = 0;
    prow[P + j] = j;
    plen[P + j] = prompt[j];
  }
  prmt_fill_tokens(&r, tokens, len, 2 * P, CTX, V, 3);
  for (int j = 0; j < P; j++)
    memcpy(tokens + (P + j) * CTX, tokens + j * CTX, (size_t)prompt[j] * sizeof(int32_t));

  prm_batch bu = prmt_tok_batch(tokens, len, 2 * P, CTX), bs = bu;
  bs.prefix_row = prow;
  bs.prefix_len = plen;

  prm_model *mu = model_of(kind, 2), *ms = model_of(kind, 2);
  prm_ctx *cu = prmt_tok_ctx(mu, 2 * P, CTX, 0), *cs = prmt_tok_ctx(ms, 2 * P, CTX, 0);
  prm_loss_stats eu, es;
  assert_int_equal(prm_loss_stats_init(&eu, PRM_LOSS_STATS_VERSION), PRM_OK);
  assert_int_equal(prm_loss_stats_init(&es, PRM_LOSS_STATS_VERSION), PRM_OK);
  assert_int_equal(prm_evaluate(cu, &bu, NULL, &eu), PRM_OK);
  assert_int_equal(prm_evaluate(cs, &bs, NULL, &es), PRM_OK);
  assert_true(fabs(eu.loss - es.loss) <= 1e-6 * (1 + fabs(eu.loss)));
  assert_true(fabs(eu.margin_mean - es.margin_mean) <= 1e-5 * (1 + fabs(eu.margin_mean)));
  assert_true(eu.accuracy == es.accuracy);

  /* SGD: the step is proportional to the gradient (Adam would turn the
   * rounding noise of directions with no gradient, such as ln_f's bias
   * under a pair loss, into full-size steps) */
  prm_optimizer *ou = sgd(mu), *os = sgd(ms);
  for (int step = 0; step < 3; step++) {
    assert_int_equal(prm_train_step(cu, ou, &bu, NULL, &eu), PRM_OK);
    assert_int_equal(prm_train_step(cs, os, &bs, NULL, &es), PRM_OK);
    assert_true(fabs(eu.loss - es.loss) <= 1e-5 * (1 + fabs(eu.loss)));
  }
  uint64_t np;
  const float *pu = prm_model_params(mu, &np), *ps = prm_model_params(ms, &np);
  char what[64];
  snprintf(what, sizeof what, "%s parameters after 3 steps", kind_name(kind));
  assert_close(ps, pu, np, 1e-6, what);

  prm_optimizer_free(ou);
  prm_optimizer_free(os);
  prm_ctx_free(cu);
  prm_ctx_free(cs);
  prm_model_free(mu);
  prm_model_free(ms);
}

static void test_one_call(void **state) {
  (void)state;
  for (int kind = 0; kind <= 2; kind++) check_one_call(kind);
}

/*
 * Group batches (K-wise rankings): every response of a group names the
 * group's first row; Plackett-Luce training and evaluation agree with the
 * undeclared batch.
 */
static void check_groups(int kind) {
  enum { G = 3, ROWS = 9 };
  static const int32_t sizes[G] = {4, 2, 3};
  static const int32_t prompt[G] = {33, 2, 20};
  int32_t tokens[ROWS * CTX], len[ROWS], prow[ROWS], plen[ROWS];
  prmt_rng r = {77};
  int row = 0;
  for (int gi = 0; gi < G; gi++)
    for (int k = 0; k < sizes[gi]; k++, row++) {
      len[row] = prompt[gi] + 3 + (int32_t)(prmt_next(&r) % 40);
      prow[row] = row - k; /* the group's first row */
      plen[row] = k == 0 ? 0 : prompt[gi];
    }
  prmt_fill_tokens(&r, tokens, len, ROWS, CTX, V, 1);
  for (int i = 0; i < ROWS; i++)
    memcpy(tokens + i * CTX, tokens + prow[i] * CTX, (size_t)plen[i] * sizeof(int32_t));
  prm_batch bu = prmt_tok_batch(tokens, len, ROWS, CTX), bs = bu;
  bs.prefix_row = prow;
  bs.prefix_len = plen;
  prm_rank_options ro;
  assert_int_equal(prm_rank_options_init(&ro, PRM_RANK_OPTIONS_VERSION), PRM_OK);
  ro.loss = PRM_RANK_PLACKETT_LUCE;
  prm_model *mu = model_of(kind, 2), *ms = model_of(kind, 2);
  prm_ctx *cu = prmt_tok_ctx(mu, ROWS, CTX, 0), *cs = prmt_tok_ctx(ms, ROWS, CTX, 0);
  prm_loss_stats eu, es;
  assert_int_equal(prm_loss_stats_init(&eu, PRM_LOSS_STATS_VERSION), PRM_OK);
  assert_int_equal(prm_loss_stats_init(&es, PRM_LOSS_STATS_VERSION), PRM_OK);
  assert_int_equal(prm_evaluate_groups(cu, &bu, sizes, G, &ro, &eu), PRM_OK);
  assert_int_equal(prm_evaluate_groups(cs, &bs, sizes, G, &ro, &es), PRM_OK);
  assert_true(fabs(eu.loss - es.loss) <= 1e-6 * (1 + fabs(eu.loss)));
  uint64_t own = 0;
  for (int i = 0; i < ROWS; i++) own += (uint64_t)(len[i] - plen[i]);
  assert_int_equal(prm_ctx_tokens_computed(cs), own);
  prm_optimizer *ou = sgd(mu), *os = sgd(ms);
  for (int step = 0; step < 2; step++) {
    assert_int_equal(prm_train_step_groups(cu, ou, &bu, sizes, G, &ro, &eu), PRM_OK);
    assert_int_equal(prm_train_step_groups(cs, os, &bs, sizes, G, &ro, &es), PRM_OK);
  }
  uint64_t np;
  const float *pu = prm_model_params(mu, &np), *ps = prm_model_params(ms, &np);
  assert_close(ps, pu, np, 1e-6, "group parameters after 2 steps");
  prm_optimizer_free(ou);
  prm_optimizer_free(os);
  prm_ctx_free(cu);
  prm_ctx_free(cs);
  prm_model_free(mu);
  prm_model_free(ms);
}

static void test_groups(void **state) {
  (void)state;
  for (int kind = 0; kind <= 1; kind++) check_groups(kind);
}

/*
 * Bad declarations: each is refused with its status and a message, and the
 * context keeps the forward it had (its backward still gives the gradient
 * of that forward).
 */
static void test_bad_declarations(void **state) {
  (void)state;
  for (int kind = 0; kind <= 1; kind++) {
    prm_model *m = model_of(kind, 1);
    prm_ctx *c = prmt_tok_ctx(m, MAXR, CTX, 0);
    shared_batch *s = malloc(sizeof *s);
    assert_non_null(s);
    make_batch(s, 3);
    prm_batch good = batch_of(s, 1);
    float sc[MAXR], g[MAXR], ref_s[MAXR];
    for (int i = 0; i < MAXR; i++) g[i] = 0.1f * (float)(i + 1);
    const uint64_t np = prm_model_num_params(m);
    float *ref = malloc(np * sizeof(float));
    assert_non_null(ref);
    prmt_score_and_grad(c, &good, g, ref_s, ref);

    assert_int_equal(prm_ctx_zero_grad(c), PRM_OK);
    prmt_forward_ok(c, &good, sc);
    const uint64_t computed = prm_ctx_tokens_computed(c);
    int32_t prow[MAXR], plen[MAXR];
    prm_batch bad = good;
    bad.prefix_row = prow;
    bad.prefix_len = plen;
#define RESET()                                                                                    \
  do {                                                                                             \
    memcpy(prow, s->prow, sizeof prow);                                                            \
    memcpy(plen, s->plen, sizeof plen);                                                            \
    bad.prefix_row = prow;                                                                         \
    bad.prefix_len = plen;                                                                         \
  } while (0)
    RESET();
    s->tokens[1 * CTX + 36]++; /* row 1's prompt now differs from row 0's at token 36 */
    ASSERT_FAILS(prm_ctx_forward(c, &bad, sc, MAXR), PRM_ERR_INVALID);
    assert_non_null(strstr(prm_ctx_errmsg(c), "differs"));
    s->tokens[1 * CTX + 36]--;
    RESET();
    prow[4] = 4; /* not an earlier row */
    ASSERT_FAILS(prm_ctx_forward(c, &bad, sc, MAXR), PRM_ERR_INVALID);
    RESET();
    prow[4] = -1;
    ASSERT_FAILS(prm_ctx_forward(c, &bad, sc, MAXR), PRM_ERR_INVALID);
    RESET();
    plen[0] = 1; /* row 0 has no earlier row */
    ASSERT_FAILS(prm_ctx_forward(c, &bad, sc, MAXR), PRM_ERR_INVALID);
    RESET();
    plen[5] = -2;
    ASSERT_FAILS(prm_ctx_forward(c, &bad, sc, MAXR), PRM_ERR_INVALID);
    RESET();
    plen[3] = 38; /* longer than row 3 */
    ASSERT_FAILS(prm_ctx_forward(c, &bad, sc, MAXR), PRM_ERR_SIZE);
    RESET();
    prow[8] = 5;
    plen[8] = 31; /* row 8 holds row 6's own tokens from 20 on, not row 5's */
    ASSERT_FAILS(prm_ctx_forward(c, &bad, sc, MAXR), PRM_ERR_INVALID);
    RESET();
    prow[11] = 5;
    plen[11] = 40; /* longer than row 5 */
    ASSERT_FAILS(prm_ctx_forward(c, &bad, sc, MAXR), PRM_ERR_SIZE);
    RESET();
    bad.prefix_row = NULL; /* one of the two */
    ASSERT_FAILS(prm_ctx_forward(c, &bad, sc, MAXR), PRM_ERR_NULL);
    RESET();
    bad.prefix_len = NULL;
    ASSERT_FAILS(prm_ctx_forward(c, &bad, sc, MAXR), PRM_ERR_NULL);
#undef RESET
    /* the pending forward survived every refusal */
    assert_int_equal(prm_ctx_tokens_computed(c), computed);
    float *after = malloc(np * sizeof(float));
    assert_non_null(after);
    uint64_t ng;
    assert_int_equal(prm_ctx_backward(c, g, MAXR), PRM_OK);
    memcpy(after, prm_ctx_grads(c, &ng), np * sizeof(float));
    assert_memory_equal(after, ref, np * sizeof(float));
    assert_memory_equal(sc, ref_s, sizeof sc);

    /* features models ignore the fields */
    free(after);
    free(ref);
    free(s);
    prm_ctx_free(c);
    prm_model_free(m);
  }
}

/* A version-1 batch struct ends before the prefix fields: prm_batch_init
 * writes only its bytes, and a forward never reads past them. */
static void test_version_1_batch(void **state) {
  (void)state;
  const size_t v1 = offsetof(prm_batch, prefix_row);
  unsigned char buf[sizeof(prm_batch) + 16];
  memset(buf, 0xA5, sizeof buf);
  assert_int_equal(prm_batch_init((prm_batch *)(void *)buf, 1), PRM_OK);
  for (size_t i = v1; i < sizeof buf; i++) assert_int_equal(buf[i], 0xA5);

  /* a v1 batch whose bytes past v1 are garbage scores like a v2 batch
   * without a declaration */
  prm_model *m = model_of(0, 2);
  prm_ctx *c = prmt_tok_ctx(m, MAXR, CTX, 1);
  shared_batch *s = malloc(sizeof *s);
  assert_non_null(s);
  make_batch(s, 9);
  prm_batch b2 = batch_of(s, 0), b1 = b2;
  b1.version = 1;
  b1.prefix_row = (const int32_t *)(uintptr_t)0x10; /* never read */
  b1.prefix_len = (const int32_t *)(uintptr_t)0x10;
  float s1[MAXR], s2[MAXR];
  prmt_forward_ok(c, &b1, s1);
  prmt_forward_ok(c, &b2, s2);
  assert_memory_equal(s1, s2, sizeof s1);
  free(s);
  prm_ctx_free(c);
  prm_model_free(m);
}

/* Without a declaration the result does not depend on the version field or
 * on NULL prefix arrays (the packed layout is then exactly the old one). */
static void test_no_declaration_unchanged(void **state) {
  (void)state;
  prm_model *m = model_of(1, 2);
  prm_ctx *c = prmt_tok_ctx(m, MAXR, CTX, 0);
  shared_batch *s = malloc(sizeof *s);
  assert_non_null(s);
  make_batch(s, 21);
  prm_batch b = batch_of(s, 0);
  int32_t zero[MAXR] = {0};
  prm_batch bz = b; /* declared, but nothing shared */
  bz.prefix_row = zero;
  bz.prefix_len = zero;
  float g[MAXR], sa[MAXR], sb[MAXR];
  for (int i = 0; i < MAXR; i++) g[i] = 1.0f - 0.15f * (float)i;
  const uint64_t np = prm_model_num_params(m);
  float *ga = malloc(np * sizeof(float)), *gb = malloc(np * sizeof(float));
  assert_non_null(ga);
  assert_non_null(gb);
  prmt_score_and_grad(c, &b, g, sa, ga);
  prmt_score_and_grad(c, &bz, g, sb, gb);
  assert_memory_equal(sa, sb, sizeof sa);
  assert_memory_equal(ga, gb, np * sizeof(float));
  free(ga);
  free(gb);
  free(s);
  prm_ctx_free(c);
  prm_model_free(m);
}

/*
 * Long rows: from 512 tokens on gpt2's attention runs in 64-row query blocks
 * (32 below), and a row that shares a prefix starts its blocks where the
 * prefix ends, so shared and unshared rows tile the causal triangle
 * differently. Row 1 repeats 530 of row 0's 600 tokens, row 2 100 of them,
 * row 3 (below 512, short blocks) 450; scores and gradients must agree.
 */
static void test_long_rows_gpt2(void **state) {
  (void)state;
  enum { LT = 640, LR = 4 };
  prm_model_options o = prmt_gpt2_options(V, LT, 16, 2, 2, 3);
  prm_model *m = NULL;
  assert_int_equal(prm_model_new(&m, &o), PRM_OK);
  prmt_perturb_tensors(m, "", 12, 0.2);
  static int32_t tokens[LR * LT];
  int32_t len[LR] = {600, 620, 520, 480}, prow[LR] = {0, 0, 0, 0}, plen[LR] = {0, 530, 100, 450};
  prmt_rng r = {31};
  prmt_fill_tokens(&r, tokens, len, LR, LT, V, 0);
  for (int i = 1; i < LR; i++)
    memcpy(tokens + i * LT, tokens, (size_t)plen[i] * sizeof(int32_t));
  prm_ctx *c = prmt_tok_ctx(m, LR, LT, 0);
  const float g[LR] = {1.0f, -0.5f, 0.25f, -1.0f};
  float s_sh[LR], s_un[LR];
  const uint64_t np = prm_model_num_params(m);
  float *gr_sh = malloc(np * sizeof(float)), *gr_un = malloc(np * sizeof(float));
  assert_non_null(gr_sh);
  assert_non_null(gr_un);
  prm_batch bu = prmt_tok_batch(tokens, len, LR, LT), bs = bu;
  bs.prefix_row = prow;
  bs.prefix_len = plen;
  prmt_score_and_grad(c, &bu, g, s_un, gr_un);
  prmt_score_and_grad(c, &bs, g, s_sh, gr_sh);
  assert_int_equal(prm_ctx_tokens_computed(c), 600 + 90 + 420 + 30);
  assert_close(s_sh, s_un, LR, 2e-6, "long rows scores");
  assert_close(gr_sh, gr_un, np, 2e-5, "long rows gradients");
  free(gr_sh);
  free(gr_un);
  prm_ctx_free(c);
  prm_model_free(m);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_long_rows_gpt2),
      cmocka_unit_test(test_split_gpt2),
      cmocka_unit_test(test_split_llama),
      cmocka_unit_test(test_one_call),
      cmocka_unit_test(test_groups),
      cmocka_unit_test(test_bad_declarations),
      cmocka_unit_test(test_version_1_batch),
      cmocka_unit_test(test_no_declaration_unchanged),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
