//! Grant flows end to end against the sandbox provider through real
//! loopback HTTP: the "browser" is an HTTP client that follows the
//! authorization URL to the provider's automatic consent and on to the
//! redirect.

use std::sync::Mutex;
use std::time::Duration;

use mailbridge::oauth::TokenSource;
use mailbridge::oauth::flows::{self, BrowserOptions, FlowEndpoints, FlowError, FlowUi};
use mailbridge_sandbox::{Provider, ProviderOptions};
use secrecy::ExposeSecret;

/// A scripted person at a browser.
#[derive(Default)]
struct Browser {
    shown: Mutex<Vec<String>>,
    /// Tamper with the redirect before following or pasting it.
    tamper: Option<fn(String) -> String>,
}

fn no_redirects() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

impl Browser {
    async fn consent(url: String, tamper: Option<fn(String) -> String>) -> String {
        let r = no_redirects().get(&url).send().await.unwrap();
        assert_eq!(r.status(), 302, "automatic consent redirects");
        let location = r.headers()["location"].to_str().unwrap().to_string();
        match tamper {
            Some(f) => f(location),
            None => location,
        }
    }
}

impl FlowUi for Browser {
    fn show_url(&self, url: &str) {
        self.shown.lock().unwrap().push(url.to_string());
    }
    fn open_browser(&self, url: &str) -> bool {
        let url = url.to_string();
        let tamper = self.tamper;
        tokio::spawn(async move {
            let back = Browser::consent(url, tamper).await;
            let page = no_redirects().get(&back).send().await.unwrap();
            assert!(page.status().is_success());
        });
        true
    }
    fn read_line(
        &self,
        _prompt: &str,
    ) -> impl std::future::Future<Output = std::io::Result<String>> + Send {
        let url = self.shown.lock().unwrap().last().cloned().unwrap();
        let tamper = self.tamper;
        async move { Ok(Browser::consent(url, tamper).await) }
    }
    fn show_device_code(&self, _uri: &str, _code: &str, _complete: Option<&str>) {}
}

fn endpoints<'a>(p: &'a str, t: &'a str, scopes: &'a [String]) -> FlowEndpoints<'a> {
    FlowEndpoints {
        client_id: "mailbridge-test",
        client_secret: None,
        authorize_url: Some(p),
        token_url: t,
        device_url: None,
        scopes,
    }
}

fn options() -> BrowserOptions {
    BrowserOptions {
        login_hint: Some("carol@example.com".into()),
        timeout: Duration::from_secs(20),
        ..BrowserOptions::default()
    }
}

#[tokio::test]
async fn loopback_browser_flow_gets_a_working_grant() {
    let provider = Provider::start(ProviderOptions::default()).await.unwrap();
    let (a, t) = (provider.authorize_url(), provider.token_url());
    let scopes = vec!["mail".to_string()];
    let ui = Browser::default();
    let got = flows::authorization_code_loopback(
        &endpoints(&a, &t, &scopes),
        &TokenSource::http_client().unwrap(),
        &options(),
        &ui,
    )
    .await
    .unwrap();
    let url = ui.shown.lock().unwrap()[0].clone();
    assert!(
        url.contains("code_challenge_method=S256") && url.contains("login_hint=carol"),
        "{url}"
    );
    assert!(
        url.contains("redirect_uri=http%3A%2F%2F127.0.0.1%3A"),
        "{url}"
    );
    assert!(got.refresh_token.is_some());
    provider
        .validator()
        .validate(got.access_token.expose_secret(), "carol@example.com")
        .expect("the access token works for the hinted mailbox");
    provider.shutdown();
}

#[tokio::test]
async fn pasted_redirect_flow_and_a_forged_state() {
    let provider = Provider::start(ProviderOptions::default()).await.unwrap();
    let (a, t) = (provider.authorize_url(), provider.token_url());
    let scopes = vec!["mail".to_string()];
    let ui = Browser::default();
    let got = flows::authorization_code_paste(
        &endpoints(&a, &t, &scopes),
        &TokenSource::http_client().unwrap(),
        &options(),
        &ui,
    )
    .await
    .unwrap();
    assert!(got.refresh_token.is_some());

    let ui = Browser {
        tamper: Some(|loc| loc.replace("state=", "state=x")),
        ..Browser::default()
    };
    let err = flows::authorization_code_paste(
        &endpoints(&a, &t, &scopes),
        &TokenSource::http_client().unwrap(),
        &options(),
        &ui,
    )
    .await
    .unwrap_err();
    assert!(matches!(err, FlowError::BadRedirect(_)), "{err}");
    assert!(err.to_string().contains("state"), "{err}");
    provider.shutdown();
}

#[tokio::test]
async fn loopback_flow_times_out_clearly() {
    let provider = Provider::start(ProviderOptions::default()).await.unwrap();
    let (a, t) = (provider.authorize_url(), provider.token_url());
    let scopes = vec!["mail".to_string()];
    struct Nobody;
    impl FlowUi for Nobody {
        fn show_url(&self, _: &str) {}
        fn open_browser(&self, _: &str) -> bool {
            false
        }
        async fn read_line(&self, _: &str) -> std::io::Result<String> {
            Ok(String::new())
        }
        fn show_device_code(&self, _: &str, _: &str, _: Option<&str>) {}
    }
    let opts = BrowserOptions {
        timeout: Duration::from_millis(300),
        ..options()
    };
    let err = flows::authorization_code_loopback(
        &endpoints(&a, &t, &scopes),
        &TokenSource::http_client().unwrap(),
        &opts,
        &Nobody,
    )
    .await
    .unwrap_err();
    assert!(matches!(err, FlowError::Timeout(_)), "{err}");
    provider.shutdown();
}

#[tokio::test]
async fn device_flow_honours_slow_down_and_pending() {
    let provider = Provider::start(ProviderOptions {
        device_interval: Duration::ZERO,
        ..ProviderOptions::default()
    })
    .await
    .unwrap();
    let (t, d) = (provider.token_url(), provider.device_authorization_url());
    let scopes = vec!["mail".to_string()];
    let ep = FlowEndpoints {
        client_id: "mailbridge-test",
        client_secret: None,
        authorize_url: None,
        token_url: &t,
        device_url: Some(&d),
        scopes: &scopes,
    };
    // One `slow_down`, then `authorization_pending` until approved.
    provider.force_slow_down(1);
    let approver = {
        let provider = provider.clone();
        tokio::spawn(async move {
            for _ in 0..200 {
                if let Some(code) = provider.pending_device_codes().first() {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    assert!(provider.approve_device(code, "dora@example.com"));
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            panic!("no device code appeared");
        })
    };
    let ui = Browser::default();
    let got = flows::device_code(
        &ep,
        &TokenSource::http_client().unwrap(),
        Duration::from_secs(30),
        &ui,
    )
    .await
    .unwrap();
    approver.await.unwrap();
    assert!(got.refresh_token.is_some());
    provider
        .validator()
        .validate(got.access_token.expose_secret(), "dora@example.com")
        .unwrap();
    provider.shutdown();
}

/// Extra authorization parameters (Google's `access_type=offline` and
/// `prompt=consent`, OIDC's `prompt=consent`) reach the authorization URL;
/// they were dropped, and with them the refresh token.
#[tokio::test]
async fn extra_authorization_parameters_are_sent() {
    let provider = Provider::start(ProviderOptions::default()).await.unwrap();
    provider.set_offline_access_needs_consent(true);
    let (a, t) = (provider.authorize_url(), provider.token_url());
    let scopes = vec!["mail".to_string(), "offline_access".to_string()];
    let ui = Browser::default();
    let got = flows::authorization_code_loopback(
        &endpoints(&a, &t, &scopes),
        &TokenSource::http_client().unwrap(),
        &BrowserOptions {
            extra_params: vec![
                ("access_type".into(), "offline".into()),
                ("prompt".into(), "consent".into()),
            ],
            ..options()
        },
        &ui,
    )
    .await
    .unwrap();
    let url = ui.shown.lock().unwrap()[0].clone();
    assert!(
        url.contains("access_type=offline") && url.contains("prompt=consent"),
        "{url}"
    );
    assert!(got.refresh_token.is_some(), "consented offline access");
    provider.shutdown();
}

/// An `open` provider on the sandbox with IMAP and SMTP servers, before
/// discovery.
fn open_provider(sandbox: &Provider) -> mailbridge::provider::Provider {
    let c: mailbridge::config::ProviderConfig = toml::from_str(&format!(
        "preset = \"open\"\nissuer = \"{}\"\nimap = {{ host = \"localhost\" }}\nsmtp = {{ host = \"localhost\" }}",
        sandbox.base_url()
    ))
    .unwrap();
    mailbridge::provider::resolve("open", &c).unwrap()
}

/// The `open` preset asks for the seed's literal scopes when the server
/// lists them or lists none, and for the later draft's mail scope when
/// only that is listed; each choice then gets a working grant through the
/// browser flow, whose authorization URL carries it.
#[tokio::test]
async fn open_preset_picks_its_scopes_from_the_server_metadata() {
    let sandbox = Provider::start(ProviderOptions::default()).await.unwrap();
    let http = TokenSource::http_client().unwrap();
    let mail = "urn:ietf:params:oauth:scope:mail";
    // (what the metadata lists, what mailbridge asks for, the URL's scope)
    type Case<'a> = (Option<Vec<&'a str>>, Vec<&'a str>, &'a str);
    let cases: [Case; 3] = [
        (None, vec!["IMAP", "SMTP"], "scope=IMAP+SMTP"),
        (
            Some(vec!["openid", "IMAP", "SMTP", "POP3", "offline_access"]),
            vec!["IMAP", "SMTP", "offline_access"],
            "scope=IMAP+SMTP+offline_access",
        ),
        (
            Some(vec!["openid", mail, "offline_access"]),
            vec![mail, "offline_access"],
            "scope=urn%3Aietf%3Aparams%3Aoauth%3Ascope%3Amail+offline_access",
        ),
    ];
    for (listed, want, in_url) in cases {
        sandbox.set_scopes_supported(
            listed
                .as_ref()
                .map(|l| l.iter().map(|s| s.to_string()).collect()),
        );
        let mut p = open_provider(&sandbox);
        p.discover(&http).await.unwrap();
        assert_eq!(p.scopes, want, "metadata listing {listed:?}");
        println!("scopes_supported {listed:?} -> asks for {:?}", p.scopes);
        let ui = Browser::default();
        let ep = FlowEndpoints {
            client_id: &p.client_id,
            client_secret: None,
            authorize_url: p.authorize_url.as_deref(),
            token_url: &p.token_url,
            device_url: None,
            scopes: &p.scopes,
        };
        let got = flows::authorization_code_loopback(&ep, &http, &options(), &ui)
            .await
            .unwrap();
        let url = ui.shown.lock().unwrap()[0].clone();
        assert!(url.contains(in_url), "{url}");
        assert!(got.refresh_token.is_some());
    }
    sandbox.shutdown();
}

/// mailbridge names itself (`mailbridge/VERSION`) on every OAuth2 request:
/// discovery, dynamic registration, the device flow and the token
/// endpoint.
#[tokio::test]
async fn every_oauth2_request_carries_mailbridges_user_agent() {
    let sandbox = Provider::start(ProviderOptions {
        device_interval: Duration::ZERO,
        ..ProviderOptions::default()
    })
    .await
    .unwrap();
    let http = TokenSource::http_client().unwrap();
    let mut p = open_provider(&sandbox);
    p.discover(&http).await.unwrap();
    let registered = flows::register_client(
        &http,
        p.registration_url
            .as_deref()
            .expect("registration endpoint"),
        &["http://127.0.0.1/".to_string()],
    )
    .await
    .unwrap();
    let d = sandbox.device_authorization_url();
    let ep = FlowEndpoints {
        client_id: &registered,
        client_secret: None,
        authorize_url: None,
        token_url: &p.token_url,
        device_url: Some(&d),
        scopes: &p.scopes,
    };
    let approver = {
        let sandbox = sandbox.clone();
        tokio::spawn(async move {
            for _ in 0..200 {
                if let Some(code) = sandbox.pending_device_codes().first() {
                    assert!(sandbox.approve_device(code, "dora@example.com"));
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            panic!("no device code appeared");
        })
    };
    flows::device_code(&ep, &http, Duration::from_secs(30), &Browser::default())
        .await
        .unwrap();
    approver.await.unwrap();
    let want = format!("mailbridge/{}", env!("CARGO_PKG_VERSION"));
    let seen = sandbox.user_agents();
    for path in [
        "/.well-known/openid-configuration",
        "/register",
        "/device_authorization",
        "/token",
    ] {
        let agents: Vec<&str> = seen
            .iter()
            .filter(|(p, _)| p == path)
            .map(|(_, a)| a.as_str())
            .collect();
        assert!(!agents.is_empty(), "no request to {path}: {seen:?}");
        assert!(agents.iter().all(|a| *a == want), "{path}: {agents:?}");
        println!("{path}: {} request(s), User-Agent {want}", agents.len());
    }
    sandbox.shutdown();
}
