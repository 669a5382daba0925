/*
 * compare_params.c - do saved models hold the same parameters as a reference?
 *
 *   mpi_compare_params RTOL REF.safetensors FILE.safetensors...
 *
 * Loads every file with prm_model_load and compares each FILE's flat
 * parameter arena with REF's, element by element:
 *
 *   rel_i = |p_i - ref_i| / (|ref_i| + rms_t)
 *
 * where rms_t is the RMS of REF's tensor t holding parameter i: the relative
 * difference, judged at the scale of the tensor for a parameter that sits
 * near zero. The floor matters for AdamW: its update divides each gradient
 * element by its own running magnitude, so where a gradient element is a sum
 * that nearly cancels, a rounding difference in the sum (the ranks add their
 * shards in another order than one process) moves the parameter by a few
 * lr * 1e-4 whatever its size; relative to a parameter that happens to be
 * 1e-5 that is large, relative to the tensor it is not.
 *
 * Prints, per FILE, the largest rel_i (and where), the largest absolute
 * difference and the relative L2 difference ||p - ref|| / ||ref||. Exit
 * status 0 when every FILE has the same layout as REF and max rel_i <= RTOL,
 * 1 when not, 2 on a usage or load error.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <prefrm.h>

static prm_model *load(const char *path) {
  prm_model *m = NULL;
  int rc = prm_model_load(&m, path);
  if (rc != PRM_OK)
    fprintf(stderr, "compare_params: cannot load %s: %s (%s)\n", path, prm_status_string(rc),
            prm_last_errmsg());
  return m;
}

/* Index of the tensor holding flat parameter `i` (tensors lie back to back in arena order). */
static uint32_t tensor_of(const prm_model *m, uint64_t i) {
  uint32_t best = 0;
  for (uint32_t t = 0; t < prm_model_num_tensors(m); t++) {
    uint64_t off = 0;
    if (prm_model_tensor_info(m, t, NULL, &off, NULL, NULL) == PRM_OK && off <= i) best = t;
  }
  return best;
}

int main(int argc, char **argv) {
  char *end = NULL;
  const double rtol = argc > 1 ? strtod(argv[1], &end) : 0.0;
  if (argc < 4 || end == argv[1] || *end != '\0' || !(rtol >= 0.0)) {
    fprintf(stderr, "usage: mpi_compare_params RTOL REF.safetensors FILE.safetensors...\n");
    return 2;
  }
  prm_model *ref = load(argv[2]);
  if (ref == NULL) return 2;
  uint64_t n = 0;
  const float *r = prm_model_params(ref, &n);
  double ss = 0.0;
  for (uint64_t i = 0; i < n; i++)
    ss += (double)r[i] * r[i];
  /* rms[i]: the RMS of the tensor that holds parameter i */
  double *rms = malloc((n ? n : 1) * sizeof *rms);
  if (rms == NULL) return 2;
  for (uint32_t t = 0; t < prm_model_num_tensors(ref); t++) {
    uint64_t off = 0, stop = n;
    prm_model_tensor_info(ref, t, NULL, &off, NULL, NULL);
    if (t + 1 < prm_model_num_tensors(ref))
      prm_model_tensor_info(ref, t + 1, NULL, &stop, NULL, NULL);
    double tss = 0.0;
    for (uint64_t i = off; i < stop; i++)
      tss += (double)r[i] * r[i];
    for (uint64_t i = off; i < stop; i++)
      rms[i] = sqrt(tss / (double)(stop - off));
  }

  int worst = 0;
  for (int f = 3; f < argc; f++) {
    prm_model *m = load(argv[f]);
    if (m == NULL) {
      worst = 2;
      continue;
    }
    uint64_t nm = 0;
    const float *p = prm_model_params(m, &nm);
    if (nm != n || prm_model_arch(m) != prm_model_arch(ref) ||
        prm_model_num_tensors(m) != prm_model_num_tensors(ref)) {
      printf("%s: not the same model as %s (%llu vs %llu parameters)\n", argv[f], argv[2],
             (unsigned long long)nm, (unsigned long long)n);
      if (worst < 1) worst = 1;
      prm_model_free(m);
      continue;
    }
    double max_rel = 0.0, max_abs = 0.0, dd = 0.0;
    uint64_t at = 0;
    for (uint64_t i = 0; i < n; i++) {
      const double d = fabs((double)p[i] - (double)r[i]);
      const double scale = fabs((double)r[i]) + rms[i];
      const double rel = scale > 0.0 ? d / scale : (d > 0.0 ? INFINITY : 0.0);
      dd += d * d;
      if (d > max_abs) max_abs = d;
      if (rel > max_rel) max_rel = rel, at = i;
    }
    const int ok = max_rel <= rtol;
    const char *name = "?";
    prm_model_tensor_info(ref, tensor_of(ref, at), &name, NULL, NULL, NULL);
    printf("%s vs %s: %llu parameters, max relative difference %.3e (parameter %llu in %s: %.9g vs "
           "%.9g), max absolute %.3e, relative L2 %.3e: %s (rtol %.1e)\n",
           argv[f], argv[2], (unsigned long long)n, max_rel, (unsigned long long)at, name,
           (double)p[at], (double)r[at], max_abs, ss > 0 ? sqrt(dd / ss) : 0.0, ok ? "OK" : "FAIL",
           rtol);
    if (!ok && worst < 1) worst = 1;
    prm_model_free(m);
  }
  free(rms);
  prm_model_free(ref);
  return worst;
}
