/*
 * activations.c - the hidden-layer activations (relu, tanh, gelu-tanh).
 *
 * Inference needs act(z); training also needs act'(z) for the backward. Both
 * come out of one pass over z, so the backward does no transcendental work
 * (dz = da * act'(z)). The value is computed by the same inline code in both
 * entry points, so inference and training scores are bit-identical.
 *
 * No libm: tanh and the gelu both reduce to exp, and a scalar libm call per
 * element (glibc tanhf, about 20 ns) would keep the loops from vectorising.
 * exp is computed here (Cody-Waite range reduction, a degree-6 polynomial,
 * 2^n put together in the exponent bits), branch-free so that GCC vectorises
 * the loops; PRMI_TARGET_CLONES then runs them 16 or 8 lanes wide.
 *
 * Formulas, with e = exp(-2|u|) or exp(-2u), r = 1/(1+e), all free of
 * cancellation:
 *   tanh(u)         = sign(u) (1 - e) r       for |u| >= 0.625
 *                   = u + u^3 Q(u^2)          below (1 - e cancels there)
 *   tanh'(u)        = 1 - tanh^2 = 4 e r^2
 *   gelu(x)         = 0.5 x (1 + tanh u) = x s,  u = k (x + c x^3),
 *                     s = sigmoid(2u) = 1/(1 + e), e = exp(-2u)
 *   gelu'(x)        = s + 2 x u' s (1 - s),  1 - s = e s,  u' = k (1 + 3 c x^2)
 * Accuracy against double (every third float; exp on [-80, 80], the rest on
 * [-20, 20]): exp <= 0.98 ulp, tanh <= 2.0 ulp, gelu <= 5.2e-7 absolute
 * (1.1 ulp), both derivatives <= 2.6e-7 absolute. docs/dev/benchmarks.md has
 * the comparison with the libm formula this replaced.
 */
#include <math.h>
#include <string.h>

#include "internal.h"

#define GELU_K 0.7978845608028654f /* sqrt(2/pi) */
#define GELU_C 0.044715f

/*
 * exp's argument is clipped to [-80, 80]. Every caller's result is already
 * saturated there in float (tanh = +-1, sigmoid = 0 or 1 to within 2e-35),
 * and the clip keeps e, 1/(1+e) and e/(1+e) normal numbers: no Inf * 0 and no
 * denormal slow path. NaN passes through (both comparisons are false).
 */
#define EXP_CLIP 80.0f
#define LOG2E 1.44269504088896341f
#define LN2_HI 0.693145751953125f /* 15 significant bits: n * LN2_HI is exact */
#define LN2_LO 1.42860682030941723e-6f
#define ROUND_MAGIC 12582912.0f /* 1.5 * 2^23: x + it rounds x to an integer */

/* Minimax fit of (exp(r) - 1 - r) / r^2 on |r| <= 0.354 (relative error of
 * exp 3.5e-9 before rounding). */
#define EXP_C2 4.999999404e-01f
#define EXP_C3 1.666650921e-01f
#define EXP_C4 4.166853055e-02f
#define EXP_C5 8.370140567e-03f
#define EXP_C6 1.381165115e-03f

/* Minimax fit of (tanh(u) - u) / u^3 as a polynomial in u^2 on |u| <= 0.625
 * (relative error of tanh 4.4e-9 before rounding). */
#define TANH_SMALL 0.625f
#define TANH_C3 -3.333328068e-01f
#define TANH_C5 1.333144158e-01f
#define TANH_C7 -5.373971537e-02f
#define TANH_C9 2.063908614e-02f
#define TANH_C11 -5.704986397e-03f

/* exp(x) for x clipped to [-EXP_CLIP, EXP_CLIP], within 2 ulp. */
static inline float exp_clipped(float x) {
  x = x < -EXP_CLIP ? -EXP_CLIP : x;
  x = x > EXP_CLIP ? EXP_CLIP : x;
  /* x = n ln2 + r, |r| <= ln2/2 (+ a rounding). Adding ROUND_MAGIC leaves n
   * in the low mantissa bits of kf, so 2^n is built with integer operations
   * only -- no float-to-int conversion, which would be undefined for NaN. */
  float kf = x * LOG2E + ROUND_MAGIC;
  float nf = kf - ROUND_MAGIC;
  uint32_t kb;
  memcpy(&kb, &kf, sizeof kb);
  uint32_t sb = (kb + 127u) << 23; /* (n + 127) << 23: the bits of 2^n */
  float scale;
  memcpy(&scale, &sb, sizeof scale);
  float r = (x - nf * LN2_HI) - nf * LN2_LO;
  float p = EXP_C2 + r * (EXP_C3 + r * (EXP_C4 + r * (EXP_C5 + r * EXP_C6)));
  return (1.0f + (r + (r * r) * p)) * scale;
}

/* tanh(u); *e = exp(-2|u|) and *r = 1/(1+e) for the derivative 4 e r^2. */
static inline float tanh_parts(float u, float *e, float *r) {
  float au = fabsf(u);
  *e = exp_clipped(-2.0f * au);
  *r = 1.0f / (1.0f + *e);
  float big = (1.0f - *e) * *r;
  float u2 = u * u;
  float q = TANH_C3 + u2 * (TANH_C5 + u2 * (TANH_C7 + u2 * (TANH_C9 + u2 * TANH_C11)));
  float small = au + au * (u2 * q);
  return copysignf(au < TANH_SMALL ? small : big, u);
}

/* sigmoid(2u) = 0.5 (1 + tanh u) with u = k (x + c x^3); *e = exp(-2u). */
static inline float gelu_sigmoid(float x, float *e) {
  float u = GELU_K * (x + GELU_C * x * x * x);
  *e = exp_clipped(-2.0f * u);
  return 1.0f / (1.0f + *e);
}

PRMI_TARGET_CLONES
static void prmi_act_forward_kernel(int32_t act, float *za, uint64_t n) {
  switch (act) {
  case PRM_ACT_RELU:
    for (uint64_t i = 0; i < n; i++)
      za[i] = za[i] > 0.0f ? za[i] : 0.0f;
    break;
  case PRM_ACT_TANH:
    for (uint64_t i = 0; i < n; i++) {
      float e, r;
      za[i] = tanh_parts(za[i], &e, &r);
    }
    break;
  default: /* PRM_ACT_GELU_TANH */
    for (uint64_t i = 0; i < n; i++) {
      float e, x = za[i];
      za[i] = x * gelu_sigmoid(x, &e);
    }
    break;
  }
}

PRMI_TARGET_CLONES
static void prmi_act_forward_grad_kernel(int32_t act, float *restrict za, float *restrict dact,
                                         uint64_t n) {
  switch (act) {
  case PRM_ACT_RELU:
    for (uint64_t i = 0; i < n; i++) {
      float z = za[i];
      za[i] = z > 0.0f ? z : 0.0f;
      dact[i] = z > 0.0f ? 1.0f : 0.0f;
    }
    break;
  case PRM_ACT_TANH:
    for (uint64_t i = 0; i < n; i++) {
      float e, r;
      za[i] = tanh_parts(za[i], &e, &r);
      dact[i] = (4.0f * e) * (r * r);
    }
    break;
  default: /* PRM_ACT_GELU_TANH */
    for (uint64_t i = 0; i < n; i++) {
      float e, x = za[i];
      float s = gelu_sigmoid(x, &e);
      float du = GELU_K * (1.0f + 3.0f * GELU_C * x * x);
      za[i] = x * s;
      dact[i] = s * (1.0f + ((2.0f * x) * du) * (e * s));
    }
    break;
  }
}

/* x[i] = exp(x[i] - shift) for softmax numerators (lib/gpt2.c). Arguments
 * below -80 give exp(-80) instead of a smaller number: negligible against
 * the row maximum's exp(0) = 1 in every sum they enter. */
PRMI_TARGET_CLONES
static void prmi_exp_shifted_kernel(float *x, uint64_t n, float shift) {
  for (uint64_t i = 0; i < n; i++)
    x[i] = exp_clipped(x[i] - shift);
}

/* The entry points other files call: plain functions around the static
 * clones (see PRMI_TARGET_CLONES in internal.h for why). */
void prmi_act_forward(int32_t act, float *za, uint64_t n) { prmi_act_forward_kernel(act, za, n); }

void prmi_act_forward_grad(int32_t act, float *za, float *dact, uint64_t n) {
  prmi_act_forward_grad_kernel(act, za, dact, n);
}

void prmi_exp_shifted(float *x, uint64_t n, float shift) { prmi_exp_shifted_kernel(x, n, shift); }
