//! The client connection driver: runs a protocol's sans-I/O pre-auth
//! session over a socket, hands login requests to the login path, and
//! switches to relaying once the upstream accepted the login.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use rustls::ServerConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::Instant;

use super::relay::relay;
use super::stream::Stream;
use super::upstream::UpstreamConn;
use crate::trace::SessionTrace;
use mailbridge_proto::farewell::{Reader, Tail};
use mailbridge_proto::{
    ClientSession, ClientStep, LoginFailure, LoginRequest, Message, SpoolOutcome,
};

/// What a successful login yields.
pub enum Authenticated {
    /// Logged in upstream: relay from now on.
    Upstream(UpstreamConn),
    /// The password was checked here and the session stays to take
    /// messages for the spool (a spooling SMTP listener), sending as one
    /// of `senders`, stored by `spooler`.
    Spool {
        /// The envelope senders the account may use.
        senders: Vec<String>,
        /// Where its messages go.
        spooler: Arc<Spooler>,
    },
}

/// Stores a message a device handed over whole (see `crate::spool`).
pub type Spooler =
    dyn Fn(Message) -> std::pin::Pin<Box<dyn Future<Output = SpoolOutcome> + Send>> + Send + Sync;

/// Per-connection settings the driver needs.
pub struct DriverSettings {
    /// For STARTTLS, when the listener offers it.
    pub tls: Option<Arc<ServerConfig>>,
    /// Pre-auth silence allowed.
    pub preauth_timeout: Duration,
    /// Longest a connection may stay without logging in, from accept,
    /// whatever the client sends (a login in progress is bounded by
    /// `login_timeout` instead).
    pub preauth_deadline: Duration,
    /// Relay silence allowed.
    pub relay_idle_timeout: Duration,
    /// Longest a login (token refresh and upstream dialogue) may take.
    pub login_timeout: Duration,
    /// Where relayed bytes are counted, and as which protocol.
    pub relayed: Option<(Arc<crate::metrics::Metrics>, &'static str)>,
}

/// Resolves once `stop` turns true (or its sender is gone: nobody can
/// stop us any more, so never).
pub async fn stopped(mut stop: watch::Receiver<bool>) {
    if stop.wait_for(|s| *s).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Serves one client connection to its end. `login` performs a login
/// request and yields a logged-in upstream connection or a failure. When
/// `stop` turns true (shutdown), a connection waiting for a pre-auth
/// command is told so and closed, and a relayed session is drained (see
/// [`relay`]). `trace`, when the session is traced, gets the bytes of
/// the pre-auth phase both ways (see [`crate::trace`]).
#[allow(clippy::too_many_arguments)]
pub async fn drive<L, F>(
    mut stream: Stream,
    session: Box<dyn ClientSession>,
    settings: &DriverSettings,
    deadline: Instant,
    login: L,
    spool: Option<Arc<Spooler>>,
    stop: watch::Receiver<bool>,
    trace: Option<Arc<SessionTrace>>,
) where
    L: Fn(LoginRequest) -> F,
    F: Future<Output = Result<Authenticated, LoginFailure>>,
{
    // The pre-auth session and read buffer live in `preauth` and are gone
    // once it returns: a relaying session keeps only its two streams.
    let Some((mut client, mut upstream, farewell, _held)) = preauth(
        &mut stream,
        session,
        settings,
        deadline,
        login,
        spool,
        stop.clone(),
        trace,
    )
    .await
    else {
        return;
    };
    // `stream` was moved into `client` by preauth's success path.
    let started = std::time::Instant::now();
    let idle = settings.relay_idle_timeout;
    let (stats, error) = match relay(&mut client, &mut upstream, idle, stopped(stop)).await {
        Ok(stats) => (stats, None),
        Err(e) => (e.stats, Some(e.source)),
    };
    // The server's own reason, when it ended the session and said why
    // (the protocol crate reads it; the relay only kept bytes).
    let server_said = stats
        .upstream_ended
        .then(|| {
            farewell(Tail {
                bytes: &stats.upstream_tail,
                from_line_start: stats.to_client == stats.upstream_tail.len() as u64,
            })
        })
        .flatten();
    let secs = started.elapsed().as_secs();
    if let Some((metrics, protocol)) = &settings.relayed {
        metrics.relayed(protocol, stats.to_upstream, stats.to_client);
    }
    match (server_said, error) {
        (Some(said), None) => tracing::info!(
            to_upstream = stats.to_upstream,
            to_client = stats.to_client,
            secs,
            server_said = %said,
            "session ended by the server"
        ),
        (Some(said), Some(e)) => tracing::info!(
            to_upstream = stats.to_upstream,
            to_client = stats.to_client,
            secs,
            server_said = %said,
            error = %e,
            "session ended by the server"
        ),
        (None, Some(e)) => tracing::info!(error = %e, "session ended with an error"),
        (None, None) => tracing::info!(
            to_upstream = stats.to_upstream,
            to_client = stats.to_client,
            idle_timeout = stats.idle_timeout,
            shutdown = stats.drained,
            upstream_closed = stats.upstream_ended,
            secs,
            "session ended"
        ),
    }
    // A relay that passed both closes on has shut both down already
    // (again would be two failing system calls per session).
    if !stats.both_shut {
        let _ = client.shutdown().await;
        let _ = upstream.shutdown().await;
    }
}

async fn send(stream: &mut Stream, bytes: &[u8]) -> std::io::Result<()> {
    stream.write_all(bytes).await?;
    stream.flush().await
}

/// How long a session that stores messages in the spool (a device, or a
/// client logged in on a spooling listener) has for its next message:
/// large scans over slow links take minutes.
pub const SPOOLING_SESSION: Duration = Duration::from_secs(600);

/// How long a last word before closing may take to go out: a client that
/// does not read must not hold the connection open.
pub const SEND_BEFORE_CLOSE: Duration = Duration::from_secs(5);

/// [`send`] in the pre-auth phase: by the deadline (or a few seconds from
/// now, for the answer to a login that ran past it).
async fn send_by(stream: &mut Stream, bytes: &[u8], deadline: Instant) -> std::io::Result<()> {
    let until = deadline.max(Instant::now()) + SEND_BEFORE_CLOSE;
    match tokio::time::timeout_at(until, send(stream, bytes)).await {
        Ok(r) => r,
        Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
    }
}

/// [`send`] within `limit`.
pub async fn send_within(
    stream: &mut Stream,
    bytes: &[u8],
    limit: Duration,
) -> std::io::Result<()> {
    match tokio::time::timeout(limit, send(stream, bytes)).await {
        Ok(r) => r,
        Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
    }
}

/// The pre-auth phase. Returns the client and upstream streams on a
/// successful login, with how to read the server's reason should it end
/// the session; `None` when the connection ended.
#[allow(clippy::too_many_arguments)]
async fn preauth<L, F>(
    stream: &mut Stream,
    mut session: Box<dyn ClientSession>,
    settings: &DriverSettings,
    mut deadline: Instant,
    login: L,
    mut spool: Option<Arc<Spooler>>,
    stop: watch::Receiver<bool>,
    trace: Option<Arc<SessionTrace>>,
) -> Option<(Stream, Stream, Reader, Option<Box<dyn Send + Sync>>)>
where
    L: Fn(LoginRequest) -> F,
    F: Future<Output = Result<Authenticated, LoginFailure>>,
{
    // What the client is sent, for the trace (the rendering is the
    // protocol crate's).
    let shown = |bytes: &[u8]| {
        if let Some(t) = &trace {
            t.to_client(bytes);
        }
    };
    let greeting = session.greeting();
    shown(&greeting);
    send_by(stream, &greeting, deadline).await.ok()?;
    // On the heap, not in the task: the task outlives the pre-auth phase.
    let mut buf = vec![0u8; 4096];
    let stopping = stopped(stop);
    tokio::pin!(stopping);
    loop {
        match session.next_step() {
            ClientStep::NeedInput => {
                // Silence is allowed `preauth_timeout` at a time, and the
                // whole pre-auth phase ends at `deadline`.
                let idle_until = Instant::now() + settings.preauth_timeout;
                let read = tokio::time::timeout_at(idle_until.min(deadline), stream.read(&mut buf));
                let read = tokio::select! {
                    r = read => r,
                    () = &mut stopping => {
                        shown(&session.shutdown_message());
                        let _ = send_within(stream, &session.shutdown_message(), SEND_BEFORE_CLOSE).await;
                        let _ = stream.shutdown().await;
                        tracing::debug!("pre-auth connection closed for shutdown");
                        return None;
                    }
                };
                let n = match read {
                    Err(_) if Instant::now() >= deadline => {
                        let bye = session.goodbye(&format!(
                            "No login within {} s; connect again and log in",
                            settings.preauth_deadline.as_secs()
                        ));
                        let _ = send_within(stream, &bye, SEND_BEFORE_CLOSE).await;
                        let _ = stream.shutdown().await;
                        tracing::info!("pre-auth deadline passed: connection closed");
                        return None;
                    }
                    Err(_) => {
                        let _ = send_within(stream, &session.timeout_message(), SEND_BEFORE_CLOSE)
                            .await;
                        let _ = stream.shutdown().await;
                        tracing::debug!("pre-auth idle timeout");
                        return None;
                    }
                    Ok(Ok(0)) | Ok(Err(_)) => return None,
                    Ok(Ok(n)) => n,
                };
                if let Some(t) = &trace {
                    t.from_client(&buf[..n]);
                }
                session.feed(&buf[..n]);
            }
            ClientStep::Send(bytes) => {
                shown(&bytes);
                send_by(stream, &bytes, deadline).await.ok()?
            }
            ClientStep::StartTls(bytes) => {
                shown(&bytes);
                send_by(stream, &bytes, deadline).await.ok()?;
                let config = settings.tls.clone()?;
                let plain = std::mem::replace(stream, Stream::Gone);
                let until = (Instant::now() + settings.preauth_timeout).min(deadline);
                match tokio::time::timeout_at(until, plain.accept_tls(config)).await {
                    Ok(Ok(tls)) => *stream = tls,
                    Ok(Err(e)) => {
                        tracing::info!(error = %e, "client TLS handshake failed");
                        return None;
                    }
                    Err(_) => return None,
                }
                if let Some(t) = &trace {
                    t.client_tls();
                }
                session.tls_started();
            }
            ClientStep::Login(request) => {
                let user = request.credentials.user.clone();
                let outcome =
                    match tokio::time::timeout(settings.login_timeout, login(request)).await {
                        Ok(r) => r,
                        Err(_) => Err(LoginFailure {
                            kind: mailbridge_proto::FailureKind::Unavailable,
                            reason: format!(
                                "login did not complete within {} s; try again",
                                settings.login_timeout.as_secs()
                            ),
                            upstream_reply: None,
                        }),
                    };
                let outcome = match outcome {
                    Ok(Authenticated::Spool { senders, spooler }) => {
                        tracing::info!(user = %user, "logged in; messages go to the spool");
                        spool = Some(spooler);
                        let reply = session.login_local(senders);
                        shown(&reply);
                        if let Some(t) = &trace {
                            t.end("logged in: this session hands its messages to the spool from here on (not traced)");
                        }
                        send_by(stream, &reply, deadline).await.ok()?;
                        deadline = deadline.max(Instant::now() + SPOOLING_SESSION);
                        continue;
                    }
                    Ok(Authenticated::Upstream(conn)) => Ok(conn),
                    Err(f) => Err(f),
                };
                match outcome {
                    Ok(UpstreamConn {
                        stream: mut upstream,
                        success,
                        farewell,
                        held,
                    }) => {
                        let reply = session.login_succeeded(&success);
                        shown(&reply);
                        if let Some(t) = &trace {
                            t.end("logged in: the byte relay starts; the trace of this session ends here");
                        }
                        send_by(stream, &reply, deadline).await.ok()?;
                        if !success.leftover.is_empty() {
                            send_by(stream, &success.leftover, deadline).await.ok()?;
                        }
                        let pending = session.take_pending();
                        if !pending.is_empty() {
                            send(&mut upstream, &pending).await.ok()?;
                        }
                        tracing::info!(user = %user, "logged in; relaying");
                        let client = std::mem::replace(stream, Stream::Gone);
                        return Some((client, upstream, farewell, held));
                    }
                    Err(failure) => {
                        tracing::info!(user = %user, kind = ?failure.kind, reason = %failure.reason, "login refused");
                        let reply = session.login_failed(&failure);
                        shown(&reply);
                        send_by(stream, &reply, deadline).await.ok()?;
                    }
                }
            }
            ClientStep::Spool(message) => {
                let outcome = match &spool {
                    Some(spool) => spool(message).await,
                    None => SpoolOutcome::Failed {
                        temporary: false,
                        reason: "this listener does not store messages".into(),
                    },
                };
                let reply = session.spooled(&outcome);
                shown(&reply);
                send_by(stream, &reply, deadline).await.ok()?;
                // A device sends one message after another: each stored
                // message gives the connection its time again.
                deadline = deadline.max(Instant::now() + SPOOLING_SESSION);
            }
            ClientStep::Close(bytes) => {
                shown(&bytes);
                let _ = send_within(stream, &bytes, SEND_BEFORE_CLOSE).await;
                let _ = stream.shutdown().await;
                return None;
            }
        }
    }
}
