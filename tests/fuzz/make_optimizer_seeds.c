/*
 * make_optimizer_seeds.c - write the seeds of fuzz_optimizer (tests/fuzz/seeds_optimizer):
 * states of the two models fuzz_optimizer.c builds (AdamW with clipping, cosine
 * and accumulation 3 after 4 step calls; SGD with Nesterov momentum after one
 * step; a fresh Adam), each prefixed with the model selector byte.
 *   build-fuzz/tests/make_optimizer_seeds tests/fuzz/seeds_optimizer
 */
#include "optimizer_models.h"
#include "prefrm.h"
#include <stdio.h>
#include <stdlib.h>

static prm_model *mk(int k) {
  prm_model *m = fuzz_optimizer_model_new((unsigned)k);
  if (m == NULL) exit(1);
  return m;
}

static void put(const char *dir, const char *name, int k, prm_optimizer *opt) {
  size_t n;
  prm_optimizer_save_buffer(opt, NULL, 0, &n);
  unsigned char *b = malloc(n);
  prm_optimizer_save_buffer(opt, b, n, &n);
  char p[512];
  snprintf(p, sizeof p, "%s/%s", dir, name);
  FILE *f = fopen(p, "wb");
  unsigned char sel = (unsigned char)k;
  fwrite(&sel, 1, 1, f);
  fwrite(b, 1, n, f);
  fclose(f);
  free(b);
}
int main(int argc, char **argv) {
  for (int k = 0; k < 2; k++) {
    prm_model *m = mk(k);
    prm_ctx_options co = PRM_CTX_OPTIONS_INIT;
    co.max_rows = 2;
    co.max_len = k == 0 ? 4 : 0;
    prm_ctx *c;
    prm_ctx_new(&c, m, &co);
    prm_optimizer_options oo = PRM_OPTIMIZER_OPTIONS_INIT;
    oo.max_grad_norm = 1.0;
    oo.schedule = PRM_SCHED_COSINE;
    oo.warmup_steps = 2;
    oo.total_steps = 10;
    oo.accumulation_steps = 3;
    prm_optimizer *a;
    if (prm_optimizer_new(&a, m, &oo)) return 1;
    uint64_t n;
    float *g = prm_ctx_grads(c, &n);
    for (int s = 0; s < 4; s++) {
      for (uint64_t i = 0; i < n; i++)
        g[i] = 0.01f * (float)((i + s) % 7);
      prm_optimizer_step(a, c);
    }
    put(argv[1], k ? "mlp_adamw" : "gpt2_adamw", k, a);
    oo = (prm_optimizer_options)PRM_OPTIMIZER_OPTIONS_INIT;
    oo.algorithm = PRM_OPT_SGD;
    oo.momentum = 0.9;
    oo.nesterov = 1;
    prm_optimizer *b;
    prm_optimizer_new(&b, m, &oo);
    prm_optimizer_step(b, c);
    put(argv[1], k ? "mlp_sgd" : "gpt2_sgd", k, b);
    oo = (prm_optimizer_options)PRM_OPTIMIZER_OPTIONS_INIT;
    oo.algorithm = PRM_OPT_ADAM;
    prm_optimizer *d;
    prm_optimizer_new(&d, m, &oo);
    put(argv[1], k ? "mlp_adam_fresh" : "gpt2_adam_fresh", k, d);
    prm_optimizer_free(a);
    prm_optimizer_free(b);
    prm_optimizer_free(d);
    prm_ctx_free(c);
    prm_model_free(m);
  }
  return 0;
}
