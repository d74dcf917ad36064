//! A direct request or response of the discovery protocol, from any peer.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| snapsync::fuzz::discovery_direct(data));
