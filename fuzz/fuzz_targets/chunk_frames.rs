//! Chunk-stream frames: hello, welcome, requests, response headers with a manifest.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| snapsync::fuzz::chunk_frames(data));
