/*
 * test_data.c - the input side of the tools (data.h): the line reader's edge
 * cases, every kind of bad record with its message, the truncation rule,
 * the n-gram features and the model sidecar.
 */
#define _POSIX_C_SOURCE 200809L

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
#include <sys/stat.h>
#include <unistd.h>

#include "data.h"

static char tmpdir[4096];

static int setup_dir(void **state) {
  (void)state;
  const char *base = getenv("PFT_TEST_TMPDIR");
  if (!base || !*base) base = PFT_TEST_TMPDIR;
  snprintf(tmpdir, sizeof tmpdir, "%s/test_data.%ld", base, (long)getpid());
  return mkdir(tmpdir, 0777) == 0 || errno == EEXIST ? 0 : -1;
}

static int teardown_dir(void **state) {
  (void)state;
  DIR *d = opendir(tmpdir);
  if (d) {
    struct dirent *e;
    char p[8192];
    while ((e = readdir(d)))
      if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..")) {
        snprintf(p, sizeof p, "%s/%s", tmpdir, e->d_name);
        unlink(p);
      }
    closedir(d);
  }
  rmdir(tmpdir);
  return 0;
}

static const char *write_file(const char *name, const char *bytes, size_t n) {
  static char path[8192];
  snprintf(path, sizeof path, "%s/%s", tmpdir, name);
  FILE *f = fopen(path, "wb");
  assert_non_null(f);
  assert_int_equal(fwrite(bytes, 1, n, f), n);
  assert_int_equal(fclose(f), 0);
  return path;
}

/* ---- reader ------------------------------------------------------------------------------ */

static void expect_line(pft_reader *r, const char *want, size_t want_len, uint64_t want_no) {
  const char *line;
  size_t len;
  uint64_t no;
  char err[256];
  assert_int_equal(pft_reader_next(r, &line, &len, &no, err, sizeof err), 1);
  assert_int_equal(len, want_len);
  assert_memory_equal(line, want, want_len);
  assert_int_equal(line[len], '\0');
  assert_int_equal(no, want_no);
}

static void expect_eof(pft_reader *r) {
  const char *line;
  size_t len;
  uint64_t no;
  char err[256];
  assert_int_equal(pft_reader_next(r, &line, &len, &no, err, sizeof err), 0);
  assert_int_equal(pft_reader_next(r, &line, &len, &no, err, sizeof err), 0);
}

static void test_reader_lines(void **state) {
  (void)state;
  /* LF, CRLF, an empty line, a lone CR inside a line, a NUL byte, a CR
   * before CRLF (only the CRLF goes), and a last line without newline. */
  static const char text[] = "first\nsecond\r\n\na\rb\nnul\0byte\ncr\r\r\nlast";
  const char *path = write_file("lines.txt", text, sizeof text - 1);
  pft_reader *r;
  char err[256];
  assert_int_equal(pft_reader_open(&r, path, err, sizeof err), 0);
  assert_string_equal(pft_reader_name(r), path);
  expect_line(r, "first", 5, 1);
  expect_line(r, "second", 6, 2);
  expect_line(r, "", 0, 3);
  expect_line(r, "a\rb", 3, 4);
  expect_line(r, "nul\0byte", 8, 5);
  expect_line(r, "cr\r", 3, 6);
  expect_line(r, "last", 4, 7);
  expect_eof(r);
  pft_reader_close(r);
}

static void test_reader_empty_and_newline_only(void **state) {
  (void)state;
  pft_reader *r;
  char err[256];
  assert_int_equal(pft_reader_open(&r, write_file("empty.txt", "", 0), err, sizeof err), 0);
  expect_eof(r);
  pft_reader_close(r);
  assert_int_equal(pft_reader_open(&r, write_file("nl.txt", "\n", 1), err, sizeof err), 0);
  expect_line(r, "", 0, 1);
  expect_eof(r);
  pft_reader_close(r);
  assert_int_equal(pft_reader_open(&r, write_file("crlf.txt", "x\r\n", 3), err, sizeof err), 0);
  expect_line(r, "x", 1, 1);
  expect_eof(r);
  pft_reader_close(r);
}

static void test_reader_long_lines(void **state) {
  (void)state;
  /* lines far longer than any initial buffer, the last without newline */
  size_t n1 = 3u << 20, n2 = 100000;
  char *text = malloc(n1 + 1 + n2);
  assert_non_null(text);
  for (size_t i = 0; i < n1; i++)
    text[i] = (char)('a' + i % 26);
  text[n1] = '\n';
  memset(text + n1 + 1, 'z', n2);
  const char *path = write_file("long.txt", text, n1 + 1 + n2);
  pft_reader *r;
  char err[256];
  assert_int_equal(pft_reader_open(&r, path, err, sizeof err), 0);
  expect_line(r, text, n1, 1);
  expect_line(r, text + n1 + 1, n2, 2);
  expect_eof(r);
  pft_reader_close(r);
  free(text);
}

static void test_reader_stdin(void **state) {
  (void)state;
  /* NULL and "-" both read standard input, which close leaves open. */
  const char *names[2] = {NULL, "-"};
  for (int k = 0; k < 2; k++) {
    const char *path = write_file("stdin.txt", "one\ntwo\n", 8);
    int fd = open(path, O_RDONLY);
    assert_true(fd >= 0);
    assert_int_equal(dup2(fd, 0), 0);
    close(fd);
    clearerr(stdin);
    pft_reader *r;
    char err[256];
    assert_int_equal(pft_reader_open(&r, names[k], err, sizeof err), 0);
    assert_string_equal(pft_reader_name(r), "<stdin>");
    expect_line(r, "one", 3, 1);
    expect_line(r, "two", 3, 2);
    expect_eof(r);
    pft_reader_close(r);
  }
}

static void test_reader_errors(void **state) {
  (void)state;
  pft_reader *r = (pft_reader *)&r;
  char err[256];
  char path[8192];
  snprintf(path, sizeof path, "%s/no-such-file", tmpdir);
  assert_int_equal(pft_reader_open(&r, path, err, sizeof err), -1);
  assert_null(r);
  assert_non_null(strstr(err, "no-such-file"));
  assert_non_null(strstr(err, "No such file"));

  /* a directory opens but cannot be read */
  assert_int_equal(pft_reader_open(&r, tmpdir, err, sizeof err), 0);
  const char *line;
  size_t len;
  uint64_t no;
  assert_int_equal(pft_reader_next(r, &line, &len, &no, err, sizeof err), -1);
  assert_non_null(strstr(err, "cannot read"));
  pft_reader_close(r);
  pft_reader_close(NULL);
}

static void test_blank(void **state) {
  (void)state;
  assert_true(pft_line_is_blank("", 0));
  assert_true(pft_line_is_blank(" \t\r\n", 4));
  assert_false(pft_line_is_blank(" x ", 3));
  assert_false(pft_line_is_blank("\0", 1));
}

/* ---- records ------------------------------------------------------------------------------ */

static void expect_bad(const char *line, int want, const char *msg) {
  pft_record rec;
  char err[512] = "";
  assert_int_equal(pft_parse_record(line, strlen(line), want, &rec, err, sizeof err), -1);
  if (!strstr(err, msg)) fail_msg("line %s: message \"%s\" lacks \"%s\"", line, err, msg);
  pft_record_free(&rec);
  assert_null(rec.prompt);
  assert_null(rec.a);
  assert_null(rec.b);
}

static void test_record_pair(void **state) {
  (void)state;
  const char *line = "{\"id\": 7, \"prompt\": \"Q: caf\\u00e9?\", \"chosen\": \"yes\", "
                     "\"rejected\": \"no\", \"margin\": 2, \"label\": 0.75, \"extra\": [1, {}]}";
  for (int want = PFT_WANT_PAIR; want <= PFT_WANT_ANY; want++) {
    pft_record rec;
    char err[256];
    assert_int_equal(pft_parse_record(line, strlen(line), want, &rec, err, sizeof err), 0);
    assert_int_equal(rec.kind, PFT_REC_PAIR);
    assert_string_equal(rec.prompt, "Q: caf\xc3\xa9?");
    assert_int_equal(rec.prompt_len, 9);
    assert_string_equal(rec.a, "yes");
    assert_int_equal(rec.a_len, 3);
    assert_string_equal(rec.b, "no");
    assert_int_equal(rec.b_len, 2);
    assert_true(rec.has_margin);
    assert_true(rec.margin == 2.0);
    assert_true(rec.has_label);
    assert_true(rec.label == 0.75);
    pft_record_free(&rec);
    assert_null(rec.a);
  }
  /* an empty prompt is fine, margin and label are optional, label bounds */
  const char *ok[] = {
      "{\"prompt\": \"\", \"chosen\": \"a\", \"rejected\": \"b\"}",
      "{\"prompt\": \"p\", \"chosen\": \"a\", \"rejected\": \"b\", \"label\": 0}",
      "{\"prompt\": \"p\", \"chosen\": \"a\", \"rejected\": \"b\", \"label\": 1.0}",
      "  {\"rejected\": \"b\", \"chosen\": \"a\", \"prompt\": \"p\", \"margin\": -1.5e-3}  ",
  };
  for (size_t i = 0; i < sizeof ok / sizeof *ok; i++) {
    pft_record rec;
    char err[256];
    assert_int_equal(pft_parse_record(ok[i], strlen(ok[i]), PFT_WANT_PAIR, &rec, err, sizeof err),
                     0);
    assert_int_equal(rec.kind, PFT_REC_PAIR);
    assert_int_equal(rec.has_margin, i == 3);
    assert_int_equal(rec.has_label, i == 1 || i == 2);
    if (i == 3) assert_true(rec.margin == -1.5e-3);
    pft_record_free(&rec);
  }
}

static void test_record_single(void **state) {
  (void)state;
  /* a single response; margin and label mean nothing for it and are not read */
  const char *line = "{\"prompt\": \"p\", \"response\": \"r\\n2\", \"label\": \"ignored\"}";
  pft_record rec;
  char err[256];
  assert_int_equal(pft_parse_record(line, strlen(line), PFT_WANT_ANY, &rec, err, sizeof err), 0);
  assert_int_equal(rec.kind, PFT_REC_SINGLE);
  assert_string_equal(rec.a, "r\n2");
  assert_int_equal(rec.a_len, 3);
  assert_null(rec.b);
  assert_false(rec.has_margin);
  assert_false(rec.has_label);
  pft_record_free(&rec);
}

static void test_record_bad(void **state) {
  (void)state;
  const int P = PFT_WANT_PAIR, A = PFT_WANT_ANY;
  /* invalid JSON, with jansson's column */
  expect_bad("{\"prompt\": \"p\",}", P, "invalid JSON at column 16: string or '}' expected");
  expect_bad("{\"prompt\": \"p\"", A, "invalid JSON at column");
  expect_bad("", A, "invalid JSON at column 0");
  expect_bad("{\"prompt\": \"\xff\"}", A, "invalid JSON");
  expect_bad("{\"prompt\": \"a\\u0000b\"}", A, "invalid JSON");
  expect_bad("{\"prompt\": \"p\", \"chosen\": \"a\", \"rejected\": \"b\", \"margin\": 1e400}", P,
             "invalid JSON at column 63: real number overflow");
  expect_bad("{\"prompt\": \"p\", \"prompt\": \"q\", \"response\": \"r\"}", A,
             "duplicate object key");
  expect_bad("{\"prompt\": \"p\"} trailing", A, "invalid JSON");
  /* not an object */
  expect_bad("[1, 2]", A, "not a JSON object (the line holds an array)");
  expect_bad("\"text\"", P, "not a JSON object (the line holds a string)");
  expect_bad("3.5", P, "not a JSON object (the line holds a number)");
  expect_bad("null", P, "not a JSON object (the line holds null)");
  /* missing fields */
  expect_bad("{\"chosen\": \"a\", \"rejected\": \"b\"}", P, "missing field \"prompt\"");
  expect_bad("{\"prompt\": \"p\", \"rejected\": \"b\"}", P, "missing field \"chosen\"");
  expect_bad("{\"prompt\": \"p\", \"chosen\": \"a\"}", P, "missing field \"rejected\"");
  expect_bad("{\"prompt\": \"p\", \"chosen\": \"a\"}", A, "missing field \"rejected\"");
  expect_bad("{\"prompt\": \"p\"}", P, "missing field \"chosen\"");
  expect_bad("{\"prompt\": \"p\"}", A,
             "missing field \"response\" (or \"chosen\" and \"rejected\" for a pair)");
  expect_bad("{\"prompt\": \"p\", \"response\": \"r\"}", P,
             "missing field \"chosen\" (a pair needs \"prompt\", \"chosen\" and \"rejected\"; "
             "this line is a single \"response\")");
  expect_bad("{\"prompt\": \"p\", \"response\": \"r\", \"chosen\": \"a\", \"rejected\": \"b\"}", A,
             "both \"response\" and \"chosen\"/\"rejected\"");
  /* wrong types */
  expect_bad("{\"prompt\": 1, \"response\": \"r\"}", A,
             "field \"prompt\" must be a string, not a number");
  expect_bad("{\"prompt\": \"p\", \"chosen\": null, \"rejected\": \"b\"}", P,
             "field \"chosen\" must be a string, not null");
  expect_bad("{\"prompt\": \"p\", \"chosen\": \"a\", \"rejected\": [\"b\"]}", P,
             "field \"rejected\" must be a string, not an array");
  expect_bad("{\"prompt\": \"p\", \"response\": {\"text\": \"r\"}}", A,
             "field \"response\" must be a string, not an object");
  expect_bad("{\"prompt\": \"p\", \"chosen\": \"a\", \"rejected\": \"b\", \"margin\": \"1\"}", P,
             "field \"margin\" must be a number, not a string");
  expect_bad("{\"prompt\": \"p\", \"chosen\": \"a\", \"rejected\": \"b\", \"label\": true}", P,
             "field \"label\" must be a number, not a boolean");
  /* empty responses */
  expect_bad("{\"prompt\": \"p\", \"chosen\": \"\", \"rejected\": \"b\"}", P,
             "field \"chosen\" is empty");
  expect_bad("{\"prompt\": \"p\", \"chosen\": \"a\", \"rejected\": \"\"}", A,
             "field \"rejected\" is empty");
  expect_bad("{\"prompt\": \"p\", \"response\": \"\"}", A, "field \"response\" is empty");
  /* label outside [0, 1] */
  expect_bad("{\"prompt\": \"p\", \"chosen\": \"a\", \"rejected\": \"b\", \"label\": 1.5}", P,
             "field \"label\" must be in [0, 1], got 1.5");
  expect_bad("{\"prompt\": \"p\", \"chosen\": \"a\", \"rejected\": \"b\", \"label\": -0.25}", A,
             "field \"label\" must be in [0, 1], got -0.25");
  /* the caller's mistake */
  expect_bad("{\"prompt\": \"p\", \"response\": \"r\"}", 99, "unknown record kind");
}

static void test_record_two_halves(void **state) {
  (void)state;
  char err[256];
  const char *line = "{\"prompt\": \"p\", \"response\": \"r\"}";
  json_t *root = pft_parse_json_line(line, strlen(line), err, sizeof err);
  assert_non_null(root);
  pft_record rec;
  assert_int_equal(pft_record_from_json(root, PFT_WANT_ANY, &rec, err, sizeof err), 0);
  assert_int_equal(rec.kind, PFT_REC_SINGLE);
  pft_record_free(&rec);
  assert_int_equal(pft_record_from_json(root, PFT_WANT_PAIR, &rec, err, sizeof err), -1);
  assert_non_null(strstr(err, "missing field \"chosen\""));
  pft_record_free(&rec);
  json_decref(root);
  /* any JSON value comes back; only the record step wants an object */
  root = pft_parse_json_line("[]", 2, err, sizeof err);
  assert_true(json_is_array(root));
  json_decref(root);
  assert_null(pft_parse_json_line("{", 1, err, sizeof err));
  assert_non_null(strstr(err, "invalid JSON at column 1"));
}

/* ---- sequences ------------------------------------------------------------------------------ */

static void seq(int32_t *v, size_t n, int32_t base) {
  for (size_t i = 0; i < n; i++)
    v[i] = base + (int32_t)i;
}

/* out == prompt tail of `kept` then the first `nx` of x */
static void expect_seq(const pft_ids *out, const int32_t *p, size_t np, size_t kept,
                       const int32_t *x, size_t nx) {
  assert_int_equal(out->n, kept + nx);
  for (size_t i = 0; i < kept; i++)
    assert_int_equal(out->v[i], p[np - kept + i]);
  for (size_t i = 0; i < nx; i++)
    assert_int_equal(out->v[kept + i], x[i]);
}

static void test_build_pair(void **state) {
  (void)state;
  int32_t p[40], c[40], r[40];
  seq(p, 40, 1000);
  seq(c, 40, 2000);
  seq(r, 40, 3000);
  pft_ids oc = {0}, orr = {0};
  size_t kept;
  /* everything fits */
  assert_int_equal(pft_build_pair(p, 3, c, 2, r, 4, 10, &oc, &orr, &kept), 0);
  assert_int_equal(kept, 3);
  expect_seq(&oc, p, 3, 3, c, 2);
  expect_seq(&orr, p, 3, 3, r, 4);
  /* the prompt loses its start; both keep the SAME tail, sized by the
   * longer response: kept = 8 - max(3, 5) = 3 */
  assert_int_equal(pft_build_pair(p, 10, c, 3, r, 5, 8, &oc, &orr, &kept), 0);
  assert_int_equal(kept, 3);
  expect_seq(&oc, p, 10, 3, c, 3);
  expect_seq(&orr, p, 10, 3, r, 5);
  /* the longer response exactly fills max_len: no prompt at all */
  assert_int_equal(pft_build_pair(p, 10, c, 8, r, 2, 8, &oc, &orr, &kept), 0);
  assert_int_equal(kept, 0);
  expect_seq(&oc, p, 10, 0, c, 8);
  expect_seq(&orr, p, 10, 0, r, 2);
  /* a response alone too long: cut to its first max_len tokens; the other
   * response keeps all of itself, and neither gets the prompt */
  assert_int_equal(pft_build_pair(p, 5, c, 12, r, 3, 8, &oc, &orr, &kept), 0);
  assert_int_equal(kept, 0);
  expect_seq(&oc, p, 5, 0, c, 8);
  expect_seq(&orr, p, 5, 0, r, 3);
  assert_int_equal(pft_build_pair(p, 5, c, 3, r, 30, 8, &oc, &orr, &kept), 0);
  assert_int_equal(kept, 0);
  expect_seq(&oc, p, 5, 0, c, 3);
  expect_seq(&orr, p, 5, 0, r, 8);
  /* an empty prompt */
  assert_int_equal(pft_build_pair(p, 0, c, 2, r, 3, 8, &oc, &orr, &kept), 0);
  assert_int_equal(kept, 0);
  expect_seq(&oc, p, 0, 0, c, 2);
  /* a single response (r NULL): out_r untouched, the prompt sized by c alone */
  orr.n = 12345;
  assert_int_equal(pft_build_pair(p, 20, c, 1, NULL, 30, 5, &oc, &orr, &kept), 0);
  assert_int_equal(kept, 4); /* prompt-only too long: its last 4 tokens */
  expect_seq(&oc, p, 20, 4, c, 1);
  assert_int_equal(orr.n, 12345);
  orr.n = 0;
  /* outputs are cleared first (not appended to); kept may be NULL */
  assert_int_equal(pft_build_pair(p, 2, c, 1, r, 1, 100, &oc, &orr, NULL), 0);
  expect_seq(&oc, p, 2, 2, c, 1);
  expect_seq(&orr, p, 2, 2, r, 1);
  free(oc.v);
  free(orr.v);
}

/* ---- features ---------------------------------------------------------------------------------
 */

static uint32_t fnv(const char *s, size_t n) {
  uint32_t h = 2166136261u;
  for (size_t i = 0; i < n; i++)
    h = (h ^ (unsigned char)s[i]) * 16777619u;
  return h;
}

static void test_ngram_features(void **state) {
  (void)state;
  const uint32_t dim = 1u << 20;
  float *x = malloc(dim * sizeof *x), *y = malloc(dim * sizeof *y);
  assert_non_null(x);
  assert_non_null(y);

  /* "aaaa": 1-gram a x4, 2-gram aa x3, 3-gram aaa x2 -> log 5, log 4, log 3, normalised */
  pft_ngram_features("aaaa", 4, x, dim);
  double v[3] = {log(5.0), log(4.0), log(3.0)};
  double norm = sqrt(v[0] * v[0] + v[1] * v[1] + v[2] * v[2]);
  uint32_t b[3] = {fnv("a", 1) % dim, fnv("aa", 2) % dim, fnv("aaa", 3) % dim};
  for (int k = 0; k < 3; k++)
    assert_float_equal(x[b[k]], v[k] / norm, 1e-7);
  size_t nonzero = 0;
  double ss = 0.0;
  for (uint32_t j = 0; j < dim; j++) {
    assert_true(x[j] >= 0.0f);
    nonzero += x[j] != 0.0f;
    ss += (double)x[j] * x[j];
  }
  assert_int_equal(nonzero, 3);
  assert_float_equal(ss, 1.0, 1e-6);

  /* deterministic, and a function of the bytes */
  const char *t = "The quick brown fox \xc3\xa9\x00 jumps";
  size_t tn = 30;
  pft_ngram_features(t, tn, x, dim);
  pft_ngram_features(t, tn, y, dim);
  assert_memory_equal(x, y, dim * sizeof *x);
  pft_ngram_features("The quick brown fox", 19, y, dim);
  assert_memory_not_equal(x, y, dim * sizeof *x);
  ss = 0.0;
  for (uint32_t j = 0; j < dim; j++)
    ss += (double)x[j] * x[j];
  assert_float_equal(ss, 1.0, 1e-6);

  /* empty text: all zero (buffer overwritten) */
  for (uint32_t j = 0; j < dim; j++)
    x[j] = 7.0f;
  pft_ngram_features("", 0, x, dim);
  for (uint32_t j = 0; j < dim; j++)
    assert_true(x[j] == 0.0f);

  /* one bucket: everything lands in it, so the vector is [1] */
  pft_ngram_features("hello", 5, x, 1);
  assert_true(x[0] == 1.0f);
  /* dim 0 writes nothing */
  x[0] = 3.0f;
  pft_ngram_features("hello", 5, x, 0);
  assert_true(x[0] == 3.0f);
  /* small dims: still unit norm with collisions */
  pft_ngram_features(t, tn, x, 7);
  ss = 0.0;
  for (int j = 0; j < 7; j++)
    ss += (double)x[j] * x[j];
  assert_float_equal(ss, 1.0, 1e-6);
  free(x);
  free(y);
}

/* ---- sidecar --------------------------------------------------------------------------------- */

static void test_sidecar_path(void **state) {
  (void)state;
  char out[64];
  assert_int_equal(pft_sidecar_path("run/model.safetensors", out, sizeof out), 0);
  assert_string_equal(out, "run/model.json");
  assert_int_equal(pft_sidecar_path("model.bin", out, sizeof out), 0);
  assert_string_equal(out, "model.bin.json");
  assert_int_equal(pft_sidecar_path("a.d/m", out, sizeof out), 0);
  assert_string_equal(out, "a.d/m.json");
  assert_int_equal(pft_sidecar_path(".safetensors", out, sizeof out), 0);
  assert_string_equal(out, ".safetensors.json");
  assert_int_equal(pft_sidecar_path("x.safetensors", out, 7), 0); /* "x.json" + NUL */
  assert_string_equal(out, "x.json");
  assert_int_equal(pft_sidecar_path("x.safetensors", out, 6), -1);
}

static int count_dir_entries(void) {
  DIR *d = opendir(tmpdir);
  assert_non_null(d);
  int n = 0;
  struct dirent *e;
  while ((e = readdir(d)))
    n += e->d_name[0] != '.';
  closedir(d);
  return n;
}

static void test_sidecar_round_trip(void **state) {
  (void)state;
  char path[8192], err[512];
  snprintf(path, sizeof path, "%s/rt.json", tmpdir);
  int before = count_dir_entries();
  const char *specs[] = {"bytes", "gpt2:/models/gpt 2/\"quoted\" \xc3\xa9"};
  for (int k = 0; k < 2; k++) {
    for (int ng = 0; ng < 2; ng++) {
      pft_sidecar s = {{0}, 0, 0}, t;
      strcpy(s.tokenizer, specs[k]);
      s.max_len = ng ? 0 : 1024 + (uint64_t)k;
      s.ngrams = ng;
      assert_int_equal(pft_sidecar_write(path, &s, err, sizeof err), 0);
      assert_int_equal(pft_sidecar_read(path, &t, err, sizeof err), 0);
      assert_string_equal(t.tokenizer, s.tokenizer);
      assert_int_equal(t.max_len, s.max_len);
      assert_int_equal(t.ngrams, s.ngrams);
    }
  }
  /* written over in place, and no temporary file is left behind */
  assert_int_equal(count_dir_entries(), before + 1);
  FILE *f = fopen(path, "r");
  char text[256] = "";
  assert_non_null(fgets(text, sizeof text, f));
  fclose(f);
  assert_non_null(strstr(text, "\"input\": \"ngrams\""));

  /* a writer's own errors */
  pft_sidecar s = {{0}, 8, 0};
  assert_int_equal(pft_sidecar_write(path, &s, err, sizeof err), -1);
  assert_non_null(strstr(err, "tokenizer spec is empty"));
  strcpy(s.tokenizer, "bytes");
  char bad[8192];
  snprintf(bad, sizeof bad, "%s/no-dir/m.json", tmpdir);
  assert_int_equal(pft_sidecar_write(bad, &s, err, sizeof err), -1);
  assert_non_null(strstr(err, "cannot create"));
  assert_int_equal(count_dir_entries(), before + 1);
}

static void test_sidecar_bad(void **state) {
  (void)state;
  static const struct {
    const char *text, *msg;
  } cases[] = {
      {"", "invalid JSON at line"},
      {"{\"tokenizer\": \"bytes\", \"max_len\": 8, \"input\": \"tokens\"", "invalid JSON"},
      {"[1]", "not a JSON object"},
      {"{\"tokenizer\": \"bytes\", \"max_len\": 8}", "\"input\" must be \"tokens\" or \"ngrams\""},
      {"{\"tokenizer\": \"bytes\", \"max_len\": 8, \"input\": \"words\"}", "\"input\" must be"},
      {"{\"max_len\": 8, \"input\": \"tokens\"}", "\"tokenizer\" must be a non-empty string"},
      {"{\"tokenizer\": \"\", \"max_len\": 8, \"input\": \"tokens\"}", "\"tokenizer\" must be"},
      {"{\"tokenizer\": 3, \"max_len\": 8, \"input\": \"tokens\"}", "\"tokenizer\" must be"},
      {"{\"tokenizer\": \"bytes\", \"input\": \"tokens\"}", "\"max_len\" must be an integer >= 1"},
      {"{\"tokenizer\": \"bytes\", \"max_len\": 0, \"input\": \"tokens\"}", "\"max_len\" must be"},
      {"{\"tokenizer\": \"bytes\", \"max_len\": 8.5, \"input\": \"tokens\"}", "\"max_len\" must"},
      {"{\"tokenizer\": \"bytes\", \"max_len\": -1, \"input\": \"ngrams\"}",
       "\"max_len\" must be an integer >= 0"},
      {"{\"tokenizer\": \"bytes\", \"max_len\": 8, \"max_len\": 9, \"input\": \"tokens\"}",
       "duplicate object key"},
  };
  char err[512];
  for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
    const char *path = write_file("bad.json", cases[i].text, strlen(cases[i].text));
    pft_sidecar s;
    memset(&s, 0x55, sizeof s);
    assert_int_equal(pft_sidecar_read(path, &s, err, sizeof err), -1);
    if (!strstr(err, cases[i].msg)) fail_msg("case %zu: \"%s\" lacks \"%s\"", i, err, cases[i].msg);
    assert_non_null(strstr(err, path));
    assert_int_equal(s.tokenizer[0], '\0');
  }
  char path[8192];
  snprintf(path, sizeof path, "%s/missing.json", tmpdir);
  pft_sidecar s;
  assert_int_equal(pft_sidecar_read(path, &s, err, sizeof err), -1);
  assert_non_null(strstr(err, "cannot open sidecar"));

  /* an n-gram sidecar needs neither tokenizer nor max_len; unknown keys pass */
  const char *ok = "{\"input\": \"ngrams\", \"future\": {\"x\": 1}}";
  assert_int_equal(pft_sidecar_read(write_file("ok.json", ok, strlen(ok)), &s, err, sizeof err), 0);
  assert_true(s.ngrams);
  assert_int_equal(s.max_len, 0);
  assert_string_equal(s.tokenizer, "bytes");
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_reader_lines),
      cmocka_unit_test(test_reader_empty_and_newline_only),
      cmocka_unit_test(test_reader_long_lines),
      cmocka_unit_test(test_reader_stdin),
      cmocka_unit_test(test_reader_errors),
      cmocka_unit_test(test_blank),
      cmocka_unit_test(test_record_pair),
      cmocka_unit_test(test_record_single),
      cmocka_unit_test(test_record_bad),
      cmocka_unit_test(test_record_two_halves),
      cmocka_unit_test(test_build_pair),
      cmocka_unit_test(test_ngram_features),
      cmocka_unit_test(test_sidecar_path),
      cmocka_unit_test(test_sidecar_round_trip),
      cmocka_unit_test(test_sidecar_bad),
  };
  return cmocka_run_group_tests(tests, setup_dir, teardown_dir);
}
