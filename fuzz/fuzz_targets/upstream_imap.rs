#![no_main]
//! See mailbridge_fuzz::upstream_imap.

libfuzzer_sys::fuzz_target!(|data: &[u8]| mailbridge_fuzz::upstream_imap(data));
