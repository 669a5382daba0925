/*
 * optim_io.c - optimizer states as safetensors files (prm_optimizer_save,
 * prm_optimizer_save_buffer, prm_optimizer_load, prm_optimizer_load_buffer).
 *
 * A state is a safetensors document (lib/safetensors.c writes and parses
 * it) with
 *   __metadata__  "kind": "optimizer", "optimizer_version": "1" (or "2",
 *                 below), the model it fits ("model" arch name,
 *                 "num_params", "trainable_offset"), every
 *                 prm_optimizer_options field ("lr" is the base rate, as
 *                 last set by prm_optimizer_set_lr), the position:
 *                 "num_updates", "micro_step", "last_grad_norm", and
 *                 "lr_scale" when it is not 1 (version "2" then).
 *                 Integers in decimal, reals as "%.17g" (which reads back
 *                 as the same double), enums by name.
 *   tensors       the moments of the trainable tensors, F32, named as in
 *                 PyTorch's optimizer state: "exp_avg.<param>" then
 *                 "exp_avg_sq.<param>" (Adam, AdamW), "momentum_buffer.<param>"
 *                 (SGD with momentum), each in arena order, so the data
 *                 area holds the m arena and then the v arena.
 * docs/checkpoint-format.md has the table; docs/optimizers.md explains resuming.
 *
 * A load trusts nothing: the file is parsed by prmi_st_parse, every key is
 * checked, the options go through the same validation as prm_optimizer_new,
 * and the state must fit the model (PRM_ERR_MISMATCH otherwise) before the
 * moments are allocated and read.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

/* "optimizer_version": the oldest reader a state needs. Version 2 adds
 * "lr_scale" (prm_optimizer_set_lr_scale); a state whose scale is 1 is
 * written as version 1, byte for byte as before, so that 0.3 reads it, while
 * a 0.3 reader refuses a scaled state instead of dropping its scale. */
#define OPT_STATE_VERSION 2 /* the newest written and read */
/* A prefix (at most 16 bytes) and a model tensor name. Model names are at
 * most 48 bytes, so a state name stays below PRMI_NAME_SIZE, the longest
 * the reader accepts. */
#define OPT_NAME_SIZE (PRMI_NAME_SIZE + 16)

static const char *const k_algorithms[] = {"sgd", "adam", "adamw"};        /* PRM_OPT_* - 1 */
static const char *const k_schedules[] = {"constant", "linear", "cosine"}; /* PRM_SCHED_* - 1 */

/* Moment buffers per parameter: 0 (plain SGD), 1 (SGD momentum) or 2 (Adam(W)). */
static uint32_t n_kinds(const prm_optimizer *opt) { return (opt->m != NULL) + (opt->v != NULL); }

static const char *kind_prefix(const prm_optimizer *opt, uint32_t k) {
  if (opt->opts.algorithm == PRM_OPT_SGD) return "momentum_buffer.";
  return k == 0 ? "exp_avg." : "exp_avg_sq.";
}

static float *kind_buf(const prm_optimizer *opt, uint32_t k) { return k == 0 ? opt->m : opt->v; }

/* Index of the first trainable tensor: tensors are in arena order and the
 * trainable set is a suffix that starts at a tensor boundary. */
static uint32_t first_trainable(const prm_model *m, uint64_t toff) {
  uint32_t i = 0;
  while (i < m->n_tensors && m->tensors[i].offset < toff)
    i++;
  return i;
}

/* ---- writing ----------------------------------------------------------------- */

typedef struct opt_doc {
  const prm_optimizer *opt;
  uint32_t first, n_train, kinds;
  char (*names)[OPT_NAME_SIZE]; /* [kinds * n_train]: kind-major */
} opt_doc;

static void state_meta(const void *arg, prmi_meta_out *out) {
  const prm_optimizer *opt = ((const opt_doc *)arg)->opt;
  const prm_optimizer_options *o = &opt->opts;
  prmi_meta_put(out, "kind", "optimizer");
  prmi_meta_put_u64(out, "optimizer_version", opt->lr_scale != 1.0 ? 2 : 1);
  prmi_meta_put(out, "model", opt->model->arch->name);
  prmi_meta_put_u64(out, "num_params", opt->model->n_params);
  prmi_meta_put_u64(out, "trainable_offset", opt->toff);
  prmi_meta_put(out, "algorithm", k_algorithms[o->algorithm - 1]);
  prmi_meta_put_real(out, "lr", o->lr);
  prmi_meta_put_real(out, "beta1", o->beta1);
  prmi_meta_put_real(out, "beta2", o->beta2);
  prmi_meta_put_real(out, "eps", o->eps);
  prmi_meta_put_real(out, "weight_decay", o->weight_decay);
  prmi_meta_put_real(out, "momentum", o->momentum);
  prmi_meta_put(out, "nesterov", o->nesterov ? "1" : "0");
  prmi_meta_put(out, "no_decay_1d", o->no_decay_1d ? "1" : "0");
  prmi_meta_put_real(out, "max_grad_norm", o->max_grad_norm);
  prmi_meta_put(out, "schedule", k_schedules[o->schedule - 1]);
  prmi_meta_put_u64(out, "accumulation_steps", o->accumulation_steps);
  prmi_meta_put_u64(out, "warmup_steps", o->warmup_steps);
  prmi_meta_put_u64(out, "total_steps", o->total_steps);
  prmi_meta_put_real(out, "min_lr", o->min_lr);
  prmi_meta_put_u64(out, "num_updates", opt->num_updates);
  prmi_meta_put_u64(out, "micro_step", opt->micro);
  prmi_meta_put_real(out, "last_grad_norm", opt->last_grad_norm);
  if (opt->lr_scale != 1.0) prmi_meta_put_real(out, "lr_scale", opt->lr_scale);
}

static void state_tensor(const void *arg, uint32_t i, prmi_st_tensor *t) {
  const opt_doc *d = arg;
  const uint32_t k = i / d->n_train, j = d->first + i % d->n_train;
  const prmi_tensor *x = &d->opt->model->tensors[j];
  t->name = d->names[i];
  t->ndim = x->ndim;
  t->shape[0] = x->shape[0];
  t->shape[1] = x->shape[1];
  t->data = kind_buf(d->opt, k) + (x->offset - d->opt->toff);
}

/* The document of opt; d->names is malloc'd (free it). */
static int doc_build(opt_doc *d, prmi_st_doc *doc, const prm_optimizer *opt, const char *fn) {
  const prm_model *m = opt->model;
  d->opt = opt;
  d->first = first_trainable(m, opt->toff);
  d->n_train = m->n_tensors - d->first;
  d->kinds = n_kinds(opt);
  d->names = NULL;
  if (d->n_train == 0) d->kinds = 0; /* cannot happen: the head always trains */
  if (d->kinds > 0) {
    d->names = malloc((size_t)d->kinds * d->n_train * sizeof *d->names);
    if (d->names == NULL) return prmi_fail(NULL, PRM_ERR_NOMEM, "%s: out of memory", fn);
  }
  for (uint32_t i = 0; i < d->kinds * d->n_train; i++)
    snprintf(d->names[i], sizeof d->names[i], "%s%s", kind_prefix(opt, i / d->n_train),
             m->tensors[d->first + i % d->n_train].name);
  doc->meta = state_meta;
  doc->tensor = state_tensor;
  doc->arg = d;
  doc->n_tensors = d->kinds * d->n_train;
  return PRM_OK;
}

static int save_buffer(const prm_optimizer *opt, void *buf, size_t capacity, size_t *size_out) {
  const char *fn = "prm_optimizer_save_buffer";
  opt_doc d;
  prmi_st_doc doc;
  size_t hlen, total;
  if (size_out == NULL) return prmi_fail(NULL, PRM_ERR_NULL, "%s: size_out is NULL", fn);
  int rc = doc_build(&d, &doc, opt, fn);
  if (rc != PRM_OK) return rc;
  total = prmi_st_size(&doc, &hlen);
  if (total == 0) {
    rc = prmi_fail(NULL, PRM_ERR_NOMEM, "%s: the state exceeds SIZE_MAX bytes", fn);
  } else {
    *size_out = total;
    if (buf != NULL && capacity < total)
      rc = prmi_fail(NULL, PRM_ERR_SIZE, "%s: capacity %zu is smaller than the %zu bytes needed",
                     fn, capacity, total);
    else if (buf != NULL)
      prmi_st_serialise(&doc, (unsigned char *)buf, hlen);
  }
  free(d.names);
  return rc;
}

int prm_optimizer_save_buffer(const prm_optimizer *opt, void *buf, size_t capacity,
                              size_t *size_out) {
  if (opt == NULL) return prmi_fail(NULL, PRM_ERR_NULL, "prm_optimizer_save_buffer: opt is NULL");
  return prmi_opt_record(opt, save_buffer(opt, buf, capacity, size_out));
}

static int save(const prm_optimizer *opt, const char *path) {
  const char *fn = "prm_optimizer_save";
  opt_doc d;
  prmi_st_doc doc;
  if (path == NULL) return prmi_fail(NULL, PRM_ERR_NULL, "%s: path is NULL", fn);
  int rc = doc_build(&d, &doc, opt, fn);
  if (rc != PRM_OK) return rc;
  rc = prmi_st_save(path, &doc, NULL, fn);
  free(d.names);
  return rc;
}

int prm_optimizer_save(const prm_optimizer *opt, const char *path) {
  if (opt == NULL) return prmi_fail(NULL, PRM_ERR_NULL, "prm_optimizer_save: opt is NULL");
  return prmi_opt_record(opt, save(opt, path));
}

/* ---- reading ----------------------------------------------------------------- */

/* Required metadata; NULL with PRM_ERR_FORMAT in *rc when absent. */
static const char *need(const prmi_ckpt *c, const char *key, const char *fn, int *rc) {
  const char *v = prmi_ckpt_meta(c, key);
  if (v == NULL) *rc = prmi_fail(NULL, PRM_ERR_FORMAT, "%s: __metadata__ lacks '%s'", fn, key);
  return v;
}

/* Required integer in [0, max]: digits only, no leading zero. */
static int meta_uint(const prmi_ckpt *c, const char *key, uint64_t max, uint64_t *v,
                     const char *fn) {
  int rc = PRM_OK;
  const char *s = need(c, key, fn, &rc), *p;
  uint64_t x = 0;
  if (s == NULL) return rc;
  for (p = s; *p >= '0' && *p <= '9'; p++) {
    const uint64_t dgt = (uint64_t)(*p - '0');
    if (dgt > max || x > (max - dgt) / 10 || (p == s + 1 && s[0] == '0')) break;
    x = x * 10 + dgt;
  }
  if (p == s || *p != '\0')
    return prmi_fail(NULL, PRM_ERR_FORMAT,
                     "%s: __metadata__ %s='%.64s' is not an integer in [0, %llu]", fn, key, s,
                     (unsigned long long)max);
  *v = x;
  return PRM_OK;
}

static int meta_flag(const prmi_ckpt *c, const char *key, int32_t *v, const char *fn) {
  uint64_t x;
  int rc = meta_uint(c, key, 1, &x, fn);
  if (rc == PRM_OK) *v = (int32_t)x;
  return rc;
}

static int meta_real(const prmi_ckpt *c, const char *key, double *v, const char *fn) {
  int rc = prmi_ckpt_meta_double(c, key, v);
  if (rc == 0) return prmi_fail(NULL, PRM_ERR_FORMAT, "%s: __metadata__ lacks '%s'", fn, key);
  return rc < 0 ? rc : PRM_OK;
}

/* One of names[0..n-1]: its index + 1 goes to *v. */
static int meta_enum(const prmi_ckpt *c, const char *key, const char *const *names, int32_t n,
                     int32_t *v, const char *fn) {
  int rc = PRM_OK;
  const char *s = need(c, key, fn, &rc);
  if (s == NULL) return rc;
  for (int32_t i = 0; i < n; i++)
    if (strcmp(s, names[i]) == 0) {
      *v = i + 1;
      return PRM_OK;
    }
  return prmi_fail(NULL, PRM_ERR_FORMAT, "%s: __metadata__ %s='%.64s' is unknown", fn, key, s);
}

/* An optimizer state of a known version, not a model or anything else;
 * the version goes to *version. */
static int check_kind(const prmi_ckpt *c, const char *fn, uint64_t *version) {
  const char *kind = prmi_ckpt_meta(c, "kind");
  int rc;
  if (kind == NULL && prmi_ckpt_meta(c, "model") != NULL)
    return prmi_fail(NULL, PRM_ERR_FORMAT,
                     "%s: this is a model checkpoint, not an optimizer state (load it with "
                     "prm_model_load)",
                     fn);
  if (kind == NULL)
    return prmi_fail(NULL, PRM_ERR_FORMAT, "%s: not an optimizer state (__metadata__ lacks 'kind')",
                     fn);
  if (strcmp(kind, "optimizer") != 0)
    return prmi_fail(NULL, PRM_ERR_FORMAT, "%s: __metadata__ kind='%.64s', expected 'optimizer'",
                     fn, kind);
  if ((rc = meta_uint(c, "optimizer_version", UINT64_MAX, version, fn)) != PRM_OK) return rc;
  if (*version < 1 || *version > OPT_STATE_VERSION)
    return prmi_fail(NULL, PRM_ERR_UNSUPPORTED,
                     "%s: optimizer_version %llu; this library reads versions 1 to %d", fn,
                     (unsigned long long)*version, OPT_STATE_VERSION);
  return PRM_OK;
}

/* The state must have been saved for this model and its trainable set. */
static int check_model(const prmi_ckpt *c, const prm_model *m, const char *fn) {
  int rc = PRM_OK;
  uint64_t n, toff;
  const char *arch = need(c, "model", fn, &rc);
  if (arch == NULL) return rc;
  if (strcmp(arch, m->arch->name) != 0)
    return prmi_fail(NULL, PRM_ERR_MISMATCH,
                     "%s: the state was saved for %s model '%.64s', this model is %s", fn,
                     prmi_arch_by_name(arch) != NULL ? "a" : "an unknown", arch, m->arch->article);
  if ((rc = meta_uint(c, "num_params", PRMI_MAX_PARAMS, &n, fn)) != PRM_OK) return rc;
  if (n != m->n_params)
    return prmi_fail(NULL, PRM_ERR_MISMATCH,
                     "%s: the state was saved for a model of %llu parameters, this one has %llu",
                     fn, (unsigned long long)n, (unsigned long long)m->n_params);
  if ((rc = meta_uint(c, "trainable_offset", PRMI_MAX_PARAMS, &toff, fn)) != PRM_OK) return rc;
  if (toff != m->trainable_offset)
    return prmi_fail(NULL, PRM_ERR_MISMATCH,
                     "%s: the state trains parameters from %llu on, the model from %llu: call "
                     "prm_model_set_trainable as in the saved run first (prm_model_load "
                     "restores it from the model file)",
                     fn, (unsigned long long)toff, (unsigned long long)m->trainable_offset);
  return PRM_OK;
}

/* Every prm_optimizer_options field, then the same validation as
 * prm_optimizer_new: a state that prm_optimizer_new would refuse is
 * malformed. */
static int read_options(const prmi_ckpt *c, prm_optimizer_options *o, const char *fn) {
  uint64_t k;
  int rc;
  prm_optimizer_options_init(o, PRM_OPTIMIZER_OPTIONS_VERSION);
  if ((rc = meta_enum(c, "algorithm", k_algorithms, 3, &o->algorithm, fn)) != PRM_OK ||
      (rc = meta_real(c, "lr", &o->lr, fn)) != PRM_OK ||
      (rc = meta_real(c, "beta1", &o->beta1, fn)) != PRM_OK ||
      (rc = meta_real(c, "beta2", &o->beta2, fn)) != PRM_OK ||
      (rc = meta_real(c, "eps", &o->eps, fn)) != PRM_OK ||
      (rc = meta_real(c, "weight_decay", &o->weight_decay, fn)) != PRM_OK ||
      (rc = meta_real(c, "momentum", &o->momentum, fn)) != PRM_OK ||
      (rc = meta_flag(c, "nesterov", &o->nesterov, fn)) != PRM_OK ||
      (rc = meta_flag(c, "no_decay_1d", &o->no_decay_1d, fn)) != PRM_OK ||
      (rc = meta_real(c, "max_grad_norm", &o->max_grad_norm, fn)) != PRM_OK ||
      (rc = meta_enum(c, "schedule", k_schedules, 3, &o->schedule, fn)) != PRM_OK ||
      (rc = meta_uint(c, "accumulation_steps", UINT32_MAX, &k, fn)) != PRM_OK ||
      (rc = meta_uint(c, "warmup_steps", UINT64_MAX, &o->warmup_steps, fn)) != PRM_OK ||
      (rc = meta_uint(c, "total_steps", UINT64_MAX, &o->total_steps, fn)) != PRM_OK ||
      (rc = meta_real(c, "min_lr", &o->min_lr, fn)) != PRM_OK)
    return rc;
  o->accumulation_steps = (uint32_t)k;
  rc = prmi_optimizer_validate(o, fn);
  if (rc != PRM_OK) {
    char why[PRMI_ERRMSG_SIZE]; /* the thread's message is the destination too */
    snprintf(why, sizeof why, "%s", prm_last_errmsg());
    return prmi_fail(NULL, PRM_ERR_FORMAT, "options in the state rejected: %s", why);
  }
  return PRM_OK;
}

/* The moments of every trainable tensor: present (else malformed), of the
 * model tensor's shape (else another model's), F32 and finite. */
static int read_moments(prmi_ckpt *c, prm_optimizer *opt, const char *fn) {
  const prm_model *m = opt->model;
  const uint32_t first = first_trainable(m, opt->toff);
  for (uint32_t k = 0; k < n_kinds(opt); k++)
    for (uint32_t j = first; j < m->n_tensors; j++) {
      const prmi_tensor *x = &m->tensors[j];
      char name[OPT_NAME_SIZE];
      uint32_t nd;
      uint64_t sh[2];
      snprintf(name, sizeof name, "%s%s", kind_prefix(opt, k), x->name);
      if (!prmi_ckpt_shape(c, name, &nd, sh))
        return prmi_fail(NULL, PRM_ERR_FORMAT, "%s: missing tensor %s", fn, name);
      if (nd != x->ndim || sh[0] != x->shape[0] || (nd == 2 && sh[1] != x->shape[1]))
        return prmi_fail(NULL, PRM_ERR_MISMATCH,
                         "%s: tensor %s does not have the shape of the model's %s: the state "
                         "belongs to another model",
                         fn, name, x->name);
      int rc = prmi_st_read(c, name, x->ndim, x->shape, kind_buf(opt, k) + (x->offset - opt->toff));
      if (rc != PRM_OK) return rc;
    }
  const char *extra = prmi_st_unused(c);
  if (extra != NULL)
    return prmi_fail(NULL, PRM_ERR_FORMAT, "%s: unexpected tensor %s for this optimizer state", fn,
                     extra);
  return PRM_OK;
}

static int load_state(prm_optimizer **out, prm_model *model, const unsigned char *b, size_t size,
                      const char *fn) {
  prmi_ckpt *c = NULL;
  prm_optimizer *opt = NULL;
  prm_optimizer_options o = PRM_OPTIMIZER_OPTIONS_INIT;
  uint64_t num_updates = 0, micro = 0, version = 0;
  double grad_norm = 0.0, scale = 1.0;
  int rc = prmi_st_parse(&c, b, size);
  if (rc == PRM_OK) rc = check_kind(c, fn, &version);
  if (rc == PRM_OK) rc = check_model(c, model, fn);
  if (rc == PRM_OK) rc = read_options(c, &o, fn);
  if (rc == PRM_OK) rc = meta_uint(c, "num_updates", UINT64_MAX, &num_updates, fn);
  if (rc == PRM_OK) rc = meta_uint(c, "micro_step", o.accumulation_steps - 1, &micro, fn);
  if (rc == PRM_OK) rc = meta_real(c, "last_grad_norm", &grad_norm, fn);
  if (rc == PRM_OK && !(grad_norm >= 0.0))
    rc = prmi_fail(NULL, PRM_ERR_FORMAT, "%s: __metadata__ last_grad_norm is negative", fn);
  /* version 1 (0.3, and any state whose scale is 1) has no scale: 1 */
  if (rc == PRM_OK && version >= 2) rc = meta_real(c, "lr_scale", &scale, fn);
  if (rc == PRM_OK && prmi_optimizer_check_lr(&o, o.lr, scale, fn) != PRM_OK) {
    char why[PRMI_ERRMSG_SIZE]; /* the thread's message is the destination too */
    snprintf(why, sizeof why, "%s", prm_last_errmsg());
    rc = prmi_fail(NULL, PRM_ERR_FORMAT, "__metadata__ lr_scale rejected: %s", why);
  }
  if (rc == PRM_OK) rc = prmi_optimizer_alloc(&opt, model, &o, fn);
  if (rc == PRM_OK) {
    opt->num_updates = num_updates;
    opt->micro = (uint32_t)micro;
    opt->last_grad_norm = grad_norm;
    opt->lr_scale = scale;
    rc = read_moments(c, opt, fn);
  }
  prmi_st_free(c);
  if (rc != PRM_OK) {
    prm_optimizer_free(opt);
    return prmi_model_record(model, rc);
  }
  *out = opt;
  return PRM_OK;
}

int prm_optimizer_load_buffer(prm_optimizer **out, prm_model *model, const void *buf, size_t size) {
  const char *fn = "prm_optimizer_load_buffer";
  if (out == NULL)
    return prmi_model_record(model, prmi_fail(NULL, PRM_ERR_NULL, "%s: out is NULL", fn));
  *out = NULL;
  if (model == NULL) return prmi_fail(NULL, PRM_ERR_NULL, "%s: model is NULL", fn);
  if (buf == NULL)
    return prmi_model_record(model, prmi_fail(NULL, PRM_ERR_NULL, "%s: buf is NULL", fn));
  return load_state(out, model, (const unsigned char *)buf, size, fn);
}

int prm_optimizer_load(prm_optimizer **out, prm_model *model, const char *path) {
  const char *fn = "prm_optimizer_load";
  unsigned char *buf;
  size_t size;
  if (out == NULL)
    return prmi_model_record(model, prmi_fail(NULL, PRM_ERR_NULL, "%s: out is NULL", fn));
  *out = NULL;
  if (model == NULL) return prmi_fail(NULL, PRM_ERR_NULL, "%s: model is NULL", fn);
  if (path == NULL)
    return prmi_model_record(model, prmi_fail(NULL, PRM_ERR_NULL, "%s: path is NULL", fn));
  int rc = prmi_file_read_all(path, &buf, &size, NULL);
  if (rc != PRM_OK) return prmi_model_record(model, rc);
  rc = load_state(out, model, buf, size, fn);
  free(buf);
  return rc;
}
