//! Listening sockets: accept, read the PROXY protocol header where the
//! listener takes one (from trusted proxies only), admit or refuse each
//! connection against the connection limits by its client's address,
//! spawn a task per connection, stop on shutdown.
//!
//! Every connection is accepted at once, so a client beyond a limit is
//! told so (by the handler, in its protocol's words) instead of hanging in
//! the kernel's accept queue.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use mailbridge_proto::proxy;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Where a peer's connections are counted: an IPv4 address, or an IPv6
/// /64 (one host or one LAN's privacy addresses).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PeerGroup {
    /// One IPv4 address.
    V4(std::net::Ipv4Addr),
    /// The /64 an IPv6 address is in.
    V6(u64),
}

impl PeerGroup {
    /// The group of `ip` (IPv4-mapped IPv6 addresses count as IPv4).
    pub fn of(ip: IpAddr) -> PeerGroup {
        match ip.to_canonical() {
            IpAddr::V4(v4) => PeerGroup::V4(v4),
            IpAddr::V6(v6) => PeerGroup::V6((u128::from(v6) >> 64) as u64),
        }
    }
}

impl std::fmt::Display for PeerGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PeerGroup::V4(a) => write!(f, "{a}"),
            PeerGroup::V6(prefix) => {
                write!(f, "{}/64", Ipv6Addr::from(u128::from(*prefix) << 64))
            }
        }
    }
}

/// Why a connection was not admitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// `max_connections` are open.
    Full {
        /// The limit.
        limit: usize,
    },
    /// The peer's address (or IPv6 /64) has its share open.
    PerAddress {
        /// The limit per address.
        limit: usize,
    },
}

impl Refused {
    /// One sentence for the client.
    pub fn reason(&self) -> String {
        match self {
            Refused::Full { limit } => format!(
                "mailbridge is serving its maximum of {limit} connections; try again shortly"
            ),
            Refused::PerAddress { limit } => format!(
                "too many connections from your address (at most {limit}); close some and try again"
            ),
        }
    }
}

#[derive(Default)]
struct Counts {
    total: usize,
    /// The most open at once since [`Admission::take_peak`] last looked.
    peak: usize,
    by_group: HashMap<PeerGroup, usize>,
}

/// Connection limits shared by every listener: a total, and a share per
/// address.
pub struct Admission {
    max_total: usize,
    max_per_group: usize,
    counts: Mutex<Counts>,
    /// Told whenever a connection ends.
    ended: tokio::sync::Notify,
}

/// An admitted connection's place; given back when dropped.
pub struct Ticket {
    admission: Arc<Admission>,
    group: PeerGroup,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut counts = self
            .admission
            .counts
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        counts.total = counts.total.saturating_sub(1);
        if let Some(n) = counts.by_group.get_mut(&self.group) {
            *n -= 1;
            if *n == 0 {
                counts.by_group.remove(&self.group);
            }
        }
        drop(counts);
        self.admission.ended.notify_waiters();
    }
}

impl Admission {
    /// At most `max_total` connections, `max_per_group` of them from one
    /// address (IPv6: one /64).
    pub fn new(max_total: usize, max_per_group: usize) -> Arc<Admission> {
        Arc::new(Admission {
            max_total: max_total.max(1),
            max_per_group: max_per_group.max(1),
            counts: Mutex::new(Counts::default()),
            ended: tokio::sync::Notify::new(),
        })
    }

    /// Resolves once no connection is open.
    pub async fn all_closed(&self) {
        loop {
            let ended = self.ended.notified();
            if self.open() == 0 {
                return;
            }
            ended.await;
        }
    }

    /// A ticket for a connection from `peer`, or why not.
    pub fn admit(self: &Arc<Self>, peer: IpAddr) -> Result<Ticket, Refused> {
        let group = PeerGroup::of(peer);
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        if counts.total >= self.max_total {
            return Err(Refused::Full {
                limit: self.max_total,
            });
        }
        let n = counts.by_group.entry(group).or_insert(0);
        if *n >= self.max_per_group {
            return Err(Refused::PerAddress {
                limit: self.max_per_group,
            });
        }
        *n += 1;
        counts.total += 1;
        counts.peak = counts.peak.max(counts.total);
        Ok(Ticket {
            admission: self.clone(),
            group,
        })
    }

    /// A place for a connection whose client is not known yet (a trusted
    /// proxy's, before its header names the client): it counts against
    /// `max_connections` from now on, so connections waiting for their
    /// header are bounded too.
    pub fn hold(self: &Arc<Self>) -> Result<Hold, Refused> {
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        if counts.total >= self.max_total {
            return Err(Refused::Full {
                limit: self.max_total,
            });
        }
        counts.total += 1;
        counts.peak = counts.peak.max(counts.total);
        Ok(Hold {
            admission: Some(self.clone()),
        })
    }

    /// The held place becomes a ticket for `peer`, or is given back and
    /// the reason said (the client's address has its share open).
    pub fn admit_held(self: &Arc<Self>, mut hold: Hold, peer: IpAddr) -> Result<Ticket, Refused> {
        let group = PeerGroup::of(peer);
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        let n = counts.by_group.entry(group).or_insert(0);
        if *n >= self.max_per_group {
            if *n == 0 {
                counts.by_group.remove(&group);
            }
            drop(counts);
            drop(hold);
            return Err(Refused::PerAddress {
                limit: self.max_per_group,
            });
        }
        *n += 1;
        // The total was counted by the hold; the ticket gives it back.
        hold.admission = None;
        Ok(Ticket {
            admission: self.clone(),
            group,
        })
    }

    /// The most connections open at once since the last call (or since
    /// the start), and how many are open now; the next call counts from
    /// now. A crowd that came and went between two calls is seen.
    pub fn take_peak(&self) -> (usize, usize) {
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        let peak = counts.peak.max(counts.total);
        counts.peak = counts.total;
        (peak, counts.total)
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.counts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .total
    }
}

/// A place in `max_connections` for a connection whose client is not
/// known yet ([`Admission::hold`]); given back when dropped, unless it
/// became a [`Ticket`].
pub struct Hold {
    admission: Option<Arc<Admission>>,
}

impl Drop for Hold {
    fn drop(&mut self) {
        if let Some(admission) = self.admission.take() {
            let mut counts = admission
                .counts
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            counts.total = counts.total.saturating_sub(1);
            drop(counts);
            admission.ended.notify_waiters();
        }
    }
}

/// A kind of event at the door, logged once and then summed up at most
/// every 10 s, so a flood does not flood the log too.
struct Throttle {
    last: Option<tokio::time::Instant>,
    since: u64,
}

impl Throttle {
    const fn new() -> Throttle {
        Throttle {
            last: None,
            since: 0,
        }
    }

    /// Counts one event; `Some(n)` when it is time to log the `n` events
    /// since the last line.
    fn note(&mut self) -> Option<u64> {
        let now = tokio::time::Instant::now();
        self.since += 1;
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < Duration::from_secs(10))
        {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.since))
    }
}

/// What a listener logs about connections it does not serve.
struct DoorLog {
    local: Option<SocketAddr>,
    refused: Mutex<Throttle>,
    untrusted: Mutex<Throttle>,
    bad_header: Mutex<Throttle>,
}

impl DoorLog {
    fn refused(&self, peer: SocketAddr, why: Refused) {
        if let Some(n) = lock(&self.refused).note() {
            tracing::warn!(
                listener = ?self.local,
                %peer,
                refused = n,
                reason = %why.reason(),
                "connections refused at the door"
            );
        }
    }

    fn untrusted(&self, peer: SocketAddr) {
        if let Some(n) = lock(&self.untrusted).note() {
            tracing::warn!(
                listener = ?self.local,
                %peer,
                closed = n,
                "connection closed: this listener takes PROXY protocol connections only, and the address is not in [server] trusted_proxies"
            );
        }
    }

    fn bad_header(&self, proxy: SocketAddr, why: &HeaderError) {
        if let Some(n) = lock(&self.bad_header).note() {
            tracing::warn!(
                listener = ?self.local,
                %proxy,
                closed = n,
                error = %why,
                "connection from a trusted proxy closed: no valid PROXY protocol header"
            );
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What the handler gets with each connection.
pub enum Admitted {
    /// Serve it; the ticket goes with the connection.
    Yes(Ticket),
    /// Tell the client why and close.
    No(Refused),
}

/// An accepted connection, handed to the listener's handler.
pub struct Accepted {
    /// The socket, positioned at the client's first byte (after the PROXY
    /// header, if there was one).
    pub tcp: TcpStream,
    /// The client: the socket's peer, or the address a trusted proxy's
    /// header named.
    pub peer: SocketAddr,
    /// The trusted proxy the connection came through, if it did.
    pub via: Option<SocketAddr>,
    /// Whether the connection limits admit it.
    pub admitted: Admitted,
}

/// How long a trusted proxy has to send the whole header; haproxy and
/// nginx send it with the connection's first packet.
pub const PROXY_HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// A listener's PROXY protocol setting: every connection comes from one of
/// `trusted` and starts with a header.
#[derive(Clone, Debug)]
pub struct ProxyProtocol {
    /// The proxies' addresses or networks.
    pub trusted: Arc<[ipnet::IpNet]>,
    /// See [`PROXY_HEADER_TIMEOUT`].
    pub timeout: Duration,
}

impl ProxyProtocol {
    /// Whether `ip` may send a header.
    pub fn trusts(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.trusted.iter().any(|n| n.contains(&ip))
    }
}

/// Why no header was read from a trusted proxy.
#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    /// The bytes are not a header mailbridge takes.
    #[error(transparent)]
    Invalid(#[from] proxy::ProxyError),
    /// The proxy closed the connection, or it broke, before the header
    /// was whole.
    #[error("the connection ended before the PROXY protocol header was whole: {0}")]
    Io(#[from] std::io::Error),
    /// The header was not whole within the timeout.
    #[error("no whole PROXY protocol header within {} s", .0.as_secs())]
    Timeout(Duration),
}

/// Reads a PROXY protocol header from the start of `stream`, exactly: the
/// protocol crate says how many bytes it still needs at least, so nothing
/// after the header is read, and the session (or the TLS handshake) gets
/// the connection's bytes from where the header ended.
pub async fn read_proxy_header<S>(stream: &mut S) -> Result<proxy::Header, HeaderError>
where
    S: AsyncRead + Unpin,
{
    let mut buf = Vec::with_capacity(proxy::MIN_LEN);
    loop {
        match proxy::parse(&buf)? {
            proxy::Parse::Done(header) => return Ok(header),
            proxy::Parse::NeedMore(n) => {
                // `parse` bounds the header's length, so this does too.
                let have = buf.len();
                buf.resize(have + n, 0);
                stream.read_exact(&mut buf[have..]).await?;
            }
        }
    }
}

/// Accepts connections until `shutdown` turns true, running `handler` in a
/// task of its own for each, with the connection's admission. With
/// `proxy`, a connection from an address it does not trust is closed at
/// once; one from a trusted proxy has its header read in its task, and
/// the client it names is the one admitted and served.
pub async fn accept_loop<H, F>(
    listener: TcpListener,
    admission: Arc<Admission>,
    proxy: Option<ProxyProtocol>,
    mut shutdown: watch::Receiver<bool>,
    handler: H,
) where
    H: Fn(Accepted) -> F + Send + Sync + 'static,
    F: Future<Output = ()> + Send + 'static,
{
    let handler = Arc::new(handler);
    let log = Arc::new(DoorLog {
        local: listener.local_addr().ok(),
        refused: Mutex::new(Throttle::new()),
        untrusted: Mutex::new(Throttle::new()),
        bad_header: Mutex::new(Throttle::new()),
    });
    let admit = |admission: &Arc<Admission>, log: &DoorLog, peer: SocketAddr| match admission
        .admit(peer.ip())
    {
        Ok(ticket) => Admitted::Yes(ticket),
        Err(why) => {
            log.refused(peer, why);
            Admitted::No(why)
        }
    };
    loop {
        if *shutdown.borrow() {
            break;
        }
        let accepted = tokio::select! {
            _ = shutdown.changed() => break,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((tcp, peer)) => {
                let _ = tcp.set_nodelay(true);
                let Some(proxy) = &proxy else {
                    let admitted = admit(&admission, &log, peer);
                    tokio::spawn(handler(Accepted {
                        tcp,
                        peer,
                        via: None,
                        admitted,
                    }));
                    continue;
                };
                if !proxy.trusts(peer.ip()) {
                    log.untrusted(peer);
                    drop(tcp);
                    continue;
                }
                // Its place is taken before its header is read: connections
                // waiting for a header count against max_connections too.
                let hold = match admission.hold() {
                    Ok(hold) => hold,
                    Err(why) => {
                        log.refused(peer, why);
                        drop(tcp);
                        continue;
                    }
                };
                let (handler, admission, log) = (handler.clone(), admission.clone(), log.clone());
                let (timeout, stopping) = (proxy.timeout, shutdown.clone());
                tokio::spawn(async move {
                    let mut tcp = tcp;
                    let header =
                        match tokio::time::timeout(timeout, read_proxy_header(&mut tcp)).await {
                            Ok(Ok(h)) => h,
                            Ok(Err(e)) => {
                                log.bad_header(peer, &e);
                                return;
                            }
                            Err(_) => {
                                log.bad_header(peer, &HeaderError::Timeout(timeout));
                                return;
                            }
                        };
                    if *stopping.borrow() {
                        return;
                    }
                    let client = header.client_or(peer);
                    let admitted = match admission.admit_held(hold, client.ip()) {
                        Ok(ticket) => Admitted::Yes(ticket),
                        Err(why) => {
                            log.refused(client, why);
                            Admitted::No(why)
                        }
                    };
                    handler(Accepted {
                        tcp,
                        peer: client,
                        via: Some(peer),
                        admitted,
                    })
                    .await;
                });
            }
            Err(e) => {
                // Out of file descriptors and the like: back off briefly
                // rather than spin.
                tracing::warn!(listener = ?log.local, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    tracing::debug!(listener = ?log.local, "listener stopped");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn ipv6_is_counted_by_64_and_mapped_ipv4_as_ipv4() {
        assert_eq!(
            PeerGroup::of(ip("2001:db8:1:2::1")),
            PeerGroup::of(ip("2001:db8:1:2:ffff::9"))
        );
        assert_ne!(
            PeerGroup::of(ip("2001:db8:1:2::1")),
            PeerGroup::of(ip("2001:db8:1:3::1"))
        );
        assert_eq!(
            PeerGroup::of(ip("::ffff:192.0.2.7")),
            PeerGroup::of(ip("192.0.2.7"))
        );
        assert_eq!(
            PeerGroup::of(ip("2001:db8:1:2::1")).to_string(),
            "2001:db8:1:2::/64"
        );
    }

    #[test]
    fn the_peak_is_seen_even_when_the_crowd_left_between_looks() {
        let admission = Admission::new(100, 100);
        assert_eq!(admission.take_peak(), (0, 0));
        let crowd: Vec<Ticket> = (0..40)
            .map(|_| admission.admit(ip("127.0.0.1")).unwrap())
            .collect();
        let held = admission.hold().unwrap();
        drop(crowd);
        // 41 were open at once; one is still.
        assert_eq!(admission.take_peak(), (41, 1));
        // Counted from then on.
        assert_eq!(admission.take_peak(), (1, 1));
        drop(held);
        assert_eq!(admission.take_peak(), (1, 0));
        assert_eq!(admission.take_peak(), (0, 0));
    }

    #[tokio::test]
    async fn reads_the_proxy_header_and_not_a_byte_more() {
        let peer: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        let mut input: &[u8] = b"PROXY TCP4 192.0.2.7 192.0.2.1 5000 143\r\na1 NOOP\r\n";
        let h = read_proxy_header(&mut input).await.unwrap();
        assert_eq!(h.client_or(peer), "192.0.2.7:5000".parse().unwrap());
        assert_eq!(input, b"a1 NOOP\r\n");

        let mut input: &[u8] = b"\r\n\r\n\0\r\nQUIT\n\x20\x00\x00\x00\x16\x03\x01";
        let h = read_proxy_header(&mut input).await.unwrap();
        assert_eq!(h.client_or(peer), peer, "LOCAL: the proxy's own address");
        assert_eq!(input, b"\x16\x03\x01");

        let mut cut: &[u8] = b"PROXY TCP4 192.0.2.7";
        assert!(matches!(
            read_proxy_header(&mut cut).await,
            Err(HeaderError::Io(_))
        ));
        let mut garbage: &[u8] = b"a1 LOGIN alice secret\r\n";
        assert!(matches!(
            read_proxy_header(&mut garbage).await,
            Err(HeaderError::Invalid(proxy::ProxyError::NotAHeader))
        ));
    }

    #[test]
    fn trusted_proxies_by_network_and_mapped_addresses() {
        let p = ProxyProtocol {
            trusted: vec![
                "127.0.0.1/32".parse().unwrap(),
                "10.1.0.0/16".parse().unwrap(),
            ]
            .into(),
            timeout: PROXY_HEADER_TIMEOUT,
        };
        assert!(p.trusts(ip("127.0.0.1")));
        assert!(p.trusts(ip("::ffff:127.0.0.1")));
        assert!(p.trusts(ip("10.1.200.3")));
        assert!(!p.trusts(ip("127.0.0.3")));
        assert!(!p.trusts(ip("::1")));
    }

    #[test]
    fn limits_total_and_per_address_and_give_back_on_drop() {
        let a = Admission::new(3, 2);
        let t1 = a.admit(ip("10.0.0.1")).unwrap();
        let _t2 = a.admit(ip("10.0.0.1")).unwrap();
        assert_eq!(
            a.admit(ip("10.0.0.1")).err(),
            Some(Refused::PerAddress { limit: 2 })
        );
        let _t3 = a.admit(ip("10.0.0.2")).unwrap();
        assert_eq!(
            a.admit(ip("10.0.0.3")).err(),
            Some(Refused::Full { limit: 3 })
        );
        drop(t1);
        assert_eq!(a.open(), 2);
        assert!(a.admit(ip("10.0.0.1")).is_ok());
    }

    #[test]
    fn a_held_place_counts_until_it_is_a_ticket_or_given_back() {
        let a = Admission::new(3, 1);
        let h1 = a.hold().unwrap();
        let h2 = a.hold().unwrap();
        let _h3 = a.hold().unwrap();
        assert_eq!(a.hold().err(), Some(Refused::Full { limit: 3 }));
        assert_eq!(
            a.admit(ip("10.0.0.9")).err(),
            Some(Refused::Full { limit: 3 })
        );
        // A header named its client: the place is the client's ticket.
        let t1 = a.admit_held(h1, ip("10.0.0.1")).unwrap();
        assert_eq!(a.open(), 3);
        // That client's share is used: the held place is given back.
        assert_eq!(
            a.admit_held(h2, ip("10.0.0.1")).err(),
            Some(Refused::PerAddress { limit: 1 })
        );
        assert_eq!(a.open(), 2);
        drop(t1);
        assert_eq!(a.open(), 1);
        assert!(a.admit(ip("10.0.0.1")).is_ok());
    }
}
