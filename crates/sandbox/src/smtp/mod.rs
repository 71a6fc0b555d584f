//! The sandbox SMTP server: a strict stand-in for Gmail's and Microsoft
//! 365's submission ports as mailbridge sees them upstream. Password logins
//! are not offered; the only way in is SASL XOAUTH2 or OAUTHBEARER with a
//! live access token from the sandbox [`Provider`](super::Provider), and a
//! refused token gets the JSON failure challenge (`334 <base64>`) that the
//! client must answer before the `535`. Optionally it refuses every AUTH
//! with one fixed reply, as Microsoft does when SMTP AUTH is disabled.
//!
//! After login it accepts mail: MAIL FROM, RCPT TO, DATA (dot-unstuffed,
//! stored byte for byte), RSET, NOOP, QUIT; pipelined commands are read
//! from one buffer in order.
//!
//! One tokio task per connection; the session loop is generic over the
//! stream so plain TCP, STARTTLS and implicit TLS share it. Parsing lives
//! in [`syntax`]; this module only moves lines and message bodies. A
//! connection holds a 1 KiB read buffer while idle; DATA reads in 64 KiB
//! steps and returns to the small buffer afterwards.

pub mod syntax;
#[cfg(test)]
mod tests;

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use self::syntax::{Command, DataReader, decode_sasl, parse_command, trim_eol};
use super::imap::syntax::{parse_oauthbearer, parse_xoauth2};
use super::{SandboxTls, TestPki, TokenValidator};
use mailbridge_proto::sasl::Mechanism;

/// Read buffer per connection while reading commands.
const READ_BUFFER: usize = 1024;
/// Read size while receiving a message body.
const DATA_CHUNK: usize = 64 * 1024;
/// Longest command line accepted (RFC 4954 asks for 12288 octets for AUTH
/// lines; Microsoft tokens make long ones). Longer ends the connection.
const MAX_LINE: usize = 16 * 1024;
/// The `scope` the failure challenge names.
const CHALLENGE_SCOPE: &str = "https://mail.example/";
/// Our name in the greeting and EHLO.
const HOSTNAME: &str = "localhost";

/// How the sandbox SMTP server behaves.
#[derive(Debug, Clone)]
pub struct SmtpServerOptions {
    /// TLS mode. Default [`SandboxTls::StartTls`] (port-587 style).
    pub tls: SandboxTls,
    /// Mechanisms advertised and accepted. Default both, like Gmail;
    /// `[Xoauth2]` alone plays Microsoft 365.
    pub mechanisms: Vec<Mechanism>,
    /// Default false. When true, `AUTH MECH <initial-response>` gets `501`
    /// and only the two-step form (`AUTH MECH`, `334 `, response) works.
    pub require_two_step: bool,
    /// When Some, every AUTH gets exactly this reply, with no `334`
    /// challenge (e.g. `535 5.7.139 Authentication unsuccessful,
    /// SmtpClientAuthentication is disabled for the Tenant.`): Microsoft
    /// with SMTP AUTH switched off.
    pub auth_failure_reply: Option<String>,
    /// The SIZE advertised and enforced. Default 64 MiB.
    pub max_size: u64,
    /// Longest AUTH command line, CRLF included, whose initial response is
    /// still read whole. Default 2048, Postfix's `line_length_limit`: a
    /// longer line is cut there, and the cut initial response is refused
    /// as Postfix refuses it (`535 5.7.8 Error: authentication failed:
    /// Invalid base64 data in initial response`). SASL responses after a
    /// `334` may be longer (Postfix: 12288 octets).
    pub max_auth_line: usize,
    /// Default true: a refused token gets the `334` failure challenge, as
    /// Gmail sends it. False plays Microsoft 365, which answers `535 5.7.3
    /// Authentication unsuccessful` at once (a temporary failure stays
    /// `454`).
    pub failure_challenge: bool,
    /// More EHLO keywords, advertised after SIZE (e.g. `SMTPUTF8`, `DSN`,
    /// as Postfix offers them): only advertised, their parameters are not
    /// taken. Default none.
    pub extra_ehlo: Vec<String>,
}

impl Default for SmtpServerOptions {
    fn default() -> Self {
        SmtpServerOptions {
            tls: SandboxTls::StartTls,
            mechanisms: vec![Mechanism::Xoauth2, Mechanism::Oauthbearer],
            require_two_step: false,
            auth_failure_reply: None,
            max_size: 64 * 1024 * 1024,
            max_auth_line: 2048,
            failure_challenge: true,
            extra_ehlo: Vec::new(),
        }
    }
}

/// A message the server accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedMessage {
    /// The authenticated mailbox that sent it.
    pub user: String,
    /// The MAIL FROM address (empty for `<>`).
    pub from: String,
    /// The RCPT TO addresses, in order.
    pub to: Vec<String>,
    /// The exact bytes after dot-unstuffing, CRLFs preserved, without the
    /// final `.` line.
    pub data: Vec<u8>,
}

/// A handle on a running sandbox SMTP server. Cheap to clone.
#[derive(Clone)]
pub struct SmtpServer {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for SmtpServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmtpServer")
            .field("addr", &self.shared.addr)
            .field("tls", &self.shared.opts.tls)
            .finish_non_exhaustive()
    }
}

/// What the accept loop and every connection share.
struct Shared {
    addr: SocketAddr,
    opts: SmtpServerOptions,
    /// Checks bearer tokens against the provider.
    validator: TokenValidator,
    tls: TlsAcceptor,
    /// Accepted mail; a std mutex, never held across an await.
    messages: Mutex<Vec<ReceivedMessage>>,
    logins: AtomicU64,
    auth_failures: AtomicU64,
    /// The argument of the last EHLO or HELO.
    last_ehlo: Mutex<Option<String>>,
    /// MAIL commands still to answer with Microsoft's throttling reply.
    throttled: AtomicU64,
    /// Down: connections get `421` and are closed.
    down: std::sync::atomic::AtomicBool,
    /// Recipients refused for good (`550 5.1.1`).
    unknown_recipients: Mutex<Vec<String>>,
    /// Set to true to stop accepting and close every session.
    shutdown: watch::Sender<bool>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every mutation is a single push or store; a panic elsewhere cannot
    // leave it half-done.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl SmtpServer {
    /// Binds 127.0.0.1 on an ephemeral port and serves until
    /// [`SmtpServer::shutdown`].
    pub async fn start(
        opts: SmtpServerOptions,
        validator: TokenValidator,
        pki: &TestPki,
    ) -> io::Result<SmtpServer> {
        let listener = super::listen_loopback()?;
        let addr = listener.local_addr()?;
        let (shutdown, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            addr,
            opts,
            validator,
            tls: TlsAcceptor::from(pki.server_config()),
            messages: Mutex::new(Vec::new()),
            logins: AtomicU64::new(0),
            auth_failures: AtomicU64::new(0),
            last_ehlo: Mutex::new(None),
            throttled: AtomicU64::new(0),
            down: std::sync::atomic::AtomicBool::new(false),
            unknown_recipients: Mutex::new(Vec::new()),
            shutdown,
        });
        tokio::spawn(tokio::task::unconstrained(accept_loop(
            shared.clone(),
            listener,
        )));
        Ok(SmtpServer { shared })
    }

    /// Where the server listens.
    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// Every message accepted so far, in order.
    pub fn messages(&self) -> Vec<ReceivedMessage> {
        lock(&self.shared.messages).clone()
    }

    /// How many messages were accepted and are still kept.
    pub fn message_count(&self) -> usize {
        lock(&self.shared.messages).len()
    }

    /// Forgets the messages accepted so far (the benchmark sends hundreds
    /// of megabytes over a run).
    pub fn clear_messages(&self) {
        *lock(&self.shared.messages) = Vec::new();
    }

    /// Successful authentications.
    pub fn logins(&self) -> u64 {
        self.shared.logins.load(Ordering::SeqCst)
    }

    /// Refused authentications (bad, malformed or refused-by-option).
    pub fn auth_failures(&self) -> u64 {
        self.shared.auth_failures.load(Ordering::SeqCst)
    }

    /// The argument of the last EHLO (or HELO) any client sent.
    pub fn last_ehlo(&self) -> Option<String> {
        lock(&self.shared.last_ehlo).clone()
    }

    /// The next `n` MAIL commands get Microsoft's throttling reply,
    /// `451 4.7.500 Server busy. Please try again later.`
    pub fn throttle_mail(&self, n: u64) {
        self.shared.throttled.store(n, Ordering::SeqCst);
    }

    /// While down, every new connection is greeted with `421 4.3.2` and
    /// closed (an outage that still answers TCP).
    pub fn set_down(&self, down: bool) {
        self.shared.down.store(down, Ordering::SeqCst);
    }

    /// RCPT TO `address` gets `550 5.1.1` from now on.
    pub fn refuse_recipient(&self, address: &str) {
        lock(&self.shared.unknown_recipients).push(address.to_owned());
    }

    /// Stops accepting and closes every open session.
    pub fn shutdown(&self) {
        let _ = self.shared.shutdown.send(true);
    }
}

// ---------------------------------------------------------------------------
// Connections

async fn accept_loop(shared: Arc<Shared>, listener: TcpListener) {
    let stop = shared.shutdown.subscribe();
    super::net::accept_loop(listener, stop, "SMTP", move |tcp| {
        let shared = shared.clone();
        async move { connection(&shared, tcp).await }
    })
    .await;
}

/// A mail transaction in progress.
#[derive(Debug)]
struct Transaction {
    from: String,
    to: Vec<String>,
}

/// Per-connection protocol state.
#[derive(Debug, Default)]
struct Session {
    tls: bool,
    /// EHLO or HELO seen (since the last STARTTLS).
    greeted: bool,
    /// The authenticated mailbox.
    user: Option<String>,
    transaction: Option<Transaction>,
}

/// How a session loop ended.
enum Outcome<S> {
    Closed,
    /// The client asked for STARTTLS; here is the stream, with anything it
    /// sent in plaintext after the command thrown away.
    StartTls(S),
}

async fn connection(shared: &Shared, tcp: TcpStream) -> io::Result<()> {
    tcp.set_nodelay(true)?;
    let mut session = Session::default();
    if shared.opts.tls == SandboxTls::Implicit {
        let tls = super::net::accept_tls(&shared.tls, tcp).await?;
        session.tls = true;
        run(shared, tls, &mut session, true).await?;
        return Ok(());
    }
    if let Outcome::StartTls(tcp) = run(shared, tcp, &mut session, true).await? {
        let tls = super::net::accept_tls(&shared.tls, tcp).await?;
        // RFC 3207 section 4.2: start over, the client must EHLO again.
        session = Session {
            tls: true,
            ..Session::default()
        };
        // STARTTLS is refused once in TLS, so this cannot ask again.
        run(shared, tls, &mut session, false).await?;
    }
    Ok(())
}

/// The stream and the bytes read from it but not yet used.
struct Conn<S> {
    io: S,
    buf: Vec<u8>,
    /// `buf[start..]` is unread.
    start: usize,
}

/// Result of reading one line.
enum Line {
    /// The line, with its line ending.
    Ok(Vec<u8>),
    Eof,
    TooLong,
}

/// What to do after a command.
enum Next {
    Continue,
    Close,
    StartTls,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    fn new(io: S) -> Self {
        Conn {
            io,
            buf: Vec::with_capacity(READ_BUFFER),
            start: 0,
        }
    }

    fn unread(&self) -> &[u8] {
        &self.buf[self.start..]
    }

    fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.buf.len());
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
    }

    /// Reads up to `want` more bytes; 0 at end of stream.
    async fn fill(&mut self, want: usize) -> io::Result<usize> {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        let old = self.buf.len();
        self.buf.resize(old + want, 0);
        let result = self.io.read(&mut self.buf[old..]).await;
        let n = *result.as_ref().unwrap_or(&0);
        self.buf.truncate(old + n);
        result
    }

    /// Back to a small buffer after a big message.
    fn shrink(&mut self) {
        if self.buf.capacity() > 4 * READ_BUFFER && self.unread().len() <= READ_BUFFER {
            self.buf.drain(..self.start);
            self.start = 0;
            self.buf.shrink_to(READ_BUFFER);
        }
    }

    async fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.io.write_all(bytes).await?;
        self.io.flush().await
    }

    async fn send_line(&mut self, line: &str) -> io::Result<()> {
        let mut bytes = Vec::with_capacity(line.len() + 2);
        bytes.extend_from_slice(line.as_bytes());
        bytes.extend_from_slice(b"\r\n");
        self.send(&bytes).await
    }

    async fn read_line(&mut self) -> io::Result<Line> {
        let mut scanned = 0;
        loop {
            if let Some(p) = self.unread()[scanned..].iter().position(|&b| b == b'\n') {
                let end = scanned + p + 1;
                if end > MAX_LINE {
                    return Ok(Line::TooLong);
                }
                let line = self.unread()[..end].to_vec();
                self.consume(end);
                return Ok(Line::Ok(line));
            }
            scanned = self.unread().len();
            if scanned >= MAX_LINE {
                return Ok(Line::TooLong);
            }
            if self.fill(READ_BUFFER).await? == 0 {
                return Ok(Line::Eof);
            }
        }
    }

    /// A SASL response line, without its line ending; None at end of
    /// stream or for an overlong line.
    async fn read_response(&mut self) -> io::Result<Option<String>> {
        Ok(match self.read_line().await? {
            Line::Ok(line) => Some(String::from_utf8_lossy(trim_eol(&line)).into_owned()),
            Line::Eof | Line::TooLong => None,
        })
    }

    /// A message body after `354`; None if it was over `max`. Reads only
    /// up to the final `.` line: pipelined commands after it stay unread.
    async fn read_data(&mut self, max: u64) -> io::Result<Option<Vec<u8>>> {
        let mut reader = DataReader::new(max);
        loop {
            if !self.unread().is_empty() {
                let used = reader.ingest(self.unread());
                self.consume(used);
                if reader.done() {
                    self.shrink();
                    return Ok(reader.finish());
                }
            }
            if self.fill(DATA_CHUNK).await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
    }
}

/// One session loop over any stream: plain TCP, or TLS from the start or
/// after STARTTLS.
async fn run<S: AsyncRead + AsyncWrite + Unpin>(
    shared: &Shared,
    stream: S,
    session: &mut Session,
    greet: bool,
) -> io::Result<Outcome<S>> {
    let mut conn = Conn::new(stream);
    if greet && shared.down.load(Ordering::SeqCst) {
        conn.send_line("421 4.3.2 Service not available, closing transmission channel")
            .await?;
        return Ok(Outcome::Closed);
    }
    if greet {
        conn.send_line(&format!("220 {HOSTNAME} ESMTP Sandbox SMTP ready"))
            .await?;
    }
    loop {
        let line = match conn.read_line().await? {
            Line::Ok(line) => line,
            Line::Eof => return Ok(Outcome::Closed),
            Line::TooLong => {
                conn.send_line("500 5.5.2 Line too long").await?;
                let _ = conn.io.shutdown().await;
                return Ok(Outcome::Closed);
            }
        };
        match execute(shared, &mut conn, session, &line).await? {
            Next::Continue => {}
            Next::Close => {
                // Like a real server: TLS close_notify, then FIN.
                let _ = conn.io.shutdown().await;
                return Ok(Outcome::Closed);
            }
            // Dropping the buffer drops whatever plaintext the client
            // pipelined after STARTTLS: it must not count as sent over TLS.
            Next::StartTls => return Ok(Outcome::StartTls(conn.io)),
        }
    }
}

fn needs_tls_first(shared: &Shared, session: &Session) -> bool {
    shared.opts.tls == SandboxTls::StartTls && !session.tls
}

fn ehlo_reply(shared: &Shared, session: &Session, host: &str) -> String {
    let mut lines = vec![
        format!("{HOSTNAME} greets {host}"),
        "PIPELINING".to_owned(),
        "8BITMIME".to_owned(),
        "ENHANCEDSTATUSCODES".to_owned(),
        format!("SIZE {}", shared.opts.max_size),
    ];
    lines.extend(shared.opts.extra_ehlo.iter().cloned());
    if needs_tls_first(shared, session) {
        lines.push("STARTTLS".to_owned());
    } else if !shared.opts.mechanisms.is_empty() {
        let names: Vec<&str> = shared.opts.mechanisms.iter().map(|m| m.name()).collect();
        lines.push(format!("AUTH {}", names.join(" ")));
    }
    let last = lines.len() - 1;
    lines
        .iter()
        .enumerate()
        .map(|(i, l)| format!("250{}{l}", if i == last { ' ' } else { '-' }))
        .collect::<Vec<_>>()
        .join("\r\n")
}

async fn execute<S: AsyncRead + AsyncWrite + Unpin>(
    shared: &Shared,
    conn: &mut Conn<S>,
    session: &mut Session,
    line: &[u8],
) -> io::Result<Next> {
    let command = match parse_command(line) {
        Ok(c) => c,
        Err(reply) => {
            conn.send_line(&reply).await?;
            return Ok(Next::Continue);
        }
    };
    let authenticated = session.user.is_some();
    let reply = match command {
        Command::Helo(host) => {
            *lock(&shared.last_ehlo) = Some(host);
            session.greeted = true;
            session.transaction = None;
            format!("250 {HOSTNAME}")
        }
        Command::Ehlo(host) => {
            let reply = ehlo_reply(shared, session, &host);
            *lock(&shared.last_ehlo) = Some(host);
            session.greeted = true;
            session.transaction = None;
            reply
        }
        Command::StartTls if needs_tls_first(shared, session) => {
            conn.send_line("220 2.0.0 Ready to start TLS").await?;
            return Ok(Next::StartTls);
        }
        Command::StartTls if session.tls => "503 5.5.1 TLS already active".to_owned(),
        Command::StartTls => "502 5.5.1 STARTTLS not available".to_owned(),
        Command::Auth { mechanism, initial } => {
            authenticate(shared, conn, session, mechanism, initial).await?
        }
        Command::Mail { .. } | Command::Rcpt { .. } | Command::Data if !authenticated => {
            "530 5.7.0 Authentication Required".to_owned()
        }
        Command::Mail { .. } if session.transaction.is_some() => {
            "503 5.5.1 Sender already specified".to_owned()
        }
        Command::Mail { size, .. } if size > shared.opts.max_size => {
            "552 5.3.4 Message size exceeds fixed maximum message size".to_owned()
        }
        Command::Mail { .. }
            if shared
                .throttled
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok() =>
        {
            "451 4.7.500 Server busy. Please try again later. [sandbox]".to_owned()
        }
        Command::Mail { from, .. } => {
            session.transaction = Some(Transaction {
                from,
                to: Vec::new(),
            });
            "250 2.1.0 OK".to_owned()
        }
        Command::Rcpt { to } if lock(&shared.unknown_recipients).contains(&to) => {
            "550 5.1.1 User unknown [sandbox]".to_owned()
        }
        Command::Rcpt { to } => match &mut session.transaction {
            Some(tx) => {
                tx.to.push(to);
                "250 2.1.5 OK".to_owned()
            }
            None => "503 5.5.1 Need MAIL command".to_owned(),
        },
        Command::Data => match session.transaction.take() {
            None => "503 5.5.1 Need MAIL command".to_owned(),
            Some(tx) if tx.to.is_empty() => {
                session.transaction = Some(tx);
                "503 5.5.1 Need RCPT command".to_owned()
            }
            Some(tx) => {
                conn.send_line("354 Go ahead").await?;
                match conn.read_data(shared.opts.max_size).await? {
                    Some(data) => {
                        lock(&shared.messages).push(ReceivedMessage {
                            user: session.user.clone().unwrap_or_default(),
                            from: tx.from,
                            to: tx.to,
                            data,
                        });
                        "250 2.0.0 OK queued".to_owned()
                    }
                    None => "552 5.3.4 Message size exceeds fixed maximum message size".to_owned(),
                }
            }
        },
        Command::Rset => {
            session.transaction = None;
            "250 2.0.0 OK".to_owned()
        }
        Command::Noop => "250 2.0.0 OK".to_owned(),
        Command::Quit => {
            conn.send_line("221 2.0.0 Bye").await?;
            return Ok(Next::Close);
        }
        Command::Vrfy => "252 2.1.5 Cannot VRFY user, but will accept message".to_owned(),
        Command::Unsupported(name) => format!("502 5.5.1 {name} not implemented"),
    };
    conn.send_line(&reply).await?;
    Ok(Next::Continue)
}

/// AUTH XOAUTH2 / OAUTHBEARER; returns the final reply.
async fn authenticate<S: AsyncRead + AsyncWrite + Unpin>(
    shared: &Shared,
    conn: &mut Conn<S>,
    session: &mut Session,
    mechanism: Option<Mechanism>,
    initial: Option<String>,
) -> io::Result<String> {
    if !session.greeted {
        return Ok("503 5.5.1 EHLO first".to_owned());
    }
    if needs_tls_first(shared, session) {
        return Ok("530 5.7.0 Must issue a STARTTLS command first".to_owned());
    }
    if session.user.is_some() {
        return Ok("503 5.5.1 Already authenticated".to_owned());
    }
    let Some(mechanism) = mechanism.filter(|m| shared.opts.mechanisms.contains(m)) else {
        return Ok("504 5.5.4 Unrecognized authentication type".to_owned());
    };
    if let Some(reply) = &shared.opts.auth_failure_reply {
        shared.auth_failures.fetch_add(1, Ordering::SeqCst);
        return Ok(reply.clone());
    }
    if let Some(ir) = &initial {
        // "AUTH " MECH " " RESPONSE CRLF, as Postfix counts it.
        if 5 + mechanism.name().len() + 1 + ir.len() + 2 > shared.opts.max_auth_line {
            shared.auth_failures.fetch_add(1, Ordering::SeqCst);
            return Ok(
                "535 5.7.8 Error: authentication failed: Invalid base64 data in initial response"
                    .to_owned(),
            );
        }
    }
    if initial.is_some() && shared.opts.require_two_step {
        return Ok(
            "501 5.5.2 Initial response not accepted; send AUTH with the mechanism alone"
                .to_owned(),
        );
    }
    let response = match initial {
        Some(ir) => ir,
        None => {
            conn.send(b"334 \r\n").await?;
            match conn.read_response().await? {
                Some(line) => line,
                None => return Err(io::ErrorKind::UnexpectedEof.into()),
            }
        }
    };
    if response == "*" {
        return Ok("501 5.0.0 Authentication cancelled".to_owned());
    }
    let Some(payload) = decode_sasl(&response) else {
        return Ok("501 5.5.2 Cannot decode response".to_owned());
    };
    let parsed = match mechanism {
        Mechanism::Xoauth2 => parse_xoauth2(&payload),
        Mechanism::Oauthbearer => parse_oauthbearer(&payload),
    };
    let login = match parsed {
        Ok(login) => login,
        Err(e) => {
            shared.auth_failures.fetch_add(1, Ordering::SeqCst);
            return Ok(format!("535 5.7.8 Malformed {}: {e}", mechanism.name()));
        }
    };
    match shared.validator.validate(&login.token, &login.user) {
        Ok(()) => {
            shared.logins.fetch_add(1, Ordering::SeqCst);
            session.user = Some(login.user);
            Ok("235 2.7.0 Accepted".to_owned())
        }
        Err(rejection) => {
            shared.auth_failures.fetch_add(1, Ordering::SeqCst);
            tracing::debug!("sandbox SMTP refused a token: {}", rejection.reason);
            if rejection.temporary {
                // RFC 4954's temporary authentication failure, no challenge.
                return Ok("454 4.7.0 Temporary authentication failure".to_owned());
            }
            if !shared.opts.failure_challenge {
                return Ok("535 5.7.3 Authentication unsuccessful".to_owned());
            }
            let challenge = super::failure_challenge(mechanism, &rejection, CHALLENGE_SCOPE);
            conn.send_line(&format!("334 {}", STANDARD.encode(challenge)))
                .await?;
            let Some(answer) = conn.read_response().await? else {
                return Err(io::ErrorKind::UnexpectedEof.into());
            };
            // XOAUTH2 (Google's description) wants an empty line; RFC 7628
            // section 3.2.3 wants the single byte %x01.
            let expected = match mechanism {
                Mechanism::Xoauth2 => "",
                Mechanism::Oauthbearer => "AQ==",
            };
            Ok(if answer == expected {
                "535 5.7.8 Username and Password not accepted".to_owned()
            } else {
                "501 5.5.2 Unexpected answer to the failure challenge".to_owned()
            })
        }
    }
}
