/*
 * marker.elf: the smallest useful PVH guest, for boot-time comparisons with
 * other VMMs. Stays in 32-bit protected mode (no stack, no paging):
 * boot marker, one line on COM1, QEMU isa-debug-exit, i8042 reset, halt.
 */
	.section .note.Xen, "a", @note
	.balign 4
	.long 4, 4, 18			/* namesz, descsz, XEN_ELFNOTE_PHYS32_ENTRY */
	.asciz "Xen"
	.long _start

	.section .text.entry, "ax"
	.code32
	.globl _start
_start:
	mov	$123, %al		/* boot-time marker */
	mov	$0x440, %dx
	outb	%al, %dx
	mov	$msg, %esi
1:	mov	$0x3fd, %dx		/* wait for LSR.THRE */
2:	inb	%dx, %al
	test	$0x20, %al
	jz	2b
	mov	$0x3f8, %dx
	movb	(%esi), %al
	outb	%al, %dx
	inc	%esi
	cmp	$msg_end, %esi
	jne	1b
	xor	%eax, %eax
	outb	%al, $0xf4		/* QEMU isa-debug-exit */
	mov	$0xfe, %al
	outb	%al, $0x64		/* i8042 reset: ends our VMM */
3:	cli
	hlt
	jmp	3b
msg:	.ascii "microvm-marker\r\n"
msg_end:
