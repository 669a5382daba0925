/*
 * optimizer_models.h - the two models whose optimizer states fuzz_optimizer
 * loads and make_optimizer_seeds writes (one definition for both): k = 0 a
 * small gpt2 with its first block frozen, k = 1 a small mlp. NULL on failure.
 */
#ifndef PRM_FUZZ_OPTIMIZER_MODELS_H
#define PRM_FUZZ_OPTIMIZER_MODELS_H

#include "prefrm.h"

static prm_model *fuzz_optimizer_model_new(unsigned k) {
  prm_model_options o = PRM_MODEL_OPTIONS_INIT;
  if (k == 0) {
    o.arch = PRM_ARCH_GPT2;
    o.vocab_size = 8;
    o.n_ctx = 4;
    o.n_embd = 4;
    o.n_layer = 2;
    o.n_head = 2;
  } else {
    o.arch = PRM_ARCH_MLP;
    o.input_size = 3;
    o.n_hidden = 1;
    o.hidden[0] = 4;
  }
  o.seed = 1;
  prm_model *m = NULL;
  if (prm_model_new(&m, &o) != PRM_OK) return NULL;
  if (k == 0 && prm_model_set_trainable(m, 1) != PRM_OK) {
    prm_model_free(m);
    return NULL;
  }
  return m;
}

#endif
