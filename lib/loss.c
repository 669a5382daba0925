/*
 * loss.c - pairwise preference losses (pure functions over score arrays) and
 * the finiteness check shared by the hot paths of the library.
 *
 * Bradley-Terry with optional margin m, soft label p, weight w and reward
 * centring coefficient c (docs/losses.md has the derivation):
 *
 *   z_i  = r_c[i] - r_r[i] - m_i
 *   l_i  = p_i softplus(-z_i) + (1 - p_i) softplus(z_i)
 *        = -(p_i log s(z_i) + (1 - p_i) log s(-z_i))
 *   loss = (1/n) sum_i w_i l_i + c (1/n) sum_i (r_c[i] + r_r[i])^2
 *
 *   dloss/dr_c[i] =  w_i (s(z_i) - p_i) / n + 2 c (r_c[i] + r_r[i]) / n
 *   dloss/dr_r[i] = -w_i (s(z_i) - p_i) / n + 2 c (r_c[i] + r_r[i]) / n
 *
 * Everything is computed in double. One exp and one log1p per pair serve the
 * loss and the gradient: with e = exp(-|z|) (in (0, 1], never overflows)
 *   softplus(+-z) = max(+-z, 0) + log1p(e)
 *   s(|z|) = 1 / (1 + e),  s(-|z|) = e / (1 + e)
 * and s(z) - p is evaluated as (1 - p) s(z) - p s(-z), which keeps the tiny
 * gradients of confidently-correct pairs (s(z) - 1 = -s(-z) ~ -e^-z) instead
 * of rounding them to 0 through 1 - s(z).
 *
 * Reentrant: no static mutable state; failures only write the thread's error
 * message.
 */
#include <float.h>
#include <inttypes.h>
#include <math.h>
#include <string.h>

#include "internal.h"

/* ---- finiteness ------------------------------------------------------------ */

/*
 * A float is finite iff its exponent bits are not all ones, i.e. iff
 * (bits & 0x7fffffff) < 0x7f800000. The inner loop takes the maximum of the
 * magnitudes' bit patterns: an integer max-reduction without branches, which
 * compilers vectorise. Blocks give an early exit on long arrays.
 */
#define PRMI_FINITE_BLOCK 4096u

int prmi_all_finite(const float *x, uint64_t n) {
  uint64_t i = 0;
  while (i < n) {
    uint64_t end = n - i > PRMI_FINITE_BLOCK ? i + PRMI_FINITE_BLOCK : n;
    uint32_t mx = 0;
    for (; i < end; i++) {
      uint32_t u;
      memcpy(&u, &x[i], sizeof u);
      u &= 0x7fffffffu;
      mx = u > mx ? u : mx;
    }
    if (mx >= 0x7f800000u) return 0;
  }
  return 1;
}

/* Index of the first non-finite element (n when none). Error paths only. */
static uint64_t first_nonfinite(const float *x, uint64_t n) {
  uint64_t i;
  for (i = 0; i < n; i++)
    if (!isfinite(x[i])) break;
  return i;
}

/* ---- option and statistics structs ---------------------------------------- */

int prm_loss_options_init(prm_loss_options *opts, uint32_t version) {
  const prm_loss_options d = PRM_LOSS_OPTIONS_INIT;
  return prmi_init_struct(opts, &d, sizeof d, version, PRM_LOSS_OPTIONS_VERSION,
                          "prm_loss_options_init");
}

int prm_loss_stats_init(prm_loss_stats *stats, uint32_t version) {
  const prm_loss_stats d = PRM_LOSS_STATS_INIT;
  return prmi_init_struct(stats, &d, sizeof d, version, PRM_LOSS_STATS_VERSION,
                          "prm_loss_stats_init");
}

/* ---- Bradley-Terry ----------------------------------------------------------- */

/* NaN/Inf anywhere in an optional per-pair array. */
static int check_finite(const float *x, uint64_t n, const char *name) {
  if (x == NULL || prmi_all_finite(x, n)) return PRM_OK;
  uint64_t i = first_nonfinite(x, n);
  return prmi_fail(NULL, PRM_ERR_NONFINITE, "prm_loss_bt: %s[%" PRIu64 "] = %g is not finite", name,
                   i, (double)x[i]);
}

int prmi_loss_check_args(const prm_loss_options *opts, const prm_loss_stats *stats, uint64_t n) {
  int rc;
  if (n == 0) return prmi_fail(NULL, PRM_ERR_SIZE, "prm_loss_bt: n_pairs is 0");
  if (opts != NULL && (rc = prmi_check_version(NULL, opts, PRM_LOSS_OPTIONS_VERSION,
                                               "prm_loss_bt: opts")) != PRM_OK)
    return rc;
  if (stats != NULL && (rc = prmi_check_version(NULL, stats, PRM_LOSS_STATS_VERSION,
                                                "prm_loss_bt: stats")) != PRM_OK)
    return rc;
  if (opts == NULL) return PRM_OK;

  if ((rc = check_finite(opts->margin, n, "margin")) != PRM_OK) return rc;
  if ((rc = check_finite(opts->label, n, "label")) != PRM_OK) return rc;
  if ((rc = check_finite(opts->weight, n, "weight")) != PRM_OK) return rc;
  if (!isfinite(opts->center_coef))
    return prmi_fail(NULL, PRM_ERR_NONFINITE, "prm_loss_bt: center_coef = %g is not finite",
                     opts->center_coef);

  if (opts->label != NULL)
    for (uint64_t i = 0; i < n; i++)
      if (!(opts->label[i] >= 0.0f && opts->label[i] <= 1.0f))
        return prmi_fail(NULL, PRM_ERR_INVALID,
                         "prm_loss_bt: label[%" PRIu64 "] = %g is outside [0, 1]", i,
                         (double)opts->label[i]);
  if (opts->weight != NULL)
    for (uint64_t i = 0; i < n; i++)
      if (opts->weight[i] < 0.0f)
        return prmi_fail(NULL, PRM_ERR_INVALID, "prm_loss_bt: weight[%" PRIu64 "] = %g is negative",
                         i, (double)opts->weight[i]);
  if (!(opts->center_coef >= 0.0 && opts->center_coef <= PRMI_MAX_CENTER_COEF))
    return prmi_fail(NULL, PRM_ERR_INVALID, "prm_loss_bt: center_coef = %g is outside [0, %g]",
                     opts->center_coef, PRMI_MAX_CENTER_COEF);
  return PRM_OK;
}

static int validate(const float *r_chosen, const float *r_rejected, uint64_t n,
                    const prm_loss_options *opts, const prm_loss_stats *stats,
                    const float *d_chosen, const float *d_rejected) {
  int rc;
  if (r_chosen == NULL) return prmi_fail(NULL, PRM_ERR_NULL, "prm_loss_bt: r_chosen is NULL");
  if (r_rejected == NULL) return prmi_fail(NULL, PRM_ERR_NULL, "prm_loss_bt: r_rejected is NULL");
  if ((d_chosen == NULL) != (d_rejected == NULL))
    return prmi_fail(NULL, PRM_ERR_INVALID,
                     "prm_loss_bt: give both d_chosen and d_rejected or neither (%s is NULL)",
                     d_chosen == NULL ? "d_chosen" : "d_rejected");
  if ((rc = prmi_loss_check_args(opts, stats, n)) != PRM_OK) return rc;
  if ((rc = check_finite(r_chosen, n, "r_chosen")) != PRM_OK) return rc;
  return check_finite(r_rejected, n, "r_rejected");
}

/*
 * Round a gradient to float. Only reward centring with scores near FLT_MAX
 * can exceed the float range; saturate instead of producing Inf so the
 * result stays finite as promised for finite inputs (docs/losses.md).
 */
static float to_float_sat(double g) {
  if (g > (double)FLT_MAX) return FLT_MAX;
  if (g < -(double)FLT_MAX) return -FLT_MAX;
  return (float)g;
}

/*
 * d_chosen and d_rejected must not alias r_chosen, r_rejected or the option
 * arrays: gradients are written in the first pass and the scores are read
 * again by the second (statistics) pass.
 */
int prm_loss_bt(const float *r_chosen, const float *r_rejected, uint64_t n_pairs,
                const prm_loss_options *opts, double *loss, prm_loss_stats *stats, float *d_chosen,
                float *d_rejected) {
  int rc = validate(r_chosen, r_rejected, n_pairs, opts, stats, d_chosen, d_rejected);
  if (rc != PRM_OK) return rc;

  const float *margin = opts != NULL ? opts->margin : NULL;
  const float *label = opts != NULL ? opts->label : NULL;
  const float *weight = opts != NULL ? opts->weight : NULL;
  const double c = opts != NULL ? opts->center_coef : 0.0;
  const double n = (double)n_pairs;
  const double inv_n = 1.0 / n;

  double sum_wl = 0.0;   /* sum_i w_i l_i */
  double sum_sq = 0.0;   /* sum_i (r_c + r_r)^2 */
  double sum_r = 0.0;    /* sum of all 2n rewards */
  double sum_diff = 0.0; /* sum_i (r_c - r_r) */
  double wins = 0.0;     /* pairs with r_c > r_r, ties as 1/2 */

  for (uint64_t i = 0; i < n_pairs; i++) {
    const double a = (double)r_chosen[i], b = (double)r_rejected[i];
    const double diff = a - b; /* exact enough: |diff| <= 2 FLT_MAX */
    const double z = margin != NULL ? diff - (double)margin[i] : diff;
    const double p = label != NULL ? (double)label[i] : 1.0;
    const double w = weight != NULL ? (double)weight[i] : 1.0;

    const double e = exp(-fabs(z)); /* (0, 1] */
    const double lp = log1p(e);
    const double sp_pos = (z > 0.0 ? z : 0.0) + lp;   /* softplus(z)  = -log s(-z) */
    const double sp_neg = (z < 0.0 ? -z : 0.0) + lp;  /* softplus(-z) = -log s(z) */
    const double l = p * sp_neg + (1.0 - p) * sp_pos; /* both terms >= 0 */
    sum_wl += w * l;

    const double sum_ab = a + b;
    sum_sq += sum_ab * sum_ab;
    sum_r += sum_ab;
    sum_diff += diff;
    wins += a > b ? 1.0 : (a == b ? 0.5 : 0.0);

    if (d_chosen != NULL) {
      const double big = 1.0 / (1.0 + e); /* s(|z|) */
      const double small = e * big;       /* s(-|z|) */
      const double s_pos = z >= 0.0 ? big : small;
      const double s_neg = z >= 0.0 ? small : big;
      const double g_pair = w * ((1.0 - p) * s_pos - p * s_neg) * inv_n; /* w (s(z) - p) / n */
      const double g_center = 2.0 * c * sum_ab * inv_n;
      d_chosen[i] = to_float_sat(g_pair + g_center);
      d_rejected[i] = to_float_sat(g_center - g_pair);
    }
  }

  const double value = sum_wl * inv_n + c * (sum_sq * inv_n);
  if (loss != NULL) *loss = value;
  if (stats != NULL) {
    /* Second pass for the spread: sum of squared deviations from the mean
     * is far more accurate than E[r^2] - E[r]^2 when rewards share a big
     * offset. */
    const double mean = sum_r / (2.0 * n);
    double ss = 0.0;
    for (uint64_t i = 0; i < n_pairs; i++) {
      const double da = (double)r_chosen[i] - mean, db = (double)r_rejected[i] - mean;
      ss += da * da + db * db;
    }
    /* Version 1 is every field; later versions only append. */
    stats->loss = value;
    stats->accuracy = wins * inv_n;
    stats->reward_mean = mean;
    stats->reward_std = sqrt(ss / (2.0 * n));
    stats->margin_mean = sum_diff * inv_n;
  }
  return PRM_OK;
}
