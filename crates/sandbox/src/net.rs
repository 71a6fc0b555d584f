//! Socket plumbing shared by the sandbox mail servers: the accept loop
//! (a task per connection, all stopped on shutdown), the TLS accept with a
//! handshake timeout, and a line-reading connection with a small buffer.

use std::future::Future;
use std::io;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

/// Longest a client may take over its TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts until `stop` turns true, running `connection` in a task of its
/// own for each client; those tasks end at shutdown too. `name` labels the
/// log lines.
pub(crate) async fn accept_loop<F, Fut>(
    listener: TcpListener,
    mut stop: watch::Receiver<bool>,
    name: &'static str,
    connection: F,
) where
    F: Fn(TcpStream) -> Fut,
    Fut: Future<Output = io::Result<()>> + Send + 'static,
{
    loop {
        tokio::select! {
            () = stopped(&mut stop) => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => {
                    let session = connection(tcp);
                    let mut stop = stop.clone();
                    tokio::spawn(async move {
                        tokio::select! {
                            result = session => {
                                if let Err(e) = result {
                                    tracing::debug!("sandbox {name} connection ended: {e}");
                                }
                            }
                            () = stopped(&mut stop) => {}
                        }
                    });
                }
                Err(e) => {
                    // Out of file descriptors under load: back off briefly.
                    tracing::warn!("sandbox {name} accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }
}

/// Resolves once shutdown is requested (or the server handle is gone).
pub(crate) async fn stopped(rx: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns is not Send: drop it here.
    let _ = rx.wait_for(|stop| *stop).await;
}

/// The server side of a TLS handshake, bounded in time.
pub(crate) async fn accept_tls(
    acceptor: &TlsAcceptor,
    tcp: TcpStream,
) -> io::Result<tokio_rustls::server::TlsStream<TcpStream>> {
    tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))?
}

/// Read buffer per connection: idle sessions stay small.
const READ_BUFFER: usize = 1024;

/// The stream with a small read buffer and the current line.
pub(crate) struct Conn<S> {
    pub(crate) io: BufReader<S>,
    pub(crate) line: Vec<u8>,
    max_line: usize,
}

/// Result of reading one line.
pub(crate) enum Line {
    /// `line` holds the line without its end-of-line.
    Ok,
    Eof,
    TooLong,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    /// A connection whose lines may be at most `max_line` bytes.
    pub(crate) fn new(stream: S, max_line: usize) -> Conn<S> {
        Conn {
            io: BufReader::with_capacity(READ_BUFFER, stream),
            line: Vec::new(),
            max_line,
        }
    }

    pub(crate) async fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        let stream = self.io.get_mut();
        stream.write_all(bytes).await?;
        stream.flush().await
    }

    pub(crate) async fn send_line(&mut self, line: &str) -> io::Result<()> {
        let mut bytes = Vec::with_capacity(line.len() + 2);
        bytes.extend_from_slice(line.as_bytes());
        bytes.extend_from_slice(b"\r\n");
        self.send(&bytes).await
    }

    pub(crate) async fn read_line(&mut self) -> io::Result<Line> {
        self.line.clear();
        if self.line.capacity() > 4 * READ_BUFFER {
            // Keep idle sessions small after one long line.
            self.line.shrink_to(READ_BUFFER);
        }
        loop {
            let available = self.io.fill_buf().await?;
            if available.is_empty() {
                return Ok(Line::Eof);
            }
            let (chunk, done) = match available.iter().position(|&b| b == b'\n') {
                Some(i) => (&available[..=i], true),
                None => (available, false),
            };
            let used = chunk.len();
            if self.line.len() + used > self.max_line {
                return Ok(Line::TooLong);
            }
            self.line.extend_from_slice(chunk);
            self.io.consume(used);
            if done {
                let trimmed = super::imap::syntax::trim_eol(&self.line).len();
                self.line.truncate(trimmed);
                return Ok(Line::Ok);
            }
        }
    }
}
