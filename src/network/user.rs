//! The default network: user-mode networking through passt, with fixed addresses as QEMU's
//! user-mode network has them, so they can be documented: the guest is 10.0.2.15/24 behind the
//! gateway 10.0.2.2, and DNS queries to 10.0.2.3 go to the host's resolver. With IPv6 on the
//! host: fd00:a:2::15/64 behind fd00:a:2::2. The host itself is reached at its own addresses,
//! as from docker's bridge: the gateway is not mapped to the host's loopback.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use microvm_agent_protocol::{IfAddress, NetworkSpec, RouteSpec};

/// The guest's IPv4 address.
pub const GUEST_V4: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
/// Its prefix length.
pub const PREFIX_V4: u8 = 24;
/// The gateway.
pub const GATEWAY_V4: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
/// Where the guest sends DNS queries (forwarded to the host's resolver).
pub const DNS_V4: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 3);
/// The guest's IPv6 address.
pub const GUEST_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xa, 0x2, 0, 0, 0, 0, 0x15);
/// Its prefix length.
pub const PREFIX_V6: u8 = 64;
/// The IPv6 gateway.
pub const GATEWAY_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xa, 0x2, 0, 0, 0, 0, 0x2);
/// The guest's MAC address (each VM has a link of its own, so all may share it).
pub const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
/// passt's largest frame payload: 65520 (the largest 802.3 MTU less its header, in words).
pub const MTU: u16 = 65520;

/// What passt is started with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserNet {
    /// The link MTU.
    pub mtu: u16,
    /// Give the guest IPv6 too (the host has an IPv6 default route to reach out with).
    pub ipv6: bool,
}

impl UserNet {
    /// The settings for this host.
    pub fn for_host() -> UserNet {
        UserNet {
            mtu: MTU,
            ipv6: host_has_ipv6_route(),
        }
    }

    /// What the agent configures. `dns` replaces the forwarding address when not empty.
    pub fn spec(&self, dns: &[IpAddr]) -> NetworkSpec {
        let mut addresses = vec![IfAddress {
            address: GUEST_V4.into(),
            prefix_len: PREFIX_V4,
        }];
        let mut routes = vec![RouteSpec {
            destination: None,
            gateway: Some(GATEWAY_V4.into()),
        }];
        if self.ipv6 {
            addresses.push(IfAddress {
                address: GUEST_V6.into(),
                prefix_len: PREFIX_V6,
            });
            routes.push(RouteSpec {
                destination: None,
                gateway: Some(GATEWAY_V6.into()),
            });
        }
        NetworkSpec {
            mac: GUEST_MAC,
            mtu: self.mtu,
            addresses,
            routes,
            dns: if dns.is_empty() {
                vec![DNS_V4.into()]
            } else {
                dns.to_vec()
            },
            search: host_search_domains(),
            write_etc: true,
        }
    }
}

/// Whether the host has an IPv6 default route (/proc/net/ipv6_route: destination and prefix
/// length zero).
fn host_has_ipv6_route() -> bool {
    std::fs::read_to_string("/proc/net/ipv6_route").is_ok_and(|t| {
        t.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // A default route that is not the unreachable one on loopback.
            f.len() >= 10 && f[0].chars().all(|c| c == '0') && f[1] == "00" && f[9] != "lo"
        })
    })
}

/// The host's search domains, as docker copies them into containers.
fn host_search_domains() -> Vec<String> {
    let text = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    search_domains(&text)
}

fn search_domains(resolv_conf: &str) -> Vec<String> {
    resolv_conf
        .lines()
        .rev()
        .find_map(|l| {
            l.strip_prefix("search ")
                .or_else(|| l.strip_prefix("domain "))
        })
        .map(|s| s.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_spec_names_the_documented_addresses() {
        let s = UserNet {
            mtu: MTU,
            ipv6: true,
        }
        .spec(&[]);
        assert_eq!(s.addresses.len(), 2);
        assert_eq!(s.addresses[0].address.to_string(), "10.0.2.15");
        assert_eq!(s.addresses[1].address.to_string(), "fd00:a:2::15");
        assert_eq!(s.routes[0].gateway, Some("10.0.2.2".parse().unwrap()));
        assert_eq!(s.dns, vec!["10.0.2.3".parse::<IpAddr>().unwrap()]);
        assert!(s.write_etc);
        let s = UserNet {
            mtu: 1500,
            ipv6: false,
        }
        .spec(&["192.0.2.53".parse().unwrap()]);
        assert_eq!(s.addresses.len(), 1);
        assert_eq!(s.routes.len(), 1);
        assert_eq!(s.dns, vec!["192.0.2.53".parse::<IpAddr>().unwrap()]);
    }

    #[test]
    fn search_domains_come_from_the_last_search_line() {
        assert!(search_domains("nameserver 1.1.1.1\n").is_empty());
        assert_eq!(
            search_domains("search a.example b.example\nnameserver 1.1.1.1\n"),
            vec!["a.example", "b.example"]
        );
        assert_eq!(search_domains("domain x\nsearch y\n"), vec!["y"]);
    }
}
