/*
 * json.h - the strict JSON reader of the checkpoint code (json.c).
 *
 * A cursor over [p, end) of untrusted bytes. Every function returns 0 (or 1
 * for "one more key") and -1 on an error, after which msg says what was
 * wrong and at which byte offset from base. Nothing reads past end; nesting
 * is bounded by PRMI_JSON_MAX_DEPTH; strings are validated in place (escapes,
 * control characters, UTF-8) and decoded only on request into a caller
 * buffer. Objects are read key by key through prmi_json_obj_next, which
 * refuses a key given twice (compared decoded) at the closing brace.
 * Internal: nothing here is exported.
 */
#ifndef PRM_JSON_H
#define PRM_JSON_H

#include <stddef.h>
#include <stdint.h>

#define PRMI_JSON_MAX_DEPTH 64
#define PRMI_JSON_MAX_KEYS 8192
#define PRMI_JSON_KEYS_INLINE 8 /* keys kept without allocating (tensor entries have 3) */

/*
 * Cursor over [p, end). Every function returns 0 or -1; on -1 `msg` says
 * what was wrong and where (byte offset from `base`). Strings are validated
 * in place (escapes, control characters, UTF-8) and decoded only when their
 * value is needed, into a caller buffer of fixed size.
 */
typedef struct prmi_json {
  const unsigned char *base, *p, *end;
  int depth;
  int nomem; /* failed for lack of memory (not a bad header) */
  char msg[160];
} prmi_json;

/* One key: raw content [s, e) of its validated literal; FNV-1a hash and
 * length of its decoded bytes (so most comparisons never decode). */
typedef struct prmi_json_key {
  const unsigned char *s, *e;
  uint64_t hash;
  size_t len;
} prmi_json_key;

typedef struct prmi_json_obj {
  prmi_json_key inl[PRMI_JSON_KEYS_INLINE];
  prmi_json_key *keys; /* inl, or the heap beyond PRMI_JSON_KEYS_INLINE keys */
  uint32_t n, cap;
  const char *what;   /* a key in messages: "tensor", "field", ... */
  const char *tensor; /* for a tensor entry's fields: its name, else NULL */
} prmi_json_obj;

/* Record "<what> at header byte N" in j->msg; returns -1. */
int prmi_json_err(prmi_json *j, const char *what);
/* Skip JSON whitespace. */
void prmi_json_ws(prmi_json *j);
/* A string literal: validated; [*s, *e) is its raw content (escapes kept). */
int prmi_json_string(prmi_json *j, const unsigned char **s, const unsigned char **e);
/* Decode validated raw content into out (NUL-terminated); its length, or -1
 * when it needs cap bytes or more or contains NUL. */
long prmi_json_decode(const unsigned char *s, const unsigned char *e, char *out, size_t cap);
/* [u, u, ...] of at most max non-negative integers into out; *n their count. */
int prmi_json_uint_array(prmi_json *j, uint64_t *out, uint32_t max, uint32_t *n);
/* Exactly the literal lit (null, true, false). */
int prmi_json_literal(prmi_json *j, const char *lit);
/* '{': start reading an object; what/tensor name its keys in messages. */
int prmi_json_obj_open(prmi_json *j, prmi_json_obj *o, const char *what, const char *tensor);
void prmi_json_obj_free(prmi_json_obj *o);
/* Next key: 1 with its raw content in [*s, *e) and the cursor before its
 * value (the caller reads or skips the value); 0 after the closing brace
 * (which checks that no key repeats); -1 on error. */
int prmi_json_obj_next(prmi_json *j, prmi_json_obj *o, const unsigned char **s,
                       const unsigned char **e);
/* Validate and skip any value. */
int prmi_json_skip(prmi_json *j);

#endif /* PRM_JSON_H */
