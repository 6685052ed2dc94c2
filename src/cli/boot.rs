//! `microvm boot`: boot a kernel (and initrd) in a VM and exit with the guest.

use std::path::PathBuf;

use clap::Args;

use super::vm_args::VmArgs;
use super::{error_line, EXIT_MICROVM_ERROR, EXIT_TIMEOUT};
use crate::backend::{self, VmEnd};
use crate::plan::{Console, DiskPlan, VmPlan, VsockPlan, GUEST_CID, MAX_SERIAL};
use crate::signals::HostSignals;
use crate::vmm::exit::StopReason;
use nix::sys::signal::Signal;

/// Default kernel command line: console on COM1, reboot through the i8042, no reboot on panic.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1";

/// Flags of `microvm boot`.
#[derive(Debug, Args)]
pub struct BootArgs {
    /// Kernel, vCPUs, memory, timeout.
    #[command(flatten)]
    pub vm: VmArgs,
    /// Initial ramdisk.
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, value_name = "STR", default_value = DEFAULT_CMDLINE)]
    pub cmdline: String,
    /// Write the guest console to this file instead of standard error.
    #[arg(long, value_name = "PATH")]
    pub console_log: Option<PathBuf>,
    /// Give the guest a virtio-vsock device whose ports meet host Unix sockets at PATH
    /// (host to guest: connect to PATH, send `CONNECT <port>`; guest to host port P: PATH_P).
    #[arg(long, value_name = "PATH")]
    pub vsock_uds: Option<PathBuf>,
    /// Attach a raw disk image as virtio-blk: PATH[,ro][,serial=NAME] (repeatable; the serial
    /// defaults to diskN).
    #[arg(long, value_name = "PATH[,ro][,serial=NAME]")]
    pub disk: Vec<String>,
}

/// Parses one `--disk` value; `index` names the default serial.
fn parse_disk(spec: &str, index: usize) -> Result<DiskPlan, String> {
    let mut parts = spec.split(',');
    let path = parts
        .next()
        .filter(|p| !p.is_empty())
        .ok_or("--disk needs a path")?;
    let mut disk = DiskPlan {
        path: PathBuf::from(path),
        read_only: false,
        serial: format!("disk{index}"),
    };
    for opt in parts {
        match opt.split_once('=') {
            None if opt == "ro" => disk.read_only = true,
            Some(("serial", s)) if !s.is_empty() && s.len() <= MAX_SERIAL => {
                disk.serial = s.to_string()
            }
            Some(("serial", _)) => {
                return Err(format!(
                    "--disk {spec}: a serial is 1 to {MAX_SERIAL} bytes"
                ))
            }
            _ => {
                return Err(format!(
                    "--disk {spec}: unknown option {opt:?} (ro, serial=NAME)"
                ))
            }
        }
    }
    Ok(disk)
}

/// Runs `microvm boot`; returns the exit status.
pub fn run(args: BootArgs) -> i32 {
    let (timeout, kernel) = match (args.vm.timeout(), args.vm.kernel()) {
        (Ok(t), Ok(k)) => (t, k),
        (Err(e), _) | (_, Err(e)) => {
            error_line(e);
            return EXIT_MICROVM_ERROR;
        }
    };
    let mut disks = Vec::with_capacity(args.disk.len());
    for (i, d) in args.disk.iter().enumerate() {
        match parse_disk(d, i) {
            Ok(d) => disks.push(d),
            Err(e) => {
                error_line(e);
                return EXIT_MICROVM_ERROR;
            }
        }
    }
    let plan = VmPlan {
        kernel,
        initrd: args.initrd.into_iter().collect(),
        cmdline: args.cmdline,
        cpus: args.vm.cpus,
        memory_mib: args.vm.memory,
        timeout,
        console: args.console_log.map_or(Console::Stderr, Console::File),
        vsock: args.vsock_uds.map(|uds_path| VsockPlan {
            guest_cid: GUEST_CID,
            uds_path,
        }),
        disks,
        net: None,
        shares: Vec::new(),
    };
    // Ctrl-C, SIGTERM and SIGHUP stop the VM (status 128+n); blocked before any thread starts.
    let signals = match HostSignals::block(&[Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP]) {
        Ok(s) => s,
        Err(e) => {
            error_line(e);
            return EXIT_MICROVM_ERROR;
        }
    };
    let result = backend::kvm::build(&plan).and_then(|vm| {
        let stop = vm.stop_handle();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                if let Some(sig) = signals.wait() {
                    stop.request(StopReason::HostSignal(sig));
                }
            })
            .map_err(|e| crate::vmm::Error::Host(format!("signal thread: {e}")))?;
        backend::kvm::run(vm)
    });
    match result {
        Ok(VmEnd::GuestStopped) => 0,
        Ok(VmEnd::TimedOut) => {
            let secs = plan.timeout.map_or(0.0, |t| t.as_secs_f64());
            error_line(format!(
                "the guest was still running after {secs} s (--timeout); stopped it"
            ));
            EXIT_TIMEOUT
        }
        Ok(VmEnd::Signal(sig)) => 128 + sig,
        Err(e) => {
            error_line(e);
            EXIT_MICROVM_ERROR
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_flags() {
        let d = parse_disk("/img/a.raw", 3).unwrap();
        assert_eq!(
            (d.path, d.read_only, d.serial.as_str()),
            (PathBuf::from("/img/a.raw"), false, "disk3")
        );
        let d = parse_disk("b.raw,ro,serial=layer0", 0).unwrap();
        assert_eq!((d.read_only, d.serial.as_str()), (true, "layer0"));
        assert!(parse_disk("", 0).is_err());
        assert!(parse_disk("x,rw", 0)
            .unwrap_err()
            .contains("unknown option"));
        assert!(parse_disk(&format!("x,serial={}", "s".repeat(21)), 0).is_err());
    }
}
