//! An OCI bundle (`config.json` and the root the engine prepared) as a container record: the
//! root and bind mounts shared over virtio-fs, kernel filesystems made in the guest, the
//! process with its user, limits and capabilities, and the VM's size from the bundle's
//! resources or annotations. Everything is checked here, before a VM starts.

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};

use microvm_agent_protocol::{
    Capabilities, DeviceSpec, GuestMount, GuestMountSource, ProcessOptions, Rlimit,
};
use oci_spec::runtime::{LinuxDeviceType, LinuxNamespaceType, Mount, Process, Spec};

use super::capabilities;
use super::Error;
use crate::backend::Hypervisor;
use crate::container::{ContainerConfig, ProcessConfig, RootSource};
use crate::network::{netns, Mode, NetworkConfig};
use crate::volumes::Staged;

/// Annotation choosing the number of vCPUs.
pub const ANNOTATION_CPUS: &str = "io.microvm.cpus";
/// Annotation choosing guest RAM (`512M`, `1G`, or MiB).
pub const ANNOTATION_MEMORY: &str = "io.microvm.memory";
/// Annotation choosing the guest kernel (a path on the host).
pub const ANNOTATION_KERNEL: &str = "io.microvm.kernel";
/// Annotation choosing the backend (`kvm`, or `qemu`: emulated, no hardware boundary).
pub const ANNOTATION_HYPERVISOR: &str = "io.microvm.hypervisor";
/// Guest RAM when the bundle sets no memory limit (`microvm run`'s default).
pub const DEFAULT_MEMORY_MIB: u64 = 256;
/// What the guest's own kernel and agent need on top of a container's memory limit.
pub const GUEST_OVERHEAD_MIB: u64 = 64;
/// Smallest VM the guest kernel boots in comfortably.
const MIN_MEMORY_MIB: u64 = 128;

/// What the host side decided beyond the bundle (the runtime's flags and environment).
#[derive(Debug, Clone)]
pub struct HostChoices {
    /// The backend unless the bundle's annotation names one (`--hypervisor`,
    /// `MICROVM_HYPERVISOR`); neither: `kvm`.
    pub hypervisor: Option<Hypervisor>,
}

/// A bundle read and checked.
pub struct Bundle {
    /// The bundle directory, absolute.
    pub dir: PathBuf,
    /// Its `config.json`.
    pub spec: Spec,
}

impl Bundle {
    /// Reads `dir/config.json`.
    pub fn load(dir: &Path) -> Result<Bundle, Error> {
        let dir = std::fs::canonicalize(dir).map_err(|e| Error::Bundle {
            bundle: dir.to_owned(),
            why: e.to_string(),
        })?;
        let spec = Spec::load(dir.join("config.json")).map_err(|e| Error::Bundle {
            bundle: dir.clone(),
            why: format!("config.json: {e}"),
        })?;
        Ok(Bundle { dir, spec })
    }

    fn error(&self, why: impl Into<String>) -> Error {
        Error::Bundle {
            bundle: self.dir.clone(),
            why: why.into(),
        }
    }

    /// The bundle's annotations.
    pub fn annotations(&self) -> HashMap<String, String> {
        self.spec.annotations().clone().unwrap_or_default()
    }

    /// The root directory, absolute.
    pub fn rootfs(&self) -> Result<PathBuf, Error> {
        let root = self
            .spec
            .root()
            .as_ref()
            .ok_or_else(|| self.error("config.json has no root"))?;
        let path = self.dir.join(root.path());
        if !path.is_dir() {
            return Err(self.error(format!("root {}: not a directory", path.display())));
        }
        Ok(path)
    }

    /// The container record for `id` and the terminal's size (rows, columns) when the process
    /// has one; `warn` hears what is accepted but has no effect in a VM.
    pub fn config(
        &self,
        id: &str,
        choices: &HostChoices,
        warn: &mut dyn FnMut(String),
    ) -> Result<(ContainerConfig, Option<(u16, u16)>), Error> {
        let spec = &self.spec;
        let rootfs = self.rootfs()?;
        let read_only = spec.root().as_ref().and_then(|r| r.readonly()) == Some(true);
        let process = spec
            .process()
            .as_ref()
            .ok_or_else(|| self.error("config.json has no process"))?;
        let (process, console_size) = self.process(process, warn)?;
        let (binds, guest_mounts) = self.mounts(spec.mounts().as_deref().unwrap_or_default())?;
        let annotations = self.annotations();
        let (cpus, memory_mib) = self.size(&annotations)?;
        let hypervisor = match annotations.get(ANNOTATION_HYPERVISOR).map(String::as_str) {
            None => match choices.hypervisor {
                Some(Hypervisor::Auto) | None => Hypervisor::Kvm,
                Some(h) => h,
            },
            Some("kvm") => Hypervisor::Kvm,
            Some("qemu") => Hypervisor::Qemu,
            Some(other) => {
                return Err(self.error(format!(
                    "annotation {ANNOTATION_HYPERVISOR}={other}: expected kvm or qemu"
                )))
            }
        };
        let kernel = match annotations.get(ANNOTATION_KERNEL) {
            Some(k) => PathBuf::from(k),
            None => crate::host::default_kernel().ok_or_else(|| {
                self.error("no guest kernel found: run scripts/build-kernel, or set the annotation io.microvm.kernel")
            })?,
        };
        if hypervisor == Hypervisor::Kvm && !Path::new("/dev/kvm").exists() {
            return Err(self.error(format!(
                "no /dev/kvm on this host: set {ANNOTATION_HYPERVISOR}=qemu (or MICROVM_HYPERVISOR=qemu) to run emulated, which is not a hardware isolation boundary"
            )));
        }
        if !kernel.is_file() {
            return Err(self.error(format!("guest kernel {}: not a file", kernel.display())));
        }
        if spec.hooks().is_some() {
            warn("the bundle's hooks are not run: microvm-runtime does not run host hooks".into());
        }
        let config = ContainerConfig {
            id: id.to_string(),
            name: id.to_string(),
            created: crate::container::state::now(),
            root: RootSource::Bundle {
                rootfs,
                read_only,
                binds,
            },
            process,
            hostname: spec.hostname().clone().unwrap_or_default(),
            volumes: Vec::new(),
            hypervisor,
            kernel,
            cpus,
            memory_mib,
            timeout: None,
            stop_signal: libc::SIGTERM,
            auto_remove: false,
            guest_mounts,
            devices: self.devices()?,
            wait_start: true,
            network: self.network()?,
            storage_size: None,
        };
        Ok((config, console_size))
    }

    /// The process: argv, environment, user, terminal and what it may do.
    pub fn process(
        &self,
        p: &Process,
        warn: &mut dyn FnMut(String),
    ) -> Result<(ProcessConfig, Option<(u16, u16)>), Error> {
        process_config(p, warn).map_err(|why| self.error(why))
    }

    /// The bind mounts (entries of the root's share) and every mount in order.
    fn mounts(&self, mounts: &[Mount]) -> Result<(Vec<Staged>, Vec<GuestMount>), Error> {
        let mut binds = Vec::new();
        let mut out = Vec::with_capacity(mounts.len());
        for m in mounts {
            let target = clean_target(m.destination()).map_err(|why| self.error(why))?;
            let options = m.options().clone().unwrap_or_default();
            let typ = m.typ().clone().unwrap_or_default();
            let is_bind = typ == "bind" || options.iter().any(|o| o == "bind" || o == "rbind");
            let (source, options) = if is_bind && target == "/dev/shm" {
                // The engine's shared-memory directory cannot be shared with a VM's processes
                // (its files would have to be mapped on both sides); the container gets its
                // own, as a tmpfs in the guest.
                let source = GuestMountSource::Kernel {
                    fstype: "tmpfs".into(),
                    source: "shm".into(),
                };
                let options = ["nosuid", "nodev", "noexec", "mode=1777", "size=65536k"];
                (source, options.map(String::from).to_vec())
            } else if is_bind {
                let src = m
                    .source()
                    .as_ref()
                    .ok_or_else(|| self.error(format!("bind mount at {target} has no source")))?;
                if !src.is_absolute() {
                    return Err(self.error(format!(
                        "bind mount at {target}: source {} is not absolute",
                        src.display()
                    )));
                }
                if let Err(e) = std::fs::metadata(src) {
                    return Err(self.error(format!(
                        "bind mount at {target}: source {}: {e}",
                        src.display()
                    )));
                }
                let entry = format!("m{}", binds.len());
                let recursive = options.iter().any(|o| o == "rbind");
                binds.push(Staged {
                    name: entry.clone(),
                    source: src.clone(),
                    read_only: options.iter().any(|o| o == "ro"),
                    recursive,
                });
                (GuestMountSource::Shared { entry, recursive }, options)
            } else {
                match typ.as_str() {
                    "proc" | "sysfs" | "tmpfs" | "devpts" | "mqueue" | "cgroup" | "cgroup2" => {
                        let source = GuestMountSource::Kernel {
                            fstype: typ.clone(),
                            source: m
                                .source()
                                .as_ref()
                                .map(|s| s.display().to_string())
                                .unwrap_or_else(|| typ.clone()),
                        };
                        (source, options)
                    }
                    "" => {
                        return Err(self.error(format!("mount at {target} has no type")));
                    }
                    other => {
                        return Err(self.error(format!(
                            "mount type {other:?} at {target} is not supported in a VM (bind, proc, sysfs, tmpfs, devpts, mqueue and cgroup are)"
                        )))
                    }
                }
            };
            out.push(GuestMount {
                target,
                source,
                options,
            });
        }
        Ok((binds, out))
    }

    /// The network the engine prepared: the namespace in `linux.namespaces` whose veth the
    /// guest takes over; loopback only when that namespace has no veth (`--network none`) or
    /// is a new one the engine left empty. Sharing the host's network stack is refused: a VM
    /// has a kernel, and so a network stack, of its own.
    fn network(&self) -> Result<NetworkConfig, Error> {
        let namespaces = self
            .spec
            .linux()
            .as_ref()
            .and_then(|l| l.namespaces().clone())
            .unwrap_or_default();
        let Some(ns) = namespaces
            .iter()
            .find(|n| n.typ() == LinuxNamespaceType::Network)
        else {
            return Err(self.error(
                "the container shares the host's network namespace (--network host), which a VM cannot: use the engine's own network or none",
            ));
        };
        let mode = match ns.path() {
            Some(path) if netns::holds_veth(path).map_err(|e| self.error(e.to_string()))? => {
                Mode::Namespace(path.clone())
            }
            _ => Mode::None,
        };
        Ok(NetworkConfig {
            mode,
            ..NetworkConfig::default()
        })
    }

    /// `linux.devices` as nodes to make in the guest.
    fn devices(&self) -> Result<Vec<DeviceSpec>, Error> {
        let Some(linux) = self.spec.linux() else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for d in linux.devices().as_deref().unwrap_or_default() {
            let path = clean_target(d.path()).map_err(|why| self.error(why))?;
            let kind = match d.typ() {
                LinuxDeviceType::C | LinuxDeviceType::U => 'c',
                LinuxDeviceType::B => 'b',
                LinuxDeviceType::P => 'p',
                LinuxDeviceType::A => {
                    return Err(self.error(format!("device {path}: type 'a' is not a node")))
                }
            };
            let (major, minor) = (d.major(), d.minor());
            if major < 0 || minor < 0 {
                return Err(self.error(format!("device {path}: negative device number")));
            }
            out.push(DeviceSpec {
                path,
                kind,
                major: major as u64,
                minor: minor as u64,
                mode: d.file_mode().unwrap_or(0o666),
                uid: d.uid().unwrap_or(0),
                gid: d.gid().unwrap_or(0),
            });
        }
        Ok(out)
    }

    /// vCPUs and guest RAM: the annotations, else the bundle's CPU quota (or cpuset) and
    /// memory limit plus the guest's own overhead, else `microvm run`'s defaults.
    fn size(&self, annotations: &HashMap<String, String>) -> Result<(u8, u64), Error> {
        let resources = self
            .spec
            .linux()
            .as_ref()
            .and_then(|l| l.resources().clone())
            .unwrap_or_default();
        let (mut cpus, mut memory) = vm_size(&resources).map_err(|why| self.error(why))?;
        if let Some(v) = annotations.get(ANNOTATION_CPUS) {
            cpus = v
                .parse::<u8>()
                .ok()
                .filter(|n| (1..=crate::plan::MAX_CPUS).contains(n))
                .ok_or_else(|| {
                    self.error(format!(
                        "annotation {ANNOTATION_CPUS}={v}: expected 1 to {}",
                        crate::plan::MAX_CPUS
                    ))
                })?;
        }
        if let Some(v) = annotations.get(ANNOTATION_MEMORY) {
            memory = crate::cli::parse_memory_mib(v)
                .map_err(|e| self.error(format!("annotation {ANNOTATION_MEMORY}={v}: {e}")))?;
        }
        Ok((cpus, memory))
    }
}

/// vCPUs and guest RAM for `resources`: a CPU quota rounded up to whole CPUs (else the
/// cpuset's size), a memory limit plus [`GUEST_OVERHEAD_MIB`].
pub fn vm_size(resources: &oci_spec::runtime::LinuxResources) -> Result<(u8, u64), String> {
    let mut cpus = 1u64;
    if let Some(cpu) = resources.cpu() {
        match (cpu.quota(), cpu.period()) {
            (Some(q), Some(p)) if q > 0 && p > 0 => cpus = (q as u64).div_ceil(p),
            _ => {
                if let Some(set) = cpu.cpus() {
                    cpus = cpuset_len(set)?;
                }
            }
        }
    }
    let cpus = u8::try_from(cpus)
        .ok()
        .filter(|n| (1..=crate::plan::MAX_CPUS).contains(n))
        .ok_or_else(|| {
            format!(
                "{cpus} CPUs asked for: a VM has 1 to {}",
                crate::plan::MAX_CPUS
            )
        })?;
    let memory = match resources.memory().as_ref().and_then(|m| m.limit()) {
        Some(limit) if limit > 0 => {
            let mib = (limit as u64).div_ceil(1 << 20);
            (mib + GUEST_OVERHEAD_MIB).max(MIN_MEMORY_MIB)
        }
        _ => DEFAULT_MEMORY_MIB,
    };
    Ok((cpus, memory))
}

/// The number of CPUs in a cpuset list (`0-3,6`).
fn cpuset_len(set: &str) -> Result<u64, String> {
    let mut n = 0u64;
    for part in set.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let bad = || format!("cpuset {set:?} does not parse");
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (
                a.parse::<u64>().map_err(|_| bad())?,
                b.parse::<u64>().map_err(|_| bad())?,
            ),
            None => {
                let a = part.parse::<u64>().map_err(|_| bad())?;
                (a, a)
            }
        };
        if b < a {
            return Err(bad());
        }
        n += b - a + 1;
    }
    Ok(n.max(1))
}

/// An absolute container path without `.` or `..`, as a string.
fn clean_target(p: &Path) -> Result<String, String> {
    if !p.is_absolute() {
        return Err(format!("{}: not an absolute path", p.display()));
    }
    if p.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(format!("{}: contains '..'", p.display()));
    }
    if p.to_str().is_none() {
        return Err(format!("{}: not UTF-8", p.display()));
    }
    // Drops `.` components and doubled or trailing slashes.
    let clean: PathBuf = p.components().collect();
    Ok(clean.display().to_string())
}

/// Refuses capability sets the kernel would refuse at exec time (it only says EPERM then):
/// effective within permitted, inheritable within bounding, ambient within permitted and
/// inheritable.
fn check_capabilities(c: &Capabilities) -> Result<(), String> {
    let outside = |set: u64, within: u64, what: &str, of: &str| {
        let extra = set & !within;
        if extra == 0 {
            return Ok(());
        }
        let names: Vec<&str> = capabilities::all()
            .enumerate()
            .filter(|(i, _)| extra & (1 << i) != 0)
            .map(|(_, n)| n)
            .collect();
        Err(format!(
            "process.capabilities: {what} has {} outside {of}",
            names.join(", ")
        ))
    };
    outside(c.effective, c.permitted, "effective", "permitted")?;
    outside(c.inheritable, c.bounding, "inheritable", "bounding")?;
    outside(
        c.ambient,
        c.permitted & c.inheritable,
        "ambient",
        "permitted and inheritable",
    )
}

/// A bundle's (or exec's) process as the container record holds it, and its console size.
pub fn process_config(
    p: &Process,
    warn: &mut dyn FnMut(String),
) -> Result<(ProcessConfig, Option<(u16, u16)>), String> {
    let argv = p.args().clone().unwrap_or_default();
    if argv.is_empty() {
        return Err("process.args is empty: nothing to run".into());
    }
    let cwd = p.cwd().display().to_string();
    if !p.cwd().is_absolute() {
        return Err(format!("process.cwd {cwd:?} is not absolute"));
    }
    let user = p.user();
    let mut rlimits = Vec::new();
    for r in p.rlimits().as_deref().unwrap_or_default() {
        let name = serde_json::to_value(r.typ())
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default();
        let resource =
            capabilities::rlimit(&name).ok_or_else(|| format!("unknown rlimit {name:?}"))?;
        rlimits.push(Rlimit {
            resource,
            soft: r.soft(),
            hard: r.hard(),
        });
    }
    let capabilities = p.capabilities().as_ref().map(|c| {
        let mut set = |names: &Option<oci_spec::runtime::Capabilities>| {
            let names: Vec<String> = names
                .iter()
                .flatten()
                .filter_map(|c| serde_json::to_value(c).ok())
                .filter_map(|v| v.as_str().map(String::from))
                .collect();
            let (mask, unknown) = capabilities::mask(names.iter().map(String::as_str));
            for u in unknown {
                warn(format!(
                    "capability {u} is unknown to the guest kernel: ignored"
                ));
            }
            mask
        };
        Capabilities {
            bounding: set(c.bounding()),
            effective: set(c.effective()),
            permitted: set(c.permitted()),
            inheritable: set(c.inheritable()),
            ambient: set(c.ambient()),
        }
    });
    if let Some(c) = &capabilities {
        check_capabilities(c)?;
    }
    let options = ProcessOptions {
        umask: user.umask(),
        rlimits,
        capabilities,
        no_new_privileges: p.no_new_privileges() == Some(true),
        groups: Some(user.additional_gids().clone().unwrap_or_default()),
    };
    let console = p
        .console_size()
        .map(|b| {
            (
                b.height().min(u16::MAX as u64) as u16,
                b.width().min(u16::MAX as u64) as u16,
            )
        })
        .filter(|(h, w)| *h > 0 && *w > 0);
    let tty = p.terminal() == Some(true);
    Ok((
        ProcessConfig {
            argv,
            env: p.env().clone().unwrap_or_default(),
            cwd,
            user: format!("{}:{}", user.uid(), user.gid()),
            tty,
            // conmon and the shims keep stdin open and close it when the engine's is done.
            stdin: true,
            options,
        },
        console,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle(json: &str) -> (PathBuf, Bundle) {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("microvm-bundle-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("rootfs")).unwrap();
        std::fs::write(dir.join("config.json"), json).unwrap();
        let b = Bundle::load(&dir).unwrap();
        (dir, b)
    }

    const SPEC: &str = r#"{
        "ociVersion": "1.0.2",
        "root": {"path": "rootfs", "readonly": true},
        "hostname": "box",
        "process": {
            "args": ["sh", "-c", "exit 3"], "cwd": "/", "env": ["PATH=/bin"],
            "user": {"uid": 1000, "gid": 1000, "umask": 18, "additionalGids": [1000, 10]},
            "terminal": true, "consoleSize": {"height": 24, "width": 80},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": true,
            "capabilities": {"bounding": ["CAP_CHOWN", "CAP_KILL"], "permitted": ["CAP_CHOWN", "CAP_KILL"], "effective": ["CAP_KILL"]}
        },
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev/shm", "type": "bind", "source": "/nonexistent", "options": ["bind"]},
            {"destination": "/etc/hosts", "type": "bind", "source": "/etc/hosts", "options": ["rbind", "ro"]}
        ],
        "linux": {
            "resources": {"memory": {"limit": 536870912}, "cpu": {"quota": 150000, "period": 100000}},
            "namespaces": [{"type": "pid"}, {"type": "network"}]
        },
        "annotations": {"io.microvm.hypervisor": "qemu"}
    }"#;

    #[test]
    fn a_bundle_becomes_a_container_record() {
        let (dir, b) = bundle(SPEC);
        let choices = HostChoices {
            hypervisor: Some(Hypervisor::Kvm),
        };
        let mut warnings = Vec::new();
        let (p, console) = b
            .process(b.spec.process().as_ref().unwrap(), &mut |w| {
                warnings.push(w)
            })
            .unwrap();
        assert_eq!(p.user, "1000:1000");
        assert_eq!(console, Some((24, 80)));
        assert_eq!(p.options.umask, Some(18));
        assert_eq!(p.options.groups, Some(vec![1000, 10]));
        assert!(p.options.no_new_privileges);
        let caps = p.options.capabilities.unwrap();
        assert_eq!(caps.bounding, 1 | (1 << 5));
        assert_eq!(caps.effective, 1 << 5);
        assert_eq!(p.options.rlimits[0].resource, 7);
        let (binds, mounts) = b.mounts(b.spec.mounts().as_deref().unwrap()).unwrap();
        assert_eq!(binds.len(), 1, "/dev/shm is made in the guest");
        assert!(binds[0].read_only && binds[0].recursive);
        assert!(
            matches!(&mounts[1].source, GuestMountSource::Kernel { fstype, .. } if fstype == "tmpfs")
        );
        assert!(
            matches!(&mounts[2].source, GuestMountSource::Shared { entry, .. } if entry == "m0")
        );
        let (cpus, memory) = b.size(&b.annotations()).unwrap();
        assert_eq!((cpus, memory), (2, 512 + GUEST_OVERHEAD_MIB));
        if crate::host::default_kernel().is_some() {
            let (c, console) = b.config("x", &choices, &mut |_| {}).unwrap();
            assert_eq!(console, Some((24, 80)));
            assert_eq!(c.hypervisor, Hypervisor::Qemu, "the annotation wins");
            assert!(matches!(
                c.root,
                RootSource::Bundle {
                    read_only: true,
                    ..
                }
            ));
            assert!(c.wait_start);
            // A new network namespace the engine left empty: loopback only.
            assert_eq!(c.network.mode, crate::network::Mode::None);
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn bad_bundles_are_refused_with_the_reason() {
        for (from, to, why) in [
            (
                r#""type": "proc""#,
                r#""type": "nfs""#,
                "not supported in a VM",
            ),
            (r#""/etc/hosts""#, r#""/no/such/file""#, "/no/such/file"),
            (
                r#""destination": "/proc""#,
                r#""destination": "proc""#,
                "not an absolute path",
            ),
            (
                r#""args": ["sh", "-c", "exit 3"]"#,
                r#""args": []"#,
                "nothing to run",
            ),
            (r#""quota": 150000"#, r#""quota": 9900000"#, "a VM has 1 to"),
            (
                r#""io.microvm.hypervisor": "qemu""#,
                r#""io.microvm.hypervisor": "xen""#,
                "expected kvm or qemu",
            ),
            (
                r#""effective": ["CAP_KILL"]"#,
                r#""effective": ["CAP_KILL"], "inheritable": ["CAP_NET_RAW"]"#,
                "inheritable has CAP_NET_RAW outside bounding",
            ),
            (
                r#"{"type": "network"}"#,
                r#"{"type": "uts"}"#,
                "shares the host's network namespace",
            ),
            (
                r#"{"type": "network"}"#,
                r#"{"type": "network", "path": "/nonexistent/netns"}"#,
                "no such network namespace",
            ),
        ] {
            let spec = SPEC.replace(from, to);
            assert_ne!(spec, SPEC, "{from}");
            let (dir, b) = bundle(&spec);
            let choices = HostChoices {
                hypervisor: Some(Hypervisor::Qemu),
            };
            let err = match b.config("x", &choices, &mut |_| {}) {
                Err(e) => e.to_string(),
                Ok(_) => panic!("{to} accepted"),
            };
            assert!(err.contains(why), "{to}: {err}");
            std::fs::remove_dir_all(dir).unwrap();
        }
    }

    #[test]
    fn cpusets_count() {
        assert_eq!(cpuset_len("0-3,6").unwrap(), 5);
        assert_eq!(cpuset_len("2").unwrap(), 1);
        assert!(cpuset_len("3-1").is_err());
        assert!(cpuset_len("x").is_err());
    }
}
