//! A gossip message on snapsync's topic, from any peer.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| snapsync::fuzz::discovery_gossip(data));
