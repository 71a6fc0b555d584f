//! The timed scenarios. Each one runs the same client code over whichever
//! [`Route`] it is given; the runner calls it for mailbridge and for the
//! direct connection, interleaved. Counts are fixed and every wait has a
//! timeout, so a run always ends.

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinSet;

use super::client::{Fetched, Imap, Route, Smtp};

/// Longest any single step (a login, a FETCH, a session of sends) may take.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(120);

async fn bounded<T>(f: impl Future<Output = io::Result<T>>) -> io::Result<T> {
    tokio::time::timeout(STEP_TIMEOUT, f)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "step timed out"))?
}

/// Connect, log in, log out: how long it took.
pub async fn login_once(route: &Route) -> io::Result<Duration> {
    let started = Instant::now();
    bounded(async {
        let c = Imap::open(route, 4096).await?;
        c.logout().await
    })
    .await?;
    Ok(started.elapsed())
}

/// `total` sequential logins over each route, in alternating blocks of
/// `block` (and which route starts a pair of blocks alternates too), so
/// both routes see the same machine load. Returns `(a, b)` timings.
pub async fn login_latency(
    a: &Route,
    b: &Route,
    total: usize,
    block: usize,
) -> io::Result<(Vec<Duration>, Vec<Duration>)> {
    let mut all = login_latency_all(&[a.clone(), b.clone()], total, block).await?;
    let tb = all.pop().unwrap_or_default();
    let ta = all.pop().unwrap_or_default();
    Ok((ta, tb))
}

/// [`login_latency`] over any number of routes: blocks of `block` logins
/// per route in turn, the route that starts a round moving on by one each
/// round. Timings in the order of `routes`.
pub async fn login_latency_all(
    routes: &[Route],
    total: usize,
    block: usize,
) -> io::Result<Vec<Vec<Duration>>> {
    let block = block.max(1);
    let mut times: Vec<Vec<Duration>> = routes.iter().map(|_| Vec::with_capacity(total)).collect();
    let mut round = 0;
    while times.iter().any(|t| t.len() < total) {
        for k in 0..routes.len() {
            let i = (k + round) % routes.len();
            let n = block.min(total - times[i].len());
            for _ in 0..n {
                let t = login_once(&routes[i]).await?;
                times[i].push(t);
            }
        }
        round += 1;
    }
    Ok(times)
}

/// Logs in, selects INBOX and times one `FETCH set BODY[]`.
pub async fn fetch(route: &Route, set: &str) -> io::Result<(Duration, Fetched)> {
    bounded(async {
        let mut c = Imap::open(route, 64 * 1024).await?;
        c.select("INBOX").await?;
        let started = Instant::now();
        let got = c.fetch_bodies(set).await?;
        let elapsed = started.elapsed();
        c.logout().await?;
        Ok((elapsed, got))
    })
    .await
}

/// `sessions` SMTP sessions at once, sending `messages` messages between
/// them (`wire` each, from [`super::client::message_wire`]) from and to the
/// `envelope` addresses. Returns the wall time from the first connect to
/// the last QUIT.
pub async fn smtp(
    route: &Route,
    sessions: usize,
    messages: usize,
    wire: Arc<Vec<u8>>,
    envelope: (&str, &str),
) -> io::Result<Duration> {
    let (from, to) = (envelope.0.to_string(), envelope.1.to_string());
    let sessions = sessions.max(1);
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for i in 0..sessions {
        let count = messages / sessions + usize::from(i < messages % sessions);
        let route = route.clone();
        let wire = wire.clone();
        let (from, to) = (from.clone(), to.clone());
        tasks.spawn(bounded(async move {
            let mut c = Smtp::open(&route).await?;
            for _ in 0..count {
                c.send(&from, &to, &wire).await?;
            }
            c.quit().await
        }));
    }
    while let Some(r) = tasks.join_next().await {
        r.map_err(io::Error::other)??;
    }
    Ok(started.elapsed())
}

/// Logs in and appends `count` messages of `size` bytes to `mailbox`.
pub async fn append(route: &Route, mailbox: &str, count: usize, size: usize) -> io::Result<()> {
    bounded(async {
        let mut c = Imap::open(route, 4096).await?;
        let wire = super::client::message_wire(size, "bench@example.com", "rcpt@example.com");
        let message = &wire[..wire.len() - 3];
        for _ in 0..count {
            c.append(mailbox, message).await?;
        }
        c.logout().await
    })
    .await
}

/// Sessions opened at once and kept open.
pub struct Burst {
    /// The logged-in sessions, idle.
    pub sessions: Vec<Imap>,
    /// Sessions that failed to open or log in.
    pub failed: usize,
    /// From the first connect to the last login (or failure).
    pub elapsed: Duration,
    /// The first failure's reason.
    pub first_error: Option<String>,
}

/// Opens `n` authenticated IMAP sessions at once and keeps them idle.
pub async fn burst(route: &Route, n: usize) -> Burst {
    let route = Arc::new(route.clone());
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for _ in 0..n {
        let route = route.clone();
        tasks.spawn(async move { bounded(Imap::open(&route, 1024)).await });
    }
    let mut out = Burst {
        sessions: Vec::with_capacity(n),
        failed: 0,
        elapsed: Duration::ZERO,
        first_error: None,
    };
    while let Some(r) = tasks.join_next().await {
        match r.map_err(io::Error::other).and_then(|r| r) {
            Ok(c) => out.sessions.push(c),
            Err(e) => {
                out.failed += 1;
                out.first_error.get_or_insert_with(|| e.to_string());
            }
        }
    }
    out.elapsed = started.elapsed();
    out
}

/// A NOOP on every session at once; returns the sessions that answered.
pub async fn noop_all(sessions: Vec<Imap>) -> Vec<Imap> {
    let mut tasks = JoinSet::new();
    for mut c in sessions {
        tasks.spawn(async move { bounded(c.noop()).await.map(|()| c) });
    }
    let mut alive = Vec::new();
    while let Some(r) = tasks.join_next().await {
        if let Ok(Ok(c)) = r {
            alive.push(c);
        }
    }
    alive
}

/// `n` logins (connect, login, logout) at once; the wall time until the
/// last one finished.
pub async fn concurrent_logins(route: &Route, n: usize) -> io::Result<Duration> {
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for _ in 0..n {
        let route = route.clone();
        tasks.spawn(async move { login_once(&route).await });
    }
    while let Some(r) = tasks.join_next().await {
        r.map_err(io::Error::other)??;
    }
    Ok(started.elapsed())
}
