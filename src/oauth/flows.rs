//! Grant flows: how mailbridge obtains a grant from a provider.
//!
//! - authorization code + PKCE S256 with a loopback redirect listener
//!   (the browser comes back to 127.0.0.1), or with the redirected URL
//!   pasted back by the user (headless boxes, SSH);
//! - RFC 8628 device code;
//! - client credentials (a client secret, or a certificate's private-key
//!   JWT assertion);
//! - RFC 7523 JWT bearer (Google service accounts with domain-wide
//!   delegation);
//! - the resource owner password grant, where a provider allows it.
//!
//! The `oauth2` crate does the requests where it has the grant; the JWT
//! bearer request is a plain form post. The user interface (printing the
//! URL, opening a browser, reading a pasted URL) is a trait so tests can
//! drive the flows without a terminal.

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use oauth2::StandardDeviceAuthorizationResponse;
use oauth2::basic::BasicTokenResponse;
use oauth2::url::Url;
use oauth2::{
    AuthType, AuthUrl, AuthorizationCode, ClientId, ClientSecret, CsrfToken,
    DeviceAuthorizationUrl, PkceCodeChallenge, RedirectUrl, RequestTokenError,
    ResourceOwnerPassword, ResourceOwnerUsername, Scope, TokenResponse, TokenUrl,
};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use super::jwt::{JwtError, Rs256Key};
use super::token::one_line;
use crate::clock::unix_now;

/// Where and as whom a flow talks to the provider.
#[derive(Debug, Clone, Copy)]
pub struct FlowEndpoints<'a> {
    /// OAuth2 client id.
    pub client_id: &'a str,
    /// Client secret, if the client has one.
    pub client_secret: Option<&'a SecretString>,
    /// Authorization endpoint (browser flows).
    pub authorize_url: Option<&'a str>,
    /// Token endpoint.
    pub token_url: &'a str,
    /// Device authorization endpoint (device flow).
    pub device_url: Option<&'a str>,
    /// Scopes to ask for, in order.
    pub scopes: &'a [String],
}

/// What a flow obtained.
pub struct Obtained {
    /// The refresh token, when the grant has one.
    pub refresh_token: Option<SecretString>,
    /// The access token that came with it.
    pub access_token: SecretString,
    /// Its lifetime, if the provider said.
    pub expires_in: Option<Duration>,
}

impl std::fmt::Debug for Obtained {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Obtained")
            .field("refresh_token", &self.refresh_token.is_some())
            .field("expires_in", &self.expires_in)
            .finish_non_exhaustive()
    }
}

/// Why a flow did not produce a grant. Messages say what to do; none
/// contains a secret.
#[derive(Debug, thiserror::Error)]
pub enum FlowError {
    /// The provider answered the authorization with an error.
    #[error("authorization refused ({code}): {message}")]
    Authorization {
        /// The `error` code.
        code: String,
        /// What it means for the user.
        message: String,
    },
    /// The token endpoint refused.
    #[error("the provider refused the token request: {code}{}{}", if .description.is_empty() { "" } else { ": " }, .description)]
    Token {
        /// The `error` code.
        code: String,
        /// The provider's description.
        description: String,
        /// The provider marked the refusal as temporary (Fastmail's
        /// `"temporary": true` on `invalid_grant`: the grant may work again,
        /// e.g. once an administrator unlocks the user).
        temporary: bool,
    },
    /// The provider could not be reached, or the exchange broke off. The
    /// HTTP client's error is the source, for logs and the command line.
    #[error("cannot talk to the provider{}", network_cause(.0.as_ref()))]
    Http(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The provider answered something that is not a token response (the
    /// body is not echoed: it may hold tokens).
    #[error("the {0} endpoint sent an unreadable answer")]
    BadResponse(&'static str),
    /// Nobody completed the authorization in time.
    #[error(
        "no authorization arrived within {0} s; run the command again and finish the sign-in in time"
    )]
    Timeout(u64),
    /// A pasted URL or redirect was not what we expected.
    #[error("{0}")]
    BadRedirect(String),
    /// The flow cannot work with this provider or configuration.
    #[error("{0}")]
    Unsupported(String),
    /// A key or certificate problem.
    #[error(transparent)]
    Jwt(#[from] JwtError),
    /// Local I/O (binding the redirect listener, reading input or a key
    /// file).
    #[error("{doing}{}", crate::report::io_phrase(source).map(|p| format!(" ({p})")).unwrap_or_default())]
    Io {
        /// What failed, e.g. `cannot read /etc/mailbridge/key.pem`.
        doing: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

impl FlowError {
    /// An HTTP client error, its cause kept.
    pub(crate) fn http(e: impl std::error::Error + Send + Sync + 'static) -> FlowError {
        FlowError::Http(Box::new(e))
    }

    /// Local I/O that failed while `doing` something.
    pub(crate) fn io(doing: impl Into<String>, source: std::io::Error) -> FlowError {
        FlowError::Io {
            doing: doing.into(),
            source,
        }
    }
}

/// A short reason for a failed HTTP exchange, in our words, from the
/// errors underneath (`""` when the log's detail is all there is).
pub(crate) fn network_cause(e: &(dyn std::error::Error + 'static)) -> &'static str {
    let (mut refused, mut timeout, mut connect) = (false, false, false);
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(r) = err.downcast_ref::<reqwest::Error>() {
            timeout |= r.is_timeout();
            connect |= r.is_connect();
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            refused |= io.kind() == std::io::ErrorKind::ConnectionRefused;
            timeout |= io.kind() == std::io::ErrorKind::TimedOut;
        }
        cur = err.source();
    }
    if refused {
        " (connection refused)"
    } else if timeout {
        " (no answer in time)"
    } else if connect {
        " (cannot connect)"
    } else {
        ""
    }
}

/// How a flow talks to the person running it.
pub trait FlowUi: Sync {
    /// Shows the authorization URL (always, even when a browser opens).
    fn show_url(&self, url: &str);
    /// Tries to open a browser at `url`; false when there is none.
    fn open_browser(&self, url: &str) -> bool;
    /// Asks for one line of input (the pasted redirect URL).
    fn read_line(&self, prompt: &str) -> impl Future<Output = std::io::Result<String>> + Send;
    /// Shows the device flow's code and where to enter it.
    fn show_device_code(&self, verification_uri: &str, user_code: &str, complete_uri: Option<&str>);
}

/// Options of the authorization-code flows.
#[derive(Debug, Clone, Default)]
pub struct BrowserOptions {
    /// The mailbox, sent as `login_hint` (and `username`, the open
    /// profile's parameter) so the provider preselects it.
    pub login_hint: Option<String>,
    /// A fixed redirect URI (must be `http://127.0.0.1:PORT/...` or
    /// `http://localhost:PORT/...` for the loopback flow); default: a
    /// random port on 127.0.0.1.
    pub redirect_uri: Option<String>,
    /// How long to wait for the browser to come back.
    pub timeout: Duration,
    /// Do not try to open a browser (the URL is printed either way).
    pub no_browser: bool,
    /// Extra authorization-request parameters a provider needs (Google:
    /// `access_type=offline` and `prompt=consent` for a refresh token).
    pub extra_params: Vec<(String, String)>,
}

/// A token endpoint's error body: RFC 6749 section 5.2, plus the members
/// providers add that change what the error means.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ProviderErrorResponse {
    error: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error_description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error_uri: Option<String>,
    /// Fastmail: an `invalid_grant` that may become valid again.
    #[serde(default)]
    temporary: bool,
}

impl std::fmt::Display for ProviderErrorResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.error)?;
        if let Some(d) = &self.error_description {
            write!(f, ": {d}")?;
        }
        Ok(())
    }
}

impl oauth2::ErrorResponse for ProviderErrorResponse {}

pub(crate) type Client = oauth2::Client<
    ProviderErrorResponse,
    BasicTokenResponse,
    oauth2::basic::BasicTokenIntrospectionResponse,
    oauth2::StandardRevocableToken,
    oauth2::basic::BasicRevocationErrorResponse,
    oauth2::EndpointNotSet,
    oauth2::EndpointNotSet,
    oauth2::EndpointNotSet,
    oauth2::EndpointNotSet,
    oauth2::EndpointSet,
>;

fn client(ep: &FlowEndpoints<'_>) -> Result<Client, FlowError> {
    token_client(ep.client_id, ep.client_secret, ep.token_url)
}

/// An `oauth2` client for a token endpoint (flows and refreshes alike). The
/// client id (and secret) go in the form body: accepted by Microsoft,
/// Google and generic servers alike.
pub(crate) fn token_client(
    client_id: &str,
    client_secret: Option<&SecretString>,
    token_url: &str,
) -> Result<Client, FlowError> {
    let token_url = TokenUrl::new(token_url.to_string())
        .map_err(|e| FlowError::Unsupported(format!("token_url: {e}")))?;
    let mut c = oauth2::Client::<
        ProviderErrorResponse,
        BasicTokenResponse,
        oauth2::basic::BasicTokenIntrospectionResponse,
        oauth2::StandardRevocableToken,
        oauth2::basic::BasicRevocationErrorResponse,
    >::new(ClientId::new(client_id.to_string()))
    .set_token_uri(token_url)
    .set_auth_type(AuthType::RequestBody);
    if let Some(secret) = client_secret {
        c = c.set_client_secret(ClientSecret::new(secret.expose_secret().to_string()));
    }
    Ok(c)
}

fn scopes<'a>(ep: &'a FlowEndpoints<'a>) -> impl Iterator<Item = Scope> + 'a {
    ep.scopes.iter().map(|s| Scope::new(s.clone()))
}

/// An `oauth2` request error as a [`FlowError`]; also used for refreshes.
pub(crate) fn token_error<
    E: std::error::Error + Send + Sync + 'static,
    T: oauth2::ErrorResponse + 'static,
>(
    e: RequestTokenError<E, T>,
) -> FlowError {
    match e {
        RequestTokenError::ServerResponse(r) => {
            // Both error types serialise to RFC 6749's JSON.
            let v = serde_json::to_value(&r).unwrap_or_default();
            FlowError::Token {
                code: v
                    .get("error")
                    .and_then(|x| x.as_str())
                    .unwrap_or("error")
                    .to_string(),
                description: one_line(
                    v.get("error_description")
                        .and_then(|x| x.as_str())
                        .unwrap_or(""),
                ),
                temporary: v.get("temporary").and_then(|x| x.as_bool()) == Some(true),
            }
        }
        RequestTokenError::Request(err) => FlowError::http(err),
        RequestTokenError::Parse(..) => FlowError::BadResponse("token"),
        RequestTokenError::Other(s) => FlowError::Http(one_line(&s).into()),
    }
}

fn obtained(r: &BasicTokenResponse) -> Obtained {
    Obtained {
        refresh_token: r
            .refresh_token()
            .map(|t| SecretString::from(t.secret().clone())),
        access_token: SecretString::from(r.access_token().secret().clone()),
        expires_in: r.expires_in(),
    }
}

/// A message a person can act on for an authorization `error` code,
/// including the open public-client profile's codes.
pub fn explain_authorization_error(code: &str, description: &str) -> String {
    let text = match code {
        "access_denied" => "the consent was declined (by you or by an administrator's policy)",
        "auth_failed" => {
            "the provider could not authenticate you: check the user name and password you typed in the browser"
        }
        "blocked" => {
            "the provider blocked this sign-in (account locked or a security policy); ask your mail provider"
        }
        "unknown_user" => "the provider does not know this user: check the address",
        "user_not_here" => {
            "this address is not served by this provider: check which provider hosts the domain"
        }
        "no_oauth" => {
            "the provider does not offer OAuth for this account: use the provider's app passwords or another setting"
        }
        "invalid_scope" => "the provider does not accept the requested scopes for this client",
        "unauthorized_client" => {
            "the client id is not allowed to use this flow: check the app registration"
        }
        "consent_required" | "interaction_required" => {
            "the provider needs an interactive consent: use the browser flow"
        }
        _ => "",
    };
    let description = one_line(description);
    match (text.is_empty(), description.is_empty()) {
        (true, true) => format!("the provider answered `{code}`"),
        (true, false) => description,
        (false, true) => text.to_string(),
        (false, false) => format!("{text} (provider: {description})"),
    }
}

/// A redirect's query parameters.
#[derive(Default)]
struct Redirect {
    params: HashMap<String, String>,
}

impl std::fmt::Debug for Redirect {
    /// Parameter names only (and the `error` code): `code` is an
    /// authorization code and `state` guards it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut names: Vec<&str> = self.params.keys().map(String::as_str).collect();
        names.sort_unstable();
        f.debug_struct("Redirect")
            .field("params", &names)
            .field("error", &self.params.get("error"))
            .finish()
    }
}

impl Redirect {
    fn from_url(url: &Url) -> Redirect {
        Redirect {
            params: url
                .query_pairs()
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect(),
        }
    }

    /// The code, after checking state and error.
    fn code(&self, state: &CsrfToken) -> Result<AuthorizationCode, FlowError> {
        let state_ok = self.params.get("state").is_some_and(|s| {
            subtle::ConstantTimeEq::ct_eq(s.as_bytes(), state.secret().as_bytes()).into()
        });
        if let Some(code) = self.params.get("error") {
            if !state_ok {
                return Err(FlowError::BadRedirect(
                    "the redirect carries an error but not our state: ignored; start again".into(),
                ));
            }
            let description = self
                .params
                .get("error_description")
                .map(String::as_str)
                .unwrap_or("");
            return Err(FlowError::Authorization {
                code: code.clone(),
                message: explain_authorization_error(code, description),
            });
        }
        if !state_ok {
            return Err(FlowError::BadRedirect(
                "the redirect's `state` does not match this sign-in (a stale or forged redirect); start again".into(),
            ));
        }
        self.params
            .get("code")
            .map(|c| AuthorizationCode::new(c.clone()))
            .ok_or_else(|| FlowError::BadRedirect("the redirect has no `code` parameter".into()))
    }
}

fn authorize_request(
    ep: &FlowEndpoints<'_>,
    redirect: &str,
    opts: &BrowserOptions,
) -> Result<(Url, CsrfToken, oauth2::PkceCodeVerifier), FlowError> {
    let auth_url = ep.authorize_url.ok_or_else(|| {
        FlowError::Unsupported("the provider has no authorize_url configured".into())
    })?;
    let auth_url = AuthUrl::new(auth_url.to_string())
        .map_err(|e| FlowError::Unsupported(format!("authorize_url: {e}")))?;
    let redirect = RedirectUrl::new(redirect.to_string())
        .map_err(|e| FlowError::Unsupported(format!("redirect_uri: {e}")))?;
    let c = client(ep)?
        .set_auth_uri(auth_url)
        .set_redirect_uri(redirect);
    let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
    let mut req = c
        .authorize_url(CsrfToken::new_random)
        .add_scopes(scopes(ep))
        .set_pkce_challenge(challenge);
    if let Some(hint) = &opts.login_hint {
        req = req
            .add_extra_param("login_hint", hint.clone())
            .add_extra_param("username", hint.clone());
    }
    for (name, value) in &opts.extra_params {
        req = req.add_extra_param(name.clone(), value.clone());
    }
    let (url, state) = req.url();
    Ok((url, state, verifier))
}

async fn exchange(
    ep: &FlowEndpoints<'_>,
    http: &reqwest::Client,
    redirect: &str,
    code: AuthorizationCode,
    verifier: oauth2::PkceCodeVerifier,
) -> Result<Obtained, FlowError> {
    let redirect = RedirectUrl::new(redirect.to_string())
        .map_err(|e| FlowError::Unsupported(format!("redirect_uri: {e}")))?;
    let r = client(ep)?
        .set_redirect_uri(redirect)
        .exchange_code(code)
        .set_pkce_verifier(verifier)
        .request_async(http)
        .await
        .map_err(token_error)?;
    Ok(obtained(&r))
}

const DONE_PAGE: &str = "<!doctype html><meta charset=utf-8><title>mailbridge</title>\
<p>mailbridge received the authorization. You can close this window.</p>";
const ERROR_PAGE: &str = "<!doctype html><meta charset=utf-8><title>mailbridge</title>\
<p>mailbridge could not use this redirect; see the terminal.</p>";

/// Authorization code + PKCE with a loopback redirect listener on
/// 127.0.0.1: the URL is shown (and a browser opened unless told not to),
/// and the provider's redirect comes back to us.
pub async fn authorization_code_loopback(
    ep: &FlowEndpoints<'_>,
    http: &reqwest::Client,
    opts: &BrowserOptions,
    ui: &impl FlowUi,
) -> Result<Obtained, FlowError> {
    let (bind_port, redirect) = match &opts.redirect_uri {
        Some(uri) => {
            let u = Url::parse(uri)
                .map_err(|e| FlowError::Unsupported(format!("redirect_uri `{uri}`: {e}")))?;
            let host_ok = matches!(u.host_str(), Some("127.0.0.1" | "localhost"));
            if u.scheme() != "http" || !host_ok {
                return Err(FlowError::Unsupported(format!(
                    "redirect_uri `{uri}` must be http://127.0.0.1:PORT/ or http://localhost:PORT/ for the loopback flow; use --no-browser for other redirects"
                )));
            }
            (u.port().unwrap_or(80), uri.clone())
        }
        None => (0, String::new()),
    };
    let listener = TcpListener::bind(("127.0.0.1", bind_port))
        .await
        .map_err(|e| {
            FlowError::io(
                format!("cannot listen on 127.0.0.1:{bind_port} for the redirect"),
                e,
            )
        })?;
    let port = listener
        .local_addr()
        .map_err(|e| FlowError::io("cannot read the redirect listener's port", e))?
        .port();
    let redirect = if redirect.is_empty() {
        format!("http://127.0.0.1:{port}/")
    } else {
        redirect
    };
    let (url, state, verifier) = authorize_request(ep, &redirect, opts)?;

    let (tx, mut rx) = mpsc::channel::<Redirect>(4);
    let app = axum::Router::new().fallback(axum::routing::get(
        move |axum::extract::Query(params): axum::extract::Query<HashMap<String, String>>| {
            let tx = tx.clone();
            async move {
                if params.contains_key("code") || params.contains_key("error") {
                    let _ = tx.send(Redirect { params }).await;
                    axum::response::Html(DONE_PAGE)
                } else {
                    axum::response::Html(ERROR_PAGE)
                }
            }
        },
    ));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = stop_rx.await;
            })
            .await;
    });

    ui.show_url(url.as_str());
    if !opts.no_browser && !ui.open_browser(url.as_str()) {
        tracing::debug!("no browser could be opened; the URL was printed");
    }
    let deadline = tokio::time::Instant::now() + opts.timeout;
    let result = loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Err(_) | Ok(None) => break Err(FlowError::Timeout(opts.timeout.as_secs())),
            Ok(Some(redirect)) => match redirect.code(&state) {
                Ok(code) => break Ok(code),
                // A redirect for another sign-in (an old tab): keep waiting.
                Err(FlowError::BadRedirect(why)) => tracing::warn!("ignored a redirect: {why}"),
                Err(e) => break Err(e),
            },
        }
    };
    let _ = stop_tx.send(());
    let _ = server.await;
    exchange(ep, http, &redirect, result?, verifier).await
}

/// Authorization code + PKCE where the user pastes the URL the browser was
/// redirected to (nothing needs to listen on it).
pub async fn authorization_code_paste(
    ep: &FlowEndpoints<'_>,
    http: &reqwest::Client,
    opts: &BrowserOptions,
    ui: &impl FlowUi,
) -> Result<Obtained, FlowError> {
    let redirect = opts
        .redirect_uri
        .clone()
        .unwrap_or_else(|| "http://localhost/".to_string());
    let (url, state, verifier) = authorize_request(ep, &redirect, opts)?;
    ui.show_url(url.as_str());
    let line = tokio::time::timeout(
        opts.timeout,
        ui.read_line("After signing in, the browser goes to a page that may not load. Paste its full address here: "),
    )
    .await
    .map_err(|_| FlowError::Timeout(opts.timeout.as_secs()))?
    .map_err(|e| FlowError::io("cannot read the pasted address", e))?;
    let pasted = Url::parse(line.trim()).map_err(|_| {
        FlowError::BadRedirect(
            "that is not a URL; paste the whole address from the browser's address bar".into(),
        )
    })?;
    exchange(
        ep,
        http,
        &redirect,
        Redirect::from_url(&pasted).code(&state)?,
        verifier,
    )
    .await
}

/// RFC 8628 device code: shows a code to enter on another device and polls
/// until the user approves (honouring `authorization_pending` and
/// `slow_down`).
pub async fn device_code(
    ep: &FlowEndpoints<'_>,
    http: &reqwest::Client,
    timeout: Duration,
    ui: &impl FlowUi,
) -> Result<Obtained, FlowError> {
    let device_url = ep.device_url.ok_or_else(|| {
        FlowError::Unsupported(
            "the provider has no device authorization endpoint configured".into(),
        )
    })?;
    let device_url = DeviceAuthorizationUrl::new(device_url.to_string())
        .map_err(|e| FlowError::Unsupported(format!("device_url: {e}")))?;
    let c = client(ep)?.set_device_authorization_url(device_url);
    let details: StandardDeviceAuthorizationResponse = c
        .exchange_device_code()
        .add_scopes(scopes(ep))
        .request_async(http)
        .await
        .map_err(token_error)?;
    ui.show_device_code(
        details.verification_uri().as_str(),
        details.user_code().secret(),
        details
            .verification_uri_complete()
            .map(|u| u.secret().as_str()),
    );
    let r = c
        .exchange_device_access_token(&details)
        .request_async(http, tokio::time::sleep, Some(timeout))
        .await
        .map_err(|e| match e {
            RequestTokenError::Other(s) if s.contains("timed out") || s.contains("Timed out") => {
                FlowError::Timeout(timeout.as_secs())
            }
            other => token_error(other),
        })?;
    Ok(obtained(&r))
}

/// How a confidential client proves itself in the client-credentials grant.
pub enum ClientProof<'a> {
    /// The client secret of `FlowEndpoints`.
    Secret,
    /// A private-key JWT signed with the key of a certificate registered
    /// for the app (Microsoft certificate credentials).
    Certificate {
        /// PKCS#8 PEM private key.
        key_pem: &'a SecretString,
        /// PEM certificate (for the `x5t` thumbprint).
        cert_pem: &'a str,
    },
}

/// Client credentials (app-only access, e.g. Microsoft IMAP.AccessAsApp).
pub async fn client_credentials(
    ep: &FlowEndpoints<'_>,
    http: &reqwest::Client,
    proof: ClientProof<'_>,
) -> Result<Obtained, FlowError> {
    let c = client(ep)?;
    let mut req = c.exchange_client_credentials().add_scopes(scopes(ep));
    match proof {
        ClientProof::Secret => {
            if ep.client_secret.is_none() {
                return Err(FlowError::Unsupported(
                    "client credentials need a client_secret (or a client certificate and key)"
                        .into(),
                ));
            }
        }
        ClientProof::Certificate { key_pem, cert_pem } => {
            let key = Rs256Key::from_pkcs8_pem(key_pem)?;
            let now = unix_now();
            let header = serde_json::json!({"alg": "RS256", "typ": "JWT", "x5t": super::jwt::x5t(cert_pem)?});
            let claims = serde_json::json!({
                "aud": ep.token_url, "iss": ep.client_id, "sub": ep.client_id,
                "jti": CsrfToken::new_random().secret(), "nbf": now, "iat": now, "exp": now + 600,
            });
            req = req
                .add_extra_param(
                    "client_assertion_type",
                    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                )
                .add_extra_param("client_assertion", key.sign(&header, &claims)?);
        }
    }
    let r = req.request_async(http).await.map_err(token_error)?;
    Ok(obtained(&r))
}

/// A Google service-account key file (the JSON the console downloads).
#[derive(Deserialize)]
pub struct ServiceAccountKey {
    /// The service account's address: the assertion's issuer.
    pub client_email: String,
    /// PKCS#8 PEM RSA private key.
    pub private_key: SecretString,
    /// Key id, sent as the JWT `kid`.
    #[serde(default)]
    pub private_key_id: Option<String>,
    /// The token endpoint the key is for.
    #[serde(default)]
    pub token_uri: Option<String>,
}

impl std::fmt::Debug for ServiceAccountKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceAccountKey")
            .field("client_email", &self.client_email)
            .finish_non_exhaustive()
    }
}

impl ServiceAccountKey {
    /// Reads and checks a key file.
    pub fn from_json(text: &str) -> Result<ServiceAccountKey, FlowError> {
        let key: ServiceAccountKey = serde_json::from_str(text).map_err(|e| {
            FlowError::Unsupported(format!(
                "not a service-account key file (expected client_email and private_key): line {}, column {}",
                e.line(),
                e.column()
            ))
        })?;
        Rs256Key::from_pkcs8_pem(&key.private_key)?;
        Ok(key)
    }
}

#[derive(Deserialize)]
struct TokenJson {
    access_token: Option<String>,
    expires_in: Option<u64>,
    refresh_token: Option<String>,
    error: Option<String>,
    error_description: Option<String>,
    #[serde(default)]
    temporary: bool,
}

/// RFC 7523 JWT bearer grant: a service account acting for `subject`
/// (Google Workspace domain-wide delegation).
pub async fn jwt_bearer(
    ep: &FlowEndpoints<'_>,
    http: &reqwest::Client,
    key: &ServiceAccountKey,
    subject: &str,
) -> Result<Obtained, FlowError> {
    let signer = Rs256Key::from_pkcs8_pem(&key.private_key)?;
    let now = unix_now();
    let mut header = serde_json::json!({"alg": "RS256", "typ": "JWT"});
    if let Some(kid) = &key.private_key_id {
        header["kid"] = serde_json::Value::String(kid.clone());
    }
    let claims = serde_json::json!({
        "iss": key.client_email, "sub": subject, "scope": ep.scopes.join(" "),
        "aud": ep.token_url, "iat": now, "exp": now + 3600,
    });
    let assertion = SecretString::from(signer.sign(&header, &claims)?);
    let response = http
        .post(ep.token_url)
        .form(&[
            ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"),
            ("assertion", assertion.expose_secret()),
        ])
        .send()
        .await
        .map_err(FlowError::http)?;
    let body = response.bytes().await.map_err(FlowError::http)?;
    let json: TokenJson =
        serde_json::from_slice(&body).map_err(|_| FlowError::BadResponse("token"))?;
    match (json.access_token, json.error) {
        (Some(token), None) => Ok(Obtained {
            refresh_token: json.refresh_token.map(SecretString::from),
            access_token: SecretString::from(token),
            expires_in: json.expires_in.map(Duration::from_secs),
        }),
        (_, Some(code)) => Err(FlowError::Token {
            code,
            description: one_line(json.error_description.as_deref().unwrap_or("")),
            temporary: json.temporary,
        }),
        (None, None) => Err(FlowError::Http(
            "the token endpoint answered without a token".into(),
        )),
    }
}

/// The resource owner password grant (only where the provider allows it,
/// e.g. a Keycloak realm for a legacy integration).
pub async fn password(
    ep: &FlowEndpoints<'_>,
    http: &reqwest::Client,
    username: &str,
    password: &SecretString,
) -> Result<Obtained, FlowError> {
    let c = client(ep)?;
    let user = ResourceOwnerUsername::new(username.to_string());
    let pass = ResourceOwnerPassword::new(password.expose_secret().to_string());
    let r = c
        .exchange_password(&user, &pass)
        .add_scopes(scopes(ep))
        .request_async(http)
        .await
        .map_err(token_error)?;
    Ok(obtained(&r))
}

/// RFC 7591 dynamic client registration of a public client (no secret,
/// PKCE); returns the new client id.
pub async fn register_client(
    http: &reqwest::Client,
    registration_url: &str,
    redirect_uris: &[String],
) -> Result<String, FlowError> {
    let body = serde_json::json!({
        "client_name": "mailbridge",
        "redirect_uris": redirect_uris,
        "token_endpoint_auth_method": "none",
        "grant_types": ["authorization_code", "refresh_token", "urn:ietf:params:oauth:grant-type:device_code"],
        "response_types": ["code"],
    });
    let response = http
        .post(registration_url)
        .json(&body)
        .send()
        .await
        .map_err(FlowError::http)?;
    let status = response.status();
    let json: serde_json::Value = response
        .json()
        .await
        .map_err(|_| FlowError::BadResponse("registration"))?;
    let field = |k: &str| json.get(k).and_then(|v| v.as_str()).map(str::to_string);
    match field("client_id") {
        Some(id) if status.is_success() => Ok(id),
        _ => Err(FlowError::Token {
            code: field("error").unwrap_or_else(|| format!("HTTP {status}")),
            description: one_line(&field("error_description").unwrap_or_default()),
            temporary: false,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_profile_errors_have_their_own_messages() {
        let codes = [
            "auth_failed",
            "blocked",
            "unknown_user",
            "user_not_here",
            "no_oauth",
        ];
        let messages: std::collections::HashSet<String> = codes
            .iter()
            .map(|c| explain_authorization_error(c, ""))
            .collect();
        assert_eq!(messages.len(), codes.len());
        assert!(explain_authorization_error("weird", "").contains("weird"));
        assert!(explain_authorization_error("weird", "details here").contains("details here"));
    }

    #[test]
    fn a_redirect_and_its_code_print_no_secret() {
        let url = "http://127.0.0.1:1/?code=AUTHCODE-SECRET-1&state=STATE-SECRET-2";
        let redirect = Redirect::from_url(&Url::parse(url).unwrap());
        let printed = format!("{redirect:?}");
        assert!(
            printed.contains("\"code\"") && printed.contains("\"state\""),
            "{printed}"
        );
        let code = redirect
            .code(&CsrfToken::new("STATE-SECRET-2".into()))
            .unwrap();
        let printed = format!("{printed} {code:?}");
        for secret in ["AUTHCODE-SECRET-1", "STATE-SECRET-2"] {
            assert!(!printed.contains(secret), "{printed}");
        }
    }

    #[test]
    fn redirect_state_is_checked() {
        let state = CsrfToken::new("s1".into());
        let ok = Redirect::from_url(&Url::parse("http://127.0.0.1:1/?code=abc&state=s1").unwrap());
        assert_eq!(ok.code(&state).unwrap().secret(), "abc");
        let forged =
            Redirect::from_url(&Url::parse("http://127.0.0.1:1/?code=abc&state=s2").unwrap());
        assert!(matches!(
            forged.code(&state),
            Err(FlowError::BadRedirect(_))
        ));
        let err =
            Redirect::from_url(&Url::parse("http://127.0.0.1:1/?error=no_oauth&state=s1").unwrap());
        match err.code(&state) {
            Err(FlowError::Authorization { code, .. }) => assert_eq!(code, "no_oauth"),
            other => panic!("{other:?}"),
        }
    }
}
