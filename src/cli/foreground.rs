//! A container run in the foreground (`run` without `-d`, `start -a`): this process is its
//! supervisor, with the user's terminal on the process's streams, host signals forwarded to
//! the process (docker's --sig-proxy), and the process's exit status as ours.

use std::io::IsTerminal;
use std::sync::Mutex;

use microvm_agent_protocol::Message;
use nix::sys::signal::Signal;

use super::{error_line, EXIT_MICROVM_ERROR};
use crate::agent::{Control, HostIo, Outcome};
use crate::backend::Hypervisor;
use crate::container::exec::ExecRequest;
use crate::container::supervisor::{self, Streams};
use crate::container::Container;
pub use crate::signals::terminal_size;
use crate::signals::HostSignals;

/// The signals a foreground container gets from us.
pub const FORWARDED: [Signal; 7] = [
    Signal::SIGINT,
    Signal::SIGTERM,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGWINCH,
];

/// Blocks [`FORWARDED`]; call before any thread starts.
pub fn block_signals() -> Result<HostSignals, String> {
    HostSignals::block(&FORWARDED)
}

/// Prints the warning every emulated run gets.
pub fn warn_if_emulated(c: &Container) {
    if c.config.hypervisor == Hypervisor::Qemu {
        error_line("warning: --hypervisor qemu emulates the guest (TCG), which is not a hardware isolation boundary");
    }
}

/// Runs `c` to its end with the user's terminal attached; returns docker's exit status.
pub fn run(c: &Container, signals: HostSignals, timings: bool) -> i32 {
    warn_if_emulated(c);
    let tty = c.config.process.tty;
    let raw = tty.then(RawTerminal::enable).flatten();
    let io = HostIo::terminal();
    let winsize = if tty { terminal_size() } else { None };
    let ended = supervisor::supervise(
        c,
        Streams::Foreground(io),
        winsize,
        Box::new(|_| {}),
        Some(signals),
    );
    drop(raw);
    match ended {
        Ok(ended) => {
            if timings {
                error_line(&ended.timings);
            }
            if let Some(e) = &ended.error {
                error_line(e);
                for l in &ended.details {
                    eprintln!("{l}");
                }
            }
            ended.code
        }
        Err(e) => {
            error_line(e);
            EXIT_MICROVM_ERROR
        }
    }
}

/// An `on_control` handler that starts forwarding `signals` to the first process it is handed
/// (a run or exec has one); later calls do nothing.
pub fn forwarder(signals: HostSignals) -> impl Fn(Control) + Sync {
    let signals = Mutex::new(Some(signals));
    move |control| {
        if let Some(signals) = signals.lock().unwrap_or_else(|e| e.into_inner()).take() {
            forward_signals(signals, control);
        }
    }
}

/// Runs `req` in `c` with this process's stdio: its terminal raw and its size passed on for a
/// `-t` process (when `req` has none yet), `signals` forwarded; `on_started` hears the guest
/// pid once it runs.
pub fn exec_here(
    c: &Container,
    mut req: ExecRequest,
    signals: HostSignals,
    on_started: impl FnOnce(i32),
) -> Result<Outcome, crate::container::Error> {
    if req.tty && req.winsize.is_none() {
        req.winsize = terminal_size();
    }
    let raw = req.tty.then(RawTerminal::enable).flatten();
    let outcome = crate::container::exec::exec_observed(
        c,
        req,
        HostIo::terminal(),
        forwarder(signals),
        on_started,
    );
    drop(raw);
    outcome
}

/// Forwards host signals to the process behind `control` from a thread of their own; a
/// terminal resize becomes a resize of the process's terminal.
pub fn forward_signals(signals: HostSignals, control: Control) {
    std::thread::spawn(move || {
        while let Some(sig) = signals.wait() {
            if sig == libc::SIGWINCH {
                if let Some((rows, cols)) = terminal_size() {
                    control.send(&Message::Resize { rows, cols });
                }
            } else {
                control.send(&Message::Signal { signal: sig });
            }
        }
    });
}

/// The host terminal in raw mode while a `-t` process owns it; restored on drop.
pub struct RawTerminal(nix::sys::termios::Termios);

impl RawTerminal {
    /// Puts the terminal on stdin in raw mode, if stdin is one.
    pub fn enable() -> Option<RawTerminal> {
        use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            return None;
        }
        let saved = tcgetattr(&stdin).ok()?;
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        tcsetattr(&stdin, SetArg::TCSANOW, &raw).ok()?;
        Some(RawTerminal(saved))
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        let _ = nix::sys::termios::tcsetattr(
            std::io::stdin(),
            nix::sys::termios::SetArg::TCSANOW,
            &self.0,
        );
    }
}
