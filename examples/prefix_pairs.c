/*
 * prefix_pairs.c - train on pairs whose two responses share their prompt,
 * computing each prompt once (prm_batch version 2, docs/throughput.md).
 *
 * Each pair is prompt + chosen response and prompt + rejected response. In
 * the batch (P chosen rows, then P rejected rows, as prm_train_step takes
 * it) every rejected row declares that its first prompt_len tokens are those
 * of its chosen row: prefix_row[P + j] = j, prefix_len[P + j] = prompt_len.
 * The prompt then runs through the network once per pair, and the loss and
 * gradients are those of the undeclared batch up to float rounding -- the
 * example checks that on the first batch, then trains.
 *
 * The data: random prompts of 8..24 tokens and responses of 4..12, from a
 * vocabulary of 32; the hidden reward counts token 3s minus token 5s in the
 * response, and the chosen response is the one with the higher reward.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <prefrm.h>

#define CHECK(call)                                                                                \
  do {                                                                                             \
    int rc_ = (call);                                                                              \
    if (rc_ != PRM_OK) {                                                                           \
      fprintf(stderr, "%s:%d: %s failed: %s\n  %s\n", __FILE__, __LINE__, #call,                  \
              prm_status_string(rc_), prm_last_errmsg());                                         \
      exit(1);                                                                                     \
    }                                                                                              \
  } while (0)

#define VOCAB 32
#define STRIDE 36 /* longest prompt + response */
#define P 16      /* pairs per step */
#define N_PAIRS 512

static uint64_t rng = 42;
static uint32_t next_u32(void) { /* xorshift64* */
  rng ^= rng >> 12;
  rng ^= rng << 25;
  rng ^= rng >> 27;
  return (uint32_t)((rng * 2685821657736338717ull) >> 32);
}

static int reward(const int32_t *r, int n) {
  int s = 0;
  for (int i = 0; i < n; i++) s += (r[i] == 3) - (r[i] == 5);
  return s;
}

/* Pair k: prompt, then chosen and rejected responses, into the rows j and
 * P + j of tokens; lengths and the prompt length out. */
static void make_pair(int32_t *chosen, int32_t *rejected, int32_t *len_c, int32_t *len_r,
                      int32_t *prompt_len) {
  const int np = 8 + (int)(next_u32() % 17);
  for (int t = 0; t < np; t++) chosen[t] = rejected[t] = (int32_t)(next_u32() % VOCAB);
  int32_t a[12], b[12];
  int na, nb;
  do {
    na = 4 + (int)(next_u32() % 9);
    nb = 4 + (int)(next_u32() % 9);
    for (int t = 0; t < na; t++) a[t] = (int32_t)(next_u32() % 8);
    for (int t = 0; t < nb; t++) b[t] = (int32_t)(next_u32() % 8);
  } while (reward(a, na) == reward(b, nb));
  const int a_wins = reward(a, na) > reward(b, nb);
  memcpy(chosen + np, a_wins ? a : b, (size_t)(a_wins ? na : nb) * sizeof(int32_t));
  memcpy(rejected + np, a_wins ? b : a, (size_t)(a_wins ? nb : na) * sizeof(int32_t));
  *len_c = np + (a_wins ? na : nb);
  *len_r = np + (a_wins ? nb : na);
  *prompt_len = np;
}

int main(void) {
  prm_model_options mo;
  CHECK(prm_model_options_init(&mo, PRM_MODEL_OPTIONS_VERSION));
  mo.arch = PRM_ARCH_GPT2;
  mo.vocab_size = VOCAB;
  mo.n_ctx = STRIDE;
  mo.n_embd = 32;
  mo.n_layer = 2;
  mo.n_head = 2;
  mo.seed = 7;
  prm_model *model = NULL;
  CHECK(prm_model_new(&model, &mo));
  prm_ctx_options co;
  CHECK(prm_ctx_options_init(&co, PRM_CTX_OPTIONS_VERSION));
  co.max_rows = 2 * P;
  prm_ctx *ctx = NULL;
  CHECK(prm_ctx_new(&ctx, model, &co));
  prm_optimizer_options oo;
  CHECK(prm_optimizer_options_init(&oo, PRM_OPTIMIZER_OPTIONS_VERSION));
  oo.lr = 3e-3;
  prm_optimizer *opt = NULL;
  CHECK(prm_optimizer_new(&opt, model, &oo));

  static int32_t tokens[N_PAIRS / P][2 * P * STRIDE];
  static int32_t lengths[N_PAIRS / P][2 * P], prompt_len[N_PAIRS / P][P];
  for (int s = 0; s < N_PAIRS / P; s++)
    for (int j = 0; j < P; j++)
      make_pair(tokens[s] + j * STRIDE, tokens[s] + (P + j) * STRIDE, &lengths[s][j],
                &lengths[s][P + j], &prompt_len[s][j]);

  int32_t prefix_row[2 * P], prefix_len[2 * P];
  prm_loss_stats stats;
  CHECK(prm_loss_stats_init(&stats, PRM_LOSS_STATS_VERSION));
  for (int epoch = 1; epoch <= 4; epoch++) {
    double loss = 0.0, acc = 0.0;
    uint64_t computed = 0, total = 0;
    for (int s = 0; s < N_PAIRS / P; s++) {
      prm_batch b;
      CHECK(prm_batch_init(&b, PRM_BATCH_VERSION));
      b.n = 2 * P;
      b.tokens = tokens[s];
      b.token_stride = STRIDE;
      b.lengths = lengths[s];
      for (int j = 0; j < P; j++) {
        prefix_row[j] = 0; /* chosen rows: nothing earlier to share */
        prefix_len[j] = 0;
        prefix_row[P + j] = j; /* rejected row: its chosen row's prompt */
        prefix_len[P + j] = prompt_len[s][j];
      }
      if (epoch == 1 && s == 0) { /* the declaration changes the work, not the loss */
        prm_loss_stats plain;
        CHECK(prm_loss_stats_init(&plain, PRM_LOSS_STATS_VERSION));
        CHECK(prm_evaluate(ctx, &b, NULL, &plain));
        b.prefix_row = prefix_row;
        b.prefix_len = prefix_len;
        CHECK(prm_evaluate(ctx, &b, NULL, &stats));
        printf("first batch: loss %.7f without the declaration, %.7f with it\n", plain.loss,
               stats.loss);
        if (fabs(plain.loss - stats.loss) > 1e-5) return 1;
      }
      b.prefix_row = prefix_row;
      b.prefix_len = prefix_len;
      CHECK(prm_train_step(ctx, opt, &b, NULL, &stats));
      computed += prm_ctx_tokens_computed(ctx);
      for (int i = 0; i < 2 * P; i++) total += (uint64_t)lengths[s][i];
      loss += stats.loss;
      acc += stats.accuracy;
    }
    printf("epoch %d: loss %.4f, training accuracy %.3f, tokens per pair %.1f computed of %.1f\n",
           epoch, loss / (N_PAIRS / P), acc / (N_PAIRS / P), (double)computed / N_PAIRS,
           (double)total / N_PAIRS);
  }
  prm_optimizer_free(opt);
  prm_ctx_free(ctx);
  prm_model_free(model);
  return 0;
}
