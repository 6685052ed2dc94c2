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

/* ---- mode vsock: a polling virtio-mmio vsock driver ---- */

/* virtio-mmio registers (virtio 1.2, 4.2.2) */
#define VIRTIO_MAGIC		0x000
#define VIRTIO_VERSION		0x004
#define VIRTIO_DEVICE_ID	0x008
#define VIRTIO_DEV_FEAT		0x010
#define VIRTIO_DEV_FEAT_SEL	0x014
#define VIRTIO_DRV_FEAT		0x020
#define VIRTIO_DRV_FEAT_SEL	0x024
#define VIRTIO_QUEUE_SEL	0x030
#define VIRTIO_QUEUE_NUM_MAX	0x034
#define VIRTIO_QUEUE_NUM	0x038
#define VIRTIO_QUEUE_READY	0x044
#define VIRTIO_QUEUE_NOTIFY	0x050
#define VIRTIO_STATUS		0x070
#define VIRTIO_QUEUE_DESC	0x080	/* low; high at +4 */
#define VIRTIO_QUEUE_AVAIL	0x090
#define VIRTIO_QUEUE_USED	0x0a0
#define VIRTIO_CONFIG		0x100

#define VQ_RINGS	0x400000	/* three queues, 16 KiB each: desc, avail, used pages */
#define VQ_BUFS		0x440000	/* RX buffers, then the TX buffer */
#define VQ_N		8		/* entries per queue */
#define VQ_BUF_SIZE	4096

#define VS_REQUEST	1
#define VS_RESPONSE	2
#define VS_RST		3
#define VS_SHUTDOWN	4
#define VS_RW		5
#define VS_CREDIT_UPDATE 6
#define VS_CREDIT_REQUEST 7
#define VS_BUF_ALLOC	65536
#define VS_WAIT_US	10000000ULL	/* 10 s: TSC_PER_US makes it longer, never shorter */

struct vq {
	uint64_t base;		/* desc table; avail ring at +0x1000, used at +0x2000 */
	uint16_t avail_idx;
	uint16_t last_used;
};

struct vsock {
	uint64_t mmio;
	uint64_t cid;
	struct vq q[3];		/* rx, tx, event */
};

struct vpkt {
	uint32_t src_port, dst_port, len, flags, buf_alloc, fwd_cnt;
	uint16_t op;
	char data[VQ_BUF_SIZE];
};

static uint32_t mr(const struct vsock *v, unsigned off)
{
	return *(volatile uint32_t *)phys(v->mmio + off);
}

static void mw(const struct vsock *v, unsigned off, uint32_t val)
{
	*(volatile uint32_t *)phys(v->mmio + off) = val;
}

/* Byte loops through volatile pointers: GCC must not turn them into memcpy calls. */
static void vcopy(uint64_t dst, const void *src, uint32_t n)
{
	volatile uint8_t *d = phys(dst);
	const uint8_t *s = src;

	while (n--)
		*d++ = *s++;
}

static void vzero(uint64_t dst, uint32_t n)
{
	volatile uint8_t *d = phys(dst);

	while (n--)
		*d++ = 0;
}

static void barrier(void)
{
	__asm__ volatile("" ::: "memory");
}

static volatile uint16_t *vq_u16(uint64_t addr) { return phys(addr); }
static volatile uint32_t *vq_u32(uint64_t addr) { return phys(addr); }
static volatile uint64_t *vq_u64(uint64_t addr) { return phys(addr); }

static void vq_desc(struct vq *q, uint16_t i, uint64_t addr, uint32_t len, uint16_t flags)
{
	uint64_t d = q->base + 16 * i;

	*vq_u64(d) = addr;
	*vq_u32(d + 8) = len;
	*vq_u16(d + 12) = flags;
	*vq_u16(d + 14) = 0;
}

static void vq_publish(struct vsock *v, int qi, uint16_t head)
{
	struct vq *q = &v->q[qi];

	*vq_u16(q->base + 0x1000 + 4 + 2 * (q->avail_idx % VQ_N)) = head;
	barrier();
	q->avail_idx++;
	*vq_u16(q->base + 0x1000 + 2) = q->avail_idx;
	barrier();
	mw(v, VIRTIO_QUEUE_NOTIFY, qi);
}

/* Waits for a used entry; returns 1 and its descriptor id and length, or 0 on timeout. */
static int vq_used(struct vq *q, uint64_t us, uint32_t *id, uint32_t *len)
{
	uint64_t end = rdtsc() + us * TSC_PER_US;
	uint64_t e;

	while (*vq_u16(q->base + 0x2000 + 2) == q->last_used) {
		if (rdtsc() > end)
			return 0;
		__asm__ volatile("pause");
	}
	barrier();
	e = q->base + 0x2000 + 4 + 8 * (q->last_used % VQ_N);
	*id = *vq_u32(e);
	*len = *vq_u32(e + 4);
	q->last_used++;
	return 1;
}

static int vq_setup(struct vsock *v, int qi)
{
	struct vq *q = &v->q[qi];

	q->base = VQ_RINGS + 0x4000 * qi;
	vzero(q->base, 0x3000);
	mw(v, VIRTIO_QUEUE_SEL, qi);
	if (mr(v, VIRTIO_QUEUE_NUM_MAX) < VQ_N) {
		print("vsock: queue %u too small\n", qi);
		return 0;
	}
	mw(v, VIRTIO_QUEUE_NUM, VQ_N);
	mw(v, VIRTIO_QUEUE_DESC, q->base);
	mw(v, VIRTIO_QUEUE_DESC + 4, 0);
	mw(v, VIRTIO_QUEUE_AVAIL, q->base + 0x1000);
	mw(v, VIRTIO_QUEUE_AVAIL + 4, 0);
	mw(v, VIRTIO_QUEUE_USED, q->base + 0x2000);
	mw(v, VIRTIO_QUEUE_USED + 4, 0);
	mw(v, VIRTIO_QUEUE_READY, 1);
	return 1;
}

/* "4K@0xd0000000:5" -> 0xd0000000 */
static uint64_t parse_mmio_base(const char *s)
{
	uint64_t base = 0;

	while (*s && *s != '@')
		s++;
	if (s[0] != '@' || s[1] != '0' || s[2] != 'x')
		return 0;
	for (s += 3; *s && *s != ':'; s++) {
		char c = *s;

		if (c >= '0' && c <= '9')
			base = base * 16 + (c - '0');
		else if (c >= 'a' && c <= 'f')
			base = base * 16 + (c - 'a' + 10);
		else
			return 0;
	}
	return base;
}

static int vsock_init(struct vsock *v, const char *cmdline)
{
	char dev[64];

	if (!cmdline_token(cmdline, "virtio_mmio.device", dev, sizeof(dev)) ||
	    !(v->mmio = parse_mmio_base(dev))) {
		print("vsock: no virtio_mmio.device= on the command line\n");
		return 0;
	}
	print("vsock: device at 0x%lx magic=%s version=%u id=%u\n", v->mmio,
	      mr(v, VIRTIO_MAGIC) == 0x74726976 ? "ok" : "bad", mr(v, VIRTIO_VERSION),
	      mr(v, VIRTIO_DEVICE_ID));
	if (mr(v, VIRTIO_MAGIC) != 0x74726976 || mr(v, VIRTIO_VERSION) != 2 ||
	    mr(v, VIRTIO_DEVICE_ID) != 19)
		return 0;

	mw(v, VIRTIO_STATUS, 0);
	mw(v, VIRTIO_STATUS, 1);			/* ACKNOWLEDGE */
	mw(v, VIRTIO_STATUS, 1 | 2);			/* DRIVER */
	mw(v, VIRTIO_DEV_FEAT_SEL, 1);
	if (!(mr(v, VIRTIO_DEV_FEAT) & 1)) {		/* VIRTIO_F_VERSION_1 = bit 32 */
		print("vsock: VERSION_1 not offered\n");
		return 0;
	}
	mw(v, VIRTIO_DRV_FEAT_SEL, 0);
	mw(v, VIRTIO_DRV_FEAT, 0);
	mw(v, VIRTIO_DRV_FEAT_SEL, 1);
	mw(v, VIRTIO_DRV_FEAT, 1);
	mw(v, VIRTIO_STATUS, 1 | 2 | 8);		/* FEATURES_OK */
	if (!(mr(v, VIRTIO_STATUS) & 8)) {
		print("vsock: features refused\n");
		return 0;
	}
	for (int i = 0; i < 3; i++)
		if (!vq_setup(v, i))
			return 0;
	mw(v, VIRTIO_STATUS, 1 | 2 | 8 | 4);		/* DRIVER_OK */
	if (mr(v, VIRTIO_STATUS) != (1 | 2 | 8 | 4)) {
		print("vsock: device refused DRIVER_OK, status=0x%x\n", mr(v, VIRTIO_STATUS));
		return 0;
	}
	v->cid = mr(v, VIRTIO_CONFIG) | (uint64_t)mr(v, VIRTIO_CONFIG + 4) << 32;
	print("vsock: ready guest_cid=%lu\n", v->cid);

	/* All RX buffers to the device; descriptor i is buffer i. */
	for (uint16_t i = 0; i < VQ_N; i++) {
		vq_desc(&v->q[0], i, VQ_BUFS + i * VQ_BUF_SIZE, VQ_BUF_SIZE, 2 /* WRITE */);
		vq_publish(v, 0, i);
	}
	return 1;
}

/* Sends one packet and waits for the device to take it. */
static int vs_send(struct vsock *v, uint32_t src_port, uint32_t dst_port, uint16_t op,
		   uint32_t flags, uint32_t fwd_cnt, const char *data, uint32_t len)
{
	uint64_t buf = VQ_BUFS + VQ_N * VQ_BUF_SIZE;
	uint8_t h[44];
	uint32_t id, used_len;
	uint64_t dst_cid = 2;
	uint16_t type = 1;
	uint32_t buf_alloc = VS_BUF_ALLOC;

	__builtin_memcpy(h + 0, &v->cid, 8);
	__builtin_memcpy(h + 8, &dst_cid, 8);
	__builtin_memcpy(h + 16, &src_port, 4);
	__builtin_memcpy(h + 20, &dst_port, 4);
	__builtin_memcpy(h + 24, &len, 4);
	__builtin_memcpy(h + 28, &type, 2);
	__builtin_memcpy(h + 30, &op, 2);
	__builtin_memcpy(h + 32, &flags, 4);
	__builtin_memcpy(h + 36, &buf_alloc, 4);
	__builtin_memcpy(h + 40, &fwd_cnt, 4);
	vcopy(buf, h, 44);
	vcopy(buf + 44, data, len);
	vq_desc(&v->q[1], 0, buf, 44 + len, 0);
	vq_publish(v, 1, 0);
	if (!vq_used(&v->q[1], VS_WAIT_US, &id, &used_len)) {
		print("vsock: TX never completed\n");
		return 0;
	}
	return 1;
}

/* Receives one packet (and gives its buffer back); 0 on timeout. */
static int vs_recv(struct vsock *v, struct vpkt *p)
{
	uint32_t id, len;
	const uint8_t *b;

	if (!vq_used(&v->q[0], VS_WAIT_US, &id, &len))
		return 0;
	if (id >= VQ_N || len < 44 || len > VQ_BUF_SIZE) {
		print("vsock: bad used entry id=%u len=%u\n", id, len);
		return 0;
	}
	b = phys(VQ_BUFS + id * VQ_BUF_SIZE);
	p->src_port = rd32(b, 16);
	p->dst_port = rd32(b, 20);
	p->len = rd32(b, 24);
	p->op = rd16(b, 30);
	p->flags = rd32(b, 32);
	p->buf_alloc = rd32(b, 36);
	p->fwd_cnt = rd32(b, 40);
	if (p->len > len - 44)
		p->len = len - 44;
	for (uint32_t i = 0; i < p->len; i++)
		((volatile char *)p->data)[i] = b[44 + i];
	p->data[p->len < VQ_BUF_SIZE ? p->len : VQ_BUF_SIZE - 1] = 0;
	vq_publish(v, 0, id);
	return 1;
}

/*
 * Waits for a packet on connection (local, remote) with one of the ops in mask,
 * answering credit requests on the way. RW payloads are appended to line (up to
 * a newline). Returns the op, or 0 on timeout.
 */
static uint16_t vs_wait(struct vsock *v, uint32_t local, uint32_t remote, unsigned mask,
			uint32_t *fwd_cnt, char *line, uint32_t *line_len, struct vpkt *p)
{
	for (;;) {
		if (!vs_recv(v, p))
			return 0;
		if (p->dst_port != local || (remote && p->src_port != remote))
			continue;	/* another connection's late packet */
		if (p->op == VS_RW && line) {
			for (uint32_t i = 0; i < p->len && *line_len + 1 < 128; i++)
				line[(*line_len)++] = p->data[i];
			line[*line_len] = 0;
			*fwd_cnt += p->len;
		}
		if (p->op == VS_CREDIT_REQUEST)
			vs_send(v, local, p->src_port, VS_CREDIT_UPDATE, 0, *fwd_cnt, "", 0);
		if (mask & (1u << p->op))
			return p->op;
	}
}

static int has_newline(const char *s, uint32_t n)
{
	for (uint32_t i = 0; i < n; i++)
		if (s[i] == '\n')
			return 1;
	return 0;
}

static void chomp(char *s, uint32_t n)
{
	if (n && s[n - 1] == '\n')
		s[n - 1] = 0;
}

static void mode_vsock(const struct boot *b)
{
	static struct vsock v;
	static struct vpkt p;
	static char line[128];
	uint32_t fwd = 0, n = 0, local = 49152, peer;
	uint16_t op;

	if (!vsock_init(&v, b->cmdline))
		return;

	/* Guest to host: CID 2, port 1234. */
	vs_send(&v, local, 1234, VS_REQUEST, 0, 0, "", 0);
	op = vs_wait(&v, local, 1234, 1u << VS_RESPONSE | 1u << VS_RST, &fwd, NULL, NULL, &p);
	if (op != VS_RESPONSE) {
		print("vsock: connect to port 1234 failed (op %u)\n", op);
		return;
	}
	print("vsock: connected to host port 1234\n");
	vs_send(&v, local, 1234, VS_RW, 0, fwd, "hello from guest\n", 17);
	while (!has_newline(line, n)) {
		op = vs_wait(&v, local, 1234, 1u << VS_RW | 1u << VS_SHUTDOWN | 1u << VS_RST,
			     &fwd, line, &n, &p);
		if (op != VS_RW)
			break;
	}
	chomp(line, n);
	print("vsock: got %s\n", line);
	vs_send(&v, local, 1234, VS_SHUTDOWN, 3, fwd, "", 0);
	op = vs_wait(&v, local, 1234, 1u << VS_RST, &fwd, NULL, NULL, &p);
	print("vsock: closed %s\n", op == VS_RST ? "ok" : "timeout");

	/* Host to guest: wait for a connection to port 5678 and echo one line. */
	local = 5678;
	fwd = 0;
	n = 0;
	line[0] = 0;
	print("vsock: listening on port 5678\n");
	op = vs_wait(&v, local, 0, 1u << VS_REQUEST, &fwd, NULL, NULL, &p);
	if (op != VS_REQUEST) {
		print("vsock: no connection came\n");
		return;
	}
	peer = p.src_port;
	vs_send(&v, local, peer, VS_RESPONSE, 0, 0, "", 0);
	while (!has_newline(line, n)) {
		op = vs_wait(&v, local, peer, 1u << VS_RW | 1u << VS_SHUTDOWN | 1u << VS_RST,
			     &fwd, line, &n, &p);
		if (op != VS_RW)
			break;
	}
	vs_send(&v, local, peer, VS_RW, 0, fwd, line, n);
	chomp(line, n);
	print("vsock: echoed %s\n", line);
	vs_send(&v, local, peer, VS_SHUTDOWN, 3, fwd, "", 0);
	op = vs_wait(&v, local, peer, 1u << VS_RST, &fwd, NULL, NULL, &p);
	print("vsock: closed %s\n", op == VS_RST ? "ok" : "timeout");
}

/* ---- mode blk: a polling virtio-mmio block driver ---- */

#define BLK_RINGS	0x500000	/* per device, 16 KiB apart: desc, avail, used pages */
#define BLK_BUFS	0x580000	/* per device, 8 KiB apart: header, status, id, data */
#define BLK_MAX		8		/* devices driven */
#define BLK_WAIT_US	10000000ULL

#define BLK_T_IN	0
#define BLK_T_OUT	1
#define BLK_T_FLUSH	4
#define BLK_T_GET_ID	8
#define BLK_F_SEG_MAX	2
#define BLK_F_RO	5
#define BLK_F_BLK_SIZE	6
#define BLK_F_FLUSH	9

#define DESC_NEXT	1
#define DESC_WRITE	2

struct blk {
	uint64_t mmio;
	struct vq q;
	uint64_t bufs;		/* header at +0, status at +0x10, id at +0x20, data at +0x1000 */
	uint64_t capacity;
	int ro;
	char serial[21];
};

static uint32_t reg_rd(uint64_t base, unsigned off)
{
	return *(volatile uint32_t *)phys(base + off);
}

static void reg_wr(uint64_t base, unsigned off, uint32_t val)
{
	*(volatile uint32_t *)phys(base + off) = val;
}

static int starts_with(const char *s, const char *prefix)
{
	while (*prefix && *s == *prefix)
		s++, prefix++;
	return !*prefix;
}

/* Bases of every "virtio_mmio.device=" on the command line, in order. */
static int mmio_devices(const char *cmd, uint64_t *bases, int max)
{
	static const char key[] = "virtio_mmio.device=";
	int n = 0;

	while (*cmd) {
		char tok[64];
		size_t i = 0;

		while (*cmd == ' ')
			cmd++;
		while (*cmd && *cmd != ' ') {
			if (i + 1 < sizeof(tok))
				tok[i++] = *cmd;
			cmd++;
		}
		tok[i] = 0;
		if (n < max && starts_with(tok, key) && (bases[n] = parse_mmio_base(tok + sizeof(key) - 1)))
			n++;
	}
	return n;
}

static void blk_desc(struct vq *q, uint16_t i, uint64_t addr, uint32_t len, uint16_t flags)
{
	uint64_t d = q->base + 16 * i;

	*vq_u64(d) = addr;
	*vq_u32(d + 8) = len;
	*vq_u16(d + 12) = flags;
	*vq_u16(d + 14) = i + 1;
}

/*
 * One request: header, then `len` bytes at `data` (device-writable if `in`),
 * then the status byte. Returns the status, or -1 if the device never answered.
 */
static int blk_rq(struct blk *d, uint32_t type, uint64_t sector, uint64_t data, uint32_t len, int in)
{
	struct vq *q = &d->q;
	volatile uint8_t *status = phys(d->bufs + 0x10);
	uint16_t n = 0;
	uint32_t id, used_len;

	*vq_u32(d->bufs) = type;
	*vq_u32(d->bufs + 4) = 0;
	*vq_u64(d->bufs + 8) = sector;
	*status = 0xff;
	blk_desc(q, n++, d->bufs, 16, DESC_NEXT);
	if (len)
		blk_desc(q, n++, data, len, DESC_NEXT | (in ? DESC_WRITE : 0));
	blk_desc(q, n, d->bufs + 0x10, 1, DESC_WRITE);

	*vq_u16(q->base + 0x1000 + 4 + 2 * (q->avail_idx % VQ_N)) = 0;
	barrier();
	q->avail_idx++;
	*vq_u16(q->base + 0x1000 + 2) = q->avail_idx;
	barrier();
	reg_wr(d->mmio, VIRTIO_QUEUE_NOTIFY, 0);
	if (!vq_used(q, BLK_WAIT_US, &id, &used_len))
		return -1;
	barrier();
	return *status;
}

static int blk_init(struct blk *d, uint64_t base, int index)
{
	uint32_t feat;
	uint64_t ok = 1 | 2 | 8 | 4;

	d->mmio = base;
	d->bufs = BLK_BUFS + 0x2000 * index;
	d->q.base = BLK_RINGS + 0x4000 * index;
	d->q.avail_idx = d->q.last_used = 0;
	vzero(d->q.base, 0x3000);

	reg_wr(base, VIRTIO_STATUS, 0);
	reg_wr(base, VIRTIO_STATUS, 1);			/* ACKNOWLEDGE */
	reg_wr(base, VIRTIO_STATUS, 1 | 2);		/* DRIVER */
	reg_wr(base, VIRTIO_DEV_FEAT_SEL, 1);
	if (!(reg_rd(base, VIRTIO_DEV_FEAT) & 1)) {	/* VIRTIO_F_VERSION_1 = bit 32 */
		print("blk: VERSION_1 not offered\n");
		return 0;
	}
	reg_wr(base, VIRTIO_DEV_FEAT_SEL, 0);
	feat = reg_rd(base, VIRTIO_DEV_FEAT);
	d->ro = !!(feat & (1u << BLK_F_RO));
	reg_wr(base, VIRTIO_DRV_FEAT_SEL, 0);
	reg_wr(base, VIRTIO_DRV_FEAT, feat & (1u << BLK_F_RO | 1u << BLK_F_FLUSH |
					      1u << BLK_F_BLK_SIZE | 1u << BLK_F_SEG_MAX));
	reg_wr(base, VIRTIO_DRV_FEAT_SEL, 1);
	reg_wr(base, VIRTIO_DRV_FEAT, 1);
	reg_wr(base, VIRTIO_STATUS, 1 | 2 | 8);		/* FEATURES_OK */
	if (!(reg_rd(base, VIRTIO_STATUS) & 8)) {
		print("blk: features refused\n");
		return 0;
	}
	reg_wr(base, VIRTIO_QUEUE_SEL, 0);
	if (reg_rd(base, VIRTIO_QUEUE_NUM_MAX) < VQ_N) {
		print("blk: queue too small\n");
		return 0;
	}
	reg_wr(base, VIRTIO_QUEUE_NUM, VQ_N);
	reg_wr(base, VIRTIO_QUEUE_DESC, d->q.base);
	reg_wr(base, VIRTIO_QUEUE_DESC + 4, 0);
	reg_wr(base, VIRTIO_QUEUE_AVAIL, d->q.base + 0x1000);
	reg_wr(base, VIRTIO_QUEUE_AVAIL + 4, 0);
	reg_wr(base, VIRTIO_QUEUE_USED, d->q.base + 0x2000);
	reg_wr(base, VIRTIO_QUEUE_USED + 4, 0);
	reg_wr(base, VIRTIO_QUEUE_READY, 1);
	reg_wr(base, VIRTIO_STATUS, ok);		/* DRIVER_OK */
	if (reg_rd(base, VIRTIO_STATUS) != ok) {
		print("blk: device refused DRIVER_OK, status=0x%x\n", reg_rd(base, VIRTIO_STATUS));
		return 0;
	}
	d->capacity = reg_rd(base, VIRTIO_CONFIG) | (uint64_t)reg_rd(base, VIRTIO_CONFIG + 4) << 32;
	print("blk: device at 0x%lx ro=%u blk_size=%u seg_max=%u\n", base, d->ro,
	      reg_rd(base, VIRTIO_CONFIG + 20), reg_rd(base, VIRTIO_CONFIG + 12));
	return 1;
}

/* A status byte as text: the tiny printf has no %d, and -1 means no answer. */
static const char *blk_status(int st)
{
	static const char *const names[] = { "0", "1", "2" };

	if (st < 0)
		return "timeout";
	return st < 3 ? names[st] : "bad";
}

static void print_hex16(uint64_t addr)
{
	const volatile uint8_t *p = phys(addr);

	for (int i = 0; i < 16; i++)
		print("%02x", p[i]);
}

/* Reads `sector` into the data buffer and prints its first 16 bytes (or the status). */
static void blk_show(struct blk *d, const char *name, uint64_t sector)
{
	int st = blk_rq(d, BLK_T_IN, sector, d->bufs + 0x1000, 512, 1);

	print(" %s=", name);
	if (st == 0)
		print_hex16(d->bufs + 0x1000);
	else
		print("status%s", blk_status(st));
}

static void blk_test(struct blk *d)
{
	volatile uint8_t *data = phys(d->bufs + 0x1000);
	volatile uint8_t *id = phys(d->bufs + 0x20);
	int st, same = 1;

	vzero(d->bufs + 0x20, 20);
	st = blk_rq(d, BLK_T_GET_ID, 0, d->bufs + 0x20, 20, 1);
	for (int i = 0; i < 20; i++)
		d->serial[i] = id[i];
	d->serial[20] = 0;
	if (st != 0)
		print("blk: get_id status=%s\n", blk_status(st));

	print("blk: serial=%s capacity=%lu", d->serial, d->capacity);
	if (d->capacity) {
		blk_show(d, "first", 0);
		blk_show(d, "last", d->capacity - 1);
	}
	print("\n");

	/* Sector 1: a pattern, read back on writable disks; refused on read-only ones. */
	for (int i = 0; i < 512; i++)
		data[i] = (uint8_t)(i * 7 + 3);
	st = blk_rq(d, BLK_T_OUT, 1, d->bufs + 0x1000, 512, 0);
	if (d->ro) {
		print("blk: serial=%s read-only write status=%s\n", d->serial, blk_status(st));
	} else {
		vzero(d->bufs + 0x1000, 512);
		blk_rq(d, BLK_T_IN, 1, d->bufs + 0x1000, 512, 1);
		for (int i = 0; i < 512; i++)
			same &= data[i] == (uint8_t)(i * 7 + 3);
		print("blk: serial=%s write status=%s readback=%s\n", d->serial, blk_status(st),
		      same ? "ok" : "bad");
		print("blk: serial=%s flush status=%s\n", d->serial,
		      blk_status(blk_rq(d, BLK_T_FLUSH, 0, 0, 0, 0)));
	}
	print("blk: serial=%s read past end status=%s\n", d->serial,
	      blk_status(blk_rq(d, BLK_T_IN, d->capacity, d->bufs + 0x1000, 512, 1)));
	print("blk: serial=%s unknown type status=%s\n", d->serial,
	      blk_status(blk_rq(d, 42, 0, 0, 0, 0)));
}

static void mode_blk(const struct boot *b)
{
	static struct blk disks[BLK_MAX];
	uint64_t bases[BLK_MAX + 4];
	int n = mmio_devices(b->cmdline, bases, BLK_MAX + 4), found = 0;

	for (int i = 0; i < n && found < BLK_MAX; i++) {
		if (reg_rd(bases[i], VIRTIO_MAGIC) != 0x74726976 || reg_rd(bases[i], VIRTIO_VERSION) != 2 ||
		    reg_rd(bases[i], VIRTIO_DEVICE_ID) != 2)
			continue;
		if (blk_init(&disks[found], bases[i], found))
			blk_test(&disks[found]);
		found++;
	}
	print("blk: %u devices\n", found);
}

/* ---- mode net: a polling virtio-mmio network driver ---- */

#define NET_RINGS	0x600000	/* rx at +0, tx at +0x4000: desc, avail, used pages */
#define NET_BUFS	0x610000	/* VQ_N receive buffers, then the transmit buffer */
#define NET_BUF_SIZE	2048
#define NET_TX_BUF	(NET_BUFS + VQ_N * NET_BUF_SIZE)
#define NET_HDR		12		/* virtio_net_hdr_v1 */
#define NET_ETH		14
#define NET_F_MAC	5
#define NET_F_MTU	3
#define NET_F_MRG_RXBUF	15
#define NET_ETHERTYPE	0x88b5		/* local experimental */
#define NET_WAIT_US	10000000ULL
#define NET_MAX_PAYLOAD	(NET_BUF_SIZE - NET_HDR - NET_ETH)

struct net {
	uint64_t mmio;
	struct vq q[2];		/* rx, tx */
	uint8_t mac[6];
};

static void net_publish(struct net *d, int qi, uint16_t head)
{
	struct vq *q = &d->q[qi];

	*vq_u16(q->base + 0x1000 + 4 + 2 * (q->avail_idx % VQ_N)) = head;
	barrier();
	q->avail_idx++;
	*vq_u16(q->base + 0x1000 + 2) = q->avail_idx;
	barrier();
	reg_wr(d->mmio, VIRTIO_QUEUE_NOTIFY, qi);
}

static int net_queue(struct net *d, int qi)
{
	struct vq *q = &d->q[qi];

	q->base = NET_RINGS + 0x4000 * qi;
	q->avail_idx = q->last_used = 0;
	vzero(q->base, 0x3000);
	reg_wr(d->mmio, VIRTIO_QUEUE_SEL, qi);
	if (reg_rd(d->mmio, VIRTIO_QUEUE_NUM_MAX) < VQ_N) {
		print("net: queue %u too small\n", qi);
		return 0;
	}
	reg_wr(d->mmio, VIRTIO_QUEUE_NUM, VQ_N);
	reg_wr(d->mmio, VIRTIO_QUEUE_DESC, q->base);
	reg_wr(d->mmio, VIRTIO_QUEUE_DESC + 4, 0);
	reg_wr(d->mmio, VIRTIO_QUEUE_AVAIL, q->base + 0x1000);
	reg_wr(d->mmio, VIRTIO_QUEUE_AVAIL + 4, 0);
	reg_wr(d->mmio, VIRTIO_QUEUE_USED, q->base + 0x2000);
	reg_wr(d->mmio, VIRTIO_QUEUE_USED + 4, 0);
	reg_wr(d->mmio, VIRTIO_QUEUE_READY, 1);
	return 1;
}

static uint8_t net_cfg8(const struct net *d, unsigned off)
{
	return *(volatile uint8_t *)phys(d->mmio + VIRTIO_CONFIG + off);
}

/* Gives receive buffer `id` (descriptor `id`) to the device. */
static void net_post_rx(struct net *d, uint16_t id)
{
	vq_desc(&d->q[0], id, NET_BUFS + id * NET_BUF_SIZE, NET_BUF_SIZE, DESC_WRITE);
	net_publish(d, 0, id);
}

static int net_init(struct net *d, uint64_t base)
{
	uint32_t feat, ok = 1 | 2 | 4 | 8;

	d->mmio = base;
	reg_wr(base, VIRTIO_STATUS, 0);
	reg_wr(base, VIRTIO_STATUS, 1);			/* ACKNOWLEDGE */
	reg_wr(base, VIRTIO_STATUS, 1 | 2);		/* DRIVER */
	reg_wr(base, VIRTIO_DEV_FEAT_SEL, 1);
	if (!(reg_rd(base, VIRTIO_DEV_FEAT) & 1)) {	/* VIRTIO_F_VERSION_1 = bit 32 */
		print("net: VERSION_1 not offered\n");
		return 0;
	}
	reg_wr(base, VIRTIO_DEV_FEAT_SEL, 0);
	feat = reg_rd(base, VIRTIO_DEV_FEAT);
	if (!(feat & (1u << NET_F_MAC))) {
		print("net: MAC not offered\n");
		return 0;
	}
	feat &= 1u << NET_F_MAC | 1u << NET_F_MTU | 1u << NET_F_MRG_RXBUF;
	reg_wr(base, VIRTIO_DRV_FEAT_SEL, 0);
	reg_wr(base, VIRTIO_DRV_FEAT, feat);
	reg_wr(base, VIRTIO_DRV_FEAT_SEL, 1);
	reg_wr(base, VIRTIO_DRV_FEAT, 1);
	reg_wr(base, VIRTIO_STATUS, 1 | 2 | 8);		/* FEATURES_OK */
	if (!(reg_rd(base, VIRTIO_STATUS) & 8)) {
		print("net: features refused\n");
		return 0;
	}
	if (!net_queue(d, 0) || !net_queue(d, 1))
		return 0;
	reg_wr(base, VIRTIO_STATUS, ok);		/* DRIVER_OK */
	if (reg_rd(base, VIRTIO_STATUS) != ok) {
		print("net: device refused DRIVER_OK, status=0x%x\n", reg_rd(base, VIRTIO_STATUS));
		return 0;
	}
	for (int i = 0; i < 6; i++)
		d->mac[i] = net_cfg8(d, i);
	print("net: device at 0x%lx mac=%02x:%02x:%02x:%02x:%02x:%02x status=%u mtu=%u mrg_rxbuf=%u\n",
	      base, d->mac[0], d->mac[1], d->mac[2], d->mac[3], d->mac[4], d->mac[5],
	      net_cfg8(d, 6) | net_cfg8(d, 7) << 8, net_cfg8(d, 10) | net_cfg8(d, 11) << 8,
	      !!(feat & (1u << NET_F_MRG_RXBUF)));
	for (uint16_t i = 0; i < VQ_N; i++)
		net_post_rx(d, i);
	return 1;
}

/*
 * Sends one frame of ethertype `type` to `dst` from our MAC: the header and the
 * frame in two descriptors. Returns 1 once the device took it.
 */
static int net_send(struct net *d, const volatile uint8_t *dst, uint16_t type,
		    const volatile char *payload, uint32_t len)
{
	volatile uint8_t *b = phys(NET_TX_BUF);
	uint32_t id, used_len;

	for (int i = 0; i < NET_HDR; i++)
		b[i] = 0;
	for (int i = 0; i < 6; i++) {
		b[NET_HDR + i] = dst[i];
		b[NET_HDR + 6 + i] = d->mac[i];
	}
	b[NET_HDR + 12] = type >> 8;
	b[NET_HDR + 13] = type & 0xff;
	for (uint32_t i = 0; i < len; i++)
		b[NET_HDR + NET_ETH + i] = payload[i];
	blk_desc(&d->q[1], 0, NET_TX_BUF, NET_HDR, DESC_NEXT);
	blk_desc(&d->q[1], 1, NET_TX_BUF + NET_HDR, NET_ETH + len, 0);
	net_publish(d, 1, 0);
	if (!vq_used(&d->q[1], NET_WAIT_US, &id, &used_len)) {
		print("net: TX never completed\n");
		return 0;
	}
	return 1;
}

/*
 * Waits for a frame of ethertype `type`, skipping (and giving back) any other;
 * copies its source MAC and payload (NUL-terminated). Returns the payload
 * length, or -1 on timeout or a bad used entry.
 */
static int net_recv(struct net *d, uint16_t type, volatile uint8_t *src, volatile char *payload,
		    uint16_t *num_buffers)
{
	uint32_t id, len, n, skipped = 0;
	const volatile uint8_t *b;

	for (;;) {
		if (!vq_used(&d->q[0], NET_WAIT_US, &id, &len)) {
			print("net: no frame came (%u skipped)\n", skipped);
			return -1;
		}
		if (id >= VQ_N || len < NET_HDR + NET_ETH || len > NET_BUF_SIZE) {
			print("net: bad used entry id=%u len=%u\n", id, len);
			return -1;
		}
		b = phys(NET_BUFS + id * NET_BUF_SIZE);
		if ((b[NET_HDR + 12] << 8 | b[NET_HDR + 13]) == type)
			break;
		skipped++;
		net_post_rx(d, (uint16_t)id);
	}
	*num_buffers = b[10] | b[11] << 8;
	for (int i = 0; i < 6; i++)
		src[i] = b[NET_HDR + 6 + i];
	n = len - NET_HDR - NET_ETH;
	for (uint32_t i = 0; i < n; i++)
		payload[i] = b[NET_HDR + NET_ETH + i];
	payload[n] = 0;
	net_post_rx(d, (uint16_t)id);
	return (int)n;
}

/* "192.0.2.1" -> its four bytes; 0 if malformed. */
static int parse_ipv4(const char *s, uint8_t ip[4])
{
	for (int i = 0; i < 4; i++) {
		unsigned v = 0, digits = 0;

		while (*s >= '0' && *s <= '9' && digits < 4)
			v = v * 10 + (*s++ - '0'), digits++;
		if (!digits || v > 255 || *s != (i < 3 ? '.' : 0))
			return 0;
		ip[i] = (uint8_t)v;
		s++;
	}
	return 1;
}

/*
 * Asks who has `ip` (an ARP probe, from 0.0.0.0) and prints the answer: what a
 * real user-mode network stack (passt) answers for its router.
 */
static void net_arp(struct net *d, const uint8_t ip[4])
{
	static const volatile uint8_t broadcast[6] = { 0xff, 0xff, 0xff, 0xff, 0xff, 0xff };
	static volatile char req[28], rep[NET_MAX_PAYLOAD + 1];
	static volatile uint8_t from[6];
	static const uint8_t head[8] = { 0, 1, 8, 0, 6, 4, 0, 1 };	/* Ethernet, IPv4, request */
	uint16_t num_buffers;
	int len;

	for (int i = 0; i < 8; i++)
		req[i] = head[i];
	for (int i = 0; i < 6; i++) {
		req[8 + i] = d->mac[i];		/* sender MAC; sender IP stays 0.0.0.0 */
		req[18 + i] = 0;		/* target MAC */
	}
	for (int i = 0; i < 4; i++) {
		req[14 + i] = 0;
		req[24 + i] = ip[i];
	}
	if (!net_send(d, broadcast, 0x0806, req, sizeof(req)))
		return;
	len = net_recv(d, 0x0806, from, rep, &num_buffers);
	if (len < 28 || rep[7] != 2) {
		print("net: no ARP reply\n");
		return;
	}
	print("net: arp %u.%u.%u.%u is at %02x:%02x:%02x:%02x:%02x:%02x\n",
	      (uint8_t)rep[14], (uint8_t)rep[15], (uint8_t)rep[16], (uint8_t)rep[17],
	      (uint8_t)rep[8], (uint8_t)rep[9], (uint8_t)rep[10], (uint8_t)rep[11],
	      (uint8_t)rep[12], (uint8_t)rep[13]);
}

/*
 * Sends "hello from the guest" to everyone, prints the first reply of our
 * ethertype and echoes it to its sender. With "arp=A.B.C.D", resolves that
 * address instead.
 */
static void mode_net(const struct boot *b)
{
	static struct net d;
	static volatile char payload[NET_MAX_PAYLOAD + 1];
	static volatile uint8_t peer[6];
	static const char hello[] = "hello from the guest";
	static const volatile uint8_t broadcast[6] = { 0xff, 0xff, 0xff, 0xff, 0xff, 0xff };
	uint64_t bases[BLK_MAX];
	int n = mmio_devices(b->cmdline, bases, BLK_MAX), len;
	uint16_t num_buffers;
	char arp[20];
	uint8_t ip[4];

	for (int i = 0; i < n; i++) {
		if (reg_rd(bases[i], VIRTIO_MAGIC) != 0x74726976 || reg_rd(bases[i], VIRTIO_VERSION) != 2 ||
		    reg_rd(bases[i], VIRTIO_DEVICE_ID) != 1)
			continue;
		if (!net_init(&d, bases[i]))
			return;
		if (cmdline_token(b->cmdline, "arp", arp, sizeof(arp))) {
			if (parse_ipv4(arp, ip))
				net_arp(&d, ip);
			else
				print("net: bad arp=%s\n", arp);
			return;
		}
		if (!net_send(&d, broadcast, NET_ETHERTYPE, hello, sizeof(hello) - 1))
			return;
		print("net: sent %s\n", hello);
		len = net_recv(&d, NET_ETHERTYPE, peer, payload, &num_buffers);
		if (len < 0)
			return;
		print("net: got %s from %02x:%02x:%02x:%02x:%02x:%02x num_buffers=%u\n",
		      (const char *)payload, peer[0], peer[1], peer[2], peer[3], peer[4], peer[5],
		      num_buffers);
		if (net_send(&d, peer, NET_ETHERTYPE, payload, (uint32_t)len))
			print("net: echoed %s\n", (const char *)payload);
		return;
	}
	print("net: no device\n");
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
	} else if (streq(mode, "vsock")) {
		mode_vsock(&b);
	} else if (streq(mode, "blk")) {
		mode_blk(&b);
	} else if (streq(mode, "net")) {
		mode_net(&b);
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
