//! mailbridge: a local proxy that lets password-only mail clients use
//! OAuth2-only mailboxes.
//!
//! A client logs in with a plain password over IMAP; mailbridge maps the
//! login to an account with a sealed OAuth2 grant, gets an access token,
//! logs in upstream with XOAUTH2 or OAUTHBEARER and then relays the
//! session's bytes untouched.
//!
//! # Layout
//!
//! - [`config`]: the TOML file: its serde schema (depending on nothing
//!   else here) and the validated settings, with line numbers.
//! - [`provider`]: presets (Microsoft, Google, custom), built on the
//!   config schema.
//! - [`sasl`]: PLAIN decoding, XOAUTH2 / OAUTHBEARER encoding, failure
//!   challenges.
//! - [`proto`]: sans-I/O protocol cores (client-facing pre-auth session and
//!   upstream login dialogue); they never touch a socket.
//! - [`store`]: the `TokenStore` trait, its sled backend, sealing.
//! - [`vault`]: local password checks, backoff, the fast verifier cache.
//! - [`oauth`]: the token source (cache, single-flight refresh, rotation),
//!   app-only tokens, token checks and the grant flows.
//! - [`authorize`]: runs an account's flow to obtain its grant (builds on
//!   [`oauth`], never the reverse).
//! - [`login`]: the login path from credentials to a logged-in upstream.
//! - [`diagnose`]: explanations for known upstream refusals.
//! - [`net`]: listeners, TLS, the connection driver, the upstream
//!   connector, the relay; it never parses a protocol.
//! - [`server`]: binds and runs it all; used by `main` and the tests.
//! - [`sandbox`]: strict fake OAuth2 provider and mail servers for tests and
//!   `mailbridge demo`.
//! - [`bench`]: clients, scenarios and the report of the benchmark
//!   (`cargo bench --bench proxy`).
//! - [`clock`]: `unix_now`, the one wall-clock helper.
//! - [`report`]: an error and its sources on one line, for logs.
//! - [`cli`]: the command line (main.rs only calls it).
#![forbid(unsafe_code)]

pub mod authorize;
pub mod cli;
pub mod clock;
pub mod config;
pub mod demo;
pub mod diagnose;
pub mod login;
pub mod net;
pub mod oauth;
pub mod provider;
pub mod report;
pub mod server;
pub mod store;
pub mod vault;

#[cfg(test)]
mod redaction_tests;
