//! Listening sockets: accept, admit or refuse each connection against the
//! connection limits, spawn a task per connection, stop on shutdown.
//!
//! Every connection is accepted at once, so a client beyond a limit is
//! told so (by the handler, in its protocol's words) instead of hanging in
//! the kernel's accept queue.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

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
        Ok(Ticket {
            admission: self.clone(),
            group,
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.counts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .total
    }
}

/// Refusals are logged once, then summed up at most every 10 s, so a
/// flood does not flood the log too.
struct RefusalLog {
    last: Option<tokio::time::Instant>,
    since: u64,
}

impl RefusalLog {
    fn note(&mut self, local: Option<SocketAddr>, peer: SocketAddr, why: Refused) {
        let now = tokio::time::Instant::now();
        self.since += 1;
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < Duration::from_secs(10))
        {
            return;
        }
        tracing::warn!(
            listener = ?local,
            %peer,
            refused = self.since,
            reason = %why.reason(),
            "connections refused at the door"
        );
        self.last = Some(now);
        self.since = 0;
    }
}

/// What the handler gets with each connection.
pub enum Admitted {
    /// Serve it; the ticket goes with the connection.
    Yes(Ticket),
    /// Tell the client why and close.
    No(Refused),
}

/// Accepts connections until `shutdown` turns true, running `handler` in a
/// task of its own for each, with the connection's admission.
pub async fn accept_loop<H, F>(
    listener: TcpListener,
    admission: Arc<Admission>,
    mut shutdown: watch::Receiver<bool>,
    handler: H,
) where
    H: Fn(TcpStream, SocketAddr, Admitted) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    let local = listener.local_addr().ok();
    let mut refusals = RefusalLog {
        last: None,
        since: 0,
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
                let admitted = match admission.admit(peer.ip()) {
                    Ok(ticket) => Admitted::Yes(ticket),
                    Err(why) => {
                        refusals.note(local, peer, why);
                        Admitted::No(why)
                    }
                };
                tokio::spawn(handler(tcp, peer, admitted));
            }
            Err(e) => {
                // Out of file descriptors and the like: back off briefly
                // rather than spin.
                tracing::warn!(listener = ?local, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    tracing::debug!(listener = ?local, "listener stopped");
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
}
