/*
 * data.h - the input side of the prefrm tools: JSONL records read line by
 * line with their line numbers, the prompt + response token sequences with
 * the truncation rule, and hashed byte n-gram features for the feature
 * models (linear, mlp). Tool-side: not part of libprefrm.
 *
 * JSON is parsed with jansson. Every failure returns -1 with a message that
 * names the field and the problem (the caller adds file and line number).
 */
#ifndef PFT_DATA_H
#define PFT_DATA_H

#include <stddef.h>
#include <stdint.h>

#include "tokenizer.h"

/* ---- reading lines ---------------------------------------------------------------------- */

typedef struct pft_reader pft_reader;

/* Open a file for reading line by line; path NULL or "-" is standard input.
 * Returns 0, or -1 with a message in err. */
int pft_reader_open(pft_reader **out, const char *path, char *err, size_t err_size);
/*
 * The next line, without its "\n" (or "\r\n"); a last line without a newline
 * counts. Lines of any length. *line stays valid until the next call.
 * Returns 1 (a line), 0 (end of input) or -1 (read error, message in err).
 * *line_no is 1-based.
 */
int pft_reader_next(pft_reader *r, const char **line, size_t *len, uint64_t *line_no, char *err,
                    size_t err_size);
void pft_reader_close(pft_reader *r);
/* The name for messages ("FILE:LINE: reason"): the path, or "<stdin>". */
const char *pft_reader_name(const pft_reader *r);
/* 1 when the line holds only JSON whitespace (space, tab, CR, LF) or
 * nothing: prefrm-score passes over such lines without a word. */
int pft_line_is_blank(const char *line, size_t len);

/* ---- records ------------------------------------------------------------------------------ */

enum {
  PFT_REC_PAIR = 1,  /* prompt, chosen, rejected (+ optional margin, label) */
  PFT_REC_SINGLE = 2 /* prompt, response */
};

/* What a caller accepts. */
enum {
  PFT_WANT_PAIR = 1, /* training: a pair, or the line is bad */
  PFT_WANT_ANY = 2   /* scoring: a pair or a single response */
};

/* One parsed line. Strings are NUL-terminated copies (UTF-8 as in the
 * file); b is NULL for a single response. */
typedef struct pft_record {
  int kind;           /* PFT_REC_PAIR or PFT_REC_SINGLE */
  char *prompt;       /* may be "" (some datasets put the prompt in the responses) */
  char *a;            /* chosen (pair) or response (single): non-empty */
  char *b;            /* rejected (pair): non-empty; NULL for a single */
  size_t prompt_len, a_len, b_len;
  int has_margin, has_label;
  double margin;      /* finite */
  double label;       /* in [0, 1]: probability that chosen is preferred */
} pft_record;

/*
 * Parse one JSONL line into *rec (which the caller frees with
 * pft_record_free, also after a failure). A bad line is: invalid JSON, not
 * an object, a missing or non-string text field, an empty response, a
 * margin/label that is not a finite number (label outside [0, 1]). Unknown
 * fields are ignored. Returns 0, or -1 with the reason in err.
 */
int pft_parse_record(const char *line, size_t len, int want, pft_record *rec, char *err,
                     size_t err_size);
void pft_record_free(pft_record *rec);

/*
 * The two halves of pft_parse_record, for a caller that keeps the parsed
 * object (prefrm-score looks at its keys). pft_parse_json_line returns a new
 * reference (json_decref it), or NULL with the reason in err: invalid JSON
 * (with jansson's column and text), a duplicate key, or out of memory. Any
 * JSON value is returned; pft_record_from_json rejects what is not an
 * object. pft_parse_record(line) == pft_record_from_json(pft_parse_json_line(line)).
 */
struct json_t;
struct json_t *pft_parse_json_line(const char *line, size_t len, char *err, size_t err_size);
int pft_record_from_json(const struct json_t *root, int want, pft_record *rec, char *err,
                         size_t err_size);

/* ---- sequences ------------------------------------------------------------------------------ */

/*
 * The token sequences of a pair: prompt then response, each at most max_len
 * tokens. When one is too long, the prompt loses its START, and both
 * sequences keep the SAME prompt tail, of length
 *     kept = min(np, max_len - max(nc, nr))   (0 if that is negative),
 * so a pair still shares its prompt (prefix sharing needs this). Only when a
 * response alone exceeds max_len is it cut, keeping its first max_len tokens
 * (the prompt is then dropped entirely). r may be NULL (a single response:
 * out_r untouched). out_c/out_r are cleared first. Returns 0, or -1 when
 * memory runs out.
 */
int pft_build_pair(const int32_t *p, size_t np, const int32_t *c, size_t nc, const int32_t *r,
                   size_t nr, size_t max_len, pft_ids *out_c, pft_ids *out_r, size_t *kept);

/* ---- features --------------------------------------------------------------------------------- */

/*
 * Hashed byte n-gram features of a response for the linear and mlp models:
 * counts of its byte 1-, 2- and 3-grams hashed (FNV-1a) into dim buckets,
 * each count c replaced by log(1 + c), the vector scaled to unit L2 norm
 * (all zero for empty text). The prompt is left out: in a pair both
 * responses share it, and for a linear model it cancels in r_c - r_r.
 * x receives dim floats.
 */
void pft_ngram_features(const char *text, size_t len, float *x, uint32_t dim);

/* ---- model sidecar --------------------------------------------------------------------------- */

/*
 * How a checkpoint's model reads text. prefrm-train writes, beside every
 * checkpoint X.safetensors, a small JSON file X.json:
 *   {"tokenizer": "bytes" | "gpt2:DIR", "max_len": N, "input": "tokens" | "ngrams"}
 * (ngrams: pft_ngram_features with dim = the model's input size; max_len is
 * the longest sequence for tokens, 0 for ngrams). prefrm-score reads it.
 */
typedef struct pft_sidecar {
  char tokenizer[4096]; /* a pft_tokenizer_open spec */
  uint64_t max_len;
  int ngrams;           /* 1: "input": "ngrams" */
} pft_sidecar;

/* "X.json" for "X.safetensors" (any other name: name + ".json"). Returns 0,
 * or -1 when it does not fit in size. */
int pft_sidecar_path(const char *ckpt, char *out, size_t size);
/* Write atomically (temporary file + rename) / read and validate. Return 0,
 * or -1 with a message in err. */
int pft_sidecar_write(const char *path, const pft_sidecar *s, char *err, size_t err_size);
int pft_sidecar_read(const char *path, pft_sidecar *s, char *err, size_t err_size);

#endif
