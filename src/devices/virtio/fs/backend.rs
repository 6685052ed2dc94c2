//! The vhost-user connection to the backend (virtiofsd): feature negotiation, run on a thread of
//! its own from the VM's build on ([`Handshake`]) so that a backend still starting up does not
//! hold up the VM, and starting and stopping the rings when the guest driver activates or resets
//! the device. Every call is a synchronous round trip on the socket.

use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use thiserror::Error;
use vhost::vhost_user::message::VhostUserHeaderFlag;
use vhost::vhost_user::{
    Frontend, VhostUserFrontend, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::virtio::VIRTIO_F_VERSION_1;

/// Queues: hiprio, then one request queue.
pub const NUM_QUEUES: usize = 2;

/// Longest we wait for one reply: a backend that stops answering must not hold a vCPU forever.
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// Ring features the backend implements (it walks the rings, not us), so the guest may have them.
/// Offered before the backend has answered (every virtiofsd has both); a backend without one the
/// driver accepted fails the activation (see [`Backend::missing_ring_features`]).
pub const RING_FEATURES: u64 = 1 << VIRTIO_RING_F_INDIRECT_DESC | 1 << VIRTIO_RING_F_EVENT_IDX;

/// vhost-user's own bit in GET_FEATURES: the backend speaks protocol features, and rings start
/// disabled until SET_VRING_ENABLE.
const PROTOCOL_FEATURES: u64 = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();

/// Protocol features we use when the backend has them: REPLY_ACK (every request confirmed, so a
/// refusal shows at once), MQ (to learn the backend's queue count) and RESET_DEVICE (a driver
/// reset also ends the backend's FUSE session). CONFIG is not needed: we serve the config space.
fn wanted_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::RESET_DEVICE
}

/// Errors talking to the backend.
#[derive(Debug, Error)]
pub enum BackendError {
    /// The socket cannot be reached.
    #[error(
        "cannot connect to the backend socket {socket}: {source} (is virtiofsd listening there?)"
    )]
    Connect {
        /// The socket.
        socket: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A vhost-user request failed or was refused.
    #[error("vhost-user {what} failed: {source} (did virtiofsd exit? see its messages)")]
    Request {
        /// The request.
        what: &'static str,
        /// Why.
        source: vhost::Error,
    },
    /// The backend only speaks legacy virtio.
    #[error("the backend does not offer VIRTIO_F_VERSION_1")]
    NoVersion1,
    /// The backend has fewer queues than virtio-fs needs.
    #[error(
        "the backend serves {0} queues; virtio-fs needs {NUM_QUEUES} (hiprio and a request queue)"
    )]
    TooFewQueues(u64),
    /// The negotiation thread could not start or did not finish.
    #[error("the vhost-user negotiation thread {0}")]
    Thread(String),
    /// Guest RAM is private to us, so the backend cannot map it.
    #[error(
        "guest RAM at {0:#x} is not backed by a shared file; a VM with virtio-fs needs shared \
         guest RAM (vmm::memory::create_shared)"
    )]
    PrivateMemory(u64),
}

fn request(what: &'static str) -> impl FnOnce(vhost::Error) -> BackendError {
    move |source| BackendError::Request { what, source }
}

/// One ring as the backend needs it: size, where to resume, and its addresses in our address
/// space (vhost-user speaks frontend virtual addresses, translated through the memory table).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Vring {
    /// Entries.
    pub size: u16,
    /// Available-ring index to start from.
    pub next_avail: u16,
    /// Descriptor table, our virtual address.
    pub desc: u64,
    /// Available ring, our virtual address.
    pub avail: u64,
    /// Used ring, our virtual address.
    pub used: u64,
}

/// An open, negotiated vhost-user connection.
pub struct Backend {
    frontend: Frontend,
    /// The backend's virtio features (GET_FEATURES).
    features: u64,
    /// The protocol features both sides use.
    protocol: VhostUserProtocolFeatures,
}

impl Backend {
    /// Connects to `socket`, takes ownership of the backend (SET_OWNER, once per connection) and
    /// negotiates protocol features, waiting for the answers.
    pub fn connect(socket: &Path) -> Result<Self, BackendError> {
        Backend::negotiate(open(socket)?)
    }

    /// The negotiation on a connected socket.
    fn negotiate(stream: UnixStream) -> Result<Self, BackendError> {
        let mut frontend = Frontend::from_stream(stream, NUM_QUEUES as u64);
        frontend.set_owner().map_err(request("SET_OWNER"))?;
        let features = frontend.get_features().map_err(request("GET_FEATURES"))?;
        if features & VIRTIO_F_VERSION_1 == 0 {
            return Err(BackendError::NoVersion1);
        }
        let mut protocol = VhostUserProtocolFeatures::empty();
        if features & PROTOCOL_FEATURES != 0 {
            let offered = frontend
                .get_protocol_features()
                .map_err(request("GET_PROTOCOL_FEATURES"))?;
            protocol = offered & wanted_protocol_features();
            frontend
                .set_protocol_features(protocol)
                .map_err(request("SET_PROTOCOL_FEATURES"))?;
            if protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
                frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            }
            if protocol.contains(VhostUserProtocolFeatures::MQ) {
                let queues = frontend.get_queue_num().map_err(request("GET_QUEUE_NUM"))?;
                if queues < NUM_QUEUES as u64 {
                    return Err(BackendError::TooFewQueues(queues));
                }
            }
        }
        Ok(Backend {
            frontend,
            features,
            protocol,
        })
    }

    /// The virtio feature bits the guest may be offered (besides VIRTIO_F_VERSION_1).
    pub fn device_features(&self) -> u64 {
        self.features & RING_FEATURES
    }

    /// The ring features among `acked` that this backend does not implement (0: none).
    pub fn missing_ring_features(&self, acked: u64) -> u64 {
        acked & RING_FEATURES & !self.features
    }

    /// Hands the backend guest memory and the rings, and starts them: from here on the backend
    /// reads `kicks` and writes `calls` itself.
    pub fn start(
        &mut self,
        mem: &GuestMemoryMmap,
        vrings: &[Vring; NUM_QUEUES],
        kicks: &[EventFd; NUM_QUEUES],
        calls: &[EventFd; NUM_QUEUES],
        driver_features: u64,
    ) -> Result<(), BackendError> {
        // The driver's features, plus the vhost-user bit that keeps rings disabled until enabled.
        let features = (driver_features & self.features) | (self.features & PROTOCOL_FEATURES);
        let f = &mut self.frontend;
        f.set_features(features).map_err(request("SET_FEATURES"))?;
        f.set_mem_table(&memory_table(mem)?)
            .map_err(request("SET_MEM_TABLE"))?;
        for (i, ring) in vrings.iter().enumerate() {
            let config = VringConfigData {
                queue_max_size: ring.size,
                queue_size: ring.size,
                flags: 0,
                desc_table_addr: ring.desc,
                used_ring_addr: ring.used,
                avail_ring_addr: ring.avail,
                log_addr: None,
            };
            f.set_vring_num(i, ring.size)
                .map_err(request("SET_VRING_NUM"))?;
            f.set_vring_addr(i, &config)
                .map_err(request("SET_VRING_ADDR"))?;
            f.set_vring_base(i, ring.next_avail)
                .map_err(request("SET_VRING_BASE"))?;
            // Call before kick: the kick starts the ring, whose first completion needs the call.
            f.set_vring_call(i, &calls[i])
                .map_err(request("SET_VRING_CALL"))?;
            f.set_vring_kick(i, &kicks[i])
                .map_err(request("SET_VRING_KICK"))?;
        }
        if features & PROTOCOL_FEATURES != 0 {
            for i in 0..NUM_QUEUES {
                f.set_vring_enable(i, true)
                    .map_err(request("SET_VRING_ENABLE"))?;
            }
        }
        Ok(())
    }

    /// Stops the rings (GET_VRING_BASE) and, where the backend can, resets it, so that a new
    /// driver can start the device again from scratch.
    pub fn stop(&mut self) -> Result<(), BackendError> {
        for i in 0..NUM_QUEUES {
            self.frontend
                .get_vring_base(i)
                .map_err(request("GET_VRING_BASE"))?;
        }
        if self
            .protocol
            .contains(VhostUserProtocolFeatures::RESET_DEVICE)
        {
            self.frontend
                .reset_device()
                .map_err(request("RESET_DEVICE"))?;
        }
        Ok(())
    }
}

impl AsRawFd for Backend {
    fn as_raw_fd(&self) -> RawFd {
        self.frontend.as_raw_fd()
    }
}

/// Connects to the backend's socket (at once: the socket was made, listening, before the
/// backend started), with a bound on every reply.
fn open(socket: &Path) -> Result<UnixStream, BackendError> {
    let connect_err = |source| BackendError::Connect {
        socket: socket.to_owned(),
        source,
    };
    let stream = UnixStream::connect(socket).map_err(connect_err)?;
    stream
        .set_read_timeout(Some(REPLY_TIMEOUT))
        .map_err(connect_err)?;
    Ok(stream)
}

/// A connection whose negotiation runs on a thread of its own: the socket is connected when the
/// VM is built, and the backend (still starting, when it was just spawned) answers while the
/// VMM loads the kernel and the guest boots. [`Handshake::finish`] waits for the answers, when
/// the guest's driver first needs the backend.
pub struct Handshake {
    thread: std::thread::JoinHandle<Result<Backend, BackendError>>,
}

impl Handshake {
    /// Connects to `socket` now and starts negotiating; returns a second descriptor of the
    /// connection too, to watch for the backend hanging up from the start.
    pub fn start(socket: &Path) -> Result<(Handshake, OwnedFd), BackendError> {
        let stream = open(socket)?;
        let watch =
            stream
                .as_fd()
                .try_clone_to_owned()
                .map_err(|source| BackendError::Connect {
                    socket: socket.to_owned(),
                    source,
                })?;
        let thread = std::thread::Builder::new()
            .name("vhost-user-negotiation".into())
            .spawn(move || Backend::negotiate(stream))
            .map_err(|e| BackendError::Thread(format!("cannot start: {e}")))?;
        Ok((Handshake { thread }, watch))
    }

    /// The negotiated backend, once the backend has answered (each reply within the reply
    /// timeout).
    pub fn finish(self) -> Result<Backend, BackendError> {
        self.thread
            .join()
            .map_err(|_| BackendError::Thread("panicked".into()))?
    }
}

/// SET_MEM_TABLE entries for guest RAM: each region's file, offset, guest address, size and our
/// address of it.
fn memory_table(mem: &GuestMemoryMmap) -> Result<Vec<VhostUserMemoryRegionInfo>, BackendError> {
    mem.iter()
        .map(|region| {
            VhostUserMemoryRegionInfo::from_guest_region(region)
                .map_err(|_| BackendError::PrivateMemory(region.start_addr().0))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_memory_is_refused_by_name() {
        let mem = crate::devices::virtio::test_utils::guest_memory(0x10_0000);
        let Err(err) = memory_table(&mem) else {
            panic!("private memory accepted");
        };
        assert!(err.to_string().contains("shared guest RAM"), "{err}");
    }

    #[test]
    fn memory_table_names_the_memfd_at_each_offset() {
        let mem = crate::devices::virtio::test_utils::shared_guest_memory(0x100_0000);
        let table = memory_table(&mem).unwrap();
        assert_eq!(table.len(), 1);
        let region = mem.iter().next().unwrap();
        let entry = table[0];
        assert_eq!(entry.guest_phys_addr, 0);
        assert_eq!(entry.memory_size, 0x100_0000);
        assert_eq!(entry.userspace_addr, region.as_ptr() as u64);
        assert_eq!(entry.mmap_offset, 0);
        assert_eq!(
            entry.mmap_handle,
            region.file_offset().unwrap().file().as_raw_fd()
        );
    }
}
