/*
 * lanes.h - reductions that vectorise without reassociating anything
 * (shared by gpt2.c and llama.c; static inline, so each cloned kernel that
 * uses them gets its own vector width).
 *
 * The loops that call these are compiled for AVX-512, AVX2 and the baseline
 * ISA (PRMI_TARGET_CLONES, internal.h) and give the same bits in every
 * clone: elementwise arithmetic, and reductions in LANES fixed partial sums
 * (lane k takes the elements j = k mod LANES, the lanes are then added in a
 * fixed tree), so that the compiler may put the lanes in one vector without
 * reassociating anything. Sums run in 8 lanes instead of one chain: a
 * single float accumulator is latency-bound (one add per 4 cycles), which
 * made the softmax row sums the slowest part of the attention.
 */
#ifndef PRM_LANES_H
#define PRM_LANES_H

#include <stdint.h>

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

/* sum of (x[j] - c)^2 over x[0..n) */
static inline float sqdev_n(const float *x, float c, uint64_t n) {
  float acc[LANES] = {0};
  uint64_t j = 0;
  for (; j + LANES <= n; j += LANES)
    for (int k = 0; k < LANES; k++) {
      const float d = x[j + k] - c;
      acc[k] += d * d;
    }
  for (int k = 0; j < n; j++, k++) {
    const float d = x[j] - c;
    acc[k] += d * d;
  }
  return lanes_sum(acc);
}

#endif /* PRM_LANES_H */
