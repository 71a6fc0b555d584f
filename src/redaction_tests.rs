//! Every type outside the protocol crate that can hold a bearer token,
//! refresh token, client secret, authorization code, key or password
//! prints it redacted under `{:?}`: each is built here with a known
//! secret and its Debug output searched for it. (The parsed redirect and
//! its authorization code are checked in `oauth::flows`, where they live.)

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use secrecy::SecretString;

use crate::authorize::{AuthorizeOptions, Authorized, Interaction};
use crate::config::{Config, ProviderConfig, Settings};
use crate::oauth::AccessToken;
use crate::oauth::app::endpoints;
use crate::oauth::flows::{Obtained, ServiceAccountKey};
use crate::store::seal::{GrantData, SealKey, SharedAccess};
use crate::store::{AccountMeta, KdfParams, SledStore, TokenStore};
use crate::vault::{BackoffPolicy, Vault};

const CLIENT_SECRET: &str = "client-secret-7f3a";
const REFRESH_TOKEN: &str = "refresh-token-91bc";
const ACCESS_TOKEN: &str = "access-token-d04e";
const PASSWORD: &str = "local-password-55aa";
const UPSTREAM_PASSWORD: &str = "upstream-password-c3c3";
const PRIVATE_KEY: &str = "-----BEGIN PRIVATE KEY-----private-key-e1e1";

const CONFIG: &str = r#"
[server]
store = "postgres://mb:local-password-55aa@db.example/mail?sslmode=require"

[[listener]]
protocol = "imap"
bind = "127.0.0.1:1143"

[providers.corp]
preset = "custom"
client_id = "id"
client_secret = "client-secret-7f3a"
token_url = "https://idp.example/token"
imap = { host = "imap.example" }

[[account]]
user = "alice@example.com"
provider = "corp"
"#;

/// Fails naming the secret and where it showed.
fn assert_hidden(what: &str, printed: &str) {
    for secret in [
        CLIENT_SECRET,
        REFRESH_TOKEN,
        ACCESS_TOKEN,
        PASSWORD,
        UPSTREAM_PASSWORD,
        PRIVATE_KEY,
    ] {
        assert!(
            !printed.contains(secret),
            "{what} prints {secret}: {printed}"
        );
    }
}

fn grant() -> GrantData {
    GrantData {
        refresh_token: Some(SecretString::from(REFRESH_TOKEN)),
        obtained_at: 1,
        client_id: None,
        shared_access: Some(SharedAccess {
            token: SecretString::from(ACCESS_TOKEN),
            expires_at: 1,
            lifetime_secs: 3600,
        }),
    }
}

#[test]
fn configuration_and_provider_values() {
    let raw: Config = toml::from_str(CONFIG).unwrap();
    let provider_table: &ProviderConfig = raw.providers["corp"].get_ref();
    assert_hidden("ProviderConfig", &format!("{provider_table:?}"));
    assert_hidden("Config", &format!("{raw:?}"));
    let settings = Settings::parse(CONFIG, "t.toml").unwrap();
    assert_hidden("Settings", &format!("{settings:?}"));
    let url = settings.server.store.as_ref().expect("store");
    assert_hidden("StoreUrl", &format!("{url:?} {url}"));
    let provider = &settings.providers["corp"];
    assert!(provider.client_secret.is_some());
    assert_hidden("Provider", &format!("{provider:?}"));
    let scopes = vec!["mail".to_string()];
    assert_hidden(
        "FlowEndpoints",
        &format!("{:?}", endpoints(provider, &scopes)),
    );
}

#[test]
fn token_and_grant_values() {
    let obtained = Obtained {
        refresh_token: Some(SecretString::from(REFRESH_TOKEN)),
        access_token: SecretString::from(ACCESS_TOKEN),
        expires_in: Some(Duration::from_secs(3600)),
    };
    assert_hidden("Obtained", &format!("{obtained:?}"));
    let access = AccessToken {
        secret: SecretString::from(ACCESS_TOKEN),
        expires_at: Instant::now(),
        lifetime: Duration::from_secs(3600),
        generation: 1,
    };
    assert_hidden("AccessToken", &format!("{access:?}"));
    assert_hidden("GrantData", &format!("{:?}", grant()));
    let authorized = Authorized {
        grant: grant(),
        flow: "authorization_code",
    };
    assert_hidden("Authorized", &format!("{authorized:?}"));
    let options = AuthorizeOptions {
        interaction: Interaction::Browser,
        timeout: Duration::from_secs(1),
        upstream_password: Some(SecretString::from(UPSTREAM_PASSWORD)),
    };
    assert_hidden("AuthorizeOptions", &format!("{options:?}"));
    let key = ServiceAccountKey {
        client_email: "robot@project.example".into(),
        private_key: SecretString::from(PRIVATE_KEY),
        private_key_id: None,
        token_uri: None,
    };
    assert_hidden("ServiceAccountKey", &format!("{key:?}"));
    let seal_key = SealKey::from_bytes(*b"0123456789abcdef0123456789abcdef");
    let printed = format!("{seal_key:?}");
    assert!(!printed.contains("0123456789abcdef"), "{printed}");
}

#[tokio::test]
async fn unlocked_grants_and_the_vault() {
    let store: Arc<dyn TokenStore> = Arc::new(SledStore::open_temporary().unwrap());
    let vault = Vault::new(store, KdfParams::for_tests(), BackoffPolicy::default());
    let password = SecretString::from(PASSWORD);
    vault
        .create("alice", &password, grant(), AccountMeta::default(), false)
        .await
        .unwrap();
    let unlocked = vault
        .unlock("alice", &password, IpAddr::V4(Ipv4Addr::LOCALHOST))
        .await
        .unwrap();
    assert!(unlocked.refresh_token().is_some());
    assert_hidden("Unlocked", &format!("{unlocked:?}"));
    assert_hidden("Vault", &format!("{vault:?}"));
}
