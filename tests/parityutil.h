/*
 * parityutil.h - helpers shared by the PyTorch parity tests (test_parity.c,
 * test_parity_gpt2.c, test_parity_llama.c): running the reference
 * (PRM_PYTHON torch_ref.py) and reading the JSON it prints, the per-case
 * files and handles, the error metric, and the steps every test takes after
 * its forward pass (loss, backward, one AdamW step), each checked against the
 * reference; and, for the token models, the whole per-configuration flow and
 * the 50-step training curve, parameterised by a parity_tok_arch.
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

/* ---- token models (gpt2, llama) ----------------------------------------- */

#define PARITY_TOK_ZERO_GRAD_REL 1e-6   /* gradient tensors below this * max|grad| are noise */
#define PARITY_TOK_UPDATE_MASK_REL 1e-4 /* AdamW: elements below this * tensor max are noise */
#define PARITY_TOK_TRAIN_LOSS_TOL 1e-3  /* per-step loss, absolute */
#define PARITY_TOK_TRAIN_NORM_TOL 1e-3  /* per-step gradient norm before clipping, relative */
#define PARITY_TOK_MAX_PAIRS 8
#define PARITY_TOK_MAX_ROWS (2 * PARITY_TOK_MAX_PAIRS)
#define PARITY_TOK_TRAIN_STEPS 50
#define PARITY_TOK_TRAIN_BATCHES 4
#define PARITY_TOK_MAX_GROUPS 8

/* max_i |x_i| */
double parity_max_abs(const float *x, uint64_t n);

/* The sizes every token model has (gpt2's whole configuration). */
typedef struct parity_tok_dims {
  uint64_t vocab, n_ctx, n_embd, n_layer, n_head;
} parity_tok_dims;

/* What differs between the token architectures. `model` below is the
 * architecture's own configuration (gpt2: a parity_tok_dims). */
typedef struct parity_tok_arch {
  const char *name;    /* torch_ref's --model, messages, temporary file names */
  const char *test;    /* the test program, for skip messages */
  int name_width;      /* width of the case name in the summary line */
  int score_inference; /* first also score through an inference context */
  parity_tok_dims (*dims)(const void *model);
  /* torch_ref init flags beyond the dims (" --kv-heads 2 ..."); NULL: none */
  void (*extra_flags)(char *buf, size_t size, const void *model);
  /* the loaded model's configuration must be `model`'s */
  void (*check_config)(const prm_model *m, const void *model);
  /* parameter groups for the summary lines */
  int n_groups; /* <= PARITY_TOK_MAX_GROUPS */
  const char *const *group_names;
  int (*group_of)(const char *tensor_name);
  int emb_group; /* exact zeros of its gradient stay in the update check */
} parity_tok_arch;

/* Worst errors of one parity_compare_tensors, per parameter group. */
typedef struct parity_cmp_result {
  double worst[PARITY_TOK_MAX_GROUPS];       /* per group: worst tensor error */
  double worst_delta[PARITY_TOK_MAX_GROUPS]; /* per group: worst update error */
  double all, all_delta;
  char worst_name[128], worst_delta_name[128];
  char zero_names[256]; /* gradients that are zero up to rounding */
  double zero_worst;    /* their largest |c| / max|torch grad| */
  uint64_t n_masked;    /* AdamW: elements left out (noise gradient) */
} parity_cmp_result;

/* Every tensor of `mine` (a flat array in m's layout) against the same named
 * tensor of the reference file `ref`, at PARITY_TOL, failing on the first one
 * over it. Gradient mode (old == NULL): a tensor whose reference gradient is
 * noise (below PARITY_TOK_ZERO_GRAD_REL * gmax, gmax = max|gref|) must be
 * noise on the C side too. Update mode (old: the parameters before one
 * AdamW step): also the updates new - old at PARITY_DELTA_TOL, leaving out
 * elements whose reference gradient `gref` is not resolved (see
 * parityutil.c). arch supplies the parameter groups (group_of, n_groups)
 * and the embedding group whose exact zeros stay in. */
void parity_compare_tensors(const parity_tok_arch *arch, const char *what, const prm_model *m,
                            const float *mine, prm_model *ref, const float *old, prm_model *gref,
                            double gmax, parity_cmp_result *res);

/* One parity scenario of a token model. */
typedef struct parity_tok_case {
  const char *name;
  const void *model; /* the architecture's configuration */
  uint64_t pairs;    /* P: 2P sequences */
  uint64_t max_len;  /* longest sequence; context max_len */
  uint64_t stride;   /* token_stride >= max_len; the excess is garbage */
  uint64_t min_len;  /* lengths uniform in [min_len, max_len] ... */
  int edge_lengths;  /* ... plus one sequence of length 1 and one of max_len */
  uint64_t seed;     /* torch init and the batch */
  int use_margin;    /* per-pair margin m_i */
  int use_label;     /* per-pair soft label p_i */
  double center;     /* center_rewards_coefficient */
  double lr, weight_decay, max_grad_norm;
  int no_decay_1d;
} parity_tok_case;

/* cmocka fixtures: *state (a parity_tok_case, or NULL for the training run)
 * becomes a parity_run with files "parity_<arch>_<case name | train>_...". */
int parity_tok_setup(void **state, const char *arch_name);
int parity_run_teardown(void **state);

/* The whole one-step parity of case pc (the state of parity_tok_setup):
 *   1. `torch_ref.py init --model <arch>` writes the checkpoint, which the C
 *      side loads; its configuration must be the one asked for;
 *   2. a pair batch drawn here goes to batch.json with only the real tokens
 *      (torch_ref right-pads with id 0), while the C token buffer carries
 *      garbage in its padding (ids far outside [0, V), then valid random
 *      ids), which must change nothing (bit-identical scores);
 *   3. `torch_ref.py grads ... --updated-out` gives loss, scores, gradient
 *      norm, every gradient and one AdamW step's parameters;
 *   4. C: (score_inference: scores of an inference context), forward of a
 *      training context, prm_loss_bt, prm_ctx_backward, every gradient; then
 *      one prm_optimizer_step and the parameters and the update itself.
 * Scores, loss, gradients, gradient norm and parameters at PARITY_TOL, the
 * update (new - old) at PARITY_DELTA_TOL with unresolved gradients left out
 * (parity_tok_compare). Skips when the reference cannot run. */
void parity_tok_case_check(const parity_tok_arch *a, parity_run *s);

/* The 50-step training run: a torch_ref checkpoint of `model`, four ragged
 * batches of P pairs (lengths 2..n_ctx, one batch with 1 and n_ctx), with
 * margins, cycled through prm_train_step and through tests/gpt2_train_ref.py
 * (torch_ref's model, loss and optimizer: any torch_ref checkpoint) with
 * AdamW (lr, wd, clip). Every step's loss must agree to PARITY_TOK_TRAIN_LOSS_TOL
 * (absolute), its gradient norm before clipping to PARITY_TOK_TRAIN_NORM_TOL. */
void parity_tok_train_curve(const parity_tok_arch *a, parity_run *s, const void *model, uint64_t P,
                            uint64_t seed, double lr, double wd, double clip);

#endif
