/*
 * test_resume.c - optimizer states (prm_optimizer_save / _load and their
 * buffer twins) and the trainable set in model checkpoints: a run saved
 * after N steps and resumed in fresh handles ends bit-identical to an
 * uninterrupted run of 2N steps, for every architecture; every error path.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
/* cmocka.h needs the three headers above first */
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "testutil.h"

/* ---- models and data ----------------------------------------------------------- */

enum { LINEAR, MLP, GPT2, LLAMA };
enum { PAIRS = 3, SEQ = 6, VOCAB = 11, D_IN = 4 };

static prm_model_options model_options(int kind) {
  prm_model_options o;
  assert_int_equal(prm_model_options_init(&o, PRM_MODEL_OPTIONS_VERSION), PRM_OK);
  o.seed = 7;
  switch (kind) {
  case LINEAR:
    o.arch = PRM_ARCH_LINEAR;
    o.input_size = D_IN;
    break;
  case MLP:
    o.arch = PRM_ARCH_MLP;
    o.input_size = D_IN;
    o.activation = PRM_ACT_GELU_TANH;
    o.n_hidden = 2;
    o.hidden[0] = 5;
    o.hidden[1] = 3;
    break;
  case GPT2: o = prmt_gpt2_options(VOCAB, 8, 8, 2, 2, 7); break;
  default:
    o.arch = PRM_ARCH_LLAMA;
    o.vocab_size = VOCAB;
    o.n_ctx = 8;
    o.n_embd = 8;
    o.n_layer = 2;
    o.n_head = 4;
    o.n_kv_head = 2; /* grouped-query attention */
    o.n_ffn = 12;
  }
  return o;
}

static prm_model *make_model(int kind) {
  prm_model_options o = model_options(kind);
  prm_model *m = NULL;
  int rc = prm_model_new(&m, &o);
  if (rc != PRM_OK) fail_msg("prm_model_new: %s", prm_last_errmsg());
  return m;
}

static prm_ctx *make_ctx(const prm_model *m) {
  return prm_model_arch(m) == PRM_ARCH_GPT2 || prm_model_arch(m) == PRM_ARCH_LLAMA
             ? prmt_tok_ctx(m, 2 * PAIRS, SEQ, 0)
             : prmt_ctx(m, 2 * PAIRS, 0);
}

/* The pair batch of call `step`: the same data whatever the run. */
static void train_call(prm_ctx *ctx, prm_optimizer *opt, uint64_t step) {
  const prm_model *m = prm_ctx_model(ctx);
  prmt_rng r = {1000 + step};
  float x[2 * PAIRS * D_IN];
  int32_t tok[2 * PAIRS * SEQ], len[2 * PAIRS];
  prm_batch b;
  if (prm_model_input_size(m) > 0) {
    prmt_fill_normal(&r, x, 2 * PAIRS * D_IN, 1.0);
    b = prmt_batch(x, 2 * PAIRS, D_IN);
  } else {
    for (int i = 0; i < 2 * PAIRS * SEQ; i++)
      tok[i] = (int32_t)(prmt_next(&r) % VOCAB);
    for (int i = 0; i < 2 * PAIRS; i++)
      len[i] = 1 + (int32_t)(prmt_next(&r) % SEQ);
    b = prmt_tok_batch(tok, len, 2 * PAIRS, SEQ);
  }
  int rc = prm_train_step(ctx, opt, &b, NULL, NULL);
  if (rc != PRM_OK) fail_msg("train step %llu: %s", (unsigned long long)step, prm_last_errmsg());
}

/* AdamW with decay, clipping, warm-up + cosine over 4 updates, and
 * accumulation over 3 calls. */
static prm_optimizer_options adamw_options(void) {
  prm_optimizer_options o;
  assert_int_equal(prm_optimizer_options_init(&o, PRM_OPTIMIZER_OPTIONS_VERSION), PRM_OK);
  o.algorithm = PRM_OPT_ADAMW;
  o.lr = 0.02;
  o.weight_decay = 0.1;
  o.no_decay_1d = 1;
  o.max_grad_norm = 0.05;
  o.schedule = PRM_SCHED_COSINE;
  o.warmup_steps = 1;
  o.total_steps = 4;
  o.min_lr = 0.001;
  o.accumulation_steps = 3;
  return o;
}

static prm_optimizer *make_opt(prm_model *m, const prm_optimizer_options *o) {
  prm_optimizer *opt = NULL;
  int rc = prm_optimizer_new(&opt, m, o);
  if (rc != PRM_OK) fail_msg("prm_optimizer_new: %s", prm_last_errmsg());
  return opt;
}

static unsigned char *save_opt_buffer(const prm_optimizer *opt, size_t *n) {
  assert_int_equal(prm_optimizer_save_buffer(opt, NULL, 0, n), PRM_OK);
  unsigned char *buf = malloc(*n);
  assert_non_null(buf);
  size_t n2 = 0;
  assert_int_equal(prm_optimizer_save_buffer(opt, buf, *n, &n2), PRM_OK);
  assert_int_equal(n2, *n);
  return buf;
}

static unsigned char *save_model_buffer(const prm_model *m, size_t *n) {
  assert_int_equal(prm_model_save_buffer(m, NULL, 0, n), PRM_OK);
  unsigned char *buf = malloc(*n);
  assert_non_null(buf);
  assert_int_equal(prm_model_save_buffer(m, buf, *n, n), PRM_OK);
  return buf;
}

/*
 * The whole resume check: run A makes 2N calls; run B makes N, saves the
 * model and the optimizer (file or buffer) and the context's pending
 * gradients (an unfinished accumulation cycle lives in the context), frees
 * everything, loads into fresh handles and makes N more. Parameters must
 * be bit-identical, and so must the counters.
 */
static void resume_check(int kind, int32_t frozen_blocks, const prm_optimizer_options *oo,
                         uint64_t n, int via_file) {
  /* run A */
  prm_model *a = make_model(kind);
  if (frozen_blocks >= 0) assert_int_equal(prm_model_set_trainable(a, frozen_blocks), PRM_OK);
  prm_ctx *ca = make_ctx(a);
  prm_optimizer *oa = make_opt(a, oo);
  for (uint64_t s = 0; s < 2 * n; s++)
    train_call(ca, oa, s);

  /* run B, first half */
  prm_model *b = make_model(kind);
  if (frozen_blocks >= 0) assert_int_equal(prm_model_set_trainable(b, frozen_blocks), PRM_OK);
  const uint64_t toff = prm_model_trainable_offset(b);
  prm_ctx *cb = make_ctx(b);
  prm_optimizer *ob = make_opt(b, oo);
  for (uint64_t s = 0; s < n; s++)
    train_call(cb, ob, s);
  uint64_t ng = 0;
  float *g = prm_ctx_grads(cb, &ng);
  float *pending = malloc(ng * sizeof *pending);
  assert_non_null(pending);
  memcpy(pending, g, ng * sizeof *pending);
  char mpath[512], opath[512];
  unsigned char *mbuf = NULL, *obuf = NULL;
  size_t mn = 0, on = 0;
  if (via_file) {
    prmt_tmp_path(mpath, sizeof mpath, "resume_model");
    prmt_tmp_path(opath, sizeof opath, "resume_opt");
    assert_int_equal(prm_model_save(b, mpath), PRM_OK);
    assert_int_equal(prm_optimizer_save(ob, opath), PRM_OK);
  } else {
    mbuf = save_model_buffer(b, &mn);
    obuf = save_opt_buffer(ob, &on);
  }
  const uint64_t updates = prm_optimizer_num_updates(ob);
  const double norm = prm_optimizer_last_grad_norm(ob), lr = prm_optimizer_lr(ob);
  prm_optimizer_free(ob);
  prm_ctx_free(cb);
  prm_model_free(b);

  /* run B, resumed in fresh handles */
  prm_model *b2 = NULL;
  prm_optimizer *ob2 = NULL;
  int rc = via_file ? prm_model_load(&b2, mpath) : prm_model_load_buffer(&b2, mbuf, mn);
  if (rc != PRM_OK) fail_msg("model load: %s", prm_last_errmsg());
  assert_int_equal(prm_model_trainable_offset(b2), toff); /* restored from the file */
  prm_ctx *cb2 = make_ctx(b2);
  rc = via_file ? prm_optimizer_load(&ob2, b2, opath)
                : prm_optimizer_load_buffer(&ob2, b2, obuf, on);
  if (rc != PRM_OK) fail_msg("optimizer load: %s", prm_last_errmsg());
  assert_int_equal(prm_optimizer_num_updates(ob2), updates);
  assert_true(prm_optimizer_last_grad_norm(ob2) == norm);
  assert_true(prm_optimizer_lr(ob2) == lr);
  memcpy(prm_ctx_grads(cb2, NULL), pending, ng * sizeof *pending);
  for (uint64_t s = n; s < 2 * n; s++)
    train_call(cb2, ob2, s);

  uint64_t np_a, np_b;
  const float *pa = prm_model_params(a, &np_a), *pb = prm_model_params(b2, &np_b);
  assert_int_equal(np_a, np_b);
  assert_memory_equal(pa, pb, np_a * sizeof(float));
  assert_int_equal(prm_optimizer_num_updates(oa), prm_optimizer_num_updates(ob2));
  assert_true(prm_optimizer_last_grad_norm(oa) == prm_optimizer_last_grad_norm(ob2));
  /* the frozen prefix did not move */
  if (toff > 0) {
    prm_model *fresh = make_model(kind);
    assert_memory_equal(prm_model_params(fresh, NULL), pb, toff * sizeof(float));
    prm_model_free(fresh);
  }
  /* and both optimizers now save the same bytes */
  size_t sa, sb;
  unsigned char *bytes_a = save_opt_buffer(oa, &sa), *bytes_b = save_opt_buffer(ob2, &sb);
  assert_int_equal(sa, sb);
  assert_memory_equal(bytes_a, bytes_b, sa);
  free(bytes_a);
  free(bytes_b);

  if (via_file) {
    unlink(mpath);
    unlink(opath);
  }
  free(mbuf);
  free(obuf);
  free(pending);
  prm_optimizer_free(ob2);
  prm_ctx_free(cb2);
  prm_model_free(b2);
  prm_optimizer_free(oa);
  prm_ctx_free(ca);
  prm_model_free(a);
}

/* 7 calls with accumulation 3: two updates and one call into the third
 * cycle when the run is saved; 14 calls go past the cosine's total_steps. */
enum { HALF = 7 };

static void test_resume_linear(void **state) {
  (void)state;
  prm_optimizer_options o = adamw_options();
  resume_check(LINEAR, -1, &o, HALF, 0);
  resume_check(LINEAR, -1, &o, HALF, 1);
}

static void test_resume_mlp(void **state) {
  (void)state;
  prm_optimizer_options o = adamw_options();
  resume_check(MLP, 1, &o, HALF, 0); /* layer 0 frozen */
  resume_check(MLP, 1, &o, HALF, 1);
  resume_check(MLP, 0, &o, HALF, 0); /* head only */
}

static void test_resume_gpt2(void **state) {
  (void)state;
  prm_optimizer_options o = adamw_options();
  resume_check(GPT2, 1, &o, HALF, 0); /* embeddings and block 0 frozen */
  resume_check(GPT2, 1, &o, HALF, 1);
}

static void test_resume_llama(void **state) {
  (void)state;
  prm_optimizer_options o = adamw_options();
  resume_check(LLAMA, 1, &o, HALF, 0);
  resume_check(LLAMA, 1, &o, HALF, 1);
}

static void test_resume_sgd_adam(void **state) {
  (void)state;
  prm_optimizer_options o = adamw_options();
  o.algorithm = PRM_OPT_SGD;
  o.momentum = 0.9;
  o.nesterov = 1;
  o.lr = 0.05;
  resume_check(MLP, 1, &o, HALF, 0);
  resume_check(GPT2, -1, &o, HALF, 0);
  o.momentum = 0.0; /* no state tensors at all */
  o.nesterov = 0;
  resume_check(MLP, -1, &o, HALF, 1);
  o = adamw_options();
  o.algorithm = PRM_OPT_ADAM;
  o.schedule = PRM_SCHED_LINEAR;
  resume_check(LLAMA, -1, &o, HALF, 0);
  o.accumulation_steps = 1; /* saved between updates */
  resume_check(MLP, -1, &o, 3, 1);
}

/* An optimizer that has not stepped yet saves and loads too. */
static void test_fresh_state(void **state) {
  (void)state;
  prm_optimizer_options o = adamw_options();
  resume_check(MLP, 1, &o, 0, 0);
  prm_model *m = make_model(MLP);
  prm_optimizer *opt = make_opt(m, &o), *back = NULL;
  size_t n, n2;
  unsigned char *buf = save_opt_buffer(opt, &n);
  assert_int_equal(prm_optimizer_load_buffer(&back, m, buf, n), PRM_OK);
  assert_int_equal(prm_optimizer_num_updates(back), 0);
  unsigned char *again = save_opt_buffer(back, &n2);
  assert_int_equal(n, n2);
  assert_memory_equal(buf, again, n);
  free(buf);
  free(again);
  prm_optimizer_free(back);
  prm_optimizer_free(opt);
  prm_model_free(m);
}

/* ---- the file ------------------------------------------------------------------ */

/* The __metadata__ value of key in a state buffer (copied into out). */
static int meta_value(const unsigned char *buf, size_t n, const char *key, char *out, size_t cap) {
  char pat[96];
  snprintf(pat, sizeof pat, "\"%s\":\"", key);
  uint64_t h = 0;
  for (int i = 0; i < 8; i++)
    h |= (uint64_t)buf[i] << (8 * i);
  assert_true(8 + h <= n);
  char *hdr = malloc(h + 1);
  assert_non_null(hdr);
  memcpy(hdr, buf + 8, h);
  hdr[h] = '\0';
  const char *p = strstr(hdr, pat);
  int found = p != NULL;
  if (found) {
    p += strlen(pat);
    size_t k = 0;
    while (p[k] != '"' && k + 1 < cap) {
      out[k] = p[k];
      k++;
    }
    out[k] = '\0';
  }
  free(hdr);
  return found;
}

/* Every real option is written so that it reads back as the same double. */
static void test_reals_roundtrip(void **state) {
  (void)state;
  prm_model *m = make_model(LINEAR);
  prm_optimizer_options o = adamw_options();
  o.lr = 0.1 + 0.2; /* 0.30000000000000004 */
  o.eps = 1e-8;
  o.beta1 = 0.9;
  o.beta2 = 0.999;
  o.weight_decay = 1.0 / 3.0;
  o.min_lr = 4.9406564584124654e-324; /* the smallest subnormal */
  o.max_grad_norm = 123456789.0e-3;
  prm_optimizer *opt = make_opt(m, &o), *back = NULL;
  size_t n, n2;
  unsigned char *buf = save_opt_buffer(opt, &n);
  const struct {
    const char *key;
    double v;
  } want[] = {{"lr", o.lr},
              {"eps", o.eps},
              {"beta1", o.beta1},
              {"beta2", o.beta2},
              {"weight_decay", o.weight_decay},
              {"min_lr", o.min_lr},
              {"max_grad_norm", o.max_grad_norm},
              {"momentum", 0.0}};
  for (size_t i = 0; i < sizeof want / sizeof want[0]; i++) {
    char v[64];
    assert_true(meta_value(buf, n, want[i].key, v, sizeof v));
    double got = strtod(v, NULL);
    if (memcmp(&got, &want[i].v, sizeof got) != 0)
      fail_msg("%s: wrote '%s' for %.17g", want[i].key, v, want[i].v);
  }
  char v[64];
  assert_true(meta_value(buf, n, "kind", v, sizeof v));
  assert_string_equal(v, "optimizer");
  assert_true(meta_value(buf, n, "algorithm", v, sizeof v));
  assert_string_equal(v, "adamw");
  assert_true(meta_value(buf, n, "schedule", v, sizeof v));
  assert_string_equal(v, "cosine");
  /* the loaded optimizer writes the same strings, hence the same doubles */
  assert_int_equal(prm_optimizer_load_buffer(&back, m, buf, n), PRM_OK);
  assert_true(prm_optimizer_lr(back) == prm_optimizer_lr(opt));
  unsigned char *again = save_opt_buffer(back, &n2);
  assert_int_equal(n, n2);
  assert_memory_equal(buf, again, n);
  free(buf);
  free(again);
  prm_optimizer_free(back);
  prm_optimizer_free(opt);
  prm_model_free(m);
}

static void test_names_and_file(void **state) {
  (void)state;
  prm_model *m = make_model(GPT2);
  assert_int_equal(prm_model_set_trainable(m, 1), PRM_OK);
  prm_optimizer_options o = adamw_options();
  prm_optimizer *opt = make_opt(m, &o), *back = NULL;
  size_t n;
  unsigned char *buf = save_opt_buffer(opt, &n);
  char *hdr = (char *)buf + 8;
  /* PyTorch's names, trainable tensors only */
  assert_non_null(strstr(hdr, "\"exp_avg.transformer.h.1.attn.c_attn.weight\""));
  assert_non_null(strstr(hdr, "\"exp_avg_sq.score.weight\""));
  assert_null(strstr(hdr, "exp_avg.transformer.h.0."));
  assert_null(strstr(hdr, "exp_avg.transformer.wte.weight"));
  char v[64];
  assert_true(meta_value(buf, n, "trainable_offset", v, sizeof v));
  assert_int_equal(strtoull(v, NULL, 10), prm_model_trainable_offset(m));
  /* the file holds the same bytes as the buffer */
  char path[512];
  prmt_tmp_path(path, sizeof path, "names_opt");
  assert_int_equal(prm_optimizer_save(opt, path), PRM_OK);
  FILE *f = fopen(path, "rb");
  assert_non_null(f);
  unsigned char *file = malloc(n + 1);
  assert_non_null(file);
  assert_int_equal(fread(file, 1, n + 1, f), n);
  fclose(f);
  assert_memory_equal(file, buf, n);
  assert_int_equal(prm_optimizer_load(&back, m, path), PRM_OK);
  prm_optimizer_free(back);
  unlink(path);
  /* a missing file */
  back = (prm_optimizer *)(uintptr_t)1;
  assert_int_equal(prm_optimizer_load(&back, m, path), PRM_ERR_IO);
  assert_null(back);
  assert_true(strlen(prm_model_errmsg(m)) > 0);
  free(file);
  free(buf);
  prm_optimizer_free(opt);
  prm_model_free(m);
}

/* The trainable set lives in model checkpoints; files without the key
 * load with everything trainable. */
static void test_model_trainable_key(void **state) {
  (void)state;
  prm_model *m = make_model(GPT2);
  size_t n;
  unsigned char *buf = save_model_buffer(m, &n);
  char v[64];
  assert_false(meta_value(buf, n, "trainable_blocks", v, sizeof v));
  free(buf);
  assert_int_equal(prm_model_set_trainable(m, 0), PRM_OK);
  buf = save_model_buffer(m, &n);
  assert_true(meta_value(buf, n, "trainable_blocks", v, sizeof v));
  assert_string_equal(v, "0");
  prm_model *back = NULL;
  assert_int_equal(prm_model_load_buffer(&back, buf, n), PRM_OK);
  assert_int_equal(prm_model_trainable_offset(back), prm_model_trainable_offset(m));
  prm_model_free(back);
  free(buf);
  /* a value the model cannot take */
  assert_int_equal(prm_model_set_trainable(m, 2), PRM_OK);
  buf = save_model_buffer(m, &n);
  char *p = strstr((char *)buf + 8, "\"trainable_blocks\":\"2\"");
  assert_non_null(p);
  p[strlen("\"trainable_blocks\":\"")] = '9';
  back = (prm_model *)(uintptr_t)1;
  assert_int_equal(prm_model_load_buffer(&back, buf, n), PRM_ERR_FORMAT);
  assert_null(back);
  assert_non_null(strstr(prm_last_errmsg(), "trainable_blocks"));
  p[strlen("\"trainable_blocks\":\"")] = 'x';
  assert_int_equal(prm_model_load_buffer(&back, buf, n), PRM_ERR_FORMAT);
  free(buf);
  prm_model_free(m);
}

/* ---- errors -------------------------------------------------------------------- */

/* The load must fail with `status`, leave *out NULL and explain itself in
 * the thread's and the model's message. */
static void expect_fail(prm_model *m, const void *buf, size_t n, int status, const char *needle) {
  prm_optimizer *opt = (prm_optimizer *)(uintptr_t)1; /* must become NULL */
  int rc = prm_optimizer_load_buffer(&opt, m, buf, n);
  if (rc != status)
    fail_msg("expected %s, got %s (%s)", prm_status_string(status), prm_status_string(rc),
             prm_last_errmsg());
  assert_null(opt);
  assert_true(strlen(prm_last_errmsg()) > 0);
  assert_string_equal(prm_model_errmsg(m), prm_last_errmsg());
  if (needle != NULL && strstr(prm_last_errmsg(), needle) == NULL)
    fail_msg("message '%s' lacks '%s'", prm_last_errmsg(), needle);
}

static void test_null_args(void **state) {
  (void)state;
  prm_model *m = make_model(LINEAR);
  prm_optimizer_options o = adamw_options();
  prm_optimizer *opt = make_opt(m, &o), *out = (prm_optimizer *)(uintptr_t)1;
  unsigned char buf[8] = {0};
  size_t n = 0;
  assert_int_equal(prm_optimizer_save(NULL, "x"), PRM_ERR_NULL);
  assert_int_equal(prm_optimizer_save(opt, NULL), PRM_ERR_NULL);
  assert_int_equal(prm_optimizer_save_buffer(NULL, buf, sizeof buf, &n), PRM_ERR_NULL);
  assert_int_equal(prm_optimizer_save_buffer(opt, buf, sizeof buf, NULL), PRM_ERR_NULL);
  assert_int_equal(prm_optimizer_save_buffer(opt, NULL, 0, &n), PRM_OK);
  size_t need = n;
  assert_int_equal(prm_optimizer_save_buffer(opt, buf, sizeof buf, &n), PRM_ERR_SIZE);
  assert_int_equal(n, need);
  assert_int_equal(prm_optimizer_load(NULL, m, "x"), PRM_ERR_NULL);
  assert_int_equal(prm_optimizer_load(&out, NULL, "x"), PRM_ERR_NULL);
  assert_null(out);
  out = (prm_optimizer *)(uintptr_t)1;
  assert_int_equal(prm_optimizer_load(&out, m, NULL), PRM_ERR_NULL);
  assert_null(out);
  assert_int_equal(prm_optimizer_load_buffer(NULL, m, buf, 8), PRM_ERR_NULL);
  out = (prm_optimizer *)(uintptr_t)1;
  assert_int_equal(prm_optimizer_load_buffer(&out, NULL, buf, 8), PRM_ERR_NULL);
  assert_null(out);
  out = (prm_optimizer *)(uintptr_t)1;
  assert_int_equal(prm_optimizer_load_buffer(&out, m, NULL, 8), PRM_ERR_NULL);
  assert_null(out);
  prm_optimizer_free(opt);
  prm_model_free(m);
}

static void test_wrong_model(void **state) {
  (void)state;
  prm_model *mlp = make_model(MLP);
  prm_optimizer_options o = adamw_options();
  prm_optimizer *opt = make_opt(mlp, &o);
  size_t n;
  unsigned char *buf = save_opt_buffer(opt, &n);
  /* another architecture */
  prm_model *lin = make_model(LINEAR);
  expect_fail(lin, buf, n, PRM_ERR_MISMATCH, "mlp");
  /* another size */
  prm_model_options mo = model_options(MLP);
  mo.hidden[0] = 7;
  prm_model *big = NULL;
  assert_int_equal(prm_model_new(&big, &mo), PRM_OK);
  expect_fail(big, buf, n, PRM_ERR_MISMATCH, "parameters");
  /* the same parameter count in other shapes: 4*5+5+5*3+3+3 = 4*6+6+6*2+2+2 */
  mo.hidden[0] = 6;
  mo.hidden[1] = 2;
  prm_model *other = NULL;
  assert_int_equal(prm_model_new(&other, &mo), PRM_OK);
  assert_int_equal(prm_model_num_params(other), prm_model_num_params(mlp));
  expect_fail(other, buf, n, PRM_ERR_MISMATCH, "shape");
  /* another trainable set */
  prm_model *frozen = make_model(MLP);
  assert_int_equal(prm_model_set_trainable(frozen, 1), PRM_OK);
  expect_fail(frozen, buf, n, PRM_ERR_MISMATCH, "prm_model_set_trainable");
  free(buf);
  prm_optimizer *fo = make_opt(frozen, &o);
  buf = save_opt_buffer(fo, &n);
  expect_fail(mlp, buf, n, PRM_ERR_MISMATCH, "prm_model_set_trainable");
  prm_optimizer_free(fo);
  free(buf);
  prm_model_free(frozen);
  prm_model_free(other);
  prm_model_free(big);
  prm_model_free(lin);
  prm_optimizer_free(opt);
  prm_model_free(mlp);
}

/* A state with one stepped optimizer, to corrupt. */
static unsigned char *stepped_state(prm_model *m, prm_optimizer_options *o, size_t *n) {
  prm_ctx *ctx = make_ctx(m);
  prm_optimizer *opt = make_opt(m, o);
  for (uint64_t s = 0; s < 4; s++)
    train_call(ctx, opt, s);
  unsigned char *buf = save_opt_buffer(opt, n);
  prm_optimizer_free(opt);
  prm_ctx_free(ctx);
  return buf;
}

static void test_truncated_and_flipped(void **state) {
  (void)state;
  prm_model *m = make_model(MLP);
  prm_optimizer_options o = adamw_options();
  size_t n;
  unsigned char *buf = stepped_state(m, &o, &n);
  for (size_t k = 0; k < n; k++) {
    prm_optimizer *opt = (prm_optimizer *)(uintptr_t)1;
    int rc = prm_optimizer_load_buffer(&opt, m, buf, k);
    if (rc != PRM_ERR_FORMAT)
      fail_msg("%zu of %zu bytes: %s (%s)", k, n, prm_status_string(rc), prm_last_errmsg());
    assert_null(opt);
  }
  unsigned char *copy = malloc(n);
  assert_non_null(copy);
  for (size_t k = 0; k < n; k++) {
    memcpy(copy, buf, n);
    copy[k] ^= (unsigned char)(k % 3 == 0 ? 0x80 : k % 3 == 1 ? 0x01 : 0x20);
    prm_optimizer *opt = (prm_optimizer *)(uintptr_t)1;
    int rc = prm_optimizer_load_buffer(&opt, m, copy, n);
    if (rc == PRM_OK) {
      assert_non_null(opt);
      prm_optimizer_free(opt);
      continue;
    }
    if (rc != PRM_ERR_FORMAT && rc != PRM_ERR_MISMATCH && rc != PRM_ERR_UNSUPPORTED)
      fail_msg("byte %zu flipped: %s (%s)", k, prm_status_string(rc), prm_last_errmsg());
    assert_null(opt);
    assert_true(strlen(prm_last_errmsg()) > 0);
  }
  free(copy);
  free(buf);
  prm_model_free(m);
}

/* A copy of the state with the header's `from` replaced by `to` (any
 * length: the header length is rewritten). */
static unsigned char *rewrite(const unsigned char *buf, size_t n, const char *from, const char *to,
                              size_t *n_out) {
  uint64_t h = 0;
  for (int i = 0; i < 8; i++)
    h |= (uint64_t)buf[i] << (8 * i);
  char *hdr = malloc(h + 1);
  assert_non_null(hdr);
  memcpy(hdr, buf + 8, h);
  hdr[h] = '\0';
  char *p = strstr(hdr, from);
  if (p == NULL) fail_msg("'%s' not in the header", from);
  const size_t nh = h - strlen(from) + strlen(to), data = n - 8 - h;
  unsigned char *out = malloc(8 + nh + data);
  assert_non_null(out);
  for (int i = 0; i < 8; i++)
    out[i] = (unsigned char)((uint64_t)nh >> (8 * i));
  const size_t pre = (size_t)(p - hdr);
  memcpy(out + 8, hdr, pre);
  memcpy(out + 8 + pre, to, strlen(to));
  memcpy(out + 8 + pre + strlen(to), p + strlen(from), h - pre - strlen(from));
  memcpy(out + 8 + nh, buf + 8 + h, data);
  *n_out = 8 + nh + data;
  free(hdr);
  return out;
}

static void expect_rewrite(prm_model *m, const unsigned char *buf, size_t n, const char *from,
                           const char *to, int status, const char *needle) {
  size_t k;
  unsigned char *bad = rewrite(buf, n, from, to, &k);
  expect_fail(m, bad, k, status, needle);
  free(bad);
}

static void test_malformed(void **state) {
  (void)state;
  prm_model *m = make_model(MLP);
  prm_optimizer_options o = adamw_options();
  size_t n;
  unsigned char *buf = stepped_state(m, &o, &n);
  /* version 2 (an lr scale) is known since 0.4: 3 is the first unknown one */
  expect_rewrite(m, buf, n, "\"optimizer_version\":\"1\"", "\"optimizer_version\":\"3\"",
                 PRM_ERR_UNSUPPORTED, "version");
  expect_rewrite(m, buf, n, "\"optimizer_version\":\"1\"", "\"optimizer_version\":\"01\"",
                 PRM_ERR_FORMAT, "optimizer_version");
  expect_rewrite(m, buf, n, "\"optimizer_version\"", "\"optimizer_versioN\"", PRM_ERR_FORMAT,
                 "optimizer_version");
  expect_rewrite(m, buf, n, "\"kind\":\"optimizer\"", "\"kind\":\"optimiser\"", PRM_ERR_FORMAT,
                 "kind");
  expect_rewrite(m, buf, n, "\"beta1\"", "\"betaX\"", PRM_ERR_FORMAT, "beta1");
  expect_rewrite(m, buf, n, "\"lr\":\"", "\"lr\":\"x", PRM_ERR_FORMAT, "lr");
  expect_rewrite(m, buf, n, "\"beta2\":\"", "\"beta2\":\"1", PRM_ERR_FORMAT, "beta2");
  expect_rewrite(m, buf, n, "\"algorithm\":\"adamw\"", "\"algorithm\":\"lion\"", PRM_ERR_FORMAT,
                 "algorithm");
  expect_rewrite(m, buf, n, "\"nesterov\":\"0\"", "\"nesterov\":\"2\"", PRM_ERR_FORMAT, "nesterov");
  expect_rewrite(m, buf, n, "\"micro_step\":\"1\"", "\"micro_step\":\"3\"", PRM_ERR_FORMAT,
                 "micro_step");
  expect_rewrite(m, buf, n, "\"num_updates\":\"1\"", "\"num_updates\":\"-1\"", PRM_ERR_FORMAT,
                 "num_updates");
  expect_rewrite(m, buf, n, "\"last_grad_norm\":\"", "\"last_grad_norm\":\"-", PRM_ERR_FORMAT,
                 "last_grad_norm");
  expect_rewrite(m, buf, n, "\"last_grad_norm\":\"", "\"last_grad_norm\":\"1e999", PRM_ERR_FORMAT,
                 "last_grad_norm");
  /* a missing moment tensor */
  expect_rewrite(m, buf, n, "\"exp_avg_sq.layers.1.bias\"", "\"exp_avg_sq.layers.1.biaz\"",
                 PRM_ERR_FORMAT, "missing tensor exp_avg_sq.layers.1.bias");
  /* an extra tensor: claim SGD with momentum's one buffer... no: add one */
  {
    size_t k;
    unsigned char *bad = rewrite(buf, n, "},\"",
                                 "},\"exp_avg.extra\":{\"dtype\":\"F32\",\"shape\":[1],"
                                 "\"data_offsets\":[0,0]},\"",
                                 &k);
    expect_fail(m, bad, k, PRM_ERR_FORMAT, NULL); /* an empty span for shape [1] */
    free(bad);
    /* a real one: 4 more bytes at the end of the data area */
    uint64_t h = 0;
    for (int i = 0; i < 8; i++)
      h |= (uint64_t)buf[i] << (8 * i);
    const size_t data = n - 8 - h;
    char entry[160];
    snprintf(entry, sizeof entry,
             "},\"exp_avg.extra\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[%zu,%zu]},\"",
             data, data + 4);
    bad = rewrite(buf, n, "},\"", entry, &k);
    unsigned char *big = calloc(1, k + 4);
    assert_non_null(big);
    memcpy(big, bad, k);
    expect_fail(m, big, k + 4, PRM_ERR_FORMAT, "unexpected tensor exp_avg.extra");
    free(big);
    free(bad);
  }
  /* a non-finite moment: the first float of the data area */
  {
    uint64_t h = 0;
    for (int i = 0; i < 8; i++)
      h |= (uint64_t)buf[i] << (8 * i);
    unsigned char *bad = malloc(n);
    assert_non_null(bad);
    memcpy(bad, buf, n);
    const unsigned char nan_le[4] = {0x00, 0x00, 0xc0, 0x7f};
    memcpy(bad + 8 + h, nan_le, 4);
    expect_fail(m, bad, n, PRM_ERR_FORMAT, "NaN");
    const unsigned char inf_le[4] = {0x00, 0x00, 0x80, 0xff};
    memcpy(bad + n - 4, inf_le, 4);
    memcpy(bad + 8 + h, buf + 8 + h, 4);
    expect_fail(m, bad, n, PRM_ERR_FORMAT, "NaN or Inf");
    free(bad);
  }
  free(buf);
  prm_model_free(m);
}

/* A model file given to prm_optimizer_load, and a state to prm_model_load. */
static void test_wrong_kind(void **state) {
  (void)state;
  prm_model *m = make_model(MLP);
  size_t n;
  unsigned char *mbuf = save_model_buffer(m, &n);
  expect_fail(m, mbuf, n, PRM_ERR_FORMAT, "prm_model_load");
  free(mbuf);
  prm_optimizer_options o = adamw_options();
  unsigned char *obuf = stepped_state(m, &o, &n);
  prm_model *back = (prm_model *)(uintptr_t)1;
  assert_int_equal(prm_model_load_buffer(&back, obuf, n), PRM_ERR_FORMAT);
  assert_null(back);
  assert_non_null(strstr(prm_last_errmsg(), "prm_optimizer_load"));
  free(obuf);
  prm_model_free(m);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_resume_linear),       cmocka_unit_test(test_resume_mlp),
      cmocka_unit_test(test_resume_gpt2),         cmocka_unit_test(test_resume_llama),
      cmocka_unit_test(test_resume_sgd_adam),     cmocka_unit_test(test_fresh_state),
      cmocka_unit_test(test_reals_roundtrip),     cmocka_unit_test(test_names_and_file),
      cmocka_unit_test(test_model_trainable_key), cmocka_unit_test(test_null_args),
      cmocka_unit_test(test_wrong_model),         cmocka_unit_test(test_truncated_and_flipped),
      cmocka_unit_test(test_malformed),           cmocka_unit_test(test_wrong_kind),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
