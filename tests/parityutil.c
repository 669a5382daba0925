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

/* ---- token models (gpt2, llama) ----------------------------------------- */

double parity_max_abs(const float *x, uint64_t n) {
  double m = 0.0;
  for (uint64_t i = 0; i < n; i++)
    m = parity_max_d(m, fabs((double)x[i]));
  return m;
}

/*
 * max|a - ref| / max(max|ref|, PARITY_TINY) over the elements whose reference
 * gradient g (NULL: all elements) has |g_k| >= thr, or with keep_zero is
 * exactly 0 (embedding rows of tokens or positions the batch never uses:
 * their update is the decay alone, which is worth checking). The magnitude
 * runs over all elements when mag_all (a parameter's scale) or over the kept
 * ones (an update's scale). *worst: index of the largest kept difference;
 * *masked: elements left out.
 */
static double masked_err(const float *a, const float *ref, const float *g, double thr,
                         int keep_zero, uint64_t n, int mag_all, uint64_t *worst,
                         uint64_t *masked) {
  double diff = 0.0, mag = 0.0;
  *worst = 0;
  *masked = 0;
  for (uint64_t k = 0; k < n; k++) {
    int keep = g == NULL || fabs((double)g[k]) >= thr || (keep_zero && g[k] == 0.0f);
    if (keep || mag_all) mag = parity_max_d(mag, fabs((double)ref[k]));
    if (!keep) {
      (*masked)++;
      continue;
    }
    double e = fabs((double)a[k] - (double)ref[k]);
    if (!(e <= diff)) { /* NaN propagates as a failure */
      diff = e;
      *worst = k;
    }
  }
  return diff / parity_max_d(mag, PARITY_TINY);
}

/*
 * Compare every tensor of `mine` (a flat array in m's layout) with the same
 * named tensor of `ref` (a model loaded from a reference file); the two must
 * hold the same tensors. Fails on the first tensor over its tolerance,
 * naming it and its worst element. `gref` is the reference gradient and gmax
 * its largest magnitude over all tensors.
 *
 * Gradient mode (old == NULL, mine/ref are gradients): a tensor whose
 * reference gradient is below PARITY_TOK_ZERO_GRAD_REL * gmax everywhere is
 * mathematically zero and both sides hold rounding noise, for which a
 * relative error means nothing: e.g. gpt2's ln_f.bias under plain
 * Bradley-Terry (shifting every score by one constant leaves the loss
 * unchanged). There the C gradient must be below the same bound instead. (No
 * llama tensor has an exactly zero gradient in general -- RoPE makes
 * q.R(u-t)b_k depend on the key position, so even the key bias matters --
 * but the check costs nothing and keeps a noise tensor from failing.)
 *
 * Update mode (old != NULL, mine/ref are parameters after one AdamW step
 * from `old`): also compares the updates mine - old and ref - old. The first
 * AdamW step moves an element by lr g / (|g| + eps) (+ decay), i.e. about lr
 * times the SIGN of g, so an element whose gradient is not resolved by the
 * gradient check has an arbitrary update on either side. Such elements are
 * left out (counted in n_masked): |g_ref| below PARITY_TOK_UPDATE_MASK_REL times
 * its tensor's largest gradient (the gradient check's own resolution) or
 * below PARITY_TOK_ZERO_GRAD_REL * gmax, and whole tensors whose gradient is
 * noise. Exact zeros of the embeddings stay in (rows the batch never
 * touches). gpt2's key slice of attn.c_attn.bias is the main case: softmax
 * is invariant to q.b_k, so its gradient is exactly zero in exact arithmetic
 * and ~1e-12 of noise in fp32.
 */
void parity_compare_tensors(const parity_tok_arch *arch, const char *what, const prm_model *m,
                            const float *mine, prm_model *ref, const float *old, prm_model *gref,
                            double gmax, parity_cmp_result *res) {
  memset(res, 0, sizeof *res);
  assert_int_equal(prm_model_num_tensors(ref), prm_model_num_tensors(m));
  const float *ref_flat = prm_model_params(ref, NULL);
  const float *g_flat = prm_model_params(gref, NULL);
  const double zero_bound = PARITY_TOK_ZERO_GRAD_REL * gmax;
  for (uint32_t i = 0; i < prm_model_num_tensors(m); i++) {
    const char *name = NULL;
    uint64_t off = 0, shape[2] = {0, 0};
    uint32_t ndim = 0;
    assert_int_equal(prm_model_tensor_info(m, i, &name, &off, &ndim, shape), PRM_OK);
    const uint64_t roff = parity_ref_offset(ref, name, what, ndim, shape);
    const uint64_t numel = ndim == 1 ? shape[0] : shape[0] * shape[1];
    const float *a = mine + off, *r = ref_flat + roff;
    const int grp = arch->group_of(name);
    assert_true(grp >= 0 && grp < arch->n_groups);

    if (old == NULL && parity_max_abs(r, numel) <= zero_bound) {
      double mc = parity_max_abs(a, numel);
      if (!(mc <= zero_bound))
        fail_msg("%s %s: torch's gradient is zero up to rounding (max %.3g <= %.0e * %.3g), "
                 "C's is not (max %.3g)",
                 what, name, parity_max_abs(r, numel), PARITY_TOK_ZERO_GRAD_REL, gmax, mc);
      size_t len = strlen(res->zero_names);
      snprintf(res->zero_names + len, sizeof res->zero_names - len, "%s%s", len ? "," : "", name);
      res->zero_worst =
          parity_max_d(res->zero_worst, parity_max_d(mc, parity_max_abs(r, numel)) / gmax);
      continue;
    }

    const float *g = NULL;
    double thr = 0.0;
    if (old != NULL) {
      g = g_flat + parity_ref_offset(gref, name, "reference gradient", ndim, shape);
      if (parity_max_abs(g, numel) <= zero_bound) { /* noise only: nothing to compare */
        res->n_masked += numel;
        continue;
      }
      thr = parity_max_d(PARITY_TOK_UPDATE_MASK_REL * parity_max_abs(g, numel), zero_bound);
    }
    const int keep_zero = grp == arch->emb_group;
    uint64_t k = 0, masked = 0;
    double e = masked_err(a, r, g, thr, keep_zero, numel, 1, &k, &masked);
    if (!(e <= PARITY_TOL))
      fail_msg("%s %s: max|c - torch| / max|torch| = %.3g > %.0e (max|c| %.3g, max|torch| %.3g; "
               "worst element %lu: c %.9g torch %.9g)",
               what, name, e, PARITY_TOL, parity_max_abs(a, numel), parity_max_abs(r, numel),
               (unsigned long)k, (double)a[k], (double)r[k]);
    res->worst[grp] = parity_max_d(res->worst[grp], e);
    if (e >= res->all) {
      res->all = e;
      snprintf(res->worst_name, sizeof res->worst_name, "%s", name);
    }
    if (old == NULL) continue;

    res->n_masked += masked;
    float *dm = malloc(numel * sizeof *dm), *dr = malloc(numel * sizeof *dr);
    assert_non_null(dm);
    assert_non_null(dr);
    for (uint64_t q = 0; q < numel; q++) {
      dm[q] = a[q] - old[off + q];
      dr[q] = r[q] - old[off + q];
    }
    double ed = masked_err(dm, dr, g, thr, keep_zero, numel, 0, &k, &masked);
    double cm = dm[k], cr = dr[k];
    free(dm);
    free(dr);
    if (!(ed <= PARITY_DELTA_TOL))
      fail_msg("%s %s: update (new - old) error %.3g > %.0e (worst element %lu: c %.9g torch %.9g, "
               "torch gradient %.3g)",
               what, name, ed, PARITY_DELTA_TOL, (unsigned long)k, cm, cr, (double)g[k]);
    res->worst_delta[grp] = parity_max_d(res->worst_delta[grp], ed);
    if (ed >= res->all_delta) {
      res->all_delta = ed;
      snprintf(res->worst_delta_name, sizeof res->worst_delta_name, "%s", name);
    }
  }
}

static void print_groups(const parity_tok_arch *arch, const char *label, const double *w) {
  char line[256];
  int k = snprintf(line, sizeof line, "    %-14s", label);
  for (int g = 0; g < arch->n_groups && k > 0 && (size_t)k < sizeof line; g++)
    k += snprintf(line + k, sizeof line - (size_t)k, " %s %.1e", arch->group_names[g], w[g]);
  print_message("%s\n", line);
}

/* ---- token batches ------------------------------------------------------ */

/* A pair batch of 2P sequences in a (2P, stride) token buffer. */
typedef struct tok_batch {
  uint64_t P, stride;
  int32_t *tokens;
  int32_t lengths[PARITY_TOK_MAX_ROWS];
  float margin[PARITY_TOK_MAX_PAIRS], label[PARITY_TOK_MAX_PAIRS];
} tok_batch;

/* Garbage for padding slot k: ids the library would reject if it read them
 * (pattern 0), or valid but random ids (pattern 1). */
static int32_t pad_id(prmt_rng *rng, uint64_t V, int pattern, uint64_t k) {
  if (pattern == 1) return (int32_t)(prmt_next(rng) % V);
  static const int32_t bad[4] = {-1, INT32_MIN, INT32_MAX, 1 << 30};
  return k % 5 == 4 ? (int32_t)V + (int32_t)k : bad[k % 4];
}

static void fill_padding(tok_batch *b, prmt_rng *rng, uint64_t V, int pattern) {
  for (uint64_t i = 0; i < 2 * b->P; i++)
    for (uint64_t t = (uint64_t)b->lengths[i]; t < b->stride; t++)
      b->tokens[i * b->stride + t] = pad_id(rng, V, pattern, i * b->stride + t);
}

/* Random ids and lengths; lengths uniform in [min_len, max_len], and with
 * edge != 0 one length-1 and one full-length sequence (chosen row 0 full,
 * rejected row 0 of length 1, so one pair mixes both extremes). */
static void draw_batch(tok_batch *b, prmt_rng *rng, uint64_t V, uint64_t P, uint64_t max_len,
                       uint64_t min_len, uint64_t stride, int edge) {
  b->P = P;
  b->stride = stride;
  for (uint64_t i = 0; i < 2 * P; i++) {
    b->lengths[i] = (int32_t)(min_len + prmt_next(rng) % (max_len - min_len + 1));
    for (uint64_t t = 0; t < (uint64_t)b->lengths[i]; t++)
      b->tokens[i * stride + t] = (int32_t)(prmt_next(rng) % V);
  }
  if (edge) {
    b->lengths[0] = (int32_t)max_len;
    for (uint64_t t = 0; t < max_len; t++)
      b->tokens[t] = (int32_t)(prmt_next(rng) % V);
    b->lengths[P] = 1;
  }
  for (uint64_t i = 0; i < P; i++) {
    b->margin[i] = (float)(0.5 * prmt_uniform(rng) - 0.1);
    b->label[i] = (float)(0.5 + 0.5 * prmt_uniform(rng));
  }
  b->label[0] = 1.0f; /* a hard label among the soft ones */
  fill_padding(b, rng, V, 0);
}

static prm_batch as_prm_batch(const tok_batch *b) {
  return prmt_tok_batch(b->tokens, b->lengths, 2 * b->P, b->stride);
}

/* Rows [r0, r0 + n) as JSON lists of their real tokens only. */
static void write_ids(FILE *f, const tok_batch *b, uint64_t r0, uint64_t n) {
  fputc('[', f);
  for (uint64_t i = r0; i < r0 + n; i++) {
    fputs(i > r0 ? ",\n  [" : "[", f);
    for (int32_t t = 0; t < b->lengths[i]; t++)
      fprintf(f, "%s%d", t ? ", " : "", (int)b->tokens[i * b->stride + (uint64_t)t]);
    fputc(']', f);
  }
  fputc(']', f);
}

/* One batch object in torch_ref's token batch.json format. */
static void write_batch_object(FILE *f, const tok_batch *b, int margin, int label, double center) {
  const uint64_t P = b->P;
  fputs("{\"chosen_input_ids\": ", f);
  write_ids(f, b, 0, P);
  fputs(",\n \"rejected_input_ids\": ", f);
  write_ids(f, b, P, P);
  fputs(",\n \"chosen_lengths\": [", f);
  for (uint64_t i = 0; i < P; i++)
    fprintf(f, "%s%d", i ? ", " : "", (int)b->lengths[i]);
  fputs("],\n \"rejected_lengths\": [", f);
  for (uint64_t i = 0; i < P; i++)
    fprintf(f, "%s%d", i ? ", " : "", (int)b->lengths[P + i]);
  fputc(']', f);
  if (margin) {
    fputs(",\n \"margin\": ", f);
    parity_write_floats(f, b->margin, P);
  }
  if (label) {
    fputs(",\n \"label\": ", f);
    parity_write_floats(f, b->label, P);
  }
  fprintf(f, ",\n \"center_rewards_coefficient\": %.17g}", center);
}

/* ---- checkpoint and fixtures -------------------------------------------- */

/* `torch_ref.py init --model <arch>` with the flags of `model` into s->ckpt,
 * loaded into s->model, whose configuration must be `model`'s. */
static void tok_init_load(const parity_tok_arch *a, parity_run *s, const char *script,
                          const void *model, uint64_t seed) {
  char q_py[PARITY_PATH_SIZE + 16], q_script[2 * PARITY_PATH_SIZE], q_ckpt[2 * PARITY_PATH_SIZE],
      extra[512] = "", cmd[PARITY_CMD_SIZE];
  parity_shell_quote(q_py, sizeof q_py, PRM_PYTHON);
  parity_shell_quote(q_script, sizeof q_script, script);
  parity_shell_quote(q_ckpt, sizeof q_ckpt, s->ckpt);
  if (a->extra_flags != NULL) a->extra_flags(extra, sizeof extra, model);
  const parity_tok_dims d = a->dims(model);
  int len = snprintf(cmd, sizeof cmd,
                     "%s %s init --model %s --vocab %lu --ctx %lu --dim %lu --layers %lu "
                     "--heads %lu%s --seed %lu --out %s >/dev/null",
                     q_py, q_script, a->name, (unsigned long)d.vocab, (unsigned long)d.n_ctx,
                     (unsigned long)d.n_embd, (unsigned long)d.n_layer, (unsigned long)d.n_head,
                     extra, (unsigned long)seed, q_ckpt);
  assert_true(len > 0 && (size_t)len < sizeof cmd);
  free(parity_run_capture(cmd));
  s->model = parity_load(s->ckpt, "checkpoint");
  a->check_config(s->model, model);
}

int parity_tok_setup(void **state, const char *arch_name) {
  const parity_tok_case *pc = *state;
  char prefix[128];
  snprintf(prefix, sizeof prefix, "parity_%s_%s", arch_name, pc != NULL ? pc->name : "train");
  *state = parity_run_new(pc, prefix);
  return 0;
}

int parity_run_teardown(void **state) {
  parity_run_free(*state);
  return 0;
}

/* Forward the batch on s->ctx; fails the test with `what` on error. */
static void tok_forward(parity_run *s, const prm_batch *pb, float *scores, uint64_t n,
                        const char *what) {
  int st = prm_ctx_forward(s->ctx, pb, scores, n);
  if (st != PRM_OK)
    fail_msg("prm_ctx_forward (%s): %s (%s)", what, prm_status_string(st), prm_ctx_errmsg(s->ctx));
}

/* ---- one-step parity ---------------------------------------------------- */

void parity_tok_case_check(const parity_tok_arch *a, parity_run *s) {
  const parity_tok_case *pc = s->pc;
  char script[PARITY_PATH_SIZE];
  if (!parity_reference_available(a->test, script, sizeof script)) prmt_skip();
  const parity_tok_dims d = a->dims(pc->model);
  const uint64_t P = pc->pairs, n = 2 * P, V = d.vocab;
  assert_true(P >= 1 && P <= PARITY_TOK_MAX_PAIRS);
  assert_true(pc->min_len >= 1 && pc->min_len <= pc->max_len && pc->max_len <= d.n_ctx);
  assert_true(pc->stride >= pc->max_len);
  assert_true(a->n_groups >= 1 && a->n_groups <= PARITY_TOK_MAX_GROUPS);

  /* 1. checkpoint from torch_ref, loaded by the C side */
  tok_init_load(a, s, script, pc->model, pc->seed);

  /* 2. the batch; the JSON holds real tokens only, the C buffer garbage padding */
  prmt_rng rng = {pc->seed * 7919u + 17u};
  tok_batch b;
  s->input = b.tokens = malloc(n * pc->stride * sizeof *b.tokens);
  assert_non_null(b.tokens);
  draw_batch(&b, &rng, V, P, pc->max_len, pc->min_len, pc->stride, pc->edge_lengths);
  const float *mp = pc->use_margin ? b.margin : NULL, *lp = pc->use_label ? b.label : NULL;
  FILE *f = fopen(s->batch, "w");
  if (f == NULL) fail_msg("cannot write %s", s->batch);
  write_batch_object(f, &b, pc->use_margin, pc->use_label, pc->center);
  fputc('\n', f);
  assert_int_equal(fclose(f), 0);

  /* 3. the reference: gradients, one AdamW step, loss and scores */
  double ref_loss = 0.0, ref_gnorm = 0.0;
  float ref_scores[PARITY_TOK_MAX_ROWS];
  parity_reference_grads(s, script, pc->lr, pc->weight_decay, pc->max_grad_norm, pc->no_decay_1d, P,
                         &ref_loss, &ref_gnorm, ref_scores);

  /* 4a. scoring: an inference context (no activation history) */
  prm_batch pb = as_prm_batch(&b);
  float scores[PARITY_TOK_MAX_ROWS], scores_b[PARITY_TOK_MAX_ROWS];
  double e_infer = 0.0;
  if (a->score_inference) {
    s->ctx = prmt_tok_ctx(s->model, n, pc->max_len, 1);
    tok_forward(s, &pb, scores, n, "inference context");
    e_infer = parity_check_scores(scores, ref_scores, n);
    prm_ctx_free(s->ctx);
    s->ctx = NULL;
  }

  /* 4b. training context: padding invariance, then forward, loss, backward */
  s->ctx = prmt_tok_ctx(s->model, n, pc->max_len, 0);
  fill_padding(&b, &rng, V, 1); /* valid random ids in the padding */
  tok_forward(s, &pb, scores_b, n, "valid ids in the padding");
  fill_padding(&b, &rng, V, 0); /* out-of-range ids in the padding */
  tok_forward(s, &pb, scores, n, "out-of-range ids in the padding");
  if (memcmp(scores, scores_b, n * sizeof *scores) != 0)
    fail_msg("scores depend on the padding token ids");
  double e_scores = parity_check_scores(scores, ref_scores, n);

  float dscores[PARITY_TOK_MAX_ROWS];
  double e_loss = parity_check_loss(scores, P, mp, lp, pc->center, ref_loss, dscores);

  uint64_t n_params = 0;
  const float *grads = parity_backward(s, dscores, n, &n_params);
  float *params = prm_model_params(s->model, NULL);
  assert_int_equal(prm_model_num_params(s->ref_grads), n_params);
  const double gmax = parity_max_abs(prm_model_params(s->ref_grads, NULL), n_params);
  parity_cmp_result rg;
  parity_compare_tensors(a, "gradient", s->model, grads, s->ref_grads, NULL, s->ref_grads, gmax,
                         &rg);

  /* 5. one AdamW step */
  double e_gnorm =
      parity_adamw_step(s, pc->lr, pc->weight_decay, pc->max_grad_norm, pc->no_decay_1d, ref_gnorm);
  parity_cmp_result ru;
  parity_compare_tensors(a, "AdamW-updated", s->model, params, s->ref_updated, s->before,
                         s->ref_grads, gmax, &ru);

  char infer[64] = "";
  if (a->score_inference) snprintf(infer, sizeof infer, " (inference ctx %.1e)", e_infer);
  print_message("parity %s %-*s scores %.1e%s loss %.1e gnorm %.1e (|g| %.3g)\n", a->name,
                a->name_width, pc->name, e_scores, infer, e_loss, e_gnorm, ref_gnorm);
  print_message("    grads worst %.1e (%s); adamw params worst %.1e (%s); update worst %.1e (%s)\n",
                rg.all, rg.worst_name, ru.all, ru.worst_name, ru.all_delta, ru.worst_delta_name);
  print_groups(a, "grads", rg.worst);
  print_groups(a, "adamw params", ru.worst);
  print_groups(a, "adamw update", ru.worst_delta);
  if (rg.zero_names[0] != '\0')
    print_message("    zero up to rounding on both sides: %s (max |g| / max|grad| %.1e)\n",
                  rg.zero_names, rg.zero_worst);
  print_message("    adamw: %lu of %lu elements left out (|torch grad| below resolution)\n",
                (unsigned long)ru.n_masked, (unsigned long)n_params);
}

/* ---- 50-step training run ----------------------------------------------- */

void parity_tok_train_curve(const parity_tok_arch *a, parity_run *s, const void *model, uint64_t P,
                            uint64_t seed, double lr, double wd, double clip) {
  char script[PARITY_PATH_SIZE], train_ref[PARITY_PATH_SIZE];
  if (!parity_reference_available(a->test, script, sizeof script)) prmt_skip();
  /* tests/gpt2_train_ref.py sits next to this file (CMake compiles it by its
   * absolute path); it trains any torch_ref checkpoint */
  const char *slash = strrchr(__FILE__, '/');
  if (slash == NULL)
    snprintf(train_ref, sizeof train_ref, "gpt2_train_ref.py");
  else
    snprintf(train_ref, sizeof train_ref, "%.*s/gpt2_train_ref.py", (int)(slash - __FILE__),
             __FILE__);
  FILE *f = fopen(train_ref, "r");
  if (f == NULL) fail_msg("%s is missing", train_ref);
  fclose(f);
  assert_true(P >= 1 && P <= PARITY_TOK_MAX_PAIRS);

  const parity_tok_dims d = a->dims(model);
  const uint64_t V = d.vocab, T = d.n_ctx;
  tok_init_load(a, s, script, model, seed);

  /* four ragged batches (one with lengths 1 and T), with margins */
  const uint64_t n = 2 * P;
  prmt_rng rng = {seed * 104729u + 5u};
  tok_batch b[PARITY_TOK_TRAIN_BATCHES];
  int32_t *tokens = s->input = malloc(PARITY_TOK_TRAIN_BATCHES * n * T * sizeof *tokens);
  assert_non_null(tokens);
  f = fopen(s->batch, "w");
  if (f == NULL) fail_msg("cannot write %s", s->batch);
  fputs("{\"batches\": [", f);
  for (int k = 0; k < PARITY_TOK_TRAIN_BATCHES; k++) {
    b[k].tokens = tokens + (uint64_t)k * n * T;
    draw_batch(&b[k], &rng, V, P, T, 2, T, k == 0);
    if (k) fputs(",\n", f);
    write_batch_object(f, &b[k], 1, 0, 0.0);
  }
  fputs("]}\n", f);
  assert_int_equal(fclose(f), 0);

  char q_py[PARITY_PATH_SIZE + 16], q_script[2 * PARITY_PATH_SIZE], q_ref[2 * PARITY_PATH_SIZE],
      q_ckpt[2 * PARITY_PATH_SIZE], q_batch[2 * PARITY_PATH_SIZE], cmd[PARITY_CMD_SIZE];
  parity_shell_quote(q_py, sizeof q_py, PRM_PYTHON);
  parity_shell_quote(q_script, sizeof q_script, train_ref);
  parity_shell_quote(q_ref, sizeof q_ref, script);
  parity_shell_quote(q_ckpt, sizeof q_ckpt, s->ckpt);
  parity_shell_quote(q_batch, sizeof q_batch, s->batch);
  int len = snprintf(cmd, sizeof cmd,
                     "%s %s --torch-ref %s --ckpt %s --batches %s --steps %d --lr %.17g "
                     "--weight-decay %.17g --max-grad-norm %.17g",
                     q_py, q_script, q_ref, q_ckpt, q_batch, PARITY_TOK_TRAIN_STEPS, lr, wd, clip);
  assert_true(len > 0 && (size_t)len < sizeof cmd);
  const char *out = s->out = parity_run_capture(cmd);
  double ref_loss[PARITY_TOK_TRAIN_STEPS], ref_norm[PARITY_TOK_TRAIN_STEPS];
  parity_json_list(out, "losses", ref_loss, PARITY_TOK_TRAIN_STEPS);
  parity_json_list(out, "grad_norms", ref_norm, PARITY_TOK_TRAIN_STEPS);

  s->ctx = prmt_tok_ctx(s->model, n, T, 0);
  s->opt = parity_adamw(s->model, lr, wd, clip, 0);
  double worst = 0.0, worst_norm = 0.0, c_loss[PARITY_TOK_TRAIN_STEPS];
  int worst_step = 0;
  for (int step = 0; step < PARITY_TOK_TRAIN_STEPS; step++) {
    const tok_batch *bk = &b[step % PARITY_TOK_TRAIN_BATCHES];
    prm_batch pb = as_prm_batch(bk);
    prm_loss_options lo;
    assert_int_equal(prm_loss_options_init(&lo, PRM_LOSS_OPTIONS_VERSION), PRM_OK);
    lo.margin = bk->margin;
    prm_loss_stats stats;
    assert_int_equal(prm_loss_stats_init(&stats, PRM_LOSS_STATS_VERSION), PRM_OK);
    int st = prm_train_step(s->ctx, s->opt, &pb, &lo, &stats);
    if (st != PRM_OK)
      fail_msg("prm_train_step %d: %s (%s)", step, prm_status_string(st), prm_ctx_errmsg(s->ctx));
    c_loss[step] = stats.loss;
    double dl = fabs(stats.loss - ref_loss[step]);
    if (!(dl <= PARITY_TOK_TRAIN_LOSS_TOL))
      fail_msg("step %d: loss C %.9g, torch %.9g (|diff| %.3g > %.0e)", step, stats.loss,
               ref_loss[step], dl, PARITY_TOK_TRAIN_LOSS_TOL);
    if (dl > worst) {
      worst = dl;
      worst_step = step;
    }
    double en = parity_scalar_err(prm_optimizer_last_grad_norm(s->opt), ref_norm[step]);
    if (!(en <= PARITY_TOK_TRAIN_NORM_TOL))
      fail_msg("step %d: grad norm C %.9g, torch %.9g (rel %.3g > %.0e)", step,
               prm_optimizer_last_grad_norm(s->opt), ref_norm[step], en, PARITY_TOK_TRAIN_NORM_TOL);
    worst_norm = parity_max_d(worst_norm, en);
  }
  assert_int_equal(prm_optimizer_num_updates(s->opt), PARITY_TOK_TRAIN_STEPS);
  print_message("train %s %d steps: loss %.6f -> %.6f (torch %.6f -> %.6f); max |loss diff| "
                "%.2e (step %d); grad norm worst rel %.1e\n",
                a->name, PARITY_TOK_TRAIN_STEPS, c_loss[0], c_loss[PARITY_TOK_TRAIN_STEPS - 1],
                ref_loss[0], ref_loss[PARITY_TOK_TRAIN_STEPS - 1], worst, worst_step, worst_norm);
}
