//! The virtiofsd instances of one VM, watched while it runs: one that fails (exits other than
//! cleanly after its frontend hung up) is reported, and the VM stopped by the caller, instead of
//! leaving the guest's file requests hanging; all are killed and reaped when the VM is done.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use super::virtiofsd::{Listening, Virtiofsd};
use super::{Error, Volume};

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
        let mut pids = Vec::with_capacity(self.0.len());
        for mut vfs in self.0 {
            pids.extend(vfs.pid());
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
            pids,
            threads,
        }
    }
}

/// Watched virtiofsd instances; [`Watch::finish`] ends them.
pub struct Watch {
    stopping: Arc<AtomicBool>,
    pids: Vec<u32>,
    threads: Vec<JoinHandle<()>>,
}

impl Watch {
    /// Kills every instance (the VM is done with them) and waits until all are reaped.
    pub fn finish(self) {
        self.stopping.store(true, Ordering::SeqCst);
        for pid in &self.pids {
            // SAFETY: the pid is our child and not reaped before its watcher's wait returns,
            // which this kill is what ends.
            unsafe { libc::kill(*pid as i32, libc::SIGKILL) };
        }
        for t in self.threads {
            let _ = t.join();
        }
    }
}
