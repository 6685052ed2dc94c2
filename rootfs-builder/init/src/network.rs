//! The guest's network, set up statically from what the host sends (no DHCP wait on the boot
//! path): loopback always; the interface with the host's MAC gets its MTU, addresses and routes
//! over rtnetlink, and the container's /etc/resolv.conf and /etc/hosts are written when asked.
//!
//! rtnetlink is spoken directly (a request and its acknowledgement per change): the init stays
//! a small static binary, and only four message kinds are needed.

use std::io::Write;
use std::net::IpAddr;
use std::path::Path;

use microvm_agent_protocol::{IfAddress, NetworkSpec, RouteSpec};

/// Brings loopback up (every container has it, network or not).
pub fn loopback() -> Result<(), String> {
    let nl = Netlink::open()?;
    let lo = index_of("lo")?;
    nl.set_link(lo, None)
        .map_err(|e| format!("bringing lo up: {e}"))
}

/// Configures the interface `spec` names, then the routes.
pub fn configure(spec: &NetworkSpec) -> Result<(), String> {
    let name = find_by_mac(&spec.mac)?;
    let index = index_of(&name)?;
    // Addresses are ours alone on this link: duplicate address detection would only hold an
    // IPv6 address back for a second, and router advertisements would add addresses we did not
    // choose.
    for key in ["accept_dad", "accept_ra", "autoconf"] {
        let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/{key}"), "0");
    }
    let nl = Netlink::open()?;
    nl.set_link(index, Some(spec.mtu))
        .map_err(|e| format!("bringing {name} up with MTU {}: {e}", spec.mtu))?;
    for a in &spec.addresses {
        nl.add_address(index, a)
            .map_err(|e| format!("adding {}/{} to {name}: {e}", a.address, a.prefix_len))?;
    }
    for r in &spec.routes {
        nl.add_route(index, r)
            .map_err(|e| format!("adding the route {}: {e}", describe(r)))?;
    }
    Ok(())
}

/// Writes /etc/resolv.conf and /etc/hosts under `root` for `hostname`.
pub fn write_etc(root: &Path, spec: &NetworkSpec, hostname: &str) -> Result<(), String> {
    let etc = root.join("etc");
    // An image's /etc that is a symbolic link would lead the writes out of its root.
    if etc.is_symlink() {
        crate::log("the image's /etc is a symbolic link: resolv.conf and hosts left as they are");
        return Ok(());
    }
    std::fs::create_dir_all(&etc).map_err(|e| format!("mkdir {}: {e}", etc.display()))?;
    if !spec.dns.is_empty() || !spec.search.is_empty() {
        let mut text = String::new();
        for ns in &spec.dns {
            text.push_str(&format!("nameserver {ns}\n"));
        }
        if !spec.search.is_empty() {
            text.push_str(&format!("search {}\n", spec.search.join(" ")));
        }
        replace(&etc.join("resolv.conf"), &text)?;
    }
    let mut hosts = String::from(
        "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n\
         fe00::0\tip6-localnet\nff00::0\tip6-mcastprefix\nff02::1\tip6-allnodes\n\
         ff02::2\tip6-allrouters\n",
    );
    for a in &spec.addresses {
        hosts.push_str(&format!("{}\t{hostname}\n", a.address));
    }
    replace(&etc.join("hosts"), &hosts)
}

/// Writes `path` anew; a symlink there (an image's /etc/resolv.conf -> ../run/...) is replaced
/// by the file, as docker's bind mount would shadow it.
fn replace(path: &Path, text: &str) -> Result<(), String> {
    if path.is_symlink() {
        let _ = std::fs::remove_file(path);
    }
    let mut f = std::fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
    f.write_all(text.as_bytes())
        .map_err(|e| format!("{}: {e}", path.display()))
}

fn describe(r: &RouteSpec) -> String {
    let dst = r.destination.as_ref().map_or("default".to_string(), |d| {
        format!("{}/{}", d.address, d.prefix_len)
    });
    match r.gateway {
        Some(gw) => format!("{dst} via {gw}"),
        None => dst,
    }
}

/// The interface whose MAC address is `mac`.
fn find_by_mac(mac: &[u8; 6]) -> Result<String, String> {
    let want = microvm_agent_protocol::mac_text(mac);
    let dir = std::fs::read_dir("/sys/class/net").map_err(|e| format!("/sys/class/net: {e}"))?;
    for entry in dir.flatten() {
        let addr = std::fs::read_to_string(entry.path().join("address")).unwrap_or_default();
        if addr.trim() == want {
            return Ok(entry.file_name().to_string_lossy().into_owned());
        }
    }
    Err(format!(
        "no network interface has the MAC address {want} (is the guest kernel built with virtio-net?)"
    ))
}

fn index_of(name: &str) -> Result<u32, String> {
    let c = std::ffi::CString::new(name).map_err(|_| format!("bad interface name {name:?}"))?;
    // SAFETY: `c` is a valid NUL-terminated string for the duration of the call.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if index == 0 {
        return Err(format!("no interface {name}"));
    }
    Ok(index)
}

// rtnetlink wire format (linux/netlink.h, linux/rtnetlink.h, linux/if_addr.h).
const NLMSG_HDR: usize = 16;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const NLMSG_ERROR: u16 = 0x2;
const RTM_NEWLINK: u16 = 16;
const RTM_NEWADDR: u16 = 20;
const RTM_NEWROUTE: u16 = 24;
const IFLA_MTU: u16 = 4;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const IFA_FLAGS: u16 = 8;
const IFA_F_NODAD: u32 = 0x02;
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const RT_TABLE_MAIN: u8 = 254;
const RTPROT_BOOT: u8 = 3;
const RT_SCOPE_UNIVERSE: u8 = 0;
const RT_SCOPE_LINK: u8 = 253;
const RTN_UNICAST: u8 = 1;

/// A rtnetlink socket.
struct Netlink(std::os::fd::OwnedFd);

/// One request being built: header, fixed part, attributes.
struct Request(Vec<u8>);

impl Request {
    fn new(kind: u16, flags: u16, body: &[u8]) -> Request {
        let mut b = vec![0u8; NLMSG_HDR];
        b[4..6].copy_from_slice(&kind.to_ne_bytes());
        b[6..8].copy_from_slice(&(flags | NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
        b[8..12].copy_from_slice(&1u32.to_ne_bytes());
        b.extend_from_slice(body);
        Request(b)
    }

    fn attr(&mut self, kind: u16, data: &[u8]) {
        let len = 4 + data.len();
        self.0.extend_from_slice(&(len as u16).to_ne_bytes());
        self.0.extend_from_slice(&kind.to_ne_bytes());
        self.0.extend_from_slice(data);
        while !self.0.len().is_multiple_of(4) {
            self.0.push(0);
        }
    }

    fn finish(mut self) -> Vec<u8> {
        let len = self.0.len() as u32;
        self.0[0..4].copy_from_slice(&len.to_ne_bytes());
        self.0
    }
}

fn family(a: &IpAddr) -> u8 {
    match a {
        IpAddr::V4(_) => libc::AF_INET as u8,
        IpAddr::V6(_) => libc::AF_INET6 as u8,
    }
}

fn octets(a: &IpAddr) -> Vec<u8> {
    match a {
        IpAddr::V4(v) => v.octets().to_vec(),
        IpAddr::V6(v) => v.octets().to_vec(),
    }
}

impl Netlink {
    fn open() -> Result<Netlink, String> {
        // SAFETY: plain socket(2); the result is checked before it is owned.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(format!(
                "cannot open a netlink socket: {}",
                std::io::Error::last_os_error()
            ));
        }
        // SAFETY: `fd` is a new descriptor nothing else owns.
        Ok(Netlink(unsafe {
            <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd)
        }))
    }

    /// Sends one request and waits for its acknowledgement.
    fn call(&self, req: Request) -> Result<(), std::io::Error> {
        use std::os::fd::AsRawFd;
        let msg = req.finish();
        // SAFETY: `msg` is a live buffer of the given length; the kernel is the destination
        // since the socket is unconnected netlink (pid 0).
        let n = unsafe { libc::send(self.0.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut buf = [0u8; 4096];
        loop {
            // SAFETY: `buf` is writable for its whole length.
            let n =
                unsafe { libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let got = &buf[..n as usize];
            if got.len() < NLMSG_HDR + 4 {
                return Err(std::io::Error::other("short netlink reply"));
            }
            let kind = u16::from_ne_bytes([got[4], got[5]]);
            if kind != NLMSG_ERROR {
                continue;
            }
            let errno = i32::from_ne_bytes([got[16], got[17], got[18], got[19]]);
            return match errno {
                0 => Ok(()),
                e => Err(std::io::Error::from_raw_os_error(-e)),
            };
        }
    }

    /// Sets the link up, with `mtu` when given.
    fn set_link(&self, index: u32, mtu: Option<u16>) -> Result<(), std::io::Error> {
        // struct ifinfomsg: family, pad, type, index, flags, change.
        let mut body = [0u8; 16];
        body[4..8].copy_from_slice(&(index as i32).to_ne_bytes());
        body[8..12].copy_from_slice(&(libc::IFF_UP as u32).to_ne_bytes());
        body[12..16].copy_from_slice(&(libc::IFF_UP as u32).to_ne_bytes());
        let mut req = Request::new(RTM_NEWLINK, 0, &body);
        if let Some(mtu) = mtu {
            req.attr(IFLA_MTU, &u32::from(mtu).to_ne_bytes());
        }
        self.call(req)
    }

    fn add_address(&self, index: u32, a: &IfAddress) -> Result<(), std::io::Error> {
        // struct ifaddrmsg: family, prefixlen, flags, scope, index.
        let mut body = [0u8; 8];
        body[0] = family(&a.address);
        body[1] = a.prefix_len;
        body[2] = IFA_F_NODAD as u8;
        body[4..8].copy_from_slice(&index.to_ne_bytes());
        let mut req = Request::new(RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, &body);
        let bytes = octets(&a.address);
        req.attr(IFA_LOCAL, &bytes);
        req.attr(IFA_ADDRESS, &bytes);
        req.attr(IFA_FLAGS, &IFA_F_NODAD.to_ne_bytes());
        self.call(req)
    }

    fn add_route(&self, index: u32, r: &RouteSpec) -> Result<(), std::io::Error> {
        let fam = match (&r.destination, &r.gateway) {
            (Some(d), _) => family(&d.address),
            (None, Some(gw)) => family(gw),
            (None, None) => return Err(std::io::Error::other("a route needs a destination")),
        };
        // struct rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags.
        let mut body = [0u8; 12];
        body[0] = fam;
        body[1] = r.destination.as_ref().map_or(0, |d| d.prefix_len);
        body[4] = RT_TABLE_MAIN;
        body[5] = RTPROT_BOOT;
        body[6] = if r.gateway.is_some() {
            RT_SCOPE_UNIVERSE
        } else {
            RT_SCOPE_LINK
        };
        body[7] = RTN_UNICAST;
        let mut req = Request::new(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL, &body);
        if let Some(d) = &r.destination {
            req.attr(RTA_DST, &octets(&d.address));
        }
        if let Some(gw) = &r.gateway {
            req.attr(RTA_GATEWAY, &octets(gw));
        }
        req.attr(RTA_OIF, &index.to_ne_bytes());
        match self.call(req) {
            // The kernel already made the on-link route of an address it was given.
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) && r.gateway.is_none() => Ok(()),
            other => other,
        }
    }
}
