#![no_main]
//! See mailbridge_fuzz::upstream_pop3.

libfuzzer_sys::fuzz_target!(|data: &[u8]| mailbridge_fuzz::upstream_pop3(data));
