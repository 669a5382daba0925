/*
 * gpt2.c - the GPT-2 reward model (Hugging Face GPT2ForSequenceClassification
 * with num_labels = 1, no dropout): forward and backward over token ids.
 *
 * Packed tokens. A batch of n right-padded sequences with explicit lengths is
 * packed into N = sum(len_i) token rows; padding never enters any buffer, so
 * it costs no compute and cannot change a score or a gradient. Sequence i
 * owns rows [off_i, off_i + len_i); its token at row r has position
 * r - off_i. Every position-wise op (LayerNorm, GEMMs, GELU, residuals) runs
 * on all N rows at once; attention runs per sequence and head.
 *
 * Shapes: C = n_embd, NH = n_head, hs = C / NH, L = n_layer, V = vocab.
 * Weights use HF's Conv1D layout [in, out]: y = x W + b.
 *
 * Block l, on the residual stream res_l (N, C):
 *   ln1  = LN(res_l)                         (N, C)    mean/rstd (N) each
 *   qkv  = ln1 Wqkv + bqkv                   (N, 3C)   q | k | v
 *   atty = causal softmax(q k^T / sqrt(hs)) v, per head   (N, C)
 *   res2 = res_l + atty Wproj + bproj        (N, C)
 *   ln2  = LN(res2)                          (N, C)
 *   fch  = gelu(ln2 Wfc + bfc)               (N, 4C)   and gelu' (N, 4C)
 *   res_{l+1} = res2 + fch Wfcp + bfcp       (N, C)
 * Head: for the last token r_i = off_i + len_i - 1 of each sequence,
 *   score_i = w . LN_f(res_L[r_i])
 *
 * Attention keeps no T x T matrix between forward and backward: the forward
 * stores the log-sum-exp of each softmax row (NH x N floats per layer) and
 * the backward recomputes the probabilities from q, k and it.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "lanes.h"

#define LN_EPS 1e-5f

/* Parameter offsets of one GPT-2 block (Conv1D weights are [in, out]). */
typedef struct gpt2_block {
  uint64_t start;            /* first parameter of the block */
  uint64_t ln1_w, ln1_b;     /* [C] */
  uint64_t attn_w, attn_b;   /* [C, 3C], [3C]: q | k | v */
  uint64_t aproj_w, aproj_b; /* [C, C], [C] */
  uint64_t ln2_w, ln2_b;     /* [C] */
  uint64_t fc_w, fc_b;       /* [C, 4C], [4C] */
  uint64_t mproj_w, mproj_b; /* [4C, C], [C] */
} gpt2_block;

typedef struct gpt2_layout {
  uint64_t wte, wpe;     /* [V, C], [n_ctx, C] */
  uint64_t lnf_w, lnf_b; /* [C] */
  gpt2_block blocks[];   /* [n_layer] */
} gpt2_layout;

#define LAYOUT(m) ((const gpt2_layout *)(m)->layout)

/* ---- pieces of parallel work -------------------------------------------------------------- */

/*
 * Every loop over tokens, channels or (sequence, head) pairs is cut into
 * pieces that depend only on the sizes (parallel.c): rows of the packed
 * tokens (prmi_row_piece), weight gradients in strips over the whole token
 * sum (prmi_dw_tiles), channel ranges (prmi_col_piece), attention per
 * (sequence, head) forward and per (component, head) backward. Each piece
 * writes its own outputs and sums in a fixed order, so results do not
 * depend on the number of threads.
 */

/* ---- LayerNorm ------------------------------------------------------------------------ */

/*
 * The LayerNorm and softmax row kernels are compiled for AVX-512, AVX2 and
 * the baseline (PRMI_TARGET_CLONES) with their reductions in the fixed lanes
 * of lanes.h: the same bits in every clone, and no single-accumulator chain.
 */

/* out = (x - mean) * rstd * w + b per row; stat[2i] = mean, stat[2i+1] = rstd. */
PRMI_TARGET_CLONES
static void prmi_gpt2_layernorm(float *out, float *stat, const float *x, const float *w,
                                const float *b, uint64_t n, uint64_t C) {
  for (uint64_t i = 0; i < n; i++) {
    const float *xi = x + i * C;
    float *oi = out + i * C;
    const float mean = sum_n(xi, C) / (float)C;
    const float var = sqdev_n(xi, mean, C) / (float)C;
    const float rstd = 1.0f / sqrtf(var + LN_EPS);
    for (uint64_t j = 0; j < C; j++) oi[j] = (xi[j] - mean) * rstd * w[j] + b[j];
    if (stat != NULL) {
      stat[2 * i] = mean;
      stat[2 * i + 1] = rstd;
    }
  }
}

/* dx += rstd (dy w - mean(dy w) - xhat mean(dy w xhat)) for n rows; x is the
 * LayerNorm input. */
PRMI_TARGET_CLONES
static void prmi_gpt2_layernorm_dx(float *dx, const float *dy, const float *x, const float *w,
                                   const float *stat, uint64_t n, uint64_t C) {
  for (uint64_t i = 0; i < n; i++) {
    const float *dyi = dy + i * C, *xi = x + i * C;
    const float mean = stat[2 * i], rstd = stat[2 * i + 1];
    float a1[LANES] = {0}, a2[LANES] = {0};
    uint64_t j = 0;
    for (; j + LANES <= C; j += LANES)
      for (int k = 0; k < LANES; k++) {
        const float xhat = (xi[j + k] - mean) * rstd, g = dyi[j + k] * w[j + k];
        a1[k] += g;
        a2[k] += g * xhat;
      }
    for (int k = 0; j < C; j++, k++) {
      const float xhat = (xi[j] - mean) * rstd, g = dyi[j] * w[j];
      a1[k] += g;
      a2[k] += g * xhat;
    }
    const float s1 = lanes_sum(a1) / (float)C, s2 = lanes_sum(a2) / (float)C;
    float *dxi = dx + i * C;
    for (j = 0; j < C; j++) {
      const float xhat = (xi[j] - mean) * rstd;
      dxi[j] += rstd * (dyi[j] * w[j] - s1 - xhat * s2);
    }
  }
}

/* dw += sum_i dy xhat, db += sum_i dy over all n rows, for channels
 * [j0, j1) (rows in order; elementwise across channels). */
PRMI_TARGET_CLONES
static void prmi_gpt2_layernorm_dw(float *dw, float *db, const float *dy, const float *x,
                                   const float *stat, uint64_t n, uint64_t C, uint64_t j0,
                                   uint64_t j1) {
  for (uint64_t i = 0; i < n; i++) {
    const float *dyi = dy + i * C, *xi = x + i * C;
    const float mean = stat[2 * i], rstd = stat[2 * i + 1];
    for (uint64_t j = j0; j < j1; j++) {
      dw[j] += dyi[j] * (xi[j] - mean) * rstd;
      db[j] += dyi[j];
    }
  }
}

typedef struct ln_job {
  float *out, *stat, *dx, *dw, *db;
  const float *x, *w, *b, *dy, *cstat;
  uint64_t n, C;
} ln_job;

static void ln_fwd_piece(void *arg, uint64_t i0, uint64_t i1, uint32_t worker) {
  (void)worker;
  const ln_job *j = arg;
  prmi_gpt2_layernorm(j->out + i0 * j->C, j->stat != NULL ? j->stat + 2 * i0 : NULL,
                    j->x + i0 * j->C, j->w, j->b, i1 - i0, j->C);
}

static void ln_dx_piece(void *arg, uint64_t i0, uint64_t i1, uint32_t worker) {
  (void)worker;
  const ln_job *j = arg;
  prmi_gpt2_layernorm_dx(j->dx + i0 * j->C, j->dy + i0 * j->C, j->x + i0 * j->C, j->w,
                        j->cstat + 2 * i0, i1 - i0, j->C);
}

static void ln_dw_piece(void *arg, uint64_t j0, uint64_t j1, uint32_t worker) {
  (void)worker;
  const ln_job *j = arg;
  prmi_gpt2_layernorm_dw(j->dw, j->db, j->dy, j->x, j->cstat, j->n, j->C, j0, j1);
}

static void par_layernorm_forward(const prm_ctx *ctx, float *out, float *stat, const float *x,
                                  const float *w, const float *b, uint64_t n, uint64_t C) {
  ln_job j = {.out = out, .stat = stat, .x = x, .w = w, .b = b, .n = n, .C = C};
  prmi_par_range(ctx, n, prmi_row_piece(n), ln_fwd_piece, &j);
}

/* dx += ...; dw += ...; db += ... (dw/db NULL: frozen). */
static void par_layernorm_backward(const prm_ctx *ctx, float *dx, float *dw, float *db,
                                   const float *dy, const float *x, const float *w,
                                   const float *stat, uint64_t n, uint64_t C) {
  ln_job j = {.dx = dx, .dw = dw, .db = db, .dy = dy, .x = x, .w = w, .cstat = stat, .n = n,
              .C = C};
  prmi_par_range(ctx, n, prmi_row_piece(n), ln_dx_piece, &j);
  if (dw != NULL) prmi_par_range(ctx, C, prmi_col_piece(C), ln_dw_piece, &j);
}

/* ---- dense layers (Conv1D layout) ----------------------------------------------------- */

typedef struct dense_job {
  float *out, *dact;
  const float *x, *w, *b, *resid;
  uint64_t ic, oc, ldo, ldw; /* out and resid rows: stride ldo; W: stride ldw */
} dense_job;

/* Rows [i0, i1): out = resid + b + x W (resid NULL: b + x W; resid may be
 * out), then GELU in place when dact is set (dact: its derivative, or
 * the out pointer itself for the values only). */
static void dense_fwd_piece(void *arg, uint64_t i0, uint64_t i1, uint32_t worker) {
  (void)worker;
  const dense_job *j = arg;
  const uint64_t ic = j->ic, oc = j->oc, ld = j->ldo, n = i1 - i0;
  float *out = j->out + i0 * ld;
  if (j->resid == NULL) {
    for (uint64_t i = 0; i < n; i++) memcpy(out + i * ld, j->b, oc * sizeof(float));
  } else {
    const float *r = j->resid + i0 * ld;
    for (uint64_t i = 0; i < n; i++)
      for (uint64_t k = 0; k < oc; k++) out[i * ld + k] = r[i * ld + k] + j->b[k];
  }
  prmi_gemm(0, 0, n, oc, ic, 1.0f, j->x + i0 * ic, ic, j->w, j->ldw, 1.0f, out, ld);
  if (j->dact == j->out)
    prmi_act_forward(PRM_ACT_GELU_TANH, out, n * oc);
  else if (j->dact != NULL)
    prmi_act_forward_grad(PRM_ACT_GELU_TANH, out, j->dact + i0 * oc, n * oc);
}

/* out (n, oc) = [resid +] b + x (n, ic) W (ic, oc); gelu: 0 none, 1 GELU
 * with its derivative into dact (n, oc), 2 GELU without. */
static void par_dense_forward(const prm_ctx *ctx, float *out, const float *x, const float *w,
                              const float *b, const float *resid, uint64_t n, uint64_t ic,
                              uint64_t oc, int gelu, float *dact) {
  dense_job j = {.out = out, .dact = gelu == 1 ? dact : gelu == 2 ? out : NULL, .x = x, .w = w,
                 .b = b, .resid = resid, .ic = ic, .oc = oc, .ldo = oc, .ldw = oc};
  prmi_par_range(ctx, n, prmi_row_piece(n), dense_fwd_piece, &j);
}

/* dx (+)= dy W^T (dx NULL: not needed); dW += x^T dy; db += colsum(dy) (dW NULL: frozen). */
static void par_dense_backward(const prm_ctx *ctx, float *dx, int dx_accumulate, float *dw,
                               float *db, const float *dy, const float *x, const float *w,
                               uint64_t n, uint64_t ic, uint64_t oc) {
  if (dx != NULL)
    prmi_par_gemm(ctx, 0, 1, n, ic, oc, 1.0f, dy, oc, w, oc, dx_accumulate ? 1.0f : 0.0f, dx, ic,
                  prmi_row_piece(n), 0);
  if (dw != NULL) {
    uint64_t mt, nt;
    prmi_dw_tiles(ic, oc, &mt, &nt);
    prmi_par_gemm(ctx, 1, 0, ic, oc, n, 1.0f, x, ic, dy, oc, 1.0f, dw, oc, mt, nt);
    prmi_par_colsum(ctx, db, dy, n, oc, oc);
  }
}

typedef struct scale_job {
  float *x;
  const float *f;
} scale_job;

static void mul_piece(void *arg, uint64_t i0, uint64_t i1, uint32_t worker) {
  (void)worker;
  const scale_job *j = arg;
  for (uint64_t k = i0; k < i1; k++) j->x[k] *= j->f[k];
}

/* x[k] *= f[k], k < n */
static void par_mul(const prm_ctx *ctx, float *x, const float *f, uint64_t n) {
  scale_job j = {x, f};
  prmi_par_range(ctx, n, prmi_piece(n, 4096, 16), mul_piece, &j); /* elements */
}

/* ---- attention ------------------------------------------------------------------------- */

/*
 * Causal attention works in blocks of att_block(T) query rows: rows [i0, i1)
 * only see keys [0, i1), so the blocks above the diagonal are never
 * computed (for T = 128 and blocks of 32, 10/16 of the full T x T work).
 *
 * The block height is a trade. Each block's GEMMs pack the i1 keys and
 * values again (CBLAS has no pre-packed operand), a cost of about 1/height
 * of their multiply-adds; the diagonal block computes height/2 masked
 * columns per row, about height/T of the work. A head's GEMMs cannot take
 * several heads at once (each head has its own keys), so a taller block is
 * how gpt2 amortises the packing; llama also stacks the query heads that
 * share a kv head. Measured (docs/dev/benchmarks.md, "Where the time goes
 * (0.5)"): on HH-RLHF training (rows up to 1024 tokens) 64 rows pack 14%
 * less and the step is ~2% shorter; on short rows the masked half of the
 * diagonal block weighs more, and gpt2-tiny (T = 128) showed no gain.
 * The height depends on T only, so every worker count computes the same.
 */
#define ATT_BLOCK_SHORT 32
#define ATT_BLOCK_LONG 64
#define ATT_LONG_FROM 512 /* sequences of this many tokens use the tall blocks */

static uint64_t att_block(uint64_t T) {
  return T >= ATT_LONG_FROM ? ATT_BLOCK_LONG : ATT_BLOCK_SHORT;
}

/*
 * Causal softmax of the rows i0..i1-1 of a query block (row i - i0 of S,
 * stride T, sees columns 0..i): in place, columns i+1..i1-1 zeroed;
 * lse[i - i0] = log sum_j exp(s_ij) unless lse is NULL.
 */
PRMI_TARGET_CLONES
static void prmi_gpt2_softmax_rows(float *S, uint64_t T, uint64_t i0, uint64_t i1, float *lse) {
  for (uint64_t i = i0; i < i1; i++) {
    float *si = S + (i - i0) * T;
    const float m = max_n(si, i + 1);
    prmi_exp_shifted(si, i + 1, m);
    const float sum = sum_n(si, i + 1);
    const float inv = 1.0f / sum;
    for (uint64_t j = 0; j <= i; j++) si[j] *= inv;
    for (uint64_t j = i + 1; j < i1; j++) si[j] = 0.0f;
    if (lse != NULL) lse[i - i0] = m + logf(sum);
  }
}

/* dS = P (dP - rowsum(P dP)) * scale in place of dP, the same rows. */
PRMI_TARGET_CLONES
static void prmi_gpt2_softmax_bwd_rows(const float *P, float *dP, uint64_t T, uint64_t i0,
                                       uint64_t i1, float scale) {
  for (uint64_t i = i0; i < i1; i++) {
    const float *pi = P + (i - i0) * T;
    float *dpi = dP + (i - i0) * T;
    const float dsum = dot_n(pi, dpi, i + 1);
    for (uint64_t j = 0; j <= i; j++) dpi[j] = pi[j] * (dpi[j] - dsum) * scale;
    for (uint64_t j = i + 1; j < i1; j++) dpi[j] = 0.0f;
  }
}

/* Softmax of one full row s[0..T) in place; returns its log-sum-exp. */
PRMI_TARGET_CLONES
static float prmi_gpt2_softmax_vec(float *s, uint64_t T) {
  const float mx = max_n(s, T);
  prmi_exp_shifted(s, T, mx);
  const float sum = sum_n(s, T);
  const float inv = 1.0f / sum;
  for (uint64_t x = 0; x < T; x++) s[x] *= inv;
  return mx + logf(sum);
}

/*
 * Causal attention of one head of one sequence of T tokens, for its queries
 * at positions p0..T-1 (p0 > 0: the first p0 tokens are a shared prefix,
 * whose queries an earlier row computes). q: the first query (row stride
 * 3C); k, v: position 0's key and value (row stride ldkv: 3C in place, 2 hs
 * when gathered). S is (att_block(T), T) scratch, one query block at a time,
 * so that it grows linearly with the sequence length. Output rows from out
 * (stride C); lse[i - p0] = log sum_j exp(s_ij) of query i (NULL: not kept).
 */
static void attention_forward(float *out, float *lse, const float *q, const float *k,
                              const float *v, uint64_t ldkv, float *S, uint64_t p0, uint64_t T,
                              uint64_t C, uint64_t hs) {
  const float scale = 1.0f / sqrtf((float)hs);
  const uint64_t B = att_block(T);
  for (uint64_t i0 = p0; i0 < T; i0 += B) {
    const uint64_t i1 = i0 + B < T ? i0 + B : T;
    /* S holds this block only: row i - i0, columns 0..i1 */
    prmi_gemm(0, 1, i1 - i0, i1, hs, scale, q + (i0 - p0) * 3 * C, 3 * C, k, ldkv, 0.0f, S, T);
    prmi_gpt2_softmax_rows(S, T, i0, i1, lse != NULL ? lse + (i0 - p0) : NULL);
    prmi_gemm(0, 0, i1 - i0, hs, i1, 1.0f, S, T, v, ldkv, 0.0f, out + (i0 - p0) * C, C);
  }
}

/*
 * Backward of attention_forward for one head (the same q, k, v, lse, p0
 * and T; dout rows from the first query, stride C). dq rows (stride 3C) of
 * the queries are overwritten; dk and dv (row stride lddkv) of every
 * position 0..T-1 are overwritten too: the blocks run last to first, so the
 * last one (which sees every key) initialises them and the others
 * accumulate. Needs p0 < T. P and dP are (att_block(T), T) scratch.
 */
static void attention_backward(float *dq, float *dk, float *dv, uint64_t lddkv,
                               const float *dout, const float *q, const float *k, const float *v,
                               uint64_t ldkv, const float *lse, float *P, float *dP, uint64_t p0,
                               uint64_t T, uint64_t C, uint64_t hs) {
  const float scale = 1.0f / sqrtf((float)hs);
  const uint64_t B = att_block(T), n_blocks = (T - p0 + B - 1) / B;
  for (uint64_t b = n_blocks; b-- > 0;) {
    const uint64_t i0 = p0 + b * B, i1 = i0 + B < T ? i0 + B : T;
    const uint64_t m = i1 - i0, r0 = i0 - p0; /* r0: the block's first query row */
    const float beta = b + 1 == n_blocks ? 0.0f : 1.0f;
    /* P = exp(q k^T scale - lse), causal */
    prmi_gemm(0, 1, m, i1, hs, scale, q + r0 * 3 * C, 3 * C, k, ldkv, 0.0f, P, T);
    for (uint64_t i = i0; i < i1; i++) {
      float *pi = P + (i - i0) * T;
      prmi_exp_shifted(pi, i + 1, lse[i - p0]);
      for (uint64_t j = i + 1; j < i1; j++) pi[j] = 0.0f;
    }
    /* dv (+)= P^T dout; dP = dout v^T */
    prmi_gemm(1, 0, i1, hs, m, 1.0f, P, T, dout + r0 * C, C, beta, dv, lddkv);
    prmi_gemm(0, 1, m, i1, hs, 1.0f, dout + r0 * C, C, v, ldkv, 0.0f, dP, T);
    /* dS = P (dP - rowsum(P dP)) * scale */
    prmi_gpt2_softmax_bwd_rows(P, dP, T, i0, i1, scale);
    /* dq = dS k; dk (+)= dS^T q */
    prmi_gemm(0, 0, m, hs, i1, 1.0f, dP, T, k, ldkv, 0.0f, dq + r0 * 3 * C, 3 * C);
    prmi_gemm(1, 0, i1, hs, m, 1.0f, dP, T, q + r0 * 3 * C, 3 * C, beta, dk, lddkv);
  }
}

/* Gather head h's key and value of positions 0..T-1 (packed rows kmap[t])
 * of a (., 3C) qkv buffer into kv (T, 2 hs): k | v. */
static void gather_kv(float *kv, const float *qkv, const uint64_t *kmap, uint64_t T, uint64_t C,
                      uint64_t hs, uint64_t h) {
  for (uint64_t t = 0; t < T; t++) {
    const float *src = qkv + kmap[t] * 3 * C + C + h * hs;
    memcpy(kv + t * 2 * hs, src, hs * sizeof(float));
    memcpy(kv + t * 2 * hs + hs, src + C, hs * sizeof(float));
  }
}

/* The reverse of gather_kv for gradients: positions from `own` on are the
 * row's own (written here first: set), earlier ones an earlier row's (add). */
static void scatter_dkv(float *dqkv, const float *dkv, const uint64_t *kmap, uint64_t own,
                        uint64_t T, uint64_t C, uint64_t hs, uint64_t h) {
  for (uint64_t t = 0; t < T; t++) {
    float *dk = dqkv + kmap[t] * 3 * C + C + h * hs, *dv = dk + C;
    const float *s = dkv + t * 2 * hs;
    if (t >= own) {
      memcpy(dk, s, hs * sizeof(float));
      memcpy(dv, s + hs, hs * sizeof(float));
    } else {
      for (uint64_t j = 0; j < hs; j++) {
        dk[j] += s[j];
        dv[j] += s[hs + j];
      }
    }
  }
}

/* ---- context buffers -------------------------------------------------------------------- */

/* Activations kept for backward, per block. A training context owns one set
 * per block; an inference context points every block at one set (the forward
 * is written so that res and res2 may alias: the residual adds are in place). */
typedef struct gpt2_layer_acts {
  float *res;      /* (N, C) residual stream entering the block */
  float *ln1;      /* (N, C) */
  float *ln1_stat; /* (N, 2) mean, rstd */
  float *qkv;      /* (N, 3C) */
  float *atty;     /* (N, C) attention output before c_proj */
  float *lse;      /* (NH, max_tok) log-sum-exp of each softmax row */
  float *res2;     /* (N, C) residual after attention */
  float *ln2;      /* (N, C) */
  float *ln2_stat; /* (N, 2) */
  float *fch;      /* (N, 4C) gelu(c_fc) */
  float *dgelu;    /* (N, 4C) gelu'(.) (training only) */
} gpt2_layer_acts;

/*
 * The last block only matters at the n pooled tokens: its attention output,
 * MLP and residual at every other position feed nothing. It computes keys and
 * values for all tokens, and everything else for the n last tokens only, in
 * compact (n, .) buffers -- (L-1)/L of the work of a full last block is saved
 * with the same result.
 */
typedef struct gpt2_last_acts {
  float *q;        /* (R, C) queries of the last tokens */
  float *ln1;      /* (R, C) ln1 of the last tokens (gathered) */
  float *lse;      /* (NH, R) */
  float *atty;     /* (R, C) */
  float *res2;     /* (R, C) */
  float *ln2;      /* (R, C) */
  float *ln2_stat; /* (R, 2) */
  float *fch;      /* (R, 4C) */
  float *dgelu;    /* (R, 4C) */
  float *out;      /* (R, C) residual stream leaving the last block */
} gpt2_last_acts;

/* Scratch of one worker: attention blocks, a head's gathered k | v. */
typedef struct gpt2_worker {
  float *att_a, *att_b; /* (att_block(max_len), max_len) */
  float *kv;            /* (max_len, 2 hs) */
  float *dkv;           /* (max_len, 2 hs) (training) */
} gpt2_worker;

typedef struct gpt2_acts {
  uint64_t max_tok; /* max_rows * max_len */
  uint64_t max_rows;
  prmi_pack *pk;    /* the last forward's packed layout (shared prefixes) */
  gpt2_layer_acts *layer; /* [L]; the last block uses res, ln1, ln1_stat, qkv */
  gpt2_last_acts last;
  float *lnf;       /* (R, C) final LayerNorm at the pooled tokens */
  float *lnf_stat;  /* (R, 2) */
  gpt2_worker *wk;  /* [n_workers] */
  /* backward scratch (training only) */
  float *d_res;     /* (max_tok, C) */
  float *d_c;       /* (max_tok, C) */
  float *d_3c;      /* (max_tok, 3C) */
  float *d_4c;      /* (max_tok, 4C) */
  float *d_last;    /* (R, C) */
  float *d_lastq;   /* (R, C) */
  float **blocks; /* every allocation, for free */
  int n_blocks, cap_blocks;
} gpt2_acts;

static float *take(gpt2_acts *g, uint64_t n_floats) {
  if (g->n_blocks >= g->cap_blocks) return NULL;
  float *p = prmi_calloc(n_floats, sizeof(float));
  if (p != NULL) g->blocks[g->n_blocks++] = p;
  return p;
}

static void gpt2_acts_free(gpt2_acts *g) {
  if (g == NULL) return;
  for (int i = 0; i < g->n_blocks; i++) prmi_free(g->blocks[i]);
  free(g->blocks);
  free(g->layer);
  free(g->wk);
  prmi_pack_free(g->pk);
  free(g);
}

/* Floats of one worker's scratch (att_block grows with T: the blocks of any
 * sequence up to max_len fit). */
static uint64_t worker_floats(uint64_t max_len, uint64_t hs, int inference) {
  return 2 * att_block(max_len) * max_len + (inference ? 2 : 4) * max_len * hs;
}

/*
 * Float counts (docs/gpt2.md has the formula): per token of a full block
 * res, ln1, qkv, atty, res2, ln2 (8C), fch (4C), dgelu (4C, training),
 * LayerNorm stats (4), lse (NH). The last block keeps res, ln1, ln1 stats and
 * qkv per token (5C + 2) plus compact per-sequence buffers. Each worker has
 * its attention scratch.
 */
static uint64_t gpt2_acts_floats(const prm_model *m, uint64_t max_rows, uint64_t max_len,
                                 int inference, uint32_t n_workers) {
  const uint64_t C = m->opts.n_embd, NH = m->opts.n_head, L = m->opts.n_layer;
  const uint64_t R = max_rows, T = max_rows * max_len;
  const uint64_t full_sets = inference ? (L > 1 ? 1 : 0) : L - 1;
  uint64_t f = full_sets * T * ((inference ? 12 : 16) * C + 4 + NH);
  if (!inference || L == 1) f += T * (5 * C + 2);
  f += R * (12 * C + 2 + NH) + (inference ? 0 : R * 4 * C); /* last block, compact */
  f += R * C + R * 2;                                         /* ln_f */
  f += n_workers * worker_floats(max_len, C / NH, inference); /* attention scratch */
  if (!inference) f += T * 9 * C + 2 * R * C;                 /* backward scratch */
  return f;
}

static gpt2_acts *gpt2_acts_new(const prm_model *m, uint64_t max_rows, uint64_t max_len,
                                int inference, uint32_t n_workers) {
  const uint64_t C = m->opts.n_embd, NH = m->opts.n_head, L = m->opts.n_layer;
  const uint64_t T = max_rows * max_len, R = max_rows, hs = C / NH;
  gpt2_acts *g = calloc(1, sizeof *g);
  if (g == NULL) return NULL;
  g->max_tok = T;
  g->max_rows = R;
  g->layer = calloc(L, sizeof *g->layer);
  g->wk = calloc(n_workers, sizeof *g->wk);
  g->pk = prmi_pack_new(max_rows, max_len);
  g->cap_blocks = (int)L + 16 + (int)n_workers;
  g->blocks = calloc((size_t)g->cap_blocks, sizeof *g->blocks);
  int ok = g->layer != NULL && g->wk != NULL && g->pk != NULL && g->blocks != NULL;
  /* full blocks: training one set each, inference one set shared by all;
   * the last block gets a smaller set of its own when training */
  const uint64_t full_sets = inference ? (L > 1 ? 1 : 0) : L - 1;
  for (uint64_t s = 0; ok && s < full_sets; s++) {
    gpt2_layer_acts *a = &g->layer[s];
    float *big = take(g, T * ((inference ? 12 : 16) * C + 4 + NH));
    if (big == NULL) {
      ok = 0;
      break;
    }
    a->res = big;
    a->ln1 = a->res + T * C;
    a->ln1_stat = a->ln1 + T * C;
    a->qkv = a->ln1_stat + 2 * T;
    a->atty = a->qkv + 3 * T * C;
    a->lse = a->atty + T * C;
    a->res2 = a->lse + NH * T;
    a->ln2 = a->res2 + T * C;
    a->ln2_stat = a->ln2 + T * C;
    a->fch = a->ln2_stat + 2 * T;
    a->dgelu = inference ? NULL : a->fch + 4 * T * C;
    if (inference) a->res2 = a->res; /* in place */
  }
  if (ok && inference)
    for (uint64_t l = 1; l < L; l++) g->layer[l] = g->layer[0];
  if (ok && (!inference || L == 1)) {
    /* the last block's per-token part: res, ln1, ln1_stat, qkv */
    gpt2_layer_acts *a = &g->layer[L - 1];
    float *big = take(g, T * (5 * C + 2));
    ok = big != NULL;
    if (ok) {
      a->res = big;
      a->ln1 = a->res + T * C;
      a->ln1_stat = a->ln1 + T * C;
      a->qkv = a->ln1_stat + 2 * T;
    }
  }
  if (ok) {
    gpt2_last_acts *z = &g->last;
    float *small = take(g, R * (12 * C + 2 + NH) + (inference ? 0 : R * 4 * C));
    ok = small != NULL;
    if (ok) {
      z->q = small;
      z->ln1 = z->q + R * C;
      z->lse = z->ln1 + R * C;
      z->atty = z->lse + NH * R;
      z->res2 = z->atty + R * C;
      z->ln2 = z->res2 + R * C;
      z->ln2_stat = z->ln2 + R * C;
      z->fch = z->ln2_stat + 2 * R;
      z->out = z->fch + 4 * R * C;
      z->dgelu = inference ? NULL : z->out + R * C;
    }
  }
  if (ok) {
    g->lnf = take(g, R * C);
    g->lnf_stat = take(g, R * 2);
    ok = g->lnf && g->lnf_stat;
  }
  for (uint32_t w = 0; ok && w < n_workers; w++) {
    float *s = take(g, worker_floats(max_len, hs, inference));
    ok = s != NULL;
    if (ok) {
      g->wk[w].att_a = s;
      g->wk[w].att_b = s + att_block(max_len) * max_len;
      g->wk[w].kv = s + 2 * att_block(max_len) * max_len;
      g->wk[w].dkv = inference ? NULL : g->wk[w].kv + 2 * max_len * hs;
    }
  }
  if (ok && !inference) {
    g->d_res = take(g, T * C);
    g->d_c = take(g, T * C);
    g->d_3c = take(g, T * 3 * C);
    g->d_4c = take(g, T * 4 * C);
    g->d_last = take(g, R * C);
    g->d_lastq = take(g, R * C);
    ok = g->d_res && g->d_c && g->d_3c && g->d_4c && g->d_last && g->d_lastq;
  }
  if (!ok) {
    gpt2_acts_free(g);
    return NULL;
  }
  return g;
}

/* ---- validation ------------------------------------------------------------------------- */

static int gpt2_check_batch(prm_ctx *ctx, const prm_batch *b, uint64_t *stride) {
  *stride = 0;
  return prmi_check_token_batch(ctx, b, ctx->model->opts.vocab_size);
}

/* ---- attention tasks -------------------------------------------------------------------- */

typedef struct att_job {
  const prm_ctx *ctx;
  gpt2_acts *g;
  const gpt2_layer_acts *a;
  uint64_t C, NH, hs;
  int keep_lse;
} att_job;

/* Task (sequence i, head h) of a full block's attention. */
static void att_fwd_task(void *arg, uint32_t t, uint32_t worker) {
  const att_job *j = arg;
  const prmi_pack *pk = j->g->pk;
  const uint64_t C = j->C, hs = j->hs, i = t / j->NH, h = t % j->NH;
  const uint64_t row = pk->off[i], p0 = pk->first[i], T = pk->len[i];
  if (p0 >= T) return; /* the whole row is an earlier row's */
  const gpt2_worker *w = &j->g->wk[worker];
  const float *q = j->a->qkv + row * 3 * C + h * hs;
  float *out = j->a->atty + row * C + h * hs;
  float *lse = j->keep_lse ? j->a->lse + h * j->g->max_tok + row : NULL;
  if (p0 == 0) {
    attention_forward(out, lse, q, q + C, q + 2 * C, 3 * C, w->att_a, 0, T, C, hs);
  } else { /* keys and values partly an earlier row's */
    gather_kv(w->kv, j->a->qkv, pk->kmap + pk->kmap_off[i], T, C, hs, h);
    attention_forward(out, lse, q, w->kv, w->kv + hs, 2 * hs, w->att_a, p0, T, C, hs);
  }
}

/*
 * Task (component c, head h) of a full block's attention backward: the rows
 * of the component in order, so that a row's own keys are set by it before
 * later rows that share them add their part. d(atty) is in d_c.
 */
static void att_bwd_task(void *arg, uint32_t t, uint32_t worker) {
  const att_job *j = arg;
  gpt2_acts *g = j->g;
  const prmi_pack *pk = g->pk;
  const uint64_t C = j->C, hs = j->hs, c = t / j->NH, h = t % j->NH;
  const gpt2_worker *w = &g->wk[worker];
  for (uint64_t r = pk->comp_off[c]; r < pk->comp_off[c + 1]; r++) {
    const uint64_t i = pk->comp_rows[r];
    const uint64_t row = pk->off[i], p0 = pk->first[i], T = pk->len[i];
    if (p0 >= T) continue;
    const float *q = j->a->qkv + row * 3 * C + h * hs;
    const float *lse = j->a->lse + h * g->max_tok + row;
    const float *dout = g->d_c + row * C + h * hs;
    float *dq = g->d_3c + row * 3 * C + h * hs;
    if (p0 == 0) {
      attention_backward(dq, dq + C, dq + 2 * C, 3 * C, dout, q, q + C, q + 2 * C, 3 * C, lse,
                         w->att_a, w->att_b, 0, T, C, hs);
    } else {
      const uint64_t *kmap = pk->kmap + pk->kmap_off[i];
      gather_kv(w->kv, j->a->qkv, kmap, T, C, hs, h);
      attention_backward(dq, w->dkv, w->dkv + hs, 2 * hs, dout, q, w->kv, w->kv + hs, 2 * hs,
                         lse, w->att_a, w->att_b, p0, T, C, hs);
      scatter_dkv(g->d_3c, w->dkv, kmap, p0, T, C, hs, h);
    }
  }
}

/* Task (sequence i, head h) of the last block: the last token's query
 * against every key of the sequence. */
static void last_fwd_task(void *arg, uint32_t t, uint32_t worker) {
  const att_job *j = arg;
  gpt2_acts *g = j->g;
  const prmi_pack *pk = g->pk;
  const gpt2_last_acts *z = &g->last;
  const uint64_t C = j->C, hs = j->hs, i = t / j->NH, h = t % j->NH, T = pk->len[i];
  const float scale = 1.0f / sqrtf((float)hs);
  const gpt2_worker *w = &g->wk[worker];
  const float *k = j->a->qkv + pk->off[i] * 3 * C + C + h * hs, *v = k + C;
  uint64_t ldkv = 3 * C;
  if (pk->first[i] > 0) { /* keys and values partly an earlier row's */
    gather_kv(w->kv, j->a->qkv, pk->kmap + pk->kmap_off[i], T, C, hs, h);
    k = w->kv;
    v = w->kv + hs;
    ldkv = 2 * hs;
  }
  float *s = w->att_a;
  prmi_gemv(0, T, hs, scale, k, ldkv, z->q + i * C + h * hs, 0.0f, s);
  z->lse[h * g->max_rows + i] = prmi_gpt2_softmax_vec(s, T);
  prmi_gemv(1, T, hs, 1.0f, v, ldkv, s, 0.0f, z->atty + i * C + h * hs);
}

/* Task (component c, head h) of the last block's backward: dk, dv of every
 * key the component's last tokens saw (added: d_3c starts at zero; a key
 * shared by several rows collects each one's part), dq compact. d(atty) of
 * the last tokens is in d_c rows 0..n-1. */
static void last_bwd_task(void *arg, uint32_t t, uint32_t worker) {
  const att_job *j = arg;
  gpt2_acts *g = j->g;
  const prmi_pack *pk = g->pk;
  const gpt2_last_acts *z = &g->last;
  const uint64_t C = j->C, hs = j->hs, c = t / j->NH, h = t % j->NH;
  const float scale = 1.0f / sqrtf((float)hs);
  const gpt2_worker *w = &g->wk[worker];
  for (uint64_t r = pk->comp_off[c]; r < pk->comp_off[c + 1]; r++) {
    const uint64_t i = pk->comp_rows[r], T = pk->len[i];
    const uint64_t *kmap = pk->kmap + pk->kmap_off[i];
    const float *k = j->a->qkv + pk->off[i] * 3 * C + C + h * hs, *v = k + C;
    uint64_t ldkv = 3 * C;
    if (pk->first[i] > 0) {
      gather_kv(w->kv, j->a->qkv, kmap, T, C, hs, h);
      k = w->kv;
      v = w->kv + hs;
      ldkv = 2 * hs;
    }
    const float *q = z->q + i * C + h * hs, *dout = g->d_c + i * C + h * hs;
    float *pr = w->att_a, *dp = w->att_b;
    prmi_gemv(0, T, hs, scale, k, ldkv, q, 0.0f, pr);
    prmi_exp_shifted(pr, T, z->lse[h * g->max_rows + i]);
    prmi_gemv(0, T, hs, 1.0f, v, ldkv, dout, 0.0f, dp); /* dp_x = dout . v_x */
    const float dsum = dot_n(pr, dp, T);
    for (uint64_t x = 0; x < T; x++) dp[x] = pr[x] * (dp[x] - dsum) * scale; /* ds_x */
    for (uint64_t x = 0; x < T; x++) {
      float *dkx = g->d_3c + kmap[x] * 3 * C + C + h * hs, *dvx = dkx + C;
      for (uint64_t e = 0; e < hs; e++) {
        dvx[e] += pr[x] * dout[e];
        dkx[e] += dp[x] * q[e];
      }
    }
    prmi_gemv(1, T, hs, 1.0f, k, ldkv, dp, 0.0f, g->d_lastq + i * C + h * hs); /* dq */
  }
}

/* ---- forward -------------------------------------------------------------------------- */

/* A full block l: every token. */
static void block_forward(const prm_ctx *ctx, gpt2_acts *g, uint64_t l, float *res_next,
                          uint64_t n) {
  const prm_model *m = ctx->model;
  const float *p = m->params;
  const uint64_t C = m->opts.n_embd, NH = m->opts.n_head, N = g->pk->n_tok;
  const gpt2_block *B = &LAYOUT(m)->blocks[l];
  gpt2_layer_acts *a = &g->layer[l];
  par_layernorm_forward(ctx, a->ln1, a->ln1_stat, a->res, p + B->ln1_w, p + B->ln1_b, N, C);
  par_dense_forward(ctx, a->qkv, a->ln1, p + B->attn_w, p + B->attn_b, NULL, N, C, 3 * C, 0,
                    NULL);
  att_job aj = {ctx, g, a, C, NH, C / NH, !ctx->inference};
  prmi_par_for(ctx, (uint32_t)(n * NH), att_fwd_task, &aj);
  par_dense_forward(ctx, a->res2, a->atty, p + B->aproj_w, p + B->aproj_b, a->res, N, C, C, 0,
                    NULL);
  par_layernorm_forward(ctx, a->ln2, a->ln2_stat, a->res2, p + B->ln2_w, p + B->ln2_b, N, C);
  par_dense_forward(ctx, a->fch, a->ln2, p + B->fc_w, p + B->fc_b, NULL, N, C, 4 * C,
                    a->dgelu != NULL ? 1 : 2, a->dgelu);
  par_dense_forward(ctx, res_next, a->fch, p + B->mproj_w, p + B->mproj_b, a->res2, N, 4 * C, C,
                    0, NULL);
}

/*
 * The last block: keys and values for every token, the rest for the last
 * token r_i of each sequence only (compact rows i = 0..n-1). Attention of one
 * query: s_j = q.k_j / sqrt(hs) over the sequence's tokens j.
 */
static void last_block_forward(const prm_ctx *ctx, gpt2_acts *g, uint64_t n) {
  const prm_model *m = ctx->model;
  const float *p = m->params;
  const prmi_pack *pk = g->pk;
  const uint64_t C = m->opts.n_embd, NH = m->opts.n_head, L = m->opts.n_layer, N = pk->n_tok;
  const gpt2_block *B = &LAYOUT(m)->blocks[L - 1];
  gpt2_layer_acts *a = &g->layer[L - 1];
  gpt2_last_acts *z = &g->last;
  par_layernorm_forward(ctx, a->ln1, a->ln1_stat, a->res, p + B->ln1_w, p + B->ln1_b, N, C);
  /* k | v for all tokens: columns C..3C of c_attn, into qkv's k | v part */
  dense_job kv = {.out = a->qkv + C, .x = a->ln1, .w = p + B->attn_w + C, .b = p + B->attn_b + C,
                  .ic = C, .oc = 2 * C, .ldo = 3 * C, .ldw = 3 * C};
  prmi_par_range(ctx, N, prmi_row_piece(N), dense_fwd_piece, &kv);
  /* q of the last tokens: columns 0..C */
  for (uint64_t i = 0; i < n; i++) {
    memcpy(z->ln1 + i * C, a->ln1 + pk->last[i] * C, C * sizeof(float));
    memcpy(z->q + i * C, p + B->attn_b, C * sizeof(float));
  }
  prmi_gemm(0, 0, n, C, C, 1.0f, z->ln1, C, p + B->attn_w, 3 * C, 1.0f, z->q, C);
  att_job aj = {ctx, g, a, C, NH, C / NH, 1};
  prmi_par_for(ctx, (uint32_t)(n * NH), last_fwd_task, &aj);
  for (uint64_t i = 0; i < n; i++) /* the residual: res at the last token */
    memcpy(z->res2 + i * C, a->res + pk->last[i] * C, C * sizeof(float));
  par_dense_forward(ctx, z->res2, z->atty, p + B->aproj_w, p + B->aproj_b, z->res2, n, C, C, 0,
                    NULL);
  par_layernorm_forward(ctx, z->ln2, z->ln2_stat, z->res2, p + B->ln2_w, p + B->ln2_b, n, C);
  par_dense_forward(ctx, z->fch, z->ln2, p + B->fc_w, p + B->fc_b, NULL, n, C, 4 * C,
                    z->dgelu != NULL ? 1 : 2, z->dgelu);
  par_dense_forward(ctx, z->out, z->fch, p + B->mproj_w, p + B->mproj_b, z->res2, n, 4 * C, C, 0,
                    NULL);
}

typedef struct embed_job {
  const prmi_pack *pk;
  const float *wte, *wpe;
  float *res, *gte, *gpe;
  const float *d;
  uint64_t C;
} embed_job;

static void embed_fwd_piece(void *arg, uint64_t r0, uint64_t r1, uint32_t worker) {
  (void)worker;
  const embed_job *j = arg;
  const uint64_t C = j->C;
  for (uint64_t r = r0; r < r1; r++) {
    const float *te = j->wte + (uint64_t)j->pk->ids[r] * C;
    const float *pe = j->wpe + (uint64_t)j->pk->pos[r] * C;
    float *o = j->res + r * C;
    for (uint64_t k = 0; k < C; k++) o[k] = te[k] + pe[k];
  }
}

/* Channels [k0, k1) of the embedding gradients, tokens in order. */
static void embed_bwd_piece(void *arg, uint64_t k0, uint64_t k1, uint32_t worker) {
  (void)worker;
  const embed_job *j = arg;
  const uint64_t C = j->C;
  for (uint64_t r = 0; r < j->pk->n_tok; r++) {
    float *te = j->gte + (uint64_t)j->pk->ids[r] * C, *pe = j->gpe + (uint64_t)j->pk->pos[r] * C;
    const float *d = j->d + r * C;
    for (uint64_t k = k0; k < k1; k++) {
      te[k] += d[k];
      pe[k] += d[k];
    }
  }
}

/* Token ids were validated before anything is written, and are packed into
 * the context: no borrowed input survives the call, and nothing can fail. */
static int gpt2_forward(prm_ctx *ctx, const prm_batch *b, uint64_t stride, float *scores,
                        int copy_input) {
  (void)stride;
  (void)copy_input;
  const prm_model *m = ctx->model;
  gpt2_acts *g = ctx->acts;
  const float *p = m->params;
  const uint64_t C = m->opts.n_embd, L = m->opts.n_layer;
  const uint64_t n = b->n;

  /* pack the tokens (each shared prefix once); res_0[r] = wte[id] + wpe[pos] */
  prmi_pack *pk = g->pk;
  prmi_pack_tokens(pk, b);
  embed_job ej = {.pk = pk, .wte = p + LAYOUT(m)->wte, .wpe = p + LAYOUT(m)->wpe,
                  .res = g->layer[0].res, .C = C};
  prmi_par_range(ctx, pk->n_tok, prmi_row_piece(pk->n_tok), embed_fwd_piece, &ej);

  for (uint64_t l = 0; l + 1 < L; l++) block_forward(ctx, g, l, g->layer[l + 1].res, n);
  last_block_forward(ctx, g, n);
  /* head: final LayerNorm and score at the last token of each sequence */
  const float *w = p + m->head_w;
  prmi_gpt2_layernorm(g->lnf, g->lnf_stat, g->last.out, p + LAYOUT(m)->lnf_w, p + LAYOUT(m)->lnf_b,
                    n, C);
  for (uint64_t i = 0; i < n; i++) {
    float s = 0.0f;
    for (uint64_t j = 0; j < C; j++) s += g->lnf[i * C + j] * w[j];
    scores[i] = s;
  }
  return PRM_OK;
}

/* ---- backward ------------------------------------------------------------------------- */

/* Gradient slot of the parameter at arena offset `off`, or NULL if frozen. */
static float *gslot(const prm_ctx *ctx, uint64_t off) {
  return prmi_grad_slot((prm_ctx *)ctx, off);
}

/* Backward of a full block l; g->d_res holds d(res_{l+1}) and receives d(res_l). */
static void block_backward(const prm_ctx *ctx, gpt2_acts *g, uint64_t l) {
  const prm_model *m = ctx->model;
  const float *p = m->params;
  const prmi_pack *pk = g->pk;
  const uint64_t C = m->opts.n_embd, NH = m->opts.n_head, N = pk->n_tok;
  const gpt2_block *B = &LAYOUT(m)->blocks[l];
  const gpt2_layer_acts *a = &g->layer[l];
  /* res_{l+1} = res2 + fch Wm + bm */
  par_dense_backward(ctx, g->d_4c, 0, gslot(ctx, B->mproj_w), gslot(ctx, B->mproj_b), g->d_res,
                     a->fch, p + B->mproj_w, N, 4 * C, C);
  par_mul(ctx, g->d_4c, a->dgelu, N * 4 * C);
  /* fch = gelu(ln2 Wfc + bfc); ln2 = LN(res2) */
  par_dense_backward(ctx, g->d_c, 0, gslot(ctx, B->fc_w), gslot(ctx, B->fc_b), g->d_4c, a->ln2,
                     p + B->fc_w, N, C, 4 * C);
  par_layernorm_backward(ctx, g->d_res, gslot(ctx, B->ln2_w), gslot(ctx, B->ln2_b), g->d_c,
                         a->res2, p + B->ln2_w, a->ln2_stat, N, C);
  /* res2 = res + atty Wp + bp */
  par_dense_backward(ctx, g->d_c, 0, gslot(ctx, B->aproj_w), gslot(ctx, B->aproj_b), g->d_res,
                     a->atty, p + B->aproj_w, N, C, C);
  att_job aj = {ctx, g, a, C, NH, C / NH, 1};
  prmi_par_for(ctx, (uint32_t)(pk->n_comp * NH), att_bwd_task, &aj);
  /* qkv = ln1 Wqkv + bqkv; ln1 = LN(res) */
  par_dense_backward(ctx, g->d_c, 0, gslot(ctx, B->attn_w), gslot(ctx, B->attn_b), g->d_3c,
                     a->ln1, p + B->attn_w, N, C, 3 * C);
  par_layernorm_backward(ctx, g->d_res, gslot(ctx, B->ln1_w), gslot(ctx, B->ln1_b), g->d_c,
                         a->res, p + B->ln1_w, a->ln1_stat, N, C);
}

typedef struct zero_job {
  float *x;
  uint64_t width;
} zero_job;

static void zero_piece(void *arg, uint64_t r0, uint64_t r1, uint32_t worker) {
  (void)worker;
  const zero_job *j = arg;
  memset(j->x + r0 * j->width, 0, (r1 - r0) * j->width * sizeof(float));
}

static void par_zero_rows(const prm_ctx *ctx, float *x, uint64_t rows, uint64_t width) {
  zero_job j = {x, width};
  prmi_par_range(ctx, rows, prmi_row_piece(rows), zero_piece, &j);
}

/* Backward of the last block: g->d_last holds d(out) (n, C); g->d_res
 * receives d(res_{L-1}) for all N tokens. */
static void last_block_backward(const prm_ctx *ctx, gpt2_acts *g, uint64_t n) {
  const prm_model *m = ctx->model;
  const float *p = m->params;
  const prmi_pack *pk = g->pk;
  const uint64_t C = m->opts.n_embd, NH = m->opts.n_head, L = m->opts.n_layer, N = pk->n_tok;
  const gpt2_block *B = &LAYOUT(m)->blocks[L - 1];
  const gpt2_layer_acts *a = &g->layer[L - 1];
  const gpt2_last_acts *z = &g->last;
  float *dz = g->d_last; /* d(out), then d(res2): out = res2 + ... */
  /* MLP on the n last tokens */
  par_dense_backward(ctx, g->d_4c, 0, gslot(ctx, B->mproj_w), gslot(ctx, B->mproj_b), dz, z->fch,
                     p + B->mproj_w, n, 4 * C, C);
  par_mul(ctx, g->d_4c, z->dgelu, n * 4 * C);
  par_dense_backward(ctx, g->d_c, 0, gslot(ctx, B->fc_w), gslot(ctx, B->fc_b), g->d_4c, z->ln2,
                     p + B->fc_w, n, C, 4 * C);
  par_layernorm_backward(ctx, dz, gslot(ctx, B->ln2_w), gslot(ctx, B->ln2_b), g->d_c, z->res2,
                         p + B->ln2_w, z->ln2_stat, n, C);
  /* res2 = res[r_i] + atty Wp + bp: d(atty) into d_c rows 0..n-1 */
  par_dense_backward(ctx, g->d_c, 0, gslot(ctx, B->aproj_w), gslot(ctx, B->aproj_b), dz, z->atty,
                     p + B->aproj_w, n, C, C);
  /* attention of the last queries: dk, dv for every token, dq compact */
  par_zero_rows(ctx, g->d_3c, N, 3 * C);
  att_job aj = {ctx, g, a, C, NH, C / NH, 1};
  prmi_par_for(ctx, (uint32_t)(pk->n_comp * NH), last_bwd_task, &aj);
  /* c_attn: k | v columns for every token, q columns for the last tokens */
  float *gw = gslot(ctx, B->attn_w), *gb = gslot(ctx, B->attn_b);
  prmi_par_gemm(ctx, 0, 1, N, C, 2 * C, 1.0f, g->d_3c + C, 3 * C, p + B->attn_w + C, 3 * C, 0.0f,
                g->d_c, C, prmi_row_piece(N), 0);
  if (gw != NULL) {
    uint64_t mt, nt;
    prmi_dw_tiles(C, 2 * C, &mt, &nt);
    prmi_par_gemm(ctx, 1, 0, C, 2 * C, N, 1.0f, a->ln1, C, g->d_3c + C, 3 * C, 1.0f, gw + C,
                  3 * C, mt, nt);
    prmi_par_colsum(ctx, gb + C, g->d_3c + C, N, 2 * C, 3 * C);
    prmi_gemm(1, 0, C, C, n, 1.0f, z->ln1, C, g->d_lastq, C, 1.0f, gw, 3 * C);
    prmi_par_colsum(ctx, gb, g->d_lastq, n, C, C);
  }
  /* d(ln1) of the last tokens gets the q path too: use d_4c rows as (n, C) */
  prmi_gemm(0, 1, n, C, C, 1.0f, g->d_lastq, C, p + B->attn_w, 3 * C, 0.0f, g->d_4c, C);
  for (uint64_t i = 0; i < n; i++) {
    float *d = g->d_c + pk->last[i] * C;
    for (uint64_t j = 0; j < C; j++) d[j] += g->d_4c[i * C + j];
  }
  /* d(res) = scatter of d(res2) at the last tokens + LN1 backward */
  par_zero_rows(ctx, g->d_res, N, C);
  for (uint64_t i = 0; i < n; i++) { /* rows sharing their last token add */
    float *d = g->d_res + pk->last[i] * C;
    for (uint64_t j = 0; j < C; j++) d[j] += dz[i * C + j];
  }
  par_layernorm_backward(ctx, g->d_res, gslot(ctx, B->ln1_w), gslot(ctx, B->ln1_b), g->d_c,
                         a->res, p + B->ln1_w, a->ln1_stat, N, C);
}

static void gpt2_backward(prm_ctx *ctx, const float *dscores, uint64_t n) {
  const prm_model *m = ctx->model;
  gpt2_acts *g = ctx->acts;
  const float *p = m->params;
  const uint64_t C = m->opts.n_embd, L = m->opts.n_layer;
  const float *w = p + m->head_w;

  /* head: score_i = w . lnf_i */
  float *gw = gslot(ctx, m->head_w);
  if (gw != NULL)
    for (uint64_t i = 0; i < n; i++)
      for (uint64_t j = 0; j < C; j++) gw[j] += dscores[i] * g->lnf[i * C + j];
  if (ctx->trainable_offset > LAYOUT(m)->lnf_w) return; /* nothing below the head trains */

  /* final LayerNorm: d(out) of the last block, compact */
  memset(g->d_last, 0, n * C * sizeof(float));
  for (uint64_t i = 0; i < n; i++)
    for (uint64_t j = 0; j < C; j++) g->d_c[i * C + j] = dscores[i] * w[j];
  par_layernorm_backward(ctx, g->d_last, gslot(ctx, LAYOUT(m)->lnf_w),
                         gslot(ctx, LAYOUT(m)->lnf_b), g->d_c, g->last.out, p + LAYOUT(m)->lnf_w,
                         g->lnf_stat, n, C);
  if (LAYOUT(m)->blocks[L - 1].start < ctx->trainable_offset) return; /* blocks frozen */
  last_block_backward(ctx, g, n);
  for (uint64_t l = L - 1; l-- > 0;) {
    if (LAYOUT(m)->blocks[l].start < ctx->trainable_offset) return; /* this and all below frozen */
    block_backward(ctx, g, l);
  }
  /* embeddings (only when everything trains) */
  float *gte = gslot(ctx, LAYOUT(m)->wte), *gpe = gslot(ctx, LAYOUT(m)->wpe);
  if (gte == NULL) return;
  embed_job ej = {.pk = g->pk, .gte = gte, .gpe = gpe, .d = g->d_res, .C = C};
  prmi_par_range(ctx, C, prmi_col_piece(C), embed_bwd_piece, &ej);
}

/* ---- model ---------------------------------------------------------------------------- */

static int gpt2_normalise(prm_model_options *o, uint64_t *n_params, uint32_t *n_tensors) {
  int rc;
  if ((rc = prmi_check_dim(o->vocab_size, "vocab_size")) != PRM_OK ||
      (rc = prmi_check_dim(o->n_ctx, "n_ctx")) != PRM_OK ||
      (rc = prmi_check_dim(o->n_embd, "n_embd")) != PRM_OK ||
      (rc = prmi_check_dim(o->n_head, "n_head")) != PRM_OK)
    return rc;
  if (o->n_layer < 1 || o->n_layer > PRMI_GPT2_MAX_LAYER)
    return prmi_fail(NULL, PRM_ERR_INVALID, "model: n_layer = %llu not in [1, %d]",
                     (unsigned long long)o->n_layer, PRMI_GPT2_MAX_LAYER);
  if (o->n_embd % o->n_head != 0)
    return prmi_fail(NULL, PRM_ERR_INVALID, "model: n_head = %llu does not divide n_embd = %llu",
                     (unsigned long long)o->n_head, (unsigned long long)o->n_embd);
  if (o->n_ctx > PRMI_GPT2_MAX_CTX || o->n_embd > PRMI_GPT2_MAX_CTX * 16)
    return prmi_fail(NULL, PRM_ERR_INVALID, "model: n_ctx or n_embd too large");
  const prm_model_options d = PRM_MODEL_OPTIONS_INIT;
  o->input_size = 0;
  o->activation = PRM_ACT_GELU_TANH; /* GPT-2's MLP: gelu, tanh form */
  o->n_hidden = 0;
  for (uint32_t i = 0; i < PRM_MAX_HIDDEN; i++) o->hidden[i] = 0;
  o->n_kv_head = o->head_dim = o->n_ffn = 0;
  o->rope_theta = d.rope_theta;
  o->rms_eps = d.rms_eps;
  o->attn_bias = o->qk_norm = 0;
  const uint64_t C = o->n_embd;
  uint64_t per_block = 12 * C * C + 13 * C; /* 2 LN, qkv, proj, fc, fc proj */
  if (o->vocab_size > PRMI_MAX_PARAMS / C || o->n_layer > PRMI_MAX_PARAMS / per_block)
    return prmi_fail(NULL, PRM_ERR_INVALID, "model: more than 2^34 parameters");
  *n_params = (o->vocab_size + o->n_ctx) * C + o->n_layer * per_block + 3 * C;
  *n_tensors = 2 + 12 * (uint32_t)o->n_layer + 3;
  return PRM_OK;
}

/* Hugging Face GPT2ForSequenceClassification names and shapes, in the order
 * of its state_dict (layer-major, so "the last k blocks + head" is a suffix
 * of the arena). Conv1D weights are [in, out]. */
static int gpt2_layout_new(prm_model *m) {
  const uint64_t C = m->opts.n_embd, L = m->opts.n_layer;
  gpt2_layout *Ly = calloc(1, sizeof *Ly + L * sizeof(gpt2_block));
  if (Ly == NULL) return PRM_ERR_NOMEM;
  m->layout = Ly;
  char name[PRMI_NAME_SIZE];
  Ly->wte = prmi_model_add_tensor(m, "transformer.wte.weight", 2, m->opts.vocab_size, C);
  Ly->wpe = prmi_model_add_tensor(m, "transformer.wpe.weight", 2, m->opts.n_ctx, C);
  for (uint64_t l = 0; l < L; l++) {
    gpt2_block *b = &Ly->blocks[l];
#define T2(field, suffix, d0, d1)                                                                  \
  snprintf(name, sizeof name, "transformer.h.%llu.%s", (unsigned long long)l, suffix);             \
  b->field = prmi_model_add_tensor(m, name, 2, d0, d1)
#define T1(field, suffix, d0)                                                                      \
  snprintf(name, sizeof name, "transformer.h.%llu.%s", (unsigned long long)l, suffix);             \
  b->field = prmi_model_add_tensor(m, name, 1, d0, 0)
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
  Ly->lnf_w = prmi_model_add_tensor(m, "transformer.ln_f.weight", 1, C, 0);
  Ly->lnf_b = prmi_model_add_tensor(m, "transformer.ln_f.bias", 1, C, 0);
  m->head_in = C;
  m->head_w = prmi_model_add_tensor(m, "score.weight", 2, 1, C);
  return PRM_OK;
}

/* GPT-2: LayerNorm 1/0, biases 0, weights N(0, 0.02), the two residual
 * projections N(0, 0.02 / sqrt(2 n_layer)). */
static void gpt2_init(prm_model *m, uint64_t seed) {
  for (uint32_t t = 0; t < m->n_tensors; t++) {
    const prmi_tensor *T = &m->tensors[t];
    uint64_t s = prmi_init_stream(seed, t);
    float *p = m->params + T->offset;
    if (prmi_ends_with(T->name, "ln_1.weight") || prmi_ends_with(T->name, "ln_2.weight") ||
        prmi_ends_with(T->name, "ln_f.weight")) {
      for (uint64_t i = 0; i < T->numel; i++) p[i] = 1.0f;
    } else if (prmi_ends_with(T->name, ".bias")) {
      for (uint64_t i = 0; i < T->numel; i++) p[i] = 0.0f;
    } else {
      double sd =
          prmi_ends_with(T->name, "c_proj.weight") ? 0.02 / sqrt(2.0 * (double)m->opts.n_layer) : 0.02;
      for (uint64_t i = 0; i < T->numel; i++) p[i] = prmi_init_normal(&s, sd);
    }
  }
}

static int gpt2_trainable_from_block(prm_model *m, uint64_t k, uint64_t *off) {
  const uint64_t L = m->opts.n_layer;
  if (k > L)
    return prmi_fail(NULL, PRM_ERR_INVALID,
                     "prm_model_set_trainable: %llu blocks, the model has %llu",
                     (unsigned long long)k, (unsigned long long)L);
  *off = LAYOUT(m)->blocks[L - k].start;
  return PRM_OK;
}

/* ---- checkpoints ------------------------------------------------------------------------ */

/* torch_ref's config_metadata: str() of each config value, in its order. */
static void gpt2_meta_write(const prm_model_options *o, prmi_meta_out *out) {
  prmi_meta_put_u64(out, "vocab_size", o->vocab_size);
  prmi_meta_put_u64(out, "n_positions", o->n_ctx);
  prmi_meta_put_u64(out, "n_embd", o->n_embd);
  prmi_meta_put_u64(out, "n_layer", o->n_layer);
  prmi_meta_put_u64(out, "n_head", o->n_head);
  prmi_meta_put(out, "layer_norm_epsilon", "1e-05"); /* Python's str(1e-5): the only eps */
}

static int gpt2_detect(const prmi_ckpt *c) {
  for (uint32_t i = 0; i < prmi_ckpt_count(c); i++)
    if (strncmp(prmi_ckpt_name(c, i), "transformer.", 12) == 0) return 1;
  return 0;
}

/* A bare GPT2Model name (no "transformer." prefix), as torch_ref accepts. */
static int gpt2_tensor_alias(const char *n, char *buf, size_t cap) {
  if (!(strncmp(n, "h.", 2) == 0 || strncmp(n, "ln_f.", 5) == 0 || strcmp(n, "wte.weight") == 0 ||
        strcmp(n, "wpe.weight") == 0))
    return 0;
  return (size_t)snprintf(buf, cap, "transformer.%s", n) < cap;
}

/* HF's non-persistent attention buffers (a [1,1,T,T] mask, a scalar). */
static int gpt2_ignorable(const char *name, uint32_t ndim) {
  uint64_t l;
  const char *rest = prmi_layer_name(name, "transformer.h.", &l);
  return rest != NULL &&
         (strcmp(rest, "attn.masked_bias") == 0 || (strcmp(rest, "attn.bias") == 0 && ndim == 4));
}

/*
 * Is the decimal number s exactly 1e-5 ("1e-05" as Python's str(1e-5)
 * writes it, "0.00001", "1E-5", "1.0e-5", ...)? 1: yes, 0: another number,
 * -1: not a number. Compared as decimals (digits and exponent), so no
 * locale-dependent strtod and no rounding: value = int(sig) * 10^scale.
 */
static int decimal_is_1e5(const char *s) {
  char sig[1024];
  size_t nsig = 0, ndigits = 0;
  long scale = 0;
  int neg = 0, frac = 0;
  if (*s == '+' || *s == '-') neg = *s++ == '-';
  for (;; s++) {
    if (*s == '.' && !frac) {
      frac = 1;
      continue;
    }
    if (*s < '0' || *s > '9') break;
    ndigits++;
    if (frac) scale--;
    if ((nsig > 0 || *s != '0') && nsig < sizeof sig) sig[nsig++] = *s;
  }
  if (ndigits == 0) return -1;
  if (*s == 'e' || *s == 'E') {
    long e = 0;
    int eneg = 0;
    s++;
    if (*s == '+' || *s == '-') eneg = *s++ == '-';
    if (*s < '0' || *s > '9') return -1;
    for (; *s >= '0' && *s <= '9'; s++)
      if (e < 1000000) e = e * 10 + (*s - '0'); /* clamp: far from -5 either way */
    scale += eneg ? -e : e;
  }
  if (*s != '\0') return -1;
  while (nsig > 0 && sig[nsig - 1] == '0') {
    nsig--;
    scale++;
  }
  return !neg && nsig == 1 && sig[0] == '1' && scale == -5;
}

/*
 * gpt2 configuration, as torch_ref.model_from_state derives it: V and C from
 * wte's shape, n_ctx from wpe's, n_layer from the blocks present, n_head from
 * __metadata__ (required: shapes cannot tell it). Metadata that repeats a
 * shape-derived value must agree with it.
 */
static int gpt2_config(const prmi_ckpt *c, prm_model_options *o) {
  uint32_t nd;
  uint64_t wte[2], wpe[2], n_blocks = 0;
  int rc;
  if (!prmi_ckpt_shape(c, "transformer.wte.weight", &nd, wte))
    return prmi_fail(NULL, PRM_ERR_FORMAT, "missing tensor transformer.wte.weight");
  if (nd != 2 || wte[0] == 0 || wte[1] == 0)
    return prmi_fail(NULL, PRM_ERR_FORMAT,
                     "tensor transformer.wte.weight must be 2-D and non-empty");
  if (!prmi_ckpt_shape(c, "transformer.wpe.weight", &nd, wpe))
    return prmi_fail(NULL, PRM_ERR_FORMAT, "missing tensor transformer.wpe.weight");
  if (nd != 2 || wpe[0] == 0)
    return prmi_fail(NULL, PRM_ERR_FORMAT,
                     "tensor transformer.wpe.weight must be 2-D and non-empty");
  o->vocab_size = wte[0];
  o->n_embd = wte[1];
  o->n_ctx = wpe[0];

  /* n_layer = 1 + the highest block index: a gap is then a missing tensor */
  for (uint32_t i = 0; i < prmi_ckpt_count(c); i++) {
    uint64_t l;
    const char *name = prmi_ckpt_name(c, i);
    if (prmi_layer_name(name, "transformer.h.", &l) == NULL) continue;
    if (l >= PRMI_GPT2_MAX_LAYER)
      return prmi_fail(NULL, PRM_ERR_FORMAT, "tensor %s: gpt2 models have at most %d blocks",
                       name, PRMI_GPT2_MAX_LAYER);
    if (l + 1 > n_blocks) n_blocks = l + 1;
  }
  if (n_blocks == 0)
    return prmi_fail(NULL, PRM_ERR_FORMAT,
                     "gpt2 checkpoint has no transformer block (transformer.h.0.*)");
  o->n_layer = n_blocks;

  if ((rc = prmi_ckpt_meta_agrees(c, "vocab_size", o->vocab_size,
                                  "transformer.wte.weight rows")) != PRM_OK ||
      (rc = prmi_ckpt_meta_agrees(c, "n_embd", o->n_embd, "transformer.wte.weight columns")) !=
          PRM_OK ||
      (rc = prmi_ckpt_meta_agrees(c, "n_positions", o->n_ctx, "transformer.wpe.weight rows")) !=
          PRM_OK ||
      (rc = prmi_ckpt_meta_agrees(c, "n_layer", o->n_layer,
                                  "the blocks transformer.h.* present")) != PRM_OK)
    return rc;

  rc = prmi_ckpt_meta_u64(c, "n_head", &o->n_head);
  if (rc < 0) return rc;
  if (rc == 0)
    return prmi_fail(NULL, PRM_ERR_FORMAT,
                     "gpt2 checkpoint lacks the 'n_head' __metadata__ key (the number of "
                     "attention heads cannot be inferred from the tensor shapes)");
  if (o->n_embd % o->n_head != 0)
    return prmi_fail(NULL, PRM_ERR_FORMAT, "__metadata__ n_head=%llu does not divide n_embd=%llu",
                     (unsigned long long)o->n_head, (unsigned long long)o->n_embd);

  const char *eps = prmi_ckpt_meta(c, "layer_norm_epsilon");
  if (eps != NULL) {
    int is = decimal_is_1e5(eps);
    if (is < 0)
      return prmi_fail(NULL, PRM_ERR_FORMAT,
                       "__metadata__ layer_norm_epsilon='%.64s' is not a number", eps);
    if (is == 0)
      return prmi_fail(NULL, PRM_ERR_UNSUPPORTED,
                       "__metadata__ layer_norm_epsilon=%.64s: only 1e-05 (GPT-2's) is supported",
                       eps);
  }
  return PRM_OK;
}

/* ---- contexts ------------------------------------------------------------------------- */

static int gpt2_ctx_new(prm_ctx *c) {
  c->acts = gpt2_acts_new(c->model, c->max_rows, c->max_len, c->inference, c->n_workers);
  return c->acts != NULL ? PRM_OK : PRM_ERR_NOMEM;
}

static void gpt2_ctx_free(void *acts) { gpt2_acts_free(acts); }

static double gpt2_ctx_floats(const prm_model *m, uint64_t max_rows, uint64_t max_len,
                              int inference, uint32_t n_workers) {
  return (double)gpt2_acts_floats(m, max_rows, max_len, inference, n_workers);
}

const prmi_arch prmi_arch_gpt2 = {
    .id = PRM_ARCH_GPT2,
    .name = "gpt2",
    .article = "a gpt2",
    .tokens = 1,
    .normalise = gpt2_normalise,
    .layout = gpt2_layout_new,
    .layout_free = free, /* the layout is one allocation */
    .init = gpt2_init,
    .trainable_from_block = gpt2_trainable_from_block,
    .meta_write = gpt2_meta_write,
    .detect = gpt2_detect,
    .config = gpt2_config,
    .tensor_alias = gpt2_tensor_alias,
    .ignorable = gpt2_ignorable,
    .ctx_new = gpt2_ctx_new,
    .ctx_free = gpt2_ctx_free,
    .ctx_floats = gpt2_ctx_floats,
    .check_batch = gpt2_check_batch,
    .forward = gpt2_forward,
    .backward = gpt2_backward,
    .pair_grad = NULL,
};
