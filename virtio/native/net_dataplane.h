/* virtio-net's native per-packet path (net_dataplane.c): a port's transmit queue
 * served by a data-plane thread (dataplane.c), frames switched with the native
 * forwarding database (net_fdb.h) and copied once into the destination port's
 * receive buffers.  Needs dataplane.h and net_fdb.h first. */
#ifndef PYVIRTIO_NET_DATAPLANE_H
#define PYVIRTIO_NET_DATAPLANE_H

#define NET_RX_MAX_BUFS 64  /* receive buffers one packet may span natively */
#define NET_RX_MAX_SEGS 256 /* their segments */
#define NET_RX_PEND 256     /* used entries a port gathers before one publication */

#define NET_RXQ_MAX 8       /* receive queues (queue pairs) a port serves natively */
#define NET_STEER_SIZE 256  /* flows a port remembers for receive steering */
#define NET_HDR_GATHER 10   /* header bytes read per batch: flags .. csum_offset */
#define NET_ETH_GATHER 18   /* and frame bytes: Ethernet header and one VLAN tag */
enum { NET_GOT_HDR = 1, NET_GOT_ETH = 2, NET_GOT_FLOW = 4 };

/* Frames waiting natively for a receive ring's buffers (net_dataplane.c): a
 * transmitting thread that finds the ring short of buffers copies the frame here
 * instead of handing it to Python, and the ring's next writer delivers these first. */
#define NET_HOLD_FRAMES 1024
#define NET_HOLD_BYTES 2097152
struct net_hold;
enum { NET_HOLD_EMPTY = 0, NET_HOLD_WAIT = 1, NET_HOLD_PYTHON = 2 };

/* One receive queue of a port written natively: receiveq(k+1) for rx[k]. */
struct net_rxq {
    struct vq *q;               /* the ring, or NULL: not native */
    int call_fd;                /* its used buffer notification eventfd, or -1 */
    /* used entries written natively and not yet published (under mu): one used
     * index update and one notification per batch of the transmitting thread */
    uint32_t npend;
    uint16_t pend_ids[NET_RX_PEND], pend_ndescs[NET_RX_PEND];
    uint32_t pend_lens[NET_RX_PEND];
    uint64_t rx_native, rx_native_bytes; /* frames written natively into this queue */
    /* Python's backlog for this queue is full (set and cleared by Python, read
     * without mu: a frame or two either way at the edge) */
    uint8_t backlog_full;
    /* The hold (under mu): frames accepted for this queue while its ring had no
     * room, oldest first, delivered before any later frame by whoever writes the
     * ring next (a transmitting thread, or Python: net_hold_drain).  Allocated at
     * the first frame held, freed by net_port_detach. */
    struct net_hold *hold;
    uint32_t nheld;             /* frames in it */
    int hold_fd;                /* eventfd: a transmitting thread went to sleep with
                                 * frames held here, or the oldest needs Python */
    uint8_t hold_told;          /* hold_fd written: Python serves the hold until it
                                 * finds it empty or steps back (net_hold_step_back) */
    uint8_t hold_sleeping;      /* a transmitting thread went to sleep leaving frames
                                 * here since Python's last look */
    double hold_stamp;          /* when the hold last moved (net_now: a frame into an
                                 * empty hold, or frames out of it) */
    uint64_t rx_held;           /* frames that waited in the hold */
    uint64_t hold_served;       /* frames delivered from it by transmitting threads */
};

/* One switch port as the native path sees it: its receive queues when they may be
 * written natively, and the state the decision needs.  Every write into those
 * rings -- native transmit threads of any port, and the Python path
 * (net_port_lock around VirtioNet._receive) -- holds `mu`.  With nrxq > 1 a frame
 * goes to rx[flow hash % nrxq] (VirtioNet.deliver's choice, §5.1.9.5.6). */
struct net_port {
    void *mu_storage[8];
    struct net_rxq rx[NET_RXQ_MAX];
    uint32_t nrxq;              /* receive queues in use, rx[0 .. nrxq-1]; 0: Python only */
    uint32_t hdr_size;          /* 10 or 12 (§5.1.6.1) */
    uint8_t mrg_rxbuf;          /* VIRTIO_NET_F_MRG_RXBUF negotiated */
    uint8_t guest_csum;         /* VIRTIO_NET_F_GUEST_CSUM negotiated */
    uint8_t native;             /* frames to this port may be delivered natively */
    uint8_t vlan_filter;        /* CTRL_VLAN negotiated: tagged frames go to Python */
    uint8_t link_down;          /* set-link off: its frames (both ways) go to Python */
    int32_t held;               /* packets the Python path holds for this port */
    uint32_t hold_limit;        /* frames a receive queue's hold keeps (the device's
                                 * rx_backlog; at most NET_HOLD_FRAMES) */
    /* counters (written under mu) */
    uint64_t rx_native, rx_native_bytes, rx_calls, rx_deferred, rx_publishes;
    uint64_t rx_backlog_full;   /* dropped natively: that queue's backlog or hold full */
    uint64_t rx_held;           /* frames that waited in a hold (net_rxq.hold) */
    uint64_t rx_hold_lost;      /* frames a queue still held when it stopped */
    /* Automatic receive steering (§5.1.9.5.6): the queue pair the driver last
     * transmitted each flow on, noted by every transmit path while it uses more than
     * one pair (steer_pairs, VQ_PAIRS_SET); entries: flow hash << 32 | pair + 1, at
     * steer[hash % NET_STEER_SIZE], 0 empty; read and written without a lock (one
     * 64-bit word: a racing reader sees the old flow or the new one). */
    uint32_t steer_pairs;
    uint64_t rx_steered;        /* frames written natively into the pair steering chose */
    uint64_t steer[NET_STEER_SIZE];
};

int net_port_init(struct net_port *p);
void net_port_destroy(struct net_port *p);
void net_port_attach(struct net_port *p, uint32_t k, struct vq *q, int call_fd, int hold_fd,
                     uint32_t hdr_size, int mrg_rxbuf, int guest_csum);
int net_hold_drain_locked(struct net_port *p, uint32_t k);
const uint8_t *net_hold_peek(struct net_port *p, uint32_t k, uint8_t *hdr, uint32_t *len);
void net_hold_pop(struct net_port *p, uint32_t k);
int net_hold_arm_locked(struct net_port *p, uint32_t k);
int net_hold_step_back(struct net_port *p, uint32_t k, uint64_t served);
void net_port_detach(struct net_port *p, uint32_t k);
void net_port_set_call(struct net_port *p, uint32_t k, int call_fd);
uint32_t net_flow_hash(const uint8_t *frame, uint32_t len);
void net_steer_note(struct net_port *p, uint32_t hash, uint32_t pair);
int32_t net_steer_pair(struct net_port *p, uint32_t hash);
void net_steer_clear(struct net_port *p);
void net_port_lock(struct net_port *p);
void net_port_unlock(struct net_port *p);

#define NET_FLOOD_MAX 8      /* other ports a flood reaches natively */

/* Receive buffers reserved for one frame (net_dataplane.c). */
struct net_resv {
    struct vq_chain ch[NET_RX_MAX_BUFS];
    struct vq_seg segs[NET_RX_MAX_SEGS];
    uint32_t k;
    uint32_t qi;                /* the port's receive queue (rx[qi]) */
    uint32_t steered;           /* qi is the pair the flow was sent on (§5.1.9.5.6) */
};

/* The receive ring whose lock a transmitting thread keeps between frames of a batch
 * (net_dp.kept), and the chains it popped from that ring ahead of need: one pop for
 * the batch's frames instead of one per frame.  ch[next .. n) are popped and not
 * yet taken; they are the ring's last popped chains and go back to it (the next pop
 * hands them out again) before the lock is let go. */
#define NET_RXC_MAX 64
struct net_rxkeep {
    struct vq *q;               /* the ring whose lock is held, or NULL */
    uint32_t n, next;
    struct vq_chain ch[NET_RXC_MAX];
    struct vq_seg segs[NET_RX_MAX_SEGS];
};

/* The wait of a dp_group serving several ports' transmit queues (--queue-threads:
 * one thread for all of them, as one DPDK lcore polls every vhost port): one
 * poll() over every member's eventfds.  net_dp.ng, before net_dp_attach. */
struct net_group; /* net_dataplane.c */

/* The last IPv4 flow key net_dp_batch_begin hashed (kind 0: none yet; 1: addresses;
 * 2: addresses and ports), and its net_flow_hash. */
struct net_flow_memo {
    uint64_t addrs;
    uint32_t ports, kind, hash;
};

struct net_dp {
    struct dp core;
    struct vm_net_fdb *fdb;
    struct net_port **ports;    /* NET_FDB_MAX_PORTS entries (NULL: no port) */
    const uint32_t *nports;     /* entries in use (the switch's, may grow), or NULL: all */
    uint32_t src;               /* this port's number */
    uint32_t pair;              /* this transmit queue's queue pair (transmitq(pair+1)) */
    uint32_t hdr_size;          /* this port's header size */
    uint32_t mtu;
    uint8_t csum;               /* VIRTIO_NET_F_CSUM negotiated by this port */
    uint8_t _pad[3];
    /* transmitted frames served natively, and those handed to Python by cause */
    uint64_t tx_native, tx_native_bytes, tx_flooded, tx_hairpin;
    uint64_t py_malformed, py_offload, py_port, py_no_room;
    uint64_t tx_held;           /* frames that went into a destination's hold */
    uint64_t order_waits;       /* frames that waited for Python's earlier ones */
    uint64_t order_late;        /* ... and went on after NET_ORDER_WAIT_S */
    uint8_t touched[NET_FDB_MAX_PORTS]; /* ports written in this batch */
    uint8_t holding[NET_FDB_MAX_PORTS]; /* ports this thread left frames held for */
    uint32_t nholding;          /* of them (net_dp_before_sleep tells Python) */
    struct net_resv resv[NET_FLOOD_MAX];
    uint32_t resv_port[NET_FLOOD_MAX];
    double now;                 /* monotonic seconds, read once per batch */
    int now_valid;
    /* Per batch (net_dp_batch_end ends it): the destination port whose mu this
     * thread keeps between packets (port number + 1, 0: none), the last
     * forwarding decision (destination MAC -> port, -1 flood) and source learned,
     * and the switch counters gathered for one update under the database's lock. */
    uint32_t sticky;
    int32_t cache_target;
    struct net_port *sticky_port; /* ports[sticky - 1] when locked (that may be NULLed) */
    uint32_t rx_want;           /* chains the batch's frames from this one on may take */
    struct net_rxkeep kept;     /* a receive ring of sticky_port whose lock is kept too */
    uint8_t cache_dst[6], learned_src[6];
    uint8_t cache_valid, learned_valid;
    uint8_t flood_valid, flood_n; /* a flood's ports this batch: flood_n (0..2) others, */
    uint32_t flood_single, flood_nports; /* the one when 1; ports scanned */
    uint64_t acc_in, acc_in_bytes, acc_flooded;
    uint64_t acc_out[NET_FDB_MAX_PORTS], acc_out_bytes[NET_FDB_MAX_PORTS];
    uint64_t acc_no_room[NET_FDB_MAX_PORTS]; /* dropped: the destination's backlog full */
    uint64_t fdb_locks;         /* database lock acquisitions by this thread */
    /* Polling an emptied ring (net_dp_wait): this long (ns; 0: sleep at once) with
     * driver notifications off, giving the CPU to the other threads between looks;
     * the eventfds dp_run's watch named. */
    uint64_t yield_ns;
    uint64_t yields, yield_hits; /* polls done, and those that found chains */
    int watch_kick, watch_wake;
    int idle;                   /* the last wait timed out: no polling until a kick */
    /* --queue-threads: the shared thread's one poll() (net_group_wait) for all its
     * ports' transmit queues, and what it found ready for this queue (NET_READY_*) */
    struct net_group *ng;
    int ready;                  /* NET_READY_* bits */
    /* The popped batch (net_dp_batch_begin): its chains, and the first bytes of
     * every transmitted header and frame, read in one pass (bhdr_ok[i]: NET_GOT_HDR
     * when bhdr[i] holds chain i's first NET_HDR_GATHER header bytes, NET_GOT_ETH
     * when beth[i] holds its frame's first NET_ETH_GATHER bytes) */
    const struct vq_chain *batch_first;
    uint32_t batch_n;
    uint8_t bhdr_ok[DP_BATCH];  /* NET_GOT_* bits */
    uint8_t bhdr[DP_BATCH][NET_HDR_GATHER];
    uint8_t beth[DP_BATCH][NET_ETH_GATHER]; /* the frame's first bytes (NET_GOT_ETH) */
    uint32_t bflow[DP_BATCH];   /* its net_flow_hash (NET_GOT_FLOW) */
    struct net_flow_memo flow_memo; /* the last IPv4 flow key hashed, and its hash */
};

void net_dp_attach(struct net_dp *n);
struct net_group *net_group_new(void);
void net_group_free(struct net_group *ng);

#endif
