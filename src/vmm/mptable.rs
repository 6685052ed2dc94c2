//! Intel MultiProcessor Specification 1.4 table: tells a guest without ACPI about its CPUs, the
//! IOAPIC and how ISA interrupts 0-23 reach the IOAPIC's pins.

use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{APIC_ADDR, EBDA_END, IOAPIC_ADDR, MPTABLE_START};

/// Number of IOAPIC pins; each gets an interrupt-source entry with the same ISA IRQ number.
pub const IOAPIC_PINS: u8 = 24;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const SPEC_REV: u8 = 4;
// Family 6 model 15 stepping 11: a plain value Linux only prints.
const CPU_SIGNATURE: u32 = (6 << 8) | (15 << 4) | 11;
// FPU and APIC present.
const CPU_FEATURES: u32 = 0x201;

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;

/// Errors building the MP table.
#[derive(Debug, Error)]
pub enum Error {
    /// Too many CPUs for the table's space.
    #[error("an MP table for {0} vCPUs does not fit in the last KiB of base memory")]
    TooManyCpus(u8),
    /// Writing guest memory failed.
    #[error("cannot write the MP table to guest memory: {0}")]
    Write(#[from] vm_memory::GuestMemoryError),
}

/// Builds the table for `cpus` vCPUs (APIC ids 0..cpus); the IOAPIC gets id `cpus`.
pub fn build(cpus: u8) -> Result<Vec<u8>, Error> {
    let ioapic_id = cpus;
    let config_addr = MPTABLE_START as u32 + 16;

    let mut entries = Vec::new();
    for id in 0..cpus {
        entries.push(ENTRY_PROCESSOR);
        entries.push(id);
        entries.push(APIC_VERSION);
        entries.push(if id == 0 { 0b11 } else { 0b01 }); // enabled, BSP
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
    }
    entries.extend_from_slice(&[ENTRY_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    for irq in 0..IOAPIC_PINS {
        // Interrupt type, flags (conforming polarity and trigger), source bus/irq, IOAPIC/pin.
        entries.extend_from_slice(&[
            ENTRY_IO_INTERRUPT,
            INT_TYPE_INT,
            0,
            0,
            0,
            irq,
            ioapic_id,
            irq,
        ]);
    }
    // LINT0 of the BSP takes the legacy PIC (ExtINT); LINT1 of every CPU takes NMI.
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INT_TYPE_EXTINT, 0, 0, 0, 0, 0, 0]);
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INT_TYPE_NMI, 0, 0, 0, 0, 0xff, 1]);
    let entry_count = cpus as u16 + 2 + IOAPIC_PINS as u16 + 2;

    let mut config = Vec::with_capacity(44 + entries.len());
    config.extend_from_slice(b"PCMP");
    config.extend_from_slice(&((44 + entries.len()) as u16).to_le_bytes());
    config.push(SPEC_REV);
    config.push(0); // checksum, set below
    config.extend_from_slice(b"MICROVM ");
    config.extend_from_slice(b"MICROVM-KVM ");
    config.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    config.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    config.extend_from_slice(&entry_count.to_le_bytes());
    config.extend_from_slice(&APIC_ADDR.to_le_bytes());
    config.extend_from_slice(&[0, 0, 0, 0]); // extended table length, checksum, reserved
    config.extend_from_slice(&entries);
    config[7] = checksum(&config);

    let mut table = Vec::with_capacity(16 + config.len());
    table.extend_from_slice(b"_MP_");
    table.extend_from_slice(&config_addr.to_le_bytes());
    table.extend_from_slice(&[1, SPEC_REV, 0, 0, 0, 0, 0, 0]); // length in 16-byte units
    table[10] = checksum(&table);
    table.extend_from_slice(&config);

    if MPTABLE_START + table.len() as u64 > EBDA_END {
        return Err(Error::TooManyCpus(cpus));
    }
    Ok(table)
}

/// Builds the table and writes it at [`MPTABLE_START`].
pub fn setup(mem: &GuestMemoryMmap, cpus: u8) -> Result<(), Error> {
    mem.write_slice(&build(cpus)?, GuestAddress(MPTABLE_START))?;
    Ok(())
}

/// The byte that makes `bytes` sum to zero.
fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b))
    }

    #[test]
    fn checksums_and_counts_hold() {
        for cpus in [1, 2, 4, 32] {
            let t = build(cpus).unwrap();
            assert_eq!(&t[0..4], b"_MP_");
            assert_eq!(sum(&t[0..16]), 0);
            let config = &t[16..];
            let len = u16::from_le_bytes([config[4], config[5]]) as usize;
            assert_eq!(len, config.len());
            assert_eq!(sum(config), 0);
            let count = u16::from_le_bytes([config[34], config[35]]) as usize;

            // Walk the entries as a guest would.
            let (mut off, mut cpu_ids, mut irqs, mut ioapic) = (44, vec![], vec![], None);
            for _ in 0..count {
                match config[off] {
                    ENTRY_PROCESSOR => {
                        cpu_ids.push((config[off + 1], config[off + 3]));
                        off += 20;
                    }
                    ENTRY_IOAPIC => {
                        ioapic = Some(config[off + 1]);
                        off += 8;
                    }
                    ENTRY_IO_INTERRUPT => {
                        irqs.push((config[off + 5], config[off + 6], config[off + 7]));
                        off += 8;
                    }
                    _ => off += 8,
                }
            }
            assert_eq!(off, config.len());
            assert_eq!(cpu_ids.len(), cpus as usize);
            assert_eq!(cpu_ids[0], (0, 0b11));
            assert!(cpu_ids[1..]
                .iter()
                .enumerate()
                .all(|(i, c)| *c == (i as u8 + 1, 1)));
            assert_eq!(ioapic, Some(cpus));
            assert_eq!(irqs.len(), 24);
            assert!(irqs
                .iter()
                .enumerate()
                .all(|(i, e)| *e == (i as u8, cpus, i as u8)));
        }
    }

    #[test]
    fn too_many_cpus_is_an_error() {
        assert!(build(crate::plan::MAX_CPUS).is_ok());
        assert!(matches!(build(40), Err(Error::TooManyCpus(40))));
    }
}
