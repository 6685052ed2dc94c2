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
    // -t 1, then SIGKILL: the bound is -t + 1 s; the CLI's own start and exit add a
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
    run_detached(
        &k,
        "signals",
        &[],
        "trap 'echo got-usr1' USR1; echo ready; while true; do busybox sleep 0.1; done",
    );
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
    // Its helpers (QEMU, virtiofsd) die with it (PDEATHSIG); give them a moment.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !processes_mentioning(&vol.0.display().to_string()).is_empty()
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
        (vec!["run", "--rn", &img], "--rm"),
        (vec!["run", "--hypervisr", "qemu", &img], "--hypervisor"),
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
