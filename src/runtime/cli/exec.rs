//! `exec`: another process in the container's VM (never on the host), from a process.json or
//! flags. With --detach, a relay process carries its stdio (the engine's pipes or a terminal
//! handed over the console socket) and exits with its status; its pid goes in the pid file.

use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use nix::fcntl::{Flock, FlockArg};

use super::{Cli, Error};
use crate::agent::Outcome;
use crate::cli::foreground;
use crate::container::exec::ExecRequest;
use crate::container::ready;
use crate::container::supervisor::Started;
use crate::container::Container;
use crate::runtime::bundle::process_config;
use crate::runtime::{console, errlog, oci_state, spawn};

/// Where live exec relays hold their lock files.
const RELAYS: &str = "execs";

/// `exec`'s flags (runc's).
#[derive(Debug, clap::Args)]
pub struct ExecArgs {
    /// Where to send the terminal's master when the process has a terminal.
    #[arg(long)]
    console_socket: Option<PathBuf>,
    /// Working directory.
    #[arg(long)]
    cwd: Option<String>,
    /// Environment variables (KEY=VALUE).
    #[arg(short, long)]
    env: Vec<String>,
    /// Give the process a terminal.
    #[arg(short, long)]
    tty: bool,
    /// uid[:gid].
    #[arg(short, long)]
    user: Option<String>,
    /// Supplementary groups.
    #[arg(short = 'g', long)]
    additional_gids: Vec<u32>,
    /// The process as a JSON file (the OCI spec's `process`); flags then do not apply.
    #[arg(short, long)]
    process: Option<PathBuf>,
    /// Return once the process runs; a relay carries its streams and status.
    #[arg(short, long)]
    detach: bool,
    /// Where to write the relay's pid (with --detach).
    #[arg(long)]
    pid_file: Option<PathBuf>,
    /// Accepted for runc compatibility.
    #[arg(long)]
    process_label: Option<String>,
    /// Accepted for runc compatibility.
    #[arg(long)]
    apparmor: Option<String>,
    /// Set no_new_privs.
    #[arg(long)]
    no_new_privs: bool,
    /// Capabilities to add.
    #[arg(short, long)]
    cap: Vec<String>,
    /// Extra descriptors: none can cross into a VM.
    #[arg(long, default_value_t = 0)]
    preserve_fds: u32,
    /// Accepted for runc compatibility.
    #[arg(long)]
    cgroup: Option<String>,
    /// Container id.
    id: String,
    /// Command and arguments (without --process).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    command: Vec<String>,
}

/// The process an exec asks for, as the OCI spec's `process`.
fn process(args: &ExecArgs) -> Result<oci_spec::runtime::Process, Error> {
    if let Some(path) = &args.process {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Other(format!("--process {}: {e}", path.display())))?;
        return serde_json::from_str(&text)
            .map_err(|e| Error::Other(format!("--process {}: {e}", path.display())));
    }
    if args.command.is_empty() {
        return Err(Error::Other("exec needs a command (or --process)".into()));
    }
    let mut p = oci_spec::runtime::Process::default();
    p.set_args(Some(args.command.clone()));
    p.set_env(Some(args.env.clone()));
    p.set_terminal(Some(args.tty));
    p.set_cwd(args.cwd.clone().unwrap_or_else(|| "/".into()).into());
    p.set_no_new_privileges(Some(args.no_new_privs));
    // Without --process: root, or --user, and the default capabilities of the bundle are not
    // known here, so none are taken away.
    p.set_capabilities(None);
    // Process::default() carries a nofile limit of its own; flags ask for none.
    p.set_rlimits(None);
    let user = p.user_mut();
    if let Some(u) = &args.user {
        let (uid, gid) = u.split_once(':').unwrap_or((u, "0"));
        let num = |s: &str| {
            s.parse::<u32>()
                .map_err(|_| Error::Other(format!("--user {u}: expected uid[:gid]")))
        };
        user.set_uid(num(uid)?);
        user.set_gid(num(gid)?);
    }
    if !args.additional_gids.is_empty() {
        user.set_additional_gids(Some(args.additional_gids.clone()));
    }
    Ok(p)
}

/// `exec`: in the foreground (this process relays and exits with the status), or detached
/// behind a relay.
pub fn exec(cli: &Cli, args: &ExecArgs) -> Result<i32, Error> {
    let c = cli.container(&args.id)?;
    match oci_state::status(&c)?.0 {
        "running" => {}
        "paused" => return Err(Error::Other("cannot exec in a paused container".into())),
        "created" => {
            return Err(Error::Other(
                "cannot exec in a created container: start it first".into(),
            ))
        }
        _ => return Err(Error::Other("cannot exec in a stopped container".into())),
    }
    if args.preserve_fds > 0 {
        return Err(Error::Other(format!(
            "--preserve-fds {}: descriptors cannot be passed into a VM",
            args.preserve_fds
        )));
    }
    let p = process(args)?;
    let (mut cfg, console_size) =
        process_config(&p, &mut |w| errlog::warn(&w)).map_err(Error::Other)?;
    if args.process.is_none() && args.additional_gids.is_empty() {
        // Flags without -g: the user's groups from the guest's /etc/group.
        cfg.options.groups = None;
    }
    if !args.cap.is_empty() {
        errlog::warn("--cap is ignored: exec processes keep the capabilities their user has");
    }
    let req = ExecRequest {
        argv: cfg.argv,
        env: cfg.env,
        workdir: Some(cfg.cwd),
        user: Some(cfg.user),
        tty: cfg.tty,
        stdin: true,
        detach: false,
        winsize: console_size,
        options: Some(cfg.options),
    };
    if !args.detach {
        if args.console_socket.is_some() {
            return Err(Error::Other("--console-socket is only for --detach".into()));
        }
        return Ok(foreground(&c, req));
    }
    console::check(req.tty, args.console_socket.as_deref())?;
    let terminal = match &args.console_socket {
        Some(socket) => Some(console::hand_over(socket, console_size)?.slave),
        None => None,
    };
    let request_path = c.dir().join(format!(
        "exec-{}-{}.json",
        std::process::id(),
        crate::timing::since_start().as_nanos()
    ));
    let bytes = serde_json::to_vec(&req).map_err(|e| Error::Other(e.to_string()))?;
    std::fs::write(&request_path, bytes)
        .map_err(|e| Error::Other(format!("cannot write {}: {e}", request_path.display())))?;
    let mut helper_args = cli.helper_args();
    helper_args.extend::<[OsString; 3]>([
        "exec-relay".into(),
        args.id.clone().into(),
        request_path.clone().into(),
    ]);
    let started = spawn::helper(&helper_args, terminal);
    let _ = std::fs::remove_file(&request_path);
    match started? {
        (pid, Started::Running | Started::Created) => {
            if let Some(path) = &args.pid_file {
                spawn::write_pid_file(path, pid)?;
            }
            Ok(0)
        }
        (_, Started::Failed { message, .. }) => Err(Error::Other(message)),
    }
}

/// Runs `req` with this process's stdio, forwarding signals; returns the exit status.
fn foreground(c: &Container, req: ExecRequest) -> i32 {
    let signals = match foreground::block_signals() {
        Ok(s) => s,
        Err(e) => {
            errlog::error(&e);
            return super::EXIT_FAILURE;
        }
    };
    match foreground::exec_here(c, req, signals, |_| {}) {
        Ok(Outcome::Exited(status)) => status.as_shell_code(),
        Ok(Outcome::StartFailed { kind, message }) => {
            errlog::error(&message);
            kind.shell_code(super::EXIT_FAILURE)
        }
        Err(e) => {
            errlog::error(&e.to_string());
            super::EXIT_FAILURE
        }
    }
}

/// The exec relay: reads its request, reports the process's start, relays its streams, and
/// exits with its status.
pub fn relay(cli: &Cli, id: &str, request: &Path) -> i32 {
    let mut ready = ready::take_pipe();
    let mut fail = |message: String| {
        if let Some(pipe) = ready.take() {
            let code = super::EXIT_FAILURE;
            ready::report(pipe, &Started::Failed { code, message });
        }
        super::EXIT_FAILURE
    };
    let signals = match foreground::block_signals() {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    let c = match cli.container(id) {
        Ok(c) => c,
        Err(e) => return fail(e.to_string()),
    };
    let req: ExecRequest = match std::fs::read(request)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
    {
        Ok(r) => r,
        Err(e) => return fail(format!("exec request {}: {e}", request.display())),
    };
    let _ = std::fs::remove_file(request);
    let _registration = match register(&c) {
        Ok(r) => r,
        Err(e) => return fail(e),
    };
    let ready_pipe = Mutex::new(ready.take());
    let on_started = |_pid: i32| {
        if let Some(pipe) = ready_pipe.lock().unwrap_or_else(|e| e.into_inner()).take() {
            ready::report(pipe, &Started::Running);
        }
    };
    // The engine may have sized the terminal it got before this relay started: exec_here
    // passes that size on when process.json had none.
    let outcome = foreground::exec_here(&c, req, signals, on_started);
    let pipe = ready_pipe.lock().unwrap_or_else(|e| e.into_inner()).take();
    let (code, message) = match outcome {
        Ok(Outcome::Exited(status)) => (status.as_shell_code(), None),
        Ok(Outcome::StartFailed { kind, message }) => {
            (kind.shell_code(super::EXIT_FAILURE), Some(message))
        }
        Err(e) => (super::EXIT_FAILURE, Some(e.to_string())),
    };
    match (pipe, message) {
        // It never started: the `exec` call reports why.
        (Some(pipe), Some(message)) => ready::report(pipe, &Started::Failed { code, message }),
        (_, Some(message)) => eprintln!("microvm-runtime: exec in {id}: {message}"),
        _ => {}
    }
    code
}

/// Holds `execs/<pid>.lock` in the container's directory while this relay lives, so that
/// `ps` can list it; the file goes when the relay ends.
struct Registration {
    path: PathBuf,
    _lock: Flock<File>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn register(c: &Container) -> Result<Registration, String> {
    let dir = c.dir().join(RELAYS);
    std::fs::create_dir_all(&dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
    let path = dir.join(format!("{}.lock", std::process::id()));
    let file = File::create(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let lock = Flock::lock(file, FlockArg::LockExclusiveNonblock)
        .map_err(|(_, e)| format!("lock {}: {e}", path.display()))?;
    Ok(Registration { path, _lock: lock })
}

/// The pids of `c`'s live exec relays.
pub fn relays(c: &Container) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir(c.dir().join(RELAYS)) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let pid = e
                .file_name()
                .to_str()?
                .strip_suffix(".lock")?
                .parse::<u32>()
                .ok()?;
            let file = File::open(e.path()).ok()?;
            // A lock we can take belongs to nobody: a relay that died without cleaning up.
            match Flock::lock(file, FlockArg::LockSharedNonblock) {
                Ok(_) => {
                    let _ = std::fs::remove_file(e.path());
                    None
                }
                Err(_) => Some(pid),
            }
        })
        .collect()
}
