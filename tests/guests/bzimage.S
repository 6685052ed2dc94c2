/*
 * bzimage: Linux x86 boot protocol 2.12 header followed by linux64.bin (the
 * loaded image of linux64.elf, .bss included). The real-mode setup code is
 * never run: the VMM loads the rest at code32_start (1 MiB) and enters in
 * 64-bit mode at + 0x200. Fields are as in Documentation/arch/x86/boot.rst.
 * The object is turned into the file by objcopy without linking, so every
 * value must be a constant or a difference of labels (no relocations).
 */
#define SETUP_SECTS 1

	.section .text, "ax"
	.code16
	.globl _start
_start:
	cli				/* not a boot sector: just stop if run */
	hlt
	jmp	_start

	.org 0x1f1
setup_sects:	.byte SETUP_SECTS
root_flags:	.word 0
syssize:	.long (payload_end - payload + 15) / 16
ram_size:	.word 0
vid_mode:	.word 0xffff		/* NORMAL_VGA */
root_dev:	.word 0
boot_flag:	.word 0xaa55
jump:		.byte 0xeb, setup_code - 1f	/* jmp short past the header */
1:
header:		.ascii "HdrS"
version:	.word 0x020c
realmode_swtch:	.long 0
start_sys_seg:	.word 0x1000		/* obsolete */
kernel_version:	.word kernel_str - _start - 0x200
type_of_loader:	.byte 0
loadflags:	.byte 0x01		/* LOADED_HIGH */
setup_move_size: .word 0x8000
code32_start:	.long 0x100000
ramdisk_image:	.long 0
ramdisk_size:	.long 0
bootsect_kludge: .long 0
heap_end_ptr:	.word 0
ext_loader_ver:	.byte 0
ext_loader_type: .byte 0
cmd_line_ptr:	.long 0
initrd_addr_max: .long 0x7fffffff
kernel_alignment: .long 0x200000
relocatable_kernel: .byte 0
min_alignment:	.byte 21		/* log2(kernel_alignment) */
xloadflags:	.word 0x0001		/* XLF_KERNEL_64: 64-bit entry at +0x200 */
cmdline_size:	.long 4095
hardware_subarch: .long 0
hardware_subarch_data: .quad 0
payload_offset:	.long 0
payload_length:	.long 0
setup_data:	.quad 0
pref_address:	.quad 0x100000
init_size:	.long payload_end - payload	/* .bss is in the file */
handover_offset: .long 0

setup_code:
	cli
	hlt
	jmp	setup_code
kernel_str:	.asciz "microvm test guest"

	.org (SETUP_SECTS + 1) * 512
payload:
	.incbin "linux64.bin"
payload_end:
