/*
 * test_corpus.c - replay the committed corpus of malformed checkpoints
 * (tests/corpus, written by tests/corpus/make_corpus.py): every file, loaded
 * from its path and from a buffer, gives the status and the message listed
 * for it in tests/corpus/EXPECTED, and a failed load returns no model. The
 * corpus holds one file per kind of damage (truncations, bad JSON, dtypes,
 * offsets, overlaps, duplicates, non-finite values, missing, unexpected and
 * mis-shaped tensors, configuration keys missing or contradicting the
 * shapes, a language model without a reward head) and a few valid files.
 */
// clang-format off
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>
// clang-format on

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "prefrm.h"

static unsigned char *read_file(const char *path, size_t *size) {
  FILE *f = fopen(path, "rb");
  if (f == NULL) fail_msg("cannot open %s", path);
  fseek(f, 0, SEEK_END);
  long n = ftell(f);
  fseek(f, 0, SEEK_SET);
  unsigned char *b = malloc((size_t)n + 1);
  assert_non_null(b);
  assert_int_equal(fread(b, 1, (size_t)n, f), (size_t)n);
  fclose(f);
  *size = (size_t)n;
  return b;
}

static void check(const char *name, int rc, prm_model *m, const char *status, const char *msg,
                  const char *how) {
  const char *got = prm_status_string(rc);
  if (strncmp(got, status, strlen(status)) != 0 || got[strlen(status)] != ':')
    fail_msg("%s (%s): %s, expected %s (%s)", name, how, got, status, prm_last_errmsg());
  if (strcmp(msg, "-") != 0 && strstr(prm_last_errmsg(), msg) == NULL)
    fail_msg("%s (%s): message '%s' lacks '%s'", name, how, prm_last_errmsg(), msg);
  if ((rc == PRM_OK) != (m != NULL)) fail_msg("%s (%s): model %p with %s", name, how, (void *)m, got);
}

static void test_corpus(void **state) {
  (void)state;
  char path[1024], line[512], name[256], status[64];
  snprintf(path, sizeof path, "%s/EXPECTED", PRM_CORPUS_DIR);
  FILE *f = fopen(path, "r");
  if (f == NULL) fail_msg("cannot open %s", path);
  int n = 0, bad = 0;
  while (fgets(line, sizeof line, f) != NULL) {
    if (line[0] == '#' || sscanf(line, "%255s %63s", name, status) != 2) continue;
    char *msg = strstr(line, status) + strlen(status);
    msg += strspn(msg, " ");
    msg[strcspn(msg, "\n")] = '\0';
    snprintf(path, sizeof path, "%s/%s.safetensors", PRM_CORPUS_DIR, name);
    prm_model *m = NULL;
    int rc = prm_model_load(&m, path);
    check(name, rc, m, status, msg, "path");
    prm_model_free(m);
    size_t size;
    unsigned char *buf = read_file(path, &size);
    m = NULL;
    rc = prm_model_load_buffer(&m, buf, size);
    check(name, rc, m, status, msg, "buffer");
    prm_model_free(m);
    free(buf);
    bad += strcmp(status, "PRM_OK") != 0;
    n++;
  }
  fclose(f);
  /* the issue asks for at least 25 kinds of malformed file */
  if (bad < 25) fail_msg("only %d malformed files in the corpus", bad);
  printf("corpus: %d files, %d malformed, all as expected\n", n, bad);
}

int main(void) {
  const struct CMUnitTest tests[] = {cmocka_unit_test(test_corpus)};
  return cmocka_run_group_tests(tests, NULL, NULL);
}
