/* Multiboot stub: runs a pyvirtio guest program (64-bit ELF) in QEMU as the VMM would.
 *
 * Built 32-bit (-m32) and linked at STUB_ADDR, with a Multiboot 1 header using the
 * address fields (flag 16), so QEMU's -kernel loads it as a flat image and enters
 * stub_entry in 32-bit protected mode with paging off.  Two Multiboot modules
 * (-initrd "program.elf,params.bin"): the guest program and its parameter block.
 *
 * The stub sets up what emulator/memory.py and machine.py give a guest: the parameter
 * block at PARAMS_ADDR, the ELF's PT_LOAD segments at their physical addresses (BSS
 * zeroed), the flat GDT at 0x1000, a 4 GiB identity map of 2 MiB pages at 0x8000
 * (uncached above `ram_top`), long mode, RSP = STACK_TOP - 8, and jumps to the entry.
 * A failure writes a code to the debug port's RESULT command and halts.
 */
typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define MB_MAGIC 0x1BADB002u
#define MB_FLAGS ((1u << 16) | (1u << 1) | (1u << 0)) /* address fields, mem info, align */
#define MB_BOOT_MAGIC 0x2BADB002u
#define STUB_ADDR 0x1000000u

#define GDT_ADDR 0x1000u
#define PARAMS_ADDR 0x3000u
#define PARAMS_MAX 0x1000u
#define PML4_ADDR 0x8000u
#define PDPT_ADDR 0x9000u
#define PD_ADDR 0xA000u
#define STACK_TOP 0x80000u
#define DEBUG_ARG 0x504
#define DEBUG_CMD 0x508
#define DBG_RESULT 3

extern char stub_entry[];

struct mb_header {
	u32 magic, flags, checksum, header_addr, load_addr, load_end_addr, bss_end_addr, entry;
};

__attribute__((section(".multiboot"), used)) static const struct mb_header mb = {
	MB_MAGIC, MB_FLAGS, -(MB_MAGIC + MB_FLAGS), STUB_ADDR, STUB_ADDR, 0, 0,
	(u32)(unsigned long)stub_entry,
};

struct mb_info {
	u32 flags, mem_lower, mem_upper, boot_device, cmdline, mods_count, mods_addr;
};
struct mb_module {
	u32 start, end, string, reserved;
};

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port)); }

static void fail(u32 code)
{
	outl(DEBUG_ARG, 0x100 + code);
	outb(DEBUG_CMD, DBG_RESULT);
	for (;;)
		__asm__ volatile("cli; hlt");
}

static void copy(u32 dst, u32 src, u32 n)
{
	u8 *d = (u8 *)dst;
	const u8 *s = (const u8 *)src;
	while (n--)
		*d++ = *s++;
}

static void zero(u32 dst, u32 n)
{
	u8 *d = (u8 *)dst;
	while (n--)
		*d++ = 0;
}

static u64 rd64(u32 a) { return *(const u64 *)a; }
static u32 rd32(u32 a) { return *(const u32 *)a; }
static u16 rd16(u32 a) { return *(const u16 *)a; }

/* Load the ELF64 image in [elf, elf + size); returns its entry point. */
static u32 load_elf(u32 elf, u32 size)
{
	if (size < 64 || rd32(elf) != 0x464C457Fu || *(u8 *)(elf + 4) != 2)
		fail(3);
	u64 phoff = rd64(elf + 32);
	u16 phentsize = rd16(elf + 54), phnum = rd16(elf + 56);
	if (phoff + (u64)phentsize * phnum > size)
		fail(4);
	for (u32 i = 0; i < phnum; i++) {
		u32 ph = elf + (u32)phoff + i * phentsize;
		if (rd32(ph) != 1) /* PT_LOAD */
			continue;
		u64 off = rd64(ph + 8), paddr = rd64(ph + 24), filesz = rd64(ph + 32),
		    memsz = rd64(ph + 40);
		if (off + filesz > size || filesz > memsz || paddr + memsz > STUB_ADDR)
			fail(5);
		copy((u32)paddr, elf + (u32)off, (u32)filesz);
		zero((u32)(paddr + filesz), (u32)(memsz - filesz));
	}
	return (u32)rd64(elf + 24);
}

static void build_tables(u32 ram_top)
{
	u64 *gdt = (u64 *)GDT_ADDR;
	gdt[0] = 0;
	gdt[1] = 0x00AF9A000000FFFFull; /* 64-bit code, selector 0x08 */
	gdt[2] = 0x00CF92000000FFFFull; /* data, selector 0x10 */
	zero(PML4_ADDR, PD_ADDR + 4 * 0x1000 - PML4_ADDR);
	*(u64 *)PML4_ADDR = PDPT_ADDR | 3;
	for (u32 g = 0; g < 4; g++) {
		((u64 *)PDPT_ADDR)[g] = (PD_ADDR + g * 0x1000) | 3;
		for (u32 i = 0; i < 512; i++) {
			u64 phys = ((u64)g << 30) | ((u64)i << 21);
			u64 flags = 0x83; /* P, RW, PS */
			if (phys >= ram_top)
				flags |= 0x18; /* PCD, PWT: device space */
			((u64 *)(PD_ADDR + g * 0x1000))[i] = phys | flags;
		}
	}
}

void stub_main(u32 magic, const struct mb_info *mbi) __attribute__((used, noreturn));
void stub_main(u32 magic, const struct mb_info *mbi)
{
	if (magic != MB_BOOT_MAGIC || !(mbi->flags & (1u << 3)) || mbi->mods_count < 2)
		fail(1);
	const struct mb_module *mods = (const struct mb_module *)mbi->mods_addr;
	u32 plen = mods[1].end - mods[1].start;
	if (plen > PARAMS_MAX)
		fail(2);
	u32 entry = load_elf(mods[0].start, mods[0].end - mods[0].start);
	zero(PARAMS_ADDR, PARAMS_MAX);
	copy(PARAMS_ADDR, mods[1].start, plen);
	build_tables((mbi->mem_upper + 1024) * 1024);
	struct {
		u16 limit;
		u32 base;
	} __attribute__((packed)) gdtr = { 3 * 8 - 1, GDT_ADDR };
	__asm__ volatile(
		"lgdt %0\n"
		"mov %%cr4, %%eax\n"
		"or $0x620, %%eax\n" /* PAE, OSFXSR, OSXMMEXCPT */
		"mov %%eax, %%cr4\n"
		"mov %1, %%eax\n"
		"mov %%eax, %%cr3\n"
		"mov $0xC0000080, %%ecx\n"
		"rdmsr\n"
		"or $0x100, %%eax\n" /* EFER.LME */
		"wrmsr\n"
		"mov %%cr0, %%eax\n"
		"or $0x80010033, %%eax\n" /* PG, WP, NE, ET, MP, PE */
		"mov %%eax, %%cr0\n"
		"mov %2, %%edi\n"
		"ljmp $0x08, $long_entry\n"
		".code64\n"
		"long_entry:\n"
		"mov $0x10, %%eax\n"
		"mov %%eax, %%ds\n"
		"mov %%eax, %%es\n"
		"mov %%eax, %%ss\n"
		"mov %%eax, %%fs\n"
		"mov %%eax, %%gs\n"
		"mov %%edi, %%edi\n"
		"mov %3, %%esp\n"
		"xor %%ebp, %%ebp\n"
		"push $0\n" /* the return slot the VMM leaves: RSP = STACK_TOP - 8 */
		"jmp *%%rdi\n"
		".code32\n"
		:
		: "m"(gdtr), "i"(PML4_ADDR), "r"(entry), "i"(STACK_TOP)
		: "eax", "ecx", "edx", "edi", "memory");
	__builtin_unreachable();
}

/* Entry from the Multiboot loader: EAX = magic, EBX = info; no stack yet. */
__asm__(".text\n"
	".globl stub_entry\n"
	"stub_entry:\n"
	"cli\n"
	"mov $0x90000, %esp\n"
	"push %ebx\n"
	"push %eax\n"
	"call stub_main\n");
