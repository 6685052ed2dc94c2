//! Boot-time marker: the guest writes a byte to a fixed port when it reaches a milestone, and we
//! log the time since the process started, split into set-up (KVM and ours) and guest time.

use crate::devices::BusDevice;
use crate::timing::Breakdown;

/// Markers logged at most: a boot has a handful, and a guest writing the port in a loop must
/// not fill the host's log.
const MAX_LOGGED: u32 = 16;

/// The marker port's device.
#[derive(Default)]
pub struct BootMarker {
    logged: u32,
}

impl BusDevice for BootMarker {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        let value = data.first().copied().unwrap_or(0);
        self.logged = self.logged.saturating_add(1);
        if self.logged <= MAX_LOGGED {
            tracing::info!("guest boot marker {value:#x} at {}", Breakdown::now());
        } else if self.logged == MAX_LOGGED + 1 {
            tracing::info!("guest boot marker: {MAX_LOGGED} logged; no more are");
        }
    }
}
