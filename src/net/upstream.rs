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
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use rustls::ClientConfig;
use secrecy::SecretString;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::dial::{DialError, Dialer};
use super::stream::Stream;
use crate::config::schema::UpstreamTls;
use mailbridge_proto::farewell;
use mailbridge_proto::sasl::BearerToken;
use mailbridge_proto::{Rejection, UpstreamError, UpstreamLogin, UpstreamStep, UpstreamSuccess};

/// A logged-in upstream connection.
pub struct UpstreamConn<S = Stream> {
    /// The connection, ready for relaying.
    pub stream: S,
    /// What the server said on success.
    pub success: UpstreamSuccess,
    /// How to read why the server ended the session, from the last bytes
    /// it sent (the protocol crate's; the relay keeps the bytes).
    pub farewell: farewell::Reader,
    /// Kept for as long as the session lasts (e.g. its place in an
    /// account's count of open sessions).
    pub held: Option<Box<dyn Send + Sync>>,
}

/// Where access tokens for one login come from. The login asks for
/// [`Tokens::token`] as soon as it starts, while it connects; and, only
/// after the server refused that token, once for [`Tokens::fresh_token`]:
/// when a failure challenge suggests it (status 400/401), or when the
/// server refused without a challenge a token that
/// [`Tokens::last_was_cached`] (Microsoft's direct `NO AUTHENTICATE
/// failed.` to a token revoked early). Methods take `&self` so the first
/// request can run while the dialogue goes on.
pub trait Tokens: Send + Sync {
    /// Why no token could be had.
    type Error: std::error::Error + Send + Sync + 'static;

    /// A token to log in with (a cached one is fine).
    fn token(&self) -> impl Future<Output = Result<SecretString, Self::Error>> + Send;

    /// A token newer than the one last handed out, which the server
    /// refused (that one is not handed out again).
    fn fresh_token(&self) -> impl Future<Output = Result<SecretString, Self::Error>> + Send;

    /// Whether the token last handed out had been handed out before (a
    /// cached one), rather than just issued.
    fn last_was_cached(&self) -> bool;
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
    /// The server took the connection and said nothing.
    #[error("{server} accepted the connection but did not greet within {} s", .after.as_secs())]
    Silent {
        /// host:port.
        server: String,
        /// The wait.
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
/// tokens from `tokens`. The first token is asked for at once, so a
/// refresh runs while the connection is made and the server greets: a
/// cold login costs the longer of the two, not their sum. A refused token
/// gets one retry with a fresh token on the same connection (see
/// [`Tokens`]).
///
/// Names are resolved and addresses tried by the process's shared
/// [`Dialer`] (a short cache, happy eyeballs).
pub async fn login<T: Tokens>(
    target: &Target<'_>,
    tls: Arc<ClientConfig>,
    connect_timeout: Duration,
    session: Box<dyn UpstreamLogin>,
    tokens: &T,
) -> Result<UpstreamConn, UpstreamFailure<T::Error>> {
    login_via(
        Dialer::shared(),
        target,
        tls,
        connect_timeout,
        session,
        tokens,
    )
    .await
}

/// [`login`], resolving and connecting through `dialer`.
pub async fn login_via<T: Tokens>(
    dialer: &Dialer,
    target: &Target<'_>,
    tls: Arc<ClientConfig>,
    connect_timeout: Duration,
    session: Box<dyn UpstreamLogin>,
    tokens: &T,
) -> Result<UpstreamConn, UpstreamFailure<T::Error>> {
    let mut first = Prefetch::new(tokens.token());
    if let Some(t) = crate::trace::current() {
        t.upstream_connecting(format!(
            "connecting to {}{}",
            target.server(),
            match target.tls {
                UpstreamTls::Implicit => " (TLS)",
                UpstreamTls::Starttls => " (STARTTLS)",
            }
        ));
    }
    let result = async {
        let connecting = tokio::time::timeout(connect_timeout, connect(dialer, target, &tls));
        let stream =
            first
                .alongside(connecting)
                .await?
                .map_err(|_| UpstreamFailure::Timeout {
                    server: target.server(),
                    after: connect_timeout,
                })??;
        let upgrade = RustlsUpgrade {
            config: tls,
            host: target.host,
            timeout: connect_timeout,
        };
        run_dialogue(
            stream,
            target,
            session,
            tokens,
            &mut first,
            &upgrade,
            connect_timeout,
        )
        .await
    }
    .await;
    if result.is_err() {
        first.settle().await;
    }
    result
}

/// The first token of a login, asked for before it is needed: polled
/// alongside the connection's I/O until it is there.
struct Prefetch<F: Future> {
    state: PrefetchState<F>,
}

enum PrefetchState<F: Future> {
    Running(Pin<Box<F>>),
    Ready(F::Output),
    Taken,
}

impl<T, E, F> Prefetch<F>
where
    F: Future<Output = Result<T, E>>,
{
    fn new(fut: F) -> Self {
        Prefetch {
            state: PrefetchState::Running(Box::pin(fut)),
        }
    }

    /// Drives `io` to its end, moving the token request on meanwhile. A
    /// token request that fails ends the login at once: there is nothing
    /// to log in with.
    async fn alongside<R>(&mut self, io: impl Future<Output = R>) -> Result<R, UpstreamFailure<E>>
    where
        E: std::error::Error + 'static,
    {
        let mut io = std::pin::pin!(io);
        std::future::poll_fn(|cx| {
            if let PrefetchState::Running(fut) = &mut self.state
                && let Poll::Ready(got) = fut.as_mut().poll(cx)
            {
                self.state = PrefetchState::Ready(got);
            }
            if matches!(self.state, PrefetchState::Ready(Err(_)))
                && let PrefetchState::Ready(Err(e)) =
                    std::mem::replace(&mut self.state, PrefetchState::Taken)
            {
                return Poll::Ready(Err(UpstreamFailure::Token(e)));
            }
            io.as_mut().poll(cx).map(Ok)
        })
        .await
    }

    /// Lets a token request already under way finish when the login
    /// fails for another reason (the server cannot be reached, say): its
    /// refresh may have rotated the refresh token at the provider, and a
    /// request dropped midway could lose the new one. The token is cached
    /// for the next login.
    async fn settle(&mut self) {
        if let PrefetchState::Running(fut) = &mut self.state {
            let got = fut.as_mut().await;
            self.state = PrefetchState::Ready(got);
        }
    }

    /// Whether the token request has its outcome (or it was taken).
    fn is_ready(&self) -> bool {
        !matches!(self.state, PrefetchState::Running(_))
    }

    /// The token, waiting for it if need be; None once taken.
    async fn take(&mut self) -> Option<Result<T, E>> {
        if let PrefetchState::Running(fut) = &mut self.state {
            let got = fut.as_mut().await;
            self.state = PrefetchState::Ready(got);
        }
        match std::mem::replace(&mut self.state, PrefetchState::Taken) {
            PrefetchState::Ready(got) => Some(got),
            _ => None,
        }
    }
}

/// Writes and flushes what the login dialogue queued, if anything, and
/// wipes it.
async fn send_queued<S: AsyncWrite + Unpin>(
    stream: &mut S,
    queued: &mut Vec<u8>,
) -> io::Result<()> {
    if queued.is_empty() {
        return Ok(());
    }
    stream.write_all(queued).await?;
    zeroize::Zeroize::zeroize(queued);
    stream.flush().await
}

/// TCP to the first address of `target.host` that answers (see
/// [`Dialer::connect`]), then the TLS handshake if TLS is implicit.
async fn connect<E: std::error::Error + 'static>(
    dialer: &Dialer,
    target: &Target<'_>,
    tls: &Arc<ClientConfig>,
) -> Result<Stream, UpstreamFailure<E>> {
    let tcp = dialer
        .connect(target.host, target.port)
        .await
        .map_err(|e| match e {
            DialError::Resolve(source) => UpstreamFailure::Resolve {
                host: target.host.to_string(),
                source,
            },
            DialError::Connect(source) => UpstreamFailure::Connect {
                server: target.server(),
                source,
            },
        })?;
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
/// its requests for tokens from `tokens` (asking for the first one at
/// once; a fresh one once after a refusal, see [`Tokens`]). A server that
/// sends nothing within `greeting_timeout` is given up on
/// ([`UpstreamFailure::Silent`]); the login timeout bounds the rest.
pub async fn dialogue<S, U, T>(
    stream: S,
    target: &Target<'_>,
    session: Box<dyn UpstreamLogin>,
    tokens: &T,
    upgrade: &U,
    greeting_timeout: Duration,
) -> Result<UpstreamConn<S>, UpstreamFailure<T::Error>>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
    U: StartTls<S>,
    T: Tokens,
{
    let mut first = Prefetch::new(tokens.token());
    let result = run_dialogue(
        stream,
        target,
        session,
        tokens,
        &mut first,
        upgrade,
        greeting_timeout,
    )
    .await;
    if result.is_err() {
        first.settle().await;
    }
    result
}

async fn run_dialogue<S, U, T, F>(
    mut stream: S,
    target: &Target<'_>,
    mut session: Box<dyn UpstreamLogin>,
    tokens: &T,
    first: &mut Prefetch<F>,
    upgrade: &U,
    greeting_timeout: Duration,
) -> Result<UpstreamConn<S>, UpstreamFailure<T::Error>>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
    U: StartTls<S>,
    T: Tokens,
    F: Future<Output = Result<SecretString, T::Error>>,
{
    let closed = |source: Option<io::Error>| UpstreamFailure::Closed {
        server: target.server(),
        source,
    };
    // The session's protocol trace, when someone watches it: the bytes
    // both ways (the protocol crate renders and redacts them).
    let trace = crate::trace::current();
    let mut buf = vec![0u8; 8 * 1024];
    // What the dialogue asked to send and is not written yet: consecutive
    // `Send`s (IMAP's `ID` and `AUTHENTICATE`) go out in one write, one
    // TLS record and one packet. It may hold the token: wiped when written.
    let mut queued = zeroize::Zeroizing::new(Vec::new());
    let mut retried = false;
    // Until the server has said something, its silence is bounded like
    // the connect (the same for every protocol, implicit TLS or not).
    let greeting_by = tokio::time::Instant::now() + greeting_timeout;
    let mut heard = false;
    loop {
        let step = session
            .next_step()
            .map_err(|source| UpstreamFailure::Protocol {
                server: target.server(),
                source,
            })?;
        match step {
            UpstreamStep::NeedInput => {
                first
                    .alongside(send_queued(&mut stream, &mut queued))
                    .await?
                    .map_err(|e| closed(Some(e)))?;
                let read = stream.read(&mut buf);
                let n = if heard {
                    first.alongside(read).await?
                } else {
                    first
                        .alongside(tokio::time::timeout_at(greeting_by, read))
                        .await?
                        .map_err(|_| UpstreamFailure::Silent {
                            server: target.server(),
                            after: greeting_timeout,
                        })?
                }
                .map_err(|e| closed(Some(e)))?;
                if n == 0 {
                    return Err(closed(None));
                }
                heard = true;
                if let Some(t) = &trace {
                    t.from_server(&buf[..n]);
                }
                session.feed(&buf[..n]);
            }
            UpstreamStep::Send(bytes) => {
                if let Some(t) = &trace {
                    t.to_server(&bytes);
                }
                queued.extend_from_slice(&bytes);
            }
            UpstreamStep::StartTls => {
                first
                    .alongside(send_queued(&mut stream, &mut queued))
                    .await?
                    .map_err(|e| closed(Some(e)))?;
                stream = first
                    .alongside(upgrade.start_tls(stream))
                    .await?
                    .map_err(|source| UpstreamFailure::Tls {
                        server: target.server(),
                        source,
                    })?;
                if let Some(t) = &trace {
                    t.upstream_tls();
                }
                session.tls_started();
            }
            UpstreamStep::NeedToken => {
                if !first.is_ready() {
                    // The server works on what is queued (`ID`) while the
                    // token comes.
                    first
                        .alongside(send_queued(&mut stream, &mut queued))
                        .await?
                        .map_err(|e| closed(Some(e)))?;
                }
                let token = match first.take().await {
                    Some(got) => got,
                    None => tokens.fresh_token().await,
                }
                .map_err(UpstreamFailure::Token)?;
                if let Some(t) = &trace {
                    t.note("access token ready (not shown)");
                }
                session.provide_token(&BearerToken {
                    user: target.user.to_string(),
                    token,
                    host: target.host.to_string(),
                    port: target.port,
                });
            }
            UpstreamStep::Authenticated(success) => {
                send_queued(&mut stream, &mut queued)
                    .await
                    .map_err(|e| closed(Some(e)))?;
                return Ok(UpstreamConn {
                    stream,
                    success,
                    farewell: session.farewell(),
                    held: None,
                });
            }
            UpstreamStep::Rejected(rejection) => {
                if !retried {
                    let why = if rejection.retry_suggested {
                        Some("with a retry status")
                    } else if rejection.may_be_stale_token() && tokens.last_was_cached() {
                        Some("without a challenge, and it was a cached token")
                    } else {
                        None
                    };
                    if let Some(why) = why {
                        tracing::info!(server = %target.server(), refusal = %rejection.refusal, "token refused {why}; refreshing and trying once more");
                        retried = true;
                        // The first token is spent: the next `NeedToken`
                        // asks for a fresh one.
                        session.retry();
                        continue;
                    }
                }
                return Err(UpstreamFailure::Rejected {
                    server: target.server(),
                    rejection,
                });
            }
        }
    }
}

/// Sends one message on a logged-in SMTP connection, driving
/// `submission`; each wait for the server is bounded by `patience` (RFC
/// 5321 section 4.5.3.2 asks for minutes; the final dot's reply can take
/// long). The caller records the outcome, then says [`quit`]: the time
/// between the server's `250` and the spool's record is what a crash can
/// turn into a second delivery. A connection that fails before the outcome leaves
/// the message where it was: whether the server took it is unknown only
/// if it failed after the final dot (see `crate::spool`).
pub async fn submit<S>(
    stream: &mut S,
    leftover: &[u8],
    mut submission: mailbridge_proto::smtp::Submission,
    patience: Duration,
) -> Result<mailbridge_proto::smtp::SubmitOutcome, SubmitError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    use mailbridge_proto::smtp::SubmitStep;
    if !leftover.is_empty() {
        submission.feed(leftover);
    }
    let mut buf = vec![0u8; 8 * 1024];
    loop {
        match submission.next_step().map_err(SubmitError::Protocol)? {
            SubmitStep::Send(bytes) => {
                tokio::time::timeout(patience, async {
                    stream.write_all(&bytes).await?;
                    stream.flush().await
                })
                .await
                .map_err(|_| SubmitError::Timeout(patience))?
                .map_err(SubmitError::Io)?;
            }
            SubmitStep::NeedInput => {
                let n = tokio::time::timeout(patience, stream.read(&mut buf))
                    .await
                    .map_err(|_| SubmitError::Timeout(patience))?
                    .map_err(SubmitError::Io)?;
                if n == 0 {
                    return Err(SubmitError::Io(io::ErrorKind::UnexpectedEof.into()));
                }
                submission.feed(&buf[..n]);
            }
            SubmitStep::Done(outcome) => return Ok(outcome),
        }
    }
}

/// Ends an SMTP session politely (`QUIT`, its reply, close), within 5 s.
pub async fn quit<S>(stream: &mut S)
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        stream.write_all(b"QUIT\r\n").await?;
        stream.flush().await?;
        let mut buf = [0u8; 512];
        let _ = stream.read(&mut buf).await;
        stream.shutdown().await
    })
    .await;
}

/// Why [`submit`] did not reach an outcome.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// The connection failed.
    #[error("the connection failed while sending: {0}")]
    Io(#[source] io::Error),
    /// The server said nothing for too long.
    #[error("the server did not answer within {} s while sending", .0.as_secs())]
    Timeout(Duration),
    /// The server's reply made no sense.
    #[error("the server's reply was not understood: {0}")]
    Protocol(#[source] UpstreamError),
}

#[cfg(test)]
mod tests {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use mailbridge_proto::imap::{ImapUpstreamLogin, UpstreamOptions};
    use std::task::Context;

    use tokio::io::{AsyncBufReadExt, BufReader, DuplexStream, ReadBuf, ReadHalf, WriteHalf};

    use super::*;

    /// The dialogue with a greeting timeout no test reaches by accident.
    async fn dialogue<S, U, T>(
        stream: S,
        target: &Target<'_>,
        session: Box<dyn UpstreamLogin>,
        tokens: &T,
        upgrade: &U,
    ) -> Result<UpstreamConn<S>, UpstreamFailure<T::Error>>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
        U: StartTls<S>,
        T: Tokens,
    {
        super::dialogue(
            stream,
            target,
            session,
            tokens,
            upgrade,
            Duration::from_secs(30),
        )
        .await
    }

    #[tokio::test(start_paused = true)]
    async fn a_server_that_never_greets_costs_the_greeting_timeout() {
        let (client, _server) = tokio::io::duplex(1024);
        let tokens = FakeTokens::default();
        let started = tokio::time::Instant::now();
        let e = super::dialogue(
            client,
            &TARGET,
            imap(false),
            &tokens,
            &FakeUpgrade::default(),
            Duration::from_secs(15),
        )
        .await
        .err()
        .expect("no greeting, no login");
        assert!(matches!(e, UpstreamFailure::Silent { .. }), "{e}");
        assert_eq!(started.elapsed(), Duration::from_secs(15));
        assert_eq!(
            e.to_string(),
            "imap.example:993 accepted the connection but did not greet within 15 s"
        );
    }

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
        issued: std::sync::atomic::AtomicU32,
        fresh_asked: std::sync::atomic::AtomicU32,
        fail: bool,
        /// What `last_was_cached` says.
        cached: bool,
        /// How long a token takes.
        delay: Duration,
    }

    impl FakeTokens {
        /// (tokens issued, fresh tokens asked for).
        fn counts(&self) -> (u32, u32) {
            use std::sync::atomic::Ordering::Relaxed;
            (self.issued.load(Relaxed), self.fresh_asked.load(Relaxed))
        }
    }

    impl Tokens for FakeTokens {
        type Error = NoToken;

        async fn token(&self) -> Result<SecretString, NoToken> {
            // No delay: ready at once, as a cached token is.
            if !self.delay.is_zero() {
                tokio::time::sleep(self.delay).await;
            }
            if self.fail {
                return Err(NoToken);
            }
            let n = self
                .issued
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                + 1;
            Ok(SecretString::from(format!("tok-{n}")))
        }

        async fn fresh_token(&self) -> Result<SecretString, NoToken> {
            self.fresh_asked
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.token().await
        }

        fn last_was_cached(&self) -> bool {
            self.cached
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
        let tokens = FakeTokens::default();
        let upgrade = FakeUpgrade::default();
        let mut conn = dialogue(client, &TARGET, imap(false), &tokens, &upgrade)
            .await
            .unwrap();
        assert_eq!(conn.success.capabilities, ["IMAP4rev1", "IDLE"]);
        assert_eq!(conn.success.leftover, b"* 1 EXISTS\r\n");
        conn.stream.write_all(b"a1 NOOP\r\n").await.unwrap();
        let (token, relayed) = script.await.unwrap();
        assert_eq!(token, "tok-1");
        assert_eq!(relayed, "a1 NOOP");
        assert_eq!(tokens.counts(), (1, 0));
        assert_eq!(upgrade.calls.load(std::sync::atomic::Ordering::Relaxed), 0);
    }

    /// A stream that counts the writes made into it.
    struct Counted {
        inner: DuplexStream,
        writes: Arc<std::sync::atomic::AtomicU32>,
    }

    impl AsyncRead for Counted {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Counted {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let r = Pin::new(&mut self.inner).poll_write(cx, buf);
            if matches!(r, Poll::Ready(Ok(_))) {
                self.writes
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            r
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_flush(cx)
        }

        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_shutdown(cx)
        }
    }

    /// No STARTTLS in these logins.
    struct NoUpgrade;

    impl StartTls<Counted> for NoUpgrade {
        async fn start_tls(&self, _: Counted) -> io::Result<Counted> {
            Err(io::Error::other("no STARTTLS here"))
        }
    }

    /// The writes of an IMAP login whose server offers ID, and what the
    /// server read before the token was issued.
    async fn login_with_id(tokens: FakeTokens) -> (u32, Vec<String>) {
        let (client, mut server) = pair();
        let writes = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let client = Counted {
            inner: client,
            writes: writes.clone(),
        };
        let tokens = Arc::new(tokens);
        let asked = tokens.clone();
        let script = tokio::spawn(async move {
            server
                .send("* OK [CAPABILITY IMAP4rev1 ID SASL-IR AUTH=XOAUTH2] ready\r\n")
                .await;
            let id = server.line().await;
            assert!(id.starts_with("mb1 ID ("), "{id}");
            let before_token = asked.counts().0;
            let auth = server.line().await;
            assert!(auth.starts_with("mb2 AUTHENTICATE XOAUTH2 "), "{auth}");
            server
                .send("* ID NIL\r\nmb1 OK\r\nmb2 OK [CAPABILITY IMAP4rev1] done\r\n")
                .await;
            (before_token, id)
        });
        let session = Box::new(ImapUpstreamLogin::new(UpstreamOptions {
            software: Some(("mailbridge".into(), "1".into())),
            ..Default::default()
        }));
        let conn = dialogue(client, &TARGET, session, &*tokens, &NoUpgrade)
            .await
            .unwrap();
        let (before_token, id) = script.await.unwrap();
        let seen = if before_token == 0 { vec![id] } else { vec![] };
        drop(conn);
        (writes.load(std::sync::atomic::Ordering::Relaxed), seen)
    }

    #[tokio::test]
    async fn id_and_authenticate_go_out_in_one_write_with_a_cached_token() {
        let (writes, _) = login_with_id(FakeTokens::default()).await;
        assert_eq!(writes, 1, "ID and AUTHENTICATE in one write");
    }

    #[tokio::test(start_paused = true)]
    async fn id_goes_out_while_the_token_is_fetched() {
        let (writes, before_token) = login_with_id(FakeTokens {
            delay: Duration::from_secs(1),
            ..FakeTokens::default()
        })
        .await;
        assert_eq!(writes, 2);
        assert_eq!(before_token.len(), 1, "the server had ID before the token");
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
        let tokens = FakeTokens::default();
        let conn = dialogue(
            client,
            &TARGET,
            imap(false),
            &tokens,
            &FakeUpgrade::default(),
        )
        .await
        .unwrap();
        assert_eq!(conn.success.capabilities, ["IMAP4rev1"]);
        assert_eq!(script.await.unwrap(), ("tok-1".into(), "tok-2".into()));
        assert_eq!(tokens.counts().1, 1);
    }

    /// A server that refuses the first AUTHENTICATE as Microsoft does
    /// (`reply`, no challenge) and accepts a second one if it comes.
    fn refusing_without_challenge(
        mut server: Server,
        reply: &'static str,
    ) -> tokio::task::JoinHandle<Vec<String>> {
        tokio::spawn(async move {
            server
                .send("* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=XOAUTH2] ready\r\n")
                .await;
            let mut tokens = Vec::new();
            let first = server.line().await;
            tokens.push(xoauth2_token(&first));
            server.send(&format!("mb1 {reply}\r\n")).await;
            let second = server.line().await;
            if second.starts_with("mb2 AUTHENTICATE XOAUTH2 ") {
                tokens.push(xoauth2_token(&second));
                server.send("mb2 OK [CAPABILITY IMAP4rev1] done\r\n").await;
            }
            tokens
        })
    }

    #[tokio::test]
    async fn a_cached_token_refused_without_a_challenge_is_replaced_once() {
        let (client, server) = pair();
        let script = refusing_without_challenge(server, "NO AUTHENTICATE failed.");
        let tokens = FakeTokens {
            cached: true,
            ..Default::default()
        };
        let conn = dialogue(
            client,
            &TARGET,
            imap(false),
            &tokens,
            &FakeUpgrade::default(),
        )
        .await
        .unwrap();
        assert_eq!(conn.success.capabilities, ["IMAP4rev1"]);
        assert_eq!(script.await.unwrap(), ["tok-1", "tok-2"]);
        assert_eq!(tokens.counts(), (2, 1));
    }

    #[tokio::test]
    async fn a_new_token_or_a_temporary_refusal_is_not_retried() {
        for (cached, reply) in [
            // Just issued and refused: a newer one would fare no better.
            (false, "NO AUTHENTICATE failed."),
            // The server could not check it: not the token's fault.
            (true, "NO [UNAVAILABLE] Temporary authentication failure."),
            // Not understood: not the token's fault either.
            (true, "BAD Invalid command"),
        ] {
            let (client, server) = pair();
            let script = refusing_without_challenge(server, reply);
            let tokens = FakeTokens {
                cached,
                ..Default::default()
            };
            let e = dialogue(
                client,
                &TARGET,
                imap(false),
                &tokens,
                &FakeUpgrade::default(),
            )
            .await
            .err()
            .unwrap();
            assert!(matches!(e, UpstreamFailure::Rejected { .. }), "{e:?}");
            assert_eq!(tokens.counts(), (1, 0), "{reply}");
            assert_eq!(script.await.unwrap(), ["tok-1"]);
        }
    }

    /// A token source that answers only when told to, and says when it
    /// was asked.
    struct GatedTokens {
        asked: tokio::sync::Notify,
        answer: tokio::sync::Semaphore,
    }

    impl Tokens for GatedTokens {
        type Error = NoToken;

        async fn token(&self) -> Result<SecretString, NoToken> {
            self.asked.notify_one();
            let _permit = self.answer.acquire().await.map_err(|_| NoToken)?;
            Ok(SecretString::from("tok-gated".to_string()))
        }

        async fn fresh_token(&self) -> Result<SecretString, NoToken> {
            Err(NoToken)
        }

        fn last_was_cached(&self) -> bool {
            false
        }
    }

    #[tokio::test]
    async fn the_token_is_asked_for_before_the_server_greets() {
        let (client, mut server) = pair();
        let tokens = std::sync::Arc::new(GatedTokens {
            asked: tokio::sync::Notify::new(),
            answer: tokio::sync::Semaphore::new(0),
        });
        let gate = tokens.clone();
        let script = tokio::spawn(async move {
            // The greeting waits until the token was asked for, and the
            // token until the server has greeted: a login that asked only
            // after the greeting would never finish.
            tokio::time::timeout(Duration::from_secs(10), gate.asked.notified())
                .await
                .expect("the token is asked for before the greeting");
            server
                .send("* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=XOAUTH2] ready\r\n")
                .await;
            gate.answer.add_permits(1);
            let auth = server.line().await;
            server.send("mb1 OK [CAPABILITY IMAP4rev1] done\r\n").await;
            xoauth2_token(&auth)
        });
        let conn = tokio::time::timeout(
            Duration::from_secs(10),
            dialogue(
                client,
                &TARGET,
                imap(false),
                tokens.as_ref(),
                &FakeUpgrade::default(),
            ),
        )
        .await
        .expect("the login finishes")
        .unwrap();
        assert_eq!(conn.success.capabilities, ["IMAP4rev1"]);
        assert_eq!(script.await.unwrap(), "tok-gated");
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
        let tokens = FakeTokens::default();
        let e = dialogue(
            client,
            &TARGET,
            imap(false),
            &tokens,
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
        assert_eq!(tokens.counts(), (2, 1));
        drop(script.await.unwrap());
    }

    #[tokio::test]
    async fn a_login_that_fails_lets_its_token_request_finish() {
        let (client, server) = pair();
        // The server is gone before the token has come.
        drop(server);
        let tokens = FakeTokens {
            delay: Duration::from_millis(200),
            ..Default::default()
        };
        let e = dialogue(
            client,
            &TARGET,
            imap(false),
            &tokens,
            &FakeUpgrade::default(),
        )
        .await
        .err()
        .unwrap();
        assert!(matches!(e, UpstreamFailure::Closed { .. }), "{e:?}");
        // The refresh it started was not cut off midway.
        assert_eq!(tokens.counts(), (1, 0));
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
            &FakeTokens::default(),
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
            &FakeTokens::default(),
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
            &FakeTokens::default(),
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
            &FakeTokens::default(),
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
        let tokens = FakeTokens {
            fail: true,
            ..Default::default()
        };
        let e = dialogue(
            client,
            &TARGET,
            imap(false),
            &tokens,
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
            &FakeTokens::default(),
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
