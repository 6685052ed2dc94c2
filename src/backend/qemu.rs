//! The `qemu` backend: the same VM plan run by QEMU's microvm machine under TCG (software
//! emulation), for hosts whose KVM cannot boot our guest. vsock goes through QEMU's
//! vhost-user-vsock device and `vhost-device-vsock`, which uses the same hybrid Unix-socket
//! convention as our own device; virtio-fs shares go through QEMU's vhost-user-fs device to the
//! plan's virtiofsd sockets; guest RAM is a shared memfd as vhost-user requires.
//!
//! QEMU does not treat TCG as a security boundary: callers must say so to the user.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::devices::virtio::net::tap;
use crate::helpers::{die_with_parent, find, pass_fd, Missing};
use crate::plan::{Console, NetBackend, NetPlan, VmPlan};

/// QEMU's microvm has no i8042: the guest resets by triple fault, which `-no-reboot` turns into
/// QEMU exiting.
pub const CMDLINE_EXTRA: &str = "reboot=t";

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
    /// vhost-device-vsock did not come up.
    #[error("vhost-device-vsock did not create its socket {0} (see its messages above)")]
    VsockBackend(PathBuf),
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
            (format!("tap,id=net0,fd={NET_FD},vhost=off"), Some(fd))
        }
        NetBackend::OpenTap { fd, .. } => {
            pass_fd(cmd, fd.0.as_raw_fd(), NET_FD);
            (format!("tap,id=net0,fd={NET_FD},vhost=off"), None)
        }
        NetBackend::Connected(shared) => {
            pass_fd(cmd, shared.0.as_raw_fd(), NET_FD);
            (
                format!("stream,id=net0,server=off,addr.type=fd,addr.str={NET_FD}"),
                None,
            )
        }
        NetBackend::Stream { socket } => (
            format!(
                "stream,id=net0,server=off,addr.type=unix,addr.path={}",
                opt_value(&socket.to_string_lossy())
            ),
            None,
        ),
    };
    let mac = microvm_agent_protocol::mac_text(&net.mac);
    cmd.args(["-netdev", &netdev]).args([
        "-device",
        &format!(
            "virtio-net-device,netdev=net0,mac={mac},host_mtu={}",
            net.mtu
        ),
    ]);
    Ok(fd)
}

/// A running QEMU and the helper it needs.
pub struct Qemu {
    qemu: Child,
    vsock: Option<Child>,
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

/// A value inside a QEMU `-device`/`-chardev` option list, where a comma is written twice.
fn opt_value(value: &str) -> String {
    value.replace(',', ",,")
}

/// A vhost-user socket chardev and a vhost-user-fs device per share, in plan order.
fn share_args(plan: &VmPlan) -> Vec<String> {
    let mut args = Vec::new();
    for (i, share) in plan.shares.iter().enumerate() {
        args.push("-chardev".to_string());
        args.push(format!(
            "socket,id=fs{i},path={}",
            opt_value(&share.socket.to_string_lossy())
        ));
        args.push("-device".to_string());
        args.push(format!(
            "vhost-user-fs-device,chardev=fs{i},tag={}",
            opt_value(&share.tag)
        ));
    }
    args
}

impl Qemu {
    /// Starts vhost-device-vsock (if the plan has vsock) and QEMU; `run_dir` holds their sockets
    /// and the concatenated initrd. Must be called on the thread that outlives the VM.
    pub fn start(plan: &VmPlan, run_dir: &Path) -> Result<Qemu, Error> {
        let qemu_bin = find("qemu-system-x86_64", "install Debian's qemu-system-x86")?;
        let mut vsock = None;
        let mut vsock_args = Vec::new();
        if let Some(v) = &plan.vsock {
            let bin = find(
                "vhost-device-vsock",
                "install it with `cargo install vhost-device-vsock`",
            )?;
            let socket = run_dir.join("vhost-user-vsock.sock");
            let mut cmd = Command::new(bin);
            cmd.arg("--vm")
                .arg(format!(
                    "guest-cid={},socket={},uds-path={}",
                    v.guest_cid,
                    socket.display(),
                    v.uds_path.display()
                ))
                .stdin(Stdio::null())
                .stdout(Stdio::null());
            die_with_parent(&mut cmd);
            let mut child = cmd.spawn().map_err(|source| Error::Spawn {
                program: "vhost-device-vsock",
                source,
            })?;
            let deadline = Instant::now() + Duration::from_secs(5);
            while !socket.exists() {
                if Instant::now() > deadline || child.try_wait().ok().flatten().is_some() {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(Error::VsockBackend(socket));
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            vsock_args = vec![
                "-chardev".to_string(),
                format!("socket,id=vsock,path={}", socket.display()),
                "-device".to_string(),
                "vhost-user-vsock-device,chardev=vsock".to_string(),
            ];
            vsock = Some(child);
        }

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
            disk_args.push("-drive".to_string());
            disk_args.push(format!(
                "id=disk{i},file={},format=raw,if=none,readonly={readonly}",
                d.path.display()
            ));
            disk_args.push("-device".to_string());
            disk_args.push(format!(
                "virtio-blk-device,drive=disk{i},serial={}",
                d.serial
            ));
        }
        let mem = plan.memory_mib;
        let mut cmd = Command::new(qemu_bin);
        // Kept open until QEMU is spawned: it gets its own copy.
        let _net_fd = match plan.net.as_ref().map(|net| net_args(&mut cmd, net)) {
            Some(Err(e)) => {
                // The vsock helper is already running: it must not outlive this failure.
                if let Some(mut v) = vsock {
                    let _ = v.kill();
                    let _ = v.wait();
                }
                return Err(e);
            }
            Some(Ok(fd)) => fd,
            None => None,
        };
        cmd.args([
            "-M",
            "microvm,acpi=off,x-option-roms=off,rtc=off,memory-backend=mem",
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
        match &plan.console {
            Console::File(path) => cmd.args(["-serial", &format!("file:{}", path.display())]),
            Console::Stderr => cmd.args(["-serial", "stdio"]).stdout(Stdio::inherit()),
        };
        die_with_parent(&mut cmd);
        own_namespaces(&mut cmd);
        let qemu = match cmd.spawn() {
            Ok(q) => q,
            Err(source) => {
                if let Some(mut v) = vsock {
                    let _ = v.kill();
                    let _ = v.wait();
                }
                return Err(Error::Spawn {
                    program: "qemu-system-x86_64",
                    source,
                });
            }
        };
        Ok(Qemu { qemu, vsock })
    }

    /// Waits for QEMU to end (or `timeout`), then ends the vsock helper, which outlives QEMU.
    /// Returns whether QEMU ended by itself; a vsock helper that dies first is an error (and
    /// QEMU is stopped), never a hang.
    pub fn wait(mut self, timeout: Option<Duration>) -> Result<bool, String> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let result = loop {
            match self.qemu.try_wait() {
                Ok(Some(_)) => break Ok(true),
                Ok(None) => {}
                Err(e) => break Err(format!("waiting for QEMU: {e}")),
            }
            if let Some(v) = self.vsock.as_mut() {
                if let Ok(Some(status)) = v.try_wait() {
                    self.vsock = None;
                    let _ = self.qemu.kill();
                    let _ = self.qemu.wait();
                    break Err(format!(
                        "vhost-device-vsock exited while the VM ran ({status})"
                    ));
                }
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                let _ = self.qemu.kill();
                let _ = self.qemu.wait();
                break Ok(false);
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        if let Some(mut v) = self.vsock.take() {
            let _ = v.kill();
            let _ = v.wait();
        }
        result
    }

    /// The QEMU process id, to stop it from another thread.
    pub fn pid(&self) -> u32 {
        self.qemu.id()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::FsPlan;

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
}
