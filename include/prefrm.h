/*
 * prefrm.h - libprefrm: reward models trained from pairwise preferences.
 *
 * This header is the specification of the library. Every declaration states
 * its parameters, return codes, ownership and thread safety.
 *
 * Objects (all opaque, all created by a prm_*_new or prm_*_load function and
 * released by the matching prm_*_free, which accepts NULL):
 *
 *   prm_model      architecture + parameters (fp32, one contiguous arena).
 *                  Read-only during forward/backward: any number of contexts
 *                  on any number of threads may use one model at once.
 *   prm_ctx        everything a forward/backward call mutates: activations
 *                  kept for backward, scratch and the gradient accumulator.
 *                  One per thread. Sized at creation; no allocation after.
 *   prm_optimizer  algorithm, hyper-parameters, schedule, moments, step
 *                  counter. prm_optimizer_step is the only call that writes
 *                  model parameters (besides creation and loading); do not run
 *                  it concurrently with any other call on the same model.
 *
 * Loss functions (prm_loss_*) are pure functions over score arrays.
 *
 * Conventions:
 *   - Every fallible function returns an int status: PRM_OK (0) or a negative
 *     prm_status. On failure nothing observable changes: out-pointers of
 *     constructors are set to NULL, caller buffers may hold partial output
 *     only where a function says so, handles are left as they were.
 *     The one exception is named where it applies: prm_train_step and
 *     prm_evaluate, once their arguments are valid, run a forward, and a
 *     forward that fails part-way (NaN/Inf features are found during the
 *     computation) has replaced a forward pending from prm_ctx_forward.
 *   - A human-readable reason for the last failure is kept per thread
 *     (prm_last_errmsg), so callers without a handle (constructors, loss
 *     functions) get one too, and per handle (prm_model_errmsg,
 *     prm_ctx_errmsg, prm_optimizer_errmsg). The rule for a handle's
 *     message: a failing call writes its message to the calling thread AND
 *     to every model, context and optimizer it takes as an argument, const
 *     or not (a failing prm_ctx_new writes the model's; prm_model_tensor_info
 *     with a bad index does too; a failing prm_train_step writes the
 *     context's and the optimizer's). So a handle's message describes the
 *     most recent failing call that involved it, on whatever thread. Only a
 *     failure replaces it: a successful call never clears or changes it, and
 *     it reads "" until the handle's first failure. Handles reached only
 *     through another (the model of a context during prm_ctx_forward) are
 *     not written. "Failing" includes a NULL return of prm_ctx_grads and
 *     prm_model_params. No global state is shared between threads.
 *   - Versioned structs (options, batches, statistics) begin with a uint32_t
 *     version field. Initialise them with the matching prm_*_init function (or
 *     the PRM_*_INIT macro from C). Fields are only ever appended; the library
 *     reads and writes only the fields that exist in the version you pass.
 *   - Inputs are borrowed for the duration of the call only. Outputs go to
 *     caller-provided buffers whose sizes are passed in.
 *   - The library never prints, exits, aborts, or changes BLAS thread
 *     settings.
 */
#ifndef PREFRM_H
#define PREFRM_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(PRM_STATIC_DEFINE)
#define PRM_API
#elif defined(_WIN32)
#ifdef PRM_BUILDING_LIBRARY
#define PRM_API __declspec(dllexport)
#else
#define PRM_API __declspec(dllimport)
#endif
#elif defined(__GNUC__) && __GNUC__ >= 4
#define PRM_API __attribute__((visibility("default")))
#else
#define PRM_API
#endif

/* ------------------------------------------------------------------------ */
/* Version                                                                   */
/* ------------------------------------------------------------------------ */

#define PRM_VERSION_MAJOR 0
#define PRM_VERSION_MINOR 4
#define PRM_VERSION_PATCH 0
/** MAJOR * 10000 + MINOR * 100 + PATCH, e.g. 400 for 0.4.0. */
#define PRM_VERSION_NUMBER \
  (PRM_VERSION_MAJOR * 10000 + PRM_VERSION_MINOR * 100 + PRM_VERSION_PATCH)
#define PRM_VERSION_STRING "0.4.0"

/** Runtime twin of PRM_VERSION_NUMBER: the version of the linked library. */
PRM_API uint32_t prm_version_number(void);
/** Runtime twin of PRM_VERSION_STRING. Static storage; never NULL. */
PRM_API const char *prm_version_string(void);

/* ------------------------------------------------------------------------ */
/* Status codes. Values are pinned forever; new codes are only appended.    */
/* ------------------------------------------------------------------------ */

typedef enum prm_status {
  PRM_OK = 0,
  PRM_ERR_NULL = -1,          /**< a required pointer argument was NULL */
  PRM_ERR_INVALID = -2,       /**< an argument value is out of range */
  PRM_ERR_SIZE = -3,          /**< a count or buffer size does not match */
  PRM_ERR_NONFINITE = -4,     /**< NaN or Inf in input features or scores */
  PRM_ERR_VERSION = -5,       /**< a versioned struct has an unknown version */
  PRM_ERR_NOMEM = -6,         /**< memory allocation failed */
  PRM_ERR_STATE = -7,         /**< call not allowed in the object's state */
  PRM_ERR_MISMATCH = -8,      /**< objects that must belong together do not */
  PRM_ERR_IO = -9,            /**< open/read/write/rename of a file failed */
  PRM_ERR_FORMAT = -10,       /**< malformed or mismatched checkpoint */
  PRM_ERR_NONFINITE_GRAD = -11, /**< optimizer step saw NaN/Inf gradients;
                                     parameters and state left unchanged */
  PRM_ERR_UNSUPPORTED = -12   /**< valid request this build cannot serve */
} prm_status;

/**
 * Name of a status code, e.g. "PRM_ERR_SIZE: size mismatch". Static storage;
 * never NULL (unknown codes give "unknown status"). Thread-safe.
 */
PRM_API const char *prm_status_string(int status);

/**
 * Detail message of the last failing library call made by the calling
 * thread ("" if none failed yet). Thread-local storage: valid until the next
 * failing call on the same thread. Never NULL. Thread-safe.
 */
PRM_API const char *prm_last_errmsg(void);

/* ------------------------------------------------------------------------ */
/* Models                                                                    */
/* ------------------------------------------------------------------------ */

typedef struct prm_model prm_model;

/** Architectures. Values pinned. */
typedef enum prm_arch {
  PRM_ARCH_LINEAR = 1, /**< r = w . x over dense features */
  PRM_ARCH_MLP = 2,    /**< h <- act(W h + b) per hidden layer, r = w . h */
  PRM_ARCH_GPT2 = 3,   /**< GPT-2 transformer over token ids (Hugging Face
                            GPT2ForSequenceClassification, num_labels 1) */
  PRM_ARCH_LLAMA = 4   /**< Llama-family transformer over token ids (Hugging
                            Face LlamaForSequenceClassification, num_labels
                            1; Qwen2 and Qwen3 variants as options) */
} prm_arch;

/** Activation functions of the mlp architecture. Values pinned. */
typedef enum prm_activation {
  PRM_ACT_RELU = 1,
  PRM_ACT_GELU_TANH = 2, /**< 0.5x(1+tanh(sqrt(2/pi)(x+0.044715x^3))) */
  PRM_ACT_TANH = 3
} prm_activation;

#define PRM_MAX_HIDDEN 16 /**< most hidden layers an mlp may have */

#define PRM_MODEL_OPTIONS_VERSION 2

/** Model configuration. Initialise with prm_model_options_init. */
typedef struct prm_model_options {
  uint32_t version;     /**< PRM_MODEL_OPTIONS_VERSION */
  int32_t arch;         /**< prm_arch */
  uint64_t seed;        /**< initialisation seed (library's own PRNG) */
  uint64_t input_size;  /**< linear/mlp: features per row (d >= 1) */
  /* mlp */
  int32_t activation;   /**< prm_activation (default PRM_ACT_GELU_TANH) */
  uint32_t n_hidden;    /**< hidden layers, 1..PRM_MAX_HIDDEN */
  uint64_t hidden[PRM_MAX_HIDDEN]; /**< width of each hidden layer (>= 1) */
  /* gpt2 and llama */
  uint64_t vocab_size;  /**< token ids are 0 .. vocab_size-1 */
  uint64_t n_ctx;       /**< longest sequence (gpt2: wpe rows; llama: HF
                             max_position_embeddings, no table) */
  uint64_t n_embd;      /**< width C */
  uint64_t n_layer;     /**< transformer blocks, 1..128 */
  uint64_t n_head;      /**< attention heads; gpt2: must divide n_embd */
  /* ---- version 2 ---- */
  /* llama (HF config.json name in brackets) */
  uint64_t n_kv_head;   /**< key/value heads [num_key_value_heads]; must
                             divide n_head; 0: n_head (plain multi-head) */
  uint64_t head_dim;    /**< width of one head [head_dim], even; 0:
                             n_embd / n_head (which must then divide) */
  uint64_t n_ffn;       /**< SwiGLU width [intermediate_size]; 0: Meta's
                             rule 256 * ceil(8 n_embd / 3 / 256) */
  double rope_theta;    /**< RoPE base [rope_theta] (default 10000) */
  double rms_eps;       /**< RMSNorm eps [rms_norm_eps] (default 1e-6) */
  int32_t attn_bias;    /**< non-zero: q/k/v projections have biases (Qwen2) */
  int32_t qk_norm;      /**< non-zero: per-head RMSNorm of q and k before
                             the rotation (Qwen3) */
} prm_model_options;

#define PRM_MODEL_OPTIONS_INIT \
  { PRM_MODEL_OPTIONS_VERSION, PRM_ARCH_LINEAR, 0, 0, PRM_ACT_GELU_TANH, 0, \
    {0}, 0, 0, 0, 0, 0, 0, 0, 0, 10000.0, 1e-6, 0, 0 }

/**
 * Fill *opts with defaults (linear, seed 0, gelu-tanh activation, every size
 * 0) for struct version `version`.
 * @return PRM_OK, PRM_ERR_NULL, PRM_ERR_VERSION (unknown version).
 */
PRM_API int prm_model_options_init(prm_model_options *opts, uint32_t version);

/**
 * Create a model with freshly initialised parameters. Initialisation is
 * deterministic in opts->seed. linear/mlp: weights of a layer with fan-in k
 * uniform in [-1/sqrt(k), 1/sqrt(k)], mlp biases uniform in [-0.1, 0.1].
 * gpt2: GPT-2's scheme: weights and embeddings N(0, 0.02), the attention and
 * MLP output projections N(0, 0.02/sqrt(2 n_layer)), LayerNorm weight 1 and
 * bias 0, biases 0; LayerNorm eps is 1e-5. Only the fields of opts->arch are
 * read (the others are ignored and reported as 0 by prm_model_get_options).
 * @param out   receives the new model (caller owns; free with
 *              prm_model_free). Set to NULL on failure.
 * @param opts  configuration (borrowed).
 * @return PRM_OK, PRM_ERR_NULL, PRM_ERR_VERSION, PRM_ERR_INVALID (bad arch,
 *         size 0, activation, n_head not dividing n_embd, more than 2^34
 *         parameters), PRM_ERR_NOMEM.
 * Thread-safe.
 */
PRM_API int prm_model_new(prm_model **out, const prm_model_options *opts);

/** Release a model. NULL is a no-op. Contexts and optimizers created for it
 *  borrow it: they must not be used after this call, but they may be freed
 *  before or after it (freeing reads nothing of the model). Not thread-safe
 *  with any other call that uses the model. */
PRM_API void prm_model_free(prm_model *model);

/**
 * Copy the model's configuration into *opts. opts->version must be set by
 * the caller (prm_model_options_init); fields beyond it are not written.
 * @return PRM_OK, PRM_ERR_NULL, PRM_ERR_VERSION.
 */
PRM_API int prm_model_get_options(const prm_model *model,
                                  prm_model_options *opts);

/** Architecture (prm_arch), or 0 for NULL. */
PRM_API int32_t prm_model_arch(const prm_model *model);
/** Features per input row (linear/mlp; 0 for gpt2 and for NULL). */
PRM_API uint64_t prm_model_input_size(const prm_model *model);
/** Total number of fp32 parameters, or 0 for NULL. */
PRM_API uint64_t prm_model_num_params(const prm_model *model);
/** Longest sequence of a token model (gpt2, llama: its n_ctx, the largest
 *  prm_ctx_options.max_len); 0 for feature models and for NULL. */
PRM_API uint64_t prm_model_max_len(const prm_model *model);
/** Vocabulary size of a token model (ids are 0 .. vocab_size-1); 0 for
 *  feature models and for NULL. */
PRM_API uint64_t prm_model_vocab_size(const prm_model *model);

/**
 * Flat view of all parameters: one contiguous fp32 array of
 * prm_model_num_params() elements, tensors laid out in the order given by
 * prm_model_tensor_info. The pointer stays valid until prm_model_free.
 * Writing through it is allowed while no other call uses the model (e.g. to
 * broadcast parameters from another rank); prm_optimizer_step does not keep
 * copies of parameters, so such writes are seen by the next step.
 * @param n_params  optional; receives the element count.
 * @return the array, or NULL when model is NULL.
 */
PRM_API float *prm_model_params(prm_model *model, uint64_t *n_params);

/** Number of named tensors in the model (0 for NULL). */
PRM_API uint32_t prm_model_num_tensors(const prm_model *model);

/**
 * Describe tensor `index` (0 .. prm_model_num_tensors()-1).
 * @param name    optional; receives a NUL-terminated name owned by the model
 *                (e.g. "layers.0.weight"), valid until prm_model_free.
 * @param offset  optional; element offset of the tensor in the flat arena.
 * @param ndim    optional; number of dimensions (1 or 2).
 * @param shape   optional; array of 2 receiving the dimensions (row-major,
 *                PyTorch layout: nn.Linear weight is [out, in]).
 * @return PRM_OK, PRM_ERR_NULL, PRM_ERR_INVALID (index out of range).
 */
PRM_API int prm_model_tensor_info(const prm_model *model, uint32_t index,
                                  const char **name, uint64_t *offset,
                                  uint32_t *ndim, uint64_t shape[2]);

/* ---- Copying parameters in and out ----
 *
 * For hosts that cannot (or prefer not to) write through the pointer of
 * prm_model_params, e.g. a ctypes binding filling a numpy array: the
 * library copies between the model and a caller buffer and checks every
 * bound and value. Failures change nothing: a write either copies all n
 * floats or none. Bounds are checked without overflow (offset + n may
 * exceed 2^64). Messages go to the thread and to the model.
 * Thread safety: reads (find, read) are const calls, safe with each other
 * and with forward/backward on the model; writes follow the rule of
 * prm_optimizer_step: no other call may use the model meanwhile. A write
 * between a prm_ctx_forward and its prm_ctx_backward changes what the
 * backward computes, as a write through prm_model_params would.
 */

/**
 * Index of the tensor called `name` (exactly as prm_model_tensor_info names
 * it, e.g. "score.weight", "transformer.h.0.attn.c_attn.weight").
 * @param index  receives the index (0 .. prm_model_num_tensors()-1).
 * @return PRM_OK, PRM_ERR_NULL (model, name or index), PRM_ERR_INVALID (no
 *         tensor of that name; *index untouched).
 */
PRM_API int prm_model_find_tensor(const prm_model *model, const char *name,
                                  uint32_t *index);

/**
 * Copy tensor `index` into dst (row-major, the layout of
 * prm_model_tensor_info's shape).
 * @param dst  caller buffer of n floats.
 * @param n    must equal the tensor's element count (shape[0] * shape[1],
 *             or shape[0] for 1-D).
 * @return PRM_OK, PRM_ERR_NULL (model, dst), PRM_ERR_INVALID (index out of
 *         range), PRM_ERR_SIZE (n is not the element count). dst is not
 *         written on failure.
 */
PRM_API int prm_model_read_tensor(const prm_model *model, uint32_t index,
                                  float *dst, uint64_t n);

/**
 * Replace tensor `index` with the n floats at src (row-major). Frozen
 * tensors may be written too (freezing concerns gradients only).
 * @return PRM_OK, PRM_ERR_NULL (model, src), PRM_ERR_INVALID (index out of
 *         range), PRM_ERR_SIZE (n is not the element count),
 *         PRM_ERR_NONFINITE (a NaN/Inf in src; the message names the
 *         first). The model is unchanged on failure.
 * Not thread-safe with any other call on the model (as prm_optimizer_step).
 */
PRM_API int prm_model_write_tensor(prm_model *model, uint32_t index,
                                   const float *src, uint64_t n);

/**
 * Copy parameters [offset, offset + n) of the flat arena (prm_model_params'
 * layout) into dst. n = 0 copies nothing (dst may then be NULL); offset
 * may equal prm_model_num_params() only then.
 * @return PRM_OK, PRM_ERR_NULL (model; dst with n > 0), PRM_ERR_SIZE (the
 *         slice reaches past the arena). dst is not written on failure.
 */
PRM_API int prm_model_read_params(const prm_model *model, uint64_t offset,
                                  float *dst, uint64_t n);

/**
 * Write parameters [offset, offset + n) of the flat arena from src: all n
 * or, on failure, none.
 * @return PRM_OK, PRM_ERR_NULL (model; src with n > 0), PRM_ERR_SIZE (the
 *         slice reaches past the arena), PRM_ERR_NONFINITE (a NaN/Inf in
 *         src).
 * Not thread-safe with any other call on the model (as prm_optimizer_step).
 */
PRM_API int prm_model_write_params(prm_model *model, uint64_t offset,
                                   const float *src, uint64_t n);

/**
 * Choose which parameters train. n_blocks < 0: all (the default after
 * creation or loading). n_blocks = 0: the score head only (score.weight).
 * n_blocks = k > 0: the last k blocks (gpt2 transformer blocks; mlp hidden
 * layers) plus, for gpt2, the final LayerNorm, plus the head; gpt2 with
 * k = n_layer trains everything but the embeddings. Trainable parameters are
 * always a suffix of the arena, [prm_model_trainable_offset(), num_params):
 * contexts hold gradients and optimizers hold state for that suffix only;
 * frozen parameters cost no gradient memory and no optimizer state.
 * Contexts and optimizers record the trainable set when they are created;
 * after a change, backward and step on older ones return PRM_ERR_MISMATCH:
 * create new ones. Checkpoints store the set (prm_model_save, prm_model_load)
 * and optimizer states record it (prm_optimizer_load checks it).
 * Not thread-safe with other calls on the model.
 * @return PRM_OK, PRM_ERR_NULL, PRM_ERR_INVALID (more blocks than the model
 *         has; k > 0 for linear).
 */
PRM_API int prm_model_set_trainable(prm_model *model, int32_t n_blocks);

/** First trainable parameter (0 when everything trains, and for NULL).
 *  Gradient j of a context is that of parameter offset + j. */
PRM_API uint64_t prm_model_trainable_offset(const prm_model *model);

/* ---- Reward normalisation ---- */

#define PRM_REWARD_MOMENTS_VERSION 1

/** Running count, mean and sum of squared deviations of rewards, for
 *  normalisation statistics over a reference set streamed in batches.
 *  Initialise with prm_reward_moments_init (or PRM_REWARD_MOMENTS_INIT). */
typedef struct prm_reward_moments {
  uint32_t version; /**< PRM_REWARD_MOMENTS_VERSION */
  uint64_t count;   /**< rewards added */
  double mean;      /**< their mean */
  double m2;        /**< sum of (r - mean)^2 */
} prm_reward_moments;

#define PRM_REWARD_MOMENTS_INIT { PRM_REWARD_MOMENTS_VERSION, 0, 0.0, 0.0 }

/** Fill *m with an empty accumulator. @return PRM_OK, PRM_ERR_NULL,
 *  PRM_ERR_VERSION. */
PRM_API int prm_reward_moments_init(prm_reward_moments *m, uint32_t version);

/**
 * Add n rewards (e.g. the scores prm_ctx_forward returned for one batch of
 * the reference set). Each batch's mean and squared deviations are computed
 * in double and merged exactly (Chan, Golub and LeVeque's pairwise update),
 * so the result does not depend on how the set is cut into batches beyond
 * rounding. On failure *m is unchanged.
 * @return PRM_OK, PRM_ERR_NULL, PRM_ERR_VERSION, PRM_ERR_NONFINITE (a
 *         NaN/Inf reward). n = 0 adds nothing. Thread-safe for distinct m.
 */
PRM_API int prm_reward_moments_add(prm_reward_moments *m, const float *rewards,
                                   uint64_t n);

/**
 * Store reward normalisation statistics in the model: mean and population
 * standard deviation sqrt(m2 / count) of the moments. They are saved in
 * checkpoints ("reward_mean", "reward_std" __metadata__ keys, exact) and
 * loaded back; other tools (PyTorch with the reference) ignore them and
 * score as before. moments NULL removes them.
 * @return PRM_OK, PRM_ERR_NULL (model), PRM_ERR_VERSION, PRM_ERR_INVALID
 *         (fewer than 2 rewards, or a standard deviation that is 0 or not
 *         finite). Not thread-safe with other calls on the model.
 */
PRM_API int prm_model_set_reward_norm(prm_model *model,
                                      const prm_reward_moments *moments);

/**
 * The model's normalisation statistics.
 * @param mean, std  optional outputs.
 * @return PRM_OK, PRM_ERR_NULL (model), PRM_ERR_STATE (the model has none).
 * Thread-safe.
 */
PRM_API int prm_model_reward_norm(const prm_model *model, double *mean,
                                  double *std);

/**
 * Normalise n rewards in place: r <- (r - mean) / std with the model's
 * statistics, in double, rounded to float. Call it on the scores of
 * prm_ctx_forward when the RL stage wants rewards on a known scale.
 * @return PRM_OK, PRM_ERR_NULL, PRM_ERR_STATE (the model has no
 *         statistics; rewards untouched), PRM_ERR_NONFINITE (a NaN/Inf
 *         reward; rewards untouched). Thread-safe (reads the model only).
 */
PRM_API int prm_model_normalise_rewards(const prm_model *model, float *rewards,
                                        uint64_t n);

/**
 * Detail of the most recent failing call that took this model as an
 * argument, const or not, on any thread (the rule at the top of this
 * header): prm_model_tensor_info with a bad index replaces an older
 * prm_model_set_trainable message, and so does a prm_ctx_new that fails for
 * the model. Successes never clear it; "" until the first failure; "" for
 * a NULL model. Never NULL.
 *
 * The model's message is written under a lock inside the model, taken only
 * by failing calls and by this function, which returns a copy made under
 * that lock in thread-local storage: the pointer stays valid, and its text
 * unchanged, until the calling thread's next prm_model_errmsg call (on any
 * model) or the thread's exit. Copy it if you need it longer.
 * Thread-safe: may run concurrently with any call on the model, failing
 * ones included.
 */
PRM_API const char *prm_model_errmsg(const prm_model *model);

/* ------------------------------------------------------------------------ */
/* Checkpoints (safetensors; saved F32, loaded from F32, F16 or BF16)        */
/* ------------------------------------------------------------------------ */

/**
 * Save the model as a safetensors file. Tensor names follow PyTorch
 * (`score.weight` [1, d]; `layers.{i}.weight` [out, in], `layers.{i}.bias`);
 * the configuration goes into `__metadata__` as strings, and so does the
 * trainable set when not everything trains ("trainable_blocks": the
 * n_blocks of prm_model_set_trainable), so that a resumed run trains what
 * the saved one did.
 *
 * Atomic and durable: the bytes go to "<path>.tmp" (a fresh file, mode
 * 0666 & ~umask), which is fsynced and renamed over `path`, and then the
 * directory is fsynced. A reader of `path` sees the old file or the new one,
 * never a mix. On failure `path` is unchanged and "<path>.tmp" removed. A
 * crash or kill during the save leaves `path` old or new plus, at most, one
 * "<path>.tmp", which the next save to `path` replaces (litter never grows
 * beyond that one file). The name "<path>.tmp" belongs to this call: a file
 * of your own there is deleted; a symbolic link, directory, FIFO or other
 * non-regular file there makes the save fail and is left alone.
 *
 * Two saves to the same `path` at once (threads or processes) do not mix:
 * the temporary file is held under flock(), and a save that finds it locked
 * returns PRM_ERR_IO ("another save to '<path>' is in progress") at once,
 * without waiting and without touching either file.
 *
 * @return PRM_OK; PRM_ERR_NULL; PRM_ERR_NOMEM; PRM_ERR_IO (cannot create,
 *         write, sync or rename the file, another save in progress; or,
 *         after `path` was already replaced, the fsync of its directory
 *         failed: the message says so). Details in prm_last_errmsg() and
 *         prm_model_errmsg().
 * Thread-safe with respect to concurrent forward calls on the model.
 */
PRM_API int prm_model_save(const prm_model *model, const char *path);

/**
 * Serialise the model to a caller buffer (same bytes as prm_model_save).
 * Call with buf == NULL to learn the size: *size_out receives the exact byte
 * count. With a buffer, `capacity` must be at least that size.
 * @return PRM_OK, PRM_ERR_NULL (model or size_out), PRM_ERR_SIZE (capacity
 *         too small; *size_out still receives the needed size),
 *         PRM_ERR_NOMEM (the file would not fit in size_t; 32-bit hosts).
 *         Details in prm_last_errmsg() and prm_model_errmsg().
 */
PRM_API int prm_model_save_buffer(const prm_model *model, void *buf,
                                  size_t capacity, size_t *size_out);

/**
 * Create a model from a safetensors file written by prm_model_save or by
 * PyTorch with the same names and `__metadata__` keys. Everything is
 * validated (header bounds, offsets, overlaps, dtype F32, F16 or BF16 --
 * half precision widens to F32 exactly --, shapes against the
 * configuration, missing or unknown tensors, non-finite values).
 * @param out  receives the model (caller owns), NULL on failure.
 * @return PRM_OK, PRM_ERR_NULL, PRM_ERR_IO (cannot open or read; not a
 *         regular file; the file changed while being read), PRM_ERR_FORMAT,
 *         PRM_ERR_NOMEM, PRM_ERR_UNSUPPORTED (a valid file this build cannot
 *         use, e.g. a gpt2 LayerNorm eps other than 1e-5).
 *         A file of another kind (text, random bytes: fewer than 8 bytes,
 *         a header length above 100 MB or below 2, a header that does
 *         not start with '{' after JSON whitespace) is PRM_ERR_FORMAT with
 *         a message that starts "not a safetensors file: " and says which
 *         rule it breaks; a safetensors file cut short says "truncated".
 *         The same holds for every loader (pretrained, optimizer states,
 *         buffers).
 *
 * Never blocks on a special file: `path` is opened non-blocking and
 * anything but a regular file (a FIFO without a writer, a directory, a
 * device such as /dev/zero) gives PRM_ERR_IO at once. The file is read as
 * the st_size bytes fstat reports on opening; if it shrinks, grows or its
 * modification time changes before the read is done, the load fails with
 * PRM_ERR_IO ("changed while being read") instead of parsing a torn copy.
 *
 * Unknown `__metadata__` keys are ignored, so files written by other tools
 * (and gradient files of the PyTorch reference) load as well; a key given
 * twice in any JSON object of the header (known or unknown, compared after
 * decoding escapes) is PRM_ERR_FORMAT. gpt2 files need the "n_head" key
 * (docs/checkpoint-format.md). The trainable set is restored: a file with a
 * "trainable_blocks" key (see prm_model_save) loads as after
 * prm_model_set_trainable(model, that value), PRM_ERR_FORMAT when the model
 * cannot take it; a file without it loads with everything trainable.
 */
PRM_API int prm_model_load(prm_model **out, const char *path);

/** As prm_model_load, from `size` bytes at `buf` (borrowed, not kept): the
 *  same validation and return codes, except that PRM_ERR_IO cannot occur. */
PRM_API int prm_model_load_buffer(prm_model **out, const void *buf,
                                  size_t size);

/* ------------------------------------------------------------------------ */
/* Starting from a pretrained language model                                 */
/* ------------------------------------------------------------------------ */

#define PRM_PRETRAINED_OPTIONS_VERSION 1

/** Options of prm_model_load_pretrained. Initialise with
 *  prm_pretrained_options_init. */
typedef struct prm_pretrained_options {
  uint32_t version;                /**< PRM_PRETRAINED_OPTIONS_VERSION */
  const prm_model_options *config; /**< optional (borrowed): the model's
      configuration, for files that do not carry it (most hub files have
      only {"format": "pt"} metadata). Used for what the file cannot tell:
      its arch when the file has no "model" key, n_head, and for llama n_ctx,
      rope_theta and rms_eps. Whatever the file does tell (its __metadata__
      and the tensor shapes) must agree with it: PRM_ERR_FORMAT otherwise.
      NULL: everything from the file. */
  uint64_t seed;      /**< initialisation of tensors the file lacks (the
                           score head), as prm_model_new with this seed */
  int32_t fresh_head; /**< non-zero: initialise score.weight even when the
                           file has one (start a new reward head on a
                           reward model's backbone) */
  int32_t ignore_unknown; /**< non-zero: tensors the architecture does not
                           know (another model's extra heads, adapters) are
                           skipped and reported as ignored instead of
                           failing the load with "unexpected tensor" */
} prm_pretrained_options;

#define PRM_PRETRAINED_OPTIONS_INIT { PRM_PRETRAINED_OPTIONS_VERSION, NULL, 0, 0, 0 }

/** Fill *opts with defaults (configuration from the file, seed 0, keep a
 *  head the file has). @return PRM_OK, PRM_ERR_NULL, PRM_ERR_VERSION. */
PRM_API int prm_pretrained_options_init(prm_pretrained_options *opts,
                                        uint32_t version);

#define PRM_LOAD_REPORT_VERSION 1

/** What prm_model_load_pretrained did with each tensor. */
typedef struct prm_load_report {
  uint32_t version;       /**< set by the caller: PRM_LOAD_REPORT_VERSION */
  uint32_t n_loaded;      /**< model tensors read from the file */
  uint32_t n_initialised; /**< model tensors initialised from the seed */
  uint32_t n_ignored;     /**< file tensors not used (an LM head, buffers) */
  char *text;             /**< optional caller buffer (NULL: counts only):
                               one line per tensor, "loaded <name>",
                               "initialised <name>" or "ignored <name>",
                               '\n'-terminated, in file-name order for
                               ignored and model order for the others;
                               NUL-terminated, cut to text_size */
  size_t text_size;       /**< bytes at text */
  size_t text_needed;     /**< receives the bytes the whole text needs
                               (including the NUL) */
} prm_load_report;

#define PRM_LOAD_REPORT_INIT { PRM_LOAD_REPORT_VERSION, 0, 0, 0, NULL, 0, 0 }

/**
 * Create a reward model from a Hugging Face checkpoint of a language model:
 * the backbone from the file, a score head from the file when it has one
 * (and opts->fresh_head is 0), else freshly initialised. Accepts every
 * layout prm_model_load does and, for token models, the language-model
 * layouts: gpt2 -- GPT2LMHeadModel and GPT2Model names, with or without the
 * "transformer." prefix, with HF's attn.bias / attn.masked_bias buffers,
 * with or without a (tied) lm_head.weight; llama -- LlamaForCausalLM and
 * LlamaModel names (with or without "model."), lm_head.weight, the
 * rotary_emb.inv_freq buffers, and ...ForSequenceClassification files.
 * lm_head.weight and the buffers are ignored, and so is a
 * "trainable_blocks" key: the new model trains everything. The file's tensors are
 * validated as by prm_model_load (F32, F16 or BF16, bounds, shapes, finite
 * values).
 * @param out     receives the model (caller owns), NULL on failure.
 * @param path    a safetensors file (opened without blocking, as
 *                prm_model_load).
 * @param opts    optional (NULL: defaults).
 * @param report  optional; report->version set by the caller. Filled on
 *                success (and text_needed also on failure when the file
 *                was readable).
 * @return PRM_OK, PRM_ERR_NULL, PRM_ERR_VERSION, PRM_ERR_INVALID
 *         (opts->config is not a valid configuration, as prm_model_new
 *         would say), PRM_ERR_IO, PRM_ERR_FORMAT (a malformed file, a tensor
 *         missing or of the wrong shape, a configuration the file and
 *         opts->config disagree on, n_head unknown), PRM_ERR_UNSUPPORTED,
 *         PRM_ERR_NOMEM.
 * Thread-safe.
 */
PRM_API int prm_model_load_pretrained(prm_model **out, const char *path,
                                      const prm_pretrained_options *opts,
                                      prm_load_report *report);

/** As prm_model_load_pretrained, from `size` bytes at `buf` (borrowed). */
PRM_API int prm_model_load_pretrained_buffer(prm_model **out, const void *buf,
                                             size_t size,
                                             const prm_pretrained_options *opts,
                                             prm_load_report *report);

/* ------------------------------------------------------------------------ */
/* Batches                                                                   */
/* ------------------------------------------------------------------------ */

#define PRM_BATCH_VERSION 2

/**
 * A batch of n rows (samples). For a pair batch of P pairs, n = 2P and rows
 * 0..P-1 are the chosen responses, rows P..2P-1 the rejected ones, in
 * matching order; this is the layout prm_train_step and prm_evaluate expect.
 * linear/mlp read `features` (the token fields are ignored); gpt2 and llama
 * read the token fields (the feature fields are ignored): sequence i is
 * tokens[i * token_stride + t] for t < lengths[i], right-padded. The score
 * of a sequence is read at position lengths[i] - 1; padding is never read,
 * so its ids do not matter and it costs no compute.
 *
 * Shared prefixes (version 2, token models): row i may declare that its
 * first prefix_len[i] tokens are the first prefix_len[i] tokens of an
 * earlier row prefix_row[i] (a pair's rejected response naming its chosen
 * one, the responses of one prompt naming the first). Those tokens are then
 * computed once, by the earlier row; their gradient collects every row's
 * contribution, and row i's own tokens attend to them. Scores, losses and
 * gradients equal those of the same batch without the declaration (up to
 * float rounding: the sums run in another order). A row may share its whole
 * sequence (prefix_len[i] == lengths[i]). The tokens are compared: a
 * declared prefix that differs is rejected (PRM_ERR_INVALID), never trusted.
 * Picture and rules: docs/api.md, "Shared prefixes".
 */
typedef struct prm_batch {
  uint32_t version;          /**< PRM_BATCH_VERSION */
  uint64_t n;                /**< rows (samples) */
  const float *features;     /**< (n, row_stride) row-major, finite */
  uint64_t n_features;       /**< must equal the model's input size */
  uint64_t row_stride;       /**< floats between rows; 0 means n_features */
  const int32_t *tokens;     /**< token models: (n, token_stride) ids in [0, V) */
  uint64_t token_stride;     /**< token models: ints between sequences (>= every
                                  length; unused when n == 1) */
  const int32_t *lengths;    /**< token models: n lengths in [1, ctx max_len] */
  /* version 2 */
  const int32_t *prefix_row; /**< token models, optional (NULL with prefix_len
                                  NULL: nothing shared): n row indices,
                                  0 <= prefix_row[i] < i wherever
                                  prefix_len[i] > 0 (ignored where it is 0) */
  const int32_t *prefix_len; /**< n counts: 0 <= prefix_len[i] <=
                                  min(lengths[i], lengths[prefix_row[i]]);
                                  prefix_len[0] must be 0 */
} prm_batch;

#define PRM_BATCH_INIT { PRM_BATCH_VERSION, 0, NULL, 0, 0, NULL, 0, NULL, NULL, NULL }

/** Fill *batch with an empty batch of struct version `version`.
 *  @return PRM_OK, PRM_ERR_NULL, PRM_ERR_VERSION. */
PRM_API int prm_batch_init(prm_batch *batch, uint32_t version);

/**
 * Gather n token sequences of different lengths into the rows of a token
 * batch: row i of dst (dst[i * stride .. i * stride + stride - 1]) receives
 * seqs[i][0 .. lengths[i] - 1] followed by `pad` up to the row's end. Then
 * prm_batch.tokens = dst, token_stride = stride, lengths = lengths. Saves
 * a foreign-language host the per-row copy loop (see docs/api.md,
 * Batches).
 * @param dst      caller buffer of n * stride int32_t ids; must not overlap
 *                 the sequences.
 * @param stride   ids per row (>= 1), e.g. the context's max_len.
 * @param n        rows; 0 does nothing (the pointers may then be NULL).
 * @param seqs     n pointers to the sequences (borrowed).
 * @param lengths  n lengths, each in [1, stride].
 * @param pad      the id written after each sequence (never read by a
 *                 forward; any value).
 * Ids are copied as they are: prm_ctx_forward checks them against the
 * vocabulary.
 * @return PRM_OK, PRM_ERR_NULL (dst, seqs, lengths or a seqs[i]),
 *         PRM_ERR_SIZE (stride 0, a length outside [1, stride], n * stride
 *         ids beyond the address space). dst is not written on failure;
 *         the message (thread only) names the first bad row.
 * Thread-safe (pure).
 */
PRM_API int prm_tokens_gather(int32_t *dst, uint64_t stride, uint64_t n,
                              const int32_t *const *seqs,
                              const int32_t *lengths, int32_t pad);

/* ------------------------------------------------------------------------ */
/* Contexts                                                                  */
/* ------------------------------------------------------------------------ */

typedef struct prm_ctx prm_ctx;

#define PRM_CTX_OPTIONS_VERSION 2

/**
 * One piece of a context's parallel work: run task number `task` on worker
 * `worker`. Called by the host's prm_parallel_for_fn (never by the host
 * directly). Never fails; returns when the piece is done.
 */
typedef void (*prm_task_fn)(void *task_arg, uint32_t task, uint32_t worker);

/**
 * The host's parallel loop, for contexts that run on several threads
 * (prm_ctx_options version 2). It must call task(task_arg, t, w) exactly
 * once for every t in [0, n_tasks) -- in any order, on any threads,
 * including the calling one -- and return only when every call has
 * returned. w, in [0, n_workers) of the context's options, names the worker
 * making the call: no two calls that overlap in time may share a w (the
 * context keeps scratch memory per worker). The library never creates
 * threads; it calls this from inside prm_ctx_forward, prm_ctx_backward and
 * the one-call steps, on the thread that called them. prm_pool_parallel_for
 * is a ready-made implementation (a pthreads pool).
 */
typedef void (*prm_parallel_for_fn)(void *parallel_arg, uint32_t n_tasks, prm_task_fn task,
                                    void *task_arg);

/** Context configuration. Initialise with prm_ctx_options_init. */
typedef struct prm_ctx_options {
  uint32_t version;   /**< PRM_CTX_OPTIONS_VERSION */
  int32_t inference;  /**< non-zero: scoring only; no activation history and
                           no gradient memory; backward is refused */
  uint64_t max_rows;  /**< most rows one forward may take (>= 1; a pair
                           batch of P pairs needs 2P) */
  uint64_t max_len;   /**< token models: longest sequence (0: the model's
                           n_ctx); buffers hold max_rows * max_len tokens */
  /* version 2: threads (token models; feature models run on the caller) */
  uint32_t n_workers; /**< workers parallel_for may run at once, 1..1024
                           (0 means 1); per-worker scratch is allocated
                           for each */
  prm_parallel_for_fn parallel_for; /**< NULL: everything runs on the
                           calling thread. Results are bit-identical for
                           any parallel_for and any n_workers: the work is
                           cut into the same pieces, summed in the same
                           order, whoever runs them */
  void *parallel_arg; /**< passed to parallel_for (borrowed; e.g. a
                           prm_pool) */
} prm_ctx_options;

#define PRM_CTX_OPTIONS_INIT { PRM_CTX_OPTIONS_VERSION, 0, 0, 0, 1, NULL, NULL }

/** Fill *opts with defaults (training context, sizes 0).
 *  @return PRM_OK, PRM_ERR_NULL, PRM_ERR_VERSION. */
PRM_API int prm_ctx_options_init(prm_ctx_options *opts, uint32_t version);

/**
 * Create a context for `model`. All memory a forward/backward needs for up to
 * opts->max_rows rows is allocated here; later calls never allocate. The
 * model is borrowed: it must outlive every use of the context.
 *
 * Memory, in fp32 floats, with R = max_rows (linear/mlp: d = input_size,
 * h_l = hidden widths, w = the widest; gpt2: T = max_len, C = n_embd,
 * L = n_layer, NH = n_head), linear in every size:
 *   mlp inference:  2 R w                 (linear: 0)
 *   mlp training:   R d + 2 R w + 2 R sum(h_l) + trainable parameters
 *   gpt2 training:  R T [(L-1)(16C + 4 + NH) + 14C + 2] + R (19C + 4 + NH)
 *                   + 64 T + trainable parameters
 *   gpt2 inference: R T (12C + 4 + NH) + R (13C + 4 + NH) + 64 T   (L >= 2)
 *                   R T (5C + 2)       + R (13C + 4 + NH) + 64 T   (L = 1)
 * plus 2R floats of scores (R for inference) and, for gpt2, R T int32 ids.
 * docs/gpt2.md explains each term; llama's formula is in docs/llama.md
 * (also linear in max_rows * max_len). PRM_ERR_NOMEM's message says how many
 * MiB were needed, for activations and for gradients.
 * @param out  receives the context (caller owns), NULL on failure.
 * @return PRM_OK, PRM_ERR_NULL, PRM_ERR_VERSION, PRM_ERR_INVALID (max_rows
 *         0, max_len > n_ctx, more than 2^30 tokens), PRM_ERR_NOMEM. The
 *         message goes to the thread and to the model (prm_model_errmsg).
 * Thread-safe; many contexts may share one model.
 */
PRM_API int prm_ctx_new(prm_ctx **out, const prm_model *model,
                        const prm_ctx_options *opts);

/**
 * A pool of threads for prm_ctx_options.parallel_for, for hosts that have no
 * thread pool of their own: n_workers workers, the thread that calls
 * prm_pool_parallel_for being one of them and n_workers - 1 pthreads the
 * others (created here, idle between loops).
 * @param out  receives the pool (caller owns; prm_pool_free), NULL on
 *             failure.
 * @param n_workers  1..1024 (1: no thread is created).
 * @return PRM_OK, PRM_ERR_NULL, PRM_ERR_INVALID (n_workers),
 *         PRM_ERR_NOMEM (memory or threads). Thread message only.
 * Thread-safe.
 */
typedef struct prm_pool prm_pool;
PRM_API int prm_pool_new(prm_pool **out, uint32_t n_workers);

/** Stop and join the pool's threads, then release it. NULL is a no-op. No
 *  loop may be running on it, and no context may use it afterwards. */
PRM_API void prm_pool_free(prm_pool *pool);

/** Workers of a pool (the n_workers to put in prm_ctx_options); 0 for NULL. */
PRM_API uint32_t prm_pool_size(const prm_pool *pool);

/**
 * A prm_parallel_for_fn over a prm_pool (pass the pool as parallel_arg).
 * Loops from several host threads (contexts sharing one pool) run one after
 * the other: each call waits for the pool. Tasks are handed out in order,
 * one at a time, to whichever worker is free.
 */
PRM_API void prm_pool_parallel_for(void *pool, uint32_t n_tasks, prm_task_fn task,
                                   void *task_arg);

/** Release a context. NULL is a no-op. Reads nothing of the model, so it
 *  may come before or after prm_model_free. Other threads may go on using
 *  the model (and their own contexts) meanwhile. */
PRM_API void prm_ctx_free(prm_ctx *ctx);

/** The model this context was created for (NULL for NULL). */
PRM_API const prm_model *prm_ctx_model(const prm_ctx *ctx);
/** Most rows one forward may take (prm_ctx_options.max_rows); 0 for NULL. */
PRM_API uint64_t prm_ctx_max_rows(const prm_ctx *ctx);
/** Longest sequence of a token model's context (max_len after its default:
 *  the model's n_ctx); 0 for feature models and for NULL. */
PRM_API uint64_t prm_ctx_max_len(const prm_ctx *ctx);
/** 1 for an inference context, 0 for a training context and for NULL. */
PRM_API int32_t prm_ctx_is_inference(const prm_ctx *ctx);
/** Gradients the context holds: the trainable parameters of its model when
 *  it was created (the count prm_ctx_grads reports); 0 for an inference
 *  context and for NULL. */
PRM_API uint64_t prm_ctx_num_grads(const prm_ctx *ctx);
/** Tokens the last successful forward of a token model ran through the
 *  network: the batch's tokens less those of shared prefixes, each shared
 *  prefix counted once (prm_batch, version 2). 0 for feature models, before
 *  the first forward and for NULL. A failed forward leaves it unchanged.
 *  Shows whether a declaration took effect, and what a batch costs. */
PRM_API uint64_t prm_ctx_tokens_computed(const prm_ctx *ctx);

/**
 * Detail of the most recent failing call that took this context as an
 * argument, const or not (prm_ctx_forward, prm_optimizer_step,
 * prm_train_step, prm_ctx_read_grads, ...; the rule at the top of this
 * header). Successes never clear it; "" until the first failure; "" for a
 * NULL context. Never NULL. The pointer is the context's own buffer, valid
 * until prm_ctx_free; the next failing call involving the context
 * overwrites it. Same thread rule as every call on a context: one thread at
 * a time.
 */
PRM_API const char *prm_ctx_errmsg(const prm_ctx *ctx);

/**
 * Score a batch: scores[i] = r(row i). A training context also keeps the
 * activations for one following prm_ctx_backward.
 * @param scores    caller buffer of n_scores >= batch->n floats.
 * @return PRM_OK, PRM_ERR_NULL, PRM_ERR_VERSION, PRM_ERR_SIZE (n_features
 *         differs from the model, n == 0, n > max_rows, n_scores < n,
 *         row_stride < n_features; gpt2: a length outside [1, max_len] or
 *         above token_stride), PRM_ERR_NONFINITE (NaN/Inf feature),
 *         PRM_ERR_INVALID (gpt2: a token id outside [0, vocab_size)).
 * The features are copied into the context (training) so the caller may
 * reuse its buffer before prm_ctx_backward. On any failure, `scores` is not
 * written and a pending forward stays ready for its backward (NaN/Inf
 * features included: the scores reach the caller only on success).
 * A model whose parameters overflow can yield NaN/Inf scores from finite
 * features; they are returned as they are (PRM_OK) and prm_loss_bt rejects
 * them.
 * Thread-safety: one call at a time per context; the model may be shared.
 */
PRM_API int prm_ctx_forward(prm_ctx *ctx, const prm_batch *batch,
                            float *scores, uint64_t n_scores);

/**
 * Back-propagate d(loss)/d(scores) of the last forward and ADD the parameter
 * gradients into the context's accumulator (prm_ctx_grads). Several
 * forward/backward rounds accumulate until prm_ctx_zero_grad or an optimizer
 * step clears them. Each forward allows one backward.
 * @param dscores  n finite floats, n equal to the last forward's batch->n.
 * @return PRM_OK, PRM_ERR_NULL, PRM_ERR_STATE (inference context, or no
 *         forward to back-propagate), PRM_ERR_SIZE, PRM_ERR_NONFINITE.
 */
PRM_API int prm_ctx_backward(prm_ctx *ctx, const float *dscores, uint64_t n);

/** Set the gradient accumulator to zero. @return PRM_OK, PRM_ERR_NULL,
 *  PRM_ERR_STATE (inference context). */
PRM_API int prm_ctx_zero_grad(prm_ctx *ctx);

/**
 * Flat view of the gradient accumulator: the layout of prm_model_params from
 * the trainable offset on (index j holds the gradient of parameter
 * prm_model_trainable_offset() + j; with everything trainable, of parameter
 * j). Valid until prm_ctx_free. The host may read and write it (e.g.
 * MPI_Allreduce between steps).
 * @param n  optional; receives the element count (trainable parameters;
 *           0 when NULL is returned).
 * @return the array, or NULL for a NULL context (message to the thread) or
 *         an inference context, which holds no gradients (message to the
 *         context and the thread: prm_ctx_errmsg, prm_last_errmsg).
 */
PRM_API float *prm_ctx_grads(prm_ctx *ctx, uint64_t *n);

/*
 * Copying gradients in and out: the accumulator of prm_ctx_grads, as flat
 * slices of its layout (index j is the gradient of parameter
 * prm_model_trainable_offset() + j, as the trainable set was when the
 * context was created) or per tensor. The rules of the parameter copies
 * hold: bounds checked without overflow, n = 0 slices copy nothing (the
 * buffer may then be NULL), writes copy all or nothing and refuse NaN/Inf,
 * failures change nothing. Messages go to the thread and to the context.
 * Every call, reads included, follows the rule of every call on a context:
 * one thread at a time. Inference contexts hold no gradients:
 * PRM_ERR_STATE.
 */

/**
 * Copy gradients [offset, offset + n) into dst.
 * @return PRM_OK, PRM_ERR_NULL (ctx; dst with n > 0), PRM_ERR_STATE
 *         (inference context), PRM_ERR_SIZE (the slice reaches past
 *         prm_ctx_num_grads()).
 */
PRM_API int prm_ctx_read_grads(const prm_ctx *ctx, uint64_t offset, float *dst,
                               uint64_t n);

/**
 * Overwrite gradients [offset, offset + n) with src (e.g. the result of an
 * all-reduce done by the host); they are read by the next
 * prm_optimizer_step, and later backwards add to them.
 * @return PRM_OK, PRM_ERR_NULL (ctx; src with n > 0), PRM_ERR_STATE
 *         (inference context), PRM_ERR_SIZE, PRM_ERR_NONFINITE.
 */
PRM_API int prm_ctx_write_grads(prm_ctx *ctx, uint64_t offset, const float *src,
                                uint64_t n);

/**
 * Copy the gradient of model tensor `index` (prm_model_tensor_info's
 * numbering and shape) into dst.
 * @param n  must equal the tensor's element count.
 * @return PRM_OK, PRM_ERR_NULL (ctx, dst), PRM_ERR_STATE (inference
 *         context; a tensor that was frozen when the context was created:
 *         it has no gradient, the message says so), PRM_ERR_INVALID (index
 *         out of range), PRM_ERR_SIZE (n is not the element count).
 */
PRM_API int prm_ctx_read_grad(const prm_ctx *ctx, uint32_t index, float *dst,
                              uint64_t n);

/**
 * Overwrite the gradient of model tensor `index` with src.
 * @return as prm_ctx_read_grad with src for dst, and PRM_ERR_NONFINITE.
 */
PRM_API int prm_ctx_write_grad(prm_ctx *ctx, uint32_t index, const float *src,
                               uint64_t n);

/* ------------------------------------------------------------------------ */
/* Pairwise losses (pure functions)                                          */
/* ------------------------------------------------------------------------ */

#define PRM_LOSS_OPTIONS_VERSION 2

/** Tie models of the pair loss (prm_loss_options.tie_model). Values pinned. */
typedef enum prm_tie_model {
  PRM_TIE_NONE = 0,       /**< plain Bradley-Terry: no pair can be a tie */
  PRM_TIE_RAO_KUPPER = 1, /**< Rao-Kupper, threshold theta = tie_param >= 1 */
  PRM_TIE_DAVIDSON = 2    /**< Davidson, nu = tie_param >= 0 */
} prm_tie_model;

/**
 * Options of the pair loss. Every array has n_pairs elements and may be NULL
 * ("not given"). See docs/losses.md for the formulas. Version 1 ends after
 * center_coef; version 2 adds ties.
 */
typedef struct prm_loss_options {
  uint32_t version;     /**< PRM_LOSS_OPTIONS_VERSION (1 or 2) */
  const float *margin;  /**< m_i: loss uses z_i = r_c - r_r - m_i (finite) */
  const float *label;   /**< p_i in [0,1]: soft target P(chosen wins); with
                             a tie model it splits the untied mass */
  const float *weight;  /**< w_i >= 0, finite: per-pair weight */
  double center_coef;   /**< c in [0, 1e30]: adds c * mean((r_c + r_r)^2)
                             (the bound keeps the loss finite for every
                             finite score; TRL's default is 0.01) */
  /* version 2 */
  int32_t tie_model;    /**< prm_tie_model; PRM_TIE_NONE (the default) is
                             Bradley-Terry and needs tie_param 0, tie NULL */
  double tie_param;     /**< finite; Rao-Kupper theta >= 1 (1: no ties) or
                             Davidson nu >= 0 (0: no ties) */
  const uint8_t *tie;   /**< t_i in {0, 1}: 1 = the labeller judged pair i
                             a tie (needs a tie model whose parameter allows
                             ties: theta > 1 / nu > 0); NULL = no ties */
} prm_loss_options;

#define PRM_LOSS_OPTIONS_INIT \
  { PRM_LOSS_OPTIONS_VERSION, NULL, NULL, NULL, 0.0, PRM_TIE_NONE, 0.0, NULL }

/** Fill *opts with defaults (plain Bradley-Terry).
 *  @return PRM_OK, PRM_ERR_NULL, PRM_ERR_VERSION. */
PRM_API int prm_loss_options_init(prm_loss_options *opts, uint32_t version);

#define PRM_LOSS_STATS_VERSION 2

/**
 * Statistics of a pair or group batch, filled by the loss functions and the
 * one-call paths. Version 1 ends after margin_mean; version 2 adds
 * calibration, ranking and tie statistics. Every field is finite; a mean
 * over an empty set is 0 (its count says so).
 *
 * "Compared pairs": for a pair batch the pairs not labelled a tie; for a
 * group batch every implied pair (a, b), a ranked above b, of every group.
 * Accuracy, margin_mean and calibration are over the compared pairs, each
 * counting once, unweighted, without margins. The predicted probability of
 * a compared pair is p = P(first wins | not a tie): s(r_a - r_b) for
 * Bradley-Terry, Davidson and rankings (also Plackett-Luce's pairwise
 * marginal), s(log P_win - log P_lose) for Rao-Kupper; its target y is the
 * soft label when given, else 1.
 */
typedef struct prm_loss_stats {
  uint32_t version;     /**< set by the caller: 1 or 2 */
  double loss;          /**< the loss value (as returned in *loss) */
  double accuracy;      /**< fraction of compared pairs with r_a > r_b;
                             equal scores count 1/2 */
  double reward_mean;   /**< mean of all rewards (2n of a pair batch) */
  double reward_std;    /**< population std of all rewards */
  double margin_mean;   /**< mean of r_a - r_b over compared pairs */
  /* version 2 */
  double brier;         /**< mean (p - y)^2 over compared pairs */
  double ece;           /**< expected calibration error of p: 10 bins of
                             width 0.1 ([0.9, 1] closed), each compared pair
                             entered twice, as (p, y) and (1 - p, 1 - y), so
                             the result does not depend on which response a
                             pair lists first; sum over bins of
                             |sum p - sum y| / (2 n_compared) */
  double exact_rate;    /**< fraction of groups ranked exactly right
                             (r_1 > r_2 > ... > r_K, strict); pair batch:
                             of untied pairs with r_c > r_r */
  double tie_prob_tied; /**< mean model P(tie) over the pairs labelled a
                             tie (0 without a tie model) */
  double tie_prob_untied; /**< mean model P(tie) over the other pairs */
  uint64_t n_compared;  /**< compared pairs (see above) */
  uint64_t n_tied;      /**< pairs labelled a tie */
} prm_loss_stats;

#define PRM_LOSS_STATS_INIT { PRM_LOSS_STATS_VERSION, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0 }

/** Fill *stats with zeros for struct version `version`.
 *  @return PRM_OK, PRM_ERR_NULL, PRM_ERR_VERSION. */
PRM_API int prm_loss_stats_init(prm_loss_stats *stats, uint32_t version);

/**
 * The pair loss: Bradley-Terry with optional margin, soft label, weight and
 * reward centring, extended to ties by a tie model (Rao-Kupper or Davidson;
 * loss options version 2):
 *   z_i = r_c[i] - r_r[i] - m_i
 *   Bradley-Terry:  l_i = -(p_i log s(z_i) + (1 - p_i) log s(-z_i))
 *   with ties:      l_i = -log P_tie(z_i)                          if t_i = 1
 *                   l_i = -(p_i log P_win(z_i) + (1 - p_i) log P_lose(z_i))
 *   loss = (1/n) sum_i w_i l_i + c (1/n) sum_i (r_c[i] + r_r[i])^2
 * (p_i = 1 without labels; P_win, P_lose, P_tie of each model are in
 * docs/losses.md). Computed in double in log space; finite for any finite
 * input. theta = 1 / nu = 0 give Bradley-Terry exactly.
 * @param r_chosen    n_pairs finite scores of the chosen responses (borrowed).
 * @param r_rejected  n_pairs finite scores of the rejected responses.
 * @param n_pairs     number of pairs (>= 1).
 * @param opts        optional (NULL: plain Bradley-Terry); version 1 or 2.
 * @param loss        optional; receives the loss.
 * @param stats       optional; stats->version must be set by the caller;
 *                    only the fields of that version are written.
 * @param d_chosen    optional (with d_rejected: both or neither); receives
 *                    d(loss)/d(r_c[i]). May not alias the inputs.
 * @param d_rejected  optional; receives d(loss)/d(r_r[i]).
 * The loss and statistics are finite for every accepted input; a gradient
 * beyond the float range (only reward centring with scores near FLT_MAX
 * gets there) saturates at +-FLT_MAX.
 * @return PRM_OK, PRM_ERR_NULL, PRM_ERR_SIZE (n_pairs 0), PRM_ERR_NONFINITE
 *         (NaN/Inf score or option value), PRM_ERR_INVALID (label outside
 *         [0,1], negative weight, center_coef outside [0, 1e30], only one
 *         gradient pointer, unknown tie_model, tie_param out of its range,
 *         a tie flag other than 0/1, tie flags or a tie_param without a tie
 *         model, a tie flagged while theta = 1 / nu = 0), PRM_ERR_VERSION.
 *         Outputs are untouched on failure.
 * Thread-safe (pure; uses no state besides the thread's error message).
 */
PRM_API int prm_loss_bt(const float *r_chosen, const float *r_rejected,
                        uint64_t n_pairs, const prm_loss_options *opts,
                        double *loss, prm_loss_stats *stats,
                        float *d_chosen, float *d_rejected);

/* ------------------------------------------------------------------------ */
/* K-wise ranking losses (pure functions)                                    */
/* ------------------------------------------------------------------------ */

/**
 * A group batch holds G groups of K_g >= 2 responses to one prompt each, K_g
 * free per group, ranked best first. Its rows are the groups back to back:
 * rows 0..K_0-1 are group 0 (row 0 its best response), the next K_1 rows
 * group 1, and so on -- N = sum K_g rows in an ordinary prm_batch, so feature
 * and token models take it unchanged and padding costs nothing. The group
 * sizes travel beside the batch as an int32_t array of G entries.
 */

/** Ranking losses (prm_rank_options.loss). Values pinned. */
typedef enum prm_rank_loss {
  PRM_RANK_PAIRWISE = 1,      /**< InstructGPT: mean over the K(K-1)/2 pairs */
  PRM_RANK_PLACKETT_LUCE = 2  /**< listwise Plackett-Luce, per choice */
} prm_rank_loss;

#define PRM_RANK_OPTIONS_VERSION 1

/** Options of the ranking loss. Initialise with prm_rank_options_init. */
typedef struct prm_rank_options {
  uint32_t version;     /**< PRM_RANK_OPTIONS_VERSION */
  int32_t loss;         /**< prm_rank_loss (default PRM_RANK_PAIRWISE) */
  const float *weight;  /**< optional: w_g >= 0, finite, one per group */
} prm_rank_options;

#define PRM_RANK_OPTIONS_INIT { PRM_RANK_OPTIONS_VERSION, PRM_RANK_PAIRWISE, NULL }

/** Fill *opts with defaults (InstructGPT pairwise, unweighted).
 *  @return PRM_OK, PRM_ERR_NULL, PRM_ERR_VERSION. */
PRM_API int prm_rank_options_init(prm_rank_options *opts, uint32_t version);

/**
 * K-wise ranking loss over a group batch's scores (r_g,1 best .. r_g,K worst):
 *   pairwise:       l_g = (2 / (K(K-1))) sum_{a<b} -log s(r_g,a - r_g,b)
 *   Plackett-Luce:  l_g = (1 / (K-1)) sum_{k<K} -(r_g,k - log sum_{j>=k} e^{r_g,j})
 *   loss = (1/G) sum_g w_g l_g
 * Every group counts equally whatever its K (w_g = K_g - 1 restores the
 * plain Plackett-Luce negative log-likelihood). For K = 2 both equal
 * Bradley-Terry. Computed in double, stably; finite for any finite input.
 * Costs O(sum K_g^2).
 * @param scores       n_scores finite scores, the groups back to back.
 * @param n_scores     must equal sum of group_sizes.
 * @param group_sizes  n_groups sizes K_g >= 2.
 * @param n_groups     G >= 1.
 * @param opts         optional (NULL: pairwise, unweighted).
 * @param loss         optional; receives the loss.
 * @param stats        optional; stats->version set by the caller. Version 2
 *                     adds exact_rate and calibration (see prm_loss_stats).
 * @param d_scores     optional; receives d(loss)/d(scores[i]), n_scores
 *                     floats. May not alias the inputs.
 * @return PRM_OK, PRM_ERR_NULL, PRM_ERR_SIZE (n_groups 0, a K_g < 2, sizes
 *         not summing to n_scores), PRM_ERR_NONFINITE, PRM_ERR_INVALID
 *         (unknown loss, negative weight), PRM_ERR_VERSION. Outputs are
 *         untouched on failure. Thread-safe (pure).
 */
PRM_API int prm_loss_rank(const float *scores, uint64_t n_scores,
                          const int32_t *group_sizes, uint64_t n_groups,
                          const prm_rank_options *opts, double *loss,
                          prm_loss_stats *stats, float *d_scores);

/* ------------------------------------------------------------------------ */
/* Optimizers                                                                */
/* ------------------------------------------------------------------------ */

typedef struct prm_optimizer prm_optimizer;

/** Optimizer algorithms. Values pinned. */
typedef enum prm_opt_algo {
  PRM_OPT_SGD = 1,   /**< SGD with optional (Nesterov) momentum, L2 decay */
  PRM_OPT_ADAM = 2,  /**< Adam, weight decay added to the gradient (L2) */
  PRM_OPT_ADAMW = 3  /**< AdamW, decoupled weight decay */
} prm_opt_algo;

/** Learning-rate schedules. Values pinned. */
typedef enum prm_schedule {
  PRM_SCHED_CONSTANT = 1, /**< lr, after optional linear warm-up */
  PRM_SCHED_LINEAR = 2,   /**< warm-up, then linear decay to min_lr */
  PRM_SCHED_COSINE = 3    /**< warm-up, then cosine decay to min_lr */
} prm_schedule;

#define PRM_OPTIMIZER_OPTIONS_VERSION 1

/** Optimizer configuration. Initialise with prm_optimizer_options_init. */
typedef struct prm_optimizer_options {
  uint32_t version;       /**< PRM_OPTIMIZER_OPTIONS_VERSION */
  int32_t algorithm;      /**< prm_opt_algo (default AdamW) */
  double lr;              /**< peak learning rate (default 1e-3) */
  double beta1;           /**< Adam(W) (default 0.9) */
  double beta2;           /**< Adam(W) (default 0.999) */
  double eps;             /**< Adam(W) (default 1e-8); > 0 as a float, so at
                               least 1.4e-45 (the update runs in float) */
  double weight_decay;    /**< (default 0) */
  double momentum;        /**< SGD (default 0) */
  int32_t nesterov;       /**< SGD: non-zero for Nesterov momentum */
  int32_t no_decay_1d;    /**< non-zero: 1-D tensors (biases) get no decay */
  double max_grad_norm;   /**< global L2 clipping; 0 = off (default) */
  int32_t schedule;       /**< prm_schedule (default constant) */
  uint32_t accumulation_steps; /**< apply an update every k-th step call
                                    with the accumulated gradient / k
                                    (default 1) */
  uint64_t warmup_steps;  /**< linear warm-up from 0 over this many updates */
  uint64_t total_steps;   /**< linear/cosine: updates until min_lr */
  double min_lr;          /**< floor of linear/cosine decay (default 0) */
} prm_optimizer_options;

#define PRM_OPTIMIZER_OPTIONS_INIT \
  { PRM_OPTIMIZER_OPTIONS_VERSION, PRM_OPT_ADAMW, 1e-3, 0.9, 0.999, 1e-8, \
    0.0, 0.0, 0, 0, 0.0, PRM_SCHED_CONSTANT, 1, 0, 0, 0.0 }

/** Fill *opts with the defaults above.
 *  @return PRM_OK, PRM_ERR_NULL, PRM_ERR_VERSION. */
PRM_API int prm_optimizer_options_init(prm_optimizer_options *opts,
                                       uint32_t version);

/**
 * Create an optimizer that updates `model` (borrowed: it must outlive every
 * use of the optimizer). Moments are allocated here. Options are checked in
 * the precision the update uses: every real-valued option must be finite as
 * a float (|x| <= FLT_MAX) and eps must stay > 0 when rounded to float.
 * On failure the message goes to the calling thread (prm_last_errmsg) and
 * to the model (prm_model_errmsg), which this call takes non-const.
 * @return PRM_OK, PRM_ERR_NULL, PRM_ERR_VERSION, PRM_ERR_INVALID (unknown
 *         algorithm or schedule, lr < 0, betas outside [0,1), eps that is
 *         0 as a float, a value not finite as a float, negative
 *         decay/momentum/clip, Nesterov without momentum,
 *         accumulation_steps 0, linear/cosine without total_steps, with
 *         warmup_steps > total_steps or min_lr > lr), PRM_ERR_NOMEM.
 */
PRM_API int prm_optimizer_new(prm_optimizer **out, prm_model *model,
                              const prm_optimizer_options *opts);

/** Release an optimizer. NULL is a no-op. Reads nothing of the model, so it
 *  may come before or after prm_model_free. */
PRM_API void prm_optimizer_free(prm_optimizer *opt);

/**
 * One optimizer step from the gradients accumulated in `ctx` (a training
 * context of the same model). With accumulation_steps k, calls 1..k-1 of each
 * cycle only count; call k applies the update using the accumulated gradient
 * divided by k. After an applied update the context's gradients are zeroed.
 * Order of an update: check gradients (any NaN/Inf: return
 * PRM_ERR_NONFINITE_GRAD, change nothing, gradients kept for inspection),
 * scale by 1/k, clip to max_grad_norm, compute the scheduled lr, check that
 * the update leaves every parameter and moment finite (finite gradients can
 * still overflow float, e.g. a huge lr times a large gradient: also
 * PRM_ERR_NONFINITE_GRAD, nothing changed), update. A step never writes a
 * non-finite parameter.
 * @return PRM_OK, PRM_ERR_NULL, PRM_ERR_MISMATCH (ctx of another model),
 *         PRM_ERR_STATE (inference context), PRM_ERR_NONFINITE_GRAD. The
 *         message goes to the optimizer, the context and the thread.
 * Not thread-safe with other calls that use the model.
 */
PRM_API int prm_optimizer_step(prm_optimizer *opt, prm_ctx *ctx);

/** Number of updates applied so far (0 for NULL). */
PRM_API uint64_t prm_optimizer_num_updates(const prm_optimizer *opt);

/** Learning rate the next update will use: the schedule at the current
 *  update applied to the base lr, times the lr scale (see below); 0 for
 *  NULL. */
PRM_API double prm_optimizer_lr(const prm_optimizer *opt);

/**
 * Replace the base learning rate (prm_optimizer_options.lr) for every later
 * update. The schedule still applies on top of it, at the optimizer's
 * current position: warm-up rises to the new lr, linear/cosine decay falls
 * from it to min_lr over what is left of total_steps. Updates already
 * applied and the moments are untouched. The new lr is what
 * prm_optimizer_save writes as "lr".
 * @param lr  >= 0 and finite as a float, as in the options; with a linear
 *            or cosine schedule at least min_lr; and lr * the current lr
 *            scale finite as a float.
 * @return PRM_OK, PRM_ERR_NULL, PRM_ERR_INVALID (the optimizer unchanged;
 *         message to the optimizer and the thread).
 * Not thread-safe with other calls on the optimizer.
 */
PRM_API int prm_optimizer_set_lr(prm_optimizer *opt, double lr);

/**
 * Multiply the scheduled learning rate of every later update by `scale`
 * (default 1), e.g. for a host's reduce-on-plateau rule or a manual
 * cool-down, without touching the schedule: the rate of update t is
 * schedule(t) * scale. A scale of exactly 1 leaves every update bit for bit
 * as without this call. Saved and loaded with the optimizer's state
 * (prm_optimizer_save writes it as "lr_scale" when it is not 1).
 * @param scale  finite and >= 0 (0 freezes the parameters while moments
 *               still update); the base lr times scale must be finite as a
 *               float.
 * @return PRM_OK, PRM_ERR_NULL, PRM_ERR_INVALID (the optimizer unchanged;
 *         message to the optimizer and the thread).
 * Not thread-safe with other calls on the optimizer.
 */
PRM_API int prm_optimizer_set_lr_scale(prm_optimizer *opt, double scale);

/** The lr scale of prm_optimizer_set_lr_scale (1 unless set or loaded);
 *  0 for NULL. */
PRM_API double prm_optimizer_lr_scale(const prm_optimizer *opt);

/** Global L2 norm of the gradient used by the last applied update, before
 *  clipping (0 before the first update or for NULL). */
PRM_API double prm_optimizer_last_grad_norm(const prm_optimizer *opt);

/**
 * Detail of the most recent failing call that took this optimizer as an
 * argument, const or not (prm_optimizer_step, prm_train_step,
 * prm_optimizer_save, prm_optimizer_set_lr, ...; the rule at the top of
 * this header). Successes never clear it; "" until the first failure; ""
 * for a NULL optimizer. Never NULL.
 * As for models, the message is written under a lock in the optimizer
 * (saves may run on several threads at once) and this function returns a
 * copy made under it in thread-local storage, valid until the calling
 * thread's next prm_optimizer_errmsg call or its exit. Thread-safe.
 */
PRM_API const char *prm_optimizer_errmsg(const prm_optimizer *opt);

/* ---- Saving and resuming (safetensors, F32) ---- */

/**
 * Save the optimizer's state as a safetensors file: every
 * prm_optimizer_options field (lr: the base rate as last set by
 * prm_optimizer_set_lr), the lr scale when it is not 1 (the file then says
 * "optimizer_version" 2, which libraries before 0.4 refuse instead of
 * dropping the scale; states without a scale stay version 1 and read
 * everywhere), the number of applied updates, the position
 * in the accumulation cycle, the last gradient norm, the model it fits
 * (architecture, parameter count, trainable offset) as `__metadata__`
 * strings, and the moments of the trainable tensors as F32 tensors named as
 * in PyTorch's optimizer state: "exp_avg.<param>" and "exp_avg_sq.<param>"
 * (Adam, AdamW), "momentum_buffer.<param>" (SGD with momentum; plain SGD
 * has none). docs/checkpoint-format.md has the layout.
 *
 * With the model saved by prm_model_save, prm_model_load +
 * prm_optimizer_load resume the run bit-exactly: the next steps write the
 * same parameters as an uninterrupted run. The gradients of an unfinished
 * accumulation cycle belong to the context, not to the optimizer: save
 * between cycles, or carry prm_ctx_grads over yourself
 * (docs/optimizers.md, "Saving and resuming").
 *
 * Atomic and durable exactly as prm_model_save (a "<path>.tmp" that is
 * fsynced and renamed, the same rules for that name and for concurrent
 * saves to one path).
 * @return PRM_OK; PRM_ERR_NULL; PRM_ERR_NOMEM; PRM_ERR_IO (as
 *         prm_model_save). Details in prm_last_errmsg() and
 *         prm_optimizer_errmsg().
 * Reads the optimizer and its model; do not run it concurrently with
 * prm_optimizer_step on the same optimizer. Thread-safe otherwise.
 */
PRM_API int prm_optimizer_save(const prm_optimizer *opt, const char *path);

/**
 * Serialise the optimizer's state to a caller buffer (the same bytes as
 * prm_optimizer_save). Call with buf == NULL to learn the size: *size_out
 * receives the exact byte count. With a buffer, `capacity` must be at
 * least that size.
 * @return PRM_OK, PRM_ERR_NULL (opt or size_out), PRM_ERR_SIZE (capacity
 *         too small; *size_out still receives the needed size),
 *         PRM_ERR_NOMEM. Details in prm_last_errmsg() and
 *         prm_optimizer_errmsg().
 */
PRM_API int prm_optimizer_save_buffer(const prm_optimizer *opt, void *buf,
                                      size_t capacity, size_t *size_out);

/**
 * Create an optimizer for `model` from a state written by
 * prm_optimizer_save: the options, counters, lr scale and moments of the
 * saved optimizer (a version-1 state, e.g. written by 0.3, has lr scale 1). `model` is borrowed as by prm_optimizer_new; its parameters
 * are not read or written (load them with prm_model_load).
 *
 * The state must fit the model: the same architecture and parameter count,
 * moments of the shapes of the model's tensors, and the same trainable set.
 * The trainable set is not changed here: prm_model_load restores it from a
 * model file (see prm_model_save), or call prm_model_set_trainable as in
 * the saved run before loading. Everything else is validated as for model
 * files (header bounds, offsets, overlaps, dtype F32, finite moments, no
 * missing or extra tensor, every key present and well-formed, options that
 * prm_optimizer_new would accept).
 * On failure the message goes to the calling thread (prm_last_errmsg) and,
 * when model is not NULL, to the model (prm_model_errmsg).
 * @param out   receives the optimizer (caller owns; prm_optimizer_free),
 *              NULL on failure.
 * @param path  opened without blocking and read as by prm_model_load.
 * @return PRM_OK, PRM_ERR_NULL, PRM_ERR_IO (as prm_model_load),
 *         PRM_ERR_MISMATCH (the state was saved for another model or
 *         another trainable set: the message says which), PRM_ERR_FORMAT
 *         (malformed file, a model checkpoint instead of an optimizer
 *         state, a missing or bad key, a missing or extra tensor, NaN/Inf
 *         moments), PRM_ERR_UNSUPPORTED (a state version newer than this
 *         library reads), PRM_ERR_NOMEM.
 * Not thread-safe with prm_optimizer_step or prm_model_set_trainable on
 * the same model; thread-safe with forward/backward on it.
 */
PRM_API int prm_optimizer_load(prm_optimizer **out, prm_model *model,
                               const char *path);

/** As prm_optimizer_load, from `size` bytes at `buf` (borrowed, not kept):
 *  the same validation and return codes, except that PRM_ERR_IO cannot
 *  occur. */
PRM_API int prm_optimizer_load_buffer(prm_optimizer **out, prm_model *model,
                                      const void *buf, size_t size);

/* ------------------------------------------------------------------------ */
/* One-call training and evaluation                                          */
/* ------------------------------------------------------------------------ */

/**
 * Forward a pair batch (batch->n = 2P rows: P chosen then P rejected) as one
 * batch, compute the pair loss (prm_loss_bt: Bradley-Terry, or a tie model
 * when loss_opts has one), back-propagate, and call
 * prm_optimizer_step. Equivalent to prm_ctx_forward + prm_loss_bt +
 * prm_ctx_backward + prm_optimizer_step.
 * @param loss_opts  optional (NULL: plain Bradley-Terry).
 * @param stats      optional; stats->version set by the caller.
 * The features are not copied: the batch is only read during the call.
 * @return any status of the four calls above, PRM_ERR_SIZE for an odd or zero
 *         batch->n, PRM_ERR_MISMATCH when opt and ctx belong to different
 *         models or predate a prm_model_set_trainable change, PRM_ERR_STATE
 *         for an inference context. Every failure's message goes to the
 *         context, the optimizer and the thread.
 * Failures, in order:
 *   1. Invalid arguments -- pointers, versions, the batch's sizes, stride
 *      and token ids, the loss options and stats version -- are all
 *      checked before anything runs: nothing changes, and a forward pending
 *      from prm_ctx_forward stays ready for its backward.
 *   2. Once the arguments are valid the forward runs and a pending forward
 *      is dropped, whatever follows. NaN/Inf features or scores
 *      (PRM_ERR_NONFINITE) then leave the gradients and the model
 *      unchanged.
 *   3. If the optimizer step fails (PRM_ERR_NONFINITE_GRAD) the model is
 *      unchanged and this batch's gradients stay accumulated in ctx (call
 *      prm_ctx_zero_grad to drop them).
 */
PRM_API int prm_train_step(prm_ctx *ctx, prm_optimizer *opt,
                           const prm_batch *pairs,
                           const prm_loss_options *loss_opts,
                           prm_loss_stats *stats);

/**
 * Forward a pair batch and compute loss statistics without gradients. Works
 * on training and inference contexts. Gradients and the model are
 * untouched. The same rule as prm_train_step for a pending forward:
 * invalid arguments (checked before anything runs, loss options included)
 * keep it; once the forward runs it is replaced, so after a call that got
 * that far -- successful or not -- prm_ctx_backward answers PRM_ERR_STATE.
 * @return as prm_ctx_forward and prm_loss_bt, PRM_ERR_SIZE for an odd or
 *         zero batch->n.
 */
PRM_API int prm_evaluate(prm_ctx *ctx, const prm_batch *pairs,
                         const prm_loss_options *loss_opts,
                         prm_loss_stats *stats);

/**
 * prm_train_step for a group batch (batch->n = sum K_g rows, the groups back
 * to back, each best first): forward, prm_loss_rank, backward and
 * prm_optimizer_step, with the same order of failures as prm_train_step
 * (arguments, group sizes and rank options are all checked before anything
 * runs). A batch whose N exceeds the context's max_rows is PRM_ERR_SIZE.
 * @return as prm_train_step and prm_loss_rank; PRM_ERR_SIZE when the group
 *         sizes do not sum to batch->n.
 */
PRM_API int prm_train_step_groups(prm_ctx *ctx, prm_optimizer *opt,
                                  const prm_batch *batch,
                                  const int32_t *group_sizes, uint64_t n_groups,
                                  const prm_rank_options *rank_opts,
                                  prm_loss_stats *stats);

/**
 * prm_evaluate for a group batch: forward and prm_loss_rank statistics, no
 * gradients. Same rules as prm_evaluate.
 */
PRM_API int prm_evaluate_groups(prm_ctx *ctx, const prm_batch *batch,
                                const int32_t *group_sizes, uint64_t n_groups,
                                const prm_rank_options *rank_opts,
                                prm_loss_stats *stats);

/* ---- Evaluation over many batches ---- */

#define PRM_EVAL_ACCUM_VERSION 1
#define PRM_EVAL_CALIB_BINS 10 /**< calibration bins of prm_loss_stats.ece */

/** What an accumulator holds (prm_eval_accum.kind). Values pinned. */
typedef enum prm_eval_kind {
  PRM_EVAL_EMPTY = 0,  /**< nothing yet */
  PRM_EVAL_PAIRS = 1,  /**< pair batches (prm_evaluate_accum) */
  PRM_EVAL_GROUPS = 2  /**< group batches (prm_evaluate_groups_accum) */
} prm_eval_kind;

/**
 * Sums and counts from which prm_eval_accum_stats gives every prm_loss_stats
 * field exactly as if all the accumulated pairs (or groups) had been one
 * batch: an evaluation set larger than a context's max_rows is streamed
 * through prm_evaluate_accum batch by batch. Initialise with
 * prm_eval_accum_init (or PRM_EVAL_ACCUM_INIT); the library maintains the
 * fields, which are public so a host can inspect or store them. "Compared
 * pairs" are those of prm_loss_stats.
 */
typedef struct prm_eval_accum {
  uint32_t version;     /**< PRM_EVAL_ACCUM_VERSION */
  int32_t kind;         /**< prm_eval_kind: set by the first batch; pairs and
                             groups do not mix */
  uint64_t n_units;     /**< pairs (pair batches) or groups accumulated */
  double loss_sum;      /**< sum over batches of loss * units: the loss of
                             the whole set is loss_sum / n_units (each
                             batch's loss averages over its pairs or
                             groups, so the weighting is per pair/group) */
  uint64_t n_rewards;   /**< rewards (rows) seen */
  double reward_mean;   /**< their mean */
  double reward_m2;     /**< sum of squared deviations from it (batches
                             merged by Chan, Golub and LeVeque's update) */
  uint64_t n_compared;  /**< compared pairs */
  double wins;          /**< compared pairs with r_a > r_b, plus 1/2 for
                             each with r_a = r_b */
  double margin_sum;    /**< sum of r_a - r_b over compared pairs */
  double brier_sum;     /**< sum of (p - y)^2 over compared pairs */
  double calib_p[PRM_EVAL_CALIB_BINS]; /**< ECE bins: sum of p (each pair
                             entered as (p, y) and (1 - p, 1 - y)) */
  double calib_y[PRM_EVAL_CALIB_BINS]; /**< ECE bins: sum of y */
  uint64_t n_exact;     /**< groups ranked exactly right (group batches) or
                             compared pairs with r_c > r_r (pair batches) */
  uint64_t n_tied;      /**< pairs labelled a tie */
  double tie_prob_tied_sum;   /**< sum of model P(tie) over tied pairs */
  double tie_prob_untied_sum; /**< ... over compared pairs */
} prm_eval_accum;

#define PRM_EVAL_ACCUM_INIT \
  { PRM_EVAL_ACCUM_VERSION, PRM_EVAL_EMPTY, 0, 0.0, 0, 0.0, 0.0, 0, 0.0, 0.0, \
    0.0, {0}, {0}, 0, 0, 0.0, 0.0 }

/** Fill *acc with an empty accumulator of struct version `version` (use it
 *  again to start over). @return PRM_OK, PRM_ERR_NULL, PRM_ERR_VERSION. */
PRM_API int prm_eval_accum_init(prm_eval_accum *acc, uint32_t version);

/**
 * prm_evaluate, adding the batch's statistics to *acc instead of writing
 * them: forward a pair batch (2P rows, P chosen then P rejected), compute
 * prm_loss_bt, merge. Call it once per batch of an evaluation set, then
 * prm_eval_accum_stats. Batches may use different loss options; each
 * batch's loss counts with its number of pairs.
 * @param acc  initialised accumulator, empty or holding pair batches
 *             (caller owns; only read and written during the call).
 * @return as prm_evaluate, plus PRM_ERR_NULL / PRM_ERR_VERSION for acc,
 *         PRM_ERR_INVALID (acc->kind is no prm_eval_kind), PRM_ERR_MISMATCH
 *         (acc holds group batches). On failure *acc is unchanged; the
 *         pending-forward rule of prm_evaluate holds (arguments, acc
 *         included, are checked before the forward). Messages go to the
 *         context and the thread.
 * One call at a time per context; distinct accumulators are independent.
 */
PRM_API int prm_evaluate_accum(prm_ctx *ctx, const prm_batch *pairs,
                               const prm_loss_options *loss_opts,
                               prm_eval_accum *acc);

/**
 * prm_evaluate_groups, accumulating: forward a group batch, compute
 * prm_loss_rank, merge into *acc (empty or holding group batches). Each
 * batch's loss counts with its number of groups.
 * @return as prm_evaluate_groups, plus the acc errors of
 *         prm_evaluate_accum (PRM_ERR_MISMATCH: acc holds pair batches).
 *         On failure *acc is unchanged.
 */
PRM_API int prm_evaluate_groups_accum(prm_ctx *ctx, const prm_batch *batch,
                                      const int32_t *group_sizes,
                                      uint64_t n_groups,
                                      const prm_rank_options *rank_opts,
                                      prm_eval_accum *acc);

/**
 * The statistics of everything accumulated, as prm_loss_bt / prm_loss_rank
 * would give them for one batch holding all the pairs (groups): loss =
 * loss_sum / n_units; accuracy, margin_mean, brier, ece, exact_rate,
 * tie_prob_* and the counts from their sums (exact up to the order of
 * floating-point additions: a relative difference of about 1e-15 from the
 * one-batch values); reward_mean and reward_std from the merged moments.
 * For a single accumulated batch every field except loss equals that
 * batch's prm_loss_stats bit for bit (loss may differ in the last bit: it
 * is (loss * P) / P).
 * @param out  out->version set by the caller (1 or 2): only the fields of
 *             that version are written.
 * @return PRM_OK, PRM_ERR_NULL, PRM_ERR_VERSION (acc or out),
 *         PRM_ERR_STATE (nothing accumulated), PRM_ERR_INVALID (acc->kind
 *         is no prm_eval_kind, or its counts contradict each other).
 *         *out is unchanged on failure. Thread-safe (reads acc only).
 */
PRM_API int prm_eval_accum_stats(const prm_eval_accum *acc,
                                 prm_loss_stats *out);

#ifdef __cplusplus
}
#endif

#endif /* PREFRM_H */
