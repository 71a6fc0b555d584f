//! The token source: cached access tokens and single-flight refresh, each
//! refresh in a task that owns it, so a rotated refresh token is saved
//! whatever happens to the logins that asked for it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use oauth2::{RefreshToken, Scope, TokenResponse};
use secrecy::{ExposeSecret, SecretString};

use super::MIN_TOKEN_LIFETIME;
use super::flows;
use crate::clock::unix_now;
use crate::config::{Account, GrantKind};
use crate::provider::Provider;
use crate::store::seal::SharedAccess;
use crate::vault::{Unlocked, Vault, VaultError};

/// Assumed lifetime when a token response has no `expires_in` (which is
/// then logged).
const DEFAULT_LIFETIME: Duration = Duration::from_secs(3600);

/// An access token with its expiry.
#[derive(Clone)]
pub struct AccessToken {
    /// The bearer token. Never logged.
    pub secret: SecretString,
    /// When it stops working, by the provider's `expires_in`.
    pub expires_at: Instant,
    /// How long it lives in all (`expires_in`): a token that lives less
    /// than a caller's floor is fresh for a share of this.
    pub lifetime: Duration,
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
    /// The refresh this login waited for ended without an outcome (its
    /// task failed), or reloads kept replacing it.
    #[error("the token refresh was interrupted; try again")]
    Interrupted,
    /// A store shared with other instances could not be reached to take
    /// its refresh lock or read the grant (a refresh without them could
    /// spend a refresh token another instance already rotated).
    #[error("the shared token store cannot coordinate the token refresh just now: {reason}")]
    Store {
        /// The store's words (no secret).
        reason: String,
    },
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
            | TokenError::Interrupted
            | TokenError::Store { .. } => true,
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

/// The share of its own lifetime a token must have left to be handed out
/// when that is less than the floor asked for: a token that lives less
/// than the floor is reused for its first half (so one refresh serves
/// every login waiting for it) instead of never.
const SHARE_DIVISOR: u32 = 2;

/// Whether a token with `remaining` of its `lifetime` left may be handed
/// out to a caller that wants at least `floor` left: it must have at least
/// `min(floor, lifetime / 2)` left, and not be expired.
pub fn fresh_enough(remaining: Duration, lifetime: Duration, floor: Duration) -> bool {
    !remaining.is_zero() && remaining >= floor.min(lifetime / SHARE_DIVISOR)
}

/// The outcome of one refresh, shared by every login that waited for it.
type Outcome = Option<Result<AccessToken, TokenError>>;

/// A refresh in progress: it runs in a task of its own, so it ends (and
/// saves a rotated refresh token) whatever happens to the logins waiting
/// for it.
#[derive(Clone)]
struct Flight {
    id: u64,
    outcome: watch::Receiver<Outcome>,
    /// A reload changed how this account's tokens are obtained since the
    /// refresh began: its token is neither cached nor handed to logins
    /// that did not already wait for it.
    stale: Arc<AtomicBool>,
}

#[derive(Default)]
struct SlotState {
    cached: Option<AccessToken>,
    flight: Option<Flight>,
    /// A digest of the last token a server refused, so a refresh does not
    /// take it up again from a shared store.
    refused: Option<[u8; 32]>,
}

/// A digest of a token (to recognise it without keeping it).
fn digest(token: &SecretString) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    Sha256::digest(token.expose_secret().as_bytes()).into()
}

/// One account's tokens. Never removed while the process runs: two slots
/// for one account could refresh with the same refresh token at once,
/// which a provider with reuse detection treats as a replay.
#[derive(Default)]
struct Slot {
    state: Mutex<SlotState>,
    /// A background task is retrying the save of an unsaved rotation.
    retrying: AtomicBool,
}

impl Slot {
    fn lock(&self) -> std::sync::MutexGuard<'_, SlotState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Counts refreshes in flight, for the drain at shutdown.
struct InFlight(watch::Sender<usize>);

impl InFlight {
    fn enter(self: &Arc<Self>) -> InFlightGuard {
        self.0.send_modify(|n| *n += 1);
        InFlightGuard(self.clone())
    }
}

struct InFlightGuard(Arc<InFlight>);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// Clears a slot's flight when its task ends, even by a panic, so later
/// logins never wait on a refresh that will not answer.
struct FlightEnd {
    slot: Arc<Slot>,
    id: u64,
}

impl Drop for FlightEnd {
    fn drop(&mut self) {
        let mut st = self.slot.lock();
        if st.flight.as_ref().is_some_and(|f| f.id == self.id) {
            st.flight = None;
        }
    }
}

struct Inner {
    /// For token requests: bounded by the refresh timeout, not the flows'.
    http: reqwest::Client,
    vault: Arc<Vault>,
    slots: Mutex<HashMap<String, Arc<Slot>>>,
    generation: AtomicU64,
    flights: AtomicU64,
    in_flight: Arc<InFlight>,
    /// The process's metrics (token requests are counted here).
    metrics: Arc<crate::metrics::Metrics>,
}

/// Hands out access tokens for unlocked accounts.
///
/// A refresh runs in a task that owns it (one per account at a time: a
/// login that needs a token while one is in flight waits for it and
/// shares its result). The task saves a rotated refresh token before it
/// publishes the access token, and it runs to the end whatever happens to
/// the logins that wait (a login timeout, a client gone, a reload, the
/// shutdown drain, which waits for it: [`TokenSource::drain`]).
pub struct TokenSource {
    /// For the flows the server runs itself (bounded like any flow).
    flows_http: reqwest::Client,
    inner: Arc<Inner>,
}

impl TokenSource {
    /// A token source that asks for tokens through `http` (see
    /// [`TokenSource::refresh_client`]) and saves rotated refresh tokens
    /// through `vault`. `flows_http` is what [`TokenSource::http`] hands
    /// out for flows and discovery.
    pub fn new(
        flows_http: reqwest::Client,
        http: reqwest::Client,
        vault: Arc<Vault>,
    ) -> TokenSource {
        TokenSource {
            flows_http,
            inner: Arc::new(Inner {
                http,
                vault,
                slots: Mutex::new(HashMap::new()),
                generation: AtomicU64::new(1),
                flights: AtomicU64::new(1),
                in_flight: Arc::new(InFlight(watch::channel(0).0)),
                metrics: Arc::new(crate::metrics::Metrics::new()),
            }),
        }
    }

    /// The process's metrics (made here, shared by the server).
    pub fn metrics(&self) -> &Arc<crate::metrics::Metrics> {
        &self.inner.metrics
    }

    /// An HTTP client fit for token endpoints: no redirects (a redirected
    /// token request could leak the grant), bounded time. Fails rather
    /// than fall back to a default client, which would follow redirects
    /// and wait forever.
    pub fn http_client() -> Result<reqwest::Client, HttpClientError> {
        Self::client_with_timeout(Duration::from_secs(30))
    }

    /// The HTTP client for refreshes: like [`TokenSource::http_client`]
    /// but a request may take up to `timeout`, since a provider that is
    /// slow to answer may already have rotated the refresh token.
    pub fn refresh_client(timeout: Duration) -> Result<reqwest::Client, HttpClientError> {
        Self::client_with_timeout(timeout)
    }

    fn client_with_timeout(timeout: Duration) -> Result<reqwest::Client, HttpClientError> {
        reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(timeout)
            .connect_timeout(Duration::from_secs(10))
            .user_agent(concat!("mailbridge/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(HttpClientError)
    }

    /// The HTTP client for flows and discovery.
    pub fn http(&self) -> &reqwest::Client {
        &self.flows_http
    }

    fn slot(&self, account: &str) -> Arc<Slot> {
        let mut slots = self.inner.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.entry(account.to_string()).or_default().clone()
    }

    /// Forgets the cached access token of an account (e.g. after the
    /// account was removed or re-authorized). A refresh in flight runs on
    /// and saves its rotated refresh token, but its access token is not
    /// kept, and the next login waits for it to end before refreshing.
    pub fn forget(&self, account: &str) {
        self.forget_where(|a| a == account);
    }

    /// Forgets the cached access tokens of the accounts for which `stale`
    /// says so (a config reload changed how their tokens are obtained), as
    /// [`TokenSource::forget`] does.
    pub fn forget_where(&self, mut stale: impl FnMut(&str) -> bool) {
        let slots = self.inner.slots.lock().unwrap_or_else(|p| p.into_inner());
        for (account, slot) in slots.iter() {
            if !stale(account) {
                continue;
            }
            let mut st = slot.lock();
            st.cached = None;
            if let Some(f) = &st.flight {
                f.stale.store(true, Ordering::Release);
                tracing::info!(account = %account, "a token refresh in flight finishes and saves its refresh token; its access token is not kept");
            }
        }
    }

    /// How many refreshes are in flight.
    pub fn refreshes_in_flight(&self) -> usize {
        *self.inner.in_flight.0.borrow()
    }

    /// Waits up to `limit` for the refreshes in flight to end (shutdown:
    /// a rotated refresh token must reach the disk before the process
    /// exits). Returns how many are still in flight.
    pub async fn drain(&self, limit: Duration) -> usize {
        let n = self.refreshes_in_flight();
        if n == 0 {
            return 0;
        }
        tracing::info!(
            refreshes = n,
            limit_secs = limit.as_secs(),
            "waiting for {n} token refreshes"
        );
        let mut rx = self.inner.in_flight.0.subscribe();
        let _ = tokio::time::timeout(limit, rx.wait_for(|n| *n == 0)).await;
        let left = self.refreshes_in_flight();
        if left == 0 {
            tracing::info!("token refreshes done");
        } else {
            tracing::error!(
                refreshes = left,
                "gave up waiting for {left} token refreshes; a refresh token the provider rotated may be lost"
            );
        }
        left
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
        let cached = self.slot(unlocked.account()).lock().cached.clone();
        self.token(
            provider,
            account,
            unlocked,
            cached.as_ref(),
            MIN_TOKEN_LIFETIME,
        )
        .await
    }

    /// An access token for the account: the cached one while it is fresh
    /// enough for `floor` ([`fresh_enough`]: at least `floor` left, or half
    /// its life for tokens that live less than twice that) and is not
    /// `refused`, else a refreshed one. Concurrent callers for one account
    /// share a single refresh.
    pub async fn token(
        &self,
        provider: &Provider,
        account: &Account,
        unlocked: &Unlocked,
        refused: Option<&AccessToken>,
        floor: Duration,
    ) -> Result<AccessToken, TokenError> {
        let slot = self.slot(unlocked.account());
        // A reload between two refreshes can make a login wait for one
        // refresh it cannot use; more than a few in a row is not worth
        // waiting for.
        const WAITS: usize = 4;
        for attempt in 0..WAITS {
            let (outcome, usable) = {
                let mut st = slot.lock();
                // A token the server refused is dropped, so no later login
                // is handed it again, even if the refresh below fails.
                if st
                    .cached
                    .as_ref()
                    .is_some_and(|t| refused.is_some_and(|r| r.generation == t.generation))
                {
                    st.cached = None;
                }
                if let Some(r) = refused {
                    st.refused = Some(digest(&r.secret));
                }
                if let Some(t) = st.cached.as_ref() {
                    let remaining = t.expires_at.saturating_duration_since(Instant::now());
                    if fresh_enough(remaining, t.lifetime, floor) {
                        return Ok(t.clone());
                    }
                }
                match st.flight.clone() {
                    Some(f) => {
                        // A refresh that began under settings a reload
                        // replaced: wait for it to end (it is spending the
                        // refresh token), then refresh anew.
                        let usable = !f.stale.load(Ordering::Acquire) || attempt + 1 == WAITS;
                        (f.outcome, usable)
                    }
                    None => {
                        let avoid = st.refused;
                        let f = self.start(&slot, provider, account, unlocked, avoid);
                        let rx = f.outcome.clone();
                        st.flight = Some(f);
                        (rx, true)
                    }
                }
            };
            let result = wait(outcome).await;
            if usable {
                return result;
            }
        }
        Err(TokenError::Interrupted)
    }

    /// Starts a refresh in a task of its own.
    fn start(
        &self,
        slot: &Arc<Slot>,
        provider: &Provider,
        account: &Account,
        unlocked: &Unlocked,
        avoid: Option<[u8; 32]>,
    ) -> Flight {
        let (tx, rx) = watch::channel(None);
        let id = self.inner.flights.fetch_add(1, Ordering::Relaxed);
        let stale = Arc::new(AtomicBool::new(false));
        let flight = Flight {
            id,
            outcome: rx,
            stale: stale.clone(),
        };
        let inner = self.inner.clone();
        let in_flight = inner.in_flight.enter();
        let end = FlightEnd {
            slot: slot.clone(),
            id,
        };
        let (provider, account, unlocked) = (provider.clone(), account.clone(), unlocked.clone());
        tokio::spawn(async move {
            let _in_flight = in_flight;
            let outcome = inner.fetch(&provider, &account, &unlocked, avoid).await;
            {
                let mut st = end.slot.lock();
                if let Ok(t) = &outcome
                    && !stale.load(Ordering::Acquire)
                {
                    st.cached = Some(t.clone());
                }
                if st.flight.as_ref().is_some_and(|f| f.id == id) {
                    st.flight = None;
                }
            }
            let _ = tx.send(Some(outcome.clone()));
            if unlocked.unsaved_for().is_some() {
                Inner::retry_save(&inner, &end.slot, &unlocked);
            }
            match &outcome {
                Ok(t) => {
                    let expires = unix_now()
                        + t.expires_at
                            .saturating_duration_since(Instant::now())
                            .as_secs();
                    inner.note_meta(unlocked.account(), |m| {
                        m.access_expires_at = Some(expires);
                        m.refreshed_at = Some(unix_now());
                        m.last_error = None;
                    });
                }
                Err(e) => {
                    let msg = e.to_string();
                    inner.note_meta(unlocked.account(), |m| m.last_error = Some(msg));
                }
            }
            drop(end);
        });
        flight
    }
}

/// The outcome of a refresh, once it has one.
async fn wait(mut outcome: watch::Receiver<Outcome>) -> Result<AccessToken, TokenError> {
    match outcome.wait_for(Option::is_some).await {
        Ok(v) => v.clone().unwrap_or(Err(TokenError::Interrupted)),
        // The task ended without an outcome (it panicked).
        Err(_) => Err(TokenError::Interrupted),
    }
}

/// First and longest pause between retries of a failed save.
const SAVE_RETRY: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(60));

impl Inner {
    /// Retries the save of `unlocked`'s unsaved rotated refresh token in
    /// the background, with backoff, until it is on disk or another
    /// writer replaced the grant. One such task per account.
    fn retry_save(inner: &Arc<Inner>, slot: &Arc<Slot>, unlocked: &Unlocked) {
        if slot.retrying.swap(true, Ordering::AcqRel) {
            return;
        }
        let (inner, slot, unlocked) = (inner.clone(), slot.clone(), unlocked.clone());
        tokio::spawn(async move {
            let mut pause = SAVE_RETRY.0;
            // Bounded: after a day of failures the next refresh retries.
            for _ in 0..2000 {
                if unlocked.unsaved_for().is_none() {
                    break;
                }
                tokio::time::sleep(pause).await;
                match inner.vault.save_unsaved(&unlocked).await {
                    Ok(_) => break,
                    Err(VaultError::Store(_)) => pause = (pause * 2).min(SAVE_RETRY.1),
                    // Replaced or re-keyed by someone else: nothing of ours
                    // to save over.
                    Err(e) => {
                        tracing::warn!(account = unlocked.account(), error = %crate::report::chain(&e), "stopped retrying the save of the rotated refresh token");
                        break;
                    }
                }
            }
            slot.retrying.store(false, Ordering::Release);
        });
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
        avoid: Option<[u8; 32]>,
    ) -> Result<AccessToken, TokenError> {
        let started = Instant::now();
        let (secret, lifetime, left) = match account.grant {
            GrantKind::AuthorizationCode | GrantKind::Password => {
                self.refresh(provider, unlocked, avoid).await?
            }
            GrantKind::ClientCredentials | GrantKind::ServiceAccount => {
                let got = super::app::app_token(provider, account, &self.http)
                    .await
                    .map_err(|e| TokenError::from_flow(provider, e))?;
                (got.access_token, got.expires_in, None)
            }
        };
        super::checks::check_audience(provider, &secret).map_err(|w| {
            TokenError::WrongAudience {
                audience: w.audience,
            }
        })?;
        let lifetime = match lifetime {
            Some(l) => l,
            None => {
                tracing::warn!(
                    provider = %provider.name,
                    assumed_secs = DEFAULT_LIFETIME.as_secs(),
                    "the token endpoint sent no expires_in (the open profile makes it mandatory); assuming the token lives an hour, and a server's refusal of it is answered with a refresh"
                );
                DEFAULT_LIFETIME
            }
        };
        if lifetime < MIN_TOKEN_LIFETIME {
            tracing::warn!(
                provider = %provider.name,
                lifetime_secs = lifetime.as_secs(),
                "the provider issues access tokens with less than 10 minutes of life; each is reused for the first half of its life"
            );
        }
        match left {
            None => tracing::info!(
                provider = %provider.name,
                grant = account.grant.name(),
                lifetime_secs = lifetime.as_secs(),
                elapsed_ms = started.elapsed().as_millis() as u64,
                "access token refreshed"
            ),
            Some(left) => tracing::info!(
                provider = %provider.name,
                account = unlocked.account(),
                left_secs = left.as_secs(),
                elapsed_ms = started.elapsed().as_millis() as u64,
                "access token taken from the shared store (another instance refreshed it)"
            ),
        }
        Ok(AccessToken {
            secret,
            expires_at: started + left.unwrap_or(lifetime),
            lifetime,
            generation: self.generation.fetch_add(1, Ordering::Relaxed),
        })
    }

    /// A new access token from the current refresh token; a rotated
    /// refresh token is sealed and flushed before the access token is
    /// returned, with nothing in between. If it cannot be saved it is kept
    /// in memory (and used for the next refresh) and the save retried; the
    /// access token is used all the same.
    ///
    /// On a store shared with other instances, the refresh holds the
    /// store's lock on the account from before it reads the refresh token
    /// until the rotated one is saved; it first takes up a grant another
    /// instance saved meanwhile, and uses the access token that instance
    /// left in it while that is fresh (then the third value is how long it
    /// has left) instead of asking the provider again.
    async fn refresh(
        &self,
        provider: &Provider,
        unlocked: &Unlocked,
        avoid: Option<[u8; 32]>,
    ) -> Result<(SecretString, Option<Duration>, Option<Duration>), TokenError> {
        let started = Instant::now();
        let shared = self.vault.store_is_shared();
        fn store_error(e: &(dyn std::error::Error + 'static)) -> TokenError {
            TokenError::Store {
                reason: crate::report::chain(e),
            }
        }
        // The store's refresh lock: another instance on a shared store, or
        // a command on this one through the control socket (`doctor`),
        // may be refreshing the same grant. Once it is ours, the stored
        // grant is read again: one saved meanwhile holds the live token.
        let _lock = self
            .vault
            .lock_refresh(unlocked.account())
            .await
            .map_err(|e| store_error(&e))?;
        let reloaded = self
            .vault
            .reload(unlocked)
            .await
            .map_err(|e| store_error(&e))?;
        if reloaded {
            tracing::info!(
                account = unlocked.account(),
                "took up the grant another process saved"
            );
        }
        if shared
            && let Some(a) = unlocked.shared_access()
            && avoid != Some(digest(&a.token))
        {
            let left = Duration::from_secs(a.expires_at.saturating_sub(unix_now()));
            let lifetime = Duration::from_secs(a.lifetime_secs);
            if fresh_enough(left, lifetime, MIN_TOKEN_LIFETIME) {
                return Ok((a.token, Some(lifetime), Some(left)));
            }
        }
        let result = self
            .refresh_uncounted(provider, unlocked, shared)
            .await
            .map(|(secret, lifetime)| (secret, lifetime, None));
        self.metrics.refresh(result.is_ok(), started.elapsed());
        result
    }

    async fn refresh_uncounted(
        &self,
        provider: &Provider,
        unlocked: &Unlocked,
        shared: bool,
    ) -> Result<(SecretString, Option<Duration>), TokenError> {
        // An earlier rotation still only in memory: try to save it first
        // (its token is what this refresh presents either way).
        if unlocked.unsaved_for().is_some() {
            let _ = self.vault.save_unsaved(unlocked).await;
        }
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

        let access = SecretString::from(response.access_token().secret().clone());
        let rotated = response
            .refresh_token()
            .filter(|new_rt| new_rt.secret() != refresh_token.expose_secret())
            .map(|new_rt| SecretString::from(new_rt.secret().clone()));
        // A shared store gets the access token too (sealed), for the other
        // instances.
        let share = shared.then(|| {
            let lifetime = response.expires_in().unwrap_or(DEFAULT_LIFETIME).as_secs();
            SharedAccess {
                token: access.clone(),
                expires_at: unix_now() + lifetime,
                lifetime_secs: lifetime,
            }
        });
        if rotated.is_none()
            && let Some(share) = share.clone()
            && let Err(e) = self
                .vault
                .store_refreshed(unlocked, None, Some(share))
                .await
        {
            tracing::warn!(account = unlocked.account(), error = %crate::report::chain(&e), "cannot leave the new access token in the shared store; the other instances refresh on their own");
        }
        // Persist a rotated refresh token before the access token is used:
        // if we crashed after using it, the stored one might already be dead.
        if let Some(new_rt) = rotated {
            let received = Instant::now();
            let saved = self
                .vault
                .store_refreshed(unlocked, Some(new_rt), share)
                .await;
            let save_ms = received.elapsed().as_secs_f64() * 1000.0;
            // A failure is logged and announced by the vault, which
            // keeps the token in memory; the caller retries the save.
            if saved.is_ok() {
                tracing::info!(
                    account = unlocked.account(),
                    save_ms = format!("{save_ms:.2}"),
                    "rotated refresh token sealed and saved"
                );
            }
        }
        Ok((access, response.expires_in()))
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
    fn short_lived_tokens_are_fresh_for_half_their_life() {
        let s = Duration::from_secs;
        let floor = MIN_TOKEN_LIFETIME;
        // An hour-long token: the floor rules.
        assert!(fresh_enough(s(601), s(3600), floor));
        assert!(!fresh_enough(s(599), s(3600), floor));
        // Five-minute tokens (Keycloak's default): fresh for 150 s.
        assert!(fresh_enough(s(150), s(300), floor));
        assert!(!fresh_enough(s(149), s(300), floor));
        // IMAP's 30-minute floor: a 60-minute Microsoft token is refreshed
        // once under 30 minutes remain; a 20-second token reused for 10 s.
        let session = s(1800);
        assert!(fresh_enough(s(1800), s(3600), session));
        assert!(!fresh_enough(s(1799), s(3600), session));
        assert!(fresh_enough(s(10), s(20), session));
        assert!(!fresh_enough(s(9), s(20), session));
        // Expired is never fresh, whatever the lifetime.
        assert!(!fresh_enough(Duration::ZERO, Duration::ZERO, floor));
    }
}
