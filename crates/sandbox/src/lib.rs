//! The sandbox: a strict fake OAuth2 provider and strict fake IMAP, POP3 and
//! SMTP servers that only accept live bearer tokens. The end-to-end tests, the
//! benchmark and `mailbridge demo` run mailbridge against these instead of
//! Gmail or Microsoft 365.
//!
//! Everything listens on 127.0.0.1 with an ephemeral port and lives in
//! memory. The servers are deliberately strict where real providers are
//! (PKCE S256 only, single-use codes, rotating refresh tokens, the SASL
//! failure challenge that must be answered) so that a proxy passing these
//! tests does not depend on leniency the real world does not offer.
//!
//! Layout:
//! - [`pki`]: a throw-away CA and a `localhost` certificate for TLS.
//! - [`provider`]: the OAuth2 authorization server (axum) and the
//!   [`TokenValidator`] the mail servers use to check bearer tokens.
//! - [`imap`]: the IMAP server; command and SASL parsing live in
//!   `imap::syntax`, apart from the socket loop.
//! - [`pop3`]: the POP3 server; command parsing and byte-stuffing live in
//!   `pop3::syntax`, apart from the socket loop.
//! - [`smtp`]: the SMTP submission server; command parsing and the DATA
//!   reader live in `smtp::syntax`.

pub mod imap;
mod net;
pub mod pki;
pub mod pop3;
pub mod provider;
pub mod smtp;

pub use imap::{ImapServer, ImapServerOptions};
pub use pki::TestPki;
pub use pop3::{Pop3Server, Pop3ServerOptions};
pub use provider::{Provider, ProviderOptions, TokenRejection, TokenValidator};
pub use smtp::{ReceivedMessage, SmtpServer, SmtpServerOptions};

/// How a sandbox mail server does TLS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SandboxTls {
    /// Cleartext only; authentication is allowed without TLS.
    Plain,
    /// Cleartext greeting, STARTTLS required before authentication.
    StartTls,
    /// TLS from the first byte.
    Implicit,
}

/// A listener on 127.0.0.1 with an ephemeral port and the same large accept
/// queue as mailbridge's (the benchmark opens 10,000 sessions at once). Its
/// accept loop runs unconstrained for the same reason.
pub(crate) fn listen_loopback() -> std::io::Result<tokio::net::TcpListener> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(std::net::SocketAddr::from(([127, 0, 0, 1], 0)))?;
    socket.listen(LISTEN_BACKLOG)
}

/// The accept queue of the sandbox servers: as deep as mailbridge's, so a
/// burst that mailbridge accepts is not dropped by the server behind it.
const LISTEN_BACKLOG: u32 = 4096;

/// The JSON of the SASL failure challenge a sandbox mail server sends for a
/// refused token, in the form real servers use for each mechanism:
/// XOAUTH2 as Google documents it (and Dovecot sends it),
/// `{"status":"401","schemes":"bearer","scope":...}`; OAUTHBEARER with the
/// RFC 7628 error code, `{"status":"invalid_token",...}`, whatever the
/// reason (Dovecot 2.3 sends exactly that status).
pub(crate) fn failure_challenge(
    mechanism: mailbridge_proto::sasl::Mechanism,
    rejection: &TokenRejection,
    scope: &str,
) -> String {
    let json = match mechanism {
        mailbridge_proto::sasl::Mechanism::Xoauth2 => serde_json::json!({
            "status": rejection.status,
            "schemes": "bearer",
            "scope": scope,
        }),
        mailbridge_proto::sasl::Mechanism::Oauthbearer => serde_json::json!({
            "status": "invalid_token",
            "scope": scope,
        }),
    };
    json.to_string()
}
