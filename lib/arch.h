/*
 * arch.h - the internal architecture interface.
 *
 * Every architecture (linear, mlp, gpt2, llama, ...) is one file in lib/
 * that defines one `const prmi_arch` descriptor and nothing else visible.
 * The generic code -- models (model.c), contexts (ctx.c), the one-call
 * paths (train.c) and checkpoints (safetensors.c) -- reaches an
 * architecture only through its descriptor and never tests `arch` by value.
 * A new architecture is a new file plus one line in arch.c's registry.
 *
 * Ownership: the descriptor's hooks may keep private data in
 * prm_model.layout (set by `layout`, released by `layout_free`) and in
 * prm_ctx.acts (set by `ctx_new`, released by `ctx_free`). Both free hooks
 * receive only that pointer: freeing never reads the model, so models,
 * contexts and optimizers may be freed in any order.
 */
#ifndef PRM_ARCH_H
#define PRM_ARCH_H

#include <stddef.h>
#include <stdint.h>

#include "prefrm.h"

typedef struct prmi_arch prmi_arch;

/* A checkpoint being loaded, as the hooks see it (safetensors.c). Tensor
 * names are canonical: aliases (tensor_alias) were already applied. */
typedef struct prmi_ckpt prmi_ckpt;

/* Where meta_write puts the configuration (safetensors.c). */
typedef struct prmi_meta_out prmi_meta_out;

struct prmi_arch {
  int32_t id;          /* prm_arch value */
  const char *name;    /* "gpt2": checkpoint "model" key, messages */
  const char *article; /* "a gpt2": messages */
  int tokens;          /* 1: batches carry token ids and lengths; 0: features */

  /* ---- models (model.c) ---- */

  /*
   * Validate o's fields for this architecture; fill defaults of fields left 0
   * where the header documents one; zero the fields of other architectures.
   * Count the parameters (*n_params <= 2^34) and tensors. Thread error only.
   */
  int (*normalise)(prm_model_options *o, uint64_t *n_params, uint32_t *n_tensors);
  /*
   * Lay the tensors out with prmi_model_add_tensor, in Hugging Face
   * state_dict order (layer-major, so that "the last k blocks + final norm +
   * head" is a suffix), ending with score.weight [1, H]; set m->head_w and
   * m->head_in; keep private offsets in m->layout. m->params is not yet
   * allocated. Returns PRM_OK or PRM_ERR_NOMEM.
   */
  int (*layout)(prm_model *m);
  void (*layout_free)(void *layout); /* may be NULL */
  /* Initialise every parameter, deterministically in seed. */
  void (*init)(prm_model *m, uint64_t seed);
  /*
   * prm_model_set_trainable(k > 0): the first parameter of the last k blocks
   * (plus everything after them). PRM_ERR_INVALID with a thread message
   * when k is more than the model has (model.c records it in the model).
   * (k = 0 is the head and k < 0 everything: the generic code handles those.)
   */
  int (*trainable_from_block)(prm_model *m, uint64_t k, uint64_t *offset);

  /* ---- checkpoints (safetensors.c) ---- */

  /* Write the configuration keys (prmi_meta_put) after "model". */
  void (*meta_write)(const prm_model_options *o, prmi_meta_out *out);
  /* 1 when a file without a "model" key looks like this architecture
   * (by its tensor names). */
  int (*detect)(const prmi_ckpt *c);
  /* Configuration from the file: __metadata__ keys, the rest from tensor
   * shapes. o holds defaults (prm_model_options_init) and o->arch on entry.
   * PRM_ERR_FORMAT / PRM_ERR_UNSUPPORTED with a message. */
  int (*config)(const prmi_ckpt *c, prm_model_options *o);
  /* Another spelling of one of our names (a bare GPT2Model name without
   * "transformer."): write ours to buf and return 1; else 0. May be NULL. */
  int (*tensor_alias)(const char *name, char *buf, size_t cap);
  /* 1 for a tensor that files of this architecture may carry and a load
   * skips (HF buffers such as gpt2's attn.bias). Any dtype. May be NULL. */
  int (*ignorable)(const char *name, uint32_t ndim);

  /* ---- contexts (ctx.c) ---- */

  /* Allocate c->acts for c->max_rows rows (token models: of c->max_len
   * tokens) and c->inference. PRM_ERR_NOMEM without a message (ctx.c
   * writes it, with ctx_floats). */
  int (*ctx_new)(prm_ctx *c);
  void (*ctx_free)(void *acts); /* NULL-safe */
  /* Floats ctx_new allocates for these sizes and c->n_workers workers
   * (for messages and docs). */
  double (*ctx_floats)(const prm_model *m, uint64_t max_rows, uint64_t max_len, int inference,
                       uint32_t n_workers);
  /* Validate the architecture's part of a batch (features or tokens;
   * version and NULL batch are checked before). *stride: the row stride of
   * a feature batch (0 for token batches). Writes ctx->errmsg on failure. */
  int (*check_batch)(prm_ctx *ctx, const prm_batch *b, uint64_t *stride);
  /*
   * Forward a validated batch into scores (b->n). copy_input: keep what the
   * backward needs beyond the call (prm_ctx_forward); 0: the batch outlives
   * the backward (one-call paths). Only failure: PRM_ERR_NONFINITE for NaN/Inf
   * features found during the computation (scores may then be partly
   * written; with copy_input a pending forward must survive it). Does not
   * touch ctx->have_forward / last_n: ctx.c does.
   */
  int (*forward)(prm_ctx *ctx, const prm_batch *b, uint64_t stride, float *scores, int copy_input);
  /* ADD the gradient of sum_i dscores[i] * score_i of the last forward into
   * ctx->grads (the trainable suffix from ctx->trainable_offset). */
  void (*backward)(prm_ctx *ctx, const float *dscores, uint64_t n);
  /*
   * Optional (NULL: forward + loss + backward): the whole gradient of a
   * validated pair batch in one pass, added into ctx->grads only on
   * success; loss options were validated for the whole batch. Fills stats.
   */
  int (*pair_grad)(prm_ctx *ctx, const prm_batch *pairs, uint64_t n_pairs,
                   const prm_loss_options *loss_opts, prm_loss_stats *stats);
};

/* The registry (arch.c): NULL when unknown. */
const prmi_arch *prmi_arch_find(int32_t id);
const prmi_arch *prmi_arch_by_name(const char *name);
/* i-th registered architecture (0..), NULL past the end. */
const prmi_arch *prmi_arch_at(uint32_t i);

/* The descriptors, one per file. */
extern const prmi_arch prmi_arch_linear; /* linear.c */
extern const prmi_arch prmi_arch_mlp;    /* mlp.c */
extern const prmi_arch prmi_arch_gpt2;   /* gpt2.c */
extern const prmi_arch prmi_arch_llama;  /* llama.c */

/* ---- helpers for the hooks ---------------------------------------------------------------- */

/* model.c: append a tensor (ndim 1: [d0]; 2: [d0, d1]) to m's layout;
 * returns its element offset in the arena. */
uint64_t prmi_model_add_tensor(prm_model *m, const char *name, uint32_t ndim, uint64_t d0,
                               uint64_t d1);
/* model.c: "model: <what> = v not in [1, 2^30]" unless 1 <= v <= 2^30. */
int prmi_check_dim(uint64_t v, const char *what);
/* model.c: deterministic per-tensor random streams for init hooks. */
uint64_t prmi_init_stream(uint64_t seed, uint32_t tensor_index);
float prmi_init_uniform(uint64_t *stream, double a); /* U[-a, a) */
float prmi_init_normal(uint64_t *stream, double sd); /* N(0, sd) */

/* mlp.c: linear/mlp init -- weights U(+-1/sqrt(fan_in)), biases U(+-0.1). */
void prmi_init_feature_model(prm_model *m, uint64_t seed);
/* mlp.c: linear/mlp input size from the "d" key, else the columns of tensor
 * `first` (the first weight matrix). */
int prmi_feature_input_size(const prmi_ckpt *c, const char *first, prm_model_options *o);

/* safetensors.c: the checkpoint view. */
const char *prmi_ckpt_meta(const prmi_ckpt *c, const char *key); /* NULL: absent */
uint32_t prmi_ckpt_count(const prmi_ckpt *c);                    /* tensors */
const char *prmi_ckpt_name(const prmi_ckpt *c, uint32_t i);
/* 1 and the shape when tensor `name` exists (ignorable ones excluded), else 0. */
int prmi_ckpt_shape(const prmi_ckpt *c, const char *name, uint32_t *ndim, uint64_t shape[2]);
/*
 * Integer metadata: absent -> 0 (v untouched); a positive decimal -> 1;
 * anything else -> PRM_ERR_FORMAT with a message naming the key.
 */
int prmi_ckpt_meta_u64(const prmi_ckpt *c, const char *key, uint64_t *v);
/* Real metadata (a plain decimal number, as Python's str(float) writes):
 * absent -> 0; parsed -> 1; else PRM_ERR_FORMAT. */
int prmi_ckpt_meta_double(const prmi_ckpt *c, const char *key, double *v);
/* Optional integer metadata `key` must equal `actual` (derived from
 * `source`, e.g. a shape): PRM_OK, or PRM_ERR_FORMAT with a message. */
int prmi_ckpt_meta_agrees(const prmi_ckpt *c, const char *key, uint64_t actual, const char *source);
/* "<prefix><l>.<rest>" with a canonical decimal l: returns rest, sets *l;
 * else NULL. */
const char *prmi_layer_name(const char *name, const char *prefix, uint64_t *l);
/* Configuration key for meta_write ("key": "value"). */
void prmi_meta_put(prmi_meta_out *out, const char *key, const char *value);
void prmi_meta_put_u64(prmi_meta_out *out, const char *key, uint64_t v);
/* A double as "%.17g" (reads back bit for bit; '.' whatever the locale). */
void prmi_meta_put_real(prmi_meta_out *out, const char *key, double x);

/* ctx.c: helpers of the feature architectures (linear, mlp). */
/* Copy n rows (source stride) into dst (n, d) and check them in one pass:
 * 1 when every feature is finite. */
int prmi_copy_features(float *dst, const float *src, uint64_t n, uint64_t d, uint64_t stride);
/* PRM_ERR_NONFINITE naming the first NaN/Inf feature of b, or PRM_OK. */
int prmi_report_nonfinite_feature(prm_ctx *ctx, const prm_batch *b, uint64_t stride);
/* Validate a feature batch against input size d and the context's rows. */
int prmi_check_feature_batch(prm_ctx *ctx, const prm_batch *b, uint64_t d, uint64_t *stride);
/* ctx.c: validate a token batch (gpt2, llama): pointers, 1 <= n <= max_rows,
 * lengths in [1, max_len] and within token_stride, ids in [0, vocab). */
int prmi_check_token_batch(prm_ctx *ctx, const prm_batch *b, uint64_t vocab);
/* ctx.c: a batch's shared-prefix arrays, both NULL for a version-1 batch
 * (whose struct ends before them) or when none is declared. */
void prmi_batch_prefix(const prm_batch *b, const int32_t **row, const int32_t **len);

/*
 * The packed token layout of a validated token batch (gpt2, llama). Only the
 * tokens a row does not share are packed: row i owns packed rows
 * [off[i], off[i+1]), its positions [first[i], len[i]). Position t of row i
 * is packed row kmap[kmap_off[i] + t] (its own or an earlier row's), and
 * last[i] that of its last token. pos[r] is packed row r's position.
 * Without shared prefixes (shared == 0): first[i] = 0, kmap is the identity
 * along each row, and off[i+1] - off[i] = len[i].
 */
typedef struct prmi_pack {
  uint64_t n, n_tok; /* rows, packed tokens */
  int shared;        /* some row shares a prefix */
  uint64_t *off;     /* (max_rows + 1) */
  uint64_t *first;   /* (max_rows) */
  uint64_t *len;     /* (max_rows) */
  uint64_t *last;    /* (max_rows) */
  uint64_t *kmap_off; /* (max_rows + 1) */
  uint64_t *kmap;    /* (max_rows * max_len) */
  int32_t *pos;      /* (max_rows * max_len) */
  int32_t *ids;      /* (max_rows * max_len) packed token ids */
  /* Components: rows linked by sharing (a row, the row it shares with, and
   * so on), which write each other's key/value gradients. comp_rows lists
   * the rows component by component (ordered by their first row), rows
   * ascending within one; component c is comp_rows[comp_off[c] ..
   * comp_off[c+1]). Without sharing every row is its own component. */
  uint64_t n_comp;
  uint64_t *comp_off;  /* (max_rows + 1) */
  uint64_t *comp_rows; /* (max_rows) */
  uint64_t *root;      /* (max_rows) each row's component's first row */
  uint64_t *comp_of;   /* (max_rows) each row's component */
  uint64_t *cursor;    /* (max_rows) scratch */
} prmi_pack;

prmi_pack *prmi_pack_new(uint64_t max_rows, uint64_t max_len); /* NULL: no memory */
void prmi_pack_free(prmi_pack *p);                             /* NULL-safe */
/* Pack b (validated by prmi_check_token_batch, n <= max_rows). */
void prmi_pack_tokens(prmi_pack *p, const prm_batch *b);

/* arch.c: 1 when name ends with suffix (init hooks pick tensors by name). */
int prmi_ends_with(const char *name, const char *suffix);

#endif /* PRM_ARCH_H */
