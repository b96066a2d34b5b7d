/* NE2000 workload: two ISA NE2000s of one machine cabled back to back.
 *
 * The driver does what Linux's ne.c + lib8390.c do, with 16-bit remote DMA through the
 * data port: reset, PROM read (station address), ring set-up (transmit buffer in pages
 * TX_PAGE.., receive ring RX_START..NE_RAM_END_PAGE), then frames.  Transmit: remote
 * write of the frame (rep outsw), wait for RDC, TPSR/TBCR, CR.TXP, wait for PTX.
 * Receive: PRX, read CURR (page 1), then per frame a remote read of the 4-byte ring
 * header and one of the frame (rep insw), and BNRY moves behind it.
 *
 * Workload: params.npackets frames of params.frame_len bytes, the first half from NIC
 * 0 to NIC 1 (phase 1), the second half back (phase 2).  params.batch frames are sent
 * before the receiver drains its ring (1 = one frame in flight).  Every frame carries
 * its sequence number and a pattern; the receiver checks addresses, length, order and
 * every payload byte.  Completion: polled (IRQ_POLL), or by interrupt (HLT wake-up /
 * IDT) when a status bit is not yet set.
 */
#include "runtime.h"
#include "dp8390.h"

enum { IRQ_POLL = 0, IRQ_HLT = 1, IRQ_IDT = 2 };
#define NNICS 2
#define ETHERTYPE 0x88B5 /* IEEE 802 local experimental */
#define TX_PAGE NE_RAM_FIRST_PAGE
#define TX_PAGES 6 /* one maximum frame */
#define RX_START (TX_PAGE + TX_PAGES)
#define RX_STOP NE_RAM_END_PAGE

struct params {
	u32 magic;
	u32 version;
	u32 irq;
	u32 npackets;
	u32 frame_len;
	u32 batch;
	u32 seed;
	u32 reserved;
	u32 io_base[NNICS];
	u32 irq_line[NNICS];
};

enum {
	E_OK = 0,
	E_PARAMS = 1,
	E_RESET = 2,
	E_PROM = 3,
	E_DMA = 4,
	E_TX = 5,
	E_RX = 6,
	E_RING = 7,
	E_VERIFY = 8,
};

static volatile struct params *const P = (volatile struct params *)PARAMS_ADDR;

struct nic {
	u16 base;
	u8 irq;
	u8 mac[ETH_ALEN];
	u8 next; /* next ring page to read */
};

static struct nic nics[NNICS];
static u32 use_irq;
static u8 txbuf[ETH_FRAME_LEN + 2] __attribute__((aligned(4096)));
static u8 rxbuf[ETH_FRAME_LEN + ETH_FCS_LEN + 2] __attribute__((aligned(4096)));
static u8 prom[NE_PROM_SIZE] __attribute__((aligned(16)));

static inline void reg_w(const struct nic *n, u8 reg, u8 v) { outb(n->base + reg, v); }
static inline u8 reg_r(const struct nic *n, u8 reg) { return inb(n->base + reg); }

static void nic_isr(int irq) { (void)irq; /* the waiting loop reads and acknowledges ISR */ }

/* Wait until one of `bits` is set in ISR; returns ISR.  No acknowledgement here. */
static u8 wait_isr(const struct nic *n, u8 bits)
{
	u8 isr;
	for (;;) {
		isr = reg_r(n, DP_ISR);
		if (isr & bits)
			return isr;
		if (use_irq == IRQ_IDT)
			irq_wait();
		else if (use_irq == IRQ_HLT)
			wait_for_interrupt();
	}
}

/* Start a remote DMA of `count` bytes at NIC address `addr`. */
static void remote_dma(const struct nic *n, u16 addr, u16 count, u8 rd)
{
	reg_w(n, DP_RBCR0, (u8)count);
	reg_w(n, DP_RBCR1, (u8)(count >> 8));
	reg_w(n, DP_RSAR0, (u8)addr);
	reg_w(n, DP_RSAR1, (u8)(addr >> 8));
	reg_w(n, DP_CR, rd | CR_STA);
}

/* Wait for remote DMA complete and acknowledge it. */
static int dma_done(const struct nic *n)
{
	u8 isr = wait_isr(n, ISR_RDC);
	reg_w(n, DP_ISR, ISR_RDC);
	return (isr & ISR_RDC) ? 0 : -1;
}

static int nic_init(struct nic *n)
{
	u8 v = reg_r(n, NE_RESET_PORT);
	reg_w(n, NE_RESET_PORT, v);
	u32 spins = 0;
	while (!(reg_r(n, DP_ISR) & ISR_RST))
		if (++spins > 1000)
			return E_RESET;
	reg_w(n, DP_ISR, 0xFF);
	reg_w(n, DP_CR, CR_PAGE0 | CR_RD_ABORT | CR_STP);
	reg_w(n, DP_DCR, DCR_FT1 | DCR_LS | DCR_WTS);
	reg_w(n, DP_RBCR0, 0);
	reg_w(n, DP_RBCR1, 0);
	reg_w(n, DP_RCR, RCR_MON);
	reg_w(n, DP_TCR, TCR_LB_INTERNAL);
	/* Station address: the PROM, each byte doubled (word-wide board). */
	remote_dma(n, 0, NE_PROM_SIZE, CR_RD_READ);
	insw(n->base + NE_DATA_PORT, prom, NE_PROM_SIZE / 2);
	if (dma_done(n))
		return E_PROM;
	for (int i = 0; i < ETH_ALEN; i++) {
		if (prom[2 * i] != prom[2 * i + 1])
			return E_PROM;
		n->mac[i] = prom[2 * i];
	}
	reg_w(n, DP_TPSR, TX_PAGE);
	reg_w(n, DP_PSTART, RX_START);
	reg_w(n, DP_PSTOP, RX_STOP);
	reg_w(n, DP_BNRY, RX_START);
	reg_w(n, DP_ISR, 0xFF);
	reg_w(n, DP_IMR, use_irq ? (ISR_PRX | ISR_PTX | ISR_TXE | ISR_RDC | ISR_OVW) : 0);
	reg_w(n, DP_CR, CR_PAGE1 | CR_RD_ABORT | CR_STP);
	for (int i = 0; i < ETH_ALEN; i++)
		reg_w(n, DP_P1_PAR0 + i, n->mac[i]);
	for (int i = 0; i < 8; i++)
		reg_w(n, DP_P1_MAR0 + i, 0);
	reg_w(n, DP_P1_CURR, RX_START + 1);
	reg_w(n, DP_CR, CR_PAGE0 | CR_RD_ABORT | CR_STA);
	reg_w(n, DP_TCR, 0);
	reg_w(n, DP_RCR, RCR_AB);
	n->next = RX_START + 1;
	if (use_irq == IRQ_IDT)
		irq_install(n->irq, nic_isr);
	return E_OK;
}

static inline u8 payload_byte(u32 seq, u32 j, u32 seed)
{
	return (u8)(pattern_word(seq, j / 8, seed) >> (8 * (j & 7)));
}

static void build_frame(const struct nic *from, const struct nic *to, u32 seq, u32 len)
{
	memcpy(txbuf, to->mac, ETH_ALEN);
	memcpy(txbuf + ETH_ALEN, from->mac, ETH_ALEN);
	txbuf[12] = ETHERTYPE >> 8;
	txbuf[13] = ETHERTYPE & 0xFF;
	for (u32 j = 0; j < len - ETH_HLEN; j++)
		txbuf[ETH_HLEN + j] = payload_byte(seq, j, P->seed);
}

static int nic_send(const struct nic *n, u32 len)
{
	u32 words = (len + 1) / 2;
	remote_dma(n, TX_PAGE * NE_PAGE_SIZE, (u16)(words * 2), CR_RD_WRITE);
	outsw(n->base + NE_DATA_PORT, txbuf, words);
	if (dma_done(n))
		return E_DMA;
	reg_w(n, DP_TPSR, TX_PAGE);
	reg_w(n, DP_TBCR0, (u8)len);
	reg_w(n, DP_TBCR1, (u8)(len >> 8));
	reg_w(n, DP_CR, CR_RD_ABORT | CR_TXP | CR_STA);
	u8 isr = wait_isr(n, ISR_PTX | ISR_TXE);
	reg_w(n, DP_ISR, ISR_PTX | ISR_TXE);
	return (isr & ISR_TXE) ? E_TX : E_OK;
}

static u32 bad_bytes;

static u32 verify_frame(const struct nic *from, const struct nic *to, u32 seq, u32 len)
{
	u32 bad = 0;
	if (memcmp(rxbuf, to->mac, ETH_ALEN) || memcmp(rxbuf + ETH_ALEN, from->mac, ETH_ALEN) ||
	    rxbuf[12] != (ETHERTYPE >> 8) || rxbuf[13] != (ETHERTYPE & 0xFF))
		bad++;
	for (u32 j = 0; j < len - ETH_HLEN; j++)
		if (rxbuf[ETH_HLEN + j] != payload_byte(seq, j, P->seed))
			bad++;
	return bad;
}

/* Drain `expect` frames from n's ring, checking each against its sequence number. */
static int nic_receive(struct nic *n, const struct nic *from, u32 seq, u32 expect, u32 len)
{
	u8 isr = wait_isr(n, ISR_PRX | ISR_RXE | ISR_OVW);
	reg_w(n, DP_ISR, ISR_PRX | ISR_RXE | ISR_OVW);
	if (isr & (ISR_RXE | ISR_OVW))
		return E_RX;
	reg_w(n, DP_CR, CR_PAGE1 | CR_RD_ABORT | CR_STA);
	u8 curr = reg_r(n, DP_P1_CURR);
	reg_w(n, DP_CR, CR_PAGE0 | CR_RD_ABORT | CR_STA);
	u32 got = 0;
	while (n->next != curr) {
		u8 hdr[NE_RX_HEADER_LEN] __attribute__((aligned(4)));
		remote_dma(n, (u16)(n->next * NE_PAGE_SIZE), NE_RX_HEADER_LEN, CR_RD_READ);
		insw(n->base + NE_DATA_PORT, hdr, NE_RX_HEADER_LEN / 2);
		if (dma_done(n))
			return E_DMA;
		u8 next = hdr[1];
		u32 count = hdr[2] | (u32)hdr[3] << 8;
		if (!(hdr[0] & RSR_PRX) || next < RX_START || next >= RX_STOP ||
		    count < ETH_ZLEN + ETH_FCS_LEN || count > ETH_FRAME_LEN + ETH_FCS_LEN)
			return E_RING;
		u32 flen = count - ETH_FCS_LEN;
		u32 words = (flen + 1) / 2;
		remote_dma(n, (u16)(n->next * NE_PAGE_SIZE + NE_RX_HEADER_LEN), (u16)(words * 2),
			   CR_RD_READ);
		insw(n->base + NE_DATA_PORT, rxbuf, words);
		if (dma_done(n))
			return E_DMA;
		u32 want = len < ETH_ZLEN ? ETH_ZLEN : len;
		if (flen != want)
			bad_bytes++;
		else
			bad_bytes += verify_frame(from, n, seq + got, len);
		got++;
		n->next = next;
		reg_w(n, DP_BNRY, next == RX_START ? RX_STOP - 1 : next - 1);
	}
	return got == expect ? E_OK : E_RING;
}

int main(void)
{
	u32 len = P->frame_len, batch = P->batch;
	if (P->magic != PARAMS_MAGIC || len < ETH_HLEN + 4 || len > ETH_FRAME_LEN || batch == 0 ||
	    P->npackets % (2 * batch))
		return E_PARAMS;
	use_irq = P->irq;
	for (int i = 0; i < NNICS; i++) {
		nics[i].base = (u16)P->io_base[i];
		nics[i].irq = (u8)P->irq_line[i];
		int rc = nic_init(&nics[i]);
		if (rc)
			return rc;
	}
	dbg_puts("ne2000: start\n");
	u32 half = P->npackets / 2, done = 0;
	dbg_mark(DBG_BEGIN);
	for (int dir = 0; dir < NNICS; dir++) {
		struct nic *from = &nics[dir], *to = &nics[1 - dir];
		if (dir)
			dbg_mark(DBG_MARK + 0); /* phase 2: back */
		for (u32 seq = 0; seq < half; seq += batch) {
			for (u32 k = 0; k < batch; k++) {
				build_frame(from, to, seq + k, len);
				int rc = nic_send(from, len);
				if (rc)
					return rc;
			}
			int rc = nic_receive(to, from, seq, batch, len);
			if (rc)
				return rc;
			done += batch;
		}
	}
	dbg_mark(DBG_END);
	dbg_cmd(DBG_IOS, done);
	dbg_cmd(DBG_ERRORS, bad_bytes);
	dbg_puts("ne2000: done\n");
	return bad_bytes ? E_VERIFY : E_OK;
}
