//! IMAP: client-facing pre-auth session and upstream login dialogue.
//!
//! Both halves first split the byte stream into whole IMAP messages (a line
//! plus the literals it announces, with their continuation lines) under size
//! limits (`crate::framer`), and only then hand a complete message to
//! imap-codec. Literal
//! handling stays exact (we alone decide when a client gets `+`), and a
//! malformed or oversized message is dropped on its real boundaries, so
//! literal bytes are never mistaken for a command.

use std::collections::VecDeque;
use std::fmt;

use imap_codec::decode::Decoder;
use imap_codec::imap_types::auth::{AuthMechanism, AuthenticateData};
use imap_codec::imap_types::command::CommandBody;
use imap_codec::imap_types::core::{IString, NString};
use imap_codec::imap_types::response::{Code, Data, GreetingKind, Response, Status, StatusKind};
use imap_codec::{AuthenticateDataCodec, CommandCodec, GreetingCodec, ResponseCodec};
use secrecy::zeroize::Zeroize;

use super::{
    Advertised, ClientSession, ClientStep, FailureKind, LoginFailure, LoginRequest, UpstreamError,
    UpstreamLogin, UpstreamStep, UpstreamSuccess,
};
use crate::bearer::{Bearer, InitialResponse, Offer};
use crate::framer::{Frame, Framer, LiteralEvent, Literals};
use crate::refusal::{ImapStatus, Refusal};
use crate::sasl::{self, BearerToken, Mechanism};
use crate::text::{one_line, strip_eol};
use crate::unexpected;

/// Default line and literal limit: 64 KiB is far above any real pre-auth
/// command (RFC 7162 asks servers to accept 8 KiB lines) and keeps the
/// memory a stranger can make us hold small.
const DEFAULT_LIMIT: usize = 64 * 1024;

// ---------------------------------------------------------------------------
// Tags
// ---------------------------------------------------------------------------

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
    /// Sent the `Username:` prompt of AUTHENTICATE LOGIN.
    AuthLoginUser { tag: String },
    /// Sent the `Password:` prompt; holds the decoded user name (wiped on
    /// drop, never printed).
    AuthLoginPass {
        tag: String,
        user: sasl::PendingUser,
    },
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
            ClientState::AuthLoginUser { .. } => "authenticate-login-user",
            ClientState::AuthLoginPass { .. } => "authenticate-login-password",
            ClientState::TlsPending => "tls-pending",
            ClientState::LoginPending { .. } => "login-pending",
            ClientState::LoggedIn => "logged-in",
            ClientState::Closed => "closed",
        }
    }
}

/// The IMAP server side until login: greeting, CAPABILITY, ID, STARTTLS,
/// LOGIN and AUTHENTICATE PLAIN and LOGIN (with or without a SASL-IR
/// initial response; the LOGIN prompts are exactly `+ VXNlcm5hbWU6` and
/// `+ UGFzc3dvcmQ6`, `*` cancels); everything else is refused until login.
///
/// Over-limit input: a line over `max_line` gets `* BAD Command line too
/// long` and is dropped up to its line ending (a sync literal announced at
/// its end also gets a tagged BAD, a non-sync one is skipped). A literal
/// over `max_literal`: `{n}` gets `TAG BAD Literal too large` and no `+`;
/// `{n+}` gets the same reply, then exactly n bytes and the rest of that
/// command are skipped, so the session stays in step with the client.
///
/// Memory: the message being assembled never exceeds `max_line +
/// max_literal`; unframed input is whatever the driver fed and has not yet
/// drained with `next_step` (one read buffer when the driver alternates
/// `feed` and `next_step` until `NeedInput`). While a login is pending the
/// session does not consume input: a driver that keeps reading then holds
/// the client's pipelined bytes for `take_pending`.
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
            .field("buffered", &self.framer.buffered())
            .field("client_info", &self.client_info)
            .finish()
    }
}

/// A continuation request carrying a SASL challenge (base64).
fn prompt(challenge: &str) -> ClientStep {
    ClientStep::Send(format!("+ {challenge}\r\n").into_bytes())
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

/// Re-serializes an ID parameter list as IMAP text for upstream: at most 28
/// pairs (RFC 2971 allows 30; the upstream login adds mailbridge's two),
/// quoted strings only, `NIL` when empty.
fn render_id(params: Option<&[(IString<'_>, NString<'_>)]>) -> String {
    let Some(params) = params.filter(|p| !p.is_empty()) else {
        return "NIL".to_owned();
    };
    let items: Vec<String> = params
        .iter()
        .take(28)
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

/// Whether a (partial) command is a LOGIN.
fn is_login(msg: &[u8]) -> bool {
    let mut words = msg.split(|&b| b == b' ');
    words.next();
    words
        .next()
        .is_some_and(|w| w.eq_ignore_ascii_case(b"LOGIN"))
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
            framer: Framer::messages(
                opts.max_line,
                Literals {
                    max_literal: opts.max_literal,
                    label: tag_of,
                },
            ),
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
            " AUTH=PLAIN AUTH=LOGIN"
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
    fn login(
        &mut self,
        tag: String,
        creds: Result<sasl::Credentials, sasl::SaslError>,
    ) -> ClientStep {
        match creds {
            Ok(credentials) => {
                self.state = ClientState::LoginPending { tag };
                ClientStep::Login(LoginRequest {
                    credentials,
                    client_info: self.client_info.clone(),
                    by_address: false,
                })
            }
            Err(e) => ClientStep::Send(tagged(
                Some(&tag),
                &format!(
                    "NO [AUTHENTICATIONFAILED] {}",
                    one_line(&e.to_string(), "Invalid credentials")
                ),
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
            Ok(([], cmd)) => cmd,
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
                match (mechanism, initial_response) {
                    (AuthMechanism::Plain, Some(ir)) => {
                        let creds = sasl::decode_plain(ir.declassify());
                        self.login(tag, creds)
                    }
                    (AuthMechanism::Plain, None) => {
                        self.state = ClientState::AuthPlain { tag };
                        ClientStep::Send(b"+ \r\n".to_vec())
                    }
                    // SASL-IR: the initial response is the user name (`=`,
                    // an empty one, fails once the password is in, as a
                    // LOGIN without a name would).
                    (AuthMechanism::Login, Some(ir)) => {
                        let user = sasl::PendingUser::new(ir.declassify().to_vec());
                        self.state = ClientState::AuthLoginPass { tag, user };
                        prompt(sasl::LOGIN_PROMPT_PASSWORD)
                    }
                    (AuthMechanism::Login, None) => {
                        self.state = ClientState::AuthLoginUser { tag };
                        prompt(sasl::LOGIN_PROMPT_USER)
                    }
                    _ => ClientStep::Send(tagged(
                        Some(&tag),
                        "NO [CANNOT] Unsupported mechanism; use AUTHENTICATE PLAIN or LOGIN",
                    )),
                }
            }
            other => ClientStep::Send(tagged(
                Some(&tag),
                &format!(
                    "BAD Log in first: {} is not available before login",
                    other.name()
                ),
            )),
        }
    }

    /// The client's response line to our `+ ` prompt of AUTHENTICATE
    /// PLAIN or LOGIN (the state says which); `*` cancels the exchange.
    fn auth_response(&mut self, line: &[u8]) -> ClientStep {
        let state = std::mem::replace(&mut self.state, ClientState::Commands);
        let (ClientState::AuthPlain { tag }
        | ClientState::AuthLoginUser { tag }
        | ClientState::AuthLoginPass { tag, .. }) = &state
        else {
            self.state = state;
            return ClientStep::NeedInput;
        };
        let tag = tag.clone();
        let data = match AuthenticateDataCodec::new().decode(line) {
            Ok(([], AuthenticateData::Continue(data))) => data,
            Ok(([], AuthenticateData::Cancel)) => {
                return ClientStep::Send(tagged(Some(&tag), "BAD AUTHENTICATE cancelled"));
            }
            _ => {
                return ClientStep::Send(tagged(
                    Some(&tag),
                    "BAD AUTHENTICATE response is not valid base64",
                ));
            }
        };
        let mut data = data.declassify().to_vec();
        let step = match state {
            ClientState::AuthLoginUser { tag } => {
                let user = sasl::PendingUser::new(std::mem::take(&mut data));
                self.state = ClientState::AuthLoginPass { tag, user };
                prompt(sasl::LOGIN_PROMPT_PASSWORD)
            }
            ClientState::AuthLoginPass { tag, user } => {
                let creds = user.with_password(&data);
                self.login(tag, creds)
            }
            _ => {
                let creds = sasl::decode_plain(&data);
                self.login(tag, creds)
            }
        };
        data.zeroize();
        step
    }
}

impl ClientSession for ImapClientSession {
    fn greeting(&mut self) -> Vec<u8> {
        format!(
            "* OK [CAPABILITY {}] mailbridge ready\r\n",
            self.capabilities()
        )
        .into_bytes()
    }

    fn feed(&mut self, data: &[u8]) {
        match self.state {
            // Bytes before the handshake are plaintext; after LOGOUT, noise.
            ClientState::TlsPending | ClientState::Closed => {}
            _ => self.framer.push(data),
        }
    }

    fn next_step(&mut self) -> ClientStep {
        let auth_tag = match &self.state {
            ClientState::Commands => None,
            ClientState::AuthPlain { tag }
            | ClientState::AuthLoginUser { tag }
            | ClientState::AuthLoginPass { tag, .. } => Some(tag.clone()),
            _ => return ClientStep::NeedInput,
        };
        let frame = if auth_tag.is_some() {
            self.framer.next_line()
        } else {
            self.framer.next()
        };
        match (frame, auth_tag) {
            (Frame::NeedMore, _) => ClientStep::NeedInput,
            (Frame::Message(mut line), Some(_)) => {
                let step = self.auth_response(&line);
                line.zeroize();
                step
            }
            (Frame::Message(mut msg), None) => {
                let step = self.command(&msg);
                msg.zeroize();
                step
            }
            (Frame::LineTooLong, Some(tag)) => {
                self.state = ClientState::Commands;
                ClientStep::Send(tagged(Some(&tag), "BAD AUTHENTICATE response too long"))
            }
            (Frame::LineTooLong, None) => {
                ClientStep::Send(b"* BAD Command line too long\r\n".to_vec())
            }
            (Frame::Literal(LiteralEvent::Sync), _) => {
                let msg = self.framer.partial_message();
                if !self.login_allowed() && is_login(msg) {
                    // Refuse before the client sends a password in clear.
                    let tag = tag_of(msg).unwrap_or_else(|| "*".into());
                    self.framer.refuse_literal();
                    return Self::privacy_required(&tag);
                }
                ClientStep::Send(b"+ Ready for literal\r\n".to_vec())
            }
            (Frame::Literal(LiteralEvent::TooLarge { label }), _) => {
                ClientStep::Send(tagged(label.as_deref(), "BAD Literal too large"))
            }
            (Frame::Literal(LiteralEvent::AbandonedSync { label }), _) => {
                ClientStep::Send(tagged(label.as_deref(), "BAD Command line too long"))
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
        self.framer.take()
    }

    fn timeout_message(&self) -> Vec<u8> {
        b"* BYE Autologout; idle for too long\r\n".to_vec()
    }

    fn shutdown_message(&self) -> Vec<u8> {
        b"* BYE [UNAVAILABLE] mailbridge is shutting down; connect again shortly\r\n".to_vec()
    }

    fn goodbye(&self, reason: &str) -> Vec<u8> {
        format!(
            "* BYE [UNAVAILABLE] {}\r\n",
            one_line(reason, "Closing connection")
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
    /// Do STARTTLS after the greeting (false for implicit TLS).
    pub starttls: bool,
    /// Mechanisms in order of preference; the first one the server
    /// advertises is used.
    pub preference: Vec<Mechanism>,
    /// The client's ID parameter list to forward, e.g. `("name" "Thunderbird")`.
    pub client_id: Option<String>,
    /// mailbridge's own name and version, sent in ID when the server
    /// offers it (RFC 2971; the open public-client profile wants clients
    /// to say who they are): as `name` / `version` when the client sent no
    /// ID, else after the client's pairs as `x-proxy-name` /
    /// `x-proxy-version`, the client's name staying the primary one.
    pub software: Option<(String, String)>,
    /// Longest server line (and literal) accepted (default 64 KiB).
    pub max_line: usize,
}

impl Default for UpstreamOptions {
    fn default() -> Self {
        UpstreamOptions {
            starttls: false,
            preference: vec![Mechanism::Xoauth2, Mechanism::Oauthbearer],
            client_id: None,
            software: None,
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
    } else if kind != Kind::Data
        && after.len() > 12
        && after[..12].eq_ignore_ascii_case(b"[CAPABILITY ")
    {
        let inner = &after[12..];
        let end = inner.iter().position(|&b| b == b']').unwrap_or(inner.len());
        Some(words(&inner[..end]))
    } else {
        None
    };
    let tag = (first != b"*").then(|| String::from_utf8_lossy(first).into_owned());
    Parsed { kind, tag, caps }
}

/// Capabilities as the server spelled them: imap-codec normalises known
/// ones (`IMAP4rev1` becomes `IMAP4REV1`), so once it has validated the
/// line, take the words from the line itself.
fn raw_caps(msg: &[u8], parsed: Option<Vec<String>>) -> Option<Vec<String>> {
    parsed.map(|caps| parse_loosely(msg).caps.unwrap_or(caps))
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
            caps: raw_caps(msg, code_caps(t.body.code.as_ref())),
        },
        Response::Status(Status::Untagged(b)) => Parsed {
            kind: kind_of(b.kind),
            tag: None,
            caps: raw_caps(msg, code_caps(b.code.as_ref())),
        },
        Response::Status(Status::Bye(_)) => Parsed {
            kind: Kind::Bye,
            tag: None,
            caps: None,
        },
        Response::Data(Data::Capability(caps)) => Parsed {
            kind: Kind::Data,
            tag: None,
            caps: raw_caps(
                msg,
                Some(caps.as_ref().iter().map(|c| c.to_string()).collect()),
            ),
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
        Ok(([], g)) => Parsed {
            kind: match g.kind {
                GreetingKind::Ok => Kind::Ok,
                GreetingKind::PreAuth => Kind::PreAuth,
                GreetingKind::Bye => Kind::Bye,
            },
            tag: None,
            caps: raw_caps(msg, code_caps(g.code.as_ref())),
        },
        _ => parse_loosely(msg),
    }
}

/// A tagged response other than OK, as a refusal.
fn refusal(kind: Kind, msg: &[u8]) -> Refusal {
    let status = match kind {
        Kind::No => ImapStatus::No,
        Kind::Bad => ImapStatus::Bad,
        _ => ImapStatus::Other,
    };
    let (_, after_tag) = split_word(strip_eol(msg));
    Refusal::imap(status, after_tag)
}

/// Reads a refusal the way the upstream login does, from a tagged
/// response without its tag (`NO [AUTHENTICATIONFAILED] Invalid
/// credentials`); None unless it is a NO or a BAD.
pub fn parse_refusal(response: &str) -> Option<Refusal> {
    let line = format!("mb1 {response}");
    let kind = parse_loosely(line.as_bytes()).kind;
    matches!(kind, Kind::No | Kind::Bad).then(|| refusal(kind, line.as_bytes()))
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
    /// The bearer login (waiting for a token, AUTHENTICATE sent, or
    /// rejected).
    Login {
        /// The tag of the AUTHENTICATE command, once sent.
        tag: String,
        /// `* CAPABILITY` seen during authentication.
        caps: Option<Vec<String>>,
    },
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
            UpState::Login { .. } => "login",
            UpState::Done => "done",
            UpState::Failed => "failed",
        }
    }
}

/// mailbridge's login to the real IMAP server: greeting, capabilities,
/// optional STARTTLS and ID, then AUTHENTICATE XOAUTH2 or OAUTHBEARER
/// (`crate::bearer`; with SASL-IR when the server announces it) with the
/// failure challenge absorbed. ID is pipelined with AUTHENTICATE: its
/// answer is not waited for (RFC 2971 allows ID in any state, and the
/// server answers in order), so it costs no round trip. Tags are `mb1`,
/// `mb2`, ...
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
    /// The tag of the ID command sent, until its tagged answer (whatever
    /// it says) has been read and set aside.
    id_tag: Option<String>,
    /// The bearer login: mechanism, token, challenge, retry.
    bearer: Bearer,
    /// The greeting was accepted.
    greeted: bool,
    /// The `AUTH=` mechanisms of the capabilities the login chose from.
    offered: Option<Vec<String>>,
}

impl fmt::Debug for ImapUpstreamLogin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match self.state {
            UpState::Login { .. } => self.bearer.state_name(),
            _ => self.state.name(),
        };
        f.debug_struct("ImapUpstreamLogin")
            .field("state", &state)
            .field("caps", &self.caps)
            .field("mech", &self.bearer.mechanism())
            .field("queued_steps", &self.queue.len())
            .finish()
    }
}

impl ImapUpstreamLogin {
    /// A new login dialogue; feed it the server's bytes from the start.
    pub fn new(opts: UpstreamOptions) -> Self {
        ImapUpstreamLogin {
            // Server literals (in `* ID`, say) are bounded like lines.
            framer: Framer::messages(
                opts.max_line,
                Literals {
                    max_literal: opts.max_line,
                    label: tag_of,
                },
            ),
            state: UpState::Greeting,
            queue: VecDeque::new(),
            next_tag: 1,
            caps: Vec::new(),
            tls_done: false,
            id_sent: false,
            id_tag: None,
            bearer: Bearer::new(opts.preference.clone()),
            greeted: false,
            offered: None,
            opts,
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

    /// With the pre-auth capabilities known: STARTTLS, then ID and the
    /// token at once.
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
        if !self.id_sent
            && self.has_cap("ID")
            && let Some(id) = self.id_parameters()
        {
            self.id_sent = true;
            let tag = self.tag();
            self.send(format!("{tag} ID {id}\r\n"));
            self.id_tag = Some(tag);
        }
        // `AUTH=XOAUTH2` and the like.
        let auth_caps: Vec<&str> = self
            .caps
            .iter()
            .filter(|c| c.get(..5).is_some_and(|p| p.eq_ignore_ascii_case("AUTH=")))
            .map(String::as_str)
            .collect();
        let names: Vec<&str> = auth_caps.iter().map(|c| &c[5..]).collect();
        self.offered = Some(names.iter().map(|n| n.to_string()).collect());
        let Some(step) = self.bearer.choose(Offer::Listed(&names)) else {
            return Err(UpstreamError::NoMechanism {
                allowed: self.bearer.allowed(),
                offered: if auth_caps.is_empty() {
                    "no AUTH= mechanisms".to_owned()
                } else {
                    auth_caps.join(" ")
                },
            });
        };
        self.state = UpState::Login {
            tag: String::new(),
            caps: None,
        };
        self.queue.push_back(step);
        Ok(())
    }

    /// The ID parameter list to send: the client's pairs, then ours; ours
    /// alone when the client sent none; None when there is neither.
    fn id_parameters(&self) -> Option<String> {
        let client = self
            .opts
            .client_id
            .as_deref()
            .map(str::trim)
            .filter(|id| !id.is_empty() && !id.bytes().any(|b| b == b'\r' || b == b'\n'));
        // The client's list as the client session rendered it: `NIL` or
        // `("k" "v" ...)`, at most 28 pairs so ours fit in RFC 2971's 30.
        let client_pairs = client
            .and_then(|id| id.strip_prefix('(')?.strip_suffix(')'))
            .map(str::trim)
            .filter(|pairs| !pairs.is_empty());
        let ours = self
            .opts
            .software
            .as_ref()
            .map(|(name, version)| (quote(name.as_bytes()), quote(version.as_bytes())));
        match (client_pairs, ours) {
            (Some(pairs), Some((name, version))) => Some(format!(
                "({pairs} \"x-proxy-name\" {name} \"x-proxy-version\" {version})"
            )),
            (None, Some((name, version))) => {
                Some(format!("(\"name\" {name} \"version\" {version})"))
            }
            (_, None) => client.map(str::to_owned),
        }
    }

    fn finish(&mut self, capabilities: Vec<String>) {
        self.state = UpState::Done;
        let leftover = self.framer.take();
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
            self.greeted = p.kind == Kind::Ok && p.tag.is_none();
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
        // The pipelined ID's answer: OK, NO or BAD, ID is a courtesy and its
        // outcome changes nothing.
        if p.tag.is_some() && p.tag == self.id_tag {
            self.id_tag = None;
            return Ok(());
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
            UpState::Login { .. } if !self.bearer.awaits_server() => Ok(()),
            UpState::Login { tag, caps } => {
                if p.kind == Kind::Continue {
                    let (_, data) = split_word(strip_eol(msg));
                    let step = self
                        .bearer
                        .continuation(data)
                        .map_err(|what| unexpected(what, msg))?;
                    self.queue.push_back(step);
                    return Ok(());
                }
                if p.tag.is_none() {
                    if p.caps.is_some() {
                        *caps = p.caps;
                    }
                    return Ok(());
                }
                if !ours(tag) {
                    return Err(unexpected("response with an unknown tag", msg));
                }
                if p.kind == Kind::Ok {
                    self.bearer.succeeded();
                    match p.caps.or_else(|| caps.take()) {
                        Some(caps) => self.finish(caps),
                        None => self.ask_capabilities(true),
                    }
                    return Ok(());
                }
                let step = self.bearer.refused(refusal(p.kind, msg));
                self.queue.push_back(step);
                Ok(())
            }
            UpState::Greeting | UpState::TlsHandshake | UpState::Done | UpState::Failed => Ok(()),
        }
    }
}

impl UpstreamLogin for ImapUpstreamLogin {
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
                UpState::Login { .. } if !self.bearer.awaits_server() => {
                    return Ok(UpstreamStep::NeedInput);
                }
                _ => {}
            }
            let result = match self.framer.next() {
                Frame::NeedMore => return Ok(UpstreamStep::NeedInput),
                Frame::Message(mut msg) => {
                    let r = self.handle(&msg);
                    msg.zeroize();
                    r
                }
                // A server's literal needs no go-ahead: it just follows.
                Frame::Literal(LiteralEvent::Sync) => Ok(()),
                Frame::LineTooLong
                | Frame::Literal(
                    LiteralEvent::TooLarge { .. } | LiteralEvent::AbandonedSync { .. },
                ) => Err(UpstreamError::LineTooLong(self.opts.max_line)),
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
        if !matches!(self.state, UpState::Login { .. }) || !self.bearer.waits_for_token() {
            return;
        }
        let tag = self.tag();
        let form = if self.has_cap("SASL-IR") {
            InitialResponse::Always
        } else {
            InitialResponse::Never
        };
        let step = self
            .bearer
            .provide_token(token, form, |mech, response| match response {
                Some(r) => format!("{tag} AUTHENTICATE {} {r}\r\n", mech.name()),
                None => format!("{tag} AUTHENTICATE {}\r\n", mech.name()),
            });
        self.queue.extend(step);
        self.state = UpState::Login { tag, caps: None };
    }

    fn retry(&mut self) {
        if matches!(self.state, UpState::Login { .. }) {
            self.queue.extend(self.bearer.retry());
        }
    }

    fn farewell(&self) -> crate::farewell::Reader {
        crate::farewell::imap
    }

    fn advertised(&self) -> Advertised {
        Advertised {
            greeted: self.greeted,
            starttls: self.tls_done || self.has_cap("STARTTLS"),
            tls_started: self.tls_done,
            mechanisms: self.offered.clone(),
            chosen: self.bearer.mechanism(),
        }
    }

    fn logout(&self) -> &'static [u8] {
        LOGOUT
    }
}

/// Ends an IMAP session in any state (RFC 9051 section 6.1.3).
pub const LOGOUT: &[u8] = b"mb0 LOGOUT\r\n";

#[cfg(test)]
mod tests {
    use super::*;

    // ----- client side -----

    use crate::testkit::{Ev, b64, drive, login, out, pump, run_both_ways, s};

    fn open() -> ClientOptions {
        ClientOptions {
            plaintext_login_allowed: true,
            ..ClientOptions::default()
        }
    }

    fn run(opts: ClientOptions, input: &[u8]) -> (ImapClientSession, Vec<Ev>) {
        run_both_ways(|| ImapClientSession::new(opts.clone()), input)
    }

    #[test]
    fn greetings_and_capabilities() {
        let mut sess = ImapClientSession::new(open());
        assert_eq!(
            s(&sess.greeting()),
            "* OK [CAPABILITY IMAP4rev1 SASL-IR LITERAL+ ID AUTH=PLAIN AUTH=LOGIN] mailbridge ready\r\n"
        );
        let mut sess = ImapClientSession::new(ClientOptions {
            starttls_offered: true,
            ..ClientOptions::default()
        });
        assert_eq!(
            s(&sess.greeting()),
            "* OK [CAPABILITY IMAP4rev1 SASL-IR LITERAL+ ID STARTTLS LOGINDISABLED] mailbridge ready\r\n"
        );
        let mut sess = ImapClientSession::new(ClientOptions {
            tls_active: true,
            ..ClientOptions::default()
        });
        assert_eq!(
            s(&sess.greeting()),
            "* OK [CAPABILITY IMAP4rev1 SASL-IR LITERAL+ ID AUTH=PLAIN AUTH=LOGIN] mailbridge ready\r\n"
        );
        let (_, evs) = run(open(), b"c1 capability\r\nc2 NOOP\r\n");
        assert_eq!(
            evs,
            [out(
                "* CAPABILITY IMAP4rev1 SASL-IR LITERAL+ ID AUTH=PLAIN AUTH=LOGIN\r\nc1 OK CAPABILITY completed\r\nc2 OK NOOP completed\r\n"
            )]
        );
    }

    #[test]
    fn login_atom_then_success_reply() {
        let (mut sess, evs) = run(open(), b"a1 LOGIN alice s3cret\r\n");
        assert_eq!(evs, [login("alice", "s3cret", None)]);
        assert!(matches!(sess.next_step(), ClientStep::NeedInput));
        let up = UpstreamSuccess {
            capabilities: vec!["IMAP4rev1".into(), "IDLE".into(), "bad]cap".into()],
            leftover: Vec::new(),
        };
        assert_eq!(
            s(&sess.login_succeeded(&up)),
            "a1 OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n"
        );
        assert!(matches!(sess.next_step(), ClientStep::NeedInput));
    }

    #[test]
    fn login_success_without_capabilities() {
        let (mut sess, _) = run(open(), b"a1 login alice pw\r\n");
        assert_eq!(
            s(&sess.login_succeeded(&UpstreamSuccess::default())),
            "a1 OK Logged in\r\n"
        );
    }

    #[test]
    fn login_quoted_with_escapes() {
        let (_, evs) = run(open(), b"a2 LOGIN \"al ice@x\" \"p\\\"w\\\\d\"\r\n");
        assert_eq!(evs, [login("al ice@x", "p\"w\\d", None)]);
    }

    #[test]
    fn login_sync_literals_get_continuations() {
        let (_, evs) = run(open(), b"a3 LOGIN {5}\r\nalice {7}\r\npa ss\"w\r\n");
        assert_eq!(
            evs,
            [
                out("+ Ready for literal\r\n+ Ready for literal\r\n"),
                login("alice", "pa ss\"w", None)
            ]
        );
    }

    #[test]
    fn login_nonsync_literals_get_no_continuation() {
        let (_, evs) = run(open(), b"a4 LOGIN {5+}\r\nalice {6+}\r\nsecret\r\n");
        assert_eq!(evs, [login("alice", "secret", None)]);
    }

    #[test]
    fn login_mixed_forms() {
        let (_, evs) = run(open(), b"a5 LOGIN \"alice\" {6}\r\nsecret\r\n");
        assert_eq!(
            evs,
            [
                out("+ Ready for literal\r\n"),
                login("alice", "secret", None)
            ]
        );
        let (_, evs) = run(open(), b"a6 LOGIN {5+}\r\nalice pw\r\n");
        assert_eq!(evs, [login("alice", "pw", None)]);
        // 8-bit text is not an atom: it must come as a literal.
        let (_, evs) = run(open(), "a7 LOGIN j\u{f6}rg pw\r\n".as_bytes());
        assert_eq!(
            evs,
            [out(
                "a7 BAD Invalid LOGIN arguments (use quoted strings or literals)\r\n"
            )]
        );
        let (_, evs) = run(
            open(),
            "a7 LOGIN {5}\r\nj\u{f6}rg {5}\r\np\u{e4}ss\r\n".as_bytes(),
        );
        assert_eq!(
            evs,
            [
                out("+ Ready for literal\r\n+ Ready for literal\r\n"),
                login("j\u{f6}rg", "p\u{e4}ss", None)
            ]
        );
    }

    #[test]
    fn login_refusals_keep_session_usable() {
        let (_, evs) = run(open(), b"a1 LOGIN \"\" pw\r\na2 LOGIN\r\na3 NOOP\r\n");
        assert_eq!(
            evs,
            [out(
                "a1 NO [AUTHENTICATIONFAILED] the user name is empty\r\n\
                 a2 BAD Invalid LOGIN arguments (use quoted strings or literals)\r\n\
                 a3 OK NOOP completed\r\n"
            )]
        );
    }

    #[test]
    fn authenticate_plain_with_initial_response() {
        let input = format!("x1 AUTHENTICATE PLAIN {}\r\n", b64(b"\0alice\0s3cret"));
        let (_, evs) = run(open(), input.as_bytes());
        assert_eq!(evs, [login("alice", "s3cret", None)]);
        let input = format!("x1 authenticate plain {}\r\n", b64(b"alice\0alice\0s3cret"));
        let (_, evs) = run(open(), input.as_bytes());
        assert_eq!(evs, [login("alice", "s3cret", None)]);
    }

    #[test]
    fn authenticate_plain_with_continuation() {
        let input = format!("x2 AUTHENTICATE PLAIN\r\n{}\r\n", b64(b"\0bob\0pw"));
        let (_, evs) = run(open(), input.as_bytes());
        assert_eq!(evs, [out("+ \r\n"), login("bob", "pw", None)]);
    }

    #[test]
    fn authenticate_cancel_and_errors() {
        let (_, evs) = run(open(), b"x3 AUTHENTICATE PLAIN\r\n*\r\nx4 NOOP\r\n");
        assert_eq!(
            evs,
            [out(
                "+ \r\nx3 BAD AUTHENTICATE cancelled\r\nx4 OK NOOP completed\r\n"
            )]
        );
        let (_, evs) = run(open(), b"x5 AUTHENTICATE PLAIN\r\n!!notb64\r\n");
        assert_eq!(
            evs,
            [out(
                "+ \r\nx5 BAD AUTHENTICATE response is not valid base64\r\n"
            )]
        );
        let (_, evs) = run(open(), b"x6 AUTHENTICATE PLAIN AGVs!G8=\r\n");
        assert_eq!(
            evs,
            [out("x6 BAD Initial response is not valid base64\r\n")]
        );
        let (_, evs) = run(open(), b"x7 AUTHENTICATE PLAIN =\r\n");
        assert_eq!(
            evs,
            [out(
                "x7 NO [AUTHENTICATIONFAILED] the PLAIN message is malformed (expected authzid NUL user NUL password)\r\n"
            )]
        );
        let input = format!("x8 AUTHENTICATE PLAIN {}\r\n", b64(b"eve\0alice\0pw"));
        let (_, evs) = run(open(), input.as_bytes());
        assert_eq!(
            evs,
            [out(
                "x8 NO [AUTHENTICATIONFAILED] logging in as another user (a different authorization identity) is not supported\r\n"
            )]
        );
        let (_, evs) = run(
            open(),
            b"x9 AUTHENTICATE CRAM-MD5\r\nx10 AUTHENTICATE XOAUTH2 AAAA\r\n",
        );
        assert_eq!(
            evs,
            [out(
                "x9 NO [CANNOT] Unsupported mechanism; use AUTHENTICATE PLAIN or LOGIN\r\n\
                 x10 NO [CANNOT] Unsupported mechanism; use AUTHENTICATE PLAIN or LOGIN\r\n"
            )]
        );
    }

    #[test]
    fn authenticate_login_with_prompts() {
        // curl and neomutt without SASL-IR: both prompts, exactly.
        let input = format!(
            "x1 AUTHENTICATE LOGIN\r\n{}\r\n{}\r\n",
            b64(b"alice@example.com"),
            b64(b"pa ss")
        );
        let (sess, evs) = run(open(), input.as_bytes());
        assert_eq!(
            evs,
            [
                out("+ VXNlcm5hbWU6\r\n+ UGFzc3dvcmQ6\r\n"),
                login("alice@example.com", "pa ss", None)
            ]
        );
        // The success reply carries the tag of the AUTHENTICATE command.
        let mut sess = sess;
        assert_eq!(
            s(&sess.login_succeeded(&UpstreamSuccess::default())),
            "x1 OK Logged in\r\n"
        );
    }

    #[test]
    fn authenticate_login_with_initial_response() {
        // SASL-IR: the user name on the command line, then one prompt.
        let input = format!(
            "x2 authenticate login {}\r\n{}\r\nx3 LIST \"\" *\r\n",
            b64(b"bob"),
            b64(b"s3cret")
        );
        let (mut sess, evs) = run(open(), input.as_bytes());
        assert_eq!(
            evs,
            [out("+ UGFzc3dvcmQ6\r\n"), login("bob", "s3cret", None)]
        );
        assert_eq!(s(&sess.take_pending()), "x3 LIST \"\" *\r\n");
        // `=` is an empty user name: refused once the password is in.
        let input = format!("x4 AUTHENTICATE LOGIN =\r\n{}\r\n", b64(b"pw"));
        let (_, evs) = run(open(), input.as_bytes());
        assert_eq!(
            evs,
            [out(
                "+ UGFzc3dvcmQ6\r\nx4 NO [AUTHENTICATIONFAILED] the user name is empty\r\n"
            )]
        );
    }

    #[test]
    fn authenticate_login_cancel_and_errors() {
        // `*` at either prompt cancels; the session stays usable.
        let input = format!(
            "a1 AUTHENTICATE LOGIN\r\n*\r\na2 AUTHENTICATE LOGIN {}\r\n*\r\na3 NOOP\r\n",
            b64(b"u")
        );
        let (_, evs) = run(open(), input.as_bytes());
        assert_eq!(
            evs,
            [out("+ VXNlcm5hbWU6\r\na1 BAD AUTHENTICATE cancelled\r\n\
                 + UGFzc3dvcmQ6\r\na2 BAD AUTHENTICATE cancelled\r\na3 OK NOOP completed\r\n")]
        );
        let input = format!(
            "b1 AUTHENTICATE LOGIN\r\n!!\r\nb2 AUTHENTICATE LOGIN\r\n{}\r\n@@\r\n\
             b3 AUTHENTICATE LOGIN AGVs!G8=\r\nb4 AUTHENTICATE LOGIN\r\n{}\r\n\r\n",
            b64(b"u"),
            b64(b"u")
        );
        let (_, evs) = run(open(), input.as_bytes());
        assert_eq!(
            evs,
            [out(
                "+ VXNlcm5hbWU6\r\nb1 BAD AUTHENTICATE response is not valid base64\r\n\
                 + VXNlcm5hbWU6\r\n+ UGFzc3dvcmQ6\r\nb2 BAD AUTHENTICATE response is not valid base64\r\n\
                 b3 BAD Initial response is not valid base64\r\n\
                 + VXNlcm5hbWU6\r\n+ UGFzc3dvcmQ6\r\nb4 NO [AUTHENTICATIONFAILED] the password is empty\r\n"
            )]
        );
        // Not before TLS when plaintext login is off.
        let (_, evs) = run(
            ClientOptions {
                starttls_offered: true,
                ..ClientOptions::default()
            },
            b"c1 AUTHENTICATE LOGIN\r\n",
        );
        assert_eq!(
            evs,
            [out(
                "c1 NO [PRIVACYREQUIRED] Plaintext login is disabled; use STARTTLS first\r\n"
            )]
        );
    }

    #[test]
    fn authenticate_login_response_too_long() {
        let mut sess = ImapClientSession::new(small());
        let input = format!(
            "t1 AUTHENTICATE LOGIN\r\n{}\r\nt2 NOOP\r\n",
            "A".repeat(200)
        );
        let evs = drive(&mut sess, input.as_bytes(), usize::MAX);
        assert_eq!(
            evs,
            [out(
                "+ VXNlcm5hbWU6\r\nt1 BAD AUTHENTICATE response too long\r\nt2 OK NOOP completed\r\n"
            )]
        );
    }

    #[test]
    fn debug_hides_authenticate_login_user() {
        let mut sess = ImapClientSession::new(open());
        let input = format!(
            "a1 AUTHENTICATE LOGIN {}\r\n{}",
            b64(b"secret-user"),
            b64(b"hunter2")
        );
        sess.feed(input.as_bytes());
        let mut evs = Vec::new();
        pump(&mut sess, &mut evs);
        assert_eq!(evs, [out("+ UGFzc3dvcmQ6\r\n")]);
        let dbg = format!("{sess:?}");
        assert!(dbg.contains("authenticate-login-password"), "{dbg}");
        assert!(
            !dbg.contains("secret-user") && !dbg.contains(&b64(b"secret-user")),
            "{dbg}"
        );
        assert!(
            !dbg.contains("hunter2") && !dbg.contains(&b64(b"hunter2")),
            "{dbg}"
        );
    }

    #[test]
    fn id_then_login_carries_client_info() {
        let (_, evs) = run(
            open(),
            b"i1 ID (\"name\" \"Thunderbird\" \"version\" \"115.0\")\r\ni2 LOGIN u p\r\n",
        );
        assert_eq!(
            evs,
            [
                out("* ID (\"name\" \"mailbridge\")\r\ni1 OK ID completed\r\n"),
                login(
                    "u",
                    "p",
                    Some("(\"name\" \"Thunderbird\" \"version\" \"115.0\")")
                )
            ]
        );
        let (_, evs) = run(open(), b"i1 ID NIL\r\ni2 LOGIN u p\r\n");
        assert_eq!(evs[1], login("u", "p", Some("NIL")));
        let (_, evs) = run(
            open(),
            b"i1 ID (\"name\" {4}\r\nq\"\\x \"os\" NIL)\r\ni2 LOGIN u p\r\n",
        );
        assert_eq!(
            evs[1],
            login("u", "p", Some("(\"name\" \"q\\\"\\\\x\" \"os\" NIL)"))
        );
    }

    #[test]
    fn logindisabled_until_starttls() {
        let opts = ClientOptions {
            starttls_offered: true,
            ..ClientOptions::default()
        };
        let mut sess = ImapClientSession::new(opts);
        let evs = drive(
            &mut sess,
            b"a1 LOGIN u p\r\na2 AUTHENTICATE PLAIN\r\na3 STARTTLS\r\n",
            usize::MAX,
        );
        assert_eq!(
            evs,
            [
                out(
                    "a1 NO [PRIVACYREQUIRED] Plaintext login is disabled; use STARTTLS first\r\n\
                     a2 NO [PRIVACYREQUIRED] Plaintext login is disabled; use STARTTLS first\r\n"
                ),
                Ev::StartTls("a3 OK Begin TLS negotiation now\r\n".into())
            ]
        );
        sess.tls_started();
        let evs = drive(
            &mut sess,
            b"b1 CAPABILITY\r\nb2 STARTTLS\r\nb3 LOGIN u p\r\n",
            usize::MAX,
        );
        assert_eq!(
            evs,
            [
                out(
                    "* CAPABILITY IMAP4rev1 SASL-IR LITERAL+ ID AUTH=PLAIN AUTH=LOGIN\r\nb1 OK CAPABILITY completed\r\n\
                     b2 BAD TLS is already active\r\n"
                ),
                login("u", "p", None)
            ]
        );
    }

    #[test]
    fn login_literal_refused_before_password_when_disabled() {
        let opts = ClientOptions {
            starttls_offered: true,
            ..ClientOptions::default()
        };
        let (_, evs) = run(opts, b"a1 LOGIN alice {6}\r\na2 NOOP\r\n");
        assert_eq!(
            evs,
            [out(
                "a1 NO [PRIVACYREQUIRED] Plaintext login is disabled; use STARTTLS first\r\n\
                 a2 OK NOOP completed\r\n"
            )]
        );
    }

    #[test]
    fn starttls_discards_buffered_input() {
        let opts = ClientOptions {
            starttls_offered: true,
            ..ClientOptions::default()
        };
        let mut sess = ImapClientSession::new(opts.clone());
        let evs = drive(
            &mut sess,
            b"s1 STARTTLS\r\na1 LOGIN evil pw\r\n",
            usize::MAX,
        );
        assert_eq!(
            evs,
            [Ev::StartTls("s1 OK Begin TLS negotiation now\r\n".into())]
        );
        sess.feed(b"a2 LOGIN evil pw\r\n");
        assert!(matches!(sess.next_step(), ClientStep::NeedInput));
        sess.tls_started();
        assert!(matches!(sess.next_step(), ClientStep::NeedInput));
        assert!(sess.take_pending().is_empty());
        // Byte at a time: the same.
        let mut slow = ImapClientSession::new(opts);
        assert_eq!(
            drive(&mut slow, b"s1 STARTTLS\r\na1 LOGIN evil pw\r\n", 1),
            evs
        );
    }

    #[test]
    fn starttls_refused_when_not_offered() {
        let (_, evs) = run(open(), b"s1 starttls\r\n");
        assert_eq!(evs, [out("s1 BAD STARTTLS is not available here\r\n")]);
        let (_, evs) = run(
            ClientOptions {
                tls_active: true,
                starttls_offered: true,
                ..ClientOptions::default()
            },
            b"s1 STARTTLS\r\n",
        );
        assert_eq!(evs, [out("s1 BAD TLS is already active\r\n")]);
    }

    #[test]
    fn pipelined_bytes_after_login_are_pending() {
        let input = b"a1 LOGIN u p\r\na2 SELECT INBOX\r\na3 FETCH 1 (BODY[] {3}\r\n";
        let (mut sess, evs) = run(open(), input);
        assert_eq!(evs, [login("u", "p", None)]);
        sess.feed(b"more");
        assert!(matches!(sess.next_step(), ClientStep::NeedInput));
        let reply = sess.login_succeeded(&UpstreamSuccess::default());
        assert_eq!(s(&reply), "a1 OK Logged in\r\n");
        assert_eq!(
            s(&sess.take_pending()),
            "a2 SELECT INBOX\r\na3 FETCH 1 (BODY[] {3}\r\nmore"
        );
    }

    #[test]
    fn pipelined_bytes_after_authenticate_continuation() {
        let input = format!(
            "a1 AUTHENTICATE PLAIN\r\n{}\r\na2 LIST \"\" *\r\n",
            b64(b"\0u\0p")
        );
        let (mut sess, evs) = run(open(), input.as_bytes());
        assert_eq!(evs, [out("+ \r\n"), login("u", "p", None)]);
        assert_eq!(s(&sess.take_pending()), "a2 LIST \"\" *\r\n");
    }

    #[test]
    fn login_failure_replies() {
        let (mut sess, _) = run(open(), b"a1 LOGIN u p\r\n");
        let reply = sess.login_failed(&LoginFailure {
            kind: FailureKind::BadCredentials,
            reason: "Wrong password\r\nx9 OK injected".into(),
            upstream_reply: None,
        });
        assert_eq!(
            s(&reply),
            "a1 NO [AUTHENTICATIONFAILED] Wrong password  x9 OK injected\r\n"
        );
        let evs = drive(&mut sess, b"a2 LOGIN u p2\r\n", usize::MAX);
        assert_eq!(evs, [login("u", "p2", None)]);
        let reply = sess.login_failed(&LoginFailure {
            kind: FailureKind::Throttled,
            reason: "Too many failures; try again in 60 s".into(),
            upstream_reply: None,
        });
        assert_eq!(
            s(&reply),
            "a2 NO [UNAVAILABLE] Too many failures; try again in 60 s\r\n"
        );
        drive(&mut sess, b"a3 LOGIN u p\r\n", usize::MAX);
        let reply = sess.login_failed(&LoginFailure {
            kind: FailureKind::Rejected,
            reason: String::new(),
            upstream_reply: None,
        });
        assert_eq!(s(&reply), "a3 NO [AUTHENTICATIONFAILED] Login failed\r\n");
        drive(&mut sess, b"a4 LOGIN u p\r\n", usize::MAX);
        let reply = sess.login_failed(&LoginFailure {
            kind: FailureKind::Unavailable,
            reason: "Server unreachable".into(),
            upstream_reply: None,
        });
        assert_eq!(s(&reply), "a4 NO [UNAVAILABLE] Server unreachable\r\n");
        // Not pending: nothing to say.
        assert!(
            sess.login_failed(&LoginFailure {
                kind: FailureKind::Rejected,
                reason: "x".into(),
                upstream_reply: None,
            })
            .is_empty()
        );
    }

    fn small() -> ClientOptions {
        ClientOptions {
            plaintext_login_allowed: true,
            max_line: 64,
            max_literal: 32,
            ..ClientOptions::default()
        }
    }

    #[test]
    fn overlong_line_is_refused_once_and_skipped() {
        let mut input = b"a1 NOOP ".to_vec();
        input.extend(std::iter::repeat_n(b'x', 500));
        input.extend(b"\r\na2 NOOP\r\n");
        let (_, evs) = run(small(), &input);
        assert_eq!(
            evs,
            [out(
                "* BAD Command line too long\r\na2 OK NOOP completed\r\n"
            )]
        );
        // Never holds more than the limit while discarding.
        let mut sess = ImapClientSession::new(small());
        for _ in 0..100 {
            sess.feed(&[b'y'; 100]);
            let _ = sess.next_step();
            assert!(sess.framer.buffered() <= 64 + 32 + 100);
        }
    }

    #[test]
    fn overlong_line_announcing_sync_literal_gets_tagged_bad() {
        let mut input = b"a1 LOGIN ".to_vec();
        input.extend(std::iter::repeat_n(b'x', 100));
        input.extend(b" {5}\r\na2 NOOP\r\n");
        let (_, evs) = run(small(), &input);
        assert_eq!(
            evs,
            [out(
                "* BAD Command line too long\r\na1 BAD Command line too long\r\na2 OK NOOP completed\r\n"
            )]
        );
        let mut input = b"a1 LOGIN ".to_vec();
        input.extend(std::iter::repeat_n(b'x', 100));
        input.extend(b" {9+}\r\na2 NOOP\r\n pw\r\na3 NOOP\r\n");
        let (_, evs) = run(small(), &input);
        assert_eq!(
            evs,
            [out(
                "* BAD Command line too long\r\na3 OK NOOP completed\r\n"
            )]
        );
    }

    #[test]
    fn overlong_sync_literal_gets_no_continuation() {
        let (_, evs) = run(small(), b"a1 LOGIN {33}\r\na2 NOOP\r\n");
        assert_eq!(
            evs,
            [out("a1 BAD Literal too large\r\na2 OK NOOP completed\r\n")]
        );
        let (_, evs) = run(
            small(),
            b"a1 LOGIN {99999999999999999999999}\r\na2 NOOP\r\n",
        );
        assert_eq!(
            evs,
            [out("a1 BAD Literal too large\r\na2 OK NOOP completed\r\n")]
        );
    }

    #[test]
    fn overlong_nonsync_literal_is_skipped_exactly() {
        let mut input = b"a1 LOGIN {40+}\r\n".to_vec();
        // Literal bytes that look like a command must not run.
        input.extend(b"a9 LOGIN evil pw\r\n0123456789012345678901");
        input.extend(b" pw\r\na2 NOOP\r\n");
        let (_, evs) = run(small(), &input);
        assert_eq!(
            evs,
            [out("a1 BAD Literal too large\r\na2 OK NOOP completed\r\n")]
        );
        // A second literal in the skipped command is skipped too.
        let mut input = b"a1 LOGIN {40+}\r\n".to_vec();
        input.extend([b'z'; 40]);
        input.extend(b" {14+}\r\nb1 LOGIN x y\r\n\r\na2 NOOP\r\n");
        let (_, evs) = run(small(), &input);
        assert_eq!(
            evs,
            [out("a1 BAD Literal too large\r\na2 OK NOOP completed\r\n")]
        );
    }

    #[test]
    fn literal_at_the_limit_is_accepted() {
        let mut input = b"a1 LOGIN u {32}\r\n".to_vec();
        input.extend([b'p'; 32]);
        input.extend(b"\r\n");
        let (_, evs) = run(small(), &input);
        assert_eq!(
            evs,
            [
                out("+ Ready for literal\r\n"),
                login("u", &"p".repeat(32), None)
            ]
        );
    }

    #[test]
    fn preauth_commands_are_refused_and_session_stays_usable() {
        let (_, evs) = run(
            open(),
            b"a1 SELECT INBOX\r\na2 FETCH 1:* (FLAGS)\r\ngarbage\r\n\r\na3 FROB\r\na4 NOOP\r\n",
        );
        assert_eq!(
            evs,
            [out(
                "a1 BAD Log in first: SELECT is not available before login\r\n\
                 a2 BAD Log in first: FETCH is not available before login\r\n\
                 * BAD Unknown command or syntax error\r\n\
                 * BAD Unknown command or syntax error\r\n\
                 a3 BAD Unknown command or syntax error\r\n\
                 a4 OK NOOP completed\r\n"
            )]
        );
        // APPEND with a sync literal: the literal is taken, then refused.
        let (_, evs) = run(open(), b"a5 APPEND INBOX {3}\r\nabc\r\na6 NOOP\r\n");
        assert_eq!(
            evs,
            [out(
                "+ Ready for literal\r\na5 BAD Log in first: APPEND is not available before login\r\na6 OK NOOP completed\r\n"
            )]
        );
    }

    #[test]
    fn logout_closes() {
        let (_, evs) = run(open(), b"z LOGOUT\r\nz2 NOOP\r\n");
        assert_eq!(
            evs,
            [Ev::Close(
                "* BYE mailbridge logging out\r\nz OK LOGOUT completed\r\n".into()
            )]
        );
        let sess = ImapClientSession::new(open());
        assert_eq!(
            s(&sess.timeout_message()),
            "* BYE Autologout; idle for too long\r\n"
        );
    }

    #[test]
    fn debug_hides_buffered_password() {
        let mut sess = ImapClientSession::new(open());
        sess.feed(b"a1 LOGIN u {20}\r\nhunter2hunter2");
        let _ = sess.next_step();
        let _ = sess.next_step();
        let dbg = format!("{sess:?}");
        assert!(!dbg.contains("hunter2"), "{dbg}");
    }

    #[test]
    fn mixed_script_byte_at_a_time() {
        let input = format!(
            "c CAPABILITY\r\ni ID (\"name\" \"mutt\")\r\nn1 NOOP\r\nx SELECT x\r\n\
             a AUTHENTICATE PLAIN\r\n*\r\nl LOGIN {{1}}\r\nu \"p w\"\r\nextra {}\r\n",
            "tail"
        );
        let (mut sess, evs) = run(open(), input.as_bytes());
        assert_eq!(
            evs.last(),
            Some(&login("u", "p w", Some("(\"name\" \"mutt\")")))
        );
        assert_eq!(s(&sess.take_pending()), "extra tail\r\n");
    }

    /// Deterministic pseudo-random input: no panic, bounded memory, the
    /// session always answers or asks for input.
    #[test]
    fn prop_random_input_never_panics() {
        let mut next = xorshift(0x2545_f491_4f6c_dd1d);
        let pieces: [&[u8]; 17] = [
            b"a LOGIN ",
            b"AUTHENTICATE LOGIN ",
            b"{5}\r\n",
            b"{3+}\r\n",
            b"\r\n",
            b"\"q\\\"\" ",
            b"AUTHENTICATE PLAIN ",
            b"*\r\n",
            b"AGEAYg==",
            b"STARTTLS\r\n",
            b"ID (",
            b"NIL)",
            b" ",
            b"{",
            b"}",
            b"\n",
            b"LOGOUT\r\n",
        ];
        for round in 0..300 {
            let mut input = Vec::new();
            for _ in 0..(next() % 40) {
                if next().is_multiple_of(3) {
                    input.extend((0..next() % 20).map(|_| next() as u8));
                } else {
                    input.extend(pieces[(next() % 17) as usize]);
                }
            }
            let opts = ClientOptions {
                starttls_offered: round % 2 == 0,
                plaintext_login_allowed: round % 3 != 0,
                max_line: 40,
                max_literal: 8,
                ..ClientOptions::default()
            };
            let mut a = ImapClientSession::new(opts.clone());
            let mut b = ImapClientSession::new(opts);
            let fast = drive(&mut a, &input, usize::MAX);
            let chunk = 1 + (next() % 7) as usize;
            let mut evs = Vec::new();
            for part in input.chunks(chunk) {
                b.feed(part);
                pump(&mut b, &mut evs);
                assert!(b.framer.partial_message().len() <= 48);
                if matches!(evs.last(), Some(Ev::StartTls(_))) {
                    b.tls_started();
                }
            }
            if !fast.iter().any(|e| matches!(e, Ev::StartTls(_))) {
                assert_eq!(fast, evs, "input {:?}", s(&input));
            }
        }
    }

    // ----- upstream side -----

    use crate::testkit::{
        Up, challenge_b64, ob, provide, run_script, send, token, up_feed, xo, xorshift,
    };

    fn caps(list: &str) -> Vec<String> {
        list.split(' ').map(str::to_owned).collect()
    }

    #[test]
    fn greeting_with_caps_and_sasl_ir() {
        let mut u = ImapUpstreamLogin::new(UpstreamOptions::default());
        assert_eq!(
            up_feed(
                &mut u,
                b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN AUTH=XOAUTH2] ready\r\n"
            ),
            [Up::NeedToken]
        );
        assert_eq!(
            provide(&mut u),
            [send(&format!("mb1 AUTHENTICATE XOAUTH2 {}\r\n", xo()))]
        );
        assert_eq!(
            up_feed(
                &mut u,
                b"* CAPABILITY IMAP4rev1 IDLE\r\nmb1 OK [CAPABILITY IMAP4rev1 IDLE MOVE] Success\r\n* 3 EXISTS\r\n* OK [UIDVALID"
            ),
            [Up::Ok(caps("IMAP4rev1 IDLE MOVE"), "* 3 EXISTS\r\n* OK [UIDVALID".into())]
        );
        assert_eq!(up_feed(&mut u, b"more"), []);
    }

    #[test]
    fn greeting_without_caps_asks() {
        let mut u = ImapUpstreamLogin::new(UpstreamOptions::default());
        assert_eq!(
            up_feed(&mut u, b"* OK Gimap ready\r\n"),
            [send("mb1 CAPABILITY\r\n")]
        );
        assert_eq!(
            up_feed(
                &mut u,
                b"* OK notice\r\n* CAPABILITY IMAP4rev1 auth=xoauth2 SASL-IR\r\nmb1 OK Thats all she wrote!\r\n"
            ),
            [Up::NeedToken]
        );
        assert_eq!(
            provide(&mut u),
            [send(&format!("mb2 AUTHENTICATE XOAUTH2 {}\r\n", xo()))]
        );
    }

    #[test]
    fn starttls_path() {
        let opts = UpstreamOptions {
            starttls: true,
            ..UpstreamOptions::default()
        };
        let mut u = ImapUpstreamLogin::new(opts.clone());
        assert_eq!(
            up_feed(
                &mut u,
                b"* OK [CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED] hi\r\n"
            ),
            [send("mb1 STARTTLS\r\n")]
        );
        assert_eq!(
            up_feed(
                &mut u,
                b"mb1 OK Begin TLS\r\n* CAPABILITY AUTH=XOAUTH2 SASL-IR\r\n"
            ),
            [Up::StartTls]
        );
        u.feed(b"junk before handshake\r\n");
        u.tls_started();
        assert_eq!(up_feed(&mut u, b""), [send("mb2 CAPABILITY\r\n")]);
        assert_eq!(
            up_feed(
                &mut u,
                b"* CAPABILITY IMAP4rev1 AUTH=XOAUTH2\r\nmb2 OK done\r\n"
            ),
            [Up::NeedToken]
        );
        // No SASL-IR after TLS: the pre-TLS list was discarded.
        assert_eq!(provide(&mut u), [send("mb3 AUTHENTICATE XOAUTH2\r\n")]);

        let mut u = ImapUpstreamLogin::new(opts.clone());
        assert_eq!(
            up_feed(&mut u, b"* OK [CAPABILITY IMAP4rev1 AUTH=XOAUTH2] hi\r\n"),
            [Up::Err("the server does not offer STARTTLS".into())]
        );
        let mut u = ImapUpstreamLogin::new(opts);
        up_feed(&mut u, b"* OK [CAPABILITY IMAP4rev1 STARTTLS] hi\r\n");
        let evs = up_feed(&mut u, b"mb1 BAD not now\r\n");
        assert!(matches!(&evs[..], [Up::Err(e)] if e.contains("refused STARTTLS")));
    }

    #[test]
    fn continuation_without_sasl_ir() {
        let mut u = ImapUpstreamLogin::new(UpstreamOptions::default());
        up_feed(&mut u, b"* OK [CAPABILITY IMAP4rev1 AUTH=XOAUTH2] hi\r\n");
        assert_eq!(provide(&mut u), [send("mb1 AUTHENTICATE XOAUTH2\r\n")]);
        assert!(!format!("{u:?}").contains(&xo()));
        assert_eq!(up_feed(&mut u, b"+ \r\n"), [send(&format!("{}\r\n", xo()))]);
        assert_eq!(
            up_feed(&mut u, b"mb1 OK [CAPABILITY IMAP4rev1 IDLE] ok\r\n"),
            [Up::Ok(caps("IMAP4rev1 IDLE"), String::new())]
        );
    }

    #[test]
    fn xoauth2_challenge_absorbed_then_retry() {
        let mut u = ImapUpstreamLogin::new(UpstreamOptions::default());
        up_feed(
            &mut u,
            b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=XOAUTH2] hi\r\n",
        );
        provide(&mut u);
        let ch = challenge_b64(
            r#"{"status":"401","schemes":"bearer","scope":"https://mail.google.com/"}"#,
        );
        assert_eq!(
            up_feed(&mut u, format!("+ {ch}\r\n").as_bytes()),
            [send("\r\n")]
        );
        assert_eq!(
            up_feed(
                &mut u,
                b"mb1 NO [AUTHENTICATIONFAILED] Invalid credentials (Failure)\r\n"
            ),
            [Up::Rejected {
                status: Some("401".into()),
                text: "NO [AUTHENTICATIONFAILED] Invalid credentials (Failure)".into(),
                retry: true
            }]
        );
        assert_eq!(up_feed(&mut u, b""), []);
        u.retry();
        assert_eq!(up_feed(&mut u, b""), [Up::NeedToken]);
        assert_eq!(
            provide(&mut u),
            [send(&format!("mb2 AUTHENTICATE XOAUTH2 {}\r\n", xo()))]
        );
        assert_eq!(
            up_feed(&mut u, b"mb2 OK [CAPABILITY IMAP4rev1] Success\r\n"),
            [Up::Ok(caps("IMAP4rev1"), String::new())]
        );
    }

    #[test]
    fn oauthbearer_challenge_acked_with_01() {
        let opts = UpstreamOptions {
            preference: vec![Mechanism::Oauthbearer, Mechanism::Xoauth2],
            ..UpstreamOptions::default()
        };
        let mut u = ImapUpstreamLogin::new(opts);
        up_feed(
            &mut u,
            b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=XOAUTH2 AUTH=OAUTHBEARER] hi\r\n",
        );
        assert_eq!(
            provide(&mut u),
            [send(&format!("mb1 AUTHENTICATE OAUTHBEARER {}\r\n", ob()))]
        );
        let ch = challenge_b64(r#"{"status":"invalid_token","openid-configuration":"https://x"}"#);
        assert_eq!(
            up_feed(&mut u, format!("+ {ch}\r\n").as_bytes()),
            [send("AQ==\r\n")]
        );
        assert_eq!(
            up_feed(&mut u, b"mb1 NO SASL authentication failed\r\n"),
            [Up::Rejected {
                status: Some("invalid_token".into()),
                text: "NO SASL authentication failed".into(),
                retry: true
            }]
        );
    }

    #[test]
    fn microsoft_direct_no() {
        let mut u = ImapUpstreamLogin::new(UpstreamOptions::default());
        up_feed(
            &mut u,
            b"* OK The Microsoft Exchange IMAP4 service is ready. [TQBOADIA]\r\n",
        );
        assert_eq!(
            up_feed(
                &mut u,
                b"* CAPABILITY IMAP4 IMAP4rev1 AUTH=PLAIN AUTH=XOAUTH2 SASL-IR UIDPLUS ID UNSELECT CHILDREN IDLE NAMESPACE LITERAL+\r\nmb1 OK CAPABILITY completed.\r\n"
            ),
            [Up::NeedToken]
        );
        provide(&mut u);
        assert_eq!(
            up_feed(&mut u, b"mb2 NO AUTHENTICATE failed.\r\n"),
            [Up::Rejected {
                status: None,
                text: "NO AUTHENTICATE failed.".into(),
                retry: false
            }]
        );
    }

    #[test]
    fn ok_without_caps_asks_capability() {
        let mut u = ImapUpstreamLogin::new(UpstreamOptions::default());
        up_feed(
            &mut u,
            b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=XOAUTH2] hi\r\n",
        );
        provide(&mut u);
        assert_eq!(
            up_feed(&mut u, b"mb1 OK Logged in\r\n"),
            [send("mb2 CAPABILITY\r\n")]
        );
        assert_eq!(
            up_feed(
                &mut u,
                b"* CAPABILITY IMAP4rev1 IDLE X-GM-EXT-1\r\nmb2 OK Success\r\nleft"
            ),
            [Up::Ok(caps("IMAP4rev1 IDLE X-GM-EXT-1"), "left".into())]
        );
    }

    #[test]
    fn caps_from_untagged_during_auth() {
        let mut u = ImapUpstreamLogin::new(UpstreamOptions::default());
        up_feed(
            &mut u,
            b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=XOAUTH2] hi\r\n",
        );
        provide(&mut u);
        assert_eq!(
            up_feed(
                &mut u,
                b"* CAPABILITY IMAP4rev1 ENABLE\r\nmb1 OK alice authenticated (Success)\r\n"
            ),
            [Up::Ok(caps("IMAP4rev1 ENABLE"), String::new())]
        );
    }

    #[test]
    fn id_forwarded_when_offered() {
        let opts = UpstreamOptions {
            client_id: Some("(\"name\" \"Thunderbird\")".into()),
            ..UpstreamOptions::default()
        };
        let mut u = ImapUpstreamLogin::new(opts.clone());
        assert_eq!(
            up_feed(
                &mut u,
                b"* OK [CAPABILITY IMAP4rev1 ID SASL-IR AUTH=XOAUTH2] hi\r\n"
            ),
            // Pipelined: the token is asked for without waiting for ID's
            // answer.
            [send("mb1 ID (\"name\" \"Thunderbird\")\r\n"), Up::NeedToken]
        );
        assert_eq!(
            provide(&mut u),
            [send(&format!("mb2 AUTHENTICATE XOAUTH2 {}\r\n", xo()))]
        );
        // ID's answer (a literal in it, whatever it says) comes first and
        // is set aside.
        assert_eq!(
            up_feed(
                &mut u,
                b"* ID (\"name\" {5}\r\nDove\" \"x\" NIL)\r\nmb1 OK ID completed\r\n\
                  mb2 OK [CAPABILITY IMAP4rev1 IDLE] done\r\n"
            ),
            [Up::Ok(caps("IMAP4rev1 IDLE"), String::new())]
        );
        // Refused or answered before the token is there: the same.
        let mut u = ImapUpstreamLogin::new(opts.clone());
        up_feed(
            &mut u,
            b"* OK [CAPABILITY IMAP4rev1 ID AUTH=XOAUTH2] hi\r\n",
        );
        assert_eq!(up_feed(&mut u, b"mb1 BAD no ID here\r\n"), []);
        assert_eq!(provide(&mut u), [send("mb2 AUTHENTICATE XOAUTH2\r\n")]);
        assert_eq!(up_feed(&mut u, b"+ \r\n"), [send(&format!("{}\r\n", xo()))]);
        // Not offered: no ID.
        let mut u = ImapUpstreamLogin::new(opts);
        assert_eq!(
            up_feed(&mut u, b"* OK [CAPABILITY IMAP4rev1 AUTH=XOAUTH2] hi\r\n"),
            [Up::NeedToken]
        );
    }

    #[test]
    fn id_names_mailbridge_after_the_client() {
        let first_line = |client_id: Option<&str>| {
            let mut u = ImapUpstreamLogin::new(UpstreamOptions {
                client_id: client_id.map(str::to_owned),
                software: Some(("mailbridge".into(), "1.2.3".into())),
                ..UpstreamOptions::default()
            });
            let mut steps = up_feed(
                &mut u,
                b"* OK [CAPABILITY IMAP4rev1 ID SASL-IR AUTH=XOAUTH2] hi\r\n",
            );
            // ID, then the token asked for at once (pipelined).
            assert_eq!(steps.pop(), Some(Up::NeedToken));
            steps
        };
        assert_eq!(
            first_line(None),
            [send(
                "mb1 ID (\"name\" \"mailbridge\" \"version\" \"1.2.3\")\r\n"
            )]
        );
        assert_eq!(
            first_line(Some("NIL")),
            [send(
                "mb1 ID (\"name\" \"mailbridge\" \"version\" \"1.2.3\")\r\n"
            )]
        );
        assert_eq!(
            first_line(Some("(\"name\" \"Thunderbird\" \"version\" \"115.0\")")),
            [send(
                "mb1 ID (\"name\" \"Thunderbird\" \"version\" \"115.0\" \"x-proxy-name\" \"mailbridge\" \"x-proxy-version\" \"1.2.3\")\r\n"
            )]
        );
        // The client's list is cut so that ours fit in RFC 2971's 30 pairs.
        let mut pairs = String::from("ID (");
        for i in 0..40 {
            pairs.push_str(&format!("\"k{i}\" \"v\" "));
        }
        pairs.push(')');
        let (_, evs) = run(open(), format!("i1 {pairs}\r\ni2 LOGIN u p\r\n").as_bytes());
        let info = evs
            .iter()
            .find_map(|e| match e {
                Ev::Login { info, .. } => info.clone(),
                _ => None,
            })
            .expect("a login with client info");
        assert_eq!(info.matches("\"v\"").count(), 28, "{info}");
    }

    #[test]
    fn no_mechanism() {
        let mut u = ImapUpstreamLogin::new(UpstreamOptions::default());
        assert_eq!(
            up_feed(&mut u, b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN AUTH=LOGIN] hi\r\n"),
            [Up::Err(
                "the server offers neither XOAUTH2 nor OAUTHBEARER (it offers: AUTH=PLAIN AUTH=LOGIN)"
                    .into()
            )]
        );
        assert!(matches!(u.next_step(), Err(UpstreamError::Unexpected(_))));
        let opts = UpstreamOptions {
            preference: vec![Mechanism::Oauthbearer],
            ..UpstreamOptions::default()
        };
        let mut u = ImapUpstreamLogin::new(opts);
        let evs = up_feed(&mut u, b"* OK [CAPABILITY IMAP4rev1 AUTH=XOAUTH2] hi\r\n");
        assert!(matches!(&evs[..], [Up::Err(e)] if e.contains("AUTH=XOAUTH2")));
    }

    #[test]
    fn bad_greetings() {
        for (greeting, what) in [
            (
                &b"* BYE Too many connections\r\n"[..],
                "refused the connection",
            ),
            (b"* PREAUTH [CAPABILITY IMAP4rev1] welcome\r\n", "PREAUTH"),
            (b"+OK POP3 ready\r\n", "not an IMAP greeting"),
        ] {
            let mut u = ImapUpstreamLogin::new(UpstreamOptions::default());
            let evs = up_feed(&mut u, greeting);
            assert!(
                matches!(&evs[..], [Up::Err(e)] if e.contains(what)),
                "{evs:?}"
            );
        }
    }

    #[test]
    fn bye_during_login_is_an_error() {
        let mut u = ImapUpstreamLogin::new(UpstreamOptions::default());
        up_feed(
            &mut u,
            b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=XOAUTH2] hi\r\n",
        );
        provide(&mut u);
        let evs = up_feed(
            &mut u,
            b"* BYE Session invalidated - AccessTokenExpired\r\n",
        );
        assert!(matches!(&evs[..], [Up::Err(e)] if e.contains("AccessTokenExpired")));
    }

    #[test]
    fn long_server_line() {
        let opts = UpstreamOptions {
            max_line: 64,
            ..UpstreamOptions::default()
        };
        let mut u = ImapUpstreamLogin::new(opts);
        let mut line = b"* OK ".to_vec();
        line.extend([b'x'; 100]);
        assert_eq!(
            up_feed(&mut u, &line),
            [Up::Err(
                "the server sent a line longer than 64 bytes".into()
            )]
        );
    }

    #[test]
    fn loose_parsing_fallback_keeps_capabilities() {
        let mut u = ImapUpstreamLogin::new(UpstreamOptions::default());
        // 8-bit text imap-codec refuses; the capabilities still count.
        assert_eq!(
            up_feed(
                &mut u,
                b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=XOAUTH2] \xff\xfe ready\r\n"
            ),
            [Up::NeedToken]
        );
        provide(&mut u);
        assert_eq!(
            up_feed(
                &mut u,
                b"mb1 OK [CAPABILITY IMAP4rev1 IDLE] \xff logged in\r\n"
            ),
            [Up::Ok(caps("IMAP4rev1 IDLE"), String::new())]
        );
    }

    #[test]
    fn upstream_byte_at_a_time() {
        let script: &[&[u8]] = &[
            b"* OK Dovecot ready.\r\n",
            b"* CAPABILITY IMAP4rev1 AUTH=OAUTHBEARER\r\nmb1 OK Pre-login capabilities listed.\r\n",
            b"+ \r\n",
            b"+ eyJzdGF0dXMiOiI0MDEifQ==\r\n",
            b"mb2 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n",
        ];
        let run_it = |chunk: usize| {
            let mut u = ImapUpstreamLogin::new(UpstreamOptions::default());
            run_script(&mut u, script, chunk, &token())
        };
        let whole = run_it(usize::MAX);
        assert_eq!(
            whole,
            [
                send("mb1 CAPABILITY\r\n"),
                Up::NeedToken,
                send("mb2 AUTHENTICATE OAUTHBEARER\r\n"),
                send(&format!("{}\r\n", ob())),
                send("AQ==\r\n"),
                Up::Rejected {
                    status: Some("401".into()),
                    text: "NO [AUTHENTICATIONFAILED] Authentication failed.".into(),
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
        let pieces: [&[u8]; 10] = [
            b"* OK ",
            b"[CAPABILITY IMAP4rev1 SASL-IR AUTH=XOAUTH2] ",
            b"\r\n",
            b"+ ",
            b"mb1 ",
            b"mb2 OK ",
            b"NO ",
            b"{3}\r\n",
            b"* CAPABILITY AUTH=OAUTHBEARER",
            b"eyJzdGF0dXMiOjQwMX0=",
        ];
        for _ in 0..300 {
            let mut u = ImapUpstreamLogin::new(UpstreamOptions {
                max_line: 50,
                ..UpstreamOptions::default()
            });
            for _ in 0..(next() % 30) {
                let bytes: Vec<u8> = if next().is_multiple_of(3) {
                    (0..next() % 10).map(|_| next() as u8).collect()
                } else {
                    pieces[(next() % 10) as usize].to_vec()
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
                assert!(u.framer.partial_message().len() <= 100);
            }
        }
    }
}
