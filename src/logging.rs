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

/// Whether the `n`th occurrence of something is logged: the 1st, 2nd, 4th, 8th and so on, at
/// most 64 lines over a process's life for one call site, whatever a guest does.
pub fn at_power_of_two(count: &std::sync::atomic::AtomicU64) -> Option<u64> {
    let n = count.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
    n.is_power_of_two().then_some(n)
}

/// `tracing::warn!` for a line a guest can trigger at will (a broken queue, a bad buffer, a
/// connection flood): logged at the 1st, 2nd, 4th, 8th... time at this call site, with the
/// count, so a hostile guest cannot fill the host's log.
#[macro_export]
macro_rules! guest_warn {
    ($($arg:tt)+) => {{
        static SEEN: ::std::sync::atomic::AtomicU64 = ::std::sync::atomic::AtomicU64::new(0);
        if let Some(n) = $crate::logging::at_power_of_two(&SEEN) {
            ::tracing::warn!("{} ({n} so far)", format_args!($($arg)+));
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    #[test]
    fn repeats_are_logged_at_powers_of_two_only() {
        let count = AtomicU64::new(0);
        let logged: Vec<u64> = (0..1000).filter_map(|_| at_power_of_two(&count)).collect();
        assert_eq!(logged, [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]);
        // The macro expands and counts per call site.
        for _ in 0..3 {
            crate::guest_warn!("test line {}", 1);
        }
    }
}
