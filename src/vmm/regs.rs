//! Initial vCPU state: segments and paging for the boot protocol's entry mode, general
//! registers, MSRs, FPU and the local APIC's LINT pins.

use kvm_bindings::kvm_msr_entry;
use kvm_bindings::{kvm_fpu, kvm_lapic_state, kvm_regs, kvm_segment, kvm_sregs, Msrs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::boot::BootProtocol;
use super::layout::{
    BOOT_STACK_POINTER, GDT_START, IDT_START, PDPT_START, PD_START, PML4_START, PVH_INFO_START,
    ZERO_PAGE_START,
};

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

// Flat descriptors at the selectors the Linux boot protocol names (__BOOT_CS 0x10, __BOOT_DS
// 0x18), then a TSS. Code is 64-bit (L) or 32-bit (D/B).
const GDT_CODE64: u64 = 0x00af_9b00_0000_ffff;
const GDT_CODE32: u64 = 0x00cf_9b00_0000_ffff;
const GDT_DATA: u64 = 0x00cf_9300_0000_ffff;
const GDT_TSS: u64 = 0x008f_8b00_0000_ffff;
const CODE_SELECTOR: u16 = 0x10;
const DATA_SELECTOR: u16 = 0x18;
const TSS_SELECTOR: u16 = 0x20;

// Present, writable, 2 MiB page.
const PDE_LARGE: u64 = 0x83;
const PTE_TABLE: u64 = 0x03;

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MISC_ENABLE_FAST_STRING: u64 = 1;
// MTRRs on, default type write-back.
const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;

const APIC_LVT_LINT0: usize = 0x350;
const APIC_LVT_LINT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// Builds a KVM segment from a GDT descriptor.
fn segment(descriptor: u64, selector: u16) -> kvm_segment {
    let limit = ((descriptor & 0xffff) | ((descriptor >> 32) & 0xf_0000)) as u32;
    let granular = (descriptor >> 55) & 1;
    kvm_segment {
        base: ((descriptor >> 16) & 0xff_ffff) | ((descriptor >> 32) & 0xff00_0000),
        limit: if granular == 1 {
            (limit << 12) | 0xfff
        } else {
            limit
        },
        selector,
        type_: ((descriptor >> 40) & 0xf) as u8,
        present: ((descriptor >> 47) & 1) as u8,
        dpl: ((descriptor >> 45) & 3) as u8,
        db: ((descriptor >> 54) & 1) as u8,
        s: ((descriptor >> 44) & 1) as u8,
        l: ((descriptor >> 53) & 1) as u8,
        g: granular as u8,
        avl: ((descriptor >> 52) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

/// Writes the GDT, an empty IDT and (for the 64-bit entry) identity page tables for the first
/// GiB; fills `sregs` with the matching segments and control registers.
pub fn setup_sregs(
    mem: &GuestMemoryMmap,
    protocol: &BootProtocol,
    sregs: &mut kvm_sregs,
) -> Result<(), vm_memory::GuestMemoryError> {
    let long_mode = matches!(protocol, BootProtocol::Linux64 { .. });
    let code = if long_mode { GDT_CODE64 } else { GDT_CODE32 };
    let gdt = [0, 0, code, GDT_DATA, GDT_TSS];
    for (i, d) in gdt.iter().enumerate() {
        mem.write_obj(*d, GuestAddress(GDT_START + 8 * i as u64))?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_START))?;

    sregs.gdt.base = GDT_START;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.idt.base = IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = segment(code, CODE_SELECTOR);
    let data = segment(GDT_DATA, DATA_SELECTOR);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(GDT_TSS, TSS_SELECTOR);

    if long_mode {
        mem.write_obj(PDPT_START | PTE_TABLE, GuestAddress(PML4_START))?;
        mem.write_obj(PD_START | PTE_TABLE, GuestAddress(PDPT_START))?;
        let pd: Vec<u8> = (0..512u64)
            .flat_map(|i| ((i << 21) | PDE_LARGE).to_le_bytes())
            .collect();
        mem.write_slice(&pd, GuestAddress(PD_START))?;
        sregs.cr3 = PML4_START;
        sregs.cr4 |= X86_CR4_PAE;
        sregs.cr0 |= X86_CR0_PE | X86_CR0_PG;
        sregs.efer |= EFER_LME | EFER_LMA;
    } else {
        // PVH: protected mode, paging off, CR4 and EFER clear.
        sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
        sregs.cr4 = 0;
        sregs.efer = 0;
    }
    Ok(())
}

/// General registers at the entry point.
pub fn boot_regs(protocol: &BootProtocol, entry: u64) -> kvm_regs {
    let mut regs = kvm_regs {
        rflags: 0x2,
        rip: entry,
        ..Default::default()
    };
    match protocol {
        BootProtocol::Linux64 { .. } => {
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
            regs.rsi = ZERO_PAGE_START;
        }
        BootProtocol::Pvh => regs.rbx = PVH_INFO_START,
    }
    regs
}

/// MSRs every vCPU starts with. IA32_ARCH_CAPABILITIES (0x10a) is deliberately absent: some
/// KVMs (PVM among them) reject writes to it.
pub fn boot_msrs() -> Msrs {
    let entry = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    let entries = [
        entry(MSR_IA32_SYSENTER_CS, 0),
        entry(MSR_IA32_SYSENTER_ESP, 0),
        entry(MSR_IA32_SYSENTER_EIP, 0),
        entry(MSR_STAR, 0),
        entry(MSR_CSTAR, 0),
        entry(MSR_KERNEL_GS_BASE, 0),
        entry(MSR_SYSCALL_MASK, 0),
        entry(MSR_LSTAR, 0),
        entry(MSR_IA32_TSC, 0),
        entry(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        entry(MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WB),
    ];
    Msrs::from_entries(&entries).expect("a fixed, small MSR list fits")
}

/// FPU state after reset (x87 control word, MXCSR defaults).
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// Routes LINT0 to the legacy PIC (ExtINT) and LINT1 to NMI, as firmware would.
pub fn set_lint_pins(lapic: &mut kvm_lapic_state) {
    set_delivery_mode(lapic, APIC_LVT_LINT0, APIC_MODE_EXTINT);
    set_delivery_mode(lapic, APIC_LVT_LINT1, APIC_MODE_NMI);
}

fn set_delivery_mode(lapic: &mut kvm_lapic_state, offset: usize, mode: u32) {
    let reg = &mut lapic.regs[offset..offset + 4];
    let value = u32::from_le_bytes([reg[0] as u8, reg[1] as u8, reg[2] as u8, reg[3] as u8]);
    let value = (value & !0x700) | (mode << 8);
    for (b, v) in reg.iter_mut().zip(value.to_le_bytes()) {
        *b = v as _;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm::memory;

    #[test]
    fn segments_decode_flat_descriptors() {
        let cs = segment(GDT_CODE64, CODE_SELECTOR);
        assert_eq!(
            (cs.base, cs.limit, cs.l, cs.db, cs.type_, cs.present),
            (0, 0xffff_ffff, 1, 0, 0xb, 1)
        );
        let cs32 = segment(GDT_CODE32, CODE_SELECTOR);
        assert_eq!((cs32.l, cs32.db, cs32.g), (0, 1, 1));
        let ds = segment(GDT_DATA, DATA_SELECTOR);
        assert_eq!((ds.type_, ds.s, ds.limit), (3, 1, 0xffff_ffff));
    }

    #[test]
    fn long_mode_gets_identity_tables() {
        let mem = memory::create(32 << 20).unwrap();
        let mut sregs = kvm_sregs::default();
        setup_sregs(
            &mem,
            &BootProtocol::Linux64 { setup_header: None },
            &mut sregs,
        )
        .unwrap();
        assert_eq!(sregs.cr3, PML4_START);
        assert_ne!(sregs.efer & EFER_LMA, 0);
        let pde: u64 = mem.read_obj(GuestAddress(PD_START + 8 * 511)).unwrap();
        assert_eq!(pde, (511 << 21) | PDE_LARGE);
        let code: u64 = mem
            .read_obj(GuestAddress(GDT_START + CODE_SELECTOR as u64))
            .unwrap();
        assert_eq!(code, GDT_CODE64);
        let data: u64 = mem
            .read_obj(GuestAddress(GDT_START + DATA_SELECTOR as u64))
            .unwrap();
        assert_eq!(data, GDT_DATA);
        assert_eq!(
            (sregs.cs.selector, sregs.ds.selector, sregs.tr.selector),
            (0x10, 0x18, 0x20)
        );
    }

    #[test]
    fn pvh_starts_in_flat_protected_mode() {
        let mem = memory::create(32 << 20).unwrap();
        let mut sregs = kvm_sregs {
            cr4: 0x20,
            efer: 0x500,
            ..Default::default()
        };
        setup_sregs(&mem, &BootProtocol::Pvh, &mut sregs).unwrap();
        assert_eq!(
            (sregs.cr0, sregs.cr4, sregs.efer),
            (X86_CR0_PE | X86_CR0_ET, 0, 0)
        );
        assert_eq!(sregs.cs.db, 1);
        assert_eq!(boot_regs(&BootProtocol::Pvh, 0x100000).rbx, PVH_INFO_START);
    }

    #[test]
    fn lint_pins_are_routed() {
        let mut lapic = kvm_lapic_state::default();
        lapic.regs[APIC_LVT_LINT0 + 2] = 1; // a masked bit elsewhere in the register survives
        set_lint_pins(&mut lapic);
        assert_eq!(lapic.regs[APIC_LVT_LINT0 + 1], 7);
        assert_eq!(lapic.regs[APIC_LVT_LINT0 + 2], 1);
        assert_eq!(lapic.regs[APIC_LVT_LINT1 + 1], 4);
    }

    #[test]
    fn arch_capabilities_is_never_written() {
        assert!(boot_msrs().as_slice().iter().all(|m| m.index != 0x10a));
    }
}
