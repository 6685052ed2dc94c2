//! `microvm ps [-a] [-q] [--format json]`: the containers, running ones by default.

use clap::Args;

use super::{error_line, EXIT_MICROVM_ERROR};
use crate::container::state::{human_duration, now, rfc3339};
use crate::container::{self, Container, State, Status};

/// Flags of `microvm ps`.
#[derive(Debug, Args)]
pub struct PsArgs {
    /// Show every container (default: running ones).
    #[arg(short, long)]
    pub all: bool,
    /// Only ids.
    #[arg(short, long)]
    pub quiet: bool,
    /// `json`: one JSON object per line.
    #[arg(long, value_name = "FORMAT", value_parser = ["json", "table"])]
    pub format: Option<String>,
}

/// One row of `ps`.
#[derive(serde::Serialize)]
#[serde(rename_all = "PascalCase")]
struct Row {
    #[serde(rename = "ID")]
    id: String,
    names: String,
    image: String,
    command: String,
    created_at: String,
    state: &'static str,
    status: String,
    exit_code: Option<i32>,
    ports: String,
}

/// Docker's STATUS column.
pub fn status_text(state: &State) -> String {
    let t = now();
    let since = |x: Option<f64>| human_duration(t - x.unwrap_or(t));
    match state.status {
        Status::Created => "Created".into(),
        Status::Running => format!("Up {}", since(state.started_at)),
        Status::Paused => format!("Up {} (Paused)", since(state.started_at)),
        Status::Exited => format!(
            "Exited ({}) {} ago",
            state.exit_code.unwrap_or(0),
            since(state.finished_at)
        ),
    }
}

fn row(c: &Container, state: &State) -> Row {
    Row {
        id: c.config.id.clone(),
        names: c.config.name.clone(),
        image: c.config.image_name(),
        command: c.config.process.argv.join(" "),
        created_at: rfc3339(c.config.created),
        state: state.status.as_str(),
        status: status_text(state),
        exit_code: (state.status == Status::Exited).then_some(state.exit_code.unwrap_or(0)),
        ports: c
            .config
            .network
            .ports
            .iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join(", "),
    }
}

/// Runs `microvm ps`.
pub fn ps(args: PsArgs) -> i32 {
    let list = match container::containers().and_then(|s| s.list()) {
        Ok(l) => l,
        Err(e) => {
            error_line(e);
            return EXIT_MICROVM_ERROR;
        }
    };
    let mut rows = Vec::new();
    for c in &list {
        let Ok(state) = c.state() else { continue };
        if args.all || matches!(state.status, Status::Running | Status::Paused) {
            rows.push((row(c, &state), c.config.created));
        }
    }
    if args.quiet {
        for (r, _) in rows {
            println!("{}", &r.id[..12]);
        }
    } else if args.format.as_deref() == Some("json") {
        for (r, _) in rows {
            println!("{}", serde_json::to_string(&r).unwrap_or_default());
        }
    } else {
        let t = now();
        let titles = [
            "CONTAINER ID",
            "IMAGE",
            "COMMAND",
            "CREATED",
            "STATUS",
            "PORTS",
            "NAMES",
        ]
        .map(String::from);
        let table: Vec<Vec<String>> = rows
            .iter()
            .map(|(r, created)| {
                vec![
                    r.id[..12].to_string(),
                    clip(&r.image, 24),
                    clip(&format!("\"{}\"", r.command), 24),
                    format!("{} ago", human_duration(t - created)),
                    r.status.clone(),
                    r.ports.clone(),
                    r.names.clone(),
                ]
            })
            .collect();
        super::table::print(&titles, &table);
    }
    0
}

/// `s` cut to `n` characters, with an ellipsis when cut.
fn clip(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(n - 1).collect();
        t.push('…');
        t
    }
}
