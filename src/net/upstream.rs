//! The upstream connector: TCP connect, TLS, and the I/O half of the
//! upstream login dialogue. The dialogue itself (what to send, what the
//! server meant) is the protocol core's; this module only moves bytes and
//! fetches tokens when asked.

use std::sync::Arc;
use std::time::Duration;

use rustls::ClientConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::stream::Stream;
use crate::config::{Account, UpstreamTls};
use crate::oauth::{AccessToken, TokenError, TokenSource};
use crate::provider::{Provider, ServerEndpoint};
use crate::vault::Unlocked;
use mailbridge_proto::sasl::BearerToken;
use mailbridge_proto::{Rejection, UpstreamError, UpstreamLogin, UpstreamStep, UpstreamSuccess};

/// A logged-in upstream connection.
pub struct UpstreamConn {
    /// The connection, ready for relaying.
    pub stream: Stream,
    /// What the server said on success.
    pub success: UpstreamSuccess,
}

/// Why the upstream login failed.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamFailure {
    /// TCP or TLS failed.
    #[error("cannot connect to {server}: {reason}")]
    Connect {
        /// host:port.
        server: String,
        /// Why.
        reason: String,
    },
    /// The server closed or broke the connection during login.
    #[error("{server} closed the connection during login{}", .reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default())]
    Closed {
        /// host:port.
        server: String,
        /// The I/O error, if any.
        reason: Option<String>,
    },
    /// The server said something the dialogue cannot follow.
    #[error("{server}: {source}")]
    Protocol {
        /// host:port.
        server: String,
        /// What.
        source: UpstreamError,
    },
    /// The server refused the token.
    #[error("{server} refused the token: {}", .rejection.refusal)]
    Rejected {
        /// host:port.
        server: String,
        /// The refusal.
        rejection: Rejection,
    },
    /// No token could be had.
    #[error(transparent)]
    Token(#[from] TokenError),
}

/// Where access tokens for one login come from.
pub struct TokenAccess<'a> {
    /// The token cache and refresher.
    pub source: &'a TokenSource,
    /// The account's provider.
    pub provider: &'a Provider,
    /// The account (grant kind, upstream login name).
    pub account: &'a Account,
    /// The unlocked grant.
    pub unlocked: &'a Unlocked,
}

/// Connects to `endpoint` and logs in with tokens from `access`. A
/// rejection whose challenge asks for it (status 400/401) gets one retry
/// with a freshly refreshed token on the same connection.
pub async fn login(
    endpoint: &ServerEndpoint,
    tls: Arc<ClientConfig>,
    connect_timeout: Duration,
    mut session: Box<dyn UpstreamLogin>,
    access: TokenAccess<'_>,
) -> Result<UpstreamConn, UpstreamFailure> {
    let server = format!("{}:{}", endpoint.host, endpoint.port);
    let connect_err = |reason: String| UpstreamFailure::Connect {
        server: server.clone(),
        reason,
    };
    let mut stream = tokio::time::timeout(connect_timeout, async {
        let tcp = TcpStream::connect((endpoint.host.as_str(), endpoint.port))
            .await
            .map_err(|e| connect_err(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        let plain = Stream::Plain(tcp);
        match endpoint.tls {
            UpstreamTls::Implicit => plain
                .connect_tls(tls.clone(), &endpoint.host)
                .await
                .map_err(|e| connect_err(format!("TLS: {e}"))),
            UpstreamTls::Starttls => Ok(plain),
        }
    })
    .await
    .map_err(|_| connect_err(format!("no answer within {} s", connect_timeout.as_secs())))??;

    let mut buf = vec![0u8; 8 * 1024];
    let mut current: Option<AccessToken> = None;
    let mut retried = false;
    loop {
        let step = session
            .next_step()
            .map_err(|source| UpstreamFailure::Protocol {
                server: server.clone(),
                source,
            })?;
        match step {
            UpstreamStep::NeedInput => {
                let n = stream
                    .read(&mut buf)
                    .await
                    .map_err(|e| UpstreamFailure::Closed {
                        server: server.clone(),
                        reason: Some(e.to_string()),
                    })?;
                if n == 0 {
                    return Err(UpstreamFailure::Closed {
                        server: server.clone(),
                        reason: None,
                    });
                }
                session.feed(&buf[..n]);
            }
            UpstreamStep::Send(bytes) => {
                write(&mut stream, &bytes, &server).await?;
            }
            UpstreamStep::StartTls => {
                stream = tokio::time::timeout(
                    connect_timeout,
                    stream.connect_tls(tls.clone(), &endpoint.host),
                )
                .await
                .map_err(|_| connect_err("STARTTLS handshake timed out".into()))?
                .map_err(|e| connect_err(format!("STARTTLS: {e}")))?;
                session.tls_started();
            }
            UpstreamStep::NeedToken => {
                let refused = if retried { current.as_ref() } else { None };
                let token = access
                    .source
                    .token(access.provider, access.account, access.unlocked, refused)
                    .await?;
                session.provide_token(&BearerToken {
                    user: access.account.upstream_user.clone(),
                    token: token.secret.clone(),
                    host: endpoint.host.clone(),
                    port: endpoint.port,
                });
                current = Some(token);
            }
            UpstreamStep::Authenticated(success) => {
                return Ok(UpstreamConn { stream, success });
            }
            UpstreamStep::Rejected(rejection) => {
                if rejection.retry_suggested && !retried {
                    tracing::info!(server = %server, "token refused with a retry status; refreshing once");
                    retried = true;
                    session.retry();
                    continue;
                }
                return Err(UpstreamFailure::Rejected {
                    server: server.clone(),
                    rejection,
                });
            }
        }
    }
}

async fn write(stream: &mut Stream, bytes: &[u8], server: &str) -> Result<(), UpstreamFailure> {
    let r = async {
        stream.write_all(bytes).await?;
        stream.flush().await
    }
    .await;
    r.map_err(|e| UpstreamFailure::Closed {
        server: server.to_string(),
        reason: Some(e.to_string()),
    })
}
