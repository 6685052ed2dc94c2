//! Host signals microvm handles itself: blocked in every thread (so set up before any thread
//! starts) and read from a signalfd by whoever acts on them.

use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

/// Blocked signals, readable one at a time.
pub struct HostSignals {
    fd: SignalFd,
}

impl HostSignals {
    /// Blocks `signals` in this thread (and every thread it starts later) and opens a signalfd.
    pub fn block(signals: &[Signal]) -> Result<Self, String> {
        let mut mask = SigSet::empty();
        for s in signals {
            mask.add(*s);
        }
        mask.thread_block()
            .map_err(|e| format!("cannot block signals: {e}"))?;
        let fd = SignalFd::with_flags(&mask, SfdFlags::SFD_CLOEXEC)
            .map_err(|e| format!("signalfd: {e}"))?;
        Ok(HostSignals { fd })
    }

    /// Waits for the next signal; `None` if the signalfd fails.
    pub fn wait(&self) -> Option<i32> {
        loop {
            match self.fd.read_signal() {
                Ok(Some(info)) => return Some(info.ssi_signo as i32),
                Ok(None) | Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => return None,
            }
        }
    }
}

/// The host terminal's size (rows, columns), if stdin is one.
pub fn terminal_size() -> Option<(u16, u16)> {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one winsize into `ws`, which is valid for writes.
    let rc = unsafe { libc::ioctl(0, libc::TIOCGWINSZ, &mut ws) };
    (rc == 0 && ws.ws_row > 0).then_some((ws.ws_row, ws.ws_col))
}
