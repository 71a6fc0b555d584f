//! The login path: credentials -> account -> vault -> token source ->
//! upstream login. Every failure becomes a [`LoginFailure`] with one line a
//! person can act on; no secret goes into it.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::ClientConfig;
use secrecy::SecretString;

use crate::alerts::{Alert, Alerts, Event};
use crate::clock::unix_now;
use crate::config::{Protocol, Settings};
use crate::net::tls::{self, TlsError};
use crate::net::upstream::{self, UpstreamConn, UpstreamFailure};
use crate::oauth::{TokenError, TokenSource};
use crate::vault::{Vault, VaultError};
use mailbridge_proto::{
    self as proto, FailureKind, LoginFailure, LoginRequest, UpstreamLogin, text,
};

/// The configuration logins follow, replaced whole by a reload: accounts,
/// providers, and each provider's upstream TLS config (its CA file, or
/// the platform's).
struct Routing {
    settings: Arc<Settings>,
    upstream_tls: HashMap<String, Arc<ClientConfig>>,
}

impl Routing {
    fn new(settings: Arc<Settings>) -> Result<Routing, TlsError> {
        let mut upstream_tls = HashMap::new();
        let mut platform: Option<Arc<ClientConfig>> = None;
        for (name, p) in &settings.providers {
            let config = match &p.ca_file {
                Some(ca) => tls::client_config(Some(ca))?,
                None => match &platform {
                    Some(c) => c.clone(),
                    None => {
                        let c = tls::client_config(None)?;
                        platform = Some(c.clone());
                        c
                    }
                },
            };
            upstream_tls.insert(name.clone(), config);
        }
        Ok(Routing {
            settings,
            upstream_tls,
        })
    }
}

/// Everything a login needs, shared by all connections.
pub struct Gateway {
    /// A login takes the routing in force when it starts and keeps it.
    routing: std::sync::RwLock<Arc<Routing>>,
    vault: Arc<Vault>,
    tokens: TokenSource,
    /// For flows run by the server itself (authorize on first login).
    http: reqwest::Client,
    /// Authorizations in progress, one per account.
    authorizing: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Who hears when a grant needs a person.
    alerts: Alerts,
    /// The newest token generation logins have been handed: a token at or
    /// below it was handed out before (cached), one above it was just
    /// issued. Only a cached token refused without a challenge is worth a
    /// refresh and a second try.
    newest_handed_out: std::sync::atomic::AtomicU64,
    /// What each provider's SMTP server (`host:port`) advertised in its
    /// EHLO at the last successful login through it, for the pre-auth EHLO
    /// ([`Gateway::smtp_extensions`]). Each login also keeps it in its
    /// account's metadata, from which a restarted server recalls it
    /// ([`Gateway::recall_smtp`]).
    smtp_seen: std::sync::Mutex<HashMap<String, proto::smtp::Extensions>>,
    /// Accounts whose grant the provider refused for good, with why, until
    /// a login succeeds again (for the status page).
    refused: std::sync::Mutex<HashMap<String, String>>,
    /// Relayed sessions open now, per account (for the status page).
    open_sessions: Arc<std::sync::Mutex<HashMap<String, usize>>>,
}

/// Holds a place in an account's count of open sessions.
pub struct AccountSession {
    account: String,
    counts: Arc<std::sync::Mutex<HashMap<String, usize>>>,
}

impl Drop for AccountSession {
    fn drop(&mut self) {
        let mut c = self
            .counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = c.get_mut(&self.account) {
            *n -= 1;
            if *n == 0 {
                c.remove(&self.account);
            }
        }
    }
}

impl Gateway {
    /// Builds the gateway; fails if a provider's CA file is unusable.
    pub fn new(
        settings: Arc<Settings>,
        vault: Arc<Vault>,
        tokens: TokenSource,
    ) -> Result<Gateway, TlsError> {
        Ok(Gateway {
            routing: std::sync::RwLock::new(Arc::new(Routing::new(settings)?)),
            vault,
            http: tokens.http().clone(),
            tokens,
            authorizing: std::sync::Mutex::new(HashMap::new()),
            alerts: Alerts::log_only(),
            newest_handed_out: std::sync::atomic::AtomicU64::new(0),
            smtp_seen: std::sync::Mutex::new(HashMap::new()),
            refused: std::sync::Mutex::new(HashMap::new()),
            open_sessions: Arc::new(std::sync::Mutex::new(HashMap::new())),
        })
    }

    /// The SMTP extensions the pre-auth EHLO advertises, before the client
    /// has said who it is: the extensions every provider's SMTP server
    /// supports, each as last seen (a server not yet seen counts as
    /// [`proto::smtp::Extensions::default`], today's safe list), over the
    /// providers that some account uses and that have an SMTP server;
    /// with one such provider, simply its server's. A client is never told
    /// of an extension (or a size) its account's server may lack: the
    /// account is unknown until AUTH, and after AUTH the client's commands
    /// go to that server unchanged. Nothing configured: the default.
    pub fn smtp_extensions(&self) -> proto::smtp::Extensions {
        let routing = self.routing();
        let settings = &routing.settings;
        let seen = self
            .smtp_seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut servers = smtp_servers_in_use(settings);
        servers.sort();
        servers.dedup();
        servers
            .iter()
            .map(|key| seen.get(key).copied().unwrap_or_default())
            .reduce(proto::smtp::Extensions::common)
            .unwrap_or_default()
    }

    /// Remembers what an SMTP server advertised (the EHLO keywords of a
    /// successful login); returns it as the account's metadata keeps it.
    fn learn_smtp(
        &self,
        endpoint: &crate::provider::ServerEndpoint,
        keywords: &[String],
    ) -> crate::store::SmtpEhlo {
        let ext = proto::smtp::Extensions::from_ehlo(keywords);
        let key = server_key(endpoint);
        let mut seen = self
            .smtp_seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if seen.insert(key.clone(), ext) != Some(ext) {
            tracing::debug!(server = %key, extensions = ?ext, "SMTP server extensions learned");
        }
        crate::store::SmtpEhlo {
            server: key,
            keywords: keywords
                .iter()
                .filter(|k| {
                    let word = k.split(' ').next().unwrap_or_default().to_ascii_uppercase();
                    word != "AUTH" && !word.starts_with("AUTH=")
                })
                .cloned()
                .collect(),
        }
    }

    /// Recalls, from the accounts' metadata, what the SMTP servers in use
    /// advertised at the last login through them before this process
    /// started (a server learned since is left as learned), so the
    /// pre-auth EHLO after a restart is the one before it. Where accounts
    /// disagree about a server, the latest login's record wins; a record
    /// of a server no account uses now is passed over; a store that cannot
    /// be read costs only the default list.
    pub fn recall_smtp(&self) {
        let routing = self.routing();
        let settings = &routing.settings;
        let in_use = smtp_servers_in_use(settings);
        if in_use.is_empty() {
            return;
        }
        let store = self.vault.store();
        let names = match store.accounts() {
            Ok(names) => names,
            Err(e) => {
                tracing::warn!(error = %crate::report::chain(&e), "cannot read what the SMTP servers advertised before; the pre-auth EHLO offers the default list until a login");
                return;
            }
        };
        let mut latest: HashMap<String, (u64, crate::store::SmtpEhlo)> = HashMap::new();
        for name in names {
            let Ok(Some(meta)) = store.load_meta(&name) else {
                continue;
            };
            let Some(ehlo) = meta.smtp_ehlo.filter(|e| in_use.contains(&e.server)) else {
                continue;
            };
            let at = meta.last_login_at.unwrap_or(0);
            if latest.get(&ehlo.server).is_none_or(|(t, _)| *t <= at) {
                latest.insert(ehlo.server.clone(), (at, ehlo));
            }
        }
        let mut seen = self
            .smtp_seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (key, (_, ehlo)) in latest {
            let ext = proto::smtp::Extensions::from_ehlo(&ehlo.keywords);
            seen.entry(key.clone()).or_insert_with(|| {
                tracing::debug!(server = %key, extensions = ?ext, "SMTP server extensions recalled");
                ext
            });
        }
    }

    /// The gateway, raising its alerts through `alerts` (the default
    /// only logs them).
    pub fn with_alerts(mut self, alerts: Alerts) -> Gateway {
        self.alerts = alerts;
        self
    }

    /// Where alerts go.
    pub fn alerts(&self) -> &Alerts {
        &self.alerts
    }

    /// The configuration logins follow now.
    pub fn settings(&self) -> Arc<Settings> {
        self.routing().settings.clone()
    }

    /// Raises the alert a failed token request calls for: a refused
    /// grant, or (once they have lasted) temporary failures. A rotated
    /// token that could not be saved does not fail the request; the
    /// vault announces it ([`crate::vault::GrantEvent`]) and
    /// `server::run` raises that alert.
    /// Why the provider refused `account`'s grant for good, if it did
    /// since the last successful login.
    pub fn refused_because(&self, account: &str) -> Option<String> {
        self.refused
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(account)
            .cloned()
    }

    /// Relayed sessions of `account` open now.
    pub fn sessions_of(&self, account: &str) -> usize {
        self.open_sessions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(account)
            .copied()
            .unwrap_or(0)
    }

    fn session_opened(&self, account: &str) -> AccountSession {
        *self
            .open_sessions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(account.to_owned())
            .or_default() += 1;
        AccountSession {
            account: account.to_owned(),
            counts: self.open_sessions.clone(),
        }
    }

    fn token_alert(&self, account: &str, e: &TokenError, grant_age: Option<u64>) {
        match e {
            e if e.is_temporary() => {
                self.alerts.refresh_failed(account, &e.to_string());
            }
            TokenError::Refused { .. } | TokenError::WrongAudience { .. } => {
                self.refused
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .insert(account.to_owned(), e.to_string());
                let advice = match explain_refusal(e, grant_age) {
                    Some(x) => x.sentence(account),
                    None if matches!(e, TokenError::WrongAudience { .. }) => format!(
                        "put https://outlook.office.com/IMAP.AccessAsUser.All first in the provider's scopes, then run `mailbridge account reauthorize {account}`"
                    ),
                    None => format!(
                        "someone must sign in again: `mailbridge account reauthorize {account}` (mailbridge's log has the provider's words)"
                    ),
                };
                self.alerts.raise(Alert {
                    event: Event::GrantRefused,
                    account: account.to_string(),
                    reason: e.to_string(),
                    advice,
                });
            }
            _ => {}
        }
    }

    fn routing(&self) -> Arc<Routing> {
        self.routing
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Replaces the accounts and providers that logins follow (a config
    /// reload); logins already under way finish with the old ones. The
    /// `[server]` settings and listeners are not the gateway's: the caller
    /// says when those changed. Fails, changing nothing, if a provider's
    /// CA file is unusable.
    pub fn reload(&self, settings: Arc<Settings>) -> Result<(), TlsError> {
        let routing = Arc::new(Routing::new(settings)?);
        let old = std::mem::replace(
            &mut *self
                .routing
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
            routing.clone(),
        );
        // Cached access tokens stay only where the account's provider
        // still asks for the same tokens in the same way.
        self.tokens.forget_where(|account| {
            let provider = |s: &Settings| {
                s.account_for(account)
                    .and_then(|a| s.providers.get(&a.provider).cloned())
            };
            match (provider(&old.settings), provider(&routing.settings)) {
                (Some(a), Some(b)) => a.tokens_differ(&b),
                _ => true,
            }
        });
        Ok(())
    }

    /// The vault, for the CLI and tests.
    pub fn vault(&self) -> &Arc<Vault> {
        &self.vault
    }

    /// The HTTP client for providers (token endpoints, discovery).
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// Authorize on first login: runs the browser flow for an account with
    /// no grant and seals the result under the password the client used.
    /// One authorization per account at a time; logins that arrive
    /// meanwhile wait for it.
    async fn authorize_now(
        &self,
        account: &crate::config::Account,
        provider: &crate::provider::Provider,
        password: &secrecy::SecretString,
    ) -> Result<(), LoginFailure> {
        let lock = {
            let mut map = self.authorizing.lock().unwrap_or_else(|p| p.into_inner());
            map.entry(account.name.clone()).or_default().clone()
        };
        let _one_at_a_time = lock.lock().await;
        if matches!(self.vault.store().load_grant(&account.name), Ok(Some(_))) {
            // Another login finished the authorization while we waited.
            return Ok(());
        }
        tracing::warn!(account = %account.name, "no grant yet: starting the authorization for this login");
        let opts = crate::authorize::AuthorizeOptions {
            interaction: crate::authorize::Interaction::Browser,
            // Leave the client a few seconds to get our answer in time.
            timeout: self
                .routing()
                .settings
                .server
                .login_timeout()
                .saturating_sub(std::time::Duration::from_secs(5))
                .max(std::time::Duration::from_secs(5)),
            upstream_password: None,
        };
        let ui = crate::authorize::ServerUi {
            account: account.name.clone(),
        };
        let authorized = crate::authorize::obtain(provider, account, &opts, &self.http, &ui)
            .await
            .map_err(|e| {
                failure(
                    FailureKind::Unavailable,
                    text::flatten(&format!(
                        "`{}` is not authorized yet and the authorization did not complete: {e}",
                        account.name
                    )),
                )
            })?;
        let meta = crate::store::AccountMeta {
            provider: account.provider.clone(),
            upstream_user: account.upstream_user.clone(),
            flow: Some(format!("{} (on first login)", authorized.flow)),
            ..Default::default()
        };
        self.vault
            .create(&account.name, password, authorized.grant, meta, false)
            .await
            .map_err(|e| vault_failure(&account.name, e))?;
        tracing::info!(account = %account.name, "authorized on first login; grant sealed");
        Ok(())
    }

    /// The token source.
    pub fn tokens(&self) -> &TokenSource {
        &self.tokens
    }

    /// Service key mode: refreshes every stored grant that lives in a
    /// refresh token, so grants outlive long idle periods (Microsoft ends
    /// refresh tokens unused for 90 days). With `fresh_within`, a grant
    /// whose last refresh (a login's or the background's, from its
    /// metadata) is more recent than that is left alone: the pass at
    /// start uses it, so that a service restarting in a loop does not
    /// refresh every grant at each start. Returns (refreshed, failed);
    /// failures are logged and kept in the account's `last_error`. Once
    /// `stopping` says so, the account in hand is finished and the rest
    /// are left for the next run.
    pub async fn refresh_all(
        &self,
        stopping: &tokio::sync::watch::Receiver<bool>,
        fresh_within: Option<Duration>,
    ) -> (usize, usize) {
        let names = match self.vault.store().accounts() {
            Ok(n) => n,
            Err(e) => {
                tracing::error!(error = %e, "background refresh: cannot list accounts");
                return (0, 0);
            }
        };
        let (mut ok, mut failed, mut fresh_skipped) = (0, 0, 0);
        let routing = self.routing();
        let settings = &routing.settings;
        let total = names.len();
        for (done, name) in names.into_iter().enumerate() {
            if *stopping.borrow() {
                tracing::info!(
                    left = total - done,
                    "background refresh: shutting down; the other accounts wait for the next start"
                );
                break;
            }
            let Some(account) = settings.account_for(&name) else {
                tracing::debug!(account = %name, "background refresh: not in the config; skipped");
                continue;
            };
            if !account.grant.has_refresh_token() {
                continue;
            }
            let Some(provider) = settings.providers.get(&account.provider) else {
                continue;
            };
            if let Some(fresh) = fresh_within
                && let Some(ago) = self.refreshed_ago(&account.name)
                && ago < fresh.as_secs()
            {
                fresh_skipped += 1;
                tracing::debug!(account = %account.name, refreshed_secs_ago = ago, "background refresh: refreshed recently; skipped");
                continue;
            }
            let result = match self.vault.unlock_service(&account.name).await {
                Ok(unlocked) => match self.tokens.renew(provider, &account, &unlocked).await {
                    Ok(_) => {
                        self.alerts.refresh_succeeded(&account.name);
                        Ok(())
                    }
                    Err(e) => {
                        self.token_alert(&account.name, &e, grant_age(&unlocked));
                        Err(crate::report::chain(&e))
                    }
                },
                Err(e) => Err(crate::report::chain(&e)),
            };
            match result {
                Ok(()) => ok += 1,
                Err(e) => {
                    failed += 1;
                    tracing::warn!(account = %account.name, error = %e, "background refresh failed");
                }
            }
        }
        if fresh_skipped > 0 {
            tracing::info!(
                refreshed = ok,
                failed,
                recently_refreshed = fresh_skipped,
                "background refresh done; grants refreshed recently were left for the next pass"
            );
        } else {
            tracing::info!(refreshed = ok, failed, "background refresh done");
        }
        (ok, failed)
    }

    /// Seconds since the account's last recorded refresh, if one is
    /// recorded (and not in the future: a clock set back refreshes).
    fn refreshed_ago(&self, account: &str) -> Option<u64> {
        let at = self.vault.store().load_meta(account).ok()??.refreshed_at?;
        unix_now().checked_sub(at)
    }

    /// Records what a login found in the account's metadata (for `account
    /// list`). A store that cannot take it does not fail the login, but
    /// it is logged.
    fn note_meta(&self, account: &str, f: impl FnOnce(&mut crate::store::AccountMeta)) {
        if let Err(e) = self.vault.update_meta(account, f) {
            tracing::warn!(account, error = %crate::report::chain(&e), "cannot record the login in the account's metadata");
        }
    }

    /// A login name with no account: one more failure for the client's
    /// address, and for a client that is not local the same reply as a
    /// wrong password after the same work.
    async fn unknown_user(&self, user: &str, peer: IpAddr, local: bool) -> LoginFailure {
        let backoff = self.vault.backoff();
        if let Some(retry_after) = backoff.check(peer, user) {
            return vault_failure(user, VaultError::Backoff { retry_after });
        }
        let tally = backoff.failed(peer, user);
        tracing::warn!(
            user = %text::printable(user, 100),
            %peer,
            names_failed_here = tally.names,
            "login for a name with no account"
        );
        if local {
            return failure(
                FailureKind::BadCredentials,
                format!(
                    "mailbridge has no account for `{}`; check the user name",
                    text::printable(user, 100)
                ),
            );
        }
        self.vault.dummy_verification().await;
        refused()
    }

    /// The vault did not open the account's grant. A wrong password, and
    /// an account with no grant yet, are told apart only to local clients.
    async fn not_unlocked(
        &self,
        account: &crate::config::Account,
        e: VaultError,
        peer: IpAddr,
        local: bool,
    ) -> LoginFailure {
        match e {
            VaultError::WrongPassword | VaultError::Backoff { .. } => {
                self.alerts.wrong_password(&account.name, peer);
                if matches!(e, VaultError::WrongPassword) && !local {
                    return refused();
                }
            }
            VaultError::NoGrant { .. } if !local => {
                // As for an unknown name: a failure, the same work, the
                // same reply; the log says what a person must do.
                self.vault.backoff().failed(peer, &account.name);
                tracing::warn!(
                    account = %account.name,
                    %peer,
                    authorize_on_login = account.authorize_on_login,
                    "login for an account with no grant yet; add it with `mailbridge account add` (authorize_on_login acts only for clients in local_networks)"
                );
                self.vault.dummy_verification().await;
                return refused();
            }
            _ => {}
        }
        vault_failure(&account.name, e)
    }

    /// Counts a client login's result and time in the metrics.
    fn count_login<T>(
        &self,
        protocol: Protocol,
        result: &Result<T, LoginFailure>,
        started: std::time::Instant,
    ) {
        let outcome = match result {
            Ok(_) => "ok",
            Err(f) => match f.kind {
                FailureKind::BadCredentials => "bad_credentials",
                FailureKind::Throttled => "throttled",
                FailureKind::Rejected => "rejected",
                FailureKind::Unavailable => "unavailable",
            },
        };
        self.metrics()
            .login(protocol.name(), outcome, started.elapsed());
    }

    /// The process's metrics.
    pub fn metrics(&self) -> &Arc<crate::metrics::Metrics> {
        self.tokens.metrics()
    }

    /// Logs in upstream for a client's login request (counted in the
    /// metrics by result, with its time).
    pub async fn login(
        &self,
        protocol: Protocol,
        request: LoginRequest,
        peer: IpAddr,
    ) -> Result<UpstreamConn, LoginFailure> {
        let started = std::time::Instant::now();
        let result = if request.by_address {
            self.login_by_address(protocol, request.client_info, peer)
                .await
        } else {
            self.login_with_password(protocol, request, peer).await
        };
        self.count_login(protocol, &result, started);
        result
    }

    async fn login_with_password(
        &self,
        protocol: Protocol,
        request: LoginRequest,
        peer: IpAddr,
    ) -> Result<UpstreamConn, LoginFailure> {
        let routing = self.routing();
        let (account, unlocked) = self.authenticate(&routing, &request, peer).await?;
        // The password is proven: from here on the client hears the
        // details, whoever it is.
        self.upstream(protocol, &routing, &account, &unlocked, request.client_info)
            .await
    }

    /// Checks a client's password without logging in upstream (a spooling
    /// SMTP listener: the message is delivered later, as the account).
    /// Returns the account's name. Counted in the metrics like a login.
    pub async fn check_password(
        &self,
        protocol: Protocol,
        request: &LoginRequest,
        peer: IpAddr,
    ) -> Result<String, LoginFailure> {
        let started = std::time::Instant::now();
        let routing = self.routing();
        let result = self
            .authenticate(&routing, request, peer)
            .await
            .map(|(account, _)| account.name);
        self.count_login(protocol, &result, started);
        result
    }

    /// The account a client's credentials open, with its grant.
    async fn authenticate(
        &self,
        routing: &Routing,
        request: &LoginRequest,
        peer: IpAddr,
    ) -> Result<(crate::config::Account, crate::vault::Unlocked), LoginFailure> {
        let user = request.credentials.user.as_str();
        let settings = &routing.settings;
        // This machine's own user is told exactly why a login failed;
        // anyone else learns nothing from a refusal (see `refused`).
        let local = settings.is_local_client(peer);
        let Some(account) = settings.account_for(user) else {
            return Err(self.unknown_user(user, peer, local).await);
        };

        let password = &request.credentials.password;
        let unlocked = match self.vault.unlock(&account.name, password, peer).await {
            Err(VaultError::NoGrant { .. }) if account.authorize_on_login && local => {
                self.authorize_now(
                    &account,
                    provider_of(settings, &account).ok_or_else(no_provider)?,
                    password,
                )
                .await?;
                self.vault.unlock(&account.name, password, peer).await
            }
            other => other,
        };
        match unlocked {
            Ok(u) => Ok((account, u)),
            Err(e) => Err(self.not_unlocked(&account, e, peer, local).await),
        }
    }

    /// Logs in upstream as a `[[device]]`'s account, for a device at
    /// `peer` sending without AUTH (service key mode: the grant opens
    /// without a password).
    async fn login_by_address(
        &self,
        protocol: Protocol,
        client_info: Option<String>,
        peer: IpAddr,
    ) -> Result<UpstreamConn, LoginFailure> {
        let routing = self.routing();
        let Some(device) = routing.settings.device_for(peer) else {
            return Err(failure(
                FailureKind::BadCredentials,
                "this address is not a [[device]] any more; log in with AUTH".into(),
            ));
        };
        self.login_as(protocol, &device.account.clone(), client_info)
            .await
    }

    /// Logs in upstream as `account` with the grant opened by the service
    /// key: devices and the spool's delivery.
    pub async fn login_as(
        &self,
        protocol: Protocol,
        account: &str,
        client_info: Option<String>,
    ) -> Result<UpstreamConn, LoginFailure> {
        let routing = self.routing();
        let Some(account) = routing.settings.account_for(account) else {
            return Err(failure(
                FailureKind::Rejected,
                format!("the account `{account}` is not configured any more"),
            ));
        };
        let unlocked = self
            .vault
            .unlock_service(&account.name)
            .await
            .map_err(|e| vault_failure(&account.name, e))?;
        self.upstream(protocol, &routing, &account, &unlocked, client_info)
            .await
    }

    /// The upstream half of a login, once the grant is open.
    async fn upstream(
        &self,
        protocol: Protocol,
        routing: &Routing,
        account: &crate::config::Account,
        unlocked: &crate::vault::Unlocked,
        client_info: Option<String>,
    ) -> Result<UpstreamConn, LoginFailure> {
        let settings = &routing.settings;
        let provider = provider_of(settings, account).ok_or_else(no_provider)?;
        let endpoint = provider.endpoint(protocol).ok_or_else(|| {
            failure(
                FailureKind::Unavailable,
                format!(
                    "provider `{}` has no {} server configured",
                    provider.name,
                    protocol.name()
                ),
            )
        })?;

        let session = upstream_session(protocol, endpoint, client_info);
        let tls = routing
            .upstream_tls
            .get(&provider.name)
            .cloned()
            .ok_or_else(|| {
                failure(
                    FailureKind::Unavailable,
                    "no TLS configuration for the provider".into(),
                )
            })?;
        let target = upstream::Target {
            host: &endpoint.host,
            port: endpoint.port,
            tls: endpoint.tls,
            user: &account.upstream_user,
        };
        let tokens = LoginTokens {
            source: &self.tokens,
            provider,
            account,
            unlocked,
            newest_handed_out: &self.newest_handed_out,
            last: std::sync::Mutex::new(None),
            floor: match protocol {
                Protocol::Smtp => crate::oauth::MIN_TOKEN_LIFETIME,
                Protocol::Imap | Protocol::Pop3 => settings.server.session_token_min(),
            },
        };
        let result = upstream::login(
            &target,
            tls,
            settings.server.connect_timeout(),
            session,
            &tokens,
        )
        .await;
        match result {
            Ok(mut conn) => {
                let ehlo = (protocol == Protocol::Smtp)
                    .then(|| self.learn_smtp(endpoint, &conn.success.capabilities));
                self.alerts.refresh_succeeded(&account.name);
                self.refused
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .remove(&account.name);
                conn.held = Some(Box::new(self.session_opened(&account.name)));
                let now = unix_now();
                self.note_meta(&account.name, |m| {
                    m.last_login_at = Some(now);
                    m.last_error = None;
                    if ehlo.is_some() {
                        m.smtp_ehlo = ehlo;
                    }
                });
                Ok(conn)
            }
            Err(e) => {
                // The client gets one sentence; the log gets the causes
                // beneath it too (I/O and TLS errors, for instance).
                let detail = crate::report::chain(&e);
                let age = grant_age(unlocked);
                if let UpstreamFailure::Token(t) = &e {
                    self.token_alert(&account.name, t, age);
                }
                let f = upstream_failure(protocol, &account.name, e, age);
                let reason = f.reason.clone();
                self.note_meta(&account.name, |m| m.last_error = Some(reason));
                // The chain often begins with the client's sentence: then
                // once is enough.
                if detail.starts_with(f.reason.as_str()) {
                    tracing::warn!(account = %account.name, reason = %detail, "upstream login failed");
                } else {
                    tracing::warn!(account = %account.name, reason = %f.reason, %detail, "upstream login failed");
                }
                Err(f)
            }
        }
    }
}

/// One login's access tokens from the token source: what the upstream
/// dialogue asks for, without it knowing of grants or providers.
struct LoginTokens<'a> {
    source: &'a TokenSource,
    provider: &'a crate::provider::Provider,
    account: &'a crate::config::Account,
    unlocked: &'a crate::vault::Unlocked,
    /// The gateway's newest generation handed out (see [`Gateway`]).
    newest_handed_out: &'a std::sync::atomic::AtomicU64,
    /// The token last handed out (a fresh one must be newer), and whether
    /// it had been handed out before.
    last: std::sync::Mutex<Option<(crate::oauth::AccessToken, bool)>>,
    /// The least life a cached token must have left for this protocol.
    floor: std::time::Duration,
}

impl upstream::Tokens for LoginTokens<'_> {
    type Error = TokenError;

    async fn token(&self) -> Result<SecretString, TokenError> {
        self.get(false).await
    }

    async fn fresh_token(&self) -> Result<SecretString, TokenError> {
        self.get(true).await
    }

    fn last_was_cached(&self) -> bool {
        self.last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            .is_some_and(|(_, cached)| *cached)
    }
}

impl LoginTokens<'_> {
    async fn get(&self, fresh: bool) -> Result<SecretString, TokenError> {
        use std::sync::atomic::Ordering;
        // The token the server refused is not handed out again: the source
        // skips its generation and refreshes.
        let refused = if fresh {
            self.last
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .as_ref()
                .map(|(t, _)| t.clone())
        } else {
            None
        };
        let seen = self.newest_handed_out.load(Ordering::Acquire);
        let token = self
            .source
            .token(
                self.provider,
                self.account,
                self.unlocked,
                refused.as_ref(),
                self.floor,
            )
            .await?;
        let cached = token.generation <= seen;
        self.newest_handed_out
            .fetch_max(token.generation, Ordering::AcqRel);
        let secret = token.secret.clone();
        *self
            .last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some((token, cached));
        Ok(secret)
    }
}

/// The upstream login dialogue of `protocol` for `endpoint`, as logins
/// (and `mailbridge doctor`) run it.
pub(crate) fn upstream_session(
    protocol: Protocol,
    endpoint: &crate::provider::ServerEndpoint,
    client_info: Option<String>,
) -> Box<dyn UpstreamLogin> {
    let starttls = endpoint.tls == crate::config::UpstreamTls::Starttls;
    let preference = endpoint.mechanisms.clone();
    match protocol {
        Protocol::Imap => Box::new(proto::imap::ImapUpstreamLogin::new(
            proto::imap::UpstreamOptions {
                starttls,
                preference,
                client_id: client_info,
                software: Some(("mailbridge".into(), env!("CARGO_PKG_VERSION").into())),
                ..Default::default()
            },
        )),
        Protocol::Pop3 => Box::new(proto::pop3::Pop3UpstreamLogin::new(
            proto::pop3::UpstreamOptions {
                starttls,
                preference,
                ..Default::default()
            },
        )),
        Protocol::Smtp => Box::new(proto::smtp::SmtpUpstreamLogin::new(
            proto::smtp::UpstreamOptions {
                starttls,
                preference,
                // The configured name, else the one the client gave us.
                ehlo_name: endpoint.ehlo_name.clone().or(client_info),
                ..Default::default()
            },
        )),
    }
}

/// An upstream server's key in [`Gateway`]'s memory of SMTP extensions.
fn server_key(endpoint: &crate::provider::ServerEndpoint) -> String {
    format!("{}:{}", endpoint.host, endpoint.port)
}

/// The SMTP servers (`host:port`) of the providers that accounts use, one
/// entry per account that uses one.
fn smtp_servers_in_use(settings: &Settings) -> Vec<String> {
    settings
        .accounts
        .iter()
        .filter_map(|a| settings.providers.get(&a.provider))
        .filter_map(|p| p.endpoint(Protocol::Smtp))
        .map(server_key)
        .collect()
}

/// The one reply a client that is not local gets for an unknown name, a
/// wrong password or an account with no grant.
fn refused() -> LoginFailure {
    failure(
        FailureKind::BadCredentials,
        "wrong user name or password (the mailbridge log says more)".into(),
    )
}

/// The account's provider.
fn provider_of<'s>(
    settings: &'s Settings,
    account: &crate::config::Account,
) -> Option<&'s crate::provider::Provider> {
    settings.providers.get(&account.provider)
}

fn no_provider() -> LoginFailure {
    failure(
        FailureKind::Unavailable,
        "the account's provider is not configured".into(),
    )
}

fn failure(kind: FailureKind, reason: String) -> LoginFailure {
    LoginFailure {
        kind,
        reason,
        upstream_reply: None,
    }
}

fn vault_failure(account: &str, e: VaultError) -> LoginFailure {
    match e {
        VaultError::WrongPassword => failure(
            FailureKind::BadCredentials,
            format!(
                "wrong password for `{account}` (the password set in mailbridge for this account)"
            ),
        ),
        VaultError::Backoff { retry_after } => failure(
            FailureKind::Throttled,
            format!(
                "too many failed logins; try again in {} s",
                retry_after.as_secs_f64().ceil().max(1.0) as u64
            ),
        ),
        VaultError::NoGrant { .. } => failure(
            FailureKind::Rejected,
            format!(
                "`{account}` has no stored authorization yet; run `mailbridge account add {account}` (or `account import` with a refresh token you already have)"
            ),
        ),
        VaultError::Store(e) => {
            // The store's own words (paths, the backend's errors) are for
            // the administrator's log, not the mail client.
            tracing::error!(account = %account, error = %crate::report::chain(&e), "token store failure");
            failure(
                FailureKind::Unavailable,
                "mailbridge cannot read its token store just now; its log says why".into(),
            )
        }
        other => {
            tracing::error!(account = %account, error = %crate::report::chain(&other), "token store failure");
            failure(
                FailureKind::Unavailable,
                format!("mailbridge cannot read its token store: {other}"),
            )
        }
    }
}

/// How long ago the unlocked grant (or its last rotation) was obtained,
/// when known.
fn grant_age(unlocked: &crate::vault::Unlocked) -> Option<u64> {
    let at = unlocked.obtained_at();
    (at > 0).then(|| unix_now().saturating_sub(at))
}

/// The diagnose table's cause and fix for a token request the provider
/// refused for good, when it is a known refusal.
fn explain_refusal(
    e: &TokenError,
    grant_age: Option<u64>,
) -> Option<crate::diagnose::TokenExplanation> {
    match e {
        TokenError::Refused {
            code, description, ..
        } if !e.is_temporary() => crate::diagnose::explain_token(code, description, grant_age),
        _ => None,
    }
}

fn upstream_failure(
    protocol: Protocol,
    account: &str,
    e: UpstreamFailure<TokenError>,
    grant_age: Option<u64>,
) -> LoginFailure {
    match e {
        UpstreamFailure::Token(t) => token_failure(account, t, grant_age),
        UpstreamFailure::Rejected { server, rejection } => {
            let refusal = rejection.refusal;
            if refusal.is_temporary() {
                // The server could not check the token (e.g. Dovecot cannot
                // reach its introspection endpoint): nothing to re-authorize,
                // and clients should retry rather than ask for a password.
                return LoginFailure {
                    kind: FailureKind::Unavailable,
                    reason: format!(
                        "{server} could not check the access token just now ({refusal}); try again later"
                    ),
                    upstream_reply: Some(refusal),
                };
            }
            let reason = match crate::diagnose::explain(&refusal) {
                // SMTP clients see the server's own line too; IMAP and POP3
                // replies carry only ours, so quote the server there.
                Some(why) if protocol == Protocol::Smtp => why.to_string(),
                Some(why) => format!("{why} (server said: {refusal})"),
                None => format!(
                    "{server} refused the access token ({refusal}); check the account's permissions or re-authorize it"
                ),
            };
            LoginFailure {
                kind: FailureKind::Rejected,
                reason,
                upstream_reply: Some(refusal),
            }
        }
        other => failure(FailureKind::Unavailable, text::flatten(&other.to_string())),
    }
}

fn token_failure(account: &str, e: TokenError, grant_age: Option<u64>) -> LoginFailure {
    let kind = if e.is_temporary() {
        FailureKind::Unavailable
    } else {
        FailureKind::Rejected
    };
    if let (Some(x), TokenError::Refused { code, .. }) = (explain_refusal(&e, grant_age), &e) {
        // The provider's code, then our cause and fix: the description
        // itself (trace ids, timestamps) is for the log.
        let aadsts = x
            .aadsts
            .map(|n| format!(" (AADSTS{n})"))
            .unwrap_or_default();
        return failure(
            kind,
            text::flatten(&format!(
                "the provider refused the grant: {code}{aadsts}: {}",
                x.sentence(account)
            )),
        );
    }
    let mut reason = e.to_string();
    if let TokenError::Refused {
        code, temporary, ..
    } = &e
    {
        if code == "invalid_grant" && *temporary {
            reason.push_str(
                "; the provider says this may pass (for example an administrator locked the user): the grant is kept, try again later",
            );
        } else if code == "invalid_grant" {
            reason.push_str(&format!(
                "; the authorization was revoked or expired: re-authorize with `mailbridge account reauthorize {account}`"
            ));
        }
    }
    failure(kind, text::flatten(&reason))
}
