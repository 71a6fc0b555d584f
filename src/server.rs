//! Ties it together: binds the listeners, builds the login path and serves
//! until shutdown. `main` and the tests use the same entry points.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::ServerConfig;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tracing::Instrument;

use crate::config::{KeyMode, Listener, ListenerTls, Protocol, Settings};
use crate::login::Gateway;
use crate::net::listener::accept_loop;
use crate::net::session::{DriverSettings, drive};
use crate::net::stream::Stream;
use crate::net::tls::{self, TlsError};
use crate::oauth::TokenSource;
use crate::proto::{self, ClientSession};
use crate::store::{KdfParams, SledStore, StoreError, TokenStore};
use crate::vault::{BackoffPolicy, Vault};

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A listener could not bind.
    #[error("cannot listen on {addr} ({protocol}): {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The protocol, for the message.
        protocol: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// TLS material is unusable.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The token store cannot be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// An `oidc` / `open` provider's metadata could not be read.
    #[error("{0}")]
    Discovery(String),
    /// The service key is unusable.
    #[error("{0}")]
    Key(String),
}

struct ListenerRuntime {
    config: Listener,
    driver: DriverSettings,
    /// Our name in SMTP greetings.
    hostname: String,
}

/// A bound, not yet running server.
pub struct Server {
    gateway: Arc<Gateway>,
    listeners: Vec<(TcpListener, Arc<ListenerRuntime>)>,
    max_connections: usize,
    /// Service key mode: how often to refresh every grant.
    background_refresh: Option<Duration>,
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
    Ok(match s.key_mode {
        KeyMode::Password => Vault::new(store, kdf, backoff),
        KeyMode::Service => Vault::new_service(store, service_secret(settings)?, kdf, backoff),
    })
}

impl Server {
    /// Binds every listener and prepares the login path over `store`.
    pub async fn bind(
        mut settings: Settings,
        store: Arc<dyn TokenStore>,
    ) -> Result<Server, ServerError> {
        settings
            .discover(&TokenSource::http_client())
            .await
            .map_err(ServerError::Discovery)?;
        let settings = Arc::new(settings);
        let vault = Arc::new(vault_for(&settings, store)?);
        let tokens = TokenSource::new(TokenSource::http_client(), vault.clone());
        let gateway = Arc::new(Gateway::new(settings.clone(), vault, tokens)?);

        let mut listeners = Vec::new();
        for l in &settings.listeners {
            let tls = match (l.tls, &l.cert) {
                (ListenerTls::None, _) => None,
                (_, Some((cert, key))) => Some(tls::server_config_from_files(cert, key)?),
                (_, None) => Some(tls::self_signed_server_config()?),
            };
            let tcp = TcpListener::bind(l.bind)
                .await
                .map_err(|source| ServerError::Bind {
                    addr: l.bind,
                    protocol: l.protocol.name(),
                    source,
                })?;
            let driver = DriverSettings {
                tls,
                preauth_timeout: settings.server.preauth_timeout(),
                relay_idle_timeout: settings.server.relay_idle_timeout(),
                login_timeout: settings.server.login_timeout(),
            };
            listeners.push((
                tcp,
                Arc::new(ListenerRuntime {
                    config: l.clone(),
                    driver,
                    hostname: settings.server.hostname.clone(),
                }),
            ));
        }
        let background_refresh = (settings.server.key_mode == KeyMode::Service)
            .then(|| Duration::from_secs(settings.server.background_refresh_secs.max(1)));
        Ok(Server {
            gateway,
            listeners,
            max_connections: settings.server.max_connections.max(1),
            background_refresh,
        })
    }

    /// The bound addresses, in config order (useful with port 0).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners
            .iter()
            .filter_map(|(l, _)| l.local_addr().ok())
            .collect()
    }

    /// The login path, for tests and the CLI.
    pub fn gateway(&self) -> &Arc<Gateway> {
        &self.gateway
    }

    /// Serves until `shutdown` completes. Sessions already relaying are
    /// left to finish on their own while the runtime lives.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let (stop_tx, stop_rx) = watch::channel(false);
        let limit = Arc::new(Semaphore::new(self.max_connections));
        let mut tasks = Vec::new();
        for (tcp, rt) in self.listeners {
            let addr = tcp.local_addr().ok();
            tracing::info!(protocol = rt.config.protocol.name(), addr = ?addr, tls = ?rt.config.tls, "listening");
            let gateway = self.gateway.clone();
            let limit = limit.clone();
            let stop = stop_rx.clone();
            tasks.push(tokio::spawn(accept_loop(
                tcp,
                limit,
                stop,
                move |tcp, peer| {
                    let rt = rt.clone();
                    let gateway = gateway.clone();
                    let span =
                        tracing::info_span!("conn", %peer, protocol = rt.config.protocol.name());
                    async move { serve(rt, gateway, tcp, peer).await }.instrument(span)
                },
            )));
        }
        let refresher = self.background_refresh.map(|every| {
            let gateway = self.gateway.clone();
            tokio::spawn(async move {
                // Right away (a restart after a long stop is when grants are
                // closest to their end), then on schedule.
                loop {
                    gateway.refresh_all().await;
                    tokio::time::sleep(every).await;
                }
            })
        });
        shutdown.await;
        if let Some(r) = refresher {
            r.abort();
        }
        tracing::info!("shutting down: no new connections");
        let _ = stop_tx.send(true);
        for t in tasks {
            let _ = t.await;
        }
    }
}

async fn serve(
    rt: Arc<ListenerRuntime>,
    gateway: Arc<Gateway>,
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
) {
    tracing::debug!("connected");
    let mut stream = Stream::Plain(tcp);
    if rt.config.tls == ListenerTls::Implicit {
        let Some(config) = rt.driver.tls.clone() else {
            return;
        };
        match tokio::time::timeout(rt.driver.preauth_timeout, stream.accept_tls(config)).await {
            Ok(Ok(s)) => stream = s,
            Ok(Err(e)) => {
                tracing::info!(error = %e, "client TLS handshake failed");
                return;
            }
            Err(_) => return,
        }
    }
    let session = client_session(
        &rt.config,
        &rt.hostname,
        rt.driver.tls.as_ref(),
        stream.is_tls(),
    );
    let protocol = rt.config.protocol;
    let login = |request| {
        let gateway = gateway.clone();
        async move { gateway.login(protocol, request, peer.ip()).await }
    };
    drive(stream, session, &rt.driver, login).await;
}

fn client_session(
    l: &Listener,
    hostname: &str,
    tls: Option<&Arc<ServerConfig>>,
    tls_active: bool,
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
                ..Default::default()
            },
        )),
    }
}

/// Opens the store in the configured state directory and serves until
/// `shutdown` completes.
pub async fn run(
    settings: Settings,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    let dir = settings.server.state_dir();
    let store: Arc<dyn TokenStore> = Arc::new(SledStore::open(&dir)?);
    tracing::info!(state_dir = %dir.display(), "token store opened");
    let server = Server::bind(settings, store).await?;
    server.run(shutdown).await;
    Ok(())
}
