/* virtio-blk fast path on an NBD export: IN, OUT and FLUSH (virtio 1.4 §5.2.6) sent
 * as NBD_CMD_READ / NBD_CMD_WRITE / NBD_CMD_FLUSH (NBD doc/proto.md, transmission
 * phase) without the Python interpreter.
 *
 * Why our own transmission-phase client and not libnbd: Python already speaks the
 * handshake (virtio/devices/blk/nbd.py: fixed newstyle, structured replies, OPT_GO,
 * block sizes) and hands this thread a connected socket in transmission phase;
 * libnbd cannot adopt such a socket (it always negotiates itself), its headers
 * (libnbd-dev) are not installed here, and READ/WRITE/FLUSH with simple and
 * structured replies is a few hundred lines -- the same subset nbd.py implements.
 *
 * One connection per queue thread (multi-conn).  Requests of a popped batch are
 * queued and sent with as few writev calls as the socket takes (the request header
 * and the guest's buffers as iovecs, no copy); replies are read in large chunks and
 * parsed here, read data copied straight into guest memory.  Several requests are in
 * flight, told apart by their cookie (the chain's head and a generation);
 * completions found in one wake-up are published together by the core.
 *
 * Served here only when well formed (the checks of blk_dataplane.c), not larger
 * than the export's maximum payload, and -- for write-through writes -- when the
 * server offers FUA.  Everything else (GET_ID, DISCARD, WRITE_ZEROES, ...) is
 * deferred to the Python device.  A server error reply (NBD error chunk or simple
 * reply error) fails that request only: deferred with its errno, answered IOERR by
 * Python, never retried.  A broken connection (EOF, socket error, a reply that
 * breaks the protocol) fails every request in flight with its errno; from then on
 * every request goes to Python, which reconnects (nbd.py) -- the documented
 * behaviour of the Python client, unchanged -- until Python hands over a new
 * connection for this thread (new_fd, taken with the next request).
 *
 * Over TLS (nbds://) the connection comes with a GnuTLS session (tls, nbd_tls.c:
 * Python did STARTTLS, GnuTLS the handshake): a batch's requests are copied into
 * tbuf and sent with gnutls_record_send (repeated with the same arguments after
 * EAGAIN, as GnuTLS requires), replies read with gnutls_record_recv until EAGAIN
 * (records GnuTLS read ahead are invisible to poll), then parsed as above; a
 * reconnect brings a new session (new_tls) with new_fd. */
#include <poll.h>
#include <pthread.h>
#include <sys/socket.h>

#include "nbd_dataplane.h"

#define NBD_REQUEST_MAGIC 0x25609513u
#define NBD_SIMPLE_REPLY_MAGIC 0x67446698u
#define NBD_STRUCTURED_REPLY_MAGIC 0x668e33efu
#define NBD_CMD_READ 0
#define NBD_CMD_WRITE 1
#define NBD_CMD_DISC 2
#define NBD_CMD_FLUSH 3
#define NBD_CMD_FLAG_FUA 1
#define NBD_FLAG_READ_ONLY (1u << 1)
#define NBD_FLAG_SEND_FLUSH (1u << 2)
#define NBD_FLAG_SEND_FUA (1u << 3)
#define NBD_REPLY_FLAG_DONE 1
#define NBD_REPLY_TYPE_NONE 0
#define NBD_REPLY_TYPE_OFFSET_DATA 1
#define NBD_REPLY_TYPE_OFFSET_HOLE 2
#define NBD_REPLY_TYPE_ERROR_BIT (1u << 15)
#define NBD_MAX_ERROR_MESSAGE 4096
#define NBD_REQ_LEN 28
#define NBD_RBUF (256u * 1024u)
#define NBD_STOP_GRACE_NS 3000000000LL

enum { RX_HDR, RX_OFFSET, RX_HOLE, RX_ERROR, RX_DATA };

struct nbd_slot {
    uint8_t type, busy;
    uint8_t *status;
    uint64_t status_gpa;
    uint32_t used, gen;
    uint64_t off, len;
    uint64_t covered;           /* bytes of a read the data and hole chunks covered */
    const struct vq_seg *segs;
    uint32_t first, end;
    int err;                    /* the server's error for this request (errno) */
    uint8_t req[NBD_REQ_LEN];
};

struct nbd_priv {
    struct nbd_slot *slots;
    uint32_t nslots, inflight;
    struct iovec *sq;           /* the send queue: [sq_pos, sq_n) still to send */
    uint32_t sq_n, sq_cap, sq_pos;
    struct dp_done *done;       /* completions for reap (nslots) */
    uint32_t ndone;
    uint8_t *rbuf;
    size_t rpos, rend;
    int rstate, rsimple;
    struct nbd_slot *rslot;
    uint16_t rflags;
    uint32_t rclen;
    uint64_t rat, rleft;
    int kick, wake;
    int64_t stop_since;
    uint8_t *tbuf;              /* TLS: plaintext staged for one record send */
    size_t toff, tlen;          /* [toff, tlen) of tbuf still to send */
};

#define NBD_TBUF (64u * 1024u)

static inline uint16_t nbd_be16(const uint8_t *p)
{
    return (uint16_t)(p[0] << 8 | p[1]);
}

static inline uint32_t nbd_be32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static inline uint64_t nbd_be64(const uint8_t *p)
{
    return (uint64_t)nbd_be32(p) << 32 | nbd_be32(p + 4);
}

static inline void nbd_put(uint8_t *p, uint64_t v, int n)
{
    for (int i = n - 1; i >= 0; i--, v >>= 8)
        p[i] = (uint8_t)v;
}

static int64_t nbd_now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000LL + t.tv_nsec;
}

/* NBD error values (proto.md "Error values") to errno. */
static int nbd_errno(uint32_t e)
{
    switch (e) {
    case 1: return EPERM;
    case 5: return EIO;
    case 12: return ENOMEM;
    case 22: return EINVAL;
    case 28: return ENOSPC;
    case 75: return EOVERFLOW;
    case 95: return EOPNOTSUPP;
    case 108: return ESHUTDOWN;
    default: return EIO;
    }
}

static void nbd_complete(struct nbd_priv *pv, struct nbd_slot *s, int err)
{
    s->busy = 0;
    pv->inflight--;
    struct dp_done *d = &pv->done[pv->ndone++];
    d->head = (uint16_t)(s - pv->slots);
    d->len = 0;
    d->err = err;
}

/* The connection is gone (or lied): every request in flight fails with err; later
 * requests go to Python. */
static void nbd_fail_all(struct nbd_dp *dp, int err)
{
    struct nbd_priv *pv = dp->priv;
    for (uint32_t i = 0; i < pv->nslots; i++)
        if (pv->slots[i].busy)
            nbd_complete(pv, &pv->slots[i], err);
    pv->sq_n = pv->sq_pos = 0;
    pv->toff = pv->tlen = 0;
    pv->rpos = pv->rend = 0;
    pv->rstate = RX_HDR;
    if (!dp->broken) {
        dp->broken = err;
        dp->conn_failed++;
        shutdown(dp->sock_fd, SHUT_RDWR);
    }
}

static int nbd_sq_room(struct nbd_priv *pv, uint32_t more)
{
    if (pv->sq_n + more <= pv->sq_cap)
        return 1;
    uint32_t cap = pv->sq_cap ? pv->sq_cap : 256;
    while (cap < pv->sq_n + more)
        cap *= 2;
    struct iovec *n = realloc(pv->sq, cap * sizeof *n);
    if (!n)
        return 0;
    pv->sq = n;
    pv->sq_cap = cap;
    return 1;
}

/* Over TLS: the send queue copied into tbuf and sent as records (GnuTLS wants a
 * send that could not go on repeated with the same arguments: tbuf keeps them). */
static int nbd_send_tls(struct nbd_dp *dp)
{
    struct nbd_priv *pv = dp->priv;
    for (;;) {
        if (pv->toff == pv->tlen) {
            pv->toff = pv->tlen = 0;
            while (pv->sq_pos < pv->sq_n && pv->tlen < NBD_TBUF) {
                struct iovec *v = &pv->sq[pv->sq_pos];
                size_t take = NBD_TBUF - pv->tlen < v->iov_len ? NBD_TBUF - pv->tlen : v->iov_len;
                memcpy(pv->tbuf + pv->tlen, v->iov_base, take);
                pv->tlen += take;
                v->iov_base = (uint8_t *)v->iov_base + take;
                v->iov_len -= take;
                if (!v->iov_len)
                    pv->sq_pos++;
            }
            if (pv->sq_pos == pv->sq_n)
                pv->sq_n = pv->sq_pos = 0;
            if (!pv->tlen)
                return 0;
        }
        ssize_t n = nbd_tls_io_send(dp->tls, pv->tbuf + pv->toff, pv->tlen - pv->toff);
        if (n == -EINTR)
            continue;
        if (n == -EAGAIN)
            return 0;
        if (n < 0)
            return (int)n;
        dp->sends++;
        dp->bytes_out += (uint64_t)n;
        pv->toff += (size_t)n;
    }
}

/* Send what the socket takes now.  Returns 0, or -errno when the connection broke. */
static int nbd_send(struct nbd_dp *dp)
{
    struct nbd_priv *pv = dp->priv;
    if (dp->tls)
        return nbd_send_tls(dp);
    while (pv->sq_pos < pv->sq_n) {
        uint32_t cnt = pv->sq_n - pv->sq_pos;
        struct msghdr m = {0};
        m.msg_iov = &pv->sq[pv->sq_pos];
        m.msg_iovlen = cnt < 1024 ? cnt : 1024;
        ssize_t n = sendmsg(dp->sock_fd, &m, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return 0;
            return -errno;
        }
        dp->sends++;
        dp->bytes_out += (uint64_t)n;
        while (n > 0) {
            struct iovec *v = &pv->sq[pv->sq_pos];
            if ((size_t)n >= v->iov_len) {
                n -= (ssize_t)v->iov_len;
                pv->sq_pos++;
            } else {
                v->iov_base = (uint8_t *)v->iov_base + n;
                v->iov_len -= (size_t)n;
                n = 0;
            }
        }
    }
    pv->sq_n = pv->sq_pos = 0;
    return 0;
}

static struct nbd_slot *nbd_slot_for(struct nbd_priv *pv, uint64_t cookie)
{
    uint64_t i = cookie & 0xffff;
    if (i >= pv->nslots || !pv->slots[i].busy || pv->slots[i].gen != (uint32_t)(cookie >> 16))
        return NULL;
    return &pv->slots[i];
}

/* n bytes of a read's data (src, or zeros when NULL) at byte `at` of the request. */
static void nbd_copy_in(struct nbd_dp *dp, struct nbd_slot *s, uint64_t at, const uint8_t *src,
                        uint64_t n)
{
    struct vq *q = dp->core.q;
    for (uint32_t i = s->first; i < s->end && n; i++) {
        uint64_t l = s->segs[i].len;
        if (at >= l) {
            at -= l;
            continue;
        }
        uint64_t take = l - at < n ? l - at : n;
        uint8_t *p = seg_host(q, &s->segs[i]) + at;
        if (src) {
            memcpy(p, src, take);
            src += take;
        } else {
            memset(p, 0, take);
        }
        at = 0;
        n -= take;
    }
}

static int nbd_inside(struct nbd_slot *s, uint64_t off, uint64_t n)
{
    return off >= s->off && n <= s->len && off - s->off <= s->len - n;
}

/* The end of a structured reply chunk; with NBD_REPLY_FLAG_DONE the request's end.
 * A successful read must have been covered whole by its data and hole chunks
 * (proto.md: chunks do not overlap), else the guest would see stale bytes: EIO. */
static void nbd_chunk_end(struct nbd_dp *dp, struct nbd_priv *pv)
{
    struct nbd_slot *s = pv->rslot;
    pv->rstate = RX_HDR;
    if (!(pv->rflags & NBD_REPLY_FLAG_DONE))
        return;
    int err = s->err;
    if (!err && s->type == VIRTIO_BLK_T_IN && s->covered != s->len) {
        err = EIO;
        dp->server_errors++;
    }
    nbd_complete(pv, s, err);
}

/* Parse the replies in the receive buffer.  Returns 0 (needs more bytes) or -EPROTO. */
static int nbd_parse(struct nbd_dp *dp)
{
    struct nbd_priv *pv = dp->priv;
    for (;;) {
        size_t avail = pv->rend - pv->rpos;
        const uint8_t *p = pv->rbuf + pv->rpos;
        struct nbd_slot *s = pv->rslot;
        switch (pv->rstate) {
        case RX_HDR: {
            if (avail < 4)
                return 0;
            uint32_t magic = nbd_be32(p);
            if (magic == NBD_SIMPLE_REPLY_MAGIC) {
                if (avail < 16)
                    return 0;
                s = nbd_slot_for(pv, nbd_be64(p + 8));
                if (!s)
                    return -EPROTO;
                uint32_t err = nbd_be32(p + 4);
                pv->rpos += 16;
                if (err) {
                    dp->server_errors++;
                    nbd_complete(pv, s, nbd_errno(err));
                } else if (s->type == VIRTIO_BLK_T_IN) {
                    pv->rslot = s;
                    pv->rsimple = 1;
                    pv->rat = 0;
                    pv->rleft = s->len;
                    pv->rstate = RX_DATA;
                } else {
                    nbd_complete(pv, s, 0);
                }
                continue;
            }
            if (magic != NBD_STRUCTURED_REPLY_MAGIC || !dp->structured)
                return -EPROTO;
            if (avail < 20)
                return 0;
            s = nbd_slot_for(pv, nbd_be64(p + 8));
            if (!s)
                return -EPROTO;
            uint16_t type = nbd_be16(p + 6);
            uint32_t len = nbd_be32(p + 16);
            pv->rslot = s;
            pv->rsimple = 0;
            pv->rflags = nbd_be16(p + 4);
            pv->rclen = len;
            pv->rpos += 20;
            int rd = s->type == VIRTIO_BLK_T_IN;
            if (type == NBD_REPLY_TYPE_OFFSET_DATA && rd && len >= 8)
                pv->rstate = RX_OFFSET;
            else if (type == NBD_REPLY_TYPE_OFFSET_HOLE && rd && len == 12)
                pv->rstate = RX_HOLE;
            else if ((type & NBD_REPLY_TYPE_ERROR_BIT) && len >= 6 &&
                     len <= 6 + NBD_MAX_ERROR_MESSAGE)
                pv->rstate = RX_ERROR;
            else if (type == NBD_REPLY_TYPE_NONE && len == 0)
                nbd_chunk_end(dp, pv);
            else
                return -EPROTO;
            continue;
        }
        case RX_OFFSET: {
            if (avail < 8)
                return 0;
            uint64_t off = nbd_be64(p), n = pv->rclen - 8u;
            if (!nbd_inside(s, off, n))
                return -EPROTO;
            pv->rpos += 8;
            pv->rat = off - s->off;
            pv->rleft = n;
            s->covered += n;
            pv->rstate = RX_DATA;
            continue;
        }
        case RX_HOLE: {
            if (avail < 12)
                return 0;
            uint64_t off = nbd_be64(p), n = nbd_be32(p + 8);
            if (!nbd_inside(s, off, n))
                return -EPROTO;
            pv->rpos += 12;
            s->covered += n;
            nbd_copy_in(dp, s, off - s->off, NULL, n);
            nbd_chunk_end(dp, pv);
            continue;
        }
        case RX_ERROR:
            if (avail < pv->rclen)
                return 0;
            if (!s->err) {
                s->err = nbd_errno(nbd_be32(p));
                dp->server_errors++;
            }
            pv->rpos += pv->rclen;
            nbd_chunk_end(dp, pv);
            continue;
        case RX_DATA: {
            if (pv->rleft) {
                if (!avail)
                    return 0;
                uint64_t take = avail < pv->rleft ? avail : pv->rleft;
                nbd_copy_in(dp, s, pv->rat, p, take);
                pv->rat += take;
                pv->rleft -= take;
                pv->rpos += take;
                dp->bytes_in += take;
                if (pv->rleft)
                    return 0;
            }
            if (pv->rsimple) {
                pv->rstate = RX_HDR;
                nbd_complete(pv, s, 0);
            } else {
                nbd_chunk_end(dp, pv);
            }
            continue;
        }
        default:
            return -EPROTO;
        }
    }
}

/* Read and parse what the socket has.  Returns 0, or -errno when the connection broke. */
static int nbd_recv(struct nbd_dp *dp)
{
    struct nbd_priv *pv = dp->priv;
    for (;;) {
        if (pv->rpos == pv->rend) {
            pv->rpos = pv->rend = 0;
        } else if (NBD_RBUF - pv->rend < 65536) {
            memmove(pv->rbuf, pv->rbuf + pv->rpos, pv->rend - pv->rpos);
            pv->rend -= pv->rpos;
            pv->rpos = 0;
        }
        size_t room = NBD_RBUF - pv->rend;
        ssize_t n;
        if (dp->tls) {
            /* until GnuTLS says EAGAIN: what it read ahead, poll() does not see */
            n = nbd_tls_io_recv(dp->tls, pv->rbuf + pv->rend, room);
            if (n == -EAGAIN)
                return 0;
            if (n == -EINTR)
                continue;
            if (n < 0)
                return (int)n;
        } else {
            n = recv(dp->sock_fd, pv->rbuf + pv->rend, room, MSG_DONTWAIT);
        }
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return 0;
            return -errno;
        }
        if (n == 0)
            return -ECONNRESET; /* the server closed the connection */
        dp->recvs++;
        pv->rend += (size_t)n;
        int r = nbd_parse(dp);
        if (r < 0)
            return r;
        if ((size_t)n < room && !dp->tls)
            return 0;
    }
}

/* Move the connection on: send what waits, read what came.  Returns 0 or -errno. */
static int nbd_progress(struct nbd_dp *dp, int can_send, int can_recv)
{
    struct nbd_priv *pv = dp->priv;
    int r = 0;
    if (can_send && (pv->sq_n || pv->toff < pv->tlen))
        r = nbd_send(dp);
    if (!r && can_recv && pv->inflight)
        r = nbd_recv(dp);
    if (r < 0)
        nbd_fail_all(dp, -r);
    return r;
}

/* A request answered: blk_complete_ok (blk_dataplane.c).  Returns the used length. */
static uint32_t nbd_finish_ok(struct nbd_dp *dp, struct nbd_slot *s)
{
    uint64_t *count[3] = {&dp->reads, &dp->writes, &dp->flushes};
    (*count[blk_complete_ok(dp->core.q, s->type, s->segs, s->first, s->end, s->len, s->status,
                            s->status_gpa)])++;
    return s->used;
}

/* Queue one NBD request for slot s (its header, then a write's data). */
static int nbd_queue(struct nbd_dp *dp, struct nbd_slot *s, uint16_t cmd, uint16_t flags,
                     int write_)
{
    struct nbd_priv *pv = dp->priv;
    struct vq *q = dp->core.q;
    uint32_t nseg = write_ ? s->end - s->first : 0;
    if (!nbd_sq_room(pv, 1 + nseg))
        return 0;
    s->gen++;
    uint64_t cookie = (uint64_t)s->gen << 16 | (uint64_t)(s - pv->slots);
    nbd_put(s->req, NBD_REQUEST_MAGIC, 4);
    nbd_put(s->req + 4, flags, 2);
    nbd_put(s->req + 6, cmd, 2);
    nbd_put(s->req + 8, cookie, 8);
    nbd_put(s->req + 16, s->off, 8);
    nbd_put(s->req + 24, s->len, 4);
    uint32_t at = pv->sq_n;
    pv->sq[at].iov_base = s->req;
    pv->sq[at].iov_len = NBD_REQ_LEN;
    if (write_) {
        int n = build_iov(q, s->segs, s->first, s->end, BLK_HDR, s->len, &pv->sq[at + 1],
                          (int)nseg);
        if (n < 0)
            return 0;
        pv->sq_n = at + 1 + (uint32_t)n;
    } else {
        pv->sq_n = at + 1;
    }
    s->busy = 1;
    s->err = 0;
    s->covered = 0;
    pv->inflight++;
    return 1;
}

static uint32_t nbd_serve(void *dev, const struct vq_chain *c, const struct vq_seg *segs, int *err)
{
    struct nbd_dp *dp = dev;
    struct nbd_priv *pv = dp->priv;
    struct vq *q = dp->core.q;
    uint8_t hdr[BLK_HDR];
    if (pv && dp->broken && __atomic_load_n(&dp->new_fd, __ATOMIC_ACQUIRE) >= 0) {
        /* Python reconnected for us: everything of the old connection has failed
         * already (nbd_fail_all), nothing of it is read any more */
        int fd = __atomic_exchange_n(&dp->new_fd, -1, __ATOMIC_ACQ_REL);
        close(dp->sock_fd);
        nbd_tls_free(dp->tls);
        dp->tls = __atomic_exchange_n(&dp->new_tls, NULL, __ATOMIC_ACQ_REL);
        dp->sock_fd = fd;
        dp->broken = 0;
        dp->reconnects++;
    }
    if (!pv || dp->broken || c->head >= pv->nslots)
        return 0;
    if (c->readable_len < BLK_HDR || c->writable_len < 1 || c->nsegs == 0)
        return 0;
    if (gather(q, c, segs, hdr, BLK_HDR) != BLK_HDR)
        return 0;
    uint32_t type;
    uint64_t sector;
    memcpy(&type, hdr, 4);
    memcpy(&sector, hdr + 8, 8);
    const struct vq_seg *last = &segs[c->nsegs - 1];
    if (!last->writable || last->len == 0)
        return 0;
    struct nbd_slot *s = &pv->slots[c->head];
    s->status = seg_host(q, last) + last->len - 1;
    s->status_gpa = last->gpa + last->len - 1;
    s->type = (uint8_t)type;
    s->segs = segs;
    int wt = __atomic_load_n(&dp->writethrough, __ATOMIC_RELAXED);
    if (type == VIRTIO_BLK_T_IN || type == VIRTIO_BLK_T_OUT) {
        int write_ = type == VIRTIO_BLK_T_OUT;
        uint64_t len;
        if (write_) {
            len = c->readable_len - BLK_HDR;
            if (c->writable_len != 1 || dp->read_only || len % BLK_SECTOR)
                return 0;
            if (sector == 0 && dp->guard_sector0)
                return 0;
            if (wt && !(dp->tflags & NBD_FLAG_SEND_FUA))
                return 0; /* Python: the write, then a flush */
            s->first = 0;
            s->end = c->nreadable;
        } else {
            len = c->writable_len - 1u;
            if (c->readable_len != BLK_HDR || len % BLK_SECTOR)
                return 0;
            s->first = c->nreadable;
            s->end = c->nsegs;
        }
        uint64_t cap = __atomic_load_n(&dp->capacity, __ATOMIC_ACQUIRE);
        if (sector > cap || len / BLK_SECTOR > cap - sector || len > dp->max_payload)
            return 0;
        s->off = sector * BLK_SECTOR;
        s->len = len;
        s->used = write_ ? 1u : (uint32_t)len + 1u;
        if (len == 0)
            return nbd_finish_ok(dp, s);
        uint16_t flags = write_ && wt ? NBD_CMD_FLAG_FUA : 0;
        if (write_ && wt)
            dp->syncs++;
        return nbd_queue(dp, s, write_ ? NBD_CMD_WRITE : NBD_CMD_READ, flags, write_) ? DP_ASYNC
                                                                                   : 0;
    }
    if (type == VIRTIO_BLK_T_FLUSH) {
        if (c->readable_len != BLK_HDR || c->writable_len != 1)
            return 0;
        s->used = 1;
        s->off = s->len = 0;
        if (dp->read_only || !(dp->tflags & NBD_FLAG_SEND_FLUSH))
            return nbd_finish_ok(dp, s); /* nothing to make durable (nbd.py does the same) */
        dp->syncs++;
        return nbd_queue(dp, s, NBD_CMD_FLUSH, 0, 0) ? DP_ASYNC : 0;
    }
    (void)err;
    return 0;
}

static void nbd_submit(void *dev)
{
    nbd_progress(dev, 1, 0);
}

/* Past the stop request, requests the server does not answer within the grace time
 * fail: nothing may outlive the loop, and no reply is read into guest memory later. */
static void nbd_check_stop(struct nbd_dp *dp)
{
    struct nbd_priv *pv = dp->priv;
    if (!pv->inflight || !__atomic_load_n(&dp->core.stop, __ATOMIC_ACQUIRE))
        return;
    int64_t now = nbd_now_ns();
    if (!pv->stop_since)
        pv->stop_since = now;
    else if (now - pv->stop_since > NBD_STOP_GRACE_NS)
        nbd_fail_all(dp, ESHUTDOWN);
}

static uint32_t nbd_reap(void *dev, struct dp_done *out, uint32_t max)
{
    struct nbd_dp *dp = dev;
    struct nbd_priv *pv = dp->priv;
    if (!pv->ndone)
        nbd_progress(dp, 1, 1); /* without waiting: whatever came meanwhile */
    nbd_check_stop(dp);
    uint32_t n = pv->ndone < max ? pv->ndone : max;
    for (uint32_t i = 0; i < n; i++) {
        out[i] = pv->done[i];
        if (!out[i].err)
            out[i].len = nbd_finish_ok(dp, &pv->slots[out[i].head]);
    }
    memmove(pv->done, pv->done + n, (pv->ndone - n) * sizeof *pv->done);
    pv->ndone -= n;
    return n;
}

static int nbd_watch(void *dev, int kick, int wake)
{
    struct nbd_priv *pv = ((struct nbd_dp *)dev)->priv;
    pv->kick = kick;
    pv->wake = wake;
    return 0;
}

/* Wait for a kick, a wake or completions, moving the connection on meanwhile. */
static int nbd_wait(void *dev, int want, int timeout_ms)
{
    struct nbd_dp *dp = dev;
    struct nbd_priv *pv = dp->priv;
    pthread_mutex_t *mu = (pthread_mutex_t *)(void *)dp->core.mu_storage;
    int64_t deadline = timeout_ms < 0 ? -1 : nbd_now_ns() + (int64_t)timeout_ms * 1000000;
    for (;;) {
        if ((want & DP_EV_DONE) && pv->ndone)
            return DP_EV_DONE;
        nbd_check_stop(dp);
        if ((want & DP_EV_DONE) && pv->ndone)
            return DP_EV_DONE;
        struct pollfd p[3] = {{dp->core.wake_fd, POLLIN, 0}, {-1, POLLIN, 0}, {-1, 0, 0}};
        if (want & DP_EV_KICK)
            p[1].fd = pv->kick;
        int out = pv->sq_n || pv->toff < pv->tlen;
        if (!dp->broken && (pv->inflight || out)) {
            p[2].fd = dp->sock_fd;
            p[2].events = (short)((pv->inflight ? POLLIN : 0) | (out ? POLLOUT : 0));
        }
        int ms = -1;
        if (deadline >= 0) {
            int64_t left = deadline - nbd_now_ns();
            ms = left <= 0 ? 0 : (int)((left + 999999) / 1000000);
        }
        if (pv->stop_since && (ms < 0 || ms > 100))
            ms = 100;
        int r = poll(p, 3, ms);
        if (r < 0)
            return errno == EINTR ? -EINTR : -errno;
        if (r == 0) {
            if (deadline >= 0 && nbd_now_ns() >= deadline)
                return 0;
            continue;
        }
        int ev = 0;
        uint64_t v;
        if (p[0].revents & POLLIN) {
            ssize_t rr = read(dp->core.wake_fd, &v, sizeof v);
            (void)rr;
            ev |= DP_EV_WAKE;
        }
        if (p[1].fd >= 0 && (p[1].revents & POLLIN)) {
            pthread_mutex_lock(mu); /* the kick fd may have been replaced meanwhile */
            if (pv->kick == dp->core.kick_fd) {
                ssize_t rr = read(pv->kick, &v, sizeof v);
                (void)rr;
                ev |= DP_EV_KICK;
            }
            pthread_mutex_unlock(mu);
        }
        if (p[2].fd >= 0 && p[2].revents)
            nbd_progress(dp, (p[2].revents & (POLLOUT | POLLERR | POLLHUP)) != 0,
                         (p[2].revents & (POLLIN | POLLERR | POLLHUP)) != 0);
        if (pv->ndone)
            ev |= DP_EV_DONE;
        if (ev & want)
            return ev & want;
    }
}

static void nbd_finish(void *dev)
{
    struct nbd_dp *dp = dev;
    struct nbd_priv *pv = dp->priv;
    if (!pv)
        return;
    if (!dp->broken && !pv->inflight && dp->sock_fd >= 0) { /* NBD_CMD_DISC: best effort */
        uint8_t req[NBD_REQ_LEN] = {0};
        nbd_put(req, NBD_REQUEST_MAGIC, 4);
        nbd_put(req + 6, NBD_CMD_DISC, 2);
        if (dp->tls) {
            if (pv->toff == pv->tlen && nbd_tls_io_send(dp->tls, req, sizeof req) > 0)
                nbd_tls_bye(dp->tls);
        } else {
            ssize_t w = send(dp->sock_fd, req, sizeof req, MSG_NOSIGNAL | MSG_DONTWAIT);
            (void)w;
        }
    }
    dp->priv = NULL;
    dp->core.watch = NULL;
    dp->core.wait = NULL;
    free(pv->slots);
    free(pv->sq);
    free(pv->done);
    free(pv->rbuf);
    free(pv->tbuf);
    free(pv);
}

static int nbd_start(void *dev)
{
    struct nbd_dp *dp = dev;
    uint32_t nslots = dp->core.q->size ? dp->core.q->size : 1;
    struct nbd_priv *pv = calloc(1, sizeof *pv);
    if (!pv)
        return -ENOMEM;
    pv->slots = calloc(nslots, sizeof *pv->slots);
    pv->done = calloc(nslots, sizeof *pv->done);
    pv->rbuf = malloc(NBD_RBUF);
    pv->tbuf = dp->tls || dp->new_tls ? malloc(NBD_TBUF) : NULL;
    pv->nslots = nslots;
    pv->kick = pv->wake = -1;
    if (!pv->slots || !pv->done || !pv->rbuf || !nbd_sq_room(pv, 256) ||
        ((dp->tls || dp->new_tls) && !pv->tbuf)) {
        free(pv->tbuf);
        free(pv->slots);
        free(pv->done);
        free(pv->rbuf);
        free(pv->sq);
        free(pv);
        return -ENOMEM;
    }
    if (!dp->max_payload)
        dp->max_payload = 1u << 20;
    dp->core.poll_fd = -1;
    dp->core.watch = nbd_watch;
    dp->core.wait = nbd_wait;
    __atomic_store_n(&dp->priv, pv, __ATOMIC_RELEASE);
    return 0;
}

void nbd_dp_attach(struct nbd_dp *n)
{
    n->core.serve = nbd_serve;
    n->core.dev = n;
    n->core.start = nbd_start;
    n->core.finish = nbd_finish;
    n->core.submit = nbd_submit;
    n->core.reap = nbd_reap;
    n->core.poll_fd = -1;
}

void nbd_dp_detach(struct nbd_dp *n)
{
    nbd_finish(n); /* in case the thread never ran its finish */
    if (n->sock_fd >= 0)
        close(n->sock_fd);
    n->sock_fd = -1;
    int fd = __atomic_exchange_n(&n->new_fd, -1, __ATOMIC_ACQ_REL);
    if (fd >= 0)
        close(fd);
    nbd_tls_free(n->tls);
    n->tls = NULL;
    nbd_tls_free(__atomic_exchange_n(&n->new_tls, NULL, __ATOMIC_ACQ_REL));
}
