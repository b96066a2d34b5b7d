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
