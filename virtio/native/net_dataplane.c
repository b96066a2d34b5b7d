/* virtio-net's native per-packet path (virtio 1.4 §5.1.6): the fast path of a
 * port's transmit queue under the generic data plane (dataplane.c).
 *
 * For each transmitted chain (§5.1.6.2): read the virtio_net_hdr, learn the source
 * MAC and find the destination(s) in the switch's forwarding database (net_fdb.c),
 * and copy the frame once from the source guest's buffers into the destination
 * port's receive buffers (§5.1.6.3, §5.1.6.4): with VIRTIO_NET_F_MRG_RXBUF over as
 * many buffers as it needs, all but the last filled, num_buffers saying how many;
 * without it into one buffer that must hold it.  The used entries of each
 * destination ring wait for the end of the transmit batch: one used index update
 * and at most one notification per batch per ring (EVENT_IDX decides).
 *
 * It is an accelerator, not a second switch: only the common case is served here
 * -- a frame without GSO whose header asks nothing or only NEEDS_CSUM to a port
 * that negotiated GUEST_CSUM (passed through unchanged, as switch.py does), of a
 * length the Python path would accept, to native ports (a flood: every other
 * port, up to NET_FLOOD_MAX, buffers reserved in all of them before any is
 * written).  A frame for a ring short of buffers waits in that queue's hold, ahead
 * of later frames (see "the hold" below).  Everything else (malformed or hostile
 * headers, TSO, checksum completion, the tap uplink, receive filters, a
 * destination with a backlog in Python, buffers §5.1.6.3.1 forbids) is deferred,
 * before anything was learned or counted, to VirtioNet._transmit, which decides
 * and counts it exactly as without the data plane; the causes are counted
 * (py_*).  A deferred frame may reach its receiver after later frames of its
 * batch served here (Python takes it once the thread has moved on).
 *
 * Locks: the forwarding database's mutex is taken to learn a source and look a
 * destination up -- once per batch and per change of source or destination
 * (net_decide) -- and once per batch to add the batch's counters, before its
 * frames are published (what was decided is what is counted).  The destination
 * port's mutex (net_port.mu, which every writer of that receive ring holds) is
 * kept from one frame to the next within a batch, and with it the lock of the
 * receive ring last reserved from (net_dp.kept, with the chains popped from it
 * ahead of need; let go first, and before the batch end's flush, which locks the
 * ring itself); both are let go before a deferral to
 * Python, another destination, a flood to several ports (locked in ascending
 * order, each ring locked per reservation) and at the batch's end.  Order: a
 * port's mutex, then its ring's lock or the database's; never a port's while the database's is held (nor does Python:
 * its database calls each lock and unlock inside), so the threads of different
 * ports copy in parallel without deadlock.  A port whose Python path holds packets
 * (held > 0) is not written natively, so a packet never overtakes the backlog,
 * and Python does not touch the ring while a native thread holds the port. */
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "net_dataplane.h"

#define NET_PORT_MU(p) ((pthread_mutex_t *)(void *)(p)->mu_storage)
_Static_assert(sizeof(((struct net_port *)0)->mu_storage) >= sizeof(pthread_mutex_t), "mutex");

#define NET_HDR_MAX 12
#define NET_ETH_HLEN 14
#define NET_VLAN_HLEN 4
#define NET_HDR_F_NEEDS_CSUM 1u
#define NET_ETH_P_8021Q 0x8100u

/* ---- ports ------------------------------------------------------------------------ */
int net_port_init(struct net_port *p)
{
    for (uint32_t k = 0; k < NET_RXQ_MAX; k++) {
        p->rx[k].q = NULL;
        p->rx[k].call_fd = -1;
        p->rx[k].npend = 0;
        p->rx[k].rx_native = p->rx[k].rx_native_bytes = 0;
        p->rx[k].backlog_full = 0;
        p->rx[k].hold = NULL;
        p->rx[k].nheld = 0;
        p->rx[k].hold_fd = -1;
        p->rx[k].hold_told = p->rx[k].hold_sleeping = 0;
        p->rx[k].hold_stamp = 0;
        p->rx[k].rx_held = p->rx[k].hold_served = 0;
    }
    p->rx_backlog_full = p->rx_held = p->rx_hold_lost = 0;
    p->hold_limit = NET_HOLD_FRAMES;
    p->nrxq = 0;
    return pthread_mutex_init(NET_PORT_MU(p), NULL) ? -1 : 0;
}

void net_port_destroy(struct net_port *p) { pthread_mutex_destroy(NET_PORT_MU(p)); }

/* Publish rx[k]'s gathered used entries with one used index update (§2.7.8.2);
 * ring lock and mu held.  1 when the driver is to be notified (EVENT_IDX / flags,
 * §2.7.10): net_rxq_notify, after the lock is let go. */
static int net_rxq_publish(struct net_port *p, struct net_rxq *r)
{
    struct vq *q = r->q;
    if (!r->npend || !q)
        return 0;
    vq_add_used_batch_u(q, r->pend_ids, r->pend_lens, r->pend_ndescs, r->npend);
    if (q->stats)
        q->stats->native += r->npend;
    r->npend = 0;
    p->rx_publishes++;
    return vq_needs_notification_u(q);
}

static void net_rxq_notify(struct net_port *p, struct net_rxq *r)
{
    if (r->call_fd >= 0) {
        uint64_t one = 1;
        ssize_t w = write(r->call_fd, &one, sizeof one);
        (void)w;
        p->rx_calls++;
    }
}

/* net_rxq_publish and notify; mu held. */
static void net_rxq_flush(struct net_port *p, struct net_rxq *r)
{
    struct vq *q = r->q;
    if (!r->npend || !q)
        return;
    VQ_LOCK(q);
    int notify = net_rxq_publish(p, r);
    VQ_UNLOCK(q);
    if (notify)
        net_rxq_notify(p, r);
}

static void net_port_flush(struct net_port *p)
{
    for (uint32_t k = 0; k < NET_RXQ_MAX; k++)
        net_rxq_flush(p, &p->rx[k]);
}

/* The Python path's entry: what native threads wrote so far is published first,
 * so the used ring keeps the order packets arrived in. */
void net_port_lock(struct net_port *p)
{
    pthread_mutex_lock(NET_PORT_MU(p));
    net_port_flush(p);
}

void net_port_unlock(struct net_port *p) { pthread_mutex_unlock(NET_PORT_MU(p)); }

/* From now on frames may be written into q, the port's receive queue k, natively
 * (the caller turned the queue's locking on: Python's own operations on it
 * serialise with ours). */
void net_port_attach(struct net_port *p, uint32_t k, struct vq *q, int call_fd, int hold_fd,
                     uint32_t hdr_size, int mrg_rxbuf, int guest_csum)
{
    if (k >= NET_RXQ_MAX)
        return;
    net_port_lock(p);
    p->rx[k].q = q;
    p->rx[k].call_fd = call_fd;
    p->rx[k].hold_fd = hold_fd;
    p->rx[k].npend = 0;
    p->hdr_size = hdr_size;
    p->mrg_rxbuf = (uint8_t)!!mrg_rxbuf;
    p->guest_csum = (uint8_t)!!guest_csum;
    net_port_unlock(p);
}

/* When this returns no thread touches receive queue k (or its memory) any more;
 * the frames its hold still has are lost (counted). */
void net_port_detach(struct net_port *p, uint32_t k)
{
    if (k >= NET_RXQ_MAX)
        return;
    net_port_lock(p);
    struct net_rxq *rq = &p->rx[k];
    rq->npend = 0;
    rq->q = NULL;
    rq->call_fd = -1;
    rq->hold_fd = -1;
    p->rx_hold_lost += rq->nheld;
    rq->nheld = 0;
    rq->hold_told = rq->hold_sleeping = 0;
    free(rq->hold);
    rq->hold = NULL;
    net_port_unlock(p);
}

void net_port_set_call(struct net_port *p, uint32_t k, int call_fd)
{
    if (k >= NET_RXQ_MAX)
        return;
    net_port_lock(p);
    p->rx[k].call_fd = call_fd;
    net_port_unlock(p);
}

/* The flow hash (VirtioNet.flow_hash is this function): zlib's CRC-32 of the flow's
 * two endpoints -- IPv4 / IPv6 addresses with their TCP/UDP ports, or else the MAC
 * addresses -- taken in a fixed order (the lower endpoint first), so both directions
 * of a flow hash alike: a reply finds the queue pair its flow was transmitted on
 * (§5.1.9.5.6, net_steer_note), and a flow no pair has sent stays on one receive
 * queue.  `frame` holds the first min(len, NET_FLOW_BYTES) bytes. */
#define NET_FLOW_BYTES 96
/* CRC-32 (IEEE 802.3, reflected: zlib.crc32's), four bytes per step with four tables
 * ("slicing by 4").  Bit at a time this was a fifth of the 2 QP backend's CPU, a
 * byte-table lookup per byte still a tenth (12 dependent lookups a frame). */
static uint32_t net_crc_table[4][256];

__attribute__((constructor)) static void net_crc_table_init(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = (c >> 1) ^ (0xEDB88320u & (0u - (c & 1u)));
        net_crc_table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++)
        for (int t = 1; t < 4; t++) {
            uint32_t prev = net_crc_table[t - 1][i];
            net_crc_table[t][i] = (prev >> 8) ^ net_crc_table[0][prev & 0xFFu];
        }
}

/* One four-byte step of net_crc32 on an inverted crc: w holds the next four bytes
 * as a little-endian load of them gives. */
static inline uint32_t net_crc_step(uint32_t crc, uint32_t w)
{
    crc ^= w;
    return net_crc_table[3][crc & 0xFFu] ^ net_crc_table[2][(crc >> 8) & 0xFFu] ^
           net_crc_table[1][(crc >> 16) & 0xFFu] ^ net_crc_table[0][crc >> 24];
}

static uint32_t net_crc32(uint32_t crc, const uint8_t *b, uint32_t n)
{
    crc = ~crc;
    for (; n >= 4; n -= 4, b += 4)
        crc = net_crc_step(crc, (uint32_t)b[0] | (uint32_t)b[1] << 8 | (uint32_t)b[2] << 16 |
                                    (uint32_t)b[3] << 24);
    while (n--)
        crc = (crc >> 8) ^ net_crc_table[0][(crc ^ *b++) & 0xFFu];
    return ~crc;
}

/* CRC-32 of endpoints a and b (alen-byte addresses, with 2-byte ports pa / pb
 * unless pa is NULL), the lower (address, then port) first: lo_addr hi_addr
 * [lo_port hi_port].  The bytes are copied once, so a frame the driver changes
 * meanwhile only hashes to another queue. */
static uint32_t net_endpoints_crc(const uint8_t *a, const uint8_t *b, uint32_t alen,
                                  const uint8_t *pa, const uint8_t *pb)
{
    uint8_t ka[18], kb[18], key[36];
    uint32_t n = alen + (pa ? 2 : 0);
    memcpy(ka, a, alen);
    memcpy(kb, b, alen);
    if (pa) {
        memcpy(ka + alen, pa, 2);
        memcpy(kb + alen, pb, 2);
    }
    int swap = memcmp(ka, kb, n) > 0;
    const uint8_t *lo = swap ? kb : ka, *hi = swap ? ka : kb;
    memcpy(key, lo, alen);
    memcpy(key + alen, hi, alen);
    if (pa) {
        memcpy(key + 2 * alen, lo + alen, 2);
        memcpy(key + 2 * alen + 2, hi + alen, 2);
    }
    return net_crc32(0, key, 2 * n);
}

/* net_endpoints_crc for IPv4 (the common case, once per frame with 2 pairs or more):
 * the same key, compared and fed to the CRC as words, no copies. */
static uint32_t net_ipv4_crc(const uint8_t *a, const uint8_t *b, const uint8_t *pa,
                             const uint8_t *pb)
{
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    uint32_t wa, wb;
    uint16_t qa = 0, qb = 0;
    memcpy(&wa, a, 4);
    memcpy(&wb, b, 4);
    if (pa) {
        memcpy(&qa, pa, 2);
        memcpy(&qb, pb, 2);
    }
    uint64_t ka = (uint64_t)__builtin_bswap32(wa) << 16 | __builtin_bswap16(qa);
    uint64_t kb = (uint64_t)__builtin_bswap32(wb) << 16 | __builtin_bswap16(qb);
    if (ka > kb) {
        uint32_t t = wa;
        wa = wb;
        wb = t;
        uint16_t u = qa;
        qa = qb;
        qb = u;
    }
    uint32_t crc = net_crc_step(net_crc_step(~0u, wa), wb);
    if (pa)
        crc = net_crc_step(crc, (uint32_t)qa | (uint32_t)qb << 16);
    return ~crc;
#else
    return net_endpoints_crc(a, b, 4, pa, pb);
#endif
}

/* The frame's EtherType, past one VLAN tag, and in *off where its payload starts;
 * 0 for a frame shorter than an Ethernet header. */
static inline uint32_t net_flow_ethertype(const uint8_t *frame, uint32_t len, uint32_t *off)
{
    *off = NET_ETH_HLEN;
    if (len < NET_ETH_HLEN)
        return 0;
    uint32_t type = (uint32_t)frame[12] << 8 | frame[13];
    if (type == NET_ETH_P_8021Q && len >= NET_ETH_HLEN + 4) {
        type = (uint32_t)frame[16] << 8 | frame[17];
        *off += 4;
    }
    return type;
}

/* Where net_flow_hash's IPv4 key is in `frame` (len <= NET_FLOW_BYTES bytes): 1 and
 * *ip (the IPv4 header) and *l4 (its TCP / UDP ports, or NULL) for an IPv4 frame,
 * maybe VLAN-tagged, with its whole fixed header; else 0 (the other keys). */
static inline int net_flow_ipv4(const uint8_t *frame, uint32_t len, const uint8_t **ip,
                                const uint8_t **l4)
{
    uint32_t off;
    if (net_flow_ethertype(frame, len, &off) != 0x0800 || len < off + 20)
        return 0;
    /* read once: the frame may be guest memory the driver is changing, and the
     * header length bounds the read of the ports */
    uint32_t l4off = off + (__atomic_load_n(&frame[off], __ATOMIC_RELAXED) & 0x0Fu) * 4;
    uint8_t proto = __atomic_load_n(&frame[off + 9], __ATOMIC_RELAXED);
    *ip = frame + off;
    *l4 = (proto == 6 || proto == 17) && len >= l4off + 4 ? frame + l4off : NULL;
    return 1;
}

uint32_t net_flow_hash(const uint8_t *frame, uint32_t len)
{
    if (len > NET_FLOW_BYTES)
        len = NET_FLOW_BYTES; /* enough for every key below */
    if (len < 12)
        return net_crc32(0, frame, len);
    const uint8_t *ip, *l4;
    if (net_flow_ipv4(frame, len, &ip, &l4))
        return net_ipv4_crc(ip + 12, ip + 16, l4, l4 ? l4 + 2 : NULL);
    uint32_t off;
    if (net_flow_ethertype(frame, len, &off) == 0x86DD && len >= off + 40) {
        uint8_t next = __atomic_load_n(&frame[off + 6], __ATOMIC_RELAXED);
        int ports = (next == 6 || next == 17) && len >= off + 44;
        return net_endpoints_crc(frame + off + 8, frame + off + 24, 16,
                                 ports ? frame + off + 40 : NULL, frame + off + 42);
    }
    return net_endpoints_crc(frame, frame + 6, 6, NULL, NULL);
}

/* net_flow_hash, remembering the last IPv4 key and its hash: a batch's frames are
 * mostly of one flow (a burst of one connection, a generator's one stream), whose
 * hash is then a compare, not a CRC (the CRC was 10 % of the samples at 2 queue
 * pairs).  The key is read once, and hashed from that copy. */
static uint32_t net_flow_hash_memo(struct net_flow_memo *mo, const uint8_t *frame,
                                   uint32_t len)
{
    const uint8_t *ip, *l4;
    if (len > NET_FLOW_BYTES)
        len = NET_FLOW_BYTES;
    if (!net_flow_ipv4(frame, len, &ip, &l4))
        return net_flow_hash(frame, len);
    uint64_t addrs;
    uint32_t ports = 0, kind = l4 ? 2 : 1;
    memcpy(&addrs, ip + 12, 8);
    if (l4)
        memcpy(&ports, l4, 4);
    if (mo->kind == kind && mo->addrs == addrs && mo->ports == ports)
        return mo->hash;
    const uint8_t *a = (const uint8_t *)&addrs, *pp = (const uint8_t *)&ports;
    mo->hash = net_ipv4_crc(a, a + 4, l4 ? pp : NULL, pp + 2);
    mo->kind = kind;
    mo->addrs = addrs;
    mo->ports = ports;
    return mo->hash;
}

/* §5.1.9.5.6: "After the driver transmitted a packet of a flow on transmitqX, the
 * device SHOULD cause incoming packets for that flow to be steered to receiveqX."
 * Noted by the transmit paths of port p (written only when it changes: the line
 * stays shared while the flow keeps its queue). */
void net_steer_note(struct net_port *p, uint32_t hash, uint32_t pair)
{
    uint64_t want = (uint64_t)hash << 32 | (pair + 1u);
    uint64_t *slot = &p->steer[hash % NET_STEER_SIZE];
    if (__atomic_load_n(slot, __ATOMIC_RELAXED) != want)
        __atomic_store_n(slot, want, __ATOMIC_RELAXED);
}

/* The queue pair port p last transmitted the flow on, or -1. */
int32_t net_steer_pair(struct net_port *p, uint32_t hash)
{
    uint64_t e = __atomic_load_n(&p->steer[hash % NET_STEER_SIZE], __ATOMIC_RELAXED);
    if (!e || (uint32_t)(e >> 32) != hash)
        return -1;
    return (int32_t)(uint32_t)e - 1;
}

void net_steer_clear(struct net_port *p)
{
    for (uint32_t i = 0; i < NET_STEER_SIZE; i++)
        __atomic_store_n(&p->steer[i], 0, __ATOMIC_RELAXED);
}

/* The receive queue rx[k] (k < nq, nq > 1) of port p for a frame of flow `hash`:
 * the pair p transmitted the flow on (*steered = 1), else by hash
 * (VirtioNet._rx_queue). */
static inline uint32_t net_rx_pick(struct net_port *p, uint32_t hash, uint32_t nq,
                                   uint32_t *steered)
{
    int32_t pair = net_steer_pair(p, hash);
    *steered = pair >= 0 && (uint32_t)pair < nq;
    if (*steered)
        return (uint32_t)pair;
    return nq & (nq - 1) ? hash % nq : hash & (nq - 1); /* no division for 2, 4, ... */
}

/* ---- copying ---------------------------------------------------------------------- */
static inline uint8_t *net_host(struct vq *q, const struct vq_seg *s)
{
    return q->mem->regions[s->region].host + s->offset;
}

/* A read position in a chain's readable segments (of the memory `regions`: the
 * sending guest's, or a hold's buffer). */
struct net_cursor {
    const struct vm_region *regions;
    const struct vq_seg *segs;
    uint32_t nsegs, i, off;
};

static inline const uint8_t *net_src(const struct net_cursor *c, const struct vq_seg *s)
{
    return c->regions[s->region].host + s->offset;
}

/* Both inlined: a cursor kept in memory across a call is written field by field
 * and then read whole (the struct copies of net_parse / net_rx_commit); such a
 * load cannot be forwarded from the stores and waits until every older store --
 * the previous frame's copy into lines another CPU holds -- has left the store
 * buffer (measured: most of a 64 B frame's time when those lines are remote). */
static inline __attribute__((always_inline)) void net_cursor_skip(struct net_cursor *c, uint32_t n)
{
    while (n && c->i < c->nsegs) {
        uint32_t left = c->segs[c->i].len - c->off;
        uint32_t k = n < left ? n : left;
        c->off += k;
        n -= k;
        if (c->off == c->segs[c->i].len) {
            c->i++;
            c->off = 0;
        }
    }
}

static inline __attribute__((always_inline)) uint32_t net_cursor_read(struct net_cursor *c,
                                                                      uint8_t *out, uint32_t n)
{
    uint32_t got = 0;
    while (got < n && c->i < c->nsegs) {
        uint32_t left = c->segs[c->i].len - c->off;
        uint32_t k = n - got < left ? n - got : left;
        memcpy(out + got, net_src(c, &c->segs[c->i]) + c->off, k);
        got += k;
        c->off += k;
        if (c->off == c->segs[c->i].len) {
            c->i++;
            c->off = 0;
        }
    }
    return got;
}

/* The parsed transmit chain. */
struct net_frame {
    struct net_cursor body;     /* at the first frame byte */
    uint32_t len;               /* frame bytes */
    uint8_t hdr[NET_HDR_MAX];   /* flags .. csum_offset when read by the cursor */
    const uint8_t *hsrc;        /* the 10 header bytes as read: the batch's copy or hdr */
    /* the frame's first bytes (Ethernet header, VLAN tag): the batch's copy, or ethbuf
     * when read here.  Pointed at, not copied: a copy just stored and then read at
     * other widths (a byte, a MAC address at offset 6) cannot be store-forwarded
     * and waits for every older store (the previous frame's copy into the peer's
     * lines) */
    const uint8_t *eth;
    uint8_t ethbuf[NET_ETH_HLEN + NET_VLAN_HLEN];
    uint32_t flow;              /* net_flow_hash, once flow_valid */
    int flow_valid;
};

/* Give the last k popped chains back to the ring (they were not used: the next
 * pop hands them out again; the driver may not touch them meanwhile, §2.7.13). */
static void net_give_back(struct vq *q, const struct vq_chain *ch, uint32_t k)
{
    if (!k || q->broken)
        return;
    if (q->packed) {
        int32_t back = 0;
        for (uint32_t i = 0; i < k; i++)
            back += ch[i].ndesc;
        int32_t pos = (int32_t)q->next_avail - back;
        uint8_t wrap = q->avail_wrap;
        while (pos < 0) {
            pos += q->size;
            wrap ^= 1;
        }
        q->next_avail = (uint16_t)pos;
        q->avail_wrap = wrap;
    } else {
        q->last_avail_idx = (uint16_t)(q->last_avail_idx - k);
    }
    q->popped -= k;
}

/* Reservation outcomes (net_rx_reserve): written; deferred to Python; no room now
 * (the frame may wait in the hold); frames are held for that ring already (this
 * one goes behind them). */
enum { NET_RX_OK = 1, NET_RX_DEFER = 0, NET_RX_NOROOM = 2, NET_RX_HOLD = 3 };
#define NET_RX_PF_AHEAD 4 /* receive buffers prefetched for writing this far ahead */

/* net_frame_flow's first time for a frame the batch did not hash: out of line, so
 * that the usual call (already hashed) does not pay this one's stack frame. */
static __attribute__((noinline)) uint32_t net_frame_flow_hash(struct net_frame *f)
{
    const struct net_cursor *c = &f->body;
    uint32_t n = f->len < NET_FLOW_BYTES ? f->len : NET_FLOW_BYTES;
    if (c->i < c->nsegs && c->segs[c->i].len - c->off >= n) {
        /* contiguous (the usual case): hashed in place.  The driver may change the
         * bytes meanwhile: it only moves its frame to another queue. */
        f->flow = net_flow_hash(net_src(c, &c->segs[c->i]) + c->off, n);
    } else {
        uint8_t b[NET_FLOW_BYTES];
        struct net_cursor cur = *c;
        net_cursor_read(&cur, b, n);
        f->flow = net_flow_hash(b, n);
    }
    f->flow_valid = 1;
    return f->flow;
}

/* The frame's flow (net_flow_hash): the batch's hash, or computed once. */
static inline uint32_t net_frame_flow(struct net_frame *f)
{
    return __builtin_expect(f->flow_valid, 1) ? f->flow : net_frame_flow_hash(f);
}

/* The ring lock of a receive queue for one reservation.  With `kp` (the
 * transmitting thread's n->kept) the lock stays held for the batch's next frames
 * to the same ring, as the port's mu does (net_deliver_one): one lock per batch
 * instead of one per frame, and chains popped for several frames at once
 * (net_kept_pop).  Released by net_let_go_q (with the port's mu, or before
 * another ring is taken), which first gives the chains not taken back. */
static void net_kept_return(struct net_rxkeep *kp)
{
    if (kp->next < kp->n)
        net_give_back(kp->q, kp->ch + kp->next, kp->n - kp->next);
    kp->n = kp->next = 0;
}

static inline void net_let_go_q(struct net_rxkeep *kp)
{
    if (kp && kp->q) {
        net_kept_return(kp);
        VQ_UNLOCK(kp->q);
        kp->q = NULL;
    }
}

static inline void net_q_take(struct net_rxkeep *kp, struct vq *q)
{
    if (!kp) {
        VQ_LOCK(q);
        return;
    }
    if (kp->q == q)
        return;
    net_let_go_q(kp);
    VQ_LOCK(q);
    kp->q = q;
}

static inline void net_q_put(struct net_rxkeep *kp, struct vq *q)
{
    if (!kp)
        VQ_UNLOCK(q);
}

/* A popped receive chain's first buffer, about to be written (the ring core's
 * prefetch for writing: PREFETCHW). */
static inline void net_prefetchw_chain(const struct vq *q, const struct vq_chain *c,
                                       const struct vq_seg *segs)
{
    const struct vq_seg *s = segs + c->seg_start;
    if (c->nsegs && s->region < q->mem->nregions)
        vq_prefetchw_buffer(&q->mem->regions[s->region], s->offset, s->len);
}

/* The next receive chain of kp's ring (q, lock held) into c and segs (room for
 * max_segs): from the chains popped ahead, popping up to `want` more when none is
 * left.  1, 0 (none posted, or more segments than room: the chain stays popped
 * ahead for the caller's give-back) or a VQ_E_* error (the queue is broken). */
static inline __attribute__((always_inline)) int
net_kept_pop(struct net_rxkeep *kp, struct vq *q, struct vq_chain *c, struct vq_seg *segs,
             uint32_t max_segs, uint32_t want)
{
    if (kp->next == kp->n) {
        kp->n = kp->next = 0;
        if (want > NET_RXC_MAX)
            want = NET_RXC_MAX;
        if (q->inflight)
            want = 1; /* a pop is recorded in the inflight area: none ahead of need */
        int got = vq_pop_batch_u(q, kp->ch, want ? want : 1, kp->segs, NET_RX_MAX_SEGS);
        if (got <= 0)
            return got;
        kp->n = (uint32_t)got;
        for (uint32_t i = 0; i < kp->n && i < NET_RX_PF_AHEAD; i++)
            net_prefetchw_chain(q, &kp->ch[i], kp->segs);
    }
    const struct vq_chain *from = &kp->ch[kp->next];
    if (from->nsegs > max_segs)
        return 0;
    *c = *from;
    if (from->nsegs == 1) /* the usual buffer: no call to memcpy */
        segs[0] = kp->segs[from->seg_start];
    else
        memcpy(segs, kp->segs + from->seg_start, from->nsegs * sizeof *segs);
    kp->next++;
    uint32_t ahead = kp->next + NET_RX_PF_AHEAD - 1;
    if (ahead < kp->n)
        net_prefetchw_chain(q, &kp->ch[ahead], kp->segs);
    else
        vq_prefetch_avail_buffer_u(q, ahead - kp->n);
    return 1;
}

/* Reserve buffers of port p's receive queue rx[qi] for the frame (p->mu held): pop
 * as many chains as it needs (inlined: one call per frame, as before the hold, not
 * two with their prologues).  NET_RX_OK; NET_RX_NOROOM with the ring as it was:
 * fewer buffers posted than the frame needs (it may wait for more in the hold);
 * NET_RX_DEFER with the ring as it was: a buffer the Python path must judge
 * (readable, shorter than the header, too small without MRG_RXBUF, more of them
 * than a reservation holds or the ring has), a ring error (the ring core marked the
 * queue broken), or a queue that is not native now.  Python does not touch the ring
 * while p->mu is held, so the reservation stays valid until net_rx_commit /
 * net_rx_cancel. */
static inline __attribute__((always_inline)) int
net_rx_reserve_q(struct net_port *p, const struct net_frame *f, struct net_resv *r,
                 struct net_rxkeep *kp, uint32_t want, uint32_t qi, uint32_t steered)
{
    struct net_rxq *rq = &p->rx[qi];
    struct vq *q = rq->q;
    uint32_t total = p->hdr_size + f->len, room = 0, nseg = 0;
    int why = NET_RX_DEFER;
    r->k = 0;
    r->qi = qi;
    r->steered = steered;
    if (!q || q->broken) {
        p->rx_deferred++; /* that queue is not native (now): Python */
        return NET_RX_DEFER;
    }
    net_q_take(kp, q);
    if (rq->npend + NET_RX_MAX_BUFS > NET_RX_PEND && net_rxq_publish(p, rq))
        net_rxq_notify(p, rq); /* (the ring's lock is kept for the batch: written under it) */
    while (room < total) {
        if (r->k == NET_RX_MAX_BUFS || r->k >= q->size)
            goto back; /* never enough (Python drops it as too big) */
        struct vq_chain *c = &r->ch[r->k];
        int n = kp ? net_kept_pop(kp, q, c, r->segs + nseg, NET_RX_MAX_SEGS - nseg, want)
                   : vq_pop_batch_u(q, c, 1, r->segs + nseg, NET_RX_MAX_SEGS - nseg);
        if (n == 0 && !(kp && kp->next < kp->n) && !vq_avail_count_u(q))
            why = NET_RX_NOROOM; /* none posted (not a chain of more segments than left) */
        if (n <= 0)
            goto back; /* or an error (the queue is broken now) */
        c->seg_start = nseg;
        nseg += c->nsegs;
        r->k++;
        /* §5.1.6.3.1: receive buffers are device-writable and hold the header */
        if (c->nreadable || c->writable_len < p->hdr_size)
            goto back;
        room += c->writable_len;
        if (!p->mrg_rxbuf)
            break;
    }
    if (room < total)
        goto back;
    /* Buffers are posted: no notification while the driver reposts (§2.7.10 / §2.8.10,
     * as the Python path's _quiet); the Python path asks for one again when the ring
     * runs dry (wait_for_more: enable, re-check, sleep). */
    if (q->notify_enabled)
        vq_disable_notification_u(q);
    if (!kp)
        vq_prefetch_avail_buffer_u(q, NET_RX_PF_AHEAD);
    net_q_put(kp, q);
    return NET_RX_OK;
back:
    if (kp)
        net_kept_return(kp); /* and the chains popped ahead with r's */
    net_give_back(q, r->ch, r->k);
    net_q_put(kp, q);
    r->k = 0;
    if (why == NET_RX_DEFER)
        p->rx_deferred++;
    return why;
}

/* Give a reservation back unused (p->mu held). */
static void net_rx_cancel(struct net_port *p, struct net_resv *r)
{
    struct vq *q = p->rx[r->qi].q;
    if (!r->k || !q)
        return; /* nothing reserved (a port that takes nothing natively: no ring) */
    VQ_LOCK(q);
    net_give_back(q, r->ch, r->k);
    VQ_UNLOCK(q);
    r->k = 0;
}

/* The virtio_net_hdr of a frame spread over k buffers, at dst (hdr_size bytes
 * there): the sender's 10 bytes with fixed-size stores, num_buffers (§5.1.6.4). */
static inline void net_put_hdr(uint8_t *dst, uint32_t hdr_size, const struct net_frame *f,
                               uint32_t k)
{
    memcpy(dst, f->hsrc, 10);
    if (hdr_size == NET_HDR_MAX) {
        dst[10] = (uint8_t)k;
        dst[11] = (uint8_t)(k >> 8);
    }
}

/* A buffer used (len bytes written), its used entry waiting for the publication. */
static inline void net_rx_pend(struct net_rxq *rq, const struct vq_chain *c, uint32_t len)
{
    rq->pend_ids[rq->npend] = c->head;
    rq->pend_ndescs[rq->npend] = c->ndesc;
    rq->pend_lens[rq->npend] = len;
    rq->npend++;
}

/* A frame received natively: the reservation is spent, the port's and the queue's
 * counters. */
static inline void net_rx_count(struct net_port *p, struct net_rxq *rq, const struct net_frame *f,
                                struct net_resv *r)
{
    r->k = 0;
    p->rx_native++;
    p->rx_native_bytes += f->len;
    p->rx_steered += r->steered;
    rq->rx_native++;
    rq->rx_native_bytes += f->len;
}

/* Write the frame into the reserved buffers: the header (num_buffers: §5.1.6.4),
 * then the frame, buffer after buffer, all but the last filled; their used entries
 * wait in the queue's pend for the batch's publication (p->mu held).  Any layout
 * (net_rx_commit takes the usual one itself). */
static __attribute__((noinline)) void net_rx_commit_any(struct net_port *p,
                                                        const struct net_frame *f,
                                                        struct net_resv *r)
{
    struct net_rxq *rq = &p->rx[r->qi];
    struct vq *q = rq->q;
    uint32_t k = r->k, total = p->hdr_size + f->len;
    uint8_t hdr[NET_HDR_MAX];
    struct net_cursor body = f->body;
    /* The usual first buffer holds the whole header: written straight from f->hdr
     * with fixed-size stores (a variable-size copy out of `hdr`, just written byte by
     * byte, reads it back wider than it was stored: not forwardable, so it would
     * wait for every older store, see net_cursor_read). */
    uint32_t hdr_left = p->hdr_size, left = total, pre = 0;
    const struct vq_seg *s0 = k && r->ch[0].nsegs ? &r->segs[r->ch[0].seg_start] : NULL;
    if (s0 && s0->len >= p->hdr_size) {
        net_put_hdr(net_host(q, s0), p->hdr_size, f, k);
        pre = p->hdr_size; /* the first segment's first bytes are written */
        hdr_left = 0;
    } else { /* a header cut across segments: copied piece by piece below */
        memcpy(hdr, f->hsrc, 10);
        hdr[10] = (uint8_t)k;
        hdr[11] = (uint8_t)(k >> 8);
    }
    for (uint32_t b = 0; b < k; b++) {
        const struct vq_chain *c = &r->ch[b];
        uint32_t in_buf = c->writable_len < left ? c->writable_len : left;
        uint32_t want = in_buf;
        for (uint32_t s = c->seg_start; want && s < c->seg_start + c->nsegs; s++) {
            uint8_t *dst = net_host(q, &r->segs[s]);
            uint32_t n = r->segs[s].len < want ? r->segs[s].len : want, done = pre;
            pre = 0;
            if (hdr_left) {
                uint32_t h = hdr_left < n ? hdr_left : n;
                memcpy(dst, hdr + (p->hdr_size - hdr_left), h);
                hdr_left -= h;
                done = h;
            }
            done += net_cursor_read(&body, dst + done, n - done);
            if (q->mem->dirty_log) /* only while migrating: no call per segment */
                vm_log_dirty(q->mem, r->segs[s].gpa, n);
            want -= n;
        }
        net_rx_pend(rq, c, in_buf);
        left -= in_buf;
    }
    net_rx_count(p, rq, f, r);
}

/* net_rx_commit_any, inlined where a frame is delivered for the usual layout: one
 * buffer of one segment that holds header and frame, the frame's bytes in one
 * segment of the sender's -- two copies, no cursor walk, no call. */
static inline __attribute__((always_inline)) void net_rx_commit(struct net_port *p,
                                                                const struct net_frame *f,
                                                                struct net_resv *r)
{
    struct net_rxq *rq = &p->rx[r->qi];
    struct vq *q = rq->q;
    uint32_t total = p->hdr_size + f->len;
    if (__builtin_expect(r->k == 1 && r->ch[0].nsegs == 1 && f->body.i < f->body.nsegs, 1)) {
        const struct vq_seg *s = &r->segs[r->ch[0].seg_start];
        const struct vq_seg *from = &f->body.segs[f->body.i];
        if (s->len >= total && from->len - f->body.off >= f->len) {
            uint8_t *dst = net_host(q, s);
            net_put_hdr(dst, p->hdr_size, f, 1);
            memcpy(dst + p->hdr_size, net_src(&f->body, from) + f->body.off, f->len);
            if (q->mem->dirty_log)
                vm_log_dirty(q->mem, s->gpa, total);
            net_rx_pend(rq, &r->ch[0], total);
            net_rx_count(p, rq, f, r);
            return;
        }
    }
    net_rx_commit_any(p, f, r);
}

/* ---- the hold: frames waiting natively for a ring's buffers ----------------------- */
/* A frame that finds its receive ring short of buffers is copied into the queue's
 * hold (it was the Python path's backlog once: while that held a frame, every later
 * frame for the port went through Python too, to keep their order, and the port
 * ran at Python's pace -- 56 k frames/s -- until the backlog emptied).  Whoever
 * writes the ring next delivers the held frames first, oldest first: the next
 * transmitting thread with a frame for that queue, or Python (its own packets and,
 * told by hold_fd, the hold when no transmitting thread comes: net_dp_before_sleep).
 * Its frames are in one buffer used as a ring: bytes [ent[first].off, wpos) or,
 * wrapped, [ent[first].off, end) and [0, wpos). */
#define NET_HOLD_STALL_S 0.01 /* frames held this long without moving: Python is told */
static double net_now(void);

struct net_hold_ent {
    uint32_t off, len;
    uint8_t hdr[NET_HDR_GATHER]; /* flags .. csum_offset as the sender wrote them */
    uint8_t steered;
};

struct net_hold {
    uint32_t first, wpos;
    struct vm_region region;    /* buf, for a net_cursor */
    struct net_resv resv;       /* Python's reservation (net_hold_drain_locked) */
    struct net_hold_ent ent[NET_HOLD_FRAMES];
    uint8_t buf[NET_HOLD_BYTES];
};

/* Copy the frame into rx[qi]'s hold, behind the others (p->mu held).  0: the hold
 * is full (the frame is dropped, as a full Python backlog drops it). */
static int net_hold_put(struct net_port *p, uint32_t qi, const struct net_frame *f,
                        uint32_t steered)
{
    struct net_rxq *rq = &p->rx[qi];
    struct net_hold *h = rq->hold;
    if (rq->nheld >= (p->hold_limit < NET_HOLD_FRAMES ? p->hold_limit : NET_HOLD_FRAMES) ||
        f->len > NET_HOLD_BYTES)
        return 0;
    if (!h) {
        h = malloc(sizeof *h);
        if (!h)
            return 0;
        h->region = (struct vm_region){0, NET_HOLD_BYTES, h->buf};
        rq->hold = h;
        rq->nheld = 0;
    }
    uint32_t off, len = f->len;
    if (!rq->nheld) {
        h->first = 0;
        off = 0;
        rq->hold_stamp = net_now();
    } else {
        uint32_t rpos = h->ent[h->first].off;
        if (h->wpos > rpos) { /* not wrapped: room at the end, or before rpos */
            if (NET_HOLD_BYTES - h->wpos >= len)
                off = h->wpos;
            else if (rpos > len)
                off = 0;
            else
                return 0;
        } else if (rpos - h->wpos > len) { /* wrapped: between the newest and oldest */
            off = h->wpos;
        } else {
            return 0;
        }
    }
    struct net_cursor body = f->body;
    net_cursor_read(&body, h->buf + off, len);
    struct net_hold_ent *e = &h->ent[(h->first + rq->nheld) % NET_HOLD_FRAMES];
    e->off = off;
    e->len = len;
    e->steered = (uint8_t)steered;
    memcpy(e->hdr, f->hsrc, NET_HDR_GATHER);
    h->wpos = off + len;
    rq->nheld++;
    rq->rx_held++;
    p->rx_held++;
    return 1;
}

/* The oldest held frame of rq as a frame to deliver (its body in `seg`). */
static void net_hold_head(struct net_rxq *rq, struct net_frame *f, struct vq_seg *seg,
                          uint32_t *steered)
{
    struct net_hold *h = rq->hold;
    const struct net_hold_ent *e = &h->ent[h->first];
    *seg = (struct vq_seg){0, e->off, e->len, 0, 0};
    f->body = (struct net_cursor){&h->region, seg, 1, 0, 0};
    f->len = e->len;
    f->hsrc = e->hdr;
    f->eth = h->buf + e->off;
    f->flow = 0;
    f->flow_valid = 1; /* its queue is chosen */
    *steered = e->steered;
}

static void net_hold_drop_head(struct net_rxq *rq)
{
    rq->hold->first = (rq->hold->first + 1) % NET_HOLD_FRAMES;
    rq->nheld--;
}

/* Deliver rx[qi]'s held frames, oldest first, while the ring has room for them
 * (p->mu held; r is scratch).  NET_HOLD_EMPTY, NET_HOLD_WAIT (the ring is short of
 * buffers) or NET_HOLD_PYTHON (the oldest needs the Python path: a buffer it must
 * judge, net_rx_reserve_q's NET_RX_DEFER). */
static int net_hold_drain(struct net_port *p, uint32_t qi, struct net_resv *r,
                          struct net_rxkeep *kp, uint32_t want)
{
    struct net_rxq *rq = &p->rx[qi];
    int s = NET_RX_OK, moved = 0;
    while (rq->nheld) {
        struct net_frame f;
        struct vq_seg seg;
        uint32_t steered;
        net_hold_head(rq, &f, &seg, &steered);
        s = net_rx_reserve_q(p, &f, r, kp, want + rq->nheld, qi, steered);
        if (s != NET_RX_OK)
            break;
        net_rx_commit(p, &f, r);
        net_hold_drop_head(rq);
        moved = 1;
        if (kp)
            rq->hold_served++;
    }
    if (moved && rq->nheld)
        rq->hold_stamp = net_now();
    if (!rq->nheld)
        return NET_HOLD_EMPTY;
    return s == NET_RX_NOROOM ? NET_HOLD_WAIT : NET_HOLD_PYTHON;
}

/* Python's turn at receive queue k's hold (it holds p->mu: net_port_lock):
 * deliver what the ring has room for and publish it.  NET_HOLD_*; with
 * NET_HOLD_PYTHON Python takes the oldest frame (net_hold_peek, net_hold_pop). */
int net_hold_drain_locked(struct net_port *p, uint32_t k)
{
    if (k >= NET_RXQ_MAX)
        return NET_HOLD_EMPTY;
    struct net_rxq *rq = &p->rx[k];
    rq->hold_sleeping = 0;
    int h = NET_HOLD_EMPTY;
    if (rq->nheld) {
        h = net_hold_drain(p, k, &rq->hold->resv, NULL, 1);
        net_rxq_flush(p, rq);
    }
    if (h == NET_HOLD_EMPTY)
        rq->hold_told = 0; /* the next frame held is told anew */
    return h;
}

/* Python waited for receive queue k's driver and was woken by it, not told: it
 * leaves the hold to the transmitting threads (1) when they delivered from it
 * meanwhile (hold_served moved from `served`) and none went to sleep leaving
 * frames there -- they tell it again when they do -- or the hold is empty; else 0:
 * it goes on (p->mu held). */
int net_hold_step_back(struct net_port *p, uint32_t k, uint64_t served)
{
    if (k >= NET_RXQ_MAX)
        return 1;
    struct net_rxq *rq = &p->rx[k];
    if (rq->nheld && (rq->hold_served == served || rq->hold_sleeping))
        return 0;
    rq->hold_told = 0;
    return 1;
}

/* The oldest held frame of receive queue k (p->mu held): its 10 header bytes into
 * hdr, its length into *len, and where its bytes are (valid while p->mu is held and
 * until net_hold_pop); NULL when none is held. */
const uint8_t *net_hold_peek(struct net_port *p, uint32_t k, uint8_t *hdr, uint32_t *len)
{
    if (k >= NET_RXQ_MAX || !p->rx[k].nheld)
        return NULL;
    struct net_hold *h = p->rx[k].hold;
    const struct net_hold_ent *e = &h->ent[h->first];
    memcpy(hdr, e->hdr, NET_HDR_GATHER);
    *len = e->len;
    return h->buf + e->off;
}

/* Python delivered (or dropped) the oldest held frame of receive queue k. */
void net_hold_pop(struct net_port *p, uint32_t k)
{
    if (k < NET_RXQ_MAX && p->rx[k].nheld)
        net_hold_drop_head(&p->rx[k]);
}

/* Python is about to sleep until receive queue k's driver posts buffers (p->mu held,
 * so no transmitting thread pops meanwhile): notifications on, asked for past the
 * chains posted now (§2.7.10 avail_event / §2.8.10: a held frame may need more
 * buffers than those).  1: more were posted meanwhile (no sleep). */
int net_hold_arm_locked(struct net_port *p, uint32_t k)
{
    struct vq *q = k < NET_RXQ_MAX ? p->rx[k].q : NULL;
    if (!q)
        return 0;
    VQ_LOCK(q);
    uint32_t now = vq_avail_chains_u(q, q->size);
    vq_enable_notification_u(q, now);
    int more = vq_avail_chains_u(q, now + 1) > now;
    VQ_UNLOCK(q);
    return more;
}

/* Tell Python to look at rx[qi]'s hold (hold_fd). */
static void net_hold_tell(struct net_rxq *rq)
{
    if (rq->hold_fd >= 0) {
        uint64_t one = 1;
        ssize_t w = write(rq->hold_fd, &one, sizeof one);
        (void)w;
    }
}

/* Reserve receive buffers of port p for a new frame (p->mu held): in the queue its
 * flow goes to (net_rx_pick), behind any frames held for it.  With `kp` (a
 * transmitting thread) the held frames are delivered first where the ring has room;
 * NET_RX_HOLD when some remain (the frame goes behind them), and Python is told
 * when the oldest needs it.  Else as net_rx_reserve_q. */
static inline __attribute__((always_inline)) int
net_rx_reserve(struct net_port *p, struct net_frame *f, struct net_resv *r, struct net_rxkeep *kp,
               uint32_t want)
{
    uint32_t nq = p->nrxq < NET_RXQ_MAX ? p->nrxq : NET_RXQ_MAX;
    uint32_t steered = 0;
    uint32_t qi = nq > 1 ? net_rx_pick(p, net_frame_flow(f), nq, &steered) : 0;
    struct net_rxq *rq = &p->rx[qi];
    if (__builtin_expect(rq->nheld != 0, 0)) {
        int h = kp ? net_hold_drain(p, qi, r, kp, want) : NET_HOLD_WAIT;
        if (h != NET_HOLD_EMPTY) {
            if (h == NET_HOLD_PYTHON && !rq->hold_told) {
                rq->hold_told = 1;
                net_hold_tell(rq);
            }
            r->k = 0;
            r->qi = qi;
            r->steered = steered;
            return NET_RX_HOLD;
        }
    }
    return net_rx_reserve_q(p, f, r, kp, want, qi, steered);
}

/* ---- the transmit fast path ------------------------------------------------------- */
static inline uint16_t net_le16(const uint8_t *b) { return (uint16_t)(b[0] | b[1] << 8); }

/* Whether port p would take this frame natively were nothing held for it: its
 * receive path is native and nothing in the frame needs Python (p->mu held). */
static inline __attribute__((always_inline)) int
net_port_accepts(const struct net_port *p, const struct net_frame *f)
{
    if (!p->native || p->link_down || !p->nrxq)
        return 0;
    if ((f->hsrc[0] & NET_HDR_F_NEEDS_CSUM) && !p->guest_csum)
        return 0; /* checksum completion: switch.py / offload.py */
    if (p->vlan_filter && f->len >= NET_ETH_HLEN + 2 &&
        ((uint32_t)f->eth[12] << 8 | f->eth[13]) == NET_ETH_P_8021Q)
        return 0; /* the VLAN filter: VirtioNet._accepts */
    return 1;
}

/* Whether port p takes this frame natively (p->mu held): not while the Python path
 * holds packets for it (a frame never overtakes that backlog). */
static inline __attribute__((always_inline)) int
net_port_takes(const struct net_port *p, const struct net_frame *f)
{
    return p->held <= 0 && net_port_accepts(p, f);
}

/* Whether the frame is one VirtioNet.deliver would drop as "backlog_full": held
 * packets, and the receive queue the frame goes to marked full (p->mu held).
 * Dropped here and counted as Python counts it: handing each such frame to Python
 * only to be dropped kept the Python thread busy with frames it could not deliver,
 * while the backlog it had to deliver waited. */
static int net_port_drops(struct net_port *p, struct net_frame *f)
{
    if (p->held <= 0 || !net_port_accepts(p, f))
        return 0;
    uint32_t nq = p->nrxq < NET_RXQ_MAX ? p->nrxq : NET_RXQ_MAX, steered = 0;
    uint32_t qi = nq > 1 ? net_rx_pick(p, net_frame_flow(f), nq, &steered) : 0;
    return __atomic_load_n(&p->rx[qi].backlog_full, __ATOMIC_RELAXED) != 0;
}

static double net_now(void)
{
    struct timespec ts;
    /* Python's time.monotonic() clock, read at its tick (a few ms): learning and
     * ageing count seconds, and the precise read was 3 % of the backend's CPU here
     * (once per transmit batch). */
    clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* Start fetching the frame's first bytes (NET_PF_BODY) while the decision and the
 * reservation run: the copy then starts in cache, and the CPU's own prefetcher
 * follows the copy's stream for the rest.  (Up to 4 KiB asked for here, a 1518 B
 * frame's 24 prefetches waited for free miss buffers: 7 % of the backend's
 * samples at 2 queue pairs.)  The first line is being read already (the Ethernet
 * header), so from the next one on.  `c` is the
 * parse's local cursor: read back from the frame struct just written, its fields
 * would wait for the stores (see net_cursor_read). */
#define NET_PF_BODY 256
static inline __attribute__((always_inline)) void net_prefetch_body(const struct net_cursor *c,
                                                                    uint32_t len)
{
    if (len <= 64)
        return; /* a line or two, the first of them being read */
    uint32_t left = len < NET_PF_BODY ? len : NET_PF_BODY, off = c->off;
    uintptr_t skip = 0; /* the first byte's line, skipped */
    for (uint32_t i = c->i; left && i < c->nsegs; i++, off = 0) {
        const uint8_t *b = net_src(c, &c->segs[i]) + off;
        uint32_t n = c->segs[i].len - off < left ? c->segs[i].len - off : left;
        if (!skip)
            skip = ((uintptr_t)b | 63) + 1;
        for (uintptr_t a = (uintptr_t)b & ~(uintptr_t)63; a < (uintptr_t)b + n; a += 64)
            if (a >= skip)
                __builtin_prefetch((const void *)a, 0, 3);
        left -= n;
    }
}

/* Parse and check a transmitted chain as VirtioNet._transmit and check_transmit
 * would; 1 when it is the plain case served here.  The checks read the header's
 * fields from where they came from (the batch's copy, or bytes the cursor read),
 * never back from f->hdr just stored. */
static int net_parse(struct net_dp *n, const struct vq_chain *c, const struct vq_seg *segs,
                     struct net_frame *f, int got, const uint8_t *ghdr, const uint8_t *geth)
{
    uint32_t hs = n->hdr_size;
    if (c->nreadable != c->nsegs || c->readable_len < hs + NET_ETH_HLEN ||
        c->readable_len > hs + n->mtu + NET_ETH_HLEN + NET_VLAN_HLEN) {
        n->py_malformed++; /* runt, oversized, writable parts: Python judges */
        return 0;
    }
    f->len = c->readable_len - hs;
    struct net_cursor cur = {n->core.q->mem->regions, segs, c->nsegs, 0, 0};
    const uint8_t *h; /* flags .. csum_offset as read */
    if ((got & NET_GOT_HDR) && hs >= NET_HDR_GATHER) {
        h = ghdr; /* read in net_dp_batch_begin (stays put for this serve) */
        net_cursor_skip(&cur, hs);
    } else { /* (the rare path: a header cut across descriptors) */
        memset(f->hdr, 0, sizeof f->hdr);
        net_cursor_read(&cur, f->hdr, hs < 10 ? hs : 10);
        net_cursor_skip(&cur, hs > 10 ? hs - 10 : 0); /* the sender's num_buffers */
        h = f->hdr;
    }
    f->hsrc = h;
    f->body = cur;
    f->flow_valid = 0;
    if (got & NET_GOT_FLOW) { /* hashed in net_dp_batch_begin */
        f->flow = n->bflow[c - n->batch_first];
        f->flow_valid = 1;
    }
    net_prefetch_body(&cur, f->len);
    _Static_assert(sizeof f->ethbuf == NET_ETH_GATHER, "the gathered Ethernet header");
    if ((got & NET_GOT_ETH) && f->len >= sizeof f->ethbuf) {
        f->eth = geth; /* read in net_dp_batch_begin (stays put for this serve) */
    } else {
        uint32_t k = f->len < sizeof f->ethbuf ? f->len : (uint32_t)sizeof f->ethbuf;
        memset(f->ethbuf, 0, sizeof f->ethbuf);
        net_cursor_read(&cur, f->ethbuf, k);
        f->eth = f->ethbuf;
    }
    uint8_t flags = h[0], gso_type = h[1];
    if (gso_type != 0 || (flags & ~NET_HDR_F_NEEDS_CSUM)) {
        n->py_offload++; /* GSO (segmentation), DATA_VALID or unknown flags */
        return 0;
    }
    if (flags & NET_HDR_F_NEEDS_CSUM) {
        uint32_t start = net_le16(h + 6), off = net_le16(h + 8);
        if (!n->csum || start >= f->len || start + off + 2 > f->len) {
            n->py_malformed++; /* refused by check_transmit: counted there */
            return 0;
        }
    }
    return 1;
}

/* Count a hairpin as fdb_decide would have and learn its source; database lock
 * held. */
static void net_count_hairpin(struct vm_net_fdb *t, uint32_t src, const struct net_frame *f,
                              double now)
{
    struct vm_net_port_counters *c = &t->ports[src % NET_FDB_MAX_PORTS];
    c->in_packets++;
    c->in_bytes += f->len;
    fdb_learn(t, f->eth + 6, src, now);
    c->dropped_hairpin++;
}

static inline int net_dp_python_behind(const struct net_dp *n);
static inline void net_dp_keep_order(struct net_dp *n);

/* Where a frame goes: a port, -1 (flood) or the source itself (hairpin), as
 * fdb_decide would decide it, learning the source first (switch.py's order).
 * Within a batch `now` is one instant, so learning the same source again changes
 * nothing but its place in the learning order: it is learned once per batch (and
 * on every change of source), and the last decision is reused for the next frame
 * to the same destination.  A concurrent change by another port's thread is seen
 * at the next batch (as if it had happened a few frames later); a learning by
 * this thread drops the cached decision.  A frame deferred to Python afterwards
 * is learned there again (the same port: no change). */
static int64_t net_decide(struct net_dp *n, const struct net_frame *f)
{
    static const uint8_t zero[6];
    const uint8_t *src = f->eth + 6;
    int learn = !(src[0] & 1) && memcmp(src, zero, 6) != 0 &&
                !(n->learned_valid && memcmp(n->learned_src, src, 6) == 0);
    if (f->eth[0] & 1) { /* a group address: flooded (no lookup) */
        if (!learn)
            return -1;
    } else if (memcmp(f->eth, src, 6) == 0 && memcmp(f->eth, zero, 6) != 0) {
        return n->src; /* to its own source: a hairpin (net_count_hairpin learns) */
    } else if (!learn && n->cache_valid && memcmp(n->cache_dst, f->eth, 6) == 0) {
        return n->cache_target;
    }
    if (learn)
        net_dp_keep_order(n);
    struct vm_net_fdb *t = n->fdb;
    int64_t target = -1;
    fdb_lock(t);
    n->fdb_locks++;
    if (learn)
        fdb_learn(t, src, n->src, n->now);
    if (!(f->eth[0] & 1))
        target = fdb_lookup(t, f->eth, n->now);
    fdb_unlock(t);
    if (learn) {
        memcpy(n->learned_src, src, 6);
        n->learned_valid = 1;
        n->cache_valid = 0;
    }
    if (!(f->eth[0] & 1)) {
        memcpy(n->cache_dst, f->eth, 6);
        n->cache_target = (int32_t)target;
        n->cache_valid = 1;
    }
    return target;
}

/* Let go of the destination port kept locked between packets (writes stay
 * pending: net_dp_batch_end publishes them). */
static void net_unstick(struct net_dp *n)
{
    net_let_go_q(&n->kept);
    if (n->sticky) {
        pthread_mutex_unlock(NET_PORT_MU(n->sticky_port));
        n->sticky = 0;
        n->sticky_port = NULL;
    }
}

/* Frames leave a transmit queue in the order they came, as a switch keeps a port's
 * frames in order (a TCP flow mixing frames Python must segment or complete with
 * plain ones would otherwise arrive reordered): a frame handed to Python is
 * switched there, so one served here after it waits until Python has finished
 * every chain handed over before it (dp.deferred_done): before it is delivered,
 * and before its source is learned (net_decide, a hairpin), so that the switch
 * judges each frame on what the frames before it taught it.  Nothing stays locked
 * meanwhile (Python writes those ports; its entry publishes what this thread wrote
 * so far first, net_port_lock).  A frame waits NET_ORDER_WAIT_S at most (a Python
 * path stuck for that long is not waited for). */
#define NET_ORDER_WAIT_S 0.05
static inline int net_dp_python_behind(const struct net_dp *n)
{
    return n->core.deferred != __atomic_load_n(&n->core.deferred_done, __ATOMIC_ACQUIRE);
}

static __attribute__((noinline)) void net_dp_wait_python(struct net_dp *n)
{
    net_unstick(n);
    double until = net_now() + NET_ORDER_WAIT_S;
    n->order_waits++;
    while (net_dp_python_behind(n) && !__atomic_load_n(&n->core.stop, __ATOMIC_ACQUIRE)) {
        if (net_now() > until) {
            n->order_late++;
            break;
        }
        struct timespec ts = {0, 20000};
        nanosleep(&ts, NULL);
    }
}

/* net_dp_wait_python if Python has chains this queue handed over before. */
static inline void net_dp_keep_order(struct net_dp *n)
{
    if (__builtin_expect(net_dp_python_behind(n), 0))
        net_dp_wait_python(n);
}

/* This thread left frames held for port idx (net_dp_tell_holds). */
static void net_dp_note_holding(struct net_dp *n, uint32_t idx)
{
    if (!n->holding[idx]) {
        n->holding[idx] = 1;
        n->nholding++;
    }
}

/* Deliver the frame to the one port `idx` (p): 1 written, 3 held (it waits in the
 * queue's hold for buffers), 2 dropped (the backlog or hold is full), 0 the port
 * does not take it natively, -1 its buffers need the Python path.  p's mu is kept (n->sticky) for the batch's next
 * frames; any other port's is released first (one port locked at a time, so the
 * ascending order of floods is never violated). */
static int net_deliver_one(struct net_dp *n, uint32_t idx, struct net_port *p,
                           const struct net_frame *f)
{
    if (n->sticky != idx + 1 || n->sticky_port != p) {
        net_unstick(n);
        pthread_mutex_lock(NET_PORT_MU(p));
        n->sticky = idx + 1;
        n->sticky_port = p;
    }
    n->touched[idx] = 1;
    if (__builtin_expect(net_dp_python_behind(n), 0) && net_port_takes(p, f)) {
        net_dp_wait_python(n); /* (let go of p meanwhile) */
        pthread_mutex_lock(NET_PORT_MU(p));
        n->sticky = idx + 1;
        n->sticky_port = p;
    }
    if (!net_port_takes(p, f)) {
        if (!net_port_drops(p, (struct net_frame *)f))
            return 0;
        p->rx_backlog_full++;
        return 2;
    }
    struct net_resv *r = &n->resv[0];
    int s = net_rx_reserve(p, (struct net_frame *)f, r, &n->kept, n->rx_want);
    if (__builtin_expect(s == NET_RX_OK, 1)) {
        net_rx_commit(p, f, r);
        return 1;
    }
    if (s == NET_RX_DEFER)
        return -1;
    /* no room now, or frames held already: it waits (in order) in the hold */
    if (!net_hold_put(p, r->qi, f, r->steered)) {
        p->rx_backlog_full++;
        return 2;
    }
    net_dp_note_holding(n, idx);
    return 3;
}

/* A popped batch: read the first NET_HDR_GATHER bytes of every chain's header
 * now, in one tight loop.  Those lines were written by the driver on another CPU;
 * read one per serve, each miss stalled that serve (prefetching them a few chains
 * ahead did not hide it: docs/benchmarks.md), while here the loads are independent
 * and their misses overlap.  net_parse then takes the copy (the driver may not
 * change a buffer it made available, §2.7.13 / §2.8.21; if it does, the frame is
 * judged on this one reading, as with any other). */
static void net_dp_batch_begin(void *dev, const struct vq_chain *c, uint32_t k,
                               const struct vq_seg *segs)
{
    struct net_dp *n = dev;
    const struct vm_mem *m = n->core.q->mem;
    n->batch_first = c;
    n->batch_n = k;
    uint32_t hs = n->hdr_size;
    /* First every chain's first line asked for (a prefetch retires at once, so all
     * of the batch's misses are in flight together), then the copies. */
    for (uint32_t i = 0; i < k; i++) {
        const struct vq_seg *s = segs + c[i].seg_start;
        if (c[i].nreadable && s->region < m->nregions) {
            const uint8_t *b = m->regions[s->region].host + s->offset;
            __builtin_prefetch(b, 0, 3);
            if (s->len > hs)
                __builtin_prefetch(b + hs, 0, 3); /* the frame's first line */
        }
    }
    /* The flows, where queue pairs make them matter (a port sending on several
     * pairs: steering notes every frame's flow, and its peers pick their receive
     * queue by it): hashed here, in one pass, from frames in one segment with
     * their header (net_frame_flow's contiguous case). */
    struct net_port *self = n->src < NET_FDB_MAX_PORTS ? n->ports[n->src] : NULL;
    int flows = self && __atomic_load_n(&self->steer_pairs, __ATOMIC_RELAXED) > 1;
    for (uint32_t i = 0; i < k; i++) {
        const struct vq_seg *s = segs + c[i].seg_start;
        /* readable segments come first (§2.7.4.2 / §2.8.8.2): the header's start,
         * then the frame's, in the same segment or (a header of its own) the next */
        uint8_t got = 0;
        if (c[i].nreadable && s->len >= hs && hs >= NET_HDR_GATHER && s->region < m->nregions) {
            const uint8_t *b = m->regions[s->region].host + s->offset;
            memcpy(n->bhdr[i], b, NET_HDR_GATHER);
            got = NET_GOT_HDR;
            if (s->len >= hs + NET_ETH_GATHER) {
                memcpy(n->beth[i], b + hs, NET_ETH_GATHER);
                got |= NET_GOT_ETH;
            } else if (s->len == hs && c[i].nreadable > 1 && s[1].len >= NET_ETH_GATHER &&
                       s[1].region < m->nregions) {
                memcpy(n->beth[i], m->regions[s[1].region].host + s[1].offset, NET_ETH_GATHER);
                got |= NET_GOT_ETH;
            }
        }
        if (flows && (got & NET_GOT_ETH) && c[i].readable_len > hs) {
            uint32_t len = c[i].readable_len - hs;
            uint32_t fl = len < NET_FLOW_BYTES ? len : NET_FLOW_BYTES;
            if (s->len >= hs + fl) {
                n->bflow[i] = net_flow_hash_memo(&n->flow_memo,
                                                 m->regions[s->region].host + s->offset + hs, fl);
                got |= NET_GOT_FLOW;
            }
        }
        n->bhdr_ok[i] = got;
    }
}

static uint32_t net_dp_serve(void *dev, const struct vq_chain *c, const struct vq_seg *segs,
                             int *err)
{
    struct net_dp *n = dev;
    struct net_frame f;
    const uint8_t *ghdr = NULL, *geth = NULL;
    int got = 0;
    *err = 0;
    if (n->batch_first && c >= n->batch_first && c < n->batch_first + n->batch_n) {
        uint32_t i = (uint32_t)(c - n->batch_first);
        got = n->bhdr_ok[i];
        ghdr = n->bhdr[i];
        geth = n->beth[i];
        n->rx_want = n->batch_n - i;
    } else {
        n->rx_want = 1;
    }
    struct net_port *self = n->src < NET_FDB_MAX_PORTS ? n->ports[n->src] : NULL;
    if (self && __atomic_load_n(&self->link_down, __ATOMIC_RELAXED))
        goto defer; /* the link is down: VirtioNet._transmit drops it */
    if (!net_parse(n, c, segs, &f, got, ghdr, geth))
        goto defer;
    if (self && __atomic_load_n(&self->steer_pairs, __ATOMIC_RELAXED) > 1)
        net_steer_note(self, net_frame_flow(&f), n->pair); /* §5.1.9.5.6 */
    if (!n->now_valid) { /* once per batch: ageing is counted in seconds */
        n->now = net_now();
        n->now_valid = 1;
    }
    /* Where it goes (net_decide); counted once the packet is known to be served
     * here, in the batch's totals (net_dp_batch_end adds them to the database's
     * counters before the batch's frames are published): what was decided is
     * what is counted. */
    int64_t target = net_decide(n, &f);
    if (target == (int64_t)n->src) {
        net_dp_keep_order(n); /* it learns its source */
        fdb_lock(n->fdb);
        n->fdb_locks++;
        net_count_hairpin(n->fdb, n->src, &f, n->now);
        fdb_unlock(n->fdb);
        n->cache_valid = 0; /* it learned */
        n->tx_hairpin++;
        return DP_USED_ZERO;
    }
    /* The ports it goes to: the target, or every other port (flood). */
    uint32_t single = NET_FDB_MAX_PORTS, nother = 0;
    uint32_t nports = NET_FDB_MAX_PORTS;
    if (target >= 0) {
        if (target < NET_FDB_MAX_PORTS && n->ports[target]) {
            single = (uint32_t)target;
            nother = 1;
        }
    } else if (n->flood_valid) { /* the batch's earlier flood looked already */
        single = n->flood_single;
        nother = n->flood_n;
        nports = n->flood_nports;
    } else {
        nports = n->nports ? __atomic_load_n(n->nports, __ATOMIC_ACQUIRE) : NET_FDB_MAX_PORTS;
        if (nports > NET_FDB_MAX_PORTS)
            nports = NET_FDB_MAX_PORTS;
        for (uint32_t i = 0; i < nports && nother < 2; i++)
            if (i != n->src && n->ports[i]) {
                single = i;
                nother++;
            }
        /* within a batch the ports are taken as they were at its first flood (a port
         * attached meanwhile is flooded from the next batch on, as net_decide's
         * cache sees a change then) */
        n->flood_single = single;
        n->flood_n = (uint8_t)nother;
        n->flood_nports = nports;
        n->flood_valid = 1;
    }
    if (nother == 0 && target >= 0) {
        n->py_port++; /* no such port (any more): Python decides */
        goto defer;
    }
    struct net_port *one = nother == 1 ? n->ports[single] : NULL;
    if (nother == 1 && !one) {
        n->py_port++; /* detached since the batch looked: Python decides */
        goto defer;
    }
    if (nother == 1) {
        int ok = net_deliver_one(n, single, one, &f);
        if (ok <= 0) {
            if (ok < 0)
                n->py_no_room++;
            else
                n->py_port++;
            goto defer;
        }
        if (ok == 2) {
            n->acc_no_room[single]++; /* the switch's dropped_no_room, as _deliver's */
        } else {
            if (__builtin_expect(ok == 3, 0))
                n->tx_held++;
            n->acc_out[single]++;
            n->acc_out_bytes[single] += f.len;
        }
    } else if (nother > 1) {
        /* a flood to several ports: every one native (else Python floods it):
         * buffers reserved in every one with room, ports locked in ascending order,
         * before anything is written; where a ring has no room now (or frames held
         * already), the frame goes into that queue's hold */
        net_dp_keep_order(n);
        net_unstick(n);
        struct net_port *held[NET_FLOOD_MAX];
        uint8_t wait[NET_FLOOD_MAX]; /* 1: into the hold; 2: dropped (hold full) */
        uint32_t nheld = 0, failed = 0;
        for (uint32_t i = 0; i < nports && !failed; i++) {
            struct net_port *p = n->ports[i];
            if (i == n->src || !p)
                continue;
            if (nheld == NET_FLOOD_MAX) {
                failed = 1; /* more ports than reservations: Python floods */
                n->py_port++;
                break;
            }
            pthread_mutex_lock(NET_PORT_MU(p));
            held[nheld] = p;
            n->resv_port[nheld] = i;
            n->resv[nheld].k = 0;
            wait[nheld] = 0;
            nheld++;
            if (!net_port_takes(p, &f)) {
                failed = 1;
                n->py_port++;
            } else {
                int r = net_rx_reserve(p, &f, &n->resv[nheld - 1], NULL, 1);
                wait[nheld - 1] = r == NET_RX_NOROOM || r == NET_RX_HOLD;
                if (r == NET_RX_DEFER) {
                    failed = 1;
                    n->py_no_room++;
                }
            }
        }
        for (uint32_t j = nheld; j-- > 0;) {
            struct net_resv *r = &n->resv[j];
            if (failed) {
                net_rx_cancel(held[j], r);
            } else if (!wait[j]) {
                net_rx_commit(held[j], &f, r);
            } else if (net_hold_put(held[j], r->qi, &f, r->steered)) {
                net_dp_note_holding(n, n->resv_port[j]);
                n->tx_held++;
            } else {
                held[j]->rx_backlog_full++;
                wait[j] = 2;
            }
            n->touched[n->resv_port[j]] = 1;
            pthread_mutex_unlock(NET_PORT_MU(held[j]));
        }
        if (failed)
            goto defer;
        for (uint32_t j = 0; j < nheld; j++) {
            if (wait[j] == 2) {
                n->acc_no_room[n->resv_port[j]]++;
                continue;
            }
            n->acc_out[n->resv_port[j]]++;
            n->acc_out_bytes[n->resv_port[j]] += f.len;
        }
    }
    /* (a flood with no other port: delivered nowhere, as switch.py's) */
    n->acc_in++;
    n->acc_in_bytes += f.len;
    if (target < 0) {
        n->acc_flooded++;
        n->tx_flooded++;
    }
    n->tx_native++;
    n->tx_native_bytes += f.len;
    return DP_USED_ZERO;
defer:
    net_unstick(n); /* Python may write that port while it serves this chain */
    return 0;
}

/* Whether any receive queue of p holds frames (read without p->mu: a hint, the
 * caller looks again under it where it matters). */
static int net_port_holds(struct net_port *p)
{
    for (uint32_t k = 0; k < NET_RXQ_MAX; k++)
        if (__atomic_load_n(&p->rx[k].nheld, __ATOMIC_RELAXED))
            return 1;
    return 0;
}

/* Python is told (hold_fd, once until it looks: hold_told) of the holds of the
 * ports this thread left frames held for, when nobody else may deliver them:
 * `sleeping` -- this thread is about to sleep (noted in hold_sleeping: Python does
 * not step back then, net_hold_step_back) -- or a hold has not moved for
 * NET_HOLD_STALL_S (after a batch: this thread may go on sending elsewhere for a
 * long time).  While the holds move, Python is not woken.  Ports whose holds are
 * empty are forgotten (a frame held again notes them again). */
static void net_dp_tell_holds(struct net_dp *n, int sleeping)
{
    double now = 0;
    for (uint32_t i = 0; i < NET_FDB_MAX_PORTS && n->nholding; i++) {
        if (!n->holding[i])
            continue;
        struct net_port *p = __atomic_load_n(&n->ports[i], __ATOMIC_ACQUIRE);
        if (!p || !net_port_holds(p)) {
            n->holding[i] = 0;
            n->nholding--;
            continue;
        }
        if (!sleeping && !now)
            now = net_now();
        pthread_mutex_lock(NET_PORT_MU(p));
        for (uint32_t k = 0; k < NET_RXQ_MAX; k++) {
            struct net_rxq *rq = &p->rx[k];
            if (!rq->nheld)
                continue;
            if (sleeping)
                rq->hold_sleeping = 1;
            if (!rq->hold_told && (sleeping || now - rq->hold_stamp > NET_HOLD_STALL_S)) {
                rq->hold_told = 1;
                net_hold_tell(rq);
            }
        }
        pthread_mutex_unlock(NET_PORT_MU(p));
    }
}

/* End of a transmit batch: the batch's switch counters into the database, then one
 * publication per destination ring written. */
static void net_dp_batch_end(void *dev)
{
    struct net_dp *n = dev;
    if (n->acc_in) {
        struct vm_net_fdb *t = n->fdb;
        fdb_lock(t);
        n->fdb_locks++;
        struct vm_net_port_counters *c = &t->ports[n->src % NET_FDB_MAX_PORTS];
        c->in_packets += n->acc_in;
        c->in_bytes += n->acc_in_bytes;
        c->flooded += n->acc_flooded;
        for (uint32_t i = 0; i < NET_FDB_MAX_PORTS; i++) {
            if (n->acc_out[i]) {
                t->ports[i].out_packets += n->acc_out[i];
                t->ports[i].out_bytes += n->acc_out_bytes[i];
                n->acc_out[i] = n->acc_out_bytes[i] = 0;
            }
            if (n->acc_no_room[i]) {
                t->ports[i].dropped_no_room += n->acc_no_room[i];
                n->acc_no_room[i] = 0;
            }
        }
        fdb_unlock(t);
        n->acc_in = n->acc_in_bytes = n->acc_flooded = 0;
    }
    n->now_valid = 0;
    n->batch_first = NULL;
    n->cache_valid = 0;
    n->learned_valid = 0;
    n->flood_valid = 0;
    for (uint32_t i = 0; i < NET_FDB_MAX_PORTS; i++) {
        struct net_port *p = n->touched[i] ? n->ports[i] : NULL;
        n->touched[i] = 0;
        if (!p || p == n->sticky_port)
            continue;
        pthread_mutex_lock(NET_PORT_MU(p));
        net_port_flush(p);
        pthread_mutex_unlock(NET_PORT_MU(p));
    }
    if (n->sticky) {
        net_let_go_q(&n->kept); /* the flush locks the ring itself */
        net_port_flush(n->sticky_port);
        net_unstick(n);
    }
    if (n->nholding)
        net_dp_tell_holds(n, 0);
}

/* ---- waiting ------------------------------------------------------------------ */
/* dp.before_sleep (and the waits of net_dp_wait / net_group_wait). */
static void net_dp_before_sleep(void *dev)
{
    net_dp_tell_holds(dev, 1);
}

static int net_dp_watch(void *dev, int kick, int wake)
{
    struct net_dp *n = dev;
    n->watch_kick = kick;
    n->watch_wake = wake;
    return 0;
}

/* ---- one thread for several ports' transmit queues (--queue-threads) ------------ */
#define NET_GROUP_FDS (1 + 2 * DP_GROUP_MAX)
#define NET_READY_WAKE 1
#define NET_READY_KICK 2

struct net_group {
    struct dp_group *g;
    struct pollfd fds[NET_GROUP_FDS];
    struct net_dp *owner[NET_GROUP_FDS]; /* NULL: the group's own wake eventfd */
    int kind[NET_GROUP_FDS];             /* NET_READY_* of fds[i] */
};

struct net_group *net_group_new(void)
{
    return calloc(1, sizeof(struct net_group));
}

void net_group_free(struct net_group *ng)
{
    free(ng);
}

/* dp_group.wait: one poll() over the group's wake eventfd and every member's wake
 * eventfd and, where it sleeps for the driver, kick eventfd; what is ready is
 * noted in the member (net_dp.ready) for its next peek.  1: something is ready. */
static int net_group_wait(void *shared, int timeout_ms)
{
    struct net_group *ng = shared;
    struct dp_group *g = ng->g;
    uint32_t nf = 0;
    ng->fds[nf] = (struct pollfd){g->wake_fd, POLLIN, 0};
    ng->owner[nf++] = NULL;
    pthread_mutex_lock((pthread_mutex_t *)(void *)g->mu_storage);
    for (uint32_t i = 0; i < g->n; i++) {
        struct dp *m = g->members[i];
        struct net_dp *n = m->dev;
        if (!m->loop)
            continue; /* not begun: the group's wake_fd (join) covers it */
        if (n->watch_wake >= 0) {
            ng->fds[nf] = (struct pollfd){n->watch_wake, POLLIN, 0};
            ng->owner[nf] = n;
            ng->kind[nf++] = NET_READY_WAKE;
        }
        if ((m->want & DP_EV_KICK) && n->watch_kick >= 0) {
            ng->fds[nf] = (struct pollfd){n->watch_kick, POLLIN, 0};
            ng->owner[nf] = n;
            ng->kind[nf++] = NET_READY_KICK;
        }
    }
    for (uint32_t i = 0; i < g->n; i++)
        if (g->members[i]->loop)
            net_dp_before_sleep(g->members[i]->dev);
    pthread_mutex_unlock((pthread_mutex_t *)(void *)g->mu_storage);
    int r = poll(ng->fds, nf, timeout_ms);
    if (r <= 0)
        return r < 0 && errno != EINTR ? -errno : 0;
    for (uint32_t i = 0; i < nf; i++) {
        if (!(ng->fds[i].revents & (POLLIN | POLLERR | POLLHUP | POLLNVAL)))
            continue;
        if (ng->owner[i]) {
            ng->owner[i]->ready |= ng->kind[i];
        } else {
            uint64_t v;
            ssize_t rr = read(g->wake_fd, &v, sizeof v);
            (void)rr;
        }
    }
    return 1;
}

/* A member's wait in the group (DP_WAIT_PEEK): the events the group's last poll()
 * found for it, consumed (its eventfds read; a kick only while it is still the
 * ring's: dp_set_fds swaps it under mu).  No blocking. */
static int net_group_peek(struct net_dp *n, int want)
{
    struct dp *dp = &n->core;
    int ready = n->ready, ev = 0;
    uint64_t v;
    n->ready = 0;
    if ((ready & NET_READY_WAKE) && n->watch_wake >= 0) {
        if (read(n->watch_wake, &v, sizeof v) == sizeof v)
            ev |= DP_EV_WAKE;
    }
    if ((ready & NET_READY_KICK) && (want & DP_EV_KICK) && n->watch_kick >= 0) {
        pthread_mutex_lock(DP_MU(dp));
        if (n->watch_kick == dp->kick_fd && read(n->watch_kick, &v, sizeof v) == sizeof v)
            ev |= DP_EV_KICK;
        pthread_mutex_unlock(DP_MU(dp));
    }
    if (ev)
        n->idle = 0;
    return ev;
}

static int net_dp_start(void *dev)
{
    struct net_dp *n = dev;
    struct dp_group *g = n->core.group;
    if (!g)
        return 0;
    if (!n->ng)
        return -EOPNOTSUPP; /* no shared poll set: dp_run on a thread of its own */
    pthread_mutex_lock((pthread_mutex_t *)(void *)g->mu_storage);
    if (!g->shared) {
        n->ng->g = g;
        g->shared = n->ng;
        g->wait = net_group_wait;
    }
    pthread_mutex_unlock((pthread_mutex_t *)(void *)g->mu_storage);
    return g->shared == n->ng ? 0 : -EOPNOTSUPP;
}

/* dp_run's wait when its ring was found empty (notifications on) or it waits for
 * room.  A ring just served is first polled for yield_ns with driver
 * notifications off (§2.7.10 / §2.8.10: a busy driver's next chains then need no
 * kick, and no wake-up here), the CPU given to the other threads between looks
 * (the other ports' transmit threads share the backend CPU: while one polls, the
 * others serve -- one CPU serving every port's transmit queue in turn, as a
 * polling lcore does).  Then notifications are enabled again, the ring re-checked,
 * and the thread sleeps on the eventfds.  After an idle timeout nothing polls the
 * ring until the next kick (its memory need not be a ring any more, dp_run). */
static int net_dp_wait(void *dev, int want, int timeout_ms)
{
    struct net_dp *n = dev;
    struct dp *dp = &n->core;
    if ((want & DP_EV_KICK) && n->yield_ns && !n->idle && timeout_ms != DP_WAIT_PEEK) {
        struct vq *q = dp->q;
        uint64_t end = dp_now_ns() + n->yield_ns;
        vq_disable_notification(q);
        n->yields++;
        for (;;) {
            if (vq_avail_count(q)) {
                n->yield_hits++;
                return DP_EV_WAKE; /* dp_run pops them */
            }
            if (__atomic_load_n(&dp->stop, __ATOMIC_ACQUIRE))
                return DP_EV_WAKE;
            if (dp_now_ns() >= end)
                break;
            sched_yield();
        }
        if (vq_enable_notification(q)) {
            n->yield_hits++;
            return DP_EV_WAKE;
        }
    }
    if (timeout_ms == DP_WAIT_PEEK)
        return net_group_peek(n, want);
    int kick = (want & DP_EV_KICK) ? n->watch_kick : -1;
    struct pollfd p[2] = {{n->watch_wake, POLLIN, 0}, {kick, POLLIN, 0}};
    net_dp_before_sleep(n);
    int r = poll(p, 2, timeout_ms);
    if (r == 0) {
        n->idle = 1;
        return 0;
    }
    if (r < 0)
        return -errno;
    int ev = 0;
    uint64_t v;
    if (p[0].revents & POLLIN) {
        ssize_t rr = read(n->watch_wake, &v, sizeof v);
        (void)rr;
        ev |= DP_EV_WAKE;
    }
    if (kick >= 0 && (p[1].revents & POLLIN)) {
        /* read the kick only while it is still the ring's (dp_set_fds swaps under mu) */
        pthread_mutex_lock(DP_MU(dp));
        if (kick == dp->kick_fd) {
            ssize_t rr = read(kick, &v, sizeof v);
            (void)rr;
            ev |= DP_EV_KICK;
            n->idle = 0;
        }
        pthread_mutex_unlock(DP_MU(dp));
    }
    return ev ? ev : DP_EV_WAKE; /* (an fd that went away: the loop looks again) */
}

void net_dp_attach(struct net_dp *n)
{
    n->core.serve = net_dp_serve;
    n->core.batch_end = net_dp_batch_end;
    n->core.batch_begin = net_dp_batch_begin;
    n->core.dev = n;
    n->core.start = net_dp_start;
    n->core.before_sleep = net_dp_before_sleep;
    if (n->yield_ns || n->ng) {
        n->core.watch = net_dp_watch;
        n->core.wait = net_dp_wait;
        n->watch_kick = n->watch_wake = -1;
    }
}
