/*
 * bench_train.c - time libprefrm training steps, the C twin of
 * `torch_ref.py bench` (../shared/reference/torch_ref.py).
 *
 *   bench_train [--model linear|mlp|gpt2|llama] [--d D] [--hidden 1024,256]
 *               [--act gelu|relu|tanh] [--batch P] [--steps S] [--warmup W] [--lr 1e-4]
 *               [--seed 0] [--batches NB] [--threads N] [--workers W] [--no-phases]
 *               [--blas-probe]
 *               [--json-out FILE]
 *   gpt2/llama: [--vocab 512] [--ctx 128] [--dim 128] [--layers 4] [--heads 4]
 *               [--seq-len T] [--min-len M] [--score]
 *   llama:      [--kv-heads G] [--head-dim HD] [--ffn F] [--rope-theta 10000]
 *               [--rms-eps 1e-6] [--attn-bias] [--qk-norm]
 *
 * gpt2 and llama (torch_ref's token-model benches: 16 pairs of full-length
 * sequences per step; --score times scoring instead of training) are
 * described at run_tok.
 *
 * Defaults are torch_ref's: linear d=4096 with 256 pairs per step; mlp
 * 768 -> 1024 -> 256 (gelu-tanh) with 64 pairs per step; AdamW lr 1e-4, no
 * weight decay, no clipping. NB = min(S + W, 8) distinct random N(0,1)
 * batches of 2P rows are made up front and cycled, as torch_ref does, so the
 * linear case streams its 8 MB feature matrix from memory rather than from a
 * hot cache.
 *
 * Each timed step is one prm_train_step (forward of 2P rows, Bradley-Terry
 * loss, backward, AdamW update). Output: a human line, then
 * "JSON {...}" with torch_ref's key names where they apply (ms_step_median,
 * pairs_per_s, gflops_per_s, ...) plus peak RSS and the allocation check.
 *
 * Threads: the library never touches BLAS threading, so the count comes from
 * the environment (OPENBLAS_NUM_THREADS / OMP_NUM_THREADS), which OpenBLAS
 * reads when it is loaded -- before main. --threads N therefore sets both
 * variables and re-executes the program when they differ.
 *
 * --workers W (gpt2, llama) runs the context on a prm_pool of W workers
 * (prm_ctx_options.parallel_for: the library's own threading, independent
 * of the BLAS's threads, which --threads sets).
 *
 * --no-phases skips the second loop that times forward+loss / backward /
 * optimizer separately through the split API (prm_ctx_forward, prm_loss_bt,
 * prm_ctx_backward, prm_optimizer_step). Note that prm_ctx_forward copies and
 * validates the features, which prm_train_step does not, so the phase sum
 * is larger than a train step (noticeably so for linear).
 *
 * --blas-probe measures what the BLAS under the library can do on this
 * machine with the benchmark's own shapes (sgemm GFLOP/s, sgemv GB/s), via
 * dlsym of the cblas_* symbols that libprefrm's BLAS brings into the process.
 * It calls the BLAS directly: it is a ceiling, not a libprefrm figure.
 *
 * A "blas: ..." line after the result names the BLAS measured, and the JSON
 * carries it as "blas": {...}: the CBLAS the build was configured with
 * (PRM_BENCH_CBLAS, set by tests/bench/CMakeLists.txt), the shared object
 * that cblas_sgemm really resolved to in this process (dladdr, then
 * realpath: Debian's libblas.so.3 is an alternatives link) and, where the
 * library says more about itself, its own description (OpenBLAS:
 * openblas_get_config, core and threads; BLIS: version, architecture).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <limits.h>
#include <link.h>
#include <math.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#ifdef __GLIBC__
#include <malloc.h>
#endif

#include <prefrm.h>

/* ---- allocation accounting ------------------------------------------------------------ */

/*
 * "No allocation inside a training step after the first one" (STYLE.md) is
 * checked three ways, each seeing something the others miss:
 *
 *  1. malloc-family call counter. On glibc without sanitizers this file
 *     defines malloc/calloc/realloc/free/aligned_alloc/posix_memalign/
 *     memalign and forwards them to glibc's own __libc_* entry points. A
 *     definition in the executable interposes on every shared object, so
 *     calls from libprefrm, OpenBLAS and libc itself (from any thread) are
 *     counted -- including a malloc/free pair within one step, which a
 *     before/after balance cannot see. It cannot see memory obtained without
 *     malloc: mmap/brk called directly (OpenBLAS gets its GEMM buffers that
 *     way, once, at start-up), alloca, or large stack arrays (VLAs).
 *  2. glibc mallinfo2(): net change of bytes in use (uordblks), arena size
 *     and number/size of mmapped chunks (hblks/hblkhd) across the timed
 *     steps. Sees only the net balance, but also works where (1) is off.
 *  3. minor page faults (getrusage ru_minflt) across the timed steps: first
 *     touches of new memory, however obtained (mmap included). After warm-up
 *     every buffer a step uses has been touched, so this should stay near 0;
 *     a fresh mmap per step (the cost torch_ref's GLIBC_TUNABLES avoids)
 *     shows up here. Faults also come from things that are not allocations
 *     (the kernel reclaiming pages, stack growth), so it is reported as a
 *     number and not folded into the verdict.
 *
 * "allocations_in_steps" is true when (1) counted a call or (2) saw a net
 * change during the timed steps.
 */
#if defined(__GLIBC__) && !defined(__SANITIZE_ADDRESS__) && !defined(__SANITIZE_THREAD__) &&       \
    !defined(BENCH_NO_MALLOC_HOOK)
#define BENCH_COUNT_MALLOC 1
static atomic_ullong n_alloc_calls; /* malloc, calloc, realloc, aligned allocations */
static atomic_ullong n_free_calls;  /* free of a non-NULL pointer */
/* Allocation calls whose immediate caller lies in libprefrm: [lib_lo, lib_hi). */
static atomic_ullong n_lib_calls;
static uintptr_t lib_lo, lib_hi;

static void count_call(const void *caller) {
  atomic_fetch_add_explicit(&n_alloc_calls, 1, memory_order_relaxed);
  uintptr_t a = (uintptr_t)caller;
  if (a >= lib_lo && a < lib_hi) atomic_fetch_add_explicit(&n_lib_calls, 1, memory_order_relaxed);
}
#define COUNT_CALL() count_call(__builtin_return_address(0))

extern void *__libc_malloc(size_t);
extern void *__libc_calloc(size_t, size_t);
extern void *__libc_realloc(void *, size_t);
extern void __libc_free(void *);
extern void *__libc_memalign(size_t, size_t);

void *malloc(size_t n) {
  COUNT_CALL();
  return __libc_malloc(n);
}
void *calloc(size_t c, size_t n) {
  COUNT_CALL();
  return __libc_calloc(c, n);
}
void *realloc(void *p, size_t n) {
  COUNT_CALL();
  return __libc_realloc(p, n);
}
void free(void *p) {
  if (p != NULL) atomic_fetch_add_explicit(&n_free_calls, 1, memory_order_relaxed);
  __libc_free(p);
}
void *aligned_alloc(size_t align, size_t n) {
  COUNT_CALL();
  return __libc_memalign(align, n);
}
void *memalign(size_t align, size_t n) {
  COUNT_CALL();
  return __libc_memalign(align, n);
}
int posix_memalign(void **out, size_t align, size_t n) {
  COUNT_CALL();
  if (align < sizeof(void *) || (align & (align - 1)) != 0) return EINVAL;
  void *p = __libc_memalign(align, n);
  if (p == NULL) return ENOMEM;
  *out = p;
  return 0;
}

/* Find the loaded segments of the object that holds `addr` (libprefrm). */
static int find_object(struct dl_phdr_info *info, size_t size, void *data) {
  (void)size;
  uintptr_t addr = (uintptr_t)data, lo = UINTPTR_MAX, hi = 0;
  for (int i = 0; i < info->dlpi_phnum; i++) {
    const ElfW(Phdr) *ph = &info->dlpi_phdr[i];
    if (ph->p_type != PT_LOAD) continue;
    uintptr_t s = (uintptr_t)info->dlpi_addr + ph->p_vaddr;
    if (s < lo) lo = s;
    if (s + ph->p_memsz > hi) hi = s + ph->p_memsz;
  }
  if (addr < lo || addr >= hi) return 0;
  lib_lo = lo;
  lib_hi = hi;
  return 1;
}
static void locate_library(void) {
  dl_iterate_phdr(find_object, (void *)(uintptr_t)&prm_train_step);
}
#else
#define BENCH_COUNT_MALLOC 0
static void locate_library(void) {}
#endif

typedef struct alloc_snapshot {
  unsigned long long alloc_calls, free_calls, lib_calls;
  long minflt;
  int have_mallinfo;
  size_t uordblks, arena, hblks, hblkhd;
} alloc_snapshot;

static void take_snapshot(alloc_snapshot *s) {
  memset(s, 0, sizeof *s);
#if BENCH_COUNT_MALLOC
  s->alloc_calls = atomic_load(&n_alloc_calls);
  s->free_calls = atomic_load(&n_free_calls);
  s->lib_calls = atomic_load(&n_lib_calls);
#endif
#if defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 33))
  struct mallinfo2 mi = mallinfo2(); /* itself allocation-free */
  s->have_mallinfo = 1;
  s->uordblks = mi.uordblks;
  s->arena = mi.arena;
  s->hblks = mi.hblks;
  s->hblkhd = mi.hblkhd;
#endif
  struct rusage ru;
  if (getrusage(RUSAGE_SELF, &ru) == 0) s->minflt = ru.ru_minflt;
}

/* ---- helpers ----------------------------------------------------------------------------- */

#define CHECK(call)                                                                                \
  do {                                                                                             \
    int rc_ = (call);                                                                              \
    if (rc_ != PRM_OK) {                                                                           \
      fprintf(stderr, "bench_train: %s failed: %s (%s)\n", #call, prm_status_string(rc_),          \
              prm_last_errmsg());                                                                  \
      exit(1);                                                                                     \
    }                                                                                              \
  } while (0)

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

/* Median of n values; sorts v. */
static double median(double *v, size_t n) {
  qsort(v, n, sizeof *v, cmp_double);
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

static double mean(const double *v, size_t n) {
  double s = 0.0;
  for (size_t i = 0; i < n; i++)
    s += v[i];
  return s / (double)n;
}

/* The bench's own generator (splitmix64 + Box-Muller) for the synthetic features. */
static uint64_t rng_state;
static uint64_t rng_next(void) {
  uint64_t z = (rng_state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}
static double rng_uniform(void) { return ((double)(rng_next() >> 11) + 0.5) * 0x1.0p-53; }
static void fill_normal(float *x, size_t n) {
  for (size_t i = 0; i < n; i += 2) {
    double r = sqrt(-2.0 * log(rng_uniform())), t = 6.283185307179586 * rng_uniform();
    x[i] = (float)(r * cos(t));
    if (i + 1 < n) x[i + 1] = (float)(r * sin(t));
  }
}

static void *xmalloc(size_t n) {
  void *p = malloc(n);
  if (p == NULL) {
    fprintf(stderr, "bench_train: out of memory (%zu bytes)\n", n);
    exit(1);
  }
  return p;
}

static const char *env_or(const char *name, const char *dflt) {
  const char *v = getenv(name);
  return v ? v : dflt;
}

/* ---- which BLAS ---------------------------------------------------------------------------- */

#ifndef PRM_BENCH_CBLAS /* compiled outside tests/bench/CMakeLists.txt */
#define PRM_BENCH_CBLAS "unknown"
#endif
#ifndef PRM_BENCH_CBLAS_HEADER
#define PRM_BENCH_CBLAS_HEADER "unknown"
#endif

typedef struct blas_identity {
  char object[PATH_MAX];   /* the object defining cblas_sgemm, as mapped ("" if none) */
  char resolved[PATH_MAX]; /* its realpath */
  char detail[512];        /* the library's own description, "" if it has none */
} blas_identity;
static blas_identity blas_id;

static void json_blank(char *s) {
  for (; *s; s++)
    if (*s == '"' || *s == '\\' || (unsigned char)*s < 0x20) *s = ' ';
}

/* Fills blas_id, before anything is timed. Looks symbols up in the whole process
 * (RTLD_DEFAULT): the BLAS is libprefrm's dependency, so it is loaded with the program. */
static void blas_identify(void) {
  void *sgemm = dlsym(RTLD_DEFAULT, "cblas_sgemm");
  Dl_info info;
  if (sgemm != NULL && dladdr(sgemm, &info) != 0 && info.dli_fname != NULL) {
    snprintf(blas_id.object, sizeof blas_id.object, "%s", info.dli_fname);
    if (realpath(info.dli_fname, blas_id.resolved) == NULL)
      snprintf(blas_id.resolved, sizeof blas_id.resolved, "%s", info.dli_fname);
  }
  typedef char *(*str_fn)(void);
  typedef int (*int_fn)(void);
  str_fn ob_config = (str_fn)(uintptr_t)dlsym(RTLD_DEFAULT, "openblas_get_config");
  str_fn ob_core = (str_fn)(uintptr_t)dlsym(RTLD_DEFAULT, "openblas_get_corename");
  int_fn ob_threads = (int_fn)(uintptr_t)dlsym(RTLD_DEFAULT, "openblas_get_num_threads");
  str_fn bli_version = (str_fn)(uintptr_t)dlsym(RTLD_DEFAULT, "bli_info_get_version_str");
  int_fn bli_arch = (int_fn)(uintptr_t)dlsym(RTLD_DEFAULT, "bli_arch_query_id");
  typedef char *(*arch_str_fn)(int);
  arch_str_fn bli_arch_name = (arch_str_fn)(uintptr_t)dlsym(RTLD_DEFAULT, "bli_arch_string");
  int_fn bli_threads = (int_fn)(uintptr_t)dlsym(RTLD_DEFAULT, "bli_thread_get_num_threads");
  if (ob_config != NULL)
    snprintf(blas_id.detail, sizeof blas_id.detail, "%s, core %s, threads %d", ob_config(),
             ob_core ? ob_core() : "?", ob_threads ? ob_threads() : -1);
  else if (bli_version != NULL)
    snprintf(blas_id.detail, sizeof blas_id.detail, "BLIS %s, arch %s, threads %d", bli_version(),
             bli_arch && bli_arch_name ? bli_arch_name(bli_arch()) : "?",
             bli_threads ? bli_threads() : -1);
  /* they go into JSON strings: blank what would need escaping there */
  json_blank(blas_id.object);
  json_blank(blas_id.resolved);
  json_blank(blas_id.detail);
}

/* The "blas:" line of the report (after the result line, which run_bench.sh takes as the
 * first line of the output). */
static void print_blas_line(void) {
  printf("blas: configured %s (%s); cblas_sgemm from %s", PRM_BENCH_CBLAS, PRM_BENCH_CBLAS_HEADER,
         blas_id.object[0] ? blas_id.object : "(not found)");
  if (strcmp(blas_id.object, blas_id.resolved) != 0) printf(" -> %s", blas_id.resolved);
  if (blas_id.detail[0]) printf("; %s", blas_id.detail);
  printf("\n");
}

/* Appends `"blas": {...}, ` to json at *u. */
static void json_blas_keys(char *json, size_t cap, size_t *u) {
  *u += (size_t)snprintf(json + *u, cap - *u,
                         "\"blas\": {\"configured\": \"%s\", \"header\": \"%s\", "
                         "\"library\": \"%s\", \"resolved\": \"%s\", \"detail\": \"%s\"}, ",
                         PRM_BENCH_CBLAS, PRM_BENCH_CBLAS_HEADER, blas_id.object, blas_id.resolved,
                         blas_id.detail);
}

/* ---- BLAS probe ----------------------------------------------------------------------------- */

/* CBLAS enum values (fixed by the CBLAS standard); declared here so the
 * bench needs no <cblas.h>. */
enum { CB_ROW = 101, CB_NOTRANS = 111, CB_TRANS = 112 };
typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int, const float *,
                         int, float, float *, int);
typedef void (*sgemv_fn)(int, int, int, int, float, const float *, int, const float *, int, float,
                         float *, int);

/* Repeat fn until ~0.25 s passed (at least 3 runs); returns the median seconds per run. */
#define PROBE_MAX_RUNS 4096
static double probe_time(void (*body)(void *), void *arg) {
  static double t[PROBE_MAX_RUNS];
  size_t n = 0;
  body(arg); /* warm-up */
  double start = now_s();
  while (n < PROBE_MAX_RUNS && (n < 3 || now_s() - start < 0.25)) {
    double t0 = now_s();
    body(arg);
    t[n++] = now_s() - t0;
  }
  return median(t, n);
}

typedef struct gemm_case {
  sgemm_fn f;
  int ta, tb, m, n, k;
  float *a, *b, *c;
} gemm_case;
static void run_gemm(void *p) {
  gemm_case *g = p;
  int lda = g->ta ? g->m : g->k, ldb = g->tb ? g->k : g->n;
  g->f(CB_ROW, g->ta ? CB_TRANS : CB_NOTRANS, g->tb ? CB_TRANS : CB_NOTRANS, g->m, g->n, g->k, 1.0f,
       g->a, lda, g->b, ldb, 0.0f, g->c, g->n);
}

typedef struct gemv_case {
  sgemv_fn f;
  int trans, m, n, nb, next;
  float *const *a; /* nb matrices (m, n), cycled: nb = 1 keeps A hot in cache */
  float *x, *y;
} gemv_case;
static void run_gemv(void *p) {
  gemv_case *g = p;
  const float *a = g->a[g->next];
  g->next = (g->next + 1) % g->nb;
  g->f(CB_ROW, g->trans ? CB_TRANS : CB_NOTRANS, g->m, g->n, 1.0f, a, g->n, g->x, 1, 0.0f, g->y, 1);
}

typedef struct gemm_shape {
  const char *key; /* JSON key of the GFLOP/s figure */
  int ta, tb, m, n, k;
} gemm_shape;

/* Times each sgemm shape (row-major, C = op(A) op(B)), prints a line per shape and appends
 * `"key": GFLOP/s, ` to json. Returns strlen(json). */
static size_t probe_gemms(char *json, size_t cap, sgemm_fn sgemm, const gemm_shape *shapes,
                          int n_shapes) {
  size_t need = 0;
  for (int i = 0; i < n_shapes; i++) {
    size_t mk = (size_t)shapes[i].m * shapes[i].k, kn = (size_t)shapes[i].k * shapes[i].n,
           mn = (size_t)shapes[i].m * shapes[i].n;
    if (mk > need) need = mk;
    if (kn > need) need = kn;
    if (mn > need) need = mn;
  }
  float *a = xmalloc(need * sizeof(float)), *b = xmalloc(need * sizeof(float)),
        *c = xmalloc(need * sizeof(float));
  fill_normal(a, need);
  fill_normal(b, need);
  size_t used = strlen(json);
  printf("blas probe (calls the BLAS directly; %s threads):\n",
         env_or("OPENBLAS_NUM_THREADS", "?"));
  for (int i = 0; i < n_shapes; i++) {
    const gemm_shape *s = &shapes[i];
    gemm_case g = {sgemm, s->ta, s->tb, s->m, s->n, s->k, a, b, c};
    double t = probe_time(run_gemm, &g);
    double gf = 2.0 * s->m * s->n * s->k / t * 1e-9;
    printf("  sgemm %s%s m=%d n=%d k=%d: %.3f ms, %.1f GFLOP/s\n", s->ta ? "T" : "N",
           s->tb ? "T" : "N", s->m, s->n, s->k, t * 1e3, gf);
    used += (size_t)snprintf(json + used, cap - used, "\"%s\": %.2f, ", s->key, gf);
  }
  free(a);
  free(b);
  free(c);
  return used;
}

/* Appends `"blas_probe": {...}, ` to json (cap bytes). Returns 0 if the BLAS is not reachable. */
static int blas_probe(char *json, size_t cap, int is_mlp, uint64_t rows, uint64_t d,
                      const uint64_t *hidden, uint32_t n_hidden, float *const *batches, int nb) {
  sgemm_fn sgemm = (sgemm_fn)(uintptr_t)dlsym(RTLD_DEFAULT, "cblas_sgemm");
  sgemv_fn sgemv = (sgemv_fn)(uintptr_t)dlsym(RTLD_DEFAULT, "cblas_sgemv");
  if (sgemm == NULL || sgemv == NULL) {
    printf("blas probe: cblas_sgemm/cblas_sgemv not found in the process; skipped\n");
    return 0;
  }
  size_t used = strlen(json);
  used += (size_t)snprintf(json + used, cap - used, "\"blas_probe\": {");
  /* GEMMs: a large square one (near the kernel's peak), then the shapes of the
   * mlp step's first layer: forward Z = X W^T, weight gradient dW = dZ^T X. */
  {
    uint64_t in0 = is_mlp ? d : 768, out0 = is_mlp ? hidden[0] : 1024, r = is_mlp ? rows : 128;
    const gemm_shape shapes[3] = {
        {"sgemm_1024_gflops", 0, 0, 1024, 1024, 1024},
        {"sgemm_fwd_layer0_gflops", 0, 1, (int)r, (int)out0, (int)in0},
        {"sgemm_wgrad_layer0_gflops", 1, 0, (int)out0, (int)in0, (int)r},
    };
    used = probe_gemms(json, cap, sgemm, shapes, 3);
  }
  (void)n_hidden;
  /* GEMVs over the step's feature matrix X (rows, d): the linear model's
   * forward (s = X w) and backward (g = X^T ds). "hot": the same X every time
   * (stays in L2/L3 if it fits); "cold": the nb distinct batches in turn, as
   * the training loop sees them. GB/s counts the bytes of X once. */
  {
    float *x = xmalloc((size_t)(rows > d ? rows : d) * sizeof(float));
    float *y = xmalloc((size_t)(rows > d ? rows : d) * sizeof(float));
    fill_normal(x, rows > d ? rows : d);
    const double bytes = (double)rows * (double)d * sizeof(float);
    for (int trans = 0; trans < 2; trans++)
      for (int cold = 0; cold < 2; cold++) {
        gemv_case g = {sgemv, trans, (int)rows, (int)d, cold ? nb : 1, 0, batches, x, y};
        double t = probe_time(run_gemv, &g);
        printf("  sgemv %s (%llu x %llu, %s, %d buffer%s): %.3f ms, %.1f GB/s\n", trans ? "T" : "N",
               (unsigned long long)rows, (unsigned long long)d, cold ? "cold" : "hot", g.nb,
               g.nb > 1 ? "s" : "", t * 1e3, bytes / t * 1e-9);
        used += (size_t)snprintf(json + used, cap - used, "\"sgemv_%s_%s_gbs\": %.2f, ",
                                 trans ? "t" : "n", cold ? "cold" : "hot", bytes / t * 1e-9);
      }
    free(x);
    free(y);
  }
  if (used >= 2 && json[used - 2] == ',') used -= 2;
  snprintf(json + used, cap - used, "}, ");
  return 1;
}

/* ---- allocation deltas (shared by the report lines) -------------------------------------- */

typedef struct alloc_delta {
  unsigned long long calls, frees, lib_calls;
  long long used, arena, hblks, hblkhd;
  long minflt;
  int allocs; /* the verdict: a counted call or a net mallinfo2 change */
} alloc_delta;

static alloc_delta diff_snapshots(const alloc_snapshot *before, const alloc_snapshot *after) {
  alloc_delta d;
  d.calls = after->alloc_calls - before->alloc_calls;
  d.frees = after->free_calls - before->free_calls;
  d.lib_calls = after->lib_calls - before->lib_calls;
  d.used = (long long)after->uordblks - (long long)before->uordblks;
  d.arena = (long long)after->arena - (long long)before->arena;
  d.hblks = (long long)after->hblks - (long long)before->hblks;
  d.hblkhd = (long long)after->hblkhd - (long long)before->hblkhd;
  d.minflt = after->minflt - before->minflt;
  d.allocs =
      d.calls != 0 || d.frees != 0 || d.used != 0 || d.arena != 0 || d.hblks != 0 || d.hblkhd != 0;
  return d;
}

static void print_memory_line(long peak_rss_kb, double data_mb, long steps, const alloc_delta *d) {
  printf("memory: peak RSS %.1f MB (of which synthetic data %.1f MB); during %ld timed steps: "
         "%llu malloc-family calls%s (%llu from libprefrm's code), %llu frees, mallinfo2 d(in use) "
         "%lld B d(arena) %lld B d(mmapped chunks) %lld, minor faults %ld -> "
         "allocations_in_steps=%s\n",
         (double)peak_rss_kb / 1024.0, data_mb, steps, d->calls,
         BENCH_COUNT_MALLOC ? "" : " (counter off)", d->lib_calls, d->frees, d->used, d->arena,
         d->hblks, d->minflt, d->allocs ? "true" : "false");
}

/* Appends the allocation keys (torch_ref has none of these) to json at *u. */
static void json_alloc_keys(char *json, size_t cap, size_t *u, long peak_rss_kb, double data_mb,
                            const alloc_delta *d) {
  *u += (size_t)snprintf(json + *u, cap - *u,
                         "\"peak_rss_kb\": %ld, \"synthetic_data_mb\": %.2f, "
                         "\"allocations_in_steps\": %s, ",
                         peak_rss_kb, data_mb, d->allocs ? "true" : "false");
  if (BENCH_COUNT_MALLOC)
    *u += (size_t)snprintf(json + *u, cap - *u,
                           "\"malloc_calls_in_steps\": %llu, \"frees_in_steps\": %llu, "
                           "\"malloc_calls_in_steps_libprefrm\": %llu, ",
                           d->calls, d->frees, d->lib_calls);
  else
    *u += (size_t)snprintf(json + *u, cap - *u,
                           "\"malloc_calls_in_steps\": null, \"frees_in_steps\": null, "
                           "\"malloc_calls_in_steps_libprefrm\": null, ");
  *u += (size_t)snprintf(json + *u, cap - *u,
                         "\"mallinfo2_delta\": {\"uordblks\": %lld, \"arena\": %lld, \"hblks\": "
                         "%lld, \"hblkhd\": %lld}, \"minor_faults_in_steps\": %ld, ",
                         d->used, d->arena, d->hblks, d->hblkhd, d->minflt);
}

/* ---- token models: gpt2 and llama ------------------------------------------------------ */

/*
 * --model gpt2 | llama: the twins of `torch_ref.py bench --model gpt2|llama`.
 * Defaults are torch_ref's (vocab 512, ctx 128, dim 128, 4 layers, 4 heads,
 * 16 pairs per step, every sequence ctx tokens long; llama: kv heads = heads,
 * head_dim = dim / heads, SwiGLU width 256 ceil(8 dim / 3 / 256), rope_theta
 * 10000, rms_eps 1e-6, no biases, no q/k norm). NB batches of 2P sequences
 * of uniform random ids are made up front and cycled; with --min-len m the
 * lengths are uniform in [m, seq_len] (padding ids are 0 and never read).
 *
 * FLOPs are torch_ref's formulas, so the GFLOP/s of the two programs compare
 * like for like: train = 6 N_nonemb tok + 12 L T A tok with tok = 2P T,
 * T = seq_len and A the attention width (gpt2: D; llama: H head_dim, which
 * GQA does not change); torch_ref counts every position, also with
 * --min-len, and the full T x T attention. The score (forward) figure is its
 * forward third: 2 N_nonemb tok + 4 L T A tok. N_nonemb leaves out the
 * embeddings (gpt2: wte and wpe; llama: embed_tokens). libprefrm does less
 * work than the formula says (padding is never computed; the last block
 * runs at the pooled tokens only; attention is causal), so its GFLOP/s is
 * "model FLOPs per second", the rate that matters for comparing step times,
 * not what the cores executed.
 *
 * --score times prm_ctx_forward on an inference context (2P sequences per
 * call: what a pair batch costs to score) instead of training steps; the twin
 * on the torch side is tests/bench/torch_score.py.
 */
typedef struct tok_cfg {
  int llama; /* 0: gpt2 */
  long vocab, n_ctx, dim, layers, heads, batch, seq_len, min_len, steps, warmup, seed, nbatches;
  /* llama; 0 (or a negative real) for "not given": the library's default */
  long kv_heads, head_dim, ffn;
  double rope_theta, rms_eps;
  int attn_bias, qk_norm;
  double lr;
  int phases, probe, score;
  long workers; /* > 0: a prm_pool of this many workers runs the context */
  const char *json_out;
} tok_cfg;

/*
 * The split API, phase by phase: forward + loss, backward, optimizer step,
 * cycling through nb batches of 2P rows. Medians in ms of `steps` timed
 * iterations after `warmup`.
 */
static void time_phases(prm_ctx *ctx, prm_optimizer *opt, const prm_batch *pbs, long nb, uint64_t P,
                        long warmup, long steps, double *ms_fwd, double *ms_bwd, double *ms_opt) {
  const uint64_t rows = 2 * P;
  double *tf = xmalloc((size_t)steps * sizeof(double)),
         *tb = xmalloc((size_t)steps * sizeof(double)),
         *to = xmalloc((size_t)steps * sizeof(double));
  float *scores = xmalloc((size_t)rows * sizeof(float)),
        *dscores = xmalloc((size_t)rows * sizeof(float));
  for (long it = 0; it < warmup + steps; it++) {
    const prm_batch *pb = &pbs[it % nb];
    double t0 = now_s();
    CHECK(prm_ctx_forward(ctx, pb, scores, rows));
    CHECK(prm_loss_bt(scores, scores + P, P, NULL, NULL, NULL, dscores, dscores + P));
    double t1 = now_s();
    CHECK(prm_ctx_backward(ctx, dscores, rows));
    double t2 = now_s();
    CHECK(prm_optimizer_step(opt, ctx));
    double t3 = now_s();
    if (it >= warmup) {
      tf[it - warmup] = t1 - t0;
      tb[it - warmup] = t2 - t1;
      to[it - warmup] = t3 - t2;
    }
  }
  *ms_fwd = median(tf, (size_t)steps) * 1e3;
  *ms_bwd = median(tb, (size_t)steps) * 1e3;
  *ms_opt = median(to, (size_t)steps) * 1e3;
  free(tf);
  free(tb);
  free(to);
  free(scores);
  free(dscores);
}

static int run_tok(const tok_cfg *cf) {
  const char *const name = cf->llama ? "llama" : "gpt2";
  prm_model_options mo;
  CHECK(prm_model_options_init(&mo, PRM_MODEL_OPTIONS_VERSION));
  mo.arch = cf->llama ? PRM_ARCH_LLAMA : PRM_ARCH_GPT2;
  mo.seed = (uint64_t)cf->seed;
  mo.vocab_size = (uint64_t)cf->vocab;
  mo.n_ctx = (uint64_t)cf->n_ctx;
  mo.n_embd = (uint64_t)cf->dim;
  mo.n_layer = (uint64_t)cf->layers;
  mo.n_head = (uint64_t)cf->heads;
  if (cf->llama) {
    mo.n_kv_head = (uint64_t)cf->kv_heads;
    mo.head_dim = (uint64_t)cf->head_dim;
    mo.n_ffn = (uint64_t)cf->ffn;
    if (cf->rope_theta > 0) mo.rope_theta = cf->rope_theta;
    if (cf->rms_eps >= 0) mo.rms_eps = cf->rms_eps;
    mo.attn_bias = cf->attn_bias;
    mo.qk_norm = cf->qk_norm;
  }
  const uint64_t P = (uint64_t)cf->batch, rows = 2 * P;
  const uint64_t T = (uint64_t)(cf->seq_len ? cf->seq_len : cf->n_ctx);
  const uint64_t min_len = (uint64_t)cf->min_len;
  if (T > (uint64_t)cf->n_ctx || min_len > T) {
    fprintf(stderr, "bench_train: need min-len <= seq-len <= ctx (got %llu, %llu, %ld)\n",
            (unsigned long long)min_len, (unsigned long long)T, cf->n_ctx);
    return 2;
  }
  const long steps = cf->steps, warmup = cf->warmup;
  const int nb = (int)(cf->nbatches ? cf->nbatches : (steps + warmup < 8 ? steps + warmup : 8));
  const int score = cf->score;

  prm_model *model = NULL;
  prm_ctx *ctx = NULL;
  prm_optimizer *opt = NULL;
  CHECK(prm_model_new(&model, &mo));
  /* the configuration the library settled on (llama defaults filled in) */
  CHECK(prm_model_get_options(model, &mo));
  prm_ctx_options co;
  CHECK(prm_ctx_options_init(&co, PRM_CTX_OPTIONS_VERSION));
  co.max_rows = rows;
  co.max_len = T;
  co.inference = score;
  prm_pool *pool = NULL;
  if (cf->workers > 0) { /* the library's own threads: one context on a pool */
    CHECK(prm_pool_new(&pool, (uint32_t)cf->workers));
    co.n_workers = prm_pool_size(pool);
    co.parallel_for = prm_pool_parallel_for;
    co.parallel_arg = pool;
  }
  CHECK(prm_ctx_new(&ctx, model, &co));
  if (!score) {
    prm_optimizer_options oo;
    CHECK(prm_optimizer_options_init(&oo, PRM_OPTIMIZER_OPTIONS_VERSION));
    oo.algorithm = PRM_OPT_ADAMW;
    oo.lr = cf->lr;
    oo.weight_decay = 0.0;
    CHECK(prm_optimizer_new(&opt, model, &oo));
  }

  /* Synthetic data: nb batches of 2P right-padded sequences, made up front. */
  rng_state = 0x5eedull + (uint64_t)cf->seed;
  int32_t *ids = xmalloc((size_t)nb * rows * T * sizeof(int32_t));
  int32_t *lens = xmalloc((size_t)nb * rows * sizeof(int32_t));
  prm_batch *pbs = xmalloc((size_t)nb * sizeof *pbs);
  double tok_real = 0.0; /* mean tokens per batch that libprefrm computes */
  for (int b = 0; b < nb; b++) {
    for (uint64_t i = 0; i < rows; i++) {
      uint64_t len = min_len ? min_len + rng_next() % (T - min_len + 1) : T;
      lens[(size_t)b * rows + i] = (int32_t)len;
      tok_real += (double)len / nb;
      int32_t *row = ids + ((size_t)b * rows + i) * T;
      for (uint64_t t = 0; t < T; t++)
        row[t] = t < len ? (int32_t)(rng_next() % (uint64_t)cf->vocab) : 0;
    }
    CHECK(prm_batch_init(&pbs[b], PRM_BATCH_VERSION));
    pbs[b].n = rows;
    pbs[b].tokens = ids + (size_t)b * rows * T;
    pbs[b].token_stride = T;
    pbs[b].lengths = lens + (size_t)b * rows;
  }
  prm_loss_stats st;
  CHECK(prm_loss_stats_init(&st, PRM_LOSS_STATS_VERSION));
  float *scores = xmalloc((size_t)rows * sizeof(float)),
        *dscores = xmalloc((size_t)rows * sizeof(float));

  locate_library();

  /* ---- timed loop: training steps, or forwards of 2P sequences ---- */
  double *t_step = xmalloc((size_t)steps * sizeof(double));
  double loss_first = 0.0, loss_last = 0.0;
  alloc_snapshot before, after;
  for (long it = 0; it < warmup + steps; it++) {
    if (it == warmup) take_snapshot(&before);
    const prm_batch *pb = &pbs[it % nb];
    double t0 = now_s();
    if (score)
      CHECK(prm_ctx_forward(ctx, pb, scores, rows));
    else
      CHECK(prm_train_step(ctx, opt, pb, NULL, &st));
    double t1 = now_s();
    if (!score) {
      if (it == 0) loss_first = st.loss;
      loss_last = st.loss;
    }
    if (it >= warmup) t_step[it - warmup] = t1 - t0;
  }
  take_snapshot(&after);
  const double ms_mean = mean(t_step, (size_t)steps) * 1e3;
  const double med = median(t_step, (size_t)steps);
  const double tmin = t_step[0];

  /* ---- optional phase loop (split API; training only) ---- */
  double ms_fwd = NAN, ms_bwd = NAN, ms_opt = NAN;
  const int phases = cf->phases && !score;
  if (phases) time_phases(ctx, opt, pbs, nb, P, warmup, steps, &ms_fwd, &ms_bwd, &ms_opt);

  /* ---- accounting: torch_ref's FLOP formula ---- */
  const uint64_t n_params = prm_model_num_params(model);
  uint64_t n_emb = 0;
  for (uint32_t t = 0; t < prm_model_num_tensors(model); t++) {
    const char *tname = NULL;
    uint64_t shape[2] = {0, 0};
    uint32_t ndim = 0;
    CHECK(prm_model_tensor_info(model, t, &tname, NULL, &ndim, shape));
    if (strstr(tname, "wte.weight") != NULL || strstr(tname, "wpe.weight") != NULL ||
        strstr(tname, "embed_tokens.weight") != NULL)
      n_emb += shape[0] * (ndim > 1 ? shape[1] : 1);
  }
  const uint64_t n_ne = n_params - n_emb;
  const double tok = (double)rows * (double)T; /* torch_ref: every position counts */
  /* attention width A: gpt2 D, llama H * head_dim */
  const double L = (double)cf->layers, Td = (double)T,
               A = cf->llama ? (double)mo.n_head * (double)mo.head_dim : (double)cf->dim;
  const double flops = score ? 2.0 * n_ne * tok + 4.0 * L * Td * A * tok
                             : 6.0 * n_ne * tok + 12.0 * L * Td * A * tok;
  const char *formula =
      cf->llama
          ? (score ? "2*N_nonemb*tok + 4*L*T*(H*hd)*tok (forward third of torch_ref's training "
                     "formula), tok = 2P*T"
                   : "6*N_nonemb*tok + 12*L*T*(H*hd)*tok (torch_ref's formula: dense T x T "
                     "attention), tok = 2P*T")
          : (score ? "2*N_nonemb*tok + 4*L*T*D*tok (forward third of torch_ref's training "
                     "formula), tok = 2P*T"
                   : "6*N_nonemb*tok + 12*L*T*D*tok (torch_ref's formula: dense T x T "
                     "attention), tok = 2P*T");
  alloc_delta ad = diff_snapshots(&before, &after);
  struct rusage ru;
  getrusage(RUSAGE_SELF, &ru);
  const long peak_rss_kb = ru.ru_maxrss; /* Linux: kilobytes */
  const double data_mb = (double)nb * (double)rows * ((double)T + 1) * sizeof(int32_t) / 1048576.0;

  /* ---- report ---- */
  const char *threads_env = env_or("OPENBLAS_NUM_THREADS", "(unset)");
  if (score)
    printf("%s score %llu seqs x %llu tok threads=%s: %.3f ms/forward (median of %ld), %.1f "
           "seqs/s, %.0f tokens/s computed",
           name, (unsigned long long)rows, (unsigned long long)T, threads_env, med * 1e3, steps,
           (double)rows / med, tok_real / med);
  else
    printf("%s P=%llu T=%llu threads=%s: %.3f ms/step (median of %ld), %.2f pairs/s", name,
           (unsigned long long)P, (unsigned long long)T, threads_env, med * 1e3, steps,
           (double)P / med);
  if (phases) printf(", split-API fwd+loss %.3f / bwd %.3f / opt %.3f ms", ms_fwd, ms_bwd, ms_opt);
  printf(", %.3f GFLOP/%s -> %.1f GFLOP/s; params %llu (non-emb %llu)", flops / 1e9,
         score ? "forward" : "step", flops / med * 1e-9, (unsigned long long)n_params,
         (unsigned long long)n_ne);
  if (!score) printf("; loss %.4f -> %.4f", loss_first, loss_last);
  printf("\n");
  print_memory_line(peak_rss_kb, data_mb, steps, &ad);
  print_blas_line();

  static char json[8192];
  size_t u = 0;
  u += (size_t)snprintf(
      json + u, sizeof json - u,
      "{\"impl\": \"libprefrm\", \"model\": \"%s\", \"mode\": \"%s\", \"config\": {\"model\": "
      "\"%s\", \"vocab_size\": %ld, \"n_positions\": %ld, \"n_embd\": %ld, \"n_layer\": %ld, "
      "\"n_head\": %ld, ",
      name, score ? "score" : "train", name, cf->vocab, cf->n_ctx, cf->dim, cf->layers, cf->heads);
  if (cf->llama)
    u += (size_t)snprintf(json + u, sizeof json - u,
                          "\"n_kv_head\": %llu, \"head_dim\": %llu, \"n_ffn\": %llu, "
                          "\"rope_theta\": %.17g, \"rms_eps\": %.17g, \"attn_bias\": %d, "
                          "\"qk_norm\": %d, ",
                          (unsigned long long)mo.n_kv_head, (unsigned long long)mo.head_dim,
                          (unsigned long long)mo.n_ffn, mo.rope_theta, mo.rms_eps,
                          mo.attn_bias != 0, mo.qk_norm != 0);
  u += (size_t)snprintf(
      json + u, sizeof json - u,
      "\"seq_len\": %llu, \"min_len\": %llu}, \"pairs_per_step\": %llu, \"threads\": %s, "
      "\"workers\": %ld, "
      "\"steps\": %ld, \"warmup\": %ld, \"batches\": %d, \"tokens_per_step_computed\": %.1f, ",
      (unsigned long long)T, (unsigned long long)min_len, (unsigned long long)P,
      strcmp(threads_env, "(unset)") ? threads_env : "null", cf->workers > 0 ? cf->workers : 1,
      steps, warmup, nb, tok_real);
  if (score)
    u += (size_t)snprintf(json + u, sizeof json - u,
                          "\"seqs_per_forward\": %llu, \"ms_forward_median\": %.6f, "
                          "\"ms_forward_min\": %.6f, \"ms_forward_mean\": %.6f, "
                          "\"seqs_per_s\": %.3f, \"forward_flops\": %.0f, ",
                          (unsigned long long)rows, med * 1e3, tmin * 1e3, ms_mean,
                          (double)rows / med, flops);
  else {
    u += (size_t)snprintf(json + u, sizeof json - u,
                          "\"ms_step_median\": %.6f, \"ms_step_min\": %.6f, \"ms_step_mean\": "
                          "%.6f, \"pairs_per_s\": %.3f, \"train_flops_per_step\": %.0f, "
                          "\"loss_first\": %.6f, \"loss_last\": %.6f, ",
                          med * 1e3, tmin * 1e3, ms_mean, (double)P / med, flops, loss_first,
                          loss_last);
    if (phases)
      u += (size_t)snprintf(json + u, sizeof json - u,
                            "\"ms_fwd_median\": %.6f, \"ms_bwd_median\": %.6f, "
                            "\"ms_opt_median\": %.6f, ",
                            ms_fwd, ms_bwd, ms_opt);
  }
  u += (size_t)snprintf(json + u, sizeof json - u,
                        "\"gflops_per_s\": %.3f, \"flops_formula\": \"%s\", \"params\": %llu, "
                        "\"params_nonembedding\": %llu, \"prefrm\": \"%s\", ",
                        flops / med * 1e-9, formula, (unsigned long long)n_params,
                        (unsigned long long)n_ne, prm_version_string());
  json_alloc_keys(json, sizeof json, &u, peak_rss_kb, data_mb, &ad);
  if (cf->probe) {
    sgemm_fn sgemm = (sgemm_fn)(uintptr_t)dlsym(RTLD_DEFAULT, "cblas_sgemm");
    if (sgemm == NULL) {
      printf("blas probe: cblas_sgemm not found in the process; skipped\n");
    } else {
      /* the square peak, then the step's shapes: the MLP's first projection forward
       * (N, F) = (N, C)(C, F) (gpt2 c_fc, F = 4C; llama gate_proj/up_proj, F = n_ffn),
       * its weight gradient (C, F) = (N, C)^T (N, F), one head's scores (T, T) = q k^T */
      const int C = (int)cf->dim, N = (int)(rows * T);
      const int Fw = cf->llama ? (int)mo.n_ffn : 4 * C;
      const int hs = cf->llama ? (int)mo.head_dim : (int)(cf->dim / cf->heads);
      const gemm_shape shapes[4] = {
          {"sgemm_1024_gflops", 0, 0, 1024, 1024, 1024},
          {"sgemm_fc_fwd_gflops", 0, 0, N, Fw, C},
          {"sgemm_fc_wgrad_gflops", 1, 0, C, Fw, N},
          {"sgemm_attn_scores_gflops", 0, 1, (int)T, (int)T, hs},
      };
      u += (size_t)snprintf(json + u, sizeof json - u, "\"blas_probe\": {");
      u = probe_gemms(json, sizeof json, sgemm, shapes, 4);
      if (u >= 2 && json[u - 2] == ',') u -= 2;
      u += (size_t)snprintf(json + u, sizeof json - u, "}, ");
    }
  }
  json_blas_keys(json, sizeof json, &u);
  snprintf(json + u, sizeof json - u,
           "\"OPENBLAS_NUM_THREADS\": \"%s\", \"OMP_NUM_THREADS\": \"%s\", "
           "\"OPENBLAS_CORETYPE\": \"%s\", \"GLIBC_TUNABLES\": \"%s\"}",
           threads_env, env_or("OMP_NUM_THREADS", "(unset)"),
           env_or("OPENBLAS_CORETYPE", "(unset)"), env_or("GLIBC_TUNABLES", "(unset)"));
  printf("JSON %s\n", json);
  int rc = 0;
  if (cf->json_out != NULL) {
    FILE *f = fopen(cf->json_out, "a");
    if (f == NULL || fprintf(f, "%s\n", json) < 0 || fclose(f) != 0) {
      fprintf(stderr, "bench_train: cannot append to %s\n", cf->json_out);
      rc = 1;
    }
  }

  free(t_step);
  free(scores);
  free(dscores);
  free(pbs);
  free(lens);
  free(ids);
  prm_optimizer_free(opt);
  prm_ctx_free(ctx);
  prm_pool_free(pool);
  prm_model_free(model);
  return rc;
}

/* ---- main --------------------------------------------------------------------------------------
 */

static void usage(void) {
  fprintf(stderr,
          "usage: bench_train [--model linear|mlp|gpt2|llama] [--d D] [--hidden H1,H2,...]\n"
          "                   [--act gelu|relu|tanh] [--batch P] [--steps S] [--warmup W]\n"
          "                   [--lr LR] [--seed N] [--batches NB] [--threads N] [--workers W]\n"
          "                   [--no-phases] [--blas-probe] [--json-out FILE]\n"
          "       gpt2/llama: [--vocab V] [--ctx T] [--dim D] [--layers L] [--heads H]\n"
          "                   [--seq-len T] [--min-len M] [--score]\n"
          "       llama:      [--kv-heads G] [--head-dim HD] [--ffn F] [--rope-theta X]\n"
          "                   [--rms-eps E] [--attn-bias] [--qk-norm]\n");
  exit(2);
}

static long parse_long(const char *flag, const char *s, long lo, long hi) {
  char *end = NULL;
  errno = 0;
  long v = strtol(s, &end, 10);
  if (errno != 0 || end == s || *end != '\0' || v < lo || v > hi) {
    fprintf(stderr, "bench_train: %s wants an integer in [%ld, %ld], got '%s'\n", flag, lo, hi, s);
    exit(2);
  }
  return v;
}

/* A real in [lo, hi] (finite), else a usage error naming the flag. */
static double parse_real(const char *flag, const char *s, double lo, double hi) {
  char *end = NULL;
  errno = 0;
  double v = strtod(s, &end);
  if (errno != 0 || end == s || *end != '\0' || !(v >= lo && v <= hi)) {
    fprintf(stderr, "bench_train: %s wants a number in [%g, %g], got '%s'\n", flag, lo, hi, s);
    exit(2);
  }
  return v;
}

int main(int argc, char **argv) {
  const char *model_name = "linear", *act_name = "gelu", *hidden_arg = NULL, *json_out = NULL;
  long d = 0, batch = 0, steps = 20, warmup = 3, seed = 0, nbatches = 0, threads = 0;
  long workers = 0;
  long vocab = 512, n_ctx = 128, dim = 128, layers = 4, heads = 4, seq_len = 0, min_len = 0;
  long kv_heads = 0, head_dim = 0, ffn = 0; /* llama; 0: the library's default */
  double rope_theta = 0.0, rms_eps = -1.0;  /* llama; not given: the library's default */
  int attn_bias = 0, qk_norm = 0, llama_flags = 0;
  double lr = 1e-4;
  int phases = 1, probe = 0, score = 0;
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i];
    const char *v = i + 1 < argc ? argv[i + 1] : NULL;
#define NEED_VALUE                                                                                 \
  do {                                                                                             \
    if (v == NULL) usage();                                                                        \
    i++;                                                                                           \
  } while (0)
    if (!strcmp(a, "--model")) {
      NEED_VALUE;
      model_name = v;
    } else if (!strcmp(a, "--d")) {
      NEED_VALUE;
      d = parse_long(a, v, 1, 1L << 24);
    } else if (!strcmp(a, "--hidden")) {
      NEED_VALUE;
      hidden_arg = v;
    } else if (!strcmp(a, "--act")) {
      NEED_VALUE;
      act_name = v;
    } else if (!strcmp(a, "--batch")) {
      NEED_VALUE;
      batch = parse_long(a, v, 1, 1L << 20);
    } else if (!strcmp(a, "--steps")) {
      NEED_VALUE;
      steps = parse_long(a, v, 1, 1000000);
    } else if (!strcmp(a, "--warmup")) {
      NEED_VALUE;
      warmup = parse_long(a, v, 1, 1000000);
    } else if (!strcmp(a, "--seed")) {
      NEED_VALUE;
      seed = parse_long(a, v, 0, 1L << 40);
    } else if (!strcmp(a, "--batches")) {
      NEED_VALUE;
      nbatches = parse_long(a, v, 1, 1024);
    } else if (!strcmp(a, "--threads")) {
      NEED_VALUE;
      threads = parse_long(a, v, 1, 1024);
    } else if (!strcmp(a, "--workers")) {
      NEED_VALUE;
      workers = parse_long(a, v, 1, 1024);
    } else if (!strcmp(a, "--lr")) {
      NEED_VALUE;
      lr = strtod(v, NULL);
    } else if (!strcmp(a, "--json-out")) {
      NEED_VALUE;
      json_out = v;
    } else if (!strcmp(a, "--vocab")) {
      NEED_VALUE;
      vocab = parse_long(a, v, 1, 1L << 30);
    } else if (!strcmp(a, "--ctx")) {
      NEED_VALUE;
      n_ctx = parse_long(a, v, 1, 1L << 20);
    } else if (!strcmp(a, "--dim")) {
      NEED_VALUE;
      dim = parse_long(a, v, 1, 1L << 16);
    } else if (!strcmp(a, "--layers")) {
      NEED_VALUE;
      layers = parse_long(a, v, 1, 128);
    } else if (!strcmp(a, "--heads")) {
      NEED_VALUE;
      heads = parse_long(a, v, 1, 1L << 16);
    } else if (!strcmp(a, "--seq-len")) {
      NEED_VALUE;
      seq_len = parse_long(a, v, 1, 1L << 20);
    } else if (!strcmp(a, "--min-len")) {
      NEED_VALUE;
      min_len = parse_long(a, v, 1, 1L << 20);
    } else if (!strcmp(a, "--kv-heads")) {
      NEED_VALUE;
      kv_heads = parse_long(a, v, 1, 1L << 16);
      llama_flags = 1;
    } else if (!strcmp(a, "--head-dim")) {
      NEED_VALUE;
      head_dim = parse_long(a, v, 1, 1L << 16);
      llama_flags = 1;
    } else if (!strcmp(a, "--ffn")) {
      NEED_VALUE;
      ffn = parse_long(a, v, 1, 1L << 24);
      llama_flags = 1;
    } else if (!strcmp(a, "--rope-theta")) {
      NEED_VALUE;
      rope_theta = parse_real(a, v, 1e-300, 1e300);
      llama_flags = 1;
    } else if (!strcmp(a, "--rms-eps")) {
      NEED_VALUE;
      rms_eps = parse_real(a, v, 0.0, 1.0);
      llama_flags = 1;
    } else if (!strcmp(a, "--attn-bias")) {
      attn_bias = 1;
      llama_flags = 1;
    } else if (!strcmp(a, "--qk-norm")) {
      qk_norm = 1;
      llama_flags = 1;
    } else if (!strcmp(a, "--score"))
      score = 1;
    else if (!strcmp(a, "--no-phases"))
      phases = 0;
    else if (!strcmp(a, "--blas-probe"))
      probe = 1;
    else
      usage();
#undef NEED_VALUE
  }
  /* --warmup >= 1: the first step may fault in buffers; it is never timed. */

  if (threads > 0) {
    char want[32];
    snprintf(want, sizeof want, "%ld", threads);
    const char *cur = getenv("OPENBLAS_NUM_THREADS");
    if (cur == NULL || strcmp(cur, want) != 0) {
      setenv("OPENBLAS_NUM_THREADS", want, 1);
      setenv("OMP_NUM_THREADS", want, 1);
      execv("/proc/self/exe", argv);
      fprintf(stderr, "bench_train: cannot re-execute to apply --threads: %s\n", strerror(errno));
      return 1;
    }
  }
  blas_identify();

  const int is_llama = !strcmp(model_name, "llama");
  if (llama_flags && !is_llama) {
    fprintf(stderr, "bench_train: --kv-heads/--head-dim/--ffn/--rope-theta/--rms-eps/"
                    "--attn-bias/--qk-norm only apply to --model llama\n");
    return 2;
  }
  if (is_llama || !strcmp(model_name, "gpt2")) {
    const tok_cfg cf = {.llama = is_llama,
                        .vocab = vocab,
                        .n_ctx = n_ctx,
                        .dim = dim,
                        .layers = layers,
                        .heads = heads,
                        .batch = batch ? batch : 16,
                        .seq_len = seq_len,
                        .min_len = min_len,
                        .steps = steps,
                        .warmup = warmup,
                        .seed = seed,
                        .nbatches = nbatches,
                        .kv_heads = kv_heads,
                        .head_dim = head_dim,
                        .ffn = ffn,
                        .rope_theta = rope_theta,
                        .rms_eps = rms_eps,
                        .attn_bias = attn_bias,
                        .qk_norm = qk_norm,
                        .lr = lr,
                        .phases = phases,
                        .probe = probe,
                        .score = score,
                        .workers = workers,
                        .json_out = json_out};
    return run_tok(&cf);
  }
  if (score) usage(); /* scoring mode exists for the token models only */

  /* ---- configuration ---- */
  prm_model_options mo;
  CHECK(prm_model_options_init(&mo, PRM_MODEL_OPTIONS_VERSION));
  mo.seed = (uint64_t)seed;
  int is_mlp;
  if (!strcmp(model_name, "linear")) {
    is_mlp = 0;
    mo.arch = PRM_ARCH_LINEAR;
    mo.input_size = (uint64_t)(d ? d : 4096);
    if (!batch) batch = 256;
  } else if (!strcmp(model_name, "mlp")) {
    is_mlp = 1;
    mo.arch = PRM_ARCH_MLP;
    mo.input_size = (uint64_t)(d ? d : 768);
    if (!batch) batch = 64;
    const char *h = hidden_arg ? hidden_arg : "1024,256";
    while (*h) {
      char *end = NULL;
      unsigned long long w = strtoull(h, &end, 10);
      if (end == h || w == 0 || mo.n_hidden >= PRM_MAX_HIDDEN) {
        fprintf(stderr, "bench_train: bad --hidden '%s'\n", hidden_arg);
        return 2;
      }
      mo.hidden[mo.n_hidden++] = w;
      h = *end == ',' ? end + 1 : end;
    }
    if (!strcmp(act_name, "gelu"))
      mo.activation = PRM_ACT_GELU_TANH;
    else if (!strcmp(act_name, "relu"))
      mo.activation = PRM_ACT_RELU;
    else if (!strcmp(act_name, "tanh"))
      mo.activation = PRM_ACT_TANH;
    else
      usage();
  } else {
    usage();
  }
  const uint64_t P = (uint64_t)batch, rows = 2 * P, D = mo.input_size;
  const int nb = (int)(nbatches ? nbatches : (steps + warmup < 8 ? steps + warmup : 8));

  prm_model *model = NULL;
  prm_ctx *ctx = NULL;
  prm_optimizer *opt = NULL;
  CHECK(prm_model_new(&model, &mo));
  prm_ctx_options co;
  CHECK(prm_ctx_options_init(&co, PRM_CTX_OPTIONS_VERSION));
  co.max_rows = rows;
  CHECK(prm_ctx_new(&ctx, model, &co));
  prm_optimizer_options oo;
  CHECK(prm_optimizer_options_init(&oo, PRM_OPTIMIZER_OPTIONS_VERSION));
  oo.algorithm = PRM_OPT_ADAMW;
  oo.lr = lr;
  oo.weight_decay = 0.0;
  CHECK(prm_optimizer_new(&opt, model, &oo));

  /* Synthetic data: nb batches of (2P, d) N(0,1) features, made up front. */
  rng_state = 0x5eedull + (uint64_t)seed;
  float **xs = xmalloc((size_t)nb * sizeof *xs);
  for (int b = 0; b < nb; b++) {
    xs[b] = xmalloc((size_t)(rows * D) * sizeof(float));
    fill_normal(xs[b], (size_t)(rows * D));
  }
  prm_batch pb;
  CHECK(prm_batch_init(&pb, PRM_BATCH_VERSION));
  pb.n = rows;
  pb.n_features = D;
  prm_loss_stats st;
  CHECK(prm_loss_stats_init(&st, PRM_LOSS_STATS_VERSION));

  locate_library();

  /* ---- timed training loop ---- */
  double *t_step = xmalloc((size_t)steps * sizeof(double));
  double loss_first = 0.0, loss_last = 0.0;
  alloc_snapshot before, after;
  for (long it = 0; it < warmup + steps; it++) {
    if (it == warmup) take_snapshot(&before);
    pb.features = xs[it % nb];
    double t0 = now_s();
    CHECK(prm_train_step(ctx, opt, &pb, NULL, &st));
    double t1 = now_s();
    if (it == 0) loss_first = st.loss;
    loss_last = st.loss;
    if (it >= warmup) t_step[it - warmup] = t1 - t0;
  }
  take_snapshot(&after);

  const double ms_mean = mean(t_step, (size_t)steps) * 1e3;
  const double med = median(t_step, (size_t)steps);
  const double tmin = t_step[0];

  /* ---- optional phase loop (split API) ---- */
  double ms_fwd = NAN, ms_bwd = NAN, ms_opt = NAN;
  if (phases) {
    prm_batch *pbs = xmalloc((size_t)nb * sizeof *pbs);
    for (long b = 0; b < nb; b++) {
      pbs[b] = pb;
      pbs[b].features = xs[b];
    }
    time_phases(ctx, opt, pbs, nb, P, warmup, steps, &ms_fwd, &ms_bwd, &ms_opt);
    free(pbs);
  }

  /* ---- accounting ---- */
  const uint64_t n_params = prm_model_num_params(model);
  uint64_t n_first = is_mlp ? mo.hidden[0] * D : 0;
  double flops = is_mlp ? (6.0 * (double)n_params - 2.0 * (double)n_first) * (double)rows
                        : 4.0 * (double)n_params * (double)rows;
  const char *formula = is_mlp ? "(6*N - 2*N_layer0)*S (layer 0 needs no input grad), S=2P"
                               : "4*N*S (fwd 2N + weight-grad 2N per sample; no input grad), S=2P";
  const alloc_delta ad = diff_snapshots(&before, &after);
  struct rusage ru;
  getrusage(RUSAGE_SELF, &ru);
  const long peak_rss_kb = ru.ru_maxrss; /* Linux: kilobytes */
  const double data_mb = (double)nb * (double)(rows * D) * sizeof(float) / 1048576.0;

  /* ---- report ---- */
  const char *threads_env = env_or("OPENBLAS_NUM_THREADS", "(unset)");
  printf("%s P=%llu threads=%s: %.3f ms/step (median of %ld), %.1f pairs/s", model_name,
         (unsigned long long)P, threads_env, med * 1e3, steps, (double)P / med);
  if (phases) printf(", split-API fwd+loss %.3f / bwd %.3f / opt %.3f ms", ms_fwd, ms_bwd, ms_opt);
  printf(", %.3f GFLOP/step -> %.1f GFLOP/s; params %llu; loss %.4f -> %.4f\n", flops / 1e9,
         flops / med * 1e-9, (unsigned long long)n_params, loss_first, loss_last);
  print_memory_line(peak_rss_kb, data_mb, steps, &ad);
  print_blas_line();

  static char json[8192];
  size_t u = 0;
  u += (size_t)snprintf(
      json + u, sizeof json - u,
      "{\"impl\": \"libprefrm\", \"model\": \"%s\", \"config\": {\"model\": \"%s\", "
      "\"d\": %llu",
      model_name, model_name, (unsigned long long)D);
  if (is_mlp) {
    u += (size_t)snprintf(json + u, sizeof json - u, ", \"hidden\": [");
    for (uint32_t l = 0; l < mo.n_hidden; l++)
      u += (size_t)snprintf(json + u, sizeof json - u, "%s%llu", l ? ", " : "",
                            (unsigned long long)mo.hidden[l]);
    u += (size_t)snprintf(json + u, sizeof json - u, "], \"act\": \"%s\"", act_name);
  }
  u += (size_t)snprintf(
      json + u, sizeof json - u,
      "}, \"pairs_per_step\": %llu, \"threads\": %s, \"steps\": %ld, \"warmup\": %ld, "
      "\"batches\": %d, \"ms_step_median\": %.6f, \"ms_step_min\": %.6f, \"ms_step_mean\": %.6f, ",
      (unsigned long long)P, strcmp(threads_env, "(unset)") ? threads_env : "null", steps, warmup,
      nb, med * 1e3, tmin * 1e3, ms_mean);
  if (phases)
    u += (size_t)snprintf(json + u, sizeof json - u,
                          "\"ms_fwd_median\": %.6f, \"ms_bwd_median\": %.6f, "
                          "\"ms_opt_median\": %.6f, \"phase_timing\": \"split API; fwd includes "
                          "prm_ctx_forward's copy and check of the input\", ",
                          ms_fwd, ms_bwd, ms_opt);
  u += (size_t)snprintf(
      json + u, sizeof json - u,
      "\"pairs_per_s\": %.3f, \"params\": %llu, \"params_nonembedding\": %llu, "
      "\"train_flops_per_step\": %.0f, \"gflops_per_s\": %.3f, \"flops_formula\": \"%s\", "
      "\"loss_first\": %.6f, \"loss_last\": %.6f, \"prefrm\": \"%s\", ",
      (double)P / med, (unsigned long long)n_params, (unsigned long long)n_params, flops,
      flops / med * 1e-9, formula, loss_first, loss_last, prm_version_string());
  json_alloc_keys(json, sizeof json, &u, peak_rss_kb, data_mb, &ad);
  if (probe) blas_probe(json, sizeof json, is_mlp, rows, D, mo.hidden, mo.n_hidden, xs, nb);
  u = strlen(json);
  json_blas_keys(json, sizeof json, &u);
  snprintf(json + u, sizeof json - u,
           "\"OPENBLAS_NUM_THREADS\": \"%s\", \"OMP_NUM_THREADS\": \"%s\", "
           "\"OPENBLAS_CORETYPE\": \"%s\", \"GLIBC_TUNABLES\": \"%s\"}",
           threads_env, env_or("OMP_NUM_THREADS", "(unset)"),
           env_or("OPENBLAS_CORETYPE", "(unset)"), env_or("GLIBC_TUNABLES", "(unset)"));
  printf("JSON %s\n", json);
  if (json_out != NULL) {
    FILE *f = fopen(json_out, "a");
    if (f == NULL || fprintf(f, "%s\n", json) < 0 || fclose(f) != 0) {
      fprintf(stderr, "bench_train: cannot append to %s\n", json_out);
      return 1;
    }
  }

  for (int b = 0; b < nb; b++)
    free(xs[b]);
  free(xs);
  free(t_step);
  prm_optimizer_free(opt);
  prm_ctx_free(ctx);
  prm_model_free(model);
  return 0;
}
