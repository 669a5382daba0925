/*
 * blas.c - the one place that talks to CBLAS. Everything else calls these
 * row-major wrappers, so a different BLAS (or a fallback kernel) only ever
 * changes this file. The header is chosen at configure time
 * (PRM_CBLAS_HEADER: cblas.h, cblas-netlib.h, mkl_cblas.h, ...).
 */
#include PRM_CBLAS_HEADER

#include "internal.h"

/* Sizes were validated against PRMI_MAX_DIM (2^30) by the callers, so every
 * dimension and leading dimension fits in the BLAS int. */
void prmi_gemm(int trans_a, int trans_b, uint64_t m, uint64_t n, uint64_t k, float alpha,
               const float *a, uint64_t lda, const float *b, uint64_t ldb, float beta, float *c,
               uint64_t ldc) {
  cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans,
              trans_b ? CblasTrans : CblasNoTrans, (int)m, (int)n, (int)k, alpha, a, (int)lda, b,
              (int)ldb, beta, c, (int)ldc);
}

void prmi_gemv(int trans, uint64_t m, uint64_t n, float alpha, const float *a, uint64_t lda,
               const float *x, float beta, float *y) {
  cblas_sgemv(CblasRowMajor, trans ? CblasTrans : CblasNoTrans, (int)m, (int)n, alpha, a,
              (int)lda, x, 1, beta, y, 1);
}
