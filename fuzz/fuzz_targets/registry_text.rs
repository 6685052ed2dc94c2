//! libFuzzer target: [`microvm::fuzz::registry_text`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| microvm::fuzz::registry_text(data));
