//! A snapshot's attestations file from disk.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| snapsync::fuzz::attestations(data));
