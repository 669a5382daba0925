#define _POSIX_C_SOURCE 200809L /* popen, pclose */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
/* cmocka.h needs the three headers above first */
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>

#include "parityutil.h"
#include "testutil.h"

#define OUT_SIZE 65536

/* ---- metric ------------------------------------------------------------- */

double parity_max_d(double a, double b) { return a > b ? a : b; }

double parity_tensor_err(const float *a, const float *ref, uint64_t n) {
  double diff = 0.0, mag = 0.0;
  for (uint64_t i = 0; i < n; i++) {
    double e = fabs((double)a[i] - (double)ref[i]);
    if (!(e <= diff)) diff = e; /* NaN propagates as a failure */
    mag = parity_max_d(mag, fabs((double)ref[i]));
  }
  return diff / parity_max_d(mag, PARITY_TINY);
}

double parity_scalar_err(double a, double ref) {
  double e = fabs(a - ref) / parity_max_d(fabs(ref), PARITY_TINY);
  return e == e ? e : INFINITY;
}

/* ---- running the reference ---------------------------------------------- */

int parity_reference_available(const char *test, char *script, size_t size) {
  if (!prmt_shared_path(script, size, "reference/torch_ref.py")) {
    fprintf(stderr, "%s: skipped: shared folder %s is absent\n", test, PRM_SHARED_DIR);
    return 0;
  }
  FILE *f = fopen(script, "r");
  if (f == NULL) {
    fprintf(stderr, "%s: skipped: %s is missing\n", test, script);
    return 0;
  }
  fclose(f);
  if (!prmt_have_torch()) {
    fprintf(stderr, "%s: skipped: %s cannot import torch\n", test, PRM_PYTHON);
    return 0;
  }
  return 1;
}

void parity_shell_quote(char *buf, size_t size, const char *s) {
  /* single quotes; an embedded ' becomes '\'' */
  size_t k = 0;
  if (k + 1 < size) buf[k++] = '\'';
  for (; *s && k + 5 < size; s++) {
    if (*s == '\'') {
      memcpy(buf + k, "'\\''", 4);
      k += 4;
    } else {
      buf[k++] = *s;
    }
  }
  if (k + 1 < size) buf[k++] = '\'';
  buf[k] = '\0';
}

char *parity_run_capture(const char *cmd) {
  FILE *p = popen(cmd, "r");
  if (p == NULL) fail_msg("popen failed: %s", cmd);
  char *out = malloc(OUT_SIZE);
  assert_non_null(out);
  size_t n = fread(out, 1, OUT_SIZE - 1, p);
  out[n] = '\0';
  /* drain anything beyond the buffer so the child never blocks */
  char sink[4096];
  while (fread(sink, 1, sizeof sink, p) > 0) {
  }
  int st = pclose(p);
  if (st == -1 || !WIFEXITED(st) || WEXITSTATUS(st) != 0) {
    fprintf(stderr, "command failed (status %d): %s\nstdout: %s\n", st, cmd, out);
    free(out);
    fail_msg("reference command failed: %s", cmd);
  }
  return out;
}

/* Start of the value after `"key":` in a JSON text, or NULL. */
static const char *json_value(const char *json, const char *key) {
  char pat[128];
  snprintf(pat, sizeof pat, "\"%s\"", key);
  const char *s = strstr(json, pat);
  if (s == NULL) return NULL;
  s += strlen(pat);
  while (*s == ' ')
    s++;
  if (*s != ':') return NULL;
  s++;
  while (*s == ' ')
    s++;
  return s;
}

double parity_json_number(const char *json, const char *key) {
  const char *s = json_value(json, key);
  if (s == NULL) fail_msg("reference output lacks \"%s\": %s", key, json);
  char *end = NULL;
  double v = strtod(s, &end);
  if (end == s) fail_msg("reference \"%s\" is not a number: %.40s", key, s);
  return v;
}

void parity_json_list(const char *json, const char *key, double *out, uint64_t n) {
  const char *s = json_value(json, key);
  if (s == NULL || *s != '[') fail_msg("reference output lacks list \"%s\"", key);
  s++;
  for (uint64_t i = 0; i < n; i++) {
    char *end = NULL;
    out[i] = strtod(s, &end);
    if (end == s) fail_msg("reference \"%s\"[%lu] is not a number", key, (unsigned long)i);
    s = end;
    while (*s == ' ')
      s++;
    if (i + 1 < n) {
      if (*s != ',')
        fail_msg("reference \"%s\" has %lu entries, expected %lu", key, (unsigned long)(i + 1),
                 (unsigned long)n);
      s++;
    }
  }
  if (*s != ']') fail_msg("reference \"%s\" has more than %lu entries", key, (unsigned long)n);
}

void parity_write_floats(FILE *f, const float *x, uint64_t n) {
  fputc('[', f);
  for (uint64_t i = 0; i < n; i++)
    fprintf(f, "%s%.9g", i ? ", " : "", (double)x[i]);
  fputc(']', f);
}

/* ---- models ------------------------------------------------------------- */

prm_model *parity_load(const char *path, const char *what) {
  prm_model *m = NULL;
  int st = prm_model_load(&m, path);
  if (st != PRM_OK)
    fail_msg("prm_model_load(%s file %s): %s (%s)", what, path, prm_status_string(st),
             prm_last_errmsg());
  return m;
}

uint32_t parity_find_tensor(const prm_model *m, const char *name, const char *what) {
  uint32_t n = prm_model_num_tensors(m);
  for (uint32_t i = 0; i < n; i++) {
    const char *nm = NULL;
    assert_int_equal(prm_model_tensor_info(m, i, &nm, NULL, NULL, NULL), PRM_OK);
    if (strcmp(nm, name) == 0) return i;
  }
  fail_msg("tensor %s missing from the %s file", name, what);
  return 0;
}

uint64_t parity_ref_offset(prm_model *ref, const char *name, const char *what, uint32_t ndim,
                           const uint64_t shape[2]) {
  uint64_t roff = 0, rshape[2] = {0, 0};
  uint32_t rndim = 0;
  uint32_t j = parity_find_tensor(ref, name, what);
  assert_int_equal(prm_model_tensor_info(ref, j, NULL, &roff, &rndim, rshape), PRM_OK);
  assert_int_equal(rndim, ndim);
  assert_int_equal(rshape[0], shape[0]);
  assert_int_equal(rshape[1], shape[1]);
  return roff;
}

prm_optimizer *parity_adamw(prm_model *m, double lr, double wd, double clip, int no_decay_1d) {
  prm_optimizer_options oo;
  assert_int_equal(prm_optimizer_options_init(&oo, PRM_OPTIMIZER_OPTIONS_VERSION), PRM_OK);
  oo.algorithm = PRM_OPT_ADAMW;
  oo.lr = lr;
  oo.beta1 = 0.9;
  oo.beta2 = 0.999;
  oo.eps = 1e-8;
  oo.weight_decay = wd;
  oo.max_grad_norm = clip;
  oo.no_decay_1d = no_decay_1d;
  prm_optimizer *opt = NULL;
  int st = prm_optimizer_new(&opt, m, &oo);
  if (st != PRM_OK)
    fail_msg("prm_optimizer_new: %s (%s)", prm_status_string(st), prm_last_errmsg());
  return opt;
}

/* ---- one case ----------------------------------------------------------- */

parity_run *parity_run_new(const void *pc, const char *prefix) {
  parity_run *s = calloc(1, sizeof *s);
  assert_non_null(s);
  s->pc = pc;
  char tag[128];
  snprintf(tag, sizeof tag, "%s_ckpt.safetensors", prefix);
  prmt_tmp_path(s->ckpt, sizeof s->ckpt, tag);
  snprintf(tag, sizeof tag, "%s_batch.json", prefix);
  prmt_tmp_path(s->batch, sizeof s->batch, tag);
  snprintf(tag, sizeof tag, "%s_grads.safetensors", prefix);
  prmt_tmp_path(s->grads, sizeof s->grads, tag);
  snprintf(tag, sizeof tag, "%s_updated.safetensors", prefix);
  prmt_tmp_path(s->updated, sizeof s->updated, tag);
  return s;
}

void parity_run_free(parity_run *s) {
  prm_optimizer_free(s->opt);
  prm_ctx_free(s->ctx);
  prm_model_free(s->model);
  prm_model_free(s->ref_grads);
  prm_model_free(s->ref_updated);
  free(s->input);
  free(s->out);
  free(s->before);
  remove(s->ckpt);
  remove(s->batch);
  remove(s->grads);
  remove(s->updated);
  free(s);
}

void parity_reference_grads(parity_run *s, const char *script, double lr, double wd, double clip,
                            int no_decay_1d, uint64_t P, double *loss, double *grad_norm,
                            float *ref_scores) {
  char q_py[PARITY_PATH_SIZE + 16], q_script[2 * PARITY_PATH_SIZE], q_ckpt[2 * PARITY_PATH_SIZE],
      q_batch[2 * PARITY_PATH_SIZE], q_grads[2 * PARITY_PATH_SIZE], q_upd[2 * PARITY_PATH_SIZE],
      cmd[PARITY_CMD_SIZE];
  parity_shell_quote(q_py, sizeof q_py, PRM_PYTHON);
  parity_shell_quote(q_script, sizeof q_script, script);
  parity_shell_quote(q_ckpt, sizeof q_ckpt, s->ckpt);
  parity_shell_quote(q_batch, sizeof q_batch, s->batch);
  parity_shell_quote(q_grads, sizeof q_grads, s->grads);
  parity_shell_quote(q_upd, sizeof q_upd, s->updated);
  int len = snprintf(cmd, sizeof cmd,
                     "%s %s grads --ckpt %s --batch %s --out %s --updated-out %s --lr %.17g "
                     "--weight-decay %.17g --max-grad-norm %.17g%s",
                     q_py, q_script, q_ckpt, q_batch, q_grads, q_upd, lr, wd, clip,
                     no_decay_1d ? " --no-decay-1d" : "");
  assert_true(len > 0 && (size_t)len < sizeof cmd);
  const char *out = s->out = parity_run_capture(cmd);
  *loss = parity_json_number(out, "loss");
  *grad_norm = parity_json_number(out, "grad_norm");
  double *rewards = malloc(2 * P * sizeof *rewards);
  assert_non_null(rewards);
  parity_json_list(out, "rewards_chosen", rewards, P);
  parity_json_list(out, "rewards_rejected", rewards + P, P);
  for (uint64_t i = 0; i < 2 * P; i++)
    ref_scores[i] = (float)rewards[i];
  free(rewards);
  s->ref_grads = parity_load(s->grads, "reference gradient");
  s->ref_updated = parity_load(s->updated, "reference updated-parameter");
}

double parity_check_scores(const float *scores, const float *ref_scores, uint64_t n) {
  double e_scores = parity_tensor_err(scores, ref_scores, n);
  if (!(e_scores <= PARITY_TOL))
    fail_msg("scores: max|c - torch| / max|torch| = %.3g > %.0e", e_scores, PARITY_TOL);
  return e_scores;
}

double parity_check_loss(const float *scores, uint64_t P, const float *margin, const float *label,
                         double center, double ref_loss, float *dscores) {
  prm_loss_options lo;
  assert_int_equal(prm_loss_options_init(&lo, PRM_LOSS_OPTIONS_VERSION), PRM_OK);
  lo.margin = margin;
  lo.label = label;
  lo.center_coef = center;
  double loss = NAN;
  int st = prm_loss_bt(scores, scores + P, P, &lo, &loss, NULL, dscores, dscores + P);
  if (st != PRM_OK) fail_msg("prm_loss_bt: %s (%s)", prm_status_string(st), prm_last_errmsg());
  double e_loss = parity_scalar_err(loss, ref_loss);
  if (!(e_loss <= PARITY_TOL))
    fail_msg("loss: C %.9g, torch %.9g (rel %.3g > %.0e)", loss, ref_loss, e_loss, PARITY_TOL);
  return e_loss;
}

const float *parity_backward(parity_run *s, const float *dscores, uint64_t n, uint64_t *n_params) {
  int st = prm_ctx_backward(s->ctx, dscores, n);
  if (st != PRM_OK)
    fail_msg("prm_ctx_backward: %s (%s)", prm_status_string(st), prm_ctx_errmsg(s->ctx));
  uint64_t n_grads = 0;
  *n_params = 0;
  const float *grads = prm_ctx_grads(s->ctx, &n_grads);
  prm_model_params(s->model, n_params);
  assert_non_null(grads);
  assert_int_equal(n_grads, *n_params);
  return grads;
}

double parity_adamw_step(parity_run *s, double lr, double wd, double clip, int no_decay_1d,
                         double ref_grad_norm) {
  uint64_t n_params = 0;
  const float *params = prm_model_params(s->model, &n_params);
  s->before = malloc(n_params * sizeof *s->before);
  assert_non_null(s->before);
  memcpy(s->before, params, n_params * sizeof *params);
  s->opt = parity_adamw(s->model, lr, wd, clip, no_decay_1d);
  int st = prm_optimizer_step(s->opt, s->ctx);
  if (st != PRM_OK)
    fail_msg("prm_optimizer_step: %s (%s)", prm_status_string(st), prm_optimizer_errmsg(s->opt));
  assert_int_equal(prm_optimizer_num_updates(s->opt), 1);
  double e_gnorm = parity_scalar_err(prm_optimizer_last_grad_norm(s->opt), ref_grad_norm);
  if (!(e_gnorm <= PARITY_TOL))
    fail_msg("grad norm: C %.9g, torch %.9g (rel %.3g > %.0e)",
             prm_optimizer_last_grad_norm(s->opt), ref_grad_norm, e_gnorm, PARITY_TOL);
  return e_gnorm;
}
