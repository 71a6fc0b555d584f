#![no_main]
//! See mailbridge_fuzz::client_smtp.

libfuzzer_sys::fuzz_target!(|data: &[u8]| mailbridge_fuzz::client_smtp(data));
