//! Socket plumbing shared by the sandbox mail servers: the accept loop
//! (a task per connection, all stopped on shutdown) and the TLS accept with
//! a handshake timeout.

use std::future::Future;
use std::io;
use std::time::Duration;

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
