//! The token source: cached access tokens and single-flight refresh.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use oauth2::{RefreshToken, Scope, TokenResponse};
use secrecy::{ExposeSecret, SecretString};

use super::MIN_TOKEN_LIFETIME;
use super::flows;
use crate::clock::unix_now;
use crate::config::{Account, GrantKind};
use crate::provider::Provider;
use crate::vault::{Unlocked, Vault, VaultError};

/// Assumed lifetime when a token response has no `expires_in`.
const DEFAULT_LIFETIME: Duration = Duration::from_secs(3600);

/// An access token with its expiry.
#[derive(Clone)]
pub struct AccessToken {
    /// The bearer token. Never logged.
    pub secret: SecretString,
    /// When it stops working, by the provider's `expires_in`.
    pub expires_at: Instant,
    /// Distinguishes tokens of one account, so a caller can say "this one
    /// was refused, give me a newer one".
    pub generation: u64,
}

impl std::fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessToken")
            .field(
                "expires_in",
                &self.expires_at.saturating_duration_since(Instant::now()),
            )
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

/// Why no access token could be had. Messages are for people and carry no
/// secret.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TokenError {
    /// The provider refused the refresh (e.g. `invalid_grant`).
    #[error("the provider refused the grant: {code}{}{}", if .description.is_empty() { "" } else { ": " }, .description)]
    Refused {
        /// The OAuth2 `error` code.
        code: String,
        /// The provider's `error_description` (one line), maybe empty.
        description: String,
        /// The provider said the refusal may not last (Fastmail marks an
        /// `invalid_grant` of a locked user `"temporary": true`).
        temporary: bool,
    },
    /// The token endpoint could not be reached.
    #[error("cannot reach the token endpoint of provider `{provider}`{}", flows::network_cause(source.as_ref()))]
    Unreachable {
        /// The provider name.
        provider: String,
        /// The HTTP client's error (shared: a failed refresh is handed to
        /// every login that waited for it).
        #[source]
        source: Arc<dyn std::error::Error + Send + Sync>,
    },
    /// The token endpoint answered something that is not a token response.
    #[error("the token endpoint of provider `{provider}` sent an unreadable answer")]
    BadResponse {
        /// The provider name.
        provider: String,
    },
    /// A Microsoft token for another resource than Exchange Online.
    #[error(
        "the provider issued a token for {audience}, not for Outlook/Exchange Online, so the mail servers will refuse it; this happens when a Graph or bare scope comes first: put https://outlook.office.com/IMAP.AccessAsUser.All first in the scopes"
    )]
    WrongAudience {
        /// The token's `aud`.
        audience: String,
    },
    /// The stored grant has no refresh token.
    #[error("the stored grant has no refresh token; re-authorize the account")]
    NoRefreshToken,
    /// The provider's configuration is unusable (e.g. bad URL, unreadable
    /// key file).
    #[error("provider `{provider}`: {source}")]
    Config {
        /// The provider name.
        provider: String,
        /// Why.
        source: Arc<flows::FlowError>,
    },
    /// The rotated refresh token could not be saved; the new access token is
    /// not used.
    #[error("cannot save the rotated refresh token{}", store_cause(.0))]
    Store(#[source] Arc<VaultError>),
}

/// What a failed save of a rotated token says to a person: the vault's
/// sentence (another writer changed the grant, say), but not the storage
/// backend's own words, which are for the log.
fn store_cause(e: &VaultError) -> String {
    match e {
        VaultError::Store(_) => " (the token store failed; mailbridge's log says why)".into(),
        other => format!(": {other}"),
    }
}

impl TokenError {
    /// What a failed token request means for a login.
    fn from_flow(provider: &Provider, e: flows::FlowError) -> TokenError {
        match e {
            flows::FlowError::Token {
                code,
                description,
                temporary,
            } => TokenError::Refused {
                code,
                description,
                temporary,
            },
            flows::FlowError::Http(source) => TokenError::Unreachable {
                provider: provider.name.clone(),
                source: Arc::from(source),
            },
            flows::FlowError::BadResponse(_) => TokenError::BadResponse {
                provider: provider.name.clone(),
            },
            other => TokenError::Config {
                provider: provider.name.clone(),
                source: Arc::new(other),
            },
        }
    }

    /// True when retrying later may help (network, provider trouble).
    pub fn is_temporary(&self) -> bool {
        match self {
            TokenError::Unreachable { .. }
            | TokenError::BadResponse { .. }
            | TokenError::Store(_) => true,
            TokenError::Refused {
                code, temporary, ..
            } => *temporary || code == "temporarily_unavailable" || code == "server_error",
            TokenError::NoRefreshToken
            | TokenError::Config { .. }
            | TokenError::WrongAudience { .. } => false,
        }
    }
}

/// The HTTP client for token endpoints could not be built (its TLS setup
/// failed, for instance).
#[derive(Debug, thiserror::Error)]
#[error("cannot set up the HTTP client for token endpoints")]
pub struct HttpClientError(#[source] reqwest::Error);

#[derive(Default)]
struct Slot {
    cached: Mutex<Option<AccessToken>>,
    /// The outcome of the last refresh that failed, with the refresh count
    /// at the time: callers that queued behind a failed refresh get its
    /// error instead of each asking the provider again.
    failed: Mutex<Option<(u64, TokenError)>>,
    /// How many refreshes have finished.
    refreshes: AtomicU64,
    /// Held while refreshing: concurrent logins of one account wait here and
    /// then find the fresh token in `cached`.
    refreshing: tokio::sync::Mutex<()>,
}

/// Hands out access tokens for unlocked accounts.
pub struct TokenSource {
    http: reqwest::Client,
    vault: Arc<Vault>,
    slots: Mutex<HashMap<String, Arc<Slot>>>,
    generation: AtomicU64,
}

impl TokenSource {
    /// A token source that refreshes through `http` and saves rotated
    /// refresh tokens through `vault`.
    pub fn new(http: reqwest::Client, vault: Arc<Vault>) -> TokenSource {
        TokenSource {
            http,
            vault,
            slots: Mutex::new(HashMap::new()),
            generation: AtomicU64::new(1),
        }
    }

    /// An HTTP client fit for token endpoints: no redirects (a redirected
    /// token request could leak the grant), bounded time. Fails rather
    /// than fall back to a default client, which would follow redirects
    /// and wait forever.
    pub fn http_client() -> Result<reqwest::Client, HttpClientError> {
        reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(30))
            .connect_timeout(Duration::from_secs(10))
            .user_agent(concat!("mailbridge/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(HttpClientError)
    }

    /// The HTTP client this source talks to token endpoints with.
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    fn slot(&self, account: &str) -> Arc<Slot> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.entry(account.to_string()).or_default().clone()
    }

    /// Forgets the cached access token of an account (e.g. after the
    /// account was removed or re-authorized).
    pub fn forget(&self, account: &str) {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.remove(account);
    }

    /// Forgets the cached access tokens of the accounts for which `stale`
    /// says so (a config reload changed how their tokens are obtained).
    pub fn forget_where(&self, mut stale: impl FnMut(&str) -> bool) {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.retain(|account, _| !stale(account));
    }

    /// A freshly refreshed token, whatever is cached (the background
    /// refresh uses this to keep grants alive). Shares a refresh already in
    /// flight.
    pub async fn renew(
        &self,
        provider: &Provider,
        account: &Account,
        unlocked: &Unlocked,
    ) -> Result<AccessToken, TokenError> {
        let cached = self
            .slot(unlocked.account())
            .cached
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        self.token(provider, account, unlocked, cached.as_ref())
            .await
    }

    /// An access token for the account: the cached one while it has at
    /// least ten minutes left and is not `refused`, else a refreshed one.
    /// Concurrent callers for one account share a single refresh.
    pub async fn token(
        &self,
        provider: &Provider,
        account: &Account,
        unlocked: &Unlocked,
        refused: Option<&AccessToken>,
    ) -> Result<AccessToken, TokenError> {
        let slot = self.slot(unlocked.account());
        let usable = |slot: &Slot| -> Option<AccessToken> {
            let cached = slot.cached.lock().unwrap_or_else(|p| p.into_inner());
            let t = cached.as_ref()?;
            let fresh =
                t.expires_at.saturating_duration_since(Instant::now()) >= MIN_TOKEN_LIFETIME;
            let not_refused = refused.is_none_or(|r| r.generation != t.generation);
            (fresh && not_refused).then(|| t.clone())
        };
        if let Some(t) = usable(&slot) {
            return Ok(t);
        }
        let seen = slot.refreshes.load(Ordering::Acquire);
        let _flight = slot.refreshing.lock().await;
        // Whoever held the lock before us may have refreshed already.
        if let Some(t) = usable(&slot) {
            return Ok(t);
        }
        if slot.refreshes.load(Ordering::Acquire) != seen {
            let failed = slot.failed.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((_, e)) = failed.as_ref().filter(|(n, _)| *n > seen) {
                return Err(e.clone());
            }
        }
        let token = self.fetch(provider, account, unlocked).await;
        let n = slot.refreshes.fetch_add(1, Ordering::AcqRel) + 1;
        *slot.failed.lock().unwrap_or_else(|p| p.into_inner()) =
            token.as_ref().err().map(|e| (n, e.clone()));
        match &token {
            Ok(t) => {
                *slot.cached.lock().unwrap_or_else(|p| p.into_inner()) = Some(t.clone());
                let expires = unix_now()
                    + t.expires_at
                        .saturating_duration_since(Instant::now())
                        .as_secs();
                self.note_meta(unlocked.account(), |m| {
                    m.access_expires_at = Some(expires);
                    m.last_error = None;
                });
            }
            Err(e) => {
                let msg = e.to_string();
                self.note_meta(unlocked.account(), |m| m.last_error = Some(msg));
            }
        }
        token
    }

    /// Records a refresh's outcome in the account's metadata (for `account
    /// list`). A store that cannot take it does not fail the refresh, but
    /// it is logged.
    fn note_meta(&self, account: &str, f: impl FnOnce(&mut crate::store::AccountMeta)) {
        if let Err(e) = self.vault.update_meta(account, f) {
            tracing::warn!(account, error = %crate::report::chain(&e), "cannot record the refresh in the account's metadata");
        }
    }

    /// A new access token, by the account's kind of grant, checked for the
    /// right audience where the provider's tokens say.
    async fn fetch(
        &self,
        provider: &Provider,
        account: &Account,
        unlocked: &Unlocked,
    ) -> Result<AccessToken, TokenError> {
        let started = Instant::now();
        let (secret, lifetime) = match account.grant {
            GrantKind::AuthorizationCode | GrantKind::Password => {
                self.refresh(provider, unlocked).await?
            }
            GrantKind::ClientCredentials | GrantKind::ServiceAccount => {
                let got = super::app::app_token(provider, account, &self.http)
                    .await
                    .map_err(|e| TokenError::from_flow(provider, e))?;
                (got.access_token, got.expires_in)
            }
        };
        super::checks::check_audience(provider, &secret).map_err(|w| {
            TokenError::WrongAudience {
                audience: w.audience,
            }
        })?;
        let lifetime = lifetime.unwrap_or(DEFAULT_LIFETIME);
        if lifetime < MIN_TOKEN_LIFETIME {
            tracing::warn!(
                provider = %provider.name,
                lifetime_secs = lifetime.as_secs(),
                "the provider issues access tokens with less than 10 minutes of life"
            );
        }
        tracing::info!(
            provider = %provider.name,
            grant = account.grant.name(),
            lifetime_secs = lifetime.as_secs(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "access token refreshed"
        );
        Ok(AccessToken {
            secret,
            expires_at: started + lifetime,
            generation: self.generation.fetch_add(1, Ordering::Relaxed),
        })
    }

    /// A new access token from the stored refresh token; a rotated refresh
    /// token is sealed and flushed before the access token is returned.
    async fn refresh(
        &self,
        provider: &Provider,
        unlocked: &Unlocked,
    ) -> Result<(SecretString, Option<Duration>), TokenError> {
        let refresh_token = unlocked.refresh_token().ok_or(TokenError::NoRefreshToken)?;
        // A dynamically registered client refreshes as itself, secretless.
        let registered = unlocked.client_id();
        let client = flows::token_client(
            registered.as_deref().unwrap_or(&provider.client_id),
            provider
                .client_secret
                .as_ref()
                .filter(|_| registered.is_none()),
            &provider.token_url,
        )
        .map_err(|e| TokenError::from_flow(provider, e))?;
        let rt = RefreshToken::new(refresh_token.expose_secret().to_string());
        tracing::debug!(provider = %provider.name, "refreshing access token");
        let response = client
            .exchange_refresh_token(&rt)
            .add_scopes(provider.scopes.iter().map(|s| Scope::new(s.clone())))
            .request_async(&self.http)
            .await
            .map_err(|e| TokenError::from_flow(provider, flows::token_error(e)))?;

        // Persist a rotated refresh token before the access token is used:
        // if we crashed after using it, the stored one might already be dead.
        if let Some(new_rt) = response.refresh_token() {
            if new_rt.secret() != refresh_token.expose_secret() {
                self.vault
                    .store_rotated(unlocked, SecretString::from(new_rt.secret().clone()))
                    .await
                    .map_err(|e| TokenError::Store(Arc::new(e)))?;
                tracing::debug!(provider = %provider.name, "rotated refresh token saved");
            }
        }
        Ok((
            SecretString::from(response.access_token().secret().clone()),
            response.expires_in(),
        ))
    }
}

/// Collapses whitespace and caps the length, for protocol reply lines.
pub use mailbridge_proto::text::flatten as one_line;

#[cfg(test)]
mod tests {
    use super::*;

    fn provider(token_url: &str) -> Provider {
        let c: crate::config::ProviderConfig = toml::from_str(&format!(
            "preset = \"custom\"\nclient_id = \"id\"\ntoken_url = \"{token_url}\""
        ))
        .unwrap();
        crate::provider::resolve("corp", &c).unwrap()
    }

    #[tokio::test]
    async fn an_unreachable_token_endpoint_is_a_sentence_with_its_cause_kept() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/token", listener.local_addr().unwrap());
        drop(listener);
        let http = TokenSource::http_client().unwrap();
        let e = http.post(&url).send().await.unwrap_err();
        let e = TokenError::from_flow(&provider(&url), flows::FlowError::http(e));
        assert!(e.is_temporary());
        assert_eq!(
            e.to_string(),
            "cannot reach the token endpoint of provider `corp` (connection refused)"
        );
        // The HTTP client's own words are for the log.
        let detail = crate::report::chain(&e);
        assert!(detail.len() > e.to_string().len(), "{detail}");
    }

    #[test]
    fn a_store_failure_keeps_the_vault_error() {
        let e = TokenError::Store(Arc::new(VaultError::NotServiceMode));
        let source = std::error::Error::source(&e).expect("source kept");
        // Shared, as a failed refresh is handed to every waiting login.
        assert!(source.downcast_ref::<Arc<VaultError>>().is_some());
        assert!(e.is_temporary());
        // The backend's words go to the log, not into the sentence.
        let backend = TokenError::Store(Arc::new(VaultError::Store(
            crate::store::StoreError::Backend {
                path: "/var/lib/mailbridge".into(),
                reason: "sled: io error: No space left".into(),
            },
        )));
        assert_eq!(
            backend.to_string(),
            "cannot save the rotated refresh token (the token store failed; mailbridge's log says why)"
        );
        assert!(crate::report::chain(&backend).contains("No space left"));
    }
}
