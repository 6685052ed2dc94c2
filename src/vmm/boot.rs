//! Loading the guest kernel, initrd and command line, and writing the boot information for the
//! protocol the kernel speaks: the Linux 64-bit boot protocol (zero page) or PVH (start_info).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::PvhBootCapability;
use linux_loader::loader::{BzImage, Elf, KernelLoader};
use thiserror::Error;
use vm_memory::{Address, GuestAddress, GuestMemoryMmap};

use super::layout::{
    CMDLINE_MAX_SIZE, CMDLINE_START, HIMEM_START, PVH_INFO_START, PVH_MEMMAP_START,
    PVH_MODLIST_START, ZERO_PAGE_START,
};
use super::memory::MapEntry;

const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
const BOOT_FLAG_MAGIC: u16 = 0xaa55;
const HDRS_MAGIC: u32 = 0x5372_6448;
const LOADER_UNDEFINED: u8 = 0xff;
const KERNEL_ALIGNMENT: u32 = 0x0100_0000;
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
/// xloadflags bit: the bzImage has a 64-bit entry point.
const XLF_KERNEL_64: u16 = 1;
/// A bzImage's 64-bit entry point lies this far into its protected-mode part.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
const PAGE_SIZE: u64 = 4096;
const PVH_MEMMAP_MAX_ENTRIES: usize =
    ((ZERO_PAGE_START - PVH_MEMMAP_START) as usize) / std::mem::size_of::<hvm_memmap_table_entry>();

/// Errors loading the kernel or writing boot information.
#[derive(Debug, Error)]
pub enum Error {
    /// Neither ELF nor bzImage.
    #[error("the kernel is neither an ELF vmlinux nor a bzImage")]
    UnknownKernelFormat,
    /// A bzImage without the 64-bit entry point (boot protocol 2.12 and XLF_KERNEL_64).
    #[error(
        "the bzImage has no 64-bit entry point (needs boot protocol 2.12+ with XLF_KERNEL_64)"
    )]
    No64BitEntry,
    /// The loader rejected the image.
    #[error("cannot load the kernel: {0}")]
    Load(#[from] linux_loader::loader::Error),
    /// Reading the kernel file failed.
    #[error("cannot read the kernel: {0}")]
    ReadKernel(std::io::Error),
    /// The command line does not fit.
    #[error("the kernel command line is {0} bytes; the limit is {max}", max = CMDLINE_MAX_SIZE - 1)]
    CmdlineTooLong(usize),
    /// The command line has a NUL byte.
    #[error("the kernel command line must not contain NUL bytes")]
    CmdlineNul,
    /// The initrd does not fit in guest RAM.
    #[error("the initrd ({size} bytes) does not fit in guest RAM between the kernel and {limit:#x}: raise --memory")]
    InitrdTooBig {
        /// Its size.
        size: u64,
        /// The highest address it may end at.
        limit: u64,
    },
    /// Reading the initrd into guest memory failed.
    #[error("cannot read the initrd: {0}")]
    ReadInitrd(vm_memory::GuestMemoryError),
    /// Writing a boot structure failed.
    #[error("cannot write the boot parameters: {0}")]
    BootParams(#[from] linux_loader::configurator::Error),
    /// Writing the command line failed.
    #[error("cannot write the command line: {0}")]
    Cmdline(vm_memory::GuestMemoryError),
    /// The memory map has too many entries for the protocol.
    #[error("the guest memory map has {0} entries, more than the boot protocol holds")]
    MemoryMapTooLarge(usize),
}

/// How the kernel wants to be entered.
#[derive(Debug, Clone, Copy)]
pub enum BootProtocol {
    /// 64-bit long mode, RSI = zero page; `setup_header` comes from a bzImage.
    Linux64 {
        /// The header a bzImage carries, copied into the zero page.
        setup_header: Option<setup_header>,
    },
    /// 32-bit protected mode, EBX = `hvm_start_info`.
    Pvh,
}

/// A kernel loaded into guest memory.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    /// First instruction.
    pub entry: GuestAddress,
    /// First byte after the image.
    pub end: u64,
    /// Boot protocol.
    pub protocol: BootProtocol,
}

impl LoadedKernel {
    /// A name for messages.
    pub fn protocol_name(&self) -> &'static str {
        match self.protocol {
            BootProtocol::Linux64 {
                setup_header: Some(_),
            } => "Linux 64-bit (bzImage)",
            BootProtocol::Linux64 { setup_header: None } => "Linux 64-bit (ELF)",
            BootProtocol::Pvh => "PVH",
        }
    }
}

/// Loads an ELF vmlinux (PVH entry preferred when its note is present) or a bzImage.
pub fn load_kernel(mem: &GuestMemoryMmap, kernel: &mut File) -> Result<LoadedKernel, Error> {
    let mut magic = [0u8; 4];
    let is_elf = kernel.read_exact(&mut magic).is_ok() && &magic == ELF_MAGIC;
    kernel.seek(SeekFrom::Start(0)).map_err(Error::ReadKernel)?;
    let himem = Some(GuestAddress(HIMEM_START));
    if is_elf {
        let r = Elf::load(mem, None, kernel, himem)?;
        let (entry, protocol) = match r.pvh_boot_cap {
            PvhBootCapability::PvhEntryPresent(entry) => (entry, BootProtocol::Pvh),
            _ => (r.kernel_load, BootProtocol::Linux64 { setup_header: None }),
        };
        return Ok(LoadedKernel {
            entry,
            end: r.kernel_end,
            protocol,
        });
    }
    match BzImage::load(mem, None, kernel, himem) {
        Ok(r) => {
            let header = r.setup_header.ok_or(Error::UnknownKernelFormat)?;
            if header.version < 0x020c || header.xloadflags & XLF_KERNEL_64 == 0 {
                return Err(Error::No64BitEntry);
            }
            Ok(LoadedKernel {
                entry: r.kernel_load.unchecked_add(BZIMAGE_64BIT_ENTRY_OFFSET),
                end: bzimage_end(&header, r.kernel_load.0, r.kernel_end),
                protocol: BootProtocol::Linux64 {
                    setup_header: Some(header),
                },
            })
        }
        Err(linux_loader::loader::Error::Bzimage(
            linux_loader::loader::bzimage::Error::InvalidBzImage,
        )) => Err(Error::UnknownKernelFormat),
        Err(e) => Err(e.into()),
    }
}

/// The end of the memory a bzImage uses while it boots: it decompresses itself into a window of
/// `init_size` bytes starting at its load address rounded up to its alignment (or at its
/// preferred address, if higher), which can reach far past the compressed image.
fn bzimage_end(h: &setup_header, load: u64, image_end: u64) -> u64 {
    let align = u64::from(h.kernel_alignment).max(1);
    let start = load
        .div_ceil(align)
        .saturating_mul(align)
        .max(h.pref_address);
    image_end.max(start.saturating_add(u64::from(h.init_size)))
}

/// Checks the command line fits the x86 limit (with its NUL) and has no NUL inside.
pub fn check_cmdline(cmdline: &str) -> Result<(), Error> {
    if cmdline.len() >= CMDLINE_MAX_SIZE {
        return Err(Error::CmdlineTooLong(cmdline.len()));
    }
    if cmdline.contains('\0') {
        return Err(Error::CmdlineNul);
    }
    Ok(())
}

/// Writes the NUL-terminated command line at [`CMDLINE_START`].
pub fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &str) -> Result<(), Error> {
    use vm_memory::Bytes;
    check_cmdline(cmdline)?;
    let mut bytes = Vec::with_capacity(cmdline.len() + 1);
    bytes.extend_from_slice(cmdline.as_bytes());
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE_START))
        .map_err(Error::Cmdline)
}

/// Where an initrd of `size` bytes goes: page-aligned, as high as possible below `limit`, and
/// above the kernel.
pub fn initrd_address(size: u64, kernel_end: u64, limit: u64) -> Result<u64, Error> {
    let too_big = Error::InitrdTooBig { size, limit };
    let addr = limit.checked_sub(size).ok_or(too_big)? & !(PAGE_SIZE - 1);
    if addr < kernel_end {
        return Err(Error::InitrdTooBig { size, limit });
    }
    Ok(addr)
}

/// Reads the initrd, given as parts laid end to end (the kernel unpacks concatenated cpio
/// archives in turn), into guest memory below `low_ram_end`; returns its address and size.
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    parts: &mut [(File, u64)],
    kernel: &LoadedKernel,
    low_ram_end: u64,
) -> Result<(GuestAddress, u64), Error> {
    use vm_memory::Bytes;
    let mut limit = low_ram_end;
    if let BootProtocol::Linux64 {
        setup_header: Some(h),
    } = kernel.protocol
    {
        if h.initrd_addr_max != 0 {
            limit = limit.min(h.initrd_addr_max as u64 + 1);
        }
    }
    let size = parts
        .iter()
        .try_fold(0u64, |sum, (_, n)| sum.checked_add(*n));
    let size = size.ok_or(Error::InitrdTooBig {
        size: u64::MAX,
        limit,
    })?;
    let start = GuestAddress(initrd_address(size, kernel.end, limit)?);
    let mut at = start;
    for (file, len) in parts.iter_mut() {
        mem.read_exact_volatile_from(at, file, *len as usize)
            .map_err(Error::ReadInitrd)?;
        at = GuestAddress(at.0 + *len);
    }
    Ok((start, size))
}

/// Writes the zero page or the PVH start_info, whichever the kernel's protocol needs.
pub fn write_boot_info(
    mem: &GuestMemoryMmap,
    kernel: &LoadedKernel,
    cmdline_len: usize,
    initrd: Option<(GuestAddress, u64)>,
    map: &[MapEntry],
) -> Result<(), Error> {
    match kernel.protocol {
        BootProtocol::Linux64 { setup_header } => {
            let params = zero_page(setup_header, cmdline_len, initrd, map)?;
            let bp = BootParams::new(&params, GuestAddress(ZERO_PAGE_START));
            LinuxBootConfigurator::write_bootparams(&bp, mem)?;
        }
        BootProtocol::Pvh => {
            if map.len() > PVH_MEMMAP_MAX_ENTRIES {
                return Err(Error::MemoryMapTooLarge(map.len()));
            }
            let mut info = hvm_start_info {
                magic: XEN_HVM_START_MAGIC,
                version: 1,
                cmdline_paddr: CMDLINE_START,
                memmap_paddr: PVH_MEMMAP_START,
                memmap_entries: map.len() as u32,
                ..Default::default()
            };
            let memmap: Vec<_> = map
                .iter()
                .map(|e| hvm_memmap_table_entry {
                    addr: e.addr,
                    size: e.size,
                    type_: e.kind as u32,
                    reserved: 0,
                })
                .collect();
            if initrd.is_some() {
                info.nr_modules = 1;
                info.modlist_paddr = PVH_MODLIST_START;
            }
            let mut bp = BootParams::new(&info, GuestAddress(PVH_INFO_START));
            bp.set_sections(&memmap, GuestAddress(PVH_MEMMAP_START));
            if let Some((addr, size)) = initrd {
                let module = hvm_modlist_entry {
                    paddr: addr.0,
                    size,
                    ..Default::default()
                };
                bp.set_modules(&[module], GuestAddress(PVH_MODLIST_START));
            }
            PvhBootConfigurator::write_bootparams(&bp, mem)?;
        }
    }
    Ok(())
}

/// The Linux zero page.
fn zero_page(
    setup_header: Option<setup_header>,
    cmdline_len: usize,
    initrd: Option<(GuestAddress, u64)>,
    map: &[MapEntry],
) -> Result<boot_params, Error> {
    let mut params = boot_params::default();
    if map.len() > params.e820_table.len() {
        return Err(Error::MemoryMapTooLarge(map.len()));
    }
    match setup_header {
        Some(h) => params.hdr = h,
        None => params.hdr.kernel_alignment = KERNEL_ALIGNMENT,
    }
    params.hdr.type_of_loader = LOADER_UNDEFINED;
    params.hdr.boot_flag = BOOT_FLAG_MAGIC;
    params.hdr.header = HDRS_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32 + 1;
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = addr.0 as u32;
        params.hdr.ramdisk_size = size as u32;
        params.ext_ramdisk_image = (addr.0 >> 32) as u32;
        params.ext_ramdisk_size = (size >> 32) as u32;
    }
    for (slot, e) in params.e820_table.iter_mut().zip(map) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind as u32,
        };
    }
    params.e820_entries = map.len() as u8;
    Ok(params)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm::memory;
    use vm_memory::Bytes;

    const MIB: u64 = 1 << 20;

    fn temp_file(name: &str, bytes: &[u8]) -> File {
        let path = std::env::temp_dir().join(format!("microvm-boot-{}-{name}", std::process::id()));
        std::fs::write(&path, bytes).unwrap();
        let f = File::open(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        f
    }

    #[test]
    fn garbage_is_not_a_kernel() {
        let mem = memory::create(32 * MIB).unwrap();
        let mut f = temp_file("garbage", &[0x5a; 8192]);
        assert!(matches!(
            load_kernel(&mem, &mut f),
            Err(Error::UnknownKernelFormat)
        ));
        let mut f = temp_file("empty", &[]);
        assert!(load_kernel(&mem, &mut f).is_err());
    }

    #[test]
    fn truncated_elf_is_an_error_not_a_panic() {
        let mem = memory::create(32 * MIB).unwrap();
        let mut bytes = b"\x7fELF\x02\x01\x01".to_vec();
        bytes.resize(40, 0);
        let mut f = temp_file("elf", &bytes);
        assert!(matches!(load_kernel(&mem, &mut f), Err(Error::Load(_))));
    }

    #[test]
    fn bzimage_decompression_window_is_kept_free() {
        let h = setup_header {
            kernel_alignment: 0x20_0000,
            pref_address: 0x100_0000,
            init_size: 45 << 20,
            ..Default::default()
        };
        // Loaded at 1 MiB, 8 MiB of compressed image: it still needs 16 MiB + 45 MiB.
        assert_eq!(bzimage_end(&h, 0x10_0000, 9 << 20), (16 + 45) << 20);
        let low = setup_header {
            init_size: 1 << 20,
            ..Default::default()
        };
        assert_eq!(bzimage_end(&low, 0x10_0000, 5 << 20), 5 << 20);
    }

    #[test]
    fn cmdline_limits() {
        assert!(check_cmdline(&"a".repeat(2047)).is_ok());
        assert!(matches!(
            check_cmdline(&"a".repeat(2048)),
            Err(Error::CmdlineTooLong(2048))
        ));
        assert!(matches!(check_cmdline("a\0b"), Err(Error::CmdlineNul)));
        let mem = memory::create(32 * MIB).unwrap();
        write_cmdline(&mem, "console=ttyS0").unwrap();
        let mut buf = [0u8; 14];
        mem.read_slice(&mut buf, GuestAddress(CMDLINE_START))
            .unwrap();
        assert_eq!(&buf, b"console=ttyS0\0");
    }

    #[test]
    fn initrd_goes_high_and_above_the_kernel() {
        assert_eq!(
            initrd_address(5000, 2 * MIB, 64 * MIB).unwrap(),
            64 * MIB - 8192
        );
        assert!(initrd_address(63 * MIB, 2 * MIB, 64 * MIB).is_err());
        assert!(initrd_address(u64::MAX, 0, 64 * MIB).is_err());
    }

    #[test]
    fn zero_page_carries_map_cmdline_and_initrd() {
        let map = memory::memory_map(128 * MIB);
        let p = zero_page(None, 12, Some((GuestAddress(0x7f0_0000), 4096)), &map).unwrap();
        assert_eq!({ p.hdr.boot_flag }, BOOT_FLAG_MAGIC);
        assert_eq!({ p.hdr.header }, HDRS_MAGIC);
        assert_eq!({ p.hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ p.hdr.ramdisk_image }, 0x7f0_0000);
        assert_eq!({ p.hdr.ramdisk_size }, 4096);
        assert_eq!(p.e820_entries as usize, map.len());
        assert_eq!({ p.e820_table[2].addr }, HIMEM_START);
    }

    #[test]
    fn pvh_start_info_is_written() {
        let mem = memory::create(32 * MIB).unwrap();
        let kernel = LoadedKernel {
            entry: GuestAddress(HIMEM_START),
            end: 0,
            protocol: BootProtocol::Pvh,
        };
        let map = memory::memory_map(32 * MIB);
        write_boot_info(&mem, &kernel, 3, Some((GuestAddress(0x100_0000), 77)), &map).unwrap();
        let info: hvm_start_info = mem.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!(info.magic, XEN_HVM_START_MAGIC);
        assert_eq!(info.nr_modules, 1);
        assert_eq!(info.memmap_entries as usize, map.len());
        let module: hvm_modlist_entry = mem.read_obj(GuestAddress(PVH_MODLIST_START)).unwrap();
        assert_eq!((module.paddr, module.size), (0x100_0000, 77));
        let last: hvm_memmap_table_entry = mem
            .read_obj(GuestAddress(PVH_MEMMAP_START + 24 * (map.len() as u64 - 1)))
            .unwrap();
        assert_eq!(
            (last.addr, last.size, last.type_),
            (HIMEM_START, 31 * MIB, 1)
        );
    }
}
