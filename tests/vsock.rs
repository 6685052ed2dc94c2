//! virtio-vsock on this host's KVM: the bare-metal test guest (`mode=vsock`) drives the device
//! through virtio-mmio, connects out to a host Unix socket and accepts a connection from the host
//! through the hybrid `CONNECT <port>` handshake.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::Stdio;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

const WAIT: Duration = Duration::from_secs(25);

fn read_line(s: &mut BufReader<UnixStream>) -> Result<String, String> {
    let mut line = String::new();
    s.read_line(&mut line).map_err(|e| format!("read: {e}"))?;
    Ok(line)
}

/// The host service on `<uds>_1234`: answers the guest's line, then waits for its close.
fn serve_guest(listener: UnixListener) -> Result<String, String> {
    listener.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + WAIT;
    let stream = loop {
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(_) if Instant::now() < deadline => thread::sleep(Duration::from_millis(10)),
            Err(e) => return Err(format!("the guest never connected: {e}")),
        }
    };
    stream.set_nonblocking(false).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    let line = read_line(&mut reader)?;
    writer
        .write_all(b"hello from host\n")
        .map_err(|e| e.to_string())?;
    let mut rest = Vec::new();
    reader
        .read_to_end(&mut rest)
        .map_err(|e| format!("waiting for the guest's close: {e}"))?;
    Ok(line)
}

/// A host process reaching guest port 5678 through `uds`: returns the OK line and the echo.
fn connect_to_guest(uds: &Path) -> Result<(String, String), String> {
    let stream = UnixStream::connect(uds).map_err(|e| format!("connect: {e}"))?;
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    writer
        .write_all(b"CONNECT 5678\n")
        .map_err(|e| e.to_string())?;
    let ok = read_line(&mut reader)?;
    writer
        .write_all(b"ping from host\n")
        .map_err(|e| e.to_string())?;
    let echo = read_line(&mut reader)?;
    let mut rest = Vec::new();
    reader
        .read_to_end(&mut rest)
        .map_err(|e| format!("waiting for the guest's close: {e}"))?;
    Ok((ok, echo))
}

#[test]
fn bare_metal_guest_talks_to_the_host_both_ways() {
    if !kvm_or_skip("bare_metal_guest_talks_to_the_host_both_ways") {
        return;
    }
    let dir = temp_dir("vsock");
    let uds = dir.0.join("v.sock");
    let listener = UnixListener::bind(dir.0.join("v.sock_1234")).unwrap();
    let (first_done, wait_first) = mpsc::channel();
    let guest_service = thread::spawn(move || {
        let r = serve_guest(listener);
        let _ = first_done.send(());
        r
    });

    let child = microvm()
        .args(["boot", "--kernel", guest("pvh.elf").to_str().unwrap()])
        .args(["--cmdline", "mode=vsock", "--timeout", "30"])
        .arg("--vsock-uds")
        .arg(&uds)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot run microvm");

    // The guest accepts only after its own connection is done.
    let uds_host = uds.clone();
    let host_client = thread::spawn(move || {
        wait_first
            .recv_timeout(WAIT)
            .map_err(|_| "the first exchange never finished".to_string())?;
        connect_to_guest(&uds_host)
    });

    let run = Run::from(child.wait_with_output().unwrap());
    let served = guest_service.join().unwrap();
    let client = host_client.join().unwrap();
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert_eq!(
        run.line("vsock: device"),
        "vsock: device at 0xd0000000 magic=ok version=2 id=19"
    );
    assert_eq!(run.line("vsock: ready"), "vsock: ready guest_cid=3");
    assert_eq!(
        served.as_deref(),
        Ok("hello from guest\n"),
        "{}",
        run.stderr
    );
    assert_eq!(run.line("vsock: got"), "vsock: got hello from host");
    let (ok, echo) = client.unwrap_or_else(|e| panic!("{e}\n{}", run.stderr));
    let port = ok
        .strip_prefix("OK ")
        .and_then(|p| p.strip_suffix('\n'))
        .and_then(|p| p.parse::<u32>().ok());
    assert!(port.is_some(), "bad OK line {ok:?}");
    assert_eq!(echo, "ping from host\n");
    assert_eq!(run.line("vsock: echoed"), "vsock: echoed ping from host");
    assert_eq!(run.lines("vsock: closed ok").len(), 2, "{}", run.stderr);
    assert!(run.lines("done").len() == 1, "{}", run.stderr);
    assert!(!uds.exists(), "microvm removes its socket when it ends");
}

#[test]
fn vsock_socket_path_that_is_not_a_socket_is_refused() {
    let dir = temp_dir("vsock-file");
    let path = dir.0.join("v.sock");
    std::fs::write(&path, b"precious").unwrap();
    // The socket is made after /dev/kvm is opened, so this too needs KVM.
    if !kvm_or_skip("vsock_socket_path_that_is_not_a_socket_is_refused") {
        return;
    }
    let run = boot(&[
        "--kernel",
        guest("pvh.elf").to_str().unwrap(),
        "--cmdline",
        "mode=reset",
        "--vsock-uds",
        path.to_str().unwrap(),
    ]);
    assert_eq!(run.code, Some(125), "{}", run.stderr);
    assert!(run.stderr.contains("is not a socket"), "{}", run.stderr);
    assert_eq!(std::fs::read(&path).unwrap(), b"precious");
}
