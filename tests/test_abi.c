/*
 * test_abi.c - values the stable ABI pins forever. abidiff (see .ci/run and
 * docs/abi.md) checks functions and struct layouts but cannot see enum values,
 * which cross the ABI as int32_t: they are pinned here. Changing any number in
 * this file is an ABI break.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <string.h>

#include "prefrm.h"

static void test_status_values(void **state) {
  (void)state;
  assert_int_equal(PRM_OK, 0);
  assert_int_equal(PRM_ERR_NULL, -1);
  assert_int_equal(PRM_ERR_INVALID, -2);
  assert_int_equal(PRM_ERR_SIZE, -3);
  assert_int_equal(PRM_ERR_NONFINITE, -4);
  assert_int_equal(PRM_ERR_VERSION, -5);
  assert_int_equal(PRM_ERR_NOMEM, -6);
  assert_int_equal(PRM_ERR_STATE, -7);
  assert_int_equal(PRM_ERR_MISMATCH, -8);
  assert_int_equal(PRM_ERR_IO, -9);
  assert_int_equal(PRM_ERR_FORMAT, -10);
  assert_int_equal(PRM_ERR_NONFINITE_GRAD, -11);
  assert_int_equal(PRM_ERR_UNSUPPORTED, -12);
}

static void test_enum_values(void **state) {
  (void)state;
  assert_int_equal(PRM_ARCH_LINEAR, 1);
  assert_int_equal(PRM_ARCH_MLP, 2);
  assert_int_equal(PRM_ARCH_GPT2, 3);
  assert_int_equal(PRM_ARCH_LLAMA, 4);
  assert_int_equal(PRM_ACT_RELU, 1);
  assert_int_equal(PRM_ACT_GELU_TANH, 2);
  assert_int_equal(PRM_ACT_TANH, 3);
  assert_int_equal(PRM_OPT_SGD, 1);
  assert_int_equal(PRM_OPT_ADAM, 2);
  assert_int_equal(PRM_OPT_ADAMW, 3);
  assert_int_equal(PRM_SCHED_CONSTANT, 1);
  assert_int_equal(PRM_SCHED_LINEAR, 2);
  assert_int_equal(PRM_SCHED_COSINE, 3);
  assert_int_equal(PRM_MAX_HIDDEN, 16);
  assert_int_equal(PRM_TIE_NONE, 0);
  assert_int_equal(PRM_TIE_RAO_KUPPER, 1);
  assert_int_equal(PRM_TIE_DAVIDSON, 2);
  assert_int_equal(PRM_RANK_PAIRWISE, 1);
  assert_int_equal(PRM_RANK_PLACKETT_LUCE, 2);
}

/* Every versioned struct: the version field first, the current versions, and
 * the offsets FFI bindings hard-code. */
static void test_struct_layouts(void **state) {
  (void)state;
  assert_int_equal(offsetof(prm_model_options, version), 0);
  assert_int_equal(offsetof(prm_ctx_options, version), 0);
  assert_int_equal(offsetof(prm_batch, version), 0);
  assert_int_equal(offsetof(prm_loss_options, version), 0);
  assert_int_equal(offsetof(prm_loss_stats, version), 0);
  assert_int_equal(offsetof(prm_optimizer_options, version), 0);
  assert_int_equal(offsetof(prm_rank_options, version), 0);
  assert_int_equal(PRM_MODEL_OPTIONS_VERSION, 2);
  assert_int_equal(PRM_CTX_OPTIONS_VERSION, 2);
  assert_int_equal(PRM_BATCH_VERSION, 2);
  assert_int_equal(PRM_LOSS_OPTIONS_VERSION, 2);
  assert_int_equal(PRM_LOSS_STATS_VERSION, 2);
  assert_int_equal(PRM_RANK_OPTIONS_VERSION, 1);
  assert_int_equal(PRM_OPTIMIZER_OPTIONS_VERSION, 1);
#if UINTPTR_MAX == 0xFFFFFFFFFFFFFFFFu
  assert_int_equal(sizeof(prm_model_options), 248);
  assert_int_equal(offsetof(prm_model_options, hidden), 32);
  /* version 2 appended the llama fields after n_head (version 1 ends at 200) */
  assert_int_equal(offsetof(prm_model_options, n_kv_head), 200);
  assert_int_equal(offsetof(prm_model_options, rope_theta), 224);
  assert_int_equal(offsetof(prm_model_options, qk_norm), 244);
  /* version 2 appended threads (version 1 ends at 24) */
  assert_int_equal(offsetof(prm_ctx_options, n_workers), 24);
  assert_int_equal(offsetof(prm_ctx_options, parallel_for), 32);
  assert_int_equal(offsetof(prm_ctx_options, parallel_arg), 40);
  assert_int_equal(sizeof(prm_ctx_options), 48);
  /* version 2 appended shared prefixes (version 1 ends at 64) */
  assert_int_equal(offsetof(prm_batch, lengths), 56);
  assert_int_equal(offsetof(prm_batch, prefix_row), 64);
  assert_int_equal(offsetof(prm_batch, prefix_len), 72);
  assert_int_equal(sizeof(prm_batch), 80);
  /* version 2 appended ties (version 1 ends at 40) */
  assert_int_equal(offsetof(prm_loss_options, tie_model), 40);
  assert_int_equal(offsetof(prm_loss_options, tie_param), 48);
  assert_int_equal(offsetof(prm_loss_options, tie), 56);
  assert_int_equal(sizeof(prm_loss_options), 64);
  /* version 2 appended calibration, ranking and tie statistics (v1 ends at 48) */
  assert_int_equal(offsetof(prm_loss_stats, brier), 48);
  assert_int_equal(offsetof(prm_loss_stats, n_compared), 88);
  assert_int_equal(sizeof(prm_loss_stats), 104);
  assert_int_equal(sizeof(prm_rank_options), 16);
  assert_int_equal(offsetof(prm_rank_options, weight), 8);
  assert_int_equal(sizeof(prm_optimizer_options), 104);
  assert_int_equal(offsetof(prm_optimizer_options, min_lr), 96);
#endif
}

/* The INIT macros and the init functions give the same structs. */
static void test_init_macros_match_functions(void **state) {
  (void)state;
  prm_model_options m1 = PRM_MODEL_OPTIONS_INIT, m2;
  prm_ctx_options c1 = PRM_CTX_OPTIONS_INIT, c2;
  prm_batch b1 = PRM_BATCH_INIT, b2;
  prm_loss_options l1 = PRM_LOSS_OPTIONS_INIT, l2;
  prm_loss_stats s1 = PRM_LOSS_STATS_INIT, s2;
  prm_optimizer_options o1 = PRM_OPTIMIZER_OPTIONS_INIT, o2;
  prm_rank_options r1 = PRM_RANK_OPTIONS_INIT, r2;
  assert_int_equal(prm_rank_options_init(&r2, PRM_RANK_OPTIONS_VERSION), PRM_OK);
  assert_int_equal(r1.loss, r2.loss);
  assert_true(r1.weight == r2.weight);
  assert_int_equal(prm_model_options_init(&m2, PRM_MODEL_OPTIONS_VERSION), PRM_OK);
  assert_int_equal(prm_ctx_options_init(&c2, PRM_CTX_OPTIONS_VERSION), PRM_OK);
  assert_int_equal(prm_batch_init(&b2, PRM_BATCH_VERSION), PRM_OK);
  assert_int_equal(prm_loss_options_init(&l2, PRM_LOSS_OPTIONS_VERSION), PRM_OK);
  assert_int_equal(prm_loss_stats_init(&s2, PRM_LOSS_STATS_VERSION), PRM_OK);
  assert_int_equal(prm_optimizer_options_init(&o2, PRM_OPTIMIZER_OPTIONS_VERSION), PRM_OK);
  assert_int_equal(m1.arch, m2.arch);
  assert_int_equal(m1.activation, m2.activation);
  assert_int_equal(m1.seed, m2.seed);
  assert_int_equal(c1.max_rows, c2.max_rows);
  assert_int_equal(c1.inference, c2.inference);
  assert_int_equal(b1.n, b2.n);
  assert_true(l1.center_coef == l2.center_coef && l1.margin == l2.margin);
  assert_true(l1.tie_model == l2.tie_model && l1.tie_param == l2.tie_param && l1.tie == l2.tie);
  assert_true(s1.loss == s2.loss && s1.ece == s2.ece && s1.n_compared == s2.n_compared);
  assert_int_equal(o1.algorithm, o2.algorithm);
  assert_true(o1.lr == o2.lr && o1.beta2 == o2.beta2 && o1.eps == o2.eps);
  assert_int_equal(o1.accumulation_steps, o2.accumulation_steps);
  assert_int_equal(o1.schedule, o2.schedule);
}

/* A caller compiled against version 1 of prm_model_options (200 bytes on
 * LP64) keeps working: the library reads and writes only those bytes, and the
 * fields version 2 appended take their defaults. */
static void test_model_options_version_1(void **state) {
  (void)state;
  const size_t v1 = offsetof(prm_model_options, n_kv_head);
  union {
    prm_model_options o;
    unsigned char b[sizeof(prm_model_options) + 16];
  } u;
  memset(&u, 0xAB, sizeof u);
  assert_int_equal(prm_model_options_init(&u.o, 1), PRM_OK);
  for (size_t i = v1; i < sizeof u; i++) assert_int_equal(u.b[i], 0xAB);
  assert_int_equal(u.o.version, 1);
  u.o.arch = PRM_ARCH_GPT2;
  u.o.vocab_size = 11;
  u.o.n_ctx = 8;
  u.o.n_embd = 8;
  u.o.n_layer = 1;
  u.o.n_head = 2;
  prm_model *m = NULL;
  assert_int_equal(prm_model_new(&m, &u.o), PRM_OK); /* bytes past v1 are 0xAB garbage */
  memset(&u, 0xAB, sizeof u);
  u.o.version = 1;
  assert_int_equal(prm_model_get_options(m, &u.o), PRM_OK);
  for (size_t i = v1; i < sizeof u; i++) assert_int_equal(u.b[i], 0xAB);
  assert_int_equal(u.o.n_head, 2);
  prm_model_options v2 = PRM_MODEL_OPTIONS_INIT;
  assert_int_equal(prm_model_get_options(m, &v2), PRM_OK);
  assert_true(v2.rope_theta == 10000.0 && v2.rms_eps == 1e-6 && v2.n_kv_head == 0);
  prm_model_free(m);
}

/* Callers compiled against version 1 of prm_loss_options (40 bytes) and
 * prm_loss_stats (48 bytes): the library reads and writes only those bytes,
 * and both loss paths agree with version 2. */
static void test_loss_structs_version_1(void **state) {
  (void)state;
  const size_t ov1 = offsetof(prm_loss_options, tie_model);
  const size_t sv1 = offsetof(prm_loss_stats, brier);
  union {
    prm_loss_options o;
    unsigned char b[sizeof(prm_loss_options) + 16];
  } uo;
  union {
    prm_loss_stats s;
    unsigned char b[sizeof(prm_loss_stats) + 16];
  } us;
  memset(&uo, 0xAB, sizeof uo);
  memset(&us, 0xAB, sizeof us);
  assert_int_equal(prm_loss_options_init(&uo.o, 1), PRM_OK);
  assert_int_equal(prm_loss_stats_init(&us.s, 1), PRM_OK);
  for (size_t i = ov1; i < sizeof uo; i++) assert_int_equal(uo.b[i], 0xAB);
  for (size_t i = sv1; i < sizeof us; i++) assert_int_equal(us.b[i], 0xAB);
  const float rc[3] = {1.0f, -0.5f, 2.0f}, rr[3] = {0.0f, 0.25f, 2.0f}, m[3] = {0.1f, 0, 0};
  uo.o.margin = m;
  uo.o.center_coef = 0.01;
  double l1 = 0, l2 = 0;
  float d1[6], d2[6];
  /* bytes past version 1 are 0xAB garbage: a tie model there would be invalid */
  assert_int_equal(prm_loss_bt(rc, rr, 3, &uo.o, &l1, &us.s, d1, d1 + 3), PRM_OK);
  for (size_t i = sv1; i < sizeof us; i++) assert_int_equal(us.b[i], 0xAB);
  prm_loss_options o2 = PRM_LOSS_OPTIONS_INIT;
  prm_loss_stats s2 = PRM_LOSS_STATS_INIT;
  o2.margin = m;
  o2.center_coef = 0.01;
  assert_int_equal(prm_loss_bt(rc, rr, 3, &o2, &l2, &s2, d2, d2 + 3), PRM_OK);
  assert_true(l1 == l2 && us.s.loss == s2.loss && us.s.accuracy == s2.accuracy);
  assert_true(us.s.margin_mean == s2.margin_mean && us.s.reward_std == s2.reward_std);
  assert_memory_equal(d1, d2, sizeof d1);
  assert_true(s2.n_compared == 3 && s2.accuracy == 0.5); /* 1 win, 1 loss, 1 equal: 1.5/3 */
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_status_values),
      cmocka_unit_test(test_enum_values),
      cmocka_unit_test(test_struct_layouts),
      cmocka_unit_test(test_init_macros_match_functions),
      cmocka_unit_test(test_model_options_version_1),
      cmocka_unit_test(test_loss_structs_version_1),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
