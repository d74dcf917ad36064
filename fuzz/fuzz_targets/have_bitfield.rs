//! A have-bitfield from a peer.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| snapsync::fuzz::have_bitfield(data));
