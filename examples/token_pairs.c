/*
 * token_pairs.c - pair batches for a token model from ragged sequences.
 *
 * A tokenizer gives every response its own length. A tokenized data set is
 * usually kept the way this program keeps it: all token ids back to back in
 * one array, an offset and a length per response, and each preference pair
 * as two response indices (chosen, rejected). prm_tokens_gather turns any
 * such list of sequences into the right-padded rows of a token batch,
 * checking every length against the row width; the P chosen sequences then
 * the P rejected ones make a pair batch (docs/api.md, Batches; docs/gpt2.md).
 *
 * The task: the hidden reward of a response is (number of token 3s) -
 * (number of token 5s); of two responses with different rewards the better
 * one is chosen. A tiny GPT-2 (2 blocks, width 32) learns it, and its
 * accuracy on held-out pairs is printed at the end.
 *
 *   ./build/examples/token_pairs
 */
#include <stdio.h>
#include <stdlib.h>

#include <prefrm.h>

#define VOCAB 16
#define MAX_LEN 24   /* longest response, the model's n_ctx and the row width */
#define N_RESP 3000  /* tokenized responses */
#define N_TRAIN 2400 /* training pairs */
#define N_TEST 300   /* held-out pairs */
#define P 16         /* pairs per training step */
#define STEPS 300

#define CHECK(call)                                                                                \
  do {                                                                                             \
    if ((rc = (call)) != PRM_OK) goto fail;                                                        \
  } while (0)

/* A small deterministic generator for the synthetic data (not the library's). */
static unsigned long long rng_state = 11;
static unsigned next_below(unsigned n) {
  rng_state = rng_state * 6364136223846793005ull + 1442695040888963407ull;
  return (unsigned)((rng_state >> 33) % n);
}

/* The data set: responses back to back in `arena`, pairs as response indices. */
typedef struct dataset {
  int32_t *arena;          /* all token ids */
  size_t offset[N_RESP];   /* response r is arena[offset[r] .. offset[r] + len[r] - 1] */
  int32_t len[N_RESP];     /* 1 .. MAX_LEN */
  int reward[N_RESP];      /* the hidden reward */
  int pair[N_TRAIN + N_TEST][2]; /* (chosen, rejected) response indices */
} dataset;

static int make_dataset(dataset *ds) {
  ds->arena = malloc(sizeof(int32_t) * N_RESP * MAX_LEN);
  if (!ds->arena) return -1;
  size_t used = 0;
  for (int r = 0; r < N_RESP; r++) {
    ds->offset[r] = used;
    ds->len[r] = 2 + (int32_t)next_below(MAX_LEN - 1);
    ds->reward[r] = 0;
    for (int32_t t = 0; t < ds->len[r]; t++) {
      int32_t id = (int32_t)next_below(VOCAB);
      ds->arena[used++] = id;
      ds->reward[r] += (id == 3) - (id == 5);
    }
  }
  for (int i = 0; i < N_TRAIN + N_TEST; i++) {
    int a, b;
    do {
      a = (int)next_below(N_RESP);
      b = (int)next_below(N_RESP);
    } while (ds->reward[a] == ds->reward[b]);
    ds->pair[i][0] = ds->reward[a] > ds->reward[b] ? a : b;
    ds->pair[i][1] = ds->reward[a] > ds->reward[b] ? b : a;
  }
  return 0;
}

/* seqs and len of pairs first .. first + n - 1: the n chosen sequences, then
 * the n rejected ones (2n entries each). */
static void list_pairs(const dataset *ds, int first, int n, const int32_t **seqs, int32_t *len) {
  for (int i = 0; i < n; i++)
    for (int side = 0; side < 2; side++) {
      int r = ds->pair[first + i][side];
      seqs[side * n + i] = ds->arena + ds->offset[r];
      len[side * n + i] = ds->len[r];
    }
}

int main(void) {
  static dataset ds;
  int rc = PRM_OK;
  prm_model *model = NULL;
  prm_ctx *ctx = NULL, *scorer = NULL;
  prm_optimizer *opt = NULL;
  int32_t *ids = NULL;
  if (make_dataset(&ds) != 0) {
    fprintf(stderr, "out of memory\n");
    return 1;
  }

  prm_model_options mo = PRM_MODEL_OPTIONS_INIT;
  mo.arch = PRM_ARCH_GPT2;
  mo.vocab_size = VOCAB;
  mo.n_ctx = MAX_LEN;
  mo.n_embd = 32;
  mo.n_layer = 2;
  mo.n_head = 2;
  mo.seed = 1;
  CHECK(prm_model_new(&model, &mo));
  prm_ctx_options co = PRM_CTX_OPTIONS_INIT;
  co.max_rows = 2 * P;
  CHECK(prm_ctx_new(&ctx, model, &co)); /* max_len 0: the model's n_ctx */
  prm_ctx_options so = PRM_CTX_OPTIONS_INIT;
  so.inference = 1;
  so.max_rows = 2 * N_TEST;
  CHECK(prm_ctx_new(&scorer, model, &so));
  prm_optimizer_options oo = PRM_OPTIMIZER_OPTIONS_INIT;
  oo.lr = 3e-3;
  oo.max_grad_norm = 1.0;
  CHECK(prm_optimizer_new(&opt, model, &oo));

  /* One buffer of right-padded rows, big enough for the largest batch. */
  const uint64_t T = prm_ctx_max_len(ctx); /* the row width: MAX_LEN */
  ids = malloc(sizeof *ids * 2 * N_TEST * T);
  if (!ids) {
    rc = PRM_ERR_NOMEM;
    goto fail;
  }

  const int32_t *seqs[2 * N_TEST];
  int32_t len[2 * N_TEST];
  prm_loss_stats st = PRM_LOSS_STATS_INIT;
  for (int step = 0; step < STEPS; step++) {
    list_pairs(&ds, (step * P) % N_TRAIN, P, seqs, len);
    /* seqs[0..P-1]: chosen, seqs[P..2P-1]: rejected; len[i]: their lengths */
    CHECK(prm_tokens_gather(ids, T, 2 * P, seqs, len, 0)); /* pad id 0, never read */
    prm_batch b = PRM_BATCH_INIT;
    b.n = 2 * P;             /* sequences: P chosen, then P rejected */
    b.tokens = ids;          /* (n, token_stride) int32, right-padded */
    b.token_stride = T;      /* ids from one sequence to the next, >= every length */
    b.lengths = len;         /* n lengths in [1, the context's max_len] */
    CHECK(prm_train_step(ctx, opt, &b, NULL, &st));
    if (step % 100 == 0) printf("step %d loss %.4f\n", step, st.loss);
  }

  /* Held-out pairs, scored in one batch by the inference context. */
  list_pairs(&ds, N_TRAIN, N_TEST, seqs, len);
  CHECK(prm_tokens_gather(ids, T, 2 * N_TEST, seqs, len, 0));
  prm_batch tb = PRM_BATCH_INIT;
  tb.n = 2 * N_TEST;
  tb.tokens = ids;
  tb.token_stride = T;
  tb.lengths = len;
  prm_loss_stats ts = PRM_LOSS_STATS_INIT;
  CHECK(prm_evaluate(scorer, &tb, NULL, &ts));
  printf("held-out: loss %.4f accuracy %.3f (%d pairs)\n", ts.loss, ts.accuracy, N_TEST);

fail:
  if (rc != PRM_OK) fprintf(stderr, "%s: %s\n", prm_status_string(rc), prm_last_errmsg());
  free(ids);
  prm_optimizer_free(opt);
  prm_ctx_free(scorer);
  prm_ctx_free(ctx);
  prm_model_free(model);
  free(ds.arena);
  return rc == PRM_OK ? 0 : 1;
}
