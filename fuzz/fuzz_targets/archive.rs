//! An archive's records, as the loader reads them.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| snapsync::fuzz::archive(data));
