//! `state`, `list`, `ps` and `features`.

use super::{Cli, Error};
use crate::runtime::{capabilities, oci_state};

/// `state`: the OCI state document.
pub fn state(cli: &Cli, id: &str) -> Result<(), Error> {
    let c = cli.container(id)?;
    let doc = oci_state::document(&c)?;
    println!(
        "{}",
        serde_json::to_string_pretty(&doc).map_err(|e| Error::Other(e.to_string()))?
    );
    Ok(())
}

/// `list`: every container, as a table, ids, or JSON.
pub fn list(cli: &Cli, format: &str, quiet: bool) -> Result<(), Error> {
    let all = cli.containers()?.list_any_id()?;
    let mut docs = Vec::with_capacity(all.len());
    for c in &all {
        // A record half-removed by a concurrent delete is skipped.
        if let Ok(d) = oci_state::document(c) {
            docs.push(d);
        }
    }
    if quiet {
        for d in &docs {
            println!("{}", d["id"].as_str().unwrap_or_default());
        }
        return Ok(());
    }
    match format {
        "json" => println!(
            "{}",
            serde_json::to_string(&docs).map_err(|e| Error::Other(e.to_string()))?
        ),
        "table" => {
            let rows: Vec<Vec<String>> = docs
                .iter()
                .map(|d| {
                    let s = |k: &str| match &d[k] {
                        serde_json::Value::String(s) => s.clone(),
                        other => other.to_string(),
                    };
                    vec![
                        s("id"),
                        s("pid"),
                        s("status"),
                        s("bundle"),
                        s("created"),
                        s("owner"),
                    ]
                })
                .collect();
            let titles = ["ID", "PID", "STATUS", "BUNDLE", "CREATED", "OWNER"].map(String::from);
            crate::cli::table::print(&titles, &rows);
        }
        other => {
            return Err(Error::Other(format!(
                "invalid format option {other:?}: table or json"
            )))
        }
    }
    Ok(())
}

/// `ps`: as JSON, the host processes that stand for the container's (its supervisor and its
/// exec relays: what an engine may wait on or signal); as a table, the processes in the VM.
pub fn ps(cli: &Cli, id: &str, format: &str) -> Result<(), Error> {
    let c = cli.container(id)?;
    let (status, pid) = oci_state::status(&c)?;
    if status == "stopped" {
        return Err(Error::NotRunning);
    }
    match format {
        "json" => {
            let mut pids = vec![pid];
            pids.extend(crate::runtime::cli::exec::relays(&c));
            println!(
                "{}",
                serde_json::to_string(&pids).map_err(|e| Error::Other(e.to_string()))?
            );
        }
        "table" => {
            let (titles, rows) = crate::container::exec::top(&c)?;
            crate::cli::table::print(&titles, &rows);
        }
        other => {
            return Err(Error::Other(format!(
                "invalid format option {other:?}: table or json"
            )))
        }
    }
    Ok(())
}

/// `features`: what this runtime supports, in the shape of runc's `features` document.
pub fn features() -> Result<(), Error> {
    let caps: Vec<&str> = capabilities::all().collect();
    let annotations = [
        crate::runtime::bundle::ANNOTATION_CPUS,
        crate::runtime::bundle::ANNOTATION_MEMORY,
        crate::runtime::bundle::ANNOTATION_KERNEL,
        crate::runtime::bundle::ANNOTATION_HYPERVISOR,
    ]
    .join(",");
    let doc = serde_json::json!({
        "ociVersionMin": "1.0.0",
        "ociVersionMax": oci_state::OCI_VERSION,
        "hooks": [],
        "mountOptions": [
            "ro", "rw", "nosuid", "suid", "nodev", "dev", "noexec", "exec", "sync", "async",
            "dirsync", "noatime", "atime", "nodiratime", "diratime", "relatime", "norelatime",
            "strictatime", "nostrictatime", "bind", "rbind", "private", "rprivate", "shared",
            "rshared", "slave", "rslave"
        ],
        "linux": {
            "namespaces": ["cgroup", "ipc", "mount", "network", "pid", "user", "uts"],
            "capabilities": caps,
            "cgroup": {"v1": false, "v2": true, "systemd": false, "systemdUser": false},
            "seccomp": {"enabled": false},
            "apparmor": {"enabled": false},
            "selinux": {"enabled": false}
        },
        "annotations": {
            "io.microvm.isolation": "vm",
            "io.microvm.annotations": annotations
        }
    });
    println!(
        "{}",
        serde_json::to_string_pretty(&doc).map_err(|e| Error::Other(e.to_string()))?
    );
    Ok(())
}
