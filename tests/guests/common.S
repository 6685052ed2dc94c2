/*
 * Data shared by the 64-bit guests (pvh.elf, linux64.elf, bzimage): GDT,
 * identity page tables for the first 4 GiB, the stack and the AP trampoline.
 * The page tables are static data rather than built at run time: no code to
 * get wrong, and the bzimage carries them in its loaded part.
 */
	.section .data, "aw"
	.balign 8
/* Accessed bits preset so the CPU never writes back to the GDT. */
gdt:
	.quad 0
	.quad 0x00af9b000000ffff	/* 0x08: 64-bit code */
	.quad 0x00cf93000000ffff	/* 0x10: flat 4 GiB data */
gdt_end:
/* 10 bytes: lgdt reads limit + 32-bit base in 32-bit mode, 64-bit base in 64-bit mode. */
	.globl gdt_desc
gdt_desc:
	.word gdt_end - gdt - 1
	.quad gdt

/* Table entries have Present|RW|Accessed(|Dirty) preset, as Linux does. */
	.balign 4096
	.globl pml4
pml4:
	.quad pdpt + 0x63
	.fill 511, 8, 0
pdpt:
	.quad pd + 0x0000 + 0x63
	.quad pd + 0x1000 + 0x63
	.quad pd + 0x2000 + 0x63
	.quad pd + 0x3000 + 0x63
	.fill 508, 8, 0
/* 2048 2 MiB pages; the 4th GiB (LAPIC, IOAPIC, MMIO) is uncached (PCD|PWT). */
pd:
	.set addr, 0
	.rept 2048
	.if addr < 0xc0000000
	.quad addr + 0xe3
	.else
	.quad addr + 0xfb
	.endif
	.set addr, addr + 0x200000
	.endr

	.section .bss, "aw", @nobits
	.balign 16
	.space 16384
	.globl stack_top
stack_top:

/*
 * AP trampoline, copied by the BSP to 0x8000 (STARTUP vector 0x08, so the AP
 * starts in real mode at CS=0x0800, IP=0). The counter lives in the copy
 * itself, addressed relative to CS, so no other low memory is touched.
 */
	.section .rodata, "a"
	.code16
	.globl ap_tramp, ap_count, ap_tramp_end
ap_tramp:
	cli
	lock incw %cs:(ap_count - ap_tramp)
1:	hlt
	jmp 1b
	.balign 2
ap_count:
	.word 0
ap_tramp_end:
	.code64
