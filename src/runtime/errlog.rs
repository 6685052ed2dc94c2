//! runc's error reporting: every error on stderr, and with `--log FILE` also appended to that
//! file as a text line or (`--log-format json`) a JSON line with `level`, `msg` and `time`,
//! which podman and containerd read back to show why a runtime call failed.

use std::io::Write;
use std::path::PathBuf;
use std::sync::OnceLock;

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// logrus's text lines.
    Text,
    /// JSON lines.
    Json,
}

static LOG: OnceLock<(Option<PathBuf>, Format)> = OnceLock::new();

/// Sets where messages go besides stderr; first call wins.
pub fn init(path: Option<PathBuf>, format: Format) {
    let _ = LOG.set((path, format));
}

/// One log line in `format`.
fn line(format: Format, level: &str, msg: &str, time: &str) -> String {
    match format {
        Format::Json => serde_json::json!({"level": level, "msg": msg, "time": time}).to_string(),
        Format::Text => format!("time={:?} level={level} msg={:?}", time, msg),
    }
}

fn log(level: &str, msg: &str, to_stderr: bool) {
    if to_stderr {
        eprintln!("microvm-runtime: {msg}");
    }
    if let Some((Some(path), format)) = LOG.get() {
        let time = crate::container::state::rfc3339(crate::container::state::now());
        let text = line(*format, level, msg, &time);
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = writeln!(f, "{text}");
        }
    }
}

/// An error: on stderr and in the log.
pub fn error(msg: &str) {
    log("error", msg, true);
}

/// A note for `--debug` runs (timings): in the log only.
pub fn info(msg: &str) {
    log("info", msg, false);
}

/// A warning: in the log only, unless there is none (engines show a runtime's stderr as a
/// failure on some calls).
pub fn warn(msg: &str) {
    let has_log = matches!(LOG.get(), Some((Some(_), _)));
    log("warning", msg, !has_log);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_what_engines_parse() {
        let j = line(Format::Json, "error", "container \"x\" does not exist", "T");
        let v: serde_json::Value = serde_json::from_str(&j).unwrap();
        assert_eq!(v["level"], "error");
        assert_eq!(v["msg"], "container \"x\" does not exist");
        assert_eq!(v["time"], "T");
        assert_eq!(
            line(Format::Text, "warning", "a \"b\"", "T"),
            r#"time="T" level=warning msg="a \"b\"""#
        );
    }
}
