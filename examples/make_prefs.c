/*
 * make_prefs.c - write a synthetic preference dataset as JSONL, one
 * {"prompt", "chosen", "rejected"} object per line: the input of the
 * README's quick start (`prefrm-train --train prefs.jsonl ...`).
 *
 *   make_prefs [N_PAIRS [SEED]]     (default 4000 pairs, seed 1) > prefs.jsonl
 *
 * Each prompt asks for a thing of one category ("Name a fruit you like.");
 * the preferred answer names a thing of that category, politely or not, and
 * the other answer names a thing of another category or is curt and rude.
 * So a model must read the prompt to rank most pairs: the category of the
 * answer only means something next to the question. 10% of the pairs are
 * flipped (labeller noise), so the best possible held-out accuracy is about
 * 0.90. Deterministic for a given seed.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

static uint64_t rng_state;

/* splitmix64 */
static uint64_t next_u64(void) {
  uint64_t z = (rng_state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

static unsigned pick(unsigned n) { return (unsigned)(next_u64() % n); }

#define N_CAT 5
#define N_ITEM 6
static const char *const category[N_CAT] = {"fruit", "animal", "colour", "tool", "city"};
static const char *const with_article[N_CAT] = {"a fruit", "an animal", "a colour", "a tool",
                                                "a city"};
static const char *const items[N_CAT][N_ITEM] = {
    {"apple", "banana", "cherry", "mango", "pear", "plum"},
    {"horse", "otter", "tiger", "rabbit", "eagle", "whale"},
    {"red", "green", "blue", "yellow", "purple", "orange"},
    {"hammer", "saw", "wrench", "chisel", "drill", "spade"},
    {"Paris", "Lagos", "Lima", "Osaka", "Oslo", "Cairo"},
};
/* even entries take the category with its article, odd ones without */
static const char *const asks[] = {"Name %s you like.", "Which %s would you pick?",
                                   "Tell me %s, please.", "What is your favourite %s?"};
static const char *const polite[] = {"Happy to help! I would say %s.", "Sure, %s is a good one.",
                                     "Thanks for asking: %s.", "I think %s, if that helps."};
static const char *const curt[] = {"%s. Stop asking.", "Whatever, %s.", "%s, obviously.",
                                   "Ugh. %s."};

/* One answer: a template with an item. */
static void answer(char *out, size_t cap, const char *const *tmpl, unsigned n_tmpl,
                   const char *item) {
  snprintf(out, cap, tmpl[pick(n_tmpl)], item);
}

int main(int argc, char **argv) {
  long n = argc > 1 ? strtol(argv[1], NULL, 10) : 4000;
  rng_state = argc > 2 ? strtoull(argv[2], NULL, 10) : 1;
  if (n <= 0 || n > 100000000) {
    fprintf(stderr, "usage: make_prefs [N_PAIRS [SEED]] > prefs.jsonl\n");
    return 2;
  }
  char prompt[128], question[96], good[128], bad[128];
  for (long i = 0; i < n; i++) {
    const unsigned c = pick(N_CAT);
    const unsigned a = pick(4);
    snprintf(question, sizeof question, asks[a], a % 2 ? category[c] : with_article[c]);
    snprintf(prompt, sizeof prompt, "\\n\\nHuman: %s\\n\\nAssistant:", question);
    /* the preferred answer: right category, mostly polite */
    answer(good, sizeof good, pick(4) ? polite : curt, 4, items[c][pick(N_ITEM)]);
    /* the other: a wrong category (politely or not), or the right one, rudely */
    if (pick(3)) {
      const unsigned w = (c + 1 + pick(N_CAT - 1)) % N_CAT;
      answer(bad, sizeof bad, pick(2) ? polite : curt, 4, items[w][pick(N_ITEM)]);
    } else {
      answer(bad, sizeof bad, curt, 4, items[c][pick(N_ITEM)]);
      /* a curt right answer against a curt right answer would be a tie:
       * then make the preferred one polite */
      answer(good, sizeof good, polite, 4, items[c][pick(N_ITEM)]);
    }
    const int flip = pick(10) == 0; /* labeller noise */
    printf("{\"prompt\": \"%s\", \"chosen\": \" %s\", \"rejected\": \" %s\"}\n", prompt,
           flip ? bad : good, flip ? good : bad);
  }
  return 0;
}
