/*
 * test_parity_gpt2.c - the gpt2 architecture against the PyTorch reference
 * (../shared/reference/torch_ref.py, Hugging Face GPT2ForSequenceClassification
 * math): scores, loss, every parameter gradient, the global gradient norm and
 * one AdamW step for three configurations, and a 50-step training run whose
 * loss curve must follow PyTorch's.
 *
 * Per parity case:
 *   1. `torch_ref.py init --model gpt2` writes the checkpoint (HF names and
 *      config metadata); the C side loads it with prm_model_load;
 *   2. the test draws its own pair batch (ids, ragged lengths, optional
 *      margin / soft label / centring) and writes batch.json with only the
 *      real tokens of each sequence; torch_ref right-pads with id 0. The C
 *      token buffer instead carries garbage in its padding (ids far outside
 *      [0, V), and a token_stride wider than the longest sequence in one
 *      case), which the library must never read: equal scores and gradients
 *      prove it. The C forward is also run twice with two different garbage
 *      patterns, whose scores must be bit-identical;
 *   3. `torch_ref.py grads ... --updated-out` writes the gradients under the
 *      parameter names (loadable with prm_model_load: same metadata) and one
 *      AdamW step's parameters, and prints loss, rewards and grad norm;
 *   4. C: prm_ctx_forward (2P rows, chosen then rejected), prm_loss_bt,
 *      prm_ctx_backward, compare; then one prm_optimizer_step with the same
 *      hyper-parameters and compare parameters and the update itself.
 *
 * Error metric, as test_parity.c (robust to near-zero elements):
 *     err(a, ref) = max_i |a_i - ref_i| / max(max_i |ref_i|, PARITY_TINY)
 * per tensor, over all 2P scores, and |a - ref| / |ref| for loss and grad
 * norm; all <= PARITY_TOL = 1e-4. The update new - old (~lr per element) is
 * checked with the same metric at PARITY_DELTA_TOL.
 *
 * Training run: the same torch_ref checkpoint, four batches cycled for 50
 * steps, AdamW (lr 1e-3, decay 0.01, clipping at 1) through prm_train_step in
 * C and through tests/gpt2_train_ref.py (torch_ref's model, loss and
 * optimizer) in PyTorch. Every step's loss must agree to TRAIN_LOSS_TOL
 * (absolute) and its gradient norm (before clipping) to TRAIN_NORM_TOL
 * (relative; a 1% error in lr or a missing clip already breaks the loss bound
 * within ten steps, a missing weight decay only the norm bound).
 *
 * Skips (reason on stderr) when ../shared is absent or PRM_PYTHON cannot
 * import torch. Eight reference runs in all (four init, three grads, one
 * training run), about 10 s on 2 cores.
 */
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

#include "testutil.h"

#define PARITY_TOL 1e-4
#define PARITY_DELTA_TOL 1e-3
#define PARITY_TINY 1e-12
#define ZERO_GRAD_REL 1e-6   /* gradient tensors below this * max|grad| are noise */
#define UPDATE_MASK_REL 1e-4 /* AdamW: elements below this * tensor max are noise */
#define TRAIN_LOSS_TOL 1e-3  /* per-step loss, absolute */
#define TRAIN_NORM_TOL 1e-3  /* per-step gradient norm before clipping, relative */
#define MAX_PAIRS 8
#define MAX_ROWS (2 * MAX_PAIRS)
#define TRAIN_STEPS 50
#define TRAIN_BATCHES 4
#define PATH_SIZE 1024
#define CMD_SIZE 16384
#define OUT_SIZE 65536

/* One parity scenario. */
typedef struct gpt2_case {
  const char *name;
  uint64_t vocab, n_ctx, n_embd, n_layer, n_head; /* model */
  uint64_t pairs;                                 /* P: 2P sequences */
  uint64_t max_len;                               /* longest sequence; context max_len */
  uint64_t stride;  /* token_stride >= max_len; the excess is garbage */
  uint64_t min_len; /* lengths uniform in [min_len, max_len] ... */
  int edge_lengths; /* ... plus one sequence of length 1 and one of max_len */
  uint64_t seed;    /* torch init and the batch */
  int use_margin;   /* per-pair margin m_i */
  int use_label;    /* per-pair soft label p_i */
  double center;    /* center_rewards_coefficient */
  double lr, weight_decay, max_grad_norm;
  int no_decay_1d;
} gpt2_case;

/* Paths and handles of one case, released by the teardown even after a
 * failed assertion. */
typedef struct gpt2_state {
  const gpt2_case *pc;
  char ckpt[PATH_SIZE], batch[PATH_SIZE], grads[PATH_SIZE], updated[PATH_SIZE];
  prm_model *model, *ref_grads, *ref_updated;
  prm_ctx *ctx;
  prm_optimizer *opt;
  int32_t *tokens; /* (TRAIN_BATCHES or 1) x (2P, stride) */
  char *out;       /* stdout of the reference */
  float *before;   /* parameters before the optimizer step */
} gpt2_state;

/* ---- small helpers ------------------------------------------------------ */

static double max_d(double a, double b) { return a > b ? a : b; }

/* max|a - ref| / max(max|ref|, PARITY_TINY) over n elements. */
static double tensor_err(const float *a, const float *ref, uint64_t n) {
  double diff = 0.0, mag = 0.0;
  for (uint64_t i = 0; i < n; i++) {
    double e = fabs((double)a[i] - (double)ref[i]);
    if (!(e <= diff)) diff = e; /* NaN propagates as a failure */
    mag = max_d(mag, fabs((double)ref[i]));
  }
  return diff / max_d(mag, PARITY_TINY);
}

static double max_abs(const float *x, uint64_t n) {
  double m = 0.0;
  for (uint64_t i = 0; i < n; i++)
    m = max_d(m, fabs((double)x[i]));
  return m;
}

static double scalar_err(double a, double ref) {
  double e = fabs(a - ref) / max_d(fabs(ref), PARITY_TINY);
  return e == e ? e : INFINITY;
}

/* Run a shell command; returns its stdout (malloc'd, NUL-terminated) or fails
 * the test when it does not exit with status 0. stderr passes through. */
static char *run_capture(const char *cmd) {
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

static double json_number(const char *json, const char *key) {
  const char *s = json_value(json, key);
  if (s == NULL) fail_msg("reference output lacks \"%s\": %s", key, json);
  char *end = NULL;
  double v = strtod(s, &end);
  if (end == s) fail_msg("reference \"%s\" is not a number: %.40s", key, s);
  return v;
}

/* A JSON list of exactly n numbers. */
static void json_list(const char *json, const char *key, double *out, uint64_t n) {
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

static void shell_quote(char *buf, size_t size, const char *s) {
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

static prm_model *load_or_fail(const char *path, const char *what) {
  prm_model *m = NULL;
  int st = prm_model_load(&m, path);
  if (st != PRM_OK)
    fail_msg("prm_model_load(%s file %s): %s (%s)", what, path, prm_status_string(st),
             prm_last_errmsg());
  return m;
}

/* ---- per-tensor comparison, reported by tensor group -------------------- */

/* Parameter groups of GPT-2, for the summary line. */
enum { G_EMB, G_LN, G_ATTN, G_MLP, G_HEAD, G_COUNT };
static const char *const group_name[G_COUNT] = {"emb", "ln", "attn", "mlp", "head"};

static int group_of(const char *name) {
  if (strstr(name, "wte.") || strstr(name, "wpe.")) return G_EMB;
  if (strstr(name, "ln_")) return G_LN;
  if (strstr(name, ".attn.")) return G_ATTN;
  if (strstr(name, ".mlp.")) return G_MLP;
  return G_HEAD;
}

typedef struct cmp_result {
  double worst[G_COUNT];       /* per group: worst tensor error */
  double worst_delta[G_COUNT]; /* per group: worst update error */
  double all, all_delta;
  char worst_name[128], worst_delta_name[128];
  char zero_names[256]; /* gradients that are zero up to rounding */
  double zero_worst;    /* their largest |c| / max|torch grad| */
  uint64_t n_masked;    /* AdamW: elements left out (noise gradient) */
} cmp_result;

/* Index of the tensor called `name` in m; fails the test if absent. */
static uint32_t find_tensor(const prm_model *m, const char *name, const char *what) {
  uint32_t n = prm_model_num_tensors(m);
  for (uint32_t i = 0; i < n; i++) {
    const char *nm = NULL;
    assert_int_equal(prm_model_tensor_info(m, i, &nm, NULL, NULL, NULL), PRM_OK);
    if (strcmp(nm, name) == 0) return i;
  }
  fail_msg("tensor %s missing from the %s file", name, what);
  return 0;
}

/* Offset of tensor `name` in ref, whose shape must be ndim/shape. */
static uint64_t ref_offset(prm_model *ref, const char *name, const char *what, uint32_t ndim,
                           const uint64_t shape[2]) {
  uint64_t roff = 0, rshape[2] = {0, 0};
  uint32_t rndim = 0;
  uint32_t j = find_tensor(ref, name, what);
  assert_int_equal(prm_model_tensor_info(ref, j, NULL, &roff, &rndim, rshape), PRM_OK);
  assert_int_equal(rndim, ndim);
  assert_int_equal(rshape[0], shape[0]);
  assert_int_equal(rshape[1], shape[1]);
  return roff;
}

/*
 * max|a - ref| / max(max|ref|, PARITY_TINY) over the elements whose reference
 * gradient g (NULL: all elements) has |g_k| >= thr, or with keep_zero is
 * exactly 0 (embedding rows of tokens or positions the batch never uses:
 * their update is the decay alone, which is worth checking). The magnitude runs over
 * all elements when mag_all (a parameter's scale) or over the kept ones (an
 * update's scale). *worst: index of the largest kept difference; *masked:
 * elements left out.
 */
static double masked_err(const float *a, const float *ref, const float *g, double thr,
                         int keep_zero, uint64_t n, int mag_all, uint64_t *worst,
                         uint64_t *masked) {
  double diff = 0.0, mag = 0.0;
  *worst = 0;
  *masked = 0;
  for (uint64_t k = 0; k < n; k++) {
    int keep = g == NULL || fabs((double)g[k]) >= thr || (keep_zero && g[k] == 0.0f);
    if (keep || mag_all) mag = max_d(mag, fabs((double)ref[k]));
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
  return diff / max_d(mag, PARITY_TINY);
}

/*
 * Compare every tensor of `mine` (a flat array in m's layout) with the same
 * named tensor of `ref` (a model loaded from a reference file). Fails on the
 * first tensor over its tolerance, naming it and its worst element.
 *
 * `gref` is the reference gradient (a loaded model) and gmax its largest
 * magnitude over all tensors.
 *
 * Gradient mode (old == NULL, mine/ref are gradients): a tensor whose
 * reference gradient is below ZERO_GRAD_REL * gmax everywhere is
 * mathematically zero and both sides hold rounding noise, for which a
 * relative error means nothing: e.g. ln_f.bias under plain Bradley-Terry
 * (shifting every score by one constant leaves the loss unchanged). There
 * the C gradient must be below the same bound instead.
 *
 * Update mode (old != NULL, mine/ref are parameters after one AdamW step
 * from `old`): also compares the updates mine - old and ref - old. The first
 * AdamW step moves an element by lr g / (|g| + eps) (+ decay), i.e. about lr
 * times the SIGN of g, so an element whose gradient is not resolved by the
 * gradient check has an arbitrary update on either side. Such elements are
 * left out (counted in n_masked): |g_ref| below UPDATE_MASK_REL times its
 * tensor's largest gradient (the gradient check's own resolution) or below
 * ZERO_GRAD_REL * gmax, and whole tensors whose gradient is noise. Exact
 * zeros of the embeddings stay in (rows the batch never touches). The key slice of attn.c_attn.bias
 * is the main case: softmax is invariant to q.b_k, so its gradient is exactly zero in exact
 * arithmetic and ~1e-12 of noise in fp32.
 */
static void compare_tensors(const char *what, const prm_model *m, const float *mine, prm_model *ref,
                            const float *old, prm_model *gref, double gmax, cmp_result *res) {
  memset(res, 0, sizeof *res);
  assert_int_equal(prm_model_num_tensors(ref), prm_model_num_tensors(m));
  const float *ref_flat = prm_model_params(ref, NULL);
  const float *g_flat = prm_model_params(gref, NULL);
  const double zero_bound = ZERO_GRAD_REL * gmax;
  for (uint32_t i = 0; i < prm_model_num_tensors(m); i++) {
    const char *name = NULL;
    uint64_t off = 0, shape[2] = {0, 0};
    uint32_t ndim = 0;
    assert_int_equal(prm_model_tensor_info(m, i, &name, &off, &ndim, shape), PRM_OK);
    const uint64_t roff = ref_offset(ref, name, what, ndim, shape);
    const uint64_t numel = ndim == 1 ? shape[0] : shape[0] * shape[1];
    const float *a = mine + off, *r = ref_flat + roff;
    const int grp = group_of(name);

    if (old == NULL && max_abs(r, numel) <= zero_bound) {
      double mc = max_abs(a, numel);
      if (!(mc <= zero_bound))
        fail_msg("%s %s: torch's gradient is zero up to rounding (max %.3g <= %.0e * %.3g), "
                 "C's is not (max %.3g)",
                 what, name, max_abs(r, numel), ZERO_GRAD_REL, gmax, mc);
      size_t len = strlen(res->zero_names);
      snprintf(res->zero_names + len, sizeof res->zero_names - len, "%s%s", len ? "," : "", name);
      res->zero_worst = max_d(res->zero_worst, max_d(mc, max_abs(r, numel)) / gmax);
      continue;
    }

    const float *g = NULL;
    double thr = 0.0;
    if (old != NULL) {
      g = g_flat + ref_offset(gref, name, "reference gradient", ndim, shape);
      if (max_abs(g, numel) <= zero_bound) { /* noise only: nothing to compare */
        res->n_masked += numel;
        continue;
      }
      thr = max_d(UPDATE_MASK_REL * max_abs(g, numel), zero_bound);
    }
    const int keep_zero = grp == G_EMB;
    uint64_t k = 0, masked = 0;
    double e = masked_err(a, r, g, thr, keep_zero, numel, 1, &k, &masked);
    if (!(e <= PARITY_TOL))
      fail_msg("%s %s: max|c - torch| / max|torch| = %.3g > %.0e (max|c| %.3g, max|torch| %.3g; "
               "worst element %lu: c %.9g torch %.9g)",
               what, name, e, PARITY_TOL, max_abs(a, numel), max_abs(r, numel), (unsigned long)k,
               (double)a[k], (double)r[k]);
    res->worst[grp] = max_d(res->worst[grp], e);
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
    res->worst_delta[grp] = max_d(res->worst_delta[grp], ed);
    if (ed >= res->all_delta) {
      res->all_delta = ed;
      snprintf(res->worst_delta_name, sizeof res->worst_delta_name, "%s", name);
    }
  }
}

static void print_groups(const char *label, const double *w) {
  char line[256];
  int k = snprintf(line, sizeof line, "    %-14s", label);
  for (int g = 0; g < G_COUNT && k > 0 && (size_t)k < sizeof line; g++)
    k += snprintf(line + k, sizeof line - (size_t)k, " %s %.1e", group_name[g], w[g]);
  print_message("%s\n", line);
}

/* ---- availability ------------------------------------------------------ */

static char g_script[PATH_SIZE];    /* torch_ref.py */
static char g_train_ref[PATH_SIZE]; /* tests/gpt2_train_ref.py, next to this file */

/* 1 when the reference can run; else prints why to stderr and returns 0. */
static int reference_available(void) {
  if (!prmt_shared_path(g_script, sizeof g_script, "reference/torch_ref.py")) {
    fprintf(stderr, "test_parity_gpt2: skipped: shared folder %s is absent\n", PRM_SHARED_DIR);
    return 0;
  }
  FILE *f = fopen(g_script, "r");
  if (f == NULL) {
    fprintf(stderr, "test_parity_gpt2: skipped: %s is missing\n", g_script);
    return 0;
  }
  fclose(f);
  if (!prmt_have_torch()) {
    fprintf(stderr, "test_parity_gpt2: skipped: %s cannot import torch\n", PRM_PYTHON);
    return 0;
  }
  return 1;
}

/* ---- batches ------------------------------------------------------------ */

/* A pair batch of 2P sequences in a (2P, stride) token buffer. */
typedef struct gpt2_batch {
  uint64_t P, stride;
  int32_t *tokens;
  int32_t lengths[MAX_ROWS];
  float margin[MAX_PAIRS], label[MAX_PAIRS];
} gpt2_batch;

/* Garbage for padding slot k: ids the library would reject if it read them
 * (pattern 0), or valid but random ids (pattern 1). */
static int32_t pad_id(prmt_rng *rng, uint64_t V, int pattern, uint64_t k) {
  if (pattern == 1) return (int32_t)(prmt_next(rng) % V);
  static const int32_t bad[4] = {-1, INT32_MIN, INT32_MAX, 1 << 30};
  return k % 5 == 4 ? (int32_t)V + (int32_t)k : bad[k % 4];
}

static void fill_padding(gpt2_batch *b, prmt_rng *rng, uint64_t V, int pattern) {
  for (uint64_t i = 0; i < 2 * b->P; i++)
    for (uint64_t t = (uint64_t)b->lengths[i]; t < b->stride; t++)
      b->tokens[i * b->stride + t] = pad_id(rng, V, pattern, i * b->stride + t);
}

/* Random ids and lengths; lengths uniform in [min_len, max_len], and with
 * edge != 0 one length-1 and one full-length sequence (chosen row 0 full,
 * rejected row 0 of length 1, so one pair mixes both extremes). */
static void draw_batch(gpt2_batch *b, prmt_rng *rng, uint64_t V, uint64_t P, uint64_t max_len,
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

static prm_batch as_prm_batch(const gpt2_batch *b) {
  prm_batch pb;
  assert_int_equal(prm_batch_init(&pb, PRM_BATCH_VERSION), PRM_OK);
  pb.n = 2 * b->P;
  pb.tokens = b->tokens;
  pb.token_stride = b->stride;
  pb.lengths = b->lengths;
  return pb;
}

/* Rows [r0, r0 + n) as JSON lists of their real tokens only. */
static void write_ids(FILE *f, const gpt2_batch *b, uint64_t r0, uint64_t n) {
  fputc('[', f);
  for (uint64_t i = r0; i < r0 + n; i++) {
    fputs(i > r0 ? ",\n  [" : "[", f);
    for (int32_t t = 0; t < b->lengths[i]; t++)
      fprintf(f, "%s%d", t ? ", " : "", (int)b->tokens[i * b->stride + (uint64_t)t]);
    fputc(']', f);
  }
  fputc(']', f);
}

static void write_floats(FILE *f, const float *x, uint64_t n) {
  fputc('[', f);
  for (uint64_t i = 0; i < n; i++)
    fprintf(f, "%s%.9g", i ? ", " : "", (double)x[i]);
  fputc(']', f);
}

/* One batch object in torch_ref's gpt2 batch.json format. */
static void write_batch_object(FILE *f, const gpt2_batch *b, int margin, int label, double center) {
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
    write_floats(f, b->margin, P);
  }
  if (label) {
    fputs(",\n \"label\": ", f);
    write_floats(f, b->label, P);
  }
  fprintf(f, ",\n \"center_rewards_coefficient\": %.17g}", center);
}

/* ---- reference commands ------------------------------------------------- */

static void torch_init(const char *ckpt, uint64_t V, uint64_t T, uint64_t C, uint64_t L, uint64_t H,
                       uint64_t seed) {
  char q_py[PATH_SIZE + 16], q_script[2 * PATH_SIZE], q_ckpt[2 * PATH_SIZE], cmd[CMD_SIZE];
  shell_quote(q_py, sizeof q_py, PRM_PYTHON);
  shell_quote(q_script, sizeof q_script, g_script);
  shell_quote(q_ckpt, sizeof q_ckpt, ckpt);
  int len = snprintf(cmd, sizeof cmd,
                     "%s %s init --model gpt2 --vocab %lu --ctx %lu --dim %lu --layers %lu "
                     "--heads %lu --seed %lu --out %s >/dev/null",
                     q_py, q_script, (unsigned long)V, (unsigned long)T, (unsigned long)C,
                     (unsigned long)L, (unsigned long)H, (unsigned long)seed, q_ckpt);
  assert_true(len > 0 && (size_t)len < sizeof cmd);
  free(run_capture(cmd));
}

static void check_loaded_config(const prm_model *m, uint64_t V, uint64_t T, uint64_t C, uint64_t L,
                                uint64_t H) {
  prm_model_options mo;
  assert_int_equal(prm_model_options_init(&mo, PRM_MODEL_OPTIONS_VERSION), PRM_OK);
  assert_int_equal(prm_model_get_options(m, &mo), PRM_OK);
  assert_int_equal(mo.arch, PRM_ARCH_GPT2);
  assert_int_equal(mo.vocab_size, V);
  assert_int_equal(mo.n_ctx, T);
  assert_int_equal(mo.n_embd, C);
  assert_int_equal(mo.n_layer, L);
  assert_int_equal(mo.n_head, H);
  assert_int_equal(prm_model_trainable_offset(m), 0);
}

static prm_ctx *gpt2_ctx(const prm_model *m, uint64_t max_rows, uint64_t max_len) {
  prm_ctx_options o;
  assert_int_equal(prm_ctx_options_init(&o, PRM_CTX_OPTIONS_VERSION), PRM_OK);
  o.max_rows = max_rows;
  o.max_len = max_len;
  prm_ctx *c = NULL;
  int st = prm_ctx_new(&c, m, &o);
  if (st != PRM_OK) fail_msg("prm_ctx_new: %s (%s)", prm_status_string(st), prm_last_errmsg());
  return c;
}

static prm_optimizer *adamw(prm_model *m, double lr, double wd, double clip, int no_decay_1d) {
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

/* ---- fixtures ----------------------------------------------------------- */

static int case_setup(void **state) {
  gpt2_state *s = calloc(1, sizeof *s);
  assert_non_null(s);
  s->pc = *state;
  const char *name = s->pc != NULL ? s->pc->name : "train";
  char tag[128];
  snprintf(tag, sizeof tag, "parity_gpt2_%s_ckpt.safetensors", name);
  prmt_tmp_path(s->ckpt, sizeof s->ckpt, tag);
  snprintf(tag, sizeof tag, "parity_gpt2_%s_batch.json", name);
  prmt_tmp_path(s->batch, sizeof s->batch, tag);
  snprintf(tag, sizeof tag, "parity_gpt2_%s_grads.safetensors", name);
  prmt_tmp_path(s->grads, sizeof s->grads, tag);
  snprintf(tag, sizeof tag, "parity_gpt2_%s_updated.safetensors", name);
  prmt_tmp_path(s->updated, sizeof s->updated, tag);
  *state = s;
  return 0;
}

static int case_teardown(void **state) {
  gpt2_state *s = *state;
  prm_optimizer_free(s->opt);
  prm_ctx_free(s->ctx);
  prm_model_free(s->model);
  prm_model_free(s->ref_grads);
  prm_model_free(s->ref_updated);
  free(s->tokens);
  free(s->out);
  free(s->before);
  remove(s->ckpt);
  remove(s->batch);
  remove(s->grads);
  remove(s->updated);
  free(s);
  return 0;
}

/* ---- one-step parity ---------------------------------------------------- */

static void test_parity_case(void **state) {
  gpt2_state *s = *state;
  const gpt2_case *pc = s->pc;
  if (!reference_available()) skip();
  const uint64_t P = pc->pairs, n = 2 * P, V = pc->vocab;
  assert_true(P >= 1 && P <= MAX_PAIRS);
  assert_true(pc->min_len >= 1 && pc->min_len <= pc->max_len && pc->max_len <= pc->n_ctx);
  assert_true(pc->stride >= pc->max_len);

  /* 1. checkpoint from torch_ref, loaded by the C side */
  torch_init(s->ckpt, V, pc->n_ctx, pc->n_embd, pc->n_layer, pc->n_head, pc->seed);
  s->model = load_or_fail(s->ckpt, "checkpoint");
  check_loaded_config(s->model, V, pc->n_ctx, pc->n_embd, pc->n_layer, pc->n_head);

  /* 2. the batch; the JSON holds real tokens only, the C buffer garbage padding */
  prmt_rng rng = {pc->seed * 7919u + 17u};
  gpt2_batch b;
  s->tokens = b.tokens = malloc(n * pc->stride * sizeof *b.tokens);
  assert_non_null(b.tokens);
  draw_batch(&b, &rng, V, P, pc->max_len, pc->min_len, pc->stride, pc->edge_lengths);
  const float *mp = pc->use_margin ? b.margin : NULL, *lp = pc->use_label ? b.label : NULL;
  FILE *f = fopen(s->batch, "w");
  if (f == NULL) fail_msg("cannot write %s", s->batch);
  write_batch_object(f, &b, pc->use_margin, pc->use_label, pc->center);
  fputc('\n', f);
  assert_int_equal(fclose(f), 0);

  /* 3. the reference: gradients, one AdamW step, loss and scores */
  char q_py[PATH_SIZE + 16], q_script[2 * PATH_SIZE], q_ckpt[2 * PATH_SIZE], q_batch[2 * PATH_SIZE],
      q_grads[2 * PATH_SIZE], q_upd[2 * PATH_SIZE], cmd[CMD_SIZE];
  shell_quote(q_py, sizeof q_py, PRM_PYTHON);
  shell_quote(q_script, sizeof q_script, g_script);
  shell_quote(q_ckpt, sizeof q_ckpt, s->ckpt);
  shell_quote(q_batch, sizeof q_batch, s->batch);
  shell_quote(q_grads, sizeof q_grads, s->grads);
  shell_quote(q_upd, sizeof q_upd, s->updated);
  int len = snprintf(cmd, sizeof cmd,
                     "%s %s grads --ckpt %s --batch %s --out %s --updated-out %s --lr %.17g "
                     "--weight-decay %.17g --max-grad-norm %.17g%s",
                     q_py, q_script, q_ckpt, q_batch, q_grads, q_upd, pc->lr, pc->weight_decay,
                     pc->max_grad_norm, pc->no_decay_1d ? " --no-decay-1d" : "");
  assert_true(len > 0 && (size_t)len < sizeof cmd);
  const char *out = s->out = run_capture(cmd);
  double ref_loss = json_number(out, "loss");
  double ref_gnorm = json_number(out, "grad_norm");
  double ref_rc[MAX_PAIRS], ref_rr[MAX_PAIRS];
  json_list(out, "rewards_chosen", ref_rc, P);
  json_list(out, "rewards_rejected", ref_rr, P);
  s->ref_grads = load_or_fail(s->grads, "reference gradient");
  s->ref_updated = load_or_fail(s->updated, "reference updated-parameter");

  /* 4. the C side: padding invariance, then forward, loss, backward */
  s->ctx = gpt2_ctx(s->model, n, pc->max_len);
  prm_batch pb = as_prm_batch(&b);
  float scores[MAX_ROWS], scores_b[MAX_ROWS], ref_scores[MAX_ROWS];
  fill_padding(&b, &rng, V, 1); /* valid random ids in the padding */
  int st = prm_ctx_forward(s->ctx, &pb, scores_b, n);
  if (st != PRM_OK)
    fail_msg("prm_ctx_forward: %s (%s)", prm_status_string(st), prm_ctx_errmsg(s->ctx));
  fill_padding(&b, &rng, V, 0); /* out-of-range ids in the padding */
  st = prm_ctx_forward(s->ctx, &pb, scores, n);
  if (st != PRM_OK)
    fail_msg("prm_ctx_forward (out-of-range ids in the padding): %s (%s)", prm_status_string(st),
             prm_ctx_errmsg(s->ctx));
  if (memcmp(scores, scores_b, n * sizeof *scores) != 0)
    fail_msg("scores depend on the padding token ids");
  for (uint64_t i = 0; i < P; i++) {
    ref_scores[i] = (float)ref_rc[i];
    ref_scores[P + i] = (float)ref_rr[i];
  }
  double e_scores = tensor_err(scores, ref_scores, n);
  if (!(e_scores <= PARITY_TOL))
    fail_msg("scores: max|c - torch| / max|torch| = %.3g > %.0e", e_scores, PARITY_TOL);

  prm_loss_options lo;
  assert_int_equal(prm_loss_options_init(&lo, PRM_LOSS_OPTIONS_VERSION), PRM_OK);
  lo.margin = mp;
  lo.label = lp;
  lo.center_coef = pc->center;
  double loss = NAN;
  float dscores[MAX_ROWS];
  st = prm_loss_bt(scores, scores + P, P, &lo, &loss, NULL, dscores, dscores + P);
  if (st != PRM_OK) fail_msg("prm_loss_bt: %s (%s)", prm_status_string(st), prm_last_errmsg());
  double e_loss = scalar_err(loss, ref_loss);
  if (!(e_loss <= PARITY_TOL))
    fail_msg("loss: C %.9g, torch %.9g (rel %.3g > %.0e)", loss, ref_loss, e_loss, PARITY_TOL);

  st = prm_ctx_backward(s->ctx, dscores, n);
  if (st != PRM_OK)
    fail_msg("prm_ctx_backward: %s (%s)", prm_status_string(st), prm_ctx_errmsg(s->ctx));
  uint64_t n_grads = 0, n_params = 0;
  const float *grads = prm_ctx_grads(s->ctx, &n_grads);
  float *params = prm_model_params(s->model, &n_params);
  assert_non_null(grads);
  assert_int_equal(n_grads, n_params);
  const double gmax = max_abs(prm_model_params(s->ref_grads, NULL), n_params);
  cmp_result rg;
  compare_tensors("gradient", s->model, grads, s->ref_grads, NULL, s->ref_grads, gmax, &rg);

  /* 5. one AdamW step */
  s->before = malloc(n_params * sizeof *s->before);
  assert_non_null(s->before);
  memcpy(s->before, params, n_params * sizeof *params);
  s->opt = adamw(s->model, pc->lr, pc->weight_decay, pc->max_grad_norm, pc->no_decay_1d);
  st = prm_optimizer_step(s->opt, s->ctx);
  if (st != PRM_OK)
    fail_msg("prm_optimizer_step: %s (%s)", prm_status_string(st), prm_optimizer_errmsg(s->opt));
  assert_int_equal(prm_optimizer_num_updates(s->opt), 1);
  double e_gnorm = scalar_err(prm_optimizer_last_grad_norm(s->opt), ref_gnorm);
  if (!(e_gnorm <= PARITY_TOL))
    fail_msg("grad norm: C %.9g, torch %.9g (rel %.3g > %.0e)",
             prm_optimizer_last_grad_norm(s->opt), ref_gnorm, e_gnorm, PARITY_TOL);
  cmp_result ru;
  compare_tensors("AdamW-updated", s->model, params, s->ref_updated, s->before, s->ref_grads, gmax,
                  &ru);

  print_message("parity gpt2 %-16s scores %.1e loss %.1e gnorm %.1e (|g| %.3g)\n", pc->name,
                e_scores, e_loss, e_gnorm, ref_gnorm);
  print_message("    grads worst %.1e (%s); adamw params worst %.1e (%s); update worst %.1e (%s)\n",
                rg.all, rg.worst_name, ru.all, ru.worst_name, ru.all_delta, ru.worst_delta_name);
  print_groups("grads", rg.worst);
  print_groups("adamw params", ru.worst);
  print_groups("adamw update", ru.worst_delta);
  if (rg.zero_names[0] != '\0')
    print_message("    zero up to rounding on both sides: %s (max |g| / max|grad| %.1e)\n",
                  rg.zero_names, rg.zero_worst);
  print_message("    adamw: %lu of %lu elements left out (|torch grad| below resolution)\n",
                (unsigned long)ru.n_masked, (unsigned long)n_params);
}

/* ---- 50-step training run ------------------------------------------------ */

#define TR_V 50
#define TR_T 12
#define TR_C 16
#define TR_L 2
#define TR_H 2
#define TR_P 4
#define TR_SEED 21
#define TR_LR 1e-3
#define TR_WD 0.01
#define TR_CLIP 1.0

static void test_train_curve(void **state) {
  gpt2_state *s = *state;
  if (!reference_available()) skip();
  /* tests/gpt2_train_ref.py sits next to this file (CMake compiles it by its
   * absolute path) */
  const char *slash = strrchr(__FILE__, '/');
  if (slash == NULL)
    snprintf(g_train_ref, sizeof g_train_ref, "gpt2_train_ref.py");
  else
    snprintf(g_train_ref, sizeof g_train_ref, "%.*s/gpt2_train_ref.py", (int)(slash - __FILE__),
             __FILE__);
  FILE *f = fopen(g_train_ref, "r");
  if (f == NULL) fail_msg("%s is missing", g_train_ref);
  fclose(f);

  torch_init(s->ckpt, TR_V, TR_T, TR_C, TR_L, TR_H, TR_SEED);
  s->model = load_or_fail(s->ckpt, "checkpoint");
  check_loaded_config(s->model, TR_V, TR_T, TR_C, TR_L, TR_H);

  /* four ragged batches (one with lengths 1 and T), with margins */
  const uint64_t n = 2 * TR_P;
  prmt_rng rng = {TR_SEED * 104729u + 5u};
  gpt2_batch b[TRAIN_BATCHES];
  s->tokens = malloc(TRAIN_BATCHES * n * TR_T * sizeof *s->tokens);
  assert_non_null(s->tokens);
  f = fopen(s->batch, "w");
  if (f == NULL) fail_msg("cannot write %s", s->batch);
  fputs("{\"batches\": [", f);
  for (int k = 0; k < TRAIN_BATCHES; k++) {
    b[k].tokens = s->tokens + (uint64_t)k * n * TR_T;
    draw_batch(&b[k], &rng, TR_V, TR_P, TR_T, 2, TR_T, k == 0);
    if (k) fputs(",\n", f);
    write_batch_object(f, &b[k], 1, 0, 0.0);
  }
  fputs("]}\n", f);
  assert_int_equal(fclose(f), 0);

  char q_py[PATH_SIZE + 16], q_script[2 * PATH_SIZE], q_ref[2 * PATH_SIZE], q_ckpt[2 * PATH_SIZE],
      q_batch[2 * PATH_SIZE], cmd[CMD_SIZE];
  shell_quote(q_py, sizeof q_py, PRM_PYTHON);
  shell_quote(q_script, sizeof q_script, g_train_ref);
  shell_quote(q_ref, sizeof q_ref, g_script);
  shell_quote(q_ckpt, sizeof q_ckpt, s->ckpt);
  shell_quote(q_batch, sizeof q_batch, s->batch);
  int len = snprintf(cmd, sizeof cmd,
                     "%s %s --torch-ref %s --ckpt %s --batches %s --steps %d --lr %.17g "
                     "--weight-decay %.17g --max-grad-norm %.17g",
                     q_py, q_script, q_ref, q_ckpt, q_batch, TRAIN_STEPS, TR_LR, TR_WD, TR_CLIP);
  assert_true(len > 0 && (size_t)len < sizeof cmd);
  const char *out = s->out = run_capture(cmd);
  double ref_loss[TRAIN_STEPS], ref_norm[TRAIN_STEPS];
  json_list(out, "losses", ref_loss, TRAIN_STEPS);
  json_list(out, "grad_norms", ref_norm, TRAIN_STEPS);

  s->ctx = gpt2_ctx(s->model, n, TR_T);
  s->opt = adamw(s->model, TR_LR, TR_WD, TR_CLIP, 0);
  double worst = 0.0, worst_norm = 0.0, c_loss[TRAIN_STEPS];
  int worst_step = 0;
  for (int step = 0; step < TRAIN_STEPS; step++) {
    const gpt2_batch *bk = &b[step % TRAIN_BATCHES];
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
    double d = fabs(stats.loss - ref_loss[step]);
    if (!(d <= TRAIN_LOSS_TOL))
      fail_msg("step %d: loss C %.9g, torch %.9g (|diff| %.3g > %.0e)", step, stats.loss,
               ref_loss[step], d, TRAIN_LOSS_TOL);
    if (d > worst) {
      worst = d;
      worst_step = step;
    }
    double en = scalar_err(prm_optimizer_last_grad_norm(s->opt), ref_norm[step]);
    if (!(en <= TRAIN_NORM_TOL))
      fail_msg("step %d: grad norm C %.9g, torch %.9g (rel %.3g > %.0e)", step,
               prm_optimizer_last_grad_norm(s->opt), ref_norm[step], en, TRAIN_NORM_TOL);
    worst_norm = max_d(worst_norm, en);
  }
  assert_int_equal(prm_optimizer_num_updates(s->opt), TRAIN_STEPS);
  print_message("train gpt2 %d steps: loss %.6f -> %.6f (torch %.6f -> %.6f); max |loss diff| "
                "%.2e (step %d); grad norm worst rel %.1e\n",
                TRAIN_STEPS, c_loss[0], c_loss[TRAIN_STEPS - 1], ref_loss[0],
                ref_loss[TRAIN_STEPS - 1], worst, worst_step, worst_norm);
}

/* ---- cases -------------------------------------------------------------- */

/* One layer, one head, every sequence full length; plain Bradley-Terry. */
static const gpt2_case case_small = {.name = "L1_H1_full",
                                     .vocab = 64,
                                     .n_ctx = 16,
                                     .n_embd = 16,
                                     .n_layer = 1,
                                     .n_head = 1,
                                     .pairs = 4,
                                     .max_len = 16,
                                     .stride = 16,
                                     .min_len = 16,
                                     .seed = 3,
                                     .lr = 1e-3,
                                     .weight_decay = 0.01,
                                     .max_grad_norm = 1.0};

/* Two layers, three heads, ragged lengths 1..T in one batch, a token_stride
 * wider than T (garbage beyond), margins; no decay on 1-D tensors. */
static const gpt2_case case_ragged = {.name = "L2_H3_ragged",
                                      .vocab = 50,
                                      .n_ctx = 12,
                                      .n_embd = 24,
                                      .n_layer = 2,
                                      .n_head = 3,
                                      .pairs = 6,
                                      .max_len = 12,
                                      .stride = 15,
                                      .min_len = 1,
                                      .edge_lengths = 1,
                                      .seed = 5,
                                      .use_margin = 1,
                                      .lr = 1e-3,
                                      .weight_decay = 0.01,
                                      .max_grad_norm = 1.0,
                                      .no_decay_1d = 1};

/* Three layers, four heads, sequences shorter than n_ctx (max_len 72 < 80:
 * wpe rows 72..79 get no gradient) and longer than the attention's 32-row
 * blocks (up to three blocks), margin + soft labels + centring. */
static const gpt2_case case_deep = {.name = "L3_H4_margin_label",
                                    .vocab = 97,
                                    .n_ctx = 80,
                                    .n_embd = 32,
                                    .n_layer = 3,
                                    .n_head = 4,
                                    .pairs = 5,
                                    .max_len = 72,
                                    .stride = 72,
                                    .min_len = 3,
                                    .edge_lengths = 1,
                                    .seed = 7,
                                    .use_margin = 1,
                                    .use_label = 1,
                                    .center = 0.1,
                                    .lr = 1e-3,
                                    .weight_decay = 0.01,
                                    .max_grad_norm = 1.0};

#define PARITY_TEST(name, c)                                                                       \
  { name, test_parity_case, case_setup, case_teardown, (void *)&(c) }

int main(void) {
  const struct CMUnitTest tests[] = {
      PARITY_TEST("parity_gpt2_L1_H1_full", case_small),
      PARITY_TEST("parity_gpt2_L2_H3_ragged_no_decay_1d", case_ragged),
      PARITY_TEST("parity_gpt2_L3_H4_margin_label_center", case_deep),
      {"parity_gpt2_train_50_steps", test_train_curve, case_setup, case_teardown, NULL},
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
