/*
 * model.c - model options, parameter layout, deterministic initialisation,
 * queries and aligned allocation.
 *
 * Layout of the parameter arena (PyTorch nn.Linear order, [out, in] weights):
 *   linear: score.weight [1, d]
 *   mlp:    layers.0.weight [h0, d], layers.0.bias [h0], ...,
 *           layers.{L-1}.weight [h_{L-1}, h_{L-2}], layers.{L-1}.bias,
 *           score.weight [1, h_{L-1}]
 * Tensors are packed back to back, so the arena holds exactly the parameters
 * (prm_model_num_params equals the sum of the tensors' element counts).
 */
#include <math.h>
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

int prm_model_options_init(prm_model_options *opts, uint32_t version) {
  const prm_model_options d = PRM_MODEL_OPTIONS_INIT;
  return prmi_init_struct(opts, &d, sizeof d, version, PRM_MODEL_OPTIONS_VERSION,
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

/* Append a tensor to the layout; returns its offset. */
static uint64_t add_tensor(prm_model *m, const char *name, uint32_t ndim, uint64_t d0,
                           uint64_t d1) {
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

/* Largest size we accept for any dimension or the arena: keeps every size
 * product far from overflow and every BLAS int dimension valid. */
#define PRMI_MAX_PARAMS ((uint64_t)1 << 34)

int prmi_model_alloc(prm_model **out, const prm_model_options *opts) {
  if (out == NULL) return prmi_fail(NULL, PRM_ERR_NULL, "model: out is NULL");
  *out = NULL;
  int rc = prmi_check_version(NULL, opts, PRM_MODEL_OPTIONS_VERSION, "prm_model_options");
  if (rc != PRM_OK) return rc;

  prm_model_options o = *opts; /* version 1 is the only (and newest) version */
  o.version = PRM_MODEL_OPTIONS_VERSION;
  if (o.arch == PRM_ARCH_GPT2)
    return prmi_fail(NULL, PRM_ERR_UNSUPPORTED, "model: arch gpt2 is not implemented yet");
  if (o.arch != PRM_ARCH_LINEAR && o.arch != PRM_ARCH_MLP)
    return prmi_fail(NULL, PRM_ERR_INVALID, "model: unknown arch %d", (int)o.arch);
  if (o.input_size < 1 || o.input_size > PRMI_MAX_DIM)
    return prmi_fail(NULL, PRM_ERR_INVALID, "model: input_size %llu not in [1, 2^30]",
                     (unsigned long long)o.input_size);
  if (o.arch == PRM_ARCH_MLP) {
    if (prmi_activation_name(o.activation) == NULL)
      return prmi_fail(NULL, PRM_ERR_INVALID, "model: unknown activation %d", (int)o.activation);
    if (o.n_hidden < 1 || o.n_hidden > PRM_MAX_HIDDEN)
      return prmi_fail(NULL, PRM_ERR_INVALID, "model: n_hidden %u not in [1, %d]",
                       (unsigned)o.n_hidden, PRM_MAX_HIDDEN);
    for (uint32_t i = 0; i < o.n_hidden; i++)
      if (o.hidden[i] < 1 || o.hidden[i] > PRMI_MAX_DIM)
        return prmi_fail(NULL, PRM_ERR_INVALID, "model: hidden[%u] = %llu not in [1, 2^30]",
                         (unsigned)i, (unsigned long long)o.hidden[i]);
  } else {
    o.n_hidden = 0; /* fields of other architectures are ignored, and normalised */
  }
  for (uint32_t i = o.n_hidden; i < PRM_MAX_HIDDEN; i++) o.hidden[i] = 0;

  /* Size check before any allocation: sum of (in+1)*out over layers. */
  uint64_t total = 0, in = o.input_size;
  for (uint32_t i = 0; i < o.n_hidden; i++) {
    total += (in + 1) * o.hidden[i];
    if (total > PRMI_MAX_PARAMS) break;
    in = o.hidden[i];
  }
  total += in;
  if (total > PRMI_MAX_PARAMS)
    return prmi_fail(NULL, PRM_ERR_INVALID, "model: more than 2^34 parameters");

  prm_model *m = calloc(1, sizeof *m);
  if (m == NULL) return prmi_fail(NULL, PRM_ERR_NOMEM, "model: out of memory");
  m->opts = o;
  m->n_hidden = o.n_hidden;
  in = o.input_size;
  for (uint32_t i = 0; i < o.n_hidden; i++) {
    char name[PRMI_NAME_SIZE];
    prmi_dense *L = &m->hidden[i];
    L->in = in;
    L->out = o.hidden[i];
    snprintf(name, sizeof name, "layers.%u.weight", (unsigned)i);
    L->w_off = add_tensor(m, name, 2, L->out, L->in);
    snprintf(name, sizeof name, "layers.%u.bias", (unsigned)i);
    L->b_off = add_tensor(m, name, 1, L->out, 0);
    if (L->out > m->max_width) m->max_width = L->out;
    in = L->out;
  }
  m->head.in = in;
  m->head.out = 1;
  m->head.w_off = add_tensor(m, "score.weight", 2, 1, in);
  m->params = prmi_calloc(m->n_params, sizeof(float));
  if (m->params == NULL) {
    free(m);
    return prmi_fail(NULL, PRM_ERR_NOMEM, "model: cannot allocate %llu parameters",
                     (unsigned long long)total);
  }
  *out = m;
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

/* Uniform float in [-a, a). */
static float uniform_sym(uint64_t *s, double a) {
  double u = (double)(splitmix64(s) >> 11) * 0x1.0p-53; /* [0, 1) */
  return (float)((2.0 * u - 1.0) * a);
}

static void init_params(prm_model *m, uint64_t seed) {
  for (uint32_t t = 0; t < m->n_tensors; t++) {
    const prmi_tensor *T = &m->tensors[t];
    uint64_t s = seed ^ (0xD1B54A32D192ED03ull * (uint64_t)(t + 1));
    /* Weights: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (PyTorch's nn.Linear
     * bound); biases: U(-0.1, 0.1) so that tests see non-trivial biases. */
    double a = T->ndim == 2 ? 1.0 / sqrt((double)T->shape[1]) : 0.1;
    float *p = m->params + T->offset;
    for (uint64_t i = 0; i < T->numel; i++) p[i] = uniform_sym(&s, a);
  }
}

int prm_model_new(prm_model **out, const prm_model_options *opts) {
  int rc = prmi_model_alloc(out, opts);
  if (rc != PRM_OK) return rc;
  init_params(*out, opts->seed);
  return PRM_OK;
}

void prm_model_free(prm_model *model) {
  if (model == NULL) return;
  prmi_free(model->params);
  free(model);
}

/* ---- queries ------------------------------------------------------------------------- */

int prm_model_get_options(const prm_model *model, prm_model_options *opts) {
  if (model == NULL) return prmi_fail(NULL, PRM_ERR_NULL, "prm_model_get_options: model is NULL");
  int rc = prmi_check_version(NULL, opts, PRM_MODEL_OPTIONS_VERSION, "prm_model_options");
  if (rc != PRM_OK) return rc;
  uint32_t v = opts->version;
  *opts = model->opts; /* only version 1 exists, which is the whole struct */
  opts->version = v;
  return PRM_OK;
}

int32_t prm_model_arch(const prm_model *model) { return model ? model->opts.arch : 0; }

uint64_t prm_model_input_size(const prm_model *model) {
  return model ? model->opts.input_size : 0;
}

uint64_t prm_model_num_params(const prm_model *model) { return model ? model->n_params : 0; }

float *prm_model_params(prm_model *model, uint64_t *n_params) {
  if (n_params != NULL) *n_params = model ? model->n_params : 0;
  return model ? model->params : NULL;
}

uint32_t prm_model_num_tensors(const prm_model *model) { return model ? model->n_tensors : 0; }

int prm_model_tensor_info(const prm_model *model, uint32_t index, const char **name,
                          uint64_t *offset, uint32_t *ndim, uint64_t shape[2]) {
  if (model == NULL) return prmi_fail(NULL, PRM_ERR_NULL, "prm_model_tensor_info: model is NULL");
  if (index >= model->n_tensors)
    return prmi_fail(NULL, PRM_ERR_INVALID, "prm_model_tensor_info: index %u >= %u tensors",
                     (unsigned)index, (unsigned)model->n_tensors);
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

const char *prm_model_errmsg(const prm_model *model) { return model ? model->errmsg : ""; }
