/*
 * test_parity_gpt2.c - the gpt2 architecture against the PyTorch reference
 * (../shared/reference/torch_ref.py, Hugging Face GPT2ForSequenceClassification
 * math): scores, loss, every parameter gradient, the global gradient norm and
 * one AdamW step for four configurations, and a 50-step training run whose
 * loss curve must follow PyTorch's.
 *
 * Per parity case (parity_tok_case_check, parityutil.c):
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
 * optimizer) in PyTorch. Every step's loss must agree to PARITY_TOK_TRAIN_LOSS_TOL
 * (absolute) and its gradient norm (before clipping) to PARITY_TOK_TRAIN_NORM_TOL
 * (relative; a 1% error in lr or a missing clip already breaks the loss bound
 * within ten steps, a missing weight decay only the norm bound).
 *
 * Skips (reason on stderr) when ../shared is absent or PRM_PYTHON cannot
 * import torch. Ten reference runs in all (five init, four grads, one
 * training run), about 10 s on 2 cores.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
/* cmocka.h needs the three headers above first */
#include <cmocka.h>

#include <string.h>

#include "parityutil.h"
#include "testutil.h"

/* ---- the gpt2 specifics ------------------------------------------------- */

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

/* A gpt2's configuration is the dims alone. */
static parity_tok_dims gpt2_dims(const void *model) { return *(const parity_tok_dims *)model; }

static void check_loaded_config(const prm_model *m, const void *model) {
  const parity_tok_dims *d = model;
  prm_model_options mo;
  assert_int_equal(prm_model_options_init(&mo, PRM_MODEL_OPTIONS_VERSION), PRM_OK);
  assert_int_equal(prm_model_get_options(m, &mo), PRM_OK);
  assert_int_equal(mo.arch, PRM_ARCH_GPT2);
  assert_int_equal(mo.vocab_size, d->vocab);
  assert_int_equal(mo.n_ctx, d->n_ctx);
  assert_int_equal(mo.n_embd, d->n_embd);
  assert_int_equal(mo.n_layer, d->n_layer);
  assert_int_equal(mo.n_head, d->n_head);
  assert_int_equal(prm_model_trainable_offset(m), 0);
}

static const parity_tok_arch gpt2_arch = {.name = "gpt2",
                                          .test = "test_parity_gpt2",
                                          .name_width = 16,
                                          .dims = gpt2_dims,
                                          .check_config = check_loaded_config,
                                          .n_groups = G_COUNT,
                                          .group_names = group_name,
                                          .group_of = group_of,
                                          .emb_group = G_EMB};

/* ---- tests -------------------------------------------------------------- */

static int case_setup(void **state) { return parity_tok_setup(state, "gpt2"); }

static void test_parity_case(void **state) { parity_tok_case_check(&gpt2_arch, *state); }

/* The 50-step training run. */
static const parity_tok_dims train_model = {
    .vocab = 50, .n_ctx = 12, .n_embd = 16, .n_layer = 2, .n_head = 2};

static void test_train_curve(void **state) {
  parity_tok_train_curve(&gpt2_arch, *state, &train_model, 4, 21, 1e-3, 0.01, 1.0);
}

/* ---- cases -------------------------------------------------------------- */

/* One layer, one head, every sequence full length; plain Bradley-Terry. */
static const parity_tok_case case_small = {
    .name = "L1_H1_full",
    .model =
        &(const parity_tok_dims){.vocab = 64, .n_ctx = 16, .n_embd = 16, .n_layer = 1, .n_head = 1},
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
static const parity_tok_case case_ragged = {
    .name = "L2_H3_ragged",
    .model =
        &(const parity_tok_dims){.vocab = 50, .n_ctx = 12, .n_embd = 24, .n_layer = 2, .n_head = 3},
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
static const parity_tok_case case_deep = {
    .name = "L3_H4_margin_label",
    .model =
        &(const parity_tok_dims){.vocab = 97, .n_ctx = 80, .n_embd = 32, .n_layer = 3, .n_head = 4},
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

/* Long sequences: from 512 tokens on, attention runs in 64-row query blocks
 * instead of 32 (lib/gpt2.c, att_block). Lengths 300..600 put rows on both
 * sides of the switch in one batch, plus one of 1 and one of 600. */
static const parity_tok_case case_long = {
    .name = "L2_H2_long",
    .model = &(const parity_tok_dims){.vocab = 50, .n_ctx = 600, .n_embd = 16, .n_layer = 2,
                                      .n_head = 2},
    .pairs = 4,
    .max_len = 600,
    .stride = 600,
    .min_len = 300,
    .edge_lengths = 1,
    .seed = 9,
    .lr = 1e-3,
    .weight_decay = 0.01,
    .max_grad_norm = 1.0};

#define PARITY_TEST(name, c)                                                                       \
  { name, test_parity_case, case_setup, parity_run_teardown, (void *)&(c) }

int main(void) {
  const struct CMUnitTest tests[] = {
      PARITY_TEST("parity_gpt2_L1_H1_full", case_small),
      PARITY_TEST("parity_gpt2_L2_H3_ragged_no_decay_1d", case_ragged),
      PARITY_TEST("parity_gpt2_L3_H4_margin_label_center", case_deep),
      PARITY_TEST("parity_gpt2_L2_H2_long_64_row_blocks", case_long),
      {"parity_gpt2_train_50_steps", test_train_curve, case_setup, parity_run_teardown, NULL},
  };
  return prmt_exit(cmocka_run_group_tests(tests, NULL, NULL), sizeof tests / sizeof tests[0]);
}
