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
 * As in gpt2.c: Q/K/V and the MLP projections run as GEMMs over pieces of
 * the N packed rows (weight gradients as tiles over all of them, see
 * "pieces of parallel work": a context with a parallel_for runs the pieces
 * on several workers, with the same bits for any number of them); causal
 * attention runs per (sequence, kv head) in blocks of ATT_BLOCK query rows
 * (the query heads of the kv head stacked, see att_scratch) with (ATT_ROWS,
 * T) scratch per worker, and keeps only the log-sum-exp of each softmax row
 * for the backward, which recomputes the probabilities. The last layer only
 * matters at the n pooled rows: it computes keys and values for every row
 * and everything else for the pooled rows alone, in compact (n, .) buffers
 * -- the same math, all of the layer but its k/v projection done once per
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
#include "lanes.h"

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

/* ---- elementwise kernels: lanes.h ----------------------------------------------------------- */

/* ---- pieces of parallel work -------------------------------------------------------------- */

/*
 * As in gpt2.c: every loop is cut into pieces that depend only on the
 * sizes of the work (parallel.c) -- rows of the packed tokens (or of the
 * pooled rows; prmi_row_piece), weight gradients in strips, each over the
 * whole token sum (prmi_dw_tiles), channel ranges (prmi_col_piece) for the
 * RMSNorm weight, bias and
 * embedding gradients (rows in order), attention per (sequence, kv head)
 * forward and per (sharing component, kv head) backward. Each
 * piece writes its own outputs and keeps every sum's order, so results do
 * not depend on the number of workers; a worker id only picks the scratch
 * (llama_worker) a task uses. Row pieces run every row-local step between
 * two steps that need all rows (a weight gradient, attention) in one go.
 */

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
 * Backward of prmi_llama_rms (same vector layout), the input gradient:
 * with gw = dy w, xh = x r,  dx (+)= r (gw - xh mean(gw xh)). x is the
 * forward's input. dx may be dy when not accumulating. The weight
 * gradient is prmi_llama_rms_dw's, by channels.
 */
PRMI_TARGET_CLONES
static void prmi_llama_rms_bwd(float *dx, uint64_t lddx, int accumulate, const float *dy,
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
      if (accumulate)
        for (j = 0; j < n; j++)
          dxv[j] += r * (dyv[j] * w[j] - (xv[j] * r) * mean);
      else
        for (j = 0; j < n; j++)
          dxv[j] = r * (dyv[j] * w[j] - (xv[j] * r) * mean);
    }
}

/* The weight gradient of prmi_llama_rms for channels [j0, j1):
 * dw += dy xh over every vector, rows in order (then vectors in a row). */
PRMI_TARGET_CLONES
static void prmi_llama_rms_dw(float *dw, const float *dy, uint64_t lddy, const float *x,
                              uint64_t ldx, const float *rs, uint64_t ld_rs, uint64_t rows,
                              uint64_t nv, uint64_t n, uint64_t j0, uint64_t j1) {
  for (uint64_t i = 0; i < rows; i++)
    for (uint64_t v = 0; v < nv; v++) {
      const float *xv = x + i * ldx + v * n, *dyv = dy + i * lddy + v * n;
      const float r = rs[i * ld_rs + v];
      for (uint64_t j = j0; j < j1; j++)
        dw[j] += dyv[j] * (xv[j] * r);
    }
}

/* rows of D: out = rmsnorm(x) w; rs[i] = r when rs is not NULL. */
static void rmsnorm_forward(float *out, float *rs, const float *x, const float *w, uint64_t rows,
                            uint64_t D, float eps) {
  prmi_llama_rms(out, D, rs, 1, x, D, w, rows, 1, D, eps);
}

/* qk_norm in place on rows of x (n_heads heads of hd, row stride ld); the
 * per-head rstd goes to rs[i * ld_rs + h] when rs is not NULL. */
static void head_norm_forward(float *x, uint64_t ld, float *rs, uint64_t ld_rs, const float *w,
                              uint64_t rows, uint64_t n_heads, const dims *d) {
  prmi_llama_rms(x, ld, rs, ld_rs, x, ld, w, rows, n_heads, d->hd, d->eps);
}

/* Backward of head_norm_forward in place, d(x) only: dx holds d(normed) on
 * entry; raw is the forward's input. (Its weight gradient: rms_dw_job.) */
static void head_norm_backward(float *dx, uint64_t ld, const float *raw, uint64_t ld_raw,
                               const float *rs, uint64_t ld_rs, const float *w, uint64_t rows,
                               uint64_t n_heads, const dims *d) {
  prmi_llama_rms_bwd(dx, ld, 0, dx, ld, raw, ld_raw, w, rs, ld_rs, rows, n_heads, d->hd);
}

/* The weight gradient of an RMSNorm (vectors as in prmi_llama_rms) over
 * `rows` rows, by channel pieces of n. */
typedef struct rms_dw_job {
  float *dw;
  const float *dy, *x, *rs;
  uint64_t lddy, ldx, ld_rs, rows, nv, n;
} rms_dw_job;

static void rms_dw_part(const rms_dw_job *j, uint64_t j0, uint64_t j1) {
  prmi_llama_rms_dw(j->dw, j->dy, j->lddy, j->x, j->ldx, j->rs, j->ld_rs, j->rows, j->nv, j->n, j0,
                    j1);
}

/* Up to two weight gradients in one loop (a q norm and a k norm): task t
 * is a channel piece of the first, then of the second (b NULL: none). */
typedef struct rms_dw_pair {
  const rms_dw_job *a, *b;
  uint64_t pa, pb; /* piece sizes */
  uint32_t na;     /* pieces of a */
} rms_dw_pair;

static void rms_dw_task(void *arg, uint32_t t, uint32_t worker) {
  (void)worker;
  const rms_dw_pair *j = arg;
  const rms_dw_job *r = t < j->na ? j->a : j->b;
  const uint64_t piece = t < j->na ? j->pa : j->pb, u = t < j->na ? t : t - j->na;
  const uint64_t j0 = u * piece, j1 = j0 + piece < r->n ? j0 + piece : r->n;
  rms_dw_part(r, j0, j1);
}

static void par_rms_dw(const prm_ctx *ctx, const rms_dw_job *a, const rms_dw_job *b) {
  rms_dw_pair j = {a, b, prmi_col_piece(a->n), b != NULL ? prmi_col_piece(b->n) : 1, 0};
  j.na = (uint32_t)((a->n + j.pa - 1) / j.pa);
  const uint32_t nb = b != NULL ? (uint32_t)((b->n + j.pb - 1) / j.pb) : 0;
  prmi_par_for(ctx, j.na + nb, rms_dw_task, &j);
}

/* A layer norm's weight gradient (vectors of D, rstd stride 1). */
static void par_norm_dw(const prm_ctx *ctx, float *dw, const float *dy, const float *x,
                        const float *rs, uint64_t rows, uint64_t D) {
  if (dw == NULL) return;
  const rms_dw_job j = {.dw = dw,
                        .dy = dy,
                        .x = x,
                        .rs = rs,
                        .lddy = D,
                        .ldx = D,
                        .ld_rs = 1,
                        .rows = rows,
                        .nv = 1,
                        .n = D};
  par_rms_dw(ctx, &j, NULL);
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

/* The weight gradient of linear_forward: dW (rows, in) += dy^T x over n
 * token rows (strides ldy, ldx), in strips (prmi_dw_tiles; dW NULL: frozen). */
static void par_linear_dw(const prm_ctx *ctx, float *dw, const float *dy, uint64_t ldy,
                          const float *x, uint64_t ldx, uint64_t n, uint64_t in, uint64_t rows) {
  if (dw == NULL) return;
  uint64_t mt, nt;
  prmi_dw_tiles(rows, in, &mt, &nt);
  prmi_par_gemm(ctx, 1, 0, rows, in, n, 1.0f, dy, ldy, x, ldx, 1.0f, dw, in, mt, nt);
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
 * Attention scratch of a worker. The g query heads that share a kv head
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
 * Causal attention of one sequence of T tokens for the g query heads of kv
 * head j, for its queries at positions p0..T-1 (p0 > 0: the first p0 tokens
 * are a shared prefix, whose queries an earlier row computes), blocked as
 * in gpt2.c: query rows [i0, i1) only see keys [0, i1). qkv points at the
 * first query's row (stride QKV: rotated q | rotated k | v); k and v at
 * position 0's rotated key and value of kv head j (row stride ldkv: QKV in
 * place, 2 hd when gathered). o rows (stride QD) from the first query;
 * lse[h * ld_lse + i - p0] = log sum_j exp(s_ij) (lse NULL: not kept).
 */
static void attention_forward(float *o, float *lse, uint64_t ld_lse, const float *qkv,
                              const float *k, const float *v, uint64_t ldkv, const att_scratch *w,
                              uint64_t p0, uint64_t T, uint64_t j, const dims *d) {
  const uint64_t hd = d->hd, ld = d->QKV, QD = d->QD;
  for (uint64_t u0 = 0; u0 < d->g; u0 += ATT_STACK) {
    const uint64_t c = d->g - u0 < ATT_STACK ? d->g - u0 : ATT_STACK, h0 = j * d->g + u0;
    for (uint64_t i0 = p0; i0 < T; i0 += ATT_BLOCK) {
      const uint64_t i1 = i0 + ATT_BLOCK < T ? i0 + ATT_BLOCK : T, m = i1 - i0;
      const float *q = qkv + (i0 - p0) * ld + h0 * hd;
      float *out = o + (i0 - p0) * QD + h0 * hd;
      if (c > 1) stack_heads(w->qs, q, ld, m, c, hd);
      prmi_gemm(0, 1, c * m, i1, hd, d->scale, c > 1 ? w->qs : q, c > 1 ? hd : ld, k, ldkv, 0.0f,
                w->S, T);
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

/*
 * Backward of attention_forward for one sequence and kv head j (the same
 * qkv, k, v, ldkv, lse, p0 and T; d_o rows from the first query, stride
 * QD). dq rows (stride QKV, from the first query; d(rotated q)) of the
 * group's query heads are overwritten, and so are dk and dv of positions
 * 0..T-1 (row stride lddkv). Blocks run last to first; the first heads of
 * the group in the last block (which sees every key) initialise dk and dv,
 * everything after accumulates (the g heads of a group add into one kv
 * head). Needs p0 < T.
 */
static void attention_backward(float *dq, float *dk, float *dv, uint64_t lddkv, const float *d_o,
                               const float *qkv, const float *k, const float *v, uint64_t ldkv,
                               const float *lse, uint64_t ld_lse, const att_scratch *w, uint64_t p0,
                               uint64_t T, uint64_t j, const dims *d) {
  const uint64_t hd = d->hd, ld = d->QKV, QD = d->QD;
  const uint64_t n_blocks = (T - p0 + ATT_BLOCK - 1) / ATT_BLOCK;
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
        prmi_llama_softmax_bwd(w->dS + u * m * T, w->S + u * m * T, T, m, i0 + 1, 1, i1, d->scale);
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

/* Gather one kv head's key (column c0 of a row of stride ld) and value
 * (column c0 + vo) of positions 0..T-1 (packed rows kmap[t]) into kv
 * (T, 2 hd): k | v. */
static void gather_kv(float *kv, const float *src, uint64_t ld, uint64_t c0, uint64_t vo,
                      uint64_t hd, const uint64_t *kmap, uint64_t T) {
  for (uint64_t t = 0; t < T; t++) {
    const float *s = src + kmap[t] * ld + c0;
    memcpy(kv + t * 2 * hd, s, hd * sizeof(float));
    memcpy(kv + t * 2 * hd + hd, s + vo, hd * sizeof(float));
  }
}

/* The reverse of gather_kv for gradients: positions from `own` on are the
 * row's own (written here first: set), earlier ones an earlier row's (add). */
static void scatter_dkv(float *dst, uint64_t ld, uint64_t c0, uint64_t vo, const float *dkv,
                        uint64_t hd, const uint64_t *kmap, uint64_t own, uint64_t T) {
  for (uint64_t t = 0; t < T; t++) {
    float *dk = dst + kmap[t] * ld + c0, *dv = dk + vo;
    const float *s = dkv + t * 2 * hd;
    if (t >= own) {
      memcpy(dk, s, hd * sizeof(float));
      memcpy(dv, s + hd, hd * sizeof(float));
    } else {
      for (uint64_t e = 0; e < hd; e++) {
        dk[e] += s[e];
        dv[e] += s[hd + e];
      }
    }
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

/* Scratch of one worker: attention blocks, one kv head's gathered k | v
 * for a row with a shared prefix, one row's gate exponentials. */
typedef struct llama_worker {
  att_scratch att; /* dS, dqs: training */
  float *kv;       /* (max_len, 2 hd) */
  float *dkv;      /* (max_len, 2 hd) their gradient (training) */
  float *tmp;      /* (F) */
} llama_worker;

typedef struct llama_acts {
  uint64_t max_tok, max_rows, max_len;
  prmi_pack *pk;     /* the last forward's packed layout (shared prefixes) */
  float *cos, *sin;  /* (max_len, hd/2) RoPE table */
  layer_acts *layer; /* [L - 1] full layers */
  last_acts last;
  llama_worker *wk; /* [n_workers] */
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
 * Floats, with T = max_rows * max_len, R = max_rows, W = n_workers, q = 1
 * with qk_norm (else 0) (each term rounded up to a multiple of 16):
 *   RoPE table                            max_len hd
 *   full layers (training: L - 1 sets; inference: 1 set when L > 1, else 0)
 *     training:  T (4D + QKV + QD + 2F + H + 2 + q (QD + KD + H + G))
 *     inference: T (2D + QKV + QD + 2F)
 *   last layer, per row (training, or inference with L = 1)
 *                T (2D + 2KD) + training T (1 + q (KD + G))
 *   last layer, pooled rows               R (5D + 2QD + 2F + 2) + training R (H + q (QD + H))
 *   per worker, W times: attention, gathered k|v, gates
 *                                         128 (max_len + 2 hd + 1) + 2 max_len hd + F
 *                                         + training 128 (max_len + hd) + 2 max_len hd
 *   training backward                     T (2D + max(2F, QD) + QKV) + R (D + QD)
 * Linear in max_rows * max_len: no T x T buffer anywhere.
 */
static void plan(planner *pl, llama_acts *g, const dims *d, uint64_t R, uint64_t max_len,
                 int inference, uint32_t n_workers) {
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
  for (uint32_t w = 0; w < n_workers; w++) {
    llama_worker scratch_w, *W = pl->base != NULL ? &g->wk[w] : &scratch_w;
    W->att.S = carve(pl, ATT_ROWS * max_len);
    W->att.dS = train ? carve(pl, ATT_ROWS * max_len) : NULL;
    W->att.qs = carve(pl, ATT_ROWS * d->hd);
    W->att.os = carve(pl, ATT_ROWS * d->hd);
    W->att.dqs = train ? carve(pl, ATT_ROWS * d->hd) : NULL;
    W->att.inv = carve(pl, ATT_ROWS);
    W->tmp = carve(pl, F);
    W->kv = carve(pl, max_len * 2 * d->hd);
    W->dkv = train ? carve(pl, max_len * 2 * d->hd) : NULL;
  }
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
  free(g->wk);
  prmi_pack_free(g->pk);
  free(g);
}

static double llama_ctx_floats(const prm_model *m, uint64_t max_rows, uint64_t max_len,
                               int inference, uint32_t n_workers) {
  const dims d = dims_of(m);
  llama_acts g;
  memset(&g, 0, sizeof g);
  planner pl = {NULL, 0.0, 0};
  plan(&pl, &g, &d, max_rows, max_len, inference, n_workers);
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
  g->wk = calloc(c->n_workers, sizeof *g->wk);
  g->arena = prmi_calloc((size_t)floats, sizeof(float));
  g->pk = prmi_pack_new(c->max_rows, c->max_len);
  if (g->layer == NULL || g->wk == NULL || g->arena == NULL || g->pk == NULL) {
    llama_ctx_free(g);
    return PRM_ERR_NOMEM;
  }
  planner pl = {g->arena, 0.0, 0};
  plan(&pl, g, &d, c->max_rows, c->max_len, c->inference, c->n_workers);
  rope_table(g->cos, g->sin, c->max_len, d.hd, m->opts.rope_theta);
  c->acts = g;
  return PRM_OK;
}

/* ---- validation --------------------------------------------------------------------------- */

static int llama_check_batch(prm_ctx *ctx, const prm_batch *b, uint64_t *stride) {
  *stride = 0;
  return prmi_check_token_batch(ctx, b, ctx->model->opts.vocab_size);
}

/* ---- RoPE on packed and pooled rows -------------------------------------------------------- */

/* Rotate (or, inverse, rotate back) n_heads heads of packed rows [r0, r1)
 * (x: row r0, stride ld) at their positions, one call per run of
 * consecutive positions. */
static void rope_rows(float *x, uint64_t ld, uint64_t n_heads, const llama_acts *g, uint64_t r0,
                      uint64_t r1, const dims *d, int inverse) {
  const int32_t *pos = g->pk->pos;
  for (uint64_t r = r0; r < r1;) {
    uint64_t e = r + 1;
    while (e < r1 && pos[e] == pos[e - 1] + 1)
      e++;
    const uint64_t t0 = (uint64_t)pos[r];
    prmi_llama_rope(x + (r - r0) * ld, ld, e - r, n_heads, g->cos + t0 * d->half,
                    g->sin + t0 * d->half, d->half, inverse);
    r = e;
  }
}

/* The same for pooled rows [i0, i1) (x: compact row i0, stride ld), row i
 * at position len_i - 1. */
static void rope_pooled(float *x, uint64_t ld, uint64_t n_heads, const llama_acts *g, uint64_t i0,
                        uint64_t i1, const dims *d, int inverse) {
  for (uint64_t i = i0; i < i1; i++) {
    const uint64_t t = g->pk->len[i] - 1;
    prmi_llama_rope(x + (i - i0) * ld, ld, 1, n_heads, g->cos + t * d->half, g->sin + t * d->half,
                    d->half, inverse);
  }
}

/* ---- forward ------------------------------------------------------------------------------ */

/* What the pieces of one layer's forward or backward read. */
typedef struct layer_job {
  llama_acts *g;
  const dims *d;
  const float *p;       /* parameters */
  const llama_block *B; /* the layer's offsets */
  const layer_acts *A;  /* a full layer (NULL: the last) */
  float *xn;            /* forward: the residual stream leaving a full layer */
  float *h;             /* forward: silu(gate) up, stride ldh (NULL: over the gate half of gu) */
  uint64_t ldh;
  float *d_o; /* backward: d(attention output) */
} layer_job;

/* The MLP of rows: out = x2 + (silu(gate) up) Wdown^T, m = rmsnorm(x2)
 * w_post (rstd rs2), gu = m [Wgate|Wup]^T; h (stride ldh) receives
 * silu(gate) up (NULL: over the gate half of gu). out may be x2; tmp (F). */
static void mlp_forward(float *out, const float *x2, float *m, float *rs2, float *gu, float *h,
                        uint64_t ldh, uint64_t n, const llama_block *B, const float *p,
                        const dims *d, float *tmp) {
  const uint64_t D = d->D, F = d->F;
  rmsnorm_forward(m, rs2, x2, p + B->ln2, n, D, d->eps);
  linear_forward(gu, 2 * F, m, n, D, p + B->wg, NULL, 2 * F);
  if (h == NULL) {
    h = gu;
    ldh = 2 * F;
  }
  swiglu_forward(h, ldh, gu, n, F, tmp);
  if (out != x2) memcpy(out, x2, n * D * sizeof(float));
  prmi_gemm(0, 1, n, D, F, 1.0f, h, ldh, p + B->wd, F, 1.0f, out, D);
}

/* Rows [r0, r1) of a full layer up to attention: a = rmsnorm(x), q|k|v,
 * qk_norm, RoPE. */
static void layer_in_piece(void *arg, uint64_t r0, uint64_t r1, uint32_t worker) {
  (void)worker;
  const layer_job *j = arg;
  const dims *d = j->d;
  const float *p = j->p;
  const llama_block *B = j->B;
  const layer_acts *A = j->A;
  const uint64_t n = r1 - r0, D = d->D, QKV = d->QKV, QD = d->QD, KD = d->KD, HG = d->H + d->G;
  const float *a = A->a + r0 * D;
  float *qkv = A->qkv + r0 * QKV;
  rmsnorm_forward(A->a + r0 * D, A->rs1 != NULL ? A->rs1 + r0 : NULL, A->x + r0 * D, p + B->ln1, n,
                  D, d->eps);
  if (!d->bias) {
    linear_forward(qkv, QKV, a, n, D, p + B->wq, NULL, QKV);
  } else {
    linear_forward(qkv, QKV, a, n, D, p + B->wq, p + B->bq, QD);
    linear_forward(qkv + QD, QKV, a, n, D, p + B->wk, p + B->bk, KD);
    linear_forward(qkv + QD + KD, QKV, a, n, D, p + B->wv, p + B->bv, KD);
  }
  if (d->qkn) {
    float *rs = A->qk_rs != NULL ? A->qk_rs + r0 * HG : NULL;
    if (A->qk_raw != NULL)
      for (uint64_t r = 0; r < n; r++)
        memcpy(A->qk_raw + (r0 + r) * (QD + KD), qkv + r * QKV, (QD + KD) * sizeof(float));
    head_norm_forward(qkv, QKV, rs, HG, p + B->qn, n, d->H, d);
    head_norm_forward(qkv + QD, QKV, rs != NULL ? rs + d->H : NULL, HG, p + B->kn, n, d->G, d);
  }
  rope_rows(qkv, QKV, HG, j->g, r0, r1, d, 0); /* q and k heads are adjacent */
}

/* Task (sequence i, kv head kh) of a full layer's attention. */
static void att_fwd_task(void *arg, uint32_t t, uint32_t worker) {
  const layer_job *j = arg;
  const dims *d = j->d;
  const llama_acts *g = j->g;
  const prmi_pack *pk = g->pk;
  const layer_acts *A = j->A;
  const uint64_t i = t / d->G, kh = t % d->G, QKV = d->QKV, QD = d->QD, hd = d->hd;
  const uint64_t row = pk->off[i], p0 = pk->first[i], T = pk->len[i];
  if (p0 >= T) return; /* the whole row is an earlier row's */
  const llama_worker *w = &g->wk[worker];
  const float *q = A->qkv + row * QKV, *k = q + QD + kh * hd, *v = k + d->KD;
  uint64_t ldkv = QKV;
  if (p0 > 0) { /* keys and values partly an earlier row's */
    gather_kv(w->kv, A->qkv, QKV, QD + kh * hd, d->KD, hd, pk->kmap + pk->kmap_off[i], T);
    k = w->kv;
    v = w->kv + hd;
    ldkv = 2 * hd;
  }
  attention_forward(A->o + row * QD, A->lse != NULL ? A->lse + row : NULL, g->max_tok, q, k, v,
                    ldkv, &w->att, p0, T, kh, d);
}

/* Rows [r0, r1) of a full layer after attention: x2 = x + o Wo^T, then the
 * MLP into xn. */
static void layer_out_piece(void *arg, uint64_t r0, uint64_t r1, uint32_t worker) {
  const layer_job *j = arg;
  const dims *d = j->d;
  const layer_acts *A = j->A;
  const uint64_t n = r1 - r0, D = d->D, QD = d->QD;
  float *x2 = A->x2 + r0 * D;
  if (A->x2 != A->x) memcpy(x2, A->x + r0 * D, n * D * sizeof(float));
  prmi_gemm(0, 1, n, D, QD, 1.0f, A->o + r0 * QD, QD, j->p + j->B->wo, QD, 1.0f, x2, D);
  mlp_forward(j->xn + r0 * D, x2, A->m + r0 * D, A->rs2 != NULL ? A->rs2 + r0 : NULL,
              A->gu + r0 * 2 * d->F, j->h != NULL ? j->h + r0 * j->ldh : NULL, j->ldh, n, j->B,
              j->p, d, j->g->wk[worker].tmp);
}

/* A full layer l over all N rows; the residual stream leaving it goes to xn. */
static void layer_forward(prm_ctx *ctx, llama_acts *g, const dims *d, uint64_t l, float *xn,
                          float *hbuf, uint64_t ldh, uint64_t n) {
  const uint64_t N = g->pk->n_tok;
  layer_job j = {.g = g,
                 .d = d,
                 .p = ctx->model->params,
                 .B = &LAYOUT(ctx->model)->blk[l],
                 .A = &g->layer[l],
                 .xn = xn,
                 .h = hbuf,
                 .ldh = ldh};
  prmi_par_range(ctx, N, prmi_row_piece(N), layer_in_piece, &j);
  prmi_par_for(ctx, (uint32_t)(n * d->G), att_fwd_task, &j);
  prmi_par_range(ctx, N, prmi_row_piece(N), layer_out_piece, &j);
}

/* Rows [r0, r1) of the last layer's per-row part: a = rmsnorm(x), k|v,
 * k_norm, RoPE. */
static void last_in_piece(void *arg, uint64_t r0, uint64_t r1, uint32_t worker) {
  (void)worker;
  const layer_job *j = arg;
  const dims *d = j->d;
  const float *p = j->p;
  const llama_block *B = j->B;
  const last_acts *Z = &j->g->last;
  const uint64_t n = r1 - r0, D = d->D, KD = d->KD;
  const float *a = Z->a + r0 * D;
  float *kv = Z->kv + r0 * 2 * KD;
  rmsnorm_forward(Z->a + r0 * D, Z->rs1 != NULL ? Z->rs1 + r0 : NULL, Z->x + r0 * D, p + B->ln1, n,
                  D, d->eps);
  if (!d->bias) {
    linear_forward(kv, 2 * KD, a, n, D, p + B->wk, NULL, 2 * KD);
  } else {
    linear_forward(kv, 2 * KD, a, n, D, p + B->wk, p + B->bk, KD);
    linear_forward(kv + KD, 2 * KD, a, n, D, p + B->wv, p + B->bv, KD);
  }
  if (d->qkn) {
    if (Z->k_raw != NULL)
      for (uint64_t r = 0; r < n; r++)
        memcpy(Z->k_raw + (r0 + r) * KD, kv + r * 2 * KD, KD * sizeof(float));
    head_norm_forward(kv, 2 * KD, Z->k_rs != NULL ? Z->k_rs + r0 * d->G : NULL, d->G, p + B->kn, n,
                      d->G, d);
  }
  rope_rows(kv, 2 * KD, d->G, j->g, r0, r1, d, 0);
}

/* Pooled rows [i0, i1) of the last layer: the query of the last token. */
static void pooled_in_piece(void *arg, uint64_t i0, uint64_t i1, uint32_t worker) {
  (void)worker;
  const layer_job *j = arg;
  const dims *d = j->d;
  const float *p = j->p;
  const llama_block *B = j->B;
  const last_acts *Z = &j->g->last;
  const prmi_pack *pk = j->g->pk;
  const uint64_t n = i1 - i0, D = d->D, QD = d->QD;
  for (uint64_t i = i0; i < i1; i++)
    memcpy(Z->ac + i * D, Z->a + pk->last[i] * D, D * sizeof(float));
  float *q = Z->q + i0 * QD;
  linear_forward(q, QD, Z->ac + i0 * D, n, D, p + B->wq, d->bias ? p + B->bq : NULL, QD);
  if (d->qkn) {
    if (Z->q_raw != NULL) memcpy(Z->q_raw + i0 * QD, q, n * QD * sizeof(float));
    head_norm_forward(q, QD, Z->q_rs != NULL ? Z->q_rs + i0 * d->H : NULL, d->H, p + B->qn, n, d->H,
                      d);
  }
  rope_pooled(q, QD, d->H, j->g, i0, i1, d, 0);
}

/*
 * Task (sequence i, kv head kh) of the last layer: the pooled query of the
 * g heads of the group against every key of the sequence. The g queries
 * are adjacent, so this is one (g, hd) x (hd, T) GEMM (ATT_ROWS at a time).
 */
static void last_att_fwd_task(void *arg, uint32_t t, uint32_t worker) {
  const layer_job *j = arg;
  const dims *d = j->d;
  const llama_acts *g = j->g;
  const prmi_pack *pk = g->pk;
  const last_acts *Z = &g->last;
  const uint64_t i = t / d->G, kh = t % d->G, QD = d->QD, KD = d->KD, hd = d->hd, T = pk->len[i];
  const llama_worker *w = &g->wk[worker];
  const float *k = Z->kv + pk->off[i] * 2 * KD + kh * hd, *v = k + KD;
  uint64_t ldkv = 2 * KD;
  if (pk->first[i] > 0) { /* keys and values partly an earlier row's */
    gather_kv(w->kv, Z->kv, 2 * KD, kh * hd, KD, hd, pk->kmap + pk->kmap_off[i], T);
    k = w->kv;
    v = w->kv + hd;
    ldkv = 2 * hd;
  }
  const float *q = Z->q + i * QD + kh * d->g * hd;
  float *S = w->att.S, *inv = w->att.inv;
  for (uint64_t u0 = 0; u0 < d->g; u0 += ATT_ROWS) {
    const uint64_t nu = d->g - u0 < ATT_ROWS ? d->g - u0 : ATT_ROWS;
    prmi_gemm(0, 1, nu, T, hd, d->scale, q + u0 * hd, hd, k, ldkv, 0.0f, S, T);
    prmi_llama_softmax(S, T, nu, T, 0, T, inv,
                       Z->lse != NULL ? Z->lse + i * d->H + kh * d->g + u0 : NULL);
    float *oq = Z->o + i * QD + (kh * d->g + u0) * hd;
    prmi_gemm(0, 0, nu, hd, T, 1.0f, S, T, v, ldkv, 0.0f, oq, hd);
    scale_rows(oq, hd, nu, hd, inv);
  }
}

/* Pooled rows [i0, i1) of the last layer after attention: x2 = x[r_i] +
 * o Wo^T, then the MLP into out. */
static void pooled_out_piece(void *arg, uint64_t i0, uint64_t i1, uint32_t worker) {
  const layer_job *j = arg;
  const dims *d = j->d;
  const last_acts *Z = &j->g->last;
  const prmi_pack *pk = j->g->pk;
  const uint64_t n = i1 - i0, D = d->D, QD = d->QD;
  for (uint64_t i = i0; i < i1; i++)
    memcpy(Z->x2 + i * D, Z->x + pk->last[i] * D, D * sizeof(float));
  prmi_gemm(0, 1, n, D, QD, 1.0f, Z->o + i0 * QD, QD, j->p + j->B->wo, QD, 1.0f, Z->x2 + i0 * D, D);
  mlp_forward(Z->out + i0 * D, Z->x2 + i0 * D, Z->m + i0 * D, Z->rs2 + i0, Z->gu + i0 * 2 * d->F,
              j->h != NULL ? j->h + i0 * j->ldh : NULL, j->ldh, n, j->B, j->p, d,
              j->g->wk[worker].tmp);
}

/* The last layer: keys and values of every row, the rest at the pooled row
 * r_i = pk->last[i] of each sequence (compact row i). */
static void last_forward(prm_ctx *ctx, llama_acts *g, const dims *d, float *hbuf, uint64_t n) {
  const uint64_t N = g->pk->n_tok;
  layer_job j = {.g = g,
                 .d = d,
                 .p = ctx->model->params,
                 .B = &LAYOUT(ctx->model)->blk[d->L - 1],
                 .h = hbuf,
                 .ldh = d->F};
  prmi_par_range(ctx, N, prmi_row_piece(N), last_in_piece, &j);
  prmi_par_range(ctx, n, prmi_row_piece(n), pooled_in_piece, &j);
  prmi_par_for(ctx, (uint32_t)(n * d->G), last_att_fwd_task, &j);
  prmi_par_range(ctx, n, prmi_row_piece(n), pooled_out_piece, &j);
}

typedef struct embed_job {
  const prmi_pack *pk;
  const float *e; /* the embedding table */
  float *x;       /* forward: the residual stream */
  float *ge;      /* backward: the table's gradient */
  const float *dx;
  uint64_t D;
} embed_job;

static void embed_fwd_piece(void *arg, uint64_t r0, uint64_t r1, uint32_t worker) {
  (void)worker;
  const embed_job *j = arg;
  for (uint64_t r = r0; r < r1; r++)
    memcpy(j->x + r * j->D, j->e + (uint64_t)j->pk->ids[r] * j->D, j->D * sizeof(float));
}

/* Channels [k0, k1) of the embedding gradient, tokens in order. */
static void embed_bwd_piece(void *arg, uint64_t k0, uint64_t k1, uint32_t worker) {
  (void)worker;
  const embed_job *j = arg;
  for (uint64_t r = 0; r < j->pk->n_tok; r++) {
    float *e = j->ge + (uint64_t)j->pk->ids[r] * j->D;
    const float *dr = j->dx + r * j->D;
    for (uint64_t k = k0; k < k1; k++)
      e[k] += dr[k];
  }
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
  embed_job ej = {
      .pk = pk, .e = p + LAYOUT(m)->embed, .x = L > 1 ? g->layer[0].x : g->last.x, .D = D};
  prmi_par_range(ctx, pk->n_tok, prmi_row_piece(pk->n_tok), embed_fwd_piece, &ej);

  /* training: h of a full layer lives only until its down projection */
  float *hbuf = ctx->inference ? NULL : g->d_big;
  for (uint64_t l = 0; l + 1 < L; l++)
    layer_forward(ctx, g, &d, l, l + 2 < L ? g->layer[l + 1].x : g->last.x, hbuf, d.F, n);
  last_forward(ctx, g, &d, hbuf, n);
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

/* Backward of the MLP of n rows (a full layer's or the pooled rows'). */
typedef struct mlp_job {
  const dims *d;
  const float *p;
  const llama_block *B;
  float *dy;        /* (n, D) d(out) on entry; d(x2) on return */
  const float *gu;  /* (n, 2F) the forward's gate | up */
  const float *mm;  /* (n, D) its input m = rmsnorm(x2) */
  const float *x2;  /* (n, D) */
  const float *rs2; /* (n) */
  float *SG;        /* (n, 2F) scratch */
  float *dm;        /* (n, D) receives d(m) */
} mlp_job;

/* Rows: SG = [e | h], e = exp(-|gate|), h as the forward computed it. */
static void mlp_h_piece(void *arg, uint64_t i0, uint64_t i1, uint32_t worker) {
  (void)worker;
  const mlp_job *j = arg;
  const uint64_t F = j->d->F;
  for (uint64_t i = i0; i < i1; i++) {
    const float *gt = j->gu + i * 2 * F;
    float *e = j->SG + i * 2 * F;
    prmi_llama_neg_abs(e, gt, F);
    prmi_exp_shifted(e, F, 0.0f);
    prmi_llama_swiglu_row(e + F, gt, gt + F, e, F);
  }
}

/* Rows: dh = dy Wdown over h, then SG = [dgate | dup]. */
static void mlp_dh_piece(void *arg, uint64_t i0, uint64_t i1, uint32_t worker) {
  (void)worker;
  const mlp_job *j = arg;
  const uint64_t F = j->d->F, D = j->d->D;
  float *sg = j->SG + i0 * 2 * F;
  prmi_gemm(0, 0, i1 - i0, F, D, 1.0f, j->dy + i0 * D, D, j->p + j->B->wd, F, 0.0f, sg + F, 2 * F);
  for (uint64_t i = i0; i < i1; i++) {
    const float *gt = j->gu + i * 2 * F;
    prmi_llama_swiglu_bwd_row(j->SG + i * 2 * F, j->SG + i * 2 * F + F, gt, gt + F, F);
  }
}

/* Rows: dm = [dgate | dup] [Wgate | Wup]; dy += the rmsnorm backward of dm. */
static void mlp_dm_piece(void *arg, uint64_t i0, uint64_t i1, uint32_t worker) {
  (void)worker;
  const mlp_job *j = arg;
  const uint64_t F = j->d->F, D = j->d->D, n = i1 - i0;
  float *dm = j->dm + i0 * D;
  prmi_gemm(0, 0, n, D, 2 * F, 1.0f, j->SG + i0 * 2 * F, 2 * F, j->p + j->B->wg, D, 0.0f, dm, D);
  prmi_llama_rms_bwd(j->dy + i0 * D, D, 1, dm, D, j->x2 + i0 * D, D, j->p + j->B->ln2, j->rs2 + i0,
                     1, n, 1, D);
}

/*
 * Backward of the MLP and its rmsnorm on n rows: dy holds d(out) and
 * receives d(x2) (out = x2 + mlp(rmsnorm(x2))).
 *   h = silu(gate) up:   dWdown += dy^T h,   dh = dy Wdown
 *   [dgate|dup] from dh (prmi_llama_swiglu_bwd_row)
 *   dWgate|up += [dgate|dup]^T m,   dm = [dgate|dup] [Wgate|Wup]
 */
static void mlp_backward(prm_ctx *ctx, const mlp_job *j, uint64_t n) {
  const dims *d = j->d;
  const uint64_t F = d->F, D = d->D, rp = prmi_row_piece(n);
  prmi_par_range(ctx, n, rp, mlp_h_piece, (void *)j);
  par_linear_dw(ctx, prmi_grad_slot(ctx, j->B->wd), j->dy, D, j->SG + F, 2 * F, n, F, D);
  prmi_par_range(ctx, n, rp, mlp_dh_piece, (void *)j);
  par_linear_dw(ctx, prmi_grad_slot(ctx, j->B->wg), j->SG, 2 * F, j->mm, D, n, D, 2 * F);
  prmi_par_range(ctx, n, rp, mlp_dm_piece, (void *)j);
  par_norm_dw(ctx, prmi_grad_slot(ctx, j->B->ln2), j->dm, j->x2, j->rs2, n, D);
}

/*
 * Task (component c, kv head kh) of a full layer's attention backward: the
 * rows of the component in order, so that a row's own keys are set by it
 * before later rows that share them add their part.
 */
static void att_bwd_task(void *arg, uint32_t t, uint32_t worker) {
  const layer_job *j = arg;
  const dims *d = j->d;
  const llama_acts *g = j->g;
  const prmi_pack *pk = g->pk;
  const layer_acts *A = j->A;
  const uint64_t c = t / d->G, kh = t % d->G, QKV = d->QKV, QD = d->QD, KD = d->KD, hd = d->hd;
  const llama_worker *w = &g->wk[worker];
  for (uint64_t r = pk->comp_off[c]; r < pk->comp_off[c + 1]; r++) {
    const uint64_t i = pk->comp_rows[r];
    const uint64_t row = pk->off[i], p0 = pk->first[i], T = pk->len[i];
    if (p0 >= T) continue;
    const float *q = A->qkv + row * QKV, *lse = A->lse + row, *dout = j->d_o + row * QD;
    float *dq = g->d_qkv + row * QKV;
    if (p0 == 0) {
      const float *k = q + QD + kh * hd;
      float *dk = dq + QD + kh * hd;
      attention_backward(dq, dk, dk + KD, QKV, dout, q, k, k + KD, QKV, lse, g->max_tok, &w->att, 0,
                         T, kh, d);
    } else {
      const uint64_t *kmap = pk->kmap + pk->kmap_off[i];
      gather_kv(w->kv, A->qkv, QKV, QD + kh * hd, KD, hd, kmap, T);
      attention_backward(dq, w->dkv, w->dkv + hd, 2 * hd, dout, q, w->kv, w->kv + hd, 2 * hd, lse,
                         g->max_tok, &w->att, p0, T, kh, d);
      scatter_dkv(g->d_qkv, QKV, QD + kh * hd, KD, w->dkv, hd, kmap, p0, T);
    }
  }
}

/* Rows: rotate d(q|k) back (the step before qk_norm's weight gradient). */
static void qk_unrope_piece(void *arg, uint64_t r0, uint64_t r1, uint32_t worker) {
  (void)worker;
  const layer_job *j = arg;
  const dims *d = j->d;
  if (j->A != NULL)
    rope_rows(j->g->d_qkv + r0 * d->QKV, d->QKV, d->H + d->G, j->g, r0, r1, d, 1);
  else
    rope_rows(j->g->d_qkv + r0 * 2 * d->KD, 2 * d->KD, d->G, j->g, r0, r1, d, 1);
}

/*
 * Rows [r0, r1) of a full layer from d(rotated q|k|v) to d(x): RoPE back
 * (qk_norm: done, then the norm back), d(a) = d(q|k|v) [Wq|Wk|Wv], d(x) +=
 * the input_layernorm backward.
 */
static void layer_qkv_piece(void *arg, uint64_t r0, uint64_t r1, uint32_t worker) {
  (void)worker;
  const layer_job *j = arg;
  const dims *d = j->d;
  const float *p = j->p;
  const llama_block *B = j->B;
  const layer_acts *A = j->A;
  const uint64_t n = r1 - r0, D = d->D, QKV = d->QKV, QD = d->QD, KD = d->KD, HG = d->H + d->G;
  float *dq = j->g->d_qkv + r0 * QKV, *da = j->g->d_a + r0 * D;
  if (!d->qkn) {
    rope_rows(dq, QKV, HG, j->g, r0, r1, d, 1);
  } else {
    const float *raw = A->qk_raw + r0 * (QD + KD), *rs = A->qk_rs + r0 * HG;
    head_norm_backward(dq, QKV, raw, QD + KD, rs, HG, p + B->qn, n, d->H, d);
    head_norm_backward(dq + QD, QKV, raw + QD, QD + KD, rs + d->H, HG, p + B->kn, n, d->G, d);
  }
  if (!d->bias) {
    prmi_gemm(0, 0, n, D, QKV, 1.0f, dq, QKV, p + B->wq, D, 0.0f, da, D);
  } else {
    prmi_gemm(0, 0, n, D, QD, 1.0f, dq, QKV, p + B->wq, D, 0.0f, da, D);
    prmi_gemm(0, 0, n, D, KD, 1.0f, dq + QD, QKV, p + B->wk, D, 1.0f, da, D);
    prmi_gemm(0, 0, n, D, KD, 1.0f, dq + QD + KD, QKV, p + B->wv, D, 1.0f, da, D);
  }
  prmi_llama_rms_bwd(j->g->d_res + r0 * D, D, 1, da, D, A->x + r0 * D, D, p + B->ln1, A->rs1 + r0,
                     1, n, 1, D);
}

/* Backward of a full layer l: g->d_res holds d(x_{l+1}) and receives d(x_l). */
static void layer_backward(prm_ctx *ctx, llama_acts *g, const dims *d, uint64_t l) {
  const prm_model *m = ctx->model;
  const float *p = m->params;
  const llama_block *B = &LAYOUT(m)->blk[l];
  const layer_acts *A = &g->layer[l];
  const prmi_pack *pk = g->pk;
  const uint64_t N = pk->n_tok, D = d->D, QD = d->QD, KD = d->KD, QKV = d->QKV;
  /* x' = x2 + mlp(m), m = rmsnorm(x2) */
  const mlp_job mj = {d, p, B, g->d_res, A->gu, A->m, A->x2, A->rs2, g->d_big, g->d_a};
  mlp_backward(ctx, &mj, N);
  /* x2 = x + o Wo^T */
  float *d_o = g->d_big;
  prmi_par_gemm(ctx, 0, 0, N, QD, D, 1.0f, g->d_res, D, p + B->wo, QD, 0.0f, d_o, QD, prmi_row_piece(N),
                0);
  par_linear_dw(ctx, prmi_grad_slot(ctx, B->wo), g->d_res, D, A->o, QD, N, QD, D);
  layer_job j = {.g = g, .d = d, .p = p, .B = B, .A = A, .d_o = d_o};
  prmi_par_for(ctx, (uint32_t)(pk->n_comp * d->G), att_bwd_task, &j);
  if (d->qkn) { /* RoPE back, then the norms' weight gradients before d(q|k) changes */
    prmi_par_range(ctx, N, prmi_row_piece(N), qk_unrope_piece, &j);
    const rms_dw_job qj = {.dw = prmi_grad_slot(ctx, B->qn),
                           .dy = g->d_qkv,
                           .x = A->qk_raw,
                           .rs = A->qk_rs,
                           .lddy = QKV,
                           .ldx = QD + KD,
                           .ld_rs = d->H + d->G,
                           .rows = N,
                           .nv = d->H,
                           .n = d->hd};
    const rms_dw_job kj = {.dw = prmi_grad_slot(ctx, B->kn),
                           .dy = g->d_qkv + QD,
                           .x = A->qk_raw + QD,
                           .rs = A->qk_rs + d->H,
                           .lddy = QKV,
                           .ldx = QD + KD,
                           .ld_rs = d->H + d->G,
                           .rows = N,
                           .nv = d->G,
                           .n = d->hd};
    if (qj.dw != NULL) par_rms_dw(ctx, &qj, &kj);
  }
  /* q|k|v = a W^T + b; a = rmsnorm(x) */
  prmi_par_range(ctx, N, prmi_row_piece(N), layer_qkv_piece, &j);
  if (!d->bias) {
    par_linear_dw(ctx, prmi_grad_slot(ctx, B->wq), g->d_qkv, QKV, A->a, D, N, D, QKV);
  } else {
    par_linear_dw(ctx, prmi_grad_slot(ctx, B->wq), g->d_qkv, QKV, A->a, D, N, D, QD);
    par_linear_dw(ctx, prmi_grad_slot(ctx, B->wk), g->d_qkv + QD, QKV, A->a, D, N, D, KD);
    par_linear_dw(ctx, prmi_grad_slot(ctx, B->wv), g->d_qkv + QD + KD, QKV, A->a, D, N, D, KD);
    prmi_par_colsum(ctx, prmi_grad_slot(ctx, B->bq), g->d_qkv, N, QD, QKV);
    prmi_par_colsum(ctx, prmi_grad_slot(ctx, B->bk), g->d_qkv + QD, N, KD, QKV);
    prmi_par_colsum(ctx, prmi_grad_slot(ctx, B->bv), g->d_qkv + QD + KD, N, KD, QKV);
  }
  par_norm_dw(ctx, prmi_grad_slot(ctx, B->ln1), g->d_a, A->x, A->rs1, N, D);
}

/*
 * Task (component c, kv head kh) of the last layer's backward: dk, dv of
 * every key the pooled queries of the component saw, dq compact. Each
 * (sequence, kv head) block of d(k|v) (N, 2 KD) is written once by its
 * row; a row with a shared prefix works on gathered rows and adds the
 * shared part into the earlier row's (rows in order).
 */
static void last_att_bwd_task(void *arg, uint32_t t, uint32_t worker) {
  const layer_job *j = arg;
  const dims *d = j->d;
  const llama_acts *g = j->g;
  const prmi_pack *pk = g->pk;
  const last_acts *Z = &g->last;
  const uint64_t c = t / d->G, kh = t % d->G, QD = d->QD, KD = d->KD, hd = d->hd;
  const llama_worker *w = &g->wk[worker];
  float *dkv = g->d_qkv;
  for (uint64_t r = pk->comp_off[c]; r < pk->comp_off[c + 1]; r++) {
    const uint64_t i = pk->comp_rows[r], T = pk->len[i], shared = pk->first[i] > 0;
    const uint64_t *kmap = pk->kmap + pk->kmap_off[i];
    const float *k = Z->kv + pk->off[i] * 2 * KD + kh * hd, *v = k + KD;
    float *dk = dkv + pk->off[i] * 2 * KD + kh * hd, *dv = dk + KD;
    uint64_t ldkv = 2 * KD;
    if (shared) {
      gather_kv(w->kv, Z->kv, 2 * KD, kh * hd, KD, hd, kmap, T);
      k = w->kv;
      v = w->kv + hd;
      dk = w->dkv;
      dv = w->dkv + hd;
      ldkv = 2 * hd;
    }
    const float *q = Z->q + i * QD + kh * d->g * hd, *dout = j->d_o + i * QD + kh * d->g * hd;
    float *P = w->att.S, *dP = w->att.dS;
    for (uint64_t u0 = 0; u0 < d->g; u0 += ATT_ROWS) {
      const uint64_t nu = d->g - u0 < ATT_ROWS ? d->g - u0 : ATT_ROWS;
      const float beta = u0 == 0 ? 0.0f : 1.0f;
      const float *qu = q + u0 * hd, *du = dout + u0 * hd;
      prmi_gemm(0, 1, nu, T, hd, d->scale, qu, hd, k, ldkv, 0.0f, P, T);
      prmi_llama_probs(P, T, nu, T, 0, T, Z->lse + i * d->H + kh * d->g + u0);
      prmi_gemm(1, 0, T, hd, nu, 1.0f, P, T, du, hd, beta, dv, ldkv);
      prmi_gemm(0, 1, nu, T, hd, 1.0f, du, hd, v, ldkv, 0.0f, dP, T);
      prmi_llama_softmax_bwd(dP, P, T, nu, T, 0, T, d->scale);
      prmi_gemm(0, 0, nu, hd, T, 1.0f, dP, T, k, ldkv, 0.0f,
                g->d_lastq + i * QD + (kh * d->g + u0) * hd, hd);
      prmi_gemm(1, 0, T, hd, nu, 1.0f, dP, T, qu, hd, beta, dk, ldkv);
    }
    if (shared) scatter_dkv(dkv, 2 * KD, kh * hd, KD, w->dkv, hd, kmap, pk->first[i], T);
  }
}

/* Pooled rows [i0, i1) of the last layer from d(rotated q) to d(a) at the
 * pooled rows (in d_last): RoPE back (qk_norm: done, then the norm back),
 * d_last = d(q) Wq. */
static void pooled_q_piece(void *arg, uint64_t i0, uint64_t i1, uint32_t worker) {
  (void)worker;
  const layer_job *j = arg;
  const dims *d = j->d;
  const float *p = j->p;
  const last_acts *Z = &j->g->last;
  const uint64_t n = i1 - i0, D = d->D, QD = d->QD;
  float *dq = j->g->d_lastq + i0 * QD;
  if (!d->qkn)
    rope_pooled(dq, QD, d->H, j->g, i0, i1, d, 1);
  else
    head_norm_backward(dq, QD, Z->q_raw + i0 * QD, QD, Z->q_rs + i0 * d->H, d->H, p + j->B->qn, n,
                       d->H, d);
  prmi_gemm(0, 0, n, D, QD, 1.0f, dq, QD, p + j->B->wq, D, 0.0f, j->g->d_last + i0 * D, D);
}

/* Pooled rows: rotate d(q) back (qk_norm: before the norm's weight gradient). */
static void pooled_unrope_piece(void *arg, uint64_t i0, uint64_t i1, uint32_t worker) {
  (void)worker;
  const layer_job *j = arg;
  rope_pooled(j->g->d_lastq + i0 * j->d->QD, j->d->QD, j->d->H, j->g, i0, i1, j->d, 1);
}

/* Rows [r0, r1) of d(x_{L-1}) = d(x2) at the pooled rows (rows that share
 * their last token add, in row order); the input_layernorm backward adds
 * the rest (last_kv_piece). */
static void last_res_piece(void *arg, uint64_t r0, uint64_t r1, uint32_t worker) {
  (void)worker;
  const layer_job *j = arg;
  const prmi_pack *pk = j->g->pk;
  const uint64_t D = j->d->D;
  memset(j->g->d_res + r0 * D, 0, (r1 - r0) * D * sizeof(float));
  for (uint64_t i = 0; i < pk->n; i++) {
    const uint64_t r = pk->last[i];
    if (r < r0 || r >= r1) continue;
    float *dr = j->g->d_res + r * D;
    const float *dz = j->g->d_last + i * D;
    for (uint64_t c = 0; c < D; c++)
      dr[c] += dz[c];
  }
}

/*
 * Rows [r0, r1) of the last layer's per-row part from d(rotated k|v) to
 * d(x): RoPE back (qk_norm: done, then the norm back), d(a) = d(k|v)
 * [Wk|Wv] plus d_last (the q path) at the pooled rows, d(x) += the
 * input_layernorm backward. Rows that share their last token add in row
 * order.
 */
static void last_kv_piece(void *arg, uint64_t r0, uint64_t r1, uint32_t worker) {
  (void)worker;
  const layer_job *j = arg;
  const dims *d = j->d;
  const float *p = j->p;
  const llama_block *B = j->B;
  const llama_acts *g = j->g;
  const last_acts *Z = &g->last;
  const prmi_pack *pk = g->pk;
  const uint64_t n = r1 - r0, D = d->D, KD = d->KD;
  float *dkv = g->d_qkv + r0 * 2 * KD, *da = g->d_a + r0 * D;
  if (!d->qkn)
    rope_rows(dkv, 2 * KD, d->G, g, r0, r1, d, 1);
  else
    head_norm_backward(dkv, 2 * KD, Z->k_raw + r0 * KD, KD, Z->k_rs + r0 * d->G, d->G, p + B->kn, n,
                       d->G, d);
  if (!d->bias) {
    prmi_gemm(0, 0, n, D, 2 * KD, 1.0f, dkv, 2 * KD, p + B->wk, D, 0.0f, da, D);
  } else {
    prmi_gemm(0, 0, n, D, KD, 1.0f, dkv, 2 * KD, p + B->wk, D, 0.0f, da, D);
    prmi_gemm(0, 0, n, D, KD, 1.0f, dkv + KD, 2 * KD, p + B->wv, D, 1.0f, da, D);
  }
  for (uint64_t i = 0; i < pk->n; i++) {
    const uint64_t r = pk->last[i];
    if (r < r0 || r >= r1) continue;
    float *dai = g->d_a + r * D;
    const float *dl = g->d_last + i * D;
    for (uint64_t c = 0; c < D; c++)
      dai[c] += dl[c];
  }
  prmi_llama_rms_bwd(g->d_res + r0 * D, D, 1, da, D, Z->x + r0 * D, D, p + B->ln1, Z->rs1 + r0, 1,
                     n, 1, D);
}

/* Backward of the last layer: g->d_last holds d(out) (n, D); g->d_res
 * receives d(x_{L-1}) for all N rows. */
static void last_backward(prm_ctx *ctx, llama_acts *g, const dims *d, uint64_t n) {
  const prm_model *m = ctx->model;
  const float *p = m->params;
  const llama_block *B = &LAYOUT(m)->blk[d->L - 1];
  const last_acts *Z = &g->last;
  const prmi_pack *pk = g->pk;
  const uint64_t N = pk->n_tok, D = d->D, QD = d->QD, KD = d->KD;
  float *dz = g->d_last; /* d(out), then d(x2) */
  const mlp_job mj = {d, p, B, dz, Z->gu, Z->m, Z->x2, Z->rs2, g->d_big, g->d_a};
  mlp_backward(ctx, &mj, n);
  float *d_o = g->d_big; /* (n, QD) */
  prmi_par_gemm(ctx, 0, 0, n, QD, D, 1.0f, dz, D, p + B->wo, QD, 0.0f, d_o, QD, prmi_row_piece(n), 0);
  par_linear_dw(ctx, prmi_grad_slot(ctx, B->wo), dz, D, Z->o, QD, n, QD, D);
  /* attention of the pooled queries: d(k|v) of every row (N, 2 KD) in
   * d_qkv, dq compact */
  layer_job j = {.g = g, .d = d, .p = p, .B = B, .d_o = d_o};
  prmi_par_for(ctx, (uint32_t)(pk->n_comp * d->G), last_att_bwd_task, &j);
  /* d(x_{L-1}) starts as d(x2) at the pooled rows: dz is free after it,
   * and d_last takes d(a) at the pooled rows (pooled_q_piece) */
  prmi_par_range(ctx, N, prmi_row_piece(N), last_res_piece, &j);
  if (d->qkn) { /* RoPE back, then the norms' weight gradients before d(q|k) changes */
    prmi_par_range(ctx, N, prmi_row_piece(N), qk_unrope_piece, &j);
    prmi_par_range(ctx, n, prmi_row_piece(n), pooled_unrope_piece, &j);
    const rms_dw_job kj = {.dw = prmi_grad_slot(ctx, B->kn),
                           .dy = g->d_qkv,
                           .x = Z->k_raw,
                           .rs = Z->k_rs,
                           .lddy = 2 * KD,
                           .ldx = KD,
                           .ld_rs = d->G,
                           .rows = N,
                           .nv = d->G,
                           .n = d->hd};
    const rms_dw_job qj = {.dw = prmi_grad_slot(ctx, B->qn),
                           .dy = g->d_lastq,
                           .x = Z->q_raw,
                           .rs = Z->q_rs,
                           .lddy = QD,
                           .ldx = QD,
                           .ld_rs = d->H,
                           .rows = n,
                           .nv = d->H,
                           .n = d->hd};
    if (qj.dw != NULL) par_rms_dw(ctx, &qj, &kj);
  }
  prmi_par_range(ctx, n, prmi_row_piece(n), pooled_q_piece, &j);
  prmi_par_range(ctx, N, prmi_row_piece(N), last_kv_piece, &j);
  if (!d->bias) {
    par_linear_dw(ctx, prmi_grad_slot(ctx, B->wk), g->d_qkv, 2 * KD, Z->a, D, N, D, 2 * KD);
  } else {
    par_linear_dw(ctx, prmi_grad_slot(ctx, B->wk), g->d_qkv, 2 * KD, Z->a, D, N, D, KD);
    par_linear_dw(ctx, prmi_grad_slot(ctx, B->wv), g->d_qkv + KD, 2 * KD, Z->a, D, N, D, KD);
    prmi_par_colsum(ctx, prmi_grad_slot(ctx, B->bk), g->d_qkv, N, KD, 2 * KD);
    prmi_par_colsum(ctx, prmi_grad_slot(ctx, B->bv), g->d_qkv + KD, N, KD, 2 * KD);
    prmi_par_colsum(ctx, prmi_grad_slot(ctx, B->bq), g->d_lastq, n, QD, QD);
  }
  par_linear_dw(ctx, prmi_grad_slot(ctx, B->wq), g->d_lastq, QD, Z->ac, D, n, D, QD);
  par_norm_dw(ctx, prmi_grad_slot(ctx, B->ln1), g->d_a, Z->x, Z->rs1, N, D);
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
  par_norm_dw(ctx, prmi_grad_slot(ctx, Ly->norm), g->d_a, Z->out, Z->fn_rs, n, D);
  prmi_llama_rms_bwd(g->d_last, D, 1, g->d_a, D, Z->out, D, p + Ly->norm, Z->fn_rs, 1, n, 1, D);
  if (Ly->blk[L - 1].start < ctx->trainable_offset) return; /* layers frozen */
  last_backward(ctx, g, &d, n);
  for (uint64_t l = L - 1; l-- > 0;) {
    if (Ly->blk[l].start < ctx->trainable_offset) return; /* this and all below frozen */
    layer_backward(ctx, g, &d, l);
  }
  float *ge = prmi_grad_slot(ctx, Ly->embed);
  if (ge == NULL) return;
  embed_job ej = {.pk = g->pk, .ge = ge, .dx = g->d_res, .D = D};
  prmi_par_range(ctx, D, prmi_col_piece(D), embed_bwd_piece, &ej);
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
