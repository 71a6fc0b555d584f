//! The grants and clients added on top of the basics: device flow, JWT
//! bearer, private-key JWT client authentication, password, dynamic
//! registration, the open public-client profile, JWT-shaped access tokens.

use super::*;
use ring::rand::SystemRandom;
use ring::signature::{RSA_PKCS1_SHA256, RsaKeyPair};
use rustls_pki_types::PrivatePkcs8KeyDer;
use rustls_pki_types::pem::PemObject;

const TEST_KEY: &str = include_str!("../../../fixtures/test_rsa.key.pem");
const TEST_PUB: &str = include_str!("../../../fixtures/test_rsa.pub.pem");
const OTHER_KEY: &str = include_str!("../../../fixtures/other_rsa.key.pem");
const OTHER_PUB: &str = include_str!("../../../fixtures/other_rsa.pub.pem");

const SA: &str = "mailer@project.iam.gserviceaccount.com";

fn b64json(v: &serde_json::Value) -> String {
    URL_SAFE_NO_PAD.encode(v.to_string())
}

/// What a client does with a service-account or certificate key.
fn sign_rs256(pkcs8_pem: &str, header: &serde_json::Value, claims: &serde_json::Value) -> String {
    let der = PrivatePkcs8KeyDer::from_pem_slice(pkcs8_pem.as_bytes()).expect("PKCS#8 PEM");
    let key = RsaKeyPair::from_pkcs8(der.secret_pkcs8_der()).expect("RSA key");
    let input = format!("{}.{}", b64json(header), b64json(claims));
    let mut signature = vec![0; key.public().modulus_len()];
    key.sign(
        &RSA_PKCS1_SHA256,
        &SystemRandom::new(),
        input.as_bytes(),
        &mut signature,
    )
    .expect("sign");
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(signature))
}

fn rs256_header() -> serde_json::Value {
    json!({ "alg": "RS256", "typ": "JWT", "kid": "0123abcd" })
}

fn now_secs() -> i64 {
    i64::try_from(unix_now()).unwrap()
}

fn decode_claims(token: &str) -> serde_json::Value {
    let claims = token.split('.').nth(1).expect("JWT-shaped");
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(claims).unwrap()).unwrap()
}

async fn post_form(url: &str, form: &[(&str, &str)]) -> (u16, serde_json::Value) {
    let resp = http().post(url).form(form).send().await.expect("POST");
    let status = resp.status().as_u16();
    (status, resp.json().await.expect("JSON body"))
}

async fn metadata_of(provider: &Provider) -> serde_json::Value {
    http()
        .get(format!(
            "{}/.well-known/oauth-authorization-server",
            provider.base_url()
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test]
async fn metadata_lists_new_endpoints_and_grants() {
    let provider = Provider::start(ProviderOptions::default()).await.unwrap();
    let meta = metadata_of(&provider).await;
    assert_eq!(
        meta["device_authorization_endpoint"],
        provider.device_authorization_url()
    );
    assert_eq!(meta["registration_endpoint"], provider.registration_url());
    let grants = meta["grant_types_supported"].as_array().unwrap();
    assert!(grants.contains(&json!(DEVICE_CODE_GRANT)));
    assert!(grants.contains(&json!(JWT_BEARER_GRANT)));
    assert!(!grants.contains(&json!("password")));
    assert!(
        meta["token_endpoint_auth_methods_supported"]
            .as_array()
            .unwrap()
            .contains(&json!("private_key_jwt"))
    );
    let provider = Provider::start(ProviderOptions {
        allow_password_grant: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let meta = metadata_of(&provider).await;
    assert!(
        meta["grant_types_supported"]
            .as_array()
            .unwrap()
            .contains(&json!("password"))
    );
}

// ---------------------------------------------------------------------------
// Device authorization grant (RFC 8628)

async fn start_device(provider: &Provider, scope: &str) -> (u16, serde_json::Value) {
    post_form(
        &provider.device_authorization_url(),
        &[("client_id", "mailbridge-test"), ("scope", scope)],
    )
    .await
}

async fn poll(provider: &Provider, device_code: &str) -> (u16, serde_json::Value) {
    post_form(
        &provider.token_url(),
        &[
            ("grant_type", DEVICE_CODE_GRANT),
            ("device_code", device_code),
            ("client_id", "mailbridge-test"),
        ],
    )
    .await
}

#[tokio::test]
async fn device_flow_pending_slow_down_approve_deny() {
    let provider = Provider::start(ProviderOptions {
        device_interval: Duration::ZERO,
        ..Default::default()
    })
    .await
    .unwrap();
    let (status, body) = start_device(&provider, "imap offline_access").await;
    assert_eq!(status, 200, "{body}");
    let device_code = body["device_code"].as_str().unwrap().to_string();
    let user_code = body["user_code"].as_str().unwrap().to_string();
    assert_eq!(user_code.len(), 9);
    assert_eq!(&user_code[4..5], "-");
    assert_eq!(
        body["verification_uri"],
        format!("{}/device", provider.base_url())
    );
    assert_eq!(
        body["verification_uri_complete"],
        format!("{}/device?user_code={user_code}", provider.base_url())
    );
    assert_eq!(body["expires_in"], 600);
    assert_eq!(body["interval"], 0);
    let page = http()
        .get(body["verification_uri_complete"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(page.status().as_u16(), 200);
    assert_eq!(provider.pending_device_codes(), vec![user_code.clone()]);

    // Pending; with interval 0, fast polls are fine.
    for _ in 0..3 {
        let (status, body) = poll(&provider, &device_code).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (400, Some("authorization_pending"))
        );
    }
    // Forced slow_down, then pending again.
    provider.force_slow_down(2);
    for _ in 0..2 {
        let (status, body) = poll(&provider, &device_code).await;
        assert_eq!((status, body["error"].as_str()), (400, Some("slow_down")));
    }
    let (_, body) = poll(&provider, &device_code).await;
    assert_eq!(body["error"], "authorization_pending");

    // Another client may not poll this code.
    let (status, body) = post_form(
        &provider.token_url(),
        &[
            ("grant_type", DEVICE_CODE_GRANT),
            ("device_code", &device_code),
            ("client_id", "open"),
        ],
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(body["error"], "unauthorized_client");

    // Approval takes the code without dash, in lower case.
    let typed = user_code.replace('-', "").to_lowercase();
    assert!(provider.approve_device(&typed, "erin@example.com"));
    assert!(!provider.approve_device(&typed, "erin@example.com"));
    assert!(provider.pending_device_codes().is_empty());
    let (status, body) = poll(&provider, &device_code).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["scope"], "imap offline_access");
    let at = body["access_token"].as_str().unwrap();
    provider
        .validator()
        .validate(at, "erin@example.com")
        .unwrap();
    let rt = body["refresh_token"].as_str().unwrap();
    let (status, _) = refresh(&provider, rt).await;
    assert_eq!(status, 200);
    // Spent.
    let (status, body) = poll(&provider, &device_code).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_grant"))
    );
    assert!(!body.to_string().contains(&device_code));

    // Denied.
    let (_, body) = start_device(&provider, "imap").await;
    let device_code = body["device_code"].as_str().unwrap().to_string();
    assert!(provider.deny_device(body["user_code"].as_str().unwrap()));
    let (status, body) = poll(&provider, &device_code).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("access_denied"))
    );

    // Unknown device code; missing client.
    let (_, body) = poll(&provider, "no-such-code").await;
    assert_eq!(body["error"], "invalid_grant");
    let (status, body) = post_form(&provider.device_authorization_url(), &[("scope", "x")]).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("invalid_client"))
    );
    // The open client is not for the device flow.
    let (status, body) = post_form(
        &provider.device_authorization_url(),
        &[("client_id", "open")],
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("unauthorized_client"))
    );
}

#[tokio::test]
async fn device_flow_rate_limit_grows_interval() {
    let provider = Provider::start(ProviderOptions {
        device_interval: Duration::from_secs(1),
        ..Default::default()
    })
    .await
    .unwrap();
    let (_, body) = start_device(&provider, "imap").await;
    assert_eq!(body["interval"], 1);
    let device_code = body["device_code"].as_str().unwrap().to_string();
    let (_, body) = poll(&provider, &device_code).await;
    assert_eq!(body["error"], "authorization_pending");
    let (_, body) = poll(&provider, &device_code).await;
    assert_eq!(body["error"], "slow_down");
    assert!(
        body["error_description"]
            .as_str()
            .unwrap()
            .contains("6 seconds"),
        "{body}"
    );
    // One second is no longer enough: the interval is now 6 s.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (_, body) = poll(&provider, &device_code).await;
    assert_eq!(body["error"], "slow_down");
}

#[tokio::test]
async fn device_flow_expiry_and_refused_scope() {
    let provider = Provider::start(ProviderOptions {
        device_interval: Duration::ZERO,
        device_code_lifetime: Duration::from_millis(100),
        refuse_device_scopes: vec!["https://mail.google.com/".to_string()],
        ..Default::default()
    })
    .await
    .unwrap();
    let (status, body) = start_device(&provider, "openid https://mail.google.com/").await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_scope"))
    );
    let (status, body) = start_device(&provider, "openid email").await;
    assert_eq!(status, 200);
    assert_eq!(body["expires_in"], 1);
    let device_code = body["device_code"].as_str().unwrap().to_string();
    let user_code = body["user_code"].as_str().unwrap().to_string();
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(provider.pending_device_codes().is_empty());
    assert!(!provider.approve_device(&user_code, "x@example.com"));
    let (status, body) = poll(&provider, &device_code).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("expired_token"))
    );
}

#[tokio::test]
async fn oauth2_crate_device_flow() {
    use oauth2::basic::BasicClient;
    use oauth2::{
        ClientId, DeviceAuthorizationUrl, Scope, StandardDeviceAuthorizationResponse,
        TokenResponse, TokenUrl,
    };

    let provider = Provider::start(ProviderOptions {
        device_interval: Duration::ZERO,
        ..Default::default()
    })
    .await
    .unwrap();
    let client = BasicClient::new(ClientId::new("mailbridge-test".to_string()))
        .set_token_uri(TokenUrl::new(provider.token_url()).unwrap())
        .set_device_authorization_url(
            DeviceAuthorizationUrl::new(provider.device_authorization_url()).unwrap(),
        );
    let details: StandardDeviceAuthorizationResponse = client
        .exchange_device_code()
        .add_scope(Scope::new("mail".to_string()))
        .request_async(&http())
        .await
        .expect("device authorization through the oauth2 crate");
    assert_eq!(details.interval(), Duration::ZERO);
    // The user approves while the crate polls (pending, then a forced
    // slow_down, then success).
    provider.force_slow_down(1);
    let approver = {
        let provider = provider.clone();
        let user_code = details.user_code().secret().clone();
        tokio::spawn(async move {
            while provider.token_requests() < 3 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            assert!(provider.approve_device(&user_code, "ivy@example.com"));
        })
    };
    let started = Instant::now();
    let token = client
        .exchange_device_access_token(&details)
        .request_async(
            &http(),
            |d| tokio::time::sleep(d.min(Duration::from_millis(20))),
            None,
        )
        .await
        .expect("device token through the oauth2 crate");
    approver.await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(5));
    provider
        .validator()
        .validate(token.access_token().secret(), "ivy@example.com")
        .unwrap();
    assert!(token.refresh_token().is_some());

    // A denial surfaces as access_denied.
    let details: StandardDeviceAuthorizationResponse = client
        .exchange_device_code()
        .request_async(&http())
        .await
        .unwrap();
    assert!(provider.deny_device(details.user_code().secret()));
    let err = client
        .exchange_device_access_token(&details)
        .request_async(&http(), tokio::time::sleep, None)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("access_denied"), "{err}");
}

// ---------------------------------------------------------------------------
// JWT bearer grant (RFC 7523, service accounts)

fn sa_claims(provider: &Provider) -> serde_json::Value {
    let now = now_secs();
    json!({
        "iss": SA,
        "sub": "frank@example.com",
        "scope": "https://mail.google.com/",
        "aud": provider.token_url(),
        "iat": now,
        "exp": now + 3600,
    })
}

async fn jwt_grant(provider: &Provider, assertion: &str) -> (u16, serde_json::Value) {
    post_form(
        &provider.token_url(),
        &[("grant_type", JWT_BEARER_GRANT), ("assertion", assertion)],
    )
    .await
}

#[tokio::test]
async fn jwt_bearer_grant_verifies_signature_and_claims() {
    let provider = Provider::start(ProviderOptions::default()).await.unwrap();
    provider.register_service_account(SA, TEST_PUB).unwrap();

    let assertion = sign_rs256(TEST_KEY, &rs256_header(), &sa_claims(&provider));
    let (status, body) = jwt_grant(&provider, &assertion).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.get("refresh_token").is_none());
    assert_eq!(body["scope"], "https://mail.google.com/");
    assert_eq!(body["expires_in"], 3600);
    let at = body["access_token"].as_str().unwrap();
    provider
        .validator()
        .validate(at, "frank@example.com")
        .unwrap();
    assert_eq!(
        provider
            .validator()
            .validate(at, "x@example.com")
            .unwrap_err()
            .status,
        "400"
    );

    let refused = |claims: serde_json::Value, key: &'static str, why: &'static str| {
        let provider = provider.clone();
        async move {
            let assertion = sign_rs256(key, &rs256_header(), &claims);
            let (status, body) = jwt_grant(&provider, &assertion).await;
            assert_eq!(
                (status, body["error"].as_str()),
                (400, Some("invalid_grant")),
                "{body}"
            );
            let description = body["error_description"].as_str().unwrap();
            assert!(description.contains(why), "{why}: {description}");
            assert!(!body.to_string().contains(&assertion));
        }
    };
    refused(sa_claims(&provider), OTHER_KEY, "bad signature").await;
    let now = now_secs();
    let mut c = sa_claims(&provider);
    c["iat"] = json!(now - 7200);
    c["exp"] = json!(now - 3600);
    refused(c, TEST_KEY, "expired").await;
    let mut c = sa_claims(&provider);
    c["aud"] = json!("https://oauth2.googleapis.com/token");
    refused(c, TEST_KEY, "wrong audience").await;
    let mut c = sa_claims(&provider);
    c["aud"] = json!(format!("{}/", provider.token_url()));
    refused(c, TEST_KEY, "wrong audience").await;
    let mut c = sa_claims(&provider);
    c["iss"] = json!("stranger@project.iam.gserviceaccount.com");
    refused(c, TEST_KEY, "unknown issuer").await;
    let mut c = sa_claims(&provider);
    c["exp"] = json!(now + 3700);
    refused(c, TEST_KEY, "more than an hour").await;
    let mut c = sa_claims(&provider);
    c["iat"] = json!(now + 300);
    c["exp"] = json!(now + 600);
    refused(c, TEST_KEY, "in the future").await;
    let mut c = sa_claims(&provider);
    c.as_object_mut().unwrap().remove("iat");
    refused(c, TEST_KEY, "iat").await;

    // A signature over other claims: the sub was swapped after signing.
    let parts: Vec<&str> = assertion.split('.').collect();
    let mut c = sa_claims(&provider);
    c["sub"] = json!("mallory@example.com");
    let forged = format!("{}.{}.{}", parts[0], b64json(&c), parts[2]);
    let (_, body) = jwt_grant(&provider, &forged).await;
    assert_eq!(body["error"], "invalid_grant");
    assert!(
        body["error_description"]
            .as_str()
            .unwrap()
            .contains("bad signature")
    );
    // alg none and HS256 are refused outright.
    let unsigned = format!(
        "{}.{}.",
        b64json(&json!({"alg": "none", "typ": "JWT"})),
        b64json(&sa_claims(&provider))
    );
    let (_, body) = jwt_grant(&provider, &unsigned).await;
    assert_eq!(body["error"], "invalid_grant");
    assert!(
        body["error_description"]
            .as_str()
            .unwrap()
            .contains("RS256")
    );
    let (_, body) = jwt_grant(&provider, "not-a-jwt").await;
    assert_eq!(body["error"], "invalid_grant");

    // No scope at all.
    let mut c = sa_claims(&provider);
    c.as_object_mut().unwrap().remove("scope");
    let (_, body) = jwt_grant(&provider, &sign_rs256(TEST_KEY, &rs256_header(), &c)).await;
    assert_eq!(body["error"], "invalid_scope");
    // Without sub the token is the service account's own.
    let mut c = sa_claims(&provider);
    c.as_object_mut().unwrap().remove("sub");
    let (status, body) = jwt_grant(&provider, &sign_rs256(TEST_KEY, &rs256_header(), &c)).await;
    assert_eq!(status, 200);
    provider
        .validator()
        .validate(body["access_token"].as_str().unwrap(), SA)
        .unwrap();
    // A second key for the same account works too.
    provider.register_service_account(SA, OTHER_PUB).unwrap();
    let (status, _) = jwt_grant(
        &provider,
        &sign_rs256(OTHER_KEY, &rs256_header(), &sa_claims(&provider)),
    )
    .await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn key_registration_refuses_what_is_not_an_rsa_public_key() {
    let provider = Provider::start(ProviderOptions::default()).await.unwrap();
    assert!(provider.register_service_account(SA, "garbage").is_err());
    assert!(provider.register_service_account(SA, TEST_KEY).is_err());
    assert!(provider.register_client_key("").is_err());
    // An EC key in an SPKI PEM.
    let ec = rcgen::KeyPair::generate().unwrap().public_key_pem();
    let err = provider.register_client_key(&ec).unwrap_err();
    assert!(err.to_string().contains("rsaEncryption"), "{err}");
    // A truncated SPKI.
    let der =
        rustls_pki_types::SubjectPublicKeyInfoDer::from_pem_slice(TEST_PUB.as_bytes()).unwrap();
    let short = &der.as_ref()[..der.as_ref().len() - 1];
    let pem = format!(
        "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
        STANDARD.encode(short)
    );
    assert!(provider.register_client_key(&pem).is_err());
    provider.register_client_key(TEST_PUB).unwrap();
}

// ---------------------------------------------------------------------------
// Private-key JWT client authentication (RFC 7523 section 2.2)

fn client_assertion(provider: &Provider, key: &str, jti: &str) -> String {
    let now = now_secs();
    sign_rs256(
        key,
        &json!({ "alg": "RS256", "typ": "JWT", "x5t": "hOBcHZi846VCHSJbFAs26Go9VTQ" }),
        &json!({
            "iss": "mailbridge-test",
            "sub": "mailbridge-test",
            "aud": provider.token_url(),
            "jti": jti,
            "nbf": now,
            "exp": now + 600,
        }),
    )
}

#[tokio::test]
async fn private_key_jwt_client_authentication() {
    let provider = Provider::start(ProviderOptions::default()).await.unwrap();
    provider.register_client_key(TEST_PUB).unwrap();
    let cc = |assertion: String| {
        let provider = provider.clone();
        async move {
            post_form(
                &provider.token_url(),
                &[
                    ("grant_type", "client_credentials"),
                    ("scope", "https://outlook.office365.com/.default"),
                    ("client_assertion_type", JWT_CLIENT_ASSERTION_TYPE),
                    ("client_assertion", &assertion),
                ],
            )
            .await
        }
    };
    let assertion = client_assertion(&provider, TEST_KEY, "jti-1");
    let (status, body) = cc(assertion.clone()).await;
    assert_eq!(status, 200, "{body}");
    provider
        .validator()
        .validate(body["access_token"].as_str().unwrap(), "anyone@example.com")
        .unwrap();
    // Replayed.
    let (status, body) = cc(assertion).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("invalid_client"))
    );
    assert!(body["error_description"].as_str().unwrap().contains("jti"));
    // Wrong key.
    let (status, body) = cc(client_assertion(&provider, OTHER_KEY, "jti-2")).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("invalid_client"))
    );
    assert!(
        body["error_description"]
            .as_str()
            .unwrap()
            .contains("bad signature")
    );
    // Wrong audience, expired, iss != sub.
    let now = now_secs();
    for claims in [
        json!({"iss": "mailbridge-test", "sub": "mailbridge-test", "jti": "a",
               "aud": "https://login.microsoftonline.com/t/oauth2/v2.0/token", "exp": now + 60}),
        json!({"iss": "mailbridge-test", "sub": "mailbridge-test", "jti": "b",
               "aud": provider.token_url(), "exp": now - 1}),
        json!({"iss": "mailbridge-test", "sub": "someone", "jti": "c",
               "aud": provider.token_url(), "exp": now + 60}),
        json!({"iss": "mailbridge-test", "sub": "mailbridge-test",
               "aud": provider.token_url(), "exp": now + 60}),
    ] {
        let (status, body) = cc(sign_rs256(TEST_KEY, &rs256_header(), &claims)).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (401, Some("invalid_client")),
            "{claims}"
        );
    }
    // The wrong assertion type, or a secret besides the assertion.
    let (status, body) = post_form(
        &provider.token_url(),
        &[
            ("grant_type", "client_credentials"),
            ("client_assertion_type", "urn:example:saml"),
            (
                "client_assertion",
                &client_assertion(&provider, TEST_KEY, "d"),
            ),
        ],
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("invalid_client"))
    );
    let (status, body) = post_form(
        &provider.token_url(),
        &[
            ("grant_type", "client_credentials"),
            ("client_secret", "x"),
            ("client_assertion_type", JWT_CLIENT_ASSERTION_TYPE),
            (
                "client_assertion",
                &client_assertion(&provider, TEST_KEY, "e"),
            ),
        ],
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_request"))
    );
    // Without the assertion the client is public: no client credentials.
    let (status, body) = post_form(
        &provider.token_url(),
        &[
            ("grant_type", "client_credentials"),
            ("client_id", "mailbridge-test"),
        ],
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("unauthorized_client"))
    );
    // The assertion authenticates other grants too.
    let rt = provider.issue_refresh_token("a@example.com", "s");
    let (status, body) = post_form(
        &provider.token_url(),
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", &rt),
            ("client_id", "mailbridge-test"),
            ("client_assertion_type", JWT_CLIENT_ASSERTION_TYPE),
            (
                "client_assertion",
                &client_assertion(&provider, TEST_KEY, "f"),
            ),
        ],
    )
    .await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn oauth2_crate_client_credentials_with_client_assertion() {
    use oauth2::basic::BasicClient;
    use oauth2::{ClientId, Scope, TokenResponse, TokenUrl};

    let provider = Provider::start(ProviderOptions::default()).await.unwrap();
    provider.register_client_key(TEST_PUB).unwrap();
    let client = BasicClient::new(ClientId::new("mailbridge-test".to_string()))
        .set_token_uri(TokenUrl::new(provider.token_url()).unwrap());
    let token = client
        .exchange_client_credentials()
        .add_scope(Scope::new(
            "https://outlook.office365.com/.default".to_string(),
        ))
        .add_extra_param("client_assertion_type", JWT_CLIENT_ASSERTION_TYPE)
        .add_extra_param(
            "client_assertion",
            client_assertion(&provider, TEST_KEY, "crate-1"),
        )
        .request_async(&http())
        .await
        .expect("client credentials with a client assertion through the oauth2 crate");
    provider
        .validator()
        .validate(token.access_token().secret(), "shared@example.com")
        .unwrap();
    let err = client
        .exchange_client_credentials()
        .add_extra_param("client_assertion_type", JWT_CLIENT_ASSERTION_TYPE)
        .add_extra_param(
            "client_assertion",
            client_assertion(&provider, OTHER_KEY, "crate-2"),
        )
        .request_async(&http())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("invalid_client"), "{err}");
}

// ---------------------------------------------------------------------------
// Resource owner password grant

#[tokio::test]
async fn password_grant() {
    let provider = Provider::start(ProviderOptions {
        allow_password_grant: true,
        ..Default::default()
    })
    .await
    .unwrap();
    provider.add_user("Gina@example.com", "hunter2 hunter2");
    let pw = |user: &'static str, password: &'static str, client: &'static str| {
        let provider = provider.clone();
        async move {
            post_form(
                &provider.token_url(),
                &[
                    ("grant_type", "password"),
                    ("username", user),
                    ("password", password),
                    ("scope", "imap"),
                    ("client_id", client),
                ],
            )
            .await
        }
    };
    let (status, body) = pw("gina@example.com", "hunter2 hunter2", "mailbridge-test").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["scope"], "imap");
    provider
        .validator()
        .validate(body["access_token"].as_str().unwrap(), "gina@example.com")
        .unwrap();
    assert!(body["refresh_token"].is_string());
    let (status, body) = pw("gina@example.com", "hunter3", "mailbridge-test").await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_grant"))
    );
    assert!(!body.to_string().contains("hunter"));
    let (_, body) = pw("nobody@example.com", "hunter2 hunter2", "mailbridge-test").await;
    assert_eq!(body["error"], "invalid_grant");
    let (status, body) = pw("gina@example.com", "hunter2 hunter2", "open").await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("unauthorized_client"))
    );
}

#[tokio::test]
async fn oauth2_crate_password_grant() {
    use oauth2::basic::BasicClient;
    use oauth2::{
        ClientId, ClientSecret, ResourceOwnerPassword, ResourceOwnerUsername, TokenResponse,
        TokenUrl,
    };

    let provider = Provider::start(ProviderOptions {
        allow_password_grant: true,
        client_secret: Some("s".to_string()),
        ..Default::default()
    })
    .await
    .unwrap();
    provider.add_user("hal@example.com", "pässword");
    let client = BasicClient::new(ClientId::new("mailbridge-test".to_string()))
        .set_client_secret(ClientSecret::new("s".to_string()))
        .set_token_uri(TokenUrl::new(provider.token_url()).unwrap());
    let token = client
        .exchange_password(
            &ResourceOwnerUsername::new("hal@example.com".to_string()),
            &ResourceOwnerPassword::new("pässword".to_string()),
        )
        .request_async(&http())
        .await
        .expect("password grant through the oauth2 crate");
    provider
        .validator()
        .validate(token.access_token().secret(), "hal@example.com")
        .unwrap();
    assert!(token.refresh_token().is_some());
    let err = client
        .exchange_password(
            &ResourceOwnerUsername::new("hal@example.com".to_string()),
            &ResourceOwnerPassword::new("password".to_string()),
        )
        .request_async(&http())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("invalid_grant"), "{err}");
}

// ---------------------------------------------------------------------------
// Dynamic client registration (RFC 7591)

async fn register(provider: &Provider, meta: &serde_json::Value) -> (u16, serde_json::Value) {
    let resp = http()
        .post(provider.registration_url())
        .json(meta)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    if status == 201 {
        assert_eq!(resp.headers()[header::CACHE_CONTROL], "no-store");
    }
    (status, resp.json().await.unwrap())
}

fn pkce_query<'a>(
    client_id: &'a str,
    redirect_uri: &'a str,
    challenge: &'a str,
) -> Vec<(&'a str, &'a str)> {
    vec![
        ("response_type", "code"),
        ("client_id", client_id),
        ("redirect_uri", redirect_uri),
        ("scope", "IMAP SMTP"),
        ("state", "xyz"),
        ("code_challenge", challenge),
        ("code_challenge_method", "S256"),
    ]
}

#[tokio::test]
async fn dynamic_registration_and_use() {
    let provider = Provider::start(ProviderOptions::default()).await.unwrap();
    let (status, body) = register(
        &provider,
        &json!({
            "redirect_uris": ["http://127.0.0.1:1234/callback", "https://app.example/cb"],
            "token_endpoint_auth_method": "none",
            "grant_types": ["authorization_code", "refresh_token"],
            "response_types": ["code"],
            "client_name": "mailbridge",
        }),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let client_id = body["client_id"].as_str().unwrap().to_string();
    assert!(client_id.len() >= 20);
    assert!(body["client_id_issued_at"].as_u64().unwrap() > 1_600_000_000);
    assert_eq!(body["token_endpoint_auth_method"], "none");
    assert_eq!(
        body["grant_types"],
        json!(["authorization_code", "refresh_token"])
    );
    assert_eq!(body["redirect_uris"][0], "http://127.0.0.1:1234/callback");
    assert_eq!(body["client_name"], "mailbridge");
    assert_eq!(provider.registered_clients(), vec![client_id.clone()]);

    let verifier = "r".repeat(60);
    let challenge = pkce_s256(&verifier);
    // Loopback: any port (RFC 8252 section 7.3); path must match.
    let redirect = "http://127.0.0.1:5555/callback";
    let (status, params) =
        authorize(&provider, &pkce_query(&client_id, redirect, &challenge)).await;
    assert_eq!(status, 302);
    assert_eq!(params["_base"], redirect);
    let code = params["code"].clone();
    for wrong in [
        "http://127.0.0.1:5555/other",
        "http://localhost:1234/callback",
        "https://app.example/cb2",
        "https://evil.example/cb",
    ] {
        let (status, params) =
            authorize(&provider, &pkce_query(&client_id, wrong, &challenge)).await;
        assert_eq!(status, 400, "{wrong}");
        assert!(params.is_empty());
    }
    let (status, _) = authorize(
        &provider,
        &pkce_query(&client_id, "https://app.example/cb", &challenge),
    )
    .await;
    assert_eq!(status, 302);

    // The code is bound to the client.
    let exchange = |client: &'static str| {
        let (provider, code, verifier, client_id) = (
            provider.clone(),
            code.clone(),
            verifier.clone(),
            client_id.clone(),
        );
        async move {
            let client = if client.is_empty() {
                client_id.as_str()
            } else {
                client
            };
            post_form(
                &provider.token_url(),
                &[
                    ("grant_type", "authorization_code"),
                    ("code", &code),
                    ("redirect_uri", redirect),
                    ("code_verifier", &verifier),
                    ("client_id", client),
                ],
            )
            .await
        }
    };
    let (status, body) = exchange("mailbridge-test").await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_grant"))
    );
    let (status, body) = exchange("").await;
    assert_eq!(status, 200, "{body}");
    let rt = body["refresh_token"].as_str().unwrap().to_string();
    // Its refresh token works for it alone, and never with a secret.
    let (status, body) = refresh(&provider, &rt).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_grant"))
    );
    let (status, body) = post_form(
        &provider.token_url(),
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", &rt),
            ("client_id", &client_id),
            ("client_secret", "guess"),
        ],
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("invalid_client"))
    );
    let (status, body) = post_form(
        &provider.token_url(),
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", &rt),
            ("client_id", &client_id),
        ],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    // A public client has no client credentials grant.
    let (status, body) = post_form(
        &provider.token_url(),
        &[
            ("grant_type", "client_credentials"),
            ("client_id", &client_id),
        ],
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("unauthorized_client"))
    );
}

#[tokio::test]
async fn dynamic_registration_without_refresh_grant_gets_no_refresh_token() {
    let provider = Provider::start(ProviderOptions::default()).await.unwrap();
    let (status, body) = register(
        &provider,
        &json!({
            "redirect_uris": ["http://[::1]/cb"],
            "token_endpoint_auth_method": "none",
        }),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["grant_types"], json!(["authorization_code"]));
    assert_eq!(body["response_types"], json!(["code"]));
    let client_id = body["client_id"].as_str().unwrap().to_string();
    let verifier = "q".repeat(43);
    let challenge = pkce_s256(&verifier);
    let redirect = "http://[::1]:40000/cb";
    let (status, params) =
        authorize(&provider, &pkce_query(&client_id, redirect, &challenge)).await;
    assert_eq!(status, 302);
    let (status, body) = post_form(
        &provider.token_url(),
        &[
            ("grant_type", "authorization_code"),
            ("code", &params["code"]),
            ("redirect_uri", redirect),
            ("code_verifier", &verifier),
            ("client_id", &client_id),
        ],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(body.get("refresh_token").is_none());
}

#[tokio::test]
async fn dynamic_registration_refuses_bad_metadata() {
    let provider = Provider::start(ProviderOptions::default()).await.unwrap();
    let good = json!({
        "redirect_uris": ["http://127.0.0.1/cb"],
        "token_endpoint_auth_method": "none",
        "grant_types": ["authorization_code", "refresh_token"],
        "response_types": ["code"],
    });
    let with = |key: &str, value: serde_json::Value| {
        let mut meta = good.clone();
        meta[key] = value;
        meta
    };
    let without = |key: &str| {
        let mut meta = good.clone();
        meta.as_object_mut().unwrap().remove(key);
        meta
    };
    for (meta, error) in [
        (
            without("token_endpoint_auth_method"),
            "invalid_client_metadata",
        ),
        (
            with("token_endpoint_auth_method", json!("client_secret_basic")),
            "invalid_client_metadata",
        ),
        (
            with("grant_types", json!(["client_credentials"])),
            "invalid_client_metadata",
        ),
        (
            with("grant_types", json!("authorization_code")),
            "invalid_client_metadata",
        ),
        (with("grant_types", json!([])), "invalid_client_metadata"),
        (
            with("response_types", json!(["token"])),
            "invalid_client_metadata",
        ),
        (with("response_types", json!([])), "invalid_client_metadata"),
        (with("client_name", json!(7)), "invalid_client_metadata"),
        (json!(["not", "an", "object"]), "invalid_client_metadata"),
        (without("redirect_uris"), "invalid_redirect_uri"),
        (with("redirect_uris", json!([])), "invalid_redirect_uri"),
        (
            with("redirect_uris", json!(["http://example.com/cb"])),
            "invalid_redirect_uri",
        ),
        (
            with("redirect_uris", json!(["http://127.0.0.1/cb#frag"])),
            "invalid_redirect_uri",
        ),
        (
            with("redirect_uris", json!(["/relative"])),
            "invalid_redirect_uri",
        ),
        (with("redirect_uris", json!([5])), "invalid_redirect_uri"),
    ] {
        let (status, body) = register(&provider, &meta).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (400, Some(error)),
            "{meta}"
        );
    }
    // Not JSON at all.
    let resp = http()
        .post(provider.registration_url())
        .form(&[("redirect_uris", "http://127.0.0.1/cb")])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "invalid_client_metadata");
    assert!(provider.registered_clients().is_empty());
    // A device-only public client is fine.
    let (status, body) = register(
        &provider,
        &json!({
            "token_endpoint_auth_method": "none",
            "grant_types": [DEVICE_CODE_GRANT, "refresh_token"],
            "response_types": [],
        }),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = post_form(
        &provider.device_authorization_url(),
        &[("client_id", body["client_id"].as_str().unwrap())],
    )
    .await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn oauth2_crate_registered_client_authorization_code() {
    use oauth2::basic::BasicClient;
    use oauth2::{
        AuthUrl, AuthorizationCode, ClientId, CsrfToken, PkceCodeChallenge, RedirectUrl, Scope,
        TokenResponse, TokenUrl,
    };

    let provider = Provider::start(ProviderOptions::default()).await.unwrap();
    let (_, body) = register(
        &provider,
        &json!({
            "redirect_uris": ["http://127.0.0.1/oauth"],
            "token_endpoint_auth_method": "none",
            "grant_types": ["authorization_code", "refresh_token"],
        }),
    )
    .await;
    let client = BasicClient::new(ClientId::new(
        body["client_id"].as_str().unwrap().to_string(),
    ))
    .set_auth_uri(AuthUrl::new(provider.authorize_url()).unwrap())
    .set_token_uri(TokenUrl::new(provider.token_url()).unwrap())
    .set_redirect_uri(RedirectUrl::new("http://127.0.0.1:61234/oauth".to_string()).unwrap());
    let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
    let (url, _) = client
        .authorize_url(CsrfToken::new_random)
        .add_scope(Scope::new("IMAP".to_string()))
        .add_extra_param("username", "jo@example.com")
        .set_pkce_challenge(challenge)
        .url();
    let code = code_from_redirect(&url).await;
    let token = client
        .exchange_code(AuthorizationCode::new(code))
        .set_pkce_verifier(verifier)
        .request_async(&http())
        .await
        .expect("code exchange for a registered client");
    provider
        .validator()
        .validate(token.access_token().secret(), "jo@example.com")
        .unwrap();
    assert!(token.refresh_token().is_some());
}

async fn code_from_redirect(url: &impl std::fmt::Display) -> String {
    let resp = http().get(url.to_string()).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 302);
    let location = resp.headers()[header::LOCATION]
        .to_str()
        .unwrap()
        .to_string();
    let query = location.split_once('?').unwrap().1;
    query
        .split('&')
        .find_map(|p| p.strip_prefix("code="))
        .map(|c| form_decode(c).unwrap())
        .unwrap_or_else(|| panic!("no code in {location}"))
}

// ---------------------------------------------------------------------------
// The open public-client profile

#[tokio::test]
async fn open_profile_client_and_rotation() {
    // Rotation is off for other clients, yet mandatory for `open`.
    let provider = Provider::start(ProviderOptions {
        rotate_refresh_tokens: false,
        ..Default::default()
    })
    .await
    .unwrap();
    let verifier = "o".repeat(43);
    let challenge = pkce_s256(&verifier);
    let redirect = "http://127.0.0.1:49152/";
    let mut q = pkce_query("open", redirect, &challenge);
    q.push(("username", "kim@example.com"));
    let (status, params) = authorize(&provider, &q).await;
    assert_eq!(status, 302);
    assert_eq!(params["state"], "xyz");
    let (status, body) = post_form(
        &provider.token_url(),
        &[
            ("grant_type", "authorization_code"),
            ("code", &params["code"]),
            ("redirect_uri", redirect),
            ("code_verifier", &verifier),
            ("client_id", "open"),
        ],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["expires_in"], 3600);
    provider
        .validator()
        .validate(body["access_token"].as_str().unwrap(), "kim@example.com")
        .unwrap();
    let mut rt = body["refresh_token"].as_str().unwrap().to_string();
    for _ in 0..2 {
        let (status, body) = post_form(
            &provider.token_url(),
            &[
                ("grant_type", "refresh_token"),
                ("refresh_token", &rt),
                ("client_id", "open"),
            ],
        )
        .await;
        assert_eq!(status, 200, "{body}");
        assert!(body["expires_in"].is_u64());
        let new = body["refresh_token"].as_str().unwrap().to_string();
        assert_ne!(new, rt);
        rt = new;
    }
    // Refresh tokens of open are not the configured client's, and back.
    let (status, body) = refresh(&provider, &rt).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_grant"))
    );
    let mine = provider.issue_refresh_token("kim@example.com", "IMAP");
    let (status, body) = post_form(
        &provider.token_url(),
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", &mine),
            ("client_id", "open"),
        ],
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_grant"))
    );
    let seeded = provider.issue_refresh_token_for("open", "kim@example.com", "IMAP");
    let (status, _) = post_form(
        &provider.token_url(),
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", &seeded),
            ("client_id", "open"),
        ],
    )
    .await;
    assert_eq!(status, 200);
    // open has no secret to send.
    let (status, body) = post_form(
        &provider.token_url(),
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", &rt),
            ("client_id", "open"),
            ("client_secret", "open"),
        ],
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("invalid_client"))
    );
    // Only loopback redirects.
    for wrong in [
        "https://app.example/cb",
        "http://192.0.2.1:80/cb",
        "http://127.0.0.1:1/#x",
    ] {
        let (status, params) = authorize(&provider, &pkce_query("open", wrong, &challenge)).await;
        assert_eq!(status, 400, "{wrong}");
        assert!(params.is_empty());
    }
    // PKCE stays mandatory.
    let (status, params) = authorize(
        &provider,
        &[
            ("response_type", "code"),
            ("client_id", "open"),
            ("redirect_uri", redirect),
            ("state", "s1"),
        ],
    )
    .await;
    assert_eq!((status, params["error"].as_str()), (302, "invalid_request"));
}

#[tokio::test]
async fn open_profile_can_be_switched_off() {
    let provider = Provider::start(ProviderOptions {
        open_profile: false,
        ..Default::default()
    })
    .await
    .unwrap();
    let challenge = pkce_s256(&"o".repeat(43));
    let (status, _) = authorize(
        &provider,
        &pkce_query("open", "http://127.0.0.1:5/", &challenge),
    )
    .await;
    assert_eq!(status, 400);
    let (status, body) = post_form(
        &provider.token_url(),
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", "x"),
            ("client_id", "open"),
        ],
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("invalid_client"))
    );
}

#[tokio::test]
async fn open_profile_authorization_errors() {
    let provider = Provider::start(ProviderOptions::default()).await.unwrap();
    let challenge = pkce_s256(&"o".repeat(43));
    let redirect = "http://localhost:8080/done";
    let run = |user: &'static str| {
        let provider = provider.clone();
        let challenge = challenge.clone();
        async move {
            let mut q = pkce_query("open", redirect, &challenge);
            q.push(("username", user));
            authorize(&provider, &q).await
        }
    };
    for code in OPEN_PROFILE_ERRORS {
        provider.fail_authorization("Lee@example.com", code);
        let (status, params) = run("lee@example.com").await;
        assert_eq!(status, 302);
        assert_eq!(params["_base"], redirect);
        assert_eq!(params["error"], code);
        assert!(params["error_description"].len() > 10, "{params:?}");
        assert_eq!(params["state"], "xyz");
        assert!(!params.contains_key("code"));
    }
    // Other users are unaffected; clearing the failure restores consent.
    let (_, params) = run("other@example.com").await;
    assert!(params.contains_key("code"));
    provider.clear_authorization_failure("lee@example.com");
    let (_, params) = run("lee@example.com").await;
    assert!(params.contains_key("code"));
}

#[tokio::test]
async fn oauth2_crate_open_profile() {
    use oauth2::basic::BasicClient;
    use oauth2::{
        AuthUrl, AuthorizationCode, ClientId, CsrfToken, PkceCodeChallenge, RedirectUrl,
        RefreshToken, Scope, TokenResponse, TokenUrl,
    };

    let provider = Provider::start(ProviderOptions::default()).await.unwrap();
    let client = BasicClient::new(ClientId::new("open".to_string()))
        .set_auth_uri(AuthUrl::new(provider.authorize_url()).unwrap())
        .set_token_uri(TokenUrl::new(provider.token_url()).unwrap())
        .set_redirect_uri(RedirectUrl::new("http://127.0.0.1:33333/".to_string()).unwrap());
    let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
    let (url, _) = client
        .authorize_url(CsrfToken::new_random)
        .add_scope(Scope::new("urn:ietf:params:oauth:scope:mail".to_string()))
        .add_scope(Scope::new("offline_access".to_string()))
        .add_extra_param("username", "max@example.com")
        .set_pkce_challenge(challenge)
        .url();
    let code = code_from_redirect(&url).await;
    let token = client
        .exchange_code(AuthorizationCode::new(code))
        .set_pkce_verifier(verifier)
        .request_async(&http())
        .await
        .expect("open profile code exchange");
    assert!(token.expires_in().is_some());
    let rt = token.refresh_token().unwrap().clone();
    let renewed = client
        .exchange_refresh_token(&rt)
        .request_async(&http())
        .await
        .expect("open profile refresh");
    assert_ne!(renewed.refresh_token().unwrap().secret(), rt.secret());
    provider
        .validator()
        .validate(renewed.access_token().secret(), "max@example.com")
        .unwrap();
    let err = client
        .exchange_refresh_token(&RefreshToken::new(rt.secret().clone()))
        .request_async(&http())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("invalid_grant"), "{err}");
}

// ---------------------------------------------------------------------------
// JWT-shaped access tokens

#[tokio::test]
async fn jwt_shaped_access_tokens() {
    let provider = Provider::start(ProviderOptions {
        access_token_audience: Some("https://outlook.office.com".to_string()),
        client_secret: Some("s".to_string()),
        ..Default::default()
    })
    .await
    .unwrap();
    let rt = provider.issue_refresh_token("nia@example.com", "IMAP.AccessAsUser.All");
    let (status, body, _) = post_token(
        &provider,
        &[("grant_type", "refresh_token"), ("refresh_token", &rt)],
        Some(("mailbridge-test", "s")),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let at = body["access_token"].as_str().unwrap();
    assert_eq!(at.split('.').count(), 3);
    let claims = decode_claims(at);
    assert_eq!(claims["aud"], "https://outlook.office.com");
    assert_eq!(claims["sub"], "nia@example.com");
    assert_eq!(claims["scp"], "IMAP.AccessAsUser.All");
    assert_eq!(claims["iss"], provider.base_url());
    let exp = claims["exp"].as_i64().unwrap();
    assert!((exp - now_secs() - 3600).abs() <= 2, "{claims}");
    provider
        .validator()
        .validate(at, "nia@example.com")
        .unwrap();
    // A forged token of the same shape is unknown.
    let forged = format!("{}.{}", at.rsplit_once('.').unwrap().0, random_token());
    assert_eq!(
        provider
            .validator()
            .validate(&forged, "nia@example.com")
            .unwrap_err()
            .status,
        "401"
    );
    // App-only tokens carry the client id as sub.
    let (_, body, _) = post_token(
        &provider,
        &[
            ("grant_type", "client_credentials"),
            ("scope", "https://outlook.office365.com/.default"),
        ],
        Some(("mailbridge-test", "s")),
    )
    .await;
    let claims = decode_claims(body["access_token"].as_str().unwrap());
    assert_eq!(claims["sub"], "mailbridge-test");

    // Switched to a Graph audience, then back to opaque.
    provider.set_access_token_audience(Some("00000003-0000-0000-c000-000000000000".to_string()));
    let at = provider.issue_access_token("nia@example.com", "Mail.Read", Duration::from_secs(60));
    assert_eq!(
        decode_claims(&at)["aud"],
        "00000003-0000-0000-c000-000000000000"
    );
    provider.set_access_token_audience(None);
    let at = provider.issue_access_token("nia@example.com", "x", Duration::from_secs(60));
    assert!(!at.contains('.'));
    provider
        .validator()
        .validate(&at, "nia@example.com")
        .unwrap();
}

#[tokio::test]
async fn oauth2_crate_reads_jwt_shaped_token() {
    use oauth2::basic::BasicClient;
    use oauth2::{ClientId, RefreshToken, TokenResponse, TokenUrl};

    let provider = Provider::start(ProviderOptions::default()).await.unwrap();
    provider.set_access_token_audience(Some("https://outlook.office365.com".to_string()));
    let client = BasicClient::new(ClientId::new("mailbridge-test".to_string()))
        .set_token_uri(TokenUrl::new(provider.token_url()).unwrap());
    let rt = provider.issue_refresh_token("olga@example.com", "IMAP");
    let token = client
        .exchange_refresh_token(&RefreshToken::new(rt))
        .request_async(&http())
        .await
        .unwrap();
    let claims = decode_claims(token.access_token().secret());
    assert_eq!(claims["aud"], "https://outlook.office365.com");
    provider
        .validator()
        .validate(token.access_token().secret(), "olga@example.com")
        .unwrap();
}
