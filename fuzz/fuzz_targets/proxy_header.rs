#![no_main]
//! See mailbridge_fuzz::proxy_header.

libfuzzer_sys::fuzz_target!(|data: &[u8]| mailbridge_fuzz::proxy_header(data));
