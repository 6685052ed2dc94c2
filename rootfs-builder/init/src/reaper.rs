//! The one place that reaps children (we are PID 1, so every orphan in the VM ends up ours):
//! the container's process is waited for by the main thread, and each `exec` process's status
//! is handed to whoever registered it. A process is registered under the same lock its spawn
//! happens in, so its status can never be reaped before someone waits for it.

use std::collections::{HashMap, VecDeque};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Mutex, MutexGuard};

use microvm_agent_protocol::ExitStatus;
use nix::sys::wait::{waitpid, WaitStatus};

/// Statuses of unregistered children kept for a late registration, at most this many.
const MAX_EARLY: usize = 256;

#[derive(Default)]
struct Registry {
    waiting: HashMap<i32, Sender<ExitStatus>>,
    early: VecDeque<(i32, ExitStatus)>,
}

static REGISTRY: Mutex<Option<Registry>> = Mutex::new(None);

fn registry() -> MutexGuard<'static, Option<Registry>> {
    REGISTRY.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs `spawn` (which starts one child and returns its pid) with the registry locked and
/// registers the pid; the receiver gets its exit status.
pub fn spawn_watched<T, E>(
    spawn: impl FnOnce() -> Result<(T, i32), E>,
) -> Result<(T, Receiver<ExitStatus>), E> {
    let mut guard = registry();
    let reg = guard.get_or_insert_with(Registry::default);
    let (value, pid) = spawn()?;
    // An early status under this pid belongs to an earlier process that had it.
    reg.early.retain(|(p, _)| *p != pid);
    let (tx, rx) = channel();
    reg.waiting.insert(pid, tx);
    Ok((value, rx))
}

fn dispatch(pid: i32, status: ExitStatus) {
    let mut guard = registry();
    let reg = guard.get_or_insert_with(Registry::default);
    match reg.waiting.remove(&pid) {
        Some(tx) => {
            let _ = tx.send(status);
        }
        None => {
            if reg.early.len() >= MAX_EARLY {
                reg.early.pop_front();
            }
            reg.early.push_back((pid, status));
        }
    }
}

fn status_of(ws: WaitStatus) -> Option<(i32, ExitStatus)> {
    match ws {
        WaitStatus::Exited(p, code) => Some((p.as_raw(), ExitStatus::Code(code))),
        WaitStatus::Signaled(p, sig, _) => Some((p.as_raw(), ExitStatus::Signal(sig as i32))),
        _ => None,
    }
}

/// Reaps children until `pid` ends, handing other statuses on; returns `pid`'s.
pub fn reap_until(pid: i32) -> ExitStatus {
    loop {
        match waitpid(None, None) {
            Ok(ws) => match status_of(ws) {
                Some((p, status)) if p == pid => return status,
                Some((p, status)) => dispatch(p, status),
                None => {}
            },
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => {
                crate::log(&format!("waitpid: {e}"));
                return ExitStatus::Code(255);
            }
        }
    }
}

/// Reaps every child left, handing statuses on.
pub fn reap_all() {
    loop {
        match waitpid(None, None) {
            Ok(ws) => {
                if let Some((p, status)) = status_of(ws) {
                    dispatch(p, status);
                }
            }
            Err(nix::errno::Errno::EINTR) => {}
            Err(_) => return,
        }
    }
}
