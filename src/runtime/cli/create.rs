//! `create`, `run`, and the supervisor `create` starts.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use super::{Cli, Error};
use crate::agent::HostIo;
use crate::backend::Hypervisor;
use crate::cli::foreground::{self, RawTerminal};
use crate::container::ready;
use crate::container::supervisor::{self, Started, Streams};
use crate::runtime::bundle::{Bundle, HostChoices};
use crate::runtime::oci_state::Record;
use crate::runtime::{console, errlog, spawn};

/// `create`'s flags.
#[derive(Debug, clap::Args)]
pub struct CreateArgs {
    /// The bundle directory (config.json and the root).
    #[arg(short, long, default_value = ".")]
    bundle: PathBuf,
    /// Where to send the terminal's master when the process has a terminal.
    #[arg(long)]
    console_socket: Option<PathBuf>,
    /// Where to write the pid of the process that stands for the container.
    #[arg(long)]
    pid_file: Option<PathBuf>,
    /// Accepted for runc compatibility (there is no pivot_root on the host).
    #[arg(long)]
    no_pivot: bool,
    /// Accepted for runc compatibility (keyrings belong to the guest's kernel).
    #[arg(long)]
    no_new_keyring: bool,
    /// Extra descriptors to pass to the process: none can cross into a VM.
    #[arg(long, default_value_t = 0)]
    preserve_fds: u32,
    /// Container id.
    id: String,
}

/// `run`'s flags: `create`'s and --detach.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    #[command(flatten)]
    create: CreateArgs,
    /// Return once the process runs instead of waiting for it.
    #[arg(short, long)]
    detach: bool,
}

/// `create`: the record, the terminal, and a supervisor that boots the VM and reports the
/// process ready; then the pid file.
pub fn create(cli: &Cli, args: &CreateArgs) -> Result<(), Error> {
    crate::runtime::check_id(&args.id)?;
    if args.preserve_fds > 0 {
        return Err(Error::Other(format!(
            "--preserve-fds {}: descriptors cannot be passed into a VM",
            args.preserve_fds
        )));
    }
    let bundle = Bundle::load(&args.bundle)?;
    let choices = HostChoices {
        hypervisor: cli.hypervisor,
    };
    let (config, console_size) = bundle.config(&args.id, &choices, &mut |w| errlog::warn(&w))?;
    let tty = config.process.tty;
    console::check(tty, args.console_socket.as_deref())?;
    if config.hypervisor == Hypervisor::Qemu {
        errlog::warn(&format!(
            "container {}: the qemu backend emulates the guest (TCG), which is not a hardware isolation boundary",
            args.id
        ));
    }
    let store = cli.containers()?;
    let c = store
        .create_with_id(&args.id, |_, _| config)
        .map_err(|e| match e {
            crate::container::Error::NameInUse { .. } => Error::Exists(args.id.clone()),
            e => e.into(),
        })?;
    let started = (|| {
        Record {
            bundle: bundle.dir.clone(),
            annotations: bundle.annotations(),
        }
        .write(c.dir())?;
        let terminal = match &args.console_socket {
            Some(socket) => Some(console::hand_over(socket, console_size)?.slave),
            None => None,
        };
        let mut helper_args = cli.helper_args();
        helper_args.extend::<[OsString; 2]>(["supervise".into(), args.id.clone().into()]);
        spawn::helper(&helper_args, terminal)
    })();
    let fail = |e: Error| {
        // The supervisor (if any) is ending; the record goes with it.
        c.wait_supervisor(Some(Duration::from_secs(10)));
        let _ = c.remove();
        Err(e)
    };
    match started {
        Ok((pid, Started::Created | Started::Running)) => {
            if let Some(path) = &args.pid_file {
                if let Err(e) = spawn::write_pid_file(path, pid) {
                    // The engine cannot track a container whose pid it does not have.
                    let stop = crate::container::control::Request::Stop { timeout: 0.0 };
                    let _ = crate::container::control::request(&c, &stop);
                    return fail(e);
                }
            }
            if cli.debug {
                let ms = crate::timing::since_start().as_secs_f64() * 1e3;
                errlog::info(&format!("container {}: created in {ms:.1} ms", args.id));
            }
            Ok(())
        }
        Ok((_, Started::Failed { message, .. })) => fail(Error::Other(message)),
        Err(e) => fail(e),
    }
}

/// `run`: `create`, `start`, and (without --detach) wait for the process and return its
/// status.
pub fn run(cli: &Cli, args: &RunArgs) -> Result<i32, Error> {
    create(cli, &args.create)?;
    let id = &args.create.id;
    super::lifecycle::start(cli, id)?;
    if args.detach {
        return Ok(0);
    }
    let c = cli.container(id)?;
    c.wait_supervisor(None);
    let code = c.state()?.exit_code.unwrap_or(super::EXIT_FAILURE);
    let _ = c.remove();
    Ok(code)
}

/// The supervisor: runs the container's VM with the engine's stdio (or the terminal `create`
/// made) relayed to its process, forwards the signals it gets to the process, and exits with
/// the process's status, which the engine reads as the container's.
pub fn supervise(cli: &Cli, id: &str) -> i32 {
    let mut ready_pipe = ready::take_pipe();
    let mut report_failure = |message: String| {
        if let Some(pipe) = ready_pipe.take() {
            ready::report(
                pipe,
                &Started::Failed {
                    code: super::EXIT_FAILURE,
                    message,
                },
            );
        }
    };
    // Before any thread starts.
    let signals = match foreground::block_signals() {
        Ok(s) => s,
        Err(e) => {
            report_failure(e);
            return super::EXIT_FAILURE;
        }
    };
    let c = match cli.container(id) {
        Ok(c) => c,
        Err(e) => {
            report_failure(e.to_string());
            return super::EXIT_FAILURE;
        }
    };
    let tty = c.config.process.tty;
    let raw = tty.then(RawTerminal::enable).flatten();
    let winsize = if tty {
        foreground::terminal_size()
    } else {
        None
    };
    let ready_pipe = ready_pipe.take();
    // Whether `create` heard of a start; if not, it reports the failure itself.
    let created = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let created_flag = created.clone();
    let ready: supervisor::ReadyFn = Box::new(move |started| {
        let ok = matches!(started, Started::Created | Started::Running);
        created_flag.store(ok, std::sync::atomic::Ordering::SeqCst);
        if let Some(pipe) = ready_pipe {
            ready::report(pipe, &started);
        }
    });
    let ended = supervisor::supervise(
        &c,
        Streams::Inherited(HostIo::terminal()),
        winsize,
        ready,
        Some(signals),
    );
    drop(raw);
    match ended {
        Ok(ended) => {
            if cli.debug {
                errlog::info(&format!("container {id}: supervisor {}", ended.timings));
            }
            let created = created.load(std::sync::atomic::Ordering::SeqCst);
            if let Some(e) = ended.error.as_ref().filter(|_| created) {
                // On the container's stderr: the engine's log shows why it ended.
                eprintln!("microvm-runtime: container {id}: {e}");
                for l in &ended.details {
                    eprintln!("{l}");
                }
            }
            ended.code
        }
        Err(e) => {
            eprintln!("microvm-runtime: container {id}: {e}");
            super::EXIT_FAILURE
        }
    }
}
