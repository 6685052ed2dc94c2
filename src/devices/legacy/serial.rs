//! 8250 UART on COM1 (vm-superio's model): guest console output to the host.

use std::io::Write;

use vm_superio::serial::NoEvents;

use super::IrqLine;
use crate::devices::BusDevice;

/// COM1: 8 registers; each transmitted byte goes straight to `out` (vm-superio flushes per
/// byte, so a console that ends mid-line or mid-crash loses nothing).
pub struct Serial {
    uart: vm_superio::Serial<IrqLine, NoEvents, Box<dyn Write + Send>>,
}

impl Serial {
    /// A UART that raises `irq` and writes to `out`.
    pub fn new(irq: IrqLine, out: Box<dyn Write + Send>) -> Self {
        Serial {
            uart: vm_superio::Serial::new(irq, out),
        }
    }
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (data, u8::try_from(offset)) {
            ([byte], Ok(offset)) => *byte = self.uart.read(offset),
            // Byte-wide registers only: anything else reads as an empty bus.
            (data, _) => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let ([byte], Ok(offset)) = (data, u8::try_from(offset)) {
            if let Err(e) = self.uart.write(offset, *byte) {
                // Per byte the guest writes (a full disk fails them all): limited.
                crate::guest_warn!("serial console: {e:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn transmitted_bytes_reach_the_host() {
        let out = Shared::default();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut com1 = Serial::new(IrqLine(irq.try_clone().unwrap()), Box::new(out.clone()));
        for b in b"hi\nx" {
            com1.write(0, &[*b]);
        }
        assert_eq!(&*out.0.lock().unwrap(), b"hi\nx");
        // Wide or out-of-range accesses are ignored, not a panic.
        com1.write(0, &[1, 2]);
        com1.write(300, &[1]);
        let mut data = [0u8; 1];
        com1.read(5, &mut data);
        assert_ne!(data[0] & 0x20, 0, "transmitter holding register empty");
    }

    /// A console log on a full disk.
    struct Full;
    impl Write for Full {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::Error::from_raw_os_error(libc::ENOSPC))
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_full_console_log_is_reported_a_few_times_not_per_byte() {
        let log = Shared::default();
        let writer = log.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_max_level(tracing::Level::WARN)
            .finish();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut com1 = Serial::new(IrqLine(irq), Box::new(Full));
        tracing::subscriber::with_default(subscriber, || {
            for _ in 0..10_000 {
                com1.write(0, b"x");
            }
        });
        let text = String::from_utf8(log.0.lock().unwrap().clone()).unwrap();
        let lines = text
            .lines()
            .filter(|l| l.contains("serial console"))
            .count();
        // 1, 2, 4, ... 8192: 14 lines (each says how many so far), where there were 10,000.
        assert_eq!(lines, 14, "{text}");
        assert!(text.contains("(8192 so far)"), "{text}");
    }
}
