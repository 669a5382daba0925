/*
 * ctx.c - contexts: the generic part (buffers sized at creation, batch
 * checks, forward/backward bookkeeping) and the helpers of the feature
 * architectures. The computation itself belongs to the architecture
 * (lib/arch.h): linear.c, mlp.c, gpt2.c, ...
 */
#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

/* ---- options, creation --------------------------------------------------------------- */

int prm_ctx_options_init(prm_ctx_options *opts, uint32_t version) {
  const prm_ctx_options d = PRM_CTX_OPTIONS_INIT;
  return prmi_init_struct(opts, &d, version == 1 ? offsetof(prm_ctx_options, n_workers) : sizeof d,
                          version, PRM_CTX_OPTIONS_VERSION, "prm_ctx_options_init");
}

void prm_ctx_free(prm_ctx *ctx) {
  if (ctx == NULL) return;
  /* Nothing of the model is read: contexts and models may be freed in any
   * order. */
  ctx->arch->ctx_free(ctx->acts);
  prmi_free(ctx->grads);
  prmi_free(ctx->scores);
  prmi_free(ctx->dscores);
  free(ctx);
}

/* The NOMEM message: how much the context needed, and for what. */
static int fail_nomem(const prm_model *m, const prm_ctx_options *opts, uint64_t max_len) {
  const int train = opts->inference == 0;
  const double f = sizeof(float), MiB = 1024.0 * 1024.0;
  const double acts = f * m->arch->ctx_floats(m, opts->max_rows, max_len, !train, opts->n_workers);
  const double grads = train ? (double)(m->n_params - m->trainable_offset) * f : 0.0;
  char tokens[48] = "";
  if (m->arch->tokens)
    snprintf(tokens, sizeof tokens, " x %llu tokens", (unsigned long long)max_len);
  return prmi_fail(NULL, PRM_ERR_NOMEM,
                   "prm_ctx_new: cannot allocate %.1f MiB for a %s %s context of %llu rows%s "
                   "(activations %.1f MiB, gradients %.1f MiB)",
                   (acts + grads) / MiB, m->arch->name, train ? "training" : "inference",
                   (unsigned long long)opts->max_rows, tokens, acts / MiB, grads / MiB);
}

/* Version 1 ends before the threading fields: read only its bytes. */
#define CTX_OPTIONS_V1_SIZE offsetof(prm_ctx_options, n_workers)

static int ctx_new(prm_ctx **out, const prm_model *model, const prm_ctx_options *in) {
  int rc = prmi_check_version(NULL, in, PRM_CTX_OPTIONS_VERSION, "prm_ctx_options");
  if (rc != PRM_OK) return rc;
  prm_ctx_options o = PRM_CTX_OPTIONS_INIT, *opts = &o;
  memcpy(&o, in, in->version == 1 ? CTX_OPTIONS_V1_SIZE : sizeof o);
  if (o.n_workers > PRMI_MAX_WORKERS)
    return prmi_fail(NULL, PRM_ERR_INVALID, "prm_ctx_new: n_workers %u not in [1, %d]",
                     (unsigned)o.n_workers, PRMI_MAX_WORKERS);
  /* without a parallel_for everything runs on the caller: one worker */
  if (o.n_workers == 0 || o.parallel_for == NULL) o.n_workers = 1;
  if (opts->max_rows < 1 || opts->max_rows > PRMI_MAX_DIM)
    return prmi_fail(NULL, PRM_ERR_INVALID, "prm_ctx_new: max_rows %llu not in [1, 2^30]",
                     (unsigned long long)opts->max_rows);

  uint64_t max_len = 0;
  if (model->arch->tokens) {
    max_len = opts->max_len ? opts->max_len : model->opts.n_ctx;
    if (max_len > model->opts.n_ctx)
      return prmi_fail(NULL, PRM_ERR_INVALID, "prm_ctx_new: max_len %llu > the model's n_ctx %llu",
                       (unsigned long long)max_len, (unsigned long long)model->opts.n_ctx);
    if (max_len > PRMI_MAX_DIM / opts->max_rows)
      return prmi_fail(NULL, PRM_ERR_INVALID, "prm_ctx_new: max_rows * max_len > 2^30 tokens");
  }

  prm_ctx *c = calloc(1, sizeof *c);
  if (c == NULL) return prmi_fail(NULL, PRM_ERR_NOMEM, "prm_ctx_new: out of memory");
  c->model = model;
  c->arch = model->arch;
  c->inference = opts->inference != 0;
  c->max_rows = opts->max_rows;
  c->max_len = max_len;
  c->trainable_offset = model->trainable_offset;
  c->n_workers = opts->n_workers;
  c->parallel_for = opts->parallel_for;
  c->parallel_arg = opts->parallel_arg;
  const uint64_t n = opts->max_rows;
  c->scores = prmi_calloc(n, sizeof(float));
  int ok = c->scores != NULL && c->arch->ctx_new(c) == PRM_OK;
  if (ok && !c->inference) {
    c->dscores = prmi_calloc(n, sizeof(float));
    c->grads = prmi_calloc(model->n_params - c->trainable_offset, sizeof(float));
    ok = c->dscores != NULL && c->grads != NULL;
  }
  if (!ok) {
    prm_ctx_free(c);
    return fail_nomem(model, opts, max_len);
  }
  *out = c;
  return PRM_OK;
}

/* A failure is recorded in the model too: the call takes it (const), and a
 * host that creates contexts for a shared model finds why in
 * prm_model_errmsg. */
int prm_ctx_new(prm_ctx **out, const prm_model *model, const prm_ctx_options *opts) {
  if (out == NULL)
    return prmi_model_record(model, prmi_fail(NULL, PRM_ERR_NULL, "prm_ctx_new: out is NULL"));
  *out = NULL;
  if (model == NULL) return prmi_fail(NULL, PRM_ERR_NULL, "prm_ctx_new: model is NULL");
  return prmi_model_record(model, ctx_new(out, model, opts));
}

const prm_model *prm_ctx_model(const prm_ctx *ctx) { return ctx ? ctx->model : NULL; }

uint64_t prm_ctx_tokens_computed(const prm_ctx *ctx) { return ctx ? ctx->last_tokens : 0; }

const char *prm_ctx_errmsg(const prm_ctx *ctx) { return ctx ? ctx->errmsg : ""; }

int prmi_ctx_record(const prm_ctx *ctx, int status) {
  /* A context is used by one thread at a time (its const calls too), and
   * it is heap-allocated, never defined const: a plain write through the
   * cast pointer is safe. */
  if (ctx != NULL && status != PRM_OK)
    memcpy(((prm_ctx *)ctx)->errmsg, prm_last_errmsg(), PRMI_ERRMSG_SIZE);
  return status;
}

/* ---- feature batches (linear, mlp) ------------------------------------------------------ */

/* Version 1 ends before the shared-prefix fields: its callers' structs are
 * read and written only in their own bytes. */
#define BATCH_V1_SIZE offsetof(prm_batch, prefix_row)

int prm_batch_init(prm_batch *batch, uint32_t version) {
  const prm_batch d = PRM_BATCH_INIT;
  return prmi_init_struct(batch, &d, version == 1 ? BATCH_V1_SIZE : sizeof d, version,
                          PRM_BATCH_VERSION, "prm_batch_init");
}

void prmi_batch_prefix(const prm_batch *b, const int32_t **row, const int32_t **len) {
  *row = *len = NULL;
  if (b->version >= 2 && b->prefix_row != NULL && b->prefix_len != NULL) {
    *row = b->prefix_row;
    *len = b->prefix_len;
  }
}

int prmi_report_nonfinite_feature(prm_ctx *ctx, const prm_batch *b, uint64_t stride) {
  const uint64_t d = b->n_features;
  for (uint64_t i = 0; i < b->n; i++) {
    const float *row = b->features + i * stride;
    if (prmi_all_finite(row, d)) continue;
    for (uint64_t j = 0; j < d; j++)
      if (!isfinite(row[j]))
        return prmi_fail(ctx->errmsg, PRM_ERR_NONFINITE, "forward: feature [%llu, %llu] is %s",
                         (unsigned long long)i, (unsigned long long)j,
                         isnan(row[j]) ? "NaN" : "Inf");
  }
  return PRM_OK;
}

/*
 * Copy n rows of d features (source row stride `stride`) into dst (n, d) and
 * check them on the way: 1 when every feature is finite. One pass over the
 * batch instead of a check and then a copy. The check is an integer max of
 * the magnitude bits, which vectorises without reassociating float sums.
 */
PRMI_TARGET_CLONES
static int prmi_copy_finite(float *restrict dst, const float *restrict src, uint64_t n, uint64_t d,
                            uint64_t stride) {
  uint32_t mx = 0;
  for (uint64_t i = 0; i < n; i++) {
    const float *restrict row = src + i * stride;
    float *restrict out = dst + i * d;
    for (uint64_t j = 0; j < d; j++) {
      float v = row[j];
      uint32_t u;
      memcpy(&u, &v, sizeof u);
      u &= 0x7fffffffu;
      mx = u > mx ? u : mx;
      out[j] = v;
    }
  }
  return mx < 0x7f800000u;
}

int prmi_copy_features(float *dst, const float *src, uint64_t n, uint64_t d, uint64_t stride) {
  return prmi_copy_finite(dst, src, n, d, stride);
}

int prmi_check_feature_batch(prm_ctx *ctx, const prm_batch *b, uint64_t d, uint64_t *stride) {
  if (b->features == NULL)
    return prmi_fail(ctx->errmsg, PRM_ERR_NULL, "forward: batch->features is NULL");
  if (b->n_features != d)
    return prmi_fail(ctx->errmsg, PRM_ERR_SIZE,
                     "forward: batch has %llu features, model takes %llu",
                     (unsigned long long)b->n_features, (unsigned long long)d);
  if (b->n < 1 || b->n > ctx->max_rows)
    return prmi_fail(ctx->errmsg, PRM_ERR_SIZE, "forward: %llu rows, context holds 1..%llu",
                     (unsigned long long)b->n, (unsigned long long)ctx->max_rows);
  const uint64_t st = b->row_stride ? b->row_stride : b->n_features;
  if (st < b->n_features)
    return prmi_fail(ctx->errmsg, PRM_ERR_SIZE, "forward: row_stride %llu < n_features %llu",
                     (unsigned long long)st, (unsigned long long)b->n_features);
  if (st > PRMI_MAX_DIM)
    return prmi_fail(ctx->errmsg, PRM_ERR_SIZE, "forward: row_stride %llu exceeds 2^30",
                     (unsigned long long)st);
  *stride = st;
  return PRM_OK;
}

/* ---- token batches (gpt2, llama) -------------------------------------------------------- */

/* The shared-prefix declaration of a token batch whose rows were checked. */
static int check_prefixes(prm_ctx *ctx, const prm_batch *b) {
  if (b->version < 2 || (b->prefix_row == NULL && b->prefix_len == NULL)) return PRM_OK;
  if (b->prefix_row == NULL || b->prefix_len == NULL)
    return prmi_fail(ctx->errmsg, PRM_ERR_NULL,
                     "forward: batch->%s is NULL but %s is not (set both or neither)",
                     b->prefix_row == NULL ? "prefix_row" : "prefix_len",
                     b->prefix_row == NULL ? "prefix_len" : "prefix_row");
  for (uint64_t i = 0; i < b->n; i++) {
    const int32_t s = b->prefix_len[i];
    if (s == 0) continue;
    const int32_t j = b->prefix_row[i];
    if (s < 0 || i == 0)
      return prmi_fail(ctx->errmsg, PRM_ERR_INVALID,
                       "forward: prefix_len[%llu] = %d (must be %s)", (unsigned long long)i,
                       (int)s, i == 0 ? "0: row 0 has no earlier row" : ">= 0");
    if (j < 0 || (uint64_t)j >= i)
      return prmi_fail(ctx->errmsg, PRM_ERR_INVALID,
                       "forward: prefix_row[%llu] = %d is not an earlier row (0..%llu)",
                       (unsigned long long)i, (int)j, (unsigned long long)(i - 1));
    if (s > b->lengths[i] || s > b->lengths[j])
      return prmi_fail(ctx->errmsg, PRM_ERR_SIZE,
                       "forward: prefix_len[%llu] = %d exceeds lengths[%llu] = %d or "
                       "lengths[%d] = %d", (unsigned long long)i, (int)s, (unsigned long long)i,
                       (int)b->lengths[i], (int)j, (int)b->lengths[j]);
    const int32_t *a = b->tokens + i * b->token_stride, *o = b->tokens + (uint64_t)j * b->token_stride;
    for (int32_t t = 0; t < s; t++)
      if (a[t] != o[t])
        return prmi_fail(ctx->errmsg, PRM_ERR_INVALID,
                         "forward: row %llu declares %d tokens shared with row %d, but token %d "
                         "differs (%d vs %d)", (unsigned long long)i, (int)s, (int)j, (int)t,
                         (int)a[t], (int)o[t]);
  }
  return PRM_OK;
}

int prmi_check_token_batch(prm_ctx *ctx, const prm_batch *b, uint64_t vocab) {
  if (b->tokens == NULL)
    return prmi_fail(ctx->errmsg, PRM_ERR_NULL, "forward: batch->tokens is NULL");
  if (b->lengths == NULL)
    return prmi_fail(ctx->errmsg, PRM_ERR_NULL, "forward: batch->lengths is NULL");
  if (b->n < 1 || b->n > ctx->max_rows)
    return prmi_fail(ctx->errmsg, PRM_ERR_SIZE, "forward: %llu sequences, context holds 1..%llu",
                     (unsigned long long)b->n, (unsigned long long)ctx->max_rows);
  for (uint64_t i = 0; i < b->n; i++) {
    const int32_t len = b->lengths[i];
    if (len < 1 || (uint64_t)len > ctx->max_len)
      return prmi_fail(ctx->errmsg, PRM_ERR_SIZE,
                       "forward: lengths[%llu] = %d not in [1, %llu] (context max_len)",
                       (unsigned long long)i, (int)len, (unsigned long long)ctx->max_len);
    if (b->n > 1 && (uint64_t)len > b->token_stride)
      return prmi_fail(ctx->errmsg, PRM_ERR_SIZE,
                       "forward: lengths[%llu] = %d exceeds token_stride %llu",
                       (unsigned long long)i, (int)len, (unsigned long long)b->token_stride);
    const int32_t *row = b->tokens + i * b->token_stride;
    for (int32_t t = 0; t < len; t++)
      if (row[t] < 0 || (uint64_t)row[t] >= vocab)
        return prmi_fail(ctx->errmsg, PRM_ERR_INVALID,
                         "forward: token [%llu, %d] = %d not in [0, %llu) (vocab_size)",
                         (unsigned long long)i, (int)t, (int)row[t], (unsigned long long)vocab);
  }
  return check_prefixes(ctx, b);
}

/* ---- packed token layout (gpt2, llama) ------------------------------------------------- */

prmi_pack *prmi_pack_new(uint64_t max_rows, uint64_t max_len) {
  const uint64_t T = max_rows * max_len;
  prmi_pack *p = calloc(1, sizeof *p);
  if (p == NULL) return NULL;
  p->off = calloc(max_rows + 1, sizeof *p->off);
  p->first = calloc(max_rows, sizeof *p->first);
  p->len = calloc(max_rows, sizeof *p->len);
  p->last = calloc(max_rows, sizeof *p->last);
  p->kmap_off = calloc(max_rows + 1, sizeof *p->kmap_off);
  p->kmap = calloc(T, sizeof *p->kmap);
  p->pos = calloc(T, sizeof *p->pos);
  p->ids = calloc(T, sizeof *p->ids);
  p->comp_off = calloc(max_rows + 1, sizeof *p->comp_off);
  p->comp_rows = calloc(max_rows, sizeof *p->comp_rows);
  p->root = calloc(max_rows, sizeof *p->root);
  p->comp_of = calloc(max_rows, sizeof *p->comp_of);
  p->cursor = calloc(max_rows, sizeof *p->cursor);
  if (!p->comp_of || !p->cursor || !p->off || !p->first || !p->len || !p->last || !p->kmap_off || !p->kmap || !p->pos ||
      !p->ids || !p->comp_off || !p->comp_rows || !p->root) {
    prmi_pack_free(p);
    return NULL;
  }
  return p;
}

void prmi_pack_free(prmi_pack *p) {
  if (p == NULL) return;
  free(p->off);
  free(p->first);
  free(p->len);
  free(p->last);
  free(p->kmap_off);
  free(p->kmap);
  free(p->pos);
  free(p->ids);
  free(p->comp_off);
  free(p->comp_rows);
  free(p->root);
  free(p->comp_of);
  free(p->cursor);
  free(p);
}

void prmi_pack_tokens(prmi_pack *p, const prm_batch *b) {
  const int32_t *prow, *plen;
  prmi_batch_prefix(b, &prow, &plen);
  uint64_t N = 0, K = 0;
  p->n = b->n;
  p->shared = 0;
  for (uint64_t i = 0; i < b->n; i++) {
    const uint64_t len = (uint64_t)b->lengths[i];
    const uint64_t s = plen != NULL ? (uint64_t)plen[i] : 0;
    const int32_t *row = b->tokens + i * b->token_stride;
    p->off[i] = N;
    p->first[i] = s;
    p->len[i] = len;
    p->kmap_off[i] = K;
    if (s > 0) {
      /* positions [0, s) are those of the earlier row (already mapped) */
      const uint64_t *src = p->kmap + p->kmap_off[prow[i]];
      memcpy(p->kmap + K, src, s * sizeof *p->kmap);
      p->shared = 1;
    }
    for (uint64_t t = s; t < len; t++) {
      p->kmap[K + t] = N + (t - s);
      p->pos[N + (t - s)] = (int32_t)t;
    }
    memcpy(p->ids + N, row + s, (len - s) * sizeof(int32_t));
    p->last[i] = p->kmap[K + len - 1];
    N += len - s;
    K += len;
  }
  p->off[b->n] = N;
  p->kmap_off[b->n] = K;
  p->n_tok = N;
  /* components: a row joins its earlier row's, so a component's first row
   * is the smallest; numbered in the order of their first rows */
  const uint64_t n = b->n;
  uint64_t nc = 0;
  for (uint64_t i = 0; i < n; i++) {
    p->root[i] = p->first[i] > 0 ? p->root[prow[i]] : i;
    p->comp_of[i] = p->root[i] == i ? nc++ : p->comp_of[p->root[i]];
  }
  memset(p->comp_off, 0, (nc + 1) * sizeof *p->comp_off);
  for (uint64_t i = 0; i < n; i++) p->comp_off[p->comp_of[i] + 1]++;
  for (uint64_t c = 0; c < nc; c++) p->comp_off[c + 1] += p->comp_off[c];
  memcpy(p->cursor, p->comp_off, nc * sizeof *p->cursor);
  for (uint64_t i = 0; i < n; i++) p->comp_rows[p->cursor[p->comp_of[i]]++] = i;
  p->n_comp = nc;
}

/*
 * Everything is checked before the first id is written, so a failure leaves
 * dst as it was. The bound on n * stride keeps every index below SIZE_MAX
 * bytes; a length of at most stride keeps each copy inside its row.
 */
int prm_tokens_gather(int32_t *dst, uint64_t stride, uint64_t n, const int32_t *const *seqs,
                      const int32_t *lengths, int32_t pad) {
  const char *fn = "prm_tokens_gather";
  if (n == 0) return PRM_OK;
  if (dst == NULL) return prmi_fail(NULL, PRM_ERR_NULL, "%s: dst is NULL", fn);
  if (seqs == NULL) return prmi_fail(NULL, PRM_ERR_NULL, "%s: seqs is NULL", fn);
  if (lengths == NULL) return prmi_fail(NULL, PRM_ERR_NULL, "%s: lengths is NULL", fn);
  if (stride == 0) return prmi_fail(NULL, PRM_ERR_SIZE, "%s: stride is 0", fn);
  if (n > SIZE_MAX / sizeof(int32_t) / stride)
    return prmi_fail(NULL, PRM_ERR_SIZE, "%s: %llu rows of %llu ids exceed the address space", fn,
                     (unsigned long long)n, (unsigned long long)stride);
  for (uint64_t i = 0; i < n; i++) {
    if (lengths[i] < 1 || (uint64_t)lengths[i] > stride)
      return prmi_fail(NULL, PRM_ERR_SIZE, "%s: lengths[%llu] = %d not in [1, %llu] (stride)", fn,
                       (unsigned long long)i, (int)lengths[i], (unsigned long long)stride);
    if (seqs[i] == NULL)
      return prmi_fail(NULL, PRM_ERR_NULL, "%s: seqs[%llu] is NULL", fn, (unsigned long long)i);
  }
  for (uint64_t i = 0; i < n; i++) {
    int32_t *row = dst + i * stride;
    const uint64_t len = (uint64_t)lengths[i];
    memcpy(row, seqs[i], len * sizeof(int32_t));
    for (uint64_t t = len; t < stride; t++)
      row[t] = pad;
  }
  return PRM_OK;
}

/* ---- forward ------------------------------------------------------------------------ */

int prmi_check_batch(prm_ctx *ctx, const prm_batch *b, uint64_t *stride) {
  int rc = prmi_check_version(ctx->errmsg, b, PRM_BATCH_VERSION, "prm_batch");
  if (rc != PRM_OK) return rc;
  *stride = 0;
  return ctx->arch->check_batch(ctx, b, stride);
}

int prmi_ctx_forward(prm_ctx *ctx, const prm_batch *batch, uint64_t stride, float *scores,
                     int copy_input) {
  int rc = ctx->arch->forward(ctx, batch, stride, scores, copy_input);
  if (rc != PRM_OK) {
    /* copy_input: the architecture checked before overwriting a pending
     * forward; otherwise its activations may be gone */
    if (!copy_input) ctx->have_forward = 0;
    return rc;
  }
  ctx->have_forward = !ctx->inference;
  ctx->last_n = batch->n;
  if (ctx->arch->tokens) {
    const int32_t *prow, *plen;
    prmi_batch_prefix(batch, &prow, &plen);
    uint64_t t = 0;
    for (uint64_t i = 0; i < batch->n; i++)
      t += (uint64_t)batch->lengths[i] - (plen != NULL ? (uint64_t)plen[i] : 0);
    ctx->last_tokens = t;
  }
  return PRM_OK;
}

static int ctx_forward(prm_ctx *ctx, const prm_batch *batch, float *scores, uint64_t n_scores) {
  if (batch == NULL) return prmi_fail(ctx->errmsg, PRM_ERR_NULL, "prm_ctx_forward: batch is NULL");
  if (scores == NULL)
    return prmi_fail(ctx->errmsg, PRM_ERR_NULL, "prm_ctx_forward: scores is NULL");
  if (batch->version >= 1 && batch->version <= PRM_BATCH_VERSION && n_scores < batch->n)
    return prmi_fail(ctx->errmsg, PRM_ERR_SIZE, "prm_ctx_forward: scores holds %llu < %llu rows",
                     (unsigned long long)n_scores, (unsigned long long)batch->n);
  uint64_t stride = 0;
  int rc = prmi_check_batch(ctx, batch, &stride);
  if (rc != PRM_OK) return rc;
  /* The scores go to the context's buffer first and reach the caller only on
   * success: non-finite features are found during the computation (after
   * the first linear map), and a failed call must not have written them. */
  rc = prmi_ctx_forward(ctx, batch, stride, ctx->scores, 1);
  if (rc != PRM_OK) return rc;
  memcpy(scores, ctx->scores, batch->n * sizeof(float));
  return PRM_OK;
}

int prm_ctx_forward(prm_ctx *ctx, const prm_batch *batch, float *scores, uint64_t n_scores) {
  if (ctx == NULL) return prmi_fail(NULL, PRM_ERR_NULL, "prm_ctx_forward: ctx is NULL");
  return prmi_ctx_record(ctx, ctx_forward(ctx, batch, scores, n_scores));
}

/* ---- backward ---------------------------------------------------------------------- */

int prm_ctx_backward(prm_ctx *ctx, const float *dscores, uint64_t n) {
  if (ctx == NULL) return prmi_fail(NULL, PRM_ERR_NULL, "prm_ctx_backward: ctx is NULL");
  if (dscores == NULL)
    return prmi_fail(ctx->errmsg, PRM_ERR_NULL, "prm_ctx_backward: dscores is NULL");
  if (ctx->inference)
    return prmi_fail(ctx->errmsg, PRM_ERR_STATE, "prm_ctx_backward: inference context");
  if (!ctx->have_forward)
    return prmi_fail(ctx->errmsg, PRM_ERR_STATE,
                     "prm_ctx_backward: no forward to back-propagate (one backward per forward)");
  if (n != ctx->last_n)
    return prmi_fail(ctx->errmsg, PRM_ERR_SIZE, "prm_ctx_backward: %llu dscores, forward had %llu",
                     (unsigned long long)n, (unsigned long long)ctx->last_n);
  if (!prmi_all_finite(dscores, n))
    return prmi_fail(ctx->errmsg, PRM_ERR_NONFINITE, "prm_ctx_backward: NaN/Inf in dscores");
  if (ctx->trainable_offset != ctx->model->trainable_offset)
    return prmi_fail(ctx->errmsg, PRM_ERR_MISMATCH,
                     "prm_ctx_backward: the model's trainable parameters changed since this "
                     "context was created; create a new context");
  ctx->arch->backward(ctx, dscores, n);
  ctx->have_forward = 0;
  return PRM_OK;
}

int prm_ctx_zero_grad(prm_ctx *ctx) {
  if (ctx == NULL) return prmi_fail(NULL, PRM_ERR_NULL, "prm_ctx_zero_grad: ctx is NULL");
  if (ctx->inference)
    return prmi_fail(ctx->errmsg, PRM_ERR_STATE, "prm_ctx_zero_grad: inference context");
  memset(ctx->grads, 0, (ctx->model->n_params - ctx->trainable_offset) * sizeof(float));
  return PRM_OK;
}

float *prm_ctx_grads(prm_ctx *ctx, uint64_t *n) {
  if (ctx == NULL || ctx->inference) {
    if (n != NULL) *n = 0;
    if (ctx == NULL)
      prmi_fail(NULL, PRM_ERR_NULL, "prm_ctx_grads: ctx is NULL");
    else
      prmi_fail(ctx->errmsg, PRM_ERR_STATE,
                "prm_ctx_grads: inference context (it holds no gradients)");
    return NULL;
  }
  if (n != NULL) *n = ctx->model->n_params - ctx->trainable_offset;
  return ctx->grads;
}

/* ---- sizes ------------------------------------------------------------------------- */

uint64_t prm_ctx_max_rows(const prm_ctx *ctx) { return ctx ? ctx->max_rows : 0; }

uint64_t prm_ctx_max_len(const prm_ctx *ctx) { return ctx ? ctx->max_len : 0; }

int32_t prm_ctx_is_inference(const prm_ctx *ctx) { return ctx ? ctx->inference : 0; }

/* Gradients the context holds: its trainable suffix as recorded at creation
 * (the layout of prm_ctx_grads). */
static uint64_t num_grads(const prm_ctx *ctx) {
  return ctx->inference ? 0 : ctx->model->n_params - ctx->trainable_offset;
}

uint64_t prm_ctx_num_grads(const prm_ctx *ctx) { return ctx ? num_grads(ctx) : 0; }

/* ---- copying gradients in and out ------------------------------------------------------ */

static int need_grads(const prm_ctx *ctx, const char *fn) {
  if (ctx->inference)
    return prmi_fail(NULL, PRM_ERR_STATE, "%s: inference context (it holds no gradients)", fn);
  return PRM_OK;
}

int prm_ctx_read_grads(const prm_ctx *ctx, uint64_t offset, float *dst, uint64_t n) {
  const char *fn = "prm_ctx_read_grads";
  if (ctx == NULL) return prmi_fail(NULL, PRM_ERR_NULL, "%s: ctx is NULL", fn);
  int rc = need_grads(ctx, fn);
  if (rc == PRM_OK) rc = prmi_check_slice(offset, n, num_grads(ctx), "gradients", fn);
  if (rc == PRM_OK && n > 0 && dst == NULL)
    rc = prmi_fail(NULL, PRM_ERR_NULL, "%s: dst is NULL", fn);
  if (rc == PRM_OK && n > 0) memcpy(dst, ctx->grads + offset, n * sizeof(float));
  return prmi_ctx_record(ctx, rc);
}

int prm_ctx_write_grads(prm_ctx *ctx, uint64_t offset, const float *src, uint64_t n) {
  const char *fn = "prm_ctx_write_grads";
  if (ctx == NULL) return prmi_fail(NULL, PRM_ERR_NULL, "%s: ctx is NULL", fn);
  int rc = need_grads(ctx, fn);
  if (rc == PRM_OK) rc = prmi_check_slice(offset, n, num_grads(ctx), "gradients", fn);
  if (rc == PRM_OK) rc = prmi_check_copy_in(src, n, fn);
  if (rc == PRM_OK && n > 0) memcpy(ctx->grads + offset, src, n * sizeof(float));
  return prmi_ctx_record(ctx, rc);
}

/* The gradient of tensor `index` in ctx's accumulator: PRM_ERR_STATE for a
 * tensor that was frozen when the context was created. */
static int grad_of(const prm_ctx *ctx, uint32_t index, uint64_t n, uint64_t *at, const char *fn) {
  const prmi_tensor *t = NULL;
  int rc = need_grads(ctx, fn);
  if (rc == PRM_OK) rc = prmi_tensor_at(ctx->model, index, &t, fn);
  if (rc == PRM_OK && t->offset < ctx->trainable_offset)
    rc = prmi_fail(NULL, PRM_ERR_STATE,
                   "%s: tensor %s is frozen: the context holds gradients from parameter %llu "
                   "on (prm_model_set_trainable)",
                   fn, t->name, (unsigned long long)ctx->trainable_offset);
  if (rc == PRM_OK) rc = prmi_check_tensor_n(t, n, fn);
  if (rc == PRM_OK) *at = t->offset - ctx->trainable_offset;
  return rc;
}

int prm_ctx_read_grad(const prm_ctx *ctx, uint32_t index, float *dst, uint64_t n) {
  const char *fn = "prm_ctx_read_grad";
  if (ctx == NULL) return prmi_fail(NULL, PRM_ERR_NULL, "%s: ctx is NULL", fn);
  uint64_t at = 0;
  int rc = grad_of(ctx, index, n, &at, fn);
  if (rc == PRM_OK && dst == NULL) rc = prmi_fail(NULL, PRM_ERR_NULL, "%s: dst is NULL", fn);
  if (rc == PRM_OK) memcpy(dst, ctx->grads + at, n * sizeof(float));
  return prmi_ctx_record(ctx, rc);
}

int prm_ctx_write_grad(prm_ctx *ctx, uint32_t index, const float *src, uint64_t n) {
  const char *fn = "prm_ctx_write_grad";
  if (ctx == NULL) return prmi_fail(NULL, PRM_ERR_NULL, "%s: ctx is NULL", fn);
  uint64_t at = 0;
  int rc = grad_of(ctx, index, n, &at, fn);
  if (rc == PRM_OK) rc = prmi_check_copy_in(src, n, fn);
  if (rc == PRM_OK) memcpy(ctx->grads + at, src, n * sizeof(float));
  return prmi_ctx_record(ctx, rc);
}
