//! Networking through the real stack (the `qemu` backend's virtio-net, the real kernel and
//! agent, passt, iproute2): outbound HTTP to a server on the host and by name through DNS,
//! published TCP and UDP ports, `--network none`, two containers talking through a published
//! port, a network namespace with a veth made the way engines make it, what a killed microvm
//! leaves behind (nothing), and the bad input refused before anything starts. UDP: DNS queries
//! from the guest, and iperf3 through a published UDP port both ways.

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn images() -> &'static (PathBuf, PathBuf) {
    test_images("network")
}

/// The image with every busybox applet (wget, httpd, nc, nslookup, ip).
fn image() -> String {
    format!("oci:{}", images().0.join("box").display())
}

fn cmd(args: &[&str]) -> Command {
    let mut c = microvm();
    c.args(args)
        .env("MICROVM_ROOT", &images().1)
        .env("MICROVM_HYPERVISOR", "qemu")
        .stdin(Stdio::null());
    c
}

fn mv(args: &[&str]) -> Output {
    cmd(args).output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `run --rm --timeout 300 --kernel K [flags] box sh -c SCRIPT`.
fn run(kernel: &Path, flags: &[&str], script: &str) -> Output {
    let k = kernel.to_str().unwrap();
    let mut args = vec!["run", "--rm", "--timeout", "300", "--kernel", k];
    args.extend_from_slice(flags);
    let img = image();
    args.extend([img.as_str(), "sh", "-c", script]);
    mv(&args)
}

fn assert_ok(o: &Output) -> String {
    assert_eq!(
        o.status.code(),
        Some(0),
        "stdout: {}\nstderr: {}",
        text(&o.stdout),
        text(&o.stderr)
    );
    text(&o.stdout)
}

/// Removes the named containers when dropped.
struct Cleanup(Vec<String>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let mut args = vec!["rm", "-f"];
        args.extend(self.0.iter().map(String::as_str));
        let _ = cmd(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// A DNS server on `addr` (UDP) that answers A queries for `name` with `ip`, other types of
/// `name` with no record, and other names with NXDOMAIN: the name the test resolves locally.
fn dns_server(addr: &str, name: &'static str, ip: [u8; 4]) -> std::io::Result<()> {
    let sock = UdpSocket::bind(addr)?;
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        while let Ok((n, from)) = sock.recv_from(&mut buf) {
            let q = &buf[..n];
            if n < 17 {
                continue;
            }
            // The question: labels from byte 12 to a zero length, then type and class.
            let mut i = 12;
            let mut labels = Vec::new();
            while i < n && q[i] != 0 {
                let len = q[i] as usize;
                labels.push(text(&q[i + 1..(i + 1 + len).min(n)]));
                i += 1 + len;
            }
            let end = (i + 5).min(n);
            let qtype = u16::from_be_bytes([q[end - 4], q[end - 3]]);
            let known = labels.join(".").eq_ignore_ascii_case(name);
            let found = known && qtype == 1;
            let mut r = q[..end].to_vec();
            r[2] = 0x81; // response, recursion desired
                         // Recursion available; NXDOMAIN for other names (a known name without an address
                         // of that type: no error, no answer).
            r[3] = if known { 0x80 } else { 0x83 };
            r[6..8].copy_from_slice(&u16::from(found).to_be_bytes());
            r[8..12].fill(0);
            if found {
                r.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
                r.extend_from_slice(&ip);
            }
            let _ = sock.send_to(&r, from);
        }
    });
    Ok(())
}

/// GETs `url` from the host until it answers with `want` in the body (the server in the guest
/// may still be starting), for up to two minutes.
fn fetch_until(addr: &str, want: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut last = String::new();
    while Instant::now() < deadline {
        if let Ok(mut s) = TcpStream::connect(addr) {
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let _ = write!(s, "GET / HTTP/1.0\r\nHost: x\r\n\r\n");
            let mut got = String::new();
            let _ = s.read_to_string(&mut got);
            if got.contains(want) {
                return got;
            }
            last = got;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("{addr} never served {want:?}; last answer: {last:?}");
}

/// A script that serves `body` with busybox httpd on port 80 in the foreground.
fn httpd_script(body: &str) -> String {
    format!("mkdir -p /www && echo {body} > /www/index.html && exec httpd -f -p 80 -h /www")
}

/// `run -d --name NAME [flags] box sh -c SCRIPT`.
fn run_detached(kernel: &Path, name: &str, flags: &[&str], script: &str) {
    let k = kernel.to_str().unwrap();
    let mut args = vec!["run", "-d", "--name", name, "--kernel", k];
    args.extend_from_slice(flags);
    let img = image();
    args.extend([img.as_str(), "sh", "-c", script]);
    assert_ok(&mv(&args));
}

#[test]
fn outbound_http_to_the_host_and_a_name_through_dns() {
    let Some(kernel) = kernel_or_skip("outbound_http_to_the_host_and_a_name_through_dns") else {
        return;
    };
    // The host is reached at its own addresses (both families: the server is dual-stack), as
    // from docker's bridge; what it serves on its loopback only stays out of reach.
    let port = http_server("[::]:0", "served-by-the-host");
    let lo_port = http_server("127.0.0.1:0", "loopback-only");
    let host_ip = host_address();
    let host_v4: Vec<u8> = host_ip.split('.').map(|o| o.parse().unwrap()).collect();
    // The host's resolver, as passt forwards to it, is the test's: microvm runs in a mount
    // namespace whose /etc/resolv.conf names a DNS server of the test on 127.0.0.2.
    let answer = [host_v4[0], host_v4[1], host_v4[2], host_v4[3]];
    if let Err(e) = dns_server("127.0.0.2:53", "files.microvm.test", answer) {
        skip(
            "outbound_http_to_the_host_and_a_name_through_dns",
            &format!("cannot bind the test's DNS server on 127.0.0.2:53: {e}"),
        );
        return;
    }
    // ICMP goes out through passt's ICMP sockets, which the host allows only to the groups in
    // net.ipv4.ping_group_range (none by default on Debian): opened for this test, as the
    // README tells users to.
    let _ping = PingGroups::allow_all();
    let v6 = match host_address6() {
        Some(a) => format!(
            "if ip -6 addr show eth0 | grep -q fd00:a:2::15; then \
                 wget -q -O - http://[{a}]:{port}/over-ipv6; echo; else echo no-ipv6; fi"
        ),
        None => "echo no-ipv6".into(),
    };
    let dir = temp_dir("net-dns");
    let resolv = dir.0.join("resolv.conf");
    std::fs::write(&resolv, "nameserver 127.0.0.2\nsearch microvm.test\n").unwrap();
    let script = format!(
        "set -e; ip -o addr show eth0; cat /etc/resolv.conf; \
         wget -q -O - http://{host_ip}:{port}/file; echo; \
         nslookup files.microvm.test; \
         wget -q -O - http://files.microvm.test:{port}/by-name; echo; \
         wget -q -O - http://files:{port}/by-search-domain; echo; \
         {v6}; \
         wget -q -T 5 -O - http://10.0.2.2:{lo_port}/ || echo gateway-is-not-the-host; \
         wget -q -T 5 -O - http://{host_ip}:{lo_port}/ || echo loopback-stays-closed; \
         ping -c 2 {host_ip} | grep -c 'bytes from'"
    );
    let k = kernel.to_str().unwrap().to_string();
    let img = image();
    let inner = [
        env!("CARGO_BIN_EXE_microvm"),
        "run",
        "--rm",
        "--timeout",
        "300",
        "--kernel",
        &k,
        &img,
        "sh",
        "-c",
        &script,
    ];
    let o = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(format!(
            "mount --bind {} /etc/resolv.conf && exec \"$@\"",
            resolv.display()
        ))
        .arg("sh")
        .args(inner)
        .env("MICROVM_ROOT", &images().1)
        .env("MICROVM_HYPERVISOR", "qemu")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let out = assert_ok(&o);
    assert!(out.contains("inet 10.0.2.15/24"), "{out}");
    assert!(out.contains("nameserver 10.0.2.3"), "{out}");
    assert!(out.contains("search microvm.test"), "{out}");
    assert!(out.contains(&format!("Address: {host_ip}")), "{out}");
    assert!(!out.contains("loopback-only"), "{out}");
    assert!(out.contains("gateway-is-not-the-host"), "{out}");
    assert!(out.contains("loopback-stays-closed"), "{out}");
    assert!(out.trim_end().ends_with('2'), "both pings answered: {out}");
    // Over IPv6 too where the host has an IPv6 default route (and so the guest an address).
    let host_v6 = std::fs::read_to_string("/proc/net/ipv6_route")
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("00000000000000000000000000000000 00 ") && !l.ends_with(" lo"));
    let count = out.matches("served-by-the-host").count();
    let (want, n) = if host_v6 && host_address6().is_some() {
        ("served-by-the-host", 4)
    } else {
        ("no-ipv6", 3)
    };
    assert_eq!(count, n, "{out}");
    assert!(out.contains(want), "{out}");
}

/// Widens net.ipv4.ping_group_range to every group while it lives, then puts it back.
struct PingGroups(String);

impl PingGroups {
    const PATH: &'static str = "/proc/sys/net/ipv4/ping_group_range";

    fn allow_all() -> PingGroups {
        let old = std::fs::read_to_string(Self::PATH).unwrap();
        std::fs::write(Self::PATH, "0 2147483647").unwrap();
        PingGroups(old)
    }
}

impl Drop for PingGroups {
    fn drop(&mut self) {
        let _ = std::fs::write(Self::PATH, self.0.trim().replace('\t', " "));
    }
}

#[test]
fn a_published_port_serves_from_the_guest_and_ps_shows_it() {
    let Some(kernel) = kernel_or_skip("a_published_port_serves_from_the_guest_and_ps_shows_it")
    else {
        return;
    };
    let name = "net-httpd";
    let _c = Cleanup(vec![name.into()]);
    run_detached(
        &kernel,
        name,
        &["-p", "18080:80"],
        &httpd_script("hello-from-the-guest"),
    );
    let got = fetch_until("127.0.0.1:18080", "hello-from-the-guest");
    assert!(got.starts_with("HTTP/1."), "{got}");

    let ps = assert_ok(&mv(&["ps"]));
    let line = ps.lines().find(|l| l.contains(name)).unwrap_or_default();
    assert!(line.contains("0.0.0.0:18080->80/tcp"), "{ps}");
    let v: serde_json::Value = serde_json::from_str(&assert_ok(&mv(&["inspect", name]))).unwrap();
    let net = &v[0]["NetworkSettings"];
    assert_eq!(net["IPAddress"], "10.0.2.15", "{net}");
    assert_eq!(net["Gateway"], "10.0.2.2", "{net}");
    assert_eq!(net["MacAddress"], "52:54:00:12:34:56", "{net}");
    assert_eq!(net["Ports"]["80/tcp"][0]["HostPort"], "18080", "{net}");

    // A second container reaches the first through its published port on the host's address.
    let o = run(
        &kernel,
        &[],
        &format!(
            "wget -q -O - http://{}:18080/ && echo fetched",
            host_address()
        ),
    );
    let out = assert_ok(&o);
    assert!(out.contains("hello-from-the-guest"), "{out}");

    // The port is taken while the container runs: a second -p of it fails at once.
    let o = run(&kernel, &["-p", "18080:80"], "true");
    assert_eq!(o.status.code(), Some(125), "{}", text(&o.stderr));
    let err = text(&o.stderr);
    assert!(err.contains("already in use"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

/// The iperf3 image (bench/make-iperf-image.sh), made once; `None` after a loud skip line when
/// this host has no iperf3.
fn iperf_image(test: &str) -> Option<String> {
    static MADE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let made = *MADE.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/make-iperf-image.sh");
        Command::new("bash")
            .arg(script)
            .arg(&images().0)
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    if !made {
        skip(
            test,
            "cannot build the iperf3 image (install iperf3 and umoci: scripts/setup-host)",
        );
        return None;
    }
    Some(format!("oci:{}", images().0.join("iperf").display()))
}

/// Packets the receiving end counted, from iperf3's JSON of a UDP test.
fn udp_packets(json: &str) -> u64 {
    let v: serde_json::Value =
        serde_json::from_str(json).unwrap_or_else(|e| panic!("iperf3 JSON: {e}: {json}"));
    let sum = &v["end"]["sum"];
    let sent = sum["packets"].as_u64().unwrap_or(0);
    sent.saturating_sub(sum["lost_packets"].as_u64().unwrap_or(sent))
}

#[test]
fn udp_goes_both_ways_through_a_published_port() {
    let test = "udp_goes_both_ways_through_a_published_port";
    let Some(kernel) = kernel_or_skip(test) else {
        return;
    };
    let Some(image) = iperf_image(test) else {
        return;
    };
    let name = "net-udp";
    let _c = Cleanup(vec![name.into()]);
    // iperf3's server in the guest: its control connection over TCP, the datagrams over UDP,
    // both published on 18081.
    let k = kernel.to_str().unwrap();
    assert_ok(&mv(&[
        "run",
        "-d",
        "--name",
        name,
        "--kernel",
        k,
        "-p",
        "18081:81/tcp",
        "-p",
        "18081:81/udp",
        &image,
        "iperf3",
        "-s",
        "-p",
        "81",
    ]));
    // From the host's own address, as from another machine.
    let host = host_address();
    for reverse in [false, true] {
        let deadline = Instant::now() + Duration::from_secs(120);
        let json = loop {
            let mut c = Command::new("iperf3");
            c.args([
                "-c", &host, "-p", "18081", "-u", "-b", "1M", "-t", "1", "-J",
            ]);
            if reverse {
                c.arg("-R");
            }
            let o = c.output().unwrap();
            let out = text(&o.stdout);
            // passt accepts for the guest before its server listens: that try ends in an error
            // in the JSON (and, with iperf3 3.12, a zero exit).
            if o.status.success() && !out.contains("\"error\"") {
                break out;
            }
            // The server in the guest may still be starting.
            assert!(
                Instant::now() < deadline,
                "iperf3 never got through: {}",
                text(&o.stdout)
            );
            std::thread::sleep(Duration::from_millis(500));
        };
        let got = udp_packets(&json);
        assert!(got > 0, "no datagram arrived (reverse: {reverse}): {json}");
    }
}

#[test]
fn network_none_has_only_loopback() {
    let Some(kernel) = kernel_or_skip("network_none_has_only_loopback") else {
        return;
    };
    let out = assert_ok(&run(
        &kernel,
        &["--network", "none"],
        "ip -o link | cut -d: -f2; ip -o addr show lo",
    ));
    let links: Vec<&str> = out.lines().filter(|l| !l.contains("inet")).collect();
    assert_eq!(links, vec![" lo"], "{out}");
    assert!(out.contains("inet 127.0.0.1/8"), "{out}");
    assert!(out.contains("inet6 ::1/128"), "{out}");
}

#[test]
fn bad_network_input_is_one_line_and_125() {
    let Some(kernel) = kernel_or_skip("bad_network_input_is_one_line_and_125") else {
        return;
    };
    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = format!("127.0.0.1:{}:80", busy.local_addr().unwrap().port());
    let empty = temp_dir("net-no-passt");
    for (flags, words, path) in [
        (vec!["-p", "80:http"], "not a port number", None),
        (vec!["-p", "8000-8010:80"], "ranges are not supported", None),
        (vec!["-p", busy.as_str()], "already in use", None),
        (vec!["--network", "host"], "cannot share the host", None),
        (
            vec!["--network", "ns:/nonexistent/ns"],
            "no such network namespace",
            None,
        ),
        (
            vec!["--network", "none", "-p", "80"],
            "needs the default network",
            None,
        ),
        (vec![], "apt-get install passt", Some(empty.0.clone())),
    ] {
        let mut c = cmd(&["run", "--rm", "--kernel", kernel.to_str().unwrap()]);
        c.args(&flags).args([image().as_str(), "true"]);
        if let Some(p) = &path {
            // No passt anywhere: an empty PATH and HOME.
            c.env("PATH", p).env("HOME", p);
        }
        let o = c.output().unwrap();
        let err = text(&o.stderr);
        assert_eq!(o.status.code(), Some(125), "{flags:?}: {err}");
        assert!(err.contains(words), "{flags:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{flags:?}: {err}");
    }
}

/// The pids of passt processes whose parent is `pid`.
fn passt_children(pid: u32) -> Vec<u32> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        let Some((_, rest)) = stat.rsplit_once(") ") else {
            continue;
        };
        let ppid: u32 = rest
            .split(' ')
            .nth(1)
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        if ppid == pid && stat.contains("(passt") {
            found.push(e.file_name().to_string_lossy().parse().unwrap());
        }
    }
    found
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| !s.rsplit_once(") ").is_some_and(|(_, r)| r.starts_with('Z')))
}

#[test]
fn a_killed_microvm_leaves_no_passt() {
    let Some(kernel) = kernel_or_skip("a_killed_microvm_leaves_no_passt") else {
        return;
    };
    let k = kernel.to_str().unwrap().to_string();
    let img = image();
    let mut child = cmd(&["run", "--rm", "--kernel", &k, &img, "sleep", "600"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let passt = loop {
        let p = passt_children(child.id());
        if !p.is_empty() {
            break p;
        }
        assert!(Instant::now() < deadline, "microvm never started passt");
        std::thread::sleep(Duration::from_millis(50));
    };
    // Let the VM connect and boot a little, then kill microvm outright.
    std::thread::sleep(Duration::from_secs(2));
    child.kill().unwrap();
    child.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while passt.iter().any(|p| alive(*p)) {
        assert!(
            Instant::now() < deadline,
            "passt {passt:?} outlived microvm"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_namespace_with_a_veth_is_taken_over_by_the_guest() {
    let test = "a_namespace_with_a_veth_is_taken_over_by_the_guest";
    let Some(kernel) = kernel_or_skip(test) else {
        return;
    };
    let Some(ns) = EngineNetns::make("veth", 231) else {
        skip(
            test,
            "cannot make a network namespace with a veth here (needs root and iproute2)",
        );
        return;
    };
    let port = http_server("10.231.0.1:0", "reached-the-namespace-peer");
    let name = "net-ns";
    let _c = Cleanup(vec![name.into()]);
    let netns = format!("ns:{}", ns.path());
    let script = format!(
        "ip -o addr show eth0; ip route; wget -q -O - http://10.231.0.1:{port}/; echo; {}",
        httpd_script("served-through-the-veth")
    );
    run_detached(&kernel, name, &["--network", &netns], &script);
    // The engine's side reaches the guest at the veth's address.
    let got = fetch_until("10.231.0.2:80", "served-through-the-veth");
    assert!(got.starts_with("HTTP/1."), "{got}");
    let logs = text(&mv(&["logs", name]).stdout);
    assert!(logs.contains("inet 10.231.0.2/24"), "{logs}");
    assert!(logs.contains("default via 10.231.0.1"), "{logs}");
    assert!(logs.contains("reached-the-namespace-peer"), "{logs}");
    let v: serde_json::Value = serde_json::from_str(&assert_ok(&mv(&["inspect", name]))).unwrap();
    assert_eq!(v[0]["NetworkSettings"]["IPAddress"], "10.231.0.2");
    assert!(ns.links().contains("microvm-tap0"), "{}", ns.links());
    assert_ok(&mv(&["stop", name]));
    // The tap went with the VM, and the veth's redirect with the run: the veth is the
    // engine's again.
    let qdiscs = Command::new("ip")
        .args([
            "netns", "exec", &ns.name, "tc", "qdisc", "show", "dev", "eth0",
        ])
        .output()
        .unwrap();
    let qdiscs = text(&qdiscs.stdout);
    assert!(!qdiscs.contains("ingress"), "{qdiscs}");
    let links = ns.links();
    assert!(!links.contains("microvm-tap0"), "{links}");
    assert!(links.contains("eth0"), "{links}");
}
