/*
 * internal.h - private declarations shared by the files of lib/.
 *
 * Nothing here is exported: the library is built with -fvisibility=hidden and
 * a version script, so only the PRM_API functions of prefrm.h are visible.
 * Internal helpers use the prmi_ prefix.
 */
#ifndef PRM_INTERNAL_H
#define PRM_INTERNAL_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

#include "prefrm.h"

#define PRMI_ERRMSG_SIZE 256
/* Longest tensor name + 1: model names (at most 48 bytes) and optimizer
 * state names, which prefix them with "momentum_buffer." (16 bytes). */
#define PRMI_NAME_SIZE 96

#if defined(__GNUC__)
#define PRMI_PRINTF(a, b) __attribute__((format(printf, a, b)))
#else
#define PRMI_PRINTF(a, b)
#endif

/*
 * PRMI_TARGET_CLONES: compile a hot elementwise loop for AVX-512, AVX2 and the
 * baseline ISA, picked once at load time (GCC/clang function multiversioning,
 * an ifunc), so the library gets wide vectors without -march flags. Only where
 * ifuncs work: x86-64 ELF with glibc, and not under ThreadSanitizer (its
 * runtime is not up yet when ifunc resolvers run). Elsewhere it is empty and
 * the loops are compiled once for the target, as they also are when the
 * build defines PRMI_NO_TARGET_CLONES (to test the baseline code path).
 *
 * Only static functions may carry it, and their names must start with
 * prmi_: clang (14) names the dispatcher of a cloned external function
 * "name.ifunc", so a call from another file to "name" does not link; and it
 * makes the resolver of even a static clone a global symbol
 * "name.resolver", which in libprefrm.a must stay in our namespace (CI's
 * symbols and clang jobs check). A file that needs a cloned kernel elsewhere
 * exports a plain wrapper that calls the static clone (lib/activations.c).
 *
 * The clones give identical results: the library is built with
 * -ffp-contract=off (no FMA contraction) and these loops only do elementwise
 * arithmetic or keep a fixed summation order, so the vector width cannot
 * change a rounding.
 */
#if defined(__x86_64__) && defined(__ELF__) && defined(__GLIBC__) &&                               \
    !defined(__SANITIZE_THREAD__) && !defined(PRMI_NO_TARGET_CLONES) && defined(__has_attribute)
#if __has_attribute(target_clones)
#define PRMI_HAVE_TARGET_CLONES 1
#endif
#endif
#if defined(PRMI_HAVE_TARGET_CLONES) && defined(__has_feature)
#if __has_feature(thread_sanitizer)
#undef PRMI_HAVE_TARGET_CLONES
#endif
#endif
#ifdef PRMI_HAVE_TARGET_CLONES
#define PRMI_TARGET_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define PRMI_TARGET_CLONES
#endif

/* ---- errors (error.c) --------------------------------------------------- */

/*
 * Record a failure: formats the message into the calling thread's last-error
 * buffer and, when handle_msg is not NULL, into that handle's buffer (size
 * PRMI_ERRMSG_SIZE). Returns `status` so callers can write
 *     return prmi_fail(ctx->errmsg, PRM_ERR_SIZE, "n=%zu > max", n);
 */
int prmi_fail(char *handle_msg, int status, const char *fmt, ...)
    PRMI_PRINTF(3, 4);

/*
 * The body of every prm_*_init function: PRM_ERR_NULL for NULL, PRM_ERR_VERSION
 * unless 1 <= version <= newest, else copy `size` bytes of defaults (the size
 * of struct version `version`) into s and set its version field.
 */
int prmi_init_struct(void *s, const void *defaults, size_t size, uint32_t version,
                     uint32_t newest, const char *fn);

/* Copy the calling thread's last message into a handle's buffer (used when
 * a handle-less call made on behalf of the handle failed). Returns status. */
int prmi_adopt_error(char *handle_msg, int status);

/*
 * The message of a handle that several threads may use at once (a model is
 * shared by contexts on many threads, an optimizer may be saved from two):
 * written only by a failing call, copied out only under the lock, so that a
 * failure on one thread and prm_model_errmsg on another never race. The
 * lock is taken on failure and on reading the message, never on a
 * successful call.
 */
typedef struct prmi_errslot {
  pthread_mutex_t lock;
  char msg[PRMI_ERRMSG_SIZE]; /* "" until the first failure */
} prmi_errslot;

/* Which thread-local buffer prmi_errslot_read copies into. */
#define PRMI_ERRSLOT_MODEL 0
#define PRMI_ERRSLOT_OPTIMIZER 1
#define PRMI_ERRSLOT_KINDS 2

/* An empty slot; PRM_ERR_NOMEM when the lock cannot be created (no message). */
int prmi_errslot_init(prmi_errslot *s);
void prmi_errslot_destroy(prmi_errslot *s);
/* When status is a failure, copy the calling thread's last message (that
 * of this failure) into the slot (NULL: nothing), under its lock. Returns
 * status. The slot may belong to a const handle. */
int prmi_errslot_record(const prmi_errslot *s, int status);
/* A copy of the slot's message, made under its lock, in the calling thread's
 * buffer of this kind: valid until the thread's next read of the same kind. */
const char *prmi_errslot_read(const prmi_errslot *s, int kind);

/*
 * Validate the version field of a versioned struct: PRM_ERR_NULL for NULL,
 * PRM_ERR_VERSION unless 1 <= version <= newest. `what` names the struct in
 * the message.
 */
int prmi_check_version(char *handle_msg, const void *versioned,
                       uint32_t newest, const char *what);

/* ---- models (model.c) --------------------------------------------------- */

#include "arch.h"

typedef struct prmi_tensor {
  char name[PRMI_NAME_SIZE];
  uint64_t offset; /* element offset in the parameter arena */
  uint32_t ndim;   /* 1 or 2 */
  uint64_t shape[2];
  uint64_t numel;
} prmi_tensor;

/* Bounds shared by the transformer architectures. */
#define PRMI_GPT2_MAX_LAYER 128
#define PRMI_GPT2_MAX_CTX 65536

/* Most parameters a model may have: keeps every size product far from
 * overflow. */
#define PRMI_MAX_PARAMS ((uint64_t)1 << 34)

struct prm_model {
  prm_model_options opts; /* normalised copy, newest struct version */
  const prmi_arch *arch;  /* never NULL */
  uint64_t n_params;
  float *params;   /* [n_params], 64-byte aligned; NULL until allocated */
  uint32_t n_tensors, cap_tensors;
  prmi_tensor *tensors; /* [n_tensors] in arena order */
  uint64_t head_w;      /* offset of score.weight [1, head_in] (every arch has one) */
  uint64_t head_in;
  void *layout; /* the architecture's private offsets (arch->layout) */
  uint64_t trainable_offset; /* parameters [trainable_offset, n_params) train */
  int has_reward_norm;       /* reward_mean / reward_std are set */
  double reward_mean, reward_std; /* prm_model_set_reward_norm; saved in checkpoints */
  int32_t trainable_blocks;  /* prm_model_set_trainable's n_blocks (while the
                                offset is not 0): saved in checkpoints */
  prmi_errslot err;          /* prm_model_errmsg: written by failing calls on any thread */
};

/* When status is a failure, record the calling thread's message (of the
 * call that failed with it) in the model's; NULL model: nothing. Returns
 * status.
 * Every public function that takes a model, const or not, calls it on
 * failure. */
int prmi_model_record(const prm_model *m, int status);

/* Helpers of the copy-in/copy-out calls (model.c; ctx.c uses them too).
 * Each fails with a thread message naming fn and returns a prm_status. */
/* [offset, offset + n) inside [0, total) (no overflow); what names the unit. */
int prmi_check_slice(uint64_t offset, uint64_t n, uint64_t total, const char *what, const char *fn);
/* src non-NULL (when n > 0) and n finite floats (PRM_ERR_NONFINITE naming
 * the first NaN/Inf). */
int prmi_check_copy_in(const float *src, uint64_t n, const char *fn);
/* Tensor `index` of m into *t, or PRM_ERR_INVALID. */
int prmi_tensor_at(const prm_model *m, uint32_t index, const prmi_tensor **t, const char *fn);
/* n equals the tensor's element count, or PRM_ERR_SIZE. */
int prmi_check_tensor_n(const prmi_tensor *t, uint64_t n, const char *fn);

/*
 * Validate `opts` (any supported version; fields missing from older versions
 * take defaults) and build a model with its layout. alloc_params: also a
 * zeroed arena (0: tensors only, params NULL -- the checkpoint loader
 * checks a file against the layout before it allocates). Parameters are NOT
 * initialised. On failure *out is NULL and the thread error is set.
 */
int prmi_model_alloc(prm_model **out, const prm_model_options *opts, int alloc_params);
/* Allocate the zeroed arena of a model made with alloc_params = 0. */
int prmi_model_alloc_params(prm_model *m);

/* Canonical lowercase name of an activation ("relu", "gelu", "tanh"), or NULL. */
const char *prmi_activation_name(int32_t act);
/* Inverse of prmi_activation_name; 0 when unknown. */
int32_t prmi_activation_from_name(const char *name);

/* ---- activations (activations.c) ----------------------------------------- */

/*
 * za (n): pre-activations z on entry, act(z) on return (inference).
 */
void prmi_act_forward(int32_t act, float *za, uint64_t n);

/*
 * za (n): pre-activations z on entry, act(z) on return -- the same bits as
 * prmi_act_forward. dact (n): act'(z), so that backward is dz = da * dact
 * without transcendental work. za and dact must not overlap.
 */
void prmi_act_forward_grad(int32_t act, float *za, float *dact, uint64_t n);

/* x (n): x[i] = exp(x[i] - shift), vectorised (softmax numerators). */
void prmi_exp_shifted(float *x, uint64_t n, float shift);

/* ---- contexts (ctx.c) ---------------------------------------------------- */

struct prm_ctx {
  const prm_model *model;
  const prmi_arch *arch; /* the model's */
  int inference;
  uint64_t max_rows;
  uint64_t max_len;          /* token models: longest sequence; else 0 */
  uint64_t trainable_offset; /* the model's, when this context was created */
  void *acts;                /* the architecture's activations and scratch */
  float *grads;   /* [n_params - trainable_offset] gradient accumulator of the
                     trainable suffix (training only) */
  float *scores;  /* (max_rows) scores for train_step / evaluate */
  float *dscores; /* (max_rows) d(loss)/d(score) for train_step */
  uint64_t last_n;  /* rows of the last successful forward */
  uint64_t last_tokens; /* tokens it computed (token models) */
  /* threads (prm_ctx_options version 2): work is cut into pieces that
   * depend only on sizes; parallel_for (NULL: the caller) runs them */
  uint32_t n_workers; /* 1 without parallel_for */
  prm_parallel_for_fn parallel_for;
  void *parallel_arg;
  int have_forward; /* a forward awaits its backward */
  /* prm_ctx_errmsg. No lock: a context is used by one thread at a time,
   * const calls included. */
  char errmsg[PRMI_ERRMSG_SIZE];
};

/* When status is a failure, copy the calling thread's message into ctx's
 * (NULL: nothing); returns status. Every public function that takes a
 * context calls it on failure. */
int prmi_ctx_record(const prm_ctx *ctx, int status);

/* The gradient slot of parameter offset `off`, NULL when it is frozen. */
static inline float *prmi_grad_slot(prm_ctx *ctx, uint64_t off) {
  return off >= ctx->trainable_offset ? ctx->grads + (off - ctx->trainable_offset) : NULL;
}

/* Validate a batch for ctx's model (version, pointers, sizes, stride, ids);
 * the row stride of a feature batch goes to *stride. Returns a prm_status. */
int prmi_check_batch(prm_ctx *ctx, const prm_batch *b, uint64_t *stride);

/*
 * Forward a batch already validated by prmi_check_batch (`stride` is what it
 * returned) through ctx's model into scores (n). copy_input: keep a private
 * copy of the features for backward (public prm_ctx_forward); 0: only
 * reference them (the one-call paths, where the batch outlives the
 * backward). The only failure is PRM_ERR_NONFINITE for a NaN/Inf feature,
 * found during the computation: scores may then be partly written, and a
 * pending forward is dropped unless copy_input (which checks before
 * overwriting it). Sets have_forward / last_n on success (training).
 */
int prmi_ctx_forward(prm_ctx *ctx, const prm_batch *batch, uint64_t stride, float *scores,
                     int copy_input);

/* ---- optimizers (optim.c, optim_io.c) ----------------------------------- */

/* A run of the arena that shares one weight-decay setting. */
typedef struct prmi_opt_segment {
  uint64_t offset, numel;
  int decay; /* 0: weight decay off (no_decay_1d and a 1-D tensor) */
} prmi_opt_segment;

struct prm_optimizer {
  prm_model *model;           /* borrowed */
  prm_optimizer_options opts; /* validated copy, newest struct version */
  uint64_t toff;              /* the model's trainable_offset at creation */
  uint64_t n_params;          /* trainable parameters [toff, toff + n_params) */
  /* Adam(W): first moment m. SGD with momentum: momentum buffer. Else NULL. */
  float *m;               /* [n_params], 64-byte aligned */
  float *v;               /* Adam(W): second moment [n_params]; else NULL */
  prmi_opt_segment *segs; /* cover [0, n_params) in order */
  uint32_t n_segs;
  uint64_t num_updates;  /* applied updates */
  uint32_t micro;        /* step calls counted in the current accumulation cycle */
  double last_grad_norm; /* norm (after 1/k, before clipping) of the last update */
  double lr_scale;       /* prm_optimizer_set_lr_scale: multiplies the scheduled lr */
  prmi_errslot err;      /* prm_optimizer_errmsg (saves may run on several threads) */
};

/* The optimizer counterpart of prmi_model_record. */
int prmi_opt_record(const prm_optimizer *opt, int status);

/* Check options (newest struct version): PRM_OK or PRM_ERR_INVALID naming
 * the field, to the thread; fn names the public function. */
int prmi_optimizer_validate(const prm_optimizer_options *o, const char *fn);
/* The rules of a base lr and an lr scale for options o (prm_optimizer_set_lr,
 * prm_optimizer_set_lr_scale, the loader): PRM_OK or PRM_ERR_INVALID. */
int prmi_optimizer_check_lr(const prm_optimizer_options *o, double lr, double scale,
                            const char *fn);
/* A fresh optimizer for model's current trainable set with validated
 * options o: zero moments and counters, lr scale 1. PRM_ERR_NOMEM (message
 * to the thread and the model); *out NULL on failure. */
int prmi_optimizer_alloc(prm_optimizer **out, prm_model *model, const prm_optimizer_options *o,
                         const char *fn);

/* The model an optimizer updates (never NULL for a valid optimizer). */
const prm_model *prmi_optimizer_model(const prm_optimizer *opt);
/* The model's trainable offset when the optimizer was created. */
uint64_t prmi_optimizer_trainable_offset(const prm_optimizer *opt);

/* ---- BLAS (blas.c) ------------------------------------------------------ */

/* Row-major C (m, n) = alpha * op(A) (m, k) * op(B) (k, n) + beta * C. */
void prmi_gemm(int trans_a, int trans_b, uint64_t m, uint64_t n, uint64_t k, float alpha,
               const float *a, uint64_t lda, const float *b, uint64_t ldb, float beta, float *c,
               uint64_t ldc);
/* Row-major y = alpha * op(A) x + beta * y, A (m, n). */
void prmi_gemv(int trans, uint64_t m, uint64_t n, float alpha, const float *a, uint64_t lda,
               const float *x, float beta, float *y);

/* Largest dimension accepted anywhere (fits a BLAS int with room to spare). */
#define PRMI_MAX_DIM ((uint64_t)1 << 30)

/* ---- aligned memory (model.c) ------------------------------------------- */

/* 64-byte aligned, zeroed; NULL on overflow or failure. */
void *prmi_calloc(size_t count, size_t size);
void prmi_free(void *p);

/* ---- threads (parallel.c) ------------------------------------------------ */

#define PRMI_MAX_WORKERS 1024

/* The piece size that cuts n items into at most max_pieces pieces of at
 * least min_piece items (a multiple of 16). Depends on the sizes only. */
uint64_t prmi_piece(uint64_t n, uint64_t min_piece, uint64_t max_pieces);
/* Run fn(arg, t, worker) for t in [0, n_tasks) through ctx's parallel_for,
 * or in order on the caller (worker 0). Not from inside a task. */
void prmi_par_for(const prm_ctx *ctx, uint32_t n_tasks, prm_task_fn fn, void *arg);
/* The range [0, n) in pieces of `piece`: fn(arg, i0, i1, worker). */
typedef void (*prmi_range_fn)(void *arg, uint64_t i0, uint64_t i1, uint32_t worker);
void prmi_par_range(const prm_ctx *ctx, uint64_t n, uint64_t piece, prmi_range_fn fn, void *arg);
/*
 * The pieces gpt2 and llama cut their work into, from sizes only: rows of
 * packed tokens (at most 16 pieces of at least 64 rows), channel ranges (at
 * most 8 of at least 64), and weight-gradient strips: dW (m x n) cut along
 * its larger dimension into at most 8 pieces of at least 256, the other
 * whole (0 in *mt or *nt: undivided). Each strip is one GEMM over the whole
 * token sum and packs both token-long operands, so square tiles would repack
 * them once per cut; strips keep the packing near one GEMM's.
 */
uint64_t prmi_row_piece(uint64_t n);
uint64_t prmi_col_piece(uint64_t n);
void prmi_dw_tiles(uint64_t m, uint64_t n, uint64_t *mt, uint64_t *nt);
/* Bias gradients: db[k] += sum_i dy[i * ld + k] for k < oc, rows in order,
 * in channel pieces (db NULL: frozen, nothing to do). */
void prmi_par_colsum(const prm_ctx *ctx, float *db, const float *dy, uint64_t n, uint64_t oc,
                     uint64_t ld);
/* prmi_gemm in tiles of mt x nt elements of C (0: undivided), one task
 * each: every element sums the whole inner dimension in one call. */
void prmi_par_gemm(const prm_ctx *ctx, int ta, int tb, uint64_t M, uint64_t N, uint64_t K,
                   float alpha, const float *A, uint64_t lda, const float *B, uint64_t ldb,
                   float beta, float *C, uint64_t ldc, uint64_t mt, uint64_t nt);

/* ---- shared numerics (loss.c) ------------------------------------------- */

/* 1 when all n floats are finite. */
int prmi_all_finite(const float *x, uint64_t n);

/*
 * Largest reward-centring coefficient accepted. With |r| <= FLT_MAX,
 * c (r_c + r_r)^2 <= 1e30 * 4.7e77, so the loss stays finite in double for
 * any finite input; real runs use about 0.01 (docs/losses.md).
 */
#define PRMI_MAX_CENTER_COEF 1e30

/*
 * Everything prm_loss_bt checks that is not a score: n_pairs >= 1, struct
 * versions, the option arrays (finite, labels in [0,1], weights >= 0) and
 * center_coef. The one-call paths run it before their forward, so that a bad
 * option changes nothing. Thread error only; returns a prm_status.
 */
int prmi_loss_check_args(const prm_loss_options *opts, const prm_loss_stats *stats, uint64_t n);
/* The caller's loss options (any checked version, or NULL for defaults) as a
 * struct of the newest version; reads only the bytes of the caller's. */
prm_loss_options prmi_loss_options_read(const prm_loss_options *in);
/* Checks of prm_loss_rank that need no scores: sizes against n_rows (each
 * >= 2, summing to n_rows), options and stats version. */
int prmi_rank_check_args(const int32_t *group_sizes, uint64_t n_groups, uint64_t n_rows,
                         const prm_rank_options *opts, const prm_loss_stats *stats);

/* ---- statistics accumulators (loss.c) ---------------------------------- */

/* The statistics of accumulator a (kind PAIRS or GROUPS, n_rewards >= 1),
 * every field of the newest prm_loss_stats but loss (0). */
void prmi_eval_accum_fill(const prm_eval_accum *a, prm_loss_stats *full);
/* dst += src (src non-empty; dst empty or of src's kind). */
void prmi_eval_accum_merge(prm_eval_accum *dst, const prm_eval_accum *src);
/* prm_loss_bt / prm_loss_rank without gradients, their statistics and loss
 * (times the pairs or groups) into a fresh accumulator *batch of that one
 * batch. Same checks and messages as the public functions. */
int prmi_loss_bt_accum(const float *r_chosen, const float *r_rejected, uint64_t n_pairs,
                       const prm_loss_options *opts, prm_eval_accum *batch);
int prmi_loss_rank_accum(const float *scores, uint64_t n_scores, const int32_t *group_sizes,
                         uint64_t n_groups, const prm_rank_options *opts, prm_eval_accum *batch);

/* ---- safetensors documents (safetensors.c) ------------------------------ */

/*
 * A file to write: metadata keys and F32 tensors, described by callbacks so
 * that no copy of the data is made. Model checkpoints and optimizer states
 * are both documents. The header's __metadata__ holds the document's keys
 * (meta: prmi_meta_put), then "format": "pt" and "prefrm_version"; data
 * offsets follow the tensors' order.
 */
typedef struct prmi_st_tensor {
  const char *name; /* at most PRMI_NAME_SIZE - 1 bytes */
  uint32_t ndim;    /* 1 or 2 */
  uint64_t shape[2];
  const float *data; /* shape[0] (x shape[1]) floats */
} prmi_st_tensor;

typedef struct prmi_st_doc {
  void (*meta)(const void *arg, prmi_meta_out *out);
  void (*tensor)(const void *arg, uint32_t i, prmi_st_tensor *t);
  const void *arg;
  uint32_t n_tensors;
} prmi_st_doc;

/* Bytes of the serialised document (0 when it exceeds SIZE_MAX); its JSON
 * header's length goes to *header_len. */
size_t prmi_st_size(const prmi_st_doc *d, size_t *header_len);
/* Serialise into dst, of exactly prmi_st_size bytes. */
void prmi_st_serialise(const prmi_st_doc *d, unsigned char *dst, size_t header_len);
/* Write atomically and durably to path (prmi_file_write_atomic); fn names the
 * public function in messages. */
int prmi_st_save(const char *path, const prmi_st_doc *d, char *handle_msg, const char *fn);

/*
 * Reading: parse and validate a buffer holding a safetensors file (header
 * bounds, JSON, entries' dtypes, offsets, overlaps; no configuration). The
 * handle borrows buf, which must outlive it. Its metadata is read with
 * prmi_ckpt_meta* (arch.h). PRM_ERR_FORMAT / PRM_ERR_NOMEM with a message.
 */
int prmi_st_parse(prmi_ckpt **out, const unsigned char *buf, size_t size);
void prmi_st_free(prmi_ckpt *c);
/* Read tensor `name`, which must be F32 of exactly this shape and finite,
 * into dst; marks it used. PRM_ERR_FORMAT naming the tensor otherwise. */
int prmi_st_read(prmi_ckpt *c, const char *name, uint32_t ndim, const uint64_t shape[2],
                 float *dst);
/* The first tensor (by name) that no prmi_st_read used and that is not
 * ignorable, or NULL: for "unexpected tensor" errors. */
const char *prmi_st_unused(const prmi_ckpt *c);

/* ---- file I/O (fileio.c) ------------------------------------------------ */

/*
 * Every path the library opens goes through these. Opening never blocks
 * (O_NONBLOCK, then fstat: anything but a regular file is PRM_ERR_IO), and
 * messages go to the thread's last error and to handle_msg when not NULL.
 */

/*
 * Read the whole regular file `path` into *buf (malloc'd, the caller frees
 * it; non-NULL even for an empty file) of *size bytes: exactly the st_size
 * that fstat reported when it was opened. A file that shrinks, grows or is
 * rewritten while being read gives PRM_ERR_IO ("changed while being read").
 * Returns PRM_OK, PRM_ERR_IO or PRM_ERR_NOMEM; on failure *buf is NULL.
 */
int prmi_file_read_all(const char *path, unsigned char **buf, size_t *size, char *handle_msg);

/* Writes a file's contents to fd (a blocking, regular file opened for
 * writing, positioned at 0). Returns 0, or an errno value (ENOMEM gives
 * PRM_ERR_NOMEM, anything else PRM_ERR_IO). */
typedef int (*prmi_write_fn)(void *arg, int fd);

/*
 * Replace `path` atomically and durably with what write_fn(arg, fd) writes:
 * into a fresh "<path>.tmp" (mode 0666 & ~umask) held under flock(LOCK_EX),
 * then fsync, rename over `path`, fsync of the directory. A crash leaves at
 * most "<path>.tmp", which the next call for `path` removes. Another call
 * for the same path in progress (any thread or process) gives PRM_ERR_IO
 * "another save to '<path>' is in progress". On any failure before the
 * rename, `path` is unchanged and the temporary file removed.
 * Returns PRM_OK, PRM_ERR_IO or PRM_ERR_NOMEM.
 */
int prmi_file_write_atomic(const char *path, prmi_write_fn write_fn, void *arg,
                           char *handle_msg);

/* write() all n bytes, retrying EINTR and short writes; 0 or an errno value. */
int prmi_fd_write_all(int fd, const void *buf, size_t n);

#endif /* PRM_INTERNAL_H */
