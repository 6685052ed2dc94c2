//! Start-up accounting: time since process start, and the share of it spent inside KVM ioctls,
//! so that the boot marker can say where the milliseconds went.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

static START: OnceLock<Instant> = OnceLock::new();
static KVM_NANOS: AtomicU64 = AtomicU64::new(0);
static SETUP_NANOS: AtomicU64 = AtomicU64::new(0);

/// Records the process start; call first thing in `main`. Later calls are no-ops.
pub fn mark_process_start() {
    START.get_or_init(Instant::now);
}

/// Time since [`mark_process_start`] (or since the first call of this function).
pub fn since_start() -> Duration {
    START.get_or_init(Instant::now).elapsed()
}

/// Runs one KVM ioctl (or a group of them) and adds its duration to the KVM share.
pub fn kvm<T>(f: impl FnOnce() -> T) -> T {
    let t = Instant::now();
    let r = f();
    KVM_NANOS.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
    r
}

/// Records that set-up is over and the first vCPU is about to enter the guest.
pub fn mark_setup_done() {
    let _ = SETUP_NANOS.compare_exchange(
        0,
        since_start().as_nanos() as u64,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
}

/// A snapshot of the start-up accounting.
#[derive(Debug, Clone, Copy)]
pub struct Breakdown {
    /// Time since process start.
    pub total: Duration,
    /// Time from process start until the first vCPU entered the guest.
    pub setup: Duration,
    /// Part of `setup` spent inside KVM ioctls.
    pub kvm: Duration,
}

impl Breakdown {
    /// Takes the snapshot now.
    pub fn now() -> Self {
        Breakdown {
            total: since_start(),
            setup: Duration::from_nanos(SETUP_NANOS.load(Ordering::Relaxed)),
            kvm: Duration::from_nanos(KVM_NANOS.load(Ordering::Relaxed)),
        }
    }
}

impl std::fmt::Display for Breakdown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        write!(
            f,
            "{:.3} ms since start (set-up {:.3} ms: KVM ioctls {:.3} ms, microvm {:.3} ms; guest {:.3} ms)",
            ms(self.total),
            ms(self.setup),
            ms(self.kvm),
            ms(self.setup.saturating_sub(self.kvm)),
            ms(self.total.saturating_sub(self.setup)),
        )
    }
}
