//! The `kvm` backend: our own VMM on /dev/kvm.

use super::VmEnd;
use crate::plan::VmPlan;
use crate::vmm::{Error, Vm};

/// Builds the VM described by `plan` and runs it to its end. The caller exits right after, so
/// the kernel's VM teardown is left to a keeper process (see `vmm::teardown`).
pub fn run(plan: &VmPlan) -> Result<VmEnd, Error> {
    Vm::build(plan)?.defer_teardown().run()
}
