//! "The office gateway": tests of issue 13 (scanners, printers and apps
//! that cannot log in well). Loopback only; each file is one point of the
//! issue.

#[path = "common/mod.rs"]
mod common;

#[path = "devices/logins.rs"]
mod logins;

#[path = "devices/caps.rs"]
mod caps;
