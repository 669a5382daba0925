/*
 * data.c - JSONL records, the truncation rule, n-gram features and the
 * model sidecar of the prefrm tools (see data.h, which is the spec).
 */
#define _POSIX_C_SOURCE 200809L

#include "data.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* ---- reading lines ---------------------------------------------------------------------- */

struct pft_reader {
  FILE *f;
  int own;   /* 1: fclose on close (not stdin) */
  char *buf; /* getline's buffer: the current line */
  size_t cap;
  uint64_t line_no;
  char name[]; /* for messages */
};

int pft_reader_open(pft_reader **out, const char *path, char *err, size_t err_size) {
  *out = NULL;
  int is_stdin = path == NULL || strcmp(path, "-") == 0;
  const char *name = is_stdin ? "<stdin>" : path;
  pft_reader *r = calloc(1, sizeof *r + strlen(name) + 1);
  if (!r) {
    snprintf(err, err_size, "out of memory");
    return -1;
  }
  strcpy(r->name, name);
  if (is_stdin) {
    r->f = stdin;
  } else {
    r->f = fopen(path, "rb");
    if (!r->f) {
      snprintf(err, err_size, "cannot open '%s': %s", path, strerror(errno));
      free(r);
      return -1;
    }
    r->own = 1;
  }
  *out = r;
  return 0;
}

int pft_reader_next(pft_reader *r, const char **line, size_t *len, uint64_t *line_no, char *err,
                    size_t err_size) {
  errno = 0;
  ssize_t n = getline(&r->buf, &r->cap, r->f);
  if (n < 0) {
    if (feof(r->f) && !ferror(r->f)) return 0;
    snprintf(err, err_size, "cannot read '%s' after line %llu: %s", r->name,
             (unsigned long long)r->line_no, strerror(errno ? errno : EIO));
    return -1;
  }
  size_t m = (size_t)n;
  if (m > 0 && r->buf[m - 1] == '\n') {
    m--;
    if (m > 0 && r->buf[m - 1] == '\r') m--;
  }
  r->buf[m] = '\0';
  *line = r->buf;
  *len = m;
  *line_no = ++r->line_no;
  return 1;
}

void pft_reader_close(pft_reader *r) {
  if (!r) return;
  if (r->own) fclose(r->f);
  free(r->buf);
  free(r);
}

const char *pft_reader_name(const pft_reader *r) { return r->name; }

int pft_line_is_blank(const char *line, size_t len) {
  for (size_t i = 0; i < len; i++)
    if (line[i] != ' ' && line[i] != '\t' && line[i] != '\r' && line[i] != '\n') return 0;
  return 1;
}

/* ---- records ------------------------------------------------------------------------------ */

static const char *json_type_name(const json_t *v) {
  switch (json_typeof(v)) {
  case JSON_OBJECT: return "an object";
  case JSON_ARRAY: return "an array";
  case JSON_STRING: return "a string";
  case JSON_INTEGER:
  case JSON_REAL: return "a number";
  case JSON_TRUE:
  case JSON_FALSE: return "a boolean";
  case JSON_NULL: return "null";
  }
  return "an unknown value";
}

json_t *pft_parse_json_line(const char *line, size_t len, char *err, size_t err_size) {
  json_error_t e;
  /* DECODE_ANY: a line holding a bare string or number gets "not a JSON
   * object" from pft_record_from_json rather than jansson's "'[' or '{'
   * expected". Duplicate keys are refused: which one counts would be a
   * guess. */
  json_t *root = json_loadb(line, len, JSON_DECODE_ANY | JSON_REJECT_DUPLICATES, &e);
  if (!root) snprintf(err, err_size, "invalid JSON at column %d: %s", e.column, e.text);
  return root;
}

static char *copy_string(const json_t *v, size_t *len) {
  *len = json_string_length(v);
  char *s = malloc(*len + 1);
  if (s) {
    memcpy(s, json_string_value(v), *len);
    s[*len] = '\0';
  }
  return s;
}

/* A text field: present, a string, and non-empty unless allow_empty. */
static int get_text(const json_t *root, const char *key, int allow_empty, char **out, size_t *len,
                    char *err, size_t err_size) {
  const json_t *v = json_object_get(root, key);
  if (!v) {
    snprintf(err, err_size, "missing field \"%s\"", key);
    return -1;
  }
  if (!json_is_string(v)) {
    snprintf(err, err_size, "field \"%s\" must be a string, not %s", key, json_type_name(v));
    return -1;
  }
  if (!allow_empty && json_string_length(v) == 0) {
    snprintf(err, err_size, "field \"%s\" is empty", key);
    return -1;
  }
  *out = copy_string(v, len);
  if (!*out) {
    snprintf(err, err_size, "out of memory");
    return -1;
  }
  return 0;
}

/* An optional finite number. Returns 1 (present, *x set), 0 (absent), -1. */
static int get_number(const json_t *root, const char *key, double *x, char *err, size_t err_size) {
  const json_t *v = json_object_get(root, key);
  if (!v) return 0;
  if (!json_is_number(v)) {
    snprintf(err, err_size, "field \"%s\" must be a number, not %s", key, json_type_name(v));
    return -1;
  }
  *x = json_number_value(v);
  /* jansson refuses NaN/Inf literals and overflowing reals ("invalid JSON"),
   * so this is a guard for whatever a later jansson may accept. */
  if (!isfinite(*x)) {
    snprintf(err, err_size, "field \"%s\" is not a finite number", key);
    return -1;
  }
  return 1;
}

int pft_record_from_json(const json_t *root, int want, pft_record *rec, char *err,
                         size_t err_size) {
  memset(rec, 0, sizeof *rec);
  if (want != PFT_WANT_PAIR && want != PFT_WANT_ANY) {
    snprintf(err, err_size, "internal error: unknown record kind wanted (%d)", want);
    return -1;
  }
  if (!json_is_object(root)) {
    snprintf(err, err_size, "not a JSON object (the line holds %s)", json_type_name(root));
    return -1;
  }
  int has_pair = json_object_get(root, "chosen") || json_object_get(root, "rejected");
  int has_response = json_object_get(root, "response") != NULL;
  if (get_text(root, "prompt", 1, &rec->prompt, &rec->prompt_len, err, err_size)) return -1;

  if (want == PFT_WANT_ANY && !has_pair) {
    if (!has_response) {
      snprintf(err, err_size,
               "missing field \"response\" (or \"chosen\" and \"rejected\" for a pair)");
      return -1;
    }
    rec->kind = PFT_REC_SINGLE;
    return get_text(root, "response", 0, &rec->a, &rec->a_len, err, err_size);
  }
  if (want == PFT_WANT_ANY && has_response) {
    snprintf(err, err_size,
             "both \"response\" and \"chosen\"/\"rejected\": a line is a single "
             "response or a pair, not both");
    return -1;
  }
  if (want == PFT_WANT_PAIR && !has_pair && has_response) {
    snprintf(err, err_size,
             "missing field \"chosen\" (a pair needs \"prompt\", \"chosen\" and "
             "\"rejected\"; this line is a single \"response\")");
    return -1;
  }
  rec->kind = PFT_REC_PAIR;
  if (get_text(root, "chosen", 0, &rec->a, &rec->a_len, err, err_size)) return -1;
  if (get_text(root, "rejected", 0, &rec->b, &rec->b_len, err, err_size)) return -1;
  int k = get_number(root, "margin", &rec->margin, err, err_size);
  if (k < 0) return -1;
  rec->has_margin = k;
  k = get_number(root, "label", &rec->label, err, err_size);
  if (k < 0) return -1;
  if (k && !(rec->label >= 0.0 && rec->label <= 1.0)) {
    snprintf(err, err_size, "field \"label\" must be in [0, 1], got %.17g", rec->label);
    return -1;
  }
  rec->has_label = k;
  return 0;
}

int pft_parse_record(const char *line, size_t len, int want, pft_record *rec, char *err,
                     size_t err_size) {
  memset(rec, 0, sizeof *rec);
  json_t *root = pft_parse_json_line(line, len, err, err_size);
  if (!root) return -1;
  int rc = pft_record_from_json(root, want, rec, err, err_size);
  json_decref(root);
  return rc;
}

void pft_record_free(pft_record *rec) {
  if (!rec) return;
  free(rec->prompt);
  free(rec->a);
  free(rec->b);
  memset(rec, 0, sizeof *rec);
}

/* ---- sequences ------------------------------------------------------------------------------ */

static int ids_reserve(pft_ids *ids, size_t n) {
  if (n <= ids->cap) return 0;
  size_t cap = ids->cap ? ids->cap : 64;
  while (cap < n)
    cap *= 2;
  int32_t *v = realloc(ids->v, cap * sizeof *v);
  if (!v) return -1;
  ids->v = v;
  ids->cap = cap;
  return 0;
}

/* out = the last `kept` ids of the prompt, then the first min(n, max_len) of the response */
static int build_one(const int32_t *p, size_t np, size_t kept, const int32_t *x, size_t n,
                     size_t max_len, pft_ids *out) {
  if (n > max_len) n = max_len;
  if (ids_reserve(out, kept + n)) return -1;
  if (kept) memcpy(out->v, p + (np - kept), kept * sizeof *p);
  if (n) memcpy(out->v + kept, x, n * sizeof *x);
  out->n = kept + n;
  return 0;
}

int pft_build_pair(const int32_t *p, size_t np, const int32_t *c, size_t nc, const int32_t *r,
                   size_t nr, size_t max_len, pft_ids *out_c, pft_ids *out_r, size_t *kept) {
  out_c->n = 0;
  if (r) out_r->n = 0;
  size_t longest = r && nr > nc ? nr : nc;
  size_t k = longest < max_len ? max_len - longest : 0;
  if (k > np) k = np;
  if (kept) *kept = k;
  if (build_one(p, np, k, c, nc, max_len, out_c)) return -1;
  if (r && build_one(p, np, k, r, nr, max_len, out_r)) return -1;
  return 0;
}

/* ---- features ---------------------------------------------------------------------------------
 */

/*
 * The hash of an n-gram is 32-bit FNV-1a over its n bytes (offset basis
 * 2166136261, prime 16777619); its bucket is hash % dim. The 2- and 3-gram
 * hashes starting at a byte continue the 1-gram's, so each byte is hashed
 * once per n. Counts are kept in the float buckets themselves (exact up to
 * 2^24 per bucket; beyond that log(1 + c) changes by less than 1e-7).
 */
/* log1p of the small counts, which are most of them: the same floats as
 * (float)log1p(c), without a libm call per bucket */
enum { LOG1P_TABLE = 256 };
static float log1p_table[LOG1P_TABLE];
static pthread_once_t log1p_once = PTHREAD_ONCE_INIT;

static void log1p_init(void) {
  for (int c = 0; c < LOG1P_TABLE; c++)
    log1p_table[c] = (float)log1p((double)c);
}

void pft_ngram_features(const char *text, size_t len, float *x, uint32_t dim) {
  if (dim == 0) return;
  memset(x, 0, (size_t)dim * sizeof *x);
  const unsigned char *s = (const unsigned char *)text;
  for (size_t i = 0; i < len; i++) {
    uint32_t h = 2166136261u;
    for (size_t n = 0; n < 3 && i + n < len; n++) {
      h = (h ^ s[i + n]) * 16777619u;
      x[h % dim] += 1.0f;
    }
  }
  pthread_once(&log1p_once, log1p_init);
  double ss = 0.0;
  for (uint32_t j = 0; j < dim; j++) {
    x[j] = x[j] < (float)LOG1P_TABLE ? log1p_table[(int)x[j]] : (float)log1p((double)x[j]);
    ss += (double)x[j] * x[j];
  }
  if (ss == 0.0) return;
  double inv = 1.0 / sqrt(ss);
  for (uint32_t j = 0; j < dim; j++)
    x[j] = (float)(x[j] * inv);
}

/* ---- model sidecar --------------------------------------------------------------------------- */

int pft_sidecar_path(const char *ckpt, char *out, size_t size) {
  static const char ext[] = ".safetensors";
  size_t n = strlen(ckpt), e = sizeof ext - 1;
  if (n > e && strcmp(ckpt + n - e, ext) == 0) n -= e;
  int w = snprintf(out, size, "%.*s.json", (int)n, ckpt);
  return w < 0 || (size_t)w >= size ? -1 : 0;
}

static int write_all(int fd, const char *s, size_t n) {
  while (n > 0) {
    ssize_t w = write(fd, s, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      return -1;
    }
    s += w;
    n -= (size_t)w;
  }
  return 0;
}

/* Best effort: make the rename durable. A failure here leaves a complete
 * file in place either way, so it is not reported. */
static void sync_parent_dir(const char *path) {
  const char *slash = strrchr(path, '/');
  char *dir = slash ? strndup(path, slash == path ? 1 : (size_t)(slash - path)) : strdup(".");
  if (!dir) return;
  int fd = open(dir, O_RDONLY | O_DIRECTORY);
  if (fd >= 0) {
    fsync(fd);
    close(fd);
  }
  free(dir);
}

int pft_sidecar_write(const char *path, const pft_sidecar *s, char *err, size_t err_size) {
  size_t tlen = strnlen(s->tokenizer, sizeof s->tokenizer);
  if (tlen == 0 || tlen == sizeof s->tokenizer) {
    snprintf(err, err_size, "sidecar '%s': the tokenizer spec is empty or not terminated", path);
    return -1;
  }
  if (s->max_len > (uint64_t)INT64_MAX) {
    snprintf(err, err_size, "sidecar '%s': max_len %llu is too large", path,
             (unsigned long long)s->max_len);
    return -1;
  }
  json_t *o = json_pack("{s:s, s:I, s:s}", "tokenizer", s->tokenizer, "max_len",
                        (json_int_t)s->max_len, "input", s->ngrams ? "ngrams" : "tokens");
  char *text = o ? json_dumps(o, JSON_PRESERVE_ORDER) : NULL;
  json_decref(o);
  if (!text) {
    /* json_pack fails on invalid UTF-8 as well as on a failed allocation */
    snprintf(err, err_size, "sidecar '%s': cannot encode (tokenizer spec not UTF-8?)", path);
    return -1;
  }

  /* A name of our own beside the target, so that a concurrent writer of the
   * same sidecar cannot write into our temporary file. */
  static atomic_uint counter;
  size_t tmp_size = strlen(path) + 64;
  char *tmp = malloc(tmp_size);
  if (!tmp) {
    free(text);
    snprintf(err, err_size, "out of memory");
    return -1;
  }
  snprintf(tmp, tmp_size, "%s.%ld.%u.tmp", path, (long)getpid(), atomic_fetch_add(&counter, 1));
  int rc = -1;
  int fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
  if (fd < 0) {
    snprintf(err, err_size, "cannot create '%s': %s", tmp, strerror(errno));
    goto done;
  }
  if (write_all(fd, text, strlen(text)) || write_all(fd, "\n", 1) || fsync(fd)) {
    snprintf(err, err_size, "cannot write '%s': %s", tmp, strerror(errno));
    close(fd);
    unlink(tmp);
    goto done;
  }
  if (close(fd)) {
    snprintf(err, err_size, "cannot write '%s': %s", tmp, strerror(errno));
    unlink(tmp);
    goto done;
  }
  if (rename(tmp, path)) {
    snprintf(err, err_size, "cannot rename '%s' to '%s': %s", tmp, path, strerror(errno));
    unlink(tmp);
    goto done;
  }
  sync_parent_dir(path);
  rc = 0;
done:
  free(tmp);
  free(text);
  return rc;
}

int pft_sidecar_read(const char *path, pft_sidecar *s, char *err, size_t err_size) {
  memset(s, 0, sizeof *s);
  FILE *f = fopen(path, "rb");
  if (!f) {
    snprintf(err, err_size, "cannot open sidecar '%s': %s", path, strerror(errno));
    return -1;
  }
  json_error_t e;
  json_t *root = json_loadf(f, JSON_REJECT_DUPLICATES, &e);
  fclose(f);
  if (!root) {
    snprintf(err, err_size, "sidecar '%s': invalid JSON at line %d column %d: %s", path, e.line,
             e.column, e.text);
    return -1;
  }
  int rc = -1;
  if (!json_is_object(root)) {
    snprintf(err, err_size, "sidecar '%s': not a JSON object", path);
    goto done;
  }
  const json_t *input = json_object_get(root, "input");
  if (!json_is_string(input) ||
      (strcmp(json_string_value(input), "tokens") && strcmp(json_string_value(input), "ngrams"))) {
    snprintf(err, err_size, "sidecar '%s': field \"input\" must be \"tokens\" or \"ngrams\"", path);
    goto done;
  }
  s->ngrams = strcmp(json_string_value(input), "ngrams") == 0;

  /* For n-gram models the tokenizer and max_len say nothing; they are read
   * when present (and checked) but not required. */
  const json_t *tok = json_object_get(root, "tokenizer");
  if (tok || !s->ngrams) {
    if (!json_is_string(tok) || json_string_length(tok) == 0 ||
        json_string_length(tok) >= sizeof s->tokenizer ||
        strlen(json_string_value(tok)) != json_string_length(tok)) {
      snprintf(err, err_size, "sidecar '%s': field \"tokenizer\" must be a non-empty string", path);
      goto done;
    }
    memcpy(s->tokenizer, json_string_value(tok), json_string_length(tok) + 1);
  } else {
    strcpy(s->tokenizer, "bytes");
  }
  const json_t *ml = json_object_get(root, "max_len");
  if (ml || !s->ngrams) {
    if (!json_is_integer(ml) || json_integer_value(ml) < (s->ngrams ? 0 : 1)) {
      snprintf(err, err_size, "sidecar '%s': field \"max_len\" must be an integer >= %d", path,
               s->ngrams ? 0 : 1);
      goto done;
    }
    s->max_len = (uint64_t)json_integer_value(ml);
  }
  rc = 0;
done:
  json_decref(root);
  if (rc) memset(s, 0, sizeof *s);
  return rc;
}
