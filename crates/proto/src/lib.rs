//! Sans-I/O protocol cores. Nothing here touches a socket: a session takes
//! bytes in and says what to do next; the tokio driver in mailbridge's
//! `net` does it. This crate's dependency graph has no tokio, no socket,
//! no TLS and no HTTP crate, so that rule is a compile error, not a
//! convention.
//!
//! Each protocol has two halves: the client-facing pre-auth session (what
//! the mail client talks to until it has logged in) and the upstream login
//! dialogue (mailbridge logging in to the real server with a bearer token).

#![forbid(unsafe_code)]

mod bearer;
mod framer;
pub mod imap;
pub mod pop3;
pub mod refusal;
pub mod sasl;
pub mod smtp;
#[cfg(test)]
mod testkit;
pub mod text;

pub use crate::refusal::Refusal;
use crate::sasl::{BearerToken, Credentials, FailureChallenge};

/// What the client-facing session wants the driver to do next.
#[derive(Debug)]
pub enum ClientStep {
    /// Read more bytes from the client and `feed` them.
    NeedInput,
    /// Write these bytes to the client, then ask again.
    Send(Vec<u8>),
    /// Write these bytes, run the server side of a TLS handshake, then call
    /// `tls_started`. Bytes the client sent before the handshake have been
    /// discarded by the session (no plaintext injection).
    StartTls(Vec<u8>),
    /// The client asked to log in: authenticate, then call
    /// `login_succeeded` or `login_failed`.
    Login(LoginRequest),
    /// Write these bytes and close the connection.
    Close(Vec<u8>),
}

/// A client's login request.
#[derive(Debug)]
pub struct LoginRequest {
    /// The local credentials.
    pub credentials: Credentials,
    /// Protocol-specific client information to pass upstream: for IMAP the
    /// raw parameter list of the client's `ID` command (e.g.
    /// `("name" "Thunderbird")`), for SMTP the client's EHLO name.
    pub client_info: Option<String>,
}

/// Why a login failed, as far as the client-facing protocol cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// Unknown user or wrong local password.
    BadCredentials,
    /// Too many failures: try again later.
    Throttled,
    /// The upstream server or the provider refused the grant or token.
    Rejected,
    /// Something temporary: network, provider or server unavailable.
    Unavailable,
}

/// A login failure with a one-line reason a person can act on. The reason
/// never contains a secret.
#[derive(Debug, Clone)]
pub struct LoginFailure {
    /// The class of failure, mapped to the protocol's response code.
    pub kind: FailureKind,
    /// One line, no CR/LF, no secrets.
    pub reason: String,
    /// The upstream server's own final refusal, when it refused the login
    /// (e.g. `535 5.7.139 Authentication unsuccessful, ...` or
    /// `NO [AUTHENTICATIONFAILED] ...`). Protocols whose replies carry codes
    /// (SMTP) reuse its code and text; `reason` then explains it.
    pub upstream_reply: Option<Refusal>,
}

/// The client-facing pre-auth half of a protocol.
pub trait ClientSession: Send {
    /// The greeting to send on connect.
    fn greeting(&mut self) -> Vec<u8>;
    /// Bytes read from the client.
    fn feed(&mut self, data: &[u8]);
    /// What to do next.
    fn next_step(&mut self) -> ClientStep;
    /// The TLS handshake after `ClientStep::StartTls` completed.
    fn tls_started(&mut self);
    /// The reply for a successful login, given what the upstream said.
    fn login_succeeded(&mut self, upstream: &UpstreamSuccess) -> Vec<u8>;
    /// The reply for a failed login; the session stays usable.
    fn login_failed(&mut self, failure: &LoginFailure) -> Vec<u8>;
    /// Client bytes received after the login command (pipelined), to be
    /// delivered upstream before relaying starts.
    fn take_pending(&mut self) -> Vec<u8>;
    /// What to send before closing an idle pre-auth connection.
    fn timeout_message(&self) -> Vec<u8>;
    /// What to send before closing a pre-auth connection because mailbridge
    /// is shutting down.
    fn shutdown_message(&self) -> Vec<u8>;
}

/// What the upstream login dialogue wants the driver to do next.
#[derive(Debug)]
pub enum UpstreamStep {
    /// Read more bytes from the server and `feed` them.
    NeedInput,
    /// Write these bytes to the server.
    Send(Vec<u8>),
    /// Run the client side of a TLS handshake, then call `tls_started`.
    StartTls,
    /// Call `provide_token` with an access token (a fresh one after a
    /// rejection that asked for a retry).
    NeedToken,
    /// Logged in; relay from now on.
    Authenticated(UpstreamSuccess),
    /// The server refused the token.
    Rejected(Rejection),
}

/// A successful upstream login.
#[derive(Debug, Clone, Default)]
pub struct UpstreamSuccess {
    /// Post-auth capabilities as the server listed them (IMAP: the words
    /// after `CAPABILITY`; SMTP: EHLO keywords, one per entry).
    pub capabilities: Vec<String>,
    /// Server bytes received after the final login response, to be
    /// forwarded to the client after its success reply.
    pub leftover: Vec<u8>,
}

/// The upstream refused the token.
#[derive(Debug, Clone)]
pub struct Rejection {
    /// The failure challenge, if the server sent one.
    pub challenge: Option<FailureChallenge>,
    /// The server's final refusal, as its protocol reads it.
    pub refusal: Refusal,
    /// True when the challenge's status (400/401) says: refresh the token
    /// and try once more. The session can `retry` on the same connection.
    pub retry_suggested: bool,
}

/// A protocol error from the upstream: it said something we cannot follow.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The server's bytes did not parse.
    #[error("the server sent something unexpected: {0}")]
    Unexpected(String),
    /// The server offers no bearer-token mechanism we can use.
    #[error("the server offers neither XOAUTH2 nor OAUTHBEARER (it offers: {0})")]
    NoMechanism(String),
    /// STARTTLS required but not offered.
    #[error("the server does not offer STARTTLS")]
    NoStartTls,
    /// A line longer than we accept.
    #[error("the server sent a line longer than {0} bytes")]
    LineTooLong(usize),
}

/// The upstream login half of a protocol.
pub trait UpstreamLogin: Send {
    /// Bytes read from the server.
    fn feed(&mut self, data: &[u8]);
    /// What to do next.
    fn next_step(&mut self) -> Result<UpstreamStep, UpstreamError>;
    /// The TLS handshake after `UpstreamStep::StartTls` completed.
    fn tls_started(&mut self);
    /// The token to log in with, after `UpstreamStep::NeedToken`.
    fn provide_token(&mut self, token: &BearerToken);
    /// After a `Rejected` with `retry_suggested`: start another
    /// authentication on the same connection (next step is `NeedToken`).
    fn retry(&mut self);
}

/// The server said something the dialogue cannot follow: `what`, then the
/// offending line as one line of at most [`text::MAX_TEXT`] characters.
pub(crate) fn unexpected(what: &str, line: &[u8]) -> UpstreamError {
    unexpected_within(what, line, text::MAX_TEXT)
}

/// [`unexpected`] with another bound on the quoted line.
pub(crate) fn unexpected_within(what: &str, line: &[u8], max_text: usize) -> UpstreamError {
    UpstreamError::Unexpected(format!(
        "{what}: {}",
        text::one_line_within(
            &String::from_utf8_lossy(text::strip_eol(line)),
            "(empty line)",
            max_text
        )
    ))
}
