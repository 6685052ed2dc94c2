//! The virtio-fs device: its virtio face (device id 26, the hiprio queue and one request queue,
//! the tag as configuration) in front of a vhost-user backend that serves the queues itself.
//!
//! Guest kicks reach the backend directly: each queue's kick eventfd is the one the transport
//! registers as KVM's ioeventfd. Completions come back through call eventfds that the device
//! loop relays (see [`Fs::relay_call`]).
//!
//! The vhost-user negotiation runs while the VM starts (see [`Handshake`]); the device waits for
//! it when the driver first activates it, by which time a backend started with the VM has long
//! answered.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use vmm_sys_util::eventfd::EventFd;

use super::backend::{Backend, Handshake, NUM_QUEUES, RING_FEATURES};
use super::config::{config_bytes, CONFIG_SIZE};
use super::{rings, Error, FailureHook};
use crate::devices::virtio::{
    device_type, read_config_bytes, ActivateError, Activation, Interrupt, VirtioDevice,
    VIRTIO_F_VERSION_1,
};

/// Entries per queue the driver may use (virtiofsd takes up to 32768; Linux asks for what is
/// offered, and 1024 is what QEMU and Cloud Hypervisor offer).
pub const QUEUE_SIZE: u16 = 1024;
const QUEUE_SIZES: [u16; NUM_QUEUES] = [QUEUE_SIZE; NUM_QUEUES];

/// Where the vhost-user connection stands.
enum Link {
    /// Negotiating on its own thread.
    Negotiating(Handshake),
    /// Negotiated.
    Ready(Backend),
    /// The negotiation failed (and was reported).
    Failed,
}

/// A virtio-fs device whose file system is served by a vhost-user backend.
pub struct Fs {
    tag: String,
    socket: PathBuf,
    config: [u8; CONFIG_SIZE],
    link: Link,
    /// A second descriptor of the vhost-user socket, watched for the backend hanging up.
    watch: OwnedFd,
    /// Written by KVM (ioeventfd) when the driver kicks a queue; read by the backend.
    queue_events: [EventFd; NUM_QUEUES],
    /// Written by the backend when it used buffers; read by the device loop.
    ///
    /// The backend does not get the irqfd itself: KVM would then inject the interrupt without
    /// setting the VRING bit of InterruptStatus, which Linux's virtio-mmio handler reads first
    /// and, finding 0, drops the interrupt. Relaying through the device loop keeps the status
    /// right with no special case in the transport, for one thread hop per completion batch.
    calls: [EventFd; NUM_QUEUES],
    /// The driver's interrupt line while the device runs.
    interrupt: Option<Interrupt>,
    on_failure: FailureHook,
    failed: bool,
}

impl Fs {
    /// A device for the share `tag`, connected now (before the guest runs) to the backend
    /// listening on `socket`, negotiating from now on. `on_failure` is told, once, if the backend
    /// fails later (the negotiation included).
    pub fn new(tag: &str, socket: &Path, on_failure: FailureHook) -> Result<Self, Error> {
        let config = config_bytes(tag)?;
        let (handshake, watch) = Handshake::start(socket)?;
        let evt = || crate::devices::event_fd().map_err(Error::EventFd);
        Ok(Fs {
            tag: tag.to_owned(),
            socket: socket.to_owned(),
            config,
            link: Link::Negotiating(handshake),
            watch,
            queue_events: [evt()?, evt()?],
            calls: [evt()?, evt()?],
            interrupt: None,
            on_failure,
            failed: false,
        })
    }

    /// The share's tag.
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// The vhost-user connection, for the device loop to watch for a hang-up.
    pub(super) fn watched_socket(&self) -> &OwnedFd {
        &self.watch
    }

    /// Waits for the negotiation, the first time; afterwards the link is `Ready` or, if it
    /// failed (reported once, here), `Failed`. Returns the failure's message.
    fn negotiated(&mut self) -> Result<(), String> {
        // Taken out (to be joined, if still negotiating), leaving `Failed` unless put back.
        self.link = match std::mem::replace(&mut self.link, Link::Failed) {
            Link::Negotiating(handshake) => match handshake.finish() {
                Ok(backend) => Link::Ready(backend),
                Err(e) => {
                    return Err(self.backend_failed(&format!("cannot negotiate with it: {e}")))
                }
            },
            link => link,
        };
        match self.link {
            Link::Ready(_) => Ok(()),
            _ => Err(self.backend_failed("the vhost-user negotiation failed earlier in this VM")),
        }
    }

    /// The call eventfd of queue `index`.
    pub(super) fn call_event(&self, index: usize) -> &EventFd {
        &self.calls[index]
    }

    /// The backend used buffers of queue `index`: interrupt the driver, if it still runs.
    pub(super) fn relay_call(&mut self, index: usize) {
        // The count does not matter: one interrupt covers every completion so far.
        let _ = self.calls[index].read();
        if let Some(interrupt) = &self.interrupt {
            interrupt.signal_used_queue();
        }
    }

    /// Reports a backend failure the VM cannot survive (the guest's file system is gone), once.
    pub(super) fn backend_failed(&mut self, why: &str) -> String {
        let msg = format!(
            "virtio-fs share {:?} (backend {}): {why}",
            self.tag,
            self.socket.display()
        );
        if !self.failed {
            self.failed = true;
            // The VMM reports it as the VM's error; logging it too would say it twice.
            tracing::debug!("{msg}");
            (self.on_failure)(msg.clone());
        }
        msg
    }
}

impl VirtioDevice for Fs {
    fn device_type(&self) -> u32 {
        device_type::FS
    }

    fn features(&self) -> u64 {
        RING_FEATURES
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        tracing::debug!("virtio-fs: ignoring a write to read-only configuration at {offset:#x}");
    }

    fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
        if a.acked_features & VIRTIO_F_VERSION_1 == 0 {
            return Err(ActivateError::LegacyDriver);
        }
        // The driver's mistakes stop here, before the backend hears of them.
        let vrings = rings::vrings(&a.mem, &a.queues)?;
        if self.failed {
            return Err(ActivateError::Backend(
                self.backend_failed("the backend failed earlier in this VM"),
            ));
        }
        let acked = a.acked_features & (RING_FEATURES | VIRTIO_F_VERSION_1);
        self.negotiated().map_err(ActivateError::Backend)?;
        let Link::Ready(backend) = &mut self.link else {
            return Err(ActivateError::Backend(
                "the backend is not negotiated".into(),
            ));
        };
        let missing = backend.missing_ring_features(acked);
        if missing != 0 {
            return Err(ActivateError::Backend(self.backend_failed(&format!(
                "it lacks ring features the driver accepted (bits {missing:#x})"
            ))));
        }
        // Set before the rings start; the device loop, which relays calls, waits for our lock.
        self.interrupt = Some(a.interrupt);
        let started = backend.start(&a.mem, &vrings, &self.queue_events, &self.calls, acked);
        if let Err(e) = started {
            self.interrupt = None;
            return Err(ActivateError::Backend(
                self.backend_failed(&format!("cannot start the backend: {e}")),
            ));
        }
        Ok(())
    }

    fn reset(&mut self) {
        self.interrupt = None;
        // Only an activated device is reset, so the negotiation is over (and reported if failed).
        let stopped = match &mut self.link {
            Link::Ready(backend) => backend.stop(),
            _ => Ok(()),
        };
        if let Err(e) = stopped {
            self.backend_failed(&format!("cannot stop the backend for a device reset: {e}"));
        }
    }
}
