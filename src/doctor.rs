//! `mailbridge doctor`: walks what a login needs, step by step, and says
//! for each whether it holds, and when not, why and what to do.
//!
//! The steps, in the order they are printed:
//! - `config`: the file loads and validates (as `check-config`), the
//!   service key opens, issuers are discovered, the store opens;
//! - for each mail server the checked accounts use, per protocol of the
//!   configured listeners: `dns`, `tcp`, `tls` (the chain verified as
//!   logins verify it, the name, the expiry), `greeting` and
//!   `capabilities` (the SASL mechanisms offered, STARTTLS), read by the
//!   protocol crate's own upstream login up to where it would want a
//!   token, then a polite logout;
//! - for each account: `grant` (the sealed grant opens, with the local
//!   password or the service key), `refresh` (a new access token from the
//!   provider, through the same token source logins use, so a rotated
//!   refresh token is saved; a refusal explained by `diagnose`'s table),
//!   `token` (Microsoft: `aud` is Outlook and `scp` / `roles` hold what
//!   each protocol needs), and `auth` per protocol: a real login through
//!   [`crate::login::Gateway`], exactly a client's, then logout;
//! - for each provider: `clock`, this machine's clock against the `Date`
//!   of the token endpoint's answer.
//!
//! Nothing printed carries a secret: the steps are built from our own
//! sentences, error messages that never hold one, and token claims that
//! are not secret (`aud`, `scp`).

use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::ClientConfig;
use secrecy::SecretString;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::{KeyMode, Protocol, Settings, UpstreamTls};
use crate::login::Gateway;
use crate::net::stream::Stream;
use crate::net::upstream::UpstreamFailure;
use crate::oauth::{TokenError, TokenSource};
use crate::provider::{Preset, Provider, ServerEndpoint};
use crate::store::TokenStore;
use crate::vault::VaultError;
use mailbridge_proto::{self as proto, FailureKind, UpstreamLogin, UpstreamStep};

/// A step's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// It holds.
    Ok,
    /// It holds, with something a person should know (a certificate that
    /// expires soon, a clock a little off).
    Warn,
    /// It does not hold: logins fail because of it.
    Fail,
    /// Not checked: an earlier step failed, or it does not apply.
    Skip,
}

impl Verdict {
    fn label(self) -> &'static str {
        match self {
            Verdict::Ok => "ok",
            Verdict::Warn => "warn",
            Verdict::Fail => "FAIL",
            Verdict::Skip => "skip",
        }
    }
}

/// One checked step.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    /// What was checked: `config`, `store`, `account`, `dns`, `tcp`,
    /// `tls`, `greeting`, `capabilities`, `grant`, `refresh`, `token`,
    /// `auth`, `clock`.
    pub check: &'static str,
    /// The outcome.
    pub verdict: Verdict,
    /// The account, for account steps.
    pub account: Option<String>,
    /// The provider, for server, account and clock steps.
    pub provider: Option<String>,
    /// `imap`, `pop3` or `smtp`, for server and `auth` steps.
    pub protocol: Option<&'static str>,
    /// `host:port`, for server and `auth` steps.
    pub server: Option<String>,
    /// What was found, one line.
    pub detail: String,
    /// Why it failed (or warns), one line.
    pub cause: Option<String>,
    /// What to do about it, one line.
    pub fix: Option<String>,
}

/// The whole walk.
#[derive(Debug, Serialize)]
pub struct Report {
    /// True when no step failed.
    pub ok: bool,
    /// The configuration file.
    pub config: String,
    /// Every step, in order.
    pub steps: Vec<Step>,
}

impl Report {
    /// The report for people: a heading per server, account and provider,
    /// one line per step, then its cause and fix; a count at the end.
    pub fn human(&self) -> String {
        let mut out = format!("mailbridge doctor: {}\n", self.config);
        let mut heading = String::new();
        for s in &self.steps {
            let h = match (s.check, &s.account, &s.server) {
                ("config" | "store" | "account", _, _) => "configuration".to_string(),
                ("auth" | "grant" | "refresh" | "token", Some(a), _) => format!(
                    "account {a} (provider {})",
                    s.provider.as_deref().unwrap_or("-")
                ),
                ("clock", _, _) => format!("provider {}", s.provider.as_deref().unwrap_or("-")),
                (_, _, Some(server)) => format!(
                    "{} server {server} (provider {})",
                    s.protocol.unwrap_or("-"),
                    s.provider.as_deref().unwrap_or("-")
                ),
                _ => String::new(),
            };
            if h != heading {
                out.push_str(&format!("\n{h}\n"));
                heading = h;
            }
            let name = match (s.check, s.protocol) {
                ("auth", Some(p)) => format!("{p} auth"),
                (c, _) => c.to_string(),
            };
            out.push_str(&format!(
                "  {:<5} {:<13} {}\n",
                s.verdict.label(),
                name,
                s.detail
            ));
            if let Some(c) = &s.cause {
                out.push_str(&format!("        cause: {c}\n"));
            }
            if let Some(f) = &s.fix {
                out.push_str(&format!("        fix:   {f}\n"));
            }
        }
        let count = |v: Verdict| self.steps.iter().filter(|s| s.verdict == v).count();
        out.push_str(&format!(
            "\n{}: {} ok, {} warn, {} failed, {} skipped\n",
            if self.ok {
                "all checks passed"
            } else {
                "some checks failed"
            },
            count(Verdict::Ok),
            count(Verdict::Warn),
            count(Verdict::Fail),
            count(Verdict::Skip)
        ));
        out
    }

    /// How many steps failed.
    pub fn failures(&self) -> usize {
        self.steps
            .iter()
            .filter(|s| s.verdict == Verdict::Fail)
            .count()
    }
}

/// Where the local passwords of password-mode accounts come from (the
/// CLI: standard input or a prompt). Err: why there is none, one line.
pub type Passwords<'a> = dyn FnMut(&str) -> Result<SecretString, String> + Send + 'a;

/// How the walk opens the token store (the CLI's: the store itself, or
/// the running service's through its control socket). Err: why not.
pub type OpenStore<'a> = dyn FnOnce(&Settings) -> Result<Arc<dyn TokenStore>, String> + Send + 'a;

/// A step builder.
fn step(check: &'static str, verdict: Verdict, detail: impl Into<String>) -> Step {
    Step {
        check,
        verdict,
        account: None,
        provider: None,
        protocol: None,
        server: None,
        detail: detail.into(),
        cause: None,
        fix: None,
    }
}

impl Step {
    fn why(mut self, cause: impl Into<String>, fix: impl Into<String>) -> Step {
        self.cause = Some(mailbridge_proto::text::flatten(&cause.into()));
        self.fix = Some(fix.into());
        self
    }

    fn account(mut self, name: &str, provider: &str) -> Step {
        self.account = Some(name.to_string());
        self.provider = Some(provider.to_string());
        self
    }

    fn server(mut self, protocol: Protocol, server: &str, provider: &str) -> Step {
        self.protocol = Some(protocol.name());
        self.server = Some(server.to_string());
        self.provider = Some(provider.to_string());
        self
    }
}

/// Walks every step for `account` (a login name; None: every account)
/// of the configuration at `path`, `loaded` as the CLI loaded it.
pub async fn run(
    path: &std::path::Path,
    loaded: Result<Settings, crate::config::ConfigError>,
    account: Option<&str>,
    open_store: Box<OpenStore<'_>>,
    passwords: &mut Passwords<'_>,
) -> Report {
    let mut steps = Vec::new();
    walk(&mut steps, loaded, account, open_store, passwords).await;
    Report {
        ok: !steps.iter().any(|s| s.verdict == Verdict::Fail),
        config: path.display().to_string(),
        steps,
    }
}

/// The protocols logins use: those of the listeners, and SMTP when a
/// device sends.
fn protocols(settings: &Settings) -> Vec<Protocol> {
    [Protocol::Imap, Protocol::Pop3, Protocol::Smtp]
        .into_iter()
        .filter(|p| {
            settings.listeners.iter().any(|l| l.protocol == *p)
                || (*p == Protocol::Smtp && !settings.devices.is_empty())
        })
        .collect()
}

async fn walk(
    steps: &mut Vec<Step>,
    loaded: Result<Settings, crate::config::ConfigError>,
    only: Option<&str>,
    open_store: Box<OpenStore<'_>>,
    passwords: &mut Passwords<'_>,
) {
    const CHECK_CONFIG: &str =
        "correct the file (`mailbridge check-config --config FILE` checks it alone)";
    let mut settings = match loaded {
        Ok(s) => s,
        Err(e) => {
            steps.push(
                step("config", Verdict::Fail, "the configuration does not load")
                    .why(e.to_string(), CHECK_CONFIG),
            );
            return;
        }
    };
    let http = match TokenSource::http_client() {
        Ok(h) => h,
        Err(e) => {
            steps.push(
                step("config", Verdict::Fail, "no HTTP client for providers").why(
                    crate::report::chain(&e),
                    "this machine's TLS setup is broken; reinstall mailbridge",
                ),
            );
            return;
        }
    };
    if let Err(e) = settings.discover(&http).await {
        steps.push(
            step(
                "config",
                Verdict::Fail,
                "the configuration loads, but a provider's issuer cannot be discovered",
            )
            .why(
                crate::report::chain(&e),
                "check the issuer URL in the provider's table and that this machine reaches it",
            ),
        );
        return;
    }
    let protocols = protocols(&settings);
    steps.push(step(
        "config",
        Verdict::Ok,
        format!(
            "valid: {} listener(s) ({}), {} provider(s), {} account(s), key_mode = \"{}\"",
            settings.listeners.len(),
            protocols
                .iter()
                .map(|p| p.name())
                .collect::<Vec<_>>()
                .join(", "),
            settings.providers.len(),
            settings.accounts.len(),
            match settings.server.key_mode {
                KeyMode::Password => "password",
                KeyMode::Service => "service",
            }
        ),
    ));
    let settings = Arc::new(settings);

    // The store, the vault and the login path, as `run` builds them.
    let store = match open_store(&settings) {
        Ok(s) => {
            steps.push(step(
                "store",
                Verdict::Ok,
                format!(
                    "the token store in {} opens",
                    settings.server.state_dir().display()
                ),
            ));
            Some(s)
        }
        Err(e) => {
            steps.push(
                step("store", Verdict::Fail, "the token store does not open").why(
                    e,
                    "check the state directory's owner and permissions (run as the service's user)",
                ),
            );
            None
        }
    };
    let gateway = match &store {
        None => None,
        Some(store) => match gateway(&settings, store.clone()) {
            Ok(g) => Some(g),
            Err((what, e)) => {
                steps.push(step("config", Verdict::Fail, what).why(e, CHECK_CONFIG));
                None
            }
        },
    };

    // Which accounts.
    let accounts = match accounts(&settings, only, store.as_deref()) {
        Ok(a) => a,
        Err(s) => {
            steps.push(*s);
            return;
        }
    };
    if accounts.is_empty() {
        steps.push(step(
            "account",
            Verdict::Warn,
            "no account to check: the configuration has no [[account]] with a stored grant",
        ));
    }

    // The servers those accounts log in to, each once.
    let timeout = settings.server.connect_timeout();
    let mut servers: Vec<(Protocol, &Provider, &ServerEndpoint)> = Vec::new();
    for a in &accounts {
        let Some(provider) = settings.providers.get(&a.provider) else {
            continue;
        };
        for p in &protocols {
            if let Some(e) = provider.endpoint(*p)
                && !servers
                    .iter()
                    .any(|(q, pr, s)| q == p && pr.name == provider.name && *s == e)
            {
                servers.push((*p, provider, e));
            }
        }
    }
    // (protocol, provider) whose server answered as a login needs.
    let mut reachable: Vec<(Protocol, String)> = Vec::new();
    for (protocol, provider, endpoint) in servers {
        let tls =
            crate::net::tls::client_config(provider.ca_file.as_deref()).map_err(|e| e.to_string());
        let mut probe = Probe {
            protocol,
            provider: &provider.name,
            endpoint,
            server: format!("{}:{}", endpoint.host, endpoint.port),
            timeout,
            steps: Vec::new(),
        };
        if probe.run(tls).await {
            reachable.push((protocol, provider.name.clone()));
        }
        steps.append(&mut probe.steps);
    }

    // Each account: grant, token, checks, logins.
    let mut providers_used: Vec<&Provider> = Vec::new();
    for account in &accounts {
        let Some(provider) = settings.providers.get(&account.provider) else {
            continue;
        };
        if !providers_used.iter().any(|p| p.name == provider.name) {
            providers_used.push(provider);
        }
        let Some(gateway) = &gateway else {
            steps.push(
                step(
                    "grant",
                    Verdict::Skip,
                    "not checked: the token store or key is unusable (above)",
                )
                .account(&account.name, &provider.name),
            );
            continue;
        };
        check_account(
            steps, gateway, &settings, account, provider, &protocols, &reachable, passwords,
        )
        .await;
    }

    for provider in providers_used {
        steps.push(clock(&http, provider).await);
    }
}

/// The login path as `run` builds it (without listeners).
fn gateway(
    settings: &Arc<Settings>,
    store: Arc<dyn TokenStore>,
) -> Result<Gateway, (&'static str, String)> {
    let vault = crate::server::vault_for(settings, store)
        .map_err(|e| ("the service key is unusable", crate::report::chain(&e)))?;
    let vault = Arc::new(vault);
    let flows = TokenSource::http_client()
        .map_err(|e| ("no HTTP client for providers", crate::report::chain(&e)))?;
    let refresh = TokenSource::refresh_client(settings.server.refresh_timeout())
        .map_err(|e| ("no HTTP client for providers", crate::report::chain(&e)))?;
    let tokens = TokenSource::new(flows, refresh, vault.clone());
    Gateway::new(settings.clone(), vault, tokens)
        .map_err(|e| ("a provider's TLS setup is unusable", e.to_string()))
}

/// The accounts to check: the one `only` names, or every configured one
/// (a catch-all as each login name it has a stored grant for).
fn accounts(
    settings: &Settings,
    only: Option<&str>,
    store: Option<&dyn TokenStore>,
) -> Result<Vec<crate::config::Account>, Box<Step>> {
    if let Some(name) = only {
        return match settings.account_for(name) {
            Some(a) => Ok(vec![a]),
            None => Err(Box::new(
                step(
                    "account",
                    Verdict::Fail,
                    format!("`{name}` matches no [[account]]"),
                )
                .why(
                    format!("no [[account]] has user = \"{name}\" or a catch-all for its domain"),
                    "check the name, or add an [[account]] table for it",
                ),
            )),
        };
    }
    let stored = store.and_then(|s| s.accounts().ok()).unwrap_or_default();
    let mut out: Vec<crate::config::Account> = Vec::new();
    for a in &settings.accounts {
        if let Some(domain) = a.user.strip_prefix("*@") {
            for name in &stored {
                let via_catch_all = name
                    .rsplit_once('@')
                    .is_some_and(|(_, d)| d.eq_ignore_ascii_case(domain))
                    && !settings
                        .accounts
                        .iter()
                        .any(|x| x.user.eq_ignore_ascii_case(name));
                if via_catch_all && let Some(acc) = settings.account_for(name) {
                    out.push(acc);
                }
            }
        } else if let Some(acc) = settings.account_for(&a.user) {
            out.push(acc);
        }
    }
    Ok(out)
}

#[allow(clippy::too_many_arguments)]
async fn check_account(
    steps: &mut Vec<Step>,
    gateway: &Gateway,
    settings: &Settings,
    account: &crate::config::Account,
    provider: &Provider,
    protocols: &[Protocol],
    reachable: &[(Protocol, String)],
    passwords: &mut Passwords<'_>,
) {
    let name = account.name.as_str();
    let tag = |s: Step| s.account(name, &provider.name);
    let reauthorize = format!("`mailbridge account reauthorize {name}`");
    let vault = gateway.vault();
    let peer: IpAddr = Ipv6Addr::LOCALHOST.into();

    // The grant.
    match vault.store().load_grant(name) {
        Ok(Some(_)) => {}
        Ok(None) => {
            steps.push(tag(step("grant", Verdict::Fail, "no grant stored").why(
                format!("`{name}` was never authorized, or its grant was removed"),
                format!("`mailbridge account add {name}` (or `account import` with a refresh token you have)"),
            )));
            return skip_rest(steps, name, &provider.name, protocols, "no grant");
        }
        Err(e) => {
            steps.push(tag(step(
                "grant",
                Verdict::Fail,
                "the store cannot be read",
            )
            .why(
                crate::report::chain(&e),
                "check the state directory (disk full? permissions?)",
            )));
            return skip_rest(steps, name, &provider.name, protocols, "no grant");
        }
    }
    let service = settings.server.key_mode == KeyMode::Service;
    let mut password = None;
    let unlocked = if service {
        vault.unlock_service(name).await
    } else {
        match passwords(name) {
            Ok(p) => {
                let got = vault.unlock(name, &p, peer).await;
                password = Some(p);
                got
            }
            Err(why) => {
                steps.push(tag(step("grant", Verdict::Fail, "no local password to open the grant").why(
                    why,
                    "give it on standard input with --password-stdin (one line per account, in the order checked), or run in a terminal",
                )));
                return skip_rest(
                    steps,
                    name,
                    &provider.name,
                    protocols,
                    "the grant is not open",
                );
            }
        }
    };
    let unlocked = match unlocked {
        Ok(u) => u,
        Err(e) => {
            let fix = match &e {
                VaultError::WrongPassword => format!(
                    "use the local password set in mailbridge for `{name}` (not the mailbox's); `mailbridge account passwd {name}` changes it"
                ),
                VaultError::Backoff { .. } => "wait, then try again".to_string(),
                VaultError::WrongKeyMode { .. } | VaultError::ServiceKeyMismatch { .. } => {
                    format!("`mailbridge account add {name} --replace`")
                }
                _ => "check the state directory and the key file".to_string(),
            };
            steps.push(tag(step(
                "grant",
                Verdict::Fail,
                "the sealed grant does not open",
            )
            .why(crate::report::chain(&e), fix)));
            return skip_rest(
                steps,
                name,
                &provider.name,
                protocols,
                "the grant is not open",
            );
        }
    };
    let meta = vault
        .store()
        .load_meta(name)
        .ok()
        .flatten()
        .unwrap_or_default();
    let age = unlocked.obtained_at();
    steps.push(tag(step(
        "grant",
        Verdict::Ok,
        format!(
            "the sealed grant opens ({}{}{})",
            if service {
                "with the service key"
            } else {
                "with the local password"
            },
            meta.flow
                .as_deref()
                .map(|f| format!("; obtained by {f}"))
                .unwrap_or_default(),
            if age > 0 {
                format!(
                    "; {} day(s) old",
                    crate::clock::unix_now().saturating_sub(age) / 86_400
                )
            } else {
                String::new()
            }
        ),
    )));

    // A new access token.
    let what = if account.grant.has_refresh_token() {
        "refreshed with the stored refresh token"
    } else {
        "obtained as the application (no refresh token for this grant)"
    };
    let token = match gateway.tokens().renew(provider, account, &unlocked).await {
        Ok(t) => {
            steps.push(tag(step(
                "refresh",
                Verdict::Ok,
                format!(
                    "a new access token, {what}, valid for {} min",
                    t.lifetime.as_secs() / 60
                ),
            )));
            Some(t)
        }
        Err(TokenError::WrongAudience { audience }) => {
            steps.push(tag(step(
                "refresh",
                Verdict::Ok,
                format!("the provider accepted the grant: a new access token, {what}"),
            )));
            steps.push(tag(step("token", Verdict::Fail, format!("aud is {audience}, not Outlook")).why(
                format!(
                    "the token is for {}: Exchange Online's IMAP, POP and SMTP refuse it; Entra ID issues such a token when a Graph or bare scope comes first",
                    if audience.contains("00000003-0000-0000-c000-000000000000") {
                        "Microsoft Graph"
                    } else {
                        "another resource than Outlook"
                    }
                ),
                format!("put https://outlook.office.com/IMAP.AccessAsUser.All first in the provider's scopes (no Graph scopes), then {reauthorize}"),
            )));
            return skip_auth(
                steps,
                name,
                &provider.name,
                protocols,
                "no usable access token",
            );
        }
        Err(e) => {
            steps.push(tag(token_failure(&e, name, age)));
            return skip_auth(steps, name, &provider.name, protocols, "no access token");
        }
    };

    // Microsoft: what the token is for, and what it may do.
    if let Some(token) = &token
        && provider.preset == Preset::Microsoft
    {
        let used: Vec<Protocol> = protocols
            .iter()
            .copied()
            .filter(|p| provider.endpoint(*p).is_some())
            .collect();
        let aud = crate::oauth::jwt::audiences(secrecy::ExposeSecret::expose_secret(&token.secret))
            .map(|a| a.join(", "));
        match crate::oauth::checks::check_permissions(provider, &token.secret, &used) {
            Ok(None) => steps.push(tag(step(
                "token",
                Verdict::Ok,
                "opaque access token (a personal Microsoft account's): no claims to read",
            ))),
            Ok(Some(held)) => steps.push(tag(step(
                "token",
                Verdict::Ok,
                format!(
                    "aud is {} (Outlook); it holds {}",
                    aud.unwrap_or_else(|| "-".into()),
                    held.join(" ")
                ),
            ))),
            Err(missing) => {
                let scopes: Vec<String> = missing
                    .missing
                    .iter()
                    .map(|m| format!("https://outlook.office.com/{m}"))
                    .collect();
                steps.push(tag(step(
                    "token",
                    Verdict::Fail,
                    format!("aud is {} (Outlook), but permissions are missing", aud.unwrap_or_else(|| "-".into())),
                )
                .why(
                    missing.to_string(),
                    format!(
                        "add {} to the provider's scopes (and the app registration's API permissions), then {reauthorize}",
                        scopes.join(" ")
                    ),
                )));
            }
        }
    }

    // A real login per protocol, then logout.
    for protocol in protocols {
        let Some(endpoint) = provider.endpoint(*protocol) else {
            steps.push(tag(step(
                "auth",
                Verdict::Warn,
                format!("provider `{}` has no {} server", provider.name, protocol.name()),
            )
            .why(
                format!("{} logins of `{name}` will fail", protocol.name().to_uppercase()),
                format!("add {} = {{ host = ..., port = ... }} to [providers.{}] if this account needs it", protocol.name(), provider.name),
            ))
            .server_of(*protocol, "-"));
            continue;
        };
        let server = format!("{}:{}", endpoint.host, endpoint.port);
        if !reachable.contains(&(*protocol, provider.name.clone())) {
            steps.push(
                tag(step(
                    "auth",
                    Verdict::Skip,
                    "not tried: the server checks above failed",
                ))
                .server_of(*protocol, &server),
            );
            continue;
        }
        let started = Instant::now();
        let result = match &password {
            Some(p) => {
                let request = proto::LoginRequest {
                    credentials: proto::sasl::Credentials {
                        user: name.to_string(),
                        password: p.clone(),
                    },
                    client_info: None,
                    by_address: false,
                };
                gateway.login(*protocol, request, peer).await
            }
            None => gateway.login_as(*protocol, name, None).await,
        };
        match result {
            Ok(mut conn) => {
                let elapsed = started.elapsed().as_millis();
                let logout: &[u8] = match protocol {
                    Protocol::Imap => proto::imap::LOGOUT,
                    Protocol::Pop3 => proto::pop3::QUIT,
                    Protocol::Smtp => proto::smtp::QUIT,
                };
                let closed = logout_and_wait(&mut conn.stream, logout).await;
                steps.push(
                    tag(step(
                        "auth",
                        Verdict::Ok,
                        format!(
                            "the server accepted the access token for {} ({elapsed} ms); {}",
                            account.upstream_user,
                            if closed {
                                "logged out"
                            } else {
                                "logout sent, the server did not close within 5 s"
                            }
                        ),
                    ))
                    .server_of(*protocol, &server),
                );
            }
            Err(f) => {
                let fix = match (&f.upstream_reply, f.kind) {
                    (Some(r), _) => crate::diagnose::explain(r)
                        .map(str::to_string)
                        .unwrap_or_else(|| format!(
                            "check the account's permissions at the provider (IMAP/POP/SMTP access allowed for the mailbox, scopes granted), then {reauthorize}"
                        )),
                    (None, FailureKind::Unavailable) => "try again later; if it persists, the server checks above and mailbridge's log (MAILBRIDGE_LOG=info) say more".to_string(),
                    (None, _) => format!("follow the cause; {reauthorize} if the grant is gone"),
                };
                steps.push(
                    tag(step("auth", Verdict::Fail, "the login failed").why(f.reason.clone(), fix))
                        .server_of(*protocol, &server),
                );
            }
        }
    }
}

impl Step {
    fn server_of(mut self, protocol: Protocol, server: &str) -> Step {
        self.protocol = Some(protocol.name());
        self.server = Some(server.to_string());
        self
    }
}

/// A failed token request as a step: the diagnose table's cause and fix
/// for known refusals ("Grants never die"), else our own.
fn token_failure(e: &TokenError, account: &str, obtained_at: u64) -> Step {
    let reauthorize = format!("`mailbridge account reauthorize {account}`");
    let age = (obtained_at > 0).then(|| crate::clock::unix_now().saturating_sub(obtained_at));
    let s = step("refresh", Verdict::Fail, "no access token");
    match e {
        TokenError::Refused {
            code,
            description,
            temporary,
        } => {
            if let Some(x) = (!e.is_temporary())
                .then(|| crate::diagnose::explain_token(code, description, age))
                .flatten()
            {
                let aadsts = x.aadsts.map(|n| format!(" (AADSTS{n})")).unwrap_or_default();
                let mut fix = x.fix.to_string();
                if x.reauthorize {
                    fix.push_str(&format!("; then {reauthorize}"));
                }
                return step(
                    "refresh",
                    Verdict::Fail,
                    format!("the provider refused the grant: {code}{aadsts}"),
                )
                .why(x.cause, fix);
            }
            let fix = if *temporary || e.is_temporary() {
                "the provider says this may pass: try again later (the grant is kept)".to_string()
            } else if code == "invalid_grant" {
                format!("the authorization was revoked or has expired: {reauthorize}")
            } else if code == "invalid_client" || code == "unauthorized_client" {
                "check client_id and client_secret in the provider's table against the app registration".to_string()
            } else if code == "invalid_scope" {
                format!("check the provider's scopes, then {reauthorize}")
            } else {
                format!("see the provider's words above; {reauthorize} if the grant is gone")
            };
            step(
                "refresh",
                Verdict::Fail,
                format!("the provider refused the grant: {code}"),
            )
            .why(e.to_string(), fix)
        }
        TokenError::Unreachable { .. } => s.why(
            e.to_string(),
            "check this machine's network, proxy and firewall towards the token endpoint, and token_url",
        ),
        TokenError::NoRefreshToken => s.why(e.to_string(), reauthorize),
        TokenError::Config { .. } => s.why(
            e.to_string(),
            "correct the provider's table (URLs, key and certificate files)",
        ),
        TokenError::BadResponse { .. } | TokenError::Interrupted => s.why(
            e.to_string(),
            "try again; check token_url points at the provider's token endpoint",
        ),
        TokenError::WrongAudience { .. } => s.why(
            e.to_string(),
            format!("put the Outlook scopes first, then {reauthorize}"),
        ),
        TokenError::Store { .. } => s.why(
            e.to_string(),
            "check that the token store's database (`store` in [server]) is up and reachable from this machine, then try again",
        ),
    }
}

/// The steps an account does not reach without its grant.
fn skip_rest(
    steps: &mut Vec<Step>,
    account: &str,
    provider: &str,
    protocols: &[Protocol],
    why: &str,
) {
    steps.push(
        step("refresh", Verdict::Skip, format!("not tried: {why}")).account(account, provider),
    );
    skip_auth(steps, account, provider, protocols, why);
}

fn skip_auth(
    steps: &mut Vec<Step>,
    account: &str,
    provider: &str,
    protocols: &[Protocol],
    why: &str,
) {
    for p in protocols {
        let mut s =
            step("auth", Verdict::Skip, format!("not tried: {why}")).account(account, provider);
        s.protocol = Some(p.name());
        steps.push(s);
    }
}

/// Sends `logout` and waits (at most 5 s) for the server to close.
async fn logout_and_wait<S>(stream: &mut S, logout: &[u8]) -> bool
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    tokio::time::timeout(Duration::from_secs(5), async {
        stream.write_all(logout).await?;
        stream.flush().await?;
        let mut buf = [0u8; 4096];
        // Bounded by the timeout; what the server says is not read.
        loop {
            if stream.read(&mut buf).await? == 0 {
                return Ok::<bool, io::Error>(true);
            }
        }
    })
    .await
    .map(|r| r.unwrap_or(true))
    .unwrap_or(false)
}

/// The checks of one mail server: DNS, TCP, TLS, and the login dialogue
/// up to where it would want a token.
struct Probe<'a> {
    protocol: Protocol,
    provider: &'a str,
    endpoint: &'a ServerEndpoint,
    /// host:port.
    server: String,
    timeout: Duration,
    steps: Vec<Step>,
}

impl Probe<'_> {
    fn push(&mut self, s: Step) {
        let s = s.server(self.protocol, &self.server, self.provider);
        self.steps.push(s);
    }

    fn skip(&mut self, checks: &[&'static str], why: &str) {
        for c in checks {
            self.push(step(c, Verdict::Skip, format!("not checked: {why}")));
        }
    }

    /// Runs the checks; true when the server is fit for a login.
    async fn run(&mut self, tls: Result<Arc<ClientConfig>, String>) -> bool {
        let host = self.endpoint.host.clone();
        let port = self.endpoint.port;
        let implicit = self.endpoint.tls == UpstreamTls::Implicit;
        let after_tcp: &[&'static str] = if implicit {
            &["tls", "greeting", "capabilities"]
        } else {
            &["greeting", "tls", "capabilities"]
        };

        // DNS.
        let looked_up =
            tokio::time::timeout(self.timeout, tokio::net::lookup_host((host.as_str(), port)))
                .await;
        let addrs: Vec<SocketAddr> = match looked_up {
            Ok(Ok(a)) => a.collect(),
            Ok(Err(e)) => {
                self.push(step("dns", Verdict::Fail, format!("{host} does not resolve")).why(
                    format!("the resolver says: {e}"),
                    format!(
                        "check the host name in [providers.{}] {} = {{ host = ... }} and this machine's resolver (/etc/resolv.conf)",
                        self.provider,
                        self.protocol.name()
                    ),
                ));
                self.skip(&["tcp"], "no address");
                self.skip(after_tcp, "no address");
                return false;
            }
            Err(_) => {
                self.push(
                    step("dns", Verdict::Fail, format!("{host} does not resolve")).why(
                        format!(
                            "no answer from the resolver within {} s",
                            self.timeout.as_secs()
                        ),
                        "check this machine's resolver (/etc/resolv.conf) and its network",
                    ),
                );
                self.skip(&["tcp"], "no address");
                self.skip(after_tcp, "no address");
                return false;
            }
        };
        if addrs.is_empty() {
            self.push(
                step("dns", Verdict::Fail, format!("{host} has no address")).why(
                    "the name exists but has no A or AAAA record",
                    "check the host name",
                ),
            );
            self.skip(&["tcp"], "no address");
            self.skip(after_tcp, "no address");
            return false;
        }
        let listed: Vec<String> = addrs.iter().map(|a| a.ip().to_string()).collect();
        self.push(step(
            "dns",
            Verdict::Ok,
            format!("{host} resolves to {}", listed.join(", ")),
        ));

        // TCP: the first address that answers, as logins connect.
        let mut failures = Vec::new();
        let mut tcp = None;
        for addr in &addrs {
            let started = Instant::now();
            match tokio::time::timeout(self.timeout, TcpStream::connect(addr)).await {
                Ok(Ok(s)) => {
                    tcp = Some((s, *addr, started.elapsed()));
                    break;
                }
                Ok(Err(e)) => failures.push((*addr, e)),
                Err(_) => failures.push((*addr, io::ErrorKind::TimedOut.into())),
            }
        }
        let Some((tcp, addr, took)) = tcp else {
            let kind = failures
                .last()
                .map(|(_, e)| e.kind())
                .unwrap_or(io::ErrorKind::Other);
            let fix = match kind {
                io::ErrorKind::ConnectionRefused => format!(
                    "nothing listens on port {port} there: check the port ({}) and that the server runs",
                    match (self.protocol, implicit) {
                        (Protocol::Imap, true) => "IMAP with implicit TLS is usually 993",
                        (Protocol::Imap, false) => "IMAP with STARTTLS is usually 143",
                        (Protocol::Pop3, true) => "POP3 with implicit TLS is usually 995",
                        (Protocol::Pop3, false) => "POP3 with STLS is usually 110",
                        (Protocol::Smtp, true) => "SMTP with implicit TLS is usually 465",
                        (Protocol::Smtp, false) => "SMTP submission with STARTTLS is usually 587",
                    }
                ),
                io::ErrorKind::TimedOut => "a firewall may drop the packets: check the network path to the server and outgoing rules here".to_string(),
                _ => "check the network path to the server".to_string(),
            };
            let cause = failures
                .iter()
                .map(|(addr, e)| {
                    let what = match e.kind() {
                        io::ErrorKind::ConnectionRefused => "connection refused",
                        io::ErrorKind::TimedOut => "no answer (timed out)",
                        io::ErrorKind::HostUnreachable => "host unreachable",
                        io::ErrorKind::NetworkUnreachable => "network unreachable",
                        io::ErrorKind::PermissionDenied => "not permitted (a firewall rule?)",
                        _ => "cannot connect",
                    };
                    format!("{what} at {addr} ({e})")
                })
                .collect::<Vec<_>>()
                .join("; ");
            self.push(
                step(
                    "tcp",
                    Verdict::Fail,
                    format!("cannot connect to {}", self.server),
                )
                .why(cause, fix),
            );
            self.skip(after_tcp, "no connection");
            return false;
        };
        let _ = tcp.set_nodelay(true);
        self.push(step(
            "tcp",
            Verdict::Ok,
            format!("connected to {addr} in {} ms", took.as_millis()),
        ));

        let tls = match tls {
            Ok(t) => t,
            Err(e) => {
                self.push(
                    step("tls", Verdict::Fail, "no TLS configuration")
                        .why(e, format!("fix ca_file in [providers.{}]", self.provider)),
                );
                return false;
            }
        };
        let mut stream = Stream::Plain(tcp);
        if implicit {
            match self.handshake(stream, &tls).await {
                Some(s) => stream = s,
                None => {
                    self.skip(&["greeting", "capabilities"], "no TLS");
                    return false;
                }
            }
        }
        self.dialogue(stream, &tls).await
    }

    /// The TLS handshake as logins run it, as a `tls` step: the version,
    /// the certificate's name, issuer and expiry.
    async fn handshake(&mut self, stream: Stream, tls: &Arc<ClientConfig>) -> Option<Stream> {
        let how = if self.endpoint.tls == UpstreamTls::Implicit {
            "implicit TLS"
        } else {
            "STARTTLS"
        };
        let shaken = tokio::time::timeout(
            self.timeout,
            stream.connect_tls(tls.clone(), &self.endpoint.host),
        )
        .await
        .unwrap_or_else(|_| {
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "TLS handshake timed out",
            ))
        });
        match shaken {
            Ok(s) => {
                let (verdict, detail, warning) = certificate_detail(&s);
                let mut st = step("tls", verdict, format!("{how}: {detail}"));
                if let Some(w) = warning {
                    st = st.why(
                        w,
                        "the server's administrator must renew the certificate soon",
                    );
                }
                self.push(st);
                Some(s)
            }
            Err(e) => {
                let fix = tls_fix(&e, self.provider);
                let cause = UpstreamFailure::<std::convert::Infallible>::Tls {
                    server: self.server.clone(),
                    source: e,
                };
                self.push(
                    step("tls", Verdict::Fail, format!("{how}: the handshake failed"))
                        .why(crate::report::chain(&cause), fix),
                );
                None
            }
        }
    }

    /// The protocol's own upstream login, driven up to where it wants a
    /// token: the greeting, STARTTLS, the capabilities. Then logout.
    async fn dialogue(&mut self, mut stream: Stream, tls: &Arc<ClientConfig>) -> bool {
        let mut session = crate::login::upstream_session(self.protocol, self.endpoint, None);
        let implicit = self.endpoint.tls == UpstreamTls::Implicit;
        let mut buf = vec![0u8; 8 * 1024];
        let mut greeting_told = false;
        let mut tls_done = implicit;
        // The dialogue's outcome: Ok at the token, or why not.
        let mut outcome: Result<(), String> = Err("the dialogue did not finish".into());
        // Bounded: a login dialogue is a handful of exchanges.
        for _ in 0..64 {
            let next = match session.next_step() {
                Ok(s) => s,
                Err(e) => {
                    outcome = Err(e.to_string());
                    break;
                }
            };
            match next {
                UpstreamStep::NeedInput => {
                    match tokio::time::timeout(self.timeout, stream.read(&mut buf)).await {
                        Ok(Ok(0)) => {
                            outcome = Err(format!("{} closed the connection", self.server));
                            break;
                        }
                        Ok(Ok(n)) => session.feed(&buf[..n]),
                        Ok(Err(e)) => {
                            outcome = Err(format!("{} broke the connection: {e}", self.server));
                            break;
                        }
                        Err(_) => {
                            outcome = Err(format!(
                                "{} said nothing for {} s",
                                self.server,
                                self.timeout.as_secs()
                            ));
                            break;
                        }
                    }
                }
                UpstreamStep::Send(bytes) => {
                    let sent = tokio::time::timeout(self.timeout, async {
                        stream.write_all(&bytes).await?;
                        stream.flush().await
                    })
                    .await;
                    if !matches!(sent, Ok(Ok(()))) {
                        outcome = Err(format!("{} closed the connection", self.server));
                        break;
                    }
                }
                UpstreamStep::StartTls => {
                    self.greeting_step(session.as_ref());
                    greeting_told = true;
                    match self.handshake(stream, tls).await {
                        Some(s) => {
                            stream = s;
                            tls_done = true;
                            session.tls_started();
                        }
                        None => {
                            self.skip(&["capabilities"], "no TLS");
                            return false;
                        }
                    }
                }
                UpstreamStep::NeedToken => {
                    outcome = Ok(());
                    break;
                }
                UpstreamStep::Authenticated(_) | UpstreamStep::Rejected(_) => {
                    outcome = Err("the server answered a login that was not sent".into());
                    break;
                }
            }
        }
        let advertised = session.advertised();
        if !greeting_told {
            self.greeting_step(session.as_ref());
            if !advertised.greeted {
                let cause = outcome.clone().err().unwrap_or_default();
                if let Some(last) = self.steps.last_mut() {
                    *last = last.clone().why(
                        cause,
                        format!(
                            "check that port {} is the {} port with tls = \"{}\"",
                            self.endpoint.port,
                            self.protocol.name().to_uppercase(),
                            if implicit { "implicit" } else { "starttls" }
                        ),
                    );
                }
                if !implicit {
                    self.skip(&["tls"], "no greeting");
                }
                self.skip(&["capabilities"], "no greeting");
                return false;
            }
        }
        if !tls_done {
            // STARTTLS was wanted and did not happen.
            let cause = outcome.clone().err().unwrap_or_default();
            self.push(step("tls", Verdict::Fail, "STARTTLS: not done").why(
                cause,
                format!(
                    "if the server speaks TLS from the first byte, set tls = \"implicit\" and its implicit-TLS port for {} in [providers.{}]",
                    self.protocol.name(),
                    self.provider
                ),
            ));
            self.skip(&["capabilities"], "no TLS");
            return false;
        }
        let offered = advertised.mechanisms.as_ref().map(|m| {
            if m.is_empty() {
                "no SASL mechanism".to_string()
            } else {
                m.join(" ")
            }
        });
        let fit = match (&outcome, advertised.chosen) {
            (Ok(()), Some(chosen)) => {
                let st = match &offered {
                    Some(o) => step(
                        "capabilities",
                        Verdict::Ok,
                        format!("offers {o}; mailbridge will use {}", chosen.name()),
                    ),
                    None => step(
                        "capabilities",
                        Verdict::Warn,
                        format!(
                            "the server does not list its mechanisms; mailbridge will try {}",
                            chosen.name()
                        ),
                    )
                    .why(
                        "the server refused CAPA",
                        "nothing, if the login below passes",
                    ),
                };
                self.push(st);
                true
            }
            (Err(cause), _) => {
                let configured: Vec<&str> =
                    self.endpoint.mechanisms.iter().map(|m| m.name()).collect();
                let others: Vec<&str> = advertised
                    .mechanisms
                    .iter()
                    .flatten()
                    .filter_map(|m| {
                        ["XOAUTH2", "OAUTHBEARER"]
                            .into_iter()
                            .find(|b| m.eq_ignore_ascii_case(b) && !configured.contains(b))
                    })
                    .collect();
                let fix = if !others.is_empty() {
                    format!(
                        "the server offers {} which the configuration leaves out: set mechanisms = [{}] on {} in [providers.{}]",
                        others.join(" "),
                        others
                            .iter()
                            .map(|m| format!("\"{}\"", m.to_ascii_lowercase()))
                            .collect::<Vec<_>>()
                            .join(", "),
                        self.protocol.name(),
                        self.provider
                    )
                } else if advertised.mechanisms.is_some() {
                    "the server offers no OAuth2 login here: enable XOAUTH2 or OAUTHBEARER on it (for Microsoft 365: SMTP AUTH / IMAP / POP for the mailbox), or check that this is the right server and port".to_string()
                } else {
                    "check that this is the right server and port".to_string()
                };
                let cause = if others.is_empty() {
                    cause.clone()
                } else {
                    format!(
                        "mailbridge may use only {} with this server (mechanisms in [providers.{}])",
                        configured.join(", "),
                        self.provider
                    )
                };
                self.push(
                    step(
                        "capabilities",
                        Verdict::Fail,
                        match &offered {
                            Some(o) => format!(
                                "offers {o}, none of mailbridge's ({})",
                                configured.join(", ")
                            ),
                            None => "the login dialogue stopped".to_string(),
                        },
                    )
                    .why(cause, fix),
                );
                false
            }
            (Ok(()), None) => {
                self.push(
                    step("capabilities", Verdict::Fail, "no mechanism chosen").why(
                        "the dialogue asked for a token without choosing a mechanism",
                        "report this as a bug",
                    ),
                );
                false
            }
        };
        let _ = logout_and_wait(&mut stream, session.logout()).await;
        fit
    }

    /// The `greeting` step, from what the session read.
    fn greeting_step(&mut self, session: &dyn UpstreamLogin) {
        let a = session.advertised();
        let starttls = if self.endpoint.tls == UpstreamTls::Starttls {
            if a.starttls {
                "; STARTTLS offered"
            } else {
                "; STARTTLS not offered"
            }
        } else {
            ""
        };
        if a.greeted {
            self.push(step(
                "greeting",
                Verdict::Ok,
                format!("the server greeted{starttls}"),
            ));
        } else {
            self.push(step("greeting", Verdict::Fail, "no greeting"));
        }
    }
}

/// The certificate a TLS stream was verified with: (verdict, what, a
/// warning when it expires within 14 days).
fn certificate_detail(stream: &Stream) -> (Verdict, String, Option<String>) {
    let Stream::ClientTls(tls) = stream else {
        return (Verdict::Ok, "verified".into(), None);
    };
    let (_, conn) = tls.get_ref();
    let version = conn
        .protocol_version()
        .map(|v| match v {
            rustls::ProtocolVersion::TLSv1_3 => "TLS 1.3".to_string(),
            rustls::ProtocolVersion::TLSv1_2 => "TLS 1.2".to_string(),
            other => format!("{other:?}"),
        })
        .unwrap_or_else(|| "TLS".into());
    let Some(leaf) = conn.peer_certificates().and_then(|c| c.first()) else {
        return (Verdict::Ok, format!("{version}, chain verified"), None);
    };
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(leaf.as_ref()) else {
        return (
            Verdict::Ok,
            format!("{version}, chain and name verified (certificate not readable here)"),
            None,
        );
    };
    let names: Vec<String> = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_string()),
                    _ => None,
                })
                .take(4)
                .collect()
        })
        .unwrap_or_default();
    let not_after = cert.validity().not_after.timestamp();
    let now = crate::clock::unix_now() as i64;
    let days = (not_after - now) / 86_400;
    let until = time::OffsetDateTime::from_unix_timestamp(not_after)
        .ok()
        .and_then(|t| {
            t.format(time::macros::format_description!(
                "[year]-[month]-[day] [hour]:[minute]"
            ))
            .ok()
        })
        .unwrap_or_else(|| not_after.to_string());
    let detail = format!(
        "{version}, chain and name verified; certificate for {} issued by {}, valid until {until} UTC ({days} days left)",
        if names.is_empty() {
            cert.subject().to_string()
        } else {
            names.join(", ")
        },
        cert.issuer()
    );
    if days < 14 {
        (
            Verdict::Warn,
            detail,
            Some(format!("the certificate expires in {days} days")),
        )
    } else {
        (Verdict::Ok, detail, None)
    }
}

/// What to do about a failed handshake, by rustls's reason.
fn tls_fix(e: &io::Error, provider: &str) -> String {
    use rustls::{CertificateError, Error as TlsError};
    match e.get_ref().and_then(|i| i.downcast_ref::<TlsError>()) {
        Some(TlsError::InvalidCertificate(c)) => match c {
            CertificateError::UnknownIssuer => format!(
                "if the server uses a private CA, set ca_file in [providers.{provider}] to its certificate; else install the missing intermediate on the server"
            ),
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                "use the host name the certificate names (see the server's certificate), not an address or alias".to_string()
            }
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                "the server's administrator must renew the certificate; or this machine's clock is wrong (see clock below)".to_string()
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "this machine's clock may be wrong (see clock below)".to_string()
            }
            _ => "the server's administrator must fix its certificate".to_string(),
        },
        Some(TlsError::InvalidMessage(_)) => {
            "the server does not speak TLS on this port: check the port and tls = \"implicit\" / \"starttls\"".to_string()
        }
        _ => "check the port and tls = \"implicit\" / \"starttls\"".to_string(),
    }
}

/// This machine's clock against the `Date` of the provider's token
/// endpoint (any answer carries one: a GET gets 405 or 400).
async fn clock(http: &reqwest::Client, provider: &Provider) -> Step {
    let s = |v, d: String| {
        let mut st = step("clock", v, d);
        st.provider = Some(provider.name.clone());
        st
    };
    let before = crate::clock::unix_millis() as i128;
    let started = Instant::now();
    let answer = http.get(&provider.token_url).send().await;
    let rtt = started.elapsed();
    let after = before + rtt.as_millis() as i128;
    let response = match answer {
        Ok(r) => r,
        Err(e) => {
            return s(Verdict::Warn, "not compared".into()).why(
                format!(
                    "the token endpoint did not answer{}",
                    crate::oauth::flows::network_cause(&e)
                ),
                "see the refresh step; the clock can only be compared with an answer",
            );
        }
    };
    let date = response
        .headers()
        .get(reqwest::header::DATE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| httpdate::parse_http_date(v).ok());
    let Some(date) = date else {
        return s(Verdict::Warn, "not compared".into()).why(
            "the token endpoint's answer has no Date header",
            "nothing to do; check the clock with NTP (`timedatectl`)",
        );
    };
    let skew_ms = skew_ms(crate::clock::unix_millis_of(date), before, after);
    let secs = skew_ms as f64 / 1000.0;
    let detail = if skew_ms == 0 {
        format!(
            "this machine's clock agrees with the provider's Date (within its 1 s resolution; {} ms round trip)",
            rtt.as_millis()
        )
    } else {
        format!(
            "the provider's clock is {:.1} s {} this machine's ({} ms round trip)",
            secs.abs(),
            if secs > 0.0 { "ahead of" } else { "behind" },
            rtt.as_millis()
        )
    };
    let fix = "keep the clock set by NTP (`timedatectl set-ntp true`, chrony or systemd-timesyncd)";
    match skew_verdict(skew_ms) {
        Verdict::Warn => s(Verdict::Warn, detail).why(
            "tokens and signed assertions carry times; more skew makes providers refuse them",
            fix,
        ),
        Verdict::Fail => s(Verdict::Fail, detail).why(
            "more than 5 minutes: providers refuse signed assertions and servers expired-looking tokens",
            fix,
        ),
        v => s(v, detail),
    }
}

/// How far a server's clock is from ours, in ms (positive: ahead), from
/// its `Date` (`theirs`, whole seconds) and our clock `before` and
/// `after` the request: their second began somewhere in our
/// `[before - 1 s, after]`, and only the distance to that window counts.
fn skew_ms(theirs: i128, before: i128, after: i128) -> i128 {
    if theirs + 1000 < before {
        theirs + 1000 - before
    } else if theirs > after {
        theirs - after
    } else {
        0
    }
}

/// Up to a minute is fine; up to five minutes (what providers and
/// Kerberos-style checks tolerate) a warning; more fails.
fn skew_verdict(skew_ms: i128) -> Verdict {
    match skew_ms.abs() {
        0..=60_000 => Verdict::Ok,
        60_001..=300_000 => Verdict::Warn,
        _ => Verdict::Fail,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_skew_counts_only_beyond_the_date_resolution_and_the_round_trip() {
        // We asked at 10.000 s and had the answer at 10.400 s.
        let (before, after) = (10_000, 10_400);
        // Their Date said 9 s (9.000..9.999) or 10 s: no measurable skew.
        assert_eq!(skew_ms(9_000, before, after), 0);
        assert_eq!(skew_ms(10_000, before, after), 0);
        // 12 s: at least 1.6 s ahead; 5 s: at least 4 s behind.
        assert_eq!(skew_ms(12_000, before, after), 1_600);
        assert_eq!(skew_ms(5_000, before, after), -4_000);
        assert_eq!(skew_verdict(0), Verdict::Ok);
        assert_eq!(skew_verdict(-60_000), Verdict::Ok);
        assert_eq!(skew_verdict(61_000), Verdict::Warn);
        assert_eq!(skew_verdict(-300_000), Verdict::Warn);
        assert_eq!(skew_verdict(300_001), Verdict::Fail);
    }

    #[test]
    fn the_human_report_has_a_line_per_step_then_cause_and_fix() {
        let report = Report {
            ok: false,
            config: "/etc/mailbridge/config.toml".into(),
            steps: vec![
                step("config", Verdict::Ok, "valid"),
                step("dns", Verdict::Ok, "localhost resolves to 127.0.0.1").server(
                    Protocol::Imap,
                    "localhost:993",
                    "p",
                ),
                step("tcp", Verdict::Fail, "cannot connect")
                    .why("connection refused", "start the server")
                    .server(Protocol::Imap, "localhost:993", "p"),
                step("grant", Verdict::Ok, "opens").account("alice@example.com", "p"),
            ],
        };
        let text = report.human();
        assert!(
            text.contains("\nconfiguration\n  ok    config        valid\n"),
            "{text}"
        );
        assert!(
            text.contains("\nimap server localhost:993 (provider p)\n"),
            "{text}"
        );
        assert!(
            text.contains("  FAIL  tcp           cannot connect\n        cause: connection refused\n        fix:   start the server\n"),
            "{text}"
        );
        assert!(
            text.contains("\naccount alice@example.com (provider p)\n"),
            "{text}"
        );
        assert!(
            text.ends_with("some checks failed: 3 ok, 0 warn, 1 failed, 0 skipped\n"),
            "{text}"
        );
        assert_eq!(report.failures(), 1);
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["steps"][2]["verdict"], "fail");
        assert_eq!(json["steps"][2]["protocol"], "imap");
        assert_eq!(json["steps"][2]["server"], "localhost:993");
    }
}
