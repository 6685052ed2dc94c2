//! Diagnostics of both binaries: to stderr, at the level in `MICROVM_LOG` (error, warn, info,
//! debug, trace; default warn).

/// Sets up logging; call once, first thing in `main`.
pub fn init() {
    let level = std::env::var("MICROVM_LOG")
        .ok()
        .and_then(|v| v.parse::<tracing::Level>().ok())
        .unwrap_or(tracing::Level::WARN);
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_target(false)
        .without_time()
        .init();
}
