/*
 * PVH entry (pvh.elf): 32-bit protected mode, paging off, flat segments,
 * EBX = struct hvm_start_info. Switches to 64-bit long mode with the
 * identity map from common.S and calls guest_main(BOOT_PVH, start_info).
 */
#define BOOT_PVH 1	/* must match main.c */

/* XEN_ELFNOTE_PHYS32_ENTRY: tells the loader the 32-bit entry point. */
	.section .note.Xen, "a", @note
	.balign 4
	.long 4			/* namesz */
	.long 4			/* descsz */
	.long 18		/* type: XEN_ELFNOTE_PHYS32_ENTRY */
	.asciz "Xen"
	.long _start

	.section .text.entry, "ax"
	.code32
	.globl _start
_start:
	cli
	cld
	mov	%ebx, %esi		/* keep start_info; rep stos and rdmsr leave ESI */
	lgdt	gdt_desc
	mov	$0x10, %eax
	mov	%eax, %ds
	mov	%eax, %es
	mov	%eax, %ss
	mov	%eax, %fs
	mov	%eax, %gs

	/* Zero .bss (stack, C globals): the loader need not have done it. */
	mov	$_bss_start, %edi
	mov	$_bss_end, %ecx
	sub	%edi, %ecx
	xor	%eax, %eax
	rep stosb

	/* Long mode: CR4.PAE, CR3, EFER.LME, then CR0.PG. */
	mov	%cr4, %eax
	or	$0x20, %eax
	mov	%eax, %cr4
	mov	$pml4, %eax
	mov	%eax, %cr3
	mov	$0xc0000080, %ecx
	rdmsr
	or	$0x100, %eax
	wrmsr
	mov	%cr0, %eax
	or	$0x80000001, %eax
	mov	%eax, %cr0
	ljmp	$0x08, $1f

	.code64
1:	mov	$stack_top, %rsp
	mov	%esi, %esi		/* zero-extend start_info */
	mov	$BOOT_PVH, %edi
	call	guest_main
2:	cli
	hlt
	jmp	2b
