/* Freestanding runtime for pyvirtio guest programs (x86-64, ring 0, identity-mapped).
 *
 * The VMM loads the ELF at 0x100000, sets RSP, builds page tables/GDT, and writes a
 * parameter block at PARAMS_ADDR.  Output and results go through the debug port
 * (emulator/devices/debugport.py).
 *
 * Interrupts, two ways (the VMM has no PIC/APIC model; a halted guest is the only
 * place an interrupt is delivered, which keeps exit counts deterministic):
 *  - HLT wake-up (IF=0): wait_for_interrupt() halts; the VMM resumes the guest at the
 *    next instruction once a device line is up; the guest then reads the device.
 *  - IDT delivery (IF=1 around HLT): irq_install() + irq_wait(); the VMM injects
 *    vector IRQ_VECTOR_BASE + irq (KVM_INTERRUPT / a unicorn frame push), the
 *    handler runs and IRETQ returns behind the HLT.  Lines are level-triggered and
 *    need no EOI: the handler acknowledges the device itself.
 */
#ifndef PYVIRTIO_RUNTIME_H
#define PYVIRTIO_RUNTIME_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef unsigned long size_t;

#define PARAMS_ADDR 0x3000UL
#define PARAMS_MAGIC 0x4F495650u /* "PVIO" */

#define DEBUG_BASE 0x500
#define DEBUG_CHAR (DEBUG_BASE + 0)
#define DEBUG_ARG (DEBUG_BASE + 4)
#define DEBUG_CMD (DEBUG_BASE + 8)
#define DBG_BEGIN 1
#define DBG_END 2
#define DBG_RESULT 3
#define DBG_IOS 4
#define DBG_ERRORS 5
#define DBG_KEY 6
#define DBG_VALUE 7
#define DBG_MARK 0x10 /* DBG_MARK + n: start of phase n + 1 of the measurement window */

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outw(u16 port, u16 v) { __asm__ volatile("outw %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u16 inw(u16 port) { u16 v; __asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u32 inl(u16 port) { u32 v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port)); return v; }

/* String I/O, as Linux's ioread16_rep/iowrite16_rep. */
static inline void insw(u16 port, void *buf, size_t n)
{
	__asm__ volatile("cld; rep insw" : "+D"(buf), "+c"(n) : "d"(port) : "memory");
}
static inline void outsw(u16 port, const void *buf, size_t n)
{
	__asm__ volatile("cld; rep outsw" : "+S"(buf), "+c"(n) : "d"(port) : "memory");
}

static inline u8 mmio_read8(u64 a) { return *(volatile u8 *)a; }
static inline u16 mmio_read16(u64 a) { return *(volatile u16 *)a; }
static inline u32 mmio_read32(u64 a) { return *(volatile u32 *)a; }
static inline void mmio_write8(u64 a, u8 v) { *(volatile u8 *)a = v; }
static inline void mmio_write16(u64 a, u16 v) { *(volatile u16 *)a = v; }
static inline void mmio_write32(u64 a, u32 v) { *(volatile u32 *)a = v; }

/* Wait for an interrupt: exits to the VMM (HLT), which resumes us once a line is up. */
static inline void wait_for_interrupt(void) { __asm__ volatile("hlt" ::: "memory"); }

#define IRQ_VECTOR_BASE 0x20
typedef void (*irq_handler_t)(int irq);
void irq_install(int irq, irq_handler_t handler); /* irq 0..15; loads the IDT */
/* STI; HLT; CLI: halts with interrupts enabled, the handler runs before we return. */
static inline void irq_wait(void) { __asm__ volatile("sti; hlt; cli" ::: "memory"); }

static inline void barrier(void) { __asm__ volatile("" ::: "memory"); }

void *memset(void *d, int c, size_t n);
void *memcpy(void *d, const void *s, size_t n);
int memcmp(const void *a, const void *b, size_t n);

void dbg_putc(char c);
void dbg_puts(const char *s);
void dbg_hex(u64 v);
void dbg_cmd(u8 cmd, u32 arg);
/* Measurement marks: a single CMD write, so the window holds no debug-port exits. */
static inline void dbg_mark(u8 cmd) { outb(DEBUG_CMD, cmd); }
void dbg_value(u32 key, u32 value);

int main(void);

/* The data pattern every workload writes and verifies: word i of the 512-byte
 * sector at `lba`, salted with `seed` (the host checks the image with the same). */
static inline u64 pattern_word(u64 lba, u32 i, u32 seed)
{
	return ((lba + i / 64) << 32 | (i & 63)) ^ seed ^ 0x5A5A5A5A00000000ULL;
}

static inline void fill(u64 *buf, u32 words, u64 lba, u32 seed)
{
	for (u32 i = 0; i < words; i++)
		buf[i] = pattern_word(lba, i, seed);
}

static inline u32 check(const u64 *buf, u32 words, u64 lba, u32 seed)
{
	u32 bad = 0;
	for (u32 i = 0; i < words; i++)
		if (buf[i] != pattern_word(lba, i, seed))
			bad++;
	return bad;
}

#endif
