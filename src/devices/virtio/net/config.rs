//! What the driver learns of the device before it runs: the feature bits offered for each kind
//! of backend, and the configuration space (MAC, link status, MTU).

use virtio_bindings::virtio_net as n;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

/// `virtio_net_config` up to `mtu`: mac (0..6), status (6..8), max_virtqueue_pairs (8..10),
/// mtu (10..12).
pub const CONFIG_SIZE: usize = 12;

const fn bit(b: u32) -> u64 {
    1 << b
}

/// Offered whatever the backend: the MAC and MTU from the plan, the link status, mergeable
/// receive buffers and event-index notification suppression.
pub const BASE_FEATURES: u64 = bit(n::VIRTIO_NET_F_MAC)
    | bit(n::VIRTIO_NET_F_MTU)
    | bit(n::VIRTIO_NET_F_STATUS)
    | bit(n::VIRTIO_NET_F_MRG_RXBUF)
    | bit(VIRTIO_RING_F_EVENT_IDX);

/// Offloads the guest may use when sending through a tap: the tap takes the virtio-net header
/// as is, and the kernel finishes checksums and segments large packets. (HOST_UFO is left out:
/// Linux guests stopped using it, and it would only widen what a guest can ask of the host.)
pub const TAP_TX_OFFLOADS: u64 = bit(n::VIRTIO_NET_F_CSUM)
    | bit(n::VIRTIO_NET_F_HOST_TSO4)
    | bit(n::VIRTIO_NET_F_HOST_TSO6)
    | bit(n::VIRTIO_NET_F_HOST_ECN);

/// Receive offloads, each offered only if the tap accepts the matching TUNSETOFFLOAD flag.
pub const GUEST_OFFLOADS: [(u32, libc::c_uint); 5] = [
    (n::VIRTIO_NET_F_GUEST_CSUM, libc::TUN_F_CSUM),
    (n::VIRTIO_NET_F_GUEST_TSO4, libc::TUN_F_TSO4),
    (n::VIRTIO_NET_F_GUEST_TSO6, libc::TUN_F_TSO6),
    (n::VIRTIO_NET_F_GUEST_ECN, libc::TUN_F_TSO_ECN),
    (n::VIRTIO_NET_F_GUEST_UFO, libc::TUN_F_UFO),
];

/// Feature bits offered (VIRTIO_F_VERSION_1 is added by the transport). A stream backend (passt)
/// wants whole, checksummed frames, so it gets no offloads; a tap gets the transmit offloads and
/// the receive offloads its `tun_offloads` (TUN_F_* flags the kernel accepted) allow.
pub fn offered_features(tun_offloads: Option<libc::c_uint>) -> u64 {
    let Some(tun) = tun_offloads else {
        return BASE_FEATURES;
    };
    let mut f = BASE_FEATURES | TAP_TX_OFFLOADS;
    for (feature, flag) in GUEST_OFFLOADS {
        if tun & flag == flag {
            f |= bit(feature);
        }
    }
    // Every guest offload depends on GUEST_CSUM (virtio 1.2, 5.1.3.1).
    if f & bit(n::VIRTIO_NET_F_GUEST_CSUM) == 0 {
        for (feature, _) in GUEST_OFFLOADS {
            f &= !bit(feature);
        }
    }
    f
}

/// The TUNSETOFFLOAD flags for what the driver `acked`: what the tap may hand the guest. A
/// driver that broke the dependency rules gets no more than the rules allow.
pub fn tun_offloads(acked: u64) -> libc::c_uint {
    let has = |b| acked & bit(b) != 0;
    if !has(n::VIRTIO_NET_F_GUEST_CSUM) {
        return 0;
    }
    let mut flags = libc::TUN_F_CSUM;
    if has(n::VIRTIO_NET_F_GUEST_TSO4) {
        flags |= libc::TUN_F_TSO4;
    }
    if has(n::VIRTIO_NET_F_GUEST_TSO6) {
        flags |= libc::TUN_F_TSO6;
    }
    if has(n::VIRTIO_NET_F_GUEST_ECN) && flags & (libc::TUN_F_TSO4 | libc::TUN_F_TSO6) != 0 {
        flags |= libc::TUN_F_TSO_ECN;
    }
    if has(n::VIRTIO_NET_F_GUEST_UFO) {
        flags |= libc::TUN_F_UFO;
    }
    flags
}

/// Whether the driver accepted mergeable receive buffers.
pub fn mergeable(acked: u64) -> bool {
    acked & bit(n::VIRTIO_NET_F_MRG_RXBUF) != 0
}

/// Whether the driver accepted partially checksummed frames (and so the header's flags).
pub fn guest_csum(acked: u64) -> bool {
    acked & bit(n::VIRTIO_NET_F_GUEST_CSUM) != 0
}

/// Whether the driver accepted VIRTIO_NET_F_MTU (and so may drop longer frames).
pub fn mtu_negotiated(acked: u64) -> bool {
    acked & bit(n::VIRTIO_NET_F_MTU) != 0
}

/// Whether the driver accepted VIRTIO_RING_F_EVENT_IDX.
pub fn event_idx(acked: u64) -> bool {
    acked & bit(VIRTIO_RING_F_EVENT_IDX) != 0
}

/// The configuration space: the MAC, the link up, one queue pair, the MTU.
pub fn config_bytes(mac: [u8; 6], mtu: u16) -> [u8; CONFIG_SIZE] {
    let mut c = [0u8; CONFIG_SIZE];
    c[0..6].copy_from_slice(&mac);
    c[6..8].copy_from_slice(&(n::VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
    c[8..10].copy_from_slice(&1u16.to_le_bytes());
    c[10..12].copy_from_slice(&mtu.to_le_bytes());
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL_TUN: libc::c_uint = libc::TUN_F_CSUM
        | libc::TUN_F_TSO4
        | libc::TUN_F_TSO6
        | libc::TUN_F_TSO_ECN
        | libc::TUN_F_UFO;

    #[test]
    fn config_space_layout() {
        let c = config_bytes([0x52, 0x54, 0, 0x12, 0x34, 0x56], 1500);
        assert_eq!(c[0..6], [0x52, 0x54, 0, 0x12, 0x34, 0x56]);
        assert_eq!(c[6..8], [1, 0], "status: link up");
        assert_eq!(c[8..10], [1, 0], "max_virtqueue_pairs");
        assert_eq!(c[10..12], 1500u16.to_le_bytes());
    }

    #[test]
    fn a_stream_backend_gets_no_offloads() {
        let f = offered_features(None);
        assert_eq!(f, BASE_FEATURES);
        for b in [
            n::VIRTIO_NET_F_MAC,
            n::VIRTIO_NET_F_MTU,
            n::VIRTIO_NET_F_STATUS,
            n::VIRTIO_NET_F_MRG_RXBUF,
            VIRTIO_RING_F_EVENT_IDX,
        ] {
            assert_ne!(f & bit(b), 0, "bit {b}");
        }
        for b in [
            n::VIRTIO_NET_F_CSUM,
            n::VIRTIO_NET_F_GUEST_CSUM,
            n::VIRTIO_NET_F_HOST_TSO4,
            n::VIRTIO_NET_F_GUEST_TSO4,
            n::VIRTIO_NET_F_CTRL_VQ,
            n::VIRTIO_NET_F_MQ,
        ] {
            assert_eq!(f & bit(b), 0, "bit {b}");
        }
    }

    #[test]
    fn a_tap_gets_the_offloads_it_accepts() {
        let all = offered_features(Some(ALL_TUN));
        for b in [
            n::VIRTIO_NET_F_CSUM,
            n::VIRTIO_NET_F_HOST_TSO4,
            n::VIRTIO_NET_F_HOST_TSO6,
            n::VIRTIO_NET_F_HOST_ECN,
            n::VIRTIO_NET_F_GUEST_CSUM,
            n::VIRTIO_NET_F_GUEST_TSO4,
            n::VIRTIO_NET_F_GUEST_TSO6,
            n::VIRTIO_NET_F_GUEST_ECN,
            n::VIRTIO_NET_F_GUEST_UFO,
        ] {
            assert_ne!(all & bit(b), 0, "bit {b}");
        }
        assert_eq!(all & bit(n::VIRTIO_NET_F_HOST_UFO), 0);
        let no_ufo = offered_features(Some(ALL_TUN & !libc::TUN_F_UFO));
        assert_eq!(no_ufo & bit(n::VIRTIO_NET_F_GUEST_UFO), 0);
        // Without checksum offload, no receive offload at all.
        let none = offered_features(Some(libc::TUN_F_TSO4));
        assert_eq!(none, BASE_FEATURES | TAP_TX_OFFLOADS);
    }

    #[test]
    fn tun_offloads_follow_the_acked_features_and_their_dependencies() {
        let f = |bits: &[u32]| bits.iter().fold(0u64, |acc, b| acc | bit(*b));
        assert_eq!(tun_offloads(0), 0);
        assert_eq!(tun_offloads(f(&[n::VIRTIO_NET_F_GUEST_TSO4])), 0);
        assert_eq!(
            tun_offloads(f(&[n::VIRTIO_NET_F_GUEST_CSUM])),
            libc::TUN_F_CSUM
        );
        assert_eq!(
            tun_offloads(f(&[
                n::VIRTIO_NET_F_GUEST_CSUM,
                n::VIRTIO_NET_F_GUEST_TSO4,
                n::VIRTIO_NET_F_GUEST_TSO6,
                n::VIRTIO_NET_F_GUEST_ECN,
                n::VIRTIO_NET_F_GUEST_UFO,
            ])),
            ALL_TUN
        );
        assert_eq!(
            tun_offloads(f(&[n::VIRTIO_NET_F_GUEST_CSUM, n::VIRTIO_NET_F_GUEST_ECN])),
            libc::TUN_F_CSUM,
            "ECN needs TSO"
        );
    }
}
