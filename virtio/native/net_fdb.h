/* Native forwarding database of the learning switch (net_fdb.c): MAC learning with
 * ageing, least-recently-learned eviction and per-port counters, the per-packet
 * decision of virtio/devices/net/switch.py in C.  Ports are small integers. */
#ifndef PYVIRTIO_NET_FDB_H
#define PYVIRTIO_NET_FDB_H

#define NET_FDB_MAX_ADDRESSES 4096
#define NET_FDB_MAX_PORTS 64
/* vm_net_fdb_decide results other than a port number */
#define NET_FDB_FLOOD 4294967295
#define NET_FDB_HAIRPIN 4294967294
#define NET_FDB_RUNT 4294967293

struct vm_net_port_counters {
    uint64_t in_packets, in_bytes, out_packets, out_bytes, flooded;
    uint64_t dropped_hairpin, dropped_no_room, dropped_runt;
};

struct vm_net_fdb;

struct vm_net_fdb *vm_net_fdb_new(double ageing);
void vm_net_fdb_free(struct vm_net_fdb *t);
void vm_net_fdb_learn(struct vm_net_fdb *t, const uint8_t *mac, uint32_t port, double now);
int64_t vm_net_fdb_lookup(struct vm_net_fdb *t, const uint8_t *mac, double now);
void vm_net_fdb_forget(struct vm_net_fdb *t, uint32_t port);
uint32_t vm_net_fdb_count(const struct vm_net_fdb *t);
uint32_t vm_net_fdb_dump(struct vm_net_fdb *t, double now, uint8_t *macs, uint32_t *ports, uint32_t max);
uint32_t vm_net_fdb_decide(struct vm_net_fdb *t, uint32_t src, const uint8_t *frame, uint32_t len, double now);
void vm_net_fdb_delivered(struct vm_net_fdb *t, uint32_t port, uint32_t len, int ok);
struct vm_net_port_counters *vm_net_fdb_counters(struct vm_net_fdb *t, uint32_t port);

#endif
