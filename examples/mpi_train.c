/*
 * mpi_train.c - data-parallel training of a reward model over MPI ranks.
 *
 *   mpirun -np W mpi_train [--pairs G] [--steps N] [--dataset NP] [--seed S]
 *                          [--hidden H] [--lr LR] [--log-every K]
 *                          [--out FILE] [--rank-out PREFIX]
 *
 * The data: NP (default 8192) labelled pairs of 16-feature responses, made
 * as in quickstart.c (a hidden tanh reward, a Bradley-Terry labeller). Pair
 * i comes from its own generator, seeded by (seed, i), so a rank can make
 * any pair without making the others: each rank makes only its shard.
 *
 * The schedule: step t trains on global batch b = t mod (NP / G), the pairs
 * b G .. b G + G - 1. Rank r of W holds S = G / W of them, pairs
 * b G + r S .. b G + r S + S - 1, and on every step:
 *
 *   1. forward + Bradley-Terry loss (the mean over its S pairs) + backward,
 *      in its own context;
 *   2. MPI_Allreduce(SUM) of the flat gradient prm_ctx_grads, in place, then
 *      a division by W: with equal shards the mean of the W shard means is
 *      the mean over all G pairs, the gradient one process would compute;
 *   3. prm_optimizer_step: every rank holds the same gradient and the same
 *      optimizer state, so every rank applies the same update (gradient
 *      clipping sees the global norm, since it runs after the reduction).
 *
 * With -np 1 the program is the single-process run over the same global
 * batches; tests/mpi/ checks that -np 2 ends with the same parameters.
 * Rank 0 starts every rank from its parameters (MPI_Bcast through
 * prm_model_params), writes the log and saves the model to --out. At the end
 * the ranks compare a hash of their parameters and the program fails if any
 * rank disagrees. --rank-out PREFIX makes rank r also save
 * PREFIX<r>.safetensors (the test compares them byte for byte).
 *
 * BLAS threads: the library never sets them; with one rank per core run
 * with OPENBLAS_NUM_THREADS=1 (docs/distributed.md).
 */
#include <math.h>
#include <mpi.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <prefrm.h>

#define D 16 /* features per response */

static int g_rank = 0;

/* Any failing libprefrm call: say which rank and why, stop every rank. */
#define CHECK(call)                                                                                \
  do {                                                                                             \
    int rc_ = (call);                                                                              \
    if (rc_ != PRM_OK) {                                                                           \
      fprintf(stderr, "rank %d: %s failed: %s (%s)\n", g_rank, #call, prm_status_string(rc_),      \
              prm_last_errmsg());                                                                  \
      MPI_Abort(MPI_COMM_WORLD, 1);                                                                \
    }                                                                                              \
  } while (0)

#define CHECK_MPI(call)                                                                            \
  do {                                                                                             \
    int rc_ = (call);                                                                              \
    if (rc_ != MPI_SUCCESS) {                                                                      \
      char msg_[MPI_MAX_ERROR_STRING];                                                             \
      int len_ = 0;                                                                                \
      MPI_Error_string(rc_, msg_, &len_);                                                          \
      fprintf(stderr, "rank %d: %s failed: %s\n", g_rank, #call, msg_);                            \
      MPI_Abort(MPI_COMM_WORLD, 1);                                                                \
    }                                                                                              \
  } while (0)

/* ---- synthetic data, deterministic in (seed, pair index) ------------------------------------- */

typedef struct rng {
  uint64_t s;
} rng;

/* splitmix64: a good stream from any seed, so (seed, i) seeds need no care. */
static uint64_t rng_next(rng *r) {
  uint64_t z = (r->s += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}
static rng rng_for(uint64_t seed, uint64_t stream) {
  rng r = {seed * 0xD1B54A32D192ED03ull ^ stream};
  rng_next(&r);
  return r;
}
static double uniform(rng *r) { return (double)(rng_next(r) >> 11) * 0x1.0p-53; }
static double normal(rng *r) {
  double u = uniform(r) + 1e-12, v = uniform(r);
  return sqrt(-2.0 * log(u)) * cos(6.283185307179586 * v);
}

/* The hidden reward: a few tanh units, so a linear model cannot fit it. */
static double U[4][D];
static double true_reward(const float *x) {
  double r = 0.0;
  for (int k = 0; k < 4; k++) {
    double s = 0.0;
    for (int j = 0; j < D; j++)
      s += U[k][j] * x[j];
    r += (k % 2 ? -1.5 : 2.0) * tanh(s);
  }
  return r;
}

/* Pair `index` of the dataset: chosen response to `chosen`, rejected to `rejected` (D floats
 * each). The labeller prefers a with probability sigmoid(r*(a) - r*(b)). */
static void make_pair(uint64_t seed, uint64_t index, float *chosen, float *rejected) {
  rng r = rng_for(seed, index);
  float a[D], b[D];
  for (int j = 0; j < D; j++)
    a[j] = (float)normal(&r), b[j] = (float)normal(&r);
  const double delta = true_reward(a) - true_reward(b);
  const int a_wins = uniform(&r) < 1.0 / (1.0 + exp(-delta));
  memcpy(chosen, a_wins ? a : b, sizeof a);
  memcpy(rejected, a_wins ? b : a, sizeof a);
}

/* ---- command line ---------------------------------------------------------------------------- */

typedef struct config {
  long pairs, steps, dataset, hidden, log_every;
  unsigned long long seed;
  double lr;
  const char *out, *rank_out;
} config;

static int parse_long(const char *flag, const char *s, long lo, long hi, long *out) {
  char *end = NULL;
  long v = strtol(s, &end, 10);
  if (end == s || *end != '\0' || v < lo || v > hi) {
    if (g_rank == 0)
      fprintf(stderr, "mpi_train: %s wants an integer in [%ld, %ld], got '%s'\n", flag, lo, hi, s);
    return -1;
  }
  *out = v;
  return 0;
}

/* Every rank parses the same argv, so every rank reaches the same verdict. */
static int parse_args(int argc, char **argv, config *cf) {
  for (int i = 1; i < argc; i += 2) { /* every option takes a value */
    const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
    long seed = 0;
    int rc = 0;
    if (v == NULL)
      rc = -1;
    else if (!strcmp(a, "--pairs"))
      rc = parse_long(a, v, 1, 1L << 24, &cf->pairs);
    else if (!strcmp(a, "--steps"))
      rc = parse_long(a, v, 0, 1L << 30, &cf->steps);
    else if (!strcmp(a, "--dataset"))
      rc = parse_long(a, v, 1, 1L << 28, &cf->dataset);
    else if (!strcmp(a, "--hidden"))
      rc = parse_long(a, v, 1, 1L << 16, &cf->hidden);
    else if (!strcmp(a, "--log-every"))
      rc = parse_long(a, v, 0, 1L << 30, &cf->log_every);
    else if (!strcmp(a, "--seed")) {
      rc = parse_long(a, v, 0, 1L << 62, &seed);
      cf->seed = (unsigned long long)seed;
    } else if (!strcmp(a, "--lr")) {
      char *end = NULL;
      cf->lr = strtod(v, &end);
      if (end == v || *end != '\0' || !(cf->lr >= 0.0 && cf->lr <= 1.0)) rc = -1;
    } else if (!strcmp(a, "--out"))
      cf->out = v;
    else if (!strcmp(a, "--rank-out"))
      cf->rank_out = v;
    else
      rc = -1;
    if (rc != 0) {
      if (g_rank == 0)
        fprintf(stderr,
                "usage: mpirun -np W mpi_train [--pairs G] [--steps N] [--dataset NP] [--seed S]\n"
                "                              [--hidden H] [--lr LR] [--log-every K]\n"
                "                              [--out FILE] [--rank-out PREFIX]\n"
                "(bad or incomplete option '%s')\n",
                a);
      return -1;
    }
  }
  return 0;
}

/* ---- the gradient reduction ------------------------------------------------------------------ */

/* MPI counts are int: arrays above 2^31 - 1 floats go in chunks of 2^30. */
#define MPI_CHUNK ((uint64_t)1 << 30)

/* p <- rank 0's p, on every rank. */
static void broadcast_from_rank0(float *p, uint64_t n) {
  for (uint64_t off = 0; off < n; off += MPI_CHUNK) {
    const int count = (int)(n - off < MPI_CHUNK ? n - off : MPI_CHUNK);
    CHECK_MPI(MPI_Bcast(p + off, count, MPI_FLOAT, 0, MPI_COMM_WORLD));
  }
}

/* g <- (sum over ranks of g) / world, in place. */
static void allreduce_mean(float *g, uint64_t n, int world) {
  for (uint64_t off = 0; off < n; off += MPI_CHUNK) {
    const int count = (int)(n - off < MPI_CHUNK ? n - off : MPI_CHUNK);
    CHECK_MPI(MPI_Allreduce(MPI_IN_PLACE, g + off, count, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD));
  }
  for (uint64_t i = 0; i < n; i++)
    g[i] /= (float)world;
}

/* FNV-1a over the parameter bytes: equal on every rank, or the ranks have drifted apart. */
static uint64_t params_hash(const float *p, uint64_t n) {
  const unsigned char *b = (const unsigned char *)p;
  uint64_t h = 0xCBF29CE484222325ull;
  for (uint64_t i = 0; i < n * sizeof(float); i++)
    h = (h ^ b[i]) * 0x100000001B3ull;
  return h;
}

int main(int argc, char **argv) {
  MPI_Init(&argc, &argv);
  int world = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &g_rank);
  MPI_Comm_size(MPI_COMM_WORLD, &world);

  config cf = {256, 200, 8192, 64, 50, 42, 3e-3, "mpi_rm.safetensors", NULL};
  if (parse_args(argc, argv, &cf) != 0) {
    MPI_Finalize();
    return 2;
  }
  /* Equal shards make the mean of the ranks' means the mean over the global batch. */
  if (cf.pairs % world != 0 || cf.dataset % cf.pairs != 0) {
    if (g_rank == 0)
      fprintf(stderr,
              "mpi_train: --pairs (%ld) must be a multiple of the %d ranks and divide "
              "--dataset (%ld)\n",
              cf.pairs, world, cf.dataset);
    MPI_Finalize();
    return 2;
  }
  const uint64_t G = (uint64_t)cf.pairs, S = G / (uint64_t)world;
  const uint64_t n_batches = (uint64_t)cf.dataset / G;

  /* ---- this rank's shard: S pairs of every global batch, chosen rows then rejected rows ---- */
  rng ur = rng_for(cf.seed, UINT64_MAX); /* the hidden reward's own stream */
  for (int k = 0; k < 4; k++)
    for (int j = 0; j < D; j++)
      U[k][j] = normal(&ur) / sqrt(D);
  float *shard = malloc(sizeof(float) * n_batches * 2 * S * D);
  float *scores = malloc(sizeof(float) * 2 * S);
  float *dscores = malloc(sizeof(float) * 2 * S);
  if (!shard || !scores || !dscores) {
    fprintf(stderr, "rank %d: out of memory\n", g_rank);
    MPI_Abort(MPI_COMM_WORLD, 1);
  }
  for (uint64_t b = 0; b < n_batches; b++) {
    float *rows = shard + b * 2 * S * D;
    for (uint64_t j = 0; j < S; j++)
      make_pair(cf.seed, b * G + (uint64_t)g_rank * S + j, rows + j * D, rows + (S + j) * D);
  }

  /* ---- model, context, optimizer: the same on every rank ---- */
  prm_model_options mo = PRM_MODEL_OPTIONS_INIT;
  mo.arch = PRM_ARCH_MLP;
  mo.input_size = D;
  mo.n_hidden = 2;
  mo.hidden[0] = (uint64_t)cf.hidden;
  mo.hidden[1] = (uint64_t)cf.hidden;
  mo.activation = PRM_ACT_GELU_TANH;
  mo.seed = cf.seed;
  prm_model *model = NULL;
  CHECK(prm_model_new(&model, &mo));
  uint64_t n_params = 0;
  float *params = prm_model_params(model, &n_params);
  /* Every rank starts from rank 0's parameters, however it made or loaded its own. */
  broadcast_from_rank0(params, n_params);

  prm_ctx_options co = PRM_CTX_OPTIONS_INIT;
  co.max_rows = 2 * S;
  prm_ctx *ctx = NULL;
  CHECK(prm_ctx_new(&ctx, model, &co));

  prm_optimizer_options oo = PRM_OPTIMIZER_OPTIONS_INIT;
  oo.algorithm = PRM_OPT_ADAMW;
  oo.lr = cf.lr;
  oo.weight_decay = 0.01;
  oo.no_decay_1d = 1;
  oo.max_grad_norm = 1.0;
  oo.schedule = PRM_SCHED_COSINE;
  oo.total_steps = cf.steps > 0 ? (uint64_t)cf.steps : 1;
  oo.warmup_steps = oo.total_steps / 10;
  prm_optimizer *opt = NULL;
  CHECK(prm_optimizer_new(&opt, model, &oo));

  uint64_t n_grads = 0;
  float *grads = prm_ctx_grads(ctx, &n_grads);
  if (g_rank == 0)
    printf("mpi_train: libprefrm %s, %d rank%s, %llu pairs/step (%llu per rank), %ld steps, "
           "mlp %d-%ld-%ld-1, %llu parameters (allreduce of %.1f KiB per step)\n",
           prm_version_string(), world, world == 1 ? "" : "s", (unsigned long long)G,
           (unsigned long long)S, cf.steps, D, cf.hidden, cf.hidden, (unsigned long long)n_params,
           (double)n_grads * sizeof(float) / 1024.0);

  /* ---- training ---- */
  double t_reduce = 0.0;
  CHECK_MPI(MPI_Barrier(MPI_COMM_WORLD));
  const double t0 = MPI_Wtime();
  for (long t = 0; t < cf.steps; t++) {
    prm_batch batch = PRM_BATCH_INIT;
    batch.features = shard + ((uint64_t)t % n_batches) * 2 * S * D;
    batch.n = 2 * S;
    batch.n_features = D;
    double loss = 0.0;
    prm_loss_stats st = PRM_LOSS_STATS_INIT;
    CHECK(prm_ctx_forward(ctx, &batch, scores, 2 * S));
    CHECK(prm_loss_bt(scores, scores + S, S, NULL, &loss, &st, dscores, dscores + S));
    CHECK(prm_ctx_backward(ctx, dscores, 2 * S));

    const double tr = MPI_Wtime();
    allreduce_mean(grads, n_grads, world);
    t_reduce += MPI_Wtime() - tr;

    CHECK(prm_optimizer_step(opt, ctx));

    if (cf.log_every > 0 && (t % cf.log_every == 0 || t == cf.steps - 1)) {
      /* the global batch's loss and accuracy: means of the equal shards' means */
      double m[2] = {loss, st.accuracy};
      CHECK_MPI(
          MPI_Reduce(g_rank == 0 ? MPI_IN_PLACE : m, m, 2, MPI_DOUBLE, MPI_SUM, 0, MPI_COMM_WORLD));
      if (g_rank == 0)
        printf("step %4ld  loss %.4f  accuracy %.4f  grad norm %.4f\n", t, m[0] / world,
               m[1] / world, prm_optimizer_last_grad_norm(opt));
    }
  }
  const double elapsed = MPI_Wtime() - t0;

  /* ---- every rank must hold the same parameters ---- */
  uint64_t h = params_hash(params, n_params), h_min = 0, h_max = 0;
  CHECK_MPI(MPI_Allreduce(&h, &h_min, 1, MPI_UINT64_T, MPI_MIN, MPI_COMM_WORLD));
  CHECK_MPI(MPI_Allreduce(&h, &h_max, 1, MPI_UINT64_T, MPI_MAX, MPI_COMM_WORLD));
  double reduce_max = 0.0;
  CHECK_MPI(MPI_Reduce(&t_reduce, &reduce_max, 1, MPI_DOUBLE, MPI_MAX, 0, MPI_COMM_WORLD));
  if (g_rank == 0 && cf.steps > 0)
    printf("time: %.3f ms/step, of which allreduce %.3f ms (slowest rank, %.0f%%)\n",
           elapsed * 1e3 / (double)cf.steps, reduce_max * 1e3 / (double)cf.steps,
           elapsed > 0 ? 100.0 * reduce_max / elapsed : 0.0);
  if (h_min != h_max) {
    if (g_rank == 0) fprintf(stderr, "mpi_train: the ranks' parameters differ\n");
    MPI_Abort(MPI_COMM_WORLD, 1);
  }
  if (g_rank == 0)
    printf("parameters identical on all %d ranks (hash %016llx)\n", world, (unsigned long long)h);

  if (cf.rank_out != NULL) {
    char path[4096];
    snprintf(path, sizeof path, "%s%d.safetensors", cf.rank_out, g_rank);
    CHECK(prm_model_save(model, path));
  }
  if (g_rank == 0) {
    CHECK(prm_model_save(model, cf.out));
    printf("saved %s\n", cf.out);
  }

  prm_optimizer_free(opt);
  prm_ctx_free(ctx);
  prm_model_free(model);
  free(shard);
  free(scores);
  free(dscores);
  MPI_Finalize();
  return 0;
}
