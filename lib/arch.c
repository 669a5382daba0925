/*
 * arch.c - the registry of architectures (lib/arch.h). Adding one is a file
 * with its descriptor and a line here.
 */
#include <string.h>

#include "internal.h"

static const prmi_arch *const registry[] = {
    &prmi_arch_linear,
    &prmi_arch_mlp,
    &prmi_arch_gpt2,
    &prmi_arch_llama,
};

#define N_ARCH (sizeof registry / sizeof registry[0])

const prmi_arch *prmi_arch_at(uint32_t i) { return i < N_ARCH ? registry[i] : NULL; }

const prmi_arch *prmi_arch_find(int32_t id) {
  for (uint32_t i = 0; i < N_ARCH; i++)
    if (registry[i]->id == id) return registry[i];
  return NULL;
}

const prmi_arch *prmi_arch_by_name(const char *name) {
  if (name == NULL) return NULL;
  for (uint32_t i = 0; i < N_ARCH; i++)
    if (strcmp(registry[i]->name, name) == 0) return registry[i];
  return NULL;
}

int prmi_ends_with(const char *name, const char *suffix) {
  size_t n = strlen(name), k = strlen(suffix);
  return n >= k && strcmp(name + n - k, suffix) == 0;
}
