//! The status listener (`[status]`): a page a person reads at a glance
//! (each account's grant state, token expiry, last refresh, last login and error,
//! sessions; the listeners; the spool; a banner when something needs a
//! person), `/metrics` in the Prometheus text format, and `/healthz`.
//! Plain HTML that refreshes itself every 10 s, no JavaScript.
//!
//! With a token file, the page and `/metrics` need the token
//! (`Authorization: Bearer TOKEN`, or `?token=TOKEN` for a browser);
//! `/healthz` tells only whether mailbridge serves.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::watch;

use crate::clock::unix_now;
use crate::login::Gateway;
use crate::spool::{Area, Spool};

/// What the handlers read.
pub struct StatusState {
    /// The login path: settings, vault, alerts, metrics.
    pub gateway: Arc<Gateway>,
    /// The spool, when there is one.
    pub spool: Option<Spool>,
    /// The mail listeners: protocol and address.
    pub listeners: Vec<(&'static str, SocketAddr)>,
    /// The token the page and `/metrics` need, if any.
    pub token: Option<SecretString>,
    /// True once mailbridge is draining.
    pub stopping: watch::Receiver<bool>,
}

/// Serves `listener` until `stop` turns true.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<StatusState>,
    mut stop: watch::Receiver<bool>,
) {
    let app = axum::Router::new()
        .route("/", axum::routing::get(page))
        .route("/metrics", axum::routing::get(metrics))
        .route("/healthz", axum::routing::get(healthz))
        .with_state(state);
    let shutdown = async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
    {
        tracing::warn!(error = %e, "the status listener stopped");
    }
}

/// Whether the request carries the token (or none is needed).
fn allowed(state: &StatusState, headers: &HeaderMap, query: &Query<Vec<(String, String)>>) -> bool {
    let Some(token) = &state.token else {
        return true;
    };
    let want = token.expose_secret().as_bytes();
    let same = |got: &str| -> bool {
        use subtle::ConstantTimeEq;
        got.len() == want.len() && bool::from(got.as_bytes().ct_eq(want))
    };
    let from_header = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| same(t.trim()));
    let from_query = query.0.iter().any(|(k, v)| k == "token" && same(v));
    from_header || from_query
}

fn unauthorized() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer")],
        "the status page needs its token: Authorization: Bearer TOKEN, or ?token=TOKEN\n",
    )
        .into_response()
}

async fn healthz(State(state): State<Arc<StatusState>>) -> Response {
    if *state.stopping.borrow() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response()
    } else {
        (StatusCode::OK, "ok\n").into_response()
    }
}

async fn metrics(
    State(state): State<Arc<StatusState>>,
    headers: HeaderMap,
    query: Query<Vec<(String, String)>>,
) -> Response {
    if !allowed(&state, &headers, &query) {
        return unauthorized();
    }
    let m = state.gateway.metrics();
    if let Some(spool) = &state.spool {
        let count = |a| spool.list(a).map(|l| l.len()).unwrap_or(0);
        m.spool_depth(count(Area::Queue), count(Area::Failed));
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        m.encode(),
    )
        .into_response()
}

/// One account's row.
#[derive(Debug, Clone, PartialEq)]
pub struct AccountRow {
    /// The login name.
    pub user: String,
    /// The provider's name.
    pub provider: String,
    /// `fine`, `refresh failing for ...`, `refused: re-authorize`, `no
    /// grant yet`.
    pub state: String,
    /// Whether a person must act.
    pub needs_person: bool,
    /// The access token's expiry, in words.
    pub token: String,
    /// The last token refresh (a login's or the background's), in words.
    pub last_refresh: String,
    /// The last login, in words.
    pub last_login: String,
    /// The last error, as shown to clients (no secrets).
    pub last_error: String,
    /// Relayed sessions now.
    pub sessions: usize,
}

fn ago(secs: u64) -> String {
    match secs {
        0..60 => format!("{secs} s ago"),
        60..3600 => format!("{} min ago", secs / 60),
        3600..172_800 => format!("{} h ago", secs / 3600),
        _ => format!("{} days ago", secs / 86_400),
    }
}

/// The rows of the configured accounts (catch-alls: the stored accounts
/// of their domain).
pub fn account_rows(gateway: &Gateway) -> Vec<AccountRow> {
    let settings = gateway.settings();
    let store = gateway.vault().store();
    let stored = store.accounts().unwrap_or_default();
    let mut names: Vec<(String, String)> = Vec::new();
    for a in &settings.accounts {
        match a.user.strip_prefix("*@") {
            Some(domain) => {
                for s in &stored {
                    if s.rsplit_once('@')
                        .is_some_and(|(_, d)| d.eq_ignore_ascii_case(domain))
                    {
                        names.push((s.clone(), a.provider.clone()));
                    }
                }
            }
            None => names.push((a.user.to_lowercase(), a.provider.clone())),
        }
    }
    let now = unix_now();
    names
        .into_iter()
        .map(|(user, provider)| {
            let meta = store.load_meta(&user).ok().flatten();
            let has_grant = matches!(store.load_grant(&user), Ok(Some(_)));
            let (state, needs_person) = if let Some(why) = gateway.refused_because(&user) {
                (format!("refused: re-authorize ({why})"), true)
            } else if let Some(d) = gateway.alerts().failing_for(&user) {
                (
                    format!("refresh failing for {} min", d.as_secs() / 60),
                    d.as_secs() >= 3600,
                )
            } else if !has_grant {
                (format!("no grant yet: mailbridge account add {user}"), true)
            } else {
                ("fine".to_owned(), false)
            };
            let token = match meta.as_ref().and_then(|m| m.access_expires_at) {
                Some(at) if at > now => format!("expires in {} min", (at - now) / 60),
                Some(_) => "expired (renewed at the next login)".to_owned(),
                None => "none yet".to_owned(),
            };
            let last_refresh = meta
                .as_ref()
                .and_then(|m| m.refreshed_at)
                .map(|t| ago(now.saturating_sub(t)))
                .unwrap_or_else(|| "never".to_owned());
            let last_login = meta
                .as_ref()
                .and_then(|m| m.last_login_at)
                .map(|t| ago(now.saturating_sub(t)))
                .unwrap_or_else(|| "never".to_owned());
            let last_error = meta
                .as_ref()
                .and_then(|m| m.last_error.clone())
                .unwrap_or_default();
            AccountRow {
                sessions: gateway.sessions_of(&user),
                user,
                provider,
                state,
                needs_person,
                token,
                last_refresh,
                last_login,
                last_error,
            }
        })
        .collect()
}

fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

async fn page(
    State(state): State<Arc<StatusState>>,
    headers: HeaderMap,
    query: Query<Vec<(String, String)>>,
) -> Response {
    if !allowed(&state, &headers, &query) {
        return unauthorized();
    }
    let rows = account_rows(&state.gateway);
    let spool = state.spool.as_ref().map(|s| {
        (
            s.list(Area::Queue).map(|l| l.len()).unwrap_or(0),
            s.list(Area::Failed).map(|l| l.len()).unwrap_or(0),
        )
    });
    let mut problems: Vec<String> = rows
        .iter()
        .filter(|r| r.needs_person)
        .map(|r| format!("{}: {}", r.user, r.state))
        .collect();
    if let Some((_, failed)) = spool
        && failed > 0
    {
        problems.push(format!(
            "{failed} spooled message(s) failed: see `mailbridge queue list`"
        ));
    }
    let metrics = state.gateway.metrics();
    let mut html = String::new();
    let _ = write!(
        html,
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta http-equiv=\"refresh\" content=\"10\">\
<title>mailbridge status</title>\
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}\
td,th{{border:1px solid #999;padding:.3em .6em;text-align:left}}\
.banner{{padding:.8em;margin-bottom:1em;font-weight:bold}}\
.bad{{background:#f8d7da}}.good{{background:#d4edda}}</style></head><body>\
<h1>mailbridge {version}</h1>",
        version = env!("CARGO_PKG_VERSION")
    );
    if problems.is_empty() {
        html.push_str("<p class=\"banner good\" id=\"banner\">All is well.</p>");
    } else {
        html.push_str("<div class=\"banner bad\" id=\"banner\">Needs a person:<ul>");
        for p in &problems {
            let _ = write!(html, "<li>{}</li>", esc(p));
        }
        html.push_str("</ul></div>");
    }
    html.push_str(
        "<h2>Accounts</h2><table id=\"accounts\"><tr><th>Account</th><th>Provider</th>\
<th>Grant</th><th>Access token</th><th>Last refresh</th><th>Last login</th><th>Last error</th><th>Sessions</th></tr>",
    );
    for r in &rows {
        let _ = write!(
            html,
            "<tr class=\"{cls}\"><td>{}</td><td>{}</td><td class=\"state\">{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&r.user),
            esc(&r.provider),
            esc(&r.state),
            esc(&r.token),
            esc(&r.last_refresh),
            esc(&r.last_login),
            esc(&r.last_error),
            r.sessions,
            cls = if r.needs_person { "bad" } else { "good" },
        );
    }
    html.push_str("</table><h2>Listeners</h2><ul>");
    for (protocol, addr) in &state.listeners {
        let _ = write!(html, "<li>{protocol} on {addr}</li>");
    }
    let _ = write!(
        html,
        "</ul><p>Connections open now: {}.</p>",
        metrics.open_sessions()
    );
    if let Some((queued, failed)) = spool {
        let _ = write!(
            html,
            "<h2>Spool</h2><p>{queued} queued, {failed} failed.</p>"
        );
    }
    html.push_str(
        "<p><a href=\"/metrics\">metrics</a> · <a href=\"/healthz\">health</a></p></body></html>\n",
    );
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], html).into_response()
}
