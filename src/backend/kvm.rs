//! The `kvm` backend: our own VMM on /dev/kvm.

use super::VmEnd;
use crate::plan::VmPlan;
use crate::vmm::{Error, Vm};

/// Builds the VM described by `plan`: every file and device opened, the guest loaded.
pub fn build(plan: &VmPlan) -> Result<Vm, Error> {
    Vm::build(plan)
}

/// Runs the VM to its end. The caller exits right after, so the kernel's VM teardown is left to
/// a keeper process (see `vmm::teardown`), unless `MICROVM_SYNC_TEARDOWN=1` asks to wait for it
/// (for benchmarks and debugging).
pub fn run(vm: Vm) -> Result<VmEnd, Error> {
    let sync = std::env::var_os("MICROVM_SYNC_TEARDOWN").is_some_and(|v| v == "1");
    if sync { vm } else { vm.defer_teardown() }.run()
}

/// The guest resets through the i8042, which our VMM turns into the VM's end.
pub const CMDLINE_EXTRA: &str = "reboot=k";

/// [`CMDLINE_EXTRA`] plus, on a PVM host, the option that turns on our guest kernel's PVM
/// compatibility code (see `vmm::pvm`).
pub fn cmdline_extra() -> String {
    if crate::host::is_pvm() {
        format!("{CMDLINE_EXTRA} {}", crate::vmm::pvm::GUARD_PARAM)
    } else {
        CMDLINE_EXTRA.to_string()
    }
}
