/*
 * testutil.h - helpers shared by the cmocka test executables.
 * Include after <setjmp.h>/<cmocka.h> as usual; test files stay independent.
 */
#ifndef PRM_TESTUTIL_H
#define PRM_TESTUTIL_H

#include <stddef.h>
#include <stdint.h>

#include "prefrm.h"

/* Deterministic test PRNG (splitmix64); the library has its own. */
typedef struct prmt_rng {
  uint64_t s;
} prmt_rng;

uint64_t prmt_next(prmt_rng *r);
double prmt_uniform(prmt_rng *r); /* [0, 1) */
double prmt_normal(prmt_rng *r);  /* N(0, 1) */
void prmt_fill_normal(prmt_rng *r, float *x, size_t n, double scale);
/* x[i] += U(-a, a) for each of the n elements. */
void prmt_add_uniform(prmt_rng *r, float *x, size_t n, double a);

/* Add U(-a, a) to every element of m's tensors whose name contains `part`
 * (every tensor for ""), one stream of seed through them in order. */
void prmt_perturb_tensors(prm_model *m, const char *part, uint64_t seed, double a);

/* Create a linear model of input size d, or an mlp with the given hidden
 * widths and activation. Fails the test on error. */
prm_model *prmt_linear(uint64_t d, uint64_t seed);
prm_model *prmt_mlp(uint64_t d, const uint64_t *hidden, uint32_t n_hidden, int32_t act,
                    uint64_t seed);
/* A gpt2's options (vocab V, context n_ctx, width C, L layers, H heads), and
 * the model they create. Fails the test on error. */
prm_model_options prmt_gpt2_options(uint64_t V, uint64_t n_ctx, uint64_t C, uint64_t L, uint64_t H,
                                    uint64_t seed);
prm_model *prmt_gpt2(uint64_t V, uint64_t n_ctx, uint64_t C, uint64_t L, uint64_t H, uint64_t seed);
/* Training (inference != 0: scoring) context for up to max_rows rows. */
prm_ctx *prmt_ctx(const prm_model *m, uint64_t max_rows, int inference);
/* The same for sequences of up to max_len tokens (gpt2; 0: the model's n_ctx). */
prm_ctx *prmt_tok_ctx(const prm_model *m, uint64_t max_rows, uint64_t max_len, int inference);
/* A feature batch over x (n rows of d floats). */
prm_batch prmt_batch(const float *x, uint64_t n, uint64_t d);
/* A token batch over caller arrays: n rows of `stride` ids, lengths[n]. */
prm_batch prmt_tok_batch(const int32_t *tokens, const int32_t *lengths, uint64_t n,
                         uint64_t stride);

/* Path under the project's shared/ folder; returns 0 when shared/ is absent. */
int prmt_shared_path(char *buf, size_t size, const char *rel);
/* 1 when PRM_PYTHON can import torch (checked once per process). */
int prmt_have_torch(void);
/* A fresh path in the test build folder: "<tmpdir>/<name>.<pid>". */
void prmt_tmp_path(char *buf, size_t size, const char *name);

/*
 * Skipping. A case that cannot run here (no ../shared, no torch) calls
 * prmt_skip(), which counts it and then calls cmocka's skip(); main returns
 * prmt_exit(cmocka's result, number of cases): 77 when every case skipped
 * and none failed -- CTest's SKIP_RETURN_CODE for the test_parity*
 * executables (tests/CMakeLists.txt) -- else the failure count. (Matching
 * "[  SKIPPED ]" in the output instead would report an executable as skipped
 * even when another of its cases failed.)
 */
extern int prmt_n_skipped;
#define prmt_skip()                                                                                \
  do {                                                                                             \
    prmt_n_skipped++;                                                                              \
    skip();                                                                                        \
  } while (0)
int prmt_exit(int failed, size_t n_cases);

/* A call that must fail with `status` and leave an error message. */
#define ASSERT_FAILS(call, status)                                                                 \
  do {                                                                                             \
    assert_int_equal((call), (status));                                                            \
    assert_true(prm_last_errmsg()[0] != '\0');                                                     \
  } while (0)

/* ---- token models (gpt2, llama) ----------------------------------------- */

/* Random ids in [0, V) for the valid part of each of the n rows, `pad` in
 * the padding. */
void prmt_fill_tokens(prmt_rng *r, int32_t *tokens, const int32_t *lengths, uint64_t n,
                      uint64_t stride, uint64_t V, int32_t pad);
/* prm_ctx_forward of all b->n rows; fails the test on error. */
void prmt_forward_ok(prm_ctx *c, const prm_batch *b, float *scores);
/* A PRM_OPT_ADAMW optimizer (weight decay 0.01) over m; fails on error. */
prm_optimizer *prmt_adamw(prm_model *m, double lr);
/* Offset of the tensor called `want`; fails the test if absent. */
uint64_t prmt_tensor_offset(const prm_model *m, const char *want);
/* Scores and gradients of one zeroed forward/backward with output gradient g. */
void prmt_score_and_grad(prm_ctx *c, const prm_batch *b, const float *g, float *s, float *grads);

/*
 * Finite differences: Richardson-extrapolated central differences,
 * (4 D(h) - D(2h)) / 3 with h = PRMT_FD_H, of a loss computed in double;
 * every checked element must agree to PRMT_FD_TOL with
 * |fd - an| / (1e-3 + |fd| + |an|), each tensor as a whole to
 * PRMT_FD_NORM_TOL (||fd - an|| / ||an||), where rounding noise averages out
 * and a missing term does not; no tensor's gradient may be all zero.
 */
#define PRMT_FD_H 1e-2f
#define PRMT_FD_TOL 2e-2
#define PRMT_FD_NORM_TOL 1e-2
#define PRMT_FD_MAX_ROWS 64

/* L(theta) = sum_i g_i s_i in double over the b->n (<= PRMT_FD_MAX_ROWS)
 * scores of ci (an inference context); prmt_ws_loss takes a prmt_ws. */
double prmt_weighted_sum(prm_ctx *ci, const prm_batch *b, const float *g);
typedef struct prmt_ws {
  prm_ctx *ci;
  const prm_batch *b;
  const float *g;
} prmt_ws;
double prmt_ws_loss(void *arg);
/* Check the analytic gradient `an` of loss(arg) for every tensor of m: every
 * `every`-th element of each 2-D tensor, all of the 1-D ones. Messages start
 * with "<what>: " unless what is NULL; the worst element and tensor-norm
 * errors go to *worst_elem / *worst_norm. */
void prmt_check_fd(prm_model *m, const float *an, double (*loss)(void *), void *arg, uint64_t every,
                   const char *what, double *worst_elem, double *worst_norm);

/* Snapshot of everything a failing call must leave alone. */
typedef struct prmt_snap {
  float *params, *grads;
  uint64_t np, ng;
} prmt_snap;
prmt_snap prmt_take_snap(prm_model *m, prm_ctx *c);
void prmt_assert_unchanged(const prmt_snap *s, prm_model *m, prm_ctx *c);
void prmt_free_snap(prmt_snap *s);

/* Every bad token batch against m (vocabulary 11, n_ctx 8): bad ids,
 * lengths, stride, row counts, NULL arrays and version through
 * prm_ctx_forward, a context of a smaller max_len, prm_evaluate and
 * prm_train_step; each must fail with its status and a message and leave
 * parameters, gradients and the pending forward alone. */
void prmt_check_bad_token_batches(prm_model *m);

/* The counting task: sequences of 4..PRMT_LT_S ids from a vocabulary of
 * PRMT_LT_V; the response with more occurrences of token 3 wins (ties are
 * not sampled). prmt_count_task_learns trains m (vocabulary PRMT_LT_V, n_ctx
 * >= PRMT_LT_S) for `steps` AdamW steps (cosine schedule with `warmup`
 * steps, decay 0.01, clipping at 1) of 8 fresh pairs and requires a held-out
 * accuracy (300 pairs) of at least min_accuracy. */
#define PRMT_LT_V 16
#define PRMT_LT_S 12
void prmt_count_task_learns(prm_model *m, int steps, double lr, uint64_t warmup,
                            double min_accuracy);

/* No heap allocation inside train steps, evaluate, forward and backward of
 * m after the first step (glibc >= 2.33; else the test is skipped): n rows
 * of the given lengths in a stride-wide buffer of ids below V, `steps`
 * measured train steps. */
void prmt_check_no_allocation(prm_model *m, const int32_t *lengths, uint64_t n, uint64_t stride,
                              uint64_t V, int steps);

#endif
