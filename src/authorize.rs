//! Obtaining an account's grant: picks the flow from the account's grant
//! kind and the provider, runs it, and checks what came back (a refresh
//! token where one is needed, a Microsoft token for the right resource).
//! Used by `mailbridge account add` and `account reauthorize`.

use std::time::Duration;

use secrecy::SecretString;

use crate::clock::unix_now;
use crate::config::{Account, GrantKind};
use crate::oauth::app::{app_token, endpoints};
use crate::oauth::checks::check_audience;
use crate::oauth::flows::{self, BrowserOptions, FlowEndpoints, FlowError, FlowUi, Obtained};
use crate::provider::{Preset, Provider};
use crate::store::seal::GrantData;

/// How the person authorizes, for grants that need a person.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interaction {
    /// Browser with a loopback redirect (the URL is printed too).
    Browser,
    /// Print the URL, read the redirected address back (headless, SSH).
    Paste,
    /// RFC 8628 device code.
    Device,
}

/// What `obtain` needs besides the account.
#[derive(Debug)]
pub struct AuthorizeOptions {
    /// For authorization-code grants.
    pub interaction: Interaction,
    /// How long to wait for the person.
    pub timeout: Duration,
    /// For `grant = "password"`: the upstream account's password.
    pub upstream_password: Option<SecretString>,
}

/// A grant ready to seal.
#[derive(Debug)]
pub struct Authorized {
    /// What to seal (no refresh token for app-only grants).
    pub grant: GrantData,
    /// The flow that produced it, for `account list`.
    pub flow: &'static str,
}

/// Why no grant was obtained. No secret in any message.
#[derive(Debug, thiserror::Error)]
pub enum AuthorizeError {
    /// The flow failed.
    #[error(transparent)]
    Flow(#[from] FlowError),
    /// The configuration cannot work for this flow.
    #[error("{0}")]
    Config(String),
    /// The provider issued no refresh token.
    #[error("the provider issued no refresh token, so the grant would die within the hour: {0}")]
    NoRefreshToken(&'static str),
    /// A Microsoft token for the wrong resource.
    #[error(
        "Microsoft issued a token for {0}, not for Outlook/Exchange Online, and the mail servers would refuse it: put https://outlook.office.com/IMAP.AccessAsUser.All first in the provider's scopes"
    )]
    WrongAudience(String),
}

/// Runs the account's flow and checks the result.
pub async fn obtain(
    provider: &Provider,
    account: &Account,
    opts: &AuthorizeOptions,
    http: &reqwest::Client,
    ui: &impl FlowUi,
) -> Result<Authorized, AuthorizeError> {
    // RFC 7591: a public client of our own, registered for this grant.
    let registered = match (provider.dynamic_registration, account.grant) {
        (true, GrantKind::AuthorizationCode) => {
            let url = provider.registration_url.as_deref().ok_or_else(|| {
                AuthorizeError::Config(format!(
                    "provider `{}` has dynamic_registration = true but its metadata lists no registration_endpoint",
                    provider.name
                ))
            })?;
            let mut redirects = vec![
                "http://127.0.0.1/".to_string(),
                "http://localhost/".to_string(),
            ];
            redirects.extend(provider.redirect_uri.clone());
            Some(flows::register_client(http, url, &redirects).await?)
        }
        _ => None,
    };
    let ep = match &registered {
        Some(client_id) => FlowEndpoints {
            client_id,
            client_secret: None,
            ..endpoints(provider, &provider.scopes)
        },
        None => endpoints(provider, &provider.scopes),
    };
    let (got, flow): (Obtained, &'static str) = match account.grant {
        GrantKind::AuthorizationCode => match opts.interaction {
            Interaction::Device => {
                if provider.is_google() {
                    return Err(AuthorizeError::Config(
                        "Google refuses mail scopes in the device flow (invalid_scope); use the browser flow, and on a headless box --no-browser to paste the redirected address back, or an SSH tunnel to the loopback port".into(),
                    ));
                }
                (
                    flows::device_code(&ep, http, opts.timeout, ui).await?,
                    "device_code",
                )
            }
            interaction => {
                let browser = BrowserOptions {
                    login_hint: Some(account.upstream_user.clone()),
                    redirect_uri: provider.redirect_uri.clone(),
                    timeout: opts.timeout,
                    no_browser: interaction == Interaction::Paste,
                    extra_params: refresh_token_params(provider),
                };
                let got = if interaction == Interaction::Paste {
                    flows::authorization_code_paste(&ep, http, &browser, ui).await?
                } else {
                    flows::authorization_code_loopback(&ep, http, &browser, ui).await?
                };
                (got, "authorization_code")
            }
        },
        GrantKind::Password => {
            let password = opts.upstream_password.as_ref().ok_or_else(|| {
                AuthorizeError::Config(
                    "grant = \"password\" needs the upstream account's password".into(),
                )
            })?;
            (
                flows::password(&ep, http, &account.upstream_user, password).await?,
                "password",
            )
        }
        GrantKind::ClientCredentials | GrantKind::ServiceAccount => (
            app_token(provider, account, http).await?,
            account.grant.name(),
        ),
    };
    if account.grant.has_refresh_token() && got.refresh_token.is_none() {
        return Err(AuthorizeError::NoRefreshToken(match provider.preset {
            _ if provider.is_google() => {
                "revoke the app's access at https://myaccount.google.com/permissions and authorize again"
            }
            Preset::Microsoft => "include offline_access in the scopes",
            _ => "ask for offline_access (or the provider's equivalent) in the scopes",
        }));
    }
    check_audience(provider, &got.access_token)
        .map_err(|w| AuthorizeError::WrongAudience(w.audience))?;
    Ok(Authorized {
        grant: GrantData {
            refresh_token: got.refresh_token,
            obtained_at: unix_now(),
            client_id: registered,
            shared_access: None,
        },
        flow,
    })
}

/// Whether a browser can be opened here (a desktop session).
pub fn desktop_session() -> bool {
    cfg!(any(target_os = "macos", windows))
        || std::env::var_os("DISPLAY").is_some()
        || std::env::var_os("WAYLAND_DISPLAY").is_some()
}

/// Authorization-request parameters a provider needs before it issues a
/// refresh token.
fn refresh_token_params(provider: &Provider) -> Vec<(String, String)> {
    let pair = |k: &str, v: &str| (k.to_string(), v.to_string());
    match provider.preset {
        // Google issues a refresh token only for offline access, and again
        // only with a fresh consent.
        _ if provider.is_google() => {
            vec![pair("access_type", "offline"), pair("prompt", "consent")]
        }
        // Entra ID honours offline_access as is; prompt=consent would force
        // a consent page, which fails where users may not consent.
        Preset::Microsoft => Vec::new(),
        // OpenID Connect Core 1.0 section 11: offline_access is honoured only
        // with prompt=consent. oidc-provider drops it otherwise and issues no
        // refresh token (found by the interop suite).
        _ if provider.scopes.iter().any(|s| s == "offline_access") => {
            vec![pair("prompt", "consent")]
        }
        _ => Vec::new(),
    }
}

/// Opens `url` in the desktop's browser; false when there is none.
pub fn open_browser(url: &str) -> bool {
    desktop_session() && open::that_detached(url).is_ok()
}

/// The flow interface of a running server (authorize on first login): the
/// URL goes to the log and to standard output, and to a browser when the
/// server runs in a desktop session. Nothing can be read back.
pub struct ServerUi {
    /// The account being authorized, for the messages.
    pub account: String,
}

impl FlowUi for ServerUi {
    fn show_url(&self, url: &str) {
        tracing::warn!(account = %self.account, %url, "authorization needed: open this address in a browser to authorize the account");
        println!(
            "To authorize {}, open this address in a browser and sign in:\n  {url}",
            self.account
        );
    }

    fn open_browser(&self, url: &str) -> bool {
        open_browser(url)
    }

    async fn read_line(&self, _prompt: &str) -> std::io::Result<String> {
        Err(std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            "a running server cannot read a pasted address",
        ))
    }

    fn show_device_code(
        &self,
        verification_uri: &str,
        user_code: &str,
        _complete_uri: Option<&str>,
    ) {
        tracing::warn!(account = %self.account, %verification_uri, %user_code, "authorization needed: enter the code");
    }
}
