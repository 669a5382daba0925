/*
 * parityutil.h - helpers shared by the PyTorch parity tests (test_parity.c,
 * test_parity_gpt2.c): running the reference (PRM_PYTHON torch_ref.py) and
 * reading the JSON it prints, the per-case files and handles, the error
 * metric, and the steps both tests take after their forward pass (loss,
 * backward, one AdamW step), each checked against the reference.
 *
 * Error metric (robust to near-zero elements, where a pure elementwise
 * relative error is meaningless in fp32):
 *     err(a, ref) = max_i |a_i - ref_i| / max(max_i |ref_i|, PARITY_TINY)
 * and |a - ref| / |ref| for scalars. Every check fails the running cmocka
 * test with a message naming what differs.
 *
 * Include after <setjmp.h>/<cmocka.h> and testutil.h.
 */
#ifndef PRM_PARITYUTIL_H
#define PRM_PARITYUTIL_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "prefrm.h"

#define PARITY_TOL 1e-4
#define PARITY_DELTA_TOL 1e-3
#define PARITY_TINY 1e-12
#define PARITY_PATH_SIZE 1024
#define PARITY_CMD_SIZE 16384

/* ---- metric ------------------------------------------------------------- */

double parity_max_d(double a, double b);
/* max|a - ref| / max(max|ref|, PARITY_TINY) over n elements; NaN -> failure. */
double parity_tensor_err(const float *a, const float *ref, uint64_t n);
/* |a - ref| / max(|ref|, PARITY_TINY); INFINITY for NaN. */
double parity_scalar_err(double a, double ref);

/* ---- running the reference ---------------------------------------------- */

/* 1 when ../shared/reference/torch_ref.py exists and PRM_PYTHON imports
 * torch; its path goes to script. Else prints "<test>: skipped: <why>" to
 * stderr and returns 0. */
int parity_reference_available(const char *test, char *script, size_t size);
/* s in single quotes for the shell (an embedded ' becomes '\''). */
void parity_shell_quote(char *buf, size_t size, const char *s);
/* Run a shell command; returns its stdout (malloc'd, NUL-terminated) or fails
 * the test when it does not exit with status 0. stderr passes through. */
char *parity_run_capture(const char *cmd);
/* The number after `"key":` in a JSON text; fails the test if absent. */
double parity_json_number(const char *json, const char *key);
/* The JSON list `"key": [...]` of exactly n numbers. */
void parity_json_list(const char *json, const char *key, double *out, uint64_t n);
/* A JSON list of n floats with "%.9g" (round-trips fp32 exactly). */
void parity_write_floats(FILE *f, const float *x, uint64_t n);

/* ---- models ------------------------------------------------------------- */

/* prm_model_load, failing the test with `what` on error. */
prm_model *parity_load(const char *path, const char *what);
/* Index of the tensor called `name` in m; fails the test if absent. */
uint32_t parity_find_tensor(const prm_model *m, const char *name, const char *what);
/* Offset of tensor `name` in ref, whose shape must be ndim/shape. */
uint64_t parity_ref_offset(prm_model *ref, const char *name, const char *what, uint32_t ndim,
                           const uint64_t shape[2]);
/* A PRM_OPT_ADAMW optimizer (betas 0.9/0.999, eps 1e-8) over m. */
prm_optimizer *parity_adamw(prm_model *m, double lr, double wd, double clip, int no_decay_1d);

/* ---- one case ----------------------------------------------------------- */

/* Paths and handles of one case, released by parity_run_free even after a
 * failed assertion (cmocka state of the parity tests). */
typedef struct parity_run {
  const void *pc; /* the test's case description */
  char ckpt[PARITY_PATH_SIZE], batch[PARITY_PATH_SIZE], grads[PARITY_PATH_SIZE],
      updated[PARITY_PATH_SIZE];
  prm_model *model, *ref_grads, *ref_updated;
  prm_ctx *ctx;
  prm_optimizer *opt;
  void *input;   /* the C side's batch data (features or tokens) */
  char *out;     /* stdout of the reference */
  float *before; /* parameters before the optimizer step */
} parity_run;

/* A zeroed run for case pc, its files "<tmpdir>/<prefix>_{ckpt,batch,grads,
 * updated}.<ext>.<pid>". */
parity_run *parity_run_new(const void *pc, const char *prefix);
/* Frees every handle and buffer, removes the files, frees s. */
void parity_run_free(parity_run *s);

/* `torch_ref.py grads --ckpt s->ckpt --batch s->batch --out s->grads
 * --updated-out s->updated` with the AdamW hyper-parameters: keeps its stdout
 * in s->out, loads s->ref_grads and s->ref_updated, and returns the loss, the
 * gradient norm and the 2P scores (chosen, then rejected). */
void parity_reference_grads(parity_run *s, const char *script, double lr, double wd, double clip,
                            int no_decay_1d, uint64_t P, double *loss, double *grad_norm,
                            float *ref_scores);
/* The n C scores against the reference's; returns the error. */
double parity_check_scores(const float *scores, const float *ref_scores, uint64_t n);
/* prm_loss_bt over the 2P scores (margin, label: NULL or P values) into
 * dscores, against ref_loss; returns the error. */
double parity_check_loss(const float *scores, uint64_t P, const float *margin, const float *label,
                         double center, double ref_loss, float *dscores);
/* prm_ctx_backward of s->ctx; returns the gradients, *n_params their count
 * (which must be the model's parameter count). */
const float *parity_backward(parity_run *s, const float *dscores, uint64_t n, uint64_t *n_params);
/* Keeps the parameters in s->before, creates s->opt (parity_adamw) and takes
 * one step; checks the gradient norm against ref_grad_norm and returns its
 * error. */
double parity_adamw_step(parity_run *s, double lr, double wd, double clip, int no_decay_1d,
                         double ref_grad_norm);

#endif
