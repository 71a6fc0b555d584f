//! The sandbox OAuth2 authorization server (RFC 6749 with PKCE, RFC 7636).
//!
//! It owns every grant it hands out: authorization codes, device codes,
//! refresh tokens and access tokens live in one [`TokenBook`] behind a
//! mutex, and the sandbox mail servers check bearer tokens against the same
//! book through a [`TokenValidator`]. Tests drive it over HTTP like a real
//! provider and poke it directly (seed a grant, revoke a user, approve a
//! device, slow down `/token`).
//!
//! Strict on purpose: client authentication is checked, PKCE S256 is
//! mandatory, codes are single-use, refresh tokens rotate and are bound to
//! their client, assertions are verified to the letter, and error bodies
//! never echo a token, secret or assertion back.
//!
//! Endpoints (all on `http://127.0.0.1:PORT`):
//! - `POST /token`: grants `authorization_code`, `refresh_token`,
//!   `client_credentials`, `password` (only with
//!   [`ProviderOptions::allow_password_grant`]), the device code grant
//!   (RFC 8628, `urn:ietf:params:oauth:grant-type:device_code`) and the JWT
//!   bearer grant (RFC 7523, `urn:ietf:params:oauth:grant-type:jwt-bearer`,
//!   Google service accounts). Client authentication: `client_secret_basic`,
//!   `client_secret_post`, `private_key_jwt` (RFC 7523 section 2.2, keys
//!   from [`Provider::register_client_key`]) or `none` for public clients.
//! - `GET /authorize`: automatic consent for `login_hint`, else `username`
//!   (the open public-client profile), else `user@example.com`; failures
//!   staged with [`Provider::fail_authorization`] redirect back instead.
//! - `POST /device_authorization` (RFC 8628 section 3.1) and `GET /device`,
//!   the verification page; approval happens through
//!   [`Provider::approve_device`] and [`Provider::deny_device`].
//! - `POST /register`: dynamic registration of public clients (RFC 7591).
//! - `GET /.well-known/oauth-authorization-server` and
//!   `/.well-known/openid-configuration`: RFC 8414 metadata.
//!
//! Clients: the configured one ([`ProviderOptions::client_id`]), the open
//! public-client profile's `open` (public, loopback redirects on any port,
//! refresh tokens always rotate), and clients registered at `/register`
//! (public, redirect URIs as registered, loopback ports free per RFC 8252
//! section 7.3).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::rejection::{FormRejection, JsonRejection, QueryRejection};
use axum::extract::{Form, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use rand::RngCore;
use serde_json::json;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio::sync::watch;

mod device;
mod jwt;
mod register;

pub use jwt::InvalidKey;
use jwt::{Jwt, RsaPublicKey};
use register::RegisteredClient;

/// How long an authorization code may wait before it is exchanged.
const CODE_LIFETIME: Duration = Duration::from_secs(600);
/// Access tokens kept before expired ones are swept out of the book.
const SWEEP_THRESHOLD: usize = 4096;
/// The user `/authorize` consents for when no `login_hint` is given.
const DEFAULT_USER: &str = "user@example.com";
/// The open public-client profile's pre-registered client.
pub const OPEN_CLIENT_ID: &str = "open";
/// RFC 8628 section 3.4.
pub const DEVICE_CODE_GRANT: &str = "urn:ietf:params:oauth:grant-type:device_code";
/// RFC 7523 section 2.1.
pub const JWT_BEARER_GRANT: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
/// RFC 7523 section 2.2.
pub const JWT_CLIENT_ASSERTION_TYPE: &str =
    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// Clock skew tolerated for assertion `iat` and `nbf`.
const ASSERTION_SKEW_SECS: f64 = 60.0;
/// A JWT bearer assertion may live at most this long (`exp - iat`).
const ASSERTION_MAX_LIFETIME_SECS: f64 = 3600.0;
/// The `/authorize` error codes of the open public-client profile.
pub const OPEN_PROFILE_ERRORS: [&str; 5] = [
    "auth_failed",
    "blocked",
    "unknown_user",
    "user_not_here",
    "no_oauth",
];

/// How the sandbox provider behaves.
#[derive(Debug, Clone)]
pub struct ProviderOptions {
    /// The one registered client. Default `mailbridge-test`.
    pub client_id: String,
    /// `None` (default): a public client, which must not send a secret.
    /// `Some`: a confidential client; the secret is required at `/token`.
    pub client_secret: Option<String>,
    /// Lifetime of access tokens issued by `/token`. Default one hour.
    pub access_token_lifetime: Duration,
    /// Default true: a used refresh token stops working and a new one is
    /// returned, as Microsoft, Fastmail and the open public-client profile
    /// do; presenting a rotated-out token again revokes the whole grant
    /// (Fastmail's rule, and RFC 9700's reuse detection). The `open`
    /// client always gets rotation, whatever this says.
    pub rotate_refresh_tokens: bool,
    /// Device flow polling interval (RFC 8628 `interval`). Default 5 s.
    /// Polling faster gets `slow_down`, and the device code's interval
    /// grows by 5 s. Zero: no rate limit at all (fast tests);
    /// `slow_down` then only comes from [`Provider::force_slow_down`].
    pub device_interval: Duration,
    /// How long a device code lives (`expires_in`). Default 10 minutes.
    pub device_code_lifetime: Duration,
    /// Scopes `/device_authorization` refuses with `invalid_scope`, as
    /// Google refuses `https://mail.google.com/` in the device flow.
    /// Default empty.
    pub refuse_device_scopes: Vec<String>,
    /// Enables `grant_type=password` (RFC 6749 section 4.3) for the
    /// configured client; users come from [`Provider::add_user`]. Default
    /// false: the grant type is unsupported.
    pub allow_password_grant: bool,
    /// Default true: client id `open` is a pre-registered public client
    /// (the open public-client profile).
    pub open_profile: bool,
    /// `Some(aud)`: access tokens are JWT-shaped with this `aud` (see
    /// [`Provider::set_access_token_audience`]). Default `None`: opaque.
    pub access_token_audience: Option<String>,
}

impl Default for ProviderOptions {
    fn default() -> Self {
        ProviderOptions {
            client_id: "mailbridge-test".to_string(),
            client_secret: None,
            access_token_lifetime: Duration::from_secs(3600),
            rotate_refresh_tokens: true,
            device_interval: Duration::from_secs(5),
            device_code_lifetime: Duration::from_secs(600),
            refuse_device_scopes: Vec::new(),
            allow_password_grant: false,
            open_profile: true,
            access_token_audience: None,
        }
    }
}

/// Why a bearer token was refused, in the terms of the SASL failure
/// challenge (`status` goes into the JSON the mail server sends).
#[derive(Debug, Clone, thiserror::Error)]
#[error("token rejected ({status}): {reason}")]
pub struct TokenRejection {
    /// "401" for an unknown, expired or revoked token; "400" for a token
    /// that belongs to another mailbox.
    pub status: &'static str,
    /// A one-line reason for logs and test failures; never the token.
    pub reason: String,
    /// The token could not be checked at all (see
    /// [`Provider::set_validation_unavailable`]): mail servers answer a
    /// temporary failure without a challenge, as Dovecot does.
    pub temporary: bool,
}

/// Checks bearer tokens against the provider's book. Cheap to clone.
#[derive(Clone)]
pub struct TokenValidator {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for TokenValidator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenValidator").finish_non_exhaustive()
    }
}

impl TokenValidator {
    /// Ok if `token` is a live access token valid for mailbox `user`
    /// (client-credentials tokens are valid for any user). Mailbox names
    /// compare case-insensitively, as mail addresses do in practice.
    pub fn validate(&self, token: &str, user: &str) -> Result<(), TokenRejection> {
        if self.shared.tunables().validation_unavailable {
            return Err(TokenRejection {
                status: "",
                reason: "token validation is unavailable".to_string(),
                temporary: true,
            });
        }
        self.shared.book().validate(token, user, Instant::now())
    }
}

/// A handle on a running sandbox provider. Cheap to clone.
#[derive(Clone)]
pub struct Provider {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Provider")
            .field("addr", &self.shared.addr)
            .finish_non_exhaustive()
    }
}

/// State shared by the HTTP handlers, the validator and the handle.
struct Shared {
    /// Where the HTTP server listens.
    addr: std::net::SocketAddr,
    /// The registered client; fixed at start.
    client_id: String,
    client_secret: Option<String>,
    rotate_refresh_tokens: bool,
    open_profile: bool,
    allow_password_grant: bool,
    device_interval: Duration,
    device_code_lifetime: Duration,
    refuse_device_scopes: Vec<String>,
    /// Every grant, behind a std mutex that is never held across an await.
    book: Mutex<TokenBook>,
    /// Clients, keys and users; never locked together with `book`.
    registry: Mutex<Registry>,
    /// Tunables tests change while the server runs.
    tunables: Mutex<Tunables>,
    token_requests: AtomicU64,
    refresh_requests: AtomicU64,
    /// Rotated-out refresh tokens presented again (each revoked a grant).
    refresh_replays: AtomicU64,
    /// When a refresh token was last rotated.
    last_rotation: Mutex<Option<Instant>>,
    /// What the metadata lists as `scopes_supported` (None: the field is
    /// left out).
    scopes_supported: Mutex<Option<Vec<String>>>,
    /// Every request's path and `User-Agent` (empty when none), in order.
    user_agents: Mutex<Vec<(String, String)>>,
    /// Set to true to stop the HTTP server.
    shutdown: watch::Sender<bool>,
}

impl Shared {
    fn book(&self) -> MutexGuard<'_, TokenBook> {
        // A panic in another thread while holding the lock leaves the book
        // consistent (every mutation is a single insert or remove).
        self.book.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn tunables(&self) -> MutexGuard<'_, Tunables> {
        self.tunables.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn registry(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn token_url(&self) -> String {
        format!("{}/token", self.base_url())
    }

    /// Which client `id` names, if any.
    fn lookup_client(&self, id: &str) -> Option<ClientKind> {
        if id == self.client_id {
            Some(ClientKind::Configured)
        } else if id == OPEN_CLIENT_ID && self.open_profile {
            Some(ClientKind::Open)
        } else {
            self.registry()
                .clients
                .get(id)
                .cloned()
                .map(ClientKind::Registered)
        }
    }
}

/// Who a client is, as far as grants and redirects go.
#[derive(Debug, Clone)]
enum ClientKind {
    /// [`ProviderOptions::client_id`].
    Configured,
    /// The open public-client profile's `open`.
    Open,
    /// Registered at `/register`.
    Registered(RegisteredClient),
}

/// A client as authenticated at `/token` or `/device_authorization`.
#[derive(Debug, Clone)]
struct Client {
    id: String,
    kind: ClientKind,
    /// Authenticated with a secret or a private-key JWT.
    confidential: bool,
}

impl Client {
    /// May this client use `grant_type`?
    fn permits(&self, grant_type: &str) -> bool {
        match &self.kind {
            ClientKind::Configured => true,
            ClientKind::Open => matches!(grant_type, "authorization_code" | "refresh_token"),
            ClientKind::Registered(r) => r.grant_types.iter().any(|g| g == grant_type),
        }
    }
}

/// Registered clients, keys, users and staged failures.
#[derive(Debug, Default)]
struct Registry {
    /// Dynamically registered clients by client_id.
    clients: HashMap<String, RegisteredClient>,
    /// private_key_jwt keys of the configured client.
    client_keys: Vec<RsaPublicKey>,
    /// Service-account keys by `client_email` (the assertion's `iss`).
    service_accounts: HashMap<String, Vec<RsaPublicKey>>,
    /// Password-grant users: lower-cased name -> password.
    users: HashMap<String, String>,
    /// Staged `/authorize` failures: lower-cased user -> error code.
    auth_failures: HashMap<String, String>,
    /// Lower-cased users whose refreshes are refused for now, as Fastmail
    /// refuses a user locked by an administrator (`invalid_grant` with
    /// `"temporary": true`); their refresh tokens stay valid.
    locked: std::collections::HashSet<String>,
    /// Client assertion `jti`s seen, with their `exp`, against replay.
    used_jtis: HashMap<String, f64>,
}

#[derive(Debug, Clone, Copy)]
struct Tunables {
    access_token_lifetime: Duration,
    token_delay: Duration,
    /// Wait after a request was processed (a refresh token rotated)
    /// before answering: the way back over a slow network.
    answer_delay: Duration,
    /// Token responses leave out `expires_in`.
    omit_expires_in: bool,
    validation_unavailable: bool,
    offline_access_needs_consent: bool,
}

impl Provider {
    /// Binds 127.0.0.1 on an ephemeral port and serves until
    /// [`Provider::shutdown`].
    pub async fn start(opts: ProviderOptions) -> std::io::Result<Provider> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let (shutdown, mut shutdown_rx) = watch::channel(false);
        let app_subject = opts.client_id.clone();
        let shared = Arc::new(Shared {
            addr,
            client_id: opts.client_id,
            client_secret: opts.client_secret,
            rotate_refresh_tokens: opts.rotate_refresh_tokens,
            open_profile: opts.open_profile,
            allow_password_grant: opts.allow_password_grant,
            device_interval: opts.device_interval,
            device_code_lifetime: opts.device_code_lifetime,
            refuse_device_scopes: opts.refuse_device_scopes,
            book: Mutex::new(TokenBook {
                issuer: format!("http://{addr}"),
                app_subject,
                access_token_audience: opts.access_token_audience,
                ..TokenBook::default()
            }),
            registry: Mutex::new(Registry::default()),
            tunables: Mutex::new(Tunables {
                access_token_lifetime: opts.access_token_lifetime,
                token_delay: Duration::ZERO,
                answer_delay: Duration::ZERO,
                omit_expires_in: false,
                validation_unavailable: false,
                offline_access_needs_consent: false,
            }),
            token_requests: AtomicU64::new(0),
            refresh_requests: AtomicU64::new(0),
            refresh_replays: AtomicU64::new(0),
            last_rotation: Mutex::new(None),
            scopes_supported: Mutex::new(None),
            user_agents: Mutex::new(Vec::new()),
            shutdown,
        });
        let router = Router::new()
            .route("/token", post(token_endpoint))
            .route("/authorize", get(authorize_endpoint))
            .route(
                "/device_authorization",
                post(device::device_authorization_endpoint),
            )
            .route("/device", get(device::verification_page))
            .route("/register", post(register::register_endpoint))
            .route("/.well-known/oauth-authorization-server", get(metadata))
            .route("/.well-known/openid-configuration", get(metadata))
            .layer(axum::middleware::from_fn_with_state(
                shared.clone(),
                record_user_agent,
            ))
            .with_state(shared.clone());
        tokio::spawn(async move {
            let stop = async move {
                let _ = shutdown_rx.wait_for(|stop| *stop).await;
            };
            if let Err(e) = axum::serve(listener, router)
                .with_graceful_shutdown(stop)
                .await
            {
                tracing::warn!("sandbox provider stopped: {e}");
            }
        });
        Ok(Provider { shared })
    }

    /// `http://127.0.0.1:PORT`
    pub fn base_url(&self) -> String {
        format!("http://{}", self.shared.addr)
    }

    /// The token endpoint.
    pub fn token_url(&self) -> String {
        format!("{}/token", self.base_url())
    }

    /// The authorization endpoint (auto-consents).
    pub fn authorize_url(&self) -> String {
        format!("{}/authorize", self.base_url())
    }

    /// The device authorization endpoint (RFC 8628 section 3.1).
    pub fn device_authorization_url(&self) -> String {
        format!("{}/device_authorization", self.base_url())
    }

    /// The dynamic client registration endpoint (RFC 7591).
    pub fn registration_url(&self) -> String {
        format!("{}/register", self.base_url())
    }

    /// Seeds a grant for the configured client directly, as if the user
    /// had consented earlier.
    pub fn issue_refresh_token(&self, user: &str, scope: &str) -> String {
        let client_id = self.shared.client_id.clone();
        self.issue_refresh_token_for(&client_id, user, scope)
    }

    /// Seeds a grant for another client (`open`, a registered one):
    /// refresh tokens only work for the client they were issued to.
    pub fn issue_refresh_token_for(&self, client_id: &str, user: &str, scope: &str) -> String {
        self.shared.book().new_refresh_token(client_id, user, scope)
    }

    /// Issues an access token directly, for tests that log in to a mail
    /// server without going through `/token`.
    pub fn issue_access_token(&self, user: &str, scope: &str, lifetime: Duration) -> String {
        self.shared
            .book()
            .new_access_token(Some(user), scope, Instant::now() + lifetime)
    }

    /// Every refresh and access token issued so far (tests search logs and
    /// stores for them).
    pub fn issued_tokens(&self) -> Vec<String> {
        self.shared.book().issued.clone()
    }

    /// Every refresh and access token of `user` stops working.
    pub fn revoke_user(&self, user: &str) {
        let mut book = self.shared.book();
        book.refresh.retain(|_, g| !same_user(&g.user, user));
        book.revoke_access_tokens(user);
    }

    /// Only `user`'s access tokens stop working (server-side invalidation,
    /// as when Microsoft ends a session); refresh tokens still work.
    pub fn revoke_access_tokens(&self, user: &str) {
        self.shared.book().revoke_access_tokens(user);
    }

    /// Lifetime of access tokens issued from now on by `/token`.
    pub fn set_access_token_lifetime(&self, d: Duration) {
        self.shared.tunables().access_token_lifetime = d;
    }

    /// While true, mail servers cannot check tokens at all, as when
    /// Dovecot's introspection request times out because the OAuth2
    /// server is down: they answer a temporary failure (IMAP
    /// `NO [UNAVAILABLE]`, POP3 `-ERR [SYS/TEMP]`, SMTP `454 4.7.0`)
    /// without a failure challenge. `/token` keeps working.
    pub fn set_validation_unavailable(&self, unavailable: bool) {
        self.shared.tunables().validation_unavailable = unavailable;
    }

    /// While true, `/authorize` honours the `offline_access` scope only with
    /// `prompt=consent`, and a code whose request lost `offline_access`
    /// gets no refresh token, as OpenID Connect servers do (OIDC Core 1.0
    /// section 11; oidc-provider, seen in the interop suite).
    pub fn set_offline_access_needs_consent(&self, needed: bool) {
        self.shared.tunables().offline_access_needs_consent = needed;
    }

    /// `/token` waits this long before answering (single-flight tests).
    pub fn set_token_delay(&self, d: Duration) {
        self.shared.tunables().token_delay = d;
    }

    /// `/token` processes each request at once (rotating a refresh
    /// token), then waits this long before answering, as a provider far
    /// away over a slow network does. A client that goes away meanwhile
    /// has lost the answer, not the rotation.
    pub fn set_answer_delay(&self, d: Duration) {
        self.shared.tunables().answer_delay = d;
    }

    /// While true, token responses leave out `expires_in` (RFC 6749 only
    /// recommends it; the open public-client profile makes it mandatory).
    pub fn set_omit_expires_in(&self, omit: bool) {
        self.shared.tunables().omit_expires_in = omit;
    }

    /// How many rotated-out refresh tokens were presented again (each one
    /// revoked its grant).
    pub fn refresh_token_replays(&self) -> u64 {
        self.shared.refresh_replays.load(Ordering::SeqCst)
    }

    /// When a refresh token was last rotated (`None`: never).
    pub fn last_rotation(&self) -> Option<Instant> {
        *self
            .shared
            .last_rotation
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `token` is a refresh token that works now.
    pub fn refresh_token_is_live(&self, token: &str) -> bool {
        self.shared.book().refresh.contains_key(token)
    }

    /// Every POST /token received, whatever its outcome.
    pub fn token_requests(&self) -> u64 {
        self.shared.token_requests.load(Ordering::SeqCst)
    }

    /// POST /token requests with grant_type=refresh_token.
    pub fn refresh_requests(&self) -> u64 {
        self.shared.refresh_requests.load(Ordering::SeqCst)
    }

    /// Access tokens issued from now on are JWT-shaped with this `aud`
    /// (`None`: opaque). Either way they are checked by lookup only.
    pub fn set_access_token_audience(&self, aud: Option<String>) {
        self.shared.book().access_token_audience = aud;
    }

    /// Opaque access tokens issued from now on are at least `len`
    /// characters long, as Microsoft's are (1.5 to 3 KB): long enough that
    /// an SMTP `AUTH XOAUTH2 <initial-response>` line exceeds the command
    /// line limit of real servers.
    pub fn set_access_token_min_len(&self, len: usize) {
        self.shared.book().access_token_min_len = len;
    }

    /// Approves the pending device authorization with `user_code` (case
    /// and dashes do not matter) for `user`. False if there is no such
    /// pending, unexpired device code.
    pub fn approve_device(&self, user_code: &str, user: &str) -> bool {
        self.shared
            .book()
            .settle_device(user_code, device::DeviceState::Approved(user.to_string()))
    }

    /// Denies the pending device authorization with `user_code`; its next
    /// poll gets `access_denied`. False if there is no such pending code.
    pub fn deny_device(&self, user_code: &str) -> bool {
        self.shared
            .book()
            .settle_device(user_code, device::DeviceState::Denied)
    }

    /// User codes (`XXXX-XXXX`) of device authorizations still waiting for
    /// the user.
    pub fn pending_device_codes(&self) -> Vec<String> {
        self.shared.book().pending_device_codes(Instant::now())
    }

    /// The next `count` polls of a live device code (known, this client's,
    /// unexpired, unspent) get `slow_down`, whatever its state, and grow
    /// that device code's interval by 5 s, even when
    /// [`ProviderOptions::device_interval`] is zero. Replaces any count
    /// still outstanding.
    pub fn force_slow_down(&self, count: u32) {
        self.shared.book().forced_slow_downs = count;
    }

    /// Registers a Google-style service account: JWT bearer assertions
    /// with `iss` = `client_email` verify against this key (an SPKI
    /// `PUBLIC KEY` PEM, RSA 2048 bits or more). A second call adds a key.
    pub fn register_service_account(
        &self,
        client_email: &str,
        public_key_pem: &str,
    ) -> Result<(), InvalidKey> {
        let key = RsaPublicKey::from_spki_pem(public_key_pem)?;
        self.shared
            .registry()
            .service_accounts
            .entry(client_email.to_string())
            .or_default()
            .push(key);
        Ok(())
    }

    /// Registers a key (an SPKI `PUBLIC KEY` PEM) for private-key JWT
    /// client authentication of the configured client, as a certificate
    /// credential does at Microsoft. A second call adds a key.
    pub fn register_client_key(&self, public_key_pem: &str) -> Result<(), InvalidKey> {
        let key = RsaPublicKey::from_spki_pem(public_key_pem)?;
        self.shared.registry().client_keys.push(key);
        Ok(())
    }

    /// Adds (or changes the password of) a user for the password grant.
    pub fn add_user(&self, user: &str, password: &str) {
        self.shared
            .registry()
            .users
            .insert(user.to_ascii_lowercase(), password.to_string());
    }

    /// From now on `/authorize` for `user` redirects back with
    /// `error=<error>` (normally one of [`OPEN_PROFILE_ERRORS`]), an
    /// `error_description` and the `state`, instead of a code.
    pub fn fail_authorization(&self, user: &str, error: &str) {
        self.shared
            .registry()
            .auth_failures
            .insert(user.to_ascii_lowercase(), error.to_string());
    }

    /// Locks or unlocks `user`: while locked, refreshing one of the user's
    /// grants answers `invalid_grant` with `"temporary": true` (Fastmail's
    /// form for a user an administrator locked) and the refresh token stays
    /// valid for after the unlock.
    pub fn set_user_locked(&self, user: &str, locked: bool) {
        let user = user.to_ascii_lowercase();
        let mut registry = self.shared.registry();
        if locked {
            registry.locked.insert(user);
        } else {
            registry.locked.remove(&user);
        }
    }

    /// Undoes [`Provider::fail_authorization`] for `user`.
    pub fn clear_authorization_failure(&self, user: &str) {
        self.shared
            .registry()
            .auth_failures
            .remove(&user.to_ascii_lowercase());
    }

    /// Client ids registered at `/register` so far.
    pub fn registered_clients(&self) -> Vec<String> {
        self.shared.registry().clients.keys().cloned().collect()
    }

    /// Lists `scopes` as `scopes_supported` in the server metadata, or
    /// leaves the field out (`None`, the default), as servers may.
    pub fn set_scopes_supported(&self, scopes: Option<Vec<String>>) {
        *self
            .shared
            .scopes_supported
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = scopes;
    }

    /// Every request so far as (path, `User-Agent`), oldest first; the
    /// agent is empty when the request had none.
    pub fn user_agents(&self) -> Vec<(String, String)> {
        self.shared
            .user_agents
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// A validator for mail servers; keeps working after shutdown.
    pub fn validator(&self) -> TokenValidator {
        TokenValidator {
            shared: self.shared.clone(),
        }
    }

    /// Stops the HTTP server; idle keep-alive connections are closed.
    pub fn shutdown(&self) {
        let _ = self.shared.shutdown.send(true);
    }
}

/// A refresh token's grant.
#[derive(Debug, Clone)]
struct Grant {
    client_id: String,
    user: String,
    scope: String,
}

/// A live access token. `user` is None for client-credentials tokens,
/// which are good for any mailbox.
#[derive(Debug, Clone)]
struct AccessGrant {
    user: Option<String>,
    expires: Instant,
}

/// An authorization code waiting to be exchanged.
#[derive(Debug, Clone)]
struct CodeGrant {
    client_id: String,
    user: String,
    scope: String,
    redirect_uri: String,
    code_challenge: String,
    expires: Instant,
    redeemed: bool,
}

/// Every grant the provider knows. Plain data and plain functions: the HTTP
/// handlers and the validator lock it briefly and never across an await.
#[derive(Debug, Default)]
struct TokenBook {
    refresh: HashMap<String, Grant>,
    /// Refresh tokens rotated out, with the grant they belonged to: one
    /// presented again revokes the grant.
    rotated_out: HashMap<String, Grant>,
    access: HashMap<String, AccessGrant>,
    codes: HashMap<String, CodeGrant>,
    /// Device authorizations by device code.
    devices: HashMap<String, device::DeviceGrant>,
    /// Polls still to be answered `slow_down` whatever their pace.
    forced_slow_downs: u32,
    /// Every token ever issued, so tests can search logs for them.
    issued: Vec<String>,
    /// `iss` of JWT-shaped access tokens.
    issuer: String,
    /// `sub` of JWT-shaped client-credentials tokens (the client id).
    app_subject: String,
    /// `Some`: access tokens are JWT-shaped with this `aud`.
    access_token_audience: Option<String>,
    /// Opaque access tokens are at least this long (0: 43 characters).
    access_token_min_len: usize,
}

impl TokenBook {
    fn new_refresh_token(&mut self, client_id: &str, user: &str, scope: &str) -> String {
        let token = random_token();
        self.issued.push(token.clone());
        self.refresh.insert(
            token.clone(),
            Grant {
                client_id: client_id.to_string(),
                user: user.to_string(),
                scope: scope.to_string(),
            },
        );
        token
    }

    fn new_access_token(&mut self, user: Option<&str>, scope: &str, expires: Instant) -> String {
        let now = Instant::now();
        if self.access.len() >= SWEEP_THRESHOLD {
            self.access.retain(|_, g| g.expires > now);
        }
        let token = match &self.access_token_audience {
            None => {
                let mut t = random_token();
                while t.len() < self.access_token_min_len {
                    t.push_str(&random_token());
                }
                t
            }
            Some(audience) => {
                let issued_at = unix_now();
                jwt::shaped_access_token(
                    &self.issuer,
                    audience,
                    user.unwrap_or(&self.app_subject),
                    scope,
                    issued_at,
                    issued_at + expires.saturating_duration_since(now).as_secs(),
                    &random_token(),
                )
            }
        };
        self.issued.push(token.clone());
        self.access.insert(
            token.clone(),
            AccessGrant {
                user: user.map(str::to_string),
                expires,
            },
        );
        token
    }

    fn revoke_access_tokens(&mut self, user: &str) {
        self.access
            .retain(|_, g| !g.user.as_deref().is_some_and(|u| same_user(u, user)));
    }

    fn validate(&self, token: &str, user: &str, now: Instant) -> Result<(), TokenRejection> {
        let Some(grant) = self.access.get(token) else {
            return Err(TokenRejection {
                status: "401",
                reason: "unknown or revoked access token".to_string(),
                temporary: false,
            });
        };
        if grant.expires <= now {
            return Err(TokenRejection {
                status: "401",
                reason: "access token expired".to_string(),
                temporary: false,
            });
        }
        match &grant.user {
            Some(owner) if !same_user(owner, user) => Err(TokenRejection {
                status: "400",
                reason: format!("access token was issued for another mailbox, not {user}"),
                temporary: false,
            }),
            _ => Ok(()),
        }
    }
}

fn same_user(a: &str, b: &str) -> bool {
    a.eq_ignore_ascii_case(b)
}

/// Seconds since the Unix epoch.
fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Seconds since the Unix epoch, with the fraction (for NumericDate).
fn unix_now_f64() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// 32 random bytes, base64url without padding: 43 characters.
fn random_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    URL_SAFE_NO_PAD.encode(bytes)
}

// ---------------------------------------------------------------------------
// HTTP

/// An OAuth2 error response (RFC 6749 section 5.2).
struct OAuthError {
    status: StatusCode,
    error: &'static str,
    description: String,
    /// Set when the client tried HTTP Basic: a 401 must then carry a
    /// `WWW-Authenticate` challenge.
    basic_challenge: bool,
    /// Adds `"temporary": true` to the body (Fastmail's extension).
    temporary: bool,
}

impl OAuthError {
    fn new(error: &'static str, description: impl Into<String>) -> OAuthError {
        let status = if error == "invalid_client" {
            StatusCode::UNAUTHORIZED
        } else {
            StatusCode::BAD_REQUEST
        };
        OAuthError {
            status,
            error,
            description: description.into(),
            basic_challenge: false,
            temporary: false,
        }
    }
}

impl IntoResponse for OAuthError {
    fn into_response(self) -> Response {
        let mut body = json!({ "error": self.error, "error_description": self.description });
        if self.temporary {
            body["temporary"] = json!(true);
        }
        let mut response = (self.status, no_store(), axum::Json(body)).into_response();
        if self.basic_challenge {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"sandbox\""),
            );
        }
        response
    }
}

fn no_store() -> [(header::HeaderName, &'static str); 2] {
    [
        (header::CACHE_CONTROL, "no-store"),
        (header::PRAGMA, "no-cache"),
    ]
}

/// Form or query parameters, refusing duplicates (RFC 6749 section 3.1/3.2:
/// "parameters MUST NOT be included more than once").
struct Params(HashMap<String, String>);

impl Params {
    fn from_pairs(pairs: Vec<(String, String)>) -> Result<Params, String> {
        let mut map = HashMap::new();
        for (k, v) in pairs {
            if map.contains_key(&k) {
                return Err(format!("parameter {k} given more than once"));
            }
            map.insert(k, v);
        }
        Ok(Params(map))
    }

    /// A parameter; an empty value counts as absent (RFC 6749 section 3.1).
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .get(key)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }

    fn require(&self, key: &str) -> Result<&str, OAuthError> {
        self.get(key)
            .ok_or_else(|| OAuthError::new("invalid_request", format!("missing parameter {key}")))
    }
}

/// Notes each request's path and `User-Agent` for
/// [`Provider::user_agents`].
async fn record_user_agent(
    State(shared): State<Arc<Shared>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let agent = request
        .headers()
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let path = request.uri().path().to_string();
    shared
        .user_agents
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push((path, agent));
    next.run(request).await
}

async fn metadata(State(shared): State<Arc<Shared>>) -> Response {
    let base = shared.base_url();
    let mut grant_types = vec![
        "authorization_code",
        "refresh_token",
        "client_credentials",
        DEVICE_CODE_GRANT,
        JWT_BEARER_GRANT,
    ];
    if shared.allow_password_grant {
        grant_types.push("password");
    }
    let scopes = shared
        .scopes_supported
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let mut doc = json!({
        "issuer": base,
        "authorization_endpoint": format!("{base}/authorize"),
        "token_endpoint": format!("{base}/token"),
        "device_authorization_endpoint": format!("{base}/device_authorization"),
        "registration_endpoint": format!("{base}/register"),
        "response_types_supported": ["code"],
        "grant_types_supported": grant_types,
        "code_challenge_methods_supported": ["S256"],
        "token_endpoint_auth_methods_supported":
            ["client_secret_basic", "client_secret_post", "private_key_jwt", "none"],
        "token_endpoint_auth_signing_alg_values_supported": ["RS256"],
    });
    if let Some(scopes) = scopes {
        doc["scopes_supported"] = json!(scopes);
    }
    axum::Json(doc).into_response()
}

async fn token_endpoint(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    form: Result<Form<Vec<(String, String)>>, FormRejection>,
) -> Response {
    shared.token_requests.fetch_add(1, Ordering::SeqCst);
    // Processed to the end even if the client goes away meanwhile, as a
    // real server does: what it rotated stays rotated.
    let processing = tokio::spawn(async move {
        let delay = shared.tunables().token_delay;
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let result = token_request(&shared, &headers, form);
        let Tunables {
            answer_delay,
            omit_expires_in,
            ..
        } = *shared.tunables();
        result.map(|mut body| {
            if omit_expires_in && let Some(o) = body.as_object_mut() {
                o.remove("expires_in");
            }
            (body, answer_delay)
        })
    });
    let result = match processing.await {
        Ok(r) => r,
        Err(_) => Err(OAuthError::new("server_error", "the request failed")),
    };
    match result {
        Ok((body, answer_delay)) => {
            if !answer_delay.is_zero() {
                tokio::time::sleep(answer_delay).await;
            }
            (StatusCode::OK, no_store(), axum::Json(body)).into_response()
        }
        Err(e) => e.into_response(),
    }
}

/// The form body of a `/token` or `/device_authorization` request.
fn form_params(
    form: Result<Form<Vec<(String, String)>>, FormRejection>,
) -> Result<Params, OAuthError> {
    let Form(pairs) = form.map_err(|e| {
        OAuthError::new(
            "invalid_request",
            format!("expected an application/x-www-form-urlencoded body: {e}"),
        )
    })?;
    Params::from_pairs(pairs).map_err(|e| OAuthError::new("invalid_request", e))
}

/// The client, or `invalid_client` when the request named none.
fn require_client(client: Option<Client>) -> Result<Client, OAuthError> {
    client.ok_or_else(|| {
        OAuthError::new(
            "invalid_client",
            "no client authentication and no client_id",
        )
    })
}

fn token_request(
    shared: &Shared,
    headers: &HeaderMap,
    form: Result<Form<Vec<(String, String)>>, FormRejection>,
) -> Result<serde_json::Value, OAuthError> {
    let params = form_params(form)?;
    let grant_type = params.require("grant_type")?;
    if grant_type == "refresh_token" {
        shared.refresh_requests.fetch_add(1, Ordering::SeqCst);
    }
    let client = authenticate_client(shared, headers, &params)?;
    let now = Instant::now();
    let lifetime = shared.tunables().access_token_lifetime;
    // The JWT bearer grant needs no client (RFC 7523 section 3.1); every
    // other grant does, and the client must be allowed to use it.
    let client = match grant_type {
        JWT_BEARER_GRANT => {
            if let Some(c) = &client
                && !c.permits(grant_type)
            {
                return Err(unauthorized_client(grant_type));
            }
            return jwt_bearer_grant(shared, &params, now, lifetime);
        }
        "password" if !shared.allow_password_grant => {
            return Err(OAuthError::new(
                "unsupported_grant_type",
                "grant_type password is not enabled on this server",
            ));
        }
        "refresh_token" | "authorization_code" | "client_credentials" | "password"
        | DEVICE_CODE_GRANT => {
            let client = require_client(client)?;
            if !client.permits(grant_type) {
                return Err(unauthorized_client(grant_type));
            }
            client
        }
        other => {
            return Err(OAuthError::new(
                "unsupported_grant_type",
                format!("grant_type {other} is not supported"),
            ));
        }
    };
    match grant_type {
        "refresh_token" => {
            let refresh_token = params.require("refresh_token")?;
            let mut book = shared.book();
            if let Some(old) = book.rotated_out.get(refresh_token).cloned() {
                shared.refresh_replays.fetch_add(1, Ordering::SeqCst);
                // A leaked or mishandled token: the whole grant goes.
                book.refresh
                    .retain(|_, g| !(g.client_id == old.client_id && g.user == old.user));
                return Err(OAuthError::new(
                    "invalid_grant",
                    "refresh token already used: the grant is revoked",
                ));
            }
            let Some(grant) = book.refresh.get(refresh_token).cloned() else {
                return Err(OAuthError::new(
                    "invalid_grant",
                    "refresh token is invalid, expired, revoked or already used",
                ));
            };
            if grant.client_id != client.id {
                return Err(OAuthError::new(
                    "invalid_grant",
                    "refresh token was issued to another client",
                ));
            }
            let locked = shared
                .registry()
                .locked
                .contains(&grant.user.to_ascii_lowercase());
            if locked {
                return Err(OAuthError {
                    temporary: true,
                    ..OAuthError::new("invalid_grant", "the user is locked by an administrator")
                });
            }
            let scope = match params.get("scope") {
                Some(requested) => {
                    check_scope_subset(requested, &grant.scope)?;
                    requested.to_string()
                }
                None => grant.scope.clone(),
            };
            // The open public-client profile makes rotation mandatory.
            let rotate = shared.rotate_refresh_tokens || matches!(client.kind, ClientKind::Open);
            let new_refresh = if rotate {
                book.refresh.remove(refresh_token);
                book.rotated_out
                    .insert(refresh_token.to_string(), grant.clone());
                *shared
                    .last_rotation
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
                book.new_refresh_token(&client.id, &grant.user, &grant.scope)
            } else {
                refresh_token.to_string()
            };
            let access = book.new_access_token(Some(&grant.user), &scope, now + lifetime);
            Ok(token_json(&access, lifetime, Some(&new_refresh), &scope))
        }
        "authorization_code" => {
            let code = params.require("code")?;
            let redirect_uri = params.require("redirect_uri")?;
            let verifier = params.require("code_verifier")?;
            if !valid_pkce_string(verifier) {
                return Err(OAuthError::new(
                    "invalid_request",
                    "code_verifier must be 43 to 128 unreserved characters",
                ));
            }
            let needs_offline = shared.tunables().offline_access_needs_consent;
            let mut book = shared.book();
            let Some(grant) = book.codes.get(code).cloned() else {
                return Err(OAuthError::new(
                    "invalid_grant",
                    "authorization code is invalid",
                ));
            };
            if grant.redeemed {
                return Err(OAuthError::new(
                    "invalid_grant",
                    "authorization code already redeemed",
                ));
            }
            if grant.expires <= now {
                return Err(OAuthError::new(
                    "invalid_grant",
                    "authorization code expired",
                ));
            }
            if grant.client_id != client.id {
                return Err(OAuthError::new(
                    "invalid_grant",
                    "authorization code was issued to another client",
                ));
            }
            if grant.redirect_uri != redirect_uri {
                return Err(OAuthError::new(
                    "invalid_grant",
                    "redirect_uri does not match the authorization request",
                ));
            }
            if pkce_s256(verifier) != grant.code_challenge {
                return Err(OAuthError::new(
                    "invalid_grant",
                    "PKCE verification failed: code_verifier does not match code_challenge",
                ));
            }
            if let Some(g) = book.codes.get_mut(code) {
                g.redeemed = true;
            }
            if needs_offline && !grant.scope.split(' ').any(|s| s == "offline_access") {
                let access = book.new_access_token(Some(&grant.user), &grant.scope, now + lifetime);
                return Ok(token_json(&access, lifetime, None, &grant.scope));
            }
            Ok(user_tokens(
                &mut book,
                &client,
                &grant.user,
                &grant.scope,
                now,
                lifetime,
            ))
        }
        "client_credentials" => {
            if !client.confidential {
                return Err(OAuthError::new(
                    "unauthorized_client",
                    "client_credentials needs a confidential client: authenticate with the \
                     client secret or a private-key JWT",
                ));
            }
            let scope = params.get("scope").unwrap_or_default();
            let access = shared.book().new_access_token(None, scope, now + lifetime);
            Ok(token_json(&access, lifetime, None, scope))
        }
        "password" => {
            if !matches!(client.kind, ClientKind::Configured) {
                return Err(unauthorized_client(grant_type));
            }
            let username = params.require("username")?;
            let password = params.require("password")?;
            let known = shared
                .registry()
                .users
                .get(&username.to_ascii_lowercase())
                .is_some_and(|p| bool::from(p.as_bytes().ct_eq(password.as_bytes())));
            if !known {
                return Err(OAuthError::new(
                    "invalid_grant",
                    "the resource owner's username or password is wrong",
                ));
            }
            let scope = params.get("scope").unwrap_or_default();
            Ok(user_tokens(
                &mut shared.book(),
                &client,
                username,
                scope,
                now,
                lifetime,
            ))
        }
        DEVICE_CODE_GRANT => {
            let device_code = params.require("device_code")?;
            let mut book = shared.book();
            let (user, scope) =
                book.poll_device(device_code, &client.id, shared.device_interval, now)?;
            Ok(user_tokens(
                &mut book, &client, &user, &scope, now, lifetime,
            ))
        }
        other => Err(OAuthError::new(
            "unsupported_grant_type",
            format!("grant_type {other} is not supported"),
        )),
    }
}

fn unauthorized_client(grant_type: &str) -> OAuthError {
    OAuthError::new(
        "unauthorized_client",
        format!("this client may not use grant_type {grant_type}"),
    )
}

/// An access token for `user`, and a refresh token when the client may
/// use one.
fn user_tokens(
    book: &mut TokenBook,
    client: &Client,
    user: &str,
    scope: &str,
    now: Instant,
    lifetime: Duration,
) -> serde_json::Value {
    let refresh = client
        .permits("refresh_token")
        .then(|| book.new_refresh_token(&client.id, user, scope));
    let access = book.new_access_token(Some(user), scope, now + lifetime);
    token_json(&access, lifetime, refresh.as_deref(), scope)
}

/// RFC 7523 section 2.1 and 3, as Google does it for service accounts:
/// an RS256 assertion from a registered `iss`, `aud` the token endpoint,
/// `exp` at most an hour after `iat`; the token is for `sub` (else the
/// service account itself). No refresh token.
fn jwt_bearer_grant(
    shared: &Shared,
    params: &Params,
    now: Instant,
    lifetime: Duration,
) -> Result<serde_json::Value, OAuthError> {
    let fail = |d: String| OAuthError::new("invalid_grant", d);
    let assertion = params.require("assertion")?;
    let jwt = Jwt::parse(assertion).map_err(|e| fail(format!("assertion: {e}")))?;
    let Some(iss) = jwt.str_claim("iss") else {
        return Err(fail("assertion has no iss claim".to_string()));
    };
    let keys = shared.registry().service_accounts.get(iss).cloned();
    let Some(keys) = keys else {
        return Err(fail(format!(
            "unknown issuer: {iss} is not a registered service account"
        )));
    };
    if !jwt.signed_by_any(&keys) {
        return Err(fail(
            "bad signature: the assertion does not verify with the service account's keys"
                .to_string(),
        ));
    }
    let token_url = shared.token_url();
    if !jwt.audience_is(&token_url) {
        return Err(fail(format!("wrong audience: aud must be {token_url}")));
    }
    check_assertion_times(&jwt, true).map_err(fail)?;
    let user = match jwt.claims.get("sub") {
        None => iss,
        Some(sub) => match sub.as_str() {
            Some(sub) if !sub.is_empty() => sub,
            _ => return Err(fail("assertion sub must be a mailbox".to_string())),
        },
    };
    let granted = jwt.str_claim("scope").unwrap_or_default();
    let scope = match params.get("scope") {
        Some(requested) => {
            check_scope_subset(requested, granted)?;
            requested
        }
        None => granted,
    };
    if scope.split_ascii_whitespace().next().is_none() {
        return Err(OAuthError::new(
            "invalid_scope",
            "the assertion has no scope claim",
        ));
    }
    let access = shared
        .book()
        .new_access_token(Some(user), scope, now + lifetime);
    Ok(token_json(&access, lifetime, None, scope))
}

/// `exp` required and in the future; `nbf` and `iat` (required with
/// `need_iat`) not beyond the skew in the future; with `need_iat`, at most
/// an hour between `iat` and `exp`.
fn check_assertion_times(jwt: &Jwt<'_>, need_iat: bool) -> Result<(), String> {
    let now = unix_now_f64();
    let exp = jwt.time_claim("exp")?.ok_or("assertion has no exp claim")?;
    if exp <= now {
        return Err("expired assertion: exp has passed".to_string());
    }
    if let Some(nbf) = jwt.time_claim("nbf")?
        && nbf > now + ASSERTION_SKEW_SECS
    {
        return Err("assertion not yet valid (nbf is in the future)".to_string());
    }
    match jwt.time_claim("iat")? {
        None if need_iat => Err("assertion has no iat claim".to_string()),
        None => Ok(()),
        Some(iat) if iat > now + ASSERTION_SKEW_SECS => {
            Err("assertion iat is in the future".to_string())
        }
        Some(iat) if need_iat && exp - iat > ASSERTION_MAX_LIFETIME_SECS => {
            Err("assertion exp is more than an hour after iat".to_string())
        }
        Some(_) => Ok(()),
    }
}

fn token_json(
    access: &str,
    lifetime: Duration,
    refresh: Option<&str>,
    scope: &str,
) -> serde_json::Value {
    let mut body = json!({
        "access_token": access,
        "token_type": "Bearer",
        "expires_in": lifetime.as_secs(),
        "scope": scope,
    });
    if let Some(refresh) = refresh {
        body["refresh_token"] = json!(refresh);
    }
    body
}

/// Client authentication (RFC 6749 section 2.3): HTTP Basic with
/// form-urlencoded id and secret, `client_id`/`client_secret` in the body,
/// or a private-key JWT (RFC 7523 section 2.2), never two ways at once.
/// `None` when the request names no client at all.
fn authenticate_client(
    shared: &Shared,
    headers: &HeaderMap,
    params: &Params,
) -> Result<Option<Client>, OAuthError> {
    let basic = match headers.get(header::AUTHORIZATION) {
        Some(value) => Some(parse_basic(value).ok_or_else(|| OAuthError {
            basic_challenge: true,
            ..OAuthError::new("invalid_client", "malformed Basic authorization header")
        })?),
        None => None,
    };
    let assertion = params.get("client_assertion");
    let assertion_type = params.get("client_assertion_type");
    if assertion.is_some() || assertion_type.is_some() {
        if basic.is_some() || params.get("client_secret").is_some() {
            return Err(OAuthError::new(
                "invalid_request",
                "client authenticated in more than one way",
            ));
        }
        let (Some(assertion), Some(assertion_type)) = (assertion, assertion_type) else {
            return Err(OAuthError::new(
                "invalid_request",
                "client_assertion and client_assertion_type must be given together",
            ));
        };
        if assertion_type != JWT_CLIENT_ASSERTION_TYPE {
            return Err(OAuthError::new(
                "invalid_client",
                "unsupported client_assertion_type",
            ));
        }
        let id = verify_client_assertion(shared, assertion, params.get("client_id"))?;
        return Ok(Some(Client {
            id,
            kind: ClientKind::Configured,
            confidential: true,
        }));
    }
    let used_basic = basic.is_some();
    let fail = |description: &str| OAuthError {
        basic_challenge: used_basic,
        ..OAuthError::new("invalid_client", description)
    };
    let (id, secret) = match basic {
        Some((id, secret)) => {
            if params.get("client_secret").is_some() {
                return Err(OAuthError::new(
                    "invalid_request",
                    "client authenticated both with Basic and with client_secret",
                ));
            }
            if params.get("client_id").is_some_and(|body_id| body_id != id) {
                return Err(OAuthError::new(
                    "invalid_request",
                    "client_id in the body differs from the Basic user",
                ));
            }
            (id, Some(secret).filter(|s| !s.is_empty()))
        }
        None => match params.get("client_id") {
            Some(id) => (
                id.to_string(),
                params.get("client_secret").map(str::to_string),
            ),
            None => return Ok(None),
        },
    };
    let Some(kind) = shared.lookup_client(&id) else {
        return Err(fail("unknown client_id"));
    };
    let expected = match kind {
        ClientKind::Configured => shared.client_secret.as_deref(),
        ClientKind::Open | ClientKind::Registered(_) => None,
    };
    let confidential = match (expected, secret) {
        (Some(expected), Some(given)) if expected == given => true,
        (Some(_), Some(_)) => return Err(fail("client secret is wrong")),
        (Some(_), None) => return Err(fail("client secret required for this client")),
        (None, Some(_)) => {
            return Err(fail(
                "this is a public client: it has no client secret to send",
            ));
        }
        (None, None) => false,
    };
    Ok(Some(Client {
        id,
        kind,
        confidential,
    }))
}

/// A private-key JWT (RFC 7523 sections 2.2 and 3): `iss` = `sub` = the
/// configured client id, `aud` the token endpoint, `exp` in the future, a
/// `jti` never seen before, signed RS256 by a key from
/// [`Provider::register_client_key`]. Returns the client id.
fn verify_client_assertion(
    shared: &Shared,
    assertion: &str,
    body_client_id: Option<&str>,
) -> Result<String, OAuthError> {
    let fail = |d: &str| OAuthError::new("invalid_client", format!("client assertion: {d}"));
    let jwt = Jwt::parse(assertion).map_err(fail)?;
    let (Some(iss), Some(sub)) = (jwt.str_claim("iss"), jwt.str_claim("sub")) else {
        return Err(fail("iss and sub are required"));
    };
    if iss != sub {
        return Err(fail("iss and sub must both be the client_id"));
    }
    if iss != shared.client_id {
        return Err(fail("unknown client"));
    }
    if body_client_id.is_some_and(|id| id != iss) {
        return Err(fail("client_id differs from the assertion's iss"));
    }
    let keys = shared.registry().client_keys.clone();
    if keys.is_empty() {
        return Err(fail("no key is registered for this client"));
    }
    if !jwt.signed_by_any(&keys) {
        return Err(fail("bad signature"));
    }
    let token_url = shared.token_url();
    if !jwt.audience_is(&token_url) {
        return Err(fail(&format!("aud must be {token_url}")));
    }
    check_assertion_times(&jwt, false).map_err(|e| fail(&e))?;
    let Some(jti) = jwt.str_claim("jti").filter(|j| !j.is_empty()) else {
        return Err(fail("jti is required"));
    };
    let exp = jwt.time_claim("exp").ok().flatten().unwrap_or_default();
    let mut registry = shared.registry();
    let now = unix_now_f64();
    registry.used_jtis.retain(|_, exp| *exp > now);
    if registry.used_jtis.insert(jti.to_string(), exp).is_some() {
        return Err(fail("jti already used (replayed assertion)"));
    }
    Ok(iss.to_string())
}

/// `Basic base64(urlencode(id) ":" urlencode(secret))` -> (id, secret).
fn parse_basic(value: &HeaderValue) -> Option<(String, String)> {
    let value = value.to_str().ok()?;
    let (scheme, rest) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = STANDARD.decode(rest.trim()).ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (id, secret) = decoded.split_once(':')?;
    Some((form_decode(id)?, form_decode(secret)?))
}

/// application/x-www-form-urlencoded decoding of one component.
fn form_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Every requested scope must be part of the grant (RFC 6749 section 6).
fn check_scope_subset(requested: &str, granted: &str) -> Result<(), OAuthError> {
    let granted: HashSet<&str> = granted.split_ascii_whitespace().collect();
    match requested
        .split_ascii_whitespace()
        .find(|s| !granted.contains(s))
    {
        Some(extra) => Err(OAuthError::new(
            "invalid_scope",
            format!("scope {extra} was not granted"),
        )),
        None => Ok(()),
    }
}

/// RFC 7636 section 4.1: 43..=128 characters of `[A-Za-z0-9-._~]`. A
/// S256 challenge (43 base64url characters) satisfies it too.
fn valid_pkce_string(s: &str) -> bool {
    (43..=128).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'))
}

/// BASE64URL(SHA256(verifier)) without padding.
pub(crate) fn pkce_s256(verifier: &str) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()))
}

/// A redirect URI we are willing to send a code to: absolute http(s),
/// no fragment (RFC 6749 section 3.1.2).
fn acceptable_redirect_uri(uri: &str) -> bool {
    (uri.starts_with("http://") || uri.starts_with("https://")) && !uri.contains('#')
}

async fn authorize_endpoint(
    State(shared): State<Arc<Shared>>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Response {
    let bad = |description: String| {
        (
            StatusCode::BAD_REQUEST,
            no_store(),
            axum::Json(json!({ "error": "invalid_request", "error_description": description })),
        )
            .into_response()
    };
    let params = match query
        .map_err(|e| e.to_string())
        .and_then(|Query(pairs)| Params::from_pairs(pairs))
    {
        Ok(p) => p,
        Err(e) => return bad(e),
    };
    // Until client_id and redirect_uri are known good, errors go to the
    // user agent, never to the redirect URI (RFC 6749 section 4.1.2.1).
    let Some(client_id) = params.get("client_id") else {
        return bad("missing parameter client_id".to_string());
    };
    let Some(kind) = shared.lookup_client(client_id) else {
        return bad("unknown client_id".to_string());
    };
    let Some(redirect_uri) = params.get("redirect_uri") else {
        return bad("missing parameter redirect_uri".to_string());
    };
    match &kind {
        ClientKind::Configured if !acceptable_redirect_uri(redirect_uri) => {
            return bad("redirect_uri must be an absolute http(s) URI".to_string());
        }
        ClientKind::Open if !register::is_loopback_redirect(redirect_uri) => {
            return bad(
                "client open only redirects to a loopback http URI (RFC 8252 section 7.3)"
                    .to_string(),
            );
        }
        ClientKind::Registered(client) if !client.allows_redirect(redirect_uri) => {
            return bad("redirect_uri is not registered for this client".to_string());
        }
        _ => {}
    }
    let state = params.get("state");
    let redirect = |query: String| {
        let separator = if redirect_uri.contains('?') { '&' } else { '?' };
        let mut location = format!("{redirect_uri}{separator}{query}");
        if let Some(state) = state {
            location.push_str(&format!("&state={}", percent_encode(state)));
        }
        match HeaderValue::from_str(&location) {
            Ok(location) => (StatusCode::FOUND, [(header::LOCATION, location)]).into_response(),
            Err(_) => bad("redirect_uri is not a valid header value".to_string()),
        }
    };
    let error = |error: &str, description: &str| {
        redirect(format!(
            "error={}&error_description={}",
            percent_encode(error),
            percent_encode(description)
        ))
    };
    if let ClientKind::Registered(client) = &kind
        && !client.grant_types.iter().any(|g| g == "authorization_code")
    {
        return error(
            "unauthorized_client",
            "this client did not register the authorization_code grant",
        );
    }
    match params.get("response_type") {
        Some("code") => {}
        Some(_) => return error("unsupported_response_type", "only response_type=code"),
        None => return error("invalid_request", "missing parameter response_type"),
    }
    let Some(challenge) = params.get("code_challenge") else {
        return error("invalid_request", "PKCE code_challenge is required");
    };
    if params.get("code_challenge_method") != Some("S256") {
        return error("invalid_request", "code_challenge_method must be S256");
    }
    if challenge.len() != 43 || !valid_pkce_string(challenge) {
        return error(
            "invalid_request",
            "code_challenge must be 43 base64url characters",
        );
    }
    let user = params
        .get("login_hint")
        .or_else(|| params.get("username"))
        .unwrap_or(DEFAULT_USER);
    let failure = shared
        .registry()
        .auth_failures
        .get(&user.to_ascii_lowercase())
        .cloned();
    if let Some(code) = failure {
        return error(&code, authorization_failure_description(&code));
    }
    let mut scope = params.get("scope").unwrap_or_default().to_string();
    let consented = params
        .get("prompt")
        .is_some_and(|p| p.split(' ').any(|v| v == "consent"));
    if shared.tunables().offline_access_needs_consent && !consented {
        scope = scope
            .split(' ')
            .filter(|s| *s != "offline_access" && !s.is_empty())
            .collect::<Vec<_>>()
            .join(" ");
    }
    let code = random_token();
    shared.book().codes.insert(
        code.clone(),
        CodeGrant {
            client_id: client_id.to_string(),
            user: user.to_string(),
            scope,
            redirect_uri: redirect_uri.to_string(),
            code_challenge: challenge.to_string(),
            expires: Instant::now() + CODE_LIFETIME,
            redeemed: false,
        },
    );
    redirect(format!("code={code}"))
}

/// What the user would read for a staged `/authorize` failure.
fn authorization_failure_description(code: &str) -> &'static str {
    match code {
        "auth_failed" => "The password, username or second factor was wrong.",
        "blocked" => {
            "The account is blocked after too many failed logins; sign in at the provider's \
             web site and confirm your identity to unblock it."
        }
        "unknown_user" => "No such user is known to this server.",
        "user_not_here" => "The account exists but must sign in at another OAuth2 server.",
        "no_oauth" => "The account exists but is not allowed to use OAuth2.",
        "access_denied" => "The user refused the request.",
        _ => "The authorization failed.",
    }
}

#[cfg(test)]
mod tests;
