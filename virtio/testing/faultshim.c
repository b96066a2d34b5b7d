/* LD_PRELOAD fault injection for back-end processes (virtio.testing.faults).
 *
 * With PYVIRTIO_FAULTS_DIR set, each intercepted libc call looks for a file named
 * after it in that directory ("fdatasync", "fsync", "pwritev", "preadv",
 * "pwrite", "pread").  The file holds "ERRNO COUNT": the next COUNT calls fail with
 * ERRNO (COUNT -1: every call); when the count runs out the file is removed.  The
 * file is consulted on every call, so a test arms and disarms faults while the
 * process runs.  Only calls on regular files are failed (eventfds, sockets and
 * pipes are left alone). */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

#include "faultfile.h"

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;

/* Returns the errno to fail with, or 0 to let the call through. */
static int armed(const char *name, int fd)
{
    const char *dir = getenv("PYVIRTIO_FAULTS_DIR");
    if (!dir)
        return 0;
    struct stat st;
    if (fd >= 0 && (fstat(fd, &st) || !S_ISREG(st.st_mode)))
        return 0;
    char path[PATH_MAX];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    int err = 0;
    pthread_mutex_lock(&mu);
    err = fault_file_take(path);
    pthread_mutex_unlock(&mu);
    return err;
}

#define REAL(name, ret, ...)                                                                      \
    static ret (*real)(__VA_ARGS__);                                                              \
    if (!real)                                                                                    \
        real = (ret(*)(__VA_ARGS__))dlsym(RTLD_NEXT, name)

#define FAIL_IF(name, fd)                                                                         \
    do {                                                                                          \
        int e_ = armed(name, fd);                                                                 \
        if (e_) {                                                                                 \
            errno = e_;                                                                           \
            return -1;                                                                            \
        }                                                                                         \
    } while (0)

int fdatasync(int fd)
{
    REAL("fdatasync", int, int);
    FAIL_IF("fdatasync", fd);
    return real(fd);
}

int fsync(int fd)
{
    REAL("fsync", int, int);
    FAIL_IF("fsync", fd);
    return real(fd);
}

ssize_t pwritev(int fd, const struct iovec *iov, int n, off_t off)
{
    REAL("pwritev", ssize_t, int, const struct iovec *, int, off_t);
    FAIL_IF("pwritev", fd);
    return real(fd, iov, n, off);
}

ssize_t pwritev64(int fd, const struct iovec *iov, int n, off_t off)
{
    REAL("pwritev64", ssize_t, int, const struct iovec *, int, off_t);
    FAIL_IF("pwritev", fd);
    return real(fd, iov, n, off);
}

ssize_t preadv(int fd, const struct iovec *iov, int n, off_t off)
{
    REAL("preadv", ssize_t, int, const struct iovec *, int, off_t);
    FAIL_IF("preadv", fd);
    return real(fd, iov, n, off);
}

ssize_t preadv64(int fd, const struct iovec *iov, int n, off_t off)
{
    REAL("preadv64", ssize_t, int, const struct iovec *, int, off_t);
    FAIL_IF("preadv", fd);
    return real(fd, iov, n, off);
}

ssize_t pwrite(int fd, const void *buf, size_t n, off_t off)
{
    REAL("pwrite", ssize_t, int, const void *, size_t, off_t);
    FAIL_IF("pwrite", fd);
    return real(fd, buf, n, off);
}

ssize_t pwrite64(int fd, const void *buf, size_t n, off_t off)
{
    REAL("pwrite64", ssize_t, int, const void *, size_t, off_t);
    FAIL_IF("pwrite", fd);
    return real(fd, buf, n, off);
}

ssize_t pread(int fd, void *buf, size_t n, off_t off)
{
    REAL("pread", ssize_t, int, void *, size_t, off_t);
    FAIL_IF("pread", fd);
    return real(fd, buf, n, off);
}

ssize_t pread64(int fd, void *buf, size_t n, off_t off)
{
    REAL("pread64", ssize_t, int, void *, size_t, off_t);
    FAIL_IF("pread", fd);
    return real(fd, buf, n, off);
}

ssize_t pwritev2(int fd, const struct iovec *iov, int n, off_t off, int flags)
{
    REAL("pwritev2", ssize_t, int, const struct iovec *, int, off_t, int);
    FAIL_IF("pwritev", fd);
    return real(fd, iov, n, off, flags);
}

ssize_t pwritev64v2(int fd, const struct iovec *iov, int n, off_t off, int flags)
{
    REAL("pwritev64v2", ssize_t, int, const struct iovec *, int, off_t, int);
    FAIL_IF("pwritev", fd);
    return real(fd, iov, n, off, flags);
}

ssize_t preadv2(int fd, const struct iovec *iov, int n, off_t off, int flags)
{
    REAL("preadv2", ssize_t, int, const struct iovec *, int, off_t, int);
    FAIL_IF("preadv", fd);
    return real(fd, iov, n, off, flags);
}

ssize_t preadv64v2(int fd, const struct iovec *iov, int n, off_t off, int flags)
{
    REAL("preadv64v2", ssize_t, int, const struct iovec *, int, off_t, int);
    FAIL_IF("preadv", fd);
    return real(fd, iov, n, off, flags);
}
