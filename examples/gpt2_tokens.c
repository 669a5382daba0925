/*
 * gpt2_tokens.c - train a small GPT-2 reward model on token sequences.
 *
 * The quickstart trains on dense features; a real reward model reads the
 * tokens of a prompt and response. This example shows the token side:
 *
 * 1. Invent a hidden reward over token sequences: r*(y) = (number of token
 *    3s) - (number of token 5s) -- say 3 is "cites a source", 5 is "makes
 *    something up".
 * 2. Draw pairs of random sequences of different lengths (4..12 tokens) and
 *    let a noisy labeller prefer a over b with probability
 *    sigmoid(1.5 (r*(a) - r*(b))) -- the Bradley-Terry model. Pairs with
 *    equal r* are skipped.
 * 3. Train a tiny GPT-2 (2 blocks, width 32) with AdamW through
 *    prm_train_step, which does forward + Bradley-Terry loss + backward +
 *    optimizer step in one call.
 * 4. Each epoch, print the training loss and the held-out accuracy, scored
 *    with a separate inference context (no gradient memory), next to the
 *    Bayes-optimal accuracy (how often r* itself agrees with the noisy
 *    labels): no model beats it on average, a good one gets close.
 *
 * How token batches look (see docs/gpt2.md): sequence i of a batch is
 * tokens[i * token_stride + t] for t < lengths[i]. Sequences are right-padded
 * to the stride; the padding is never read, so its ids do not matter. Pass
 * the real lengths: the score is read at position lengths[i] - 1.
 *
 * Build and run: see README.md (the matrices here are tiny: with OpenBLAS,
 * OPENBLAS_NUM_THREADS=1 runs it faster). Every libprefrm call returns a status;
 * CHECK() prints the message and stops the program on failure.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <prefrm.h>

#define VOCAB 16   /* token ids 0..15 */
#define MAX_LEN 12 /* longest sequence, also the model's n_ctx */
#define MIN_LEN 4
#define GOOD 3       /* each occurrence adds 1 to the hidden reward */
#define BAD 5        /* each occurrence subtracts 1 */
#define N_TRAIN 8192 /* labelled training pairs */
#define N_TEST 1000  /* held-out pairs */
#define PAIRS 32     /* pairs per training step */
#define EPOCHS 3

#define CHECK(call)                                                                                \
  do {                                                                                             \
    int rc_ = (call);                                                                              \
    if (rc_ != PRM_OK) {                                                                           \
      fprintf(stderr, "%s failed: %s (%s)\n", #call, prm_status_string(rc_), prm_last_errmsg());   \
      exit(1);                                                                                     \
    }                                                                                              \
  } while (0)

/* A tiny deterministic generator for the synthetic data (not the library's). */
static unsigned long long rng_state = 7;
static unsigned next_u32(void) {
  rng_state = rng_state * 6364136223846793005ull + 1442695040888963407ull;
  return (unsigned)(rng_state >> 33);
}

static double uniform(void) { return next_u32() * 0x1.0p-32; }

/* A random sequence: GOOD or BAD with probability 1/5 each, else any id.
 * Positions from *len to MAX_LEN - 1 are padding (any id would do). */
static void random_sequence(int32_t *tokens, int32_t *len) {
  *len = MIN_LEN + (int32_t)(next_u32() % (MAX_LEN - MIN_LEN + 1));
  for (int32_t t = 0; t < MAX_LEN; t++) {
    const unsigned u = next_u32() % 5;
    if (t >= *len)
      tokens[t] = 0; /* padding */
    else
      tokens[t] = u == 0 ? GOOD : u == 1 ? BAD : (int32_t)(next_u32() % VOCAB);
  }
}

/* The hidden reward r*. */
static int true_reward(const int32_t *tokens, int32_t len) {
  int r = 0;
  for (int32_t t = 0; t < len; t++)
    r += (tokens[t] == GOOD) - (tokens[t] == BAD);
  return r;
}

/*
 * A labelled data set of n pairs, stored the way prm_train_step wants a pair
 * batch: the n chosen sequences first (rows 0..n-1), then the n rejected
 * ones in the same order (rows n..2n-1). Each row has MAX_LEN slots.
 */
typedef struct pairs {
  int n;
  int agree;        /* labels that r* agrees with */
  int32_t *tokens;  /* (2n, MAX_LEN) */
  int32_t *lengths; /* (2n) */
} pairs;

static pairs make_pairs(int n) {
  pairs p = {n, 0, malloc(sizeof(int32_t) * 2 * n * MAX_LEN), malloc(sizeof(int32_t) * 2 * n)};
  if (!p.tokens || !p.lengths) exit(1);
  for (int i = 0; i < n; i++) {
    int32_t a[MAX_LEN], b[MAX_LEN], la, lb;
    int delta;
    do { /* skip pairs that r* cannot tell apart */
      random_sequence(a, &la);
      random_sequence(b, &lb);
      delta = true_reward(a, la) - true_reward(b, lb);
    } while (delta == 0);
    const int a_wins = uniform() < 1.0 / (1.0 + exp(-1.5 * delta));
    p.agree += (delta > 0) == a_wins;
    memcpy(p.tokens + (size_t)i * MAX_LEN, a_wins ? a : b, sizeof a);
    memcpy(p.tokens + (size_t)(n + i) * MAX_LEN, a_wins ? b : a, sizeof a);
    p.lengths[i] = a_wins ? la : lb;
    p.lengths[n + i] = a_wins ? lb : la;
  }
  return p;
}

int main(void) {
  pairs train = make_pairs(N_TRAIN), test = make_pairs(N_TEST);
  const double bayes = (double)test.agree / N_TEST;

  /* The model: GPT-2 with 2 blocks of width 32 and 2 heads, 12 positions. */
  prm_model_options mo = PRM_MODEL_OPTIONS_INIT;
  mo.arch = PRM_ARCH_GPT2;
  mo.vocab_size = VOCAB;
  mo.n_ctx = MAX_LEN;
  mo.n_embd = 32;
  mo.n_layer = 2;
  mo.n_head = 2;
  mo.seed = 1;
  prm_model *model = NULL;
  CHECK(prm_model_new(&model, &mo));

  /* A training context for one step's batch (2 sequences per pair) and an
   * inference context big enough for the whole test set: it holds no
   * activation history and no gradients, so it is far smaller per row. */
  prm_ctx_options co = PRM_CTX_OPTIONS_INIT;
  co.max_rows = 2 * PAIRS;
  co.max_len = MAX_LEN;
  prm_ctx *ctx = NULL;
  CHECK(prm_ctx_new(&ctx, model, &co));
  prm_ctx_options io = PRM_CTX_OPTIONS_INIT;
  io.inference = 1;
  io.max_rows = 2 * N_TEST;
  io.max_len = MAX_LEN;
  prm_ctx *scorer = NULL;
  CHECK(prm_ctx_new(&scorer, model, &io));

  /* AdamW with a short warm-up, cosine decay and gradient clipping. */
  prm_optimizer_options oo = PRM_OPTIMIZER_OPTIONS_INIT;
  oo.algorithm = PRM_OPT_ADAMW;
  oo.lr = 3e-3;
  oo.weight_decay = 0.01;
  oo.schedule = PRM_SCHED_COSINE;
  oo.warmup_steps = 20;
  oo.total_steps = EPOCHS * (N_TRAIN / PAIRS);
  oo.max_grad_norm = 1.0;
  prm_optimizer *opt = NULL;
  CHECK(prm_optimizer_new(&opt, model, &oo));

  printf("libprefrm %s: gpt2 V=%d n_ctx=%d C=32 L=2 H=2 (%llu parameters), "
         "%d training pairs, %d held out\n",
         prm_version_string(), VOCAB, MAX_LEN, (unsigned long long)prm_model_num_params(model),
         N_TRAIN, N_TEST);

  /* Step buffers: the chosen and rejected rows of PAIRS pairs. */
  int32_t tokens[2 * PAIRS * MAX_LEN], lengths[2 * PAIRS];
  for (int epoch = 1; epoch <= EPOCHS; epoch++) {
    double loss_sum = 0.0;
    int steps = 0;
    for (int start = 0; start + PAIRS <= N_TRAIN; start += PAIRS) {
      /* Chosen rows of this step's pairs, then their rejected rows. */
      memcpy(tokens, train.tokens + (size_t)start * MAX_LEN, sizeof(int32_t) * PAIRS * MAX_LEN);
      memcpy(tokens + PAIRS * MAX_LEN, train.tokens + (size_t)(N_TRAIN + start) * MAX_LEN,
             sizeof(int32_t) * PAIRS * MAX_LEN);
      memcpy(lengths, train.lengths + start, sizeof(int32_t) * PAIRS);
      memcpy(lengths + PAIRS, train.lengths + N_TRAIN + start, sizeof(int32_t) * PAIRS);

      prm_batch b = PRM_BATCH_INIT;
      b.n = 2 * PAIRS; /* rows: P chosen + P rejected */
      b.tokens = tokens;
      b.token_stride = MAX_LEN; /* ints from one sequence to the next */
      b.lengths = lengths;      /* real lengths; padding is never read */
      prm_loss_stats st = PRM_LOSS_STATS_INIT;
      CHECK(prm_train_step(ctx, opt, &b, NULL, &st));
      loss_sum += st.loss;
      steps++;
    }

    /* Held-out: the whole test set in one call on the inference context. */
    prm_batch tb = PRM_BATCH_INIT;
    tb.n = 2 * N_TEST;
    tb.tokens = test.tokens;
    tb.token_stride = MAX_LEN;
    tb.lengths = test.lengths;
    prm_loss_stats ts = PRM_LOSS_STATS_INIT;
    CHECK(prm_evaluate(scorer, &tb, NULL, &ts));
    printf("epoch %d  train loss %.4f  held-out loss %.4f  accuracy %.4f  (Bayes-optimal %.4f)\n",
           epoch, loss_sum / steps, ts.loss, ts.accuracy, bayes);
  }

  /* Scoring single responses: the reward of one sequence (n = 1, the
   * stride is then unused). r* is 0 for the first and 2 for the second. */
  const int32_t few[6] = {1, 3, 5, 7, 9, 11}, many[6] = {3, 2, 3, 4, 3, 5};
  const int32_t len6 = 6;
  float r_few, r_many;
  prm_batch one = PRM_BATCH_INIT;
  one.n = 1;
  one.lengths = &len6;
  one.tokens = few;
  CHECK(prm_ctx_forward(scorer, &one, &r_few, 1));
  one.tokens = many;
  CHECK(prm_ctx_forward(scorer, &one, &r_many, 1));
  printf("reward of {1 3 5 7 9 11} (r* = 0): %.3f;  of {3 2 3 4 3 5} (r* = 2): %.3f\n", r_few,
         r_many);

  prm_optimizer_free(opt);
  prm_ctx_free(scorer);
  prm_ctx_free(ctx);
  prm_model_free(model);
  free(train.tokens);
  free(train.lengths);
  free(test.tokens);
  free(test.lengths);
  return 0;
}
