//! The parts of the benchmark (`cargo bench --bench proxy`, see
//! `docs/PERFORMANCE.md`) that are worth testing on their own: the mail
//! clients it drives, the scenarios it times, the statistics and the
//! Markdown report. The runner in `benches/proxy/` starts the sandbox,
//! spawns `mailbridge run` as a process of its own and puts these together.
//!
//! Every scenario runs the *same* client code over two [`Route`]s: through
//! mailbridge (plain text on loopback, local password) and straight to the
//! upstream sandbox server (TLS, SASL XOAUTH2 with a bearer token the
//! client already holds), so each figure has its direct counterpart.
//!
//! - [`client`]: minimal IMAP and SMTP clients over either route.
//! - [`scenario`]: the timed loops; every loop has a fixed count and every
//!   wait a timeout.
//! - [`stats`]: medians and percentiles.
//! - [`report`]: the Markdown table.
//! - [`procfs`]: a process's resident memory and open files, from `/proc`.
//! - [`worker`]: the client process the runner drives with JSON lines.

pub mod client;
pub mod procfs;
pub mod report;
pub mod scenario;
pub mod stats;
pub mod worker;

pub use client::{Imap, Route, Smtp};
