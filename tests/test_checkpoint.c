/*
 * test_checkpoint.c - safetensors save/load: round trips, buffer API, atomic
 * saves, interoperability with the PyTorch reference, and a corpus of
 * malformed files that must be rejected with PRM_ERR_FORMAT, never a crash.
 */
#define _POSIX_C_SOURCE 200809L

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>

#include <cmocka.h> /* after the three above, which it needs */

#include <dirent.h>
#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "testutil.h"

/* ---- helpers -------------------------------------------------------------------- */

static unsigned char *save_mem(const prm_model *m, size_t *n) {
  unsigned char *buf;
  assert_int_equal(prm_model_save_buffer(m, NULL, 0, n), PRM_OK);
  buf = malloc(*n);
  assert_non_null(buf);
  assert_int_equal(prm_model_save_buffer(m, buf, *n, n), PRM_OK);
  return buf;
}

static unsigned char *read_whole(const char *path, size_t *n) {
  FILE *f = fopen(path, "rb");
  unsigned char *buf;
  long len;
  assert_non_null(f);
  assert_int_equal(fseek(f, 0, SEEK_END), 0);
  len = ftell(f);
  assert_true(len >= 0);
  rewind(f);
  buf = malloc((size_t)len + 1);
  assert_non_null(buf);
  assert_int_equal(fread(buf, 1, (size_t)len, f), (size_t)len);
  fclose(f);
  *n = (size_t)len;
  return buf;
}

static void write_whole(const char *path, const void *buf, size_t n) {
  FILE *f = fopen(path, "wb");
  assert_non_null(f);
  assert_int_equal(fwrite(buf, 1, n, f), n);
  assert_int_equal(fclose(f), 0);
}

static void le_floats(unsigned char *out, const float *x, size_t n) {
  for (size_t i = 0; i < n; i++) {
    uint32_t u;
    memcpy(&u, &x[i], 4);
    for (int k = 0; k < 4; k++)
      out[4 * i + (size_t)k] = (unsigned char)(u >> (8 * k));
  }
}

/* A safetensors file from a header string (unpadded) and n_data raw bytes. */
static unsigned char *make_st(const char *header, const unsigned char *data, size_t n_data,
                              size_t *n) {
  size_t h = strlen(header);
  unsigned char *buf = malloc(8 + h + n_data + 1);
  assert_non_null(buf);
  for (int k = 0; k < 8; k++)
    buf[k] = (unsigned char)((uint64_t)h >> (8 * k));
  memcpy(buf + 8, header, h);
  if (n_data > 0) memcpy(buf + 8 + h, data, n_data);
  *n = 8 + h + n_data;
  return buf;
}

/* The load must fail with `status`, leave *out NULL and explain itself. */
static void expect_fail(const void *buf, size_t n, int status, const char *needle) {
  prm_model *m = (prm_model *)(uintptr_t)1; /* must be overwritten with NULL */
  int rc = prm_model_load_buffer(&m, buf, n);
  if (rc != status)
    fail_msg("expected %s, got %s (%s)", prm_status_string(status), prm_status_string(rc),
             prm_last_errmsg());
  assert_null(m);
  assert_true(strlen(prm_last_errmsg()) > 0);
  if (needle != NULL && strstr(prm_last_errmsg(), needle) == NULL)
    fail_msg("message '%s' lacks '%s'", prm_last_errmsg(), needle);
}

static void assert_same_model(prm_model *a, prm_model *b) {
  uint64_t na, nb;
  float *pa, *pb;
  assert_int_equal(prm_model_arch(a), prm_model_arch(b));
  assert_int_equal(prm_model_input_size(a), prm_model_input_size(b));
  assert_int_equal(prm_model_num_tensors(a), prm_model_num_tensors(b));
  for (uint32_t i = 0; i < prm_model_num_tensors(a); i++) {
    const char *n1, *n2;
    uint64_t o1, o2, s1[2], s2[2];
    uint32_t d1, d2;
    assert_int_equal(prm_model_tensor_info(a, i, &n1, &o1, &d1, s1), PRM_OK);
    assert_int_equal(prm_model_tensor_info(b, i, &n2, &o2, &d2, s2), PRM_OK);
    assert_string_equal(n1, n2);
    assert_int_equal(o1, o2);
    assert_int_equal(d1, d2);
    assert_int_equal(s1[0], s2[0]);
    if (d1 == 2) assert_int_equal(s1[1], s2[1]);
  }
  pa = prm_model_params(a, &na);
  pb = prm_model_params(b, &nb);
  assert_int_equal(na, nb);
  assert_memory_equal(pa, pb, na * sizeof(float)); /* bit-exact */
  if (prm_model_arch(a) == PRM_ARCH_MLP) {
    prm_model_options oa, ob;
    prm_model_options_init(&oa, PRM_MODEL_OPTIONS_VERSION);
    prm_model_options_init(&ob, PRM_MODEL_OPTIONS_VERSION);
    assert_int_equal(prm_model_get_options(a, &oa), PRM_OK);
    assert_int_equal(prm_model_get_options(b, &ob), PRM_OK);
    assert_int_equal(oa.activation, ob.activation);
    assert_int_equal(oa.n_hidden, ob.n_hidden);
    for (uint32_t i = 0; i < oa.n_hidden; i++)
      assert_int_equal(oa.hidden[i], ob.hidden[i]);
  }
}

/* Score the same random rows with both models: results must be bit-equal. */
static void assert_same_scores(const prm_model *a, const prm_model *b) {
  enum { N = 7 };
  uint64_t d = prm_model_input_size(a);
  float *x = malloc(N * d * sizeof(float));
  float sa[N], sb[N];
  prmt_rng r = {42};
  prm_ctx *ca = prmt_ctx(a, N, 1), *cb = prmt_ctx(b, N, 1);
  prm_batch batch;
  assert_non_null(x);
  prmt_fill_normal(&r, x, N * d, 1.0);
  batch = prmt_batch(x, N, d);
  assert_int_equal(prm_ctx_forward(ca, &batch, sa, N), PRM_OK);
  assert_int_equal(prm_ctx_forward(cb, &batch, sb, N), PRM_OK);
  assert_memory_equal(sa, sb, sizeof sa);
  prm_ctx_free(ca);
  prm_ctx_free(cb);
  free(x);
}

/* Entries of PRM_TEST_TMPDIR whose names start with prefix. */
static int count_prefixed(const char *prefix) {
  DIR *dir = opendir(PRM_TEST_TMPDIR);
  struct dirent *e;
  int n = 0;
  assert_non_null(dir);
  while ((e = readdir(dir)) != NULL)
    if (strncmp(e->d_name, prefix, strlen(prefix)) == 0) n++;
  closedir(dir);
  return n;
}

static const uint64_t k_hidden[3] = {7, 5, 3};

/* ---- round trips ----------------------------------------------------------------- */

static void roundtrip(prm_model *m, const char *name) {
  char path[512];
  prm_model *back = NULL;
  prmt_tmp_path(path, sizeof path, name);
  assert_int_equal(prm_model_save(m, path), PRM_OK);
  assert_int_equal(prm_model_load(&back, path), PRM_OK);
  assert_non_null(back);
  assert_same_model(m, back);
  assert_same_scores(m, back);
  prm_model_free(back);
  remove(path);
}

static void test_roundtrip_linear(void **state) {
  (void)state;
  prm_model *m = prmt_linear(13, 1);
  float *p = prm_model_params(m, NULL);
  /* values whose bits a sloppy writer would change */
  p[0] = -0.0f;
  p[1] = 1e-40f; /* subnormal */
  p[2] = FLT_MAX;
  p[3] = -FLT_MIN;
  roundtrip(m, "ckpt_linear.safetensors");
  prm_model_free(m);
}

static void test_roundtrip_mlp(void **state) {
  (void)state;
  const int32_t acts[3] = {PRM_ACT_RELU, PRM_ACT_GELU_TANH, PRM_ACT_TANH};
  for (int a = 0; a < 3; a++) {
    prm_model *m = prmt_mlp(6, k_hidden, 3, acts[a], (uint64_t)a + 10);
    roundtrip(m, "ckpt_mlp.safetensors");
    prm_model_free(m);
  }
  /* the widest configuration: PRM_MAX_HIDDEN layers */
  uint64_t h[PRM_MAX_HIDDEN];
  for (int i = 0; i < PRM_MAX_HIDDEN; i++)
    h[i] = (uint64_t)(i % 3) + 1;
  prm_model *m = prmt_mlp(2, h, PRM_MAX_HIDDEN, PRM_ACT_TANH, 5);
  roundtrip(m, "ckpt_deep.safetensors");
  prm_model_free(m);
}

static void test_buffer_equals_file(void **state) {
  (void)state;
  char path[512];
  size_t nf, nb;
  prm_model *m = prmt_mlp(6, k_hidden, 3, PRM_ACT_GELU_TANH, 3), *back = NULL;
  prmt_tmp_path(path, sizeof path, "ckpt_buf.safetensors");
  assert_int_equal(prm_model_save(m, path), PRM_OK);
  unsigned char *file = read_whole(path, &nf);
  unsigned char *buf = save_mem(m, &nb);
  assert_int_equal(nf, nb);
  assert_memory_equal(file, buf, nf);

  /* layout: u64 header length, 8-aligned, JSON that starts with the metadata */
  uint64_t h = 0;
  for (int k = 0; k < 8; k++)
    h |= (uint64_t)buf[k] << (8 * k);
  assert_int_equal(h % 8, 0);
  assert_int_equal(nb, 8 + h + prm_model_num_params(m) * 4);
  char *json = malloc(h + 1);
  memcpy(json, buf + 8, h);
  json[h] = '\0';
  assert_non_null(strstr(json, "{\"__metadata__\":{\"model\":\"mlp\",\"d\":\"6\","
                               "\"hidden\":\"[7, 5, 3]\",\"act\":\"gelu\""));
  assert_non_null(strstr(json, "\"layers.2.bias\":{\"dtype\":\"F32\",\"shape\":[3]"));
  assert_non_null(strstr(json, "\"score.weight\":{\"dtype\":\"F32\",\"shape\":[1,3]"));
  free(json);

  assert_int_equal(prm_model_load_buffer(&back, buf, nb), PRM_OK);
  assert_same_model(m, back);
  prm_model_free(back);

  /* bytes after the last tensor are tolerated (documented) */
  unsigned char *longer = malloc(nb + 5);
  memcpy(longer, buf, nb);
  memset(longer + nb, 0xAB, 5);
  assert_int_equal(prm_model_load_buffer(&back, longer, nb + 5), PRM_OK);
  prm_model_free(back);
  free(longer);

  free(file);
  free(buf);
  remove(path);
  prm_model_free(m);
}

static void test_size_query_and_capacity(void **state) {
  (void)state;
  prm_model *m = prmt_linear(10, 2);
  size_t need = 0, got = 0;
  assert_int_equal(prm_model_save_buffer(m, NULL, 0, &need), PRM_OK);
  assert_true(need > 8 + 40);
  unsigned char *buf = malloc(need + 16);
  memset(buf, 0x5A, need + 16);
  assert_int_equal(prm_model_save_buffer(m, buf, need - 1, &got), PRM_ERR_SIZE);
  assert_int_equal(got, need); /* still reports the size */
  assert_true(strlen(prm_last_errmsg()) > 0);
  assert_int_equal(prm_model_save_buffer(m, buf, 0, &got), PRM_ERR_SIZE);
  got = 0;
  assert_int_equal(prm_model_save_buffer(m, buf, need + 16, &got), PRM_OK);
  assert_int_equal(got, need);
  assert_int_equal(buf[need], 0x5A); /* nothing written past the checkpoint */
  free(buf);
  prm_model_free(m);
}

static void test_null_args(void **state) {
  (void)state;
  prm_model *m = prmt_linear(3, 1), *out = (prm_model *)(uintptr_t)1;
  char path[512];
  size_t n = 0;
  unsigned char byte = 0;
  prmt_tmp_path(path, sizeof path, "ckpt_null.safetensors");
  assert_int_equal(prm_model_save(NULL, path), PRM_ERR_NULL);
  assert_int_equal(prm_model_save(m, NULL), PRM_ERR_NULL);
  assert_int_equal(prm_model_save_buffer(NULL, NULL, 0, &n), PRM_ERR_NULL);
  assert_int_equal(prm_model_save_buffer(m, NULL, 0, NULL), PRM_ERR_NULL);
  assert_int_equal(prm_model_load(NULL, path), PRM_ERR_NULL);
  assert_int_equal(prm_model_load(&out, NULL), PRM_ERR_NULL);
  assert_null(out);
  out = (prm_model *)(uintptr_t)1;
  assert_int_equal(prm_model_load_buffer(NULL, &byte, 1), PRM_ERR_NULL);
  assert_int_equal(prm_model_load_buffer(&out, NULL, 0), PRM_ERR_NULL);
  assert_null(out);
  assert_true(strlen(prm_last_errmsg()) > 0);
  prm_model_free(m);
}

/* ---- malformed input ------------------------------------------------------------- */

static void test_truncated_everywhere(void **state) {
  (void)state;
  const uint64_t h[1] = {2};
  prm_model *m = prmt_mlp(3, h, 1, PRM_ACT_RELU, 4);
  size_t n;
  unsigned char *full = save_mem(m, &n);
  for (size_t len = 0; len < n; len++) {
    /* an exact-size copy, so a read past the end is caught by ASan/valgrind */
    unsigned char *cut = malloc(len > 0 ? len : 1);
    memcpy(cut, full, len);
    expect_fail(cut, len, PRM_ERR_FORMAT, NULL);
    free(cut);
  }
  prm_model *back = NULL;
  assert_int_equal(prm_model_load_buffer(&back, full, n), PRM_OK);
  prm_model_free(back);
  free(full);
  prm_model_free(m);
}

static void test_header_length(void **state) {
  (void)state;
  const uint64_t lens[] = {UINT64_MAX, (uint64_t)1 << 40, 100000001ull, 1000, 9, 1, 0};
  unsigned char buf[16] = {0};
  memcpy(buf + 8, "{}      ", 8);
  for (size_t i = 0; i < sizeof lens / sizeof lens[0]; i++) {
    for (int k = 0; k < 8; k++)
      buf[k] = (unsigned char)(lens[i] >> (8 * k));
    expect_fail(buf, sizeof buf, PRM_ERR_FORMAT, NULL);
  }
  /* header "{}" with no tensors: valid JSON, but the model is missing */
  for (int k = 0; k < 8; k++)
    buf[k] = (unsigned char)((uint64_t)8 >> (8 * k));
  expect_fail(buf, sizeof buf, PRM_ERR_FORMAT, "missing tensor score.weight");
}

/* A small mlp (d 2, hidden [2]) laid out in 32 bytes, used by the corpus. */
#define M_MLP "\"__metadata__\":{\"model\":\"mlp\",\"d\":\"2\",\"hidden\":\"[2]\",\"act\":\"relu\"}"
#define T_W0 "\"layers.0.weight\":{\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":[0,16]}"
#define T_B0 "\"layers.0.bias\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[16,24]}"
#define T_S "\"score.weight\":{\"dtype\":\"F32\",\"shape\":[1,2],\"data_offsets\":[24,32]}"
#define MLP_OK "{" M_MLP "," T_W0 "," T_B0 "," T_S "}"
#define M_LIN "\"__metadata__\":{\"model\":\"linear\",\"d\":\"2\"}"
#define T_LIN "\"score.weight\":{\"dtype\":\"F32\",\"shape\":[1,2],\"data_offsets\":[0,8]}"

typedef struct bad_case {
  const char *header;
  int status;
  const char *needle; /* expected in the message; NULL: any */
} bad_case;

static const bad_case k_bad[] = {
    /* JSON syntax */
    {"", PRM_ERR_FORMAT, NULL},
    {"{", PRM_ERR_FORMAT, NULL},
    {"[]", PRM_ERR_FORMAT, NULL},
    {"null", PRM_ERR_FORMAT, NULL},
    {"{" T_LIN, PRM_ERR_FORMAT, NULL},
    {"{" T_LIN "}}", PRM_ERR_FORMAT, "trailing"},
    {"{" T_LIN ",}", PRM_ERR_FORMAT, NULL},
    {"{\"score.weight\":}", PRM_ERR_FORMAT, NULL},
    {"{\"score.weight\" {\"dtype\":\"F32\",\"shape\":[1,2],\"data_offsets\":[0,8]}}",
     PRM_ERR_FORMAT, "expected ':'"},
    {"{\"score.weight:{\"dtype\":\"F32\"}}", PRM_ERR_FORMAT, NULL},
    {"{\"sc\\qre.weight\":{}}", PRM_ERR_FORMAT, "escape"},
    {"{\"sc\\u00zz\":{}}", PRM_ERR_FORMAT, "\\u"},
    {"{\"sc\\ud800\":{}}", PRM_ERR_FORMAT, "surrogate"},
    {"{\"sc\\u0000\":{}}", PRM_ERR_FORMAT, "NUL"},
    {"{\"sc\xff\":{}}", PRM_ERR_FORMAT, "UTF-8"},
    {"{\"sc\xc0\xae\":{}}", PRM_ERR_FORMAT, "UTF-8"},
    {"{\"sc\tx\":{}}", PRM_ERR_FORMAT, "control"},
    {"{\"score.weight\":{\"dtype\":\"F32\",\"shape\":[1,2],\"data_offsets\":[00,8]}}",
     PRM_ERR_FORMAT, "leading zero"},
    {"{\"score.weight\":{\"dtype\":\"F32\",\"shape\":[1,-2],\"data_offsets\":[0,8]}}",
     PRM_ERR_FORMAT, "non-negative"},
    {"{\"score.weight\":{\"dtype\":\"F32\",\"shape\":[1,2.0],\"data_offsets\":[0,8]}}",
     PRM_ERR_FORMAT, "fraction"},
    {"{\"score.weight\":{\"dtype\":\"F32\",\"shape\":[1,99999999999999999999],"
     "\"data_offsets\":[0,8]}}",
     PRM_ERR_FORMAT, "too large"},
    {"{\"score.weight\":{\"dtype\":\"F32\",\"shape\":[1,2],\"data_offsets\":[0,8,16]}}",
     PRM_ERR_FORMAT, "too many"},
    {"{\"score.weight\":{\"dtype\":\"F32\",\"shape\":[1,2],\"data_offsets\":[8]}}", PRM_ERR_FORMAT,
     "two elements"},
    {"{\"score.weight\":{\"dtype\":\"F32\",\"shape\":[1,2]}}", PRM_ERR_FORMAT, "data_offsets"},
    {"{\"score.weight\":{\"shape\":[1,2],\"data_offsets\":[0,8]}}", PRM_ERR_FORMAT, "dtype"},
    {"{\"score.weight\":{\"dtype\":\"F32\",\"dtype\":\"F32\",\"shape\":[1,2],"
     "\"data_offsets\":[0,8]}}",
     PRM_ERR_FORMAT, "duplicate"},
    {"{\"score.weight\":{\"dtype\":\"F32\",\"shape\":[1,2],\"data_offsets\":[0,8],"
     "\"x\":[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["
     "]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}}",
     PRM_ERR_FORMAT, "deeply"},
    {"{\"score.weight\":{\"dtype\":\"F32\",\"shape\":[1,2],\"data_offsets\":[0,8],"
     "\"x\":tru}}",
     PRM_ERR_FORMAT, NULL},
    {"{\"__metadata__\":{\"model\":1}," T_LIN "}", PRM_ERR_FORMAT, "strings"},
    {"{\"__metadata__\":{\"model\":\"linear\",\"model\":\"linear\"}," T_LIN "}", PRM_ERR_FORMAT,
     "duplicate"},
    {"{" M_LIN "," M_LIN "," T_LIN "}", PRM_ERR_FORMAT, "duplicate __metadata__"},
    /* tensors */
    {"{\"score.weight\":{\"dtype\":\"F16\",\"shape\":[1,2],\"data_offsets\":[0,4]}}",
     PRM_ERR_FORMAT, "tensor score.weight has dtype F16, expected F32"},
    {"{\"score.weight\":{\"dtype\":\"BF16\",\"shape\":[1,2],\"data_offsets\":[0,4]}}",
     PRM_ERR_FORMAT, "dtype BF16"},
    {"{" M_LIN ",\"score.weight\":{\"dtype\":\"F32\",\"shape\":[1,3],\"data_offsets\":[0,12]}}",
     PRM_ERR_FORMAT, "has shape [1, 3], expected [1, 2]"},
    {"{\"score.weight\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", PRM_ERR_FORMAT,
     "2-D"},
    {"{\"score.weight\":{\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":[0,16]}}",
     PRM_ERR_FORMAT, "expected [1, 2]"},
    {"{\"score.weight\":{\"dtype\":\"F32\",\"shape\":[1,2,1],\"data_offsets\":[0,8]}}",
     PRM_ERR_FORMAT, "2-D"},
    {"{\"score.weight\":{\"dtype\":\"F32\",\"shape\":[1,2],\"data_offsets\":[36,44]}}",
     PRM_ERR_FORMAT, "outside the data area"},
    {"{\"score.weight\":{\"dtype\":\"F32\",\"shape\":[1,2],\"data_offsets\":[8,0]}}",
     PRM_ERR_FORMAT, "outside"},
    {"{\"score.weight\":{\"dtype\":\"F32\",\"shape\":[1,2],"
     "\"data_offsets\":[18446744073709551608,18446744073709551615]}}",
     PRM_ERR_FORMAT, "outside"},
    {"{\"score.weight\":{\"dtype\":\"F32\",\"shape\":[1,2],\"data_offsets\":[0,12]}}",
     PRM_ERR_FORMAT, "span 12 bytes, shape needs 8"},
    {"{\"score.weight\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296],"
     "\"data_offsets\":[0,8]}}",
     PRM_ERR_FORMAT, "overflow"},
    {"{" M_MLP "," T_W0
     ",\"layers.0.bias\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[12,20]}," T_S "}",
     PRM_ERR_FORMAT, "overlap"},
    {"{" M_MLP "," T_W0 "," T_S "}", PRM_ERR_FORMAT, "missing tensor layers.0.bias"},
    {"{" M_MLP "," T_W0 "," T_B0 "}", PRM_ERR_FORMAT, "missing tensor score.weight"},
    {"{" T_LIN ",\"extra.weight\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,16]}}",
     PRM_ERR_FORMAT, "unexpected tensor extra.weight"},
    {"{" T_LIN "," T_LIN "}", PRM_ERR_FORMAT, "duplicate tensor score.weight"},
    {"{\"score\\u002eweight\":{\"dtype\":\"F32\",\"shape\":[1,2],\"data_offsets\":[0,8]}," T_LIN
     "}",
     PRM_ERR_FORMAT, "duplicate tensor score.weight"},
    {"{" M_MLP "," T_W0 "," T_B0 "," T_S
     ",\"layers.1.weight\":{\"dtype\":\"F32\",\"shape\":[1,2],\"data_offsets\":[32,40]}}",
     PRM_ERR_FORMAT, "unexpected tensor layers.1.weight for an mlp model"},
    {"{" M_MLP "," T_W0 "," T_B0 "," T_S
     ",\"layers.1.bias\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[32,36]}}",
     PRM_ERR_FORMAT, "unexpected tensor layers.1.bias"},
    /* configuration */
    {"{\"__metadata__\":{\"model\":\"linear\",\"d\":\"2\"}," T_W0 "," T_B0 "," T_S "}",
     PRM_ERR_FORMAT, "unexpected tensor layers.0.weight for a linear model"},
    {"{\"__metadata__\":{\"model\":\"mlp\",\"act\":\"relu\"}," T_LIN "}", PRM_ERR_FORMAT,
     "layers.0.weight"},
    {"{\"__metadata__\":{\"model\":\"cnn\"}," T_LIN "}", PRM_ERR_FORMAT, "unknown model type"},
    {"{\"__metadata__\":{\"model\":\"linear\",\"d\":\"3\"}," T_LIN "}", PRM_ERR_FORMAT,
     "expected [1, 3]"},
    {"{\"__metadata__\":{\"model\":\"linear\",\"d\":\"0\"}," T_LIN "}", PRM_ERR_FORMAT,
     "positive integer"},
    {"{\"__metadata__\":{\"model\":\"linear\",\"d\":\"2x\"}," T_LIN "}", PRM_ERR_FORMAT,
     "positive integer"},
    {"{\"__metadata__\":{\"model\":\"linear\",\"d\":\"99999999999\"}," T_LIN "}", PRM_ERR_FORMAT,
     NULL},
    {"{\"__metadata__\":{\"model\":\"mlp\",\"d\":\"2\",\"hidden\":\"[3]\",\"act\":\"relu\"}," T_W0
     "," T_B0 "," T_S "}",
     PRM_ERR_FORMAT, "layers.0.weight has shape [2, 2], expected [3, 2]"},
    {"{\"__metadata__\":{\"model\":\"mlp\",\"d\":\"2\",\"hidden\":\"[2, "
     "2]\",\"act\":\"relu\"}," T_W0 "," T_B0 "," T_S "}",
     PRM_ERR_FORMAT, "missing tensor layers.1.weight"},
    {"{\"__metadata__\":{\"model\":\"mlp\",\"hidden\":\"2\",\"act\":\"relu\"}," T_W0 "," T_B0
     "," T_S "}",
     PRM_ERR_FORMAT, "hidden"},
    {"{\"__metadata__\":{\"model\":\"mlp\",\"hidden\":\"[]\",\"act\":\"relu\"}," T_W0 "," T_B0
     "," T_S "}",
     PRM_ERR_FORMAT, "no hidden layer"},
    {"{\"__metadata__\":{\"model\":\"mlp\",\"d\":\"2\",\"hidden\":\"[2]\"}," T_W0 "," T_B0 "," T_S
     "}",
     PRM_ERR_FORMAT, "'act'"},
    {"{" T_W0 "," T_B0 "," T_S "}", PRM_ERR_FORMAT, "'act'"},
    {"{\"__metadata__\":{\"model\":\"mlp\",\"act\":\"swish\"}," T_W0 "," T_B0 "," T_S "}",
     PRM_ERR_FORMAT, "unknown activation"},
    {"{\"__metadata__\":{\"model\":\"gpt2\"}," T_LIN "}", PRM_ERR_UNSUPPORTED, "gpt2"},
    {"{\"transformer.wte.weight\":{\"dtype\":\"F32\",\"shape\":[1,2],\"data_offsets\":[0,8]}}",
     PRM_ERR_UNSUPPORTED, "GPT-2"},
    {"{\"wte.weight\":{\"dtype\":\"F16\",\"shape\":[1,2],\"data_offsets\":[0,4]}}",
     PRM_ERR_UNSUPPORTED, NULL},
    {"{" M_LIN "," T_LIN
     ",\"transformer.ln_f.weight\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,16]}}",
     PRM_ERR_FORMAT, "unexpected tensor transformer.ln_f.weight"},
};

/* 10 floats: the 8 of the small mlp, then 2 spare for "extra tensor" cases. */
static unsigned char k_data[40];

static void fill_data(void) {
  float v[10];
  for (int i = 0; i < 10; i++)
    v[i] = 0.125f * (float)(i + 1);
  le_floats(k_data, v, 10);
}

static void test_malformed_corpus(void **state) {
  (void)state;
  fill_data();
  for (size_t i = 0; i < sizeof k_bad / sizeof k_bad[0]; i++) {
    size_t n;
    unsigned char *buf = make_st(k_bad[i].header, k_data, sizeof k_data, &n);
    if (getenv("PRM_TEST_VERBOSE") != NULL) print_message("case %zu: %s\n", i, k_bad[i].header);
    expect_fail(buf, n, k_bad[i].status, k_bad[i].needle);
    if (getenv("PRM_TEST_VERBOSE") != NULL) print_message("  -> %s\n", prm_last_errmsg());
    free(buf);
  }
}

/* Hand-written headers that must load: inference without metadata, escapes,
 * unknown metadata keys and fields, whitespace, any tensor order. */
static void test_valid_variants(void **state) {
  (void)state;
  static const char *const ok[] = {
      "{" T_LIN "}",
      MLP_OK,
      "{" T_S "," T_B0 "," T_W0 ",\"__metadata__\":{\"act\":\"relu\"}}",
      " { \"__metadata__\" : { \"format\" : \"pt\" , \"note\":\"\\u00e9\\ud83d\\ude00\\n\" } ,"
      " \"score\\u002eweight\" : {\"extra\":[1.5e3,true,null,{\"a\":false}],\"dtype\":\"F32\","
      "\"shape\":[ 1 , 2 ],\"data_offsets\":[24,32]}}   ",
      "{\"__metadata__\":null," T_LIN "}",
      "{\"__metadata__\":{\"model\":\"mlp\",\"d\":\"2\",\"hidden\":\" [ 2 ] \",\"act\":\"relu\","
      "\"loss\":\"0.5\"}," T_W0 "," T_B0 "," T_S "}",
  };
  fill_data();
  for (size_t i = 0; i < sizeof ok / sizeof ok[0]; i++) {
    size_t n;
    prm_model *m = NULL;
    unsigned char *buf = make_st(ok[i], k_data, sizeof k_data, &n);
    int rc = prm_model_load_buffer(&m, buf, n);
    if (rc != PRM_OK) fail_msg("case %zu: %s (%s)", i, prm_status_string(rc), prm_last_errmsg());
    assert_non_null(m);
    float *p = prm_model_params(m, NULL);
    if (prm_model_arch(m) == PRM_ARCH_LINEAR) {
      float want = i == 3 ? 0.875f : 0.125f; /* case 3 points score.weight at bytes 24..32 */
      assert_true(p[0] == want);
    } else {
      assert_int_equal(prm_model_num_params(m), 8);
      for (int k = 0; k < 8; k++)
        assert_true(p[k] == 0.125f * (float)(k + 1));
    }
    free(buf);
    prm_model_free(m);
  }
}

static void test_nonfinite_values(void **state) {
  (void)state;
  const float bad[3] = {NAN, INFINITY, -INFINITY};
  for (int i = 0; i < 3; i++) {
    float v[8];
    unsigned char data[32];
    size_t n;
    for (int k = 0; k < 8; k++)
      v[k] = 0.5f;
    v[5] = bad[i]; /* inside layers.0.bias */
    le_floats(data, v, 8);
    unsigned char *buf = make_st(MLP_OK, data, sizeof data, &n);
    expect_fail(buf, n, PRM_ERR_FORMAT, "layers.0.bias contains NaN or Inf");
    free(buf);
  }
}

/* Flip every byte of the header to a few values: must never crash. */
static void test_header_mutations(void **state) {
  (void)state;
  const unsigned char vals[] = {0, '"', '{', '}', '[', ']', ',', ':', '\\', '9', 0xff};
  size_t n;
  fill_data();
  unsigned char *buf = make_st(MLP_OK, k_data, sizeof k_data, &n);
  size_t hlen = strlen(MLP_OK);
  for (size_t i = 8; i < 8 + hlen; i++) {
    unsigned char keep = buf[i];
    for (size_t v = 0; v < sizeof vals; v++) {
      prm_model *m = NULL;
      buf[i] = vals[v];
      int rc = prm_model_load_buffer(&m, buf, n);
      if (rc == PRM_OK) {
        prm_model_free(m); /* some mutations stay valid (e.g. a digit) */
      } else {
        assert_null(m);
        assert_true(strlen(prm_last_errmsg()) > 0);
      }
    }
    buf[i] = keep;
  }
  free(buf);
}

/* ---- files --------------------------------------------------------------------- */

static void test_atomic_save(void **state) {
  (void)state;
  char path[512], dir[512], base[256];
  prm_model *m = prmt_mlp(4, k_hidden, 2, PRM_ACT_TANH, 9), *back = NULL;

  /* a directory that does not exist: PRM_ERR_IO, nothing created */
  snprintf(path, sizeof path, "%s/no-such-dir.%ld/x.safetensors", PRM_TEST_TMPDIR, (long)getpid());
  assert_int_equal(prm_model_save(m, path), PRM_ERR_IO);
  assert_true(strlen(prm_last_errmsg()) > 0);
  assert_int_equal(count_prefixed("no-such-dir."), 0);

  /* the target is a directory: the rename fails, the temp file is removed */
  snprintf(base, sizeof base, "ckpt_isdir.%ld", (long)getpid());
  snprintf(dir, sizeof dir, "%s/%s", PRM_TEST_TMPDIR, base);
  assert_int_equal(mkdir(dir, 0755), 0);
  assert_int_equal(prm_model_save(m, dir), PRM_ERR_IO);
  assert_non_null(strstr(prm_last_errmsg(), base));
  struct stat st;
  assert_int_equal(stat(dir, &st), 0);
  assert_true(S_ISDIR(st.st_mode));
  char tmp_prefix[300];
  snprintf(tmp_prefix, sizeof tmp_prefix, "%s.tmp.", base);
  assert_int_equal(count_prefixed(tmp_prefix), 0);
  /* loading a directory is an I/O error */
  assert_int_equal(prm_model_load(&back, dir), PRM_ERR_IO);
  assert_null(back);
  assert_non_null(strstr(prm_last_errmsg(), "directory"));
  assert_int_equal(rmdir(dir), 0);

  /* saving over an existing file replaces it, leaving no temp file */
  snprintf(base, sizeof base, "ckpt_replace.%ld", (long)getpid());
  snprintf(path, sizeof path, "%s/%s", PRM_TEST_TMPDIR, base);
  write_whole(path, "old contents that are not a checkpoint", 38);
  assert_int_equal(prm_model_load(&back, path), PRM_ERR_FORMAT);
  assert_int_equal(prm_model_save(m, path), PRM_OK);
  snprintf(tmp_prefix, sizeof tmp_prefix, "%s.tmp.", base);
  assert_int_equal(count_prefixed(tmp_prefix), 0);
  size_t nf, nb;
  unsigned char *file = read_whole(path, &nf), *mem = save_mem(m, &nb);
  assert_int_equal(nf, nb);
  assert_memory_equal(file, mem, nb);
  free(file);
  free(mem);
  assert_int_equal(prm_model_load(&back, path), PRM_OK);
  assert_same_model(m, back);
  prm_model_free(back);
  back = NULL;

  /* missing and empty files */
  remove(path);
  assert_int_equal(prm_model_load(&back, path), PRM_ERR_IO);
  assert_null(back);
  write_whole(path, "", 0);
  assert_int_equal(prm_model_load(&back, path), PRM_ERR_FORMAT);
  assert_null(back);
  remove(path);
  prm_model_free(m);
}

/* ---- PyTorch interoperability -------------------------------------------------- */

/* Python helper: load a checkpoint with torch_ref, dump its tensors (in the
 * order given) and the scores of the rows in a raw feature file. */
static const char k_dump_py[] =
    "import sys\n"
    "sys.path.insert(0, sys.argv[1])\n"
    "import torch, torch_ref\n"
    "ckpt, names, feats, n, d, out_p, out_s = sys.argv[2:9]\n"
    "sd, meta = torch_ref.read_safetensors(ckpt)\n"
    "model = torch_ref.model_from_state(sd, meta)\n"
    "with open(out_p, 'wb') as f:\n"
    "    for nm in names.split(','):\n"
    "        f.write(sd[nm].contiguous().numpy().astype('<f4').tobytes())\n"
    "x = torch.frombuffer(bytearray(open(feats, 'rb').read()), dtype=torch.float32)\n"
    "x = x.reshape(int(n), int(d))\n"
    "with torch.no_grad():\n"
    "    r = model(x)\n"
    "open(out_s, 'wb').write(r.numpy().astype('<f4').tobytes())\n";

static int have_reference(char *refdir, size_t size) {
  char script[600];
  struct stat st;
  if (!prmt_shared_path(refdir, size, "reference")) return 0;
  snprintf(script, sizeof script, "%s/torch_ref.py", refdir);
  if (stat(script, &st) != 0) return 0;
  return prmt_have_torch();
}

/* Compare m (loaded from or saved to ckpt) with torch's view of ckpt:
 * tensors bit-exact, scores within fp32 rounding of a different GEMM. */
static void compare_with_torch(const char *refdir, const prm_model *m, const char *ckpt) {
  enum { N = 5 };
  char py[600], feats[600], outp[600], outs[600], names[2048] = "", cmd[8192];
  uint64_t d = prm_model_input_size(m), np = prm_model_num_params(m);
  float *x = malloc(N * d * sizeof(float)), scores[N];
  prmt_rng r = {7};
  prmt_tmp_path(py, sizeof py, "ckpt_dump.py");
  prmt_tmp_path(feats, sizeof feats, "ckpt_feats.bin");
  prmt_tmp_path(outp, sizeof outp, "ckpt_params.bin");
  prmt_tmp_path(outs, sizeof outs, "ckpt_scores.bin");
  write_whole(py, k_dump_py, sizeof k_dump_py - 1);
  prmt_fill_normal(&r, x, N * d, 1.0);
  unsigned char *raw = malloc(N * d * 4);
  le_floats(raw, x, N * d);
  write_whole(feats, raw, N * d * 4);
  free(raw);
  for (uint32_t i = 0; i < prm_model_num_tensors(m); i++) {
    const char *nm;
    assert_int_equal(prm_model_tensor_info(m, i, &nm, NULL, NULL, NULL), PRM_OK);
    if (i > 0) strcat(names, ",");
    strcat(names, nm);
  }
  snprintf(cmd, sizeof cmd, "'%s' '%s' '%s' '%s' '%s' '%s' %d %llu '%s' '%s'", PRM_PYTHON, py,
           refdir, ckpt, names, feats, N, (unsigned long long)d, outp, outs);
  if (system(cmd) != 0) fail_msg("command failed: %s", cmd);

  size_t n;
  unsigned char *tp = read_whole(outp, &n);
  assert_int_equal(n, np * 4);
  float *mine = prm_model_params((prm_model *)(uintptr_t)m, NULL);
  unsigned char *mine_le = malloc(n);
  le_floats(mine_le, mine, (size_t)np);
  assert_memory_equal(tp, mine_le, n);
  free(tp);
  free(mine_le);

  unsigned char *ts = read_whole(outs, &n);
  assert_int_equal(n, N * 4);
  prm_ctx *c = prmt_ctx(m, N, 1);
  prm_batch b = prmt_batch(x, N, d);
  assert_int_equal(prm_ctx_forward(c, &b, scores, N), PRM_OK);
  for (int i = 0; i < N; i++) {
    uint32_t u = (uint32_t)ts[4 * i] | (uint32_t)ts[4 * i + 1] << 8 |
                 (uint32_t)ts[4 * i + 2] << 16 | (uint32_t)ts[4 * i + 3] << 24;
    float t;
    memcpy(&t, &u, 4);
    if (fabsf(t - scores[i]) > 1e-5f * (1.0f + fabsf(t)))
      fail_msg("row %d: prefrm %.9g, torch %.9g", i, (double)scores[i], (double)t);
  }
  free(ts);
  prm_ctx_free(c);
  free(x);
  remove(py);
  remove(feats);
  remove(outp);
  remove(outs);
}

static void test_torch_written_checkpoint(void **state) {
  (void)state;
  char refdir[512], ckpt[512], cmd[2048];
  static const char *const configs[] = {
      "--model mlp --d 8 --hidden 5,4 --act tanh --seed 3",
      "--model mlp --d 6 --hidden 3 --act gelu --seed 4",
      "--model linear --d 12 --seed 5",
  };
  if (!have_reference(refdir, sizeof refdir)) {
    print_message("skipped: shared/reference/torch_ref.py or torch (%s) not available\n",
                  PRM_PYTHON);
    skip();
  }
  prmt_tmp_path(ckpt, sizeof ckpt, "ckpt_torch.safetensors");
  for (size_t i = 0; i < sizeof configs / sizeof configs[0]; i++) {
    prm_model *m = NULL, *again = NULL;
    snprintf(cmd, sizeof cmd, "'%s' '%s/torch_ref.py' init %s --out '%s' >/dev/null", PRM_PYTHON,
             refdir, configs[i], ckpt);
    if (system(cmd) != 0) fail_msg("command failed: %s", cmd);
    int rc = prm_model_load(&m, ckpt);
    if (rc != PRM_OK) fail_msg("%s: %s (%s)", configs[i], prm_status_string(rc), prm_last_errmsg());
    compare_with_torch(refdir, m, ckpt);
    /* our re-save of it loads to the same model */
    size_t n;
    unsigned char *buf = save_mem(m, &n);
    assert_int_equal(prm_model_load_buffer(&again, buf, n), PRM_OK);
    assert_same_model(m, again);
    free(buf);
    prm_model_free(again);
    prm_model_free(m);
  }
  remove(ckpt);
}

static void test_prefrm_checkpoint_in_torch(void **state) {
  (void)state;
  char refdir[512], ckpt[512];
  if (!have_reference(refdir, sizeof refdir)) {
    print_message("skipped: shared/reference/torch_ref.py or torch (%s) not available\n",
                  PRM_PYTHON);
    skip();
  }
  prmt_tmp_path(ckpt, sizeof ckpt, "ckpt_to_torch.safetensors");
  prm_model *mlp = prmt_mlp(9, k_hidden, 3, PRM_ACT_GELU_TANH, 21);
  prm_model *lin = prmt_linear(11, 22);
  assert_int_equal(prm_model_save(mlp, ckpt), PRM_OK);
  compare_with_torch(refdir, mlp, ckpt);
  assert_int_equal(prm_model_save(lin, ckpt), PRM_OK);
  compare_with_torch(refdir, lin, ckpt);
  prm_model_free(mlp);
  prm_model_free(lin);
  remove(ckpt);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_roundtrip_linear),
      cmocka_unit_test(test_roundtrip_mlp),
      cmocka_unit_test(test_buffer_equals_file),
      cmocka_unit_test(test_size_query_and_capacity),
      cmocka_unit_test(test_null_args),
      cmocka_unit_test(test_truncated_everywhere),
      cmocka_unit_test(test_header_length),
      cmocka_unit_test(test_malformed_corpus),
      cmocka_unit_test(test_valid_variants),
      cmocka_unit_test(test_nonfinite_values),
      cmocka_unit_test(test_header_mutations),
      cmocka_unit_test(test_atomic_save),
      cmocka_unit_test(test_torch_written_checkpoint),
      cmocka_unit_test(test_prefrm_checkpoint_in_torch),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
