/* virtio-input eventq delivery (input_deliver.c): one call per SYN_REPORT-framed
 * group of events (virtio 1.4 §5.8.6).  Needs vm_native.h first. */
#define INPUT_EVENT_SIZE 8
#define INPUT_DELIVER_MAX 64

/* input_deliver's return value when the group needs the Python path (ring untouched) */
enum { INPUT_DELIVER_FALLBACK = -1 };

/* Results of one delivery: when the used index was stored (CLOCK_MONOTONIC ns),
 * whether the driver asked to be notified of it, and the chains used (head index /
 * buffer id, in order: for the queue's inflight tracker). */
struct input_delivery {
    uint64_t stored_ns;
    uint32_t notify;
    uint16_t heads[INPUT_DELIVER_MAX];
};

int input_deliver(struct vq *q, const uint8_t *events, uint32_t n, struct input_delivery *out);
