//! The configuration file's schema: the TOML tables as serde structs,
//! their defaults, nothing else.
//!
//! Every struct denies unknown fields, so a typo is an error at start rather
//! than a silently ignored setting. Every field is documented in
//! `config.example.toml`, which a test parses. This module depends on no
//! other module of the crate: [`crate::provider`] builds on it, and
//! [`super::settings`] validates what it parsed.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use secrecy::SecretString;
use serde::Deserialize;
use toml::Spanned;

use mailbridge_proto::sasl::Mechanism;

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
    /// Who hears when a grant needs a person.
    #[serde(default)]
    pub alerts: Option<Spanned<AlertsConfig>>,
    /// LAN devices (scanners, printers, apps) that send mail without AUTH,
    /// recognised by their address.
    #[serde(default, rename = "device")]
    pub devices: Vec<Spanned<DeviceConfig>>,
    /// Where messages from spooling devices wait for delivery.
    #[serde(default)]
    pub spool: SpoolConfig,
    /// The HTTP status page, `/metrics` and `/healthz`.
    #[serde(default)]
    pub status: Option<StatusConfig>,
}

/// `[status]`: an HTTP listener with a status page for people, `/metrics`
/// for Prometheus and `/healthz` for load balancers and watchdogs.
#[derive(Debug, Deserialize, PartialEq, Clone)]
#[serde(deny_unknown_fields)]
pub struct StatusConfig {
    /// Address and port, e.g. `127.0.0.1:8025`. Anything but loopback
    /// needs `token_file`.
    pub bind: String,
    /// A file holding a secret token: the page and `/metrics` then need
    /// `Authorization: Bearer TOKEN` (or `?token=TOKEN` in a browser).
    /// `/healthz` says only whether mailbridge serves, and needs none.
    pub token_file: Option<PathBuf>,
}

/// `[[device]]`: a device on the LAN that may send through the SMTP
/// listeners without AUTH. Needs `key_mode = "service"`: nobody types a
/// password to open the account's grant.
#[derive(Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DeviceConfig {
    /// A name for logs and the queue (default: the first address).
    pub name: Option<String>,
    /// Addresses or networks (CIDR) the device sends from.
    pub from: Vec<String>,
    /// The account it sends as (an `[[account]]`'s `user`).
    pub account: String,
    /// Store and forward (default): the message is on disk before the
    /// device hears `250`, and mailbridge delivers it, retrying. Without
    /// it the device's transaction is relayed live and a refusal upstream
    /// is the device's to handle.
    #[serde(default = "defaults::yes")]
    pub spool: bool,
    /// When a spooled message is refused for good, send a report to its
    /// sender (as the account).
    #[serde(default)]
    pub bounce: bool,
}

/// `[spool] store`: where the queue lives.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SpoolStore {
    /// A directory of this instance (`dir`).
    Disk,
    /// The `[server] store` database, shared by every instance on it.
    Database,
}

/// `[spool]`: the queue of messages from spooling devices.
#[derive(Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SpoolConfig {
    /// On disk or in the database (default: the database when `[server]
    /// store` names one and `dir` is not set; else on disk).
    pub store: Option<SpoolStore>,
    /// Where on disk (default: `<state_dir>/spool`).
    pub dir: Option<PathBuf>,
    /// How long a message is retried before it fails (default 120 hours,
    /// five days, as mail servers do).
    #[serde(default = "defaults::spool_max_age_hours")]
    pub max_age_hours: u64,
    /// Messages per minute sent per account (default 30, Microsoft 365's
    /// limit per mailbox).
    #[serde(default = "defaults::spool_rate")]
    pub rate_per_minute: u32,
    /// Seconds before the first retry of a message that could not go; it
    /// doubles with each attempt (default 60).
    #[serde(default = "defaults::spool_retry_base")]
    pub retry_base_secs: u64,
    /// Longest wait between two attempts (default 3600).
    #[serde(default = "defaults::spool_retry_max")]
    pub retry_max_secs: u64,
}

impl Default for SpoolConfig {
    fn default() -> Self {
        SpoolConfig {
            store: None,
            dir: None,
            max_age_hours: defaults::spool_max_age_hours(),
            rate_per_minute: defaults::spool_rate(),
            retry_base_secs: defaults::spool_retry_base(),
            retry_max_secs: defaults::spool_retry_max(),
        }
    }
}

/// `[alerts]`: a command to run and/or a webhook to call when a grant
/// needs a person (refused by the provider, a rotated token that cannot be
/// saved, refreshes failing for long, a grant about to expire unused, a
/// wrong-password storm). Every alert is logged whether or not either is
/// set.
#[derive(Deserialize, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AlertsConfig {
    /// A program and its arguments, run without a shell for each alert;
    /// the alert is in its environment (`MAILBRIDGE_EVENT`,
    /// `MAILBRIDGE_ACCOUNT`, `MAILBRIDGE_REASON`, `MAILBRIDGE_ADVICE`,
    /// `MAILBRIDGE_TIME`). Empty: none.
    #[serde(default)]
    pub command: Vec<String>,
    /// Seconds the command may run before it is killed.
    #[serde(default = "defaults::alert_command_timeout")]
    pub command_timeout_secs: u64,
    /// An `https://` URL (or `http://` on loopback) that gets each alert as
    /// a JSON POST. Redirects are not followed.
    pub webhook_url: Option<String>,
    /// PEM file of CA certificates to trust for the webhook instead of
    /// the system's.
    pub webhook_ca_file: Option<PathBuf>,
    /// A file whose first line is sent with the webhook: as
    /// `Authorization: Bearer <secret>`, or in `webhook_secret_header`.
    pub webhook_secret_file: Option<PathBuf>,
    /// The header that carries the secret of `webhook_secret_file`
    /// instead of `Authorization: Bearer`.
    pub webhook_secret_header: Option<String>,
    /// Seconds the webhook may take to answer.
    #[serde(default = "defaults::alert_webhook_timeout")]
    pub webhook_timeout_secs: u64,
    /// An account's alert of one kind goes out at most once in this many
    /// seconds (later ones are logged only).
    #[serde(default = "defaults::alert_min_interval")]
    pub min_interval_secs: u64,
    /// Refreshes failing for a temporary reason (provider unreachable,
    /// server errors) raise an alert once they have failed for this many
    /// seconds.
    #[serde(default = "defaults::alert_refresh_failing")]
    pub refresh_failing_secs: u64,
    /// Password key mode, Microsoft: warn this many days after a grant's
    /// last use that a client must log in before Microsoft ends it unused
    /// at 90 days.
    #[serde(default = "defaults::alert_unused_days")]
    pub unused_warn_days: u64,
    /// A wrong-password storm: this many failed logins of one account ...
    #[serde(default = "defaults::alert_storm_failures")]
    pub password_storm_failures: u32,
    /// ... within this many seconds.
    #[serde(default = "defaults::alert_storm_window")]
    pub password_storm_window_secs: u64,
}

/// Shows the webhook's scheme and host only: a webhook URL often carries
/// a secret in its path or query.
impl std::fmt::Debug for AlertsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let webhook = self.webhook_url.as_ref().map(|u| {
            let (scheme, rest) = u.split_once("://").unwrap_or(("", u));
            let host = rest.split(['/', '?', '#']).next().unwrap_or("");
            let host = host.rsplit('@').next().unwrap_or(host);
            format!("{scheme}://{host}/...")
        });
        f.debug_struct("AlertsConfig")
            .field("command", &self.command)
            .field("command_timeout_secs", &self.command_timeout_secs)
            .field("webhook_url", &webhook)
            .field("webhook_ca_file", &self.webhook_ca_file)
            .field("webhook_secret_file", &self.webhook_secret_file)
            .field("webhook_secret_header", &self.webhook_secret_header)
            .field("webhook_timeout_secs", &self.webhook_timeout_secs)
            .field("min_interval_secs", &self.min_interval_secs)
            .field("refresh_failing_secs", &self.refresh_failing_secs)
            .field("unused_warn_days", &self.unused_warn_days)
            .field("password_storm_failures", &self.password_storm_failures)
            .field(
                "password_storm_window_secs",
                &self.password_storm_window_secs,
            )
            .finish()
    }
}

impl Default for AlertsConfig {
    fn default() -> Self {
        AlertsConfig {
            command: Vec::new(),
            command_timeout_secs: defaults::alert_command_timeout(),
            webhook_url: None,
            webhook_ca_file: None,
            webhook_secret_file: None,
            webhook_secret_header: None,
            webhook_timeout_secs: defaults::alert_webhook_timeout(),
            min_interval_secs: defaults::alert_min_interval(),
            refresh_failing_secs: defaults::alert_refresh_failing(),
            unused_warn_days: defaults::alert_unused_days(),
            password_storm_failures: defaults::alert_storm_failures(),
            password_storm_window_secs: defaults::alert_storm_window(),
        }
    }
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
    /// Where grants are kept when not in the state directory's sled
    /// database: a PostgreSQL URL (`postgres://user@host:port/db`), shared
    /// by every instance that names it. Its password (if any) is never
    /// shown: Debug and Display redact it.
    pub store: Option<StoreUrl>,
    /// The database password, read from this file (first line). Else
    /// `MAILBRIDGE_STORE_PASSWORD`, else `PGPASSWORD`, else the URL's.
    pub store_password_file: Option<PathBuf>,
    /// PEM CA certificates that verify the database's TLS certificate
    /// (default: the platform's roots). TLS is used as the URL's
    /// `sslmode` says (`disable`, `prefer`: the default, `require`).
    pub store_ca_file: Option<PathBuf>,
    /// Service key mode: seconds between background refreshes of every
    /// stored grant, so grants outlive long idle periods (Microsoft ends
    /// refresh tokens unused for 90 days). Default: one day.
    #[serde(default = "defaults::background_refresh")]
    pub background_refresh_secs: u64,
    /// The name mailbridge gives in SMTP greetings.
    #[serde(default = "defaults::hostname")]
    pub hostname: String,
    /// Connections served at once, over all listeners; a client beyond it
    /// is told so at once (`* BYE [UNAVAILABLE]`, `421 4.7.0`,
    /// `-ERR [SYS/TEMP]`) and disconnected.
    #[serde(default = "defaults::max_connections")]
    pub max_connections: usize,
    /// Connections served at once from one address (IPv6: one /64),
    /// refused like those beyond `max_connections`. Default (0): an eighth
    /// of `max_connections`, at least 8.
    #[serde(default)]
    pub max_connections_per_address: usize,
    /// Seconds a client may stay silent before logging in.
    #[serde(default = "defaults::preauth_timeout")]
    pub preauth_timeout_secs: u64,
    /// Seconds a connection may take to log in, from its first byte,
    /// whatever it sends meanwhile.
    #[serde(default = "defaults::preauth_deadline")]
    pub preauth_deadline_secs: u64,
    /// Commands (replies and prompts) one connection gets before login.
    #[serde(default = "defaults::preauth_max_commands")]
    pub preauth_max_commands: u32,
    /// Failed logins one connection gets before it is closed.
    #[serde(default = "defaults::preauth_max_failed_logins")]
    pub preauth_max_failed_logins: u32,
    /// Addresses or networks (CIDR) whose clients are this machine's own
    /// user: they are told why a login failed in full (unknown user, no
    /// grant yet, the command that fixes it) and may start an
    /// `authorize_on_login`. Everyone else gets one reply for any wrong
    /// name or password, and the log gets the details.
    #[serde(default = "defaults::local_networks")]
    pub local_networks: Vec<String>,
    /// Addresses or networks (CIDR) of the proxies (haproxy, nginx, a load
    /// balancer) allowed to send a PROXY protocol header to listeners with
    /// `proxy_protocol = true`; their header's client address is then the
    /// one the connection limits, the backoff, `local_networks` and the
    /// logs go by. Empty by default: such a listener needs at least one.
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    /// Seconds a relayed session may see no traffic either way before it
    /// is closed (IMAP IDLE clients re-issue IDLE every 29 minutes).
    #[serde(default = "defaults::relay_idle_timeout")]
    pub relay_idle_timeout_secs: u64,
    /// Seconds for TCP connect plus TLS handshake to an upstream server.
    #[serde(default = "defaults::connect_timeout")]
    pub connect_timeout_secs: u64,
    /// Seconds for the whole upstream login dialogue, token refresh
    /// included. A refresh the login gave up on runs on (see
    /// `refresh_timeout_secs`) and its token is kept.
    #[serde(default = "defaults::login_timeout")]
    pub login_timeout_secs: u64,
    /// Seconds a token request may take before mailbridge gives up on it.
    /// Generous on purpose: a provider that answers late may already have
    /// rotated the refresh token, and abandoning the answer loses the
    /// grant. Shutdown waits up to this long for refreshes in flight.
    #[serde(default = "defaults::refresh_timeout")]
    pub refresh_timeout_secs: u64,
    /// IMAP and POP3 sessions are handed access tokens with at least this
    /// many seconds left (a token that lives less than twice this: half
    /// its life), so long sessions are rarely ended by an expired token.
    /// SMTP keeps a 10-minute floor.
    #[serde(default = "defaults::session_token_min")]
    pub session_token_min_secs: u64,
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
    /// Argon2id runs allowed at once (unlocking grants, checking password
    /// hashes); more wait in arrival order. Each holds `kdf_memory_kib`, so
    /// this bounds the memory a burst of logins can take. 0 (the default):
    /// automatic, `min(CPUs, min(256 MiB, RAM / 8) / kdf_memory_kib)`, at
    /// least 1.
    #[serde(default)]
    pub kdf_concurrency: usize,
    /// How log lines on standard error look: `text` (the default; no
    /// timestamps and a `<6>`-style priority under systemd's journal) or
    /// `json` (one object per line). `MAILBRIDGE_LOG_FORMAT` overrides it.
    #[serde(default)]
    pub log_format: LogFormat,
}

/// The shape of log lines (see [`ServerConfig::log_format`]).
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// For people: one line per event, fields as `key=value`.
    #[default]
    Text,
    /// For log collectors: one JSON object per line.
    Json,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            state_dir: None,
            key_mode: KeyMode::default(),
            key_file: None,
            store: None,
            store_password_file: None,
            store_ca_file: None,
            background_refresh_secs: defaults::background_refresh(),
            hostname: defaults::hostname(),
            max_connections: defaults::max_connections(),
            max_connections_per_address: 0,
            preauth_timeout_secs: defaults::preauth_timeout(),
            preauth_deadline_secs: defaults::preauth_deadline(),
            preauth_max_commands: defaults::preauth_max_commands(),
            preauth_max_failed_logins: defaults::preauth_max_failed_logins(),
            local_networks: defaults::local_networks(),
            trusted_proxies: Vec::new(),
            relay_idle_timeout_secs: defaults::relay_idle_timeout(),
            connect_timeout_secs: defaults::connect_timeout(),
            login_timeout_secs: defaults::login_timeout(),
            refresh_timeout_secs: defaults::refresh_timeout(),
            session_token_min_secs: defaults::session_token_min(),
            shutdown_grace_secs: defaults::shutdown_grace(),
            backoff_base_ms: defaults::backoff_base_ms(),
            backoff_max_secs: defaults::backoff_max_secs(),
            kdf_memory_kib: defaults::kdf_memory_kib(),
            kdf_iterations: defaults::kdf_iterations(),
            kdf_concurrency: 0,
            log_format: LogFormat::default(),
        }
    }
}

impl ServerConfig {
    /// Pre-auth idle timeout.
    pub fn preauth_timeout(&self) -> Duration {
        Duration::from_secs(self.preauth_timeout_secs)
    }
    /// Time from accept to login.
    pub fn preauth_deadline(&self) -> Duration {
        Duration::from_secs(self.preauth_deadline_secs.max(1))
    }
    /// Connections from one address (see `max_connections_per_address`).
    pub fn per_address_limit(&self) -> usize {
        let total = self.max_connections.max(1);
        match self.max_connections_per_address {
            0 => (total / 8).max(8).min(total),
            n => n.min(total),
        }
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
    /// Bound on one token request.
    pub fn refresh_timeout(&self) -> Duration {
        Duration::from_secs(self.refresh_timeout_secs.max(1))
    }
    /// Least life left on a token handed to an IMAP or POP3 session.
    pub fn session_token_min(&self) -> Duration {
        Duration::from_secs(self.session_token_min_secs)
    }
}

mod defaults {
    pub fn alert_command_timeout() -> u64 {
        30
    }
    pub fn alert_webhook_timeout() -> u64 {
        10
    }
    pub fn alert_min_interval() -> u64 {
        3600
    }
    pub fn alert_refresh_failing() -> u64 {
        3600
    }
    pub fn alert_unused_days() -> u64 {
        80
    }
    pub fn alert_storm_failures() -> u32 {
        20
    }
    pub fn alert_storm_window() -> u64 {
        600
    }
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
    pub fn preauth_deadline() -> u64 {
        60
    }
    pub fn yes() -> bool {
        true
    }
    pub fn spool_max_age_hours() -> u64 {
        120
    }
    pub fn spool_rate() -> u32 {
        30
    }
    pub fn spool_retry_base() -> u64 {
        60
    }
    pub fn spool_retry_max() -> u64 {
        3600
    }
    pub fn preauth_max_commands() -> u32 {
        50
    }
    pub fn preauth_max_failed_logins() -> u32 {
        3
    }
    pub fn local_networks() -> Vec<String> {
        vec!["127.0.0.1/32".into(), "::1/128".into()]
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
    pub fn refresh_timeout() -> u64 {
        300
    }
    pub fn session_token_min() -> u64 {
        30 * 60
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
    /// Every connection starts with a PROXY protocol header (v1 or v2, as
    /// haproxy's `send-proxy` / `send-proxy-v2` or nginx's `proxy_protocol
    /// on` send it) from an address in `[server] trusted_proxies`, and
    /// the client address it names is the connection's. A connection from
    /// any other address, or without a valid header within 5 s, is closed.
    /// On an implicit-TLS listener the header comes before the handshake.
    /// Off by default.
    #[serde(default)]
    pub proxy_protocol: bool,
    /// SMTP: store and forward for clients that log in (scanners with a
    /// fixed user name and password that never retry): after AUTH, each
    /// message is written to the spool and acknowledged, then delivered
    /// as the account like a `[[device]]`'s. Needs key_mode = "service".
    #[serde(default)]
    pub spool: bool,
}

/// `[providers.NAME]`: an OAuth2 provider and its mail servers.
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    /// `microsoft`, `google`, `fastmail`, `yahoo`, `aol`, `yandex`, `oidc`,
    /// `open` or `custom` (`provider::Preset::ALL`); presets fill in
    /// endpoints, scopes, servers and mechanisms, and every value below
    /// overrides them.
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
    pub client_secret: Option<SecretString>,
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
    /// More envelope senders a device sending as this account may use
    /// (shared mailboxes it has Send As rights to, say), besides
    /// `upstream_user` and `user`.
    #[serde(default)]
    pub send_as: Vec<String>,
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

/// The mechanisms an endpoint offers when the config lists none.
pub fn default_mechanisms() -> Vec<Mechanism> {
    defaults::mechanisms()
}

/// A database URL for `[server] store` (`postgres://` or
/// `postgresql://`). Debug and Display show it with any password replaced
/// by `***`, so it can be logged; [`StoreUrl::expose`] gives the real one
/// to the database client only.
#[derive(Clone, PartialEq, Eq)]
pub struct StoreUrl(String);

impl StoreUrl {
    /// The URL if it is a PostgreSQL one.
    pub fn parse(s: &str) -> Result<StoreUrl, String> {
        let lower = s.to_ascii_lowercase();
        if lower.starts_with("postgres://") || lower.starts_with("postgresql://") {
            Ok(StoreUrl(s.to_owned()))
        } else {
            Err(format!(
                "store must be a PostgreSQL URL (postgres://user@host:port/database), not `{}`",
                redact_url(s)
            ))
        }
    }

    /// The URL as written, password included: for the database client.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact_url(&self.0))
    }
}

impl fmt::Debug for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StoreUrl({})", redact_url(&self.0))
    }
}

impl<'de> Deserialize<'de> for StoreUrl {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<StoreUrl, D::Error> {
        let s = String::deserialize(d)?;
        StoreUrl::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// `url` with the password of its user part and any `password=` query
/// parameter replaced by `***`.
pub fn redact_url(url: &str) -> String {
    let (scheme, rest) = match url.find("://") {
        Some(i) => url.split_at(i + 3),
        None => ("", url),
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let authority = match authority.rfind('@') {
        Some(at) => {
            let (user, host) = authority.split_at(at);
            match user.find(':') {
                Some(colon) => format!("{}:***{host}", &user[..colon]),
                None => authority.to_owned(),
            }
        }
        None => authority.to_owned(),
    };
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let query: Vec<String> = query
                .split('&')
                .map(|kv| match kv.split_once('=') {
                    Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                    _ => kv.to_owned(),
                })
                .collect();
            format!("{path}?{}", query.join("&"))
        }
        None => tail.to_owned(),
    };
    format!("{scheme}{authority}{tail}")
}
