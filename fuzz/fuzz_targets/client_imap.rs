#![no_main]
//! See mailbridge_fuzz::client_imap.

libfuzzer_sys::fuzz_target!(|data: &[u8]| mailbridge_fuzz::client_imap(data));
