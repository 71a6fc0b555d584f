//! The sandbox IMAP server: a strict stand-in for Gmail, Microsoft 365 and
//! Dovecot as mailbridge sees them upstream. Password logins are disabled;
//! the only way in is SASL XOAUTH2 or OAUTHBEARER with a live access token
//! from the sandbox [`Provider`](super::Provider), and a refused token gets
//! the JSON failure challenge that the client must answer before the `NO`.
//!
//! After login it serves enough IMAP4rev1 for the tests, the benchmark and
//! the demo: LIST, SELECT/EXAMINE, FETCH and UID FETCH of whole messages,
//! APPEND with literals, IDLE, ID, NAMESPACE. Messages live in memory per
//! user and mailbox and are stored and served byte for byte.
//!
//! One tokio task per connection; the session loop is generic over the
//! stream so plain TCP, STARTTLS and implicit TLS share it. Parsing lives
//! in [`syntax`]; this module only moves lines and literals.

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
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use self::syntax::{
    Command, FetchItem, LiteralHeader, Part, SeqSet, Token, list_matches, literal_suffix,
    normalize_mailbox, parse_command, parse_fetch_items, parse_oauthbearer, parse_xoauth2,
    peek_tag, quote,
};
use super::net::{Conn, Line};
use super::{SandboxTls, TestPki, TokenValidator};
use mailbridge_proto::sasl::Mechanism;

/// Longest command line accepted; longer ones end the connection.
const MAX_LINE: usize = 64 * 1024;
/// Largest literal after login (the benchmark appends 50 MB messages).
const MAX_LITERAL: u64 = 256 * 1024 * 1024;
/// Largest literal before login (a LOGIN user name or password).
const MAX_PREAUTH_LITERAL: u64 = 8 * 1024;
/// Message bodies at least this large are written straight from the store
/// instead of being copied into the response buffer.
const DIRECT_WRITE: usize = 64 * 1024;
/// The `scope` the failure challenge names.
const CHALLENGE_SCOPE: &str = "https://mail.example/";
/// Capabilities after login.
const AUTHENTICATED_CAPABILITIES: &str = "IMAP4rev1 IDLE NAMESPACE UIDPLUS LITERAL+ ID MOVE";
/// The system flags every mailbox allows.
const SYSTEM_FLAGS: &str = r"\Answered \Flagged \Deleted \Seen \Draft";

/// How the sandbox IMAP server behaves.
#[derive(Debug, Clone)]
pub struct ImapServerOptions {
    /// TLS mode. Default [`SandboxTls::Implicit`] (port-993 style).
    pub tls: SandboxTls,
    /// Mechanisms advertised and accepted. Default both, like Gmail and
    /// Dovecot; `[Xoauth2]` alone plays Microsoft 365.
    pub mechanisms: Vec<Mechanism>,
    /// Default true: advertise SASL-IR and accept an initial response. When
    /// false an initial response gets `BAD`.
    pub sasl_ir: bool,
    /// Default true: the greeting carries `[CAPABILITY ...]`.
    pub capability_in_greeting: bool,
    /// Default true: `TAG OK [CAPABILITY ...]` after authentication; false
    /// gives a plain `TAG OK`, so the client must ask.
    pub capability_in_login_ok: bool,
    /// Default true: a refused token gets the JSON failure challenge, as
    /// Gmail and Dovecot send it. False plays Microsoft 365, which answers
    /// `TAG NO AUTHENTICATE failed.` at once (a temporary failure stays
    /// `NO [UNAVAILABLE]`).
    pub failure_challenge: bool,
    /// Default false. True plays Microsoft 365 after login: every command
    /// first checks the session's token again, and one that was revoked
    /// or has expired ends the session with `* BYE Session invalidated -
    /// AccessTokenExpired`.
    pub bye_on_invalid_token: bool,
    /// Wait this long before the greeting (after the TLS handshake when
    /// TLS is implicit): a server far away or slow to start a session.
    /// Default zero.
    pub greeting_delay: std::time::Duration,
}

impl Default for ImapServerOptions {
    fn default() -> Self {
        ImapServerOptions {
            tls: SandboxTls::Implicit,
            mechanisms: vec![Mechanism::Xoauth2, Mechanism::Oauthbearer],
            sasl_ir: true,
            capability_in_greeting: true,
            capability_in_login_ok: true,
            failure_challenge: true,
            bye_on_invalid_token: false,
            greeting_delay: std::time::Duration::ZERO,
        }
    }
}

/// A handle on a running sandbox IMAP server. Cheap to clone.
#[derive(Clone)]
pub struct ImapServer {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for ImapServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImapServer")
            .field("addr", &self.shared.addr)
            .field("tls", &self.shared.opts.tls)
            .finish_non_exhaustive()
    }
}

/// What the accept loop and every connection share.
struct Shared {
    addr: SocketAddr,
    opts: ImapServerOptions,
    /// Checks bearer tokens against the provider.
    validator: TokenValidator,
    tls: TlsAcceptor,
    /// All mail; a std mutex, never held across an await.
    store: Mutex<Store>,
    logins: AtomicU64,
    auth_failures: AtomicU64,
    /// Parameter list of the last ID command, as sent.
    last_client_id: Mutex<Option<String>>,
    /// Set to true to stop accepting and close every session.
    shutdown: watch::Sender<bool>,
}

impl Shared {
    fn store(&self) -> MutexGuard<'_, Store> {
        // Every store mutation is a single push; a panic elsewhere cannot
        // leave it half-done.
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl ImapServer {
    /// Binds 127.0.0.1 on an ephemeral port and serves until
    /// [`ImapServer::shutdown`].
    pub async fn start(
        opts: ImapServerOptions,
        validator: TokenValidator,
        pki: &TestPki,
    ) -> io::Result<ImapServer> {
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
            last_client_id: Mutex::new(None),
            shutdown,
        });
        tokio::spawn(tokio::task::unconstrained(accept_loop(
            shared.clone(),
            listener,
        )));
        Ok(ImapServer { shared })
    }

    /// Where the server listens.
    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// Adds a message (exact bytes) to a user's mailbox, creating it.
    pub fn append(&self, user: &str, mailbox: &str, message: Vec<u8>) {
        self.shared
            .store()
            .append(user, &normalize_mailbox(mailbox), Vec::new(), message);
    }

    /// The messages in a user's mailbox, in order.
    pub fn messages(&self, user: &str, mailbox: &str) -> Vec<Vec<u8>> {
        let store = self.shared.store();
        store
            .mailbox(user, &normalize_mailbox(mailbox))
            .map(|mb| mb.messages.iter().map(|m| m.data.to_vec()).collect())
            .unwrap_or_default()
    }

    /// Successful authentications.
    pub fn logins(&self) -> u64 {
        self.shared.logins.load(Ordering::SeqCst)
    }

    /// Refused logins: bad or malformed bearer tokens and LOGIN attempts.
    pub fn auth_failures(&self) -> u64 {
        self.shared.auth_failures.load(Ordering::SeqCst)
    }

    /// The raw parameter list of the last ID command, e.g. `("name" "x")`.
    pub fn last_client_id(&self) -> Option<String> {
        self.shared
            .last_client_id
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
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
    /// user (lower-cased) -> mailbox name -> mailbox
    users: HashMap<String, HashMap<String, Mailbox>>,
}

struct Mailbox {
    messages: Vec<Message>,
    uid_next: u32,
}

impl Default for Mailbox {
    fn default() -> Self {
        Mailbox {
            messages: Vec::new(),
            uid_next: 1,
        }
    }
}

#[derive(Clone)]
struct Message {
    uid: u32,
    flags: Vec<String>,
    /// Shared so a FETCH can write it without holding the store lock.
    data: Arc<Vec<u8>>,
}

impl Store {
    fn mailbox(&self, user: &str, name: &str) -> Option<&Mailbox> {
        self.users.get(&user.to_ascii_lowercase())?.get(name)
    }

    /// INBOX always exists; others once created or appended to.
    fn exists(&self, user: &str, name: &str) -> bool {
        name == "INBOX" || self.mailbox(user, name).is_some()
    }

    fn create(&mut self, user: &str, name: &str) {
        self.users
            .entry(user.to_ascii_lowercase())
            .or_default()
            .entry(name.to_string())
            .or_default();
    }

    /// Returns the new message's UID and the mailbox's message count.
    fn append(&mut self, user: &str, name: &str, flags: Vec<String>, data: Vec<u8>) -> (u32, u32) {
        let mailbox = self
            .users
            .entry(user.to_ascii_lowercase())
            .or_default()
            .entry(name.to_string())
            .or_default();
        let uid = mailbox.uid_next;
        mailbox.uid_next += 1;
        mailbox.messages.push(Message {
            uid,
            flags,
            data: Arc::new(data),
        });
        (uid, count(mailbox.messages.len()))
    }

    /// INBOX first, then the others in name order.
    fn names(&self, user: &str) -> Vec<String> {
        let mut names: Vec<String> = self
            .users
            .get(&user.to_ascii_lowercase())
            .map(|m| m.keys().filter(|n| *n != "INBOX").cloned().collect())
            .unwrap_or_default();
        names.sort();
        names.insert(0, "INBOX".to_string());
        names
    }
}

fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

// ---------------------------------------------------------------------------
// Connections

async fn accept_loop(shared: Arc<Shared>, listener: TcpListener) {
    let stop = shared.shutdown.subscribe();
    super::net::accept_loop(listener, stop, "IMAP", move |tcp| {
        let shared = shared.clone();
        async move { connection(&shared, tcp).await }
    })
    .await;
}

/// Per-connection protocol state.
#[derive(Debug, Default)]
struct Session {
    tls: bool,
    /// The authenticated mailbox owner.
    user: Option<String>,
    /// The token the session logged in with, when it is to be checked
    /// again ([`ImapServerOptions::bye_on_invalid_token`]).
    token: Option<HeldToken>,
    /// The selected mailbox and whether it was opened with EXAMINE.
    selected: Option<(String, bool)>,
}

/// A bearer token kept for later checks; `Debug` does not show it.
struct HeldToken(String);

impl std::fmt::Debug for HeldToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HeldToken(..)")
    }
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
        session.tls = true;
        // STARTTLS is refused once in TLS, so this cannot ask again.
        run(shared, tls, &mut session, false).await?;
    }
    Ok(())
}

/// Result of reading one whole command.
enum Read {
    Command(Vec<Part>),
    /// The command was answered already (a refused literal).
    Answered,
    /// End of stream, or a protocol violation that ends the session.
    Close,
}

/// What to do after a command.
enum Next {
    Continue,
    Close,
    StartTls,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    /// Reads a command line and any literals it announces.
    async fn read_command(&mut self, authenticated: bool) -> io::Result<Read> {
        let mut parts = Vec::new();
        let mut tag: Option<String> = None;
        loop {
            match self.read_line().await? {
                Line::Ok => {}
                Line::Eof => return Ok(Read::Close),
                Line::TooLong => {
                    self.send_line("* BYE Line too long").await?;
                    return Ok(Read::Close);
                }
            }
            if tag.is_none() {
                tag = Some(peek_tag(&self.line).unwrap_or("*").to_string());
            }
            let Some((text_len, LiteralHeader { size, non_sync })) = literal_suffix(&self.line)
            else {
                parts.push(Part::Text(std::mem::take(&mut self.line)));
                return Ok(Read::Command(parts));
            };
            let limit = if authenticated {
                MAX_LITERAL
            } else {
                MAX_PREAUTH_LITERAL
            };
            if size > limit {
                if non_sync {
                    // The data is already on its way and we will not read it.
                    self.send_line("* BYE Literal too large").await?;
                    return Ok(Read::Close);
                }
                let tag = tag.unwrap_or_default();
                self.send_line(&format!("{tag} NO [TOOBIG] Literal too large"))
                    .await?;
                return Ok(Read::Answered);
            }
            parts.push(Part::Text(self.line[..text_len].to_vec()));
            if !non_sync {
                self.send(b"+ Ready for literal data\r\n").await?;
            }
            let size = usize::try_from(size).map_err(|_| io::ErrorKind::InvalidData)?;
            let mut data = vec![0; size];
            self.io.read_exact(&mut data).await?;
            parts.push(Part::Literal(data));
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
    let mut conn = Conn::new(stream, MAX_LINE);
    if greet && !shared.opts.greeting_delay.is_zero() {
        tokio::time::sleep(shared.opts.greeting_delay).await;
    }
    if greet {
        let greeting = if shared.opts.capability_in_greeting {
            format!(
                "* OK [CAPABILITY {}] Sandbox IMAP ready",
                capabilities(shared, session)
            )
        } else {
            "* OK Sandbox IMAP ready".to_string()
        };
        conn.send_line(&greeting).await?;
    }
    loop {
        let parts = match conn.read_command(session.user.is_some()).await? {
            Read::Command(parts) => parts,
            Read::Answered => continue,
            Read::Close => return Ok(Outcome::Closed),
        };
        let command = match parse_command(parts) {
            Ok(c) => c,
            Err(e) => {
                let tag = e.tag.as_deref().unwrap_or("*");
                conn.send_line(&format!("{tag} BAD {e}")).await?;
                continue;
            }
        };
        match execute(shared, &mut conn, session, command).await? {
            Next::Continue => {}
            Next::Close => {
                // Like a real server: TLS close_notify, then FIN.
                let _ = conn.io.get_mut().shutdown().await;
                return Ok(Outcome::Closed);
            }
            // Dropping the BufReader drops whatever plaintext the client
            // pipelined after STARTTLS: it must not count as sent over TLS.
            Next::StartTls => return Ok(Outcome::StartTls(conn.io.into_inner())),
        }
    }
}

fn capabilities(shared: &Shared, session: &Session) -> String {
    if session.user.is_some() {
        return AUTHENTICATED_CAPABILITIES.to_string();
    }
    let mut caps = String::from("IMAP4rev1");
    if shared.opts.sasl_ir {
        caps.push_str(" SASL-IR");
    }
    for m in &shared.opts.mechanisms {
        caps.push_str(" AUTH=");
        caps.push_str(m.name());
    }
    caps.push_str(" ID LITERAL+");
    if shared.opts.tls == SandboxTls::StartTls && !session.tls {
        caps.push_str(" STARTTLS");
    }
    caps.push_str(" LOGINDISABLED");
    caps
}

fn needs_tls_first(shared: &Shared, session: &Session) -> bool {
    shared.opts.tls == SandboxTls::StartTls && !session.tls
}

async fn execute<S: AsyncRead + AsyncWrite + Unpin>(
    shared: &Shared,
    conn: &mut Conn<S>,
    session: &mut Session,
    cmd: Command,
) -> io::Result<Next> {
    let tag = cmd.tag.as_str();
    let no_args = cmd.args.is_empty();
    let name = cmd.name.as_str();
    if let Some(HeldToken(token)) = &session.token
        && let Err(rejection) = shared
            .validator
            .validate(token, session.user.as_deref().unwrap_or_default())
    {
        tracing::debug!("sandbox IMAP ends a session: {}", rejection.reason);
        conn.send_line("* BYE Session invalidated - AccessTokenExpired")
            .await?;
        return Ok(Next::Close);
    }
    // Commands valid in any state.
    match name {
        "CAPABILITY" | "NOOP" | "LOGOUT" | "STARTTLS" | "IDLE" | "NAMESPACE" | "CHECK"
        | "CLOSE" | "UNSELECT"
            if !no_args =>
        {
            conn.send_line(&format!("{tag} BAD {name} takes no arguments"))
                .await?;
            return Ok(Next::Continue);
        }
        "CAPABILITY" => {
            let caps = capabilities(shared, session);
            conn.send_line(&format!(
                "* CAPABILITY {caps}\r\n{tag} OK CAPABILITY completed"
            ))
            .await?;
            return Ok(Next::Continue);
        }
        "NOOP" => {
            conn.send_line(&format!("{tag} OK NOOP completed")).await?;
            return Ok(Next::Continue);
        }
        "LOGOUT" => {
            conn.send_line(&format!(
                "* BYE Sandbox IMAP logging out\r\n{tag} OK LOGOUT completed"
            ))
            .await?;
            return Ok(Next::Close);
        }
        "ID" => {
            *shared
                .last_client_id
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = Some(cmd.raw_args.clone());
            conn.send_line(&format!(
                "* ID (\"name\" \"sandbox-imap\")\r\n{tag} OK ID completed"
            ))
            .await?;
            return Ok(Next::Continue);
        }
        _ => {}
    }
    if session.user.is_none() {
        let reply = match name {
            "STARTTLS" if needs_tls_first(shared, session) => {
                conn.send_line(&format!("{tag} OK Begin TLS negotiation now"))
                    .await?;
                return Ok(Next::StartTls);
            }
            "STARTTLS" => format!("{tag} BAD STARTTLS is not available here"),
            "LOGIN" => {
                shared.auth_failures.fetch_add(1, Ordering::SeqCst);
                if needs_tls_first(shared, session) {
                    format!("{tag} NO [PRIVACYREQUIRED] LOGIN is disabled; use STARTTLS")
                } else {
                    format!(
                        "{tag} NO [AUTHENTICATIONFAILED] LOGIN is disabled; use AUTHENTICATE with a bearer token"
                    )
                }
            }
            "AUTHENTICATE" => authenticate(shared, conn, session, &cmd).await?,
            _ => format!("{tag} BAD {name} is not valid before authentication"),
        };
        conn.send_line(&reply).await?;
        return Ok(Next::Continue);
    }
    let user = session.user.clone().unwrap_or_default();
    let reply = match name {
        "STARTTLS" | "LOGIN" | "AUTHENTICATE" => format!("{tag} BAD Already authenticated"),
        "NAMESPACE" => {
            format!("* NAMESPACE ((\"\" \"/\")) NIL NIL\r\n{tag} OK NAMESPACE completed")
        }
        "IDLE" => {
            conn.send_line("+ idling").await?;
            match conn.read_line().await? {
                Line::Ok if conn.line.eq_ignore_ascii_case(b"DONE") => {
                    format!("{tag} OK IDLE terminated")
                }
                Line::Ok => format!("{tag} BAD Expected DONE"),
                Line::Eof | Line::TooLong => return Ok(Next::Close),
            }
        }
        "LIST" | "LSUB" => list(shared, &user, &cmd),
        "CREATE" => match cmd.args.as_slice() {
            [mailbox] => match mailbox.astring().map(|m| normalize_mailbox(&m)) {
                Some(mailbox) => {
                    let mut store = shared.store();
                    if store.exists(&user, &mailbox) {
                        format!("{tag} NO [ALREADYEXISTS] Mailbox already exists")
                    } else {
                        store.create(&user, &mailbox);
                        format!("{tag} OK CREATE completed")
                    }
                }
                None => format!("{tag} BAD Expected a mailbox name"),
            },
            _ => format!("{tag} BAD Expected a mailbox name"),
        },
        "SELECT" | "EXAMINE" => select(shared, session, &user, &cmd),
        "CLOSE" | "UNSELECT" | "CHECK" if session.selected.is_none() => {
            format!("{tag} BAD No mailbox selected")
        }
        "CLOSE" | "UNSELECT" => {
            session.selected = None;
            format!("{tag} OK {name} completed")
        }
        "CHECK" => format!("{tag} OK CHECK completed"),
        "APPEND" => append(shared, session, &user, cmd),
        "FETCH" => fetch(shared, conn, session, &user, &cmd, &cmd.args, false).await?,
        "UID" => match cmd.args.split_first() {
            Some((Token::Atom(sub), rest)) if sub.eq_ignore_ascii_case("FETCH") => {
                fetch(shared, conn, session, &user, &cmd, rest, true).await?
            }
            _ => format!("{tag} BAD Only UID FETCH is supported"),
        },
        _ => format!("{tag} BAD Unknown command {name}"),
    };
    conn.send_line(&reply).await?;
    Ok(Next::Continue)
}

/// AUTHENTICATE XOAUTH2 / OAUTHBEARER; returns the final tagged reply.
async fn authenticate<S: AsyncRead + AsyncWrite + Unpin>(
    shared: &Shared,
    conn: &mut Conn<S>,
    session: &mut Session,
    cmd: &Command,
) -> io::Result<String> {
    let tag = &cmd.tag;
    if needs_tls_first(shared, session) {
        return Ok(format!(
            "{tag} NO [PRIVACYREQUIRED] Use STARTTLS before authenticating"
        ));
    }
    let (mechanism, initial) = match cmd.args.as_slice() {
        [Token::Atom(m)] => (m, None),
        [Token::Atom(m), Token::Atom(ir)] => (m, Some(ir.clone())),
        _ => {
            return Ok(format!(
                "{tag} BAD Expected AUTHENTICATE mechanism [initial-response]"
            ));
        }
    };
    let mechanism = shared
        .opts
        .mechanisms
        .iter()
        .copied()
        .find(|m| m.name().eq_ignore_ascii_case(mechanism));
    let Some(mechanism) = mechanism else {
        return Ok(format!("{tag} NO Unsupported authentication mechanism"));
    };
    if initial.is_some() && !shared.opts.sasl_ir {
        return Ok(format!("{tag} BAD SASL-IR is not supported"));
    }
    let response = match initial {
        Some(ir) => ir,
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
    if response == "*" {
        return Ok(format!("{tag} BAD AUTHENTICATE cancelled"));
    }
    let payload = if response == "=" {
        Vec::new()
    } else {
        match STANDARD.decode(&response) {
            Ok(p) => p,
            Err(_) => return Ok(format!("{tag} BAD Invalid base64 in SASL response")),
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
            return Ok(format!(
                "{tag} NO [AUTHENTICATIONFAILED] Malformed {}: {e}",
                mechanism.name()
            ));
        }
    };
    match shared.validator.validate(&login.token, &login.user) {
        Ok(()) => {
            shared.logins.fetch_add(1, Ordering::SeqCst);
            if shared.opts.bye_on_invalid_token {
                session.token = Some(HeldToken(login.token.clone()));
            }
            session.user = Some(login.user);
            Ok(if shared.opts.capability_in_login_ok {
                format!("{tag} OK [CAPABILITY {AUTHENTICATED_CAPABILITIES}] Authenticated")
            } else {
                format!("{tag} OK Authenticated")
            })
        }
        Err(rejection) => {
            shared.auth_failures.fetch_add(1, Ordering::SeqCst);
            tracing::debug!("sandbox IMAP refused a token: {}", rejection.reason);
            if rejection.temporary {
                // Dovecot, when its token check cannot run: no challenge.
                return Ok(format!(
                    "{tag} NO [UNAVAILABLE] Temporary authentication failure."
                ));
            }
            if !shared.opts.failure_challenge {
                return Ok(format!("{tag} NO AUTHENTICATE failed."));
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
                format!("{tag} NO [AUTHENTICATIONFAILED] Invalid credentials")
            } else {
                format!("{tag} BAD Unexpected answer to the failure challenge")
            })
        }
    }
}

fn list(shared: &Shared, user: &str, cmd: &Command) -> String {
    let tag = &cmd.tag;
    let (reference, pattern) = match cmd.args.as_slice() {
        [r, p] => match (r.astring(), p.astring()) {
            (Some(r), Some(p)) => (r, p),
            _ => return format!("{tag} BAD Expected LIST reference pattern"),
        },
        _ => return format!("{tag} BAD Expected LIST reference pattern"),
    };
    let mut out = String::new();
    if pattern.is_empty() {
        out.push_str("* LIST (\\Noselect) \"/\" \"\"\r\n");
    } else {
        let full = format!("{reference}{pattern}");
        for name in shared.store().names(user) {
            let matched = list_matches(full.as_bytes(), name.as_bytes())
                || (name == "INBOX" && full.eq_ignore_ascii_case("INBOX"));
            if matched {
                out.push_str(&format!(
                    "* {} (\\HasNoChildren) \"/\" {}\r\n",
                    cmd.name,
                    quote(&name)
                ));
            }
        }
    }
    out.push_str(&format!("{tag} OK {} completed", cmd.name));
    out
}

fn select(shared: &Shared, session: &mut Session, user: &str, cmd: &Command) -> String {
    let tag = &cmd.tag;
    // A failed SELECT leaves no mailbox selected (RFC 3501 section 6.3.1).
    session.selected = None;
    let Some(name) = (match cmd.args.as_slice() {
        [m] => m.astring().map(|m| normalize_mailbox(&m)),
        _ => None,
    }) else {
        return format!("{tag} BAD Expected a mailbox name");
    };
    let store = shared.store();
    if !store.exists(user, &name) {
        return format!("{tag} NO [NONEXISTENT] Mailbox does not exist");
    }
    let (exists, uid_next) = store
        .mailbox(user, &name)
        .map(|mb| (count(mb.messages.len()), mb.uid_next))
        .unwrap_or((0, 1));
    drop(store);
    let read_only = cmd.name == "EXAMINE";
    session.selected = Some((name, read_only));
    let (code, verb) = if read_only {
        ("READ-ONLY", "EXAMINE")
    } else {
        ("READ-WRITE", "SELECT")
    };
    format!(
        "* {exists} EXISTS\r\n* 0 RECENT\r\n* FLAGS ({SYSTEM_FLAGS})\r\n\
         * OK [PERMANENTFLAGS ({SYSTEM_FLAGS} \\*)] Flags permitted\r\n\
         * OK [UIDVALIDITY 1] UIDs valid\r\n* OK [UIDNEXT {uid_next}] Predicted next UID\r\n\
         {tag} OK [{code}] {verb} completed"
    )
}

fn append(shared: &Shared, session: &Session, user: &str, cmd: Command) -> String {
    let tag = &cmd.tag;
    let bad = || format!("{tag} BAD Expected APPEND mailbox [(flags)] [\"date\"] literal");
    let mut args = cmd.args.into_iter().peekable();
    let Some(mailbox) = args.next().as_ref().and_then(Token::astring) else {
        return bad();
    };
    let mailbox = normalize_mailbox(&mailbox);
    let mut flags = Vec::new();
    if args.peek() == Some(&Token::Open) {
        args.next();
        loop {
            match args.next() {
                Some(Token::Close) => break,
                Some(Token::Atom(flag)) if flag.starts_with('\\') || !flag.contains('\\') => {
                    flags.push(flag);
                }
                _ => return bad(),
            }
        }
    }
    if let Some(Token::Quoted(_)) = args.peek() {
        // The date: the sandbox does not keep internal dates.
        args.next();
    }
    let (Some(Token::Literal(data)), None) = (args.next(), args.next()) else {
        return bad();
    };
    let (uid, exists) = shared.store().append(user, &mailbox, flags, data.clone());
    let mut reply = String::new();
    if session
        .selected
        .as_ref()
        .is_some_and(|(m, _)| *m == mailbox)
    {
        reply.push_str(&format!("* {exists} EXISTS\r\n"));
    }
    reply.push_str(&format!("{tag} OK [APPENDUID 1 {uid}] APPEND completed"));
    reply
}

/// FETCH / UID FETCH of whole messages; writes the untagged responses and
/// returns the tagged reply.
async fn fetch<S: AsyncRead + AsyncWrite + Unpin>(
    shared: &Shared,
    conn: &mut Conn<S>,
    session: &Session,
    user: &str,
    cmd: &Command,
    args: &[Token],
    by_uid: bool,
) -> io::Result<String> {
    let tag = &cmd.tag;
    let Some((mailbox, _)) = &session.selected else {
        return Ok(format!("{tag} BAD No mailbox selected"));
    };
    let Some((Token::Atom(set), items)) = args.split_first() else {
        return Ok(format!("{tag} BAD Expected FETCH sequence-set items"));
    };
    let Some(set) = SeqSet::parse(set) else {
        return Ok(format!("{tag} BAD Invalid sequence set"));
    };
    let mut items = match parse_fetch_items(items) {
        Ok(items) => items,
        Err(e) => return Ok(format!("{tag} BAD {e}")),
    };
    if by_uid && !items.contains(&FetchItem::Uid) {
        items.insert(0, FetchItem::Uid);
    }
    // Snapshot under the lock; write after releasing it.
    let selected: Vec<(u32, Message)> = {
        let store = shared.store();
        let messages = store
            .mailbox(user, mailbox)
            .map(|mb| mb.messages.as_slice())
            .unwrap_or_default();
        let total = count(messages.len());
        if by_uid {
            let max_uid = messages.last().map_or(0, |m| m.uid);
            messages
                .iter()
                .enumerate()
                .filter(|(_, m)| set.contains(m.uid, max_uid))
                .map(|(i, m)| (count(i + 1), m.clone()))
                .collect()
        } else {
            if total == 0 || set.max_number() > total {
                return Ok(format!("{tag} BAD Invalid message sequence number"));
            }
            messages
                .iter()
                .enumerate()
                .filter(|(i, _)| set.contains(count(i + 1), total))
                .map(|(i, m)| (count(i + 1), m.clone()))
                .collect()
        }
    };
    let mut out: Vec<u8> = Vec::new();
    for (seq, message) in selected {
        out.extend_from_slice(format!("* {seq} FETCH (").as_bytes());
        for (i, item) in items.iter().enumerate() {
            if i > 0 {
                out.push(b' ');
            }
            let name = match item {
                FetchItem::Flags => {
                    out.extend_from_slice(
                        format!("FLAGS ({})", message.flags.join(" ")).as_bytes(),
                    );
                    continue;
                }
                FetchItem::Uid => {
                    out.extend_from_slice(format!("UID {}", message.uid).as_bytes());
                    continue;
                }
                FetchItem::Size => {
                    out.extend_from_slice(format!("RFC822.SIZE {}", message.data.len()).as_bytes());
                    continue;
                }
                FetchItem::InternalDate => {
                    out.extend_from_slice(b"INTERNALDATE \"01-Jan-2024 00:00:00 +0000\"");
                    continue;
                }
                FetchItem::Body { .. } => "BODY[]",
                FetchItem::Rfc822 => "RFC822",
            };
            out.extend_from_slice(format!("{name} {{{}}}\r\n", message.data.len()).as_bytes());
            if message.data.len() >= DIRECT_WRITE {
                conn.io.get_mut().write_all(&out).await?;
                out.clear();
                conn.io.get_mut().write_all(&message.data).await?;
            } else {
                out.extend_from_slice(&message.data);
            }
        }
        out.extend_from_slice(b")\r\n");
        if out.len() >= DIRECT_WRITE {
            conn.io.get_mut().write_all(&out).await?;
            out.clear();
        }
    }
    if !out.is_empty() {
        conn.io.get_mut().write_all(&out).await?;
    }
    let verb = if by_uid { "UID FETCH" } else { "FETCH" };
    Ok(format!("{tag} OK {verb} completed"))
}
