//! libFuzzer target: [`microvm::fuzz::agent_host`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| microvm::fuzz::agent_host(data));
