//! Boot-time marker: the guest writes a byte to a fixed port when it reaches a milestone, and we
//! log the time since the process started, split into set-up (KVM and ours) and guest time.

use crate::devices::BusDevice;
use crate::timing::Breakdown;

/// The marker port's device.
#[derive(Default)]
pub struct BootMarker;

impl BusDevice for BootMarker {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        let value = data.first().copied().unwrap_or(0);
        tracing::info!("guest boot marker {value:#x} at {}", Breakdown::now());
    }
}
