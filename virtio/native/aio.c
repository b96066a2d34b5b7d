/* Asynchronous file I/O for the data planes: io_uring (liburing, when built with
 * HAVE_LIBURING and the kernel allows it) or a pool of worker threads.
 *
 * A request lives in a slot (the chain's head: unique while in flight) from
 * aio_start to the aio_reap that reports it.  Requests started between two
 * aio_submit calls go to the kernel together (one io_uring_enter); completions are
 * reaped in batches, in whatever order the kernel finishes them.  Short transfers
 * are continued (the iovec array is advanced in place); an end of file before the
 * whole transfer is EIO.  AIO_WRITE_SYNC is a write followed by fdatasync (linked
 * on the ring: the sync starts only if the write completed), and reports which of
 * the two failed.

 * Waiting.  With worker threads, the completion eventfd (`efd`) is what the data
 * plane polls, beside its kick and wake eventfds.  With io_uring the data plane
 * thread waits in the ring itself (aio_uring_wait): the kick and wake eventfds are
 * registered files on the ring, each with an 8-byte READ kept armed, so a kick, a
 * wake and an I/O completion all end one io_uring_enter -- the same call that
 * submits what the last batch queued -- and the ring is set up with
 * DEFER_TASKRUN, so the thread is woken once per wait, not once per completion.
 * Kicks are consumed by those READs (as the data plane's read() did).
 *
 * Sharing a ring (--queue-threads, QEMU's iothread model).  One data plane thread
 * may serve several queues (dataplane.c's dp_group): their engines are then
 * "owners" of one struct aio_ring -- one io_uring, one wait for all of them.
 * Each owner keeps its own slots and completed list; the ring's user_data names
 * the owner, and its kick / wake eventfds are fixed files 2k and 2k + 1 (the
 * group's wake eventfd is the last one).  Whoever drains the ring hands every
 * completion to its owner.
 *
 * Test hook: with a fault directory set (dp_set_fault_dir), each operation first
 * consults the file named after its libc equivalent ("preadv", "pwritev",
 * "fdatasync"), the protocol of virtio.testing.faults: "ERRNO COUNT" fails the next
 * COUNT operations with ERRNO.  io_uring bypasses libc, so the LD_PRELOAD shim
 * cannot see these operations; this hook makes the same tests run on every engine.
 * Off (one load of a NULL byte) unless set. */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/uio.h>
#include <unistd.h>

#include "faultfile.h"
#ifdef HAVE_LIBURING
#include <liburing.h>
#endif

enum { AIO_READ = 0, AIO_WRITE = 1, AIO_WRITE_SYNC = 2, AIO_FSYNC = 3 };

/* ---- fault hook ---------------------------------------------------------------- */
static char dp_fault_dir_buf[PATH_MAX];
static pthread_mutex_t dp_fault_mu = PTHREAD_MUTEX_INITIALIZER;

void dp_set_fault_dir(const char *dir)
{
    pthread_mutex_lock(&dp_fault_mu);
    snprintf(dp_fault_dir_buf, sizeof dp_fault_dir_buf, "%s", dir ? dir : "");
    pthread_mutex_unlock(&dp_fault_mu);
}

/* The errno to fail the next `name` operation with, or 0. */
static int dp_fault(const char *name)
{
    if (!__atomic_load_n(&dp_fault_dir_buf[0], __ATOMIC_RELAXED))
        return 0;
    char path[PATH_MAX + 32];
    int err = 0;
    pthread_mutex_lock(&dp_fault_mu);
    snprintf(path, sizeof path, "%s/%s", dp_fault_dir_buf, name);
    err = fault_file_take(path);
    pthread_mutex_unlock(&dp_fault_mu);
    return err;
}

static const char *aio_fault_name(int op)
{
    return op == AIO_READ ? "preadv" : op == AIO_FSYNC ? "fdatasync" : "pwritev";
}

/* ---- the engine ---------------------------------------------------------------- */
struct aio_req {
    int op, fd;
    struct iovec *iov;
    int iovcnt;
    uint64_t off;
    uint64_t left;          /* bytes still to transfer */
    int32_t err;
    uint8_t sync_failed;    /* err came from the fdatasync */
    uint8_t sync_fault;     /* test hook: fail the sync of an AIO_WRITE_SYNC */
    uint8_t ncqe;           /* ring completions outstanding */
};

struct aio_done {
    uint32_t slot;
    int32_t err;
    int sync_failed;
};

#define AIO_MAX_THREADS 64

/* user_data of the ring's control requests: kind | owner << 16 | generation (I/O
 * is owner << 40 | slot << 1 | is_sync) */
#define AIO_CTL (1ULL << 63)
#define AIO_CTL_KICK (1ULL << 32)
#define AIO_CTL_WAKE (2ULL << 32)
#define AIO_CTL_CANCEL (3ULL << 32)
#define AIO_CTL_KIND (3ULL << 32)
#define AIO_CTL_GROUP (4ULL << 32) /* the group's wake eventfd was read */
#define AIO_OWNER_SHIFT 40
#define AIO_MAX_OWNERS 64
#define AIO_FIX_GROUP (2 * AIO_MAX_OWNERS)

struct aio;

/* One io_uring and what its owners share (see "Sharing a ring" above). */
struct aio_ring {
#ifdef HAVE_LIBURING
    struct io_uring ring;
#endif
    int defer_taskrun, wait_in_ring, files_ok, refs;
    unsigned queued;          /* SQEs prepared since the last submit */
    uint64_t submits;
    struct aio *owners[AIO_MAX_OWNERS];
    uint16_t kick_gen[AIO_MAX_OWNERS], wake_gen[AIO_MAX_OWNERS];
    uint64_t bufs[2 * AIO_MAX_OWNERS + 1]; /* the READs' targets: live as long as the ring */
    int group_fd, group_armed, group_woken;
};

struct aio {
    int engine; /* BLK_AIO_THREADS / BLK_AIO_URING */
    int efd;
    uint32_t nslots;
    struct aio_req *reqs;
    /* completed slots (worker threads, synthetic failures): a ring of nslots */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    uint32_t *cq, cq_head, cq_n;
    /* worker threads: a ring of queued slots */
    uint32_t *jq, jq_head, jq_n;
    int nthreads, maxthreads, idle, stop;
    pthread_t threads[AIO_MAX_THREADS];
    uint64_t submits;
    int wait_in_ring; /* io_uring: the data plane waits in the ring (else on efd) */
    struct aio_ring *r; /* io_uring: this engine's ring, maybe shared */
    struct aio_ring **home; /* shared: where the group keeps it */
    uint32_t owner;     /* index in r->owners */
    int ring_ok;
    /* waiting in the ring: kick/wake eventfds as fixed files 2 owner, 2 owner + 1 */
    int have_kick, kick_armed, wake_armed, kicked, woken, watched;
    int want;           /* shared ring: the DP_EV_* this owner's data plane waits for */
};

static void aio_signal(struct aio *a)
{
    uint64_t one = 1;
    ssize_t w = write(a->efd, &one, sizeof one);
    (void)w;
}

/* Report a slot done (caller holds mu). */
static void aio_post_locked(struct aio *a, uint32_t slot)
{
    a->cq[(a->cq_head + a->cq_n) % a->nslots] = slot;
    a->cq_n++;
}

static void aio_post(struct aio *a, uint32_t slot)
{
    pthread_mutex_lock(&a->mu);
    aio_post_locked(a, slot);
    pthread_mutex_unlock(&a->mu);
    if (!a->wait_in_ring) /* else aio_uring_wait looks at cq_n */
        aio_signal(a);
}

/* Advance r's iovecs past n transferred bytes. */
static void aio_advance(struct aio_req *r, uint64_t n)
{
    r->off += n;
    r->left -= n;
    while (r->iovcnt > 0 && n >= r->iov->iov_len) {
        n -= r->iov->iov_len;
        r->iov++;
        r->iovcnt--;
    }
    if (r->iovcnt > 0 && n) {
        r->iov->iov_base = (uint8_t *)r->iov->iov_base + n;
        r->iov->iov_len -= n;
    }
}

/* Synchronous execution (worker threads).  Sets r->err / r->sync_failed. */
static void aio_run_sync(struct aio_req *r)
{
    int fault = dp_fault(aio_fault_name(r->op));
    if (fault) {
        r->err = fault;
        r->sync_failed = r->op == AIO_FSYNC;
        return;
    }
    while (r->op != AIO_FSYNC && r->left) {
        ssize_t n = r->op == AIO_READ ? preadv2(r->fd, r->iov, r->iovcnt, (off_t)r->off, 0)
                                      : pwritev2(r->fd, r->iov, r->iovcnt, (off_t)r->off, 0);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            r->err = errno ? errno : EIO;
            return;
        }
        if (n == 0) {
            r->err = EIO; /* end of file: the image shrank under us */
            return;
        }
        aio_advance(r, (uint64_t)n);
    }
    if (r->op == AIO_WRITE_SYNC || r->op == AIO_FSYNC) {
        int f = r->op == AIO_WRITE_SYNC ? dp_fault("fdatasync") : 0;
        if (f) {
            r->err = f;
            r->sync_failed = 1;
            return;
        }
        while (fdatasync(r->fd)) {
            if (errno == EINTR)
                continue;
            r->err = errno ? errno : EIO;
            r->sync_failed = 1;
            return;
        }
    }
}

static void *aio_worker(void *arg)
{
    struct aio *a = arg;
    pthread_mutex_lock(&a->mu);
    for (;;) {
        while (!a->jq_n && !a->stop) {
            a->idle++;
            pthread_cond_wait(&a->cv, &a->mu);
            a->idle--;
        }
        if (!a->jq_n && a->stop)
            break;
        uint32_t slot = a->jq[a->jq_head];
        a->jq_head = (a->jq_head + 1) % a->nslots;
        a->jq_n--;
        pthread_mutex_unlock(&a->mu);
        aio_run_sync(&a->reqs[slot]);
        pthread_mutex_lock(&a->mu);
        aio_post_locked(a, slot);
        aio_signal(a);
    }
    pthread_mutex_unlock(&a->mu);
    return NULL;
}

#ifdef HAVE_LIBURING
static struct io_uring_sqe *ring_sqe(struct aio_ring *r)
{
    struct io_uring_sqe *sqe = io_uring_get_sqe(&r->ring);
    if (!sqe) { /* SQ full: hand over what is queued, then there is room */
        io_uring_submit(&r->ring);
        r->submits++;
        r->queued = 0;
        sqe = io_uring_get_sqe(&r->ring);
    }
    return sqe;
}

static struct io_uring_sqe *aio_sqe(struct aio *a)
{
    return ring_sqe(a->r);
}

/* Queue r (slot) on the ring. */
static void aio_uring_queue(struct aio *a, uint32_t slot)
{
    struct aio_req *r = &a->reqs[slot];
    r->ncqe = 0;
    if (r->op == AIO_WRITE_SYNC && io_uring_sq_space_left(&a->r->ring) < 2) {
        io_uring_submit(&a->r->ring);
        a->r->submits++;
        a->r->queued = 0;
    }
    struct io_uring_sqe *sqe = aio_sqe(a);
    if (r->op == AIO_FSYNC) {
        io_uring_prep_fsync(sqe, r->fd, IORING_FSYNC_DATASYNC);
    } else if (r->op == AIO_READ) {
        if (r->iovcnt == 1)
            io_uring_prep_read(sqe, r->fd, r->iov->iov_base, (unsigned)r->iov->iov_len, r->off);
        else
            io_uring_prep_readv(sqe, r->fd, r->iov, (unsigned)r->iovcnt, r->off);
    } else {
        if (r->iovcnt == 1)
            io_uring_prep_write(sqe, r->fd, r->iov->iov_base, (unsigned)r->iov->iov_len, r->off);
        else
            io_uring_prep_writev(sqe, r->fd, r->iov, (unsigned)r->iovcnt, r->off);
    }
    uint64_t ud = (uint64_t)a->owner << AIO_OWNER_SHIFT | (uint64_t)slot << 1;
    sqe->user_data = ud;
    r->ncqe++;
    a->r->queued++;
    if (r->op == AIO_WRITE_SYNC && !r->sync_fault) {
        /* The sync runs only once the write completed whole (a short or failed write
         * cancels it: -ECANCELED). */
        sqe->flags |= IOSQE_IO_LINK;
        sqe = aio_sqe(a);
        io_uring_prep_fsync(sqe, r->fd, IORING_FSYNC_DATASYNC);
        sqe->user_data = ud | 1;
        r->ncqe++;
        a->r->queued++;
    }
}

/* One ring completion of slot; returns 1 when the request is finished. */
static int aio_uring_cqe(struct aio *a, uint32_t slot, int is_sync, int res)
{
    struct aio_req *r = &a->reqs[slot];
    r->ncqe--;
    if (is_sync || r->op == AIO_FSYNC) {
        if (res < 0 && res != -ECANCELED && !r->err) {
            r->err = -res;
            r->sync_failed = 1;
        }
    } else if (res < 0) {
        if (res == -EINTR || res == -EAGAIN)
            ; /* retried below: nothing was transferred */
        else if (!r->err)
            r->err = -res;
    } else if (res == 0 && r->left) {
        if (!r->err)
            r->err = EIO; /* end of file: the image shrank under us */
    } else {
        aio_advance(r, (uint64_t)res);
    }
    if (r->ncqe)
        return 0;
    if (r->err)
        return 1;
    if (r->op != AIO_FSYNC && r->left) { /* short transfer: go on from there */
        aio_uring_queue(a, slot);
        return 0;
    }
    if (r->op == AIO_WRITE_SYNC && r->sync_fault) {
        r->err = r->sync_fault;
        r->sync_failed = 1;
    }
    return 1;
}

static uint64_t ctl_ud(uint64_t kind, uint32_t owner, uint16_t gen)
{
    return AIO_CTL | kind | (uint64_t)owner << 16 | gen;
}

/* A control completion: a kick or wake eventfd was read, or a cancellation. */
static void aio_uring_ctl(struct aio_ring *r, uint64_t ud, int res)
{
    uint64_t kind = ud & (AIO_CTL_KIND | AIO_CTL_GROUP);
    uint32_t owner = (uint32_t)(ud >> 16) & 0xffff;
    uint16_t gen = (uint16_t)ud;
    if (kind == AIO_CTL_GROUP) {
        r->group_armed = 0;
        if (res != -ECANCELED)
            r->group_woken = 1;
        return;
    }
    struct aio *a = owner < AIO_MAX_OWNERS ? r->owners[owner] : NULL;
    if (kind == AIO_CTL_KICK) {
        if (!a || gen != r->kick_gen[owner])
            return; /* the read of a kick eventfd since replaced, or of an owner gone */
        a->kick_armed = 0;
        if (res != -ECANCELED)
            a->kicked = 1; /* an error too: the ring is looked at, as after poll()'s POLLERR */
    } else if (kind == AIO_CTL_WAKE) {
        if (!a || gen != r->wake_gen[owner])
            return;
        a->wake_armed = 0;
        if (res != -ECANCELED)
            a->woken = 1;
    }
}

/* Move every posted completion out of the ring: I/O that finished goes to its
 * owner's completed list (cq), kicks and wakes become flags.  No system call. */
static void ring_drain(struct aio_ring *rg)
{
    struct io_uring_cqe *cqes[64];
    unsigned got;
    while ((got = io_uring_peek_batch_cqe(&rg->ring, cqes, 64))) {
        for (unsigned i = 0; i < got; i++) {
            uint64_t ud = cqes[i]->user_data;
            int res = cqes[i]->res;
            if (ud & AIO_CTL) {
                aio_uring_ctl(rg, ud, res);
                continue;
            }
            struct aio *a = rg->owners[(ud >> AIO_OWNER_SHIFT) % AIO_MAX_OWNERS];
            if (!a)
                continue; /* (never: an owner leaves with nothing in flight) */
            uint32_t slot = (uint32_t)((ud & ((1ULL << AIO_OWNER_SHIFT) - 1)) >> 1);
            /* a resubmission of a short transfer queues more: submitted later */
            if (aio_uring_cqe(a, slot, (int)(ud & 1), res)) {
                pthread_mutex_lock(&a->mu);
                aio_post_locked(a, slot);
                pthread_mutex_unlock(&a->mu);
            }
        }
        io_uring_cq_advance(&rg->ring, got);
    }
}

static void aio_uring_drain(struct aio *a)
{
    ring_drain(a->r);
}

/* Keep a READ armed on the kick (when there is one) and on the wake eventfd. */
static void aio_uring_arm(struct aio *a)
{
    struct aio_ring *r = a->r;
    if (!a->watched)
        return;
    struct io_uring_sqe *sqe;
    uint32_t k = 2 * a->owner;
    if (a->have_kick && !a->kick_armed) {
        sqe = aio_sqe(a);
        io_uring_prep_read(sqe, (int)k, &r->bufs[k], sizeof r->bufs[k], 0);
        sqe->flags |= IOSQE_FIXED_FILE;
        sqe->user_data = ctl_ud(AIO_CTL_KICK, a->owner, r->kick_gen[a->owner]);
        a->kick_armed = 1;
        r->queued++;
    }
    if (!a->wake_armed) {
        sqe = aio_sqe(a);
        io_uring_prep_read(sqe, (int)k + 1, &r->bufs[k + 1], sizeof r->bufs[k + 1], 0);
        sqe->flags |= IOSQE_FIXED_FILE;
        sqe->user_data = ctl_ud(AIO_CTL_WAKE, a->owner, r->wake_gen[a->owner]);
        a->wake_armed = 1;
        r->queued++;
    }
}

/* The ring's sparse file table (every owner's kick and wake, the group's wake). */
static int ring_files(struct aio_ring *r)
{
    if (r->files_ok)
        return 0;
    int fds[AIO_FIX_GROUP + 1];
    for (unsigned i = 0; i <= AIO_FIX_GROUP; i++)
        fds[i] = -1;
    int rc = io_uring_register_files(&r->ring, fds, AIO_FIX_GROUP + 1);
    if (rc < 0)
        return rc;
    r->files_ok = 1;
    if (r->group_fd >= 0) {
        rc = io_uring_register_files_update(&r->ring, AIO_FIX_GROUP, &r->group_fd, 1);
        if (rc < 0)
            return rc;
    }
    return 0;
}

/* Cancel the armed READ whose user_data is ud (its completion is ignored). */
static void ring_cancel(struct aio_ring *r, uint64_t ud)
{
    struct io_uring_sqe *sqe = ring_sqe(r);
    io_uring_prep_cancel64(sqe, ud, 0);
    sqe->user_data = AIO_CTL | AIO_CTL_CANCEL;
    r->queued++;
}

/* The eventfds to wait on (kick may be -1).  The caller guarantees the numbers are
 * the ones meant (held under the data plane's lock): registering takes the ring's
 * own reference to the files, so later closes of these numbers do not matter. */
static int aio_uring_watch(struct aio *a, int kick, int wake)
{
    struct aio_ring *r = a->r;
    int fds[2] = {kick, wake};
    int rc = ring_files(r);
    if (rc < 0)
        return rc;
    unsigned k = 2 * a->owner;
    if (!a->watched) {
        rc = io_uring_register_files_update(&r->ring, k, fds, 2);
        if (rc < 0)
            return rc;
        a->watched = 1;
    } else {
        rc = io_uring_register_files_update(&r->ring, k, &fds[0], 1);
        if (rc < 0)
            return rc;
        if (a->kick_armed) { /* the old kick's read: cancelled, its completion ignored */
            ring_cancel(r, ctl_ud(AIO_CTL_KICK, a->owner, r->kick_gen[a->owner]));
            a->kick_armed = 0;
        }
    }
    r->kick_gen[a->owner]++;
    a->have_kick = kick >= 0;
    return 0;
}

/* Whether an owner has one of the events its data plane waits for. */
static int aio_ready(struct aio *a, int want)
{
    return ((want & DP_EV_KICK) && a->kicked) || ((want & DP_EV_WAKE) && a->woken) ||
           ((want & DP_EV_DONE) && __atomic_load_n(&a->cq_n, __ATOMIC_RELAXED));
}

/* Wait until one of `want` (DP_EV_*) happened or timeout_ms passed (< 0: no
 * timeout), submitting whatever is queued in the same system call.  Returns the
 * events (kicks and wakes consumed), 0 on timeout, or -errno. */
static int aio_uring_wait(struct aio *a, int want, int timeout_ms)
{
    int slept = 0;
    for (;;) {
        aio_uring_drain(a);
        int ev = 0;
        if ((want & DP_EV_KICK) && a->kicked)
            ev |= DP_EV_KICK;
        if ((want & DP_EV_WAKE) && a->woken)
            ev |= DP_EV_WAKE;
        if ((want & DP_EV_DONE) && __atomic_load_n(&a->cq_n, __ATOMIC_RELAXED))
            ev |= DP_EV_DONE;
        if (ev) {
            if (ev & DP_EV_KICK)
                a->kicked = 0;
            if (ev & DP_EV_WAKE)
                a->woken = 0;
            return ev;
        }
        if (timeout_ms == DP_WAIT_PEEK) {
            a->want = want; /* the group's wait (ring_wait_any) looks for these */
            return 0;
        }
        if (slept && timeout_ms >= 0)
            return 0; /* timed out (or woken by something not wanted: the same to the caller) */
        aio_uring_arm(a);
        int rc;
        if (timeout_ms < 0) {
            rc = io_uring_submit_and_wait(&a->r->ring, 1);
        } else {
            struct io_uring_cqe *cqe;
            struct __kernel_timespec ts = {timeout_ms / 1000, (timeout_ms % 1000) * 1000000LL};
            rc = io_uring_submit_and_wait_timeout(&a->r->ring, &cqe, 1, &ts, NULL);
        }
        if (a->r->queued)
            a->submits++;
        a->r->queued = 0;
        if (rc < 0 && rc != -ETIME && rc != -EINTR && rc != -EAGAIN && rc != -EBUSY)
            return rc;
        slept = 1;
    }
}

/* A shared ring's one wait (dataplane.c's dp_group): until an owner has one of the
 * events it waits for (its last DP_WAIT_PEEK), the group's wake eventfd was read,
 * or timeout_ms passed (< 0: none).  Submits what is queued in the same system
 * call.  Returns 1, 0 on timeout, or -errno. */
static int ring_wait_any(struct aio_ring *r, int timeout_ms)
{
    int slept = 0;
    for (;;) {
        ring_drain(r);
        int ready = r->group_woken;
        r->group_woken = 0;
        for (uint32_t i = 0; i < AIO_MAX_OWNERS && !ready; i++)
            ready = r->owners[i] && aio_ready(r->owners[i], r->owners[i]->want);
        if (ready)
            return 1;
        if (slept && timeout_ms >= 0)
            return 0;
        for (uint32_t i = 0; i < AIO_MAX_OWNERS; i++)
            if (r->owners[i])
                aio_uring_arm(r->owners[i]);
        if (r->files_ok && r->group_fd >= 0 && !r->group_armed) {
            struct io_uring_sqe *sqe = ring_sqe(r);
            io_uring_prep_read(sqe, AIO_FIX_GROUP, &r->bufs[AIO_FIX_GROUP], 8, 0);
            sqe->flags |= IOSQE_FIXED_FILE;
            sqe->user_data = AIO_CTL | AIO_CTL_GROUP;
            r->group_armed = 1;
            r->queued++;
        }
        int rc;
        if (timeout_ms < 0) {
            rc = io_uring_submit_and_wait(&r->ring, 1);
        } else {
            struct io_uring_cqe *cqe;
            struct __kernel_timespec ts = {timeout_ms / 1000, (timeout_ms % 1000) * 1000000LL};
            rc = io_uring_submit_and_wait_timeout(&r->ring, &cqe, 1, &ts, NULL);
        }
        if (r->queued)
            r->submits++;
        r->queued = 0;
        if (rc < 0 && rc != -ETIME && rc != -EINTR && rc != -EAGAIN && rc != -EBUSY)
            return rc;
        slept = 1;
    }
}
#endif

int aio_uring_usable(void)
{
#ifdef HAVE_LIBURING
    struct io_uring ring;
    if (io_uring_queue_init(4, &ring, 0) < 0)
        return 0;
    io_uring_queue_exit(&ring);
    return 1;
#else
    return 0;
#endif
}

/* Tests: 0 makes new io_uring engines wait on efd with poll() as on kernels whose
 * eventfd READs do not wait (the fallback), 1 (default) waits in the ring. */
static int aio_ring_wait_allowed = 1;

void aio_set_ring_wait(int on)
{
    __atomic_store_n(&aio_ring_wait_allowed, on, __ATOMIC_RELAXED);
}

#ifdef HAVE_LIBURING
/* Whether a READ of an empty non-blocking eventfd waits on this kernel (instead of
 * failing with EAGAIN): what waiting in the ring needs, since the kick eventfds the
 * front-end sends are non-blocking. */
static int aio_uring_reads_wait(struct aio_ring *r)
{
    int efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (efd < 0)
        return 0;
    uint64_t buf = 0, one = 1;
    struct io_uring_sqe *sqe = io_uring_get_sqe(&r->ring);
    io_uring_prep_read(sqe, efd, &buf, sizeof buf, 0);
    sqe->user_data = AIO_CTL | AIO_CTL_CANCEL;
    io_uring_submit_and_get_events(&r->ring);
    struct io_uring_cqe *cqe = NULL;
    int waits = io_uring_peek_cqe(&r->ring, &cqe) != 0; /* nothing posted yet */
    if (cqe)
        io_uring_cqe_seen(&r->ring, cqe);
    ssize_t w = write(efd, &one, sizeof one); /* completes the read if it waits */
    (void)w;
    if (waits && io_uring_wait_cqe(&r->ring, &cqe) == 0) {
        waits = cqe->res == (int)sizeof buf;
        io_uring_cqe_seen(&r->ring, cqe);
    }
    close(efd);
    return waits;
}

/* A new ring for nslots slots (shared: room for every owner's), or NULL; efd, when
 * the ring cannot be waited in, is what its completions signal (-1: must wait in
 * it). */
static struct aio_ring *ring_create(uint32_t nslots, int shared, int efd, int group_fd)
{
    struct aio_ring *r = calloc(1, sizeof *r);
    if (!r)
        return NULL;
    r->group_fd = group_fd;
    unsigned entries = 1, want = shared ? 8 * nslots : 2 * nslots;
    while (entries < want && entries < 4096)
        entries <<= 1;
    /* cq_entries: every slot's completions fit (2 per AIO_WRITE_SYNC), and the
     * kick/wake reads and cancellations */
    static const unsigned flags[] = {
        IORING_SETUP_CQSIZE | IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN,
        IORING_SETUP_CQSIZE | IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_COOP_TASKRUN,
        IORING_SETUP_CQSIZE, /* kernel < 6.0 */
    };
    int rc = -EINVAL;
    for (unsigned i = 0; i < sizeof flags / sizeof *flags && rc == -EINVAL; i++) {
        struct io_uring_params p;
        memset(&p, 0, sizeof p);
        p.flags = flags[i];
        p.cq_entries = 4 * entries + 2 * AIO_MAX_OWNERS + 16;
        rc = io_uring_queue_init_params(entries, &r->ring, &p);
        r->defer_taskrun = rc == 0 && (flags[i] & IORING_SETUP_DEFER_TASKRUN);
        if (rc == 0)
            r->wait_in_ring = __atomic_load_n(&aio_ring_wait_allowed, __ATOMIC_RELAXED) &&
                              aio_uring_reads_wait(r);
        if (rc == 0 && r->defer_taskrun && !r->wait_in_ring) {
            /* polling efd instead: completions must be posted without our
             * GETEVENTS, which DEFER_TASKRUN would hold back */
            io_uring_queue_exit(&r->ring);
            rc = -EINVAL;
        }
    }
    if (rc == 0 && !r->wait_in_ring && (efd < 0 || io_uring_register_eventfd(&r->ring, efd))) {
        io_uring_queue_exit(&r->ring);
        rc = -EOPNOTSUPP;
    }
    if (rc != 0) {
        free(r);
        return NULL;
    }
    r->refs = 1;
    return r;
}

/* Leave the ring (the owner has nothing in flight): its armed READs are cancelled,
 * its files dropped; the last owner out closes the ring. */
static void ring_leave(struct aio *a)
{
    struct aio_ring *r = a->r;
    a->r = NULL;
    if (--r->refs == 0) {
        io_uring_queue_exit(&r->ring);
        if (a->home)
            *a->home = NULL;
        free(r);
        return;
    }
    uint32_t o = a->owner;
    if (a->kick_armed)
        ring_cancel(r, ctl_ud(AIO_CTL_KICK, o, r->kick_gen[o]));
    if (a->wake_armed)
        ring_cancel(r, ctl_ud(AIO_CTL_WAKE, o, r->wake_gen[o]));
    r->kick_gen[o]++;
    r->wake_gen[o]++;
    r->owners[o] = NULL;
    if (a->watched) {
        int none[2] = {-1, -1};
        io_uring_register_files_update(&r->ring, 2 * o, none, 2);
    }
    io_uring_submit(&r->ring); /* the cancellations */
    r->submits++;
    r->queued = 0;
}
#endif

/* Set up an engine for nslots slots.  With shared (--queue-threads), the io_uring is
 * the one *shared points to (created, and stored there, by the first owner; its
 * group_fd is the group's wake eventfd), which must be waited in.  Returns the
 * engine running (io_uring falls back to threads when it cannot be set up, or
 * -EOPNOTSUPP when shared), or -errno. */
static int aio_init(struct aio *a, int engine, uint32_t nslots, int threads,
                    struct aio_ring **shared, int group_fd)
{
    memset(a, 0, sizeof *a);
    a->nslots = nslots;
    a->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    a->reqs = calloc(nslots, sizeof *a->reqs);
    a->cq = calloc(nslots, sizeof *a->cq);
    a->jq = calloc(nslots, sizeof *a->jq);
    if (a->efd < 0 || !a->reqs || !a->cq || !a->jq)
        return -ENOMEM;
    pthread_mutex_init(&a->mu, NULL);
    pthread_cond_init(&a->cv, NULL);
    a->maxthreads = threads > 0 && threads <= AIO_MAX_THREADS ? threads : 16;
    a->engine = BLK_AIO_THREADS;
#ifdef HAVE_LIBURING
    if (engine == BLK_AIO_URING) {
        struct aio_ring *r = shared ? *shared : NULL;
        if (r) {
            uint32_t o = 0;
            while (o < AIO_MAX_OWNERS && r->owners[o])
                o++;
            if (o == AIO_MAX_OWNERS)
                return -EBUSY;
            r->refs++;
            a->owner = o;
        } else {
            r = ring_create(nslots, shared != NULL, shared ? -1 : a->efd, group_fd);
            if (!r)
                return shared ? -EOPNOTSUPP : a->engine;
            if (shared)
                *shared = r;
        }
        r->owners[a->owner] = a;
        a->r = r;
        a->home = shared;
        a->ring_ok = 1;
        a->engine = BLK_AIO_URING;
        a->wait_in_ring = r->wait_in_ring;
    }
#else
    (void)engine;
    if (shared)
        return -EOPNOTSUPP;
#endif
    (void)group_fd;
    return a->engine;
}

static void aio_destroy(struct aio *a)
{
    pthread_mutex_lock(&a->mu);
    a->stop = 1;
    pthread_cond_broadcast(&a->cv);
    pthread_mutex_unlock(&a->mu);
    for (int i = 0; i < a->nthreads; i++)
        pthread_join(a->threads[i], NULL);
#ifdef HAVE_LIBURING
    if (a->ring_ok)
        ring_leave(a);
    a->ring_ok = 0;
#endif
    if (a->efd >= 0)
        close(a->efd);
    a->efd = -1;
    pthread_mutex_destroy(&a->mu);
    pthread_cond_destroy(&a->cv);
    free(a->reqs);
    free(a->cq);
    free(a->jq);
    a->reqs = NULL;
    a->cq = a->jq = NULL;
}

/* Start an operation in `slot`.  The iovec array stays the caller's until the slot
 * is reaped (it is advanced in place on short transfers). */
static void aio_start(struct aio *a, uint32_t slot, int op, int fd, struct iovec *iov,
                      int iovcnt, uint64_t off, uint64_t len)
{
    struct aio_req *r = &a->reqs[slot];
    r->op = op;
    r->fd = fd;
    r->iov = iov;
    r->iovcnt = iovcnt;
    r->off = off;
    r->left = op == AIO_FSYNC ? 0 : len;
    r->err = 0;
    r->sync_failed = 0;
    r->sync_fault = 0;
#ifdef HAVE_LIBURING
    if (a->engine == BLK_AIO_URING) {
        int f = dp_fault(aio_fault_name(op));
        if (f) {
            r->err = f;
            r->sync_failed = op == AIO_FSYNC;
            aio_post(a, slot);
            return;
        }
        if (op == AIO_WRITE_SYNC)
            r->sync_fault = (uint8_t)dp_fault("fdatasync");
        aio_uring_queue(a, slot);
        return;
    }
#endif
    pthread_mutex_lock(&a->mu);
    a->jq[(a->jq_head + a->jq_n) % a->nslots] = slot;
    a->jq_n++;
    if ((uint32_t)a->idle < a->jq_n && a->nthreads < a->maxthreads &&
        pthread_create(&a->threads[a->nthreads], NULL, aio_worker, a) == 0)
        a->nthreads++;
    pthread_cond_signal(&a->cv);
    pthread_mutex_unlock(&a->mu);
}

/* Finish a slot at once with err (e.g. the sticky writeback error). */
static void aio_fail(struct aio *a, uint32_t slot, int err, int sync_failed)
{
    a->reqs[slot].err = err;
    a->reqs[slot].sync_failed = (uint8_t)sync_failed;
    aio_post(a, slot);
}

/* Hand what aio_start queued to the kernel (one system call for the batch). */
static void aio_submit(struct aio *a)
{
#ifdef HAVE_LIBURING
    /* Waiting in the ring: the data plane's next wait submits them, in the same
     * system call (it waits right after the batch; no I/O is left unsubmitted). */
    if (a->engine == BLK_AIO_URING && a->r->queued && !a->wait_in_ring) {
        if (a->r->defer_taskrun)
            io_uring_submit_and_get_events(&a->r->ring);
        else
            io_uring_submit(&a->r->ring);
        a->submits++;
        a->r->queued = 0;
    }
#else
    (void)a;
#endif
}

/* Up to max finished requests, without blocking.  With worker threads (or a ring
 * that signals efd) the eventfd is cleared first, so a completion arriving
 * meanwhile signals it again. */
static uint32_t aio_reap(struct aio *a, struct aio_done *out, uint32_t max)
{
    int uring = a->engine == BLK_AIO_URING, signal_efd = !a->wait_in_ring;
    if (signal_efd) {
        uint64_t v;
        ssize_t rr = read(a->efd, &v, sizeof v);
        (void)rr;
    }
#ifdef HAVE_LIBURING
    if (uring)
        aio_uring_drain(a); /* posted ring completions join the completed list */
#endif
    uint32_t n = 0;
    if (__atomic_load_n(&a->cq_n, __ATOMIC_RELAXED)) {
        pthread_mutex_lock(&a->mu);
        while (a->cq_n && n < max) {
            uint32_t slot = a->cq[a->cq_head];
            a->cq_head = (a->cq_head + 1) % a->nslots;
            a->cq_n--;
            out[n].slot = slot;
            out[n].err = a->reqs[slot].err;
            out[n].sync_failed = a->reqs[slot].sync_failed;
            n++;
        }
        if (a->cq_n && signal_efd)
            aio_signal(a); /* more next time */
        pthread_mutex_unlock(&a->mu);
    }
    if (uring)
        aio_submit(a); /* short transfers continued (waiting in the ring: at the wait) */
    return n;
}

/* The device's wait (struct dp.wait / watch), when the engine waits in its ring;
 * 0 when it does not (the data plane then polls efd). */
static int aio_waits_in_ring(struct aio *a)
{
    return a->wait_in_ring;
}
