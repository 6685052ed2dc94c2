//! A container's network: none (loopback only), user-mode networking through one `passt` per
//! VM with docker's `-p` (the default), or a network namespace an engine prepared, whose veth
//! the guest takes over through a tap ([`netns`]).
//!
//! [`NetworkConfig`] is what the container's record keeps; [`Network`] is one run's: set up
//! before the VM starts (passt started, the namespace read), finished after the VM started
//! (the tap joined to the veth), watched while it runs and torn down after.

pub mod netns;
mod passt;
pub mod ports;
pub mod user;

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use microvm_agent_protocol::NetworkSpec;
use serde::{Deserialize, Serialize};

use crate::devices::virtio::net::tap;
use crate::helpers::find;
use crate::plan::{NetBackend, NetPlan, SharedFd};
pub use passt::PASST_HINT;
use passt::{Passt, PasstWatch};
pub use ports::{PortMap, Protocol};

/// Errors setting up a network, worded for the person who typed the flag.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `--network` does not name a mode we have.
    #[error("--network {value:?}: {why}")]
    Mode {
        /// What was given.
        value: String,
        /// What is wrong.
        why: String,
    },
    /// A `-p` value is malformed or its host port cannot be had.
    #[error("-p {value:?}: {why}")]
    Publish {
        /// What was given (or the port as parsed).
        value: String,
        /// What is wrong.
        why: String,
    },
    /// `--dns` is not an IP address.
    #[error("--dns {0:?}: not an IP address")]
    Dns(String),
    /// passt cannot be started.
    #[error("user-mode networking: {0}")]
    Passt(String),
    /// The network namespace cannot be used.
    #[error("network namespace {netns}: {why}")]
    Namespace {
        /// The namespace file.
        netns: PathBuf,
        /// What is wrong.
        why: String,
    },
}

/// How a container is networked.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Loopback only (`--network none`; and records from before networking).
    #[default]
    None,
    /// User-mode networking through passt (the default of `run` and `create`).
    User,
    /// The veth of an existing network namespace (`--network ns:PATH`, or an engine's).
    Namespace(PathBuf),
}

impl Mode {
    /// Parses `--network`: `passt` (also docker's `bridge` and `default`), `none`, `ns:PATH`.
    pub fn parse(value: &str) -> Result<Mode, Error> {
        let bad = |why: &str| Error::Mode {
            value: value.to_owned(),
            why: why.to_owned(),
        };
        match value {
            "passt" | "bridge" | "default" | "slirp4netns" | "pasta" => Ok(Mode::User),
            "none" => Ok(Mode::None),
            "host" => Err(bad(
                "a VM cannot share the host's network stack; use the default (passt) and -p",
            )),
            v => match v.strip_prefix("ns:") {
                Some(path) if !path.is_empty() => Ok(Mode::Namespace(path.into())),
                _ => Err(bad("expected passt, none or ns:PATH")),
            },
        }
    }

    /// docker's name of the mode, as `inspect` shows it.
    pub fn name(&self) -> String {
        match self {
            Mode::None => "none".into(),
            Mode::User => "passt".into(),
            Mode::Namespace(p) => format!("ns:{}", p.display()),
        }
    }
}

/// A container's network, as its record keeps it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkConfig {
    /// The mode.
    pub mode: Mode,
    /// Published ports (user mode only).
    #[serde(default)]
    pub ports: Vec<PortMap>,
    /// Name servers replacing the default ones (`--dns`).
    #[serde(default)]
    pub dns: Vec<IpAddr>,
}

impl NetworkConfig {
    /// Checks and assembles the flags of `run`/`create`; ports are parsed (a missing host port
    /// picked) and the namespace checked now, before anything is created.
    pub fn from_flags(
        network: Option<&str>,
        publish: &[String],
        dns: &[String],
    ) -> Result<NetworkConfig, Error> {
        let mode = network.map_or(Ok(Mode::User), Mode::parse)?;
        let ports = publish
            .iter()
            .map(|p| PortMap::parse(p))
            .collect::<Result<Vec<_>, _>>()?;
        // Checked now, so a taken port fails `run` before anything exists; and again when the
        // container starts, since a port can be taken in between.
        for p in &ports {
            p.check_available()?;
        }
        if let (Some(p), false) = (publish.first(), mode == Mode::User) {
            return Err(Error::Publish {
                value: p.clone(),
                why: format!(
                    "publishing needs the default network (passt), not --network {}",
                    mode.name()
                ),
            });
        }
        let dns = dns
            .iter()
            .map(|d| d.parse().map_err(|_| Error::Dns(d.clone())))
            .collect::<Result<Vec<_>, _>>()?;
        match &mode {
            Mode::Namespace(path) => drop(netns::inspect(path)?),
            Mode::User => drop(find("passt", PASST_HINT).map_err(|e| Error::Passt(e.to_string()))?),
            Mode::None => {}
        }
        Ok(NetworkConfig { mode, ports, dns })
    }

    /// What the guest's interface is (or would be) given: user mode's fixed addresses, or what
    /// the namespace's veth holds now; `None` without a network.
    pub fn guest_spec(&self) -> Option<NetworkSpec> {
        match &self.mode {
            Mode::None => None,
            Mode::User => Some(user::UserNet::for_host().spec(&self.dns)),
            Mode::Namespace(path) => netns::inspect(path).ok().map(|v| v.spec),
        }
    }
}

/// One run's network.
pub struct Network {
    /// The VM's network device, if any.
    pub plan: Option<NetPlan>,
    /// What the agent configures, if anything.
    pub spec: Option<NetworkSpec>,
    passt: Option<Passt>,
    veth: Option<netns::Veth>,
}

impl Network {
    /// Sets up what the VM needs before it starts: the published ports checked and passt
    /// started, or the namespace read. `dir` holds passt's log. Call on the thread that
    /// outlives the VM.
    pub fn prepare(cfg: &NetworkConfig, dir: &Path) -> Result<Network, Error> {
        match &cfg.mode {
            Mode::None => Ok(Network {
                plan: None,
                spec: None,
                passt: None,
                veth: None,
            }),
            Mode::User => {
                for p in &cfg.ports {
                    p.check_available()?;
                }
                let net = user::UserNet::for_host();
                let (passt, fd) = Passt::start(&net, &cfg.ports, dir)?;
                Ok(Network {
                    plan: Some(NetPlan {
                        mac: user::GUEST_MAC,
                        mtu: net.mtu,
                        backend: NetBackend::Connected(SharedFd(Arc::new(fd))),
                    }),
                    spec: Some(net.spec(&cfg.dns)),
                    passt: Some(passt),
                    veth: None,
                })
            }
            Mode::Namespace(path) => {
                let veth = netns::inspect(path)?;
                // The tap is made (by opening it) and joined to the veth before the VM runs,
                // so the guest's first frames find the way open.
                let tap = tap::open(netns::TAP_NAME, Some(path)).map_err(|e| Error::Namespace {
                    netns: path.clone(),
                    why: e.to_string(),
                })?;
                veth.join_tap()?;
                let mut spec = veth.spec.clone();
                // Name service as the namespace's own (`ip netns`' /etc/netns/NAME), else the
                // host's; an engine's bundle mounts its own files instead.
                spec.dns = if cfg.dns.is_empty() {
                    netns::resolvers(path)
                } else {
                    cfg.dns.clone()
                };
                spec.write_etc = true;
                Ok(Network {
                    plan: Some(NetPlan {
                        mac: spec.mac,
                        mtu: spec.mtu,
                        backend: NetBackend::OpenTap {
                            name: netns::TAP_NAME.into(),
                            fd: SharedFd(Arc::new(tap)),
                        },
                    }),
                    spec: Some(spec),
                    passt: None,
                    veth: Some(veth),
                })
            }
        }
    }

    /// Watches passt once the VM runs: `on_failure` hears why the network failed.
    pub fn vm_started(self, on_failure: impl Fn(String) + Send + 'static) -> Running {
        Running {
            passt: self.passt.map(|p| p.watch(on_failure)),
            veth: self.veth,
        }
    }

    /// Undoes the set-up when the VM could not start.
    pub fn abandon(self) {
        if let Some(v) = self.veth {
            v.release();
        }
    }
}

/// A run's network while the VM runs.
pub struct Running {
    passt: Option<PasstWatch>,
    veth: Option<netns::Veth>,
}

impl Running {
    /// Tears the network down after the VM ended.
    pub fn finish(self) {
        if let Some(p) = self.passt {
            p.finish();
        }
        if let Some(v) = self.veth {
            v.release();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse() {
        assert_eq!(Mode::parse("none").unwrap(), Mode::None);
        assert_eq!(Mode::parse("passt").unwrap(), Mode::User);
        assert_eq!(Mode::parse("bridge").unwrap(), Mode::User);
        assert_eq!(
            Mode::parse("ns:/run/netns/a").unwrap(),
            Mode::Namespace("/run/netns/a".into())
        );
        for (v, words) in [
            ("host", "cannot share the host"),
            ("ns:", "expected passt"),
            ("weird", "expected passt, none or ns:PATH"),
        ] {
            let e = Mode::parse(v).unwrap_err().to_string();
            assert!(e.contains(words), "{v}: {e}");
        }
    }

    #[test]
    fn flags_are_checked_together() {
        let c = NetworkConfig::from_flags(None, &["8080:80".into()], &["1.1.1.1".into()]).unwrap();
        assert_eq!(c.mode, Mode::User);
        assert_eq!(c.ports.len(), 1);
        let spec = c.guest_spec().unwrap();
        assert_eq!(spec.addresses[0].address.to_string(), "10.0.2.15");
        assert_eq!(spec.dns, vec!["1.1.1.1".parse::<IpAddr>().unwrap()]);
        let e = NetworkConfig::from_flags(Some("none"), &["8080:80".into()], &[]).unwrap_err();
        assert!(e.to_string().contains("needs the default network"), "{e}");
        let e = NetworkConfig::from_flags(None, &[], &["dns.example".into()]).unwrap_err();
        assert!(e.to_string().contains("not an IP address"), "{e}");
        let e = NetworkConfig::from_flags(Some("ns:/nonexistent"), &[], &[]).unwrap_err();
        assert!(e.to_string().contains("no such network namespace"), "{e}");
    }
}
