//! libFuzzer target: [`microvm::fuzz::vsock_guest_packets`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| microvm::fuzz::vsock_guest_packets(data));
