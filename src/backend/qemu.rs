//! The `qemu` backend: the same VM plan run by QEMU's microvm machine under TCG (software
//! emulation), for hosts whose KVM cannot boot our guest. vsock goes through QEMU's
//! vhost-user-vsock device to our own vsock device, served over vhost-user on threads of this
//! process (the same code as our VMM's device); virtio-fs shares go through QEMU's
//! vhost-user-fs device to the plan's virtiofsd sockets; guest RAM is a shared memfd as
//! vhost-user requires.
//!
//! QEMU does not treat TCG as a security boundary: callers must say so to the user.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::console_log::ConsoleLog;
use crate::devices::virtio::net::tap;
use crate::devices::virtio::vsock::vhost_user;
use crate::helpers::{die_with_parent, find, pass_fd, Missing, ProcessHandle};
use crate::plan::{Console, NetBackend, NetPlan, VmPlan};

/// QEMU's microvm has no i8042: the guest resets by triple fault, which `-no-reboot` turns into
/// QEMU exiting. `noapictimer`: TCG's CPU has no TSC-deadline timer, so the kernel would spend
/// about 220 ms of emulated time calibrating and verifying the local APIC timer against the PIT;
/// without it the PIT drives the guest's timer interrupts, which costs nothing extra under
/// emulation. (Under KVM our VMM offers the TSC-deadline timer and the calibration is skipped,
/// so the `kvm` backend needs no such option.)
pub const CMDLINE_EXTRA: &str = "reboot=t noapictimer";

/// How long QEMU may take to exit after it closed its vsock connection (it does so while it
/// shuts down) before it counts as hung.
const EXIT_AFTER_DISCONNECT: Duration = Duration::from_secs(5);

/// virtio-mmio transports of QEMU's microvm machine without ACPI.
pub const TRANSPORTS: usize = 8;

/// Errors starting or running QEMU.
#[derive(Debug, Error)]
pub enum Error {
    /// A program is not installed.
    #[error(transparent)]
    Missing(#[from] Missing),
    /// Starting a process failed.
    #[error("cannot start {program}: {source}")]
    Spawn {
        /// The program.
        program: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// The vsock backend could not start.
    #[error(transparent)]
    Vsock(#[from] vhost_user::Error),
    /// More devices than QEMU's microvm has transports.
    #[error("{0} virtio devices do not fit QEMU's microvm, which has {TRANSPORTS} transports")]
    TooManyDevices(usize),
    /// The network backend could not be opened.
    #[error("the VM's network: {0}")]
    Net(String),
    /// Preparing files for QEMU failed.
    #[error("preparing the QEMU run: {0}")]
    Io(#[from] std::io::Error),
}

/// The descriptor number QEMU gets its network backend on.
const NET_FD: i32 = 10;

/// QEMU's virtio-net device on the plan's backend: a tap opened here (in its namespace) or a
/// socket to passt, each handed to QEMU as [`NET_FD`]. Returns the descriptor to keep open
/// until QEMU is spawned.
fn net_args(cmd: &mut Command, net: &NetPlan) -> Result<Option<OwnedFd>, Error> {
    let (netdev, fd) = match &net.backend {
        NetBackend::Tap { name, netns } => {
            let fd = tap::open(name, netns.as_deref()).map_err(|e| Error::Net(e.to_string()))?;
            pass_fd(cmd, fd.as_raw_fd(), NET_FD);
            (
                format!("tap,id=net0,fd={NET_FD},vhost=off").into(),
                Some(fd),
            )
        }
        NetBackend::OpenTap { fd, .. } => {
            pass_fd(cmd, fd.0.as_raw_fd(), NET_FD);
            (format!("tap,id=net0,fd={NET_FD},vhost=off").into(), None)
        }
        NetBackend::Connected(shared) => {
            pass_fd(cmd, shared.0.as_raw_fd(), NET_FD);
            (
                format!("stream,id=net0,server=off,addr.type=fd,addr.str={NET_FD}").into(),
                None,
            )
        }
        NetBackend::Stream { socket } => (
            opt_value(
                "stream,id=net0,server=off,addr.type=unix,addr.path=",
                socket,
                "",
            ),
            None,
        ),
    };
    let mac = microvm_agent_protocol::mac_text(&net.mac);
    cmd.arg("-netdev").arg(&netdev).args([
        "-device",
        &format!(
            "virtio-net-device,netdev=net0,mac={mac},host_mtu={}",
            net.mtu
        ),
    ]);
    Ok(fd)
}

/// A running QEMU and the vsock backend serving it.
pub struct Qemu {
    qemu: Child,
    handle: ProcessHandle,
    vsock: Option<vhost_user::Server>,
    /// Copies the guest's console into its log.
    console: Option<std::thread::JoinHandle<()>>,
}

/// Copies QEMU's serial output into `log` until QEMU closes it. Output the log cannot take is
/// dropped, never left in the pipe: a full pipe would stall the guest's console.
fn keep_console(mut out: impl Read, mut log: ConsoleLog) {
    let mut buf = [0u8; 4096];
    let mut failed = false;
    loop {
        match out.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if let Err(e) = log.write_all(&buf[..n]) {
                    if !failed {
                        tracing::warn!("guest console log: {e}; its output is dropped");
                        failed = true;
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// QEMU needs no network, no System V IPC and no hostname of ours: it gets new, empty network,
/// IPC and UTS namespaces where the kernel lets us create them (as root), and runs as it is where
/// it does not.
fn own_namespaces(cmd: &mut Command) {
    // SAFETY: unshare is a plain syscall, async-signal-safe, touching no parent memory.
    unsafe {
        cmd.pre_exec(|| {
            libc::unshare(libc::CLONE_NEWNET | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS);
            Ok(())
        });
    }
}

/// `before`, then `value` inside a QEMU `-device`/`-chardev`/`-drive` option list (where a
/// comma is written twice, byte for byte: a path need not be UTF-8, and a lossy copy would name
/// another file), then `after`.
fn opt_value(before: &str, value: impl AsRef<std::ffi::OsStr>, after: &str) -> OsString {
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    let mut out = before.as_bytes().to_vec();
    for &b in value.as_ref().as_bytes() {
        out.push(b);
        if b == b',' {
            out.push(b',');
        }
    }
    out.extend_from_slice(after.as_bytes());
    OsString::from_vec(out)
}

/// A vhost-user socket chardev and a vhost-user-fs device per share, in plan order.
fn share_args(plan: &VmPlan) -> Vec<OsString> {
    let mut args = Vec::new();
    for (i, share) in plan.shares.iter().enumerate() {
        args.push("-chardev".into());
        args.push(opt_value(
            &format!("socket,id=fs{i},path="),
            &share.socket,
            "",
        ));
        args.push("-device".into());
        args.push(opt_value(
            &format!("vhost-user-fs-device,chardev=fs{i},tag="),
            &share.tag,
            "",
        ));
    }
    args
}

impl Qemu {
    /// Starts the vsock backend (if the plan has vsock) and QEMU; `run_dir` holds their sockets
    /// and the concatenated initrd. Must be called on the thread that outlives the VM.
    pub fn start(plan: &VmPlan, run_dir: &Path) -> Result<Qemu, Error> {
        let qemu_bin = find("qemu-system-x86_64", "install Debian's qemu-system-x86")?;
        let initrd = match plan.initrd.as_slice() {
            [] => None,
            [one] => Some(one.clone()),
            parts => {
                let joined = run_dir.join("initrd.cpio");
                let mut out = std::fs::File::create(&joined)?;
                for p in parts {
                    std::io::copy(&mut std::fs::File::open(p)?, &mut out)?;
                }
                Some(joined)
            }
        };
        let devices = plan.disks.len()
            + usize::from(plan.vsock.is_some())
            + plan.shares.len()
            + usize::from(plan.net.is_some());
        if devices > TRANSPORTS {
            return Err(Error::TooManyDevices(devices));
        }
        let mut disk_args = Vec::new();
        for (i, d) in plan.disks.iter().enumerate() {
            let readonly = if d.read_only { "on" } else { "off" };
            disk_args.push(OsString::from("-drive"));
            disk_args.push(opt_value(
                &format!("id=disk{i},file="),
                &d.path,
                &format!(",format=raw,if=none,readonly={readonly}"),
            ));
            disk_args.push("-device".into());
            disk_args.push(opt_value(
                &format!("virtio-blk-device,drive=disk{i},serial="),
                &d.serial,
                "",
            ));
        }
        // A console log goes through us, not to QEMU's own file: we keep it to a bounded size.
        // Everything that can fail comes before the vsock backend starts listening.
        let console_log = match &plan.console {
            Console::File(path) => Some(ConsoleLog::create(path)?),
            Console::Stderr => None,
        };
        let mut vsock = None;
        let mut vsock_args = Vec::new();
        if let Some(v) = &plan.vsock {
            let socket = run_dir.join("vhost-user-vsock.sock");
            vsock = Some(vhost_user::Server::start(
                v.guest_cid.into(),
                &v.uds_path,
                &socket,
            )?);
            vsock_args = vec![
                "-chardev".into(),
                opt_value("socket,id=vsock,path=", &socket, ""),
                "-device".into(),
                "vhost-user-vsock-device,chardev=vsock".into(),
            ];
        }

        let mem = plan.memory_mib;
        let mut cmd = Command::new(qemu_bin);
        // Kept open until QEMU is spawned: it gets its own copy.
        let _net_fd = match plan.net.as_ref().map(|net| net_args(&mut cmd, net)) {
            Some(Err(e)) => {
                // The vsock backend is already listening: it must not outlive this failure.
                if let Some(v) = vsock {
                    let _ = v.stop();
                }
                return Err(e);
            }
            Some(Ok(fd)) => fd,
            None => None,
        };
        // The CMOS clock stays on: with it off the guest kernel waits a second for the clock's
        // update flag to clear, then starts its wall clock at 1970 (TCG has no kvmclock).
        cmd.args([
            "-M",
            "microvm,acpi=off,x-option-roms=off,rtc=on,memory-backend=mem",
        ])
        .args(["-accel", "tcg", "-cpu", "max"])
        .args(["-m", &format!("{mem}M"), "-smp", &plan.cpus.to_string()])
        .args([
            "-object",
            &format!("memory-backend-memfd,id=mem,size={mem}M,share=on"),
        ])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-no-reboot",
            "-sandbox",
            "on",
        ])
        .arg("-kernel")
        .arg(&plan.kernel)
        .args(["-append", &plan.cmdline])
        .args(&vsock_args)
        .args(&disk_args)
        .args(share_args(plan))
        .stdin(Stdio::null())
        .stdout(Stdio::null());
        if let Some(initrd) = &initrd {
            cmd.arg("-initrd").arg(initrd);
        }
        cmd.args(["-serial", "stdio"]).stdout(match console_log {
            Some(_) => Stdio::piped(),
            None => Stdio::inherit(),
        });
        die_with_parent(&mut cmd);
        own_namespaces(&mut cmd);
        let mut qemu = match cmd.spawn() {
            Ok(q) => q,
            Err(source) => {
                if let Some(v) = vsock {
                    let _ = v.stop();
                }
                return Err(Error::Spawn {
                    program: "qemu-system-x86_64",
                    source,
                });
            }
        };
        let console = match (console_log, qemu.stdout.take()) {
            (Some(log), Some(out)) => Some(std::thread::spawn(move || keep_console(out, log))),
            _ => None,
        };
        let handle = match ProcessHandle::of(&qemu) {
            Ok(h) => h,
            Err(source) => {
                let _ = qemu.kill();
                let _ = qemu.wait();
                if let Some(v) = vsock {
                    let _ = v.stop();
                }
                return Err(Error::Spawn {
                    program: "qemu-system-x86_64 (pidfd_open)",
                    source,
                });
            }
        };
        Ok(Qemu {
            qemu,
            handle,
            vsock,
            console,
        })
    }

    /// Waits for QEMU to end (or `timeout`), then ends the vsock backend. Returns whether QEMU
    /// ended by itself; a vsock backend that fails first is an error (and QEMU is stopped),
    /// never a hang.
    pub fn wait(mut self, timeout: Option<Duration>) -> Result<bool, String> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut disconnected = None;
        let result = loop {
            match self.qemu.try_wait() {
                Ok(Some(_)) => break Ok(true),
                Ok(None) => {}
                Err(e) => break Err(format!("waiting for QEMU: {e}")),
            }
            if self.vsock.as_ref().is_some_and(|v| v.is_finished()) {
                // The backend ends when QEMU hangs up, which QEMU does as it shuts down: give it
                // time to finish exiting. A backend that failed stops the VM at once.
                if let Some(Err(e)) = self.vsock.take().map(|v| v.stop()) {
                    let _ = self.qemu.kill();
                    let _ = self.qemu.wait();
                    break Err(format!("the vsock backend failed while the VM ran: {e}"));
                }
                disconnected = Some(Instant::now());
            }
            if disconnected.is_some_and(|t| t.elapsed() >= EXIT_AFTER_DISCONNECT) {
                let _ = self.qemu.kill();
                let _ = self.qemu.wait();
                break Err("QEMU closed its vsock device but did not exit".to_string());
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                let _ = self.qemu.kill();
                let _ = self.qemu.wait();
                break Ok(false);
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        if let Some(v) = self.vsock.take() {
            if let Err(e) = v.stop() {
                tracing::warn!("vsock backend: {e}");
            }
        }
        // QEMU is gone, so its console pipe has ended: the log is complete once this returns.
        if let Some(c) = self.console.take() {
            let _ = c.join();
        }
        result
    }

    /// A handle on the QEMU process, to stop or pause it from another thread (even after
    /// [`Qemu::wait`] has reaped it: then its signals reach nobody).
    pub fn handle(&self) -> ProcessHandle {
        self.handle.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::FsPlan;
    use std::path::PathBuf;

    #[test]
    fn each_share_gets_a_chardev_and_a_vhost_user_fs_device() {
        let plan = VmPlan {
            kernel: PathBuf::from("vmlinux"),
            initrd: Vec::new(),
            cmdline: String::new(),
            cpus: 1,
            memory_mib: 64,
            timeout: None,
            console: Console::Stderr,
            vsock: None,
            disks: Vec::new(),
            net: None,
            shares: vec![
                FsPlan {
                    tag: "data".into(),
                    socket: PathBuf::from("/run/a.sock"),
                },
                FsPlan {
                    tag: "a,b".into(),
                    socket: PathBuf::from("/run/b,c.sock"),
                },
            ],
        };
        assert_eq!(
            share_args(&plan),
            [
                "-chardev",
                "socket,id=fs0,path=/run/a.sock",
                "-device",
                "vhost-user-fs-device,chardev=fs0,tag=data",
                "-chardev",
                "socket,id=fs1,path=/run/b,,c.sock",
                "-device",
                "vhost-user-fs-device,chardev=fs1,tag=a,,b",
            ]
        );
    }

    #[test]
    fn paths_in_option_lists_double_their_commas_byte_for_byte() {
        use std::os::unix::ffi::{OsStrExt, OsStringExt};
        // Once `file=/x,readonly=off` would have made a read-only disk writable.
        let path = Path::new(std::ffi::OsStr::from_bytes(b"/d/a,readonly=off,\xff.img"));
        let arg = opt_value("id=disk0,file=", path, ",readonly=on");
        assert_eq!(
            arg.into_vec(),
            b"id=disk0,file=/d/a,,readonly=off,,\xff.img,readonly=on".to_vec()
        );
    }
}
