//! Pausing a running VM: every vCPU leaves KVM_RUN and parks before its next guest entry, so
//! no guest code runs until it is resumed (docker's `pause`). [`PauseGate::pause`] returns only
//! once every vCPU is parked; the controller kicks them out of the guest when told through the
//! gate's eventfd. A stop request always releases the gate, so a paused VM can still be stopped.

use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use super::exit::StopSignal;

/// How long `pause` waits for the vCPUs to park (one stuck in a device access parks after it).
const PARK_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Default)]
struct Gate {
    paused: bool,
    parked: usize,
}

/// Shared between the vCPUs, the controller and whoever pauses the VM.
#[derive(Debug)]
pub struct PauseGate {
    gate: Mutex<Gate>,
    changed: Condvar,
    vcpus: usize,
    kick: EventFd,
}

impl PauseGate {
    /// A gate for `vcpus` vCPUs, open.
    pub fn new(vcpus: usize) -> std::io::Result<PauseGate> {
        Ok(PauseGate {
            gate: Mutex::new(Gate::default()),
            changed: Condvar::new(),
            vcpus,
            kick: crate::devices::event_fd()?,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Gate> {
        self.gate.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The eventfd the controller watches: readable when vCPUs must be kicked out of the guest.
    pub fn kick_fd(&self) -> &EventFd {
        &self.kick
    }

    /// Stops the guest: returns once every vCPU is parked, or an error if one did not park in
    /// time (the VM stays paused as far as it can; resume to undo).
    pub fn pause(&self) -> Result<(), String> {
        let mut g = self.lock();
        g.paused = true;
        // A full counter still wakes the controller.
        let _ = self.kick.write(1);
        let deadline = Instant::now() + PARK_TIMEOUT;
        while g.parked < self.vcpus {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                return Err(format!(
                    "{} of {} vCPUs did not stop within {PARK_TIMEOUT:?}",
                    self.vcpus - g.parked,
                    self.vcpus
                ));
            };
            g = self
                .changed
                .wait_timeout(g, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        Ok(())
    }

    /// Lets the vCPUs run again.
    pub fn resume(&self) {
        self.lock().paused = false;
        self.changed.notify_all();
    }

    /// Whether the VM is (being) paused.
    pub fn is_paused(&self) -> bool {
        self.lock().paused
    }

    /// Called by a vCPU before each guest entry: parks while paused, unless the VM is stopping.
    pub fn wait_while_paused(&self, stop: &StopSignal) {
        let mut g = self.lock();
        if !g.paused {
            return;
        }
        g.parked += 1;
        self.changed.notify_all();
        while g.paused && !stop.is_requested() {
            g = self
                .changed
                .wait_timeout(g, Duration::from_millis(100))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        g.parked -= 1;
    }

    /// Wakes parked vCPUs so they see a stop request.
    pub fn release_for_stop(&self) {
        self.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    /// Two fake vCPUs counting "guest entries": paused, neither counts; resumed, both do;
    /// a stop while paused lets them end.
    #[test]
    fn pause_parks_every_vcpu_and_resume_releases_them() {
        let gate = Arc::new(PauseGate::new(2).unwrap());
        let stop = Arc::new(StopSignal::new().unwrap());
        let entries = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let (gate, stop, entries) = (gate.clone(), stop.clone(), entries.clone());
                std::thread::spawn(move || {
                    while !stop.is_requested() {
                        gate.wait_while_paused(&stop);
                        entries.fetch_add(1, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_millis(1));
                    }
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(20));
        gate.pause().unwrap();
        assert!(
            gate.kick_fd().read().is_ok(),
            "the controller was told to kick"
        );
        let before = entries.load(Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(
            entries.load(Ordering::SeqCst),
            before,
            "a vCPU ran while paused"
        );
        gate.resume();
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            entries.load(Ordering::SeqCst) > before,
            "no vCPU ran after resume"
        );
        gate.pause().unwrap();
        stop.request_host_stop();
        gate.release_for_stop();
        for t in threads {
            t.join().unwrap();
        }
    }

    #[test]
    fn a_vcpu_that_never_parks_fails_the_pause() {
        let gate = PauseGate::new(1).unwrap();
        let t = Instant::now();
        // Nobody parks: the real timeout is 5 s; this test accepts that cost once.
        assert!(gate.pause().unwrap_err().contains("did not stop"));
        assert!(t.elapsed() >= PARK_TIMEOUT);
        gate.resume();
        assert!(!gate.is_paused());
    }
}
