//! What the runtime keeps beside a container's record (`oci.json`: the bundle and its
//! annotations) and the OCI runtime spec's state document built from both.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::Error;
use crate::container::{Container, Status};

/// The OCI runtime spec version we implement.
pub const OCI_VERSION: &str = "1.0.2";
const RECORD: &str = "oci.json";

/// The bundle a container was created from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The bundle directory.
    pub bundle: PathBuf,
    /// Its annotations.
    pub annotations: HashMap<String, String>,
}

impl Record {
    /// Writes the record into `dir` (a container directory).
    pub fn write(&self, dir: &Path) -> Result<(), Error> {
        let path = dir.join(RECORD);
        let bytes = serde_json::to_vec_pretty(self).map_err(|e| Error::Other(e.to_string()))?;
        std::fs::write(&path, bytes)
            .map_err(|e| Error::Other(format!("cannot write {}: {e}", path.display())))
    }

    /// Reads the record of `c`.
    pub fn read(c: &Container) -> Result<Record, Error> {
        let path = c.dir().join(RECORD);
        let bytes = std::fs::read(&path)
            .map_err(|e| Error::Other(format!("cannot read {}: {e}", path.display())))?;
        serde_json::from_slice(&bytes)
            .map_err(|e| Error::Other(format!("{} is damaged: {e}", path.display())))
    }
}

/// The OCI status word of `c`: `created`, `running`, `paused` or `stopped`.
pub fn status(c: &Container) -> Result<(&'static str, u32), Error> {
    let s = c.state()?;
    let pid = s.supervisor_pid.unwrap_or(0);
    Ok(match s.status {
        Status::Created if c.supervisor_alive() => ("created", pid),
        Status::Running => ("running", pid),
        Status::Paused => ("paused", pid),
        _ => ("stopped", 0),
    })
}

/// The state document of `c`, as `runc state` prints it.
pub fn document(c: &Container) -> Result<serde_json::Value, Error> {
    let record = Record::read(c)?;
    let (status, pid) = status(c)?;
    let rootfs = match &c.config.root {
        crate::container::RootSource::Bundle { rootfs, .. } => rootfs.clone(),
        _ => PathBuf::new(),
    };
    Ok(serde_json::json!({
        "ociVersion": OCI_VERSION,
        "id": c.config.id,
        "pid": pid,
        "status": status,
        "bundle": record.bundle,
        "rootfs": rootfs,
        "created": crate::container::state::rfc3339(c.config.created),
        "owner": "",
        "annotations": record.annotations,
    }))
}
