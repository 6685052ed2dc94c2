//! The frontend against a real virtiofsd, without a guest: this test plays the guest driver
//! (rings in memfd-backed memory, FUSE requests built by hand) and the device loop (an event
//! manager relaying the backend's calls), so negotiation, the memory table, the rings, the
//! interrupt relay, reset and hang-up are all checked against the backend the VM will use.
//!
//! Each test skips, loudly, only when no virtiofsd binary is installed.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventManager, SubscriberOps};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::device::QUEUE_SIZE;
use super::Fs;
use crate::devices::virtio::test_utils::{shared_guest_memory, Buf, DriverQueue, TempDir};
use crate::devices::virtio::{
    ActivateError, Activation, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1,
};
use crate::volumes::{Kind, Volume};

const TAG: &str = "share0";
const FILE: &str = "hello.txt";
const CONTENT: &[u8] = b"hello from the host\n";
const WAIT: Duration = Duration::from_secs(10);

const FUSE_LOOKUP: u32 = 1;
const FUSE_INIT: u32 = 26;
const IN_HEADER: usize = 40;
const OUT_HEADER: usize = 16;
/// fuse_entry_out: nodeid, generation, entry_valid, attr_valid, two nsec fields, then the attr.
const ENTRY_OUT: usize = 40 + 88;

/// Where virtiofsd is: PATH, then cargo's bin directory.
fn virtiofsd_binary() -> Option<PathBuf> {
    crate::helpers::find("virtiofsd", crate::volumes::VIRTIOFSD_HINT).ok()
}

/// A virtiofsd serving a directory holding [`FILE`], started as microvm starts it (on a socket
/// already listening, so the frontend can connect at once), killed when dropped.
struct Virtiofsd {
    server: crate::volumes::Virtiofsd,
    socket: PathBuf,
    shared: PathBuf,
    _dir: TempDir,
}

impl Virtiofsd {
    fn start(test: &str) -> Option<Self> {
        if virtiofsd_binary().is_none() {
            // Straight to fd 2: libtest swallows eprintln! of passing tests, and a skip must show.
            let line =
                format!("SKIP: {test}: virtiofsd is not installed (cargo install virtiofsd)\n");
            let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
            return None;
        }
        let dir = TempDir::new(&format!("fs-{test}"));
        let shared = dir.0.join("shared");
        std::fs::create_dir(&shared).unwrap();
        std::fs::write(shared.join(FILE), CONTENT).unwrap();
        let socket = dir.0.join("vfs.sock");
        let volume = Volume {
            source: shared.clone(),
            target: "/data".into(),
            read_only: false,
            kind: Kind::Dir,
            staged: Vec::new(),
        };
        let server = crate::volumes::Virtiofsd::start(&volume, &socket, &dir.0)
            .unwrap_or_else(|e| panic!("{e}"));
        Some(Virtiofsd {
            server,
            socket,
            shared,
            _dir: dir,
        })
    }

    fn kill(&mut self) {
        self.server.kill();
    }
}

/// A guest driver with its rings and buffers, the device under test, and a device loop.
struct Guest<'m> {
    mem: &'m GuestMemoryMmap,
    dev: Arc<Mutex<Fs>>,
    loop_: EventManager<Arc<Mutex<Fs>>>,
    irq: Interrupt,
    /// The request queue's kick, as KVM's ioeventfd would write it.
    kick: EventFd,
    req: DriverQueue<'m>,
    failures: Arc<Mutex<Vec<String>>>,
    unique: u64,
}

impl<'m> Guest<'m> {
    fn new(mem: &'m GuestMemoryMmap, backend: &Virtiofsd) -> Self {
        let failures = Arc::new(Mutex::new(Vec::new()));
        let seen = failures.clone();
        let fs = Fs::new(
            TAG,
            &backend.socket,
            Box::new(move |msg| seen.lock().unwrap().push(msg)),
        )
        .unwrap();
        let kick = fs.queue_events()[1].try_clone().unwrap();
        let dev = Arc::new(Mutex::new(fs));
        let mut loop_ = EventManager::new().unwrap();
        loop_.add_subscriber(dev.clone());
        Guest {
            mem,
            dev,
            loop_,
            irq: Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()),
            kick,
            req: DriverQueue::new(mem, 0x20_0000, 16),
            failures,
            unique: 0,
        }
    }

    /// Sets up both queues with rings at `base` and activates the device.
    fn activate_at(&mut self, base: u64) -> Result<(), ActivateError> {
        let hiprio = DriverQueue::new(self.mem, base, 16);
        self.req = DriverQueue::new(self.mem, base + 0x10_0000, 16);
        let queues = vec![
            hiprio.device_queue(QUEUE_SIZE),
            self.req.device_queue(QUEUE_SIZE),
        ];
        self.activate_with(queues)
    }

    fn activate_with(&mut self, queues: Vec<virtio_queue::Queue>) -> Result<(), ActivateError> {
        let mut dev = self.dev.lock().unwrap();
        let features = VIRTIO_F_VERSION_1 | dev.features();
        dev.activate(Activation {
            mem: self.mem.clone(),
            queues,
            interrupt: self.irq.clone(),
            acked_features: features,
        })
    }

    /// Sends one FUSE request on the request queue; returns the reply after its out header,
    /// and the header's error.
    fn fuse(&mut self, opcode: u32, nodeid: u64, body: &[u8], reply: u32) -> (i32, Vec<u8>) {
        const IN: u64 = 0x40_0000;
        const OUT: u64 = 0x50_0000;
        self.unique += 1;
        let len = (IN_HEADER + body.len()) as u32;
        let mut req = Vec::with_capacity(len as usize);
        req.extend_from_slice(&len.to_le_bytes());
        req.extend_from_slice(&opcode.to_le_bytes());
        req.extend_from_slice(&self.unique.to_le_bytes());
        req.extend_from_slice(&nodeid.to_le_bytes());
        req.extend_from_slice(&[0; 12]); // uid, gid, pid: root, from pid 0
        req.extend_from_slice(&[0; 4]); // total_extlen, padding
        req.extend_from_slice(body);
        self.mem.write_slice(&req, GuestAddress(IN)).unwrap();
        let out_len = OUT_HEADER as u32 + reply;
        self.mem
            .write_slice(&vec![0xaa; out_len as usize], GuestAddress(OUT))
            .unwrap();
        self.req
            .add_chain(&[Buf::read(IN, len), Buf::write(OUT, out_len)]);
        self.kick.write(1).unwrap();

        let used = self.wait_used();
        assert_eq!(used.len(), 1, "one reply");
        let written = used[0].1 as usize;
        assert!(written >= OUT_HEADER, "reply of {written} bytes");
        let mut out = vec![0u8; written];
        self.mem.read_slice(&mut out, GuestAddress(OUT)).unwrap();
        let hdr_len = u32::from_le_bytes(out[0..4].try_into().unwrap()) as usize;
        let error = i32::from_le_bytes(out[4..8].try_into().unwrap());
        let unique = u64::from_le_bytes(out[8..16].try_into().unwrap());
        assert_eq!(hdr_len, written, "out header length");
        assert_eq!(unique, self.unique, "reply to our request");
        (error, out.split_off(OUT_HEADER))
    }

    /// Runs the device loop until the backend's call has become an interrupt with used
    /// entries behind it.
    fn wait_used(&mut self) -> Vec<(u32, u32)> {
        let deadline = Instant::now() + WAIT;
        loop {
            self.loop_.run_with_timeout(50).unwrap();
            if self.irq.irqfd().read().is_ok() {
                // The relay set the cause the guest's virtio-mmio handler looks for.
                assert_eq!(self.irq.status() & 1, 1, "InterruptStatus VRING bit");
                self.irq.ack(1);
                let used = self.req.take_used();
                // As Linux does with EVENT_IDX: the next completion interrupts again.
                self.req.set_used_event(self.req.used_idx());
                if !used.is_empty() {
                    return used;
                }
            }
            assert!(Instant::now() < deadline, "no reply from virtiofsd");
        }
    }

    fn init(&mut self) {
        let mut body = Vec::new();
        for v in [7u32, 31, 0x2_0000, 0] {
            body.extend_from_slice(&v.to_le_bytes()); // major, minor, max_readahead, flags
        }
        let (error, out) = self.fuse(FUSE_INIT, 0, &body, 64);
        assert_eq!(error, 0, "FUSE_INIT");
        let major = u32::from_le_bytes(out[0..4].try_into().unwrap());
        let minor = u32::from_le_bytes(out[4..8].try_into().unwrap());
        assert_eq!(major, 7);
        assert!(minor >= 31, "minor {minor}");
    }

    /// FUSE_LOOKUP of `name` in the root: (error, nodeid, ino, size).
    fn lookup(&mut self, name: &str) -> (i32, u64, u64, u64) {
        let mut body = name.as_bytes().to_vec();
        body.push(0);
        let (error, out) = self.fuse(FUSE_LOOKUP, 1, &body, ENTRY_OUT as u32);
        if error != 0 {
            return (error, 0, 0, 0);
        }
        let at = |i: usize| u64::from_le_bytes(out[i..i + 8].try_into().unwrap());
        (error, at(0), at(40), at(48))
    }

    fn failures(&self) -> Vec<String> {
        self.failures.lock().unwrap().clone()
    }
}

#[test]
fn fuse_init_and_lookup_through_virtiofsd() {
    let Some(backend) = Virtiofsd::start("fuse_init_and_lookup_through_virtiofsd") else {
        return;
    };
    let mem = shared_guest_memory(0x100_0000);
    let mut g = Guest::new(&mem, &backend);
    {
        let dev = g.dev.lock().unwrap();
        assert_eq!(dev.device_type(), 26);
        assert_eq!(dev.queue_max_sizes(), [QUEUE_SIZE; 2]);
        let mut tag = [0u8; 8];
        dev.read_config(0, &mut tag);
        assert_eq!(&tag, b"share0\0\0");
    }
    g.activate_at(0x10_0000).unwrap();
    g.init();
    let (error, nodeid, ino, size) = g.lookup(FILE);
    assert_eq!(error, 0, "FUSE_LOOKUP");
    assert_ne!(nodeid, 0);
    let meta = std::fs::metadata(backend.shared.join(FILE)).unwrap();
    assert_eq!(size, CONTENT.len() as u64);
    assert_eq!(ino, meta.ino());
    let (error, ..) = g.lookup("missing");
    assert_eq!(error, -libc::ENOENT);
    assert!(g.failures().is_empty(), "{:?}", g.failures());
}

#[test]
fn bad_queues_fail_that_activation_only() {
    let Some(backend) = Virtiofsd::start("bad_queues_fail_that_activation_only") else {
        return;
    };
    let mem = shared_guest_memory(0x100_0000);
    let mut g = Guest::new(&mem, &backend);
    let hiprio = || DriverQueue::new(&mem, 0x10_0000, 16).device_queue(QUEUE_SIZE);
    let err = g.activate_with(vec![hiprio()]).unwrap_err();
    assert!(matches!(err, ActivateError::QueueCount { .. }), "{err}");
    let mut unready = DriverQueue::new(&mem, 0x20_0000, 16).device_queue(QUEUE_SIZE);
    virtio_queue::QueueT::set_ready(&mut unready, false);
    let err = g.activate_with(vec![hiprio(), unready]).unwrap_err();
    assert!(matches!(err, ActivateError::QueueNotReady(1)), "{err}");
    assert!(g.failures().is_empty(), "a driver's mistake is not fatal");
    // The backend never heard of them: a correct driver still gets a working device.
    g.activate_at(0x10_0000).unwrap();
    g.init();
    assert_eq!(g.lookup(FILE).0, 0);
}

#[test]
fn reset_stops_the_backend_and_a_new_driver_starts_again() {
    let Some(backend) = Virtiofsd::start("reset_stops_the_backend_and_a_new_driver_starts_again")
    else {
        return;
    };
    let mem = shared_guest_memory(0x100_0000);
    let mut g = Guest::new(&mem, &backend);
    g.activate_at(0x10_0000).unwrap();
    g.init();
    g.dev.lock().unwrap().reset();
    // A new driver, its rings elsewhere and its indexes from zero.
    g.activate_at(0x60_0000).unwrap();
    g.init();
    assert_eq!(g.lookup(FILE).0, 0);
    assert!(g.failures().is_empty(), "{:?}", g.failures());
}

#[test]
fn a_backend_hang_up_ends_the_vm_naming_the_share() {
    let Some(mut backend) = Virtiofsd::start("a_backend_hang_up_ends_the_vm_naming_the_share")
    else {
        return;
    };
    let mem = shared_guest_memory(0x100_0000);
    let mut g = Guest::new(&mem, &backend);
    g.activate_at(0x10_0000).unwrap();
    backend.kill();
    let deadline = Instant::now() + WAIT;
    while g.failures().is_empty() {
        assert!(Instant::now() < deadline, "the hang-up went unnoticed");
        g.loop_.run_with_timeout(50).unwrap();
    }
    let failures = g.failures();
    assert_eq!(failures.len(), 1, "{failures:?}");
    let msg = &failures[0];
    assert!(
        msg.contains("\"share0\"") && msg.contains("hung up"),
        "{msg}"
    );
    assert!(!msg.contains('\n'), "one line: {msg}");
    // The loop unwatched the socket rather than spinning on it.
    assert_eq!(g.loop_.run_with_timeout(0).unwrap(), 0);
    // Re-activation reports the failure instead of talking to a dead socket.
    g.dev.lock().unwrap().reset();
    let err = g.activate_at(0x60_0000).unwrap_err();
    assert!(matches!(err, ActivateError::Backend(_)), "{err}");
    assert_eq!(g.failures().len(), 1, "reported once");
}
