/*
 * prefrm_score.c - prefrm-score: score JSONL lines with a reward model.
 *
 * Each line is {prompt, response} or {prompt, chosen, rejected}; it is written
 * back with "reward" (single) or "reward_chosen", "reward_rejected" and
 * "p_chosen" (pair) added. --help is the user's reference; this comment is
 * the design.
 *
 * Streaming. The input is read in chunks (--chunk lines, at most CHUNK_BYTES of
 * text): every chunk goes through the same four steps and is written before the
 * next one is read, so memory does not grow with the input:
 *   1. read     (thread 0)  lines into one text arena
 *   2. prepare  (all)       parse, build each row's token sequence (token models)
 *   3. forward  (all)       rows sorted by length (token models) and cut into
 *                           batches of up to --batch rows, so padding stays small;
 *                           each thread takes batches from a shared counter and
 *                           runs them through its own inference context. Token
 *                           models share prefixes (prm_batch version 2) unless
 *                           --no-share-prefix: a pair's two rows form a group
 *                           (the rejected row declares its longest common start
 *                           with the chosen row), and so do the rows of
 *                           consecutive single lines with byte-identical prompts
 *                           (each declares its common start with the group's
 *                           first row), at most --batch rows a group. Groups,
 *                           not rows, are sorted by their longest row and packed
 *                           whole into batches, so a batch never splits one and
 *                           the shared tokens are computed once. With
 *                           --no-share-prefix rows are sorted and cut into
 *                           batches of --batch rows one by one, nothing declared.
 *   4. write    (thread 0)  lines in input order, bad lines reported
 * Threads meet at a barrier between the steps. The batches of a chunk depend on
 * the chunk only, and a context computes what it would alone, so the output does
 * not depend on --threads.
 *
 * Output lines are the input lines with the new fields spliced in before the
 * closing brace, so everything the user wrote (key order, spacing, number
 * spelling, escapes) comes back byte for byte. jansson would re-print numbers
 * ("0.1" as "0.10000000000000001") and spacing. Only a line that already has
 * one of the fields we add is re-serialised by jansson (order kept) without
 * them, and the fresh values are spliced into that text.
 *
 * Row i of a chunk's line j is row 2j (response or chosen) or 2j + 1 (rejected).
 */
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "data.h"
#include "prefrm.h"
#include "tokenizer.h"

#define PROG "prefrm-score"
#define CHUNK_BYTES ((size_t)32 << 20)   /* text of one chunk, beyond its first line */
#define FEATURE_FLOATS ((size_t)1 << 24) /* most floats of one feature batch (64 MiB) */
#define EXIT_USAGE 2
#define EXIT_BAD_LINE 3 /* as prefrm-train's */

static void usage(FILE *f) {
  fputs("Usage: " PROG " --model CKPT [OPTIONS] [FILE]\n"
        "\n"
        "Score JSONL with a reward model trained by prefrm-train (or any libprefrm\n"
        "checkpoint). Reads FILE, or standard input when FILE is absent or \"-\", and\n"
        "writes every line to standard output with its scores added.\n"
        "\n"
        "Input: one JSON object per line (UTF-8), either\n"
        "  {\"prompt\": P, \"response\": R}                     a single response, or\n"
        "  {\"prompt\": P, \"chosen\": C, \"rejected\": X}        a pair.\n"
        "  P may be \"\"; R, C and X must be non-empty strings. Other fields are kept and\n"
        "  otherwise ignored, except that in a pair \"margin\" (a finite number) and\n"
        "  \"label\" (a number in [0, 1]) are checked as prefrm-train checks them (a\n"
        "  single response's are not looked at). A line with both\n"
        "  \"response\" and \"chosen\"/\"rejected\" is bad, and so is a key given twice.\n"
        "  Lines holding only whitespace are passed over (not written, not counted).\n"
        "  Lines end with LF or CRLF; the last one may lack its newline.\n"
        "\n"
        "Output: the same line, byte for byte, with the new fields added before its\n"
        "closing brace, and an LF:\n"
        "  single: \"reward\": r\n"
        "  pair:   \"reward_chosen\": r_c, \"reward_rejected\": r_r,\n"
        "          \"p_chosen\": sigmoid(r_c - r_r)  (the model's P(chosen preferred))\n"
        "  e.g.  {\"prompt\": \"Hi\", \"response\": \"Hello!\", \"reward\": 0.731254578}\n"
        "  Rewards are the model's float32 scores printed with 9 significant digits,\n"
        "  which read back as exactly the same float. A line that already has one of\n"
        "  these fields gets the new value: it is then re-serialised by jansson with\n"
        "  its keys in their original order (spacing and number spelling may change)\n"
        "  and the fields are added at the end. Lines come out in input order.\n"
        "\n"
        "How text becomes model input is read from the checkpoint's sidecar: for\n"
        "CKPT = X.safetensors, the file X.json that prefrm-train writes beside it\n"
        "({\"tokenizer\": SPEC, \"max_len\": N, \"input\": \"tokens\" | \"ngrams\"}).\n"
        "Without a sidecar: token models (gpt2, llama) use the bytes tokenizer and the\n"
        "model's n_ctx; feature models (linear, mlp) use hashed byte n-gram features of\n"
        "the response with as many buckets as the model has inputs. Token models read\n"
        "prompt + response, truncated to max_len tokens as in training: the prompt\n"
        "loses its start first (both responses of a pair keep the same prompt tail);\n"
        "a response longer than max_len alone keeps its first max_len tokens. Feature\n"
        "models read the response only.\n"
        "\n"
        "Options:\n"
        "  --model CKPT         the checkpoint (safetensors) to score with; required\n"
        "  --tokenizer SPEC     token models: \"bytes\" or \"gpt2:DIR\" (DIR holds\n"
        "                       vocab.json + merges.txt, or encoder.json + vocab.bpe);\n"
        "                       overrides the sidecar\n"
        "  --max-len N          token models: longest sequence in tokens, 1..n_ctx;\n"
        "                       overrides the sidecar\n"
        "  --threads N          worker threads, each with its own inference context on\n"
        "                       the one shared model (default 1). Output does not\n"
        "                       depend on N. With a multi-threaded BLAS, set\n"
        "                       OPENBLAS_NUM_THREADS=1 (or your BLAS's equivalent).\n"
        "  --batch N            rows per forward pass (default 64; a pair is 2 rows).\n"
        "                       Token models hold N x max_len positions of activations\n"
        "                       per thread: lower it (or --max-len) if memory is short.\n"
        "                       A row's score can differ in its last bits with the\n"
        "                       rows it shares a forward pass with (BLAS blocking)\n"
        "                       and with the prefix it shares with one of them:\n"
        "                       --batch, --chunk and --no-share-prefix can change\n"
        "                       them, --threads not.\n"
        "  --no-share-prefix    token models: score every row on its own. By default\n"
        "                       the two rows of a pair, and the responses of\n"
        "                       consecutive lines with byte-identical prompts (up to\n"
        "                       --batch rows), go into one forward pass, where their\n"
        "                       common start (the prompt) is computed once.\n"
        "  --chunk N            lines read, scored and written at a time (default\n"
        "                       4096; a chunk also ends after 32 MiB of text). Rows of\n"
        "                       a chunk are sorted by length into batches (a pair, or\n"
        "                       a run of one prompt's responses, together); memory is\n"
        "                       proportional to the chunk, not to the input.\n"
        "  --on-bad-line fail|skip\n"
        "                       what a bad line does (default fail). Either way it is\n"
        "                       reported on standard error as FILE:LINE: reason (FILE\n"
        "                       is \"<stdin>\" for standard input). fail: the lines\n"
        "                       before it are written, then the program stops with\n"
        "                       exit status 3. skip: the line is left out of the\n"
        "                       output, scoring goes on, and the number skipped is\n"
        "                       reported at the end. Bad: invalid JSON, not an\n"
        "                       object, a missing or non-string prompt, response,\n"
        "                       chosen or rejected, an empty response, a pair's\n"
        "                       margin or label that is not a number (label outside\n"
        "                       [0, 1]), a model reward that is not finite.\n"
        "  --normalise          write rewards normalised with the statistics stored in\n"
        "                       the checkpoint, (r - mean) / std (an error if it has\n"
        "                       none); p_chosen stays sigmoid of the raw difference\n"
        "  --help, -h           this text\n"
        "  --version            the program's and the library's version\n"
        "\n"
        "Standard error also gets one summary line when lines were skipped or\n"
        "sequences truncated and, for token models, one with the tokens computed out\n"
        "of those read (what shared prefixes saved), e.g.\n"
        "  " PROG ": computed 5120 of 8192 tokens (shared prefixes saved 37.5%)\n"
        "\n"
        "Exit status:\n"
        "  0  every line scored (with --on-bad-line skip: bad lines skipped); an empty\n"
        "     input is not an error\n"
        "  1  a failure to read the input, write the output, load the model, sidecar\n"
        "     or tokenizer, or score\n"
        "  2  a usage error (unknown option, bad value, missing --model)\n"
        "  3  a bad line, with --on-bad-line fail (the code prefrm-train uses)\n"
        "\n"
        "Examples:\n"
        "  " PROG " --model rm.safetensors test.jsonl > scored.jsonl\n"
        "  cat pairs.jsonl | " PROG " --model rm.safetensors --threads 8 --batch 32\n"
        "  " PROG " --model rm.safetensors --on-bad-line skip - < raw.jsonl\n"
        "  " PROG " --model rm.safetensors --tokenizer gpt2:models/gpt2 --max-len 512 in.jsonl\n",
        f);
}

static void die_usage(const char *fmt, const char *arg) {
  fprintf(stderr, PROG ": ");
  fprintf(stderr, fmt, arg);
  fprintf(stderr, "\nTry '" PROG " --help'.\n");
  exit(EXIT_USAGE);
}

static size_t parse_count(const char *flag, const char *v, size_t lo, size_t hi) {
  char *end;
  errno = 0;
  unsigned long long x = strtoull(v, &end, 10);
  if (*v < '0' || *v > '9' || *end || errno || x < lo || x > hi) {
    fprintf(stderr, PROG ": %s wants an integer in [%zu, %zu], not '%s'\nTry '" PROG " --help'.\n",
            flag, lo, hi, v);
    exit(EXIT_USAGE);
  }
  return (size_t)x;
}

/* ---- the scorer ------------------------------------------------------------------------------ */

enum { LINE_BLANK, LINE_OK, LINE_BAD };

typedef struct line_info {
  uint64_t no;
  size_t off, len; /* the line in the chunk's text */
  int state;       /* LINE_* */
  int kind;        /* PFT_REC_PAIR or PFT_REC_SINGLE */
  int truncated;
  char *base; /* NULL: the line itself; else its re-serialisation (malloc) */
  size_t base_len;
  size_t splice; /* where the new fields go in the line or base */
  int comma;     /* 1: the object has fields before the splice point */
  char *err;     /* LINE_BAD: the reason (malloc) */
} line_info;

typedef struct row {
  pft_ids ids;      /* token models; the buffer is kept from chunk to chunk */
  const char *text; /* feature models: the response (in the line's record) */
  size_t text_len;
  float score;
} row;

typedef struct scorer scorer;

typedef struct worker {
  scorer *S;
  int id;
  pthread_t thread;
  prm_ctx *ctx;
  pft_ids p, c, r;  /* tokenised prompt and responses */
  float *x;         /* feature batch (fb_rows, dim) */
  int32_t *tokens;  /* token batch (batch, max_len) */
  int32_t *lengths; /* (batch) */
  float *scores;    /* (batch) */
  /* token models: the shared prefixes of a batch (batch), the tokens of the run */
  int32_t *prefix_row, *prefix_len;
  uint64_t tokens_computed, tokens_declared;
} worker;

/* Token models with shared prefixes: rows scored together, in plan_chunk. */
typedef struct group {
  uint64_t key;   /* (its longest row's length << 32) | its first row */
  uint32_t at, n; /* its rows: S->grow[at .. at + n) */
} group;

struct scorer {
  /* configuration */
  const prm_model *model;
  int token_model;
  const pft_tokenizer *tok;
  size_t max_len; /* token models */
  uint32_t dim;   /* feature models */
  size_t batch;   /* rows per forward */
  size_t chunk;   /* lines per chunk */
  int skip_bad, normalise;
  int share; /* token models: declare shared prefixes (not --no-share-prefix) */
  int n_threads;
  worker *workers;
  pft_reader *in;
  FILE *out;

  /* the chunk */
  char *text;
  size_t text_len, text_cap;
  line_info *lines;
  size_t n_lines;
  pft_record *recs; /* feature models keep the responses until the forward, token
                     * models a single's prompt while prefixes are shared */
  row *rows;        /* 2 per line */
  uint64_t *order;  /* active rows: (length << 32) | row, sorted for token models */
  size_t *bstart;   /* batch b is order[bstart[b] .. bstart[b + 1]) */
  size_t n_order, n_batches, limit;
  /* shared prefixes (token models, S->share): per order position, how many
   * positions back the row it shares with is (0: none) and how many tokens
   * (the longest common prefix); the groups and their rows and LCPs */
  uint32_t *pback, *plen;
  group *groups;
  uint32_t *grow, *glcp;
  atomic_size_t next; /* the next line (prepare) or batch (forward) to take */

  /* flow */
  pthread_mutex_t mu;
  pthread_cond_t gate_cv;
  int gate;                  /* workers 1.. start at 1, leave at -1 (under mu) */
  pthread_barrier_t barrier; /* between the steps of a chunk */
  int eof, stop;
  int failed;         /* stop after this chunk: a fatal bad line, a write or forward error */
  int read_failed;    /* the input could not be read to its end (lines before are written) */
  int bad_line;       /* stopped at a bad line (--on-bad-line fail): exit status 3 */
  char fwd_err[1024]; /* the first forward failure of a chunk (under mu) */

  /* totals */
  uint64_t n_scored, n_skipped, n_truncated;
};

static int is_ws(char ch) { return ch == ' ' || ch == '\t' || ch == '\r' || ch == '\n'; }

static void set_bad(line_info *L, const char *reason) {
  L->state = LINE_BAD;
  L->err = strdup(reason);
}

/* Read the next chunk into S->text / S->lines. Thread 0. */
static void read_chunk(scorer *S) {
  S->text_len = 0;
  S->n_lines = 0;
  while (!S->eof && S->n_lines < S->chunk && (S->n_lines == 0 || S->text_len < CHUNK_BYTES)) {
    const char *line;
    size_t len;
    uint64_t no;
    char err[1024];
    int k = pft_reader_next(S->in, &line, &len, &no, err, sizeof err);
    if (k <= 0) {
      if (k < 0) {
        fprintf(stderr, PROG ": %s\n", err);
        S->read_failed = 1;
      }
      S->eof = 1;
      break;
    }
    if (S->text_len + len + 1 > S->text_cap) {
      size_t cap = S->text_cap ? S->text_cap : 1 << 16;
      while (cap < S->text_len + len + 1)
        cap *= 2;
      char *t = realloc(S->text, cap);
      if (!t) {
        fprintf(stderr, PROG ": out of memory reading line %llu\n", (unsigned long long)no);
        S->read_failed = 1;
        S->eof = 1;
        break;
      }
      S->text = t;
      S->text_cap = cap;
    }
    memcpy(S->text + S->text_len, line, len);
    S->text[S->text_len + len] = '\0';
    line_info *L = &S->lines[S->n_lines++];
    memset(L, 0, sizeof *L);
    L->no = no;
    L->off = S->text_len;
    L->len = len;
    S->text_len += len + 1;
  }
}

/* Where the new fields go: after the last non-blank character before the
 * closing brace of the object text t[0..n). -1 if t does not end in '}'. */
static int find_splice(const char *t, size_t n, size_t *at, int *comma) {
  while (n > 0 && is_ws(t[n - 1]))
    n--;
  if (n == 0 || t[n - 1] != '}') return -1;
  n--;
  while (n > 0 && is_ws(t[n - 1]))
    n--;
  *at = n;
  *comma = n > 0 && t[n - 1] != '{';
  return 0;
}

/* Drop the fields we are about to add from a line that has them, and keep
 * jansson's re-serialisation of the rest as the text to splice into. */
static int rebase(line_info *L, json_t *root) {
  static const char *single[] = {"reward", NULL};
  static const char *pair[] = {"reward_chosen", "reward_rejected", "p_chosen", NULL};
  const char **keys = L->kind == PFT_REC_PAIR ? pair : single;
  int found = 0;
  for (int i = 0; keys[i]; i++)
    found |= json_object_del(root, keys[i]) == 0;
  if (!found) return 0;
  L->base = json_dumps(root, JSON_PRESERVE_ORDER);
  if (!L->base) return -1;
  L->base_len = strlen(L->base);
  return 0;
}

static int tokenise_line(worker *W, line_info *L, pft_record *rec, row *rc, row *rr) {
  scorer *S = W->S;
  W->p.n = W->c.n = W->r.n = 0;
  if (pft_encode(S->tok, rec->prompt, rec->prompt_len, &W->p) ||
      pft_encode(S->tok, rec->a, rec->a_len, &W->c) ||
      (rec->b && pft_encode(S->tok, rec->b, rec->b_len, &W->r)))
    return -1;
  size_t kept;
  if (pft_build_pair(W->p.v, W->p.n, W->c.v, W->c.n, rec->b ? W->r.v : NULL, W->r.n, S->max_len,
                     &rc->ids, &rr->ids, &kept))
    return -1;
  L->truncated = kept < W->p.n || W->c.n > S->max_len || (rec->b && W->r.n > S->max_len);
  return 0;
}

/* Step 2 for one line: parse, find the splice point, build the rows. */
static void prepare_line(worker *W, size_t j) {
  scorer *S = W->S;
  line_info *L = &S->lines[j];
  pft_record *rec = &S->recs[j];
  const char *t = S->text + L->off;
  char err[1024];
  memset(rec, 0, sizeof *rec);
  if (pft_line_is_blank(t, L->len)) {
    L->state = LINE_BLANK;
    return;
  }
  json_t *root = pft_parse_json_line(t, L->len, err, sizeof err);
  if (!root) {
    set_bad(L, err);
    return;
  }
  if (pft_record_from_json(root, PFT_WANT_ANY, rec, err, sizeof err)) {
    set_bad(L, err);
    goto done;
  }
  L->kind = rec->kind;
  if (rebase(L, root)) {
    set_bad(L, "out of memory");
    goto done;
  }
  if (find_splice(L->base ? L->base : t, L->base ? L->base_len : L->len, &L->splice, &L->comma)) {
    set_bad(L, "internal error: a parsed object that does not end in '}'");
    goto done;
  }
  row *rc = &S->rows[2 * j], *rr = &S->rows[2 * j + 1];
  if (S->token_model) {
    if (tokenise_line(W, L, rec, rc, rr)) {
      set_bad(L, "out of memory");
      goto done;
    }
    if (rc->ids.n == 0 || (rec->b && rr->ids.n == 0)) {
      set_bad(L, "a response has no tokens");
      goto done;
    }
  } else {
    rc->text = rec->a;
    rc->text_len = rec->a_len;
    rr->text = rec->b;
    rr->text_len = rec->b_len;
  }
  L->state = LINE_OK;
done:
  json_decref(root);
  /* token models are done with the text, but for a single's prompt that
   * plan_chunk compares with its neighbours' when prefixes are shared;
   * feature models hash the responses in step 3 */
  if (L->state != LINE_OK) {
    pft_record_free(rec);
  } else if (S->token_model) {
    if (S->share && rec->kind == PFT_REC_SINGLE) {
      free(rec->a);
      rec->a = NULL;
      rec->a_len = 0;
    } else {
      pft_record_free(rec);
    }
  }
}

static int cmp_u64(const void *a, const void *b) {
  uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
  return (x > y) - (x < y);
}

static int cmp_group(const void *a, const void *b) {
  return cmp_u64(&((const group *)a)->key, &((const group *)b)->key);
}

static uint32_t common_prefix(const pft_ids *a, const pft_ids *b) {
  size_t k = 0;
  while (k < a->n && k < b->n && a->v[k] == b->v[k])
    k++;
  return (uint32_t)k;
}

/* Token models with shared prefixes: group the rows of lines 0..limit (a
 * pair's two rows; consecutive singles with the same prompt), at most
 * --batch rows a group; sort the groups by their longest row and pack them
 * whole into batches of up to --batch rows. */
static void plan_groups(scorer *S) {
  size_t ng = 0, nr = 0;
  group *run = NULL;   /* the open group of singles */
  size_t run_line = 0; /* its first line */
  for (size_t j = 0; j < S->limit; j++) {
    const line_info *L = &S->lines[j];
    if (L->state != LINE_OK) continue;
    uint32_t i = (uint32_t)(2 * j);
    const pft_ids *ids = &S->rows[i].ids;
    if (L->kind == PFT_REC_PAIR) {
      run = NULL;
      const pft_ids *rj = &S->rows[i + 1].ids;
      int together = S->batch >= 2; /* with --batch 1 each row is alone */
      group *g = &S->groups[ng++];
      g->at = (uint32_t)nr;
      g->n = together ? 2 : 1;
      g->key = (uint64_t)(together && rj->n > ids->n ? rj->n : ids->n) << 32 | i;
      S->grow[nr] = i;
      S->glcp[nr++] = 0;
      if (!together) {
        g = &S->groups[ng++];
        g->at = (uint32_t)nr;
        g->n = 1;
        g->key = (uint64_t)rj->n << 32 | (i + 1);
      }
      S->grow[nr] = i + 1;
      S->glcp[nr++] = together ? common_prefix(ids, rj) : 0;
      continue;
    }
    const pft_record *a = &S->recs[j];
    if (run && run->n < S->batch) {
      const pft_record *p = &S->recs[run_line];
      if (p->prompt_len == a->prompt_len && memcmp(p->prompt, a->prompt, a->prompt_len) == 0) {
        const pft_ids *first = &S->rows[S->grow[run->at]].ids;
        if ((run->key >> 32) < ids->n) run->key = (uint64_t)ids->n << 32 | (run->key & 0xffffffffu);
        S->grow[nr] = i;
        S->glcp[nr++] = common_prefix(first, ids);
        run->n++;
        continue;
      }
    }
    run = &S->groups[ng++];
    run_line = j;
    run->at = (uint32_t)nr;
    run->n = 1;
    run->key = (uint64_t)ids->n << 32 | i;
    S->grow[nr] = i;
    S->glcp[nr++] = 0;
  }
  qsort(S->groups, ng, sizeof *S->groups, cmp_group);
  S->n_order = 0;
  S->n_batches = 0;
  for (size_t g = 0; g < ng; g++) {
    const group *G = &S->groups[g];
    if (S->n_batches == 0 || S->n_order - S->bstart[S->n_batches - 1] + G->n > S->batch)
      S->bstart[S->n_batches++] = S->n_order;
    for (uint32_t k = 0; k < G->n; k++) {
      uint32_t i = S->grow[G->at + k];
      S->order[S->n_order] = (uint64_t)S->rows[i].ids.n << 32 | i;
      S->pback[S->n_order] = k;
      S->plen[S->n_order++] = S->glcp[G->at + k];
    }
  }
  S->bstart[S->n_batches] = S->n_order;
}

/* Step 2 to 3, thread 0: which lines are written, which rows are scored, in
 * what order. With --on-bad-line fail nothing after the first bad line is. */
static void plan_chunk(scorer *S) {
  S->limit = S->n_lines;
  if (!S->skip_bad)
    for (size_t j = 0; j < S->n_lines; j++)
      if (S->lines[j].state == LINE_BAD) {
        S->limit = j + 1;
        break;
      }
  atomic_store(&S->next, 0);
  if (S->token_model && S->share) {
    plan_groups(S);
    return;
  }
  /* every row alone */
  S->n_order = 0;
  for (size_t j = 0; j < S->limit; j++) {
    const line_info *L = &S->lines[j];
    if (L->state != LINE_OK) continue;
    for (size_t k = 0; k < (L->kind == PFT_REC_PAIR ? 2u : 1u); k++) {
      uint64_t i = 2 * j + k;
      uint64_t len = S->token_model ? S->rows[i].ids.n : 0;
      S->order[S->n_order++] = len << 32 | i;
    }
  }
  /* feature rows all cost the same: no sorting */
  if (S->token_model) qsort(S->order, S->n_order, sizeof *S->order, cmp_u64);
  S->n_batches = (S->n_order + S->batch - 1) / S->batch;
  for (size_t b = 0; b <= S->n_batches; b++)
    S->bstart[b] = b * S->batch < S->n_order ? b * S->batch : S->n_order;
}

static int forward_batch(worker *W, size_t b, char *err, size_t err_size) {
  scorer *S = W->S;
  const uint64_t *ord = S->order + S->bstart[b];
  size_t n = S->bstart[b + 1] - S->bstart[b];
  prm_batch batch;
  prm_batch_init(&batch, PRM_BATCH_VERSION);
  if (S->token_model) {
    size_t stride = 0;
    for (size_t k = 0; k < n; k++)
      if ((size_t)(ord[k] >> 32) > stride) stride = (size_t)(ord[k] >> 32);
    uint64_t declared = 0;
    for (size_t k = 0; k < n; k++) {
      const pft_ids *ids = &S->rows[ord[k] & 0xffffffffu].ids;
      memcpy(W->tokens + k * stride, ids->v, ids->n * sizeof *ids->v);
      memset(W->tokens + k * stride + ids->n, 0, (stride - ids->n) * sizeof *ids->v);
      W->lengths[k] = (int32_t)ids->n;
      declared += ids->n;
      /* a group's rows are consecutive, its first row in the same batch */
      uint32_t back = S->share ? S->pback[S->bstart[b] + k] : 0;
      uint32_t len = back ? S->plen[S->bstart[b] + k] : 0;
      W->prefix_row[k] = len ? (int32_t)(k - back) : -1;
      W->prefix_len[k] = (int32_t)len;
    }
    batch.n = n;
    batch.tokens = W->tokens;
    batch.token_stride = stride;
    batch.lengths = W->lengths;
    /* rows with prefix_len 0 share nothing: a batch without sharing (and
     * every batch of --no-share-prefix) computes what an undeclared one does */
    batch.prefix_row = W->prefix_row;
    batch.prefix_len = W->prefix_len;
    int rc = prm_ctx_forward(W->ctx, &batch, W->scores, n);
    if (rc) {
      snprintf(err, err_size, "%s: %s", prm_status_string(rc), prm_ctx_errmsg(W->ctx));
      return -1;
    }
    W->tokens_declared += declared;
    W->tokens_computed += prm_ctx_tokens_computed(W->ctx);
  } else {
    /* features of up to fb rows at a time, so that the buffer stays bounded
     * whatever the model's input size */
    size_t fb = FEATURE_FLOATS / S->dim;
    if (fb < 1) fb = 1;
    if (fb > S->batch) fb = S->batch;
    for (size_t k0 = 0; k0 < n; k0 += fb) {
      size_t m = n - k0 < fb ? n - k0 : fb;
      for (size_t k = 0; k < m; k++) {
        const row *R = &S->rows[ord[k0 + k] & 0xffffffffu];
        pft_ngram_features(R->text, R->text_len, W->x + k * S->dim, S->dim);
      }
      batch.n = m;
      batch.features = W->x;
      batch.n_features = S->dim;
      int rc = prm_ctx_forward(W->ctx, &batch, W->scores + k0, m);
      if (rc) {
        snprintf(err, err_size, "%s: %s", prm_status_string(rc), prm_ctx_errmsg(W->ctx));
        return -1;
      }
    }
  }
  for (size_t k = 0; k < n; k++)
    S->rows[ord[k] & 0xffffffffu].score = W->scores[k];
  return 0;
}

static void report_bad(scorer *S, const line_info *L, const char *reason) {
  fprintf(stderr, "%s:%llu: %s\n", pft_reader_name(S->in), (unsigned long long)L->no, reason);
  if (S->skip_bad) {
    S->n_skipped++;
  } else {
    S->failed = 1;
    S->bad_line = 1;
  }
}

/* Step 4, thread 0. */
static void write_chunk(scorer *S) {
  if (S->fwd_err[0]) {
    fprintf(stderr, PROG ": scoring lines %llu-%llu failed: %s\n",
            (unsigned long long)S->lines[0].no, (unsigned long long)S->lines[S->n_lines - 1].no,
            S->fwd_err);
    S->failed = 1;
    return;
  }
  for (size_t j = 0; j < S->limit && !S->failed; j++) {
    const line_info *L = &S->lines[j];
    if (L->state == LINE_BLANK) continue;
    if (L->state == LINE_BAD) {
      report_bad(S, L, L->err ? L->err : "out of memory");
      continue;
    }
    int pair = L->kind == PFT_REC_PAIR;
    float raw[2] = {S->rows[2 * j].score, pair ? S->rows[2 * j + 1].score : 0.0f};
    float out[2] = {raw[0], raw[1]};
    int n = pair ? 2 : 1;
    if (!isfinite(raw[0]) || !isfinite(raw[1])) {
      report_bad(S, L, "the model's reward is not finite");
      continue;
    }
    if (S->normalise && (prm_model_normalise_rewards(S->model, out, (uint64_t)n) != PRM_OK ||
                         !isfinite(out[0]) || !isfinite(out[1]))) {
      report_bad(S, L, "the normalised reward is not finite");
      continue;
    }
    const char *t = L->base ? L->base : S->text + L->off;
    size_t len = L->base ? L->base_len : L->len;
    fwrite(t, 1, L->splice, S->out);
    const char *sep = L->comma ? ", " : "";
    if (pair) {
      float p = (float)(1.0 / (1.0 + exp(-((double)raw[0] - (double)raw[1]))));
      fprintf(S->out, "%s\"reward_chosen\": %.9g, \"reward_rejected\": %.9g, \"p_chosen\": %.9g",
              sep, (double)out[0], (double)out[1], (double)p);
    } else {
      fprintf(S->out, "%s\"reward\": %.9g", sep, (double)out[0]);
    }
    fwrite(t + L->splice, 1, len - L->splice, S->out);
    putc('\n', S->out);
    S->n_scored++;
    S->n_truncated += L->truncated != 0;
  }
  if (ferror(S->out)) {
    fprintf(stderr, PROG ": cannot write the output: %s\n", strerror(errno));
    S->failed = 1;
  }
}

static void release_chunk(scorer *S) {
  for (size_t j = 0; j < S->n_lines; j++) {
    free(S->lines[j].err);
    free(S->lines[j].base);
    pft_record_free(&S->recs[j]);
  }
}

static void *run_worker(void *arg) {
  worker *W = arg;
  scorer *S = W->S;
  if (W->id > 0) {
    /* wait until every thread has started (or one could not be) */
    pthread_mutex_lock(&S->mu);
    while (S->gate == 0)
      pthread_cond_wait(&S->gate_cv, &S->mu);
    int go = S->gate > 0;
    pthread_mutex_unlock(&S->mu);
    if (!go) return NULL;
  }
  for (;;) {
    if (W->id == 0) {
      S->stop = S->failed || S->eof;
      if (!S->stop) {
        read_chunk(S);
        S->stop = S->n_lines == 0;
        S->fwd_err[0] = '\0';
        atomic_store(&S->next, 0);
      }
    }
    pthread_barrier_wait(&S->barrier);
    if (S->stop) break;

    for (size_t j; (j = atomic_fetch_add(&S->next, 1)) < S->n_lines;)
      prepare_line(W, j);
    pthread_barrier_wait(&S->barrier);

    if (W->id == 0) plan_chunk(S);
    pthread_barrier_wait(&S->barrier);

    char err[1024];
    for (size_t b; (b = atomic_fetch_add(&S->next, 1)) < S->n_batches;) {
      if (forward_batch(W, b, err, sizeof err)) {
        pthread_mutex_lock(&S->mu);
        if (!S->fwd_err[0]) snprintf(S->fwd_err, sizeof S->fwd_err, "%s", err);
        pthread_mutex_unlock(&S->mu);
        break;
      }
    }
    pthread_barrier_wait(&S->barrier);

    if (W->id == 0) {
      write_chunk(S);
      release_chunk(S);
    }
  }
  return NULL;
}

/* ---- setup --------------------------------------------------------------------------------- */

typedef struct options {
  const char *model, *tokenizer, *input;
  size_t max_len; /* 0: not given */
  size_t threads, batch, chunk;
  int skip_bad, normalise, no_share_prefix;
} options;

static void parse_args(int argc, char **argv, options *o) {
  memset(o, 0, sizeof *o);
  o->threads = 1;
  o->batch = 64;
  o->chunk = 4096;
  int positional_only = 0;
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i];
    if (positional_only || a[0] != '-' || strcmp(a, "-") == 0) {
      if (o->input) die_usage("more than one input file ('%s')", a);
      o->input = a;
      continue;
    }
    if (strcmp(a, "--") == 0) {
      positional_only = 1;
      continue;
    }
    if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
      usage(stdout);
      exit(0);
    }
    if (strcmp(a, "--version") == 0) {
      printf(PROG " (libprefrm %s)\n", prm_version_string());
      exit(0);
    }
    if (strcmp(a, "--normalise") == 0 || strcmp(a, "--normalize") == 0) {
      o->normalise = 1;
      continue;
    }
    if (strcmp(a, "--no-share-prefix") == 0) {
      o->no_share_prefix = 1;
      continue;
    }
    /* options with a value: --name VALUE or --name=VALUE */
    static const char *with_value[] = {"--model", "--tokenizer", "--max-len",     "--threads",
                                       "--batch", "--chunk",     "--on-bad-line", NULL};
    const char *eq = strchr(a, '=');
    size_t nlen = eq ? (size_t)(eq - a) : strlen(a);
    const char *name = NULL;
    for (int k = 0; with_value[k]; k++)
      if (strlen(with_value[k]) == nlen && strncmp(a, with_value[k], nlen) == 0)
        name = with_value[k];
    if (!name) die_usage("unknown option '%s'", a);
    const char *v = eq ? eq + 1 : NULL;
    if (!v) {
      if (i + 1 >= argc) die_usage("%s needs a value", name);
      v = argv[++i];
    }
    if (strcmp(name, "--model") == 0)
      o->model = v;
    else if (strcmp(name, "--tokenizer") == 0)
      o->tokenizer = v;
    else if (strcmp(name, "--max-len") == 0)
      o->max_len = parse_count(name, v, 1, 1u << 30);
    else if (strcmp(name, "--threads") == 0)
      o->threads = parse_count(name, v, 1, 1024);
    else if (strcmp(name, "--batch") == 0)
      o->batch = parse_count(name, v, 1, 1u << 20);
    else if (strcmp(name, "--chunk") == 0)
      o->chunk = parse_count(name, v, 1, 1u << 24);
    else if (strcmp(v, "fail") == 0)
      o->skip_bad = 0;
    else if (strcmp(v, "skip") == 0)
      o->skip_bad = 1;
    else
      die_usage("--on-bad-line wants 'fail' or 'skip', not '%s'", v);
  }
  if (!o->model) die_usage("%s", "--model CKPT is required");
}

static const char *arch_name(int32_t arch) {
  switch (arch) {
  case PRM_ARCH_LINEAR: return "linear";
  case PRM_ARCH_MLP: return "mlp";
  case PRM_ARCH_GPT2: return "gpt2";
  case PRM_ARCH_LLAMA: return "llama";
  }
  return "unknown";
}

/* The model, and how text becomes its input. Returns 0, or -1 (reported). */
static int setup_input(scorer *S, const options *o, prm_model **model, pft_tokenizer **tok) {
  int rc = prm_model_load(model, o->model);
  if (rc) {
    fprintf(stderr, PROG ": cannot load the model '%s': %s: %s\n", o->model, prm_status_string(rc),
            prm_last_errmsg());
    return -1;
  }
  S->model = *model;
  int32_t arch = prm_model_arch(*model);
  S->token_model = arch == PRM_ARCH_GPT2 || arch == PRM_ARCH_LLAMA;
  if (S->normalise && prm_model_reward_norm(*model, NULL, NULL) != PRM_OK) {
    fprintf(stderr, PROG ": --normalise: the model '%s' has no reward normalisation statistics\n",
            o->model);
    return -1;
  }

  char path[8192], err[1024];
  pft_sidecar sc;
  int have_sidecar = 0;
  struct stat st;
  if (pft_sidecar_path(o->model, path, sizeof path)) {
    fprintf(stderr, PROG ": the model path is too long\n");
    return -1;
  }
  if (stat(path, &st) == 0 || errno != ENOENT) {
    if (pft_sidecar_read(path, &sc, err, sizeof err)) {
      fprintf(stderr, PROG ": %s\n", err);
      return -1;
    }
    have_sidecar = 1;
    if (sc.ngrams == S->token_model) {
      fprintf(stderr, PROG ": the sidecar '%s' says \"input\": \"%s\", but the model is %s\n", path,
              sc.ngrams ? "ngrams" : "tokens", arch_name(arch));
      return -1;
    }
  }

  if (!S->token_model) {
    if (o->tokenizer || o->max_len) {
      fprintf(stderr,
              PROG ": --tokenizer and --max-len are for token models (gpt2, llama); "
                   "this model is %s, which reads n-gram features\nTry '" PROG " --help'.\n",
              arch_name(arch));
      exit(EXIT_USAGE);
    }
    uint64_t d = prm_model_input_size(*model);
    if (d == 0 || d > UINT32_MAX) {
      fprintf(stderr, PROG ": the model's input size %llu is not usable for n-gram features\n",
              (unsigned long long)d);
      return -1;
    }
    S->dim = (uint32_t)d;
    return 0;
  }

  prm_model_options mo;
  prm_model_options_init(&mo, PRM_MODEL_OPTIONS_VERSION);
  prm_model_get_options(*model, &mo);
  const char *spec = o->tokenizer ? o->tokenizer : have_sidecar ? sc.tokenizer : "bytes";
  uint64_t max_len = o->max_len ? o->max_len : have_sidecar ? sc.max_len : mo.n_ctx;
  if (max_len > mo.n_ctx) {
    fprintf(stderr, PROG ": max_len %llu (%s) exceeds the model's n_ctx %llu\n",
            (unsigned long long)max_len, o->max_len ? "--max-len" : path,
            (unsigned long long)mo.n_ctx);
    if (o->max_len) {
      fprintf(stderr, "Try '" PROG " --help'.\n");
      exit(EXIT_USAGE);
    }
    return -1;
  }
  S->max_len = (size_t)max_len;
  if (pft_tokenizer_open(tok, spec, err, sizeof err)) {
    fprintf(stderr, PROG ": %s\n", err);
    return -1;
  }
  S->tok = *tok;
  if (pft_tokenizer_vocab_size(*tok) > mo.vocab_size) {
    fprintf(stderr, PROG ": the tokenizer '%s' has %u ids, the model's vocabulary only %llu\n",
            spec, pft_tokenizer_vocab_size(*tok), (unsigned long long)mo.vocab_size);
    return -1;
  }
  return 0;
}

static int setup_workers(scorer *S) {
  S->workers = calloc((size_t)S->n_threads, sizeof *S->workers);
  if (!S->workers) return -1;
  prm_ctx_options co;
  prm_ctx_options_init(&co, PRM_CTX_OPTIONS_VERSION);
  co.inference = 1;
  co.max_rows = S->batch;
  co.max_len = S->token_model ? S->max_len : 0;
  for (int t = 0; t < S->n_threads; t++) {
    worker *W = &S->workers[t];
    W->S = S;
    W->id = t;
    int rc = prm_ctx_new(&W->ctx, S->model, &co);
    if (rc) {
      fprintf(stderr, PROG ": cannot create inference context %d (batch %zu%s): %s: %s\n", t + 1,
              S->batch, S->token_model ? ", lower --batch or --max-len" : "", prm_status_string(rc),
              prm_last_errmsg());
      return -1;
    }
    W->scores = malloc(S->batch * sizeof *W->scores);
    if (S->token_model) {
      W->tokens = malloc(S->batch * S->max_len * sizeof *W->tokens);
      W->lengths = malloc(S->batch * sizeof *W->lengths);
      W->prefix_row = malloc(S->batch * sizeof *W->prefix_row);
      W->prefix_len = malloc(S->batch * sizeof *W->prefix_len);
      if (!W->tokens || !W->lengths || !W->prefix_row || !W->prefix_len) goto nomem;
    } else {
      size_t fb = FEATURE_FLOATS / S->dim;
      if (fb < 1) fb = 1;
      if (fb > S->batch) fb = S->batch;
      W->x = malloc(fb * S->dim * sizeof *W->x);
      if (!W->x) goto nomem;
    }
    if (!W->scores) goto nomem;
  }
  return 0;
nomem:
  fprintf(stderr, PROG ": out of memory for the batch buffers\n");
  return -1;
}

static void free_workers(scorer *S) {
  for (int t = 0; S->workers && t < S->n_threads; t++) {
    worker *W = &S->workers[t];
    prm_ctx_free(W->ctx);
    free(W->p.v);
    free(W->c.v);
    free(W->r.v);
    free(W->x);
    free(W->tokens);
    free(W->lengths);
    free(W->prefix_row);
    free(W->prefix_len);
    free(W->scores);
  }
  free(S->workers);
}

int main(int argc, char **argv) {
  options o;
  parse_args(argc, argv, &o);

  scorer S;
  memset(&S, 0, sizeof S);
  S.batch = o.batch;
  S.chunk = o.chunk;
  S.skip_bad = o.skip_bad;
  S.normalise = o.normalise;
  S.share = !o.no_share_prefix;
  S.n_threads = (int)o.threads;
  S.out = stdout;
  prm_model *model = NULL;
  pft_tokenizer *tok = NULL;
  int status = 1, threads_started = 0, sync_ready = 0;
  static char outbuf[1 << 20];
  setvbuf(stdout, outbuf, _IOFBF, sizeof outbuf);
  /* jansson seeds its hash function on first use; do it before the threads */
  json_object_seed(0);

  if (setup_input(&S, &o, &model, &tok) || setup_workers(&S)) goto done;
  char err[1024];
  if (pft_reader_open(&S.in, o.input, err, sizeof err)) {
    fprintf(stderr, PROG ": %s\n", err);
    goto done;
  }
  S.lines = calloc(S.chunk, sizeof *S.lines);
  S.recs = calloc(S.chunk, sizeof *S.recs);
  S.rows = calloc(2 * S.chunk, sizeof *S.rows);
  S.order = calloc(2 * S.chunk, sizeof *S.order);
  S.bstart = calloc(2 * S.chunk + 1, sizeof *S.bstart);
  if (!S.lines || !S.recs || !S.rows || !S.order || !S.bstart) {
    fprintf(stderr, PROG ": out of memory\n");
    goto done;
  }
  if (S.token_model && S.share) {
    S.pback = calloc(2 * S.chunk, sizeof *S.pback);
    S.plen = calloc(2 * S.chunk, sizeof *S.plen);
    S.groups = calloc(2 * S.chunk, sizeof *S.groups);
    S.grow = calloc(2 * S.chunk, sizeof *S.grow);
    S.glcp = calloc(2 * S.chunk, sizeof *S.glcp);
    if (!S.pback || !S.plen || !S.groups || !S.grow || !S.glcp) {
      fprintf(stderr, PROG ": out of memory\n");
      goto done;
    }
  }
  if (pthread_barrier_init(&S.barrier, NULL, (unsigned)S.n_threads) ||
      pthread_mutex_init(&S.mu, NULL) || pthread_cond_init(&S.gate_cv, NULL)) {
    fprintf(stderr, PROG ": cannot set up the threads\n");
    goto done;
  }
  sync_ready = 1;

  /* The barrier counts every thread: start them all before any may use it. */
  for (int t = 1; t < S.n_threads; t++) {
    if (pthread_create(&S.workers[t].thread, NULL, run_worker, &S.workers[t])) {
      fprintf(stderr, PROG ": cannot start thread %d of %d\n", t + 1, S.n_threads);
      break;
    }
    threads_started = t;
  }
  int all = threads_started == S.n_threads - 1;
  pthread_mutex_lock(&S.mu);
  S.gate = all ? 1 : -1;
  pthread_cond_broadcast(&S.gate_cv);
  pthread_mutex_unlock(&S.mu);
  if (all) run_worker(&S.workers[0]);
  for (int t = 1; t <= threads_started; t++)
    pthread_join(S.workers[t].thread, NULL);
  if (!all) goto done;

  if (fflush(stdout)) {
    fprintf(stderr, PROG ": cannot write the output: %s\n", strerror(errno));
    S.failed = 1;
  }
  if (S.n_skipped)
    fprintf(stderr, PROG ": skipped %llu bad line%s, scored %llu\n",
            (unsigned long long)S.n_skipped, S.n_skipped == 1 ? "" : "s",
            (unsigned long long)S.n_scored);
  if (S.n_truncated)
    fprintf(stderr, PROG ": %llu line%s longer than max_len %zu tokens, truncated\n",
            (unsigned long long)S.n_truncated, S.n_truncated == 1 ? " was" : "s were", S.max_len);
  uint64_t computed = 0, declared = 0;
  for (int t = 0; t < S.n_threads; t++) {
    computed += S.workers[t].tokens_computed;
    declared += S.workers[t].tokens_declared;
  }
  if (S.token_model && declared)
    fprintf(stderr, PROG ": computed %llu of %llu tokens (shared prefixes saved %.1f%%)\n",
            (unsigned long long)computed, (unsigned long long)declared,
            100.0 * (double)(declared - computed) / (double)declared);
  status = S.bad_line ? EXIT_BAD_LINE : S.failed || S.read_failed ? 1 : 0;

done:
  if (sync_ready) {
    pthread_barrier_destroy(&S.barrier);
    pthread_mutex_destroy(&S.mu);
    pthread_cond_destroy(&S.gate_cv);
  }
  for (size_t i = 0; S.rows && i < 2 * S.chunk; i++)
    free(S.rows[i].ids.v);
  free(S.rows);
  free(S.order);
  free(S.bstart);
  free(S.pback);
  free(S.plen);
  free(S.groups);
  free(S.grow);
  free(S.glcp);
  free(S.recs);
  free(S.lines);
  free(S.text);
  pft_reader_close(S.in);
  free_workers(&S);
  pft_tokenizer_free(tok);
  prm_model_free(model);
  return status;
}
