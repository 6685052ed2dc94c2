//! microvm-runtime under the real engines of this machine (Debian's podman, containerd and
//! docker), each started privately by the test, with the test image loaded from an OCI layout
//! (tests/make-test-images.sh): every container runs the real guest kernel and agent in its own
//! VM. The qemu backend is chosen per container (annotation, or docker's runtime arguments):
//! this fleet's KVM boots Linux only slowly. Plus the runtime's own command line without an
//! engine: errors engines match on, and bad bundles.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{http_server, kernel_or_skip, skip, test_images, EngineNetns, PODMAN_RUN_FLAGS};

const RUNTIME: &str = env!("CARGO_BIN_EXE_microvm-runtime");
/// The backend, for engines that pass annotations through.
const QEMU: &str = "io.microvm.hypervisor=qemu";

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Asserts that `o`'s stderr contains `words`, showing it otherwise.
fn says(o: &Output, words: &str) {
    let err = text(&o.stderr);
    assert!(err.contains(words), "expected {words:?} in: {err}");
}

fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// The guest kernel and every one of `tools`, or a loud skip line for `name` naming what is
/// missing and the package that brings it.
fn needs(name: &str, tools: &[&str], package: &str) -> bool {
    if kernel_or_skip(name).is_none() {
        return false;
    }
    if let Some(t) = tools.iter().find(|t| !have(t)) {
        skip(
            name,
            &format!("{t} is not installed (scripts/setup-host installs {package})"),
        );
        return false;
    }
    true
}

/// A directory of this test binary's own, removed at the end.
fn work_dir(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("runtime-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The runtime's container directory for `id`, under its default root.
fn record(root: &Path, id: &str) -> PathBuf {
    root.join("containers").join(id)
}

/// Host processes whose command line names `id`.
fn processes_naming(id: &str) -> Vec<String> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            let cmd = text(&cmd).replace('\0', " ");
            if cmd.contains(id) && !cmd.contains("cargo") {
                found.push(cmd);
            }
        }
    }
    found
}

/// A private podman: its own storage and run root, vfs, the test image loaded as
/// `localhost/box`.
struct Podman {
    dir: PathBuf,
    /// podman refuses a run root over 50 characters: a short one of its own.
    runroot: PathBuf,
}

impl Podman {
    fn new(name: &str) -> Option<Podman> {
        if !have("podman") {
            skip(
                name,
                "podman is not installed (scripts/setup-host installs it)",
            );
            return None;
        }
        let (images, _) = test_images("runtime");
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let p = Podman {
            dir: work_dir(name),
            runroot: PathBuf::from(format!("/tmp/mvrt-{}-{n}", std::process::id())),
        };
        common::podman_load_box(|| p.cmd(), images);
        Some(p)
    }

    fn cmd(&self) -> Command {
        let mut c = Command::new("podman");
        c.args(["--storage-driver", "vfs", "--root"])
            .arg(self.dir.join("storage"))
            .arg("--runroot")
            .arg(&self.runroot)
            .arg("--runtime")
            .arg(RUNTIME)
            .stdin(Stdio::null());
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cmd().args(args).output().unwrap()
    }

    /// `podman run` with this fleet's flags and the qemu annotation, then `flags`, the image
    /// and `argv`.
    fn run_args<'a>(flags: &[&'a str], argv: &[&'a str]) -> Vec<&'a str> {
        let mut a = vec!["run"];
        a.extend(PODMAN_RUN_FLAGS);
        a.extend(["--annotation", QEMU]);
        a.extend(flags);
        a.push("localhost/box");
        a.extend(argv);
        a
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = self
            .cmd()
            .args(["rm", "-a", "-f"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = self
            .cmd()
            .args(["rmi", "-a", "-f"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = std::fs::remove_dir_all(&self.runroot);
    }
}

/// The guest kernel's release, as the kernel's build wrote it (`6.1.N`).
fn host_release() -> String {
    text(&Command::new("uname").arg("-r").output().unwrap().stdout)
        .trim()
        .to_string()
}

#[test]
fn podman_runs_each_container_in_its_own_vm() {
    let name = "podman run with microvm-runtime";
    if kernel_or_skip(name).is_none() {
        return;
    }
    let Some(p) = Podman::new("podman-run") else {
        return;
    };
    let o = p.run(&Podman::run_args(&["--rm"], &["echo", "hi"]));
    assert_eq!(
        (o.status.code(), text(&o.stdout)),
        (Some(0), "hi\n".into()),
        "{}",
        text(&o.stderr)
    );
    let o = p.run(&Podman::run_args(
        &["--rm"],
        &["sh", "-c", "echo out; echo err >&2; exit 3"],
    ));
    assert_eq!(o.status.code(), Some(3), "{}", text(&o.stderr));
    assert_eq!(text(&o.stdout), "out\n");
    says(&o, "err");

    let cidfile = p.dir.join("cid").display().to_string();
    // The id is written to a file, to be looked for afterwards; the bundle's user,
    // limits, capabilities and hostname apply in the guest.
    let script = "id -u; uname -r; cat /proc/1/cmdline | tr '\\0' ' '; echo; ulimit -n; hostname; grep CapBnd /proc/self/status";
    let o = p.run(&Podman::run_args(
        &[
            "--rm",
            "--cidfile",
            &cidfile,
            "-u",
            "1000",
            "--hostname",
            "vmhost",
        ],
        &["sh", "-c", script],
    ));
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let out = text(&o.stdout);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "1000", "{out}");
    assert!(lines[1].starts_with("6.1."), "the guest's kernel: {out}");
    assert_ne!(lines[1], host_release(), "not the host's kernel");
    assert!(lines[2].contains("init"), "PID 1 is the VM's agent: {out}");
    assert_eq!(lines[3], "1024", "--ulimit nofile: {out}");
    assert_eq!(lines[4], "vmhost", "{out}");
    let bounding = u64::from_str_radix(lines[5].trim_start_matches("CapBnd:").trim(), 16).unwrap();
    assert_ne!(
        bounding & 1,
        0,
        "CAP_CHOWN is among podman's defaults: {out}"
    );
    assert_eq!(bounding & (1 << 21), 0, "CAP_SYS_ADMIN is not: {out}");
    // --rm leaves nothing: no record under the runtime's root, no process naming the id.
    let id = std::fs::read_to_string(&cidfile)
        .unwrap()
        .trim()
        .to_string();
    assert_eq!(id.len(), 64);
    assert!(
        !record(Path::new("/run/microvm-runtime"), &id).exists(),
        "--rm leaves no record"
    );
    assert!(
        processes_naming(&id).is_empty(),
        "{:?}",
        processes_naming(&id)
    );

    // A volume both ways, and a read-only root with the engine's tmpfs mounts.
    let vol = p.dir.join("vol");
    std::fs::create_dir_all(&vol).unwrap();
    std::fs::write(vol.join("from-host"), "host\n").unwrap();
    let v = format!("{}:/data", vol.display());
    let o = p.run(&Podman::run_args(
        &["--rm", "--read-only", "-v", &v],
        &[
            "sh",
            "-c",
            "cat /data/from-host; echo guest > /data/from-guest; touch /x 2>/dev/null || echo root-ro; touch /tmp/t && echo tmp-rw",
        ],
    ));
    assert_eq!(
        (o.status.code(), text(&o.stdout)),
        (Some(0), "host\nroot-ro\ntmp-rw\n".into()),
        "{}",
        text(&o.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(vol.join("from-guest")).unwrap(),
        "guest\n"
    );

    // A program that does not exist: podman's 127 and the reason.
    let o = p.run(&Podman::run_args(&["--rm"], &["no-such-program"]));
    assert_eq!(o.status.code(), Some(127), "{}", text(&o.stderr));
    says(&o, "executable file not found");
}

#[test]
fn podman_terminal_exec_pause_stop_and_kill() {
    let name = "podman -it, exec, pause, stop and kill with microvm-runtime";
    if !needs(name, &["script"], "bsdutils") {
        return;
    }
    let Some(p) = Podman::new("podman-life") else {
        return;
    };
    // -it from a pseudo-terminal of 40x120: the guest's terminal has that size.
    let mut line = format!(
        "stty rows 40 cols 120; podman --storage-driver vfs --root {} --runroot {} --runtime {RUNTIME}",
        p.dir.join("storage").display(),
        p.runroot.display()
    );
    for a in Podman::run_args(&["--rm", "-it"], &["sh", "-c", "'tty; stty size; exit 5'"]) {
        line.push(' ');
        line.push_str(a);
    }
    let o = Command::new("script")
        .args(["-qec", &line, "/dev/null"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let out = text(&o.stdout);
    assert_eq!(o.status.code(), Some(5), "{out}{}", text(&o.stderr));
    assert!(out.contains("/dev/pts/"), "{out}");
    assert!(out.contains("40 120"), "{out}");

    let script = "trap 'echo got-term; exit 7' TERM; while true; do sleep 0.1; done";
    let o = p.run(&Podman::run_args(
        &["-d", "--name", "life"],
        &["sh", "-c", script],
    ));
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let o = p.run(&["exec", "life", "uname", "-r"]);
    let release = text(&o.stdout);
    assert!(
        release.starts_with("6.1."),
        "exec runs in the VM: {release}{}",
        text(&o.stderr)
    );
    let o = p.run(&["exec", "life", "sh", "-c", "exit 9"]);
    assert_eq!(o.status.code(), Some(9), "{}", text(&o.stderr));

    let o = p.run(&["pause", "life"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let o = p.run(&["inspect", "life", "--format", "{{.State.Status}}"]);
    assert_eq!(text(&o.stdout).trim(), "paused");
    let o = p.run(&["unpause", "life"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let o = p.run(&["exec", "life", "echo", "awake"]);
    assert_eq!(text(&o.stdout), "awake\n", "{}", text(&o.stderr));

    let o = p.run(&["stop", "-t", "10", "life"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let o = p.run(&["inspect", "life", "--format", "{{.State.ExitCode}}"]);
    assert_eq!(text(&o.stdout).trim(), "7", "the process took SIGTERM");
    let o = p.run(&["logs", "life"]);
    assert_eq!(text(&o.stdout), "got-term\n");

    let o = p.run(&Podman::run_args(
        &["-d", "--name", "victim"],
        &["sleep", "1000"],
    ));
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let o = p.run(&["kill", "victim"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let o = p.run(&["wait", "victim"]);
    assert_eq!(text(&o.stdout).trim(), "137", "{}", text(&o.stderr));
}

#[test]
fn the_same_image_under_runc_and_microvm_runtime() {
    let name = "runc beside microvm-runtime";
    if !needs(name, &["runc"], "runc") {
        return;
    }
    let Some(p) = Podman::new("side-by-side") else {
        return;
    };
    let script = "cat /etc/passwd; ls /bin | wc -l; uname -r";
    let mut runc = p.cmd();
    runc.args(["--runtime", "runc"]);
    let mut args = vec!["run", "--rm"];
    args.extend(PODMAN_RUN_FLAGS);
    args.extend(["localhost/box", "sh", "-c", script]);
    let shared = runc.args(&args).output().unwrap();
    assert_eq!(
        shared.status.code(),
        Some(0),
        "runc: {}",
        text(&shared.stderr)
    );
    let vm = p.run(&Podman::run_args(&["--rm"], &["sh", "-c", script]));
    assert_eq!(vm.status.code(), Some(0), "{}", text(&vm.stderr));
    let (a, b) = (text(&shared.stdout), text(&vm.stdout));
    let (a_lines, b_lines): (Vec<&str>, Vec<&str>) = (a.lines().collect(), b.lines().collect());
    assert_eq!(a_lines.len(), b_lines.len(), "{a}\n---\n{b}");
    let n = a_lines.len();
    assert_eq!(
        a_lines[..n - 1],
        b_lines[..n - 1],
        "the same image, the same files"
    );
    assert_eq!(
        a_lines[n - 1],
        host_release(),
        "runc shares the host's kernel"
    );
    assert!(b_lines[n - 1].starts_with("6.1."), "microvm-runtime: {b}");
    assert_ne!(a_lines[n - 1], b_lines[n - 1]);
}

/// A daemon the test started, stopped at the end.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = nix_kill(self.0.id(), libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn nix_kill(pid: u32, sig: i32) -> i32 {
    // SAFETY: kill(2) on a child we started and have not reaped.
    unsafe { libc::kill(pid as i32, sig) }
}

/// Waits until `socket` accepts connections.
fn wait_for_socket(socket: &Path, secs: u64) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if std::os::unix::net::UnixStream::connect(socket).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

#[test]
fn containerd_runs_tasks_in_vms() {
    let name = "containerd's runc shim with microvm-runtime";
    if !needs(name, &["containerd", "ctr"], "containerd") {
        return;
    }
    let (images, _) = test_images("runtime");
    let dir = work_dir("containerd");
    let socket = dir.join("containerd.sock");
    let config = dir.join("config.toml");
    std::fs::write(
        &config,
        format!(
            "version = 2\nroot = {:?}\nstate = {:?}\n[grpc]\n  address = {:?}\n[plugins.\"io.containerd.grpc.v1.cri\"]\n  disable_apparmor = true\n",
            dir.join("root"),
            dir.join("state"),
            socket
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.join("containerd.log")).unwrap();
    let daemon = Daemon(
        Command::new("containerd")
            .arg("--config")
            .arg(&config)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    assert!(
        wait_for_socket(&socket, 30),
        "containerd did not start: see {}",
        dir.display()
    );
    let ctr = |args: &[&str]| {
        Command::new("ctr")
            .arg("--address")
            .arg(&socket)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let archive = dir.join("box.tar");
    let st = Command::new("tar")
        .arg("-C")
        .arg(images.join("box"))
        .arg("-cf")
        .arg(&archive)
        .arg(".")
        .status()
        .unwrap();
    assert!(st.success());
    let o = ctr(&[
        "images",
        "import",
        "--snapshotter",
        "native",
        "--base-name",
        "localhost/box",
        archive.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(0), "ctr import: {}", text(&o.stderr));
    let run = |extra: &[&str], id: &str, argv: &[&str]| {
        let mut a = vec!["run", "--snapshotter", "native", "--runc-binary", RUNTIME];
        a.extend(["--annotation", QEMU]);
        a.extend(extra);
        a.extend(["localhost/box:latest", id]);
        a.extend(argv);
        ctr(&a)
    };
    let o = run(
        &["--rm"],
        "once",
        &["sh", "-c", "echo from-ctr; uname -r; exit 4"],
    );
    let out = text(&o.stdout);
    assert_eq!(o.status.code(), Some(4), "{out}{}", text(&o.stderr));
    assert!(out.starts_with("from-ctr\n6.1."), "{out}");

    let o = run(&["-d"], "long", &["sleep", "1000"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let o = ctr(&[
        "task",
        "exec",
        "--exec-id",
        "e1",
        "long",
        "sh",
        "-c",
        "uname -r; exit 6",
    ]);
    assert_eq!(o.status.code(), Some(6), "{}", text(&o.stderr));
    assert!(text(&o.stdout).starts_with("6.1."), "{}", text(&o.stdout));
    let o = ctr(&["task", "ps", "long"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    assert!(text(&o.stdout).lines().count() >= 2, "{}", text(&o.stdout));
    let o = ctr(&["task", "kill", "long"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let o = ctr(&["task", "ls"]);
        let listing = text(&o.stdout);
        if listing
            .lines()
            .any(|l| l.starts_with("long") && l.contains("STOPPED"))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the task did not stop: {listing}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let o = ctr(&["task", "rm", "long"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let _ = ctr(&["containers", "rm", "long"]);
    drop(daemon);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn docker_runs_containers_in_vms() {
    let name = "dockerd with microvm-runtime";
    if !needs(name, &["dockerd", "docker"], "docker.io") {
        return;
    }
    let Some(p) = Podman::new("docker-image") else {
        return;
    };
    let dir = work_dir("docker");
    // dockerd's socket paths must stay short.
    let socket = dir.join("d.sock");
    let daemon_json = dir.join("daemon.json");
    let config = serde_json::json!({
        "runtimes": {"microvm": {"path": RUNTIME, "runtimeArgs": ["--hypervisor", "qemu"]}}
    });
    std::fs::write(&daemon_json, config.to_string()).unwrap();
    let log = std::fs::File::create(dir.join("dockerd.log")).unwrap();
    let daemon = Daemon(
        Command::new("dockerd")
            .arg("--config-file")
            .arg(&daemon_json)
            .args([
                "--iptables=false",
                "--ip6tables=false",
                "--bridge=none",
                "--storage-driver=vfs",
            ])
            .arg("--data-root")
            .arg(dir.join("data"))
            .arg("--exec-root")
            .arg(dir.join("exec"))
            .arg("--pidfile")
            .arg(dir.join("docker.pid"))
            .arg("-H")
            .arg(format!("unix://{}", socket.display()))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    if !wait_for_socket(&socket, 60) {
        let log = std::fs::read_to_string(dir.join("dockerd.log")).unwrap_or_default();
        let last = log.lines().last().unwrap_or_default().to_string();
        skip(
            name,
            &format!("dockerd does not start on this host: {last}"),
        );
        return;
    }
    let host = format!("unix://{}", socket.display());
    let docker = |args: &[&str]| {
        Command::new("docker")
            .args(["-H", &host])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let archive = dir.join("box-docker.tar");
    let o = p.run(&[
        "save",
        "--format",
        "docker-archive",
        "-o",
        archive.to_str().unwrap(),
        "localhost/box:latest",
    ]);
    assert_eq!(o.status.code(), Some(0), "podman save: {}", text(&o.stderr));
    let o = docker(&["load", "-i", archive.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "docker load: {}", text(&o.stderr));
    let o = docker(&[
        "run",
        "--rm",
        "--runtime",
        "microvm",
        "--network",
        "none",
        "localhost/box",
        "sh",
        "-c",
        "echo out; echo err >&2; uname -r; exit 4",
    ]);
    let out = text(&o.stdout);
    assert_eq!(o.status.code(), Some(4), "{out}{}", text(&o.stderr));
    assert!(out.starts_with("out\n6.1."), "{out}");
    assert_eq!(text(&o.stderr).trim(), "err");

    let script = "trap 'exit 9' TERM; while true; do sleep 0.1; done";
    let o = docker(&[
        "run",
        "-d",
        "--name",
        "d1",
        "--runtime",
        "microvm",
        "--network",
        "none",
        "localhost/box",
        "sh",
        "-c",
        script,
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let o = docker(&["exec", "d1", "sh", "-c", "uname -r; exit 3"]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o.stderr));
    assert!(text(&o.stdout).starts_with("6.1."), "{}", text(&o.stdout));
    let o = docker(&["stop", "d1"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let o = docker(&["inspect", "d1", "--format", "{{.State.ExitCode}}"]);
    assert_eq!(text(&o.stdout).trim(), "9");
    let _ = docker(&["rm", "-f", "d1"]);
    drop(daemon);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The runtime's own command line, without an engine.
fn runtime(root: &Path, args: &[&str]) -> Output {
    Command::new(RUNTIME)
        .arg("--root")
        .arg(root)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

#[test]
fn the_command_line_answers_as_runc_does() {
    let dir = work_dir("cli");
    let root = dir.join("root");
    let o = runtime(&root, &["--version"]);
    assert_eq!(o.status.code(), Some(0));
    assert!(
        text(&o.stdout).contains("spec: 1.0.2"),
        "{}",
        text(&o.stdout)
    );
    // Engines match these words.
    let o = runtime(&root, &["state", "nope"]);
    assert_eq!(o.status.code(), Some(1));
    says(&o, "container \"nope\" does not exist");
    let o = runtime(&root, &["kill", "nope", "KILL"]);
    says(&o, "does not exist");
    let o = runtime(&root, &["delete", "--force", "nope"]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "delete --force of nothing: {}",
        text(&o.stderr)
    );
    let o = runtime(&root, &["state", "../x"]);
    assert_eq!(o.status.code(), Some(1));
    says(&o, "invalid container id");
    let o = runtime(&root, &["list", "--format", "json"]);
    assert_eq!((o.status.code(), text(&o.stdout).trim()), (Some(0), "[]"));
    let o = runtime(&root, &["features"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["ociVersionMax"], "1.0.2");
    assert!(v["linux"]["capabilities"].as_array().unwrap().len() > 40);

    // A bundle that cannot run: one line, status 1, nothing left; the JSON log says it too.
    let bundle = dir.join("bundle");
    std::fs::create_dir_all(bundle.join("rootfs")).unwrap();
    std::fs::write(
        bundle.join("config.json"),
        r#"{"ociVersion": "1.0.2", "root": {"path": "rootfs"},
            "process": {"args": ["sh"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
            "mounts": [{"destination": "/mnt", "type": "nfs", "source": "server:/x"}],
            "linux": {"namespaces": [{"type": "network"}]},
            "annotations": {"io.microvm.hypervisor": "qemu"}}"#,
    )
    .unwrap();
    let log = dir.join("log.json");
    let o = Command::new(RUNTIME)
        .arg("--root")
        .arg(&root)
        .arg("--log")
        .arg(&log)
        .args(["--log-format", "json", "create", "--bundle"])
        .arg(&bundle)
        .arg("bad1")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = text(&o.stderr);
    assert!(
        err.contains("mount type \"nfs\" at /mnt is not supported in a VM"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    let logged: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(&log)
            .unwrap()
            .lines()
            .last()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(logged["level"], "error");
    assert!(logged["msg"].as_str().unwrap().contains("nfs"));
    assert!(!record(&root, "bad1").exists(), "nothing left");
    // A VM that cannot boot (the "kernel" is a text file): create fails, nothing is left.
    if have("qemu-system-x86_64") {
        let spec = std::fs::read_to_string(bundle.join("config.json")).unwrap();
        let spec = spec
            .replace(
                r#"{"destination": "/mnt", "type": "nfs", "source": "server:/x"}"#,
                "",
            )
            .replace(
                r#""io.microvm.hypervisor": "qemu""#,
                r#""io.microvm.hypervisor": "qemu", "io.microvm.kernel": "/etc/passwd""#,
            );
        std::fs::write(bundle.join("config.json"), spec).unwrap();
        let err_path = dir.join("bad3.stderr");
        let st = Command::new(RUNTIME)
            .arg("--root")
            .arg(&root)
            .args(["create", "--bundle"])
            .arg(&bundle)
            .arg("bad3")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&err_path).unwrap())
            .status()
            .unwrap();
        let err = std::fs::read_to_string(&err_path).unwrap();
        assert_eq!(st.code(), Some(1), "{err}");
        assert!(err.contains("guest crashed"), "{err}");
        assert!(!record(&root, "bad3").exists(), "nothing left");
        assert!(
            processes_naming("bad3").is_empty(),
            "{:?}",
            processes_naming("bad3")
        );
    }
    let o = runtime(&root, &["create", "--bundle", "/nonexistent", "bad2"]);
    assert_eq!(o.status.code(), Some(1));
    says(&o, "/nonexistent");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn create_waits_for_start_and_delete_refuses_a_running_container() {
    let name = "create, start, state and delete without an engine";
    let Some(kernel) = kernel_or_skip(name) else {
        return;
    };
    let (images, _) = test_images("runtime");
    let dir = work_dir("bundle");
    let root = dir.join("root");
    let bundle = dir.join("bundle");
    // umoci unpack makes a runtime bundle (config.json and rootfs) from the OCI layout.
    let st = Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:latest", images.join("box").display()))
        .arg(&bundle)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success(), "umoci unpack");
    let mut spec: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(bundle.join("config.json")).unwrap())
            .unwrap();
    spec["process"]["terminal"] = false.into();
    // A read-only bind of a host directory stays read-only whatever the guest does: root in the
    // guest with CAP_SYS_ADMIN remounts it read-write, and the host still refuses the write.
    let ro_dir = dir.join("ro");
    std::fs::create_dir_all(&ro_dir).unwrap();
    spec["mounts"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!(
            {"destination": "/ro", "type": "bind", "source": ro_dir, "options": ["rbind", "ro"]}
        ));
    let caps = ["CAP_SYS_ADMIN", "CAP_DAC_OVERRIDE", "CAP_CHOWN", "CAP_KILL"];
    for set in ["bounding", "effective", "permitted", "inheritable"] {
        spec["process"]["capabilities"][set] = serde_json::json!(caps);
    }
    spec["process"]["capabilities"]["ambient"] = serde_json::json!([]);
    spec["process"]["args"] = serde_json::json!([
        "sh",
        "-c",
        "(mount -o remount,rw /ro && echo remounted; if echo x > /ro/f; then echo wrote; else echo refused; fi) > /ran.tmp 2>/dev/null; mv /ran.tmp /ran; sleep 1000"
    ]);
    spec["annotations"] = serde_json::json!({
        "io.microvm.hypervisor": "qemu",
        "io.microvm.kernel": kernel,
    });
    std::fs::write(bundle.join("config.json"), spec.to_string()).unwrap();
    let pid_file = dir.join("pid");
    // The container's supervisor keeps the stdio it was given (an engine's pipes, read for the
    // container's whole life): a file here, so that nothing waits for it to close.
    let stderr_path = dir.join("create.stderr");
    let stderr = std::fs::File::create(&stderr_path).unwrap();
    let st = Command::new(RUNTIME)
        .arg("--root")
        .arg(&root)
        .args(["create", "--bundle"])
        .arg(&bundle)
        .arg("--pid-file")
        .arg(&pid_file)
        .arg("c1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .status()
        .unwrap();
    let err = std::fs::read_to_string(&stderr_path).unwrap_or_default();
    assert_eq!(st.code(), Some(0), "{err}");
    let state = |root: &Path| -> serde_json::Value {
        serde_json::from_slice(&runtime(root, &["state", "c1"]).stdout).unwrap()
    };
    let s = state(&root);
    assert_eq!(s["status"], "created");
    let pid: u32 = std::fs::read_to_string(&pid_file).unwrap().parse().unwrap();
    assert_eq!(s["pid"], pid);
    assert!(Path::new(&format!("/proc/{pid}")).exists());
    assert!(
        !bundle.join("rootfs/ran").exists(),
        "created, not started: the program has not run"
    );
    let o = runtime(
        &root,
        &["create", "--bundle", bundle.to_str().unwrap(), "c1"],
    );
    says(&o, "container with id exists: c1");

    let o = runtime(&root, &["start", "c1"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    assert_eq!(state(&root)["status"], "running");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !bundle.join("rootfs/ran").exists() {
        assert!(
            Instant::now() < deadline,
            "the program never wrote to the root"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        std::fs::read_to_string(bundle.join("rootfs/ran")).unwrap(),
        "remounted\nrefused\n",
        "the host refuses writes through a read-only bind"
    );
    assert!(!ro_dir.join("f").exists());
    let o = runtime(&root, &["start", "c1"]);
    says(&o, "already running");
    let o = runtime(&root, &["delete", "c1"]);
    assert_eq!(o.status.code(), Some(1));
    says(
        &o,
        "cannot delete container c1 that is not stopped: running",
    );
    let o = runtime(&root, &["ps", "--format", "json", "c1"]);
    let pids: Vec<u32> = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(pids, vec![pid]);
    let o = runtime(&root, &["update", "--memory", "99999999999", "c1"]);
    assert_eq!(o.status.code(), Some(1));
    says(&o, "does not fit");
    let o = runtime(&root, &["update", "--memory", "67108864", "c1"]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "a smaller limit fits: {}",
        text(&o.stderr)
    );
    let o = runtime(&root, &["kill", "c1", "9"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let deadline = Instant::now() + Duration::from_secs(20);
    while state(&root)["status"] != "stopped" {
        assert!(Instant::now() < deadline, "the container did not stop");
        std::thread::sleep(Duration::from_millis(100));
    }
    let o = runtime(&root, &["kill", "c1", "9"]);
    says(&o, "container not running");
    // Two engines' deletes at once: both succeed, one removes it.
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| runtime(&root, &["delete", "--force", "c1"]));
        let b = s.spawn(|| runtime(&root, &["delete", "--force", "c1"]));
        (a.join().unwrap(), b.join().unwrap())
    });
    assert_eq!(a.status.code(), Some(0), "{}", text(&a.stderr));
    assert_eq!(b.status.code(), Some(0), "{}", text(&b.stderr));
    assert!(!record(&root, "c1").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn podman_hands_its_network_namespace_to_the_vm() {
    let name = "podman with a network namespace";
    if kernel_or_skip(name).is_none() {
        return;
    }
    let Some(p) = Podman::new("podman-netns") else {
        return;
    };
    // podman's own bridge needs iptables and a firewall this fleet's hosts do not run, so the
    // namespace is made the way its CNI plugins make one, and podman hands it over as it
    // hands over any: in the bundle's linux.namespaces.
    let Some(ns) = EngineNetns::make("podman", 232) else {
        skip(
            name,
            "cannot make a network namespace with a veth here (needs root and iproute2)",
        );
        return;
    };
    let port = http_server("10.232.0.1:0", "the-engines-network");
    let netns = format!("ns:{}", ns.path());
    let script = format!("ip -o addr show eth0; wget -q -O - http://10.232.0.1:{port}/; echo");
    let mut args = vec!["run", "--rm", "--network", &netns];
    // This fleet's flags but their --network none.
    args.extend(PODMAN_RUN_FLAGS.iter().skip(2));
    args.extend(["--annotation", QEMU, "localhost/box", "sh", "-c", &script]);
    let o = p.run(&args);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let out = text(&o.stdout);
    assert!(out.contains("inet 10.232.0.2/24"), "{out}");
    assert!(out.contains("the-engines-network"), "{out}");
    assert!(!ns.links().contains("microvm-tap0"), "{}", ns.links());

    // A namespace with no veth (podman's --network none) leaves the VM only loopback.
    let mut args = vec!["run", "--rm"];
    args.extend(PODMAN_RUN_FLAGS);
    args.extend([
        "--annotation",
        QEMU,
        "localhost/box",
        "sh",
        "-c",
        "ip -o link | cut -d: -f2",
    ]);
    let o = p.run(&args);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    assert_eq!(text(&o.stdout).trim(), "lo");
}
