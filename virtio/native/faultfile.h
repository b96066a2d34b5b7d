/* Fault files (virtio.testing.faults): one file per operation in a directory, holding
 * "ERRNO COUNT"; the next COUNT operations fail with ERRNO (COUNT -1: all), and the
 * file is removed when the count runs out.  Read by the LD_PRELOAD shim
 * (virtio/testing/faultshim.c) and by the native data plane's I/O engines (aio.c),
 * whose io_uring path bypasses libc.  The caller serialises calls. */
#ifndef PYVIRTIO_FAULTFILE_H
#define PYVIRTIO_FAULTFILE_H
#include <stdio.h>
#include <unistd.h>

/* The errno to fail with now (consuming one count), or 0. */
static inline int fault_file_take(const char *path)
{
    int err = 0;
    FILE *f = fopen(path, "r+");
    if (!f)
        return 0;
    long e = 0, count = 0;
    if (fscanf(f, "%ld %ld", &e, &count) == 2 && e > 0 && count != 0) {
        err = (int)e;
        if (count > 0)
            count--;
        if (count == 0) {
            unlink(path);
        } else {
            rewind(f);
            fprintf(f, "%ld %ld          \n", e, count);
        }
    }
    fclose(f);
    return err;
}
#endif
