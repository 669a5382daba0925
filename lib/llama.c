/*
 * llama.c - the Llama-family reward model: Hugging Face
 * LlamaForSequenceClassification with num_labels = 1 and no dropout, plus the
 * Qwen2 (q/k/v biases) and Qwen3 (per-head q/k RMSNorm) variants, behind the
 * descriptor prmi_arch_llama (lib/arch.h).
 *
 * Shapes: V = vocab_size, D = n_embd, L = n_layer, H query heads, G = n_kv_head
 * key/value heads (g = H / G query heads share one: query head h reads kv head
 * h / g, HF's repeat_kv), hd = head_dim, QD = H hd, KD = G hd,
 * QKV = QD + 2 KD, F = n_ffn. Every projection is an nn.Linear: y = x W^T
 * (+ b), W [out, in] row-major.
 *
 * Packed tokens, as in gpt2.c: the n right-padded sequences of a batch are
 * packed into N = sum(len_i) rows; sequence i owns rows [off_i, off_i + len_i)
 * and row r has position r - off_i. Padding never enters a buffer.
 *
 * Layer l on the residual stream x (N, D):
 *   a     = rmsnorm(x) w_in                             (N, D), rstd (N)
 *   q|k|v = a [Wq|Wk|Wv]^T (+ [bq|bk|bv])               (N, QKV)
 *   qk_norm: q_h = rmsnorm(q_h) w_qn, k_j = rmsnorm(k_j) w_kn over each head's hd
 *   q, k  = rope(q), rope(k) at each row's position (v is not rotated)
 *   o_h   = softmax_causal(q_h k_j^T / sqrt(hd)) v_j,  j = h / g     (N, QD)
 *   x2    = x + o Wo^T                                  (N, D)
 *   m     = rmsnorm(x2) w_post                          (N, D), rstd (N)
 *   gu    = m [Wgate|Wup]^T                             (N, 2F): gate | up
 *   x'    = x2 + (silu(gate) * up) Wdown^T              (N, D)
 * Head: score_i = w . (rmsnorm(x_L[r_i]) w_norm) at r_i = off_i + len_i - 1.
 * rmsnorm(x) = x / sqrt(mean(x^2) + eps); silu(z) = z sigmoid(z).
 *
 * RoPE, HF's rotate-half layout: frequency i < hd/2 pairs dims i and i + hd/2,
 *   y[i] = x[i] c - x[i + hd/2] s,  y[i + hd/2] = x[i + hd/2] c + x[i] s,
 *   c, s = cos, sin of ang = fp32(t) * inv_freq[i] rounded to fp32,
 *   inv_freq[i] = 1 / theta^(2i / hd) in fp32, as HF computes them. The table
 *   (max_len, hd/2) is built once per context. Its cos/sin are the fp32
 *   roundings of the exact cos/sin of the fp32 angle; PyTorch's vectorised
 *   (SLEEF, 1-ulp) powf/cos/sin differ from them by one ulp in a few per cent
 *   of the entries (inv_freq by at most 2 ulp), i.e. by ~6e-8 relative.
 *
 * As in gpt2.c: Q/K/V and the MLP projections run as GEMMs over all N packed
 * rows; causal attention runs per sequence in blocks of ATT_BLOCK query rows
 * (the query heads of one kv head stacked, see att_scratch) with (ATT_ROWS,
 * T) scratch, and keeps only the log-sum-exp of each softmax row for the
 * backward, which recomputes the probabilities. The last layer only matters
 * at the n pooled rows: it computes keys and values for every row and
 * everything else for the pooled rows alone, in compact (n, .) buffers --
 * the same math, all of the layer but its k/v projection done once per
 * sequence instead of once per token.
 *
 * Contiguity used by the GEMMs: mlp.gate_proj.weight and mlp.up_proj.weight
 * are adjacent in the arena (and in the gradient), so gate|up is one [2F, D]
 * matrix; without biases q_proj, k_proj and v_proj are adjacent too, one
 * [QKV, D] matrix.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "arch.h"
#include "internal.h"

/* Query rows per attention block (see gpt2.c). */
#define ATT_BLOCK 32

/* ---- sizes and layout ----------------------------------------------------------------- */

typedef struct dims {
  uint64_t V, D, L, H, G, g, hd, half, QD, KD, QKV, F;
  float eps, scale;
  int bias, qkn;
} dims;

static dims dims_of(const prm_model *m) {
  const prm_model_options *o = &m->opts;
  dims d;
  d.V = o->vocab_size;
  d.D = o->n_embd;
  d.L = o->n_layer;
  d.H = o->n_head;
  d.G = o->n_kv_head;
  d.g = d.H / d.G;
  d.hd = o->head_dim;
  d.half = d.hd / 2;
  d.QD = d.H * d.hd;
  d.KD = d.G * d.hd;
  d.QKV = d.QD + 2 * d.KD;
  d.F = o->n_ffn;
  d.eps = (float)o->rms_eps;
  d.scale = 1.0f / sqrtf((float)d.hd);
  d.bias = o->attn_bias != 0;
  d.qkn = o->qk_norm != 0;
  return d;
}

/* Arena offsets of one decoder layer. bq/bk/bv only with attn_bias, qn/kn
 * only with qk_norm (0 otherwise, never read). */
typedef struct llama_block {
  uint64_t start;                  /* first parameter of the layer */
  uint64_t wq, bq, wk, bk, wv, bv; /* [QD, D], [QD], [KD, D], [KD], [KD, D], [KD] */
  uint64_t wo;                     /* [D, QD] */
  uint64_t qn, kn;                 /* [hd], [hd] */
  uint64_t wg, wu, wd;             /* [F, D], [F, D] (= wg + F D), [D, F] */
  uint64_t ln1, ln2;               /* [D], [D] */
} llama_block;

typedef struct llama_layout {
  uint64_t embed; /* [V, D] */
  uint64_t norm;  /* [D] */
  llama_block blk[];
} llama_layout;

#define LAYOUT(m) ((const llama_layout *)(m)->layout)

/* ---- elementwise kernels -------------------------------------------------------------------- */

/*
 * The loops below are compiled for AVX-512, AVX2 and the baseline ISA
 * (PRMI_TARGET_CLONES, internal.h) and give the same bits in every clone:
 * elementwise arithmetic, and reductions in LANES fixed partial sums (lane k
 * takes the elements j = k mod LANES, the lanes are then added in a fixed
 * tree), so that the compiler may put the lanes in one vector without
 * reassociating anything. Sums run in 8 lanes instead of one chain: a
 * single float accumulator is latency-bound (one add per 4 cycles), which
 * made the softmax row sums the slowest part of the attention.
 */
#define LANES 8

static inline float lanes_sum(const float *acc) {
  return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

static inline double lanes_sum_d(const double *acc) {
  return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

/* max of x[0..n), n >= 1 (exact in any order) */
static inline float max_n(const float *x, uint64_t n) {
  float acc[LANES];
  for (int k = 0; k < LANES; k++)
    acc[k] = x[0];
  uint64_t j = 0;
  for (; j + LANES <= n; j += LANES)
    for (int k = 0; k < LANES; k++)
      acc[k] = x[j + k] > acc[k] ? x[j + k] : acc[k];
  for (; j < n; j++)
    acc[0] = x[j] > acc[0] ? x[j] : acc[0];
  float m = acc[0];
  for (int k = 1; k < LANES; k++)
    m = acc[k] > m ? acc[k] : m;
  return m;
}

static inline float sum_n(const float *x, uint64_t n) {
  float acc[LANES] = {0};
  uint64_t j = 0;
  for (; j + LANES <= n; j += LANES)
    for (int k = 0; k < LANES; k++)
      acc[k] += x[j + k];
  for (int k = 0; j < n; j++, k++)
    acc[k] += x[j];
  return lanes_sum(acc);
}

static inline float dot_n(const float *a, const float *b, uint64_t n) {
  float acc[LANES] = {0};
  uint64_t j = 0;
  for (; j + LANES <= n; j += LANES)
    for (int k = 0; k < LANES; k++)
      acc[k] += a[j + k] * b[j + k];
  for (int k = 0; j < n; j++, k++)
    acc[k] += a[j] * b[j];
  return lanes_sum(acc);
}

/* ---- RMSNorm ------------------------------------------------------------------------------ */

/*
 * rmsnorm of `rows` x `nv` vectors of n: vector (i, v) starts at
 * x + i ldx + v n (nv = 1, n = D: a layer's norm; nv = heads, n = hd: the
 * per-head q/k norm of Qwen3). y = w * (x * r), r = 1 / sqrt(mean(x^2) +
 * eps), HF's order of operations; the mean is summed in double. y may be x.
 * rs[i ld_rs + v] = r unless rs is NULL.
 */
PRMI_TARGET_CLONES
static void prmi_llama_rms(float *y, uint64_t ldy, float *rs, uint64_t ld_rs, const float *x,
                           uint64_t ldx, const float *w, uint64_t rows, uint64_t nv, uint64_t n,
                           float eps) {
  for (uint64_t i = 0; i < rows; i++)
    for (uint64_t v = 0; v < nv; v++) {
      const float *xv = x + i * ldx + v * n;
      float *yv = y + i * ldy + v * n;
      double acc[LANES] = {0};
      uint64_t j = 0;
      for (; j + LANES <= n; j += LANES)
        for (int k = 0; k < LANES; k++)
          acc[k] += (double)xv[j + k] * (double)xv[j + k];
      for (int k = 0; j < n; j++, k++)
        acc[k] += (double)xv[j] * (double)xv[j];
      const float r = 1.0f / sqrtf((float)(lanes_sum_d(acc) / (double)n) + eps);
      for (j = 0; j < n; j++)
        yv[j] = w[j] * (xv[j] * r);
      if (rs != NULL) rs[i * ld_rs + v] = r;
    }
}

/*
 * Backward of prmi_llama_rms (same vector layout): with gw = dy w, xh = x r,
 *   dx (+)= r (gw - xh mean(gw xh)),   dw += dy xh   (dw NULL: frozen).
 * x is the forward's input. dx may be dy when not accumulating.
 */
PRMI_TARGET_CLONES
static void prmi_llama_rms_bwd(float *dx, uint64_t lddx, int accumulate, float *dw, const float *dy,
                               uint64_t lddy, const float *x, uint64_t ldx, const float *w,
                               const float *rs, uint64_t ld_rs, uint64_t rows, uint64_t nv,
                               uint64_t n) {
  for (uint64_t i = 0; i < rows; i++)
    for (uint64_t v = 0; v < nv; v++) {
      const float *xv = x + i * ldx + v * n, *dyv = dy + i * lddy + v * n;
      float *dxv = dx + i * lddx + v * n;
      const float r = rs[i * ld_rs + v];
      double acc[LANES] = {0};
      uint64_t j = 0;
      for (; j + LANES <= n; j += LANES)
        for (int k = 0; k < LANES; k++)
          acc[k] += (double)(dyv[j + k] * w[j + k]) * (double)(xv[j + k] * r);
      for (int k = 0; j < n; j++, k++)
        acc[k] += (double)(dyv[j] * w[j]) * (double)(xv[j] * r);
      const float mean = (float)(lanes_sum_d(acc) / (double)n);
      if (dw != NULL)
        for (j = 0; j < n; j++)
          dw[j] += dyv[j] * (xv[j] * r);
      if (accumulate)
        for (j = 0; j < n; j++)
          dxv[j] += r * (dyv[j] * w[j] - (xv[j] * r) * mean);
      else
        for (j = 0; j < n; j++)
          dxv[j] = r * (dyv[j] * w[j] - (xv[j] * r) * mean);
    }
}

/* rows of D: out = rmsnorm(x) w; rs[i] = r when rs is not NULL. */
static void rmsnorm_forward(float *out, float *rs, const float *x, const float *w, uint64_t rows,
                            uint64_t D, float eps) {
  prmi_llama_rms(out, D, rs, 1, x, D, w, rows, 1, D, eps);
}

/* rows of D: dx += rmsnorm backward of dy (x, rs: the forward's input and rstd). */
static void rmsnorm_backward(float *dx, float *dw, const float *dy, const float *x, const float *w,
                             const float *rs, uint64_t rows, uint64_t D) {
  prmi_llama_rms_bwd(dx, D, 1, dw, dy, D, x, D, w, rs, 1, rows, 1, D);
}

/* ---- RoPE --------------------------------------------------------------------------------- */

/*
 * Rotate n_heads adjacent heads of hd = 2 half in each of `rows` rows (stride
 * ld) at consecutive positions whose cos/sin rows start at cs/sn (stride
 * half): y1 = x1 c - x2 s, y2 = x2 c + x1 s (HF's q * cos + rotate_half(q) *
 * sin, the same roundings). inverse: the transpose, for the backward.
 */
PRMI_TARGET_CLONES
static void prmi_llama_rope(float *x, uint64_t ld, uint64_t rows, uint64_t n_heads, const float *cs,
                            const float *sn, uint64_t half, int inverse) {
  for (uint64_t r = 0; r < rows; r++) {
    const float *c = cs + r * half, *s = sn + r * half;
    for (uint64_t h = 0; h < n_heads; h++) {
      float *restrict x1 = x + r * ld + h * 2 * half, *restrict x2 = x1 + half;
      if (!inverse)
        for (uint64_t i = 0; i < half; i++) {
          const float a = x1[i], b = x2[i];
          x1[i] = a * c[i] - b * s[i];
          x2[i] = b * c[i] + a * s[i];
        }
      else
        for (uint64_t i = 0; i < half; i++) {
          const float a = x1[i], b = x2[i];
          x1[i] = a * c[i] + b * s[i];
          x2[i] = b * c[i] - a * s[i];
        }
    }
  }
}

/* ---- dense layers (nn.Linear layout) -------------------------------------------------------- */

/* out (n, rows) (ldo) = x (n, in) W^T + b (b NULL: none). */
static void linear_forward(float *out, uint64_t ldo, const float *x, uint64_t n, uint64_t in,
                           const float *w, const float *b, uint64_t rows) {
  if (b != NULL)
    for (uint64_t i = 0; i < n; i++)
      memcpy(out + i * ldo, b, rows * sizeof(float));
  prmi_gemm(0, 1, n, rows, in, 1.0f, x, in, w, in, b != NULL ? 1.0f : 0.0f, out, ldo);
}

/*
 * Backward of linear_forward: dx (n, in) = beta dx + dy W (dx NULL: not
 * needed); dW += dy^T x, db += colsum(dy) (dW NULL: frozen; db NULL: no bias).
 */
static void linear_backward(float *dx, float beta, float *dw, float *db, const float *dy,
                            uint64_t ldy, const float *x, uint64_t n, uint64_t in, const float *w,
                            uint64_t rows) {
  if (dx != NULL) prmi_gemm(0, 0, n, in, rows, 1.0f, dy, ldy, w, in, beta, dx, in);
  if (dw != NULL) prmi_gemm(1, 0, rows, in, n, 1.0f, dy, ldy, x, in, 1.0f, dw, in);
  if (db != NULL)
    for (uint64_t i = 0; i < n; i++)
      for (uint64_t j = 0; j < rows; j++)
        db[j] += dy[i * ldy + j];
}

/* ---- SwiGLU ------------------------------------------------------------------------------- */

/*
 * sigmoid(z) from e = exp(-|z|) (prmi_exp_shifted, vectorised) without
 * cancellation: 1 / (1 + e) for z >= 0, e / (1 + e) below; 1 - sigmoid(z)
 * the other way round. silu(z) = z sigmoid(z).
 */

/* e[j] = exp(-|z[j]|) for one row of n gates. */
PRMI_TARGET_CLONES
static void prmi_llama_neg_abs(float *restrict e, const float *restrict z, uint64_t n) {
  for (uint64_t j = 0; j < n; j++)
    e[j] = -fabsf(z[j]);
}

/* h[j] = silu(gate[j]) * up[j], e = exp(-|gate|). h may be gate. */
PRMI_TARGET_CLONES
static void prmi_llama_swiglu_row(float *h, const float *gt, const float *up, const float *e,
                                  uint64_t n) {
  for (uint64_t j = 0; j < n; j++) {
    const float z = gt[j], ej = e[j], r = 1.0f / (1.0f + ej);
    const float sg = z >= 0.0f ? r : ej * r;
    h[j] = (z * sg) * up[j];
  }
}

/* e (dgate on return) and dh (dup on return) of one row:
 *   dgate = dh up silu'(gate), silu' = s (1 + z (1 - s));  dup = dh silu(gate) */
PRMI_TARGET_CLONES
static void prmi_llama_swiglu_bwd_row(float *restrict e, float *restrict dh,
                                      const float *restrict gt, const float *restrict up,
                                      uint64_t n) {
  for (uint64_t j = 0; j < n; j++) {
    const float z = gt[j], ej = e[j], r = 1.0f / (1.0f + ej);
    const float sg = z >= 0.0f ? r : ej * r, om = z >= 0.0f ? ej * r : r;
    const float dhj = dh[j];
    e[j] = (dhj * up[j]) * (sg * (1.0f + z * om));
    dh[j] = dhj * (z * sg);
  }
}

/* h (n, F) (ldh) = silu(gate) * up of gu (n, 2F); tmp (F) scratch. h may be
 * gu itself (ldh = 2F: h overwrites the gate half). */
static void swiglu_forward(float *h, uint64_t ldh, const float *gu, uint64_t n, uint64_t F,
                           float *tmp) {
  for (uint64_t i = 0; i < n; i++) {
    const float *gt = gu + i * 2 * F;
    prmi_llama_neg_abs(tmp, gt, F);
    prmi_exp_shifted(tmp, F, 0.0f);
    prmi_llama_swiglu_row(h + i * ldh, gt, gt + F, tmp, F);
  }
}

/*
 * Backward of the MLP on n rows: dy (n, D) is d(x'), gu and mm the forward's
 * gate|up and its input m. SG (n, 2F) is scratch. dm (n, D) receives d(m).
 *   h = silu(gate) up:   dWdown += dy^T h,   dh = dy Wdown
 *   [dgate|dup] from dh (prmi_llama_swiglu_bwd_row)
 *   dWgate|up += [dgate|dup]^T m,   dm = [dgate|dup] [Wgate|Wup]
 */
static void mlp_backward(prm_ctx *ctx, const dims *d, const llama_block *B, float *dm,
                         const float *dy, const float *gu, const float *mm, float *SG, uint64_t n) {
  const float *p = ctx->model->params;
  const uint64_t F = d->F, D = d->D;
  /* SG = [e | h] per row, e = exp(-|gate|): h as the forward computed it */
  for (uint64_t i = 0; i < n; i++) {
    const float *gt = gu + i * 2 * F;
    float *e = SG + i * 2 * F;
    prmi_llama_neg_abs(e, gt, F);
    prmi_exp_shifted(e, F, 0.0f);
    prmi_llama_swiglu_row(e + F, gt, gt + F, e, F);
  }
  float *gwd = prmi_grad_slot(ctx, B->wd);
  if (gwd != NULL) prmi_gemm(1, 0, D, F, n, 1.0f, dy, D, SG + F, 2 * F, 1.0f, gwd, F);
  prmi_gemm(0, 0, n, F, D, 1.0f, dy, D, p + B->wd, F, 0.0f, SG + F, 2 * F); /* dh over h */
  for (uint64_t i = 0; i < n; i++) {
    const float *gt = gu + i * 2 * F;
    prmi_llama_swiglu_bwd_row(SG + i * 2 * F, SG + i * 2 * F + F, gt, gt + F, F);
  }
  linear_backward(dm, 0.0f, prmi_grad_slot(ctx, B->wg), NULL, SG, 2 * F, mm, n, D, p + B->wg,
                  2 * F);
}

/* ---- attention ---------------------------------------------------------------------------- */

/*
 * Softmax numerators of `rows` score rows of S (stride ld): row r has
 * n_r = causal ? len0 + r : len0 valid entries; they become exp(s - max),
 * the entries from n_r to width become 0. inv[r] = 1 / sum, and lse[r] =
 * max + log(sum) unless lse is NULL. The caller multiplies P V by inv: one
 * scaling per output element instead of one per probability.
 */
PRMI_TARGET_CLONES
static void prmi_llama_softmax(float *S, uint64_t ld, uint64_t rows, uint64_t len0, int causal,
                               uint64_t width, float *inv, float *lse) {
  for (uint64_t r = 0; r < rows; r++) {
    float *s = S + r * ld;
    const uint64_t n = causal ? len0 + r : len0;
    const float mx = max_n(s, n);
    prmi_exp_shifted(s, n, mx);
    const float sum = sum_n(s, n);
    inv[r] = 1.0f / sum;
    if (lse != NULL) lse[r] = mx + logf(sum);
    for (uint64_t t = n; t < width; t++)
      s[t] = 0.0f;
  }
}

/* The probabilities again, P = exp(s - lse), in the layout of
 * prmi_llama_softmax (lse[r] per row). */
PRMI_TARGET_CLONES
static void prmi_llama_probs(float *P, uint64_t ld, uint64_t rows, uint64_t len0, int causal,
                             uint64_t width, const float *lse) {
  for (uint64_t r = 0; r < rows; r++) {
    float *p = P + r * ld;
    const uint64_t n = causal ? len0 + r : len0;
    prmi_exp_shifted(p, n, lse[r]);
    for (uint64_t t = n; t < width; t++)
      p[t] = 0.0f;
  }
}

/* dS = P (dP - rowsum(P dP)) scale in place of dP, same layout. */
PRMI_TARGET_CLONES
static void prmi_llama_softmax_bwd(float *dP, const float *P, uint64_t ld, uint64_t rows,
                                   uint64_t len0, int causal, uint64_t width, float scale) {
  for (uint64_t r = 0; r < rows; r++) {
    const float *p = P + r * ld;
    float *dp = dP + r * ld;
    const uint64_t n = causal ? len0 + r : len0;
    const float dsum = dot_n(p, dp, n);
    for (uint64_t t = 0; t < n; t++)
      dp[t] = p[t] * (dp[t] - dsum) * scale;
    for (uint64_t t = n; t < width; t++)
      dp[t] = 0.0f;
  }
}

/* rows x n block (stride ld) *= per-row factor. */
static void scale_rows(float *x, uint64_t ld, uint64_t rows, uint64_t n, const float *f) {
  for (uint64_t r = 0; r < rows; r++)
    for (uint64_t j = 0; j < n; j++)
      x[r * ld + j] *= f[r];
}

/*
 * Attention scratch of a context. The g query heads that share a kv head
 * run together, ATT_STACK at a time: their query rows are stacked into one
 * (c m, hd) matrix, so that each GEMM against the shared keys and values is
 * c times taller and there are c times fewer of them (the GEMMs of one head
 * and one 32-row block are small enough for the per-call cost of the BLAS to
 * show). ATT_ROWS = ATT_STACK * ATT_BLOCK bounds the rows of every block.
 */
#define ATT_STACK 4
#define ATT_ROWS (ATT_STACK * ATT_BLOCK)

typedef struct att_scratch {
  float *S, *dS;        /* (ATT_ROWS, max_len) probabilities, their gradient */
  float *qs, *os, *dqs; /* (ATT_ROWS, hd) stacked queries, outputs or d(outputs), d(queries) */
  float *inv;           /* (ATT_ROWS) 1 / softmax row sums */
} att_scratch;

/* dst (c m, hd) <- c heads of m rows: head u of row i at src + i lds + u hd. */
static void stack_heads(float *dst, const float *src, uint64_t lds, uint64_t m, uint64_t c,
                        uint64_t hd) {
  for (uint64_t u = 0; u < c; u++)
    for (uint64_t i = 0; i < m; i++)
      memcpy(dst + (u * m + i) * hd, src + i * lds + u * hd, hd * sizeof(float));
}

/* The inverse of stack_heads, each row times f[u m + i] when f is not NULL. */
static void unstack_heads(float *dst, uint64_t ldd, const float *src, uint64_t m, uint64_t c,
                          uint64_t hd, const float *f) {
  for (uint64_t u = 0; u < c; u++)
    for (uint64_t i = 0; i < m; i++) {
      const float *s = src + (u * m + i) * hd;
      float *o = dst + i * ldd + u * hd;
      if (f == NULL)
        memcpy(o, s, hd * sizeof(float));
      else
        for (uint64_t t = 0; t < hd; t++)
          o[t] = s[t] * f[u * m + i];
    }
}

/*
 * Causal attention of one sequence of T tokens for every query head, for
 * its queries at positions p0..T-1 (p0 > 0: the first p0 tokens are a
 * shared prefix, whose queries an earlier row computes), blocked as in
 * gpt2.c: query rows [i0, i1) only see keys [0, i1). q points at the first
 * query's qkv row (stride QKV: rotated q | rotated k | v); kv at position
 * 0's rotated k | v (row stride ldkv: QKV in place, with kv = q's row + QD;
 * 2 KD when gathered). o rows (stride QD) from the first query;
 * lse[h * ld_lse + i - p0] = log sum_j exp(s_ij) (lse NULL: not kept).
 */
static void attention_forward(float *o, float *lse, uint64_t ld_lse, const float *qkv,
                              const float *kv, uint64_t ldkv, const att_scratch *w, uint64_t p0,
                              uint64_t T, const dims *d) {
  const uint64_t hd = d->hd, ld = d->QKV, QD = d->QD;
  for (uint64_t j = 0; j < d->G; j++) {
    const float *k = kv + j * hd, *v = k + d->KD;
    for (uint64_t u0 = 0; u0 < d->g; u0 += ATT_STACK) {
      const uint64_t c = d->g - u0 < ATT_STACK ? d->g - u0 : ATT_STACK, h0 = j * d->g + u0;
      for (uint64_t i0 = p0; i0 < T; i0 += ATT_BLOCK) {
        const uint64_t i1 = i0 + ATT_BLOCK < T ? i0 + ATT_BLOCK : T, m = i1 - i0;
        const float *q = qkv + (i0 - p0) * ld + h0 * hd;
        float *out = o + (i0 - p0) * QD + h0 * hd;
        if (c > 1) stack_heads(w->qs, q, ld, m, c, hd);
        prmi_gemm(0, 1, c * m, i1, hd, d->scale, c > 1 ? w->qs : q, c > 1 ? hd : ld, k, ldkv,
                  0.0f, w->S, T);
        for (uint64_t u = 0; u < c; u++)
          prmi_llama_softmax(w->S + u * m * T, T, m, i0 + 1, 1, i1, w->inv + u * m,
                             lse != NULL ? lse + (h0 + u) * ld_lse + i0 - p0 : NULL);
        if (c > 1) {
          prmi_gemm(0, 0, c * m, hd, i1, 1.0f, w->S, T, v, ldkv, 0.0f, w->os, hd);
          unstack_heads(out, QD, w->os, m, c, hd, w->inv);
        } else {
          prmi_gemm(0, 0, m, hd, i1, 1.0f, w->S, T, v, ldkv, 0.0f, out, QD);
          scale_rows(out, QD, m, hd, w->inv);
        }
      }
    }
  }
}

/*
 * Backward of attention_forward for one sequence (the same qkv, kv, ldkv,
 * lse, p0 and T; d_o rows from the first query, stride QD). dq rows (stride
 * QKV, from the first query; d(rotated q)) are overwritten, and so are dkv's
 * rows 0..T-1 (row stride lddkv: dk | dv, KD apart). Blocks run last to
 * first; the first heads of each kv group in the last block (which sees
 * every key) initialise dk and dv, everything after accumulates (the g
 * heads of a group add into one kv head). Needs p0 < T.
 */
static void attention_backward(float *dq, float *dkv, uint64_t lddkv, const float *d_o,
                               const float *qkv, const float *kv, uint64_t ldkv, const float *lse,
                               uint64_t ld_lse, const att_scratch *w, uint64_t p0, uint64_t T,
                               const dims *d) {
  const uint64_t hd = d->hd, ld = d->QKV, QD = d->QD;
  const uint64_t n_blocks = (T - p0 + ATT_BLOCK - 1) / ATT_BLOCK;
  for (uint64_t j = 0; j < d->G; j++) {
    const float *k = kv + j * hd, *v = k + d->KD;
    float *dk = dkv + j * hd, *dv = dk + d->KD;
    for (uint64_t u0 = 0; u0 < d->g; u0 += ATT_STACK) {
      const uint64_t c = d->g - u0 < ATT_STACK ? d->g - u0 : ATT_STACK, h0 = j * d->g + u0;
      for (uint64_t b = n_blocks; b-- > 0;) {
        const uint64_t i0 = p0 + b * ATT_BLOCK, i1 = i0 + ATT_BLOCK < T ? i0 + ATT_BLOCK : T;
        const uint64_t m = i1 - i0, cm = c * m, r0 = i0 - p0;
        const float beta = (b + 1 == n_blocks && u0 == 0) ? 0.0f : 1.0f;
        const float *q = qkv + r0 * ld + h0 * hd, *dout = d_o + r0 * QD + h0 * hd;
        float *dqb = dq + r0 * ld + h0 * hd;
        const float *qs = q, *dos = dout;
        uint64_t ldq = ld, lddo = QD;
        if (c > 1) {
          stack_heads(w->qs, q, ld, m, c, hd);
          stack_heads(w->os, dout, QD, m, c, hd);
          qs = w->qs;
          dos = w->os;
          ldq = lddo = hd;
        }
        prmi_gemm(0, 1, cm, i1, hd, d->scale, qs, ldq, k, ldkv, 0.0f, w->S, T);
        for (uint64_t u = 0; u < c; u++)
          prmi_llama_probs(w->S + u * m * T, T, m, i0 + 1, 1, i1, lse + (h0 + u) * ld_lse + r0);
        /* dv (+)= P^T dout; dP = dout v^T */
        prmi_gemm(1, 0, i1, hd, cm, 1.0f, w->S, T, dos, lddo, beta, dv, lddkv);
        prmi_gemm(0, 1, cm, i1, hd, 1.0f, dos, lddo, v, ldkv, 0.0f, w->dS, T);
        for (uint64_t u = 0; u < c; u++)
          prmi_llama_softmax_bwd(w->dS + u * m * T, w->S + u * m * T, T, m, i0 + 1, 1, i1,
                                 d->scale);
        /* dq = dS k; dk (+)= dS^T q */
        if (c > 1) {
          prmi_gemm(0, 0, cm, hd, i1, 1.0f, w->dS, T, k, ldkv, 0.0f, w->dqs, hd);
          unstack_heads(dqb, ld, w->dqs, m, c, hd, NULL);
        } else {
          prmi_gemm(0, 0, m, hd, i1, 1.0f, w->dS, T, k, ldkv, 0.0f, dqb, ld);
        }
        prmi_gemm(1, 0, i1, hd, cm, 1.0f, w->dS, T, qs, ldq, beta, dk, lddkv);
      }
    }
  }
}

/* Gather w floats at column c0 of positions 0..T-1 (packed rows kmap[t],
 * stride ld) into dst (T, w). */
static void gather_rows(float *dst, const float *src, uint64_t ld, uint64_t c0, uint64_t w,
                        const uint64_t *kmap, uint64_t T) {
  for (uint64_t t = 0; t < T; t++)
    memcpy(dst + t * w, src + kmap[t] * ld + c0, w * sizeof(float));
}

/* The reverse for gradients: positions from `own` on are the row's own
 * (written here first: set), earlier ones an earlier row's (add). */
static void scatter_rows(float *dst, uint64_t ld, uint64_t c0, const float *src, uint64_t w,
                         const uint64_t *kmap, uint64_t own, uint64_t T) {
  for (uint64_t t = 0; t < T; t++) {
    float *o = dst + kmap[t] * ld + c0;
    const float *s = src + t * w;
    if (t >= own)
      memcpy(o, s, w * sizeof(float));
    else
      for (uint64_t j = 0; j < w; j++)
        o[j] += s[j];
  }
}

/* ---- context buffers ---------------------------------------------------------------------- */

/* What a full layer keeps for the backward (training: one set per layer;
 * inference: one set shared by all, with x2 == x and m == a). */
typedef struct layer_acts {
  float *x;      /* (N, D) residual stream entering the layer */
  float *a;      /* (N, D) input_layernorm output */
  float *rs1;    /* (N) its rstd (training) */
  float *qkv;    /* (N, QKV) rotated q | rotated k | v */
  float *qk_raw; /* (N, QD + KD) q | k before qk_norm (training with qk_norm) */
  float *qk_rs;  /* (N, H + G) per-head rstd of qk_norm (training with qk_norm) */
  float *o;      /* (N, QD) attention output */
  float *lse;    /* (H, max_tok) log-sum-exp of each softmax row (training) */
  float *x2;     /* (N, D) residual after attention */
  float *m;      /* (N, D) post_attention_layernorm output */
  float *rs2;    /* (N) its rstd (training) */
  float *gu;     /* (N, 2F) gate | up */
} layer_acts;

/* The last layer: its per-row part (x, a, rs1 and k | v of every row) and
 * the rest at the pooled rows only (compact, one row per sequence). */
typedef struct last_acts {
  float *x, *a, *rs1;  /* (N, D), (N, D), (N) */
  float *kv;           /* (N, 2 KD) rotated k | v */
  float *k_raw;        /* (N, KD) k before qk_norm (training with qk_norm) */
  float *k_rs;         /* (N, G) */
  float *ac;           /* (R, D) a at the pooled rows */
  float *q;            /* (R, QD) rotated q */
  float *q_raw;        /* (R, QD) q before qk_norm (training with qk_norm) */
  float *q_rs;         /* (R, H) */
  float *o;            /* (R, QD) */
  float *lse;          /* (R, H) (training) */
  float *x2, *m, *rs2; /* (R, D), (R, D), (R) */
  float *gu;           /* (R, 2F) */
  float *out;          /* (R, D) residual stream leaving the last layer */
  float *fn, *fn_rs;   /* (R, D), (R): model.norm output and rstd */
} last_acts;

typedef struct llama_acts {
  uint64_t max_tok, max_rows, max_len;
  prmi_pack *pk;     /* the last forward's packed layout (shared prefixes) */
  float *cos, *sin;  /* (max_len, hd/2) RoPE table */
  layer_acts *layer; /* [L - 1] full layers */
  last_acts last;
  att_scratch att; /* attention scratch (dS, dqs: training) */
  float *kvg;      /* (max_len, 2 KD) gathered k | v of a row with a shared prefix */
  float *dkvg;     /* (max_len, 2 KD) their gradient (training) */
  float *tmp;      /* (F) exponentials of one row of gates */
  /* training */
  float *d_res;   /* (max_tok, D) d(residual stream) */
  float *d_a;     /* (max_tok, D) d(a), d(m) */
  float *d_big;   /* (max_tok, max(2F, QD)): forward: h (ld F); backward: SG, d(o) */
  float *d_qkv;   /* (max_tok, QKV); last layer: (max_tok, 2 KD) */
  float *d_last;  /* (R, D) */
  float *d_lastq; /* (R, QD) */
  float *arena;   /* everything above, one allocation */
} llama_acts;

/*
 * One walk over the buffers both counts them (base NULL) and carves them out
 * of one allocation, so that the count and the layout cannot disagree. Every
 * buffer starts on a 64-byte boundary. The total is a double: for absurd
 * sizes it must not overflow before ctx_new refuses them.
 */
typedef struct planner {
  float *base; /* NULL: count only */
  double total;
  uint64_t used;
} planner;

static float *carve(planner *pl, uint64_t n) {
  const uint64_t n16 = (n + 15) & ~(uint64_t)15;
  float *r = pl->base != NULL ? pl->base + pl->used : NULL;
  pl->used += n16;
  pl->total += (double)n16;
  return r;
}

/*
 * Floats, with T = max_rows * max_len, R = max_rows, q = 1 with qk_norm (else
 * 0) (each term rounded up to a multiple of 16):
 *   RoPE table                            max_len hd
 *   full layers (training: L - 1 sets; inference: 1 set when L > 1, else 0)
 *     training:  T (4D + QKV + QD + 2F + H + 2 + q (QD + KD + H + G))
 *     inference: T (2D + QKV + QD + 2F)
 *   last layer, per row (training, or inference with L = 1)
 *                T (2D + 2KD) + training T (1 + q (KD + G))
 *   last layer, pooled rows               R (5D + 2QD + 2F + 2) + training R (H + q (QD + H))
 *   attention and gate scratch            128 (max_len + 2 hd + 1) + F + 2 max_len KD
 *                                         + training 128 (max_len + hd) + 2 max_len KD
 *   training backward                     T (2D + max(2F, QD) + QKV) + R (D + QD)
 * Linear in max_rows * max_len: no T x T buffer anywhere.
 */
static void plan(planner *pl, llama_acts *g, const dims *d, uint64_t R, uint64_t max_len,
                 int inference) {
  const uint64_t T = R * max_len, D = d->D, F = d->F, L = d->L;
  const int train = !inference, kq = train && d->qkn;
  g->cos = carve(pl, max_len * d->half);
  g->sin = carve(pl, max_len * d->half);
  const uint64_t full_sets = inference ? (L > 1 ? 1 : 0) : L - 1;
  for (uint64_t s = 0; s < full_sets; s++) {
    layer_acts scratch_set, *A = pl->base != NULL ? &g->layer[s] : &scratch_set;
    A->x = carve(pl, T * D);
    A->a = carve(pl, T * D);
    A->qkv = carve(pl, T * d->QKV);
    A->o = carve(pl, T * d->QD);
    A->gu = carve(pl, T * 2 * F);
    if (train) {
      A->rs1 = carve(pl, T);
      A->lse = carve(pl, T * d->H);
      A->x2 = carve(pl, T * D);
      A->m = carve(pl, T * D);
      A->rs2 = carve(pl, T);
    } else {
      A->rs1 = A->lse = A->rs2 = NULL;
      A->x2 = A->x; /* residual adds in place */
      A->m = A->a;  /* a is dead once q, k, v exist */
    }
    A->qk_raw = kq ? carve(pl, T * (d->QD + d->KD)) : NULL;
    A->qk_rs = kq ? carve(pl, T * (d->H + d->G)) : NULL;
  }
  if (inference && pl->base != NULL)
    for (uint64_t l = 1; l + 1 < L; l++)
      g->layer[l] = g->layer[0];
  last_acts *Z = &g->last;
  if (train || L == 1) {
    Z->x = carve(pl, T * D);
    Z->a = carve(pl, T * D);
    Z->kv = carve(pl, T * 2 * d->KD);
  } else if (pl->base != NULL) { /* inference: the shared set's buffers are free by now */
    Z->x = g->layer[0].x;
    Z->a = g->layer[0].a;
    Z->kv = g->layer[0].qkv;
  }
  Z->rs1 = train ? carve(pl, T) : NULL;
  Z->k_raw = kq ? carve(pl, T * d->KD) : NULL;
  Z->k_rs = kq ? carve(pl, T * d->G) : NULL;
  Z->ac = carve(pl, R * D);
  Z->q = carve(pl, R * d->QD);
  Z->o = carve(pl, R * d->QD);
  Z->x2 = carve(pl, R * D);
  Z->m = carve(pl, R * D);
  Z->rs2 = carve(pl, R);
  Z->gu = carve(pl, R * 2 * F);
  Z->out = carve(pl, R * D);
  Z->fn = carve(pl, R * D);
  Z->fn_rs = carve(pl, R);
  Z->lse = train ? carve(pl, R * d->H) : NULL;
  Z->q_raw = kq ? carve(pl, R * d->QD) : NULL;
  Z->q_rs = kq ? carve(pl, R * d->H) : NULL;
  g->att.S = carve(pl, ATT_ROWS * max_len);
  g->att.dS = train ? carve(pl, ATT_ROWS * max_len) : NULL;
  g->att.qs = carve(pl, ATT_ROWS * d->hd);
  g->att.os = carve(pl, ATT_ROWS * d->hd);
  g->att.dqs = train ? carve(pl, ATT_ROWS * d->hd) : NULL;
  g->att.inv = carve(pl, ATT_ROWS);
  g->tmp = carve(pl, F);
  g->kvg = carve(pl, max_len * 2 * d->KD);
  g->dkvg = train ? carve(pl, max_len * 2 * d->KD) : NULL;
  if (train) {
    g->d_res = carve(pl, T * D);
    g->d_a = carve(pl, T * D);
    g->d_big = carve(pl, T * (2 * F > d->QD ? 2 * F : d->QD));
    g->d_qkv = carve(pl, T * d->QKV);
    g->d_last = carve(pl, R * D);
    g->d_lastq = carve(pl, R * d->QD);
  }
}

static void llama_ctx_free(void *acts) {
  llama_acts *g = acts;
  if (g == NULL) return;
  prmi_free(g->arena);
  free(g->layer);
  prmi_pack_free(g->pk);
  free(g);
}

static double llama_ctx_floats(const prm_model *m, uint64_t max_rows, uint64_t max_len,
                               int inference, uint32_t n_workers) {
  (void)n_workers;
  const dims d = dims_of(m);
  llama_acts g;
  memset(&g, 0, sizeof g);
  planner pl = {NULL, 0.0, 0};
  plan(&pl, &g, &d, max_rows, max_len, inference);
  return pl.total;
}

/* The RoPE table of positions 0 .. max_len - 1, as HF computes it in fp32
 * (see the top of the file). */
static void rope_table(float *cs, float *sn, uint64_t max_len, uint64_t hd, double theta) {
  const uint64_t half = hd / 2;
  const float base = (float)theta;
  for (uint64_t i = 0; i < half; i++) {
    const float ex = (float)(2 * i) / (float)hd;
    const float inv = 1.0f / (float)pow((double)base, (double)ex);
    for (uint64_t t = 0; t < max_len; t++) {
      const float ang = (float)t * inv;
      cs[t * half + i] = (float)cos((double)ang);
      sn[t * half + i] = (float)sin((double)ang);
    }
  }
}

static int llama_ctx_new(prm_ctx *c) {
  const prm_model *m = c->model;
  const dims d = dims_of(m);
  const double floats = llama_ctx_floats(m, c->max_rows, c->max_len, c->inference, c->n_workers);
  if (floats > (double)((uint64_t)1 << 46)) return PRM_ERR_NOMEM;
  llama_acts *g = calloc(1, sizeof *g);
  if (g == NULL) return PRM_ERR_NOMEM;
  g->max_rows = c->max_rows;
  g->max_len = c->max_len;
  g->max_tok = c->max_rows * c->max_len;
  g->layer = calloc(d.L, sizeof *g->layer);
  g->arena = prmi_calloc((size_t)floats, sizeof(float));
  g->pk = prmi_pack_new(c->max_rows, c->max_len);
  if (g->layer == NULL || g->arena == NULL || g->pk == NULL) {
    llama_ctx_free(g);
    return PRM_ERR_NOMEM;
  }
  planner pl = {g->arena, 0.0, 0};
  plan(&pl, g, &d, c->max_rows, c->max_len, c->inference);
  rope_table(g->cos, g->sin, c->max_len, d.hd, m->opts.rope_theta);
  c->acts = g;
  return PRM_OK;
}

/* ---- validation --------------------------------------------------------------------------- */

static int llama_check_batch(prm_ctx *ctx, const prm_batch *b, uint64_t *stride) {
  *stride = 0;
  return prmi_check_token_batch(ctx, b, ctx->model->opts.vocab_size);
}

/* ---- forward ------------------------------------------------------------------------------ */

/* qk_norm in place on rows of x (n_heads heads of hd, row stride ld); the
 * per-head rstd goes to rs[i * ld_rs + h] when rs is not NULL. */
static void head_norm_forward(float *x, uint64_t ld, float *rs, uint64_t ld_rs, const float *w,
                              uint64_t rows, uint64_t n_heads, const dims *d) {
  prmi_llama_rms(x, ld, rs, ld_rs, x, ld, w, rows, n_heads, d->hd, d->eps);
}

/* Backward of head_norm_forward in place: dx holds d(normed) on entry; raw
 * is the forward's input. */
static void head_norm_backward(float *dx, uint64_t ld, float *dw, const float *raw, uint64_t ld_raw,
                               const float *rs, uint64_t ld_rs, const float *w, uint64_t rows,
                               uint64_t n_heads, const dims *d) {
  prmi_llama_rms_bwd(dx, ld, 0, dw, dx, ld, raw, ld_raw, w, rs, ld_rs, rows, n_heads, d->hd);
}

/* Rotate (or, inverse, rotate back) n_heads heads of every packed row at its
 * position: the own rows of sequence i, off[i] .. off[i+1]-1, hold positions
 * first[i], first[i] + 1, ... */
static void rope_packed(float *x, uint64_t ld, uint64_t n_heads, const llama_acts *g, uint64_t n,
                        const dims *d, int inverse) {
  const prmi_pack *pk = g->pk;
  for (uint64_t i = 0; i < n; i++) {
    const uint64_t t0 = pk->first[i];
    prmi_llama_rope(x + pk->off[i] * ld, ld, pk->off[i + 1] - pk->off[i], n_heads,
                    g->cos + t0 * d->half, g->sin + t0 * d->half, d->half, inverse);
  }
}

/* The same for one row per sequence (compact row i, stride ld) at its pooled
 * position len_i - 1. */
static void rope_pooled(float *x, uint64_t ld, uint64_t n_heads, const llama_acts *g, uint64_t n,
                        const dims *d, int inverse) {
  for (uint64_t i = 0; i < n; i++) {
    const uint64_t t = g->pk->len[i] - 1;
    prmi_llama_rope(x + i * ld, ld, 1, n_heads, g->cos + t * d->half, g->sin + t * d->half, d->half,
                    inverse);
  }
}

/* A full layer l over all N rows; the residual stream leaving it goes to xn. */
static void layer_forward(const prm_model *m, llama_acts *g, const dims *d, uint64_t l, float *xn,
                          float *hbuf, uint64_t ldh, uint64_t n) {
  const float *p = m->params;
  const llama_block *B = &LAYOUT(m)->blk[l];
  const layer_acts *A = &g->layer[l];
  const prmi_pack *pk = g->pk;
  const uint64_t N = pk->n_tok, D = d->D, QKV = d->QKV;
  rmsnorm_forward(A->a, A->rs1, A->x, p + B->ln1, N, D, d->eps);
  if (!d->bias) {
    linear_forward(A->qkv, QKV, A->a, N, D, p + B->wq, NULL, QKV);
  } else {
    linear_forward(A->qkv, QKV, A->a, N, D, p + B->wq, p + B->bq, d->QD);
    linear_forward(A->qkv + d->QD, QKV, A->a, N, D, p + B->wk, p + B->bk, d->KD);
    linear_forward(A->qkv + d->QD + d->KD, QKV, A->a, N, D, p + B->wv, p + B->bv, d->KD);
  }
  if (d->qkn) {
    if (A->qk_raw != NULL)
      for (uint64_t r = 0; r < N; r++)
        memcpy(A->qk_raw + r * (d->QD + d->KD), A->qkv + r * QKV, (d->QD + d->KD) * sizeof(float));
    head_norm_forward(A->qkv, QKV, A->qk_rs, d->H + d->G, p + B->qn, N, d->H, d);
    head_norm_forward(A->qkv + d->QD, QKV, A->qk_rs == NULL ? NULL : A->qk_rs + d->H, d->H + d->G,
                      p + B->kn, N, d->G, d);
  }
  rope_packed(A->qkv, QKV, d->H + d->G, g, n, d, 0); /* q and k heads are adjacent */
  for (uint64_t i = 0; i < n; i++) {
    const uint64_t row = pk->off[i], p0 = pk->first[i], T = pk->len[i];
    const float *q = A->qkv + row * QKV;
    float *lse = A->lse != NULL ? A->lse + row : NULL;
    if (p0 == 0) {
      attention_forward(A->o + row * d->QD, lse, g->max_tok, q, q + d->QD, QKV, &g->att, 0, T, d);
    } else if (p0 < T) { /* keys and values partly an earlier row's */
      gather_rows(g->kvg, A->qkv, QKV, d->QD, 2 * d->KD, pk->kmap + pk->kmap_off[i], T);
      attention_forward(A->o + row * d->QD, lse, g->max_tok, q, g->kvg, 2 * d->KD, &g->att, p0, T,
                        d);
    }
  }
  if (A->x2 != A->x) memcpy(A->x2, A->x, N * D * sizeof(float));
  prmi_gemm(0, 1, N, D, d->QD, 1.0f, A->o, d->QD, p + B->wo, d->QD, 1.0f, A->x2, D);
  rmsnorm_forward(A->m, A->rs2, A->x2, p + B->ln2, N, D, d->eps);
  linear_forward(A->gu, 2 * d->F, A->m, N, D, p + B->wg, NULL, 2 * d->F);
  if (hbuf == NULL) { /* inference: h over the gate half */
    hbuf = A->gu;
    ldh = 2 * d->F;
  }
  swiglu_forward(hbuf, ldh, A->gu, N, d->F, g->tmp);
  if (xn != A->x2) memcpy(xn, A->x2, N * D * sizeof(float));
  prmi_gemm(0, 1, N, D, d->F, 1.0f, hbuf, ldh, p + B->wd, d->F, 1.0f, xn, D);
}

/*
 * The last layer: keys and values of every row, the rest at the pooled row
 * r_i = off[i+1] - 1 of each sequence (compact row i). The g query heads of
 * kv head j at one pooled row are adjacent, so each (sequence, kv head) is
 * one (g, hd) x (hd, T) GEMM.
 */
static void last_forward(const prm_model *m, llama_acts *g, const dims *d, float *hbuf,
                         uint64_t n) {
  const float *p = m->params;
  const llama_block *B = &LAYOUT(m)->blk[d->L - 1];
  last_acts *Z = &g->last;
  const prmi_pack *pk = g->pk;
  const uint64_t N = pk->n_tok, D = d->D, QD = d->QD, KD = d->KD, hd = d->hd;
  rmsnorm_forward(Z->a, Z->rs1, Z->x, p + B->ln1, N, D, d->eps);
  if (!d->bias) {
    linear_forward(Z->kv, 2 * KD, Z->a, N, D, p + B->wk, NULL, 2 * KD);
  } else {
    linear_forward(Z->kv, 2 * KD, Z->a, N, D, p + B->wk, p + B->bk, KD);
    linear_forward(Z->kv + KD, 2 * KD, Z->a, N, D, p + B->wv, p + B->bv, KD);
  }
  for (uint64_t i = 0; i < n; i++)
    memcpy(Z->ac + i * D, Z->a + pk->last[i] * D, D * sizeof(float));
  linear_forward(Z->q, QD, Z->ac, n, D, p + B->wq, d->bias ? p + B->bq : NULL, QD);
  if (d->qkn) {
    if (Z->k_raw != NULL) {
      for (uint64_t r = 0; r < N; r++)
        memcpy(Z->k_raw + r * KD, Z->kv + r * 2 * KD, KD * sizeof(float));
      memcpy(Z->q_raw, Z->q, n * QD * sizeof(float));
    }
    head_norm_forward(Z->kv, 2 * KD, Z->k_rs, d->G, p + B->kn, N, d->G, d);
    head_norm_forward(Z->q, QD, Z->q_rs, d->H, p + B->qn, n, d->H, d);
  }
  rope_packed(Z->kv, 2 * KD, d->G, g, n, d, 0);
  rope_pooled(Z->q, QD, d->H, g, n, d, 0);
  for (uint64_t i = 0; i < n; i++) {
    const uint64_t T = pk->len[i];
    const float *kv = Z->kv + pk->off[i] * 2 * KD;
    if (pk->first[i] > 0) { /* keys and values partly an earlier row's */
      gather_rows(g->kvg, Z->kv, 2 * KD, 0, 2 * KD, pk->kmap + pk->kmap_off[i], T);
      kv = g->kvg;
    }
    for (uint64_t j = 0; j < d->G; j++) {
      const float *k = kv + j * hd, *v = k + KD;
      const float *q = Z->q + i * QD + j * d->g * hd;
      float *S = g->att.S, *inv = g->att.inv;
      for (uint64_t u0 = 0; u0 < d->g; u0 += ATT_ROWS) {
        const uint64_t nu = d->g - u0 < ATT_ROWS ? d->g - u0 : ATT_ROWS;
        prmi_gemm(0, 1, nu, T, hd, d->scale, q + u0 * hd, hd, k, 2 * KD, 0.0f, S, T);
        prmi_llama_softmax(S, T, nu, T, 0, T, inv,
                           Z->lse != NULL ? Z->lse + i * d->H + j * d->g + u0 : NULL);
        float *oq = Z->o + i * QD + (j * d->g + u0) * hd;
        prmi_gemm(0, 0, nu, hd, T, 1.0f, S, T, v, 2 * KD, 0.0f, oq, hd);
        scale_rows(oq, hd, nu, hd, inv);
      }
    }
  }
  for (uint64_t i = 0; i < n; i++)
    memcpy(Z->x2 + i * D, Z->x + pk->last[i] * D, D * sizeof(float));
  prmi_gemm(0, 1, n, D, QD, 1.0f, Z->o, QD, p + B->wo, QD, 1.0f, Z->x2, D);
  rmsnorm_forward(Z->m, Z->rs2, Z->x2, p + B->ln2, n, D, d->eps);
  linear_forward(Z->gu, 2 * d->F, Z->m, n, D, p + B->wg, NULL, 2 * d->F);
  uint64_t ldh = d->F;
  if (hbuf == NULL) {
    hbuf = Z->gu;
    ldh = 2 * d->F;
  }
  swiglu_forward(hbuf, ldh, Z->gu, n, d->F, g->tmp);
  memcpy(Z->out, Z->x2, n * D * sizeof(float));
  prmi_gemm(0, 1, n, D, d->F, 1.0f, hbuf, ldh, p + B->wd, d->F, 1.0f, Z->out, D);
}

static int llama_forward(prm_ctx *ctx, const prm_batch *b, uint64_t stride, float *scores,
                         int copy_input) {
  (void)stride;
  (void)copy_input; /* the packed ids are always a copy */
  const prm_model *m = ctx->model;
  llama_acts *g = ctx->acts;
  const dims d = dims_of(m);
  const float *p = m->params;
  const uint64_t n = b->n, D = d.D, L = d.L;

  /* pack the tokens, each shared prefix once */
  const prmi_pack *pk = g->pk;
  prmi_pack_tokens(g->pk, b);
  float *x0 = L > 1 ? g->layer[0].x : g->last.x;
  for (uint64_t r = 0; r < pk->n_tok; r++)
    memcpy(x0 + r * D, p + LAYOUT(m)->embed + (uint64_t)pk->ids[r] * D, D * sizeof(float));

  /* training: h of a full layer lives only until its down projection */
  float *hbuf = ctx->inference ? NULL : g->d_big;
  for (uint64_t l = 0; l + 1 < L; l++)
    layer_forward(m, g, &d, l, l + 2 < L ? g->layer[l + 1].x : g->last.x, hbuf, d.F, n);
  last_forward(m, g, &d, hbuf, n);
  const last_acts *Z = &g->last;
  const float *w = p + m->head_w;
  rmsnorm_forward(Z->fn, Z->fn_rs, Z->out, p + LAYOUT(m)->norm, n, D, d.eps);
  for (uint64_t i = 0; i < n; i++) {
    float s = 0.0f;
    for (uint64_t j = 0; j < D; j++)
      s += Z->fn[i * D + j] * w[j];
    scores[i] = s;
  }
  return PRM_OK;
}

/* ---- backward ----------------------------------------------------------------------------- */

/* Backward of a full layer l: g->d_res holds d(x_{l+1}) and receives d(x_l). */
static void layer_backward(prm_ctx *ctx, llama_acts *g, const dims *d, uint64_t l, uint64_t n) {
  const prm_model *m = ctx->model;
  const float *p = m->params;
  const llama_block *B = &LAYOUT(m)->blk[l];
  const layer_acts *A = &g->layer[l];
  const prmi_pack *pk = g->pk;
  const uint64_t N = pk->n_tok, D = d->D, QD = d->QD, KD = d->KD, QKV = d->QKV;
  /* x' = x2 + mlp(m), m = rmsnorm(x2) */
  mlp_backward(ctx, d, B, g->d_a, g->d_res, A->gu, A->m, g->d_big, N);
  rmsnorm_backward(g->d_res, prmi_grad_slot(ctx, B->ln2), g->d_a, A->x2, p + B->ln2, A->rs2, N, D);
  /* x2 = x + o Wo^T */
  float *d_o = g->d_big;
  linear_backward(d_o, 0.0f, prmi_grad_slot(ctx, B->wo), NULL, g->d_res, D, A->o, N, QD, p + B->wo,
                  D);
  /* rows in order: a row's own keys are set by it before later rows that
   * share them add their part */
  for (uint64_t i = 0; i < n; i++) {
    const uint64_t row = pk->off[i], p0 = pk->first[i], T = pk->len[i];
    const float *q = A->qkv + row * QKV;
    float *dq = g->d_qkv + row * QKV;
    if (p0 == 0) {
      attention_backward(dq, dq + QD, QKV, d_o + row * QD, q, q + QD, QKV, A->lse + row,
                         g->max_tok, &g->att, 0, T, d);
    } else if (p0 < T) {
      const uint64_t *kmap = pk->kmap + pk->kmap_off[i];
      gather_rows(g->kvg, A->qkv, QKV, QD, 2 * KD, kmap, T);
      attention_backward(dq, g->dkvg, 2 * KD, d_o + row * QD, q, g->kvg, 2 * KD, A->lse + row,
                         g->max_tok, &g->att, p0, T, d);
      scatter_rows(g->d_qkv, QKV, QD, g->dkvg, 2 * KD, kmap, p0, T);
    }
  }
  rope_packed(g->d_qkv, QKV, d->H + d->G, g, n, d, 1);
  if (d->qkn) {
    head_norm_backward(g->d_qkv, QKV, prmi_grad_slot(ctx, B->qn), A->qk_raw, QD + KD, A->qk_rs,
                       d->H + d->G, p + B->qn, N, d->H, d);
    head_norm_backward(g->d_qkv + QD, QKV, prmi_grad_slot(ctx, B->kn), A->qk_raw + QD, QD + KD,
                       A->qk_rs + d->H, d->H + d->G, p + B->kn, N, d->G, d);
  }
  /* q|k|v = a W^T + b; a = rmsnorm(x) */
  if (!d->bias) {
    linear_backward(g->d_a, 0.0f, prmi_grad_slot(ctx, B->wq), NULL, g->d_qkv, QKV, A->a, N, D,
                    p + B->wq, QKV);
  } else {
    linear_backward(g->d_a, 0.0f, prmi_grad_slot(ctx, B->wq), prmi_grad_slot(ctx, B->bq), g->d_qkv,
                    QKV, A->a, N, D, p + B->wq, QD);
    linear_backward(g->d_a, 1.0f, prmi_grad_slot(ctx, B->wk), prmi_grad_slot(ctx, B->bk),
                    g->d_qkv + QD, QKV, A->a, N, D, p + B->wk, KD);
    linear_backward(g->d_a, 1.0f, prmi_grad_slot(ctx, B->wv), prmi_grad_slot(ctx, B->bv),
                    g->d_qkv + QD + KD, QKV, A->a, N, D, p + B->wv, KD);
  }
  rmsnorm_backward(g->d_res, prmi_grad_slot(ctx, B->ln1), g->d_a, A->x, p + B->ln1, A->rs1, N, D);
}

/* Backward of the last layer: g->d_last holds d(out) (n, D); g->d_res
 * receives d(x_{L-1}) for all N rows. */
static void last_backward(prm_ctx *ctx, llama_acts *g, const dims *d, uint64_t n) {
  const prm_model *m = ctx->model;
  const float *p = m->params;
  const llama_block *B = &LAYOUT(m)->blk[d->L - 1];
  const last_acts *Z = &g->last;
  const prmi_pack *pk = g->pk;
  const uint64_t N = pk->n_tok, D = d->D, QD = d->QD, KD = d->KD, hd = d->hd;
  float *dz = g->d_last; /* d(out), then d(x2) */
  mlp_backward(ctx, d, B, g->d_a, dz, Z->gu, Z->m, g->d_big, n);
  rmsnorm_backward(dz, prmi_grad_slot(ctx, B->ln2), g->d_a, Z->x2, p + B->ln2, Z->rs2, n, D);
  float *d_o = g->d_big; /* (n, QD) */
  linear_backward(d_o, 0.0f, prmi_grad_slot(ctx, B->wo), NULL, dz, D, Z->o, n, QD, p + B->wo, D);
  /* attention of the pooled queries: dk, dv of every row (one GEMM each
   * over the g heads of a group), dq compact */
  /* (N, 2 KD): each (sequence, kv head) block is written once by its row;
   * a row with a shared prefix works on gathered rows and adds the shared
   * part into the earlier row's (rows in order) */
  float *dkv = g->d_qkv;
  for (uint64_t i = 0; i < n; i++) {
    const uint64_t T = pk->len[i], shared = pk->first[i] > 0;
    const uint64_t *kmap = pk->kmap + pk->kmap_off[i];
    const float *kv = Z->kv + pk->off[i] * 2 * KD;
    float *dkvr = dkv + pk->off[i] * 2 * KD;
    if (shared) {
      gather_rows(g->kvg, Z->kv, 2 * KD, 0, 2 * KD, kmap, T);
      kv = g->kvg;
      dkvr = g->dkvg;
    }
    for (uint64_t j = 0; j < d->G; j++) {
      const float *k = kv + j * hd, *v = k + KD;
      const float *q = Z->q + i * QD + j * d->g * hd, *dout = d_o + i * QD + j * d->g * hd;
      float *dk = dkvr + j * hd, *dv = dk + KD;
      float *P = g->att.S, *dP = g->att.dS;
      for (uint64_t u0 = 0; u0 < d->g; u0 += ATT_ROWS) {
        const uint64_t nu = d->g - u0 < ATT_ROWS ? d->g - u0 : ATT_ROWS;
        const float beta = u0 == 0 ? 0.0f : 1.0f;
        const float *qu = q + u0 * hd, *du = dout + u0 * hd;
        prmi_gemm(0, 1, nu, T, hd, d->scale, qu, hd, k, 2 * KD, 0.0f, P, T);
        prmi_llama_probs(P, T, nu, T, 0, T, Z->lse + i * d->H + j * d->g + u0);
        prmi_gemm(1, 0, T, hd, nu, 1.0f, P, T, du, hd, beta, dv, 2 * KD);
        prmi_gemm(0, 1, nu, T, hd, 1.0f, du, hd, v, 2 * KD, 0.0f, dP, T);
        prmi_llama_softmax_bwd(dP, P, T, nu, T, 0, T, d->scale);
        prmi_gemm(0, 0, nu, hd, T, 1.0f, dP, T, k, 2 * KD, 0.0f,
                  g->d_lastq + i * QD + (j * d->g + u0) * hd, hd);
        prmi_gemm(1, 0, T, hd, nu, 1.0f, dP, T, qu, hd, beta, dk, 2 * KD);
      }
    }
    if (shared) scatter_rows(dkv, 2 * KD, 0, g->dkvg, 2 * KD, kmap, pk->first[i], T);
  }
  /* un-rotate, then qk_norm */
  rope_packed(dkv, 2 * KD, d->G, g, n, d, 1);
  rope_pooled(g->d_lastq, QD, d->H, g, n, d, 1);
  if (d->qkn) {
    head_norm_backward(dkv, 2 * KD, prmi_grad_slot(ctx, B->kn), Z->k_raw, KD, Z->k_rs, d->G,
                       p + B->kn, N, d->G, d);
    head_norm_backward(g->d_lastq, QD, prmi_grad_slot(ctx, B->qn), Z->q_raw, QD, Z->q_rs, d->H,
                       p + B->qn, n, d->H, d);
  }
  /* d(x) = scatter of d(x2) at the pooled rows + input_layernorm backward */
  memset(g->d_res, 0, N * D * sizeof(float));
  for (uint64_t i = 0; i < n; i++) { /* rows sharing their last token add */
    float *dr = g->d_res + pk->last[i] * D;
    for (uint64_t j = 0; j < D; j++)
      dr[j] += dz[i * D + j];
  }
  /* d(a): k|v of every row, then q of the pooled rows (via d_last, free now) */
  if (!d->bias) {
    linear_backward(g->d_a, 0.0f, prmi_grad_slot(ctx, B->wk), NULL, dkv, 2 * KD, Z->a, N, D,
                    p + B->wk, 2 * KD);
  } else {
    linear_backward(g->d_a, 0.0f, prmi_grad_slot(ctx, B->wk), prmi_grad_slot(ctx, B->bk), dkv,
                    2 * KD, Z->a, N, D, p + B->wk, KD);
    linear_backward(g->d_a, 1.0f, prmi_grad_slot(ctx, B->wv), prmi_grad_slot(ctx, B->bv), dkv + KD,
                    2 * KD, Z->a, N, D, p + B->wv, KD);
  }
  linear_backward(g->d_last, 0.0f, prmi_grad_slot(ctx, B->wq),
                  d->bias ? prmi_grad_slot(ctx, B->bq) : NULL, g->d_lastq, QD, Z->ac, n, D,
                  p + B->wq, QD);
  for (uint64_t i = 0; i < n; i++) {
    float *da = g->d_a + pk->last[i] * D;
    const float *dq = g->d_last + i * D;
    for (uint64_t j = 0; j < D; j++)
      da[j] += dq[j];
  }
  rmsnorm_backward(g->d_res, prmi_grad_slot(ctx, B->ln1), g->d_a, Z->x, p + B->ln1, Z->rs1, N, D);
}

static void llama_backward(prm_ctx *ctx, const float *dscores, uint64_t n) {
  const prm_model *m = ctx->model;
  const llama_layout *Ly = LAYOUT(m);
  llama_acts *g = ctx->acts;
  const dims d = dims_of(m);
  const float *p = m->params;
  const uint64_t D = d.D, L = d.L;
  const last_acts *Z = &g->last;
  const float *w = p + m->head_w;

  /* head: score_i = w . fn_i */
  float *gw = prmi_grad_slot(ctx, m->head_w);
  if (gw != NULL)
    for (uint64_t i = 0; i < n; i++)
      for (uint64_t j = 0; j < D; j++)
        gw[j] += dscores[i] * Z->fn[i * D + j];
  if (ctx->trainable_offset > Ly->norm) return; /* nothing below the head trains */

  /* model.norm: d(out) of the last layer, compact */
  memset(g->d_last, 0, n * D * sizeof(float));
  for (uint64_t i = 0; i < n; i++)
    for (uint64_t j = 0; j < D; j++)
      g->d_a[i * D + j] = dscores[i] * w[j];
  rmsnorm_backward(g->d_last, prmi_grad_slot(ctx, Ly->norm), g->d_a, Z->out, p + Ly->norm, Z->fn_rs,
                   n, D);
  if (Ly->blk[L - 1].start < ctx->trainable_offset) return; /* layers frozen */
  last_backward(ctx, g, &d, n);
  for (uint64_t l = L - 1; l-- > 0;) {
    if (Ly->blk[l].start < ctx->trainable_offset) return; /* this and all below frozen */
    layer_backward(ctx, g, &d, l, n);
  }
  float *ge = prmi_grad_slot(ctx, Ly->embed);
  if (ge == NULL) return;
  for (uint64_t r = 0; r < g->pk->n_tok; r++) {
    float *e = ge + (uint64_t)g->pk->ids[r] * D;
    const float *dr = g->d_res + r * D;
    for (uint64_t j = 0; j < D; j++)
      e[j] += dr[j];
  }
}

/* ---- models ------------------------------------------------------------------------------- */

/* Meta's width rule as torch_ref.default_ffn computes it:
 * 256 * ceil(int(8 D / 3) / 256), with Python's true division (correctly
 * rounded in double, as here) truncated to an integer. */
static uint64_t default_ffn(uint64_t D) {
  const uint64_t w = (uint64_t)(8.0 * (double)D / 3.0);
  return 256 * ((w + 255) / 256);
}

static int fail_u64(const char *what, uint64_t v, const char *rule) {
  return prmi_fail(NULL, PRM_ERR_INVALID, "model: %s = %llu %s", what, (unsigned long long)v, rule);
}

/* a * b, or PRMI_MAX_PARAMS + 1 when the product exceeds PRMI_MAX_PARAMS:
 * every count stays far from overflow. */
static uint64_t capped_mul(uint64_t a, uint64_t b) {
  if (a != 0 && b > PRMI_MAX_PARAMS / a) return PRMI_MAX_PARAMS + 1;
  return a * b;
}

static int llama_normalise(prm_model_options *o, uint64_t *n_params, uint32_t *n_tensors) {
  int rc;
  if ((rc = prmi_check_dim(o->vocab_size, "vocab_size")) != PRM_OK ||
      (rc = prmi_check_dim(o->n_ctx, "n_ctx")) != PRM_OK ||
      (rc = prmi_check_dim(o->n_embd, "n_embd")) != PRM_OK ||
      (rc = prmi_check_dim(o->n_head, "n_head")) != PRM_OK)
    return rc;
  if (o->n_layer < 1 || o->n_layer > PRMI_GPT2_MAX_LAYER)
    return prmi_fail(NULL, PRM_ERR_INVALID, "model: n_layer = %llu not in [1, %d]",
                     (unsigned long long)o->n_layer, PRMI_GPT2_MAX_LAYER);
  if (o->n_ctx > PRMI_GPT2_MAX_CTX) return fail_u64("n_ctx", o->n_ctx, "is more than 65536");
  if (o->n_kv_head == 0) o->n_kv_head = o->n_head;
  if ((rc = prmi_check_dim(o->n_kv_head, "n_kv_head")) != PRM_OK) return rc;
  if (o->n_head % o->n_kv_head != 0)
    return prmi_fail(NULL, PRM_ERR_INVALID, "model: n_kv_head = %llu does not divide n_head = %llu",
                     (unsigned long long)o->n_kv_head, (unsigned long long)o->n_head);
  if (o->head_dim == 0) {
    if (o->n_embd % o->n_head != 0)
      return prmi_fail(NULL, PRM_ERR_INVALID,
                       "model: n_head = %llu does not divide n_embd = %llu (set head_dim)",
                       (unsigned long long)o->n_head, (unsigned long long)o->n_embd);
    o->head_dim = o->n_embd / o->n_head;
  }
  if ((rc = prmi_check_dim(o->head_dim, "head_dim")) != PRM_OK) return rc;
  if (o->head_dim % 2 != 0) return fail_u64("head_dim", o->head_dim, "is odd (RoPE pairs dims)");
  if (o->n_ffn == 0) o->n_ffn = default_ffn(o->n_embd);
  if ((rc = prmi_check_dim(o->n_ffn, "n_ffn")) != PRM_OK) return rc;
  if (!(isfinite(o->rope_theta) && o->rope_theta > 0.0 && isfinite((float)o->rope_theta) &&
        (float)o->rope_theta > 0.0f))
    return prmi_fail(NULL, PRM_ERR_INVALID,
                     "model: rope_theta = %g must be finite and > 0 (in float too)", o->rope_theta);
  if (!(isfinite(o->rms_eps) && o->rms_eps >= 0.0 && isfinite((float)o->rms_eps)))
    return prmi_fail(NULL, PRM_ERR_INVALID, "model: rms_eps = %g must be finite and >= 0",
                     o->rms_eps);
  o->attn_bias = o->attn_bias != 0;
  o->qk_norm = o->qk_norm != 0;
  /* the other architectures' fields */
  o->input_size = 0;
  o->activation = 0; /* SwiGLU has no prm_activation value */
  o->n_hidden = 0;
  for (uint32_t i = 0; i < PRM_MAX_HIDDEN; i++)
    o->hidden[i] = 0;

  const uint64_t D = o->n_embd, F = o->n_ffn, hd = o->head_dim;
  const uint64_t QD = capped_mul(o->n_head, hd), KD = capped_mul(o->n_kv_head, hd);
  if (QD > PRMI_MAX_DIM || KD > PRMI_MAX_DIM)
    return prmi_fail(NULL, PRM_ERR_INVALID, "model: n_head * head_dim = %llu not in [1, 2^30]",
                     (unsigned long long)QD);
  /* q, k, v, o, gate, up, down, 2 norms (+ biases, + q/k norms) */
  uint64_t per_layer = capped_mul(QD + 2 * KD + QD, D);
  per_layer += capped_mul(3 * F, D) + 2 * D;
  if (o->attn_bias) per_layer += QD + 2 * KD;
  if (o->qk_norm) per_layer += 2 * hd;
  const uint64_t total = capped_mul(o->vocab_size, D) + capped_mul(o->n_layer, per_layer) + 2 * D;
  if (per_layer > PRMI_MAX_PARAMS || total > PRMI_MAX_PARAMS)
    return prmi_fail(NULL, PRM_ERR_INVALID, "model: more than 2^34 parameters");
  *n_params = total;
  *n_tensors =
      1 + (uint32_t)o->n_layer * (9 + 3 * (uint32_t)o->attn_bias + 2 * (uint32_t)o->qk_norm) + 2;
  return PRM_OK;
}

/* Hugging Face LlamaForSequenceClassification names and shapes in its
 * state_dict order (layer-major: "the last k layers + norm + head" is a
 * suffix of the arena). */
static int llama_layout_new(prm_model *m) {
  const prm_model_options *o = &m->opts;
  const uint64_t D = o->n_embd, L = o->n_layer, hd = o->head_dim, F = o->n_ffn;
  const uint64_t QD = o->n_head * hd, KD = o->n_kv_head * hd;
  llama_layout *Ly = calloc(1, sizeof *Ly + L * sizeof(llama_block));
  if (Ly == NULL) return PRM_ERR_NOMEM;
  m->layout = Ly;
  char name[PRMI_NAME_SIZE];
  Ly->embed = prmi_model_add_tensor(m, "model.embed_tokens.weight", 2, o->vocab_size, D);
  for (uint64_t l = 0; l < L; l++) {
    llama_block *b = &Ly->blk[l];
#define ADD(field, suffix, nd, d0, d1)                                                             \
  snprintf(name, sizeof name, "model.layers.%u.%s", (unsigned)l, suffix);                          \
  b->field = prmi_model_add_tensor(m, name, nd, d0, d1)
    b->start = m->n_params;
    ADD(wq, "self_attn.q_proj.weight", 2, QD, D);
    if (o->attn_bias) {
      ADD(bq, "self_attn.q_proj.bias", 1, QD, 0);
    }
    ADD(wk, "self_attn.k_proj.weight", 2, KD, D);
    if (o->attn_bias) {
      ADD(bk, "self_attn.k_proj.bias", 1, KD, 0);
    }
    ADD(wv, "self_attn.v_proj.weight", 2, KD, D);
    if (o->attn_bias) {
      ADD(bv, "self_attn.v_proj.bias", 1, KD, 0);
    }
    ADD(wo, "self_attn.o_proj.weight", 2, D, QD);
    if (o->qk_norm) {
      ADD(qn, "self_attn.q_norm.weight", 1, hd, 0);
      ADD(kn, "self_attn.k_norm.weight", 1, hd, 0);
    }
    ADD(wg, "mlp.gate_proj.weight", 2, F, D);
    ADD(wu, "mlp.up_proj.weight", 2, F, D);
    ADD(wd, "mlp.down_proj.weight", 2, D, F);
    ADD(ln1, "input_layernorm.weight", 1, D, 0);
    ADD(ln2, "post_attention_layernorm.weight", 1, D, 0);
#undef ADD
  }
  Ly->norm = prmi_model_add_tensor(m, "model.norm.weight", 1, D, 0);
  m->head_in = D;
  m->head_w = prmi_model_add_tensor(m, "score.weight", 2, 1, D);
  return PRM_OK;
}

/* HF LlamaPreTrainedModel._init_weights: every Linear weight and the
 * embedding N(0, 0.02), biases 0, RMSNorm weights 1. */
static void llama_init(prm_model *m, uint64_t seed) {
  for (uint32_t t = 0; t < m->n_tensors; t++) {
    const prmi_tensor *T = &m->tensors[t];
    uint64_t s = prmi_init_stream(seed, t);
    float *p = m->params + T->offset;
    if (prmi_ends_with(T->name, "norm.weight")) {
      for (uint64_t i = 0; i < T->numel; i++)
        p[i] = 1.0f;
    } else if (prmi_ends_with(T->name, ".bias")) {
      for (uint64_t i = 0; i < T->numel; i++)
        p[i] = 0.0f;
    } else {
      for (uint64_t i = 0; i < T->numel; i++)
        p[i] = prmi_init_normal(&s, 0.02);
    }
  }
}

static int llama_trainable_from_block(prm_model *m, uint64_t k, uint64_t *off) {
  const uint64_t L = m->opts.n_layer;
  if (k > L)
    return prmi_fail(NULL, PRM_ERR_INVALID,
                     "prm_model_set_trainable: %llu blocks, the model has %llu",
                     (unsigned long long)k, (unsigned long long)L);
  *off = LAYOUT(m)->blk[L - k].start;
  return PRM_OK;
}

/* ---- checkpoints -------------------------------------------------------------------------- */

/*
 * v as Python's repr()/str() writes a float: the shortest decimal that reads
 * back as v, positional for exponents -4 .. 15 ("10000.0", "0.0001"),
 * scientific otherwise ("1e-06", "1.5e+16"). The digits come from
 * snprintf("%.*e") of increasing precision; any decimal separator of the
 * current locale is skipped, and strtod reads the same locale.
 */
static void py_float_str(double v, char *out, size_t cap) {
  char tmp[64], dig[32];
  int prec = 1;
  for (; prec < 17; prec++) {
    snprintf(tmp, sizeof tmp, "%.*e", prec - 1, v);
    if (strtod(tmp, NULL) == v) break;
  }
  snprintf(tmp, sizeof tmp, "%.*e", prec - 1, v);
  const char *s = tmp;
  const int neg = *s == '-';
  if (neg) s++;
  size_t nd = 0;
  for (; *s != '\0' && *s != 'e' && *s != 'E'; s++)
    if (*s >= '0' && *s <= '9' && nd + 1 < sizeof dig) dig[nd++] = *s;
  const int ex = *s != '\0' ? atoi(s + 1) : 0;
  while (nd > 1 && dig[nd - 1] == '0')
    nd--;
  dig[nd] = '\0';
  char body[96];
  if (ex >= -4 && ex < 16) {
    const int point = ex + 1; /* digits before the point */
    if (point <= 0)
      snprintf(body, sizeof body, "0.%.*s%s", -point, "0000", dig);
    else if ((size_t)point >= nd)
      snprintf(body, sizeof body, "%s%.*s.0", dig, point - (int)nd, "0000000000000000");
    else
      snprintf(body, sizeof body, "%.*s.%s", point, dig, dig + point);
  } else {
    snprintf(body, sizeof body, "%c%s%se%c%02d", dig[0], nd > 1 ? "." : "", dig + 1,
             ex < 0 ? '-' : '+', ex < 0 ? -ex : ex);
  }
  snprintf(out, cap, "%s%s", neg ? "-" : "", body);
}

/* torch_ref's config_metadata: str() of each config value, in its order. */
static void llama_meta_write(const prm_model_options *o, prmi_meta_out *out) {
  char buf[128];
  prmi_meta_put_u64(out, "vocab_size", o->vocab_size);
  prmi_meta_put_u64(out, "n_positions", o->n_ctx);
  prmi_meta_put_u64(out, "n_embd", o->n_embd);
  prmi_meta_put_u64(out, "n_layer", o->n_layer);
  prmi_meta_put_u64(out, "n_head", o->n_head);
  prmi_meta_put_u64(out, "n_kv_head", o->n_kv_head);
  prmi_meta_put_u64(out, "head_dim", o->head_dim);
  prmi_meta_put_u64(out, "n_ffn", o->n_ffn);
  py_float_str(o->rope_theta, buf, sizeof buf);
  prmi_meta_put(out, "rope_theta", buf);
  py_float_str(o->rms_eps, buf, sizeof buf);
  prmi_meta_put(out, "rms_eps", buf);
  prmi_meta_put(out, "attn_bias", o->attn_bias ? "1" : "0");
  prmi_meta_put(out, "qk_norm", o->qk_norm ? "1" : "0");
}

static int llama_detect(const prmi_ckpt *c) {
  for (uint32_t i = 0; i < prmi_ckpt_count(c); i++)
    if (strncmp(prmi_ckpt_name(c, i), "model.", 6) == 0) return 1;
  return 0;
}

/* The part of a decoder-layer name after "layers.{l}." that LlamaModel uses
 * (not the mlp architecture's "layers.{i}.weight" / ".bias"). */
static int is_layer_rest(const char *rest) {
  return strncmp(rest, "self_attn.", 10) == 0 || strncmp(rest, "mlp.", 4) == 0 ||
         strcmp(rest, "input_layernorm.weight") == 0 ||
         strcmp(rest, "post_attention_layernorm.weight") == 0;
}

/* A bare LlamaModel name (no "model." prefix), as torch_ref accepts. */
static int llama_tensor_alias(const char *n, char *buf, size_t cap) {
  uint64_t l;
  const char *rest = prmi_layer_name(n, "layers.", &l);
  if (!(strcmp(n, "embed_tokens.weight") == 0 || strcmp(n, "norm.weight") == 0 ||
        (rest != NULL && is_layer_rest(rest))))
    return 0;
  return (size_t)snprintf(buf, cap, "model.%s", n) < cap;
}

/* HF buffers and heads a reward model does not use: the rotary inv_freq of
 * transformers 4.28-4.30 files and a causal LM's lm_head. */
static int llama_ignorable(const char *name, uint32_t ndim) {
  (void)ndim;
  uint64_t l;
  const char *rest = prmi_layer_name(name, "model.layers.", &l);
  if (rest == NULL) rest = prmi_layer_name(name, "layers.", &l);
  return strcmp(name, "lm_head.weight") == 0 ||
         (rest != NULL && strcmp(rest, "self_attn.rotary_emb.inv_freq") == 0);
}

/* Rows of a 2-D tensor, or a FORMAT error naming it. */
static int tensor_rows(const prmi_ckpt *c, const char *name, uint64_t *rows, uint64_t *cols) {
  uint32_t nd;
  uint64_t sh[2];
  if (!prmi_ckpt_shape(c, name, &nd, sh))
    return prmi_fail(NULL, PRM_ERR_FORMAT, "missing tensor %s", name);
  if (nd != 2 || sh[0] == 0 || sh[1] == 0)
    return prmi_fail(NULL, PRM_ERR_FORMAT, "tensor %s must be 2-D and non-empty", name);
  *rows = sh[0];
  if (cols != NULL) *cols = sh[1];
  return PRM_OK;
}

/* "0"/"1" metadata (attn_bias, qk_norm) must agree with the tensors present. */
static int flag_agrees(const prmi_ckpt *c, const char *key, int actual, const char *source) {
  const char *v = prmi_ckpt_meta(c, key);
  if (v == NULL) return PRM_OK;
  if (strcmp(v, "0") != 0 && strcmp(v, "1") != 0)
    return prmi_fail(NULL, PRM_ERR_FORMAT, "__metadata__ %s='%.64s' is not 0 or 1", key, v);
  if ((v[0] == '1') != (actual != 0))
    return prmi_fail(NULL, PRM_ERR_FORMAT, "__metadata__ %s=%s disagrees with %s (%s)", key, v,
                     source, actual ? "present" : "absent");
  return PRM_OK;
}

/*
 * llama configuration, as torch_ref.model_from_state derives it: V and D from
 * embed_tokens, n_layer = 1 + the highest layer index, n_head from
 * __metadata__ (required), head_dim = rows(q_proj) / n_head, n_kv_head =
 * rows(k_proj) / head_dim, n_ffn = rows(gate_proj), attn_bias / qk_norm from
 * the presence of q_proj.bias / q_norm.weight; rope_theta and rms_eps from
 * __metadata__, else HF's defaults 10000 and 1e-6; n_ctx from n_positions
 * (required). Metadata that repeats a shape-derived value must agree.
 */
static int llama_config(const prmi_ckpt *c, prm_model_options *o) {
  uint64_t n_layers = 0, q_rows = 0, k_rows = 0, f_rows = 0;
  int rc;
  if ((rc = tensor_rows(c, "model.embed_tokens.weight", &o->vocab_size, &o->n_embd)) != PRM_OK)
    return rc;
  for (uint32_t i = 0; i < prmi_ckpt_count(c); i++) {
    uint64_t l;
    const char *name = prmi_ckpt_name(c, i);
    if (prmi_layer_name(name, "model.layers.", &l) == NULL) continue;
    if (l >= PRMI_GPT2_MAX_LAYER)
      return prmi_fail(NULL, PRM_ERR_FORMAT, "tensor %s: llama models have at most %d layers", name,
                       PRMI_GPT2_MAX_LAYER);
    if (l + 1 > n_layers) n_layers = l + 1;
  }
  if (n_layers == 0)
    return prmi_fail(NULL, PRM_ERR_FORMAT,
                     "llama checkpoint has no decoder layer (model.layers.0.*)");
  o->n_layer = n_layers;

  rc = prmi_ckpt_meta_u64(c, "n_head", &o->n_head);
  if (rc < 0) return rc;
  if (rc == 0)
    return prmi_fail(NULL, PRM_ERR_FORMAT,
                     "llama checkpoint lacks the 'n_head' __metadata__ key (the number of "
                     "attention heads cannot be inferred from the tensor shapes)");
  if ((rc = tensor_rows(c, "model.layers.0.self_attn.q_proj.weight", &q_rows, NULL)) != PRM_OK ||
      (rc = tensor_rows(c, "model.layers.0.self_attn.k_proj.weight", &k_rows, NULL)) != PRM_OK ||
      (rc = tensor_rows(c, "model.layers.0.mlp.gate_proj.weight", &f_rows, NULL)) != PRM_OK)
    return rc;
  if (q_rows % o->n_head != 0 || (q_rows / o->n_head) % 2 != 0)
    return prmi_fail(NULL, PRM_ERR_FORMAT,
                     "q_proj rows %llu are not n_head = %llu heads of an even head_dim",
                     (unsigned long long)q_rows, (unsigned long long)o->n_head);
  o->head_dim = q_rows / o->n_head;
  if (k_rows % o->head_dim != 0 || o->n_head % (k_rows / o->head_dim) != 0)
    return prmi_fail(NULL, PRM_ERR_FORMAT,
                     "k_proj rows %llu are not a divisor of n_head = %llu heads of head_dim %llu",
                     (unsigned long long)k_rows, (unsigned long long)o->n_head,
                     (unsigned long long)o->head_dim);
  o->n_kv_head = k_rows / o->head_dim;
  o->n_ffn = f_rows;
  uint32_t nd;
  uint64_t sh[2];
  o->attn_bias = prmi_ckpt_shape(c, "model.layers.0.self_attn.q_proj.bias", &nd, sh);
  o->qk_norm = prmi_ckpt_shape(c, "model.layers.0.self_attn.q_norm.weight", &nd, sh);

  if ((rc = prmi_ckpt_meta_agrees(c, "vocab_size", o->vocab_size,
                                  "model.embed_tokens.weight rows")) != PRM_OK ||
      (rc = prmi_ckpt_meta_agrees(c, "n_embd", o->n_embd, "model.embed_tokens.weight columns")) !=
          PRM_OK ||
      (rc = prmi_ckpt_meta_agrees(c, "n_layer", o->n_layer, "the layers model.layers.* present")) !=
          PRM_OK ||
      (rc = prmi_ckpt_meta_agrees(c, "head_dim", o->head_dim, "q_proj rows / n_head")) != PRM_OK ||
      (rc = prmi_ckpt_meta_agrees(c, "n_kv_head", o->n_kv_head, "k_proj rows / head_dim")) !=
          PRM_OK ||
      (rc = prmi_ckpt_meta_agrees(c, "n_ffn", o->n_ffn, "gate_proj rows")) != PRM_OK ||
      (rc = flag_agrees(c, "attn_bias", o->attn_bias, "q_proj.bias")) != PRM_OK ||
      (rc = flag_agrees(c, "qk_norm", o->qk_norm, "q_norm.weight")) != PRM_OK)
    return rc;

  double v;
  rc = prmi_ckpt_meta_double(c, "rope_theta", &v);
  if (rc < 0) return rc;
  o->rope_theta = rc == 1 ? v : 10000.0;
  rc = prmi_ckpt_meta_double(c, "rms_eps", &v);
  if (rc < 0) return rc;
  o->rms_eps = rc == 1 ? v : 1e-6;

  rc = prmi_ckpt_meta_u64(c, "n_positions", &o->n_ctx);
  if (rc < 0) return rc;
  if (rc == 0)
    return prmi_fail(NULL, PRM_ERR_FORMAT,
                     "llama checkpoint lacks the 'n_positions' __metadata__ key (the longest "
                     "sequence: RoPE has no table to infer it from)");
  return PRM_OK;
}

/* ---- the descriptor ----------------------------------------------------------------------- */

const prmi_arch prmi_arch_llama = {
    .id = PRM_ARCH_LLAMA,
    .name = "llama",
    .article = "a llama",
    .tokens = 1,
    .normalise = llama_normalise,
    .layout = llama_layout_new,
    .layout_free = free, /* the layout is one allocation */
    .init = llama_init,
    .trainable_from_block = llama_trainable_from_block,
    .meta_write = llama_meta_write,
    .detect = llama_detect,
    .config = llama_config,
    .tensor_alias = llama_tensor_alias,
    .ignorable = llama_ignorable,
    .ctx_new = llama_ctx_new,
    .ctx_free = llama_ctx_free,
    .ctx_floats = llama_ctx_floats,
    .check_batch = llama_check_batch,
    .forward = llama_forward,
    .backward = llama_backward,
    .pair_grad = NULL,
};
