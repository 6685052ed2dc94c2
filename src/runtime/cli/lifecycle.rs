//! `start`, `kill`, `delete`, `pause`, `resume` and `update`: requests to a container's
//! supervisor, with runc's checks and runc's words for what engines match on.

use std::path::PathBuf;
use std::time::Duration;

use super::{Cli, Error};
use crate::container::control::{self, Request};
use crate::container::{config::parse_signal, Container};
use crate::runtime::oci_state;

/// How long `delete --force` waits for a killed container's supervisor to end.
const DELETE_WAIT: Duration = Duration::from_secs(15);

/// `start`.
pub fn start(cli: &Cli, id: &str) -> Result<(), Error> {
    let c = cli.container(id)?;
    let _lock = c.lock()?;
    match oci_state::status(&c)?.0 {
        "created" => Ok(control::request(&c, &Request::Start)?),
        "stopped" => Err(Error::Other(
            "cannot start a container that has stopped".into(),
        )),
        _ => Err(Error::Other(
            "cannot start an already running container".into(),
        )),
    }
}

/// `kill [--all] ID SIGNAL`.
pub fn kill(cli: &Cli, id: &str, signal: &str, all: bool) -> Result<(), Error> {
    let c = cli.container(id)?;
    let signal = parse_signal(signal).map_err(Error::Other)?;
    let status = oci_state::status(&c)?.0;
    if status == "stopped" {
        return Err(Error::NotRunning);
    }
    let req = if status == "paused" && signal == libc::SIGKILL {
        // Frozen vCPUs cannot take a signal: the VM resumes and is killed.
        Request::Stop { timeout: 0.0 }
    } else if all {
        Request::KillAll { signal }
    } else {
        Request::Kill { signal }
    };
    match control::request(&c, &req) {
        Ok(()) => Ok(()),
        // It ended between the state and the request.
        Err(_) if !c.supervisor_alive() => Err(Error::NotRunning),
        Err(e) => Err(e.into()),
    }
}

/// `delete [--force]`: a stopped or created container goes at once (a created one is killed
/// first, as runc does); a running or paused one only with --force.
pub fn delete(cli: &Cli, id: &str, force: bool) -> Result<(), Error> {
    let c = match cli.container(id) {
        Ok(c) => c,
        Err(Error::NotFound(_)) if force => return Ok(()),
        Err(e) => return Err(e),
    };
    let gone = || {
        if force {
            Ok(())
        } else {
            Err(Error::NotFound(id.to_string()))
        }
    };
    let _lock = match c.lock() {
        Ok(lock) => lock,
        Err(_) if !c.dir().exists() => return gone(),
        Err(e) => return Err(e.into()),
    };
    // Another delete may have removed it while we waited for the lock.
    if !c.dir().join("config.json").exists() {
        return gone();
    }
    let status = oci_state::status(&c)?.0;
    match status {
        "stopped" => {}
        "created" => end(&c)?,
        _ if force => end(&c)?,
        other => {
            return Err(Error::Other(format!(
                "cannot delete container {id} that is not stopped: {other}"
            )))
        }
    }
    control::remove_stale(&c);
    Ok(c.remove()?)
}

/// Kills the container's process (powering its VM off if need be) and waits for the end.
fn end(c: &Container) -> Result<(), Error> {
    if c.supervisor_alive() {
        // A supervisor that ended meanwhile cannot answer; that is the end we wait for.
        let _ = control::request(c, &Request::Stop { timeout: 0.0 });
    }
    if !c.wait_supervisor(Some(DELETE_WAIT)) {
        return Err(Error::Other(format!(
            "container {} did not stop within {} s",
            c.config.id,
            DELETE_WAIT.as_secs()
        )));
    }
    Ok(())
}

/// `pause` (`pause == true`) and `resume`.
pub fn pause(cli: &Cli, id: &str, pause: bool) -> Result<(), Error> {
    let c = cli.container(id)?;
    let _lock = c.lock()?;
    let status = oci_state::status(&c)?.0;
    match (pause, status) {
        (true, "running") => Ok(control::request(&c, &Request::Pause)?),
        (false, "paused") => Ok(control::request(&c, &Request::Unpause)?),
        (false, "running") => Err(Error::Other("container not paused".into())),
        _ => Err(Error::NotRunning),
    }
}

/// `update`'s flags.
#[derive(Debug, clap::Args)]
pub struct UpdateArgs {
    /// A JSON file of linux resources (`-`: stdin).
    #[arg(short, long)]
    resources: Option<PathBuf>,
    /// Memory limit in bytes.
    #[arg(long)]
    memory: Option<String>,
    /// CPU CFS quota in microseconds.
    #[arg(long)]
    cpu_quota: Option<i64>,
    /// CPU CFS period in microseconds.
    #[arg(long)]
    cpu_period: Option<u64>,
    /// CPUs the container may use.
    #[arg(long)]
    cpuset_cpus: Option<String>,
    /// Maximum number of processes.
    #[arg(long)]
    pids_limit: Option<i64>,
    /// Container id.
    id: String,
}

/// `update`: a VM's size is fixed when it boots, so limits that fit inside it are accepted
/// (the VM already holds the container to less), and anything asking for more, or for a
/// control a VM does not have, is refused with the reason.
pub fn update(cli: &Cli, args: &UpdateArgs) -> Result<(), Error> {
    let c = cli.container(&args.id)?;
    if oci_state::status(&c)?.0 == "stopped" {
        return Err(Error::NotRunning);
    }
    let mut resources: oci_spec::runtime::LinuxResources = match &args.resources {
        Some(path) => {
            let text = if path.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin())
            } else {
                std::fs::read_to_string(path)
            }
            .map_err(|e| Error::Other(format!("--resources {}: {e}", path.display())))?;
            serde_json::from_str(&text)
                .map_err(|e| Error::Other(format!("--resources {}: {e}", path.display())))?
        }
        None => Default::default(),
    };
    if let Some(m) = &args.memory {
        let bytes: i64 = m
            .parse()
            .map_err(|_| Error::Other(format!("--memory {m}: expected a number of bytes")))?;
        let mut mem = resources.memory().unwrap_or_default();
        mem.set_limit(Some(bytes));
        resources.set_memory(Some(mem));
    }
    if args.cpu_quota.is_some() || args.cpu_period.is_some() || args.cpuset_cpus.is_some() {
        let mut cpu = resources.cpu().clone().unwrap_or_default();
        if let Some(q) = args.cpu_quota {
            cpu.set_quota(Some(q));
        }
        if let Some(p) = args.cpu_period {
            cpu.set_period(Some(p));
        }
        if let Some(s) = &args.cpuset_cpus {
            cpu.set_cpus(Some(s.clone()));
        }
        resources.set_cpu(Some(cpu));
    }
    if args.pids_limit.is_some() || resources.pids().is_some() {
        return Err(Error::Other(
            "a pids limit cannot be updated: a VM's processes are bounded by its memory".into(),
        ));
    }
    if resources.block_io().is_some()
        || resources.hugepage_limits().is_some()
        || resources.network().is_some()
        || resources.rdma().is_some()
    {
        return Err(Error::Other(
            "only memory and CPU limits can be updated for a VM".into(),
        ));
    }
    let asked_memory = resources.memory().as_ref().and_then(|m| m.limit());
    let asked_cpus = resources.cpu().is_some();
    let (cpus, memory) = crate::runtime::bundle::vm_size(&resources).map_err(Error::Other)?;
    let cfg = &c.config;
    if asked_memory.is_some_and(|l| l > 0) && memory > cfg.memory_mib {
        return Err(Error::Other(format!(
            "container {}: its VM has {} MiB, fixed when it booted; a limit of {} MiB (plus {} MiB for the guest) does not fit",
            cfg.id,
            cfg.memory_mib,
            memory - crate::runtime::bundle::GUEST_OVERHEAD_MIB,
            crate::runtime::bundle::GUEST_OVERHEAD_MIB
        )));
    }
    if asked_cpus && cpus > cfg.cpus {
        return Err(Error::Other(format!(
            "container {}: its VM has {} vCPUs, fixed when it booted; {cpus} do not fit",
            cfg.id, cfg.cpus
        )));
    }
    Ok(())
}
