/* libc calls of the Python side: see hostcalls.h. */
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <sys/syscall.h>

int vm_fallocate(int fd, int mode, int64_t offset, int64_t len)
{
    while (fallocate(fd, mode, offset, len) != 0)
        if (errno != EINTR)
            return -errno;
    return 0;
}

int vm_statx_fd(int fd, unsigned int mask, uint8_t *buf)
{
    memset(buf, 0, 256);
#ifdef SYS_statx
    /* the raw system call: glibc's struct statx may predate fields the kernel fills */
    if (syscall(SYS_statx, fd, "", AT_EMPTY_PATH, mask, buf) != 0)
        return -errno;
    return 0;
#else
    return -ENOSYS;
#endif
}
