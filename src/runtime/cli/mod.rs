//! `microvm-runtime`'s command line: runc's commands, flags and exit status (0, or 1 with the
//! error on stderr and in `--log`), parsed here and handed to the container library.

mod create;
mod exec;
mod lifecycle;
mod query;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use super::errlog::{self, Format};
use super::{check_id, Error, DEFAULT_ROOT};
use crate::backend::Hypervisor;
use crate::container::{Container, Containers};

/// Exit status of a failed call (runc's).
pub const EXIT_FAILURE: i32 = 1;

/// The command line.
#[derive(Debug, Parser)]
#[command(
    name = "microvm-runtime",
    about = "An OCI runtime with runc's command line that runs each container in its own microVM",
    disable_version_flag = true
)]
pub struct Cli {
    /// Where container state is kept.
    #[arg(long, global = true, default_value = DEFAULT_ROOT)]
    root: PathBuf,
    /// Append errors and warnings to this file.
    #[arg(long, global = true)]
    log: Option<PathBuf>,
    /// Format of `--log`.
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: Format,
    /// Accepted for runc compatibility: a VM is its own cgroup boundary.
    #[arg(long, global = true)]
    systemd_cgroup: bool,
    /// Log more (MICROVM_LOG=debug does the same).
    #[arg(long, global = true)]
    debug: bool,
    /// Accepted for runc compatibility.
    #[arg(long, global = true, value_name = "true|false|auto")]
    rootless: Option<String>,
    /// Backend for containers whose bundle has no `io.microvm.hypervisor` annotation: `kvm`
    /// (default), or `qemu` (emulated: not a hardware isolation boundary).
    #[arg(long, global = true, env = "MICROVM_HYPERVISOR", value_enum)]
    hypervisor: Option<Hypervisor>,
    /// Print the version.
    #[arg(short = 'v', long)]
    version: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

/// runc's commands.
#[derive(Debug, Subcommand)]
enum Command {
    /// Create a container from a bundle: its VM boots and its process waits for `start`.
    Create(create::CreateArgs),
    /// Let a created container's process run.
    Start {
        /// Container id.
        id: String,
    },
    /// Create and start a container, and wait for it unless --detach.
    Run(create::RunArgs),
    /// Send a signal to the container's process (or, with --all, every process in its VM).
    Kill {
        /// Every process in the VM.
        #[arg(short, long)]
        all: bool,
        /// Container id.
        id: String,
        /// Signal name or number.
        #[arg(default_value = "SIGTERM")]
        signal: String,
    },
    /// Remove a container's state (a running one only with --force).
    Delete {
        /// Kill a running container first.
        #[arg(short, long)]
        force: bool,
        /// Container id.
        id: String,
    },
    /// Print the container's OCI state.
    State {
        /// Container id.
        id: String,
    },
    /// List containers.
    List {
        /// table or json.
        #[arg(short, long, default_value = "table")]
        format: String,
        /// Print ids only.
        #[arg(short, long)]
        quiet: bool,
    },
    /// List the container's processes (json: the host processes that stand for them).
    Ps {
        /// table or json.
        #[arg(short, long, default_value = "table")]
        format: String,
        /// Container id.
        id: String,
        /// ps(1) options (ignored: the table comes from the guest).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        ps_args: Vec<String>,
    },
    /// Run another process in the container's VM.
    Exec(exec::ExecArgs),
    /// Stop the VM's vCPUs.
    Pause {
        /// Container id.
        id: String,
    },
    /// Let a paused container run again.
    Resume {
        /// Container id.
        id: String,
    },
    /// Print what this runtime supports (JSON).
    Features,
    /// Change a container's resources (within its VM's fixed size).
    Update(lifecycle::UpdateArgs),
    /// The container's supervisor (started by `create`).
    #[command(hide = true)]
    Supervise {
        /// Container id.
        id: String,
    },
    /// An exec's relay (started by `exec --detach`).
    #[command(hide = true)]
    ExecRelay {
        /// Container id.
        id: String,
        /// The exec request.
        request: PathBuf,
    },
}

impl Cli {
    /// The global flags a helper (supervisor, exec relay) is started with: the same root,
    /// log and debug setting.
    fn helper_args(&self) -> Vec<std::ffi::OsString> {
        let mut args: Vec<std::ffi::OsString> = vec!["--root".into(), self.root.clone().into()];
        if let Some(log) = &self.log {
            args.push("--log".into());
            args.push(log.clone().into());
            args.push("--log-format".into());
            args.push(match self.log_format {
                Format::Json => "json".into(),
                Format::Text => "text".into(),
            });
        }
        if self.debug {
            args.push("--debug".into());
        }
        args
    }

    fn containers(&self) -> Result<Containers, Error> {
        Ok(Containers::open(&self.root)?)
    }

    /// The container with exactly this id.
    fn container(&self, id: &str) -> Result<Container, Error> {
        check_id(id)?;
        match self.containers()?.get(id) {
            Ok(c) => Ok(c),
            Err(crate::container::Error::NotFound(_)) => Err(Error::NotFound(id.to_string())),
            Err(e) => Err(e.into()),
        }
    }
}

/// Runs the parsed command line; returns the exit status.
pub fn run(cli: Cli) -> i32 {
    errlog::init(cli.log.clone(), cli.log_format);
    if cli.version {
        println!(
            "microvm-runtime version {}\nspec: {}",
            env!("CARGO_PKG_VERSION"),
            super::oci_state::OCI_VERSION
        );
        return 0;
    }
    let Some(command) = &cli.command else {
        errlog::error("no command given: see microvm-runtime --help");
        return EXIT_FAILURE;
    };
    let result = match command {
        Command::Create(args) => create::create(&cli, args).map(|()| 0),
        Command::Run(args) => create::run(&cli, args),
        Command::Supervise { id } => return create::supervise(&cli, id),
        Command::Start { id } => lifecycle::start(&cli, id).map(|()| 0),
        Command::Kill { all, id, signal } => lifecycle::kill(&cli, id, signal, *all).map(|()| 0),
        Command::Delete { force, id } => lifecycle::delete(&cli, id, *force).map(|()| 0),
        Command::Pause { id } => lifecycle::pause(&cli, id, true).map(|()| 0),
        Command::Resume { id } => lifecycle::pause(&cli, id, false).map(|()| 0),
        Command::Update(args) => lifecycle::update(&cli, args).map(|()| 0),
        Command::State { id } => query::state(&cli, id).map(|()| 0),
        Command::List { format, quiet } => query::list(&cli, format, *quiet).map(|()| 0),
        Command::Ps { format, id, .. } => query::ps(&cli, id, format).map(|()| 0),
        Command::Features => query::features().map(|()| 0),
        Command::Exec(args) => exec::exec(&cli, args),
        Command::ExecRelay { id, request } => return exec::relay(&cli, id, request),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            errlog::error(&e.to_string());
            EXIT_FAILURE
        }
    }
}
