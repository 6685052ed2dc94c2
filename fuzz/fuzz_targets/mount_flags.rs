//! libFuzzer target: [`microvm::fuzz::mount_flags`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| microvm::fuzz::mount_flags(data));
