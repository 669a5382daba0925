/*
 * test_parity_rank.c - the tie and ranking losses against the PyTorch
 * reference (../shared/reference/torch_ref.py): the pure loss functions on
 * given rewards, and the whole forward / loss / backward / AdamW step of
 * every architecture on tie and ranking batches.
 *
 * Pure losses (`torch_ref.py loss`, float64): prm_loss_bt with Rao-Kupper
 * (theta 1.5, 3, and 1 = Bradley-Terry) and Davidson (nu 0.5, 2, and 0) ties
 * mixed with untied pairs, per-pair weights (one of them 0), margins, soft
 * labels (0, 1 and in between) and reward centring; plain weighted
 * Bradley-Terry; prm_loss_rank pairwise (InstructGPT) and Plackett-Luce over
 * groups of different K (3, 2, 4, 5; and 2, 2, 6) with per-group weights;
 * and rewards of +-1e30 mixed with ordinary ones (ties between two extreme
 * rewards included), whose loss and gradients must be finite and equal the
 * reference's. Compared: the loss and every d(loss)/d(reward); the
 * gradients also over the ordinary pairs / groups alone, so that extreme
 * values cannot hide an error in them; without centring, that each pair's
 * and each group's gradient sums to 0 (the losses depend on differences of
 * rewards only); a few statistics that follow from the inputs (loss,
 * counts of tied and compared pairs, all finite).
 *
 * Through the models (linear, mlp, gpt2, llama): `torch_ref.py init ...
 * --ties rao-kupper|davidson --tie-param X [--weights]` or `--ranking
 * pairwise|plackett-luce --group-sizes 3,2,4 [--weights]` writes a
 * checkpoint and a batch.json (pairs come with margins; some cases add
 * centring through `grads --center-rewards`); `torch_ref.py grads
 * --updated-out` gives scores, loss, d(loss)/d(reward), every parameter
 * gradient, the gradient norm and one AdamW step (lr 1e-3, decay 0.01,
 * clipping at 1). The C side reads the same batch.json and runs
 * prm_ctx_forward, prm_loss_bt / prm_loss_rank and prm_ctx_backward, then
 * prm_optimizer_step, compared as in the other parity tests
 * (parity_compare_tensors: gradients at PARITY_TOL, gradients that are
 * rounding noise on both sides allowed as noise, updates at
 * PARITY_DELTA_TOL without the unresolved elements). Then the one-call
 * paths on a fresh copy of the checkpoint: prm_evaluate / prm_evaluate_groups
 * and prm_train_step (tie options) / prm_train_step_groups must give the
 * manual path's loss and gradient norm to ONECALL_TOL and its updated
 * parameters (and so the reference's).
 *
 * Error metric (parityutil.h):
 *     err(a, ref) = max_i |a_i - ref_i| / max(max_i |ref_i|, PARITY_TINY)
 * over a vector, |a - ref| / |ref| for a scalar; <= PARITY_TOL = 1e-4.
 *
 * Speed: one reference process serves every case. The first test that needs
 * the reference writes all the inputs and a list of torch_ref command lines,
 * and one Python process imports torch_ref.py as a module (as
 * tests/gpt2_train_ref.py does) and runs each command line through its own
 * argument parser and main(), its stdout going to a file per command: the
 * same code as one `torch_ref.py` run per command, without a torch import
 * (~2 s) for each.
 *
 * Skips (reason on stderr) when ../shared is absent or PRM_PYTHON cannot
 * import torch.
 */
#define _POSIX_C_SOURCE 200809L /* clock_gettime */
// clang-format off
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
/* cmocka.h needs the three headers above first */
#include <cmocka.h>
// clang-format on

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "parityutil.h"
#include "testutil.h"

#define MAX_PAIRS 16
#define MAX_GROUPS 8
#define MAX_ROWS 32      /* scores of one batch */
#define MAX_VALUES 4096  /* numbers of one batch.json field */
#define EXTREME 1e30f    /* the extreme reward */
#define ONECALL_TOL 1e-6 /* one-call path vs manual path: loss, gradient norm */
#define REF_FAILED_MARK "REFERENCE FAILED"

/* AdamW of the model cases (also torch_ref grads --updated-out). */
#define OPT_LR 1e-3
#define OPT_WD 0.01
#define OPT_CLIP 1.0

/* ---- small JSON reading (torch_ref's output and batch.json) -------------- */

/* The whole file at path, NUL-terminated (malloc'd). */
static char *read_text(const char *path) {
  FILE *f = fopen(path, "rb");
  if (f == NULL) fail_msg("cannot read %s", path);
  assert_int_equal(fseek(f, 0, SEEK_END), 0);
  long size = ftell(f);
  assert_true(size >= 0);
  rewind(f);
  char *text = malloc((size_t)size + 1);
  assert_non_null(text);
  assert_int_equal(fread(text, 1, (size_t)size, f), (size_t)size);
  text[size] = '\0';
  fclose(f);
  return text;
}

/* The value after `"key":` (a key, not a string value that spells it), or NULL. */
static const char *json_find(const char *json, const char *key) {
  char pat[128];
  snprintf(pat, sizeof pat, "\"%s\"", key);
  for (const char *s = strstr(json, pat); s != NULL; s = strstr(s + 1, pat)) {
    const char *v = s + strlen(pat);
    while (*v == ' ' || *v == '\n')
      v++;
    if (*v != ':') continue;
    v++;
    while (*v == ' ' || *v == '\n')
      v++;
    return v;
  }
  return NULL;
}

/* `"key": "..."` into buf; 0 when the key is absent. */
static int json_string(const char *json, const char *key, char *buf, size_t size) {
  const char *v = json_find(json, key);
  if (v == NULL) return 0;
  if (*v != '"') fail_msg("batch.json \"%s\" is not a string", key);
  const char *e = strchr(v + 1, '"');
  assert_non_null(e);
  assert_true((size_t)(e - v - 1) < size);
  memcpy(buf, v + 1, (size_t)(e - v - 1));
  buf[e - v - 1] = '\0';
  return 1;
}

static const char *skip_space(const char *s) {
  while (*s == ' ' || *s == '\n' || *s == '\t' || *s == '\r')
    s++;
  return s;
}

/* The numbers of one JSON list at s (just after its '['); returns the
 * position after its ']'. */
static const char *json_numbers(const char *s, const char *key, double *out, uint64_t cap,
                                uint64_t *n) {
  s = skip_space(s);
  if (*s == ']') return s + 1;
  for (;;) {
    char *end = NULL;
    double v = strtod(s, &end);
    if (end == s) fail_msg("batch.json \"%s\": not a number at %.20s", key, s);
    if (*n >= cap) fail_msg("batch.json \"%s\" has more than %lu numbers", key, (unsigned long)cap);
    out[(*n)++] = v;
    s = skip_space(end);
    if (*s == ']') return s + 1;
    if (*s != ',') fail_msg("batch.json \"%s\": expected ',' at %.20s", key, s);
    s = skip_space(s + 1);
  }
}

/* `"key": [numbers]` or `"key": [[numbers], ...]` (rows, flattened into out;
 * row_len, when not NULL, receives each row's count and *n_rows their
 * number). Returns the count of numbers, or -1 when the key is absent. */
static int64_t json_array(const char *json, const char *key, double *out, uint64_t cap,
                          uint64_t *row_len, uint64_t row_cap, uint64_t *n_rows) {
  const char *s = json_find(json, key);
  if (s == NULL) return -1;
  if (*s != '[') fail_msg("batch.json \"%s\" is not a list", key);
  s = skip_space(s + 1);
  uint64_t n = 0;
  if (*s != '[') {
    json_numbers(s, key, out, cap, &n);
    return (int64_t)n;
  }
  uint64_t rows = 0;
  for (;;) {
    uint64_t before = n;
    s = json_numbers(s + 1, key, out, cap, &n);
    if (row_len != NULL) {
      if (rows >= row_cap) fail_msg("batch.json \"%s\" has too many rows", key);
      row_len[rows] = n - before;
    }
    rows++;
    s = skip_space(s);
    if (*s == ']') break;
    if (*s != ',') fail_msg("batch.json \"%s\": expected ',' between rows", key);
    s = skip_space(s + 1);
    if (*s != '[') fail_msg("batch.json \"%s\": expected a row", key);
  }
  if (n_rows != NULL) *n_rows = rows;
  return (int64_t)n;
}

/* A JSON list of n floats with "%.17g": the float's exact value. */
static void write_exact(FILE *f, const float *x, uint64_t n) {
  fputc('[', f);
  for (uint64_t i = 0; i < n; i++)
    fprintf(f, "%s%.17g", i ? ", " : "", (double)x[i]);
  fputc(']', f);
}

/* ---- files -------------------------------------------------------------- */

/* "<tmpdir>/parity_rank_<name>_<what>.<pid>", the naming of parity_run_new. */
static void case_path(char *buf, size_t size, const char *name, const char *what) {
  char tag[160];
  snprintf(tag, sizeof tag, "parity_rank_%s_%s", name, what);
  prmt_tmp_path(buf, size, tag);
}

/* ---- pure loss cases ---------------------------------------------------- */

typedef struct loss_case {
  const char *name;
  int32_t rank_loss; /* 0: a pair batch; else a group batch with this prm_rank_loss */
  int32_t tie_model; /* pairs: prm_tie_model */
  double tie_param;
  uint64_t n;                /* pairs, or groups */
  int32_t sizes[MAX_GROUPS]; /* groups: K_g */
  int margin, label, weight; /* which per-pair (per-group: weight) arrays are given */
  int ties;                  /* pairs: tie flags (all 0 where the parameter allows none) */
  double center;             /* pairs: centring coefficient */
  int extreme;               /* rewards of +-EXTREME among ordinary ones */
  uint64_t seed;
} loss_case;

/* The inputs of one pure loss case. */
typedef struct loss_data {
  uint64_t n_scores;      /* 2P, or sum K_g */
  float scores[MAX_ROWS]; /* pairs: chosen then rejected */
  float margin[MAX_PAIRS], label[MAX_PAIRS], weight[MAX_PAIRS];
  uint8_t tie[MAX_PAIRS];
  int ordinary[MAX_ROWS]; /* the score's pair / group holds no extreme reward */
} loss_data;

static int tie_allowed(const loss_case *lc) {
  return (lc->tie_model == PRM_TIE_RAO_KUPPER && lc->tie_param > 1.0) ||
         (lc->tie_model == PRM_TIE_DAVIDSON && lc->tie_param > 0.0);
}

static void draw_loss_data(const loss_case *lc, loss_data *d) {
  prmt_rng rng = {lc->seed * 2654435761u + 99u};
  memset(d, 0, sizeof *d);
  if (lc->rank_loss) {
    for (uint64_t g = 0; g < lc->n; g++)
      d->n_scores += (uint64_t)lc->sizes[g];
  } else {
    d->n_scores = 2 * lc->n;
  }
  assert_true(d->n_scores <= MAX_ROWS && lc->n <= (lc->rank_loss ? MAX_GROUPS : MAX_PAIRS));
  for (uint64_t i = 0; i < d->n_scores; i++) {
    d->scores[i] = (float)(2.0 * prmt_normal(&rng));
    d->ordinary[i] = 1;
  }
  for (uint64_t i = 0; i < lc->n; i++) {
    d->margin[i] = (float)(0.7 * prmt_uniform(&rng) - 0.2);
    d->label[i] = i % 4 == 1 ? 0.0f : i % 4 == 2 ? 1.0f : (float)prmt_uniform(&rng);
    d->weight[i] =
        (float)(lc->rank_loss ? 0.25 + 1.5 * prmt_uniform(&rng) : 2.0 * prmt_uniform(&rng));
    d->tie[i] = tie_allowed(lc) && i % 3 == 0 && i + 1 < lc->n;
  }
  if (!lc->rank_loss && lc->n > 2) d->weight[2] = 0.0f; /* a dropped pair still counts in P */
  if (lc->rank_loss == PRM_RANK_PAIRWISE && lc->n > 1) d->weight[1] = 0.0f; /* a dropped group */
  if (!lc->extreme) return;
  const float E = EXTREME;
  if (!lc->rank_loss) {
    /* (chosen, rejected) per pair; 0 keeps the ordinary score. Pairs 3 and
     * 6 are ties (i % 3 == 0): z = 0 between two extremes and z = 2e30. */
    static const float pat[8][2] = {{0, 0},  {1, 0},  {-1, 1}, {1, 1},
                                    {0, -1}, {-1, 0}, {1, -1}, {0, 0}};
    const uint64_t P = lc->n;
    assert_int_equal(P, 8);
    for (uint64_t i = 0; i < P; i++) {
      if (pat[i][0] != 0) d->scores[i] = pat[i][0] * E;
      if (pat[i][1] != 0) d->scores[P + i] = pat[i][1] * E;
      d->ordinary[i] = d->ordinary[P + i] = pat[i][0] == 0 && pat[i][1] == 0;
    }
    return;
  }
  /* groups 3, 2, 4, 5: group 0 ordered, group 1 reversed, group 2 ordinary,
   * group 3 mixed, with two equal rewards of 1e30 for the pairwise loss.
   * Plackett-Luce gets 5e29 for the second: torch's logsumexp backward,
   * exp(r - lse), cannot resolve a tie at the top of a suffix at 1e30
   * (lse = 1e30 + log 2 rounds to 1e30 in float64, so both get weight 1
   * instead of 1/2), so the reference would be wrong there; with one
   * dominant reward per suffix exp(r - lse) is exact. */
  static const float gpat[14] = {1, 0, -1, -1, 1, 0, 0, 0, 0, 0, 1, 0, -1, 1};
  assert_int_equal(d->n_scores, 14);
  for (uint64_t i = 0; i < 14; i++) {
    const float p = i == 13 && lc->rank_loss == PRM_RANK_PLACKETT_LUCE ? 0.5f : gpat[i];
    if (p != 0) d->scores[i] = p * E;
    d->ordinary[i] = i >= 5 && i < 9;
  }
}

static const char *tie_model_name(int32_t m) {
  return m == PRM_TIE_RAO_KUPPER ? "rao-kupper" : m == PRM_TIE_DAVIDSON ? "davidson" : NULL;
}

/* The case's input of `torch_ref.py loss`: rewards plus the loss fields. */
static void write_loss_input(const loss_case *lc, const char *path) {
  loss_data d;
  draw_loss_data(lc, &d);
  FILE *f = fopen(path, "w");
  if (f == NULL) fail_msg("cannot write %s", path);
  if (lc->rank_loss) {
    fputs("{\"rewards\": ", f);
    write_exact(f, d.scores, d.n_scores);
    fputs(", \"group_sizes\": [", f);
    for (uint64_t g = 0; g < lc->n; g++)
      fprintf(f, "%s%d", g ? ", " : "", (int)lc->sizes[g]);
    fprintf(f, "], \"ranking_loss\": \"%s\"",
            lc->rank_loss == PRM_RANK_PAIRWISE ? "pairwise" : "plackett-luce");
  } else {
    fputs("{\"rewards_chosen\": ", f);
    write_exact(f, d.scores, lc->n);
    fputs(", \"rewards_rejected\": ", f);
    write_exact(f, d.scores + lc->n, lc->n);
    if (lc->margin) {
      fputs(", \"margin\": ", f);
      write_exact(f, d.margin, lc->n);
    }
    if (lc->label) {
      fputs(", \"label\": ", f);
      write_exact(f, d.label, lc->n);
    }
    fprintf(f, ", \"center_rewards_coefficient\": %.17g", lc->center);
    if (lc->tie_model != PRM_TIE_NONE) {
      fprintf(f, ", \"tie_model\": \"%s\", \"tie_param\": %.17g", tie_model_name(lc->tie_model),
              lc->tie_param);
      if (lc->ties) {
        fputs(", \"tie\": [", f);
        for (uint64_t i = 0; i < lc->n; i++)
          fprintf(f, "%s%d", i ? ", " : "", (int)d.tie[i]);
        fputc(']', f);
      }
    }
  }
  if (lc->weight) {
    fputs(", \"weight\": ", f);
    write_exact(f, d.weight, lc->n);
  }
  fputs("}\n", f);
  assert_int_equal(fclose(f), 0);
}

/* Rao-Kupper theta 1.5: every optional array, ties among untied pairs, centring. */
static const loss_case lc_rk15 = {.name = "rk15_all",
                                  .tie_model = PRM_TIE_RAO_KUPPER,
                                  .tie_param = 1.5,
                                  .n = 12,
                                  .margin = 1,
                                  .label = 1,
                                  .weight = 1,
                                  .ties = 1,
                                  .center = 0.05,
                                  .seed = 1};
/* Rao-Kupper theta 3: ties and margins only. */
static const loss_case lc_rk3 = {.name = "rk3_margin_ties",
                                 .tie_model = PRM_TIE_RAO_KUPPER,
                                 .tie_param = 3.0,
                                 .n = 9,
                                 .margin = 1,
                                 .ties = 1,
                                 .seed = 2};
/* Rao-Kupper theta 1 (no ties possible: Bradley-Terry), tie flags all 0. */
static const loss_case lc_rk1 = {.name = "rk1_no_ties",
                                 .tie_model = PRM_TIE_RAO_KUPPER,
                                 .tie_param = 1.0,
                                 .n = 6,
                                 .margin = 1,
                                 .label = 1,
                                 .ties = 1,
                                 .seed = 3};
/* Davidson nu 0.5: every optional array, centring. */
static const loss_case lc_dav05 = {.name = "dav05_all",
                                   .tie_model = PRM_TIE_DAVIDSON,
                                   .tie_param = 0.5,
                                   .n = 12,
                                   .margin = 1,
                                   .label = 1,
                                   .weight = 1,
                                   .ties = 1,
                                   .center = 0.05,
                                   .seed = 4};
/* Davidson nu 2: ties, weights and soft labels, no margin. */
static const loss_case lc_dav2 = {.name = "dav2_weight_label_ties",
                                  .tie_model = PRM_TIE_DAVIDSON,
                                  .tie_param = 2.0,
                                  .n = 9,
                                  .label = 1,
                                  .weight = 1,
                                  .ties = 1,
                                  .seed = 5};
/* Davidson nu 0 (Bradley-Terry), weights, no tie flags at all. */
static const loss_case lc_dav0 = {.name = "dav0_no_ties",
                                  .tie_model = PRM_TIE_DAVIDSON,
                                  .tie_param = 0.0,
                                  .n = 6,
                                  .weight = 1,
                                  .seed = 6};
/* Plain Bradley-Terry with weights, margins, soft labels, centring. */
static const loss_case lc_bt = {.name = "bt_weight_margin_label_center",
                                .n = 8,
                                .margin = 1,
                                .label = 1,
                                .weight = 1,
                                .center = 0.1,
                                .seed = 7};
/* InstructGPT pairwise over groups of 3, 2, 4, 5, weighted (group 1: 0). */
static const loss_case lc_rank_pw = {.name = "rank_pairwise_weight",
                                     .rank_loss = PRM_RANK_PAIRWISE,
                                     .n = 4,
                                     .sizes = {3, 2, 4, 5},
                                     .weight = 1,
                                     .seed = 8};
/* Plackett-Luce over groups of 3, 2, 4, 5, weighted. */
static const loss_case lc_rank_pl = {.name = "rank_plackett_luce_weight",
                                     .rank_loss = PRM_RANK_PLACKETT_LUCE,
                                     .n = 4,
                                     .sizes = {3, 2, 4, 5},
                                     .weight = 1,
                                     .seed = 9};
/* Plackett-Luce over 2, 2, 6, unweighted. */
static const loss_case lc_rank_pl2 = {.name = "rank_plackett_luce_k2_k6",
                                      .rank_loss = PRM_RANK_PLACKETT_LUCE,
                                      .n = 3,
                                      .sizes = {2, 2, 6},
                                      .seed = 10};
/* Pairwise over 2, 6, 3, unweighted. */
static const loss_case lc_rank_pw2 = {.name = "rank_pairwise_k2_k6_k3",
                                      .rank_loss = PRM_RANK_PAIRWISE,
                                      .n = 3,
                                      .sizes = {2, 6, 3},
                                      .seed = 11};
/* +-1e30 with Rao-Kupper 1.5: margins, soft labels, weights, ties. */
static const loss_case lc_ext_rk = {.name = "extreme_rk15",
                                    .tie_model = PRM_TIE_RAO_KUPPER,
                                    .tie_param = 1.5,
                                    .n = 8,
                                    .margin = 1,
                                    .label = 1,
                                    .weight = 1,
                                    .ties = 1,
                                    .extreme = 1,
                                    .seed = 12};
/* +-1e30 with Davidson 2: ties, soft labels and centring (d/dr ~ 1e28). */
static const loss_case lc_ext_dav = {.name = "extreme_dav2_center",
                                     .tie_model = PRM_TIE_DAVIDSON,
                                     .tie_param = 2.0,
                                     .n = 8,
                                     .label = 1,
                                     .ties = 1,
                                     .center = 0.01,
                                     .extreme = 1,
                                     .seed = 13};
/* +-1e30 with Bradley-Terry: margins, soft labels, weights. */
static const loss_case lc_ext_bt = {
    .name = "extreme_bt", .n = 8, .margin = 1, .label = 1, .weight = 1, .extreme = 1, .seed = 14};
/* +-1e30 in groups of 3, 2, 4, 5: pairwise (weighted) and Plackett-Luce. */
static const loss_case lc_ext_pw = {.name = "extreme_rank_pairwise",
                                    .rank_loss = PRM_RANK_PAIRWISE,
                                    .n = 4,
                                    .sizes = {3, 2, 4, 5},
                                    .weight = 1,
                                    .extreme = 1,
                                    .seed = 15};
static const loss_case lc_ext_pl = {.name = "extreme_rank_plackett_luce",
                                    .rank_loss = PRM_RANK_PLACKETT_LUCE,
                                    .n = 4,
                                    .sizes = {3, 2, 4, 5},
                                    .extreme = 1,
                                    .seed = 16};

static const loss_case *const loss_cases[] = {&lc_rk15,    &lc_rk3,      &lc_rk1,      &lc_dav05,
                                              &lc_dav2,    &lc_dav0,     &lc_bt,       &lc_rank_pw,
                                              &lc_rank_pl, &lc_rank_pl2, &lc_rank_pw2, &lc_ext_rk,
                                              &lc_ext_dav, &lc_ext_bt,   &lc_ext_pw,   &lc_ext_pl};
#define N_LOSS_CASES (sizeof loss_cases / sizeof loss_cases[0])

/* ---- model cases -------------------------------------------------------- */

typedef struct model_case {
  const char *name;
  int32_t arch;
  const char *model_flags; /* torch_ref init: the model */
  const char *batch_flags; /* torch_ref init: the batch and its loss */
  double center;           /* grads --center-rewards (pair batches) */
  uint64_t seed;
} model_case;

#define LINEAR "--model linear --d 16"
#define MLP "--model mlp --d 12 --hidden 16,8 --act tanh"
#define GPT2 "--model gpt2 --vocab 50 --ctx 12 --dim 16 --layers 2 --heads 2"
#define LLAMA                                                                                      \
  "--model llama --vocab 50 --ctx 12 --dim 32 --layers 2 --heads 4 --kv-heads 2 --ffn 48 "         \
  "--attn-bias --qk-norm"

static const model_case model_cases[] = {
    {"linear_rk15_weights", PRM_ARCH_LINEAR, LINEAR,
     "--pairs 6 --ties rao-kupper --tie-param 1.5 --weights", 0.0, 21},
    {"linear_dav05_center", PRM_ARCH_LINEAR, LINEAR, "--pairs 6 --ties davidson --tie-param 0.5",
     0.1, 22},
    {"linear_pairwise_weights", PRM_ARCH_LINEAR, LINEAR,
     "--ranking pairwise --group-sizes 3,2,4 --weights", 0.0, 23},
    {"linear_plackett_luce", PRM_ARCH_LINEAR, LINEAR, "--ranking plackett-luce --group-sizes 3,2,4",
     0.0, 24},
    {"mlp_rk3", PRM_ARCH_MLP, MLP, "--pairs 6 --ties rao-kupper --tie-param 3", 0.0, 31},
    {"mlp_dav2_weights", PRM_ARCH_MLP, MLP, "--pairs 6 --ties davidson --tie-param 2 --weights",
     0.0, 32},
    {"mlp_pairwise", PRM_ARCH_MLP, MLP, "--ranking pairwise --group-sizes 3,2,4", 0.0, 33},
    {"mlp_plackett_luce_weights", PRM_ARCH_MLP, MLP,
     "--ranking plackett-luce --group-sizes 3,2,4 --weights", 0.0, 34},
    {"gpt2_rk15_weights_center", PRM_ARCH_GPT2, GPT2,
     "--pairs 5 --ties rao-kupper --tie-param 1.5 --weights", 0.1, 41},
    {"gpt2_dav2", PRM_ARCH_GPT2, GPT2, "--pairs 5 --ties davidson --tie-param 2", 0.0, 42},
    {"gpt2_pairwise_weights", PRM_ARCH_GPT2, GPT2,
     "--ranking pairwise --group-sizes 3,2,4 --weights", 0.0, 43},
    {"gpt2_plackett_luce", PRM_ARCH_GPT2, GPT2, "--ranking plackett-luce --group-sizes 3,2,4", 0.0,
     44},
    {"llama_rk3", PRM_ARCH_LLAMA, LLAMA, "--pairs 5 --ties rao-kupper --tie-param 3", 0.0, 51},
    {"llama_dav05_weights_center", PRM_ARCH_LLAMA, LLAMA,
     "--pairs 5 --ties davidson --tie-param 0.5 --weights", 0.05, 52},
    {"llama_pairwise", PRM_ARCH_LLAMA, LLAMA, "--ranking pairwise --group-sizes 3,2,4", 0.0, 53},
    {"llama_plackett_luce_weights", PRM_ARCH_LLAMA, LLAMA,
     "--ranking plackett-luce --group-sizes 3,2,4 --weights", 0.0, 54},
};
#define N_MODEL_CASES (sizeof model_cases / sizeof model_cases[0])

/* Parameter groups for parity_compare_tensors: embeddings (whose exact zeros
 * stay in the update check) and the rest. */
enum { G_EMB, G_OTHER, G_COUNT };
static const char *const group_name[G_COUNT] = {"emb", "other"};
static int group_of(const char *name) {
  return strstr(name, "wte.") || strstr(name, "wpe.") || strstr(name, "embed_tokens.") ? G_EMB
                                                                                       : G_OTHER;
}
static const parity_tok_arch rank_arch = {.name = "rank",
                                          .test = "test_parity_rank",
                                          .n_groups = G_COUNT,
                                          .group_names = group_name,
                                          .group_of = group_of,
                                          .emb_group = G_EMB};

/* ---- the reference run -------------------------------------------------- */

/* Imports torch_ref.py (argv[1]) as a module and runs each line of argv[2]
 * (shell words: the stdout file, then torch_ref's command line) through its
 * parser and main(). A failing command leaves REF_FAILED_MARK in its file
 * and its traceback on stderr; the others still run. */
static const char driver_py[] =
    "import contextlib, importlib.util, os, shlex, sys, traceback\n"
    "for v in ('OMP_NUM_THREADS', 'OPENBLAS_NUM_THREADS', 'MKL_NUM_THREADS'):\n"
    "    os.environ[v] = '1'\n"
    "spec = importlib.util.spec_from_file_location('prm_torch_ref', sys.argv[1])\n"
    "ref = importlib.util.module_from_spec(spec)\n"
    "spec.loader.exec_module(ref)\n"
    "with open(sys.argv[2]) as f:\n"
    "    jobs = [shlex.split(line) for line in f if line.strip()]\n"
    "for job in jobs:\n"
    "    with open(job[0], 'w') as out, contextlib.redirect_stdout(out):\n"
    "        try:\n"
    "            ref.ARGS = ref.parse_args(job[1:])\n"
    "            ref.main()\n"
    "        except (Exception, SystemExit):\n"
    "            print('" REF_FAILED_MARK "')\n"
    "            traceback.print_exc(file=sys.stdout)\n";

enum { REF_NOT_RUN, REF_UNAVAILABLE, REF_RUNNING, REF_DONE };
static int g_ref = REF_NOT_RUN;
static char g_script[PARITY_PATH_SIZE];
static double g_ref_seconds;

static double now_s(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* One job line: the stdout file, then the words (each quoted). */
static void job_line(FILE *f, const char *out, const char *words) {
  char q[2 * PARITY_PATH_SIZE];
  parity_shell_quote(q, sizeof q, out);
  fprintf(f, "%s %s\n", q, words);
}

static void append_quoted(char *buf, size_t size, const char *flag, const char *path) {
  char q[2 * PARITY_PATH_SIZE];
  parity_shell_quote(q, sizeof q, path);
  size_t len = strlen(buf);
  int k = snprintf(buf + len, size - len, " %s %s", flag, q);
  assert_true(k > 0 && (size_t)k < size - len);
}

static void write_jobs(const char *jobs_path) {
  FILE *f = fopen(jobs_path, "w");
  if (f == NULL) fail_msg("cannot write %s", jobs_path);
  char out[PARITY_PATH_SIZE], in[PARITY_PATH_SIZE], words[PARITY_CMD_SIZE];
  for (size_t i = 0; i < N_LOSS_CASES; i++) {
    const loss_case *lc = loss_cases[i];
    case_path(in, sizeof in, lc->name, "scores.json");
    case_path(out, sizeof out, lc->name, "loss.json");
    write_loss_input(lc, in);
    snprintf(words, sizeof words, "loss");
    append_quoted(words, sizeof words, "--batch", in);
    job_line(f, out, words);
  }
  char ckpt[PARITY_PATH_SIZE], batch[PARITY_PATH_SIZE], grads[PARITY_PATH_SIZE],
      updated[PARITY_PATH_SIZE];
  for (size_t i = 0; i < N_MODEL_CASES; i++) {
    const model_case *mc = &model_cases[i];
    case_path(ckpt, sizeof ckpt, mc->name, "ckpt.safetensors");
    case_path(batch, sizeof batch, mc->name, "batch.json");
    case_path(grads, sizeof grads, mc->name, "grads.safetensors");
    case_path(updated, sizeof updated, mc->name, "updated.safetensors");
    snprintf(words, sizeof words, "init %s %s --seed %lu", mc->model_flags, mc->batch_flags,
             (unsigned long)mc->seed);
    append_quoted(words, sizeof words, "--out", ckpt);
    append_quoted(words, sizeof words, "--batch-out", batch);
    case_path(out, sizeof out, mc->name, "init.txt");
    job_line(f, out, words);
    snprintf(words, sizeof words, "grads --lr %.17g --weight-decay %.17g --max-grad-norm %.17g",
             OPT_LR, OPT_WD, OPT_CLIP);
    if (mc->center != 0.0) {
      size_t len = strlen(words);
      snprintf(words + len, sizeof words - len, " --center-rewards %.17g", mc->center);
    }
    append_quoted(words, sizeof words, "--ckpt", ckpt);
    append_quoted(words, sizeof words, "--batch", batch);
    append_quoted(words, sizeof words, "--out", grads);
    append_quoted(words, sizeof words, "--updated-out", updated);
    case_path(out, sizeof out, mc->name, "ref.json");
    job_line(f, out, words);
  }
  assert_int_equal(fclose(f), 0);
}

/* Every reference result, computed by the first test that needs one (the
 * others reuse them); skips when the reference cannot run. */
static void ensure_reference(void) {
  if (g_ref == REF_DONE) return;
  if (g_ref == REF_UNAVAILABLE) prmt_skip();
  if (g_ref == REF_RUNNING) fail_msg("the reference run failed in an earlier test");
  if (!parity_reference_available("test_parity_rank", g_script, sizeof g_script)) {
    g_ref = REF_UNAVAILABLE;
    prmt_skip();
  }
  g_ref = REF_RUNNING; /* stays so if anything below fails */
  char jobs[PARITY_PATH_SIZE], q_py[PARITY_PATH_SIZE + 16], q_code[4 * sizeof driver_py],
      q_script[2 * PARITY_PATH_SIZE], q_jobs[2 * PARITY_PATH_SIZE], cmd[PARITY_CMD_SIZE];
  case_path(jobs, sizeof jobs, "all", "jobs.txt");
  write_jobs(jobs);
  parity_shell_quote(q_py, sizeof q_py, PRM_PYTHON);
  parity_shell_quote(q_code, sizeof q_code, driver_py);
  parity_shell_quote(q_script, sizeof q_script, g_script);
  parity_shell_quote(q_jobs, sizeof q_jobs, jobs);
  int len = snprintf(cmd, sizeof cmd, "%s -c %s %s %s", q_py, q_code, q_script, q_jobs);
  assert_true(len > 0 && (size_t)len < sizeof cmd);
  double t0 = now_s();
  free(parity_run_capture(cmd));
  g_ref_seconds = now_s() - t0;
  print_message("reference: %zu torch_ref commands in one process, %.1f s\n",
                N_LOSS_CASES + 2 * N_MODEL_CASES, g_ref_seconds);
  g_ref = REF_DONE;
}

/* The stdout of one reference command; fails when the command failed. */
static char *reference_output(const char *name, const char *what) {
  char path[PARITY_PATH_SIZE];
  case_path(path, sizeof path, name, what);
  char *text = read_text(path);
  if (strstr(text, REF_FAILED_MARK) != NULL) {
    fprintf(stderr, "%s\n", text);
    free(text);
    fail_msg("torch_ref failed for %s (%s); its traceback is above", name, what);
  }
  return text;
}

/* A reference JSON list of n numbers as floats. */
static void ref_floats(const char *json, const char *key, float *out, uint64_t n) {
  double v[MAX_ROWS];
  assert_true(n <= MAX_ROWS);
  parity_json_list(json, key, v, n);
  for (uint64_t i = 0; i < n; i++)
    out[i] = (float)v[i];
}

/* ---- pure loss test ----------------------------------------------------- */

static int all_finite(const float *x, uint64_t n) {
  for (uint64_t i = 0; i < n; i++)
    if (!isfinite(x[i])) return 0;
  return 1;
}

static void check_stats_finite(const prm_loss_stats *st) {
  const double v[] = {st->loss,          st->accuracy,       st->reward_mean, st->reward_std,
                      st->margin_mean,   st->brier,          st->ece,         st->exact_rate,
                      st->tie_prob_tied, st->tie_prob_untied};
  for (size_t i = 0; i < sizeof v / sizeof v[0]; i++)
    if (!isfinite(v[i])) fail_msg("loss statistic %zu is not finite (%g)", i, v[i]);
}

static void test_loss_case(void **state) {
  const loss_case *lc = *state;
  ensure_reference();
  char *out = reference_output(lc->name, "loss.json");
  const double ref_loss = parity_json_number(out, "loss");
  loss_data d;
  draw_loss_data(lc, &d);
  const uint64_t n = d.n_scores;
  float ref_d[MAX_ROWS], dscores[MAX_ROWS];
  if (lc->rank_loss) {
    ref_floats(out, "d_rewards", ref_d, n);
  } else {
    ref_floats(out, "d_rewards_chosen", ref_d, lc->n);
    ref_floats(out, "d_rewards_rejected", ref_d + lc->n, lc->n);
  }
  free(out);

  double loss = NAN;
  prm_loss_stats stats;
  assert_int_equal(prm_loss_stats_init(&stats, PRM_LOSS_STATS_VERSION), PRM_OK);
  uint64_t n_tied = 0, n_compared = 0;
  int st;
  if (lc->rank_loss) {
    prm_rank_options ro;
    assert_int_equal(prm_rank_options_init(&ro, PRM_RANK_OPTIONS_VERSION), PRM_OK);
    ro.loss = lc->rank_loss;
    ro.weight = lc->weight ? d.weight : NULL;
    st = prm_loss_rank(d.scores, n, lc->sizes, lc->n, &ro, &loss, &stats, dscores);
    for (uint64_t g = 0; g < lc->n; g++)
      n_compared += (uint64_t)(lc->sizes[g] * (lc->sizes[g] - 1) / 2);
  } else {
    prm_loss_options lo;
    assert_int_equal(prm_loss_options_init(&lo, PRM_LOSS_OPTIONS_VERSION), PRM_OK);
    lo.margin = lc->margin ? d.margin : NULL;
    lo.label = lc->label ? d.label : NULL;
    lo.weight = lc->weight ? d.weight : NULL;
    lo.center_coef = lc->center;
    lo.tie_model = lc->tie_model;
    lo.tie_param = lc->tie_param;
    lo.tie = lc->ties ? d.tie : NULL;
    st = prm_loss_bt(d.scores, d.scores + lc->n, lc->n, &lo, &loss, &stats, dscores,
                     dscores + lc->n);
    for (uint64_t i = 0; i < lc->n; i++)
      n_tied += d.tie[i];
    n_compared = lc->n - n_tied;
  }
  if (st != PRM_OK)
    fail_msg("%s: %s (%s)", lc->rank_loss ? "prm_loss_rank" : "prm_loss_bt", prm_status_string(st),
             prm_last_errmsg());
  if (!isfinite(loss) || !all_finite(dscores, n))
    fail_msg("loss %g or its gradient is not finite", loss);

  const double e_loss = parity_scalar_err(loss, ref_loss);
  if (!(e_loss <= PARITY_TOL))
    fail_msg("loss: C %.17g, torch %.17g (rel %.3g > %.0e)", loss, ref_loss, e_loss, PARITY_TOL);
  const double e_grad = parity_tensor_err(dscores, ref_d, n);
  if (!(e_grad <= PARITY_TOL)) {
    for (uint64_t i = 0; i < n; i++)
      fprintf(stderr, "  d/dr[%lu]: C %.9g torch %.9g\n", (unsigned long)i, (double)dscores[i],
              (double)ref_d[i]);
    fail_msg("d loss / d reward: err %.3g > %.0e", e_grad, PARITY_TOL);
  }
  /* the ordinary pairs / groups alone, when extremes are mixed in */
  double e_ord = e_grad;
  if (lc->extreme) {
    float a[MAX_ROWS], r[MAX_ROWS];
    uint64_t k = 0;
    for (uint64_t i = 0; i < n; i++)
      if (d.ordinary[i]) {
        a[k] = dscores[i];
        r[k++] = ref_d[i];
      }
    assert_true(k > 0);
    e_ord = parity_tensor_err(a, r, k);
    if (!(e_ord <= PARITY_TOL))
      fail_msg("d loss / d reward of the ordinary pairs: err %.3g > %.0e", e_ord, PARITY_TOL);
  }

  /* shift invariance: without centring, each pair's (group's) gradient sums to 0 */
  double e_sum = 0.0;
  if (lc->center == 0.0) {
    const double dmax = parity_max_d(parity_max_abs(ref_d, n), PARITY_TINY);
    uint64_t off = 0;
    for (uint64_t g = 0; g < lc->n; g++) {
      double sum = 0.0;
      if (lc->rank_loss) {
        for (int32_t j = 0; j < lc->sizes[g]; j++)
          sum += dscores[off + (uint64_t)j];
        off += (uint64_t)lc->sizes[g];
      } else {
        sum = (double)dscores[g] + (double)dscores[lc->n + g];
      }
      e_sum = parity_max_d(e_sum, fabs(sum) / dmax);
    }
    if (!(e_sum <= PARITY_TOL))
      fail_msg("the gradient of a %s does not sum to 0: |sum| / max|d| = %.3g > %.0e",
               lc->rank_loss ? "group" : "pair", e_sum, PARITY_TOL);
  }

  check_stats_finite(&stats);
  if (stats.loss != loss) fail_msg("stats.loss %.17g != loss %.17g", stats.loss, loss);
  assert_int_equal(stats.n_tied, n_tied);
  assert_int_equal(stats.n_compared, n_compared);
  print_message("loss %-30s loss %.1e d/dr %.1e sum(d/dr) %.1e (loss %.6g)\n", lc->name, e_loss,
                e_grad, e_sum, loss);
  if (lc->extreme) print_message("    ordinary pairs/groups alone: d/dr %.1e\n", e_ord);
}

/* ---- model test --------------------------------------------------------- */

/* One model case: the run (checkpoint, reference files, manual path) and
 * the one-call path's own model, context and optimizer. */
typedef struct model_state {
  parity_run *run;
  prm_model *model2;
  prm_ctx *ctx2;
  prm_optimizer *opt2;
  char *batch_json;
  int32_t *lengths;
} model_state;

static int model_setup(void **state) {
  const model_case *mc = *state;
  model_state *ms = calloc(1, sizeof *ms);
  assert_non_null(ms);
  char prefix[160];
  snprintf(prefix, sizeof prefix, "parity_rank_%s", mc->name);
  ms->run = parity_run_new(mc, prefix);
  *state = ms;
  return 0;
}

static int model_teardown(void **state) {
  model_state *ms = *state;
  const model_case *mc = ms->run->pc;
  char path[PARITY_PATH_SIZE];
  case_path(path, sizeof path, mc->name, "init.txt");
  remove(path);
  case_path(path, sizeof path, mc->name, "ref.json");
  remove(path);
  prm_optimizer_free(ms->opt2);
  prm_ctx_free(ms->ctx2);
  prm_model_free(ms->model2);
  free(ms->batch_json);
  free(ms->lengths);
  parity_run_free(ms->run);
  free(ms);
  return 0;
}

/* The inputs and loss of one batch.json. */
typedef struct model_batch {
  int ranking;
  uint64_t n_rows, P, G; /* rows; pairs or groups */
  prm_batch batch;
  float margin[MAX_PAIRS], weight[MAX_PAIRS];
  uint8_t tie[MAX_PAIRS];
  int has_margin, has_weight, has_tie;
  int32_t tie_model;
  double tie_param, center;
  int32_t sizes[MAX_GROUPS];
  int32_t rank_loss;
  uint64_t n_tied;
} model_batch;

/* Optional per-pair (per-group) floats; returns 1 when present. */
static int batch_floats(const char *json, const char *key, float *out, uint64_t n) {
  double v[MAX_PAIRS];
  int64_t k = json_array(json, key, v, MAX_PAIRS, NULL, 0, NULL);
  if (k < 0) return 0;
  if ((uint64_t)k != n)
    fail_msg("batch.json \"%s\": %ld values, expected %lu", key, (long)k, (unsigned long)n);
  for (uint64_t i = 0; i < n; i++)
    out[i] = (float)v[i];
  return 1;
}

/* Rows of features (pairs: chosen, then rejected) into x at row r0; returns
 * the rows read. */
static uint64_t read_features(const char *json, const char *key, float *x, uint64_t r0,
                              uint64_t d) {
  static double v[MAX_VALUES];
  uint64_t row_len[MAX_ROWS], rows = 0;
  int64_t k = json_array(json, key, v, MAX_VALUES, row_len, MAX_ROWS, &rows);
  if (k < 0) fail_msg("batch.json lacks \"%s\"", key);
  assert_true(r0 + rows <= MAX_ROWS);
  for (uint64_t r = 0; r < rows; r++)
    assert_int_equal(row_len[r], d);
  for (int64_t i = 0; i < k; i++)
    x[r0 * d + (uint64_t)i] = (float)v[i];
  return rows;
}

/* Ragged id rows into a (rows, stride) buffer from row r0, padding 0;
 * lengths from `len_key` (which must match the rows' own). */
static uint64_t read_tokens(const char *json, const char *key, const char *len_key, int32_t *tokens,
                            int32_t *lengths, uint64_t r0, uint64_t stride) {
  static double v[MAX_VALUES];
  uint64_t row_len[MAX_ROWS], rows = 0;
  int64_t k = json_array(json, key, v, MAX_VALUES, row_len, MAX_ROWS, &rows);
  if (k < 0) fail_msg("batch.json lacks \"%s\"", key);
  assert_true(r0 + rows <= MAX_ROWS);
  double lv[MAX_ROWS];
  int64_t nl = json_array(json, len_key, lv, MAX_ROWS, NULL, 0, NULL);
  assert_int_equal(nl, (int64_t)rows);
  uint64_t at = 0;
  for (uint64_t r = 0; r < rows; r++) {
    assert_true(row_len[r] >= 1 && row_len[r] <= stride);
    assert_int_equal((uint64_t)lv[r], row_len[r]);
    lengths[r0 + r] = (int32_t)row_len[r];
    for (uint64_t t = 0; t < stride; t++)
      tokens[(r0 + r) * stride + t] = t < row_len[r] ? (int32_t)v[at + t] : 0;
    at += row_len[r];
  }
  return rows;
}

/* The batch of the case's batch.json for model m (center: grads'
 * --center-rewards). */
static void read_model_batch(model_state *ms, const model_case *mc, const prm_model_options *mo,
                             model_batch *b) {
  parity_run *s = ms->run;
  const char *json = ms->batch_json = read_text(s->batch);
  memset(b, 0, sizeof *b);
  b->ranking = json_find(json, "group_sizes") != NULL;
  const int tokens = mo->arch == PRM_ARCH_GPT2 || mo->arch == PRM_ARCH_LLAMA;
  const uint64_t width = tokens ? mo->n_ctx : mo->input_size;
  float *x = NULL;
  int32_t *ids = NULL;
  if (tokens)
    s->input = ids = calloc(MAX_ROWS * width, sizeof *ids);
  else
    s->input = x = calloc(MAX_ROWS * width, sizeof *x);
  assert_non_null(s->input);
  ms->lengths = calloc(MAX_ROWS, sizeof *ms->lengths);
  assert_non_null(ms->lengths);

  if (b->ranking) {
    b->n_rows = tokens ? read_tokens(json, "input_ids", "lengths", ids, ms->lengths, 0, width)
                       : read_features(json, "features", x, 0, width);
    double g[MAX_GROUPS];
    int64_t G = json_array(json, "group_sizes", g, MAX_GROUPS, NULL, 0, NULL);
    assert_true(G >= 1);
    b->G = (uint64_t)G;
    uint64_t sum = 0;
    for (uint64_t i = 0; i < b->G; i++) {
      b->sizes[i] = (int32_t)g[i];
      sum += (uint64_t)b->sizes[i];
    }
    assert_int_equal(sum, b->n_rows);
    char kind[32] = "pairwise";
    json_string(json, "ranking_loss", kind, sizeof kind);
    b->rank_loss = strcmp(kind, "plackett-luce") == 0 ? PRM_RANK_PLACKETT_LUCE : PRM_RANK_PAIRWISE;
    b->has_weight = batch_floats(json, "weight", b->weight, b->G);
  } else {
    uint64_t P =
        tokens ? read_tokens(json, "chosen_input_ids", "chosen_lengths", ids, ms->lengths, 0, width)
               : read_features(json, "chosen_features", x, 0, width);
    uint64_t Pr = tokens ? read_tokens(json, "rejected_input_ids", "rejected_lengths", ids,
                                       ms->lengths, P, width)
                         : read_features(json, "rejected_features", x, P, width);
    assert_int_equal(P, Pr);
    assert_true(P >= 1 && P <= MAX_PAIRS);
    b->P = P;
    b->n_rows = 2 * P;
    b->has_margin = batch_floats(json, "margin", b->margin, P);
    b->has_weight = batch_floats(json, "weight", b->weight, P);
    assert_null(json_find(json, "label"));
    char tm[32];
    if (json_string(json, "tie_model", tm, sizeof tm)) {
      b->tie_model = strcmp(tm, "rao-kupper") == 0 ? PRM_TIE_RAO_KUPPER
                     : strcmp(tm, "davidson") == 0 ? PRM_TIE_DAVIDSON
                                                   : -1;
      if (b->tie_model < 0) fail_msg("batch.json: unknown tie_model %s", tm);
      b->tie_param = parity_json_number(json, "tie_param");
      float t[MAX_PAIRS];
      b->has_tie = batch_floats(json, "tie", t, P);
      for (uint64_t i = 0; i < P && b->has_tie; i++) {
        assert_true(t[i] == 0.0f || t[i] == 1.0f);
        b->tie[i] = (uint8_t)t[i];
        b->n_tied += b->tie[i];
      }
    }
    b->center = mc->center;
  }
  b->batch =
      tokens ? prmt_tok_batch(ids, ms->lengths, b->n_rows, width) : prmt_batch(x, b->n_rows, width);
}

static void fill_loss_options(const model_batch *b, prm_loss_options *lo) {
  assert_int_equal(prm_loss_options_init(lo, PRM_LOSS_OPTIONS_VERSION), PRM_OK);
  lo->margin = b->has_margin ? b->margin : NULL;
  lo->weight = b->has_weight ? b->weight : NULL;
  lo->center_coef = b->center;
  lo->tie_model = b->tie_model;
  lo->tie_param = b->tie_param;
  lo->tie = b->has_tie ? b->tie : NULL;
}

static void fill_rank_options(const model_batch *b, prm_rank_options *ro) {
  assert_int_equal(prm_rank_options_init(ro, PRM_RANK_OPTIONS_VERSION), PRM_OK);
  ro->loss = b->rank_loss;
  ro->weight = b->has_weight ? b->weight : NULL;
}

static prm_ctx *new_ctx(const prm_model *m, const prm_model_options *mo, uint64_t n) {
  const int tokens = mo->arch == PRM_ARCH_GPT2 || mo->arch == PRM_ARCH_LLAMA;
  return tokens ? prmt_tok_ctx(m, n, mo->n_ctx, 0) : prmt_ctx(m, n, 0);
}

static void test_model_case(void **state) {
  model_state *ms = *state;
  parity_run *s = ms->run;
  const model_case *mc = s->pc;
  ensure_reference();
  char expect[PARITY_PATH_SIZE];
  case_path(expect, sizeof expect, mc->name, "ckpt.safetensors");
  assert_string_equal(s->ckpt, expect); /* the reference wrote where parity_run looks */
  free(reference_output(mc->name, "init.txt"));
  const char *out = s->out = reference_output(mc->name, "ref.json");

  /* 1. checkpoint and batch, as torch_ref wrote them */
  s->model = parity_load(s->ckpt, "checkpoint");
  prm_model_options mo;
  assert_int_equal(prm_model_options_init(&mo, PRM_MODEL_OPTIONS_VERSION), PRM_OK);
  assert_int_equal(prm_model_get_options(s->model, &mo), PRM_OK);
  assert_int_equal(mo.arch, mc->arch);
  model_batch b;
  read_model_batch(ms, mc, &mo, &b);
  const uint64_t n = b.n_rows;

  /* 2. the reference */
  const double ref_loss = parity_json_number(out, "loss");
  const double ref_gnorm = parity_json_number(out, "grad_norm");
  float ref_scores[MAX_ROWS], ref_d[MAX_ROWS];
  if (b.ranking) {
    ref_floats(out, "rewards", ref_scores, n);
    ref_floats(out, "d_rewards", ref_d, n);
  } else {
    ref_floats(out, "rewards_chosen", ref_scores, b.P);
    ref_floats(out, "rewards_rejected", ref_scores + b.P, b.P);
    ref_floats(out, "d_rewards_chosen", ref_d, b.P);
    ref_floats(out, "d_rewards_rejected", ref_d + b.P, b.P);
  }
  s->ref_grads = parity_load(s->grads, "reference gradient");
  s->ref_updated = parity_load(s->updated, "reference updated-parameter");

  /* 3. manual path: forward, loss, backward */
  s->ctx = new_ctx(s->model, &mo, n);
  float scores[MAX_ROWS], dscores[MAX_ROWS];
  int st = prm_ctx_forward(s->ctx, &b.batch, scores, n);
  if (st != PRM_OK)
    fail_msg("prm_ctx_forward: %s (%s)", prm_status_string(st), prm_ctx_errmsg(s->ctx));
  const double e_scores = parity_check_scores(scores, ref_scores, n);

  double loss = NAN;
  prm_loss_options lo;
  prm_rank_options ro;
  fill_loss_options(&b, &lo);
  fill_rank_options(&b, &ro);
  if (b.ranking)
    st = prm_loss_rank(scores, n, b.sizes, b.G, &ro, &loss, NULL, dscores);
  else
    st = prm_loss_bt(scores, scores + b.P, b.P, &lo, &loss, NULL, dscores, dscores + b.P);
  if (st != PRM_OK) fail_msg("loss: %s (%s)", prm_status_string(st), prm_last_errmsg());
  const double e_loss = parity_scalar_err(loss, ref_loss);
  if (!(e_loss <= PARITY_TOL))
    fail_msg("loss: C %.9g, torch %.9g (rel %.3g > %.0e)", loss, ref_loss, e_loss, PARITY_TOL);
  const double e_d = parity_tensor_err(dscores, ref_d, n);
  if (!(e_d <= PARITY_TOL)) fail_msg("d loss / d score: err %.3g > %.0e", e_d, PARITY_TOL);

  uint64_t n_params = 0;
  const float *grads = parity_backward(s, dscores, n, &n_params);
  assert_int_equal(prm_model_num_params(s->ref_grads), n_params);
  const double gmax = parity_max_abs(prm_model_params(s->ref_grads, NULL), n_params);
  parity_cmp_result rg;
  parity_compare_tensors(&rank_arch, "gradient", s->model, grads, s->ref_grads, NULL, s->ref_grads,
                         gmax, &rg);

  /* 4. one AdamW step, against torch's */
  float *params = prm_model_params(s->model, NULL);
  const double e_gnorm = parity_adamw_step(s, OPT_LR, OPT_WD, OPT_CLIP, 0, ref_gnorm);
  const double c_gnorm = prm_optimizer_last_grad_norm(s->opt);
  parity_cmp_result ru;
  parity_compare_tensors(&rank_arch, "AdamW-updated", s->model, params, s->ref_updated, s->before,
                         s->ref_grads, gmax, &ru);

  /* 5. the one-call paths on a fresh copy: evaluate, then one train step */
  ms->model2 = parity_load(s->ckpt, "checkpoint (one-call path)");
  ms->ctx2 = new_ctx(ms->model2, &mo, n);
  ms->opt2 = parity_adamw(ms->model2, OPT_LR, OPT_WD, OPT_CLIP, 0);
  prm_loss_stats se, stt;
  assert_int_equal(prm_loss_stats_init(&se, PRM_LOSS_STATS_VERSION), PRM_OK);
  assert_int_equal(prm_loss_stats_init(&stt, PRM_LOSS_STATS_VERSION), PRM_OK);
  st = b.ranking ? prm_evaluate_groups(ms->ctx2, &b.batch, b.sizes, b.G, &ro, &se)
                 : prm_evaluate(ms->ctx2, &b.batch, &lo, &se);
  if (st != PRM_OK)
    fail_msg("prm_evaluate%s: %s (%s)", b.ranking ? "_groups" : "", prm_status_string(st),
             prm_ctx_errmsg(ms->ctx2));
  st = b.ranking ? prm_train_step_groups(ms->ctx2, ms->opt2, &b.batch, b.sizes, b.G, &ro, &stt)
                 : prm_train_step(ms->ctx2, ms->opt2, &b.batch, &lo, &stt);
  if (st != PRM_OK)
    fail_msg("prm_train_step%s: %s (%s)", b.ranking ? "_groups" : "", prm_status_string(st),
             prm_ctx_errmsg(ms->ctx2));
  const double e_eval = parity_scalar_err(se.loss, loss),
               e_train = parity_scalar_err(stt.loss, loss);
  const double e_norm2 = parity_scalar_err(prm_optimizer_last_grad_norm(ms->opt2), c_gnorm);
  if (!(e_eval <= ONECALL_TOL) || !(e_train <= ONECALL_TOL) || !(e_norm2 <= ONECALL_TOL))
    fail_msg("one-call path: evaluate loss %.17g, train-step loss %.17g, grad norm %.17g; manual "
             "loss %.17g, grad norm %.17g (tolerance %.0e)",
             se.loss, stt.loss, prm_optimizer_last_grad_norm(ms->opt2), loss, c_gnorm, ONECALL_TOL);
  if (b.ranking) {
    uint64_t pairs = 0;
    for (uint64_t g = 0; g < b.G; g++)
      pairs += (uint64_t)(b.sizes[g] * (b.sizes[g] - 1) / 2);
    assert_int_equal(stt.n_compared, pairs);
    assert_int_equal(stt.n_tied, 0);
  } else {
    assert_int_equal(stt.n_tied, b.n_tied);
    assert_int_equal(stt.n_compared, b.P - b.n_tied);
  }
  check_stats_finite(&se);
  check_stats_finite(&stt);
  const float *params2 = prm_model_params(ms->model2, NULL);
  const int identical = memcmp(params2, params, n_params * sizeof *params) == 0;
  parity_cmp_result r1, r2;
  parity_compare_tensors(&rank_arch, "one-call vs manual", ms->model2, params2, s->model, s->before,
                         s->ref_grads, gmax, &r1);
  parity_compare_tensors(&rank_arch, "one-call vs torch", ms->model2, params2, s->ref_updated,
                         s->before, s->ref_grads, gmax, &r2);

  print_message("model %-28s scores %.1e loss %.1e d/dr %.1e grads %.1e (%s) gnorm %.1e\n",
                mc->name, e_scores, e_loss, e_d, rg.all, rg.worst_name, e_gnorm);
  print_message("    adamw params %.1e update %.1e (%lu of %lu left out); one-call: loss %.1e/%.1e "
                "gnorm %.1e, params %s (vs torch update %.1e)\n",
                ru.all, ru.all_delta, (unsigned long)ru.n_masked, (unsigned long)n_params, e_eval,
                e_train, e_norm2, identical ? "bit-identical" : "differ", r2.all_delta);
  if (!identical)
    print_message("    one-call vs manual: params %.1e update %.1e\n", r1.all, r1.all_delta);
  if (rg.zero_names[0] != '\0')
    print_message("    zero up to rounding on both sides: %s\n", rg.zero_names);
}

/* ---- main --------------------------------------------------------------- */

static int group_teardown(void **state) {
  (void)state;
  char path[PARITY_PATH_SIZE];
  static const char *const model_files[] = {"ckpt.safetensors",  "batch.json",
                                            "grads.safetensors", "updated.safetensors",
                                            "init.txt",          "ref.json"};
  for (size_t i = 0; i < N_LOSS_CASES; i++) {
    case_path(path, sizeof path, loss_cases[i]->name, "scores.json");
    remove(path);
    case_path(path, sizeof path, loss_cases[i]->name, "loss.json");
    remove(path);
  }
  for (size_t i = 0; i < N_MODEL_CASES; i++)
    for (size_t k = 0; k < sizeof model_files / sizeof model_files[0]; k++) {
      case_path(path, sizeof path, model_cases[i].name, model_files[k]);
      remove(path);
    }
  case_path(path, sizeof path, "all", "jobs.txt");
  remove(path);
  return 0;
}

int main(void) {
  struct CMUnitTest tests[N_LOSS_CASES + N_MODEL_CASES];
  char names[N_LOSS_CASES + N_MODEL_CASES][96];
  size_t k = 0;
  for (size_t i = 0; i < N_LOSS_CASES; i++, k++) {
    snprintf(names[k], sizeof names[k], "loss_%s", loss_cases[i]->name);
    tests[k] = (struct CMUnitTest){names[k], test_loss_case, NULL, NULL, (void *)loss_cases[i]};
  }
  for (size_t i = 0; i < N_MODEL_CASES; i++, k++) {
    snprintf(names[k], sizeof names[k], "model_%s", model_cases[i].name);
    tests[k] = (struct CMUnitTest){names[k], test_model_case, model_setup, model_teardown,
                                   (void *)&model_cases[i]};
  }
  const double t0 = now_s();
  int failed = cmocka_run_group_tests(tests, NULL, group_teardown);
  if (g_ref == REF_DONE)
    print_message("test_parity_rank: %.1f s (reference %.1f s)\n", now_s() - t0, g_ref_seconds);
  return prmt_exit(failed, k);
}
