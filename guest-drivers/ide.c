/* Legacy IDE workload: write then read-verify a region in fixed-size requests.
 *
 * Modes (params.mode): PIO with READ/WRITE SECTORS (one DRQ block per sector), PIO
 * with READ/WRITE MULTIPLE (params.multiple sectors per DRQ block), or bus-master DMA
 * with a PRD table (PIIX BMDMA, like Linux's ata_piix + libata-sff).  Completion
 * (params.irq): IRQ_POLL polls the status registers (nIEN=1); IRQ_HLT halts and reads
 * the status once woken (nIEN=0, IF=0); IRQ_IDT takes IRQ 14 through the IDT, the
 * handler reads (and so acknowledges) the status registers.
 */
#include "runtime.h"
#include "ata.h"

enum { MODE_PIO = 0, MODE_PIO_MULTI = 1, MODE_DMA = 2 };
enum { IRQ_POLL = 0, IRQ_HLT = 1, IRQ_IDT = 2 };
#define IDE_IRQ 14

struct params {
	u32 magic;
	u32 version;
	u32 mode;
	u32 irq;
	u32 lba48;
	u32 req_sectors;
	u32 nreqs;
	u32 multiple;
	u64 buf_addr;
	u64 prd_addr;
	u32 seed;
	u32 start_lba;
	u32 flush;
	u32 reserved;
};

/* Error codes reported with DBG_RESULT. */
enum {
	E_OK = 0,
	E_PARAMS = 1,
	E_IDENTIFY = 2,
	E_CAPACITY = 3,
	E_SETMULT = 4,
	E_WRITE = 5,
	E_READ = 6,
	E_FLUSH = 7,
	E_VERIFY = 8,
	E_DMA = 9,
};

static volatile struct params *const P = (volatile struct params *)PARAMS_ADDR;
static u32 use_irq;

/* Filled by the interrupt handler (IRQ_IDT). */
static volatile u8 isr_status, isr_bm;
static volatile u32 isr_count;

static void ide_isr(int irq)
{
	(void)irq;
	if (P->mode == MODE_DMA)
		isr_bm = inb(BM_REG_STATUS);
	isr_status = inb(ATA_REG_STATUS); /* acknowledges INTRQ */
	isr_count++;
}

/* Wait until the device can take the next step: BSY clear.  Returns the status. */
static u8 ata_wait(void)
{
	u8 st;
	if (use_irq == IRQ_IDT) {
		u32 seen = isr_count;
		while (isr_count == seen)
			irq_wait();
		return isr_status;
	}
	if (use_irq) {
		wait_for_interrupt();
		return inb(ATA_REG_STATUS); /* acknowledges INTRQ */
	}
	do
		st = inb(ATA_REG_STATUS);
	while (st & ATA_BSY);
	return st;
}

/* Wait for DRQ before the first PIO data-out block (no interrupt for it). */
static u8 ata_wait_drq(void)
{
	u8 st;
	do
		st = inb(ATA_REG_ALTSTATUS);
	while ((st & ATA_BSY) || !(st & (ATA_DRQ | ATA_ERR)));
	return st;
}

static void ata_taskfile(u64 lba, u32 count, int lba48)
{
	if (lba48) {
		outb(ATA_REG_NSECT, (u8)(count >> 8));
		outb(ATA_REG_LBAL, (u8)(lba >> 24));
		outb(ATA_REG_LBAM, (u8)(lba >> 32));
		outb(ATA_REG_LBAH, (u8)(lba >> 40));
		outb(ATA_REG_NSECT, (u8)count);
		outb(ATA_REG_LBAL, (u8)lba);
		outb(ATA_REG_LBAM, (u8)(lba >> 8));
		outb(ATA_REG_LBAH, (u8)(lba >> 16));
		outb(ATA_REG_DEVICE, ATA_DEV_OBS | ATA_DEV_LBA);
	} else {
		outb(ATA_REG_NSECT, (u8)count);
		outb(ATA_REG_LBAL, (u8)lba);
		outb(ATA_REG_LBAM, (u8)(lba >> 8));
		outb(ATA_REG_LBAH, (u8)(lba >> 16));
		outb(ATA_REG_DEVICE, ATA_DEV_OBS | ATA_DEV_LBA | ((lba >> 24) & 0x0F));
	}
}

static int ata_identify(u16 *id)
{
	outb(ATA_REG_DEVICE, ATA_DEV_OBS | ATA_DEV_LBA);
	outb(ATA_REG_COMMAND, ATA_CMD_IDENTIFY);
	u8 st = ata_wait();
	if (st & ATA_ERR || !(st & ATA_DRQ))
		return -1;
	insw(ATA_REG_DATA, id, 256);
	return 0;
}

static int ata_nondata(u8 cmd, u8 nsect)
{
	outb(ATA_REG_NSECT, nsect);
	outb(ATA_REG_DEVICE, ATA_DEV_OBS | ATA_DEV_LBA);
	outb(ATA_REG_COMMAND, cmd);
	u8 st = ata_wait();
	return (st & (ATA_ERR | ATA_DF)) ? -1 : 0;
}

/* PIO data-in: one DRQ block of `block` sectors at a time. */
static int pio_read(u64 lba, u32 count, u8 *buf, u32 block, int lba48)
{
	u8 cmd;
	if (block > 1)
		cmd = lba48 ? ATA_CMD_READ_MULTIPLE_EXT : ATA_CMD_READ_MULTIPLE;
	else
		cmd = lba48 ? ATA_CMD_READ_SECTORS_EXT : ATA_CMD_READ_SECTORS;
	ata_taskfile(lba, count, lba48);
	outb(ATA_REG_COMMAND, cmd);
	while (count) {
		u32 n = count < block ? count : block;
		u8 st = ata_wait();
		if (st & ATA_ERR || !(st & ATA_DRQ))
			return -1;
		insw(ATA_REG_DATA, buf, n * ATA_SECTOR / 2);
		buf += n * ATA_SECTOR;
		count -= n;
	}
	if (!use_irq && (inb(ATA_REG_STATUS) & (ATA_ERR | ATA_DRQ)))
		return -1;
	return 0;
}

/* PIO data-out. */
static int pio_write(u64 lba, u32 count, const u8 *buf, u32 block, int lba48)
{
	u8 cmd;
	if (block > 1)
		cmd = lba48 ? ATA_CMD_WRITE_MULTIPLE_EXT : ATA_CMD_WRITE_MULTIPLE;
	else
		cmd = lba48 ? ATA_CMD_WRITE_SECTORS_EXT : ATA_CMD_WRITE_SECTORS;
	ata_taskfile(lba, count, lba48);
	outb(ATA_REG_COMMAND, cmd);
	u8 st = ata_wait_drq();
	while (count) {
		u32 n = count < block ? count : block;
		if (st & ATA_ERR || !(st & ATA_DRQ))
			return -1;
		outsw(ATA_REG_DATA, buf, n * ATA_SECTOR / 2);
		buf += n * ATA_SECTOR;
		count -= n;
		st = ata_wait(); /* interrupt after every block, incl. the last */
	}
	return (st & (ATA_ERR | ATA_DF | ATA_DRQ)) ? -1 : 0;
}

/* Bus-master DMA: one PRD entry per page of the buffer, EOT on the last. */
static int dma_rw(u64 lba, u32 count, u64 buf, int write, int lba48)
{
	volatile u32 *prd = (volatile u32 *)P->prd_addr;
	u32 bytes = count * ATA_SECTOR;
	u32 i = 0;
	while (bytes) {
		u32 chunk = bytes > 4096 ? 4096 : bytes;
		prd[2 * i] = (u32)(buf + 4096ULL * i);
		prd[2 * i + 1] = chunk | (bytes == chunk ? PRD_EOT << 16 : 0);
		bytes -= chunk;
		i++;
	}
	u8 dir = write ? 0 : BM_CMD_READ;
	outl(BM_REG_PRDT, (u32)P->prd_addr);
	outb(BM_REG_COMMAND, dir);
	outb(BM_REG_STATUS, BM_STAT_INTR | BM_STAT_ERR);
	ata_taskfile(lba, count, lba48);
	if (write)
		outb(ATA_REG_COMMAND, lba48 ? ATA_CMD_WRITE_DMA_EXT : ATA_CMD_WRITE_DMA);
	else
		outb(ATA_REG_COMMAND, lba48 ? ATA_CMD_READ_DMA_EXT : ATA_CMD_READ_DMA);
	outb(BM_REG_COMMAND, dir | BM_CMD_START);
	u8 bm, st;
	if (use_irq == IRQ_IDT) {
		u32 seen = isr_count;
		while (isr_count == seen)
			irq_wait();
		bm = isr_bm;
		outb(BM_REG_COMMAND, dir); /* stop the engine */
		st = isr_status;
	} else {
		if (use_irq) {
			wait_for_interrupt();
			bm = inb(BM_REG_STATUS);
		} else {
			do
				bm = inb(BM_REG_STATUS);
			while (!(bm & (BM_STAT_INTR | BM_STAT_ERR)));
		}
		outb(BM_REG_COMMAND, dir); /* stop the engine */
		st = inb(ATA_REG_STATUS); /* acknowledges INTRQ */
	}
	outb(BM_REG_STATUS, BM_STAT_INTR | BM_STAT_ERR);
	if (bm & BM_STAT_ERR || st & (ATA_ERR | ATA_DF | ATA_DRQ))
		return -1;
	return 0;
}

static int do_io(u64 lba, u32 count, int write)
{
	u8 *buf = (u8 *)P->buf_addr;
	int lba48 = (int)P->lba48;
	switch (P->mode) {
	case MODE_DMA:
		return dma_rw(lba, count, P->buf_addr, write, lba48);
	case MODE_PIO_MULTI:
		return write ? pio_write(lba, count, buf, P->multiple, lba48)
			     : pio_read(lba, count, buf, P->multiple, lba48);
	default:
		return write ? pio_write(lba, count, buf, 1, lba48)
			     : pio_read(lba, count, buf, 1, lba48);
	}
}

static u16 ident[256];

int main(void)
{
	if (P->magic != PARAMS_MAGIC || P->req_sectors == 0)
		return E_PARAMS;
	use_irq = P->irq;
	if (use_irq == IRQ_IDT)
		irq_install(IDE_IRQ, ide_isr);
	outb(ATA_REG_DEVCTL, use_irq ? 0 : ATA_NIEN);
	if (ata_identify(ident))
		return E_IDENTIFY;
	u64 sectors = ident[100] | (u64)ident[101] << 16 | (u64)ident[102] << 32;
	u32 rs = P->req_sectors;
	if ((u64)P->start_lba + (u64)rs * P->nreqs > sectors)
		return E_CAPACITY;
	if (P->mode == MODE_PIO_MULTI && ata_nondata(ATA_CMD_SET_MULTIPLE_MODE, (u8)P->multiple))
		return E_SETMULT;
	dbg_puts("ide: start\n");

	u32 words = rs * ATA_SECTOR / 8, bad = 0, ios = 0;
	u64 *buf = (u64 *)P->buf_addr;
	dbg_mark(DBG_BEGIN);
	for (u32 r = 0; r < P->nreqs; r++) {
		u64 lba = P->start_lba + (u64)r * rs;
		fill(buf, words, lba, P->seed);
		if (do_io(lba, rs, 1))
			return E_WRITE;
		ios++;
	}
	dbg_mark(DBG_MARK + 0); /* phase "flush" */
	if (P->flush &&
	    ata_nondata(P->lba48 ? ATA_CMD_FLUSH_CACHE_EXT : ATA_CMD_FLUSH_CACHE, 0))
		return E_FLUSH;
	dbg_mark(DBG_MARK + 1); /* phase "read" */
	for (u32 r = 0; r < P->nreqs; r++) {
		u64 lba = P->start_lba + (u64)r * rs;
		memset(buf, 0, words * 8);
		if (do_io(lba, rs, 0))
			return E_READ;
		bad += check(buf, words, lba, P->seed);
		ios++;
	}
	dbg_mark(DBG_END);
	dbg_cmd(DBG_IOS, ios);
	dbg_cmd(DBG_ERRORS, bad);
	dbg_puts("ide: done\n");
	return bad ? E_VERIFY : E_OK;
}
