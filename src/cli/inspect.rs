//! `microvm inspect CONTAINER...`: the records as a JSON array, in docker's shape where docker
//! has a field for it.

use clap::Args;
use serde_json::json;

use super::{error_line, EXIT_MICROVM_ERROR};
use crate::container::state::rfc3339;
use crate::container::{self, Container, RootSource, Status};
use crate::network::NetworkConfig;

/// Flags of `microvm inspect`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// Containers (name, id or unique id prefix).
    #[arg(value_name = "CONTAINER", required = true)]
    pub containers: Vec<String>,
}

/// The JSON docker's `inspect` would show for `c`, as far as it applies to a VM.
pub fn inspect_json(c: &Container) -> Result<serde_json::Value, container::Error> {
    let s = c.state()?;
    let cfg = &c.config;
    let time = |t: Option<f64>| t.map_or("0001-01-01T00:00:00Z".to_string(), rfc3339);
    let (image, image_digest) = match &cfg.root {
        RootSource::Image { reference, digest } => (reference.clone(), Some(digest.clone())),
        RootSource::Directory(d) => (d.display().to_string(), None),
        RootSource::Bundle { rootfs, .. } => (rootfs.display().to_string(), None),
    };
    let running = matches!(s.status, Status::Running | Status::Paused);
    Ok(json!({
        "Id": cfg.id,
        "Name": format!("/{}", cfg.name),
        "Created": rfc3339(cfg.created),
        "Path": cfg.process.argv.first(),
        "Args": cfg.process.argv.get(1..).unwrap_or_default(),
        "State": {
            "Status": s.status.as_str(),
            "Running": running,
            "Paused": s.status == Status::Paused,
            "ExitCode": s.exit_code.unwrap_or(0),
            "Error": s.error.clone().unwrap_or_default(),
            "StartedAt": time(s.started_at),
            "FinishedAt": time(s.finished_at),
            "Pid": if running { s.supervisor_pid } else { None },
            "SupervisorPid": s.supervisor_pid,
            "GuestPid": s.guest_pid,
            "RunDir": s.run_dir,
        },
        "Image": image_digest,
        "ImageName": image,
        "Mounts": cfg.volumes.iter().map(|v| json!({
            "Type": "bind",
            "Source": v.source,
            "Destination": v.target,
            "RW": !v.read_only,
            "Kind": v.kind,
        })).collect::<Vec<_>>(),
        "Config": {
            "Hostname": if cfg.hostname.is_empty() { "microvm" } else { &cfg.hostname },
            "User": cfg.process.user,
            "Tty": cfg.process.tty,
            "OpenStdin": cfg.process.stdin,
            "Env": cfg.process.env,
            "Cmd": cfg.process.argv,
            "WorkingDir": cfg.process.cwd,
            "StopSignal": cfg.stop_signal,
            "Image": image,
        },
        "HostConfig": {
            "AutoRemove": cfg.auto_remove,
            "Hypervisor": cfg.hypervisor,
            "Kernel": cfg.kernel,
            "Memory": cfg.memory_mib << 20,
            "NanoCpus": u64::from(cfg.cpus) * 1_000_000_000,
            "Timeout": cfg.timeout,
            "NetworkMode": cfg.network.mode.name(),
            "Dns": cfg.network.dns,
        },
        "NetworkSettings": network_settings(&cfg.network),
        "SandboxLayer": c.scratch(),
        "LogPath": c.dir().join("container.log"),
    }))
}

/// docker's NetworkSettings: the guest's addresses (the namespace's veth is read now) and the
/// published ports.
fn network_settings(net: &NetworkConfig) -> serde_json::Value {
    let spec = net.guest_spec();
    let spec = spec.as_ref();
    let first =
        |v4: bool| spec.and_then(|s| s.addresses.iter().find(|a| a.address.is_ipv4() == v4));
    let gateway = |v4: bool| {
        spec.and_then(|s| {
            s.routes
                .iter()
                .filter(|r| r.destination.is_none())
                .find_map(|r| r.gateway.filter(|g| g.is_ipv4() == v4))
        })
    };
    let text = |v: Option<String>| v.unwrap_or_default();
    let mut ports = serde_json::Map::new();
    for p in &net.ports {
        ports.insert(
            format!("{}/{}", p.container_port, p.protocol),
            json!([{
                "HostIp": p.host_ip.map_or("0.0.0.0".to_string(), |ip| ip.to_string()),
                "HostPort": p.host_port.to_string(),
            }]),
        );
    }
    json!({
        "Mode": net.mode.name(),
        "IPAddress": text(first(true).map(|a| a.address.to_string())),
        "IPPrefixLen": first(true).map_or(0, |a| a.prefix_len),
        "Gateway": text(gateway(true).map(|g| g.to_string())),
        "GlobalIPv6Address": text(first(false).map(|a| a.address.to_string())),
        "GlobalIPv6PrefixLen": first(false).map_or(0, |a| a.prefix_len),
        "IPv6Gateway": text(gateway(false).map(|g| g.to_string())),
        "MacAddress": text(spec.map(|s| microvm_agent_protocol::mac_text(&s.mac))),
        "Ports": ports,
    })
}

/// Runs `microvm inspect`.
pub fn inspect(args: InspectArgs) -> i32 {
    let mut out = Vec::new();
    let mut status = 0;
    for name in &args.containers {
        match container::containers()
            .and_then(|s| s.resolve(name))
            .and_then(|c| inspect_json(&c))
        {
            Ok(v) => out.push(v),
            Err(e) => {
                error_line(e);
                status = EXIT_MICROVM_ERROR;
            }
        }
    }
    println!(
        "{}",
        serde_json::to_string_pretty(&out).unwrap_or_else(|_| "[]".into())
    );
    status
}
