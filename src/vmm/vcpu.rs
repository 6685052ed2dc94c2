//! vCPU threads: each runs KVM_RUN in a loop, completes port and MMIO accesses on the spot, and
//! turns fatal exits into a [`StopReason`]. Another thread stops a vCPU by setting the
//! [`StopSignal`] and sending [`kick_signal`]; the handler sets `immediate_exit`, so a signal that
//! lands just before KVM_RUN still makes it return at once.

use std::cell::Cell;
use std::ptr::null_mut;
use std::sync::atomic::{compiler_fence, Ordering};
use std::sync::Arc;

use kvm_bindings::{
    kvm_run, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use super::exit::{StopReason, StopSignal};
use crate::devices::Bus;

thread_local! {
    // This thread's kvm_run page, for the kick handler. Const-initialised with no destructor,
    // so reading it from a signal handler is a plain TLS load.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(null_mut()) };
}

/// The signal that kicks a vCPU thread out of KVM_RUN.
pub fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = KVM_RUN.with(|r| r.get());
    if !run.is_null() {
        // SAFETY: `run` is this thread's kvm_run mapping, set by `Vcpu::run` while the VcpuFd
        // (and so the mapping) is alive and cleared before it is dropped; the signal is delivered
        // on this same thread, so nothing else writes the field concurrently from Rust.
        unsafe { std::ptr::write_volatile(std::ptr::addr_of_mut!((*run).immediate_exit), 1) };
    }
}

/// Installs the kick handler; call once before vCPU threads start.
pub fn register_kick_handler() -> Result<(), vmm_sys_util::errno::Error> {
    register_signal_handler(kick_signal(), handle_kick)
}

/// What every vCPU shares: the buses its exits dispatch to and the VM's stop signal.
#[derive(Clone)]
pub struct Wiring {
    /// Port I/O bus.
    pub pio: Arc<Bus>,
    /// MMIO bus.
    pub mmio: Arc<Bus>,
    /// Raised to stop the VM; checked before every guest entry.
    pub stop: Arc<StopSignal>,
    /// Closed while the VM is paused; passed before every guest entry.
    pub pause: Arc<super::pause::PauseGate>,
}

/// The width of one access of the current port I/O exit (1, 2 or 4).
fn io_size(run: *mut kvm_run) -> usize {
    // SAFETY: `run` is this thread's live kvm_run mapping and KVM filled its `io` member for
    // the exit being handled; `size` lies in the header, apart from the data bytes borrowed by
    // the exit, and is only read.
    let size = unsafe { std::ptr::addr_of!((*run).__bindgen_anon_1.io.size).read_volatile() };
    usize::from(size).clamp(1, 8)
}

/// One virtual CPU, ready to run on its own thread.
pub struct Vcpu {
    fd: VcpuFd,
    index: u8,
    wiring: Wiring,
}

/// What the run loop does after one exit.
enum Next {
    Continue,
    Stop(StopReason),
}

impl Vcpu {
    /// Wraps a configured vCPU.
    pub fn new(fd: VcpuFd, index: u8, wiring: Wiring) -> Self {
        Vcpu { fd, index, wiring }
    }

    /// Runs the guest until the VM is asked to stop or this vCPU hits a fatal exit.
    pub fn run(mut self) {
        let run = self.fd.get_kvm_run() as *mut kvm_run;
        KVM_RUN.with(|r| r.set(run));
        if self.index == 0 {
            crate::timing::mark_setup_done();
        }
        while !self.wiring.stop.is_requested() {
            self.wiring.pause.wait_while_paused(&self.wiring.stop);
            if self.wiring.stop.is_requested() {
                break;
            }
            if let Next::Stop(reason) = self.run_once(run) {
                self.wiring.stop.request(reason);
            }
        }
        KVM_RUN.with(|r| r.set(null_mut()));
    }

    /// One guest entry and the handling of its exit. `run` is this vCPU's kvm_run mapping.
    fn run_once(&mut self, run: *mut kvm_run) -> Next {
        let index = self.index;
        match self.fd.run() {
            // String I/O (`rep outsb` and friends) arrives as `count` accesses of `size` bytes
            // to the same port, packed together: hand them to the device one by one.
            Ok(VcpuExit::IoOut(port, data)) => {
                for access in data.chunks(io_size(run)) {
                    if !self.wiring.pio.write(port as u64, access) {
                        tracing::trace!("vCPU {index}: write to unclaimed port {port:#x}");
                    }
                }
                Next::Continue
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                for access in data.chunks_mut(io_size(run)) {
                    self.wiring.pio.read(port as u64, access);
                }
                Next::Continue
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                if !self.wiring.mmio.write(addr, data) {
                    tracing::trace!("vCPU {index}: write to unclaimed MMIO {addr:#x}");
                }
                Next::Continue
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                self.wiring.mmio.read(addr, data);
                Next::Continue
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                KVM_SYSTEM_EVENT_SHUTDOWN | KVM_SYSTEM_EVENT_RESET => Next::Stop(StopReason::GuestStopped),
                KVM_SYSTEM_EVENT_CRASH => self.failed("the guest reported a crash (KVM system event)"),
                other => self.failed(&format!("unexpected KVM system event {other}")),
            },
            Ok(VcpuExit::Shutdown) => {
                let rip = self.fd.get_regs().ok().map(|r| r.rip);
                Next::Stop(StopReason::TripleFault { cpu: index, rip })
            }
            Ok(VcpuExit::InternalError) => {
                // SAFETY: KVM filled the `internal` member of the union for this exit reason.
                let suberror = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
                let what = match suberror {
                    1 => "instruction emulation failed",
                    2 => "exception while delivering an exception",
                    3 => "event delivery failed",
                    4 => "unexpected exit reason",
                    _ => "unknown cause",
                };
                self.failed(&format!("KVM internal error {suberror} ({what})"))
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => self.failed(&format!(
                "KVM could not enter the guest (hardware entry failure {reason:#x} on host CPU {cpu})"
            )),
            Ok(VcpuExit::Hlt) => self.failed("the guest halted with no interrupt controller to wake it"),
            Ok(other) => {
                let what = format!("{other:?}");
                self.failed(&format!("unexpected KVM exit {what}"))
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                // Kicked: clear the flag so the next entry runs the guest (if still wanted). The
                // clear must stay before the stop check in `run`, or a kick landing between them
                // would be lost; a compiler fence keeps the two in order.
                self.fd.set_kvm_immediate_exit(0);
                compiler_fence(Ordering::SeqCst);
                Next::Continue
            }
            Err(e) => self.failed(&format!("KVM_RUN failed: {e}")),
        }
    }

    /// A fatal condition on this vCPU, worded for the user with the guest's RIP when known.
    fn failed(&self, what: &str) -> Next {
        let at = match self.fd.get_regs() {
            Ok(r) => format!(" at rip {:#x}", r.rip),
            Err(_) => String::new(),
        };
        Next::Stop(StopReason::VcpuFailed(format!(
            "vCPU {}: {what}{at}",
            self.index
        )))
    }
}
