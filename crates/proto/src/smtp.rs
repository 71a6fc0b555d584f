//! SMTP: client-facing pre-auth session and upstream login dialogue.
//!
//! Both halves first split the byte stream into lines under a length cap
//! (`crate::framer`)
//! (smtp-proto has none), and only then hand a complete line to smtp-proto:
//! `Request::parse` for the client's commands, `ResponseReceiver` for the
//! server's (multi-line) replies. SASL is done by hand with
//! [`crate::sasl`].
//!
//! Client side: mailbridge plays an ESMTP submission server until AUTH
//! succeeds (EHLO/HELO, STARTTLS, AUTH PLAIN and AUTH LOGIN in every form
//! clients use); mail transaction commands before AUTH get `530`, so the
//! proxy is never an open relay. Upstream side: greeting, EHLO, optional
//! STARTTLS and a second EHLO, then `AUTH XOAUTH2` / `AUTH OAUTHBEARER`,
//! one-step with a fallback to two-step, with the failure challenge
//! absorbed.

use std::collections::VecDeque;
use std::fmt;

use secrecy::zeroize::Zeroize;
use smtp_proto::response::parser::ResponseReceiver;
use smtp_proto::{AUTH_LOGIN, AUTH_PLAIN, Request};

use super::{
    Advertised, ClientSession, ClientStep, FailureKind, LoginFailure, LoginRequest, Message,
    SpoolOutcome, UpstreamError, UpstreamLogin, UpstreamStep, UpstreamSuccess,
};
use crate::bearer::{Bearer, InitialResponse, Offer};
use crate::framer::{Frame, Framer};
use crate::refusal::{EnhancedCode, Refusal, RefusalCode};
use crate::sasl::{self, BearerToken, Mechanism, SaslError};
use crate::text::{self, strip_eol};

/// Default line limit, CRLF included: far above any AUTH line a client
/// sends (RFC 4954 asks for 12288 octets only for the server side of big
/// SASL mechanisms; PLAIN and LOGIN stay small) and RFC 5321's 512.
const DEFAULT_MAX_LINE: usize = 4 * 1024;

/// RFC 5321 section 4.5.3.1.4: a command line is at most 512 octets, CRLF
/// included. RFC 4954 section 4: an AUTH command that would be longer MUST
/// NOT carry the initial response; the response goes after the server's
/// empty `334` instead. Real servers enforce it: Postfix cuts command lines
/// at `line_length_limit` (2048 by default) and then refuses the cut
/// initial response with `535 5.7.8 Error: authentication failed: Invalid
/// base64 data in initial response` (found by the interop suite with
/// access tokens of Microsoft's size), while it takes SASL responses up to
/// 12288 octets. Google-sized tokens stay one-step.
const MAX_COMMAND_LINE: usize = 512;

/// Default advertised SIZE: 50 MiB. Also mailbridge's own bound when the
/// upstream declares no limit (a spooled message is held whole).
const DEFAULT_MAX_MESSAGE_SIZE: u64 = 50 * 1024 * 1024;

/// Most lines one server reply may have (a long EHLO list has about 20).
const MAX_REPLY_LINES: usize = 100;

/// Longest reply text we put on one line of our own (RFC 5321 caps reply
/// lines at 512 octets).
const MAX_TEXT: usize = 400;

/// `334` prompts of AUTH LOGIN: base64 of `Username:` and `Password:`
/// ([`sasl::LOGIN_PROMPT_USER`], [`sasl::LOGIN_PROMPT_PASSWORD`]).
const PROMPT_USER: &[u8] = b"334 VXNlcm5hbWU6\r\n";
const PROMPT_PASS: &[u8] = b"334 UGFzc3dvcmQ6\r\n";

/// [`text::one_line`] with SMTP's longer bound ([`MAX_TEXT`]).
fn one_line(s: &str, fallback: &str) -> String {
    text::one_line_within(s, fallback, MAX_TEXT)
}

/// A host name for EHLO / HELO: visible ASCII, at most 255 characters.
fn host_name(name: &str) -> Option<String> {
    let name = name.trim();
    (!name.is_empty() && name.len() <= 255 && name.bytes().all(|b| b.is_ascii_graphic()))
        .then(|| name.to_owned())
}

/// The command verb of a line, upper-cased (at most 16 characters).
fn verb(line: &[u8]) -> String {
    strip_eol(line)
        .iter()
        .skip_while(|&&b| b == b' ')
        .take_while(|&&b| b != b' ')
        .take(16)
        .map(|b| char::from(b.to_ascii_uppercase()))
        .collect()
}

// ---------------------------------------------------------------------------
// Client side
// ---------------------------------------------------------------------------

/// Options of the client-facing pre-auth session.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// The listener offers STARTTLS (the connection is not yet in TLS).
    pub starttls_offered: bool,
    /// Implicit-TLS listener: the connection is already encrypted.
    pub tls_active: bool,
    /// AUTH is allowed without TLS (loopback listener, or the configuration
    /// says so). Otherwise AUTH is not advertised and gets `538`.
    pub plaintext_login_allowed: bool,
    /// Our name in the greeting and the EHLO reply (default `localhost`).
    pub hostname: String,
    /// Longest command line accepted, CRLF included (default 4 KiB).
    pub max_line: usize,
    /// The advertised SIZE, also enforced on a device's `MAIL ... SIZE=`
    /// and spooled content (default 50 MiB). Keep it equal to
    /// [`Extensions::message_size_limit`] of `extensions`: the limit a
    /// client is told is the real server's.
    pub max_message_size: u64,
    /// The optional extensions the EHLO reply repeats from the real
    /// server, as last seen (default: [`Extensions::default`], the fixed
    /// list mailbridge advertised before it learned any). Its `size` is
    /// not read here: SIZE comes from `max_message_size`.
    pub extensions: Extensions,
    /// The client is a device allowed by its address: it may send without
    /// AUTH (see [`DeviceOptions`]).
    pub device: Option<DeviceOptions>,
}

/// A device that sends without AUTH, as the account its address maps to.
#[derive(Debug, Clone, Default)]
pub struct DeviceOptions {
    /// The envelope senders it may use (compared without case); anything
    /// else gets `550 5.7.1`.
    pub senders: Vec<String>,
    /// Store and forward: the session takes the whole message and hands it
    /// over with [`ClientStep::Spool`]; otherwise `MAIL` starts a live
    /// login as the account ([`LoginRequest::by_address`]) and the rest of
    /// the transaction is relayed.
    pub spool: bool,
}

/// Recipients one spooled message may have (RFC 5321 section 4.5.3.1.8's
/// minimum).
const MAX_RECIPIENTS: usize = 100;

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            starttls_offered: false,
            tls_active: false,
            plaintext_login_allowed: false,
            hostname: "localhost".to_owned(),
            max_line: DEFAULT_MAX_LINE,
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            extensions: Extensions::default(),
            device: None,
        }
    }
}

/// The ESMTP extensions a server advertised in its EHLO reply, as far as
/// mailbridge's own pre-auth EHLO repeats them: after AUTH the client's
/// bytes go to that server unchanged, so the client must be told what that
/// server does (SMTPUTF8, DSN, its real SIZE), not a fixed list.
///
/// Never repeated: CHUNKING (RFC 3030). Before AUTH mailbridge's session
/// does not take BDAT (a spooling device's message comes by DATA), and
/// after AUTH a client that saw CHUNKING here would send BDAT whose binary
/// chunks the relay passes on blindly; that works only while the upstream
/// offers CHUNKING too, which a config reload or another account's
/// provider can change under the client. STARTTLS and AUTH are mailbridge's
/// own (see [`SmtpClientSession`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extensions {
    /// RFC 1870 SIZE: the server's limit in octets; `None` when it
    /// declared none (no SIZE keyword, or `SIZE` / `SIZE 0`).
    pub size: Option<u64>,
    /// RFC 2920 PIPELINING.
    pub pipelining: bool,
    /// RFC 6152 8BITMIME.
    pub eight_bit_mime: bool,
    /// RFC 6531 SMTPUTF8.
    pub smtputf8: bool,
    /// RFC 3461 DSN.
    pub dsn: bool,
    /// RFC 2034 ENHANCEDSTATUSCODES.
    pub enhanced_status_codes: bool,
}

impl Default for Extensions {
    /// What mailbridge advertised before it learned anything, and still
    /// does until an account's server has been seen: PIPELINING, 8BITMIME,
    /// ENHANCEDSTATUSCODES and SIZE 50 MiB, which every submission server
    /// mailbridge fronts offers; no SMTPUTF8, no DSN.
    fn default() -> Self {
        Extensions {
            size: Some(DEFAULT_MAX_MESSAGE_SIZE),
            pipelining: true,
            eight_bit_mime: true,
            smtputf8: false,
            dsn: false,
            enhanced_status_codes: true,
        }
    }
}

impl Extensions {
    /// Reads a server's EHLO keywords, one per reply line after the first
    /// (`SIZE 35882577`, `8BITMIME`, ...; case-insensitive), as the
    /// upstream login reports them in [`UpstreamSuccess::capabilities`].
    /// Anything not understood is left out.
    pub fn from_ehlo(keywords: &[String]) -> Extensions {
        let mut ext = Extensions {
            size: None,
            pipelining: false,
            eight_bit_mime: false,
            smtputf8: false,
            dsn: false,
            enhanced_status_codes: false,
        };
        for line in keywords {
            let mut words = line.split_whitespace();
            let Some(keyword) = words.next() else {
                continue;
            };
            match keyword.to_ascii_uppercase().as_str() {
                // RFC 1870: a missing or zero parameter means no fixed
                // limit; a malformed one is taken as none too.
                "SIZE" => {
                    ext.size = words
                        .next()
                        .and_then(|n| n.parse::<u64>().ok())
                        .filter(|&n| n > 0);
                }
                "PIPELINING" => ext.pipelining = true,
                "8BITMIME" => ext.eight_bit_mime = true,
                "SMTPUTF8" => ext.smtputf8 = true,
                "DSN" => ext.dsn = true,
                "ENHANCEDSTATUSCODES" => ext.enhanced_status_codes = true,
                _ => {}
            }
        }
        ext
    }

    /// What both support: each extension only when both offer it, the
    /// smaller of the two limits (no limit counts as larger than any).
    pub fn common(self, other: Extensions) -> Extensions {
        Extensions {
            size: match (self.size, other.size) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            },
            pipelining: self.pipelining && other.pipelining,
            eight_bit_mime: self.eight_bit_mime && other.eight_bit_mime,
            smtputf8: self.smtputf8 && other.smtputf8,
            dsn: self.dsn && other.dsn,
            enhanced_status_codes: self.enhanced_status_codes && other.enhanced_status_codes,
        }
    }

    /// The SIZE to advertise and enforce ([`ClientOptions::max_message_size`]):
    /// the server's limit, or mailbridge's default of 50 MiB when it has
    /// none.
    pub fn message_size_limit(&self) -> u64 {
        self.size.unwrap_or(DEFAULT_MAX_MESSAGE_SIZE)
    }
}

/// A mail transaction a spooling device is building.
struct Transaction {
    from: String,
    recipients: Vec<String>,
    smtputf8: bool,
    eight_bit: bool,
}

/// The content after `DATA`, until the lone dot.
struct DataIn {
    /// Bytes as received (still dot-stuffed), or only the last few once
    /// the message is over the size limit.
    raw: Vec<u8>,
    /// Where the search for the end stopped.
    scanned: usize,
    /// Over `max_message_size`: the rest is read and dropped.
    too_big: bool,
}

enum ClientState {
    /// Reading commands.
    Commands,
    /// Sent `334 ` for AUTH PLAIN; the next line is the response.
    AuthPlain,
    /// Sent the `Username:` prompt of AUTH LOGIN.
    AuthLoginUser,
    /// Sent the `Password:` prompt; holds the decoded user name (wiped on
    /// drop, never printed).
    AuthLoginPass { user: sasl::PendingUser },
    /// Sent the STARTTLS `220`; waiting for `tls_started`.
    TlsPending,
    /// Emitted `ClientStep::Login`; waiting for the driver's verdict.
    LoginPending,
    /// Sent `354`: reading a spooled message's content.
    Data(DataIn),
    /// Emitted `ClientStep::Spool`; waiting for `spooled`.
    SpoolPending,
    /// Logged in: the session is over, bytes go upstream.
    LoggedIn,
    /// QUIT: the connection is closing.
    Closed,
}

impl ClientState {
    fn name(&self) -> &'static str {
        match self {
            ClientState::Commands => "commands",
            ClientState::AuthPlain => "auth-plain",
            ClientState::AuthLoginUser => "auth-login-user",
            ClientState::AuthLoginPass { .. } => "auth-login-password",
            ClientState::TlsPending => "tls-pending",
            ClientState::LoginPending => "login-pending",
            ClientState::Data(_) => "data",
            ClientState::SpoolPending => "spool-pending",
            ClientState::LoggedIn => "logged-in",
            ClientState::Closed => "closed",
        }
    }

    /// Leaves an AUTH exchange (a pending user name is wiped on drop).
    fn clear(&mut self) {
        *self = ClientState::Commands;
    }
}

/// The SMTP server side until AUTH succeeds: greeting, EHLO/HELO,
/// STARTTLS, AUTH PLAIN and AUTH LOGIN, NOOP, RSET, QUIT; MAIL, RCPT and
/// DATA get `530` until then.
///
/// Over-limit input: a line over `max_line` gets `500 5.5.2 Line too long`
/// and is dropped up to its line ending; the session stays usable.
///
/// Memory: unframed input is whatever the driver fed and has not yet
/// drained with `next_step`; a partial line never exceeds `max_line`.
/// While a login is pending the session does not consume input: a driver
/// that keeps reading then holds the client's pipelined bytes (MAIL, RCPT,
/// DATA right after AUTH) for `take_pending`, in order.
pub struct SmtpClientSession {
    opts: ClientOptions,
    framer: Framer,
    state: ClientState,
    /// TLS is on (implicit, or STARTTLS done).
    in_tls: bool,
    /// The client sent EHLO or HELO (since the last STARTTLS).
    greeted: bool,
    /// The client's EHLO/HELO name, when it is a usable host name.
    client_name: Option<String>,
    /// A spooling device's transaction in progress.
    transaction: Option<Transaction>,
    /// A device's `MAIL` line, sent upstream ahead of the rest once its
    /// live login succeeded.
    replay: Vec<u8>,
    /// Logged in locally (a spooling listener): no second AUTH.
    authenticated: bool,
}

impl fmt::Debug for SmtpClientSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Buffers and the LOGIN user may hold secrets: sizes only.
        f.debug_struct("SmtpClientSession")
            .field("state", &self.state.name())
            .field("in_tls", &self.in_tls)
            .field("greeted", &self.greeted)
            .field("client_name", &self.client_name)
            .field("buffered", &self.framer.buffered())
            .finish()
    }
}

fn reply(text: &str) -> ClientStep {
    ClientStep::Send(format!("{text}\r\n").into_bytes())
}

impl SmtpClientSession {
    /// A new pre-auth session.
    pub fn new(opts: ClientOptions) -> Self {
        SmtpClientSession {
            framer: Framer::lines(opts.max_line.max(3)),
            in_tls: opts.tls_active,
            opts,
            state: ClientState::Commands,
            greeted: false,
            client_name: None,
            transaction: None,
            replay: Vec::new(),
            authenticated: false,
        }
    }

    fn hostname(&self) -> String {
        host_name(&self.opts.hostname).unwrap_or_else(|| "localhost".to_owned())
    }

    fn login_allowed(&self) -> bool {
        self.in_tls || self.opts.plaintext_login_allowed
    }

    /// The EHLO reply: the real server's extensions as last seen (see
    /// [`Extensions`]; never CHUNKING), then our own STARTTLS and AUTH.
    fn ehlo_reply(&self) -> Vec<u8> {
        let ext = &self.opts.extensions;
        let mut lines = vec![self.hostname()];
        for (offered, keyword) in [
            (ext.pipelining, "PIPELINING"),
            (ext.eight_bit_mime, "8BITMIME"),
            (ext.enhanced_status_codes, "ENHANCEDSTATUSCODES"),
        ] {
            if offered {
                lines.push(keyword.to_owned());
            }
        }
        lines.push(format!("SIZE {}", self.opts.max_message_size));
        for (offered, keyword) in [(ext.smtputf8, "SMTPUTF8"), (ext.dsn, "DSN")] {
            if offered {
                lines.push(keyword.to_owned());
            }
        }
        if self.opts.starttls_offered && !self.in_tls {
            lines.push("STARTTLS".to_owned());
        }
        if self.login_allowed() {
            lines.push("AUTH PLAIN LOGIN".to_owned());
        }
        let last = lines.len() - 1;
        let mut out = String::new();
        for (i, line) in lines.iter().enumerate() {
            let sep = if i == last { ' ' } else { '-' };
            out.push_str(&format!("250{sep}{line}\r\n"));
        }
        out.into_bytes()
    }

    fn greet(&mut self, host: &str) {
        self.greeted = true;
        self.client_name = host_name(host);
    }

    /// A login with checked credentials, or the refusal.
    fn login(&mut self, creds: Result<sasl::Credentials, SaslError>) -> ClientStep {
        self.state.clear();
        match creds {
            Ok(credentials) => {
                self.state = ClientState::LoginPending;
                ClientStep::Login(LoginRequest {
                    credentials,
                    client_info: self.client_name.clone(),
                    by_address: false,
                })
            }
            Err(SaslError::Base64) => reply("501 5.5.2 Invalid base64 data"),
            Err(e @ SaslError::PlainFormat) => reply(&format!("501 5.5.2 {e}")),
            Err(e) => reply(&format!("535 5.7.8 {e}")),
        }
    }

    fn starttls(&mut self) -> ClientStep {
        if self.in_tls {
            return reply("503 5.5.1 TLS is already active");
        }
        if !self.opts.starttls_offered {
            return reply("502 5.5.1 STARTTLS is not available here");
        }
        // Whatever the client sent after STARTTLS is plaintext that must not
        // be taken as coming from inside TLS; and RFC 3207 section 4.2:
        // forget what the client said before, it must EHLO again.
        self.framer.reset();
        self.greeted = false;
        self.client_name = None;
        self.state = ClientState::TlsPending;
        ClientStep::StartTls(b"220 2.0.0 Ready to start TLS\r\n".to_vec())
    }

    fn auth(&mut self, mechanism: u64, initial: &str) -> ClientStep {
        let initial = initial.trim();
        if mechanism == AUTH_PLAIN {
            if initial.is_empty() {
                self.state = ClientState::AuthPlain;
                return ClientStep::Send(b"334 \r\n".to_vec());
            }
            let creds = decode_response(initial.as_bytes()).and_then(|mut msg| {
                let c = sasl::decode_plain(&msg);
                msg.zeroize();
                c
            });
            return self.login(creds);
        }
        if mechanism == AUTH_LOGIN {
            if initial.is_empty() {
                self.state = ClientState::AuthLoginUser;
                return ClientStep::Send(PROMPT_USER.to_vec());
            }
            return match decode_response(initial.as_bytes()) {
                Ok(user) => {
                    self.state = ClientState::AuthLoginPass {
                        user: sasl::PendingUser::new(user),
                    };
                    ClientStep::Send(PROMPT_PASS.to_vec())
                }
                Err(_) => reply("501 5.5.2 Invalid base64 data"),
            };
        }
        reply("504 5.5.4 Unrecognized authentication mechanism; use PLAIN or LOGIN")
    }

    fn command(&mut self, line: &[u8]) -> ClientStep {
        let verb = verb(line);
        match verb.as_str() {
            // A device allowed by its address sends without AUTH.
            "MAIL" | "RCPT" | "DATA" if self.opts.device.is_some() => {
                return self.device_command(line);
            }
            // No mail transaction before login, whatever its syntax: the
            // proxy must never relay for an anonymous client.
            "MAIL" | "RCPT" | "DATA" => return reply("530 5.7.0 Authentication required"),
            "AUTH" if self.authenticated => return reply("503 5.5.1 Already authenticated"),
            "AUTH" if !self.login_allowed() => {
                return reply(
                    "538 5.7.11 Encryption required for requested authentication mechanism",
                );
            }
            _ => {}
        }
        let request = match Request::parse(&mut line.iter()) {
            Ok(r) => r,
            Err(smtp_proto::Error::UnknownCommand) => {
                return reply("500 5.5.1 Unknown command");
            }
            Err(smtp_proto::Error::SyntaxError { syntax }) => {
                return reply(&format!("501 5.5.2 Syntax: {syntax}"));
            }
            Err(_) => return reply("501 5.5.2 Syntax error"),
        };
        match request {
            Request::Ehlo { host } => {
                self.greet(&host);
                ClientStep::Send(self.ehlo_reply())
            }
            Request::Helo { host } => {
                self.greet(&host);
                reply(&format!("250 {}", self.hostname()))
            }
            Request::Auth {
                mechanism,
                initial_response,
            } => {
                let step = self.auth(mechanism, &initial_response);
                if let std::borrow::Cow::Owned(mut ir) = initial_response {
                    ir.zeroize();
                }
                step
            }
            Request::StartTls => self.starttls(),
            Request::Noop { .. } => reply("250 2.0.0 OK"),
            Request::Rset => {
                self.transaction = None;
                reply("250 2.0.0 OK")
            }
            Request::Quit => {
                self.state = ClientState::Closed;
                self.framer.reset();
                ClientStep::Close(b"221 2.0.0 Bye\r\n".to_vec())
            }
            Request::Vrfy { .. } => {
                reply("252 2.5.0 Cannot VRFY user; log in and send the message instead")
            }
            Request::Expn { .. } => reply("502 5.5.1 EXPN is not available"),
            Request::Help { .. } => {
                reply("214 2.0.0 mailbridge: send EHLO, then AUTH PLAIN or AUTH LOGIN")
            }
            Request::Mail { .. } | Request::Rcpt { .. } | Request::Data => {
                reply("530 5.7.0 Authentication required")
            }
            other => reply(&format!("502 5.5.1 {} is not implemented", other.name())),
        }
    }

    /// MAIL, RCPT and DATA from a device allowed by its address.
    fn device_command(&mut self, line: &[u8]) -> ClientStep {
        let Some(device) = self.opts.device.clone() else {
            return reply("530 5.7.0 Authentication required");
        };
        let request = match Request::parse(&mut line.iter()) {
            Ok(r) => r,
            Err(smtp_proto::Error::SyntaxError { syntax }) => {
                return reply(&format!("501 5.5.2 Syntax: {syntax}"));
            }
            Err(_) => return reply("501 5.5.2 Syntax error"),
        };
        match request {
            Request::Mail { from } => {
                if self.transaction.is_some() {
                    return reply("503 5.5.1 Nested MAIL command; send RSET first");
                }
                let address = from.address.trim().to_owned();
                if !device
                    .senders
                    .iter()
                    .any(|s| s.eq_ignore_ascii_case(&address))
                {
                    let shown = if address.is_empty() {
                        "<>"
                    } else {
                        address.as_str()
                    };
                    return reply(&one_line(
                        &format!(
                            "550 5.7.1 this device may not send as {shown}: by the [[device]] rule for its address it sends as {}",
                            device.senders.join(", ")
                        ),
                        "550 5.7.1 sender not allowed",
                    ));
                }
                if from.size as u64 > self.opts.max_message_size {
                    return reply(&format!(
                        "552 5.3.4 Message too big: at most {} bytes",
                        self.opts.max_message_size
                    ));
                }
                if !device.spool {
                    // Live: log in as the account, then let the server
                    // answer this MAIL and the rest.
                    self.replay = line.to_vec();
                    self.state = ClientState::LoginPending;
                    return ClientStep::Login(LoginRequest {
                        credentials: sasl::Credentials {
                            user: String::new(),
                            password: secrecy::SecretString::from(String::new()),
                        },
                        client_info: self.client_name.clone(),
                        by_address: true,
                    });
                }
                self.transaction = Some(Transaction {
                    from: address,
                    recipients: Vec::new(),
                    smtputf8: from.flags & smtp_proto::MAIL_SMTPUTF8 != 0,
                    eight_bit: from.flags & smtp_proto::MAIL_BODY_8BITMIME != 0,
                });
                reply("250 2.1.0 OK")
            }
            Request::Rcpt { to } => {
                let Some(tx) = self.transaction.as_mut() else {
                    return reply("503 5.5.1 Send MAIL first");
                };
                let address = to.address.trim().to_owned();
                if address.is_empty() {
                    return reply("501 5.1.3 An empty recipient address is not allowed");
                }
                if tx.recipients.len() >= MAX_RECIPIENTS {
                    return reply(&format!(
                        "452 4.5.3 Too many recipients: at most {MAX_RECIPIENTS} per message"
                    ));
                }
                tx.recipients.push(address);
                reply("250 2.1.5 OK")
            }
            Request::Data => match &self.transaction {
                None => reply("503 5.5.1 Send MAIL first"),
                Some(tx) if tx.recipients.is_empty() => reply("554 5.5.1 No valid recipients"),
                Some(_) => {
                    let raw = self.framer.take();
                    self.state = ClientState::Data(DataIn {
                        raw,
                        scanned: 0,
                        too_big: false,
                    });
                    reply("354 End data with <CR><LF>.<CR><LF>")
                }
            },
            _ => reply("500 5.5.1 Unknown command"),
        }
    }

    /// The content after `DATA`: the message once its lone dot arrived.
    fn data_step(&mut self) -> ClientStep {
        let ClientState::Data(data) = &mut self.state else {
            return ClientStep::NeedInput;
        };
        let end = find_data_end(&data.raw, data.scanned);
        let Some((body_end, after)) = end else {
            data.scanned = data.raw.len().saturating_sub(4);
            let limit = usize::try_from(self.opts.max_message_size)
                .unwrap_or(usize::MAX)
                .saturating_add(MAX_COMMAND_LINE);
            if data.raw.len() > limit {
                // Keep reading to the end, without keeping it.
                data.too_big = true;
                let keep = data.raw.split_off(data.raw.len() - 4);
                data.raw = keep;
                data.scanned = 0;
            }
            return ClientStep::NeedInput;
        };
        let rest = data.raw.split_off(after);
        let too_big = data.too_big;
        let mut raw = std::mem::take(&mut data.raw);
        raw.truncate(body_end);
        self.state = ClientState::Commands;
        self.framer.push(&rest);
        let tx = self.transaction.take();
        if too_big || raw.len() as u64 > self.opts.max_message_size {
            return reply(&format!(
                "552 5.3.4 Message too big: at most {} bytes",
                self.opts.max_message_size
            ));
        }
        let Some(tx) = tx else {
            return reply("503 5.5.1 Send MAIL first");
        };
        self.state = ClientState::SpoolPending;
        ClientStep::Spool(Message {
            from: tx.from,
            recipients: tx.recipients,
            data: unstuff(&raw),
            smtputf8: tx.smtputf8,
            eight_bit: tx.eight_bit,
            client_name: self.client_name.clone(),
        })
    }

    /// The client's response line in an AUTH exchange.
    fn auth_response(&mut self, line: &[u8]) -> ClientStep {
        let text = strip_eol(line).trim_ascii();
        if text == b"*" {
            self.state.clear();
            return reply("501 5.0.0 Authentication cancelled");
        }
        let mut data = match sasl::decode_base64(text) {
            Ok(d) => d,
            Err(_) => {
                self.state.clear();
                return reply("501 5.5.2 Invalid base64 data");
            }
        };
        let step = match std::mem::replace(&mut self.state, ClientState::Commands) {
            ClientState::AuthPlain => self.login(sasl::decode_plain(&data)),
            ClientState::AuthLoginUser => {
                self.state = ClientState::AuthLoginPass {
                    user: sasl::PendingUser::new(std::mem::take(&mut data)),
                };
                ClientStep::Send(PROMPT_PASS.to_vec())
            }
            ClientState::AuthLoginPass { user } => {
                let creds = user.with_password(&data);
                self.login(creds)
            }
            other => {
                self.state = other;
                ClientStep::NeedInput
            }
        };
        data.zeroize();
        step
    }

    /// The reply for a refused login: the upstream's own SMTP code and
    /// text when it refused, then our reason.
    fn failure_reply(failure: &LoginFailure) -> Vec<u8> {
        let reason = one_line(&failure.reason, "Login failed");
        let upstream = match &failure.upstream_reply {
            Some(Refusal {
                code: RefusalCode::Smtp { code, enhanced },
                text,
                ..
            }) if (400..600).contains(code) => Some((*code, *enhanced, text)),
            _ => None,
        };
        if let Some((code, enhanced, text)) = upstream {
            let esc = enhanced.map_or_else(|| default_esc(code).to_owned(), |e| e.to_string());
            let text = one_line(text, "");
            return if text.is_empty() {
                format!("{code} {esc} mailbridge: {reason}\r\n")
            } else {
                format!("{code}-{esc} {text}\r\n{code} {esc} mailbridge: {reason}\r\n")
            }
            .into_bytes();
        }
        match failure.kind {
            FailureKind::BadCredentials | FailureKind::Rejected => {
                format!("535 5.7.8 {reason}\r\n")
            }
            FailureKind::Throttled | FailureKind::Unavailable => {
                format!("454 4.7.0 {reason}\r\n")
            }
        }
        .into_bytes()
    }
}

/// A SASL response as the client sent it: strict base64, `=` for empty.
fn decode_response(data: &[u8]) -> Result<Vec<u8>, SaslError> {
    if data == b"=" {
        return Ok(Vec::new());
    }
    sasl::decode_base64(data)
}

/// An enhanced status code for a reply that came without one (we advertise
/// ENHANCEDSTATUSCODES, so every reply of ours carries one).
fn default_esc(code: u16) -> &'static str {
    match code {
        535 => "5.7.8",
        500..=599 => "5.7.0",
        _ => "4.7.0",
    }
}

/// Where a message's content ends: the index of the CRLF before the lone
/// dot (the content keeps it) and the index after the dot line; searched
/// from `from` on. An empty message is just `.` CRLF.
fn find_data_end(raw: &[u8], from: usize) -> Option<(usize, usize)> {
    if raw.starts_with(b".\r\n") {
        return Some((0, 3));
    }
    let start = from.min(raw.len());
    raw[start..]
        .windows(5)
        .position(|w| w == b"\r\n.\r\n")
        .map(|i| (start + i + 2, start + i + 5))
}

/// Removes the dot SMTP adds before each line that starts with one.
fn unstuff(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len());
    let mut at_line_start = true;
    for (i, &b) in raw.iter().enumerate() {
        if at_line_start && b == b'.' {
            at_line_start = false;
            continue;
        }
        at_line_start = b == b'\n' && i > 0 && raw[i - 1] == b'\r';
        out.push(b);
    }
    out
}

/// Adds the dot SMTP needs before each line that starts with one, and the
/// CRLF the end marker needs before it.
pub fn dot_stuff(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + data.len() / 64 + 8);
    let mut at_line_start = true;
    for (i, &b) in data.iter().enumerate() {
        if at_line_start && b == b'.' {
            out.push(b'.');
        }
        at_line_start = b == b'\n' && i > 0 && data[i - 1] == b'\r';
        out.push(b);
    }
    if !data.is_empty() && !data.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Reads a refusal the way the upstream login does, from a server reply
/// of one or more lines (`535 5.7.8 Username and Password not accepted`);
/// None unless it is a complete 4xx or 5xx reply.
pub fn parse_refusal(reply: &str) -> Option<Refusal> {
    let mut reader = ReplyReader::default();
    let mut last = None;
    for line in reply.lines() {
        last = reader.line(format!("{line}\r\n").as_bytes()).ok()?;
    }
    last.filter(|r| (400..600).contains(&r.code))
        .map(|r| r.refusal())
}

impl ClientSession for SmtpClientSession {
    fn greeting(&mut self) -> Vec<u8> {
        format!("220 {} ESMTP mailbridge ready\r\n", self.hostname()).into_bytes()
    }

    fn feed(&mut self, data: &[u8]) {
        match &mut self.state {
            // Bytes before the handshake are plaintext; after QUIT, noise.
            ClientState::TlsPending | ClientState::Closed => {}
            ClientState::Data(d) => d.raw.extend_from_slice(data),
            _ => self.framer.push(data),
        }
    }

    fn next_step(&mut self) -> ClientStep {
        if matches!(self.state, ClientState::Data(_)) {
            return self.data_step();
        }
        let in_auth = match self.state {
            ClientState::Commands => false,
            ClientState::AuthPlain
            | ClientState::AuthLoginUser
            | ClientState::AuthLoginPass { .. } => true,
            _ => return ClientStep::NeedInput,
        };
        match self.framer.next() {
            // POP3 and SMTP have no literals: a lines framer reports none.
            Frame::NeedMore | Frame::Literal(_) => ClientStep::NeedInput,
            Frame::LineTooLong => {
                // An AUTH exchange ends with it.
                self.state.clear();
                reply("500 5.5.2 Line too long")
            }
            Frame::Message(mut line) => {
                let step = if in_auth {
                    self.auth_response(&line)
                } else {
                    self.command(&line)
                };
                line.zeroize();
                step
            }
        }
    }

    fn tls_started(&mut self) {
        self.in_tls = true;
        self.framer.reset();
        if matches!(self.state, ClientState::TlsPending) {
            self.state = ClientState::Commands;
        }
    }

    fn login_succeeded(&mut self, _upstream: &UpstreamSuccess) -> Vec<u8> {
        if !matches!(self.state, ClientState::LoginPending) {
            return Vec::new();
        }
        self.state = ClientState::LoggedIn;
        if !self.replay.is_empty() {
            // A device's MAIL: the server answers it.
            return Vec::new();
        }
        b"235 2.7.0 Authentication successful\r\n".to_vec()
    }

    fn login_failed(&mut self, failure: &LoginFailure) -> Vec<u8> {
        if !matches!(self.state, ClientState::LoginPending) {
            return Vec::new();
        }
        self.state = ClientState::Commands;
        if !std::mem::take(&mut self.replay).is_empty() {
            // The answer to the device's MAIL.
            let reason = one_line(&failure.reason, "cannot send just now");
            return match failure.kind {
                FailureKind::Throttled | FailureKind::Unavailable => {
                    format!("451 4.4.0 {reason}\r\n")
                }
                FailureKind::BadCredentials | FailureKind::Rejected => {
                    format!("554 5.7.0 {reason}\r\n")
                }
            }
            .into_bytes();
        }
        Self::failure_reply(failure)
    }

    fn take_pending(&mut self) -> Vec<u8> {
        let mut out = std::mem::take(&mut self.replay);
        out.extend_from_slice(&self.framer.take());
        out
    }

    fn preauth(&self) -> bool {
        self.opts.device.is_none()
    }

    fn login_local(&mut self, senders: Vec<String>) -> Vec<u8> {
        if !matches!(self.state, ClientState::LoginPending) {
            return Vec::new();
        }
        // From now on the session takes messages itself, as a device's.
        self.state = ClientState::Commands;
        self.authenticated = true;
        self.opts.device = Some(DeviceOptions {
            senders,
            spool: true,
        });
        b"235 2.7.0 Authentication successful\r\n".to_vec()
    }

    fn spooled(&mut self, outcome: &SpoolOutcome) -> Vec<u8> {
        if !matches!(self.state, ClientState::SpoolPending) {
            return Vec::new();
        }
        self.state = ClientState::Commands;
        match outcome {
            SpoolOutcome::Queued { id } => format!("250 2.0.0 OK: queued as {id}\r\n"),
            SpoolOutcome::Failed {
                temporary: true,
                reason,
            } => format!(
                "452 4.3.1 {}\r\n",
                one_line(reason, "Insufficient system storage")
            ),
            SpoolOutcome::Failed { reason, .. } => {
                format!("554 5.3.0 {}\r\n", one_line(reason, "Message not stored"))
            }
        }
        .into_bytes()
    }

    fn timeout_message(&self) -> Vec<u8> {
        format!(
            "421 4.4.2 {} Idle too long, closing connection\r\n",
            self.hostname()
        )
        .into_bytes()
    }

    fn shutdown_message(&self) -> Vec<u8> {
        format!(
            "421 4.3.2 {} mailbridge is shutting down; try again shortly\r\n",
            self.hostname()
        )
        .into_bytes()
    }

    fn goodbye(&self, reason: &str) -> Vec<u8> {
        format!(
            "421 4.7.0 {} {}\r\n",
            self.hostname(),
            text::one_line(reason, "Closing connection")
        )
        .into_bytes()
    }
}

// ---------------------------------------------------------------------------
// Upstream side
// ---------------------------------------------------------------------------

/// Options of the upstream login dialogue.
#[derive(Debug, Clone)]
pub struct UpstreamOptions {
    /// Do STARTTLS after the first EHLO (false for implicit TLS).
    pub starttls: bool,
    /// Mechanisms in order of preference; the first one the server
    /// advertises is used.
    pub preference: Vec<Mechanism>,
    /// The name to send in EHLO (the configured name, or the client's own
    /// EHLO name); `localhost` when None or not a usable host name.
    pub ehlo_name: Option<String>,
    /// Longest server line accepted, CRLF included (default 4 KiB).
    pub max_line: usize,
}

impl Default for UpstreamOptions {
    fn default() -> Self {
        UpstreamOptions {
            starttls: false,
            preference: vec![Mechanism::Xoauth2, Mechanism::Oauthbearer],
            ehlo_name: None,
            max_line: DEFAULT_MAX_LINE,
        }
    }
}

/// One complete server reply.
#[derive(Debug, Clone)]
struct Reply {
    code: u16,
    /// Enhanced status code, `[0, 0, 0]` when there was none.
    esc: [u8; 3],
    /// The text, lines joined by `\n`, codes removed (smtp-proto's reading).
    message: String,
    /// The raw lines, without line endings.
    lines: Vec<String>,
}

impl Reply {
    /// The enhanced status code, when the reply had one of its own class.
    fn enhanced(&self) -> Option<EnhancedCode> {
        let [class, subject, detail] = self.esc;
        (class != 0 && u16::from(class) == self.code / 100)
            .then(|| EnhancedCode::new(class, subject.into(), detail.into()))
    }

    /// The text of all lines as one line, whitespace collapsed.
    fn text(&self) -> String {
        self.message
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// `535 5.7.8 Username and Password not accepted`: code, enhanced
    /// code and the text of every line, on one line.
    fn summary(&self) -> String {
        let mut out = self.code.to_string();
        if let Some(esc) = self.enhanced() {
            out.push(' ');
            out.push_str(&esc.to_string());
        }
        let text = self.text();
        if !text.is_empty() {
            out.push(' ');
            out.push_str(&text);
        }
        one_line(&out, "(no text)")
    }

    /// The reply as a refusal.
    fn refusal(&self) -> Refusal {
        Refusal::smtp(self.code, self.enhanced(), &self.summary())
    }

    /// EHLO keywords with their parameters, one per line after the first.
    fn keywords(&self) -> Vec<String> {
        self.lines
            .iter()
            .skip(1)
            .filter_map(|l| l.get(4..))
            .map(|k| k.trim().to_owned())
            .filter(|k| !k.is_empty())
            .collect()
    }

    /// The text after `334 ` of a one-line reply.
    fn first_text(&self) -> &str {
        self.lines
            .first()
            .and_then(|l| l.get(4..))
            .unwrap_or("")
            .trim()
    }
}

/// What a [`Submission`] wants next.
#[derive(Debug)]
pub enum SubmitStep {
    /// Write these bytes to the server.
    Send(Vec<u8>),
    /// Read from the server and `feed` it.
    NeedInput,
    /// The transaction is over.
    Done(SubmitOutcome),
}

/// How a [`Submission`] ended.
#[derive(Debug, Clone, Default)]
pub struct SubmitOutcome {
    /// Recipients the server took the message for.
    pub delivered: Vec<String>,
    /// Recipients it refused, with its refusal (temporary or not).
    pub refused: Vec<(String, Refusal)>,
}

enum SubmitState {
    Mail,
    Rcpt(usize),
    Data,
    Content,
    Done,
}

/// Sends one stored message on a logged-in SMTP connection, one command
/// at a time: `MAIL FROM`, `RCPT TO` per recipient, `DATA`, the content
/// dot-stuffed, the final dot. A refusal of `MAIL`, `DATA` or the content
/// applies to every recipient not yet refused; a refusal of one `RCPT` to
/// that recipient only.
pub struct Submission {
    framer: Framer,
    reader: ReplyReader,
    state: SubmitState,
    from: String,
    recipients: Vec<String>,
    params: String,
    content: Vec<u8>,
    accepted: Vec<String>,
    outcome: SubmitOutcome,
    first: bool,
}

impl fmt::Debug for Submission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Submission")
            .field("from", &self.from)
            .field("recipients", &self.recipients)
            .field("size", &self.content.len())
            .finish_non_exhaustive()
    }
}

impl Submission {
    /// A transaction for `message` (its `data` unstuffed, as spooled).
    pub fn new(message: &Message) -> Submission {
        let mut params = String::new();
        if message.eight_bit {
            params.push_str(" BODY=8BITMIME");
        }
        if message.smtputf8 {
            params.push_str(" SMTPUTF8");
        }
        let mut content = dot_stuff(&message.data);
        content.extend_from_slice(b".\r\n");
        Submission {
            framer: Framer::lines(DEFAULT_MAX_LINE),
            reader: ReplyReader::default(),
            state: SubmitState::Mail,
            from: message.from.clone(),
            recipients: message.recipients.clone(),
            params,
            content,
            accepted: Vec::new(),
            outcome: SubmitOutcome::default(),
            first: true,
        }
    }

    /// Bytes from the server.
    pub fn feed(&mut self, data: &[u8]) {
        self.framer.push(data);
    }

    /// Everyone not yet refused is refused with `refusal`.
    fn refuse_rest(&mut self, refusal: Refusal) -> SubmitStep {
        let mut rest: Vec<String> = std::mem::take(&mut self.accepted);
        if let SubmitState::Rcpt(i) = self.state {
            rest.extend(self.recipients[i..].iter().cloned());
        } else if matches!(self.state, SubmitState::Mail) {
            rest = self.recipients.clone();
        }
        for r in rest {
            self.outcome.refused.push((r, refusal.clone()));
        }
        self.state = SubmitState::Done;
        SubmitStep::Done(std::mem::take(&mut self.outcome))
    }

    /// What to do next.
    pub fn next_step(&mut self) -> Result<SubmitStep, UpstreamError> {
        if self.first {
            self.first = false;
            return Ok(SubmitStep::Send(
                format!("MAIL FROM:<{}>{}\r\n", self.from, self.params).into_bytes(),
            ));
        }
        if matches!(self.state, SubmitState::Done) {
            return Ok(SubmitStep::Done(self.outcome.clone()));
        }
        let reply = loop {
            match self.framer.next() {
                Frame::NeedMore | Frame::Literal(_) => return Ok(SubmitStep::NeedInput),
                Frame::LineTooLong => {
                    return Err(UpstreamError::Unexpected(
                        "the server sent a reply line that is too long".into(),
                    ));
                }
                Frame::Message(line) => {
                    if let Some(reply) = self.reader.line(&line)? {
                        break reply;
                    }
                }
            }
        };
        let ok = (200..300).contains(&reply.code);
        match self.state {
            SubmitState::Mail => {
                if !ok {
                    return Ok(self.refuse_rest(reply.refusal()));
                }
                self.state = SubmitState::Rcpt(0);
                Ok(self.next_rcpt())
            }
            SubmitState::Rcpt(i) => {
                let rcpt = self.recipients[i].clone();
                if ok {
                    self.accepted.push(rcpt);
                } else {
                    self.outcome.refused.push((rcpt, reply.refusal()));
                }
                self.state = SubmitState::Rcpt(i + 1);
                Ok(self.next_rcpt())
            }
            SubmitState::Data => {
                if reply.code != 354 {
                    return Ok(self.refuse_rest(reply.refusal()));
                }
                self.state = SubmitState::Content;
                Ok(SubmitStep::Send(std::mem::take(&mut self.content)))
            }
            SubmitState::Content => {
                if !ok {
                    return Ok(self.refuse_rest(reply.refusal()));
                }
                self.outcome.delivered = std::mem::take(&mut self.accepted);
                self.state = SubmitState::Done;
                Ok(SubmitStep::Done(std::mem::take(&mut self.outcome)))
            }
            SubmitState::Done => Ok(SubmitStep::Done(self.outcome.clone())),
        }
    }

    fn next_rcpt(&mut self) -> SubmitStep {
        let SubmitState::Rcpt(i) = self.state else {
            return SubmitStep::NeedInput;
        };
        if let Some(r) = self.recipients.get(i) {
            return SubmitStep::Send(format!("RCPT TO:<{r}>\r\n").into_bytes());
        }
        if self.accepted.is_empty() {
            // Nobody left: end the transaction politely.
            self.state = SubmitState::Done;
            return SubmitStep::Send(b"RSET\r\n".to_vec());
        }
        self.state = SubmitState::Data;
        SubmitStep::Send(b"DATA\r\n".to_vec())
    }
}

/// Collects the lines of one reply and reads it with smtp-proto.
#[derive(Default)]
struct ReplyReader {
    receiver: ResponseReceiver,
    lines: Vec<String>,
    code: Option<u16>,
}

impl ReplyReader {
    fn reset(&mut self) {
        self.receiver.reset();
        self.lines.clear();
        self.code = None;
    }

    /// One line of a reply; the reply once its last line is in.
    fn line(&mut self, line: &[u8]) -> Result<Option<Reply>, UpstreamError> {
        let text = strip_eol(line);
        let digits = text.get(..3).unwrap_or(text);
        let valid = digits.len() == 3
            && digits.iter().all(u8::is_ascii_digit)
            && matches!(text.get(3), None | Some(b' ' | b'-'));
        if !valid {
            return Err(unexpected("not an SMTP reply", line));
        }
        let code = digits
            .iter()
            .fold(0u16, |n, d| n * 10 + u16::from(d - b'0'));
        if self.code.is_some_and(|c| c != code) {
            return Err(unexpected("a reply line with another code", line));
        }
        self.code = Some(code);
        if self.lines.len() >= MAX_REPLY_LINES {
            return Err(unexpected("a reply with too many lines", line));
        }
        self.lines.push(String::from_utf8_lossy(text).into_owned());
        match self.receiver.parse(&mut line.iter()) {
            Ok(resp) => {
                let reply = Reply {
                    code: resp.code,
                    esc: resp.esc,
                    message: resp.message,
                    lines: std::mem::take(&mut self.lines),
                };
                self.reset();
                Ok(Some(reply))
            }
            Err(smtp_proto::Error::NeedsMoreData { .. }) => Ok(None),
            Err(e) => Err(UpstreamError::Unexpected(format!(
                "the server sent a reply that does not parse ({e})"
            ))),
        }
    }
}

fn unexpected(what: &str, line: &[u8]) -> UpstreamError {
    crate::unexpected_within(what, line, MAX_TEXT)
}

fn refused(what: &str, reply: &Reply) -> UpstreamError {
    UpstreamError::Unexpected(format!("{what}: {}", reply.summary()))
}

enum UpState {
    /// Waiting for the 220 greeting.
    Greeting,
    /// Sent EHLO.
    Ehlo,
    /// Sent STARTTLS.
    StartTls,
    /// Emitted `StartTls`; waiting for `tls_started`.
    TlsHandshake,
    /// The bearer login (waiting for a token, AUTH sent, or rejected).
    Login,
    /// Emitted `Authenticated`.
    Done,
    /// Returned an error.
    Failed,
}

impl UpState {
    fn name(&self) -> &'static str {
        match self {
            UpState::Greeting => "greeting",
            UpState::Ehlo => "ehlo",
            UpState::StartTls => "starttls",
            UpState::TlsHandshake => "tls-handshake",
            UpState::Login => "login",
            UpState::Done => "done",
            UpState::Failed => "failed",
        }
    }
}

/// mailbridge's login to the real SMTP server: greeting, EHLO, optional
/// STARTTLS and EHLO again, then AUTH XOAUTH2 or OAUTHBEARER
/// (`crate::bearer`) with the initial response on the AUTH line when the
/// line stays within 512 octets (RFC 4954); a server that answers that
/// with 500/501/504 gets the two-step form (`AUTH MECH`, `334`, response)
/// on the same connection. A failure challenge (`334 <base64 JSON>`) is
/// answered (empty line for XOAUTH2, `AQ==` for OAUTHBEARER) before the
/// final refusal is reported.
pub struct SmtpUpstreamLogin {
    opts: UpstreamOptions,
    framer: Framer,
    reader: ReplyReader,
    state: UpState,
    /// Steps decided but not yet handed out (may hold the token: never
    /// printed).
    queue: VecDeque<UpstreamStep>,
    /// The current EHLO keywords.
    keywords: Vec<String>,
    tls_done: bool,
    /// The bearer login: mechanism, token, form, challenge, retry.
    bearer: Bearer,
    /// The greeting was accepted.
    greeted: bool,
    /// The `AUTH` mechanisms of the EHLO the login chose from.
    offered: Option<Vec<String>>,
}

impl fmt::Debug for SmtpUpstreamLogin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match self.state {
            UpState::Login => self.bearer.state_name(),
            _ => self.state.name(),
        };
        f.debug_struct("SmtpUpstreamLogin")
            .field("state", &state)
            .field("keywords", &self.keywords)
            .field("bearer", &self.bearer)
            .field("queued_steps", &self.queue.len())
            .finish()
    }
}

impl SmtpUpstreamLogin {
    /// A new login dialogue; feed it the server's bytes from the start.
    pub fn new(opts: UpstreamOptions) -> Self {
        SmtpUpstreamLogin {
            framer: Framer::lines(opts.max_line.max(3)),
            bearer: Bearer::new(opts.preference.clone()),
            opts,
            reader: ReplyReader::default(),
            state: UpState::Greeting,
            queue: VecDeque::new(),
            keywords: Vec::new(),
            tls_done: false,
            greeted: false,
            offered: None,
        }
    }

    fn send(&mut self, line: String) {
        self.queue.push_back(UpstreamStep::Send(line.into_bytes()));
    }

    fn ehlo(&mut self) {
        let name = self
            .opts
            .ehlo_name
            .as_deref()
            .and_then(host_name)
            .unwrap_or_else(|| "localhost".to_owned());
        self.send(format!("EHLO {name}\r\n"));
        self.state = UpState::Ehlo;
    }

    fn has_keyword(&self, name: &str) -> bool {
        self.keywords.iter().any(|k| {
            k.split_whitespace()
                .next()
                .is_some_and(|w| w.eq_ignore_ascii_case(name))
        })
    }

    /// The mechanisms of the `AUTH` keyword (or the old `AUTH=` form).
    fn offered(keywords: &[String]) -> Vec<&str> {
        keywords
            .iter()
            .filter_map(|k| {
                let head = k.get(..5)?;
                (head.eq_ignore_ascii_case("AUTH ") || head.eq_ignore_ascii_case("AUTH="))
                    .then(|| &k[5..])
            })
            .flat_map(str::split_whitespace)
            .collect()
    }

    /// With the EHLO keywords known: STARTTLS, or on to the token.
    fn proceed(&mut self) -> Result<(), UpstreamError> {
        if self.opts.starttls && !self.tls_done {
            if !self.has_keyword("STARTTLS") {
                return Err(UpstreamError::NoStartTls);
            }
            self.send("STARTTLS\r\n".to_owned());
            self.state = UpState::StartTls;
            return Ok(());
        }
        let offered = Self::offered(&self.keywords);
        self.offered = Some(offered.iter().map(|m| m.to_string()).collect());
        let Some(step) = self.bearer.choose(Offer::Listed(&offered)) else {
            return Err(UpstreamError::NoMechanism {
                allowed: self.bearer.allowed(),
                offered: if offered.is_empty() {
                    "no AUTH mechanisms".to_owned()
                } else {
                    format!("AUTH {}", offered.join(" "))
                },
            });
        };
        self.state = UpState::Login;
        self.queue.push_back(step);
        Ok(())
    }

    fn handle(&mut self, reply: Reply) -> Result<(), UpstreamError> {
        match &mut self.state {
            UpState::Greeting => match reply.code {
                220 => {
                    self.greeted = true;
                    self.ehlo();
                    Ok(())
                }
                _ => Err(refused("the server refused the connection", &reply)),
            },
            UpState::Ehlo => match reply.code {
                250 => {
                    self.keywords = reply.keywords();
                    self.proceed()
                }
                _ => Err(refused("the server refused EHLO", &reply)),
            },
            UpState::StartTls => match reply.code {
                220 => {
                    // Bytes after the 220 arrived in plaintext: never trust
                    // them.
                    self.framer.reset();
                    self.reader.reset();
                    self.state = UpState::TlsHandshake;
                    self.queue.push_back(UpstreamStep::StartTls);
                    Ok(())
                }
                _ => Err(refused("the server refused STARTTLS", &reply)),
            },
            UpState::Login if !self.bearer.awaits_server() => Ok(()),
            UpState::Login => match reply.code {
                235 => {
                    self.bearer.succeeded();
                    self.state = UpState::Done;
                    let leftover = self.framer.take();
                    self.queue
                        .push_back(UpstreamStep::Authenticated(UpstreamSuccess {
                            capabilities: self.keywords.clone(),
                            leftover,
                        }));
                    Ok(())
                }
                334 => {
                    let step = self
                        .bearer
                        .continuation(reply.first_text().as_bytes())
                        .map_err(|what| refused(what, &reply))?;
                    self.queue.push_back(step);
                    Ok(())
                }
                // The initial response may not have been welcome: some
                // servers want the two-step form. (5.5.127 is Microsoft
                // refusing the token itself, not the form.)
                500 | 501 | 504 if reply.esc != [5, 5, 127] => {
                    let step = self.bearer.form_refused(reply.refusal());
                    self.queue.push_back(step);
                    Ok(())
                }
                400..=599 => {
                    let step = self.bearer.refused(reply.refusal());
                    self.queue.push_back(step);
                    Ok(())
                }
                _ => Err(refused("unexpected reply to AUTH", &reply)),
            },
            UpState::TlsHandshake | UpState::Done | UpState::Failed => Ok(()),
        }
    }
}

impl UpstreamLogin for SmtpUpstreamLogin {
    fn feed(&mut self, data: &[u8]) {
        match self.state {
            // Plaintext bytes before the handshake must not be trusted.
            UpState::TlsHandshake => {}
            _ => self.framer.push(data),
        }
    }

    fn next_step(&mut self) -> Result<UpstreamStep, UpstreamError> {
        loop {
            if let Some(step) = self.queue.pop_front() {
                return Ok(step);
            }
            match self.state {
                UpState::Failed => {
                    return Err(UpstreamError::Unexpected(
                        "the login dialogue already failed".to_owned(),
                    ));
                }
                UpState::TlsHandshake | UpState::Done => {
                    return Ok(UpstreamStep::NeedInput);
                }
                // Waiting for a token, or rejected: nothing to read now.
                UpState::Login if !self.bearer.awaits_server() => {
                    return Ok(UpstreamStep::NeedInput);
                }
                _ => {}
            }
            let result = match self.framer.next() {
                Frame::NeedMore | Frame::Literal(_) => return Ok(UpstreamStep::NeedInput),
                Frame::LineTooLong => Err(UpstreamError::LineTooLong(self.framer.max_line())),
                Frame::Message(line) => match self.reader.line(&line) {
                    Ok(Some(reply)) => self.handle(reply),
                    Ok(None) => Ok(()),
                    Err(e) => Err(e),
                },
            };
            if let Err(e) = result {
                self.state = UpState::Failed;
                self.queue.clear();
                return Err(e);
            }
        }
    }

    fn tls_started(&mut self) {
        if matches!(self.state, UpState::TlsHandshake) {
            self.tls_done = true;
            self.keywords.clear();
            self.framer.reset();
            self.reader.reset();
            self.ehlo();
        }
    }

    fn provide_token(&mut self, token: &BearerToken) {
        if !matches!(self.state, UpState::Login) {
            return;
        }
        let step = self.bearer.provide_token(
            token,
            InitialResponse::WithinLine(MAX_COMMAND_LINE),
            |mech, response| match response {
                Some(r) => format!("AUTH {} {r}\r\n", mech.name()),
                None => format!("AUTH {}\r\n", mech.name()),
            },
        );
        self.queue.extend(step);
    }

    fn retry(&mut self) {
        if matches!(self.state, UpState::Login) {
            self.queue.extend(self.bearer.retry());
        }
    }

    fn farewell(&self) -> crate::farewell::Reader {
        crate::farewell::smtp
    }

    fn advertised(&self) -> Advertised {
        Advertised {
            greeted: self.greeted,
            starttls: self.tls_done || self.has_keyword("STARTTLS"),
            tls_started: self.tls_done,
            mechanisms: self.offered.clone(),
            chosen: self.bearer.mechanism(),
        }
    }

    fn logout(&self) -> &'static [u8] {
        QUIT
    }
}

/// Ends an SMTP session in any state (RFC 5321 section 4.1.1.10).
pub const QUIT: &[u8] = b"QUIT\r\n";

#[cfg(test)]
mod tests {
    use secrecy::{ExposeSecret, SecretString};

    use super::*;

    // ----- client side -----

    use crate::testkit::{Ev, b64, drive, login, out, pump, run_both_ways, s};

    fn open() -> ClientOptions {
        ClientOptions {
            plaintext_login_allowed: true,
            hostname: "mb.example".into(),
            ..ClientOptions::default()
        }
    }

    fn run(opts: ClientOptions, input: &[u8]) -> (SmtpClientSession, Vec<Ev>) {
        run_both_ways(|| SmtpClientSession::new(opts.clone()), input)
    }

    const EHLO_OPEN: &str = "250-mb.example\r\n250-PIPELINING\r\n250-8BITMIME\r\n\
        250-ENHANCEDSTATUSCODES\r\n250-SIZE 52428800\r\n250 AUTH PLAIN LOGIN\r\n";

    /// Postfix's EHLO keywords after STARTTLS, as the upstream login
    /// reports them (the interop suite's Postfix says the same).
    fn postfix_keywords() -> Vec<String> {
        [
            "PIPELINING",
            "SIZE 10240000",
            "ETRN",
            "AUTH PLAIN XOAUTH2 OAUTHBEARER",
            "ENHANCEDSTATUSCODES",
            "8BITMIME",
            "DSN",
            "SMTPUTF8",
            "CHUNKING",
        ]
        .map(str::to_owned)
        .to_vec()
    }

    #[test]
    fn extensions_from_ehlo() {
        let ext = Extensions::from_ehlo(&postfix_keywords());
        assert_eq!(
            ext,
            Extensions {
                size: Some(10_240_000),
                pipelining: true,
                eight_bit_mime: true,
                smtputf8: true,
                dsn: true,
                enhanced_status_codes: true,
            }
        );
        assert_eq!(ext.message_size_limit(), 10_240_000);
        // Lower case, no limit (`SIZE`, `SIZE 0`, junk), nothing known.
        let ext = Extensions::from_ehlo(&["size".into(), "smtputf8".into(), "X-FOO".into()]);
        assert_eq!(
            (ext.size, ext.smtputf8, ext.pipelining, ext.dsn),
            (None, true, false, false)
        );
        assert_eq!(ext.message_size_limit(), 52_428_800);
        for size in ["SIZE 0", "SIZE lots", "SIZE -1", ""] {
            assert_eq!(Extensions::from_ehlo(&[size.into()]).size, None, "{size}");
        }
        assert_eq!(
            Extensions::from_ehlo(&["SIZE 35882577".into()]).size,
            Some(35_882_577)
        );
    }

    #[test]
    fn extensions_in_common() {
        let postfix = Extensions::from_ehlo(&postfix_keywords());
        let gmail = Extensions::from_ehlo(
            &[
                "SIZE 35882577",
                "8BITMIME",
                "AUTH LOGIN PLAIN XOAUTH2 PLAIN-CLIENTTOKEN OAUTHBEARER XOAUTH",
                "ENHANCEDSTATUSCODES",
                "PIPELINING",
                "CHUNKING",
                "SMTPUTF8",
            ]
            .map(str::to_owned),
        );
        let both = postfix.common(gmail);
        assert_eq!(
            both,
            Extensions {
                size: Some(10_240_000),
                pipelining: true,
                eight_bit_mime: true,
                smtputf8: true,
                dsn: false,
                enhanced_status_codes: true,
            }
        );
        assert_eq!(both, gmail.common(postfix));
        // With the default (a server not yet seen): today's list only.
        assert_eq!(
            postfix.common(Extensions::default()),
            Extensions {
                size: Some(10_240_000),
                ..Extensions::default()
            }
        );
        // No limit is larger than any limit.
        let unlimited = Extensions {
            size: None,
            ..postfix
        };
        assert_eq!(unlimited.common(postfix).size, Some(10_240_000));
        assert_eq!(unlimited.common(unlimited).size, None);
    }

    #[test]
    fn ehlo_repeats_learned_extensions() {
        let ext = Extensions::from_ehlo(&postfix_keywords());
        let opts = ClientOptions {
            extensions: ext,
            max_message_size: ext.message_size_limit(),
            ..open()
        };
        let (_, evs) = run(opts.clone(), b"EHLO printer.lan\r\n");
        // Never CHUNKING (see `Extensions`), never the server's own AUTH.
        assert_eq!(
            evs,
            [out("250-mb.example\r\n250-PIPELINING\r\n250-8BITMIME\r\n\
                  250-ENHANCEDSTATUSCODES\r\n250-SIZE 10240000\r\n250-SMTPUTF8\r\n\
                  250-DSN\r\n250 AUTH PLAIN LOGIN\r\n")]
        );
        // A server that offers little: only what it offers, and SIZE.
        let bare = Extensions::from_ehlo(&["AUTH XOAUTH2".into()]);
        let (_, evs) = run(
            ClientOptions {
                extensions: bare,
                max_message_size: bare.message_size_limit(),
                starttls_offered: true,
                ..ClientOptions::default()
            },
            b"EHLO x\r\n",
        );
        assert_eq!(
            evs,
            [out(
                "250-localhost\r\n250-SIZE 52428800\r\n250 STARTTLS\r\n"
            )]
        );
        // The advertised limit is the one enforced on a device's MAIL.
        let device = ClientOptions {
            device: Some(DeviceOptions {
                senders: vec!["scanner@example.com".into()],
                spool: true,
            }),
            ..opts
        };
        let (_, evs) = run(
            device,
            b"EHLO x\r\nMAIL FROM:<scanner@example.com> SIZE=10240001\r\n",
        );
        let Some(Ev::Out(replies)) = evs.first() else {
            panic!("{evs:?}");
        };
        assert!(
            replies.ends_with("552 5.3.4 Message too big: at most 10240000 bytes\r\n"),
            "{replies}"
        );
    }

    #[test]
    fn greeting_and_ehlo() {
        let mut sess = SmtpClientSession::new(open());
        assert_eq!(
            s(&sess.greeting()),
            "220 mb.example ESMTP mailbridge ready\r\n"
        );
        let (_, evs) = run(open(), b"EHLO printer.lan\r\n");
        assert_eq!(evs, [out(EHLO_OPEN)]);
        // STARTTLS offered, plaintext: no AUTH advertised.
        let (_, evs) = run(
            ClientOptions {
                starttls_offered: true,
                max_message_size: 1000,
                ..ClientOptions::default()
            },
            b"ehlo x\r\n",
        );
        assert_eq!(
            evs,
            [out(
                "250-localhost\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-ENHANCEDSTATUSCODES\r\n\
                 250-SIZE 1000\r\n250 STARTTLS\r\n"
            )]
        );
        // Implicit TLS: AUTH, no STARTTLS.
        let (_, evs) = run(
            ClientOptions {
                starttls_offered: true,
                tls_active: true,
                ..ClientOptions::default()
            },
            b"EHLO x\r\n",
        );
        assert_eq!(
            evs,
            [out(
                "250-localhost\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-ENHANCEDSTATUSCODES\r\n\
                 250-SIZE 52428800\r\n250 AUTH PLAIN LOGIN\r\n"
            )]
        );
    }

    #[test]
    fn auth_plain_with_initial_response() {
        let input = format!(
            "EHLO client.example\r\nAUTH PLAIN {}\r\n",
            b64(b"\0alice\0s3cret")
        );
        let (mut sess, evs) = run(open(), input.as_bytes());
        assert_eq!(
            evs,
            [
                out(EHLO_OPEN),
                login("alice", "s3cret", Some("client.example"))
            ]
        );
        assert!(matches!(sess.next_step(), ClientStep::NeedInput));
        assert_eq!(
            s(&sess.login_succeeded(&UpstreamSuccess::default())),
            "235 2.7.0 Authentication successful\r\n"
        );
        assert!(matches!(sess.next_step(), ClientStep::NeedInput));
    }

    #[test]
    fn auth_plain_with_empty_challenge() {
        let input = format!(
            "HELO old-printer\r\nauth plain\r\n{}\r\n",
            b64(b"bob\0bob\0pw")
        );
        let (_, evs) = run(open(), input.as_bytes());
        assert_eq!(
            evs,
            [
                out("250 mb.example\r\n334 \r\n"),
                login("bob", "pw", Some("old-printer"))
            ]
        );
    }

    #[test]
    fn auth_login_forms() {
        let input = format!(
            "EHLO c\r\nAUTH LOGIN\r\n{}\r\n{}\r\n",
            b64(b"alice@example.com"),
            b64(b"pa ss")
        );
        let (_, evs) = run(open(), input.as_bytes());
        assert_eq!(
            evs,
            [
                out(&format!(
                    "{EHLO_OPEN}334 VXNlcm5hbWU6\r\n334 UGFzc3dvcmQ6\r\n"
                )),
                login("alice@example.com", "pa ss", Some("c"))
            ]
        );
        let input = format!(
            "EHLO c\r\nAUTH LOGIN {}\r\n{}\r\n",
            b64(b"alice"),
            b64(b"pw")
        );
        let (_, evs) = run(open(), input.as_bytes());
        assert_eq!(
            evs,
            [
                out(&format!("{EHLO_OPEN}334 UGFzc3dvcmQ6\r\n")),
                login("alice", "pw", Some("c"))
            ]
        );
    }

    #[test]
    fn auth_cancel_and_errors_keep_session_usable() {
        let (_, evs) = run(
            open(),
            b"HELO c\r\nAUTH LOGIN\r\n*\r\nAUTH PLAIN\r\n*\r\nAUTH LOGIN dXNlcg==\r\n*\r\nNOOP\r\n",
        );
        assert_eq!(
            evs,
            [out(
                "250 mb.example\r\n334 VXNlcm5hbWU6\r\n501 5.0.0 Authentication cancelled\r\n\
                  334 \r\n501 5.0.0 Authentication cancelled\r\n\
                  334 UGFzc3dvcmQ6\r\n501 5.0.0 Authentication cancelled\r\n250 2.0.0 OK\r\n"
            )]
        );
        let (_, evs) = run(
            open(),
            b"HELO c\r\nAUTH PLAIN !!!\r\nAUTH PLAIN\r\nnot base64\r\nAUTH LOGIN\r\nZm9v\r\n@@\r\n\
              AUTH CRAM-MD5\r\nAUTH XOAUTH2 AAAA\r\nAUTH\r\nRSET\r\n",
        );
        assert_eq!(
            evs,
            [out("250 mb.example\r\n501 5.5.2 Invalid base64 data\r\n\
                  334 \r\n501 5.5.2 Invalid base64 data\r\n\
                  334 VXNlcm5hbWU6\r\n334 UGFzc3dvcmQ6\r\n501 5.5.2 Invalid base64 data\r\n\
                  504 5.5.4 Unrecognized authentication mechanism; use PLAIN or LOGIN\r\n\
                  504 5.5.4 Unrecognized authentication mechanism; use PLAIN or LOGIN\r\n\
                  501 5.5.2 Syntax: AUTH mechanism [initial-response]\r\n\
                  250 2.0.0 OK\r\n")]
        );
        // Credentials that decode but cannot be used.
        let input = format!(
            "HELO c\r\nAUTH PLAIN {}\r\nAUTH PLAIN {}\r\nAUTH PLAIN =\r\nAUTH LOGIN\r\n{}\r\n=\r\n",
            b64(b"\0\0pw"),
            b64(b"eve\0alice\0pw"),
            b64(b"alice")
        );
        let (_, evs) = run(open(), input.as_bytes());
        assert_eq!(
            evs,
            [out(
                "250 mb.example\r\n535 5.7.8 the user name is empty\r\n\
                  535 5.7.8 logging in as another user (a different authorization identity) is not supported\r\n\
                  501 5.5.2 the PLAIN message is malformed (expected authzid NUL user NUL password)\r\n\
                  334 VXNlcm5hbWU6\r\n334 UGFzc3dvcmQ6\r\n\
                  501 5.5.2 Invalid base64 data\r\n"
            )]
        );
        // An empty password line (valid base64 of nothing).
        let input = format!("HELO c\r\nAUTH LOGIN\r\n{}\r\n\r\n", b64(b"alice"));
        let (_, evs) = run(open(), input.as_bytes());
        assert_eq!(
            evs,
            [out(
                "250 mb.example\r\n334 VXNlcm5hbWU6\r\n334 UGFzc3dvcmQ6\r\n\
                  535 5.7.8 the password is empty\r\n"
            )]
        );
    }

    #[test]
    fn auth_needs_encryption_not_ehlo() {
        // Devices that never say EHLO (or HELO) still log in.
        let input = format!("AUTH PLAIN {}\r\n", b64(b"\0u\0p"));
        let (_, evs) = run(open(), input.as_bytes());
        assert_eq!(evs, [login("u", "p", None)]);
        let opts = ClientOptions {
            starttls_offered: true,
            ..ClientOptions::default()
        };
        let (_, evs) = run(opts, b"EHLO c\r\nAUTH LOGIN\r\nNOOP\r\n");
        assert_eq!(
            evs,
            [out(
                "250-localhost\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-ENHANCEDSTATUSCODES\r\n\
                  250-SIZE 52428800\r\n250 STARTTLS\r\n\
                  538 5.7.11 Encryption required for requested authentication mechanism\r\n\
                  250 2.0.0 OK\r\n"
            )]
        );
    }

    #[test]
    fn no_mail_before_auth() {
        let (_, evs) = run(
            open(),
            b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\nmail from:<broken\r\n\
              VRFY root\r\nEXPN staff\r\nHELP\r\nFROB\r\n\r\nBDAT 10 LAST\r\nNOOP\r\n",
        );
        assert_eq!(
            evs,
            [out(&format!(
                "{EHLO_OPEN}530 5.7.0 Authentication required\r\n530 5.7.0 Authentication required\r\n\
                 530 5.7.0 Authentication required\r\n530 5.7.0 Authentication required\r\n\
                 252 2.5.0 Cannot VRFY user; log in and send the message instead\r\n\
                 502 5.5.1 EXPN is not available\r\n\
                 214 2.0.0 mailbridge: send EHLO, then AUTH PLAIN or AUTH LOGIN\r\n\
                 500 5.5.1 Unknown command\r\n500 5.5.1 Unknown command\r\n\
                 502 5.5.1 BDAT is not implemented\r\n250 2.0.0 OK\r\n"
            ))]
        );
    }

    #[test]
    fn quit_and_timeout() {
        let (mut sess, evs) = run(open(), b"EHLO c\r\nQUIT\r\nNOOP\r\n");
        assert_eq!(evs, [out(EHLO_OPEN), Ev::Close("221 2.0.0 Bye\r\n".into())]);
        sess.feed(b"NOOP\r\n");
        assert!(matches!(sess.next_step(), ClientStep::NeedInput));
        assert_eq!(
            s(&sess.timeout_message()),
            "421 4.4.2 mb.example Idle too long, closing connection\r\n"
        );
    }

    #[test]
    fn starttls_discards_buffered_input_and_resets() {
        let opts = ClientOptions {
            starttls_offered: true,
            ..ClientOptions::default()
        };
        let input = format!(
            "EHLO c\r\nSTARTTLS\r\nAUTH PLAIN {}\r\n",
            b64(b"\0evil\0pw")
        );
        let mut sess = SmtpClientSession::new(opts.clone());
        let evs = drive(&mut sess, input.as_bytes(), usize::MAX);
        assert_eq!(evs.len(), 2);
        assert_eq!(
            evs[1],
            Ev::StartTls("220 2.0.0 Ready to start TLS\r\n".into())
        );
        sess.feed(b"AUTH LOGIN\r\n");
        assert!(matches!(sess.next_step(), ClientStep::NeedInput));
        sess.tls_started();
        assert!(matches!(sess.next_step(), ClientStep::NeedInput));
        assert!(sess.take_pending().is_empty());
        // Byte at a time: the same.
        let mut slow = SmtpClientSession::new(opts);
        assert_eq!(drive(&mut slow, input.as_bytes(), 1), evs);
        // After TLS the EHLO name is forgotten; EHLO again offers AUTH.
        let input = format!(
            "STARTTLS\r\nEHLO again\r\nAUTH PLAIN {0}\r\n",
            b64(b"\0u\0p")
        );
        let evs = drive(&mut sess, input.as_bytes(), usize::MAX);
        assert_eq!(
            evs,
            [
                out("503 5.5.1 TLS is already active\r\n\
                     250-localhost\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-ENHANCEDSTATUSCODES\r\n\
                     250-SIZE 52428800\r\n250 AUTH PLAIN LOGIN\r\n"),
                login("u", "p", Some("again"))
            ]
        );
    }

    #[test]
    fn starttls_refused_when_not_offered() {
        let (_, evs) = run(open(), b"STARTTLS\r\n");
        assert_eq!(evs, [out("502 5.5.1 STARTTLS is not available here\r\n")]);
    }

    fn small() -> ClientOptions {
        ClientOptions {
            max_line: 32,
            ..open()
        }
    }

    #[test]
    fn overlong_line_is_refused_once_and_skipped() {
        let mut input = b"NOOP ".to_vec();
        input.extend(std::iter::repeat_n(b'x', 500));
        input.extend(b"\r\nNOOP\r\n");
        let (_, evs) = run(small(), &input);
        assert_eq!(evs, [out("500 5.5.2 Line too long\r\n250 2.0.0 OK\r\n")]);
        // Exactly at the limit (CRLF included) is fine; one more is not.
        let mut input = b"NOOP ".to_vec();
        input.extend([b'y'; 25]);
        input.extend(b"\r\nNOOP ");
        input.extend([b'y'; 26]);
        input.extend(b"\r\n");
        let (_, evs) = run(small(), &input);
        assert_eq!(evs, [out("250 2.0.0 OK\r\n500 5.5.2 Line too long\r\n")]);
        // An overlong SASL response ends the exchange.
        let mut input = b"HELO c\r\nAUTH PLAIN\r\n".to_vec();
        input.extend([b'A'; 100]);
        input.extend(b"\r\nNOOP\r\n");
        let (_, evs) = run(small(), &input);
        assert_eq!(
            evs,
            [out(
                "250 mb.example\r\n334 \r\n500 5.5.2 Line too long\r\n250 2.0.0 OK\r\n"
            )]
        );
        // Never holds more than the limit while discarding.
        let mut sess = SmtpClientSession::new(small());
        for _ in 0..100 {
            sess.feed(&[b'z'; 100]);
            let _ = sess.next_step();
            assert!(sess.framer.buffered() <= 100);
        }
    }

    #[test]
    fn pipelined_bytes_after_auth_are_pending() {
        let input = format!(
            "EHLO c\r\nAUTH PLAIN {}\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n",
            b64(b"\0u\0p")
        );
        let (mut sess, evs) = run(open(), input.as_bytes());
        assert_eq!(evs, [out(EHLO_OPEN), login("u", "p", Some("c"))]);
        sess.feed(b"more");
        assert!(matches!(sess.next_step(), ClientStep::NeedInput));
        let reply = sess.login_succeeded(&UpstreamSuccess::default());
        assert_eq!(s(&reply), "235 2.7.0 Authentication successful\r\n");
        assert_eq!(
            s(&sess.take_pending()),
            "MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\nmore"
        );
        // AUTH LOGIN, pipelined after the password line.
        let input = format!(
            "HELO c\r\nAUTH LOGIN\r\n{}\r\n{}\r\nMAIL FROM:<>\r\n",
            b64(b"u"),
            b64(b"p")
        );
        let (mut sess, evs) = run(open(), input.as_bytes());
        assert_eq!(evs.last(), Some(&login("u", "p", Some("c"))));
        assert_eq!(s(&sess.take_pending()), "MAIL FROM:<>\r\n");
    }

    /// A login failure; `upstream` is the server's refusal as it would
    /// have come (SMTP, or IMAP in one case), read by the upstream parsers.
    fn failure(kind: FailureKind, reason: &str, upstream: Option<&str>) -> LoginFailure {
        LoginFailure {
            kind,
            reason: reason.to_owned(),
            upstream_reply: upstream
                .and_then(|r| parse_refusal(r).or_else(|| crate::imap::parse_refusal(r))),
        }
    }

    fn pending_session() -> SmtpClientSession {
        let input = format!("HELO c\r\nAUTH PLAIN {}\r\n", b64(b"\0u\0p"));
        let (sess, _) = run(open(), input.as_bytes());
        sess
    }

    #[test]
    fn login_failure_replies() {
        let mut sess = pending_session();
        let reply = sess.login_failed(&failure(
            FailureKind::Rejected,
            "SMTP AUTH is off for this tenant",
            Some(
                "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant.",
            ),
        ));
        assert_eq!(
            s(&reply),
            "535-5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant.\r\n\
             535 5.7.139 mailbridge: SMTP AUTH is off for this tenant\r\n"
        );
        // The session stays usable.
        let evs = drive(
            &mut sess,
            format!("AUTH PLAIN {}\r\n", b64(b"\0u\0p2")).as_bytes(),
            64,
        );
        assert_eq!(evs, [login("u", "p2", Some("c"))]);
        // No enhanced code upstream: one of ours.
        let reply = sess.login_failed(&failure(
            FailureKind::Rejected,
            "refused\r\n250 injected",
            Some("535 Authentication failed"),
        ));
        assert_eq!(
            s(&reply),
            "535-5.7.8 Authentication failed\r\n535 5.7.8 mailbridge: refused  250 injected\r\n"
        );
        let mut sess = pending_session();
        let reply = sess.login_failed(&failure(
            FailureKind::Unavailable,
            "try later",
            Some("454 4.7.0 Too many login attempts, please try again later."),
        ));
        assert_eq!(
            s(&reply),
            "454-4.7.0 Too many login attempts, please try again later.\r\n454 4.7.0 mailbridge: try later\r\n"
        );
        // Not an SMTP refusal: by kind.
        for (kind, upstream, want) in [
            (
                FailureKind::BadCredentials,
                None,
                "535 5.7.8 Wrong password\r\n",
            ),
            (
                FailureKind::Rejected,
                Some("NO [AUTHENTICATIONFAILED] x"),
                "535 5.7.8 Wrong password\r\n",
            ),
            (
                FailureKind::Throttled,
                Some("250 OK"),
                "454 4.7.0 Wrong password\r\n",
            ),
            (
                FailureKind::Unavailable,
                Some("53"),
                "454 4.7.0 Wrong password\r\n",
            ),
        ] {
            let mut sess = pending_session();
            let reply = sess.login_failed(&failure(kind, "Wrong password", upstream));
            assert_eq!(s(&reply), want);
        }
        // The IMAP line is another protocol's refusal; the others are none.
        let imap = failure(
            FailureKind::Rejected,
            "",
            Some("NO [AUTHENTICATIONFAILED] x"),
        );
        assert!(imap.upstream_reply.is_some());
        assert!(parse_refusal("250 OK").is_none() && parse_refusal("53").is_none());
        let mut sess = pending_session();
        let reply = sess.login_failed(&failure(FailureKind::Rejected, "", Some("535")));
        assert_eq!(s(&reply), "535 5.7.8 mailbridge: Login failed\r\n");
        // Not pending: nothing to say.
        assert!(
            sess.login_failed(&failure(FailureKind::Rejected, "x", None))
                .is_empty()
        );
        assert!(sess.login_succeeded(&UpstreamSuccess::default()).is_empty());
    }

    #[test]
    fn client_name_only_when_usable() {
        let input = format!("EHLO [192.168.1.7]\r\nAUTH PLAIN {}\r\n", b64(b"\0u\0p"));
        let (_, evs) = run(open(), input.as_bytes());
        assert_eq!(evs[1], login("u", "p", Some("[192.168.1.7]")));
        let input = format!("EHLO caf\u{e9}\r\nAUTH PLAIN {}\r\n", b64(b"\0u\0p"));
        let (_, evs) = run(open(), input.as_bytes());
        assert_eq!(evs[1], login("u", "p", None));
    }

    #[test]
    fn debug_hides_secrets() {
        let mut sess = SmtpClientSession::new(open());
        sess.feed(format!("HELO c\r\nAUTH LOGIN {}\r\nhunter2", b64(b"alice")).as_bytes());
        let _ = sess.next_step();
        let _ = sess.next_step();
        let dbg = format!("{sess:?}");
        assert!(!dbg.contains("hunter2") && !dbg.contains("alice"), "{dbg}");
    }

    /// Deterministic pseudo-random input: no panic, bounded memory, the
    /// same events whatever the chunking.
    #[test]
    fn prop_random_input_never_panics() {
        let mut next = xorshift(0x2545_f491_4f6c_dd1d);
        let pieces: [&[u8]; 16] = [
            b"EHLO ",
            b"HELO x\r\n",
            b"AUTH PLAIN ",
            b"AUTH LOGIN",
            b"\r\n",
            b"*\r\n",
            b"AGEAYg==",
            b"STARTTLS\r\n",
            b"MAIL FROM:<",
            b"RCPT TO:<a@b> NOTIFY=",
            b" ",
            b"=",
            b"\n",
            b"QUIT\r\n",
            b"DATA\r\n",
            b"\xff\xfe",
        ];
        for round in 0..300 {
            let mut input = Vec::new();
            for _ in 0..(next() % 40) {
                if next().is_multiple_of(3) {
                    input.extend((0..next() % 20).map(|_| next() as u8));
                } else {
                    input.extend(pieces[(next() % 16) as usize]);
                }
            }
            let opts = ClientOptions {
                starttls_offered: round % 2 == 0,
                plaintext_login_allowed: round % 3 != 0,
                max_line: 40,
                ..ClientOptions::default()
            };
            let mut a = SmtpClientSession::new(opts.clone());
            let mut b = SmtpClientSession::new(opts);
            let fast = drive(&mut a, &input, usize::MAX);
            let chunk = 1 + (next() % 7) as usize;
            let mut evs = Vec::new();
            for part in input.chunks(chunk) {
                b.feed(part);
                pump(&mut b, &mut evs);
                assert!(b.framer.buffered() <= 40 + chunk);
                match evs.last() {
                    Some(Ev::StartTls(_)) => b.tls_started(),
                    Some(Ev::Login { .. }) if next().is_multiple_of(2) => {
                        let _ = b.login_failed(&failure(FailureKind::Rejected, "no", None));
                        pump(&mut b, &mut evs);
                    }
                    _ => {}
                }
            }
            if !evs
                .iter()
                .any(|e| matches!(e, Ev::StartTls(_) | Ev::Login { .. }))
            {
                assert_eq!(fast, evs, "input {:?}", s(&input));
            }
        }
    }

    // ----- upstream side -----

    use crate::testkit::{
        Up, challenge_b64, ob, provide, run_script, send, token, up_feed, xo, xorshift,
    };

    fn named(name: &str) -> UpstreamOptions {
        UpstreamOptions {
            ehlo_name: Some(name.to_owned()),
            ..UpstreamOptions::default()
        }
    }

    const GMAIL_EHLO: &[u8] = b"250-smtp.gmail.com at your service, [203.0.113.5]\r\n\
        250-SIZE 35882577\r\n250-8BITMIME\r\n250-AUTH LOGIN PLAIN XOAUTH2 PLAIN-CLIENTTOKEN OAUTHBEARER XOAUTH\r\n\
        250-ENHANCEDSTATUSCODES\r\n250-PIPELINING\r\n250-CHUNKING\r\n250 SMTPUTF8\r\n";

    fn gmail_keywords() -> Vec<String> {
        [
            "SIZE 35882577",
            "8BITMIME",
            "AUTH LOGIN PLAIN XOAUTH2 PLAIN-CLIENTTOKEN OAUTHBEARER XOAUTH",
            "ENHANCEDSTATUSCODES",
            "PIPELINING",
            "CHUNKING",
            "SMTPUTF8",
        ]
        .map(str::to_owned)
        .to_vec()
    }

    #[test]
    fn one_step_success_with_multiline_ehlo() {
        let mut u = SmtpUpstreamLogin::new(named("printer.lan"));
        assert_eq!(
            up_feed(
                &mut u,
                b"220-smtp.gmail.com ESMTP ready\r\n220 second line\r\n"
            ),
            [send("EHLO printer.lan\r\n")]
        );
        assert_eq!(up_feed(&mut u, GMAIL_EHLO), [Up::NeedToken]);
        assert_eq!(
            provide(&mut u),
            [send(&format!("AUTH XOAUTH2 {}\r\n", xo()))]
        );
        assert!(!format!("{u:?}").contains(&xo()));
        assert_eq!(
            up_feed(&mut u, b"235 2.7.0 Accepted\r\n250 early"),
            [Up::Ok(gmail_keywords(), "250 early".into())]
        );
        assert_eq!(up_feed(&mut u, b"more"), []);
    }

    #[test]
    fn ehlo_name_defaults_to_localhost() {
        for name in [None, Some("bad name"), Some("")] {
            let mut u = SmtpUpstreamLogin::new(UpstreamOptions {
                ehlo_name: name.map(str::to_owned),
                ..UpstreamOptions::default()
            });
            assert_eq!(up_feed(&mut u, b"220 hi\r\n"), [send("EHLO localhost\r\n")]);
        }
    }

    #[test]
    fn long_initial_response_goes_two_step() {
        // A token of Microsoft's size (about 2 KB): the AUTH line would be
        // over RFC 5321's 512 octets, so the response waits for the 334.
        for mech in [Mechanism::Xoauth2, Mechanism::Oauthbearer] {
            let big = BearerToken {
                token: SecretString::from("t".repeat(2000)),
                ..token()
            };
            let response = match mech {
                Mechanism::Xoauth2 => sasl::xoauth2_response(&big),
                Mechanism::Oauthbearer => sasl::oauthbearer_response(&big),
            };
            let mut u = SmtpUpstreamLogin::new(UpstreamOptions {
                preference: vec![mech],
                ..UpstreamOptions::default()
            });
            up_feed(&mut u, b"220 hi\r\n");
            let ehlo = format!("250-hi\r\n250 AUTH {}\r\n", mech.name());
            assert_eq!(up_feed(&mut u, ehlo.as_bytes()), [Up::NeedToken]);
            u.provide_token(&big);
            assert_eq!(
                up_feed(&mut u, b""),
                [send(&format!("AUTH {}\r\n", mech.name()))]
            );
            assert_eq!(
                up_feed(&mut u, b"334 \r\n"),
                [send(&format!("{}\r\n", response.expose_secret()))]
            );
            assert_eq!(
                up_feed(&mut u, b"235 2.7.0 Accepted\r\n"),
                [Up::Ok(vec![format!("AUTH {}", mech.name())], String::new())]
            );
        }
        // Just under the limit: still one line.
        let fits = "AUTH XOAUTH2 \r\n".len();
        let mut u = SmtpUpstreamLogin::new(UpstreamOptions::default());
        up_feed(&mut u, b"220 hi\r\n250-hi\r\n250 AUTH XOAUTH2\r\n");
        let small = provide(&mut u);
        assert_eq!(small, [send(&format!("AUTH XOAUTH2 {}\r\n", xo()))]);
        assert!(fits + xo().len() <= MAX_COMMAND_LINE);
    }

    #[test]
    fn fallback_to_two_step() {
        for refusal in [
            &b"501 5.5.2 Syntax error, initial response not supported\r\n"[..],
            b"504 5.5.4 Unrecognized authentication type\r\n",
            b"500 5.5.1 Line too long\r\n",
        ] {
            let mut u = SmtpUpstreamLogin::new(UpstreamOptions::default());
            up_feed(&mut u, b"220 hi\r\n");
            assert_eq!(
                up_feed(&mut u, b"250-hi\r\n250 AUTH XOAUTH2\r\n"),
                [Up::NeedToken]
            );
            assert_eq!(
                provide(&mut u),
                [send(&format!("AUTH XOAUTH2 {}\r\n", xo()))]
            );
            assert_eq!(up_feed(&mut u, refusal), [send("AUTH XOAUTH2\r\n")]);
            assert_eq!(
                up_feed(&mut u, b"334 \r\n"),
                [send(&format!("{}\r\n", xo()))]
            );
            assert_eq!(
                up_feed(&mut u, b"235 2.7.0 Accepted\r\n"),
                [Up::Ok(vec!["AUTH XOAUTH2".into()], String::new())]
            );
        }
        // Two-step refused as well: a rejection, no loop.
        let mut u = SmtpUpstreamLogin::new(UpstreamOptions::default());
        up_feed(&mut u, b"220 hi\r\n250-hi\r\n250 AUTH XOAUTH2\r\n");
        provide(&mut u);
        assert_eq!(
            up_feed(&mut u, b"501 5.5.2 no\r\n"),
            [send("AUTH XOAUTH2\r\n")]
        );
        assert_eq!(
            up_feed(&mut u, b"504 5.5.4 no either\r\n"),
            [Up::Rejected {
                status: None,
                text: "504 5.5.4 no either".into(),
                retry: false
            }]
        );
        // A retry stays with the two-step form.
        u.retry();
        assert_eq!(up_feed(&mut u, b""), [Up::NeedToken]);
        assert_eq!(provide(&mut u), [send("AUTH XOAUTH2\r\n")]);
        // Microsoft's token-expiry 501 is a refusal, not a form problem.
        let mut u = SmtpUpstreamLogin::new(UpstreamOptions::default());
        up_feed(&mut u, b"220 hi\r\n250-hi\r\n250 AUTH XOAUTH2\r\n");
        provide(&mut u);
        assert_eq!(
            up_feed(&mut u, b"501 5.5.127 Token will expire soon\r\n"),
            [Up::Rejected {
                status: None,
                text: "501 5.5.127 Token will expire soon".into(),
                retry: false
            }]
        );
    }

    #[test]
    fn starttls_path() {
        let opts = UpstreamOptions {
            starttls: true,
            ..named("c.example")
        };
        let mut u = SmtpUpstreamLogin::new(opts.clone());
        up_feed(
            &mut u,
            b"220 smtp.office365.com Microsoft ESMTP MAIL Service ready\r\n",
        );
        assert_eq!(
            up_feed(
                &mut u,
                b"250-SN4PR0201CA0045.outlook.office365.com Hello [203.0.113.5]\r\n250-SIZE 157286400\r\n\
                  250-PIPELINING\r\n250-STARTTLS\r\n250 SMTPUTF8\r\n"
            ),
            [send("STARTTLS\r\n")]
        );
        assert_eq!(
            up_feed(&mut u, b"220 2.0.0 SMTP server ready\r\n250 injected\r\n"),
            [Up::StartTls]
        );
        u.feed(b"junk before handshake\r\n");
        u.tls_started();
        assert_eq!(up_feed(&mut u, b""), [send("EHLO c.example\r\n")]);
        assert_eq!(
            up_feed(
                &mut u,
                b"250-SN4PR0201CA0045.outlook.office365.com Hello [203.0.113.5]\r\n250-SIZE 157286400\r\n\
                  250-AUTH LOGIN XOAUTH2\r\n250 ENHANCEDSTATUSCODES\r\n"
            ),
            [Up::NeedToken]
        );
        provide(&mut u);
        assert_eq!(
            up_feed(&mut u, b"235 2.7.0 Authentication successful\r\n"),
            [Up::Ok(
                vec![
                    "SIZE 157286400".into(),
                    "AUTH LOGIN XOAUTH2".into(),
                    "ENHANCEDSTATUSCODES".into()
                ],
                String::new()
            )]
        );

        let mut u = SmtpUpstreamLogin::new(opts.clone());
        up_feed(&mut u, b"220 hi\r\n");
        assert_eq!(
            up_feed(&mut u, b"250-hi\r\n250 AUTH XOAUTH2\r\n"),
            [Up::Err("the server does not offer STARTTLS".into())]
        );
        let mut u = SmtpUpstreamLogin::new(opts);
        up_feed(&mut u, b"220 hi\r\n250-hi\r\n250 STARTTLS\r\n");
        let evs = up_feed(&mut u, b"454 4.7.0 TLS not available\r\n");
        assert!(
            matches!(&evs[..], [Up::Err(e)] if e.contains("refused STARTTLS") && e.contains("454 4.7.0 TLS not available"))
        );
    }

    #[test]
    fn xoauth2_challenge_absorbed_then_retry() {
        let mut u = SmtpUpstreamLogin::new(UpstreamOptions::default());
        up_feed(&mut u, b"220 hi\r\n");
        up_feed(&mut u, GMAIL_EHLO);
        provide(&mut u);
        let ch = challenge_b64(
            r#"{"status":"401","schemes":"bearer","scope":"https://mail.google.com/"}"#,
        );
        assert_eq!(
            up_feed(&mut u, format!("334 {ch}\r\n").as_bytes()),
            [send("\r\n")]
        );
        assert_eq!(
            up_feed(
                &mut u,
                b"535-5.7.8 Username and Password not accepted. For more information, go to\r\n\
                  535 5.7.8  https://support.google.com/mail/?p=BadCredentials x-123\r\n"
            ),
            [Up::Rejected {
                status: Some("401".into()),
                text: "535 5.7.8 Username and Password not accepted. For more information, go to https://support.google.com/mail/?p=BadCredentials x-123".into(),
                retry: true
            }]
        );
        assert_eq!(up_feed(&mut u, b""), []);
        u.retry();
        assert_eq!(up_feed(&mut u, b""), [Up::NeedToken]);
        assert_eq!(
            provide(&mut u),
            [send(&format!("AUTH XOAUTH2 {}\r\n", xo()))]
        );
        assert_eq!(
            up_feed(&mut u, b"235 2.7.0 Accepted\r\n"),
            [Up::Ok(gmail_keywords(), String::new())]
        );
    }

    #[test]
    fn oauthbearer_challenge_acked_with_01() {
        let opts = UpstreamOptions {
            preference: vec![Mechanism::Oauthbearer, Mechanism::Xoauth2],
            ..UpstreamOptions::default()
        };
        let mut u = SmtpUpstreamLogin::new(opts);
        up_feed(&mut u, b"220 hi\r\n");
        up_feed(&mut u, GMAIL_EHLO);
        assert_eq!(
            provide(&mut u),
            [send(&format!("AUTH OAUTHBEARER {}\r\n", ob()))]
        );
        let ch = challenge_b64(r#"{"status":"invalid_token","openid-configuration":"https://x"}"#);
        assert_eq!(
            up_feed(&mut u, format!("334 {ch}\r\n").as_bytes()),
            [send("AQ==\r\n")]
        );
        assert_eq!(
            up_feed(&mut u, b"535 5.7.8 Authentication failed\r\n"),
            [Up::Rejected {
                status: Some("invalid_token".into()),
                text: "535 5.7.8 Authentication failed".into(),
                retry: true
            }]
        );
        // A second challenge is a protocol error.
        u.retry();
        up_feed(&mut u, b"");
        provide(&mut u);
        up_feed(&mut u, format!("334 {ch}\r\n").as_bytes());
        let evs = up_feed(&mut u, format!("334 {ch}\r\n").as_bytes());
        assert!(matches!(&evs[..], [Up::Err(e)] if e.contains("second challenge")));
    }

    #[test]
    fn microsoft_direct_535() {
        let mut u = SmtpUpstreamLogin::new(UpstreamOptions::default());
        up_feed(&mut u, b"220 hi\r\n");
        up_feed(&mut u, b"250-hi\r\n250 AUTH=LOGIN XOAUTH2\r\n");
        provide(&mut u);
        assert_eq!(
            up_feed(&mut u, b"535 5.7.3 Authentication unsuccessful [SN4PR0201CA0045.namprd02.prod.outlook.com]\r\n"),
            [Up::Rejected {
                status: None,
                text: "535 5.7.3 Authentication unsuccessful [SN4PR0201CA0045.namprd02.prod.outlook.com]".into(),
                retry: false
            }]
        );
    }

    #[test]
    fn no_mechanism() {
        let mut u = SmtpUpstreamLogin::new(UpstreamOptions::default());
        up_feed(&mut u, b"220 hi\r\n");
        assert_eq!(
            up_feed(&mut u, b"250-hi\r\n250 AUTH PLAIN LOGIN\r\n"),
            [Up::Err(
                "the server offers neither XOAUTH2 nor OAUTHBEARER (it offers: AUTH PLAIN LOGIN)"
                    .into()
            )]
        );
        assert!(matches!(u.next_step(), Err(UpstreamError::Unexpected(_))));
        let mut u = SmtpUpstreamLogin::new(UpstreamOptions::default());
        up_feed(&mut u, b"220 hi\r\n");
        let evs = up_feed(&mut u, b"250-hi\r\n250 SIZE 10\r\n");
        assert!(matches!(&evs[..], [Up::Err(e)] if e.contains("no AUTH mechanisms")));
        // Case-insensitive, old AUTH= form.
        let mut u = SmtpUpstreamLogin::new(UpstreamOptions::default());
        up_feed(&mut u, b"220 hi\r\n");
        assert_eq!(
            up_feed(&mut u, b"250-hi\r\n250 auth=plain oauthbearer\r\n"),
            [Up::NeedToken]
        );
        assert_eq!(
            provide(&mut u),
            [send(&format!("AUTH OAUTHBEARER {}\r\n", ob()))]
        );
    }

    #[test]
    fn bad_greetings_and_replies() {
        for (input, what) in [
            (
                &b"554 5.7.1 Service unavailable; blocked\r\n"[..],
                "refused the connection: 554 5.7.1 Service unavailable; blocked",
            ),
            (b"421 4.3.2 busy\r\n", "refused the connection"),
            (b"* OK IMAP4rev1 ready\r\n", "not an SMTP reply"),
            (b"+OK POP3\r\n", "not an SMTP reply"),
            (b"220-a\r\n250 b\r\n", "another code"),
            (b"220 hi\r\n550 5.7.1 no EHLO\r\n", "refused EHLO"),
            (b"220 hi\r\n250-hi\r\n250 AUTH XOAUTH2\r\n235 huh\r\n", ""),
        ] {
            let mut u = SmtpUpstreamLogin::new(UpstreamOptions::default());
            let evs = up_feed(&mut u, input);
            if what.is_empty() {
                // Replies while waiting for the token are not read yet.
                assert_eq!(evs.last(), Some(&Up::NeedToken));
                continue;
            }
            assert!(
                matches!(evs.last(), Some(Up::Err(e)) if e.contains(what)),
                "{evs:?}"
            );
        }
        let mut u = SmtpUpstreamLogin::new(UpstreamOptions::default());
        up_feed(&mut u, b"220 hi\r\n250-hi\r\n250 AUTH XOAUTH2\r\n");
        provide(&mut u);
        let evs = up_feed(&mut u, b"250 2.0.0 what\r\n");
        assert!(matches!(&evs[..], [Up::Err(e)] if e.contains("unexpected reply to AUTH")));
    }

    #[test]
    fn long_server_line() {
        let mut u = SmtpUpstreamLogin::new(UpstreamOptions {
            max_line: 64,
            ..UpstreamOptions::default()
        });
        let mut line = b"220 ".to_vec();
        line.extend([b'x'; 100]);
        assert_eq!(
            up_feed(&mut u, &line),
            [Up::Err(
                "the server sent a line longer than 64 bytes".into()
            )]
        );
        // Too many lines in one reply.
        let mut u = SmtpUpstreamLogin::new(UpstreamOptions::default());
        let evs = up_feed(&mut u, &b"220-x\r\n".repeat(200));
        assert!(matches!(&evs[..], [Up::Err(e)] if e.contains("too many lines")));
    }

    #[test]
    fn upstream_byte_at_a_time() {
        let ch = challenge_b64(r#"{"status":"401"}"#);
        let challenge_line = format!("334 {ch}\r\n");
        let script: Vec<&[u8]> = vec![
            b"220-a\r\n220 b\r\n",
            b"250-hi\r\n250-8BITMIME\r\n250 AUTH OAUTHBEARER\r\n",
            b"504 5.5.4 two-step please\r\n",
            b"334 \r\n",
            challenge_line.as_bytes(),
            b"535 5.7.8 no\r\n",
        ];
        let run_it = |chunk: usize| {
            let mut u = SmtpUpstreamLogin::new(UpstreamOptions::default());
            run_script(&mut u, &script, chunk, &token())
        };
        let whole = run_it(usize::MAX);
        assert_eq!(
            whole,
            [
                send("EHLO localhost\r\n"),
                Up::NeedToken,
                send(&format!("AUTH OAUTHBEARER {}\r\n", ob())),
                send("AUTH OAUTHBEARER\r\n"),
                send(&format!("{}\r\n", ob())),
                send("AQ==\r\n"),
                Up::Rejected {
                    status: Some("401".into()),
                    text: "535 5.7.8 no".into(),
                    retry: true
                }
            ]
        );
        assert_eq!(run_it(1), whole);
        assert_eq!(run_it(3), whole);
    }

    #[test]
    fn prop_random_server_bytes_never_panic() {
        let mut next = xorshift(0x1234_5678_9abc_def1);
        let pieces: [&[u8]; 12] = [
            b"220 ",
            b"250-",
            b"250 AUTH XOAUTH2 OAUTHBEARER",
            b"\r\n",
            b"334 ",
            b"235 ",
            b"535 5.7.8 ",
            b"501 ",
            b"5.7.139",
            b"eyJzdGF0dXMiOjQwMX0=",
            b"STARTTLS",
            b"\n",
        ];
        for round in 0..300 {
            let mut u = SmtpUpstreamLogin::new(UpstreamOptions {
                max_line: 50,
                starttls: round % 2 == 0,
                ..UpstreamOptions::default()
            });
            for _ in 0..(next() % 30) {
                let bytes: Vec<u8> = if next().is_multiple_of(3) {
                    (0..next() % 10).map(|_| next() as u8).collect()
                } else {
                    pieces[(next() % 12) as usize].to_vec()
                };
                u.feed(&bytes);
                for _ in 0..20 {
                    match u.next_step() {
                        Ok(UpstreamStep::NeedToken) => u.provide_token(&token()),
                        Ok(UpstreamStep::Rejected(_)) => u.retry(),
                        Ok(UpstreamStep::StartTls) => u.tls_started(),
                        Ok(UpstreamStep::NeedInput) | Err(_) => break,
                        Ok(_) => {}
                    }
                }
                // Input is only held unread while the dialogue waits for
                // the driver (or is over).
                let reading = match u.state {
                    UpState::Greeting | UpState::Ehlo | UpState::StartTls => true,
                    UpState::Login => u.bearer.awaits_server(),
                    _ => false,
                };
                assert!(!reading || u.framer.buffered() <= 60);
            }
        }
    }
}

#[cfg(test)]
mod device_tests {
    use super::*;
    use crate::testkit::{Ev, drive};

    fn device(spool: bool) -> ClientOptions {
        ClientOptions {
            hostname: "gw".into(),
            max_message_size: 1000,
            device: Some(DeviceOptions {
                senders: vec!["scanner@contoso.com".into()],
                spool,
            }),
            ..ClientOptions::default()
        }
    }

    #[test]
    fn a_spooling_device_hands_over_the_whole_message() {
        let input = b"HELO printer\r\nMAIL FROM:<Scanner@Contoso.com> BODY=8BITMIME\r\n\
RCPT TO:<a@x.example>\r\nRCPT TO:<b@x.example>\r\nDATA\r\nSubject: s\r\n\r\n..dot\r\nend\r\n.\r\nQUIT\r\n";
        for chunk in [usize::MAX, 1, 7] {
            let mut s = SmtpClientSession::new(device(true));
            let evs = drive(&mut s, input, chunk);
            assert_eq!(
                evs,
                [
                    Ev::Out(
                        "250 gw\r\n250 2.1.0 OK\r\n250 2.1.5 OK\r\n250 2.1.5 OK\r\n\
                         354 End data with <CR><LF>.<CR><LF>\r\n"
                            .into()
                    ),
                    Ev::Spool {
                        from: "Scanner@Contoso.com".into(),
                        to: vec!["a@x.example".into(), "b@x.example".into()],
                        data: "Subject: s\r\n\r\n.dot\r\nend\r\n".into(),
                    }
                ],
                "chunk {chunk}"
            );
            let reply = s.spooled(&SpoolOutcome::Queued { id: "Q1".into() });
            assert_eq!(reply, b"250 2.0.0 OK: queued as Q1\r\n");
            let mut evs = Vec::new();
            crate::testkit::pump(&mut s, &mut evs);
            assert_eq!(evs, [Ev::Close("221 2.0.0 Bye\r\n".into())]);
        }
    }

    #[test]
    fn device_refusals() {
        let mut s = SmtpClientSession::new(device(true));
        let evs = drive(
            &mut s,
            b"MAIL FROM:<ceo@contoso.com>\r\nMAIL FROM:<scanner@contoso.com> SIZE=5000\r\n\
RCPT TO:<a@x>\r\nDATA\r\nMAIL FROM:<scanner@contoso.com>\r\nDATA\r\nRCPT TO:<>\r\n",
            usize::MAX,
        );
        assert_eq!(
            evs,
            [Ev::Out(
                "550 5.7.1 this device may not send as ceo@contoso.com: by the [[device]] rule for its address it sends as scanner@contoso.com\r\n\
                 552 5.3.4 Message too big: at most 1000 bytes\r\n\
                 503 5.5.1 Send MAIL first\r\n503 5.5.1 Send MAIL first\r\n\
                 250 2.1.0 OK\r\n554 5.5.1 No valid recipients\r\n\
                 501 5.1.3 An empty recipient address is not allowed\r\n"
                    .into()
            )]
        );
        // A message over the limit is read to its end and refused.
        let mut s = SmtpClientSession::new(device(true));
        let mut input = b"MAIL FROM:<scanner@contoso.com>\r\nRCPT TO:<a@x>\r\nDATA\r\n".to_vec();
        input.extend(std::iter::repeat_n(b'x', 5000));
        input.extend_from_slice(b"\r\n.\r\nNOOP\r\n");
        let evs = drive(&mut s, &input, 100);
        let Ev::Out(text) = &evs[0] else {
            panic!("{evs:?}")
        };
        assert!(
            text.ends_with("552 5.3.4 Message too big: at most 1000 bytes\r\n250 2.0.0 OK\r\n"),
            "{text}"
        );
        // A storage failure is a 452.
        let mut s = SmtpClientSession::new(device(true));
        drive(
            &mut s,
            b"MAIL FROM:<scanner@contoso.com>\r\nRCPT TO:<a@x>\r\nDATA\r\nhi\r\n.\r\n",
            usize::MAX,
        );
        let reply = s.spooled(&SpoolOutcome::Failed {
            temporary: true,
            reason: "the disk is full".into(),
        });
        assert_eq!(reply, b"452 4.3.1 the disk is full\r\n");
    }

    #[test]
    fn a_live_device_logs_in_at_mail_and_the_server_answers_it() {
        let mut s = SmtpClientSession::new(device(false));
        let mut evs = drive(
            &mut s,
            b"EHLO mfp\r\nMAIL FROM:<scanner@contoso.com>\r\nRCPT TO:<a@x>\r\n",
            usize::MAX,
        );
        assert!(matches!(evs.pop(), Some(Ev::Login { .. })), "{evs:?}");
        assert!(s.login_succeeded(&UpstreamSuccess::default()).is_empty());
        assert_eq!(
            s.take_pending(),
            b"MAIL FROM:<scanner@contoso.com>\r\nRCPT TO:<a@x>\r\n"
        );
        // A failed live login answers the MAIL.
        let mut s = SmtpClientSession::new(device(false));
        drive(&mut s, b"MAIL FROM:<scanner@contoso.com>\r\n", usize::MAX);
        let reply = s.login_failed(&LoginFailure {
            kind: FailureKind::Unavailable,
            reason: "provider down".into(),
            upstream_reply: None,
        });
        assert_eq!(reply, b"451 4.4.0 provider down\r\n");
        // Without a device, MAIL still needs AUTH.
        let mut s = SmtpClientSession::new(ClientOptions::default());
        let evs = drive(&mut s, b"MAIL FROM:<scanner@contoso.com>\r\n", usize::MAX);
        assert_eq!(
            evs,
            [Ev::Out("530 5.7.0 Authentication required\r\n".into())]
        );
    }

    #[test]
    fn a_local_login_keeps_the_session_for_the_spool() {
        let mut s = SmtpClientSession::new(ClientOptions {
            plaintext_login_allowed: true,
            ..ClientOptions::default()
        });
        let evs = drive(&mut s, b"EHLO mfp\r\nAUTH PLAIN AHUAcA==\r\n", usize::MAX);
        assert!(matches!(evs.last(), Some(Ev::Login { .. })), "{evs:?}");
        let reply = s.login_local(vec!["u@x.example".into()]);
        assert_eq!(reply, b"235 2.7.0 Authentication successful\r\n");
        let evs = drive(
            &mut s,
            b"AUTH PLAIN AHUAcA==\r\nMAIL FROM:<u@x.example>\r\nRCPT TO:<a@x>\r\nDATA\r\nhi\r\n.\r\n",
            usize::MAX,
        );
        assert_eq!(
            evs,
            [
                Ev::Out(
                    "503 5.5.1 Already authenticated\r\n250 2.1.0 OK\r\n250 2.1.5 OK\r\n\
                     354 End data with <CR><LF>.<CR><LF>\r\n"
                        .into()
                ),
                Ev::Spool {
                    from: "u@x.example".into(),
                    to: vec!["a@x".into()],
                    data: "hi\r\n".into()
                }
            ]
        );
    }

    fn message() -> Message {
        Message {
            from: "scanner@contoso.com".into(),
            recipients: vec!["a@x".into(), "b@x".into(), "c@x".into()],
            data: b"Subject: s\r\n\r\n.dot".to_vec(),
            smtputf8: true,
            eight_bit: false,
            client_name: None,
        }
    }

    fn sub_run(sub: &mut Submission, replies: &[&str]) -> (String, Option<SubmitOutcome>) {
        let mut sent = String::new();
        let mut replies = replies.iter();
        loop {
            match sub.next_step().unwrap() {
                SubmitStep::Send(b) => sent.push_str(&String::from_utf8(b).unwrap()),
                SubmitStep::NeedInput => match replies.next() {
                    Some(r) => sub.feed(r.as_bytes()),
                    None => return (sent, None),
                },
                SubmitStep::Done(o) => return (sent, Some(o)),
            }
        }
    }

    #[test]
    fn a_submission_sends_the_message_and_reads_each_recipient() {
        let mut sub = Submission::new(&message());
        let (sent, outcome) = sub_run(
            &mut sub,
            &[
                "250 2.1.0 ok\r\n",
                "250 2.1.5 ok\r\n",
                "550 5.1.1 no such user\r\n",
                "451 4.7.500 Server busy\r\n",
                "354 go\r\n",
                "250 2.0.0 queued\r\n",
            ],
        );
        assert_eq!(
            sent,
            "MAIL FROM:<scanner@contoso.com> SMTPUTF8\r\nRCPT TO:<a@x>\r\nRCPT TO:<b@x>\r\n\
             RCPT TO:<c@x>\r\nDATA\r\nSubject: s\r\n\r\n..dot\r\n.\r\n"
        );
        let o = outcome.unwrap();
        assert_eq!(o.delivered, ["a@x"]);
        assert_eq!(o.refused.len(), 2);
        assert!(!o.refused[0].1.is_temporary() && o.refused[1].1.is_temporary());

        // A refused MAIL refuses everyone.
        let mut sub = Submission::new(&message());
        let (_, outcome) = sub_run(
            &mut sub,
            &["451 4.7.500 Server busy. Please try again later\r\n"],
        );
        let o = outcome.unwrap();
        assert!(o.delivered.is_empty());
        assert_eq!(o.refused.len(), 3);
        assert!(o.refused.iter().all(|(_, r)| r.is_temporary()));
    }
}
