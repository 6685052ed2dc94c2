//! Virtio devices in the VM: each gets a virtio-mmio slot (a 4 KiB window in the MMIO gap and an
//! IOAPIC pin), an irqfd for that pin, an ioeventfd per queue, a place on the MMIO bus, a seat on
//! the device loop, and a `virtio_mmio.device=` entry on the kernel command line so the guest
//! finds it.

use std::sync::{Arc, Mutex};

use kvm_ioctls::{IoEventAddress, VmFd};
use thiserror::Error;
use vm_memory::GuestMemoryMmap;

use super::device_loop::Subscriber;
use super::exit::{StopReason, StopSignal};
use super::layout::{CMDLINE_MAX_SIZE, VIRTIO_MMIO_START};
use super::mptable::IOAPIC_PINS;
use crate::devices::virtio::mmio::{self, MmioTransport, MMIO_WINDOW_SIZE, QUEUE_NOTIFY_OFFSET};
use crate::devices::virtio::{block, fs, net, vsock, Interrupt, VirtioDevice};
use crate::devices::{bus, Bus};
use crate::plan::{VmPlan, MAX_FS_TAG, MAX_SERIAL};
use crate::timing::kvm;

/// First GSI for virtio devices: 0-4 belong to the PIT, keyboard, cascade and COM ports.
const FIRST_GSI: u32 = 5;
/// How many virtio devices fit: one IOAPIC pin each, from [`FIRST_GSI`] to the last pin.
pub const MAX_DEVICES: u32 = IOAPIC_PINS as u32 - FIRST_GSI;

const _: () = assert!(
    MAX_SERIAL == block::SERIAL_BYTES,
    "plan::MAX_SERIAL must match the virtio-blk id field"
);
const _: () = assert!(
    MAX_FS_TAG == fs::TAG_BYTES,
    "plan::MAX_FS_TAG must match the virtio-fs tag field"
);

/// Errors placing virtio devices.
#[derive(Debug, Error)]
pub enum Error {
    /// The vsock device could not be created.
    #[error(transparent)]
    Vsock(#[from] vsock::Error),
    /// A disk could not be attached.
    #[error("disk {index}: {source}")]
    Block {
        /// Its position among the plan's disks, from 0.
        index: usize,
        /// Why.
        source: block::Error,
    },
    /// A virtio-fs share could not be attached.
    #[error("virtio-fs share {tag:?}: {source}")]
    Fs {
        /// The share's tag.
        tag: String,
        /// Why.
        source: fs::Error,
    },
    /// The network device could not be created (its tap or passt socket).
    #[error(transparent)]
    Net(net::Error),
    /// Two shares have the same tag, so the guest could mount only one of them.
    #[error("two virtio-fs shares have the tag {0:?}; give each share its own tag")]
    DuplicateTag(String),
    /// The transport rejected the device.
    #[error("virtio-mmio: {0}")]
    Transport(#[from] mmio::Error),
    /// More devices than IOAPIC pins.
    #[error(
        "the VM asks for {wanted} virtio devices (the vsock device, disks, shares and the \
         network device), but only {MAX_DEVICES} fit its interrupt controller: attach fewer \
         disks or shares"
    )]
    TooManyDevices {
        /// Devices asked for.
        wanted: usize,
    },
    /// An eventfd for an interrupt.
    #[error("cannot create an eventfd for a virtio interrupt: {0}")]
    EventFd(std::io::Error),
    /// KVM refused an irqfd or ioeventfd.
    #[error("KVM {what} for the virtio device at {base:#x} failed: {source}")]
    Kvm {
        /// Which ioctl.
        what: &'static str,
        /// The device's window.
        base: u64,
        /// The errno.
        source: kvm_ioctls::Error,
    },
    /// The window overlaps another device.
    #[error("virtio device layout: {0}")]
    Bus(#[from] bus::Error),
    /// The user's command line leaves no room for the device entries.
    #[error(
        "the kernel command line is {len} bytes with the virtio device entries ({entries:?}) \
         added; the limit is {max}: shorten --cmdline",
        max = CMDLINE_MAX_SIZE - 1
    )]
    CmdlineTooLong {
        /// Length with the entries.
        len: usize,
        /// What we appended.
        entries: String,
    },
}

/// Where a virtio-mmio device lives and which interrupt it raises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioSlot {
    /// Base of its register window.
    pub base: u64,
    /// Its GSI (= IOAPIC pin = ISA IRQ number in the MP table).
    pub gsi: u32,
}

impl MmioSlot {
    /// The kernel parameter that tells Linux about it.
    pub fn kernel_param(&self) -> String {
        format!(
            "virtio_mmio.device={}K@{:#x}:{}",
            MMIO_WINDOW_SIZE / 1024,
            self.base,
            self.gsi
        )
    }
}

/// Hands out slots in order: slot i is at VIRTIO_MMIO_START + i * 4 KiB with GSI 5 + i.
#[derive(Debug, Default)]
pub struct MmioSlots {
    used: u32,
}

impl MmioSlots {
    /// The next free slot.
    pub fn allocate(&mut self) -> Result<MmioSlot, Error> {
        if self.used >= MAX_DEVICES {
            return Err(Error::TooManyDevices {
                wanted: self.used as usize + 1,
            });
        }
        let gsi = FIRST_GSI + self.used;
        let slot = MmioSlot {
            base: VIRTIO_MMIO_START + u64::from(self.used) * MMIO_WINDOW_SIZE,
            gsi,
        };
        self.used += 1;
        Ok(slot)
    }
}

/// The VM's virtio devices, ready to be wired into vCPUs and the device loop.
#[derive(Default)]
pub struct VirtioDevices {
    /// The MMIO bus holding their register windows.
    pub mmio: Bus,
    /// Their device-loop subscribers.
    pub subscribers: Vec<Subscriber>,
    /// `virtio_mmio.device=` entries for the kernel command line.
    pub kernel_params: Vec<String>,
    slots: MmioSlots,
}

impl VirtioDevices {
    /// Creates the devices `plan` asks for: the vsock device, then the disks, then the shares,
    /// each in plan order, then the network device. Host sockets and disk images are opened,
    /// share backends connected and the tap or passt socket opened, here, before the guest runs.
    /// A share or network backend that fails later stops the VM through `stop`.
    pub fn create(
        vm: &VmFd,
        mem: &GuestMemoryMmap,
        plan: &VmPlan,
        stop: &Arc<StopSignal>,
    ) -> Result<Self, Error> {
        let wanted = usize::from(plan.vsock.is_some())
            + plan.disks.len()
            + plan.shares.len()
            + usize::from(plan.net.is_some());
        if wanted > MAX_DEVICES as usize {
            return Err(Error::TooManyDevices { wanted });
        }
        if let Some(tag) = duplicate_tag(plan) {
            return Err(Error::DuplicateTag(tag.to_owned()));
        }
        let mut devices = VirtioDevices::default();
        if let Some(v) = &plan.vsock {
            let vsock = Arc::new(Mutex::new(vsock::Vsock::new(
                u64::from(v.guest_cid),
                &v.uds_path,
            )?));
            devices.attach(vm, mem, vsock.clone())?;
            devices.subscribers.push(vsock);
        }
        for (index, disk) in plan.disks.iter().enumerate() {
            let block = block::Block::new(&disk.path, disk.read_only, &disk.serial)
                .map_err(|source| Error::Block { index, source })?;
            let block = Arc::new(Mutex::new(block));
            devices.attach(vm, mem, block.clone())?;
            devices.subscribers.push(block);
        }
        for share in &plan.shares {
            let stop = stop.clone();
            let on_failure = Box::new(move |msg| stop.request(StopReason::DeviceFailed(msg)));
            let fs =
                fs::Fs::new(&share.tag, &share.socket, on_failure).map_err(|source| Error::Fs {
                    tag: share.tag.clone(),
                    source,
                })?;
            let fs = Arc::new(Mutex::new(fs));
            devices.attach(vm, mem, fs.clone())?;
            devices.subscribers.push(fs);
        }
        // Last, so adding it moves no other device's slot.
        if let Some(plan) = &plan.net {
            let stop = stop.clone();
            let on_failure = Box::new(move |msg| stop.request(StopReason::DeviceFailed(msg)));
            let net = Arc::new(Mutex::new(
                net::Net::new(plan, on_failure).map_err(Error::Net)?,
            ));
            devices.attach(vm, mem, net.clone())?;
            devices.subscribers.push(net);
        }
        Ok(devices)
    }

    fn attach(
        &mut self,
        vm: &VmFd,
        mem: &GuestMemoryMmap,
        device: Arc<Mutex<dyn VirtioDevice>>,
    ) -> Result<(), Error> {
        let slot = self.slots.allocate()?;
        let ioctl = |what| {
            move |source| Error::Kvm {
                what,
                base: slot.base,
                source,
            }
        };
        let irqfd = crate::devices::event_fd().map_err(Error::EventFd)?;
        kvm(|| vm.register_irqfd(&irqfd, slot.gsi)).map_err(ioctl("KVM_IRQFD"))?;
        let transport = MmioTransport::new(mem.clone(), device, Interrupt::new(irqfd))?;
        // Kicks for queue i (a 4-byte write of i to QueueNotify) go straight to that queue's
        // eventfd, without a vCPU exit.
        let notify = IoEventAddress::Mmio(slot.base + QUEUE_NOTIFY_OFFSET);
        for (i, evt) in transport.queue_events().iter().enumerate() {
            kvm(|| vm.register_ioevent(evt, &notify, i as u32)).map_err(ioctl("KVM_IOEVENTFD"))?;
        }
        self.mmio
            .insert(Arc::new(Mutex::new(transport)), slot.base, MMIO_WINDOW_SIZE)?;
        self.kernel_params.push(slot.kernel_param());
        Ok(())
    }

    /// The user's command line followed by the device entries, within the x86 limit.
    pub fn kernel_cmdline(&self, user: &str) -> Result<String, Error> {
        append_params(user, &self.kernel_params)
    }
}

/// A tag used by more than one share, if any.
fn duplicate_tag(plan: &VmPlan) -> Option<&str> {
    let mut seen = std::collections::HashSet::new();
    plan.shares
        .iter()
        .map(|s| s.tag.as_str())
        .find(|tag| !seen.insert(*tag))
}

fn append_params(user: &str, params: &[String]) -> Result<String, Error> {
    let mut line = user.to_owned();
    for p in params {
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(p);
    }
    if line.len() >= CMDLINE_MAX_SIZE {
        return Err(Error::CmdlineTooLong {
            len: line.len(),
            entries: params.join(" "),
        });
    }
    Ok(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_consecutive_windows_and_gsis() {
        let mut s = MmioSlots::default();
        let a = s.allocate().unwrap();
        let b = s.allocate().unwrap();
        assert_eq!((a.base, a.gsi), (0xd000_0000, 5));
        assert_eq!((b.base, b.gsi), (0xd000_1000, 6));
        assert_eq!(a.kernel_param(), "virtio_mmio.device=4K@0xd0000000:5");
        for _ in 2..19 {
            s.allocate().unwrap();
        }
        let err = s.allocate().unwrap_err();
        assert!(matches!(err, Error::TooManyDevices { wanted: 20 }));
        assert!(err.to_string().contains("only 19 fit"), "{err}");
    }

    #[test]
    fn duplicate_share_tags_are_found() {
        use crate::plan::{Console, FsPlan};
        let share = |tag: &str| FsPlan {
            tag: tag.into(),
            socket: format!("/run/{tag}.sock").into(),
        };
        let mut plan = VmPlan {
            kernel: "vmlinux".into(),
            initrd: Vec::new(),
            cmdline: String::new(),
            cpus: 1,
            memory_mib: 64,
            timeout: None,
            console: Console::Stderr,
            vsock: None,
            disks: Vec::new(),
            net: None,
            shares: vec![share("a"), share("b")],
        };
        assert_eq!(duplicate_tag(&plan), None);
        plan.shares.push(share("a"));
        assert_eq!(duplicate_tag(&plan), Some("a"));
        let err = Error::DuplicateTag("a".into());
        assert!(err.to_string().contains("own tag"), "{err}");
    }

    #[test]
    fn params_follow_the_user_cmdline_within_the_limit() {
        let p = vec!["virtio_mmio.device=4K@0xd0000000:5".to_string()];
        assert_eq!(
            append_params("console=ttyS0", &p).unwrap(),
            "console=ttyS0 virtio_mmio.device=4K@0xd0000000:5"
        );
        assert_eq!(append_params("", &p).unwrap(), p[0]);
        assert_eq!(append_params("x", &[]).unwrap(), "x");
        let fits = "a".repeat(2047 - 1 - p[0].len());
        assert_eq!(append_params(&fits, &p).unwrap().len(), 2047);
        let err = append_params(&format!("{fits}a"), &p).unwrap_err();
        assert!(err.to_string().contains("2048 bytes"), "{err}");
        assert!(err.to_string().contains("limit is 2047"), "{err}");
    }
}
