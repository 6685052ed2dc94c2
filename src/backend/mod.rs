//! Backends: ways to run a [`VmPlan`](crate::plan::VmPlan). `kvm` is our own VMM; `qemu` runs
//! the same plan under QEMU's TCG for hosts whose KVM cannot boot the guest.

pub mod kvm;
pub mod qemu;

use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::agent::VmWatch;
use crate::helpers::ProcessHandle;
use crate::plan::VmPlan;
use crate::vmm::exit::{StopReason, StopSignal};
use crate::vmm::pause::PauseGate;

/// How a VM ended when nothing went wrong on the host side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmEnd {
    /// The guest reset or powered itself off (i8042 reset, KVM system event).
    GuestStopped,
    /// The guest ran past `--timeout` and was stopped.
    TimedOut,
    /// microvm received this signal (Ctrl-C, SIGTERM) and stopped the guest.
    Signal(i32),
}

/// Which backend to use, as the user asked.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Hypervisor {
    /// `kvm` where it boots the guest at full speed, otherwise an error naming the choices.
    Auto,
    /// Our own VMM on /dev/kvm.
    Kvm,
    /// QEMU with software emulation (TCG): no hardware isolation boundary.
    Qemu,
}

/// Resolves `auto`; never falls back silently to something weaker than asked.
pub fn choose(asked: Hypervisor) -> Result<Hypervisor, String> {
    match asked {
        Hypervisor::Auto => {
            if !Path::new("/dev/kvm").exists() {
                Err("no /dev/kvm on this host: pass --hypervisor qemu to run emulated (TCG is not a hardware isolation boundary)".into())
            } else if crate::host::is_pvm() {
                Err("this host's KVM is PVM, which boots a Linux guest only very slowly: pass --hypervisor qemu (emulated; TCG is not a hardware isolation boundary) or --hypervisor kvm (slow)".into())
            } else {
                Ok(Hypervisor::Kvm)
            }
        }
        other => Ok(other),
    }
}

/// The kernel command-line options a backend needs: its reboot path and, for `kvm` on a PVM
/// host, our kernel's PVM compatibility option.
pub fn cmdline_extra(h: Hypervisor) -> String {
    match h {
        Hypervisor::Qemu => qemu::CMDLINE_EXTRA.to_string(),
        _ => kvm::cmdline_extra(),
    }
}

/// Stops, pauses and resumes a running VM from any thread (the guest gets no say).
#[derive(Clone)]
pub enum Stopper {
    /// Our VMM's stop signal and pause gate.
    Kvm(Arc<StopSignal>, Arc<PauseGate>),
    /// The QEMU process (a pidfd: once its waiter has reaped it, signals go nowhere).
    Qemu(ProcessHandle),
}

impl Stopper {
    /// Stops the VM.
    pub fn stop(&self) {
        match self {
            Stopper::Kvm(stop, _) => stop.request(StopReason::HostSignal(libc::SIGKILL)),
            Stopper::Qemu(qemu) => {
                let _ = qemu.signal(libc::SIGKILL);
            }
        }
    }

    /// Stops the guest's vCPUs; no guest code runs until [`Stopper::resume`].
    pub fn pause(&self) -> Result<(), String> {
        match self {
            Stopper::Kvm(_, gate) => gate.pause(),
            // The whole QEMU process stops, vCPU threads included; its vhost-user helpers
            // are processes of their own and only wait.
            Stopper::Qemu(qemu) => signal_qemu(qemu, libc::SIGSTOP),
        }
    }

    /// Lets a paused guest run again.
    pub fn resume(&self) -> Result<(), String> {
        match self {
            Stopper::Kvm(_, gate) => {
                gate.resume();
                Ok(())
            }
            Stopper::Qemu(qemu) => signal_qemu(qemu, libc::SIGCONT),
        }
    }
}

fn signal_qemu(qemu: &ProcessHandle, sig: i32) -> Result<(), String> {
    qemu.signal(sig)
        .map_err(|e| format!("cannot signal QEMU: {e}"))
}

/// A VM running in the background while the caller talks to its agent.
pub struct RunningVm {
    waiter: JoinHandle<Result<VmEnd, String>>,
    stopper: Stopper,
}

impl RunningVm {
    /// Builds and starts the VM with backend `h` (not `auto`), calling `meanwhile` on this
    /// thread as the VM is built: helpers such as virtiofsd start there, while our VMM loads the
    /// kernel on its own thread (QEMU, which waits for its helpers as it starts, comes after).
    /// Call on the main thread: helper processes are tied to the thread that starts them. If
    /// `meanwhile` fails, the VM is stopped and its error returned. The returned watch turns
    /// readable when the VM has ended.
    pub fn start<T>(
        h: Hypervisor,
        plan: &VmPlan,
        run_dir: &Path,
        meanwhile: impl FnOnce() -> Result<T, String>,
    ) -> Result<(RunningVm, VmWatch, T), String> {
        let (watch, guard) = VmWatch::new().map_err(|e| format!("cannot watch the VM: {e}"))?;
        let timeout = plan.timeout;
        let (waiter, stopper, helpers) = match h {
            Hypervisor::Qemu => {
                let helpers = meanwhile()?;
                let q = qemu::Qemu::start(plan, run_dir).map_err(|e| e.to_string())?;
                let handle = q.handle();
                let waiter = std::thread::spawn(move || {
                    let _guard = guard;
                    match q.wait(timeout)? {
                        true => Ok(VmEnd::GuestStopped),
                        false => Ok(VmEnd::TimedOut),
                    }
                });
                (waiter, Stopper::Qemu(handle), helpers)
            }
            _ => {
                let (built_tx, built) = std::sync::mpsc::sync_channel(1);
                let plan = plan.clone();
                let waiter = std::thread::Builder::new()
                    .name("vmm".into())
                    .spawn(move || {
                        let _guard = guard;
                        let vm = kvm::build(&plan).map_err(|e| e.to_string())?;
                        // The receiver is only gone if the caller is; then nobody stops the VM.
                        built_tx
                            .send((vm.stop_handle(), vm.pause_handle()))
                            .map_err(|_| "the VM's starter is gone".to_string())?;
                        kvm::run(vm).map_err(|e| e.to_string())
                    })
                    .map_err(|e| format!("cannot start the VMM thread: {e}"))?;
                let helpers = meanwhile();
                let vm = match built.recv() {
                    Ok((stop, pause)) => RunningVm {
                        waiter,
                        stopper: Stopper::Kvm(stop, pause),
                    },
                    // The build failed (its thread sent nothing). A helper's failure comes
                    // first: the VM may have failed for want of that helper (a share's socket
                    // closed under it, say).
                    Err(_) => {
                        let built = match waiter.join() {
                            Ok(Err(e)) => e,
                            Ok(Ok(_)) => "the VM ended before it was built".into(),
                            Err(_) => "the VMM thread panicked".into(),
                        };
                        return Err(helpers.err().unwrap_or(built));
                    }
                };
                match helpers {
                    Ok(helpers) => return Ok((vm, watch, helpers)),
                    Err(e) => {
                        vm.stop();
                        let _ = vm.wait(Duration::from_secs(10));
                        return Err(e);
                    }
                }
            }
        };
        Ok((RunningVm { waiter, stopper }, watch, helpers))
    }

    /// Stops the VM (the guest gets no say).
    pub fn stop(&self) {
        self.stopper.stop()
    }

    /// A handle that stops the VM from another thread.
    pub fn stopper(&self) -> Stopper {
        self.stopper.clone()
    }

    /// Waits for the VM to end, stopping it after `grace` if it has not.
    pub fn wait(self, grace: Duration) -> Result<VmEnd, String> {
        let deadline = std::time::Instant::now() + grace;
        while !self.waiter.is_finished() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        if !self.waiter.is_finished() {
            self.stop();
        }
        self.waiter
            .join()
            .map_err(|_| "the VMM thread panicked".to_string())?
    }
}
