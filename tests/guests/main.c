/*
 * C part shared by pvh.elf, linux64.elf and bzimage. Entered in 64-bit mode
 * with the first 4 GiB identity-mapped, so physical address == pointer.
 * Reads the boot information (PVH start_info or Linux zero page), then runs
 * the test named by "mode=NAME" on the command line (default "info").
 * All output goes to the COM1 UART.
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#define BOOT_PVH	1	/* must match pvh.S */
#define BOOT_LINUX64	2	/* must match linux64.S */

#define PORT_COM1	0x3f8
#define PORT_MARKER	0x440	/* VMM boot-time marker */
#define PORT_I8042	0x64	/* 0xfe = reset */
#define PORT_DEBUG_EXIT	0xf4	/* QEMU isa-debug-exit */

#define TRAMP		0x8000	/* AP trampoline; STARTUP vector 0x08 */
#define TSC_PER_US	4000	/* assume TSC <= 4 GHz: delays are never short */

/* ---- low-level helpers ---- */

static inline void outb(uint16_t port, uint8_t v)
{
	__asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port));
}

static inline uint8_t inb(uint16_t port)
{
	uint8_t v;
	__asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}

static inline uint64_t rdtsc(void)
{
	uint32_t lo, hi;
	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return (uint64_t)hi << 32 | lo;
}

static void udelay(uint64_t us)
{
	uint64_t end = rdtsc() + us * TSC_PER_US;
	while (rdtsc() < end)
		__asm__ volatile("pause");
}

static __attribute__((noreturn)) void halt_forever(void)
{
	for (;;)
		__asm__ volatile("cli; hlt");
}

static __attribute__((noreturn)) void i8042_reset(void)
{
	outb(PORT_I8042, 0xfe);
	halt_forever();		/* no i8042: hang visibly rather than guess */
}

/*
 * Pointer to a physical address. The empty asm hides the value from GCC,
 * which otherwise warns about dereferencing constant low addresses.
 */
static inline void *phys(uint64_t addr)
{
	__asm__("" : "+r"(addr));
	return (void *)addr;
}

/* Only the first 4 GiB are mapped. */
static int mapped(uint64_t addr, uint64_t len)
{
	return addr < (1ULL << 32) && len <= (1ULL << 32) - addr;
}

static uint8_t rd8(const void *p, size_t off) { return ((const uint8_t *)p)[off]; }

static uint16_t rd16(const void *p, size_t off)
{
	uint16_t v;
	__builtin_memcpy(&v, (const uint8_t *)p + off, sizeof(v));
	return v;
}

static uint32_t rd32(const void *p, size_t off)
{
	uint32_t v;
	__builtin_memcpy(&v, (const uint8_t *)p + off, sizeof(v));
	return v;
}

static uint64_t rd64(const void *p, size_t off)
{
	uint64_t v;
	__builtin_memcpy(&v, (const uint8_t *)p + off, sizeof(v));
	return v;
}

static int streq(const char *a, const char *b)
{
	while (*a && *a == *b)
		a++, b++;
	return *a == *b;
}

/* ---- output ---- */

static void putch(char c)
{
	if (c == '\n')
		putch('\r');
	while (!(inb(PORT_COM1 + 5) & 0x20))	/* LSR.THRE */
		;
	outb(PORT_COM1, c);
}

static void putnum(uint64_t v, unsigned base, int width)
{
	char buf[24];
	int n = 0;

	do {
		buf[n++] = "0123456789abcdef"[v % base];
		v /= base;
	} while (v);
	while (n < width)
		buf[n++] = '0';
	while (n)
		putch(buf[--n]);
}

/* Tiny printf: %s %c %u %x with optional zero-padded width and 'l'. */
static __attribute__((format(printf, 1, 2))) void print(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	for (; *fmt; fmt++) {
		int width = 0, lng = 0;
		uint64_t v;

		if (*fmt != '%') {
			putch(*fmt);
			continue;
		}
		fmt++;
		while (*fmt >= '0' && *fmt <= '9')
			width = width * 10 + (*fmt++ - '0');
		if (*fmt == 'l')
			lng = 1, fmt++;
		switch (*fmt) {
		case 's':
			for (const char *s = va_arg(ap, const char *); *s; s++)
				putch(*s);
			break;
		case 'c':
			putch((char)va_arg(ap, int));
			break;
		case 'u':
		case 'x':
			v = lng ? va_arg(ap, unsigned long) : va_arg(ap, unsigned int);
			putnum(v, *fmt == 'x' ? 16 : 10, width);
			break;
		default:
			putch('%');
			if (!*fmt)
				goto out;
			putch(*fmt);
		}
	}
out:
	va_end(ap);
}

/* ---- boot information ---- */

struct boot {
	int pvh;
	const uint8_t *info;	/* start_info or zero page */
	const char *cmdline;
	const uint8_t *memmap;	/* NULL if none */
	uint32_t mem_entries;
	unsigned mem_stride;	/* PVH: 24 bytes, e820: 20 bytes */
	int has_initrd;
	uint64_t initrd_addr, initrd_size;
};

static const char *cstr(uint64_t addr)
{
	return addr && mapped(addr, 1) ? phys(addr) : "";
}

static void parse_pvh(struct boot *b, uint64_t si)
{
	const uint8_t *p = phys(si);

	b->pvh = 1;
	b->info = p;
	b->cmdline = "";
	if (rd32(p, 0) != 0x336ec578)	/* bad magic: trust nothing else */
		return;
	b->cmdline = cstr(rd64(p, 24));
	if (rd32(p, 4) >= 1 && mapped(rd64(p, 40), 1)) {	/* memmap is v1+ */
		b->memmap = phys(rd64(p, 40));
		b->mem_entries = rd32(p, 48);
		b->mem_stride = 24;
	}
	if (rd32(p, 12) >= 1 && mapped(rd64(p, 16), 32)) {	/* module 0 */
		const uint8_t *mod = phys(rd64(p, 16));
		b->has_initrd = 1;
		b->initrd_addr = rd64(mod, 0);
		b->initrd_size = rd64(mod, 8);
	}
}

static void parse_zeropage(struct boot *b, uint64_t zp)
{
	const uint8_t *p = phys(zp);

	b->info = p;
	b->cmdline = cstr(rd32(p, 0x228) | (uint64_t)rd32(p, 0x0c8) << 32);
	b->memmap = p + 0x2d0;
	b->mem_entries = rd8(p, 0x1e8);
	b->mem_stride = 20;
	b->initrd_addr = rd32(p, 0x218) | (uint64_t)rd32(p, 0x0c0) << 32;
	b->initrd_size = rd32(p, 0x21c) | (uint64_t)rd32(p, 0x0c4) << 32;
	b->has_initrd = b->initrd_addr && b->initrd_size;
}

/* Copies the value of the "NAME" token ("NAME" or "NAME=value") or returns 0. */
static int cmdline_token(const char *cmd, const char *name, char *val, size_t len)
{
	while (*cmd) {
		const char *n = name, *t = cmd;

		while (*t && *t != ' ' && *n && *t == *n)
			t++, n++;
		if (!*n && (!*t || *t == ' ' || *t == '=')) {
			size_t i = 0;

			if (*t == '=')
				for (t++; *t && *t != ' ' && i + 1 < len; t++)
					val[i++] = *t;
			if (len)
				val[i] = 0;
			return 1;
		}
		while (*cmd && *cmd != ' ')
			cmd++;
		while (*cmd == ' ')
			cmd++;
	}
	return 0;
}

/* ---- mode info ---- */

static void mode_info(const struct boot *b)
{
	const uint8_t *p = b->info;
	uint64_t total = 0;

	print("cmdline: %s\n", b->cmdline);
	if (b->pvh)
		print("pvh: magic=%s version=%u nr_modules=%u\n",
		      rd32(p, 0) == 0x336ec578 ? "ok" : "bad", rd32(p, 4), rd32(p, 12));
	else {
		print("zeropage: boot_flag=%s header=%s loader=0x%x\n",
		      rd16(p, 0x1fe) == 0xaa55 ? "ok" : "bad",
		      rd32(p, 0x202) == 0x53726448 ? "ok" : "bad", rd8(p, 0x210));
	}

	print("mem: entries=%u\n", b->mem_entries);
	for (uint32_t i = 0; b->memmap && i < b->mem_entries && i < 128; i++) {
		const uint8_t *e = b->memmap + i * b->mem_stride;

		print("mem[%u]: addr=0x%lx size=0x%lx type=%u\n",
		      i, rd64(e, 0), rd64(e, 8), rd32(e, 16));
		if (rd32(e, 16) == 1)
			total += rd64(e, 8);
	}
	print("ram: total=0x%lx\n", total);

	if (!b->has_initrd) {
		print("initrd: none\n");
	} else if (!mapped(b->initrd_addr, b->initrd_size)) {
		print("initrd: addr=0x%lx size=%lu fnv1a=unmapped\n",
		      b->initrd_addr, b->initrd_size);
	} else {
		const uint8_t *d = phys(b->initrd_addr);
		uint32_t h = 0x811c9dc5;

		for (uint64_t i = 0; i < b->initrd_size; i++)
			h = (h ^ d[i]) * 0x01000193;
		print("initrd: addr=0x%lx size=%lu fnv1a=0x%08x\n",
		      b->initrd_addr, b->initrd_size, h);
	}
}

/* ---- mode smp: Intel MP table 1.4 and AP startup ---- */

static uint8_t checksum(const uint8_t *p, size_t n)
{
	uint8_t s = 0;

	while (n--)
		s += *p++;
	return s;
}

/* Floating pointer "_MP_" on a 16-byte boundary in [base, base + len). */
static uint64_t mp_scan(uint64_t base, uint64_t len)
{
	for (uint64_t a = base; a + 16 <= base + len; a += 16) {
		const uint8_t *p = phys(a);

		if (rd32(p, 0) == 0x5f504d5f && checksum(p, 16) == 0)
			return a;
	}
	return 0;
}

/* Base table entries: processor entries are 20 bytes, the others 8. */
static const uint8_t *mp_next(const uint8_t *e, const uint8_t *end)
{
	if (e[0] > 4)
		return end;	/* unknown type: size unknown, stop */
	return e + (e[0] == 0 ? 20 : 8);
}

static const char *mp_irqtype(const uint8_t *cfg, const uint8_t *end, int pin)
{
	static const char *const names[] = { "int", "nmi", "smi", "extint" };

	for (const uint8_t *e = cfg + 44; e + 8 <= end; e = mp_next(e, end))
		if (e[0] == 4 && e[7] == pin)
			return e[1] < 4 ? names[e[1]] : "other";
	return "none";
}

static void lapic_icr(volatile uint32_t *lapic, uint32_t low)
{
	uint64_t end = rdtsc() + 10000ULL * TSC_PER_US;

	lapic[0x310 / 4] = 0;		/* destination: unused with a shorthand */
	lapic[0x300 / 4] = low;
	while ((lapic[0x300 / 4] & (1 << 12)) && rdtsc() < end)	/* delivery status */
		__asm__ volatile("pause");
}

static void start_aps(uint64_t lapic_addr, unsigned expected)
{
	extern const char ap_tramp[], ap_tramp_end[], ap_count[];
	volatile uint32_t *lapic = phys(lapic_addr);
	volatile uint16_t *count = phys(TRAMP + (ap_count - ap_tramp));
	uint8_t *dst = phys(TRAMP);
	uint64_t end;

	for (const char *s = ap_tramp; s < ap_tramp_end; s++)
		*dst++ = *s;
	*count = 0;

	lapic[0xf0 / 4] |= 0x100;		/* SVR: software-enable the LAPIC */
	lapic_icr(lapic, 0x000c4500);		/* INIT, all excluding self */
	udelay(10000);
	lapic_icr(lapic, 0x000c4600 | (TRAMP >> 12));	/* STARTUP */
	udelay(200);
	lapic_icr(lapic, 0x000c4600 | (TRAMP >> 12));

	end = rdtsc() + 1000000ULL * TSC_PER_US;
	while (*count < expected && rdtsc() < end)
		__asm__ volatile("pause");
	print("smp: aps_started=%u expected=%u\n", *count, expected);
}

static void cpuid(uint32_t leaf, uint32_t sub, uint32_t r[4])
{
	__asm__ volatile("cpuid" : "=a"(r[0]), "=b"(r[1]), "=c"(r[2]), "=d"(r[3]) : "a"(leaf), "c"(sub));
}

/* What Linux derives the package topology from: leaf 0xb's core level and leaf 1. */
static void print_topology(void)
{
	uint32_t r[4];

	cpuid(1, 0, r);
	print("cpuid: leaf1 apic_id=%u logical=%u\n", r[1] >> 24, (r[1] >> 16) & 0xff);
	cpuid(0, 0, r);
	if (r[0] < 0xb) {
		print("cpuid: no leaf 0xb\n");
		return;
	}
	cpuid(0xb, 1, r);
	print("cpuid: leaf 0xb core level type=%u count=%u shift=%u\n", (r[2] >> 8) & 0xff, r[1] & 0xffff, r[0] & 0x1f);
}

static void mode_smp(const struct boot *b)
{
	uint64_t ebda = (uint64_t)rd16(phys(0x40e), 0) << 4;
	uint64_t fp = 0, cfg_addr;
	const uint8_t *cfg, *end;
	unsigned cpus = 0, nirq = 0, ioapic_id = 0, have_ioapic = 0, identity = 1;
	int bsp = -1;
	const char *sep = "";
	uint8_t seen[32] = { 0 };	/* bitmap of src_bus_irq values */
	char val[8];

	print_topology();
	if (ebda)
		fp = mp_scan(ebda, 1024);
	if (!fp)
		fp = mp_scan(0x9fc00, 0x400);
	if (!fp)
		fp = mp_scan(0xf0000, 0x10000);
	if (!fp) {
		print("mptable: none\n");
		return;
	}

	cfg_addr = rd32(phys(fp), 4);
	cfg = phys(cfg_addr);
	if (!cfg_addr || !mapped(cfg_addr, 44) || rd32(cfg, 0) != 0x504d4350 /* PCMP */ ||
	    rd16(cfg, 4) < 44) {
		print("mptable: found=0x%lx config=0x%lx checksum=bad\n", fp, cfg_addr);
		return;
	}
	end = cfg + rd16(cfg, 4);
	print("mptable: found=0x%lx config=0x%lx checksum=%s\n", fp, cfg_addr,
	      checksum(cfg, rd16(cfg, 4)) == 0 ? "ok" : "bad");
	print("mptable: lapic=0x%x\n", rd32(cfg, 36));

	/* Processors: count, BSP and id list in one pass. */
	print("mptable: cpus=");
	for (const uint8_t *e = cfg + 44; e + 8 <= end; e = mp_next(e, end)) {
		if (e[0] != 0)
			continue;
		if (e[3] & 1)
			cpus++;
		if (e[3] & 2)
			bsp = e[1];
	}
	print("%u bsp=", cpus);
	if (bsp < 0)
		print("none");
	else
		print("%u", bsp);
	print(" apic_ids=");
	for (const uint8_t *e = cfg + 44; e + 8 <= end; e = mp_next(e, end)) {
		if (e[0] == 0 && (e[3] & 1)) {
			print("%s%u", sep, e[1]);
			sep = ",";
		}
	}
	print("\n");

	for (const uint8_t *e = cfg + 44; e + 8 <= end; e = mp_next(e, end)) {
		if (e[0] != 2)
			continue;
		print("mptable: ioapic id=%u addr=0x%x enabled=%u\n", e[1], rd32(e, 4), e[3] & 1);
		if (!have_ioapic)
			ioapic_id = e[1], have_ioapic = 1;
	}
	if (!have_ioapic)
		print("mptable: ioapic none\n");

	/* identity: src_bus_irq == intin, all distinct in 0..n-1, first IOAPIC */
	for (const uint8_t *e = cfg + 44; e + 8 <= end; e = mp_next(e, end)) {
		if (e[0] != 3)
			continue;
		nirq++;
		if (e[5] != e[7] || !have_ioapic || e[6] != ioapic_id ||
		    (seen[e[5] / 8] & (1 << (e[5] % 8))))
			identity = 0;
		seen[e[5] / 8] |= 1 << (e[5] % 8);
	}
	for (unsigned i = 0; i < nirq && identity; i++)
		if (i >= 256 || !(seen[i / 8] & (1 << (i % 8))))
			identity = 0;
	print("mptable: irqs=%u identity=%s\n", nirq, identity ? "yes" : "no");

	print("mptable: lint0=%s lint1=%s\n", mp_irqtype(cfg, end, 0), mp_irqtype(cfg, end, 1));

	for (const uint8_t *e = cfg + 44; e + 8 <= end; e = mp_next(e, end)) {
		char name[7];
		int n = 6;

		if (e[0] != 1)
			continue;
		for (int i = 0; i < 6; i++)
			name[i] = e[2 + i];
		while (n > 0 && (name[n - 1] == ' ' || name[n - 1] == 0))
			n--;
		name[n] = 0;
		print("mptable: bus=%s\n", name);
	}

	if (cmdline_token(b->cmdline, "noap", val, sizeof(val)))
		print("smp: aps_skipped\n");
	else
		start_aps(rd32(cfg, 36) ? rd32(cfg, 36) : 0xfee00000, cpus ? cpus - 1 : 0);
}

/* ---- entry ---- */

void guest_main(int boot, uint64_t info);

void guest_main(int boot, uint64_t info)
{
	struct boot b = { 0 };
	char mode[32];

	outb(PORT_MARKER, 123);

	if (boot == BOOT_PVH)
		parse_pvh(&b, info);
	else
		parse_zeropage(&b, info);
	if (!cmdline_token(b.cmdline, "mode", mode, sizeof(mode)))
		__builtin_strcpy(mode, "info");

	print("guest: boot=%s\n", b.pvh ? "pvh" : "linux64");
	print("mode: %s\n", mode);

	if (streq(mode, "info")) {
		mode_info(&b);
	} else if (streq(mode, "smp")) {
		mode_smp(&b);
	} else if (streq(mode, "reset")) {
		print("hello from guest\n");
		i8042_reset();
	} else if (streq(mode, "triple")) {
		static const struct __attribute__((packed)) {
			uint16_t limit;
			uint64_t base;
		} empty_idt = { 0, 0 };

		print("triple: faulting now\n");
		/* #UD with no usable IDT -> #GP -> #DF -> triple fault. */
		__asm__ volatile("lidt %0; ud2" : : "m"(empty_idt));
		print("triple: still alive\n");
		halt_forever();
	} else if (streq(mode, "hang")) {
		print("hang: halting forever\n");
		halt_forever();
	} else if (streq(mode, "spin")) {
		print("spin: spinning forever\n");
		__asm__ volatile("1: jmp 1b");
		__builtin_unreachable();
	} else if (streq(mode, "rep")) {
		/* String port I/O: one exit carries several accesses to one port. */
		static const char msg[] = "rep: outsb works\r\n";
		uint8_t lsr[4] = { 0 };
		const char *src = msg;
		uint8_t *dst = lsr;
		unsigned long n = sizeof(msg) - 1;

		__asm__ volatile("rep outsb" : "+S"(src), "+c"(n) : "d"((uint16_t)PORT_COM1) : "memory");
		n = sizeof(lsr);
		__asm__ volatile("rep insb" : "+D"(dst), "+c"(n) : "d"((uint16_t)(PORT_COM1 + 5)) : "memory");
		print("rep: insb lsr=%x,%x,%x,%x\n", lsr[0], lsr[1], lsr[2], lsr[3]);
	} else if (streq(mode, "cx16")) {
		/*
		 * A ring-0 cmpxchg16b: hardware KVM runs it, PVM's instruction
		 * emulator cannot, which must end the VMM with a clear error.
		 */
		static volatile uint64_t pair[2] __attribute__((aligned(16)));
		uint64_t lo = 0, hi = 0;

		print("cx16: executing cmpxchg16b\n");
		__asm__ volatile("lock cmpxchg16b %0"
				 : "+m"(*pair), "+a"(lo), "+d"(hi)
				 : "b"(1ULL), "c"(2ULL) : "memory", "cc");
		print("cx16: survived pair=%lx,%lx\n", (unsigned long)pair[0], (unsigned long)pair[1]);
	} else if (streq(mode, "exit")) {
		print("exit: writing 0xf4\n");
		outb(PORT_DEBUG_EXIT, 0);
		i8042_reset();
	} else {
		print("error: unknown mode %s\n", mode);
		i8042_reset();
	}
	print("done\n");
	i8042_reset();
}
