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
//! This crate is the root of a workspace. Beside it:
//! - `mailbridge-proto` (crates/proto): the sans-I/O protocol cores:
//!   IMAP, POP3 and SMTP client-facing pre-auth sessions and upstream login
//!   dialogues, one line framer, one bearer-login driver, SASL, typed
//!   upstream refusals. No tokio, socket, TLS or HTTP crate in its graph.
//! - `mailbridge-sandbox` (crates/sandbox): the strict fake OAuth2 provider
//!   and IMAP, POP3 and SMTP servers behind the tests and `mailbridge demo`.
//! - `mailbridge-bench` (crates/bench): the benchmark
//!   (`cargo bench --bench proxy`).
//!
//! Here:
//! - [`config`]: the TOML file: its serde schema (depending on nothing
//!   else here) and the validated settings, with line numbers.
//! - [`provider`]: presets (microsoft, google, fastmail, yahoo, aol,
//!   yandex, oidc, open, custom), issuer discovery, Microsoft scope rules;
//!   built on the config schema.
//! - [`store`]: the `TokenStore` trait, its sled backend (one process)
//!   and PostgreSQL backend (many instances), sealing, the control
//!   protocol.
//! - [`kdf`]: the gate every Argon2 run goes through: a fair cap on runs
//!   at once, working memory that goes back to the OS.
//! - [`vault`]: local password checks, backoff, the fast verifier cache,
//!   rotation persistence.
//! - [`oauth`]: the token source (cache, single-flight refresh, rotation),
//!   app-only tokens, token checks and the grant flows.
//! - [`authorize`]: runs an account's flow to obtain its grant (builds on
//!   [`oauth`], never the reverse).
//! - [`login`]: the login path from credentials to a logged-in upstream.
//! - [`diagnose`]: the tables of known provider refusals (upstream
//!   logins, token endpoints) and what to do about them.
//! - [`doctor`]: `mailbridge doctor`: each step a login needs, checked,
//!   with the cause and the fix of what fails.
//! - [`alerts`]: `[alerts]`: a command and/or webhook when a grant needs a
//!   person, rate-limited, delivered without delaying logins.
//! - [`net`]: listeners, TLS, the connection driver, the upstream
//!   connector (generic over the stream), the relay, the control socket;
//!   it never parses a protocol.
//! - [`trace`]: protocol traces on demand (`mailbridge trace`): who
//!   watches which account, and each traced session's redacted lines.
//! - [`server`]: binds and runs it all; used by `main` and the tests.
//! - [`demo`]: `mailbridge demo` on top of the sandbox.
//! - [`clock`]: `unix_now`, the one wall-clock helper.
//! - [`report`]: an error and its sources on one line, for logs.
//! - [`logging`]: log lines on standard error: text or JSON, colour only on
//!   a terminal, syslog priorities under the journal.
//! - [`cli`]: the command line (main.rs only calls it).
#![forbid(unsafe_code)]

pub mod alerts;
pub mod authorize;
pub mod backoff;
pub mod cli;
pub mod clock;
pub mod config;
pub mod demo;
pub mod diagnose;
pub mod doctor;
pub mod kdf;
pub mod logging;
pub mod login;
pub mod metrics;
pub mod net;
pub mod oauth;
pub mod provider;
pub mod report;
pub mod server;
pub mod spool;
pub mod status;
pub mod store;
pub mod trace;
pub mod vault;

#[cfg(test)]
mod redaction_tests;
