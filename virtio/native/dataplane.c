/* Generic native data plane: one thread per eventfd-notified virtqueue.
 *
 * The device-independent service loop of §2.7.10 / §2.8.21 (disable driver
 * notifications, pop a batch, serve, publish the used entries with one index
 * update, notify as EVENT_IDX / flags allow, re-enable and re-check before
 * sleeping), the eventfd wait, the hand-over ("deferral") of chains the device's
 * fast path does not serve to the Python device, vhost-user inflight marks of split
 * rings (packed rings are marked by the queue core itself, inflight.c), and the
 * lost-interrupt rescue.  A device supplies only `serve` (blk_dataplane.c).
 *
 * Threading: the thread holds no Python state.  Every used-ring update and pop
 * goes through the vq lock (vq_set_locking), so Python may complete deferred
 * chains concurrently; `mu` guards the deferred list and the eventfds. */
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "dataplane.h"

#define DP_MU(dp) ((pthread_mutex_t *)(void *)(dp)->mu_storage)
_Static_assert(sizeof(((struct dp *)0)->mu_storage) >= sizeof(pthread_mutex_t), "mutex storage");

/* ---- deferral to Python --------------------------------------------------------- */
static void dp_defer(struct dp *dp, const struct vq_chain *c, const struct vq_seg *segs, int err)
{
    pthread_mutex_lock(DP_MU(dp));
    /* Room for a whole batch is checked before popping (dp_room); failed asynchronous
     * chains may carry more segments: wait for Python to take some (rare). */
    while (dp->nd >= DP_DEFER_MAX || dp->nds + c->nsegs > DP_DEFER_SEGS) {
        pthread_mutex_unlock(DP_MU(dp));
        if (__atomic_load_n(&dp->stop, __ATOMIC_ACQUIRE)) {
            dp->dropped++; /* stopping: Python takes no more (inflight tracking has it) */
            return;
        }
        struct pollfd w = {dp->wake_fd, POLLIN, 0};
        if (poll(&w, 1, 100) > 0) {
            uint64_t v;
            ssize_t rr = read(dp->wake_fd, &v, sizeof v);
            (void)rr;
        }
        pthread_mutex_lock(DP_MU(dp));
    }
    dp->derr[dp->nd] = err;
    struct vq_chain *d = &dp->dchains[dp->nd++];
    *d = *c;
    d->seg_start = dp->nds;
    memcpy(&dp->dsegs[dp->nds], segs, c->nsegs * sizeof *segs);
    dp->nds += c->nsegs;
    pthread_mutex_unlock(DP_MU(dp));
    uint64_t one = 1;
    ssize_t rc = write(dp->defer_fd, &one, sizeof one);
    (void)rc;
    dp->deferred++;
    dp->io_errors += err != 0;
}

static int dp_room(struct dp *dp)
{
    pthread_mutex_lock(DP_MU(dp));
    int ok = dp->nd + DP_BATCH <= DP_DEFER_MAX && dp->nds + DP_MAX_SEGS <= DP_DEFER_SEGS;
    pthread_mutex_unlock(DP_MU(dp));
    return ok;
}

/* Move up to max deferred chains (their segments, and the errno of each one's
 * failed I/O) out; returns how many. */
uint32_t dp_take(struct dp *dp, struct vq_chain *chains, uint32_t max, struct vq_seg *segs,
                 uint32_t max_segs, int32_t *errs)
{
    pthread_mutex_lock(DP_MU(dp));
    uint32_t n = 0, s = 0;
    while (n < dp->nd && n < max && s + dp->dchains[n].nsegs <= max_segs) {
        errs[n] = dp->derr[n];
        chains[n] = dp->dchains[n];
        memcpy(&segs[s], &dp->dsegs[chains[n].seg_start], chains[n].nsegs * sizeof *segs);
        chains[n].seg_start = s;
        s += chains[n].nsegs;
        n++;
    }
    /* Shift the rest down (rare: more than `max` deferred at once). */
    if (n < dp->nd) {
        uint32_t first_seg = dp->dchains[n].seg_start;
        for (uint32_t i = n; i < dp->nd; i++) {
            dp->derr[i - n] = dp->derr[i];
            dp->dchains[i - n] = dp->dchains[i];
            dp->dchains[i - n].seg_start -= first_seg;
        }
        memmove(dp->dsegs, &dp->dsegs[first_seg], (dp->nds - first_seg) * sizeof *segs);
        dp->nds -= first_seg;
    } else {
        dp->nds = 0;
    }
    dp->nd -= n;
    pthread_mutex_unlock(DP_MU(dp));
    return n;
}

/* ---- notifications -------------------------------------------------------------- */
static void dp_call(struct dp *dp, uint64_t *counter)
{
    pthread_mutex_lock(DP_MU(dp)); /* the fd stays open while we write */
    if (dp->call_fd >= 0) {
        uint64_t one = 1;
        ssize_t w = write(dp->call_fd, &one, sizeof one);
        (void)w;
        (*counter)++;
    }
    pthread_mutex_unlock(DP_MU(dp));
}

/* Idle for a while with used entries the driver has not acknowledged (split ring,
 * EVENT_IDX: the driver's used_event lags our used idx) means a used buffer
 * notification went missing -- e.g. around a back-end restart the front-end was
 * not listening yet.  Notify again: spurious notifications are allowed (§2.7.7.1). */
static void dp_rescue(struct dp *dp)
{
    struct vq *q = dp->q;
    if (q->packed || !q->event_idx)
        return;
    uint16_t used_event = vm_load_acquire_u16(q->driver + 4 + 2 * (uint32_t)q->size);
    if (used_event == q->used_idx)
        return;
    dp_call(dp, &dp->rescues);
}

#define DP_IDLE_MS 500

/* A kick from the driver (§2.3): counted, and told to the ring (vq_kicked). */
static void dp_kicked(struct dp *dp)
{
    dp->kicks++;
    vq_kicked(dp->q);
}

/* Wait for a kick, a completion (poll_fd) or a wake; with kick < 0 and !completions,
 * only for a wake.  Returns 1 to go on, 2 when the wait timed out with nothing to do
 * (the ring must not be touched then), 0 to stop, <0 on error. */
static int dp_wait_device(struct dp *dp, int kick, int completions)
{
    if (kick >= 0) {
        pthread_mutex_lock(DP_MU(dp)); /* dp_set_fds cannot swap (and the caller close) */
        kick = dp->kick_fd;
        if (kick != dp->watched_kick) {
            int rc = dp->watch(dp->dev, kick, dp->wake_fd);
            if (rc < 0) {
                pthread_mutex_unlock(DP_MU(dp));
                return rc;
            }
            dp->watched_kick = kick;
        }
        pthread_mutex_unlock(DP_MU(dp));
    }
    int want = DP_EV_WAKE | (kick >= 0 ? DP_EV_KICK : 0) | (completions ? DP_EV_DONE : 0);
    int ev = dp->wait(dp->dev, want, kick >= 0 ? DP_IDLE_MS : -1);
    if (ev == 0) {
        dp->idles++;
        if (!dp->pending)
            dp_rescue(dp);
        return 2;
    }
    if (ev < 0)
        return ev == -EINTR ? 1 : ev;
    if (__atomic_load_n(&dp->stop, __ATOMIC_ACQUIRE))
        return 0;
    if (ev & DP_EV_KICK)
        dp_kicked(dp);
    return 1;
}

static int dp_wait(struct dp *dp, int kick, int completions)
{
    if (dp->wait)
        return dp_wait_device(dp, kick, completions);
    struct pollfd p[3] = {{dp->wake_fd, POLLIN, 0}, {-1, POLLIN, 0}, {-1, POLLIN, 0}};
    if (kick >= 0)
        p[1].fd = kick;
    if (completions && dp->poll_fd >= 0)
        p[2].fd = dp->poll_fd;
    if (dp->before_sleep)
        dp->before_sleep(dp->dev);
    int r = poll(p, 3, kick >= 0 ? DP_IDLE_MS : -1);
    if (r == 0) {
        dp->idles++;
        if (!dp->pending)
            dp_rescue(dp);
        return 2;
    }
    if (r < 0)
        return errno == EINTR ? 1 : -errno;
    uint64_t v;
    if (p[0].revents & POLLIN) {
        ssize_t rr = read(dp->wake_fd, &v, sizeof v); /* stop, new fds, or room */
        (void)rr;
    }
    /* poll_fd is the device's (an eventfd it signals): the device's reap clears it. */
    if (__atomic_load_n(&dp->stop, __ATOMIC_ACQUIRE))
        return 0;
    /* The kick fd may have been replaced (and the old number reused) while we
     * slept: only read the fd that is still the ring's kick, under the lock. */
    if (kick >= 0 && (p[1].revents & POLLIN)) {
        pthread_mutex_lock(DP_MU(dp)); /* dp_set_fds cannot swap it meanwhile */
        if (kick == dp->kick_fd) {
            ssize_t rr = read(kick, &v, sizeof v);
            (void)rr;
            dp_kicked(dp);
        }
        pthread_mutex_unlock(DP_MU(dp));
    }
    return 1;
}

/* Used entries gathered for one publication. */
struct dp_out {
    uint16_t ids[2 * DP_BATCH], ndescs[2 * DP_BATCH];
    uint32_t lens[2 * DP_BATCH];
    uint32_t n;
};

/* Publish the gathered used entries with one used index update (§2.7.8.2 /
 * §2.8.21.3), mark them done in the inflight region, notify as EVENT_IDX / flags
 * allow (§2.7.10 / §2.8.21.3.1). */
static void dp_publish(struct dp *dp, struct dp_out *o)
{
    if (!o->n)
        return;
    struct vq *q = dp->q;
    uint16_t used_idx;
    int notify = vq_publish_used(q, o->ids, o->lens, o->ndescs, o->n, &used_idx);
    if (q->stats)
        q->stats->native += o->n; /* under no lock: this thread is its only writer */
    if (dp->inflight)
        vu_inflight_used(dp->inflight, dp->inflight_num, o->ids, o->n, used_idx);
    dp->publishes++;
    if (notify)
        dp_call(dp, &dp->calls);
    o->n = 0;
}

static void dp_out_add(struct dp_out *o, uint16_t head, uint32_t len, uint16_t ndesc)
{
    o->ids[o->n] = head;
    o->lens[o->n] = len;
    o->ndescs[o->n] = ndesc;
    o->n++;
}

/* Collect up to DP_BATCH asynchronous completions into o (deferring the failed
 * ones, which needs room: checked by the caller).  Returns how many. */
static uint32_t dp_reap(struct dp *dp, struct dp_out *o)
{
    if (!dp->reap || !dp->pending)
        return 0;
    struct dp_done done[DP_BATCH];
    uint32_t max = 2 * DP_BATCH - o->n;
    uint32_t n = dp->reap(dp->dev, done, max < DP_BATCH ? max : DP_BATCH);
    for (uint32_t i = 0; i < n; i++) {
        struct dp_pend *p = &dp->pend[done[i].head];
        if (done[i].len)
            dp_out_add(o, p->chain.head, done[i].len, p->chain.ndesc);
        else
            dp_defer(dp, &p->chain, p->segs, done[i].err);
        p->busy = 0;
    }
    dp->pending -= n;
    if (n)
        dp->reaps++;
    return n;
}

/* Copy a chain into its pending slot (stable while the device works on it).
 * Returns the slot, or NULL when the head is already in progress (a driver that
 * made a buffer available twice) or memory is short: then it is served from Python. */
static struct dp_pend *dp_pend_slot(struct dp *dp, const struct vq_chain *c,
                                    const struct vq_seg *segs)
{
    if (c->head >= dp->q->size)
        return NULL;
    struct dp_pend *p = &dp->pend[c->head];
    if (p->busy)
        return NULL;
    if (p->cap < c->nsegs) {
        uint32_t cap = c->nsegs < 8 ? 8 : c->nsegs;
        struct vq_seg *n = realloc(p->segs, cap * sizeof *n);
        if (!n)
            return NULL;
        p->segs = n;
        p->cap = cap;
    }
    p->chain = *c;
    p->chain.seg_start = 0;
    memcpy(p->segs, segs, c->nsegs * sizeof *segs);
    return p;
}

/* Serve one popped chain: complete it now (o), defer it, or leave it in progress. */
static void dp_serve_one(struct dp *dp, const struct vq_chain *c, const struct vq_seg *segs,
                         struct dp_out *o)
{
    int err = 0;
    struct dp_pend *p = dp->reap ? dp_pend_slot(dp, c, segs) : NULL;
    if (dp->reap && !p) {
        dp_defer(dp, c, segs, 0);
        return;
    }
    uint32_t used = p ? dp->serve(dp->dev, &p->chain, p->segs, &err)
                      : dp->serve(dp->dev, c, segs, &err);
    if (used == DP_ASYNC) {
        p->busy = 1;
        dp->pending++;
        dp->async_started++;
        if (dp->pending > dp->max_pending)
            dp->max_pending = dp->pending;
        return;
    }
    if (!used) {
        dp_defer(dp, c, segs, err);
        return;
    }
    dp_out_add(o, c->head, used == DP_USED_ZERO ? 0 : used, c->ndesc);
}

static uint64_t dp_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Poll the ring (notifications still off) for up to spin_ns: 1 when chains came. */
static int dp_spin(struct dp *dp)
{
    uint64_t end = dp_now_ns() + dp->spin_ns;
    dp->spins++;
    do {
        if (vq_avail_count(dp->q)) {
            dp->spin_hits++;
            return 1;
        }
        if (__atomic_load_n(&dp->stop, __ATOMIC_ACQUIRE))
            return 0;
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#endif
    } while (dp_now_ns() < end);
    return 0;
}

/* ---- the loop ------------------------------------------------------------------- */
/* The loop's state between waits (a group serves several loops by turns). */
struct dp_loop {
    struct vq_chain *chains;
    struct vq_seg *segs;
    struct dp_out *o;
    uint16_t heads[DP_BATCH];
    int started, draining, rc;
};

static int dp_begin(struct dp *dp)
{
    struct vq *q = dp->q;
    struct dp_loop *l = calloc(1, sizeof *l);
    dp->loop = l;
    dp->pending = 0;
    dp->watched_kick = -2;
    if (!l)
        return -ENOMEM;
    l->chains = calloc(DP_BATCH, sizeof *l->chains);
    l->segs = calloc(DP_MAX_SEGS, sizeof *l->segs);
    l->o = calloc(1, sizeof *l->o);
    dp->pend = dp->reap ? calloc(q->size ? q->size : 1, sizeof *dp->pend) : NULL;
    if (!l->chains || !l->segs || !l->o || (dp->reap && !dp->pend))
        return -ENOMEM;
    if (dp->start) {
        int rc = dp->start(dp->dev);
        if (rc < 0)
            return rc;
    }
    l->started = 1;
    return 0;
}

/* Serve the queue until it must wait.  Returns the events to wait for (DP_EV_*;
 * with DP_EV_KICK: sleeping for the driver, with the idle timeout), or 0 when the
 * loop ended (l->rc; dp_end then). */
static int dp_step(struct dp *dp)
{
    struct vq *q = dp->q;
    struct dp_loop *l = dp->loop;
    struct dp_out *o = l->o;
    if (l->draining)
        goto drain;
    for (;;) {
        if (__atomic_load_n(&dp->stop, __ATOMIC_ACQUIRE))
            goto stop;
        if (!dp_room(dp)) /* Python has not taken the deferred chains yet */
            return DP_EV_WAKE;
        vq_disable_notification(q);
        int more = 0;
        for (;;) {
            if (!dp_room(dp)) {
                more = 1;
                break;
            }
            int n = vq_pop_batch(q, l->chains, DP_BATCH, l->segs, DP_MAX_SEGS);
            if (n < 0) {
                l->rc = n; /* driver error (queue broken) or a chain beyond our segments */
                goto stop;
            }
            if (n == 0)
                break;
            dp->batches++;
            if (dp->inflight) {
                for (int i = 0; i < n; i++)
                    l->heads[i] = l->chains[i].head;
                vu_inflight_pop(dp->inflight, dp->inflight_num, l->heads, (uint32_t)n,
                                &dp->inflight_counter);
            }
            if (dp->batch_begin)
                dp->batch_begin(dp->dev, l->chains, (uint32_t)n, l->segs);
            for (int i = 0; i < n; i++)
                dp_serve_one(dp, &l->chains[i], l->segs + l->chains[i].seg_start, o);
            dp->requests += (uint64_t)n;
            if (dp->submit && dp->pending)
                dp->submit(dp->dev); /* the whole batch goes to the kernel together */
            if (dp->batch_end)
                dp->batch_end(dp->dev);
            if (dp_room(dp))
                dp_reap(dp, o); /* whatever finished meanwhile: one publication */
            dp_publish(dp, o);
            if (__atomic_load_n(&dp->stop, __ATOMIC_ACQUIRE))
                goto stop;
        }
        if (more)
            continue;
        /* Completions first: they free guest buffers the driver waits for. */
        if (dp->pending && dp_reap(dp, o)) {
            if (o->n <= DP_BATCH && dp_room(dp))
                dp_reap(dp, o);
            dp_publish(dp, o);
            continue;
        }
        if (dp->spin_ns && !dp->pending && dp_spin(dp))
            continue;
        if (vq_enable_notification(q))
            continue;
        /* Sleep until the driver kicks (or a completion / wake comes).  An idle
         * timeout is no reason to look at the ring: without a kick the ring's memory
         * may no longer be a ring at all -- firmware (SeaBIOS) drives the device and
         * hands over to the OS without a reset, and the OS reuses that memory until
         * its driver resets the device.  Reading its "avail idx" there, or writing
         * flags and used entries, would corrupt the guest. */
        return DP_EV_KICK | DP_EV_WAKE | DP_EV_DONE;
    }
stop:
    l->draining = 1;
drain:
    /* Nothing in progress may outlive the loop: guest memory may go away after it. */
    while (dp->pending && l->rc != -ENOMEM) {
        if (dp_room(dp) && dp_reap(dp, o)) {
            dp_publish(dp, o);
            continue;
        }
        return DP_EV_DONE | DP_EV_WAKE;
    }
    return 0;
}

static void dp_end(struct dp *dp)
{
    struct dp_loop *l = dp->loop;
    struct vq *q = dp->q;
    if (l && l->o)
        dp_publish(dp, l->o);
    if (l && l->started && dp->finish)
        dp->finish(dp->dev);
    if (dp->pend) {
        for (uint32_t i = 0; i < q->size; i++)
            free(dp->pend[i].segs);
        free(dp->pend);
        dp->pend = NULL;
    }
    if (l) {
        free(l->o);
        free(l->chains);
        free(l->segs);
        free(l);
    }
    dp->loop = NULL;
}

/* The wait of a loop while it drains (stopping with requests in progress). */
static void dp_wait_drain(struct dp *dp)
{
    if (dp->wait) {
        int ev = dp->wait(dp->dev, DP_EV_DONE | DP_EV_WAKE, 100);
        if (ev < 0 && ev != -EINTR)
            poll(NULL, 0, 100); /* not seen with a working ring; never spin */
        return;
    }
    struct pollfd p[2] = {{dp->poll_fd, POLLIN, 0}, {dp->wake_fd, POLLIN, 0}};
    if (poll(p, 2, 100) > 0 && (p[1].revents & POLLIN)) {
        uint64_t v;
        ssize_t rr = read(dp->wake_fd, &v, sizeof v);
        (void)rr;
    }
}

/* Serve one queue on the calling thread until it stops. */
int dp_run(struct dp *dp)
{
    int rc = dp_begin(dp);
    if (rc < 0) {
        dp_end(dp);
        return rc;
    }
    struct dp_loop *l = dp->loop;
    int want;
    while ((want = dp_step(dp))) {
        if (l->draining) {
            dp_wait_drain(dp);
            continue;
        }
        int w;
        if (want & DP_EV_KICK) {
            do
                w = dp_wait(dp, __atomic_load_n(&dp->kick_fd, __ATOMIC_ACQUIRE), 1);
            while (w == 2);
        } else {
            w = dp_wait(dp, -1, 0);
        }
        if (w < 0) {
            l->rc = w;
            l->draining = 1;
        }
    }
    rc = l->rc;
    dp_end(dp);
    return rc;
}

/* The calling thread's name (`top -H`, `perf report --sort comm`, /proc/PID/task):
 * up to 15 bytes of `name`. */
void dp_name_thread(const char *name)
{
    char buf[16];
    snprintf(buf, sizeof buf, "%s", name);
    pthread_setname_np(pthread_self(), buf);
}

/* dp_run on a borrowed thread (a worker pool's), named `name` while it serves. */
int dp_run_named(struct dp *dp, const char *name)
{
    char old[16] = "";
    int named = pthread_getname_np(pthread_self(), old, sizeof old) == 0;
    dp_name_thread(name);
    int rc = dp_run(dp);
    if (named)
        pthread_setname_np(pthread_self(), old);
    return rc;
}

/* ---- several queues on one thread ------------------------------------------------- */
#define DP_GROUP_MU(g) ((pthread_mutex_t *)(void *)(g)->mu_storage)
_Static_assert(sizeof(((struct dp_group *)0)->mu_storage) >= sizeof(pthread_mutex_t), "mutex");

int dp_group_init(struct dp_group *g, int wake_fd)
{
    g->wake_fd = wake_fd;
    return pthread_mutex_init(DP_GROUP_MU(g), NULL) ? -1 : 0;
}

/* Add a member (its fields set as for dp_run; done_fd: written when its loop
 * ended, dp->result then holds what dp_run would have returned).  Returns 1 when
 * no thread runs the group: the caller starts one (dp_group_run), 0 when the
 * running thread takes it, -EBUSY when the group is full. */
int dp_group_join(struct dp_group *g, struct dp *dp)
{
    pthread_mutex_lock(DP_GROUP_MU(g));
    if (g->n == DP_GROUP_MAX) {
        pthread_mutex_unlock(DP_GROUP_MU(g));
        return -EBUSY;
    }
    dp->group = g;
    dp->loop = NULL;
    g->members[g->n++] = dp;
    int start = !g->running;
    g->running = 1;
    pthread_mutex_unlock(DP_GROUP_MU(g));
    uint64_t one = 1;
    ssize_t w = write(g->wake_fd, &one, sizeof one);
    (void)w;
    return start;
}

/* A member's loop ended: out of the group, and its owner told. */
static void dp_group_leave(struct dp_group *g, struct dp *dp, int rc)
{
    dp_end(dp);
    dp->result = rc;
    pthread_mutex_lock(DP_GROUP_MU(g));
    for (uint32_t i = 0; i < g->n; i++)
        if (g->members[i] == dp) {
            g->members[i] = g->members[--g->n];
            break;
        }
    pthread_mutex_unlock(DP_GROUP_MU(g));
    uint64_t one = 1;
    ssize_t w = write(dp->done_fd, &one, sizeof one);
    (void)w;
}

/* Run a member as far as it goes without waiting: begin it if new, then step while
 * its device reports events it waits for.  Returns 0 when it left the group. */
static int dp_group_serve(struct dp_group *g, struct dp *dp, uint64_t now_ms)
{
    struct dp_loop *l = dp->loop;
    int ev = 0;
    if (!l) {
        int rc = dp_begin(dp);
        if (rc == 0 && (!dp->wait || !dp->watch))
            rc = -EOPNOTSUPP; /* a member must wait in the group's mechanism */
        if (rc < 0) {
            dp_group_leave(g, dp, rc);
            return 0;
        }
        l = dp->loop;
        dp->want = 0; /* runs now */
    } else {
        ev = dp->wait(dp->dev, dp->want, DP_WAIT_PEEK);
        if (ev == 0 && (dp->want & DP_EV_KICK) && now_ms - dp->idle_since_ms >= DP_IDLE_MS) {
            dp->idles++; /* as dp_wait's timeout: a lost notification is re-sent */
            dp->idle_since_ms = now_ms;
            if (!dp->pending)
                dp_rescue(dp);
        }
        if (ev == 0)
            return 1;
    }
    for (;;) {
        if (ev & DP_EV_KICK)
            dp_kicked(dp);
        int want = dp_step(dp);
        if (!want) {
            dp_group_leave(g, dp, l->rc);
            return 0;
        }
        if (want & DP_EV_KICK) {
            pthread_mutex_lock(DP_MU(dp)); /* dp_set_fds cannot swap (and the caller close) */
            int kick = dp->kick_fd;
            int rc = kick == dp->watched_kick ? 0 : dp->watch(dp->dev, kick, dp->wake_fd);
            if (rc == 0)
                dp->watched_kick = kick;
            pthread_mutex_unlock(DP_MU(dp));
            if (rc < 0) {
                l->rc = rc;
                l->draining = 1;
                continue;
            }
            if (!(dp->want & DP_EV_KICK))
                dp->idle_since_ms = now_ms;
        } else if (dp->watched_kick == -2) {
            int rc = dp->watch(dp->dev, -1, dp->wake_fd); /* the wake, at least */
            if (rc < 0) {
                dp_group_leave(g, dp, rc);
                return 0;
            }
            dp->watched_kick = -1;
        }
        dp->want = want;
        ev = dp->wait(dp->dev, want, DP_WAIT_PEEK);
        if (!ev)
            return 1;
    }
}

/* Serve the group's members until none is left. */
int dp_group_run(struct dp_group *g)
{
    struct dp *batch[DP_GROUP_MAX];
    for (;;) {
        pthread_mutex_lock(DP_GROUP_MU(g));
        uint32_t n = g->n;
        if (!n) {
            g->running = 0;
            pthread_mutex_unlock(DP_GROUP_MU(g));
            return 0;
        }
        memcpy(batch, g->members, n * sizeof *batch);
        pthread_mutex_unlock(DP_GROUP_MU(g));
        uint64_t now_ms = dp_now_ns() / 1000000u;
        for (uint32_t i = 0; i < n; i++)
            dp_group_serve(g, batch[i], now_ms);
        pthread_mutex_lock(DP_GROUP_MU(g));
        int joined = g->n > 0 && g->members[g->n - 1]->loop == NULL;
        int empty = g->n == 0;
        pthread_mutex_unlock(DP_GROUP_MU(g));
        if (joined || empty)
            continue;
        g->waits++;
        if (g->wait && g->shared) {
            if (g->wait(g->shared, DP_IDLE_MS) > 0)
                g->wakeups++;
        } else {
            struct pollfd p = {g->wake_fd, POLLIN, 0};
            if (poll(&p, 1, DP_IDLE_MS) > 0) {
                uint64_t v;
                ssize_t rr = read(g->wake_fd, &v, sizeof v);
                (void)rr;
            }
        }
    }
}

int dp_init(struct dp *dp)
{
    return pthread_mutex_init(DP_MU(dp), NULL) ? -1 : 0;
}

void dp_destroy(struct dp *dp)
{
    pthread_mutex_destroy(DP_MU(dp));
}

/* Replace the ring's eventfds.  When this returns the thread no longer reads or
 * writes the old ones, so the caller may close them (it may still poll() an old
 * kick number until woken: harmless). */
void dp_set_fds(struct dp *dp, int kick, int call)
{
    pthread_mutex_lock(DP_MU(dp));
    dp->kick_fd = kick;
    dp->call_fd = call;
    pthread_mutex_unlock(DP_MU(dp));
}

/* ---- a scripted asynchronous device, for testing the core in-process ------------ */
/* Every chain is taken asynchronously; the test completes chains in the order it
 * chooses (dp_script_complete, from any thread) and the core reaps them. */
#define DP_SCRIPT_MU(s) ((pthread_mutex_t *)(void *)(s)->mu_storage)
_Static_assert(sizeof(((struct dp_script *)0)->mu_storage) >= sizeof(pthread_mutex_t), "mutex");

static uint32_t dp_script_serve(void *dev, const struct vq_chain *c, const struct vq_seg *segs,
                                int *err)
{
    struct dp_script *s = dev;
    pthread_mutex_lock(DP_SCRIPT_MU(s));
    if (s->nstarted < DP_SCRIPT_MAX)
        s->started[s->nstarted++] = c->head;
    pthread_mutex_unlock(DP_SCRIPT_MU(s));
    return DP_ASYNC;
}

static void dp_script_submit(void *dev)
{
    ((struct dp_script *)dev)->submits++;
}

static uint32_t dp_script_reap(void *dev, struct dp_done *out, uint32_t max)
{
    struct dp_script *s = dev;
    uint64_t v;
    ssize_t rr = read(s->efd, &v, sizeof v);
    (void)rr;
    pthread_mutex_lock(DP_SCRIPT_MU(s));
    uint32_t n = 0;
    while (n < max && n < s->ndone) {
        out[n] = s->done[n];
        n++;
    }
    memmove(s->done, s->done + n, (s->ndone - n) * sizeof *s->done);
    s->ndone -= n;
    if (s->ndone) {
        uint64_t one = 1;
        ssize_t w = write(s->efd, &one, sizeof one);
        (void)w;
    }
    pthread_mutex_unlock(DP_SCRIPT_MU(s));
    return n;
}

int dp_script_attach(struct dp_script *s, int efd)
{
    if (pthread_mutex_init(DP_SCRIPT_MU(s), NULL))
        return -1;
    s->efd = efd;
    s->core.serve = dp_script_serve;
    s->core.submit = dp_script_submit;
    s->core.reap = dp_script_reap;
    s->core.poll_fd = efd;
    s->core.dev = s;
    return 0;
}

/* Complete n chains at once (len 0: failed with err, deferred to Python). */
void dp_script_complete(struct dp_script *s, const uint16_t *heads, const uint32_t *lens,
                        int32_t err, uint32_t n)
{
    pthread_mutex_lock(DP_SCRIPT_MU(s));
    for (uint32_t i = 0; i < n && s->ndone < DP_SCRIPT_MAX; i++) {
        struct dp_done *d = &s->done[s->ndone++];
        d->head = heads[i];
        d->len = lens[i];
        d->err = lens[i] ? 0 : err;
    }
    pthread_mutex_unlock(DP_SCRIPT_MU(s));
    uint64_t one = 1;
    ssize_t w = write(s->efd, &one, sizeof one);
    (void)w;
}

uint32_t dp_script_started(struct dp_script *s, uint16_t *out, uint32_t max)
{
    pthread_mutex_lock(DP_SCRIPT_MU(s));
    uint32_t n = s->nstarted < max ? s->nstarted : max;
    memcpy(out, s->started, n * sizeof *out);
    pthread_mutex_unlock(DP_SCRIPT_MU(s));
    return n;
}
