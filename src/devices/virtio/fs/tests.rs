//! The parts that need no backend: the tag and configuration space, and the checks a hostile
//! driver's queues go through before the backend hears of them.

use virtio_queue::{Queue, QueueT};

use super::backend::{Backend, BackendError, NUM_QUEUES};
use super::config::{check_tag, config_bytes, CONFIG_SIZE, TAG_BYTES};
use super::device::QUEUE_SIZE;
use super::rings::vrings;
use super::Error;
use crate::devices::virtio::test_utils::{shared_guest_memory, DriverQueue, TempDir};
use crate::devices::virtio::{read_config_bytes, ActivateError};

#[test]
fn config_space_is_the_padded_tag_and_one_request_queue() {
    let c = config_bytes("data").unwrap();
    assert_eq!(c.len(), 40);
    assert_eq!(&c[..4], b"data");
    assert_eq!(c[4..TAG_BYTES], [0; TAG_BYTES - 4], "NUL padded");
    assert_eq!(c[TAG_BYTES..], 1u32.to_le_bytes());
    // A tag filling the field has no terminating NUL.
    let full = "t".repeat(TAG_BYTES);
    assert_eq!(&config_bytes(&full).unwrap()[..TAG_BYTES], full.as_bytes());
}

#[test]
fn config_reads_at_any_offset_and_width_stay_in_bounds() {
    let c = config_bytes("tag").unwrap();
    let mut word = [0xffu8; 4];
    read_config_bytes(&c, TAG_BYTES as u64, &mut word);
    assert_eq!(u32::from_le_bytes(word), 1);
    let mut byte = [0xffu8; 1];
    read_config_bytes(&c, 1, &mut byte);
    assert_eq!(byte, [b'a']);
    // Straddling the end: the rest reads as zero.
    let mut wide = [0xffu8; 8];
    read_config_bytes(&c, CONFIG_SIZE as u64 - 2, &mut wide);
    assert_eq!(wide, [0, 0, 0, 0, 0, 0, 0, 0]);
    for offset in [CONFIG_SIZE as u64, 0x1000, u64::MAX] {
        let mut d = [0xffu8; 4];
        read_config_bytes(&c, offset, &mut d);
        assert_eq!(d, [0; 4], "offset {offset:#x}");
    }
}

#[test]
fn tags_are_checked() {
    check_tag("a").unwrap();
    check_tag(&"é".repeat(18)).unwrap();
    assert!(matches!(check_tag(""), Err(Error::TagEmpty)));
    let long = "x".repeat(TAG_BYTES + 1);
    let err = check_tag(&long).unwrap_err();
    assert!(matches!(err, Error::TagTooLong { len: 37, .. }));
    assert!(err.to_string().contains("at most 36 bytes"), "{err}");
    // 19 two-byte characters: 38 bytes though only 19 characters.
    assert!(matches!(
        check_tag(&"é".repeat(19)),
        Err(Error::TagTooLong { len: 38, .. })
    ));
    assert!(matches!(check_tag("a\0b"), Err(Error::TagNul(_))));
}

fn ready_queues(mem: &vm_memory::GuestMemoryMmap) -> Vec<Queue> {
    (0..NUM_QUEUES)
        .map(|i| DriverQueue::new(mem, 0x10_0000 * (i as u64 + 1), 16).device_queue(QUEUE_SIZE))
        .collect()
}

#[test]
fn good_queues_translate_to_our_addresses() {
    use vm_memory::{GuestAddress, GuestMemoryBackend};
    let mem = shared_guest_memory(0x100_0000);
    let rings = vrings(&mem, &ready_queues(&mem)).unwrap();
    let host = |a| mem.get_host_address(GuestAddress(a)).unwrap() as u64;
    assert_eq!(rings[1].size, 16);
    assert_eq!(rings[1].next_avail, 0);
    assert_eq!(rings[1].desc, host(0x20_0000));
    assert_eq!(rings[1].avail, host(0x20_1000));
    assert_eq!(rings[1].used, host(0x20_2000));
}

#[test]
fn bad_queues_fail_activation_before_the_backend() {
    let mem = shared_guest_memory(0x100_0000);
    let queues = ready_queues(&mem);
    assert!(matches!(
        vrings(&mem, &queues[..1]),
        Err(ActivateError::QueueCount {
            expected: 2,
            got: 1
        })
    ));
    let mut not_ready = ready_queues(&mem);
    not_ready[1].set_ready(false);
    assert!(matches!(
        vrings(&mem, &not_ready),
        Err(ActivateError::QueueNotReady(1))
    ));
    // A used ring running off the end of guest RAM (the transport checks this too; the device
    // does not rely on it).
    let mut outside = ready_queues(&mem);
    outside[0].set_used_ring_address(Some(0xff_ff80), Some(0));
    assert!(matches!(
        vrings(&mem, &outside),
        Err(ActivateError::RingOutsideMemory(0))
    ));
}

#[test]
fn a_missing_backend_socket_is_named() {
    let dir = TempDir::new("fs-nobackend");
    let socket = dir.0.join("virtiofsd.sock");
    let err = match Backend::connect(&socket) {
        Err(e) => e,
        Ok(_) => panic!("connected to nothing"),
    };
    assert!(matches!(err, BackendError::Connect { .. }));
    assert!(err.to_string().contains("virtiofsd.sock"), "{err}");
}

#[test]
fn a_backend_that_fails_the_negotiation_fails_activation_and_is_reported_once() {
    use std::sync::{Arc, Mutex};

    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    use super::device::Fs;
    use crate::devices::virtio::{Activation, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};

    let dir = TempDir::new("fs-badbackend");
    let socket = dir.0.join("virtiofsd.sock");
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    // A "backend" that hangs up at once, before answering anything.
    let hangup = std::thread::spawn(move || drop(listener.accept().unwrap()));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let seen = failures.clone();
    // The device is made at once: the negotiation runs on its own thread.
    let mut fs = Fs::new(
        "share0",
        &socket,
        Box::new(move |m| seen.lock().unwrap().push(m)),
    )
    .unwrap();
    hangup.join().unwrap();
    let mem = shared_guest_memory(0x100_0000);
    let offered = fs.features();
    let activation = || Activation {
        mem: mem.clone(),
        queues: ready_queues(&mem),
        interrupt: Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()),
        acked_features: VIRTIO_F_VERSION_1 | offered,
    };
    let a = activation();
    let Err(ActivateError::Backend(msg)) = fs.activate(a) else {
        panic!("activation with a failed negotiation succeeded");
    };
    assert!(
        msg.contains("\"share0\"") && msg.contains("negotiate"),
        "{msg}"
    );
    // Again: still refused, still reported only once.
    let a = activation();
    assert!(matches!(fs.activate(a), Err(ActivateError::Backend(_))));
    assert_eq!(
        failures.lock().unwrap().len(),
        1,
        "{:?}",
        failures.lock().unwrap()
    );
}
