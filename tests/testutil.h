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
double prmt_uniform(prmt_rng *r);              /* [0, 1) */
double prmt_normal(prmt_rng *r);               /* N(0, 1) */
void prmt_fill_normal(prmt_rng *r, float *x, size_t n, double scale);
/* x[i] += U(-a, a) for each of the n elements. */
void prmt_add_uniform(prmt_rng *r, float *x, size_t n, double a);

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

#endif
