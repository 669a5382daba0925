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
 * to PARITY_TOK_TRAIN_LOSS_TOL (absolute) and its gradient norm to PARITY_TOK_TRAIN_NORM_TOL.
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
#include <string.h>

#include "parityutil.h"
#include "testutil.h"

/* A llama configuration as torch_ref's flags; 0 (false) for a size or a
 * real means "flag not given": torch_ref's default, which the loaded model
 * must report. */
typedef struct llama_cfg {
  uint64_t vocab, n_ctx, n_embd, n_layer, n_head;
  uint64_t n_kv_head, head_dim, n_ffn; /* 0: n_head, n_embd / n_head, Meta's rule */
  double rope_theta, rms_eps;          /* 0: 10000, 1e-6 */
  int attn_bias, qk_norm;
} llama_cfg;

/* ---- the llama specifics ------------------------------------------------ */

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

/* torch_ref's default SwiGLU width (Meta's rule), also the library's for 0. */
static uint64_t default_ffn(uint64_t C) { return 256 * ((8 * C / 3 + 255) / 256); }

/* torch_ref's init flags beyond the dims: those of c that are given. */
static void extra_flags(char *opt, size_t size, const void *model) {
  const llama_cfg *c = model;
  int k = 0;
  opt[0] = '\0';
  if (c->n_kv_head)
    k += snprintf(opt + k, size - (size_t)k, " --kv-heads %lu", (unsigned long)c->n_kv_head);
  if (c->head_dim)
    k += snprintf(opt + k, size - (size_t)k, " --head-dim %lu", (unsigned long)c->head_dim);
  if (c->n_ffn) k += snprintf(opt + k, size - (size_t)k, " --ffn %lu", (unsigned long)c->n_ffn);
  if (c->rope_theta > 0)
    k += snprintf(opt + k, size - (size_t)k, " --rope-theta %.17g", c->rope_theta);
  if (c->rms_eps > 0) k += snprintf(opt + k, size - (size_t)k, " --rms-eps %.17g", c->rms_eps);
  if (c->attn_bias) k += snprintf(opt + k, size - (size_t)k, " --attn-bias");
  if (c->qk_norm) k += snprintf(opt + k, size - (size_t)k, " --qk-norm");
  assert_true(k >= 0 && (size_t)k < size);
}

static parity_tok_dims llama_dims(const void *model) {
  const llama_cfg *c = model;
  return (parity_tok_dims){c->vocab, c->n_ctx, c->n_embd, c->n_layer, c->n_head};
}

/* The loaded model's configuration must be c with torch_ref's defaults
 * filled in. */
static void check_loaded_config(const prm_model *m, const void *model) {
  const llama_cfg *c = model;
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

static const parity_tok_arch llama_arch = {.name = "llama",
                                           .test = "test_parity_llama",
                                           .name_width = 10,
                                           .score_inference = 1,
                                           .dims = llama_dims,
                                           .extra_flags = extra_flags,
                                           .check_config = check_loaded_config,
                                           .n_groups = G_COUNT,
                                           .group_names = group_name,
                                           .group_of = group_of,
                                           .emb_group = G_EMB};

/* ---- tests -------------------------------------------------------------- */

static int case_setup(void **state) { return parity_tok_setup(state, "llama"); }

static void test_parity_case(void **state) { parity_tok_case_check(&llama_arch, *state); }

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
static void test_train_curve(void **state) {
  parity_tok_train_curve(&llama_arch, *state, &train_cfg, 4, 21, 1e-3, 0.01, 1.0);
}

/* ---- cases -------------------------------------------------------------- */

/* (a) Plain multi-head attention, Meta's default SwiGLU width (256 for
 * dim 32), two layers, ragged lengths 1..72 in one batch with a
 * token_stride wider than 72 (garbage beyond); plain Bradley-Terry. */
static const parity_tok_case case_mha = {
    .name = "mha",
    .model = &(const llama_cfg){.vocab = 64, .n_ctx = 80, .n_embd = 32, .n_layer = 2, .n_head = 4},
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
static const parity_tok_case case_gqa = {.name = "gqa_hd12",
                                         .model = &(const llama_cfg){.vocab = 97,
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
static const parity_tok_case case_mqa = {.name = "mqa_qwen2",
                                         .model = &(const llama_cfg){.vocab = 50,
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
static const parity_tok_case case_qwen3 = {.name = "gqa_qwen3",
                                           .model = &(const llama_cfg){.vocab = 61,
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
  { name, test_parity_case, case_setup, parity_run_teardown, (void *)&(c) }

int main(void) {
  const struct CMUnitTest tests[] = {
      PARITY_TEST("parity_llama_mha_L2_default_ffn", case_mha),
      PARITY_TEST("parity_llama_gqa_head_dim_12_no_decay_1d", case_gqa),
      PARITY_TEST("parity_llama_mqa_qwen2_bias_L3_margin_label_center", case_mqa),
      PARITY_TEST("parity_llama_gqa_qwen3_qk_norm_theta_eps", case_qwen3),
      {"parity_llama_train_50_steps", test_train_curve, case_setup, parity_run_teardown, NULL},
  };
  return prmt_exit(cmocka_run_group_tests(tests, NULL, NULL), sizeof tests / sizeof tests[0]);
}
