//! The sandbox POP3 server: a strict stand-in for Gmail's and Microsoft
//! 365's POP3 as mailbridge sees them upstream. Password logins (USER/PASS,
//! APOP) are disabled; the only way in is AUTH XOAUTH2 or OAUTHBEARER (RFC
//! 5034) with a live access token from the sandbox
//! [`Provider`](super::Provider), and a refused token gets the JSON failure
//! challenge that the client must answer before the `-ERR`.
//!
//! After login it serves the RFC 1939 TRANSACTION state: STAT, LIST, UIDL,
//! RETR and TOP with byte-stuffing, DELE and RSET, with deletions applied
//! only by QUIT (the UPDATE state). The maildrop is snapshotted at login.
//! Messages live in memory per user and are stored byte for byte; they
//! should use CRLF line endings, as POP3 assumes.
//!
//! One tokio task per connection; the session loop is generic over the
//! stream so plain TCP, STLS and implicit TLS share it. Parsing lives in
//! [`syntax`]; this module only moves lines.

pub mod syntax;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use self::syntax::{
    Command, Stuffer, line_count, message_index, parse_command, parse_oauthbearer, parse_xoauth2,
    top_part,
};
use super::net::{Conn, Line};
use super::{SandboxTls, TestPki, TokenValidator};
use mailbridge_proto::sasl::Mechanism;

/// Longest command line accepted, line ending included; longer ones end
/// the connection. Far above RFC 2449's 255 octets so that an AUTH line
/// with a long token still fits.
const MAX_LINE: usize = 16 * 1024;
/// Multi-line responses are written in pieces of about this size, so a
/// large message is never copied whole.
const WRITE_CHUNK: usize = 64 * 1024;
/// The `scope` the failure challenge names.
const CHALLENGE_SCOPE: &str = "https://mail.example/";

/// How the sandbox POP3 server behaves.
#[derive(Debug, Clone)]
pub struct Pop3ServerOptions {
    /// TLS mode. Default [`SandboxTls::Implicit`] (port-995 style).
    pub tls: SandboxTls,
    /// Mechanisms advertised (`SASL ...` in CAPA) and accepted. Default
    /// both, like Gmail; `[Xoauth2]` alone plays Microsoft 365.
    pub mechanisms: Vec<Mechanism>,
    /// Default true: accept `AUTH MECH <initial-response>`. When false an
    /// initial response gets `-ERR` and only the two-step form works.
    pub accept_initial_response: bool,
    /// Default true: a refused token gets the failure challenge. False
    /// plays Microsoft 365, which answers `-ERR Authentication failure:
    /// unknown user name or bad password.` at once (a temporary failure
    /// stays `-ERR [SYS/TEMP]`).
    pub failure_challenge: bool,
}

impl Default for Pop3ServerOptions {
    fn default() -> Self {
        Pop3ServerOptions {
            tls: SandboxTls::Implicit,
            mechanisms: vec![Mechanism::Xoauth2, Mechanism::Oauthbearer],
            accept_initial_response: true,
            failure_challenge: true,
        }
    }
}

/// A handle on a running sandbox POP3 server. Cheap to clone.
#[derive(Clone)]
pub struct Pop3Server {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Pop3Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pop3Server")
            .field("addr", &self.shared.addr)
            .field("tls", &self.shared.opts.tls)
            .finish_non_exhaustive()
    }
}

/// What the accept loop and every connection share.
struct Shared {
    addr: SocketAddr,
    opts: Pop3ServerOptions,
    /// Checks bearer tokens against the provider.
    validator: TokenValidator,
    tls: TlsAcceptor,
    /// All mail; a std mutex, never held across an await.
    store: Mutex<Store>,
    logins: AtomicU64,
    auth_failures: AtomicU64,
    /// Set to true to stop accepting and close every session.
    shutdown: watch::Sender<bool>,
}

impl Shared {
    fn store(&self) -> MutexGuard<'_, Store> {
        // Every store mutation completes without panicking; a poisoned lock
        // still holds consistent data.
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Pop3Server {
    /// Binds 127.0.0.1 on an ephemeral port and serves until
    /// [`Pop3Server::shutdown`].
    pub async fn start(
        opts: Pop3ServerOptions,
        validator: TokenValidator,
        pki: &TestPki,
    ) -> io::Result<Pop3Server> {
        let listener = super::listen_loopback()?;
        let addr = listener.local_addr()?;
        let (shutdown, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            addr,
            opts,
            validator,
            tls: TlsAcceptor::from(pki.server_config()),
            store: Mutex::new(Store::default()),
            logins: AtomicU64::new(0),
            auth_failures: AtomicU64::new(0),
            shutdown,
        });
        tokio::spawn(tokio::task::unconstrained(accept_loop(
            shared.clone(),
            listener,
        )));
        Ok(Pop3Server { shared })
    }

    /// Where the server listens.
    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// Adds a message (exact bytes, CRLF line endings) to a user's maildrop.
    /// Sessions already logged in do not see it (RFC 1939 snapshot).
    pub fn append(&self, user: &str, message: Vec<u8>) {
        self.shared.store().append(user, message);
    }

    /// The messages in a user's maildrop, in order.
    pub fn messages(&self, user: &str) -> Vec<Vec<u8>> {
        self.shared
            .store()
            .maildrop(user)
            .iter()
            .map(|m| m.data.to_vec())
            .collect()
    }

    /// Successful authentications.
    pub fn logins(&self) -> u64 {
        self.shared.logins.load(Ordering::SeqCst)
    }

    /// Refused logins: bad or malformed bearer tokens and password attempts
    /// (USER, PASS, APOP).
    pub fn auth_failures(&self) -> u64 {
        self.shared.auth_failures.load(Ordering::SeqCst)
    }

    /// Stops accepting and closes every open session.
    pub fn shutdown(&self) {
        let _ = self.shared.shutdown.send(true);
    }
}

// ---------------------------------------------------------------------------
// Mail store

#[derive(Default)]
struct Store {
    /// user (lower-cased) -> maildrop
    users: HashMap<String, Vec<Stored>>,
    /// The next unique id (UIDL), never reused.
    next_id: u64,
}

#[derive(Clone)]
struct Stored {
    id: u64,
    /// Shared so a RETR can write it without holding the store lock.
    data: Arc<Vec<u8>>,
}

impl Store {
    fn append(&mut self, user: &str, data: Vec<u8>) {
        self.next_id += 1;
        let id = self.next_id;
        self.users
            .entry(user.to_ascii_lowercase())
            .or_default()
            .push(Stored {
                id,
                data: Arc::new(data),
            });
    }

    fn maildrop(&self, user: &str) -> &[Stored] {
        self.users
            .get(&user.to_ascii_lowercase())
            .map_or(&[], Vec::as_slice)
    }

    fn remove(&mut self, user: &str, ids: &[u64]) {
        if let Some(messages) = self.users.get_mut(&user.to_ascii_lowercase()) {
            messages.retain(|m| !ids.contains(&m.id));
        }
    }
}

// ---------------------------------------------------------------------------
// Connections

async fn accept_loop(shared: Arc<Shared>, listener: TcpListener) {
    let stop = shared.shutdown.subscribe();
    super::net::accept_loop(listener, stop, "POP3", move |tcp| {
        let shared = shared.clone();
        async move { connection(&shared, tcp).await }
    })
    .await;
}

/// One message of the maildrop as a session sees it.
struct Entry {
    id: u64,
    data: Arc<Vec<u8>>,
    deleted: bool,
}

/// Per-connection protocol state.
#[derive(Default)]
struct Session {
    tls: bool,
    /// The authenticated maildrop owner (TRANSACTION state).
    user: Option<String>,
    /// The maildrop snapshot taken at login, with DELE marks.
    maildrop: Vec<Entry>,
}

impl Session {
    /// The live (not deleted) message at a one-based number argument.
    fn message(&self, arg: &str) -> Option<(usize, &Entry)> {
        let index = message_index(arg)?;
        let entry = self.maildrop.get(index).filter(|e| !e.deleted)?;
        Some((index + 1, entry))
    }

    fn live(&self) -> impl Iterator<Item = (usize, &Entry)> {
        self.maildrop
            .iter()
            .enumerate()
            .filter(|(_, e)| !e.deleted)
            .map(|(i, e)| (i + 1, e))
    }
}

/// How a session loop ended.
enum Outcome<S> {
    Closed,
    /// The client asked for STLS; here is the stream, with anything it sent
    /// in plaintext after the command thrown away.
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
        session.tls = true;
        // STLS is refused once in TLS, so this cannot ask again.
        run(shared, tls, &mut session, false).await?;
    }
    Ok(())
}

/// What to do after a command.
enum Next {
    Continue,
    Close,
    StartTls,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    /// A multi-line response: the `+OK` line, the stuffed data, the `.`
    /// line; written in pieces so a large message is not copied whole.
    async fn send_multiline(&mut self, first: &str, data: &[u8]) -> io::Result<()> {
        let mut out = Vec::with_capacity(data.len().min(WRITE_CHUNK) + first.len() + 8);
        out.extend_from_slice(first.as_bytes());
        out.extend_from_slice(b"\r\n");
        let mut stuffer = Stuffer::default();
        let stream = self.io.get_mut();
        for chunk in data.chunks(WRITE_CHUNK) {
            stuffer.push(chunk, &mut out);
            if out.len() >= WRITE_CHUNK {
                stream.write_all(&out).await?;
                out.clear();
            }
        }
        stuffer.finish(&mut out);
        stream.write_all(&out).await?;
        stream.flush().await
    }
}

/// One session loop over any stream: plain TCP, or TLS from the start or
/// after STLS.
async fn run<S: AsyncRead + AsyncWrite + Unpin>(
    shared: &Shared,
    stream: S,
    session: &mut Session,
    greet: bool,
) -> io::Result<Outcome<S>> {
    let mut conn = Conn::new(stream, MAX_LINE);
    if greet {
        conn.send_line("+OK Sandbox POP3 ready").await?;
    }
    loop {
        match conn.read_line().await? {
            Line::Ok => {}
            Line::Eof => return Ok(Outcome::Closed),
            Line::TooLong => {
                conn.send_line("-ERR Line too long").await?;
                return Ok(Outcome::Closed);
            }
        }
        let line = std::mem::take(&mut conn.line);
        let next = execute(shared, &mut conn, session, &line).await?;
        conn.line = line;
        match next {
            Next::Continue => {}
            Next::Close => {
                // Like a real server: TLS close_notify, then FIN.
                let _ = conn.io.get_mut().shutdown().await;
                return Ok(Outcome::Closed);
            }
            // Dropping the BufReader drops whatever plaintext the client
            // pipelined after STLS: it must not count as sent over TLS.
            Next::StartTls => return Ok(Outcome::StartTls(conn.io.into_inner())),
        }
    }
}

fn capabilities(shared: &Shared, session: &Session) -> String {
    let mut caps = String::from("+OK Capability list follows\r\nTOP\r\nUIDL\r\n");
    caps.push_str("RESP-CODES\r\nAUTH-RESP-CODE\r\n");
    if session.user.is_none() {
        if !shared.opts.mechanisms.is_empty() {
            caps.push_str("SASL");
            for m in &shared.opts.mechanisms {
                caps.push(' ');
                caps.push_str(m.name());
            }
            caps.push_str("\r\n");
        }
        if needs_tls_first(shared, session) {
            caps.push_str("STLS\r\n");
        }
    }
    caps.push('.');
    caps
}

fn needs_tls_first(shared: &Shared, session: &Session) -> bool {
    shared.opts.tls == SandboxTls::StartTls && !session.tls
}

async fn execute<S: AsyncRead + AsyncWrite + Unpin>(
    shared: &Shared,
    conn: &mut Conn<S>,
    session: &mut Session,
    line: &[u8],
) -> io::Result<Next> {
    let Some(cmd) = parse_command(line) else {
        conn.send_line("-ERR Unknown command").await?;
        return Ok(Next::Continue);
    };
    let name = cmd.name.as_str();
    let Some(args) = cmd.args() else {
        // PASS takes its rest verbatim, and is refused anyway.
        if name == "PASS" {
            shared.auth_failures.fetch_add(1, Ordering::SeqCst);
            conn.send_line("-ERR [AUTH] Password logins are disabled")
                .await?;
        } else {
            conn.send_line("-ERR Syntax error").await?;
        }
        return Ok(Next::Continue);
    };
    if matches!(name, "CAPA" | "QUIT" | "STLS" | "STAT" | "RSET" | "NOOP") && !args.is_empty() {
        conn.send_line(&format!("-ERR {name} takes no arguments"))
            .await?;
        return Ok(Next::Continue);
    }
    // Commands valid in any state.
    match name {
        "CAPA" => {
            let caps = capabilities(shared, session);
            conn.send_line(&caps).await?;
            return Ok(Next::Continue);
        }
        "QUIT" => {
            // UPDATE state (RFC 1939 section 6): only now do deletions apply.
            if let Some(user) = &session.user {
                let ids: Vec<u64> = session
                    .maildrop
                    .iter()
                    .filter(|e| e.deleted)
                    .map(|e| e.id)
                    .collect();
                shared.store().remove(user, &ids);
            }
            conn.send_line("+OK Sandbox POP3 signing off").await?;
            return Ok(Next::Close);
        }
        _ => {}
    }
    if session.user.is_none() {
        let reply = match name {
            "STLS" if needs_tls_first(shared, session) => {
                conn.send_line("+OK Begin TLS negotiation").await?;
                return Ok(Next::StartTls);
            }
            "STLS" if session.tls => "-ERR TLS is already active".to_string(),
            "STLS" => "-ERR STLS is not available here".to_string(),
            "USER" | "PASS" | "APOP" => {
                shared.auth_failures.fetch_add(1, Ordering::SeqCst);
                "-ERR [AUTH] Password logins are disabled".to_string()
            }
            "AUTH" => authenticate(shared, conn, session, &args).await?,
            _ => format!("-ERR {name} is not valid before authentication"),
        };
        conn.send_line(&reply).await?;
        return Ok(Next::Continue);
    }
    transaction(conn, session, &cmd, &args).await?;
    Ok(Next::Continue)
}

/// AUTH XOAUTH2 / OAUTHBEARER (RFC 5034); returns the final reply line.
async fn authenticate<S: AsyncRead + AsyncWrite + Unpin>(
    shared: &Shared,
    conn: &mut Conn<S>,
    session: &mut Session,
    args: &[&str],
) -> io::Result<String> {
    if needs_tls_first(shared, session) {
        return Ok("-ERR [AUTH] Must issue STLS first".to_string());
    }
    let (mechanism, initial) = match args {
        [] => {
            let mut list = String::from("+OK SASL mechanisms follow");
            for m in &shared.opts.mechanisms {
                list.push_str("\r\n");
                list.push_str(m.name());
            }
            list.push_str("\r\n.");
            return Ok(list);
        }
        [m] => (*m, None),
        [m, ir] => (*m, Some(*ir)),
        _ => return Ok("-ERR Expected AUTH mechanism [initial-response]".to_string()),
    };
    let mechanism = shared
        .opts
        .mechanisms
        .iter()
        .copied()
        .find(|m| m.name().eq_ignore_ascii_case(mechanism));
    let Some(mechanism) = mechanism else {
        return Ok("-ERR Unsupported SASL mechanism".to_string());
    };
    if initial.is_some() && !shared.opts.accept_initial_response {
        return Ok("-ERR Initial response not accepted; use the two-step form".to_string());
    }
    let response = match initial {
        Some(ir) => ir.to_string(),
        None => {
            conn.send(b"+ \r\n").await?;
            match conn.read_line().await? {
                Line::Ok => String::from_utf8_lossy(&conn.line).into_owned(),
                Line::Eof | Line::TooLong => {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
            }
        }
    };
    if response == "*" && initial.is_none() {
        return Ok("-ERR AUTH cancelled".to_string());
    }
    let payload = if response == "=" && initial.is_some() {
        Vec::new()
    } else {
        match STANDARD.decode(&response) {
            Ok(p) => p,
            Err(_) => return Ok("-ERR Invalid base64 in SASL response".to_string()),
        }
    };
    let parsed = match mechanism {
        Mechanism::Xoauth2 => parse_xoauth2(&payload),
        Mechanism::Oauthbearer => parse_oauthbearer(&payload),
    };
    let login = match parsed {
        Ok(login) => login,
        Err(e) => {
            shared.auth_failures.fetch_add(1, Ordering::SeqCst);
            return Ok(format!("-ERR [AUTH] Malformed {}: {e}", mechanism.name()));
        }
    };
    match shared.validator.validate(&login.token, &login.user) {
        Ok(()) => {
            shared.logins.fetch_add(1, Ordering::SeqCst);
            session.maildrop = shared
                .store()
                .maildrop(&login.user)
                .iter()
                .map(|m| Entry {
                    id: m.id,
                    data: m.data.clone(),
                    deleted: false,
                })
                .collect();
            session.user = Some(login.user);
            Ok("+OK Logged in".to_string())
        }
        Err(rejection) => {
            shared.auth_failures.fetch_add(1, Ordering::SeqCst);
            tracing::debug!("sandbox POP3 refused a token: {}", rejection.reason);
            if rejection.temporary {
                // Dovecot, when its token check cannot run: no challenge.
                return Ok("-ERR [SYS/TEMP] Temporary authentication failure.".to_string());
            }
            if !shared.opts.failure_challenge {
                return Ok(
                    "-ERR Authentication failure: unknown user name or bad password.".to_string(),
                );
            }
            let challenge = super::failure_challenge(mechanism, &rejection, CHALLENGE_SCOPE);
            conn.send_line(&format!("+ {}", STANDARD.encode(challenge)))
                .await?;
            match conn.read_line().await? {
                Line::Ok => {}
                Line::Eof | Line::TooLong => return Err(io::ErrorKind::UnexpectedEof.into()),
            }
            // XOAUTH2 (Google's description) wants an empty line; RFC 7628
            // section 3.2.3 wants the single byte %x01.
            let expected: &[u8] = match mechanism {
                Mechanism::Xoauth2 => b"",
                Mechanism::Oauthbearer => b"AQ==",
            };
            Ok(if conn.line == expected {
                "-ERR [AUTH] Authentication failed".to_string()
            } else {
                "-ERR Protocol error: unexpected answer to the failure challenge".to_string()
            })
        }
    }
}

/// The TRANSACTION state (RFC 1939 section 5).
async fn transaction<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Conn<S>,
    session: &mut Session,
    cmd: &Command<'_>,
    args: &[&str],
) -> io::Result<()> {
    let name = cmd.name.as_str();
    let reply = match (name, args) {
        ("STLS" | "USER" | "PASS" | "APOP" | "AUTH", _) => "-ERR Already authenticated".to_string(),
        ("NOOP", _) => "+OK".to_string(),
        ("STAT", _) => {
            let (count, size) = session
                .live()
                .fold((0usize, 0usize), |(n, s), (_, e)| (n + 1, s + e.data.len()));
            format!("+OK {count} {size}")
        }
        ("LIST" | "UIDL", []) => {
            let mut out = format!("+OK {} messages", session.live().count());
            for (n, e) in session.live() {
                if name == "LIST" {
                    out.push_str(&format!("\r\n{n} {}", e.data.len()));
                } else {
                    out.push_str(&format!("\r\n{n} {}", uid(e)));
                }
            }
            out.push_str("\r\n.");
            out
        }
        ("LIST" | "UIDL", [n]) => match session.message(n) {
            Some((n, e)) if name == "LIST" => format!("+OK {n} {}", e.data.len()),
            Some((n, e)) => format!("+OK {n} {}", uid(e)),
            None => "-ERR No such message".to_string(),
        },
        ("RETR", [n]) => match session.message(n) {
            Some((_, e)) => {
                let data = e.data.clone();
                let first = format!("+OK {} octets", data.len());
                return conn.send_multiline(&first, &data).await;
            }
            None => "-ERR No such message".to_string(),
        },
        ("TOP", [n, lines]) => match (session.message(n), line_count(lines)) {
            (Some((_, e)), Some(lines)) => {
                let data = e.data.clone();
                return conn
                    .send_multiline("+OK Top of message follows", top_part(&data, lines))
                    .await;
            }
            (None, _) => "-ERR No such message".to_string(),
            (_, None) => "-ERR Invalid line count".to_string(),
        },
        ("DELE", [n]) => {
            let index = message_index(n).filter(|&i| i < session.maildrop.len());
            match index.and_then(|i| session.maildrop.get_mut(i)) {
                Some(e) if e.deleted => "-ERR Message already deleted".to_string(),
                Some(e) => {
                    e.deleted = true;
                    format!("+OK Message {n} deleted")
                }
                None => "-ERR No such message".to_string(),
            }
        }
        ("RSET", _) => {
            for e in &mut session.maildrop {
                e.deleted = false;
            }
            format!("+OK {} messages", session.maildrop.len())
        }
        ("LIST" | "UIDL" | "RETR" | "TOP" | "DELE", _) => {
            format!("-ERR Wrong arguments for {name}")
        }
        _ => "-ERR Unknown command".to_string(),
    };
    conn.send_line(&reply).await
}

/// A message's unique id for UIDL: printable, 1 to 70 characters.
fn uid(entry: &Entry) -> String {
    format!("sbx{}", entry.id)
}
