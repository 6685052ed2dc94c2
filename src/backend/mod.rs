//! Backends: ways to run a [`VmPlan`](crate::plan::VmPlan). `kvm` is our own VMM.

pub mod kvm;

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
