/* virtio-blk fast path on an NBD export (nbd_dataplane.c): IN / OUT / FLUSH sent as
 * NBD_CMD_READ / WRITE / FLUSH on a transmission-phase connection of this queue's
 * own, handed over by Python (virtio/devices/blk/nbd_dataplane.py) after the
 * handshake.  Needs dataplane.h first. */
#ifndef PYVIRTIO_NBD_DATAPLANE_H
#define PYVIRTIO_NBD_DATAPLANE_H

struct nbd_dp {
    struct dp core;
    int sock_fd;                /* the connection (owned: closed by nbd_dp_detach) */
    int structured;             /* NBD_OPT_STRUCTURED_REPLY was acknowledged */
    uint32_t tflags;            /* the export's transmission flags */
    uint32_t max_payload;       /* larger requests go to Python (which splits them) */
    /* device state (BlkDataPlane.update_state) */
    int read_only, writethrough, guard_sector0;
    uint64_t capacity;          /* sectors */
    /* errno of the failure that ended the connection (0: up); then every request
     * goes to Python, which reconnects */
    int broken;
    /* a new connection from Python for a broken one (-1: none); the thread takes it
     * (atomic exchange) with the next request */
    int new_fd;
    /* TLS (nbd_tls.c): the connection's session (NULL: plain socket; owned, freed
     * by nbd_dp_detach), and new_fd's (stored before new_fd) */
    void *tls, *new_tls;
    void *priv;
    uint64_t reads, writes, flushes, syncs;
    uint64_t sends, recvs, server_errors, conn_failed, reconnects, bytes_in, bytes_out;
};

void nbd_dp_attach(struct nbd_dp *n);
void nbd_dp_detach(struct nbd_dp *n);

#endif
