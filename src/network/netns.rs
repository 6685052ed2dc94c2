//! A network namespace prepared by someone else (an engine's CNI plugin or netavark, or
//! `ip netns add` and a veth by hand): the guest takes the place of the namespace's veth.
//!
//! As Kata Containers does it: the VM's tap is made inside the namespace, and two tc filters
//! redirect every frame arriving on the veth to the tap and every frame the guest sends back
//! out of the veth, so the namespace's own stack never sees them. The guest's interface takes
//! the veth's MAC address, addresses, routes and MTU, so whatever the engine set up around the
//! veth (bridges, port forwarding, NAT) works unchanged. The tap is not persistent: it goes
//! with the last descriptor of the VM that opened it.
//!
//! The namespace is read and changed with iproute2's `ip` and `tc`, run inside it by
//! util-linux's `nsenter`.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use microvm_agent_protocol::{IfAddress, NetworkSpec, RouteSpec};
use serde::Deserialize;

use super::Error;

/// The tap's name in the namespace.
pub const TAP_NAME: &str = "microvm-tap0";

/// A namespace's veth, as the guest will take it over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Veth {
    /// The namespace file.
    pub netns: PathBuf,
    /// The veth's name.
    pub name: String,
    /// What the guest's interface becomes.
    pub spec: NetworkSpec,
}

#[derive(Deserialize)]
struct Link {
    ifname: String,
    #[serde(default)]
    address: String,
    #[serde(default)]
    mtu: u32,
    #[serde(default)]
    linkinfo: Option<LinkInfo>,
    #[serde(default)]
    addr_info: Vec<AddrInfo>,
}

#[derive(Deserialize)]
struct LinkInfo {
    #[serde(default)]
    info_kind: String,
}

#[derive(Deserialize)]
struct AddrInfo {
    local: IpAddr,
    prefixlen: u8,
    #[serde(default)]
    scope: String,
}

#[derive(Deserialize)]
struct Route {
    dst: String,
    #[serde(default)]
    gateway: Option<IpAddr>,
    #[serde(default)]
    dev: Option<String>,
    #[serde(default)]
    protocol: Option<String>,
}

/// Runs `args` inside `netns` and returns its standard output; `what` names the step in an
/// error.
fn run_in(netns: &Path, what: &str, args: &[&str]) -> Result<String, Error> {
    let err = |why: String| Error::Namespace {
        netns: netns.to_owned(),
        why,
    };
    let out = Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .arg("--")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| err(format!("cannot run nsenter (util-linux): {e}")))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let line = stderr.lines().last().unwrap_or("").trim().to_owned();
        return Err(err(format!("{what} failed: {line}")));
    }
    String::from_utf8(out.stdout).map_err(|_| err("iproute2 printed non-UTF-8".into()))
}

/// The veth interfaces in the namespace at `netns`. A namespace whose network is something
/// else (a macvlan, ipvlan or tap with an address: pasta, slirp4netns) is refused rather than
/// left without a network in the VM; and so is our own namespace, the host's network.
fn veths(netns: &Path) -> Result<Vec<Link>, Error> {
    let err = |why: String| Error::Namespace {
        netns: netns.to_owned(),
        why,
    };
    let Ok(meta) = std::fs::metadata(netns) else {
        return Err(err("no such network namespace file".into()));
    };
    if let Ok(ours) = std::fs::metadata("/proc/self/ns/net") {
        use std::os::unix::fs::MetadataExt;
        if (meta.dev(), meta.ino()) == (ours.dev(), ours.ino()) {
            return Err(err(
                "it is the host's own network namespace, whose interfaces a VM may not take".into(),
            ));
        }
    }
    let text = run_in(
        netns,
        "listing its interfaces",
        &["ip", "-j", "-d", "addr", "show"],
    )?;
    let links: Vec<Link> =
        serde_json::from_str(&text).map_err(|e| err(format!("cannot read `ip -j addr`: {e}")))?;
    let kind = |l: &Link| {
        l.linkinfo
            .as_ref()
            .map_or(String::new(), |i| i.info_kind.clone())
    };
    // Interfaces the kernel adds to every namespace (sit0, tunl0, ...) stay down without
    // addresses (a link-local one comes with being up); one with a global address is the
    // namespace's network. Our own tap, while a VM runs, is neither.
    let global = |l: &Link| l.addr_info.iter().any(|a| a.scope == "global");
    if let Some(other) = links
        .iter()
        .find(|l| l.ifname != "lo" && l.ifname != TAP_NAME && kind(l) != "veth" && global(l))
    {
        let k = kind(other);
        return Err(err(format!(
            "its network is {} ({}), which a VM cannot take over: only a veth",
            other.ifname,
            if k.is_empty() { "a device" } else { &k }
        )));
    }
    Ok(links.into_iter().filter(|l| kind(l) == "veth").collect())
}

/// Whether the namespace at `netns` holds a veth to take over.
pub fn holds_veth(netns: &Path) -> Result<bool, Error> {
    Ok(!veths(netns)?.is_empty())
}

/// Reads the namespace at `netns`: it must hold exactly one veth, with at least one address.
pub fn inspect(netns: &Path) -> Result<Veth, Error> {
    let err = |why: String| Error::Namespace {
        netns: netns.to_owned(),
        why,
    };
    let mut veths = veths(netns)?.into_iter();
    let veth = veths
        .next()
        .ok_or_else(|| err("it holds no veth interface to take over".into()))?;
    if let Some(other) = veths.next() {
        return Err(err(format!(
            "it holds more than one veth ({} and {}); the VM takes over exactly one",
            veth.ifname, other.ifname
        )));
    }
    let mac = parse_mac(&veth.address)
        .ok_or_else(|| err(format!("the veth {} has no MAC address", veth.ifname)))?;
    let addresses: Vec<IfAddress> = veth
        .addr_info
        .iter()
        .filter(|a| a.scope != "link" && a.scope != "host")
        .map(|a| IfAddress {
            address: a.local,
            prefix_len: a.prefixlen,
        })
        .collect();
    if addresses.is_empty() {
        return Err(err(format!("the veth {} has no address", veth.ifname)));
    }
    let mut routes = Vec::new();
    for family in ["-4", "-6"] {
        let text = run_in(
            netns,
            "listing its routes",
            &["ip", "-j", family, "route", "show"],
        )?;
        let list: Vec<Route> = serde_json::from_str(&text)
            .map_err(|e| err(format!("cannot read `ip -j {family} route`: {e}")))?;
        routes.extend(guest_routes(&list, &veth.ifname));
    }
    let mtu = u16::try_from(veth.mtu)
        .ok()
        .filter(|m| *m >= 576)
        .unwrap_or(1500);
    Ok(Veth {
        netns: netns.to_owned(),
        name: veth.ifname,
        spec: NetworkSpec {
            mac,
            mtu,
            addresses,
            routes,
            dns: Vec::new(),
            search: Vec::new(),
            write_etc: false,
        },
    })
}

/// The routes through `dev` the guest needs: those with a gateway, and on-link ones the kernel
/// does not make from an address by itself. Link-local and multicast ones come by themselves.
fn guest_routes(list: &[Route], dev: &str) -> Vec<RouteSpec> {
    let mut on_link = Vec::new();
    let mut via = Vec::new();
    for r in list {
        if r.dev.as_deref() != Some(dev) || r.protocol.as_deref() == Some("kernel") {
            continue;
        }
        let destination = if r.dst == "default" {
            None
        } else {
            let (addr, len) = match r.dst.split_once('/') {
                Some((a, l)) => (a, l.parse().ok()),
                None => (r.dst.as_str(), None),
            };
            let Ok(address) = addr.parse::<IpAddr>() else {
                continue;
            };
            let full = if address.is_ipv4() { 32 } else { 128 };
            if address.is_multicast()
                || matches!(address, IpAddr::V6(a) if a.segments()[0] == 0xfe80)
            {
                continue;
            }
            Some(IfAddress {
                address,
                prefix_len: len.unwrap_or(full),
            })
        };
        let route = RouteSpec {
            destination,
            gateway: r.gateway,
        };
        if r.gateway.is_some() {
            via.push(route);
        } else {
            on_link.push(route);
        }
    }
    // A gateway must be reachable before a route through it is added.
    on_link.extend(via);
    on_link
}

/// Name servers for a container in the namespace `netns`: those of `/etc/netns/NAME/resolv.conf`
/// when `ip netns` keeps one for it, else the host's, less loopback ones (unreachable from the
/// namespace).
pub fn resolvers(netns: &Path) -> Vec<IpAddr> {
    let own = netns
        .file_name()
        .map(|n| Path::new("/etc/netns").join(n).join("resolv.conf"));
    let text = own
        .and_then(|p| std::fs::read_to_string(p).ok())
        .or_else(|| std::fs::read_to_string("/etc/resolv.conf").ok())
        .unwrap_or_default();
    name_servers(&text)
}

fn name_servers(resolv_conf: &str) -> Vec<IpAddr> {
    resolv_conf
        .lines()
        .filter_map(|l| l.strip_prefix("nameserver"))
        .filter_map(|a| a.trim().parse::<IpAddr>().ok())
        .filter(|a| !a.is_loopback())
        .collect()
}

fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

impl Veth {
    /// Joins the tap (just opened, so made if it was missing) to the veth before the VM runs:
    /// the tap up with the veth's MTU, and the redirect filters both ways. An ingress qdisc a
    /// killed run left on the veth is replaced; on failure, nothing of ours is left.
    pub fn join_tap(&self) -> Result<(), Error> {
        let script = r#"set -e
tc qdisc del dev "$2" ingress 2>/dev/null || true
ip link set "$1" mtu "$3" up
tc qdisc add dev "$2" ingress
tc filter add dev "$2" parent ffff: protocol all u32 match u8 0 0 action mirred egress redirect dev "$1"
tc qdisc add dev "$1" ingress
tc filter add dev "$1" parent ffff: protocol all u32 match u8 0 0 action mirred egress redirect dev "$2"
"#;
        let mtu = self.spec.mtu.to_string();
        let joined = run_in(
            &self.netns,
            "joining the VM's tap to the veth (ip, tc)",
            &["sh", "-c", script, "sh", TAP_NAME, &self.name, &mtu],
        );
        if joined.is_err() {
            self.release();
        }
        joined.map(drop)
    }

    /// Takes the veth's redirect filter away again (the tap's went with the tap), so the
    /// namespace is as the engine made it. Best effort: the namespace may be gone already.
    pub fn release(&self) {
        let _ = run_in(
            &self.netns,
            "removing the veth's redirect",
            &["tc", "qdisc", "del", "dev", &self.name, "ingress"],
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_name_servers_are_left_out() {
        let text =
            "# x\nnameserver 127.0.0.53\nnameserver 192.0.2.53\nnameserver fd00::53\nsearch x\n";
        let got: Vec<String> = name_servers(text).iter().map(|a| a.to_string()).collect();
        assert_eq!(got, vec!["192.0.2.53", "fd00::53"]);
    }

    #[test]
    fn our_own_namespace_is_refused() {
        let e = inspect(Path::new("/proc/self/ns/net")).unwrap_err();
        assert!(
            e.to_string().contains("the host's own network namespace"),
            "{e}"
        );
    }

    #[test]
    fn macs_parse_strictly() {
        assert_eq!(
            parse_mac("02:42:ac:11:00:02"),
            Some([2, 0x42, 0xac, 0x11, 0, 2])
        );
        assert_eq!(parse_mac("02:42:ac:11:00"), None);
        assert_eq!(parse_mac("02:42:ac:11:00:02:03"), None);
        assert_eq!(parse_mac("zz:42:ac:11:00:02"), None);
    }

    #[test]
    fn routes_the_guest_needs_are_kept_in_order() {
        let json = r#"[
            {"dst":"default","gateway":"10.88.0.1","dev":"eth0","flags":[]},
            {"dst":"10.88.0.0/16","dev":"eth0","protocol":"kernel","scope":"link","prefsrc":"10.88.0.5","flags":[]},
            {"dst":"192.168.7.0/24","dev":"eth0","scope":"link","flags":[]},
            {"dst":"172.16.0.0/12","gateway":"10.88.0.254","dev":"eth0","flags":[]},
            {"dst":"default","gateway":"10.1.0.1","dev":"other","flags":[]},
            {"dst":"fe80::/64","dev":"eth0","protocol":"kernel","flags":[]},
            {"dst":"ff00::/8","dev":"eth0","flags":[]}
        ]"#;
        let list: Vec<Route> = serde_json::from_str(json).unwrap();
        let r = guest_routes(&list, "eth0");
        assert_eq!(r.len(), 3, "{r:?}");
        assert_eq!(r[0].destination.as_ref().unwrap().prefix_len, 24);
        assert_eq!(r[0].gateway, None);
        assert_eq!(r[1].destination, None);
        assert_eq!(r[1].gateway, Some("10.88.0.1".parse().unwrap()));
        assert_eq!(r[2].gateway, Some("10.88.0.254".parse().unwrap()));
    }

    #[test]
    fn a_missing_namespace_is_named() {
        let e = inspect(Path::new("/nonexistent/netns")).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/netns"), "{e}");
        assert!(e.to_string().contains("no such network namespace"), "{e}");
    }
}
