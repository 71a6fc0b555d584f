//! The configuration file: TOML schema, defaults and validation.
//!
//! Every struct denies unknown fields, so a typo is an error at start rather
//! than a silently ignored setting. Validation errors name the table or field
//! and the line it is on. Every field is documented in
//! `config.example.toml`, which a test parses.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::provider::{self, Provider};
use mailbridge_proto::sasl::Mechanism;

/// Everything that can go wrong loading a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// TOML syntax or schema error (unknown field, wrong type, missing field).
    #[error("{file}: line {line}: {message}")]
    Parse {
        /// The file name, for the message.
        file: String,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// A value that parsed but makes no sense.
    #[error("{file}: line {line}: {field}: {message}")]
    Invalid {
        /// The file name, for the message.
        file: String,
        /// 1-based line number of the table or field.
        line: usize,
        /// Which field, e.g. `listener.bind`.
        field: String,
        /// What is wrong and what to do.
        message: String,
    },
}

/// The protocols mailbridge serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// IMAP4rev1.
    Imap,
    /// POP3.
    Pop3,
    /// SMTP submission.
    Smtp,
}

impl Protocol {
    /// Lower-case name, for logs and config keys.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Imap => "imap",
            Protocol::Pop3 => "pop3",
            Protocol::Smtp => "smtp",
        }
    }
}

/// Local TLS on a listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ListenerTls {
    /// Plain text (fine on loopback).
    #[default]
    None,
    /// Plain text with the protocol's STARTTLS / STLS upgrade offered.
    Starttls,
    /// TLS from the first byte (ports 993 / 995 / 465 style).
    Implicit,
}

/// TLS towards the upstream server. Never off: mail servers that take
/// bearer tokens must not see them in clear.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamTls {
    /// TLS from the first byte.
    Implicit,
    /// Plain connect, then STARTTLS before any credential.
    Starttls,
}

/// How the sealing key is obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum KeyMode {
    /// The local password is the key (desktop default).
    #[default]
    Password,
    /// The key comes from a key file or a systemd credential; local
    /// passwords are checked against Argon2id hashes; grants are refreshed
    /// in the background (gateways).
    Service,
}

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Process-wide settings.
    #[serde(default)]
    pub server: ServerConfig,
    /// Where clients connect.
    #[serde(default, rename = "listener")]
    pub listeners: Vec<Spanned<ListenerConfig>>,
    /// OAuth2 providers and their mail servers, by name.
    #[serde(default)]
    pub providers: BTreeMap<String, Spanned<ProviderConfig>>,
    /// Local logins and the upstream identities they map to.
    #[serde(default, rename = "account")]
    pub accounts: Vec<Spanned<AccountConfig>>,
}

/// `[server]`: process-wide settings.
#[derive(Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Where grants are stored; default: `$STATE_DIRECTORY` under systemd,
    /// else the XDG data directory (`~/.local/share/mailbridge`).
    pub state_dir: Option<PathBuf>,
    /// How grants are sealed.
    #[serde(default)]
    pub key_mode: KeyMode,
    /// Service key mode: the key file (at least 32 random bytes). Default:
    /// the systemd credential `$CREDENTIALS_DIRECTORY/mailbridge-key`.
    pub key_file: Option<PathBuf>,
    /// Service key mode: seconds between background refreshes of every
    /// stored grant, so grants outlive long idle periods (Microsoft ends
    /// refresh tokens unused for 90 days). Default: one day.
    #[serde(default = "defaults::background_refresh")]
    pub background_refresh_secs: u64,
    /// The name mailbridge gives in SMTP greetings.
    #[serde(default = "defaults::hostname")]
    pub hostname: String,
    /// Connections served at once, over all listeners; more wait in the
    /// kernel's accept queue.
    #[serde(default = "defaults::max_connections")]
    pub max_connections: usize,
    /// Seconds a client may stay silent before logging in.
    #[serde(default = "defaults::preauth_timeout")]
    pub preauth_timeout_secs: u64,
    /// Seconds a relayed session may see no traffic either way before it
    /// is closed (IMAP IDLE clients re-issue IDLE every 29 minutes).
    #[serde(default = "defaults::relay_idle_timeout")]
    pub relay_idle_timeout_secs: u64,
    /// Seconds for TCP connect plus TLS handshake to an upstream server.
    #[serde(default = "defaults::connect_timeout")]
    pub connect_timeout_secs: u64,
    /// Seconds for the whole upstream login dialogue, token refresh
    /// included.
    #[serde(default = "defaults::login_timeout")]
    pub login_timeout_secs: u64,
    /// At shutdown, seconds relayed sessions get to come to rest (a
    /// message being sent or fetched, a command awaiting its answer)
    /// before the rest are cut.
    #[serde(default = "defaults::shutdown_grace")]
    pub shutdown_grace_secs: u64,
    /// First delay after a wrong local password, in milliseconds; it
    /// doubles with each further failure for the same account or address.
    #[serde(default = "defaults::backoff_base_ms")]
    pub backoff_base_ms: u64,
    /// Longest delay after repeated wrong passwords, in seconds.
    #[serde(default = "defaults::backoff_max_secs")]
    pub backoff_max_secs: u64,
    /// Argon2id memory cost in KiB for newly sealed grants.
    #[serde(default = "defaults::kdf_memory_kib")]
    pub kdf_memory_kib: u32,
    /// Argon2id iterations for newly sealed grants.
    #[serde(default = "defaults::kdf_iterations")]
    pub kdf_iterations: u32,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            state_dir: None,
            key_mode: KeyMode::default(),
            key_file: None,
            background_refresh_secs: defaults::background_refresh(),
            hostname: defaults::hostname(),
            max_connections: defaults::max_connections(),
            preauth_timeout_secs: defaults::preauth_timeout(),
            relay_idle_timeout_secs: defaults::relay_idle_timeout(),
            connect_timeout_secs: defaults::connect_timeout(),
            login_timeout_secs: defaults::login_timeout(),
            shutdown_grace_secs: defaults::shutdown_grace(),
            backoff_base_ms: defaults::backoff_base_ms(),
            backoff_max_secs: defaults::backoff_max_secs(),
            kdf_memory_kib: defaults::kdf_memory_kib(),
            kdf_iterations: defaults::kdf_iterations(),
        }
    }
}

impl ServerConfig {
    /// Pre-auth idle timeout.
    pub fn preauth_timeout(&self) -> Duration {
        Duration::from_secs(self.preauth_timeout_secs)
    }
    /// Relay idle timeout.
    pub fn relay_idle_timeout(&self) -> Duration {
        Duration::from_secs(self.relay_idle_timeout_secs)
    }
    /// Upstream connect timeout.
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_secs(self.connect_timeout_secs)
    }
    /// Upstream login timeout.
    pub fn login_timeout(&self) -> Duration {
        Duration::from_secs(self.login_timeout_secs)
    }
    /// Shutdown grace period.
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_secs)
    }
    /// The state directory in force.
    pub fn state_dir(&self) -> PathBuf {
        self.state_dir
            .clone()
            .unwrap_or_else(crate::store::default_state_dir)
    }
}

mod defaults {
    pub fn background_refresh() -> u64 {
        24 * 3600
    }
    pub fn hostname() -> String {
        "localhost".into()
    }
    pub fn max_connections() -> usize {
        1000
    }
    pub fn preauth_timeout() -> u64 {
        60
    }
    pub fn relay_idle_timeout() -> u64 {
        31 * 60
    }
    pub fn connect_timeout() -> u64 {
        15
    }
    pub fn login_timeout() -> u64 {
        60
    }
    pub fn shutdown_grace() -> u64 {
        30
    }
    pub fn backoff_base_ms() -> u64 {
        1000
    }
    pub fn backoff_max_secs() -> u64 {
        300
    }
    pub fn kdf_memory_kib() -> u32 {
        19 * 1024
    }
    pub fn kdf_iterations() -> u32 {
        2
    }
    pub fn mechanisms() -> Vec<mailbridge_proto::sasl::Mechanism> {
        vec![
            mailbridge_proto::sasl::Mechanism::Xoauth2,
            mailbridge_proto::sasl::Mechanism::Oauthbearer,
        ]
    }
}

/// `[[listener]]`: one listening socket.
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// `imap`, `pop3` or `smtp`.
    pub protocol: Protocol,
    /// `IP:port` to listen on, e.g. `127.0.0.1:1143` or `[::1]:1143`.
    pub bind: String,
    /// `none`, `starttls` or `implicit`.
    #[serde(default)]
    pub tls: ListenerTls,
    /// PEM certificate chain for local TLS; with `key_file`. When both are
    /// absent a self-signed certificate for localhost is generated at start.
    pub cert_file: Option<PathBuf>,
    /// PEM private key for `cert_file`.
    pub key_file: Option<PathBuf>,
    /// Accept passwords over a plain-text connection on a non-loopback
    /// address (old scanners on a trusted LAN). Off by default: such a
    /// listener advertises LOGINDISABLED until STARTTLS.
    #[serde(default)]
    pub allow_plaintext_login: bool,
}

/// `[providers.NAME]`: an OAuth2 provider and its mail servers.
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    /// `microsoft`, `google` or `custom`; presets fill in endpoints,
    /// scopes and servers, and every value below overrides them.
    pub preset: String,
    /// Microsoft only: `common`, `organizations`, `consumers` or a tenant id.
    pub tenant: Option<String>,
    /// Microsoft only: `global` (default), `usgov` (GCC High / DoD) or
    /// `china` (21Vianet): the login host, resource and mail servers.
    pub cloud: Option<String>,
    /// `oidc` and `open` presets: the issuer URL; the endpoints are read
    /// from its `/.well-known/openid-configuration` (or RFC 8414
    /// `/.well-known/oauth-authorization-server`) when mailbridge starts.
    pub issuer: Option<String>,
    /// The OAuth2 client (application) id. Preset `open`: default `open`.
    pub client_id: Option<String>,
    /// `oidc` / `open`: register a public client of mailbridge's own at the
    /// issuer's registration endpoint (RFC 7591) for each grant, instead
    /// of using `client_id`.
    #[serde(default)]
    pub dynamic_registration: bool,
    /// The client secret, if the client has one. Prefer `client_secret_file`.
    pub client_secret: Option<String>,
    /// A file holding the client secret (first line).
    pub client_secret_file: Option<PathBuf>,
    /// Token endpoint URL.
    pub token_url: Option<String>,
    /// Authorization endpoint URL.
    pub authorize_url: Option<String>,
    /// Device authorization endpoint URL (RFC 8628), for `account add --device`.
    pub device_url: Option<String>,
    /// Redirect URI registered for the client, for the browser flows
    /// (default: `http://127.0.0.1:<random port>/` for the loopback flow,
    /// `http://localhost/` for `--no-browser`).
    pub redirect_uri: Option<String>,
    /// Client credentials only: PEM certificate registered for the app,
    /// used instead of a secret (with `client_key_file`).
    pub client_certificate_file: Option<PathBuf>,
    /// Client credentials only: the certificate's PKCS#8 PEM private key.
    pub client_key_file: Option<PathBuf>,
    /// Service accounts only: the JSON key file of a Google service account
    /// with domain-wide delegation.
    pub service_account_key_file: Option<PathBuf>,
    /// Scopes to request, in order.
    pub scopes: Option<Vec<String>>,
    /// PEM file of CA certificates to trust for this provider's mail servers
    /// instead of the system's.
    pub ca_file: Option<PathBuf>,
    /// The IMAP server.
    pub imap: Option<ServerEndpointConfig>,
    /// The POP3 server.
    pub pop3: Option<ServerEndpointConfig>,
    /// The SMTP submission server.
    pub smtp: Option<ServerEndpointConfig>,
}

/// A mail server of a provider.
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct ServerEndpointConfig {
    /// Host name (also checked against the certificate).
    pub host: Option<String>,
    /// TCP port.
    pub port: Option<u16>,
    /// `implicit` or `starttls`.
    pub tls: Option<UpstreamTls>,
    /// Bearer mechanisms in order of preference; the first one the server
    /// advertises is used.
    pub mechanisms: Option<Vec<Mechanism>>,
    /// SMTP only: the name mailbridge gives in its EHLO; default: the name
    /// the client gave in its own EHLO.
    pub ehlo_name: Option<String>,
}

/// `[[account]]`: a local login mapped to an upstream identity.
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct AccountConfig {
    /// The login name clients use, e.g. `alice@example.com`; or a
    /// catch-all `*@example.com` matching any name at that domain.
    pub user: String,
    /// The name of a `[providers.NAME]` table.
    pub provider: String,
    /// The upstream login name, if it differs from `user` (not allowed for
    /// a catch-all, where it is always the login name).
    pub upstream_user: Option<String>,
    /// How the account's tokens are obtained.
    #[serde(default)]
    pub grant: GrantKind,
    /// When a client logs in and the account has no grant yet, start the
    /// browser authorization right away (the URL is logged and printed, a
    /// browser opened on a desktop), hold the login up to
    /// `login_timeout_secs`, and seal the grant under the password the
    /// client used. Only for grant = "authorization_code".
    #[serde(default)]
    pub authorize_on_login: bool,
}

/// How an account's access tokens are obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum GrantKind {
    /// A user's delegated grant: a refresh token obtained in a browser (or
    /// with a device code) and sealed in the store.
    #[default]
    AuthorizationCode,
    /// App-only access (Microsoft IMAP.AccessAsApp and friends): tokens from
    /// the client secret or certificate; nothing but the local password's
    /// check is stored.
    ClientCredentials,
    /// A Google service account with domain-wide delegation acting for the
    /// mailbox (JWT bearer grant).
    ServiceAccount,
    /// The resource owner password grant, where the provider allows it: the
    /// upstream password is given once to obtain a refresh token.
    Password,
}

impl GrantKind {
    /// Name as written in the config.
    pub fn name(self) -> &'static str {
        match self {
            GrantKind::AuthorizationCode => "authorization_code",
            GrantKind::ClientCredentials => "client_credentials",
            GrantKind::ServiceAccount => "service_account",
            GrantKind::Password => "password",
        }
    }

    /// Whether the grant lives in a stored refresh token.
    pub fn has_refresh_token(self) -> bool {
        matches!(self, GrantKind::AuthorizationCode | GrantKind::Password)
    }
}

/// A resolved account: which provider and upstream identity a login uses.
#[derive(Debug, Clone)]
pub struct Account {
    /// The key of the grant in the store: the login name as configured (or,
    /// for a catch-all, as the client typed it, lower-cased).
    pub name: String,
    /// The provider name.
    pub provider: String,
    /// The upstream login name.
    pub upstream_user: String,
    /// How its tokens are obtained.
    pub grant: GrantKind,
    /// See [`AccountConfig::authorize_on_login`].
    pub authorize_on_login: bool,
}

/// A validated configuration, ready to run.
#[derive(Debug)]
pub struct Settings {
    /// `[server]`.
    pub server: ServerConfig,
    /// Listeners with parsed addresses.
    pub listeners: Vec<Listener>,
    /// Providers after presets were applied.
    pub providers: BTreeMap<String, Provider>,
    /// Accounts as configured.
    pub accounts: Vec<AccountConfig>,
}

/// A validated listener.
#[derive(Debug, Clone, PartialEq)]
pub struct Listener {
    /// The protocol served.
    pub protocol: Protocol,
    /// The address to bind.
    pub bind: SocketAddr,
    /// Local TLS.
    pub tls: ListenerTls,
    /// Certificate and key files, if configured.
    pub cert: Option<(PathBuf, PathBuf)>,
    /// See [`ListenerConfig::allow_plaintext_login`].
    pub allow_plaintext_login: bool,
}

impl Listener {
    /// Whether a password may be sent before TLS on this listener.
    pub fn plaintext_login_allowed(&self) -> bool {
        self.tls == ListenerTls::Implicit
            || self.bind.ip().is_loopback()
            || self.allow_plaintext_login
    }
}

impl Settings {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Settings, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Settings::parse(&text, &path.display().to_string())
    }

    /// Parses and validates config text; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<Settings, ConfigError> {
        let raw: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            file: file.to_string(),
            line: e.span().map(|s| line_of(text, s.start)).unwrap_or(1),
            message: e.message().trim().to_string(),
        })?;
        let invalid = |span: Range<usize>, field: &str, message: String| ConfigError::Invalid {
            file: file.to_string(),
            line: line_of(text, span.start),
            field: field.to_string(),
            message,
        };

        let mut listeners = Vec::new();
        for l in &raw.listeners {
            let span = l.span();
            let c = l.get_ref();
            let bind: SocketAddr = c.bind.parse().map_err(|_| {
                invalid(
                    span.clone(),
                    "listener.bind",
                    format!(
                        "`{}` is not an IP:port address (e.g. 127.0.0.1:1143 or [::1]:1143)",
                        c.bind
                    ),
                )
            })?;
            let cert = match (&c.cert_file, &c.key_file) {
                (Some(cert), Some(key)) => Some((cert.clone(), key.clone())),
                (None, None) => None,
                _ => {
                    return Err(invalid(
                        span,
                        "listener.cert_file",
                        "cert_file and key_file go together: set both, or neither for a generated self-signed certificate".into(),
                    ));
                }
            };
            if cert.is_some() && c.tls == ListenerTls::None {
                return Err(invalid(
                    span,
                    "listener.tls",
                    "a certificate is configured but tls = \"none\"; set tls = \"starttls\" or \"implicit\"".into(),
                ));
            }
            listeners.push(Listener {
                protocol: c.protocol,
                bind,
                tls: c.tls,
                cert,
                allow_plaintext_login: c.allow_plaintext_login,
            });
        }

        let mut providers = BTreeMap::new();
        for (name, p) in &raw.providers {
            let resolved = provider::resolve(name, p.get_ref()).map_err(|e| {
                invalid(
                    p.span(),
                    &format!("providers.{name}.{}", e.field),
                    e.message,
                )
            })?;
            providers.insert(name.clone(), resolved);
        }

        let mut seen = std::collections::HashSet::new();
        for a in &raw.accounts {
            let c = a.get_ref();
            let span = a.span();
            if !providers.contains_key(&c.provider) {
                let known: Vec<&str> = providers.keys().map(String::as_str).collect();
                return Err(invalid(
                    span,
                    "account.provider",
                    format!(
                        "no provider named `{}` (configured: {})",
                        c.provider,
                        if known.is_empty() {
                            "none".to_string()
                        } else {
                            known.join(", ")
                        }
                    ),
                ));
            }
            let user = c.user.trim();
            if user.is_empty() || user.chars().any(|ch| ch.is_control() || ch == ' ') {
                return Err(invalid(
                    span,
                    "account.user",
                    "the login name must be non-empty, without spaces or control characters".into(),
                ));
            }
            if let Some(domain) = user.strip_prefix("*@") {
                if domain.is_empty() || domain.contains('@') || domain.contains('*') {
                    return Err(invalid(
                        span,
                        "account.user",
                        format!("`{user}` is not a valid catch-all; write `*@example.com`"),
                    ));
                }
                if c.upstream_user.is_some() {
                    return Err(invalid(
                        span,
                        "account.upstream_user",
                        "a catch-all account logs in upstream with the name the client typed; remove upstream_user".into(),
                    ));
                }
            } else if user.contains('*') {
                return Err(invalid(
                    span,
                    "account.user",
                    format!(
                        "`{user}`: `*` is only allowed as a whole local part, as in `*@example.com`"
                    ),
                ));
            }
            if providers
                .get(&c.provider)
                .map(|p| p.imap.is_none())
                .unwrap_or(true)
                && raw
                    .listeners
                    .iter()
                    .any(|l| l.get_ref().protocol == Protocol::Imap)
            {
                return Err(invalid(
                    span,
                    "account.provider",
                    format!(
                        "provider `{}` has no IMAP server; add [providers.{}.imap] with host and port",
                        c.provider, c.provider
                    ),
                ));
            }
            if let Some(p) = providers.get(&c.provider) {
                let missing = match c.grant {
                    GrantKind::ClientCredentials
                        if p.client_secret.is_none() && p.client_certificate.is_none() =>
                    {
                        Some(
                            "grant = \"client_credentials\" needs client_secret (or client_certificate_file and client_key_file) on the provider",
                        )
                    }
                    GrantKind::ServiceAccount if p.service_account_key_file.is_none() => Some(
                        "grant = \"service_account\" needs service_account_key_file on the provider",
                    ),
                    GrantKind::ServiceAccount if p.scopes.is_empty() => Some(
                        "grant = \"service_account\" needs scopes on the provider (Google: https://mail.google.com/)",
                    ),
                    _ => None,
                };
                if let Some(m) = missing {
                    return Err(invalid(span, "account.grant", m.to_string()));
                }
                if c.authorize_on_login && c.grant != GrantKind::AuthorizationCode {
                    return Err(invalid(
                        span,
                        "account.authorize_on_login",
                        "authorize_on_login works with grant = \"authorization_code\" only (the person signing in proves the mailbox is theirs)".into(),
                    ));
                }
            }
            if !seen.insert(user.to_lowercase()) {
                return Err(invalid(
                    span,
                    "account.user",
                    format!("`{user}` is configured twice"),
                ));
            }
        }

        Ok(Settings {
            server: raw.server,
            listeners,
            providers,
            accounts: raw.accounts.into_iter().map(Spanned::into_inner).collect(),
        })
    }

    /// Reads the endpoints of `oidc` / `open` providers from their issuers.
    pub async fn discover(&mut self, http: &reqwest::Client) -> Result<(), String> {
        for p in self.providers.values_mut() {
            p.discover(http).await?;
        }
        Ok(())
    }

    /// Finds the account for a login name: an exact match (case-insensitive)
    /// first, then a catch-all for the name's domain.
    pub fn account_for(&self, login: &str) -> Option<Account> {
        let login = login.trim();
        if login.is_empty() {
            return None;
        }
        if let Some(a) = self
            .accounts
            .iter()
            .find(|a| a.user.eq_ignore_ascii_case(login))
        {
            return Some(Account {
                name: a.user.to_lowercase(),
                provider: a.provider.clone(),
                upstream_user: a.upstream_user.clone().unwrap_or_else(|| a.user.clone()),
                grant: a.grant,
                authorize_on_login: a.authorize_on_login,
            });
        }
        let (local, domain) = login.rsplit_once('@')?;
        if local.is_empty() || local.contains('*') {
            return None;
        }
        self.accounts
            .iter()
            .find(|a| {
                a.user
                    .strip_prefix("*@")
                    .is_some_and(|d| d.eq_ignore_ascii_case(domain))
            })
            .map(|a| Account {
                name: login.to_lowercase(),
                provider: a.provider.clone(),
                upstream_user: login.to_string(),
                grant: a.grant,
                authorize_on_login: a.authorize_on_login,
            })
    }
}

/// 1-based line number of a byte offset.
fn line_of(text: &str, offset: usize) -> usize {
    let offset = offset.min(text.len());
    text.as_bytes()[..offset]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

pub(crate) use defaults::mechanisms as default_mechanisms;

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[[listener]]
protocol = "imap"
bind = "127.0.0.1:1143"

[providers.corp]
preset = "microsoft"
client_id = "00000000-0000-0000-0000-000000000000"

[[account]]
user = "alice@example.com"
provider = "corp"
upstream_user = "alice@contoso.com"

[[account]]
user = "*@shop.example"
provider = "corp"
"#;

    #[test]
    fn example_config_parses() {
        let text = include_str!("../config.example.toml");
        let s = Settings::parse(text, "config.example.toml").expect("example config parses");
        assert!(!s.listeners.is_empty());
        assert!(!s.accounts.is_empty());
    }

    #[test]
    fn minimal_config_and_account_lookup() {
        let s = Settings::parse(MINIMAL, "t.toml").unwrap();
        let a = s.account_for("ALICE@example.com").unwrap();
        assert_eq!(a.name, "alice@example.com");
        assert_eq!(a.upstream_user, "alice@contoso.com");
        let b = s.account_for("Printer@Shop.example").unwrap();
        assert_eq!(b.name, "printer@shop.example");
        assert_eq!(b.upstream_user, "Printer@Shop.example");
        assert!(s.account_for("bob@other.example").is_none());
        assert!(s.account_for("@shop.example").is_none());
        assert!(s.listeners[0].plaintext_login_allowed());
    }

    #[test]
    fn unknown_field_is_refused_with_its_line() {
        let text = MINIMAL.replace(
            "bind = \"127.0.0.1:1143\"",
            "bind = \"127.0.0.1:1143\"\nport = 3",
        );
        let e = Settings::parse(&text, "t.toml").unwrap_err().to_string();
        assert!(e.contains("line 5"), "{e}");
        assert!(e.contains("port"), "{e}");
    }

    #[test]
    fn bad_bind_is_refused_with_its_line() {
        let text = MINIMAL.replace("127.0.0.1:1143", "localhost");
        let e = Settings::parse(&text, "t.toml").unwrap_err().to_string();
        assert!(e.contains("line 2") && e.contains("listener.bind"), "{e}");
    }

    #[test]
    fn unknown_provider_is_refused() {
        let text = MINIMAL.replace(
            "provider = \"corp\"\nupstream_user",
            "provider = \"nope\"\nupstream_user",
        );
        let e = Settings::parse(&text, "t.toml").unwrap_err().to_string();
        assert!(
            e.contains("no provider named `nope`") && e.contains("line 10"),
            "{e}"
        );
    }

    #[test]
    fn non_loopback_plain_listener_refuses_plaintext_login() {
        let text = MINIMAL.replace("127.0.0.1:1143", "0.0.0.0:1143");
        let s = Settings::parse(&text, "t.toml").unwrap();
        assert!(!s.listeners[0].plaintext_login_allowed());
    }
}
