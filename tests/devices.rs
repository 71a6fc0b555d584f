//! "The office gateway": scanners, printers and apps that cannot log in
//! well, and mail that is never lost. Loopback stands in for the LAN:
//! 127.0.0.2 is an allowed device, 127.0.0.3 is not. Each file is one part
//! of the issue. Behind a proxy (devices/proxy.rs), 127.0.0.1 is the
//! trusted proxy and addresses such as 192.0.2.7 are the clients its
//! PROXY protocol headers name.

#[path = "common/mod.rs"]
mod common;

#[path = "devices/spool.rs"]
mod spool;

#[path = "devices/crash.rs"]
mod crash;

#[path = "devices/logins.rs"]
mod logins;

#[path = "devices/caps.rs"]
mod caps;

#[path = "devices/proxy.rs"]
mod proxy;
