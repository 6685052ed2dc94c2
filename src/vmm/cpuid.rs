//! CPUID for a guest vCPU: what KVM supports, with the hypervisor bit set, the PMU hidden and the
//! topology (one socket, `count` cores, one thread each) and APIC ids made consistent.

use kvm_bindings::{kvm_cpuid_entry2, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

/// The host CPU vendor, which decides the topology leaves a guest reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vendor {
    /// GenuineIntel.
    Intel,
    /// AuthenticAMD (or HygonGenuine).
    Amd,
    /// Anything else: only the common leaves are adjusted.
    Other,
}

impl Vendor {
    /// Reads the vendor from leaf 0 of the entries KVM reported.
    pub fn from_entries(entries: &[kvm_cpuid_entry2]) -> Vendor {
        let Some(e) = entries.iter().find(|e| e.function == 0) else {
            return Vendor::Other;
        };
        let mut id = [0u8; 12];
        id[0..4].copy_from_slice(&e.ebx.to_le_bytes());
        id[4..8].copy_from_slice(&e.edx.to_le_bytes());
        id[8..12].copy_from_slice(&e.ecx.to_le_bytes());
        match &id {
            b"GenuineIntel" => Vendor::Intel,
            b"AuthenticAMD" | b"HygonGenuine" => Vendor::Amd,
            _ => Vendor::Other,
        }
    }
}

const LEAF1_ECX_TSC_DEADLINE: u32 = 1 << 24;
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
const LEAF1_EDX_HTT: u32 = 1 << 28;
const EXT1_ECX_CMP_LEGACY: u32 = 1 << 1;
const LEVEL_SMT: u32 = 1;
const LEVEL_CORE: u32 = 2;

/// What the caller knows about the vCPU being configured.
#[derive(Debug, Clone, Copy)]
pub struct VcpuTopology {
    /// This vCPU's index, also its APIC id.
    pub index: u8,
    /// Number of vCPUs in the VM.
    pub count: u8,
    /// KVM can emulate the TSC-deadline timer (a capability, not in the supported CPUID).
    pub tsc_deadline: bool,
}

/// Bits needed to number `n` things.
fn bits_for(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// Adjusts KVM's supported CPUID `entries` for one vCPU.
pub fn filter(entries: &mut Vec<kvm_cpuid_entry2>, vendor: Vendor, t: VcpuTopology) {
    add_topology_subleaves(entries);
    let id = t.index as u32;
    let count = t.count as u32;
    let core_bits = bits_for(count);
    for e in entries.iter_mut() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (id << 24) | ((count & 0xff) << 16);
                e.ecx |= LEAF1_ECX_HYPERVISOR;
                if t.tsc_deadline {
                    e.ecx |= LEAF1_ECX_TSC_DEADLINE;
                }
                if count > 1 {
                    e.edx |= LEAF1_EDX_HTT;
                } else {
                    e.edx &= !LEAF1_EDX_HTT;
                }
            }
            4 if vendor == Vendor::Intel => {
                // Cores per package, and threads sharing this cache: only the L3 is shared.
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level >= 3 { count - 1 } else { 0 };
                e.eax = (e.eax & 0x3fff) | ((count - 1) << 26) | (sharing << 14);
            }
            // No PMU: guest perf counters would be emulated MSR traffic for nothing.
            0xa => {
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            0xb | 0x1f => {
                e.edx = id;
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = (LEVEL_SMT << 8) | e.index;
                    }
                    1 => {
                        e.eax = core_bits;
                        e.ebx = count;
                        e.ecx = (LEVEL_CORE << 8) | e.index;
                    }
                    _ => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = e.index;
                    }
                }
            }
            0x8000_0001 if vendor == Vendor::Amd => {
                if count > 1 {
                    e.ecx |= EXT1_ECX_CMP_LEGACY;
                } else {
                    e.ecx &= !EXT1_ECX_CMP_LEGACY;
                }
            }
            0x8000_0008 if vendor == Vendor::Amd => {
                // ApicIdCoreIdSize and the number of cores minus one.
                e.ecx = (e.ecx & !0xf0ff) | (core_bits << 12) | (count - 1);
            }
            0x8000_001d if vendor == Vendor::Amd => {
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level >= 3 { count - 1 } else { 0 };
                e.eax = (e.eax & !(0xfff << 14)) | (sharing << 14);
            }
            0x8000_001e if vendor == Vendor::Amd => {
                // Extended APIC id; core id with one thread per core; node 0.
                e.eax = id;
                e.ebx = id & 0xff;
                e.ecx = 0;
            }
            _ => {}
        }
    }
}

/// KVM reports only subleaf 0 of the extended topology leaves (0xb, 0x1f); without the core
/// level (subleaf 1) and the terminating subleaf 2, Linux would put every vCPU in its own
/// package. Adds whichever is missing, for each of those leaves KVM reports at all.
fn add_topology_subleaves(entries: &mut Vec<kvm_cpuid_entry2>) {
    for leaf in [0xb, 0x1f] {
        if !entries.iter().any(|e| e.function == leaf) {
            continue;
        }
        for index in 0..3 {
            if !entries
                .iter()
                .any(|e| e.function == leaf && e.index == index)
            {
                entries.push(kvm_cpuid_entry2 {
                    function: leaf,
                    index,
                    flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
                    ..Default::default()
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ..Default::default()
        }
    }

    fn table() -> Vec<kvm_cpuid_entry2> {
        let mut leaf0 = entry(0, 0);
        leaf0.ebx = u32::from_le_bytes(*b"Auth");
        leaf0.edx = u32::from_le_bytes(*b"enti");
        leaf0.ecx = u32::from_le_bytes(*b"cAMD");
        let mut leaf1 = entry(1, 0);
        leaf1.ebx = 0xffff_0800;
        leaf1.edx = LEAF1_EDX_HTT;
        let mut pmu = entry(0xa, 0);
        pmu.eax = 0x0804_0602;
        vec![
            leaf0,
            leaf1,
            pmu,
            entry(0xb, 0),
            entry(0xb, 1),
            entry(0xb, 2),
            entry(0x8000_0008, 0),
        ]
    }

    #[test]
    fn vendor_is_read_from_leaf_zero() {
        assert_eq!(Vendor::from_entries(&table()), Vendor::Amd);
        assert_eq!(Vendor::from_entries(&[]), Vendor::Other);
    }

    #[test]
    fn apic_ids_and_topology_follow_the_vcpu() {
        let mut t = table();
        filter(
            &mut t,
            Vendor::Amd,
            VcpuTopology {
                index: 3,
                count: 4,
                tsc_deadline: true,
            },
        );
        let leaf1 = t[1];
        assert_eq!(leaf1.ebx >> 24, 3);
        assert_eq!((leaf1.ebx >> 16) & 0xff, 4);
        assert_eq!(leaf1.ebx & 0xffff, 0x0800, "CLFLUSH size is kept");
        assert_ne!(leaf1.ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_ne!(leaf1.ecx & LEAF1_ECX_TSC_DEADLINE, 0);
        assert_ne!(leaf1.edx & LEAF1_EDX_HTT, 0);
        assert_eq!(t[2].eax, 0, "PMU hidden");
        assert_eq!((t[3].eax, t[3].ebx, t[3].ecx, t[3].edx), (0, 1, 0x100, 3));
        assert_eq!((t[4].eax, t[4].ebx, t[4].ecx, t[4].edx), (2, 4, 0x201, 3));
        assert_eq!((t[5].ebx, t[5].ecx), (0, 2));
        assert_eq!(t[6].ecx & 0xf0ff, (2 << 12) | 3);
    }

    #[test]
    fn single_cpu_has_no_htt() {
        let mut t = table();
        filter(
            &mut t,
            Vendor::Amd,
            VcpuTopology {
                index: 0,
                count: 1,
                tsc_deadline: false,
            },
        );
        assert_eq!(t[1].edx & LEAF1_EDX_HTT, 0);
        assert_eq!(t[1].ecx & LEAF1_ECX_TSC_DEADLINE, 0);
        assert_eq!(t[4].eax, 0);
    }

    #[test]
    fn missing_core_level_is_added() {
        // What KVM really returns: subleaf 0 of leaf 0xb only, zeroed.
        let mut t = vec![entry(0xb, 0)];
        filter(
            &mut t,
            Vendor::Intel,
            VcpuTopology {
                index: 1,
                count: 2,
                tsc_deadline: false,
            },
        );
        let find = |i| {
            t.iter()
                .find(|e| e.function == 0xb && e.index == i)
                .copied()
                .unwrap()
        };
        assert_eq!(
            (find(1).eax, find(1).ebx, find(1).ecx, find(1).edx),
            (1, 2, 0x201, 1)
        );
        assert_eq!(find(1).flags, KVM_CPUID_FLAG_SIGNIFCANT_INDEX);
        assert_eq!((find(2).ebx, find(2).ecx), (0, 2));
        assert!(
            !t.iter().any(|e| e.function == 0x1f),
            "absent leaves stay absent"
        );
    }

    #[test]
    fn bits_for_counts() {
        assert_eq!([1, 2, 3, 4, 5, 32].map(bits_for), [0, 1, 2, 2, 3, 5]);
    }
}
