#![no_main]
//! See mailbridge_fuzz::trace.

libfuzzer_sys::fuzz_target!(|data: &[u8]| mailbridge_fuzz::trace(data));
