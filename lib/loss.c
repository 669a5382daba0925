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

/* Bytes of struct version 1: later versions only append. */
#define LOSS_OPTIONS_V1_SIZE offsetof(prm_loss_options, tie_model)
#define LOSS_STATS_V1_SIZE offsetof(prm_loss_stats, brier)

int prm_loss_options_init(prm_loss_options *opts, uint32_t version) {
  const prm_loss_options d = PRM_LOSS_OPTIONS_INIT;
  return prmi_init_struct(opts, &d, version == 1 ? LOSS_OPTIONS_V1_SIZE : sizeof d, version,
                          PRM_LOSS_OPTIONS_VERSION, "prm_loss_options_init");
}

int prm_loss_stats_init(prm_loss_stats *stats, uint32_t version) {
  const prm_loss_stats d = PRM_LOSS_STATS_INIT;
  return prmi_init_struct(stats, &d, version == 1 ? LOSS_STATS_V1_SIZE : sizeof d, version,
                          PRM_LOSS_STATS_VERSION, "prm_loss_stats_init");
}

int prm_rank_options_init(prm_rank_options *opts, uint32_t version) {
  const prm_rank_options d = PRM_RANK_OPTIONS_INIT;
  return prmi_init_struct(opts, &d, sizeof d, version, PRM_RANK_OPTIONS_VERSION,
                          "prm_rank_options_init");
}

/*
 * The caller's options (any version, or NULL) as a full struct of the newest
 * version: fields the caller's version lacks take their defaults. Reads only
 * the bytes of the caller's version. The version must have been checked.
 */
prm_loss_options prmi_loss_options_read(const prm_loss_options *in) {
  prm_loss_options o = PRM_LOSS_OPTIONS_INIT;
  if (in != NULL) memcpy(&o, in, in->version == 1 ? LOSS_OPTIONS_V1_SIZE : sizeof o);
  o.version = PRM_LOSS_OPTIONS_VERSION;
  return o;
}

/* Write the fields of the caller's stats version (checked) from a full struct. */
static void write_stats(prm_loss_stats *out, const prm_loss_stats *full) {
  const size_t size = out->version == 1 ? LOSS_STATS_V1_SIZE : sizeof *full;
  const size_t skip = offsetof(prm_loss_stats, loss); /* keep the caller's version */
  memcpy((char *)out + skip, (const char *)full + skip, size - skip);
}

/* ---- shared numerics ------------------------------------------------------------ */

/* log(1 + e^x) without overflow or cancellation. */
static double softplus(double x) { return (x > 0.0 ? x : 0.0) + log1p(exp(-fabs(x))); }

/* 1 / (1 + e^-x), accurate in both tails. */
static double sigmoid(double x) {
  if (x >= 0.0) return 1.0 / (1.0 + exp(-x));
  const double e = exp(x);
  return e / (1.0 + e);
}

/* ---- statistics: one accumulator for one batch and for many ------------------------------- */

/*
 * Every statistic of prm_loss_stats is a ratio of sums (or, for the reward
 * spread, a count/mean/M2 triple), so one prm_eval_accum describes a batch
 * and merging two describes their union. prm_loss_bt and prm_loss_rank fill
 * one for their batch and turn it into statistics (prmi_eval_accum_fill);
 * the accumulating evaluations merge each batch's into the caller's. The
 * fill divides the same sums the same way for one batch as for many, so
 * the pure losses give the statistics they always gave, bit for bit.
 *
 * Calibration of predicted probabilities p against targets y: the Brier
 * score and the expected calibration error over PRM_EVAL_CALIB_BINS bins of
 * width 0.1 ([0.9, 1] closed). Each (p, y) is entered twice, as (p, y) and
 * (1 - p, 1 - y), so the reliability curve does not depend on which
 * response a pair lists first (with hard labels every target would be 1
 * otherwise, and the ECE would only measure the mean confidence).
 */
#define CALIB_BINS PRM_EVAL_CALIB_BINS

static int calib_bin(double p) {
  int b = (int)(p * CALIB_BINS);
  return b < 0 ? 0 : (b >= CALIB_BINS ? CALIB_BINS - 1 : b);
}

/* One compared pair: its predicted probability p of the first winning, its
 * target y, and r_a - r_b. */
static void acc_compared(prm_eval_accum *a, double p, double y, double diff) {
  int b = calib_bin(p);
  a->calib_p[b] += p;
  a->calib_y[b] += y;
  b = calib_bin(1.0 - p);
  a->calib_p[b] += 1.0 - p;
  a->calib_y[b] += 1.0 - y;
  a->brier_sum += (p - y) * (p - y);
  a->n_compared++;
  a->margin_sum += diff;
  a->wins += diff > 0.0 ? 1.0 : (diff == 0.0 ? 0.5 : 0.0);
}

/* An empty accumulator of the given kind. */
static void acc_start(prm_eval_accum *a, int32_t kind) {
  const prm_eval_accum empty = PRM_EVAL_ACCUM_INIT;
  *a = empty;
  a->kind = kind;
}

void prmi_eval_accum_fill(const prm_eval_accum *a, prm_loss_stats *st) {
  const prm_loss_stats zero = PRM_LOSS_STATS_INIT;
  *st = zero;
  st->reward_mean = a->reward_mean;
  st->reward_std = sqrt(a->reward_m2 / (double)a->n_rewards);
  st->n_compared = a->n_compared;
  st->n_tied = a->n_tied;
  const double nc = (double)a->n_compared;
  if (a->n_compared > 0) {
    st->accuracy = a->wins / nc;
    st->margin_mean = a->margin_sum / nc;
    st->tie_prob_untied = a->tie_prob_untied_sum / nc;
    double ece = 0.0;
    for (int b = 0; b < CALIB_BINS; b++)
      ece += fabs(a->calib_p[b] - a->calib_y[b]);
    st->ece = ece / (2.0 * nc);
    st->brier = a->brier_sum / nc;
  }
  /* exact ranking: of groups, or of a pair batch's untied pairs */
  if (a->kind == PRM_EVAL_GROUPS)
    st->exact_rate = (double)a->n_exact / (double)a->n_units;
  else if (a->n_compared > 0)
    st->exact_rate = (double)a->n_exact / nc;
  if (a->n_tied > 0) st->tie_prob_tied = a->tie_prob_tied_sum / (double)a->n_tied;
}

/*
 * dst += src. Sums and counts add; the reward moments merge by Chan, Golub
 * and LeVeque's update (as prm_reward_moments_add), which keeps the spread
 * exact where E[r^2] - E[r]^2 would cancel. Into an empty accumulator the
 * moments are copied, so one batch accumulates to exactly its own.
 */
void prmi_eval_accum_merge(prm_eval_accum *dst, const prm_eval_accum *src) {
  if (dst->n_rewards == 0) {
    dst->reward_mean = src->reward_mean;
    dst->reward_m2 = src->reward_m2;
  } else {
    const double na = (double)dst->n_rewards, nb = (double)src->n_rewards, n = na + nb;
    const double delta = src->reward_mean - dst->reward_mean;
    dst->reward_mean += delta * (nb / n);
    dst->reward_m2 += src->reward_m2 + delta * delta * (na * nb / n);
  }
  dst->kind = src->kind;
  dst->n_rewards += src->n_rewards;
  dst->n_units += src->n_units;
  dst->loss_sum += src->loss_sum;
  dst->n_compared += src->n_compared;
  dst->wins += src->wins;
  dst->margin_sum += src->margin_sum;
  dst->brier_sum += src->brier_sum;
  for (int b = 0; b < CALIB_BINS; b++) {
    dst->calib_p[b] += src->calib_p[b];
    dst->calib_y[b] += src->calib_y[b];
  }
  dst->n_exact += src->n_exact;
  dst->n_tied += src->n_tied;
  dst->tie_prob_tied_sum += src->tie_prob_tied_sum;
  dst->tie_prob_untied_sum += src->tie_prob_untied_sum;
}

int prm_eval_accum_init(prm_eval_accum *acc, uint32_t version) {
  const prm_eval_accum d = PRM_EVAL_ACCUM_INIT;
  return prmi_init_struct(acc, &d, sizeof d, version, PRM_EVAL_ACCUM_VERSION,
                          "prm_eval_accum_init");
}

int prm_eval_accum_stats(const prm_eval_accum *acc, prm_loss_stats *out) {
  const char *fn = "prm_eval_accum_stats";
  int rc = prmi_check_version(NULL, acc, PRM_EVAL_ACCUM_VERSION, "prm_eval_accum_stats: acc");
  if (rc == PRM_OK)
    rc = prmi_check_version(NULL, out, PRM_LOSS_STATS_VERSION, "prm_eval_accum_stats: out");
  if (rc != PRM_OK) return rc;
  if (acc->kind == PRM_EVAL_EMPTY)
    return prmi_fail(NULL, PRM_ERR_STATE,
                     "%s: the accumulator is empty (prm_evaluate_accum or "
                     "prm_evaluate_groups_accum first)",
                     fn);
  if (acc->kind != PRM_EVAL_PAIRS && acc->kind != PRM_EVAL_GROUPS)
    return prmi_fail(NULL, PRM_ERR_INVALID, "%s: acc->kind = %d is no prm_eval_kind", fn,
                     (int)acc->kind);
  /* what every accumulated batch guarantees: rewards and units, a compared
   * pair per group, two rewards per pair */
  const int groups = acc->kind == PRM_EVAL_GROUPS;
  if (acc->n_units == 0 || acc->n_rewards < 2 * acc->n_units ||
      (groups && acc->n_compared < acc->n_units) ||
      (!groups &&
       (acc->n_rewards != 2 * acc->n_units || acc->n_compared + acc->n_tied != acc->n_units)))
    return prmi_fail(NULL, PRM_ERR_INVALID,
                     "%s: the accumulator's counts contradict each other (%llu %s, %llu "
                     "rewards, %llu compared, %llu tied): it was not filled by the library",
                     fn, (unsigned long long)acc->n_units, groups ? "groups" : "pairs",
                     (unsigned long long)acc->n_rewards, (unsigned long long)acc->n_compared,
                     (unsigned long long)acc->n_tied);
  prm_loss_stats st;
  prmi_eval_accum_fill(acc, &st);
  st.loss = acc->loss_sum / (double)acc->n_units;
  write_stats(out, &st);
  return PRM_OK;
}

/* ---- pair loss: validation --------------------------------------------------------------- */

/* NaN/Inf anywhere in an optional array. */
static int check_finite(const char *fn, const float *x, uint64_t n, const char *name) {
  if (x == NULL || prmi_all_finite(x, n)) return PRM_OK;
  uint64_t i = first_nonfinite(x, n);
  return prmi_fail(NULL, PRM_ERR_NONFINITE, "%s: %s[%" PRIu64 "] = %g is not finite", fn, name, i,
                   (double)x[i]);
}

static const char *tie_model_name(int32_t m) {
  return m == PRM_TIE_RAO_KUPPER ? "rao-kupper" : "davidson";
}

static int check_ties(const prm_loss_options *o, uint64_t n) {
  const char *fn = "prm_loss_bt";
  if (o->tie_model == PRM_TIE_NONE) {
    if (o->tie != NULL)
      return prmi_fail(NULL, PRM_ERR_INVALID, "%s: tie flags given without a tie model", fn);
    if (o->tie_param != 0.0)
      return prmi_fail(NULL, PRM_ERR_INVALID,
                       "%s: tie_param = %g given without a tie model (must be 0)", fn,
                       o->tie_param);
    return PRM_OK;
  }
  if (o->tie_model != PRM_TIE_RAO_KUPPER && o->tie_model != PRM_TIE_DAVIDSON)
    return prmi_fail(NULL, PRM_ERR_INVALID,
                     "%s: tie_model %d is unknown (PRM_TIE_NONE, PRM_TIE_RAO_KUPPER, "
                     "PRM_TIE_DAVIDSON)",
                     fn, (int)o->tie_model);
  const double lo = o->tie_model == PRM_TIE_RAO_KUPPER ? 1.0 : 0.0;
  const char *sym = o->tie_model == PRM_TIE_RAO_KUPPER ? "theta" : "nu";
  if (!isfinite(o->tie_param))
    return prmi_fail(NULL, PRM_ERR_NONFINITE, "%s: tie_param (%s) = %g is not finite", fn, sym,
                     o->tie_param);
  if (!(o->tie_param >= lo))
    return prmi_fail(NULL, PRM_ERR_INVALID, "%s: %s tie_param (%s) = %g must be >= %g", fn,
                     tie_model_name(o->tie_model), sym, o->tie_param, lo);
  if (o->tie == NULL) return PRM_OK;
  for (uint64_t i = 0; i < n; i++) {
    if (o->tie[i] > 1)
      return prmi_fail(NULL, PRM_ERR_INVALID, "%s: tie[%" PRIu64 "] = %u is not 0 or 1", fn, i,
                       (unsigned)o->tie[i]);
    if (o->tie[i] == 1 && o->tie_param == lo)
      return prmi_fail(NULL, PRM_ERR_INVALID,
                       "%s: tie[%" PRIu64 "] is a tie, but %s with %s = %g gives ties probability "
                       "0",
                       fn, i, tie_model_name(o->tie_model), sym, o->tie_param);
  }
  return PRM_OK;
}

int prmi_loss_check_args(const prm_loss_options *opts, const prm_loss_stats *stats, uint64_t n) {
  const char *fn = "prm_loss_bt";
  int rc;
  if (n == 0) return prmi_fail(NULL, PRM_ERR_SIZE, "%s: n_pairs is 0", fn);
  if (opts != NULL && (rc = prmi_check_version(NULL, opts, PRM_LOSS_OPTIONS_VERSION,
                                               "prm_loss_bt: opts")) != PRM_OK)
    return rc;
  if (stats != NULL && (rc = prmi_check_version(NULL, stats, PRM_LOSS_STATS_VERSION,
                                                "prm_loss_bt: stats")) != PRM_OK)
    return rc;
  if (opts == NULL) return PRM_OK;
  const prm_loss_options o = prmi_loss_options_read(opts);

  if ((rc = check_finite(fn, o.margin, n, "margin")) != PRM_OK) return rc;
  if ((rc = check_finite(fn, o.label, n, "label")) != PRM_OK) return rc;
  if ((rc = check_finite(fn, o.weight, n, "weight")) != PRM_OK) return rc;
  if (!isfinite(o.center_coef))
    return prmi_fail(NULL, PRM_ERR_NONFINITE, "%s: center_coef = %g is not finite", fn,
                     o.center_coef);

  if (o.label != NULL)
    for (uint64_t i = 0; i < n; i++)
      if (!(o.label[i] >= 0.0f && o.label[i] <= 1.0f))
        return prmi_fail(NULL, PRM_ERR_INVALID, "%s: label[%" PRIu64 "] = %g is outside [0, 1]",
                         fn, i, (double)o.label[i]);
  if (o.weight != NULL)
    for (uint64_t i = 0; i < n; i++)
      if (o.weight[i] < 0.0f)
        return prmi_fail(NULL, PRM_ERR_INVALID, "%s: weight[%" PRIu64 "] = %g is negative", fn, i,
                         (double)o.weight[i]);
  if (!(o.center_coef >= 0.0 && o.center_coef <= PRMI_MAX_CENTER_COEF))
    return prmi_fail(NULL, PRM_ERR_INVALID, "%s: center_coef = %g is outside [0, %g]", fn,
                     o.center_coef, PRMI_MAX_CENTER_COEF);
  return check_ties(&o, n);
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
  if ((rc = check_finite("prm_loss_bt", r_chosen, n, "r_chosen")) != PRM_OK) return rc;
  return check_finite("prm_loss_bt", r_rejected, n, "r_rejected");
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

/* ---- tie models ---------------------------------------------------------------------------- */

/*
 * A tie model with its parameter, and what depends on the parameter only:
 * Rao-Kupper: lp = log theta, lt2 = log(theta^2 - 1) (as log(theta - 1) +
 * log(theta + 1): exact near 1, no overflow for huge theta); Davidson:
 * lp = log nu. has_tie = 0 when the parameter gives ties probability 0.
 */
typedef struct tie_model {
  int32_t kind;
  int has_tie;
  double lp, lt2;
} tie_model;

static tie_model tie_model_of(const prm_loss_options *o) {
  tie_model t = {o->tie_model, 0, 0.0, 0.0};
  if (o->tie_model == PRM_TIE_RAO_KUPPER) {
    t.lp = log(o->tie_param);
    t.has_tie = o->tie_param > 1.0;
    if (t.has_tie) t.lt2 = log(o->tie_param - 1.0) + log(o->tie_param + 1.0);
  } else if (o->tie_model == PRM_TIE_DAVIDSON) {
    t.has_tie = o->tie_param > 0.0;
    if (t.has_tie) t.lp = log(o->tie_param);
  }
  return t;
}

/*
 * Log-probabilities of the three outcomes at z and their derivatives in z
 * (lt, gt only when the model has ties; p_tie = e^lt, 0 without):
 *
 *   Rao-Kupper:  lw = log s(z - lp), ll = log s(-z - lp), lt = lt2 + lw + ll
 *                gw = s(lp - z),     gl = -s(z + lp),     gt = gw + gl
 *   Davidson:    h = z/2, A = log(e^h + e^-h + nu) (= log(e^h + e^-h) for nu = 0)
 *                lw = h - A, ll = -h - A, lt = lp - A;  with P_w, P_l, P_t = e^lw, e^ll, e^lt
 *                gw = P_l + P_t/2, gl = -(P_w + P_t/2), gt = (P_l - P_w)/2
 *
 * Davidson's gradients use P_w + P_l + P_t = 1 to avoid 1 - P_w, which
 * would round the tiny gradient of a confident pair to 0.
 */
typedef struct tie_terms {
  double lw, ll, lt;
  double gw, gl, gt;
} tie_terms;

static tie_terms tie_terms_at(const tie_model *t, double z) {
  tie_terms r = {0, 0, 0, 0, 0, 0};
  if (t->kind == PRM_TIE_RAO_KUPPER) {
    r.lw = -softplus(t->lp - z);
    r.ll = -softplus(z + t->lp);
    r.gw = sigmoid(t->lp - z);
    r.gl = -sigmoid(z + t->lp);
    if (t->has_tie) {
      r.lt = t->lt2 + r.lw + r.ll;
      r.gt = r.gw + r.gl;
    }
    return r;
  }
  const double h = 0.5 * z;
  double A;
  if (t->has_tie) {
    const double m = fmax(fabs(h), t->lp);
    A = m + log(exp(h - m) + exp(-h - m) + exp(t->lp - m));
  } else {
    A = fabs(h) + log1p(exp(-2.0 * fabs(h)));
  }
  r.lw = h - A;
  r.ll = -h - A;
  const double pw = exp(r.lw), pl = exp(r.ll);
  const double pt = t->has_tie ? exp(t->lp - A) : 0.0;
  if (t->has_tie) r.lt = t->lp - A;
  r.gw = pl + 0.5 * pt;
  r.gl = -(pw + 0.5 * pt);
  r.gt = 0.5 * (pl - pw);
  return r;
}

/* ---- pair loss ------------------------------------------------------------------------------- */

/*
 * Statistics of a pair batch into a fresh accumulator (a second pass, only
 * when asked for; the loss is the caller's). The "compared" pairs are the
 * ones not labelled a tie; margins are ignored: the statistics describe the
 * model's predictions, s(r_c - r_r) for Bradley-Terry and Davidson
 * (P_w / (P_w + P_l) = s(2h)), s(lw - ll) for Rao-Kupper.
 */
static void pair_accum(const float *r_c, const float *r_r, uint64_t n_pairs,
                       const prm_loss_options *o, prm_eval_accum *acc) {
  const tie_model t = tie_model_of(o);
  acc_start(acc, PRM_EVAL_PAIRS);
  double sum_r = 0.0;
  for (uint64_t i = 0; i < n_pairs; i++) {
    const double a = (double)r_c[i], b = (double)r_r[i], diff = a - b;
    sum_r += a + b;
    double p_win = 0.0, p_tie = 0.0;
    if (t.kind == PRM_TIE_NONE) {
      p_win = sigmoid(diff);
    } else {
      const tie_terms tt = tie_terms_at(&t, diff);
      p_win = sigmoid(tt.lw - tt.ll);
      p_tie = t.has_tie ? exp(tt.lt) : 0.0;
    }
    if (o->tie != NULL && o->tie[i]) {
      acc->n_tied++;
      acc->tie_prob_tied_sum += p_tie;
      continue;
    }
    acc->tie_prob_untied_sum += p_tie;
    acc->n_exact += a > b;
    acc_compared(acc, p_win, o->label != NULL ? (double)o->label[i] : 1.0, diff);
  }
  /* The spread from squared deviations around the mean: far more accurate
   * than E[r^2] - E[r]^2 when rewards share a big offset. */
  acc->n_units = n_pairs;
  acc->n_rewards = 2 * n_pairs;
  const double mean = sum_r / (double)acc->n_rewards;
  double ss = 0.0;
  for (uint64_t i = 0; i < n_pairs; i++) {
    const double da = (double)r_c[i] - mean, db = (double)r_r[i] - mean;
    ss += da * da + db * db;
  }
  acc->reward_mean = mean;
  acc->reward_m2 = ss;
}

/* The statistics of one batch's accumulator with its loss, into the fields
 * of the caller's struct version. */
static void stats_of(const prm_eval_accum *acc, double loss, prm_loss_stats *out) {
  prm_loss_stats st;
  prmi_eval_accum_fill(acc, &st);
  st.loss = loss;
  write_stats(out, &st);
}

/*
 * Bradley-Terry term of one pair: returns l = -(p log s(z) + (1-p) log s(-z))
 * and, when g != NULL, dl/dz = s(z) - p. One exp and one log1p serve both:
 * with e = exp(-|z|) (in (0, 1], never overflows)
 *   softplus(+-z) = max(+-z, 0) + log1p(e)
 *   s(|z|) = 1 / (1 + e),  s(-|z|) = e / (1 + e)
 * and s(z) - p is evaluated as (1 - p) s(z) - p s(-z), which keeps the tiny
 * gradients of confidently-correct pairs (s(z) - 1 = -s(-z) ~ -e^-z) instead
 * of rounding them to 0 through 1 - s(z).
 */
static double bt_term(double z, double p, double *g) {
  const double e = exp(-fabs(z));
  const double lp = log1p(e);
  const double sp_pos = (z > 0.0 ? z : 0.0) + lp;  /* softplus(z)  = -log s(-z) */
  const double sp_neg = (z < 0.0 ? -z : 0.0) + lp; /* softplus(-z) = -log s(z) */
  if (g != NULL) {
    const double big = 1.0 / (1.0 + e); /* s(|z|) */
    const double small = e * big;       /* s(-|z|) */
    const double s_pos = z >= 0.0 ? big : small;
    const double s_neg = z >= 0.0 ? small : big;
    *g = (1.0 - p) * s_pos - p * s_neg;
  }
  return p * sp_neg + (1.0 - p) * sp_pos; /* both terms >= 0 */
}

/* The term of one pair under a tie model: -lt for a tie, else
 * -(p lw + (1 - p) ll); dl/dz into *g. */
static double tie_term(const tie_model *t, double z, int tied, double p, double *g) {
  const tie_terms tt = tie_terms_at(t, z);
  if (tied) {
    *g = -tt.gt;
    return -tt.lt;
  }
  *g = -(p * tt.gw + (1.0 - p) * tt.gl);
  return -(p * tt.lw + (1.0 - p) * tt.ll);
}

/*
 * d_chosen and d_rejected must not alias r_chosen, r_rejected or the option
 * arrays: gradients are written in the first pass and the scores are read
 * again by the others.
 */
int prm_loss_bt(const float *r_chosen, const float *r_rejected, uint64_t n_pairs,
                const prm_loss_options *opts, double *loss, prm_loss_stats *stats, float *d_chosen,
                float *d_rejected) {
  int rc = validate(r_chosen, r_rejected, n_pairs, opts, stats, d_chosen, d_rejected);
  if (rc != PRM_OK) return rc;
  const prm_loss_options o = prmi_loss_options_read(opts);
  const tie_model t = tie_model_of(&o);
  const double c = o.center_coef;
  const double inv_n = 1.0 / (double)n_pairs;

  double sum_wl = 0.0; /* sum_i w_i l_i */
  double sum_sq = 0.0; /* sum_i (r_c + r_r)^2 */
  for (uint64_t i = 0; i < n_pairs; i++) {
    const double a = (double)r_chosen[i], b = (double)r_rejected[i];
    const double diff = a - b; /* exact enough: |diff| <= 2 FLT_MAX */
    const double z = o.margin != NULL ? diff - (double)o.margin[i] : diff;
    const double p = o.label != NULL ? (double)o.label[i] : 1.0;
    const double w = o.weight != NULL ? (double)o.weight[i] : 1.0;
    double g = 0.0; /* dl_i/dz_i */
    const double l = t.kind == PRM_TIE_NONE
                         ? bt_term(z, p, d_chosen != NULL ? &g : NULL)
                         : tie_term(&t, z, o.tie != NULL && o.tie[i], p, &g);
    sum_wl += w * l;
    const double sum_ab = a + b;
    sum_sq += sum_ab * sum_ab;
    if (d_chosen != NULL) {
      const double g_pair = w * g * inv_n;
      const double g_center = 2.0 * c * sum_ab * inv_n;
      d_chosen[i] = to_float_sat(g_pair + g_center);
      d_rejected[i] = to_float_sat(g_center - g_pair);
    }
  }
  const double value = sum_wl * inv_n + c * (sum_sq * inv_n);
  if (loss != NULL) *loss = value;
  if (stats != NULL) {
    prm_eval_accum acc;
    pair_accum(r_chosen, r_rejected, n_pairs, &o, &acc);
    stats_of(&acc, value, stats);
  }
  return PRM_OK;
}

int prmi_loss_bt_accum(const float *r_chosen, const float *r_rejected, uint64_t n_pairs,
                       const prm_loss_options *opts, prm_eval_accum *batch) {
  double value = 0.0;
  int rc = prm_loss_bt(r_chosen, r_rejected, n_pairs, opts, &value, NULL, NULL, NULL);
  if (rc != PRM_OK) return rc;
  const prm_loss_options o = prmi_loss_options_read(opts);
  pair_accum(r_chosen, r_rejected, n_pairs, &o, batch);
  batch->loss_sum = value * (double)n_pairs;
  return PRM_OK;
}

/* ---- K-wise rankings ------------------------------------------------------------------------ */

/*
 * Everything of a group batch that can be checked without the scores: the
 * options, the stats version and the group sizes against the row count.
 */
int prmi_rank_check_args(const int32_t *group_sizes, uint64_t n_groups, uint64_t n_rows,
                         const prm_rank_options *opts, const prm_loss_stats *stats) {
  const char *fn = "prm_loss_rank";
  int rc;
  if (group_sizes == NULL) return prmi_fail(NULL, PRM_ERR_NULL, "%s: group_sizes is NULL", fn);
  if (n_groups == 0) return prmi_fail(NULL, PRM_ERR_SIZE, "%s: n_groups is 0", fn);
  if (opts != NULL && (rc = prmi_check_version(NULL, opts, PRM_RANK_OPTIONS_VERSION,
                                               "prm_loss_rank: opts")) != PRM_OK)
    return rc;
  if (stats != NULL && (rc = prmi_check_version(NULL, stats, PRM_LOSS_STATS_VERSION,
                                                "prm_loss_rank: stats")) != PRM_OK)
    return rc;
  uint64_t rows = 0;
  for (uint64_t g = 0; g < n_groups; g++) {
    if (group_sizes[g] < 2)
      return prmi_fail(NULL, PRM_ERR_SIZE,
                       "%s: group_sizes[%" PRIu64 "] = %d; a group ranks at least 2 responses",
                       fn, g, (int)group_sizes[g]);
    rows += (uint64_t)group_sizes[g]; /* < 2^31 per group: cannot wrap before the check */
    if (rows > n_rows)
      return prmi_fail(NULL, PRM_ERR_SIZE,
                       "%s: the first %" PRIu64 " groups hold %" PRIu64 " rows, more than the "
                       "%" PRIu64 " scores",
                       fn, g + 1, rows, n_rows);
  }
  if (rows != n_rows)
    return prmi_fail(NULL, PRM_ERR_SIZE,
                     "%s: the groups hold %" PRIu64 " rows but there are %" PRIu64 " scores", fn,
                     rows, n_rows);
  if (opts == NULL) return PRM_OK;
  if (opts->loss != PRM_RANK_PAIRWISE && opts->loss != PRM_RANK_PLACKETT_LUCE)
    return prmi_fail(NULL, PRM_ERR_INVALID,
                     "%s: loss %d is unknown (PRM_RANK_PAIRWISE, PRM_RANK_PLACKETT_LUCE)", fn,
                     (int)opts->loss);
  if ((rc = check_finite(fn, opts->weight, n_groups, "weight")) != PRM_OK) return rc;
  if (opts->weight != NULL)
    for (uint64_t g = 0; g < n_groups; g++)
      if (opts->weight[g] < 0.0f)
        return prmi_fail(NULL, PRM_ERR_INVALID, "%s: weight[%" PRIu64 "] = %g is negative", fn, g,
                         (double)opts->weight[g]);
  return PRM_OK;
}

/*
 * InstructGPT's group term, l = (1/C) sum_{a<b} softplus(r_b - r_a) with
 * C = K(K-1)/2, and (d != NULL) scale * dl/dr_j written to d[j]. Each row's
 * gradient is summed in double over its K-1 pairs before the one rounding:
 *   dl/dr_j = (1/C) [ sum_{a<j} s(r_j - r_a) - sum_{b>j} s(r_b - r_j) ]
 */
static double rank_pairwise(const float *r, int32_t K, double scale, float *d) {
  const double inv_c = 2.0 / ((double)K * (double)(K - 1));
  double l = 0.0;
  for (int32_t a = 0; a < K; a++)
    for (int32_t b = a + 1; b < K; b++)
      l += softplus((double)r[b] - (double)r[a]);
  if (d != NULL)
    for (int32_t j = 0; j < K; j++) {
      double g = 0.0;
      for (int32_t a = 0; a < j; a++)
        g += sigmoid((double)r[j] - (double)r[a]);
      for (int32_t b = j + 1; b < K; b++)
        g -= sigmoid((double)r[b] - (double)r[j]);
      d[j] = (float)(scale * inv_c * g);
    }
  return inv_c * l;
}

/*
 * log sum_{i >= k} e^{r_i} (k < K) in split form m + ls: m is the largest
 * score (exact) and ls = log sum e^{r_i - m} in [0, log K]. Kept apart because
 * with scores near 1e30 the sum m + ls would round ls away (the ulp of 1e30 is
 * 1e14), while every use below needs differences like L - r_j, which the
 * split form gives to full precision as (m - r_j) + ls.
 */
typedef struct split_lse {
  double m, ls;
} split_lse;

static split_lse suffix_lse(const float *r, int32_t k, int32_t K) {
  double m = (double)r[k];
  for (int32_t i = k + 1; i < K; i++)
    m = fmax(m, (double)r[i]);
  double s = 0.0;
  for (int32_t i = k; i < K; i++)
    s += exp((double)r[i] - m);
  const split_lse out = {m, log(s)};
  return out;
}

/*
 * Plackett-Luce's group term, with L_k = log sum_{i>=k} e^{r_i}:
 *   l = (1/(K-1)) sum_{k<K-1} (L_k - r_k),   L_k - r_k = softplus(L_{k+1} - r_k)
 *   dl/dr_j = (1/(K-1)) [ sum_{k<=min(j,K-2)} e^{r_j - L_k} - [j <= K-2] ]
 *           = (1/(K-1)) [ e^{r_j + T_{j-1}} - [j <= K-2] s(L_{j+1} - r_j) ]
 * where T_j = log sum_{k<=j} e^{-L_k} (empty for j < 0) and
 * 1 - e^{r_j - L_j} = s(L_{j+1} - r_j) keeps the small gradient of a
 * dominant choice exact. L and T are both kept in split form (a score-sized
 * exponent plus a small log; see split_lse), T as Mt + log St with Mt the
 * largest -m_k so far, so that r_j + T is (r_j + Mt) + log St with the large
 * parts cancelling exactly. Each L_k is summed afresh (O(K^2), like the
 * pairwise loss) so that no scratch memory is needed.
 */
static double rank_plackett_luce(const float *r, int32_t K, double scale, float *d) {
  const double inv_k = 1.0 / (double)(K - 1);
  double l = 0.0;
  split_lse L = suffix_lse(r, 0, K); /* L_j */
  double Mt = 0.0, St = 0.0;         /* T_{j-1} = Mt + log St; St = 0: empty */
  for (int32_t j = 0; j < K; j++) {
    const double rj = (double)r[j];
    double g = St > 0.0 ? exp((rj + Mt) + log(St)) : 0.0;
    if (j <= K - 2) {
      const split_lse next = suffix_lse(r, j + 1, K);
      const double u = (next.m - rj) + next.ls; /* L_{j+1} - r_j */
      l += softplus(u);
      g -= sigmoid(u);
      /* T_j: add e^{-L_j} = e^{a - L.ls} with a = -L.m */
      const double a = -L.m;
      if (St == 0.0) {
        Mt = a;
        St = exp(-L.ls);
      } else if (a > Mt) {
        St = St * exp(Mt - a) + exp(-L.ls);
        Mt = a;
      } else {
        St += exp((a - Mt) - L.ls);
      }
      L = next;
    }
    if (d != NULL) d[j] = (float)(scale * inv_k * g);
  }
  return inv_k * l;
}

/* Statistics over every implied pair of every group (see prm_loss_stats),
 * into a fresh accumulator. */
static void rank_accum(const float *scores, uint64_t n_rows, const int32_t *sizes, uint64_t G,
                       prm_eval_accum *acc) {
  acc_start(acc, PRM_EVAL_GROUPS);
  double sum_r = 0.0;
  const float *r = scores;
  for (uint64_t g = 0; g < G; r += sizes[g], g++) {
    const int32_t K = sizes[g];
    int ordered = 1;
    for (int32_t a = 0; a < K; a++) {
      sum_r += (double)r[a];
      if (a + 1 < K && !(r[a] > r[a + 1])) ordered = 0;
      for (int32_t b = a + 1; b < K; b++) {
        const double diff = (double)r[a] - (double)r[b];
        acc_compared(acc, sigmoid(diff), 1.0, diff);
      }
    }
    acc->n_exact += (uint64_t)ordered;
  }
  acc->n_units = G;
  acc->n_rewards = n_rows;
  const double mean = sum_r / (double)n_rows;
  double ss = 0.0;
  for (uint64_t i = 0; i < n_rows; i++)
    ss += ((double)scores[i] - mean) * ((double)scores[i] - mean);
  acc->reward_mean = mean;
  acc->reward_m2 = ss;
}

int prm_loss_rank(const float *scores, uint64_t n_scores, const int32_t *group_sizes,
                  uint64_t n_groups, const prm_rank_options *opts, double *loss,
                  prm_loss_stats *stats, float *d_scores) {
  if (scores == NULL) return prmi_fail(NULL, PRM_ERR_NULL, "prm_loss_rank: scores is NULL");
  int rc = prmi_rank_check_args(group_sizes, n_groups, n_scores, opts, stats);
  if (rc != PRM_OK) return rc;
  if ((rc = check_finite("prm_loss_rank", scores, n_scores, "scores")) != PRM_OK) return rc;

  const int pl = opts != NULL && opts->loss == PRM_RANK_PLACKETT_LUCE;
  const float *weight = opts != NULL ? opts->weight : NULL;
  const double inv_g = 1.0 / (double)n_groups;
  double sum_wl = 0.0;
  uint64_t off = 0;
  for (uint64_t g = 0; g < n_groups; off += (uint64_t)group_sizes[g], g++) {
    const double w = weight != NULL ? (double)weight[g] : 1.0;
    float *d = d_scores != NULL ? d_scores + off : NULL;
    const double l = pl ? rank_plackett_luce(scores + off, group_sizes[g], w * inv_g, d)
                        : rank_pairwise(scores + off, group_sizes[g], w * inv_g, d);
    sum_wl += w * l;
  }
  const double value = sum_wl * inv_g;
  if (loss != NULL) *loss = value;
  if (stats != NULL) {
    prm_eval_accum acc;
    rank_accum(scores, n_scores, group_sizes, n_groups, &acc);
    stats_of(&acc, value, stats);
  }
  return PRM_OK;
}

int prmi_loss_rank_accum(const float *scores, uint64_t n_scores, const int32_t *group_sizes,
                         uint64_t n_groups, const prm_rank_options *opts, prm_eval_accum *batch) {
  double value = 0.0;
  int rc = prm_loss_rank(scores, n_scores, group_sizes, n_groups, opts, &value, NULL, NULL);
  if (rc != PRM_OK) return rc;
  rank_accum(scores, n_scores, group_sizes, n_groups, batch);
  batch->loss_sum = value * (double)n_groups;
  return PRM_OK;
}
