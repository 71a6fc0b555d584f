//! Provider presets: token endpoints, scopes and mail servers for the
//! providers people use, so a config needs little more than a client id.
//!
//! A preset fills in defaults; every value in `[providers.NAME]` overrides
//! them. `custom` has no defaults.

use std::path::PathBuf;

use secrecy::SecretString;

use crate::config::schema::{self, Protocol, ProviderConfig, ServerEndpointConfig, UpstreamTls};
use mailbridge_proto::sasl::Mechanism;

/// A provider after presets and overrides were applied.
#[derive(Debug, Clone)]
pub struct Provider {
    /// The name of its `[providers.NAME]` table.
    pub name: String,
    /// The preset it came from.
    pub preset: Preset,
    /// OAuth2 client id.
    pub client_id: String,
    /// OAuth2 client secret, if any. Never logged.
    pub client_secret: Option<SecretString>,
    /// Token endpoint.
    pub token_url: String,
    /// Authorization endpoint, if known.
    pub authorize_url: Option<String>,
    /// Device authorization endpoint, if known.
    pub device_url: Option<String>,
    /// Registered redirect URI for the browser flows, if fixed.
    pub redirect_uri: Option<String>,
    /// `oidc` / `open`: where the endpoints are discovered.
    pub issuer: Option<String>,
    /// Dynamic client registration endpoint (RFC 7591), if discovered.
    pub registration_url: Option<String>,
    /// Register a client of our own per grant (RFC 7591) instead of using
    /// `client_id`.
    pub dynamic_registration: bool,
    /// Scopes to request, in order.
    pub scopes: Vec<String>,
    /// The scopes are the preset's, none were configured: the `open`
    /// preset picks them from the server's metadata at discovery
    /// ([`open_scopes`]).
    pub scopes_from_preset: bool,
    /// Scopes for app-only access (client credentials), e.g. Microsoft's
    /// `https://outlook.office365.com/.default`.
    pub app_scopes: Vec<String>,
    /// Certificate and key files for a certificate client credential.
    pub client_certificate: Option<(PathBuf, PathBuf)>,
    /// A Google service-account key file.
    pub service_account_key_file: Option<PathBuf>,
    /// CA certificates to trust for the mail servers instead of the system's.
    pub ca_file: Option<PathBuf>,
    /// The IMAP server, if this provider has one.
    pub imap: Option<ServerEndpoint>,
    /// The POP3 server, if this provider has one.
    pub pop3: Option<ServerEndpoint>,
    /// The SMTP submission server, if this provider has one.
    pub smtp: Option<ServerEndpoint>,
}

impl Provider {
    /// `oidc` / `open`: fills the endpoints the config left out from the
    /// issuer's metadata (OpenID Connect discovery, else RFC 8414). The
    /// metadata's `issuer` must be the configured one.
    pub async fn discover(&mut self, http: &reqwest::Client) -> Result<(), DiscoveryError> {
        let Some(issuer) = self.issuer.clone() else {
            return Ok(());
        };
        let trimmed = issuer.trim_end_matches('/');
        let mut urls = vec![format!("{trimmed}/.well-known/openid-configuration")];
        // RFC 8414: the well-known segment goes between host and path.
        if let Some((scheme, rest)) = trimmed.split_once("://") {
            let (host, path) = rest.split_once('/').map_or((rest, ""), |(h, p)| (h, p));
            let path = if path.is_empty() {
                String::new()
            } else {
                format!("/{path}")
            };
            urls.push(format!(
                "{scheme}://{host}/.well-known/oauth-authorization-server{path}"
            ));
        }
        let mut last_failure = None;
        for url in &urls {
            let response = match http.get(url).send().await {
                Ok(r) => r,
                Err(e) => {
                    last_failure = Some((url.clone(), MetadataFetch::Request(e)));
                    continue;
                }
            };
            if !response.status().is_success() {
                let status = response.status().as_u16();
                last_failure = Some((url.clone(), MetadataFetch::Status(status)));
                continue;
            }
            let meta: serde_json::Value =
                response
                    .json()
                    .await
                    .map_err(|source| DiscoveryError::NotMetadata {
                        provider: self.name.clone(),
                        url: url.clone(),
                        source,
                    })?;
            let field = |k: &str| meta.get(k).and_then(|v| v.as_str()).map(str::to_string);
            if field("issuer").as_deref().map(|i| i.trim_end_matches('/')) != Some(trimmed) {
                return Err(DiscoveryError::IssuerMismatch {
                    provider: self.name.clone(),
                    url: url.clone(),
                    found: field("issuer"),
                    configured: issuer.clone(),
                });
            }
            if self.token_url.is_empty() {
                self.token_url =
                    field("token_endpoint").ok_or_else(|| DiscoveryError::NoTokenEndpoint {
                        provider: self.name.clone(),
                        url: url.clone(),
                    })?;
            }
            self.authorize_url = self
                .authorize_url
                .take()
                .or_else(|| field("authorization_endpoint"));
            self.device_url = self
                .device_url
                .take()
                .or_else(|| field("device_authorization_endpoint"));
            self.registration_url = field("registration_endpoint");
            if self.preset == Preset::Open && self.scopes_from_preset {
                let supported: Option<Vec<String>> = meta.get("scopes_supported").and_then(|v| {
                    v.as_array().map(|a| {
                        a.iter()
                            .filter_map(|s| s.as_str().map(str::to_string))
                            .collect()
                    })
                });
                let in_use = [
                    (Protocol::Imap, self.imap.is_some()),
                    (Protocol::Pop3, self.pop3.is_some()),
                    (Protocol::Smtp, self.smtp.is_some()),
                ]
                .into_iter()
                .filter_map(|(p, used)| used.then_some(p))
                .collect::<Vec<_>>();
                self.scopes = open_scopes(supported.as_deref(), &in_use);
                self.app_scopes = self.scopes.clone();
                tracing::info!(provider = %self.name, scopes = %self.scopes.join(" "), "scopes chosen from the server's metadata");
            }
            for (name, u) in [
                ("token_endpoint", Some(&self.token_url)),
                ("authorization_endpoint", self.authorize_url.as_ref()),
            ] {
                if let Some(u) = u {
                    check_url(name, u).map_err(|e| DiscoveryError::BadEndpoint {
                        provider: self.name.clone(),
                        message: e.message,
                    })?;
                }
            }
            tracing::info!(provider = %self.name, %url, "endpoints discovered");
            return Ok(());
        }
        let (url, failure) =
            last_failure.unwrap_or_else(|| (issuer.clone(), MetadataFetch::Status(0)));
        Err(match failure {
            MetadataFetch::Request(source) => DiscoveryError::Unreachable {
                provider: self.name.clone(),
                url,
                source,
            },
            MetadataFetch::Status(status) => DiscoveryError::HttpStatus {
                provider: self.name.clone(),
                url,
                status,
            },
        })
    }

    /// Whether this is Google's OAuth2 server: the `google` preset, or any
    /// provider whose token endpoint is Google's (a `custom` one, say).
    /// Google needs its own authorization parameters and refuses mail
    /// scopes in the device flow.
    pub fn is_google(&self) -> bool {
        self.preset == Preset::Google
            || oauth2::url::Url::parse(&self.token_url)
                .ok()
                .and_then(|u| u.host_str().map(str::to_ascii_lowercase))
                .is_some_and(|h| {
                    h == "oauth2.googleapis.com"
                        || h == "www.googleapis.com"
                        || h == "accounts.google.com"
                })
    }

    /// Whether tokens obtained under `self` may not suit `other`: another
    /// token endpoint, client, scopes or client credentials (a config
    /// reload compares the old provider of an account with the new one).
    pub fn tokens_differ(&self, other: &Provider) -> bool {
        use secrecy::ExposeSecret;
        let secret = |p: &Provider| {
            p.client_secret
                .as_ref()
                .map(|s| s.expose_secret().to_string())
        };
        (
            &self.token_url,
            &self.client_id,
            &self.scopes,
            &self.app_scopes,
        ) != (
            &other.token_url,
            &other.client_id,
            &other.scopes,
            &other.app_scopes,
        ) || self.client_certificate != other.client_certificate
            || self.service_account_key_file != other.service_account_key_file
            || secret(self) != secret(other)
    }

    /// The server for a protocol, if configured.
    pub fn endpoint(&self, protocol: Protocol) -> Option<&ServerEndpoint> {
        match protocol {
            Protocol::Imap => self.imap.as_ref(),
            Protocol::Pop3 => self.pop3.as_ref(),
            Protocol::Smtp => self.smtp.as_ref(),
        }
    }
}

/// How one metadata URL failed, before the next is tried.
enum MetadataFetch {
    Request(reqwest::Error),
    Status(u16),
}

/// The later draft of the open profile's one scope for mail.
pub const OPEN_MAIL_SCOPE: &str = "urn:ietf:params:oauth:scope:mail";

/// The scopes the `open` preset asks for, given the server metadata's
/// `scopes_supported` (None when it has none) and the mail protocols the
/// provider has servers for (all three when it has none yet).
///
/// The seed's literal scopes (`IMAP`, `SMTP`, `POP3`, as the protocols in
/// use need) when the server lists them or lists nothing (the profile says
/// servers MUST accept them); the later draft's
/// `urn:ietf:params:oauth:scope:mail` with `offline_access` when the server
/// lists that and not the literal ones; `offline_access` goes along with
/// the literal scopes only when the server lists it.
pub fn open_scopes(supported: Option<&[String]>, protocols: &[Protocol]) -> Vec<String> {
    let all = [Protocol::Imap, Protocol::Pop3, Protocol::Smtp];
    let protocols = if protocols.is_empty() {
        &all[..]
    } else {
        protocols
    };
    // The seed's order: IMAP, SMTP, POP3.
    let literal: Vec<String> = [
        (Protocol::Imap, "IMAP"),
        (Protocol::Smtp, "SMTP"),
        (Protocol::Pop3, "POP3"),
    ]
    .into_iter()
    .filter(|(p, _)| protocols.contains(p))
    .map(|(_, s)| s.to_string())
    .collect();
    let Some(listed) = supported.filter(|l| !l.is_empty()) else {
        return literal;
    };
    let lists = |scope: &str| listed.iter().any(|l| l == scope);
    let literal_listed = literal.iter().all(|s| lists(s));
    if !literal_listed && lists(OPEN_MAIL_SCOPE) {
        return vec![OPEN_MAIL_SCOPE.to_string(), "offline_access".to_string()];
    }
    let mut scopes = literal;
    if lists("offline_access") {
        scopes.push("offline_access".to_string());
    }
    scopes
}

/// Why an `oidc` / `open` provider's endpoints could not be discovered.
/// Messages name the provider and say what to check.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// No well-known metadata URL could be reached (the last one's error
    /// is the source).
    #[error(
        "provider `{provider}`: cannot read the issuer's metadata at {url}; check the issuer setting and that it is reachable"
    )]
    Unreachable {
        /// The provider name.
        provider: String,
        /// The last URL tried.
        url: String,
        /// Why the request failed.
        #[source]
        source: reqwest::Error,
    },
    /// Every well-known metadata URL answered with an HTTP error.
    #[error(
        "provider `{provider}`: cannot read the issuer's metadata ({url}: HTTP {status}); check the issuer setting"
    )]
    HttpStatus {
        /// The provider name.
        provider: String,
        /// The last URL tried.
        url: String,
        /// Its HTTP status.
        status: u16,
    },
    /// The metadata URL answered something that is not JSON.
    #[error("provider `{provider}`: {url} is not JSON metadata")]
    NotMetadata {
        /// The provider name.
        provider: String,
        /// The URL.
        url: String,
        /// The decoding error.
        #[source]
        source: reqwest::Error,
    },
    /// The metadata names another issuer than the configured one.
    #[error(
        "provider `{provider}`: the metadata at {url} names issuer {found:?}, not {configured}; check the issuer setting"
    )]
    IssuerMismatch {
        /// The provider name.
        provider: String,
        /// The metadata URL.
        url: String,
        /// The `issuer` the metadata gives, if any.
        found: Option<String>,
        /// The configured issuer.
        configured: String,
    },
    /// The metadata has no token endpoint and the config gives none.
    #[error("provider `{provider}`: the metadata at {url} has no token_endpoint")]
    NoTokenEndpoint {
        /// The provider name.
        provider: String,
        /// The metadata URL.
        url: String,
    },
    /// A discovered endpoint is not an acceptable URL.
    #[error("provider `{provider}`: {message}")]
    BadEndpoint {
        /// The provider name.
        provider: String,
        /// Which endpoint and why.
        message: String,
    },
}

/// Why a Microsoft scope list would not get a token the mail servers
/// accept (see [`check_microsoft_scopes`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScopeError {
    /// Only directives such as `offline_access`, no permission.
    #[error(
        "no permission scope: list https://outlook.office.com/IMAP.AccessAsUser.All (and POP/SMTP) before offline_access"
    )]
    NoPermission,
    /// The first permission is for Graph (a bare scope such as
    /// `Mail.Read` is Graph's when it comes first) or another resource, so
    /// the token would be for that resource.
    #[error(
        "`{scope}` comes first, so Entra ID would issue a token for {} (its `aud` would be {}) which IMAP, POP and SMTP refuse (`NO AUTHENTICATE failed`, `535 5.7.3`); put the resource-prefixed Outlook scopes first, e.g. https://outlook.office.com/IMAP.AccessAsUser.All",
        if *.graph { "Microsoft Graph" } else { "another resource" },
        if *.graph { "00000003-0000-0000-c000-000000000000, Graph's" } else { "that resource" }
    )]
    WrongResourceFirst {
        /// The first permission scope.
        scope: String,
        /// Whether it is a Microsoft Graph scope.
        graph: bool,
    },
    /// An Outlook scope list with a scope prefixed with another resource
    /// in it (a bare scope after an Outlook one is read as Outlook's).
    #[error(
        "`{0}` names another resource than Outlook: a token serves one resource, so it must not be mixed with the Outlook scopes; write it with the Outlook prefix (https://outlook.office.com/...) or drop it"
    )]
    Mixed(String),
    /// No `offline_access`: no refresh token.
    #[error(
        "add offline_access, or Entra ID issues no refresh token and every grant dies within the hour"
    )]
    NoOfflineAccess,
}

/// A mail server to log in to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerEndpoint {
    /// Host name, also the TLS server name.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Implicit TLS or STARTTLS.
    pub tls: UpstreamTls,
    /// Bearer mechanisms in order of preference.
    pub mechanisms: Vec<Mechanism>,
    /// SMTP: the EHLO name to use upstream (None: the client's).
    pub ehlo_name: Option<String>,
}

/// The known presets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    /// Microsoft 365 / Outlook.com (Entra ID v2 endpoints).
    Microsoft,
    /// Gmail and Google Workspace.
    Google,
    /// Fastmail (clients are registered by hand with Fastmail).
    Fastmail,
    /// Yahoo Mail.
    Yahoo,
    /// AOL Mail.
    Aol,
    /// Yandex Mail.
    Yandex,
    /// Any OpenID Connect / RFC 8414 server: endpoints discovered from the
    /// issuer.
    Oidc,
    /// The open public-client profile (draft-ietf-mailmaint-oauth-public):
    /// client id `open`, PKCE, discovered endpoints, OAUTHBEARER.
    Open,
    /// Everything given in the config.
    Custom,
}

impl Preset {
    /// The preset's name in the config.
    pub fn name(self) -> &'static str {
        match self {
            Preset::Microsoft => "microsoft",
            Preset::Google => "google",
            Preset::Fastmail => "fastmail",
            Preset::Yahoo => "yahoo",
            Preset::Aol => "aol",
            Preset::Yandex => "yandex",
            Preset::Oidc => "oidc",
            Preset::Open => "open",
            Preset::Custom => "custom",
        }
    }

    const ALL: [Preset; 9] = [
        Preset::Microsoft,
        Preset::Google,
        Preset::Fastmail,
        Preset::Yahoo,
        Preset::Aol,
        Preset::Yandex,
        Preset::Oidc,
        Preset::Open,
        Preset::Custom,
    ];

    /// Whether the endpoints come from the issuer's metadata.
    pub fn discovers(self) -> bool {
        matches!(self, Preset::Oidc | Preset::Open)
    }
}

/// Microsoft's clouds: where Entra ID and Exchange Online live.
struct MicrosoftCloud {
    login: &'static str,
    resource: &'static str,
    mailbox_host: &'static str,
    smtp_host: &'static str,
}

fn microsoft_cloud(name: &str) -> Option<MicrosoftCloud> {
    Some(match name {
        "global" => MicrosoftCloud {
            login: "login.microsoftonline.com",
            resource: "https://outlook.office.com",
            mailbox_host: "outlook.office365.com",
            smtp_host: "smtp.office365.com",
        },
        // GCC High and DoD.
        "usgov" => MicrosoftCloud {
            login: "login.microsoftonline.us",
            resource: "https://outlook.office365.us",
            mailbox_host: "outlook.office365.us",
            smtp_host: "smtp.office365.us",
        },
        // Operated by 21Vianet.
        "china" => MicrosoftCloud {
            login: "login.partner.microsoftonline.cn",
            resource: "https://partner.outlook.cn",
            mailbox_host: "partner.outlook.cn",
            smtp_host: "smtp.partner.outlook.cn",
        },
        _ => return None,
    })
}

/// A provider table that does not make a usable provider.
#[derive(Debug)]
pub struct ProviderError {
    /// The offending field, relative to the provider table.
    pub field: String,
    /// What is wrong and what to do.
    pub message: String,
}

fn err(field: &str, message: impl Into<String>) -> ProviderError {
    ProviderError {
        field: field.to_string(),
        message: message.into(),
    }
}

/// Microsoft's delegated scopes for IMAP, POP and SMTP, resource-prefixed
/// and Outlook resource first, so Entra ID issues an Outlook token (see
/// PROVIDERS.md on scope order).
pub const MICROSOFT_SCOPES: [&str; 4] = [
    "https://outlook.office.com/IMAP.AccessAsUser.All",
    "https://outlook.office.com/POP.AccessAsUser.All",
    "https://outlook.office.com/SMTP.Send",
    "offline_access",
];

const BOTH: &[Mechanism] = &[Mechanism::Xoauth2, Mechanism::Oauthbearer];

/// Google's one mail scope.
pub const GOOGLE_SCOPE: &str = "https://mail.google.com/";

struct Defaults {
    token_url: Option<String>,
    authorize_url: Option<String>,
    device_url: Option<String>,
    scopes: Vec<String>,
    app_scopes: Option<Vec<String>>,
    imap: Option<ServerEndpoint>,
    pop3: Option<ServerEndpoint>,
    smtp: Option<ServerEndpoint>,
}

fn server(
    host: &str,
    port: u16,
    tls: UpstreamTls,
    mechanisms: &[Mechanism],
) -> Option<ServerEndpoint> {
    Some(ServerEndpoint {
        host: host.into(),
        port,
        tls,
        mechanisms: mechanisms.to_vec(),
        ehlo_name: None,
    })
}

fn preset_defaults(preset: Preset, tenant: &str, cloud: &MicrosoftCloud) -> Defaults {
    let simple = |token: &str,
                  authorize: &str,
                  scopes: &[&str],
                  hosts: [&str; 3],
                  mechanisms: &[Mechanism]| Defaults {
        token_url: Some(token.into()),
        authorize_url: Some(authorize.into()),
        device_url: None,
        scopes: scopes.iter().map(|s| s.to_string()).collect(),
        app_scopes: None,
        imap: server(hosts[0], 993, UpstreamTls::Implicit, mechanisms),
        pop3: server(hosts[1], 995, UpstreamTls::Implicit, mechanisms),
        smtp: server(hosts[2], 465, UpstreamTls::Implicit, mechanisms),
    };
    match preset {
        Preset::Microsoft => {
            let login = format!("https://{}/{tenant}/oauth2/v2.0", cloud.login);
            let r = cloud.resource;
            Defaults {
                token_url: Some(format!("{login}/token")),
                authorize_url: Some(format!("{login}/authorize")),
                device_url: Some(format!("{login}/devicecode")),
                scopes: vec![
                    format!("{r}/IMAP.AccessAsUser.All"),
                    format!("{r}/POP.AccessAsUser.All"),
                    format!("{r}/SMTP.Send"),
                    "offline_access".into(),
                ],
                app_scopes: Some(vec![format!("https://{}/.default", cloud.mailbox_host)]),
                // Microsoft 365 documents XOAUTH2 only.
                imap: server(
                    cloud.mailbox_host,
                    993,
                    UpstreamTls::Implicit,
                    &[Mechanism::Xoauth2],
                ),
                pop3: server(
                    cloud.mailbox_host,
                    995,
                    UpstreamTls::Implicit,
                    &[Mechanism::Xoauth2],
                ),
                smtp: server(
                    cloud.smtp_host,
                    587,
                    UpstreamTls::Starttls,
                    &[Mechanism::Xoauth2],
                ),
            }
        }
        Preset::Google => Defaults {
            // Google refuses mail scopes in the device flow; `account add
            // --device` says so before trying.
            device_url: Some("https://oauth2.googleapis.com/device/code".into()),
            ..simple(
                "https://oauth2.googleapis.com/token",
                "https://accounts.google.com/o/oauth2/v2/auth",
                &[GOOGLE_SCOPE],
                ["imap.gmail.com", "pop.gmail.com", "smtp.gmail.com"],
                BOTH,
            )
        },
        // Endpoints from Fastmail's developer documentation: the token
        // endpoint is named `/oauth/refresh` there, for the first exchange
        // as well as for refreshes. Refresh tokens rotate, and a reused one
        // revokes the grant.
        Preset::Fastmail => simple(
            "https://api.fastmail.com/oauth/refresh",
            "https://api.fastmail.com/oauth/authorize",
            &[
                "https://www.fastmail.com/dev/protocol-imap",
                "https://www.fastmail.com/dev/protocol-pop",
                "https://www.fastmail.com/dev/protocol-smtp",
            ],
            ["imap.fastmail.com", "pop.fastmail.com", "smtp.fastmail.com"],
            BOTH,
        ),
        Preset::Yahoo => simple(
            "https://api.login.yahoo.com/oauth2/get_token",
            "https://api.login.yahoo.com/oauth2/request_auth",
            &["mail-w"],
            [
                "imap.mail.yahoo.com",
                "pop.mail.yahoo.com",
                "smtp.mail.yahoo.com",
            ],
            BOTH,
        ),
        Preset::Aol => simple(
            "https://api.login.aol.com/oauth2/get_token",
            "https://api.login.aol.com/oauth2/request_auth",
            &["mail-w"],
            ["imap.aol.com", "pop.aol.com", "smtp.aol.com"],
            BOTH,
        ),
        Preset::Yandex => simple(
            "https://oauth.yandex.com/token",
            "https://oauth.yandex.com/authorize",
            &["mail:imap_full", "mail:smtp"],
            ["imap.yandex.com", "pop.yandex.com", "smtp.yandex.com"],
            &[Mechanism::Xoauth2],
        ),
        Preset::Open => Defaults {
            token_url: None,
            authorize_url: None,
            device_url: None,
            scopes: vec![
                "urn:ietf:params:oauth:scope:mail".into(),
                "offline_access".into(),
            ],
            app_scopes: None,
            imap: None,
            pop3: None,
            smtp: None,
        },
        Preset::Oidc | Preset::Custom => Defaults {
            token_url: None,
            authorize_url: None,
            device_url: None,
            scopes: Vec::new(),
            app_scopes: None,
            imap: None,
            pop3: None,
            smtp: None,
        },
    }
}

fn merge_endpoint(
    field: &str,
    base: Option<ServerEndpoint>,
    over: Option<&ServerEndpointConfig>,
    default_port: u16,
) -> Result<Option<ServerEndpoint>, ProviderError> {
    if let Some(name) = over.and_then(|o| o.ehlo_name.as_deref()) {
        if field != "smtp" {
            return Err(err(
                &format!("{field}.ehlo_name"),
                "ehlo_name only applies to [providers.NAME.smtp]",
            ));
        }
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || ".-[]:".contains(c))
        {
            return Err(err(
                &format!("{field}.ehlo_name"),
                "use a host name or an address literal such as [192.0.2.1]",
            ));
        }
    }
    let Some(over) = over else {
        return Ok(base);
    };
    let host = over
        .host
        .clone()
        .or_else(|| base.as_ref().map(|b| b.host.clone()))
        .ok_or_else(|| {
            err(
                &format!("{field}.host"),
                "the mail server's host name is required",
            )
        })?;
    if host.is_empty() {
        return Err(err(&format!("{field}.host"), "the host name is empty"));
    }
    let tls = over
        .tls
        .or(base.as_ref().map(|b| b.tls))
        .unwrap_or(UpstreamTls::Implicit);
    let port = over
        .port
        .or(base.as_ref().map(|b| b.port))
        .unwrap_or(default_port);
    let mechanisms = over
        .mechanisms
        .clone()
        .or_else(|| base.as_ref().map(|b| b.mechanisms.clone()))
        .unwrap_or_else(schema::default_mechanisms);
    if mechanisms.is_empty() {
        return Err(err(
            &format!("{field}.mechanisms"),
            "list at least one of \"xoauth2\", \"oauthbearer\"",
        ));
    }
    let ehlo_name = over
        .ehlo_name
        .clone()
        .or_else(|| base.as_ref().and_then(|b| b.ehlo_name.clone()));
    Ok(Some(ServerEndpoint {
        host,
        port,
        tls,
        mechanisms,
        ehlo_name,
    }))
}

/// Applies the preset and overrides of one provider table.
pub fn resolve(name: &str, c: &ProviderConfig) -> Result<Provider, ProviderError> {
    let Some(preset) = Preset::ALL.into_iter().find(|p| p.name() == c.preset) else {
        let names: Vec<&str> = Preset::ALL.iter().map(|p| p.name()).collect();
        return Err(err(
            "preset",
            format!(
                "unknown preset `{}`; use one of: {}",
                c.preset,
                names.join(", ")
            ),
        ));
    };
    if c.cloud.is_some() && preset != Preset::Microsoft {
        return Err(err("cloud", "cloud only applies to preset = \"microsoft\""));
    }
    let cloud = microsoft_cloud(c.cloud.as_deref().unwrap_or("global"))
        .ok_or_else(|| err("cloud", "use \"global\", \"usgov\" or \"china\""))?;
    if c.tenant.is_some() && preset != Preset::Microsoft {
        return Err(err(
            "tenant",
            "tenant only applies to preset = \"microsoft\"",
        ));
    }
    let tenant = c.tenant.as_deref().unwrap_or("common");
    if tenant.is_empty()
        || !tenant
            .chars()
            .all(|ch| ch.is_ascii_alphanumeric() || ch == '-' || ch == '.')
    {
        return Err(err(
            "tenant",
            "use common, organizations, consumers, a tenant id or a tenant domain",
        ));
    }
    let d = preset_defaults(preset, tenant, &cloud);

    let client_id = c
        .client_id
        .clone()
        .or_else(|| (preset == Preset::Open).then(|| "open".to_string()))
        .filter(|s| !s.trim().is_empty())
        .ok_or_else(|| {
            err(
                "client_id",
                match preset {
                    Preset::Fastmail => {
                        "the OAuth2 client id is required: Fastmail registers clients by hand (see fastmail.com/dev, \"Registration\"), with http://localhost/ as a redirect URI"
                    }
                    _ => "the OAuth2 client (application) id is required",
                },
            )
        })?;
    let client_secret = match (&c.client_secret, &c.client_secret_file) {
        (Some(_), Some(_)) => {
            return Err(err(
                "client_secret",
                "set client_secret or client_secret_file, not both",
            ));
        }
        (Some(s), None) => Some(s.clone()),
        (None, Some(path)) => {
            let text = std::fs::read_to_string(path).map_err(|e| {
                err(
                    "client_secret_file",
                    format!("cannot read {}: {e}", path.display()),
                )
            })?;
            let first = text.lines().next().unwrap_or("").trim().to_string();
            if first.is_empty() {
                return Err(err(
                    "client_secret_file",
                    format!("{} is empty", path.display()),
                ));
            }
            Some(SecretString::from(first))
        }
        (None, None) => None,
    };
    if preset == Preset::Google && client_secret.is_none() {
        return Err(err(
            "client_secret",
            "Google requires the client secret of your Desktop app client (client_secret or client_secret_file)",
        ));
    }
    if preset.discovers() {
        match &c.issuer {
            Some(issuer) => check_url("issuer", issuer)?,
            None => {
                return Err(err(
                    "issuer",
                    format!(
                        "preset = \"{}\" needs issuer: the URL whose /.well-known metadata lists the endpoints",
                        preset.name()
                    ),
                ));
            }
        }
        if c.dynamic_registration && c.client_id.is_some() {
            return Err(err(
                "dynamic_registration",
                "with dynamic_registration = true mailbridge registers its own client id: remove client_id",
            ));
        }
    } else if c.dynamic_registration {
        return Err(err(
            "dynamic_registration",
            "dynamic_registration only applies to preset = \"oidc\" or \"open\"",
        ));
    } else if c.issuer.is_some() {
        return Err(err(
            "issuer",
            "issuer only applies to preset = \"oidc\" or \"open\"",
        ));
    }
    // Discovered at start when not given.
    let discovered_later = preset.discovers().then(String::new);
    let token_url = c
        .token_url
        .clone()
        .or(d.token_url)
        .or(discovered_later)
        .ok_or_else(|| {
            err(
                "token_url",
                "the token endpoint URL is required for preset = \"custom\"",
            )
        })?;
    if !token_url.is_empty() {
        check_url("token_url", &token_url)?;
    }
    let authorize_url = c.authorize_url.clone().or(d.authorize_url);
    if let Some(u) = &authorize_url {
        check_url("authorize_url", u)?;
    }
    let device_url = c.device_url.clone().or(d.device_url);
    if let Some(u) = &device_url {
        check_url("device_url", u)?;
    }
    if let Some(u) = &c.redirect_uri
        && !(u.starts_with("http://") || u.starts_with("https://"))
    {
        return Err(err(
            "redirect_uri",
            format!("`{u}` must be an http:// or https:// URL"),
        ));
    }
    let scopes_from_preset = c.scopes.is_none();
    let scopes = c.scopes.clone().unwrap_or(d.scopes);
    if preset == Preset::Microsoft {
        check_microsoft_scopes(&scopes).map_err(|m| err("scopes", m.to_string()))?;
    }
    let app_scopes = d.app_scopes.unwrap_or_else(|| scopes.clone());
    let client_certificate = match (&c.client_certificate_file, &c.client_key_file) {
        (Some(cert), Some(key)) => {
            for (field, f) in [("client_certificate_file", cert), ("client_key_file", key)] {
                if !f.is_file() {
                    return Err(err(
                        field,
                        format!("{} is not a readable file", f.display()),
                    ));
                }
            }
            Some((cert.clone(), key.clone()))
        }
        (None, None) => None,
        _ => {
            return Err(err(
                "client_certificate_file",
                "client_certificate_file and client_key_file go together",
            ));
        }
    };
    if let Some(f) = &c.service_account_key_file
        && !f.is_file()
    {
        return Err(err(
            "service_account_key_file",
            format!("{} is not a readable file", f.display()),
        ));
    }
    let mut imap = merge_endpoint("imap", d.imap, c.imap.as_ref(), 993)?;
    let mut pop3 = merge_endpoint("pop3", d.pop3, c.pop3.as_ref(), 995)?;
    let mut smtp = merge_endpoint("smtp", d.smtp, c.smtp.as_ref(), 465)?;
    if preset == Preset::Open {
        // The profile specifies OAUTHBEARER.
        for (endpoint, given) in [
            (&mut imap, &c.imap),
            (&mut pop3, &c.pop3),
            (&mut smtp, &c.smtp),
        ] {
            if let Some(e) = endpoint
                .as_mut()
                .filter(|_| given.as_ref().and_then(|g| g.mechanisms.as_ref()).is_none())
            {
                e.mechanisms = vec![Mechanism::Oauthbearer, Mechanism::Xoauth2];
            }
        }
    }
    if let Some(ca) = &c.ca_file
        && !ca.is_file()
    {
        return Err(err(
            "ca_file",
            format!("{} is not a readable file", ca.display()),
        ));
    }
    Ok(Provider {
        name: name.to_string(),
        preset,
        client_id,
        client_secret,
        token_url,
        authorize_url,
        device_url,
        redirect_uri: c.redirect_uri.clone(),
        issuer: c.issuer.clone(),
        registration_url: None,
        dynamic_registration: c.dynamic_registration,
        scopes,
        scopes_from_preset,
        app_scopes,
        client_certificate,
        service_account_key_file: c.service_account_key_file.clone(),
        ca_file: c.ca_file.clone(),
        imap,
        pop3,
        smtp,
    })
}

/// Which resource a Microsoft scope asks for.
#[derive(Debug, PartialEq, Eq)]
enum MsResource {
    /// `offline_access`, `openid`, ...: not a resource; Entra ID skips them
    /// when it picks the token's audience.
    Directive,
    /// Exchange Online: what IMAP, POP and SMTP accept.
    Outlook,
    /// Microsoft Graph, by its prefix.
    Graph,
    /// No resource prefix (`Mail.Read`, `SMTP.Send`): Entra ID reads it as
    /// a scope of the resource the first permission chose, and as Graph's
    /// when it comes first.
    Bare,
    /// Some other resource.
    Other,
}

fn ms_resource(scope: &str) -> MsResource {
    let lower = scope.to_ascii_lowercase();
    if matches!(
        lower.as_str(),
        "offline_access" | "openid" | "profile" | "email"
    ) {
        return MsResource::Directive;
    }
    match lower.split_once("://") {
        None => MsResource::Bare,
        Some((_, rest)) => {
            let host = rest.split('/').next().unwrap_or("");
            if matches!(
                host,
                "outlook.office.com"
                    | "outlook.office365.com"
                    | "outlook.office365.us"
                    | "partner.outlook.cn"
            ) {
                MsResource::Outlook
            } else if host.starts_with("graph.microsoft.")
                || host == "microsoftgraph.chinacloudapi.cn"
            {
                MsResource::Graph
            } else {
                MsResource::Other
            }
        }
    }
}

/// Entra ID reads the scope list in order, skips directives, and lets the
/// first permission decide the token's audience (seed 000, PROVIDERS.md):
/// a bare scope first (`Mail.Read`) makes it a Graph token, a bare scope
/// after an Outlook one is read as an Outlook scope. IMAP, POP and SMTP
/// accept only Outlook tokens. A list that would produce a Graph token,
/// names another resource beside Outlook, or gets no refresh token is
/// refused with the reason.
pub fn check_microsoft_scopes(scopes: &[String]) -> Result<(), ScopeError> {
    let first = scopes
        .iter()
        .find(|s| ms_resource(s) != MsResource::Directive);
    let Some(first) = first else {
        return Err(ScopeError::NoPermission);
    };
    if ms_resource(first) != MsResource::Outlook {
        return Err(ScopeError::WrongResourceFirst {
            scope: first.clone(),
            graph: matches!(ms_resource(first), MsResource::Graph | MsResource::Bare),
        });
    }
    if let Some(other) = scopes.iter().find(|s| {
        !matches!(
            ms_resource(s),
            MsResource::Directive | MsResource::Outlook | MsResource::Bare
        )
    }) {
        return Err(ScopeError::Mixed(other.clone()));
    }
    if !scopes
        .iter()
        .any(|s| s.eq_ignore_ascii_case("offline_access"))
    {
        return Err(ScopeError::NoOfflineAccess);
    }
    Ok(())
}

/// Whether a JWT audience is Exchange Online's (what the mail servers take).
pub fn is_outlook_audience(aud: &str) -> bool {
    let a = aud.trim_end_matches('/').to_ascii_lowercase();
    matches!(
        a.as_str(),
        "https://outlook.office.com"
            | "https://outlook.office365.com"
            | "https://ps.outlook.com"
            | "https://outlook.office365.us"
            | "https://partner.outlook.cn"
            // Exchange Online's application id.
            | "00000002-0000-0ff1-ce00-000000000000"
    )
}

fn check_url(field: &str, url: &str) -> Result<(), ProviderError> {
    let https = url.starts_with("https://");
    // Plain http is only for a provider on this machine (tests, the demo).
    let loopback_http = url.starts_with("http://127.")
        || url.starts_with("http://[::1]")
        || url.starts_with("http://localhost");
    if https || loopback_http {
        Ok(())
    } else {
        Err(err(
            field,
            format!("`{url}` must be an https:// URL (http:// only on loopback)"),
        ))
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn every_preset_is_documented() {
        // The example config and the schema's field doc list the presets
        // people can write; a preset added here must appear in both.
        let example = include_str!("../config.example.toml");
        let schema = include_str!("config/schema.rs");
        for preset in Preset::ALL {
            let name = preset.name();
            assert!(
                example.contains(&format!("\"{name}\"")),
                "config.example.toml does not name the `{name}` preset"
            );
            assert!(
                schema.contains(&format!("`{name}`")),
                "src/config/schema.rs does not name the `{name}` preset"
            );
        }
    }
    use super::*;

    fn cfg(preset: &str) -> ProviderConfig {
        ProviderConfig {
            preset: preset.into(),
            tenant: None,
            cloud: None,
            client_id: Some("id".into()),
            client_secret: None,
            client_secret_file: None,
            issuer: None,
            dynamic_registration: false,
            token_url: None,
            authorize_url: None,
            device_url: None,
            redirect_uri: None,
            client_certificate_file: None,
            client_key_file: None,
            service_account_key_file: None,
            scopes: None,
            ca_file: None,
            imap: None,
            pop3: None,
            smtp: None,
        }
    }

    #[test]
    fn microsoft_preset_uses_outlook_scopes_first() {
        let mut c = cfg("microsoft");
        c.tenant = Some("organizations".into());
        let p = resolve("m", &c).unwrap();
        assert_eq!(
            p.token_url,
            "https://login.microsoftonline.com/organizations/oauth2/v2.0/token"
        );
        assert_eq!(
            p.scopes[0],
            "https://outlook.office.com/IMAP.AccessAsUser.All"
        );
        assert_eq!(p.scopes.last().unwrap(), "offline_access");
        let imap = p.imap.unwrap();
        assert_eq!(
            (imap.host.as_str(), imap.port),
            ("outlook.office365.com", 993)
        );
        assert_eq!(imap.mechanisms, vec![Mechanism::Xoauth2]);
    }

    #[test]
    fn national_clouds_and_more_presets() {
        let mut c = cfg("microsoft");
        c.cloud = Some("usgov".into());
        let p = resolve("m", &c).unwrap();
        assert!(
            p.token_url
                .starts_with("https://login.microsoftonline.us/common/")
        );
        assert_eq!(
            p.scopes[0],
            "https://outlook.office365.us/IMAP.AccessAsUser.All"
        );
        assert_eq!(p.imap.unwrap().host, "outlook.office365.us");
        assert_eq!(
            p.app_scopes,
            vec!["https://outlook.office365.us/.default".to_string()]
        );
        c.cloud = Some("mars".into());
        assert_eq!(resolve("m", &c).unwrap_err().field, "cloud");

        let p = resolve("y", &cfg("yahoo")).unwrap();
        assert_eq!(p.scopes, vec!["mail-w".to_string()]);
        assert_eq!(p.smtp.unwrap().host, "smtp.mail.yahoo.com");
        let p = resolve("a", &cfg("aol")).unwrap();
        assert_eq!(p.imap.unwrap().host, "imap.aol.com");
        let p = resolve("x", &cfg("yandex")).unwrap();
        assert_eq!(
            p.scopes,
            vec!["mail:imap_full".to_string(), "mail:smtp".to_string()]
        );
        let p = resolve("f", &cfg("fastmail")).unwrap();
        assert_eq!(p.token_url, "https://api.fastmail.com/oauth/refresh");
        assert_eq!(
            p.authorize_url.as_deref(),
            Some("https://api.fastmail.com/oauth/authorize")
        );
        assert!(p.scopes[0].ends_with("protocol-imap"));
        assert_eq!(p.pop3.unwrap().host, "pop.fastmail.com");
        let mut f = cfg("fastmail");
        f.client_id = None;
        let e = resolve("f", &f).unwrap_err();
        assert!(
            e.message.contains("registers clients by hand"),
            "{}",
            e.message
        );
        let e = resolve("z", &cfg("hotmail")).unwrap_err();
        assert!(e.message.contains("yandex"), "{}", e.message);
    }

    #[test]
    fn oidc_and_open_need_an_issuer_and_discover_later() {
        let e = resolve("o", &cfg("oidc")).unwrap_err();
        assert_eq!(e.field, "issuer");
        let mut c = cfg("open");
        c.client_id = None;
        c.issuer = Some("https://mail.example".into());
        c.imap = Some(ServerEndpointConfig {
            host: Some("imap.mail.example".into()),
            port: None,
            tls: None,
            mechanisms: None,
            ehlo_name: None,
        });
        let p = resolve("o", &c).unwrap();
        assert_eq!(p.client_id, "open");
        assert!(p.token_url.is_empty(), "filled in by discovery");
        assert_eq!(p.imap.unwrap().mechanisms[0], Mechanism::Oauthbearer);
        assert!(
            p.scopes
                .contains(&"urn:ietf:params:oauth:scope:mail".to_string())
        );
        let mut g = cfg("google");
        g.client_secret = Some("s".into());
        g.issuer = Some("https://x.example".into());
        assert_eq!(resolve("g", &g).unwrap_err().field, "issuer");
    }

    #[test]
    fn open_scopes_follow_the_server_metadata() {
        let list = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let imap_smtp = [Protocol::Imap, Protocol::Smtp];
        // Nothing listed: the seed's literal scopes for the protocols used.
        assert_eq!(open_scopes(None, &imap_smtp), list(&["IMAP", "SMTP"]));
        assert_eq!(open_scopes(Some(&[]), &[Protocol::Pop3]), list(&["POP3"]));
        assert_eq!(open_scopes(None, &[]), list(&["IMAP", "SMTP", "POP3"]));
        // Listed: literal, with offline_access when that is listed too.
        assert_eq!(
            open_scopes(
                Some(&list(&["openid", "IMAP", "SMTP", "POP3", "offline_access"])),
                &imap_smtp
            ),
            list(&["IMAP", "SMTP", "offline_access"])
        );
        // Both drafts listed: the literal ones.
        assert_eq!(
            open_scopes(Some(&list(&["IMAP", "SMTP", OPEN_MAIL_SCOPE])), &imap_smtp),
            list(&["IMAP", "SMTP"])
        );
        // Only the later draft's scope: that one.
        assert_eq!(
            open_scopes(
                Some(&list(&["openid", OPEN_MAIL_SCOPE, "offline_access"])),
                &imap_smtp
            ),
            list(&[OPEN_MAIL_SCOPE, "offline_access"])
        );
        // Neither: the literal ones, which the profile says must work.
        assert_eq!(
            open_scopes(Some(&list(&["openid", "email"])), &[Protocol::Imap]),
            list(&["IMAP"])
        );
    }

    #[test]
    fn google_needs_a_secret() {
        let e = resolve("g", &cfg("google")).unwrap_err();
        assert_eq!(e.field, "client_secret");
    }

    #[test]
    fn custom_needs_endpoints_and_overrides_apply() {
        let e = resolve("c", &cfg("custom")).unwrap_err();
        assert_eq!(e.field, "token_url");
        let mut c = cfg("custom");
        c.token_url = Some("http://127.0.0.1:9/token".into());
        c.imap = Some(ServerEndpointConfig {
            host: Some("127.0.0.1".into()),
            port: Some(1993),
            tls: Some(UpstreamTls::Starttls),
            mechanisms: Some(vec![Mechanism::Oauthbearer]),
            ehlo_name: None,
        });
        let p = resolve("c", &c).unwrap();
        let imap = p.imap.unwrap();
        assert_eq!(imap.port, 1993);
        assert_eq!(imap.tls, UpstreamTls::Starttls);
        assert_eq!(imap.mechanisms, vec![Mechanism::Oauthbearer]);
    }

    #[test]
    fn microsoft_scope_order_rules() {
        let ok = |v: &[&str]| {
            check_microsoft_scopes(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        };
        assert!(ok(&MICROSOFT_SCOPES).is_ok());
        assert!(
            ok(&[
                "offline_access",
                "https://outlook.office.com/IMAP.AccessAsUser.All"
            ])
            .is_ok()
        );
        let graph_first = ok(&[
            "SMTP.Send",
            "https://outlook.office.com/IMAP.AccessAsUser.All",
            "offline_access",
        ]);
        assert!(
            graph_first
                .unwrap_err()
                .to_string()
                .contains("Microsoft Graph")
        );
        let graph_url_first = ok(&["https://graph.microsoft.com/Mail.Read", "offline_access"]);
        assert!(
            graph_url_first
                .unwrap_err()
                .to_string()
                .contains("Microsoft Graph")
        );
        // A bare scope after an Outlook one is Outlook's (seed 000); a
        // scope prefixed with another resource is not.
        assert!(
            ok(&[
                "https://outlook.office.com/IMAP.AccessAsUser.All",
                "Mail.Read",
                "offline_access",
            ])
            .is_ok()
        );
        let mixed = ok(&[
            "https://outlook.office.com/IMAP.AccessAsUser.All",
            "https://graph.microsoft.com/Mail.Read",
            "offline_access",
        ]);
        assert!(mixed.unwrap_err().to_string().contains("must not be mixed"));
        let no_refresh = ok(&["https://outlook.office.com/IMAP.AccessAsUser.All"]);
        assert_eq!(no_refresh.unwrap_err(), ScopeError::NoOfflineAccess);
        assert!(ok(&["offline_access"]).is_err());
    }

    /// Seed 000's two worked examples, word for word.
    #[test]
    fn seed_000_worked_examples() {
        let scopes = |s: &str| s.split(' ').map(String::from).collect::<Vec<_>>();
        // (a) "will successfully create Refresh and Access tokens for EXO
        // resource, and SMTP authenticates OK": the bare Mail.Read after
        // an Outlook scope is read as https://outlook.office.com/Mail.Read.
        assert_eq!(
            check_microsoft_scopes(&scopes(
                "offline_access https://outlook.office.com/SMTP.Send Mail.Read"
            )),
            Ok(())
        );
        // (b) "will successfully create Refresh and Access tokens but fail
        // on SMTP authentication": read as Graph's Mail.Read and SMTP.Send,
        // the token's aud is Graph.
        let e = check_microsoft_scopes(&scopes(
            "offline_access Mail.Read https://outlook.office.com/SMTP.Send",
        ))
        .unwrap_err();
        assert_eq!(
            e,
            ScopeError::WrongResourceFirst {
                scope: "Mail.Read".into(),
                graph: true
            }
        );
        let why = e.to_string();
        assert!(
            why.contains("Microsoft Graph")
                && why.contains("00000003-0000-0000-c000-000000000000")
                && why.contains("535 5.7.3"),
            "{why}"
        );
        // The same rules at config time.
        let mut c = cfg("microsoft");
        c.scopes = Some(scopes(
            "offline_access https://outlook.office.com/SMTP.Send Mail.Read",
        ));
        assert!(resolve("m", &c).is_ok());
        c.scopes = Some(scopes(
            "offline_access Mail.Read https://outlook.office.com/SMTP.Send",
        ));
        let e = resolve("m", &c).unwrap_err();
        assert!(e.field == "scopes" && e.message.contains("aud"), "{e:?}");
    }

    #[test]
    fn a_graph_first_microsoft_config_is_refused_at_check() {
        let mut c = cfg("microsoft");
        c.scopes = Some(vec!["Mail.Read".into(), "offline_access".into()]);
        let e = resolve("m", &c).unwrap_err();
        assert_eq!(e.field, "scopes");
        assert!(e.message.contains("Graph"), "{}", e.message);
    }

    #[test]
    fn outlook_audiences() {
        assert!(is_outlook_audience("https://outlook.office.com"));
        assert!(is_outlook_audience("https://outlook.office365.com/"));
        assert!(!is_outlook_audience("00000003-0000-0000-c000-000000000000"));
        assert!(!is_outlook_audience("https://graph.microsoft.com"));
    }

    #[test]
    fn plain_http_token_url_off_loopback_is_refused() {
        let mut c = cfg("custom");
        c.token_url = Some("http://idp.example/token".into());
        assert_eq!(resolve("c", &c).unwrap_err().field, "token_url");
    }
}
