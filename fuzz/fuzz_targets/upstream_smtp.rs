#![no_main]
//! See mailbridge_fuzz::upstream_smtp.

libfuzzer_sys::fuzz_target!(|data: &[u8]| mailbridge_fuzz::upstream_smtp(data));
