/*
 * parallel.c - running one context's work on several threads.
 *
 * The library owns no threads: a context created with a parallel_for
 * (prm_ctx_options version 2) hands it lists of tasks, and the host runs
 * them. Bit-identical results for any thread count come from one rule: the
 * pieces depend only on the sizes of the work (never on n_workers or on who
 * runs them), each piece writes its own outputs, and every sum keeps its
 * order inside one piece. Without a parallel_for the same pieces run in
 * order on the calling thread.
 *
 * prm_pool is the pthreads parallel_for shipped for hosts without a pool.
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>

#include "internal.h"

/* ---- pieces ----------------------------------------------------------------------------- */

uint64_t prmi_piece(uint64_t n, uint64_t min_piece, uint64_t max_pieces) {
  uint64_t p = (n + max_pieces - 1) / max_pieces;
  if (p < min_piece) p = min_piece;
  p = (p + 15) & ~(uint64_t)15; /* whole cache lines of floats */
  return p > 0 ? p : 1;
}

#define ROW_MIN 64
#define ROW_PIECES 16
#define COL_MIN 64
#define COL_PIECES 8
#define DW_MIN 256

uint64_t prmi_row_piece(uint64_t n) { return prmi_piece(n, ROW_MIN, ROW_PIECES); }
uint64_t prmi_col_piece(uint64_t n) { return prmi_piece(n, COL_MIN, COL_PIECES); }

void prmi_dw_tiles(uint64_t m, uint64_t n, uint64_t *mt, uint64_t *nt) {
  *mt = m >= n ? prmi_piece(m, DW_MIN, COL_PIECES) : 0;
  *nt = m >= n ? 0 : prmi_piece(n, DW_MIN, COL_PIECES);
}

void prmi_par_for(const prm_ctx *ctx, uint32_t n_tasks, prm_task_fn fn, void *arg) {
  if (n_tasks == 0) return;
  if (ctx->parallel_for == NULL || n_tasks == 1) {
    for (uint32_t t = 0; t < n_tasks; t++) fn(arg, t, 0);
    return;
  }
  ctx->parallel_for(ctx->parallel_arg, n_tasks, fn, arg);
}

typedef struct range_job {
  uint64_t n, piece;
  prmi_range_fn fn;
  void *arg;
} range_job;

static void range_task(void *arg, uint32_t t, uint32_t worker) {
  const range_job *j = arg;
  const uint64_t i0 = (uint64_t)t * j->piece;
  const uint64_t i1 = i0 + j->piece < j->n ? i0 + j->piece : j->n;
  j->fn(j->arg, i0, i1, worker);
}

void prmi_par_range(const prm_ctx *ctx, uint64_t n, uint64_t piece, prmi_range_fn fn, void *arg) {
  if (n == 0) return;
  range_job j = {n, piece, fn, arg};
  prmi_par_for(ctx, (uint32_t)((n + piece - 1) / piece), range_task, &j);
}

typedef struct colsum_job {
  float *db;
  const float *dy;
  uint64_t n, ld;
} colsum_job;

static void colsum_piece(void *arg, uint64_t k0, uint64_t k1, uint32_t worker) {
  (void)worker;
  const colsum_job *j = arg;
  for (uint64_t i = 0; i < j->n; i++)
    for (uint64_t k = k0; k < k1; k++) j->db[k] += j->dy[i * j->ld + k];
}

void prmi_par_colsum(const prm_ctx *ctx, float *db, const float *dy, uint64_t n, uint64_t oc,
                     uint64_t ld) {
  if (db == NULL) return;
  colsum_job j = {db, dy, n, ld};
  prmi_par_range(ctx, oc, prmi_col_piece(oc), colsum_piece, &j);
}

/* C = alpha op(A) op(B) + beta C in tiles of mt x nt elements of C: tile
 * (a, b) is one GEMM over the whole inner dimension, so each element of C
 * sums its K products in the order one call over the tile gives it. */
typedef struct gemm_job {
  int ta, tb;
  uint64_t M, N, K, mt, nt, tiles_n;
  float alpha, beta;
  const float *A, *B;
  uint64_t lda, ldb, ldc;
  float *C;
} gemm_job;

static void gemm_task(void *arg, uint32_t t, uint32_t worker) {
  (void)worker;
  const gemm_job *j = arg;
  const uint64_t m0 = (t / j->tiles_n) * j->mt, n0 = (t % j->tiles_n) * j->nt;
  const uint64_t m = m0 + j->mt < j->M ? j->mt : j->M - m0;
  const uint64_t n = n0 + j->nt < j->N ? j->nt : j->N - n0;
  /* rows m0.. of op(A): A's rows (no transpose) or columns (transpose) */
  const float *a = j->ta ? j->A + m0 : j->A + m0 * j->lda;
  const float *b = j->tb ? j->B + n0 * j->ldb : j->B + n0;
  prmi_gemm(j->ta, j->tb, m, n, j->K, j->alpha, a, j->lda, b, j->ldb, j->beta,
            j->C + m0 * j->ldc + n0, j->ldc);
}

void prmi_par_gemm(const prm_ctx *ctx, int ta, int tb, uint64_t M, uint64_t N, uint64_t K,
                   float alpha, const float *A, uint64_t lda, const float *B, uint64_t ldb,
                   float beta, float *C, uint64_t ldc, uint64_t mt, uint64_t nt) {
  if (M == 0 || N == 0) return;
  if (mt == 0 || mt > M) mt = M;
  if (nt == 0 || nt > N) nt = N;
  gemm_job j = {ta, tb, M, N, K, mt, nt, (N + nt - 1) / nt, alpha, beta, A, B, lda, ldb, ldc, C};
  const uint64_t tiles = ((M + mt - 1) / mt) * j.tiles_n;
  prmi_par_for(ctx, (uint32_t)tiles, gemm_task, &j);
}

/* ---- prm_pool ------------------------------------------------------------------------------ */

/*
 * A loop is published as (generation, fn, arg, n_tasks) under the mutex;
 * workers claim task numbers from `claim`, which holds the generation in its
 * high 32 bits and the next task in its low 32, so that a worker waking
 * late for an old loop can never claim a task of a newer one (the
 * compare-and-swap sees another generation and the worker goes back to
 * waiting). A loop ends when `done` reaches n_tasks: the caller waits for
 * the tasks, not for every worker to check in, so a descheduled worker
 * delays nothing (the caller, worker 0, runs what the others do not).
 *
 * Waiting: a forward runs dozens of loops back to back, and a worker that
 * goes to sleep between two of them costs a wake-up (tens of microseconds;
 * milliseconds on a loaded machine) per loop. Workers and the caller spin
 * on the atomics for a short while (SPIN rounds) before blocking.
 */
#define SPIN 20000

static void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  __asm__ __volatile__("yield");
#endif
}

struct prm_pool {
  uint32_t n; /* workers, the caller of a loop included */
  pthread_t *threads;
  int n_started;
  pthread_mutex_t loop; /* one loop at a time */
  pthread_mutex_t mu;   /* guards the loop description and stop */
  pthread_cond_t start, done_cv;
  atomic_uint generation; /* the current loop's; changes under mu */
  int stop;
  prm_task_fn fn;
  void *arg;
  uint32_t n_tasks;
  atomic_ullong claim; /* generation << 32 | next task */
  atomic_uint done;    /* tasks finished in the current loop */
};

typedef struct pool_worker {
  prm_pool *pool;
  uint32_t id;
} pool_worker;

/* Claim and run tasks of loop `gen` until none is left; returns after the
 * last claimed task, waking the caller when it finished the loop. */
static void pool_run(prm_pool *p, uint32_t id, uint32_t gen, prm_task_fn fn, void *arg,
                     uint32_t n_tasks) {
  for (;;) {
    unsigned long long c = atomic_load(&p->claim);
    uint32_t t;
    do {
      if ((uint32_t)(c >> 32) != gen || (uint32_t)c >= n_tasks) return;
      t = (uint32_t)c;
    } while (!atomic_compare_exchange_weak(&p->claim, &c, c + 1));
    fn(arg, t, id);
    if (atomic_fetch_add(&p->done, 1u) + 1u == n_tasks) {
      pthread_mutex_lock(&p->mu);
      pthread_cond_signal(&p->done_cv);
      pthread_mutex_unlock(&p->mu);
    }
  }
}

static void *pool_thread(void *arg) {
  pool_worker *w = arg;
  prm_pool *p = w->pool;
  const uint32_t id = w->id;
  free(w);
  uint32_t seen = 0;
  for (;;) {
    for (int i = 0; i < SPIN && atomic_load(&p->generation) == seen; i++) cpu_relax();
    pthread_mutex_lock(&p->mu);
    while (atomic_load(&p->generation) == seen && !p->stop) pthread_cond_wait(&p->start, &p->mu);
    if (p->stop) {
      pthread_mutex_unlock(&p->mu);
      return NULL;
    }
    seen = atomic_load(&p->generation);
    const prm_task_fn fn = p->fn;
    void *const task_arg = p->arg;
    const uint32_t n_tasks = p->n_tasks;
    pthread_mutex_unlock(&p->mu);
    pool_run(p, id, seen, fn, task_arg, n_tasks);
  }
}

void prm_pool_free(prm_pool *p) {
  if (p == NULL) return;
  pthread_mutex_lock(&p->mu);
  p->stop = 1;
  pthread_cond_broadcast(&p->start);
  pthread_mutex_unlock(&p->mu);
  for (int i = 0; i < p->n_started; i++) pthread_join(p->threads[i], NULL);
  pthread_cond_destroy(&p->start);
  pthread_cond_destroy(&p->done_cv);
  pthread_mutex_destroy(&p->mu);
  pthread_mutex_destroy(&p->loop);
  free(p->threads);
  free(p);
}

int prm_pool_new(prm_pool **out, uint32_t n_workers) {
  if (out == NULL) return prmi_fail(NULL, PRM_ERR_NULL, "prm_pool_new: out is NULL");
  *out = NULL;
  if (n_workers < 1 || n_workers > PRMI_MAX_WORKERS)
    return prmi_fail(NULL, PRM_ERR_INVALID, "prm_pool_new: n_workers = %u not in [1, %d]",
                     (unsigned)n_workers, PRMI_MAX_WORKERS);
  prm_pool *p = calloc(1, sizeof *p);
  if (p == NULL) return prmi_fail(NULL, PRM_ERR_NOMEM, "prm_pool_new: out of memory");
  p->n = n_workers;
  atomic_init(&p->generation, 0u);
  atomic_init(&p->claim, 0ull);
  atomic_init(&p->done, 0u);
  pthread_mutex_init(&p->loop, NULL);
  pthread_mutex_init(&p->mu, NULL);
  pthread_cond_init(&p->start, NULL);
  pthread_cond_init(&p->done_cv, NULL);
  p->threads = calloc(n_workers, sizeof *p->threads);
  if (p->threads == NULL) {
    prm_pool_free(p);
    return prmi_fail(NULL, PRM_ERR_NOMEM, "prm_pool_new: out of memory");
  }
  for (uint32_t i = 1; i < n_workers; i++) {
    pool_worker *w = malloc(sizeof *w);
    int rc = w == NULL ? -1 : 0;
    if (w != NULL) {
      w->pool = p;
      w->id = i;
      rc = pthread_create(&p->threads[p->n_started], NULL, pool_thread, w);
      if (rc != 0) free(w);
    }
    if (rc != 0) {
      prm_pool_free(p);
      return prmi_fail(NULL, PRM_ERR_NOMEM, "prm_pool_new: cannot start thread %u of %u",
                       (unsigned)i, (unsigned)(n_workers - 1));
    }
    p->n_started++;
  }
  *out = p;
  return PRM_OK;
}

uint32_t prm_pool_size(const prm_pool *p) { return p != NULL ? p->n : 0; }

void prm_pool_parallel_for(void *pool, uint32_t n_tasks, prm_task_fn task, void *task_arg) {
  prm_pool *p = pool;
  if (n_tasks == 0) return;
  if (p == NULL || p->n == 1 || n_tasks == 1) {
    for (uint32_t t = 0; t < n_tasks; t++) task(task_arg, t, 0);
    return;
  }
  pthread_mutex_lock(&p->loop);
  pthread_mutex_lock(&p->mu);
  const uint32_t gen = atomic_load(&p->generation) + 1u;
  p->fn = task;
  p->arg = task_arg;
  p->n_tasks = n_tasks;
  atomic_store(&p->done, 0u);
  atomic_store(&p->claim, (unsigned long long)gen << 32);
  atomic_store(&p->generation, gen); /* publishes the loop to spinning workers */
  pthread_cond_broadcast(&p->start);
  pthread_mutex_unlock(&p->mu);
  pool_run(p, 0, gen, task, task_arg, n_tasks); /* the caller is worker 0 */
  for (int i = 0; i < SPIN && atomic_load(&p->done) < n_tasks; i++) cpu_relax();
  pthread_mutex_lock(&p->mu);
  while (atomic_load(&p->done) < n_tasks) pthread_cond_wait(&p->done_cv, &p->mu);
  pthread_mutex_unlock(&p->mu);
  pthread_mutex_unlock(&p->loop);
}
