//! The sandbox OAuth2 authorization server (RFC 6749 with PKCE, RFC 7636).
//!
//! It owns every grant it hands out: authorization codes, refresh tokens and
//! access tokens live in one [`TokenBook`] behind a mutex, and the sandbox
//! mail servers check bearer tokens against the same book through a
//! [`TokenValidator`]. Tests drive it over HTTP like a real provider and
//! poke it directly (seed a grant, revoke a user, slow down `/token`).
//!
//! Strict on purpose: client authentication is checked, PKCE S256 is
//! mandatory, codes are single-use, refresh tokens rotate, and error bodies
//! never echo a token back.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::rejection::{FormRejection, QueryRejection};
use axum::extract::{Form, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use rand::RngCore;
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio::sync::watch;

/// How long an authorization code may wait before it is exchanged.
const CODE_LIFETIME: Duration = Duration::from_secs(600);
/// Access tokens kept before expired ones are swept out of the book.
const SWEEP_THRESHOLD: usize = 4096;
/// The user `/authorize` consents for when no `login_hint` is given.
const DEFAULT_USER: &str = "user@example.com";

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
    /// returned, as Microsoft and the open public-client profile do.
    pub rotate_refresh_tokens: bool,
}

impl Default for ProviderOptions {
    fn default() -> Self {
        ProviderOptions {
            client_id: "mailbridge-test".to_string(),
            client_secret: None,
            access_token_lifetime: Duration::from_secs(3600),
            rotate_refresh_tokens: true,
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
    /// Every grant, behind a std mutex that is never held across an await.
    book: Mutex<TokenBook>,
    /// Tunables tests change while the server runs.
    tunables: Mutex<Tunables>,
    token_requests: AtomicU64,
    refresh_requests: AtomicU64,
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
}

#[derive(Debug, Clone, Copy)]
struct Tunables {
    access_token_lifetime: Duration,
    token_delay: Duration,
}

impl Provider {
    /// Binds 127.0.0.1 on an ephemeral port and serves until
    /// [`Provider::shutdown`].
    pub async fn start(opts: ProviderOptions) -> std::io::Result<Provider> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let (shutdown, mut shutdown_rx) = watch::channel(false);
        let shared = Arc::new(Shared {
            addr,
            client_id: opts.client_id,
            client_secret: opts.client_secret,
            rotate_refresh_tokens: opts.rotate_refresh_tokens,
            book: Mutex::new(TokenBook::default()),
            tunables: Mutex::new(Tunables {
                access_token_lifetime: opts.access_token_lifetime,
                token_delay: Duration::ZERO,
            }),
            token_requests: AtomicU64::new(0),
            refresh_requests: AtomicU64::new(0),
            shutdown,
        });
        let router = Router::new()
            .route("/token", post(token_endpoint))
            .route("/authorize", get(authorize_endpoint))
            .route("/.well-known/oauth-authorization-server", get(metadata))
            .route("/.well-known/openid-configuration", get(metadata))
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

    /// Seeds a grant directly, as if the user had consented earlier.
    pub fn issue_refresh_token(&self, user: &str, scope: &str) -> String {
        self.shared.book().new_refresh_token(user, scope)
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

    /// `/token` waits this long before answering (single-flight tests).
    pub fn set_token_delay(&self, d: Duration) {
        self.shared.tunables().token_delay = d;
    }

    /// Every POST /token received, whatever its outcome.
    pub fn token_requests(&self) -> u64 {
        self.shared.token_requests.load(Ordering::SeqCst)
    }

    /// POST /token requests with grant_type=refresh_token.
    pub fn refresh_requests(&self) -> u64 {
        self.shared.refresh_requests.load(Ordering::SeqCst)
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
    access: HashMap<String, AccessGrant>,
    codes: HashMap<String, CodeGrant>,
    /// Every token ever issued, so tests can search logs for them.
    issued: Vec<String>,
}

impl TokenBook {
    fn new_refresh_token(&mut self, user: &str, scope: &str) -> String {
        let token = random_token();
        self.issued.push(token.clone());
        self.refresh.insert(
            token.clone(),
            Grant {
                user: user.to_string(),
                scope: scope.to_string(),
            },
        );
        token
    }

    fn new_access_token(&mut self, user: Option<&str>, _scope: &str, expires: Instant) -> String {
        if self.access.len() >= SWEEP_THRESHOLD {
            let now = Instant::now();
            self.access.retain(|_, g| g.expires > now);
        }
        let token = random_token();
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
            });
        };
        if grant.expires <= now {
            return Err(TokenRejection {
                status: "401",
                reason: "access token expired".to_string(),
            });
        }
        match &grant.user {
            Some(owner) if !same_user(owner, user) => Err(TokenRejection {
                status: "400",
                reason: format!("access token was issued for another mailbox, not {user}"),
            }),
            _ => Ok(()),
        }
    }
}

fn same_user(a: &str, b: &str) -> bool {
    a.eq_ignore_ascii_case(b)
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
        }
    }
}

impl IntoResponse for OAuthError {
    fn into_response(self) -> Response {
        let body = json!({ "error": self.error, "error_description": self.description });
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

async fn metadata(State(shared): State<Arc<Shared>>) -> Response {
    let base = format!("http://{}", shared.addr);
    axum::Json(json!({
        "issuer": base,
        "authorization_endpoint": format!("{base}/authorize"),
        "token_endpoint": format!("{base}/token"),
        "response_types_supported": ["code"],
        "grant_types_supported": ["authorization_code", "refresh_token", "client_credentials"],
        "code_challenge_methods_supported": ["S256"],
        "token_endpoint_auth_methods_supported":
            ["client_secret_basic", "client_secret_post", "none"],
    }))
    .into_response()
}

async fn token_endpoint(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    form: Result<Form<Vec<(String, String)>>, FormRejection>,
) -> Response {
    shared.token_requests.fetch_add(1, Ordering::SeqCst);
    let delay = shared.tunables().token_delay;
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    match token_request(&shared, &headers, form) {
        Ok(body) => (StatusCode::OK, no_store(), axum::Json(body)).into_response(),
        Err(e) => e.into_response(),
    }
}

fn token_request(
    shared: &Shared,
    headers: &HeaderMap,
    form: Result<Form<Vec<(String, String)>>, FormRejection>,
) -> Result<serde_json::Value, OAuthError> {
    let Form(pairs) = form.map_err(|e| {
        OAuthError::new(
            "invalid_request",
            format!("expected an application/x-www-form-urlencoded body: {e}"),
        )
    })?;
    let params = Params::from_pairs(pairs).map_err(|e| OAuthError::new("invalid_request", e))?;
    let grant_type = params.require("grant_type")?;
    if grant_type == "refresh_token" {
        shared.refresh_requests.fetch_add(1, Ordering::SeqCst);
    }
    authenticate_client(shared, headers, &params)?;
    let now = Instant::now();
    let lifetime = shared.tunables().access_token_lifetime;
    match grant_type {
        "refresh_token" => {
            let refresh_token = params.require("refresh_token")?;
            let mut book = shared.book();
            let Some(grant) = book.refresh.get(refresh_token).cloned() else {
                return Err(OAuthError::new(
                    "invalid_grant",
                    "refresh token is invalid, expired, revoked or already used",
                ));
            };
            let scope = match params.get("scope") {
                Some(requested) => {
                    check_scope_subset(requested, &grant.scope)?;
                    requested.to_string()
                }
                None => grant.scope.clone(),
            };
            let new_refresh = if shared.rotate_refresh_tokens {
                book.refresh.remove(refresh_token);
                book.new_refresh_token(&grant.user, &grant.scope)
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
            let refresh = book.new_refresh_token(&grant.user, &grant.scope);
            let access = book.new_access_token(Some(&grant.user), &grant.scope, now + lifetime);
            Ok(token_json(&access, lifetime, Some(&refresh), &grant.scope))
        }
        "client_credentials" => {
            if shared.client_secret.is_none() {
                return Err(OAuthError::new(
                    "unauthorized_client",
                    "client_credentials needs a confidential client (no client secret is configured)",
                ));
            }
            let scope = params.get("scope").unwrap_or_default();
            let access = shared.book().new_access_token(None, scope, now + lifetime);
            Ok(token_json(&access, lifetime, None, scope))
        }
        other => Err(OAuthError::new(
            "unsupported_grant_type",
            format!("grant_type {other} is not supported"),
        )),
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

/// Client authentication (RFC 6749 section 2.3.1): HTTP Basic with
/// form-urlencoded id and secret, or `client_id`/`client_secret` in the
/// body, never both ways at once.
fn authenticate_client(
    shared: &Shared,
    headers: &HeaderMap,
    params: &Params,
) -> Result<(), OAuthError> {
    let basic = match headers.get(header::AUTHORIZATION) {
        Some(value) => Some(parse_basic(value).ok_or_else(|| OAuthError {
            basic_challenge: true,
            ..OAuthError::new("invalid_client", "malformed Basic authorization header")
        })?),
        None => None,
    };
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
        None => (
            params
                .get("client_id")
                .ok_or_else(|| fail("no client authentication and no client_id"))?
                .to_string(),
            params.get("client_secret").map(str::to_string),
        ),
    };
    if id != shared.client_id {
        return Err(fail("unknown client_id"));
    }
    match (&shared.client_secret, secret) {
        (Some(expected), Some(given)) if *expected == given => Ok(()),
        (Some(_), Some(_)) => Err(fail("client secret is wrong")),
        (Some(_), None) => Err(fail("client secret required for this client")),
        (None, Some(_)) => Err(fail(
            "this is a public client: it has no client secret to send",
        )),
        (None, None) => Ok(()),
    }
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
    match params.get("client_id") {
        Some(id) if id == shared.client_id => {}
        Some(_) => return bad("unknown client_id".to_string()),
        None => return bad("missing parameter client_id".to_string()),
    }
    let Some(redirect_uri) = params.get("redirect_uri") else {
        return bad("missing parameter redirect_uri".to_string());
    };
    if !acceptable_redirect_uri(redirect_uri) {
        return bad("redirect_uri must be an absolute http(s) URI".to_string());
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
            "error={error}&error_description={}",
            percent_encode(description)
        ))
    };
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
    let code = random_token();
    shared.book().codes.insert(
        code.clone(),
        CodeGrant {
            user: user.to_string(),
            scope: params.get("scope").unwrap_or_default().to_string(),
            redirect_uri: redirect_uri.to_string(),
            code_challenge: challenge.to_string(),
            expires: Instant::now() + CODE_LIFETIME,
            redeemed: false,
        },
    );
    redirect(format!("code={code}"))
}

#[cfg(test)]
mod tests;
