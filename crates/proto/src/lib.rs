//! Sans-I/O protocol cores. Nothing here touches a socket: a session takes
//! bytes in and says what to do next; the tokio driver in mailbridge's
//! `net` does it. This crate's dependency graph has no tokio, no socket,
//! no TLS and no HTTP crate, so that rule is a compile error, not a
//! convention.
//!
//! Each protocol has two halves: the client-facing pre-auth session (what
//! the mail client talks to until it has logged in) and the upstream login
//! dialogue (mailbridge logging in to the real server with a bearer token).
//!
//! # Layout
//!
//! - [`imap`], [`pop3`], [`smtp`]: the two halves of each protocol.
//! - `framer`: the one line framer they all read with (line caps, IMAP
//!   literals, no rescans, secrets wiped).
//! - `bearer`: the one bearer-login driver the three upstream dialogues
//!   configure (mechanism, initial response or two steps, failure
//!   challenge, retry).
//! - [`refusal`]: a server's refusal as typed values ([`Refusal`]), read
//!   once by the protocol that received it.
//! - [`farewell`]: why a server ended a relayed session, read from the
//!   last bytes it sent (IMAP `* BYE`, POP3 `-ERR`, SMTP `421`).
//! - [`sasl`]: PLAIN / LOGIN decoding, XOAUTH2 / OAUTHBEARER encoding,
//!   failure challenges.
//! - [`text`]: text on one line, for replies, reasons and logs.
//! - [`limits`]: the pre-auth allowance (commands, failed logins) around
//!   any client session.
//! - [`trace`]: redacted renderings of a login dialogue (`mailbridge trace`).
//! - [`proxy`]: the PROXY protocol header (v1 and v2) a trusted proxy puts
//!   before a connection: how much to read, and whose connection it is.
//!
//! Everything that can hold a password, a token or a SASL response prints
//! redacted under `{:?}` (`debug_never_shows_secrets`).

#![forbid(unsafe_code)]

use std::fmt;

mod bearer;
pub mod farewell;
mod framer;
pub mod imap;
pub mod limits;
pub mod pop3;
pub mod proxy;
pub mod refusal;
pub mod sasl;
pub mod smtp;
#[cfg(test)]
mod testkit;
pub mod text;
pub mod trace;

pub use crate::refusal::Refusal;
use crate::sasl::{BearerToken, Credentials, FailureChallenge};

/// What the client-facing session wants the driver to do next.
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
    /// A whole message to store and forward (an SMTP device in spool
    /// mode): store it durably, then call `spooled` with the outcome.
    Spool(Message),
}

/// A message taken in full from a client, to be stored and sent later.
/// Its `Debug` form shows the envelope and the size, not the content.
pub struct Message {
    /// The envelope sender (`MAIL FROM`), empty for `<>`.
    pub from: String,
    /// The envelope recipients (`RCPT TO`), in order.
    pub recipients: Vec<String>,
    /// The content, dot-unstuffed, CRLF line ends, without the final
    /// `.` line.
    pub data: Vec<u8>,
    /// `MAIL FROM ... SMTPUTF8`: the envelope has UTF-8 addresses.
    pub smtputf8: bool,
    /// `BODY=8BITMIME`.
    pub eight_bit: bool,
    /// The client's EHLO/HELO name.
    pub client_name: Option<String>,
}

impl fmt::Debug for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Message")
            .field("from", &self.from)
            .field("recipients", &self.recipients)
            .field("size", &self.data.len())
            .finish_non_exhaustive()
    }
}

/// What became of a [`ClientStep::Spool`].
#[derive(Debug, Clone)]
pub enum SpoolOutcome {
    /// On disk, under this queue id.
    Queued {
        /// The queue id.
        id: String,
    },
    /// Not stored.
    Failed {
        /// Storage is full or unavailable for now (`452`) rather than the
        /// message refused (`554`).
        temporary: bool,
        /// One line, for the client.
        reason: String,
    },
}

/// A client's login request. Its `Debug` form shows the user name, never
/// the password.
#[derive(Debug)]
pub struct LoginRequest {
    /// The local credentials.
    pub credentials: Credentials,
    /// Protocol-specific client information to pass upstream: for IMAP the
    /// raw parameter list of the client's `ID` command (e.g.
    /// `("name" "Thunderbird")`), for SMTP the client's EHLO name.
    pub client_info: Option<String>,
    /// No password: an SMTP device sending by its address (the driver
    /// checks the address again; `credentials.user` is empty).
    pub by_address: bool,
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
    /// A temporary refusal that ends the connection, with `reason` (one
    /// line): IMAP `* BYE [UNAVAILABLE]`, POP3 `-ERR [SYS/TEMP]`, SMTP
    /// `421 4.7.0`. For connections over a limit and sessions that used up
    /// their pre-auth allowance.
    fn goodbye(&self, reason: &str) -> Vec<u8>;
    /// The reply once a [`ClientStep::Spool`] was stored (or not).
    fn spooled(&mut self, _outcome: &SpoolOutcome) -> Vec<u8> {
        Vec::new()
    }
    /// The login's password was checked locally and the session stays
    /// here to take messages for the spool (SMTP on a spooling listener),
    /// sending as one of `senders`. Other protocols never get this.
    fn login_local(&mut self, _senders: Vec<String>) -> Vec<u8> {
        Vec::new()
    }
    /// Whether the pre-auth command allowance applies now: not to a
    /// session that sends mail itself (a device known by its address, or
    /// a client logged in on a spooling listener), which may send many
    /// messages with many recipients on one connection.
    fn preauth(&self) -> bool {
        true
    }
}

/// What the upstream login dialogue wants the driver to do next.
pub enum UpstreamStep {
    /// Read more bytes from the server and `feed` them.
    NeedInput,
    /// Write these bytes to the server. (A SASL line holds the token:
    /// `Debug` shows the size only.)
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

/// Bytes on their way to a peer, in a `Debug` form: their size only. A
/// SASL line holds the access token, a pre-auth line may echo what a
/// client typed; sizes are all a log needs.
struct Payload<'a>(&'a [u8]);

impl fmt::Debug for Payload<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<{} bytes>", self.0.len())
    }
}

impl fmt::Debug for ClientStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientStep::NeedInput => f.write_str("NeedInput"),
            ClientStep::Send(b) => f.debug_tuple("Send").field(&Payload(b)).finish(),
            ClientStep::StartTls(b) => f.debug_tuple("StartTls").field(&Payload(b)).finish(),
            ClientStep::Login(req) => f.debug_tuple("Login").field(req).finish(),
            ClientStep::Close(b) => f.debug_tuple("Close").field(&Payload(b)).finish(),
            ClientStep::Spool(m) => f.debug_tuple("Spool").field(m).finish(),
        }
    }
}

impl fmt::Debug for UpstreamStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UpstreamStep::NeedInput => f.write_str("NeedInput"),
            UpstreamStep::Send(b) => f.debug_tuple("Send").field(&Payload(b)).finish(),
            UpstreamStep::StartTls => f.write_str("StartTls"),
            UpstreamStep::NeedToken => f.write_str("NeedToken"),
            UpstreamStep::Authenticated(ok) => f.debug_tuple("Authenticated").field(ok).finish(),
            UpstreamStep::Rejected(r) => f.debug_tuple("Rejected").field(r).finish(),
        }
    }
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

impl Rejection {
    /// The server refused the token for good and sent no failure challenge
    /// (Microsoft answers `NO AUTHENTICATE failed.` and `535 5.7.3
    /// Authentication unsuccessful` directly, for instance to a token that
    /// was revoked before its time): a token handed out from a cache may
    /// be the cause, and a newer one may pass. A temporary refusal (IMAP
    /// `[UNAVAILABLE]`, POP3 `[SYS/TEMP]`, SMTP 4xx), an IMAP `BAD` and an
    /// SMTP reply other than 535 are about something else.
    pub fn may_be_stale_token(&self) -> bool {
        use crate::refusal::{ImapStatus, RefusalCode};
        if self.challenge.is_some() || self.refusal.is_temporary() {
            return false;
        }
        match &self.refusal.code {
            RefusalCode::Imap { status, .. } => *status == ImapStatus::No,
            RefusalCode::Pop3 { .. } => true,
            RefusalCode::Smtp { code, .. } => *code == 535,
        }
    }
}

/// A protocol error from the upstream: it said something we cannot follow.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The server's bytes did not parse.
    #[error("the server sent something unexpected: {0}")]
    Unexpected(String),
    /// The server offers no bearer-token mechanism we may use.
    #[error("{}", no_mechanism(.allowed, .offered))]
    NoMechanism {
        /// The mechanisms the configuration allows, in its order.
        allowed: Vec<sasl::Mechanism>,
        /// What the server offers, as it said it.
        offered: String,
    },
    /// STARTTLS required but not offered.
    #[error("the server does not offer STARTTLS")]
    NoStartTls,
    /// A line longer than we accept.
    #[error("the server sent a line longer than {0} bytes")]
    LineTooLong(usize),
}

/// [`UpstreamError::NoMechanism`] in words: which mechanisms were looked
/// for, and what to change when the server offers one the configuration
/// leaves out.
fn no_mechanism(allowed: &[sasl::Mechanism], offered: &str) -> String {
    let names: Vec<&str> = allowed.iter().map(|m| m.name()).collect();
    let all = [sasl::Mechanism::Xoauth2, sasl::Mechanism::Oauthbearer];
    if all.iter().all(|m| allowed.contains(m)) {
        return format!("the server offers neither XOAUTH2 nor OAUTHBEARER (it offers: {offered})");
    }
    let left_out: Vec<&str> = all
        .iter()
        .filter(|m| !allowed.contains(m))
        .map(|m| m.name())
        .filter(|n| offered.split([' ', '=']).any(|o| o.eq_ignore_ascii_case(n)))
        .collect();
    let mut text = format!(
        "the server does not offer {} (it offers: {offered})",
        names.join(" or ")
    );
    if !left_out.is_empty() {
        text.push_str(&format!(
            "; it offers {}, which the provider's `mechanisms` setting leaves out: add it there",
            left_out.join(" and ")
        ));
    }
    text
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
    /// After a `Rejected`: start another authentication on the same
    /// connection (next step is `NeedToken`). IMAP, POP3 and SMTP all
    /// allow another AUTH after a refusal.
    fn retry(&mut self);
    /// How to read why this protocol's server ended a session, from the
    /// last bytes it sent (see [`farewell`]).
    fn farewell(&self) -> farewell::Reader;
    /// What the server has advertised so far (for `mailbridge doctor`).
    fn advertised(&self) -> Advertised;
    /// The command that ends the session politely, before or after login
    /// (IMAP `LOGOUT`, POP3 and SMTP `QUIT`); the server then closes.
    fn logout(&self) -> &'static [u8];
}

/// What an upstream server advertised before login, as far as the login
/// dialogue has read it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Advertised {
    /// The server's greeting was accepted.
    pub greeted: bool,
    /// The server offers STARTTLS (IMAP, SMTP) or STLS (POP3), or the
    /// dialogue already upgraded with it.
    pub starttls: bool,
    /// The session runs over TLS started with STARTTLS / STLS.
    pub tls_started: bool,
    /// The SASL mechanisms offered, as the server spelled them (IMAP
    /// `AUTH=`, POP3 `SASL`, SMTP `AUTH`), once the capabilities the
    /// login uses were read; None before that, or when the server would
    /// not say (a POP3 server that refuses CAPA).
    pub mechanisms: Option<Vec<String>>,
    /// The bearer mechanism the login chose, once chosen.
    pub chosen: Option<sasl::Mechanism>,
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

#[cfg(test)]
mod tests {
    use secrecy::{ExposeSecret, SecretString};

    use super::*;
    use crate::testkit::b64;

    const PASSWORD: &str = "hunter2-pass";
    const TOKEN: &str = "ya29.s3cr3t-access-token";

    /// Fails when `dbg` shows any form of the secrets: as text, as base64,
    /// inside the SASL responses that carry them, or as a list of bytes.
    fn assert_redacted(what: &str, dbg: &str) {
        let token = bearer_token();
        let forms = [
            PASSWORD.to_owned(),
            TOKEN.to_owned(),
            b64(PASSWORD.as_bytes()),
            b64(TOKEN.as_bytes()),
            b64(format!("\0alice\0{PASSWORD}").as_bytes()),
            sasl::xoauth2_response(&token).expose_secret().to_owned(),
            sasl::oauthbearer_response(&token)
                .expose_secret()
                .to_owned(),
            // A `Vec<u8>` printed as numbers.
            as_numbers(PASSWORD.as_bytes()),
            as_numbers(TOKEN.as_bytes()),
            as_numbers(sasl::xoauth2_response(&token).expose_secret().as_bytes()),
            as_numbers(
                sasl::oauthbearer_response(&token)
                    .expose_secret()
                    .as_bytes(),
            ),
        ];
        for form in forms {
            assert!(!dbg.contains(&form), "{what} shows {form:?}: {dbg}");
        }
    }

    /// Feeds `script` and runs the dialogue until it waits for input or
    /// a token (`tls_started` on a STARTTLS step): the steps' names, or
    /// the error.
    fn drive(login: &mut dyn UpstreamLogin, script: &[u8]) -> Result<Vec<&'static str>, String> {
        login.feed(script);
        let mut seen = Vec::new();
        for _ in 0..20 {
            match login.next_step().map_err(|e| e.to_string())? {
                UpstreamStep::NeedInput => return Ok(seen),
                UpstreamStep::NeedToken => {
                    seen.push("token");
                    return Ok(seen);
                }
                UpstreamStep::StartTls => {
                    seen.push("starttls");
                    login.tls_started();
                }
                UpstreamStep::Send(_) => seen.push("send"),
                _ => seen.push("other"),
            }
        }
        Ok(seen)
    }

    fn names(list: &[&str]) -> Option<Vec<String>> {
        Some(list.iter().map(|s| s.to_string()).collect())
    }

    /// `advertised` says what each server offered: the greeting, STARTTLS,
    /// the mechanisms the login chose from (also when it found none) and
    /// the one chosen; `logout` ends a session in each protocol.
    #[test]
    fn advertised_reports_what_the_server_offered() {
        // IMAP, capabilities in the greeting.
        let mut imap = imap::ImapUpstreamLogin::new(Default::default());
        assert_eq!(imap.advertised(), Advertised::default());
        let steps = drive(
            &mut imap,
            b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN AUTH=OAUTHBEARER] hi\r\n",
        )
        .unwrap();
        assert_eq!(steps, ["token"]);
        let a = imap.advertised();
        assert!(a.greeted && !a.starttls && !a.tls_started);
        assert_eq!(a.mechanisms, names(&["PLAIN", "OAUTHBEARER"]));
        assert_eq!(a.chosen, Some(sasl::Mechanism::Oauthbearer));
        assert_eq!(imap.logout(), b"mb0 LOGOUT\r\n");

        // IMAP over STARTTLS: the mechanisms are the ones read after TLS.
        let mut imap = imap::ImapUpstreamLogin::new(imap::UpstreamOptions {
            starttls: true,
            ..Default::default()
        });
        drive(
            &mut imap,
            b"* OK [CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED] hi\r\n",
        )
        .unwrap();
        assert!(imap.advertised().starttls && !imap.advertised().tls_started);
        assert_eq!(imap.advertised().mechanisms, None);
        drive(&mut imap, b"mb1 OK begin TLS\r\n").unwrap();
        drive(
            &mut imap,
            b"* CAPABILITY IMAP4rev1 AUTH=XOAUTH2\r\nmb2 OK\r\n",
        )
        .unwrap();
        let a = imap.advertised();
        assert!(a.starttls && a.tls_started);
        assert_eq!(a.mechanisms, names(&["XOAUTH2"]));

        // IMAP without a bearer mechanism: the error, and what was offered.
        let mut imap = imap::ImapUpstreamLogin::new(Default::default());
        let e = drive(&mut imap, b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] hi\r\n").unwrap_err();
        assert!(e.contains("neither XOAUTH2 nor OAUTHBEARER"), "{e}");
        let a = imap.advertised();
        assert!(a.greeted);
        assert_eq!(a.mechanisms, names(&["PLAIN"]));
        assert_eq!(a.chosen, None);

        // Only OAUTHBEARER offered, only XOAUTH2 allowed: the message says
        // which setting leaves the offered one out.
        let mut imap = imap::ImapUpstreamLogin::new(imap::UpstreamOptions {
            preference: vec![sasl::Mechanism::Xoauth2],
            ..Default::default()
        });
        let e = drive(
            &mut imap,
            b"* OK [CAPABILITY IMAP4rev1 AUTH=OAUTHBEARER] hi\r\n",
        )
        .unwrap_err();
        assert_eq!(
            e,
            "the server does not offer XOAUTH2 (it offers: AUTH=OAUTHBEARER); it offers OAUTHBEARER, which the provider's `mechanisms` setting leaves out: add it there"
        );
        // Neither offered: no advice about the setting.
        let mut imap = imap::ImapUpstreamLogin::new(imap::UpstreamOptions {
            preference: vec![sasl::Mechanism::Xoauth2],
            ..Default::default()
        });
        let e = drive(&mut imap, b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] hi\r\n").unwrap_err();
        assert_eq!(
            e,
            "the server does not offer XOAUTH2 (it offers: AUTH=PLAIN)"
        );

        // Not a greeting.
        let mut imap = imap::ImapUpstreamLogin::new(Default::default());
        assert!(drive(&mut imap, b"* BYE go away\r\n").is_err());
        assert!(!imap.advertised().greeted);

        // POP3: CAPA's SASL line; a refused CAPA says nothing.
        let mut pop3 = pop3::Pop3UpstreamLogin::new(Default::default());
        drive(
            &mut pop3,
            b"+OK hi\r\n+OK\r\nSTLS\r\nSASL XOAUTH2 PLAIN\r\n.\r\n",
        )
        .unwrap();
        let a = pop3.advertised();
        assert!(a.greeted && a.starttls);
        assert_eq!(a.mechanisms, names(&["XOAUTH2", "PLAIN"]));
        assert_eq!(a.chosen, Some(sasl::Mechanism::Xoauth2));
        assert_eq!(pop3.logout(), b"QUIT\r\n");
        let mut pop3 = pop3::Pop3UpstreamLogin::new(Default::default());
        drive(&mut pop3, b"+OK hi\r\n-ERR no CAPA here\r\n").unwrap();
        assert_eq!(pop3.advertised().mechanisms, None);

        // SMTP: EHLO's AUTH keyword.
        let mut smtp = smtp::SmtpUpstreamLogin::new(Default::default());
        let e = drive(
            &mut smtp,
            b"220 hi\r\n250-hi\r\n250-STARTTLS\r\n250 AUTH LOGIN PLAIN\r\n",
        )
        .unwrap_err();
        assert!(e.contains("AUTH LOGIN PLAIN"), "{e}");
        let a = smtp.advertised();
        assert!(a.greeted && a.starttls && !a.tls_started);
        assert_eq!(a.mechanisms, names(&["LOGIN", "PLAIN"]));
        assert_eq!(smtp.logout(), b"QUIT\r\n");
    }

    /// The first bytes of `secret` as `Debug` of a byte vector lists them.
    fn as_numbers(secret: &[u8]) -> String {
        let listed = format!("{:?}", secret);
        listed[1..]
            .split(", ")
            .take(6)
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Sessions and logins that can be printed.
    trait DebugClient: ClientSession + fmt::Debug {}
    impl<T: ClientSession + fmt::Debug> DebugClient for T {}
    trait DebugLogin: UpstreamLogin + fmt::Debug {}
    impl<T: UpstreamLogin + fmt::Debug> DebugLogin for T {}

    fn bearer_token() -> BearerToken {
        BearerToken {
            user: "alice@example.com".into(),
            token: SecretString::from(TOKEN.to_owned()),
            host: "imap.example.com".into(),
            port: 993,
        }
    }

    /// Every protocol value that can hold a password, a token or a SASL
    /// response prints redacted under `{:?}`.
    #[test]
    fn debug_never_shows_secrets() {
        // The check itself catches the forms a leak would take.
        let token = bearer_token();
        for leak in [
            format!("{:?}", format!("x {PASSWORD}\r\n").into_bytes()),
            format!("{:?}", format!("{TOKEN}\r\n").as_bytes()),
            sasl::xoauth2_response(&token).expose_secret().to_owned(),
            b64(format!("\0alice\0{PASSWORD}").as_bytes()),
            // What a derived `Debug` of `UpstreamStep::Send` printed.
            format!(
                "Send({:?})",
                format!(
                    "mb1 AUTHENTICATE XOAUTH2 {}\r\n",
                    sasl::xoauth2_response(&token).expose_secret()
                )
                .into_bytes()
            ),
        ] {
            let caught = std::panic::catch_unwind(|| assert_redacted("leak", &leak));
            assert!(caught.is_err(), "not caught: {leak}");
        }

        assert_redacted("BearerToken", &format!("{token:?}"));
        assert_redacted(
            "XOAUTH2 response",
            &format!("{:?}", sasl::xoauth2_response(&token)),
        );
        assert_redacted(
            "OAUTHBEARER response",
            &format!("{:?}", sasl::oauthbearer_response(&token)),
        );
        let credentials =
            sasl::login_credentials(b"alice", PASSWORD.as_bytes()).expect("credentials");
        assert_redacted("Credentials", &format!("{credentials:?}"));
        let plain = sasl::decode_plain(format!("\0alice\0{PASSWORD}").as_bytes()).unwrap();
        assert_redacted("Credentials (PLAIN)", &format!("{plain:?}"));

        // Client side: the login request as each session hands it out, and
        // each session with the password still buffered.
        let sessions: Vec<(&str, Box<dyn DebugClient>, String)> = vec![
            (
                "IMAP",
                Box::new(imap::ImapClientSession::new(imap::ClientOptions {
                    plaintext_login_allowed: true,
                    ..Default::default()
                })),
                format!("a1 LOGIN alice {PASSWORD}\r\na2 LOGIN alice {{12}}\r\n{PASSWORD}"),
            ),
            (
                "POP3",
                Box::new(pop3::Pop3ClientSession::new(pop3::ClientOptions {
                    plaintext_login_allowed: true,
                    ..Default::default()
                })),
                format!("USER alice\r\nPASS {PASSWORD}\r\nPASS {PASSWORD}"),
            ),
            (
                "SMTP",
                Box::new(smtp::SmtpClientSession::new(smtp::ClientOptions {
                    plaintext_login_allowed: true,
                    ..Default::default()
                })),
                format!(
                    "EHLO c\r\nAUTH PLAIN {}\r\nAUTH PLAIN {}",
                    b64(format!("\0alice\0{PASSWORD}").as_bytes()),
                    b64(format!("\0alice\0{PASSWORD}").as_bytes())
                ),
            ),
        ];
        for (name, mut sess, input) in sessions {
            sess.feed(input.as_bytes());
            let mut logins = 0;
            loop {
                let step = sess.next_step();
                assert_redacted(name, &format!("{step:?}"));
                match step {
                    ClientStep::NeedInput => break,
                    ClientStep::Login(req) => {
                        assert_eq!(req.credentials.password.expose_secret(), PASSWORD);
                        assert_redacted(name, &format!("{req:?}"));
                        assert_redacted(name, &format!("{sess:?}"));
                        logins += 1;
                        // Buffered, pipelined: the second login's password.
                        let pending = sess.take_pending();
                        assert_redacted(name, &format!("{:?}", ClientStep::Send(pending)));
                        break;
                    }
                    _ => {}
                }
            }
            assert_eq!(logins, 1, "{name}");
        }

        // Upstream side: the step that sends the SASL response, and each
        // login with that step queued and after it left.
        let logins: Vec<(&str, Box<dyn DebugLogin>, &[u8])> = vec![
            (
                "IMAP",
                Box::new(imap::ImapUpstreamLogin::new(Default::default())),
                b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=XOAUTH2] hi\r\n",
            ),
            (
                "POP3",
                Box::new(pop3::Pop3UpstreamLogin::new(pop3::UpstreamOptions {
                    initial_response: true,
                    ..Default::default()
                })),
                b"+OK hi\r\n+OK\r\nSASL XOAUTH2\r\n.\r\n",
            ),
            (
                "SMTP",
                Box::new(smtp::SmtpUpstreamLogin::new(Default::default())),
                b"220 hi\r\n250-hi\r\n250 AUTH XOAUTH2\r\n",
            ),
        ];
        for (name, mut login, script) in logins {
            login.feed(script);
            let mut sent_response = false;
            for _ in 0..10 {
                let step = login.next_step().expect("dialogue");
                assert_redacted(name, &format!("{step:?}"));
                match step {
                    UpstreamStep::NeedToken => {
                        login.provide_token(&token);
                        assert_redacted(name, &format!("{login:?}"));
                    }
                    UpstreamStep::Send(bytes) => {
                        let xo = sasl::xoauth2_response(&token);
                        let line = String::from_utf8_lossy(&bytes);
                        sent_response |= line.contains(xo.expose_secret());
                    }
                    UpstreamStep::NeedInput => break,
                    _ => {}
                }
            }
            assert!(sent_response, "{name} never sent the response");
            assert_redacted(name, &format!("{login:?}"));
        }

        // The framer and the bearer driver, holding the secrets.
        let mut framer = framer::Framer::lines(1024);
        framer.push(format!("PASS {PASSWORD}").as_bytes());
        assert_redacted("Framer", &format!("{framer:?}"));
        let frame = framer::Frame::Message(format!("PASS {PASSWORD}\r\n").into_bytes());
        assert_redacted("Frame", &format!("{frame:?}"));
        let mut bearer = bearer::Bearer::new(vec![sasl::Mechanism::Xoauth2]);
        bearer.choose(bearer::Offer::Unknown);
        let step = bearer.provide_token(&token, bearer::InitialResponse::Never, |m, r| {
            format!("AUTH {} {}\r\n", m.name(), r.unwrap_or_default())
        });
        assert_redacted("Bearer", &format!("{bearer:?} {step:?}"));
    }
}
