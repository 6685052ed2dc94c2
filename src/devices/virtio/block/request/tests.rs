//! Hostile and well-formed chains through the request parser alone: no disk, no device.

use super::*;
use crate::devices::virtio::test_utils::{guest_memory, Buf, DriverQueue};
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::{Queue, QueueT};

const MEM: usize = 0x10_0000;
const HDR: u64 = 0x8_0000;
const DATA: u64 = 0x9_0000;
const STATUS: u64 = 0xa_0000;
const DISK: DiskLimits = DiskLimits {
    sectors: 100,
    read_only: false,
};

fn header(mem: &GuestMemoryMmap, at: u64, kind: u32, sector: u64) {
    let mut h = [0u8; HEADER_SIZE];
    h[0..4].copy_from_slice(&kind.to_le_bytes());
    h[4..8].copy_from_slice(&0xdead_beefu32.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&h, GuestAddress(at)).unwrap();
}

fn pop<'m>(q: &mut Queue, mem: &'m GuestMemoryMmap) -> DescriptorChain<&'m GuestMemoryMmap> {
    q.pop_descriptor_chain(mem).expect("a chain")
}

fn parse_bufs(
    mem: &GuestMemoryMmap,
    bufs: &[Buf],
    disk: DiskLimits,
) -> (Result<Request, ParseError>, Vec<Segment>) {
    let mut dq = DriverQueue::new(mem, 0, 16);
    let mut q = dq.device_queue(16);
    dq.add_chain(bufs);
    let mut segs = vec![Segment {
        addr: GuestAddress(1),
        len: 1,
    }];
    let r = parse(mem, pop(&mut q, mem), disk, &mut segs);
    (r, segs)
}

fn failed(r: Result<Request, ParseError>) -> RequestError {
    match r {
        Err(ParseError::Failed { status, error }) => {
            assert_eq!(status, GuestAddress(STATUS), "status is the last byte");
            error
        }
        other => panic!("expected a failed request, got {other:?}"),
    }
}

fn dropped(r: Result<Request, ParseError>) -> ChainError {
    match r {
        Err(ParseError::Dropped(e)) => e,
        other => panic!("expected a dropped chain, got {other:?}"),
    }
}

fn seg(addr: u64, len: u32) -> Segment {
    Segment {
        addr: GuestAddress(addr),
        len,
    }
}

#[test]
fn read_request_in_the_usual_three_descriptors() {
    let mem = guest_memory(MEM);
    header(&mem, HDR, blk::VIRTIO_BLK_T_IN, 7);
    let (r, segs) = parse_bufs(
        &mem,
        &[
            Buf::read(HDR, 16),
            Buf::write(DATA, 1024),
            Buf::write(STATUS, 1),
        ],
        DISK,
    );
    let want = Request {
        kind: RequestType::In,
        sector: 7,
        data_len: 1024,
        status: GuestAddress(STATUS),
    };
    assert_eq!(r, Ok(want));
    assert_eq!(segs, vec![seg(DATA, 1024)], "cleared, then filled");
}

#[test]
fn write_request_with_header_and_data_in_one_buffer() {
    let mem = guest_memory(MEM);
    header(&mem, HDR, blk::VIRTIO_BLK_T_OUT, 99);
    let (r, segs) = parse_bufs(
        &mem,
        &[Buf::read(HDR, 16 + 512), Buf::write(STATUS, 1)],
        DISK,
    );
    assert_eq!(r.unwrap().data_len, 512);
    assert_eq!(segs, vec![seg(HDR + 16, 512)]);
}

#[test]
fn header_split_across_descriptors_is_reassembled() {
    let mem = guest_memory(MEM);
    header(&mem, HDR, blk::VIRTIO_BLK_T_OUT, 0x0102_0304_0506);
    let mut h = [0u8; 16];
    mem.read_slice(&mut h, GuestAddress(HDR)).unwrap();
    // 3 + 1 + 12 bytes, the last piece sharing its buffer with data.
    mem.write_slice(&h[..3], GuestAddress(0x7_0000)).unwrap();
    mem.write_slice(&h[3..4], GuestAddress(0x7_1000)).unwrap();
    mem.write_slice(&h[4..], GuestAddress(0x7_2000)).unwrap();
    let disk = DiskLimits {
        sectors: u64::MAX,
        read_only: false,
    };
    let (r, segs) = parse_bufs(
        &mem,
        &[
            Buf::read(0x7_0000, 3),
            Buf::read(0x7_1000, 1),
            Buf::read(0x7_2000, 12 + 512),
            Buf::write(STATUS, 1),
        ],
        disk,
    );
    let r = r.unwrap();
    assert_eq!((r.kind, r.sector), (RequestType::Out, 0x0102_0304_0506));
    assert_eq!(segs, vec![seg(0x7_2000 + 12, 512)]);
}

#[test]
fn status_may_share_the_last_buffer_with_read_data() {
    let mem = guest_memory(MEM);
    header(&mem, HDR, blk::VIRTIO_BLK_T_IN, 0);
    let (r, segs) = parse_bufs(
        &mem,
        &[Buf::read(HDR, 16), Buf::write(STATUS - 512, 513)],
        DISK,
    );
    assert_eq!(r.unwrap().status, GuestAddress(STATUS));
    assert_eq!(segs, vec![seg(STATUS - 512, 512)]);
}

#[test]
fn flush_get_id_and_unknown_types() {
    let mem = guest_memory(MEM);
    header(&mem, HDR, blk::VIRTIO_BLK_T_FLUSH, 12345);
    let (r, _) = parse_bufs(&mem, &[Buf::read(HDR, 16), Buf::write(STATUS, 1)], DISK);
    let r = r.unwrap();
    assert_eq!((r.kind, r.sector, r.data_len), (RequestType::Flush, 0, 0));

    header(&mem, HDR, blk::VIRTIO_BLK_T_GET_ID, u64::MAX);
    let bufs = [
        Buf::read(HDR, 16),
        Buf::write(DATA, 20),
        Buf::write(STATUS, 1),
    ];
    let (r, segs) = parse_bufs(&mem, &bufs, DISK);
    assert_eq!(r.unwrap().kind, RequestType::GetId, "sector is ignored");
    assert_eq!(segs, vec![seg(DATA, 20)]);

    for unknown in [2, 11, 13, u32::MAX] {
        header(&mem, HDR, unknown, 0);
        let (r, _) = parse_bufs(&mem, &bufs, DISK);
        let e = failed(r);
        assert_eq!(e, RequestError::Unsupported(unknown));
        assert_eq!(e.status(), blk::VIRTIO_BLK_S_UNSUPP as u8);
    }
}

#[test]
fn zero_length_buffers_are_skipped_and_zero_length_reads_allowed() {
    let mem = guest_memory(MEM);
    header(&mem, HDR, blk::VIRTIO_BLK_T_IN, 100);
    // A zero-length buffer's address is never used, even a wild one.
    let bufs = [
        Buf::read(HDR, 16),
        Buf::write(u64::MAX, 0),
        Buf::write(STATUS, 1),
    ];
    let (r, segs) = parse_bufs(&mem, &bufs, DISK);
    assert_eq!(r.unwrap().data_len, 0, "at the very end of the disk");
    assert!(segs.is_empty());
}

#[test]
fn wrong_directions_fail_the_request() {
    let mem = guest_memory(MEM);
    let cases = [
        // A read whose data buffer is device-readable.
        (
            blk::VIRTIO_BLK_T_IN,
            vec![
                Buf::read(HDR, 16),
                Buf::read(DATA, 512),
                Buf::write(STATUS, 1),
            ],
            RequestError::UnexpectedReadable(RequestType::In, 512),
        ),
        // A write whose data buffer is device-writable.
        (
            blk::VIRTIO_BLK_T_OUT,
            vec![
                Buf::read(HDR, 16),
                Buf::write(DATA, 512),
                Buf::write(STATUS, 1),
            ],
            RequestError::UnexpectedWritable(RequestType::Out, 512),
        ),
        // Readable after writable.
        (
            blk::VIRTIO_BLK_T_OUT,
            vec![
                Buf::write(DATA, 512),
                Buf::read(HDR, 16),
                Buf::write(STATUS, 1),
            ],
            RequestError::ReadableAfterWritable,
        ),
        // A flush with data either way.
        (
            blk::VIRTIO_BLK_T_FLUSH,
            vec![
                Buf::read(HDR, 16),
                Buf::write(DATA, 512),
                Buf::write(STATUS, 1),
            ],
            RequestError::UnexpectedWritable(RequestType::Flush, 512),
        ),
        (
            blk::VIRTIO_BLK_T_FLUSH,
            vec![Buf::read(HDR, 16 + 512), Buf::write(STATUS, 1)],
            RequestError::UnexpectedReadable(RequestType::Flush, 512),
        ),
        (
            blk::VIRTIO_BLK_T_GET_ID,
            vec![Buf::read(HDR, 36), Buf::write(STATUS, 1)],
            RequestError::UnexpectedReadable(RequestType::GetId, 20),
        ),
    ];
    for (kind, bufs, want) in cases {
        header(&mem, HDR, kind, 0);
        let (r, _) = parse_bufs(&mem, &bufs, DISK);
        let e = failed(r);
        assert_eq!(e, want, "{bufs:?}");
        assert_eq!(e.status(), blk::VIRTIO_BLK_S_IOERR as u8);
    }
}

#[test]
fn short_headers_fail_the_request() {
    let mem = guest_memory(MEM);
    header(&mem, HDR, blk::VIRTIO_BLK_T_IN, 0);
    for bufs in [
        vec![Buf::read(HDR, 15), Buf::write(STATUS, 1)],
        vec![
            Buf::read(HDR, 8),
            Buf::read(HDR + 8, 0),
            Buf::write(STATUS, 1),
        ],
        vec![Buf::write(STATUS, 1)],
    ] {
        let (r, _) = parse_bufs(&mem, &bufs, DISK);
        assert!(
            matches!(failed(r), RequestError::ShortHeader(_)),
            "{bufs:?}"
        );
    }
}

#[test]
fn buffers_outside_ram_fail_the_request() {
    let mem = guest_memory(MEM);
    header(&mem, HDR, blk::VIRTIO_BLK_T_IN, 0);
    let end = MEM as u64;
    for (bufs, addr) in [
        (vec![Buf::read(end - 8, 16), Buf::write(STATUS, 1)], end - 8),
        (
            vec![
                Buf::read(HDR, 16),
                Buf::write(end - 512, 1024),
                Buf::write(STATUS, 1),
            ],
            end - 512,
        ),
        (
            vec![
                Buf::read(HDR, 16),
                Buf::write(u64::MAX - 511, 512),
                Buf::write(STATUS, 1),
            ],
            u64::MAX - 511,
        ),
    ] {
        let (r, _) = parse_bufs(&mem, &bufs, DISK);
        assert!(
            matches!(failed(r), RequestError::OutsideRam { addr: a, .. } if a == addr),
            "{bufs:?}"
        );
    }
}

#[test]
fn huge_lengths_are_refused_without_touching_memory() {
    let mem = guest_memory(MEM);
    header(&mem, HDR, blk::VIRTIO_BLK_T_IN, 0);
    let (r, _) = parse_bufs(
        &mem,
        &[
            Buf::read(HDR, 16),
            Buf::write(DATA, u32::MAX - 17),
            Buf::write(STATUS, 1),
        ],
        DISK,
    );
    assert!(matches!(failed(r), RequestError::OutsideRam { .. }));
    // Over 4 GiB in total: the chain iterator stops early, so the chain has no end.
    let (r, _) = parse_bufs(
        &mem,
        &[
            Buf::read(HDR, 16),
            Buf::write(DATA, u32::MAX),
            Buf::write(DATA, u32::MAX),
            Buf::write(STATUS, 1),
        ],
        DISK,
    );
    assert_eq!(dropped(r), ChainError::Unterminated);
}

#[test]
fn partial_sectors_and_out_of_range_fail_the_request() {
    let mem = guest_memory(MEM);
    let read = |sector, len| {
        header(&mem, HDR, blk::VIRTIO_BLK_T_IN, sector);
        let bufs = [
            Buf::read(HDR, 16),
            Buf::write(DATA, len),
            Buf::write(STATUS, 1),
        ];
        parse_bufs(&mem, &bufs, DISK).0
    };
    assert_eq!(failed(read(0, 511)), RequestError::PartialSector(511));
    assert_eq!(failed(read(0, 513)), RequestError::PartialSector(513));
    assert!(read(99, 512).is_ok(), "the last sector");
    let past = |sector, count| RequestError::OutOfRange {
        sector,
        count,
        capacity: 100,
    };
    assert_eq!(failed(read(99, 1024)), past(99, 2));
    assert_eq!(failed(read(100, 512)), past(100, 1));
    assert_eq!(failed(read(101, 0)), past(101, 0));
    // sector + count overflows u64.
    assert_eq!(failed(read(u64::MAX, 512)), past(u64::MAX, 1));
    assert_eq!(failed(read(u64::MAX - 1, 4096)), past(u64::MAX - 1, 8));
}

#[test]
fn writes_to_read_only_disks_fail_but_reads_pass() {
    let mem = guest_memory(MEM);
    let ro = DiskLimits {
        sectors: 100,
        read_only: true,
    };
    header(&mem, HDR, blk::VIRTIO_BLK_T_OUT, 0);
    let (r, _) = parse_bufs(&mem, &[Buf::read(HDR, 16 + 512), Buf::write(STATUS, 1)], ro);
    assert_eq!(failed(r), RequestError::ReadOnly);
    header(&mem, HDR, blk::VIRTIO_BLK_T_IN, 0);
    let bufs = [
        Buf::read(HDR, 16),
        Buf::write(DATA, 512),
        Buf::write(STATUS, 1),
    ];
    assert!(parse_bufs(&mem, &bufs, ro).0.is_ok());
}

#[test]
fn unusable_status_descriptors_drop_the_request() {
    let mem = guest_memory(MEM);
    header(&mem, HDR, blk::VIRTIO_BLK_T_IN, 0);
    let cases = [
        (
            vec![
                Buf::read(HDR, 16),
                Buf::write(DATA, 512),
                Buf::read(STATUS, 1),
            ],
            ChainError::StatusReadOnly,
        ),
        (vec![Buf::read(HDR, 16)], ChainError::StatusReadOnly),
        (
            vec![
                Buf::read(HDR, 16),
                Buf::write(DATA, 512),
                Buf::write(STATUS, 0),
            ],
            ChainError::StatusEmpty,
        ),
        (
            vec![Buf::read(HDR, 16), Buf::write(MEM as u64, 1)],
            ChainError::StatusOutsideRam(MEM as u64),
        ),
        (
            vec![Buf::read(HDR, 16), Buf::write(u64::MAX, 2)],
            ChainError::StatusOutsideRam(0),
        ),
    ];
    for (bufs, want) in cases {
        let (r, _) = parse_bufs(&mem, &bufs, DISK);
        assert_eq!(dropped(r), want, "{bufs:?}");
    }
}

#[test]
fn loops_and_bad_links_drop_the_request() {
    let mem = guest_memory(MEM);
    header(&mem, HDR, blk::VIRTIO_BLK_T_IN, 0);
    let next = VRING_DESC_F_NEXT as u16;
    let write = VRING_DESC_F_WRITE as u16;
    let mut segs = Vec::new();

    // 0 -> 1 -> 0 -> ...: stops after the queue size, still saying NEXT.
    let mut dq = DriverQueue::new(&mem, 0, 16);
    let mut q = dq.device_queue(16);
    dq.set_desc(0, HDR, 16, next, 1);
    dq.set_desc(1, STATUS, 1, next | write, 0);
    dq.publish(0);
    let r = parse(&mem, pop(&mut q, &mem), DISK, &mut segs);
    assert_eq!(dropped(r), ChainError::Unterminated);

    // A next index past the queue.
    dq.set_desc(2, HDR, 16, next, 999);
    dq.publish(2);
    let r = parse(&mem, pop(&mut q, &mem), DISK, &mut segs);
    assert_eq!(dropped(r), ChainError::Unterminated);

    // Indirect tables that are not whole descriptors, or lie outside RAM.
    dq.set_desc(3, DATA, 17, VRING_DESC_F_INDIRECT as u16, 0);
    dq.publish(3);
    let r = parse(&mem, pop(&mut q, &mem), DISK, &mut segs);
    assert_eq!(dropped(r), ChainError::Empty);
    dq.set_desc(4, HDR, 16, next, 5);
    dq.set_desc(5, u64::MAX - 15, 16, VRING_DESC_F_INDIRECT as u16, 0);
    dq.publish(4);
    let r = parse(&mem, pop(&mut q, &mem), DISK, &mut segs);
    assert_eq!(dropped(r), ChainError::Unterminated);
}

#[test]
fn indirect_tables_in_ram_are_followed() {
    let mem = guest_memory(MEM);
    header(&mem, HDR, blk::VIRTIO_BLK_T_IN, 3);
    let table = DriverQueue::new(&mem, 0x6_0000, 16);
    let next = VRING_DESC_F_NEXT as u16;
    let write = VRING_DESC_F_WRITE as u16;
    table.set_desc(0, HDR, 16, next, 1);
    table.set_desc(1, DATA, 512, next | write, 2);
    table.set_desc(2, STATUS, 1, write, 0);
    let mut dq = DriverQueue::new(&mem, 0, 16);
    let mut q = dq.device_queue(16);
    dq.set_desc(0, 0x6_0000, 48, VRING_DESC_F_INDIRECT as u16, 0);
    dq.publish(0);
    let mut segs = Vec::new();
    let r = parse(&mem, pop(&mut q, &mem), DISK, &mut segs).unwrap();
    assert_eq!((r.sector, r.data_len), (3, 512));
}

#[test]
fn too_many_segments_fail_the_request() {
    let mem = guest_memory(MEM);
    header(&mem, HDR, blk::VIRTIO_BLK_T_IN, 0);
    // An indirect table may hold far more descriptors than the queue.
    let n = MAX_SEGMENTS + 1;
    let table = 0x6_0000u64;
    let next = VRING_DESC_F_NEXT as u16;
    let write = VRING_DESC_F_WRITE as u16;
    let d = |i: usize, addr, len, flags| {
        let desc = Descriptor::new(addr, len, flags, (i + 1) as u16);
        mem.write_obj(desc, GuestAddress(table + 16 * i as u64))
            .unwrap();
    };
    d(0, HDR, 16, next);
    for i in 1..=n {
        d(i, DATA + 512 * i as u64, 512, next | write);
    }
    d(n + 1, STATUS, 1, write);
    let mut dq = DriverQueue::new(&mem, 0, 16);
    let mut q = dq.device_queue(16);
    dq.set_desc(
        0,
        table,
        16 * (n as u32 + 2),
        VRING_DESC_F_INDIRECT as u16,
        0,
    );
    dq.publish(0);
    let mut segs = Vec::new();
    let r = parse(&mem, pop(&mut q, &mem), DISK, &mut segs);
    assert_eq!(failed(r), RequestError::TooManySegments);
    assert_eq!(
        segs.len(),
        MAX_SEGMENTS,
        "the list never grows past the limit"
    );
}
