/*
 * test_parity_llama.c - the llama architecture against the PyTorch reference
 * (../shared/reference/torch_ref.py, Hugging Face LlamaForSequenceClassification
 * math with the Qwen2 and Qwen3 options): scores, loss, every parameter
 * gradient, the global gradient norm and one AdamW step for four
 * configurations, and a 50-step training run whose loss curve must follow
 * PyTorch's.
 *
 * Configurations (each with ragged lengths up to 72, so a sequence's
 * attention spans up to three 32-row blocks, and garbage in the padding):
 *   mha          plain multi-head attention (n_kv_head = n_head), Meta's
 *                default SwiGLU width, plain Bradley-Terry, a token_stride
 *                wider than the longest sequence;
 *   gqa_hd12     grouped-query attention (4 query heads on 2 kv heads) with
 *                head_dim 12 != n_embd / n_head = 8, margins, no decay on
 *                1-D tensors;
 *   mqa_qwen2    multi-query attention (n_kv_head 1) with Qwen2's q/k/v
 *                biases, three layers, margins + soft labels + centring,
 *                sequences of the full n_ctx;
 *   gqa_qwen3    Qwen3's per-head q/k RMSNorm with GQA (8 heads on 2),
 *                head_dim 16 (H * hd = 128 != 32), rope_theta 1e6 and
 *                rms_eps 1e-5, soft labels + centring.
 * The training run combines GQA, q/k/v biases, q/k norm and rope_theta 500.
 *
 * Per parity case, as test_parity_gpt2.c:
 *   1. `torch_ref.py init --model llama ...` writes the checkpoint (HF names,
 *      config in __metadata__); the C side loads it with prm_model_load and
 *      its configuration (prm_model_get_options) must be the one asked for;
 *   2. the test draws its own pair batch and writes batch.json with only the
 *      real tokens; torch_ref right-pads with id 0, while the C token buffer
 *      carries garbage in its padding (ids far outside [0, V), then valid
 *      random ids), which must change nothing (bit-identical scores);
 *   3. `torch_ref.py grads ... --updated-out` gives the reference gradients
 *      and one AdamW step's parameters;
 *   4. C: scores of an inference context, then prm_ctx_forward of a training
 *      context, prm_loss_bt, prm_ctx_backward, compare every gradient; then
 *      one prm_optimizer_step with the same hyper-parameters and compare the
 *      parameters and the update itself.
 *
 * Error metric (parityutil.h):
 *     err(a, ref) = max_i |a_i - ref_i| / max(max_i |ref_i|, PARITY_TINY)
 * per tensor and over all 2P scores, |a - ref| / |ref| for loss and gradient
 * norm; all <= PARITY_TOL = 1e-4. Updates (new - old) at PARITY_DELTA_TOL,
 * elements with unresolved gradients left out as in test_parity_gpt2.c.
 *
 * Training run: one torch_ref checkpoint, four batches cycled for 50 steps,
 * AdamW (lr 1e-3, decay 0.01, clipping at 1) through prm_train_step in C and
 * tests/gpt2_train_ref.py (torch_ref's model_from_state, loss and optimizer:
 * it serves any torch_ref checkpoint) in PyTorch. Every step's loss must agree
 * to TRAIN_LOSS_TOL (absolute) and its gradient norm to TRAIN_NORM_TOL.
 *
 * Skips (reason on stderr) only when ../shared is absent or PRM_PYTHON cannot
 * import torch. A library without the llama architecture fails. Ten reference
 * runs in all (five init, four grads, one training run).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
/* cmocka.h needs the three headers above first */
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "parityutil.h"
#include "testutil.h"

#define ZERO_GRAD_REL 1e-6   /* gradient tensors below this * max|grad| are noise */
#define UPDATE_MASK_REL 1e-4 /* AdamW: elements below this * tensor max are noise */
#define TRAIN_LOSS_TOL 1e-3  /* per-step loss, absolute */
#define TRAIN_NORM_TOL 1e-3  /* per-step gradient norm before clipping, relative */
#define MAX_PAIRS 8
#define MAX_ROWS (2 * MAX_PAIRS)
#define TRAIN_STEPS 50
#define TRAIN_BATCHES 4

/* A llama configuration as torch_ref's flags; 0 (false) for a size or a
 * real means "flag not given": torch_ref's default, which the loaded model
 * must report. */
typedef struct llama_cfg {
  uint64_t vocab, n_ctx, n_embd, n_layer, n_head;
  uint64_t n_kv_head, head_dim, n_ffn; /* 0: n_head, n_embd / n_head, Meta's rule */
  double rope_theta, rms_eps;          /* 0: 10000, 1e-6 */
  int attn_bias, qk_norm;
} llama_cfg;

/* One parity scenario. */
typedef struct llama_case {
  const char *name;
  llama_cfg m;
  uint64_t pairs;   /* P: 2P sequences */
  uint64_t max_len; /* longest sequence; context max_len */
  uint64_t stride;  /* token_stride >= max_len; the excess is garbage */
  uint64_t min_len; /* lengths uniform in [min_len, max_len] ... */
  int edge_lengths; /* ... plus one sequence of length 1 and one of max_len */
  uint64_t seed;    /* torch init and the batch */
  int use_margin;   /* per-pair margin m_i */
  int use_label;    /* per-pair soft label p_i */
  double center;    /* center_rewards_coefficient */
  double lr, weight_decay, max_grad_norm;
  int no_decay_1d;
} llama_case;

/* ---- small helpers ------------------------------------------------------ */

static double max_abs(const float *x, uint64_t n) {
  double m = 0.0;
  for (uint64_t i = 0; i < n; i++)
    m = parity_max_d(m, fabs((double)x[i]));
  return m;
}

/* ---- per-tensor comparison, reported by tensor group -------------------- */

/* Parameter groups of a llama, for the summary line. */
enum { G_EMB, G_NORM, G_QKNORM, G_ATTN, G_MLP, G_HEAD, G_COUNT };
static const char *const group_name[G_COUNT] = {"emb", "norm", "qknorm", "attn", "mlp", "head"};

static int group_of(const char *name) {
  if (strstr(name, "embed_tokens.")) return G_EMB;
  if (strstr(name, "q_norm.") || strstr(name, "k_norm.")) return G_QKNORM;
  if (strstr(name, "layernorm.") || strstr(name, "model.norm.")) return G_NORM;
  if (strstr(name, ".self_attn.")) return G_ATTN;
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

/*
 * max|a - ref| / max(max|ref|, PARITY_TINY) over the elements whose reference
 * gradient g (NULL: all elements) has |g_k| >= thr, or with keep_zero is
 * exactly 0 (embedding rows of tokens the batch never uses: their update is
 * the decay alone). The magnitude runs over all elements when mag_all (a
 * parameter's scale) or over the kept ones (an update's scale). *worst:
 * index of the largest kept difference; *masked: elements left out.
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
 * its largest magnitude.
 *
 * Gradient mode (old == NULL): a tensor whose reference gradient is below
 * ZERO_GRAD_REL * gmax everywhere holds rounding noise on both sides, and
 * the C gradient must then be below the same bound instead of matching it.
 * (No llama tensor has an exactly zero gradient in general -- RoPE makes
 * q.R(u-t)b_k depend on the key position, so even the key bias matters --
 * but the check costs nothing and keeps a noise tensor from failing.)
 *
 * Update mode (old != NULL, mine/ref are parameters after one AdamW step):
 * also compares the updates mine - old and ref - old, leaving out elements
 * whose gradient the gradient check does not resolve (the first AdamW step
 * moves an element by about lr times the sign of its gradient): |g_ref|
 * below UPDATE_MASK_REL times its tensor's largest gradient or below
 * ZERO_GRAD_REL * gmax. Exact zeros of the embedding stay in.
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
    const uint64_t roff = parity_ref_offset(ref, name, what, ndim, shape);
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
      res->zero_worst = parity_max_d(res->zero_worst, parity_max_d(mc, max_abs(r, numel)) / gmax);
      continue;
    }

    const float *g = NULL;
    double thr = 0.0;
    if (old != NULL) {
      g = g_flat + parity_ref_offset(gref, name, "reference gradient", ndim, shape);
      if (max_abs(g, numel) <= zero_bound) { /* noise only: nothing to compare */
        res->n_masked += numel;
        continue;
      }
      thr = parity_max_d(UPDATE_MASK_REL * max_abs(g, numel), zero_bound);
    }
    const int keep_zero = grp == G_EMB;
    uint64_t k = 0, masked = 0;
    double e = masked_err(a, r, g, thr, keep_zero, numel, 1, &k, &masked);
    if (!(e <= PARITY_TOL))
      fail_msg("%s %s: max|c - torch| / max|torch| = %.3g > %.0e (max|c| %.3g, max|torch| %.3g; "
               "worst element %lu: c %.9g torch %.9g)",
               what, name, e, PARITY_TOL, max_abs(a, numel), max_abs(r, numel), (unsigned long)k,
               (double)a[k], (double)r[k]);
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

static void print_groups(const char *label, const double *w) {
  char line[256];
  int k = snprintf(line, sizeof line, "    %-14s", label);
  for (int g = 0; g < G_COUNT && k > 0 && (size_t)k < sizeof line; g++)
    k += snprintf(line + k, sizeof line - (size_t)k, " %s %.1e", group_name[g], w[g]);
  print_message("%s\n", line);
}

/* ---- availability ------------------------------------------------------ */

static char g_script[PARITY_PATH_SIZE];    /* torch_ref.py */
static char g_train_ref[PARITY_PATH_SIZE]; /* tests/gpt2_train_ref.py, next to this file */

/* 1 when the reference can run; else prints why to stderr and returns 0. */
static int reference_available(void) {
  return parity_reference_available("test_parity_llama", g_script, sizeof g_script);
}

/* ---- batches ------------------------------------------------------------ */

/* A pair batch of 2P sequences in a (2P, stride) token buffer. */
typedef struct tok_batch {
  uint64_t P, stride;
  int32_t *tokens;
  int32_t lengths[MAX_ROWS];
  float margin[MAX_PAIRS], label[MAX_PAIRS];
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

/* ---- reference commands and configuration -------------------------------- */

/* torch_ref's default SwiGLU width (Meta's rule), also the library's for 0. */
static uint64_t default_ffn(uint64_t C) { return 256 * ((8 * C / 3 + 255) / 256); }

/* `torch_ref.py init --model llama` with the flags of c. */
static void torch_init(const char *ckpt, const llama_cfg *c, uint64_t seed) {
  char q_py[PARITY_PATH_SIZE + 16], q_script[2 * PARITY_PATH_SIZE], q_ckpt[2 * PARITY_PATH_SIZE],
      opt[512], cmd[PARITY_CMD_SIZE];
  parity_shell_quote(q_py, sizeof q_py, PRM_PYTHON);
  parity_shell_quote(q_script, sizeof q_script, g_script);
  parity_shell_quote(q_ckpt, sizeof q_ckpt, ckpt);
  int k = 0;
  opt[0] = '\0';
  if (c->n_kv_head)
    k += snprintf(opt + k, sizeof opt - (size_t)k, " --kv-heads %lu", (unsigned long)c->n_kv_head);
  if (c->head_dim)
    k += snprintf(opt + k, sizeof opt - (size_t)k, " --head-dim %lu", (unsigned long)c->head_dim);
  if (c->n_ffn)
    k += snprintf(opt + k, sizeof opt - (size_t)k, " --ffn %lu", (unsigned long)c->n_ffn);
  if (c->rope_theta > 0)
    k += snprintf(opt + k, sizeof opt - (size_t)k, " --rope-theta %.17g", c->rope_theta);
  if (c->rms_eps > 0)
    k += snprintf(opt + k, sizeof opt - (size_t)k, " --rms-eps %.17g", c->rms_eps);
  if (c->attn_bias) k += snprintf(opt + k, sizeof opt - (size_t)k, " --attn-bias");
  if (c->qk_norm) k += snprintf(opt + k, sizeof opt - (size_t)k, " --qk-norm");
  assert_true(k >= 0 && (size_t)k < sizeof opt);
  int len = snprintf(cmd, sizeof cmd,
                     "%s %s init --model llama --vocab %lu --ctx %lu --dim %lu --layers %lu "
                     "--heads %lu%s --seed %lu --out %s >/dev/null",
                     q_py, q_script, (unsigned long)c->vocab, (unsigned long)c->n_ctx,
                     (unsigned long)c->n_embd, (unsigned long)c->n_layer, (unsigned long)c->n_head,
                     opt, (unsigned long)seed, q_ckpt);
  assert_true(len > 0 && (size_t)len < sizeof cmd);
  free(parity_run_capture(cmd));
}

/* The loaded model's configuration must be c with torch_ref's defaults
 * filled in. */
static void check_loaded_config(const prm_model *m, const llama_cfg *c) {
  prm_model_options mo;
  assert_int_equal(prm_model_options_init(&mo, PRM_MODEL_OPTIONS_VERSION), PRM_OK);
  assert_int_equal(prm_model_get_options(m, &mo), PRM_OK);
  assert_int_equal(mo.arch, PRM_ARCH_LLAMA);
  assert_int_equal(mo.vocab_size, c->vocab);
  assert_int_equal(mo.n_ctx, c->n_ctx);
  assert_int_equal(mo.n_embd, c->n_embd);
  assert_int_equal(mo.n_layer, c->n_layer);
  assert_int_equal(mo.n_head, c->n_head);
  assert_int_equal(mo.n_kv_head, c->n_kv_head ? c->n_kv_head : c->n_head);
  assert_int_equal(mo.head_dim, c->head_dim ? c->head_dim : c->n_embd / c->n_head);
  assert_int_equal(mo.n_ffn, c->n_ffn ? c->n_ffn : default_ffn(c->n_embd));
  const double theta = c->rope_theta > 0 ? c->rope_theta : 10000.0;
  const double eps = c->rms_eps > 0 ? c->rms_eps : 1e-6;
  if (!(fabs(mo.rope_theta - theta) <= 1e-12 * theta))
    fail_msg("loaded rope_theta %.17g, checkpoint says %.17g", mo.rope_theta, theta);
  if (!(fabs(mo.rms_eps - eps) <= 1e-12 * eps))
    fail_msg("loaded rms_eps %.17g, checkpoint says %.17g", mo.rms_eps, eps);
  assert_int_equal(mo.attn_bias != 0, c->attn_bias != 0);
  assert_int_equal(mo.qk_norm != 0, c->qk_norm != 0);
  assert_int_equal(prm_model_trainable_offset(m), 0);
}

/* ---- fixtures ----------------------------------------------------------- */

static int case_setup(void **state) {
  const llama_case *pc = *state;
  char prefix[128];
  snprintf(prefix, sizeof prefix, "parity_llama_%s", pc != NULL ? pc->name : "train");
  *state = parity_run_new(pc, prefix);
  return 0;
}

static int case_teardown(void **state) {
  parity_run_free(*state);
  return 0;
}

/* Forward the batch on s->ctx; fails the test with `what` on error. */
static void forward(parity_run *s, const prm_batch *pb, float *scores, uint64_t n,
                    const char *what) {
  int st = prm_ctx_forward(s->ctx, pb, scores, n);
  if (st != PRM_OK)
    fail_msg("prm_ctx_forward (%s): %s (%s)", what, prm_status_string(st), prm_ctx_errmsg(s->ctx));
}

/* ---- one-step parity ---------------------------------------------------- */

static void test_parity_case(void **state) {
  parity_run *s = *state;
  const llama_case *pc = s->pc;
  if (!reference_available()) skip();
  const uint64_t P = pc->pairs, n = 2 * P, V = pc->m.vocab;
  assert_true(P >= 1 && P <= MAX_PAIRS);
  assert_true(pc->min_len >= 1 && pc->min_len <= pc->max_len && pc->max_len <= pc->m.n_ctx);
  assert_true(pc->stride >= pc->max_len);

  /* 1. checkpoint from torch_ref, loaded by the C side */
  torch_init(s->ckpt, &pc->m, pc->seed);
  s->model = parity_load(s->ckpt, "checkpoint");
  check_loaded_config(s->model, &pc->m);

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
  float ref_scores[MAX_ROWS];
  parity_reference_grads(s, g_script, pc->lr, pc->weight_decay, pc->max_grad_norm, pc->no_decay_1d,
                         P, &ref_loss, &ref_gnorm, ref_scores);

  /* 4a. scoring: an inference context (no activation history) */
  prm_batch pb = as_prm_batch(&b);
  float scores[MAX_ROWS], scores_b[MAX_ROWS];
  s->ctx = prmt_tok_ctx(s->model, n, pc->max_len, 1);
  forward(s, &pb, scores, n, "inference context");
  double e_infer = parity_check_scores(scores, ref_scores, n);
  prm_ctx_free(s->ctx);
  s->ctx = NULL;

  /* 4b. training context: padding invariance, then forward, loss, backward */
  s->ctx = prmt_tok_ctx(s->model, n, pc->max_len, 0);
  fill_padding(&b, &rng, V, 1); /* valid random ids in the padding */
  forward(s, &pb, scores_b, n, "valid ids in the padding");
  fill_padding(&b, &rng, V, 0); /* out-of-range ids in the padding */
  forward(s, &pb, scores, n, "out-of-range ids in the padding");
  if (memcmp(scores, scores_b, n * sizeof *scores) != 0)
    fail_msg("scores depend on the padding token ids");
  double e_scores = parity_check_scores(scores, ref_scores, n);

  float dscores[MAX_ROWS];
  double e_loss = parity_check_loss(scores, P, mp, lp, pc->center, ref_loss, dscores);

  uint64_t n_params = 0;
  const float *grads = parity_backward(s, dscores, n, &n_params);
  float *params = prm_model_params(s->model, NULL);
  assert_int_equal(prm_model_num_params(s->ref_grads), n_params);
  const double gmax = max_abs(prm_model_params(s->ref_grads, NULL), n_params);
  cmp_result rg;
  compare_tensors("gradient", s->model, grads, s->ref_grads, NULL, s->ref_grads, gmax, &rg);

  /* 5. one AdamW step */
  double e_gnorm =
      parity_adamw_step(s, pc->lr, pc->weight_decay, pc->max_grad_norm, pc->no_decay_1d, ref_gnorm);
  cmp_result ru;
  compare_tensors("AdamW-updated", s->model, params, s->ref_updated, s->before, s->ref_grads, gmax,
                  &ru);

  print_message("parity llama %-10s scores %.1e (inference ctx %.1e) loss %.1e gnorm %.1e "
                "(|g| %.3g)\n",
                pc->name, e_scores, e_infer, e_loss, e_gnorm, ref_gnorm);
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

/* GQA (4 heads on 2), Qwen2 biases and Qwen3 q/k norm together, a fast
 * rotation (theta 500), lengths 2..40 across the 32-row block boundary. */
static const llama_cfg train_cfg = {.vocab = 50,
                                    .n_ctx = 40,
                                    .n_embd = 32,
                                    .n_layer = 2,
                                    .n_head = 4,
                                    .n_kv_head = 2,
                                    .n_ffn = 48,
                                    .rope_theta = 500.0,
                                    .rms_eps = 1e-5,
                                    .attn_bias = 1,
                                    .qk_norm = 1};
#define TR_T 40
#define TR_P 4
#define TR_SEED 21
#define TR_LR 1e-3
#define TR_WD 0.01
#define TR_CLIP 1.0

static void test_train_curve(void **state) {
  parity_run *s = *state;
  if (!reference_available()) skip();
  /* tests/gpt2_train_ref.py sits next to this file (CMake compiles it by its
   * absolute path); it trains any torch_ref checkpoint */
  const char *slash = strrchr(__FILE__, '/');
  if (slash == NULL)
    snprintf(g_train_ref, sizeof g_train_ref, "gpt2_train_ref.py");
  else
    snprintf(g_train_ref, sizeof g_train_ref, "%.*s/gpt2_train_ref.py", (int)(slash - __FILE__),
             __FILE__);
  FILE *f = fopen(g_train_ref, "r");
  if (f == NULL) fail_msg("%s is missing", g_train_ref);
  fclose(f);

  const uint64_t V = train_cfg.vocab;
  torch_init(s->ckpt, &train_cfg, TR_SEED);
  s->model = parity_load(s->ckpt, "checkpoint");
  check_loaded_config(s->model, &train_cfg);

  /* four ragged batches (one with lengths 1 and T), with margins */
  const uint64_t n = 2 * TR_P;
  prmt_rng rng = {TR_SEED * 104729u + 5u};
  tok_batch b[TRAIN_BATCHES];
  int32_t *tokens = s->input = malloc(TRAIN_BATCHES * n * TR_T * sizeof *tokens);
  assert_non_null(tokens);
  f = fopen(s->batch, "w");
  if (f == NULL) fail_msg("cannot write %s", s->batch);
  fputs("{\"batches\": [", f);
  for (int k = 0; k < TRAIN_BATCHES; k++) {
    b[k].tokens = tokens + (uint64_t)k * n * TR_T;
    draw_batch(&b[k], &rng, V, TR_P, TR_T, 2, TR_T, k == 0);
    if (k) fputs(",\n", f);
    write_batch_object(f, &b[k], 1, 0, 0.0);
  }
  fputs("]}\n", f);
  assert_int_equal(fclose(f), 0);

  char q_py[PARITY_PATH_SIZE + 16], q_script[2 * PARITY_PATH_SIZE], q_ref[2 * PARITY_PATH_SIZE],
      q_ckpt[2 * PARITY_PATH_SIZE], q_batch[2 * PARITY_PATH_SIZE], cmd[PARITY_CMD_SIZE];
  parity_shell_quote(q_py, sizeof q_py, PRM_PYTHON);
  parity_shell_quote(q_script, sizeof q_script, g_train_ref);
  parity_shell_quote(q_ref, sizeof q_ref, g_script);
  parity_shell_quote(q_ckpt, sizeof q_ckpt, s->ckpt);
  parity_shell_quote(q_batch, sizeof q_batch, s->batch);
  int len = snprintf(cmd, sizeof cmd,
                     "%s %s --torch-ref %s --ckpt %s --batches %s --steps %d --lr %.17g "
                     "--weight-decay %.17g --max-grad-norm %.17g",
                     q_py, q_script, q_ref, q_ckpt, q_batch, TRAIN_STEPS, TR_LR, TR_WD, TR_CLIP);
  assert_true(len > 0 && (size_t)len < sizeof cmd);
  const char *out = s->out = parity_run_capture(cmd);
  double ref_loss[TRAIN_STEPS], ref_norm[TRAIN_STEPS];
  parity_json_list(out, "losses", ref_loss, TRAIN_STEPS);
  parity_json_list(out, "grad_norms", ref_norm, TRAIN_STEPS);

  s->ctx = prmt_tok_ctx(s->model, n, TR_T, 0);
  s->opt = parity_adamw(s->model, TR_LR, TR_WD, TR_CLIP, 0);
  double worst = 0.0, worst_norm = 0.0, c_loss[TRAIN_STEPS];
  int worst_step = 0;
  for (int step = 0; step < TRAIN_STEPS; step++) {
    const tok_batch *bk = &b[step % TRAIN_BATCHES];
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
    double en = parity_scalar_err(prm_optimizer_last_grad_norm(s->opt), ref_norm[step]);
    if (!(en <= TRAIN_NORM_TOL))
      fail_msg("step %d: grad norm C %.9g, torch %.9g (rel %.3g > %.0e)", step,
               prm_optimizer_last_grad_norm(s->opt), ref_norm[step], en, TRAIN_NORM_TOL);
    worst_norm = parity_max_d(worst_norm, en);
  }
  assert_int_equal(prm_optimizer_num_updates(s->opt), TRAIN_STEPS);
  print_message("train llama %d steps: loss %.6f -> %.6f (torch %.6f -> %.6f); max |loss diff| "
                "%.2e (step %d); grad norm worst rel %.1e\n",
                TRAIN_STEPS, c_loss[0], c_loss[TRAIN_STEPS - 1], ref_loss[0],
                ref_loss[TRAIN_STEPS - 1], worst, worst_step, worst_norm);
}

/* ---- cases -------------------------------------------------------------- */

/* (a) Plain multi-head attention, Meta's default SwiGLU width (256 for
 * dim 32), two layers, ragged lengths 1..72 in one batch with a
 * token_stride wider than 72 (garbage beyond); plain Bradley-Terry. */
static const llama_case case_mha = {
    .name = "mha",
    .m = {.vocab = 64, .n_ctx = 80, .n_embd = 32, .n_layer = 2, .n_head = 4},
    .pairs = 4,
    .max_len = 72,
    .stride = 77,
    .min_len = 1,
    .edge_lengths = 1,
    .seed = 3,
    .lr = 1e-3,
    .weight_decay = 0.01,
    .max_grad_norm = 1.0};

/* (b) GQA, 4 query heads on 2 kv heads, head_dim 12 (q_proj [48, 32],
 * o_proj [32, 48]), margins, no decay on 1-D tensors. */
static const llama_case case_gqa = {.name = "gqa_hd12",
                                    .m = {.vocab = 97,
                                          .n_ctx = 80,
                                          .n_embd = 32,
                                          .n_layer = 2,
                                          .n_head = 4,
                                          .n_kv_head = 2,
                                          .head_dim = 12,
                                          .n_ffn = 64},
                                    .pairs = 5,
                                    .max_len = 72,
                                    .stride = 72,
                                    .min_len = 3,
                                    .edge_lengths = 1,
                                    .seed = 5,
                                    .use_margin = 1,
                                    .lr = 1e-3,
                                    .weight_decay = 0.01,
                                    .max_grad_norm = 1.0,
                                    .no_decay_1d = 1};

/* (c) MQA (one kv head for three query heads) with Qwen2's q/k/v biases,
 * three layers, sequences up to the full n_ctx, margin + soft labels +
 * centring. */
static const llama_case case_mqa = {.name = "mqa_qwen2",
                                    .m = {.vocab = 50,
                                          .n_ctx = 72,
                                          .n_embd = 24,
                                          .n_layer = 3,
                                          .n_head = 3,
                                          .n_kv_head = 1,
                                          .n_ffn = 40,
                                          .attn_bias = 1},
                                    .pairs = 5,
                                    .max_len = 72,
                                    .stride = 72,
                                    .min_len = 2,
                                    .edge_lengths = 1,
                                    .seed = 7,
                                    .use_margin = 1,
                                    .use_label = 1,
                                    .center = 0.1,
                                    .lr = 1e-3,
                                    .weight_decay = 0.01,
                                    .max_grad_norm = 1.0};

/* (d) Qwen3: per-head q/k RMSNorm, GQA 8 heads on 2, head_dim 16 (H * hd =
 * 128 != 32), rope_theta 1e6, rms_eps 1e-5, soft labels + centring. */
static const llama_case case_qwen3 = {.name = "gqa_qwen3",
                                      .m = {.vocab = 61,
                                            .n_ctx = 96,
                                            .n_embd = 32,
                                            .n_layer = 2,
                                            .n_head = 8,
                                            .n_kv_head = 2,
                                            .head_dim = 16,
                                            .n_ffn = 56,
                                            .rope_theta = 1e6,
                                            .rms_eps = 1e-5,
                                            .qk_norm = 1},
                                      .pairs = 4,
                                      .max_len = 72,
                                      .stride = 80,
                                      .min_len = 1,
                                      .edge_lengths = 1,
                                      .seed = 11,
                                      .use_label = 1,
                                      .center = 0.05,
                                      .lr = 1e-3,
                                      .weight_decay = 0.01,
                                      .max_grad_norm = 1.0};

#define PARITY_TEST(name, c)                                                                       \
  { name, test_parity_case, case_setup, case_teardown, (void *)&(c) }

int main(void) {
  const struct CMUnitTest tests[] = {
      PARITY_TEST("parity_llama_mha_L2_default_ffn", case_mha),
      PARITY_TEST("parity_llama_gqa_head_dim_12_no_decay_1d", case_gqa),
      PARITY_TEST("parity_llama_mqa_qwen2_bias_L3_margin_label_center", case_mqa),
      PARITY_TEST("parity_llama_gqa_qwen3_qk_norm_theta_eps", case_qwen3),
      {"parity_llama_train_50_steps", test_train_curve, case_setup, case_teardown, NULL},
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
