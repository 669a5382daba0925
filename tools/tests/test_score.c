/*
 * test_score.c - prefrm-score end to end. Builds its own small models with the
 * public API (a gpt2 over bytes, a linear and an mlp over n-gram features),
 * runs the program on files and standard input, and checks every reward
 * against prm_ctx_forward of the same sequence, the output text byte for byte,
 * the bad-line policy, thread-count invariance and that memory stays flat on
 * a 100 000-line input.
 */
#define _DEFAULT_SOURCE /* wait4 */

// clang-format off
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>
// clang-format on

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <unistd.h>

#include "data.h"
#include "prefrm.h"

static char dir[4096];
static const char *score_bin;
/* The tokenizer the reference uses: bytes, or what a test sets. */
static pft_tokenizer *bytes_tok;
static const pft_tokenizer *ref_tok;

enum { GPT2_MAX_LEN = 48, GPT2_N_CTX = 64, LINEAR_DIM = 1000, MLP_DIM = 96 };

static char *pathof(const char *name) {
  static char buf[32][8192];
  static int k;
  k = (k + 1) % 32;
  snprintf(buf[k], sizeof buf[k], "%s/%s", dir, name);
  return buf[k];
}

static void write_text(const char *name, const char *text) {
  FILE *f = fopen(pathof(name), "wb");
  assert_non_null(f);
  fputs(text, f);
  assert_int_equal(fclose(f), 0);
}

static char *slurp(const char *path, size_t *n_out) {
  FILE *f = fopen(path, "rb");
  assert_non_null(f);
  size_t cap = 1 << 16, n = 0;
  char *s = malloc(cap);
  assert_non_null(s);
  for (size_t k; (k = fread(s + n, 1, cap - n - 1, f)) > 0;) {
    n += k;
    if (cap - n - 1 == 0) {
      cap *= 2;
      s = realloc(s, cap);
      assert_non_null(s);
    }
  }
  fclose(f);
  s[n] = '\0';
  if (n_out) *n_out = n;
  return s;
}

typedef struct run_result {
  int status; /* exit status, or 128 + signal */
  char *out;  /* standard output */
  char *err;  /* standard error */
  long maxrss_kb;
} run_result;

/* Run prefrm-score with args (NULL-terminated), standard input from stdin_name
 * (NULL: /dev/null), standard output to out_path (NULL: a file in dir, read
 * back into r->out). */
static void run_score(run_result *r, const char *const *args, const char *stdin_name,
                      const char *out_path) {
  char *argv[64];
  int n = 0;
  argv[n++] = (char *)score_bin;
  for (int i = 0; args[i]; i++)
    argv[n++] = (char *)args[i];
  argv[n] = NULL;
  char out_file[8192], err_file[8192];
  if (out_path)
    snprintf(out_file, sizeof out_file, "%s", out_path);
  else
    snprintf(out_file, sizeof out_file, "%s/run.out", dir);
  snprintf(err_file, sizeof err_file, "%s/run.err", dir);
  fflush(NULL);
  pid_t pid = fork();
  assert_true(pid >= 0);
  if (pid == 0) {
    char in_file[8192];
    if (stdin_name) snprintf(in_file, sizeof in_file, "%s/%s", dir, stdin_name);
    int in = open(stdin_name ? in_file : "/dev/null", O_RDONLY);
    int out = open(out_file, O_WRONLY | O_CREAT | O_TRUNC, 0666);
    int err = open(err_file, O_WRONLY | O_CREAT | O_TRUNC, 0666);
    if (in < 0 || out < 0 || err < 0) _exit(126);
    dup2(in, 0);
    dup2(out, 1);
    dup2(err, 2);
    execv(score_bin, argv);
    _exit(127);
  }
  int st;
  struct rusage ru;
  assert_int_equal(wait4(pid, &st, 0, &ru), pid);
  r->status = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
  r->maxrss_kb = ru.ru_maxrss;
  r->out = out_path ? NULL : slurp(out_file, NULL);
  r->err = slurp(err_file, NULL);
}

static void run_free(run_result *r) {
  free(r->out);
  free(r->err);
}

#define EXPECT_CONTAINS(hay, needle)                                                               \
  do {                                                                                             \
    if (!strstr((hay), (needle))) fail_msg("\"%s\" does not contain \"%s\"", (hay), (needle));     \
  } while (0)

/* assert_string_equal for long multi-line texts: names the first line that differs */
static void expect_text(const char *got, const char *want) {
  if (strcmp(got, want) == 0) return;
  size_t line = 1;
  while (*got && *got == *want) {
    line += *got == '\n';
    got++;
    want++;
  }
  while (line > 1 && got[-1] != '\n')
    got--, want--;
  fail_msg("output line %zu differs:\n got: %.*s\nwant: %.*s", line, (int)strcspn(got, "\n"), got,
           (int)strcspn(want, "\n"), want);
}

/* The same lines and fields, the scores within 1e-5 (1 + |want|). A reward
 * is the head's dot product with a LayerNorm output of O(1) elements, so
 * its rounding error is of the order of those terms, not of the reward: a
 * reward near 0 moves by ~1e-6 with the BLAS's blocking (BLIS against
 * OpenBLAS) or with a shared prefix, while a wrong prefix moves it by 1e-2
 * or more. */
static void expect_close(const char *a, const char *b) {
  for (size_t line = 1; *a || *b; line++) {
    json_error_t e;
    const char *ea = strchr(a, '\n'), *eb = strchr(b, '\n');
    if (!ea || !eb) fail_msg("line %zu: one output ends early", line);
    json_t *ja = json_loadb(a, (size_t)(ea - a), 0, &e);
    json_t *jb = json_loadb(b, (size_t)(eb - b), 0, &e);
    assert_non_null(ja);
    assert_non_null(jb);
    assert_int_equal(json_object_size(ja), json_object_size(jb));
    const char *k;
    json_t *v;
    json_object_foreach(jb, k, v) {
      json_t *w = json_object_get(ja, k);
      if (!w) fail_msg("line %zu: no \"%s\"", line, k);
      if (json_is_real(v) && (!strncmp(k, "reward", 6) || !strcmp(k, "p_chosen"))) {
        double x = json_real_value(w), y = json_real_value(v);
        if (!(fabs(x - y) <= 1e-5 * (1.0 + fabs(y))))
          fail_msg("line %zu: \"%s\" is %.9g, want %.9g", line, k, x, y);
      } else if (!json_equal(w, v)) {
        fail_msg("line %zu: \"%s\" differs", line, k);
      }
    }
    json_decref(ja);
    json_decref(jb);
    a = ea + 1;
    b = eb + 1;
  }
}

/* ---- models and the reference scores ------------------------------------------------------ */

static void save_model(prm_model *m, const char *name) {
  assert_int_equal(prm_model_save(m, pathof(name)), PRM_OK);
}

static void save_sidecar(const char *ckpt, const char *tokenizer, uint64_t max_len, int ngrams) {
  pft_sidecar s;
  memset(&s, 0, sizeof s);
  strcpy(s.tokenizer, tokenizer);
  s.max_len = max_len;
  s.ngrams = ngrams;
  char path[8192], err[512];
  assert_int_equal(pft_sidecar_path(pathof(ckpt), path, sizeof path), 0);
  assert_int_equal(pft_sidecar_write(path, &s, err, sizeof err), 0);
}

static prm_model *load(const char *name) {
  prm_model *m;
  assert_int_equal(prm_model_load(&m, pathof(name)), PRM_OK);
  return m;
}

static int setup(void **state) {
  (void)state;
  score_bin = getenv("PREFRM_SCORE");
  const char *base = getenv("PFT_TEST_TMPDIR");
  if (!base || !*base) base = PFT_TEST_TMPDIR;
  snprintf(dir, sizeof dir, "%s/test_score.%ld", base, (long)getpid());
  if (mkdir(dir, 0777) && errno != EEXIST) return -1;
  char err[256];
  if (pft_tokenizer_open(&bytes_tok, "bytes", err, sizeof err)) return -1;
  ref_tok = bytes_tok;

  prm_model_options o;
  prm_model_options_init(&o, PRM_MODEL_OPTIONS_VERSION);
  o.arch = PRM_ARCH_GPT2;
  o.seed = 7;
  o.vocab_size = 256;
  o.n_ctx = GPT2_N_CTX;
  o.n_embd = 16;
  o.n_layer = 2;
  o.n_head = 2;
  prm_model *m;
  if (prm_model_new(&m, &o)) return -1;
  /* GPT-2's 0.02 initialisation gives rewards near 0 that hardly depend on
   * the text: spread the head so that rewards differ visibly */
  float *w = prm_model_params(m, NULL);
  for (uint32_t t = 0; t < prm_model_num_tensors(m); t++) {
    const char *name;
    uint64_t off, shape[2];
    uint32_t nd;
    prm_model_tensor_info(m, t, &name, &off, &nd, shape);
    if (strcmp(name, "score.weight") == 0)
      for (uint64_t i = 0; i < shape[0] * shape[1]; i++)
        w[off + i] *= 50.0f;
  }
  save_model(m, "gpt2.safetensors");
  save_sidecar("gpt2.safetensors", "bytes", GPT2_MAX_LEN, 0);
  save_model(m, "gpt2_nosidecar.safetensors");
  prm_model_free(m);

  prm_model_options_init(&o, PRM_MODEL_OPTIONS_VERSION);
  o.arch = PRM_ARCH_LINEAR;
  o.seed = 3;
  o.input_size = LINEAR_DIM;
  if (prm_model_new(&m, &o)) return -1;
  save_model(m, "linear.safetensors");
  save_sidecar("linear.safetensors", "bytes", 0, 1);
  /* the same with reward statistics, for --normalise */
  prm_reward_moments mom;
  prm_reward_moments_init(&mom, PRM_REWARD_MOMENTS_VERSION);
  const float rs[4] = {-0.5f, 0.25f, 1.0f, 0.125f};
  prm_reward_moments_add(&mom, rs, 4);
  if (prm_model_set_reward_norm(m, &mom)) return -1;
  save_model(m, "linear_norm.safetensors");
  prm_model_free(m);

  prm_model_options_init(&o, PRM_MODEL_OPTIONS_VERSION);
  o.arch = PRM_ARCH_MLP;
  o.seed = 4;
  o.input_size = MLP_DIM;
  o.n_hidden = 1;
  o.hidden[0] = 8;
  if (prm_model_new(&m, &o)) return -1;
  save_model(m, "mlp.safetensors"); /* no sidecar: n-grams by default */
  prm_model_free(m);
  return 0;
}

static int teardown(void **state) {
  (void)state;
  pft_tokenizer_free(bytes_tok);
  DIR *d = opendir(dir);
  if (d) {
    struct dirent *e;
    while ((e = readdir(d)))
      if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..")) unlink(pathof(e->d_name));
    closedir(d);
  }
  unlink(pathof("bpe/vocab.json"));
  unlink(pathof("bpe/merges.txt"));
  rmdir(pathof("bpe"));
  rmdir(dir);
  return 0;
}

static void need_binary(void) {
  if (!score_bin || access(score_bin, X_OK) != 0) {
    print_message("PREFRM_SCORE (%s) is not an executable: prefrm-score was not built\n",
                  score_bin ? score_bin : "unset");
    skip();
  }
}

/* The reward of one token sequence alone (a batch of one row). */
static float forward_tokens(const prm_model *m, const pft_ids *ids) {
  prm_ctx_options co;
  prm_ctx_options_init(&co, PRM_CTX_OPTIONS_VERSION);
  co.inference = 1;
  co.max_rows = 1;
  prm_ctx *ctx;
  assert_int_equal(prm_ctx_new(&ctx, m, &co), PRM_OK);
  prm_batch b;
  prm_batch_init(&b, PRM_BATCH_VERSION);
  int32_t len = (int32_t)ids->n;
  b.n = 1;
  b.tokens = ids->v;
  b.token_stride = ids->n;
  b.lengths = &len;
  float s;
  assert_int_equal(prm_ctx_forward(ctx, &b, &s, 1), PRM_OK);
  prm_ctx_free(ctx);
  return s;
}

static float forward_features(const prm_model *m, const char *text, size_t len) {
  uint32_t d = (uint32_t)prm_model_input_size(m);
  float *x = malloc(d * sizeof *x);
  assert_non_null(x);
  pft_ngram_features(text, len, x, d);
  prm_ctx_options co;
  prm_ctx_options_init(&co, PRM_CTX_OPTIONS_VERSION);
  co.inference = 1;
  co.max_rows = 1;
  prm_ctx *ctx;
  assert_int_equal(prm_ctx_new(&ctx, m, &co), PRM_OK);
  prm_batch b;
  prm_batch_init(&b, PRM_BATCH_VERSION);
  b.n = 1;
  b.features = x;
  b.n_features = d;
  float s;
  assert_int_equal(prm_ctx_forward(ctx, &b, &s, 1), PRM_OK);
  prm_ctx_free(ctx);
  free(x);
  return s;
}

static void encode(const char *s, size_t n, pft_ids *out) {
  out->n = 0;
  assert_int_equal(pft_encode(ref_tok, s, n, out), 0);
}

/* The rewards of a record as prefrm-score computes them: r[0] (response or
 * chosen), r[1] (rejected). max_len 0: a feature model. */
static void reference(const prm_model *m, const pft_record *rec, size_t max_len, float r[2]) {
  if (max_len == 0) {
    r[0] = forward_features(m, rec->a, rec->a_len);
    if (rec->b) r[1] = forward_features(m, rec->b, rec->b_len);
    return;
  }
  pft_ids p = {0}, c = {0}, x = {0}, oc = {0}, orr = {0};
  encode(rec->prompt, rec->prompt_len, &p);
  encode(rec->a, rec->a_len, &c);
  if (rec->b) encode(rec->b, rec->b_len, &x);
  assert_int_equal(
      pft_build_pair(p.v, p.n, c.v, c.n, rec->b ? x.v : NULL, x.n, max_len, &oc, &orr, NULL), 0);
  r[0] = forward_tokens(m, &oc);
  if (rec->b) r[1] = forward_tokens(m, &orr);
  free(p.v);
  free(c.v);
  free(x.v);
  free(oc.v);
  free(orr.v);
}

static float sigmoid_f(float a, float b) {
  return (float)(1.0 / (1.0 + exp(-((double)a - (double)b))));
}

/* What prefrm-score must print for an input line without the output fields
 * and without blanks before its closing brace. */
static char *expected_line(const prm_model *m, const char *line, size_t max_len) {
  pft_record rec;
  char err[512];
  if (pft_parse_record(line, strlen(line), PFT_WANT_ANY, &rec, err, sizeof err))
    fail_msg("test input is bad: %s", err);
  float r[2] = {0.0f, 0.0f};
  reference(m, &rec, max_len, r);
  char fields[256];
  if (rec.kind == PFT_REC_PAIR)
    snprintf(fields, sizeof fields,
             ", \"reward_chosen\": %.9g, \"reward_rejected\": %.9g, \"p_chosen\": %.9g",
             (double)r[0], (double)r[1], (double)sigmoid_f(r[0], r[1]));
  else
    snprintf(fields, sizeof fields, ", \"reward\": %.9g", (double)r[0]);
  pft_record_free(&rec);
  const char *brace = strrchr(line, '}');
  assert_non_null(brace);
  size_t k = (size_t)(brace - line);
  char *out = malloc(strlen(line) + strlen(fields) + 2);
  assert_non_null(out);
  sprintf(out, "%.*s%s%s\n", (int)k, line, fields, line + k);
  return out;
}

/* ---- inputs ---------------------------------------------------------------------------------- */

/* Singles and pairs of many lengths: prompts beyond max_len 48 (cut from the
 * start), a response alone beyond it, UTF-8, escapes, extra fields in any
 * place, numbers that jansson would re-spell. */
static const char *const mixed[] = {
    "{\"prompt\": \"Hi\", \"response\": \"Hello there!\"}",
    "{\"id\": 1, \"prompt\": \"What is 2+2?\", \"chosen\": \"4\", \"rejected\": \"5\", "
    "\"margin\": 0.1}",
    "{\"prompt\": \"\", \"response\": \"caf\\u00e9 \xe2\x82\xac \\\"quoted\\\" \\n newline\"}",
    "{\"prompt\": \"A very long prompt that goes on and on well beyond the model limit of "
    "forty-eight tokens\", \"chosen\": \"short\", \"rejected\": \"a somewhat longer answer\"}",
    "{\"prompt\": \"p\", \"response\": \"a single response that alone is longer than the maximum "
    "length of forty-eight bytes\", \"meta\": {\"x\": [1, 2.50, 1e3]}}",
    "{\"score_hint\":0.1,\"prompt\":\"compact\",\"chosen\":\"yes\",\"rejected\":\"no\","
    "\"label\":1}",
    "{\"prompt\": \"Q\", \"chosen\": \"same\", \"rejected\": \"same\"}",
    "{\"prompt\": \"x\", \"response\": \"y\"}",
};

static char *join_lines(const char *const *lines, size_t n, const char *eol) {
  size_t total = 1;
  for (size_t i = 0; i < n; i++)
    total += strlen(lines[i]) + strlen(eol);
  char *s = malloc(total);
  assert_non_null(s);
  s[0] = '\0';
  for (size_t i = 0; i < n; i++) {
    strcat(s, lines[i]);
    strcat(s, eol);
  }
  return s;
}

static char *expected_all(const prm_model *m, const char *const *lines, size_t n, size_t max_len) {
  char *all = calloc(1, 1);
  size_t len = 0;
  for (size_t i = 0; i < n; i++) {
    char *e = expected_line(m, lines[i], max_len);
    all = realloc(all, len + strlen(e) + 1);
    strcpy(all + len, e);
    len += strlen(e);
    free(e);
  }
  return all;
}

#define N_MIXED (sizeof mixed / sizeof *mixed)

/* ---- tests ----------------------------------------------------------------------------------- */

static void test_gpt2_exact(void **state) {
  (void)state;
  need_binary();
  char *in = join_lines(mixed, N_MIXED, "\n");
  write_text("mixed.jsonl", in);
  free(in);
  prm_model *m = load("gpt2.safetensors");
  char *want = expected_all(m, mixed, N_MIXED, GPT2_MAX_LEN);
  /* a batch of one row is the reference computation itself: bit-equal */
  run_result r;
  run_score(&r,
            (const char *[]){"--model", pathof("gpt2.safetensors"), "--batch", "1",
                             pathof("mixed.jsonl"), NULL},
            NULL, NULL);
  assert_int_equal(r.status, 0);
  expect_text(r.out, want);
  /* the three truncated lines are counted */
  EXPECT_CONTAINS(r.err, "2 lines were longer than max_len 48 tokens, truncated");
  run_free(&r);

  /* sorted batches of several lengths: the same text, scores within float
   * noise (a row's GEMM result may change in the last bits with the batch) */
  run_score(&r,
            (const char *[]){"--model", pathof("gpt2.safetensors"), pathof("mixed.jsonl"), NULL},
            NULL, NULL);
  assert_int_equal(r.status, 0);
  expect_close(r.out, want);
  run_free(&r);
  free(want);
  prm_model_free(m);
}

static void test_threads_and_chunks(void **state) {
  (void)state;
  need_binary();
  /* 300 lines of many lengths, over chunks of 37 lines and batches of 5 */
  enum { N = 300 };
  char *lines[N];
  for (int i = 0; i < N; i++) {
    char p[128], c[128];
    int np = (i * 7) % 61, nc = 1 + (i * 13) % 53;
    for (int k = 0; k < np; k++)
      p[k] = (char)('a' + (i + k) % 26);
    p[np] = '\0';
    for (int k = 0; k < nc; k++)
      c[k] = (char)('A' + (i * 3 + k) % 26);
    c[nc] = '\0';
    lines[i] = malloc(512);
    if (i % 3)
      snprintf(lines[i], 512, "{\"i\": %d, \"prompt\": \"%s\", \"response\": \"%s\"}", i, p, c);
    else
      snprintf(lines[i], 512, "{\"prompt\": \"%s\", \"chosen\": \"%s\", \"rejected\": \"%s!\"}", p,
               c, c + nc / 2);
  }
  char *in = join_lines((const char *const *)lines, N, "\n");
  write_text("threads.jsonl", in);
  free(in);
  char *first = NULL;
  const char *threads[] = {"1", "2", "3"};
  for (int t = 0; t < 3; t++) {
    run_result r;
    run_score(&r,
              (const char *[]){"--model", pathof("gpt2.safetensors"), "--threads", threads[t],
                               "--chunk", "37", "--batch", "5", pathof("threads.jsonl"), NULL},
              NULL, NULL);
    assert_int_equal(r.status, 0);
    if (!first) {
      first = r.out;
      r.out = NULL;
      /* input order, and every line there */
      char *s = first;
      for (int i = 0; i < N; i++) {
        char *e = strchr(s, '\n');
        assert_non_null(e);
        size_t k = strlen(lines[i]) - 1; /* up to the closing brace */
        assert_memory_equal(s, lines[i], k);
        s = e + 1;
      }
      assert_int_equal(*s, '\0');
    } else {
      expect_text(r.out, first);
    }
    run_free(&r);
  }
  /* the feature model too */
  run_result r1, r3;
  run_score(&r1,
            (const char *[]){"--model", pathof("linear.safetensors"), "--chunk", "10",
                             pathof("threads.jsonl"), NULL},
            NULL, NULL);
  run_score(&r3,
            (const char *[]){"--model", pathof("linear.safetensors"), "--chunk", "10", "--threads",
                             "3", "--batch", "4", pathof("threads.jsonl"), NULL},
            NULL, NULL);
  assert_int_equal(r1.status, 0);
  assert_int_equal(r3.status, 0);
  expect_text(r1.out, r3.out);
  run_free(&r1);
  run_free(&r3);
  free(first);
  for (int i = 0; i < N; i++)
    free(lines[i]);
}

static void test_feature_models(void **state) {
  (void)state;
  need_binary();
  char *in = join_lines(mixed, N_MIXED, "\n");
  write_text("mixed.jsonl", in);
  free(in);
  /* linear with a sidecar, mlp without (n-gram features of the model's input size) */
  const char *models[] = {"linear.safetensors", "mlp.safetensors"};
  for (int k = 0; k < 2; k++) {
    prm_model *m = load(models[k]);
    char *want = expected_all(m, mixed, N_MIXED, 0);
    run_result r;
    run_score(
        &r,
        (const char *[]){"--model", pathof(models[k]), "--batch", "1", pathof("mixed.jsonl"), NULL},
        NULL, NULL);
    assert_int_equal(r.status, 0);
    expect_text(r.out, want);
    assert_string_equal(r.err, ""); /* nothing truncated, nothing skipped */
    run_free(&r);
    run_score(
        &r,
        (const char *[]){"--model", pathof(models[k]), "--batch", "3", pathof("mixed.jsonl"), NULL},
        NULL, NULL);
    assert_int_equal(r.status, 0);
    expect_close(r.out, want);
    run_free(&r);
    free(want);
    prm_model_free(m);
  }
}

static void test_normalise(void **state) {
  (void)state;
  need_binary();
  write_text("one.jsonl", "{\"prompt\": \"p\", \"chosen\": \"good\", \"rejected\": \"bad\"}\n");
  prm_model *m = load("linear_norm.safetensors");
  float r[2] = {forward_features(m, "good", 4), forward_features(m, "bad", 3)};
  float n[2] = {r[0], r[1]};
  assert_int_equal(prm_model_normalise_rewards(m, n, 2), PRM_OK);
  char want[512];
  snprintf(want, sizeof want,
           "{\"prompt\": \"p\", \"chosen\": \"good\", \"rejected\": \"bad\", \"reward_chosen\": "
           "%.9g, \"reward_rejected\": %.9g, \"p_chosen\": %.9g}\n",
           (double)n[0], (double)n[1], (double)sigmoid_f(r[0], r[1]));
  prm_model_free(m);
  /* linear_norm has no sidecar: n-grams of the model's input size, as linear */
  run_result res;
  run_score(&res,
            (const char *[]){"--model", pathof("linear_norm.safetensors"), "--normalise",
                             pathof("one.jsonl"), NULL},
            NULL, NULL);
  assert_int_equal(res.status, 0);
  expect_text(res.out, want);
  run_free(&res);
  run_score(&res,
            (const char *[]){"--model", pathof("linear.safetensors"), "--normalise",
                             pathof("one.jsonl"), NULL},
            NULL, NULL);
  assert_int_equal(res.status, 1);
  EXPECT_CONTAINS(res.err, "no reward normalisation statistics");
  run_free(&res);
}

static void test_existing_fields_and_text(void **state) {
  (void)state;
  need_binary();
  prm_model *m = load("linear.safetensors");
  float a = forward_features(m, "r", 1), c = forward_features(m, "c", 1),
        x = forward_features(m, "x", 1);
  prm_model_free(m);
  /* a line that was scored before gets fresh values, re-serialised by
   * jansson without the old ones (order kept); blanks before the brace, a CRLF
   * and trailing blanks; blank lines are passed over */
  write_text("existing.jsonl",
             "{\"reward\": 99, \"prompt\": \"p\", \"response\": \"r\", \"z\": 0.1}\r\n"
             "   \r\n"
             "\n"
             "{\"prompt\": \"p\", \"chosen\": \"c\", \"p_chosen\": 1, \"rejected\": \"x\"}\n"
             "  {\"prompt\": \"p\",  \"response\": \"r\" }  \r\n"
             "{\"prompt\": \"p\", \"response\": \"r\"}");
  char want[2048];
  snprintf(
      want, sizeof want,
      "{\"prompt\": \"p\", \"response\": \"r\", \"z\": 0.10000000000000001, \"reward\": %.9g}\n"
      "{\"prompt\": \"p\", \"chosen\": \"c\", \"rejected\": \"x\", \"reward_chosen\": %.9g, "
      "\"reward_rejected\": %.9g, \"p_chosen\": %.9g}\n"
      "  {\"prompt\": \"p\",  \"response\": \"r\", \"reward\": %.9g }  \n"
      "{\"prompt\": \"p\", \"response\": \"r\", \"reward\": %.9g}\n",
      (double)a, (double)c, (double)x, (double)sigmoid_f(c, x), (double)a, (double)a);
  run_result r;
  run_score(
      &r, (const char *[]){"--model", pathof("linear.safetensors"), pathof("existing.jsonl"), NULL},
      NULL, NULL);
  assert_int_equal(r.status, 0);
  expect_text(r.out, want);
  run_free(&r);
}

/* Good lines 1, 3, 9; bad lines 2 and 4-8 and 10. */
static const char bad_input[] =
    "{\"prompt\": \"p\", \"response\": \"one\"}\n"
    "{\"prompt\": \"p\", \"response\": \"two\",}\n"
    "{\"prompt\": \"p\", \"response\": \"three\"}\n"
    "{\"prompt\": \"p\", \"chosen\": \"c\"}\n"
    "{\"prompt\": [\"p\"], \"response\": \"r\"}\n"
    "{\"prompt\": \"p\", \"response\": \"\"}\n"
    "{\"prompt\": \"p\", \"chosen\": \"c\", \"rejected\": \"x\", \"label\": 2}\n"
    "[\"not\", \"an\", \"object\"]\n"
    "{\"prompt\": \"p\", \"chosen\": \"c\", \"rejected\": \"x\"}\n"
    "{\"prompt\": \"p\", \"chosen\": \"c\", \"rejected\": \"x\", \"response\": \"r\"}";

static void check_bad_reports(const char *err, const char *name, int skip) {
  char buf[1024];
  static const struct {
    int line;
    const char *msg;
  } bad[] = {
      {2, "invalid JSON at column 35: string or '}' expected near '}'"},
      {4, "missing field \"rejected\""},
      {5, "field \"prompt\" must be a string, not an array"},
      {6, "field \"response\" is empty"},
      {7, "field \"label\" must be in [0, 1], got 2"},
      {8, "not a JSON object (the line holds an array)"},
      {10, "both \"response\" and \"chosen\"/\"rejected\""},
  };
  for (size_t i = 0; i < (skip ? sizeof bad / sizeof *bad : 1); i++) {
    snprintf(buf, sizeof buf, "%s:%d: %s", name, bad[i].line, bad[i].msg);
    EXPECT_CONTAINS(err, buf);
  }
}

static void test_bad_lines(void **state) {
  (void)state;
  need_binary();
  write_text("bad.jsonl", bad_input);
  prm_model *m = load("linear.safetensors");
  char *good[3] = {
      expected_line(m, "{\"prompt\": \"p\", \"response\": \"one\"}", 0),
      expected_line(m, "{\"prompt\": \"p\", \"response\": \"three\"}", 0),
      expected_line(m, "{\"prompt\": \"p\", \"chosen\": \"c\", \"rejected\": \"x\"}", 0)};
  prm_model_free(m);

  /* fail (the default): the lines before the first bad one, then status 3 */
  run_result r;
  run_score(&r,
            (const char *[]){"--model", pathof("linear.safetensors"), pathof("bad.jsonl"), NULL},
            NULL, NULL);
  assert_int_equal(r.status, 3);
  assert_string_equal(r.out, good[0]);
  check_bad_reports(r.err, pathof("bad.jsonl"), 0);
  assert_null(strstr(r.err, ":4:"));
  run_free(&r);

  /* skip: every bad line reported, left out, counted; status 0. Small
   * chunks so that bad lines fall in several of them. */
  const char *chunks[] = {"4096", "3"};
  for (int k = 0; k < 2; k++) {
    run_score(&r,
              (const char *[]){"--model", pathof("linear.safetensors"), "--on-bad-line", "skip",
                               "--chunk", chunks[k], "--threads", "2", pathof("bad.jsonl"), NULL},
              NULL, NULL);
    assert_int_equal(r.status, 0);
    char want[2048];
    snprintf(want, sizeof want, "%s%s%s", good[0], good[1], good[2]);
    expect_text(r.out, want);
    check_bad_reports(r.err, pathof("bad.jsonl"), 1);
    EXPECT_CONTAINS(r.err, "prefrm-score: skipped 7 bad lines, scored 3\n");
    run_free(&r);
  }

  /* standard input: the reports name "<stdin>" */
  run_score(&r, (const char *[]){"--model", pathof("gpt2.safetensors"), "--on-bad-line=skip", NULL},
            "bad.jsonl", NULL);
  assert_int_equal(r.status, 0);
  check_bad_reports(r.err, "<stdin>", 1);
  run_free(&r);
  for (int i = 0; i < 3; i++)
    free(good[i]);
}

static void test_stdin_and_empty(void **state) {
  (void)state;
  need_binary();
  char *in = join_lines(mixed, N_MIXED, "\r\n");
  write_text("mixed_crlf.jsonl", in);
  free(in);
  prm_model *m = load("gpt2.safetensors");
  char *want = expected_all(m, mixed, N_MIXED, GPT2_MAX_LEN);
  prm_model_free(m);
  /* no FILE, and "-" */
  run_result r;
  run_score(&r, (const char *[]){"--model", pathof("gpt2.safetensors"), "--batch", "1", NULL},
            "mixed_crlf.jsonl", NULL);
  assert_int_equal(r.status, 0);
  expect_text(r.out, want);
  run_free(&r);
  run_score(&r, (const char *[]){"--model", pathof("gpt2.safetensors"), "--batch", "1", "-", NULL},
            "mixed_crlf.jsonl", NULL);
  assert_int_equal(r.status, 0);
  expect_text(r.out, want);
  run_free(&r);
  free(want);

  /* empty inputs: no output, no message, status 0 */
  write_text("empty.jsonl", "");
  write_text("blank.jsonl", "\n  \n\t\r\n");
  const char *files[] = {"empty.jsonl", "blank.jsonl"};
  for (int k = 0; k < 2; k++) {
    run_score(&r, (const char *[]){"--model", pathof("gpt2.safetensors"), pathof(files[k]), NULL},
              NULL, NULL);
    assert_int_equal(r.status, 0);
    assert_string_equal(r.out, "");
    assert_string_equal(r.err, "");
    run_free(&r);
  }
  run_score(&r, (const char *[]){"--model", pathof("linear.safetensors"), NULL}, NULL, NULL);
  assert_int_equal(r.status, 0);
  assert_string_equal(r.out, "");
  run_free(&r);
}

static void test_sidecar_and_overrides(void **state) {
  (void)state;
  need_binary();
  const char *line = "{\"prompt\": \"A prompt of quite some length, longer than sixteen\", "
                     "\"response\": \"and its answer\"}";
  write_text("one.jsonl", line);
  prm_model *m = load("gpt2.safetensors");
  /* no sidecar: the model's n_ctx (64); --max-len overrides the sidecar */
  const struct {
    const char *model, *max_len;
    size_t want_len;
  } cases[] = {{"gpt2_nosidecar.safetensors", NULL, GPT2_N_CTX},
               {"gpt2.safetensors", NULL, GPT2_MAX_LEN},
               {"gpt2.safetensors", "16", 16},
               {"gpt2_nosidecar.safetensors", "20", 20}};
  for (size_t k = 0; k < sizeof cases / sizeof *cases; k++) {
    char *want = expected_line(m, line, cases[k].want_len);
    run_result r;
    if (cases[k].max_len)
      run_score(&r,
                (const char *[]){"--model", pathof(cases[k].model), "--max-len", cases[k].max_len,
                                 "--tokenizer", "bytes", pathof("one.jsonl"), NULL},
                NULL, NULL);
    else
      run_score(&r, (const char *[]){"--model", pathof(cases[k].model), pathof("one.jsonl"), NULL},
                NULL, NULL);
    assert_int_equal(r.status, 0);
    expect_text(r.out, want);
    run_free(&r);
    free(want);
  }
  prm_model_free(m);

  /* sidecars that do not fit the model, or are broken */
  write_text("gpt2_nosidecar.json", "{\"tokenizer\": \"bytes\", \"max_len\": 100, \"input\": "
                                    "\"tokens\"}");
  run_result r;
  run_score(
      &r,
      (const char *[]){"--model", pathof("gpt2_nosidecar.safetensors"), pathof("one.jsonl"), NULL},
      NULL, NULL);
  assert_int_equal(r.status, 1);
  EXPECT_CONTAINS(r.err, "max_len 100");
  EXPECT_CONTAINS(r.err, "exceeds the model's n_ctx 64");
  run_free(&r);
  write_text("gpt2_nosidecar.json", "{\"input\": \"ngrams\"}");
  run_score(
      &r,
      (const char *[]){"--model", pathof("gpt2_nosidecar.safetensors"), pathof("one.jsonl"), NULL},
      NULL, NULL);
  assert_int_equal(r.status, 1);
  EXPECT_CONTAINS(r.err, "says \"input\": \"ngrams\", but the model is gpt2");
  run_free(&r);
  write_text("gpt2_nosidecar.json", "{\"tokenizer\": \"bytes\"");
  run_score(
      &r,
      (const char *[]){"--model", pathof("gpt2_nosidecar.safetensors"), pathof("one.jsonl"), NULL},
      NULL, NULL);
  assert_int_equal(r.status, 1);
  EXPECT_CONTAINS(r.err, "gpt2_nosidecar.json': invalid JSON");
  run_free(&r);
  unlink(pathof("gpt2_nosidecar.json"));

  /* a tokenizer that cannot be opened */
  run_score(&r,
            (const char *[]){"--model", pathof("gpt2.safetensors"), "--tokenizer",
                             "gpt2:/nonexistent/dir", pathof("one.jsonl"), NULL},
            NULL, NULL);
  assert_int_equal(r.status, 1);
  EXPECT_CONTAINS(r.err, "prefrm-score: ");
  assert_string_equal(r.out, "");
  run_free(&r);
}

/* A tiny GPT-2 BPE: the 256 byte tokens in GPT-2's byte-level alphabet plus
 * three merges, as vocab.json + merges.txt. */
static void write_bpe_dir(const char *name) {
  char path[8192];
  snprintf(path, sizeof path, "%s/%s", dir, name);
  assert_true(mkdir(path, 0777) == 0 || errno == EEXIST);
  /* bytes_to_unicode: printable bytes stand for themselves, the others for
   * U+0100 on in increasing order */
  uint32_t cp[256], next = 256;
  for (int b = 0; b < 256; b++)
    cp[b] =
        (b >= 0x21 && b <= 0x7e) || (b >= 0xa1 && b <= 0xac) || (b >= 0xae) ? (uint32_t)b : next++;
  char file[8300];
  snprintf(file, sizeof file, "%s/vocab.json", path);
  FILE *f = fopen(file, "wb");
  assert_non_null(f);
  fputc('{', f);
  for (int b = 0; b < 256; b++) {
    uint32_t c = cp[b];
    fputs(b ? ", \"" : "\"", f);
    if (c == '"' || c == '\\') fputc('\\', f);
    if (c < 0x80)
      fputc((int)c, f);
    else
      fprintf(f, "%c%c", 0xc0 | (c >> 6), 0x80 | (c & 0x3f));
    fprintf(f, "\": %d", b);
  }
  fputs(", \"th\": 256, \"the\": 257, \"\xc4\xa0t\": 258}", f);
  assert_int_equal(fclose(f), 0);
  snprintf(file, sizeof file, "%s/merges.txt", path);
  f = fopen(file, "wb");
  assert_non_null(f);
  fputs("#version: 0.2\nt h\nth e\n\xc4\xa0 t\n", f);
  assert_int_equal(fclose(f), 0);
}

static void test_gpt2_tokenizer(void **state) {
  (void)state;
  need_binary();
  write_bpe_dir("bpe");
  char spec[8300], err[512];
  snprintf(spec, sizeof spec, "gpt2:%s/bpe", dir);
  pft_tokenizer *tok;
  if (pft_tokenizer_open(&tok, spec, err, sizeof err)) fail_msg("%s", err);
  assert_int_equal(pft_tokenizer_vocab_size(tok), 259);
  pft_ids ids = {0};
  assert_int_equal(pft_encode(tok, "the the", 7, &ids), 0);
  /* "the", then " the" = " " + "the": "t h" (rank 0) before "Ġ t" (rank 2) */
  assert_int_equal(ids.n, 3);
  assert_int_equal(ids.v[0], 257);
  assert_int_equal(ids.v[1], ' ');
  assert_int_equal(ids.v[2], 257);
  free(ids.v);

  prm_model_options o;
  prm_model_options_init(&o, PRM_MODEL_OPTIONS_VERSION);
  o.arch = PRM_ARCH_GPT2;
  o.seed = 9;
  o.vocab_size = 259;
  o.n_ctx = 32;
  o.n_embd = 8;
  o.n_layer = 1;
  o.n_head = 2;
  prm_model *m;
  assert_int_equal(prm_model_new(&m, &o), PRM_OK);
  save_model(m, "bpe.safetensors");
  save_sidecar("bpe.safetensors", spec, 24, 0);

  char *in = join_lines(mixed, N_MIXED, "\n");
  write_text("mixed.jsonl", in);
  free(in);
  ref_tok = tok;
  char *want = expected_all(m, mixed, N_MIXED, 24);
  ref_tok = bytes_tok;
  run_result r;
  run_score(&r,
            (const char *[]){"--model", pathof("bpe.safetensors"), "--batch", "1",
                             pathof("mixed.jsonl"), NULL},
            NULL, NULL);
  assert_int_equal(r.status, 0);
  expect_text(r.out, want);
  run_free(&r);
  free(want);
  prm_model_free(m);
  pft_tokenizer_free(tok);

  /* 259 ids do not fit a model of 256 */
  run_score(&r,
            (const char *[]){"--model", pathof("gpt2.safetensors"), "--tokenizer", spec,
                             pathof("mixed.jsonl"), NULL},
            NULL, NULL);
  assert_int_equal(r.status, 1);
  EXPECT_CONTAINS(r.err, "has 259 ids, the model's vocabulary only 256");
  run_free(&r);
}

static void test_usage_and_errors(void **state) {
  (void)state;
  need_binary();
  write_text("one.jsonl", "{\"prompt\": \"p\", \"response\": \"r\"}\n");
  const char *gpt2 = pathof("gpt2.safetensors"), *lin = pathof("linear.safetensors"),
             *one = pathof("one.jsonl");
  const struct {
    const char *args[8];
    int status;
    const char *msg;
  } cases[] = {
      {{NULL}, 2, "--model CKPT is required"},
      {{"--model", gpt2, "--bogus", NULL}, 2, "unknown option '--bogus'"},
      {{"--model", gpt2, "-x", NULL}, 2, "unknown option '-x'"},
      {{"--model", NULL}, 2, "--model needs a value"},
      {{"--model", gpt2, "--threads", "0", NULL}, 2, "--threads wants an integer in [1, 1024]"},
      {{"--model", gpt2, "--batch", "-1", NULL}, 2, "--batch wants an integer"},
      {{"--model", gpt2, "--batch=12x", NULL}, 2, "not '12x'"},
      {{"--model", gpt2, "--on-bad-line", "ignore", NULL}, 2, "'fail' or 'skip', not 'ignore'"},
      {{"--model", gpt2, one, one, NULL}, 2, "more than one input file"},
      {{"--model", gpt2, "--max-len", "65", one, NULL}, 2, "exceeds the model's n_ctx 64"},
      {{"--model", lin, "--max-len", "8", one, NULL}, 2, "for token models (gpt2, llama)"},
      {{"--model", lin, "--tokenizer", "bytes", one, NULL}, 2, "this model is linear"},
      {{"--model", pathof("missing.safetensors"), one, NULL}, 1, "cannot load the model"},
      {{"--model", one, one, NULL}, 1, "cannot load the model"},
      {{"--model", gpt2, pathof("missing.jsonl"), NULL}, 1, "missing.jsonl': No such file"},
      {{"--model", gpt2, dir, NULL}, 1, "cannot read"},
  };
  for (size_t k = 0; k < sizeof cases / sizeof *cases; k++) {
    run_result r;
    run_score(&r, cases[k].args, NULL, NULL);
    if (r.status != cases[k].status)
      fail_msg("case %zu: status %d, want %d (%s)", k, r.status, cases[k].status, r.err);
    EXPECT_CONTAINS(r.err, cases[k].msg);
    if (cases[k].status == 2) EXPECT_CONTAINS(r.err, "Try 'prefrm-score --help'.");
    run_free(&r);
  }

  /* --help: every flag, the formats, the exit codes */
  run_result r;
  run_score(&r, (const char *[]){"--help", NULL}, NULL, NULL);
  assert_int_equal(r.status, 0);
  const char *words[] = {"--model",           "--tokenizer",
                         "--max-len",         "--threads",
                         "--batch",           "--chunk",
                         "--on-bad-line",     "--normalise",
                         "--no-share-prefix", "--help",
                         "--version",         "\"reward\"",
                         "\"reward_chosen\"", "\"reward_rejected\"",
                         "\"p_chosen\"",      "Exit status",
                         "FILE:LINE",         "Examples",
                         "jansson",           "sidecar"};
  for (size_t k = 0; k < sizeof words / sizeof *words; k++)
    EXPECT_CONTAINS(r.out, words[k]);
  run_free(&r);
  run_score(&r, (const char *[]){"--version", NULL}, NULL, NULL);
  assert_int_equal(r.status, 0);
  EXPECT_CONTAINS(r.out, prm_version_string());
  run_free(&r);

  /* a full disk: status 1 and a message */
  if (access("/dev/full", W_OK) == 0) {
    run_score(&r, (const char *[]){"--model", gpt2, one, NULL}, NULL, "/dev/full");
    assert_int_equal(r.status, 1);
    EXPECT_CONTAINS(r.err, "cannot write the output");
    run_free(&r);
  }
}

/* Tokens "computed N of M" from the summary line on standard error. */
static void tokens_of(const char *err, unsigned long long *computed, unsigned long long *declared) {
  const char *t = strstr(err, "prefrm-score: computed ");
  if (!t) fail_msg("no token summary in \"%s\"", err);
  if (sscanf(t, "prefrm-score: computed %llu of %llu tokens", computed, declared) != 2)
    fail_msg("a token summary that does not parse: \"%s\"", t);
}

/* Pairs whose responses share long prompts (and sometimes their start),
 * runs of single responses to one prompt (5, then 3 with a blank line among
 * them, then 7: longer than --batch 4), a prompt beyond max_len 48 in a run
 * (cut from its start, so the common prefix depends on the response), a
 * single after a pair with the pair's prompt (not merged). */
static const char *const shared_lines[] = {
    "{\"prompt\": \"Tell me something nice about tea, please.\", \"chosen\": \"Tea is warm.\", "
    "\"rejected\": \"Tea is cold!\"}",
    "{\"prompt\": \"Tell me something nice about tea, please.\", \"response\": \"Green tea.\"}",
    "{\"prompt\": \"Rate the following answer:\", \"response\": \"one\"}",
    "{\"prompt\": \"Rate the following answer:\", \"response\": \"the second one\"}",
    "{\"prompt\": \"Rate the following answer:\", \"response\": \"3\"}",
    "{\"prompt\": \"Rate the following answer:\", \"response\": \"a fourth, longer answer\"}",
    "{\"id\": 5, \"prompt\": \"Rate the following answer:\", \"response\": \"five\"}",
    "{\"prompt\": \"Another prompt\", \"response\": \"x\"}",
    "{\"prompt\": \"Another prompt\", \"response\": \"yy\"}",
    "{\"prompt\": \"Another prompt\", \"response\": \"zzz\"}",
    "{\"prompt\": \"What is the capital of France?\", \"chosen\": \"Paris.\", \"rejected\": "
    "\"Lyon.\"}",
    "{\"prompt\": \"A prompt far longer than the forty-eight tokens of max_len, cut\", "
    "\"response\": \"r1\"}",
    "{\"prompt\": \"A prompt far longer than the forty-eight tokens of max_len, cut\", "
    "\"response\": \"a longer r2\"}",
    "{\"prompt\": \"A prompt far longer than the forty-eight tokens of max_len, cut\", "
    "\"response\": \"r3\"}",
    "{\"prompt\": \"A prompt far longer than the forty-eight tokens of max_len, cut\", "
    "\"response\": \"r4!\"}",
    "{\"prompt\": \"A prompt far longer than the forty-eight tokens of max_len, cut\", "
    "\"response\": \"r5\"}",
    "{\"prompt\": \"A prompt far longer than the forty-eight tokens of max_len, cut\", "
    "\"response\": \"r6 r6\"}",
    "{\"prompt\": \"A prompt far longer than the forty-eight tokens of max_len, cut\", "
    "\"response\": \"r7\"}",
    "{\"prompt\": \"Q\", \"chosen\": \"same\", \"rejected\": \"same\"}",
    "{\"prompt\": \"Summarise: the cat sat on the mat.\", \"chosen\": \"A cat sat.\", "
    "\"rejected\": \"A cat sat on a mat.\"}",
};

#define N_SHARED (sizeof shared_lines / sizeof *shared_lines)

static void test_shared_prefixes(void **state) {
  (void)state;
  need_binary();
  /* a blank line inside the run of "Another prompt" */
  char *in = join_lines(shared_lines, N_SHARED, "\n");
  char *at = strstr(in, "{\"prompt\": \"Another prompt\", \"response\": \"yy\"}");
  assert_non_null(at);
  char *with_blank = malloc(strlen(in) + 4);
  assert_non_null(with_blank);
  sprintf(with_blank, "%.*s  \n%s", (int)(at - in), in, at);
  write_text("shared.jsonl", with_blank);
  free(with_blank);
  free(in);
  /* the runs of singles alone */
  in = join_lines(shared_lines + 2, 8, "\n");
  write_text("runs.jsonl", in);
  free(in);
  prm_model *m = load("gpt2.safetensors");
  char *want = expected_all(m, shared_lines, N_SHARED, GPT2_MAX_LEN);
  prm_model_free(m);
  const char *gpt2 = pathof("gpt2.safetensors"), *file = pathof("shared.jsonl");
  unsigned long long computed, declared;
  run_result r;

  /* --batch 1: nothing shared, the reference bit for bit */
  run_score(&r, (const char *[]){"--model", gpt2, "--batch", "1", file, NULL}, NULL, NULL);
  assert_int_equal(r.status, 0);
  expect_text(r.out, want);
  tokens_of(r.err, &computed, &declared);
  assert_int_equal(computed, declared);
  run_free(&r);

  /* --no-share-prefix: every row alone, each token computed */
  const char *batches[] = {"64", "4"};
  for (int k = 0; k < 2; k++) {
    run_score(
        &r,
        (const char *[]){"--model", gpt2, "--no-share-prefix", "--batch", batches[k], file, NULL},
        NULL, NULL);
    assert_int_equal(r.status, 0);
    expect_close(r.out, want);
    tokens_of(r.err, &computed, &declared);
    assert_int_equal(computed, declared);
    run_free(&r);
  }

  /* shared (the default), with the default batch and with batches of 4 (the
   * run of 7 cut into groups of 4 and 3): the same within float noise, fewer
   * tokens computed; the same text for 1, 2 or 3 threads */
  run_score(&r, (const char *[]){"--model", gpt2, file, NULL}, NULL, NULL);
  assert_int_equal(r.status, 0);
  expect_close(r.out, want);
  tokens_of(r.err, &computed, &declared);
  print_message("shared prefixes, --batch 64: computed %llu of %llu tokens\n", computed, declared);
  assert_true(computed < declared);
  unsigned long long declared64 = declared;
  run_free(&r);
  char *first = NULL;
  const char *threads[] = {"1", "2", "3"};
  for (int t = 0; t < 3; t++) {
    run_score(&r,
              (const char *[]){"--model", gpt2, "--batch", "4", "--chunk", "13", "--threads",
                               threads[t], file, NULL},
              NULL, NULL);
    assert_int_equal(r.status, 0);
    tokens_of(r.err, &computed, &declared);
    assert_true(computed < declared);
    assert_int_equal(declared, declared64);
    if (!first) {
      expect_close(r.out, want);
      print_message("shared prefixes, --batch 4 --chunk 13: computed %llu of %llu tokens\n",
                    computed, declared);
      first = r.out;
      r.out = NULL;
    } else {
      expect_text(r.out, first);
    }
    run_free(&r);
  }
  free(first);

  /* singles with one prompt share it too (no pairs in this input) */
  run_score(&r, (const char *[]){"--model", gpt2, "--batch", "3", pathof("runs.jsonl"), NULL}, NULL,
            NULL);
  assert_int_equal(r.status, 0);
  tokens_of(r.err, &computed, &declared);
  assert_true(computed < declared);
  run_free(&r);

  /* feature models print no token summary */
  run_score(&r, (const char *[]){"--model", pathof("linear.safetensors"), file, NULL}, NULL, NULL);
  assert_int_equal(r.status, 0);
  assert_string_equal(r.err, "");
  run_free(&r);
  free(want);
}

static int sanitized(void) {
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
  return 1;
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer) ||                         \
    __has_feature(memory_sanitizer)
  return 1;
#endif
#endif
  return 0;
}

/* 100 000 lines of about 1 KiB (100 MiB) through a feature model: the peak
 * RSS stays far below what holding the input (or the output) would take. */
static void test_streaming_memory(void **state) {
  (void)state;
  need_binary();
  enum { PROMPT = 300, RESPONSE = 640 };
  /* Sanitizers and valgrind have memory of their own (ASan's quarantine alone
   * is 256 MiB), and a child forked from valgrind has valgrind's peak RSS
   * (the kernel keeps the larger of before and after exec): there the run is
   * shorter and its memory is not checked. */
  int measured =
      !sanitized() && !(getenv("LD_PRELOAD") && strstr(getenv("LD_PRELOAD"), "vgpreload"));
  const uint64_t N = measured ? 100000 : 5000;
  FILE *f = fopen(pathof("big.jsonl"), "wb");
  assert_non_null(f);
  static char p[PROMPT + 1], c[RESPONSE + 1];
  uint64_t s = 12345;
  size_t bytes = 0;
  for (uint64_t i = 0; i < N; i++) {
    for (int k = 0; k < PROMPT; k++) {
      s = s * 6364136223846793005ull + 1442695040888963407ull;
      p[k] = (char)('a' + (s >> 59) % 26);
    }
    for (int k = 0; k < RESPONSE; k++) {
      s = s * 6364136223846793005ull + 1442695040888963407ull;
      c[k] = (char)(' ' + (s >> 58) % 58);
      if (c[k] == '"' || c[k] == '\\') c[k] = '.';
    }
    int w = fprintf(f, "{\"id\": %llu, \"prompt\": \"%s\", \"response\": \"%s\"}\n",
                    (unsigned long long)i, p, c);
    bytes += (size_t)w;
  }
  assert_int_equal(fclose(f), 0);

  run_result r;
  struct timeval t0, t1;
  gettimeofday(&t0, NULL);
  run_score(&r,
            (const char *[]){"--model", pathof("linear.safetensors"), pathof("big.jsonl"), NULL},
            NULL, pathof("big.out"));
  gettimeofday(&t1, NULL);
  assert_int_equal(r.status, 0);
  print_message("%llu lines, %.1f MiB: peak RSS %.1f MiB%s, %.2f s\n", (unsigned long long)N,
                bytes / 1048576.0, r.maxrss_kb / 1024.0, measured ? "" : " (not checked here)",
                (double)(t1.tv_sec - t0.tv_sec) + (t1.tv_usec - t0.tv_usec) / 1e6);
  /* the input is ~100 MiB; a chunk is 4096 lines (~4 MiB) */
  if (measured) assert_true(r.maxrss_kb < 48 * 1024);
  run_free(&r);

  /* every line came out, in order; the last one is scored right */
  pft_reader *rd;
  char err[256];
  assert_int_equal(pft_reader_open(&rd, pathof("big.out"), err, sizeof err), 0);
  const char *line;
  size_t len;
  uint64_t no;
  char prefix[32];
  uint64_t n = 0;
  char *last = NULL;
  while (pft_reader_next(rd, &line, &len, &no, err, sizeof err) == 1) {
    int k = snprintf(prefix, sizeof prefix, "{\"id\": %llu,", (unsigned long long)n);
    if (len < (size_t)k || memcmp(line, prefix, (size_t)k))
      fail_msg("line %llu out of order", (unsigned long long)n);
    n++;
    if (n == N) last = strndup(line, len);
  }
  pft_reader_close(rd);
  assert_int_equal(n, N);
  assert_non_null(last);
  /* rebuild the last input line from the output and check its reward */
  char *cut = strstr(last, ", \"reward\": ");
  assert_non_null(cut);
  float got = strtof(cut + 12, NULL);
  strcpy(cut, "}");
  prm_model *m = load("linear.safetensors");
  pft_record rec;
  assert_int_equal(pft_parse_record(last, strlen(last), PFT_WANT_ANY, &rec, err, sizeof err), 0);
  float want = forward_features(m, rec.a, rec.a_len);
  assert_float_equal(got, want, 1e-5 * (1e-3 + fabs(want)));
  pft_record_free(&rec);
  prm_model_free(m);
  free(last);
  unlink(pathof("big.jsonl"));
  unlink(pathof("big.out"));
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_gpt2_exact),
      cmocka_unit_test(test_threads_and_chunks),
      cmocka_unit_test(test_shared_prefixes),
      cmocka_unit_test(test_feature_models),
      cmocka_unit_test(test_normalise),
      cmocka_unit_test(test_existing_fields_and_text),
      cmocka_unit_test(test_bad_lines),
      cmocka_unit_test(test_stdin_and_empty),
      cmocka_unit_test(test_sidecar_and_overrides),
      cmocka_unit_test(test_gpt2_tokenizer),
      cmocka_unit_test(test_usage_and_errors),
      cmocka_unit_test(test_streaming_memory),
  };
  return cmocka_run_group_tests(tests, setup, teardown);
}
