//! IMAP: client-facing pre-auth session and upstream login dialogue.
//!
//! Both halves first split the byte stream into whole IMAP messages (a line
//! plus the literals it announces, with their continuation lines) under size
//! limits, and only then hand a complete message to imap-codec. Literal
//! handling stays exact (we alone decide when a client gets `+`), and a
//! malformed or oversized message is dropped on its real boundaries, so
//! literal bytes are never mistaken for a command.

use std::collections::VecDeque;
use std::fmt;

use imap_codec::decode::Decoder;
use imap_codec::imap_types::auth::{AuthMechanism, AuthenticateData};
use imap_codec::imap_types::command::CommandBody;
use imap_codec::imap_types::core::{IString, NString};
use imap_codec::imap_types::response::{
    Code, Data, GreetingKind, Response, Status, StatusKind,
};
use imap_codec::{AuthenticateDataCodec, CommandCodec, GreetingCodec, ResponseCodec};
use secrecy::{ExposeSecret, SecretString, zeroize::Zeroize};

use super::{
    ClientSession, ClientStep, FailureKind, LoginFailure, LoginRequest, Rejection,
    UpstreamError, UpstreamLogin, UpstreamStep, UpstreamSuccess,
};
use crate::sasl::{self, BearerToken, FailureChallenge, Mechanism};

/// Default line and literal limit: 64 KiB is far above any real pre-auth
/// command (RFC 7162 asks servers to accept 8 KiB lines) and keeps the
/// memory a stranger can make us hold small.
const DEFAULT_LIMIT: usize = 64 * 1024;

/// How many bytes of a discarded line we keep to spot a literal announced at
/// its end (`{4294967295+}\r\n` is 15 bytes).
const TAIL: usize = 32;

// ---------------------------------------------------------------------------
// Framing
// ---------------------------------------------------------------------------

/// A literal announced at the end of a line: `{n}` (sync) or `{n+}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Announcement {
    length: u64,
    sync: bool,
}

/// The literal a line ending in `{n}\r\n` or `{n+}\r\n` announces.
fn announcement(line: &[u8]) -> Option<Announcement> {
    let body = line.strip_suffix(b"}\r\n")?;
    let (body, sync) = match body.strip_suffix(b"+") {
        Some(b) => (b, false),
        None => (body, true),
    };
    let start = body
        .iter()
        .rposition(|b| !b.is_ascii_digit())
        .map_or(0, |i| i + 1);
    let digits = &body[start..];
    if digits.is_empty() || body[..start].last() != Some(&b'{') {
        return None;
    }
    let length = digits.iter().fold(0u64, |n, d| {
        n.saturating_mul(10).saturating_add(u64::from(d - b'0'))
    });
    Some(Announcement { length, sync })
}

/// IMAP tag characters: ASTRING-CHAR except `+`.
fn is_tag_char(b: u8) -> bool {
    b.is_ascii_graphic() && !b"(){%*\"\\+".contains(&b)
}

/// The tag of a (possibly malformed) command, when it has a valid one:
/// lets us answer a broken command with a tagged reply.
fn tag_of(bytes: &[u8]) -> Option<String> {
    let end = bytes.iter().position(|&b| b == b' ')?;
    let tag = &bytes[..end];
    if tag.is_empty() || tag.len() > 64 || !tag.iter().copied().all(is_tag_char) {
        return None;
    }
    Some(String::from_utf8_lossy(tag).into_owned())
}

/// What the framer found next.
#[derive(Debug)]
enum Frame {
    /// More input is needed.
    NeedMore,
    /// A complete message: lines and literals, ending with a line ending.
    Message(Vec<u8>),
    /// A line announced an acceptable literal; for a sync literal the peer
    /// waits for a continuation request.
    Literal { sync: bool },
    /// A line went over the limit; it (and its message) is being dropped.
    LineTooLong,
    /// An announced literal is over the limit; the message is dropped. A
    /// sync literal's bytes will not come; a non-sync literal's are skipped.
    LiteralTooLarge { tag: Option<String> },
    /// A dropped overlong line ended by announcing a sync literal: the
    /// peer waits for a reply to that.
    AbandonedSync { tag: Option<String> },
    /// The end of a dropped message.
    Discarded,
}

#[derive(Debug)]
enum FrameState {
    /// Reading a line into the message.
    Line,
    /// Copying an accepted literal into the message.
    Literal { remaining: usize },
    /// Dropping an overlong line up to its line ending.
    Discard {
        tail: Vec<u8>,
        tag: Option<String>,
        literals: bool,
    },
    /// Dropping the bytes of a refused non-sync literal, then the rest of
    /// its message.
    Skip { remaining: u64, tag: Option<String> },
}

/// Splits bytes into IMAP messages. Holds at most one message (bounded by
/// `max_line + max_literal`) plus whatever was fed and not yet framed.
struct Framer {
    /// Received, not yet framed.
    buf: Vec<u8>,
    /// The current message so far.
    msg: Vec<u8>,
    state: FrameState,
    max_line: usize,
    max_literal: usize,
}

impl Framer {
    fn new(max_line: usize, max_literal: usize) -> Self {
        Framer {
            buf: Vec::new(),
            msg: Vec::new(),
            state: FrameState::Line,
            max_line: max_line.max(1),
            max_literal,
        }
    }

    /// The largest message we assemble.
    fn cap(&self) -> usize {
        self.max_line.saturating_add(self.max_literal)
    }

    /// Forgets everything: used at STARTTLS so no plaintext byte survives
    /// into the encrypted session.
    fn reset(&mut self) {
        self.buf.zeroize();
        self.msg.zeroize();
        self.state = FrameState::Line;
    }

    fn start_discard(&mut self, literals: bool) -> Frame {
        let tag = tag_of(if self.msg.is_empty() {
            &self.buf
        } else {
            &self.msg
        });
        self.msg.zeroize();
        self.state = FrameState::Discard {
            tail: Vec::new(),
            tag,
            literals,
        };
        Frame::LineTooLong
    }

    /// The next frame of a command or response stream.
    fn next_frame(&mut self) -> Frame {
        loop {
            match &mut self.state {
                FrameState::Line => {
                    let Some(pos) = self.buf.iter().position(|&b| b == b'\n') else {
                        if self.buf.len() > self.max_line
                            || self.msg.len() + self.buf.len() > self.cap()
                        {
                            return self.start_discard(true);
                        }
                        return Frame::NeedMore;
                    };
                    let len = pos + 1;
                    if len > self.max_line || self.msg.len() + len > self.cap() {
                        return self.start_discard(true);
                    }
                    let start = self.msg.len();
                    self.msg.extend(self.buf.drain(..len));
                    let Some(a) = announcement(&self.msg[start..]) else {
                        return Frame::Message(std::mem::take(&mut self.msg));
                    };
                    let room = self.cap().saturating_sub(self.msg.len());
                    let fits = usize::try_from(a.length)
                        .is_ok_and(|n| n <= self.max_literal && n <= room);
                    if !fits {
                        let tag = tag_of(&self.msg);
                        self.msg.zeroize();
                        if !a.sync {
                            self.state = FrameState::Skip {
                                remaining: a.length,
                                tag: tag.clone(),
                            };
                        }
                        return Frame::LiteralTooLarge { tag };
                    }
                    self.state = FrameState::Literal {
                        remaining: usize::try_from(a.length).unwrap_or(usize::MAX),
                    };
                    return Frame::Literal { sync: a.sync };
                }
                FrameState::Literal { remaining } => {
                    if *remaining > 0 {
                        if self.buf.is_empty() {
                            return Frame::NeedMore;
                        }
                        let n = (*remaining).min(self.buf.len());
                        *remaining -= n;
                        self.msg.extend(self.buf.drain(..n));
                    }
                    if *remaining == 0 {
                        self.state = FrameState::Line;
                    }
                }
                FrameState::Skip { remaining, tag } => {
                    if *remaining > 0 {
                        if self.buf.is_empty() {
                            return Frame::NeedMore;
                        }
                        let n = usize::try_from(*remaining)
                            .unwrap_or(usize::MAX)
                            .min(self.buf.len());
                        *remaining -= n as u64;
                        self.buf.drain(..n);
                    }
                    if *remaining == 0 {
                        let tag = tag.take();
                        self.state = FrameState::Discard {
                            tail: Vec::new(),
                            tag,
                            literals: true,
                        };
                    }
                }
                FrameState::Discard {
                    tail,
                    tag,
                    literals,
                } => {
                    let end = self.buf.iter().position(|&b| b == b'\n');
                    let upto = end.map_or(self.buf.len(), |p| p + 1);
                    tail.extend(self.buf.drain(..upto));
                    if tail.len() > TAIL {
                        tail.drain(..tail.len() - TAIL);
                    }
                    if end.is_none() {
                        return Frame::NeedMore;
                    }
                    let found = if *literals { announcement(tail) } else { None };
                    let tag = tag.take();
                    match found {
                        None => {
                            self.state = FrameState::Line;
                            return Frame::Discarded;
                        }
                        Some(a) if a.sync => {
                            self.state = FrameState::Line;
                            return Frame::AbandonedSync { tag };
                        }
                        Some(a) => {
                            self.state = FrameState::Skip {
                                remaining: a.length,
                                tag,
                            };
                        }
                    }
                }
            }
        }
    }

    /// The next line, with no literal semantics (a SASL response line).
    fn next_raw_line(&mut self) -> Frame {
        if !matches!(self.state, FrameState::Line) || !self.msg.is_empty() {
            return self.next_frame();
        }
        match self.buf.iter().position(|&b| b == b'\n') {
            Some(pos) if pos < self.max_line => {
                Frame::Message(self.buf.drain(..=pos).collect())
            }
            Some(_) => self.start_discard(false),
            None if self.buf.len() > self.max_line => self.start_discard(false),
            None => Frame::NeedMore,
        }
    }
}

impl Drop for Framer {
    fn drop(&mut self) {
        // Pre-auth buffers can hold passwords.
        self.buf.zeroize();
        self.msg.zeroize();
    }
}

/// One line of text for a reply: no control characters, ASCII only,
/// bounded, never empty.
fn one_line(text: &str, fallback: &str) -> String {
    let clean: String = text
        .chars()
        .map(|c| if c.is_ascii() && !c.is_ascii_control() { c } else if c.is_control() { ' ' } else { '?' })
        .take(300)
        .collect();
    let clean = clean.trim();
    if clean.is_empty() {
        fallback.to_owned()
    } else {
        clean.to_owned()
    }
}

/// A line without its line ending.
fn strip_eol(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
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
    /// LOGIN / AUTHENTICATE are allowed without TLS (loopback listener, or
    /// the configuration says so). Otherwise we advertise LOGINDISABLED.
    pub plaintext_login_allowed: bool,
    /// Longest command line accepted, CRLF included (default 64 KiB).
    pub max_line: usize,
    /// Longest literal accepted (default 64 KiB). A whole command is at most
    /// `max_line + max_literal` bytes.
    pub max_literal: usize,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            starttls_offered: false,
            tls_active: false,
            plaintext_login_allowed: false,
            max_line: DEFAULT_LIMIT,
            max_literal: DEFAULT_LIMIT,
        }
    }
}

enum ClientState {
    /// Reading commands.
    Commands,
    /// Sent `+ ` for AUTHENTICATE PLAIN; the next line is the response.
    AuthPlain { tag: String },
    /// Sent the STARTTLS OK; waiting for `tls_started`.
    TlsPending,
    /// Emitted `ClientStep::Login`; waiting for the driver's verdict.
    LoginPending { tag: String },
    /// Logged in: the session is over, bytes go upstream.
    LoggedIn,
    /// LOGOUT: the connection is closing.
    Closed,
}

impl ClientState {
    fn name(&self) -> &'static str {
        match self {
            ClientState::Commands => "commands",
            ClientState::AuthPlain { .. } => "authenticate-plain",
            ClientState::TlsPending => "tls-pending",
            ClientState::LoginPending { .. } => "login-pending",
            ClientState::LoggedIn => "logged-in",
            ClientState::Closed => "closed",
        }
    }
}

/// The IMAP server side until login: greeting, CAPABILITY, ID, STARTTLS,
/// LOGIN and AUTHENTICATE PLAIN; everything else is refused until login.
///
/// Over-limit input: a line over `max_line` gets `* BAD Command line too
/// long` and is dropped up to its line ending (a sync literal announced at
/// its end also gets a tagged BAD, a non-sync one is skipped). A literal
/// over `max_literal`: `{n}` gets `TAG BAD Literal too large` and no `+`;
/// `{n+}` gets the same reply, then exactly n bytes and the rest of that
/// command are skipped, so the session stays in step with the client.
pub struct ImapClientSession {
    opts: ClientOptions,
    framer: Framer,
    state: ClientState,
    /// TLS is on (implicit, or STARTTLS done).
    in_tls: bool,
    /// The client's ID parameter list, re-serialized, for upstream.
    client_info: Option<String>,
}

impl fmt::Debug for ImapClientSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Buffers may hold a password: show sizes only.
        f.debug_struct("ImapClientSession")
            .field("state", &self.state.name())
            .field("in_tls", &self.in_tls)
            .field("buffered", &(self.framer.buf.len() + self.framer.msg.len()))
            .field("client_info", &self.client_info)
            .finish()
    }
}

fn tagged(tag: Option<&str>, text: &str) -> Vec<u8> {
    format!("{} {text}\r\n", tag.unwrap_or("*")).into_bytes()
}

/// An IMAP quoted string that any server accepts: 7-bit, `\` and `"`
/// escaped, other bytes replaced by `?`, at most 1024 characters (RFC 2971
/// limits ID values to 1024 octets).
fn quote(bytes: &[u8]) -> String {
    let mut out = String::from("\"");
    for c in String::from_utf8_lossy(bytes).chars().take(1024) {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            ' '..='~' => out.push(c),
            _ => out.push('?'),
        }
    }
    out.push('"');
    out
}

/// Re-serializes an ID parameter list as IMAP text for upstream: at most 30
/// pairs (RFC 2971), quoted strings only, `NIL` when empty.
fn render_id(params: Option<&[(IString<'_>, NString<'_>)]>) -> String {
    let Some(params) = params.filter(|p| !p.is_empty()) else {
        return "NIL".to_owned();
    };
    let items: Vec<String> = params
        .iter()
        .take(30)
        .map(|(k, v)| {
            let value = v.0.as_ref().map_or("NIL".to_owned(), |s| quote(s.as_ref()));
            format!("{} {value}", quote(k.as_ref()))
        })
        .collect();
    format!("({})", items.join(" "))
}

/// `TAG STARTTLS`, recognized by hand: imap-codec parses it only with its
/// `starttls` feature, which the crate does not enable.
fn starttls_tag(msg: &[u8]) -> Option<String> {
    let tag = tag_of(msg)?;
    msg[tag.len() + 1..]
        .eq_ignore_ascii_case(b"STARTTLS\r\n")
        .then_some(tag)
}

/// Why a command did not parse, as far as we can tell cheaply.
fn syntax_reason(msg: &[u8]) -> &'static str {
    let line = strip_eol(msg.split(|&b| b == b'\n').next().unwrap_or_default());
    let words: Vec<&[u8]> = line.split(|&b| b == b' ').collect();
    match words.get(1) {
        Some(cmd) if cmd.eq_ignore_ascii_case(b"AUTHENTICATE") => match words.get(3) {
            Some(ir) if *ir != b"=" && sasl::decode_base64(ir).is_err() => {
                "Initial response is not valid base64"
            }
            _ => "Invalid AUTHENTICATE arguments",
        },
        Some(cmd) if cmd.eq_ignore_ascii_case(b"LOGIN") => {
            "Invalid LOGIN arguments (use quoted strings or literals)"
        }
        _ => "Unknown command or syntax error",
    }
}

impl ImapClientSession {
    /// A new pre-auth session.
    pub fn new(opts: ClientOptions) -> Self {
        ImapClientSession {
            framer: Framer::new(opts.max_line, opts.max_literal),
            in_tls: opts.tls_active,
            opts,
            state: ClientState::Commands,
            client_info: None,
        }
    }

    fn login_allowed(&self) -> bool {
        self.in_tls || self.opts.plaintext_login_allowed
    }

    fn capabilities(&self) -> String {
        let mut caps = String::from("IMAP4rev1 SASL-IR LITERAL+ ID");
        if self.opts.starttls_offered && !self.in_tls {
            caps.push_str(" STARTTLS");
        }
        caps.push_str(if self.login_allowed() {
            " AUTH=PLAIN"
        } else {
            " LOGINDISABLED"
        });
        caps
    }

    fn privacy_required(tag: &str) -> ClientStep {
        ClientStep::Send(tagged(
            Some(tag),
            "NO [PRIVACYREQUIRED] Plaintext login is disabled; use STARTTLS first",
        ))
    }

    /// A login with checked credentials, or the refusal.
    fn login(&mut self, tag: String, creds: Result<sasl::Credentials, sasl::SaslError>) -> ClientStep {
        match creds {
            Ok(credentials) => {
                self.state = ClientState::LoginPending { tag };
                ClientStep::Login(LoginRequest {
                    credentials,
                    client_info: self.client_info.clone(),
                })
            }
            Err(e) => ClientStep::Send(tagged(
                Some(&tag),
                &format!("NO [AUTHENTICATIONFAILED] {}", one_line(&e.to_string(), "Invalid credentials")),
            )),
        }
    }

    fn starttls(&mut self, tag: String) -> ClientStep {
        if self.in_tls {
            return ClientStep::Send(tagged(Some(&tag), "BAD TLS is already active"));
        }
        if !self.opts.starttls_offered {
            return ClientStep::Send(tagged(Some(&tag), "BAD STARTTLS is not available here"));
        }
        // Whatever the client sent after STARTTLS is plaintext that must not
        // be taken as coming from inside TLS.
        self.framer.reset();
        self.state = ClientState::TlsPending;
        ClientStep::StartTls(tagged(Some(&tag), "OK Begin TLS negotiation now"))
    }

    fn command(&mut self, msg: &[u8]) -> ClientStep {
        if let Some(tag) = starttls_tag(msg) {
            return self.starttls(tag);
        }
        let cmd = match CommandCodec::new().decode(msg) {
            Ok((rest, cmd)) if rest.is_empty() => cmd,
            _ => {
                let tag = tag_of(msg);
                return ClientStep::Send(tagged(
                    tag.as_deref(),
                    &format!("BAD {}", syntax_reason(msg)),
                ));
            }
        };
        let tag = cmd.tag.inner().to_owned();
        match cmd.body {
            CommandBody::Capability => ClientStep::Send(
                format!(
                    "* CAPABILITY {}\r\n{tag} OK CAPABILITY completed\r\n",
                    self.capabilities()
                )
                .into_bytes(),
            ),
            CommandBody::Noop => ClientStep::Send(tagged(Some(&tag), "OK NOOP completed")),
            CommandBody::Logout => {
                self.state = ClientState::Closed;
                self.framer.reset();
                ClientStep::Close(
                    format!("* BYE mailbridge logging out\r\n{tag} OK LOGOUT completed\r\n")
                        .into_bytes(),
                )
            }
            CommandBody::Id { parameters } => {
                self.client_info = Some(render_id(parameters.as_deref()));
                ClientStep::Send(
                    format!("* ID (\"name\" \"mailbridge\")\r\n{tag} OK ID completed\r\n")
                        .into_bytes(),
                )
            }
            CommandBody::Login { username, password } => {
                if !self.login_allowed() {
                    return Self::privacy_required(&tag);
                }
                let creds =
                    sasl::login_credentials(username.as_ref(), password.declassify().as_ref());
                self.login(tag, creds)
            }
            CommandBody::Authenticate {
                mechanism,
                initial_response,
            } => {
                if !self.login_allowed() {
                    return Self::privacy_required(&tag);
                }
                if mechanism != AuthMechanism::Plain {
                    return ClientStep::Send(tagged(
                        Some(&tag),
                        "NO [CANNOT] Unsupported mechanism; only AUTHENTICATE PLAIN is available",
                    ));
                }
                match initial_response {
                    Some(ir) => {
                        let creds = sasl::decode_plain(ir.declassify());
                        self.login(tag, creds)
                    }
                    None => {
                        self.state = ClientState::AuthPlain { tag };
                        ClientStep::Send(b"+ \r\n".to_vec())
                    }
                }
            }
            other => ClientStep::Send(tagged(
                Some(&tag),
                &format!("BAD Log in first: {} is not available before login", other.name()),
            )),
        }
    }

    /// The client's response line to our `+ ` for AUTHENTICATE PLAIN.
    fn auth_response(&mut self, tag: String, line: &[u8]) -> ClientStep {
        self.state = ClientState::Commands;
        match AuthenticateDataCodec::new().decode(line) {
            Ok((rest, AuthenticateData::Continue(data))) if rest.is_empty() => {
                let creds = sasl::decode_plain(data.declassify());
                self.login(tag, creds)
            }
            Ok((rest, AuthenticateData::Cancel)) if rest.is_empty() => {
                ClientStep::Send(tagged(Some(&tag), "BAD AUTHENTICATE cancelled"))
            }
            _ => ClientStep::Send(tagged(
                Some(&tag),
                "BAD AUTHENTICATE response is not valid base64",
            )),
        }
    }
}

impl ClientSession for ImapClientSession {
    fn greeting(&mut self) -> Vec<u8> {
        format!("* OK [CAPABILITY {}] mailbridge ready\r\n", self.capabilities()).into_bytes()
    }

    fn feed(&mut self, data: &[u8]) {
        match self.state {
            // Bytes before the handshake are plaintext; after LOGOUT, noise.
            ClientState::TlsPending | ClientState::Closed => {}
            _ => self.framer.buf.extend_from_slice(data),
        }
    }

    fn next_step(&mut self) -> ClientStep {
        loop {
            let auth_tag = match &self.state {
                ClientState::Commands => None,
                ClientState::AuthPlain { tag } => Some(tag.clone()),
                _ => return ClientStep::NeedInput,
            };
            let frame = if auth_tag.is_some() {
                self.framer.next_raw_line()
            } else {
                self.framer.next_frame()
            };
            match (frame, auth_tag) {
                (Frame::NeedMore, _) => return ClientStep::NeedInput,
                (Frame::Message(mut line), Some(tag)) => {
                    let step = self.auth_response(tag, &line);
                    line.zeroize();
                    return step;
                }
                (Frame::Message(mut msg), None) => {
                    let step = self.command(&msg);
                    msg.zeroize();
                    return step;
                }
                (Frame::LineTooLong, Some(tag)) => {
                    self.state = ClientState::Commands;
                    return ClientStep::Send(tagged(
                        Some(&tag),
                        "BAD AUTHENTICATE response too long",
                    ));
                }
                (Frame::LineTooLong, None) => {
                    return ClientStep::Send(b"* BAD Command line too long\r\n".to_vec());
                }
                (Frame::Literal { sync: true }, _) => {
                    return ClientStep::Send(b"+ Ready for literal\r\n".to_vec());
                }
                (Frame::LiteralTooLarge { tag, .. }, _) => {
                    return ClientStep::Send(tagged(tag.as_deref(), "BAD Literal too large"));
                }
                (Frame::AbandonedSync { tag }, _) => {
                    return ClientStep::Send(tagged(tag.as_deref(), "BAD Command line too long"));
                }
                (Frame::Literal { sync: false } | Frame::Discarded, _) => {}
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

    fn login_succeeded(&mut self, upstream: &UpstreamSuccess) -> Vec<u8> {
        let ClientState::LoginPending { tag } = &self.state else {
            return Vec::new();
        };
        let tag = tag.clone();
        self.state = ClientState::LoggedIn;
        let caps: Vec<&str> = upstream
            .capabilities
            .iter()
            .map(String::as_str)
            .filter(|c| !c.is_empty() && c.bytes().all(|b| b.is_ascii_graphic() && b != b']'))
            .collect();
        if caps.is_empty() {
            tagged(Some(&tag), "OK Logged in")
        } else {
            tagged(
                Some(&tag),
                &format!("OK [CAPABILITY {}] Logged in", caps.join(" ")),
            )
        }
    }

    fn login_failed(&mut self, failure: &LoginFailure) -> Vec<u8> {
        let ClientState::LoginPending { tag } = &self.state else {
            return Vec::new();
        };
        let tag = tag.clone();
        self.state = ClientState::Commands;
        let code = match failure.kind {
            FailureKind::BadCredentials | FailureKind::Rejected => "AUTHENTICATIONFAILED",
            FailureKind::Throttled | FailureKind::Unavailable => "UNAVAILABLE",
        };
        let reason = one_line(&failure.reason, "Login failed");
        tagged(Some(&tag), &format!("NO [{code}] {reason}"))
    }

    fn take_pending(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.framer.buf)
    }

    fn timeout_message(&self) -> Vec<u8> {
        b"* BYE Autologout; idle for too long\r\n".to_vec()
    }
}

// ---------------------------------------------------------------------------
// Upstream side
// ---------------------------------------------------------------------------

/// Options of the upstream login dialogue.
#[derive(Debug, Clone)]
pub struct UpstreamOptions {
    /// Do STARTTLS after the greeting (false for implicit TLS).
    pub starttls: bool,
    /// Mechanisms in order of preference; the first one the server
    /// advertises is used.
    pub preference: Vec<Mechanism>,
    /// The client's ID parameter list to forward, e.g. `("name" "Thunderbird")`.
    pub client_id: Option<String>,
    /// Longest server line (and literal) accepted (default 64 KiB).
    pub max_line: usize,
}

impl Default for UpstreamOptions {
    fn default() -> Self {
        UpstreamOptions {
            starttls: false,
            preference: vec![Mechanism::Xoauth2, Mechanism::Oauthbearer],
            client_id: None,
            max_line: DEFAULT_LIMIT,
        }
    }
}

/// A server response, as far as the login dialogue cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Continue,
    Ok,
    No,
    Bad,
    Bye,
    PreAuth,
    Data,
}

#[derive(Debug)]
struct Parsed {
    kind: Kind,
    /// The tag of a tagged status response.
    tag: Option<String>,
    /// Capabilities from `* CAPABILITY` or a `[CAPABILITY ...]` code.
    caps: Option<Vec<String>>,
}

fn kind_of(kind: StatusKind) -> Kind {
    match kind {
        StatusKind::Ok => Kind::Ok,
        StatusKind::No => Kind::No,
        StatusKind::Bad => Kind::Bad,
    }
}

fn code_caps(code: Option<&Code<'_>>) -> Option<Vec<String>> {
    match code {
        Some(Code::Capability(caps)) => Some(caps.as_ref().iter().map(|c| c.to_string()).collect()),
        _ => None,
    }
}

fn words(bytes: &[u8]) -> Vec<String> {
    bytes
        .split(|&b| b == b' ')
        .filter(|w| !w.is_empty())
        .map(|w| String::from_utf8_lossy(w).into_owned())
        .collect()
}

/// Splits off the first space-separated word.
fn split_word(bytes: &[u8]) -> (&[u8], &[u8]) {
    match bytes.iter().position(|&b| b == b' ') {
        Some(i) => (&bytes[..i], &bytes[i + 1..]),
        None => (bytes, &[]),
    }
}

/// A tolerant reading for lines imap-codec refuses (servers are not always
/// strict): classification by the first words, capabilities by splitting.
fn parse_loosely(msg: &[u8]) -> Parsed {
    let line = strip_eol(msg);
    let (first, rest) = split_word(line);
    if first.first() == Some(&b'+') {
        return Parsed {
            kind: Kind::Continue,
            tag: None,
            caps: None,
        };
    }
    let (word, after) = split_word(rest);
    let upper = word.to_ascii_uppercase();
    let kind = match upper.as_slice() {
        b"OK" => Kind::Ok,
        b"NO" => Kind::No,
        b"BAD" => Kind::Bad,
        b"BYE" => Kind::Bye,
        b"PREAUTH" => Kind::PreAuth,
        _ => Kind::Data,
    };
    let caps = if upper == b"CAPABILITY" {
        Some(words(after))
    } else if kind != Kind::Data && after.len() > 12 && after[..12].eq_ignore_ascii_case(b"[CAPABILITY ") {
        let inner = &after[12..];
        let end = inner.iter().position(|&b| b == b']').unwrap_or(inner.len());
        Some(words(&inner[..end]))
    } else {
        None
    };
    let tag = (first != b"*").then(|| String::from_utf8_lossy(first).into_owned());
    Parsed { kind, tag, caps }
}

fn parse_response(msg: &[u8]) -> Parsed {
    let Ok((rest, resp)) = ResponseCodec::new().decode(msg) else {
        return parse_loosely(msg);
    };
    if !rest.is_empty() {
        return parse_loosely(msg);
    }
    match resp {
        Response::CommandContinuationRequest(_) => Parsed {
            kind: Kind::Continue,
            tag: None,
            caps: None,
        },
        Response::Status(Status::Tagged(t)) => Parsed {
            kind: kind_of(t.body.kind),
            tag: Some(t.tag.inner().to_owned()),
            caps: code_caps(t.body.code.as_ref()),
        },
        Response::Status(Status::Untagged(b)) => Parsed {
            kind: kind_of(b.kind),
            tag: None,
            caps: code_caps(b.code.as_ref()),
        },
        Response::Status(Status::Bye(_)) => Parsed {
            kind: Kind::Bye,
            tag: None,
            caps: None,
        },
        Response::Data(Data::Capability(caps)) => Parsed {
            kind: Kind::Data,
            tag: None,
            caps: Some(caps.as_ref().iter().map(|c| c.to_string()).collect()),
        },
        Response::Data(_) => Parsed {
            kind: Kind::Data,
            tag: None,
            caps: None,
        },
    }
}

fn parse_greeting(msg: &[u8]) -> Parsed {
    match GreetingCodec::new().decode(msg) {
        Ok((rest, g)) if rest.is_empty() => Parsed {
            kind: match g.kind {
                GreetingKind::Ok => Kind::Ok,
                GreetingKind::PreAuth => Kind::PreAuth,
                GreetingKind::Bye => Kind::Bye,
            },
            tag: None,
            caps: code_caps(g.code.as_ref()),
        },
        _ => parse_loosely(msg),
    }
}

/// The server's words after the tag (or `*` / `+`), for messages.
fn server_text(msg: &[u8]) -> String {
    let (_, rest) = split_word(strip_eol(msg));
    one_line(&String::from_utf8_lossy(rest), "(no text)")
}

fn unexpected(what: &str, msg: &[u8]) -> UpstreamError {
    UpstreamError::Unexpected(format!(
        "{what}: {}",
        one_line(&String::from_utf8_lossy(strip_eol(msg)), "(empty line)")
    ))
}

enum UpState {
    /// Waiting for the greeting.
    Greeting,
    /// Sent CAPABILITY; `after_auth` when the login already succeeded.
    Capability {
        tag: String,
        collected: Vec<String>,
        after_auth: bool,
    },
    /// Sent STARTTLS.
    StartTls { tag: String },
    /// Emitted `StartTls`; waiting for `tls_started`.
    TlsHandshake,
    /// Sent ID; its answer does not matter.
    Id { tag: String },
    /// Emitted `NeedToken`.
    WaitToken,
    /// Sent AUTHENTICATE.
    Auth {
        tag: String,
        mech: Mechanism,
        /// The response still to send after the server's `+` (no SASL-IR).
        pending: Option<SecretString>,
        /// The failure challenge, once the server sent one and we answered.
        challenge: Option<Option<FailureChallenge>>,
        /// `* CAPABILITY` seen during authentication.
        caps: Option<Vec<String>>,
    },
    /// Emitted `Rejected`; `retry` may start over.
    Rejected,
    /// Emitted `Authenticated`.
    Done,
    /// Returned an error.
    Failed,
}

impl UpState {
    fn name(&self) -> &'static str {
        match self {
            UpState::Greeting => "greeting",
            UpState::Capability { .. } => "capability",
            UpState::StartTls { .. } => "starttls",
            UpState::TlsHandshake => "tls-handshake",
            UpState::Id { .. } => "id",
            UpState::WaitToken => "wait-token",
            UpState::Auth { .. } => "authenticate",
            UpState::Rejected => "rejected",
            UpState::Done => "done",
            UpState::Failed => "failed",
        }
    }
}

/// mailbridge's login to the real IMAP server: greeting, capabilities,
/// optional STARTTLS and ID, then AUTHENTICATE XOAUTH2 or OAUTHBEARER with
/// the failure challenge absorbed. Tags are `mb1`, `mb2`, ...
pub struct ImapUpstreamLogin {
    opts: UpstreamOptions,
    framer: Framer,
    state: UpState,
    /// Steps decided but not yet handed out (may hold the token: never
    /// printed).
    queue: VecDeque<UpstreamStep>,
    /// The number of the next tag.
    next_tag: u32,
    /// The server's current (pre-auth) capabilities.
    caps: Vec<String>,
    tls_done: bool,
    id_sent: bool,
    /// The mechanism chosen, once known.
    mech: Option<Mechanism>,
}

impl fmt::Debug for ImapUpstreamLogin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ImapUpstreamLogin")
            .field("state", &self.state.name())
            .field("caps", &self.caps)
            .field("mech", &self.mech)
            .field("queued_steps", &self.queue.len())
            .finish()
    }
}

impl ImapUpstreamLogin {
    /// A new login dialogue; feed it the server's bytes from the start.
    pub fn new(opts: UpstreamOptions) -> Self {
        ImapUpstreamLogin {
            framer: Framer::new(opts.max_line, opts.max_line),
            opts,
            state: UpState::Greeting,
            queue: VecDeque::new(),
            next_tag: 1,
            caps: Vec::new(),
            tls_done: false,
            id_sent: false,
            mech: None,
        }
    }

    fn tag(&mut self) -> String {
        let tag = format!("mb{}", self.next_tag);
        self.next_tag += 1;
        tag
    }

    fn has_cap(&self, name: &str) -> bool {
        self.caps.iter().any(|c| c.eq_ignore_ascii_case(name))
    }

    fn send(&mut self, line: String) {
        self.queue.push_back(UpstreamStep::Send(line.into_bytes()));
    }

    fn ask_capabilities(&mut self, after_auth: bool) {
        let tag = self.tag();
        self.send(format!("{tag} CAPABILITY\r\n"));
        self.state = UpState::Capability {
            tag,
            collected: Vec::new(),
            after_auth,
        };
    }

    /// With the pre-auth capabilities known: STARTTLS, ID, then the token.
    fn proceed(&mut self) -> Result<(), UpstreamError> {
        if self.opts.starttls && !self.tls_done {
            if !self.has_cap("STARTTLS") {
                return Err(UpstreamError::NoStartTls);
            }
            let tag = self.tag();
            self.send(format!("{tag} STARTTLS\r\n"));
            self.state = UpState::StartTls { tag };
            return Ok(());
        }
        if !self.id_sent && self.has_cap("ID") {
            let id = self
                .opts
                .client_id
                .as_deref()
                .map(str::trim)
                .filter(|id| !id.is_empty() && !id.bytes().any(|b| b == b'\r' || b == b'\n'))
                .map(str::to_owned);
            if let Some(id) = id {
                self.id_sent = true;
                let tag = self.tag();
                self.send(format!("{tag} ID {id}\r\n"));
                self.state = UpState::Id { tag };
                return Ok(());
            }
        }
        let mech = self
            .opts
            .preference
            .iter()
            .copied()
            .find(|m| self.has_cap(&format!("AUTH={}", m.name())));
        let Some(mech) = mech else {
            let offered: Vec<&str> = self
                .caps
                .iter()
                .filter(|c| c.len() > 5 && c[..5].eq_ignore_ascii_case("AUTH="))
                .map(String::as_str)
                .collect();
            return Err(UpstreamError::NoMechanism(if offered.is_empty() {
                "no AUTH= mechanisms".to_owned()
            } else {
                offered.join(" ")
            }));
        };
        self.mech = Some(mech);
        self.state = UpState::WaitToken;
        self.queue.push_back(UpstreamStep::NeedToken);
        Ok(())
    }

    fn finish(&mut self, capabilities: Vec<String>) {
        self.state = UpState::Done;
        let leftover = std::mem::take(&mut self.framer.buf);
        self.queue
            .push_back(UpstreamStep::Authenticated(UpstreamSuccess {
                capabilities,
                leftover,
            }));
    }

    /// One complete server message in the current state.
    fn handle(&mut self, msg: &[u8]) -> Result<(), UpstreamError> {
        if matches!(self.state, UpState::Greeting) {
            let p = parse_greeting(msg);
            return match p.kind {
                Kind::Ok if p.tag.is_none() => match p.caps {
                    Some(caps) => {
                        self.caps = caps;
                        self.proceed()
                    }
                    None => {
                        self.ask_capabilities(false);
                        Ok(())
                    }
                },
                Kind::PreAuth => Err(unexpected(
                    "the server greeted with PREAUTH, so it cannot be logged in to",
                    msg,
                )),
                Kind::Bye => Err(unexpected("the server refused the connection", msg)),
                _ => Err(unexpected("not an IMAP greeting", msg)),
            };
        }
        let p = parse_response(msg);
        if p.kind == Kind::Bye {
            return Err(unexpected("the server closed the session", msg));
        }
        let ours = |tag: &str| p.tag.as_deref() == Some(tag);
        match &mut self.state {
            UpState::Capability {
                tag,
                collected,
                after_auth,
            } => {
                if p.tag.is_none() {
                    if let Some(caps) = p.caps {
                        *collected = caps;
                    } else if p.kind == Kind::Continue {
                        return Err(unexpected("unexpected continuation request", msg));
                    }
                    return Ok(());
                }
                if !ours(tag) {
                    return Err(unexpected("response with an unknown tag", msg));
                }
                if p.kind != Kind::Ok {
                    return Err(unexpected("CAPABILITY failed", msg));
                }
                let caps = match p.caps {
                    Some(caps) if collected.is_empty() => caps,
                    _ => std::mem::take(collected),
                };
                if *after_auth {
                    self.finish(caps);
                    Ok(())
                } else {
                    self.caps = caps;
                    self.proceed()
                }
            }
            UpState::StartTls { tag } => {
                if p.tag.is_none() {
                    if p.kind == Kind::Continue {
                        return Err(unexpected("unexpected continuation request", msg));
                    }
                    return Ok(());
                }
                if !ours(tag) {
                    return Err(unexpected("response with an unknown tag", msg));
                }
                if p.kind != Kind::Ok {
                    return Err(unexpected("the server refused STARTTLS", msg));
                }
                // Bytes after the OK arrived in plaintext: never trust them.
                self.framer.reset();
                self.state = UpState::TlsHandshake;
                self.queue.push_back(UpstreamStep::StartTls);
                Ok(())
            }
            UpState::Id { tag } => {
                if p.tag.is_none() {
                    if p.kind == Kind::Continue {
                        return Err(unexpected("unexpected continuation request", msg));
                    }
                    return Ok(());
                }
                if !ours(tag) {
                    return Err(unexpected("response with an unknown tag", msg));
                }
                // OK, NO or BAD: ID is a courtesy, its outcome changes nothing.
                self.proceed()
            }
            UpState::Auth {
                tag,
                mech,
                pending,
                challenge,
                caps,
            } => {
                if p.kind == Kind::Continue {
                    if let Some(resp) = pending.take() {
                        let line = format!("{}\r\n", resp.expose_secret());
                        self.queue.push_back(UpstreamStep::Send(line.into_bytes()));
                        return Ok(());
                    }
                    if challenge.is_some() {
                        return Err(unexpected(
                            "a second challenge after the failure challenge",
                            msg,
                        ));
                    }
                    let (_, data) = split_word(strip_eol(msg));
                    *challenge = Some(sasl::parse_failure_challenge(data));
                    // The exchange only ends once we answer the challenge.
                    let ack: &[u8] = match mech {
                        Mechanism::Xoauth2 => b"\r\n",
                        Mechanism::Oauthbearer => b"AQ==\r\n",
                    };
                    self.queue.push_back(UpstreamStep::Send(ack.to_vec()));
                    return Ok(());
                }
                if p.tag.is_none() {
                    if p.kind == Kind::Data && p.caps.is_some() {
                        *caps = p.caps;
                    }
                    return Ok(());
                }
                if !ours(tag) {
                    return Err(unexpected("response with an unknown tag", msg));
                }
                if p.kind == Kind::Ok {
                    match p.caps.or_else(|| caps.take()) {
                        Some(caps) => self.finish(caps),
                        None => self.ask_capabilities(true),
                    }
                    return Ok(());
                }
                let challenge = challenge.take().flatten();
                let retry_suggested = challenge
                    .as_ref()
                    .is_some_and(FailureChallenge::suggests_retry);
                self.state = UpState::Rejected;
                self.queue.push_back(UpstreamStep::Rejected(Rejection {
                    challenge,
                    server_text: server_text(msg),
                    retry_suggested,
                }));
                Ok(())
            }
            UpState::Greeting
            | UpState::TlsHandshake
            | UpState::WaitToken
            | UpState::Rejected
            | UpState::Done
            | UpState::Failed => Ok(()),
        }
    }
}

impl UpstreamLogin for ImapUpstreamLogin {
    fn feed(&mut self, data: &[u8]) {
        match self.state {
            // Plaintext bytes before the handshake must not be trusted.
            UpState::TlsHandshake => {}
            _ => self.framer.buf.extend_from_slice(data),
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
                UpState::TlsHandshake | UpState::WaitToken | UpState::Rejected | UpState::Done => {
                    return Ok(UpstreamStep::NeedInput);
                }
                _ => {}
            }
            let result = match self.framer.next_frame() {
                Frame::NeedMore => return Ok(UpstreamStep::NeedInput),
                Frame::Message(mut msg) => {
                    let r = self.handle(&msg);
                    msg.zeroize();
                    r
                }
                Frame::Literal { .. } | Frame::Discarded => Ok(()),
                Frame::LineTooLong | Frame::LiteralTooLarge { .. } | Frame::AbandonedSync { .. } => {
                    Err(UpstreamError::LineTooLong(self.opts.max_line))
                }
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
            self.caps.clear();
            self.framer.reset();
            self.ask_capabilities(false);
        }
    }

    fn provide_token(&mut self, token: &BearerToken) {
        if !matches!(self.state, UpState::WaitToken) {
            return;
        }
        let Some(mech) = self.mech else {
            return;
        };
        let response = match mech {
            Mechanism::Xoauth2 => sasl::xoauth2_response(token),
            Mechanism::Oauthbearer => sasl::oauthbearer_response(token),
        };
        let tag = self.tag();
        let pending = if self.has_cap("SASL-IR") {
            let line = format!(
                "{tag} AUTHENTICATE {} {}\r\n",
                mech.name(),
                response.expose_secret()
            );
            self.queue.push_back(UpstreamStep::Send(line.into_bytes()));
            None
        } else {
            self.send(format!("{tag} AUTHENTICATE {}\r\n", mech.name()));
            Some(response)
        };
        self.state = UpState::Auth {
            tag,
            mech,
            pending,
            challenge: None,
            caps: None,
        };
    }

    fn retry(&mut self) {
        if matches!(self.state, UpState::Rejected) {
            self.state = UpState::WaitToken;
            self.queue.push_back(UpstreamStep::NeedToken);
        }
    }
}
