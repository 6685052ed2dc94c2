//! libFuzzer target: [`microvm::fuzz::image_documents`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| microvm::fuzz::image_documents(data));
