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

/* Most parameters a model may have: keeps every size product far from
 * overflow. */
#define PRMI_MAX_PARAMS ((uint64_t)1 << 34)

static int check_dim(uint64_t v, const char *what) {
  if (v < 1 || v > PRMI_MAX_DIM)
    return prmi_fail(NULL, PRM_ERR_INVALID, "model: %s = %llu not in [1, 2^30]", what,
                     (unsigned long long)v);
  return PRM_OK;
}

/* Validate the fields of o's architecture, zero the others, and count the
 * parameters and tensors of the layout. */
static int normalise_options(prm_model_options *o, uint64_t *n_params, uint32_t *n_tensors) {
  int rc;
  if (o->arch == PRM_ARCH_LINEAR || o->arch == PRM_ARCH_MLP) {
    if ((rc = check_dim(o->input_size, "input_size")) != PRM_OK) return rc;
    if (o->arch == PRM_ARCH_MLP) {
      if (prmi_activation_name(o->activation) == NULL)
        return prmi_fail(NULL, PRM_ERR_INVALID, "model: unknown activation %d",
                         (int)o->activation);
      if (o->n_hidden < 1 || o->n_hidden > PRM_MAX_HIDDEN)
        return prmi_fail(NULL, PRM_ERR_INVALID, "model: n_hidden %u not in [1, %d]",
                         (unsigned)o->n_hidden, PRM_MAX_HIDDEN);
      for (uint32_t i = 0; i < o->n_hidden; i++) {
        char what[32];
        snprintf(what, sizeof what, "hidden[%u]", (unsigned)i);
        if ((rc = check_dim(o->hidden[i], what)) != PRM_OK) return rc;
      }
    } else {
      o->n_hidden = 0;
    }
    for (uint32_t i = o->n_hidden; i < PRM_MAX_HIDDEN; i++) o->hidden[i] = 0;
    o->vocab_size = o->n_ctx = o->n_embd = o->n_layer = o->n_head = 0;
    uint64_t total = 0, in = o->input_size;
    for (uint32_t i = 0; i < o->n_hidden && total <= PRMI_MAX_PARAMS; i++) {
      total += (in + 1) * o->hidden[i];
      in = o->hidden[i];
    }
    *n_params = total + in;
    *n_tensors = 2 * o->n_hidden + 1;
  } else if (o->arch == PRM_ARCH_GPT2) {
    if ((rc = check_dim(o->vocab_size, "vocab_size")) != PRM_OK ||
        (rc = check_dim(o->n_ctx, "n_ctx")) != PRM_OK ||
        (rc = check_dim(o->n_embd, "n_embd")) != PRM_OK ||
        (rc = check_dim(o->n_head, "n_head")) != PRM_OK)
      return rc;
    if (o->n_layer < 1 || o->n_layer > PRMI_GPT2_MAX_LAYER)
      return prmi_fail(NULL, PRM_ERR_INVALID, "model: n_layer = %llu not in [1, %d]",
                       (unsigned long long)o->n_layer, PRMI_GPT2_MAX_LAYER);
    if (o->n_embd % o->n_head != 0)
      return prmi_fail(NULL, PRM_ERR_INVALID, "model: n_head = %llu does not divide n_embd = %llu",
                       (unsigned long long)o->n_head, (unsigned long long)o->n_embd);
    if (o->n_ctx > PRMI_GPT2_MAX_CTX || o->n_embd > PRMI_GPT2_MAX_CTX * 16)
      return prmi_fail(NULL, PRM_ERR_INVALID, "model: n_ctx or n_embd too large");
    o->input_size = 0;
    o->activation = PRM_ACT_GELU_TANH; /* GPT-2's MLP: gelu, tanh form */
    o->n_hidden = 0;
    for (uint32_t i = 0; i < PRM_MAX_HIDDEN; i++) o->hidden[i] = 0;
    const uint64_t C = o->n_embd;
    uint64_t per_block = 12 * C * C + 13 * C; /* 2 LN, qkv, proj, fc, fc proj */
    if (o->vocab_size > PRMI_MAX_PARAMS / C || o->n_layer > PRMI_MAX_PARAMS / per_block)
      return prmi_fail(NULL, PRM_ERR_INVALID, "model: more than 2^34 parameters");
    *n_params = (o->vocab_size + o->n_ctx) * C + o->n_layer * per_block + 3 * C;
    *n_tensors = 2 + 12 * (uint32_t)o->n_layer + 3;
  } else {
    return prmi_fail(NULL, PRM_ERR_INVALID, "model: unknown arch %d", (int)o->arch);
  }
  if (*n_params > PRMI_MAX_PARAMS)
    return prmi_fail(NULL, PRM_ERR_INVALID, "model: more than 2^34 parameters");
  return PRM_OK;
}

static void layout_mlp(prm_model *m) {
  uint64_t in = m->opts.input_size;
  m->n_hidden = m->opts.n_hidden;
  for (uint32_t i = 0; i < m->n_hidden; i++) {
    char name[PRMI_NAME_SIZE];
    prmi_dense *L = &m->hidden[i];
    L->in = in;
    L->out = m->opts.hidden[i];
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
}

/* Hugging Face GPT2ForSequenceClassification names and shapes, in the order
 * of its state_dict (layer-major, so "the last k blocks + head" is a suffix
 * of the arena). Conv1D weights are [in, out]. */
static void layout_gpt2(prm_model *m) {
  const uint64_t C = m->opts.n_embd;
  char name[PRMI_NAME_SIZE];
  m->wte = add_tensor(m, "transformer.wte.weight", 2, m->opts.vocab_size, C);
  m->wpe = add_tensor(m, "transformer.wpe.weight", 2, m->opts.n_ctx, C);
  for (uint64_t l = 0; l < m->opts.n_layer; l++) {
    prmi_block *b = &m->blocks[l];
#define T2(field, suffix, d0, d1)                                                \
  snprintf(name, sizeof name, "transformer.h.%llu.%s", (unsigned long long)l, suffix); \
  b->field = add_tensor(m, name, 2, d0, d1)
#define T1(field, suffix, d0)                                                    \
  snprintf(name, sizeof name, "transformer.h.%llu.%s", (unsigned long long)l, suffix); \
  b->field = add_tensor(m, name, 1, d0, 0)
    b->start = m->n_params;
    T1(ln1_w, "ln_1.weight", C);
    T1(ln1_b, "ln_1.bias", C);
    T2(attn_w, "attn.c_attn.weight", C, 3 * C);
    T1(attn_b, "attn.c_attn.bias", 3 * C);
    T2(aproj_w, "attn.c_proj.weight", C, C);
    T1(aproj_b, "attn.c_proj.bias", C);
    T1(ln2_w, "ln_2.weight", C);
    T1(ln2_b, "ln_2.bias", C);
    T2(fc_w, "mlp.c_fc.weight", C, 4 * C);
    T1(fc_b, "mlp.c_fc.bias", 4 * C);
    T2(mproj_w, "mlp.c_proj.weight", 4 * C, C);
    T1(mproj_b, "mlp.c_proj.bias", C);
#undef T1
#undef T2
  }
  m->lnf_w = add_tensor(m, "transformer.ln_f.weight", 1, C, 0);
  m->lnf_b = add_tensor(m, "transformer.ln_f.bias", 1, C, 0);
  m->head.in = C;
  m->head.out = 1;
  m->head.w_off = add_tensor(m, "score.weight", 2, 1, C);
}

int prmi_model_alloc(prm_model **out, const prm_model_options *opts) {
  if (out == NULL) return prmi_fail(NULL, PRM_ERR_NULL, "model: out is NULL");
  *out = NULL;
  int rc = prmi_check_version(NULL, opts, PRM_MODEL_OPTIONS_VERSION, "prm_model_options");
  if (rc != PRM_OK) return rc;
  prm_model_options o = *opts; /* version 1 is the only (and newest) version */
  o.version = PRM_MODEL_OPTIONS_VERSION;
  uint64_t n_params = 0;
  uint32_t n_tensors = 0;
  if ((rc = normalise_options(&o, &n_params, &n_tensors)) != PRM_OK) return rc;

  prm_model *m = calloc(1, sizeof *m);
  if (m == NULL) return prmi_fail(NULL, PRM_ERR_NOMEM, "model: out of memory");
  m->opts = o;
  m->tensors = calloc(n_tensors, sizeof *m->tensors);
  if (o.arch == PRM_ARCH_GPT2) m->blocks = calloc(o.n_layer, sizeof *m->blocks);
  m->params = prmi_calloc(n_params, sizeof(float));
  if (m->tensors == NULL || m->params == NULL || (o.arch == PRM_ARCH_GPT2 && m->blocks == NULL)) {
    prm_model_free(m);
    return prmi_fail(NULL, PRM_ERR_NOMEM, "model: cannot allocate %llu parameters",
                     (unsigned long long)n_params);
  }
  if (o.arch == PRM_ARCH_GPT2)
    layout_gpt2(m);
  else
    layout_mlp(m);
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

/* N(0, sd) by Box-Muller. */
static float normal(uint64_t *s, double sd) {
  double u1 = ((double)(splitmix64(s) >> 11) + 1.0) * 0x1.0p-53; /* (0, 1] */
  double u2 = (double)(splitmix64(s) >> 11) * 0x1.0p-53;
  return (float)(sd * sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}

/* 1 when `name` ends with `suffix`. */
static int ends_with(const char *name, const char *suffix) {
  size_t n = strlen(name), k = strlen(suffix);
  return n >= k && strcmp(name + n - k, suffix) == 0;
}

static void init_params(prm_model *m, uint64_t seed) {
  const int gpt2 = m->opts.arch == PRM_ARCH_GPT2;
  for (uint32_t t = 0; t < m->n_tensors; t++) {
    const prmi_tensor *T = &m->tensors[t];
    uint64_t s = seed ^ (0xD1B54A32D192ED03ull * (uint64_t)(t + 1));
    float *p = m->params + T->offset;
    if (gpt2) {
      /* GPT-2: LayerNorm 1/0, biases 0, weights N(0, 0.02), the two
       * residual projections N(0, 0.02 / sqrt(2 n_layer)). */
      if (ends_with(T->name, "ln_1.weight") || ends_with(T->name, "ln_2.weight") ||
          ends_with(T->name, "ln_f.weight")) {
        for (uint64_t i = 0; i < T->numel; i++) p[i] = 1.0f;
      } else if (ends_with(T->name, ".bias")) {
        for (uint64_t i = 0; i < T->numel; i++) p[i] = 0.0f;
      } else {
        double sd = ends_with(T->name, "c_proj.weight")
                        ? 0.02 / sqrt(2.0 * (double)m->opts.n_layer)
                        : 0.02;
        for (uint64_t i = 0; i < T->numel; i++) p[i] = normal(&s, sd);
      }
      continue;
    }
    /* Weights: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (PyTorch's nn.Linear
     * bound); biases: U(-0.1, 0.1) so that tests see non-trivial biases. */
    double a = T->ndim == 2 ? 1.0 / sqrt((double)T->shape[1]) : 0.1;
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
  free(model->tensors);
  free(model->blocks);
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

int prm_model_set_trainable(prm_model *model, int32_t n_blocks) {
  if (model == NULL) return prmi_fail(NULL, PRM_ERR_NULL, "prm_model_set_trainable: model is NULL");
  uint64_t off = 0;
  if (n_blocks >= 0) {
    const uint64_t k = (uint64_t)n_blocks;
    if (model->opts.arch == PRM_ARCH_GPT2) {
      const uint64_t L = model->opts.n_layer;
      if (k > L)
        return prmi_fail(model->errmsg, PRM_ERR_INVALID,
                         "prm_model_set_trainable: %d blocks, the model has %llu", (int)n_blocks,
                         (unsigned long long)L);
      off = k == 0 ? model->head.w_off : model->blocks[L - k].start;
    } else if (model->opts.arch == PRM_ARCH_MLP) {
      const uint64_t L = model->n_hidden;
      if (k > L)
        return prmi_fail(model->errmsg, PRM_ERR_INVALID,
                         "prm_model_set_trainable: %d layers, the model has %llu", (int)n_blocks,
                         (unsigned long long)L);
      off = k == 0 ? model->head.w_off : model->hidden[L - k].w_off;
    } else if (k > 0) {
      return prmi_fail(model->errmsg, PRM_ERR_INVALID,
                       "prm_model_set_trainable: a linear model has no blocks (use 0 or -1)");
    }
  }
  model->trainable_offset = off;
  return PRM_OK;
}

uint64_t prm_model_trainable_offset(const prm_model *model) {
  return model ? model->trainable_offset : 0;
}

const char *prm_model_errmsg(const prm_model *model) { return model ? model->errmsg : ""; }
