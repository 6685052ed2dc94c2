//! The i8042 keyboard controller, kept for one thing: a guest `reboot` writes 0xFE (pulse the
//! reset line) to its command port, which ends the VM.

use vm_superio::Trigger;

use crate::devices::BusDevice;

/// Data port 0x60 and command port 0x64, as one device spanning 0x60..=0x64.
pub struct I8042<T: Trigger> {
    inner: vm_superio::I8042Device<T>,
}

/// Offset of the command port from the data port.
const COMMAND_OFFSET: u64 = 4;

impl<T: Trigger> I8042<T> {
    /// A controller whose reset line fires `reset`.
    pub fn new(reset: T) -> Self {
        I8042 {
            inner: vm_superio::I8042Device::new(reset),
        }
    }
}

impl<T: Trigger + Send> BusDevice for I8042<T>
where
    T::E: std::fmt::Debug,
{
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match data {
            [byte] => *byte = self.inner.read(offset as u8),
            // Byte-wide registers only: anything else reads as an empty bus.
            data => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let [byte] = data {
            if offset == 0 || offset == COMMAND_OFFSET {
                if let Err(e) = self.inner.write(offset as u8, *byte) {
                    tracing::warn!("i8042 reset line: {e:?}");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    struct Count(Arc<AtomicUsize>);
    impl Trigger for Count {
        type E = ();
        fn trigger(&self) -> Result<(), ()> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    #[test]
    fn reset_command_fires_the_line() {
        let n = Arc::new(AtomicUsize::new(0));
        let mut kbd = I8042::new(Count(n.clone()));
        kbd.write(COMMAND_OFFSET, &[0x20]); // read command byte: no reset
        kbd.write(0, &[0xfe]); // 0xFE on the data port is data, not a reset
        assert_eq!(n.load(Ordering::SeqCst), 0);
        kbd.write(COMMAND_OFFSET, &[0xfe]);
        assert_eq!(n.load(Ordering::SeqCst), 1);
        let mut status = [0u8];
        kbd.read(COMMAND_OFFSET, &mut status);
        kbd.write(2, &[0xfe]); // ports 0x61-0x63 belong to others: ignored
        assert_eq!(n.load(Ordering::SeqCst), 1);
    }
}
