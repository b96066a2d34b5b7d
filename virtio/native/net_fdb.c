/* Forwarding database of the learning switch (see net_fdb.h).
 *
 * Open addressing with linear probing over 2 * NET_FDB_MAX_ADDRESSES slots
 * (backward-shift deletion, so no tombstones), plus a doubly linked list of the
 * entries in learning order: re-learning moves an entry to the tail, a full table
 * evicts the head (the least recently learned address), as switch.py's dict does.
 * Thread-safe: every exported function takes the table's mutex; the native
 * per-packet path (net_dataplane.c) holds it (fdb_lock) around its own
 * decision and calls the unlocked fdb_* helpers. */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "net_fdb.h"

#define FDB_SLOTS (2 * NET_FDB_MAX_ADDRESSES)
#define FDB_NONE 0xffffffffu

struct fdb_entry {
    uint8_t mac[6];
    uint8_t used;
    uint32_t port;
    double seen;
    uint32_t prev, next; /* learning order (slot indices) */
};

struct vm_net_fdb {
    pthread_mutex_t mu;
    double ageing;
    uint32_t count, head, tail;
    struct fdb_entry slot[FDB_SLOTS];
    struct vm_net_port_counters ports[NET_FDB_MAX_PORTS];
};

static uint32_t fdb_hash(const uint8_t *m)
{
    uint64_t v = 0;
    memcpy(&v, m, 6);
    v *= 0x9e3779b97f4a7c15ull;
    return (uint32_t)(v >> 40) & (FDB_SLOTS - 1);
}

struct vm_net_fdb *vm_net_fdb_new(double ageing)
{
    struct vm_net_fdb *t = calloc(1, sizeof(*t));
    if (t) {
        t->ageing = ageing;
        t->head = t->tail = FDB_NONE;
        if (pthread_mutex_init(&t->mu, NULL)) {
            free(t);
            return NULL;
        }
    }
    return t;
}

void vm_net_fdb_free(struct vm_net_fdb *t)
{
    if (t)
        pthread_mutex_destroy(&t->mu);
    free(t);
}

static void fdb_lock(struct vm_net_fdb *t) { pthread_mutex_lock(&t->mu); }
static void fdb_unlock(struct vm_net_fdb *t) { pthread_mutex_unlock(&t->mu); }

static uint32_t fdb_find(const struct vm_net_fdb *t, const uint8_t *mac)
{
    for (uint32_t i = fdb_hash(mac);; i = (i + 1) & (FDB_SLOTS - 1)) {
        if (!t->slot[i].used)
            return FDB_NONE;
        if (memcmp(t->slot[i].mac, mac, 6) == 0)
            return i;
    }
}

static void fdb_unlink(struct vm_net_fdb *t, uint32_t i)
{
    struct fdb_entry *e = &t->slot[i];
    if (e->prev != FDB_NONE) t->slot[e->prev].next = e->next; else t->head = e->next;
    if (e->next != FDB_NONE) t->slot[e->next].prev = e->prev; else t->tail = e->prev;
}

static void fdb_append(struct vm_net_fdb *t, uint32_t i)
{
    struct fdb_entry *e = &t->slot[i];
    e->prev = t->tail;
    e->next = FDB_NONE;
    if (t->tail != FDB_NONE) t->slot[t->tail].next = i; else t->head = i;
    t->tail = i;
}

/* Move the entry at `from` to the empty slot `to`, keeping the order links. */
static void fdb_move(struct vm_net_fdb *t, uint32_t from, uint32_t to)
{
    struct fdb_entry *e = &t->slot[from];
    t->slot[to] = *e;
    if (e->prev != FDB_NONE) t->slot[e->prev].next = to; else t->head = to;
    if (e->next != FDB_NONE) t->slot[e->next].prev = to; else t->tail = to;
    e->used = 0;
}

static void fdb_delete(struct vm_net_fdb *t, uint32_t i)
{
    fdb_unlink(t, i);
    t->slot[i].used = 0;
    t->count--;
    /* backward-shift: pull later members of the probe run into the hole */
    uint32_t hole = i;
    for (uint32_t j = (i + 1) & (FDB_SLOTS - 1); t->slot[j].used; j = (j + 1) & (FDB_SLOTS - 1)) {
        uint32_t home = fdb_hash(t->slot[j].mac);
        /* j may move to hole iff home is not cyclically in (hole, j] */
        int stays = hole <= j ? (home > hole && home <= j) : (home > hole || home <= j);
        if (!stays) {
            fdb_move(t, j, hole);
            hole = j;
        }
    }
}

static void fdb_learn(struct vm_net_fdb *t, const uint8_t *mac, uint32_t port, double now)
{
    static const uint8_t zero[6];
    if ((mac[0] & 1) || memcmp(mac, zero, 6) == 0)
        return; /* a group address or zero is never a source */
    uint32_t i = fdb_find(t, mac);
    if (i != FDB_NONE) {
        fdb_unlink(t, i);
    } else {
        if (t->count >= NET_FDB_MAX_ADDRESSES)
            fdb_delete(t, t->head);
        i = fdb_hash(mac);
        while (t->slot[i].used)
            i = (i + 1) & (FDB_SLOTS - 1);
        memcpy(t->slot[i].mac, mac, 6);
        t->slot[i].used = 1;
        t->count++;
    }
    t->slot[i].port = port;
    t->slot[i].seen = now;
    fdb_append(t, i);
}

static int64_t fdb_lookup(struct vm_net_fdb *t, const uint8_t *mac, double now)
{
    uint32_t i = fdb_find(t, mac);
    if (i == FDB_NONE)
        return -1;
    if (now - t->slot[i].seen > t->ageing) {
        fdb_delete(t, i);
        return -1;
    }
    return t->slot[i].port;
}

static void fdb_forget(struct vm_net_fdb *t, uint32_t port)
{
    uint32_t i = t->head;
    while (i != FDB_NONE) {
        uint32_t next = t->slot[i].next;
        if (t->slot[i].port == port) {
            fdb_delete(t, i);
            i = t->head; /* deletion may move entries: restart (rare path) */
            continue;
        }
        i = next;
    }
}

uint32_t vm_net_fdb_count(const struct vm_net_fdb *t) { return t->count; }

static uint32_t fdb_dump(struct vm_net_fdb *t, double now, uint8_t *macs, uint32_t *ports, uint32_t max)
{
    uint32_t n = 0;
    for (uint32_t i = t->head; i != FDB_NONE && n < max; i = t->slot[i].next) {
        if (now - t->slot[i].seen > t->ageing)
            continue;
        memcpy(macs + 6 * n, t->slot[i].mac, 6);
        ports[n++] = t->slot[i].port;
    }
    return n;
}

struct vm_net_port_counters *vm_net_fdb_counters(struct vm_net_fdb *t, uint32_t port)
{
    return port < NET_FDB_MAX_PORTS ? &t->ports[port] : NULL;
}

static uint32_t fdb_decide(struct vm_net_fdb *t, uint32_t src, const uint8_t *frame, uint32_t len, double now)
{
    struct vm_net_port_counters *c = &t->ports[src % NET_FDB_MAX_PORTS];
    if (len < 14) {
        c->dropped_runt++;
        return NET_FDB_RUNT;
    }
    c->in_packets++;
    c->in_bytes += len;
    fdb_learn(t, frame + 6, src, now);
    int64_t target = (frame[0] & 1) ? -1 : fdb_lookup(t, frame, now);
    if (target < 0) {
        c->flooded++;
        return NET_FDB_FLOOD;
    }
    if ((uint32_t)target == src) {
        c->dropped_hairpin++;
        return NET_FDB_HAIRPIN;
    }
    return (uint32_t)target;
}

static void fdb_delivered(struct vm_net_fdb *t, uint32_t port, uint32_t len, int ok)
{
    struct vm_net_port_counters *c = &t->ports[port % NET_FDB_MAX_PORTS];
    if (ok) {
        c->out_packets++;
        c->out_bytes += len;
    } else {
        c->dropped_no_room++;
    }
}

void vm_net_fdb_learn(struct vm_net_fdb *t, const uint8_t *mac, uint32_t port, double now)
{
    fdb_lock(t);
    fdb_learn(t, mac, port, now);
    fdb_unlock(t);
}

int64_t vm_net_fdb_lookup(struct vm_net_fdb *t, const uint8_t *mac, double now)
{
    fdb_lock(t);
    int64_t r = fdb_lookup(t, mac, now);
    fdb_unlock(t);
    return r;
}

void vm_net_fdb_forget(struct vm_net_fdb *t, uint32_t port)
{
    fdb_lock(t);
    fdb_forget(t, port);
    fdb_unlock(t);
}

uint32_t vm_net_fdb_dump(struct vm_net_fdb *t, double now, uint8_t *macs, uint32_t *ports, uint32_t max)
{
    fdb_lock(t);
    uint32_t r = fdb_dump(t, now, macs, ports, max);
    fdb_unlock(t);
    return r;
}

uint32_t vm_net_fdb_decide(struct vm_net_fdb *t, uint32_t src, const uint8_t *frame, uint32_t len, double now)
{
    fdb_lock(t);
    uint32_t r = fdb_decide(t, src, frame, len, now);
    fdb_unlock(t);
    return r;
}

void vm_net_fdb_delivered(struct vm_net_fdb *t, uint32_t port, uint32_t len, int ok)
{
    fdb_lock(t);
    fdb_delivered(t, port, len, ok);
    fdb_unlock(t);
}
