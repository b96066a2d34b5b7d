/* libc calls of the Python side (hostcalls.c), compiled here so that no module has
 * to parse a cdef at start-up.  Both return 0 or a negative errno. */

/* fallocate(2), retried on EINTR. */
int vm_fallocate(int fd, int mode, int64_t offset, int64_t len);
/* statx(2) of an open file (AT_EMPTY_PATH) into a caller's 256-byte buffer, which
 * receives struct statx as the kernel lays it out (newer fields included). */
int vm_statx_fd(int fd, unsigned int mask, uint8_t *buf);
