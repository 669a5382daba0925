/*
 * test_checkpoint.c - safetensors save/load of linear, mlp and gpt2 models: round
 * trips, buffer API, atomic saves, interoperability with the PyTorch reference
 * (both directions), and corpora of malformed files that must be rejected with
 * a clear PRM_ERR_FORMAT / PRM_ERR_UNSUPPORTED, never a crash. File I/O: loads
 * of special files (FIFO, directory, devices) that must fail at once, a file
 * growing while read, the "<path>.tmp" of a save (leftovers, locks, links),
 * concurrent saves, and saves killed with SIGKILL.
 */
#define _POSIX_C_SOURCE 200809L
#define _DEFAULT_SOURCE /* flock */

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>

#include <cmocka.h> /* after the three above, which it needs */

#include <dirent.h>
#include <fcntl.h>
#include <float.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
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
#define T_WTE                                                                                      \
  "\"transformer.wte.weight\":{\"dtype\":\"F32\",\"shape\":[1,2],\"data_offsets\":[0,8]}"
#define T_WPE                                                                                      \
  "\"transformer.wpe.weight\":{\"dtype\":\"F32\",\"shape\":[1,2],\"data_offsets\":[8,16]}"

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
     PRM_ERR_FORMAT, "duplicate field 'dtype' in tensor score.weight"},
    {"{\"score.weight\":{\"dtype\":\"F32\",\"shape\":[1,2],\"data_offsets\":[0,8],"
     "\"x\":[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["
     "]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}}",
     PRM_ERR_FORMAT, "deeply"},
    {"{\"score.weight\":{\"dtype\":\"F32\",\"shape\":[1,2],\"data_offsets\":[0,8],"
     "\"x\":tru}}",
     PRM_ERR_FORMAT, NULL},
    {"{\"__metadata__\":{\"model\":1}," T_LIN "}", PRM_ERR_FORMAT, "strings"},
    {"{\"__metadata__\":{\"model\":\"linear\",\"model\":\"linear\"}," T_LIN "}", PRM_ERR_FORMAT,
     "duplicate __metadata__ key 'model'"},
    {"{" M_LIN "," M_LIN "," T_LIN "}", PRM_ERR_FORMAT, "duplicate __metadata__"},
    /* a repeated key is refused in every object, known key or not (readers
     * disagree on which value wins); keys compare decoded */
    {"{\"__metadata__\":{\"note\":\"a\",\"format\":\"pt\",\"note\":\"b\"}," T_LIN "}",
     PRM_ERR_FORMAT, "duplicate __metadata__ key 'note'"},
    {"{\"__metadata__\":{\"format\":\"pt\",\"form\\u0061t\":\"pt\"}," T_LIN "}", PRM_ERR_FORMAT,
     "duplicate __metadata__ key 'format'"},
    {"{\"__metadata__\":{\"\":\"a\",\"\":\"b\"}," T_LIN "}", PRM_ERR_FORMAT,
     "duplicate __metadata__ key ''"},
    {"{\"score.weight\":{\"x\":1,\"dtype\":\"F32\",\"shape\":[1,2],\"x\":2,"
     "\"data_offsets\":[0,8]}}",
     PRM_ERR_FORMAT, "duplicate field 'x' in tensor score.weight"},
    {"{\"score.weight\":{\"dtype\":\"F32\",\"shape\":[1,2],\"data_offsets\":[0,8],"
     "\"d\\u0074ype\":\"F32\"}}",
     PRM_ERR_FORMAT, "duplicate field 'dtype'"},
    {"{\"score.weight\":{\"dtype\":\"F32\",\"shape\":[1,2],\"shape\":[1,2],"
     "\"data_offsets\":[0,8]}}",
     PRM_ERR_FORMAT, "duplicate field 'shape'"},
    {"{\"score.weight\":{\"dtype\":\"F32\",\"shape\":[1,2],\"data_offsets\":[0,8],"
     "\"data_offsets\":[0,8]}}",
     PRM_ERR_FORMAT, "duplicate field 'data_offsets'"},
    {"{\"score.weight\":{\"dtype\":\"F32\",\"shape\":[1,2],\"data_offsets\":[0,8],"
     "\"x\":[{\"a\":1,\"b\":{\"c\":true,\"c\":false}}]}}",
     PRM_ERR_FORMAT, "duplicate key 'c'"},
    {"{\"score.weight\":{\"dtype\":\"F32\",\"shape\":[1,2],\"data_offsets\":[0,8],"
     "\"x\":{\"\\n\":1,\"\\u000a\":2}}}",
     PRM_ERR_FORMAT, "duplicate key '?'"},
    /* tensors */
    {"{\"score.weight\":{\"dtype\":\"F64\",\"shape\":[1,2],\"data_offsets\":[0,16]}}",
     PRM_ERR_FORMAT, "tensor score.weight has dtype F64, expected F32, F16 or BF16"},
    {"{\"score.weight\":{\"dtype\":\"I16\",\"shape\":[1,2],\"data_offsets\":[0,4]}}",
     PRM_ERR_FORMAT, "dtype I16"},
    /* half precision: 2 bytes an element, so 8 bytes are not a [1, 2] F16 */
    {"{\"score.weight\":{\"dtype\":\"F16\",\"shape\":[1,2],\"data_offsets\":[0,8]}}",
     PRM_ERR_FORMAT, "data_offsets span 8 bytes, shape needs 4"},
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
    {"{" T_LIN "," T_LIN "}", PRM_ERR_FORMAT, "duplicate tensor 'score.weight'"},
    {"{\"score\\u002eweight\":{\"dtype\":\"F32\",\"shape\":[1,2],\"data_offsets\":[0,8]}," T_LIN
     "}",
     PRM_ERR_FORMAT, "duplicate tensor 'score.weight'"},
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
    /* gpt2 (fuller cases from a real file in test_gpt2_malformed) */
    {"{\"__metadata__\":{\"model\":\"gpt2\"}," T_LIN "}", PRM_ERR_FORMAT,
     "missing tensor transformer.wte.weight"},
    {"{\"transformer.wte.weight\":{\"dtype\":\"F32\",\"shape\":[1,2],\"data_offsets\":[0,8]}}",
     PRM_ERR_FORMAT, "missing tensor transformer.wpe.weight"},
    {"{\"wte.weight\":{\"dtype\":\"U8\",\"shape\":[1,2],\"data_offsets\":[0,2]}}", PRM_ERR_FORMAT,
     "tensor transformer.wte.weight has dtype U8"},
    {"{\"__metadata__\":{\"model\":\"gpt2\",\"n_head\":\"1\"}," T_WTE "," T_WPE "}", PRM_ERR_FORMAT,
     "no transformer block"},
    {"{\"__metadata__\":{\"model\":\"gpt2\"}," T_WTE "," T_WPE ","
     "\"transformer.h.128.ln_1.bias\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[16,24]}}",
     PRM_ERR_FORMAT, "at most 128 blocks"},
    {"{\"__metadata__\":{\"model\":\"gpt2\"}," T_WTE ",\"transformer.wpe.weight\":{\"dtype\":"
     "\"F32\",\"shape\":[2],\"data_offsets\":[8,16]}}",
     PRM_ERR_FORMAT, "wpe.weight must be 2-D"},
    {"{\"__metadata__\":{\"model\":\"gpt2\"},\"transformer.wte.weight\":{\"dtype\":\"F32\","
     "\"shape\":[0,2],\"data_offsets\":[0,0]}," T_WPE "}",
     PRM_ERR_FORMAT, "wte.weight must be 2-D and non-empty"},
    {"{\"__metadata__\":{\"model\":\"gpt2\"}," T_WTE "," T_WPE ","
     "\"transformer.h.0.ln_1.bias\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[16,24]}}",
     PRM_ERR_FORMAT, "'n_head'"},
    {"{\"__metadata__\":{\"model\":\"linear\"}," T_LIN ","
     "\"transformer.h.0.attn.masked_bias\":{\"dtype\":\"F32\",\"shape\":[],\"data_offsets\":[8,12]}"
     "}",
     PRM_ERR_FORMAT, "unexpected tensor transformer.h.0.attn.masked_bias for a linear model"},
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
      /* keys that are alike but not the same, in every kind of object */
      "{\"__metadata__\":{\"note\":\"a\",\"Note\":\"b\",\"note \":\"c\",\"\":\"d\"},"
      "\"score.weight\":{\"x\":{\"a\":1,\"A\":{\"a\":2}},\"X\":[{\"a\":1},{\"a\":2}],"
      "\"dtype\":\"F32\",\"shape\":[1,2],\"data_offsets\":[0,8]}}",
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
  snprintf(tmp_prefix, sizeof tmp_prefix, "%s.tmp", base);
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
  snprintf(tmp_prefix, sizeof tmp_prefix, "%s.tmp", base);
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

/* Metadata of n distinct keys "k0".."k<n-1>" (key `dup` repeats key 0 when
 * >= 0) on the small linear file: the bounds of the per-object key set. */
static unsigned char *many_keys(int n, int dup, size_t *size) {
  size_t cap = 64 + (size_t)n * 24 + sizeof T_LIN, len = 0;
  char *h = malloc(cap);
  unsigned char *buf;
  assert_non_null(h);
  len += (size_t)snprintf(h + len, cap - len, "{\"__metadata__\":{");
  for (int i = 0; i < n; i++)
    len +=
        (size_t)snprintf(h + len, cap - len, "%s\"k%d\":\"v\"", i > 0 ? "," : "", i == dup ? 0 : i);
  snprintf(h + len, cap - len, "}," T_LIN "}");
  fill_data();
  buf = make_st(h, k_data, sizeof k_data, size);
  free(h);
  return buf;
}

static void test_duplicate_keys_bounds(void **state) {
  (void)state;
  size_t n;
  prm_model *m = NULL;
  /* 8192 keys in one object are allowed; keys are kept on the heap past 8 */
  unsigned char *buf = many_keys(8192, -1, &n);
  assert_int_equal(prm_model_load_buffer(&m, buf, n), PRM_OK);
  prm_model_free(m);
  free(buf);
  buf = many_keys(8193, -1, &n);
  expect_fail(buf, n, PRM_ERR_FORMAT, "object has more than 8192 keys");
  free(buf);
  /* a repeat far from the first occurrence is found too */
  buf = many_keys(3000, 2999, &n);
  expect_fail(buf, n, PRM_ERR_FORMAT, "duplicate __metadata__ key 'k0'");
  free(buf);

  /* a long repeated key is named, shortened */
  char key[400], header[1024];
  memset(key, 'z', sizeof key - 1);
  key[sizeof key - 1] = '\0';
  snprintf(header, sizeof header, "{\"__metadata__\":{\"%s\":\"a\",\"%s\":\"b\"}," T_LIN "}", key,
           key);
  buf = make_st(header, k_data, sizeof k_data, &n);
  expect_fail(buf, n, PRM_ERR_FORMAT, "duplicate __metadata__ key 'zzzzzzzzzz");
  assert_non_null(strstr(prm_last_errmsg(), "...'"));
  free(buf);
}

/* The load of a path that is not a regular file fails fast with PRM_ERR_IO
 * and a message containing `needle`. */
static void expect_load_io(const char *path, const char *needle) {
  prm_model *m = (prm_model *)(uintptr_t)1;
  int rc;
  alarm(20); /* a regression that blocks in open() kills the test, not the CI job */
  rc = prm_model_load(&m, path);
  alarm(0);
  if (rc != PRM_ERR_IO)
    fail_msg("loading %s: expected PRM_ERR_IO, got %s (%s)", path, prm_status_string(rc),
             prm_last_errmsg());
  assert_null(m);
  if (strstr(prm_last_errmsg(), needle) == NULL)
    fail_msg("message '%s' lacks '%s'", prm_last_errmsg(), needle);
}

static void test_load_special_files(void **state) {
  (void)state;
  char path[512];
  prmt_tmp_path(path, sizeof path, "ckpt_fifo");
  unlink(path);
  assert_int_equal(mkfifo(path, 0600), 0);
  expect_load_io(path, "is a FIFO, not a regular file"); /* no writer: must not block */
  unlink(path);
  prmt_tmp_path(path, sizeof path, "ckpt_dir");
  assert_int_equal(mkdir(path, 0700), 0);
  expect_load_io(path, "is a directory, not a regular file");
  rmdir(path);
  if (access("/dev/zero", R_OK) == 0) expect_load_io("/dev/zero", "character device");
  if (access("/dev/null", R_OK) == 0) expect_load_io("/dev/null", "character device");
  /* a "regular" file whose st_size (0) understates what read() returns */
  if (access("/proc/self/status", R_OK) == 0)
    expect_load_io("/proc/self/status", "changed while being read");
  prmt_tmp_path(path, sizeof path, "ckpt_missing");
  expect_load_io(path, "cannot open");
}

/* ---- a file that grows while being read ---------------------------------------- */

typedef struct appender {
  const char *path;
  atomic_int stop;
  long appended;
} appender;

static void *append_loop(void *arg) {
  appender *a = arg;
  int fd = open(a->path, O_WRONLY | O_APPEND | O_CLOEXEC);
  static const char junk[4096] = {0};
  if (fd < 0) return NULL;
  /* at most 16 MB beyond the checkpoint, in small steps */
  while (!atomic_load(&a->stop) && a->appended < 16L << 20) {
    if (write(fd, junk, 256) != 256) break;
    a->appended += 256;
  }
  close(fd);
  return NULL;
}

static void test_load_growing_file(void **state) {
  (void)state;
  const uint64_t h[1] = {256};
  prm_model *m = prmt_mlp(512, h, 1, PRM_ACT_RELU, 21); /* about 0.5 MB */
  char path[512];
  pthread_t t;
  appender a;
  int ok = 0, changed = 0;
  prmt_tmp_path(path, sizeof path, "ckpt_growing");
  assert_int_equal(prm_model_save(m, path), PRM_OK);
  a.path = path;
  a.appended = 0;
  atomic_init(&a.stop, 0);
  assert_int_equal(pthread_create(&t, NULL, append_loop, &a), 0);
  /* Whatever the interleaving: the checkpoint (bytes after it are allowed)
   * or PRM_ERR_IO "changed while being read"; never a torn model. */
  for (int i = 0; i < 8; i++) {
    prm_model *back = NULL;
    int rc = prm_model_load(&back, path);
    if (rc == PRM_OK) {
      assert_same_model(m, back);
      prm_model_free(back);
      ok++;
    } else {
      if (rc != PRM_ERR_IO || strstr(prm_last_errmsg(), "changed while being read") == NULL)
        fail_msg("load of a growing file: %s (%s)", prm_status_string(rc), prm_last_errmsg());
      assert_null(back);
      changed++;
    }
  }
  atomic_store(&a.stop, 1);
  assert_int_equal(pthread_join(t, NULL), 0);
  prm_model *back = NULL; /* at rest: the checkpoint with bytes after it */
  assert_int_equal(prm_model_load(&back, path), PRM_OK);
  assert_same_model(m, back);
  prm_model_free(back);
  if (getenv("PRM_TEST_VERBOSE") != NULL)
    print_message("growing file: %d loads, %d refused as changed, %ld bytes appended\n", ok,
                  changed, a.appended);
  unlink(path);
  prm_model_free(m);
}

/* ---- the temporary file of a save -------------------------------------------------- */

static int file_equals(const char *path, const unsigned char *bytes, size_t n) {
  size_t nf;
  unsigned char *f = read_whole(path, &nf);
  int same = nf == n && memcmp(f, bytes, n) == 0;
  free(f);
  return same;
}

/* Entries "<base>.tmp*" beside <base> (any temporary-file naming). */
static int count_temps(const char *base) {
  char prefix[300];
  snprintf(prefix, sizeof prefix, "%s.tmp", base);
  return count_prefixed(prefix);
}

static void test_save_temp_file(void **state) {
  (void)state;
  char base[256], path[512], tmp[600], link_target[600];
  prm_model *a = prmt_linear(6, 1), *b = prmt_linear(6, 2);
  size_t na, nb;
  unsigned char *bytes_a = save_mem(a, &na), *bytes_b = save_mem(b, &nb);
  struct stat st;
  snprintf(base, sizeof base, "ckpt_tmpfile.%ld", (long)getpid());
  snprintf(path, sizeof path, "%s/%s", PRM_TEST_TMPDIR, base);
  snprintf(tmp, sizeof tmp, "%s.tmp", path);
  assert_int_equal(prm_model_save(a, path), PRM_OK);

  /* a crashed save's leftover (garbage, mode 0600) is replaced: the new file
   * has the mode of a fresh file, 0666 & ~umask, and no leftover remains */
  write_whole(tmp, "half a checkpoint", 17);
  assert_int_equal(chmod(tmp, 0600), 0);
  mode_t old_mask = umask(022);
  assert_int_equal(prm_model_save(b, path), PRM_OK);
  umask(old_mask);
  assert_true(file_equals(path, bytes_b, nb));
  assert_int_equal(stat(path, &st), 0);
  assert_int_equal(st.st_mode & 0777, 0644);
  assert_int_equal(count_temps(base), 0);

  /* a save in progress (it holds the lock on <path>.tmp): PRM_ERR_IO, and
   * neither the target nor the other save's file is touched */
  int fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  assert_true(fd >= 0);
  assert_int_equal(flock(fd, LOCK_EX | LOCK_NB), 0);
  assert_int_equal(write(fd, "partial", 7), 7);
  assert_int_equal(prm_model_save(a, path), PRM_ERR_IO);
  assert_non_null(strstr(prm_last_errmsg(), "another save to"));
  assert_non_null(strstr(prm_last_errmsg(), "is in progress"));
  assert_non_null(strstr(prm_last_errmsg(), base));
  assert_true(file_equals(path, bytes_b, nb));
  assert_true(file_equals(tmp, (const unsigned char *)"partial", 7));
  close(fd); /* that save "died": its lock is gone, its file stays */
  assert_int_equal(count_temps(base), 1);
  assert_int_equal(prm_model_save(a, path), PRM_OK);
  assert_true(file_equals(path, bytes_a, na));
  assert_int_equal(count_temps(base), 0);

  /* "<path>.tmp" that is not a regular file is refused, quickly, and kept */
  assert_int_equal(mkfifo(tmp, 0600), 0);
  alarm(20);
  assert_int_equal(prm_model_save(b, path), PRM_ERR_IO);
  alarm(0);
  assert_non_null(strstr(prm_last_errmsg(), "is a FIFO, not a regular file"));
  assert_true(file_equals(path, bytes_a, na));
  assert_int_equal(lstat(tmp, &st), 0);
  assert_true(S_ISFIFO(st.st_mode));
  unlink(tmp);
  assert_int_equal(mkdir(tmp, 0700), 0);
  assert_int_equal(prm_model_save(b, path), PRM_ERR_IO);
  assert_true(file_equals(path, bytes_a, na));
  assert_int_equal(rmdir(tmp), 0);
  /* ... and a symbolic link is never written through */
  snprintf(link_target, sizeof link_target, "%s.target", path);
  write_whole(link_target, "keep me", 7);
  assert_int_equal(symlink(link_target, tmp), 0);
  assert_int_equal(prm_model_save(b, path), PRM_ERR_IO);
  assert_non_null(strstr(prm_last_errmsg(), "symbolic link"));
  assert_true(file_equals(link_target, (const unsigned char *)"keep me", 7));
  assert_true(file_equals(path, bytes_a, na));
  unlink(tmp);
  unlink(link_target);

  unlink(path);
  free(bytes_a);
  free(bytes_b);
  prm_model_free(a);
  prm_model_free(b);
}

/* Several threads save to one target at once: each save succeeds or says
 * another is in progress; the file is always one whole checkpoint. */
typedef struct saver {
  const prm_model *m;
  const char *path;
  int ok, busy, other;
} saver;

static void *save_loop(void *arg) {
  saver *s = arg;
  for (int i = 0; i < 20; i++) {
    int rc = prm_model_save(s->m, s->path);
    if (rc == PRM_OK)
      s->ok++;
    else if (rc == PRM_ERR_IO && strstr(prm_last_errmsg(), "in progress") != NULL)
      s->busy++;
    else
      s->other++;
  }
  return NULL;
}

static void test_concurrent_saves(void **state) {
  (void)state;
  enum { T = 4 };
  const uint64_t h[1] = {64};
  prm_model *m[2] = {prmt_mlp(64, h, 1, PRM_ACT_TANH, 31), prmt_mlp(64, h, 1, PRM_ACT_TANH, 32)};
  size_t n[2];
  unsigned char *bytes[2] = {save_mem(m[0], &n[0]), save_mem(m[1], &n[1])};
  char base[256], path[512];
  pthread_t t[T];
  saver s[T];
  int ok = 0;
  snprintf(base, sizeof base, "ckpt_concurrent.%ld", (long)getpid());
  snprintf(path, sizeof path, "%s/%s", PRM_TEST_TMPDIR, base);
  for (int i = 0; i < T; i++) {
    s[i] = (saver){m[i % 2], path, 0, 0, 0};
    assert_int_equal(pthread_create(&t[i], NULL, save_loop, &s[i]), 0);
  }
  for (int i = 0; i < T; i++) {
    assert_int_equal(pthread_join(t[i], NULL), 0);
    assert_int_equal(s[i].other, 0);
    ok += s[i].ok;
  }
  assert_true(ok > 0);
  assert_true(file_equals(path, bytes[0], n[0]) || file_equals(path, bytes[1], n[1]));
  assert_int_equal(count_temps(base), 0);
  unlink(path);
  for (int i = 0; i < 2; i++) {
    free(bytes[i]);
    prm_model_free(m[i]);
  }
}

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/*
 * SIGKILL a process that saves two models to one path in turns, at 30
 * moments spread over about two saves. After each kill the path holds one
 * whole checkpoint, old or new, and at most one temporary file lies beside
 * it (the next save removes it): crashes cannot pile up litter.
 */
static void test_killed_saves(void **state) {
  (void)state;
  enum { KILLS = 30 };
  const uint64_t h[1] = {1024};
  prm_model *m[2] = {prmt_mlp(512, h, 1, PRM_ACT_RELU, 41), prmt_mlp(512, h, 1, PRM_ACT_RELU, 42)};
  size_t n[2];
  unsigned char *bytes[2] = {save_mem(m[0], &n[0]), save_mem(m[1], &n[1])}; /* 2 MB each */
  char base[256], path[512];
  int leftovers = 0;
  double t0, one_save;
  snprintf(base, sizeof base, "ckpt_killed.%ld", (long)getpid());
  snprintf(path, sizeof path, "%s/%s", PRM_TEST_TMPDIR, base);
  t0 = now_s();
  assert_int_equal(prm_model_save(m[1], path), PRM_OK);
  assert_int_equal(prm_model_save(m[0], path), PRM_OK);
  one_save = (now_s() - t0) / 2;
  for (int k = 0; k < KILLS; k++) {
    double delay = one_save * 2.0 * k / KILLS;
    struct timespec ts = {(time_t)delay, (long)((delay - (double)(time_t)delay) * 1e9)};
    int status;
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) { /* child: no cmocka here, only saves until killed */
      for (;;)
        for (int i = 1; i >= 0; i--)
          if (prm_model_save(m[i], path) != PRM_OK) _exit(3);
    }
    nanosleep(&ts, NULL);
    assert_int_equal(kill(pid, SIGKILL), 0);
    assert_int_equal(waitpid(pid, &status, 0), pid);
    if (!WIFSIGNALED(status)) fail_msg("kill %d: the saving child exited (status %d)", k, status);

    prm_model *back = NULL;
    assert_int_equal(prm_model_load(&back, path), PRM_OK);
    prm_model_free(back);
    if (!file_equals(path, bytes[0], n[0]) && !file_equals(path, bytes[1], n[1]))
      fail_msg("kill %d: the target is neither the old nor the new checkpoint", k);
    int temps = count_temps(base);
    if (temps > 1) fail_msg("kill %d: %d temporary files beside the target", k, temps);
    leftovers += temps;
  }
  if (getenv("PRM_TEST_VERBOSE") != NULL)
    print_message("killed saves: one save %.1f ms, %d kills left a temporary file\n",
                  one_save * 1e3, leftovers);
  assert_int_equal(prm_model_save(m[0], path), PRM_OK);
  assert_true(file_equals(path, bytes[0], n[0]));
  assert_int_equal(count_temps(base), 0);
  unlink(path);
  for (int i = 0; i < 2; i++) {
    free(bytes[i]);
    prm_model_free(m[i]);
  }
}

/* ---- gpt2 ------------------------------------------------------------------------ */

/* A small GPT-2 with every parameter perturbed (so LayerNorm weights are not
 * all 1 and biases not all 0: a swapped tensor would show). */
static prm_model *make_gpt2(uint64_t V, uint64_t T, uint64_t C, uint64_t L, uint64_t H,
                            uint64_t seed) {
  prm_model_options o;
  prm_model *m = NULL;
  uint64_t n;
  prmt_rng r = {seed + 100};
  assert_int_equal(prm_model_options_init(&o, PRM_MODEL_OPTIONS_VERSION), PRM_OK);
  o.arch = PRM_ARCH_GPT2;
  o.vocab_size = V;
  o.n_ctx = T;
  o.n_embd = C;
  o.n_layer = L;
  o.n_head = H;
  o.seed = seed;
  int rc = prm_model_new(&m, &o);
  if (rc != PRM_OK) fail_msg("prm_model_new: %s (%s)", prm_status_string(rc), prm_last_errmsg());
  float *p = prm_model_params(m, &n);
  for (uint64_t i = 0; i < n; i++)
    p[i] += (float)(0.05 * prmt_normal(&r));
  return m;
}

/* A deterministic token batch of n sequences of lengths in [1, T]:
 * tokens (n, T), lengths (n). */
static void gpt2_tokens(uint64_t V, uint64_t T, int n, int32_t *tokens, int32_t *lengths) {
  prmt_rng r = {9};
  for (int i = 0; i < n; i++) {
    lengths[i] = 1 + (int32_t)(prmt_next(&r) % T);
    if (i == 0) lengths[i] = (int32_t)T; /* one full-length sequence: reads all of wpe */
    for (uint64_t t = 0; t < T; t++)
      tokens[(uint64_t)i * T + t] = (int32_t)(prmt_next(&r) % V);
  }
}

/* Scores of sequences tokens (n, T) with lengths (n) through an inference context. */
static void gpt2_scores(const prm_model *m, int n, uint64_t T, const int32_t *tokens,
                        const int32_t *lengths, float *scores) {
  prm_ctx_options co;
  prm_ctx *c = NULL;
  prm_batch b;
  assert_int_equal(prm_ctx_options_init(&co, PRM_CTX_OPTIONS_VERSION), PRM_OK);
  co.inference = 1;
  co.max_rows = (uint64_t)n;
  co.max_len = T;
  int rc = prm_ctx_new(&c, m, &co);
  if (rc != PRM_OK) fail_msg("prm_ctx_new: %s (%s)", prm_status_string(rc), prm_last_errmsg());
  assert_int_equal(prm_batch_init(&b, PRM_BATCH_VERSION), PRM_OK);
  b.n = (uint64_t)n;
  b.tokens = tokens;
  b.token_stride = T;
  b.lengths = lengths;
  rc = prm_ctx_forward(c, &b, scores, (uint64_t)n);
  if (rc != PRM_OK) fail_msg("forward: %s (%s)", prm_status_string(rc), prm_last_errmsg());
  prm_ctx_free(c);
}

static void assert_same_gpt2_options(const prm_model *a, const prm_model *b) {
  prm_model_options oa, ob;
  prm_model_options_init(&oa, PRM_MODEL_OPTIONS_VERSION);
  prm_model_options_init(&ob, PRM_MODEL_OPTIONS_VERSION);
  assert_int_equal(prm_model_get_options(a, &oa), PRM_OK);
  assert_int_equal(prm_model_get_options(b, &ob), PRM_OK);
  assert_int_equal(ob.arch, PRM_ARCH_GPT2);
  assert_int_equal(oa.vocab_size, ob.vocab_size);
  assert_int_equal(oa.n_ctx, ob.n_ctx);
  assert_int_equal(oa.n_embd, ob.n_embd);
  assert_int_equal(oa.n_layer, ob.n_layer);
  assert_int_equal(oa.n_head, ob.n_head);
}

static void test_roundtrip_gpt2(void **state) {
  (void)state;
  enum { N = 5, V = 50, T = 16 };
  char path[512];
  int32_t tokens[N * T], lengths[N];
  float sa[N], sb[N];
  prm_model *m = make_gpt2(V, T, 16, 2, 4, 1), *back = NULL;
  float *p = prm_model_params(m, NULL);
  p[0] = -0.0f;
  p[1] = 1e-40f; /* subnormal */
  prmt_tmp_path(path, sizeof path, "ckpt_gpt2.safetensors");
  assert_int_equal(prm_model_save(m, path), PRM_OK);
  assert_int_equal(prm_model_load(&back, path), PRM_OK);
  assert_same_model(m, back);
  assert_same_gpt2_options(m, back);
  gpt2_tokens(V, T, N, tokens, lengths);
  gpt2_scores(m, N, T, tokens, lengths, sa);
  gpt2_scores(back, N, T, tokens, lengths, sb);
  assert_memory_equal(sa, sb, sizeof sa);
  prm_model_free(back);

  /* the buffer is the file, byte for byte, and its metadata is torch_ref's config */
  size_t nf, nb;
  unsigned char *file = read_whole(path, &nf), *buf = save_mem(m, &nb);
  assert_int_equal(nf, nb);
  assert_memory_equal(file, buf, nf);
  assert_int_equal(prm_model_load_buffer(&back, buf, nb), PRM_OK);
  assert_same_model(m, back);
  prm_model_free(back);
  uint64_t h = 0;
  for (int k = 0; k < 8; k++)
    h |= (uint64_t)buf[k] << (8 * k);
  assert_int_equal(nb, 8 + h + prm_model_num_params(m) * 4);
  char *json = malloc(h + 1);
  memcpy(json, buf + 8, h);
  json[h] = '\0';
  assert_non_null(strstr(json, "{\"__metadata__\":{\"model\":\"gpt2\",\"vocab_size\":\"50\","
                               "\"n_positions\":\"16\",\"n_embd\":\"16\",\"n_layer\":\"2\","
                               "\"n_head\":\"4\",\"layer_norm_epsilon\":\"1e-05\","));
  assert_non_null(strstr(json, "\"transformer.h.1.attn.c_attn.weight\":{\"dtype\":\"F32\","
                               "\"shape\":[16,48]"));
  assert_non_null(strstr(json, "\"score.weight\":{\"dtype\":\"F32\",\"shape\":[1,16]"));
  free(json);
  free(file);
  free(buf);
  remove(path);
  prm_model_free(m);
}

/* The deepest model (1541 tensors, far above the mlp's count): no fixed-size
 * table limits the loader. */
static void test_roundtrip_gpt2_deep(void **state) {
  (void)state;
  enum { N = 3, V = 7, T = 4 };
  int32_t tokens[N * T], lengths[N];
  float sa[N], sb[N];
  size_t n;
  prm_model *m = make_gpt2(V, T, 4, 128, 2, 2), *back = NULL;
  assert_int_equal(prm_model_num_tensors(m), 2 + 12 * 128 + 3);
  unsigned char *buf = save_mem(m, &n);
  int rc = prm_model_load_buffer(&back, buf, n);
  if (rc != PRM_OK) fail_msg("%s (%s)", prm_status_string(rc), prm_last_errmsg());
  assert_same_model(m, back);
  assert_same_gpt2_options(m, back);
  gpt2_tokens(V, T, N, tokens, lengths);
  gpt2_scores(m, N, T, tokens, lengths, sa);
  gpt2_scores(back, N, T, tokens, lengths, sb);
  assert_memory_equal(sa, sb, sizeof sa);
  free(buf);
  prm_model_free(back);
  prm_model_free(m);

  /* the entry table grows with the header up to 4096 entries, no further */
  for (int count = 4096; count <= 4097; count++) {
    static const char entry[] = "\"t%04d\":{\"dtype\":\"F32\",\"shape\":[0],"
                                "\"data_offsets\":[0,0]}";
    char *json = malloc((size_t)count * sizeof entry + 3), *at = json;
    *at++ = '{';
    for (int i = 0; i < count; i++) {
      if (i > 0) *at++ = ',';
      at += sprintf(at, entry, i);
    }
    strcpy(at, "}");
    buf = make_st(json, NULL, 0, &n);
    expect_fail(buf, n, PRM_ERR_FORMAT,
                count == 4096 ? "missing tensor score.weight" : "too many tensors (at most 4096)");
    free(buf);
    free(json);
  }
}

/* A saved file split into its JSON header (NUL-terminated) and data. */
typedef struct st_parts {
  char *json;
  unsigned char *data;
  size_t n_data;
} st_parts;

static st_parts split_st(const unsigned char *buf, size_t n) {
  st_parts s;
  uint64_t h = 0;
  for (int k = 0; k < 8; k++)
    h |= (uint64_t)buf[k] << (8 * k);
  assert_true(8 + h <= n);
  s.json = malloc(h + 1);
  memcpy(s.json, buf + 8, h);
  s.json[h] = '\0';
  for (size_t e = h; e > 0 && s.json[e - 1] == ' '; e--) /* drop the padding */
    s.json[e - 1] = '\0';
  s.n_data = n - 8 - (size_t)h;
  s.data = malloc(s.n_data);
  memcpy(s.data, buf + 8 + h, s.n_data);
  return s;
}

/* json (an object) with `extra` ("," + entries) added before its closing brace. */
static char *append_entries(const char *json, const char *extra) {
  size_t len = strlen(json);
  char *out = malloc(len + strlen(extra) + 2);
  assert_true(len > 0 && json[len - 1] == '}');
  memcpy(out, json, len - 1);
  strcpy(out + len - 1, extra);
  strcat(out, "}");
  return out;
}

/* json with the first `from` replaced by `to` (from must occur). */
static char *replace_once(const char *json, const char *from, const char *to) {
  const char *at = strstr(json, from);
  if (at == NULL) fail_msg("'%s' not in the header", from);
  size_t n = strlen(json) - strlen(from) + strlen(to);
  char *out = malloc(n + 1);
  size_t pre = (size_t)(at - json);
  memcpy(out, json, pre);
  strcpy(out + pre, to);
  strcat(out, at + strlen(from));
  return out;
}

/* json with every `from` replaced by `to`. */
static char *replace_all(const char *json, const char *from, const char *to) {
  char *cur = malloc(strlen(json) + 1);
  strcpy(cur, json);
  for (char *at; (at = strstr(cur, from)) != NULL;) {
    char *next = replace_once(cur, from, to);
    free(cur);
    cur = next;
  }
  return cur;
}

typedef struct gpt2_case {
  const char *from, *to; /* header edit */
  int status;            /* PRM_OK: must load */
  const char *needle;
} gpt2_case;

/* Edits of a real gpt2 file (V 11, n_ctx 8, C 8, 2 blocks, 2 heads). */
static const gpt2_case k_gpt2_cases[] = {
    /* metadata */
    {"\"n_head\":\"2\",", "", PRM_ERR_FORMAT, "lacks the 'n_head' __metadata__ key"},
    {"\"n_head\":\"2\"", "\"n_head\":\"3\"", PRM_ERR_FORMAT, "n_head=3 does not divide n_embd=8"},
    {"\"n_head\":\"2\"", "\"n_head\":\"0\"", PRM_ERR_FORMAT, "not a positive integer"},
    {"\"n_head\":\"2\"", "\"n_head\":\"two\"", PRM_ERR_FORMAT, "not a positive integer"},
    {"\"1e-05\"", "\"1e-06\"", PRM_ERR_UNSUPPORTED, "layer_norm_epsilon=1e-06"},
    {"\"1e-05\"", "\"0.0001\"", PRM_ERR_UNSUPPORTED, "only 1e-05"},
    {"\"1e-05\"", "\"-1e-05\"", PRM_ERR_UNSUPPORTED, "layer_norm_epsilon"},
    {"\"1e-05\"", "\"0\"", PRM_ERR_UNSUPPORTED, "layer_norm_epsilon"},
    {"\"1e-05\"", "\"1e-5x\"", PRM_ERR_FORMAT, "not a number"},
    {"\"1e-05\"", "\"\"", PRM_ERR_FORMAT, "not a number"},
    {"\"1e-05\"", "\"1e\"", PRM_ERR_FORMAT, "not a number"},
    {"\"1e-05\"", "\"0.00001\"", PRM_OK, NULL},
    {"\"1e-05\"", "\"1E-5\"", PRM_OK, NULL},
    {"\"1e-05\"", "\"+10.000e-6\"", PRM_OK, NULL},
    {"\"layer_norm_epsilon\":\"1e-05\",", "", PRM_OK, NULL}, /* absent: GPT-2's 1e-5 */
    {"\"vocab_size\":\"11\"", "\"vocab_size\":\"12\"", PRM_ERR_FORMAT,
     "vocab_size=12 disagrees with transformer.wte.weight rows (11)"},
    {"\"n_positions\":\"8\"", "\"n_positions\":\"16\"", PRM_ERR_FORMAT,
     "n_positions=16 disagrees with transformer.wpe.weight rows (8)"},
    {"\"n_embd\":\"8\"", "\"n_embd\":\"4\"", PRM_ERR_FORMAT, "n_embd=4 disagrees"},
    {"\"n_layer\":\"2\"", "\"n_layer\":\"3\"", PRM_ERR_FORMAT,
     "n_layer=3 disagrees with the blocks transformer.h.* present (2)"},
    {"\"n_layer\":\"2\"", "\"n_layer\":\"02\"", PRM_ERR_FORMAT, "not a positive integer"},
    {"\"model\":\"gpt2\",", "", PRM_OK, NULL}, /* inferred from the transformer.* names */
    {"\"model\":\"gpt2\"", "\"model\":\"linear\"", PRM_ERR_FORMAT,
     "unexpected tensor transformer.wte.weight for a linear model"},
    {"\"model\":\"gpt2\"", "\"model\":\"mlp\"", PRM_ERR_FORMAT, NULL},
    /* tensors */
    {"\"transformer.h.1.attn.c_attn.weight\":{\"dtype\":\"F32\",\"shape\":[8,24]",
     "\"transformer.h.1.attn.c_attn.weight\":{\"dtype\":\"F32\",\"shape\":[24,8]", PRM_ERR_FORMAT,
     "tensor transformer.h.1.attn.c_attn.weight has shape [24, 8], expected [8, 24] for the gpt2 "
     "configuration"},
    {"\"transformer.h.0.mlp.c_proj.weight\":{\"dtype\":\"F32\",\"shape\":[32,8]",
     "\"transformer.h.0.mlp.c_proj.weight\":{\"dtype\":\"F32\",\"shape\":[256]", PRM_ERR_FORMAT,
     "has shape [256], expected [32, 8]"},
    {"\"transformer.h.0.ln_1.bias\":{\"dtype\":\"F32\",\"shape\":[8]",
     "\"transformer.h.0.ln_1.bias\":{\"dtype\":\"F32\",\"shape\":[1,8]", PRM_ERR_FORMAT,
     "has shape [1, 8], expected [8]"},
    {"\"transformer.h.1.attn.c_attn.weight\":{\"dtype\":\"F32\"",
     "\"transformer.h.1.attn.c_attn.weight\":{\"dtype\":\"F64\"", PRM_ERR_FORMAT, "dtype F64"},
    {"\"transformer.h.1.mlp.c_fc.bias\"", "\"transformer.h.1.mlp.c_fc.bias_\"", PRM_ERR_FORMAT,
     "missing tensor transformer.h.1.mlp.c_fc.bias"},
    {"\"transformer.h.0.mlp.c_fc.bias\"", "\"transformer.h.1.mlp.c_fc.bias\"", PRM_ERR_FORMAT,
     "duplicate tensor 'transformer.h.1.mlp.c_fc.bias'"},
    /* a block beyond n_layer: with n_layer in the metadata the counts disagree... */
    {"\"transformer.h.1.ln_2.bias\"", "\"transformer.h.2.ln_2.bias\"", PRM_ERR_FORMAT,
     "n_layer=2 disagrees"},
    {"\"transformer.wpe.weight\":{\"dtype\":\"F32\",\"shape\":[8,8]",
     "\"transformer.wpe.weight\":{\"dtype\":\"F32\",\"shape\":[16,4]", PRM_ERR_FORMAT,
     "n_positions=8 disagrees with transformer.wpe.weight rows (16)"},
    {"\"transformer.h.1.ln_2.bias\"", "\"transformer.h.128.ln_2.bias\"", PRM_ERR_FORMAT,
     "at most 128 blocks"},
    {"\"transformer.ln_f.bias\"", "\"transformer.ln_f.bias.x\"", PRM_ERR_FORMAT,
     "missing tensor transformer.ln_f.bias"},
    {"\"score.weight\"", "\"lm_head.weight\"", PRM_ERR_FORMAT,
     "missing tensor score.weight (a language-model checkpoint has no reward head: load it with "
     "prm_model_load_pretrained)"},
    {"\"transformer.wte.weight\"", "\"transformer.wte.weightx\"", PRM_ERR_FORMAT,
     "missing tensor transformer.wte.weight"},
};

/* Load json + p's data: it must fail with status and needle, or (PRM_OK)
 * give `want`. */
static void gpt2_case_run(const st_parts *p, const char *json, int status, const char *needle,
                          const prm_model *want) {
  size_t n;
  unsigned char *buf = make_st(json, p->data, p->n_data, &n);
  if (status != PRM_OK) {
    expect_fail(buf, n, status, needle);
  } else {
    prm_model *m = NULL;
    int rc = prm_model_load_buffer(&m, buf, n);
    if (rc != PRM_OK) fail_msg("%s: %s (%s)", json, prm_status_string(rc), prm_last_errmsg());
    assert_same_model((prm_model *)(uintptr_t)want, m);
    assert_same_gpt2_options(want, m);
    prm_model_free(m);
  }
  free(buf);
}

static void test_gpt2_malformed(void **state) {
  (void)state;
  size_t n;
  prm_model *m = make_gpt2(11, 8, 8, 2, 2, 3);
  unsigned char *buf = save_mem(m, &n);
  st_parts p = split_st(buf, n);
  char *j, *k;
  for (size_t i = 0; i < sizeof k_gpt2_cases / sizeof k_gpt2_cases[0]; i++) {
    j = replace_once(p.json, k_gpt2_cases[i].from, k_gpt2_cases[i].to);
    if (getenv("PRM_TEST_VERBOSE") != NULL) print_message("gpt2 case %zu\n", i);
    gpt2_case_run(&p, j, k_gpt2_cases[i].status, k_gpt2_cases[i].needle, m);
    if (getenv("PRM_TEST_VERBOSE") != NULL) print_message("  -> %s\n", prm_last_errmsg());
    free(j);
  }

  /* ...without n_layer in the metadata the blocks present define it: a gap is
   * a missing tensor (torch_ref would count only the blocks before the gap) */
  k = replace_once(p.json, "\"n_layer\":\"2\",", "");
  j = replace_once(k, "\"transformer.h.1.ln_2.bias\"", "\"transformer.h.2.ln_2.bias\"");
  gpt2_case_run(&p, j, PRM_ERR_FORMAT, "missing tensor transformer.h.1.ln_2.bias", m);
  free(j);
  j = replace_all(k, "transformer.h.1.", "transformer.h.x.");
  gpt2_case_run(&p, j, PRM_ERR_FORMAT, "unexpected tensor transformer.h.x.", m);
  free(j);
  free(k);

  /* bare GPT2Model names (no "transformer." prefix) are accepted, as in torch_ref */
  j = replace_all(p.json, "\"transformer.", "\"");
  gpt2_case_run(&p, j, PRM_OK, NULL, m);
  free(j);
  /* ... but not both spellings of one tensor */
  j = replace_once(p.json, "\"transformer.ln_f.bias\"", "\"ln_f.weight\"");
  gpt2_case_run(&p, j, PRM_ERR_FORMAT, "duplicate tensor 'transformer.ln_f.weight'", m);
  free(j);

  /* only n_head in the metadata: everything else from the shapes */
  j = replace_once(p.json,
                   "\"model\":\"gpt2\",\"vocab_size\":\"11\",\"n_positions\":\"8\","
                   "\"n_embd\":\"8\",\"n_layer\":\"2\",\"n_head\":\"2\","
                   "\"layer_norm_epsilon\":\"1e-05\",",
                   "\"n_head\":\"2\",");
  gpt2_case_run(&p, j, PRM_OK, NULL, m);
  free(j);

  /* HF's non-persistent buffers are ignored: a BOOL causal mask [1,1,T,T]
   * and a scalar masked_bias, after the parameters */
  {
    char extra[512];
    const unsigned long long d = p.n_data;
    st_parts q = p;
    q.n_data = p.n_data + 68;
    q.data = malloc(q.n_data);
    memcpy(q.data, p.data, p.n_data);
    memset(q.data + p.n_data, 1, 68);
    snprintf(extra, sizeof extra,
             ",\"transformer.h.0.attn.bias\":{\"dtype\":\"BOOL\",\"shape\":[1,1,8,8],"
             "\"data_offsets\":[%llu,%llu]},"
             "\"transformer.h.1.attn.masked_bias\":{\"dtype\":\"F32\",\"shape\":[],"
             "\"data_offsets\":[%llu,%llu]}",
             d, d + 64, d + 64, d + 68);
    j = append_entries(p.json, extra);
    gpt2_case_run(&q, j, PRM_OK, NULL, m);
    /* they must still lie inside the data area... */
    q.n_data = p.n_data + 64;
    gpt2_case_run(&q, j, PRM_ERR_FORMAT, "transformer.h.1.attn.masked_bias: data_offsets", m);
    q.n_data = p.n_data + 68;
    free(j);
    /* ...and overlap nothing */
    j = append_entries(p.json, ",\"transformer.h.0.attn.masked_bias\":{\"dtype\":\"F32\","
                               "\"shape\":[],\"data_offsets\":[0,4]}");
    gpt2_case_run(&q, j, PRM_ERR_FORMAT, "overlap", m);
    free(j);
    /* a 1-D "attn.bias" is no HF buffer (torch_ref keeps it too): unexpected */
    snprintf(extra, sizeof extra,
             ",\"transformer.h.0.attn.bias\":{\"dtype\":\"F32\",\"shape\":[1],"
             "\"data_offsets\":[%llu,%llu]}",
             d, d + 4);
    j = append_entries(p.json, extra);
    gpt2_case_run(&q, j, PRM_ERR_FORMAT,
                  "unexpected tensor transformer.h.0.attn.bias for a gpt2 model", m);
    free(j);
    free(q.data);
  }

  /* NaN inside a block tensor */
  {
    const prm_model *mm = m;
    uint64_t off;
    uint32_t idx = 2 + 12 + 4; /* transformer.h.1.attn.c_proj.weight */
    const char *nm;
    assert_int_equal(prm_model_tensor_info(mm, idx, &nm, &off, NULL, NULL), PRM_OK);
    assert_string_equal(nm, "transformer.h.1.attn.c_proj.weight");
    float nan = NAN;
    le_floats(p.data + 4 * off + 8, &nan, 1);
    gpt2_case_run(&p, p.json, PRM_ERR_FORMAT,
                  "tensor transformer.h.1.attn.c_proj.weight contains NaN or Inf", m);
  }
  free(p.json);
  free(p.data);
  free(buf);
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
  /* with reward normalisation statistics in the metadata: PyTorch (the
   * reference) still opens the file and gives the same raw scores */
  prm_reward_moments mo = PRM_REWARD_MOMENTS_INIT;
  const float r[4] = {0.5f, -1.25f, 2.0f, 0.75f};
  assert_int_equal(prm_reward_moments_add(&mo, r, 4), PRM_OK);
  assert_int_equal(prm_model_set_reward_norm(mlp, &mo), PRM_OK);
  assert_int_equal(prm_model_save(mlp, ckpt), PRM_OK);
  compare_with_torch(refdir, mlp, ckpt);
  prm_model_free(mlp);
  prm_model_free(lin);
  remove(ckpt);
}

/* gpt2 interoperability in one Python process (torch imports cost ~1 s):
 * 1. torch_ref's init writes a gpt2 checkpoint and a batch, its grads
 *    computes the rewards (the CLI's own functions, called in-process);
 *    the ids (padded with 0), lengths and rewards are dumped raw;
 * 2. a prefrm-written gpt2 checkpoint is read by model_from_state, its
 *    metadata compared with torch_ref's config_metadata string for string,
 *    its tensors (in the order given) and the scores of a token batch dumped. */
static const char k_gpt2_py[] =
    "import sys, io, json, contextlib\n"
    "sys.path.insert(0, sys.argv[1])\n"
    "import torch, torch_ref\n"
    "(X, B, tok_p, len_p, rew_p, ours, names, ctok, clen, n, T, out_p, out_s) = sys.argv[2:15]\n"
    "with contextlib.redirect_stdout(io.StringIO()):\n"
    "    torch_ref.cmd_init(torch_ref.parse_args(['init', '--model', 'gpt2', '--vocab', '50',\n"
    "        '--ctx', '16', '--dim', '16', '--layers', '2', '--heads', '4', '--seed', '3',\n"
    "        '--pairs', '3', '--out', X, '--batch-out', B]))\n"
    "out = io.StringIO()\n"
    "with contextlib.redirect_stdout(out):\n"
    "    torch_ref.cmd_grads(torch_ref.parse_args(['grads', '--ckpt', X, '--batch', B,\n"
    "        '--out', X + '.grads']))\n"
    "info = json.loads(out.getvalue().strip().splitlines()[-1])\n"
    "bj = json.load(open(B))\n"
    "seqs = bj['chosen_input_ids'] + bj['rejected_input_ids']\n"
    "ids = torch.zeros(len(seqs), 16, dtype=torch.int32)\n"
    "for i, s in enumerate(seqs):\n"
    "    ids[i, :len(s)] = torch.tensor(s, dtype=torch.int32)\n"
    "lens = torch.tensor(bj['chosen_lengths'] + bj['rejected_lengths'], dtype=torch.int32)\n"
    "rew = torch.tensor(info['rewards_chosen'] + info['rewards_rejected'], dtype=torch.float32)\n"
    "open(tok_p, 'wb').write(ids.numpy().astype('<i4').tobytes())\n"
    "open(len_p, 'wb').write(lens.numpy().astype('<i4').tobytes())\n"
    "open(rew_p, 'wb').write(rew.numpy().astype('<f4').tobytes())\n"
    "sd, meta = torch_ref.read_safetensors(ours)\n"
    "model = torch_ref.model_from_state(sd, meta)\n"
    "for k, v in torch_ref.config_metadata(model).items():\n"
    "    if meta.get(k) != v:\n"
    "        raise SystemExit(f'metadata {k}: prefrm wrote {meta.get(k)!r}, torch_ref {v!r}')\n"
    "with open(out_p, 'wb') as f:\n"
    "    for nm in names.split(','):\n"
    "        f.write(sd[nm].contiguous().numpy().astype('<f4').tobytes())\n"
    "cids = torch.frombuffer(bytearray(open(ctok, 'rb').read()), dtype=torch.int32)\n"
    "cids = cids.reshape(int(n), int(T)).long()\n"
    "clens = torch.frombuffer(bytearray(open(clen, 'rb').read()), dtype=torch.int32).long()\n"
    "with torch.no_grad():\n"
    "    r = model(cids, clens)\n"
    "open(out_s, 'wb').write(r.numpy().astype('<f4').tobytes())\n";

static float le_float_at(const unsigned char *b, size_t i) {
  uint32_t u = (uint32_t)b[4 * i] | (uint32_t)b[4 * i + 1] << 8 | (uint32_t)b[4 * i + 2] << 16 |
               (uint32_t)b[4 * i + 3] << 24;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

static int32_t le_i32_at(const unsigned char *b, size_t i) {
  uint32_t u = (uint32_t)b[4 * i] | (uint32_t)b[4 * i + 1] << 8 | (uint32_t)b[4 * i + 2] << 16 |
               (uint32_t)b[4 * i + 3] << 24;
  int32_t v;
  memcpy(&v, &u, 4);
  return v;
}

/* Scores within 1e-5 relative (plus a 1e-7 floor for scores near 0). */
static void assert_close_scores(const float *mine, const unsigned char *theirs, int n,
                                const char *what) {
  for (int i = 0; i < n; i++) {
    float t = le_float_at(theirs, (size_t)i);
    if (!(fabsf(t - mine[i]) <= 1e-5f * fabsf(t) + 1e-7f))
      fail_msg("%s row %d: prefrm %.9g, torch %.9g", what, i, (double)mine[i], (double)t);
  }
}

static void test_gpt2_torch_interop(void **state) {
  (void)state;
  enum { NC = 5, T = 16, V = 50, P2 = 6 };
  char refdir[512], py[600], X[600], B[600], G[700], tok[600], len[600], rew[600], ours[600],
      ctok[600], clen[600], outp[600], outs[600], names[4096] = "", cmd[12288];
  if (!have_reference(refdir, sizeof refdir)) {
    print_message("skipped: shared/reference/torch_ref.py or torch (%s) not available\n",
                  PRM_PYTHON);
    skip();
  }
  prmt_tmp_path(py, sizeof py, "ckpt_gpt2.py");
  prmt_tmp_path(X, sizeof X, "ckpt_gpt2_torch.safetensors");
  prmt_tmp_path(B, sizeof B, "ckpt_gpt2_batch.json");
  snprintf(G, sizeof G, "%s.grads", X);
  prmt_tmp_path(tok, sizeof tok, "ckpt_gpt2_tok.bin");
  prmt_tmp_path(len, sizeof len, "ckpt_gpt2_len.bin");
  prmt_tmp_path(rew, sizeof rew, "ckpt_gpt2_rew.bin");
  prmt_tmp_path(ours, sizeof ours, "ckpt_gpt2_ours.safetensors");
  prmt_tmp_path(ctok, sizeof ctok, "ckpt_gpt2_ctok.bin");
  prmt_tmp_path(clen, sizeof clen, "ckpt_gpt2_clen.bin");
  prmt_tmp_path(outp, sizeof outp, "ckpt_gpt2_params.bin");
  prmt_tmp_path(outs, sizeof outs, "ckpt_gpt2_scores.bin");
  write_whole(py, k_gpt2_py, sizeof k_gpt2_py - 1);

  /* our checkpoint and token batch for torch */
  prm_model *m = make_gpt2(V, T, 16, 2, 4, 11);
  int32_t ctokens[NC * T], clengths[NC];
  float cs[NC];
  gpt2_tokens(V, T, NC, ctokens, clengths);
  unsigned char raw[NC * T * 4];
  for (int i = 0; i < NC * T; i++)
    for (int k = 0; k < 4; k++)
      raw[4 * i + k] = (unsigned char)((uint32_t)ctokens[i] >> (8 * k));
  write_whole(ctok, raw, NC * T * 4);
  for (int i = 0; i < NC; i++)
    for (int k = 0; k < 4; k++)
      raw[4 * i + k] = (unsigned char)((uint32_t)clengths[i] >> (8 * k));
  write_whole(clen, raw, NC * 4);
  assert_int_equal(prm_model_save(m, ours), PRM_OK);
  for (uint32_t i = 0; i < prm_model_num_tensors(m); i++) {
    const char *nm;
    assert_int_equal(prm_model_tensor_info(m, i, &nm, NULL, NULL, NULL), PRM_OK);
    if (i > 0) strcat(names, ",");
    strcat(names, nm);
  }
  snprintf(cmd, sizeof cmd,
           "'%s' '%s' '%s' '%s' '%s' '%s' '%s' '%s' '%s' '%s' '%s' '%s' %d %d '%s' '%s'",
           PRM_PYTHON, py, refdir, X, B, tok, len, rew, ours, names, ctok, clen, NC, T, outp, outs);
  if (system(cmd) != 0) fail_msg("command failed: %s", cmd);

  /* 1. torch_ref's checkpoint loads here and scores its batch as grads did */
  prm_model *tm = NULL, *again = NULL;
  int rc = prm_model_load(&tm, X);
  if (rc != PRM_OK) fail_msg("%s: %s (%s)", X, prm_status_string(rc), prm_last_errmsg());
  prm_model_options o;
  prm_model_options_init(&o, PRM_MODEL_OPTIONS_VERSION);
  assert_int_equal(prm_model_get_options(tm, &o), PRM_OK);
  assert_int_equal(o.arch, PRM_ARCH_GPT2);
  assert_int_equal(o.vocab_size, 50);
  assert_int_equal(o.n_ctx, 16);
  assert_int_equal(o.n_embd, 16);
  assert_int_equal(o.n_layer, 2);
  assert_int_equal(o.n_head, 4);
  size_t n;
  unsigned char *tb = read_whole(tok, &n), *lb, *rb;
  assert_int_equal(n, P2 * T * 4);
  lb = read_whole(len, &n);
  assert_int_equal(n, P2 * 4);
  rb = read_whole(rew, &n);
  assert_int_equal(n, P2 * 4);
  int32_t ttokens[P2 * T], tlengths[P2];
  float ts[P2];
  for (int i = 0; i < P2 * T; i++)
    ttokens[i] = le_i32_at(tb, (size_t)i);
  for (int i = 0; i < P2; i++)
    tlengths[i] = le_i32_at(lb, (size_t)i);
  gpt2_scores(tm, P2, T, ttokens, tlengths, ts);
  assert_close_scores(ts, rb, P2, "torch_ref init/grads");
  /* our re-save of it loads to the same model */
  unsigned char *buf = save_mem(tm, &n);
  assert_int_equal(prm_model_load_buffer(&again, buf, n), PRM_OK);
  assert_same_model(tm, again);
  free(buf);
  free(tb);
  free(lb);
  free(rb);
  prm_model_free(again);
  prm_model_free(tm);

  /* 2. our checkpoint in torch: same tensors bit for bit, same scores */
  unsigned char *tp = read_whole(outp, &n);
  uint64_t np;
  float *mine = prm_model_params(m, &np);
  assert_int_equal(n, np * 4);
  unsigned char *mine_le = malloc(n);
  le_floats(mine_le, mine, (size_t)np);
  assert_memory_equal(tp, mine_le, n);
  free(tp);
  free(mine_le);
  unsigned char *sb = read_whole(outs, &n);
  assert_int_equal(n, NC * 4);
  gpt2_scores(m, NC, T, ctokens, clengths, cs);
  assert_close_scores(cs, sb, NC, "prefrm checkpoint in torch");
  free(sb);
  prm_model_free(m);
  const char *tmp[] = {py, X, B, G, tok, len, rew, ours, ctok, clen, outp, outs};
  for (size_t i = 0; i < sizeof tmp / sizeof tmp[0]; i++)
    remove(tmp[i]);
}

/* prm_model_load_pretrained on files the library writes (no torch needed):
 * the head kept or replaced, the report and its truncation, every error. */
static void test_load_pretrained(void **state) {
  (void)state;
  prm_model_options cfg = prmt_gpt2_options(20, 8, 8, 2, 2, 4);
  prm_model *m = prmt_gpt2(20, 8, 8, 2, 2, 4), *back = NULL;
  size_t n = 0;
  assert_int_equal(prm_model_save_buffer(m, NULL, 0, &n), PRM_OK);
  unsigned char *buf = malloc(n);
  assert_non_null(buf);
  assert_int_equal(prm_model_save_buffer(m, buf, n, &n), PRM_OK);
  uint64_t np = 0;
  const float *p = prm_model_params(m, &np);
  const uint64_t head = np - 8;

  /* a reward model's file: everything loaded, nothing else */
  prm_load_report rep = PRM_LOAD_REPORT_INIT;
  assert_int_equal(prm_model_load_pretrained_buffer(&back, buf, n, NULL, &rep), PRM_OK);
  assert_memory_equal(prm_model_params(back, NULL), p, np * sizeof(float));
  assert_int_equal(rep.n_loaded, prm_model_num_tensors(m));
  assert_int_equal(rep.n_initialised, 0);
  assert_int_equal(rep.n_ignored, 0);
  prm_model_free(back);

  /* fresh_head: the head as prm_model_new(seed) draws it, the rest loaded;
   * a report text too small is cut, NUL-terminated, and says what it needs */
  prm_pretrained_options po = PRM_PRETRAINED_OPTIONS_INIT;
  po.fresh_head = 1;
  po.seed = 77;
  char text[40];
  memset(text, 'x', sizeof text);
  rep.text = text;
  rep.text_size = sizeof text;
  assert_int_equal(prm_model_load_pretrained_buffer(&back, buf, n, &po, &rep), PRM_OK);
  assert_int_equal(rep.n_initialised, 1);
  assert_int_equal(rep.n_loaded, prm_model_num_tensors(m) - 1);
  assert_true(rep.text_needed > sizeof text);
  assert_true(strlen(text) < sizeof text);
  assert_int_equal(strncmp(text, "loaded transformer.wte.weight\n", strlen(text)), 0);
  char *full = malloc(rep.text_needed);
  assert_non_null(full);
  rep.text = full;
  rep.text_size = rep.text_needed;
  prm_model_free(back);
  assert_int_equal(prm_model_load_pretrained_buffer(&back, buf, n, &po, &rep), PRM_OK);
  assert_int_equal(strlen(full) + 1, rep.text_needed);
  assert_non_null(strstr(full, "\ninitialised score.weight\n"));
  free(full);
  cfg.seed = 77;
  prm_model *fresh = NULL;
  assert_int_equal(prm_model_new(&fresh, &cfg), PRM_OK);
  assert_memory_equal(prm_model_params(back, NULL), p, head * sizeof(float));
  assert_memory_equal(prm_model_params(back, NULL) + head, prm_model_params(fresh, NULL) + head,
                      8 * sizeof(float));
  prm_model_free(fresh);
  prm_model_free(back);

  /* an unknown tensor fails the load unless the caller asks to skip it; then
   * it is reported as ignored */
  {
    static const char hdr[] =
        "{\"__metadata__\":{\"model\":\"linear\"},"
        "\"score.weight\":{\"dtype\":\"F32\",\"shape\":[1,2],\"data_offsets\":[0,8]},"
        "\"adapter.lora_A\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,16]}}";
    const float vals[4] = {0.5f, -1.0f, 3.0f, 4.0f};
    size_t un;
    unsigned char *ub = make_st(hdr, (const unsigned char *)vals, sizeof vals, &un);
    prm_model *u = NULL;
    assert_int_equal(prm_model_load_pretrained_buffer(&u, ub, un, NULL, NULL), PRM_ERR_FORMAT);
    assert_non_null(strstr(prm_last_errmsg(), "unexpected tensor adapter.lora_A"));
    prm_pretrained_options io = PRM_PRETRAINED_OPTIONS_INIT;
    io.ignore_unknown = 1;
    char t2[256];
    prm_load_report r2 = PRM_LOAD_REPORT_INIT;
    r2.text = t2;
    r2.text_size = sizeof t2;
    assert_int_equal(prm_model_load_pretrained_buffer(&u, ub, un, &io, &r2), PRM_OK);
    assert_int_equal(r2.n_ignored, 1);
    assert_non_null(strstr(t2, "ignored adapter.lora_A\n"));
    assert_true(prm_model_params(u, NULL)[0] == 0.5f && prm_model_params(u, NULL)[1] == -1.0f);
    prm_model_free(u);
    free(ub);
  }

  /* errors: arguments, versions, a configuration that is invalid or that the
   * file contradicts */
  rep = (prm_load_report)PRM_LOAD_REPORT_INIT;
  assert_int_equal(prm_model_load_pretrained_buffer(NULL, buf, n, NULL, NULL), PRM_ERR_NULL);
  assert_int_equal(prm_model_load_pretrained_buffer(&back, NULL, n, NULL, NULL), PRM_ERR_NULL);
  assert_null(back);
  assert_int_equal(prm_model_load_pretrained(&back, NULL, NULL, NULL), PRM_ERR_NULL);
  po = (prm_pretrained_options)PRM_PRETRAINED_OPTIONS_INIT;
  po.version = 9;
  assert_int_equal(prm_model_load_pretrained_buffer(&back, buf, n, &po, NULL), PRM_ERR_VERSION);
  rep.version = 0;
  assert_int_equal(prm_model_load_pretrained_buffer(&back, buf, n, NULL, &rep), PRM_ERR_VERSION);
  assert_int_equal(prm_pretrained_options_init(&po, 2), PRM_ERR_VERSION);
  assert_int_equal(prm_pretrained_options_init(NULL, 1), PRM_ERR_NULL);
  assert_int_equal(prm_pretrained_options_init(&po, PRM_PRETRAINED_OPTIONS_VERSION), PRM_OK);
  prm_model_options bad = cfg;
  bad.n_head = 3; /* does not divide n_embd */
  po.config = &bad;
  assert_int_equal(prm_model_load_pretrained_buffer(&back, buf, n, &po, NULL), PRM_ERR_INVALID);
  bad = cfg;
  bad.n_embd = 16; /* the file's tensors are 8 wide */
  assert_int_equal(prm_model_load_pretrained_buffer(&back, buf, n, &po, NULL), PRM_ERR_FORMAT);
  prm_model_options lin = PRM_MODEL_OPTIONS_INIT;
  lin.input_size = 8;
  po.config = &lin;
  assert_int_equal(prm_model_load_pretrained_buffer(&back, buf, n, &po, NULL), PRM_ERR_FORMAT);
  assert_non_null(strstr(prm_last_errmsg(), "a gpt2 checkpoint"));
  assert_null(back);
  free(buf);
  prm_model_free(m);
}

/* F16 and BF16 tensors widen to F32 exactly: normal, subnormal, signed zero,
 * the largest finite values; an Inf or NaN half is refused like an F32 one. */
static void test_half_precision(void **state) {
  (void)state;
  static const struct {
    const char *dtype;
    uint16_t bits[6];
    float want[6];
  } cases[2] = {
      {"F16",
       {0x3C00, 0xC100, 0x7BFF, 0x0001, 0x8000, 0x3555},
       {1.0f, -2.5f, 65504.0f, 0x1p-24f, -0.0f, 0.333251953125f}},
      {"BF16",
       {0x3F80, 0xC020, 0x7F7F, 0x0001, 0x8000, 0x3EAB},
       {1.0f, -2.5f, 0x1.FEp127f, 0x1p-133f, -0.0f, 0.333984375f}},
  };
  for (int c = 0; c < 2; c++) {
    char header[256];
    unsigned char data[12];
    for (int i = 0; i < 6; i++) {
      data[2 * i] = (unsigned char)(cases[c].bits[i] & 0xFF);
      data[2 * i + 1] = (unsigned char)(cases[c].bits[i] >> 8);
    }
    snprintf(header, sizeof header,
             "{\"__metadata__\":{\"model\":\"linear\"},\"score.weight\":{\"dtype\":\"%s\","
             "\"shape\":[1,6],\"data_offsets\":[0,12]}}",
             cases[c].dtype);
    size_t n;
    unsigned char *buf = make_st(header, data, sizeof data, &n);
    prm_model *m = NULL;
    if (prm_model_load_buffer(&m, buf, n) != PRM_OK) fail_msg("%s: %s", cases[c].dtype, prm_last_errmsg());
    const float *p = prm_model_params(m, NULL);
    assert_memory_equal(p, cases[c].want, sizeof cases[c].want); /* bits, -0.0 included */
    /* a save writes F32: the same values, exactly */
    size_t k;
    assert_int_equal(prm_model_save_buffer(m, NULL, 0, &k), PRM_OK);
    unsigned char *out = malloc(k);
    assert_int_equal(prm_model_save_buffer(m, out, k, &k), PRM_OK);
    prm_model *back = NULL;
    assert_int_equal(prm_model_load_buffer(&back, out, k), PRM_OK);
    assert_memory_equal(prm_model_params(back, NULL), cases[c].want, sizeof cases[c].want);
    prm_model_free(back);
    free(out);
    prm_model_free(m);
    /* Inf (F16 0x7C00, BF16 0x7F80) and NaN are refused */
    data[4] = 0x00;
    data[5] = c == 0 ? 0x7C : 0x7F;
    if (c == 1) data[4] = 0x80;
    free(buf);
    buf = make_st(header, data, sizeof data, &n);
    expect_fail(buf, n, PRM_ERR_FORMAT, "NaN or Inf");
    free(buf);
  }
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
      cmocka_unit_test(test_duplicate_keys_bounds),
      cmocka_unit_test(test_load_special_files),
      cmocka_unit_test(test_load_growing_file),
      cmocka_unit_test(test_save_temp_file),
      cmocka_unit_test(test_concurrent_saves),
      cmocka_unit_test(test_killed_saves),
      cmocka_unit_test(test_roundtrip_gpt2),
      cmocka_unit_test(test_roundtrip_gpt2_deep),
      cmocka_unit_test(test_gpt2_malformed),
      cmocka_unit_test(test_torch_written_checkpoint),
      cmocka_unit_test(test_prefrm_checkpoint_in_torch),
      cmocka_unit_test(test_gpt2_torch_interop),
      cmocka_unit_test(test_load_pretrained),
      cmocka_unit_test(test_half_precision),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
