/*
 * bench_hh.c - libprefrm's side of the HH-RLHF speed benchmarks (hh_bench.sh,
 * issue 12 "Speed"): the same byte tokens as tests/bench/torch_hh.py, from a
 * file written by tests/bench/hh_prep.py.
 *
 *   bench_hh train --data FILE [--share] [--batch 16] [--warmup 3] [--steps 20]
 *                  [--lr 1e-4] [common options]
 *   bench_hh score --data FILE [--share] [--prompts-per-call 1] [--warmup 2]
 *                  [common options]
 *   common:        [--init MODEL.safetensors | --seed 0] [--check | --no-check]
 *                  [--threads 1] [--json-out FILE]
 *
 * The model is a gpt2 reward model: the checkpoint --init (hh_bench.sh passes
 * the initial model torch_hh.py wrote, so both sides start from the same
 * parameters and their losses and scores can be compared), else gpt2-tiny
 * made here: vocabulary 256 (bytes), 1024 positions, width 128, 4 layers,
 * 4 heads, prm_model_new with --seed.
 *
 * train: step k is one prm_train_step (forward, Bradley-Terry loss, backward,
 *   AdamW lr 1e-4, betas 0.9/0.999, eps 1e-8, no decay, no clipping) on pairs
 *   kP .. kP+P-1 of the file: 2P rows, P chosen then P rejected, each row its
 *   own length (packed: padding is never computed). With --share rejected row
 *   P+j declares prefix_row = j, prefix_len = the longest common prefix of the
 *   two token sequences (the prompt and whatever start the responses share),
 *   so those tokens are computed once. The first W steps are warm-up, the
 *   next S are timed; pairs/s = P / median step time.
 *
 * score: 64 prompts x 8 responses (the file's groups); each call is one
 *   prm_ctx_forward on an inference context of G prompts' rows (G = 8-row
 *   groups per call, default 1: what an RL loop scores per prompt). With
 *   --share every row of a prompt declares prefix_row = the prompt's first
 *   row, prefix_len = its longest common prefix with that row (at least the
 *   prompt). W calls on the first batches warm up; then every batch is scored
 *   once, timed; responses/s = responses / total time of the calls.
 *
 * --check (the default without --share): before anything is timed, the first
 *   batch is run with and without the declaration and the scores must agree
 *   to 1e-4 of their largest magnitude (train: the gradients to 1e-3 of
 *   theirs as well); otherwise the program fails. It is off by default with
 *   --share so that the shared run's peak RSS is that of shared batches only
 *   (an unshared forward touches more activation memory).
 *
 * Tokens computed: prm_ctx_tokens_computed after each call, summed over the
 *   timed calls; checked against what the declaration should give (every
 *   token, less each declared prefix).
 *
 * Output: one human line and a "JSON {...}" line; peak RSS is getrusage's
 * ru_maxrss of this process. Every library call is checked: a failure prints
 * prm_status_string, prm_last_errmsg and the context's message and exits 1.
 *
 * Threads: the library leaves BLAS threading alone; OpenBLAS reads its
 * variables when it is loaded, so --threads N (default 1) sets
 * OPENBLAS_NUM_THREADS, OMP_NUM_THREADS and MKL_NUM_THREADS and re-executes
 * the program when they differ.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include <prefrm.h>

/* ---- errors ------------------------------------------------------------------------------- */

static void die(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  fputs("bench_hh: ", stderr);
  vfprintf(stderr, fmt, ap);
  fputc('\n', stderr);
  va_end(ap);
  exit(1);
}

/* A library call that did not return PRM_OK: say which, why, and stop. */
static void fail_call(const char *what, int rc, const prm_ctx *ctx) {
  const char *ctx_msg = ctx ? prm_ctx_errmsg(ctx) : "";
  fprintf(stderr, "bench_hh: %s failed: %s: %s\n", what, prm_status_string(rc), prm_last_errmsg());
  if (*ctx_msg && strcmp(ctx_msg, prm_last_errmsg()) != 0)
    fprintf(stderr, "bench_hh: context says: %s\n", ctx_msg);
  exit(1);
}

#define CHECK(call, ctx)                                                                           \
  do {                                                                                             \
    int rc_ = (call);                                                                              \
    if (rc_ != PRM_OK) fail_call(#call, rc_, (ctx));                                               \
  } while (0)

static void *xmalloc(size_t n) {
  void *p = malloc(n ? n : 1);
  if (p == NULL) die("out of memory (%zu bytes)", n);
  return p;
}

/* ---- the token file of hh_prep.py ----------------------------------------------------------- */

typedef struct seq {
  int32_t len;
  int32_t *tok;
} seq;

typedef struct hh_data {
  uint32_t ctx, n_pairs, n_groups, group_size;
  uint64_t pairs_read;    /* pairs kept (the first ones of the file) */
  seq *chosen, *rejected; /* pairs_read each */
  uint32_t *pair_prompt;  /* prompt bytes kept, per pair */
  seq *group_seqs;        /* n_groups * group_size when groups were read */
  uint32_t *group_prompt; /* per group */
} hh_data;

static uint32_t read_u32(FILE *f, const char *path) {
  unsigned char b[4];
  if (fread(b, 1, 4, f) != 4) die("%s: truncated", path);
  return (uint32_t)b[0] | (uint32_t)b[1] << 8 | (uint32_t)b[2] << 16 | (uint32_t)b[3] << 24;
}

static seq read_seq(FILE *f, uint32_t len, uint32_t ctx, const char *path) {
  if (len < 1 || len > ctx) die("%s: a sequence of %u tokens (context %u)", path, len, ctx);
  seq s = {(int32_t)len, xmalloc(len * sizeof(int32_t))};
  unsigned char *buf = xmalloc(len);
  if (fread(buf, 1, len, f) != len) die("%s: truncated", path);
  for (uint32_t t = 0; t < len; t++)
    s.tok[t] = buf[t]; /* id = byte */
  free(buf);
  return s;
}

/* Reads the header, the first `want_pairs` pairs and, when want_groups, every group. */
static void read_data(hh_data *d, const char *path, uint64_t want_pairs, int want_groups) {
  FILE *f = fopen(path, "rb");
  if (f == NULL) die("cannot open %s: %s", path, strerror(errno));
  char magic[8];
  if (fread(magic, 1, 8, f) != 8 || memcmp(magic, "PRMHH001", 8) != 0)
    die("%s: not a token file of hh_prep.py", path);
  memset(d, 0, sizeof *d);
  d->ctx = read_u32(f, path);
  d->n_pairs = read_u32(f, path);
  d->n_groups = read_u32(f, path);
  d->group_size = read_u32(f, path);
  (void)read_u32(f, path); /* seed */
  (void)read_u32(f, path); /* reserved */
  if (d->ctx < 1 || d->ctx > (1u << 20)) die("%s: context %u", path, d->ctx);
  if (want_pairs > d->n_pairs)
    die("%s holds %u pairs, %llu wanted (fewer steps or a smaller batch)", path, d->n_pairs,
        (unsigned long long)want_pairs);
  d->pairs_read = want_pairs;
  d->chosen = xmalloc(want_pairs * sizeof(seq));
  d->rejected = xmalloc(want_pairs * sizeof(seq));
  d->pair_prompt = xmalloc(want_pairs * sizeof(uint32_t));
  for (uint64_t k = 0; k < d->n_pairs; k++) {
    if (k >= want_pairs && !want_groups) break;
    uint32_t lc = read_u32(f, path), lr = read_u32(f, path), pl = read_u32(f, path);
    if (k < want_pairs) {
      d->chosen[k] = read_seq(f, lc, d->ctx, path);
      d->rejected[k] = read_seq(f, lr, d->ctx, path);
      d->pair_prompt[k] = pl;
    } else if (fseek(f, (long)lc + (long)lr, SEEK_CUR) != 0) {
      die("%s: seek: %s", path, strerror(errno));
    }
  }
  if (want_groups) {
    uint64_t gs = d->group_size;
    if (d->n_groups == 0 || gs == 0) die("%s holds no scoring groups", path);
    d->group_seqs = xmalloc(d->n_groups * gs * sizeof(seq));
    d->group_prompt = xmalloc(d->n_groups * sizeof(uint32_t));
    uint32_t *lens = xmalloc(gs * sizeof(uint32_t));
    for (uint64_t g = 0; g < d->n_groups; g++) {
      d->group_prompt[g] = read_u32(f, path);
      for (uint64_t i = 0; i < gs; i++)
        lens[i] = read_u32(f, path);
      for (uint64_t i = 0; i < gs; i++)
        d->group_seqs[g * gs + i] = read_seq(f, lens[i], d->ctx, path);
    }
    free(lens);
  }
  fclose(f);
}

static void free_data(hh_data *d) {
  for (uint64_t k = 0; k < d->pairs_read; k++) {
    free(d->chosen[k].tok);
    free(d->rejected[k].tok);
  }
  if (d->group_seqs)
    for (uint64_t i = 0; i < (uint64_t)d->n_groups * d->group_size; i++)
      free(d->group_seqs[i].tok);
  free(d->chosen);
  free(d->rejected);
  free(d->pair_prompt);
  free(d->group_seqs);
  free(d->group_prompt);
}

static int32_t common_prefix(const seq *a, const seq *b) {
  int32_t n = a->len < b->len ? a->len : b->len, i = 0;
  while (i < n && a->tok[i] == b->tok[i])
    i++;
  return i;
}

/* ---- token batches ----------------------------------------------------------------------------
 */

typedef struct tok_batch {
  uint64_t n, stride; /* rows; ids per row (the batch's longest row) */
  int32_t *tokens, *len, *prow, *plen;
  uint64_t sum_len, sum_plen; /* tokens of the batch; of its declared prefixes */
} tok_batch;

/* rows[i] with prefix (prow[i], plen[i]) given by the caller afterwards */
static void batch_alloc(tok_batch *b, const seq *const *rows, uint64_t n) {
  memset(b, 0, sizeof *b);
  b->n = n;
  for (uint64_t i = 0; i < n; i++)
    if ((uint64_t)rows[i]->len > b->stride) b->stride = (uint64_t)rows[i]->len;
  b->tokens = xmalloc(n * b->stride * sizeof(int32_t));
  b->len = xmalloc(n * sizeof(int32_t));
  b->prow = xmalloc(n * sizeof(int32_t));
  b->plen = xmalloc(n * sizeof(int32_t));
  const int32_t **src = xmalloc(n * sizeof *src);
  for (uint64_t i = 0; i < n; i++) {
    src[i] = rows[i]->tok;
    b->len[i] = rows[i]->len;
    b->prow[i] = 0;
    b->plen[i] = 0;
    b->sum_len += (uint64_t)rows[i]->len;
  }
  CHECK(prm_tokens_gather(b->tokens, b->stride, n, src, b->len, 0), NULL);
  free(src);
}

static void batch_free(tok_batch *b) {
  free(b->tokens);
  free(b->len);
  free(b->prow);
  free(b->plen);
}

static prm_batch as_prm_batch(const tok_batch *b, int share) {
  prm_batch pb;
  CHECK(prm_batch_init(&pb, PRM_BATCH_VERSION), NULL);
  pb.n = b->n;
  pb.tokens = b->tokens;
  pb.token_stride = b->stride;
  pb.lengths = b->len;
  if (share) {
    pb.prefix_row = b->prow;
    pb.prefix_len = b->plen;
  }
  return pb;
}

/* tokens a forward of b should compute */
static uint64_t expected_tokens(const tok_batch *b, int share) {
  return share ? b->sum_len - b->sum_plen : b->sum_len;
}

/* ---- helpers -------------------------------------------------------------------------------- */

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

static double median(const double *v, uint64_t n) {
  double *c = xmalloc(n * sizeof(double));
  memcpy(c, v, n * sizeof(double));
  qsort(c, n, sizeof(double), cmp_double);
  double m = n % 2 ? c[n / 2] : 0.5 * (c[n / 2 - 1] + c[n / 2]);
  free(c);
  return m;
}

static long peak_rss_kb(void) {
  struct rusage ru;
  if (getrusage(RUSAGE_SELF, &ru) != 0) return -1;
  return ru.ru_maxrss; /* kB on Linux */
}

/* max |a - b| / max(max |b|, 1e-30) */
static double rel_diff(const float *a, const float *b, uint64_t n, double *scale_out) {
  double scale = 1e-30, d = 0.0;
  for (uint64_t i = 0; i < n; i++) {
    scale = fmax(scale, fabs((double)b[i]));
    d = fmax(d, fabs((double)a[i] - (double)b[i]));
  }
  if (scale_out) *scale_out = scale;
  return d / scale;
}

static const char *env_or(const char *name, const char *dflt) {
  const char *v = getenv(name);
  return v ? v : dflt;
}

static void json_floats(FILE *f, const float *v, uint64_t n) {
  fputc('[', f);
  for (uint64_t i = 0; i < n; i++)
    fprintf(f, "%s%.9g", i ? ", " : "", (double)v[i]);
  fputc(']', f);
}

static void json_doubles(FILE *f, const double *v, uint64_t n, const char *fmt) {
  fputc('[', f);
  for (uint64_t i = 0; i < n; i++) {
    if (i) fputs(", ", f);
    fprintf(f, fmt, v[i]);
  }
  fputc(']', f);
}

/* ---- options --------------------------------------------------------------------------------- */

typedef struct opts {
  int train; /* 1: train, 0: score */
  const char *data, *init, *json_out;
  int share, check; /* check: -1 = default (on without --share) */
  long batch, warmup, steps, per_call, threads;
  long seed;
  double lr;
} opts;

static void usage(void) {
  fprintf(stderr,
          "usage: bench_hh train --data FILE [--share] [--batch P] [--warmup W] [--steps S]\n"
          "                      [--lr LR] [common]\n"
          "       bench_hh score --data FILE [--share] [--prompts-per-call G] [--warmup W]\n"
          "                      [common]\n"
          "       common: [--init MODEL.safetensors | --seed N] [--check | --no-check]\n"
          "               [--threads N] [--json-out FILE]\n");
  exit(2);
}

static long parse_int(const char *flag, const char *s, long lo, long hi) {
  char *end = NULL;
  errno = 0;
  long v = strtol(s, &end, 10);
  if (errno || end == s || *end || v < lo || v > hi) {
    fprintf(stderr, "bench_hh: %s takes an integer in [%ld, %ld], not '%s'\n", flag, lo, hi, s);
    exit(2);
  }
  return v;
}

static double parse_num(const char *flag, const char *s, double lo, double hi) {
  char *end = NULL;
  errno = 0;
  double v = strtod(s, &end);
  if (errno || end == s || *end || !(v >= lo && v <= hi)) {
    fprintf(stderr, "bench_hh: %s takes a number in [%g, %g], not '%s'\n", flag, lo, hi, s);
    exit(2);
  }
  return v;
}

static void parse_opts(opts *o, int argc, char **argv) {
  memset(o, 0, sizeof *o);
  o->check = -1;
  o->batch = 16;
  o->warmup = -1;
  o->steps = 20;
  o->per_call = 1;
  o->threads = 1;
  o->lr = 1e-4;
  if (argc < 2) usage();
  if (!strcmp(argv[1], "train"))
    o->train = 1;
  else if (strcmp(argv[1], "score") != 0)
    usage();
  for (int i = 2; i < argc; i++) {
    const char *a = argv[i];
    const char *v = i + 1 < argc ? argv[i + 1] : NULL;
#define VALUE()                                                                                    \
  do {                                                                                             \
    if (v == NULL) usage();                                                                        \
    i++;                                                                                           \
  } while (0)
    if (!strcmp(a, "--data")) {
      VALUE();
      o->data = v;
    } else if (!strcmp(a, "--init")) {
      VALUE();
      o->init = v;
    } else if (!strcmp(a, "--json-out")) {
      VALUE();
      o->json_out = v;
    } else if (!strcmp(a, "--share")) {
      o->share = 1;
    } else if (!strcmp(a, "--check")) {
      o->check = 1;
    } else if (!strcmp(a, "--no-check")) {
      o->check = 0;
    } else if (!strcmp(a, "--batch")) {
      VALUE();
      o->batch = parse_int(a, v, 1, 1 << 16);
    } else if (!strcmp(a, "--warmup")) {
      VALUE();
      o->warmup = parse_int(a, v, 0, 1 << 20);
    } else if (!strcmp(a, "--steps")) {
      VALUE();
      o->steps = parse_int(a, v, 1, 1 << 20);
    } else if (!strcmp(a, "--prompts-per-call")) {
      VALUE();
      o->per_call = parse_int(a, v, 1, 1 << 16);
    } else if (!strcmp(a, "--threads")) {
      VALUE();
      o->threads = parse_int(a, v, 1, 1024);
    } else if (!strcmp(a, "--seed")) {
      VALUE();
      o->seed = parse_int(a, v, 0, 1L << 30);
    } else if (!strcmp(a, "--lr")) {
      VALUE();
      o->lr = parse_num(a, v, 0.0, 10.0);
    } else {
      fprintf(stderr, "bench_hh: unknown option '%s'\n", a);
      usage();
    }
#undef VALUE
  }
  if (o->data == NULL) usage();
  if (o->check < 0) o->check = !o->share;
  if (o->warmup < 0) o->warmup = o->train ? 3 : 2;
}

/* ---- model ---------------------------------------------------------------------------------- */

static prm_model *make_model(const opts *o, uint32_t ctx) {
  prm_model *m = NULL;
  if (o->init) {
    CHECK(prm_model_load(&m, o->init), NULL);
  } else {
    prm_model_options mo;
    CHECK(prm_model_options_init(&mo, PRM_MODEL_OPTIONS_VERSION), NULL);
    mo.arch = PRM_ARCH_GPT2;
    mo.seed = (uint64_t)o->seed;
    mo.vocab_size = 256;
    mo.n_ctx = 1024;
    mo.n_embd = 128;
    mo.n_layer = 4;
    mo.n_head = 4;
    CHECK(prm_model_new(&m, &mo), NULL);
  }
  if (prm_model_arch(m) != PRM_ARCH_GPT2 && prm_model_arch(m) != PRM_ARCH_LLAMA)
    die("the model is not a token model");
  if (prm_model_vocab_size(m) < 256) die("the model's vocabulary is below 256 (bytes)");
  if (prm_model_max_len(m) < ctx)
    die("the model takes %llu tokens, the data up to %u", (unsigned long long)prm_model_max_len(m),
        ctx);
  return m;
}

static void model_json(FILE *f, const prm_model *m) {
  prm_model_options mo;
  CHECK(prm_model_options_init(&mo, PRM_MODEL_OPTIONS_VERSION), NULL);
  CHECK(prm_model_get_options(m, &mo), NULL);
  fprintf(f,
          "\"config\": {\"model\": \"%s\", \"vocab_size\": %llu, \"n_positions\": %llu, "
          "\"n_embd\": %llu, \"n_layer\": %llu, \"n_head\": %llu}, \"params\": %llu",
          mo.arch == PRM_ARCH_GPT2 ? "gpt2" : "llama", (unsigned long long)mo.vocab_size,
          (unsigned long long)mo.n_ctx, (unsigned long long)mo.n_embd,
          (unsigned long long)mo.n_layer, (unsigned long long)mo.n_head,
          (unsigned long long)prm_model_num_params(m));
}

/* ---- the correctness guard ------------------------------------------------------------------ */

/* Forward b (and, on a training context, back-propagate the Bradley-Terry
 * loss of its pairs into grads); returns the tokens computed. */
static uint64_t guard_pass(prm_ctx *ctx, const tok_batch *b, int share, float *scores, float *grads,
                           uint64_t n_grads) {
  prm_batch pb = as_prm_batch(b, share);
  CHECK(prm_ctx_forward(ctx, &pb, scores, b->n), ctx);
  uint64_t tok = prm_ctx_tokens_computed(ctx);
  if (grads) {
    uint64_t P = b->n / 2;
    float *d = xmalloc(b->n * sizeof(float));
    CHECK(prm_loss_bt(scores, scores + P, P, NULL, NULL, NULL, d, d + P), ctx);
    CHECK(prm_ctx_zero_grad(ctx), ctx);
    CHECK(prm_ctx_backward(ctx, d, b->n), ctx);
    CHECK(prm_ctx_read_grads(ctx, 0, grads, n_grads), ctx);
    CHECK(prm_ctx_zero_grad(ctx), ctx);
    free(d);
  }
  return tok;
}

typedef struct guard_result {
  int ran;
  double score_rel, grad_rel, score_scale;
  uint64_t tok_unshared, tok_shared;
} guard_result;

static void guard(prm_ctx *ctx, const tok_batch *b, int training, guard_result *r) {
  uint64_t ng = training ? prm_ctx_num_grads(ctx) : 0;
  float *su = xmalloc(b->n * sizeof(float)), *ss = xmalloc(b->n * sizeof(float));
  float *gu = training ? xmalloc(ng * sizeof(float)) : NULL;
  float *gs = training ? xmalloc(ng * sizeof(float)) : NULL;
  r->ran = 1;
  r->tok_unshared = guard_pass(ctx, b, 0, su, gu, ng);
  r->tok_shared = guard_pass(ctx, b, 1, ss, gs, ng);
  r->score_rel = rel_diff(ss, su, b->n, &r->score_scale);
  r->grad_rel = training ? rel_diff(gs, gu, ng, NULL) : 0.0;
  int bad = 0;
  if (!(r->score_rel <= 1e-4)) {
    fprintf(stderr,
            "bench_hh: check FAILED: shared and unshared scores of the first batch differ by %.3g "
            "of their largest magnitude %.3g (limit 1e-4)\n",
            r->score_rel, r->score_scale);
    for (uint64_t i = 0; i < b->n; i++)
      fprintf(stderr, "  row %llu: len %d prefix %d of row %d: shared %.9g unshared %.9g\n",
              (unsigned long long)i, b->len[i], b->plen[i], b->prow[i], (double)ss[i],
              (double)su[i]);
    bad = 1;
  }
  if (training && !(r->grad_rel <= 1e-3)) {
    fprintf(stderr,
            "bench_hh: check FAILED: shared and unshared gradients of the first batch differ by "
            "%.3g of their largest magnitude (limit 1e-3)\n",
            r->grad_rel);
    bad = 1;
  }
  if (r->tok_unshared != expected_tokens(b, 0) || r->tok_shared != expected_tokens(b, 1)) {
    fprintf(stderr,
            "bench_hh: check FAILED: tokens computed %llu unshared / %llu shared, expected %llu / "
            "%llu\n",
            (unsigned long long)r->tok_unshared, (unsigned long long)r->tok_shared,
            (unsigned long long)expected_tokens(b, 0), (unsigned long long)expected_tokens(b, 1));
    bad = 1;
  }
  free(su);
  free(ss);
  free(gu);
  free(gs);
  if (bad) exit(1);
  char grads[64] = " (inference: no gradients)";
  if (training) snprintf(grads, sizeof grads, ", gradients to %.2e", r->grad_rel);
  printf("check: first batch (%llu rows, %llu tokens, %llu in declared prefixes): shared and "
         "unshared scores agree to %.2e%s; tokens computed %llu unshared, %llu shared, as "
         "declared\n",
         (unsigned long long)b->n, (unsigned long long)b->sum_len, (unsigned long long)b->sum_plen,
         r->score_rel, grads, (unsigned long long)r->tok_unshared,
         (unsigned long long)r->tok_shared);
}

static void guard_json(FILE *f, const guard_result *g) {
  if (!g->ran) {
    fputs("\"check\": null", f);
    return;
  }
  fprintf(
      f,
      "\"check\": {\"score_rel_diff\": %.3g, \"grad_rel_diff\": %.3g, \"tokens_unshared\": %llu, "
      "\"tokens_shared\": %llu}",
      g->score_rel, g->grad_rel, (unsigned long long)g->tok_unshared,
      (unsigned long long)g->tok_shared);
}

/* The JSON line is written to memory, then printed after "JSON " and, with
 * --json-out, appended to that file. */
typedef struct json_line {
  char *buf;
  size_t size;
  FILE *f;
} json_line;

static FILE *json_begin(json_line *j) {
  j->buf = NULL;
  j->size = 0;
  j->f = open_memstream(&j->buf, &j->size);
  if (j->f == NULL) die("open_memstream: %s", strerror(errno));
  return j->f;
}

static void json_end(json_line *j, const char *path) {
  if (fclose(j->f) != 0) die("cannot write the JSON line");
  printf("JSON %s\n", j->buf);
  if (path) {
    FILE *f = fopen(path, "a");
    if (f == NULL || fprintf(f, "%s\n", j->buf) < 0 || fclose(f) != 0)
      die("cannot append to %s: %s", path, strerror(errno));
  }
  free(j->buf);
}

/* ---- train ---------------------------------------------------------------------------------- */

static void run_train(const opts *o) {
  const uint64_t P = (uint64_t)o->batch, W = (uint64_t)o->warmup, S = (uint64_t)o->steps;
  const uint64_t nb = W + S;
  hh_data d;
  read_data(&d, o->data, nb * P, 0);
  prm_model *m = make_model(o, d.ctx);

  /* every batch up front: the timed loop does nothing but prm_train_step */
  tok_batch *bs = xmalloc(nb * sizeof(tok_batch));
  const seq **rows = xmalloc(2 * P * sizeof *rows);
  for (uint64_t k = 0; k < nb; k++) {
    for (uint64_t j = 0; j < P; j++) {
      rows[j] = &d.chosen[k * P + j];
      rows[P + j] = &d.rejected[k * P + j];
    }
    batch_alloc(&bs[k], rows, 2 * P);
    for (uint64_t j = 0; j < P; j++) { /* rejected row P+j shares its start with chosen row j */
      int32_t l = common_prefix(rows[j], rows[P + j]);
      bs[k].prow[P + j] = (int32_t)j;
      bs[k].plen[P + j] = l;
      bs[k].sum_plen += (uint64_t)l;
    }
  }
  free(rows);

  prm_ctx_options co;
  CHECK(prm_ctx_options_init(&co, PRM_CTX_OPTIONS_VERSION), NULL);
  co.max_rows = 2 * P;
  co.max_len = d.ctx;
  prm_ctx *ctx = NULL;
  CHECK(prm_ctx_new(&ctx, m, &co), NULL);
  prm_optimizer_options oo; /* torch_ref's AdamW: betas 0.9/0.999, eps 1e-8, no decay, no clip */
  CHECK(prm_optimizer_options_init(&oo, PRM_OPTIMIZER_OPTIONS_VERSION), NULL);
  oo.algorithm = PRM_OPT_ADAMW;
  oo.lr = o->lr;
  oo.beta1 = 0.9;
  oo.beta2 = 0.999;
  oo.eps = 1e-8;
  oo.weight_decay = 0.0;
  oo.max_grad_norm = 0.0;
  prm_optimizer *opt = NULL;
  CHECK(prm_optimizer_new(&opt, m, &oo), NULL);

  guard_result gr = {0};
  if (o->check) guard(ctx, &bs[0], 1, &gr);

  double *t = xmalloc(nb * sizeof(double)), *loss = xmalloc(nb * sizeof(double));
  uint64_t tok = 0, tok_want = 0, packed = 0, shared = 0, padded = 0, mismatches = 0;
  const long rss_setup = peak_rss_kb();
  for (uint64_t k = 0; k < nb; k++) {
    prm_batch pb = as_prm_batch(&bs[k], o->share);
    prm_loss_stats st;
    CHECK(prm_loss_stats_init(&st, PRM_LOSS_STATS_VERSION), NULL);
    const double t0 = now_s();
    const int rc = prm_train_step(ctx, opt, &pb, NULL, &st);
    const double t1 = now_s();
    if (rc != PRM_OK) fail_call("prm_train_step", rc, ctx);
    t[k] = t1 - t0;
    loss[k] = st.loss;
    const uint64_t got = prm_ctx_tokens_computed(ctx), want = expected_tokens(&bs[k], o->share);
    if (got != want) mismatches++;
    if (k >= W) {
      tok += got;
      tok_want += want;
      packed += bs[k].sum_len;
      shared += bs[k].sum_len - bs[k].sum_plen;
      padded += bs[k].n * bs[k].stride;
    }
  }
  if (mismatches)
    fprintf(stderr, "bench_hh: WARNING: %llu steps computed other token counts than declared\n",
            (unsigned long long)mismatches);
  const double med = median(t + W, S);
  double sum = 0.0, mn = t[W];
  for (uint64_t k = W; k < nb; k++) {
    sum += t[k];
    mn = fmin(mn, t[k]);
  }
  const long rss = peak_rss_kb();
  const char *variant = o->share ? "shared" : "unshared";
  const char *threads = env_or("OPENBLAS_NUM_THREADS", "unset");
  const double tpp = (double)tok / (double)(S * P);
  printf("libprefrm train %s: %llu pairs/step, %llu timed steps (+%llu warm-up), threads %s: "
         "%.1f ms/step (median), %.3f pairs/s, %.1f tokens computed per pair, loss %.4f -> %.4f, "
         "peak RSS %.1f MiB\n",
         variant, (unsigned long long)P, (unsigned long long)S, (unsigned long long)W, threads,
         med * 1e3, (double)P / med, tpp, loss[0], loss[nb - 1], (double)rss / 1024.0);
  json_line j;
  FILE *f = json_begin(&j);
  fprintf(f, "{\"impl\": \"libprefrm\", \"mode\": \"train\", \"variant\": \"%s\", ", variant);
  model_json(f, m);
  fprintf(f,
          ", \"ctx\": %u, \"pairs_per_step\": %llu, \"steps\": %llu, \"warmup\": %llu, "
          "\"lr\": %g, \"threads\": \"%s\", \"ms_step_median\": %.4f, \"ms_step_min\": %.4f, "
          "\"ms_step_mean\": %.4f, \"pairs_per_s\": %.6g, \"tokens_computed\": %llu, "
          "\"tokens_declared\": %llu, \"tokens_per_pair\": %.3f, \"packed_tokens\": %llu, "
          "\"shared_tokens\": %llu, \"padded_tokens\": %llu, \"peak_rss_kb\": %ld, "
          "\"rss_after_setup_kb\": %ld, \"losses\": ",
          d.ctx, (unsigned long long)P, (unsigned long long)S, (unsigned long long)W, o->lr,
          threads, med * 1e3, mn * 1e3, sum / (double)S * 1e3, (double)P / med,
          (unsigned long long)tok, (unsigned long long)tok_want, tpp, (unsigned long long)packed,
          (unsigned long long)shared, (unsigned long long)padded, rss, rss_setup);
  json_doubles(f, loss, nb, "%.7g");
  fputs(", \"ms_steps\": ", f);
  for (uint64_t k = 0; k < nb; k++)
    t[k] *= 1e3;
  json_doubles(f, t, nb, "%.2f");
  fputs(", ", f);
  guard_json(f, &gr);
  fprintf(f, ", \"version\": \"%s\"}", prm_version_string());
  json_end(&j, o->json_out);

  free(t);
  free(loss);
  for (uint64_t k = 0; k < nb; k++)
    batch_free(&bs[k]);
  free(bs);
  prm_optimizer_free(opt);
  prm_ctx_free(ctx);
  prm_model_free(m);
  free_data(&d);
}

/* ---- score ---------------------------------------------------------------------------------- */

static void run_score(const opts *o) {
  hh_data d;
  read_data(&d, o->data, 0, 1);
  prm_model *m = make_model(o, d.ctx);
  const uint64_t K = d.group_size, G = (uint64_t)o->per_call;
  if (d.n_groups % G != 0)
    die("--prompts-per-call %llu does not divide the %u prompts", (unsigned long long)G,
        d.n_groups);
  const uint64_t nb = d.n_groups / G, W = (uint64_t)o->warmup, rows_per_call = G * K;

  tok_batch *bs = xmalloc(nb * sizeof(tok_batch));
  const seq **rows = xmalloc(rows_per_call * sizeof *rows);
  for (uint64_t k = 0; k < nb; k++) {
    for (uint64_t i = 0; i < rows_per_call; i++)
      rows[i] = &d.group_seqs[k * rows_per_call + i];
    batch_alloc(&bs[k], rows, rows_per_call);
    for (uint64_t i = 0; i < rows_per_call; i++) { /* each row shares with its prompt's first row */
      const uint64_t first = i - i % K;
      if (i == first) continue;
      int32_t l = common_prefix(rows[first], rows[i]);
      bs[k].prow[i] = (int32_t)first;
      bs[k].plen[i] = l;
      bs[k].sum_plen += (uint64_t)l;
    }
  }
  free(rows);

  prm_ctx_options co;
  CHECK(prm_ctx_options_init(&co, PRM_CTX_OPTIONS_VERSION), NULL);
  co.inference = 1;
  co.max_rows = rows_per_call;
  co.max_len = d.ctx;
  prm_ctx *ctx = NULL;
  CHECK(prm_ctx_new(&ctx, m, &co), NULL);

  guard_result gr = {0};
  if (o->check) guard(ctx, &bs[0], 0, &gr);

  float *scores = xmalloc(nb * rows_per_call * sizeof(float));
  for (uint64_t k = 0; k < W; k++) { /* warm-up: the first batches, scores dropped */
    prm_batch pb = as_prm_batch(&bs[k % nb], o->share);
    CHECK(prm_ctx_forward(ctx, &pb, scores, rows_per_call), ctx);
  }
  double *t = xmalloc(nb * sizeof(double));
  uint64_t tok = 0, tok_want = 0, packed = 0, shared = 0, padded = 0;
  const long rss_setup = peak_rss_kb();
  for (uint64_t k = 0; k < nb; k++) {
    prm_batch pb = as_prm_batch(&bs[k], o->share);
    float *out = scores + k * rows_per_call;
    const double t0 = now_s();
    const int rc = prm_ctx_forward(ctx, &pb, out, rows_per_call);
    const double t1 = now_s();
    if (rc != PRM_OK) fail_call("prm_ctx_forward", rc, ctx);
    t[k] = t1 - t0;
    tok += prm_ctx_tokens_computed(ctx);
    tok_want += expected_tokens(&bs[k], o->share);
    packed += bs[k].sum_len;
    shared += bs[k].sum_len - bs[k].sum_plen;
    padded += bs[k].n * bs[k].stride;
  }
  if (tok != tok_want)
    fprintf(stderr, "bench_hh: WARNING: %llu tokens computed, %llu declared\n",
            (unsigned long long)tok, (unsigned long long)tok_want);
  double total = 0.0;
  for (uint64_t k = 0; k < nb; k++)
    total += t[k];
  const double med = median(t, nb);
  const uint64_t n_resp = nb * rows_per_call;
  const long rss = peak_rss_kb();
  const char *variant = o->share ? "shared" : "unshared";
  const char *threads = env_or("OPENBLAS_NUM_THREADS", "unset");
  printf("libprefrm score %s: %llu prompts x %llu responses, %llu rows per call, threads %s: "
         "%.1f ms/call (median), %.2f responses/s, %.1f tokens computed per response, peak RSS "
         "%.1f MiB\n",
         variant, (unsigned long long)d.n_groups, (unsigned long long)K,
         (unsigned long long)rows_per_call, threads, med * 1e3, (double)n_resp / total,
         (double)tok / (double)n_resp, (double)rss / 1024.0);
  json_line j;
  FILE *f = json_begin(&j);
  fprintf(f, "{\"impl\": \"libprefrm\", \"mode\": \"score\", \"variant\": \"%s\", ", variant);
  model_json(f, m);
  fprintf(f,
          ", \"ctx\": %u, \"prompts\": %u, \"group_size\": %llu, \"rows_per_call\": %llu, "
          "\"calls\": %llu, \"warmup\": %llu, \"threads\": \"%s\", \"ms_call_median\": %.4f, "
          "\"s_total\": %.6g, \"responses_per_s\": %.6g, \"tokens_computed\": %llu, "
          "\"tokens_declared\": %llu, \"tokens_per_response\": %.3f, \"packed_tokens\": %llu, "
          "\"shared_tokens\": %llu, \"padded_tokens\": %llu, \"peak_rss_kb\": %ld, "
          "\"rss_after_setup_kb\": %ld, \"scores_first\": ",
          d.ctx, d.n_groups, (unsigned long long)K, (unsigned long long)rows_per_call,
          (unsigned long long)nb, (unsigned long long)W, threads, med * 1e3, total,
          (double)n_resp / total, (unsigned long long)tok, (unsigned long long)tok_want,
          (double)tok / (double)n_resp, (unsigned long long)packed, (unsigned long long)shared,
          (unsigned long long)padded, rss, rss_setup);
  json_floats(f, scores, rows_per_call);
  fputs(", ", f);
  guard_json(f, &gr);
  fprintf(f, ", \"version\": \"%s\"}", prm_version_string());
  json_end(&j, o->json_out);

  free(t);
  free(scores);
  for (uint64_t k = 0; k < nb; k++)
    batch_free(&bs[k]);
  free(bs);
  prm_ctx_free(ctx);
  prm_model_free(m);
  free_data(&d);
}

/* ---- main ----------------------------------------------------------------------------------- */

int main(int argc, char **argv) {
  opts o;
  parse_opts(&o, argc, argv);
  char want[32];
  snprintf(want, sizeof want, "%ld", o.threads);
  const char *vars[3] = {"OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"};
  int differ = 0;
  for (int i = 0; i < 3; i++) {
    const char *cur = getenv(vars[i]);
    if (cur == NULL || strcmp(cur, want) != 0) differ = 1;
  }
  if (differ) { /* BLAS reads them when it is loaded, before main: start again with them set */
    for (int i = 0; i < 3; i++)
      setenv(vars[i], want, 1);
    execv("/proc/self/exe", argv);
    die("cannot re-execute to set the thread count: %s", strerror(errno));
  }
  if (o.train)
    run_train(&o);
  else
    run_score(&o);
  return 0;
}
