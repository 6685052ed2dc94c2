//! virtio-net on this host's KVM: the bare-metal test guest (`mode=net`) drives the device
//! through virtio-mmio, sends a broadcast frame, waits for a reply and echoes it back. The VMM is
//! driven as a library; the test plays the host's side of the network: a passt-style stream
//! socket, or (as root) a tap in a network namespace of its own.

mod common;

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use microvm::backend::VmEnd;
use microvm::devices::virtio::net::backend::Sent;
use microvm::devices::virtio::net::tap;
use microvm::plan::{Console, NetBackend, NetPlan, SharedFd, VmPlan};
use microvm::vmm::Vm;

const WAIT: Duration = Duration::from_secs(25);
const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0xab, 0xcd, 0x01];
const HOST_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x02];
const ETHERTYPE: [u8; 2] = [0x88, 0xb5];
const HELLO: &[u8] = b"hello from the guest";
const REPLY: &[u8] = b"hello from the host";

fn plan(dir: &Path, backend: NetBackend) -> VmPlan {
    VmPlan {
        kernel: guest("pvh.elf"),
        initrd: Vec::new(),
        cmdline: "mode=net".into(),
        cpus: 1,
        memory_mib: 64,
        timeout: Some(Duration::from_secs(30)),
        console: Console::File(dir.join("console.log")),
        vsock: None,
        disks: Vec::new(),
        shares: Vec::new(),
        net: Some(NetPlan {
            mac: GUEST_MAC,
            mtu: 1500,
            backend,
        }),
    }
}

/// Builds and runs the VM; returns how it ended and its console output.
fn run(plan: &VmPlan) -> (Result<VmEnd, String>, String) {
    let vm = Vm::build(plan).unwrap_or_else(|e| panic!("building the VM: {e}"));
    let end = vm.run().map_err(|e| e.to_string());
    let Console::File(log) = &plan.console else {
        unreachable!()
    };
    (end, std::fs::read_to_string(log).unwrap())
}

fn mac_str(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// An Ethernet frame of our test protocol.
fn eth(dst: &[u8; 6], src: &[u8; 6], payload: &[u8]) -> Vec<u8> {
    let mut f = dst.to_vec();
    f.extend_from_slice(src);
    f.extend_from_slice(&ETHERTYPE);
    f.extend_from_slice(payload);
    f
}

/// Checks a frame from the guest: to `dst`, from the guest's MAC, our ethertype, `payload`.
fn check_guest_frame(f: &[u8], dst: &[u8; 6], payload: &[u8]) -> Result<(), String> {
    if f.len() < 14 {
        return Err(format!("a {}-byte frame", f.len()));
    }
    let (d, s, t, p) = (&f[..6], &f[6..12], &f[12..14], &f[14..]);
    if d != dst || s != GUEST_MAC || t != ETHERTYPE || p != payload {
        return Err(format!(
            "unexpected frame dst={} src={} type={:02x}{:02x} payload={:?}",
            mac_str(d),
            mac_str(s),
            t[0],
            t[1],
            String::from_utf8_lossy(p)
        ));
    }
    Ok(())
}

fn read_framed(s: &mut UnixStream) -> Result<Vec<u8>, String> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len)
        .map_err(|e| format!("reading a length: {e}"))?;
    let mut f = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut f)
        .map_err(|e| format!("reading a frame: {e}"))?;
    Ok(f)
}

fn accept(listener: &UnixListener) -> Result<UnixStream, String> {
    listener.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).unwrap();
                s.set_read_timeout(Some(WAIT)).unwrap();
                return Ok(s);
            }
            Err(_) if Instant::now() < deadline => thread::sleep(Duration::from_millis(10)),
            Err(e) => return Err(format!("the VMM never connected: {e}")),
        }
    }
}

/// passt's side: takes the guest's frame, answers in awkward pieces (the length prefix split,
/// the body split), takes the echo, then waits for the VMM to hang up.
fn serve_stream(mut s: UnixStream) -> Result<(), String> {
    check_guest_frame(&read_framed(&mut s)?, &[0xff; 6], HELLO)?;
    let reply = eth(&GUEST_MAC, &HOST_MAC, REPLY);
    let mut wire = (reply.len() as u32).to_be_bytes().to_vec();
    wire.extend_from_slice(&reply);
    for piece in [&wire[..2], &wire[2..9], &wire[9..]] {
        s.write_all(piece).map_err(|e| e.to_string())?;
        thread::sleep(Duration::from_millis(20));
    }
    check_guest_frame(&read_framed(&mut s)?, &HOST_MAC, REPLY)?;
    let mut rest = Vec::new();
    s.read_to_end(&mut rest)
        .map_err(|e| format!("waiting for the VMM to hang up: {e}"))?;
    if !rest.is_empty() {
        return Err(format!("{} unexpected bytes after the echo", rest.len()));
    }
    Ok(())
}

fn assert_guest_exchanged(console: &str) {
    let run = Run {
        code: Some(0),
        stderr: console.to_string(),
    };
    assert_eq!(
        run.line("net: device at"),
        format!(
            "net: device at 0xd0000000 mac={} status=1 mtu=1500 mrg_rxbuf=1",
            mac_str(&GUEST_MAC)
        )
    );
    assert_eq!(run.line("net: sent"), "net: sent hello from the guest");
    assert_eq!(
        run.line("net: got"),
        format!(
            "net: got hello from the host from {} num_buffers=1",
            mac_str(&HOST_MAC)
        )
    );
    assert_eq!(run.line("net: echoed"), "net: echoed hello from the host");
    assert_eq!(run.lines("done").len(), 1, "{console}");
}

#[test]
fn bare_metal_guest_exchanges_frames_over_a_stream_backend() {
    if !kvm_or_skip("bare_metal_guest_exchanges_frames_over_a_stream_backend") {
        return;
    }
    let dir = temp_dir("net-stream");
    let socket = dir.0.join("passt.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    let server = thread::spawn(move || serve_stream(accept(&listener)?));
    let (end, console) = run(&plan(&dir.0, NetBackend::Stream { socket }));
    let served = server.join().unwrap();
    assert_eq!(end, Ok(VmEnd::GuestStopped), "{console}");
    assert_eq!(served, Ok(()), "{console}");
    assert_guest_exchanged(&console);
}

#[test]
fn bare_metal_guest_exchanges_frames_over_a_socket_pair_handed_over() {
    if !kvm_or_skip("bare_metal_guest_exchanges_frames_over_a_socket_pair_handed_over") {
        return;
    }
    let dir = temp_dir("net-pair");
    let (ours, theirs) = UnixStream::pair().unwrap();
    theirs.set_read_timeout(Some(WAIT)).unwrap();
    let server = thread::spawn(move || serve_stream(theirs));
    let shared = SharedFd(Arc::new(OwnedFd::from(ours)));
    let p = plan(&dir.0, NetBackend::Connected(shared));
    let (end, console) = run(&p);
    // The plan's copy too, so that the server sees the end of the stream.
    drop(p);
    let served = server.join().unwrap();
    assert_eq!(end, Ok(VmEnd::GuestStopped), "{console}");
    assert_eq!(served, Ok(()), "{console}");
    assert_guest_exchanged(&console);
}

#[test]
fn the_backend_closing_its_socket_stops_the_vm_with_a_clear_error() {
    if !kvm_or_skip("the_backend_closing_its_socket_stops_the_vm_with_a_clear_error") {
        return;
    }
    let dir = temp_dir("net-hangup");
    let socket = dir.0.join("passt.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    // Takes the guest's frame, then goes away while the guest waits for a reply.
    let server = thread::spawn(move || -> Result<(), String> {
        let mut s = accept(&listener)?;
        check_guest_frame(&read_framed(&mut s)?, &[0xff; 6], HELLO)
    });
    let started = Instant::now();
    let (end, console) = run(&plan(
        &dir.0,
        NetBackend::Stream {
            socket: socket.clone(),
        },
    ));
    assert_eq!(server.join().unwrap(), Ok(()), "{console}");
    let err = end.expect_err("the VM must fail");
    assert!(
        err.contains(&format!(
            "the network backend (passt) closed its socket {}",
            socket.display()
        )),
        "{err}"
    );
    // Stopped at once, not when the guest gave up waiting (10 s) or the VM timed out.
    assert!(started.elapsed() < Duration::from_secs(8), "{console}");
}

#[test]
fn a_missing_backend_is_refused_before_the_guest_runs() {
    if !kvm_or_skip("a_missing_backend_is_refused_before_the_guest_runs") {
        return;
    }
    let dir = temp_dir("net-missing");
    let socket = dir.0.join("nobody-listens.sock");
    let e = Vm::build(&plan(
        &dir.0,
        NetBackend::Stream {
            socket: socket.clone(),
        },
    ))
    .err()
    .expect("the VM was built")
    .to_string();
    assert!(e.contains(&socket.display().to_string()), "{e}");
    assert!(e.contains("is passt running?"), "{e}");
}

/// passt, if this host has it: the user-mode network stack the stream backend is made for.
fn passt_or_skip(test: &str) -> bool {
    let found = Command::new("passt")
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok();
    if !found {
        skip(test, "passt is not installed");
    }
    found
}

/// A passt process we started, killed (if still there) when dropped.
struct Passt(std::process::Child);

impl Drop for Passt {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn bare_metal_guest_resolves_an_address_through_real_passt() {
    const NAME: &str = "bare_metal_guest_resolves_an_address_through_real_passt";
    if !kvm_or_skip(NAME) || !passt_or_skip(NAME) {
        return;
    }
    let dir = temp_dir("net-passt");
    // passt run as root drops to nobody before it makes its socket.
    std::fs::set_permissions(&dir.0, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let socket = dir.0.join("passt.sock");
    // Foreground, one connection, quiet.
    let child = Command::new("passt")
        .args(["-f", "-1", "-q", "-s"])
        .arg(&socket)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("cannot run passt");
    let _passt = Passt(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "passt never made its socket");
        thread::sleep(Duration::from_millis(10));
    }
    let mut p = plan(&dir.0, NetBackend::Stream { socket });
    // TEST-NET-2: never the address passt gives the guest, so passt answers for it.
    p.cmdline = "mode=net arp=198.51.100.1".into();
    let (end, console) = run(&p);
    assert_eq!(end, Ok(VmEnd::GuestStopped), "{console}");
    let run = Run {
        code: Some(0),
        stderr: console.clone(),
    };
    let line = run.line("net: arp");
    assert!(
        line.starts_with("net: arp 198.51.100.1 is at "),
        "{console}"
    );
    assert!(!line.ends_with("00:00:00:00:00:00"), "{console}");
}

// ---- the tap backend, in a network namespace of the test's own (root only) ----

/// A network namespace with one tap in it, both removed when dropped.
struct Netns {
    name: String,
}

const TAP: &str = "mvtap0";

impl Netns {
    fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// `tag` tells apart the namespaces of tests running at once.
    fn create(tag: &str) -> Result<Self, String> {
        let ns = Netns {
            name: format!("microvm-{tag}-{}", std::process::id()),
        };
        let ip = |args: &[&str]| -> Result<(), String> {
            let o = Command::new("ip")
                .args(args)
                .output()
                .map_err(|e| format!("cannot run ip: {e}"))?;
            if !o.status.success() {
                return Err(format!(
                    "ip {}: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&o.stderr).trim()
                ));
            }
            Ok(())
        };
        ip(&["netns", "add", &ns.name])?;
        ip(&[
            "-n", &ns.name, "tuntap", "add", "mode", "tap", "vnet_hdr", "name", TAP,
        ])?;
        ip(&["-n", &ns.name, "link", "set", TAP, "up"])?;
        // No IPv6 chatter (router solicitations, MLD) on the tap; the guest would skip it anyway.
        let _ = ip(&[
            "netns",
            "exec",
            &ns.name,
            "sh",
            "-c",
            &format!("echo 1 > /proc/sys/net/ipv6/conf/{TAP}/disable_ipv6"),
        ]);
        Ok(ns)
    }

    /// Runs `f` on a thread inside the namespace (what it creates stays bound to it).
    fn enter<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let ns = std::fs::File::open(self.path()).unwrap();
        thread::spawn(move || {
            // SAFETY: setns only moves this short-lived thread into the namespace.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .unwrap()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Why the tap tests cannot run here, if they cannot.
fn tap_unavailable() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root (a network namespace and a tap)".into());
    }
    if !Path::new("/dev/net/tun").exists() {
        return Some("/dev/net/tun is missing".into());
    }
    if Command::new("ip").arg("-V").output().is_err() {
        return Some("the ip command (iproute2) is missing".into());
    }
    None
}

/// A raw socket on the tap for our ethertype, opened inside the namespace.
fn packet_socket(ns: &Netns) -> OwnedFd {
    ns.enter(|| {
        let proto = (u16::from_be_bytes(ETHERTYPE)).to_be();
        // SAFETY: plain socket creation; the fd is owned right below.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        // SAFETY: `fd` is a fresh socket nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let name = std::ffi::CString::new(TAP).unwrap();
        // SAFETY: `name` is a valid C string for the call.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        assert_ne!(ifindex, 0, "{TAP} not found");
        // SAFETY: sockaddr_ll is plain old data; zeros are a valid start.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto;
        sll.sll_ifindex = ifindex as i32;
        // SAFETY: the address is a valid sockaddr_ll of the length given.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
        let tv = libc::timeval {
            tv_sec: WAIT.as_secs() as libc::time_t,
            tv_usec: 0,
        };
        // SAFETY: SO_RCVTIMEO reads a timeval of the size given.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
        assert_eq!(rc, 0, "SO_RCVTIMEO: {}", std::io::Error::last_os_error());
        fd
    })
}

/// The next frame on the tap from the guest (our own transmissions are seen too: skipped).
fn recv_from_guest(fd: &OwnedFd) -> Result<Vec<u8>, String> {
    let mut buf = vec![0u8; 65536];
    loop {
        // SAFETY: `buf` is valid for writes of its length during the call.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(format!("recv: {}", std::io::Error::last_os_error()));
        }
        let f = &buf[..n as usize];
        if f.len() >= 12 && f[6..12] == GUEST_MAC {
            return Ok(f.to_vec());
        }
    }
}

fn serve_tap(fd: OwnedFd) -> Result<(), String> {
    check_guest_frame(&recv_from_guest(&fd)?, &[0xff; 6], HELLO)?;
    let reply = eth(&GUEST_MAC, &HOST_MAC, REPLY);
    // SAFETY: `reply` is valid for reads of its length during the call.
    let n = unsafe { libc::send(fd.as_raw_fd(), reply.as_ptr().cast(), reply.len(), 0) };
    if n != reply.len() as isize {
        return Err(format!("send: {}", std::io::Error::last_os_error()));
    }
    check_guest_frame(&recv_from_guest(&fd)?, &HOST_MAC, REPLY)
}

#[test]
fn bare_metal_guest_exchanges_frames_through_a_tap_in_a_namespace() {
    const NAME: &str = "bare_metal_guest_exchanges_frames_through_a_tap_in_a_namespace";
    if !kvm_or_skip(NAME) {
        return;
    }
    if let Some(why) = tap_unavailable() {
        skip(NAME, &why);
        return;
    }
    let ns = Netns::create("vm").unwrap_or_else(|e| panic!("setting up the namespace: {e}"));
    let sock = packet_socket(&ns);
    let server = thread::spawn(move || serve_tap(sock));
    let dir = temp_dir("net-tap");
    let (end, console) = run(&plan(
        &dir.0,
        NetBackend::Tap {
            name: TAP.into(),
            netns: Some(ns.path()),
        },
    ));
    let served = server.join().unwrap();
    assert_eq!(end, Ok(VmEnd::GuestStopped), "{console}");
    assert_eq!(served, Ok(()), "{console}");
    assert_guest_exchanged(&console);
}

#[test]
fn a_tap_opens_only_in_its_own_namespace_and_takes_offloads() {
    const NAME: &str = "a_tap_opens_only_in_its_own_namespace_and_takes_offloads";
    if let Some(why) = tap_unavailable() {
        skip(NAME, &why);
        return;
    }
    let ns = Netns::create("open").unwrap_or_else(|e| panic!("setting up the namespace: {e}"));
    // In its own: non-blocking, and the offloads a virtio-net guest may take.
    let fd = tap::open(TAP, Some(&ns.path())).unwrap();
    // SAFETY: F_GETFL on a valid fd.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    assert_ne!(flags & libc::O_NONBLOCK, 0);
    let offloads = tap::supported_offloads(std::os::fd::AsFd::as_fd(&fd));
    let want = libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6;
    assert_eq!(offloads & want, want, "offloads {offloads:#x}");
    tap::set_offload(std::os::fd::AsFd::as_fd(&fd), libc::TUN_F_CSUM).unwrap();
    // Someone else holding it: a clear refusal.
    let e = tap::open(TAP, Some(&ns.path())).unwrap_err().to_string();
    assert!(e.contains("another process already has it open"), "{e}");
    drop(fd);

    // A tap deleted under the device is reported, not spun on.
    let mut t = tap::Tap::new(tap::open(TAP, Some(&ns.path())).unwrap(), TAP);
    let mut packet = vec![0u8; 12];
    packet.extend_from_slice(&eth(&[0xff; 6], &GUEST_MAC, HELLO));
    assert!(matches!(t.send(&packet), Ok(Sent::Done)));
    assert!(matches!(t.rx_frame(), Ok(None)));
    let o = Command::new("ip")
        .args(["-n", &ns.name, "link", "del", TAP])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let e = t.rx_frame().expect_err("reading a deleted tap");
    assert!(e.contains("was it deleted?"), "{e}");
    let e = t.send(&packet).expect_err("writing to a deleted tap");
    assert!(e.contains("was it deleted?"), "{e}");

    // A tap that is not there is made in the namespace, and goes with its descriptor: a VM
    // that dies leaves none behind.
    let fd = tap::open("mvnew0", Some(&ns.path())).unwrap();
    let links = || {
        let o = Command::new("ip")
            .args(["-n", &ns.name, "-o", "link"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    assert!(links().contains("mvnew0"), "{}", links());
    drop(fd);
    assert!(!links().contains("mvnew0"), "{}", links());
}
