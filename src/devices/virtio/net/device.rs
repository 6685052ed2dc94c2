//! The virtio-net device: its virtio face (device id 1, a receive and a transmit queue, the MAC,
//! link status and MTU as configuration) and the queue processing that moves frames between the
//! rings and the backend.
//!
//! Flow control holds back rather than drops: a frame the backend will not take yet stops the
//! transmit queue until the backend fd is writable, and a frame the guest has no room for stops
//! reading the backend until the driver adds receive buffers. Each side holds at most one frame
//! (the stream reader's fixed buffer may hold the next few, already read). Only frames that can
//! never be delivered are dropped, counted and logged: malformed ones, ones longer than the
//! guest's MTU or buffers, ones the backend refuses.

use std::fmt::Display;
use std::os::fd::RawFd;

use virtio_bindings::virtio_net as n;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::backend::{Backend, Sent};
use super::chain::{read_tx_frame, MAX_TX_LEN};
use super::config::{self, config_bytes, CONFIG_SIZE};
use super::rx::{Delivery, RxChains};
use super::{Error, FailureHook, ETH_HLEN, MIN_MTU, QUEUE_SIZE, VLAN_HLEN, VNET_HDR_LEN};
use crate::devices::virtio::{
    device_type, read_config_bytes, ActivateError, Activation, Interrupt, VirtioDevice,
    VIRTIO_F_VERSION_1,
};
use crate::plan::NetPlan;

/// Queue order, fixed by the spec (no control queue, one pair).
pub const RX_QUEUE: usize = 0;
/// Guest-to-host frames.
pub const TX_QUEUE: usize = 1;
const QUEUE_SIZES: [u16; 2] = [QUEUE_SIZE; 2];
/// Frames moved each way per event before the loop gets a turn for other devices.
const BATCH: usize = QUEUE_SIZE as usize;

/// What the device runs on once the driver is ready.
struct Active {
    mem: GuestMemoryMmap,
    rx: Queue,
    tx: Queue,
    interrupt: Interrupt,
    /// VIRTIO_NET_F_MRG_RXBUF: a frame may span several receive chains.
    mergeable: bool,
    /// VIRTIO_NET_F_GUEST_CSUM: the tap's header flags (partial checksums) reach the guest.
    guest_csum: bool,
    /// With VIRTIO_NET_F_MTU, the longest frame without segmentation offload the driver may be
    /// handed (virtio 1.2, 5.1.4): the MTU, an Ethernet header and a VLAN tag.
    rx_limit: Option<usize>,
}

/// A queue broke its contract (e.g. an available index running ahead by more than the queue
/// size); the device stops until the driver resets it.
struct QueueBroken(virtio_queue::Error);

impl From<virtio_queue::Error> for QueueBroken {
    fn from(e: virtio_queue::Error) -> Self {
        QueueBroken(e)
    }
}

/// How a round of queue processing ended.
enum Step {
    /// Nothing more to do until the next event.
    Done,
    /// The batch limit was hit with work left: come back after other devices had a turn.
    More,
    /// The backend is unusable; the message says why.
    Failed(String),
}

type Chain<'m> = DescriptorChain<&'m GuestMemoryMmap>;

fn pop<'m>(q: &mut Queue, mem: &'m GuestMemoryMmap) -> Result<Option<Chain<'m>>, QueueBroken> {
    Ok(q.iter(mem).map(|mut it| it.next())?)
}

/// Counts a dropped frame and logs it at powers of two only, so a hostile guest or a chatty
/// backend cannot flood the log.
fn note_drop(count: &mut u64, what: &str, why: &dyn Display) {
    *count += 1;
    if count.is_power_of_two() {
        tracing::warn!("virtio-net: dropping {what}: {why} ({count} so far)");
    }
}

/// A virtio-net device in front of a tap or a passt socket.
pub struct Net {
    backend: Backend,
    features: u64,
    mtu: u16,
    config: [u8; CONFIG_SIZE],
    queue_events: [EventFd; 2],
    /// Wakes the device loop after activation or reset, or to go on after a batch.
    pub(super) wake: EventFd,
    active: Option<Active>,
    rx_chains: RxChains,
    /// A received frame waits for the driver to add buffers; the backend is not read meanwhile.
    rx_blocked: bool,
    /// The transmit chain at hand, header first.
    tx_buf: Box<[u8]>,
    tx_dropped: u64,
    rx_dropped: u64,
    on_failure: FailureHook,
    failed: bool,
    /// What the device loop watches on the backend fd (`None`: not watched).
    pub(super) watched: Option<EventSet>,
}

impl Net {
    /// A device for `plan`: the tap is attached to, or the socket connected, now (before the
    /// guest runs). `on_failure` is told, once, if the backend fails later.
    pub fn new(plan: &NetPlan, on_failure: FailureHook) -> Result<Self, Error> {
        check_plan(plan)?;
        let backend = Backend::open(&plan.backend)?;
        Net::with_backend(plan.mac, plan.mtu, backend, on_failure)
    }

    /// A device on an already open backend (the MAC and MTU are not checked here).
    pub fn with_backend(
        mac: [u8; 6],
        mtu: u16,
        backend: Backend,
        on_failure: FailureHook,
    ) -> Result<Self, Error> {
        let evt = || crate::devices::event_fd().map_err(Error::EventFd);
        Ok(Net {
            features: backend.features(),
            backend,
            mtu,
            config: config_bytes(mac, mtu),
            queue_events: [evt()?, evt()?],
            wake: evt()?,
            active: None,
            rx_chains: RxChains::default(),
            rx_blocked: false,
            tx_buf: vec![0u8; MAX_TX_LEN].into_boxed_slice(),
            tx_dropped: 0,
            rx_dropped: 0,
            on_failure,
            failed: false,
            watched: None,
        })
    }

    /// The eventfd of queue `index`.
    pub(super) fn queue_event(&self, index: usize) -> &EventFd {
        &self.queue_events[index]
    }

    /// The backend's fd, for the device loop.
    pub(super) fn backend_fd(&self) -> RawFd {
        self.backend.fd()
    }

    /// What the device loop should watch the backend fd for; `None` once it failed.
    pub(super) fn backend_interest(&self) -> Option<EventSet> {
        if self.failed {
            return None;
        }
        // Hang-ups and errors are reported whatever we ask; a stream also tells its peer's
        // shutdown.
        let mut set = EventSet::empty();
        if self.backend.is_stream() {
            set |= EventSet::READ_HANG_UP;
        }
        if self.active.is_some() && !self.rx_blocked {
            set |= EventSet::IN;
        }
        if self.backend.tx_pending() {
            set |= EventSet::OUT;
        }
        Some(set)
    }

    /// The backend fd is ready (or hung up).
    pub(super) fn backend_event(&mut self, set: EventSet) {
        if set.intersects(EventSet::HANG_UP | EventSet::ERROR | EventSet::READ_HANG_UP) {
            let why = self.backend.hang_up_message();
            self.backend_failed(why);
            return;
        }
        if set.contains(EventSet::OUT) {
            self.process_tx();
        }
        if set.contains(EventSet::IN) {
            self.process_rx();
        }
    }

    /// Sends the guest's frames until its ring is empty, the backend pushes back or a batch is
    /// done, then interrupts the driver once for all of them.
    pub(super) fn process_tx(&mut self) {
        match self.serve_tx() {
            Ok(step) => self.after(step),
            Err(QueueBroken(e)) => self.queue_broken(e),
        }
    }

    /// Moves the backend's frames into the guest's receive buffers until the backend has no
    /// more, the guest has no room or a batch is done, then interrupts the driver once.
    pub(super) fn process_rx(&mut self) {
        match self.serve_rx() {
            Ok(step) => self.after(step),
            Err(QueueBroken(e)) => self.queue_broken(e),
        }
    }

    fn after(&mut self, step: Step) {
        match step {
            Step::Done => {}
            Step::More => {
                if let Err(e) = self.wake.write(1) {
                    tracing::warn!("virtio-net: cannot reschedule the queues: {e}");
                }
            }
            Step::Failed(why) => self.backend_failed(why),
        }
    }

    fn serve_tx(&mut self) -> Result<Step, QueueBroken> {
        let Net {
            backend,
            active,
            tx_buf,
            tx_dropped,
            failed,
            ..
        } = self;
        // Whatever the backend kept goes first: frames leave in the guest's order.
        if !*failed {
            match backend.flush() {
                Ok(true) => {}
                Ok(false) => return Ok(Step::Done),
                Err(why) => return Ok(Step::Failed(why)),
            }
        }
        let Some(a) = active.as_mut() else {
            return Ok(Step::Done);
        };
        let mut used = 0;
        let mut step = Step::Done;
        'ring: loop {
            a.tx.disable_notification(&a.mem)?;
            while let Some(chain) = pop(&mut a.tx, &a.mem)? {
                let head = chain.head_index();
                let read = read_tx_frame(&a.mem, chain, tx_buf);
                // Copied out or refused: either way the buffer goes back now.
                a.tx.add_used(&a.mem, head, 0)?;
                used += 1;
                match read {
                    Err(e) => note_drop(tx_dropped, "a frame the guest sent", &e),
                    // The VM is being stopped; do not stall the guest meanwhile.
                    Ok(_) if *failed => {}
                    Ok(len) => match backend.send(&tx_buf[..len]) {
                        Ok(Sent::Done) => {}
                        Ok(Sent::Dropped(e)) => {
                            note_drop(tx_dropped, "a frame the backend refused", &e)
                        }
                        Ok(Sent::Queued) => break 'ring,
                        Err(why) => {
                            step = Step::Failed(why);
                            break 'ring;
                        }
                    },
                }
                if used == BATCH {
                    step = Step::More;
                    break 'ring;
                }
            }
            // Ask for a kick for the next frame, then look once more: one may have come
            // between the last pop and the request.
            if !a.tx.enable_notification(&a.mem)? {
                break;
            }
        }
        if used > 0 && a.tx.needs_notification(&a.mem)? {
            a.interrupt.signal_used_queue();
        }
        Ok(step)
    }

    fn serve_rx(&mut self) -> Result<Step, QueueBroken> {
        let Net {
            backend,
            active,
            rx_chains,
            rx_blocked,
            rx_dropped,
            failed,
            mtu,
            ..
        } = self;
        let Some(a) = active.as_mut() else {
            return Ok(Step::Done);
        };
        if *failed {
            return Ok(Step::Done);
        }
        let was_blocked = std::mem::take(rx_blocked);
        let mut step = Step::Done;
        let mut rounds = 0;
        loop {
            // Frames, and retries after buffers raced in: bounded either way.
            rounds += 1;
            if rounds > 2 * BATCH {
                step = Step::More;
                break;
            }
            let f = match backend.rx_frame() {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(why) => {
                    step = Step::Failed(why);
                    break;
                }
            };
            let len = f.frame.len();
            // Without GUEST_CSUM the driver must see no checksum flags (virtio 1.2, 5.1.6.4);
            // the tap gives none then anyway, as it was told to offload nothing.
            let hdr = if a.guest_csum {
                f.hdr
            } else {
                [0; VNET_HDR_LEN]
            };
            if a.rx_limit.is_some_and(|limit| len > limit) && !is_gso(&f.hdr) {
                // The backend's MTU is larger than the guest's: the guest would drop it too.
                let why =
                    format!("{len} bytes exceed the MTU of {mtu} (does the backend's MTU match?)");
                note_drop(rx_dropped, "a received frame", &why);
                backend.rx_consume();
                continue;
            }
            match rx_chains.deliver(&a.mem, &mut a.rx, hdr, f.frame, a.mergeable)? {
                Delivery::Delivered => backend.rx_consume(),
                Delivery::TooBig => {
                    let why = format!("{len} bytes do not fit the guest's receive buffers");
                    note_drop(rx_dropped, "a received frame", &why);
                    backend.rx_consume();
                }
                Delivery::NoBuffers => {
                    // Ask for a kick when buffers come, then look once more.
                    if a.rx.enable_notification(&a.mem)? {
                        continue;
                    }
                    *rx_blocked = true;
                    break;
                }
            }
        }
        if was_blocked && !*rx_blocked {
            // Kicks are only wanted while a frame waits for buffers.
            a.rx.disable_notification(&a.mem)?;
        }
        if rx_chains.take_added() > 0 && a.rx.needs_notification(&a.mem)? {
            a.interrupt.signal_used_queue();
        }
        Ok(step)
    }

    /// Reports a backend failure the VM cannot survive (its network is gone), once; the
    /// backend is not used again.
    fn backend_failed(&mut self, why: String) {
        if self.failed {
            return;
        }
        self.failed = true;
        self.rx_blocked = false;
        let msg = format!("virtio-net: {why}");
        // The VMM reports it as the VM's error; logging it too would say it twice.
        tracing::debug!("{msg}");
        (self.on_failure)(msg);
    }

    fn queue_broken(&mut self, e: virtio_queue::Error) {
        crate::guest_warn!(
            "virtio-net: the guest driver broke a queue ({e}); the device needs a reset"
        );
        if let Some(a) = self.active.take() {
            a.interrupt.signal_needs_reset();
        }
        self.rx_chains.clear();
        self.rx_blocked = false;
    }
}

/// Whether a received header says the frame is a segmentation-offload packet (bigger than the
/// MTU by design). The ECN bit alone is not segmentation.
fn is_gso(hdr: &[u8; VNET_HDR_LEN]) -> bool {
    hdr[1] & !(n::VIRTIO_NET_HDR_GSO_ECN as u8) != n::VIRTIO_NET_HDR_GSO_NONE as u8
}

/// Refuses a MAC no interface may own and an MTU no guest accepts.
fn check_plan(plan: &NetPlan) -> Result<(), Error> {
    if plan.mac[0] & 1 != 0 || plan.mac == [0; 6] {
        return Err(Error::BadMac(microvm_agent_protocol::mac_text(&plan.mac)));
    }
    if plan.mtu < MIN_MTU {
        return Err(Error::MtuTooSmall(plan.mtu));
    }
    Ok(())
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        device_type::NET
    }

    fn features(&self) -> u64 {
        self.features
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
        // The MAC is writable only for legacy drivers, which we do not serve.
        tracing::debug!("virtio-net: ignoring a write to read-only configuration at {offset:#x}");
    }

    fn activate(&mut self, mut a: Activation) -> Result<(), ActivateError> {
        let [mut rx, mut tx] = a.ready_queues()?;
        if self.failed {
            return Err(ActivateError::Backend(
                "virtio-net: the network backend failed earlier in this VM".into(),
            ));
        }
        let acked = a.acked_features & (self.features | VIRTIO_F_VERSION_1);
        let event_idx = config::event_idx(acked);
        rx.set_event_idx(event_idx);
        tx.set_event_idx(event_idx);
        self.backend.set_guest_offloads(acked).map_err(|e| {
            ActivateError::Backend(format!(
                "virtio-net: cannot set the offloads of the {}: {e}",
                self.backend.describe()
            ))
        })?;
        self.rx_chains.clear();
        self.rx_blocked = false;
        self.active = Some(Active {
            mem: a.mem,
            rx,
            tx,
            interrupt: a.interrupt,
            mergeable: config::mergeable(acked),
            guest_csum: config::guest_csum(acked),
            rx_limit: config::mtu_negotiated(acked)
                .then_some(usize::from(self.mtu) + ETH_HLEN + VLAN_HLEN),
        });
        // Frames may already wait either way; the loop also starts watching the backend.
        self.wake.write(1).map_err(ActivateError::Wake)
    }

    fn reset(&mut self) {
        // The driver took its buffers back. A frame already read or kept for the backend stays
        // (the stream's framing must not lose its place); the next driver gets or sends it.
        self.active = None;
        self.rx_chains.clear();
        self.rx_blocked = false;
        let _ = self.wake.write(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::NetBackend;

    fn plan(mac: [u8; 6], mtu: u16) -> NetPlan {
        NetPlan {
            mac,
            mtu,
            backend: NetBackend::Stream {
                socket: "/nonexistent/passt.sock".into(),
            },
        }
    }

    #[test]
    fn plans_with_unusable_macs_or_mtus_are_refused() {
        let e = check_plan(&plan([0x53, 0, 0, 0, 0, 1], 1500)).unwrap_err();
        assert!(e.to_string().contains("53:00:00:00:00:01"), "{e}");
        assert!(check_plan(&plan([0; 6], 1500)).is_err());
        let e = check_plan(&plan([0x52, 0x54, 0, 0, 0, 1], 67)).unwrap_err();
        assert!(e.to_string().contains("at least 68"), "{e}");
        assert!(check_plan(&plan([0x52, 0x54, 0, 0, 0, 1], 68)).is_ok());
    }

    #[test]
    fn a_missing_backend_socket_is_named() {
        let e = Net::new(&plan([0x52, 0x54, 0, 0, 0, 1], 1500), Box::new(|_| {}))
            .err()
            .unwrap();
        let msg = e.to_string();
        assert!(msg.contains("/nonexistent/passt.sock"), "{msg}");
        assert!(msg.contains("is passt running?"), "{msg}");
    }
}
