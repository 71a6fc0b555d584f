//! Protocol traces on demand: `mailbridge trace ACCOUNT` asks the running
//! service, through its control socket, for the pre-auth and login
//! dialogue of the account's new sessions on both sides (client and
//! mailbridge, mailbridge and the upstream server), each line marked with
//! its direction and session, until the session enters the byte relay.
//!
//! What is shown is decided by `mailbridge_proto::trace` (passwords,
//! tokens and SASL responses redacted); this module only routes the
//! renderings:
//!
//! - [`Tracer`]: who is watching which account. With nobody watching, a
//!   new connection costs one atomic load ([`Tracer::session`] returns
//!   `None`) and nothing else.
//! - [`SessionTrace`]: one connection's trace. The account is known only
//!   once the client logs in, so lines are kept (at most [`PENDING`]) until
//!   a login names a watched account ([`SessionTrace::login_as`]), then
//!   sent; a session that never does is never shown.
//! - [`Watch`]: a watcher's end: events on a bounded queue ([`QUEUE`]). A
//!   reader that falls behind loses events, and is told how many
//!   ([`What::Dropped`]), rather than making the service buffer.
//! - The upstream connector finds the session's trace with [`current`]
//!   (a task-local value set around the login by [`scoped`]), so no login
//!   function carries it as an argument.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use mailbridge_proto::trace::{Protocol, Side, Transcript};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

/// Events a watcher may have waiting before further ones are dropped.
pub const QUEUE: usize = 512;

/// Events a session keeps before its account is known; beyond this, the
/// session is not traced at all.
pub const PENDING: usize = 200;

/// One thing a trace shows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// The session (a connection to a listener), numbered from 1 since
    /// the service started.
    pub session: u64,
    /// Milliseconds since the connection was accepted.
    pub ms: u64,
    /// What happened.
    #[serde(flatten)]
    pub what: What,
}

/// What an [`Event`] says.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum What {
    /// A line of the dialogue, redacted.
    Line {
        /// Who said it to whom.
        dir: Dir,
        /// The line as rendered by `mailbridge_proto::trace`.
        text: String,
    },
    /// Something mailbridge did (connect, TLS, a decision).
    Note {
        /// One line.
        text: String,
    },
    /// The session's trace ends here (it entered the byte relay, or
    /// closed); the watcher counts these.
    End {
        /// Why.
        text: String,
    },
    /// This many events were dropped because the reader fell behind.
    Dropped {
        /// How many.
        count: u64,
    },
}

/// Who said a [`What::Line`] to whom.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Dir {
    /// The mail client to mailbridge.
    ClientToUs,
    /// Mailbridge to the mail client.
    UsToClient,
    /// Mailbridge to the upstream server.
    UsToServer,
    /// The upstream server to mailbridge.
    ServerToUs,
}

/// What the arrows in [`Event`]'s display mean.
pub const LEGEND: &str =
    "C = the mail client, M = mailbridge, S = the upstream server; credentials show as [redacted]";

impl std::fmt::Display for Event {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let at = format!(
            "[s{} +{}.{:03}s]",
            self.session,
            self.ms / 1000,
            self.ms % 1000
        );
        match &self.what {
            What::Line { dir, text } => {
                let arrow = match dir {
                    Dir::ClientToUs => "C->M",
                    Dir::UsToClient => "M->C",
                    Dir::UsToServer => "M->S",
                    Dir::ServerToUs => "S->M",
                };
                write!(f, "{at} {arrow} {text}")
            }
            What::Note { text } => write!(f, "{at} ---- {text}"),
            What::End { text } => write!(f, "{at} ==== {text}"),
            What::Dropped { count } => write!(
                f,
                "[trace] {count} line(s) dropped here: this reader fell behind"
            ),
        }
    }
}

/// Who is watching which account.
#[derive(Default)]
pub struct Tracer {
    /// How many watchers there are (read once per new connection).
    watching: AtomicUsize,
    watchers: Mutex<Vec<Arc<Watcher>>>,
    next_session: AtomicU64,
}

/// One `mailbridge trace`.
struct Watcher {
    /// The account's name (as `Settings::account_for` gives it).
    account: String,
    events: mpsc::Sender<Event>,
    /// Events not queued because the queue was full.
    dropped: AtomicU64,
}

impl Watcher {
    fn send(&self, event: Event) {
        if let Err(mpsc::error::TrySendError::Full(_)) = self.events.try_send(event) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A watcher's end of a trace; dropping it stops the trace.
pub struct Watch {
    /// The events, in order.
    pub events: mpsc::Receiver<Event>,
    watcher: Arc<Watcher>,
    tracer: Arc<Tracer>,
}

impl Watch {
    /// How many events were dropped since the last call.
    pub fn take_dropped(&self) -> u64 {
        self.watcher.dropped.swap(0, Ordering::Relaxed)
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let mut watchers = self
            .tracer
            .watchers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        watchers.retain(|w| !Arc::ptr_eq(w, &self.watcher));
        self.tracer
            .watching
            .store(watchers.len(), Ordering::Release);
    }
}

impl Tracer {
    /// Nobody watching yet.
    pub fn new() -> Tracer {
        Tracer::default()
    }

    /// Starts watching `account` (a name as `Settings::account_for`
    /// gives it): its sessions from now on.
    pub fn watch(self: &Arc<Self>, account: String) -> Watch {
        let (tx, rx) = mpsc::channel(QUEUE);
        let watcher = Arc::new(Watcher {
            account,
            events: tx,
            dropped: AtomicU64::new(0),
        });
        let mut watchers = self
            .watchers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        watchers.push(watcher.clone());
        self.watching.store(watchers.len(), Ordering::Release);
        Watch {
            events: rx,
            watcher,
            tracer: self.clone(),
        }
    }

    /// The trace of a new connection, or `None` (the usual case, one
    /// atomic load) when nobody is watching.
    pub fn session(
        self: &Arc<Self>,
        protocol: Protocol,
        peer: SocketAddr,
        listener: impl FnOnce() -> Option<SocketAddr>,
    ) -> Option<Arc<SessionTrace>> {
        if self.watching.load(Ordering::Acquire) == 0 {
            return None;
        }
        let id = self.next_session.fetch_add(1, Ordering::Relaxed) + 1;
        let session = Arc::new(SessionTrace {
            id,
            started: Instant::now(),
            protocol,
            tracer: self.clone(),
            inner: Mutex::new(Inner {
                client: Transcript::new(protocol),
                upstream: Transcript::new(protocol),
                target: Target::Pending(Vec::new()),
            }),
        });
        let name = match protocol {
            Protocol::Imap => "IMAP",
            Protocol::Pop3 => "POP3",
            Protocol::Smtp => "SMTP",
        };
        session.note(match listener() {
            Some(l) => format!("{name} connection from {peer} to the listener on {l}"),
            None => format!("{name} connection from {peer}"),
        });
        Some(session)
    }

    fn watchers_of(&self, account: &str) -> Vec<Arc<Watcher>> {
        self.watchers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .filter(|w| w.account == account)
            .cloned()
            .collect()
    }
}

/// One connection's trace.
pub struct SessionTrace {
    id: u64,
    started: Instant,
    protocol: Protocol,
    tracer: Arc<Tracer>,
    inner: Mutex<Inner>,
}

struct Inner {
    /// The client and mailbridge.
    client: Transcript,
    /// Mailbridge and the upstream server.
    upstream: Transcript,
    target: Target,
}

/// Where a session's events go.
enum Target {
    /// No login has named a watched account yet: kept.
    Pending(Vec<Event>),
    /// To these watchers of `account`.
    Watched {
        account: String,
        watchers: Vec<Arc<Watcher>>,
    },
    /// Nowhere.
    Off,
}

impl Inner {
    fn emit(&mut self, event: Event) {
        match &mut self.target {
            Target::Pending(kept) if kept.len() < PENDING => kept.push(event),
            Target::Pending(_) => self.target = Target::Off,
            Target::Watched { watchers, .. } => {
                for w in watchers.iter() {
                    w.send(event.clone());
                }
            }
            Target::Off => {}
        }
    }
}

impl SessionTrace {
    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn event(&self, what: What) -> Event {
        Event {
            session: self.id,
            ms: self.started.elapsed().as_millis() as u64,
            what,
        }
    }

    fn lines(&self, upstream: bool, side: Side, bytes: &[u8], dir: Dir) {
        let mut inner = self.inner();
        if matches!(inner.target, Target::Off) {
            return;
        }
        let transcript = if upstream {
            &mut inner.upstream
        } else {
            &mut inner.client
        };
        for text in transcript.push(side, bytes) {
            let event = self.event(What::Line { dir, text });
            inner.emit(event);
        }
    }

    /// Bytes read from the client.
    pub fn from_client(&self, bytes: &[u8]) {
        self.lines(false, Side::LogsIn, bytes, Dir::ClientToUs);
    }

    /// Bytes written to the client.
    pub fn to_client(&self, bytes: &[u8]) {
        self.lines(false, Side::Answers, bytes, Dir::UsToClient);
    }

    /// Bytes written to the upstream server.
    pub fn to_server(&self, bytes: &[u8]) {
        self.lines(true, Side::LogsIn, bytes, Dir::UsToServer);
    }

    /// Bytes read from the upstream server.
    pub fn from_server(&self, bytes: &[u8]) {
        self.lines(true, Side::Answers, bytes, Dir::ServerToUs);
    }

    /// Something mailbridge did.
    pub fn note(&self, text: impl Into<String>) {
        let event = self.event(What::Note { text: text.into() });
        self.inner().emit(event);
    }

    /// The client's TLS handshake (STARTTLS) is done.
    pub fn client_tls(&self) {
        self.inner().client.reset();
        self.note("TLS handshake with the client done (STARTTLS)");
    }

    /// A new upstream connection (a login may make more than one).
    pub fn upstream_connecting(&self, text: impl Into<String>) {
        self.inner().upstream = Transcript::new(self.protocol);
        self.note(text);
    }

    /// The upstream TLS handshake after STARTTLS is done.
    pub fn upstream_tls(&self) {
        self.inner().upstream.reset();
        self.note("TLS handshake with the server done (STARTTLS)");
    }

    /// A login names `account` (`None`: a name no account takes). The
    /// first login that names a watched account starts showing the
    /// session, what was kept included; a later login as another account
    /// ends it.
    pub fn login_as(&self, account: Option<&str>) {
        let mut inner = self.inner();
        match &inner.target {
            Target::Pending(_) => {
                let Some(account) = account else { return };
                let watchers = self.tracer.watchers_of(account);
                if watchers.is_empty() {
                    return;
                }
                let Target::Pending(kept) = std::mem::replace(
                    &mut inner.target,
                    Target::Watched {
                        account: account.to_string(),
                        watchers,
                    },
                ) else {
                    return;
                };
                for event in kept {
                    inner.emit(event);
                }
            }
            Target::Watched { account: a, .. } if Some(a.as_str()) != account => {
                let event = self.event(What::End {
                    text: "the client logs in as another account now: not traced further".into(),
                });
                inner.emit(event);
                inner.target = Target::Off;
            }
            Target::Watched { .. } | Target::Off => {}
        }
    }

    /// The trace of this session ends (the byte relay starts, say).
    pub fn end(&self, text: impl Into<String>) {
        let mut inner = self.inner();
        if matches!(inner.target, Target::Watched { .. }) {
            let event = self.event(What::End { text: text.into() });
            inner.emit(event);
        }
        inner.target = Target::Off;
    }
}

impl Drop for SessionTrace {
    fn drop(&mut self) {
        let inner = self
            .inner
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if matches!(inner.target, Target::Watched { .. }) {
            let event = Event {
                session: self.id,
                ms: self.started.elapsed().as_millis() as u64,
                what: What::End {
                    text: "the connection closed before the relay".into(),
                },
            };
            inner.emit(event);
        }
    }
}

tokio::task_local! {
    static CURRENT: Arc<SessionTrace>;
}

/// Runs `f` with `trace` as the [`current`] session trace.
pub async fn scoped<F: Future>(trace: Option<Arc<SessionTrace>>, f: F) -> F::Output {
    match trace {
        Some(t) => CURRENT.scope(t, f).await,
        None => f.await,
    }
}

/// The trace of the session this task is logging in for, if it is traced.
pub fn current() -> Option<Arc<SessionTrace>> {
    CURRENT.try_with(Arc::clone).ok()
}

/// How the running configuration names the account a login name opens.
type Resolve = Box<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// What the control socket needs to start traces: the tracer, and how
/// the running configuration names an account.
pub struct Desk {
    tracer: Arc<Tracer>,
    resolve: Resolve,
}

impl Desk {
    /// `resolve` gives the account a login name opens, as the running
    /// configuration says (None: no account).
    pub fn new(
        tracer: Arc<Tracer>,
        resolve: impl Fn(&str) -> Option<String> + Send + Sync + 'static,
    ) -> Desk {
        Desk {
            tracer,
            resolve: Box::new(resolve),
        }
    }

    /// Starts a trace of `asked`: its account's name and the watch, or
    /// why not.
    pub fn start(&self, asked: &str) -> Result<(String, Watch), String> {
        match (self.resolve)(asked) {
            Some(account) => {
                let watch = self.tracer.watch(account.clone());
                tracing::info!(account = %account, "protocol trace started");
                Ok((account, watch))
            }
            None => Err(format!(
                "the running service has no account `{}`: trace the user of an [[account]] in its configuration (or a name a catch-all `*@domain` account takes)",
                mailbridge_proto::text::printable(asked, 200)
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr() -> SocketAddr {
        "127.0.0.1:1".parse().unwrap()
    }

    #[test]
    fn nobody_watching_costs_no_session() {
        let tracer = Arc::new(Tracer::new());
        assert!(tracer.session(Protocol::Imap, addr(), || None).is_none());
        let watch = tracer.watch("a".into());
        assert!(tracer.session(Protocol::Imap, addr(), || None).is_some());
        drop(watch);
        assert!(tracer.session(Protocol::Imap, addr(), || None).is_none());
    }

    #[test]
    fn kept_until_the_account_is_named_and_only_for_it() {
        let tracer = Arc::new(Tracer::new());
        let mut watch = tracer.watch("a".into());
        let other = tracer.session(Protocol::Pop3, addr(), || None).unwrap();
        other.to_client(b"+OK hi\r\n");
        other.login_as(Some("b"));
        drop(other);
        let s = tracer.session(Protocol::Pop3, addr(), || None).unwrap();
        s.to_client(b"+OK hi\r\n");
        s.from_client(b"USER a\r\nPASS secret\r\n");
        assert!(watch.events.try_recv().is_err(), "nothing before the login");
        s.login_as(Some("a"));
        s.end("relay");
        let mut got = Vec::new();
        while let Ok(e) = watch.events.try_recv() {
            got.push(e.to_string());
        }
        let all = got.join("\n");
        assert_eq!(got.len(), 5, "{all}");
        assert!(all.contains("M->C +OK hi"), "{all}");
        assert!(all.contains("C->M PASS [redacted]"), "{all}");
        assert!(!all.contains("secret"), "{all}");
        assert!(got[4].contains("==== relay"), "{all}");
        assert!(got.iter().all(|l| l.starts_with("[s2 ")), "{all}");
    }

    #[test]
    fn a_slow_reader_loses_events_and_is_told() {
        let tracer = Arc::new(Tracer::new());
        let mut watch = tracer.watch("a".into());
        let s = tracer.session(Protocol::Smtp, addr(), || None).unwrap();
        s.login_as(Some("a"));
        for _ in 0..QUEUE + 100 {
            s.to_client(b"250 ok\r\n");
        }
        let dropped = watch.take_dropped();
        assert_eq!(
            dropped, 101,
            "the queue holds {QUEUE} (one went to the note)"
        );
        let mut n = 0;
        while watch.events.try_recv().is_ok() {
            n += 1;
        }
        assert_eq!(n, QUEUE);
    }

    #[test]
    fn a_session_that_never_names_the_account_is_dropped_when_it_talks_too_much() {
        let tracer = Arc::new(Tracer::new());
        let mut watch = tracer.watch("a".into());
        let s = tracer.session(Protocol::Smtp, addr(), || None).unwrap();
        for _ in 0..PENDING + 10 {
            s.from_client(b"NOOP\r\n");
        }
        s.login_as(Some("a"));
        assert!(watch.events.try_recv().is_err());
    }

    #[test]
    fn events_round_trip_as_json() {
        let e = Event {
            session: 3,
            ms: 1234,
            what: What::Line {
                dir: Dir::UsToServer,
                text: "A1 AUTHENTICATE XOAUTH2 [redacted]".into(),
            },
        };
        let line = serde_json::to_string(&e).unwrap();
        assert_eq!(serde_json::from_str::<Event>(&line).unwrap(), e);
        assert_eq!(
            e.to_string(),
            "[s3 +1.234s] M->S A1 AUTHENTICATE XOAUTH2 [redacted]"
        );
    }
}
