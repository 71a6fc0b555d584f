#![no_main]
//! See mailbridge_fuzz::config.

libfuzzer_sys::fuzz_target!(|data: &[u8]| mailbridge_fuzz::config(data));
