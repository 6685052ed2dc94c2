//! One `virtiofsd` per volume: started on a listening socket we made (so the VMM or QEMU can
//! connect at once, with no wait for the socket to appear), sandboxed in its own namespaces (or
//! a chroot where namespaces are not allowed), killed with us, and reaped when the VM is done.
//!
//! A single-file volume shares a private staging directory holding a bind mount of just that
//! file, never the file's parent directory. The staging mounts live in a mount namespace of
//! virtiofsd's own: nothing is mounted on the host, and nothing is left if microvm is killed.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};

use super::{Error, Kind, Staged, Volume};
use crate::helpers::{die_with_parent, find, ProcessHandle};
use microvm_agent_protocol::SHARED_FILE_NAME;

/// How to install virtiofsd.
pub const VIRTIOFSD_HINT: &str =
    "install it with `cargo install virtiofsd` (it needs Debian's libseccomp-dev and libcap-ng-dev)";

/// virtiofsd's cache policy: `never`, so a change on the host is seen inside at once. With
/// `auto` the guest keeps attributes for a second, and a file the host rewrote longer read back
/// cut to its old size (tests/volumes.rs); `always` keeps stale data longer still. `never` also
/// moved bulk data faster here (direct I/O in 1 MiB requests, bench/volumes.rs), at the price of
/// uncached `stat` and of shared writable mappings of volume files (the 6.1 guest refuses
/// MAP_SHARED on direct-I/O files). `MICROVM_VIRTIOFS_CACHE` overrides it.
fn cache_policy() -> String {
    std::env::var("MICROVM_VIRTIOFS_CACHE").unwrap_or_else(|_| "never".into())
}

/// virtiofsd's sandbox: `namespace` (its own mount, PID and network namespaces, pivoted into
/// the shared directory) where this process may create namespaces, else `chroot` (inside a
/// container without CAP_SYS_ADMIN, say). Probed once by starting `true` in fresh namespaces.
fn sandbox() -> &'static str {
    static MODE: std::sync::OnceLock<&'static str> = std::sync::OnceLock::new();
    MODE.get_or_init(|| {
        let mut probe = Command::new("true");
        probe
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // Without root, virtiofsd makes a user namespace first, and so does the probe.
        let mut flags = libc::CLONE_NEWNS | libc::CLONE_NEWPID | libc::CLONE_NEWNET;
        if !nix::unistd::geteuid().is_root() {
            flags |= libc::CLONE_NEWUSER;
        }
        // SAFETY: unshare is a plain syscall, async-signal-safe, touching no parent memory.
        unsafe {
            probe.pre_exec(move || {
                if libc::unshare(flags) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        match probe.status() {
            Ok(s) if s.success() => "namespace",
            _ => {
                tracing::debug!("virtiofsd: no namespaces here, sandboxing with chroot");
                "chroot"
            }
        }
    })
}

/// The fd number the listening socket gets in virtiofsd (`--fd`).
const LISTEN_FD: i32 = 3;

/// A running virtiofsd, killed and reaped when dropped.
pub struct Virtiofsd {
    child: Option<Child>,
    handle: ProcessHandle,
    target: String,
    log: PathBuf,
}

impl Virtiofsd {
    /// Starts virtiofsd for `vol`, listening on `socket`; `dir` is a private directory for its
    /// staging directory and log. Call on the thread that outlives the VM (see
    /// [`die_with_parent`]).
    pub fn start(vol: &Volume, socket: &Path, dir: &Path) -> Result<Virtiofsd, Error> {
        Self::listen(vol, socket, dir)?.spawn()
    }

    /// The first half of [`Virtiofsd::start`]: `socket` listens once this returns, so a frontend
    /// may connect (and wait for answers) while virtiofsd is still to be spawned. Dropping the
    /// result closes the socket, which fails such a connection.
    pub fn listen(vol: &Volume, socket: &Path, dir: &Path) -> Result<Listening, Error> {
        let listener = UnixListener::bind(socket).map_err(|e| Error::Start {
            target: vol.target.clone(),
            why: format!("cannot listen on {}: {e}", socket.display()),
        })?;
        Ok(Listening {
            vol: vol.clone(),
            dir: dir.to_owned(),
            listen: listener.into(),
        })
    }

    /// The volume's container path.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// A handle that signals this virtiofsd only, even once it has been reaped.
    pub fn handle(&self) -> ProcessHandle {
        self.handle.clone()
    }

    /// Waits for it to exit.
    pub fn wait(&mut self) -> std::io::Result<ExitStatus> {
        match self.child.as_mut() {
            Some(c) => c.wait(),
            None => Err(std::io::Error::other("already reaped")),
        }
    }

    /// The last line virtiofsd logged, if any (why it failed).
    pub fn last_log_line(&self) -> Option<String> {
        let text = std::fs::read_to_string(&self.log).ok()?;
        text.lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .map(str::to_owned)
    }

    /// Kills and reaps it (for tests of a dying backend; dropping it does the same).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A virtiofsd whose socket listens, still to be spawned ([`Virtiofsd::listen`]).
pub struct Listening {
    vol: Volume,
    dir: PathBuf,
    listen: OwnedFd,
}

impl Listening {
    /// Spawns virtiofsd on the socket. Call on the thread that outlives the VM (see
    /// [`die_with_parent`]).
    pub fn spawn(self) -> Result<Virtiofsd, Error> {
        let vol = &self.vol;
        let err = |why: String| Error::Start {
            target: vol.target.clone(),
            why,
        };
        let bin = find("virtiofsd", VIRTIOFSD_HINT).map_err(|e| err(e.to_string()))?;
        let log = self.dir.join("virtiofsd.log");
        let log_file =
            File::create(&log).map_err(|e| err(format!("cannot create {}: {e}", log.display())))?;

        // What a staging directory holds: (name, source, read-only, recursive).
        let entries: Vec<Staged> = match vol.kind {
            Kind::Dir => Vec::new(),
            Kind::File => vec![Staged {
                name: SHARED_FILE_NAME.into(),
                source: vol.source.clone(),
                read_only: false,
                recursive: false,
            }],
            Kind::Staged => vol.staged.clone(),
        };
        let shared = match vol.kind {
            Kind::Dir => vol.source.clone(),
            Kind::File | Kind::Staged => {
                if !nix::unistd::geteuid().is_root() {
                    return Err(err(format!(
                        "{} needs root (it is staged with bind mounts)",
                        match vol.kind {
                            Kind::File => "a single-file volume",
                            _ => "a bundle's root",
                        }
                    )));
                }
                let staging = self.dir.join("staging");
                std::fs::create_dir(&staging)
                    .map_err(|e| err(format!("mkdir {}: {e}", staging.display())))?;
                staging
            }
        };
        let mut cmd = Command::new(bin);
        cmd.arg("--shared-dir")
            .arg(&shared)
            .arg(format!("--fd={LISTEN_FD}"))
            .args(["--sandbox", sandbox(), "--cache"])
            .arg(cache_policy())
            .args(["--log-level", "warn", "--rlimit-nofile", "0"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file);
        if vol.read_only {
            cmd.arg("--readonly");
        }
        pass_fd(&mut cmd, self.listen.as_raw_fd());
        if !entries.is_empty() {
            stage(&mut cmd, &shared, &entries).map_err(err)?;
        }
        die_with_parent(&mut cmd);
        let child = cmd
            .spawn()
            .map_err(|e| err(format!("cannot run virtiofsd: {e}")))?;
        // Our copy of the listening socket goes now: if virtiofsd dies, connecting fails rather
        // than waiting in a backlog nobody serves.
        drop(self.listen);
        let mut child = child;
        let handle = match ProcessHandle::of(&child) {
            Ok(h) => h,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(err(format!("cannot watch virtiofsd (pidfd_open): {e}")));
            }
        };
        Ok(Virtiofsd {
            child: Some(child),
            handle,
            target: vol.target.clone(),
            log,
        })
    }
}

impl Drop for Virtiofsd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Hands `fd` to the child as [`LISTEN_FD`], without the close-on-exec flag.
fn pass_fd(cmd: &mut Command, fd: i32) {
    // SAFETY: dup2 and fcntl are async-signal-safe; `fd` stays open in the parent until after
    // spawn returns, so it is valid in the child.
    unsafe {
        cmd.pre_exec(move || {
            if fd == LISTEN_FD {
                if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(fd, LISTEN_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

fn cstring(p: &Path) -> Result<CString, String> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| format!("{} contains NUL", p.display()))
}

/// One staged bind, its paths made before the fork.
struct StageEntry {
    at: CString,
    source: CString,
    file: bool,
    read_only: bool,
    recursive: bool,
}

/// In the child, before exec: a private mount namespace with a tmpfs over `staging` holding
/// each entry, a bind mount of its source (read-only where asked: that bind refuses writes
/// whatever the guest does). A rename over a bound file from the guest then fails with EBUSY,
/// as with docker.
fn stage(cmd: &mut Command, staging: &Path, entries: &[Staged]) -> Result<(), String> {
    let staging_c = cstring(staging)?;
    let mut prepared = Vec::with_capacity(entries.len());
    for e in entries {
        if e.name.is_empty() || e.name.contains('/') || e.name == "." || e.name == ".." {
            return Err(format!("bad staging entry name {:?}", e.name));
        }
        let meta =
            std::fs::metadata(&e.source).map_err(|err| format!("{}: {err}", e.source.display()))?;
        prepared.push(StageEntry {
            at: cstring(&staging.join(&e.name))?,
            source: cstring(&e.source)?,
            file: !meta.is_dir(),
            read_only: e.read_only,
            recursive: e.recursive,
        });
    }
    let root = c"/";
    let tmpfs = c"tmpfs";
    let mode = c"mode=0755";
    // SAFETY: only async-signal-safe syscalls (unshare, mount, open, mkdir, close) on C strings
    // built before the fork; no allocation or lock in the child.
    unsafe {
        cmd.pre_exec(move || {
            let check = |rc: i32| {
                if rc < 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(())
                }
            };
            check(libc::unshare(libc::CLONE_NEWNS))?;
            check(libc::mount(
                std::ptr::null(),
                root.as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ))?;
            check(libc::mount(
                tmpfs.as_ptr(),
                staging_c.as_ptr(),
                tmpfs.as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV,
                mode.as_ptr().cast(),
            ))?;
            for e in &prepared {
                if e.file {
                    let fd = libc::open(
                        e.at.as_ptr(),
                        libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
                        0o600,
                    );
                    check(fd)?;
                    libc::close(fd);
                } else {
                    check(libc::mkdir(e.at.as_ptr(), 0o755))?;
                }
                let rec = if e.recursive { libc::MS_REC } else { 0 };
                check(libc::mount(
                    e.source.as_ptr(),
                    e.at.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND | rec,
                    std::ptr::null(),
                ))?;
                if e.read_only {
                    check(libc::mount(
                        std::ptr::null(),
                        e.at.as_ptr(),
                        std::ptr::null(),
                        libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
                        std::ptr::null(),
                    ))?;
                }
            }
            Ok(())
        });
    }
    Ok(())
}
