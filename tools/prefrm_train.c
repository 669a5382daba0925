/*
 * prefrm_train.c - prefrm-train: train a reward model from JSONL files of
 * preference pairs ({"prompt", "chosen", "rejected"[, "margin"][, "label"]}
 * per line) with libprefrm's public API.
 *
 * The run, in order:
 *   1. options (one table drives parsing, --help and the run's saved
 *      configuration); with --resume the configuration of DIR/state.json;
 *   2. the JSONL files, line by line (bad lines reported as FILE:LINE:
 *      reason, skipped or fatal), the held-out set (--eval files, or a
 *      seeded --split of the pooled training pairs);
 *   3. the model (named size, explicit dimensions, --init checkpoint or
 *      pretrained language model), the tokenizer, the sequences
 *      (pft_build_pair) or, for linear/mlp, the texts of the responses;
 *   4. epochs of steps: each step's P pairs are cut into N contiguous shares,
 *      one training context per thread runs forward + prm_loss_bt (dscores
 *      scaled by share / P) + backward, the host sums the gradients into
 *      context 0 in thread order and steps the optimizer once -- so results
 *      depend on N but never on thread timing;
 *   5. after each epoch: held-out scores from inference contexts,
 *      prm_loss_bt over the whole held-out set (exact ECE, reward std),
 *      metrics.csv, best.safetensors, last.safetensors + optimizer + state.
 *
 * Resuming is bit-exact: state.json keeps the epoch, the step within it, the
 * data-order RNG at the epoch's start, the running statistics and the best
 * held-out loss; the model and the optimizer are libprefrm's own files, and
 * the data are re-read and checked against a hash.
 */
#define _XOPEN_SOURCE 700
#define _DEFAULT_SOURCE

#include <errno.h>
#include <fcntl.h>
#include <float.h>
#include <inttypes.h>
#include <limits.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <jansson.h>
#include <prefrm.h>

#include "data.h"
#include "tokenizer.h"

#define PROG "prefrm-train"

/* Exit codes (documented in --help). */
enum {
  EXIT_OK = 0,      /* finished, or stopped cleanly by --time-budget / --stop-after */
  EXIT_ERR = 1,     /* a library, file or memory error */
  EXIT_USAGE = 2,   /* bad command line */
  EXIT_DATA = 3,    /* bad input data: a bad line with --on-bad-line fail, no pairs */
  EXIT_SIGINT = 130 /* interrupted (SIGINT; SIGTERM gives 143) after saving */
};

#define MAX_BAD_REPORTS 100 /* bad lines printed; the rest are only counted */
#define STATE_FORMAT "prefrm-train-state"
#define STATE_VERSION 1

/* ---- small helpers --------------------------------------------------------------------------- */

static void errf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void errf(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  fputs(PROG ": ", stderr);
  vfprintf(stderr, fmt, ap);
  fputc('\n', stderr);
  va_end(ap);
}

/* A failed libprefrm call: what we were doing, the status name and the
 * handle's message (or the thread's when the handle has none). */
static int prm_fail(int rc, const char *what, const char *detail) {
  if (detail == NULL || detail[0] == '\0') detail = prm_last_errmsg();
  errf("%s: %s: %s", what, prm_status_string(rc), detail);
  return EXIT_ERR;
}

static void *xcalloc(size_t n, size_t size) {
  void *p = calloc(n ? n : 1, size ? size : 1);
  if (p == NULL) {
    errf("out of memory (%zu x %zu bytes)", n, size);
    exit(EXIT_ERR);
  }
  return p;
}

static char *xstrdup(const char *s) {
  char *d = strdup(s);
  if (d == NULL) {
    errf("out of memory");
    exit(EXIT_ERR);
  }
  return d;
}

static char *xmemdup(const char *s, size_t n) {
  char *d = xcalloc(n + 1, 1);
  memcpy(d, s, n);
  return d;
}

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* splitmix64: the data-order and split generator. Its whole state is one
 * uint64_t, which state.json stores. */
static uint64_t rng_next(uint64_t *s) {
  uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

/* Uniform in [0, n) without modulo bias (rejection). */
static uint64_t rng_below(uint64_t *s, uint64_t n) {
  const uint64_t limit = UINT64_MAX - UINT64_MAX % n;
  uint64_t x;
  do {
    x = rng_next(s);
  } while (x >= limit);
  return x % n;
}

/* Fisher-Yates over the identity permutation. */
static void shuffle_identity(size_t *v, size_t n, uint64_t *rng) {
  for (size_t i = 0; i < n; i++)
    v[i] = i;
  for (size_t i = n; i > 1; i--) {
    const size_t j = (size_t)rng_below(rng, i);
    const size_t t = v[i - 1];
    v[i - 1] = v[j];
    v[j] = t;
  }
}

/* FNV-1a, 64 bits: data and parameter fingerprints for --resume. */
#define FNV_INIT 0xcbf29ce484222325ull
static uint64_t fnv(uint64_t h, const void *p, size_t n) {
  const unsigned char *b = p;
  for (size_t i = 0; i < n; i++) {
    h ^= b[i];
    h *= 0x100000001b3ull;
  }
  return h;
}

/* The same idea a word at a time, for parameter arrays of any size. */
static uint64_t hash_floats(const float *x, uint64_t n) {
  uint64_t h = FNV_INIT;
  uint32_t w;
  for (uint64_t i = 0; i < n; i++) {
    memcpy(&w, &x[i], 4);
    h = (h ^ w) * 0x100000001b3ull;
  }
  return h;
}

static void path_join(char *out, size_t size, const char *dir, const char *name) {
  if ((size_t)snprintf(out, size, "%s/%s", dir, name) >= size) {
    errf("path too long: %s/%s", dir, name);
    exit(EXIT_USAGE);
  }
}

/* mkdir -p */
static int make_dirs(const char *path) {
  char buf[PATH_MAX];
  if (strlen(path) >= sizeof buf) {
    errf("path too long: %s", path);
    return -1;
  }
  strcpy(buf, path);
  for (char *p = buf + 1;; p++) {
    if (*p == '/' || *p == '\0') {
      const char c = *p;
      *p = '\0';
      if (mkdir(buf, 0777) != 0 && errno != EEXIST) {
        errf("cannot create directory '%s': %s", buf, strerror(errno));
        return -1;
      }
      *p = c;
      if (c == '\0') break;
    }
  }
  struct stat st;
  if (stat(path, &st) != 0 || !S_ISDIR(st.st_mode)) {
    errf("'%s' is not a directory", path);
    return -1;
  }
  return 0;
}

/* Write `len` bytes to path atomically: "<path>.tmp", fsync, rename, fsync
 * of the directory -- the same contract as prm_model_save. */
static int write_file_atomic(const char *path, const char *data, size_t len) {
  char tmp[PATH_MAX + 8];
  snprintf(tmp, sizeof tmp, "%s.tmp", path);
  const int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW, 0666);
  if (fd < 0) {
    errf("cannot create '%s': %s", tmp, strerror(errno));
    return -1;
  }
  size_t done = 0;
  while (done < len) {
    const ssize_t w = write(fd, data + done, len - done);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) {
      errf("cannot write '%s': %s", tmp, strerror(errno));
      close(fd);
      unlink(tmp);
      return -1;
    }
    done += (size_t)w;
  }
  if (fsync(fd) != 0 || close(fd) != 0) {
    errf("cannot sync '%s': %s", tmp, strerror(errno));
    unlink(tmp);
    return -1;
  }
  if (rename(tmp, path) != 0) {
    errf("cannot rename '%s' to '%s': %s", tmp, path, strerror(errno));
    unlink(tmp);
    return -1;
  }
  char dir[PATH_MAX];
  snprintf(dir, sizeof dir, "%s", path);
  char *slash = strrchr(dir, '/');
  if (slash != NULL) {
    *slash = '\0';
    if (dir[0] == '\0') strcpy(dir, "/");
  } else {
    strcpy(dir, ".");
  }
  const int dfd = open(dir, O_RDONLY);
  if (dfd >= 0) {
    (void)fsync(dfd); /* best effort: the file itself is durable already */
    close(dfd);
  }
  return 0;
}

static int write_json_atomic(const char *path, const json_t *j) {
  char *text = json_dumps(j, JSON_INDENT(2) | JSON_REAL_PRECISION(17));
  if (text == NULL) {
    errf("cannot encode %s", path);
    return -1;
  }
  const size_t n = strlen(text);
  char *withnl = xcalloc(n + 2, 1);
  memcpy(withnl, text, n);
  withnl[n] = '\n';
  const int rc = write_file_atomic(path, withnl, n + 1);
  free(withnl);
  free(text);
  return rc;
}

static void hex64(char out[17], uint64_t v) { snprintf(out, 17, "%016" PRIx64, v); }

static int parse_hex64(const char *s, uint64_t *v) {
  if (s == NULL || strlen(s) != 16) return -1;
  char *end;
  errno = 0;
  *v = strtoull(s, &end, 16);
  return (errno != 0 || *end != '\0') ? -1 : 0;
}

/* ---- options --------------------------------------------------------------------------------- */

typedef struct strlist {
  char **v;
  size_t n;
} strlist;

static void strlist_add(strlist *l, const char *s) {
  char **v = realloc(l->v, (l->n + 1) * sizeof *v);
  if (v == NULL) {
    errf("out of memory");
    exit(EXIT_ERR);
  }
  l->v = v;
  l->v[l->n++] = xstrdup(s);
}

static void strlist_free(strlist *l) {
  for (size_t i = 0; i < l->n; i++)
    free(l->v[i]);
  free(l->v);
  l->v = NULL;
  l->n = 0;
}

typedef struct config {
  /* data */
  strlist train, eval;
  double split;
  uint64_t split_seed;
  char *on_bad_line;
  /* model */
  char *model; /* NULL: gpt2, or the --init file's */
  int64_t dim, layers, heads, kv_heads, ctx, ffn;
  int64_t features;
  char *hidden, *activation;
  char *init, *tokenizer;
  int64_t max_len;
  int64_t train_blocks;
  int no_share_prefix;
  /* optimisation */
  int64_t epochs, batch, eval_batch, warmup;
  char *optimizer, *schedule;
  double lr, min_lr, weight_decay, momentum, clip, center_coef;
  uint64_t seed;
  int64_t threads;
  /* run */
  char *out;
  int resume, overwrite, quiet;
  double time_budget;
  int64_t log_every, save_every, stop_after;
  int help, version;
} config;

enum { T_SECTION, T_FLAG, T_INT, T_U64, T_DBL, T_STR, T_LIST };
enum {
  F_RUN = 1, /* defines the run: saved in state.json, must match on --resume */
  F_PATH = 2 /* a file name: saved as an absolute path */
};

typedef struct optdef {
  const char *name;
  int type;
  size_t off;
  int flags;
  const char *arg;
  const char *help;
} optdef;

#define O(f) offsetof(config, f)
static const optdef OPTS[] = {
    {NULL, T_SECTION, 0, 0, NULL, "Data"},
    {"train", T_LIST, O(train), F_RUN | F_PATH, "FILE...",
     "training pairs, JSONL (several files are pooled; \"-\" reads standard input)"},
    {"eval", T_LIST, O(eval), F_RUN | F_PATH, "FILE...",
     "held-out pairs, JSONL (instead of --split)"},
    {"split", T_DBL, O(split), F_RUN, "FRAC",
     "train on this fraction of the pooled pairs and hold out the rest, at least one "
     "pair (--split 0.8: an 80/20 split; default 0.9 without --eval; 1: no held-out set)"},
    {"split-seed", T_U64, O(split_seed), F_RUN, "N", "seed of the --split draw (default 0)"},
    {"on-bad-line", T_STR, O(on_bad_line), 0, "skip|fail",
     "a line that is not a valid pair: skip it (counted, first 100 reported) "
     "or stop before training with exit code 3 (default skip)"},
    {NULL, T_SECTION, 0, 0, NULL, "Model"},
    {"model", T_STR, O(model), F_RUN, "NAME",
     "gpt2 = gpt2-tiny (128 wide, 4 layers, 4 heads, context 256), gpt2-small "
     "(768/12/12, 1024), gpt2-medium (1024/24/16), gpt2-large (1280/36/20), "
     "gpt2-xl (1600/48/25), llama = llama-tiny (128/4/4, 2 kv heads, 256), "
     "linear, mlp (default gpt2; with --init: the file's)"},
    {"dim", T_INT, O(dim), F_RUN, "C", "token models: width (overrides the named size)"},
    {"layers", T_INT, O(layers), F_RUN, "L", "token models: transformer blocks"},
    {"heads", T_INT, O(heads), F_RUN, "H", "token models: attention heads"},
    {"kv-heads", T_INT, O(kv_heads), F_RUN, "K", "llama: key/value heads (0: --heads)"},
    {"ctx", T_INT, O(ctx), F_RUN, "T", "token models: longest sequence the model takes"},
    {"ffn", T_INT, O(ffn), F_RUN, "N", "llama: SwiGLU width (0: 256 * ceil(8 C / 768))"},
    {"features", T_INT, O(features), F_RUN, "D",
     "linear/mlp: hashed byte 1-3-gram features of the response (default 4096)"},
    {"hidden", T_STR, O(hidden), F_RUN, "W,W...", "mlp: hidden widths (default 256,64)"},
    {"activation", T_STR, O(activation), F_RUN, "gelu|relu|tanh", "mlp (default gelu)"},
    {"init", T_STR, O(init), F_RUN | F_PATH, "CKPT",
     "start from a checkpoint: a libprefrm reward model (prm_model_load) or a "
     "Hugging Face GPT-2/Llama language or sequence-classification model "
     "(prm_model_load_pretrained; a missing head is initialised from --seed; "
     "--model and the dimensions supply what the file does not say)"},
    {"tokenizer", T_STR, O(tokenizer), F_RUN | F_PATH, "bytes|gpt2:DIR",
     "token models: bytes (256 ids) or GPT-2 BPE from DIR (vocab.json + "
     "merges.txt, or encoder.json + vocab.bpe) (default bytes)"},
    {"max-len", T_INT, O(max_len), F_RUN, "N",
     "token models: longest prompt + response sequence; longer pairs lose the "
     "start of their prompt (default: the model's context)"},
    {"train-blocks", T_INT, O(train_blocks), F_RUN, "K",
     "train only the last K blocks and the head (0: the head only; default -1: all)"},
    {"no-share-prefix", T_FLAG, O(no_share_prefix), F_RUN, NULL,
     "token models: compute both sequences of each pair in full. By default the "
     "rejected sequence reuses the chosen one's common start (the prompt and any "
     "identical opening of the responses), computed once (prm_batch version 2): "
     "the same results up to float rounding, for less work"},
    {NULL, T_SECTION, 0, 0, NULL, "Optimisation"},
    {"epochs", T_INT, O(epochs), F_RUN, "N", "passes over the training pairs (default 3)"},
    {"batch", T_INT, O(batch), F_RUN, "PAIRS", "pairs per optimizer step (default 16)"},
    {"eval-batch", T_INT, O(eval_batch), F_RUN, "PAIRS",
     "pairs per held-out forward per thread (default: --batch)"},
    {"optimizer", T_STR, O(optimizer), F_RUN, "adamw|adam|sgd", "(default adamw)"},
    {"lr", T_DBL, O(lr), F_RUN, "X",
     "peak learning rate (default 1e-3 for token models, 1e-2 for linear/mlp)"},
    {"min-lr", T_DBL, O(min_lr), F_RUN, "X", "floor of the linear/cosine decay (default 0)"},
    {"warmup", T_INT, O(warmup), F_RUN, "STEPS", "linear warm-up from 0 (default 0)"},
    {"schedule", T_STR, O(schedule), F_RUN, "constant|linear|cosine",
     "learning rate after the warm-up; linear and cosine decay to --min-lr at "
     "the last step of the last epoch (default constant)"},
    {"weight-decay", T_DBL, O(weight_decay), F_RUN, "X",
     "decoupled (adamw) or L2 (adam, sgd); never on biases and norms (default 0)"},
    {"momentum", T_DBL, O(momentum), F_RUN, "X", "sgd momentum (default 0)"},
    {"clip", T_DBL, O(clip), F_RUN, "NORM", "global gradient-norm clipping, 0: off (default 1)"},
    {"center-coef", T_DBL, O(center_coef), F_RUN, "C",
     "add C * mean((r_chosen + r_rejected)^2) to the loss, keeping rewards "
     "centred (default 0; TRL uses 0.01)"},
    {"seed", T_U64, O(seed), F_RUN, "N", "model initialisation and data order (default 0)"},
    {"threads", T_INT, O(threads), 0, "N",
     "training contexts, one thread each; each step's pairs are split across "
     "them and the gradients summed in a fixed order. Results depend on N, never "
     "on timing (default 1). With more than one, set OPENBLAS_NUM_THREADS=1 "
     "(or your BLAS's equivalent)"},
    {NULL, T_SECTION, 0, 0, NULL, "Run"},
    {"out", T_STR, O(out), 0, "DIR", "output directory, created if needed (required)"},
    {"resume", T_FLAG, O(resume), 0, NULL,
     "continue the run in DIR from its last save, bit-exactly: its settings come "
     "from DIR/state.json; the options that define the run may be repeated but "
     "not changed (all but --on-bad-line, --threads and this section's); --threads "
     "defaults to the run's, and another count costs bit-exactness"},
    {"overwrite", T_FLAG, O(overwrite), 0, NULL,
     "start a new run in a DIR that holds one (otherwise refused)"},
    {"time-budget", T_DBL, O(time_budget), 0, "SECONDS",
     "stop after the step that crosses this much wall time (from the start of "
     "the program), saving a resumable state (default 0: none)"},
    {"stop-after", T_INT, O(stop_after), 0, "STEPS",
     "stop once the run has made this many steps, saving as above (default 0: none)"},
    {"save-every", T_INT, O(save_every), 0, "STEPS",
     "also save the resumable state every STEPS steps (default 0: at the end of "
     "each epoch and when stopping)"},
    {"log-every", T_INT, O(log_every), 0, "N",
     "without a terminal on stderr: a progress line every N steps (default 50)"},
    {"quiet", T_FLAG, O(quiet), 0, NULL, "no progress bar or progress lines"},
    {"help", T_FLAG, O(help), 0, NULL, "this reference"},
    {"version", T_FLAG, O(version), 0, NULL, "program and library versions"},
};
#define N_OPTS (sizeof OPTS / sizeof OPTS[0])

static void config_defaults(config *c) {
  memset(c, 0, sizeof *c);
  c->split = -1.0; /* unset: 0.9 without --eval */
  c->on_bad_line = xstrdup("skip");
  c->features = 4096;
  c->hidden = xstrdup("256,64");
  c->activation = xstrdup("gelu");
  c->tokenizer = xstrdup("bytes");
  c->train_blocks = -1;
  c->epochs = 3;
  c->batch = 16;
  c->optimizer = xstrdup("adamw");
  c->schedule = xstrdup("constant");
  c->lr = -1.0; /* unset: depends on the model */
  c->clip = 1.0;
  c->threads = 1;
  c->log_every = 50;
}

static void config_free(config *c) {
  for (size_t i = 0; i < N_OPTS; i++) {
    const optdef *d = &OPTS[i];
    if (d->type == T_STR) {
      char **s = (char **)((char *)c + d->off);
      free(*s);
      *s = NULL;
    } else if (d->type == T_LIST) {
      strlist_free((strlist *)((char *)c + d->off));
    }
  }
}

static const optdef *find_opt(const char *name, size_t len) {
  for (size_t i = 0; i < N_OPTS; i++)
    if (OPTS[i].name != NULL && strlen(OPTS[i].name) == len &&
        strncmp(OPTS[i].name, name, len) == 0)
      return &OPTS[i];
  return NULL;
}

static int set_value(config *c, const optdef *d, const char *v) {
  void *p = (char *)c + d->off;
  char *end;
  errno = 0;
  switch (d->type) {
  case T_INT: {
    const long long x = strtoll(v, &end, 10);
    if (errno != 0 || end == v || *end != '\0') {
      errf("--%s: '%s' is not an integer", d->name, v);
      return -1;
    }
    *(int64_t *)p = x;
    return 0;
  }
  case T_U64: {
    const unsigned long long x = strtoull(v, &end, 10);
    if (errno != 0 || end == v || *end != '\0' || strchr(v, '-') != NULL) {
      errf("--%s: '%s' is not a non-negative integer", d->name, v);
      return -1;
    }
    *(uint64_t *)p = x;
    return 0;
  }
  case T_DBL: {
    const double x = strtod(v, &end);
    if (errno != 0 || end == v || *end != '\0' || !isfinite(x)) {
      errf("--%s: '%s' is not a finite number", d->name, v);
      return -1;
    }
    *(double *)p = x;
    return 0;
  }
  case T_STR:
    free(*(char **)p);
    *(char **)p = xstrdup(v);
    return 0;
  case T_LIST: strlist_add(p, v); return 0;
  }
  return -1;
}

/* --name VALUE, --name=VALUE; a list takes every following argument up to
 * the next one that starts with "--". set[i] records what was given. */
static int parse_args(config *c, unsigned char set[N_OPTS], int argc, char **argv) {
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i];
    if (strcmp(a, "-h") == 0) a = "--help";
    if (strncmp(a, "--", 2) != 0 || a[2] == '\0') {
      errf("unexpected argument '%s' (options start with --; see --help)", a);
      return -1;
    }
    const char *name = a + 2;
    const char *eq = strchr(name, '=');
    const size_t len = eq ? (size_t)(eq - name) : strlen(name);
    const optdef *d = find_opt(name, len);
    if (d == NULL) {
      errf("unknown option '%.*s' (see --help)", (int)(len + 2), a);
      return -1;
    }
    set[d - OPTS] = 1;
    if (d->type == T_FLAG) {
      if (eq != NULL) {
        errf("--%s takes no value", d->name);
        return -1;
      }
      *(int *)((char *)c + d->off) = 1;
      continue;
    }
    if (d->type == T_LIST) {
      size_t n = 0;
      if (eq != NULL) {
        strlist_add((strlist *)((char *)c + d->off), eq + 1);
        n++;
      }
      while (i + 1 < argc && strncmp(argv[i + 1], "--", 2) != 0) {
        strlist_add((strlist *)((char *)c + d->off), argv[++i]);
        n++;
      }
      if (n == 0) {
        errf("--%s needs at least one %s", d->name, d->arg);
        return -1;
      }
      continue;
    }
    const char *v = eq ? eq + 1 : NULL;
    if (v == NULL) {
      if (i + 1 >= argc) {
        errf("--%s needs a value (%s)", d->name, d->arg);
        return -1;
      }
      v = argv[++i];
    }
    if (set_value(c, d, v) != 0) return -1;
  }
  return 0;
}

/* "  --name ARG" then the help text, word-wrapped into a column from
 * HELP_COL to HELP_WIDTH (the text's newlines are spaces). */
#define HELP_COL 28
#define HELP_WIDTH 79
static void print_wrapped(const char *head, const char *text) {
  int col = printf("%s", head);
  if (col >= HELP_COL) {
    putchar('\n');
    col = 0;
  }
  int fresh = 1; /* nothing written in the help column of this line yet */
  printf("%*s", HELP_COL - col, "");
  col = HELP_COL;
  for (const char *p = text; *p;) {
    while (*p == ' ' || *p == '\n')
      p++;
    size_t n = 0;
    while (p[n] && p[n] != ' ' && p[n] != '\n')
      n++;
    if (n == 0) break;
    if (!fresh && col + 1 + (int)n > HELP_WIDTH) {
      printf("\n%*s", HELP_COL, "");
      col = HELP_COL;
      fresh = 1;
    }
    if (!fresh) {
      putchar(' ');
      col++;
    }
    fwrite(p, 1, n, stdout);
    col += (int)n;
    fresh = 0;
    p += n;
  }
  putchar('\n');
}

static void print_help(void) {
  printf("Usage: " PROG " --train FILE... --out DIR [options]\n"
         "       " PROG " --resume --out DIR [options]\n"
         "\n"
         "Train a reward model on pairwise preferences with libprefrm. Each input line\n"
         "is a JSON object:\n"
         "  {\"prompt\": \"...\", \"chosen\": \"...\", \"rejected\": \"...\"}\n"
         "with optional \"margin\" (the loss uses r_chosen - r_rejected - margin) and\n"
         "\"label\" in [0, 1] (probability that chosen is preferred; default 1).\n"
         "Empty lines are ignored. Token models read prompt + response (the prompt loses\n"
         "its start when a pair exceeds --max-len); linear and mlp read hashed byte\n"
         "n-grams of the response alone.\n");
  for (size_t i = 0; i < N_OPTS; i++) {
    const optdef *d = &OPTS[i];
    if (d->type == T_SECTION) {
      printf("\n%s:\n", d->help);
      continue;
    }
    char head[64];
    snprintf(head, sizeof head, "  --%s%s%s", d->name, d->arg ? " " : "", d->arg ? d->arg : "");
    print_wrapped(head, d->help);
  }
  printf("\nOutput (stdout): one line per epoch, e.g.\n"
         "  epoch 2/3 step 120 train_loss 0.4123 train_acc 0.8125 heldout_loss 0.3810\n"
         "  accuracy 0.8400 margin_mean 1.2034 brier 0.1180 ece 0.0412 ... best\n"
         "(one line; accuracy is the held-out accuracy; every prm_loss_stats v2 field).\n"
         "Progress goes to stderr: a bar redrawn in place on a terminal (pairs/s, ETA,\n"
         "running loss and accuracy), else a line every --log-every steps. Bad input\n"
         "lines are reported on stderr as FILE:LINE: reason.\n"
         "\nFiles written in DIR:\n"
         "  best.safetensors   the model of the epoch with the lowest held-out loss\n"
         "                     (the last epoch's without a held-out set)\n"
         "  best.json          its sidecar for prefrm-score (tokenizer, max_len, input)\n"
         "  last.safetensors   the model at the last save, with last.json\n"
         "  last.optim.safetensors  the optimizer state at the last save\n"
         "  state.json         run state for --resume (epoch, step, data-order RNG,\n"
         "                     running statistics, best loss, the run's settings)\n"
         "  metrics.csv        one row per epoch: epoch, step, pairs, train loss and\n"
         "                     accuracy, every held-out statistic, lr, elapsed seconds\n"
         "  summary.json       at the end (also after a clean stop): best epoch, best\n"
         "                     held-out loss and accuracy, pairs seen, wall time,\n"
         "                     pairs/s, peak RSS, skipped lines, ...\n"
         "Files are replaced atomically (NAME.tmp, fsync, rename); metrics.csv is\n"
         "appended and synced, and --resume cuts rows written after the last save.\n"
         "\nExit codes:\n"
         "  0    finished; or stopped by --time-budget or --stop-after (resumable)\n"
         "  1    error: library, file, memory, a model that diverged\n"
         "  2    bad command line, or DIR holds a run (use --resume or --overwrite)\n"
         "  3    bad input: a bad line with --on-bad-line fail, a file without pairs\n"
         "  130  SIGINT (143: SIGTERM) after saving a resumable state; a second\n"
         "       signal kills at once\n"
         "\nExamples:\n"
         "  " PROG " --train train.jsonl --split 0.05 --model linear --epochs 5 \\\n"
         "      --out run1\n"
         "  " PROG " --train a.jsonl b.jsonl --eval test.jsonl --model gpt2 \\\n"
         "      --dim 256 --layers 6 --heads 8 --ctx 512 --batch 32 --lr 3e-4 \\\n"
         "      --warmup 100 --schedule cosine --weight-decay 0.01 --threads 4 \\\n"
         "      --out run2\n"
         "  " PROG " --train hh.jsonl --eval hh-test.jsonl --model gpt2-small \\\n"
         "      --init gpt2/model.safetensors --tokenizer gpt2:gpt2 --max-len 512 \\\n"
         "      --train-blocks 2 --time-budget 3600 --out run3\n"
         "  " PROG " --resume --out run3          # continue after the time budget\n");
}

/* ---- the run's settings as JSON (state.json "config") ---------------------------------------- */

/* An absolute path for a name given relative to the working directory, so
 * that a resumed run (or prefrm-score, through the sidecar) finds the same
 * files from anywhere. Names that do not resolve stay as given. */
static char *absolute_path(const char *p) {
  if (strcmp(p, "-") == 0) return xstrdup(p);
  char buf[PATH_MAX];
  if (realpath(p, buf) == NULL) return xstrdup(p);
  return xstrdup(buf);
}

static char *absolute_spec(const char *spec) {
  if (strncmp(spec, "gpt2:", 5) != 0) return xstrdup(spec);
  char *dir = absolute_path(spec + 5);
  char *out = xcalloc(strlen(dir) + 6, 1);
  sprintf(out, "gpt2:%s", dir);
  free(dir);
  return out;
}

static json_t *opt_to_json(const config *c, const optdef *d) {
  const void *p = (const char *)c + d->off;
  switch (d->type) {
  case T_FLAG: return json_boolean(*(const int *)p);
  case T_INT: return json_integer((json_int_t) * (const int64_t *)p);
  case T_U64: {
    char buf[32];
    snprintf(buf, sizeof buf, "%" PRIu64, *(const uint64_t *)p);
    return json_string(buf);
  }
  case T_DBL: return json_real(*(const double *)p);
  case T_STR: {
    const char *s = *(char *const *)p;
    if (s == NULL) return json_null();
    if (!(d->flags & F_PATH)) return json_string(s);
    char *a = strcmp(d->name, "tokenizer") == 0 ? absolute_spec(s) : absolute_path(s);
    json_t *j = json_string(a);
    free(a);
    return j;
  }
  case T_LIST: {
    const strlist *l = p;
    json_t *arr = json_array();
    for (size_t i = 0; i < l->n; i++) {
      char *a = absolute_path(l->v[i]);
      json_array_append_new(arr, json_string(a));
      free(a);
    }
    return arr;
  }
  }
  return json_null();
}

static int opt_from_json(config *c, const optdef *d, const json_t *v) {
  void *p = (char *)c + d->off;
  switch (d->type) {
  case T_FLAG:
    if (!json_is_boolean(v)) return -1;
    *(int *)p = json_is_true(v);
    return 0;
  case T_INT:
    if (!json_is_integer(v)) return -1;
    *(int64_t *)p = json_integer_value(v);
    return 0;
  case T_U64:
    if (!json_is_string(v)) return -1;
    return set_value(c, d, json_string_value(v));
  case T_DBL:
    if (!json_is_number(v)) return -1;
    *(double *)p = json_number_value(v);
    return 0;
  case T_STR:
    free(*(char **)p);
    *(char **)p = NULL;
    if (json_is_null(v)) return 0;
    if (!json_is_string(v)) return -1;
    *(char **)p = xstrdup(json_string_value(v));
    return 0;
  case T_LIST: {
    if (!json_is_array(v)) return -1;
    strlist_free(p);
    for (size_t i = 0; i < json_array_size(v); i++) {
      const json_t *s = json_array_get(v, i);
      if (!json_is_string(s)) return -1;
      strlist_add(p, json_string_value(s));
    }
    return 0;
  }
  }
  return -1;
}

static json_t *config_to_json(const config *c) {
  json_t *o = json_object();
  for (size_t i = 0; i < N_OPTS; i++)
    if (OPTS[i].flags & F_RUN) json_object_set_new(o, OPTS[i].name, opt_to_json(c, &OPTS[i]));
  return o;
}

/* --resume: the saved settings replace the defaults; settings given again on
 * the command line must be the saved ones. */
static int config_merge_saved(config *c, const unsigned char set[N_OPTS], const json_t *saved,
                              const char *state_path) {
  if (!json_is_object(saved)) {
    errf("%s: no \"config\" object", state_path);
    return -1;
  }
  for (size_t i = 0; i < N_OPTS; i++) {
    const optdef *d = &OPTS[i];
    if (!(d->flags & F_RUN)) continue;
    const json_t *sv = json_object_get(saved, d->name);
    if (sv == NULL && d->off == O(no_share_prefix)) {
      /* a run saved before prefix sharing (0.4) computed every pair in
       * full: resuming it bit-exactly means going on doing so */
      c->no_share_prefix = 1;
      continue;
    }
    if (sv == NULL) {
      errf("%s: config lacks \"%s\"", state_path, d->name);
      return -1;
    }
    if (set[i]) {
      json_t *cur = opt_to_json(c, d);
      const int same = json_equal(cur, (json_t *)sv);
      if (!same) {
        char *a = json_dumps(cur, JSON_ENCODE_ANY | JSON_COMPACT | JSON_REAL_PRECISION(17));
        char *b = json_dumps(sv, JSON_ENCODE_ANY | JSON_COMPACT | JSON_REAL_PRECISION(17));
        errf("--resume: --%s %s differs from the run's %s (%s); a resumed run keeps its "
             "settings",
             d->name, a ? a : "?", b ? b : "?", state_path);
        free(a);
        free(b);
      }
      json_decref(cur);
      if (!same) return -1;
    }
    if (opt_from_json(c, d, sv) != 0) {
      errf("%s: config \"%s\" has the wrong type", state_path, d->name);
      return -1;
    }
  }
  return 0;
}

/* ---- model names ----------------------------------------------------------------------------- */

typedef struct named_model {
  const char *name;
  int32_t arch;
  int64_t dim, layers, heads, kv_heads, ctx;
} named_model;

static const named_model MODELS[] = {
    {"gpt2", PRM_ARCH_GPT2, 128, 4, 4, 0, 256},
    {"gpt2-tiny", PRM_ARCH_GPT2, 128, 4, 4, 0, 256},
    {"gpt2-small", PRM_ARCH_GPT2, 768, 12, 12, 0, 1024},
    {"gpt2-medium", PRM_ARCH_GPT2, 1024, 24, 16, 0, 1024},
    {"gpt2-large", PRM_ARCH_GPT2, 1280, 36, 20, 0, 1024},
    {"gpt2-xl", PRM_ARCH_GPT2, 1600, 48, 25, 0, 1024},
    {"llama", PRM_ARCH_LLAMA, 128, 4, 4, 2, 256},
    {"llama-tiny", PRM_ARCH_LLAMA, 128, 4, 4, 2, 256},
    {"linear", PRM_ARCH_LINEAR, 0, 0, 0, 0, 0},
    {"mlp", PRM_ARCH_MLP, 0, 0, 0, 0, 0},
};

static const named_model *find_model(const char *name) {
  for (size_t i = 0; i < sizeof MODELS / sizeof MODELS[0]; i++)
    if (strcmp(MODELS[i].name, name) == 0) return &MODELS[i];
  return NULL;
}

static int is_token_arch(int32_t arch) { return arch == PRM_ARCH_GPT2 || arch == PRM_ARCH_LLAMA; }

/* "256,64" -> widths; returns the count or -1. */
static int parse_hidden(const char *s, uint64_t out[PRM_MAX_HIDDEN]) {
  int n = 0;
  const char *p = s;
  while (*p) {
    char *end;
    errno = 0;
    const long long w = strtoll(p, &end, 10);
    if (errno != 0 || end == p || w < 1 || n == PRM_MAX_HIDDEN) return -1;
    out[n++] = (uint64_t)w;
    if (*end == ',')
      end++;
    else if (*end != '\0')
      return -1;
    p = end;
  }
  return n > 0 ? n : -1;
}

static int one_of(const char *v, const char *const *choices) {
  for (int i = 0; choices[i]; i++)
    if (strcmp(v, choices[i]) == 0) return i;
  return -1;
}

static const char *const SCHEDULES[] = {"constant", "linear", "cosine", NULL};
static const char *const OPTIMIZERS[] = {"adamw", "adam", "sgd", NULL};
static const char *const BADLINE[] = {"skip", "fail", NULL};
static const char *const ACTIVATIONS[] = {"gelu", "relu", "tanh", NULL};

static int validate(config *c) {
#define NEED(cond, ...)                                                                            \
  do {                                                                                             \
    if (!(cond)) {                                                                                 \
      errf(__VA_ARGS__);                                                                           \
      return -1;                                                                                   \
    }                                                                                              \
  } while (0)
  NEED(c->out != NULL && c->out[0] != '\0', "--out DIR is required (see --help)");
  NEED(c->train.n > 0, "--train FILE... is required (see --help)");
  NEED(c->eval.n == 0 || c->split < 0, "--eval and --split exclude each other");
  NEED(!(c->resume && c->overwrite), "--resume and --overwrite exclude each other");
  if (c->split < 0) c->split = c->eval.n > 0 ? 1.0 : 0.9;
  NEED(c->split > 0.0 && c->split <= 1.0, "--split %g: the training fraction must be in (0, 1]",
       c->split);
  NEED(one_of(c->on_bad_line, BADLINE) >= 0, "--on-bad-line %s: skip or fail", c->on_bad_line);
  NEED(c->model == NULL || find_model(c->model) != NULL,
       "--model %s: unknown (gpt2, gpt2-tiny, gpt2-small, gpt2-medium, gpt2-large, gpt2-xl, "
       "llama, llama-tiny, linear, mlp)",
       c->model);
  NEED(c->dim >= 0 && c->layers >= 0 && c->heads >= 0 && c->kv_heads >= 0 && c->ctx >= 0 &&
           c->ffn >= 0,
       "model dimensions must be positive");
  NEED(c->features >= 1, "--features must be at least 1");
  uint64_t hidden[PRM_MAX_HIDDEN];
  NEED(parse_hidden(c->hidden, hidden) > 0,
       "--hidden %s: 1 to %d positive widths separated by commas", c->hidden, PRM_MAX_HIDDEN);
  NEED(one_of(c->activation, ACTIVATIONS) >= 0, "--activation %s: gelu, relu or tanh",
       c->activation);
  NEED(strcmp(c->tokenizer, "bytes") == 0 || strncmp(c->tokenizer, "gpt2:", 5) == 0,
       "--tokenizer %s: bytes or gpt2:DIR", c->tokenizer);
  NEED(c->max_len >= 0, "--max-len must be positive");
  NEED(c->train_blocks >= -1, "--train-blocks: -1 (all), 0 (head only) or a block count");
  NEED(c->epochs >= 1, "--epochs must be at least 1");
  NEED(c->batch >= 1 && c->batch <= (1 << 24), "--batch must be in [1, 2^24]");
  NEED(c->eval_batch >= 0 && c->eval_batch <= (1 << 24), "--eval-batch must be in [1, 2^24]");
  NEED(c->warmup >= 0, "--warmup must be >= 0");
  NEED(one_of(c->optimizer, OPTIMIZERS) >= 0, "--optimizer %s: adamw, adam or sgd", c->optimizer);
  NEED(one_of(c->schedule, SCHEDULES) >= 0, "--schedule %s: constant, linear or cosine",
       c->schedule);
  NEED(c->min_lr >= 0 && c->weight_decay >= 0 && c->momentum >= 0 && c->clip >= 0 &&
           c->center_coef >= 0,
       "--min-lr, --weight-decay, --momentum, --clip and --center-coef must be >= 0");
  NEED(c->threads >= 1 && c->threads <= 1024, "--threads must be in [1, 1024]");
  NEED(c->time_budget >= 0, "--time-budget must be >= 0");
  NEED(c->log_every >= 1, "--log-every must be at least 1");
  NEED(c->save_every >= 0 && c->stop_after >= 0, "--save-every and --stop-after must be >= 0");
  if (c->eval_batch == 0) c->eval_batch = c->batch;
  return 0;
#undef NEED
}

/* ---- data ------------------------------------------------------------------------------------ */

/* One preference pair. Token models keep the two sequences pft_build_pair
 * made (the texts are freed once tokenised); linear/mlp keep the texts of
 * the two responses (features are computed per batch). */
typedef struct pair {
  char *prompt, *a, *b; /* a: chosen, b: rejected */
  size_t np, na, nb;
  int32_t *c, *r;
  uint32_t nc, nr;
  float margin, label;
  uint32_t file; /* index into the run's list of input files */
  uint64_t line;
} pair;

typedef struct pairset {
  pair *v;
  size_t n, cap;
  int any_margin, any_label;
} pairset;

static void pairset_push(pairset *s, const pair *p) {
  if (s->n == s->cap) {
    const size_t cap = s->cap ? 2 * s->cap : 1024;
    pair *v = realloc(s->v, cap * sizeof *v);
    if (v == NULL) {
      errf("out of memory reading pairs");
      exit(EXIT_ERR);
    }
    s->v = v;
    s->cap = cap;
  }
  s->v[s->n++] = *p;
}

static void pair_free_texts(pair *p) {
  free(p->prompt);
  free(p->a);
  free(p->b);
  p->prompt = p->a = p->b = NULL;
}

static void pairset_free(pairset *s) {
  for (size_t i = 0; i < s->n; i++) {
    pair_free_texts(&s->v[i]);
    free(s->v[i].c);
    free(s->v[i].r);
  }
  free(s->v);
  memset(s, 0, sizeof *s);
}

typedef struct input_stats {
  uint64_t lines, blank, bad, pairs, reported;
  uint64_t truncated;
} input_stats;

/* Read one JSONL file into *s. Returns 0, EXIT_DATA (a bad line with
 * --on-bad-line fail, or no pair in the file) or EXIT_ERR (unreadable). */
static int read_pairs(const char *path, const char *role, uint32_t file_index, int fail_on_bad,
                      pairset *s, input_stats *st) {
  char err[512];
  pft_reader *r = NULL;
  if (pft_reader_open(&r, path, err, sizeof err) != 0) {
    errf("%s: %s", path, err);
    return EXIT_ERR;
  }
  const uint64_t bad0 = st->bad, pairs0 = st->pairs, lines0 = st->lines;
  const char *line;
  size_t len;
  uint64_t no = 0;
  int rc;
  while ((rc = pft_reader_next(r, &line, &len, &no, err, sizeof err)) == 1) {
    st->lines++;
    if (pft_line_is_blank(line, len)) {
      st->blank++;
      continue;
    }
    pft_record rec;
    const char *why = NULL;
    if (pft_parse_record(line, len, PFT_WANT_PAIR, &rec, err, sizeof err) != 0)
      why = err;
    else if (rec.kind != PFT_REC_PAIR || rec.b == NULL)
      why = "not a pair (needs \"rejected\")";
    else if (rec.has_margin && !(fabs(rec.margin) <= FLT_MAX))
      why = "margin beyond float range";
    if (why != NULL) {
      st->bad++;
      if (fail_on_bad || st->reported < MAX_BAD_REPORTS) {
        fprintf(stderr, "%s:%" PRIu64 ": %s\n", pft_reader_name(r), no, why);
        st->reported++;
      } else if (st->reported == MAX_BAD_REPORTS) {
        fprintf(stderr, PROG ": further bad lines are counted, not shown\n");
        st->reported++;
      }
      pft_record_free(&rec);
      if (fail_on_bad) {
        errf("stopping at the bad line (--on-bad-line fail)");
        pft_reader_close(r);
        return EXIT_DATA;
      }
      continue;
    }
    pair p;
    memset(&p, 0, sizeof p);
    p.prompt = xmemdup(rec.prompt, rec.prompt_len);
    p.a = xmemdup(rec.a, rec.a_len);
    p.b = xmemdup(rec.b, rec.b_len);
    p.np = rec.prompt_len;
    p.na = rec.a_len;
    p.nb = rec.b_len;
    p.margin = rec.has_margin ? (float)rec.margin : 0.0f;
    p.label = rec.has_label ? (float)rec.label : 1.0f;
    s->any_margin |= rec.has_margin;
    s->any_label |= rec.has_label;
    p.file = file_index;
    p.line = no;
    pairset_push(s, &p);
    st->pairs++;
    pft_record_free(&rec);
  }
  pft_reader_close(r);
  if (rc < 0) {
    errf("%s: %s", path, err);
    return EXIT_ERR;
  }
  if (st->pairs == pairs0) {
    errf("%s: no preference pairs (%" PRIu64 " lines, %" PRIu64 " bad): nothing to %s", path,
         st->lines - lines0, st->bad - bad0, role);
    return EXIT_DATA;
  }
  return 0;
}

/* ---- a fixed pool of threads ----------------------------------------------------------------- */

/* pool_run(fn) calls fn(arg, t) for t = 0..n-1, t = 0 on the caller, and
 * returns when all are done. The barriers also order memory. */
typedef struct pool pool;
typedef struct pool_slot {
  pool *p;
  int t;
} pool_slot;
struct pool {
  int n;
  pthread_t *tid;
  pool_slot *slots;
  pthread_barrier_t start, done;
  void (*fn)(void *, int);
  void *arg;
  int quit;
};

static void *pool_thread(void *a) {
  const pool_slot *s = a;
  pool *p = s->p;
  for (;;) {
    pthread_barrier_wait(&p->start);
    if (p->quit) break;
    p->fn(p->arg, s->t);
    pthread_barrier_wait(&p->done);
  }
  return NULL;
}

static int pool_init(pool *p, int n) {
  memset(p, 0, sizeof *p);
  p->n = n;
  if (n == 1) return 0;
  p->tid = xcalloc((size_t)n, sizeof *p->tid);
  p->slots = xcalloc((size_t)n, sizeof *p->slots);
  if (pthread_barrier_init(&p->start, NULL, (unsigned)n) != 0 ||
      pthread_barrier_init(&p->done, NULL, (unsigned)n) != 0) {
    errf("cannot create thread barriers");
    return -1;
  }
  for (int t = 1; t < n; t++) {
    p->slots[t].p = p;
    p->slots[t].t = t;
    const int e = pthread_create(&p->tid[t], NULL, pool_thread, &p->slots[t]);
    if (e != 0) {
      errf("cannot start thread %d: %s", t, strerror(e));
      exit(EXIT_ERR);
    }
  }
  return 0;
}

static void pool_run(pool *p, void (*fn)(void *, int), void *arg) {
  if (p->n == 1) {
    fn(arg, 0);
    return;
  }
  p->fn = fn;
  p->arg = arg;
  pthread_barrier_wait(&p->start);
  fn(arg, 0);
  pthread_barrier_wait(&p->done);
}

static void pool_free(pool *p) {
  if (p->n > 1) {
    p->quit = 1;
    pthread_barrier_wait(&p->start);
    for (int t = 1; t < p->n; t++)
      pthread_join(p->tid[t], NULL);
    pthread_barrier_destroy(&p->start);
    pthread_barrier_destroy(&p->done);
  }
  free(p->tid);
  free(p->slots);
  memset(p, 0, sizeof *p);
}

/* ---- tokenising ------------------------------------------------------------------------------ */

typedef struct tok_job {
  pairset *s;
  const pft_tokenizer *tok;
  uint64_t max_len;
  int nt;
  int *failed;         /* per thread: 1 when a pair could not be tokenised */
  size_t *fail_at;     /* per thread: that pair */
  uint64_t *truncated; /* per thread: pairs cut to max_len */
} tok_job;

static int32_t *copy_ids(const pft_ids *ids) {
  int32_t *v = malloc((ids->n ? ids->n : 1) * sizeof *v);
  if (v != NULL && ids->n) memcpy(v, ids->v, ids->n * sizeof *v);
  return v;
}

/* Prompt, chosen and rejected to ids; pft_build_pair cuts them to max_len. */
static void tok_fn(void *arg, int t) {
  tok_job *J = arg;
  const size_t lo = J->s->n * (size_t)t / (size_t)J->nt;
  const size_t hi = J->s->n * (size_t)(t + 1) / (size_t)J->nt;
  pft_ids p = {0}, a = {0}, b = {0}, oc = {0}, orr = {0};
  for (size_t i = lo; i < hi; i++) {
    pair *q = &J->s->v[i];
    p.n = a.n = b.n = 0;
    size_t kept = 0;
    if (pft_encode(J->tok, q->prompt, q->np, &p) != 0 || pft_encode(J->tok, q->a, q->na, &a) != 0 ||
        pft_encode(J->tok, q->b, q->nb, &b) != 0 ||
        pft_build_pair(p.v, p.n, a.v, a.n, b.v, b.n, J->max_len, &oc, &orr, &kept) != 0 ||
        oc.n == 0 || orr.n == 0 || (q->c = copy_ids(&oc)) == NULL ||
        (q->r = copy_ids(&orr)) == NULL) {
      J->failed[t] = 1;
      J->fail_at[t] = i;
      break;
    }
    q->nc = (uint32_t)oc.n;
    q->nr = (uint32_t)orr.n;
    if (kept < p.n || a.n > J->max_len || b.n > J->max_len) J->truncated[t]++;
    pair_free_texts(q);
  }
  free(p.v);
  free(a.v);
  free(b.v);
  free(oc.v);
  free(orr.v);
}

/* Returns 0 or EXIT_ERR; *truncated counts the pairs cut to max_len. */
static int tokenise(pool *pl, pairset *s, const pft_tokenizer *tok, uint64_t max_len,
                    const strlist *files, uint64_t *truncated) {
  tok_job J = {s,
               tok,
               max_len,
               pl->n,
               xcalloc((size_t)pl->n, sizeof(int)),
               xcalloc((size_t)pl->n, sizeof(size_t)),
               xcalloc((size_t)pl->n, sizeof(uint64_t))};
  pool_run(pl, tok_fn, &J);
  int rc = 0;
  for (int t = 0; t < pl->n; t++) {
    if (J.failed[t]) {
      const pair *q = &s->v[J.fail_at[t]];
      errf("%s:%" PRIu64 ": cannot tokenise the pair (out of memory, or an empty sequence)",
           files->v[q->file], q->line);
      rc = EXIT_ERR;
      break;
    }
    *truncated += J.truncated[t];
  }
  free(J.failed);
  free(J.fail_at);
  free(J.truncated);
  return rc;
}

/* Fingerprint of a pair set as the model sees it, for --resume. */
static uint64_t hash_pairs(const pairset *s, int ngrams, uint64_t h) {
  for (size_t i = 0; i < s->n; i++) {
    const pair *q = &s->v[i];
    if (ngrams) {
      const uint64_t na = q->na, nb = q->nb;
      h = fnv(h, &na, sizeof na);
      h = fnv(h, q->a, q->na);
      h = fnv(h, &nb, sizeof nb);
      h = fnv(h, q->b, q->nb);
    } else {
      h = fnv(h, &q->nc, sizeof q->nc);
      h = fnv(h, q->c, q->nc * sizeof *q->c);
      h = fnv(h, &q->nr, sizeof q->nr);
      h = fnv(h, q->r, q->nr * sizeof *q->r);
    }
    h = fnv(h, &q->margin, sizeof q->margin);
    h = fnv(h, &q->label, sizeof q->label);
  }
  return h;
}

/* ---- the trainer ----------------------------------------------------------------------------- */

typedef struct worker {
  prm_ctx *ctx;  /* training context: this thread's share of each step */
  prm_ctx *ictx; /* inference context: held-out scoring */
  float *grads;  /* prm_ctx_grads(ctx) */
  size_t cap;    /* pairs the buffers hold */
  int32_t *tokens, *lengths, *prefix_row, *prefix_len;
  float *features, *scores, *dscores, *margin, *label;
  /* the current job */
  size_t n; /* pairs */
  int rc;
  char msg[600];
  double loss;
  prm_loss_stats st;
} worker;

typedef struct trainer {
  const config *cfg;
  const pairset *train, *held;
  prm_model *model;
  prm_optimizer *opt;
  pool pool;
  worker *w;
  int nt;
  int ngrams;
  uint32_t dim;     /* ngram features */
  uint64_t max_len; /* token models */
  uint64_t n_grads;
  /* the current step */
  const size_t *idx;
  size_t n;
  /* held-out */
  float *held_c, *held_r, *held_margin, *held_label;
} trainer;

/* Rows 0..n-1 chosen, n..2n-1 rejected, of pairs idx[first..first+n) (or
 * first..first+n without idx). */
static void fill_batch(const trainer *T, worker *w, const pairset *s, const size_t *idx,
                       size_t first, size_t n, prm_batch *b) {
  prm_batch_init(b, PRM_BATCH_VERSION);
  b->n = 2 * (uint64_t)n;
  if (T->ngrams) {
    for (size_t i = 0; i < n; i++) {
      const pair *q = &s->v[idx ? idx[first + i] : first + i];
      pft_ngram_features(q->a, q->na, w->features + i * T->dim, T->dim);
      pft_ngram_features(q->b, q->nb, w->features + (n + i) * T->dim, T->dim);
      w->margin[i] = q->margin;
      w->label[i] = q->label;
    }
    b->features = w->features;
    b->n_features = T->dim;
    return;
  }
  size_t stride = 1;
  for (size_t i = 0; i < n; i++) {
    const pair *q = &s->v[idx ? idx[first + i] : first + i];
    if (q->nc > stride) stride = q->nc;
    if (q->nr > stride) stride = q->nr;
  }
  for (size_t i = 0; i < n; i++) {
    const pair *q = &s->v[idx ? idx[first + i] : first + i];
    memcpy(w->tokens + i * stride, q->c, q->nc * sizeof(int32_t));
    memcpy(w->tokens + (n + i) * stride, q->r, q->nr * sizeof(int32_t));
    w->lengths[i] = (int32_t)q->nc;
    w->lengths[n + i] = (int32_t)q->nr;
    w->margin[i] = q->margin;
    w->label[i] = q->label;
    /* the rejected row repeats the chosen row's common start */
    size_t lcp = 0;
    while (lcp < q->nc && lcp < q->nr && q->c[lcp] == q->r[lcp]) lcp++;
    w->prefix_row[i] = w->prefix_len[i] = 0;
    w->prefix_row[n + i] = (int32_t)i;
    w->prefix_len[n + i] = (int32_t)lcp;
  }
  b->tokens = w->tokens;
  b->token_stride = stride;
  b->lengths = w->lengths;
  if (!T->cfg->no_share_prefix) {
    b->prefix_row = w->prefix_row;
    b->prefix_len = w->prefix_len;
  }
}

static void loss_options(const trainer *T, const pairset *s, const float *margin,
                         const float *label, prm_loss_options *lo) {
  prm_loss_options_init(lo, PRM_LOSS_OPTIONS_VERSION);
  lo->margin = s->any_margin ? margin : NULL;
  lo->label = s->any_label ? label : NULL;
  lo->center_coef = T->cfg->center_coef;
}

/* Thread t: forward, loss and backward of its share of the step's pairs,
 * with d(loss)/d(scores) scaled by share / P so that the summed gradient is
 * that of the mean loss over all P pairs. */
static void train_fn(void *arg, int t) {
  trainer *T = arg;
  worker *w = &T->w[t];
  const size_t lo = T->n * (size_t)t / (size_t)T->nt, hi = T->n * (size_t)(t + 1) / (size_t)T->nt;
  const size_t n = hi - lo;
  w->n = n;
  w->rc = PRM_OK;
  if (n == 0) return;
  prm_batch b;
  fill_batch(T, w, T->train, T->idx, lo, n, &b);
  w->rc = prm_ctx_forward(w->ctx, &b, w->scores, 2 * (uint64_t)n);
  if (w->rc != PRM_OK) {
    snprintf(w->msg, sizeof w->msg, "forward: %s", prm_ctx_errmsg(w->ctx));
    return;
  }
  prm_loss_options lopt;
  loss_options(T, T->train, w->margin, w->label, &lopt);
  prm_loss_stats_init(&w->st, PRM_LOSS_STATS_VERSION);
  w->rc =
      prm_loss_bt(w->scores, w->scores + n, n, &lopt, &w->loss, &w->st, w->dscores, w->dscores + n);
  if (w->rc != PRM_OK) {
    snprintf(w->msg, sizeof w->msg, "loss: %s%s", prm_last_errmsg(),
             w->rc == PRM_ERR_NONFINITE ? " (the model diverged? try a lower --lr)" : "");
    return;
  }
  if (n != T->n) {
    const float scale = (float)((double)n / (double)T->n);
    for (size_t i = 0; i < 2 * n; i++)
      w->dscores[i] *= scale;
  }
  w->rc = prm_ctx_backward(w->ctx, w->dscores, 2 * (uint64_t)n);
  if (w->rc != PRM_OK) snprintf(w->msg, sizeof w->msg, "backward: %s", prm_ctx_errmsg(w->ctx));
}

/* Thread t sums slice t of the gradients of contexts 1..N-1, in that order,
 * into context 0 and zeroes them: the sum does not depend on timing. */
static void reduce_fn(void *arg, int t) {
  trainer *T = arg;
  const uint64_t lo = T->n_grads * (uint64_t)t / (uint64_t)T->nt;
  const uint64_t hi = T->n_grads * (uint64_t)(t + 1) / (uint64_t)T->nt;
  float *g0 = T->w[0].grads;
  for (int k = 1; k < T->nt; k++) {
    if (T->w[k].n == 0) continue;
    float *gk = T->w[k].grads;
    for (uint64_t j = lo; j < hi; j++) {
      g0[j] += gk[j];
      gk[j] = 0.0f;
    }
  }
}

/* One optimizer step over pairs idx[0..n). *skipped: the optimizer refused
 * non-finite gradients (the step is dropped, training goes on). */
static int train_step(trainer *T, const size_t *idx, size_t n, double *loss, double *acc,
                      int *skipped) {
  T->idx = idx;
  T->n = n;
  *skipped = 0;
  pool_run(&T->pool, train_fn, T);
  *loss = 0.0;
  *acc = 0.0;
  for (int t = 0; t < T->nt; t++) {
    const worker *w = &T->w[t];
    if (w->rc != PRM_OK) {
      errf("training step: %s: %s", prm_status_string(w->rc), w->msg);
      return EXIT_ERR;
    }
    if (w->n == 0) continue;
    const double share = (double)w->n / (double)n;
    *loss += share * w->loss;
    *acc += share * w->st.accuracy;
  }
  if (T->nt > 1) pool_run(&T->pool, reduce_fn, T);
  const int rc = prm_optimizer_step(T->opt, T->w[0].ctx);
  if (rc == PRM_ERR_NONFINITE_GRAD) {
    errf("warning: step skipped: %s", prm_optimizer_errmsg(T->opt));
    prm_ctx_zero_grad(T->w[0].ctx);
    *skipped = 1;
    return 0;
  }
  if (rc != PRM_OK) return prm_fail(rc, "optimizer step", prm_optimizer_errmsg(T->opt));
  return 0;
}

/* Held-out scoring: chunk c of --eval-batch pairs goes to thread c mod N. */
static void eval_fn(void *arg, int t) {
  trainer *T = arg;
  worker *w = &T->w[t];
  const size_t E = (size_t)T->cfg->eval_batch;
  const size_t chunks = (T->held->n + E - 1) / E;
  w->rc = PRM_OK;
  for (size_t c = (size_t)t; c < chunks; c += (size_t)T->nt) {
    const size_t first = c * E;
    const size_t n = T->held->n - first < E ? T->held->n - first : E;
    prm_batch b;
    fill_batch(T, w, T->held, NULL, first, n, &b);
    w->rc = prm_ctx_forward(w->ictx, &b, w->scores, 2 * (uint64_t)n);
    if (w->rc != PRM_OK) {
      snprintf(w->msg, sizeof w->msg, "forward: %s", prm_ctx_errmsg(w->ictx));
      return;
    }
    memcpy(T->held_c + first, w->scores, n * sizeof(float));
    memcpy(T->held_r + first, w->scores + n, n * sizeof(float));
  }
}

/* The loss and every statistic over the whole held-out set at once (so
 * that ECE and the reward std are exact, not averages of chunks). */
static int evaluate(trainer *T, double *loss, prm_loss_stats *st) {
  pool_run(&T->pool, eval_fn, T);
  for (int t = 0; t < T->nt; t++)
    if (T->w[t].rc != PRM_OK) {
      errf("held-out evaluation: %s: %s", prm_status_string(T->w[t].rc), T->w[t].msg);
      return EXIT_ERR;
    }
  prm_loss_options lo;
  loss_options(T, T->held, T->held_margin, T->held_label, &lo);
  prm_loss_stats_init(st, PRM_LOSS_STATS_VERSION);
  const int rc = prm_loss_bt(T->held_c, T->held_r, T->held->n, &lo, loss, st, NULL, NULL);
  if (rc != PRM_OK)
    return prm_fail(rc,
                    rc == PRM_ERR_NONFINITE ? "held-out loss (the model diverged? try a lower --lr)"
                                            : "held-out loss",
                    NULL);
  return 0;
}

/* ---- the run --------------------------------------------------------------------------------- */

typedef struct runstate {
  int64_t epoch;          /* the epoch in progress (0-based); == epochs when finished */
  int64_t step_in_epoch;  /* its steps done */
  uint64_t epoch_rng;     /* data-order RNG at its start (before its shuffle) */
  uint64_t pairs_seen;    /* training pairs stepped on, whole run */
  double ep_loss, ep_acc; /* this epoch: sums of loss and accuracy times pairs */
  uint64_t ep_pairs;
  int64_t best_epoch; /* 1-based epoch of best.safetensors; 0: none yet */
  int has_best;       /* best_loss and best_acc are held-out numbers */
  double best_loss, best_acc;
  int has_last; /* the last epoch's held-out statistics */
  double last_loss;
  prm_loss_stats last_st;
  double elapsed, train_s; /* wall and stepping seconds of earlier invocations */
  int64_t skipped_steps;
  uint64_t metrics_bytes; /* metrics.csv as of this state */
} runstate;

enum { STOP_NONE, STOP_BUDGET, STOP_AFTER, STOP_SIGNAL };
static const char *const STOP_NAMES[] = {"completed", "time-budget", "stop-after", "signal"};

static volatile sig_atomic_t g_signal = 0;
static void on_signal(int s) { g_signal = s; }

typedef struct app {
  config cfg;
  unsigned char set[N_OPTS];
  char p_best[PATH_MAX], p_best_json[PATH_MAX], p_last[PATH_MAX], p_last_json[PATH_MAX];
  char p_optim[PATH_MAX], p_state[PATH_MAX], p_metrics[PATH_MAX], p_summary[PATH_MAX];
  strlist files; /* --train files then --eval files, as given (messages) */
  pairset train, held;
  input_stats in;
  pft_tokenizer *tok;
  char *spec; /* the tokenizer spec for sidecars (absolute gpt2:DIR) */
  prm_model *model;
  prm_optimizer *opt;
  trainer T;
  runstate rs;
  uint64_t data_hash;
  size_t steps_per_epoch;
  double t0;                           /* this invocation's start */
  double train_s;                      /* this invocation's seconds in steps */
  uint64_t pairs_now;                  /* this invocation's pairs */
  int tty;                             /* progress bar on stderr */
  double last_draw;                    /* of the bar */
  double win_loss, win_acc, win_pairs; /* pairs since the last progress line */
} app;

static int64_t global_step(const app *A) {
  return A->rs.epoch * (int64_t)A->steps_per_epoch + A->rs.step_in_epoch;
}

static const char *arch_name(int32_t arch) {
  switch (arch) {
  case PRM_ARCH_LINEAR: return "linear";
  case PRM_ARCH_MLP: return "mlp";
  case PRM_ARCH_GPT2: return "gpt2";
  case PRM_ARCH_LLAMA: return "llama";
  }
  return "?";
}

static json_t *stats_to_json(double loss, const prm_loss_stats *st) {
  json_t *o = json_object();
  json_object_set_new(o, "loss", json_real(loss));
  json_object_set_new(o, "accuracy", json_real(st->accuracy));
  json_object_set_new(o, "margin_mean", json_real(st->margin_mean));
  json_object_set_new(o, "reward_mean", json_real(st->reward_mean));
  json_object_set_new(o, "reward_std", json_real(st->reward_std));
  json_object_set_new(o, "brier", json_real(st->brier));
  json_object_set_new(o, "ece", json_real(st->ece));
  json_object_set_new(o, "exact_rate", json_real(st->exact_rate));
  json_object_set_new(o, "tie_prob_tied", json_real(st->tie_prob_tied));
  json_object_set_new(o, "tie_prob_untied", json_real(st->tie_prob_untied));
  json_object_set_new(o, "n_compared", json_integer((json_int_t)st->n_compared));
  json_object_set_new(o, "n_tied", json_integer((json_int_t)st->n_tied));
  return o;
}

static double jnum(const json_t *o, const char *k, int *bad) {
  const json_t *v = json_object_get(o, k);
  if (!json_is_number(v)) {
    *bad = 1;
    return 0.0;
  }
  return json_number_value(v);
}

static void stats_from_json(const json_t *o, double *loss, prm_loss_stats *st, int *bad) {
  prm_loss_stats_init(st, PRM_LOSS_STATS_VERSION);
  *loss = jnum(o, "loss", bad);
  st->loss = *loss;
  st->accuracy = jnum(o, "accuracy", bad);
  st->margin_mean = jnum(o, "margin_mean", bad);
  st->reward_mean = jnum(o, "reward_mean", bad);
  st->reward_std = jnum(o, "reward_std", bad);
  st->brier = jnum(o, "brier", bad);
  st->ece = jnum(o, "ece", bad);
  st->exact_rate = jnum(o, "exact_rate", bad);
  st->tie_prob_tied = jnum(o, "tie_prob_tied", bad);
  st->tie_prob_untied = jnum(o, "tie_prob_untied", bad);
  st->n_compared = (uint64_t)jnum(o, "n_compared", bad);
  st->n_tied = (uint64_t)jnum(o, "n_tied", bad);
}

static json_t *hex_json(uint64_t v) {
  char h[17];
  hex64(h, v);
  return json_string(h);
}

/* The "longer response wins" rule's accuracy on a set (length in bytes;
 * equal lengths count 1/2): the baseline a reward model must beat, since
 * labellers of many datasets favour longer answers. */
static double longer_wins(const pairset *s) {
  double wins = 0.0;
  for (size_t i = 0; i < s->n; i++)
    wins += s->v[i].na > s->v[i].nb ? 1.0 : (s->v[i].na == s->v[i].nb ? 0.5 : 0.0);
  return s->n > 0 ? wins / (double)s->n : 0.0;
}

static double elapsed_total(const app *A) { return A->rs.elapsed + (now_s() - A->t0); }

/* The held-out results of a run, as both state.json and summary.json hold them. */
static void put_heldout_results(json_t *o, const runstate *rs) {
  json_object_set_new(o, "best_epoch",
                      rs->best_epoch > 0 ? json_integer(rs->best_epoch) : json_null());
  json_object_set_new(o, "best_heldout_loss",
                      rs->has_best ? json_real(rs->best_loss) : json_null());
  json_object_set_new(o, "best_heldout_accuracy",
                      rs->has_best ? json_real(rs->best_acc) : json_null());
  json_object_set_new(o, "last_heldout",
                      rs->has_last ? stats_to_json(rs->last_loss, &rs->last_st) : json_null());
}

static json_t *state_to_json(const app *A) {
  const runstate *rs = &A->rs;
  uint64_t np = 0;
  const float *params = prm_model_params(A->model, &np);
  json_t *o = json_object();
  json_object_set_new(o, "format", json_string(STATE_FORMAT));
  json_object_set_new(o, "version", json_integer(STATE_VERSION));
  json_object_set_new(o, "epoch", json_integer(rs->epoch));
  json_object_set_new(o, "step_in_epoch", json_integer(rs->step_in_epoch));
  json_object_set_new(o, "steps_per_epoch", json_integer((json_int_t)A->steps_per_epoch));
  json_object_set_new(o, "global_step", json_integer(global_step(A)));
  json_object_set_new(o, "epoch_rng", hex_json(rs->epoch_rng));
  json_object_set_new(o, "optimizer_updates",
                      json_integer((json_int_t)prm_optimizer_num_updates(A->opt)));
  json_object_set_new(o, "pairs_seen", json_integer((json_int_t)rs->pairs_seen));
  json_object_set_new(o, "epoch_loss_sum", json_real(rs->ep_loss));
  json_object_set_new(o, "epoch_acc_sum", json_real(rs->ep_acc));
  json_object_set_new(o, "epoch_pairs", json_integer((json_int_t)rs->ep_pairs));
  put_heldout_results(o, rs);
  json_object_set_new(o, "elapsed_s", json_real(elapsed_total(A)));
  json_object_set_new(o, "train_s", json_real(rs->train_s + A->train_s));
  json_object_set_new(o, "skipped_steps", json_integer(rs->skipped_steps));
  json_object_set_new(o, "metrics_bytes", json_integer((json_int_t)rs->metrics_bytes));
  json_object_set_new(o, "threads", json_integer(A->cfg.threads));
  json_object_set_new(o, "data_hash", hex_json(A->data_hash));
  json_object_set_new(o, "params_hash", hex_json(hash_floats(params, np)));
  json_object_set_new(o, "train_pairs", json_integer((json_int_t)A->train.n));
  json_object_set_new(o, "heldout_pairs", json_integer((json_int_t)A->held.n));
  json_object_set_new(o, "config", config_to_json(&A->cfg));
  return o;
}

static int write_sidecar(const app *A, const char *path) {
  pft_sidecar s;
  memset(&s, 0, sizeof s);
  snprintf(s.tokenizer, sizeof s.tokenizer, "%s", A->T.ngrams ? "bytes" : A->spec);
  s.max_len = A->T.ngrams ? 0 : A->T.max_len;
  s.ngrams = A->T.ngrams;
  char err[512];
  if (pft_sidecar_write(path, &s, err, sizeof err) != 0) {
    errf("%s: %s", path, err);
    return EXIT_ERR;
  }
  return 0;
}

/* last.safetensors, its sidecar, the optimizer, then state.json: the state
 * names the step the other three belong to, and --resume checks them
 * against it (parameter hash, optimizer update count). */
static int save_last(app *A) {
  int rc = prm_model_save(A->model, A->p_last);
  if (rc != PRM_OK) return prm_fail(rc, "saving the model", prm_model_errmsg(A->model));
  if (write_sidecar(A, A->p_last_json) != 0) return EXIT_ERR;
  rc = prm_optimizer_save(A->opt, A->p_optim);
  if (rc != PRM_OK) return prm_fail(rc, "saving the optimizer state", NULL);
  json_t *st = state_to_json(A);
  rc = write_json_atomic(A->p_state, st);
  json_decref(st);
  return rc == 0 ? 0 : EXIT_ERR;
}

static int save_best(app *A) {
  const int rc = prm_model_save(A->model, A->p_best);
  if (rc != PRM_OK) return prm_fail(rc, "saving the best model", prm_model_errmsg(A->model));
  return write_sidecar(A, A->p_best_json);
}

static const char METRICS_HEADER[] =
    "epoch,step,pairs_seen,train_loss,train_accuracy,heldout_loss,heldout_accuracy,"
    "heldout_margin_mean,heldout_reward_mean,heldout_reward_std,heldout_brier,heldout_ece,"
    "heldout_exact_rate,heldout_tie_prob_tied,heldout_tie_prob_untied,heldout_n_compared,"
    "heldout_n_tied,lr,elapsed_s\n";

/* Append a line to metrics.csv (the header first when create), synced;
 * rs.metrics_bytes follows the file so that --resume can cut rows that a
 * later, unsaved part of the run wrote. */
static int metrics_append(app *A, const char *text, int create) {
  FILE *f = fopen(A->p_metrics, create ? "w" : "a");
  if (f == NULL) {
    errf("cannot open '%s': %s", A->p_metrics, strerror(errno));
    return EXIT_ERR;
  }
  if (create) fputs(METRICS_HEADER, f);
  fputs(text, f);
  struct stat st;
  const int ok = fflush(f) == 0 && fsync(fileno(f)) == 0 && fstat(fileno(f), &st) == 0;
  if (fclose(f) != 0 || !ok) {
    errf("cannot write '%s': %s", A->p_metrics, strerror(errno));
    return EXIT_ERR;
  }
  A->rs.metrics_bytes = (uint64_t)st.st_size;
  return 0;
}

static long peak_rss_bytes(void) {
  struct rusage ru;
  if (getrusage(RUSAGE_SELF, &ru) != 0) return -1;
  return ru.ru_maxrss * 1024L; /* Linux: kilobytes */
}

static int write_summary(app *A, int stop) {
  const runstate *rs = &A->rs;
  const double train_s = rs->train_s + A->train_s;
  uint64_t np = 0;
  prm_model_params(A->model, &np);
  json_t *o = json_object();
  json_object_set_new(o, "finished", json_boolean(stop == STOP_NONE));
  json_object_set_new(o, "stop_reason", json_string(STOP_NAMES[stop]));
  json_object_set_new(o, "epochs", json_integer(A->cfg.epochs));
  json_object_set_new(o, "epochs_completed", json_integer(rs->epoch));
  json_object_set_new(o, "steps", json_integer(global_step(A)));
  json_object_set_new(o, "skipped_steps", json_integer(rs->skipped_steps));
  put_heldout_results(o, rs);
  json_object_set_new(o, "train_pairs", json_integer((json_int_t)A->train.n));
  json_object_set_new(o, "heldout_pairs", json_integer((json_int_t)A->held.n));
  json_object_set_new(o, "heldout_longer_wins",
                      A->held.n > 0 ? json_real(longer_wins(&A->held)) : json_null());
  json_object_set_new(o, "pairs_seen", json_integer((json_int_t)rs->pairs_seen));
  json_object_set_new(o, "wall_time_s", json_real(elapsed_total(A)));
  json_object_set_new(o, "train_time_s", json_real(train_s));
  json_object_set_new(o, "pairs_per_s",
                      json_real(train_s > 0 ? (double)rs->pairs_seen / train_s : 0.0));
  json_object_set_new(o, "peak_rss_bytes", json_integer((json_int_t)peak_rss_bytes()));
  json_object_set_new(o, "lines_read", json_integer((json_int_t)A->in.lines));
  json_object_set_new(o, "skipped_lines", json_integer((json_int_t)A->in.bad));
  json_object_set_new(o, "blank_lines", json_integer((json_int_t)A->in.blank));
  json_object_set_new(o, "truncated_pairs", json_integer((json_int_t)A->in.truncated));
  json_t *m = json_object();
  json_object_set_new(m, "arch", json_string(arch_name(prm_model_arch(A->model))));
  json_object_set_new(m, "params", json_integer((json_int_t)np));
  json_object_set_new(m, "trainable_params",
                      json_integer((json_int_t)(np - prm_model_trainable_offset(A->model))));
  json_object_set_new(m, "input", json_string(A->T.ngrams ? "ngrams" : "tokens"));
  if (!A->T.ngrams) {
    json_object_set_new(m, "tokenizer", json_string(A->spec));
    json_object_set_new(m, "max_len", json_integer((json_int_t)A->T.max_len));
  }
  json_object_set_new(o, "model", m);
  json_object_set_new(o, "threads", json_integer(A->cfg.threads));
  const int rc = write_json_atomic(A->p_summary, o);
  json_decref(o);
  return rc == 0 ? 0 : EXIT_ERR;
}

/* ---- progress -------------------------------------------------------------------------------- */

static void fmt_duration(char *out, size_t size, double s) {
  if (!(s >= 0) || s > 1e8) {
    snprintf(out, size, "?");
    return;
  }
  const long t = (long)(s + 0.5);
  if (t >= 3600)
    snprintf(out, size, "%ldh%02ldm", t / 3600, t / 60 % 60);
  else if (t >= 60)
    snprintf(out, size, "%ldm%02lds", t / 60, t % 60);
  else
    snprintf(out, size, "%lds", t);
}

static void clear_bar(app *A) {
  if (A->tty && A->last_draw > 0) {
    fputs("\r\033[K", stderr);
    A->last_draw = 0;
  }
}

static void show_progress(app *A, int force) {
  if (A->cfg.quiet) return;
  const double now = now_s();
  const int64_t g = global_step(A);
  const int64_t total = A->cfg.epochs * (int64_t)A->steps_per_epoch;
  const double rate = A->train_s > 0 ? (double)A->pairs_now / A->train_s : 0.0;
  const double per_pair = A->pairs_now > 0 ? A->train_s / (double)A->pairs_now : 0.0;
  const double left = (double)(total - g) * (double)A->cfg.batch * per_pair;
  char eta[32];
  fmt_duration(eta, sizeof eta, A->pairs_now > 0 ? left : -1.0);
  const double ep_loss = A->rs.ep_pairs ? A->rs.ep_loss / (double)A->rs.ep_pairs : 0.0;
  const double ep_acc = A->rs.ep_pairs ? A->rs.ep_acc / (double)A->rs.ep_pairs : 0.0;
  if (A->tty) {
    if (!force && now - A->last_draw < 0.1) return;
    const int width = 24;
    const double frac =
        A->steps_per_epoch ? (double)A->rs.step_in_epoch / (double)A->steps_per_epoch : 0.0;
    char bar[32], line[512];
    const int full = (int)(frac * width);
    for (int i = 0; i < width; i++)
      bar[i] = i < full ? '=' : (i == full ? '>' : ' ');
    bar[width] = '\0';
    snprintf(line, sizeof line,
             "epoch %" PRId64 "/%" PRId64 " [%s] %3.0f%% step %" PRId64 "/%zu  %.1f pairs/s  "
             "ETA %s  loss %.4f  acc %.3f",
             A->rs.epoch + 1, A->cfg.epochs, bar, 100.0 * frac, A->rs.step_in_epoch,
             A->steps_per_epoch, rate, eta, ep_loss, ep_acc);
    /* One screen line, or the carriage return cannot redraw it. */
    struct winsize ws;
    if (ioctl(STDERR_FILENO, TIOCGWINSZ, &ws) == 0 && ws.ws_col > 1 && strlen(line) >= ws.ws_col)
      line[ws.ws_col - 1] = '\0';
    fprintf(stderr, "\r\033[K%s", line);
    fflush(stderr);
    A->last_draw = now;
    return;
  }
  if (!force && g % A->cfg.log_every != 0) return;
  if (A->win_pairs == 0) return;
  fprintf(stderr,
          "step %" PRId64 "/%" PRId64 " epoch %" PRId64 "/%" PRId64 " loss %.4f acc %.3f lr %.3g "
          "grad_norm %.3g pairs/s %.1f elapsed %.1fs eta %s\n",
          g, total, A->rs.epoch + 1, A->cfg.epochs, A->win_loss / A->win_pairs,
          A->win_acc / A->win_pairs, prm_optimizer_lr(A->opt), prm_optimizer_last_grad_norm(A->opt),
          rate, elapsed_total(A), eta);
  A->win_loss = A->win_acc = A->win_pairs = 0;
}

/* ---- an epoch's end -------------------------------------------------------------------------- */

/* Evaluate, keep the best model, append to metrics.csv, print the epoch's
 * line, move the state to the next epoch (whose data order starts from
 * next_rng) and save it. */
static int epoch_end(app *A, uint64_t next_rng) {
  runstate *rs = &A->rs;
  const int64_t e = rs->epoch + 1;
  const double tl = rs->ep_pairs ? rs->ep_loss / (double)rs->ep_pairs : 0.0;
  const double ta = rs->ep_pairs ? rs->ep_acc / (double)rs->ep_pairs : 0.0;
  const int have = A->held.n > 0;
  double hl = 0.0;
  prm_loss_stats hs;
  prm_loss_stats_init(&hs, PRM_LOSS_STATS_VERSION);
  int rc;
  if (have) {
    if ((rc = evaluate(&A->T, &hl, &hs)) != 0) return rc;
    rs->has_last = 1;
    rs->last_loss = hl;
    rs->last_st = hs;
  }
  const int best = !have || !rs->has_best || hl < rs->best_loss;
  if (best) {
    if ((rc = save_best(A)) != 0) return rc;
    rs->best_epoch = e;
    if (have) {
      rs->has_best = 1;
      rs->best_loss = hl;
      rs->best_acc = hs.accuracy;
    }
  }
  const double lr = prm_optimizer_lr(A->opt);
  char row[1024];
  int n = snprintf(row, sizeof row, "%" PRId64 ",%" PRId64 ",%" PRIu64 ",%.9g,%.9g,", e,
                   global_step(A), rs->pairs_seen, tl, ta);
  if (have)
    n += snprintf(row + n, sizeof row - (size_t)n,
                  "%.9g,%.9g,%.9g,%.9g,%.9g,%.9g,%.9g,%.9g,%.9g,%.9g,%" PRIu64 ",%" PRIu64 ",", hl,
                  hs.accuracy, hs.margin_mean, hs.reward_mean, hs.reward_std, hs.brier, hs.ece,
                  hs.exact_rate, hs.tie_prob_tied, hs.tie_prob_untied, hs.n_compared, hs.n_tied);
  else
    n += snprintf(row + n, sizeof row - (size_t)n, ",,,,,,,,,,,,");
  snprintf(row + n, sizeof row - (size_t)n, "%.9g,%.3f\n", lr, elapsed_total(A));
  if ((rc = metrics_append(A, row, 0)) != 0) return rc;

  printf("epoch %" PRId64 "/%" PRId64 " step %" PRId64 " train_loss %.4f train_acc %.4f", e,
         A->cfg.epochs, global_step(A), tl, ta);
  if (have)
    printf(" heldout_loss %.4f accuracy %.4f margin_mean %.4f reward_mean %.4f reward_std %.4f "
           "brier %.4f ece %.4f exact_rate %.4f tie_prob_tied %.4f tie_prob_untied %.4f "
           "n_compared %" PRIu64 " n_tied %" PRIu64,
           hl, hs.accuracy, hs.margin_mean, hs.reward_mean, hs.reward_std, hs.brier, hs.ece,
           hs.exact_rate, hs.tie_prob_tied, hs.tie_prob_untied, hs.n_compared, hs.n_tied);
  else
    printf(" (no held-out set)");
  printf(" elapsed %.1fs%s\n", elapsed_total(A), best && have ? " best" : "");
  fflush(stdout);

  rs->epoch++;
  rs->step_in_epoch = 0;
  rs->epoch_rng = next_rng;
  rs->ep_loss = rs->ep_acc = 0.0;
  rs->ep_pairs = 0;
  return save_last(A);
}

/* ---- setting up ------------------------------------------------------------------------------ */

static int opt_index(const char *name) {
  const optdef *d = find_opt(name, strlen(name));
  return d ? (int)(d - OPTS) : 0;
}

static int model_options(const config *c, const named_model *nm, uint64_t vocab,
                         prm_model_options *mo) {
  prm_model_options_init(mo, PRM_MODEL_OPTIONS_VERSION);
  mo->arch = nm->arch;
  mo->seed = c->seed;
  if (nm->arch == PRM_ARCH_LINEAR || nm->arch == PRM_ARCH_MLP) {
    mo->input_size = (uint64_t)c->features;
    if (nm->arch == PRM_ARCH_MLP) {
      mo->n_hidden = (uint32_t)parse_hidden(c->hidden, mo->hidden);
      static const int32_t acts[] = {PRM_ACT_GELU_TANH, PRM_ACT_RELU, PRM_ACT_TANH};
      mo->activation = acts[one_of(c->activation, ACTIVATIONS)];
    }
    return 0;
  }
  if (nm->arch == PRM_ARCH_GPT2 && (c->kv_heads != 0 || c->ffn != 0)) {
    errf("--kv-heads and --ffn are llama options");
    return -1;
  }
  mo->vocab_size = vocab;
  mo->n_embd = (uint64_t)(c->dim ? c->dim : nm->dim);
  mo->n_layer = (uint64_t)(c->layers ? c->layers : nm->layers);
  mo->n_head = (uint64_t)(c->heads ? c->heads : nm->heads);
  mo->n_ctx = (uint64_t)(c->ctx ? c->ctx : nm->ctx);
  if (nm->arch == PRM_ARCH_LLAMA) {
    mo->n_kv_head = (uint64_t)(c->kv_heads ? c->kv_heads : (c->heads ? 0 : nm->kv_heads));
    mo->n_ffn = (uint64_t)c->ffn;
  }
  return 0;
}

static int open_tokenizer(app *A) {
  if (A->tok != NULL) return 0;
  char err[1024];
  A->spec = absolute_spec(A->cfg.tokenizer);
  if (pft_tokenizer_open(&A->tok, A->spec, err, sizeof err) != 0) {
    errf("--tokenizer %s: %s", A->cfg.tokenizer, err);
    return EXIT_USAGE;
  }
  return 0;
}

/* The options given explicitly must agree with a reward-model checkpoint
 * loaded by --init. */
static int check_init(const app *A, const prm_model_options *mo) {
  const config *c = &A->cfg;
  if (c->model != NULL && find_model(c->model)->arch != mo->arch) {
    errf("--init %s holds a %s model, not --model %s", c->init, arch_name(mo->arch), c->model);
    return -1;
  }
  const struct {
    const char *opt;
    uint64_t file;
  } dims[] = {{"dim", mo->n_embd},         {"layers", mo->n_layer}, {"heads", mo->n_head},
              {"kv-heads", mo->n_kv_head}, {"ctx", mo->n_ctx},      {"ffn", mo->n_ffn},
              {"features", mo->input_size}};
  for (size_t i = 0; i < sizeof dims / sizeof dims[0]; i++) {
    const int k = opt_index(dims[i].opt);
    const int64_t v = *(const int64_t *)((const char *)c + OPTS[k].off);
    if (A->set[k] && (uint64_t)v != dims[i].file) {
      errf("--%s %" PRId64 " disagrees with --init %s (%" PRIu64 ")", dims[i].opt, v, c->init,
           dims[i].file);
      return -1;
    }
  }
  return 0;
}

/* The model: from last.safetensors (--resume), --init, or new. Then the
 * tokenizer, max_len and the learning-rate default, which depend on it. */
static int setup_model(app *A) {
  config *c = &A->cfg;
  int rc;
  if (c->resume) {
    rc = prm_model_load(&A->model, A->p_last);
    if (rc != PRM_OK) return prm_fail(rc, "--resume: loading last.safetensors", NULL);
  } else if (c->init != NULL) {
    rc = prm_model_load(&A->model, c->init);
    if (rc == PRM_OK) {
      prm_model_options mo;
      prm_model_options_init(&mo, PRM_MODEL_OPTIONS_VERSION);
      prm_model_get_options(A->model, &mo);
      if (check_init(A, &mo) != 0) return EXIT_USAGE;
      fprintf(stderr, PROG ": --init: reward model %s (%s)\n", c->init, arch_name(mo.arch));
    } else {
      /* Not one of our checkpoints: a Hugging Face language model (no head)
       * or a hub file without our metadata. */
      char first[1024];
      snprintf(first, sizeof first, "%s: %s", prm_status_string(rc), prm_last_errmsg());
      prm_pretrained_options po;
      prm_pretrained_options_init(&po, PRM_PRETRAINED_OPTIONS_VERSION);
      po.seed = c->seed;
      prm_model_options mo;
      if (c->model != NULL) {
        const named_model *nm = find_model(c->model);
        uint64_t vocab = 0;
        if (is_token_arch(nm->arch)) {
          if ((rc = open_tokenizer(A)) != 0) return rc;
          vocab = pft_tokenizer_vocab_size(A->tok);
        }
        if (model_options(c, nm, vocab, &mo) != 0) return EXIT_USAGE;
        po.config = &mo;
      }
      prm_load_report rep = PRM_LOAD_REPORT_INIT;
      rc = prm_model_load_pretrained(&A->model, c->init, &po, &rep);
      if (rc != PRM_OK) {
        errf("--init %s: not a reward model checkpoint (%s)", c->init, first);
        errf("--init %s: nor a pretrained model: %s: %s%s", c->init, prm_status_string(rc),
             prm_last_errmsg(),
             c->model == NULL ? " (give --model and its dimensions for files without them)" : "");
        return EXIT_ERR;
      }
      fprintf(stderr,
              PROG ": --init: pretrained %s: %u tensors loaded, %u initialised, %u ignored\n",
              c->init, rep.n_loaded, rep.n_initialised, rep.n_ignored);
    }
  } else {
    const named_model *nm = find_model(c->model ? c->model : "gpt2");
    uint64_t vocab = 0;
    if (is_token_arch(nm->arch)) {
      if ((rc = open_tokenizer(A)) != 0) return rc;
      vocab = pft_tokenizer_vocab_size(A->tok);
    }
    prm_model_options mo;
    if (model_options(c, nm, vocab, &mo) != 0) return EXIT_USAGE;
    rc = prm_model_new(&A->model, &mo);
    if (rc != PRM_OK) return prm_fail(rc, "creating the model", NULL);
  }
  if (!c->resume) {
    rc = prm_model_set_trainable(A->model, (int32_t)c->train_blocks);
    if (rc != PRM_OK) return prm_fail(rc, "--train-blocks", prm_model_errmsg(A->model));
  }

  prm_model_options mo;
  prm_model_options_init(&mo, PRM_MODEL_OPTIONS_VERSION);
  prm_model_get_options(A->model, &mo);
  trainer *T = &A->T;
  if (is_token_arch(mo.arch)) {
    if ((rc = open_tokenizer(A)) != 0) return rc;
    const uint32_t v = pft_tokenizer_vocab_size(A->tok);
    if (v > mo.vocab_size) {
      errf("--tokenizer %s has %u ids, the model only %" PRIu64, c->tokenizer, v, mo.vocab_size);
      return EXIT_USAGE;
    }
    T->max_len = c->max_len ? (uint64_t)c->max_len : mo.n_ctx;
    if (T->max_len > mo.n_ctx) {
      errf("--max-len %" PRIu64 " exceeds the model's context (%" PRIu64 ")", T->max_len, mo.n_ctx);
      return EXIT_USAGE;
    }
  } else {
    T->ngrams = 1;
    T->dim = (uint32_t)mo.input_size;
    if (mo.input_size > UINT32_MAX) {
      errf("the model's input size %" PRIu64 " is too large for n-gram features", mo.input_size);
      return EXIT_USAGE;
    }
  }
  if (c->lr < 0) c->lr = T->ngrams ? 1e-2 : 1e-3;
  return 0;
}

/* --split: a seeded draw of held-out pairs (the 1 - FRAC not trained on);
 * both sets keep file order. */
static int split_pairs(app *A) {
  const config *c = &A->cfg;
  if (c->eval.n > 0 || c->split >= 1.0) return 0;
  const size_t n = A->train.n;
  size_t nh = n - (size_t)llround(c->split * (double)n);
  if (nh == 0) nh = 1;
  if (nh >= n) {
    errf("--split %g of %zu pairs leaves no training pairs", c->split, n);
    return EXIT_DATA;
  }
  size_t *perm = xcalloc(n, sizeof *perm);
  unsigned char *held = xcalloc(n, 1);
  uint64_t rng = c->split_seed;
  shuffle_identity(perm, n, &rng);
  for (size_t i = 0; i < nh; i++)
    held[perm[i]] = 1;
  pairset tr = {0};
  for (size_t i = 0; i < n; i++)
    pairset_push(held[i] ? &A->held : &tr, &A->train.v[i]);
  A->held.any_margin = tr.any_margin = A->train.any_margin;
  A->held.any_label = tr.any_label = A->train.any_label;
  free(A->train.v);
  A->train = tr;
  free(perm);
  free(held);
  return 0;
}

static int setup_training(app *A) {
  const config *c = &A->cfg;
  trainer *T = &A->T;
  T->cfg = c;
  T->train = &A->train;
  T->held = &A->held;
  T->model = A->model;
  T->nt = (int)c->threads;
  T->w = xcalloc((size_t)T->nt, sizeof *T->w);
  const size_t share = ((size_t)c->batch + (size_t)T->nt - 1) / (size_t)T->nt;
  const size_t cap = share > (size_t)c->eval_batch ? share : (size_t)c->eval_batch;
  int rc;
  for (int t = 0; t < T->nt; t++) {
    worker *w = &T->w[t];
    prm_ctx_options co;
    prm_ctx_options_init(&co, PRM_CTX_OPTIONS_VERSION);
    co.max_rows = 2 * share;
    co.max_len = T->ngrams ? 0 : T->max_len;
    if ((rc = prm_ctx_new(&w->ctx, A->model, &co)) != PRM_OK)
      return prm_fail(rc, "creating a training context (lower --batch or --max-len?)", NULL);
    w->grads = prm_ctx_grads(w->ctx, &T->n_grads);
    if (A->held.n > 0) {
      co.inference = 1;
      co.max_rows = 2 * (uint64_t)c->eval_batch;
      if ((rc = prm_ctx_new(&w->ictx, A->model, &co)) != PRM_OK)
        return prm_fail(rc, "creating an inference context (lower --eval-batch?)", NULL);
    }
    w->cap = cap;
    if (T->ngrams)
      w->features = xcalloc(2 * cap * T->dim, sizeof(float));
    else
      w->tokens = xcalloc(2 * cap * T->max_len, sizeof(int32_t));
    w->lengths = xcalloc(2 * cap, sizeof(int32_t));
    w->prefix_row = xcalloc(2 * cap, sizeof(int32_t));
    w->prefix_len = xcalloc(2 * cap, sizeof(int32_t));
    w->scores = xcalloc(2 * cap, sizeof(float));
    w->dscores = xcalloc(2 * cap, sizeof(float));
    w->margin = xcalloc(cap, sizeof(float));
    w->label = xcalloc(cap, sizeof(float));
  }
  const size_t nh = A->held.n;
  T->held_c = xcalloc(nh, sizeof(float));
  T->held_r = xcalloc(nh, sizeof(float));
  T->held_margin = xcalloc(nh, sizeof(float));
  T->held_label = xcalloc(nh, sizeof(float));
  for (size_t i = 0; i < nh; i++) {
    T->held_margin[i] = A->held.v[i].margin;
    T->held_label[i] = A->held.v[i].label;
  }

  if (c->resume) {
    rc = prm_optimizer_load(&A->opt, A->model, A->p_optim);
    if (rc != PRM_OK) return prm_fail(rc, "--resume: loading the optimizer state", NULL);
  } else {
    prm_optimizer_options oo;
    prm_optimizer_options_init(&oo, PRM_OPTIMIZER_OPTIONS_VERSION);
    static const int32_t algos[] = {PRM_OPT_ADAMW, PRM_OPT_ADAM, PRM_OPT_SGD};
    static const int32_t scheds[] = {PRM_SCHED_CONSTANT, PRM_SCHED_LINEAR, PRM_SCHED_COSINE};
    oo.algorithm = algos[one_of(c->optimizer, OPTIMIZERS)];
    oo.schedule = scheds[one_of(c->schedule, SCHEDULES)];
    oo.lr = c->lr;
    oo.min_lr = c->min_lr;
    oo.weight_decay = c->weight_decay;
    oo.no_decay_1d = 1;
    oo.momentum = c->momentum;
    oo.max_grad_norm = c->clip;
    oo.warmup_steps = (uint64_t)c->warmup;
    const uint64_t total = (uint64_t)c->epochs * A->steps_per_epoch;
    if (oo.schedule != PRM_SCHED_CONSTANT) {
      oo.total_steps = total;
      if (oo.warmup_steps > total) {
        errf("--warmup %" PRId64 " exceeds the run's %" PRIu64 " steps", c->warmup, total);
        return EXIT_USAGE;
      }
    }
    rc = prm_optimizer_new(&A->opt, A->model, &oo);
    if (rc != PRM_OK) return prm_fail(rc, "creating the optimizer", prm_model_errmsg(A->model));
  }
  T->opt = A->opt;
  return 0;
}

/* --resume: the run state, checked against the files and the data. */
static int restore_state(app *A, const json_t *st) {
  runstate *rs = &A->rs;
  int bad = 0;
  rs->epoch = (int64_t)jnum(st, "epoch", &bad);
  rs->step_in_epoch = (int64_t)jnum(st, "step_in_epoch", &bad);
  const uint64_t spe = (uint64_t)jnum(st, "steps_per_epoch", &bad);
  rs->pairs_seen = (uint64_t)jnum(st, "pairs_seen", &bad);
  rs->ep_loss = jnum(st, "epoch_loss_sum", &bad);
  rs->ep_acc = jnum(st, "epoch_acc_sum", &bad);
  rs->ep_pairs = (uint64_t)jnum(st, "epoch_pairs", &bad);
  rs->elapsed = jnum(st, "elapsed_s", &bad);
  rs->train_s = jnum(st, "train_s", &bad);
  rs->skipped_steps = (int64_t)jnum(st, "skipped_steps", &bad);
  rs->metrics_bytes = (uint64_t)jnum(st, "metrics_bytes", &bad);
  const uint64_t updates = (uint64_t)jnum(st, "optimizer_updates", &bad);
  const int64_t threads = (int64_t)jnum(st, "threads", &bad);
  const json_t *be = json_object_get(st, "best_epoch");
  rs->best_epoch = json_is_integer(be) ? json_integer_value(be) : 0;
  const json_t *bl = json_object_get(st, "best_heldout_loss");
  if (json_is_number(bl)) {
    rs->has_best = 1;
    rs->best_loss = json_number_value(bl);
    rs->best_acc = jnum(st, "best_heldout_accuracy", &bad);
  }
  const json_t *last = json_object_get(st, "last_heldout");
  if (json_is_object(last)) {
    rs->has_last = 1;
    stats_from_json(last, &rs->last_loss, &rs->last_st, &bad);
  }
  uint64_t data_hash = 0, params_hash = 0;
  if (parse_hex64(json_string_value(json_object_get(st, "epoch_rng")), &rs->epoch_rng) != 0 ||
      parse_hex64(json_string_value(json_object_get(st, "data_hash")), &data_hash) != 0 ||
      parse_hex64(json_string_value(json_object_get(st, "params_hash")), &params_hash) != 0)
    bad = 1;
  if (bad || rs->epoch < 0 || rs->step_in_epoch < 0) {
    errf("--resume: %s is damaged (a field is missing or of the wrong type)", A->p_state);
    return EXIT_ERR;
  }
  if (data_hash != A->data_hash || spe != A->steps_per_epoch) {
    errf("--resume: the data differ from the run's (%s changed since the run started?); a "
         "resumed run needs the same pairs in the same order",
         A->cfg.train.n ? A->cfg.train.v[0] : "the files");
    return EXIT_DATA;
  }
  if (rs->step_in_epoch >= (int64_t)spe && spe > 0) {
    errf("--resume: %s: step_in_epoch out of range", A->p_state);
    return EXIT_ERR;
  }
  uint64_t np = 0;
  const float *params = prm_model_params(A->model, &np);
  if (hash_floats(params, np) != params_hash || prm_optimizer_num_updates(A->opt) != updates) {
    errf("--resume: %s, %s and %s do not belong together (a save was interrupted); the run "
         "cannot continue bit-exactly",
         A->p_last, A->p_optim, A->p_state);
    return EXIT_ERR;
  }
  if (threads != A->cfg.threads)
    errf("warning: --threads %" PRId64 " differs from the run's %" PRId64
         ": the continuation is not bit-exact",
         A->cfg.threads, threads);
  /* Cut metrics rows written after the state was saved. */
  struct stat sb;
  if (stat(A->p_metrics, &sb) != 0 || (uint64_t)sb.st_size < rs->metrics_bytes) {
    errf("--resume: %s is missing or shorter than the state says", A->p_metrics);
    return EXIT_ERR;
  }
  if ((uint64_t)sb.st_size > rs->metrics_bytes &&
      truncate(A->p_metrics, (off_t)rs->metrics_bytes) != 0) {
    errf("cannot truncate %s: %s", A->p_metrics, strerror(errno));
    return EXIT_ERR;
  }
  return 0;
}

/* ---- main ------------------------------------------------------------------------------------ */

static int check_stop(const app *A) {
  if (g_signal) return STOP_SIGNAL;
  if (A->cfg.stop_after > 0 && global_step(A) >= A->cfg.stop_after) return STOP_AFTER;
  if (A->cfg.time_budget > 0 && now_s() - A->t0 >= A->cfg.time_budget) return STOP_BUDGET;
  return STOP_NONE;
}

static void install_signals(void) {
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = on_signal;
  sa.sa_flags = SA_RESETHAND; /* a second signal takes the default action */
  sigemptyset(&sa.sa_mask);
  sigaction(SIGINT, &sa, NULL);
  sigaction(SIGTERM, &sa, NULL);
}

static int read_data(app *A) {
  const config *c = &A->cfg;
  const int fail = strcmp(c->on_bad_line, "fail") == 0;
  for (size_t i = 0; i < c->train.n; i++)
    strlist_add(&A->files, c->train.v[i]);
  for (size_t i = 0; i < c->eval.n; i++)
    strlist_add(&A->files, c->eval.v[i]);
  int rc;
  for (size_t i = 0; i < c->train.n; i++)
    if ((rc = read_pairs(c->train.v[i], "train on", (uint32_t)i, fail, &A->train, &A->in)) != 0)
      return rc;
  for (size_t i = 0; i < c->eval.n; i++)
    if ((rc = read_pairs(c->eval.v[i], "evaluate on", (uint32_t)(c->train.n + i), fail, &A->held,
                         &A->in)) != 0)
      return rc;
  if (A->in.bad > 0)
    errf("%" PRIu64 " bad line%s skipped (of %" PRIu64 ")", A->in.bad, A->in.bad == 1 ? "" : "s",
         A->in.lines);
  return split_pairs(A);
}

static int train_loop(app *A) {
  const config *c = &A->cfg;
  runstate *rs = &A->rs;
  size_t *order = xcalloc(A->train.n, sizeof *order);
  int rc = 0, stop = STOP_NONE;
  while (rs->epoch < c->epochs && stop == STOP_NONE) {
    uint64_t rng = rs->epoch_rng;
    shuffle_identity(order, A->train.n, &rng);
    for (;;) {
      const size_t first = (size_t)rs->step_in_epoch * (size_t)c->batch;
      const size_t left = A->train.n - first;
      const size_t n = left < (size_t)c->batch ? left : (size_t)c->batch;
      double loss, acc;
      int skipped;
      const double t1 = now_s();
      rc = train_step(&A->T, order + first, n, &loss, &acc, &skipped);
      A->train_s += now_s() - t1;
      if (rc != 0) goto done;
      rs->step_in_epoch++;
      rs->pairs_seen += n;
      A->pairs_now += n;
      rs->skipped_steps += skipped;
      rs->ep_loss += loss * (double)n;
      rs->ep_acc += acc * (double)n;
      rs->ep_pairs += n;
      A->win_loss += loss * (double)n;
      A->win_acc += acc * (double)n;
      A->win_pairs += (double)n;
      show_progress(A, 0);
      const int epoch_done = rs->step_in_epoch == (int64_t)A->steps_per_epoch;
      if (epoch_done) {
        clear_bar(A);
        if ((rc = epoch_end(A, rng)) != 0) goto done;
      }
      stop = check_stop(A);
      if (!epoch_done &&
          (stop != STOP_NONE || (c->save_every > 0 && global_step(A) % c->save_every == 0))) {
        if ((rc = save_last(A)) != 0) goto done;
      }
      if (stop != STOP_NONE || epoch_done) break;
    }
  }
  clear_bar(A);
  if ((rc = write_summary(A, stop)) != 0) goto done;
  if (stop == STOP_NONE) {
    if (rs->has_best)
      fprintf(stderr,
              PROG ": done: best epoch %" PRId64 " (heldout_loss %.4f, accuracy %.4f): %s\n",
              rs->best_epoch, rs->best_loss, rs->best_acc, A->p_best);
    else
      fprintf(stderr, PROG ": done: %s\n", A->p_best);
  } else {
    static const char *const why[] = {"", "the time budget was reached", "--stop-after reached",
                                      "interrupted"};
    fprintf(stderr,
            PROG ": stopped after step %" PRId64 " (%s); state saved: continue with "
                 "'" PROG " --resume --out %s'\n",
            global_step(A), why[stop], c->out);
    if (stop == STOP_SIGNAL) rc = 128 + (int)g_signal;
  }
done:
  free(order);
  return rc;
}

static int run(app *A) {
  config *c = &A->cfg;
  if (c->out == NULL || c->out[0] == '\0') {
    errf("--out DIR is required (see --help)");
    return EXIT_USAGE;
  }
  path_join(A->p_best, PATH_MAX, c->out, "best.safetensors");
  path_join(A->p_best_json, PATH_MAX, c->out, "best.json");
  path_join(A->p_last, PATH_MAX, c->out, "last.safetensors");
  path_join(A->p_last_json, PATH_MAX, c->out, "last.json");
  path_join(A->p_optim, PATH_MAX, c->out, "last.optim.safetensors");
  path_join(A->p_state, PATH_MAX, c->out, "state.json");
  path_join(A->p_metrics, PATH_MAX, c->out, "metrics.csv");
  path_join(A->p_summary, PATH_MAX, c->out, "summary.json");
  int rc;

  json_t *state = NULL;
  if (c->resume) {
    json_error_t je;
    state = json_load_file(A->p_state, 0, &je);
    if (state == NULL) {
      errf("--resume: cannot read %s: %s", A->p_state, je.text);
      return EXIT_USAGE;
    }
    const json_t *fmt = json_object_get(state, "format");
    const json_t *ver = json_object_get(state, "version");
    if (!json_is_string(fmt) || strcmp(json_string_value(fmt), STATE_FORMAT) != 0 ||
        !json_is_integer(ver) || json_integer_value(ver) != STATE_VERSION) {
      errf("--resume: %s is not a state file of this version of " PROG, A->p_state);
      json_decref(state);
      return EXIT_USAGE;
    }
    if (config_merge_saved(c, A->set, json_object_get(state, "config"), A->p_state) != 0) {
      json_decref(state);
      return EXIT_USAGE;
    }
    /* The run's thread count unless told otherwise: the sum of gradients
     * depends on it, so keeping it keeps the continuation bit-exact. */
    const json_t *th = json_object_get(state, "threads");
    if (!A->set[opt_index("threads")] && json_is_integer(th)) c->threads = json_integer_value(th);
  }
  if (validate(c) != 0) {
    json_decref(state);
    return EXIT_USAGE;
  }
  if (!c->resume) {
    if (make_dirs(c->out) != 0) return EXIT_ERR;
    if (access(A->p_state, F_OK) == 0 && !c->overwrite) {
      errf("%s holds a run (state.json): continue it with --resume, or start over with "
           "--overwrite",
           c->out);
      return EXIT_USAGE;
    }
    const char *old[] = {A->p_best,  A->p_best_json, A->p_last,    A->p_last_json,
                         A->p_optim, A->p_state,     A->p_summary, A->p_metrics};
    for (size_t i = 0; i < sizeof old / sizeof old[0]; i++)
      unlink(old[i]);
  }
  install_signals();

  if ((rc = read_data(A)) != 0) goto out;
  if (pool_init(&A->T.pool, (int)c->threads) != 0) {
    rc = EXIT_ERR;
    goto out;
  }
  if ((rc = setup_model(A)) != 0) goto out;
  if (!A->T.ngrams) {
    if ((rc = tokenise(&A->T.pool, &A->train, A->tok, A->T.max_len, &A->files, &A->in.truncated)) !=
            0 ||
        (rc = tokenise(&A->T.pool, &A->held, A->tok, A->T.max_len, &A->files, &A->in.truncated)) !=
            0)
      goto out;
    if (A->in.truncated > 0)
      errf("%" PRIu64 " pair%s longer than --max-len %" PRIu64 " tokens: truncated",
           A->in.truncated, A->in.truncated == 1 ? "" : "s", A->T.max_len);
  } else {
    for (size_t i = 0; i < A->train.n; i++) {
      free(A->train.v[i].prompt);
      A->train.v[i].prompt = NULL;
    }
    for (size_t i = 0; i < A->held.n; i++) {
      free(A->held.v[i].prompt);
      A->held.v[i].prompt = NULL;
    }
  }
  A->data_hash = hash_pairs(&A->held, A->T.ngrams, hash_pairs(&A->train, A->T.ngrams, FNV_INIT));
  A->steps_per_epoch = (A->train.n + (size_t)c->batch - 1) / (size_t)c->batch;
  if ((rc = setup_training(A)) != 0) goto out;
  if (c->resume) {
    if ((rc = restore_state(A, state)) != 0) goto out;
    if (A->rs.epoch >= c->epochs) {
      fprintf(stderr, PROG ": the run in %s has finished its %" PRId64 " epochs: nothing to do\n",
              c->out, c->epochs);
      goto out;
    }
  } else {
    A->rs.epoch_rng = c->seed;
    if ((rc = metrics_append(A, "", 1)) != 0) goto out;
  }

  uint64_t np = 0;
  prm_model_params(A->model, &np);
  if (A->held.n > 0)
    fprintf(stderr, PROG ": held-out baseline: the longer response wins %.4f of %zu pairs\n",
            longer_wins(&A->held), A->held.n);
  fprintf(stderr,
          PROG ": %zu training pairs, %zu held-out; %s model, %" PRIu64 " parameters (%" PRIu64
               " trainable); %zu steps of %" PRId64 " pairs per epoch, %" PRId64
               " epoch%s, %" PRId64 " thread%s%s\n",
          A->train.n, A->held.n, arch_name(prm_model_arch(A->model)), np,
          np - prm_model_trainable_offset(A->model), A->steps_per_epoch, c->batch, c->epochs,
          c->epochs == 1 ? "" : "s", c->threads, c->threads == 1 ? "" : "s",
          c->resume ? "; resuming" : "");
  if (c->resume)
    fprintf(stderr, PROG ": resuming at epoch %" PRId64 ", step %" PRId64 " of it\n",
            A->rs.epoch + 1, A->rs.step_in_epoch);
  A->tty = isatty(STDERR_FILENO) && !c->quiet;
  rc = train_loop(A);
out:
  json_decref(state);
  return rc;
}

static void app_free(app *A) {
  trainer *T = &A->T;
  pool_free(&T->pool);
  if (T->w != NULL)
    for (int t = 0; t < T->nt; t++) {
      worker *w = &T->w[t];
      prm_ctx_free(w->ctx);
      prm_ctx_free(w->ictx);
      free(w->tokens);
      free(w->lengths);
      free(w->prefix_row);
      free(w->prefix_len);
      free(w->features);
      free(w->scores);
      free(w->dscores);
      free(w->margin);
      free(w->label);
    }
  free(T->w);
  free(T->held_c);
  free(T->held_r);
  free(T->held_margin);
  free(T->held_label);
  prm_optimizer_free(A->opt);
  prm_model_free(A->model);
  pft_tokenizer_free(A->tok);
  free(A->spec);
  pairset_free(&A->train);
  pairset_free(&A->held);
  strlist_free(&A->files);
  config_free(&A->cfg);
  free(A);
}

int main(int argc, char **argv) {
  app *A = xcalloc(1, sizeof *A);
  A->t0 = now_s();
  config_defaults(&A->cfg);
  int rc;
  if (parse_args(&A->cfg, A->set, argc, argv) != 0) {
    rc = EXIT_USAGE;
  } else if (A->cfg.help) {
    print_help();
    rc = EXIT_OK;
  } else if (A->cfg.version) {
    printf(PROG " (libprefrm %s)\n", prm_version_string());
    rc = EXIT_OK;
  } else {
    rc = run(A);
  }
  app_free(A);
  return rc;
}
