//! A download's resume progress file, from disk.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| snapsync::fuzz::progress(data));
