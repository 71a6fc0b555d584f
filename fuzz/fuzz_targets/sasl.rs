#![no_main]
//! See mailbridge_fuzz::sasl.

libfuzzer_sys::fuzz_target!(|data: &[u8]| mailbridge_fuzz::sasl(data));
