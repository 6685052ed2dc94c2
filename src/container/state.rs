//! What a container is doing (`state.json` in its directory): written only by its supervisor
//! while one lives, by a command holding the container's lock otherwise, always atomically.

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Docker's container states (`removing` and `dead` have no use here).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Made, never started (or its supervisor is starting the VM).
    Created,
    /// Its process runs.
    Running,
    /// Its VM's vCPUs are stopped.
    Paused,
    /// Its process (or its VM, or its supervisor) ended.
    Exited,
}

impl Status {
    /// The word docker prints.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Created => "created",
            Status::Running => "running",
            Status::Paused => "paused",
            Status::Exited => "exited",
        }
    }
}

/// The state record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct State {
    /// Created, running, paused or exited.
    pub status: Status,
    /// The process's exit status (docker's number: 128 + signal when killed), once exited.
    pub exit_code: Option<i32>,
    /// Seconds since the epoch when the last start began.
    pub started_at: Option<f64>,
    /// Seconds since the epoch when the last run ended.
    pub finished_at: Option<f64>,
    /// The supervisor of the current (or last) run.
    pub supervisor_pid: Option<u32>,
    /// The process's pid inside the guest.
    pub guest_pid: Option<i32>,
    /// Why microvm itself ended the container, when it did (a crash, a dead supervisor).
    pub error: Option<String>,
    /// The current run's directory of sockets and console log (removed when the run ends; `rm`
    /// removes it if a killed supervisor left it).
    pub run_dir: Option<PathBuf>,
    /// `stop` asked this run to end (docker does not restart such a container).
    #[serde(default)]
    pub stopping: bool,
}

impl State {
    /// A container that was never started.
    pub fn created() -> State {
        State {
            status: Status::Created,
            exit_code: None,
            started_at: None,
            finished_at: None,
            supervisor_pid: None,
            guest_pid: None,
            error: None,
            run_dir: None,
            stopping: false,
        }
    }
}

/// Now, in seconds since the Unix epoch.
pub fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// `secs` since the epoch as RFC 3339 in UTC with nanoseconds, as docker's inspect shows times.
pub fn rfc3339(secs: f64) -> String {
    let t = UNIX_EPOCH + std::time::Duration::from_secs_f64(secs.max(0.0));
    humantime::format_rfc3339_nanos(t).to_string()
}

/// Docker's human durations: "Less than a second", "5 seconds", "About a minute", "3 hours".
pub fn human_duration(secs: f64) -> String {
    let s = secs.max(0.0) as u64;
    let plural = |n: u64, unit: &str| format!("{n} {unit}{}", if n == 1 { "" } else { "s" });
    match s {
        0 => "Less than a second".into(),
        1..=59 => plural(s, "second"),
        60..=119 => "About a minute".into(),
        120..=3599 => plural(s / 60, "minute"),
        3600..=7199 => "About an hour".into(),
        7200..=172_799 => plural(s / 3600, "hour"),
        172_800..=1_209_599 => plural(s / 86_400, "day"),
        1_209_600..=5_183_999 => plural(s / 604_800, "week"),
        5_184_000..=63_071_999 => plural(s / 2_592_000, "month"),
        _ => plural(s / 31_536_000, "year"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_like_docker() {
        assert_eq!(human_duration(0.4), "Less than a second");
        assert_eq!(human_duration(1.0), "1 second");
        assert_eq!(human_duration(42.0), "42 seconds");
        assert_eq!(human_duration(90.0), "About a minute");
        assert_eq!(human_duration(600.0), "10 minutes");
        assert_eq!(human_duration(4000.0), "About an hour");
        assert_eq!(human_duration(3.0 * 86400.0), "3 days");
    }

    #[test]
    fn times_are_rfc3339() {
        assert_eq!(rfc3339(0.5), "1970-01-01T00:00:00.500000000Z");
    }
}
