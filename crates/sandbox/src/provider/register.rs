//! Dynamic client registration of public clients (RFC 7591) and redirect
//! URI matching (RFC 8252 section 7.3).

use super::*;
use reqwest::Url;
use serde_json::{Map, Value};

/// A client registered at `/register`: always public.
#[derive(Debug, Clone)]
pub(super) struct RegisteredClient {
    pub(super) redirect_uris: Vec<String>,
    pub(super) grant_types: Vec<String>,
}

impl RegisteredClient {
    /// The URI is one registered, or differs from a registered loopback
    /// URI only in the port.
    pub(super) fn allows_redirect(&self, uri: &str) -> bool {
        self.redirect_uris
            .iter()
            .any(|r| r == uri || same_loopback_but_port(r, uri))
    }
}

/// `http://` to a loopback IP literal or `localhost`, no user info, no
/// fragment.
fn loopback_url(uri: &str) -> Option<Url> {
    let url = Url::parse(uri).ok()?;
    let host = url.host_str()?;
    let loopback = host == "localhost"
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    (url.scheme() == "http"
        && loopback
        && url.username().is_empty()
        && url.password().is_none()
        && url.fragment().is_none()
        && !uri.contains('#'))
    .then_some(url)
}

/// Any loopback redirect, as the `open` client may use.
pub(super) fn is_loopback_redirect(uri: &str) -> bool {
    loopback_url(uri).is_some()
}

fn same_loopback_but_port(registered: &str, requested: &str) -> bool {
    match (loopback_url(registered), loopback_url(requested)) {
        (Some(a), Some(b)) => {
            a.host_str() == b.host_str() && a.path() == b.path() && a.query() == b.query()
        }
        _ => false,
    }
}

/// A redirect URI a public client may register: https, or http to a
/// loopback address; absolute and without a fragment.
fn registrable_redirect(uri: &str) -> bool {
    match Url::parse(uri) {
        Ok(url) if url.fragment().is_none() && !uri.contains('#') => match url.scheme() {
            "https" => url.host_str().is_some(),
            "http" => loopback_url(uri).is_some(),
            _ => false,
        },
        _ => false,
    }
}

/// Grant types a public client may register.
const PUBLIC_GRANT_TYPES: [&str; 3] = ["authorization_code", "refresh_token", DEVICE_CODE_GRANT];

pub(super) async fn register_endpoint(
    State(shared): State<Arc<Shared>>,
    body: Result<axum::Json<Value>, JsonRejection>,
) -> Response {
    match register(&shared, body) {
        Ok(body) => (StatusCode::CREATED, no_store(), axum::Json(body)).into_response(),
        Err(e) => e.into_response(),
    }
}

fn metadata_error(description: impl Into<String>) -> OAuthError {
    OAuthError::new("invalid_client_metadata", description)
}

/// An optional array of strings.
fn string_array(meta: &Map<String, Value>, key: &str) -> Result<Option<Vec<String>>, String> {
    match meta.get(key) {
        None => Ok(None),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .map(Some)
            .ok_or_else(|| format!("{key} must be an array of strings")),
        Some(_) => Err(format!("{key} must be an array of strings")),
    }
}

/// RFC 7591 section 2 and 3.2.1, for public clients only.
fn register(
    shared: &Shared,
    body: Result<axum::Json<Value>, JsonRejection>,
) -> Result<Value, OAuthError> {
    let axum::Json(body) =
        body.map_err(|e| metadata_error(format!("expected a JSON object: {e}")))?;
    let Value::Object(meta) = body else {
        return Err(metadata_error("expected a JSON object"));
    };
    match meta.get("token_endpoint_auth_method") {
        Some(Value::String(m)) if m == "none" => {}
        Some(_) => {
            return Err(metadata_error(
                "only token_endpoint_auth_method none (public clients) can register here",
            ));
        }
        None => {
            return Err(metadata_error(
                "token_endpoint_auth_method is required (it would default to \
                 client_secret_basic): only none (public clients) can register here",
            ));
        }
    }
    let grant_types = string_array(&meta, "grant_types")
        .map_err(metadata_error)?
        .unwrap_or_else(|| vec!["authorization_code".to_string()]);
    if grant_types.is_empty() {
        return Err(metadata_error("grant_types must not be empty"));
    }
    if let Some(g) = grant_types
        .iter()
        .find(|g| !PUBLIC_GRANT_TYPES.contains(&g.as_str()))
    {
        return Err(metadata_error(format!(
            "grant type {g} is not available to public clients"
        )));
    }
    let response_types = string_array(&meta, "response_types")
        .map_err(metadata_error)?
        .unwrap_or_else(|| vec!["code".to_string()]);
    if let Some(r) = response_types.iter().find(|r| *r != "code") {
        return Err(metadata_error(format!(
            "response type {r} is not supported (only code)"
        )));
    }
    let code_grant = grant_types.iter().any(|g| g == "authorization_code");
    let code_response = response_types.iter().any(|r| r == "code");
    if code_grant != code_response {
        return Err(metadata_error(
            "grant_types and response_types disagree: authorization_code goes with code",
        ));
    }
    let redirect_uris = string_array(&meta, "redirect_uris")
        .map_err(|e| OAuthError::new("invalid_redirect_uri", e))?
        .unwrap_or_default();
    if code_grant && redirect_uris.is_empty() {
        return Err(OAuthError::new(
            "invalid_redirect_uri",
            "redirect_uris is required for the authorization_code grant",
        ));
    }
    if let Some(bad) = redirect_uris.iter().find(|u| !registrable_redirect(u)) {
        return Err(OAuthError::new(
            "invalid_redirect_uri",
            format!(
                "redirect URI {bad} is not acceptable: https, or http to a loopback address, \
                 absolute and without a fragment"
            ),
        ));
    }
    let client_name = match meta.get("client_name") {
        None => None,
        Some(Value::String(name)) => Some(name.clone()),
        Some(_) => return Err(metadata_error("client_name must be a string")),
    };
    let client_id = random_token();
    shared.registry().clients.insert(
        client_id.clone(),
        RegisteredClient {
            redirect_uris: redirect_uris.clone(),
            grant_types: grant_types.clone(),
        },
    );
    let mut body = json!({
        "client_id": client_id,
        "client_id_issued_at": unix_now(),
        "redirect_uris": redirect_uris,
        "token_endpoint_auth_method": "none",
        "grant_types": grant_types,
        "response_types": response_types,
    });
    if let Some(name) = client_name {
        body["client_name"] = json!(name);
    }
    Ok(body)
}
