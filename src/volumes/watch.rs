//! The virtiofsd instances of one VM, watched while it runs: one that fails (exits other than
//! cleanly after its frontend hung up) is reported, and the VM stopped by the caller, instead of
//! leaving the guest's file requests hanging; all are killed and reaped when the VM is done.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use super::virtiofsd::{Listening, Virtiofsd};
use super::{Error, Volume};
use crate::helpers::ProcessHandle;

/// The running virtiofsd instances, before the VM starts.
pub struct Shares(Vec<Virtiofsd>);

/// The virtiofsd instances of one VM with their sockets listening, still to be spawned: a VM
/// may be built (and connect) meanwhile. Dropped, every socket closes.
pub struct ListeningShares(Vec<Listening>);

impl ListeningShares {
    /// Makes the socket of one virtiofsd per volume; volume `i` listens on `sockets[i]` and keeps its
    /// staging directory and log in `<run_dir>/fs<i>`.
    pub fn listen(
        volumes: &[Volume],
        sockets: &[&Path],
        run_dir: &Path,
    ) -> Result<ListeningShares, Error> {
        let mut prepared = Vec::with_capacity(volumes.len());
        for (i, (vol, socket)) in volumes.iter().zip(sockets).enumerate() {
            let dir = run_dir.join(format!("fs{i}"));
            std::fs::create_dir(&dir).map_err(|e| Error::Start {
                target: vol.target.clone(),
                why: format!("mkdir {}: {e}", dir.display()),
            })?;
            prepared.push(Virtiofsd::listen(vol, socket, &dir)?);
        }
        Ok(ListeningShares(prepared))
    }

    /// Spawns them all. Call on the thread that outlives the VM.
    pub fn spawn(self) -> Result<Shares, Error> {
        let mut running = Vec::with_capacity(self.0.len());
        for p in self.0 {
            // On error, those already started are dropped (killed and reaped) and the rest's
            // sockets closed.
            running.push(p.spawn()?);
        }
        Ok(Shares(running))
    }
}

impl Shares {
    /// Watches every instance; `on_exit` gets a one-line reason if one exits by itself.
    pub fn watch(self, on_exit: impl Fn(String) + Send + Sync + 'static) -> Watch {
        let stopping = Arc::new(AtomicBool::new(false));
        let on_exit = Arc::new(on_exit);
        let mut threads = Vec::with_capacity(self.0.len());
        let mut handles = Vec::with_capacity(self.0.len());
        for mut vfs in self.0 {
            handles.push(vfs.handle());
            let (stopping, on_exit) = (stopping.clone(), on_exit.clone());
            threads.push(std::thread::spawn(move || {
                let status = vfs.wait();
                // virtiofsd exits with 0 when its frontend hangs up, which is how the VM's end
                // reaches it; anything else while the VM runs is a failure.
                let clean = status.as_ref().is_ok_and(|s| s.success());
                if !clean && !stopping.load(Ordering::SeqCst) {
                    let why = vfs
                        .last_log_line()
                        .map(|l| format!(": {l}"))
                        .unwrap_or_default();
                    on_exit(format!(
                        "virtiofsd for the volume {} exited while the VM ran ({}){why}",
                        vfs.target(),
                        status.map_or_else(|e| e.to_string(), |s| s.to_string())
                    ));
                }
            }));
        }
        Watch {
            stopping,
            handles,
            threads,
        }
    }
}

/// Watched virtiofsd instances; [`Watch::finish`] ends them.
pub struct Watch {
    stopping: Arc<AtomicBool>,
    handles: Vec<ProcessHandle>,
    threads: Vec<JoinHandle<()>>,
}

impl Watch {
    /// Kills every instance (the VM is done with them) and waits until all are reaped.
    pub fn finish(self) {
        self.stopping.store(true, Ordering::SeqCst);
        for virtiofsd in &self.handles {
            // One that exited by itself is reaped already: its handle signals nobody.
            let _ = virtiofsd.signal(libc::SIGKILL);
        }
        for t in self.threads {
            let _ = t.join();
        }
    }
}
