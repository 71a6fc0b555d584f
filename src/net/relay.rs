//! The relay: after login, bytes are copied both ways untouched until either
//! side closes or the session is idle too long. No parsing happens here.
//!
//! At shutdown a session is drained: it goes on until it is at rest (the
//! server spoke last and nothing moved for [`DRAIN_QUIET`]), so a message
//! being sent or fetched, or a command waiting for its answer, completes
//! before the connection is closed.
//!
//! An idle session holds no copy buffer. Each direction takes a buffer from
//! a small per-thread pool only to attempt a read, gives it back at once
//! when the read would block, and otherwise keeps it just until the data is
//! fully written. Ten thousand idle IMAP sessions thus cost their sockets,
//! TLS state and task, not 2 x 16 KiB of buffers each; a busy session gets
//! a large buffer, so bulk transfers take few system calls.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// Copy buffer size: four TLS records.
pub const BUFFER: usize = 64 * 1024;

/// While draining, how long a session must have been quiet, with the
/// server's answer last, before it is closed: long enough that a server
/// streaming a response is not cut between two reads.
pub const DRAIN_QUIET: Duration = Duration::from_millis(500);

/// How many of the server's last bytes a session keeps, so that the log
/// can say why the server ended it (`* BYE Session invalidated -
/// AccessTokenExpired` is 49 bytes; a POP3 `-ERR` or SMTP `421` line is
/// rarely longer). Kept inline in the session's task: no allocation, and
/// only copied into while data moves.
pub const TAIL: usize = 256;

/// What a relayed session moved.
#[derive(Debug, Default, Clone)]
pub struct RelayStats {
    /// Bytes from the client to the upstream.
    pub to_upstream: u64,
    /// Bytes from the upstream to the client.
    pub to_client: u64,
    /// Closed because neither side sent anything for the idle timeout.
    pub idle_timeout: bool,
    /// Closed at rest because the server is shutting down.
    pub drained: bool,
    /// The upstream ended the session: its side of the stream ended (or
    /// broke) before the client's did.
    pub upstream_ended: bool,
    /// When `upstream_ended`: the last bytes (at most [`TAIL`]) the server
    /// sent, for the protocol crate to read its reason from; else empty.
    pub upstream_tail: Vec<u8>,
    /// Both directions ended and were passed on (each side's write half
    /// shut down): nothing is left to close.
    pub both_shut: bool,
}

/// A relay that ended on an I/O error (a reset, say), with what it moved
/// until then: a server may have said why just before.
#[derive(Debug, thiserror::Error)]
#[error("{source}")]
pub struct RelayError {
    /// The error.
    #[source]
    pub source: io::Error,
    /// The session until the error.
    pub stats: RelayStats,
}

/// The last [`TAIL`] bytes that went through one direction.
struct Tail {
    bytes: [u8; TAIL],
    len: usize,
}

impl Tail {
    fn new() -> Tail {
        Tail {
            bytes: [0; TAIL],
            len: 0,
        }
    }

    fn push(&mut self, data: &[u8]) {
        if data.len() >= TAIL {
            self.bytes.copy_from_slice(&data[data.len() - TAIL..]);
            self.len = TAIL;
            return;
        }
        let keep = (TAIL - data.len()).min(self.len);
        self.bytes.copy_within(self.len - keep..self.len, 0);
        self.bytes[keep..keep + data.len()].copy_from_slice(data);
        self.len = keep + data.len();
    }

    fn as_slice(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

/// Why the relay ended, when not because a side closed.
#[derive(Clone, Copy, PartialEq)]
enum End {
    Closed,
    Idle,
    Drained,
}

/// Copy buffers shared by the sessions that run on one thread (the relay
/// and [`super::stream::ReadAhead`] use them).
pub(crate) mod pool {
    use std::cell::RefCell;

    use super::BUFFER;

    /// Free buffers kept per thread; more are freed.
    const KEEP: usize = 16;

    thread_local! {
        static FREE: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
        /// Buffers taken minus buffers given on this thread (tests).
        #[cfg(test)]
        static LENT: std::cell::Cell<isize> = const { std::cell::Cell::new(0) };
    }

    /// A buffer of [`BUFFER`] bytes.
    pub fn take() -> Box<[u8]> {
        #[cfg(test)]
        LENT.with(|l| l.set(l.get() + 1));
        FREE.try_with(|f| f.borrow_mut().pop())
            .ok()
            .flatten()
            .unwrap_or_else(|| vec![0; BUFFER].into_boxed_slice())
    }

    /// Returns a buffer for reuse.
    pub fn give(buf: Box<[u8]>) {
        #[cfg(test)]
        LENT.with(|l| l.set(l.get() - 1));
        let _ = FREE.try_with(|f| {
            let mut f = f.borrow_mut();
            if f.len() < KEEP {
                f.push(buf);
            }
        });
    }

    /// Buffers taken and not given back on this thread (tests).
    #[cfg(test)]
    pub fn lent() -> isize {
        LENT.with(std::cell::Cell::get)
    }
}

/// One direction of the relay.
#[derive(Default)]
struct Half {
    /// Read but not yet written: `buf[pos..len]`.
    buf: Option<Box<[u8]>>,
    pos: usize,
    len: usize,
    /// Written since the last flush.
    unflushed: bool,
    /// An error met while gathering more input, reported once the bytes
    /// read before it are written (a TLS peer that closes without
    /// close_notify right after its last words).
    error: Option<io::Error>,
    /// The reader reached end of stream.
    eof: bool,
    /// The reader ended: end of stream, or a read error.
    read_ended: bool,
    /// The writer was shut down after EOF: this direction is finished.
    done: bool,
    /// Bytes read.
    bytes: u64,
}

impl Drop for Half {
    fn drop(&mut self) {
        if let Some(buf) = self.buf.take() {
            pool::give(buf);
        }
    }
}

impl Half {
    /// Moves bytes from `r` to `w` until `r` would block, then flushes.
    /// `Ready(Ok)` once `r` ended and `w` is shut down. Sets `active` when
    /// bytes were read.
    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        r: &mut R,
        w: &mut W,
        active: &mut bool,
        mut tail: Option<&mut Tail>,
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + Unpin + ?Sized,
        W: AsyncWrite + Unpin + ?Sized,
    {
        if self.done {
            return Poll::Ready(Ok(()));
        }
        loop {
            if let Some(buf) = &self.buf {
                while self.pos < self.len {
                    let n = ready!(Pin::new(&mut *w).poll_write(cx, &buf[self.pos..self.len]))?;
                    if n == 0 {
                        return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                    }
                    self.pos += n;
                    self.unflushed = true;
                }
                if let Some(buf) = self.buf.take() {
                    pool::give(buf);
                }
            }
            if let Some(e) = self.error.take() {
                return Poll::Ready(Err(e));
            }
            if self.eof {
                if self.unflushed {
                    ready!(Pin::new(&mut *w).poll_flush(cx))?;
                    self.unflushed = false;
                }
                ready!(Pin::new(&mut *w).poll_shutdown(cx))?;
                self.done = true;
                return Poll::Ready(Ok(()));
            }
            let mut buf = pool::take();
            let mut rb = ReadBuf::new(&mut buf);
            match Pin::new(&mut *r).poll_read(cx, &mut rb) {
                Poll::Pending => {
                    pool::give(buf);
                    if self.unflushed {
                        ready!(Pin::new(&mut *w).poll_flush(cx))?;
                        self.unflushed = false;
                    }
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => {
                    pool::give(buf);
                    self.read_ended = true;
                    return Poll::Ready(Err(e));
                }
                Poll::Ready(Ok(())) => {
                    let mut n = rb.filled().len();
                    if n == 0 {
                        pool::give(buf);
                        self.eof = true;
                        self.read_ended = true;
                        continue;
                    }
                    // Gather what is already there (a TLS stream yields
                    // one record per read) so it goes out in one write.
                    while rb.remaining() > 0 {
                        match Pin::new(&mut *r).poll_read(cx, &mut rb) {
                            Poll::Ready(Ok(())) if rb.filled().len() > n => n = rb.filled().len(),
                            Poll::Ready(Ok(())) => {
                                self.eof = true;
                                self.read_ended = true;
                                break;
                            }
                            Poll::Ready(Err(e)) => {
                                self.error = Some(e);
                                self.read_ended = true;
                                break;
                            }
                            Poll::Pending => break,
                        }
                    }
                    if let Some(tail) = tail.as_deref_mut() {
                        tail.push(&buf[..n]);
                    }
                    self.buf = Some(buf);
                    self.pos = 0;
                    self.len = n;
                    self.bytes += n as u64;
                    *active = true;
                }
            }
        }
    }
}

/// Copies both ways until both directions are closed, an error occurs, or
/// nothing moved for `idle`. Half-closes are passed on. Once `stop`
/// completes, the session ends as soon as it is at rest: nothing in flight
/// either way, the last bytes were the server's, and quiet for
/// [`DRAIN_QUIET`].
pub async fn relay<C, U>(
    client: &mut C,
    upstream: &mut U,
    idle: Duration,
    stop: impl std::future::Future<Output = ()>,
) -> Result<RelayStats, RelayError>
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    U: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut up = Half::default();
    let mut down = Half::default();
    let mut tail = Tail::new();
    // Which side's stream ended first (None while both are open).
    let mut upstream_first: Option<bool> = None;
    let mut last = Instant::now();
    // Whether the client sent the last bytes (an answer is then owed).
    let mut client_last = false;
    let mut draining = false;
    tokio::pin!(stop);
    // One timer for the whole session: when it fires it is moved to the
    // last activity plus `idle` (or `DRAIN_QUIET` while draining), so
    // traffic never touches it.
    let sleep = tokio::time::sleep_until(last + idle);
    tokio::pin!(sleep);
    let outcome = poll_fn(|cx| {
        let (mut sent, mut answered) = (false, false);
        let a = up.poll_copy(cx, client, upstream, &mut sent, None);
        let b = down.poll_copy(cx, upstream, client, &mut answered, Some(&mut tail));
        if upstream_first.is_none() && (up.read_ended || down.read_ended) {
            upstream_first = Some(down.read_ended);
        }
        let (a, b) = (a?, b?);
        if sent || answered {
            last = Instant::now();
            client_last = sent;
        }
        if a.is_ready() && b.is_ready() {
            return Poll::Ready(Ok::<End, io::Error>(End::Closed));
        }
        if !draining && stop.as_mut().poll(cx).is_ready() {
            draining = true;
            sleep.as_mut().reset(last + DRAIN_QUIET);
        }
        while sleep.as_mut().poll(cx).is_ready() {
            let now = Instant::now();
            let at_rest = !client_last && up.buf.is_none() && down.buf.is_none();
            if draining && at_rest && last + DRAIN_QUIET <= now {
                return Poll::Ready(Ok(End::Drained));
            }
            if last + idle <= now {
                return Poll::Ready(Ok(End::Idle));
            }
            let next = if draining && at_rest {
                last + DRAIN_QUIET
            } else {
                last + idle
            };
            // While draining with an answer owed, check again soon: the
            // answer resets `last`, and then the session may close.
            let next = if draining && !at_rest {
                next.min(now + DRAIN_QUIET)
            } else {
                next
            };
            sleep.as_mut().reset(next);
        }
        Poll::Pending
    })
    .await;
    let upstream_ended = upstream_first == Some(true);
    let stats = |end| RelayStats {
        to_upstream: up.bytes,
        to_client: down.bytes,
        idle_timeout: end == End::Idle,
        drained: end == End::Drained,
        upstream_ended,
        upstream_tail: if upstream_ended {
            tail.as_slice().to_vec()
        } else {
            Vec::new()
        },
        both_shut: up.done && down.done,
    };
    match outcome {
        Ok(end) => Ok(stats(end)),
        // A peer that closes without TLS close_notify after its last word
        // (common after LOGOUT) ends the session like a clean close.
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(stats(End::Closed)),
        Err(source) => Err(RelayError {
            source,
            stats: stats(End::Closed),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A relay no shutdown reaches.
    async fn relay_unstopped<C, U>(
        client: &mut C,
        upstream: &mut U,
        idle: Duration,
    ) -> Result<RelayStats, RelayError>
    where
        C: AsyncRead + AsyncWrite + Unpin + ?Sized,
        U: AsyncRead + AsyncWrite + Unpin + ?Sized,
    {
        relay(client, upstream, idle, std::future::pending()).await
    }

    #[tokio::test]
    async fn copies_both_ways_and_half_closes() {
        let (mut client_far, mut client_near) = tokio::io::duplex(1024);
        let (mut up_near, mut up_far) = tokio::io::duplex(1024);
        let task = tokio::spawn(async move {
            relay_unstopped(&mut client_near, &mut up_near, Duration::from_secs(5)).await
        });
        client_far.write_all(b"a1 NOOP\r\n").await.unwrap();
        let mut buf = [0u8; 9];
        up_far.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"a1 NOOP\r\n");
        up_far.write_all(b"a1 OK\r\n").await.unwrap();
        let mut buf = [0u8; 7];
        client_far.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"a1 OK\r\n");
        client_far.shutdown().await.unwrap();
        let mut rest = Vec::new();
        up_far.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
        up_far.shutdown().await.unwrap();
        drop(up_far);
        let stats = task.await.unwrap().unwrap();
        assert_eq!((stats.to_upstream, stats.to_client), (9, 7));
        // The client ended it: nothing of the server's is kept.
        assert!(!stats.upstream_ended && stats.upstream_tail.is_empty());
        // Both closes were passed on: the session has nothing to shut.
        assert!(stats.both_shut);
    }

    #[test]
    fn the_tail_keeps_the_last_bytes_whatever_the_chunks() {
        let data: Vec<u8> = (0..2000u32).map(|i| (i % 251) as u8).collect();
        for chunk in [1, 7, 100, 255, 256, 257, 1000] {
            let mut tail = Tail::new();
            let mut fed = 0;
            for piece in data.chunks(chunk) {
                tail.push(piece);
                fed += piece.len();
                let want = &data[fed.saturating_sub(TAIL)..fed];
                assert_eq!(tail.as_slice(), want, "chunks of {chunk}, after {fed}");
            }
        }
    }

    #[tokio::test]
    async fn the_server_ending_the_session_leaves_its_last_words() {
        let (mut client_far, mut client_near) = tokio::io::duplex(4096);
        let (mut up_near, mut up_far) = tokio::io::duplex(4096);
        let task = tokio::spawn(async move {
            relay_unstopped(&mut client_near, &mut up_near, Duration::from_secs(5)).await
        });
        let filler = vec![b'x'; 1000];
        up_far.write_all(&filler).await.unwrap();
        up_far
            .write_all(b"\r\n* BYE Session invalidated - AccessTokenExpired\r\n")
            .await
            .unwrap();
        up_far.shutdown().await.unwrap();
        let mut got = Vec::new();
        client_far.read_to_end(&mut got).await.unwrap();
        assert!(got.ends_with(b"AccessTokenExpired\r\n"));
        client_far.shutdown().await.unwrap();
        drop(up_far);
        let stats = task.await.unwrap().unwrap();
        assert!(stats.upstream_ended);
        assert_eq!(stats.upstream_tail.len(), TAIL);
        assert!(
            stats
                .upstream_tail
                .ends_with(b"* BYE Session invalidated - AccessTokenExpired\r\n")
        );
    }

    #[tokio::test(start_paused = true)]
    async fn idle_timeout_closes() {
        let (_client_far, mut client_near) = tokio::io::duplex(64);
        let (mut up_near, _up_far) = tokio::io::duplex(64);
        let stats = relay_unstopped(&mut client_near, &mut up_near, Duration::from_secs(30))
            .await
            .unwrap();
        assert!(stats.idle_timeout);
        assert!(
            !stats.both_shut,
            "an idle session is left for the caller to close"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn draining_waits_for_the_answer_then_closes_at_rest() {
        let (mut client_far, mut client_near) = tokio::io::duplex(1024);
        let (mut up_near, mut up_far) = tokio::io::duplex(1024);
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let stop = async {
                let _ = stop_rx.await;
            };
            relay(
                &mut client_near,
                &mut up_near,
                Duration::from_secs(600),
                stop,
            )
            .await
        });
        // The client asks; shutdown begins before the server answers.
        client_far.write_all(b"a1 NOOP\r\n").await.unwrap();
        let mut buf = [0u8; 9];
        up_far.read_exact(&mut buf).await.unwrap();
        stop_tx.send(()).unwrap();
        tokio::time::sleep(DRAIN_QUIET * 10).await;
        assert!(!task.is_finished(), "an answer is owed: the session stays");
        up_far.write_all(b"a1 OK\r\n").await.unwrap();
        let mut buf = [0u8; 7];
        client_far.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"a1 OK\r\n");
        // At rest now: closed after the quiet period, not the idle timeout.
        let stats = task.await.unwrap().unwrap();
        assert!(stats.drained && !stats.idle_timeout);
        assert_eq!((stats.to_upstream, stats.to_client), (9, 7));
    }

    #[tokio::test(start_paused = true)]
    async fn draining_closes_a_quiet_session_long_before_the_idle_timeout() {
        let (_client_far, mut client_near) = tokio::io::duplex(64);
        let (mut up_near, _up_far) = tokio::io::duplex(64);
        let started = Instant::now();
        let stats = relay(
            &mut client_near,
            &mut up_near,
            Duration::from_secs(600),
            std::future::ready(()),
        )
        .await
        .unwrap();
        assert!(stats.drained);
        assert!(started.elapsed() < Duration::from_secs(600));
    }

    #[tokio::test]
    async fn idle_session_holds_no_buffer() {
        // current_thread runtime: the relay runs on this thread.
        let (mut client_far, mut client_near) = tokio::io::duplex(1024);
        let (mut up_near, mut up_far) = tokio::io::duplex(1024);
        let task = tokio::spawn(async move {
            relay_unstopped(&mut client_near, &mut up_near, Duration::from_secs(60)).await
        });
        for _ in 0..3 {
            client_far.write_all(b"a1 NOOP\r\n").await.unwrap();
            let mut buf = [0u8; 9];
            up_far.read_exact(&mut buf).await.unwrap();
            up_far.write_all(b"a1 OK\r\n").await.unwrap();
            let mut buf = [0u8; 7];
            client_far.read_exact(&mut buf).await.unwrap();
            // Let the relay go back to waiting.
            for _ in 0..10 {
                tokio::task::yield_now().await;
            }
            assert_eq!(pool::lent(), 0, "an idle relay holds a buffer");
        }
        drop(client_far);
        drop(up_far);
        task.await.unwrap().unwrap();
        assert_eq!(pool::lent(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bulk_both_ways_through_slow_pipes() {
        // Small pipes: writes block while a buffer is held.
        let (client_far, mut client_near) = tokio::io::duplex(100);
        let (mut up_near, up_far) = tokio::io::duplex(333);
        let task = tokio::spawn(async move {
            relay_unstopped(&mut client_near, &mut up_near, Duration::from_secs(60)).await
        });
        let data = |seed: u8| -> Vec<u8> {
            (0..300_000u32)
                .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
                .collect()
        };
        let (up_data, down_data) = (data(1), data(7));
        let pump = |mut io: tokio::io::DuplexStream, out: Vec<u8>| {
            tokio::spawn(async move {
                let (mut r, mut w) = tokio::io::split(&mut io);
                let send = async {
                    w.write_all(&out).await.unwrap();
                    w.shutdown().await.unwrap();
                };
                let mut got = Vec::new();
                let recv = r.read_to_end(&mut got);
                let (_, n) = tokio::join!(send, recv);
                n.unwrap();
                got
            })
        };
        let at_up = pump(up_far, down_data.clone());
        let at_client = pump(client_far, up_data.clone());
        assert_eq!(at_up.await.unwrap(), up_data);
        assert_eq!(at_client.await.unwrap(), down_data);
        let stats = task.await.unwrap().unwrap();
        assert_eq!((stats.to_upstream, stats.to_client), (300_000, 300_000));
        assert!(!stats.idle_timeout);
    }

    #[tokio::test(start_paused = true)]
    async fn traffic_postpones_the_idle_timeout() {
        let (mut client_far, mut client_near) = tokio::io::duplex(64);
        let (mut up_near, mut up_far) = tokio::io::duplex(64);
        let started = Instant::now();
        let task = tokio::spawn(async move {
            relay_unstopped(&mut client_near, &mut up_near, Duration::from_secs(30)).await
        });
        tokio::time::sleep(Duration::from_secs(20)).await;
        client_far.write_all(b"x").await.unwrap();
        let mut b = [0u8; 1];
        up_far.read_exact(&mut b).await.unwrap();
        let stats = task.await.unwrap().unwrap();
        assert!(stats.idle_timeout);
        let after = started.elapsed();
        assert!(
            after >= Duration::from_secs(50) && after < Duration::from_secs(51),
            "{after:?}"
        );
    }

    /// Yields its chunks, then fails as a TLS peer does that closes
    /// without close_notify; writes go nowhere.
    struct Abrupt(Vec<&'static [u8]>);

    impl AsyncRead for Abrupt {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let this = self.get_mut();
            if this.0.is_empty() {
                return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
            }
            buf.put_slice(this.0.remove(0));
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncWrite for Abrupt {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            b: &[u8],
        ) -> Poll<io::Result<usize>> {
            Poll::Ready(Ok(b.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// Yields its chunks, then a connection reset.
    struct Reset(Vec<&'static [u8]>);

    impl AsyncRead for Reset {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let this = self.get_mut();
            if this.0.is_empty() {
                return Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()));
            }
            buf.put_slice(this.0.remove(0));
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncWrite for Reset {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            b: &[u8],
        ) -> Poll<io::Result<usize>> {
            Poll::Ready(Ok(b.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn a_reset_after_the_servers_last_words_keeps_them() {
        let (_client_far, mut client_near) = tokio::io::duplex(1024);
        let mut upstream = Reset(vec![b"* BYE Session invalidated - AccessTokenExpired\r\n"]);
        let e = relay_unstopped(&mut client_near, &mut upstream, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert_eq!(e.source.kind(), io::ErrorKind::ConnectionReset);
        assert!(e.stats.upstream_ended);
        assert_eq!(
            e.stats.upstream_tail,
            b"* BYE Session invalidated - AccessTokenExpired\r\n"
        );
    }

    #[tokio::test]
    async fn last_words_before_an_abrupt_close_reach_the_client() {
        let (mut client_far, mut client_near) = tokio::io::duplex(1024);
        let mut upstream = Abrupt(vec![b"* BYE bye\r\n", b"z OK LOGOUT done\r\n"]);
        let stats = relay_unstopped(&mut client_near, &mut upstream, Duration::from_secs(5))
            .await
            .unwrap();
        drop(client_near);
        let mut got = Vec::new();
        client_far.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"* BYE bye\r\nz OK LOGOUT done\r\n");
        assert_eq!(stats.to_client, got.len() as u64);
        assert!(stats.upstream_ended);
        assert_eq!(stats.upstream_tail, got);
    }
}
