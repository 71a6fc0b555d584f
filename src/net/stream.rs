//! One stream type for every connection state: plain TCP, or TLS as server
//! (local STARTTLS / implicit TLS) or as client (upstream), so a session
//! can switch to TLS in place and the relay sees one type.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::{ClientConfig, ServerConfig};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::relay::{BUFFER, pool};

/// A TCP connection, maybe wrapped in TLS.
pub enum Stream {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS, we are the server.
    ServerTls(Box<tokio_rustls::server::TlsStream<ReadAhead<TcpStream>>>),
    /// TLS, we are the client.
    ClientTls(Box<tokio_rustls::client::TlsStream<ReadAhead<TcpStream>>>),
    /// Transitional state while a handshake owns the socket.
    Gone,
}

impl Stream {
    /// Runs the server side of a TLS handshake on a plain stream.
    pub async fn accept_tls(self, config: Arc<ServerConfig>) -> io::Result<Stream> {
        match self {
            Stream::Plain(tcp) => {
                let tls = TlsAcceptor::from(config)
                    .accept(ReadAhead::new(tcp))
                    .await?;
                Ok(Stream::ServerTls(Box::new(tls)))
            }
            _ => Err(io::Error::other("TLS is already active")),
        }
    }

    /// Runs the client side of a TLS handshake on a plain stream; the
    /// server's certificate is checked for `host`.
    pub async fn connect_tls(self, config: Arc<ClientConfig>, host: &str) -> io::Result<Stream> {
        let name = ServerName::try_from(host.to_string()).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("`{host}` is not a valid server name"),
            )
        })?;
        match self {
            Stream::Plain(tcp) => {
                let tls = TlsConnector::from(config)
                    .connect(name, ReadAhead::new(tcp))
                    .await?;
                Ok(Stream::ClientTls(Box::new(tls)))
            }
            _ => Err(io::Error::other("TLS is already active")),
        }
    }

    /// Whether the stream is encrypted.
    pub fn is_tls(&self) -> bool {
        matches!(self, Stream::ServerTls(_) | Stream::ClientTls(_))
    }
}

fn gone() -> io::Error {
    io::Error::new(
        io::ErrorKind::NotConnected,
        "stream used during a TLS handshake",
    )
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::ServerTls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Stream::ClientTls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Stream::Gone => Poll::Ready(Err(gone())),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::ServerTls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Stream::ClientTls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Stream::Gone => Poll::Ready(Err(gone())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::ServerTls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Stream::ClientTls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Stream::Gone => Poll::Ready(Err(gone())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::ServerTls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Stream::ClientTls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Stream::Gone => Poll::Ready(Ok(())),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::ServerTls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
            Stream::ClientTls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
            Stream::Gone => Poll::Ready(Err(gone())),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::ServerTls(s) => s.is_write_vectored(),
            Stream::ClientTls(s) => s.is_write_vectored(),
            Stream::Gone => false,
        }
    }
}

/// Reads from a socket in large gulps on behalf of rustls, which asks for
/// 4 KiB at a time: one system call then serves a whole burst of TLS
/// records. The buffer comes from the relay's pool when a read is tried and
/// goes back when the read would block or the buffer is drained, so an idle
/// connection holds none.
pub struct ReadAhead<S> {
    inner: S,
    /// Read but not yet handed out: `buf[pos..len]`.
    buf: Option<Box<[u8]>>,
    pos: usize,
    len: usize,
}

impl<S> ReadAhead<S> {
    /// Wraps `inner`.
    pub fn new(inner: S) -> Self {
        ReadAhead {
            inner,
            buf: None,
            pos: 0,
            len: 0,
        }
    }

    /// Bytes read ahead and not yet handed out.
    pub fn buffered(&self) -> usize {
        self.len - self.pos
    }
}

impl<S> Drop for ReadAhead<S> {
    fn drop(&mut self) {
        if let Some(buf) = self.buf.take() {
            pool::give(buf);
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ReadAhead<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if out.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        if this.buf.is_none() {
            if out.remaining() >= BUFFER {
                return Pin::new(&mut this.inner).poll_read(cx, out);
            }
            let mut buf = pool::take();
            let mut rb = ReadBuf::new(&mut buf);
            match Pin::new(&mut this.inner).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) if !rb.filled().is_empty() => {
                    this.len = rb.filled().len();
                    this.pos = 0;
                    this.buf = Some(buf);
                }
                other => {
                    pool::give(buf);
                    return other;
                }
            }
        }
        if let Some(buf) = &this.buf {
            let n = out.remaining().min(this.len - this.pos);
            out.put_slice(&buf[this.pos..this.pos + n]);
            this.pos += n;
            if this.pos == this.len
                && let Some(buf) = this.buf.take()
            {
                pool::give(buf);
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ReadAhead<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn read_ahead_serves_small_reads_and_lets_go_when_drained() {
        let (mut far, near) = tokio::io::duplex(256 * 1024);
        let mut ra = ReadAhead::new(near);
        let data: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
        far.write_all(&data).await.unwrap();
        let mut got = Vec::new();
        let mut small = [0u8; 4096];
        while got.len() < data.len() {
            let n = ra.read(&mut small).await.unwrap();
            got.extend_from_slice(&small[..n]);
            if ra.buffered() == 0 {
                assert!(ra.buf.is_none(), "a drained buffer is given back");
            }
        }
        assert_eq!(got, data);
        assert!(ra.buf.is_none());
        // Writes pass through; end of stream is end of stream.
        ra.write_all(b"pong").await.unwrap();
        let mut pong = [0u8; 4];
        far.read_exact(&mut pong).await.unwrap();
        assert_eq!(&pong, b"pong");
        drop(far);
        assert_eq!(ra.read(&mut small).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn read_ahead_large_reads_go_straight_through() {
        let (mut far, near) = tokio::io::duplex(256 * 1024);
        let mut ra = ReadAhead::new(near);
        far.write_all(&[7u8; 1000]).await.unwrap();
        let mut big = vec![0u8; BUFFER];
        assert_eq!(ra.read(&mut big).await.unwrap(), 1000);
        assert!(ra.buf.is_none());
    }
}
