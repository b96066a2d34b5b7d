#include "runtime.h"

void _start(void) __attribute__((noreturn, section(".text.start")));

void _start(void)
{
	int rc = main();
	dbg_cmd(DBG_RESULT, (u32)rc);
	for (;;)
		__asm__ volatile("cli; hlt");
}

void *memset(void *d, int c, size_t n)
{
	u8 *p = d;
	while (n--)
		*p++ = (u8)c;
	return d;
}

void *memcpy(void *d, const void *s, size_t n)
{
	u8 *p = d;
	const u8 *q = s;
	while (n--)
		*p++ = *q++;
	return d;
}

int memcmp(const void *a, const void *b, size_t n)
{
	const u8 *p = a, *q = b;
	for (; n; n--, p++, q++)
		if (*p != *q)
			return *p - *q;
	return 0;
}

void dbg_putc(char c) { outb(DEBUG_CHAR, (u8)c); }

void dbg_puts(const char *s)
{
	while (*s)
		dbg_putc(*s++);
}

void dbg_hex(u64 v)
{
	static const char digits[] = "0123456789abcdef";
	dbg_puts("0x");
	for (int i = 60; i >= 0; i -= 4)
		dbg_putc(digits[(v >> i) & 0xf]);
}

void dbg_cmd(u8 cmd, u32 arg)
{
	outl(DEBUG_ARG, arg);
	outb(DEBUG_CMD, cmd);
}

void dbg_value(u32 key, u32 value)
{
	dbg_cmd(DBG_KEY, key);
	dbg_cmd(DBG_VALUE, value);
}

/* --- interrupts: IDT gates for vectors IRQ_VECTOR_BASE..+15 ------------------------- */
struct idt_gate {
	u16 off0;
	u16 selector;
	u8 ist;
	u8 attr;
	u16 off1;
	u32 off2;
	u32 reserved;
} __attribute__((packed));

struct idt_ptr {
	u16 limit;
	u64 base;
} __attribute__((packed));

#define CODE_SELECTOR 0x08
#define GATE_INTERRUPT 0x8E /* present, DPL 0, 64-bit interrupt gate */

static struct idt_gate idt[256] __attribute__((aligned(16)));
static irq_handler_t irq_handlers[16];

void irq_dispatch(u64 vector);
void irq_dispatch(u64 vector)
{
	u64 irq = vector - IRQ_VECTOR_BASE;
	if (irq < 16 && irq_handlers[irq])
		irq_handlers[irq]((int)irq);
}

/* Stubs: save the caller-saved registers, call irq_dispatch(vector), IRETQ.  On entry the
 * CPU has aligned RSP to 16 and pushed 5 qwords; 9 pushes re-align it for the call. */
__asm__(".macro IRQ_STUB n\n"
	".globl irq_stub_\\n\n"
	"irq_stub_\\n:\n"
	"push %rax; push %rcx; push %rdx; push %rsi; push %rdi\n"
	"push %r8; push %r9; push %r10; push %r11\n"
	"mov $(0x20 + \\n), %edi\n"
	"call irq_dispatch\n"
	"pop %r11; pop %r10; pop %r9; pop %r8\n"
	"pop %rdi; pop %rsi; pop %rdx; pop %rcx; pop %rax\n"
	"iretq\n"
	".endm\n"
	".text\n"
	".irp n,0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15\n"
	"IRQ_STUB \\n\n"
	".endr\n");

extern char irq_stub_0[], irq_stub_1[], irq_stub_2[], irq_stub_3[], irq_stub_4[],
	irq_stub_5[], irq_stub_6[], irq_stub_7[], irq_stub_8[], irq_stub_9[], irq_stub_10[],
	irq_stub_11[], irq_stub_12[], irq_stub_13[], irq_stub_14[], irq_stub_15[];

static char *const irq_stubs[16] = {
	irq_stub_0,  irq_stub_1,  irq_stub_2,  irq_stub_3, irq_stub_4,  irq_stub_5,
	irq_stub_6,  irq_stub_7,  irq_stub_8,  irq_stub_9, irq_stub_10, irq_stub_11,
	irq_stub_12, irq_stub_13, irq_stub_14, irq_stub_15,
};

void irq_install(int irq, irq_handler_t handler)
{
	u64 addr = (u64)irq_stubs[irq];
	struct idt_gate *g = &idt[IRQ_VECTOR_BASE + irq];
	g->off0 = (u16)addr;
	g->selector = CODE_SELECTOR;
	g->ist = 0;
	g->attr = GATE_INTERRUPT;
	g->off1 = (u16)(addr >> 16);
	g->off2 = (u32)(addr >> 32);
	g->reserved = 0;
	irq_handlers[irq] = handler;
	struct idt_ptr p = { sizeof(idt) - 1, (u64)idt };
	__asm__ volatile("lidt %0" : : "m"(p) : "memory");
}
