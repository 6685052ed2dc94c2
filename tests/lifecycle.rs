//! Containers that outlive the command that made them, through the real stack (the `qemu`
//! backend, the real kernel and agent, the demo image): `run -d`, `ps`, `logs`, `stop`, `kill`,
//! `wait`, `start` over the kept sandbox layer, `rm`, `container prune`, a killed supervisor,
//! and the bad input each command refuses.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The test images and a private store, made once per test binary.
fn images() -> &'static (PathBuf, PathBuf) {
    test_images("lifecycle")
}

fn image() -> String {
    format!("oci:{}", images().0.join("demo").display())
}

/// `microvm ARGS` against the private store, qemu backend, no stdin.
fn mv(args: &[&str]) -> Output {
    cmd(args).output().unwrap()
}

fn cmd(args: &[&str]) -> Command {
    cmd_in(&images().1, args)
}

/// [`cmd`] against the store at `root`.
fn cmd_in(root: &Path, args: &[&str]) -> Command {
    let mut c = microvm();
    c.args(args)
        .env("MICROVM_ROOT", root)
        .env("MICROVM_HYPERVISOR", "qemu")
        .stdin(Stdio::null());
    c
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Removes the named containers (`rm -f`) when dropped, so a failing test leaves no VM running.
struct Cleanup(Vec<String>);

impl Cleanup {
    fn new(names: &[&str]) -> Cleanup {
        Cleanup(names.iter().map(|n| n.to_string()).collect())
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let mut args = vec!["rm", "-f"];
        args.extend(self.0.iter().map(String::as_str));
        let _ = cmd(&args)
            .stderr(Stdio::null())
            .stdout(Stdio::null())
            .status();
    }
}

/// `run -d --name NAME [flags] IMAGE CMD`: the printed id.
fn run_detached(kernel: &Path, name: &str, flags: &[&str], script: &str) -> String {
    let k = kernel.to_str().unwrap();
    let mut args = vec!["run", "-d", "--name", name, "--kernel", k];
    args.extend_from_slice(flags);
    let img = image();
    args.push(&img);
    args.push(script);
    let o = mv(&args);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let id = text(&o.stdout).trim().to_string();
    assert!(
        id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit()),
        "run -d printed {id:?}"
    );
    id
}

/// The `ps -a --format json` record of `name`.
fn ps_record(name: &str) -> Option<serde_json::Value> {
    let o = mv(&["ps", "-a", "--format", "json"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    text(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|v| v["Names"] == name)
}

fn inspect(name: &str) -> serde_json::Value {
    let o = mv(&["inspect", name]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    v[0].clone()
}

/// Waits until `logs NAME` shows `needle` on stdout.
fn wait_for_log(name: &str, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let o = mv(&["logs", name]);
        if text(&o.stdout).contains(needle) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{needle:?} never appeared in the log of {name}: {}",
            text(&o.stdout)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Processes whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) {
            let line = text(&cmdline).replace('\0', " ");
            if line.contains(needle) && !line.contains("cargo") {
                found.push(format!("{}: {line}", e.file_name().to_string_lossy()));
            }
        }
    }
    found
}

#[test]
fn run_detached_logs_follow_and_stop_with_the_process_status() {
    let Some(k) = kernel_or_skip("run_detached_logs_follow_and_stop_with_the_process_status")
    else {
        return;
    };
    let _cleanup = Cleanup::new(&["web"]);
    let id = run_detached(
        &k,
        "web",
        &[],
        "echo started; echo to-stderr >&2; trap 'echo bye; exit 3' TERM; while true; do busybox sleep 0.1; done",
    );
    let r = ps_record("web").expect("web in ps -a");
    assert_eq!(r["State"], "running", "{r}");
    assert_eq!(r["ID"], id);
    // `ps` without -a lists it too; -q gives the short id.
    assert!(text(&mv(&["ps", "-q"]).stdout).contains(&id[..12]));
    let i = inspect(&id[..10]);
    assert_eq!(i["State"]["Running"], true, "{i}");
    assert!(i["State"]["SupervisorPid"].as_u64().unwrap() > 1, "{i}");

    // logs -f follows until the container stops.
    let follower = cmd(&["logs", "-f", "web"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_log("web", "started");
    let t = Instant::now();
    let o = mv(&["stop", "web"]);
    assert_eq!(
        (o.status.code(), text(&o.stdout)),
        (Some(0), "web\n".into()),
        "{}",
        text(&o.stderr)
    );
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    let followed = follower.wait_with_output().unwrap();
    assert_eq!(text(&followed.stdout), "started\nbye\n");
    assert_eq!(text(&followed.stderr), "to-stderr\n");

    let r = ps_record("web").unwrap();
    assert_eq!(r["State"], "exited", "{r}");
    assert_eq!(r["ExitCode"], 3, "{r}");
    assert!(
        r["Status"].as_str().unwrap().starts_with("Exited (3) "),
        "{r}"
    );
    assert_eq!(text(&mv(&["wait", "web"]).stdout), "3\n");
    // Logs stay readable after the exit, streams apart; --tail and -t.
    let o = mv(&["logs", "web"]);
    assert_eq!(
        (text(&o.stdout), text(&o.stderr)),
        ("started\nbye\n".into(), "to-stderr\n".into())
    );
    let o = mv(&["logs", "--tail", "1", "web"]);
    assert_eq!(text(&o.stdout), "bye\n");
    let o = mv(&["logs", "-t", "web"]);
    let first = text(&o.stdout).lines().next().unwrap().to_string();
    let (stamp, rest) = first.split_once(' ').unwrap();
    assert_eq!(rest, "started");
    assert!(stamp.ends_with('Z') && stamp.len() == 30, "{stamp}");

    let o = mv(&["rm", "web"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    assert!(ps_record("web").is_none());
}

#[test]
fn a_container_ignoring_sigterm_is_killed_after_the_grace_period() {
    let Some(k) = kernel_or_skip("a_container_ignoring_sigterm_is_killed_after_the_grace_period")
    else {
        return;
    };
    let _cleanup = Cleanup::new(&["stubborn"]);
    run_detached(
        &k,
        "stubborn",
        &[],
        "trap '' TERM; echo ready; while true; do busybox sleep 0.1; done",
    );
    wait_for_log("stubborn", "ready");
    let t = Instant::now();
    let o = mv(&["stop", "-t", "1", "stubborn"]);
    let took = t.elapsed();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    // -t 1, then SIGKILL: the issue's bound is -t + 1 s; the CLI's own start and exit add a
    // little, measured at about 1.3 s here.
    assert!(took < Duration::from_millis(2500), "stop took {took:?}");
    assert_eq!(ps_record("stubborn").unwrap()["ExitCode"], 137);
    // kill on a stopped container is refused; rm works.
    let o = mv(&["kill", "stubborn"]);
    assert_eq!(o.status.code(), Some(125));
    assert!(
        text(&o.stderr).contains("is not running"),
        "{}",
        text(&o.stderr)
    );
    assert_eq!(mv(&["rm", "stubborn"]).status.code(), Some(0));
}

#[test]
fn kill_sends_the_signal_and_rm_force_removes_a_running_container() {
    let Some(k) = kernel_or_skip("kill_sends_the_signal_and_rm_force_removes_a_running_container")
    else {
        return;
    };
    let _cleanup = Cleanup::new(&["signals"]);
    run_detached(
        &k,
        "signals",
        &[],
        "trap 'echo got-usr1' USR1; echo ready; while true; do busybox sleep 0.1; done",
    );
    // `run -d` returned: exec works at once (the agent listens before the process starts).
    let o = mv(&["exec", "signals", "true"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    wait_for_log("signals", "ready");
    let o = mv(&["kill", "-s", "USR1", "signals"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    wait_for_log("signals", "got-usr1");
    // rm of a running container needs -f.
    let o = mv(&["rm", "signals"]);
    assert_eq!(o.status.code(), Some(125));
    let err = text(&o.stderr);
    assert!(err.contains("running") && err.contains("rm -f"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    let o = mv(&["rm", "-f", "signals"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    assert!(ps_record("signals").is_none());
}

#[test]
fn a_killed_supervisor_shows_as_exited_and_rm_leaves_nothing() {
    let Some(k) = kernel_or_skip("a_killed_supervisor_shows_as_exited_and_rm_leaves_nothing")
    else {
        return;
    };
    let _cleanup = Cleanup::new(&["victim"]);
    let vol = temp_dir("lifecycle-vol");
    let v = format!("{}:/data", vol.0.display());
    let id = run_detached(
        &k,
        "victim",
        &["-v", &v],
        "echo ready; while true; do busybox sleep 1; done",
    );
    wait_for_log("victim", "ready");
    let i = inspect("victim");
    let pid = i["State"]["SupervisorPid"].as_u64().unwrap() as i32;
    let run_dir = i["State"]["RunDir"].as_str().unwrap().to_string();
    assert!(Path::new(&run_dir).is_dir(), "{i}");
    let dir = images().1.join("containers").join(&id);
    assert!(dir.join("scratch.img").is_file());
    assert_eq!(
        Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .unwrap()
            .code(),
        Some(0)
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let r = loop {
        let r = ps_record("victim").unwrap();
        if r["State"] == "exited" || Instant::now() > deadline {
            break r;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(r["State"], "exited", "{r}");
    let i = inspect("victim");
    assert!(
        i["State"]["Error"].as_str().unwrap().contains("supervisor"),
        "{i}"
    );
    // Its helpers die with it: QEMU and virtiofsd by PDEATHSIG, passt once QEMU's end of its
    // socket closes (it runs as nobody, beyond a parent-death signal); give them a moment.
    let deadline = Instant::now() + Duration::from_secs(10);
    while (!processes_mentioning(&vol.0.display().to_string()).is_empty()
        || !processes_mentioning(&run_dir).is_empty())
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        processes_mentioning(&vol.0.display().to_string()),
        Vec::<String>::new()
    );
    let o = mv(&["rm", "victim"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    assert!(!dir.exists(), "the container's directory is left");
    assert!(!Path::new(&run_dir).exists(), "the run directory is left");
    assert_eq!(processes_mentioning(&run_dir), Vec::<String>::new());
    let leftovers: Vec<_> = std::fs::read_dir(images().1.join("containers"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(&id) || n.starts_with(".tmp") || n.starts_with(".removing"))
        .collect();
    assert_eq!(leftovers, Vec::<String>::new());
    assert!(processes_mentioning(&id).is_empty());
}

#[test]
fn start_boots_a_fresh_vm_over_the_kept_sandbox_layer() {
    let Some(k) = kernel_or_skip("start_boots_a_fresh_vm_over_the_kept_sandbox_layer") else {
        return;
    };
    let k = k.to_str().unwrap();
    let img = image();
    // A store of its own: `container prune` must not take other tests' stopped containers.
    let root = images().1.with_file_name("store-start");
    let mv = |args: &[&str]| cmd_in(&root, args).output().unwrap();
    let ps_record = |name: &str| -> Option<serde_json::Value> {
        text(&mv(&["ps", "-a", "--format", "json"]).stdout)
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .find(|v| v["Names"] == name)
    };
    // Foreground run without --rm keeps the container and what it wrote.
    let script = "echo run >> /tmp/runs; cat /tmp/runs | busybox wc -l";
    let o = mv(&["run", "--name", "keeper", "--kernel", k, &img, script]);
    assert_eq!(
        (o.status.code(), text(&o.stdout).trim().to_string()),
        (Some(0), "1".into()),
        "{}",
        text(&o.stderr)
    );
    assert_eq!(ps_record("keeper").unwrap()["State"], "exited");
    let o = mv(&["start", "-a", "keeper"]);
    assert_eq!(
        (o.status.code(), text(&o.stdout).trim().to_string()),
        (Some(0), "2".into()),
        "{}",
        text(&o.stderr)
    );
    // Detached start, then wait.
    let o = mv(&["start", "keeper"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    assert_eq!(text(&mv(&["wait", "keeper"]).stdout), "0\n");
    let o = mv(&["logs", "--tail", "1", "keeper"]);
    assert_eq!(text(&o.stdout), "3\n");
    // create + start -a; --rm removes it at the end; a new container starts from the image.
    let o = mv(&[
        "create", "--rm", "--name", "fresh", "--kernel", k, &img, script,
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    assert_eq!(ps_record("fresh").unwrap()["State"], "created");
    let o = mv(&["start", "-a", "fresh"]);
    assert_eq!(text(&o.stdout).trim(), "1", "{}", text(&o.stderr));
    assert!(ps_record("fresh").is_none(), "--rm left the container");
    // container prune removes stopped ones.
    let o = mv(&["container", "prune"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    assert!(ps_record("keeper").is_none());
}

#[test]
fn bad_lifecycle_input_is_one_line_and_125() {
    let Some(k) = kernel_or_skip("bad_lifecycle_input_is_one_line_and_125") else {
        return;
    };
    let _cleanup = Cleanup::new(&["busy"]);
    let k = k.to_str().unwrap();
    let img = image();
    run_detached(
        Path::new(k),
        "busy",
        &[],
        "echo ready; while true; do busybox sleep 1; done",
    );
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["start", "no-such-container"], "no such container"),
        (vec!["stop", "no-such-container"], "no such container"),
        (vec!["logs", "no-such-container"], "no such container"),
        (vec!["inspect", "no-such-container"], "no such container"),
        (vec!["start", "busy"], "already started"),
        (vec!["rm", "busy"], "rm -f"),
        (
            vec!["run", "-d", "--name", "busy", "--kernel", k, &img, "true"],
            "already in use",
        ),
        (
            vec!["create", "--name", "bad name", "--kernel", k, &img],
            "invalid container name",
        ),
        (vec!["run", "--rn", &img], "unexpected argument '--rn'"),
        (
            vec!["run", "--hypervisr", "qemu", &img],
            "unexpected argument '--hypervisr'",
        ),
        (
            vec!["run", "--cpus", "0", "--kernel", k, &img],
            "--cpus must be between 1 and 32",
        ),
        (
            vec!["run", "--cpus", "64", "--kernel", k, &img],
            "--cpus must be between 1 and 32",
        ),
        (vec!["kill", "-s", "SIGNOPE", "busy"], "invalid signal"),
        (vec!["logs", "--tail", "x", "busy"], "--tail"),
    ];
    for (args, needle) in cases {
        let o = mv(&args);
        let err = text(&o.stderr);
        assert_eq!(o.status.code(), Some(125), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
        if !args.contains(&"--rn") && !args.contains(&"--hypervisr") {
            let lines: Vec<_> = err
                .lines()
                .filter(|l| !l.starts_with("microvm: warning:"))
                .collect();
            assert_eq!(lines.len(), 1, "{args:?}: {err}");
        }
    }
    // Nothing was created by the refused commands.
    let o = mv(&["ps", "-a", "--format", "json"]);
    assert!(!text(&o.stdout).contains("bad name"));
    assert_eq!(mv(&["rm", "-f", "busy"]).status.code(), Some(0));
}

#[test]
fn twenty_detached_containers_start_and_stop_together() {
    let Some(k) = kernel_or_skip("twenty_detached_containers_start_and_stop_together") else {
        return;
    };
    let k = k.to_str().unwrap().to_string();
    let n = 20;
    let names: Vec<String> = (0..n).map(|i| format!("many{i}")).collect();
    let _cleanup = Cleanup(names.clone());
    let starts: Vec<_> = names
        .iter()
        .map(|name| {
            let (k, name) = (k.clone(), name.clone());
            std::thread::spawn(move || {
                let img = image();
                mv(&[
                    "run",
                    "-d",
                    "--memory",
                    "128",
                    "--name",
                    &name,
                    "--kernel",
                    &k,
                    &img,
                    "while true; do busybox sleep 1; done",
                ])
            })
        })
        .collect();
    for (name, h) in names.iter().zip(starts) {
        let o = h.join().unwrap();
        assert_eq!(o.status.code(), Some(0), "{name}: {}", text(&o.stderr));
    }
    for name in &names {
        assert_eq!(ps_record(name).unwrap()["State"], "running", "{name}");
    }
    let mut args = vec!["stop", "-t", "2"];
    args.extend(names.iter().map(String::as_str));
    let o = mv(&args);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    for name in &names {
        // sh ignores nothing here: SIGTERM ends it (143).
        assert_eq!(ps_record(name).unwrap()["ExitCode"], 143, "{name}");
    }
    let mut args = vec!["rm"];
    args.extend(names.iter().map(String::as_str));
    assert_eq!(mv(&args).status.code(), Some(0));
}

#[test]
fn exec_sees_the_containers_files_volumes_and_processes() {
    let Some(k) = kernel_or_skip("exec_sees_the_containers_files_volumes_and_processes") else {
        return;
    };
    let _cleanup = Cleanup::new(&["execs"]);
    let vol = temp_dir("lifecycle-exec-vol");
    std::fs::write(vol.0.join("from-host"), "host data\n").unwrap();
    let v = format!("{}:/data", vol.0.display());
    run_detached(
        &k,
        "execs",
        &["-v", &v, "-e", "FROM_RUN=1"],
        "uname -r; echo written > /tmp/by-main; echo ready; while true; do busybox sleep 0.1; done",
    );
    wait_for_log("execs", "ready");
    let main_kernel = text(&mv(&["logs", "execs"]).stdout)
        .lines()
        .next()
        .unwrap()
        .to_string();
    // The container's files, its volume, its environment and user, the guest's kernel.
    let o = mv(&[
        "exec",
        "-e",
        "FROM_EXEC=2",
        "execs",
        "sh",
        "-c",
        "cat /tmp/by-main /data/from-host; echo $FROM_RUN$FROM_EXEC; id -u; pwd; uname -r",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let host_kernel = text(&Command::new("uname").arg("-r").output().unwrap().stdout)
        .trim()
        .to_string();
    assert_eq!(
        text(&o.stdout),
        format!("written\nhost data\n12\n1000\n/work\n{main_kernel}\n")
    );
    assert_ne!(main_kernel, host_kernel, "exec ran on the host's kernel");
    // Its processes: the container's shell is there.
    let o = mv(&["exec", "execs", "busybox", "ps"]);
    assert!(
        text(&o.stdout).contains("while true"),
        "{}",
        text(&o.stdout)
    );
    let o = mv(&["top", "execs"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let top = text(&o.stdout);
    assert!(
        top.starts_with("UID") && top.contains("while true"),
        "{top}"
    );
    // Exit codes, stdin, -u, -w, start failures; several at once.
    assert_eq!(
        mv(&["exec", "execs", "sh", "-c", "exit 7"]).status.code(),
        Some(7)
    );
    assert_eq!(
        mv(&["exec", "execs", "no-such-program"]).status.code(),
        Some(127)
    );
    let o = mv(&[
        "exec",
        "-u",
        "0",
        "-w",
        "/etc",
        "execs",
        "sh",
        "-c",
        "id -u; pwd",
    ]);
    assert_eq!(text(&o.stdout), "0\n/etc\n");
    let mut child = cmd(&["exec", "-i", "execs", "cat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let data = pattern(300_000, 5);
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(&data).unwrap();
    }
    let o = child.wait_with_output().unwrap();
    assert_eq!((o.status.code(), o.stdout.len()), (Some(0), data.len()));
    assert!(o.stdout == data, "exec -i changed the data");
    let many: Vec<_> = (0..5)
        .map(|i| {
            std::thread::spawn(move || {
                mv(&["exec", "execs", "sh", "-c", &format!("echo {i}; exit {i}")])
            })
        })
        .collect();
    for (i, h) in many.into_iter().enumerate() {
        let o = h.join().unwrap();
        assert_eq!(
            (o.status.code(), text(&o.stdout)),
            (Some(i as i32), format!("{i}\n"))
        );
    }
    // -d returns at once and the process runs on in the VM.
    let o = mv(&["exec", "-d", "execs", "sh", "-c", "echo detached > /tmp/d"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let deadline = Instant::now() + Duration::from_secs(20);
    while text(&mv(&["exec", "execs", "cat", "/tmp/d"]).stdout) != "detached\n" {
        assert!(Instant::now() < deadline, "exec -d did not run");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(mv(&["rm", "-f", "execs"]).status.code(), Some(0));
    // On a stopped container: refused.
    let o = mv(&["exec", "execs", "true"]);
    assert_eq!(o.status.code(), Some(125));
}

#[test]
fn exec_with_a_terminal_from_a_pseudo_terminal() {
    use std::io::{Read, Write};
    use std::os::unix::process::CommandExt;
    let Some(k) = kernel_or_skip("exec_with_a_terminal_from_a_pseudo_terminal") else {
        return;
    };
    let _cleanup = Cleanup::new(&["ttyexec"]);
    run_detached(
        &k,
        "ttyexec",
        &[],
        "echo ready; while true; do busybox sleep 1; done",
    );
    wait_for_log("ttyexec", "ready");
    let (mut m, mut s) = (0, 0);
    let ws = libc::winsize {
        ws_row: 30,
        ws_col: 90,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: openpty writes two descriptors into the given integers and reads `ws`.
    let rc = unsafe { libc::openpty(&mut m, &mut s, std::ptr::null_mut(), std::ptr::null(), &ws) };
    assert_eq!(rc, 0);
    // SAFETY: both descriptors were just opened by openpty and are owned here alone.
    let (mut master, slave) = unsafe {
        use std::os::fd::FromRawFd;
        (std::fs::File::from_raw_fd(m), std::fs::File::from_raw_fd(s))
    };
    let mut c = cmd(&["exec", "-it", "ttyexec", "sh"]);
    c.stdin(slave.try_clone().unwrap())
        .stdout(slave.try_clone().unwrap())
        .stderr(slave.try_clone().unwrap());
    // SAFETY: setsid and TIOCSCTTY are async-signal-safe: the child gets the terminal as its
    // controlling terminal, as a shell would give it.
    unsafe {
        c.pre_exec(|| {
            libc::setsid();
            libc::ioctl(0, libc::TIOCSCTTY, 0);
            Ok(())
        });
    }
    let mut child = c.spawn().unwrap();
    drop(slave);
    let mut seen = String::new();
    let mut read_until = |master: &mut std::fs::File, want: &str| {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut buf = [0u8; 4096];
        while !seen.contains(want) {
            assert!(
                Instant::now() < deadline,
                "waiting for {want:?}; got {seen:?}"
            );
            match master.read(&mut buf) {
                Ok(0) => panic!("terminal closed before {want:?}; got {seen:?}"),
                Ok(n) => seen.push_str(&String::from_utf8_lossy(&buf[..n])),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => panic!("reading the terminal: {e}; got {seen:?}"),
            }
        }
    };
    read_until(&mut master, "$ ");
    master
        .write_all(b"tty; stty size; echo x-$((20+1))\r")
        .unwrap();
    read_until(&mut master, "x-21");
    read_until(&mut master, "30 90");
    assert!(seen.contains("/dev/pts/"), "{seen}");
    master.write_all(b"exit 6\r").unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(6));
    assert_eq!(mv(&["rm", "-f", "ttyexec"]).status.code(), Some(0));
}

#[test]
fn pause_stops_a_counter_that_unpause_resumes() {
    let Some(k) = kernel_or_skip("pause_stops_a_counter_that_unpause_resumes") else {
        return;
    };
    let _cleanup = Cleanup::new(&["counter"]);
    run_detached(
        &k,
        "counter",
        &[],
        "i=0; while true; do i=$((i+1)); echo $i > /tmp/n; busybox sleep 0.05; done",
    );
    let count = || -> u64 {
        let o = mv(&["exec", "counter", "cat", "/tmp/n"]);
        text(&o.stdout).trim().parse().unwrap_or(0)
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while count() < 3 {
        assert!(Instant::now() < deadline, "the counter never ran");
    }
    let before = count();
    let o = mv(&["pause", "counter"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    assert_eq!(ps_record("counter").unwrap()["State"], "paused");
    assert!(ps_record("counter").unwrap()["Status"]
        .as_str()
        .unwrap()
        .ends_with("(Paused)"));
    let o = mv(&["exec", "counter", "true"]);
    assert_eq!(o.status.code(), Some(125));
    assert!(text(&o.stderr).contains("paused"), "{}", text(&o.stderr));
    assert_eq!(mv(&["pause", "counter"]).status.code(), Some(125));
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(mv(&["unpause", "counter"]).status.code(), Some(0));
    // The first read after unpause sees at most a step or two more than before the pause: the
    // guest did not run for those two seconds (about 30 steps at full speed).
    let after = count();
    assert!(
        after <= before + 5,
        "the counter ran while paused: {before} before, {after} after"
    );
    let later = {
        std::thread::sleep(Duration::from_secs(1));
        count()
    };
    assert!(
        later > after,
        "the counter did not resume: {after} then {later}"
    );
    assert_eq!(mv(&["unpause", "counter"]).status.code(), Some(125));
    // A paused container still stops.
    assert_eq!(mv(&["pause", "counter"]).status.code(), Some(0));
    let o = mv(&["stop", "-t", "2", "counter"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    assert_eq!(ps_record("counter").unwrap()["ExitCode"], 143);
    assert_eq!(mv(&["rm", "counter"]).status.code(), Some(0));
}

#[test]
fn commit_keeps_exactly_the_containers_changes() {
    let Some(k) = kernel_or_skip("commit_keeps_exactly_the_containers_changes") else {
        return;
    };
    let _cleanup = Cleanup::new(&["tocommit", "livecommit"]);
    let k = k.to_str().unwrap();
    let img = image();
    // Created, changed and deleted files, a directory replaced whole, a hard link, a symlink.
    let script = "echo new > /etc/newfile; rm /etc/app/new; rm -rf /etc/app; mkdir /etc/app; \
                  echo only > /etc/app/only; mkdir -p /opt/d; echo x > /opt/d/f; \
                  ln /opt/d/f /opt/d/hard; ln -s /etc/newfile /opt/link; echo v2 > /etc/app/only";
    let o = mv(&[
        "run", "--name", "tocommit", "-u", "0", "--kernel", k, &img, script,
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    // A stopped container: its diff comes from a short VM.
    let o = mv(&[
        "commit",
        "-c",
        "ENV NEWVAR=yes",
        "-c",
        "WORKDIR /opt",
        "-m",
        "test commit",
        "tocommit",
        "committed:stopped",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    assert!(
        text(&o.stdout).starts_with("sha256:"),
        "{}",
        text(&o.stdout)
    );
    let check =
        "ls /etc/app; cat /etc/app/only /etc/newfile; test -e /etc/gone || echo gone-still-gone; \
                 cat /opt/d/hard; readlink /opt/link; echo $NEWVAR; pwd";
    let o = mv(&[
        "run",
        "--rm",
        "-u",
        "0",
        "--kernel",
        k,
        "committed:stopped",
        check,
    ]);
    assert_eq!(
        text(&o.stdout),
        "only\nv2\nnew\ngone-still-gone\nx\n/etc/newfile\nyes\n/opt\n",
        "{}",
        text(&o.stderr)
    );
    // A running container: its own agent makes the diff while its processes are stopped.
    run_detached(
        Path::new(k),
        "livecommit",
        &["-u", "0"],
        "rm /bin/true; echo live > /live; echo ready; while true; do busybox sleep 0.2; done",
    );
    wait_for_log("livecommit", "ready");
    let o = mv(&["commit", "livecommit", "committed:live"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    // It runs on afterwards.
    let o = mv(&["exec", "livecommit", "echo", "after"]);
    assert_eq!(text(&o.stdout), "after\n", "{}", text(&o.stderr));
    let o = mv(&[
        "run",
        "--rm",
        "--kernel",
        k,
        "committed:live",
        "cat /live; test -e /bin/true && echo true-present || echo true-deleted",
    ]);
    assert_eq!(
        text(&o.stdout),
        "live\ntrue-deleted\n",
        "{}",
        text(&o.stderr)
    );
    // Bad references and instructions are refused before anything is stored.
    for (args, needle) in [
        (
            vec!["commit", "livecommit", "Bad Name!"],
            "invalid image name",
        ),
        (
            vec!["commit", "-c", "RUN make", "livecommit", "x:y"],
            "cannot be changed by commit",
        ),
        (
            vec!["commit", "no-such-container", "x:y"],
            "no such container",
        ),
    ] {
        let o = mv(&args);
        assert_eq!(o.status.code(), Some(125), "{args:?}");
        assert!(
            text(&o.stderr).contains(needle),
            "{args:?}: {}",
            text(&o.stderr)
        );
    }
    assert_eq!(
        mv(&["rm", "-f", "livecommit", "tocommit"]).status.code(),
        Some(0)
    );

    // save: microvm load takes the OCI archive into another store, podman the docker archive.
    let out = temp_dir("lifecycle-save");
    let oci = out.0.join("img.oci.tar");
    let o = mv(&[
        "save",
        "--format",
        "oci-archive",
        "-o",
        oci.to_str().unwrap(),
        "committed:stopped",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let other = out.0.join("store");
    let o = cmd_in(&other, &["load", &format!("oci-archive:{}", oci.display())])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let o = cmd_in(
        &other,
        &[
            "run",
            "--rm",
            "--kernel",
            k,
            "committed:stopped",
            "cat /etc/app/only; echo $NEWVAR",
        ],
    )
    .output()
    .unwrap();
    assert_eq!(text(&o.stdout), "v2\nyes\n", "{}", text(&o.stderr));
    let docker = out.0.join("img.docker.tar");
    let o = mv(&["save", "-o", docker.to_str().unwrap(), "committed:stopped"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    podman_runs_the_saved_image(&docker, &out.0);
}

/// `podman load` of a `microvm save` archive, then `podman run` with its own runtime (runc:
/// crun refuses this fleet's hybrid cgroups), sees the committed changes.
fn podman_runs_the_saved_image(archive: &Path, dir: &Path) {
    if Command::new("podman").arg("--version").output().is_err() {
        skip(
            "podman load of a saved image",
            "podman is not installed (scripts/setup-host installs it)",
        );
        return;
    }
    let root = dir.join("podman");
    let podman = |args: &[&str]| {
        Command::new("podman")
            .args(["--storage-driver", "vfs", "--root"])
            .arg(&root)
            .args(["--runroot"])
            .arg(dir.join("podman-run"))
            .args(["--runtime", "runc"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let o = podman(&["load", "-i", archive.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "podman load: {}", text(&o.stderr));
    let mut run = vec!["run", "--rm"];
    run.extend(PODMAN_RUN_FLAGS);
    run.extend([
        "-u",
        "0",
        "committed:stopped",
        "cat /etc/app/only /etc/newfile; echo $NEWVAR; test -e /etc/app/new || echo new-gone",
    ]);
    let o = podman(&run);
    assert_eq!(
        (o.status.code(), text(&o.stdout)),
        (Some(0), "v2\nnew\nyes\nnew-gone\n".into()),
        "podman run: {}",
        text(&o.stderr)
    );
    let _ = podman(&["rmi", "-a", "-f"]);
}
