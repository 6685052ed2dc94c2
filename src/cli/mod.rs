//! The `microvm` command line: docker-style flags and exit codes.

mod attach;
mod boot;
mod commit;
mod create;
mod exec;
pub mod foreground;
mod image;
mod inspect;
mod logs;
mod pause;
mod ps;
mod registry;
mod rm;
mod run;
mod save;
mod start;
mod stop;
pub mod table;
mod top;
mod vm_args;
mod wait;

use clap::{Parser, Subcommand};

pub use crate::container::launch::{EXIT_MICROVM_ERROR, EXIT_TIMEOUT};

/// microvm: run each container in its own small KVM virtual machine.
#[derive(Debug, Parser)]
#[command(name = "microvm", version, about, propagate_version = true)]
pub struct Cli {
    /// Data directory (images, layer images, kernel cache) [default: $MICROVM_ROOT, then
    /// /var/lib/microvm for root, else $XDG_DATA_HOME/microvm].
    #[arg(long, global = true, value_name = "DIR")]
    pub root: Option<std::path::PathBuf>,
    /// The command to run.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Boot a guest kernel directly and exit with the guest.
    Boot(boot::BootArgs),
    /// Run a command in a new container, in its own VM.
    Run(run::RunArgs),
    /// Create a container without starting it.
    Create(create::CreateArgs),
    /// Start created or exited containers (a fresh VM over the same sandbox layer).
    Start(start::StartArgs),
    /// List containers.
    Ps(ps::PsArgs),
    /// Show containers' records as JSON.
    Inspect(inspect::InspectArgs),
    /// Print a container's output.
    Logs(logs::LogsArgs),
    /// Stop running containers: the stop signal, then SIGKILL after a grace period.
    Stop(stop::StopArgs),
    /// Follow a running container's output and forward signals to it until it exits.
    Attach(attach::AttachArgs),
    /// Make a new image from a container's changes.
    Commit(commit::CommitArgs),
    /// Run another process in a running container's VM.
    Exec(exec::ExecArgs),
    /// Show the processes running in a container's VM.
    Top(top::TopArgs),
    /// Stop running containers' vCPUs (no guest code runs until unpause).
    Pause(pause::PauseArgs),
    /// Let paused containers run again.
    Unpause(pause::PauseArgs),
    /// Send a signal to running containers' processes.
    Kill(stop::KillArgs),
    /// Remove containers and their sandbox layers.
    Rm(rm::RmArgs),
    /// Wait for containers to stop and print their exit codes.
    Wait(wait::WaitArgs),
    /// Manage containers.
    #[command(subcommand)]
    Container(rm::ContainerCommand),
    /// Supervise a container (started by `run -d` and `start`; not for direct use).
    #[command(hide = true)]
    Supervise {
        /// The container's id.
        id: String,
    },
    /// Show what this host offers: KVM, its flavour, the default guest kernel.
    Info,
    /// Load an image from an OCI layout or archive, or a docker archive, into the image store.
    Load(image::LoadArgs),
    /// List loaded images.
    Images(image::ImagesArgs),
    /// Remove image names (their data goes at the next `prune`).
    Rmi(image::RmiArgs),
    /// Remove image data (blobs, converted layers) that no image uses.
    Prune,
    /// Write images to an archive (docker-archive or oci-archive).
    Save(save::SaveArgs),
    /// Download an image from a registry into the image store.
    Pull(registry::PullArgs),
    /// Upload a stored image to a registry.
    Push(registry::PushArgs),
    /// Log in to a registry (the credentials are checked, then kept for pull and push).
    Login(registry::LoginArgs),
    /// Forget a registry's credentials.
    Logout(registry::LogoutArgs),
}

/// Runs the parsed command; returns the process exit status.
pub fn run(cli: Cli) -> i32 {
    if let Some(root) = cli.root {
        crate::host::set_data_dir(root);
    }
    match cli.command {
        Command::Boot(args) => boot::run(args),
        Command::Run(args) => run::run(args),
        Command::Create(args) => create::create(args),
        Command::Start(args) => start::start(args),
        Command::Ps(args) => ps::ps(args),
        Command::Inspect(args) => inspect::inspect(args),
        Command::Logs(args) => logs::logs(args),
        Command::Stop(args) => stop::stop(args),
        Command::Attach(args) => attach::attach(args),
        Command::Commit(args) => commit::commit(args),
        Command::Exec(args) => exec::exec(args),
        Command::Top(args) => top::top(args),
        Command::Kill(args) => stop::kill(args),
        Command::Pause(args) => pause::pause(args, true),
        Command::Unpause(args) => pause::pause(args, false),
        Command::Rm(args) => rm::rm(args),
        Command::Wait(args) => wait::wait(args),
        Command::Container(cmd) => rm::container(cmd),
        Command::Supervise { id } => supervise(&id),
        Command::Info => {
            print!("{}", crate::host::info_report());
            0
        }
        Command::Load(args) => image::load(args),
        Command::Images(args) => image::images(args),
        Command::Rmi(args) => image::rmi(args),
        Command::Prune => image::prune(),
        Command::Save(args) => save::save(args),
        Command::Pull(args) => registry::pull(args),
        Command::Push(args) => registry::push(args),
        Command::Login(args) => registry::login(args),
        Command::Logout(args) => registry::logout(args),
    }
}

/// The detached supervisor's body (`microvm supervise ID`).
fn supervise(id: &str) -> i32 {
    use nix::sys::signal::Signal;
    let signals = match crate::signals::HostSignals::block(&[
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
    ]) {
        Ok(s) => s,
        Err(e) => {
            error_line(e);
            return EXIT_MICROVM_ERROR;
        }
    };
    match crate::container::containers().and_then(|s| s.resolve(id)) {
        Ok(c) => crate::container::supervisor::run_detached(&c, signals),
        Err(e) => {
            error_line(e);
            EXIT_MICROVM_ERROR
        }
    }
}

/// Parses a memory size: a number of MiB, or a number with a `k`, `m` or `g` suffix (docker's
/// spelling; kibibytes must come to whole MiB).
pub fn parse_memory_mib(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, unit) = match t.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => (&t[..i], t[i..].to_ascii_lowercase()),
        None => (t, String::new()),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 512, 512m, 2g)"))?;
    let mib = match unit.trim_end_matches(['b', 'i']) {
        "" | "m" => Some(n),
        "g" => n.checked_mul(1024),
        "k" if n.is_multiple_of(1024) => Some(n / 1024),
        "k" => return Err(format!("{s:?} is not a whole number of MiB")),
        _ => return Err(format!("{s:?}: unknown unit (use k, m or g)")),
    };
    mib.ok_or_else(|| format!("{s:?} is too large"))
}

/// Prints a one-line error the way every command does.
pub fn error_line(msg: impl std::fmt::Display) {
    eprintln!("microvm: {msg}");
}

#[cfg(test)]
mod tests {
    use super::parse_memory_mib;

    #[test]
    fn memory_sizes() {
        for (s, mib) in [
            ("256", 256),
            ("512m", 512),
            ("512M", 512),
            ("2g", 2048),
            ("1GiB", 1024),
            ("2048k", 2),
            ("1mb", 1),
        ] {
            assert_eq!(parse_memory_mib(s), Ok(mib), "{s}");
        }
        for bad in ["", "m", "1.5g", "12x", "1000k", "99999999999999999999g"] {
            assert!(parse_memory_mib(bad).is_err(), "{bad}");
        }
    }
}
