//! Reaching a server by name: the name resolved once per short while
//! rather than per login, and its addresses tried the way RFC 8305
//! ("Happy Eyeballs v2") says, so that an address that does not answer
//! (an IPv6 route that black-holes, a dead server behind a round-robin
//! name) costs a quarter of a second, not the whole connect timeout.
//!
//! [`Dialer`] holds the cache and does the racing; where names are
//! resolved ([`Resolve`]) and how one address is connected to
//! ([`Connect`]) are seams, the system's resolver and a TCP connect by
//! default, so that a test can hand it an address that never answers
//! without sending anything off this machine.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use tokio::net::TcpStream;

/// How long a name's addresses are used before it is resolved again.
/// The system resolver does not tell the record's TTL; half a minute is
/// short enough to follow a provider moving its servers and long enough
/// that a burst of logins costs one lookup.
pub const CACHE_TIME: Duration = Duration::from_secs(30);

/// How long one address gets before the next is tried alongside
/// (RFC 8305's "Connection Attempt Delay", 250 ms recommended).
pub const ATTEMPT_DELAY: Duration = Duration::from_millis(250);

/// Names kept at most; past it, expired ones are dropped.
const MAX_NAMES: usize = 256;

/// The cache: (lower-case host, port) -> when resolved, the addresses in
/// the order they are tried.
type Cache = HashMap<(String, u16), (Instant, Arc<[SocketAddr]>)>;

/// A future as the seams return it.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Where a name's addresses come from.
pub trait Resolve: Send + Sync + 'static {
    /// The addresses of `host` (a name or an address literal) with `port`,
    /// in the order the resolver prefers.
    fn resolve<'a>(
        &'a self,
        host: &'a str,
        port: u16,
    ) -> BoxFuture<'a, io::Result<Vec<SocketAddr>>>;
}

/// How one address is connected to.
pub trait Connect: Send + Sync + 'static {
    /// A TCP connection to `addr`.
    fn connect(&self, addr: SocketAddr) -> BoxFuture<'static, io::Result<TcpStream>>;
}

/// The system's resolver (`getaddrinfo`, on a blocking thread).
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemResolver;

impl Resolve for SystemResolver {
    fn resolve<'a>(
        &'a self,
        host: &'a str,
        port: u16,
    ) -> BoxFuture<'a, io::Result<Vec<SocketAddr>>> {
        Box::pin(async move { Ok(tokio::net::lookup_host((host, port)).await?.collect()) })
    }
}

/// A plain TCP connect.
#[derive(Debug, Default, Clone, Copy)]
pub struct TcpConnector;

impl Connect for TcpConnector {
    fn connect(&self, addr: SocketAddr) -> BoxFuture<'static, io::Result<TcpStream>> {
        Box::pin(TcpStream::connect(addr))
    }
}

/// Why no connection was made.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// The name did not resolve (or to no address).
    #[error("cannot resolve the name")]
    Resolve(#[source] io::Error),
    /// Every address failed; the error of the last one to fail.
    #[error("no address answered")]
    Connect(#[source] io::Error),
}

/// Resolves names (with a cache) and connects to the first of their
/// addresses that answers. One per process is enough ([`Dialer::shared`]).
pub struct Dialer {
    resolver: Arc<dyn Resolve>,
    connector: Arc<dyn Connect>,
    cache_time: Duration,
    attempt_delay: Duration,
    /// Names resolved lately.
    cache: Mutex<Cache>,
    /// Lookups made (cache misses).
    lookups: AtomicU64,
}

impl std::fmt::Debug for Dialer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dialer")
            .field("cache_time", &self.cache_time)
            .field("attempt_delay", &self.attempt_delay)
            .field("lookups", &self.lookups())
            .finish_non_exhaustive()
    }
}

impl Default for Dialer {
    fn default() -> Self {
        Dialer::new(Arc::new(SystemResolver), Arc::new(TcpConnector))
    }
}

impl Dialer {
    /// A dialer over `resolver` and `connector`, with [`CACHE_TIME`] and
    /// [`ATTEMPT_DELAY`].
    pub fn new(resolver: Arc<dyn Resolve>, connector: Arc<dyn Connect>) -> Dialer {
        Dialer {
            resolver,
            connector,
            cache_time: CACHE_TIME,
            attempt_delay: ATTEMPT_DELAY,
            cache: Mutex::new(HashMap::new()),
            lookups: AtomicU64::new(0),
        }
    }

    /// The process's dialer: the system's resolver, TCP, the defaults.
    /// Upstream logins share it, and so its cache.
    pub fn shared() -> &'static Dialer {
        static SHARED: OnceLock<Dialer> = OnceLock::new();
        SHARED.get_or_init(Dialer::default)
    }

    /// Keeps a name's addresses for `d` instead of [`CACHE_TIME`] (zero:
    /// resolve every time).
    pub fn with_cache_time(mut self, d: Duration) -> Dialer {
        self.cache_time = d;
        self
    }

    /// Starts the next address after `d` instead of [`ATTEMPT_DELAY`].
    pub fn with_attempt_delay(mut self, d: Duration) -> Dialer {
        self.attempt_delay = d;
        self
    }

    /// How many times a name was resolved (not found in the cache).
    pub fn lookups(&self) -> u64 {
        self.lookups.load(Ordering::Relaxed)
    }

    /// The addresses of `host`:`port` in the order they are tried: from
    /// the cache while fresh, else resolved and interleaved by family
    /// (RFC 8305 section 4: the resolver's first family first).
    pub async fn addresses(&self, host: &str, port: u16) -> Result<Arc<[SocketAddr]>, DialError> {
        let key = (host.to_ascii_lowercase(), port);
        if let Some((at, addrs)) = self.lock().get(&key)
            && at.elapsed() < self.cache_time
        {
            return Ok(addrs.clone());
        }
        self.lookups.fetch_add(1, Ordering::Relaxed);
        let found = self
            .resolver
            .resolve(host, port)
            .await
            .map_err(DialError::Resolve)?;
        if found.is_empty() {
            return Err(DialError::Resolve(io::Error::new(
                io::ErrorKind::NotFound,
                "the name has no address",
            )));
        }
        let addrs: Arc<[SocketAddr]> = interleave(found).into();
        if !self.cache_time.is_zero() {
            let mut cache = self.lock();
            if cache.len() >= MAX_NAMES {
                let keep = self.cache_time;
                cache.retain(|_, (at, _)| at.elapsed() < keep);
                if cache.len() >= MAX_NAMES {
                    cache.clear();
                }
            }
            cache.insert(key, (Instant::now(), addrs.clone()));
        }
        Ok(addrs)
    }

    /// A TCP connection to `host`:`port`: its addresses (see
    /// [`Dialer::addresses`]) tried in turn, each started when the one
    /// before has failed or has not connected within the attempt delay;
    /// the first to connect wins and the others are dropped. The winner
    /// is tried first next time; a name none of whose addresses answered
    /// is resolved again next time. Not bounded in time here: the
    /// caller's connect timeout bounds it.
    pub async fn connect(&self, host: &str, port: u16) -> Result<TcpStream, DialError> {
        let addrs = self.addresses(host, port).await?;
        let key = (host.to_ascii_lowercase(), port);
        match self.race(&addrs).await {
            Ok((winner, stream)) => {
                if addrs.first() != Some(&winner) {
                    let mut reordered = vec![winner];
                    reordered.extend(addrs.iter().filter(|a| **a != winner));
                    if let Some((_, cached)) = self.lock().get_mut(&key) {
                        *cached = reordered.into();
                    }
                }
                Ok(stream)
            }
            Err(e) => {
                self.lock().remove(&key);
                Err(DialError::Connect(e))
            }
        }
    }

    async fn race(&self, addrs: &[SocketAddr]) -> io::Result<(SocketAddr, TcpStream)> {
        let mut attempts = tokio::task::JoinSet::new();
        let mut queue = addrs.iter().copied();
        let mut last: Option<io::Error> = None;
        let mut start_next = true;
        loop {
            if std::mem::take(&mut start_next)
                && let Some(addr) = queue.next()
            {
                let connect = self.connector.connect(addr);
                attempts.spawn(async move { (addr, connect.await) });
            }
            let more = queue.len() > 0;
            if attempts.is_empty() {
                if !more {
                    return Err(last.unwrap_or_else(|| {
                        io::Error::new(io::ErrorKind::NotFound, "the name has no address")
                    }));
                }
                start_next = true;
                continue;
            }
            tokio::select! {
                biased;
                done = attempts.join_next() => match done {
                    // Dropping `attempts` ends the others.
                    Some(Ok((addr, Ok(stream)))) => return Ok((addr, stream)),
                    Some(Ok((addr, Err(e)))) => {
                        tracing::debug!(%addr, error = %e, "address did not answer; trying the next");
                        last = Some(e);
                        start_next = true;
                    }
                    Some(Err(e)) => {
                        last = Some(io::Error::other(e));
                        start_next = true;
                    }
                    None => start_next = true,
                },
                _ = tokio::time::sleep(self.attempt_delay), if more => {
                    tracing::debug!("no answer yet; starting the next address alongside");
                    start_next = true;
                }
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The addresses with families alternating, starting with the family of
/// the first; within a family, in the resolver's order.
fn interleave(addrs: Vec<SocketAddr>) -> Vec<SocketAddr> {
    let first_v6 = addrs.first().is_some_and(SocketAddr::is_ipv6);
    let (mut same, mut other): (Vec<_>, Vec<_>) =
        addrs.into_iter().partition(|a| a.is_ipv6() == first_v6);
    let mut out = Vec::with_capacity(same.len() + other.len());
    same.reverse();
    other.reverse();
    loop {
        match (same.pop(), other.pop()) {
            (None, None) => return out,
            (a, b) => out.extend(a.into_iter().chain(b)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn families_alternate_from_the_first() {
        let got = interleave(vec![
            a("[::1]:1"),
            a("[::2]:1"),
            a("[::3]:1"),
            a("127.0.0.1:1"),
            a("127.0.0.2:1"),
        ]);
        assert_eq!(
            got,
            vec![
                a("[::1]:1"),
                a("127.0.0.1:1"),
                a("[::2]:1"),
                a("127.0.0.2:1"),
                a("[::3]:1"),
            ]
        );
        let got = interleave(vec![a("127.0.0.1:1"), a("[::1]:1")]);
        assert_eq!(got, vec![a("127.0.0.1:1"), a("[::1]:1")]);
        assert!(interleave(Vec::new()).is_empty());
    }

    /// Hands out fixed addresses and counts the lookups.
    struct Fixed(Vec<SocketAddr>);

    impl Resolve for Fixed {
        fn resolve<'a>(&'a self, _: &'a str, _: u16) -> BoxFuture<'a, io::Result<Vec<SocketAddr>>> {
            let v = self.0.clone();
            Box::pin(async move { Ok(v) })
        }
    }

    /// Connects for real to loopback, and never answers for 127.0.0.2
    /// (which is never dialled: nothing leaves the process).
    struct Blackhole;

    impl Connect for Blackhole {
        fn connect(&self, addr: SocketAddr) -> BoxFuture<'static, io::Result<TcpStream>> {
            if addr.ip() == std::net::Ipv4Addr::new(127, 0, 0, 2) {
                Box::pin(std::future::pending())
            } else {
                Box::pin(TcpStream::connect(addr))
            }
        }
    }

    #[tokio::test]
    async fn an_address_that_never_answers_costs_the_attempt_delay() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let dialer = Dialer::new(
            Arc::new(Fixed(vec![
                a(&format!("127.0.0.2:{port}")),
                a(&format!("127.0.0.1:{port}")),
            ])),
            Arc::new(Blackhole),
        );
        let started = Instant::now();
        let stream = tokio::time::timeout(Duration::from_secs(20), dialer.connect("example", port))
            .await
            .expect("not stuck on the first address")
            .expect("connected");
        println!("connected in {:?} past a silent address", started.elapsed());
        assert_eq!(stream.peer_addr().unwrap(), a(&format!("127.0.0.1:{port}")));
        // The address that answered goes first from now on.
        let first = dialer.addresses("example", port).await.unwrap()[0];
        assert_eq!(first, a(&format!("127.0.0.1:{port}")));
        assert_eq!(dialer.lookups(), 1);
    }

    #[tokio::test]
    async fn a_refused_address_moves_on_at_once_and_all_refused_is_an_error() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let dead = listener.local_addr().unwrap();
        drop(listener);
        let live = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let live = live.local_addr().unwrap();
        let dialer = Dialer::new(Arc::new(Fixed(vec![dead, live])), Arc::new(TcpConnector))
            // Long: only a failure can start the second address.
            .with_attempt_delay(Duration::from_secs(3600));
        let s = tokio::time::timeout(Duration::from_secs(20), dialer.connect("x", 1))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(s.peer_addr().unwrap(), live);

        let dialer = Dialer::new(Arc::new(Fixed(vec![dead])), Arc::new(TcpConnector));
        let e = dialer.connect("x", 1).await.unwrap_err();
        assert!(
            matches!(&e, DialError::Connect(io) if io.kind() == io::ErrorKind::ConnectionRefused),
            "{e:?}"
        );
        let dialer = Dialer::new(Arc::new(Fixed(Vec::new())), Arc::new(TcpConnector));
        assert!(matches!(
            dialer.connect("x", 1).await,
            Err(DialError::Resolve(_))
        ));
    }

    #[tokio::test]
    async fn a_name_is_resolved_once_within_the_cache_time() {
        let live = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let live = live.local_addr().unwrap();
        let dialer = Dialer::new(Arc::new(Fixed(vec![live])), Arc::new(TcpConnector));
        for _ in 0..3 {
            dialer.connect("Mail.Example", 1).await.unwrap();
            dialer.connect("mail.example", 1).await.unwrap();
        }
        assert_eq!(dialer.lookups(), 1);
        dialer.connect("mail.example", 2).await.unwrap();
        assert_eq!(dialer.lookups(), 2, "another port is another entry");

        let uncached = Dialer::new(Arc::new(Fixed(vec![live])), Arc::new(TcpConnector))
            .with_cache_time(Duration::ZERO);
        uncached.connect("mail.example", 1).await.unwrap();
        uncached.connect("mail.example", 1).await.unwrap();
        assert_eq!(uncached.lookups(), 2);
    }
}
