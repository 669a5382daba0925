/*
 * test_parity_pretrained.c - starting a reward model from Hugging Face
 * checkpoint layouts written by the PyTorch reference (torch_ref.py init
 * --layout rm|hf-rm|lm|base, --metadata config|none, --buffers ...).
 *
 * For one seed, torch_ref writes the same backbone in every layout (the LM
 * head of "lm" comes from its own generator). So every layout, loaded with
 * prm_model_load_pretrained, must give exactly the parameters of the "rm"
 * file loaded with prm_model_load -- bit for bit -- except the score head,
 * which is the file's where it has one and freshly initialised where it has
 * none; and with the rm file's head copied in, the same scores bit for bit
 * (the rm file's scores match PyTorch in test_parity_gpt2). The report must
 * name what was loaded, initialised and ignored.
 *
 * Skipped (as a whole) when ../shared or torch is absent.
 */
// clang-format off
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>
// clang-format on

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "parityutil.h"
#include "testutil.h"

typedef struct layout_case {
  const char *layout;   /* torch_ref --layout */
  const char *metadata; /* --metadata */
  const char *buffers;  /* --buffers */
  int omit_tied_head;   /* --omit-tied-head (gpt2 lm) */
  int has_head;         /* the file has score.weight */
  int n_ignored;        /* file tensors the load must skip (per model of 2 layers) */
} layout_case;

/* gpt2, 2 layers: u8/bool/f32 buffers are attn.bias + attn.masked_bias per
 * layer; lm adds lm_head.weight unless omitted. */
static const layout_case k_gpt2_cases[] = {
    {"rm", "config", "none", 0, 1, 0},    {"hf-rm", "none", "u8", 0, 1, 4},
    {"hf-rm", "config", "bool", 0, 1, 4}, {"lm", "none", "f32", 0, 0, 5},
    {"lm", "none", "none", 1, 0, 0},      {"base", "config", "u8", 0, 0, 4},
    {"base", "none", "none", 0, 0, 0},
};

/* llama, 2 layers: f32 buffers are one rotary_emb.inv_freq per layer; lm
 * adds lm_head.weight (untied). */
static const layout_case k_llama_cases[] = {
    {"rm", "config", "none", 0, 1, 0},   {"hf-rm", "none", "none", 0, 1, 0},
    {"hf-rm", "config", "f32", 0, 1, 2}, {"lm", "none", "none", 0, 0, 1},
    {"lm", "config", "f32", 0, 0, 3},    {"base", "none", "none", 0, 0, 0},
    {"base", "config", "f32", 0, 0, 2},
};

static char g_script[PARITY_PATH_SIZE];

static void write_layout(const char *model_flags, const layout_case *c, uint64_t seed,
                         const char *path) {
  char qs[PARITY_PATH_SIZE + 8], qp[PARITY_PATH_SIZE + 8], cmd[PARITY_CMD_SIZE];
  parity_shell_quote(qs, sizeof qs, g_script);
  parity_shell_quote(qp, sizeof qp, path);
  snprintf(cmd, sizeof cmd,
           "%s %s init %s --seed %llu --out %s --layout %s --metadata %s --buffers %s %s "
           ">/dev/null",
           PRM_PYTHON, qs, model_flags, (unsigned long long)seed, qp, c->layout, c->metadata,
           c->buffers, c->omit_tied_head ? "--omit-tied-head" : "");
  free(parity_run_capture(cmd));
}

/* Scores of a few fixed token sequences (inference context). */
static void score(prm_model *m, float *s) {
  int32_t ids[3 * 12], len[3] = {12, 5, 9};
  for (int i = 0; i < 36; i++)
    ids[i] = (int32_t)((i * 7 + 3) % 50);
  prm_ctx *c = prmt_tok_ctx(m, 3, 12, 1);
  prm_batch b = prmt_tok_batch(ids, len, 3, 12);
  assert_int_equal(prm_ctx_forward(c, &b, s, 3), PRM_OK);
  prm_ctx_free(c);
}

static uint32_t count_lines(const char *text, const char *prefix) {
  uint32_t n = 0;
  for (const char *p = text; *p; p = strchr(p, '\n') + 1) {
    if (strncmp(p, prefix, strlen(prefix)) == 0) n++;
    if (strchr(p, '\n') == NULL) break;
  }
  return n;
}

static void check_layouts(const char *name, const char *model_flags, const prm_model_options *cfg,
                          const layout_case *cases, size_t n_cases) {
  const uint64_t seed = 11;
  char rm_path[PARITY_PATH_SIZE], path[PARITY_PATH_SIZE];
  prmt_tmp_path(rm_path, sizeof rm_path, "pretrained_rm.safetensors");
  write_layout(model_flags, &cases[0], seed, rm_path);
  prm_model *rm = parity_load(rm_path, "the rm layout");
  uint64_t np = 0;
  const float *ref = prm_model_params(rm, &np);
  const uint64_t head = np - cfg->n_embd; /* score.weight [1, C] is the last tensor */
  float ref_scores[3];
  score(rm, ref_scores);

  for (size_t k = 0; k < n_cases; k++) {
    const layout_case *c = &cases[k];
    prmt_tmp_path(path, sizeof path, "pretrained_case.safetensors");
    write_layout(model_flags, c, seed, path);
    prm_pretrained_options po = PRM_PRETRAINED_OPTIONS_INIT;
    po.config = cfg;
    po.seed = 99;
    char text[4096];
    prm_load_report rep = PRM_LOAD_REPORT_INIT;
    rep.text = text;
    rep.text_size = sizeof text;
    prm_model *m = NULL;
    int rc = prm_model_load_pretrained(&m, path, &po, &rep);
    if (rc != PRM_OK)
      fail_msg("%s %s/%s/%s: %s", name, c->layout, c->metadata, c->buffers, prm_last_errmsg());
    assert_int_equal(prm_model_num_params(m), np);
    float *p = prm_model_params(m, NULL);
    /* the backbone, bit for bit */
    assert_memory_equal(p, ref, head * sizeof(float));
    /* the head: the file's, or a fresh one as prm_model_new(seed 99) draws it */
    if (c->has_head) {
      assert_memory_equal(p + head, ref + head, (np - head) * sizeof(float));
    } else {
      prm_model_options fo = *cfg;
      fo.seed = 99;
      prm_model *fresh = NULL;
      assert_int_equal(prm_model_new(&fresh, &fo), PRM_OK);
      assert_memory_equal(p + head, prm_model_params(fresh, NULL) + head,
                          (np - head) * sizeof(float));
      prm_model_free(fresh);
    }
    /* the report */
    assert_int_equal(rep.n_initialised, c->has_head ? 0 : 1);
    assert_int_equal(rep.n_loaded, prm_model_num_tensors(m) - rep.n_initialised);
    if ((int)rep.n_ignored != c->n_ignored)
      fail_msg("%s %s/%s/%s: %u ignored, expected %d:\n%s", name, c->layout, c->metadata,
               c->buffers, rep.n_ignored, c->n_ignored, text);
    assert_int_equal(rep.text_needed, strlen(text) + 1);
    assert_int_equal(count_lines(text, "loaded "), rep.n_loaded);
    assert_int_equal(count_lines(text, "initialised "), rep.n_initialised);
    assert_int_equal(count_lines(text, "ignored "), rep.n_ignored);
    if (!c->has_head) assert_non_null(strstr(text, "initialised score.weight\n"));
    if (strcmp(c->layout, "lm") == 0 && !c->omit_tied_head)
      assert_non_null(strstr(text, "ignored lm_head.weight\n"));
    /* with the rm head, the same scores bit for bit */
    memcpy(p + head, ref + head, (np - head) * sizeof(float));
    float s[3];
    score(m, s);
    assert_memory_equal(s, ref_scores, sizeof s);
    prm_model_free(m);

    /* metadata none and no configuration: what the shapes cannot tell is
     * missing, and the message says so */
    if (strcmp(c->metadata, "none") == 0) {
      po.config = NULL;
      assert_int_equal(prm_model_load_pretrained(&m, path, &po, NULL), PRM_ERR_FORMAT);
      assert_null(m);
      assert_non_null(strstr(prm_last_errmsg(), "n_head"));
    }
    remove(path);
  }
  prm_model_free(rm);
  remove(rm_path);
}

static void test_gpt2_layouts(void **state) {
  (void)state;
  if (!parity_reference_available("test_parity_pretrained", g_script, sizeof g_script)) {
    prmt_skip();
    return;
  }
  prm_model_options cfg = prmt_gpt2_options(64, 16, 16, 2, 2, 0);
  check_layouts("gpt2", "--model gpt2 --vocab 64 --ctx 16 --dim 16 --layers 2 --heads 2", &cfg,
                k_gpt2_cases, sizeof k_gpt2_cases / sizeof k_gpt2_cases[0]);
}

/* GQA with a non-default RoPE base and RMSNorm eps, which a file without
 * metadata cannot tell: the configuration must supply them, or the scores
 * would differ from the rm file's. */
static void test_llama_layouts(void **state) {
  (void)state;
  if (!parity_reference_available("test_parity_pretrained", g_script, sizeof g_script)) {
    prmt_skip();
    return;
  }
  prm_model_options cfg = PRM_MODEL_OPTIONS_INIT;
  cfg.arch = PRM_ARCH_LLAMA;
  cfg.vocab_size = 64;
  cfg.n_ctx = 16;
  cfg.n_embd = 16;
  cfg.n_layer = 2;
  cfg.n_head = 4;
  cfg.n_kv_head = 2;
  cfg.n_ffn = 40;
  cfg.rope_theta = 500000.0;
  cfg.rms_eps = 1e-5;
  check_layouts("llama",
                "--model llama --vocab 64 --ctx 16 --dim 16 --layers 2 --heads 4 --kv-heads 2 "
                "--ffn 40 --rope-theta 500000 --rms-eps 1e-5",
                &cfg, k_llama_cases, sizeof k_llama_cases / sizeof k_llama_cases[0]);
}

/* A configuration the file contradicts is refused, naming both values. */
static void test_gpt2_config_disagrees(void **state) {
  (void)state;
  if (!parity_reference_available("test_parity_pretrained", g_script, sizeof g_script)) {
    prmt_skip();
    return;
  }
  char path[PARITY_PATH_SIZE];
  prmt_tmp_path(path, sizeof path, "pretrained_bad.safetensors");
  const layout_case c = {"lm", "config", "u8", 0, 0, 5};
  write_layout("--model gpt2 --vocab 64 --ctx 16 --dim 16 --layers 2 --heads 2", &c, 5, path);
  prm_pretrained_options po = PRM_PRETRAINED_OPTIONS_INIT;
  prm_model_options cfg = prmt_gpt2_options(64, 16, 16, 2, 4, 0); /* file: 2 heads */
  po.config = &cfg;
  prm_model *m = NULL;
  assert_int_equal(prm_model_load_pretrained(&m, path, &po, NULL), PRM_ERR_FORMAT);
  assert_non_null(strstr(prm_last_errmsg(), "n_head"));
  cfg = prmt_gpt2_options(64, 16, 16, 3, 2, 0); /* file: 2 layers */
  assert_int_equal(prm_model_load_pretrained(&m, path, &po, NULL), PRM_ERR_FORMAT);
  cfg = prmt_gpt2_options(64, 32, 16, 2, 2, 0); /* file: 16 positions */
  assert_int_equal(prm_model_load_pretrained(&m, path, &po, NULL), PRM_ERR_FORMAT);
  /* the plain loader still refuses a file without a reward head, and says
   * what to use instead */
  assert_int_equal(prm_model_load(&m, path), PRM_ERR_FORMAT);
  assert_non_null(strstr(prm_last_errmsg(), "prm_model_load_pretrained"));
  /* the file's own configuration suffices when it has one */
  assert_int_equal(prm_model_load_pretrained(&m, path, NULL, NULL), PRM_OK);
  assert_int_equal(prm_model_arch(m), PRM_ARCH_GPT2);
  prm_model_free(m);
  remove(path);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_gpt2_layouts),
      cmocka_unit_test(test_gpt2_config_disagrees),
      cmocka_unit_test(test_llama_layouts),
  };
  return prmt_exit(cmocka_run_group_tests(tests, NULL, NULL), sizeof tests / sizeof tests[0]);
}
