/*
 * fileio.c - whole-file reads and atomic, durable file replacement.
 *
 * Every file the library reads or writes goes through here (checkpoints now,
 * optimizer state later), so that two rules hold everywhere:
 *
 *  - Opening a path never blocks. open() gets O_NONBLOCK (a FIFO without a
 *    writer, or without a reader when writing, would otherwise wait forever),
 *    then fstat() decides: anything that is not a regular file is refused with
 *    PRM_ERR_IO before a byte is read or written. O_NONBLOCK is then cleared.
 *
 *  - A file is replaced through one predictable temporary name, "<path>.tmp",
 *    written, fsynced and renamed over <path>, then the directory is fsynced.
 *    A crash leaves at most that one file, which the next save to the same
 *    path removes. Concurrent saves to one path are told apart by flock() on
 *    the temporary file: whoever holds the lock on the inode that the name
 *    "<path>.tmp" currently denotes owns the name; anybody else either gets
 *    "another save is in progress" or, if the inode they locked has meanwhile
 *    been renamed away or removed, starts over.
 */
#define _DEFAULT_SOURCE /* flock() (4.4BSD, Linux), with POSIX.1-2008 */

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include "internal.h"

#define TMP_SUFFIX ".tmp"
/* Attempts at owning "<path>.tmp": one is used per stale leftover removed
 * and per race lost to a save that just renamed or removed the file. */
#define TMP_ATTEMPTS 16
/* Bytes per read()/write() call; some systems refuse counts above INT_MAX. */
#define IO_CHUNK ((size_t)1 << 30)

#if defined(__APPLE__)
#define MTIME_NSEC(st) ((st).st_mtimespec.tv_nsec)
#else
#define MTIME_NSEC(st) ((st).st_mtim.tv_nsec)
#endif

static void errno_text(int err, char *buf, size_t size) {
  if (strerror_r(err, buf, size) != 0) snprintf(buf, size, "errno %d", err);
}

/* "a directory", "a FIFO", ...: what a non-regular file is, for messages. */
static const char *file_kind(mode_t mode) {
  if (S_ISDIR(mode)) return "a directory";
  if (S_ISFIFO(mode)) return "a FIFO";
  if (S_ISCHR(mode)) return "a character device";
  if (S_ISBLK(mode)) return "a block device";
  if (S_ISSOCK(mode)) return "a socket";
  if (S_ISLNK(mode)) return "a symbolic link";
  return "a special file";
}

static int clear_nonblock(int fd) {
  int flags = fcntl(fd, F_GETFL);
  if (flags < 0) return -1;
  return fcntl(fd, F_SETFL, flags & ~O_NONBLOCK);
}

int prmi_fd_write_all(int fd, const void *buf, size_t n) {
  const unsigned char *p = buf;
  while (n > 0) {
    ssize_t k = write(fd, p, n < IO_CHUNK ? n : IO_CHUNK);
    if (k < 0) {
      if (errno == EINTR) continue;
      return errno != 0 ? errno : EIO;
    }
    if (k == 0) return EIO; /* no progress and no error: do not spin */
    p += k;
    n -= (size_t)k;
  }
  return 0;
}

/* ------------------------------------------------------------------------ */
/* Reading                                                                   */
/* ------------------------------------------------------------------------ */

/* read() until n bytes or end of file, retrying EINTR. Returns the count,
 * or -1 with errno set. */
static ssize_t read_full(int fd, unsigned char *p, size_t n) {
  size_t done = 0;
  while (done < n) {
    size_t want = n - done < IO_CHUNK ? n - done : IO_CHUNK;
    ssize_t k = read(fd, p + done, want);
    if (k < 0) {
      if (errno == EINTR) continue;
      return -1;
    }
    if (k == 0) break;
    done += (size_t)k;
  }
  return (ssize_t)done;
}

int prmi_file_read_all(const char *path, unsigned char **buf_out, size_t *size_out,
                       char *handle_msg) {
  char why[128];
  struct stat st, st2;
  unsigned char *buf, extra;
  size_t size;
  ssize_t got;
  int fd, rc;
  *buf_out = NULL;
  *size_out = 0;
  /* O_NONBLOCK: open() on a FIFO without a writer returns at once. */
  fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC | O_NOCTTY);
  if (fd < 0) {
    errno_text(errno, why, sizeof why);
    return prmi_fail(handle_msg, PRM_ERR_IO, "cannot open '%s': %s", path, why);
  }
  if (fstat(fd, &st) != 0) {
    errno_text(errno, why, sizeof why);
    close(fd);
    return prmi_fail(handle_msg, PRM_ERR_IO, "cannot stat '%s': %s", path, why);
  }
  if (!S_ISREG(st.st_mode)) {
    close(fd);
    return prmi_fail(handle_msg, PRM_ERR_IO, "'%s' is %s, not a regular file", path,
                     file_kind(st.st_mode));
  }
  if (clear_nonblock(fd) != 0) {
    errno_text(errno, why, sizeof why);
    close(fd);
    return prmi_fail(handle_msg, PRM_ERR_IO, "cannot read '%s': %s", path, why);
  }
  if (st.st_size < 0 || (uint64_t)st.st_size > SIZE_MAX - 1) {
    close(fd);
    return prmi_fail(handle_msg, PRM_ERR_NOMEM, "'%s' is too large to load", path);
  }
  size = (size_t)st.st_size;
  buf = malloc(size > 0 ? size : 1);
  if (buf == NULL) {
    close(fd);
    return prmi_fail(handle_msg, PRM_ERR_NOMEM, "cannot allocate %zu bytes for '%s'", size, path);
  }

  /* Exactly the st_size bytes fstat reported, then a probe for one more and
   * a second fstat: a file that shrank, grew or was rewritten meanwhile was
   * not read as one consistent version, so it is refused rather than parsed. */
  rc = PRM_OK;
  got = read_full(fd, buf, size);
  if (got >= 0 && (size_t)got == size) {
    ssize_t more = read_full(fd, &extra, 1);
    if (more < 0) {
      got = -1;
    } else if (more > 0) {
      rc = prmi_fail(handle_msg, PRM_ERR_IO,
                     "'%s' changed while being read (it grew beyond the %zu bytes it had "
                     "when opened); load it again once its writer is done",
                     path, size);
    } else if (fstat(fd, &st2) != 0) {
      got = -1;
    } else if (st2.st_size != st.st_size || st2.st_mtime != st.st_mtime ||
               MTIME_NSEC(st2) != MTIME_NSEC(st)) {
      rc = prmi_fail(handle_msg, PRM_ERR_IO,
                     "'%s' changed while being read (its size or modification time changed); "
                     "load it again once its writer is done",
                     path);
    }
  } else if (got >= 0) {
    rc = prmi_fail(handle_msg, PRM_ERR_IO,
                   "'%s' changed while being read (it shrank from %zu to %zu bytes); load it "
                   "again once its writer is done",
                   path, size, (size_t)got);
  }
  if (got < 0) {
    errno_text(errno, why, sizeof why);
    rc = prmi_fail(handle_msg, PRM_ERR_IO, "cannot read '%s': %s", path, why);
  }
  close(fd);
  if (rc != PRM_OK) {
    free(buf);
    return rc;
  }
  *buf_out = buf;
  *size_out = size;
  return PRM_OK;
}

/* ------------------------------------------------------------------------ */
/* Atomic replacement                                                        */
/* ------------------------------------------------------------------------ */

/* Does the name `tmp` still denote the inode `held` (which we have open)? */
static int still_named(const char *tmp, const struct stat *held) {
  struct stat st;
  return lstat(tmp, &st) == 0 && st.st_dev == held->st_dev && st.st_ino == held->st_ino;
}

/*
 * Own "<path>.tmp": on success returns an fd of a regular file that this call
 * created (empty, mode 0666 & ~umask, this process's owner), holds flock
 * LOCK_EX on, and that the name still denotes; *held is its fstat. On failure
 * returns -1 and *status (the message is set).
 *
 * The name may exist already:
 *  - locked: another save is writing it -> PRM_ERR_IO, nothing touched;
 *  - unlocked: a leftover of a save that died (the kernel dropped its lock)
 *    -> lock it, remove it, create a fresh one. Reusing it would keep the
 *    dead writer's owner and mode for the new file;
 *  - not a regular file (a directory, a FIFO, a symbolic link, ...) ->
 *    PRM_ERR_IO: never written through, never removed.
 * Between open() and flock() another save may rename or remove the inode we
 * opened; we then hold a lock on a file that is no longer "<path>.tmp" (it
 * may even be <path> now), so we check the name and start over.
 */
static int own_temp(const char *path, const char *tmp, struct stat *held, char *handle_msg,
                    int *status) {
  char why[128];
  for (int attempt = 0; attempt < TMP_ATTEMPTS; attempt++) {
    int created = 1, err;
    /* O_NONBLOCK: a FIFO at the name must not block the open (it is refused
     * below); O_NOFOLLOW: never write or lock through a symbolic link. */
    int fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK | O_NOCTTY,
                  0666);
    if (fd < 0 && errno == EEXIST) {
      created = 0; /* read-only is enough to lock and judge it */
      fd = open(tmp, O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK | O_NOCTTY);
      if (fd < 0 && errno == ENOENT) continue; /* removed meanwhile: create it */
    }
    if (fd < 0) {
      err = errno;
      if (err == ELOOP) {
        *status =
            prmi_fail(handle_msg, PRM_ERR_IO,
                      "cannot save '%s': its temporary file '%s' is a symbolic link", path, tmp);
        return -1;
      }
      errno_text(err, why, sizeof why);
      *status =
          prmi_fail(handle_msg, err == ENOMEM ? PRM_ERR_NOMEM : PRM_ERR_IO,
                    "cannot save '%s': cannot create the temporary file '%s': %s", path, tmp, why);
      return -1;
    }
    if (fstat(fd, held) != 0) {
      errno_text(errno, why, sizeof why);
      close(fd);
      *status = prmi_fail(handle_msg, PRM_ERR_IO, "cannot save '%s': cannot stat '%s': %s", path,
                          tmp, why);
      return -1;
    }
    if (!S_ISREG(held->st_mode)) {
      close(fd);
      *status = prmi_fail(handle_msg, PRM_ERR_IO,
                          "cannot save '%s': its temporary file '%s' is %s, not a regular file",
                          path, tmp, file_kind(held->st_mode));
      return -1;
    }
    if (flock(fd, LOCK_EX | LOCK_NB) != 0) {
      err = errno;
      close(fd);
      if (err == EINTR) continue;
      if (err == EWOULDBLOCK || err == EAGAIN) {
        *status =
            prmi_fail(handle_msg, PRM_ERR_IO,
                      "another save to '%s' is in progress (it holds the lock on '%s')", path, tmp);
        return -1;
      }
      errno_text(err, why, sizeof why);
      *status = prmi_fail(handle_msg, PRM_ERR_IO, "cannot save '%s': cannot lock '%s': %s", path,
                          tmp, why);
      return -1;
    }
    if (!still_named(tmp, held)) { /* a concurrent save renamed or removed it */
      close(fd);
      continue;
    }
    if (!created) { /* a dead save's leftover, now ours: replace it */
      if (unlink(tmp) != 0) {
        errno_text(errno, why, sizeof why);
        close(fd);
        *status = prmi_fail(handle_msg, PRM_ERR_IO,
                            "cannot save '%s': cannot remove the stale temporary file '%s': %s",
                            path, tmp, why);
        return -1;
      }
      close(fd);
      continue;
    }
    if (clear_nonblock(fd) != 0) {
      errno_text(errno, why, sizeof why);
      (void)unlink(tmp); /* ours: created, locked, still named */
      close(fd);
      *status = prmi_fail(handle_msg, PRM_ERR_IO, "cannot save '%s': %s", path, why);
      return -1;
    }
    return fd;
  }
  *status = prmi_fail(handle_msg, PRM_ERR_IO,
                      "another save to '%s' is in progress (its temporary file '%s' kept being "
                      "replaced)",
                      path, tmp);
  return -1;
}

/*
 * fsync the directory that holds `path`, so that the rename survives a
 * crash. Returns 0, or an errno value for a real failure. Where the directory
 * cannot be opened for reading (a write-and-search-only directory), or the
 * file system does not support fsync on directories (EINVAL, ENOTSUP, ...),
 * there is nothing more we can do and the save counts as done.
 */
static int sync_dir_of(const char *path) {
  const char *slash = strrchr(path, '/');
  char *dir = NULL;
  int fd, err = 0;
  if (slash == NULL) {
    fd = open(".", O_RDONLY | O_DIRECTORY | O_CLOEXEC | O_NONBLOCK);
  } else {
    size_t n = slash == path ? 1 : (size_t)(slash - path);
    dir = malloc(n + 1);
    if (dir == NULL) return ENOMEM;
    memcpy(dir, path, n);
    dir[n] = '\0';
    fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC | O_NONBLOCK);
    free(dir);
  }
  if (fd < 0) return 0;
  if (fsync(fd) != 0) {
    err = errno;
    if (err == EINVAL || err == EBADF || err == EROFS || err == ENOTSUP) err = 0;
  }
  close(fd);
  return err;
}

int prmi_file_write_atomic(const char *path, prmi_write_fn write_fn, void *arg, char *handle_msg) {
  char why[128];
  struct stat held;
  size_t n = strlen(path);
  char *tmp = malloc(n + sizeof TMP_SUFFIX);
  int fd, err, status;
  if (tmp == NULL)
    return prmi_fail(handle_msg, PRM_ERR_NOMEM, "cannot save '%s': out of memory", path);
  memcpy(tmp, path, n);
  memcpy(tmp + n, TMP_SUFFIX, sizeof TMP_SUFFIX);

  fd = own_temp(path, tmp, &held, handle_msg, &status);
  if (fd < 0) {
    free(tmp);
    return status;
  }
  /* While we hold the lock and the name is ours, no cooperating save can
   * rename, remove or write it, so rename() below moves exactly our bytes.
   * The descriptor (and with it the lock) stays open until after rename():
   * closing first would let another save lock and truncate the inode just
   * before it becomes <path>. */
  err = write_fn(arg, fd);
  if (err == 0 && fsync(fd) != 0) err = errno != 0 ? errno : EIO;
  if (err == 0 && rename(tmp, path) != 0) err = errno != 0 ? errno : EIO;
  if (err != 0) {
    if (still_named(tmp, &held)) (void)unlink(tmp);
    close(fd);
    free(tmp);
    errno_text(err, why, sizeof why);
    return prmi_fail(handle_msg, err == ENOMEM ? PRM_ERR_NOMEM : PRM_ERR_IO,
                     "writing '%s' failed: %s (file left unchanged)", path, why);
  }
  err = sync_dir_of(path);
  close(fd);
  free(tmp);
  if (err != 0) {
    errno_text(err, why, sizeof why);
    return prmi_fail(handle_msg, PRM_ERR_IO,
                     "'%s' was replaced, but syncing its directory failed: %s (the new file may "
                     "not survive a crash)",
                     path, why);
  }
  return PRM_OK;
}
