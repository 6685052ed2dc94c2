//! Guest physical address map: where the VMM puts boot structures and where the MMIO gap lies.

/// GDT used for the initial mode (flat segments; five entries, up to 0x528).
pub const GDT_START: u64 = 0x500;
/// Empty IDT: the guest installs its own before enabling interrupts.
pub const IDT_START: u64 = 0x540;
/// PVH `hvm_start_info`.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH module list (the initrd).
pub const PVH_MODLIST_START: u64 = 0x6040;
/// PVH memory map, up to the zero page.
pub const PVH_MEMMAP_START: u64 = 0x6080;
/// Linux zero page (`struct boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer for the 64-bit entry.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity page tables for the 64-bit entry: PML4, PDPT, one PD (first GiB).
pub const PML4_START: u64 = 0x9000;
/// See [`PML4_START`].
pub const PDPT_START: u64 = 0xa000;
/// See [`PML4_START`].
pub const PD_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Largest command line, terminating NUL included (the Linux x86 limit).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// The MP table lives in the last KiB of base memory, where Linux looks for it.
pub const MPTABLE_START: u64 = 0x9fc00;
/// End of conventional memory.
pub const EBDA_END: u64 = 0xa0000;
/// Kernels load at or above 1 MiB.
pub const HIMEM_START: u64 = 0x10_0000;

/// The 32-bit MMIO gap: no RAM here. Virtio-mmio devices, the IOAPIC and the LAPIC live in it.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the MMIO gap; RAM that did not fit below it continues here.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// Where virtio-mmio transports will be placed.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
/// IOAPIC register window.
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// Local APIC register window.
pub const APIC_ADDR: u32 = 0xfee0_0000;
/// KVM's TSS (needed on Intel; three pages just below the IOAPIC window area).
pub const KVM_TSS_ADDR: usize = 0xfffb_d000;

/// I/O port for the guest boot-time marker (like Firecracker's boot timer).
pub const BOOT_MARKER_PORT: u16 = 0x440;
/// COM1.
pub const COM1_PORT: u16 = 0x3f8;
/// COM1's interrupt line.
pub const COM1_IRQ: u32 = 4;
/// i8042 data and command ports.
pub const I8042_DATA_PORT: u16 = 0x60;
/// See [`I8042_DATA_PORT`].
pub const I8042_COMMAND_PORT: u16 = 0x64;
