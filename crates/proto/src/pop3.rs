//! POP3: client-facing pre-auth session and upstream login dialogue.
//!
//! POP3 has no literals: both halves split lines with a length cap
//! (`crate::framer`) and parse commands and responses by hand: RFC 1939 (USER,
//! PASS, QUIT), RFC 2449 (CAPA, RESP-CODES, PIPELINING), RFC 2595 (STLS),
//! RFC 5034 (AUTH, AUTH-RESP-CODE) and RFC 3206 (`[AUTH]`, `[SYS/TEMP]`).

use std::collections::VecDeque;
use std::fmt;

use secrecy::zeroize::Zeroize;

use super::{
    Advertised, ClientSession, ClientStep, FailureKind, LoginFailure, LoginRequest, UpstreamError,
    UpstreamLogin, UpstreamStep, UpstreamSuccess,
};
use crate::bearer::{Bearer, InitialResponse, Offer};
use crate::framer::{Frame, Framer};
use crate::refusal::Refusal;
use crate::sasl::{self, BearerToken, Mechanism};
use crate::text::{one_line, strip_eol};
use crate::unexpected;

/// Default line limit, CRLF included. RFC 2449 caps commands at 255 octets
/// and responses at 512, but an AUTH line with an initial response (RFC
/// 5034) or a failure challenge is longer; 4 KiB holds any real one and
/// keeps what a stranger can make us buffer small.
const DEFAULT_MAX_LINE: usize = 4 * 1024;

/// Splits off the first space-separated word; the rest is verbatim.
fn split_word(bytes: &[u8]) -> (&[u8], Option<&[u8]>) {
    match bytes.iter().position(|&b| b == b' ') {
        Some(i) => (&bytes[..i], Some(&bytes[i + 1..])),
        None => (bytes, None),
    }
}

// ---------------------------------------------------------------------------
// Client side
// ---------------------------------------------------------------------------

/// Options of the client-facing pre-auth session.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// The listener offers STLS (the connection is not yet in TLS).
    pub starttls_offered: bool,
    /// Implicit-TLS listener: the connection is already encrypted.
    pub tls_active: bool,
    /// USER/PASS and AUTH PLAIN are allowed without TLS (loopback listener,
    /// or the configuration says so). Otherwise they are neither advertised
    /// nor accepted until TLS is on (RFC 2595 section 2.1).
    pub plaintext_login_allowed: bool,
    /// Longest command line accepted, CRLF included (default 4 KiB: RFC
    /// 2449 allows 255 octets for commands, but AUTH lines are longer).
    pub max_line: usize,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            starttls_offered: false,
            tls_active: false,
            plaintext_login_allowed: false,
            max_line: DEFAULT_MAX_LINE,
        }
    }
}

enum ClientState {
    /// Reading commands.
    Commands,
    /// Sent `+ ` for AUTH PLAIN; the next line is the response.
    AuthPlain,
    /// Sent the `Username:` prompt of AUTH LOGIN.
    AuthLoginUser,
    /// Sent the `Password:` prompt; holds the decoded user name (wiped on
    /// drop, never printed).
    AuthLoginPass(sasl::PendingUser),
    /// Sent the STLS `+OK`; waiting for `tls_started`.
    TlsPending,
    /// Emitted `ClientStep::Login`; waiting for the driver's verdict.
    LoginPending,
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
            ClientState::AuthLoginPass(_) => "auth-login-password",
            ClientState::TlsPending => "tls-pending",
            ClientState::LoginPending => "login-pending",
            ClientState::LoggedIn => "logged-in",
            ClientState::Closed => "closed",
        }
    }
}

/// The POP3 server side until login (the AUTHORIZATION state): greeting,
/// CAPA, STLS, USER/PASS, AUTH PLAIN, AUTH LOGIN (prompts exactly
/// `+ VXNlcm5hbWU6` and `+ UGFzc3dvcmQ6`, as devices expect) and QUIT; TRANSACTION commands are
/// refused with `-ERR Log in first` until login.
///
/// Pipelining (RFC 2449) is handled: commands are answered one line at a
/// time, in order. Once a login is requested the session consumes nothing
/// more, so whatever the client sent after PASS or AUTH stays buffered for
/// `take_pending` (on success) or is answered as pre-auth commands (after a
/// failure).
///
/// Over-limit input: a line over `max_line` gets `-ERR Line too long` once
/// and is dropped up to its line ending; the session stays usable. Memory:
/// at most one partial line of `max_line` bytes plus whatever the driver fed
/// and has not yet drained with `next_step`.
pub struct Pop3ClientSession {
    opts: ClientOptions,
    framer: Framer,
    state: ClientState,
    /// TLS is on (implicit, or STLS done).
    in_tls: bool,
    /// The name from USER, until PASS uses (and forgets) it; wiped on drop.
    user: Option<sasl::PendingUser>,
}

impl fmt::Debug for Pop3ClientSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Buffers may hold a password: show sizes only.
        f.debug_struct("Pop3ClientSession")
            .field("state", &self.state.name())
            .field("in_tls", &self.in_tls)
            .field("buffered", &self.framer.buffered())
            .field("user_given", &self.user.is_some())
            .finish()
    }
}

/// A continuation carrying a SASL challenge (base64), RFC 5034 section 4.
fn prompt(challenge: &str) -> ClientStep {
    ClientStep::Send(format!("+ {challenge}\r\n").into_bytes())
}

fn err(text: &str) -> ClientStep {
    ClientStep::Send(format!("-ERR {text}\r\n").into_bytes())
}

impl Pop3ClientSession {
    /// A new pre-auth session.
    pub fn new(opts: ClientOptions) -> Self {
        Pop3ClientSession {
            framer: Framer::lines(opts.max_line),
            in_tls: opts.tls_active,
            opts,
            state: ClientState::Commands,
            user: None,
        }
    }

    fn login_allowed(&self) -> bool {
        self.in_tls || self.opts.plaintext_login_allowed
    }

    fn stls_offered(&self) -> bool {
        self.opts.starttls_offered && !self.in_tls
    }

    /// Our own capabilities only: the upstream's are none of the client's
    /// business before login (a client asks again afterwards, RFC 2449).
    fn capa(&self) -> Vec<u8> {
        let mut out = String::from("+OK Capability list follows\r\n");
        if self.login_allowed() {
            out.push_str("USER\r\nSASL PLAIN LOGIN\r\n");
        }
        if self.stls_offered() {
            out.push_str("STLS\r\n");
        }
        out.push_str(
            "RESP-CODES\r\nAUTH-RESP-CODE\r\nPIPELINING\r\nIMPLEMENTATION mailbridge\r\n.\r\n",
        );
        out.into_bytes()
    }

    fn plaintext_refused(&self) -> ClientStep {
        if self.stls_offered() {
            err("Plaintext authentication disallowed on non-secure connection; use STLS first")
        } else {
            err("Plaintext authentication disallowed on non-secure connection")
        }
    }

    /// A login with checked credentials, or the refusal.
    fn login(&mut self, creds: Result<sasl::Credentials, sasl::SaslError>) -> ClientStep {
        match creds {
            Ok(credentials) => {
                self.state = ClientState::LoginPending;
                ClientStep::Login(LoginRequest {
                    credentials,
                    client_info: None,
                    by_address: false,
                })
            }
            Err(e) => err(&format!(
                "[AUTH] {}",
                one_line(&e.to_string(), "Invalid credentials")
            )),
        }
    }

    fn user_command(&mut self, arg: Option<&[u8]>) -> ClientStep {
        if !self.login_allowed() {
            return self.plaintext_refused();
        }
        match arg.filter(|name| !name.is_empty()) {
            Some(name) => {
                self.user = Some(sasl::PendingUser::new(name.to_vec()));
                ClientStep::Send(b"+OK Send PASS\r\n".to_vec())
            }
            None => err("USER needs a name"),
        }
    }

    fn pass_command(&mut self, arg: Option<&[u8]>) -> ClientStep {
        if !self.login_allowed() {
            return self.plaintext_refused();
        }
        // Used once: after a failed PASS the client starts over with USER.
        let Some(user) = self.user.take() else {
            return err("Send USER first");
        };
        // The whole rest of the line: passwords may contain spaces.
        self.login(user.with_password(arg.unwrap_or_default()))
    }

    /// A base64 PLAIN message, from the AUTH line or a continuation line.
    fn plain_response(&mut self, data: &[u8]) -> ClientStep {
        match sasl::decode_base64(data) {
            Ok(mut raw) => {
                let creds = sasl::decode_plain(&raw);
                raw.zeroize();
                self.login(creds)
            }
            Err(_) => err("SASL response is not valid base64"),
        }
    }

    fn auth_command(&mut self, arg: Option<&[u8]>) -> ClientStep {
        let Some(arg) = arg.filter(|a| !a.is_empty()) else {
            // RFC 1734-style list of mechanisms.
            return ClientStep::Send(if self.login_allowed() {
                b"+OK SASL mechanisms follow\r\nPLAIN\r\nLOGIN\r\n.\r\n".to_vec()
            } else {
                b"+OK SASL mechanisms follow\r\n.\r\n".to_vec()
            });
        };
        if !self.login_allowed() {
            return self.plaintext_refused();
        }
        let (mechanism, initial) = split_word(arg);
        if mechanism.eq_ignore_ascii_case(b"LOGIN") {
            return self.auth_login(initial);
        }
        if !mechanism.eq_ignore_ascii_case(b"PLAIN") {
            return err("Unsupported SASL mechanism; use PLAIN or LOGIN");
        }
        match initial {
            None => {
                self.state = ClientState::AuthPlain;
                ClientStep::Send(b"+ \r\n".to_vec())
            }
            Some(ir) if ir.contains(&b' ') => err("Invalid AUTH arguments"),
            // RFC 5034 section 4: `=` is an empty initial response.
            Some(b"=") => self.login(sasl::decode_plain(b"")),
            Some(ir) => self.plain_response(ir),
        }
    }

    /// AUTH LOGIN: the user name prompt, or with an initial response
    /// (RFC 5034; the user name) straight to the password prompt. An empty
    /// one (`=`) is an empty user name, refused once the password is in.
    fn auth_login(&mut self, initial: Option<&[u8]>) -> ClientStep {
        let user = match initial {
            None => {
                self.state = ClientState::AuthLoginUser;
                return prompt(sasl::LOGIN_PROMPT_USER);
            }
            Some(ir) if ir.contains(&b' ') => return err("Invalid AUTH arguments"),
            Some(b"=") => Vec::new(),
            Some(ir) => match sasl::decode_base64(ir) {
                Ok(user) => user,
                Err(_) => return err("SASL response is not valid base64"),
            },
        };
        self.state = ClientState::AuthLoginPass(sasl::PendingUser::new(user));
        prompt(sasl::LOGIN_PROMPT_PASSWORD)
    }

    fn stls_command(&mut self) -> ClientStep {
        if self.in_tls {
            return err("TLS is already active");
        }
        if !self.opts.starttls_offered {
            return err("STLS is not available here");
        }
        // Whatever the client sent after STLS is plaintext that must not be
        // taken as coming from inside TLS.
        self.framer.reset();
        self.state = ClientState::TlsPending;
        ClientStep::StartTls(b"+OK Begin TLS negotiation\r\n".to_vec())
    }

    fn command(&mut self, line: &[u8]) -> ClientStep {
        let (keyword, arg) = split_word(line);
        match keyword.to_ascii_uppercase().as_slice() {
            b"CAPA" => ClientStep::Send(self.capa()),
            b"USER" => self.user_command(arg),
            b"PASS" => self.pass_command(arg),
            b"AUTH" => self.auth_command(arg),
            b"STLS" => self.stls_command(),
            b"QUIT" => {
                self.state = ClientState::Closed;
                self.framer.reset();
                ClientStep::Close(b"+OK mailbridge signing off\r\n".to_vec())
            }
            // TRANSACTION-state commands (NOOP included, RFC 1939 section 5).
            b"STAT" | b"LIST" | b"RETR" | b"DELE" | b"NOOP" | b"RSET" | b"TOP" | b"UIDL"
            | b"LAST" => err("Log in first"),
            b"APOP" => err("APOP is not supported; use USER and PASS, AUTH PLAIN or AUTH LOGIN"),
            _ => err("Unknown command"),
        }
    }

    /// The client's response line to our `+ ` prompt of AUTH PLAIN or
    /// LOGIN (the state says which); `*` cancels the exchange.
    fn auth_response(&mut self, line: &[u8]) -> ClientStep {
        let state = std::mem::replace(&mut self.state, ClientState::Commands);
        if line == b"*" {
            return err("AUTH cancelled");
        }
        if matches!(state, ClientState::AuthPlain) {
            return self.plain_response(line);
        }
        let Ok(mut data) = sasl::decode_base64(line) else {
            return err("SASL response is not valid base64");
        };
        let step = match state {
            ClientState::AuthLoginPass(user) => {
                let creds = user.with_password(&data);
                self.login(creds)
            }
            _ => {
                let user = sasl::PendingUser::new(std::mem::take(&mut data));
                self.state = ClientState::AuthLoginPass(user);
                prompt(sasl::LOGIN_PROMPT_PASSWORD)
            }
        };
        data.zeroize();
        step
    }
}

impl ClientSession for Pop3ClientSession {
    fn greeting(&mut self) -> Vec<u8> {
        b"+OK mailbridge POP3 ready\r\n".to_vec()
    }

    fn feed(&mut self, data: &[u8]) {
        match self.state {
            // Bytes before the handshake are plaintext; after QUIT, noise.
            ClientState::TlsPending | ClientState::Closed => {}
            _ => self.framer.push(data),
        }
    }

    fn next_step(&mut self) -> ClientStep {
        let in_auth = match self.state {
            ClientState::Commands => false,
            ClientState::AuthPlain | ClientState::AuthLoginUser | ClientState::AuthLoginPass(_) => {
                true
            }
            _ => return ClientStep::NeedInput,
        };
        match self.framer.next() {
            // POP3 and SMTP have no literals: a lines framer reports none.
            Frame::NeedMore | Frame::Literal(_) => ClientStep::NeedInput,
            Frame::LineTooLong => {
                // An overlong AUTH response ends that exchange.
                self.state = ClientState::Commands;
                err("Line too long")
            }
            Frame::Message(mut line) => {
                let text = strip_eol(&line);
                let step = if in_auth {
                    self.auth_response(text)
                } else {
                    self.command(text)
                };
                line.zeroize();
                step
            }
        }
    }

    fn tls_started(&mut self) {
        self.in_tls = true;
        self.framer.reset();
        // RFC 2595 section 4: nothing from before TLS carries over.
        self.user = None;
        if matches!(self.state, ClientState::TlsPending) {
            self.state = ClientState::Commands;
        }
    }

    fn login_succeeded(&mut self, _upstream: &UpstreamSuccess) -> Vec<u8> {
        if !matches!(self.state, ClientState::LoginPending) {
            return Vec::new();
        }
        self.state = ClientState::LoggedIn;
        // POP3 has no way to carry capabilities in this reply; a client
        // that wants them asks CAPA, which goes upstream.
        b"+OK Logged in\r\n".to_vec()
    }

    fn login_failed(&mut self, failure: &LoginFailure) -> Vec<u8> {
        if !matches!(self.state, ClientState::LoginPending) {
            return Vec::new();
        }
        self.state = ClientState::Commands;
        self.user = None;
        let code = match failure.kind {
            FailureKind::BadCredentials | FailureKind::Rejected => "AUTH",
            FailureKind::Throttled | FailureKind::Unavailable => "SYS/TEMP",
        };
        let reason = one_line(&failure.reason, "Login failed");
        format!("-ERR [{code}] {reason}\r\n").into_bytes()
    }

    fn take_pending(&mut self) -> Vec<u8> {
        self.framer.take()
    }

    fn timeout_message(&self) -> Vec<u8> {
        b"-ERR Idle for too long, closing connection\r\n".to_vec()
    }

    fn shutdown_message(&self) -> Vec<u8> {
        b"-ERR [SYS/TEMP] mailbridge is shutting down; connect again shortly\r\n".to_vec()
    }

    fn goodbye(&self, reason: &str) -> Vec<u8> {
        format!(
            "-ERR [SYS/TEMP] {}\r\n",
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
    /// Do STLS after the greeting (false for implicit TLS).
    pub starttls: bool,
    /// Mechanisms in order of preference; the first one the server lists
    /// in its `SASL` capability is used.
    pub preference: Vec<Mechanism>,
    /// Send the token on the AUTH line (RFC 5034 initial response). Default
    /// false: the two-step form (`AUTH XOAUTH2`, `+`, token) is the safe
    /// one, since a token easily pushes the AUTH line past the 255 octets
    /// some servers accept.
    pub initial_response: bool,
    /// Longest server line accepted, CRLF included (default 4 KiB).
    pub max_line: usize,
}

impl Default for UpstreamOptions {
    fn default() -> Self {
        UpstreamOptions {
            starttls: false,
            preference: vec![Mechanism::Xoauth2, Mechanism::Oauthbearer],
            initial_response: false,
            max_line: DEFAULT_MAX_LINE,
        }
    }
}

/// A server line, as far as the login dialogue cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Ok,
    Err,
    /// `+` or `+ text`: a SASL continuation (RFC 5034).
    Continue,
    Other,
}

/// Whether `line` starts with the status word `word` (case-insensitive),
/// followed by a space or nothing.
fn has_status(line: &[u8], word: &[u8]) -> bool {
    line.len() >= word.len()
        && line[..word.len()].eq_ignore_ascii_case(word)
        && matches!(line.get(word.len()), None | Some(b' '))
}

fn status(line: &[u8]) -> Status {
    if line == b"+" || line.starts_with(b"+ ") {
        Status::Continue
    } else if has_status(line, b"+OK") {
        Status::Ok
    } else if has_status(line, b"-ERR") {
        Status::Err
    } else {
        Status::Other
    }
}

/// Reads a refusal the way the upstream login does, from a server line
/// (`-ERR [AUTH] Authentication failed`); None unless it is an `-ERR`.
pub fn parse_refusal(line: &str) -> Option<Refusal> {
    let line = strip_eol(line.as_bytes());
    (status(line) == Status::Err).then(|| Refusal::pop3(line))
}

enum UpState {
    /// Waiting for the greeting.
    Greeting,
    /// Sent CAPA; `listing` once its `+OK` came.
    Capa {
        listing: bool,
        collected: Vec<String>,
    },
    /// Sent STLS.
    Stls,
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
            UpState::Capa { .. } => "capa",
            UpState::Stls => "stls",
            UpState::TlsHandshake => "tls-handshake",
            UpState::Login => "login",
            UpState::Done => "done",
            UpState::Failed => "failed",
        }
    }
}

/// mailbridge's login to the real POP3 server: greeting, CAPA, optional
/// STLS (then CAPA again), then AUTH XOAUTH2 or OAUTHBEARER
/// (`crate::bearer`; two steps unless `initial_response`) with the
/// failure challenge absorbed.
///
/// When the server answers CAPA with `-ERR` it tells us nothing: STLS is
/// then taken as not offered (`NoStartTls` if required: we do not send
/// commands the server did not announce before TLS), while AUTH is tried
/// with the first preferred mechanism, because a refusal costs one round
/// trip and comes back as an ordinary `Rejected` with the server's text.
pub struct Pop3UpstreamLogin {
    opts: UpstreamOptions,
    framer: Framer,
    state: UpState,
    /// Steps decided but not yet handed out (may hold the token: never
    /// printed).
    queue: VecDeque<UpstreamStep>,
    /// The server's current CAPA lines (after TLS: only the new ones).
    caps: Vec<String>,
    /// The last CAPA was refused: no capability information.
    capa_refused: bool,
    tls_done: bool,
    /// The bearer login: mechanism, token, challenge, retry.
    bearer: Bearer,
    /// The greeting was accepted.
    greeted: bool,
    /// The `SASL` mechanisms of the capabilities the login chose from
    /// (None: CAPA refused).
    offered: Option<Vec<String>>,
}

impl fmt::Debug for Pop3UpstreamLogin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match self.state {
            UpState::Login => self.bearer.state_name(),
            _ => self.state.name(),
        };
        f.debug_struct("Pop3UpstreamLogin")
            .field("state", &state)
            .field("caps", &self.caps)
            .field("mech", &self.bearer.mechanism())
            .field("queued_steps", &self.queue.len())
            .finish()
    }
}

impl Pop3UpstreamLogin {
    /// A new login dialogue; feed it the server's bytes from the start.
    pub fn new(opts: UpstreamOptions) -> Self {
        Pop3UpstreamLogin {
            framer: Framer::lines(opts.max_line),
            bearer: Bearer::new(opts.preference.clone()),
            opts,
            state: UpState::Greeting,
            queue: VecDeque::new(),
            caps: Vec::new(),
            capa_refused: false,
            tls_done: false,
            greeted: false,
            offered: None,
        }
    }

    fn send(&mut self, line: &str) {
        self.queue
            .push_back(UpstreamStep::Send(line.as_bytes().to_vec()));
    }

    fn ask_capa(&mut self) {
        self.send("CAPA\r\n");
        self.state = UpState::Capa {
            listing: false,
            collected: Vec::new(),
        };
    }

    /// Capability lines whose first word is `name`, as their remaining
    /// words.
    fn cap_args<'a>(caps: &'a [String], name: &'a str) -> impl Iterator<Item = &'a str> {
        caps.iter().flat_map(move |line| {
            let mut words = line.split_ascii_whitespace();
            let matched = words.next().is_some_and(|w| w.eq_ignore_ascii_case(name));
            words.filter(move |_| matched)
        })
    }

    fn has_cap(&self, name: &str) -> bool {
        self.caps.iter().any(|line| {
            line.split_ascii_whitespace()
                .next()
                .is_some_and(|w| w.eq_ignore_ascii_case(name))
        })
    }

    /// With the capabilities known: STLS, then the token.
    fn proceed(&mut self) -> Result<(), UpstreamError> {
        if self.opts.starttls && !self.tls_done {
            if !self.has_cap("STLS") {
                return Err(UpstreamError::NoStartTls);
            }
            self.send("STLS\r\n");
            self.state = UpState::Stls;
            return Ok(());
        }
        let offered: Vec<&str> = Self::cap_args(&self.caps, "SASL").collect();
        self.offered =
            (!self.capa_refused).then(|| offered.iter().map(|m| m.to_string()).collect());
        let offer = if self.capa_refused {
            Offer::Unknown
        } else {
            Offer::Listed(&offered)
        };
        let Some(step) = self.bearer.choose(offer) else {
            return Err(UpstreamError::NoMechanism {
                allowed: self.bearer.allowed(),
                offered: if offered.is_empty() {
                    "no SASL mechanisms".to_owned()
                } else {
                    offered.join(" ")
                },
            });
        };
        self.state = UpState::Login;
        self.queue.push_back(step);
        Ok(())
    }

    /// One complete server line (without its line ending).
    fn handle(&mut self, line: &[u8]) -> Result<(), UpstreamError> {
        let st = status(line);
        match &mut self.state {
            UpState::Greeting => match st {
                Status::Ok => {
                    self.greeted = true;
                    self.ask_capa();
                    Ok(())
                }
                Status::Err => Err(unexpected("the server refused the connection", line)),
                _ => Err(unexpected("not a POP3 greeting", line)),
            },
            UpState::Capa {
                listing: false,
                collected,
            } => match st {
                Status::Ok => {
                    self.state = UpState::Capa {
                        listing: true,
                        collected: std::mem::take(collected),
                    };
                    Ok(())
                }
                Status::Err => {
                    self.caps.clear();
                    self.capa_refused = true;
                    self.proceed()
                }
                _ => Err(unexpected("unexpected answer to CAPA", line)),
            },
            UpState::Capa {
                listing: true,
                collected,
            } => {
                if line == b"." {
                    self.caps = std::mem::take(collected);
                    self.capa_refused = false;
                    return self.proceed();
                }
                // Multi-line responses are dot-stuffed (RFC 1939 section 3).
                let line = line.strip_prefix(b".").unwrap_or(line);
                if collected.len() < 100 {
                    collected.push(String::from_utf8_lossy(line).into_owned());
                }
                Ok(())
            }
            UpState::Stls => match st {
                Status::Ok => {
                    // Bytes after the +OK arrived in plaintext: never trust
                    // them.
                    self.framer.reset();
                    self.state = UpState::TlsHandshake;
                    self.queue.push_back(UpstreamStep::StartTls);
                    Ok(())
                }
                _ => Err(unexpected("the server refused STLS", line)),
            },
            UpState::Login => match st {
                _ if !self.bearer.awaits_server() => Ok(()),
                Status::Continue => {
                    let data = line.get(2..).unwrap_or_default();
                    let step = self
                        .bearer
                        .continuation(data)
                        .map_err(|what| unexpected(what, line))?;
                    self.queue.push_back(step);
                    Ok(())
                }
                Status::Ok if self.bearer.response_pending() => Err(unexpected(
                    "the server accepted AUTH before it got the token",
                    line,
                )),
                Status::Ok => {
                    self.bearer.succeeded();
                    self.state = UpState::Done;
                    let leftover = self.framer.take();
                    self.queue
                        .push_back(UpstreamStep::Authenticated(UpstreamSuccess {
                            capabilities: self.caps.clone(),
                            leftover,
                        }));
                    Ok(())
                }
                Status::Err => {
                    let step = self.bearer.refused(Refusal::pop3(line));
                    self.queue.push_back(step);
                    Ok(())
                }
                Status::Other => Err(unexpected("unexpected answer to AUTH", line)),
            },
            UpState::TlsHandshake | UpState::Done | UpState::Failed => Ok(()),
        }
    }
}

impl UpstreamLogin for Pop3UpstreamLogin {
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
                Frame::Message(mut line) => {
                    let r = self.handle(strip_eol(&line));
                    line.zeroize();
                    r
                }
                Frame::LineTooLong => Err(UpstreamError::LineTooLong(self.opts.max_line)),
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
            self.capa_refused = false;
            self.framer.reset();
            self.ask_capa();
        }
    }

    fn provide_token(&mut self, token: &BearerToken) {
        if !matches!(self.state, UpState::Login) {
            return;
        }
        let form = if self.opts.initial_response {
            InitialResponse::Always
        } else {
            InitialResponse::Never
        };
        let step = self
            .bearer
            .provide_token(token, form, |mech, response| match response {
                Some(r) => format!("AUTH {} {r}\r\n", mech.name()),
                None => format!("AUTH {}\r\n", mech.name()),
            });
        self.queue.extend(step);
    }

    fn retry(&mut self) {
        if matches!(self.state, UpState::Login) {
            self.queue.extend(self.bearer.retry());
        }
    }

    fn farewell(&self) -> crate::farewell::Reader {
        crate::farewell::pop3
    }

    fn advertised(&self) -> Advertised {
        Advertised {
            greeted: self.greeted,
            starttls: self.tls_done || self.has_cap("STLS"),
            tls_started: self.tls_done,
            mechanisms: self.offered.clone(),
            chosen: self.bearer.mechanism(),
        }
    }

    fn logout(&self) -> &'static [u8] {
        QUIT
    }
}

/// Ends a POP3 session in any state (RFC 1939 sections 5 and 6).
pub const QUIT: &[u8] = b"QUIT\r\n";

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

    fn run(opts: ClientOptions, input: &[u8]) -> (Pop3ClientSession, Vec<Ev>) {
        run_both_ways(|| Pop3ClientSession::new(opts.clone()), input)
    }

    const CAPA_TAIL: &str =
        "RESP-CODES\r\nAUTH-RESP-CODE\r\nPIPELINING\r\nIMPLEMENTATION mailbridge\r\n.\r\n";

    #[test]
    fn greeting_and_capa() {
        let mut sess = Pop3ClientSession::new(open());
        assert_eq!(s(&sess.greeting()), "+OK mailbridge POP3 ready\r\n");
        let (_, evs) = run(open(), b"CAPA\r\ncapa\r\n");
        let capa =
            format!("+OK Capability list follows\r\nUSER\r\nSASL PLAIN LOGIN\r\n{CAPA_TAIL}");
        assert_eq!(evs, [out(&format!("{capa}{capa}"))]);
        // STLS offered on a non-loopback listener: no plaintext login.
        let opts = ClientOptions {
            starttls_offered: true,
            ..ClientOptions::default()
        };
        let (_, evs) = run(opts, b"CAPA\r\n");
        assert_eq!(
            evs,
            [out(&format!(
                "+OK Capability list follows\r\nSTLS\r\n{CAPA_TAIL}"
            ))]
        );
        // STLS offered, plaintext allowed (loopback).
        let opts = ClientOptions {
            starttls_offered: true,
            ..open()
        };
        let (_, evs) = run(opts, b"CAPA\r\n");
        assert_eq!(
            evs,
            [out(&format!(
                "+OK Capability list follows\r\nUSER\r\nSASL PLAIN LOGIN\r\nSTLS\r\n{CAPA_TAIL}"
            ))]
        );
        // Implicit TLS.
        let opts = ClientOptions {
            tls_active: true,
            starttls_offered: true,
            ..ClientOptions::default()
        };
        let (_, evs) = run(opts, b"CAPA\r\n");
        assert_eq!(
            evs,
            [out(&format!(
                "+OK Capability list follows\r\nUSER\r\nSASL PLAIN LOGIN\r\n{CAPA_TAIL}"
            ))]
        );
    }

    #[test]
    fn user_pass_with_spaces_in_password() {
        let (mut sess, evs) = run(open(), b"USER alice@example.com\r\nPASS  my secret pw \r\n");
        assert_eq!(
            evs,
            [
                out("+OK Send PASS\r\n"),
                login("alice@example.com", " my secret pw ", None)
            ]
        );
        // Nothing more until the verdict.
        sess.feed(b"STAT\r\n");
        assert!(matches!(sess.next_step(), ClientStep::NeedInput));
        assert_eq!(
            s(&sess.login_succeeded(&UpstreamSuccess::default())),
            "+OK Logged in\r\n"
        );
        assert!(matches!(sess.next_step(), ClientStep::NeedInput));
        assert_eq!(s(&sess.take_pending()), "STAT\r\n");
        // Case-insensitive keywords, bare LF tolerated.
        let (_, evs) = run(open(), b"user bob\npass pw\n");
        assert_eq!(evs, [out("+OK Send PASS\r\n"), login("bob", "pw", None)]);
    }

    #[test]
    fn user_pass_refusals() {
        let (_, evs) = run(
            open(),
            b"PASS pw\r\nUSER\r\nUSER \r\nUSER u\r\nPASS\r\nPASS pw\r\nUSER u\r\nPASS \xff\r\n",
        );
        assert_eq!(
            evs,
            [out("-ERR Send USER first\r\n\
                 -ERR USER needs a name\r\n\
                 -ERR USER needs a name\r\n\
                 +OK Send PASS\r\n\
                 -ERR [AUTH] the password is empty\r\n\
                 -ERR Send USER first\r\n\
                 +OK Send PASS\r\n\
                 -ERR [AUTH] the user name or password is not valid UTF-8\r\n")]
        );
    }

    #[test]
    fn auth_plain_with_initial_response() {
        let input = format!("AUTH PLAIN {}\r\n", b64(b"\0alice\0s3 cret"));
        let (_, evs) = run(open(), input.as_bytes());
        assert_eq!(evs, [login("alice", "s3 cret", None)]);
        let input = format!("auth plain {}\r\n", b64(b"bob\0bob\0pw"));
        let (_, evs) = run(open(), input.as_bytes());
        assert_eq!(evs, [login("bob", "pw", None)]);
        let (_, evs) = run(open(), b"AUTH PLAIN =\r\n");
        assert_eq!(
            evs,
            [out(
                "-ERR [AUTH] the PLAIN message is malformed (expected authzid NUL user NUL password)\r\n"
            )]
        );
        let (_, evs) = run(open(), b"AUTH PLAIN AGVs!G8=\r\nAUTH PLAIN a b\r\n");
        assert_eq!(
            evs,
            [out(
                "-ERR SASL response is not valid base64\r\n-ERR Invalid AUTH arguments\r\n"
            )]
        );
        let input = format!("AUTH PLAIN {}\r\n", b64(b"eve\0alice\0pw"));
        let (_, evs) = run(open(), input.as_bytes());
        assert_eq!(
            evs,
            [out(
                "-ERR [AUTH] logging in as another user (a different authorization identity) is not supported\r\n"
            )]
        );
    }

    #[test]
    fn auth_plain_with_continuation_and_cancel() {
        let input = format!("AUTH PLAIN\r\n{}\r\nSTAT\r\n", b64(b"\0bob\0pw"));
        let (mut sess, evs) = run(open(), input.as_bytes());
        assert_eq!(evs, [out("+ \r\n"), login("bob", "pw", None)]);
        assert_eq!(s(&sess.take_pending()), "STAT\r\n");
        let (_, evs) = run(open(), b"AUTH PLAIN\r\n*\r\nSTAT\r\n");
        assert_eq!(
            evs,
            [out("+ \r\n-ERR AUTH cancelled\r\n-ERR Log in first\r\n")]
        );
        let (_, evs) = run(open(), b"AUTH PLAIN\r\n!!notb64\r\n");
        assert_eq!(
            evs,
            [out("+ \r\n-ERR SASL response is not valid base64\r\n")]
        );
    }

    #[test]
    fn auth_other_mechanisms_and_listing() {
        let (_, evs) = run(
            open(),
            b"AUTH CRAM-MD5\r\nAUTH XOAUTH2 AAAA\r\nAUTH\r\nAPOP u 0123\r\n",
        );
        assert_eq!(
            evs,
            [out(
                "-ERR Unsupported SASL mechanism; use PLAIN or LOGIN\r\n\
                 -ERR Unsupported SASL mechanism; use PLAIN or LOGIN\r\n\
                 +OK SASL mechanisms follow\r\nPLAIN\r\nLOGIN\r\n.\r\n\
                 -ERR APOP is not supported; use USER and PASS, AUTH PLAIN or AUTH LOGIN\r\n"
            )]
        );
    }

    #[test]
    fn auth_login_with_prompts() {
        let input = format!(
            "AUTH LOGIN\r\n{}\r\n{}\r\nSTAT\r\n",
            b64(b"alice@example.com"),
            b64(b"pa ss")
        );
        let (mut sess, evs) = run(open(), input.as_bytes());
        assert_eq!(
            evs,
            [
                out("+ VXNlcm5hbWU6\r\n+ UGFzc3dvcmQ6\r\n"),
                login("alice@example.com", "pa ss", None)
            ]
        );
        assert_eq!(s(&sess.take_pending()), "STAT\r\n");
        assert_eq!(
            s(&sess.login_succeeded(&UpstreamSuccess::default())),
            "+OK Logged in\r\n"
        );
    }

    #[test]
    fn auth_login_with_initial_response() {
        let input = format!("auth login {}\r\n{}\r\n", b64(b"bob"), b64(b"s3cret"));
        let (_, evs) = run(open(), input.as_bytes());
        assert_eq!(
            evs,
            [out("+ UGFzc3dvcmQ6\r\n"), login("bob", "s3cret", None)]
        );
        // `=` is an empty user name: refused once the password is in.
        let input = format!("AUTH LOGIN =\r\n{}\r\n", b64(b"pw"));
        let (_, evs) = run(open(), input.as_bytes());
        assert_eq!(
            evs,
            [out(
                "+ UGFzc3dvcmQ6\r\n-ERR [AUTH] the user name is empty\r\n"
            )]
        );
    }

    #[test]
    fn auth_login_cancel_and_errors() {
        let input = format!(
            "AUTH LOGIN\r\n*\r\nAUTH LOGIN {}\r\n*\r\nAUTH LOGIN\r\n!!\r\n\
             AUTH LOGIN\r\n{}\r\n@@\r\nAUTH LOGIN AGVs!G8=\r\nAUTH LOGIN a b\r\n\
             AUTH LOGIN\r\n{}\r\n\r\nSTAT\r\n",
            b64(b"u"),
            b64(b"u"),
            b64(b"u")
        );
        let (_, evs) = run(open(), input.as_bytes());
        assert_eq!(
            evs,
            [out("+ VXNlcm5hbWU6\r\n-ERR AUTH cancelled\r\n\
                 + UGFzc3dvcmQ6\r\n-ERR AUTH cancelled\r\n\
                 + VXNlcm5hbWU6\r\n-ERR SASL response is not valid base64\r\n\
                 + VXNlcm5hbWU6\r\n+ UGFzc3dvcmQ6\r\n-ERR SASL response is not valid base64\r\n\
                 -ERR SASL response is not valid base64\r\n\
                 -ERR Invalid AUTH arguments\r\n\
                 + VXNlcm5hbWU6\r\n+ UGFzc3dvcmQ6\r\n-ERR [AUTH] the password is empty\r\n\
                 -ERR Log in first\r\n")]
        );
        // Neither offered nor accepted before TLS when plaintext is off.
        let opts = ClientOptions {
            starttls_offered: true,
            ..ClientOptions::default()
        };
        let (_, evs) = run(opts, b"AUTH LOGIN\r\n");
        assert_eq!(
            evs,
            [out(
                "-ERR Plaintext authentication disallowed on non-secure connection; use STLS first\r\n"
            )]
        );
    }

    #[test]
    fn auth_login_response_too_long() {
        let opts = ClientOptions {
            max_line: 32,
            ..open()
        };
        let input = format!("AUTH LOGIN\r\n{}\r\nSTAT\r\n", "A".repeat(100));
        let mut sess = Pop3ClientSession::new(opts);
        let evs = drive(&mut sess, input.as_bytes(), usize::MAX);
        assert_eq!(
            evs,
            [out(
                "+ VXNlcm5hbWU6\r\n-ERR Line too long\r\n-ERR Log in first\r\n"
            )]
        );
    }

    #[test]
    fn debug_hides_auth_login_user() {
        let mut sess = Pop3ClientSession::new(open());
        let input = format!("AUTH LOGIN {}\r\n{}", b64(b"secret-user"), b64(b"hunter2"));
        sess.feed(input.as_bytes());
        let mut evs = Vec::new();
        pump(&mut sess, &mut evs);
        assert_eq!(evs, [out("+ UGFzc3dvcmQ6\r\n")]);
        let dbg = format!("{sess:?}");
        assert!(dbg.contains("auth-login-password"), "{dbg}");
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
    fn plaintext_disallowed_until_stls() {
        let opts = ClientOptions {
            starttls_offered: true,
            ..ClientOptions::default()
        };
        let mut sess = Pop3ClientSession::new(opts.clone());
        let refused =
            "-ERR Plaintext authentication disallowed on non-secure connection; use STLS first\r\n";
        let evs = drive(
            &mut sess,
            b"USER u\r\nPASS p\r\nAUTH PLAIN\r\nAUTH\r\nSTLS\r\n",
            usize::MAX,
        );
        assert_eq!(
            evs,
            [
                out(&format!(
                    "{refused}{refused}{refused}+OK SASL mechanisms follow\r\n.\r\n"
                )),
                Ev::StartTls("+OK Begin TLS negotiation\r\n".into())
            ]
        );
        sess.tls_started();
        let evs = drive(&mut sess, b"STLS\r\nUSER u\r\nPASS p w\r\n", usize::MAX);
        assert_eq!(
            evs,
            [
                out("-ERR TLS is already active\r\n+OK Send PASS\r\n"),
                login("u", "p w", None)
            ]
        );
        // No TLS at all on a non-loopback listener: no hint to use STLS.
        let (_, evs) = run(ClientOptions::default(), b"USER u\r\nSTLS\r\nCAPA\r\n");
        assert_eq!(
            evs,
            [out(&format!(
                "-ERR Plaintext authentication disallowed on non-secure connection\r\n\
                 -ERR STLS is not available here\r\n\
                 +OK Capability list follows\r\n{CAPA_TAIL}"
            ))]
        );
    }

    #[test]
    fn stls_discards_buffered_input() {
        let opts = ClientOptions {
            starttls_offered: true,
            ..ClientOptions::default()
        };
        let input = b"STLS\r\nUSER evil\r\nPASS pw\r\n";
        for chunk in [usize::MAX, 1] {
            let mut sess = Pop3ClientSession::new(opts.clone());
            let evs = drive(&mut sess, input, chunk);
            assert_eq!(evs, [Ev::StartTls("+OK Begin TLS negotiation\r\n".into())]);
            sess.feed(b"PASS pw\r\n");
            assert!(matches!(sess.next_step(), ClientStep::NeedInput));
            sess.tls_started();
            assert!(matches!(sess.next_step(), ClientStep::NeedInput));
            assert!(sess.take_pending().is_empty());
            // A USER given before STLS does not survive it.
            let evs = drive(&mut sess, b"PASS pw\r\n", usize::MAX);
            assert_eq!(evs, [out("-ERR Send USER first\r\n")]);
        }
        // USER before STLS on a loopback listener, PASS after: refused.
        let opts = ClientOptions {
            starttls_offered: true,
            ..open()
        };
        let mut sess = Pop3ClientSession::new(opts);
        drive(&mut sess, b"USER u\r\nSTLS\r\n", usize::MAX);
        sess.tls_started();
        let evs = drive(&mut sess, b"PASS pw\r\n", usize::MAX);
        assert_eq!(evs, [out("-ERR Send USER first\r\n")]);
    }

    #[test]
    fn preauth_transaction_commands_refused_session_usable() {
        let (_, evs) = run(
            open(),
            b"STAT\r\nLIST 1\r\nRETR 1\r\nNOOP\r\nUIDL\r\nFROB\r\n\r\nUSER u\r\nPASS p\r\n",
        );
        assert_eq!(
            evs,
            [
                out(
                    "-ERR Log in first\r\n-ERR Log in first\r\n-ERR Log in first\r\n\
                     -ERR Log in first\r\n-ERR Log in first\r\n-ERR Unknown command\r\n\
                     -ERR Unknown command\r\n+OK Send PASS\r\n"
                ),
                login("u", "p", None)
            ]
        );
    }

    #[test]
    fn quit_closes_and_timeout_message() {
        let (_, evs) = run(open(), b"quit\r\nNOOP\r\n");
        assert_eq!(evs, [Ev::Close("+OK mailbridge signing off\r\n".into())]);
        let sess = Pop3ClientSession::new(open());
        assert_eq!(
            s(&sess.timeout_message()),
            "-ERR Idle for too long, closing connection\r\n"
        );
    }

    fn small() -> ClientOptions {
        ClientOptions {
            plaintext_login_allowed: true,
            max_line: 32,
            ..ClientOptions::default()
        }
    }

    #[test]
    fn line_cap() {
        let mut input = b"USER ".to_vec();
        input.extend(std::iter::repeat_n(b'x', 500));
        input.extend(b"\r\nUSER u\r\n");
        let (_, evs) = run(small(), &input);
        assert_eq!(evs, [out("-ERR Line too long\r\n+OK Send PASS\r\n")]);
        // Exactly at the limit (CRLF included) is fine; one more is not.
        let mut line = b"USER ".to_vec();
        line.extend(std::iter::repeat_n(b'u', 32 - 7));
        line.extend(b"\r\n");
        assert_eq!(line.len(), 32);
        let (_, evs) = run(small(), &line);
        assert_eq!(evs, [out("+OK Send PASS\r\n")]);
        line.insert(5, b'u');
        let (_, evs) = run(small(), &line);
        assert_eq!(evs, [out("-ERR Line too long\r\n")]);
        // An overlong AUTH response ends the exchange.
        let mut input = b"AUTH PLAIN\r\n".to_vec();
        input.extend([b'A'; 100]);
        input.extend(b"\r\nNOOP\r\n");
        let (_, evs) = run(small(), &input);
        assert_eq!(
            evs,
            [out("+ \r\n-ERR Line too long\r\n-ERR Log in first\r\n")]
        );
        // Never holds more than the limit while discarding.
        let mut sess = Pop3ClientSession::new(small());
        for _ in 0..100 {
            sess.feed(&[b'y'; 100]);
            let _ = sess.next_step();
            assert!(sess.framer.buffered() <= 32 + 100);
        }
    }

    #[test]
    fn pipelined_bytes_after_pass_are_pending() {
        let input = b"CAPA\r\nUSER u\r\nPASS p\r\nSTAT\r\nLIST\r\nRETR 1\r\n";
        let (mut sess, evs) = run(open(), input);
        assert_eq!(
            evs,
            [
                out(&format!(
                    "+OK Capability list follows\r\nUSER\r\nSASL PLAIN LOGIN\r\n{CAPA_TAIL}+OK Send PASS\r\n"
                )),
                login("u", "p", None)
            ]
        );
        sess.feed(b"QUIT\r");
        assert!(matches!(sess.next_step(), ClientStep::NeedInput));
        assert_eq!(
            s(&sess.login_succeeded(&UpstreamSuccess::default())),
            "+OK Logged in\r\n"
        );
        assert_eq!(s(&sess.take_pending()), "STAT\r\nLIST\r\nRETR 1\r\nQUIT\r");
    }

    #[test]
    fn pipelined_commands_after_failed_pass_run_preauth() {
        let (mut sess, evs) = run(open(), b"USER u\r\nPASS p\r\nPASS p\r\nSTAT\r\n");
        assert_eq!(evs, [out("+OK Send PASS\r\n"), login("u", "p", None)]);
        let reply = sess.login_failed(&LoginFailure {
            kind: FailureKind::BadCredentials,
            reason: "Wrong password".into(),
            upstream_reply: None,
        });
        assert_eq!(s(&reply), "-ERR [AUTH] Wrong password\r\n");
        let mut evs = Vec::new();
        pump(&mut sess, &mut evs);
        // The USER was forgotten with the failure.
        assert_eq!(evs, [out("-ERR Send USER first\r\n-ERR Log in first\r\n")]);
    }

    #[test]
    fn login_failure_codes() {
        let cases = [
            (
                FailureKind::BadCredentials,
                "Wrong password\r\n+OK injected",
                "-ERR [AUTH] Wrong password  +OK injected\r\n",
            ),
            (FailureKind::Rejected, "", "-ERR [AUTH] Login failed\r\n"),
            (
                FailureKind::Throttled,
                "Too many failures; try again in 60 s",
                "-ERR [SYS/TEMP] Too many failures; try again in 60 s\r\n",
            ),
            (
                FailureKind::Unavailable,
                "Server unreachable",
                "-ERR [SYS/TEMP] Server unreachable\r\n",
            ),
        ];
        let (mut sess, _) = run(open(), b"");
        for (kind, reason, expected) in cases {
            let evs = drive(&mut sess, b"USER u\r\nPASS p\r\n", usize::MAX);
            assert_eq!(evs.last(), Some(&login("u", "p", None)));
            let reply = sess.login_failed(&LoginFailure {
                kind,
                reason: reason.into(),
                upstream_reply: parse_refusal("-ERR [AUTH] upstream text"),
            });
            assert_eq!(s(&reply), expected);
        }
        // Not pending: nothing to say.
        assert!(
            sess.login_failed(&LoginFailure {
                kind: FailureKind::Rejected,
                reason: "x".into(),
                upstream_reply: None,
            })
            .is_empty()
        );
        assert!(sess.login_succeeded(&UpstreamSuccess::default()).is_empty());
    }

    #[test]
    fn debug_hides_buffered_password() {
        let mut sess = Pop3ClientSession::new(open());
        sess.feed(b"USER u\r\nPASS hunter2\r\nPASS hunter3");
        let _ = sess.next_step();
        let _ = sess.next_step();
        let dbg = format!("{sess:?}");
        assert!(!dbg.contains("hunter"), "{dbg}");
    }

    /// Deterministic pseudo-random input: no panic, bounded memory, and the
    /// same answers whatever the chunking.
    #[test]
    fn prop_random_input_never_panics() {
        let mut next = xorshift(0x2545_f491_4f6c_dd1d);
        let pieces: [&[u8]; 15] = [
            b"AUTH LOGIN ",
            b"USER u\r\n",
            b"PASS ",
            b"\r\n",
            b"AUTH PLAIN",
            b" ",
            b"*\r\n",
            b"AGEAYg==",
            b"STLS\r\n",
            b"CAPA\r\n",
            b"=",
            b"\n",
            b"QUIT\r\n",
            b"STAT\r\n",
            b"AUTH\r\n",
        ];
        for round in 0..300 {
            let mut input = Vec::new();
            for _ in 0..(next() % 40) {
                if next().is_multiple_of(3) {
                    input.extend((0..next() % 20).map(|_| next() as u8));
                } else {
                    input.extend(pieces[(next() % 15) as usize]);
                }
            }
            let opts = ClientOptions {
                starttls_offered: round % 2 == 0,
                plaintext_login_allowed: round % 3 != 0,
                max_line: 24,
                ..ClientOptions::default()
            };
            let mut a = Pop3ClientSession::new(opts.clone());
            let mut b = Pop3ClientSession::new(opts);
            let mut fast = Vec::new();
            let mut evs = Vec::new();
            for (sess, evs, chunk) in [
                (&mut a, &mut fast, usize::MAX),
                (&mut b, &mut evs, 1 + (next() % 7) as usize),
            ] {
                for part in input.chunks(chunk) {
                    sess.feed(part);
                    pump(sess, evs);
                    match evs.last() {
                        Some(Ev::StartTls(_)) => sess.tls_started(),
                        Some(Ev::Login { .. }) => {
                            let _ = sess.login_failed(&LoginFailure {
                                kind: FailureKind::BadCredentials,
                                reason: "no".into(),
                                upstream_reply: None,
                            });
                            pump(sess, evs);
                        }
                        _ => {}
                    }
                    assert!(sess.framer.buffered() <= 24 + chunk.min(input.len()));
                }
            }
            // STLS throws away input fed with it, which depends on chunking.
            if !fast.iter().any(|e| matches!(e, Ev::StartTls(_))) {
                assert_eq!(fast, evs, "input {:?}", s(&input));
            }
        }
    }

    // ----- upstream side -----

    use crate::testkit::{
        Up, challenge_b64, ob, provide, run_script, send, token, up_feed, xo, xorshift,
    };

    fn lines(list: &[&str]) -> Vec<String> {
        list.iter().map(|l| (*l).to_owned()).collect()
    }

    const GMAIL_CAPA: &[u8] = b"+OK Capability list follows\r\nUSER\r\nRESP-CODES\r\nEXPIRE 0\r\nLOGIN-DELAY 300\r\nTOP\r\nUIDL\r\nX-GOOGLE-RICO\r\nSASL PLAIN XOAUTH2 OAUTHBEARER\r\n.\r\n";

    fn gmail_caps() -> Vec<String> {
        lines(&[
            "USER",
            "RESP-CODES",
            "EXPIRE 0",
            "LOGIN-DELAY 300",
            "TOP",
            "UIDL",
            "X-GOOGLE-RICO",
            "SASL PLAIN XOAUTH2 OAUTHBEARER",
        ])
    }

    #[test]
    fn two_step_xoauth2() {
        let mut u = Pop3UpstreamLogin::new(UpstreamOptions::default());
        assert_eq!(
            up_feed(&mut u, b"+OK Gpop ready for requests from 1.2.3.4\r\n"),
            [send("CAPA\r\n")]
        );
        assert_eq!(up_feed(&mut u, GMAIL_CAPA), [Up::NeedToken]);
        assert_eq!(provide(&mut u), [send("AUTH XOAUTH2\r\n")]);
        assert!(!format!("{u:?}").contains(&xo()));
        assert_eq!(up_feed(&mut u, b"+ \r\n"), [send(&format!("{}\r\n", xo()))]);
        assert_eq!(
            up_feed(&mut u, b"+OK Welcome.\r\n+OK 2 320\r\n"),
            [Up::Ok(gmail_caps(), "+OK 2 320\r\n".into())]
        );
        assert_eq!(up_feed(&mut u, b"more"), []);
    }

    #[test]
    fn continuation_forms_and_initial_response() {
        // `+` alone, and `+` with text, both ask for the response.
        for cont in [&b"+\r\n"[..], b"+ \r\n", b"+ go ahead\r\n"] {
            let mut u = Pop3UpstreamLogin::new(UpstreamOptions::default());
            up_feed(&mut u, b"+OK hi\r\n");
            up_feed(&mut u, GMAIL_CAPA);
            provide(&mut u);
            assert_eq!(up_feed(&mut u, cont), [send(&format!("{}\r\n", xo()))]);
        }
        let opts = UpstreamOptions {
            initial_response: true,
            preference: vec![Mechanism::Oauthbearer, Mechanism::Xoauth2],
            ..UpstreamOptions::default()
        };
        let mut u = Pop3UpstreamLogin::new(opts);
        up_feed(&mut u, b"+OK hi\r\n");
        assert_eq!(up_feed(&mut u, GMAIL_CAPA), [Up::NeedToken]);
        assert_eq!(
            provide(&mut u),
            [send(&format!("AUTH OAUTHBEARER {}\r\n", ob()))]
        );
        assert_eq!(
            up_feed(&mut u, b"+OK Logged in\r\n"),
            [Up::Ok(gmail_caps(), String::new())]
        );
    }

    #[test]
    fn capa_parsing() {
        let mut u = Pop3UpstreamLogin::new(UpstreamOptions {
            preference: vec![Mechanism::Oauthbearer, Mechanism::Xoauth2],
            ..UpstreamOptions::default()
        });
        up_feed(&mut u, b"+OK ready\r\n");
        // Case-insensitive, several SASL lines, a dot-stuffed line.
        assert_eq!(
            up_feed(
                &mut u,
                b"+OK\r\nsasl plain\r\n..odd\r\nSASL xoauth2\r\n.\r\n"
            ),
            [Up::NeedToken]
        );
        assert_eq!(provide(&mut u), [send("AUTH XOAUTH2\r\n")]);
        assert_eq!(u.caps, lines(&["sasl plain", ".odd", "SASL xoauth2"]));
    }

    #[test]
    fn no_mechanism() {
        let mut u = Pop3UpstreamLogin::new(UpstreamOptions::default());
        up_feed(&mut u, b"+OK ready\r\n");
        assert_eq!(
            up_feed(&mut u, b"+OK\r\nUSER\r\nSASL PLAIN LOGIN\r\n.\r\n"),
            [Up::Err(
                "the server offers neither XOAUTH2 nor OAUTHBEARER (it offers: PLAIN LOGIN)".into()
            )]
        );
        assert!(matches!(u.next_step(), Err(UpstreamError::Unexpected(_))));
        let mut u = Pop3UpstreamLogin::new(UpstreamOptions::default());
        up_feed(&mut u, b"+OK ready\r\n");
        let evs = up_feed(&mut u, b"+OK\r\nUSER\r\n.\r\n");
        assert!(matches!(&evs[..], [Up::Err(e)] if e.contains("no SASL mechanisms")));
    }

    #[test]
    fn capa_refused_tries_first_preference() {
        let mut u = Pop3UpstreamLogin::new(UpstreamOptions::default());
        up_feed(&mut u, b"+OK ready\r\n");
        assert_eq!(
            up_feed(&mut u, b"-ERR unknown command\r\n"),
            [Up::NeedToken]
        );
        assert_eq!(provide(&mut u), [send("AUTH XOAUTH2\r\n")]);
        assert_eq!(
            up_feed(&mut u, b"-ERR Unrecognized authentication type\r\n"),
            [Up::Rejected {
                status: None,
                text: "-ERR Unrecognized authentication type".into(),
                retry: false
            }]
        );
        // STLS required but CAPA refused: not offered.
        let mut u = Pop3UpstreamLogin::new(UpstreamOptions {
            starttls: true,
            ..UpstreamOptions::default()
        });
        up_feed(&mut u, b"+OK ready\r\n");
        assert_eq!(
            up_feed(&mut u, b"-ERR no\r\n"),
            [Up::Err("the server does not offer STARTTLS".into())]
        );
    }

    #[test]
    fn stls_path() {
        let opts = UpstreamOptions {
            starttls: true,
            ..UpstreamOptions::default()
        };
        let mut u = Pop3UpstreamLogin::new(opts.clone());
        up_feed(&mut u, b"+OK ready\r\n");
        assert_eq!(
            up_feed(&mut u, b"+OK\r\nSTLS\r\nSASL XOAUTH2\r\nUSER\r\n.\r\n"),
            [send("STLS\r\n")]
        );
        assert_eq!(
            up_feed(&mut u, b"+OK Begin TLS negotiation\r\n+OK injected\r\n"),
            [Up::StartTls]
        );
        u.feed(b"junk before handshake\r\n");
        u.tls_started();
        assert_eq!(up_feed(&mut u, b""), [send("CAPA\r\n")]);
        // Only the new list counts: OAUTHBEARER now, XOAUTH2 gone.
        assert_eq!(
            up_feed(&mut u, b"+OK\r\nSASL OAUTHBEARER\r\nTOP\r\n.\r\n"),
            [Up::NeedToken]
        );
        assert_eq!(provide(&mut u), [send("AUTH OAUTHBEARER\r\n")]);
        up_feed(&mut u, b"+ \r\n");
        assert_eq!(
            up_feed(&mut u, b"+OK Logged in\r\n"),
            [Up::Ok(lines(&["SASL OAUTHBEARER", "TOP"]), String::new())]
        );

        let mut u = Pop3UpstreamLogin::new(opts.clone());
        up_feed(&mut u, b"+OK ready\r\n");
        assert_eq!(
            up_feed(&mut u, b"+OK\r\nSASL XOAUTH2\r\n.\r\n"),
            [Up::Err("the server does not offer STARTTLS".into())]
        );
        let mut u = Pop3UpstreamLogin::new(opts);
        up_feed(&mut u, b"+OK ready\r\n");
        up_feed(&mut u, b"+OK\r\nSTLS\r\n.\r\n");
        let evs = up_feed(&mut u, b"-ERR not now\r\n");
        assert!(matches!(&evs[..], [Up::Err(e)] if e.contains("refused STLS")));
    }

    #[test]
    fn xoauth2_challenge_absorbed_then_retry() {
        let mut u = Pop3UpstreamLogin::new(UpstreamOptions::default());
        up_feed(&mut u, b"+OK ready\r\n");
        up_feed(&mut u, GMAIL_CAPA);
        provide(&mut u);
        up_feed(&mut u, b"+ \r\n");
        let ch = challenge_b64(
            r#"{"status":"401","schemes":"bearer","scope":"https://mail.google.com/"}"#,
        );
        assert_eq!(
            up_feed(&mut u, format!("+ {ch}\r\n").as_bytes()),
            [send("\r\n")]
        );
        assert_eq!(
            up_feed(&mut u, b"-ERR [AUTH] Invalid credentials (Failure)\r\n"),
            [Up::Rejected {
                status: Some("401".into()),
                text: "-ERR [AUTH] Invalid credentials (Failure)".into(),
                retry: true
            }]
        );
        assert_eq!(up_feed(&mut u, b""), []);
        u.retry();
        assert_eq!(up_feed(&mut u, b""), [Up::NeedToken]);
        assert_eq!(provide(&mut u), [send("AUTH XOAUTH2\r\n")]);
        assert_eq!(up_feed(&mut u, b"+ \r\n"), [send(&format!("{}\r\n", xo()))]);
        assert_eq!(
            up_feed(&mut u, b"+OK Welcome.\r\n"),
            [Up::Ok(gmail_caps(), String::new())]
        );
    }

    #[test]
    fn oauthbearer_challenge_acked_with_01() {
        let opts = UpstreamOptions {
            preference: vec![Mechanism::Oauthbearer],
            initial_response: true,
            ..UpstreamOptions::default()
        };
        let mut u = Pop3UpstreamLogin::new(opts);
        up_feed(&mut u, b"+OK ready\r\n");
        up_feed(&mut u, GMAIL_CAPA);
        assert_eq!(
            provide(&mut u),
            [send(&format!("AUTH OAUTHBEARER {}\r\n", ob()))]
        );
        let ch = challenge_b64(r#"{"status":"invalid_token","openid-configuration":"https://x"}"#);
        assert_eq!(
            up_feed(&mut u, format!("+ {ch}\r\n").as_bytes()),
            [send("AQ==\r\n")]
        );
        let evs = up_feed(&mut u, format!("+ {ch}\r\n").as_bytes());
        assert!(matches!(&evs[..], [Up::Err(e)] if e.contains("second challenge")));
    }

    #[test]
    fn oauthbearer_challenge_then_err() {
        let opts = UpstreamOptions {
            preference: vec![Mechanism::Oauthbearer],
            ..UpstreamOptions::default()
        };
        let mut u = Pop3UpstreamLogin::new(opts);
        up_feed(&mut u, b"+OK ready\r\n");
        up_feed(&mut u, GMAIL_CAPA);
        assert_eq!(provide(&mut u), [send("AUTH OAUTHBEARER\r\n")]);
        assert_eq!(up_feed(&mut u, b"+\r\n"), [send(&format!("{}\r\n", ob()))]);
        let ch = challenge_b64(r#"{"status":"403","scope":"pop"}"#);
        assert_eq!(
            up_feed(&mut u, format!("+ {ch}\r\n").as_bytes()),
            [send("AQ==\r\n")]
        );
        assert_eq!(
            up_feed(&mut u, b"-ERR [AUTH] Authentication failed\r\n"),
            [Up::Rejected {
                status: Some("403".into()),
                text: "-ERR [AUTH] Authentication failed".into(),
                retry: false
            }]
        );
    }

    #[test]
    fn direct_err_without_challenge() {
        let mut u = Pop3UpstreamLogin::new(UpstreamOptions::default());
        up_feed(
            &mut u,
            b"+OK The Microsoft Exchange POP3 service is ready.\r\n",
        );
        assert_eq!(
            up_feed(
                &mut u,
                b"+OK\r\nTOP\r\nUIDL\r\nSASL PLAIN XOAUTH2\r\nUSER\r\n.\r\n"
            ),
            [Up::NeedToken]
        );
        provide(&mut u);
        up_feed(&mut u, b"+ \r\n");
        assert_eq!(
            up_feed(
                &mut u,
                b"-ERR Authentication failure: unknown user name or bad password.\r\n"
            ),
            [Up::Rejected {
                status: None,
                text: "-ERR Authentication failure: unknown user name or bad password.".into(),
                retry: false
            }]
        );
    }

    #[test]
    fn bad_greetings_and_answers() {
        for (greeting, what) in [
            (&b"-ERR [SYS/TEMP] busy\r\n"[..], "refused the connection"),
            (b"* OK IMAP4rev1 ready\r\n", "not a POP3 greeting"),
            (b"+OKAY\r\n", "not a POP3 greeting"),
        ] {
            let mut u = Pop3UpstreamLogin::new(UpstreamOptions::default());
            let evs = up_feed(&mut u, greeting);
            assert!(
                matches!(&evs[..], [Up::Err(e)] if e.contains(what)),
                "{evs:?}"
            );
        }
        let mut u = Pop3UpstreamLogin::new(UpstreamOptions::default());
        up_feed(&mut u, b"+OK\r\n");
        up_feed(&mut u, GMAIL_CAPA);
        provide(&mut u);
        let evs = up_feed(&mut u, b"+OK too early\r\n");
        assert!(matches!(&evs[..], [Up::Err(e)] if e.contains("before it got the token")));
        let mut u = Pop3UpstreamLogin::new(UpstreamOptions::default());
        up_feed(&mut u, b"+OK\r\n");
        let evs = up_feed(&mut u, b"hello\r\n");
        assert!(matches!(&evs[..], [Up::Err(e)] if e.contains("CAPA")));
    }

    #[test]
    fn long_server_line() {
        let opts = UpstreamOptions {
            max_line: 64,
            ..UpstreamOptions::default()
        };
        let mut u = Pop3UpstreamLogin::new(opts);
        let mut line = b"+OK ".to_vec();
        line.extend([b'x'; 100]);
        assert_eq!(
            up_feed(&mut u, &line),
            [Up::Err(
                "the server sent a line longer than 64 bytes".into()
            )]
        );
    }

    #[test]
    fn upstream_byte_at_a_time() {
        let script: &[&[u8]] = &[
            b"+OK Dovecot ready.\r\n",
            b"+OK\r\nCAPA\r\nTOP\r\nSASL OAUTHBEARER\r\n.\r\n",
            b"+ \r\n",
            b"+ eyJzdGF0dXMiOiI0MDEifQ==\r\n",
            b"-ERR [AUTH] Authentication failed.\r\n",
        ];
        let run_it = |chunk: usize| {
            let mut u = Pop3UpstreamLogin::new(UpstreamOptions::default());
            run_script(&mut u, script, chunk, &token())
        };
        let whole = run_it(usize::MAX);
        assert_eq!(
            whole,
            [
                send("CAPA\r\n"),
                Up::NeedToken,
                send("AUTH OAUTHBEARER\r\n"),
                send(&format!("{}\r\n", ob())),
                send("AQ==\r\n"),
                Up::Rejected {
                    status: Some("401".into()),
                    text: "-ERR [AUTH] Authentication failed.".into(),
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
            b"+OK ",
            b"SASL XOAUTH2 OAUTHBEARER",
            b"\r\n",
            b"+ ",
            b"-ERR ",
            b".\r\n",
            b"STLS\r\n",
            b"+",
            b"\n",
            b"eyJzdGF0dXMiOjQwMX0=",
        ];
        for round in 0..300 {
            let mut u = Pop3UpstreamLogin::new(UpstreamOptions {
                max_line: 50,
                starttls: round % 2 == 0,
                initial_response: round % 3 == 0,
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
                // While the dialogue reads, it holds at most one line.
                let reading = match u.state {
                    UpState::Greeting | UpState::Capa { .. } | UpState::Stls => true,
                    UpState::Login => u.bearer.awaits_server(),
                    _ => false,
                };
                if reading {
                    assert!(u.framer.buffered() <= 50);
                }
            }
        }
    }
}
