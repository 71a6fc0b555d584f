//! The upstream connector: TCP connect, TLS, and the I/O half of the
//! upstream login dialogue. The dialogue itself (what to send, what the
//! server meant) is the protocol core's; this module only moves bytes and
//! asks for tokens when the core wants one.
//!
//! [`login`] connects over TCP and TLS; [`dialogue`] is the part after the
//! connection, generic over the stream ([`AsyncRead`] + [`AsyncWrite`]) and
//! over how STARTTLS upgrades it ([`StartTls`]), so it runs as well over an
//! in-memory `tokio::io::duplex` as over a socket. Tokens come through
//! [`Tokens`]: this module knows nothing of token caches, grants or
//! providers.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::ClientConfig;
use secrecy::SecretString;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::stream::Stream;
use crate::config::schema::UpstreamTls;
use mailbridge_proto::sasl::BearerToken;
use mailbridge_proto::{Rejection, UpstreamError, UpstreamLogin, UpstreamStep, UpstreamSuccess};

/// A logged-in upstream connection.
pub struct UpstreamConn<S = Stream> {
    /// The connection, ready for relaying.
    pub stream: S,
    /// What the server said on success.
    pub success: UpstreamSuccess,
}

/// Where access tokens for one login come from. The dialogue asks for
/// [`Tokens::token`] first and, only after the server refused that token
/// with a status that suggests it (400/401), once for
/// [`Tokens::fresh_token`].
pub trait Tokens: Send {
    /// Why no token could be had.
    type Error: std::error::Error + Send + Sync + 'static;

    /// A token to log in with (a cached one is fine).
    fn token(&mut self) -> impl Future<Output = Result<SecretString, Self::Error>> + Send;

    /// A token newer than the one last handed out, which the server
    /// refused.
    fn fresh_token(&mut self) -> impl Future<Output = Result<SecretString, Self::Error>> + Send;
}

/// How a stream becomes TLS when the dialogue says STARTTLS.
pub trait StartTls<S>: Sync {
    /// Runs the client side of a TLS handshake on `stream`.
    fn start_tls(&self, stream: S) -> impl Future<Output = io::Result<S>> + Send;
}

/// The server to log in to and as whom.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    /// Host name: where to connect, the TLS server name, and the host in
    /// OAUTHBEARER's `host=`.
    pub host: &'a str,
    /// TCP port.
    pub port: u16,
    /// Implicit TLS, or plain until the dialogue's STARTTLS.
    pub tls: UpstreamTls,
    /// The upstream login name the token is for.
    pub user: &'a str,
}

impl Target<'_> {
    fn server(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

/// Why the upstream login failed. The messages are what a client is told:
/// one sentence each, naming the server; the library error underneath is
/// the [`source`](std::error::Error::source), for the log.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamFailure<E: std::error::Error + 'static> {
    /// The host name does not resolve.
    #[error("cannot find the address of {host}; check the server's host name")]
    Resolve {
        /// The host name.
        host: String,
        /// The resolver's error.
        #[source]
        source: io::Error,
    },
    /// No TCP connection could be made.
    #[error("cannot connect to {server}{}", cause(source))]
    Connect {
        /// host:port.
        server: String,
        /// The last address's connect error.
        #[source]
        source: io::Error,
    },
    /// Connecting (with the implicit TLS handshake) took too long.
    #[error("cannot connect to {server}: no answer within {} s", .after.as_secs())]
    Timeout {
        /// host:port.
        server: String,
        /// The connect timeout.
        after: Duration,
    },
    /// The TLS handshake failed (implicit TLS, or after STARTTLS).
    #[error("the TLS handshake with {server} failed{}", tls_cause(source))]
    Tls {
        /// host:port.
        server: String,
        /// The handshake's error (rustls's, inside).
        #[source]
        source: io::Error,
    },
    /// The server closed or broke the connection during login.
    #[error("{server} closed the connection during login")]
    Closed {
        /// host:port.
        server: String,
        /// The read or write error, if it was not a plain end of stream.
        #[source]
        source: Option<io::Error>,
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
    Token(E),
}

/// A short reason for a connect error, in our words (`""` when we have
/// nothing better than the log's detail).
fn cause(e: &io::Error) -> &'static str {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => {
            " (connection refused: check the port and that the server is running)"
        }
        io::ErrorKind::TimedOut => " (timed out)",
        io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted => {
            " (the connection was reset)"
        }
        io::ErrorKind::HostUnreachable => " (host unreachable)",
        io::ErrorKind::NetworkUnreachable => " (network unreachable)",
        io::ErrorKind::PermissionDenied => " (not permitted here, e.g. by a firewall rule)",
        _ => "",
    }
}

/// A short reason for a failed TLS handshake, in our words.
fn tls_cause(e: &io::Error) -> String {
    use rustls::{CertificateError, Error as TlsError};
    let rustls_error = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<TlsError>());
    let text = match rustls_error {
        Some(TlsError::InvalidCertificate(c)) => match c {
            CertificateError::UnknownIssuer => {
                "its certificate is not signed by an authority this machine trusts; for a private CA set ca_file on the provider"
            }
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                "its certificate is not valid for this host name; check the server's host name"
            }
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                "its certificate has expired"
            }
            CertificateError::Revoked => "its certificate has been revoked",
            _ => "its certificate was not accepted",
        },
        Some(TlsError::InvalidMessage(_)) => {
            "it does not speak TLS on this port; check the port and the tls setting (implicit or starttls)"
        }
        Some(TlsError::AlertReceived(_)) => "it refused the handshake",
        Some(TlsError::PeerIncompatible(_)) => "it has no TLS version or cipher in common with us",
        Some(_) => "",
        None => match e.kind() {
            io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted => "it closed the connection",
            io::ErrorKind::TimedOut => "no answer in time",
            io::ErrorKind::InvalidInput => "the host name is not a valid TLS server name",
            _ => "",
        },
    };
    if text.is_empty() {
        String::new()
    } else {
        format!(": {text}")
    }
}

/// STARTTLS with rustls, checking the certificate for `host`, bounded by
/// `timeout`.
struct RustlsUpgrade<'a> {
    config: Arc<ClientConfig>,
    host: &'a str,
    timeout: Duration,
}

impl StartTls<Stream> for RustlsUpgrade<'_> {
    async fn start_tls(&self, stream: Stream) -> io::Result<Stream> {
        tokio::time::timeout(
            self.timeout,
            stream.connect_tls(self.config.clone(), self.host),
        )
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "STARTTLS handshake timed out"))?
    }
}

/// Connects to `target` (TCP, and TLS when implicit) and logs in with
/// tokens from `tokens`. A rejection whose challenge asks for it (status
/// 400/401) gets one retry with a fresh token on the same connection.
pub async fn login<T: Tokens>(
    target: &Target<'_>,
    tls: Arc<ClientConfig>,
    connect_timeout: Duration,
    session: Box<dyn UpstreamLogin>,
    tokens: &mut T,
) -> Result<UpstreamConn, UpstreamFailure<T::Error>> {
    let stream = tokio::time::timeout(connect_timeout, connect(target, &tls))
        .await
        .map_err(|_| UpstreamFailure::Timeout {
            server: target.server(),
            after: connect_timeout,
        })??;
    let upgrade = RustlsUpgrade {
        config: tls,
        host: target.host,
        timeout: connect_timeout,
    };
    dialogue(stream, target, session, tokens, &upgrade).await
}

/// TCP to the first address of `target.host` that answers, then the TLS
/// handshake if TLS is implicit.
async fn connect<E: std::error::Error + 'static>(
    target: &Target<'_>,
    tls: &Arc<ClientConfig>,
) -> Result<Stream, UpstreamFailure<E>> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((target.host, target.port))
        .await
        .map_err(|source| UpstreamFailure::Resolve {
            host: target.host.to_string(),
            source,
        })?
        .collect();
    let mut last = io::Error::new(io::ErrorKind::NotFound, "the name has no address");
    let mut tcp = None;
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(s) => {
                tcp = Some(s);
                break;
            }
            Err(e) => last = e,
        }
    }
    let Some(tcp) = tcp else {
        return Err(UpstreamFailure::Connect {
            server: target.server(),
            source: last,
        });
    };
    // Login lines are small and each waits for an answer.
    let _ = tcp.set_nodelay(true);
    let plain = Stream::Plain(tcp);
    match target.tls {
        UpstreamTls::Implicit => {
            plain
                .connect_tls(tls.clone(), target.host)
                .await
                .map_err(|source| UpstreamFailure::Tls {
                    server: target.server(),
                    source,
                })
        }
        UpstreamTls::Starttls => Ok(plain),
    }
}

/// The login dialogue on a connected `stream`: drives `session`, feeds it
/// what the server sends, upgrades with `upgrade` on STARTTLS, and answers
/// its requests for tokens from `tokens` (a fresh one once after a
/// refusal that suggests a retry).
pub async fn dialogue<S, U, T>(
    mut stream: S,
    target: &Target<'_>,
    mut session: Box<dyn UpstreamLogin>,
    tokens: &mut T,
    upgrade: &U,
) -> Result<UpstreamConn<S>, UpstreamFailure<T::Error>>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
    U: StartTls<S>,
    T: Tokens,
{
    let closed = |source: Option<io::Error>| UpstreamFailure::Closed {
        server: target.server(),
        source,
    };
    let mut buf = vec![0u8; 8 * 1024];
    let mut retried = false;
    loop {
        let step = session
            .next_step()
            .map_err(|source| UpstreamFailure::Protocol {
                server: target.server(),
                source,
            })?;
        match step {
            UpstreamStep::NeedInput => {
                let n = stream.read(&mut buf).await.map_err(|e| closed(Some(e)))?;
                if n == 0 {
                    return Err(closed(None));
                }
                session.feed(&buf[..n]);
            }
            UpstreamStep::Send(bytes) => {
                let written = async {
                    stream.write_all(&bytes).await?;
                    stream.flush().await
                }
                .await;
                written.map_err(|e| closed(Some(e)))?;
            }
            UpstreamStep::StartTls => {
                stream =
                    upgrade
                        .start_tls(stream)
                        .await
                        .map_err(|source| UpstreamFailure::Tls {
                            server: target.server(),
                            source,
                        })?;
                session.tls_started();
            }
            UpstreamStep::NeedToken => {
                let token = if retried {
                    tokens.fresh_token().await
                } else {
                    tokens.token().await
                }
                .map_err(UpstreamFailure::Token)?;
                session.provide_token(&BearerToken {
                    user: target.user.to_string(),
                    token,
                    host: target.host.to_string(),
                    port: target.port,
                });
            }
            UpstreamStep::Authenticated(success) => {
                return Ok(UpstreamConn { stream, success });
            }
            UpstreamStep::Rejected(rejection) => {
                if rejection.retry_suggested && !retried {
                    tracing::info!(server = %target.server(), "token refused with a retry status; refreshing once");
                    retried = true;
                    session.retry();
                    continue;
                }
                return Err(UpstreamFailure::Rejected {
                    server: target.server(),
                    rejection,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use mailbridge_proto::imap::{ImapUpstreamLogin, UpstreamOptions};
    use tokio::io::{AsyncBufReadExt, BufReader, DuplexStream, ReadHalf, WriteHalf};

    use super::*;

    const TARGET: Target<'static> = Target {
        host: "imap.example",
        port: 993,
        tls: UpstreamTls::Implicit,
        user: "alice@example.com",
    };

    #[derive(Debug, thiserror::Error)]
    #[error("no token: the provider is down")]
    struct NoToken;

    /// Hands out `tok-1`, then `tok-2`, ... and counts the asks.
    #[derive(Default)]
    struct FakeTokens {
        issued: u32,
        fresh_asked: u32,
        fail: bool,
    }

    impl Tokens for FakeTokens {
        type Error = NoToken;

        async fn token(&mut self) -> Result<SecretString, NoToken> {
            if self.fail {
                return Err(NoToken);
            }
            self.issued += 1;
            Ok(SecretString::from(format!("tok-{}", self.issued)))
        }

        async fn fresh_token(&mut self) -> Result<SecretString, NoToken> {
            self.fresh_asked += 1;
            self.token().await
        }
    }

    /// STARTTLS over a duplex: the stream stays as it is (the test server
    /// goes on in clear), the call is counted; or the handshake fails.
    #[derive(Default)]
    struct FakeUpgrade {
        calls: std::sync::atomic::AtomicU32,
        fail: bool,
    }

    impl StartTls<DuplexStream> for FakeUpgrade {
        async fn start_tls(&self, stream: DuplexStream) -> io::Result<DuplexStream> {
            self.calls
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if self.fail {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "handshake cut short",
                ));
            }
            Ok(stream)
        }
    }

    /// The scripted server's end of the connection.
    struct Server {
        read: BufReader<ReadHalf<DuplexStream>>,
        write: WriteHalf<DuplexStream>,
    }

    impl Server {
        async fn send(&mut self, text: &str) {
            self.write.write_all(text.as_bytes()).await.unwrap();
        }

        /// One line from the client, without CRLF ("" at end of stream).
        async fn line(&mut self) -> String {
            let mut line = String::new();
            self.read.read_line(&mut line).await.unwrap();
            line.trim_end_matches(['\r', '\n']).to_string()
        }
    }

    /// A client stream and the scripted server's end.
    fn pair() -> (DuplexStream, Server) {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let (read, write) = tokio::io::split(server);
        (
            client,
            Server {
                read: BufReader::new(read),
                write,
            },
        )
    }

    fn imap(starttls: bool) -> Box<dyn UpstreamLogin> {
        Box::new(ImapUpstreamLogin::new(UpstreamOptions {
            starttls,
            ..Default::default()
        }))
    }

    /// The bearer token inside an `AUTHENTICATE XOAUTH2 <base64>` line.
    fn xoauth2_token(line: &str) -> String {
        let b64 = line.rsplit(' ').next().unwrap();
        let decoded = String::from_utf8(STANDARD.decode(b64).unwrap()).unwrap();
        assert!(
            decoded.starts_with("user=alice@example.com\u{1}"),
            "{decoded:?}"
        );
        decoded
            .split('\u{1}')
            .find_map(|p| p.strip_prefix("auth=Bearer "))
            .unwrap()
            .to_string()
    }

    #[tokio::test]
    async fn imap_greeting_with_sasl_ir_logs_in_with_one_token() {
        let (client, mut server) = pair();
        let script = tokio::spawn(async move {
            server
                .send("* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=XOAUTH2] ready\r\n")
                .await;
            let auth = server.line().await;
            assert!(auth.starts_with("mb1 AUTHENTICATE XOAUTH2 "), "{auth}");
            server
                .send("mb1 OK [CAPABILITY IMAP4rev1 IDLE] done\r\n* 1 EXISTS\r\n")
                .await;
            // The connection goes on as the relay's.
            let relayed = server.line().await;
            (xoauth2_token(&auth), relayed)
        });
        let mut tokens = FakeTokens::default();
        let upgrade = FakeUpgrade::default();
        let mut conn = dialogue(client, &TARGET, imap(false), &mut tokens, &upgrade)
            .await
            .unwrap();
        assert_eq!(conn.success.capabilities, ["IMAP4rev1", "IDLE"]);
        assert_eq!(conn.success.leftover, b"* 1 EXISTS\r\n");
        conn.stream.write_all(b"a1 NOOP\r\n").await.unwrap();
        let (token, relayed) = script.await.unwrap();
        assert_eq!(token, "tok-1");
        assert_eq!(relayed, "a1 NOOP");
        assert_eq!((tokens.issued, tokens.fresh_asked), (1, 0));
        assert_eq!(upgrade.calls.load(std::sync::atomic::Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn refusal_with_a_retry_challenge_gets_one_fresh_token() {
        let (client, mut server) = pair();
        let script = tokio::spawn(async move {
            server
                .send("* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=XOAUTH2] ready\r\n")
                .await;
            let first = server.line().await;
            let challenge = STANDARD.encode(r#"{"status":"401","schemes":"bearer"}"#);
            server.send(&format!("+ {challenge}\r\n")).await;
            // The challenge is answered with an empty line.
            assert_eq!(server.line().await, "");
            server
                .send("mb1 NO [AUTHENTICATIONFAILED] Invalid credentials\r\n")
                .await;
            let second = server.line().await;
            assert!(second.starts_with("mb2 AUTHENTICATE XOAUTH2 "), "{second}");
            server.send("mb2 OK [CAPABILITY IMAP4rev1] done\r\n").await;
            (xoauth2_token(&first), xoauth2_token(&second))
        });
        let mut tokens = FakeTokens::default();
        let conn = dialogue(
            client,
            &TARGET,
            imap(false),
            &mut tokens,
            &FakeUpgrade::default(),
        )
        .await
        .unwrap();
        assert_eq!(conn.success.capabilities, ["IMAP4rev1"]);
        assert_eq!(script.await.unwrap(), ("tok-1".into(), "tok-2".into()));
        assert_eq!(tokens.fresh_asked, 1);
    }

    #[tokio::test]
    async fn a_second_refusal_is_final() {
        let (client, mut server) = pair();
        let script = tokio::spawn(async move {
            server
                .send("* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=XOAUTH2] ready\r\n")
                .await;
            let challenge = STANDARD.encode(r#"{"status":"401"}"#);
            for tag in ["mb1", "mb2"] {
                server.line().await;
                server.send(&format!("+ {challenge}\r\n")).await;
                server.line().await;
                server
                    .send(&format!(
                        "{tag} NO [AUTHENTICATIONFAILED] Invalid credentials\r\n"
                    ))
                    .await;
            }
            server
        });
        let mut tokens = FakeTokens::default();
        let e = dialogue(
            client,
            &TARGET,
            imap(false),
            &mut tokens,
            &FakeUpgrade::default(),
        )
        .await
        .err()
        .unwrap();
        match &e {
            UpstreamFailure::Rejected { server, rejection } => {
                assert_eq!(server, "imap.example:993");
                assert!(rejection.retry_suggested);
            }
            other => panic!("{other:?}"),
        }
        assert!(e.to_string().contains("Invalid credentials"), "{e}");
        assert_eq!((tokens.issued, tokens.fresh_asked), (2, 1));
        drop(script.await.unwrap());
    }

    #[tokio::test]
    async fn the_server_closing_mid_login_is_one_sentence() {
        let (client, mut server) = pair();
        let script = tokio::spawn(async move {
            server
                .send("* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=XOAUTH2] ready\r\n")
                .await;
            let auth = server.line().await;
            drop(server);
            auth
        });
        let e = dialogue(
            client,
            &TARGET,
            imap(false),
            &mut FakeTokens::default(),
            &FakeUpgrade::default(),
        )
        .await
        .err()
        .unwrap();
        assert!(script.await.unwrap().starts_with("mb1 AUTHENTICATE"));
        assert!(
            matches!(e, UpstreamFailure::Closed { source: None, .. }),
            "{e:?}"
        );
        assert_eq!(
            e.to_string(),
            "imap.example:993 closed the connection during login"
        );
    }

    #[tokio::test]
    async fn a_write_into_a_broken_connection_keeps_its_cause_for_the_log() {
        let (client, mut server) = pair();
        let script = tokio::spawn(async move {
            // A greeting without capabilities makes the client ask; the
            // server is gone by then.
            server.send("* OK ready\r\n").await;
        });
        script.await.unwrap();
        let e = dialogue(
            client,
            &TARGET,
            imap(false),
            &mut FakeTokens::default(),
            &FakeUpgrade::default(),
        )
        .await
        .err()
        .unwrap();
        assert_eq!(
            e.to_string(),
            "imap.example:993 closed the connection during login"
        );
        let source = std::error::Error::source(&e).expect("the I/O error is kept");
        assert!(crate::report::chain(&e).ends_with(&source.to_string()));
    }

    #[tokio::test]
    async fn starttls_upgrades_through_the_given_upgrade() {
        let (client, mut server) = pair();
        let script = tokio::spawn(async move {
            server
                .send("* OK [CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED] hi\r\n")
                .await;
            assert_eq!(server.line().await, "mb1 STARTTLS");
            server.send("mb1 OK Begin TLS\r\n").await;
            // After the (pretended) handshake the capabilities are asked again.
            assert_eq!(server.line().await, "mb2 CAPABILITY");
            server
                .send("* CAPABILITY IMAP4rev1 AUTH=XOAUTH2 SASL-IR\r\nmb2 OK done\r\n")
                .await;
            let auth = server.line().await;
            server.send("mb3 OK [CAPABILITY IMAP4rev1] done\r\n").await;
            auth
        });
        let upgrade = FakeUpgrade::default();
        let result = dialogue(
            client,
            &TARGET,
            imap(true),
            &mut FakeTokens::default(),
            &upgrade,
        )
        .await;
        let auth = script.await.unwrap();
        assert!(result.is_ok(), "{:?}", result.err());
        assert!(auth.starts_with("mb3 AUTHENTICATE XOAUTH2 "), "{auth}");
        assert_eq!(upgrade.calls.load(std::sync::atomic::Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn a_failed_starttls_handshake_says_so_in_a_sentence() {
        let (client, mut server) = pair();
        let _script = tokio::spawn(async move {
            server
                .send("* OK [CAPABILITY IMAP4rev1 STARTTLS] hi\r\n")
                .await;
            server.line().await;
            server.send("mb1 OK Begin TLS\r\n").await;
            server
        });
        let upgrade = FakeUpgrade {
            fail: true,
            ..Default::default()
        };
        let e = dialogue(
            client,
            &TARGET,
            imap(true),
            &mut FakeTokens::default(),
            &upgrade,
        )
        .await
        .err()
        .unwrap();
        assert!(matches!(e, UpstreamFailure::Tls { .. }), "{e:?}");
        assert_eq!(
            e.to_string(),
            "the TLS handshake with imap.example:993 failed: it closed the connection"
        );
        assert!(crate::report::chain(&e).ends_with("handshake cut short"));
    }

    #[tokio::test]
    async fn no_token_stops_the_login_with_the_token_error() {
        let (client, mut server) = pair();
        let _script = tokio::spawn(async move {
            server
                .send("* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=XOAUTH2] ready\r\n")
                .await;
            server
        });
        let mut tokens = FakeTokens {
            fail: true,
            ..Default::default()
        };
        let e = dialogue(
            client,
            &TARGET,
            imap(false),
            &mut tokens,
            &FakeUpgrade::default(),
        )
        .await
        .err()
        .unwrap();
        assert!(matches!(e, UpstreamFailure::Token(NoToken)), "{e:?}");
        assert_eq!(e.to_string(), "no token: the provider is down");
    }

    #[tokio::test]
    async fn connect_failures_are_sentences_with_their_cause_kept() {
        // A port nobody listens on.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let target = Target {
            host: "127.0.0.1",
            port,
            tls: UpstreamTls::Starttls,
            user: "alice@example.com",
        };
        let tls = crate::net::tls::client_config(None).unwrap();
        let e = login(
            &target,
            tls,
            Duration::from_secs(5),
            imap(true),
            &mut FakeTokens::default(),
        )
        .await
        .err()
        .unwrap();
        assert!(matches!(e, UpstreamFailure::Connect { .. }), "{e:?}");
        assert_eq!(
            e.to_string(),
            format!(
                "cannot connect to 127.0.0.1:{port} (connection refused: check the port and that the server is running)"
            )
        );
        assert!(std::error::Error::source(&e).is_some());
    }

    #[test]
    fn tls_causes_are_our_words() {
        let unknown = io::Error::new(
            io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        );
        let said = tls_cause(&unknown);
        assert!(said.contains("set ca_file"), "{said}");
        let eof = io::Error::new(io::ErrorKind::UnexpectedEof, "tls handshake eof");
        assert_eq!(tls_cause(&eof), ": it closed the connection");
    }
}
