//! Listening sockets: accept, cap concurrent connections, spawn a task per
//! connection, stop on shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};

/// Accepts connections until `shutdown` turns true, running `handler` in a
/// task of its own for each. At most `limit`'s permits are served at once;
/// further clients wait in the kernel's accept queue.
pub async fn accept_loop<H, F>(
    listener: TcpListener,
    limit: Arc<Semaphore>,
    mut shutdown: watch::Receiver<bool>,
    handler: H,
) where
    H: Fn(TcpStream, SocketAddr) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    let local = listener.local_addr().ok();
    loop {
        if *shutdown.borrow() {
            break;
        }
        let permit = tokio::select! {
            _ = shutdown.changed() => break,
            p = limit.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let accepted = tokio::select! {
            _ = shutdown.changed() => break,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((tcp, peer)) => {
                let _ = tcp.set_nodelay(true);
                let fut = handler(tcp, peer);
                tokio::spawn(async move {
                    fut.await;
                    drop(permit);
                });
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
