//! The validated configuration: [`Settings`] built from the schema with
//! presets applied (through [`crate::provider`]), errors with line
//! numbers, and the account lookup logins use.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};

use toml::Spanned;

use super::schema::{
    AccountConfig, AlertsConfig, Config, GrantKind, ListenerTls, Protocol, ServerConfig,
};
use crate::provider::{self, DiscoveryError, Provider};

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

/// A validated `[[device]]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Device {
    /// For logs and the queue.
    pub name: String,
    /// Where it sends from.
    pub from: Vec<ipnet::IpNet>,
    /// The account it sends as (the `[[account]]`'s `user`).
    pub account: String,
    /// Store and forward.
    pub spool: bool,
    /// Report permanent failures to the sender.
    pub bounce: bool,
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
    /// `[alerts]`, checked.
    pub alerts: AlertsConfig,
    /// `[server] local_networks`, parsed.
    pub local_networks: Vec<ipnet::IpNet>,
    /// `[server] trusted_proxies`, parsed.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// `[[device]]` entries, checked, in order (the first match wins).
    pub devices: Vec<Device>,
    /// `[spool]`.
    pub spool: super::schema::SpoolConfig,
    /// `[status]`: the address, and the token file if any.
    pub status: Option<(SocketAddr, Option<PathBuf>)>,
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
    /// See [`super::schema::ListenerConfig::allow_plaintext_login`].
    pub allow_plaintext_login: bool,
    /// See [`super::schema::ListenerConfig::proxy_protocol`].
    pub proxy_protocol: bool,
    /// SMTP: store and forward after AUTH.
    pub spool: bool,
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
    /// Whether the spool lives in the `[server] store` database: asked
    /// for, or by default when there is one and no `[spool] dir`.
    pub fn spool_in_database(&self) -> bool {
        use super::schema::SpoolStore;
        match self.spool.store {
            Some(SpoolStore::Database) => true,
            Some(SpoolStore::Disk) => false,
            None => self.server.store.is_some() && self.spool.dir.is_none(),
        }
    }

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
            if c.spool && c.protocol != Protocol::Smtp {
                return Err(invalid(
                    span,
                    "listener.spool",
                    "only an SMTP listener can store and forward".into(),
                ));
            }
            if c.spool && raw.server.key_mode != super::schema::KeyMode::Service {
                return Err(invalid(
                    span,
                    "listener.spool",
                    "store and forward delivers later, when no client password is at hand: set key_mode = \"service\" in [server]".into(),
                ));
            }
            listeners.push(Listener {
                protocol: c.protocol,
                bind,
                tls: c.tls,
                cert,
                allow_plaintext_login: c.allow_plaintext_login,
                proxy_protocol: c.proxy_protocol,
                spool: c.spool,
            });
        }

        if listeners.is_empty() {
            return Err(invalid(
                0..0,
                "listener",
                if text.trim().is_empty() {
                    "the file is empty: mailbridge would serve nothing; add a [[listener]], a [providers.NAME] and an [[account]] (see config.example.toml)".into()
                } else {
                    "no [[listener]] is configured, so mailbridge would serve nothing; add one, e.g. [[listener]] protocol = \"imap\" bind = \"127.0.0.1:1143\"".into()
                },
            ));
        }
        for (i, l) in listeners.iter().enumerate() {
            if let Some(first) = listeners[..i]
                .iter()
                .find(|o| binds_overlap(o.bind, l.bind))
            {
                return Err(invalid(
                    raw.listeners[i].span(),
                    "listener.bind",
                    format!(
                        "{} overlaps {} of an earlier listener ({}): two sockets cannot listen on one address and port; give each listener its own port",
                        l.bind,
                        first.bind,
                        first.protocol.name()
                    ),
                ));
            }
        }

        let mut providers = BTreeMap::new();
        for (name, p) in &raw.providers {
            let resolved = provider::resolve(name, p.get_ref()).map_err(|e| {
                let key = e.field.rsplit('.').next().unwrap_or(&e.field);
                let at = key_in_span(text, p.span(), key);
                invalid(at..at, &format!("providers.{name}.{}", e.field), e.message)
            })?;
            // Read now, so a file without a certificate fails here (and in
            // `check-config`) rather than at the first login.
            if let Some(ca) = &resolved.ca_file {
                crate::net::tls::check_ca_file(ca).map_err(|e| {
                    let at = key_in_span(text, p.span(), "ca_file");
                    invalid(
                        at..at,
                        &format!("providers.{name}.ca_file"),
                        format!("{e}; it must hold the CA certificate(s) in PEM form (-----BEGIN CERTIFICATE-----)"),
                    )
                })?;
            }
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

        let alerts = match raw.alerts {
            Some(a) => {
                let span = a.span();
                let a = a.into_inner();
                check_alerts(&a)
                    .map_err(|(field, m)| invalid(span.clone(), &format!("alerts.{field}"), m))?;
                a
            }
            None => AlertsConfig::default(),
        };

        check_server(&raw.server).map_err(|(key, m)| {
            let at = key_offset(text, "server", key);
            invalid(at..at, &format!("server.{key}"), m)
        })?;
        // The database's CA and password files, read as `run` reads them.
        if raw.server.store.is_some() {
            if let Some(ca) = &raw.server.store_ca_file {
                crate::net::tls::check_ca_file(ca).map_err(|e| {
                    let at = key_offset(text, "server", "store_ca_file");
                    invalid(
                        at..at,
                        "server.store_ca_file",
                        format!("{e}; it must hold the CA certificate(s) in PEM form (-----BEGIN CERTIFICATE-----)"),
                    )
                })?;
            }
            if let Some(pw) = &raw.server.store_password_file
                && let Err(e) = std::fs::metadata(pw)
            {
                let at = key_offset(text, "server", "store_password_file");
                return Err(invalid(
                    at..at,
                    "server.store_password_file",
                    format!("cannot read {}: {e}", pw.display()),
                ));
            }
        }
        check_spool(&raw.spool, raw.server.store.is_some()).map_err(|(key, m)| {
            let at = key_offset(text, "spool", key);
            invalid(at..at, &format!("spool.{key}"), m)
        })?;

        let mut local_networks = Vec::new();
        for entry in &raw.server.local_networks {
            let net = parse_network(entry).ok_or_else(|| {
                let at = key_offset(text, "server", "local_networks");
                invalid(
                    at..at,
                    "server.local_networks",
                    format!(
                        "`{entry}` is not an address or network (e.g. 127.0.0.1, ::1 or 192.168.1.0/24)"
                    ),
                )
            })?;
            local_networks.push(net);
        }

        let mut trusted_proxies = Vec::new();
        for entry in &raw.server.trusted_proxies {
            let net = parse_network(entry).ok_or_else(|| {
                let at = text.find("trusted_proxies").unwrap_or(0);
                invalid(
                    at..at,
                    "server.trusted_proxies",
                    format!(
                        "`{entry}` is not an address or network (e.g. 127.0.0.1, ::1 or 10.0.0.0/24)"
                    ),
                )
            })?;
            trusted_proxies.push(net);
        }
        if trusted_proxies.is_empty()
            && let Some(l) = raw.listeners.iter().find(|l| l.get_ref().proxy_protocol)
        {
            return Err(invalid(
                l.span(),
                "listener.proxy_protocol",
                "proxy_protocol = true needs the addresses of the proxies allowed to send the header: set [server] trusted_proxies (e.g. [\"127.0.0.1\"] for haproxy on this machine)".into(),
            ));
        }

        let mut devices = Vec::new();
        for d in &raw.devices {
            let span = d.span();
            let c = d.get_ref();
            if raw.server.key_mode != super::schema::KeyMode::Service {
                return Err(invalid(
                    span,
                    "device",
                    "a device sends without a password, so mailbridge must open the account's grant itself: set key_mode = \"service\" in [server] (with a key file or systemd credential)".into(),
                ));
            }
            let Some(account) = raw
                .accounts
                .iter()
                .map(|a| a.get_ref())
                .find(|a| a.user.eq_ignore_ascii_case(c.account.trim()))
            else {
                return Err(invalid(
                    span,
                    "device.account",
                    format!("no [[account]] with user = \"{}\"", c.account),
                ));
            };
            if account.user.starts_with("*@") {
                return Err(invalid(
                    span,
                    "device.account",
                    "a device sends as one mailbox, not a catch-all".into(),
                ));
            }
            if c.from.is_empty() {
                return Err(invalid(
                    span,
                    "device.from",
                    "list the device's address (e.g. \"192.168.1.50\") or network (\"192.168.1.0/28\")".into(),
                ));
            }
            let mut from = Vec::new();
            for entry in &c.from {
                from.push(parse_network(entry).ok_or_else(|| {
                    invalid(
                        span.clone(),
                        "device.from",
                        format!("`{entry}` is not an address or network (e.g. 192.168.1.50 or 192.168.1.0/28)"),
                    )
                })?);
            }
            devices.push(Device {
                name: c.name.clone().unwrap_or_else(|| c.from[0].clone()),
                from,
                account: account.user.to_lowercase(),
                spool: c.spool,
                bounce: c.bounce,
            });
        }

        let status = match &raw.status {
            None => None,
            Some(c) => {
                let at = text.find("[status]").unwrap_or(0);
                let bind: SocketAddr = c.bind.parse().map_err(|_| {
                    invalid(
                        at..at,
                        "status.bind",
                        format!(
                            "`{}` is not an IP:port address (e.g. 127.0.0.1:8025)",
                            c.bind
                        ),
                    )
                })?;
                if !bind.ip().is_loopback() && c.token_file.is_none() {
                    return Err(invalid(
                        at..at,
                        "status.token_file",
                        format!(
                            "the status page on {bind} would be open to the network: set token_file (a file with a secret token) or bind to 127.0.0.1"
                        ),
                    ));
                }
                Some((bind, c.token_file.clone()))
            }
        };

        Ok(Settings {
            alerts,
            local_networks,
            trusted_proxies,
            devices,
            status,
            spool: raw.spool,
            server: raw.server,
            listeners,
            providers,
            accounts: raw.accounts.into_iter().map(Spanned::into_inner).collect(),
        })
    }

    /// Things that are allowed but that a person should know, for
    /// `check-config` and the log at start.
    pub fn notes(&self) -> Vec<String> {
        let mut notes = Vec::new();
        for l in &self.listeners {
            if l.protocol == Protocol::Smtp
                && l.tls == ListenerTls::None
                && !l.bind.ip().is_loopback()
                && !l.allow_plaintext_login
                && self.devices.is_empty()
            {
                notes.push(format!(
                    "the SMTP listener on {} is plain text on a non-loopback address: clients there can neither log in (no allow_plaintext_login) nor send as a [[device]] (none configured), so it serves nobody",
                    l.bind
                ));
            }
        }
        let local: Vec<String> = self.local_networks.iter().map(|n| n.to_string()).collect();
        for a in self.accounts.iter().filter(|a| a.authorize_on_login) {
            notes.push(format!(
                "account `{}`: authorize_on_login acts only for clients in local_networks ({}); a login from elsewhere is refused like a wrong password until the account is added (`mailbridge account add {}`)",
                a.user,
                if local.is_empty() { "none".to_string() } else { local.join(", ") },
                a.user
            ));
        }
        notes
    }

    /// The `[[device]]` a client at `ip` is, if any.
    pub fn device_for(&self, ip: std::net::IpAddr) -> Option<&Device> {
        let ip = ip.to_canonical();
        self.devices
            .iter()
            .find(|d| d.from.iter().any(|n| n.contains(&ip)))
    }

    /// The envelope senders a device sending as `account` may use: its
    /// upstream address, its login name and its `send_as` list.
    pub fn senders_for(&self, account: &str) -> Vec<String> {
        let Some(a) = self
            .accounts
            .iter()
            .find(|a| a.user.eq_ignore_ascii_case(account))
        else {
            return Vec::new();
        };
        let mut out = vec![a.upstream_user.clone().unwrap_or_else(|| a.user.clone())];
        out.push(a.user.clone());
        out.extend(a.send_as.iter().cloned());
        let mut seen = std::collections::HashSet::new();
        out.retain(|s| seen.insert(s.to_lowercase()));
        out
    }

    /// Whether a client at `ip` is this machine's own user (see
    /// `[server] local_networks`).
    pub fn is_local_client(&self, ip: std::net::IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.local_networks.iter().any(|n| n.contains(&ip))
    }

    /// Reads the endpoints of `oidc` / `open` providers from their issuers.
    pub async fn discover(&mut self, http: &reqwest::Client) -> Result<(), DiscoveryError> {
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

/// What makes an `[alerts]` table unusable: the field and what to do.
fn check_alerts(a: &AlertsConfig) -> Result<(), (&'static str, String)> {
    if let Some(program) = a.command.first()
        && program.trim().is_empty()
    {
        return Err((
            "command",
            "the first element is the program to run; it is empty".into(),
        ));
    }
    if let Some(url) = &a.webhook_url {
        let parsed = reqwest::Url::parse(url).map_err(|e| {
            (
                "webhook_url",
                format!("`{url}` is not a URL ({e}); write https://host/path"),
            )
        })?;
        let host = parsed.host_str().unwrap_or("");
        let loopback = host.eq_ignore_ascii_case("localhost")
            || host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        match parsed.scheme() {
            "https" => {}
            "http" if loopback => {}
            _ => {
                return Err((
                    "webhook_url",
                    format!(
                        "`{url}`: alerts go out over https (plain http only to a loopback address)"
                    ),
                ));
            }
        }
    }
    if a.webhook_url.is_none() && (a.webhook_ca_file.is_some() || a.webhook_secret_file.is_some()) {
        return Err((
            "webhook_url",
            "webhook_ca_file and webhook_secret_file need webhook_url".into(),
        ));
    }
    if let Some(h) = &a.webhook_secret_header {
        if a.webhook_secret_file.is_none() {
            return Err((
                "webhook_secret_header",
                "the header carries the secret of webhook_secret_file; set that too".into(),
            ));
        }
        if reqwest::header::HeaderName::from_bytes(h.as_bytes()).is_err() {
            return Err((
                "webhook_secret_header",
                format!("`{h}` is not an HTTP header name"),
            ));
        }
    }
    for (field, value) in [
        ("command_timeout_secs", a.command_timeout_secs),
        ("webhook_timeout_secs", a.webhook_timeout_secs),
        ("password_storm_window_secs", a.password_storm_window_secs),
        (
            "password_storm_failures",
            u64::from(a.password_storm_failures),
        ),
    ] {
        if value == 0 {
            return Err((field, "must be at least 1".into()));
        }
    }
    if a.unused_warn_days >= 90 {
        return Err((
            "unused_warn_days",
            "Microsoft ends a grant unused for 90 days, so the warning must come before: at most 89".into(),
        ));
    }
    Ok(())
}

/// What makes `[server]` unusable: the key and what to do. Values that
/// would make every login fail, or that were silently raised before, are
/// refused with the allowed range.
fn check_server(s: &ServerConfig) -> Result<(), (&'static str, String)> {
    if s.hostname.trim().is_empty() || s.hostname.chars().any(|c| c.is_whitespace()) {
        return Err((
            "hostname",
            "the name for SMTP greetings must be one word without spaces, e.g. mail.example.com"
                .into(),
        ));
    }
    let at_least_one: [(&'static str, u64, &str); 10] = [
        (
            "max_connections",
            s.max_connections as u64,
            "connections served at once over all listeners",
        ),
        (
            "preauth_timeout_secs",
            s.preauth_timeout_secs,
            "seconds of silence allowed before login",
        ),
        (
            "preauth_deadline_secs",
            s.preauth_deadline_secs,
            "seconds from connect to login",
        ),
        (
            "preauth_max_commands",
            u64::from(s.preauth_max_commands),
            "commands before login",
        ),
        (
            "preauth_max_failed_logins",
            u64::from(s.preauth_max_failed_logins),
            "failed logins per connection",
        ),
        (
            "relay_idle_timeout_secs",
            s.relay_idle_timeout_secs,
            "seconds a session may be idle",
        ),
        (
            "connect_timeout_secs",
            s.connect_timeout_secs,
            "seconds for connect and TLS upstream",
        ),
        (
            "login_timeout_secs",
            s.login_timeout_secs,
            "seconds for the upstream login",
        ),
        (
            "refresh_timeout_secs",
            s.refresh_timeout_secs,
            "seconds a token request may take",
        ),
        (
            "background_refresh_secs",
            s.background_refresh_secs,
            "seconds between background refreshes",
        ),
    ];
    for (key, value, what) in at_least_one {
        if value == 0 {
            return Err((
                key,
                format!(
                    "0 would make mailbridge unusable; it is the number of {what} and must be at least 1"
                ),
            ));
        }
    }
    crate::store::seal::check_kdf_limits(s.kdf_memory_kib, s.kdf_iterations)
        .map_err(|(key, m)| (key, m.to_string()))?;
    Ok(())
}

/// What makes `[spool]` unusable: the key and what to do.
fn check_spool(
    s: &super::schema::SpoolConfig,
    database: bool,
) -> Result<(), (&'static str, String)> {
    use super::schema::SpoolStore;
    match s.store {
        Some(SpoolStore::Database) if !database => {
            return Err((
                "store",
                "the spool can live in the database only when `[server] store = \"postgres://...\"` names one; set that, or `store = \"disk\"`".into(),
            ));
        }
        Some(SpoolStore::Database) if s.dir.is_some() => {
            return Err((
                "store",
                "`dir` is for a spool on disk; remove it, or set `store = \"disk\"`".into(),
            ));
        }
        _ => {}
    }
    for (key, value) in [
        ("max_age_hours", s.max_age_hours),
        ("rate_per_minute", u64::from(s.rate_per_minute)),
        ("retry_base_secs", s.retry_base_secs),
        ("retry_max_secs", s.retry_max_secs),
    ] {
        if value == 0 {
            return Err((key, "must be at least 1".into()));
        }
    }
    Ok(())
}

/// Whether two listening addresses cannot both be bound: the same port
/// (0 picks a free one, so never) and the same address, or a wildcard
/// covering the other (`0.0.0.0` covers IPv4; `[::]` covers IPv6 and, on
/// a dual-stack system, IPv4 too).
fn binds_overlap(a: SocketAddr, b: SocketAddr) -> bool {
    if a.port() != b.port() || a.port() == 0 {
        return false;
    }
    let (a, b) = (a.ip(), b.ip());
    a == b
        || (a.is_ipv4() == b.is_ipv4() && (a.is_unspecified() || b.is_unspecified()))
        || (a.is_ipv6() && a.is_unspecified())
        || (b.is_ipv6() && b.is_unspecified())
}

/// Byte offset, in `text`, of the line setting `key` in the `[table]`
/// section, else of the `[table]` header, else 0: for the tables that are
/// not `Spanned`.
fn key_offset(text: &str, table: &str, key: &str) -> usize {
    let mut current = String::new();
    let mut header = None;
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        let t = line.trim_start();
        if let Some(rest) = t.strip_prefix('[') {
            current = rest
                .trim_start_matches('[')
                .split(']')
                .next()
                .unwrap_or("")
                .trim()
                .to_string();
            if current == table && header.is_none() {
                header = Some(offset);
            }
        } else if current == table && sets_key(t, key) {
            return offset;
        }
        offset += line.len();
    }
    header.unwrap_or(0)
}

/// Byte offset of the line setting `key` in the table that starts at
/// `span` (a table's span may cover its header only: the search runs to
/// the next header), else the span's start.
fn key_in_span(text: &str, span: Range<usize>, key: &str) -> usize {
    let start = span.start.min(text.len());
    let mut offset = start;
    for (i, line) in text[start..].split_inclusive('\n').enumerate() {
        let t = line.trim_start();
        if i > 0 && t.starts_with('[') {
            break;
        }
        if sets_key(t, key) {
            return offset;
        }
        offset += line.len();
    }
    start
}

/// Whether a (left-trimmed) line is `key = ...`.
fn sets_key(line: &str, key: &str) -> bool {
    line.strip_prefix(key)
        .is_some_and(|rest| rest.trim_start().starts_with('='))
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

impl ServerConfig {
    /// The state directory in force.
    pub fn state_dir(&self) -> PathBuf {
        self.state_dir
            .clone()
            .unwrap_or_else(crate::store::default_state_dir)
    }
}

/// An address (`192.0.2.7`, `::1`) or a network in CIDR form
/// (`192.168.1.0/24`); host bits set in a network are an error, since
/// `192.168.1.5/24` usually means a typo.
pub fn parse_network(entry: &str) -> Option<ipnet::IpNet> {
    let entry = entry.trim();
    if let Ok(ip) = entry.parse::<std::net::IpAddr>() {
        return Some(ipnet::IpNet::from(ip));
    }
    let net: ipnet::IpNet = entry.parse().ok()?;
    (net.trunc() == net).then_some(net)
}

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
    fn local_networks_and_connection_shares() {
        let s = Settings::parse(MINIMAL, "t").expect("parses");
        assert!(s.is_local_client("127.0.0.1".parse().unwrap()));
        assert!(s.is_local_client("::1".parse().unwrap()));
        assert!(s.is_local_client("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!s.is_local_client("127.0.0.2".parse().unwrap()));
        assert!(!s.is_local_client("192.168.1.20".parse().unwrap()));
        assert_eq!(s.server.per_address_limit(), 125);

        let text = format!(
            "[server]\nlocal_networks = [\"192.168.1.0/24\", \"10.0.0.7\"]\nmax_connections = 20\n{MINIMAL}"
        );
        let s = Settings::parse(&text, "t").expect("parses");
        assert!(s.is_local_client("192.168.1.20".parse().unwrap()));
        assert!(s.is_local_client("10.0.0.7".parse().unwrap()));
        assert!(!s.is_local_client("127.0.0.1".parse().unwrap()));
        assert_eq!(s.server.per_address_limit(), 8);

        for bad in ["192.168.1.5/24", "localhost", "10.0.0.0/33"] {
            let text = format!("[server]\nlocal_networks = [\"{bad}\"]\n{MINIMAL}");
            let e = Settings::parse(&text, "t").expect_err(bad).to_string();
            assert!(
                e.contains("server.local_networks") && e.contains(bad),
                "{e}"
            );
        }
    }

    #[test]
    fn proxy_protocol_needs_trusted_proxies() {
        let with_proxy = MINIMAL.replace(
            "bind = \"127.0.0.1:1143\"",
            "bind = \"127.0.0.1:1143\"\nproxy_protocol = true",
        );
        let e = Settings::parse(&with_proxy, "t").expect_err("no trusted proxies");
        let e = e.to_string();
        assert!(
            e.contains("listener.proxy_protocol") && e.contains("trusted_proxies"),
            "{e}"
        );
        let text =
            format!("[server]\ntrusted_proxies = [\"127.0.0.1\", \"10.1.0.0/16\"]\n{with_proxy}");
        let s = Settings::parse(&text, "t").expect("parses");
        assert!(s.listeners[0].proxy_protocol);
        assert_eq!(
            s.trusted_proxies,
            vec![
                "127.0.0.1/32".parse::<ipnet::IpNet>().unwrap(),
                "10.1.0.0/16".parse().unwrap()
            ]
        );
        let s = Settings::parse(MINIMAL, "t").expect("parses");
        assert!(!s.listeners[0].proxy_protocol && s.trusted_proxies.is_empty());
        let text = format!("[server]\ntrusted_proxies = [\"10.1.0.1/16\"]\n{with_proxy}");
        let e = Settings::parse(&text, "t")
            .expect_err("host bits")
            .to_string();
        assert!(e.contains("server.trusted_proxies"), "{e}");
    }

    #[test]
    fn devices_need_service_mode_and_a_known_account() {
        let device = "\n[[device]]\nfrom = [\"192.168.1.50\", \"10.1.0.0/24\"]\naccount = \"Alice@Example.com\"\n";
        let text = format!("{MINIMAL}{device}");
        let e = Settings::parse(&text, "t")
            .expect_err("password mode")
            .to_string();
        assert!(e.contains("key_mode = \"service\""), "{e}");
        let service = format!("[server]\nkey_mode = \"service\"\n{MINIMAL}");
        let s = Settings::parse(&format!("{service}{device}"), "t").expect("parses");
        let d = s
            .device_for("10.1.0.9".parse().unwrap())
            .expect("in the network");
        assert_eq!(d.account, "alice@example.com");
        assert!(d.spool, "spooling is the default");
        assert!(s.device_for("192.168.1.51".parse().unwrap()).is_none());
        assert_eq!(
            s.senders_for("alice@example.com"),
            ["alice@contoso.com", "alice@example.com"]
        );
        let bad = device.replace("Alice@Example.com", "bob@example.com");
        let e = Settings::parse(&format!("{service}{bad}"), "t").expect_err("unknown account");
        assert!(e.to_string().contains("no [[account]]"), "{e}");
        let bad = device.replace("Alice@Example.com", "*@shop.example");
        let e = Settings::parse(&format!("{service}{bad}"), "t").expect_err("catch-all");
        assert!(e.to_string().contains("catch-all"), "{e}");
    }

    #[test]
    fn an_smtp_listener_that_serves_nobody_gets_a_note() {
        let lan = MINIMAL.replace(
            "protocol = \"imap\"\nbind = \"127.0.0.1:1143\"",
            "protocol = \"smtp\"\nbind = \"192.168.1.10:25\"",
        );
        let s = Settings::parse(&lan, "t").expect("parses");
        let notes = s.notes();
        assert!(
            notes
                .iter()
                .any(|n| n.contains("192.168.1.10:25") && n.contains("serves nobody")),
            "{notes:?}"
        );
        let with_device = format!(
            "[server]\nkey_mode = \"service\"\n{lan}\n[[device]]\nfrom = [\"192.168.1.50\"]\naccount = \"alice@example.com\"\n"
        );
        assert!(
            Settings::parse(&with_device, "t")
                .unwrap()
                .notes()
                .is_empty()
        );
    }

    #[test]
    fn authorize_on_login_comes_with_a_note() {
        let text = MINIMAL.replace(
            "upstream_user = \"alice@contoso.com\"",
            "upstream_user = \"alice@contoso.com\"\nauthorize_on_login = true",
        );
        let s = Settings::parse(&text, "t").expect("parses");
        let notes = s.notes();
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert!(
            notes[0].contains(
                "authorize_on_login acts only for clients in local_networks (127.0.0.1/32, ::1/128)"
            ),
            "{notes:?}"
        );
        assert!(Settings::parse(MINIMAL, "t").unwrap().notes().is_empty());
    }

    #[test]
    fn example_config_parses() {
        let text = include_str!("../../config.example.toml");
        let s = Settings::parse(text, "config.example.toml").expect("example config parses");
        assert_eq!(s.server.session_token_min_secs, 1800);
        assert_eq!(s.server.refresh_timeout_secs, 300);
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
    fn alerts_are_checked_with_their_line() {
        let s = Settings::parse(MINIMAL, "t.toml").unwrap();
        assert_eq!(s.alerts, AlertsConfig::default());
        assert_eq!(s.alerts.min_interval_secs, 3600);
        assert_eq!(s.alerts.refresh_failing_secs, 3600);
        let with =
            |extra: &str| Settings::parse(&format!("{MINIMAL}\n[alerts]\n{extra}\n"), "t.toml");
        let ok = with("command = [\"/usr/local/bin/notify\", \"--urgent\"]\nwebhook_url = \"https://hooks.example/x\"").unwrap();
        assert_eq!(ok.alerts.command.len(), 2);
        assert!(with("webhook_url = \"http://127.0.0.1:9/x\"").is_ok());
        for (extra, field) in [
            (
                "webhook_url = \"http://hooks.example/x\"",
                "alerts.webhook_url",
            ),
            ("webhook_url = \"not a url\"", "alerts.webhook_url"),
            ("command = [\"\"]", "alerts.command"),
            ("webhook_ca_file = \"/x.pem\"", "alerts.webhook_url"),
            (
                "webhook_url = \"https://h.example/\"\nwebhook_secret_file = \"/s\"\nwebhook_secret_header = \"bad header\"",
                "alerts.webhook_secret_header",
            ),
            ("unused_warn_days = 90", "alerts.unused_warn_days"),
            (
                "password_storm_failures = 0",
                "alerts.password_storm_failures",
            ),
        ] {
            let e = with(extra).unwrap_err().to_string();
            assert!(e.contains(field) && e.contains("line 19"), "{extra}: {e}");
        }
        let hooked =
            with("webhook_url = \"https://user:pw@hooks.example/services/T0/B0/sekrit?token=x\"")
                .unwrap();
        let shown = format!("{hooked:?}");
        assert!(
            shown.contains("https://hooks.example/...")
                && !shown.contains("sekrit")
                && !shown.contains("pw@"),
            "{shown}"
        );
        let e = with("comand = []").unwrap_err().to_string();
        assert!(e.contains("comand"), "{e}");
    }

    /// The error's field and 1-based line, from `ConfigError::Invalid`.
    fn field_and_line(text: &str) -> (String, usize, String) {
        match Settings::parse(text, "t.toml").expect_err("refused") {
            ConfigError::Invalid {
                field,
                line,
                message,
                ..
            } => (field, line, message),
            other => panic!("not an Invalid error: {other}"),
        }
    }

    #[test]
    fn an_empty_file_or_one_without_listeners_is_refused() {
        for text in ["", "\n# nothing yet\n"] {
            let (field, line, message) = field_and_line(text);
            assert_eq!((field.as_str(), line), ("listener", 1), "{message}");
            assert!(message.contains("serve nothing"), "{message}");
        }
        let no_listener = MINIMAL.replace(
            "[[listener]]\nprotocol = \"imap\"\nbind = \"127.0.0.1:1143\"\n",
            "",
        );
        let (field, line, message) = field_and_line(&no_listener);
        assert_eq!((field.as_str(), line), ("listener", 1), "{message}");
        assert!(message.contains("no [[listener]]"), "{message}");
    }

    #[test]
    fn two_listeners_on_one_address_are_refused_with_the_second_line() {
        let second = |bind: &str| {
            format!("{MINIMAL}\n[[listener]]\nprotocol = \"pop3\"\nbind = \"{bind}\"\n")
        };
        for bind in ["127.0.0.1:1143", "0.0.0.0:1143", "[::]:1143"] {
            let (field, line, message) = field_and_line(&second(bind));
            assert_eq!(
                (field.as_str(), line),
                ("listener.bind", 19),
                "{bind}: {message}"
            );
            assert!(
                message.contains("127.0.0.1:1143") && message.contains("imap"),
                "{message}"
            );
        }
        for bind in ["127.0.0.1:1144", "127.0.0.2:1143", "[::1]:1143"] {
            Settings::parse(&second(bind), "t").expect(bind);
        }
        let any_port = MINIMAL.replace("127.0.0.1:1143", "127.0.0.1:0");
        Settings::parse(
            &format!("{any_port}\n[[listener]]\nprotocol = \"pop3\"\nbind = \"127.0.0.1:0\"\n"),
            "t",
        )
        .expect("port 0 is any free port, twice");
    }

    #[test]
    fn server_values_that_break_logins_are_refused_with_their_line() {
        for (setting, key) in [
            ("login_timeout_secs = 0", "login_timeout_secs"),
            ("max_connections = 0", "max_connections"),
            ("preauth_timeout_secs = 0", "preauth_timeout_secs"),
            ("preauth_deadline_secs = 0", "preauth_deadline_secs"),
            ("preauth_max_commands = 0", "preauth_max_commands"),
            ("preauth_max_failed_logins = 0", "preauth_max_failed_logins"),
            ("relay_idle_timeout_secs = 0", "relay_idle_timeout_secs"),
            ("connect_timeout_secs = 0", "connect_timeout_secs"),
            ("refresh_timeout_secs = 0", "refresh_timeout_secs"),
            ("background_refresh_secs = 0", "background_refresh_secs"),
            ("kdf_memory_kib = 1", "kdf_memory_kib"),
            ("kdf_memory_kib = 5000000", "kdf_memory_kib"),
            ("kdf_iterations = 0", "kdf_iterations"),
            ("hostname = \"\"", "hostname"),
        ] {
            // The key on line 4, after a comment and an unrelated key.
            let text =
                format!("# mailbridge\n[server]\nkey_mode = \"password\"\n{setting}\n{MINIMAL}");
            let (field, line, message) = field_and_line(&text);
            assert_eq!(field, format!("server.{key}"), "{setting}: {message}");
            assert_eq!(line, 4, "{setting}: {message}");
            assert!(
                ["at least 1", " to ", "..=", "one word"]
                    .iter()
                    .any(|said| message.contains(said)),
                "{setting}: the allowed range is said: {message}"
            );
        }
        let e = Settings::parse(
            &format!("[server]\nkdf_memory_kib = 1\n{MINIMAL}"),
            "t.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("t.toml: line 2: server.kdf_memory_kib:")
                && e.contains("8 to 4194304 KiB"),
            "{e}"
        );
        // Values that are fine at their limits.
        let ok = format!(
            "[server]\nkdf_memory_kib = 8\nkdf_iterations = 1\nmax_connections = 1\nlogin_timeout_secs = 1\nshutdown_grace_secs = 0\nsession_token_min_secs = 0\n{MINIMAL}"
        );
        Settings::parse(&ok, "t").expect("limits");
        let spool = format!("{MINIMAL}\n[spool]\nrate_per_minute = 0\n");
        let (field, line, _) = field_and_line(&spool);
        assert_eq!((field.as_str(), line), ("spool.rate_per_minute", 20));
    }

    #[test]
    fn the_spool_goes_to_the_database_only_when_there_is_one() {
        let (field, _, msg) =
            field_and_line(&format!("{MINIMAL}\n[spool]\nstore = \"database\"\n"));
        assert_eq!(field, "spool.store");
        assert!(msg.contains("[server] store"), "{msg}");
        let db = "[server]\nstore = \"postgres://mb@127.0.0.1/mail\"\n";
        let (field, _, msg) = field_and_line(&format!(
            "{db}{MINIMAL}\n[spool]\nstore = \"database\"\ndir = \"/var/spool/x\"\n"
        ));
        assert_eq!(field, "spool.store");
        assert!(msg.contains("dir"), "{msg}");
        let on = |text: &str| Settings::parse(text, "t").unwrap().spool_in_database();
        assert!(!on(MINIMAL));
        assert!(on(&format!("{db}{MINIMAL}")), "by default with a database");
        assert!(!on(&format!(
            "{db}{MINIMAL}\n[spool]\ndir = \"/var/spool/x\"\n"
        )));
        assert!(!on(&format!("{db}{MINIMAL}\n[spool]\nstore = \"disk\"\n")));
        assert!(on(&format!(
            "{db}{MINIMAL}\n[spool]\nstore = \"database\"\n"
        )));
    }

    #[test]
    fn a_ca_file_without_a_certificate_is_refused_with_its_line() {
        let dir = std::env::temp_dir().join(format!("mailbridge-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let text = MINIMAL.replace(
            "client_id = \"00000000-0000-0000-0000-000000000000\"",
            &format!(
                "client_id = \"00000000-0000-0000-0000-000000000000\"\nca_file = \"{}\"",
                empty.display()
            ),
        );
        let (field, line, message) = field_and_line(&text);
        assert_eq!(
            (field.as_str(), line),
            ("providers.corp.ca_file", 9),
            "{message}"
        );
        assert!(
            message.contains("no CERTIFICATE block") && message.contains("PEM"),
            "{message}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn non_loopback_plain_listener_refuses_plaintext_login() {
        let text = MINIMAL.replace("127.0.0.1:1143", "0.0.0.0:1143");
        let s = Settings::parse(&text, "t.toml").unwrap();
        assert!(!s.listeners[0].plaintext_login_allowed());
    }

    #[test]
    fn the_database_files_are_checked_when_the_config_loads() {
        let dir =
            std::env::temp_dir().join(format!("mailbridge-store-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let not_pem = dir.join("not-a-ca.pem");
        std::fs::write(&not_pem, "# nothing here\n").unwrap();
        let config = |extra: &str| {
            format!(
                "[server]\nstore = \"postgres://mb@db.example/mail\"\n{extra}\n\n[[listener]]\nprotocol = \"imap\"\nbind = \"127.0.0.1:1143\"\n"
            )
        };
        let e = Settings::parse(
            &config(&format!("store_ca_file = \"{}\"", not_pem.display())),
            "t.toml",
        )
        .expect_err("no certificate");
        let e = e.to_string();
        assert!(
            e.contains("server.store_ca_file") && e.contains("line 3"),
            "{e}"
        );
        let e = Settings::parse(
            &config(&format!(
                "store_password_file = \"{}\"",
                dir.join("missing").display()
            )),
            "t.toml",
        )
        .expect_err("no password file");
        let e = e.to_string();
        assert!(e.contains("server.store_password_file"), "{e}");
        assert!(Settings::parse(&config(""), "t.toml").is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
