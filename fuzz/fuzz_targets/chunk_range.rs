//! An encoded chunk range, decoded against a content root.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| snapsync::fuzz::chunk_range(data));
