//! Sockets and TLS: listeners, the per-connection driver, the upstream
//! connector and the relay. Nothing here parses a protocol.

pub mod listener;
pub mod relay;
pub mod session;
pub mod stream;
pub mod tls;
pub mod upstream;
