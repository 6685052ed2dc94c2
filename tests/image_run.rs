//! `microvm run IMAGE` through the real stack: a two-layer OCI image (tests/make-test-images.sh:
//! busybox, a whiteout and an opaque directory in the upper layer, entrypoint/cmd/env/workdir/
//! user 1000 in the config), run by the real kernel and agent through the `qemu` backend.

mod common;

use common::*;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// The test images and a private store, made once per test binary.
fn images() -> &'static (PathBuf, PathBuf) {
    test_images("image-run")
}

fn run(kernel: &Path, flags: &[&str], cmd: &[&str]) -> Output {
    let (out, store) = images();
    let image = format!("oci:{}", out.join("demo").display());
    qemu_run(&mut microvm(), kernel, 120)
        .args(flags)
        .arg(image)
        .args(cmd)
        .env("MICROVM_ROOT", store)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn image_config_layers_and_whiteouts_apply() {
    let Some(k) = kernel_or_skip("image_config_layers_and_whiteouts_apply") else {
        return;
    };
    // Entrypoint `/bin/sh -c` with Cmd `echo hello`.
    let o = run(&k, &[], &[]);
    assert_eq!(
        (o.status.code(), text(&o.stdout)),
        (Some(0), "hello\n".into()),
        "{}",
        text(&o.stderr)
    );
    // A command replaces Cmd and keeps the entrypoint; the upper layer deleted /etc/gone and
    // replaced /etc/app; the config's user, workdir and env apply.
    let script = "id -u; id -g; pwd; echo $GREETING; ls /etc/app; test -e /etc/gone && echo present || echo absent";
    let o = run(&k, &[], &[script]);
    assert_eq!(
        text(&o.stdout),
        "1000\n1000\n/work\nhi\nnew\nabsent\n",
        "{}",
        text(&o.stderr)
    );
    // Flags override the config; the sandbox layer is writable and private to the run.
    let o = run(
        &k,
        &["-u", "0", "-w", "/tmp", "-e", "GREETING=yo", "--rm"],
        &["id -u; pwd; echo $GREETING; echo x > /etc/new-file && cat /etc/new-file"],
    );
    assert_eq!(text(&o.stdout), "0\n/tmp\nyo\nx\n", "{}", text(&o.stderr));
    let o = run(
        &k,
        &[],
        &["test -e /etc/new-file && echo leaked || echo fresh"],
    );
    assert_eq!(text(&o.stdout), "fresh\n");
}

#[test]
fn exit_codes_follow_docker() {
    let Some(k) = kernel_or_skip("exit_codes_follow_docker") else {
        return;
    };
    for (flags, cmd, code) in [
        (vec![], vec!["exit 3"], 3),
        (vec![], vec!["kill -9 $$"], 137),
        (vec!["--entrypoint", "no-such-program"], vec![], 127),
        (vec!["--entrypoint", "/etc/app/new"], vec![], 126),
    ] {
        let o = run(&k, &flags, &cmd);
        assert_eq!(
            o.status.code(),
            Some(code),
            "{flags:?} {cmd:?}: {}",
            text(&o.stderr)
        );
    }
}

#[test]
fn fifty_megabytes_of_stdout_arrive_intact() {
    let Some(k) = kernel_or_skip("fifty_megabytes_of_stdout_arrive_intact") else {
        return;
    };
    let o = run(
        &k,
        &["-u", "0", "--memory", "384"],
        &["head -c 50000000 /dev/urandom > /tmp/d; md5sum /tmp/d >&2; cat /tmp/d"],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    assert_eq!(o.stdout.len(), 50_000_000);
    let mut md5 = Command::new("md5sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = md5.stdin.take().unwrap();
    let data = o.stdout.clone();
    let feeder = std::thread::spawn(move || stdin.write_all(&data));
    let sum = md5.wait_with_output().unwrap();
    feeder.join().unwrap().unwrap();
    let host = text(&sum.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    assert!(
        text(&o.stderr).contains(&format!("{host}  /tmp/d")),
        "{}",
        text(&o.stderr)
    );
}

#[test]
fn unknown_images_and_empty_commands_are_clear_errors() {
    let (_, store) = images();
    for (args, expected) in [
        (
            vec!["run", "--hypervisor", "qemu", "no-such-image"],
            "no-such-image",
        ),
        (
            vec!["run", "--hypervisor", "qemu", "oci:/nonexistent/layout"],
            "/nonexistent/layout",
        ),
    ] {
        let o = microvm()
            .args(&args)
            .env("MICROVM_ROOT", store)
            .output()
            .unwrap();
        let err = text(&o.stderr);
        assert_eq!(o.status.code(), Some(125), "{args:?}: {err}");
        // A name not stored is looked for on its registry first (docker.io here, which this
        // host may not reach): docker's announcement, then one error line.
        assert!(
            err.lines()
                .all(|l| l.starts_with("microvm: ") || l.starts_with("Unable to find image"))
                && err.contains(expected),
            "{args:?}: {err}"
        );
    }
}

#[test]
fn storage_size_bounds_the_sandbox_layer() {
    let Some(k) = kernel_or_skip("storage_size_bounds_the_sandbox_layer") else {
        return;
    };
    // The writable layer's file system is the size asked for (8 GiB by default), and a write
    // past it fails in the guest with ENOSPC, taking no more host space than that.
    let df = "df -k / | tail -1 | awk '{print $2}'";
    let fill = "head -c 150000000 /dev/zero > /tmp/big && echo wrote || echo refused";
    let o = run(
        &k,
        &["--rm", "-u", "0", "--storage-size", "100m"],
        &[&format!("{df}; {fill}")],
    );
    let out = text(&o.stdout);
    let mut lines = out.lines();
    let kib: u64 = lines
        .next()
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or(0);
    assert!(
        (80_000..=102_400).contains(&kib),
        "{out} {}",
        text(&o.stderr)
    );
    assert_eq!(lines.next(), Some("refused"), "{out}");
    let o = run(&k, &["--rm"], &[df]);
    let kib: u64 = text(&o.stdout).trim().parse().unwrap_or(0);
    assert!(kib > 7 << 20, "default sandbox layer of {kib} KiB");
    // Nonsense is refused before anything starts, in one line.
    for bad in ["1m", "17t", "lots"] {
        let o = run(&k, &["--storage-size", bad], &["true"]);
        let err = text(&o.stderr);
        assert_eq!(o.status.code(), Some(125), "{bad}: {err}");
        assert!(
            err.contains("storage-size") || err.contains(bad),
            "{bad}: {err}"
        );
    }
}
