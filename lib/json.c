/*
 * json.c - a small strict JSON reader for safetensors headers (json.h).
 *
 * Strict: RFC 8259 syntax only (no comments, no trailing commas, no NaN),
 * every string's escapes and UTF-8 validated, numbers validated but only
 * non-negative integers converted, duplicate keys refused. Bounded: never
 * reads past the end, nesting at most PRMI_JSON_MAX_DEPTH, at most
 * PRMI_JSON_MAX_KEYS keys in one object.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "json.h"

int prmi_json_err(prmi_json *j, const char *what) {
  snprintf(j->msg, sizeof j->msg, "%s at header byte %zu", what, (size_t)(j->p - j->base));
  return -1;
}

void prmi_json_ws(prmi_json *j) {
  while (j->p < j->end && (*j->p == ' ' || *j->p == '\t' || *j->p == '\n' || *j->p == '\r'))
    j->p++;
}

/* Skip whitespace, then consume c if it is next. */
static int prmi_json_accept(prmi_json *j, char c) {
  prmi_json_ws(j);
  if (j->p < j->end && *j->p == (unsigned char)c) {
    j->p++;
    return 1;
  }
  return 0;
}

static int prmi_json_expect(prmi_json *j, char c) {
  char what[32];
  if (prmi_json_accept(j, c)) return 0;
  snprintf(what, sizeof what, "expected '%c'", c);
  return prmi_json_err(j, what);
}

static int hex_val(unsigned char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

/* Four hex digits at s (caller ensured 4 bytes exist). */
static long hex4(const unsigned char *s) {
  long v = 0;
  for (int i = 0; i < 4; i++) {
    int h = hex_val(s[i]);
    if (h < 0) return -1;
    v = v * 16 + h;
  }
  return v;
}

/* Length of the valid UTF-8 sequence at s (< end), or 0 if invalid. */
static size_t utf8_len(const unsigned char *s, const unsigned char *end) {
  unsigned char c = s[0];
  size_t n, i;
  uint32_t cp;
  if (c < 0x80) return 1;
  if (c >= 0xC2 && c <= 0xDF) {
    n = 2;
    cp = c & 0x1Fu;
  } else if (c >= 0xE0 && c <= 0xEF) {
    n = 3;
    cp = c & 0x0Fu;
  } else if (c >= 0xF0 && c <= 0xF4) {
    n = 4;
    cp = c & 0x07u;
  } else {
    return 0;
  }
  if ((size_t)(end - s) < n) return 0;
  for (i = 1; i < n; i++) {
    if ((s[i] & 0xC0u) != 0x80u) return 0;
    cp = (cp << 6) | (s[i] & 0x3Fu);
  }
  if ((n == 3 && cp < 0x800) || (n == 4 && (cp < 0x10000 || cp > 0x10FFFF)) ||
      (cp >= 0xD800 && cp <= 0xDFFF))
    return 0;
  return n;
}

/*
 * Validate a string literal at the cursor; *s, *e receive the raw content
 * (between the quotes). Surrogate escapes must pair up.
 */
int prmi_json_string(prmi_json *j, const unsigned char **s, const unsigned char **e) {
  prmi_json_ws(j);
  if (j->p >= j->end || *j->p != '"') return prmi_json_err(j, "expected a string");
  j->p++;
  *s = j->p;
  while (j->p < j->end && *j->p != '"') {
    unsigned char c = *j->p;
    if (c < 0x20) return prmi_json_err(j, "control character in string");
    if (c == '\\') {
      if (j->end - j->p < 2) return prmi_json_err(j, "unterminated escape");
      c = j->p[1];
      if (c == 'u') {
        long u;
        if (j->end - j->p < 6 || (u = hex4(j->p + 2)) < 0)
          return prmi_json_err(j, "bad \\u escape");
        if (u >= 0xDC00 && u <= 0xDFFF) return prmi_json_err(j, "unpaired low surrogate");
        if (u >= 0xD800 && u <= 0xDBFF) {
          long lo;
          if (j->end - j->p < 12 || j->p[6] != '\\' || j->p[7] != 'u' ||
              (lo = hex4(j->p + 8)) < 0xDC00 || lo > 0xDFFF)
            return prmi_json_err(j, "unpaired high surrogate");
          j->p += 6;
        }
        j->p += 6;
      } else if (c == '"' || c == '\\' || c == '/' || c == 'b' || c == 'f' || c == 'n' ||
                 c == 'r' || c == 't') {
        j->p += 2;
      } else {
        return prmi_json_err(j, "invalid escape");
      }
    } else {
      size_t n = utf8_len(j->p, j->end);
      if (n == 0) return prmi_json_err(j, "invalid UTF-8 in string");
      j->p += n;
    }
  }
  if (j->p >= j->end) return prmi_json_err(j, "unterminated string");
  *e = j->p;
  j->p++;
  return 0;
}

/*
 * Decode one character of validated string content at *sp into out and
 * advance *sp; returns the number of bytes written (1 to 4). Raw bytes pass
 * through one at a time; "\u0000" gives a single 0 byte.
 */
static size_t prmi_json_decode_one(const unsigned char **sp, unsigned char out[4]) {
  const unsigned char *s = *sp;
  size_t k = 0;
  if (*s != '\\') {
    out[k++] = *s++;
  } else if (s[1] != 'u') {
    switch (s[1]) {
    case 'b': out[k++] = '\b'; break;
    case 'f': out[k++] = '\f'; break;
    case 'n': out[k++] = '\n'; break;
    case 'r': out[k++] = '\r'; break;
    case 't': out[k++] = '\t'; break;
    default: out[k++] = s[1]; break; /* " \ / */
    }
    s += 2;
  } else {
    uint32_t cp = (uint32_t)hex4(s + 2);
    s += 6;
    if (cp >= 0xD800 && cp <= 0xDBFF) { /* validated: a low surrogate follows */
      cp = 0x10000 + ((cp - 0xD800) << 10) + ((uint32_t)hex4(s + 2) - 0xDC00);
      s += 6;
    }
    if (cp < 0x80) {
      out[k++] = (unsigned char)cp;
    } else if (cp < 0x800) {
      out[k++] = (unsigned char)(0xC0 | (cp >> 6));
      out[k++] = (unsigned char)(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
      out[k++] = (unsigned char)(0xE0 | (cp >> 12));
      out[k++] = (unsigned char)(0x80 | ((cp >> 6) & 0x3F));
      out[k++] = (unsigned char)(0x80 | (cp & 0x3F));
    } else {
      out[k++] = (unsigned char)(0xF0 | (cp >> 18));
      out[k++] = (unsigned char)(0x80 | ((cp >> 12) & 0x3F));
      out[k++] = (unsigned char)(0x80 | ((cp >> 6) & 0x3F));
      out[k++] = (unsigned char)(0x80 | (cp & 0x3F));
    }
  }
  *sp = s;
  return k;
}

/*
 * Decode validated string content [s, e) into out (NUL-terminated, at most
 * cap-1 bytes). Returns the length, or -1 when it does not fit or holds a
 * NUL character (which no name or value of ours may contain).
 */
long prmi_json_decode(const unsigned char *s, const unsigned char *e, char *out, size_t cap) {
  size_t n = 0;
  while (s < e) {
    unsigned char buf[4];
    size_t k = prmi_json_decode_one(&s, buf);
    if (buf[0] == 0) return -1;
    if (k > cap - 1 - n) return -1;
    memcpy(out + n, buf, k);
    n += k;
  }
  out[n] = '\0';
  return (long)n;
}

/* Non-negative JSON integer without fraction or exponent, within uint64. */
static int prmi_json_uint(prmi_json *j, uint64_t *v) {
  uint64_t x = 0;
  prmi_json_ws(j);
  if (j->p >= j->end || *j->p < '0' || *j->p > '9')
    return prmi_json_err(j, "expected a non-negative integer");
  if (*j->p == '0' && j->end - j->p > 1 && j->p[1] >= '0' && j->p[1] <= '9')
    return prmi_json_err(j, "leading zero in number");
  while (j->p < j->end && *j->p >= '0' && *j->p <= '9') {
    unsigned d = (unsigned)(*j->p - '0');
    if (x > (UINT64_MAX - d) / 10) return prmi_json_err(j, "integer too large");
    x = x * 10 + d;
    j->p++;
  }
  if (j->p < j->end && (*j->p == '.' || *j->p == 'e' || *j->p == 'E'))
    return prmi_json_err(j, "expected an integer, found a fraction or exponent");
  *v = x;
  return 0;
}

/* [u, u, ...] with at most max elements (more: error). */
int prmi_json_uint_array(prmi_json *j, uint64_t *out, uint32_t max, uint32_t *n) {
  *n = 0;
  if (prmi_json_expect(j, '[') != 0) return -1;
  if (prmi_json_accept(j, ']')) return 0;
  do {
    if (*n >= max) return prmi_json_err(j, "array has too many elements");
    if (prmi_json_uint(j, &out[*n]) != 0) return -1;
    (*n)++;
  } while (prmi_json_accept(j, ','));
  return prmi_json_expect(j, ']');
}

static int prmi_json_number(prmi_json *j) {
  const unsigned char *p = j->p;
  if (p < j->end && *p == '-') p++;
  if (p >= j->end || *p < '0' || *p > '9') return prmi_json_err(j, "invalid number");
  if (*p == '0')
    p++;
  else
    while (p < j->end && *p >= '0' && *p <= '9')
      p++;
  if (p < j->end && *p == '.') {
    p++;
    if (p >= j->end || *p < '0' || *p > '9') return prmi_json_err(j, "invalid number");
    while (p < j->end && *p >= '0' && *p <= '9')
      p++;
  }
  if (p < j->end && (*p == 'e' || *p == 'E')) {
    p++;
    if (p < j->end && (*p == '+' || *p == '-')) p++;
    if (p >= j->end || *p < '0' || *p > '9') return prmi_json_err(j, "invalid number");
    while (p < j->end && *p >= '0' && *p <= '9')
      p++;
  }
  j->p = p;
  return 0;
}

int prmi_json_literal(prmi_json *j, const char *lit) {
  size_t n = strlen(lit);
  if ((size_t)(j->end - j->p) < n || memcmp(j->p, lit, n) != 0)
    return prmi_json_err(j, "invalid JSON value");
  j->p += n;
  return 0;
}

/*
 * Objects. Every object of the header, known or not (the top level,
 * __metadata__, tensor entries, objects nested in unknown fields), is read
 * through prmi_json_obj_next, which remembers each key and rejects one given
 * twice: parsers disagree on which of two values wins (Python's prmi_json takes
 * the last), so a file with a repeated key means different things to
 * different readers, and we refuse it. Keys are compared decoded ("a" and
 * "\u0061" are the same key). An object has at most PRMI_JSON_MAX_KEYS keys.
 */

/* Decoded bytes of validated string content, one at a time. */
typedef struct json_chars {
  const unsigned char *s, *e;
  unsigned char b[4];
  size_t n, i;
} json_chars;

static json_chars prmi_json_chars_of(const prmi_json_key *k) {
  json_chars c;
  c.s = k->s;
  c.e = k->e;
  c.n = c.i = 0;
  return c;
}

/* The next decoded byte, or -1 at the end. */
static int prmi_json_char_next(json_chars *c) {
  if (c->i == c->n) {
    if (c->s >= c->e) return -1;
    c->n = prmi_json_decode_one(&c->s, c->b);
    c->i = 0;
  }
  return c->b[c->i++];
}

/* Order by (hash, length, decoded bytes); 0 only for the same key. */
static int cmp_key(const void *pa, const void *pb) {
  const prmi_json_key *a = pa, *b = pb;
  json_chars x, y;
  if (a->hash != b->hash) return a->hash < b->hash ? -1 : 1;
  if (a->len != b->len) return a->len < b->len ? -1 : 1;
  x = prmi_json_chars_of(a);
  y = prmi_json_chars_of(b);
  for (;;) {
    int u = prmi_json_char_next(&x), v = prmi_json_char_next(&y);
    if (u != v) return u < v ? -1 : 1;
    if (u < 0) return 0;
  }
}

/* The decoded key for a message: control bytes as '?', cut with "..."
 * (never inside a UTF-8 sequence). */
static void key_for_message(const prmi_json_key *k, char *out, size_t cap) {
  json_chars c = prmi_json_chars_of(k);
  size_t n = 0;
  int b;
  while ((b = prmi_json_char_next(&c)) >= 0) {
    if (n + 4 >= cap) {
      while (n > 0 && ((unsigned char)out[n - 1] & 0xC0u) == 0x80u)
        n--;
      if (n > 0 && (unsigned char)out[n - 1] >= 0xC0u) n--;
      memcpy(out + n, "...", 3);
      n += 3;
      break;
    }
    out[n++] = b < 0x20 || b == 0x7F ? '?' : (char)b;
  }
  out[n] = '\0';
}

/* Consume '{' and start an empty key set. Always prmi_json_obj_free afterwards. */
int prmi_json_obj_open(prmi_json *j, prmi_json_obj *o, const char *what, const char *tensor) {
  o->keys = o->inl;
  o->n = 0;
  o->cap = PRMI_JSON_KEYS_INLINE;
  o->what = what;
  o->tensor = tensor;
  return prmi_json_expect(j, '{');
}

void prmi_json_obj_free(prmi_json_obj *o) {
  if (o->keys != o->inl) free(o->keys);
  o->keys = o->inl;
}

static int prmi_json_obj_add(prmi_json *j, prmi_json_obj *o, const unsigned char *s,
                             const unsigned char *e) {
  prmi_json_key *k;
  json_chars c;
  int b;
  if (o->n == o->cap) {
    uint32_t cap = 2 * o->cap;
    prmi_json_key *grown;
    if (o->n >= PRMI_JSON_MAX_KEYS) {
      char m[64];
      snprintf(m, sizeof m, "object has more than %d keys", PRMI_JSON_MAX_KEYS);
      return prmi_json_err(j, m);
    }
    if (cap > PRMI_JSON_MAX_KEYS) cap = PRMI_JSON_MAX_KEYS;
    grown = o->keys == o->inl ? malloc(cap * sizeof *grown) : realloc(o->keys, cap * sizeof *grown);
    if (grown == NULL) {
      j->nomem = 1;
      snprintf(j->msg, sizeof j->msg, "out of memory");
      return -1;
    }
    if (o->keys == o->inl) memcpy(grown, o->inl, sizeof o->inl);
    o->keys = grown;
    o->cap = cap;
  }
  k = &o->keys[o->n++];
  k->s = s;
  k->e = e;
  k->hash = 0xCBF29CE484222325ull;
  k->len = 0;
  c = prmi_json_chars_of(k);
  while ((b = prmi_json_char_next(&c)) >= 0) {
    k->hash = (k->hash ^ (uint64_t)b) * 0x100000001B3ull;
    k->len++;
  }
  return 0;
}

/* At the closing '}': no key twice. Sorting bounds the work by
 * O(n log n) comparisons even for keys crafted to share a hash. */
static int prmi_json_obj_unique(prmi_json *j, prmi_json_obj *o) {
  if (o->n < 2) return 0;
  qsort(o->keys, o->n, sizeof *o->keys, cmp_key);
  for (uint32_t i = 1; i < o->n; i++) {
    const prmi_json_key *a = &o->keys[i - 1], *b = &o->keys[i];
    char name[64]; /* for the message: longer keys are cut */
    if (cmp_key(a, b) != 0) continue;
    if (a->s > b->s) b = a; /* report the second occurrence */
    key_for_message(b, name, sizeof name);
    if (o->tensor != NULL)
      snprintf(j->msg, sizeof j->msg, "duplicate %s '%s' in tensor %s at header byte %zu", o->what,
               name, o->tensor, (size_t)(b->s - 1 - j->base));
    else
      snprintf(j->msg, sizeof j->msg, "duplicate %s '%s' at header byte %zu", o->what, name,
               (size_t)(b->s - 1 - j->base));
    return -1;
  }
  return 0;
}

/*
 * The next member of an object opened with prmi_json_obj_open. Returns 1 with
 * the key's raw content in [*s, *e) and the cursor after the ':' (the caller
 * reads the value next), 0 after the closing '}' when no key repeats, -1 on
 * an error.
 */
int prmi_json_obj_next(prmi_json *j, prmi_json_obj *o, const unsigned char **s,
                       const unsigned char **e) {
  int more = o->n == 0 ? !prmi_json_accept(j, '}') : prmi_json_accept(j, ',');
  if (!more) {
    if (o->n > 0 && prmi_json_expect(j, '}') != 0) return -1;
    return prmi_json_obj_unique(j, o);
  }
  if (prmi_json_string(j, s, e) != 0 || prmi_json_expect(j, ':') != 0) return -1;
  return prmi_json_obj_add(j, o, *s, *e) != 0 ? -1 : 1;
}

/* Skip any value (validating it); nesting limited to PRMI_JSON_MAX_DEPTH. */
int prmi_json_skip(prmi_json *j) {
  const unsigned char *s, *e;
  int rc = 0;
  prmi_json_ws(j);
  if (j->p >= j->end) return prmi_json_err(j, "unexpected end of header");
  switch (*j->p) {
  case '"': return prmi_json_string(j, &s, &e);
  case 't': return prmi_json_literal(j, "true");
  case 'f': return prmi_json_literal(j, "false");
  case 'n': return prmi_json_literal(j, "null");
  case '{': {
    prmi_json_obj o;
    if (++j->depth > PRMI_JSON_MAX_DEPTH) return prmi_json_err(j, "JSON nested too deeply");
    rc = prmi_json_obj_open(j, &o, "key", NULL);
    while (rc == 0 && (rc = prmi_json_obj_next(j, &o, &s, &e)) == 1)
      rc = prmi_json_skip(j);
    prmi_json_obj_free(&o);
    j->depth--;
    return rc;
  }
  case '[':
    if (++j->depth > PRMI_JSON_MAX_DEPTH) return prmi_json_err(j, "JSON nested too deeply");
    j->p++;
    if (!prmi_json_accept(j, ']')) {
      do {
        if (prmi_json_skip(j) != 0) return -1;
      } while (prmi_json_accept(j, ','));
      rc = prmi_json_expect(j, ']');
    }
    j->depth--;
    return rc;
  default: return prmi_json_number(j);
  }
}
