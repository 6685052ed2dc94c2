/*
 * 64-bit Linux-style entry (linux64.elf, and the bzimage, whose loaded part
 * is this same image). The VMM enters at _start in long mode with its own
 * GDT and an identity map of only the first 1 GiB, RSI = struct boot_params.
 * Switch to our GDT, our 4 GiB identity map (for the LAPIC at 0xfee00000)
 * and our stack, then call guest_main(BOOT_LINUX64, boot_params).
 */
#define BOOT_LINUX64 2	/* must match main.c */

	.section .text.entry, "ax"
/* Load address + 0: bzImage code32_start (32-bit entry). Not supported. */
	.code32
	cli
1:	hlt
	jmp	1b

/* Load address + 0x200: the bzImage 64-bit entry point. */
	.org 0x200
	.code64
	.globl _start
_start:
	cli
	cld
	mov	%rsi, %r15		/* boot_params; the C call preserves R15 too */

	/* Zero .bss (stack, C globals); the VMM's stack is not used at all. */
	mov	$_bss_start, %edi
	mov	$_bss_end, %ecx
	sub	%edi, %ecx
	xor	%eax, %eax
	rep stosb

	lgdt	gdt_desc
	mov	$pml4, %eax		/* maps all the VMM's 1 GiB map did, and more */
	mov	%rax, %cr3
	mov	$stack_top, %rsp

	/* Reload CS from our GDT with a far return, then the data segments. */
	pushq	$0x08
	pushq	$1f
	lretq
1:	mov	$0x10, %eax
	mov	%eax, %ds
	mov	%eax, %es
	mov	%eax, %ss
	xor	%eax, %eax
	mov	%eax, %fs
	mov	%eax, %gs

	mov	$BOOT_LINUX64, %edi
	mov	%r15, %rsi
	call	guest_main
2:	cli
	hlt
	jmp	2b
