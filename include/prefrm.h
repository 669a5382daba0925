/**
 * @file prefrm.h
 * @brief libprefrm: reward models trained from pairwise preferences.
 *
 * This header is the specification of the library; the browsable reference
 * (docs/reference/Doxyfile) is generated from it. Every function's comment
 * gives the same fields, in this order: what it does; its parameters
 * (`[in]`: read, borrowed for the call; `[out]`: written; `[in,out]`: both);
 * its result -- every status it returns and when, or the value of a getter;
 * and three paragraphs with the rules below:
 *  - **Errors**: which messages a failure writes.
 *  - **Thread safety**: one or more of the classes below.
 *  - **Ownership**: what the call keeps or hands back, and how long returned
 *    pointers and messages stay valid.
 *
 * @par Objects
 * All opaque, created by a prm_*_new or prm_*_load function and released by
 * the matching prm_*_free, which accepts NULL:
 *  - prm_model: architecture + parameters (fp32, one contiguous arena). Any
 *    number of contexts on any number of threads may read one model at once.
 *  - prm_ctx: everything a forward/backward call mutates: activations kept
 *    for backward, scratch and the gradient accumulator. One per thread.
 *    Sized at creation; no allocation after.
 *  - prm_optimizer: algorithm, hyper-parameters, schedule, moments, step
 *    counter.
 *
 * Loss functions (prm_loss_*) are pure functions over score arrays.
 *
 * @par Statuses
 * A function that can fail returns an int status: PRM_OK (0) or a negative
 * prm_status, and its comment lists each status it returns. The others do
 * not fail: getters return a value (0, or NULL, for a NULL handle) and write
 * no message, and the prm_*_free functions return nothing. Two getters
 * return NULL on failure instead of a status, and that NULL counts as a
 * failure (it writes a message): prm_model_params and prm_ctx_grads.
 * On failure nothing observable changes besides the messages: out-pointers
 * of constructors are set to NULL, caller buffers are not written, handles
 * are left as they were. The exceptions are named where they apply:
 *  - the one-call paths (prm_train_step, prm_evaluate, their group and
 *    accumulating variants), once their arguments are valid, run a forward,
 *    and a failure after that has replaced a forward pending from
 *    prm_ctx_forward;
 *  - when the optimizer step inside prm_train_step or prm_train_step_groups
 *    fails, the batch's gradients stay accumulated in the context (and the
 *    statistics were written);
 *  - the save_buffer functions report the size they need through
 *    *size_out when the buffer is too small;
 *  - a save whose final fsync of the directory fails has already replaced
 *    the file (the message says so).
 *
 * @par Error messages
 * Every failure writes a human-readable reason to the calling thread
 * (prm_last_errmsg), so calls without a handle (constructors, loss
 * functions) have one too, and to every model, context and optimizer that
 * the call takes as an argument, const or not (prm_model_errmsg,
 * prm_ctx_errmsg, prm_optimizer_errmsg): a failing prm_ctx_new,
 * prm_model_save or prm_model_tensor_info writes the model's; a failing
 * prm_train_step writes the context's and the optimizer's. A handle's
 * message thus describes the most recent failing call that involved it, on
 * whatever thread. Only a failure replaces it: a successful call never
 * clears or changes it, and it reads "" until the handle's first failure. A
 * NULL handle receives nothing, and handles reached only through another
 * (the model of a context during prm_ctx_forward) are not written. Each
 * function's **Errors** paragraph names the messages it writes. No global
 * state is shared between threads.
 *
 * @par Thread safety
 * The library has no global mutable state, and distinct handles are
 * independent. The **Thread safety** paragraphs use these classes:
 *  - **Thread-safe**: may run concurrently with any call on any thread,
 *    with the same handles or not (it reads only what no call changes, or
 *    takes a lock). No handle may be used during or after its prm_*_free.
 *  - **Model reader**: reads the model. Any number of model readers may run
 *    at once on one model, on any threads (those that also take a context
 *    each on their own context), never together with a model writer of
 *    that model.
 *  - **Model writer**: changes the model -- its parameters, its trainable
 *    set or its normalisation statistics -- and needs it to itself: no
 *    other call that uses the model, directly or through one of its
 *    contexts or optimizers, may run meanwhile, except the thread-safe
 *    calls, prm_ctx_free and prm_optimizer_free. The model writers:
 *    prm_optimizer_step, prm_train_step, prm_train_step_groups,
 *    prm_model_write_tensor, prm_model_write_params, writes through the
 *    pointer of prm_model_params, prm_model_set_trainable,
 *    prm_model_set_reward_norm and prm_model_free. (Creating or loading a
 *    model writes the parameters of a model that nobody holds yet.)
 *  - **Context call**: one call at a time per context, const calls
 *    included (the context's message buffer has no lock). Distinct contexts
 *    are independent.
 *  - **Optimizer reader / writer**: const calls on an optimizer (its
 *    getters and saves) may run together on any threads; a call that
 *    changes it (a step, prm_optimizer_set_lr, prm_optimizer_set_lr_scale,
 *    prm_optimizer_free) needs it to itself.
 *
 * A call often belongs to several classes: prm_ctx_forward is a context
 * call and a model reader. Results never depend on the number of threads.
 *
 * @par Ownership
 * Inputs are borrowed for the duration of the call only, unless a function
 * says otherwise (contexts and optimizers keep a pointer to their model
 * until they are freed). Outputs go to caller-provided buffers whose sizes
 * are passed in. What a constructor returns through its out-pointer
 * belongs to the caller. The library never prints, exits, aborts, or changes
 * BLAS thread settings.
 *
 * @par Versioned structs
 * Options, batches, statistics and reports begin with a uint32_t version
 * field. Initialise them with the matching prm_*_init function (or the
 * PRM_*_INIT macro from C). Fields are only ever appended; the library
 * reads and writes only the fields that exist in the version you pass.
 */
#ifndef PREFRM_H
#define PREFRM_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/**
 * @def PRM_API
 * Marks the functions the library exports: visibility "default" with GCC
 * and clang (the library is built with hidden visibility),
 * dllexport/dllimport on Windows, empty when PRM_STATIC_DEFINE is defined
 * before including this header (static linking on Windows).
 */
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

/**
 * @defgroup prm_version Version
 * The version of this header (macros) and of the linked library (functions).
 * @{
 */

/** Major part of the version of this header. */
#define PRM_VERSION_MAJOR 0
/** Minor part of the version of this header. */
#define PRM_VERSION_MINOR 5
/** Patch part of the version of this header. */
#define PRM_VERSION_PATCH 0
/** MAJOR * 10000 + MINOR * 100 + PATCH (500 for 0.5.0). */
#define PRM_VERSION_NUMBER \
  (PRM_VERSION_MAJOR * 10000 + PRM_VERSION_MINOR * 100 + PRM_VERSION_PATCH)
/** The version of this header as "MAJOR.MINOR.PATCH". */
#define PRM_VERSION_STRING "0.5.0"

/**
 * Runtime twin of PRM_VERSION_NUMBER: the version of the linked library.
 * @return MAJOR * 10000 + MINOR * 100 + PATCH of the library.
 * @par Errors
 * None: never fails.
 * @par Thread safety
 * Thread-safe.
 * @par Ownership
 * Nothing is kept.
 */
PRM_API uint32_t prm_version_number(void);
/**
 * Runtime twin of PRM_VERSION_STRING.
 * @return "MAJOR.MINOR.PATCH" of the library; never NULL.
 * @par Errors
 * None: never fails.
 * @par Thread safety
 * Thread-safe.
 * @par Ownership
 * Static storage, valid for the life of the process; do not free it.
 */
PRM_API const char *prm_version_string(void);

/** @} */

/* ------------------------------------------------------------------------ */
/* Status codes. Values are pinned forever; new codes are only appended.    */
/* ------------------------------------------------------------------------ */

/**
 * @defgroup prm_errors Statuses and messages
 * Status codes, their names, and the calling thread's last message. The
 * rules for messages are in prefrm.h ("Error messages"); the handles'
 * messages are prm_model_errmsg, prm_ctx_errmsg and prm_optimizer_errmsg.
 * @{
 */

/** Status codes. Values are pinned forever; new codes are only appended. */
typedef enum prm_status {
  PRM_OK = 0,                 /**< success */
  PRM_ERR_NULL = -1,          /**< a required pointer argument was NULL */
  PRM_ERR_INVALID = -2,       /**< an argument value is out of range */
  PRM_ERR_SIZE = -3,          /**< a count or buffer size does not match */
  PRM_ERR_NONFINITE = -4,     /**< NaN or Inf in input features, scores or
                                   other float inputs */
  PRM_ERR_VERSION = -5,       /**< a versioned struct has an unknown version */
  PRM_ERR_NOMEM = -6,         /**< memory allocation failed (or a size
                                   exceeds the address space) */
  PRM_ERR_STATE = -7,         /**< call not allowed in the object's state */
  PRM_ERR_MISMATCH = -8,      /**< objects that must belong together do not */
  PRM_ERR_IO = -9,            /**< open/read/write/rename of a file failed */
  PRM_ERR_FORMAT = -10,       /**< malformed or mismatched checkpoint */
  PRM_ERR_NONFINITE_GRAD = -11, /**< optimizer step saw NaN/Inf gradients, or
                                     an update that would overflow;
                                     parameters and state left unchanged */
  PRM_ERR_UNSUPPORTED = -12   /**< valid request this build cannot serve */
} prm_status;

/**
 * Name and meaning of a status code, such as "PRM_ERR_SIZE: size or
 * count mismatch".
 * @param[in] status  any int; need not be a prm_status.
 * @return a static string; never NULL ("unknown status" for codes that are
 *         not a prm_status).
 * @par Errors
 * None: never fails.
 * @par Thread safety
 * Thread-safe.
 * @par Ownership
 * Static storage, valid for the life of the process; do not free it.
 */
PRM_API const char *prm_status_string(int status);

/**
 * Detail message of the last failing library call made by the calling
 * thread.
 * @return the message, "" if no call on this thread has failed yet; never
 *         NULL.
 * @par Errors
 * None: never fails.
 * @par Thread safety
 * Thread-safe: each thread has its own message.
 * @par Ownership
 * Thread-local storage of the calling thread: the pointer stays valid until
 * the thread exits; the text is replaced by the thread's next failing call.
 * Copy it if you need it longer.
 */
PRM_API const char *prm_last_errmsg(void);

/** @} */

/* ------------------------------------------------------------------------ */
/* Models                                                                    */
/* ------------------------------------------------------------------------ */

/**
 * @defgroup prm_models Models
 * Creating a model, its configuration, its parameters as one flat array and
 * as named tensors, and choosing which parameters train.
 * @{
 */

/**
 * Opaque model: architecture, configuration and parameters (fp32, one
 * contiguous arena). Created by prm_model_new, prm_model_load(_buffer) or
 * prm_model_load_pretrained(_buffer); released by prm_model_free.
 */
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
  PRM_ACT_RELU = 1,      /**< max(0, x) */
  PRM_ACT_GELU_TANH = 2, /**< 0.5x(1+tanh(sqrt(2/pi)(x+0.044715x^3))) */
  PRM_ACT_TANH = 3       /**< tanh(x) */
} prm_activation;

#define PRM_MAX_HIDDEN 16 /**< most hidden layers an mlp may have */

/** Newest version of prm_model_options (2 appended the llama fields). */
#define PRM_MODEL_OPTIONS_VERSION 2

/**
 * Model configuration. Initialise with prm_model_options_init. Only the
 * fields of `arch` are read; the limits below are checked by prm_model_new
 * (PRM_ERR_INVALID).
 */
typedef struct prm_model_options {
  uint32_t version;     /**< PRM_MODEL_OPTIONS_VERSION (1 or 2) */
  int32_t arch;         /**< prm_arch */
  uint64_t seed;        /**< initialisation seed (library's own PRNG) */
  uint64_t input_size;  /**< linear/mlp: features per row, 1..2^30 */
  /* mlp */
  int32_t activation;   /**< mlp: prm_activation (default PRM_ACT_GELU_TANH) */
  uint32_t n_hidden;    /**< mlp: hidden layers, 1..PRM_MAX_HIDDEN */
  uint64_t hidden[PRM_MAX_HIDDEN]; /**< mlp: width of each hidden layer,
                                        1..2^30 */
  /* gpt2 and llama */
  uint64_t vocab_size;  /**< token ids are 0 .. vocab_size-1; 1..2^30 */
  uint64_t n_ctx;       /**< longest sequence, 1..65536 (gpt2: wpe rows;
                             llama: HF max_position_embeddings, no table) */
  uint64_t n_embd;      /**< width C, 1..2^30 (gpt2: at most 2^20) */
  uint64_t n_layer;     /**< transformer blocks, 1..128 */
  uint64_t n_head;      /**< attention heads, 1..2^30; gpt2: must divide
                             n_embd (llama: see head_dim) */
  /* ---- version 2 ---- */
  /* llama (HF config.json name in brackets) */
  uint64_t n_kv_head;   /**< key/value heads [num_key_value_heads]; must
                             divide n_head; 0: n_head (plain multi-head) */
  uint64_t head_dim;    /**< width of one head [head_dim], even; 0:
                             n_embd / n_head (which must then divide);
                             n_head * head_dim at most 2^30 */
  uint64_t n_ffn;       /**< SwiGLU width [intermediate_size], 1..2^30; 0:
                             Meta's rule 256 * ceil(8 n_embd / 3 / 256) */
  double rope_theta;    /**< RoPE base [rope_theta], > 0 and finite as a
                             float (default 10000) */
  double rms_eps;       /**< RMSNorm eps [rms_norm_eps], >= 0 and finite
                             as a float (default 1e-6) */
  int32_t attn_bias;    /**< non-zero: q/k/v projections have biases (Qwen2) */
  int32_t qk_norm;      /**< non-zero: per-head RMSNorm of q and k before
                             the rotation (Qwen3) */
} prm_model_options;

/** Initialiser of a prm_model_options of the newest version, with the
 *  defaults of prm_model_options_init. */
#define PRM_MODEL_OPTIONS_INIT \
  { PRM_MODEL_OPTIONS_VERSION, PRM_ARCH_LINEAR, 0, 0, PRM_ACT_GELU_TANH, 0, \
    {0}, 0, 0, 0, 0, 0, 0, 0, 0, 10000.0, 1e-6, 0, 0 }

/**
 * Fill *opts with the defaults of struct version `version`. The defaults:
 * linear, seed 0, gelu-tanh activation, every size 0, rope_theta 10000,
 * rms_eps 1e-6, no biases, no q/k norm. Only the fields of that version
 * are written.
 * @param[out] opts     the struct to fill.
 * @param[in]  version  1 .. PRM_MODEL_OPTIONS_VERSION.
 * @retval PRM_OK           success.
 * @retval PRM_ERR_NULL     opts is NULL.
 * @retval PRM_ERR_VERSION  version is not 1 .. PRM_MODEL_OPTIONS_VERSION.
 * @par Errors
 * Message to the thread.
 * @par Thread safety
 * Thread-safe (pure).
 * @par Ownership
 * Nothing is kept.
 */
PRM_API int prm_model_options_init(prm_model_options *opts, uint32_t version);

/**
 * Create a model with freshly initialised parameters. Initialisation is
 * deterministic in opts->seed. linear/mlp: weights of a layer with fan-in k
 * uniform in [-1/sqrt(k), 1/sqrt(k)], mlp biases uniform in [-0.1, 0.1].
 * gpt2: GPT-2's scheme: weights and embeddings N(0, 0.02), the attention and
 * MLP output projections N(0, 0.02/sqrt(2 n_layer)), LayerNorm weight 1 and
 * bias 0, biases 0; LayerNorm eps is 1e-5. llama: Hugging Face's scheme:
 * every projection weight, the embedding and the head N(0, 0.02), biases 0,
 * RMSNorm weights 1.
 *
 * Only the fields of opts->arch are read. prm_model_get_options reports the
 * others as 0, except activation (PRM_ACT_GELU_TANH; 0 for llama),
 * rope_theta and rms_eps (their defaults); llama's fields whose 0 means a
 * default (n_kv_head, head_dim, n_ffn) are reported resolved.
 * @param[out] out   receives the new model; set to NULL on failure.
 * @param[in]  opts  configuration (version 1 or 2).
 * @retval PRM_OK           success.
 * @retval PRM_ERR_NULL     out or opts is NULL.
 * @retval PRM_ERR_VERSION  opts->version is unknown.
 * @retval PRM_ERR_INVALID  a configuration outside the limits of
 *         prm_model_options: an unknown arch; linear/mlp: input_size or a
 *         hidden width outside 1..2^30, n_hidden outside
 *         1..PRM_MAX_HIDDEN, an unknown activation (mlp); gpt2/llama:
 *         vocab_size, n_ctx, n_embd or n_head outside 1..2^30, n_ctx above
 *         65536, n_layer outside 1..128; gpt2: n_head not dividing n_embd,
 *         n_embd above 2^20; llama: n_kv_head not dividing n_head, head_dim
 *         odd (or 0 with n_head not dividing n_embd), n_ffn outside
 *         1..2^30, n_head * head_dim above 2^30, rope_theta not > 0 and
 *         finite as a float, rms_eps negative or not finite as a float;
 *         any architecture: more than 2^34 parameters.
 * @retval PRM_ERR_NOMEM    the parameters cannot be allocated.
 * @par Errors
 * Message to the thread.
 * @par Thread safety
 * Thread-safe.
 * @par Ownership
 * The caller owns *out: release it with prm_model_free. opts is not kept.
 */
PRM_API int prm_model_new(prm_model **out, const prm_model_options *opts);

/**
 * Release a model.
 * @param[in] model  the model; NULL is a no-op.
 * @par Errors
 * None: never fails.
 * @par Thread safety
 * Model writer: no other call may use the model meanwhile.
 * @par Ownership
 * Contexts and optimizers created for the model borrow it: they must not be
 * used after this call, but they may be freed before or after it (freeing
 * them reads nothing of the model). Pointers from prm_model_params and the
 * names from prm_model_tensor_info become invalid; a string returned by
 * prm_model_errmsg stays valid (it is the calling thread's copy).
 */
PRM_API void prm_model_free(prm_model *model);

/**
 * Copy the model's configuration into *opts, fields of other architectures
 * and defaults as described at prm_model_new.
 * @param[in]     model  the model.
 * @param[in,out] opts   opts->version set by the caller (e.g. by
 *                       prm_model_options_init); fields beyond that version
 *                       are not written.
 * @retval PRM_OK           success.
 * @retval PRM_ERR_NULL     model or opts is NULL.
 * @retval PRM_ERR_VERSION  opts->version is unknown.
 * @par Errors
 * Message to the thread and to the model.
 * @par Thread safety
 * Thread-safe: the configuration is fixed at creation.
 * @par Ownership
 * Nothing is kept.
 */
PRM_API int prm_model_get_options(const prm_model *model,
                                  prm_model_options *opts);

/**
 * Architecture of the model.
 * @param[in] model  the model, or NULL.
 * @return its prm_arch, or 0 for NULL.
 * @par Errors
 * None: never fails.
 * @par Thread safety
 * Thread-safe: fixed at creation.
 * @par Ownership
 * Nothing is kept.
 */
PRM_API int32_t prm_model_arch(const prm_model *model);
/**
 * Features per input row of a feature model.
 * @param[in] model  the model, or NULL.
 * @return input_size (linear, mlp); 0 for gpt2, llama and NULL.
 * @par Errors
 * None: never fails.
 * @par Thread safety
 * Thread-safe: fixed at creation.
 * @par Ownership
 * Nothing is kept.
 */
PRM_API uint64_t prm_model_input_size(const prm_model *model);
/**
 * Number of fp32 parameters: the length of the prm_model_params array.
 * @param[in] model  the model, or NULL.
 * @return the count, or 0 for NULL.
 * @par Errors
 * None: never fails.
 * @par Thread safety
 * Thread-safe: fixed at creation.
 * @par Ownership
 * Nothing is kept.
 */
PRM_API uint64_t prm_model_num_params(const prm_model *model);
/**
 * Longest sequence of a token model: its n_ctx, the largest
 * prm_ctx_options.max_len.
 * @param[in] model  the model, or NULL.
 * @return n_ctx (gpt2, llama); 0 for feature models and for NULL.
 * @par Errors
 * None: never fails.
 * @par Thread safety
 * Thread-safe: fixed at creation.
 * @par Ownership
 * Nothing is kept.
 */
PRM_API uint64_t prm_model_max_len(const prm_model *model);
/**
 * Vocabulary size of a token model (ids are 0 to vocab_size-1).
 * @param[in] model  the model, or NULL.
 * @return vocab_size (gpt2, llama); 0 for feature models and for NULL.
 * @par Errors
 * None: never fails.
 * @par Thread safety
 * Thread-safe: fixed at creation.
 * @par Ownership
 * Nothing is kept.
 */
PRM_API uint64_t prm_model_vocab_size(const prm_model *model);

/**
 * Flat view of all parameters. One contiguous fp32 array of
 * prm_model_num_params() elements, tensors laid out in the order and
 * layouts given by prm_model_tensor_info. Writing through it (e.g. to
 * broadcast parameters from another rank) is a model write:
 * prm_optimizer_step keeps no copies of parameters, so the next step sees
 * such writes; a write between a prm_ctx_forward and its prm_ctx_backward
 * changes what the backward computes. Writes are not checked: NaN/Inf
 * values reach the model (prm_model_write_params checks them).
 * @param[in,out] model     the model.
 * @param[out]    n_params  optional; receives the element count (0 for a
 *                          NULL model).
 * @return the array, or NULL when model is NULL.
 * @par Errors
 * A NULL return is a failure: message to the thread.
 * @par Thread safety
 * The call itself is thread-safe (the pointer is fixed at creation).
 * Reading through the pointer is a model reader, writing through it a
 * model writer.
 * @par Ownership
 * The array belongs to the model and stays valid until prm_model_free.
 */
PRM_API float *prm_model_params(prm_model *model, uint64_t *n_params);

/**
 * Number of named tensors in the model.
 * @param[in] model  the model, or NULL.
 * @return the count, or 0 for NULL.
 * @par Errors
 * None: never fails.
 * @par Thread safety
 * Thread-safe: fixed at creation.
 * @par Ownership
 * Nothing is kept.
 */
PRM_API uint32_t prm_model_num_tensors(const prm_model *model);

/**
 * Describe tensor `index`: its name, offset and shape. Names and shapes
 * are those of the Hugging Face state_dict, so a saved checkpoint opens in
 * PyTorch; tensors are packed back to back in this order (row-major), with
 * V = vocab_size, C = D = n_embd, H = n_head, G = n_kv_head, hd = head_dim,
 * F = n_ffn:
 *  - linear: `score.weight` [1, input_size].
 *  - mlp: per hidden layer i, `layers.{i}.weight` [h_i, h_{i-1}] (nn.Linear
 *    layout [out, in], h_{-1} = input_size) and `layers.{i}.bias` [h_i];
 *    then `score.weight` [1, h_last].
 *  - gpt2: `transformer.wte.weight` [V, C], `transformer.wpe.weight`
 *    [n_ctx, C]; per block l, `transformer.h.{l}.` followed by
 *    `ln_1.weight` [C], `ln_1.bias` [C], `attn.c_attn.weight` [C, 3C]
 *    (q | k | v), `attn.c_attn.bias` [3C], `attn.c_proj.weight` [C, C],
 *    `attn.c_proj.bias` [C], `ln_2.weight` [C], `ln_2.bias` [C],
 *    `mlp.c_fc.weight` [C, 4C], `mlp.c_fc.bias` [4C], `mlp.c_proj.weight`
 *    [4C, C], `mlp.c_proj.bias` [C]; then `transformer.ln_f.weight` [C],
 *    `transformer.ln_f.bias` [C] and `score.weight` [1, C]. The block
 *    weights use HF Conv1D's layout [in, out] (y = x W + b), not
 *    nn.Linear's [out, in].
 *  - llama: `model.embed_tokens.weight` [V, D]; per layer l,
 *    `model.layers.{l}.` followed by `self_attn.q_proj.weight` [H hd, D],
 *    (`self_attn.q_proj.bias` [H hd] with attn_bias),
 *    `self_attn.k_proj.weight` [G hd, D], (`self_attn.k_proj.bias`
 *    [G hd]), `self_attn.v_proj.weight` [G hd, D], (`self_attn.v_proj.bias`
 *    [G hd]), `self_attn.o_proj.weight` [D, H hd], (`self_attn.q_norm.weight`
 *    [hd] and `self_attn.k_norm.weight` [hd] with qk_norm),
 *    `mlp.gate_proj.weight` [F, D], `mlp.up_proj.weight` [F, D],
 *    `mlp.down_proj.weight` [D, F], `input_layernorm.weight` [D],
 *    `post_attention_layernorm.weight` [D]; then `model.norm.weight` [D]
 *    and `score.weight` [1, D]. Every projection is an nn.Linear weight,
 *    [out, in].
 * @param[in]  model   the model.
 * @param[in]  index   0 .. prm_model_num_tensors()-1.
 * @param[out] name    optional; receives the NUL-terminated name.
 * @param[out] offset  optional; element offset of the tensor in the flat
 *                     arena (prm_model_params).
 * @param[out] ndim    optional; number of dimensions (1 or 2).
 * @param[out] shape   optional; array of 2 receiving the dimensions
 *                     (shape[1] is 0 for a 1-D tensor).
 * @retval PRM_OK           success.
 * @retval PRM_ERR_NULL     model is NULL.
 * @retval PRM_ERR_INVALID  index is out of range (outputs untouched).
 * @par Errors
 * Message to the thread and to the model.
 * @par Thread safety
 * Thread-safe: the layout is fixed at creation (a failure writes the
 * model's message under its lock).
 * @par Ownership
 * *name points into the model: valid until prm_model_free.
 */
PRM_API int prm_model_tensor_info(const prm_model *model, uint32_t index,
                                  const char **name, uint64_t *offset,
                                  uint32_t *ndim, uint64_t shape[2]);

/** @} */

/* ---- Copying parameters in and out ---- */

/**
 * @defgroup prm_params Copying parameters in and out
 * For hosts that cannot (or prefer not to) write through the pointer of
 * prm_model_params, such as a ctypes binding filling a numpy array: the
 * library copies between the model and a caller buffer and checks every
 * bound and value. Failures change nothing: a write either copies all n
 * floats or none. Bounds are checked without overflow (offset + n may
 * exceed 2^64). Messages go to the thread and to the model. Reads are model
 * readers, writes model writers; a write between a prm_ctx_forward and its
 * prm_ctx_backward changes what the backward computes, as a write through
 * prm_model_params would.
 * @{
 */

/**
 * Index of the tensor called `name`, exactly as prm_model_tensor_info names
 * it ("score.weight", "transformer.h.0.attn.c_attn.weight", ...).
 * @param[in]  model  the model.
 * @param[in]  name   NUL-terminated tensor name.
 * @param[out] index  receives the index (0 .. prm_model_num_tensors()-1).
 * @retval PRM_OK           success.
 * @retval PRM_ERR_NULL     model, name or index is NULL.
 * @retval PRM_ERR_INVALID  no tensor of that name (*index untouched).
 * @par Errors
 * Message to the thread and to the model.
 * @par Thread safety
 * Thread-safe: the layout is fixed at creation.
 * @par Ownership
 * name is not kept.
 */
PRM_API int prm_model_find_tensor(const prm_model *model, const char *name,
                                  uint32_t *index);

/**
 * Copy tensor `index` into dst (row-major, the layout of
 * prm_model_tensor_info's shape).
 * @param[in]  model  the model.
 * @param[in]  index  0 .. prm_model_num_tensors()-1.
 * @param[out] dst    caller buffer of n floats.
 * @param[in]  n      must equal the tensor's element count (shape[0] *
 *                    shape[1], or shape[0] for 1-D).
 * @retval PRM_OK           success.
 * @retval PRM_ERR_NULL     model or dst is NULL.
 * @retval PRM_ERR_INVALID  index is out of range.
 * @retval PRM_ERR_SIZE     n is not the element count.
 * @par Errors
 * Message to the thread and to the model.
 * @par Thread safety
 * Model reader.
 * @par Ownership
 * dst is the caller's, written only on success.
 */
PRM_API int prm_model_read_tensor(const prm_model *model, uint32_t index,
                                  float *dst, uint64_t n);

/**
 * Replace tensor `index` with the n floats at src (row-major). Frozen
 * tensors may be written too (freezing concerns gradients only). The model
 * is unchanged on failure.
 * @param[in,out] model  the model.
 * @param[in]     index  0 .. prm_model_num_tensors()-1.
 * @param[in]     src    n finite floats.
 * @param[in]     n      must equal the tensor's element count.
 * @retval PRM_OK             success.
 * @retval PRM_ERR_NULL       model or src is NULL.
 * @retval PRM_ERR_INVALID    index is out of range.
 * @retval PRM_ERR_SIZE       n is not the element count.
 * @retval PRM_ERR_NONFINITE  a NaN/Inf in src (the message names the
 *                            first).
 * @par Errors
 * Message to the thread and to the model.
 * @par Thread safety
 * Model writer.
 * @par Ownership
 * src is not kept (copied).
 */
PRM_API int prm_model_write_tensor(prm_model *model, uint32_t index,
                                   const float *src, uint64_t n);

/**
 * Copy parameters [offset, offset + n) of the flat arena (prm_model_params'
 * layout) into dst.
 * @param[in]  model   the model.
 * @param[in]  offset  first parameter; may equal prm_model_num_params()
 *                     only when n = 0.
 * @param[out] dst     caller buffer of n floats (may be NULL when n = 0).
 * @param[in]  n       parameters to copy; 0 copies nothing.
 * @retval PRM_OK        success.
 * @retval PRM_ERR_NULL  model is NULL, or dst is NULL with n > 0.
 * @retval PRM_ERR_SIZE  the slice reaches past the arena.
 * @par Errors
 * Message to the thread and to the model.
 * @par Thread safety
 * Model reader.
 * @par Ownership
 * dst is the caller's, written only on success.
 */
PRM_API int prm_model_read_params(const prm_model *model, uint64_t offset,
                                  float *dst, uint64_t n);

/**
 * Write parameters [offset, offset + n) of the flat arena from src: all n
 * or, on failure, none.
 * @param[in,out] model   the model.
 * @param[in]     offset  first parameter; may equal prm_model_num_params()
 *                        only when n = 0.
 * @param[in]     src     n finite floats (may be NULL when n = 0).
 * @param[in]     n       parameters to write; 0 writes nothing.
 * @retval PRM_OK             success.
 * @retval PRM_ERR_NULL       model is NULL, or src is NULL with n > 0.
 * @retval PRM_ERR_SIZE       the slice reaches past the arena.
 * @retval PRM_ERR_NONFINITE  a NaN/Inf in src (the message names the
 *                            first).
 * @par Errors
 * Message to the thread and to the model.
 * @par Thread safety
 * Model writer.
 * @par Ownership
 * src is not kept (copied).
 */
PRM_API int prm_model_write_params(prm_model *model, uint64_t offset,
                                   const float *src, uint64_t n);

/** @} */

/**
 * @addtogroup prm_models
 * @{
 */

/**
 * Choose which parameters train. n_blocks < 0: all (the default after
 * creation or loading a file without a trainable set). n_blocks = 0: the
 * score head only (score.weight). n_blocks = k > 0: the last k blocks
 * (gpt2 transformer blocks, llama layers, mlp hidden layers) plus, for gpt2
 * and llama, the final norm (transformer.ln_f, model.norm), plus the head;
 * with k = n_layer gpt2 and llama train everything but the embeddings
 * (gpt2: wte and wpe; llama: embed_tokens), and with k = n_hidden an mlp
 * trains everything. Trainable parameters are always a suffix of the
 * arena, [prm_model_trainable_offset(), num_params): contexts hold
 * gradients and optimizers hold state for that suffix only; frozen
 * parameters cost no gradient memory and no optimizer state.
 * Contexts and optimizers record the trainable set when they are created;
 * after a change, prm_ctx_backward, prm_optimizer_step and the one-call
 * training steps on older ones return PRM_ERR_MISMATCH: create new ones.
 * Checkpoints store the set (prm_model_save, prm_model_load) and optimizer
 * states record it (prm_optimizer_load checks it).
 * @param[in,out] model     the model.
 * @param[in]     n_blocks  < 0, 0 or the number of last blocks (see above).
 * @retval PRM_OK           success.
 * @retval PRM_ERR_NULL     model is NULL.
 * @retval PRM_ERR_INVALID  more blocks than the model has (n_layer, or
 *                          n_hidden for mlp); any k > 0 for linear. The set
 *                          is unchanged.
 * @par Errors
 * Message to the thread and to the model.
 * @par Thread safety
 * Model writer.
 * @par Ownership
 * Nothing is kept.
 */
PRM_API int prm_model_set_trainable(prm_model *model, int32_t n_blocks);

/**
 * First trainable parameter: gradient j of a context created now is that of
 * parameter offset + j.
 * @param[in] model  the model, or NULL.
 * @return the offset; 0 when everything trains, and for NULL.
 * @par Errors
 * None: never fails.
 * @par Thread safety
 * Model reader (prm_model_set_trainable changes it).
 * @par Ownership
 * Nothing is kept.
 */
PRM_API uint64_t prm_model_trainable_offset(const prm_model *model);

/** @} */

/* ---- Reward normalisation ---- */

/**
 * @defgroup prm_rewardnorm Reward normalisation
 * Statistics of a reference set's rewards, stored in the model (and its
 * checkpoints), to put rewards on a known scale for the RL stage.
 * @{
 */

/** Newest version of prm_reward_moments. */
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

/** Initialiser of an empty prm_reward_moments. */
#define PRM_REWARD_MOMENTS_INIT { PRM_REWARD_MOMENTS_VERSION, 0, 0.0, 0.0 }

/**
 * Fill *m with an empty accumulator.
 * @param[out] m        the accumulator.
 * @param[in]  version  1 .. PRM_REWARD_MOMENTS_VERSION.
 * @retval PRM_OK           success.
 * @retval PRM_ERR_NULL     m is NULL.
 * @retval PRM_ERR_VERSION  version is unknown.
 * @par Errors
 * Message to the thread.
 * @par Thread safety
 * Thread-safe (pure).
 * @par Ownership
 * Nothing is kept.
 */
PRM_API int prm_reward_moments_init(prm_reward_moments *m, uint32_t version);

/**
 * Add n rewards, such as the scores prm_ctx_forward returned for one batch
 * of the reference set. Each batch's mean and squared deviations are computed
 * in double and merged exactly (Chan, Golub and LeVeque's pairwise update),
 * so the result does not depend on how the set is cut into batches beyond
 * rounding. On failure *m is unchanged.
 * @param[in,out] m        an initialised accumulator.
 * @param[in]     rewards  n finite rewards (may be NULL when n = 0).
 * @param[in]     n        rewards to add; 0 adds nothing.
 * @retval PRM_OK             success.
 * @retval PRM_ERR_NULL       m is NULL, or rewards is NULL with n > 0.
 * @retval PRM_ERR_VERSION    m->version is unknown.
 * @retval PRM_ERR_NONFINITE  a NaN/Inf reward.
 * @par Errors
 * Message to the thread.
 * @par Thread safety
 * Thread-safe for distinct m; one call at a time per accumulator.
 * @par Ownership
 * rewards is not kept.
 */
PRM_API int prm_reward_moments_add(prm_reward_moments *m, const float *rewards,
                                   uint64_t n);

/**
 * Store reward normalisation statistics in the model: mean and population
 * standard deviation sqrt(m2 / count) of the moments. They are saved in
 * checkpoints ("reward_mean", "reward_std" `__metadata__` keys, exact) and
 * loaded back; other tools (PyTorch with the reference) ignore them and
 * score as before. The model is unchanged on failure.
 * @param[in,out] model    the model.
 * @param[in]     moments  the accumulated moments; NULL removes the
 *                         statistics.
 * @retval PRM_OK           success.
 * @retval PRM_ERR_NULL     model is NULL.
 * @retval PRM_ERR_VERSION  moments->version is unknown.
 * @retval PRM_ERR_INVALID  fewer than 2 rewards, or a mean or standard
 *                          deviation that is not finite, or a deviation
 *                          of 0.
 * @par Errors
 * Message to the thread and to the model.
 * @par Thread safety
 * Model writer.
 * @par Ownership
 * moments is not kept (its mean and deviation are copied).
 */
PRM_API int prm_model_set_reward_norm(prm_model *model,
                                      const prm_reward_moments *moments);

/**
 * The model's normalisation statistics.
 * @param[in]  model  the model.
 * @param[out] mean   optional; receives the mean.
 * @param[out] std    optional; receives the standard deviation.
 * @retval PRM_OK          success.
 * @retval PRM_ERR_NULL    model is NULL.
 * @retval PRM_ERR_STATE   the model has no statistics (outputs untouched).
 * @par Errors
 * Message to the thread and to the model.
 * @par Thread safety
 * Model reader.
 * @par Ownership
 * Nothing is kept.
 */
PRM_API int prm_model_reward_norm(const prm_model *model, double *mean,
                                  double *std);

/**
 * Normalise n rewards in place: r <- (r - mean) / std with the model's
 * statistics, in double, rounded to float. Call it on the scores of
 * prm_ctx_forward when the RL stage wants rewards on a known scale. The
 * rewards are untouched on failure.
 * @param[in]     model    the model.
 * @param[in,out] rewards  n finite rewards (may be NULL when n = 0).
 * @param[in]     n        number of rewards.
 * @retval PRM_OK             success.
 * @retval PRM_ERR_NULL       model is NULL, or rewards is NULL with n > 0.
 * @retval PRM_ERR_STATE      the model has no statistics (even for n = 0).
 * @retval PRM_ERR_NONFINITE  a NaN/Inf reward.
 * @par Errors
 * Message to the thread and to the model.
 * @par Thread safety
 * Model reader.
 * @par Ownership
 * Nothing is kept.
 */
PRM_API int prm_model_normalise_rewards(const prm_model *model, float *rewards,
                                        uint64_t n);

/** @} */

/**
 * @addtogroup prm_errors
 * @{
 */

/**
 * Detail of the most recent failing call that took this model as an
 * argument. That is any call, const or not, on any thread (prefrm.h,
 * "Error messages"): a prm_model_tensor_info with a bad index replaces an
 * older prm_model_set_trainable message, and so do a prm_ctx_new refused
 * for the model and a failed prm_model_save. Successes never clear it.
 *
 * The model's message is written under a lock inside the model, taken only
 * by failing calls and by this function, which returns a copy made under
 * that lock in thread-local storage.
 * @param[in] model  the model, or NULL.
 * @return the message; "" until the model's first failure and for a NULL
 *         model; never NULL.
 * @par Errors
 * None: never fails.
 * @par Thread safety
 * Thread-safe: may run concurrently with any call on the model, failing
 * ones included (not with prm_model_free).
 * @par Ownership
 * The calling thread's copy: the pointer stays valid, and its text
 * unchanged, until the thread's next prm_model_errmsg call (on any model)
 * or its exit, even after prm_model_free. Copy it if you need it longer.
 */
PRM_API const char *prm_model_errmsg(const prm_model *model);

/** @} */

/* ------------------------------------------------------------------------ */
/* Checkpoints (safetensors; saved F32, loaded from F32, F16 or BF16)        */
/* ------------------------------------------------------------------------ */

/**
 * @defgroup prm_checkpoints Checkpoints
 * Models as safetensors files or memory buffers: saved in F32, loaded from
 * F32, F16 or BF16. docs/checkpoint-format.md has the format.
 * @{
 */

/**
 * Save the model as a safetensors file. Tensors are F32 with the names,
 * shapes and order of prm_model_tensor_info (PyTorch/Hugging Face names and
 * layouts: nn.Linear [out, in] for mlp and llama, Conv1D [in, out] for the
 * gpt2 blocks); the configuration goes into `__metadata__` as strings, and
 * so do the reward normalisation statistics when set and the trainable
 * set when not everything trains ("trainable_blocks": the n_blocks of
 * prm_model_set_trainable), so that a resumed run trains what the saved
 * one did.
 *
 * Atomic and durable: the bytes go to `PATH.tmp` (`path` followed by
 * ".tmp": a fresh file, mode 0666 & ~umask), which is fsynced and renamed
 * over `path`, and then the directory is fsynced. A reader of `path` sees
 * the old file or the new one, never a mix. On failure `path` is unchanged
 * and `PATH.tmp` removed. A crash or kill during the save leaves `path` old
 * or new plus, at most, one `PATH.tmp`, which the next save to `path`
 * replaces (litter never grows beyond that one file). The name `PATH.tmp`
 * belongs to this call: a file of your own there is deleted; a symbolic
 * link, directory, FIFO or other non-regular file there makes the save
 * fail and is left alone.
 *
 * Two saves to the same `path` at once (threads or processes) do not mix:
 * the temporary file is held under flock(), and a save that finds it locked
 * returns PRM_ERR_IO ("another save to ... is in progress") at once,
 * without waiting and without touching either file.
 * @param[in] model  the model.
 * @param[in] path   file to write (NUL-terminated).
 * @retval PRM_OK         success.
 * @retval PRM_ERR_NULL   model or path is NULL.
 * @retval PRM_ERR_NOMEM  out of memory, or the file would exceed SIZE_MAX
 *                        bytes.
 * @retval PRM_ERR_IO     cannot create, write, sync or rename the file;
 *                        another save to `path` is in progress; or, after
 *                        `path` was already replaced, the fsync of its
 *                        directory failed (the message says so).
 * @par Errors
 * Message to the thread and to the model.
 * @par Thread safety
 * Model reader: saves, forwards and backwards on other threads may run
 * meanwhile.
 * @par Ownership
 * Nothing is kept.
 */
PRM_API int prm_model_save(const prm_model *model, const char *path);

/**
 * Serialise the model to a caller buffer (the same bytes as
 * prm_model_save). Call with buf == NULL to learn the size: *size_out
 * receives the exact byte count. With a buffer, `capacity` must be at
 * least that size.
 * @param[in]  model     the model.
 * @param[out] buf       caller buffer of capacity bytes, or NULL to ask
 *                       for the size.
 * @param[in]  capacity  bytes at buf (ignored when buf is NULL).
 * @param[out] size_out  receives the file's size in bytes.
 * @retval PRM_OK         success.
 * @retval PRM_ERR_NULL   model or size_out is NULL.
 * @retval PRM_ERR_SIZE   capacity is too small (*size_out still receives
 *                        the needed size; buf is not written).
 * @retval PRM_ERR_NOMEM  the file would not fit in size_t (32-bit hosts).
 * @par Errors
 * Message to the thread and to the model.
 * @par Thread safety
 * Model reader.
 * @par Ownership
 * buf is the caller's, written only on success. Nothing is kept.
 */
PRM_API int prm_model_save_buffer(const prm_model *model, void *buf,
                                  size_t capacity, size_t *size_out);

/**
 * Create a model from a safetensors file, one written by prm_model_save or
 * by PyTorch with the same names and `__metadata__` keys. Everything is
 * validated (header bounds, offsets, overlaps, dtype F32, F16 or BF16 --
 * half precision widens to F32 exactly --, shapes against the
 * configuration, missing or unknown tensors, non-finite values).
 *
 * A file of another kind (text, random bytes: fewer than 8 bytes, a header
 * length above 100 MB or below 2, a header that does not start with '{'
 * after JSON whitespace) is PRM_ERR_FORMAT with a message that starts "not
 * a safetensors file: " and says which rule it breaks; a safetensors file
 * cut short says "truncated". The same holds for every loader (pretrained,
 * optimizer states, buffers).
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
 * prm_model_set_trainable(model, that value); a file without it loads with
 * everything trainable. Reward normalisation statistics are restored too.
 * @param[out] out   receives the model; NULL on failure.
 * @param[in]  path  file to read (NUL-terminated).
 * @retval PRM_OK               success.
 * @retval PRM_ERR_NULL         out or path is NULL.
 * @retval PRM_ERR_IO           cannot open or read the file; not a regular
 *                              file; the file changed while being read.
 * @retval PRM_ERR_FORMAT       a malformed file or one that does not fit
 *                              its configuration (above), an optimizer
 *                              state instead of a model, a configuration
 *                              prm_model_new would refuse, a
 *                              "trainable_blocks" the model cannot take.
 * @retval PRM_ERR_UNSUPPORTED  a valid file this build cannot use, e.g. a
 *                              gpt2 LayerNorm eps other than 1e-5.
 * @retval PRM_ERR_NOMEM        out of memory.
 * @par Errors
 * Message to the thread (no handle is an argument).
 * @par Thread safety
 * Thread-safe.
 * @par Ownership
 * The caller owns *out: release it with prm_model_free. The file is read
 * whole and closed before the call returns; nothing of it is kept open.
 */
PRM_API int prm_model_load(prm_model **out, const char *path);

/**
 * As prm_model_load, from `size` bytes at `buf`: the same validation and
 * statuses, except that PRM_ERR_IO cannot occur.
 * @param[out] out   receives the model; NULL on failure.
 * @param[in]  buf   the bytes of a safetensors file.
 * @param[in]  size  bytes at buf.
 * @retval PRM_OK               success.
 * @retval PRM_ERR_NULL         out or buf is NULL.
 * @retval PRM_ERR_FORMAT       as prm_model_load.
 * @retval PRM_ERR_UNSUPPORTED  as prm_model_load.
 * @retval PRM_ERR_NOMEM        out of memory.
 * @par Errors
 * Message to the thread.
 * @par Thread safety
 * Thread-safe.
 * @par Ownership
 * The caller owns *out. buf is not kept: the model has its own copy of
 * the parameters.
 */
PRM_API int prm_model_load_buffer(prm_model **out, const void *buf,
                                  size_t size);

/** @} */

/* ------------------------------------------------------------------------ */
/* Starting from a pretrained language model                                 */
/* ------------------------------------------------------------------------ */

/**
 * @defgroup prm_pretrained Starting from a pretrained language model
 * A reward model from a Hugging Face checkpoint of a language model: the
 * backbone from the file, a fresh score head.
 * @{
 */

/** Newest version of prm_pretrained_options. */
#define PRM_PRETRAINED_OPTIONS_VERSION 1

/** Options of prm_model_load_pretrained. Initialise with
 *  prm_pretrained_options_init. */
typedef struct prm_pretrained_options {
  uint32_t version;                /**< PRM_PRETRAINED_OPTIONS_VERSION */
  const prm_model_options *config; /**< optional (borrowed for the call): the
      model's configuration, for files that do not carry it (most hub files
      have only {"format": "pt"} metadata). Used for what the file cannot
      tell: its arch when the file has no "model" key, n_head, and for llama
      n_ctx, rope_theta and rms_eps. Whatever the file does tell (its
      `__metadata__` and the tensor shapes) must agree with it: PRM_ERR_FORMAT
      otherwise. NULL: everything from the file. */
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

/** Initialiser of prm_pretrained_options with the defaults of
 *  prm_pretrained_options_init. */
#define PRM_PRETRAINED_OPTIONS_INIT { PRM_PRETRAINED_OPTIONS_VERSION, NULL, 0, 0, 0 }

/**
 * Fill *opts with defaults: configuration from the file, seed 0, keep a
 * head the file has, fail on unknown tensors.
 * @param[out] opts     the struct to fill.
 * @param[in]  version  1 .. PRM_PRETRAINED_OPTIONS_VERSION.
 * @retval PRM_OK           success.
 * @retval PRM_ERR_NULL     opts is NULL.
 * @retval PRM_ERR_VERSION  version is unknown.
 * @par Errors
 * Message to the thread.
 * @par Thread safety
 * Thread-safe (pure).
 * @par Ownership
 * Nothing is kept.
 */
PRM_API int prm_pretrained_options_init(prm_pretrained_options *opts,
                                        uint32_t version);

/** Newest version of prm_load_report. */
#define PRM_LOAD_REPORT_VERSION 1

/** What prm_model_load_pretrained did with each tensor. Written only when
 *  the load succeeds; untouched on failure. */
typedef struct prm_load_report {
  uint32_t version;       /**< set by the caller: PRM_LOAD_REPORT_VERSION */
  uint32_t n_loaded;      /**< model tensors read from the file */
  uint32_t n_initialised; /**< model tensors initialised from the seed */
  uint32_t n_ignored;     /**< file tensors not used (an LM head, buffers) */
  char *text;             /**< optional caller buffer (NULL: counts only):
                               one line per tensor, "loaded NAME",
                               "initialised NAME" or "ignored NAME", each
                               ending in a newline, model order for the
                               first two kinds, then file-name order for
                               ignored; NUL-terminated, holding as many
                               whole lines as fit in text_size bytes */
  size_t text_size;       /**< bytes at text */
  size_t text_needed;     /**< receives the bytes the whole text needs
                               (including the NUL) */
} prm_load_report;

/** Initialiser of an empty prm_load_report (counts only). */
#define PRM_LOAD_REPORT_INIT { PRM_LOAD_REPORT_VERSION, 0, 0, 0, NULL, 0, 0 }

/**
 * Create a reward model from a Hugging Face checkpoint of a language model.
 * The backbone comes from the file; so does the score head when the file
 * has one and opts->fresh_head is 0, else it is freshly initialised.
 * Accepts every
 * layout prm_model_load does and, for token models, the language-model
 * layouts: gpt2 -- GPT2LMHeadModel and GPT2Model names, with or without the
 * "transformer." prefix, with HF's attn.bias / attn.masked_bias buffers,
 * with or without a (tied) lm_head.weight; llama -- LlamaForCausalLM and
 * LlamaModel names (with or without "model."), lm_head.weight, the
 * rotary_emb.inv_freq buffers, and ...ForSequenceClassification files.
 * lm_head.weight and the buffers are ignored, and so is a
 * "trainable_blocks" key: the new model trains everything. The file's
 * tensors are validated as by prm_model_load (F32, F16 or BF16, bounds,
 * shapes, finite values).
 * @param[out]    out     receives the model; NULL on failure.
 * @param[in]     path    a safetensors file (opened without blocking, as
 *                        prm_model_load).
 * @param[in]     opts    optional (NULL: defaults).
 * @param[in,out] report  optional; report->version set by the caller.
 *                        Filled on success only.
 * @retval PRM_OK               success.
 * @retval PRM_ERR_NULL         out or path is NULL.
 * @retval PRM_ERR_VERSION      opts, report or opts->config has an unknown
 *                              version.
 * @retval PRM_ERR_INVALID      opts->config is not a valid configuration
 *                              (as prm_model_new would say).
 * @retval PRM_ERR_IO           as prm_model_load.
 * @retval PRM_ERR_FORMAT       a malformed file, a tensor missing or of the
 *                              wrong shape, an unexpected tensor (without
 *                              ignore_unknown), a configuration the file
 *                              and opts->config disagree on, n_head
 *                              unknown.
 * @retval PRM_ERR_UNSUPPORTED  as prm_model_load.
 * @retval PRM_ERR_NOMEM        out of memory.
 * @par Errors
 * Message to the thread (no handle is an argument).
 * @par Thread safety
 * Thread-safe.
 * @par Ownership
 * The caller owns *out: release it with prm_model_free. opts, opts->config
 * and report are not kept.
 */
PRM_API int prm_model_load_pretrained(prm_model **out, const char *path,
                                      const prm_pretrained_options *opts,
                                      prm_load_report *report);

/**
 * As prm_model_load_pretrained, from `size` bytes at `buf`: the same
 * validation and statuses, except that PRM_ERR_IO cannot occur.
 * @param[out]    out     receives the model; NULL on failure.
 * @param[in]     buf     the bytes of a safetensors file.
 * @param[in]     size    bytes at buf.
 * @param[in]     opts    optional (NULL: defaults).
 * @param[in,out] report  optional; report->version set by the caller.
 *                        Filled on success only.
 * @retval PRM_OK               success.
 * @retval PRM_ERR_NULL         out or buf is NULL.
 * @retval PRM_ERR_VERSION      as prm_model_load_pretrained.
 * @retval PRM_ERR_INVALID      as prm_model_load_pretrained.
 * @retval PRM_ERR_FORMAT       as prm_model_load_pretrained.
 * @retval PRM_ERR_UNSUPPORTED  as prm_model_load.
 * @retval PRM_ERR_NOMEM        out of memory.
 * @par Errors
 * Message to the thread.
 * @par Thread safety
 * Thread-safe.
 * @par Ownership
 * The caller owns *out. buf, opts and report are not kept.
 */
PRM_API int prm_model_load_pretrained_buffer(prm_model **out, const void *buf,
                                             size_t size,
                                             const prm_pretrained_options *opts,
                                             prm_load_report *report);

/** @} */

/* ------------------------------------------------------------------------ */
/* Batches                                                                   */
/* ------------------------------------------------------------------------ */

/**
 * @defgroup prm_batches Batches
 * The rows a forward, a training step or an evaluation reads.
 * @{
 */

/** Newest version of prm_batch (2: shared prefixes). */
#define PRM_BATCH_VERSION 2

/**
 * A batch of n rows (samples). For a pair batch of P pairs, n = 2P and rows
 * 0..P-1 are the chosen responses, rows P..2P-1 the rejected ones, in
 * matching order; this is the layout prm_train_step and prm_evaluate expect.
 * linear/mlp read `features` (the token fields are ignored); gpt2 and llama
 * read the token fields (the feature fields are ignored): sequence i is
 * tokens[i * token_stride + t] for t < lengths[i], right-padded. The score
 * of a sequence is read at position lengths[i] - 1; padding is never read,
 * so its ids do not matter and it costs no compute. The library reads a
 * batch only during the call that takes it; nothing of it is kept (see
 * prm_ctx_forward).
 *
 * Shared prefixes (version 2, token models). Row i may declare that its
 * first prefix_len[i] tokens are the first prefix_len[i] tokens of an
 * earlier row prefix_row[i]: a pair's rejected row naming its chosen row,
 * the responses of one prompt naming the first, a group's rows naming the
 * group's first. Those tokens are then computed once, by the earlier row;
 * row i's own tokens attend to their keys and values, and their gradient
 * collects every row's contribution. Scores, losses and gradients equal
 * those of the batch without the declaration up to float rounding (the same
 * terms, summed in another order). A row may share its whole sequence, and a
 * row may share with a row that itself shares. Every row still holds its
 * whole sequence in `tokens`: the declared tokens are compared, and a
 * declaration they contradict is refused with PRM_ERR_INVALID (never
 * trusted). prm_ctx_tokens_computed tells what a forward really ran.
 * Layout picture and rules: docs/throughput.md.
 */
typedef struct prm_batch {
  uint32_t version;          /**< PRM_BATCH_VERSION */
  uint64_t n;                /**< rows (samples) */
  const float *features;     /**< linear/mlp: (n, row_stride) row-major,
                                  finite */
  uint64_t n_features;       /**< must equal the model's input size */
  uint64_t row_stride;       /**< floats between rows (>= n_features, at
                                  most 2^30); 0 means n_features */
  const int32_t *tokens;     /**< gpt2/llama: (n, token_stride) ids in
                                  [0, vocab_size) */
  uint64_t token_stride;     /**< gpt2/llama: ints between sequences (>=
                                  every length; unused when n == 1) */
  const int32_t *lengths;    /**< gpt2/llama: n lengths in [1, the
                                  context's max_len] */
  /* version 2 */
  const int32_t *prefix_row; /**< gpt2/llama, optional (NULL together with
                                  prefix_len: nothing shared): n row
                                  indices; where prefix_len[i] > 0,
                                  0 <= prefix_row[i] < i (ignored where it
                                  is 0) */
  const int32_t *prefix_len; /**< n counts, 0 <= prefix_len[i] <=
                                  min(lengths[i], lengths[prefix_row[i]]);
                                  prefix_len[0] must be 0. Ignored by
                                  feature models */
} prm_batch;

/** Initialiser of an empty prm_batch. */
#define PRM_BATCH_INIT { PRM_BATCH_VERSION, 0, NULL, 0, 0, NULL, 0, NULL, NULL, NULL }

/**
 * Fill *batch with an empty batch of struct version `version`.
 * @param[out] batch    the struct to fill.
 * @param[in]  version  1 .. PRM_BATCH_VERSION.
 * @retval PRM_OK           success.
 * @retval PRM_ERR_NULL     batch is NULL.
 * @retval PRM_ERR_VERSION  version is unknown.
 * @par Errors
 * Message to the thread.
 * @par Thread safety
 * Thread-safe (pure).
 * @par Ownership
 * Nothing is kept.
 */
PRM_API int prm_batch_init(prm_batch *batch, uint32_t version);

/**
 * Gather n token sequences of different lengths into the rows of a token
 * batch. Row i of dst (dst[i * stride] to dst[i * stride + stride - 1])
 * receives seqs[i][0 .. lengths[i] - 1] followed by `pad` up to the row's
 * end. Then
 * prm_batch.tokens = dst, token_stride = stride, lengths = lengths. Saves
 * a foreign-language host the per-row copy loop (see docs/api.md,
 * Batches). Ids are copied as they are: prm_ctx_forward checks them
 * against the vocabulary. On failure dst is not written, and the message
 * names the first bad row.
 * @param[out] dst      caller buffer of n * stride int32_t ids; must not
 *                      overlap the sequences.
 * @param[in]  stride   ids per row (>= 1), e.g. the context's max_len.
 * @param[in]  n        rows; 0 does nothing and checks nothing (the
 *                      pointers may then be NULL).
 * @param[in]  seqs     n pointers to the sequences.
 * @param[in]  lengths  n lengths, each in [1, stride].
 * @param[in]  pad      the id written after each sequence (never read by a
 *                      forward; any value).
 * @retval PRM_OK        success.
 * @retval PRM_ERR_NULL  dst, seqs, lengths or a seqs[i] is NULL.
 * @retval PRM_ERR_SIZE  stride is 0, a length is outside [1, stride], or
 *                       n * stride ids exceed the address space.
 * @par Errors
 * Message to the thread.
 * @par Thread safety
 * Thread-safe (pure).
 * @par Ownership
 * Nothing is kept.
 */
PRM_API int prm_tokens_gather(int32_t *dst, uint64_t stride, uint64_t n,
                              const int32_t *const *seqs,
                              const int32_t *lengths, int32_t pad);

/** @} */

/* ------------------------------------------------------------------------ */
/* Contexts                                                                  */
/* ------------------------------------------------------------------------ */

/**
 * @defgroup prm_contexts Contexts
 * Forward and backward passes, and the gradient accumulator. A context is
 * used by one thread at a time; many contexts may share one model.
 * @{
 */

/**
 * Opaque context: everything a forward/backward of one model mutates
 * (activations kept for the backward, scratch, the gradient accumulator),
 * sized at creation. Created by prm_ctx_new, released by prm_ctx_free.
 */
typedef struct prm_ctx prm_ctx;

/** Newest version of prm_ctx_options (2: threads). */
#define PRM_CTX_OPTIONS_VERSION 2

/**
 * One piece of a context's parallel work: run task number `task` on worker
 * `worker`. The library passes it to the host's prm_parallel_for_fn; hosts
 * never call it otherwise. It never fails, and returns when the piece is
 * done.
 * @param[in] task_arg  the library's argument, passed through unchanged.
 * @param[in] task      which piece, in [0, n_tasks).
 * @param[in] worker    the worker running it, in [0, n_workers).
 */
typedef void (*prm_task_fn)(void *task_arg, uint32_t task, uint32_t worker);

/**
 * The host's parallel loop, for contexts that run on several threads
 * (prm_ctx_options version 2). It must call task(task_arg, t, w) exactly
 * once for every t in [0, n_tasks) -- in any order, on any threads,
 * including the calling one -- and return only when every call has
 * returned. w, in [0, n_workers) of the context's options, names the worker
 * making the call: two calls that overlap in time must not share a w (the
 * context keeps scratch memory per worker). The library creates no thread:
 * it calls this from inside prm_ctx_forward, prm_ctx_backward and the
 * one-call steps and evaluations, on the thread that called them, and never
 * from inside a task. prm_pool_parallel_for is a ready-made implementation.
 * @param[in] parallel_arg  prm_ctx_options.parallel_arg.
 * @param[in] n_tasks       tasks to run (at least 2).
 * @param[in] task          what to run.
 * @param[in] task_arg      its argument.
 */
typedef void (*prm_parallel_for_fn)(void *parallel_arg, uint32_t n_tasks, prm_task_fn task,
                                    void *task_arg);

/** Context configuration. Initialise with prm_ctx_options_init. */
typedef struct prm_ctx_options {
  uint32_t version;   /**< PRM_CTX_OPTIONS_VERSION */
  int32_t inference;  /**< non-zero: scoring only; no activation history and
                           no gradient memory; backward is refused */
  uint64_t max_rows;  /**< most rows one forward may take (1..2^30; a pair
                           batch of P pairs needs 2P) */
  uint64_t max_len;   /**< gpt2/llama: longest sequence (0: the model's
                           n_ctx; at most n_ctx); buffers hold max_rows *
                           max_len tokens, at most 2^30. Ignored by feature
                           models */
  /* version 2: threads (gpt2/llama; feature models run on the caller) */
  uint32_t n_workers; /**< workers parallel_for may run at once, 1..1024
                           (0 means 1; ignored without parallel_for);
                           the context keeps attention scratch for each */
  prm_parallel_for_fn parallel_for; /**< NULL (default): every call runs on
                           the calling thread. Results are bit-identical
                           for any parallel_for and any n_workers: the work
                           is cut into pieces that depend only on its sizes
                           and summed in a fixed order, whoever runs them */
  void *parallel_arg; /**< passed to parallel_for (borrowed for the
                           context's life; e.g. a prm_pool) */
} prm_ctx_options;

/** Initialiser of prm_ctx_options with the defaults of
 *  prm_ctx_options_init. */
#define PRM_CTX_OPTIONS_INIT { PRM_CTX_OPTIONS_VERSION, 0, 0, 0, 1, NULL, NULL }

/**
 * Fill *opts with defaults: training context, max_rows 0 (to be set),
 * max_len 0 (the model's n_ctx), one worker and no parallel_for (version 2).
 * @param[out] opts     the struct to fill.
 * @param[in]  version  1 .. PRM_CTX_OPTIONS_VERSION.
 * @retval PRM_OK           success.
 * @retval PRM_ERR_NULL     opts is NULL.
 * @retval PRM_ERR_VERSION  version is unknown.
 * @par Errors
 * Message to the thread.
 * @par Thread safety
 * Thread-safe (pure).
 * @par Ownership
 * Nothing is kept.
 */
PRM_API int prm_ctx_options_init(prm_ctx_options *opts, uint32_t version);

/**
 * Create a context for `model`. All memory a forward/backward needs for up
 * to opts->max_rows rows is allocated here; later calls never allocate. A
 * training context holds gradients for the model's trainable set as it is
 * now (prm_model_set_trainable).
 *
 * Memory, in fp32 floats, with R = max_rows (linear/mlp: d = input_size,
 * h_l = hidden widths, w = the widest; gpt2: T = max_len, C = n_embd,
 * L = n_layer, NH = n_head, hs = C / NH, B = 32 if T < 512 else 64 (rows
 * of an attention block); W = n_workers), linear in every
 * size:
 * @verbatim
 * mlp inference:  2 R w                 (linear: 0)
 * mlp training:   R d + 2 R w + 2 R sum(h_l) + trainable parameters
 * gpt2 training:  R T [(L-1)(16C + 4 + NH) + 14C + 2] + R (19C + 4 + NH)
 *                 + W T (2B + 4 hs) + trainable parameters
 * gpt2 inference: R T (12C + 4 + NH) + R (13C + 4 + NH) + W T (2B + 2 hs)
 *                                                            (L >= 2)
 *                 R T (5C + 2)       + R (13C + 4 + NH) + W T (2B + 2 hs)
 *                                                            (L = 1)
 * @endverbatim
 * plus 2R floats of scores (R for inference) and, for gpt2 and llama, 16
 * bytes per token of R T (packed ids, positions and key indices).
 * docs/gpt2.md explains each term; llama's formula is in docs/llama.md
 * (also linear in max_rows * max_len). PRM_ERR_NOMEM's message says how
 * many MiB were needed, for activations and for gradients.
 * @param[out] out    receives the context; NULL on failure.
 * @param[in]  model  the model the context computes with.
 * @param[in]  opts   configuration.
 * @retval PRM_OK           success.
 * @retval PRM_ERR_NULL     out, model or opts is NULL.
 * @retval PRM_ERR_VERSION  opts->version is unknown.
 * @retval PRM_ERR_INVALID  max_rows is 0 or above 2^30; token models:
 *                          max_len above the model's n_ctx, or max_rows *
 *                          max_len above 2^30 tokens; n_workers above 1024
 *                          (version 2).
 * @retval PRM_ERR_NOMEM    the buffers cannot be allocated.
 * @par Errors
 * Message to the thread and to the model (prm_model_errmsg).
 * @par Thread safety
 * Model reader: contexts for one model may be created on many threads at
 * once, while others run forwards on it.
 * @par Ownership
 * The caller owns *out: release it with prm_ctx_free. The context keeps a
 * pointer to `model` (borrowed): the model must outlive every use of the
 * context. opts is not kept, but its parallel_for and parallel_arg are: the
 * loop (a prm_pool, say) must outlive every use of the context.
 */
PRM_API int prm_ctx_new(prm_ctx **out, const prm_model *model,
                        const prm_ctx_options *opts);

/**
 * Opaque pool of threads: a prm_parallel_for_fn for hosts that have none.
 * Created by prm_pool_new, released by prm_pool_free.
 */
typedef struct prm_pool prm_pool;

/**
 * Create a pool of n_workers workers for prm_ctx_options.parallel_for: the
 * thread that calls prm_pool_parallel_for is worker 0, and n_workers - 1
 * pthreads created here are the others. Between loops the threads spin for
 * a few tens of microseconds, then sleep.
 * @param[out] out        receives the pool; NULL on failure.
 * @param[in]  n_workers  1..1024 (1: no thread is created).
 * @retval PRM_OK           success.
 * @retval PRM_ERR_NULL     out is NULL.
 * @retval PRM_ERR_INVALID  n_workers is 0 or above 1024.
 * @retval PRM_ERR_NOMEM    memory, or a thread, could not be had.
 * @par Errors
 * Message to the thread.
 * @par Thread safety
 * Thread-safe.
 * @par Ownership
 * The caller owns *out: release it with prm_pool_free after every context
 * that uses it.
 */
PRM_API int prm_pool_new(prm_pool **out, uint32_t n_workers);

/**
 * Stop and join the pool's threads, then release it. NULL is a no-op.
 * @param[in] pool  the pool, or NULL.
 * @par Errors
 * None: never fails.
 * @par Thread safety
 * No loop may be running on the pool, and no context may use it afterwards.
 * @par Ownership
 * The pool is gone.
 */
PRM_API void prm_pool_free(prm_pool *pool);

/**
 * Workers of a pool: the n_workers to put in prm_ctx_options.
 * @param[in] pool  the pool, or NULL.
 * @return n_workers of prm_pool_new; 0 for NULL.
 * @par Errors
 * None: never fails.
 * @par Thread safety
 * Thread-safe.
 * @par Ownership
 * Nothing is kept.
 */
PRM_API uint32_t prm_pool_size(const prm_pool *pool);

/**
 * A prm_parallel_for_fn over a prm_pool: pass the pool as parallel_arg.
 * Tasks are handed out in order to whichever worker is free, the caller
 * included; the call returns when every task has returned, without waiting
 * for workers that got none. Loops from several host threads on one pool
 * (contexts sharing it) run one after the other.
 * @param[in] pool      the prm_pool (NULL: the tasks run on the caller).
 * @param[in] n_tasks   tasks to run.
 * @param[in] task      what to run.
 * @param[in] task_arg  its argument.
 * @par Errors
 * None: never fails.
 * @par Thread safety
 * Thread-safe (calls on one pool wait for each other).
 * @par Ownership
 * Nothing is kept after the call.
 */
PRM_API void prm_pool_parallel_for(void *pool, uint32_t n_tasks, prm_task_fn task,
                                   void *task_arg);

/**
 * Release a context.
 * @param[in] ctx  the context; NULL is a no-op.
 * @par Errors
 * None: never fails.
 * @par Thread safety
 * Context call: no other call may use this context meanwhile. It reads
 * nothing of the model, so other threads may go on using the model (and
 * their own contexts) while it runs, and it may come before or after
 * prm_model_free.
 * @par Ownership
 * The arrays of prm_ctx_grads and the text of prm_ctx_errmsg become
 * invalid.
 */
PRM_API void prm_ctx_free(prm_ctx *ctx);

/**
 * The model this context was created for.
 * @param[in] ctx  the context, or NULL.
 * @return the model, or NULL for NULL.
 * @par Errors
 * None: never fails.
 * @par Thread safety
 * Thread-safe: fixed at creation.
 * @par Ownership
 * The model is the caller's (it was borrowed by prm_ctx_new), not the
 * context's.
 */
PRM_API const prm_model *prm_ctx_model(const prm_ctx *ctx);
/**
 * Most rows one forward may take (prm_ctx_options.max_rows).
 * @param[in] ctx  the context, or NULL.
 * @return max_rows, or 0 for NULL.
 * @par Errors
 * None: never fails.
 * @par Thread safety
 * Thread-safe: fixed at creation.
 * @par Ownership
 * Nothing is kept.
 */
PRM_API uint64_t prm_ctx_max_rows(const prm_ctx *ctx);
/**
 * Longest sequence a token model's context takes (max_len after its
 * default: the model's n_ctx).
 * @param[in] ctx  the context, or NULL.
 * @return max_len; 0 for feature models and for NULL.
 * @par Errors
 * None: never fails.
 * @par Thread safety
 * Thread-safe: fixed at creation.
 * @par Ownership
 * Nothing is kept.
 */
PRM_API uint64_t prm_ctx_max_len(const prm_ctx *ctx);
/**
 * Whether the context is an inference context.
 * @param[in] ctx  the context, or NULL.
 * @return 1 for an inference context, 0 for a training context and for
 *         NULL.
 * @par Errors
 * None: never fails.
 * @par Thread safety
 * Thread-safe: fixed at creation.
 * @par Ownership
 * Nothing is kept.
 */
PRM_API int32_t prm_ctx_is_inference(const prm_ctx *ctx);
/**
 * Gradients the context holds: the trainable parameters of its model when
 * it was created (the count prm_ctx_grads reports).
 * @param[in] ctx  the context, or NULL.
 * @return the count; 0 for an inference context and for NULL.
 * @par Errors
 * None: never fails.
 * @par Thread safety
 * Thread-safe: fixed at creation.
 * @par Ownership
 * Nothing is kept.
 */
PRM_API uint64_t prm_ctx_num_grads(const prm_ctx *ctx);

/**
 * Tokens the last successful forward of a token model ran through the
 * network: the batch's tokens less those its shared prefixes let it skip
 * (prm_batch version 2), each shared prefix counted once. Shows whether a
 * declaration took effect and what a batch cost. The one-call steps and
 * evaluations set it too; a failed forward leaves it as it was.
 * @param[in] ctx  the context, or NULL.
 * @return the count; 0 for feature models, before the first forward and for
 *         NULL.
 * @par Errors
 * None: never fails.
 * @par Thread safety
 * Context call.
 * @par Ownership
 * Nothing is kept.
 */
PRM_API uint64_t prm_ctx_tokens_computed(const prm_ctx *ctx);

/**
 * Detail of the most recent failing call that took this context as an
 * argument. That is any call, const or not (prm_ctx_forward,
 * prm_optimizer_step, prm_train_step, prm_ctx_read_grads, ...; prefrm.h,
 * "Error messages"). Successes never clear it.
 * @param[in] ctx  the context, or NULL.
 * @return the message; "" until the context's first failure and for a NULL
 *         context; never NULL.
 * @par Errors
 * None: never fails.
 * @par Thread safety
 * Context call: one thread at a time, as every call on the context (the
 * buffer has no lock).
 * @par Ownership
 * The context's own buffer: valid until prm_ctx_free; the next failing
 * call involving the context overwrites it.
 */
PRM_API const char *prm_ctx_errmsg(const prm_ctx *ctx);

/**
 * Score a batch: scores[i] = r(row i). A training context also keeps what
 * one following prm_ctx_backward needs, replacing a forward pending from
 * an earlier call.
 *
 * On any failure, `scores` is not written and a pending forward stays
 * ready for its backward (NaN/Inf features included). A model whose
 * parameters overflow can yield NaN/Inf scores from finite inputs; they
 * are returned as they are (PRM_OK) and prm_loss_bt rejects them.
 * @param[in,out] ctx       the context.
 * @param[in]     batch     the rows (see prm_batch).
 * @param[out]    scores    caller buffer of n_scores floats; receives
 *                          batch->n scores, on success only.
 * @param[in]     n_scores  capacity of scores, >= batch->n.
 * @retval PRM_OK             success.
 * @retval PRM_ERR_NULL       ctx, batch or scores is NULL; features
 *                            (linear, mlp), tokens or lengths (gpt2,
 *                            llama) is NULL; only one of prefix_row and
 *                            prefix_len is NULL (version 2).
 * @retval PRM_ERR_VERSION    batch->version is unknown.
 * @retval PRM_ERR_SIZE       n_scores < batch->n; batch->n is 0 or above
 *                            max_rows; feature models: n_features differs
 *                            from the model's input size, row_stride (when
 *                            not 0) is below n_features or above 2^30;
 *                            token models: a length outside [1, max_len],
 *                            or (n > 1) above token_stride; a prefix_len[i]
 *                            above lengths[i] or lengths[prefix_row[i]].
 * @retval PRM_ERR_INVALID    token models: an id outside [0, vocab_size);
 *                            a shared prefix (version 2) whose tokens
 *                            differ from its earlier row's (the message
 *                            names the row and position), a prefix_row[i]
 *                            that is not an earlier row, a negative
 *                            prefix_len, or prefix_len[0] > 0.
 * @retval PRM_ERR_NONFINITE  feature models: a NaN/Inf feature (the
 *                            message names the first).
 * @par Errors
 * Message to the thread and to the context (not to its model).
 * @par Thread safety
 * Context call; model reader.
 * @par Ownership
 * Nothing of the batch is kept: a training context of a feature model
 * copies the features, so the caller may reuse its buffer before
 * prm_ctx_backward; token models copy the ids and lengths into the
 * context (training and inference alike).
 */
PRM_API int prm_ctx_forward(prm_ctx *ctx, const prm_batch *batch,
                            float *scores, uint64_t n_scores);

/**
 * Back-propagate d(loss)/d(scores) of the pending forward and ADD the
 * parameter gradients into the context's accumulator (prm_ctx_grads).
 * Several forward/backward rounds accumulate until prm_ctx_zero_grad or an
 * optimizer step clears them. Each forward allows one backward.
 * On failure the gradients are unchanged and the forward stays pending.
 * @param[in,out] ctx      a training context with a forward pending.
 * @param[in]     dscores  n finite floats.
 * @param[in]     n        must equal the pending forward's batch->n.
 * @retval PRM_OK             success; the forward is consumed.
 * @retval PRM_ERR_NULL       ctx or dscores is NULL.
 * @retval PRM_ERR_STATE      inference context, or no forward pending
 *                            (none yet, already back-propagated, or
 *                            dropped by a one-call path).
 * @retval PRM_ERR_SIZE       n differs from the forward's rows.
 * @retval PRM_ERR_NONFINITE  a NaN/Inf in dscores.
 * @retval PRM_ERR_MISMATCH   the model's trainable set changed since the
 *                            context was created.
 * @par Errors
 * Message to the thread and to the context.
 * @par Thread safety
 * Context call; model reader.
 * @par Ownership
 * dscores is not kept.
 */
PRM_API int prm_ctx_backward(prm_ctx *ctx, const float *dscores, uint64_t n);

/**
 * Set the gradient accumulator to zero.
 * @param[in,out] ctx  a training context.
 * @retval PRM_OK         success.
 * @retval PRM_ERR_NULL   ctx is NULL.
 * @retval PRM_ERR_STATE  inference context.
 * @par Errors
 * Message to the thread and to the context.
 * @par Thread safety
 * Context call.
 * @par Ownership
 * Nothing is kept.
 */
PRM_API int prm_ctx_zero_grad(prm_ctx *ctx);

/**
 * Flat view of the gradient accumulator. The layout of prm_model_params from
 * the trainable offset on (index j holds the gradient of parameter
 * prm_model_trainable_offset() + j as it was when the context was created;
 * with everything trainable, of parameter j). The host may read and write
 * it (e.g. MPI_Allreduce between steps).
 * @param[in,out] ctx  a training context.
 * @param[out]    n    optional; receives the element count (trainable
 *                     parameters; 0 when NULL is returned).
 * @return the array, or NULL for a NULL context or an inference context,
 *         which holds no gradients.
 * @par Errors
 * A NULL return is a failure: message to the thread, and to the context
 * when it is an inference context.
 * @par Thread safety
 * Context call; reading or writing through the pointer counts as a call on
 * the context.
 * @par Ownership
 * The array belongs to the context and stays valid until prm_ctx_free.
 */
PRM_API float *prm_ctx_grads(prm_ctx *ctx, uint64_t *n);

/** @} */

/* ---- Copying gradients in and out ---- */

/**
 * @defgroup prm_grads Copying gradients in and out
 * The accumulator of prm_ctx_grads, as flat slices of its layout (index j
 * is the gradient of parameter prm_model_trainable_offset() + j, as the
 * trainable set was when the context was created) or per tensor. The rules
 * of the parameter copies hold: bounds checked without overflow, n = 0
 * slices copy nothing (the buffer may then be NULL), writes copy all or
 * nothing and refuse NaN/Inf, failures change nothing. Messages go to the
 * thread and to the context. Every call, reads included, is a context
 * call: one thread at a time. Inference contexts hold no gradients:
 * PRM_ERR_STATE.
 * @{
 */

/**
 * Copy gradients [offset, offset + n) into dst.
 * @param[in]  ctx     a training context.
 * @param[in]  offset  first gradient; may equal prm_ctx_num_grads() only
 *                     when n = 0.
 * @param[out] dst     caller buffer of n floats (may be NULL when n = 0).
 * @param[in]  n       gradients to copy.
 * @retval PRM_OK         success.
 * @retval PRM_ERR_NULL   ctx is NULL, or dst is NULL with n > 0.
 * @retval PRM_ERR_STATE  inference context.
 * @retval PRM_ERR_SIZE   the slice reaches past prm_ctx_num_grads().
 * @par Errors
 * Message to the thread and to the context.
 * @par Thread safety
 * Context call.
 * @par Ownership
 * dst is the caller's, written only on success.
 */
PRM_API int prm_ctx_read_grads(const prm_ctx *ctx, uint64_t offset, float *dst,
                               uint64_t n);

/**
 * Overwrite gradients [offset, offset + n) with src, such as the result of
 * an all-reduce done by the host; they are read by the next
 * prm_optimizer_step, and later backwards add to them.
 * @param[in,out] ctx     a training context.
 * @param[in]     offset  first gradient; may equal prm_ctx_num_grads()
 *                        only when n = 0.
 * @param[in]     src     n finite floats (may be NULL when n = 0).
 * @param[in]     n       gradients to write.
 * @retval PRM_OK             success.
 * @retval PRM_ERR_NULL       ctx is NULL, or src is NULL with n > 0.
 * @retval PRM_ERR_STATE      inference context.
 * @retval PRM_ERR_SIZE       the slice reaches past prm_ctx_num_grads().
 * @retval PRM_ERR_NONFINITE  a NaN/Inf in src.
 * @par Errors
 * Message to the thread and to the context.
 * @par Thread safety
 * Context call.
 * @par Ownership
 * src is not kept (copied).
 */
PRM_API int prm_ctx_write_grads(prm_ctx *ctx, uint64_t offset, const float *src,
                                uint64_t n);

/**
 * Copy the gradient of model tensor `index` (prm_model_tensor_info's
 * numbering and shape) into dst.
 * @param[in]  ctx    a training context.
 * @param[in]  index  0 .. prm_model_num_tensors()-1.
 * @param[out] dst    caller buffer of n floats.
 * @param[in]  n      must equal the tensor's element count.
 * @retval PRM_OK           success.
 * @retval PRM_ERR_NULL     ctx or dst is NULL.
 * @retval PRM_ERR_STATE    inference context; or a tensor that was frozen
 *                          when the context was created (it has no
 *                          gradient; the message says so).
 * @retval PRM_ERR_INVALID  index is out of range.
 * @retval PRM_ERR_SIZE     n is not the element count.
 * @par Errors
 * Message to the thread and to the context.
 * @par Thread safety
 * Context call.
 * @par Ownership
 * dst is the caller's, written only on success.
 */
PRM_API int prm_ctx_read_grad(const prm_ctx *ctx, uint32_t index, float *dst,
                              uint64_t n);

/**
 * Overwrite the gradient of model tensor `index` with src.
 * @param[in,out] ctx    a training context.
 * @param[in]     index  0 .. prm_model_num_tensors()-1.
 * @param[in]     src    n finite floats.
 * @param[in]     n      must equal the tensor's element count.
 * @retval PRM_OK             success.
 * @retval PRM_ERR_NULL       ctx or src is NULL.
 * @retval PRM_ERR_STATE      as prm_ctx_read_grad.
 * @retval PRM_ERR_INVALID    index is out of range.
 * @retval PRM_ERR_SIZE       n is not the element count.
 * @retval PRM_ERR_NONFINITE  a NaN/Inf in src.
 * @par Errors
 * Message to the thread and to the context.
 * @par Thread safety
 * Context call.
 * @par Ownership
 * src is not kept (copied).
 */
PRM_API int prm_ctx_write_grad(prm_ctx *ctx, uint32_t index, const float *src,
                               uint64_t n);

/** @} */

/* ------------------------------------------------------------------------ */
/* Pairwise losses (pure functions)                                          */
/* ------------------------------------------------------------------------ */

/**
 * @defgroup prm_losses Pairwise losses
 * The pair loss and its statistics: pure functions over score arrays, so a
 * host can also use them with scores that came from somewhere else.
 * docs/losses.md has the formulas.
 * @{
 */

/** Newest version of prm_loss_options (2 appended the tie fields). */
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

/** Initialiser of prm_loss_options with the defaults of
 *  prm_loss_options_init (plain Bradley-Terry). */
#define PRM_LOSS_OPTIONS_INIT \
  { PRM_LOSS_OPTIONS_VERSION, NULL, NULL, NULL, 0.0, PRM_TIE_NONE, 0.0, NULL }

/**
 * Fill *opts with defaults: plain Bradley-Terry (no margins, labels,
 * weights, centring or ties).
 * @param[out] opts     the struct to fill.
 * @param[in]  version  1 .. PRM_LOSS_OPTIONS_VERSION.
 * @retval PRM_OK           success.
 * @retval PRM_ERR_NULL     opts is NULL.
 * @retval PRM_ERR_VERSION  version is unknown.
 * @par Errors
 * Message to the thread.
 * @par Thread safety
 * Thread-safe (pure).
 * @par Ownership
 * Nothing is kept.
 */
PRM_API int prm_loss_options_init(prm_loss_options *opts, uint32_t version);

/** Newest version of prm_loss_stats (2 appended calibration, ranking and
 *  tie statistics). */
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

/** Initialiser of zeroed prm_loss_stats of the newest version. */
#define PRM_LOSS_STATS_INIT { PRM_LOSS_STATS_VERSION, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0 }

/**
 * Fill *stats with zeros for struct version `version`.
 * @param[out] stats    the struct to fill.
 * @param[in]  version  1 .. PRM_LOSS_STATS_VERSION.
 * @retval PRM_OK           success.
 * @retval PRM_ERR_NULL     stats is NULL.
 * @retval PRM_ERR_VERSION  version is unknown.
 * @par Errors
 * Message to the thread.
 * @par Thread safety
 * Thread-safe (pure).
 * @par Ownership
 * Nothing is kept.
 */
PRM_API int prm_loss_stats_init(prm_loss_stats *stats, uint32_t version);

/**
 * The pair loss, its gradient and its statistics. Bradley-Terry with
 * optional margin, soft label, weight and reward centring, extended to ties
 * by a tie model (Rao-Kupper or Davidson; loss options version 2):
 * @verbatim
 * z_i = r_c[i] - r_r[i] - m_i
 * Bradley-Terry:  l_i = -(p_i log s(z_i) + (1 - p_i) log s(-z_i))
 * with ties:      l_i = -log P_tie(z_i)                          if t_i = 1
 *                 l_i = -(p_i log P_win(z_i) + (1 - p_i) log P_lose(z_i))
 * loss = (1/n) sum_i w_i l_i + c (1/n) sum_i (r_c[i] + r_r[i])^2
 * @endverbatim
 * (p_i = 1 without labels; P_win, P_lose, P_tie of each model are in
 * docs/losses.md). Computed in double in log space; finite for any finite
 * input. theta = 1 / nu = 0 give Bradley-Terry exactly. The loss and
 * statistics are finite for every accepted input; a gradient beyond the
 * float range (only reward centring with scores near FLT_MAX gets there)
 * saturates at +-FLT_MAX.
 * Outputs are untouched on failure.
 * @param[in]  r_chosen    n_pairs finite scores of the chosen responses.
 * @param[in]  r_rejected  n_pairs finite scores of the rejected responses.
 * @param[in]  n_pairs     number of pairs (>= 1).
 * @param[in]  opts        optional (NULL: plain Bradley-Terry); version 1
 *                         or 2.
 * @param[out] loss        optional; receives the loss.
 * @param[in,out] stats    optional; stats->version set by the caller; only
 *                         the fields of that version are written.
 * @param[out] d_chosen    optional (with d_rejected: both or neither);
 *                         receives d(loss)/d(r_c[i]). May not alias the
 *                         inputs.
 * @param[out] d_rejected  optional; receives d(loss)/d(r_r[i]).
 * @retval PRM_OK             success.
 * @retval PRM_ERR_NULL       r_chosen or r_rejected is NULL.
 * @retval PRM_ERR_SIZE       n_pairs is 0.
 * @retval PRM_ERR_VERSION    opts or stats has an unknown version.
 * @retval PRM_ERR_NONFINITE  a NaN/Inf score, margin, label, weight,
 *                            center_coef or tie_param.
 * @retval PRM_ERR_INVALID    a label outside [0,1], a negative weight,
 *                            center_coef outside [0, 1e30], only one
 *                            gradient pointer, an unknown tie_model,
 *                            tie_param out of its range, a tie flag other
 *                            than 0/1, tie flags or a tie_param without a
 *                            tie model, a tie flagged while theta = 1 /
 *                            nu = 0.
 * @par Errors
 * Message to the thread.
 * @par Thread safety
 * Thread-safe (pure; it uses no state besides the thread's message), as
 * long as no other thread writes its arrays meanwhile.
 * @par Ownership
 * Nothing is kept.
 */
PRM_API int prm_loss_bt(const float *r_chosen, const float *r_rejected,
                        uint64_t n_pairs, const prm_loss_options *opts,
                        double *loss, prm_loss_stats *stats,
                        float *d_chosen, float *d_rejected);

/** @} */

/* ------------------------------------------------------------------------ */
/* K-wise ranking losses (pure functions)                                    */
/* ------------------------------------------------------------------------ */

/**
 * @defgroup prm_ranking K-wise ranking losses
 * A group batch holds G groups of K_g >= 2 responses to one prompt each, K_g
 * free per group, ranked best first. Its rows are the groups back to back:
 * rows 0..K_0-1 are group 0 (row 0 its best response), the next K_1 rows
 * group 1, and so on -- N = sum K_g rows in an ordinary prm_batch, so feature
 * and token models take it unchanged and padding costs nothing. The group
 * sizes travel beside the batch as an int32_t array of G entries.
 * @{
 */

/** Ranking losses (prm_rank_options.loss). Values pinned. */
typedef enum prm_rank_loss {
  PRM_RANK_PAIRWISE = 1,      /**< InstructGPT: mean over the K(K-1)/2 pairs */
  PRM_RANK_PLACKETT_LUCE = 2  /**< listwise Plackett-Luce, per choice */
} prm_rank_loss;

/** Newest version of prm_rank_options. */
#define PRM_RANK_OPTIONS_VERSION 1

/** Options of the ranking loss. Initialise with prm_rank_options_init. */
typedef struct prm_rank_options {
  uint32_t version;     /**< PRM_RANK_OPTIONS_VERSION */
  int32_t loss;         /**< prm_rank_loss (default PRM_RANK_PAIRWISE) */
  const float *weight;  /**< optional: w_g >= 0, finite, one per group */
} prm_rank_options;

/** Initialiser of prm_rank_options with the defaults of
 *  prm_rank_options_init. */
#define PRM_RANK_OPTIONS_INIT { PRM_RANK_OPTIONS_VERSION, PRM_RANK_PAIRWISE, NULL }

/**
 * Fill *opts with defaults: InstructGPT pairwise, unweighted.
 * @param[out] opts     the struct to fill.
 * @param[in]  version  1 .. PRM_RANK_OPTIONS_VERSION.
 * @retval PRM_OK           success.
 * @retval PRM_ERR_NULL     opts is NULL.
 * @retval PRM_ERR_VERSION  version is unknown.
 * @par Errors
 * Message to the thread.
 * @par Thread safety
 * Thread-safe (pure).
 * @par Ownership
 * Nothing is kept.
 */
PRM_API int prm_rank_options_init(prm_rank_options *opts, uint32_t version);

/**
 * K-wise ranking loss over a group batch's scores. With r_g,1 the best
 * and r_g,K the worst score of group g:
 * @verbatim
 * pairwise:       l_g = (2 / (K(K-1))) sum_{a<b} -log s(r_g,a - r_g,b)
 * Plackett-Luce:  l_g = (1 / (K-1)) sum_{k<K} -(r_g,k - log sum_{j>=k} e^{r_g,j})
 * loss = (1/G) sum_g w_g l_g
 * @endverbatim
 * Every group counts equally whatever its K (w_g = K_g - 1 restores the
 * plain Plackett-Luce negative log-likelihood). For K = 2 both equal
 * Bradley-Terry. Computed in double, stably; finite for any finite input.
 * Costs O(sum K_g^2).
 * Outputs are untouched on failure.
 * @param[in]  scores       n_scores finite scores, the groups back to back.
 * @param[in]  n_scores     must equal the sum of group_sizes.
 * @param[in]  group_sizes  n_groups sizes K_g >= 2.
 * @param[in]  n_groups     G >= 1.
 * @param[in]  opts         optional (NULL: pairwise, unweighted).
 * @param[out] loss         optional; receives the loss.
 * @param[in,out] stats     optional; stats->version set by the caller.
 *                          Version 2 adds exact_rate and calibration (see
 *                          prm_loss_stats).
 * @param[out] d_scores     optional; receives d(loss)/d(scores[i]),
 *                          n_scores floats. May not alias the inputs.
 * @retval PRM_OK             success.
 * @retval PRM_ERR_NULL       scores or group_sizes is NULL.
 * @retval PRM_ERR_SIZE       n_groups is 0, a K_g < 2, or sizes not summing
 *                            to n_scores.
 * @retval PRM_ERR_VERSION    opts or stats has an unknown version.
 * @retval PRM_ERR_NONFINITE  a NaN/Inf score or weight.
 * @retval PRM_ERR_INVALID    an unknown loss, a negative weight.
 * @par Errors
 * Message to the thread.
 * @par Thread safety
 * Thread-safe (pure), as long as no other thread writes its arrays
 * meanwhile.
 * @par Ownership
 * Nothing is kept.
 */
PRM_API int prm_loss_rank(const float *scores, uint64_t n_scores,
                          const int32_t *group_sizes, uint64_t n_groups,
                          const prm_rank_options *opts, double *loss,
                          prm_loss_stats *stats, float *d_scores);

/** @} */

/* ------------------------------------------------------------------------ */
/* Optimizers                                                                */
/* ------------------------------------------------------------------------ */

/**
 * @defgroup prm_optimizers Optimizers
 * SGD, Adam and AdamW with clipping, schedules and gradient accumulation.
 * An optimizer updates one model from the gradients of a training context.
 * @{
 */

/**
 * Opaque optimizer: algorithm, hyper-parameters, schedule, moments and step
 * counter for one model's trainable set. Created by prm_optimizer_new or
 * prm_optimizer_load(_buffer), released by prm_optimizer_free.
 */
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

/** Newest version of prm_optimizer_options. */
#define PRM_OPTIMIZER_OPTIONS_VERSION 1

/** Optimizer configuration. Initialise with prm_optimizer_options_init.
 *  Real-valued options must be finite as a float (|x| <= FLT_MAX): the
 *  update runs in float. */
typedef struct prm_optimizer_options {
  uint32_t version;       /**< PRM_OPTIMIZER_OPTIONS_VERSION */
  int32_t algorithm;      /**< prm_opt_algo (default AdamW) */
  double lr;              /**< peak learning rate, >= 0 (default 1e-3) */
  double beta1;           /**< Adam(W), in [0, 1) (default 0.9) */
  double beta2;           /**< Adam(W), in [0, 1) (default 0.999) */
  double eps;             /**< Adam(W) (default 1e-8); > 0 as a float, so at
                               least 1.4e-45 (the update runs in float) */
  double weight_decay;    /**< >= 0 (default 0) */
  double momentum;        /**< SGD, >= 0 (default 0) */
  int32_t nesterov;       /**< SGD: non-zero for Nesterov momentum (needs
                               momentum > 0) */
  int32_t no_decay_1d;    /**< non-zero: 1-D tensors (biases) get no decay */
  double max_grad_norm;   /**< global L2 clipping, >= 0; 0 = off (default) */
  int32_t schedule;       /**< prm_schedule (default constant) */
  uint32_t accumulation_steps; /**< apply an update every k-th step call
                                    with the accumulated gradient / k
                                    (>= 1; default 1) */
  uint64_t warmup_steps;  /**< linear warm-up from 0 over this many updates
                               (linear/cosine: at most total_steps) */
  uint64_t total_steps;   /**< linear/cosine: updates until min_lr (>= 1) */
  double min_lr;          /**< floor of linear/cosine decay, >= 0 (default
                               0); linear/cosine: at most lr */
} prm_optimizer_options;

/** Initialiser of prm_optimizer_options with the defaults above. */
#define PRM_OPTIMIZER_OPTIONS_INIT \
  { PRM_OPTIMIZER_OPTIONS_VERSION, PRM_OPT_ADAMW, 1e-3, 0.9, 0.999, 1e-8, \
    0.0, 0.0, 0, 0, 0.0, PRM_SCHED_CONSTANT, 1, 0, 0, 0.0 }

/**
 * Fill *opts with the defaults of prm_optimizer_options.
 * @param[out] opts     the struct to fill.
 * @param[in]  version  1 .. PRM_OPTIMIZER_OPTIONS_VERSION.
 * @retval PRM_OK           success.
 * @retval PRM_ERR_NULL     opts is NULL.
 * @retval PRM_ERR_VERSION  version is unknown.
 * @par Errors
 * Message to the thread.
 * @par Thread safety
 * Thread-safe (pure).
 * @par Ownership
 * Nothing is kept.
 */
PRM_API int prm_optimizer_options_init(prm_optimizer_options *opts,
                                       uint32_t version);

/**
 * Create an optimizer that updates `model`'s trainable set as it is now
 * (prm_model_set_trainable). Moments are allocated here. Options are
 * checked in the precision the update uses: every real-valued option must
 * be finite as a float (|x| <= FLT_MAX) and eps must stay > 0 when rounded
 * to float.
 * @param[out] out    receives the optimizer; NULL on failure.
 * @param[in]  model  the model it will update.
 * @param[in]  opts   configuration.
 * @retval PRM_OK           success.
 * @retval PRM_ERR_NULL     out, model or opts is NULL.
 * @retval PRM_ERR_VERSION  opts->version is unknown.
 * @retval PRM_ERR_INVALID  an unknown algorithm or schedule; lr, eps,
 *                          weight_decay, momentum, max_grad_norm or min_lr
 *                          negative or not finite as a float; eps 0 as a
 *                          float; beta1 or beta2 outside [0, 1); nesterov
 *                          without momentum > 0; accumulation_steps 0;
 *                          linear/cosine: total_steps 0, warmup_steps >
 *                          total_steps, or min_lr > lr.
 * @retval PRM_ERR_NOMEM    the moments cannot be allocated.
 * @par Errors
 * Message to the thread and to the model (which this call takes
 * non-const).
 * @par Thread safety
 * Model reader (it reads the model's layout and trainable set; it writes
 * nothing of the model).
 * @par Ownership
 * The caller owns *out: release it with prm_optimizer_free. The optimizer
 * keeps a pointer to `model` (borrowed): the model must outlive every use
 * of the optimizer. opts is copied.
 */
PRM_API int prm_optimizer_new(prm_optimizer **out, prm_model *model,
                              const prm_optimizer_options *opts);

/**
 * Release an optimizer.
 * @param[in] opt  the optimizer; NULL is a no-op.
 * @par Errors
 * None: never fails.
 * @par Thread safety
 * Optimizer writer: no other call may use this optimizer meanwhile. It
 * reads nothing of the model, so other threads may go on using the model
 * while it runs, and it may come before or after prm_model_free.
 * @par Ownership
 * A string returned by prm_optimizer_errmsg stays valid (it is the calling
 * thread's copy).
 */
PRM_API void prm_optimizer_free(prm_optimizer *opt);

/**
 * One optimizer step from the gradients accumulated in `ctx` (a training
 * context of the same model). With accumulation_steps k, calls 1..k-1 of
 * each cycle only count; call k applies the update using the accumulated
 * gradient divided by k. After an applied update the context's gradients
 * are zeroed.
 * Order of an update: check gradients (any NaN/Inf: return
 * PRM_ERR_NONFINITE_GRAD, change nothing, gradients kept for inspection),
 * scale by 1/k, clip to max_grad_norm, compute the scheduled lr, check that
 * the update leaves every parameter and moment finite (finite gradients can
 * still overflow float, e.g. a huge lr times a large gradient: also
 * PRM_ERR_NONFINITE_GRAD, nothing changed), update. A step never writes a
 * non-finite parameter.
 * @param[in,out] opt  the optimizer.
 * @param[in,out] ctx  a training context of the optimizer's model.
 * @retval PRM_OK                  success (an update applied, or a call
 *                                 counted in the accumulation cycle).
 * @retval PRM_ERR_NULL            opt or ctx is NULL.
 * @retval PRM_ERR_MISMATCH        ctx belongs to another model, or the
 *                                 model's trainable set changed since the
 *                                 optimizer or the context was created.
 * @retval PRM_ERR_STATE           ctx is an inference context.
 * @retval PRM_ERR_NONFINITE_GRAD  NaN/Inf gradients, or an update that
 *                                 would overflow; parameters, moments,
 *                                 counters and gradients unchanged.
 * @par Errors
 * Message to the thread, to the optimizer and to the context.
 * @par Thread safety
 * Model writer; optimizer writer; context call.
 * @par Ownership
 * Nothing is kept.
 */
PRM_API int prm_optimizer_step(prm_optimizer *opt, prm_ctx *ctx);

/**
 * Number of updates applied so far (calls that only counted in an
 * accumulation cycle excluded).
 * @param[in] opt  the optimizer, or NULL.
 * @return the count, or 0 for NULL.
 * @par Errors
 * None: never fails.
 * @par Thread safety
 * Optimizer reader.
 * @par Ownership
 * Nothing is kept.
 */
PRM_API uint64_t prm_optimizer_num_updates(const prm_optimizer *opt);

/**
 * Learning rate the next update will use. The schedule at the current
 * update applied to the base lr, times the lr scale (see
 * prm_optimizer_set_lr_scale).
 * @param[in] opt  the optimizer, or NULL.
 * @return the rate, or 0 for NULL.
 * @par Errors
 * None: never fails.
 * @par Thread safety
 * Optimizer reader.
 * @par Ownership
 * Nothing is kept.
 */
PRM_API double prm_optimizer_lr(const prm_optimizer *opt);

/**
 * Replace the base learning rate (prm_optimizer_options.lr) for every later
 * update. The schedule still applies on top of it, at the optimizer's
 * current position: warm-up rises to the new lr, linear/cosine decay falls
 * from it to min_lr over what is left of total_steps. Updates already
 * applied and the moments are untouched. The new lr is what
 * prm_optimizer_save writes as "lr".
 * @param[in,out] opt  the optimizer.
 * @param[in]     lr   >= 0 and finite as a float, as in the options; with a
 *                     linear or cosine schedule at least min_lr; and lr *
 *                     the current lr scale finite as a float.
 * @retval PRM_OK           success.
 * @retval PRM_ERR_NULL     opt is NULL.
 * @retval PRM_ERR_INVALID  lr breaks a rule above (the optimizer is
 *                          unchanged).
 * @par Errors
 * Message to the thread and to the optimizer.
 * @par Thread safety
 * Optimizer writer.
 * @par Ownership
 * Nothing is kept.
 */
PRM_API int prm_optimizer_set_lr(prm_optimizer *opt, double lr);

/**
 * Multiply the scheduled learning rate of every later update by `scale`
 * (default 1). For a host's reduce-on-plateau rule or a manual cool-down,
 * without touching the schedule: the rate of update t is
 * schedule(t) * scale. A scale of exactly 1 leaves every update bit for bit
 * as without this call. Saved and loaded with the optimizer's state
 * (prm_optimizer_save writes it as "lr_scale" when it is not 1).
 * @param[in,out] opt    the optimizer.
 * @param[in]     scale  finite and >= 0 (0 freezes the parameters while
 *                       moments still update); the base lr times scale
 *                       must be finite as a float.
 * @retval PRM_OK           success.
 * @retval PRM_ERR_NULL     opt is NULL.
 * @retval PRM_ERR_INVALID  scale breaks a rule above (the optimizer is
 *                          unchanged).
 * @par Errors
 * Message to the thread and to the optimizer.
 * @par Thread safety
 * Optimizer writer.
 * @par Ownership
 * Nothing is kept.
 */
PRM_API int prm_optimizer_set_lr_scale(prm_optimizer *opt, double scale);

/**
 * The lr scale of prm_optimizer_set_lr_scale.
 * @param[in] opt  the optimizer, or NULL.
 * @return the scale (1 unless set or loaded), or 0 for NULL.
 * @par Errors
 * None: never fails.
 * @par Thread safety
 * Optimizer reader.
 * @par Ownership
 * Nothing is kept.
 */
PRM_API double prm_optimizer_lr_scale(const prm_optimizer *opt);

/**
 * Global L2 norm of the gradient used by the last applied update, after
 * the 1/k of gradient accumulation and before clipping.
 * @param[in] opt  the optimizer, or NULL.
 * @return the norm; 0 before the first update and for NULL.
 * @par Errors
 * None: never fails.
 * @par Thread safety
 * Optimizer reader.
 * @par Ownership
 * Nothing is kept.
 */
PRM_API double prm_optimizer_last_grad_norm(const prm_optimizer *opt);

/** @} */

/**
 * @addtogroup prm_errors
 * @{
 */

/**
 * Detail of the most recent failing call that took this optimizer as an
 * argument. That is any call, const or not (prm_optimizer_step, prm_train_step,
 * prm_optimizer_save, prm_optimizer_set_lr, ...; the rule of prefrm.h,
 * "Error messages"). Successes never clear it. As for models, the message
 * is written under a lock in the optimizer (saves may run on several
 * threads at once) and this function returns a copy made under it.
 * @param[in] opt  the optimizer, or NULL.
 * @return the message; "" until the optimizer's first failure and for a
 *         NULL optimizer; never NULL.
 * @par Errors
 * None: never fails.
 * @par Thread safety
 * Thread-safe (not with prm_optimizer_free).
 * @par Ownership
 * The calling thread's copy, in thread-local storage: valid, and
 * unchanged, until the thread's next prm_optimizer_errmsg call (on any
 * optimizer) or its exit, even after prm_optimizer_free. It is separate
 * from the copy of prm_model_errmsg.
 */
PRM_API const char *prm_optimizer_errmsg(const prm_optimizer *opt);

/** @} */

/* ---- Saving and resuming (safetensors, F32) ---- */

/**
 * @defgroup prm_optimizer_io Saving and resuming optimizers
 * Optimizer states as safetensors files (F32) or memory buffers;
 * docs/checkpoint-format.md has the layout.
 * @{
 */

/**
 * Save the optimizer's state as a safetensors file. It holds every
 * prm_optimizer_options field (lr: the base rate as last set by
 * prm_optimizer_set_lr), the lr scale when it is not 1 (the file then says
 * "optimizer_version" 2, which libraries before 0.4 refuse instead of
 * dropping the scale; states without a scale stay version 1 and read
 * everywhere), the number of applied updates, the position in the
 * accumulation cycle, the last gradient norm, the model it fits
 * (architecture, parameter count, trainable offset) as `__metadata__`
 * strings, and the moments of the trainable tensors as F32 tensors named as
 * in PyTorch's optimizer state: "exp_avg.NAME" and "exp_avg_sq.NAME"
 * (Adam, AdamW), "momentum_buffer.NAME" (SGD with momentum; plain SGD has
 * none), NAME being the model tensor's name. docs/checkpoint-format.md has
 * the layout.
 *
 * With the model saved by prm_model_save, prm_model_load +
 * prm_optimizer_load resume the run bit-exactly: the next steps write the
 * same parameters as an uninterrupted run. The gradients of an unfinished
 * accumulation cycle belong to the context, not to the optimizer: save
 * between cycles, or carry prm_ctx_grads over yourself
 * (docs/optimizers.md, "Saving and resuming").
 *
 * Atomic and durable exactly as prm_model_save (a `PATH.tmp` that is
 * fsynced and renamed, the same rules for that name and for concurrent
 * saves to one path).
 * @param[in] opt   the optimizer.
 * @param[in] path  file to write (NUL-terminated).
 * @retval PRM_OK         success.
 * @retval PRM_ERR_NULL   opt or path is NULL.
 * @retval PRM_ERR_NOMEM  out of memory, or the file would exceed SIZE_MAX
 *                        bytes.
 * @retval PRM_ERR_IO     as prm_model_save.
 * @par Errors
 * Message to the thread and to the optimizer (not to its model).
 * @par Thread safety
 * Optimizer reader and model reader: saves of one optimizer may run on
 * several threads at once, not together with a step or another optimizer
 * writer on it, nor with a model writer.
 * @par Ownership
 * Nothing is kept.
 */
PRM_API int prm_optimizer_save(const prm_optimizer *opt, const char *path);

/**
 * Serialise the optimizer's state to a caller buffer (the same bytes as
 * prm_optimizer_save). Call with buf == NULL to learn the size: *size_out
 * receives the exact byte count. With a buffer, `capacity` must be at
 * least that size.
 * @param[in]  opt       the optimizer.
 * @param[out] buf       caller buffer of capacity bytes, or NULL to ask
 *                       for the size.
 * @param[in]  capacity  bytes at buf (ignored when buf is NULL).
 * @param[out] size_out  receives the state's size in bytes.
 * @retval PRM_OK         success.
 * @retval PRM_ERR_NULL   opt or size_out is NULL.
 * @retval PRM_ERR_SIZE   capacity is too small (*size_out still receives
 *                        the needed size; buf is not written).
 * @retval PRM_ERR_NOMEM  out of memory, or the state would not fit in
 *                        size_t.
 * @par Errors
 * Message to the thread and to the optimizer.
 * @par Thread safety
 * Optimizer reader and model reader, as prm_optimizer_save.
 * @par Ownership
 * buf is the caller's, written only on success. Nothing is kept.
 */
PRM_API int prm_optimizer_save_buffer(const prm_optimizer *opt, void *buf,
                                      size_t capacity, size_t *size_out);

/**
 * Create an optimizer for `model` from a state written by
 * prm_optimizer_save. It gets the options, counters, lr scale and moments
 * of the saved optimizer (a version-1 state, as 0.3 wrote, has lr scale
 * 1). The model's parameters are not read or written (load them with
 * prm_model_load).
 *
 * The state must fit the model: the same architecture and parameter count,
 * moments of the shapes of the model's tensors, and the same trainable set.
 * The trainable set is not changed here: prm_model_load restores it from a
 * model file (see prm_model_save), or call prm_model_set_trainable as in
 * the saved run before loading. Everything else is validated as for model
 * files (header bounds, offsets, overlaps, dtype F32, finite moments, no
 * missing or extra tensor, every key present and well-formed, options that
 * prm_optimizer_new would accept).
 * @param[out] out    receives the optimizer; NULL on failure.
 * @param[in]  model  the model it will update.
 * @param[in]  path   opened without blocking and read as by prm_model_load.
 * @retval PRM_OK               success.
 * @retval PRM_ERR_NULL         out, model or path is NULL.
 * @retval PRM_ERR_IO           as prm_model_load.
 * @retval PRM_ERR_MISMATCH     the state was saved for another model or
 *                              another trainable set (the message says
 *                              which).
 * @retval PRM_ERR_FORMAT       a malformed file, a model checkpoint instead
 *                              of an optimizer state, a missing or bad key,
 *                              a missing or extra tensor, NaN/Inf moments,
 *                              options or an lr scale prm_optimizer_new or
 *                              prm_optimizer_set_lr_scale would refuse.
 * @retval PRM_ERR_UNSUPPORTED  a state version newer than this library
 *                              reads.
 * @retval PRM_ERR_NOMEM        out of memory.
 * @par Errors
 * Message to the thread and, when model is not NULL, to the model.
 * @par Thread safety
 * Model reader.
 * @par Ownership
 * As prm_optimizer_new: the caller owns *out (prm_optimizer_free), which
 * keeps a pointer to `model` (borrowed). The file is read whole and closed
 * before the call returns.
 */
PRM_API int prm_optimizer_load(prm_optimizer **out, prm_model *model,
                               const char *path);

/**
 * As prm_optimizer_load, from `size` bytes at `buf`: the same validation
 * and statuses, except that PRM_ERR_IO cannot occur.
 * @param[out] out    receives the optimizer; NULL on failure.
 * @param[in]  model  the model it will update.
 * @param[in]  buf    the bytes of an optimizer state.
 * @param[in]  size   bytes at buf.
 * @retval PRM_OK               success.
 * @retval PRM_ERR_NULL         out, model or buf is NULL.
 * @retval PRM_ERR_MISMATCH     as prm_optimizer_load.
 * @retval PRM_ERR_FORMAT       as prm_optimizer_load.
 * @retval PRM_ERR_UNSUPPORTED  as prm_optimizer_load.
 * @retval PRM_ERR_NOMEM        out of memory.
 * @par Errors
 * Message to the thread and, when model is not NULL, to the model.
 * @par Thread safety
 * Model reader.
 * @par Ownership
 * As prm_optimizer_load; buf is not kept.
 */
PRM_API int prm_optimizer_load_buffer(prm_optimizer **out, prm_model *model,
                                      const void *buf, size_t size);

/** @} */

/* ------------------------------------------------------------------------ */
/* One-call training and evaluation                                          */
/* ------------------------------------------------------------------------ */

/**
 * @defgroup prm_onecall One-call training and evaluation
 * Forward, loss, backward and step of a pair or group batch in one call.
 *
 * Failures, in order, for every function of this group:
 *  1. Invalid arguments -- pointers, versions, the batch's sizes, strides
 *     and token ids, the loss or rank options, group sizes, the stats
 *     version -- are all checked before anything runs: nothing changes, and
 *     a forward pending from prm_ctx_forward stays ready for its backward.
 *  2. Once the arguments are valid the forward runs and a pending forward
 *     is dropped, whatever follows: after such a call, successful or not,
 *     prm_ctx_backward answers PRM_ERR_STATE. NaN/Inf features or scores
 *     (PRM_ERR_NONFINITE) then leave the gradients and the model unchanged.
 *  3. If the optimizer step fails (PRM_ERR_NONFINITE_GRAD) the model is
 *     unchanged and this batch's gradients stay accumulated in ctx (call
 *     prm_ctx_zero_grad to drop them).
 * The batch is only read during the call (the features are not copied).
 * @{
 */

/**
 * One training step on a pair batch: forward, loss, backward, step. The
 * pair batch (pairs->n = 2P rows: P chosen then P rejected) is forwarded as
 * one batch, the pair loss computed (prm_loss_bt: Bradley-Terry, or a tie
 * model when loss_opts has one) and back-propagated, and
 * prm_optimizer_step called, with the order of failures of this group.
 *
 * The result equals prm_ctx_forward + prm_loss_bt + prm_ctx_backward +
 * prm_optimizer_step on the same batch. For mlp, gpt2 and llama it runs
 * exactly those computations, so parameters and statistics agree bit for
 * bit (the test suite checks this for mlp). linear computes the pair
 * gradient in blocks of pairs while they are in cache (the features are
 * read once): the same math with the sums in another order, so the results
 * agree to rounding (about 1e-6 relative), not bit for bit.
 * @param[in,out] ctx        a training context.
 * @param[in,out] opt        an optimizer of the same model.
 * @param[in]     pairs      the pair batch.
 * @param[in]     loss_opts  optional (NULL: plain Bradley-Terry).
 * @param[in,out] stats      optional; stats->version set by the caller.
 *                           Written once the loss is computed: on success,
 *                           and also when the step then fails.
 * @retval PRM_OK                  success.
 * @retval PRM_ERR_NULL            ctx, opt or pairs is NULL, or a batch
 *                                 pointer the model reads (as
 *                                 prm_ctx_forward).
 * @retval PRM_ERR_VERSION         pairs, loss_opts or stats has an unknown
 *                                 version.
 * @retval PRM_ERR_STATE           ctx is an inference context.
 * @retval PRM_ERR_MISMATCH        opt and ctx belong to different models,
 *                                 or the model's trainable set changed
 *                                 since either was created.
 * @retval PRM_ERR_SIZE            pairs->n is odd or below 2, or the
 *                                 batch's sizes as prm_ctx_forward checks
 *                                 them (rows above max_rows, n_features,
 *                                 strides, lengths).
 * @retval PRM_ERR_INVALID         a token id outside the vocabulary, a loss
 *                                 option out of range (as prm_loss_bt).
 * @retval PRM_ERR_NONFINITE       a NaN/Inf feature, score or loss option.
 * @retval PRM_ERR_NONFINITE_GRAD  the optimizer step refused the update.
 * @par Errors
 * Message to the thread, to the context and to the optimizer (every
 * failure, those on the arguments included).
 * @par Thread safety
 * Model writer; context call; optimizer writer.
 * @par Ownership
 * Nothing of the batch or the options is kept.
 */
PRM_API int prm_train_step(prm_ctx *ctx, prm_optimizer *opt,
                           const prm_batch *pairs,
                           const prm_loss_options *loss_opts,
                           prm_loss_stats *stats);

/**
 * Forward a pair batch and compute the loss and its statistics without
 * gradients, with the order of failures of this group (no step). Works on
 * training and inference contexts. Gradients and the model are untouched.
 * @param[in,out] ctx        the context.
 * @param[in]     pairs      the pair batch (2P rows).
 * @param[in]     loss_opts  optional (NULL: plain Bradley-Terry).
 * @param[in,out] stats      optional; stats->version set by the caller;
 *                           written on success only.
 * @retval PRM_OK             success.
 * @retval PRM_ERR_NULL       ctx or pairs is NULL, or a batch pointer the
 *                            model reads.
 * @retval PRM_ERR_VERSION    pairs, loss_opts or stats has an unknown
 *                            version.
 * @retval PRM_ERR_SIZE       pairs->n is odd or below 2, or the batch's
 *                            sizes as prm_ctx_forward checks them.
 * @retval PRM_ERR_INVALID    a token id outside the vocabulary, a loss
 *                            option out of range.
 * @retval PRM_ERR_NONFINITE  a NaN/Inf feature, score or loss option.
 * @par Errors
 * Message to the thread and to the context.
 * @par Thread safety
 * Context call; model reader.
 * @par Ownership
 * Nothing of the batch or the options is kept.
 */
PRM_API int prm_evaluate(prm_ctx *ctx, const prm_batch *pairs,
                         const prm_loss_options *loss_opts,
                         prm_loss_stats *stats);

/**
 * prm_train_step for a group batch. The batch (batch->n = sum K_g rows,
 * the groups back to back, each best first) goes through forward,
 * prm_loss_rank, backward and prm_optimizer_step, with the order of
 * failures of this group. The result
 * equals the split calls with prm_loss_rank, running exactly those
 * computations for every architecture (bit for bit; the test suite checks
 * mlp).
 * @param[in,out] ctx          a training context.
 * @param[in,out] opt          an optimizer of the same model.
 * @param[in]     batch        the group batch.
 * @param[in]     group_sizes  n_groups sizes K_g >= 2, summing to batch->n.
 * @param[in]     n_groups     G >= 1.
 * @param[in]     rank_opts    optional (NULL: pairwise, unweighted).
 * @param[in,out] stats        optional; stats->version set by the caller.
 *                             Written once the loss is computed: on
 *                             success, and also when the step then fails.
 * @retval PRM_OK                  success.
 * @retval PRM_ERR_NULL            ctx, opt, batch or group_sizes is NULL,
 *                                 or a batch pointer the model reads.
 * @retval PRM_ERR_VERSION         batch, rank_opts or stats has an unknown
 *                                 version.
 * @retval PRM_ERR_STATE           ctx is an inference context.
 * @retval PRM_ERR_MISMATCH        as prm_train_step.
 * @retval PRM_ERR_SIZE            n_groups is 0, a K_g < 2, sizes not
 *                                 summing to batch->n, batch->n above the
 *                                 context's max_rows, or the batch's sizes
 *                                 as prm_ctx_forward checks them.
 * @retval PRM_ERR_INVALID         an unknown rank loss, a negative weight,
 *                                 a token id outside the vocabulary.
 * @retval PRM_ERR_NONFINITE       a NaN/Inf feature, score or weight.
 * @retval PRM_ERR_NONFINITE_GRAD  the optimizer step refused the update.
 * @par Errors
 * Message to the thread, to the context and to the optimizer.
 * @par Thread safety
 * Model writer; context call; optimizer writer.
 * @par Ownership
 * Nothing of the batch, the sizes or the options is kept.
 */
PRM_API int prm_train_step_groups(prm_ctx *ctx, prm_optimizer *opt,
                                  const prm_batch *batch,
                                  const int32_t *group_sizes, uint64_t n_groups,
                                  const prm_rank_options *rank_opts,
                                  prm_loss_stats *stats);

/**
 * prm_evaluate for a group batch: forward and prm_loss_rank statistics, no
 * gradients, with the order of failures of this group. Works on training
 * and inference contexts.
 * @param[in,out] ctx          the context.
 * @param[in]     batch        the group batch.
 * @param[in]     group_sizes  n_groups sizes K_g >= 2, summing to batch->n.
 * @param[in]     n_groups     G >= 1.
 * @param[in]     rank_opts    optional (NULL: pairwise, unweighted).
 * @param[in,out] stats        optional; stats->version set by the caller;
 *                             written on success only.
 * @retval PRM_OK             success.
 * @retval PRM_ERR_NULL       ctx, batch or group_sizes is NULL, or a batch
 *                            pointer the model reads.
 * @retval PRM_ERR_VERSION    batch, rank_opts or stats has an unknown
 *                            version.
 * @retval PRM_ERR_SIZE       as prm_train_step_groups.
 * @retval PRM_ERR_INVALID    as prm_train_step_groups.
 * @retval PRM_ERR_NONFINITE  a NaN/Inf feature, score or weight.
 * @par Errors
 * Message to the thread and to the context.
 * @par Thread safety
 * Context call; model reader.
 * @par Ownership
 * Nothing of the batch, the sizes or the options is kept.
 */
PRM_API int prm_evaluate_groups(prm_ctx *ctx, const prm_batch *batch,
                                const int32_t *group_sizes, uint64_t n_groups,
                                const prm_rank_options *rank_opts,
                                prm_loss_stats *stats);

/** @} */

/* ---- Evaluation over many batches ---- */

/**
 * @defgroup prm_evalaccum Evaluation over many batches
 * Statistics of an evaluation set larger than a context's max_rows,
 * streamed through prm_evaluate_accum batch by batch.
 * @{
 */

/** Newest version of prm_eval_accum. */
#define PRM_EVAL_ACCUM_VERSION 1
#define PRM_EVAL_CALIB_BINS 10 /**< calibration bins of prm_loss_stats.ece */

/** What an accumulator holds (prm_eval_accum.kind). Values pinned. */
typedef enum prm_eval_kind {
  PRM_EVAL_EMPTY = 0,  /**< nothing yet */
  PRM_EVAL_PAIRS = 1,  /**< pair batches (prm_evaluate_accum) */
  PRM_EVAL_GROUPS = 2  /**< group batches (prm_evaluate_groups_accum) */
} prm_eval_kind;

/**
 * Sums and counts of an evaluation streamed over many batches. From them
 * prm_eval_accum_stats gives every prm_loss_stats field exactly as if all
 * the accumulated pairs (or groups) had been one batch: an evaluation set
 * larger than a context's max_rows is streamed through prm_evaluate_accum
 * batch by batch. Initialise with
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

/** Initialiser of an empty prm_eval_accum. */
#define PRM_EVAL_ACCUM_INIT \
  { PRM_EVAL_ACCUM_VERSION, PRM_EVAL_EMPTY, 0, 0.0, 0, 0.0, 0.0, 0, 0.0, 0.0, \
    0.0, {0}, {0}, 0, 0, 0.0, 0.0 }

/**
 * Fill *acc with an empty accumulator of struct version `version` (use it
 * again to start over).
 * @param[out] acc      the accumulator.
 * @param[in]  version  1 .. PRM_EVAL_ACCUM_VERSION.
 * @retval PRM_OK           success.
 * @retval PRM_ERR_NULL     acc is NULL.
 * @retval PRM_ERR_VERSION  version is unknown.
 * @par Errors
 * Message to the thread.
 * @par Thread safety
 * Thread-safe (pure).
 * @par Ownership
 * Nothing is kept.
 */
PRM_API int prm_eval_accum_init(prm_eval_accum *acc, uint32_t version);

/**
 * prm_evaluate, adding the batch's statistics to *acc instead of writing
 * them. It forwards a pair batch (2P rows, P chosen then P rejected),
 * computes prm_loss_bt and merges. Call it once per batch of an
 * evaluation set, then prm_eval_accum_stats. Batches may use different
 * loss options; each batch's loss counts with its number of pairs. The
 * pending-forward rule of prm_evaluate holds (the arguments, acc included,
 * are checked before the forward).
 * @param[in,out] ctx        the context (training or inference).
 * @param[in]     pairs      the pair batch.
 * @param[in]     loss_opts  optional (NULL: plain Bradley-Terry).
 * @param[in,out] acc        initialised accumulator, empty or holding pair
 *                           batches; unchanged on failure.
 * @retval PRM_OK             success.
 * @retval PRM_ERR_NULL       as prm_evaluate, or acc is NULL.
 * @retval PRM_ERR_VERSION    as prm_evaluate (no stats), or acc->version
 *                            is unknown.
 * @retval PRM_ERR_SIZE       as prm_evaluate.
 * @retval PRM_ERR_INVALID    as prm_evaluate, or acc->kind is no
 *                            prm_eval_kind.
 * @retval PRM_ERR_MISMATCH   acc holds group batches.
 * @retval PRM_ERR_NONFINITE  as prm_evaluate.
 * @par Errors
 * Message to the thread and to the context.
 * @par Thread safety
 * Context call; model reader; one call at a time per accumulator
 * (distinct accumulators are independent).
 * @par Ownership
 * acc is the caller's; nothing is kept.
 */
PRM_API int prm_evaluate_accum(prm_ctx *ctx, const prm_batch *pairs,
                               const prm_loss_options *loss_opts,
                               prm_eval_accum *acc);

/**
 * prm_evaluate_groups, accumulating: forward a group batch, compute
 * prm_loss_rank, merge into *acc (empty or holding group batches). Each
 * batch's loss counts with its number of groups.
 * @param[in,out] ctx          the context (training or inference).
 * @param[in]     batch        the group batch.
 * @param[in]     group_sizes  n_groups sizes K_g >= 2, summing to batch->n.
 * @param[in]     n_groups     G >= 1.
 * @param[in]     rank_opts    optional (NULL: pairwise, unweighted).
 * @param[in,out] acc          initialised accumulator, empty or holding
 *                             group batches; unchanged on failure.
 * @retval PRM_OK             success.
 * @retval PRM_ERR_NULL       as prm_evaluate_groups, or acc is NULL.
 * @retval PRM_ERR_VERSION    as prm_evaluate_groups (no stats), or
 *                            acc->version is unknown.
 * @retval PRM_ERR_SIZE       as prm_evaluate_groups.
 * @retval PRM_ERR_INVALID    as prm_evaluate_groups, or acc->kind is no
 *                            prm_eval_kind.
 * @retval PRM_ERR_MISMATCH   acc holds pair batches.
 * @retval PRM_ERR_NONFINITE  as prm_evaluate_groups.
 * @par Errors
 * Message to the thread and to the context.
 * @par Thread safety
 * Context call; model reader; one call at a time per accumulator.
 * @par Ownership
 * acc is the caller's; nothing is kept.
 */
PRM_API int prm_evaluate_groups_accum(prm_ctx *ctx, const prm_batch *batch,
                                      const int32_t *group_sizes,
                                      uint64_t n_groups,
                                      const prm_rank_options *rank_opts,
                                      prm_eval_accum *acc);

/**
 * The statistics of everything accumulated in the accumulator. They are
 * what prm_loss_bt / prm_loss_rank would give for one batch holding all the
 * pairs (groups): loss = loss_sum / n_units; accuracy, margin_mean, brier,
 * ece, exact_rate, the tie probabilities and the counts from their sums
 * (exact up to the order of floating-point additions: a relative
 * difference of about 1e-15 from the one-batch values); reward_mean and
 * reward_std from the merged moments.
 * For a single accumulated batch every field except loss equals that
 * batch's prm_loss_stats bit for bit (loss may differ in the last bit: it
 * is (loss * P) / P).
 * @param[in]     acc  the accumulator.
 * @param[in,out] out  out->version set by the caller (1 or 2): only the
 *                     fields of that version are written; unchanged on
 *                     failure.
 * @retval PRM_OK           success.
 * @retval PRM_ERR_NULL     acc or out is NULL.
 * @retval PRM_ERR_VERSION  acc->version or out->version is unknown.
 * @retval PRM_ERR_STATE    nothing accumulated.
 * @retval PRM_ERR_INVALID  acc->kind is no prm_eval_kind, or its counts
 *                          contradict each other (not filled by the
 *                          library).
 * @par Errors
 * Message to the thread.
 * @par Thread safety
 * Thread-safe (pure: reads *acc, writes *out), as long as no other thread
 * writes them meanwhile.
 * @par Ownership
 * Nothing is kept.
 */
PRM_API int prm_eval_accum_stats(const prm_eval_accum *acc,
                                 prm_loss_stats *out);

/** @} */

#ifdef __cplusplus
}
#endif

#endif /* PREFRM_H */
