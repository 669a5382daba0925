/*
 * model.c - the generic part of models: options (every struct version),
 * the tensor layout (filled by the architecture's `layout` hook, lib/arch.h),
 * the deterministic initialisation streams, queries, freezing, and aligned
 * allocation. Nothing here knows an architecture: each is one file
 * (linear.c, mlp.c, gpt2.c, ...) behind its descriptor.
 *
 * Tensors are packed back to back in the architecture's (Hugging Face
 * state_dict) order, so the arena holds exactly the parameters
 * (prm_model_num_params equals the sum of the tensors' element counts).
 */
#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

/* ---- aligned memory -------------------------------------------------------- */

void *prmi_calloc(size_t count, size_t size) {
  if (size != 0 && count > SIZE_MAX / size) return NULL;
  size_t bytes = count * size;
  bytes = (bytes + 63) & ~(size_t)63;
  if (bytes == 0) bytes = 64;
  void *p = aligned_alloc(64, bytes);
  if (p != NULL) memset(p, 0, bytes);
  return p;
}

void prmi_free(void *p) { free(p); }

/* ---- options ------------------------------------------------------------------- */

/* Bytes of prm_model_options that exist in struct version `version` (1: up
 * to n_head; 2: the llama fields appended). */
static size_t options_size(uint32_t version) {
  return version == 1 ? offsetof(prm_model_options, n_kv_head) : sizeof(prm_model_options);
}

int prm_model_options_init(prm_model_options *opts, uint32_t version) {
  const prm_model_options d = PRM_MODEL_OPTIONS_INIT;
  return prmi_init_struct(opts, &d, options_size(version), version, PRM_MODEL_OPTIONS_VERSION,
                          "prm_model_options_init");
}

const char *prmi_activation_name(int32_t act) {
  switch (act) {
  case PRM_ACT_RELU: return "relu";
  case PRM_ACT_GELU_TANH: return "gelu";
  case PRM_ACT_TANH: return "tanh";
  default: return NULL;
  }
}

int32_t prmi_activation_from_name(const char *name) {
  if (name == NULL) return 0;
  if (strcmp(name, "relu") == 0) return PRM_ACT_RELU;
  if (strcmp(name, "gelu") == 0) return PRM_ACT_GELU_TANH;
  if (strcmp(name, "tanh") == 0) return PRM_ACT_TANH;
  return 0;
}

/* ---- layout ---------------------------------------------------------------------- */

uint64_t prmi_model_add_tensor(prm_model *m, const char *name, uint32_t ndim, uint64_t d0,
                               uint64_t d1) {
  /* normalise counted the tensors: running past them is a bug in a hook */
  if (m->n_tensors >= m->cap_tensors) return m->n_params;
  prmi_tensor *t = &m->tensors[m->n_tensors++];
  snprintf(t->name, sizeof t->name, "%s", name);
  t->offset = m->n_params;
  t->ndim = ndim;
  t->shape[0] = d0;
  t->shape[1] = ndim == 2 ? d1 : 0;
  t->numel = ndim == 2 ? d0 * d1 : d0;
  m->n_params += t->numel;
  return t->offset;
}

int prmi_check_dim(uint64_t v, const char *what) {
  if (v < 1 || v > PRMI_MAX_DIM)
    return prmi_fail(NULL, PRM_ERR_INVALID, "model: %s = %llu not in [1, 2^30]", what,
                     (unsigned long long)v);
  return PRM_OK;
}

int prmi_model_alloc(prm_model **out, const prm_model_options *opts, int alloc_params) {
  if (out == NULL) return prmi_fail(NULL, PRM_ERR_NULL, "model: out is NULL");
  *out = NULL;
  int rc = prmi_check_version(NULL, opts, PRM_MODEL_OPTIONS_VERSION, "prm_model_options");
  if (rc != PRM_OK) return rc;
  /* Fields a caller's older struct version lacks keep their defaults. */
  prm_model_options o = PRM_MODEL_OPTIONS_INIT;
  memcpy(&o, opts, options_size(opts->version));
  o.version = PRM_MODEL_OPTIONS_VERSION;
  const prmi_arch *arch = prmi_arch_find(o.arch);
  if (arch == NULL) return prmi_fail(NULL, PRM_ERR_INVALID, "model: unknown arch %d", (int)o.arch);
  uint64_t n_params = 0;
  uint32_t n_tensors = 0;
  if ((rc = arch->normalise(&o, &n_params, &n_tensors)) != PRM_OK) return rc;
  if (n_params > PRMI_MAX_PARAMS)
    return prmi_fail(NULL, PRM_ERR_INVALID, "model: more than 2^34 parameters");

  prm_model *m = calloc(1, sizeof *m);
  if (m == NULL || prmi_errslot_init(&m->err) != PRM_OK) {
    free(m);
    return prmi_fail(NULL, PRM_ERR_NOMEM, "model: out of memory");
  }
  m->opts = o;
  m->arch = arch;
  m->tensors = calloc(n_tensors, sizeof *m->tensors);
  m->cap_tensors = n_tensors;
  if (m->tensors == NULL || arch->layout(m) != PRM_OK) {
    prm_model_free(m);
    return prmi_fail(NULL, PRM_ERR_NOMEM, "model: out of memory for the layout");
  }
  if (m->n_tensors != n_tensors || m->n_params != n_params) {
    prm_model_free(m);
    return prmi_fail(NULL, PRM_ERR_INVALID,
                     "model: internal: %s layout has %u tensors / %llu parameters, expected "
                     "%u / %llu",
                     arch->name, (unsigned)m->n_tensors, (unsigned long long)m->n_params,
                     (unsigned)n_tensors, (unsigned long long)n_params);
  }
  if (alloc_params && (rc = prmi_model_alloc_params(m)) != PRM_OK) {
    prm_model_free(m);
    return rc;
  }
  *out = m;
  return PRM_OK;
}

int prmi_model_alloc_params(prm_model *m) {
  m->params = prmi_calloc(m->n_params, sizeof(float));
  if (m->params == NULL)
    return prmi_fail(NULL, PRM_ERR_NOMEM, "model: cannot allocate %llu parameters (%.1f MiB)",
                     (unsigned long long)m->n_params,
                     (double)m->n_params * sizeof(float) / 1048576.0);
  return PRM_OK;
}

/* ---- initialisation ------------------------------------------------------------------ */

/* splitmix64: small, fast, and good enough to draw initial weights. Each
 * tensor gets its own stream derived from (seed, tensor index), so the
 * values of one tensor do not depend on the sizes of the others. */
static uint64_t splitmix64(uint64_t *s) {
  uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

uint64_t prmi_init_stream(uint64_t seed, uint32_t tensor_index) {
  return seed ^ (0xD1B54A32D192ED03ull * (uint64_t)(tensor_index + 1));
}

float prmi_init_uniform(uint64_t *s, double a) {
  double u = (double)(splitmix64(s) >> 11) * 0x1.0p-53; /* [0, 1) */
  return (float)((2.0 * u - 1.0) * a);
}

/* N(0, sd) by Box-Muller. */
float prmi_init_normal(uint64_t *s, double sd) {
  double u1 = ((double)(splitmix64(s) >> 11) + 1.0) * 0x1.0p-53; /* (0, 1] */
  double u2 = (double)(splitmix64(s) >> 11) * 0x1.0p-53;
  return (float)(sd * sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}

int prm_model_new(prm_model **out, const prm_model_options *opts) {
  int rc = prmi_model_alloc(out, opts, 1);
  if (rc != PRM_OK) return rc;
  (*out)->arch->init(*out, opts->seed);
  return PRM_OK;
}

void prm_model_free(prm_model *model) {
  if (model == NULL) return;
  if (model->arch != NULL && model->arch->layout_free != NULL) model->arch->layout_free(model->layout);
  prmi_free(model->params);
  free(model->tensors);
  prmi_errslot_destroy(&model->err);
  free(model);
}

/* ---- queries ------------------------------------------------------------------------- */

int prmi_model_record(const prm_model *m, int status) {
  return m != NULL ? prmi_errslot_record(&m->err, status) : status;
}

int prm_model_get_options(const prm_model *model, prm_model_options *opts) {
  if (model == NULL) return prmi_fail(NULL, PRM_ERR_NULL, "prm_model_get_options: model is NULL");
  int rc = prmi_check_version(NULL, opts, PRM_MODEL_OPTIONS_VERSION,
                              "prm_model_get_options: prm_model_options");
  if (rc != PRM_OK) return prmi_model_record(model, rc);
  uint32_t v = opts->version;
  memcpy(opts, &model->opts, options_size(v)); /* the caller's version's fields only */
  opts->version = v;
  return PRM_OK;
}

int32_t prm_model_arch(const prm_model *model) { return model ? model->arch->id : 0; }

uint64_t prm_model_input_size(const prm_model *model) {
  return model ? model->opts.input_size : 0;
}

uint64_t prm_model_num_params(const prm_model *model) { return model ? model->n_params : 0; }

float *prm_model_params(prm_model *model, uint64_t *n_params) {
  if (n_params != NULL) *n_params = model ? model->n_params : 0;
  if (model == NULL) prmi_fail(NULL, PRM_ERR_NULL, "prm_model_params: model is NULL");
  return model ? model->params : NULL;
}

uint32_t prm_model_num_tensors(const prm_model *model) { return model ? model->n_tensors : 0; }

int prm_model_tensor_info(const prm_model *model, uint32_t index, const char **name,
                          uint64_t *offset, uint32_t *ndim, uint64_t shape[2]) {
  if (model == NULL) return prmi_fail(NULL, PRM_ERR_NULL, "prm_model_tensor_info: model is NULL");
  if (index >= model->n_tensors)
    return prmi_model_record(model, prmi_fail(NULL, PRM_ERR_INVALID,
                                              "prm_model_tensor_info: index %u >= %u tensors",
                                              (unsigned)index, (unsigned)model->n_tensors));
  const prmi_tensor *t = &model->tensors[index];
  if (name) *name = t->name;
  if (offset) *offset = t->offset;
  if (ndim) *ndim = t->ndim;
  if (shape) {
    shape[0] = t->shape[0];
    shape[1] = t->shape[1];
  }
  return PRM_OK;
}

uint64_t prm_model_max_len(const prm_model *model) {
  return model != NULL && model->arch->tokens ? model->opts.n_ctx : 0;
}

uint64_t prm_model_vocab_size(const prm_model *model) {
  return model != NULL && model->arch->tokens ? model->opts.vocab_size : 0;
}

/* ---- copying parameters in and out -------------------------------------------------------- */

int prmi_check_slice(uint64_t offset, uint64_t n, uint64_t total, const char *what,
                     const char *fn) {
  /* offset + n may wrap: compare n with the room after offset instead */
  if (offset > total || n > total - offset)
    return prmi_fail(NULL, PRM_ERR_SIZE, "%s: offset %llu and n %llu reach past the %llu %s", fn,
                     (unsigned long long)offset, (unsigned long long)n, (unsigned long long)total,
                     what);
  return PRM_OK;
}

int prmi_check_copy_in(const float *src, uint64_t n, const char *fn) {
  if (n > 0 && src == NULL) return prmi_fail(NULL, PRM_ERR_NULL, "%s: src is NULL", fn);
  if (n > 0 && !prmi_all_finite(src, n)) {
    uint64_t i = 0;
    while (isfinite(src[i]))
      i++;
    return prmi_fail(NULL, PRM_ERR_NONFINITE, "%s: src[%llu] is %s; nothing was written", fn,
                     (unsigned long long)i, isnan(src[i]) ? "NaN" : "Inf");
  }
  return PRM_OK;
}

int prmi_tensor_at(const prm_model *m, uint32_t index, const prmi_tensor **t, const char *fn) {
  if (index >= m->n_tensors)
    return prmi_fail(NULL, PRM_ERR_INVALID, "%s: index %u >= %u tensors", fn, (unsigned)index,
                     (unsigned)m->n_tensors);
  *t = &m->tensors[index];
  return PRM_OK;
}

int prmi_check_tensor_n(const prmi_tensor *t, uint64_t n, const char *fn) {
  if (n != t->numel)
    return prmi_fail(NULL, PRM_ERR_SIZE, "%s: tensor %s has %llu elements, n is %llu", fn, t->name,
                     (unsigned long long)t->numel, (unsigned long long)n);
  return PRM_OK;
}

int prm_model_find_tensor(const prm_model *model, const char *name, uint32_t *index) {
  const char *fn = "prm_model_find_tensor";
  if (model == NULL) return prmi_fail(NULL, PRM_ERR_NULL, "%s: model is NULL", fn);
  int rc;
  if (name == NULL) {
    rc = prmi_fail(NULL, PRM_ERR_NULL, "%s: name is NULL", fn);
  } else if (index == NULL) {
    rc = prmi_fail(NULL, PRM_ERR_NULL, "%s: index is NULL", fn);
  } else {
    for (uint32_t i = 0; i < model->n_tensors; i++)
      if (strcmp(model->tensors[i].name, name) == 0) {
        *index = i;
        return PRM_OK;
      }
    rc = prmi_fail(NULL, PRM_ERR_INVALID, "%s: %s model has no tensor named '%.80s'", fn,
                   model->arch->article, name);
  }
  return prmi_model_record(model, rc);
}

static int read_tensor(const prm_model *m, uint32_t index, float *dst, uint64_t n) {
  const char *fn = "prm_model_read_tensor";
  const prmi_tensor *t = NULL;
  int rc = prmi_tensor_at(m, index, &t, fn);
  if (rc == PRM_OK) rc = prmi_check_tensor_n(t, n, fn);
  if (rc == PRM_OK && dst == NULL) rc = prmi_fail(NULL, PRM_ERR_NULL, "%s: dst is NULL", fn);
  if (rc == PRM_OK) memcpy(dst, m->params + t->offset, n * sizeof(float));
  return rc;
}

int prm_model_read_tensor(const prm_model *model, uint32_t index, float *dst, uint64_t n) {
  if (model == NULL) return prmi_fail(NULL, PRM_ERR_NULL, "prm_model_read_tensor: model is NULL");
  return prmi_model_record(model, read_tensor(model, index, dst, n));
}

static int write_tensor(prm_model *m, uint32_t index, const float *src, uint64_t n) {
  const char *fn = "prm_model_write_tensor";
  const prmi_tensor *t = NULL;
  int rc = prmi_tensor_at(m, index, &t, fn);
  if (rc == PRM_OK) rc = prmi_check_tensor_n(t, n, fn);
  if (rc == PRM_OK) rc = prmi_check_copy_in(src, n, fn);
  if (rc == PRM_OK) memcpy(m->params + t->offset, src, n * sizeof(float));
  return rc;
}

int prm_model_write_tensor(prm_model *model, uint32_t index, const float *src, uint64_t n) {
  if (model == NULL) return prmi_fail(NULL, PRM_ERR_NULL, "prm_model_write_tensor: model is NULL");
  return prmi_model_record(model, write_tensor(model, index, src, n));
}

int prm_model_read_params(const prm_model *model, uint64_t offset, float *dst, uint64_t n) {
  const char *fn = "prm_model_read_params";
  if (model == NULL) return prmi_fail(NULL, PRM_ERR_NULL, "%s: model is NULL", fn);
  int rc = prmi_check_slice(offset, n, model->n_params, "parameters", fn);
  if (rc == PRM_OK && n > 0 && dst == NULL)
    rc = prmi_fail(NULL, PRM_ERR_NULL, "%s: dst is NULL", fn);
  if (rc == PRM_OK && n > 0) memcpy(dst, model->params + offset, n * sizeof(float));
  return prmi_model_record(model, rc);
}

int prm_model_write_params(prm_model *model, uint64_t offset, const float *src, uint64_t n) {
  const char *fn = "prm_model_write_params";
  if (model == NULL) return prmi_fail(NULL, PRM_ERR_NULL, "%s: model is NULL", fn);
  int rc = prmi_check_slice(offset, n, model->n_params, "parameters", fn);
  if (rc == PRM_OK) rc = prmi_check_copy_in(src, n, fn);
  if (rc == PRM_OK && n > 0) memcpy(model->params + offset, src, n * sizeof(float));
  return prmi_model_record(model, rc);
}

int prm_model_set_trainable(prm_model *model, int32_t n_blocks) {
  if (model == NULL) return prmi_fail(NULL, PRM_ERR_NULL, "prm_model_set_trainable: model is NULL");
  uint64_t off = 0;
  if (n_blocks == 0) {
    off = model->head_w;
  } else if (n_blocks > 0) {
    int rc = model->arch->trainable_from_block(model, (uint64_t)n_blocks, &off);
    if (rc != PRM_OK) return prmi_model_record(model, rc);
  }
  model->trainable_offset = off;
  model->trainable_blocks = n_blocks;
  return PRM_OK;
}

uint64_t prm_model_trainable_offset(const prm_model *model) {
  return model ? model->trainable_offset : 0;
}

const char *prm_model_errmsg(const prm_model *model) {
  return model ? prmi_errslot_read(&model->err, PRMI_ERRSLOT_MODEL) : "";
}

/* ---- reward normalisation ------------------------------------------------------------ */

int prm_reward_moments_init(prm_reward_moments *m, uint32_t version) {
  const prm_reward_moments d = PRM_REWARD_MOMENTS_INIT;
  return prmi_init_struct(m, &d, sizeof d, version, PRM_REWARD_MOMENTS_VERSION,
                          "prm_reward_moments_init");
}

/*
 * One batch's count, mean and M2 (two passes in double: the mean, then the
 * squared deviations from it), merged with the running ones by
 *   delta = mean_b - mean_a,  n = n_a + n_b,
 *   mean = mean_a + delta n_b / n,  M2 = M2_a + M2_b + delta^2 n_a n_b / n
 * (Chan, Golub, LeVeque 1979): no cancellation when rewards share an offset.
 */
int prm_reward_moments_add(prm_reward_moments *m, const float *rewards, uint64_t n) {
  int rc = prmi_check_version(NULL, m, PRM_REWARD_MOMENTS_VERSION, "prm_reward_moments_add: m");
  if (rc != PRM_OK) return rc;
  if (n == 0) return PRM_OK;
  if (rewards == NULL)
    return prmi_fail(NULL, PRM_ERR_NULL, "prm_reward_moments_add: rewards is NULL");
  if (!prmi_all_finite(rewards, n)) {
    uint64_t i = 0;
    while (isfinite(rewards[i])) i++;
    return prmi_fail(NULL, PRM_ERR_NONFINITE, "prm_reward_moments_add: rewards[%llu] is not finite",
                     (unsigned long long)i);
  }
  double sum = 0.0;
  for (uint64_t i = 0; i < n; i++) sum += (double)rewards[i];
  const double mean_b = sum / (double)n;
  double m2_b = 0.0;
  for (uint64_t i = 0; i < n; i++) {
    const double d = (double)rewards[i] - mean_b;
    m2_b += d * d;
  }
  const double na = (double)m->count, nb = (double)n, total = na + nb;
  const double delta = mean_b - m->mean;
  m->mean += delta * (nb / total);
  m->m2 += m2_b + delta * delta * (na * nb / total);
  m->count += n;
  return PRM_OK;
}

int prm_model_set_reward_norm(prm_model *model, const prm_reward_moments *moments) {
  if (model == NULL) return prmi_fail(NULL, PRM_ERR_NULL, "prm_model_set_reward_norm: model is NULL");
  if (moments == NULL) {
    model->has_reward_norm = 0;
    model->reward_mean = model->reward_std = 0.0;
    return PRM_OK;
  }
  int rc = prmi_check_version(NULL, moments, PRM_REWARD_MOMENTS_VERSION,
                              "prm_model_set_reward_norm: moments");
  if (rc != PRM_OK) return prmi_model_record(model, rc);
  if (moments->count < 2)
    return prmi_model_record(
        model, prmi_fail(NULL, PRM_ERR_INVALID,
                         "prm_model_set_reward_norm: %llu rewards; at least 2 are needed",
                         (unsigned long long)moments->count));
  const double sd = sqrt(moments->m2 / (double)moments->count);
  if (!(isfinite(moments->mean) && isfinite(sd) && sd > 0.0))
    return prmi_model_record(model, prmi_fail(NULL, PRM_ERR_INVALID,
                                              "prm_model_set_reward_norm: mean %g, standard "
                                              "deviation %g: need finite values and a deviation "
                                              "> 0",
                                              moments->mean, sd));
  model->has_reward_norm = 1;
  model->reward_mean = moments->mean;
  model->reward_std = sd;
  return PRM_OK;
}

int prm_model_reward_norm(const prm_model *model, double *mean, double *std) {
  if (model == NULL) return prmi_fail(NULL, PRM_ERR_NULL, "prm_model_reward_norm: model is NULL");
  if (!model->has_reward_norm)
    return prmi_model_record(model, prmi_fail(NULL, PRM_ERR_STATE,
                                              "prm_model_reward_norm: the model has no "
                                              "normalisation statistics "
                                              "(prm_model_set_reward_norm)"));
  if (mean != NULL) *mean = model->reward_mean;
  if (std != NULL) *std = model->reward_std;
  return PRM_OK;
}

int prm_model_normalise_rewards(const prm_model *model, float *rewards, uint64_t n) {
  if (model == NULL)
    return prmi_fail(NULL, PRM_ERR_NULL, "prm_model_normalise_rewards: model is NULL");
  int rc = PRM_OK;
  if (rewards == NULL && n > 0)
    rc = prmi_fail(NULL, PRM_ERR_NULL, "prm_model_normalise_rewards: rewards is NULL");
  else if (!model->has_reward_norm)
    rc = prmi_fail(NULL, PRM_ERR_STATE,
                   "prm_model_normalise_rewards: the model has no normalisation statistics "
                   "(prm_model_set_reward_norm)");
  else if (n > 0 && !prmi_all_finite(rewards, n))
    rc = prmi_fail(NULL, PRM_ERR_NONFINITE, "prm_model_normalise_rewards: a reward is NaN/Inf");
  if (rc != PRM_OK) return prmi_model_record(model, rc);
  const double mean = model->reward_mean, sd = model->reward_std;
  for (uint64_t i = 0; i < n; i++) rewards[i] = (float)(((double)rewards[i] - mean) / sd);
  return PRM_OK;
}

