//! Sockets and TLS: listeners, the per-connection driver, the upstream
//! connector, the relay, the control socket, and systemd's notifications
//! and inherited sockets. Nothing here parses a protocol.

#[cfg(unix)]
pub mod control;
pub mod dial;
pub mod listener;
pub mod relay;
pub mod session;
pub mod stream;
pub mod systemd;
pub mod tls;
pub mod upstream;

/// Where the outcome of a reload asked for through the control socket
/// goes: what is in force now, or why the configuration was refused.
pub type ReloadReply = tokio::sync::oneshot::Sender<Result<String, String>>;
