/*
 * error.c - status names, per-thread and per-handle error messages, version.
 */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "internal.h"

/* The only mutable storage outside handles: one message per thread, and
 * the thread's copies of the last model and optimizer messages it asked for
 * (prmi_errslot_read: one buffer per kind, so that a pointer from
 * prm_model_errmsg survives a call of prm_optimizer_errmsg). */
static _Thread_local char tls_errmsg[PRMI_ERRMSG_SIZE];
static _Thread_local char tls_copy[PRMI_ERRSLOT_KINDS][PRMI_ERRMSG_SIZE];

uint32_t prm_version_number(void) { return PRM_VERSION_NUMBER; }

const char *prm_version_string(void) { return PRM_VERSION_STRING; }

const char *prm_status_string(int status) {
  switch (status) {
  case PRM_OK: return "PRM_OK: success";
  case PRM_ERR_NULL: return "PRM_ERR_NULL: required pointer is NULL";
  case PRM_ERR_INVALID: return "PRM_ERR_INVALID: argument out of range";
  case PRM_ERR_SIZE: return "PRM_ERR_SIZE: size or count mismatch";
  case PRM_ERR_NONFINITE: return "PRM_ERR_NONFINITE: NaN or Inf in input";
  case PRM_ERR_VERSION: return "PRM_ERR_VERSION: unknown struct version";
  case PRM_ERR_NOMEM: return "PRM_ERR_NOMEM: out of memory";
  case PRM_ERR_STATE: return "PRM_ERR_STATE: call not allowed in this state";
  case PRM_ERR_MISMATCH: return "PRM_ERR_MISMATCH: objects do not belong together";
  case PRM_ERR_IO: return "PRM_ERR_IO: file input/output failed";
  case PRM_ERR_FORMAT: return "PRM_ERR_FORMAT: malformed or mismatched checkpoint";
  case PRM_ERR_NONFINITE_GRAD: return "PRM_ERR_NONFINITE_GRAD: NaN or Inf in gradients";
  case PRM_ERR_UNSUPPORTED: return "PRM_ERR_UNSUPPORTED: not supported by this build";
  default: return "unknown status";
  }
}

const char *prm_last_errmsg(void) { return tls_errmsg; }

int prmi_fail(char *handle_msg, int status, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(tls_errmsg, sizeof tls_errmsg, fmt, ap);
  va_end(ap);
  if (handle_msg != NULL) memcpy(handle_msg, tls_errmsg, PRMI_ERRMSG_SIZE);
  return status;
}

int prmi_init_struct(void *s, const void *defaults, size_t size, uint32_t version, uint32_t newest,
                     const char *fn) {
  if (s == NULL) return prmi_fail(NULL, PRM_ERR_NULL, "%s: struct pointer is NULL", fn);
  if (version < 1 || version > newest)
    return prmi_fail(NULL, PRM_ERR_VERSION,
                     "%s: version %u is not supported (this library knows 1..%u)", fn,
                     (unsigned)version, (unsigned)newest);
  memcpy(s, defaults, size);
  memcpy(s, &version, sizeof version); /* every versioned struct starts with it */
  return PRM_OK;
}

int prmi_adopt_error(char *handle_msg, int status) {
  if (handle_msg != NULL) memcpy(handle_msg, tls_errmsg, PRMI_ERRMSG_SIZE);
  return status;
}

int prmi_check_version(char *handle_msg, const void *versioned, uint32_t newest, const char *what) {
  uint32_t v;
  if (versioned == NULL) return prmi_fail(handle_msg, PRM_ERR_NULL, "%s is NULL", what);
  memcpy(&v, versioned, sizeof v); /* every versioned struct starts with it */
  if (v < 1 || v > newest)
    return prmi_fail(handle_msg, PRM_ERR_VERSION,
                     "%s: version %u is not supported (this library knows 1..%u)", what,
                     (unsigned)v, (unsigned)newest);
  return PRM_OK;
}

/* ---- locked per-handle messages ------------------------------------------------------- */

int prmi_errslot_init(prmi_errslot *s) {
  s->msg[0] = '\0';
  return pthread_mutex_init(&s->lock, NULL) == 0 ? PRM_OK : PRM_ERR_NOMEM;
}

void prmi_errslot_destroy(prmi_errslot *s) { pthread_mutex_destroy(&s->lock); }

/*
 * The slot belongs to a handle that other threads may be using through
 * const calls at the same moment (a shared model), so both the write here
 * and the copy in prmi_errslot_read hold the slot's lock. Callers pass the
 * slot of a const handle: the handle is heap-allocated and never defined
 * const, so writing through the cast pointer is well-defined (the same
 * reasoning as a C++ `mutable` member).
 */
int prmi_errslot_record(const prmi_errslot *slot, int status) {
  if (slot == NULL || status == PRM_OK) return status;
  prmi_errslot *s = (prmi_errslot *)slot;
  pthread_mutex_lock(&s->lock);
  memcpy(s->msg, tls_errmsg, PRMI_ERRMSG_SIZE);
  pthread_mutex_unlock(&s->lock);
  return status;
}

const char *prmi_errslot_read(const prmi_errslot *slot, int kind) {
  char *copy = tls_copy[kind];
  prmi_errslot *s = (prmi_errslot *)slot;
  pthread_mutex_lock(&s->lock);
  memcpy(copy, s->msg, PRMI_ERRMSG_SIZE);
  pthread_mutex_unlock(&s->lock);
  return copy;
}
