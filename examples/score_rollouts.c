/*
 * score_rollouts.c - best-of-n scoring: n responses per prompt, the prompt
 * computed once, one context on several threads.
 *
 * In an RL loop the reward model scores many responses to the same prompt
 * (best-of-n sampling, PPO rollouts). Two libprefrm features make that
 * cheap:
 *
 * 1. Shared prefixes (prm_batch version 2). The rows of one prompt are
 *    batched together; every row after the first declares that its first
 *    prompt_len tokens are those of the first row (prefix_row = the first
 *    row, prefix_len = prompt_len). The prompt then runs through the network
 *    once per batch instead of once per response, and the scores are the
 *    same (up to float rounding) as without the declaration. The library
 *    checks the declared tokens really are equal.
 * 2. Threads (prm_ctx_options version 2). The context is created with a
 *    parallel_for -- here prm_pool's, the pthreads pool that ships with the
 *    library -- and runs each forward on that many workers. Scores are
 *    bit-identical for any number of workers.
 *
 *   score_rollouts [WORKERS [CHECKPOINT]]
 *
 * WORKERS (default 2) sizes the pool. CHECKPOINT is a gpt2 or llama reward
 * model saved by libprefrm or prefrm-train (byte tokens: id = UTF-8 byte);
 * without one, a small random gpt2 is used, which shows the mechanics but
 * ranks responses arbitrarily. Every call is checked (CHECK prints the
 * library's message and exits).
 */
#include <math.h>
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

#define N_RESP 8    /* responses per prompt: the rows of one forward */
#define MAX_LEN 256 /* longest prompt + response, in bytes */

static const char *prompts[] = {
    "Human: How do I keep basil alive on a windowsill?\n\nAssistant:",
    "Human: Can you explain what a mortgage is, in two sentences?\n\nAssistant:",
    "Human: What is a good way to start learning to play the guitar?\n\nAssistant:",
};

static const char *responses[N_RESP] = {
    " Give it at least six hours of sun and water it when the top of the soil is dry.",
    " I don't know.",
    " Plants are living things.",
    " Pinch off the flower buds, and use a pot with drainage holes so the roots never sit "
    "in water.",
    " Ask someone else.",
    " Sunlight, steady watering and regular trimming of the top leaves keep it bushy.",
    " It depends.",
    " Start with a few minutes every day, and learn three or four open chords first.",
};

/* Write prompt + response as byte tokens into row (MAX_LEN ids); returns
 * the length. The caller's texts fit. */
static int32_t bytes(int32_t *row, const char *prompt, const char *response) {
  int32_t n = 0;
  for (const char *s = prompt; *s; s++) row[n++] = (unsigned char)*s;
  for (const char *s = response; *s; s++) row[n++] = (unsigned char)*s;
  return n;
}

int main(int argc, char **argv) {
  const int workers = argc > 1 ? atoi(argv[1]) : 2;
  if (workers < 1 || workers > 64) {
    fprintf(stderr, "usage: score_rollouts [WORKERS (1..64) [CHECKPOINT]]\n");
    return 2;
  }

  prm_model *model = NULL;
  if (argc > 2) {
    CHECK(prm_model_load(&model, argv[2]));
  } else {
    prm_model_options mo;
    CHECK(prm_model_options_init(&mo, PRM_MODEL_OPTIONS_VERSION));
    mo.arch = PRM_ARCH_GPT2;
    mo.vocab_size = 256;
    mo.n_ctx = MAX_LEN;
    mo.n_embd = 64;
    mo.n_layer = 2;
    mo.n_head = 4;
    mo.seed = 1;
    CHECK(prm_model_new(&model, &mo));
  }

  /* one pool, one inference context running on it */
  prm_pool *pool = NULL;
  CHECK(prm_pool_new(&pool, (uint32_t)workers));
  prm_ctx_options co;
  CHECK(prm_ctx_options_init(&co, PRM_CTX_OPTIONS_VERSION));
  co.inference = 1;
  co.max_rows = N_RESP;
  co.max_len = MAX_LEN;
  co.n_workers = prm_pool_size(pool);
  co.parallel_for = prm_pool_parallel_for;
  co.parallel_arg = pool;
  prm_ctx *ctx = NULL;
  CHECK(prm_ctx_new(&ctx, model, &co));

  static int32_t tokens[N_RESP * MAX_LEN];
  int32_t lengths[N_RESP], prefix_row[N_RESP], prefix_len[N_RESP];
  float shared[N_RESP], plain[N_RESP];
  double worst = 0.0;
  uint64_t computed = 0, total = 0;

  for (size_t p = 0; p < sizeof prompts / sizeof prompts[0]; p++) {
    const int32_t plen = (int32_t)strlen(prompts[p]);
    for (int i = 0; i < N_RESP; i++) {
      lengths[i] = bytes(tokens + i * MAX_LEN, prompts[p], responses[i]);
      prefix_row[i] = 0;               /* every row repeats row 0's prompt */
      prefix_len[i] = i == 0 ? 0 : plen; /* row 0 has nothing earlier to share */
    }
    prm_batch b;
    CHECK(prm_batch_init(&b, PRM_BATCH_VERSION));
    b.n = N_RESP;
    b.tokens = tokens;
    b.token_stride = MAX_LEN;
    b.lengths = lengths;

    /* the same batch without the declaration, for comparison */
    CHECK(prm_ctx_forward(ctx, &b, plain, N_RESP));
    total += prm_ctx_tokens_computed(ctx);

    b.prefix_row = prefix_row;
    b.prefix_len = prefix_len;
    CHECK(prm_ctx_forward(ctx, &b, shared, N_RESP));
    computed += prm_ctx_tokens_computed(ctx);

    int best = 0;
    for (int i = 0; i < N_RESP; i++) {
      if (shared[i] > shared[best]) best = i;
      const double d = fabs((double)shared[i] - (double)plain[i]) / (1.0 + fabs((double)plain[i]));
      worst = d > worst ? d : worst;
    }
    const char *question = prompts[p] + strlen("Human: ");
    printf("prompt %zu: %.*s\n", p, (int)strcspn(question, "\n"), question);
    for (int i = 0; i < N_RESP; i++)
      printf("  %s reward %+.4f  %.60s\n", i == best ? "*" : " ", shared[i], responses[i] + 1);
  }
  printf("tokens computed: %llu with the prompt shared, %llu without (%.2fx less work)\n",
         (unsigned long long)computed, (unsigned long long)total, (double)total / (double)computed);
  printf("largest relative difference shared vs unshared: %.2g (%d workers)\n", worst, workers);

  prm_ctx_free(ctx);
  prm_pool_free(pool);
  prm_model_free(model);
  return worst < 1e-4 ? 0 : 1;
}
