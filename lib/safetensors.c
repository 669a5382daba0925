/*
 * safetensors.c - the safetensors format: documents written (F32) and read
 * (F32, F16 and BF16, widened to F32), and model checkpoints on top.
 *
 * Layout of a file (all integers little-endian):
 *   u64 N                  length of the JSON header in bytes
 *   N bytes of JSON        {"__metadata__":{str:str,...},
 *                           "<name>":{"dtype":"F32","shape":[...],"data_offsets":[b,e]},...}
 *                          padded with spaces to a multiple of 8 bytes
 *   data                   raw little-endian fp32; [b, e) is relative to the data start
 *
 * Writing is streamed (header, then the arena converted to little-endian in
 * chunks); files are replaced atomically and durably by lib/fileio.c, which
 * also reads them. Reading never trusts the file: the JSON header
 * is parsed by the small strict parser below (bounded, no recursion beyond
 * PRMI_JSON_MAX_DEPTH, never reads past the buffer) and every number is checked
 * before it is used as a size or an offset. See docs/checkpoint-format.md.
 */
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "json.h"

/* The format stores IEEE-754 binary32; we move floats as 32-bit patterns. */
_Static_assert(sizeof(float) == 4 && FLT_MANT_DIG == 24 && FLT_MAX_EXP == 128,
               "float must be IEEE-754 binary32");

#define ST_HEADER_MAX ((uint64_t)100 * 1000 * 1000) /* same cap as the Rust crate */
#define ST_MAX_DIMS 8                               /* more dimensions than any tensor we accept */
#define ST_META_VALUE_MAX 1024
#define ST_CHUNK_FLOATS 4096 /* floats converted per write when streaming */

/* ------------------------------------------------------------------------ */
/* Byte order                                                                */
/* ------------------------------------------------------------------------ */

static void put_u64_le(unsigned char *d, uint64_t v) {
  for (int i = 0; i < 8; i++)
    d[i] = (unsigned char)((v >> (8 * i)) & 0xFFu);
}

static uint64_t get_u64_le(const unsigned char *s) {
  uint64_t v = 0;
  for (int i = 0; i < 8; i++)
    v |= (uint64_t)s[i] << (8 * i);
  return v;
}

/* n floats -> 4n bytes, little-endian, whatever the host order. */
static void put_f32_le(unsigned char *d, const float *x, size_t n) {
  for (size_t i = 0; i < n; i++) {
    uint32_t u;
    memcpy(&u, &x[i], 4);
    d[4 * i + 0] = (unsigned char)(u & 0xFFu);
    d[4 * i + 1] = (unsigned char)((u >> 8) & 0xFFu);
    d[4 * i + 2] = (unsigned char)((u >> 16) & 0xFFu);
    d[4 * i + 3] = (unsigned char)((u >> 24) & 0xFFu);
  }
}

/* IEEE binary16 -> binary32, exactly (every half is a float). */
static float half_to_float(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  uint32_t u;
  float f;
  if (exp == 0) {
    f = (float)man * 0x1p-24f; /* zero or subnormal: man * 2^-24, exact in float */
    memcpy(&u, &f, 4);
    u |= sign;
  } else if (exp == 31) {
    u = sign | 0x7f800000u | (man << 13); /* Inf / NaN: refused after conversion */
  } else {
    u = sign | ((exp + 112u) << 23) | (man << 13); /* rebias 15 -> 127 */
  }
  memcpy(&f, &u, 4);
  return f;
}

/* n little-endian elements of dtype width w (4: F32, 2: F16, 2 + bf16: BF16)
 * -> floats. F16 and BF16 widen exactly. */
static void get_elems_le(float *x, const unsigned char *s, size_t n, int dtype);

static void get_f32_le(float *x, const unsigned char *s, size_t n) {
  for (size_t i = 0; i < n; i++) {
    uint32_t u = (uint32_t)s[4 * i] | (uint32_t)s[4 * i + 1] << 8 | (uint32_t)s[4 * i + 2] << 16 |
                 (uint32_t)s[4 * i + 3] << 24;
    memcpy(&x[i], &u, 4);
  }
}

/* ------------------------------------------------------------------------ */
/* Writing the header                                                        */
/* ------------------------------------------------------------------------ */

/* Output sink that counts always and stores only while it fits (dst NULL:
 * count only). One code path gives both the size and the bytes. */
typedef struct st_sink {
  char *dst;
  size_t cap;
  size_t len;
} st_sink;

static void sink_put(st_sink *s, const char *p, size_t n) {
  if (s->dst != NULL && s->len <= s->cap && n <= s->cap - s->len) memcpy(s->dst + s->len, p, n);
  s->len += n;
}

static void sink_str(st_sink *s, const char *p) { sink_put(s, p, strlen(p)); }

static void sink_u64(st_sink *s, uint64_t v) {
  char tmp[24];
  size_t n = 0;
  do {
    tmp[sizeof tmp - 1 - n] = (char)('0' + (int)(v % 10));
    v /= 10;
    n++;
  } while (v != 0);
  sink_put(s, tmp + sizeof tmp - n, n);
}

/* A JSON string literal; escapes what JSON requires (names are ASCII anyway). */
static void sink_jstr(st_sink *s, const char *p) {
  static const char hex[] = "0123456789abcdef";
  sink_put(s, "\"", 1);
  for (; *p != '\0'; p++) {
    unsigned char c = (unsigned char)*p;
    if (c == '"' || c == '\\') {
      char e[2] = {'\\', (char)c};
      sink_put(s, e, 2);
    } else if (c < 0x20) {
      char e[6] = {'\\', 'u', '0', '0', hex[c >> 4], hex[c & 15]};
      sink_put(s, e, 6);
    } else {
      sink_put(s, (const char *)&c, 1);
    }
  }
  sink_put(s, "\"", 1);
}

/* "key":"value" with a leading comma unless first. */
static void sink_meta(st_sink *s, const char *key, int first) {
  if (!first) sink_put(s, ",", 1);
  sink_jstr(s, key);
  sink_put(s, ":", 1);
}

/* The configuration keys of meta_write go through this (lib/arch.h): into
 * a file's JSON header (sink), or into a key list (collect: the caller's
 * configuration of prm_model_load_pretrained, see below). */
typedef struct st_kv_list st_kv_list;
static void kv_add(st_kv_list *l, const char *key, const char *value);

struct prmi_meta_out {
  st_sink *sink;
  st_kv_list *collect;
  int first; /* no key written yet (no leading comma) */
};

void prmi_meta_put(prmi_meta_out *out, const char *key, const char *value) {
  if (out->collect != NULL) {
    kv_add(out->collect, key, value);
    return;
  }
  sink_meta(out->sink, key, out->first);
  out->first = 0;
  sink_jstr(out->sink, value);
}

/* A real as "%.17g", which reads back as the same double; the radix point
 * is written '.' whatever the host's LC_NUMERIC. */
void prmi_meta_put_real(prmi_meta_out *out, const char *key, double x) {
  char raw[48], txt[48];
  size_t n = 0;
  snprintf(raw, sizeof raw, "%.17g", x);
  for (const char *p = raw; *p != '\0' && n + 1 < sizeof txt; p++) {
    if ((*p >= '0' && *p <= '9') || *p == 'e' || *p == '+' || *p == '-')
      txt[n++] = *p;
    else if (n == 0 || txt[n - 1] != '.')
      txt[n++] = '.'; /* a locale's radix, possibly several bytes */
  }
  txt[n] = '\0';
  prmi_meta_put(out, key, txt);
}

void prmi_meta_put_u64(prmi_meta_out *out, const char *key, uint64_t v) {
  char buf[24];
  snprintf(buf, sizeof buf, "%llu", (unsigned long long)v);
  prmi_meta_put(out, key, buf);
}

/* The JSON header of a document, padded with spaces to a multiple of 8.
 * Returns its length. Data offsets follow the tensors' order. */
static size_t write_doc_header(const prmi_st_doc *d, char *dst, size_t cap) {
  st_sink s = {dst, cap, 0};
  prmi_meta_out out = {&s, NULL, 1};
  uint64_t offset = 0;
  sink_str(&s, "{\"__metadata__\":{");
  d->meta(d->arg, &out); /* the document's keys first ("model", its config) */
  prmi_meta_put(&out, "format", "pt");
  prmi_meta_put(&out, "prefrm_version", PRM_VERSION_STRING);
  sink_put(&s, "}", 1);
  for (uint32_t t = 0; t < d->n_tensors; t++) {
    prmi_st_tensor tn;
    d->tensor(d->arg, t, &tn);
    const uint64_t bytes = 4 * (tn.ndim == 2 ? tn.shape[0] * tn.shape[1] : tn.shape[0]);
    sink_put(&s, ",", 1);
    sink_jstr(&s, tn.name);
    sink_str(&s, ":{\"dtype\":\"F32\",\"shape\":[");
    for (uint32_t k = 0; k < tn.ndim; k++) {
      if (k > 0) sink_put(&s, ",", 1);
      sink_u64(&s, tn.shape[k]);
    }
    sink_str(&s, "],\"data_offsets\":[");
    sink_u64(&s, offset);
    sink_put(&s, ",", 1);
    sink_u64(&s, offset + bytes);
    sink_str(&s, "]}");
    offset += bytes;
  }
  sink_put(&s, "}", 1);
  while (s.len % 8 != 0)
    sink_put(&s, " ", 1);
  return s.len;
}

/* Floats of all tensors; SIZE_MAX when the sum overflows. */
static size_t doc_floats(const prmi_st_doc *d) {
  size_t n = 0;
  for (uint32_t t = 0; t < d->n_tensors; t++) {
    prmi_st_tensor tn;
    d->tensor(d->arg, t, &tn);
    const uint64_t k = tn.ndim == 2 ? tn.shape[0] * tn.shape[1] : tn.shape[0];
    if (k > SIZE_MAX / 4 - n) return SIZE_MAX;
    n += (size_t)k;
  }
  return n;
}

size_t prmi_st_size(const prmi_st_doc *d, size_t *header_len) {
  size_t h = write_doc_header(d, NULL, 0);
  size_t n = doc_floats(d);
  *header_len = h;
  if (n == SIZE_MAX || n > (SIZE_MAX - 8 - h) / 4) return 0;
  return 8 + h + n * 4;
}

void prmi_st_serialise(const prmi_st_doc *d, unsigned char *dst, size_t header_len) {
  put_u64_le(dst, header_len);
  write_doc_header(d, (char *)dst + 8, header_len);
  unsigned char *p = dst + 8 + header_len;
  for (uint32_t t = 0; t < d->n_tensors; t++) {
    prmi_st_tensor tn;
    d->tensor(d->arg, t, &tn);
    const size_t k = (size_t)(tn.ndim == 2 ? tn.shape[0] * tn.shape[1] : tn.shape[0]);
    put_f32_le(p, tn.data, k);
    p += 4 * k;
  }
}

typedef struct st_writer {
  const prmi_st_doc *d;
  size_t header_len;
} st_writer;

/* prmi_write_fn: stream the document to fd (header, then each tensor in
 * little-endian chunks). Returns 0, or an errno value. */
static int write_doc(void *arg, int fd) {
  const st_writer *w = arg;
  unsigned char chunk[4 * ST_CHUNK_FLOATS];
  unsigned char *head = malloc(8 + w->header_len);
  int err;
  if (head == NULL) return ENOMEM;
  put_u64_le(head, w->header_len);
  write_doc_header(w->d, (char *)head + 8, w->header_len);
  err = prmi_fd_write_all(fd, head, 8 + w->header_len);
  free(head);
  for (uint32_t t = 0; err == 0 && t < w->d->n_tensors; t++) {
    prmi_st_tensor tn;
    w->d->tensor(w->d->arg, t, &tn);
    const size_t n = (size_t)(tn.ndim == 2 ? tn.shape[0] * tn.shape[1] : tn.shape[0]);
    for (size_t done = 0; err == 0 && done < n;) {
      size_t k = n - done < ST_CHUNK_FLOATS ? n - done : ST_CHUNK_FLOATS;
      put_f32_le(chunk, tn.data + done, k);
      err = prmi_fd_write_all(fd, chunk, 4 * k);
      done += k;
    }
  }
  return err;
}

int prmi_st_save(const char *path, const prmi_st_doc *d, char *handle_msg, const char *fn) {
  st_writer w;
  w.d = d;
  if (prmi_st_size(d, &w.header_len) == 0)
    return prmi_fail(handle_msg, PRM_ERR_NOMEM, "%s: the file would exceed SIZE_MAX bytes", fn);
  return prmi_file_write_atomic(path, write_doc, &w, handle_msg);
}

/* ---- a model as a document ---- */

static void model_meta(const void *arg, prmi_meta_out *out) {
  const prm_model *m = arg;
  prmi_meta_put(out, "model", m->arch->name);
  m->arch->meta_write(&m->opts, out);
  /* the trainable set, so that a resumed run trains what the saved one did
   * (files of a model that trains everything stay as they were) */
  if (m->trainable_offset != 0)
    prmi_meta_put_u64(out, "trainable_blocks", (uint64_t)m->trainable_blocks);
  /* reward normalisation statistics, exactly ("%.17g" round-trips a double) */
  if (m->has_reward_norm) {
    prmi_meta_put_real(out, "reward_mean", m->reward_mean);
    prmi_meta_put_real(out, "reward_std", m->reward_std);
  }
}

static void model_tensor(const void *arg, uint32_t i, prmi_st_tensor *t) {
  const prm_model *m = arg;
  const prmi_tensor *tn = &m->tensors[i];
  t->name = tn->name;
  t->ndim = tn->ndim;
  t->shape[0] = tn->shape[0];
  t->shape[1] = tn->shape[1];
  t->data = m->params + tn->offset;
}

static prmi_st_doc model_doc(const prm_model *m) {
  prmi_st_doc d = {model_meta, model_tensor, m, m->n_tensors};
  return d;
}

static int model_save_buffer(const prm_model *model, void *buf, size_t capacity, size_t *size_out) {
  size_t hlen, total;
  if (size_out == NULL)
    return prmi_fail(NULL, PRM_ERR_NULL, "prm_model_save_buffer: size_out is NULL");
  const prmi_st_doc d = model_doc(model);
  total = prmi_st_size(&d, &hlen);
  if (total == 0)
    return prmi_fail(NULL, PRM_ERR_NOMEM, "prm_model_save_buffer: checkpoint exceeds SIZE_MAX");
  *size_out = total;
  if (buf == NULL) return PRM_OK;
  if (capacity < total)
    return prmi_fail(NULL, PRM_ERR_SIZE,
                     "prm_model_save_buffer: capacity %zu is smaller than the %zu bytes needed",
                     capacity, total);
  prmi_st_serialise(&d, (unsigned char *)buf, hlen);
  return PRM_OK;
}

int prm_model_save_buffer(const prm_model *model, void *buf, size_t capacity, size_t *size_out) {
  if (model == NULL) return prmi_fail(NULL, PRM_ERR_NULL, "prm_model_save_buffer: model is NULL");
  return prmi_model_record(model, model_save_buffer(model, buf, capacity, size_out));
}

int prm_model_save(const prm_model *model, const char *path) {
  if (model == NULL) return prmi_fail(NULL, PRM_ERR_NULL, "prm_model_save: model is NULL");
  int rc = PRM_OK;
  if (path == NULL) {
    rc = prmi_fail(NULL, PRM_ERR_NULL, "prm_model_save: path is NULL");
  } else {
    const prmi_st_doc d = model_doc(model);
    rc = prmi_st_save(path, &d, NULL, "prm_model_save");
  }
  return prmi_model_record(model, rc);
}

/* ------------------------------------------------------------------------ */
/* Header model                                                              */
/* ------------------------------------------------------------------------ */

/* Most entries a header may list: a gpt2 model of PRMI_GPT2_MAX_LAYER blocks
 * has 2 + 12 * 128 + 3 tensors, plus up to two ignored HF buffers per block.
 * The entry array grows with the header and never beyond this. */
#define ST_MAX_ENTRIES 4096

typedef struct st_entry {
  char name[PRMI_NAME_SIZE];
  char dtype[16];
  int kind; /* ST_F32, ST_F16 or ST_BF16 once checked (check_entries) */
  uint32_t ndim;
  uint64_t shape[ST_MAX_DIMS];
  uint64_t begin, end; /* data_offsets */
  int used;            /* matched by a model tensor */
  int ignorable;       /* a tensor some architecture's files may carry and a load skips
                          (HF buffers such as gpt2's attn.bias), any dtype */
} st_entry;

/* One __metadata__ key. Values longer than ST_META_VALUE_MAX - 1 bytes are
 * kept as "too long" (lookups of that key fail); keys longer than a tensor
 * name are validated and skipped (no architecture reads such a key). */
typedef struct st_meta {
  char key[PRMI_NAME_SIZE];
  char value[ST_META_VALUE_MAX];
  int too_long;
} st_meta;

#define ST_MAX_META 8192 /* stored keys: as many as a JSON object may hold */

/* Configuration keys given by the caller (prm_pretrained_options.config),
 * consulted when the file lacks a key. Few: one architecture's keys. */
#define ST_MAX_KV 32
struct st_kv_list {
  uint32_t n;
  char key[ST_MAX_KV][PRMI_NAME_SIZE];
  char value[ST_MAX_KV][64];
};

static void kv_add(st_kv_list *l, const char *key, const char *value) {
  if (l->n == ST_MAX_KV) return; /* no architecture has that many keys */
  snprintf(l->key[l->n], sizeof l->key[l->n], "%s", key);
  snprintf(l->value[l->n], sizeof l->value[l->n], "%s", value);
  l->n++;
}

typedef struct prmi_ckpt {
  st_entry *entries; /* [cap], n_entries used; heap, grows while parsing */
  uint32_t n_entries, cap;
  st_entry **by_name; /* [n_entries] sorted by name, built after parsing */
  int nomem;          /* parsing stopped for lack of memory */
  int seen_metadata;
  st_meta *meta; /* [n_meta], heap */
  uint32_t n_meta, cap_meta;
  st_kv_list *given; /* the caller's configuration as keys, or NULL */
  const unsigned char *data; /* the data area (borrowed: the caller's buffer) */
  uint64_t data_len;
} st_header;

static void header_free(st_header *h) {
  if (h == NULL) return;
  free(h->meta);
  free(h->entries);
  free(h->by_name);
  free(h);
}

const char *prmi_layer_name(const char *n, const char *prefix, uint64_t *l) {
  const size_t k = strlen(prefix);
  const char *p = n + k;
  uint64_t v = 0;
  if (strncmp(n, prefix, k) != 0 || *p < '0' || *p > '9') return NULL;
  if (p[0] == '0' && p[1] != '.') return NULL;
  for (; *p >= '0' && *p <= '9'; p++) {
    if (v > 1000000) return NULL; /* far beyond any layer count; avoids overflow */
    v = v * 10 + (uint64_t)(*p - '0');
  }
  if (*p != '.') return NULL;
  *l = v;
  return p + 1;
}

static int cmp_entry_name(const void *a, const void *b) {
  return strcmp((*(st_entry *const *)a)->name, (*(st_entry *const *)b)->name);
}

static int cmp_entry_begin(const void *a, const void *b) {
  uint64_t x = (*(st_entry *const *)a)->begin, y = (*(st_entry *const *)b)->begin;
  return x < y ? -1 : x > y;
}

static st_entry *find_entry(st_header *h, const char *name) {
  st_entry key, *kp = &key, **hit;
  if (h->n_entries == 0) return NULL;
  snprintf(key.name, sizeof key.name, "%s", name);
  hit = bsearch(&kp, h->by_name, h->n_entries, sizeof *h->by_name, cmp_entry_name);
  return hit != NULL ? *hit : NULL;
}

/* A new entry slot, growing the array (NULL: too many, or out of memory). */
static st_entry *new_entry(prmi_json *j, st_header *h) {
  if (h->n_entries == h->cap) {
    uint32_t cap = h->cap == 0 ? 32 : 2 * h->cap;
    st_entry *e;
    if (h->n_entries >= ST_MAX_ENTRIES) {
      snprintf(j->msg, sizeof j->msg, "too many tensors (at most %d)", ST_MAX_ENTRIES);
      return NULL;
    }
    if (cap > ST_MAX_ENTRIES) cap = ST_MAX_ENTRIES;
    e = realloc(h->entries, cap * sizeof *e);
    if (e == NULL) {
      h->nomem = 1;
      snprintf(j->msg, sizeof j->msg, "out of memory");
      return NULL;
    }
    h->entries = e;
    h->cap = cap;
  }
  st_entry *t = &h->entries[h->n_entries++];
  memset(t, 0, sizeof *t);
  return t;
}

static int parse_metadata(prmi_json *j, st_header *h) {
  const unsigned char *s, *e;
  prmi_json_obj o;
  int rc;
  prmi_json_ws(j);
  if (j->p < j->end && *j->p == 'n') return prmi_json_literal(j, "null");
  rc = prmi_json_obj_open(j, &o, "__metadata__ key", NULL);
  while (rc == 0 && (rc = prmi_json_obj_next(j, &o, &s, &e)) == 1) {
    char key[PRMI_NAME_SIZE];
    const int keep = prmi_json_decode(s, e, key, sizeof key) >= 0;
    prmi_json_ws(j);
    if (j->p >= j->end || *j->p != '"') {
      rc = prmi_json_err(j, "__metadata__ values must be strings");
    } else if (!keep) {
      rc = prmi_json_string(j, &s, &e); /* a key nobody reads: validate, ignore */
    } else {
      if (h->n_meta == h->cap_meta) {
        uint32_t cap = h->cap_meta == 0 ? 16 : 2 * h->cap_meta;
        st_meta *m;
        if (h->n_meta >= ST_MAX_META) {
          rc = prmi_json_err(j, "too many __metadata__ keys");
          break;
        }
        m = realloc(h->meta, cap * sizeof *m);
        if (m == NULL) {
          h->nomem = 1;
          rc = prmi_json_err(j, "out of memory");
          break;
        }
        h->meta = m;
        h->cap_meta = cap;
      }
      st_meta *m = &h->meta[h->n_meta++];
      memcpy(m->key, key, sizeof key);
      rc = prmi_json_string(j, &s, &e); /* a repeated key fails at the closing brace */
      m->too_long = rc == 0 && prmi_json_decode(s, e, m->value, sizeof m->value) < 0;
      if (m->too_long) m->value[0] = '\0';
    }
  }
  prmi_json_obj_free(&o);
  return rc;
}

/* {"dtype":..., "shape":[...], "data_offsets":[b, e]} (other fields skipped). */
static int parse_tensor(prmi_json *j, st_entry *t) {
  const unsigned char *s, *e;
  int have_dtype = 0, have_shape = 0, have_offsets = 0;
  prmi_json_obj o;
  int rc = prmi_json_obj_open(j, &o, "field", t->name);
  while (rc == 0 && (rc = prmi_json_obj_next(j, &o, &s, &e)) == 1) {
    char key[32];
    if (prmi_json_decode(s, e, key, sizeof key) < 0) key[0] = '\0';
    if (strcmp(key, "dtype") == 0) {
      have_dtype = 1;
      rc = prmi_json_string(j, &s, &e);
      if (rc == 0 && prmi_json_decode(s, e, t->dtype, sizeof t->dtype) < 0)
        strcpy(t->dtype, "(too long)");
    } else if (strcmp(key, "shape") == 0) {
      have_shape = 1;
      rc = prmi_json_uint_array(j, t->shape, ST_MAX_DIMS, &t->ndim);
    } else if (strcmp(key, "data_offsets") == 0) {
      uint64_t off[2];
      uint32_t n;
      have_offsets = 1;
      rc = prmi_json_uint_array(j, off, 2, &n);
      if (rc == 0 && n != 2) rc = prmi_json_err(j, "data_offsets must have two elements");
      if (rc == 0) {
        t->begin = off[0];
        t->end = off[1];
      }
    } else {
      rc = prmi_json_skip(j);
    }
  }
  prmi_json_obj_free(&o);
  if (rc != 0) return -1;
  if (!have_dtype || !have_shape || !have_offsets) {
    snprintf(j->msg, sizeof j->msg, "tensor %s lacks '%s'", t->name,
             !have_dtype   ? "dtype"
             : !have_shape ? "shape"
                           : "data_offsets");
    return -1;
  }
  return 0;
}

/*
 * Parse the whole header: one object of metadata and tensor entries.
 * Aliases get the architecture's own name (a bare GPT2Model name gets the
 * "transformer." prefix, as torch_ref does); tensors that an architecture's
 * files may carry and a load skips (HF buffers) are marked ignorable.
 * Afterwards the entries are indexed by name and duplicates rejected.
 */
static int parse_header(prmi_json *j, st_header *h) {
  const unsigned char *s, *e;
  prmi_json_obj o;
  int rc;
  j->depth = 1;
  rc = prmi_json_obj_open(j, &o, "tensor", NULL);
  while (rc == 0 && (rc = prmi_json_obj_next(j, &o, &s, &e)) == 1) {
    char name[PRMI_NAME_SIZE];
    st_entry *t;
    if (prmi_json_decode(s, e, name, sizeof name) < 0) {
      rc = prmi_json_err(j, "unexpected tensor (name too long or contains NUL)");
      break;
    }
    if (strcmp(name, "__metadata__") == 0) {
      if (h->seen_metadata++)
        rc = prmi_json_err(j, "duplicate __metadata__");
      else
        rc = parse_metadata(j, h);
      continue;
    }
    if ((t = new_entry(j, h)) == NULL) {
      rc = -1;
      break;
    }
    /* another spelling of an architecture's name (a bare GPT2Model name) */
    strcpy(t->name, name);
    for (uint32_t a = 0; prmi_arch_at(a) != NULL; a++) {
      const prmi_arch *arch = prmi_arch_at(a);
      if (arch->tensor_alias != NULL && arch->tensor_alias(name, t->name, sizeof t->name)) break;
      strcpy(t->name, name);
    }
    rc = parse_tensor(j, t);
    for (uint32_t a = 0; prmi_arch_at(a) != NULL; a++) {
      const prmi_arch *arch = prmi_arch_at(a);
      if (arch->ignorable != NULL && arch->ignorable(t->name, t->ndim)) t->ignorable = 1;
    }
  }
  prmi_json_obj_free(&o);
  if (rc != 0) return -1;
  prmi_json_ws(j);
  if (j->p != j->end) return prmi_json_err(j, "trailing bytes after the JSON object");

  if (h->n_entries == 0) return 0;
  h->by_name = malloc(h->n_entries * sizeof *h->by_name);
  if (h->by_name == NULL) {
    h->nomem = 1;
    snprintf(j->msg, sizeof j->msg, "out of memory");
    return -1;
  }
  for (uint32_t i = 0; i < h->n_entries; i++)
    h->by_name[i] = &h->entries[i];
  qsort(h->by_name, h->n_entries, sizeof *h->by_name, cmp_entry_name);
  for (uint32_t i = 1; i < h->n_entries; i++)
    if (strcmp(h->by_name[i - 1]->name, h->by_name[i]->name) == 0) {
      snprintf(j->msg, sizeof j->msg, "duplicate tensor '%s' (with and without 'transformer.')",
               h->by_name[i]->name);
      return -1;
    }
  return 0;
}

/* ------------------------------------------------------------------------ */
/* Loading                                                                   */
/* ------------------------------------------------------------------------ */

static void format_shape(char *buf, size_t size, const uint64_t *shape, uint32_t ndim) {
  size_t n = (size_t)snprintf(buf, size, "[");
  for (uint32_t k = 0; k < ndim && n < size; k++)
    n += (size_t)snprintf(buf + n, size - n, "%s%llu", k ? ", " : "", (unsigned long long)shape[k]);
  if (n < size) snprintf(buf + n, size - n, "]");
}

/* Strict decimal for integer metadata: digits only, no leading zero, fits. */
static int parse_decimal(const char *s, uint64_t *v) {
  uint64_t x = 0;
  if (*s == '\0' || (s[0] == '0' && s[1] != '\0')) return -1;
  for (; *s; s++) {
    unsigned d;
    if (*s < '0' || *s > '9') return -1;
    d = (unsigned)(*s - '0');
    if (x > (UINT64_MAX - d) / 10) return -1;
    x = x * 10 + d;
  }
  *v = x;
  return 0;
}

/* ---- the checkpoint view of lib/arch.h ---- */

/* The file's key, else the caller's (prm_pretrained_options.config): the
 * hooks read one set of keys whatever their source. A file value that was too
 * long to keep is an error. */
static int meta_lookup(const prmi_ckpt *c, const char *key, const char **value) {
  *value = NULL;
  for (uint32_t i = 0; i < c->n_meta; i++)
    if (strcmp(c->meta[i].key, key) == 0) {
      if (c->meta[i].too_long)
        return prmi_fail(NULL, PRM_ERR_FORMAT, "__metadata__ %s: value longer than %d bytes", key,
                         ST_META_VALUE_MAX - 1);
      *value = c->meta[i].value;
      return 1;
    }
  if (c->given != NULL)
    for (uint32_t i = 0; i < c->given->n; i++)
      if (strcmp(c->given->key[i], key) == 0) {
        *value = c->given->value[i];
        return 1;
      }
  return 0;
}

const char *prmi_ckpt_meta(const prmi_ckpt *c, const char *key) {
  const char *v;
  return meta_lookup(c, key, &v) == 1 ? v : NULL;
}

uint32_t prmi_ckpt_count(const prmi_ckpt *c) { return c->n_entries; }

const char *prmi_ckpt_name(const prmi_ckpt *c, uint32_t i) { return c->entries[i].name; }

int prmi_ckpt_shape(const prmi_ckpt *c, const char *name, uint32_t *ndim, uint64_t shape[2]) {
  const st_entry *t = find_entry((st_header *)c, name);
  if (t == NULL || t->ignorable) return 0;
  *ndim = t->ndim;
  shape[0] = t->ndim > 0 ? t->shape[0] : 0;
  shape[1] = t->ndim > 1 ? t->shape[1] : 0;
  return 1;
}

int prmi_ckpt_meta_u64(const prmi_ckpt *c, const char *key, uint64_t *v) {
  const char *s;
  uint64_t x;
  int rc = meta_lookup(c, key, &s);
  if (rc <= 0) return rc;
  if (parse_decimal(s, &x) != 0 || x == 0)
    return prmi_fail(NULL, PRM_ERR_FORMAT, "__metadata__ %s='%.64s' is not a positive integer",
                     key, s);
  *v = x;
  return 1;
}

/* A plain decimal ("10000.0", "1e-06", "-2.5E+3"): strict syntax checked
 * here, so that strtod (locale-dependent decimal point) is never relied on
 * for anything but digits, '.', 'e'. */
int prmi_ckpt_meta_double(const prmi_ckpt *c, const char *key, double *v) {
  const char *s, *p;
  int rc = meta_lookup(c, key, &s);
  if (rc <= 0) return rc;
  int digits = 0;
  p = s;
  if (*p == '+' || *p == '-') p++;
  for (; *p >= '0' && *p <= '9'; p++) digits++;
  if (*p == '.')
    for (p++; *p >= '0' && *p <= '9'; p++) digits++;
  if (digits > 0 && (*p == 'e' || *p == 'E')) {
    p++;
    if (*p == '+' || *p == '-') p++;
    if (*p < '0' || *p > '9') digits = 0;
    while (*p >= '0' && *p <= '9') p++;
  }
  if (digits == 0 || *p != '\0')
    return prmi_fail(NULL, PRM_ERR_FORMAT, "__metadata__ %s='%.64s' is not a number", key, s);
  /* the C locale's strtod on the validated text; '.' is the radix point
   * unless the host changed LC_NUMERIC, which we detect and refuse */
  char *end;
  double x = strtod(s, &end);
  if (*end != '\0' || !isfinite(x))
    return prmi_fail(NULL, PRM_ERR_FORMAT,
                     "__metadata__ %s='%.64s' is not a finite number (in this locale)", key, s);
  *v = x;
  return 1;
}

int prmi_ckpt_meta_agrees(const prmi_ckpt *c, const char *key, uint64_t actual,
                          const char *source) {
  uint64_t v = 0;
  int rc = prmi_ckpt_meta_u64(c, key, &v);
  if (rc < 0) return rc;
  if (rc == 1 && v != actual)
    return prmi_fail(NULL, PRM_ERR_FORMAT, "__metadata__ %s=%llu disagrees with %s (%llu)", key,
                     (unsigned long long)v, source, (unsigned long long)actual);
  return PRM_OK;
}

/*
 * The architecture of a file: its "model" key, else the first architecture,
 * from the most specific (the last registered) down, whose detect hook
 * recognises the tensor names; linear (any file with score.weight) last.
 * Then the configuration from the architecture's config hook.
 */
static int config_from_header(st_header *h, prm_model_options *o, const prmi_arch **arch) {
  const char *kind = NULL;
  const prmi_arch *a = NULL;
  int rc = meta_lookup(h, "model", &kind);
  if (rc < 0) return rc;
  if (kind != NULL) {
    a = prmi_arch_by_name(kind);
    if (a == NULL)
      return prmi_fail(NULL, PRM_ERR_FORMAT, "unknown model type '%.64s' in __metadata__", kind);
  } else {
    uint32_t n = 0;
    while (prmi_arch_at(n) != NULL) n++;
    for (uint32_t i = n; a == NULL && i-- > 0;)
      if (prmi_arch_at(i)->detect(h)) a = prmi_arch_at(i);
    if (a == NULL) a = prmi_arch_find(PRM_ARCH_LINEAR); /* its config names what is missing */
  }
  rc = prm_model_options_init(o, PRM_MODEL_OPTIONS_VERSION);
  if (rc != PRM_OK) return rc;
  o->arch = a->id;
  *arch = a;
  return a->config(h, o);
}

enum { ST_F32 = 1, ST_F16, ST_BF16 };

static void get_elems_le(float *x, const unsigned char *s, size_t n, int dtype) {
  if (dtype == ST_F32) {
    get_f32_le(x, s, n);
    return;
  }
  for (size_t i = 0; i < n; i++) {
    const uint16_t v = (uint16_t)(s[2 * i] | (unsigned)s[2 * i + 1] << 8);
    if (dtype == ST_F16) {
      x[i] = half_to_float(v);
    } else { /* BF16: the top half of a binary32 */
      const uint32_t u = (uint32_t)v << 16;
      memcpy(&x[i], &u, 4);
    }
  }
}

/* Entry-level checks that need no configuration: dtype, sizes, bounds,
 * overlaps. Afterwards every entry's bytes lie inside the data area.
 * Ignorable HF buffers may have any dtype (BOOL masks) but must still lie
 * inside the data area without overlapping anything. */
static int check_entries(st_header *h, uint64_t data_len) {
  st_entry **order;
  int rc = PRM_OK;
  for (uint32_t i = 0; i < h->n_entries; i++) {
    st_entry *t = &h->entries[i];
    uint64_t bytes = 4;
    if (t->ignorable) {
      if (t->begin > t->end || t->end > data_len)
        return prmi_fail(NULL, PRM_ERR_FORMAT,
                         "tensor %s: data_offsets [%llu, %llu] outside the data area of %llu bytes",
                         t->name, (unsigned long long)t->begin, (unsigned long long)t->end,
                         (unsigned long long)data_len);
      continue;
    }
    /* half-precision files (many published checkpoints) widen to F32 */
    if (strcmp(t->dtype, "F32") == 0) {
      t->kind = ST_F32;
    } else if (strcmp(t->dtype, "F16") == 0) {
      t->kind = ST_F16;
      bytes = 2;
    } else if (strcmp(t->dtype, "BF16") == 0) {
      t->kind = ST_BF16;
      bytes = 2;
    } else {
      return prmi_fail(NULL, PRM_ERR_FORMAT, "tensor %s has dtype %s, expected F32, F16 or BF16",
                       t->name, t->dtype);
    }
    for (uint32_t k = 0; k < t->ndim; k++) {
      if (t->shape[k] != 0 && bytes > UINT64_MAX / t->shape[k])
        return prmi_fail(NULL, PRM_ERR_FORMAT, "tensor %s: shape overflows", t->name);
      bytes *= t->shape[k];
    }
    if (t->begin > t->end || t->end > data_len)
      return prmi_fail(NULL, PRM_ERR_FORMAT,
                       "tensor %s: data_offsets [%llu, %llu] outside the data area of %llu bytes",
                       t->name, (unsigned long long)t->begin, (unsigned long long)t->end,
                       (unsigned long long)data_len);
    if (t->end - t->begin != bytes)
      return prmi_fail(NULL, PRM_ERR_FORMAT,
                       "tensor %s: data_offsets span %llu bytes, shape needs %llu", t->name,
                       (unsigned long long)(t->end - t->begin), (unsigned long long)bytes);
  }
  if (h->n_entries < 2) return PRM_OK;
  /* sort by begin, then compare neighbours */
  order = malloc(h->n_entries * sizeof *order);
  if (order == NULL) return prmi_fail(NULL, PRM_ERR_NOMEM, "out of memory reading a checkpoint");
  for (uint32_t i = 0; i < h->n_entries; i++)
    order[i] = &h->entries[i];
  qsort(order, h->n_entries, sizeof *order, cmp_entry_begin);
  for (uint32_t i = 1; i < h->n_entries; i++) {
    const st_entry *a = order[i - 1], *b = order[i];
    if (a->end > b->begin) {
      rc = prmi_fail(NULL, PRM_ERR_FORMAT, "tensors %s and %s overlap in the data area", a->name,
                     b->name);
      break;
    }
  }
  free(order);
  return rc;
}

/* prm_model_load_pretrained's options and report; NULL for prm_model_load. */
typedef struct st_pretrained {
  const prm_pretrained_options *opts;
  prm_load_report *report;
  st_kv_list given; /* opts->config as keys (when given) */
} st_pretrained;

/* The fate of each tensor, for the report. */
enum { FATE_LOADED = 1, FATE_INITIALISED, FATE_IGNORED };

/* Append "<what> <name>\n" to the report's text (counting what it needs). */
static void report_line(prm_load_report *r, const char *what, const char *name) {
  const size_t n = strlen(what) + 1 + strlen(name) + 1;
  if (r->text != NULL && r->text_size > 0 && r->text_needed - 1 + n < r->text_size)
    snprintf(r->text + r->text_needed - 1, r->text_size - (r->text_needed - 1), "%s %s\n", what,
             name);
  r->text_needed += n;
}

/*
 * Every tensor of the model's layout present with its exact shape; nothing
 * else but the ignorable tensors of its architecture. m has its layout but
 * no parameters yet: a file that does not hold every parameter is refused
 * before the arena is allocated, so a small file cannot make us allocate a
 * large model. In pretrained mode (pt != NULL) score.weight may be missing
 * (or, with fresh_head, is not read) and an LM head (lm_head.weight) is
 * ignored; fate[i] receives what happens to model tensor i.
 */
static int check_against_layout(st_header *h, const prm_model *m, const st_pretrained *pt,
                                uint8_t *fate) {
  for (uint32_t i = 0; i < m->n_tensors; i++) {
    const prmi_tensor *x = &m->tensors[i];
    st_entry *t = find_entry(h, x->name);
    const int head = strcmp(x->name, "score.weight") == 0;
    char got[96], want[64];
    fate[i] = FATE_LOADED;
    if (pt != NULL && head && (t == NULL || t->ignorable || pt->opts->fresh_head)) {
      fate[i] = FATE_INITIALISED;
      if (t != NULL) t->used = 1; /* a head the caller replaces is not "unexpected" */
      continue;
    }
    if (t == NULL || t->ignorable) {
      if (head && m->arch->tokens)
        return prmi_fail(NULL, PRM_ERR_FORMAT,
                         "missing tensor score.weight (a language-model checkpoint has no reward "
                         "head: load it with prm_model_load_pretrained)");
      return prmi_fail(NULL, PRM_ERR_FORMAT, "missing tensor %s", x->name);
    }
    if (t->ndim != x->ndim || t->shape[0] != x->shape[0] ||
        (x->ndim == 2 && t->shape[1] != x->shape[1])) {
      format_shape(got, sizeof got, t->shape, t->ndim);
      format_shape(want, sizeof want, x->shape, x->ndim);
      return prmi_fail(NULL, PRM_ERR_FORMAT,
                       "tensor %s has shape %s, expected %s for the %s configuration", t->name,
                       got, want, m->arch->name);
    }
    t->used = 1;
  }
  for (uint32_t i = 0; i < h->n_entries; i++) {
    const st_entry *t = &h->entries[i];
    if (t->used) continue;
    if (t->ignorable && m->arch->ignorable != NULL && m->arch->ignorable(t->name, t->ndim)) continue;
    if (pt != NULL && m->arch->tokens && strcmp(t->name, "lm_head.weight") == 0) continue;
    if (pt != NULL && pt->opts->ignore_unknown) continue; /* reported as ignored */
    return prmi_fail(NULL, PRM_ERR_FORMAT, "unexpected tensor %s for %s model", t->name,
                     m->arch->article);
  }
  return PRM_OK;
}

/*
 * With a caller's configuration, the file must not contradict it: its
 * architecture must be the configured one, and every configuration key of
 * the resolved model must read as the caller's does (both are written by the
 * same meta_write, so equal configurations give equal strings).
 */
static int check_given_config(const st_pretrained *pt, const prm_model *m) {
  const prm_model_options *c = pt->opts->config;
  if (c->arch != m->arch->id) {
    const prmi_arch *want = prmi_arch_find(c->arch);
    return prmi_fail(NULL, PRM_ERR_FORMAT, "the file is %s checkpoint, the configuration says %s",
                     m->arch->article, want != NULL ? want->article : "an unknown architecture");
  }
  st_kv_list mine;
  prmi_meta_out out = {NULL, &mine, 0};
  mine.n = 0;
  m->arch->meta_write(&m->opts, &out);
  for (uint32_t i = 0; i < pt->given.n; i++)
    for (uint32_t k = 0; k < mine.n; k++)
      if (strcmp(pt->given.key[i], mine.key[k]) == 0 &&
          strcmp(pt->given.value[i], mine.value[k]) != 0)
        return prmi_fail(NULL, PRM_ERR_FORMAT,
                         "the file says %s = %s, the configuration says %s = %s", mine.key[k],
                         mine.value[k], pt->given.key[i], pt->given.value[i]);
  return PRM_OK;
}

int prmi_st_parse(prmi_ckpt **out, const unsigned char *b, size_t size) {
  uint64_t hlen;
  st_header *h;
  prmi_json j;
  int rc;
  *out = NULL;
  /* A safetensors file starts with the length of its JSON header, which
   * starts with '{' (after optional JSON whitespace). A file that breaks
   * either rule is another kind of file (text, an archive, random bytes)
   * and says so; one that keeps them but ends early is truncated. */
  if (size < 8)
    return prmi_fail(NULL, PRM_ERR_FORMAT,
                     "not a safetensors file: it is %zu bytes, shorter than the header length "
                     "(8 bytes)",
                     size);
  hlen = get_u64_le(b);
  if (hlen > ST_HEADER_MAX)
    return prmi_fail(NULL, PRM_ERR_FORMAT,
                     "not a safetensors file: header length %llu (its first 8 bytes) exceeds the "
                     "limit of %llu bytes",
                     (unsigned long long)hlen, (unsigned long long)ST_HEADER_MAX);
  /* the header bytes the file has, which may be fewer than it claims */
  const uint64_t have = hlen < size - 8 ? hlen : (uint64_t)(size - 8);
  uint64_t first = 0; /* the first byte of the header that is not JSON whitespace */
  while (first < have && (b[8 + first] == ' ' || b[8 + first] == '\t' || b[8 + first] == '\n' ||
                          b[8 + first] == '\r'))
    first++;
  if (first < have && b[8 + first] != '{')
    return prmi_fail(NULL, PRM_ERR_FORMAT,
                     "not a safetensors file: its header does not start with '{' (byte %llu is "
                     "0x%02x)",
                     (unsigned long long)(8 + first), b[8 + first]);
  if (hlen > size - 8)
    return prmi_fail(NULL, PRM_ERR_FORMAT,
                     "header length %llu exceeds the %zu bytes that follow it (a truncated file, "
                     "or not a safetensors file)",
                     (unsigned long long)hlen, size - 8);
  if (hlen < 2)
    return prmi_fail(NULL, PRM_ERR_FORMAT,
                     "not a safetensors file: a header of %llu bytes cannot hold its JSON object",
                     (unsigned long long)hlen);
  h = calloc(1, sizeof *h);
  if (h == NULL) return prmi_fail(NULL, PRM_ERR_NOMEM, "out of memory reading a checkpoint");
  h->data = b + 8 + hlen;
  h->data_len = (uint64_t)(size - 8 - (size_t)hlen);
  j.base = j.p = b + 8;
  j.end = b + 8 + hlen;
  j.depth = 0;
  j.nomem = 0;
  j.msg[0] = '\0';
  if (parse_header(&j, h) != 0) {
    rc = h->nomem || j.nomem
             ? prmi_fail(NULL, PRM_ERR_NOMEM, "out of memory reading a checkpoint header")
             : prmi_fail(NULL, PRM_ERR_FORMAT, "bad safetensors header: %s", j.msg);
    header_free(h);
    return rc;
  }
  rc = check_entries(h, h->data_len);
  if (rc != PRM_OK) {
    header_free(h);
    return rc;
  }
  *out = h;
  return PRM_OK;
}

void prmi_st_free(prmi_ckpt *c) { header_free(c); }

int prmi_st_read(prmi_ckpt *c, const char *name, uint32_t ndim, const uint64_t shape[2],
                 float *dst) {
  st_entry *t = find_entry(c, name);
  char got[96], want[64];
  if (t == NULL || t->ignorable) return prmi_fail(NULL, PRM_ERR_FORMAT, "missing tensor %s", name);
  if (t->ndim != ndim || t->shape[0] != shape[0] || (ndim == 2 && t->shape[1] != shape[1])) {
    format_shape(got, sizeof got, t->shape, t->ndim);
    format_shape(want, sizeof want, shape, ndim);
    return prmi_fail(NULL, PRM_ERR_FORMAT, "tensor %s has shape %s, expected %s", name, got, want);
  }
  const uint64_t n = ndim == 2 ? shape[0] * shape[1] : shape[0];
  get_elems_le(dst, c->data + t->begin, (size_t)n, t->kind);
  if (!prmi_all_finite(dst, n))
    return prmi_fail(NULL, PRM_ERR_FORMAT, "tensor %s contains NaN or Inf", name);
  t->used = 1;
  return PRM_OK;
}

const char *prmi_st_unused(const prmi_ckpt *c) {
  for (uint32_t i = 0; i < c->n_entries; i++)
    if (!c->by_name[i]->used && !c->by_name[i]->ignorable) return c->by_name[i]->name;
  return NULL;
}

/* ---- the trainable set (prm_model_load) ---- */

/* "trainable_blocks": prm_model_set_trainable's n_blocks (0: the head), as
 * model_meta writes it when not everything trains. Absent: everything
 * trains. A value the model cannot take is PRM_ERR_FORMAT. */
static int apply_trainable(const st_header *h, prm_model *m) {
  const char *s;
  uint64_t k;
  int rc = meta_lookup(h, "trainable_blocks", &s);
  if (rc <= 0) return rc;
  if (parse_decimal(s, &k) != 0 || k > INT32_MAX)
    return prmi_fail(NULL, PRM_ERR_FORMAT,
                     "__metadata__ trainable_blocks='%.64s' is not an integer >= 0", s);
  rc = prm_model_set_trainable(m, (int32_t)k);
  if (rc != PRM_OK) {
    char why[PRMI_ERRMSG_SIZE]; /* the thread's message is the destination too */
    snprintf(why, sizeof why, "%s", prm_last_errmsg());
    return prmi_fail(NULL, PRM_ERR_FORMAT, "__metadata__ trainable_blocks rejected: %s", why);
  }
  return PRM_OK;
}

/* "reward_mean" and "reward_std" (prm_model_set_reward_norm): both or
 * neither, finite, std > 0. */
static int apply_reward_norm(const st_header *h, prm_model *m) {
  double mean = 0.0, sd = 0.0;
  int a = prmi_ckpt_meta_double(h, "reward_mean", &mean);
  if (a < 0) return a;
  int b = prmi_ckpt_meta_double(h, "reward_std", &sd);
  if (b < 0) return b;
  if (a != b)
    return prmi_fail(NULL, PRM_ERR_FORMAT,
                     "__metadata__ has %s but not %s (reward normalisation needs both)",
                     a ? "reward_mean" : "reward_std", a ? "reward_std" : "reward_mean");
  if (a == 0) return PRM_OK;
  if (!(sd > 0.0))
    return prmi_fail(NULL, PRM_ERR_FORMAT, "__metadata__ reward_std = %g is not > 0", sd);
  m->has_reward_norm = 1;
  m->reward_mean = mean;
  m->reward_std = sd;
  return PRM_OK;
}

/* An optimizer state (lib/optim_io.c) is not a model: say so rather than
 * fail on its keys. Other "kind" values are unknown keys, ignored. */
static int check_model_kind(const st_header *h) {
  const char *kind;
  int rc = meta_lookup(h, "kind", &kind);
  if (rc <= 0) return rc;
  if (strcmp(kind, "optimizer") == 0)
    return prmi_fail(NULL, PRM_ERR_FORMAT,
                     "this is an optimizer state, not a model checkpoint (load it with "
                     "prm_optimizer_load)");
  return PRM_OK;
}

static int load_validated(prm_model **out, const unsigned char *b, size_t size,
                          st_pretrained *pt) {
  const prmi_arch *arch = NULL;
  prm_model *m = NULL;
  prm_model_options o;
  uint8_t *fate = NULL;
  st_header *h;
  int rc = prmi_st_parse(&h, b, size);
  if (rc != PRM_OK) return rc;
  if (pt != NULL && pt->opts->config != NULL) h->given = &pt->given;
  rc = check_model_kind(h);
  if (rc == PRM_OK) rc = config_from_header(h, &o, &arch);
  if (rc == PRM_OK) {
    rc = prmi_model_alloc(&m, &o, 0);
    if (rc != PRM_OK && rc != PRM_ERR_NOMEM) {
      char why[PRMI_ERRMSG_SIZE]; /* the thread's message is the destination too */
      snprintf(why, sizeof why, "%s", prm_last_errmsg());
      rc = prmi_fail(NULL, PRM_ERR_FORMAT, "checkpoint configuration rejected: %s", why);
    }
  }
  if (rc == PRM_OK && pt != NULL && pt->opts->config != NULL) rc = check_given_config(pt, m);
  if (rc == PRM_OK) {
    fate = calloc(m->n_tensors, 1);
    if (fate == NULL) rc = prmi_fail(NULL, PRM_ERR_NOMEM, "out of memory reading a checkpoint");
  }
  if (rc == PRM_OK) rc = check_against_layout(h, m, pt, fate);
  if (rc == PRM_OK) rc = prmi_model_alloc_params(m);
  /* tensors the file does not provide start as a new model's would */
  if (rc == PRM_OK && pt != NULL) m->arch->init(m, pt->opts->seed);
  for (uint32_t i = 0; rc == PRM_OK && i < m->n_tensors; i++) {
    const prmi_tensor *tn = &m->tensors[i];
    if (fate[i] != FATE_LOADED) continue;
    const st_entry *t = find_entry(h, tn->name); /* present and sized: checked above */
    get_elems_le(m->params + tn->offset, h->data + t->begin, (size_t)tn->numel, t->kind);
    if (!prmi_all_finite(m->params + tn->offset, tn->numel))
      rc = prmi_fail(NULL, PRM_ERR_FORMAT, "tensor %s contains NaN or Inf", tn->name);
  }
  if (rc == PRM_OK && pt == NULL) rc = apply_trainable(h, m);
  if (rc == PRM_OK) rc = apply_reward_norm(h, m);
  if (rc == PRM_OK && pt != NULL && pt->report != NULL) {
    prm_load_report *r = pt->report;
    r->n_loaded = r->n_initialised = r->n_ignored = 0;
    r->text_needed = 1;
    if (r->text != NULL && r->text_size > 0) r->text[0] = '\0';
    for (uint32_t i = 0; i < m->n_tensors; i++) {
      const int loaded = fate[i] == FATE_LOADED;
      *(loaded ? &r->n_loaded : &r->n_initialised) += 1;
      report_line(r, loaded ? "loaded" : "initialised", m->tensors[i].name);
    }
    for (uint32_t i = 0; i < h->n_entries; i++) {
      const st_entry *t = h->by_name[i];
      if (t->used) continue;
      r->n_ignored++;
      report_line(r, "ignored", t->name);
    }
  }
  free(fate);
  header_free(h);
  if (rc != PRM_OK) {
    prm_model_free(m);
    return rc;
  }
  *out = m;
  return PRM_OK;
}

int prm_model_load_buffer(prm_model **out, const void *buf, size_t size) {
  if (out == NULL) return prmi_fail(NULL, PRM_ERR_NULL, "prm_model_load_buffer: out is NULL");
  *out = NULL;
  if (buf == NULL) return prmi_fail(NULL, PRM_ERR_NULL, "prm_model_load_buffer: buf is NULL");
  return load_validated(out, (const unsigned char *)buf, size, NULL);
}

int prm_model_load(prm_model **out, const char *path) {
  unsigned char *buf;
  size_t size;
  int rc;
  if (out == NULL) return prmi_fail(NULL, PRM_ERR_NULL, "prm_model_load: out is NULL");
  *out = NULL;
  if (path == NULL) return prmi_fail(NULL, PRM_ERR_NULL, "prm_model_load: path is NULL");
  rc = prmi_file_read_all(path, &buf, &size, NULL);
  if (rc != PRM_OK) return rc;
  rc = load_validated(out, buf, size, NULL);
  free(buf);
  return rc;
}

/* ---- pretrained language models ---------------------------------------------------------- */

int prm_pretrained_options_init(prm_pretrained_options *opts, uint32_t version) {
  const prm_pretrained_options d = PRM_PRETRAINED_OPTIONS_INIT;
  return prmi_init_struct(opts, &d, sizeof d, version, PRM_PRETRAINED_OPTIONS_VERSION,
                          "prm_pretrained_options_init");
}

/* Validate the options and the report; turn a given configuration into keys
 * (validated as prm_model_new would, so that a bad one is named as such). */
static int pretrained_setup(st_pretrained *pt, const prm_pretrained_options *opts,
                            prm_load_report *report, prm_pretrained_options *defaults,
                            const char *fn) {
  int rc;
  if (opts == NULL) {
    prm_pretrained_options_init(defaults, PRM_PRETRAINED_OPTIONS_VERSION);
    opts = defaults;
  }
  if ((rc = prmi_check_version(NULL, opts, PRM_PRETRAINED_OPTIONS_VERSION, fn)) != PRM_OK)
    return rc;
  if (report != NULL &&
      (rc = prmi_check_version(NULL, report, PRM_LOAD_REPORT_VERSION, "prm_load_report")) !=
          PRM_OK)
    return rc;
  pt->opts = opts;
  pt->report = report;
  pt->given.n = 0;
  if (opts->config != NULL) {
    prm_model *probe = NULL;
    rc = prmi_model_alloc(&probe, opts->config, 0);
    if (rc != PRM_OK) return rc;
    prmi_meta_out out = {NULL, &pt->given, 0};
    kv_add(&pt->given, "model", probe->arch->name);
    probe->arch->meta_write(&probe->opts, &out);
    prm_model_free(probe);
  }
  return PRM_OK;
}

int prm_model_load_pretrained_buffer(prm_model **out, const void *buf, size_t size,
                                     const prm_pretrained_options *opts, prm_load_report *report) {
  const char *fn = "prm_model_load_pretrained_buffer";
  prm_pretrained_options d;
  st_pretrained pt;
  if (out == NULL) return prmi_fail(NULL, PRM_ERR_NULL, "%s: out is NULL", fn);
  *out = NULL;
  if (buf == NULL) return prmi_fail(NULL, PRM_ERR_NULL, "%s: buf is NULL", fn);
  int rc = pretrained_setup(&pt, opts, report, &d, fn);
  if (rc != PRM_OK) return rc;
  return load_validated(out, (const unsigned char *)buf, size, &pt);
}

int prm_model_load_pretrained(prm_model **out, const char *path,
                              const prm_pretrained_options *opts, prm_load_report *report) {
  const char *fn = "prm_model_load_pretrained";
  prm_pretrained_options d;
  st_pretrained pt;
  unsigned char *buf;
  size_t size;
  if (out == NULL) return prmi_fail(NULL, PRM_ERR_NULL, "%s: out is NULL", fn);
  *out = NULL;
  if (path == NULL) return prmi_fail(NULL, PRM_ERR_NULL, "%s: path is NULL", fn);
  int rc = pretrained_setup(&pt, opts, report, &d, fn);
  if (rc != PRM_OK) return rc;
  rc = prmi_file_read_all(path, &buf, &size, NULL);
  if (rc != PRM_OK) return rc;
  rc = load_validated(out, buf, size, &pt);
  free(buf);
  return rc;
}
