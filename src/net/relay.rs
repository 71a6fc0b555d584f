//! The relay: after login, bytes are copied both ways untouched until either
//! side closes or the session is idle too long. No parsing happens here.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// Copy buffer per direction: one TLS record.
const BUFFER: usize = 16 * 1024;

/// What a relayed session moved.
#[derive(Debug, Default, Clone, Copy)]
pub struct RelayStats {
    /// Bytes from the client to the upstream.
    pub to_upstream: u64,
    /// Bytes from the upstream to the client.
    pub to_client: u64,
    /// Closed because neither side sent anything for the idle timeout.
    pub idle_timeout: bool,
}

/// Records when data last moved, for the idle timeout.
struct Watched<'a, S> {
    inner: &'a mut S,
    start: Instant,
    last: &'a AtomicU64,
    /// Bytes read from `inner`.
    read: u64,
}

impl<S> Watched<'_, S> {
    fn touch(&self) {
        self.last
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<'_, S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut *this.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            this.read += n as u64;
            this.touch();
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<'_, S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        Pin::new(&mut *this.inner).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Copies both ways until both directions are closed, an error occurs, or
/// nothing moved for `idle`. Half-closes are passed on.
pub async fn relay<C, U>(client: &mut C, upstream: &mut U, idle: Duration) -> io::Result<RelayStats>
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let start = Instant::now();
    let last = AtomicU64::new(0);
    let mut c = Watched {
        inner: client,
        start,
        last: &last,
        read: 0,
    };
    let mut u = Watched {
        inner: upstream,
        start,
        last: &last,
        read: 0,
    };
    let outcome = {
        let copy = tokio::io::copy_bidirectional_with_sizes(&mut c, &mut u, BUFFER, BUFFER);
        tokio::pin!(copy);
        loop {
            let deadline = start + Duration::from_millis(last.load(Ordering::Relaxed)) + idle;
            tokio::select! {
                r = &mut copy => break r.map(|_| false),
                _ = tokio::time::sleep_until(deadline) => {
                    let now_deadline = start + Duration::from_millis(last.load(Ordering::Relaxed)) + idle;
                    if now_deadline <= Instant::now() {
                        break Ok(true);
                    }
                }
            }
        }
    };
    let stats = |idle_timeout| RelayStats {
        to_upstream: c.read,
        to_client: u.read,
        idle_timeout,
    };
    match outcome {
        Ok(idle_timeout) => Ok(stats(idle_timeout)),
        // A peer that closes without TLS close_notify after its last word
        // (common after LOGOUT) ends the session like a clean close.
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(stats(false)),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn copies_both_ways_and_half_closes() {
        let (mut client_far, mut client_near) = tokio::io::duplex(1024);
        let (mut up_near, mut up_far) = tokio::io::duplex(1024);
        let task = tokio::spawn(async move {
            relay(&mut client_near, &mut up_near, Duration::from_secs(5)).await
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
    }

    #[tokio::test(start_paused = true)]
    async fn idle_timeout_closes() {
        let (_client_far, mut client_near) = tokio::io::duplex(64);
        let (mut up_near, _up_far) = tokio::io::duplex(64);
        let stats = relay(&mut client_near, &mut up_near, Duration::from_secs(30))
            .await
            .unwrap();
        assert!(stats.idle_timeout);
    }
}
