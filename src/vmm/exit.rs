//! Why a VM stops, and the one-shot signal that tells the controller thread it must.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

/// The reason a running VM stopped, as first reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// The guest reset (i8042, KVM system event) or powered off.
    GuestStopped,
    /// KVM_EXIT_SHUTDOWN: a triple fault.
    TripleFault {
        /// vCPU index.
        cpu: u8,
        /// Instruction pointer when it happened, if KVM still tells.
        rip: Option<u64>,
    },
    /// Any other fatal vCPU condition, already worded for the user.
    VcpuFailed(String),
    /// A device cannot go on (say, its vhost-user backend exited), already worded for the user.
    DeviceFailed(String),
    /// microvm received this signal and stops the VM.
    HostSignal(i32),
}

/// Shared between vCPUs, devices and the controller: the first stop request wins.
pub struct StopSignal {
    requested: AtomicBool,
    reason: Mutex<Option<StopReason>>,
    evt: EventFd,
}

impl StopSignal {
    /// A signal nobody has raised yet.
    pub fn new() -> std::io::Result<Self> {
        Ok(StopSignal {
            requested: AtomicBool::new(false),
            reason: Mutex::new(None),
            evt: crate::devices::event_fd()?,
        })
    }

    /// Asks for the VM to stop for `reason`; later reasons are ignored.
    pub fn request(&self, reason: StopReason) {
        let mut slot = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            *slot = Some(reason);
        }
        self.requested.store(true, Ordering::SeqCst);
        drop(slot);
        // A full eventfd counter still wakes the controller, so the error is harmless.
        let _ = self.evt.write(1);
    }

    /// Whether anyone asked to stop (checked by vCPUs before each guest entry).
    pub fn is_requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }

    /// Marks the VM as stopping without a guest-side reason (timeout, host signal).
    pub fn request_host_stop(&self) {
        self.requested.store(true, Ordering::SeqCst);
    }

    /// The first reason given, if any.
    pub fn reason(&self) -> Option<StopReason> {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The eventfd the controller waits on.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

/// The i8042 reset line: a guest reset stops the VM.
pub struct ResetLine(pub std::sync::Arc<StopSignal>);

impl Trigger for ResetLine {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        self.0.request(StopReason::GuestStopped);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins_and_wakes_the_controller() {
        let s = StopSignal::new().unwrap();
        assert!(!s.is_requested());
        s.request(StopReason::TripleFault {
            cpu: 1,
            rip: Some(5),
        });
        s.request(StopReason::GuestStopped);
        assert!(s.is_requested());
        assert_eq!(
            s.reason(),
            Some(StopReason::TripleFault {
                cpu: 1,
                rip: Some(5)
            })
        );
        assert_eq!(s.eventfd().read().unwrap(), 2);
    }
}
