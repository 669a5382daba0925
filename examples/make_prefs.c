/*
 * make_prefs.c - write a synthetic preference dataset as JSONL, one
 * {"prompt", "chosen", "rejected"} object per line: the input of the
 * README's quick start (`prefrm-train --train prefs.jsonl ...`).
 *
 *   make_prefs [N_PAIRS [SEED]]     (default 4000 pairs, seed 1) > prefs.jsonl
 *
 * Each prompt asks about a topic ("Tell me something about bees."). In two
 * pairs of three both answers are on topic and the polite one is preferred
 * to the curt one; in the third, in the same tone, the answer on topic is
 * preferred to one about another topic. A model of the response alone can
 * learn the first kind (and must guess the second: about 0.77 held-out
 * accuracy); one that relates the answer to the question can learn both. Polite and curt answers have the same lengths, so "the
 * longer answer wins" is close to a coin flip. 10% of the pairs are flipped
 * (labeller noise): the best possible held-out accuracy is about 0.90.
 * Deterministic for a given seed.
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

#define N_TOPIC 12
static const char *const topic[N_TOPIC] = {"cats",  "maps",   "tea",   "rain",  "jazz",  "bread",
                                           "trains", "stars", "rivers", "chess", "paper", "bees"};
static const char *const asks[] = {"Tell me something about %s.", "What do you think of %s?",
                                   "Can you say a word on %s, please?", "I want to hear about %s."};
/* polite and curt templates of the same lengths (27, 24, 25, 23 characters
 * besides the topic), so that length says nothing */
static const char *const polite[] = {"Happy to help: %s are lovely.", "Sure, %s are a nice topic.",
                                     "Thanks for asking: %s rock!", "I would say %s are great."};
static const char *const curt[] = {"%s. Stop asking me about it!!", "Ugh, %s. Leave me alone!!!",
                                   "Whatever. It is %s, fine???", "%s, obviously! Get lost!!"};

/* One answer: a template with a topic. */
static void answer(char *out, size_t cap, const char *const *tmpl, const char *what) {
  snprintf(out, cap, tmpl[pick(4)], what);
}

int main(int argc, char **argv) {
  long n = argc > 1 ? strtol(argv[1], NULL, 10) : 4000;
  rng_state = argc > 2 ? strtoull(argv[2], NULL, 10) : 1;
  if (n <= 0 || n > 100000000) {
    fprintf(stderr, "usage: make_prefs [N_PAIRS [SEED]] > prefs.jsonl\n");
    return 2;
  }
  char prompt[160], question[128], good[128], bad[128];
  for (long i = 0; i < n; i++) {
    const unsigned t = pick(N_TOPIC);
    snprintf(question, sizeof question, asks[pick(4)], topic[t]);
    snprintf(prompt, sizeof prompt, "\\n\\nHuman: %s\\n\\nAssistant:", question);
    if (pick(3) == 0) {
      /* on topic beats off topic, in the same tone */
      const unsigned w = (t + 1 + pick(N_TOPIC - 1)) % N_TOPIC;
      const char *const *tone = pick(2) ? polite : curt;
      answer(good, sizeof good, tone, topic[t]);
      answer(bad, sizeof bad, tone, topic[w]);
    } else {
      /* both on topic: polite beats curt */
      answer(good, sizeof good, polite, topic[t]);
      answer(bad, sizeof bad, curt, topic[t]);
    }
    const int flip = pick(10) == 0; /* labeller noise */
    printf("{\"prompt\": \"%s\", \"chosen\": \" %s\", \"rejected\": \" %s\"}\n", prompt,
           flip ? bad : good, flip ? good : bad);
  }
  return 0;
}
