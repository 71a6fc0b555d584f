//! Ties it together: binds the listeners, builds the login path and serves
//! until shutdown. `main` and the tests use the same entry points.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::ServerConfig;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::watch;

use crate::config::{ConfigError, KeyMode, Listener, ListenerTls, Protocol, Settings};
use crate::kdf::KdfGate;
use crate::login::Gateway;
use crate::net::listener::{
    Accepted, Admission, Admitted, PROXY_HEADER_TIMEOUT, ProxyProtocol, Refused, accept_loop,
};
use crate::net::session::{Authenticated, DriverSettings, SEND_BEFORE_CLOSE, drive, send_within};
use crate::net::stream::Stream;
use crate::net::systemd::{self, Inherited};
use crate::net::tls::{self, TlsError};
use crate::oauth::{HttpClientError, TokenSource};
use crate::provider::DiscoveryError;
use crate::store::meta_cache::MetaCache;
use crate::store::{KdfParams, SledStore, StoreError, TokenStore};
use crate::vault::{BackoffPolicy, Vault};
use mailbridge_proto::{self as proto, ClientSession};

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A listener could not bind.
    #[error("cannot listen on {addr} ({protocol}): {error}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The protocol, for the message.
        protocol: &'static str,
        /// Why. Not a `source`: the message holds it, and anyhow's `{:#}`
        /// would print it a second time.
        error: std::io::Error,
    },
    /// TLS material is unusable.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The token store cannot be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// An `oidc` / `open` provider's metadata could not be read.
    #[error(transparent)]
    Discovery(#[from] DiscoveryError),
    /// The HTTP client for token endpoints could not be built.
    #[error(transparent)]
    Http(#[from] HttpClientError),
    /// The service key is unusable.
    #[error("{0}")]
    Key(String),
    /// `[alerts]` is unusable (its CA or secret file, say).
    #[error(transparent)]
    Alerts(#[from] crate::alerts::AlertsError),
    /// The state directory is open to other users and cannot be repaired.
    #[error("the state directory is not private: {0}")]
    StateDir(#[from] crate::store::modes::ModeError),
    /// The control socket could not be created.
    #[error("cannot create the control socket {}: {source}; check that the state directory is writable", path.display())]
    Control {
        /// The socket's path.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// `[status] token_file` cannot be read.
    #[error("cannot read the status page's token_file {}: {source}", path.display())]
    StatusToken {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The spool directory cannot be used.
    #[error("cannot open the spool: {source}")]
    Spool {
        /// Why.
        #[source]
        source: Box<crate::spool::SpoolError>,
    },
}

struct ListenerRuntime {
    config: Listener,
    driver: DriverSettings,
    /// Our name in SMTP greetings.
    hostname: String,
    /// What a connection may ask before it logs in.
    allowance: proto::limits::Allowance,
    /// Where spooling devices' messages go.
    spool: Option<Arc<SpoolRuntime>>,
    /// Connections being turned away right now (each is told why, within
    /// a few seconds): beyond this many, further ones are just closed.
    turning_away: Arc<tokio::sync::Semaphore>,
    /// The PROXY protocol, when the listener takes it.
    proxy: Option<ProxyProtocol>,
    /// Protocol traces on demand (`mailbridge trace`).
    tracer: Arc<crate::trace::Tracer>,
}

/// Reads the configuration again (a reload): the file, with the command
/// line's overrides.
pub type Reloader = Box<dyn Fn() -> Result<Settings, ConfigError> + Send + Sync>;

/// Why a reload changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The file does not read or validate.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// An `oidc` / `open` provider's metadata could not be read.
    #[error(transparent)]
    Discovery(#[from] DiscoveryError),
    /// A provider's CA file is unusable.
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// A bound, not yet running server.
pub struct Server {
    gateway: Arc<Gateway>,
    /// The configuration it was bound with (what a reload compares to).
    settings: Arc<Settings>,
    /// How to read the configuration again on SIGHUP, if it can.
    reloader: Option<Reloader>,
    /// Reloads asked for through the control socket (`mailbridge reload`).
    reload_requests: Option<ReloadAsks>,
    listeners: Vec<(TcpListener, Arc<ListenerRuntime>)>,
    max_connections: usize,
    per_address: usize,
    /// Service key mode: how often to refresh every grant.
    background_refresh: Option<Duration>,
    /// How long sessions get to come to rest at shutdown.
    shutdown_grace: Duration,
    /// The bound on a token request, and so on waiting for refreshes in
    /// flight at shutdown.
    refresh_timeout: Duration,
    /// Messages from spooling devices, when there are any.
    spool: Option<Arc<SpoolRuntime>>,
    /// `[status]`: its socket and token.
    status: Option<(TcpListener, Option<secrecy::SecretString>)>,
    /// Protocol traces on demand (`mailbridge trace`).
    tracer: Arc<crate::trace::Tracer>,
    /// Account metadata in memory, written behind (see
    /// [`crate::store::meta_cache`]); the vault's store.
    meta: Arc<MetaCache>,
    /// How often `meta` is written to the store.
    meta_flush_every: Duration,
}

/// How often the accounts' metadata (last login, last error) is written
/// to the store: what a crash can lose of it.
pub const META_FLUSH_EVERY: Duration = Duration::from_secs(5);

/// The spool and what its writers and its delivery task share.
struct SpoolRuntime {
    spool: crate::spool::Spool,
    /// Rings when a message was stored.
    wake: Arc<tokio::sync::Notify>,
    policy: crate::spool::deliver::Policy,
}

/// The service key of `[server]`: the key file, else the systemd
/// credential `mailbridge-key`.
pub fn service_secret(settings: &Settings) -> Result<zeroize::Zeroizing<Vec<u8>>, ServerError> {
    let path = match (
        &settings.server.key_file,
        std::env::var_os("CREDENTIALS_DIRECTORY"),
    ) {
        (Some(p), _) => p.clone(),
        (None, Some(dir)) => std::path::PathBuf::from(dir).join("mailbridge-key"),
        (None, None) => {
            return Err(ServerError::Key(
                "key_mode = \"service\" needs key_file, or a systemd credential named mailbridge-key (LoadCredential=mailbridge-key:/path)".into(),
            ));
        }
    };
    // Refused before it is read: a key other users can read gives away
    // every grant (see store::modes for what passes).
    crate::store::modes::check_key_file(&path).map_err(ServerError::Key)?;
    let mut bytes = zeroize::Zeroizing::new(std::fs::read(&path).map_err(|e| {
        ServerError::Key(format!("cannot read the key file {}: {e}", path.display()))
    })?);
    // A trailing newline from `echo` or an editor is not key material.
    while bytes.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        bytes.pop();
    }
    if bytes.len() < 32 {
        return Err(ServerError::Key(format!(
            "the key file {} holds {} bytes; it needs at least 32 random bytes: `head -c 32 /dev/urandom > {}`",
            path.display(),
            bytes.len(),
            path.display()
        )));
    }
    Ok(bytes)
}

/// Connections the kernel may hold for a listener before mailbridge
/// accepts them (it caps this at `net.core.somaxconn`, 4096 by default).
/// A small queue loses connections in a burst: with SYN cookies the client
/// believes it is connected, the final ACK is dropped on a full queue, and
/// an IMAP or SMTP client then waits forever for a greeting.
pub const LISTEN_BACKLOG: u32 = 4096;

/// A listening socket on `addr` with [`LISTEN_BACKLOG`] (and
/// `SO_REUSEADDR`, as `TcpListener::bind` sets it).
pub fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    #[cfg(unix)]
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// The vault for a configuration's `[server]` settings.
pub fn vault_for(settings: &Settings, store: Arc<dyn TokenStore>) -> Result<Vault, ServerError> {
    let s = &settings.server;
    let kdf = KdfParams {
        m_cost_kib: s.kdf_memory_kib,
        t_cost: s.kdf_iterations,
        p_cost: 1,
    };
    let backoff = BackoffPolicy {
        base: Duration::from_millis(s.backoff_base_ms),
        max: Duration::from_secs(s.backoff_max_secs),
    };
    let gate = Arc::new(KdfGate::for_config(s.kdf_concurrency, s.kdf_memory_kib));
    Ok(match s.key_mode {
        KeyMode::Password => Vault::new(store, kdf, backoff),
        KeyMode::Service => Vault::new_service(store, service_secret(settings)?, kdf, backoff),
    }
    .with_kdf_gate(gate))
}

impl Server {
    /// Binds every listener and prepares the login path over `store`.
    pub async fn bind(
        settings: Settings,
        store: Arc<dyn TokenStore>,
    ) -> Result<Server, ServerError> {
        Server::bind_with(settings, store, Inherited::none()).await
    }

    /// [`Server::bind`], taking each listener's socket from `inherited`
    /// (systemd's socket activation) when one is bound to its address,
    /// and binding it otherwise. Inherited sockets no listener takes are
    /// closed, with a warning.
    pub async fn bind_with(
        settings: Settings,
        store: Arc<dyn TokenStore>,
        inherited: Inherited,
    ) -> Result<Server, ServerError> {
        // Logins change metadata; the store sees it every few seconds.
        let meta = Arc::new(MetaCache::new(store));
        let tracer = Arc::new(crate::trace::Tracer::new());
        Server::bind_over(settings, meta, inherited, tracer).await
    }

    /// [`Server::bind_with`] over a store already behind its metadata
    /// cache and with a tracer (both of which `run` shares with the
    /// control socket).
    async fn bind_over(
        mut settings: Settings,
        meta: Arc<MetaCache>,
        mut inherited: Inherited,
        tracer: Arc<crate::trace::Tracer>,
    ) -> Result<Server, ServerError> {
        let http = TokenSource::http_client()?;
        settings.discover(&http).await?;
        let settings = Arc::new(settings);
        let vault = Arc::new(vault_for(&settings, meta.clone())?);
        tracing::info!(
            kdf_concurrency = vault.kdf_gate().cap(),
            automatic = settings.server.kdf_concurrency == 0,
            kdf_memory_kib = settings.server.kdf_memory_kib,
            "key derivations capped: at most this many Argon2id runs at once, the others queue"
        );
        let refresh_http = TokenSource::refresh_client(settings.server.refresh_timeout())?;
        let tokens = TokenSource::new(http, refresh_http, vault.clone());
        let alerts = crate::alerts::Alerts::new(&settings.alerts)?;
        alerts.count_into(tokens.metrics().clone());
        let gateway = Arc::new(Gateway::new(settings.clone(), vault, tokens)?.with_alerts(alerts));
        gateway.recall_smtp();

        // The spool is opened when there is a device or `[spool] dir` is
        // set (so messages queued by a device since removed, or turned to
        // live sending, still go out).
        let spool = if !settings.devices.is_empty()
            || settings.spool.dir.is_some()
            || settings.spool.store.is_some()
            || settings.listeners.iter().any(|l| l.spool)
        {
            let spool = open_spool(&settings, true).map_err(|source| ServerError::Spool {
                source: Box::new(source),
            })?;
            tracing::info!(location = %spool.location(), "spool opened");
            Some(Arc::new(SpoolRuntime {
                spool,
                wake: Arc::new(tokio::sync::Notify::new()),
                policy: crate::spool::deliver::Policy::from_config(&settings.spool),
            }))
        } else {
            None
        };
        let mut listeners = Vec::new();
        for l in &settings.listeners {
            let tls = match (l.tls, &l.cert) {
                (ListenerTls::None, _) => None,
                (_, Some((cert, key))) => Some(tls::server_config_from_files(cert, key)?),
                (_, None) => Some(tls::self_signed_server_config()?),
            };
            let bind_error = |error| ServerError::Bind {
                addr: l.bind,
                protocol: l.protocol.name(),
                error,
            };
            let tcp = match inherited.take(l.bind) {
                Some((socket, name)) => {
                    tracing::info!(
                        protocol = l.protocol.name(),
                        bind = %l.bind,
                        socket = %name,
                        "listening on a socket from systemd"
                    );
                    socket.set_nonblocking(true).map_err(bind_error)?;
                    TcpListener::from_std(socket).map_err(bind_error)?
                }
                None => listen(l.bind).map_err(bind_error)?,
            };
            let driver = DriverSettings {
                tls,
                preauth_timeout: settings.server.preauth_timeout(),
                preauth_deadline: settings.server.preauth_deadline(),
                relay_idle_timeout: settings.server.relay_idle_timeout(),
                login_timeout: settings.server.login_timeout(),
                relayed: Some((gateway.metrics().clone(), l.protocol.name())),
            };
            listeners.push((
                tcp,
                Arc::new(ListenerRuntime {
                    config: l.clone(),
                    driver,
                    hostname: settings.server.hostname.clone(),
                    allowance: proto::limits::Allowance {
                        max_commands: settings.server.preauth_max_commands.max(1),
                        max_failed_logins: settings.server.preauth_max_failed_logins.max(1),
                    },
                    turning_away: Arc::new(tokio::sync::Semaphore::new(TURNING_AWAY_AT_ONCE)),
                    spool: spool.clone(),
                    proxy: l.proxy_protocol.then(|| ProxyProtocol {
                        trusted: settings.trusted_proxies.clone().into(),
                        timeout: PROXY_HEADER_TIMEOUT,
                    }),
                    tracer: tracer.clone(),
                }),
            ));
        }
        inherited.close_unused();
        let status = match &settings.status {
            None => None,
            Some((addr, token_file)) => {
                let token = match token_file {
                    None => None,
                    Some(path) => {
                        let text = std::fs::read_to_string(path).map_err(|source| {
                            ServerError::StatusToken {
                                path: path.clone(),
                                source,
                            }
                        })?;
                        Some(secrecy::SecretString::from(text.trim().to_owned()))
                    }
                };
                let tcp = listen(*addr).map_err(|error| ServerError::Bind {
                    addr: *addr,
                    protocol: "status",
                    error,
                })?;
                Some((tcp, token))
            }
        };
        let background_refresh = (settings.server.key_mode == KeyMode::Service)
            .then(|| Duration::from_secs(settings.server.background_refresh_secs.max(1)));
        Ok(Server {
            status,
            gateway,
            settings: settings.clone(),
            reloader: None,
            reload_requests: None,
            listeners,
            max_connections: settings.server.max_connections.max(1),
            per_address: settings.server.per_address_limit(),
            shutdown_grace: settings.server.shutdown_grace(),
            refresh_timeout: settings.server.refresh_timeout(),
            background_refresh,
            spool,
            meta,
            meta_flush_every: META_FLUSH_EVERY,
            tracer,
        })
    }

    /// What the control socket needs to serve `mailbridge trace`: the
    /// tracer, and the running configuration's accounts (as reloaded).
    pub fn trace_desk(&self) -> crate::trace::Desk {
        let gateway = Arc::downgrade(&self.gateway);
        crate::trace::Desk::new(self.tracer.clone(), move |name| {
            gateway
                .upgrade()?
                .settings()
                .account_for(name)
                .map(|a| a.name)
        })
    }

    /// The store as the server uses it: account metadata written behind
    /// (see [`crate::store::meta_cache`]), everything else passed on. The
    /// control socket serves this one, so `mailbridge account list` sees
    /// what the status page sees.
    pub fn store(&self) -> Arc<dyn TokenStore> {
        self.meta.clone()
    }

    /// Writes the accounts' metadata to the store every `every` instead
    /// of [`META_FLUSH_EVERY`] (and still at shutdown).
    pub fn with_meta_flush_every(mut self, every: Duration) -> Server {
        self.meta_flush_every = every;
        self
    }

    /// The bound addresses, in config order (useful with port 0).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners
            .iter()
            .filter_map(|(l, _)| l.local_addr().ok())
            .collect()
    }

    /// The status listener's address, when `[status]` is set.
    pub fn status_addr(&self) -> Option<SocketAddr> {
        self.status.as_ref().and_then(|(l, _)| l.local_addr().ok())
    }

    /// Re-read the configuration with `reloader` on SIGHUP.
    pub fn with_reloader(mut self, reloader: Reloader) -> Server {
        self.reloader = Some(reloader);
        self
    }

    /// Also re-read it when `asks` brings a request (the control socket's
    /// `mailbridge reload`), and answer it with the outcome.
    pub fn with_reload_requests(mut self, asks: ReloadAsks) -> Server {
        self.reload_requests = Some(asks);
        self
    }

    /// Applies a configuration read again: accounts and providers take
    /// effect for the next logins; changes to `[server]` or the listeners
    /// need a restart and are reported as such. An unusable configuration
    /// changes nothing. Returns what it did, for the log.
    pub async fn reload(
        gateway: &Gateway,
        running: &Settings,
        new: Result<Settings, ConfigError>,
    ) -> Result<String, ReloadError> {
        let mut new = new?;
        new.discover(gateway.http()).await?;
        let mut note = format!(
            "{} account(s), {} provider(s) in force",
            new.accounts.len(),
            new.providers.len()
        );
        let mut needs_restart = Vec::new();
        if new.server != running.server {
            needs_restart.push("[server]");
        }
        if new.listeners != running.listeners {
            needs_restart.push("[[listener]]");
        }
        if new.alerts != running.alerts {
            needs_restart.push("[alerts]");
        }
        if !needs_restart.is_empty() {
            note.push_str(&format!(
                "; changes to {} take effect only at a restart",
                needs_restart.join(" and ")
            ));
        }
        gateway.reload(Arc::new(new))?;
        Ok(note)
    }

    /// The login path, for tests and the CLI.
    pub fn gateway(&self) -> &Arc<Gateway> {
        &self.gateway
    }

    /// Serves until `shutdown` completes, then drains: no new connections,
    /// pre-auth clients are told mailbridge is going away, relayed sessions
    /// close once at rest. Returns when every session has ended or the
    /// grace period is over (the caller's exit then cuts what is left).
    ///
    /// Under systemd (`NOTIFY_SOCKET`) it says READY=1 once every listener
    /// serves and SIGHUP and SIGTERM are handled, RELOADING=1 / READY=1
    /// around a reload, STOPPING=1 when the drain begins, a status line
    /// while it runs and, with `WatchdogSec=`, WATCHDOG=1 (see
    /// [`crate::net::systemd`]).
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) {
        // Polled once before READY=1, so that its signal handlers are in
        // place when systemd may send SIGTERM (before, SIGTERM would kill
        // the process without a drain).
        let mut shutdown = std::pin::pin!(shutdown);
        let stopped_early = std::future::poll_fn(|cx| {
            std::task::Poll::Ready(shutdown.as_mut().poll(cx).is_ready())
        })
        .await;
        let (stop_tx, stop_rx) = watch::channel(false);
        let listeners_seen: Vec<(&'static str, SocketAddr)> = self
            .listeners
            .iter()
            .filter_map(|(l, rt)| l.local_addr().ok().map(|a| (rt.config.protocol.name(), a)))
            .collect();
        let limit = Admission::new(self.max_connections, self.per_address);
        tracing::info!(
            max_connections = self.max_connections,
            per_address = self.per_address,
            "connection limits"
        );
        let status_line = {
            let limit = limit.clone();
            let gateway = self.gateway.clone();
            let stop = stop_rx.clone();
            let listeners = self.listeners.len();
            Arc::new(move || {
                let sessions = limit.open();
                if *stop.borrow() {
                    format!("draining: {sessions} session(s) left")
                } else {
                    let accounts = gateway.settings().accounts.len();
                    format!(
                        "serving {sessions} session(s), {accounts} account(s) on {listeners} listener(s)"
                    )
                }
            })
        };
        let mut tasks = Vec::new();
        for (tcp, rt) in self.listeners {
            let addr = tcp.local_addr().ok();
            tracing::info!(
                protocol = rt.config.protocol.name(),
                addr = ?addr,
                tls = ?rt.config.tls,
                proxy_protocol = rt.proxy.is_some(),
                "listening"
            );
            let gateway = self.gateway.clone();
            let limit = limit.clone();
            let stop = stop_rx.clone();
            let stop_for_sessions = stop_rx.clone();
            // Unconstrained: a burst of connections is accepted in one go
            // instead of 128 at a time between every session's turn, so the
            // kernel's accept queue does not overflow (see `listen`).
            let proxy = rt.proxy.clone();
            tasks.push(tokio::spawn(tokio::task::unconstrained(accept_loop(
                tcp,
                limit,
                proxy,
                stop,
                move |Accepted {
                          tcp,
                          peer,
                          via,
                          admitted,
                      }| {
                    let rt = rt.clone();
                    let gateway = gateway.clone();
                    let stop = stop_for_sessions.clone();
                    let protocol = rt.config.protocol.name();
                    // Behind a proxy: the client, then the proxy it came
                    // through.
                    let context = crate::logging::SessionContext {
                        peer,
                        via,
                        protocol,
                    };
                    let session = async move {
                        let protocol = rt.config.protocol.name();
                        match admitted {
                            Admitted::Yes(ticket) => {
                                let counted = gateway.metrics().connection(protocol);
                                serve(rt, gateway, tcp, peer, stop).await;
                                drop(counted);
                                drop(ticket);
                            }
                            Admitted::No(why) => {
                                let reason = match why {
                                    Refused::Full { .. } => "full",
                                    Refused::PerAddress { .. } => "per_address",
                                };
                                gateway.metrics().refused(protocol, reason);
                                turn_away(rt, tcp, why).await
                            }
                        }
                    };
                    crate::logging::in_session(context, session)
                },
            ))));
        }
        #[cfg(unix)]
        let reloads = self.reloader.take().and_then(|reloader| {
            use tokio::signal::unix::{SignalKind, signal};
            let gateway = self.gateway.clone();
            let running = self.settings.clone();
            let status_line = status_line.clone();
            let mut asks = self.reload_requests.take();
            // Installed here, before READY=1: a SIGHUP without a handler
            // would end the process.
            let mut hangups = match signal(SignalKind::hangup()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for SIGHUP: no configuration reloads");
                    return None;
                }
            };
            Some(tokio::spawn(async move {
                loop {
                    // Several SIGHUPs during one reload count once.
                    let asked = tokio::select! {
                        got = hangups.recv() => {
                            if got.is_none() {
                                break;
                            }
                            tracing::info!("SIGHUP: reading the configuration again");
                            None
                        }
                        Some(reply) = next_ask(&mut asks) => {
                            tracing::info!("`mailbridge reload`: reading the configuration again");
                            Some(reply)
                        }
                    };
                    systemd::reloading();
                    let outcome = match Server::reload(&gateway, &running, reloader()).await {
                        Ok(note) => {
                            tracing::info!(result = %note, "configuration reloaded");
                            Ok(note)
                        }
                        Err(e) => {
                            let why = crate::report::chain(&e);
                            tracing::error!(
                                error = %why,
                                "configuration not reloaded; the previous one stays in force"
                            );
                            Err(format!(
                                "configuration not reloaded; the previous one stays in force: {why}"
                            ))
                        }
                    };
                    // Ready again either way: a refused configuration
                    // leaves the previous one serving.
                    systemd::ready(&status_line());
                    if let Some(reply) = asked {
                        let _ = reply.send(outcome);
                    }
                }
            }))
        });
        #[cfg(not(unix))]
        let reloads: Option<tokio::task::JoinHandle<()>> = self.reloader.take().and(None);
        let (status_stop_tx, status_stop_rx) = watch::channel(false);
        let status_task = self.status.take().map(|(tcp, token)| {
            let addr = tcp.local_addr().ok();
            tracing::info!(addr = ?addr, "status page, /metrics and /healthz");
            let state = Arc::new(crate::status::StatusState {
                gateway: self.gateway.clone(),
                spool: self.spool.as_ref().map(|s| s.spool.clone()),
                listeners: listeners_seen.clone(),
                token,
                stopping: stop_rx.clone(),
            });
            tokio::spawn(crate::status::serve(tcp, state, status_stop_rx))
        });
        let delivery = self.spool.as_ref().map(|rt| {
            tokio::spawn(crate::spool::deliver::run(
                rt.spool.clone(),
                self.gateway.clone(),
                rt.policy,
                rt.wake.clone(),
                stop_rx.clone(),
            ))
        });
        let refresher = self.background_refresh.map(|every| {
            let gateway = self.gateway.clone();
            let mut stop = stop_rx.clone();
            tokio::spawn(async move {
                // Right away (a restart after a long stop is when grants are
                // closest to their end), but not the grants refreshed within
                // one interval (a service restarting in a loop would
                // otherwise refresh every grant at each start); then all of
                // them on schedule. At shutdown the account in hand is
                // finished, the rest wait for the next start.
                let mut fresh_within = Some(every);
                loop {
                    gateway.refresh_all(&stop, fresh_within.take()).await;
                    tokio::select! {
                        _ = tokio::time::sleep(every) => {}
                        _ = stop.wait_for(|stopping| *stopping) => break,
                    }
                }
            })
        });
        // A rotated refresh token the store could not take is kept in
        // memory and retried by the token source; a person hears of it.
        let grant_events = {
            let mut events = self.gateway.vault().subscribe();
            let alerts = self.gateway.alerts().clone();
            tokio::spawn(async move {
                use tokio::sync::broadcast::error::RecvError;
                loop {
                    match events.recv().await {
                        // The store's own words (paths, the backend's
                        // errors) are in the log already, not in alerts.
                        Ok(crate::vault::GrantEvent::RotationNotSaved { account, .. }) => {
                            alerts.token_not_saved(
                                &account,
                                "cannot save the rotated refresh token; it is kept in memory and the write is retried, and mailbridge's log has the store's error",
                            );
                        }
                        Ok(_) => {}
                        Err(RecvError::Lagged(missed)) => {
                            tracing::warn!(missed, "grant events missed: the log above has them");
                        }
                        Err(RecvError::Closed) => break,
                    }
                }
            })
        };
        // Password key mode: only a client's login uses a grant, so say
        // when one nears Microsoft's 90 days unused (service mode's
        // background refresh prevents that, and alerts when it fails).
        let unused_check = (self.settings.server.key_mode == KeyMode::Password).then(|| {
            let gateway = self.gateway.clone();
            tokio::spawn(async move {
                loop {
                    check_unused_grants(&gateway);
                    tokio::time::sleep(UNUSED_CHECK_EVERY).await;
                }
            })
        });
        let meta_flusher = {
            let meta = self.meta.clone();
            let every = self.meta_flush_every;
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(every).await;
                    flush_meta(&meta).await;
                }
            })
        };
        let heap_keeper = {
            let limit = limit.clone();
            tokio::spawn(async move {
                let mut keeper = HeapKeeper::default();
                loop {
                    tokio::time::sleep(HEAP_CHECK_EVERY).await;
                    let (peak, open) = limit.take_peak();
                    if keeper.should_give_back(peak, open, Instant::now()) {
                        give_heap_back().await;
                    }
                }
            })
        };
        systemd::ready(&status_line());
        let informer = tokio::spawn(systemd::keep_informed({
            let status_line = status_line.clone();
            move || status_line()
        }));
        if !stopped_early {
            shutdown.await;
        }
        if let Some(r) = unused_check {
            r.abort();
        }
        if let Some(r) = reloads {
            r.abort();
        }
        tracing::info!("shutting down: no new connections");
        let _ = stop_tx.send(true);
        systemd::stopping(&status_line());
        for t in tasks {
            let _ = t.await;
        }
        // Every session holds a ticket until it ends.
        let open = limit.open();
        if open > 0 {
            tracing::info!(
                sessions = open,
                grace_secs = self.shutdown_grace.as_secs(),
                "waiting for sessions to come to rest"
            );
            match tokio::time::timeout(self.shutdown_grace, limit.all_closed()).await {
                Ok(()) => tracing::info!("all sessions ended"),
                Err(_) => tracing::warn!(
                    sessions = limit.open(),
                    "grace period over; cutting the sessions still busy"
                ),
            }
        }
        // A delivery in progress ends at its next step; what it had not
        // finished stays queued for the next start.
        if let Some(d) = delivery
            && tokio::time::timeout(self.shutdown_grace, d).await.is_err()
        {
            tracing::warn!("the spool delivery did not stop in time; its message stays queued");
        }
        // A refresh in flight may hold a refresh token the provider has
        // already rotated: it must reach the disk before the process ends.
        // The background refresher finishes the account in hand (its
        // refresh is one of those drained) and starts no other.
        let tokens = self.gateway.tokens();
        tokens.drain(self.refresh_timeout).await;
        if let Some(r) = refresher {
            if tokio::time::timeout(self.refresh_timeout, r).await.is_err() {
                tracing::warn!("the background refresh did not finish in time");
            }
            tokens.drain(self.refresh_timeout).await;
        }
        // A rotated token the store could not take: one last try.
        self.gateway.vault().save_all_unsaved().await;
        // The logins' metadata, now that no session can change it.
        meta_flusher.abort();
        heap_keeper.abort();
        flush_meta(&self.meta).await;
        grant_events.abort();
        // The watchdog is fed until the very end: a long drain is not a
        // hang.
        informer.abort();
        // The status page answers (`/healthz`: draining) until the end.
        let _ = status_stop_tx.send(true);
        if let Some(t) = status_task {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
        // Keep `stop_tx` alive until here: sessions treat a dropped sender
        // as "never stopping".
        drop(stop_tx);
    }
}

/// Writes the accounts' metadata kept in memory to the store, off the
/// runtime's threads (the store's writes block).
async fn flush_meta(meta: &Arc<MetaCache>) {
    let meta = meta.clone();
    match tokio::task::spawn_blocking(move || meta.flush()).await {
        Ok(Ok(n)) => {
            if n > 0 {
                tracing::debug!(accounts = n, "accounts' metadata written to the store");
            }
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %crate::report::chain(&e), "cannot write the accounts' metadata to the store; kept in memory and tried again")
        }
        Err(_) => tracing::warn!("the metadata write stopped unexpectedly"),
    }
}

/// How often the session count is looked at for a fall (see
/// [`HeapKeeper`]).
const HEAP_CHECK_EVERY: Duration = Duration::from_secs(5);

/// When to give freed heap memory back to the system.
///
/// glibc's malloc keeps the pages a crowd of sessions freed in the middle
/// of its arenas until asked (`malloc_trim`, [`mailbridge_heap`]); asking
/// walks every arena under its lock, so it is done after a fall in the
/// number of open sessions, not per session: when the count has fallen by
/// [`HeapKeeper::FALL`] from the most open at once since the last time, or by
/// any amount once [`HeapKeeper::QUIET`] has passed since then (a few
/// sessions ending now and then on a small office's gateway).
#[derive(Debug, Default)]
struct HeapKeeper {
    /// The most sessions open at once since the last give-back.
    peak: usize,
    last: Option<Instant>,
}

impl HeapKeeper {
    const FALL: usize = 32;
    const QUIET: Duration = Duration::from_secs(60);

    /// `peak`: the most sessions open at once since the last look
    /// ([`Admission::take_peak`], so that a crowd that came and went
    /// between two looks counts); `open`: how many are open now.
    fn should_give_back(&mut self, peak: usize, open: usize, now: Instant) -> bool {
        self.peak = self.peak.max(peak).max(open);
        let fall = self.peak - open;
        let quiet = self
            .last
            .is_none_or(|at| now.duration_since(at) >= Self::QUIET);
        if fall >= Self::FALL || (fall > 0 && quiet) {
            self.peak = open;
            self.last = Some(now);
            true
        } else {
            false
        }
    }
}

/// Gives freed heap pages back to the system, off the runtime's threads.
async fn give_heap_back() {
    let started = Instant::now();
    match tokio::task::spawn_blocking(mailbridge_heap::give_back).await {
        Ok(outcome) => tracing::debug!(
            ?outcome,
            took_us = started.elapsed().as_micros() as u64,
            "freed heap memory offered back to the system"
        ),
        Err(_) => tracing::warn!("giving heap memory back stopped unexpectedly"),
    }
}

/// How often password key mode looks for grants about to expire unused.
const UNUSED_CHECK_EVERY: Duration = Duration::from_secs(24 * 3600);

/// Raises an alert for each grant about to expire unused.
fn check_unused_grants(gateway: &Gateway) {
    let settings = gateway.settings();
    let found = crate::alerts::unused_grants(
        &settings,
        gateway.vault().store().as_ref(),
        crate::clock::unix_now(),
        settings.alerts.unused_warn_days,
    );
    tracing::debug!(
        found = found.len(),
        "checked for grants about to expire unused"
    );
    for alert in found {
        gateway.alerts().raise(alert);
    }
}

async fn serve(
    rt: Arc<ListenerRuntime>,
    gateway: Arc<Gateway>,
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    stop: watch::Receiver<bool>,
) {
    tracing::debug!("connected");
    let settings = gateway.settings();
    let device = (rt.config.protocol == Protocol::Smtp)
        .then(|| settings.device_for(peer.ip()).cloned())
        .flatten();
    // A device's messages can be large and its link slow: it gets ten
    // minutes, renewed with each message it stores.
    let allowed = match &device {
        Some(_) => rt
            .driver
            .preauth_deadline
            .max(crate::net::session::SPOOLING_SESSION),
        None => rt.driver.preauth_deadline,
    };
    let deadline = tokio::time::Instant::now() + allowed;
    // One atomic load when nobody traces.
    let trace = rt
        .tracer
        .session(trace_protocol(rt.config.protocol), peer, || {
            tcp.local_addr().ok()
        });
    let mut stream = Stream::Plain(tcp);
    if rt.config.tls == ListenerTls::Implicit {
        let Some(config) = rt.driver.tls.clone() else {
            return;
        };
        let until = (tokio::time::Instant::now() + rt.driver.preauth_timeout).min(deadline);
        match tokio::time::timeout_at(until, stream.accept_tls(config)).await {
            Ok(Ok(s)) => stream = s,
            Ok(Err(e)) => {
                tracing::info!(error = %e, "client TLS handshake failed");
                return;
            }
            Err(_) => return,
        }
    }
    let device_options = device.as_ref().map(|d| {
        tracing::debug!(device = %d.name, account = %d.account, spool = d.spool, "a device, by its address");
        proto::smtp::DeviceOptions {
            senders: settings.senders_for(&d.account),
            spool: d.spool,
        }
    });
    let smtp_extensions = match rt.config.protocol {
        Protocol::Smtp => gateway.smtp_extensions(),
        Protocol::Imap | Protocol::Pop3 => proto::smtp::Extensions::default(),
    };
    let session = client_session(
        &rt.config,
        &rt.hostname,
        rt.driver.tls.as_ref(),
        stream.is_tls(),
        smtp_extensions,
        device_options,
    );
    let session = Box::new(proto::limits::Limited::new(session, rt.allowance));
    let protocol = rt.config.protocol;
    // A spooling listener checks the password here and keeps the
    // session; otherwise a login goes upstream.
    let spool_listener = rt.config.spool.then(|| rt.spool.clone()).flatten();
    let login = |request: proto::LoginRequest| {
        let gateway = gateway.clone();
        let spool_listener = spool_listener.clone();
        let trace = trace.clone();
        async move {
            if let Some(t) = &trace {
                t.login_as(traced_account(&gateway, &request, peer).as_deref());
            }
            match spool_listener {
                Some(spool) if !request.by_address => {
                    let account = gateway
                        .check_password(protocol, &request, peer.ip())
                        .await?;
                    let mut senders = gateway.settings().senders_for(&account);
                    if senders.is_empty() {
                        // A catch-all: the name logged in with.
                        senders.push(account.clone());
                    }
                    let device = crate::config::settings::Device {
                        name: format!("login {account}"),
                        from: Vec::new(),
                        account,
                        spool: true,
                        bounce: false,
                    };
                    Ok(Authenticated::Spool {
                        senders,
                        spooler: spooler(spool, device, peer),
                    })
                }
                _ => crate::trace::scoped(trace, gateway.login(protocol, request, peer.ip()))
                    .await
                    .map(Authenticated::Upstream),
            }
        }
    };
    let device_spooler = match (&device, &rt.spool) {
        (Some(d), Some(spool)) if d.spool => Some(spooler(spool.clone(), d.clone(), peer)),
        _ => None,
    };
    drive(
        stream,
        session,
        &rt.driver,
        deadline,
        login,
        device_spooler,
        stop,
        trace.clone(),
    )
    .await;
}

/// The protocol crate's name for a listener's protocol, for traces.
fn trace_protocol(p: Protocol) -> proto::trace::Protocol {
    match p {
        Protocol::Imap => proto::trace::Protocol::Imap,
        Protocol::Pop3 => proto::trace::Protocol::Pop3,
        Protocol::Smtp => proto::trace::Protocol::Smtp,
    }
}

/// The account a login request names, for a trace: the account its user
/// name opens, or a device's.
fn traced_account(
    gateway: &Gateway,
    request: &proto::LoginRequest,
    peer: SocketAddr,
) -> Option<String> {
    let settings = gateway.settings();
    let name = if request.by_address {
        settings.device_for(peer.ip())?.account.clone()
    } else {
        request.credentials.user.clone()
    };
    settings.account_for(&name).map(|a| a.name)
}

/// The spool `settings` name: in the `[server] store` database (a
/// connection of its own), or the directory, cleaned of what was never
/// acknowledged. With `adopt` (the service), a spool in the database takes
/// over the messages of the spool on disk the state directory still holds.
pub fn open_spool(
    settings: &Settings,
    adopt: bool,
) -> Result<crate::spool::Spool, crate::spool::SpoolError> {
    if settings.spool_in_database()
        && let Some(url) = &settings.server.store
    {
        let db = crate::store::postgres::PgOptions::from_server(&settings.server)
            .and_then(|options| crate::store::PgStore::open(url, options))
            .map_err(crate::spool::SpoolError::Database)?;
        let spool = crate::spool::Spool::in_database(Arc::new(db));
        if adopt {
            spool.adopt_from_disk(&settings.server.state_dir().join("spool"))?;
        }
        return Ok(spool);
    }
    let dir = settings
        .spool
        .dir
        .clone()
        .unwrap_or_else(|| settings.server.state_dir().join("spool"));
    crate::spool::Spool::open(&dir)
}

/// Stores a device's messages in the spool (on the blocking pool: it
/// writes and flushes files), waking the delivery task.
fn spooler(
    rt: Arc<SpoolRuntime>,
    device: crate::config::settings::Device,
    peer: SocketAddr,
) -> Arc<crate::net::session::Spooler> {
    Arc::new(move |message: proto::Message| {
        let rt = rt.clone();
        let device = device.clone();
        Box::pin(async move {
            let spool = rt.spool.clone();
            let stored = tokio::task::spawn_blocking(move || {
                let client = peer.ip().to_string();
                spool.store(
                    &device.account,
                    &device.name,
                    &client,
                    device.bounce,
                    &message,
                )
            })
            .await;
            match stored {
                Ok(Ok(envelope)) => {
                    tracing::info!(
                        id = %envelope.id,
                        account = %envelope.account,
                        from = %envelope.from,
                        recipients = envelope.recipients.len(),
                        size = envelope.size,
                        "message queued"
                    );
                    rt.wake.notify_one();
                    proto::SpoolOutcome::Queued { id: envelope.id }
                }
                Ok(Err(e)) => {
                    tracing::error!(error = %crate::report::chain(&e), "cannot store a device's message");
                    proto::SpoolOutcome::Failed {
                        temporary: true,
                        reason: "Insufficient system storage: mailbridge cannot store the message just now (its log says why); try again later".into(),
                    }
                }
                Err(_) => proto::SpoolOutcome::Failed {
                    temporary: true,
                    reason: "mailbridge could not store the message; try again later".into(),
                },
            }
        })
    })
}

/// How many connections beyond the limits are being told so at once.
const TURNING_AWAY_AT_ONCE: usize = 64;

/// A connection beyond the limits: tell the client why in its protocol
/// (after the TLS handshake on an implicit-TLS listener), then close.
/// Bounded in time, and in number: beyond [`TURNING_AWAY_AT_ONCE`] at
/// once, connections are closed without a word.
async fn turn_away(rt: Arc<ListenerRuntime>, tcp: tokio::net::TcpStream, why: Refused) {
    let Ok(_slot) = rt.turning_away.clone().try_acquire_owned() else {
        return;
    };
    let mut stream = Stream::Plain(tcp);
    if rt.config.tls == ListenerTls::Implicit {
        let Some(config) = rt.driver.tls.clone() else {
            return;
        };
        match tokio::time::timeout(SEND_BEFORE_CLOSE, stream.accept_tls(config)).await {
            Ok(Ok(s)) => stream = s,
            _ => return,
        }
    }
    // Only a goodbye is sent: the extensions do not matter.
    let session = client_session(
        &rt.config,
        &rt.hostname,
        rt.driver.tls.as_ref(),
        stream.is_tls(),
        proto::smtp::Extensions::default(),
        None,
    );
    let _ = send_within(
        &mut stream,
        &session.goodbye(&why.reason()),
        SEND_BEFORE_CLOSE,
    )
    .await;
    let _ = tokio::time::timeout(SEND_BEFORE_CLOSE, stream.shutdown()).await;
}

/// The pre-auth session for a new connection on `l`. `smtp_extensions`
/// is what an SMTP session's EHLO advertises ([`Gateway::smtp_extensions`]:
/// the extensions, and the size limit, that the SMTP servers of all
/// configured providers support as last seen); SIZE is both advertised and
/// enforced from it.
fn client_session(
    l: &Listener,
    hostname: &str,
    tls: Option<&Arc<ServerConfig>>,
    tls_active: bool,
    smtp_extensions: proto::smtp::Extensions,
    device: Option<proto::smtp::DeviceOptions>,
) -> Box<dyn ClientSession> {
    let starttls_offered = l.tls == ListenerTls::Starttls && tls.is_some();
    let plaintext_login_allowed = l.plaintext_login_allowed();
    match l.protocol {
        Protocol::Imap => Box::new(proto::imap::ImapClientSession::new(
            proto::imap::ClientOptions {
                starttls_offered,
                tls_active,
                plaintext_login_allowed,
                ..Default::default()
            },
        )),
        Protocol::Pop3 => Box::new(proto::pop3::Pop3ClientSession::new(
            proto::pop3::ClientOptions {
                starttls_offered,
                tls_active,
                plaintext_login_allowed,
                ..Default::default()
            },
        )),
        Protocol::Smtp => Box::new(proto::smtp::SmtpClientSession::new(
            proto::smtp::ClientOptions {
                starttls_offered,
                tls_active,
                plaintext_login_allowed,
                hostname: hostname.to_string(),
                max_message_size: smtp_extensions.message_size_limit(),
                extensions: smtp_extensions,
                device,
                ..Default::default()
            },
        )),
    }
}

/// Opens the store in the configured state directory and serves until
/// `shutdown` completes; on SIGHUP, `reloader` reads the configuration
/// again (accounts and providers).
///
/// Listeners whose address matches one of the `inherited` sockets
/// (systemd's socket activation) use it instead of binding.
pub async fn run(
    settings: Settings,
    shutdown: impl Future<Output = ()>,
    reloader: Reloader,
    inherited: Inherited,
) -> Result<(), ServerError> {
    raise_open_files_limit(open_files_wanted(settings.server.max_connections));
    for note in settings.notes() {
        tracing::warn!("{note}");
    }
    let dir = settings.server.state_dir();
    for r in crate::store::modes::secure_state_dir(&dir)? {
        tracing::warn!(
            path = %r.path.display(),
            "the state directory was accessible to other users: changed mode {:04o} to {:04o}",
            r.from,
            r.to
        );
    }
    let store: Arc<dyn TokenStore> = match &settings.server.store {
        Some(url) => {
            // The state directory still holds the control socket and any
            // generated certificate; sled's store would have made it.
            let mut builder = std::fs::DirBuilder::new();
            builder.recursive(true);
            #[cfg(unix)]
            std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
            builder.create(&dir).map_err(|source| StoreError::Io {
                path: dir.clone(),
                source,
            })?;
            let options = crate::store::postgres::PgOptions::from_server(&settings.server)?;
            let store = crate::store::PgStore::open(url, options)?;
            tracing::info!(database = %url, "token store opened (shared database)");
            Arc::new(store)
        }
        None => {
            let store = SledStore::open(&dir)?;
            tracing::info!(state_dir = %dir.display(), "token store opened");
            Arc::new(store)
        }
    };
    // Logins change metadata; the store sees it every few seconds.
    let meta = Arc::new(MetaCache::new(store));
    // `mailbridge trace` asks the control socket; the accounts it may
    // name are the running configuration's, known once the server is.
    let tracer = Arc::new(crate::trace::Tracer::new());
    let serving: Arc<std::sync::OnceLock<std::sync::Weak<Gateway>>> = Arc::default();
    let desk = {
        let serving = serving.clone();
        crate::trace::Desk::new(tracer.clone(), move |name| {
            serving
                .get()?
                .upgrade()?
                .settings()
                .account_for(name)
                .map(|a| a.name)
        })
    };
    // `mailbridge account ...` reaches the store through this while we
    // hold its lock; without it they would need the service stopped. It
    // serves the server's view (metadata not yet written included). It is
    // bound before the listeners, so a command run as soon as a listener
    // answers finds it.
    // `mailbridge reload` (the units' ExecReload=) asks through it too,
    // and waits for the outcome.
    let (reload_tx, reload_rx) = tokio::sync::mpsc::channel(4);
    #[cfg(unix)]
    let control =
        crate::net::control::ControlSocket::bind(&dir, meta.clone(), Some(desk), Some(reload_tx))
            .map_err(|source| ServerError::Control {
            path: dir.join(crate::store::control::SOCKET_NAME),
            source,
        })?;
    #[cfg(not(unix))]
    drop(reload_tx);
    let server = Server::bind_over(settings, meta, inherited, tracer)
        .await?
        .with_reloader(reloader)
        .with_reload_requests(reload_rx);
    let _ = serving.set(Arc::downgrade(&server.gateway));
    server.run(shutdown).await;
    #[cfg(unix)]
    drop(control);
    Ok(())
}

/// Reloads asked for through the control socket, each with where its
/// outcome goes.
pub type ReloadAsks = tokio::sync::mpsc::Receiver<crate::net::ReloadReply>;

/// The next reload asked for; never, when nothing can ask (no control
/// socket, or it is gone).
async fn next_ask(asks: &mut Option<ReloadAsks>) -> Option<crate::net::ReloadReply> {
    match asks {
        Some(rx) => match rx.recv().await {
            Some(reply) => Some(reply),
            None => {
                *asks = None;
                std::future::pending().await
            }
        },
        None => std::future::pending().await,
    }
}

/// Open files a server with `max_connections` may need: two per session
/// (the client's socket and the upstream's) and a margin for listeners,
/// the store, logs and token requests.
pub fn open_files_wanted(max_connections: usize) -> u64 {
    (max_connections as u64)
        .saturating_mul(2)
        .saturating_add(256)
}

/// The open-files limit before and after [`raise_open_files_limit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenFiles {
    /// The soft limit found.
    pub before: u64,
    /// The soft limit now in force.
    pub now: u64,
    /// What was asked for.
    pub wanted: u64,
}

/// The `(soft, hard)` limits to set, if any change: the soft limit goes up
/// to the hard one (the process only uses epoll, so a high limit costs
/// nothing), and the hard one up to `wanted` when it is lower (allowed for
/// root or with `CAP_SYS_RESOURCE`), never past the kernel's `ceiling`
/// (`/proc/sys/fs/nr_open`). Nothing is ever lowered.
pub fn nofile_plan(soft: u64, hard: u64, ceiling: u64, wanted: u64) -> Option<(u64, u64)> {
    let hard_new = if hard < wanted {
        wanted.min(ceiling).max(hard)
    } else {
        hard
    };
    let soft_new = hard_new.min(ceiling).max(soft);
    (soft_new != soft || hard_new != hard).then_some((soft_new, hard_new))
}

/// Raises this process's open-files limit as far as it can towards
/// `wanted` (see [`nofile_plan`]) and warns, with what to do, when it stays
/// below. Used by `mailbridge run`, and by the benchmark for itself.
#[cfg(unix)]
pub fn raise_open_files_limit(wanted: u64) -> OpenFiles {
    use rlimit::Resource;
    let Ok((soft, hard)) = Resource::NOFILE.get() else {
        return OpenFiles {
            before: 0,
            now: 0,
            wanted,
        };
    };
    let ceiling = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1 << 20);
    let mut now = soft;
    if let Some((s, h)) = nofile_plan(soft, hard, ceiling, wanted) {
        if Resource::NOFILE.set(s, h).is_ok() {
            now = s;
        } else if let Some((s, h)) = nofile_plan(soft, hard, ceiling, 0) {
            // Not allowed to raise the hard limit: up to it, then.
            if Resource::NOFILE.set(s, h).is_ok() {
                now = s;
            }
        }
    }
    if now != soft {
        tracing::info!(from = soft, to = now, "raised the open-files limit");
    }
    if now < wanted {
        tracing::warn!(
            limit = now,
            wanted,
            "the open-files limit is below what max_connections needs (two per session); \
             raise it (systemd: LimitNOFILE={wanted}; shell: ulimit -n {wanted}) \
             or lower max_connections"
        );
    }
    OpenFiles {
        before: soft,
        now,
        wanted,
    }
}

/// Not Unix: nothing to raise.
#[cfg(not(unix))]
pub fn raise_open_files_limit(wanted: u64) -> OpenFiles {
    OpenFiles {
        before: wanted,
        now: wanted,
        wanted,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heap_is_given_back_after_a_fall_in_sessions() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut keeper = HeapKeeper::default();
        // Rising or steady: nothing to give back.
        assert!(!keeper.should_give_back(0, 0, at(0)));
        assert!(!keeper.should_give_back(500, 500, at(5)));
        assert!(!keeper.should_give_back(500, 500, at(10)));
        // A crowd leaves: at once.
        assert!(keeper.should_give_back(500, 10, at(15)));
        assert!(!keeper.should_give_back(10, 10, at(20)));
        // A few sessions ending: not until a minute after the last time.
        assert!(!keeper.should_give_back(40, 40, at(25)));
        assert!(!keeper.should_give_back(40, 35, at(30)));
        assert!(keeper.should_give_back(35, 35, at(75)));
        // A fall of 32 from the peak since then, at any time.
        assert!(!keeper.should_give_back(100, 100, at(80)));
        assert!(keeper.should_give_back(100, 68, at(85)));
        // A crowd that came and went between two looks.
        assert!(!keeper.should_give_back(68, 68, at(90)));
        assert!(keeper.should_give_back(1000, 68, at(95)));
    }

    #[test]
    fn nofile_plan_raises_soft_to_hard() {
        assert_eq!(nofile_plan(1024, 4096, 1 << 20, 2256), Some((4096, 4096)));
        assert_eq!(nofile_plan(4096, 4096, 1 << 20, 2256), None);
    }

    #[test]
    fn nofile_plan_raises_hard_when_too_low() {
        // 10,000 sessions on a machine whose hard limit is 20,000.
        let wanted = open_files_wanted(10_000);
        assert_eq!(wanted, 20_256);
        assert_eq!(
            nofile_plan(1024, 20_000, 1 << 20, wanted),
            Some((20_256, 20_256))
        );
        // Never past the kernel's ceiling, never lowered.
        assert_eq!(
            nofile_plan(1024, 20_000, 20_100, wanted),
            Some((20_100, 20_100))
        );
        assert_eq!(
            nofile_plan(50_000, 60_000, 1 << 20, wanted),
            Some((60_000, 60_000))
        );
        assert_eq!(nofile_plan(60_000, 60_000, 1 << 20, wanted), None);
    }

    #[test]
    fn nofile_plan_with_an_infinite_hard_limit() {
        assert_eq!(
            nofile_plan(1024, u64::MAX, 1 << 20, 2256),
            Some((1 << 20, u64::MAX))
        );
    }

    #[tokio::test]
    async fn listen_queues_a_burst_until_accepted() {
        // 600 clients connect before the server accepts anything: with the
        // old 128-deep queue most would wait for SYN retries (or, with SYN
        // cookies, believe they were connected when they were not).
        let listener = listen(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
        let addr = listener.local_addr().unwrap();
        let mut connects = tokio::task::JoinSet::new();
        for _ in 0..600 {
            connects.spawn(tokio::net::TcpStream::connect(addr));
        }
        let mut clients = Vec::new();
        let all = tokio::time::timeout(Duration::from_secs(5), async {
            while let Some(c) = connects.join_next().await {
                clients.push(c.unwrap().unwrap());
            }
        })
        .await;
        assert!(all.is_ok(), "only {} connects completed", clients.len());
        for _ in 0..600 {
            tokio::time::timeout(Duration::from_secs(5), listener.accept())
                .await
                .unwrap()
                .unwrap();
        }
    }

    #[cfg(unix)]
    #[test]
    fn raising_the_limit_reports_what_the_kernel_holds() {
        use rlimit::Resource;
        let (soft, hard) = Resource::NOFILE.get().unwrap();
        let wanted = soft.saturating_add(64);
        let r = raise_open_files_limit(wanted);
        let (soft_now, hard_now) = Resource::NOFILE.get().unwrap();
        assert_eq!((r.before, r.wanted), (soft, wanted));
        assert_eq!(r.now, soft_now, "the reported limit is the one in force");
        assert!(r.now >= r.before, "{r:?}");
        assert!(hard_now >= hard, "the hard limit is never lowered");
        // Up to what was wanted, or as far as an unprivileged process may.
        assert!(r.now >= wanted.min(hard), "{r:?}, hard limit {hard}");
        // Asking for less than there is changes nothing.
        let again = raise_open_files_limit(1);
        assert_eq!((again.before, again.now), (soft_now, soft_now));
        assert_eq!(Resource::NOFILE.get().unwrap(), (soft_now, hard_now));
    }
}
