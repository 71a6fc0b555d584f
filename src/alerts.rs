//! Someone hears when a grant needs a person: `[alerts]` runs a command
//! and/or posts a webhook for each [`Alert`], after logging it.
//!
//! This module owns the events ([`Event`]), the cheap cloneable handle
//! ([`Alerts`]) whose [`Alerts::raise`] never blocks (delivery runs in a
//! task, so a slow webhook or command never delays a login), the rate limit
//! per (account, event), and the trackers that turn single failures into
//! alerts: refreshes failing for a temporary reason for longer than
//! `refresh_failing_secs`, and wrong-password storms. It also holds the
//! daily check for grants about to expire unused ([`unused_grants`]).
//!
//! What goes out is the event, the account name, a reason and advice,
//! all one line in our words: never a password or token, and the webhook's
//! URL (which may hold a secret) is never logged.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use secrecy::{ExposeSecret, SecretString};

use crate::clock::unix_now;
use crate::config::{AlertsConfig, Settings};
use crate::provider::Preset;
use crate::store::TokenStore;
use mailbridge_proto::text;

/// What happened that needs a person.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Event {
    /// The provider refused the grant for good (revoked, expired, consent
    /// withdrawn) or issued tokens the mail servers cannot take.
    GrantRefused,
    /// A rotated refresh token could not be saved.
    TokenNotSaved,
    /// Refreshes have failed for a temporary reason for longer than
    /// `refresh_failing_secs`.
    RefreshFailing,
    /// A grant will expire unused (Microsoft ends refresh tokens unused for
    /// 90 days).
    GrantExpiring,
    /// Many wrong passwords for one account in a short time.
    PasswordStorm,
    /// A spooled message from a device was refused for good or could not
    /// be delivered in `[spool] max_age_hours`: it is in the failed area.
    MessageFailed,
}

impl Event {
    /// The name in `MAILBRIDGE_EVENT`, the webhook's `event` and the log.
    pub fn name(self) -> &'static str {
        match self {
            Event::GrantRefused => "grant_refused",
            Event::TokenNotSaved => "token_not_saved",
            Event::RefreshFailing => "refresh_failing",
            Event::GrantExpiring => "grant_expiring",
            Event::PasswordStorm => "password_storm",
            Event::MessageFailed => "message_failed",
        }
    }
}

/// One alert. Every field is shown to people and sent out: no secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Alert {
    /// What happened.
    pub event: Event,
    /// The account (the login name as stored).
    pub account: String,
    /// Why, in one line.
    pub reason: String,
    /// What to do, in one line.
    pub advice: String,
}

/// Why `[alerts]` cannot be set up (at start).
#[derive(Debug, thiserror::Error)]
pub enum AlertsError {
    /// A file named in `[alerts]` cannot be read.
    #[error("alerts: cannot read {field} {}: {source}", path.display())]
    Read {
        /// The field, e.g. `webhook_ca_file`.
        field: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The CA file holds no usable certificate.
    #[error("alerts: webhook_ca_file {} holds no usable PEM certificate", path.display())]
    CaFile {
        /// The file.
        path: PathBuf,
        /// The HTTP client's reason.
        #[source]
        source: Option<reqwest::Error>,
    },
    /// The secret file's first line is empty or not fit for a header.
    #[error("alerts: webhook_secret_file {} must hold the secret on its first line (printable, no spaces at either end)", path.display())]
    Secret {
        /// The file.
        path: PathBuf,
    },
    /// `webhook_url` is not a URL.
    #[error("alerts: webhook_url is not a URL")]
    Url,
    /// The HTTP client for the webhook could not be built.
    #[error("alerts: cannot set up the HTTP client for the webhook")]
    Http(#[source] reqwest::Error),
}

/// The alert command: a program and its arguments, no shell.
struct Command {
    program: String,
    args: Vec<String>,
    timeout: Duration,
}

/// The alert webhook.
struct Webhook {
    /// Never logged: it may carry a secret of its own.
    url: reqwest::Url,
    client: reqwest::Client,
    /// The header and the secret from `webhook_secret_file`.
    secret: Option<(reqwest::header::HeaderName, SecretString)>,
}

struct Inner {
    command: Option<Command>,
    webhook: Option<Webhook>,
    min_interval: Duration,
    refresh_failing: Duration,
    storm_failures: usize,
    storm_window: Duration,
    /// When each (account, event) last went out.
    last_sent: Mutex<HashMap<(String, Event), Instant>>,
    /// Since when refreshes of an account have been failing temporarily.
    failing_since: Mutex<HashMap<String, Instant>>,
    /// Recent wrong-password times per account (at most `storm_failures`).
    failures: Mutex<HashMap<String, VecDeque<Instant>>>,
}

/// The alerting handle: cheap to clone, shared by logins, the server's
/// checks and the token source.
#[derive(Clone)]
pub struct Alerts {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Alerts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Alerts")
            .field(
                "command",
                &self.inner.command.as_ref().map(|c| c.program.as_str()),
            )
            .field(
                "webhook_host",
                &self.inner.webhook.as_ref().and_then(|w| w.url.host_str()),
            )
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Alerts {
    /// Alerts as `[alerts]` says: reads the webhook's CA and secret files
    /// and builds its HTTP client (TLS verified, no redirects).
    pub fn new(config: &AlertsConfig) -> Result<Alerts, AlertsError> {
        let command = config.command.split_first().map(|(program, args)| Command {
            program: program.clone(),
            args: args.to_vec(),
            timeout: Duration::from_secs(config.command_timeout_secs.max(1)),
        });
        let webhook = match &config.webhook_url {
            Some(url) => Some(webhook(config, url)?),
            None => None,
        };
        Ok(Alerts::build(config, command, webhook))
    }

    /// Alerts that are logged only (no `[alerts]` table, and tests).
    pub fn log_only() -> Alerts {
        Alerts::build(&AlertsConfig::default(), None, None)
    }

    fn build(config: &AlertsConfig, command: Option<Command>, webhook: Option<Webhook>) -> Alerts {
        Alerts {
            inner: Arc::new(Inner {
                command,
                webhook,
                min_interval: Duration::from_secs(config.min_interval_secs),
                refresh_failing: Duration::from_secs(config.refresh_failing_secs),
                storm_failures: usize::try_from(config.password_storm_failures.max(1))
                    .unwrap_or(usize::MAX),
                storm_window: Duration::from_secs(config.password_storm_window_secs.max(1)),
                last_sent: Mutex::new(HashMap::new()),
                failing_since: Mutex::new(HashMap::new()),
                failures: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Raises an alert: logs it (one warn line) and delivers it in a task,
    /// unless one of the same event for the same account went out less
    /// than `min_interval_secs` ago (then it is logged at info only).
    /// Never blocks. Returns whether it went out.
    pub fn raise(&self, alert: Alert) -> bool {
        let alert = Alert {
            event: alert.event,
            account: text::printable(&alert.account, 200),
            reason: text::flatten(&alert.reason),
            advice: text::flatten(&alert.advice),
        };
        let now = Instant::now();
        {
            let mut last = lock(&self.inner.last_sent);
            let key = (alert.account.clone(), alert.event);
            if let Some(at) = last.get(&key)
                && now.duration_since(*at) < self.inner.min_interval
            {
                tracing::info!(
                    event = alert.event.name(),
                    account = %alert.account,
                    reason = %alert.reason,
                    "alert not sent again: one went out for this account less than min_interval_secs ago"
                );
                return false;
            }
            if last.len() >= 10_000 {
                let keep = self.inner.min_interval;
                last.retain(|_, at| now.duration_since(*at) < keep);
            }
            last.insert(key, now);
        }
        tracing::warn!(
            event = alert.event.name(),
            account = %alert.account,
            reason = %alert.reason,
            advice = %alert.advice,
            "alert"
        );
        if self.inner.command.is_none() && self.inner.webhook.is_none() {
            return true;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                let inner = self.inner.clone();
                rt.spawn(async move { deliver(&inner, &alert).await });
            }
            Err(_) => tracing::warn!(
                event = alert.event.name(),
                "alert logged only: no runtime to deliver it from"
            ),
        }
        true
    }

    /// A rotated refresh token could not be saved (the token source's
    /// hook). `reason` is the sentence saying so and why (no secret, no
    /// token).
    pub fn token_not_saved(&self, account: &str, reason: &str) -> bool {
        self.raise(Alert {
            event: Event::TokenNotSaved,
            account: account.to_string(),
            reason: reason.to_string(),
            advice: "check the state directory (free space, permissions) and mailbridge's log; until the token is on disk a restart loses the grant".into(),
        })
    }

    /// A refresh failed for a temporary reason: raises
    /// [`Event::RefreshFailing`] once failures have lasted
    /// `refresh_failing_secs` without a success between.
    pub fn refresh_failed(&self, account: &str, reason: &str) -> bool {
        let now = Instant::now();
        let since = *lock(&self.inner.failing_since)
            .entry(account.to_string())
            .or_insert(now);
        let lasted = now.duration_since(since);
        if lasted < self.inner.refresh_failing {
            return false;
        }
        self.raise(Alert {
            event: Event::RefreshFailing,
            account: account.to_string(),
            reason: format!(
                "token refreshes have failed for {}: {reason}",
                match lasted.as_secs() {
                    s if s < 120 => format!("{s} s"),
                    s => format!("{} min", s / 60),
                }
            ),
            advice: "check that this machine reaches the provider's token endpoint (network, proxy, DNS) and the provider's status page; the grant is kept".into(),
        })
    }

    /// A refresh (or a login with a token) succeeded: failures start
    /// counting afresh.
    pub fn refresh_succeeded(&self, account: &str) {
        let mut failing = lock(&self.inner.failing_since);
        if failing.remove(account).is_some() {
            tracing::info!(account, "token refreshes work again");
        }
    }

    /// A login of `account` from `peer` failed on the local password:
    /// raises [`Event::PasswordStorm`] at `password_storm_failures` within
    /// `password_storm_window_secs`.
    pub fn wrong_password(&self, account: &str, peer: IpAddr) -> bool {
        let now = Instant::now();
        let count = {
            let mut all = lock(&self.inner.failures);
            let recent = all.entry(account.to_string()).or_default();
            recent.push_back(now);
            while recent
                .front()
                .is_some_and(|t| now.duration_since(*t) > self.inner.storm_window)
                || recent.len() > self.inner.storm_failures
            {
                recent.pop_front();
            }
            recent.len()
        };
        if count < self.inner.storm_failures {
            return false;
        }
        self.raise(Alert {
            event: Event::PasswordStorm,
            account: account.to_string(),
            reason: format!(
                "{count} failed logins within {} s, the last from {peer}",
                self.inner.storm_window.as_secs()
            ),
            advice: "a client has an old local password saved (correct it there), or someone is guessing it: mailbridge's log has each address; backoff slows them down".into(),
        })
    }
}

/// The webhook of `[alerts]`: its client (TLS verified, trusting the CA
/// file instead of the system's when one is given; no redirects) and
/// secret.
fn webhook(config: &AlertsConfig, url: &str) -> Result<Webhook, AlertsError> {
    let timeout = Duration::from_secs(config.webhook_timeout_secs.max(1));
    let mut builder = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(timeout)
        .connect_timeout(timeout)
        .user_agent(concat!("mailbridge/", env!("CARGO_PKG_VERSION")));
    if let Some(path) = &config.webhook_ca_file {
        let pem = std::fs::read(path).map_err(|source| AlertsError::Read {
            field: "webhook_ca_file",
            path: path.clone(),
            source,
        })?;
        let certs =
            reqwest::Certificate::from_pem_bundle(&pem).map_err(|source| AlertsError::CaFile {
                path: path.clone(),
                source: Some(source),
            })?;
        if certs.is_empty() {
            return Err(AlertsError::CaFile {
                path: path.clone(),
                source: None,
            });
        }
        builder = builder.tls_built_in_root_certs(false);
        for c in certs {
            builder = builder.add_root_certificate(c);
        }
    }
    let secret = match &config.webhook_secret_file {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|source| AlertsError::Read {
                field: "webhook_secret_file",
                path: path.clone(),
                source,
            })?;
            let first = text.lines().next().unwrap_or("").trim().to_string();
            if first.is_empty() || reqwest::header::HeaderValue::from_str(&first).is_err() {
                return Err(AlertsError::Secret { path: path.clone() });
            }
            let header = match &config.webhook_secret_header {
                Some(h) => reqwest::header::HeaderName::from_bytes(h.as_bytes())
                    .map_err(|_| AlertsError::Secret { path: path.clone() })?,
                None => reqwest::header::AUTHORIZATION,
            };
            let value = if config.webhook_secret_header.is_some() {
                first
            } else {
                format!("Bearer {first}")
            };
            Some((header, SecretString::from(value)))
        }
        None => None,
    };
    let url = reqwest::Url::parse(url).map_err(|_| AlertsError::Url)?;
    Ok(Webhook {
        url,
        client: builder.build().map_err(AlertsError::Http)?,
        secret,
    })
}

/// Runs the command and calls the webhook, at the same time; logs how
/// each went.
async fn deliver(inner: &Inner, alert: &Alert) {
    let command = async {
        if let Some(c) = &inner.command {
            run_command(c, alert).await;
        }
    };
    let webhook = async {
        if let Some(w) = &inner.webhook {
            post(w, alert).await;
        }
    };
    tokio::join!(command, webhook);
}

async fn run_command(c: &Command, alert: &Alert) {
    let event = alert.event.name();
    let mut cmd = tokio::process::Command::new(&c.program);
    cmd.args(&c.args)
        .env("MAILBRIDGE_EVENT", event)
        .env("MAILBRIDGE_ACCOUNT", &alert.account)
        .env("MAILBRIDGE_REASON", &alert.reason)
        .env("MAILBRIDGE_ADVICE", &alert.advice)
        .env("MAILBRIDGE_TIME", unix_now().to_string())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(event, program = %c.program, error = %e, "cannot start the alert command");
            return;
        }
    };
    match tokio::time::timeout(c.timeout, child.wait_with_output()).await {
        Ok(Ok(out)) if out.status.success() => {
            tracing::info!(event, account = %alert.account, status = %out.status, "alert command done");
        }
        Ok(Ok(out)) => {
            let said = String::from_utf8_lossy(&out.stderr);
            let said = text::printable(said.lines().next().unwrap_or(""), 200);
            tracing::warn!(event, account = %alert.account, status = %out.status, stderr = %said, "alert command failed");
        }
        Ok(Err(e)) => {
            tracing::warn!(event, error = %e, "alert command: cannot wait for it");
        }
        Err(_) => tracing::warn!(
            event,
            account = %alert.account,
            timeout_secs = c.timeout.as_secs(),
            "alert command did not finish in time; killed"
        ),
    }
}

async fn post(w: &Webhook, alert: &Alert) {
    let event = alert.event.name();
    let host = w.url.host_str().unwrap_or("").to_string();
    let body = serde_json::json!({
        "event": event,
        "account": alert.account,
        "reason": alert.reason,
        "advice": alert.advice,
        "time": unix_now(),
    });
    let mut request = w.client.post(w.url.clone()).json(&body);
    if let Some((name, secret)) = &w.secret
        && let Ok(mut value) = reqwest::header::HeaderValue::from_str(secret.expose_secret())
    {
        value.set_sensitive(true);
        request = request.header(name.clone(), value);
    }
    match request.send().await {
        Ok(r) if r.status().is_success() => {
            tracing::info!(event, account = %alert.account, %host, status = r.status().as_u16(), "alert webhook done");
        }
        Ok(r) => {
            tracing::warn!(event, account = %alert.account, %host, status = r.status().as_u16(), "alert webhook refused the alert");
        }
        Err(e) => {
            // Without the URL: it may hold a secret.
            let e = e.without_url();
            tracing::warn!(event, account = %alert.account, %host, error = %crate::report::chain(&e), "alert webhook failed");
        }
    }
}

/// Password key mode, Microsoft: the accounts whose grant was last used
/// `warn_days` or more days before `now` (unix seconds), as alerts.
/// Microsoft ends refresh tokens unused for 90 days, and in this mode only
/// a client's login uses one. The last use is the later of the grant's
/// creation and the last successful login (the account's metadata); an
/// account whose metadata has neither is not judged.
pub fn unused_grants(
    settings: &Settings,
    store: &dyn TokenStore,
    now: u64,
    warn_days: u64,
) -> Vec<Alert> {
    let names = match store.accounts() {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!(error = %crate::report::chain(&e), "unused-grant check: cannot list accounts");
            return Vec::new();
        }
    };
    let mut alerts = Vec::new();
    for name in names {
        let Some(account) = settings.account_for(&name) else {
            continue;
        };
        let microsoft = settings
            .providers
            .get(&account.provider)
            .is_some_and(|p| p.preset == Preset::Microsoft);
        if !microsoft || !account.grant.has_refresh_token() {
            continue;
        }
        let Ok(Some(meta)) = store.load_meta(&name) else {
            continue;
        };
        let last_use = meta.created_at.max(meta.last_login_at.unwrap_or(0));
        if last_use == 0 || now <= last_use {
            continue;
        }
        let days = (now - last_use) / 86_400;
        if days < warn_days {
            continue;
        }
        let reason = if days >= 90 {
            format!(
                "the grant was last used {days} days ago: Microsoft ends refresh tokens unused for 90 days, so it has most likely expired"
            )
        } else {
            format!(
                "the grant was last used {days} days ago: Microsoft ends refresh tokens unused for 90 days, in about {} days for this one",
                90 - days
            )
        };
        alerts.push(Alert {
            event: Event::GrantExpiring,
            account: name.clone(),
            reason,
            advice: format!(
                "log in with a mail client as {name} before then (any successful login renews the grant), or run mailbridge with key_mode = \"service\", which refreshes grants in the background; once expired: `mailbridge account reauthorize {name}`"
            ),
        });
    }
    alerts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> AlertsConfig {
        toml::from_str(extra).unwrap()
    }

    fn alert(account: &str, event: Event) -> Alert {
        Alert {
            event,
            account: account.into(),
            reason: "why\nwith a newline".into(),
            advice: "what to do".into(),
        }
    }

    #[test]
    fn one_alert_per_account_and_event_within_the_interval() {
        let a = Alerts::new(&config("min_interval_secs = 3600")).unwrap();
        assert!(a.raise(alert("a@x", Event::GrantRefused)));
        assert!(!a.raise(alert("a@x", Event::GrantRefused)));
        // Another event, another account: their own limits.
        assert!(a.raise(alert("a@x", Event::PasswordStorm)));
        assert!(a.raise(alert("b@x", Event::GrantRefused)));
        let a = Alerts::new(&config("min_interval_secs = 0")).unwrap();
        assert!(a.raise(alert("a@x", Event::GrantRefused)));
        assert!(a.raise(alert("a@x", Event::GrantRefused)));
    }

    #[test]
    fn a_storm_is_n_failures_within_the_window() {
        let a = Alerts::new(&config(
            "password_storm_failures = 3\npassword_storm_window_secs = 600",
        ))
        .unwrap();
        let peer: IpAddr = "127.0.0.9".parse().unwrap();
        assert!(!a.wrong_password("a@x", peer));
        assert!(!a.wrong_password("a@x", peer));
        assert!(!a.wrong_password("b@x", peer), "accounts count apart");
        assert!(a.wrong_password("a@x", peer));
        // Rate-limited afterwards.
        assert!(!a.wrong_password("a@x", peer));
    }

    #[test]
    fn refreshes_failing_alert_after_the_threshold_only() {
        let a = Alerts::new(&config("refresh_failing_secs = 3600")).unwrap();
        assert!(!a.refresh_failed("a@x", "provider down"));
        assert!(!a.refresh_failed("a@x", "provider down"));
        let now = Alerts::new(&config("refresh_failing_secs = 0")).unwrap();
        assert!(now.refresh_failed("a@x", "provider down"));
        // A success resets the clock.
        let later = Alerts::new(&config("refresh_failing_secs = 1")).unwrap();
        assert!(!later.refresh_failed("a@x", "down"));
        later.refresh_succeeded("a@x");
        assert!(!later.refresh_failed("a@x", "down"));
    }

    #[test]
    fn unreadable_files_stop_the_start_with_the_field() {
        let e = Alerts::new(&config(
            "webhook_url = \"https://h.example/\"\nwebhook_ca_file = \"/nonexistent/ca.pem\"",
        ))
        .unwrap_err();
        assert!(e.to_string().contains("webhook_ca_file"), "{e}");
        let e = Alerts::new(&config(
            "webhook_url = \"https://h.example/\"\nwebhook_secret_file = \"/nonexistent/s\"",
        ))
        .unwrap_err();
        assert!(e.to_string().contains("webhook_secret_file"), "{e}");
    }

    #[test]
    fn the_webhook_secret_is_read_from_its_file_and_never_shown() {
        let path =
            std::env::temp_dir().join(format!("mailbridge-alerts-secret-{}", std::process::id()));
        std::fs::write(&path, "hook-secret-5e5e\nsecond line ignored\n").unwrap();
        let cfg = |header: &str| {
            config(&format!(
                "webhook_url = \"https://h.example/\"\nwebhook_secret_file = \"{}\"\n{header}",
                path.display()
            ))
        };
        let a = Alerts::new(&cfg("")).unwrap();
        let (name, value) = a.inner.webhook.as_ref().unwrap().secret.clone().unwrap();
        assert_eq!(name, reqwest::header::AUTHORIZATION);
        assert_eq!(value.expose_secret(), "Bearer hook-secret-5e5e");
        assert!(!format!("{a:?}").contains("hook-secret"));
        let a = Alerts::new(&cfg("webhook_secret_header = \"X-Hook-Token\"")).unwrap();
        let (name, value) = a.inner.webhook.as_ref().unwrap().secret.clone().unwrap();
        assert_eq!(name.as_str(), "x-hook-token");
        assert_eq!(value.expose_secret(), "hook-secret-5e5e");
        std::fs::write(&path, "\n").unwrap();
        let e = Alerts::new(&cfg("")).unwrap_err();
        assert!(matches!(e, AlertsError::Secret { .. }), "{e}");
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn debug_names_no_url_path() {
        let a = Alerts::new(&config(
            "webhook_url = \"https://hooks.example/services/T0/B0/sekrit-path\"",
        ))
        .unwrap();
        let d = format!("{a:?}");
        assert!(d.contains("hooks.example") && !d.contains("sekrit"), "{d}");
    }
}
