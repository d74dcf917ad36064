//! A manifest file, from disk or from a peer.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| snapsync::fuzz::manifest(data));
