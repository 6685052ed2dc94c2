//! Our KVM virtual machine monitor: builds a VM from a [`VmPlan`] and runs it to its end.
//!
//! Threads, one job each: vCPU threads (guest execution and register accesses), the device loop
//! (event-manager), and the controller (the thread calling [`Vm::run`]: timeout, stop requests,
//! teardown).
//! Every file and device is opened in [`Vm::build`], before the guest runs.

pub mod boot;
pub mod cpuid;
mod device_loop;
pub mod exit;
pub mod layout;
pub mod memory;
pub mod mptable;
pub mod pause;
pub mod pvm;
pub mod regs;
mod teardown;
pub mod vcpu;
pub mod virtio;

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, CpuId, KVM_MAX_CPUID_ENTRIES,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VmFd};
use thiserror::Error;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::signal::Killable;

use crate::backend::VmEnd;
use crate::console_log::ConsoleLog;
use crate::devices::legacy::{BootMarker, IrqLine, Serial, I8042};
use crate::devices::{bus, Bus};
use crate::plan::{Console, VmPlan, MAX_CPUS, MIN_MEMORY_MIB};
use crate::timing::kvm;
use exit::{ResetLine, StopReason, StopSignal};
use layout::*;
use vcpu::Vcpu;

/// Errors building or running a VM. Messages are for the person at the terminal.
#[derive(Debug, Error)]
pub enum Error {
    /// `--cpus` out of range.
    #[error("--cpus must be between 1 and {MAX_CPUS}, not {0}")]
    CpuCount(u8),
    /// `--memory` too small.
    #[error("--memory must be at least {MIN_MEMORY_MIB} MiB, not {0}")]
    MemoryTooSmall(u64),
    /// `--memory` more than the host has.
    #[error("--memory {asked} MiB is more than this host's {host} MiB of RAM")]
    MemoryTooLarge {
        /// Requested MiB.
        asked: u64,
        /// Host MiB.
        host: u64,
    },
    /// A file the VM needs cannot be opened.
    #[error("cannot open the {what} {path}: {source}")]
    Open {
        /// What the file is for.
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// /dev/kvm is missing or inaccessible.
    #[error("cannot open /dev/kvm: {0} (is KVM enabled, and may this user open /dev/kvm?)")]
    Kvm(kvm_ioctls::Error),
    /// A KVM ioctl failed.
    #[error("KVM {what} failed: {source}")]
    KvmIoctl {
        /// Which operation.
        what: &'static str,
        /// The errno.
        source: kvm_ioctls::Error,
    },
    /// A KVM capability we rely on is missing.
    #[error("this KVM lacks {0}, which microvm needs")]
    MissingCap(&'static str),
    /// Guest RAM could not be mapped.
    #[error(transparent)]
    Memory(#[from] memory::Error),
    /// Kernel, initrd or boot information.
    #[error(transparent)]
    Boot(#[from] boot::Error),
    /// The MP table.
    #[error(transparent)]
    MpTable(#[from] mptable::Error),
    /// Device layout.
    #[error("device layout: {0}")]
    Bus(#[from] bus::Error),
    /// Virtio devices.
    #[error(transparent)]
    Virtio(#[from] virtio::Error),
    /// Initial vCPU state could not be written to guest memory.
    #[error("cannot write initial CPU structures: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
    /// Host resources (threads, eventfds, signals).
    #[error("host resources: {0}")]
    Host(String),
    /// The guest triple-faulted.
    #[error("the guest triple-faulted on vCPU {cpu}{} (KVM_EXIT_SHUTDOWN)", rip.map(|r| format!(" at rip {r:#x}")).unwrap_or_default())]
    TripleFault {
        /// vCPU index.
        cpu: u8,
        /// Instruction pointer, if known.
        rip: Option<u64>,
    },
    /// A vCPU failed.
    #[error("the guest failed: {0}")]
    Guest(String),
    /// A device failed while the VM ran.
    #[error("{0}")]
    Device(String),
}

fn host_err(what: &str) -> impl Fn(std::io::Error) -> Error + '_ {
    move |e| Error::Host(format!("{what}: {e}"))
}

fn ioctl(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> Error {
    move |source| Error::KvmIoctl { what, source }
}

/// A VM ready to run: memory loaded, devices placed, vCPUs configured.
pub struct Vm {
    // Field order is drop order: the VM fd closes before the memory is unmapped (unless a
    // teardown keeper holds the VM on, by which time no vCPU can touch guest memory).
    vcpus: Vec<Vcpu>,
    stop: Arc<StopSignal>,
    pause: Arc<pause::PauseGate>,
    /// Device-loop subscribers (virtio devices), handed to the loop by [`Vm::run`].
    devices: Vec<device_loop::Subscriber>,
    timeout: Option<Duration>,
    defer_teardown: bool,
    _vm: VmFd,
    _kvm: Kvm,
    _memory: GuestMemoryMmap,
}

fn open(what: &'static str, path: &Path) -> Result<File, Error> {
    File::open(path).map_err(|source| Error::Open {
        what,
        path: path.to_owned(),
        source,
    })
}

/// Checks the plan's numbers before anything is opened.
pub fn validate(plan: &VmPlan) -> Result<(), Error> {
    if plan.cpus == 0 || plan.cpus > MAX_CPUS {
        return Err(Error::CpuCount(plan.cpus));
    }
    if plan.memory_mib < MIN_MEMORY_MIB {
        return Err(Error::MemoryTooSmall(plan.memory_mib));
    }
    let host = crate::host::total_ram_mib();
    if plan.memory_mib > host {
        return Err(Error::MemoryTooLarge {
            asked: plan.memory_mib,
            host,
        });
    }
    boot::check_cmdline(&plan.cmdline)?;
    Ok(())
}

/// Tells KVM where guest RAM lives: one memory slot per region.
fn register_memory(vm: &VmFd, memory: &GuestMemoryMmap) -> Result<(), Error> {
    for (slot, region) in memory.iter().enumerate() {
        let region_desc = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
            flags: 0,
        };
        // SAFETY: the region is a live mapping of exactly `memory_size` bytes owned by `memory`,
        // which the Vm keeps while any vCPU can run; KVM drops its own references to the pages
        // when the mapping goes (MMU notifiers), so a VM outliving it cannot reach freed memory.
        unsafe { vm.set_user_memory_region(region_desc) }
            .map_err(ioctl("KVM_SET_USER_MEMORY_REGION"))?;
    }
    Ok(())
}

/// Loads kernel, initrd, command line, boot information and MP table into guest memory.
fn load_guest(
    memory: &GuestMemoryMmap,
    plan: &VmPlan,
    cmdline: &str,
    kernel_file: &mut File,
    mut initrd: Vec<(File, u64)>,
) -> Result<boot::LoadedKernel, Error> {
    let mem_size = plan.memory_mib << 20;
    let kernel = boot::load_kernel(memory, kernel_file)?;
    tracing::debug!("kernel boots via {}", kernel.protocol_name());
    let initrd_at = if initrd.is_empty() {
        None
    } else {
        let low_end = memory::low_ram_end(mem_size);
        Some(boot::load_initrd(memory, &mut initrd, &kernel, low_end)?)
    };
    boot::write_cmdline(memory, cmdline)?;
    let map = memory::memory_map(mem_size);
    boot::write_boot_info(memory, &kernel, cmdline.len(), initrd_at, &map)?;
    mptable::setup(memory, plan.cpus)?;
    Ok(kernel)
}

/// The port bus with COM1, the i8042 reset line and the boot marker.
fn legacy_devices(
    vm: &VmFd,
    console: Box<dyn Write + Send>,
    stop: &Arc<StopSignal>,
) -> Result<Arc<Bus>, Error> {
    let com1_irq = crate::devices::event_fd().map_err(host_err("serial irq eventfd"))?;
    kvm(|| vm.register_irqfd(&com1_irq, COM1_IRQ)).map_err(ioctl("KVM_IRQFD"))?;
    let mut pio = Bus::new();
    pio.insert(
        Arc::new(Mutex::new(Serial::new(IrqLine(com1_irq), console))),
        COM1_PORT as u64,
        8,
    )?;
    let i8042 = I8042::new(ResetLine(stop.clone()));
    pio.insert(Arc::new(Mutex::new(i8042)), I8042_DATA_PORT as u64, 5)?;
    pio.insert(
        Arc::new(Mutex::new(BootMarker::default())),
        BOOT_MARKER_PORT as u64,
        1,
    )?;
    Ok(Arc::new(pio))
}

/// Creates and configures every vCPU; the boot CPU gets the entry state, the others wait for
/// INIT/SIPI from the guest as on hardware.
fn create_vcpus(
    kvm_sys: &Kvm,
    vm: &VmFd,
    memory: &GuestMemoryMmap,
    kernel: &boot::LoadedKernel,
    count: u8,
    wiring: &vcpu::Wiring,
) -> Result<Vec<Vcpu>, Error> {
    let supported = kvm(|| kvm_sys.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES))
        .map_err(ioctl("KVM_GET_SUPPORTED_CPUID"))?;
    let vendor = cpuid::Vendor::from_entries(supported.as_slice());
    let tsc_deadline = kvm_sys.check_extension(Cap::TscDeadlineTimer);
    let msrs = regs::boot_msrs();
    let pvm = crate::host::is_pvm();
    let mut vcpus = Vec::with_capacity(count as usize);
    for index in 0..count {
        let fd = kvm(|| vm.create_vcpu(index as u64)).map_err(ioctl("KVM_CREATE_VCPU"))?;
        let mut entries = supported.as_slice().to_vec();
        let topology = cpuid::VcpuTopology {
            index,
            count,
            tsc_deadline,
        };
        cpuid::filter(&mut entries, vendor, topology);
        if pvm {
            pvm::hide(&mut entries);
        }
        let cpuid = CpuId::from_entries(&entries).map_err(|_| {
            Error::Host(format!(
                "{} CPUID entries are more than KVM takes",
                entries.len()
            ))
        })?;
        kvm(|| fd.set_cpuid2(&cpuid)).map_err(ioctl("KVM_SET_CPUID2"))?;
        if pvm && index == 0 {
            report_pvm_cpuid(&fd);
        }
        let written = kvm(|| fd.set_msrs(&msrs)).map_err(ioctl("KVM_SET_MSRS"))?;
        if written != msrs.as_slice().len() {
            let index = msrs.as_slice()[written].index;
            return Err(Error::Host(format!("KVM refused to set MSR {index:#x}")));
        }
        kvm(|| fd.set_fpu(&regs::boot_fpu())).map_err(ioctl("KVM_SET_FPU"))?;
        let mut lapic = kvm(|| fd.get_lapic()).map_err(ioctl("KVM_GET_LAPIC"))?;
        regs::set_lint_pins(&mut lapic);
        kvm(|| fd.set_lapic(&lapic)).map_err(ioctl("KVM_SET_LAPIC"))?;
        if index == 0 {
            let mut sregs = kvm(|| fd.get_sregs()).map_err(ioctl("KVM_GET_SREGS"))?;
            regs::setup_sregs(memory, &kernel.protocol, &mut sregs)?;
            kvm(|| fd.set_sregs(&sregs)).map_err(ioctl("KVM_SET_SREGS"))?;
            let r = regs::boot_regs(&kernel.protocol, kernel.entry.0);
            kvm(|| fd.set_regs(&r)).map_err(ioctl("KVM_SET_REGS"))?;
        }
        vcpus.push(Vcpu::new(fd, index, wiring.clone()));
    }
    Ok(vcpus)
}

/// Says which hidden features a PVM host shows the guest anyway (the guest kernel's
/// `microvm.pvm` option covers them).
fn report_pvm_cpuid(fd: &kvm_ioctls::VcpuFd) {
    match kvm(|| fd.get_cpuid2(KVM_MAX_CPUID_ENTRIES)) {
        Ok(back) => {
            let shown = pvm::still_shown(back.as_slice());
            if !shown.is_empty() {
                tracing::debug!(
                    "PVM host: KVM shows the guest {} although we hid them",
                    shown.join(", ")
                );
            }
        }
        Err(e) => tracing::debug!("PVM host: cannot read the guest CPUID back: {e}"),
    }
}

impl Vm {
    /// Opens everything, creates the VM and loads the guest.
    pub fn build(plan: &VmPlan) -> Result<Vm, Error> {
        validate(plan)?;
        let mut kernel_file = open("kernel", &plan.kernel)?;
        let mut initrd = Vec::with_capacity(plan.initrd.len());
        for path in &plan.initrd {
            let f = open("initrd", path)?;
            let meta = f.metadata();
            let size = meta
                .map_err(|source| Error::Open {
                    what: "initrd",
                    path: path.clone(),
                    source,
                })?
                .len();
            initrd.push((f, size));
        }
        let console: Box<dyn Write + Send> = match &plan.console {
            Console::Stderr => Box::new(std::io::stderr()),
            Console::File(path) => {
                Box::new(ConsoleLog::create(path).map_err(|source| Error::Open {
                    what: "console log",
                    path: path.clone(),
                    source,
                })?)
            }
        };

        vcpu::register_kick_handler()
            .map_err(|e| Error::Host(format!("vCPU kick handler: {e}")))?;

        let kvm_sys = kvm(Kvm::new).map_err(Error::Kvm)?;
        if !kvm_sys.check_extension(Cap::ImmediateExit) {
            return Err(Error::MissingCap("KVM_CAP_IMMEDIATE_EXIT"));
        }
        let vm = kvm(|| kvm_sys.create_vm()).map_err(ioctl("KVM_CREATE_VM"))?;
        // Guest RAM goes in before the irqchip: on PVM the first memory slot costs ~7 ms when an
        // irqchip already exists and ~0.2 ms when it does not (measured; see bench/).
        let mem_size = plan.memory_mib << 20;
        // vhost-user backends (virtiofsd) map guest RAM themselves, so it must be a shared file.
        let memory = if plan.shares.is_empty() {
            memory::create(mem_size)?
        } else {
            memory::create_shared(mem_size)?
        };
        kvm(|| register_memory(&vm, &memory))?;
        kvm(|| vm.set_tss_address(KVM_TSS_ADDR)).map_err(ioctl("KVM_SET_TSS_ADDR"))?;
        kvm(|| vm.create_irq_chip()).map_err(ioctl("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        kvm(|| vm.create_pit2(pit)).map_err(ioctl("KVM_CREATE_PIT2"))?;

        // Virtio devices first: the guest learns of them from its command line.
        let stop = Arc::new(StopSignal::new().map_err(host_err("stop eventfd"))?);
        let virtio = virtio::VirtioDevices::create(&vm, &memory, plan, &stop)?;
        let cmdline = virtio.kernel_cmdline(&plan.cmdline)?;
        let kernel = load_guest(&memory, plan, &cmdline, &mut kernel_file, initrd)?;
        let pio = legacy_devices(&vm, console, &stop)?;
        let pause =
            Arc::new(pause::PauseGate::new(plan.cpus.into()).map_err(host_err("pause eventfd"))?);
        let wiring = vcpu::Wiring {
            pio,
            mmio: Arc::new(virtio.mmio),
            stop: stop.clone(),
            pause: pause.clone(),
        };
        let vcpus = create_vcpus(&kvm_sys, &vm, &memory, &kernel, plan.cpus, &wiring)?;

        Ok(Vm {
            vcpus,
            stop,
            pause,
            devices: virtio.subscribers,
            timeout: plan.timeout,
            defer_teardown: false,
            _vm: vm,
            _kvm: kvm_sys,
            _memory: memory,
        })
    }

    /// Leaves the VM's final teardown to a child process once the guest has ended, so that a
    /// process about to exit reports the guest's status without waiting for the kernel. Only
    /// for processes that exit right after [`Vm::run`].
    pub fn defer_teardown(mut self) -> Self {
        self.defer_teardown = true;
        self
    }

    /// A handle to stop the running VM from another thread (with [`StopReason::HostSignal`], for
    /// instance).
    pub fn stop_handle(&self) -> Arc<StopSignal> {
        self.stop.clone()
    }

    /// A handle to pause and resume the running VM from another thread.
    pub fn pause_handle(&self) -> Arc<pause::PauseGate> {
        self.pause.clone()
    }

    /// Runs the guest until it stops, fails, times out or is stopped through [`Vm::stop_handle`].
    pub fn run(mut self) -> Result<VmEnd, Error> {
        let epoll = Epoll::new().map_err(host_err("epoll"))?;
        let stop_fd = self.stop.eventfd().as_raw_fd();
        epoll
            .ctl(
                ControlOperation::Add,
                stop_fd,
                EpollEvent::new(EventSet::IN, 0),
            )
            .map_err(host_err("epoll"))?;
        let pause_fd = self.pause.kick_fd().as_raw_fd();
        epoll
            .ctl(
                ControlOperation::Add,
                pause_fd,
                EpollEvent::new(EventSet::IN, 1),
            )
            .map_err(host_err("epoll"))?;

        let devices = device_loop::DeviceLoop::start(std::mem::take(&mut self.devices))
            .map_err(host_err("device loop"))?;
        let mut threads = Vec::with_capacity(self.vcpus.len());
        for (i, vcpu) in self.vcpus.drain(..).enumerate() {
            let t = std::thread::Builder::new()
                .name(format!("vcpu{i}"))
                .spawn(move || vcpu.run())
                .map_err(host_err("vCPU thread"));
            match t {
                Ok(t) => threads.push(t),
                Err(e) => {
                    self.stop.request_host_stop();
                    stop_threads(threads);
                    devices.stop();
                    return Err(e);
                }
            }
        }

        let deadline = self.timeout.map(|t| Instant::now() + t);
        let mut events = vec![EpollEvent::default(); 2];
        let end = loop {
            let wait_ms = match deadline {
                // Rounded up: a 0 ms wait with time left would spin.
                Some(d) => d
                    .saturating_duration_since(Instant::now())
                    .as_micros()
                    .div_ceil(1000)
                    .min(i32::MAX as u128) as i32,
                None => -1,
            };
            let n = match epoll.wait(wait_ms, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => break Err(Error::Host(format!("waiting for the guest: {e}"))),
            };
            if n == 0 && deadline.is_some_and(|d| Instant::now() >= d) {
                break Ok(VmEnd::TimedOut);
            }
            if events[..n].iter().any(|e| e.data() == 1) {
                // Pause asked: kick every vCPU out of the guest; each parks at the gate.
                let _ = self.pause.kick_fd().read();
                for t in &threads {
                    let _ = t.kill(vcpu::kick_signal());
                }
            }
            if self.stop.is_requested() {
                break match self.stop.reason() {
                    Some(StopReason::TripleFault { cpu, rip }) => {
                        Err(Error::TripleFault { cpu, rip })
                    }
                    Some(StopReason::VcpuFailed(msg)) => Err(Error::Guest(msg)),
                    Some(StopReason::DeviceFailed(msg)) => Err(Error::Device(msg)),
                    Some(StopReason::HostSignal(sig)) => Ok(VmEnd::Signal(sig)),
                    Some(StopReason::GuestStopped) | None => Ok(VmEnd::GuestStopped),
                };
            }
        };

        self.stop.request_host_stop();
        self.pause.release_for_stop();
        stop_threads(threads);
        devices.stop();
        if self.defer_teardown {
            if let Err(e) = teardown::defer(self._vm.as_raw_fd()) {
                tracing::debug!("tearing the VM down in-process: {e}");
            }
        }
        end
    }
}

/// Kicks every vCPU thread out of KVM_RUN (the stop flag is already set) and joins it. A vCPU
/// stuck outside KVM (say, writing console output nobody reads) is left behind after a grace
/// period rather than holding the process: it re-checks the stop flag before it could run again.
fn stop_threads(threads: Vec<std::thread::JoinHandle<()>>) {
    const GRACE: Duration = Duration::from_secs(5);
    let started = Instant::now();
    for t in &threads {
        // The thread may have ended already; a failed kick is then harmless.
        let _ = t.kill(vcpu::kick_signal());
    }
    for t in threads {
        while !t.is_finished() && started.elapsed() < GRACE {
            std::thread::sleep(Duration::from_micros(100));
        }
        if t.is_finished() {
            let _ = t.join();
        } else {
            tracing::warn!("a vCPU thread did not stop within {GRACE:?}; leaving it behind");
        }
    }
}
