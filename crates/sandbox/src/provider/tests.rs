//! The provider through real loopback HTTP.

use super::*;

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("reqwest client")
}

async fn post_token(
    provider: &Provider,
    form: &[(&str, &str)],
    basic: Option<(&str, &str)>,
) -> (u16, serde_json::Value, HeaderMap) {
    let mut req = http().post(provider.token_url()).form(form);
    if let Some((id, secret)) = basic {
        req = req.basic_auth(id, Some(secret));
    }
    let resp = req.send().await.expect("POST /token");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.json().await.expect("JSON body");
    (status, body, headers)
}

async fn refresh(provider: &Provider, rt: &str) -> (u16, serde_json::Value) {
    let (status, body, _) = post_token(
        provider,
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", rt),
            ("client_id", "mailbridge-test"),
        ],
        None,
    )
    .await;
    (status, body)
}

#[tokio::test]
async fn refresh_rotates_and_old_token_is_refused() {
    let provider = Provider::start(ProviderOptions::default()).await.unwrap();
    let rt = provider.issue_refresh_token("alice@example.com", "imap offline_access");
    let (status, body, headers) = post_token(
        &provider,
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", &rt),
            ("client_id", "mailbridge-test"),
        ],
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(headers[header::CACHE_CONTROL], "no-store");
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 3600);
    assert_eq!(body["scope"], "imap offline_access");
    let at = body["access_token"].as_str().unwrap();
    let new_rt = body["refresh_token"].as_str().unwrap();
    assert!(at.len() >= 20 && new_rt.len() >= 20);
    assert_ne!(new_rt, rt);
    provider
        .validator()
        .validate(at, "ALICE@example.com")
        .unwrap();
    let wrong = provider
        .validator()
        .validate(at, "bob@example.com")
        .unwrap_err();
    assert_eq!(wrong.status, "400");

    // The new one works, with a narrower scope too; a wider one is refused.
    let (status, body, _) = post_token(
        &provider,
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", new_rt),
            ("client_id", "mailbridge-test"),
            ("scope", "imap"),
        ],
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["scope"], "imap");
    let newest = body["refresh_token"].as_str().unwrap().to_string();
    let (status, body, _) = post_token(
        &provider,
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", &newest),
            ("client_id", "mailbridge-test"),
            ("scope", "imap smtp"),
        ],
        None,
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(body["error"], "invalid_scope");

    // The used refresh token is dead; the error does not echo it.
    let (status, body) = refresh(&provider, &rt).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"], "invalid_grant");
    assert!(!body.to_string().contains(&rt));
    assert_eq!(provider.token_requests(), 4);
    assert_eq!(provider.refresh_requests(), 4);
    provider.shutdown();
}

#[tokio::test]
async fn no_rotation_keeps_refresh_token() {
    let provider = Provider::start(ProviderOptions {
        rotate_refresh_tokens: false,
        ..Default::default()
    })
    .await
    .unwrap();
    let rt = provider.issue_refresh_token("a@example.com", "s");
    for _ in 0..2 {
        let (status, body) = refresh(&provider, &rt).await;
        assert_eq!(status, 200);
        assert_eq!(body["refresh_token"], rt.as_str());
    }
}

#[tokio::test]
async fn revoke_user_and_access_tokens() {
    let provider = Provider::start(ProviderOptions::default()).await.unwrap();
    let v = provider.validator();
    let at = provider.issue_access_token("a@example.com", "s", Duration::from_secs(60));
    let other = provider.issue_access_token("b@example.com", "s", Duration::from_secs(60));
    let rt = provider.issue_refresh_token("a@example.com", "s");
    v.validate(&at, "a@example.com").unwrap();

    provider.revoke_access_tokens("a@example.com");
    assert_eq!(v.validate(&at, "a@example.com").unwrap_err().status, "401");
    v.validate(&other, "b@example.com").unwrap();
    let (status, body) = refresh(&provider, &rt).await;
    assert_eq!(status, 200, "{body}");
    let at2 = body["access_token"].as_str().unwrap();
    let rt2 = body["refresh_token"].as_str().unwrap();
    v.validate(at2, "a@example.com").unwrap();

    provider.revoke_user("a@example.com");
    assert_eq!(v.validate(at2, "a@example.com").unwrap_err().status, "401");
    let (status, body) = refresh(&provider, rt2).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"], "invalid_grant");
    v.validate(&other, "b@example.com").unwrap();
}

#[tokio::test]
async fn reused_refresh_token_revokes_the_grant_and_locked_user_is_temporary() {
    let provider = Provider::start(ProviderOptions::default()).await.unwrap();
    let rt = provider.issue_refresh_token("a@example.com", "s");
    let (status, body) = refresh(&provider, &rt).await;
    assert_eq!(status, 200, "{body}");
    let rt2 = body["refresh_token"].as_str().unwrap().to_string();

    provider.set_user_locked("A@example.com", true);
    let (status, body) = refresh(&provider, &rt2).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"], "invalid_grant");
    assert_eq!(body["temporary"], true, "{body}");
    provider.set_user_locked("a@example.com", false);

    // The old token again: the newer one dies with it.
    let (status, body) = refresh(&provider, &rt).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_grant"))
    );
    assert!(body.get("temporary").is_none(), "{body}");
    let (status, _) = refresh(&provider, &rt2).await;
    assert_eq!(status, 400, "the grant was revoked");
}

#[tokio::test]
async fn expiry_is_enforced() {
    let provider = Provider::start(ProviderOptions::default()).await.unwrap();
    let at = provider.issue_access_token("a@example.com", "s", Duration::from_millis(50));
    provider.validator().validate(&at, "a@example.com").unwrap();
    tokio::time::sleep(Duration::from_millis(80)).await;
    let e = provider
        .validator()
        .validate(&at, "a@example.com")
        .unwrap_err();
    assert_eq!(e.status, "401");
    assert!(e.reason.contains("expired"));

    provider.set_access_token_lifetime(Duration::from_secs(7));
    let rt = provider.issue_refresh_token("a@example.com", "s");
    let (_, body) = refresh(&provider, &rt).await;
    assert_eq!(body["expires_in"], 7);
}

#[tokio::test]
async fn client_credentials_and_client_auth() {
    let provider = Provider::start(ProviderOptions {
        client_secret: Some("s3cr:et&".to_string()),
        ..Default::default()
    })
    .await
    .unwrap();
    let cc = [
        ("grant_type", "client_credentials"),
        ("scope", "x/.default"),
    ];
    // Basic (with characters that must be form-encoded).
    let (status, body, _) =
        post_token(&provider, &cc, Some(("mailbridge-test", "s3cr%3Aet%26"))).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.get("refresh_token").is_none());
    let at = body["access_token"].as_str().unwrap();
    provider.validator().validate(at, "anyone@x.org").unwrap();
    provider.validator().validate(at, "other@y.org").unwrap();
    // Body credentials.
    let (status, _, _) = post_token(
        &provider,
        &[
            ("grant_type", "client_credentials"),
            ("client_id", "mailbridge-test"),
            ("client_secret", "s3cr:et&"),
        ],
        None,
    )
    .await;
    assert_eq!(status, 200);
    // Wrong secret, missing secret, wrong id.
    let (status, body, headers) =
        post_token(&provider, &cc, Some(("mailbridge-test", "nope"))).await;
    assert_eq!(status, 401);
    assert_eq!(body["error"], "invalid_client");
    assert!(headers.contains_key(header::WWW_AUTHENTICATE));
    let (status, body, _) = post_token(
        &provider,
        &[
            ("grant_type", "client_credentials"),
            ("client_id", "mailbridge-test"),
        ],
        None,
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("invalid_client"))
    );
    let (status, _, _) = post_token(&provider, &cc, Some(("someone-else", "s3cr%3Aet%26"))).await;
    assert_eq!(status, 401);
    // A used grant type we do not know.
    let (status, body, _) = post_token(
        &provider,
        &[
            ("grant_type", "password"),
            ("username", "u"),
            ("password", "p"),
        ],
        Some(("mailbridge-test", "s3cr%3Aet%26")),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("unsupported_grant_type"))
    );
    // Missing parameters.
    let (status, body, _) = post_token(
        &provider,
        &[("grant_type", "refresh_token")],
        Some(("mailbridge-test", "s3cr%3Aet%26")),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_request"))
    );
}

#[tokio::test]
async fn client_credentials_needs_confidential_client() {
    let provider = Provider::start(ProviderOptions::default()).await.unwrap();
    let (status, body, _) = post_token(
        &provider,
        &[
            ("grant_type", "client_credentials"),
            ("client_id", "mailbridge-test"),
        ],
        None,
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(body["error"], "unauthorized_client");
}

/// Runs /authorize and returns the redirect's query parameters.
async fn authorize(provider: &Provider, query: &[(&str, &str)]) -> (u16, HashMap<String, String>) {
    let resp = http()
        .get(provider.authorize_url())
        .query(query)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let mut params = HashMap::new();
    if let Some(location) = resp.headers().get(header::LOCATION) {
        let location = location.to_str().unwrap();
        let (base, query) = location.split_once('?').unwrap();
        params.insert("_base".to_string(), base.to_string());
        for pair in query.split('&') {
            let (k, v) = pair.split_once('=').unwrap();
            params.insert(k.to_string(), form_decode(v).unwrap());
        }
    }
    (status, params)
}

#[tokio::test]
async fn authorization_code_with_pkce() {
    let provider = Provider::start(ProviderOptions::default()).await.unwrap();
    let verifier = "v".repeat(20) + "-._~0123456789abcdefghijklmnop";
    let challenge = pkce_s256(&verifier);
    let redirect_uri = "http://127.0.0.1:4567/cb";
    let (status, params) = authorize(
        &provider,
        &[
            ("response_type", "code"),
            ("client_id", "mailbridge-test"),
            ("redirect_uri", redirect_uri),
            ("scope", "imap offline_access"),
            ("state", "st ate&1"),
            ("code_challenge", &challenge),
            ("code_challenge_method", "S256"),
            ("login_hint", "carol@example.com"),
        ],
    )
    .await;
    assert_eq!(status, 302);
    assert_eq!(params["_base"], redirect_uri);
    assert_eq!(params["state"], "st ate&1");
    let code = params["code"].clone();

    let exchange = |verifier: String, redirect: &'static str| {
        let provider = provider.clone();
        let code = code.clone();
        async move {
            post_token(
                &provider,
                &[
                    ("grant_type", "authorization_code"),
                    ("code", &code),
                    ("redirect_uri", redirect),
                    ("code_verifier", &verifier),
                    ("client_id", "mailbridge-test"),
                ],
                None,
            )
            .await
        }
    };
    // Wrong verifier, wrong redirect_uri: refused.
    let (status, body, _) = exchange("w".repeat(43), redirect_uri).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_grant"))
    );
    assert!(!body.to_string().contains(&code));
    let (status, body, _) = exchange(verifier.clone(), "http://127.0.0.1:4567/other").await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_grant"))
    );
    // The right one works once.
    let (status, body, _) = exchange(verifier.clone(), redirect_uri).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["scope"], "imap offline_access");
    let at = body["access_token"].as_str().unwrap();
    provider
        .validator()
        .validate(at, "carol@example.com")
        .unwrap();
    let rt = body["refresh_token"].as_str().unwrap();
    let (status, _) = refresh(&provider, rt).await;
    assert_eq!(status, 200);
    // Second redemption refused.
    let (status, body, _) = exchange(verifier, redirect_uri).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"], "invalid_grant");
    assert_eq!(
        body["error_description"],
        "authorization code already redeemed"
    );
}

#[tokio::test]
async fn authorize_errors() {
    let provider = Provider::start(ProviderOptions::default()).await.unwrap();
    let challenge = pkce_s256(&"x".repeat(50));
    let base = [
        ("response_type", "code"),
        ("client_id", "mailbridge-test"),
        ("redirect_uri", "http://localhost:1/cb"),
        ("state", "s"),
    ];
    // No PKCE: error redirect, state kept.
    let (status, params) = authorize(&provider, &base).await;
    assert_eq!(status, 302);
    assert_eq!(params["error"], "invalid_request");
    assert_eq!(params["state"], "s");
    // plain method refused.
    let mut q = base.to_vec();
    q.push(("code_challenge", &challenge));
    q.push(("code_challenge_method", "plain"));
    let (status, params) = authorize(&provider, &q).await;
    assert_eq!((status, params["error"].as_str()), (302, "invalid_request"));
    // Bad client: no redirect at all.
    let mut q = base.to_vec();
    q[1] = ("client_id", "evil");
    let (status, params) = authorize(&provider, &q).await;
    assert_eq!(status, 400);
    assert!(params.is_empty());
    // Default user.
    let mut q = base.to_vec();
    q.push(("code_challenge", &challenge));
    q.push(("code_challenge_method", "S256"));
    let (status, params) = authorize(&provider, &q).await;
    assert_eq!(status, 302);
    let code = provider.shared.book().codes[&params["code"]].user.clone();
    assert_eq!(code, DEFAULT_USER);
}

#[tokio::test]
async fn token_delay_and_counters() {
    let provider = Provider::start(ProviderOptions::default()).await.unwrap();
    provider.set_token_delay(Duration::from_millis(150));
    let rt = provider.issue_refresh_token("a@example.com", "s");
    let started = Instant::now();
    let (status, _) = refresh(&provider, &rt).await;
    assert_eq!(status, 200);
    assert!(started.elapsed() >= Duration::from_millis(150));
    assert_eq!(provider.refresh_requests(), 1);
    assert_eq!(provider.token_requests(), 1);
}

#[tokio::test]
async fn answer_delay_rotates_first_and_a_client_gone_loses_only_the_answer() {
    let provider = Provider::start(ProviderOptions::default()).await.unwrap();
    provider.set_answer_delay(Duration::from_millis(300));
    let rt = provider.issue_refresh_token("a@example.com", "s");
    assert!(provider.refresh_token_is_live(&rt));
    assert_eq!(provider.last_rotation(), None);
    // The client gives up before the answer comes.
    let req = http()
        .post(provider.token_url())
        .timeout(Duration::from_millis(100))
        .form(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", rt.as_str()),
            ("client_id", "mailbridge-test"),
        ])
        .send()
        .await;
    assert!(req.is_err(), "answered within the delay");
    // Rotated all the same: the old token is spent, and presenting it
    // again is a replay that revokes the grant.
    assert!(provider.last_rotation().is_some());
    assert!(!provider.refresh_token_is_live(&rt));
    assert_eq!(provider.refresh_token_replays(), 0);
    let (status, body) = refresh(&provider, &rt).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_grant"))
    );
    assert_eq!(provider.refresh_token_replays(), 1);
}

#[tokio::test]
async fn token_delay_processes_even_when_the_client_leaves() {
    let provider = Provider::start(ProviderOptions::default()).await.unwrap();
    provider.set_token_delay(Duration::from_millis(200));
    let rt = provider.issue_refresh_token("a@example.com", "s");
    let gone = http()
        .post(provider.token_url())
        .timeout(Duration::from_millis(50))
        .form(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", rt.as_str()),
            ("client_id", "mailbridge-test"),
        ])
        .send()
        .await;
    assert!(gone.is_err());
    for _ in 0..100 {
        if provider.last_rotation().is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        !provider.refresh_token_is_live(&rt),
        "processed after the client left"
    );
}

#[tokio::test]
async fn expires_in_can_be_left_out() {
    let provider = Provider::start(ProviderOptions::default()).await.unwrap();
    let rt = provider.issue_refresh_token("a@example.com", "s");
    provider.set_omit_expires_in(true);
    let (status, body) = refresh(&provider, &rt).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.get("expires_in").is_none(), "{body}");
    assert!(body["access_token"].is_string());
    provider.set_omit_expires_in(false);
    let rt = body["refresh_token"].as_str().unwrap().to_string();
    let (_, body) = refresh(&provider, &rt).await;
    assert_eq!(body["expires_in"], 3600);
}

#[tokio::test]
async fn rejects_json_body_and_duplicates() {
    let provider = Provider::start(ProviderOptions::default()).await.unwrap();
    let resp = http()
        .post(provider.token_url())
        .json(&json!({"grant_type": "refresh_token"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "invalid_request");
    let (status, body, _) = post_token(
        &provider,
        &[
            ("grant_type", "refresh_token"),
            ("grant_type", "refresh_token"),
        ],
        None,
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_request"))
    );
}

#[tokio::test]
async fn shutdown_stops_serving() {
    let provider = Provider::start(ProviderOptions::default()).await.unwrap();
    provider.shutdown();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(http().get(provider.base_url()).send().await.is_err());
}

/// The `oauth2` crate (which the proxy uses) against the provider: HTTP
/// Basic client authentication with characters that need encoding.
#[tokio::test]
async fn oauth2_crate_refresh_and_client_credentials() {
    use oauth2::basic::BasicClient;
    use oauth2::{ClientId, ClientSecret, RefreshToken, Scope, TokenResponse, TokenUrl};

    let provider = Provider::start(ProviderOptions {
        client_secret: Some("p@ss:w+rd/=".to_string()),
        ..Default::default()
    })
    .await
    .unwrap();
    let client = BasicClient::new(ClientId::new("mailbridge-test".to_string()))
        .set_client_secret(ClientSecret::new("p@ss:w+rd/=".to_string()))
        .set_token_uri(TokenUrl::new(provider.token_url()).unwrap());
    let rt = provider.issue_refresh_token("a@example.com", "mail offline_access");
    let token = client
        .exchange_refresh_token(&RefreshToken::new(rt.clone()))
        .request_async(&http())
        .await
        .expect("refresh through the oauth2 crate");
    provider
        .validator()
        .validate(token.access_token().secret(), "a@example.com")
        .unwrap();
    assert_ne!(token.refresh_token().unwrap().secret(), &rt);
    assert_eq!(token.expires_in(), Some(Duration::from_secs(3600)));
    let err = client
        .exchange_refresh_token(&RefreshToken::new(rt))
        .request_async(&http())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("invalid_grant"), "{err}");
    let token = client
        .exchange_client_credentials()
        .add_scope(Scope::new("mail/.default".to_string()))
        .request_async(&http())
        .await
        .expect("client credentials through the oauth2 crate");
    provider
        .validator()
        .validate(token.access_token().secret(), "anyone@example.com")
        .unwrap();
}

/// Authorization code + PKCE with the `oauth2` crate as a public client.
#[tokio::test]
async fn oauth2_crate_authorization_code_public_client() {
    use oauth2::basic::BasicClient;
    use oauth2::{
        AuthUrl, AuthorizationCode, ClientId, CsrfToken, PkceCodeChallenge, RedirectUrl, Scope,
        TokenResponse, TokenUrl,
    };

    let provider = Provider::start(ProviderOptions::default()).await.unwrap();
    let client = BasicClient::new(ClientId::new("mailbridge-test".to_string()))
        .set_auth_uri(AuthUrl::new(provider.authorize_url()).unwrap())
        .set_token_uri(TokenUrl::new(provider.token_url()).unwrap())
        .set_redirect_uri(RedirectUrl::new("http://127.0.0.1:9/callback".to_string()).unwrap());
    let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
    let (url, csrf) = client
        .authorize_url(CsrfToken::new_random)
        .add_scope(Scope::new("mail".to_string()))
        .add_extra_param("login_hint", "dave@example.com")
        .set_pkce_challenge(challenge)
        .url();
    let resp = http().get(url.as_str()).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 302);
    let location = resp.headers()[header::LOCATION]
        .to_str()
        .unwrap()
        .to_string();
    let query = location.split_once('?').unwrap().1;
    let mut code = None;
    let mut state = None;
    for pair in query.split('&') {
        match pair.split_once('=').unwrap() {
            ("code", v) => code = Some(form_decode(v).unwrap()),
            ("state", v) => state = Some(form_decode(v).unwrap()),
            _ => {}
        }
    }
    assert_eq!(state.as_deref(), Some(csrf.secret().as_str()));
    let token = client
        .exchange_code(AuthorizationCode::new(code.unwrap()))
        .set_pkce_verifier(verifier)
        .request_async(&http())
        .await
        .expect("code exchange through the oauth2 crate");
    provider
        .validator()
        .validate(token.access_token().secret(), "dave@example.com")
        .unwrap();
    assert!(token.refresh_token().is_some());
}

mod grants;
