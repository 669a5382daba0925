/*
 * llama_pretrained.c - start a Llama reward model from a Hugging Face
 * language-model checkpoint and train it on preference pairs.
 *
 * This is how reward models are made in practice: take the language model
 * you are tuning (a LlamaForCausalLM checkpoint), drop its LM head, put a
 * fresh scalar head on the last token, and train on "chosen beats rejected"
 * pairs. The steps:
 *
 * 1. The checkpoint. With --ckpt FILE (a safetensors file in
 *    LlamaForCausalLM, LlamaModel or ...ForSequenceClassification layout)
 *    that file is used; give the configuration the file does not carry
 *    (hub files have only {"format": "pt"}; HF keeps the rest in
 *    config.json) with --heads, --kv-heads, --ctx, --rope-theta, --rms-eps.
 *    Without --ckpt the program first writes such a file itself, exactly as
 *    the hub would lay it out (model.* names, lm_head.weight, no
 *    configuration), from a small randomly initialised Llama: a stand-in
 *    for a real pretrained model, so that the example runs anywhere.
 * 2. prm_model_load_pretrained reads the backbone, ignores lm_head.weight,
 *    initialises score.weight, and reports what it did with every tensor.
 * 3. Freeze the embeddings (train the blocks, the final norm and the head):
 *    prm_model_set_trainable(model, n_layer).
 * 4. A synthetic preference task over prompt + response token sequences:
 *    both responses of a pair follow the same prompt; the hidden reward is
 *    (GOOD tokens) - (BAD tokens) in the response -- say GOOD is "cites a
 *    source", BAD "makes something up". A noisy labeller prefers the
 *    response with the higher reward with probability
 *    sigmoid(1.5 (r*(a) - r*(b))).
 * 5. Train with AdamW through prm_train_step and print, per epoch, the loss
 *    and the held-out accuracy next to the Bayes-optimal accuracy.
 *
 * Build: see README.md; run ./build/examples/llama_pretrained.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <prefrm.h>

#define VOCAB 24
#define PROMPT 4   /* prompt tokens */
#define MIN_RESP 3 /* response tokens, MIN_RESP..MAX_RESP */
#define MAX_RESP 10
#define MAX_LEN (PROMPT + MAX_RESP)
#define N_TRAIN 6144
#define N_TEST 1000
#define PAIRS 32
#define EPOCHS 3

#define CHECK(call)                                                                                \
  do {                                                                                             \
    int rc_ = (call);                                                                              \
    if (rc_ != PRM_OK) {                                                                           \
      fprintf(stderr, "%s failed: %s (%s)\n", #call, prm_status_string(rc_), prm_last_errmsg());   \
      exit(1);                                                                                     \
    }                                                                                              \
  } while (0)

/* ---- step 1: a checkpoint in the hub's LlamaForCausalLM layout ------------------------- */

/* Append the little-endian bytes of a float array (x86 and ARM are
 * little-endian; a big-endian host would swap here). */
static void put_floats(FILE *f, const float *x, uint64_t n) {
  if (fwrite(x, sizeof(float), (size_t)n, f) != (size_t)n) {
    perror("write");
    exit(1);
  }
}

/*
 * Write `model`'s backbone as a LlamaForCausalLM file: every tensor but
 * score.weight under its own (HF) name, plus an lm_head.weight [V, D],
 * metadata exactly {"format": "pt"}. A safetensors file is an 8-byte header
 * length, a JSON header padded with spaces to a multiple of 8, then the raw
 * data; data_offsets are relative to the end of the header.
 */
static void write_causal_lm(const prm_model *model, const char *path) {
  prm_model_options o = PRM_MODEL_OPTIONS_INIT;
  CHECK(prm_model_get_options(model, &o));
  const uint64_t V = o.vocab_size, D = o.n_embd;
  float *lm_head = malloc(V * D * sizeof(float));
  for (uint64_t i = 0; i < V * D; i++)
    lm_head[i] = 0.02f * (float)sin((double)i);
  size_t cap = 1 << 16, len = 0;
  char *json = malloc(cap);
  uint64_t offset = 0;
  len += (size_t)snprintf(json + len, cap - len, "{\"__metadata__\":{\"format\":\"pt\"}");
  const uint32_t nt = prm_model_num_tensors(model);
  for (uint32_t t = 0; t <= nt; t++) {
    const char *name = "lm_head.weight";
    uint32_t ndim = 2;
    uint64_t shape[2] = {V, D};
    if (t < nt) CHECK(prm_model_tensor_info(model, t, &name, NULL, &ndim, shape));
    if (strcmp(name, "score.weight") == 0) continue; /* a language model has none */
    const uint64_t bytes = 4 * (ndim == 2 ? shape[0] * shape[1] : shape[0]);
    len += (size_t)snprintf(json + len, cap - len, ",\"%s\":{\"dtype\":\"F32\",\"shape\":[", name);
    for (uint32_t k = 0; k < ndim; k++)
      len += (size_t)snprintf(json + len, cap - len, "%s%llu", k ? "," : "",
                              (unsigned long long)shape[k]);
    len += (size_t)snprintf(json + len, cap - len, "],\"data_offsets\":[%llu,%llu]}",
                            (unsigned long long)offset, (unsigned long long)(offset + bytes));
    offset += bytes;
  }
  len += (size_t)snprintf(json + len, cap - len, "}");
  while (len % 8 != 0)
    json[len++] = ' ';
  FILE *f = fopen(path, "wb");
  if (f == NULL) {
    perror(path);
    exit(1);
  }
  unsigned char hlen[8];
  for (int i = 0; i < 8; i++)
    hlen[i] = (unsigned char)(((uint64_t)len >> (8 * i)) & 0xFF);
  fwrite(hlen, 1, 8, f);
  fwrite(json, 1, len, f);
  const float *p = prm_model_params((prm_model *)model, NULL);
  for (uint32_t t = 0; t < nt; t++) {
    const char *name;
    uint64_t off, shape[2];
    uint32_t ndim;
    CHECK(prm_model_tensor_info(model, t, &name, &off, &ndim, shape));
    if (strcmp(name, "score.weight") != 0)
      put_floats(f, p + off, ndim == 2 ? shape[0] * shape[1] : shape[0]);
  }
  put_floats(f, lm_head, V * D);
  if (fclose(f) != 0) {
    perror(path);
    exit(1);
  }
  free(json);
  free(lm_head);
}

/* ---- step 4: the synthetic preference task ----------------------------------------------- */

static unsigned long long rng_state = 11;
static unsigned next_u32(void) {
  rng_state = rng_state * 6364136223846793005ull + 1442695040888963407ull;
  return (unsigned)(rng_state >> 33);
}
static double uniform(void) { return next_u32() * 0x1.0p-32; }

#define GOOD 3
#define BAD 5

/* A prompt (shared by both responses of a pair) and a response after it;
 * positions from *len on are padding. GOOD and BAD each appear with
 * probability 1/5 per response position. */
static void response(const int32_t *prompt, int32_t *seq, int32_t *len) {
  const int32_t n = MIN_RESP + (int32_t)(next_u32() % (MAX_RESP - MIN_RESP + 1));
  memcpy(seq, prompt, PROMPT * sizeof(int32_t));
  for (int32_t t = PROMPT; t < MAX_LEN; t++) {
    const unsigned u = next_u32() % 5;
    seq[t] = t >= PROMPT + n ? 0 : u == 0 ? GOOD : u == 1 ? BAD : (int32_t)(next_u32() % VOCAB);
  }
  *len = PROMPT + n;
}

/* The hidden reward of the response (the prompt does not count). */
static int true_reward(const int32_t *seq, int32_t len) {
  int r = 0;
  for (int32_t t = PROMPT; t < len; t++)
    r += (seq[t] == GOOD) - (seq[t] == BAD);
  return r;
}

typedef struct pairs {
  int32_t (*chosen)[MAX_LEN], (*rejected)[MAX_LEN];
  int32_t *len_c, *len_r;
  int bayes_right; /* pairs where r* agrees with the label */
} pairs;

static void make_pairs(pairs *d, int n) {
  d->chosen = malloc((size_t)n * sizeof *d->chosen);
  d->rejected = malloc((size_t)n * sizeof *d->rejected);
  d->len_c = malloc((size_t)n * sizeof(int32_t));
  d->len_r = malloc((size_t)n * sizeof(int32_t));
  d->bayes_right = 0;
  for (int i = 0; i < n;) {
    int32_t prompt[PROMPT], a[MAX_LEN], b[MAX_LEN], la, lb;
    for (int t = 0; t < PROMPT; t++)
      prompt[t] = (int32_t)(next_u32() % VOCAB);
    response(prompt, a, &la);
    response(prompt, b, &lb);
    const int ra = true_reward(a, la), rb = true_reward(b, lb);
    if (ra == rb) continue;
    const int a_wins = uniform() < 1.0 / (1.0 + exp(-1.5 * (ra - rb)));
    memcpy(d->chosen[i], a_wins ? a : b, sizeof a);
    memcpy(d->rejected[i], a_wins ? b : a, sizeof a);
    d->len_c[i] = a_wins ? la : lb;
    d->len_r[i] = a_wins ? lb : la;
    d->bayes_right += a_wins == (ra > rb);
    i++;
  }
}

static void free_pairs(pairs *d) {
  free(d->chosen);
  free(d->rejected);
  free(d->len_c);
  free(d->len_r);
}

/* Pairs [i0, i0 + n) as one token batch: n chosen rows, then n rejected. */
static prm_batch pair_batch(const pairs *d, int i0, int n, int32_t *tok, int32_t *len) {
  for (int k = 0; k < n; k++) {
    memcpy(tok + (size_t)k * MAX_LEN, d->chosen[i0 + k], MAX_LEN * sizeof(int32_t));
    memcpy(tok + (size_t)(n + k) * MAX_LEN, d->rejected[i0 + k], MAX_LEN * sizeof(int32_t));
    len[k] = d->len_c[i0 + k];
    len[n + k] = d->len_r[i0 + k];
  }
  prm_batch b = PRM_BATCH_INIT;
  b.n = 2 * (uint64_t)n;
  b.tokens = tok;
  b.token_stride = MAX_LEN;
  b.lengths = len;
  return b;
}

int main(int argc, char **argv) {
  /* ---- configuration: what a hub file cannot tell ---- */
  prm_model_options cfg = PRM_MODEL_OPTIONS_INIT;
  cfg.arch = PRM_ARCH_LLAMA;
  cfg.vocab_size = VOCAB;
  cfg.n_ctx = MAX_LEN;
  cfg.n_embd = 48;
  cfg.n_layer = 2;
  cfg.n_head = 4;
  cfg.n_kv_head = 2; /* grouped-query attention, as Llama 3 */
  cfg.n_ffn = 128;
  const char *ckpt = NULL;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (strcmp(argv[i], "--ckpt") == 0)
      ckpt = argv[i + 1];
    else if (strcmp(argv[i], "--heads") == 0)
      cfg.n_head = strtoull(argv[i + 1], NULL, 10);
    else if (strcmp(argv[i], "--kv-heads") == 0)
      cfg.n_kv_head = strtoull(argv[i + 1], NULL, 10);
    else if (strcmp(argv[i], "--ctx") == 0)
      cfg.n_ctx = strtoull(argv[i + 1], NULL, 10);
    else if (strcmp(argv[i], "--rope-theta") == 0)
      cfg.rope_theta = strtod(argv[i + 1], NULL);
    else if (strcmp(argv[i], "--rms-eps") == 0)
      cfg.rms_eps = strtod(argv[i + 1], NULL);
    else {
      fprintf(stderr,
              "usage: %s [--ckpt FILE --heads H [--kv-heads G] [--ctx T] "
              "[--rope-theta X] [--rms-eps E]]\n",
              argv[0]);
      return 2;
    }
  }
  if (ckpt == NULL) {
    prm_model *lm = NULL;
    cfg.seed = 2024;
    CHECK(prm_model_new(&lm, &cfg));
    ckpt = "llama_causal_lm.safetensors";
    write_causal_lm(lm, ckpt);
    prm_model_free(lm);
    printf("wrote %s: a LlamaForCausalLM-layout file with {\"format\": \"pt\"} metadata\n", ckpt);
  }

  /* ---- step 2: the reward model from the language model ---- */
  prm_pretrained_options po = PRM_PRETRAINED_OPTIONS_INIT;
  po.config = &cfg; /* vocab, width and depth must agree with the file's shapes */
  po.seed = 1;      /* the fresh score head */
  char text[8192];
  prm_load_report rep = PRM_LOAD_REPORT_INIT;
  rep.text = text;
  rep.text_size = sizeof text;
  prm_model *model = NULL;
  CHECK(prm_model_load_pretrained(&model, ckpt, &po, &rep));
  printf("loaded %u tensors, initialised %u, ignored %u:\n", rep.n_loaded, rep.n_initialised,
         rep.n_ignored);
  for (char *line = strtok(text, "\n"); line != NULL; line = strtok(NULL, "\n"))
    if (strncmp(line, "loaded", 6) != 0) printf("  %s\n", line);
  CHECK(prm_model_get_options(model, &cfg)); /* the resolved configuration */

  /* ---- step 3: train the blocks, the final norm and the head ---- */
  CHECK(prm_model_set_trainable(model, (int32_t)cfg.n_layer));
  printf("training %llu of %llu parameters (embeddings frozen)\n",
         (unsigned long long)(prm_model_num_params(model) - prm_model_trainable_offset(model)),
         (unsigned long long)prm_model_num_params(model));

  /* ---- steps 4 and 5 ---- */
  pairs train, test;
  make_pairs(&train, N_TRAIN);
  make_pairs(&test, N_TEST);
  prm_ctx_options co = PRM_CTX_OPTIONS_INIT;
  co.max_rows = 2 * PAIRS;
  co.max_len = MAX_LEN;
  prm_ctx *ctx = NULL, *eval = NULL;
  CHECK(prm_ctx_new(&ctx, model, &co));
  co.inference = 1;
  co.max_rows = 2 * 250;
  CHECK(prm_ctx_new(&eval, model, &co));
  prm_optimizer_options oo = PRM_OPTIMIZER_OPTIONS_INIT;
  oo.lr = 3e-3;
  oo.weight_decay = 0.01;
  oo.max_grad_norm = 1.0;
  prm_optimizer *opt = NULL;
  CHECK(prm_optimizer_new(&opt, model, &oo));

  static int32_t tok[2 * 250 * MAX_LEN], len[2 * 250];
  printf("epoch  train loss  held-out acc  (Bayes-optimal %.3f)\n",
         (double)test.bayes_right / N_TEST);
  for (int epoch = 1; epoch <= EPOCHS; epoch++) {
    double loss = 0.0;
    int steps = 0;
    for (int i = 0; i + PAIRS <= N_TRAIN; i += PAIRS, steps++) {
      prm_batch b = pair_batch(&train, i, PAIRS, tok, len);
      prm_loss_stats st = PRM_LOSS_STATS_INIT;
      CHECK(prm_train_step(ctx, opt, &b, NULL, &st));
      loss += st.loss;
    }
    double right = 0.0;
    for (int i = 0; i < N_TEST; i += 250) {
      prm_batch b = pair_batch(&test, i, 250, tok, len);
      prm_loss_stats st = PRM_LOSS_STATS_INIT;
      CHECK(prm_evaluate(eval, &b, NULL, &st));
      right += st.accuracy * 250;
    }
    printf("%5d  %10.4f  %12.3f\n", epoch, loss / steps, right / N_TEST);
  }
  CHECK(prm_model_save(model, "llama_rm.safetensors"));
  printf("saved llama_rm.safetensors (loads with prm_model_load, and in PyTorch)\n");

  prm_optimizer_free(opt);
  prm_ctx_free(eval);
  prm_ctx_free(ctx);
  prm_model_free(model);
  free_pairs(&train);
  free_pairs(&test);
  return 0;
}
