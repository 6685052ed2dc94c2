//! Published ports, docker's `-p [IP:][HOST_PORT:]CONTAINER_PORT[/tcp|/udp]`, and the check
//! that a host port can be had before anything starts (passt itself carries on, silently
//! without the port, when a bind fails).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, UdpSocket};

use serde::{Deserialize, Serialize};

use super::Error;

/// A transport protocol of a published port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

/// A container port published on the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortMap {
    /// The host address it is bound to; `None` for every address.
    pub host_ip: Option<IpAddr>,
    /// The host port (chosen at parse time when the flag left it out).
    pub host_port: u16,
    /// The port inside the container.
    pub container_port: u16,
    /// TCP or UDP.
    pub protocol: Protocol,
}

impl fmt::Display for PortMap {
    /// docker ps's spelling: `0.0.0.0:8080->80/tcp`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.host_ip {
            Some(IpAddr::V6(ip)) => write!(f, "[{ip}]")?,
            Some(ip) => write!(f, "{ip}")?,
            None => f.write_str("0.0.0.0")?,
        }
        write!(
            f,
            ":{}->{}/{}",
            self.host_port, self.container_port, self.protocol
        )
    }
}

impl PortMap {
    /// Parses one `-p` value. A missing host port gets a free one now, as docker picks one.
    pub fn parse(value: &str) -> Result<PortMap, Error> {
        let bad = |why: &str| Error::Publish {
            value: value.to_owned(),
            why: why.to_owned(),
        };
        let (spec, protocol) = match value.rsplit_once('/') {
            Some((s, "tcp")) => (s, Protocol::Tcp),
            Some((s, "udp")) => (s, Protocol::Udp),
            Some((_, p)) => return Err(bad(&format!("unknown protocol {p:?} (tcp or udp)"))),
            None => (value, Protocol::Tcp),
        };
        // An IPv6 host address comes in brackets: [::1]:8080:80.
        let (host_ip, rest) = match spec.strip_prefix('[') {
            Some(s) => {
                let (ip, rest) = s.split_once("]:").ok_or_else(|| bad("unclosed '['"))?;
                let ip: IpAddr = ip
                    .parse()
                    .map_err(|_| bad(&format!("{ip:?} is not an IP address")))?;
                (Some(ip), rest)
            }
            None => {
                let parts: Vec<&str> = spec.split(':').collect();
                match parts.len() {
                    1 | 2 => (None, spec),
                    3 => {
                        let ip = if parts[0].is_empty() {
                            None
                        } else {
                            Some(parts[0].parse::<IpAddr>().map_err(|_| {
                                bad(&format!("{:?} is not an IP address", parts[0]))
                            })?)
                        };
                        (ip, &spec[parts[0].len() + 1..])
                    }
                    _ => return Err(bad("expected [IP:][HOST_PORT:]CONTAINER_PORT[/PROTOCOL]")),
                }
            }
        };
        let port = |s: &str, what: &str| -> Result<u16, Error> {
            if s.contains('-') {
                return Err(bad("port ranges are not supported; publish each port"));
            }
            match s.parse::<u16>() {
                Ok(p) if p > 0 => Ok(p),
                _ => Err(bad(&format!("{what} {s:?} is not a port number (1-65535)"))),
            }
        };
        let (host_port, container_port) = match rest.split_once(':') {
            Some(("", c)) => (None, port(c, "container port")?),
            Some((h, c)) => (Some(port(h, "host port")?), port(c, "container port")?),
            None => (None, port(rest, "container port")?),
        };
        let mut map = PortMap {
            host_ip,
            host_port: host_port.unwrap_or(0),
            container_port,
            protocol,
        };
        if host_port.is_none() {
            map.host_port = map.free_port()?;
        }
        Ok(map)
    }

    fn bind_addr(&self, port: u16) -> SocketAddr {
        SocketAddr::new(
            self.host_ip.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
            port,
        )
    }

    /// A port the kernel hands out now for this protocol and address.
    fn free_port(&self) -> Result<u16, Error> {
        let addr = self.bind_addr(0);
        let port = match self.protocol {
            Protocol::Tcp => TcpListener::bind(addr).and_then(|l| l.local_addr()),
            Protocol::Udp => UdpSocket::bind(addr).and_then(|s| s.local_addr()),
        };
        port.map(|a| a.port()).map_err(|e| Error::Publish {
            value: self.to_string(),
            why: format!("cannot pick a free host port: {e}"),
        })
    }

    /// Fails when the host port cannot be bound now: in use, or privileged without the right.
    pub fn check_available(&self) -> Result<(), Error> {
        let addr = self.bind_addr(self.host_port);
        let bound = match self.protocol {
            Protocol::Tcp => TcpListener::bind(addr).map(drop),
            Protocol::Udp => UdpSocket::bind(addr).map(drop),
        };
        bound.map_err(|e| {
            let why = match e.kind() {
                std::io::ErrorKind::AddrInUse => "the host port is already in use".to_string(),
                std::io::ErrorKind::PermissionDenied => format!(
                    "binding host port {} needs root or CAP_NET_BIND_SERVICE",
                    self.host_port
                ),
                std::io::ErrorKind::AddrNotAvailable => {
                    "the host has no such address to bind".to_string()
                }
                _ => e.to_string(),
            };
            Error::Publish {
                value: self.to_string(),
                why,
            }
        })
    }

    /// passt's port forwarding spec: `[ADDR/]HOST:CONTAINER`.
    pub fn passt_spec(&self) -> String {
        match self.host_ip {
            Some(ip) => format!("{ip}/{}:{}", self.host_port, self.container_port),
            None => format!("{}:{}", self.host_port, self.container_port),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> PortMap {
        PortMap::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn docker_spellings_parse() {
        let m = p("8080:80");
        assert_eq!((m.host_ip, m.host_port, m.container_port), (None, 8080, 80));
        assert_eq!(m.protocol, Protocol::Tcp);
        let m = p("127.0.0.1:5353:53/udp");
        assert_eq!(m.host_ip, Some("127.0.0.1".parse().unwrap()));
        assert_eq!((m.host_port, m.container_port), (5353, 53));
        assert_eq!(m.protocol, Protocol::Udp);
        assert_eq!(m.passt_spec(), "127.0.0.1/5353:53");
        assert_eq!(m.to_string(), "127.0.0.1:5353->53/udp");
        let m = p("[::1]:8443:443/tcp");
        assert_eq!(m.host_ip, Some("::1".parse().unwrap()));
        assert_eq!(m.to_string(), "[::1]:8443->443/tcp");
        let m = p("0.0.0.0:9000:9000");
        assert_eq!(m.to_string(), "0.0.0.0:9000->9000/tcp");
    }

    #[test]
    fn a_missing_host_port_is_picked() {
        let m = p("80");
        assert!(m.host_port > 0);
        assert_eq!(m.container_port, 80);
        let m = p("127.0.0.1::81/udp");
        assert!(m.host_port > 0);
        assert_eq!(m.container_port, 81);
    }

    #[test]
    fn bad_values_say_what_is_wrong() {
        for (v, words) in [
            ("", "not a port number"),
            ("http", "not a port number"),
            ("0:80", "not a port number"),
            ("70000:80", "not a port number"),
            ("8080:80/sctp", "unknown protocol"),
            ("8000-8010:80-90", "ranges are not supported"),
            ("a.b.c.d:80:80", "not an IP address"),
            ("[::1:80:80", "unclosed"),
            ("1:2:3:4", "expected [IP:]"),
        ] {
            let e = PortMap::parse(v).unwrap_err().to_string();
            assert!(e.contains(words), "{v}: {e}");
            assert!(e.contains(&format!("{v:?}")), "{v}: {e}");
        }
    }

    #[test]
    fn a_port_in_use_is_refused() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let e = p(&format!("127.0.0.1:{port}:80"))
            .check_available()
            .unwrap_err();
        assert!(e.to_string().contains("already in use"), "{e}");
        drop(l);
        p(&format!("127.0.0.1:{port}:80"))
            .check_available()
            .unwrap();
    }
}
