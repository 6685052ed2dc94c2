//! libFuzzer target: [`microvm::fuzz::layer_tar`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| microvm::fuzz::layer_tar(data));
