//! Running a Linux guest on a PVM host: shadow-paging KVM inside a cloud VM, without VMX/SVM,
//! where a kernel that does not enter PVM mode has all its ring-0 code run by KVM's instruction
//! emulator. That emulator lacks a few instructions (cmpxchg16b, popcnt, xsave/xrstor, clac/stac,
//! the FS/GS base instructions, BMI's shlx in the kernel's zstd), and with PCID or FSGSBASE on,
//! user TLS reads went wrong in about one run in three. We hide those features in the guest's
//! CPUID, which works for any kernel. This fleet's PVM puts some back whatever we set (popcnt,
//! xsave, fsgsbase, bmi1, bmi2 and smap read back set; cx16, pcid and invpcid stay hidden), so our
//! kernel patch set also drops them itself under [`GUARD_PARAM`], and avoids what no CPUID bit
//! controls (the int3 self-test, fwait, the user `syscall` that faults).

use kvm_bindings::kvm_cpuid_entry2;

/// The kernel option that turns on our guest kernel's PVM compatibility code
/// (`guest-kernel-config/patches/`); any other kernel ignores it.
pub const GUARD_PARAM: &str = "microvm.pvm";

/// A CPUID feature bit we hide: leaf, register and bit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Feature {
    /// Its name in /proc/cpuinfo.
    pub name: &'static str,
    /// CPUID leaf (subleaf 0).
    pub leaf: u32,
    /// Register: true for ECX, false for EBX.
    pub ecx: bool,
    /// Bit number.
    pub bit: u32,
}

const fn ecx1(name: &'static str, bit: u32) -> Feature {
    Feature {
        name,
        leaf: 1,
        ecx: true,
        bit,
    }
}

const fn ebx7(name: &'static str, bit: u32) -> Feature {
    Feature {
        name,
        leaf: 7,
        ecx: false,
        bit,
    }
}

/// The features hidden from a guest on a PVM host.
pub const HIDDEN: [Feature; 10] = [
    ecx1("cx16", 13),
    ecx1("pcid", 17),
    ecx1("popcnt", 23),
    ecx1("xsave", 26),
    ecx1("osxsave", 27),
    ebx7("fsgsbase", 0),
    ebx7("bmi1", 3),
    ebx7("bmi2", 8),
    ebx7("invpcid", 10),
    ebx7("smap", 20),
];

fn has(entries: &[kvm_cpuid_entry2], f: &Feature) -> bool {
    entries
        .iter()
        .filter(|e| e.function == f.leaf && e.index == 0)
        .any(|e| (if f.ecx { e.ecx } else { e.ebx }) & (1 << f.bit) != 0)
}

/// Clears every [`HIDDEN`] feature in `entries`.
pub fn hide(entries: &mut [kvm_cpuid_entry2]) {
    for e in entries.iter_mut() {
        for f in &HIDDEN {
            if e.function == f.leaf && e.index == 0 {
                let reg = if f.ecx { &mut e.ecx } else { &mut e.ebx };
                *reg &= !(1 << f.bit);
            }
        }
    }
}

/// The [`HIDDEN`] features `entries` (KVM's read-back after setting them) still show: some PVM
/// hosts put features back whatever we set.
pub fn still_shown(entries: &[kvm_cpuid_entry2]) -> Vec<&'static str> {
    HIDDEN
        .iter()
        .filter(|f| has(entries, f))
        .map(|f| f.name)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32, ebx: u32, ecx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ebx,
            ecx,
            ..Default::default()
        }
    }

    #[test]
    fn hides_exactly_the_listed_bits() {
        let mut t = vec![
            entry(1, 0, 0x1234_5678, u32::MAX),
            entry(7, 0, u32::MAX, 0xabcd),
            entry(7, 1, u32::MAX, u32::MAX),
            entry(0xd, 0, u32::MAX, u32::MAX),
        ];
        assert_eq!(still_shown(&t).len(), HIDDEN.len());
        hide(&mut t);
        let ecx1 = (1 << 13) | (1 << 17) | (1 << 23) | (1 << 26) | (1 << 27);
        assert_eq!(t[0].ecx, !ecx1);
        assert_eq!(t[0].ebx, 0x1234_5678, "other registers untouched");
        assert_eq!(
            t[1].ebx,
            !((1 << 0) | (1 << 3) | (1 << 8) | (1 << 10) | (1 << 20))
        );
        assert_eq!(t[1].ecx, 0xabcd);
        assert_eq!(
            (t[2].ebx, t[3].ebx),
            (u32::MAX, u32::MAX),
            "other leaves untouched"
        );
        assert!(still_shown(&t).is_empty());
    }

    #[test]
    fn read_back_names_what_came_back() {
        // What this fleet's PVM returned after we cleared everything (leaf 1 ECX).
        let t = vec![entry(1, 0, 0, 0xf7f8_1203), entry(7, 0, 0x0010_0109, 0)];
        assert_eq!(
            still_shown(&t),
            ["popcnt", "xsave", "fsgsbase", "bmi1", "bmi2", "smap"]
        );
    }
}
