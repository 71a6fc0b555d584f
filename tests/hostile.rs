//! "Hostile networks": what a broken device, a forgotten script or an
//! attacker on the LAN can cost mailbridge and its other users, bounded in
//! time, memory and effect on innocent clients. Loopback only: 127.0.0.2
//! and 127.0.0.3 stand in for other hosts on the LAN, 127.0.0.1 is the
//! machine's own user. Each file is one point of the issue; each test
//! prints what it measured.

#[path = "common/mod.rs"]
mod common;

#[path = "hostile/preauth.rs"]
mod preauth;

#[path = "hostile/kdf.rs"]
mod kdf;

#[path = "hostile/backoff.rs"]
mod backoff;

#[path = "hostile/enumeration.rs"]
mod enumeration;

#[path = "hostile/silence.rs"]
mod silence;

#[path = "hostile/files.rs"]
mod files;
